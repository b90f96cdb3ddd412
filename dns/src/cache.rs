//! The answer cache: upstream replies by question, each until its TTL runs
//! out, within a fixed budget of bytes. When the budget is full the entry
//! used least recently goes first. Entries are kept as the wire bytes the
//! upstream sent, so what they cost is what is counted.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::message::CacheKey;

/// What an entry costs beyond its key and bytes: the map's and the order
/// index's share, rounded up.
const ENTRY_OVERHEAD: usize = 128;

/// No one answer may take more than this share of the budget, so a few
/// large TXT records cannot push out everything else.
const MAX_SHARE: usize = 16;

struct Entry {
    wire: Box<[u8]>,
    stored: Instant,
    expires: Instant,
    /// Its place in the recency order.
    seq: u64,
}

impl Entry {
    fn cost(&self, key: &CacheKey) -> usize {
        key.size() + self.wire.len() + ENTRY_OVERHEAD
    }
}

pub struct Cache {
    entries: HashMap<CacheKey, Entry>,
    /// Sequence number → key, oldest use first.
    order: BTreeMap<u64, CacheKey>,
    next_seq: u64,
    bytes: usize,
    budget: usize,
}

impl Cache {
    pub fn new(budget: usize) -> Cache {
        Cache {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
            bytes: 0,
            budget,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held, by the same account as the budget.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The cached reply for `key` and its age in whole seconds, if it has
    /// not expired.
    pub fn get(&mut self, key: &CacheKey, now: Instant) -> Option<(&[u8], u32)> {
        let entry = self.entries.get(key)?;
        if entry.expires <= now {
            self.remove(key);
            return None;
        }
        let seq = self.bump();
        let entry = self.entries.get_mut(key)?;
        if let Some(k) = self.order.remove(&entry.seq) {
            self.order.insert(seq, k);
        }
        entry.seq = seq;
        let age = now.saturating_duration_since(entry.stored).as_secs();
        Some((&entry.wire, u32::try_from(age).unwrap_or(u32::MAX)))
    }

    /// Keeps `wire` for `ttl`, evicting what was used least recently to
    /// make room. An answer bigger than its share is not kept.
    pub fn insert(&mut self, key: CacheKey, wire: &[u8], ttl: Duration, now: Instant) {
        self.remove(&key);
        let cost = key.size() + wire.len() + ENTRY_OVERHEAD;
        if cost > self.budget / MAX_SHARE {
            return;
        }
        while self.bytes + cost > self.budget {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(entry) = self.entries.remove(&oldest) {
                self.bytes -= entry.cost(&oldest);
            }
        }
        let seq = self.bump();
        self.order.insert(seq, key.clone());
        self.bytes += cost;
        self.entries.insert(
            key,
            Entry {
                wire: wire.into(),
                stored: now,
                expires: now + ttl,
                seq,
            },
        );
    }

    /// Empties the cache, as when the upstreams change.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.bytes = 0;
    }

    fn remove(&mut self, key: &CacheKey) {
        if let Some(entry) = self.entries.remove(key) {
            self.order.remove(&entry.seq);
            self.bytes -= entry.cost(key);
        }
    }

    fn bump(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::Name;
    use std::str::FromStr;

    fn key(i: usize) -> CacheKey {
        CacheKey {
            name: Name::from_str(&format!("n{i}.zone.")).expect("name"),
            query_type: 1,
            query_class: 1,
            dnssec_ok: false,
            checking_disabled: false,
        }
    }

    #[test]
    fn entries_expire_with_their_ttl() {
        let t0 = Instant::now();
        let mut cache = Cache::new(1 << 20);
        cache.insert(key(1), b"answer", Duration::from_secs(10), t0);
        let (wire, age) = cache
            .get(&key(1), t0 + Duration::from_secs(9))
            .expect("fresh");
        assert_eq!((wire, age), (&b"answer"[..], 9));
        assert!(cache.get(&key(1), t0 + Duration::from_secs(10)).is_none());
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
    }

    #[test]
    fn the_budget_holds_and_the_least_recently_used_goes_first() {
        let t0 = Instant::now();
        let budget = 64 * 1024;
        let mut cache = Cache::new(budget);
        let hour = Duration::from_secs(3600);
        for i in 0..10_000 {
            cache.insert(key(i), &[0u8; 200], hour, t0);
            assert!(cache.bytes() <= budget);
            // Keep entry 0 in use: it must survive.
            assert!(cache.get(&key(0), t0).is_some(), "entry 0 evicted at {i}");
        }
        assert!(
            cache.get(&key(1), t0).is_none(),
            "entry 1 should be long gone"
        );
        assert!(cache.get(&key(9_999), t0).is_some());
        assert!(cache.len() > 100, "only {} entries in 64 KiB", cache.len());
        // An answer bigger than its share of the budget is not kept.
        cache.insert(key(20_000), &vec![0u8; budget / 8], hour, t0);
        assert!(cache.get(&key(20_000), t0).is_none());
    }

    #[test]
    fn replacing_an_entry_keeps_the_account_straight() {
        let t0 = Instant::now();
        let mut cache = Cache::new(1 << 20);
        cache.insert(key(1), &[0u8; 100], Duration::from_secs(5), t0);
        let one = cache.bytes();
        cache.insert(key(1), &[0u8; 100], Duration::from_secs(5), t0);
        assert_eq!((cache.len(), cache.bytes()), (1, one));
        cache.clear();
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
    }
}
