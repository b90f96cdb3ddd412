//! The forwarder driven through whole exchanges on a manual clock.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::RecordType;
use proptest::prelude::*;
use rand_core::{impls, RngCore};

use crate::message::tests::{answer, query};
use crate::{Config, Forwarder, Output, Rate, Result, Send, Transport};

/// A deterministic generator (xorshift), so runs repeat.
struct Xorshift(u64);

impl RngCore for Xorshift {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        impls::fill_bytes_via_next(self, dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> std::result::Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

const UP1: &str = "198.18.0.2:53";
const UP2: &str = "198.18.0.3:53";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("addr")
}

fn forwarder(upstreams: &[&str], t0: Instant) -> Forwarder<u32, Xorshift> {
    let config = Config {
        upstreams: upstreams.iter().map(|s| addr(s)).collect(),
        ..Config::default()
    };
    Forwarder::new(config, Xorshift(0x9e37_79b9_7f4a_7c15), t0)
}

fn sends(out: &[Output<u32>]) -> Vec<Send> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

fn replies(out: &[Output<u32>]) -> Vec<(u32, Message)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Reply { client, wire } => {
                Some((*client, Message::from_vec(wire).expect("reply decodes")))
            }
            _ => None,
        })
        .collect()
}

fn one_send(out: &[Output<u32>]) -> Send {
    let list = sends(out);
    assert_eq!(list.len(), 1, "{out:?}");
    list.into_iter().next().expect("one")
}

#[test]
fn a_miss_goes_upstream_and_only_the_matching_reply_answers() {
    let t0 = Instant::now();
    let mut f = forwarder(&[UP1], t0);
    let out = f.handle_query(
        1,
        10,
        Transport::Udp,
        &query("db.zone.", RecordType::A, 77, None),
        t0,
    );
    let send = one_send(&out);
    assert_eq!((send.upstream, send.transport), (addr(UP1), Transport::Udp));
    let sent = Message::from_vec(&send.wire).expect("upstream query");
    assert_ne!(sent.metadata.id, 77, "the client's ID must not go upstream");
    let good = answer(&send.wire, 1, 60);
    // From another address, or with another ID: ignored, still waiting.
    assert!(f.handle_reply(send.ticket, addr(UP2), &good, t0).is_empty());
    let mut wrong_id = good.clone();
    wrong_id[1] ^= 1;
    assert!(f
        .handle_reply(send.ticket, addr(UP1), &wrong_id, t0)
        .is_empty());
    assert!(f
        .handle_reply(send.ticket, addr(UP1), b"junk", t0)
        .is_empty());
    assert_eq!(f.stats().upstream_mismatched, 3);
    let out = f.handle_reply(send.ticket, addr(UP1), &good, t0);
    assert!(out.contains(&Output::Close(send.ticket)));
    let got = replies(&out);
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].0, got[0].1.metadata.id), (10, 77));
    assert_eq!(got[0].1.answers.len(), 1);
    // The ticket is done: a late duplicate changes nothing.
    assert!(f.handle_reply(send.ticket, addr(UP1), &good, t0).is_empty());
    assert_eq!(f.stats().result(Result::Upstream), 1);
}

#[test]
fn the_cache_answers_until_the_ttl_runs_out() {
    let t0 = Instant::now();
    let mut f = forwarder(&[UP1], t0);
    let q = query("db.zone.", RecordType::A, 1, None);
    let send = one_send(&f.handle_query(1, 1, Transport::Udp, &q, t0));
    f.handle_reply(send.ticket, addr(UP1), &answer(&send.wire, 1, 30), t0);
    let at = t0 + Duration::from_secs(29);
    let out = f.handle_query(1, 2, Transport::Udp, &q, at);
    assert!(sends(&out).is_empty());
    let got = replies(&out);
    assert_eq!(got[0].1.answers[0].ttl, 1, "TTL aged by 29 s");
    let later = t0 + Duration::from_secs(30);
    assert_eq!(
        sends(&f.handle_query(1, 3, Transport::Udp, &q, later)).len(),
        1
    );
    assert_eq!(f.stats().result(Result::Cache), 1);
}

#[test]
fn ten_thousand_repeats_reach_the_upstream_once_per_ttl_and_others_are_answered() {
    let t0 = Instant::now();
    let mut f = forwarder(&[UP1], t0);
    let q = query("db.zone.", RecordType::A, 1, None);
    let mut now = t0;
    let mut upstream_queries = 0;
    let mut answered = [0u32; 2];
    for i in 0..10_000u32 {
        // Peer 1 floods at 1,000 a second; peer 2 asks now and then.
        now += Duration::from_millis(1);
        let peer = if i % 100 == 0 { 2 } else { 1 };
        let out = f.handle_query(peer, peer as u32, Transport::Udp, &q, now);
        for send in sends(&out) {
            upstream_queries += 1;
            let reply = answer(&send.wire, 1, 3);
            for (client, _) in replies(&f.handle_reply(send.ticket, addr(UP1), &reply, now)) {
                answered[client as usize - 1] += 1;
            }
        }
        for (client, _) in replies(&out) {
            answered[client as usize - 1] += 1;
        }
    }
    // 10 s with a TTL of 3 s: four fetches.
    assert_eq!(upstream_queries, 4);
    assert_eq!(
        answered[1], 100,
        "every one of peer 2's queries is answered"
    );
    assert!(answered[0] > 5_000, "peer 1 got {} answers", answered[0]);
    assert!(f.stats().result(Result::RateLimited) > 0);
}

#[test]
fn identical_queries_in_flight_share_one_upstream_query() {
    let t0 = Instant::now();
    let mut f = forwarder(&[UP1], t0);
    let mut all = Vec::new();
    for client in 0..50u32 {
        let wire = query("DB.zone.", RecordType::A, client as u16, Some(1232));
        all.extend(f.handle_query(u64::from(client), client, Transport::Udp, &wire, t0));
    }
    let send = one_send(&all);
    let out = f.handle_reply(send.ticket, addr(UP1), &answer(&send.wire, 2, 60), t0);
    let got = replies(&out);
    assert_eq!(got.len(), 50);
    for (client, reply) in got {
        assert_eq!(u32::from(reply.metadata.id), client);
    }
}

#[test]
fn a_dead_upstream_is_skipped_and_all_down_is_servfail() {
    let t0 = Instant::now();
    let mut f = forwarder(&[UP1, UP2], t0);
    let q = |name: &str| query(name, RecordType::A, 5, None);
    let first = one_send(&f.handle_query(1, 1, Transport::Udp, &q("a.zone."), t0));
    assert_eq!(first.upstream, addr(UP1));
    assert_eq!(f.next_deadline(), Some(t0 + Duration::from_secs(2)));
    assert!(f
        .handle_timeout(t0 + Duration::from_millis(1999))
        .is_empty());
    let t1 = t0 + Duration::from_secs(2);
    let out = f.handle_timeout(t1);
    assert!(out.contains(&Output::Close(first.ticket)));
    let second = one_send(&out);
    assert_eq!(second.upstream, addr(UP2));
    assert_ne!(second.ticket, first.ticket);
    // UP1 is down now: a new query goes straight to UP2.
    let third = one_send(&f.handle_query(1, 2, Transport::Udp, &q("b.zone."), t1));
    assert_eq!(third.upstream, addr(UP2));
    // UP2 does not answer either: SERVFAIL for both clients.
    let t2 = t1 + Duration::from_secs(2);
    let got = replies(&f.handle_timeout(t2));
    assert_eq!(got.len(), 2);
    assert!(got
        .iter()
        .all(|(_, m)| m.metadata.response_code == ResponseCode::ServFail));
    // All down: the next query still tries the one that went down first,
    // once, so a recovered upstream is found.
    let retry = one_send(&f.handle_query(1, 3, Transport::Udp, &q("c.zone."), t2));
    assert_eq!(retry.upstream, addr(UP1));
    let got = replies(&f.handle_timeout(t2 + Duration::from_secs(2)));
    assert_eq!(got[0].1.metadata.response_code, ResponseCode::ServFail);
    // After the down time, UP1 is first again.
    let t3 = t2 + Duration::from_secs(60);
    assert_eq!(
        one_send(&f.handle_query(1, 4, Transport::Udp, &q("d.zone."), t3)).upstream,
        addr(UP1)
    );
}

#[test]
fn a_refused_connection_moves_on_at_once() {
    let t0 = Instant::now();
    let mut f = forwarder(&[UP1, UP2], t0);
    let first = one_send(&f.handle_query(
        1,
        1,
        Transport::Tcp,
        &query("a.zone.", RecordType::A, 5, None),
        t0,
    ));
    let next = one_send(&f.handle_failure(first.ticket, t0));
    assert_eq!((next.upstream, next.transport), (addr(UP2), Transport::Tcp));
}

#[test]
fn a_servfail_tries_the_next_upstream_and_the_last_one_is_passed_on() {
    let t0 = Instant::now();
    let mut f = forwarder(&[UP1, UP2], t0);
    let first = one_send(&f.handle_query(
        1,
        1,
        Transport::Udp,
        &query("a.zone.", RecordType::A, 5, None),
        t0,
    ));
    let mut fail = Message::from_vec(&answer(&first.wire, 0, 60)).expect("m");
    fail.metadata.response_code = ResponseCode::ServFail;
    let next = one_send(&f.handle_reply(first.ticket, addr(UP1), &fail.to_vec().expect("e"), t0));
    assert_eq!(next.upstream, addr(UP2));
    let mut fail2 = Message::from_vec(&answer(&next.wire, 0, 60)).expect("m");
    fail2.metadata.response_code = ResponseCode::ServFail;
    let got = replies(&f.handle_reply(next.ticket, addr(UP2), &fail2.to_vec().expect("e"), t0));
    assert_eq!(got[0].1.metadata.response_code, ResponseCode::ServFail);
}

#[test]
fn a_truncated_udp_reply_is_asked_again_over_tcp() {
    let t0 = Instant::now();
    let mut f = forwarder(&[UP1], t0);
    let first = one_send(&f.handle_query(
        1,
        1,
        Transport::Udp,
        &query("big.zone.", RecordType::A, 5, None),
        t0,
    ));
    let mut cut = Message::from_vec(&answer(&first.wire, 0, 60)).expect("m");
    cut.metadata.truncation = true;
    cut.authorities.clear();
    let tcp = one_send(&f.handle_reply(first.ticket, addr(UP1), &cut.to_vec().expect("e"), t0));
    assert_eq!((tcp.upstream, tcp.transport), (addr(UP1), Transport::Tcp));
    // The whole answer over TCP: the UDP client without EDNS gets TC and
    // retries over TCP, where the cache answers it whole.
    let out = f.handle_reply(tcp.ticket, addr(UP1), &answer(&tcp.wire, 60, 60), t0);
    let got = replies(&out);
    assert!(got[0].1.metadata.truncation && got[0].1.answers.is_empty());
    let again = f.handle_query(
        1,
        2,
        Transport::Tcp,
        &query("big.zone.", RecordType::A, 6, None),
        t0,
    );
    assert!(sends(&again).is_empty());
    assert_eq!(replies(&again)[0].1.answers.len(), 60);
    assert_eq!(f.stats().truncated, 1);
}

#[test]
fn one_peer_cannot_use_up_the_upstream_or_the_slots() {
    let t0 = Instant::now();
    let config = Config {
        upstreams: vec![addr(UP1)],
        max_in_flight: 8,
        upstream_rate: Rate {
            per_second: 10,
            burst: 5,
        },
        ..Config::default()
    };
    let mut f: Forwarder<u32, _> = Forwarder::new(config, Xorshift(1), t0);
    let distinct = |i: u32| query(&format!("n{i}.zone."), RecordType::A, 1, None);
    let flood: usize = (0..100)
        .map(|i| sends(&f.handle_query(1, 1, Transport::Udp, &distinct(i), t0)).len())
        .sum();
    assert_eq!(flood, 5, "peer 1 is held to its upstream burst");
    assert!(f.stats().result(Result::RateLimited) >= 95);
    // Peer 2 still gets through, until the in-flight bound.
    let others: usize = (100..110)
        .map(|i| sends(&f.handle_query(u64::from(i), 2, Transport::Udp, &distinct(i), t0)).len())
        .sum();
    assert_eq!(others, 3, "8 in flight at most");
    assert_eq!(f.stats().result(Result::Overloaded), 7);
    assert_eq!(f.stats().in_flight, 8);
}

#[test]
fn bad_queries_are_counted_and_refusals_answered() {
    let t0 = Instant::now();
    let mut f = forwarder(&[UP1], t0);
    assert!(f.handle_query(1, 1, Transport::Udp, b"\x12", t0).is_empty());
    assert_eq!(f.stats().result(Result::Malformed), 1);
    let got = replies(&f.handle_query(
        1,
        1,
        Transport::Tcp,
        &query("zone.", RecordType::AXFR, 3, None),
        t0,
    ));
    assert_eq!(got[0].1.metadata.response_code, ResponseCode::Refused);
    let mut none = forwarder(&[], t0);
    let got = replies(&none.handle_query(
        1,
        1,
        Transport::Udp,
        &query("a.zone.", RecordType::A, 3, None),
        t0,
    ));
    assert_eq!(got[0].1.metadata.response_code, ResponseCode::ServFail);
}

#[test]
fn new_upstreams_empty_the_cache() {
    let t0 = Instant::now();
    let mut f = forwarder(&[UP1], t0);
    let q = query("db.zone.", RecordType::A, 1, None);
    let send = one_send(&f.handle_query(1, 1, Transport::Udp, &q, t0));
    f.handle_reply(send.ticket, addr(UP1), &answer(&send.wire, 1, 300), t0);
    f.set_upstreams(vec![addr(UP1)]);
    assert!(sends(&f.handle_query(1, 1, Transport::Udp, &q, t0)).is_empty());
    f.set_upstreams(vec![addr(UP2)]);
    assert_eq!(f.upstreams(), vec![addr(UP2)]);
    assert_eq!(
        one_send(&f.handle_query(1, 1, Transport::Udp, &q, t0)).upstream,
        addr(UP2)
    );
}

/// Found by the `dns` fuzz target: a query on its way when the list
/// changed was later sent to whichever server took its old place in the
/// list, or to 0.0.0.0:0 when the list had emptied.
#[test]
fn queries_on_their_way_keep_their_server_when_the_upstreams_change() {
    let t0 = Instant::now();
    let mut f = forwarder(&[UP1, UP2], t0);
    let q = |id| query("big.zone.", RecordType::A, id, None);
    let first = one_send(&f.handle_query(1, 1, Transport::Udp, &q(5), t0));
    assert_eq!(first.upstream, addr(UP1));
    // UP1 leaves; a truncated answer from it is still asked again of it,
    // over TCP, the question it already half answered.
    f.set_upstreams(vec![addr(UP2)]);
    let mut cut = Message::from_vec(&answer(&first.wire, 0, 60)).expect("m");
    cut.metadata.truncation = true;
    cut.authorities.clear();
    let tcp = one_send(&f.handle_reply(first.ticket, addr(UP1), &cut.to_vec().expect("e"), t0));
    assert_eq!((tcp.upstream, tcp.transport), (addr(UP1), Transport::Tcp));
    // It times out: the next try is the new list's server, then nothing.
    let t1 = t0 + Duration::from_secs(3);
    let next = one_send(&f.handle_timeout(t1));
    assert_eq!(next.upstream, addr(UP2));
    // The list empties while that one waits: its timeout is a SERVFAIL,
    // never a send to no one.
    f.set_upstreams(Vec::new());
    let out = f.handle_timeout(t1 + Duration::from_secs(3));
    assert!(sends(&out).is_empty(), "{out:?}");
    assert_eq!(
        replies(&out)[0].1.metadata.response_code,
        ResponseCode::ServFail
    );
    assert_eq!(f.stats().in_flight, 0);
}

proptest! {
    #[test]
    fn no_bytes_make_it_panic(
        q in proptest::collection::vec(any::<u8>(), 0..600),
        r in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let t0 = Instant::now();
        let mut f = forwarder(&[UP1], t0);
        let out = f.handle_query(1, 1, Transport::Udp, &q, t0);
        for send in sends(&out) {
            f.handle_reply(send.ticket, addr(UP1), &r, t0);
            // The query's own ID and question, with random records after.
            let mut spliced = answer(&send.wire, 1, 5);
            spliced.extend_from_slice(&r);
            f.handle_reply(send.ticket, addr(UP1), &spliced, t0);
        }
        f.handle_timeout(t0 + Duration::from_secs(10));
        prop_assert!(f.stats().in_flight <= 1);
    }
}
