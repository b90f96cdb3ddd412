//! The DNS forwarder driven by arbitrary bytes: queries from peers (raw
//! bytes, or well-formed ones with fuzzed names, types and EDNS sizes),
//! upstream replies (raw, or built from the query sent with fuzzed codes,
//! flags and answers, from the right address or another), socket failures,
//! upstream list changes and time passing, on a manual clock.
//!
//! Whatever the bytes, it checks what the shell relies on: every client
//! gets at most one reply, with its own ID, and over UDP no more than its
//! UDP size; every upstream query is one we would accept ourselves and goes
//! to a configured upstream; every ticket is closed once; the cache and the
//! queries in flight stay within their bounds; and once time has run out,
//! nothing is left in flight and every client not dropped (malformed, over
//! its rate, overloaded) has been answered.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand_core::{impls, RngCore};
use vpcgate_dns::message::{parse_query, CLASSIC_UDP};
use vpcgate_dns::{Config, Forwarder, Output, Rate, Result as Outcome, Send, Ticket, Transport};

const UPSTREAMS: [&str; 3] = ["198.18.0.2:53", "198.18.0.3:53", "[fd00::2]:53"];
const CACHE_BYTES: usize = 16 << 10;
const MAX_IN_FLIGHT: usize = 8;
const STEPS: usize = 256;

/// A deterministic generator, so that a corpus input replays the same.
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
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// The fuzzer's bytes, read from the front; zeros once they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn byte(&mut self) -> u8 {
        let (first, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        *first
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }
}

struct Client {
    wire: Vec<u8>,
    transport: Transport,
    replied: bool,
}

struct Harness {
    forwarder: Forwarder<usize, Xorshift>,
    upstreams: Vec<SocketAddr>,
    clients: Vec<Client>,
    open: Vec<Send>,
    tickets: HashSet<Ticket>,
    now: Instant,
}

fn upstream_list(mask: u8) -> Vec<SocketAddr> {
    UPSTREAMS
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .filter_map(|(_, s)| s.parse().ok())
        .collect()
}

pub fn dns(data: &[u8]) {
    let mut input = Bytes(data);
    let now = Instant::now();
    let upstreams = upstream_list(input.byte() | 1);
    let config = Config {
        upstreams: upstreams.clone(),
        cache_bytes: CACHE_BYTES,
        max_in_flight: MAX_IN_FLIGHT,
        max_waiters: 2,
        query_rate: Rate {
            per_second: 20,
            burst: 40,
        },
        upstream_rate: Rate {
            per_second: 10,
            burst: 20,
        },
        tracked_peers: 4,
        ..Config::default()
    };
    let mut h = Harness {
        forwarder: Forwarder::new(config, Xorshift(0x9e37_79b9_7f4a_7c15), now),
        upstreams,
        clients: Vec::new(),
        open: Vec::new(),
        tickets: HashSet::new(),
        now,
    };
    for _ in 0..STEPS {
        if input.is_empty() {
            break;
        }
        let out = h.step(&mut input);
        h.check(out);
    }
    // Time runs out: every upstream is given up on, one attempt at a time.
    for _ in 0..=UPSTREAMS.len() * 2 {
        h.now += Duration::from_secs(60);
        let out = h.forwarder.handle_timeout(h.now);
        h.check(out);
    }
    let stats = h.forwarder.stats();
    assert_eq!(stats.in_flight, 0, "queries left in flight");
    assert!(h.open.is_empty(), "tickets never closed");
    let unanswered = h.clients.iter().filter(|c| !c.replied).count() as u64;
    let dropped = [
        Outcome::Malformed,
        Outcome::RateLimited,
        Outcome::Overloaded,
    ]
    .iter()
    .map(|r| stats.result(*r))
    .sum::<u64>();
    assert_eq!(unanswered, dropped, "a client neither answered nor dropped");
}

impl Harness {
    fn step(&mut self, input: &mut Bytes) -> Vec<Output<usize>> {
        match input.byte() % 7 {
            0 => {
                let len = usize::from(input.byte());
                let wire = input.take(len).to_vec();
                self.query(input, wire)
            }
            1 => {
                let wire = well_formed_query(input);
                self.query(input, wire)
            }
            2 | 3 => {
                let Some(send) = self.pick_open(input) else {
                    return Vec::new();
                };
                let from = self.source(input, &send);
                let wire = reply_to(&send.wire, input);
                self.forwarder
                    .handle_reply(send.ticket, from, &wire, self.now)
            }
            4 => {
                let Some(send) = self.pick_open(input) else {
                    return Vec::new();
                };
                let from = self.source(input, &send);
                let len = usize::from(input.byte());
                let wire = input.take(len).to_vec();
                match input.byte() % 2 {
                    0 => self
                        .forwarder
                        .handle_reply(send.ticket, from, &wire, self.now),
                    _ => self.forwarder.handle_failure(send.ticket, self.now),
                }
            }
            5 => {
                self.now += Duration::from_millis(u64::from(input.u16()));
                self.forwarder.handle_timeout(self.now)
            }
            _ => {
                self.upstreams = upstream_list(input.byte());
                self.forwarder.set_upstreams(self.upstreams.clone());
                Vec::new()
            }
        }
    }

    fn query(&mut self, input: &mut Bytes, wire: Vec<u8>) -> Vec<Output<usize>> {
        let peer = u64::from(input.byte() % 6);
        let transport = match input.byte() % 2 {
            0 => Transport::Udp,
            _ => Transport::Tcp,
        };
        let client = self.clients.len();
        let out = self
            .forwarder
            .handle_query(peer, client, transport, &wire, self.now);
        self.clients.push(Client {
            wire,
            transport,
            replied: false,
        });
        out
    }

    fn pick_open(&mut self, input: &mut Bytes) -> Option<Send> {
        let i = usize::from(input.byte()) % self.open.len().max(1);
        self.open.get(i).cloned()
    }

    /// Where a reply comes from: mostly the upstream asked, else another.
    fn source(&self, input: &mut Bytes, send: &Send) -> SocketAddr {
        match input.byte() % 4 {
            0 => UPSTREAMS
                .iter()
                .filter_map(|s| s.parse().ok())
                .find(|a| *a != send.upstream)
                .unwrap_or(send.upstream),
            _ => send.upstream,
        }
    }

    fn check(&mut self, out: Vec<Output<usize>>) {
        // A truncated answer is asked again of the server that gave it,
        // listed or not: it closes that ticket and sends in one go.
        let mut closed = Vec::new();
        for output in out {
            match output {
                Output::Reply { client, wire } => self.check_reply(client, &wire),
                Output::Send(send) => {
                    assert!(
                        self.tickets.insert(send.ticket),
                        "ticket {:?} handed out twice",
                        send.ticket
                    );
                    assert!(
                        self.upstreams.contains(&send.upstream)
                            || (send.transport == Transport::Tcp
                                && closed.contains(&send.upstream)),
                        "sent to {} outside the upstreams {:?}",
                        send.upstream,
                        self.upstreams
                    );
                    assert!(
                        parse_query(&send.wire).is_ok(),
                        "an upstream query we would refuse ourselves"
                    );
                    self.open.push(send);
                }
                Output::Close(ticket) => {
                    let at = self.open.iter().position(|s| s.ticket == ticket);
                    let Some(at) = at else {
                        panic!("ticket {ticket:?} closed but not open");
                    };
                    closed.push(self.open.remove(at).upstream);
                }
            }
        }
        let stats = self.forwarder.stats();
        assert!(stats.cache_bytes <= CACHE_BYTES as u64, "cache over budget");
        assert!(
            stats.in_flight <= MAX_IN_FLIGHT as u64,
            "too many in flight"
        );
        assert_eq!(stats.in_flight, self.open.len() as u64, "open tickets");
    }

    fn check_reply(&mut self, client: usize, wire: &[u8]) {
        let Some(c) = self.clients.get_mut(client) else {
            panic!("a reply to client {client}, who never asked");
        };
        assert!(!c.replied, "client {client} answered twice");
        c.replied = true;
        assert!(wire.len() >= 12, "a reply shorter than a DNS header");
        assert_eq!(wire.get(..2), c.wire.get(..2), "the client's own ID");
        assert!(wire[2] & 0x80 != 0, "a reply is a response");
        if c.transport == Transport::Udp {
            let limit = parse_query(&c.wire)
                .map(|q| q.udp_limit())
                .unwrap_or(CLASSIC_UDP);
            assert!(
                wire.len() <= limit,
                "a {}-byte UDP reply to a client that takes {limit}",
                wire.len()
            );
        }
    }
}

/// A query that parses: an ID, flags, one question of fuzzed labels and
/// type, and EDNS with a fuzzed size or none.
fn well_formed_query(input: &mut Bytes) -> Vec<u8> {
    let mut wire = Vec::with_capacity(64);
    wire.extend_from_slice(&input.u16().to_be_bytes());
    // QR clear, RD; opcode QUERY, or STATUS one time in eight.
    let opcode = if input.byte().is_multiple_of(8) {
        2 << 3
    } else {
        0
    };
    wire.extend_from_slice(&[opcode | 0x01, 0x00, 0, 1, 0, 0, 0, 0]);
    let edns = input.u16();
    wire.extend_from_slice(&[0, u8::from(edns != 0)]);
    for _ in 0..1 + input.byte() % 3 {
        let len = 1 + input.byte() % 12;
        wire.push(len);
        for _ in 0..len {
            wire.push(b'a' + input.byte() % 26);
        }
    }
    wire.push(0);
    let qtype = match input.byte() % 6 {
        0 => 1,   // A
        1 => 28,  // AAAA
        2 => 252, // AXFR
        3 => 16,  // TXT
        _ => input.u16(),
    };
    let class = if input.byte().is_multiple_of(8) { 3 } else { 1 };
    wire.extend_from_slice(&qtype.to_be_bytes());
    wire.extend_from_slice(&[0, class]);
    if edns != 0 {
        // OPT: root name, type 41, class = UDP size, version 0.
        wire.extend_from_slice(&[0, 0, 41]);
        wire.extend_from_slice(&edns.to_be_bytes());
        wire.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    }
    wire
}

/// An upstream's reply to `query` (as we sent it): its ID and question,
/// a fuzzed RCODE and TC bit, and up to 80 A records of a fuzzed TTL
/// (enough to overflow any client's UDP size), placed after the question.
fn reply_to(query: &[u8], input: &mut Bytes) -> Vec<u8> {
    let Some(question_end) = question_end(query) else {
        return query.to_vec();
    };
    let mut wire = query.get(..question_end).unwrap_or_default().to_vec();
    let flags = input.byte();
    let rcode = match flags % 8 {
        0..=3 => 0,
        4 => 2, // SERVFAIL
        5 => 3, // NXDOMAIN
        6 => 5, // REFUSED
        _ => input.byte() % 16,
    };
    let tc = if flags & 0x80 != 0 { 0x02 } else { 0 };
    if let Some(b) = wire.get_mut(2) {
        *b |= 0x80 | tc;
    }
    if let Some(b) = wire.get_mut(3) {
        *b = 0x80 | rcode;
    }
    let answers = input.byte() % 81;
    let ttl = u32::from(input.u16());
    if let Some(count) = wire.get_mut(6..8) {
        count.copy_from_slice(&u16::from(answers).to_be_bytes());
    }
    if let Some(count) = wire.get_mut(10..12) {
        count.copy_from_slice(&[0, 0]);
    }
    for i in 0..answers {
        // A pointer to the question's name, type A, class IN, the TTL,
        // four bytes of address.
        wire.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        wire.extend_from_slice(&ttl.to_be_bytes());
        wire.extend_from_slice(&[0, 4, 198, 18, 1, i]);
    }
    wire
}

/// Where the one question of a query we built ends: its name is a run of
/// labels with no compression, then type and class.
fn question_end(query: &[u8]) -> Option<usize> {
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        at += 1 + len;
    }
    let end = at + 1 + 4;
    (end <= query.len()).then_some(end)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    proptest! {
        // What a short fuzzing run would find, on stable Rust: random
        // scripts, mostly well-formed queries and replies.
        #![proptest_config(ProptestConfig::with_cases(3000))]
        #[test]
        fn the_forwarder_holds_its_invariants_on_random_scripts(
            data in prop::collection::vec(
                prop_oneof![3 => 1u8..=3, 1 => any::<u8>()],
                0..600,
            )
        ) {
            super::dns(&data);
        }
    }
}
