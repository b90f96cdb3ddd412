//! Which gateway carries each range that a client accepts from two or more
//! gateways: pure, on a clock the caller gives.
//!
//! Every gateway peer with `--accept-routes` answers the route exchange's
//! poll; what it offers and when it was last heard from are all this
//! module knows. For each range it keeps one owner, the peer whose allowed
//! IPs carry the range, so a range never belongs to two peers. The rules:
//!
//! - A gateway is a *candidate* for a range while it offers the range and
//!   was heard from within [`Timing::dead_after`].
//! - The owner keeps the range while it is a candidate; a candidate of the
//!   same or a worse priority never takes it away (no flapping between two
//!   healthy gateways).
//! - When the owner stops being a candidate, the best candidate takes over
//!   at once: lowest priority, then the one that has been a candidate the
//!   longest, then the lowest handle.
//! - A candidate of a better (lower) priority than the owner takes the
//!   range back only once it has been a candidate without a break for
//!   [`Timing::hold_down`] (failback). One that flaps keeps restarting that
//!   wait, so clients do not flap with it.
//! - With no candidate at all, a range whose owner fell silent stays with
//!   it (its traffic has nowhere better to go, and a private range must
//!   not fall back to the laptop's default route); a range its owner
//!   withdrew, while still answering, goes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use ipnet::IpNet;

/// Who offers ranges: the plane's peer handles.
pub type Gateway = u64;

pub use vpcgate_node::routes_msg::DEFAULT_PRIORITY;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// A gateway not heard from for this long is taken for dead. The route
    /// exchange polls every second, so this allows one lost reply and
    /// still moves traffic within 3 s of a gateway's death.
    pub dead_after: Duration,
    /// How long a better gateway must stay a candidate before a range goes
    /// back to it.
    pub hold_down: Duration,
}

impl Default for Timing {
    fn default() -> Timing {
        Timing {
            dead_after: Duration::from_millis(2500),
            hold_down: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Heard {
    priority: u16,
    /// When it was last heard from.
    last: Instant,
    /// Since when it has been heard from without a gap past `dead_after`.
    alive_since: Instant,
    /// Each range it offers, with since when it has offered it without a
    /// break.
    offers: BTreeMap<IpNet, Instant>,
}

/// Who carries a range, and since when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub gateway: Gateway,
    pub since: Instant,
}

/// A move of a range from one gateway to another (or to none, or from
/// none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub range: IpNet,
    pub from: Option<Gateway>,
    pub to: Option<Gateway>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Choice {
    timing: Timing,
    heard: BTreeMap<Gateway, Heard>,
    owners: BTreeMap<IpNet, Owner>,
    /// Moves from one gateway to another since the start, for metrics.
    failovers: u64,
    /// The latest time given.
    latest: Option<Instant>,
}

impl Choice {
    pub fn new(timing: Timing) -> Choice {
        Choice {
            timing,
            ..Choice::default()
        }
    }

    /// Ranges and who carries each.
    pub fn owners(&self) -> &BTreeMap<IpNet, Owner> {
        &self.owners
    }

    /// The ranges `gateway` carries.
    pub fn carried_by(&self, gateway: Gateway) -> Vec<IpNet> {
        self.owners
            .iter()
            .filter(|(_, o)| o.gateway == gateway)
            .map(|(range, _)| *range)
            .collect()
    }

    /// The gateways that offer `range` and are alive, but do not carry it.
    pub fn standing_by(&self, range: &IpNet, now: Instant) -> Vec<Gateway> {
        let owner = self.owners.get(range).map(|o| o.gateway);
        self.heard
            .iter()
            .filter(|(g, h)| {
                Some(**g) != owner && self.alive(h, now) && h.offers.contains_key(range)
            })
            .map(|(g, _)| *g)
            .collect()
    }

    /// The latest time it was given, if any.
    pub fn latest(&self) -> Option<Instant> {
        self.latest
    }

    pub fn failovers(&self) -> u64 {
        self.failovers
    }

    /// Seeds an owner, as the state files remember it: after a restart the
    /// range stays where it was, its gateway taken as just heard from (at
    /// the default priority until it says otherwise), so that it keeps the
    /// range unless it stays silent.
    pub fn remember(&mut self, range: IpNet, gateway: Gateway, now: Instant) {
        if self.owners.contains_key(&range) {
            return;
        }
        self.owners.insert(
            range,
            Owner {
                gateway,
                since: now,
            },
        );
        let heard = self.heard.entry(gateway).or_insert_with(|| Heard {
            priority: DEFAULT_PRIORITY,
            last: now,
            alive_since: now,
            offers: BTreeMap::new(),
        });
        heard.offers.entry(range).or_insert(now);
    }

    /// `gateway` answered a poll: it offers `routes` (`None`: what it
    /// offered before), at `priority`.
    pub fn heard(
        &mut self,
        gateway: Gateway,
        routes: Option<&[IpNet]>,
        priority: u16,
        now: Instant,
    ) -> Vec<Move> {
        let dead_after = self.timing.dead_after;
        self.latest = self.latest.max(Some(now));
        let entry = self.heard.entry(gateway).or_insert_with(|| Heard {
            priority,
            last: now,
            alive_since: now,
            offers: BTreeMap::new(),
        });
        if now.saturating_duration_since(entry.last) >= dead_after {
            // Back from the dead: a candidate again only from now, for
            // the hold-down's count.
            entry.alive_since = now;
        }
        entry.last = entry.last.max(now);
        entry.priority = priority;
        if let Some(routes) = routes {
            entry.offers.retain(|range, _| routes.contains(range));
            for range in routes {
                entry.offers.entry(*range).or_insert(now);
            }
        }
        self.decide(now)
    }

    /// The gateways heard from or remembered.
    pub fn gateways(&self) -> impl Iterator<Item = Gateway> + '_ {
        self.heard.keys().copied()
    }

    /// `gateway` is no longer a peer, or no longer trusted for routes. The
    /// others are judged at the latest time anything was heard.
    pub fn forget(&mut self, gateway: Gateway) -> Vec<Move> {
        let Some(now) = self.latest else {
            self.heard.remove(&gateway);
            self.owners.retain(|_, o| o.gateway != gateway);
            return Vec::new();
        };
        self.heard.remove(&gateway);
        let mut moves = Vec::new();
        let gone: Vec<IpNet> = self
            .owners
            .iter()
            .filter(|(_, o)| o.gateway == gateway)
            .map(|(range, _)| *range)
            .collect();
        for range in gone {
            self.owners.remove(&range);
            moves.push(Move {
                range,
                from: Some(gateway),
                to: None,
            });
        }
        // Another gateway may take those at once.
        let mut more = self.decide(now);
        merge(&mut moves, &mut more);
        moves
    }

    /// Re-decides with the time as it is now; call it at
    /// [`next_deadline`](Self::next_deadline).
    pub fn tick(&mut self, now: Instant) -> Vec<Move> {
        self.latest = self.latest.max(Some(now));
        self.decide(now)
    }

    /// The next time after `now` a decision can change with nothing
    /// heard: a gateway falling silent for `dead_after`, or a better one's
    /// hold-down running out.
    pub fn next_deadline(&self, now: Instant) -> Option<Instant> {
        let deaths = self.heard.values().map(|h| h.last + self.timing.dead_after);
        let failbacks = self.owners.iter().filter_map(|(range, owner)| {
            let current = self.heard.get(&owner.gateway)?;
            self.heard
                .values()
                .filter(|h| h.priority < current.priority && self.alive(h, now))
                .filter_map(|h| self.candidate_since(h, range))
                .map(|since| since + self.timing.hold_down)
                .min()
        });
        deaths.chain(failbacks).filter(|at| *at > now).min()
    }

    /// Heard from less than `dead_after` ago.
    fn alive(&self, h: &Heard, now: Instant) -> bool {
        now.saturating_duration_since(h.last) < self.timing.dead_after
    }

    /// Since when `h` has been a candidate for `range` without a break
    /// (ignoring whether it is still alive now).
    fn candidate_since(&self, h: &Heard, range: &IpNet) -> Option<Instant> {
        h.offers.get(range).map(|since| (*since).max(h.alive_since))
    }

    fn decide(&mut self, now: Instant) -> Vec<Move> {
        let ranges: BTreeSet<IpNet> = self
            .heard
            .values()
            .flat_map(|h| h.offers.keys().copied())
            .chain(self.owners.keys().copied())
            .collect();
        let mut moves = Vec::new();
        for range in ranges {
            let candidates: Vec<(Gateway, u16, Instant)> = self
                .heard
                .iter()
                .filter(|(_, h)| self.alive(h, now))
                .filter_map(|(g, h)| Some((*g, h.priority, self.candidate_since(h, &range)?)))
                .collect();
            let best = candidates
                .iter()
                .min_by_key(|(g, priority, since)| (*priority, *since, *g))
                .copied();
            let current = self.owners.get(&range).copied();
            let owner_is_candidate =
                current.is_some_and(|o| candidates.iter().any(|(g, ..)| *g == o.gateway));
            let next = match current {
                Some(owner) if owner_is_candidate => {
                    let mine = candidates
                        .iter()
                        .find(|(g, ..)| *g == owner.gateway)
                        .map_or(u16::MAX, |(_, p, _)| *p);
                    // Failback: strictly better, and steady for the hold-down.
                    candidates
                        .iter()
                        .filter(|(_, p, since)| {
                            *p < mine
                                && now.saturating_duration_since(*since) >= self.timing.hold_down
                        })
                        .min_by_key(|(g, priority, since)| (*priority, *since, *g))
                        .map(|(g, ..)| *g)
                        .or(Some(owner.gateway))
                }
                Some(owner) => match best {
                    Some((g, ..)) => Some(g),
                    // Nobody else: a silent owner keeps it; one that
                    // answers without offering it has withdrawn it.
                    None => match self.heard.get(&owner.gateway) {
                        Some(h) if self.alive(h, now) => None,
                        Some(_) => Some(owner.gateway),
                        // Remembered from the state files, not heard yet.
                        None => Some(owner.gateway),
                    },
                },
                None => best.map(|(g, ..)| g),
            };
            let from = current.map(|o| o.gateway);
            if next == from {
                continue;
            }
            match next {
                Some(gateway) => {
                    self.owners.insert(
                        range,
                        Owner {
                            gateway,
                            since: now,
                        },
                    );
                }
                None => {
                    self.owners.remove(&range);
                }
            }
            if from.is_some() && next.is_some() {
                self.failovers += 1;
            }
            moves.push(Move {
                range,
                from,
                to: next,
            });
        }
        moves
    }
}

/// Appends `more` to `moves`, folding two moves of one range into one.
fn merge(moves: &mut Vec<Move>, more: &mut Vec<Move>) {
    for m in more.drain(..) {
        match moves.iter_mut().find(|x| x.range == m.range) {
            Some(x) => x.to = m.to,
            None => moves.push(m),
        }
    }
    moves.retain(|m| m.from != m.to);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("cidr")
    }

    const DB: &str = "198.19.101.0/24";
    const VPC: &str = "198.18.64.0/20";

    #[test]
    fn the_preferred_gateway_carries_a_range_and_a_dead_one_loses_it() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut c = Choice::new(Timing::default());
        let range = net(DB);
        let moves = c.heard(2, Some(&[range]), 100, ms(0));
        assert_eq!(
            moves,
            vec![Move {
                range,
                from: None,
                to: Some(2)
            }]
        );
        // A better one appears: not before its hold-down.
        assert!(c.heard(1, Some(&[range]), 50, ms(100)).is_empty());
        for t in (1000..10_000).step_by(1000) {
            assert!(
                c.heard(1, Some(&[range]), 50, ms(t + 100)).is_empty(),
                "at {t}"
            );
            assert!(c.heard(2, Some(&[range]), 100, ms(t)).is_empty(), "at {t}");
        }
        // 1 has been a candidate since 100 ms: its hold-down ends at 10.1 s.
        assert_eq!(c.next_deadline(ms(9_100)), Some(ms(10_100)));
        assert!(c.tick(ms(10_099)).is_empty());
        let moves = c.tick(ms(10_100));
        assert_eq!(
            moves,
            vec![Move {
                range,
                from: Some(2),
                to: Some(1)
            }]
        );
        assert_eq!(c.failovers(), 1);
        assert_eq!(c.standing_by(&range, ms(10_100)), vec![2]);
        // 1 goes silent after 9.1 s: 2.5 s later, 2 has the range.
        c.heard(2, Some(&[range]), 100, ms(10_500));
        c.heard(2, Some(&[range]), 100, ms(11_500));
        assert_eq!(c.next_deadline(ms(11_500)), Some(ms(11_600)));
        assert!(c.tick(ms(11_599)).is_empty());
        assert_eq!(
            c.tick(ms(11_600)),
            vec![Move {
                range,
                from: Some(1),
                to: Some(2)
            }]
        );
        assert_eq!(c.carried_by(2), vec![range]);
        assert!(c.standing_by(&range, ms(11_600)).is_empty());
    }

    #[test]
    fn a_withdrawn_range_moves_at_once_or_goes_and_a_silent_owner_keeps_it() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let (db, vpc) = (net(DB), net(VPC));
        let mut c = Choice::new(Timing::default());
        c.heard(1, Some(&[db, vpc]), 100, ms(0));
        c.heard(2, Some(&[db]), 100, ms(10));
        assert_eq!(c.carried_by(1), vec![vpc, db]);
        // 1 lost its path to db: 2 takes db, vpc stays.
        let moves = c.heard(1, Some(&[vpc]), 100, ms(1000));
        assert_eq!(
            moves,
            vec![Move {
                range: db,
                from: Some(1),
                to: Some(2)
            }]
        );
        // 1 withdraws vpc too, and nobody else has it: it goes.
        let moves = c.heard(1, Some(&[]), 100, ms(2000));
        assert_eq!(
            moves,
            vec![Move {
                range: vpc,
                from: Some(1),
                to: None
            }]
        );
        // 2 falls silent with nobody to take db: db stays with it.
        c.heard(1, Some(&[]), 100, ms(3000));
        assert!(c.tick(ms(10_000)).is_empty());
        assert_eq!(c.carried_by(2), vec![db]);
        // Removing 2 takes db with it.
        let moves = c.forget(2);
        assert_eq!(
            moves,
            vec![Move {
                range: db,
                from: Some(2),
                to: None
            }]
        );
    }

    #[test]
    fn equal_priorities_keep_the_gateway_in_use() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let range = net(DB);
        let mut c = Choice::new(Timing::default());
        c.remember(range, 2, ms(0));
        c.heard(1, Some(&[range]), 100, ms(0));
        assert_eq!(
            c.carried_by(2),
            vec![range],
            "remembered from before a restart"
        );
        c.heard(2, Some(&[range]), 100, ms(500));
        for t in (1000..60_000).step_by(1000) {
            assert!(c.heard(1, Some(&[range]), 100, ms(t)).is_empty());
            assert!(c.heard(2, Some(&[range]), 100, ms(t + 500)).is_empty());
            assert!(c.tick(ms(t + 600)).is_empty());
        }
    }

    /// One gateway's truth in a simulated schedule.
    #[derive(Debug, Clone)]
    struct Gw {
        priority: u16,
        /// Poll phase, in ms within each second.
        phase: u64,
        alive: bool,
        offers: [bool; 2],
        /// When it last became bad (dead or not offering), per range.
        bad_at: [Option<u64>; 2],
        /// Since when it has been good (alive and offering), per range.
        good_since: [Option<u64>; 2],
        /// When its last good run ended, per range.
        run_ended: [Option<u64>; 2],
        /// Since when it has been good but for breaks too short for any
        /// poll-based choice to notice for sure (under `dead_after` plus
        /// a poll), per range: what a failback may count from.
        steady_since: [Option<u64>; 2],
    }

    #[derive(Debug, Clone)]
    enum Event {
        Die(usize),
        Revive(usize),
        Withdraw(usize, usize),
        Offer(usize, usize),
    }

    /// Each gateway's priority and poll phase; events at milliseconds.
    type Schedule = (Vec<(u16, u64)>, Vec<(u64, Event)>);

    fn schedule() -> impl Strategy<Value = Schedule> {
        let gws = prop::collection::vec(
            (prop_oneof![Just(50u16), Just(100), Just(100)], 0u64..1000),
            2..4,
        );
        let events = prop::collection::vec(
            (
                0u64..120_000,
                prop_oneof![
                    (0usize..3).prop_map(Event::Die),
                    (0usize..3).prop_map(Event::Revive),
                    (0usize..3, 0usize..2).prop_map(|(g, r)| Event::Withdraw(g, r)),
                    (0usize..3, 0usize..2).prop_map(|(g, r)| Event::Offer(g, r)),
                ],
            ),
            0..40,
        );
        (gws, events)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn traffic_moves_only_off_bad_gateways_or_back_after_the_hold_down(
            (gws, mut events) in schedule()
        ) {
            let timing = Timing::default();
            let dead = timing.dead_after.as_millis() as u64;
            let hold = timing.hold_down.as_millis() as u64;
            let ranges = [net(DB), net(VPC)];
            let mut gws: Vec<Gw> = gws
                .into_iter()
                .map(|(priority, phase)| Gw {
                    priority,
                    phase,
                    alive: true,
                    offers: [true, true],
                    bad_at: [None, None],
                    good_since: [Some(0), Some(0)],
                    run_ended: [None, None],
                    steady_since: [Some(0), Some(0)],
                })
                .collect();
            events.sort_by_key(|(t, _)| *t);
            let t0 = Instant::now();
            let at = |ms: u64| t0 + Duration::from_millis(ms);
            let mut c = Choice::new(timing);
            let mut next_event = 0;
            let mut now = 0u64;
            const END: u64 = 140_000;
            loop {
                // The next moment anything can happen: an event, a poll, or
                // one of the choice's own deadlines. Nothing changes between
                // two, so checking the bound just before each catches the
                // longest a range sat on a bad gateway.
                let poll = gws
                    .iter()
                    .map(|gw| {
                        let base = now - now % 1000 + gw.phase;
                        if base > now { base } else { base + 1000 }
                    })
                    .min()
                    .unwrap_or(END);
                let event = events.get(next_event).map_or(END, |(t, _)| (*t).max(now + 1));
                let deadline = c.next_deadline(at(now)).map_or(END, |d| {
                    let us = d.saturating_duration_since(t0).as_micros() as u64;
                    us.div_ceil(1000).max(now + 1)
                });
                now = poll.min(event).min(deadline);
                if now >= END {
                    break;
                }
                for (r, range) in ranges.iter().enumerate() {
                    let carriers = (0..gws.len())
                        .filter(|g| c.carried_by(*g as u64).contains(range))
                        .count();
                    prop_assert!(carriers <= 1, "two carry {range}");
                    let Some(o) = c.owners().get(range).map(|o| o.gateway as usize) else {
                        continue;
                    };
                    let bad_for = match gws[o].good_since[r] {
                        None => gws[o].bad_at[r].map_or(0, |t| now - t),
                        Some(_) => 0,
                    };
                    // Another gateway has been good long enough to have
                    // been heard (polls are a second apart).
                    let good_other = gws.iter().enumerate().any(|(g, gw)| {
                        g != o && gw.good_since[r].is_some_and(|t| now - t > 1000)
                    });
                    prop_assert!(
                        !(good_other && bad_for > dead + 1000),
                        "at {now}: {range} on {o}, bad for {bad_for} ms: {gws:?}"
                    );
                }
                while next_event < events.len() && events[next_event].0 <= now {
                    let (_, event) = &events[next_event];
                    next_event += 1;
                    let (g, which, alive, offer) = match *event {
                        Event::Die(g) => (g, None, Some(false), None),
                        Event::Revive(g) => (g, None, Some(true), None),
                        Event::Withdraw(g, r) => (g, Some(r), None, Some(false)),
                        Event::Offer(g, r) => (g, Some(r), None, Some(true)),
                    };
                    let Some(gw) = gws.get_mut(g) else { continue };
                    if let Some(a) = alive {
                        gw.alive = a;
                    }
                    if let (Some(r), Some(o)) = (which, offer) {
                        gw.offers[r] = o;
                    }
                    for r in 0..2 {
                        let good = gw.alive && gw.offers[r];
                        match (good, gw.good_since[r]) {
                            (true, None) => {
                                gw.good_since[r] = Some(now);
                                let short = gw.bad_at[r].is_some_and(|t| now - t < dead + 1000);
                                if !short || gw.steady_since[r].is_none() {
                                    gw.steady_since[r] = Some(now);
                                }
                            }
                            (false, Some(_)) => {
                                gw.good_since[r] = None;
                                gw.bad_at[r] = Some(now);
                                gw.run_ended[r] = Some(now);
                            }
                            _ => {}
                        }
                    }
                }
                let mut moves = Vec::new();
                for (g, gw) in gws.iter().enumerate() {
                    if gw.alive && now % 1000 == gw.phase {
                        let offered: Vec<IpNet> =
                            (0..2).filter(|r| gw.offers[*r]).map(|r| ranges[r]).collect();
                        moves.extend(c.heard(g as u64, Some(&offered), gw.priority, at(now)));
                    }
                }
                moves.extend(c.tick(at(now)));
                for m in &moves {
                    let r = ranges.iter().position(|x| *x == m.range).expect("a known range");
                    if let (Some(from), Some(to)) = (m.from, m.to) {
                        let (a, b) = (&gws[from as usize], &gws[to as usize]);
                        // Off a gateway that was bad lately, or back to a
                        // better one that has been good for the hold-down.
                        let a_was_bad = a.good_since[r].is_none_or(|t| now - t <= dead + 1000);
                        // Good for the hold-down, now or until so lately
                        // that the choice cannot know it has ended.
                        let lately = b.good_since[r].is_some()
                            || b.run_ended[r].is_some_and(|e| e + dead >= now);
                        let steady = lately && b.steady_since[r].is_some_and(|s| now - s >= hold);
                        let failback = b.priority < a.priority && steady;
                        prop_assert!(a_was_bad || failback, "at {now}: {m:?} {gws:?}");
                    }
                }
            }
        }
    }
}
