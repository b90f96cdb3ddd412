//! The longest-prefix-match routing table that cryptokey routing consults on
//! every packet: destination to peer on the way out, source to peer check on
//! the way in. A `RouteTable` is an immutable snapshot; writers build a whole
//! new one and publish it, so lookups take no lock and never allocate. Building
//! flattens the prefixes of each address family into sorted disjoint intervals,
//! each carrying the value of its longest covering prefix, so a lookup is a
//! search for the last interval starting at or below the address. IPv4 narrows
//! that search with a direct index on the top 16 bits, IPv6 with a radix index
//! that adapts to where its prefixes cluster. Memory grows linearly with the
//! number of prefixes, however sparse they are.

use std::cmp::Reverse;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;

use ipnet::IpNet;

/// Longest-prefix-match table for IPv4 and IPv6 prefixes.
pub struct RouteTable<V> {
    v4: V4Intervals<V>,
    v6: V6Intervals<V>,
    len: usize,
}

impl<V: Copy + Eq> RouteTable<V> {
    pub fn empty() -> Self {
        Self {
            v4: V4Intervals::empty(),
            v6: V6Intervals::empty(),
            len: 0,
        }
    }

    /// Builds a snapshot. Host bits of each prefix are ignored (use ipnet's trunc()).
    /// If the same prefix appears twice, the LAST one wins.
    pub fn build<I: IntoIterator<Item = (IpNet, V)>>(routes: I) -> Self {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for (net, value) in routes {
            match net.trunc() {
                IpNet::V4(net) => v4.push(Prefix {
                    first: u32::from(net.network()),
                    last: u32::from(net.broadcast()),
                    value,
                }),
                IpNet::V6(net) => v6.push(Prefix {
                    first: u128::from(net.network()),
                    last: u128::from(net.broadcast()),
                    value,
                }),
            }
        }
        let v4 = canonicalize(v4);
        let v6 = canonicalize(v6);
        Self {
            len: v4.len() + v6.len(),
            v4: V4Intervals::new(flatten(&v4)),
            v6: V6Intervals::new(flatten(&v6)),
        }
    }

    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<V> {
        match addr {
            IpAddr::V4(addr) => self.lookup_v4(addr),
            IpAddr::V6(addr) => self.lookup_v6(addr),
        }
    }

    #[inline]
    pub fn lookup_v4(&self, addr: Ipv4Addr) -> Option<V> {
        self.v4.lookup(u32::from(addr))
    }

    /// IPv4-mapped addresses (`::ffff:a.b.c.d`) are looked up as IPv6, because
    /// that is the header the packet carries.
    #[inline]
    pub fn lookup_v6(&self, addr: Ipv6Addr) -> Option<V> {
        self.v6.lookup(u128::from(addr))
    }

    /// Number of distinct prefixes stored.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every value some address looks up to (with repeats): what the
    /// table can send traffic to, for checking a snapshot before and after
    /// it is published.
    pub fn values(&self) -> impl Iterator<Item = V> + '_ {
        let v4 = self.v4.values.iter().flatten().copied();
        let v6 = self.v6.intervals.iter().filter_map(|i| i.value);
        v4.chain(v6)
    }

    /// Bytes the snapshot holds on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.v4.heap_bytes() + self.v6.heap_bytes()
    }
}

impl<V: Copy + Eq> Default for RouteTable<V> {
    fn default() -> Self {
        Self::empty()
    }
}

/// An address as an unsigned integer.
trait Key: Copy + Ord {
    const ZERO: Self;
    fn succ(self) -> Option<Self>;
}

impl Key for u32 {
    const ZERO: Self = 0;
    fn succ(self) -> Option<Self> {
        self.checked_add(1)
    }
}

impl Key for u128 {
    const ZERO: Self = 0;
    fn succ(self) -> Option<Self> {
        self.checked_add(1)
    }
}

#[derive(Clone, Copy)]
struct Prefix<K, V> {
    first: K,
    last: K,
    value: V,
}

/// Sorts by (network, prefix length) and keeps the last value given for each
/// prefix.
fn canonicalize<K: Key, V: Copy>(mut prefixes: Vec<Prefix<K, V>>) -> Vec<Prefix<K, V>> {
    // Stable, so duplicates stay in input order.
    prefixes.sort_by_key(|p| (p.first, Reverse(p.last)));
    prefixes.dedup_by(|later, kept| {
        let same = later.first == kept.first && later.last == kept.last;
        if same {
            kept.value = later.value;
        }
        same
    });
    prefixes
}

/// Disjoint intervals covering the whole address space in order: interval `i`
/// runs from `starts[i]` up to the next start, and `values[i]` is the value of
/// its longest covering prefix. `starts[0]` is always zero, and neighbours
/// never share a value.
struct Intervals<K, V> {
    starts: Vec<K>,
    values: Vec<Option<V>>,
}

impl<K: Key, V: Copy + Eq> Intervals<K, V> {
    /// Makes `value` hold from `start` on. Starts arrive in non-decreasing
    /// order; a repeated start replaces the one before it.
    fn set_from(&mut self, start: K, value: Option<V>) {
        if self.starts.last() == Some(&start) {
            self.starts.pop();
            self.values.pop();
        }
        if self.values.last() != Some(&value) {
            self.starts.push(start);
            self.values.push(value);
        }
    }
}

/// Sweeps canonical prefixes into intervals. Two prefixes are either disjoint
/// or nested, so the prefixes covering the sweep position form a chain, kept
/// innermost last.
fn flatten<K: Key, V: Copy + Eq>(prefixes: &[Prefix<K, V>]) -> Intervals<K, V> {
    let mut out = Intervals {
        starts: vec![K::ZERO],
        values: vec![None],
    };
    let mut open: Vec<Prefix<K, V>> = Vec::new();
    for prefix in prefixes {
        close_before(&mut open, &mut out, Some(prefix.first));
        out.set_from(prefix.first, Some(prefix.value));
        open.push(*prefix);
    }
    close_before(&mut open, &mut out, None);
    out
}

/// Closes the open prefixes that end before `limit` (all of them for `None`).
fn close_before<K: Key, V: Copy + Eq>(
    open: &mut Vec<Prefix<K, V>>,
    out: &mut Intervals<K, V>,
    limit: Option<K>,
) {
    while let Some(innermost) = open.last() {
        if limit.is_some_and(|limit| innermost.last >= limit) {
            return;
        }
        let Some(after) = innermost.last.succ() else {
            // It reaches the top of the address space, and so do the prefixes
            // enclosing it: nothing follows.
            return;
        };
        open.pop();
        out.set_from(after, open.last().map(|p| p.value));
    }
}

/// IPv4 intervals behind a direct index on the top 16 address bits. Block
/// `h`, the addresses whose top 16 bits are `h`, holds the intervals
/// `index[h]..index[h + 1]`; those all start inside the block, so only their
/// low 16 bits are kept. The interval just before the block covers the
/// addresses below its first start.
struct V4Intervals<V> {
    /// 65,537 offsets (256 KiB), or none for a table without IPv4 prefixes.
    index: Box<[u32]>,
    lows: Box<[u16]>,
    values: Box<[Option<V>]>,
}

const V4_BLOCKS: u32 = 1 << 16;

impl<V: Copy + Eq> V4Intervals<V> {
    fn empty() -> Self {
        Self {
            index: Box::default(),
            lows: Box::default(),
            values: Box::default(),
        }
    }

    fn new(intervals: Intervals<u32, V>) -> Self {
        if intervals.values.iter().all(Option::is_none) {
            return Self::empty();
        }
        let starts = intervals.starts;
        let mut index = Vec::with_capacity(V4_BLOCKS as usize + 1);
        let mut pending = starts.iter().peekable();
        let mut below = 0usize;
        for block in 0..=V4_BLOCKS {
            while pending.next_if(|&&start| start >> 16 < block).is_some() {
                below += 1;
            }
            index.push(offset(below));
        }
        Self {
            index: index.into_boxed_slice(),
            lows: starts.iter().map(|&start| start as u16).collect(),
            values: intervals.values.into_boxed_slice(),
        }
    }

    #[inline]
    fn lookup(&self, addr: u32) -> Option<V> {
        let block = (addr >> 16) as usize;
        let begin = *self.index.get(block)? as usize;
        let end = *self.index.get(block + 1)? as usize;
        let low = addr as u16;
        let started = self.lows.get(begin..end)?.partition_point(|&s| s <= low);
        // Zero only for an empty table: interval 0 starts at 0.0.0.0, inside
        // block 0 and before every other block.
        let slot = (begin + started).checked_sub(1)?;
        self.values.get(slot).copied().flatten()
    }

    fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.index)
            + std::mem::size_of_val(&*self.lows)
            + std::mem::size_of_val(&*self.values)
    }
}

/// Keys a bucket may hold before it gets a radix node of its own.
const V6_LEAF_KEYS: usize = 8;
/// Bounds memory on adversarial key sets: each depth adds at most one slot
/// per key. Below it a bucket is bisected however large it is.
const V6_MAX_DEPTH: usize = 4;
/// A root of 2^16 slots takes 512 KiB, which still fits in L2 cache.
const V6_MAX_BITS: u32 = 16;

/// IPv6 intervals behind a radix index that adapts to where the keys are.
/// IPv6 prefixes cluster under a few allocations, so a fixed index on the
/// top bits would put them all in one bucket. Instead each node skips the
/// bits its keys share and indexes the next few, sized to give about two
/// keys per bucket; a crowded bucket gets a node of its own. A lookup reads
/// a node and a slot per level (usually one level, all small enough to stay
/// cached), then compares the address with a few interval starts.
struct V6Intervals<V> {
    /// Start and value side by side: the last cache line a lookup reads
    /// holds both.
    intervals: Box<[V6Interval<V>]>,
    /// Root first; children always come after their parent.
    nodes: Box<[RadixNode]>,
    slots: Box<[Slot]>,
}

#[derive(Clone, Copy)]
struct V6Interval<V> {
    start: u128,
    value: Option<V>,
}

/// Covers the intervals `begin..end`, whose starts all share their top
/// `skip` bits.
#[derive(Clone, Copy)]
struct RadixNode {
    prefix: u128,
    /// The top `skip` bits.
    mask: u128,
    skip: u32,
    /// `128 - bits`, for `bits` indexed after the shared ones.
    shift: u32,
    first_slot: usize,
    begin: usize,
    end: usize,
}

impl RadixNode {
    fn bucket(&self, addr: u128) -> usize {
        // skip < 128 and shift < 128, so nothing wraps.
        addr.wrapping_shl(self.skip).wrapping_shr(self.shift) as usize
    }
}

/// Bucket `b` of a node holds the intervals from `slots[first_slot + b].begin`
/// to the next slot's `begin`, and is split further if `child` is not zero.
#[derive(Clone, Copy)]
struct Slot {
    begin: u32,
    child: u32,
}

impl<V: Copy + Eq> V6Intervals<V> {
    fn empty() -> Self {
        Self {
            intervals: Box::default(),
            nodes: Box::default(),
            slots: Box::default(),
        }
    }

    fn new(intervals: Intervals<u128, V>) -> Self {
        if intervals.values.iter().all(Option::is_none) {
            return Self::empty();
        }
        let mut nodes = Vec::new();
        let mut slots = Vec::new();
        // The interval at :: is left out: it holds every address below the
        // other starts, whatever bits those share.
        let keys = intervals.starts.len();
        if keys > V6_LEAF_KEYS + 1 {
            add_node(&intervals.starts, 1..keys, 0, &mut nodes, &mut slots);
        }
        let intervals = intervals.starts.iter().zip(intervals.values);
        Self {
            intervals: intervals
                .map(|(&start, value)| V6Interval { start, value })
                .collect(),
            nodes: nodes.into_boxed_slice(),
            slots: slots.into_boxed_slice(),
        }
    }

    #[inline]
    fn lookup(&self, addr: u128) -> Option<V> {
        let (begin, end) = self.narrow(addr);
        let len = end.saturating_sub(begin);
        let window = self
            .intervals
            .get(begin..)
            .and_then(<[_]>::first_chunk::<V6_LEAF_KEYS>);
        let started = match window {
            // Intervals past `end` start above `addr`, so a whole window can
            // be counted without a branch on the keys, which a bisection
            // would mispredict half the time. The `min` only guards that.
            Some(window) if len <= V6_LEAF_KEYS => window
                .iter()
                .map(|interval: &V6Interval<V>| usize::from(interval.start <= addr))
                .sum::<usize>()
                .min(len),
            _ => self
                .intervals
                .get(begin..end)?
                .partition_point(|interval| interval.start <= addr),
        };
        let slot = (begin + started).checked_sub(1)?;
        self.intervals.get(slot)?.value
    }

    /// Intervals among which the last one starting at or below `addr` lies;
    /// if none of them does, it is the interval just before them.
    #[inline]
    fn narrow(&self, addr: u128) -> (usize, usize) {
        let mut at = 0;
        loop {
            let Some(node) = self.nodes.get(at) else {
                return (0, self.intervals.len());
            };
            if addr & node.mask != node.prefix {
                let edge = if addr < node.prefix {
                    node.begin
                } else {
                    node.end
                };
                return (edge, edge);
            }
            let slot = node.first_slot + node.bucket(addr);
            let (Some(this), Some(next)) = (self.slots.get(slot), self.slots.get(slot + 1)) else {
                return (0, 0);
            };
            if this.child == 0 {
                return (this.begin as usize, next.begin as usize);
            }
            at = this.child as usize;
        }
    }

    fn heap_bytes(&self) -> usize {
        std::mem::size_of_val(&*self.intervals)
            + std::mem::size_of_val(&*self.nodes)
            + std::mem::size_of_val(&*self.slots)
    }
}

/// Adds the node for `starts[range]` (more than `V6_LEAF_KEYS` of them) and,
/// below it, nodes for its crowded buckets. Returns the node's position.
fn add_node(
    starts: &[u128],
    range: Range<usize>,
    depth: usize,
    nodes: &mut Vec<RadixNode>,
    slots: &mut Vec<Slot>,
) -> u32 {
    let keys = starts.get(range.clone()).unwrap_or_default();
    let (Some(&first), Some(&last)) = (keys.first(), keys.last()) else {
        return 0;
    };
    // Distinct starts part within 128 bits, and `n` of them under one prefix
    // need `log2(n)` more bits after it: `skip + bits` stays below 128.
    let skip = (first ^ last).leading_zeros();
    let bits = keys.len().ilog2().saturating_sub(1).clamp(1, V6_MAX_BITS);
    let mask = u128::MAX.checked_shl(128 - skip).unwrap_or(0);
    let node = RadixNode {
        prefix: first & mask,
        mask,
        skip,
        shift: 128 - bits,
        first_slot: slots.len(),
        begin: range.start,
        end: range.end,
    };
    let at = offset(nodes.len());
    nodes.push(node);

    let mut pending = keys.iter().peekable();
    let mut begin = range.start;
    for bucket in 0..=1usize << bits {
        while pending.next_if(|&&k| node.bucket(k) < bucket).is_some() {
            begin += 1;
        }
        slots.push(Slot {
            begin: offset(begin),
            child: 0,
        });
    }
    if depth + 1 < V6_MAX_DEPTH {
        for slot in node.first_slot..slots.len() - 1 {
            let (begin, end) = (slots[slot].begin as usize, slots[slot + 1].begin as usize);
            if end - begin > V6_LEAF_KEYS {
                slots[slot].child = add_node(starts, begin..end, depth + 1, nodes, slots);
            }
        }
    }
    at
}

/// An offset into a table. It could only saturate past 2^32 intervals, tens
/// of GiB of table.
fn offset(i: usize) -> u32 {
    u32::try_from(i).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::{Ipv4Net, Ipv6Net};
    use proptest::prelude::*;
    use proptest::sample::{select, Index};

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix parses")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address parses")
    }

    fn table(routes: &[(&str, u64)]) -> RouteTable<u64> {
        RouteTable::build(routes.iter().map(|&(n, v)| (net(n), v)))
    }

    fn assert_lookups(table: &RouteTable<u64>, expected: &[(&str, Option<u64>)]) {
        for &(addr, want) in expected {
            assert_eq!(table.lookup(ip(addr)), want, "lookup {addr}");
        }
    }

    /// Longest matching prefix by linear scan; among equal prefixes the last
    /// one listed wins. Does its own bit arithmetic rather than trusting ipnet.
    fn model(routes: &[(IpNet, u64)], addr: IpAddr) -> Option<u64> {
        let mut best: Option<(u8, u64)> = None;
        for &(net, value) in routes {
            if covers(net, addr) && best.is_none_or(|(len, _)| net.prefix_len() >= len) {
                best = Some((net.prefix_len(), value));
            }
        }
        best.map(|(_, value)| value)
    }

    fn covers(net: IpNet, addr: IpAddr) -> bool {
        let top_bits_equal = |x: u128, y: u128, width: u32| {
            let len = u32::from(net.prefix_len());
            len == 0 || (x ^ y) >> (width - len) == 0
        };
        match (net, addr) {
            (IpNet::V4(n), IpAddr::V4(a)) => {
                top_bits_equal(u32::from(n.addr()).into(), u32::from(a).into(), 32)
            }
            (IpNet::V6(n), IpAddr::V6(a)) => top_bits_equal(n.addr().into(), a.into(), 128),
            _ => false,
        }
    }

    /// First and last address of the prefix and their outside neighbours,
    /// wrapping at the ends of the address space.
    fn edges(net: IpNet) -> [IpAddr; 4] {
        match net {
            IpNet::V4(n) => {
                let host = u32::MAX.checked_shr(u32::from(n.prefix_len())).unwrap_or(0);
                let first = u32::from(n.addr()) & !host;
                let last = first | host;
                [first, last, first.wrapping_sub(1), last.wrapping_add(1)]
                    .map(|a| IpAddr::V4(a.into()))
            }
            IpNet::V6(n) => {
                let host = u128::MAX
                    .checked_shr(u32::from(n.prefix_len()))
                    .unwrap_or(0);
                let first = u128::from(n.addr()) & !host;
                let last = first | host;
                [first, last, first.wrapping_sub(1), last.wrapping_add(1)]
                    .map(|a| IpAddr::V6(a.into()))
            }
        }
    }

    fn probes(routes: &[(IpNet, u64)], extra: &[IpAddr]) -> Vec<IpAddr> {
        let mut probes: Vec<IpAddr> = routes.iter().flat_map(|&(net, _)| edges(net)).collect();
        probes.extend_from_slice(extra);
        probes.extend([
            ip("0.0.0.0"),
            ip("255.255.255.255"),
            ip("::"),
            ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
        ]);
        probes
    }

    fn distinct_prefixes(routes: &[(IpNet, u64)]) -> usize {
        let mut nets: Vec<IpNet> = routes.iter().map(|&(net, _)| net.trunc()).collect();
        nets.sort();
        nets.dedup();
        nets.len()
    }

    fn assert_matches_model(routes: &[(IpNet, u64)], extra: &[IpAddr]) {
        let table = RouteTable::build(routes.iter().copied());
        assert_eq!(table.len(), distinct_prefixes(routes));
        assert_eq!(table.is_empty(), routes.is_empty());
        for addr in probes(routes, extra) {
            assert_eq!(table.lookup(addr), model(routes, addr), "lookup {addr}");
        }
    }

    #[test]
    fn empty_table_finds_nothing() {
        let tables = [
            RouteTable::<u64>::empty(),
            RouteTable::default(),
            RouteTable::build([]),
        ];
        for table in &tables {
            assert_eq!(table.len(), 0);
            assert!(table.is_empty());
            assert_lookups(
                table,
                &[
                    ("0.0.0.0", None),
                    ("10.1.2.3", None),
                    ("255.255.255.255", None),
                    ("::", None),
                    ("2001:db8::1", None),
                    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
                ],
            );
        }
    }

    #[test]
    fn default_route_covers_its_family_only() {
        let v4 = table(&[("0.0.0.0/0", 1)]);
        assert_lookups(
            &v4,
            &[
                ("0.0.0.0", Some(1)),
                ("127.0.0.1", Some(1)),
                ("255.255.255.255", Some(1)),
                ("::", None),
                ("::ffff:10.0.0.1", None),
            ],
        );
        let v6 = table(&[("::/0", 2)]);
        assert_lookups(
            &v6,
            &[
                ("::", Some(2)),
                ("fd00::1", Some(2)),
                ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(2)),
                ("0.0.0.0", None),
                ("255.255.255.255", None),
            ],
        );
    }

    #[test]
    fn host_routes_match_one_address() {
        let t = table(&[("192.0.2.7/32", 1), ("2001:db8::7/128", 2)]);
        assert_eq!(t.len(), 2);
        assert_lookups(
            &t,
            &[
                ("192.0.2.6", None),
                ("192.0.2.7", Some(1)),
                ("192.0.2.8", None),
                ("2001:db8::6", None),
                ("2001:db8::7", Some(2)),
                ("2001:db8::8", None),
            ],
        );
    }

    #[test]
    fn more_specific_prefix_wins() {
        let t = table(&[
            ("10.1.2.3/32", 4),
            ("10.0.0.0/8", 1),
            ("10.1.2.0/24", 3),
            ("10.1.0.0/16", 2),
        ]);
        assert_lookups(
            &t,
            &[
                ("9.255.255.255", None),
                ("10.0.0.0", Some(1)),
                ("10.1.0.0", Some(2)),
                ("10.1.2.0", Some(3)),
                ("10.1.2.2", Some(3)),
                ("10.1.2.3", Some(4)),
                ("10.1.2.4", Some(3)),
                ("10.1.2.255", Some(3)),
                ("10.1.3.0", Some(2)),
                ("10.1.255.255", Some(2)),
                ("10.2.0.0", Some(1)),
                ("10.255.255.255", Some(1)),
                ("11.0.0.0", None),
            ],
        );
        let t = table(&[
            ("fd00::/8", 1),
            ("fd00:1::/32", 2),
            ("fd00:1:2::/48", 3),
            ("fd00:1:2::3/128", 4),
        ]);
        assert_lookups(
            &t,
            &[
                ("fcff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
                ("fd00::", Some(1)),
                ("fd00:1::", Some(2)),
                ("fd00:1:2::2", Some(3)),
                ("fd00:1:2::3", Some(4)),
                ("fd00:1:2::4", Some(3)),
                ("fd00:1:2:ffff:ffff:ffff:ffff:ffff", Some(3)),
                ("fd00:1:3::", Some(2)),
                ("fd00:2::", Some(1)),
                ("fe00::", None),
            ],
        );
    }

    #[test]
    fn adjacent_prefixes_meet_exactly() {
        let t = table(&[
            ("10.0.0.0/24", 1),
            ("10.0.1.0/24", 2),
            ("10.0.2.0/23", 2),
            ("10.0.4.0/24", 1),
        ]);
        assert_eq!(t.len(), 4);
        assert_lookups(
            &t,
            &[
                ("9.255.255.255", None),
                ("10.0.0.255", Some(1)),
                ("10.0.1.0", Some(2)),
                ("10.0.3.255", Some(2)),
                ("10.0.4.0", Some(1)),
                ("10.0.4.255", Some(1)),
                ("10.0.5.0", None),
            ],
        );
        let t = table(&[("2001:db8::/64", 1), ("2001:db8:0:1::/64", 2)]);
        assert_lookups(
            &t,
            &[
                ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", None),
                ("2001:db8::ffff:ffff:ffff:ffff", Some(1)),
                ("2001:db8:0:1::", Some(2)),
                ("2001:db8:0:1:ffff:ffff:ffff:ffff", Some(2)),
                ("2001:db8:0:2::", None),
            ],
        );
    }

    #[test]
    fn top_of_the_address_space() {
        let t = table(&[
            ("128.0.0.0/1", 3),
            ("255.255.255.0/24", 2),
            ("255.255.255.255/32", 1),
            ("8000::/1", 6),
            ("ffff::/16", 5),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", 4),
        ]);
        assert_lookups(
            &t,
            &[
                ("127.255.255.255", None),
                ("128.0.0.0", Some(3)),
                ("255.255.254.255", Some(3)),
                ("255.255.255.254", Some(2)),
                ("255.255.255.255", Some(1)),
                ("7fff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
                ("8000::", Some(6)),
                ("fffe:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(6)),
                ("ffff::", Some(5)),
                ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe", Some(5)),
                ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(4)),
            ],
        );
    }

    #[test]
    fn bottom_of_the_address_space() {
        let t = table(&[
            ("0.0.0.0/32", 1),
            ("0.0.0.0/8", 2),
            ("::/128", 3),
            ("::/16", 4),
        ]);
        assert_lookups(
            &t,
            &[
                ("0.0.0.0", Some(1)),
                ("0.0.0.1", Some(2)),
                ("0.255.255.255", Some(2)),
                ("1.0.0.0", None),
                ("::", Some(3)),
                ("::1", Some(4)),
                ("0:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(4)),
                ("1::", None),
            ],
        );
    }

    #[test]
    fn duplicate_prefix_keeps_the_last_value() {
        let t = table(&[
            ("10.0.0.0/8", 1),
            ("10.0.0.0/8", 2),
            ("10.9.9.9/8", 3),
            ("fd00::/8", 4),
            ("fd12::1/8", 5),
        ]);
        assert_eq!(t.len(), 2);
        assert_lookups(&t, &[("10.1.1.1", Some(3)), ("fd99::", Some(5))]);
        let t = table(&[("10.9.9.9/8", 3), ("10.0.0.0/8", 1)]);
        assert_lookups(&t, &[("10.1.1.1", Some(1))]);
    }

    #[test]
    fn host_bits_are_ignored() {
        let t = table(&[("10.1.2.3/8", 1), ("2001:db8::1/32", 2)]);
        assert_lookups(
            &t,
            &[
                ("10.0.0.0", Some(1)),
                ("10.255.255.255", Some(1)),
                ("11.0.0.0", None),
                ("2001:db8::", Some(2)),
                ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", Some(2)),
                ("2001:db9::", None),
            ],
        );
    }

    #[test]
    fn families_are_separate_in_one_build() {
        let t = table(&[
            ("10.0.0.0/8", 1),
            ("::ffff:0:0/96", 2),
            ("fd00::/8", 3),
            ("0.0.0.0/0", 4),
        ]);
        assert_eq!(t.len(), 4);
        assert_lookups(
            &t,
            &[
                ("10.0.0.1", Some(1)),
                ("11.0.0.1", Some(4)),
                ("::ffff:11.0.0.1", Some(2)),
                ("fd00::1", Some(3)),
                ("::1", None),
            ],
        );
        assert_eq!(t.lookup_v4("10.0.0.1".parse().expect("parses")), Some(1));
        assert_eq!(t.lookup_v6("fd00::1".parse().expect("parses")), Some(3));
    }

    #[test]
    fn dense_block_and_deep_tree() {
        // Every /24 and a host route in each: long searches inside one IPv4
        // index block, and several levels in the IPv6 tree.
        let mut routes = Vec::new();
        for i in 0u32..256 {
            let v4 = Ipv4Addr::from(0x0a00_0000 | i << 8);
            let v6 = Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i) << 64);
            routes.push((
                IpNet::V4(Ipv4Net::new(v4, 24).expect("valid")),
                u64::from(i),
            ));
            routes.push((IpNet::V4(Ipv4Net::new(v4, 32).expect("valid")), 1000));
            routes.push((
                IpNet::V6(Ipv6Net::new(v6, 64).expect("valid")),
                u64::from(i),
            ));
            routes.push((IpNet::V6(Ipv6Net::new(v6, 128).expect("valid")), 1000));
        }
        assert_matches_model(&routes, &[]);
    }

    #[test]
    fn host_route_at_the_end_of_its_enclosing_prefix() {
        let t = table(&[
            ("10.0.0.0/24", 1),
            ("10.0.0.255/32", 2),
            ("fd00::/64", 3),
            ("fd00::ffff:ffff:ffff:ffff/128", 4),
        ]);
        assert_lookups(
            &t,
            &[
                ("10.0.0.254", Some(1)),
                ("10.0.0.255", Some(2)),
                ("10.0.1.0", None),
                ("fd00::ffff:ffff:ffff:fffe", Some(3)),
                ("fd00::ffff:ffff:ffff:ffff", Some(4)),
                ("fd00:0:0:1::", None),
            ],
        );
    }

    #[test]
    fn neighbours_with_one_value_cost_no_more_than_their_union() {
        let split = RouteTable::<u64>::build((0u32..256).flat_map(|i| {
            let v4 = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | i << 8), 24);
            let v6 = Ipv6Net::new(Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i) << 64), 64);
            [
                (IpNet::V4(v4.expect("valid")), 7),
                (IpNet::V6(v6.expect("valid")), 7),
            ]
        }));
        let union = table(&[("10.0.0.0/16", 7), ("fd00::/56", 7)]);
        assert_eq!(split.len(), 512);
        assert_eq!(split.heap_bytes(), union.heap_bytes());
    }

    #[test]
    fn table_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RouteTable<u64>>();
    }

    /// Ways to derive a pool address from the pool's base address.
    #[derive(Clone, Copy, Debug)]
    enum Tweak {
        FlipLow(u64),
        FlipBit(u32),
        /// Sets the low bits, giving the last address of a prefix of the base.
        SetLow(u32),
        /// Clears the low bits, giving the first address of a prefix of the base.
        ClearLow(u32),
        Replace(u128),
    }

    fn tweak(width: u32) -> impl Strategy<Value = Tweak> {
        prop_oneof![
            any::<u64>().prop_map(Tweak::FlipLow),
            (0..width).prop_map(Tweak::FlipBit),
            (0..=width).prop_map(Tweak::SetLow),
            (0..=width).prop_map(Tweak::ClearLow),
            any::<u128>().prop_map(Tweak::Replace),
        ]
    }

    /// Addresses clustered around one base (all within `width` bits), so
    /// prefixes drawn from them nest, share edges and crowd one IPv4 index
    /// block.
    fn pool(width: u32) -> impl Strategy<Value = Vec<u128>> {
        let all = u128::MAX >> (128 - width);
        (any::<u128>(), prop::collection::vec(tweak(width), 1..8)).prop_map(
            move |(base, tweaks)| {
                let base = base & all;
                let mut pool = vec![0, all, base];
                pool.extend(tweaks.into_iter().map(|tweak| {
                    let low = |bits: u32| u128::MAX.checked_shr(128 - bits).unwrap_or(0);
                    let addr = match tweak {
                        // Only the low 16 bits, to stay in the base's IPv4 block.
                        Tweak::FlipLow(r) => base ^ u128::from(r & 0xffff),
                        Tweak::FlipBit(bit) => base ^ 1 << bit,
                        Tweak::SetLow(bits) => base | low(bits),
                        Tweak::ClearLow(bits) => base & !low(bits),
                        Tweak::Replace(r) => r,
                    };
                    addr & all
                }));
                pool
            },
        )
    }

    /// Few distinct values, so neighbouring intervals often share one and
    /// duplicates often disagree.
    fn value() -> impl Strategy<Value = u64> {
        0u64..4
    }

    fn v4_routes(max: usize) -> impl Strategy<Value = Vec<(IpNet, u64)>> {
        pool(32).prop_flat_map(move |pool| {
            let route = (select(pool), 0u8..=32, value()).prop_map(|(addr, len, value)| {
                let addr = u32::try_from(addr).expect("pool(32) stays within 32 bits");
                let net = Ipv4Net::new(addr.into(), len).expect("length in range");
                (IpNet::V4(net), value)
            });
            prop::collection::vec(route, 0..max)
        })
    }

    fn v6_routes(max: usize) -> impl Strategy<Value = Vec<(IpNet, u64)>> {
        pool(128).prop_flat_map(move |pool| {
            let route = (select(pool), 0u8..=128, value()).prop_map(|(addr, len, value)| {
                let net = Ipv6Net::new(addr.into(), len).expect("length in range");
                (IpNet::V6(net), value)
            });
            prop::collection::vec(route, 0..max)
        })
    }

    fn mixed_routes(max: usize) -> impl Strategy<Value = Vec<(IpNet, u64)>> {
        (v4_routes(max), v6_routes(max)).prop_flat_map(|(v4, v6)| {
            Just(v4.into_iter().chain(v6).collect::<Vec<_>>()).prop_shuffle()
        })
    }

    fn addrs() -> impl Strategy<Value = Vec<IpAddr>> {
        let addr = prop_oneof![
            any::<u32>().prop_map(|a| IpAddr::V4(a.into())),
            any::<u128>().prop_map(|a| IpAddr::V6(a.into())),
        ];
        prop::collection::vec(addr, 0..16)
    }

    proptest! {
        #[test]
        fn v4_lookups_match_model(routes in v4_routes(48), extra in addrs()) {
            assert_matches_model(&routes, &extra);
        }

        #[test]
        fn v6_lookups_match_model(routes in v6_routes(48), extra in addrs()) {
            assert_matches_model(&routes, &extra);
        }

        #[test]
        fn mixed_lookups_match_model(routes in mixed_routes(24), extra in addrs()) {
            assert_matches_model(&routes, &extra);
        }

        #[test]
        fn values_are_what_lookups_can_return(routes in mixed_routes(24), extra in addrs()) {
            let table = RouteTable::build(routes.iter().copied());
            let values: std::collections::HashSet<_> = table.values().collect();
            for addr in probes(&routes, &extra) {
                if let Some(v) = table.lookup(addr) {
                    prop_assert!(values.contains(&v), "{} looks up to {:?}, not listed", addr, v);
                }
            }
            for v in &values {
                prop_assert!(routes.iter().any(|(_, r)| r == v), "{:?} is in no route", v);
            }
        }

        #[test]
        fn removing_a_prefix_changes_what_model_says(
            routes in mixed_routes(24),
            pick in any::<Index>(),
            extra in addrs(),
        ) {
            prop_assume!(!routes.is_empty());
            let removed = routes[pick.index(routes.len())].0.trunc();
            let kept: Vec<_> = routes.iter().copied().filter(|(net, _)| net.trunc() != removed).collect();
            let before = RouteTable::build(routes.iter().copied());
            let after = RouteTable::build(kept.iter().copied());
            prop_assert_eq!(after.len() + 1, before.len());
            for addr in probes(&routes, &extra) {
                let changed = before.lookup(addr) != after.lookup(addr);
                let model_changed = model(&routes, addr) != model(&kept, addr);
                prop_assert_eq!(changed, model_changed, "lookup {}", addr);
                prop_assert_eq!(after.lookup(addr), model(&kept, addr), "lookup {}", addr);
                if changed {
                    prop_assert!(covers(removed, addr), "{} changed outside {}", addr, removed);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]

        #[test]
        fn large_tables_match_model(v4 in v4_routes(600), v6 in v6_routes(600), extra in addrs()) {
            assert_matches_model(&v4.into_iter().chain(v6).collect::<Vec<_>>(), &extra);
        }
    }
}
