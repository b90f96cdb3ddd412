//! Optional Prometheus metrics on `--metrics-listen` (off by default).
//!
//! `GET /metrics` is answered with the text exposition format, anything
//! else with 404, by [`crate::http`]. Scrapes are rare, so each is built
//! fresh from the control plane's state.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::net::TcpListener;

use crate::handle::{Handle, Scrape};
use crate::http::{Answer, Head, Reply};

use vpcgate_dns::{Latency, Result as Outcome, Stats};
pub use vpcgate_plane::view::{PeerSample, Sample};

/// Renders the text exposition format.
pub fn render(scrape: &Scrape, now: SystemTime) -> String {
    let sample = &scrape.sample;
    let mut out = String::with_capacity(1024 + sample.peers.len() * 400);
    let label = |p: &PeerSample| {
        format!(
            "public_key=\"{}\",name=\"{}\"",
            clean(&p.public_key),
            clean(p.name.as_deref().unwrap_or(""))
        )
    };
    let _ = writeln!(out, "# HELP vpcgate_peer_receive_bytes_total Bytes received from the peer, WireGuard framing included.");
    let _ = writeln!(out, "# TYPE vpcgate_peer_receive_bytes_total counter");
    for p in &sample.peers {
        let _ = writeln!(
            out,
            "vpcgate_peer_receive_bytes_total{{{}}} {}",
            label(p),
            p.rx_bytes
        );
    }
    let _ = writeln!(out, "# HELP vpcgate_peer_transmit_bytes_total Bytes sent to the peer, WireGuard framing included.");
    let _ = writeln!(out, "# TYPE vpcgate_peer_transmit_bytes_total counter");
    for p in &sample.peers {
        let _ = writeln!(
            out,
            "vpcgate_peer_transmit_bytes_total{{{}}} {}",
            label(p),
            p.tx_bytes
        );
    }
    let _ = writeln!(out, "# HELP vpcgate_peer_handshake_age_seconds Seconds since the last completed handshake; absent if never.");
    let _ = writeln!(out, "# TYPE vpcgate_peer_handshake_age_seconds gauge");
    for p in &sample.peers {
        if let Some(age) = p.last_handshake.and_then(|t| now.duration_since(t).ok()) {
            let _ = writeln!(
                out,
                "vpcgate_peer_handshake_age_seconds{{{}}} {:.3}",
                label(p),
                age.as_secs_f64()
            );
        }
    }
    let _ = writeln!(out, "# HELP vpcgate_peer_last_handshake_timestamp_seconds Unix time of the last completed handshake; 0 if never.");
    let _ = writeln!(
        out,
        "# TYPE vpcgate_peer_last_handshake_timestamp_seconds gauge"
    );
    for p in &sample.peers {
        let secs = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let _ = writeln!(
            out,
            "vpcgate_peer_last_handshake_timestamp_seconds{{{}}} {secs}",
            label(p)
        );
    }
    let _ = writeln!(
        out,
        "# HELP vpcgate_dropped_packets_total Packets dropped by the data path, by reason."
    );
    let _ = writeln!(out, "# TYPE vpcgate_dropped_packets_total counter");
    for (reason, count) in &sample.drops {
        let _ = writeln!(
            out,
            "vpcgate_dropped_packets_total{{reason=\"{reason}\"}} {count}"
        );
    }
    let _ = writeln!(out, "# HELP vpcgate_peers Configured peers.");
    let _ = writeln!(out, "# TYPE vpcgate_peers gauge");
    let _ = writeln!(out, "vpcgate_peers {}", sample.peers.len());
    let _ = writeln!(
        out,
        "# HELP vpcgate_advertised_routes Ranges this node advertises."
    );
    let _ = writeln!(out, "# TYPE vpcgate_advertised_routes gauge");
    let _ = writeln!(
        out,
        "vpcgate_advertised_routes {}",
        sample.advertised_routes
    );
    let _ = writeln!(
        out,
        "# HELP vpcgate_accepted_routes Routes learned from trusted peers."
    );
    let _ = writeln!(out, "# TYPE vpcgate_accepted_routes gauge");
    let _ = writeln!(out, "vpcgate_accepted_routes {}", sample.accepted_routes);
    render_failover(&mut out, sample);
    if let Some(dns) = &scrape.dns {
        render_dns(&mut out, dns);
    }
    out
}

/// Names are restricted to [A-Za-z0-9._-], keys are base64 and the rest
/// are prefixes and addresses, so nothing needs escaping; this keeps that
/// true regardless.
fn clean(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '"' | '\\' | '\n'))
        .collect()
}

/// A gateway's health checks and drain, and a client's carriers.
fn render_failover(out: &mut String, sample: &Sample) {
    let _ = writeln!(out, "# HELP vpcgate_advertising_routes Ranges the route exchange offers now: the advertised ones whose checks pass, none while draining.");
    let _ = writeln!(out, "# TYPE vpcgate_advertising_routes gauge");
    let _ = writeln!(out, "vpcgate_advertising_routes {}", sample.advertising);
    let _ = writeln!(
        out,
        "# HELP vpcgate_draining 1 while `vpcgate drain` holds every range back."
    );
    let _ = writeln!(out, "# TYPE vpcgate_draining gauge");
    let _ = writeln!(out, "vpcgate_draining {}", u8::from(sample.draining));
    let _ = writeln!(
        out,
        "# HELP vpcgate_check_healthy 1 while a health check passes."
    );
    let _ = writeln!(out, "# TYPE vpcgate_check_healthy gauge");
    for (target, healthy) in &sample.checks {
        let _ = writeln!(
            out,
            "vpcgate_check_healthy{{target=\"{}\"}} {}",
            clean(target),
            u8::from(*healthy)
        );
    }
    let _ = writeln!(
        out,
        "# HELP vpcgate_route_carrier 1 for the gateway that carries each accepted range."
    );
    let _ = writeln!(out, "# TYPE vpcgate_route_carrier gauge");
    for (range, via) in &sample.carriers {
        let _ = writeln!(
            out,
            "vpcgate_route_carrier{{range=\"{}\",via=\"{}\"}} 1",
            clean(range),
            clean(via)
        );
    }
    let _ = writeln!(
        out,
        "# HELP vpcgate_failovers_total Times an accepted range moved from one gateway to another."
    );
    let _ = writeln!(out, "# TYPE vpcgate_failovers_total counter");
    let _ = writeln!(out, "vpcgate_failovers_total {}", sample.failovers);
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP vpcgate_dns_{name} {help}");
    let _ = writeln!(out, "# TYPE vpcgate_dns_{name} {kind}");
}

/// The forwarder's families; absent while it is off, so that a dashboard
/// can tell "off" from "idle".
fn render_dns(out: &mut String, dns: &Stats) {
    family(
        out,
        "queries_total",
        "counter",
        "Queries from tunnel peers, by transport.",
    );
    let _ = writeln!(
        out,
        "vpcgate_dns_queries_total{{transport=\"udp\"}} {}",
        dns.queries_udp
    );
    let _ = writeln!(
        out,
        "vpcgate_dns_queries_total{{transport=\"tcp\"}} {}",
        dns.queries_tcp
    );
    family(
        out,
        "results_total",
        "counter",
        "How queries ended: answered from the cache or an upstream, SERVFAIL, refused, or dropped (malformed, rate_limited, overloaded, stalled, outside the tunnel).",
    );
    for result in Outcome::ALL {
        let _ = writeln!(
            out,
            "vpcgate_dns_results_total{{result=\"{}\"}} {}",
            result.name(),
            dns.result(result)
        );
    }
    for (name, kind, help, value) in [
        (
            "truncated_total",
            "counter",
            "UDP answers cut short with TC set, for the client to ask again over TCP.",
            dns.truncated,
        ),
        (
            "upstream_queries_total",
            "counter",
            "Queries sent to upstream resolvers.",
            dns.upstream_sent,
        ),
        (
            "upstream_timeouts_total",
            "counter",
            "Upstream queries that got no answer in time.",
            dns.upstream_timeouts,
        ),
        (
            "upstream_failures_total",
            "counter",
            "Upstream queries refused (ICMP, TCP reset) or answered SERVFAIL, REFUSED or NOTIMP.",
            dns.upstream_failures,
        ),
        (
            "upstream_mismatched_total",
            "counter",
            "Datagrams on an upstream socket that did not match the query (ID, question): dropped.",
            dns.upstream_mismatched,
        ),
        (
            "upstream_tcp_retries_total",
            "counter",
            "Truncated upstream answers asked again over TCP.",
            dns.upstream_tcp_retries,
        ),
        (
            "cache_entries",
            "gauge",
            "Answers in the cache.",
            dns.cache_entries,
        ),
        (
            "cache_bytes",
            "gauge",
            "Bytes the cached answers take.",
            dns.cache_bytes,
        ),
        (
            "in_flight",
            "gauge",
            "Upstream queries awaiting an answer.",
            dns.in_flight,
        ),
    ] {
        family(out, name, kind, help);
        let _ = writeln!(out, "vpcgate_dns_{name} {value}");
    }
    family(
        out,
        "upstream_latency_seconds",
        "histogram",
        "Time from an upstream query to its answer.",
    );
    let name = "vpcgate_dns_upstream_latency_seconds";
    let latency: &Latency = &dns.latency;
    let mut cumulative = 0;
    for (bound, count) in Latency::BOUNDS_MS.iter().zip(latency.buckets) {
        cumulative += count;
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"{}\"}} {cumulative}",
            *bound as f64 / 1000.0
        );
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", latency.count);
    let _ = writeln!(
        out,
        "{name}_sum {:.6}",
        latency.sum_micros as f64 / 1_000_000.0
    );
    let _ = writeln!(out, "{name}_count {}", latency.count);
}

pub async fn serve(listener: TcpListener, daemon: Handle) {
    crate::http::serve(listener, "metrics", Metrics(daemon)).await;
}

#[derive(Clone)]
struct Metrics(Handle);

impl Answer for Metrics {
    async fn answer(&self, head: Head) -> Reply {
        if !head.is_get("/metrics") {
            return Reply::text(
                "404 Not Found",
                "only GET /metrics is served here\n".to_string(),
            );
        }
        match self.0.metrics_sample().await {
            Some(scrape) => Reply {
                status: "200 OK",
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: render(&scrape, SystemTime::now()),
            },
            None => Reply::text(
                "503 Service Unavailable",
                "vpcgated is shutting down\n".to_string(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn exposition_has_every_family() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let sample = Sample {
            peers: vec![
                PeerSample {
                    name: Some("laptop".into()),
                    public_key: "AAAA+/==".into(),
                    rx_bytes: 10,
                    tx_bytes: 20,
                    last_handshake: Some(now - Duration::from_secs(42)),
                },
                PeerSample {
                    name: None,
                    public_key: "BBBB".into(),
                    rx_bytes: 0,
                    tx_bytes: 0,
                    last_handshake: None,
                },
            ],
            drops: vec![("no_route", 3), ("not_advertised", 0)],
            advertised_routes: 2,
            accepted_routes: 0,
            advertising: 1,
            draining: false,
            checks: vec![("tcp:198.19.101.10:5432".into(), false)],
            carriers: vec![("198.19.101.0/24".into(), "gw2".into())],
            failovers: 3,
        };
        let mut dns = Stats {
            queries_udp: 7,
            queries_tcp: 2,
            cache_entries: 3,
            ..Stats::default()
        };
        dns.record(Outcome::Cache);
        dns.record(Outcome::RateLimited);
        dns.record(Outcome::RateLimited);
        for ms in [1, 3, 3, 2000] {
            dns.latency.observe(Duration::from_millis(ms));
        }
        let mut scrape = Scrape { sample, dns: None };
        let off = render(&scrape, now);
        assert!(
            !off.contains("vpcgate_dns_"),
            "DNS families while it is off"
        );
        scrape.dns = Some(dns);
        let text = render(&scrape, now);
        for line in [
            "vpcgate_peer_receive_bytes_total{public_key=\"AAAA+/==\",name=\"laptop\"} 10",
            "vpcgate_peer_transmit_bytes_total{public_key=\"AAAA+/==\",name=\"laptop\"} 20",
            "vpcgate_peer_handshake_age_seconds{public_key=\"AAAA+/==\",name=\"laptop\"} 42.000",
            "vpcgate_peer_last_handshake_timestamp_seconds{public_key=\"BBBB\",name=\"\"} 0",
            "vpcgate_dropped_packets_total{reason=\"no_route\"} 3",
            "vpcgate_dropped_packets_total{reason=\"not_advertised\"} 0",
            "vpcgate_peers 2",
            "vpcgate_advertised_routes 2",
            "vpcgate_accepted_routes 0",
            "vpcgate_advertising_routes 1",
            "vpcgate_draining 0",
            "vpcgate_check_healthy{target=\"tcp:198.19.101.10:5432\"} 0",
            "vpcgate_route_carrier{range=\"198.19.101.0/24\",via=\"gw2\"} 1",
            "vpcgate_failovers_total 3",
            "vpcgate_dns_queries_total{transport=\"udp\"} 7",
            "vpcgate_dns_queries_total{transport=\"tcp\"} 2",
            "vpcgate_dns_results_total{result=\"cache\"} 1",
            "vpcgate_dns_results_total{result=\"rate_limited\"} 2",
            "vpcgate_dns_results_total{result=\"outside\"} 0",
            "vpcgate_dns_cache_entries 3",
            // Cumulative buckets; 2 s is past the last bound, so only in +Inf.
            "vpcgate_dns_upstream_latency_seconds_bucket{le=\"0.001\"} 1",
            "vpcgate_dns_upstream_latency_seconds_bucket{le=\"0.002\"} 1",
            "vpcgate_dns_upstream_latency_seconds_bucket{le=\"0.005\"} 3",
            "vpcgate_dns_upstream_latency_seconds_bucket{le=\"1\"} 3",
            "vpcgate_dns_upstream_latency_seconds_bucket{le=\"+Inf\"} 4",
            "vpcgate_dns_upstream_latency_seconds_sum 2.007000",
            "vpcgate_dns_upstream_latency_seconds_count 4",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in:\n{text}"
            );
        }
        assert!(
            !text.contains("handshake_age_seconds{public_key=\"BBBB\""),
            "a peer that never handshook has no age"
        );
        // Every sample line belongs to a declared family.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let family = l.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    family
                        .strip_suffix(suffix)
                        .filter(|f| text.contains(&format!("# TYPE {f} histogram")))
                })
                .unwrap_or(family);
            assert!(text.contains(&format!("# TYPE {family} ")), "{l}");
        }
    }
}
