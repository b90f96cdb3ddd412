//! Handshake initiations per source address, as a token bucket in a fixed
//! table.
//!
//! A flood of initiations from one address, from however many ports, costs
//! one keyed hash per datagram and is dropped before any cryptography. It
//! therefore never counts towards the device-wide load that makes every
//! peer prove its address with a cookie first (boringtun's `RateLimiter`),
//! so peers elsewhere keep handshaking at once. A flood from many addresses
//! still reaches that load, and then the cookies do their work.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::Instant;

/// The kernel's figures: 20 initiations a second, in bursts of up to 5.
const PER_SECOND: u64 = 20;
const BURST: u64 = 5;
/// Nanoseconds of credit one initiation costs, and the most a source saves.
const COST: u64 = 1_000_000_000 / PER_SECOND;
const MAX_CREDIT: u64 = COST * BURST;

/// Sources tracked at once; a source whose slot is taken over starts again
/// with a full bucket. The key is random, so slots cannot be aimed at.
const SLOTS: usize = 1024;

#[derive(Clone, Copy, Default)]
struct Slot {
    /// The source's keyed hash; 0 is never a hash, so it means empty.
    tag: u64,
    credit: u64,
    last: u64,
}

pub struct SourceLimiter {
    slots: Box<[Slot]>,
    key: RandomState,
    epoch: Instant,
}

impl SourceLimiter {
    pub fn new(now: Instant) -> SourceLimiter {
        SourceLimiter {
            slots: vec![Slot::default(); SLOTS].into_boxed_slice(),
            key: RandomState::new(),
            epoch: now,
        }
    }

    /// Whether `source` may start a handshake now; spends its credit if so.
    /// IPv6 sources are counted per /64, which one host usually has whole.
    pub fn allow(&mut self, source: IpAddr, now: Instant) -> bool {
        let id = match source {
            IpAddr::V4(a) => (4u8, u128::from(u32::from(a))),
            IpAddr::V6(a) => (6u8, u128::from(a) >> 64),
        };
        let tag = self.key.hash_one(id) | 1;
        let t =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let slot = &mut self.slots[(tag as usize) % SLOTS];
        if slot.tag != tag {
            *slot = Slot {
                tag,
                credit: MAX_CREDIT,
                last: t,
            };
        }
        slot.credit = slot
            .credit
            .saturating_add(t.saturating_sub(slot.last))
            .min(MAX_CREDIT);
        slot.last = t;
        if slot.credit >= COST {
            slot.credit -= COST;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn allowed(l: &mut SourceLimiter, ip: &str, now: Instant, n: usize) -> usize {
        let ip: IpAddr = ip.parse().expect("address");
        (0..n).filter(|_| l.allow(ip, now)).count()
    }

    #[test]
    fn a_burst_then_twenty_a_second() {
        let start = Instant::now();
        let mut l = SourceLimiter::new(start);
        assert_eq!(allowed(&mut l, "198.18.0.9", start, 100), BURST as usize);
        // Over the next second, asked every 10 ms: 20 more, not 100.
        let mut later = start;
        let mut over_a_second = 0;
        for _ in 0..100 {
            later += Duration::from_millis(10);
            over_a_second += allowed(&mut l, "198.18.0.9", later, 1);
        }
        assert_eq!(over_a_second, PER_SECOND as usize);
        // Credit never exceeds a burst, however long the source was quiet.
        let much_later = later + Duration::from_secs(3600);
        assert_eq!(
            allowed(&mut l, "198.18.0.9", much_later, 100),
            BURST as usize
        );
    }

    #[test]
    fn sources_do_not_share_a_bucket() {
        let now = Instant::now();
        let mut l = SourceLimiter::new(now);
        assert_eq!(allowed(&mut l, "198.18.0.9", now, 100), BURST as usize);
        assert_eq!(allowed(&mut l, "198.18.0.10", now, 1), 1);
        assert_eq!(allowed(&mut l, "fd00::1", now, 1), 1);
    }

    #[test]
    fn ipv6_counts_per_64() {
        let now = Instant::now();
        let mut l = SourceLimiter::new(now);
        assert_eq!(allowed(&mut l, "fd00:1:2:3::1", now, 3), 3);
        // The same /64 from another address shares what is left.
        assert_eq!(allowed(&mut l, "fd00:1:2:3::ffff", now, 100), 2);
        assert_eq!(allowed(&mut l, "fd00:1:2:4::1", now, 1), 1);
    }
}
