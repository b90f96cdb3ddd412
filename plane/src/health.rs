//! A gateway's health checks, all pure: which targets must answer for the
//! ranges around them to be advertised, and the hysteresis that turns a
//! stream of probe results into "healthy" or not.
//!
//! A check is `tcp:IP:PORT`: the target is reachable while a TCP connection
//! to it opens. It governs every advertised range that contains its IP; a
//! range is advertised only while every check that governs it is healthy.
//! Ranges without a check are always advertised.
//!
//! A check starts unproven, and its ranges are held back until its first
//! probe succeeds (the shell probes at once, so a restart holds them back
//! for one probe). After that it takes [`FAILS_TO_WITHDRAW`] failures in a
//! row to withdraw and [`OKS_TO_RESTORE`] successes in a row to advertise
//! again, so one lost probe does not move clients and a flapping target
//! does not bring them back before it has held for a while.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// How often the shell probes each target. With the route exchange's 1 s
/// polls, a lost path is withdrawn from clients within about
/// `FAILS_TO_WITHDRAW` intervals plus one poll: inside the 5 s bound.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe that has not connected by then has failed: a path that slow is
/// not one to send a client's traffic down.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
pub const FAILS_TO_WITHDRAW: u32 = 2;
pub const OKS_TO_RESTORE: u32 = 3;
/// More checks than this is a configuration mistake, not a need.
pub const MAX_CHECKS: usize = 16;

/// One health check, as `--check tcp:IP:PORT` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Check {
    pub target: SocketAddr,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tcp:{}", self.target)
    }
}

impl FromStr for Check {
    type Err = String;

    fn from_str(text: &str) -> Result<Check, String> {
        let form = || {
            format!(
                "{} is not a health check; give tcp:IP:PORT, e.g. tcp:198.18.101.10:5432 \
                 or tcp:[fd00:101::10]:5432",
                crate::text::quote(text)
            )
        };
        let rest = text.strip_prefix("tcp:").ok_or_else(form)?;
        let target: SocketAddr = rest.parse().map_err(|_| form())?;
        if target.port() == 0 {
            return Err(format!("{text}: port 0 cannot be probed"));
        }
        let ip = target.ip();
        if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
            return Err(format!(
                "{text}: {ip} is not a host in a network this gateway routes to"
            ));
        }
        Ok(Check { target })
    }
}

impl Serialize for Check {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Check {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Check, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses and validates the checks given with an advertised set: each must
/// lie in one of `routes`, or it would govern nothing. Every problem is
/// reported; duplicates are kept once.
pub fn validate_checks(input: &[String], routes: &[IpNet]) -> Result<Vec<Check>, String> {
    if input.len() > MAX_CHECKS {
        return Err(format!(
            "{} health checks given; at most {MAX_CHECKS} are allowed",
            input.len()
        ));
    }
    let mut problems = Vec::new();
    let mut checks: Vec<Check> = Vec::new();
    for text in input {
        match text.parse::<Check>() {
            Ok(check) if !routes.iter().any(|r| r.contains(&check.target.ip())) => {
                problems.push(format!(
                    "{check} is in no advertised range, so it would govern nothing; \
                     advertise the range that holds {} with it",
                    check.target.ip()
                ));
            }
            Ok(check) if !checks.contains(&check) => checks.push(check),
            Ok(_) => {}
            Err(problem) => problems.push(problem),
        }
    }
    match problems.is_empty() {
        true => Ok(checks),
        false => Err(problems.join("\n")),
    }
}

/// The last probe of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub ok: bool,
    /// What happened, for status: "connected", "connection refused", ….
    pub detail: String,
    pub at: Instant,
}

/// What is known about one check.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CheckState {
    /// Whether its ranges may be advertised.
    pub healthy: bool,
    /// Whether any probe has succeeded since the check was set (or the
    /// daemon started): until then the first success is enough.
    pub proven: bool,
    /// When `healthy` last changed; `None` while unproven.
    pub since: Option<Instant>,
    pub last: Option<Probe>,
    oks: u32,
    fails: u32,
}

/// Every check's state, keyed by target. Not saved: a restart proves each
/// target again.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Health {
    states: BTreeMap<Check, CheckState>,
}

impl Health {
    /// Follows a new list of checks: kept ones keep their state, new ones
    /// start unproven, dropped ones are forgotten.
    pub fn follow(&mut self, checks: &[Check]) {
        self.states.retain(|check, _| checks.contains(check));
        for check in checks {
            self.states.entry(*check).or_default();
        }
    }

    /// Records one probe's result. Returns the new health when it changed;
    /// a result for a check no longer set is ignored.
    pub fn record(&mut self, check: Check, ok: bool, detail: String, at: Instant) -> Option<bool> {
        let state = self.states.get_mut(&check)?;
        state.last = Some(Probe { ok, detail, at });
        if ok {
            state.oks = state.oks.saturating_add(1);
            state.fails = 0;
        } else {
            state.fails = state.fails.saturating_add(1);
            state.oks = 0;
        }
        let healthy = match (state.healthy, state.proven) {
            (false, false) => ok,
            (false, true) => state.oks >= OKS_TO_RESTORE,
            (true, _) => state.fails < FAILS_TO_WITHDRAW,
        };
        state.proven |= ok;
        if healthy == state.healthy {
            return None;
        }
        state.healthy = healthy;
        state.since = Some(at);
        Some(healthy)
    }

    pub fn states(&self) -> impl Iterator<Item = (&Check, &CheckState)> {
        self.states.iter()
    }

    /// The ranges of `routes` that may be advertised now: those every
    /// check that governs them finds healthy.
    pub fn advertisable(&self, routes: &[IpNet]) -> Vec<IpNet> {
        routes
            .iter()
            .filter(|range| {
                self.states
                    .iter()
                    .filter(|(check, _)| range.contains(&check.target.ip()))
                    .all(|(_, state)| state.healthy)
            })
            .copied()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Check {
        text.parse().expect("check")
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    #[test]
    fn checks_parse_in_one_form_and_round_trip() {
        for text in ["tcp:198.18.101.10:5432", "tcp:[fd00:101::10]:27017"] {
            assert_eq!(check(text).to_string(), text);
            let json = serde_json::to_string(&check(text)).expect("json");
            let back: Check = serde_json::from_str(&json).expect("back");
            assert_eq!(back, check(text));
        }
        for bad in [
            "198.18.101.10:5432",
            "udp:198.18.101.10:53",
            "tcp:198.18.101.10",
            "tcp:198.18.101.10:0",
            "tcp:0.0.0.0:5432",
            "tcp:127.0.0.1:5432",
            "tcp:db.internal:5432",
        ] {
            assert!(bad.parse::<Check>().is_err(), "{bad}");
        }
        let err = "tcp:nope".parse::<Check>().expect_err("bad");
        assert!(err.contains("tcp:IP:PORT"), "{err}");
    }

    #[test]
    fn a_check_must_lie_in_an_advertised_range() {
        let routes = nets(&["198.18.64.0/20", "198.19.101.0/24"]);
        let given = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = validate_checks(
            &given(&["tcp:198.19.101.10:5432", "tcp:198.19.101.10:5432"]),
            &routes,
        )
        .expect("valid");
        assert_eq!(ok, vec![check("tcp:198.19.101.10:5432")]);
        let err = validate_checks(&given(&["tcp:198.20.0.1:5432", "tcp:x"]), &routes)
            .expect_err("outside");
        assert!(err.contains("in no advertised range"), "{err}");
        assert!(err.contains("tcp:IP:PORT"), "every problem is said: {err}");
        let many: Vec<String> = (1..=MAX_CHECKS + 1)
            .map(|i| format!("tcp:198.19.101.{i}:5432"))
            .collect();
        assert!(validate_checks(&many, &routes).is_err());
    }

    #[test]
    fn hysteresis_withdraws_after_two_failures_and_restores_after_three_successes() {
        let db = check("tcp:198.19.101.10:5432");
        let routes = nets(&["198.18.64.0/20", "198.19.101.0/24"]);
        let mut health = Health::default();
        health.follow(&[db]);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        // Unproven: its range is held back, the other one is not.
        assert_eq!(health.advertisable(&routes), nets(&["198.18.64.0/20"]));
        assert_eq!(health.record(db, false, "refused".into(), at(0)), None);
        assert_eq!(
            health.record(db, true, "connected".into(), at(1)),
            Some(true)
        );
        assert_eq!(health.advertisable(&routes), routes);
        // One lost probe changes nothing; two in a row withdraw.
        assert_eq!(health.record(db, false, "timed out".into(), at(2)), None);
        assert_eq!(health.record(db, true, "connected".into(), at(3)), None);
        assert_eq!(health.record(db, false, "timed out".into(), at(4)), None);
        assert_eq!(
            health.record(db, false, "timed out".into(), at(5)),
            Some(false)
        );
        assert_eq!(health.advertisable(&routes), nets(&["198.18.64.0/20"]));
        // Back: two successes are not enough, a failure starts again, three are.
        for s in [6, 7] {
            assert_eq!(health.record(db, true, "connected".into(), at(s)), None);
        }
        assert_eq!(health.record(db, false, "refused".into(), at(8)), None);
        for s in [9, 10] {
            assert_eq!(health.record(db, true, "connected".into(), at(s)), None);
        }
        assert_eq!(
            health.record(db, true, "connected".into(), at(11)),
            Some(true)
        );
        let (_, state) = health.states().next().expect("one");
        assert_eq!(state.since, Some(at(11)));
        assert_eq!(
            state.last.as_ref().map(|p| p.detail.as_str()),
            Some("connected")
        );
    }

    #[test]
    fn a_range_needs_every_check_in_it_and_dropped_checks_are_forgotten() {
        let a = check("tcp:198.19.101.10:5432");
        let b = check("tcp:198.19.101.11:5432");
        let routes = nets(&["198.19.101.0/24"]);
        let mut health = Health::default();
        health.follow(&[a, b]);
        let now = Instant::now();
        health.record(a, true, "connected".into(), now);
        assert!(health.advertisable(&routes).is_empty(), "b is unproven");
        health.record(b, true, "connected".into(), now);
        assert_eq!(health.advertisable(&routes), routes);
        health.follow(&[a]);
        assert_eq!(health.states().count(), 1);
        assert_eq!(health.record(b, false, "stale".into(), now), None);
        health.follow(&[a, b]);
        assert!(health.advertisable(&routes).is_empty(), "b starts again");
    }
}
