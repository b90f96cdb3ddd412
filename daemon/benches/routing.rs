//! Longest-prefix-match lookups: [`RouteTable`] against `ip_network_table`
//! (the table boringtun's own device uses) on the same prefixes and the same
//! addresses, and `RouteTable` read through `arc_swap::Cache` while another
//! thread keeps publishing new snapshots.
//!
//! Every measured iteration looks up [`ADDRS`] addresses, so divan's item
//! rate is lookups per second. Prefixes and addresses come from a seeded
//! generator: the same on every run and for both tables. Half the addresses
//! lie inside a stored prefix; the other half are random (IPv4: anywhere,
//! IPv6: anywhere in fd00::/8 with the prefixes), nearly all misses. So both
//! the hit and the miss paths are timed.

use std::hint::black_box;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use divan::counter::ItemsCount;
use divan::Bencher;
use ip_network::{Ipv4Network, Ipv6Network};
use ip_network_table::IpNetworkTable;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use vpcgated::core::RouteTable;

fn main() {
    // Half a second per benchmark steadies the nanosecond-scale lookups on a
    // shared machine; `--min-time` on the command line still overrides it.
    divan::Divan::default()
        .min_time(Duration::from_millis(500))
        .config_with_args()
        .main();
    let rates = WRITER_RATES
        .lock()
        .expect("a benchmark panicked holding WRITER_RATES");
    for (n, rate) in rates.iter() {
        println!(
            "cached_lookup_v4/with_writer/{n}: the writer published {rate:.0} tables per second"
        );
    }
}

/// Tables per second the writer thread managed, per table size, printed after
/// divan's table so that it does not break it up.
static WRITER_RATES: Mutex<Vec<(usize, f64)>> = Mutex::new(Vec::new());

/// Table sizes: a small office, a large one, and the UAPI stress test's
/// order of magnitude (one peer with ~130k allowed IPs).
const SIZES: [usize; 3] = [10, 1_000, 100_000];

/// Addresses per iteration: enough to make divan's per-iteration overhead
/// negligible, few enough (16 KiB of IPv6) to stay in L1/L2 like a burst of
/// packet headers would.
const ADDRS: usize = 1_024;

/// splitmix64: a tiny seeded generator, so the data needs no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn u128(&mut self) -> u128 {
        (u128::from(self.next()) << 64) | u128::from(self.next())
    }
}

/// The prefix lengths of a VPN's allowed IPs: mostly single hosts, some
/// subnets behind routers, a few large ranges.
fn v4_len(rng: &mut Rng) -> u8 {
    match rng.below(100) {
        0..=59 => 32,
        60..=84 => 24,
        85..=94 => 20,
        _ => 16,
    }
}

fn v6_len(rng: &mut Rng) -> u8 {
    match rng.below(100) {
        0..=59 => 128,
        60..=84 => 64,
        85..=94 => 56,
        _ => 48,
    }
}

/// All IPv6 prefixes sit in fd00::/8, as unique local addresses do.
const ULA: u128 = 0xfd << 120;
const ULA_HOST_MASK: u128 = u128::MAX >> 8;

struct V4Data {
    routes: Vec<(Ipv4Net, u64)>,
    addrs: Vec<Ipv4Addr>,
}

struct V6Data {
    routes: Vec<(Ipv6Net, u64)>,
    addrs: Vec<Ipv6Addr>,
}

fn v4_data(n: usize) -> V4Data {
    let mut rng = Rng(0x5eed_0004 ^ n as u64);
    let routes: Vec<(Ipv4Net, u64)> = (0..n)
        .map(|i| {
            let net = Ipv4Net::new(Ipv4Addr::from(rng.next() as u32), v4_len(&mut rng))
                .expect("prefix lengths are at most 32")
                .trunc();
            (net, i as u64)
        })
        .collect();
    let addrs = (0..ADDRS)
        .map(|i| {
            if i % 2 == 0 {
                let (net, _) = routes[rng.below(n as u64) as usize];
                let host_bits = !u32::from(net.netmask());
                Ipv4Addr::from(u32::from(net.network()) | (rng.next() as u32 & host_bits))
            } else {
                Ipv4Addr::from(rng.next() as u32)
            }
        })
        .collect();
    V4Data { routes, addrs }
}

fn v6_data(n: usize) -> V6Data {
    let mut rng = Rng(0x5eed_0006 ^ n as u64);
    let routes: Vec<(Ipv6Net, u64)> = (0..n)
        .map(|i| {
            let addr = ULA | (rng.u128() & ULA_HOST_MASK);
            let net = Ipv6Net::new(Ipv6Addr::from(addr), v6_len(&mut rng))
                .expect("prefix lengths are at most 128")
                .trunc();
            (net, i as u64)
        })
        .collect();
    let addrs = (0..ADDRS)
        .map(|i| {
            if i % 2 == 0 {
                let (net, _) = routes[rng.below(n as u64) as usize];
                let host_bits = !u128::from(net.netmask());
                Ipv6Addr::from(u128::from(net.network()) | (rng.u128() & host_bits))
            } else {
                // Misses that still share the prefixes' /8, so the lookup
                // has to descend rather than fail on the first bits.
                Ipv6Addr::from(ULA | (rng.u128() & ULA_HOST_MASK))
            }
        })
        .collect();
    V6Data { routes, addrs }
}

fn route_table_v4(data: &V4Data) -> RouteTable<u64> {
    RouteTable::build(data.routes.iter().map(|&(net, v)| (IpNet::V4(net), v)))
}

fn route_table_v6(data: &V6Data) -> RouteTable<u64> {
    RouteTable::build(data.routes.iter().map(|&(net, v)| (IpNet::V6(net), v)))
}

fn network_table_v4(data: &V4Data) -> IpNetworkTable<u64> {
    let mut table = IpNetworkTable::new();
    for &(net, v) in &data.routes {
        let net = Ipv4Network::new(net.network(), net.prefix_len())
            .expect("ipnet prefixes are valid ip_network prefixes");
        table.insert(net, v);
    }
    table
}

fn network_table_v6(data: &V6Data) -> IpNetworkTable<u64> {
    let mut table = IpNetworkTable::new();
    for &(net, v) in &data.routes {
        let net = Ipv6Network::new(net.network(), net.prefix_len())
            .expect("ipnet prefixes are valid ip_network prefixes");
        table.insert(net, v);
    }
    table
}

/// Both tables must give the same answer for every address, or the timing
/// comparison means nothing; and the addresses must include hits and misses.
fn check_agree<A: Copy + std::fmt::Debug>(
    addrs: &[A],
    ours: impl Fn(A) -> Option<u64>,
    theirs: impl Fn(A) -> Option<u64>,
) {
    let mut hits = 0;
    for &a in addrs {
        let (x, y) = (ours(a), theirs(a));
        assert_eq!(x, y, "RouteTable and ip_network_table disagree on {a:?}");
        hits += usize::from(x.is_some());
    }
    assert!(
        hits > 0 && hits < addrs.len(),
        "want both hits and misses, got {hits} hits"
    );
}

#[divan::bench_group]
mod lookup_v4 {
    use super::*;

    #[divan::bench(args = SIZES)]
    fn route_table(bencher: Bencher, n: usize) {
        let data = v4_data(n);
        let table = route_table_v4(&data);
        let other = network_table_v4(&data);
        check_agree(
            &data.addrs,
            |a| table.lookup_v4(a),
            |a| other.longest_match_ipv4(a).map(|(_, v)| *v),
        );
        bencher.counter(ItemsCount::new(ADDRS)).bench_local(|| {
            let mut sum = 0u64;
            for &a in &data.addrs {
                sum = sum.wrapping_add(table.lookup_v4(black_box(a)).unwrap_or(1));
            }
            sum
        });
    }

    #[divan::bench(args = SIZES)]
    fn ip_network_table(bencher: Bencher, n: usize) {
        let data = v4_data(n);
        let table = network_table_v4(&data);
        bencher.counter(ItemsCount::new(ADDRS)).bench_local(|| {
            let mut sum = 0u64;
            for &a in &data.addrs {
                let hit = table.longest_match_ipv4(black_box(a)).map(|(_, v)| *v);
                sum = sum.wrapping_add(hit.unwrap_or(1));
            }
            sum
        });
    }
}

#[divan::bench_group]
mod lookup_v6 {
    use super::*;

    #[divan::bench(args = SIZES)]
    fn route_table(bencher: Bencher, n: usize) {
        let data = v6_data(n);
        let table = route_table_v6(&data);
        let other = network_table_v6(&data);
        check_agree(
            &data.addrs,
            |a| table.lookup_v6(a),
            |a| other.longest_match_ipv6(a).map(|(_, v)| *v),
        );
        bencher.counter(ItemsCount::new(ADDRS)).bench_local(|| {
            let mut sum = 0u64;
            for &a in &data.addrs {
                sum = sum.wrapping_add(table.lookup_v6(black_box(a)).unwrap_or(1));
            }
            sum
        });
    }

    #[divan::bench(args = SIZES)]
    fn ip_network_table(bencher: Bencher, n: usize) {
        let data = v6_data(n);
        let table = network_table_v6(&data);
        bencher.counter(ItemsCount::new(ADDRS)).bench_local(|| {
            let mut sum = 0u64;
            for &a in &data.addrs {
                let hit = table.longest_match_ipv6(black_box(a)).map(|(_, v)| *v);
                sum = sum.wrapping_add(hit.unwrap_or(1));
            }
            sum
        });
    }
}

/// Building a snapshot: what a writer pays per change, and what bounds how
/// often the writer below can publish.
#[divan::bench(args = SIZES)]
fn build_v4(bencher: Bencher, n: usize) {
    let data = v4_data(n);
    bencher
        .counter(ItemsCount::new(n))
        .bench_local(|| route_table_v4(black_box(&data)));
}

/// IPv4 lookups the way the data path does them: one `Cache::load` per
/// packet, then the lookup. With a writer, another thread rebuilds the
/// same table and `store`s it as fast as it can, so nearly every load finds a
/// new snapshot; the reader also frees the old snapshots it let go of.
#[divan::bench_group]
mod cached_lookup_v4 {
    use super::*;

    fn run(bencher: Bencher, n: usize, with_writer: bool) {
        let data = Arc::new(v4_data(n));
        let shared = Arc::new(ArcSwap::from_pointee(route_table_v4(&data)));
        let stop = Arc::new(AtomicBool::new(false));
        let published = Arc::new(AtomicU64::new(0));
        let writer = with_writer.then(|| {
            let (data, shared) = (Arc::clone(&data), Arc::clone(&shared));
            let (stop, published) = (Arc::clone(&stop), Arc::clone(&published));
            std::thread::spawn(move || {
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    shared.store(Arc::new(route_table_v4(&data)));
                    published.fetch_add(1, Ordering::Relaxed);
                }
                published.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
            })
        });
        // Time nothing until the writer is actually replacing tables.
        while with_writer && published.load(Ordering::Relaxed) < 2 {
            std::thread::yield_now();
        }
        let mut cache = arc_swap::Cache::new(Arc::clone(&shared));
        bencher.counter(ItemsCount::new(ADDRS)).bench_local(|| {
            let mut sum = 0u64;
            for &a in &data.addrs {
                let table = cache.load();
                sum = sum.wrapping_add(table.lookup_v4(black_box(a)).unwrap_or(1));
            }
            sum
        });
        stop.store(true, Ordering::Relaxed);
        if let Some(writer) = writer {
            let rate = writer.join().expect("the writer thread panicked");
            WRITER_RATES
                .lock()
                .expect("a benchmark panicked holding WRITER_RATES")
                .push((n, rate));
        }
    }

    #[divan::bench(args = SIZES)]
    fn no_writer(bencher: Bencher, n: usize) {
        run(bencher, n, false);
    }

    /// Longer than the others, so the writer replaces even the 100,000-prefix
    /// table (~10 ms to build) a few hundred times while the reader runs.
    #[divan::bench(args = SIZES, min_time = 2)]
    fn with_writer(bencher: Bencher, n: usize) {
        run(bencher, n, true);
    }
}
