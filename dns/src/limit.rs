//! Per-peer rate limits: one token bucket for every query a peer sends,
//! and a smaller one for those that must go upstream (cache misses). The
//! upstream's own limit is shared by every peer (the AWS resolver drops
//! past 1,024 packets a second per interface), so no one peer may spend
//! more than its share of it; answers from the cache cost the upstream
//! nothing and are limited only to bound the work a flood makes.

use std::collections::HashMap;
use std::time::Instant;

/// A rate in queries a second, in bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Any query.
    Query,
    /// A query that goes upstream.
    Upstream,
}

#[derive(Clone, Copy)]
struct Bucket {
    /// Nanoseconds of credit.
    credit: u64,
    last: u64,
}

impl Bucket {
    fn full(rate: Rate) -> Bucket {
        Bucket {
            credit: max_credit(rate),
            last: 0,
        }
    }

    fn refill(&mut self, rate: Rate, t: u64) {
        let earned = t.saturating_sub(self.last);
        self.credit = self.credit.saturating_add(earned).min(max_credit(rate));
        self.last = t;
    }

    fn take(&mut self, rate: Rate, t: u64) -> bool {
        self.refill(rate, t);
        let cost = cost(rate);
        if self.credit >= cost {
            self.credit -= cost;
            true
        } else {
            false
        }
    }
}

fn cost(rate: Rate) -> u64 {
    1_000_000_000 / u64::from(rate.per_second.max(1))
}

fn max_credit(rate: Rate) -> u64 {
    cost(rate) * u64::from(rate.burst.max(1))
}

struct Peer {
    query: Bucket,
    upstream: Bucket,
}

/// Buckets for at most `capacity` peers at once. When the table is full,
/// peers whose buckets have refilled are forgotten (a fresh bucket is the
/// same as a full one); if every peer is busy, newcomers share one bucket
/// until room is made.
pub struct PeerLimits {
    peers: HashMap<u64, Peer>,
    overflow: Peer,
    capacity: usize,
    query: Rate,
    upstream: Rate,
    epoch: Instant,
}

impl PeerLimits {
    pub fn new(query: Rate, upstream: Rate, capacity: usize, now: Instant) -> PeerLimits {
        PeerLimits {
            peers: HashMap::new(),
            overflow: Peer {
                query: Bucket::full(query),
                upstream: Bucket::full(upstream),
            },
            capacity,
            query,
            upstream,
            epoch: now,
        }
    }

    /// Whether `peer` may spend one query of `budget` now; spends it if so.
    pub fn allow(&mut self, peer: u64, budget: Budget, now: Instant) -> bool {
        let t =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let (query, upstream) = (self.query, self.upstream);
        if !self.peers.contains_key(&peer) && self.peers.len() >= self.capacity {
            self.peers.retain(|_, p| {
                p.query.refill(query, t);
                p.upstream.refill(upstream, t);
                p.query.credit < max_credit(query) || p.upstream.credit < max_credit(upstream)
            });
        }
        let entry = if self.peers.len() < self.capacity || self.peers.contains_key(&peer) {
            self.peers.entry(peer).or_insert_with(|| Peer {
                query: Bucket {
                    last: t,
                    ..Bucket::full(query)
                },
                upstream: Bucket {
                    last: t,
                    ..Bucket::full(upstream)
                },
            })
        } else {
            &mut self.overflow
        };
        match budget {
            Budget::Query => entry.query.take(query, t),
            Budget::Upstream => entry.upstream.take(upstream, t),
        }
    }

    pub fn tracked(&self) -> usize {
        self.peers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const Q: Rate = Rate {
        per_second: 100,
        burst: 10,
    };
    const U: Rate = Rate {
        per_second: 10,
        burst: 2,
    };

    #[test]
    fn a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut limits = PeerLimits::new(Q, U, 16, t0);
        let allowed = (0..100)
            .filter(|_| limits.allow(1, Budget::Query, t0))
            .count();
        assert_eq!(allowed, 10);
        // 100 a second: one more every 10 ms.
        assert!(limits.allow(1, Budget::Query, t0 + Duration::from_millis(10)));
        assert!(!limits.allow(1, Budget::Query, t0 + Duration::from_millis(10)));
        // The upstream budget is separate and smaller.
        let up = (0..100)
            .filter(|_| limits.allow(1, Budget::Upstream, t0))
            .count();
        assert_eq!(up, 2);
    }

    #[test]
    fn one_peer_cannot_spend_anothers_budget() {
        let t0 = Instant::now();
        let mut limits = PeerLimits::new(Q, U, 16, t0);
        for _ in 0..1000 {
            limits.allow(1, Budget::Upstream, t0);
        }
        assert!(limits.allow(2, Budget::Upstream, t0));
    }

    #[test]
    fn the_table_is_bounded_and_idle_peers_are_forgotten() {
        let t0 = Instant::now();
        let mut limits = PeerLimits::new(Q, U, 4, t0);
        for peer in 0..4 {
            assert!(limits.allow(peer, Budget::Upstream, t0));
        }
        // Full of busy peers: a newcomer shares the overflow bucket.
        assert!(limits.allow(100, Budget::Upstream, t0));
        assert!(limits.allow(101, Budget::Upstream, t0));
        assert!(!limits.allow(102, Budget::Upstream, t0));
        assert_eq!(limits.tracked(), 4);
        // Once the others have refilled, a newcomer gets a bucket of its own.
        let later = t0 + Duration::from_secs(1);
        assert!(limits.allow(103, Budget::Upstream, later));
        assert!(limits.allow(103, Budget::Upstream, later));
        assert!(limits.tracked() <= 4);
    }
}
