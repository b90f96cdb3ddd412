//! The shell of a gateway's health checks: one task per check that opens a
//! TCP connection to its target every [`PROBE_INTERVAL`], through the
//! host's own routes (the VPC path), and reports how it went. What the
//! results mean, hysteresis and all, is the plane's ([`vpcgate_plane::health`]).
//!
//! A probe connects and closes at once, sending nothing: to the target it
//! is one short connection a second, which databases accept without
//! logging an error.

use std::collections::BTreeMap;
use std::time::Instant;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use vpcgate_plane::health::{Check, PROBE_INTERVAL, PROBE_TIMEOUT};

/// One probe's result.
#[derive(Debug)]
pub struct Outcome {
    pub check: Check,
    pub ok: bool,
    pub detail: String,
    pub at: Instant,
}

/// The running probes, one per check.
pub struct Probes {
    tasks: BTreeMap<Check, JoinHandle<()>>,
    results: mpsc::Sender<Outcome>,
    receiver: Option<mpsc::Receiver<Outcome>>,
}

impl Default for Probes {
    fn default() -> Self {
        Probes::new()
    }
}

impl Probes {
    pub fn new() -> Probes {
        // A few seconds of results from every check: while the owner is
        // busy, probes wait for room rather than pile up.
        let (results, receiver) = mpsc::channel(2 * vpcgate_plane::health::MAX_CHECKS);
        Probes {
            tasks: BTreeMap::new(),
            results,
            receiver: Some(receiver),
        }
    }

    /// The results, for the owner's loop; `None` after the first call.
    pub fn take_results(&mut self) -> Option<mpsc::Receiver<Outcome>> {
        self.receiver.take()
    }

    /// Runs exactly `checks`: new ones start probing at once, dropped ones
    /// stop.
    pub fn follow(&mut self, checks: &[Check]) {
        self.tasks.retain(|check, task| {
            let keep = checks.contains(check);
            if !keep {
                task.abort();
            }
            keep
        });
        for check in checks {
            if !self.tasks.contains_key(check) {
                let task = tokio::spawn(run(*check, self.results.clone()));
                self.tasks.insert(*check, task);
            }
        }
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        for task in self.tasks.values() {
            task.abort();
        }
    }
}

async fn run(check: Check, results: mpsc::Sender<Outcome>) {
    let mut every = tokio::time::interval(PROBE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let (ok, detail) = probe(&check).await;
        let outcome = Outcome {
            check,
            ok,
            detail,
            at: Instant::now(),
        };
        if results.send(outcome).await.is_err() {
            return;
        }
    }
}

async fn probe(check: &Check) -> (bool, String) {
    match tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(check.target)).await {
        Ok(Ok(_stream)) => (true, "connected".to_string()),
        Ok(Err(e)) => (false, e.kind().to_string()),
        Err(_) => (
            false,
            format!("no answer within {} ms", PROBE_TIMEOUT.as_millis()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_listening_port_passes_and_a_closed_one_fails() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open = listener.local_addr().expect("addr");
        // A port that was bound and released: nothing listens there now.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let mut probes = Probes::new();
        let mut results = probes.take_results().expect("first");
        // `Check` refuses loopback targets from users; the probe itself
        // does not care, which lets this test stay on the host.
        let open = Check { target: open };
        let closed = Check { target: closed };
        probes.follow(&[open, closed]);
        let mut seen = BTreeMap::new();
        while seen.len() < 2 {
            let outcome = results.recv().await.expect("a result");
            seen.insert(outcome.check, (outcome.ok, outcome.detail));
        }
        assert_eq!(seen[&open], (true, "connected".to_string()));
        assert_eq!(seen[&closed], (false, "connection refused".to_string()));
        // Dropping a check stops its probe: only the open one reports on.
        probes.follow(&[open]);
        while let Ok(outcome) = results.try_recv() {
            let _ = outcome;
        }
        for _ in 0..2 {
            let outcome = results.recv().await.expect("a result");
            assert_eq!(outcome.check, open);
        }
        drop(listener);
    }
}
