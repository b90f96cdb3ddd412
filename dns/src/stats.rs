//! What the forwarder counts, for metrics and `status`.

use std::time::Duration;

/// How a query ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Result {
    /// Answered from the cache.
    Cache,
    /// Answered with what an upstream said.
    Upstream,
    /// SERVFAIL: no upstream answered, or the last one failed.
    ServFail,
    /// Answered with a refusal of our own (zone transfer, not class IN, …).
    Refused,
    /// Not a DNS query, or an oversized TCP frame: dropped.
    Malformed,
    /// Over the peer's rate: dropped.
    RateLimited,
    /// Too many queries in flight or queued: dropped.
    Overloaded,
    /// A TCP connection that stopped mid-frame: closed.
    Stalled,
    /// From an address no peer owns: dropped unanswered.
    Outside,
}

impl Result {
    pub const ALL: [Result; 9] = [
        Result::Cache,
        Result::Upstream,
        Result::ServFail,
        Result::Refused,
        Result::Malformed,
        Result::RateLimited,
        Result::Overloaded,
        Result::Stalled,
        Result::Outside,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Result::Cache => "cache",
            Result::Upstream => "upstream",
            Result::ServFail => "servfail",
            Result::Refused => "refused",
            Result::Malformed => "malformed",
            Result::RateLimited => "rate_limited",
            Result::Overloaded => "overloaded",
            Result::Stalled => "stalled",
            Result::Outside => "outside",
        }
    }
}

/// Upstream latency in buckets, Prometheus style (cumulative on output).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latency {
    /// Counts at or below each of [`Latency::BOUNDS_MS`], not cumulative.
    pub buckets: [u64; 10],
    pub count: u64,
    pub sum_micros: u64,
}

impl Latency {
    pub const BOUNDS_MS: [u64; 10] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000];

    pub fn observe(&mut self, d: Duration) {
        let ms = d.as_millis();
        if let Some(i) = Self::BOUNDS_MS.iter().position(|&b| ms <= u128::from(b)) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum_micros = self
            .sum_micros
            .saturating_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub queries_udp: u64,
    pub queries_tcp: u64,
    /// By [`Result`], in the order of [`Result::ALL`].
    pub results: [u64; 9],
    /// UDP answers cut short with TC set.
    pub truncated: u64,
    pub upstream_sent: u64,
    pub upstream_timeouts: u64,
    pub upstream_failures: u64,
    /// Datagrams on an upstream socket that were not the awaited reply.
    pub upstream_mismatched: u64,
    /// Truncated upstream replies asked again over TCP.
    pub upstream_tcp_retries: u64,
    pub latency: Latency,
    pub cache_entries: u64,
    pub cache_bytes: u64,
    pub in_flight: u64,
}

impl Stats {
    pub fn record(&mut self, result: Result) {
        if let Some(i) = Result::ALL.iter().position(|r| *r == result) {
            self.results[i] += 1;
        }
    }

    pub fn result(&self, result: Result) -> u64 {
        Result::ALL
            .iter()
            .position(|r| *r == result)
            .map(|i| self.results[i])
            .unwrap_or(0)
    }
}
