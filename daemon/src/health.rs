//! `--health-listen`: the HTTP health endpoint a cloud load balancer's
//! probe reads (AWS target groups, GCP health checks, Azure probes). Any
//! `GET` is answered 200 only while
//! - the data-path loop turns (its heartbeat moved within [`STALL`]),
//! - the control plane answers,
//! - the gateway is not draining, and
//! - at least one advertised range is offered, that is, healthy by its
//!   checks;
//!
//! otherwise 503, with the reason in the body. A load balancer then sends
//! new flows to the other gateway, as the route exchange moves vpcgate
//! clients.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use vpcgate_plane::view::Sample;

use crate::handle::Handle;
use crate::http::{Answer, Head, Reply};

/// How long the data-path loop may stand still before the gateway is
/// unhealthy. The loop wakes at least every 250 ms timer tick whatever
/// the traffic, so 3 s is twelve missed ticks: a stuck loop, not a slow
/// machine.
pub const STALL: Duration = Duration::from_secs(3);
/// How often the heartbeat is looked at.
const WATCH: Duration = Duration::from_millis(500);

/// The verdict on one sample: healthy or not, and why.
pub fn verdict(stalled_for: Option<Duration>, sample: Option<&Sample>) -> (bool, String) {
    let Some(sample) = sample else {
        return (false, "vpcgated is shutting down".into());
    };
    if let Some(stalled) = stalled_for {
        return (
            false,
            format!("the data path has not turned for {} s", stalled.as_secs()),
        );
    }
    if sample.draining {
        return (
            false,
            "draining (vpcgate drain): no range is offered".into(),
        );
    }
    if sample.advertised_routes == 0 {
        return (
            false,
            "no range is advertised (vpcgate advertise-routes)".into(),
        );
    }
    if sample.advertising == 0 {
        let failing: Vec<&str> = sample
            .checks
            .iter()
            .filter(|(_, ok)| !ok)
            .map(|(check, _)| check.as_str())
            .collect();
        return (
            false,
            format!(
                "no advertised range is healthy; failing checks: {}",
                failing.join(", ")
            ),
        );
    }
    (
        true,
        format!(
            "ok: {} of {} advertised ranges offered",
            sample.advertising, sample.advertised_routes
        ),
    )
}

/// When the data-path heartbeat last moved.
#[derive(Clone)]
struct Pulse {
    last_moved: Arc<Mutex<Instant>>,
}

impl Pulse {
    fn watch(heartbeat: Arc<AtomicU64>) -> Pulse {
        let pulse = Pulse {
            last_moved: Arc::new(Mutex::new(Instant::now())),
        };
        let last_moved = pulse.last_moved.clone();
        tokio::spawn(async move {
            let mut seen = heartbeat.load(Ordering::Relaxed);
            loop {
                tokio::time::sleep(WATCH).await;
                let now = heartbeat.load(Ordering::Relaxed);
                if now != seen {
                    seen = now;
                    if let Ok(mut at) = last_moved.lock() {
                        *at = Instant::now();
                    }
                }
            }
        });
        pulse
    }

    /// How long the heartbeat has stood still, if longer than [`STALL`].
    fn stalled_for(&self) -> Option<Duration> {
        let since = self
            .last_moved
            .lock()
            .map_or(Duration::MAX, |at| at.elapsed());
        (since > STALL).then_some(since)
    }
}

#[derive(Clone)]
struct Health {
    daemon: Handle,
    pulse: Pulse,
}

impl Answer for Health {
    async fn answer(&self, head: Head) -> Reply {
        if head.method != b"GET" && head.method != b"HEAD" {
            return Reply::text(
                "405 Method Not Allowed",
                "the health endpoint answers GET\n".into(),
            );
        }
        let sample = self.daemon.metrics_sample().await.map(|s| s.sample);
        let (healthy, reason) = verdict(self.pulse.stalled_for(), sample.as_ref());
        let status = match healthy {
            true => "200 OK",
            false => "503 Service Unavailable",
        };
        Reply::text(status, format!("{reason}\n"))
    }
}

pub async fn serve(listener: TcpListener, daemon: Handle, heartbeat: Arc<AtomicU64>) {
    let pulse = Pulse::watch(heartbeat);
    crate::http::serve(listener, "health", Health { daemon, pulse }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(advertised: usize, offered: usize, draining: bool) -> Sample {
        Sample {
            peers: Vec::new(),
            drops: Vec::new(),
            advertised_routes: advertised,
            accepted_routes: 0,
            advertising: offered,
            draining,
            checks: vec![
                ("tcp:198.19.101.10:5432".into(), offered > 0),
                ("tcp:198.18.64.20:8080".into(), true),
            ],
            carriers: Vec::new(),
            failovers: 0,
        }
    }

    #[test]
    fn healthy_only_while_alive_offering_and_not_draining() {
        let (ok, why) = verdict(None, Some(&sample(2, 1, false)));
        assert!(ok, "{why}");
        assert_eq!(why, "ok: 1 of 2 advertised ranges offered");
        let cases = [
            (None, None, "shutting down"),
            (
                Some(STALL * 2),
                Some(sample(2, 2, false)),
                "not turned for 6 s",
            ),
            (None, Some(sample(2, 0, true)), "draining"),
            (None, Some(sample(0, 0, false)), "no range is advertised"),
            (
                None,
                Some(sample(2, 0, false)),
                "failing checks: tcp:198.19.101.10:5432",
            ),
        ];
        for (stalled, sample, reason) in cases {
            let (ok, why) = verdict(stalled, sample.as_ref());
            assert!(!ok && why.contains(reason), "{why:?} for {reason:?}");
        }
        // Drain wins even while every check passes.
        let (ok, _) = verdict(None, Some(&sample(2, 2, true)));
        assert!(!ok);
    }
}
