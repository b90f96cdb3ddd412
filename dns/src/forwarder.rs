//! The forwarder's state machine: queries in, replies and upstream sends
//! out, driven by the caller's clock.
//!
//! A query is answered from the cache, joins an identical query already on
//! its way upstream, or goes upstream itself with a fresh random ID to the
//! first upstream not marked down. The caller sends it from a socket of its
//! own (so a fresh source port) and hands back what that socket receives
//! with the query's [`Ticket`]; only a reply from that upstream with that
//! ID and question is taken (RFC 5452). A truncated UDP reply is asked
//! again over TCP. An upstream that does not answer within the attempt
//! timeout is marked down for a while and the next one is tried; when none
//! is left the waiting clients get SERVFAIL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use rand_core::RngCore;

use crate::cache::Cache;
use crate::limit::{Budget, PeerLimits, Rate};
use crate::message::{self, CacheKey, ClientQuery, Refusal};
use crate::stats::{Result as Outcome, Stats};

/// The most upstreams used; resolv.conf itself allows three.
pub const MAX_UPSTREAMS: usize = 8;

/// The index of a query's server once that server has left the list.
const UNLISTED: usize = usize::MAX;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub upstreams: Vec<SocketAddr>,
    /// The cache's budget in bytes.
    pub cache_bytes: usize,
    /// Queries on their way upstream at once; each holds a socket.
    pub max_in_flight: usize,
    /// Clients waiting on one upstream query.
    pub max_waiters: usize,
    /// How long one upstream has to answer before the next is tried.
    pub attempt_timeout: Duration,
    /// How long an upstream that did not answer is passed over.
    pub down_for: Duration,
    /// Every query of one peer.
    pub query_rate: Rate,
    /// One peer's queries that go upstream.
    pub upstream_rate: Rate,
    /// Peers whose rates are tracked at once.
    pub tracked_peers: usize,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            upstreams: Vec::new(),
            cache_bytes: 4 << 20,
            max_in_flight: 256,
            max_waiters: 64,
            // A stub such as glibc's waits 5 s before it asks again; two
            // attempts fit in that.
            attempt_timeout: Duration::from_secs(2),
            down_for: Duration::from_secs(30),
            query_rate: Rate {
                per_second: 500,
                burst: 1000,
            },
            // A fifth of the AWS resolver's 1,024 a second.
            upstream_rate: Rate {
                per_second: 200,
                burst: 400,
            },
            tracked_peers: 8192,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// One upstream query: the caller's socket for it answers to this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ticket(pub u64);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send {
    pub ticket: Ticket,
    pub upstream: SocketAddr,
    pub transport: Transport,
    pub wire: Vec<u8>,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output<C> {
    /// Send `wire` to the client.
    Reply { client: C, wire: Vec<u8> },
    /// Send a query upstream from a fresh socket.
    Send(Send),
    /// Nothing more is expected for this ticket: close its socket.
    Close(Ticket),
}

struct Waiter<C> {
    client: C,
    query: ClientQuery,
    transport: Transport,
}

struct Pending<C> {
    key: CacheKey,
    /// The question as it went upstream.
    question: Query,
    id: u16,
    upstream: usize,
    /// The upstream's address, which the reply must come from.
    addr: SocketAddr,
    transport: Transport,
    /// Upstreams tried, by index.
    tried: u32,
    sent: Instant,
    deadline: Instant,
    waiters: Vec<Waiter<C>>,
}

struct Upstream {
    addr: SocketAddr,
    down_until: Option<Instant>,
}

pub struct Forwarder<C, R> {
    config: Config,
    upstreams: Vec<Upstream>,
    cache: Cache,
    limits: PeerLimits,
    pending: HashMap<Ticket, Pending<C>>,
    by_key: HashMap<CacheKey, Ticket>,
    next_ticket: u64,
    rng: R,
    stats: Stats,
}

impl<C: Clone, R: RngCore> Forwarder<C, R> {
    pub fn new(mut config: Config, rng: R, now: Instant) -> Forwarder<C, R> {
        config.upstreams.truncate(MAX_UPSTREAMS);
        Forwarder {
            upstreams: upstreams(&config.upstreams),
            cache: Cache::new(config.cache_bytes),
            limits: PeerLimits::new(
                config.query_rate,
                config.upstream_rate,
                config.tracked_peers,
                now,
            ),
            pending: HashMap::new(),
            by_key: HashMap::new(),
            next_ticket: 0,
            rng,
            stats: Stats::default(),
            config,
        }
    }

    pub fn upstreams(&self) -> Vec<SocketAddr> {
        self.upstreams.iter().map(|u| u.addr).collect()
    }

    /// Uses `list` from now on. A changed list empties the cache, since
    /// what it holds came from servers no longer asked; queries on their
    /// way finish where they are.
    pub fn set_upstreams(&mut self, mut list: Vec<SocketAddr>) {
        list.truncate(MAX_UPSTREAMS);
        if list != self.upstreams() {
            // A query on its way keeps its server, found by address in the
            // new list; one that left it is no longer anyone's index, and
            // every server of the new list counts as untried.
            for pending in self.pending.values_mut() {
                match list.iter().position(|a| *a == pending.addr) {
                    Some(i) => {
                        pending.upstream = i;
                        pending.tried = 1 << i;
                    }
                    None => {
                        pending.upstream = UNLISTED;
                        pending.tried = 0;
                    }
                }
            }
            self.upstreams = upstreams(&list);
            self.cache.clear();
            self.config.upstreams = list;
        }
    }

    pub fn stats(&self) -> Stats {
        let mut stats = self.stats.clone();
        stats.cache_entries = self.cache.len() as u64;
        stats.cache_bytes = self.cache.bytes() as u64;
        stats.in_flight = self.pending.len() as u64;
        stats
    }

    /// Counts a query the caller dropped before it got here (an oversized
    /// or stalled TCP frame, a full queue).
    pub fn count(&mut self, result: Outcome) {
        self.stats.record(result);
    }

    /// The earliest time [`handle_timeout`](Self::handle_timeout) has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// A query from `peer` (who it is decides its rate limit), to be
    /// answered to `client`.
    pub fn handle_query(
        &mut self,
        peer: u64,
        client: C,
        transport: Transport,
        wire: &[u8],
        now: Instant,
    ) -> Vec<Output<C>> {
        match transport {
            Transport::Udp => self.stats.queries_udp += 1,
            Transport::Tcp => self.stats.queries_tcp += 1,
        }
        if !self.limits.allow(peer, Budget::Query, now) {
            self.stats.record(Outcome::RateLimited);
            return Vec::new();
        }
        let query = match message::parse_query(wire) {
            Ok(query) => query,
            Err((Some(id), Refusal::Answer(code))) => {
                self.stats.record(Outcome::Refused);
                return vec![Output::Reply {
                    client,
                    wire: message::refusal_reply(id, code),
                }];
            }
            Err(_) => {
                self.stats.record(Outcome::Malformed);
                return Vec::new();
            }
        };
        let key = query.key();
        if let Some((cached, age)) = self.cache.get(&key, now) {
            if let Ok(answer) = Message::from_vec(cached) {
                self.stats.record(Outcome::Cache);
                let wire = self.reply(&answer, &query, age, transport);
                return vec![Output::Reply { client, wire }];
            }
        }
        if let Some(ticket) = self.by_key.get(&key) {
            if let Some(pending) = self.pending.get_mut(ticket) {
                if pending.waiters.len() < self.config.max_waiters {
                    pending.waiters.push(Waiter {
                        client,
                        query,
                        transport,
                    });
                    return Vec::new();
                }
            }
        }
        if self.upstreams.is_empty() {
            self.stats.record(Outcome::ServFail);
            let wire = message::error_reply(&query, ResponseCode::ServFail);
            return vec![Output::Reply { client, wire }];
        }
        if !self.limits.allow(peer, Budget::Upstream, now) {
            self.stats.record(Outcome::RateLimited);
            return Vec::new();
        }
        if self.pending.len() >= self.config.max_in_flight {
            self.stats.record(Outcome::Overloaded);
            return Vec::new();
        }
        let Some(upstream) = self.pick(0, true, now) else {
            // Not reached: with upstreams, a first attempt always has one.
            self.stats.record(Outcome::ServFail);
            let wire = message::error_reply(&query, ResponseCode::ServFail);
            return vec![Output::Reply { client, wire }];
        };
        let ticket = self.ticket();
        let id = self.rng.next_u32() as u16;
        let wire = message::upstream_query(id, &query);
        let addr = self.upstreams_addr(upstream);
        let pending = Pending {
            key: key.clone(),
            question: query.query.clone(),
            id,
            upstream,
            addr,
            transport,
            tried: 1 << upstream,
            sent: now,
            deadline: now + self.config.attempt_timeout,
            waiters: vec![Waiter {
                client,
                query,
                transport,
            }],
        };
        self.stats.upstream_sent += 1;
        let send = Send {
            ticket,
            upstream: addr,
            transport,
            wire,
        };
        self.pending.insert(ticket, pending);
        self.by_key.insert(key, ticket);
        vec![Output::Send(send)]
    }

    /// What the socket of `ticket` received from `from`. Anything but the
    /// reply it waits for is ignored, and it goes on waiting.
    pub fn handle_reply(
        &mut self,
        ticket: Ticket,
        from: SocketAddr,
        wire: &[u8],
        now: Instant,
    ) -> Vec<Output<C>> {
        let Some(pending) = self.pending.get(&ticket) else {
            return Vec::new();
        };
        let upstream = pending.upstream;
        let reply = (from == pending.addr)
            .then(|| message::parse_upstream_reply(wire, pending.id, &pending.question))
            .flatten();
        let Some(reply) = reply else {
            self.stats.upstream_mismatched += 1;
            return Vec::new();
        };
        let latency = now.saturating_duration_since(pending.sent);
        self.stats.latency.observe(latency);
        if let Some(u) = self.upstreams.get_mut(upstream) {
            u.down_until = None;
        }
        let Some(mut pending) = self.pending.remove(&ticket) else {
            return Vec::new();
        };
        let mut out = vec![Output::Close(ticket)];
        if reply.metadata.truncation && pending.transport == Transport::Udp {
            // The whole answer is there over TCP, from the same upstream.
            self.stats.upstream_tcp_retries += 1;
            pending.transport = Transport::Tcp;
            out.push(self.resend(pending, None, now));
            return out;
        }
        let code = reply.metadata.response_code;
        if matches!(
            code,
            ResponseCode::ServFail | ResponseCode::Refused | ResponseCode::NotImp
        ) {
            if let Some(next) = self.pick(pending.tried, false, now) {
                out.push(self.resend(pending, Some(next), now));
                return out;
            }
        }
        self.by_key.remove(&pending.key);
        if let Some(ttl) = message::cache_ttl(&reply) {
            self.cache.insert(pending.key.clone(), wire, ttl, now);
        }
        for waiter in pending.waiters {
            self.stats.record(if code == ResponseCode::ServFail {
                Outcome::ServFail
            } else {
                Outcome::Upstream
            });
            let wire = self.reply(&reply, &waiter.query, 0, waiter.transport);
            out.push(Output::Reply {
                client: waiter.client,
                wire,
            });
        }
        out
    }

    /// The socket of `ticket` failed for good (ICMP unreachable, a refused
    /// or reset TCP connection): as a timeout, but at once.
    pub fn handle_failure(&mut self, ticket: Ticket, now: Instant) -> Vec<Output<C>> {
        match self.pending.remove(&ticket) {
            Some(pending) => {
                self.stats.upstream_failures += 1;
                self.give_up_on(ticket, pending, now)
            }
            None => Vec::new(),
        }
    }

    /// Moves every query whose upstream is late to the next upstream, or
    /// answers SERVFAIL when none is left.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Output<C>> {
        let late: Vec<Ticket> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        let mut out = Vec::new();
        for ticket in late {
            if let Some(pending) = self.pending.remove(&ticket) {
                self.stats.upstream_timeouts += 1;
                out.extend(self.give_up_on(ticket, pending, now));
            }
        }
        out
    }

    fn give_up_on(&mut self, ticket: Ticket, pending: Pending<C>, now: Instant) -> Vec<Output<C>> {
        if let Some(u) = self.upstreams.get_mut(pending.upstream) {
            u.down_until = Some(now + self.config.down_for);
        }
        let mut out = vec![Output::Close(ticket)];
        if let Some(next) = self.pick(pending.tried, false, now) {
            out.push(self.resend(pending, Some(next), now));
            return out;
        }
        self.by_key.remove(&pending.key);
        for waiter in pending.waiters {
            self.stats.record(Outcome::ServFail);
            out.push(Output::Reply {
                client: waiter.client,
                wire: message::error_reply(&waiter.query, ResponseCode::ServFail),
            });
        }
        out
    }

    /// Sends `pending` again under a new ticket and ID: to `upstream`, or
    /// with `None` to the server it went to before (a truncated answer,
    /// asked again over TCP), whether or not that one is still listed.
    fn resend(
        &mut self,
        mut pending: Pending<C>,
        upstream: Option<usize>,
        now: Instant,
    ) -> Output<C> {
        let ticket = self.ticket();
        pending.id = self.rng.next_u32() as u16;
        if let Some(upstream) = upstream {
            pending.upstream = upstream;
            pending.addr = self.upstreams_addr(upstream);
            pending.tried |= 1 << upstream;
        }
        pending.sent = now;
        pending.deadline = now + self.config.attempt_timeout;
        // Every waiter asked the same question; the first one's words go.
        let wire = pending
            .waiters
            .first()
            .map(|w| message::upstream_query(pending.id, &w.query))
            .unwrap_or_default();
        self.stats.upstream_sent += 1;
        let send = Send {
            ticket,
            upstream: pending.addr,
            transport: pending.transport,
            wire,
        };
        self.by_key.insert(pending.key.clone(), ticket);
        self.pending.insert(ticket, pending);
        Output::Send(send)
    }

    /// The upstream to try next: the first untried one that is not down.
    /// On a query's first attempt, when all are down, the one that went
    /// down first is tried anyway, so that a recovered upstream is found;
    /// later attempts never go to one that is down.
    fn pick(&self, tried: u32, first: bool, now: Instant) -> Option<usize> {
        let untried = || (0..self.upstreams.len()).filter(|i| tried & (1 << i) == 0);
        let up = |i: &usize| {
            self.upstreams[*i]
                .down_until
                .is_none_or(|until| until <= now)
        };
        if let Some(i) = untried().find(up) {
            return Some(i);
        }
        if first {
            return untried().min_by_key(|i| self.upstreams[*i].down_until);
        }
        None
    }

    fn upstreams_addr(&self, index: usize) -> SocketAddr {
        self.upstreams
            .get(index)
            .map(|u| u.addr)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    fn reply(&mut self, answer: &Message, query: &ClientQuery, age: u32, t: Transport) -> Vec<u8> {
        let wire = message::client_reply(answer, query, age, t == Transport::Udp);
        if t == Transport::Udp && wire.len() >= 12 && wire[2] & 0x02 != 0 {
            self.stats.truncated += 1;
        }
        wire
    }

    fn ticket(&mut self) -> Ticket {
        self.next_ticket += 1;
        Ticket(self.next_ticket)
    }
}

fn upstreams(list: &[SocketAddr]) -> Vec<Upstream> {
    list.iter()
        .map(|&addr| Upstream {
            addr,
            down_until: None,
        })
        .collect()
}
