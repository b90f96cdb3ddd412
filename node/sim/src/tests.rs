//! WireGuard's timers (whitepaper §6), run on the simulated clock. Every
//! bound is one timer tick wide: the node runs boringtun's timers each
//! `TIMER_TICK`, so a timer fires on the first tick at or after its time.

use super::*;

const TICK: Duration = TIMER_TICK;
const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);

fn initiation(k: Kind) -> bool {
    k == Kind::Initiation
}

fn keepalive(k: Kind) -> bool {
    k == Kind::Keepalive
}

fn data(k: Kind) -> bool {
    matches!(k, Kind::Data { .. })
}

fn sessions(sim: &Sim, from: Side) -> Vec<u32> {
    let mut seen = Vec::new();
    for sent in &sim.log {
        if let (true, Kind::Data { session }) = (sent.from == from, sent.kind) {
            if seen.last() != Some(&session) {
                seen.push(session);
            }
        }
    }
    seen
}

/// Asserts that `t` lies in `[at, at + TICK]`.
fn within_a_tick(t: Duration, at: Duration, what: &str) {
    assert!(
        t >= at && t <= at + TICK,
        "{what} at {t:?}, expected within a tick after {at:?}"
    );
}

#[test]
fn the_initiator_rekeys_after_two_minutes_and_no_packet_is_lost() {
    let mut sim = Sim::new(0);
    sim.run_for(Duration::from_secs(1));
    sim.send(Side::A, b"first");
    let established = sim.elapsed();
    // Traffic both ways every second, so no keepalive is ever needed.
    for _ in 0..130 {
        sim.run_for(Duration::from_secs(1));
        sim.send(Side::A, b"ping");
        sim.send(Side::B, b"pong");
    }
    let inits = sim.times(Side::A, initiation);
    assert_eq!(inits.len(), 2, "A's initiations: {inits:?}");
    assert_eq!(inits[0], established);
    // The rekey is due 120 s after the session was made, but only checked
    // on the timer tick, and only once data was sent since.
    within_a_tick(inits[1], established + REKEY_AFTER_TIME, "the rekey");
    // The responder never initiates.
    assert!(sim.times(Side::B, initiation).is_empty());
    // A's data moved to the new session, and nothing was lost.
    assert_eq!(
        sessions(&sim, Side::A).len(),
        2,
        "{:?}",
        sessions(&sim, Side::A)
    );
    assert_eq!(sim.b.received().len(), 131);
    assert_eq!(sim.a.received().len(), 130);
    // The only keepalives confirm a new session to the responder; traffic
    // needs no other.
    for t in sim.times(Side::A, keepalive) {
        assert!(inits.contains(&t), "a keepalive at {t:?}");
    }
}

#[test]
fn a_peer_that_only_receives_sends_a_keepalive_ten_seconds_after_it_last_sent() {
    let mut sim = Sim::new(0);
    sim.run_for(Duration::from_secs(1));
    sim.send(Side::A, b"handshake");
    let response = sim.elapsed();
    assert_eq!(sim.times(Side::B, |k| k == Kind::Response), vec![response]);
    // boringtun stamps its timers with the time of the last tick, so a
    // packet that arrives in the tick B answered the handshake in does not
    // count as unanswered. The next one does.
    sim.run_for(Duration::from_secs(2));
    sim.send(Side::A, b"one way");
    sim.run_for(Duration::from_secs(30));
    let keepalives = sim.times(Side::B, keepalive);
    assert_eq!(keepalives.len(), 1, "B's keepalives: {keepalives:?}");
    within_a_tick(keepalives[0], response + KEEPALIVE_TIMEOUT, "B's keepalive");
    // A keepalive is not data: A does not answer it with another.
    assert!(sim.times(Side::A, keepalive).iter().all(|t| *t == response));
    // Each later one-way burst gets one keepalive, ten seconds after B
    // last sent anything: on the next tick, when that was long ago (the
    // kernel waits ten seconds after the packet instead).
    sim.send(Side::A, b"again");
    let again = sim.elapsed();
    assert!(again > keepalives[0] + KEEPALIVE_TIMEOUT);
    sim.run_for(Duration::from_secs(30));
    let keepalives = sim.times(Side::B, keepalive);
    assert_eq!(keepalives.len(), 2, "B's keepalives: {keepalives:?}");
    within_a_tick(keepalives[1], again, "the second");
    assert_eq!(sim.b.received().len(), 3);
}

#[test]
fn persistent_keepalive_is_sent_on_time_while_the_tunnel_is_idle() {
    let mut sim = Sim::new(25);
    // With an endpoint and a keepalive, the tunnel comes up by itself on
    // the first tick, as with the kernel.
    sim.run_for(Duration::from_secs(1));
    assert_eq!(sim.times(Side::A, initiation), vec![TICK]);
    assert_eq!(sim.times(Side::B, |k| k == Kind::Response), vec![TICK]);
    sim.send(Side::A, b"hello");
    let sent = sim.elapsed();
    sim.run_for(Duration::from_secs(101));
    let keepalives: Vec<_> = sim
        .times(Side::A, keepalive)
        .into_iter()
        .filter(|t| *t > sent)
        .collect();
    assert_eq!(keepalives.len(), 4, "A's keepalives: {keepalives:?}");
    let mut last = sent;
    for (i, &t) in keepalives.iter().enumerate() {
        within_a_tick(t, last + Duration::from_secs(25), &format!("keepalive {i}"));
        last = t;
    }
    // Traffic postpones it: a packet sent 20 s after a keepalive moves the
    // next one to 25 s after the packet.
    sim.run_for(Duration::from_secs(21) - (sim.elapsed() - last));
    sim.send(Side::A, b"traffic");
    let packet = sim.elapsed();
    sim.run_for(Duration::from_secs(26));
    let after: Vec<_> = sim
        .times(Side::A, keepalive)
        .into_iter()
        .filter(|t| *t > packet)
        .collect();
    assert_eq!(after.len(), 1, "{after:?}");
    within_a_tick(
        after[0],
        packet + Duration::from_secs(25),
        "the postponed keepalive",
    );
}

#[test]
fn an_unanswered_handshake_is_retried_every_five_seconds_for_ninety() {
    let mut sim = Sim::new(0);
    sim.run_for(Duration::from_secs(1));
    sim.cut = true;
    sim.send(Side::A, b"lost");
    let first = sim.elapsed();
    sim.run_for(Duration::from_secs(150));
    let inits = sim.times(Side::A, initiation);
    // One at the start and a retry every REKEY_TIMEOUT until
    // REKEY_ATTEMPT_TIME has passed: 90 / 5 = 18 in all.
    let expected = (REKEY_ATTEMPT_TIME.as_secs() / REKEY_TIMEOUT.as_secs()) as usize;
    assert_eq!(inits.len(), expected, "A's initiations: {inits:?}");
    let mut last = first;
    for &t in &inits[1..] {
        within_a_tick(t, last + REKEY_TIMEOUT, "a retry");
        last = t;
    }
    assert!(last < first + REKEY_ATTEMPT_TIME);

    // Once given up, a new packet starts a new handshake, and it gets
    // through when the network is back.
    sim.cut = false;
    sim.send(Side::A, b"again");
    assert_eq!(sim.times(Side::A, initiation).len(), expected + 1);
    assert_eq!(sim.b.received().len(), 1);
    assert_eq!(sim.b.received()[0].get(28..), Some(&b"again"[..]));
}

#[test]
fn an_idle_session_expires_and_the_next_packet_makes_a_new_one() {
    let mut sim = Sim::new(0);
    sim.run_for(Duration::from_secs(1));
    sim.send(Side::A, b"before");
    sim.run_for(REJECT_AFTER_TIME - Duration::from_secs(10));
    // Still within the session's life: data goes out with no handshake.
    sim.send(Side::A, b"still");
    assert_eq!(sim.times(Side::A, initiation).len(), 1);
    sim.run_for(Duration::from_secs(20));
    // Past REJECT_AFTER_TIME the session's keys may not be used: the
    // packet waits for a new handshake and then goes out.
    sim.send(Side::A, b"after");
    assert_eq!(sim.times(Side::A, initiation).len(), 2);
    assert_eq!(sessions(&sim, Side::A).len(), 2);
    assert_eq!(sim.b.received().len(), 3);
    assert!(!sim.times(Side::A, data).is_empty());
}
