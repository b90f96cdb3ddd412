//! A session older than REKEY_AFTER_TIME (120 s) is renewed by its
//! initiator while traffic keeps flowing: vpcgated initiates against Debian's
//! wireguard-go, pings run throughout, and the handshake time moves on
//! without the tunnel dropping. This test takes about two and a half minutes.

use std::time::{Duration, Instant};

use vpcgate_e2e::{ping_stats, require_root, wait_for_ping, Endpoints, Impl, Pair, PairSpec};

#[test]
fn vpcgated_rekeys_a_live_session_with_wireguard_go() {
    require_root();
    let mut spec = PairSpec::new(Impl::Vpcgated, Impl::WireguardGo);
    spec.endpoints = Endpoints::AOnly;
    let pair = Pair::new(spec).expect("set up vpcgated and wireguard-go namespaces");
    let (gw, wgo) = (&pair.a, &pair.b);
    wait_for_ping(&gw.ns, &wgo.t4(), &[], Duration::from_secs(20)).expect("first handshake");
    let first = gw.dev.peer(&wgo.public_key).expect("peer").latest_handshake;
    assert_ne!(first, 0);

    // Ping in rounds of 10 s until a newer handshake appears; the kernel and
    // wireguard-go renew at 120 s on the initiator's next send.
    let started = Instant::now();
    let (mut sent, mut received) = (0, 0);
    let renewed = loop {
        let round = ping_stats(&gw.ns, &wgo.t4(), 20, &["-i", "0.5"]).expect("ping round");
        sent += round.transmitted;
        received += round.received;
        let now = gw.dev.peer(&wgo.public_key).expect("peer").latest_handshake;
        if now > first {
            break now;
        }
        assert!(
            started.elapsed() < Duration::from_secs(200),
            "no new handshake within 200 s of the first (REKEY_AFTER_TIME is 120 s)"
        );
    };
    assert!(
        renewed >= first + 110,
        "renewed after {} s, before REKEY_AFTER_TIME",
        renewed - first
    );
    // A rekey happens alongside the old session: at most a packet or two may
    // be lost while the new keys are confirmed.
    assert!(
        sent - received <= 2,
        "{received}/{sent} pings answered across the rekey"
    );
    let seen = wgo
        .dev
        .peer(&gw.public_key)
        .expect("wireguard-go lists vpcgated");
    assert!(
        seen.latest_handshake >= renewed.saturating_sub(1),
        "wireguard-go missed the rekey: {seen:?}"
    );
    assert!(
        ping_stats(&gw.ns, &wgo.t4(), 3, &[])
            .expect("ping")
            .received
            == 3,
        "tunnel dead after rekey"
    );
}
