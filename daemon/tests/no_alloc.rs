//! The core's per-packet work allocates nothing. Two nodes exchange packets
//! through sinks with fixed buffers (as the data path's are); after the
//! handshake, a thousand round trips each way, with the MSS clamp on and
//! the forwarding scope checked, must not call the allocator once.
//!
//! A counting global allocator counts only the allocations of the thread
//! that turned counting on, and only while it is on: the test harness's
//! own threads (its main thread collects results and may allocate at any
//! moment) are not the work under test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use boringtun::x25519::{PublicKey, StaticSecret};
use vpcgated::core::table::RouteTable;
use vpcgated::core::{
    Change, DropCounters, Endpoint, Node, PeerHandle, PeerSpec, PeerStats, Routes, SharedRoutes,
    Transmit, BUF_SIZE,
};

struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    // A const-initialised `Cell` needs neither allocation nor a destructor,
    // so reading it from inside the allocator cannot recurse.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn count() {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Allocations made by this thread while `work` runs.
fn allocations_in(work: impl FnOnce()) -> u64 {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    COUNTING.with(|c| c.set(true));
    work();
    COUNTING.with(|c| c.set(false));
    ALLOCATIONS.load(Ordering::Relaxed) - before
}

// SAFETY: every call is passed to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller upholds `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const SLOTS: usize = 8;

/// Holds up to [`SLOTS`] datagrams and packets in buffers made up front.
struct FixedSink {
    udp: Vec<[u8; 2048]>,
    udp_to: [Option<(Endpoint, usize)>; SLOTS],
    udp_count: usize,
    tun: Vec<[u8; 2048]>,
    tun_len: [usize; SLOTS],
    tun_count: usize,
}

impl FixedSink {
    fn new() -> FixedSink {
        FixedSink {
            udp: vec![[0; 2048]; SLOTS],
            udp_to: [None; SLOTS],
            udp_count: 0,
            tun: vec![[0; 2048]; SLOTS],
            tun_len: [0; SLOTS],
            tun_count: 0,
        }
    }
}

impl Transmit for FixedSink {
    fn udp_slot(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= 2048 && self.udp_count < SLOTS, "sink full");
        &mut self.udp[self.udp_count]
    }
    fn commit_udp(&mut self, to: Endpoint, len: usize) -> bool {
        self.udp_to[self.udp_count] = Some((to, len));
        self.udp_count += 1;
        true
    }
    fn tun_slot(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= 2048 && self.tun_count < SLOTS, "sink full");
        &mut self.tun[self.tun_count]
    }
    fn commit_tun(&mut self, len: usize) {
        self.tun_len[self.tun_count] = len;
        self.tun_count += 1;
    }
}

struct Host {
    node: Node,
    addr: SocketAddr,
    sink: FixedSink,
    scratch: Vec<u8>,
}

fn host(addr: &str, me: &StaticSecret, peer: PublicKey, peer_addr: &str, peer_ip: &str) -> Host {
    const PEER: PeerHandle = 1 << 32;
    let routes: SharedRoutes = Arc::new(ArcSwap::from_pointee(Routes {
        peers: Arc::new(RouteTable::build([(peer_ip.parse().expect("cidr"), PEER)])),
        forward: Arc::new(RouteTable::build([(
            "100.64.0.0/24".parse().expect("cidr"),
            (),
        )])),
    }));
    let mut node = Node::new(routes, Arc::new(DropCounters::default()), Instant::now());
    node.apply(Change::SetPrivateKey(Some(me.clone())));
    let endpoint = peer_addr.parse().expect("address");
    node.apply(Change::UpsertPeer(PeerSpec {
        handle: PEER,
        public_key: peer.to_bytes(),
        preshared_key: None,
        endpoint: Some(endpoint),
        persistent_keepalive: 0,
        route_source: None,
        stats: Arc::new(PeerStats::new(Some(endpoint))),
    }));
    node.apply(Change::SetMssClamp(1380, 1360));
    Host {
        node,
        addr: addr.parse().expect("address"),
        sink: FixedSink::new(),
        scratch: vec![0; BUF_SIZE],
    }
}

/// Moves every datagram `from` has queued to `to`; returns how many.
fn deliver(from: &mut Host, to: &mut Host, now: Instant) -> usize {
    let n = from.sink.udp_count;
    for i in 0..n {
        let Some((dest, len)) = from.sink.udp_to[i] else {
            continue;
        };
        assert_eq!(dest.remote, to.addr);
        to.node.handle_datagram(
            Endpoint {
                remote: from.addr,
                local: Some(to.addr.ip()),
            },
            &from.sink.udp[i][..len],
            &mut to.scratch,
            now,
            &mut to.sink,
        );
    }
    from.sink.udp_count = 0;
    n
}

/// An IPv4/UDP packet from `src` to `dst` with a 1,000-byte payload.
fn packet(src: [u8; 4], dst: [u8; 4]) -> [u8; 1028] {
    let mut p = [0u8; 1028];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&1028u16.to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p
}

#[test]
fn per_packet_work_does_not_allocate() {
    let (ka, kb) = (
        StaticSecret::random_from_rng(rand_core::OsRng),
        StaticSecret::random_from_rng(rand_core::OsRng),
    );
    let mut a = host(
        "198.18.0.1:51820",
        &ka,
        PublicKey::from(&kb),
        "198.18.0.2:51820",
        "100.64.0.2/32",
    );
    let mut b = host(
        "198.18.0.2:51820",
        &kb,
        PublicKey::from(&ka),
        "198.18.0.1:51820",
        "100.64.0.1/32",
    );
    let a_to_b = packet([100, 64, 0, 1], [100, 64, 0, 2]);
    let b_to_a = packet([100, 64, 0, 2], [100, 64, 0, 1]);

    // The handshake, and one packet each way, may allocate (session state);
    // counted, so a counter that never counts fails the test.
    let now = Instant::now();
    let setup = allocations_in(|| {
        let mut p = a_to_b;
        a.node.handle_tun_packet(&mut p, 1028, now, &mut a.sink);
        while deliver(&mut a, &mut b, now) + deliver(&mut b, &mut a, now) > 0 {}
        let mut p = b_to_a;
        b.node.handle_tun_packet(&mut p, 1028, now, &mut b.sink);
        while deliver(&mut b, &mut a, now) + deliver(&mut a, &mut b, now) > 0 {}
    });
    assert_eq!(b.sink.tun_count, 1, "a's first packet arrived at b");
    assert_eq!(a.sink.tun_count, 1, "b's first packet arrived at a");
    assert!(
        setup > 0,
        "the counting allocator must see the handshake's allocations"
    );

    let allocations = allocations_in(|| {
        for _ in 0..1000 {
            a.sink.tun_count = 0;
            b.sink.tun_count = 0;
            let mut p = a_to_b;
            a.node.handle_tun_packet(&mut p, 1028, now, &mut a.sink);
            deliver(&mut a, &mut b, now);
            let mut p = b_to_a;
            b.node.handle_tun_packet(&mut p, 1028, now, &mut b.sink);
            deliver(&mut b, &mut a, now);
            assert_eq!(b.sink.tun_count, 1);
            assert_eq!(a.sink.tun_count, 1);
        }
    });
    assert_eq!(
        b.sink.tun[0][..1028],
        a_to_b[..],
        "the last packet arrived intact"
    );
    assert_eq!(
        allocations, 0,
        "2,000 packets through encrypt, decrypt, cryptokey routing, the scope check and the MSS clamp allocated {allocations} times"
    );
}
