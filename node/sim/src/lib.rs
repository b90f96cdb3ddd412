//! Two [`Node`]s on an in-memory network and a clock the test moves.
//!
//! boringtun is built here with its `mock-instant` feature, so every clock
//! read inside it (session and handshake timers, the cookie rate limiter,
//! `time_since_last_handshake`) reads `mock_instant::MockClock`, which is
//! per thread. The node itself never reads a clock: the simulation hands it
//! `start + MockClock::time()` and a wall clock that moves with it. What
//! still reads the real clock inside boringtun with the feature on: the
//! wall-clock base of the TAI64N timestamp in handshake initiations
//! (`SystemTime::now()` once per `Tunn`), which only orders initiations and
//! is never a timer.
//!
//! A minute of WireGuard's timers runs in a few milliseconds, so rekeying,
//! keepalives and handshake retries are tested exactly, to the timer tick.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use boringtun::x25519::{PublicKey, StaticSecret};
use mock_instant::MockClock;
use vpcgate_node::testing::MemoryWire;
use vpcgate_node::{
    Change, DropCounters, Node, PeerHandle, PeerSpec, PeerStats, RouteTable, Routes, SharedRoutes,
    BUF_SIZE, TIMER_TICK,
};

/// The handle each side gives the other.
const PEER: PeerHandle = (1 << 32) | 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

/// A WireGuard message, by its type byte and, for data, its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Initiation,
    Response,
    Cookie,
    /// A data message with no payload.
    Keepalive,
    /// A data message, with the receiver index that names its session.
    Data {
        session: u32,
    },
    Other,
}

impl Kind {
    fn of(datagram: &[u8]) -> Kind {
        match datagram.first() {
            Some(1) => Kind::Initiation,
            Some(2) => Kind::Response,
            Some(3) => Kind::Cookie,
            Some(4) if datagram.len() == 32 => Kind::Keepalive,
            Some(4) => match datagram.get(4..8).and_then(|b| <[u8; 4]>::try_from(b).ok()) {
                Some(index) => Kind::Data {
                    session: u32::from_le_bytes(index),
                },
                None => Kind::Other,
            },
            _ => Kind::Other,
        }
    }
}

/// One datagram put on the wire.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// Simulated time since the start.
    pub at: Duration,
    pub from: Side,
    pub kind: Kind,
    pub delivered: bool,
}

pub struct Host {
    node: Node,
    table: SharedRoutes,
    addr: SocketAddr,
    tunnel: [u8; 4],
    wire: MemoryWire,
    buf: Vec<u8>,
}

impl Host {
    /// Packets this host's TUN received.
    pub fn received(&self) -> &[Vec<u8>] {
        &self.wire.tun
    }
}

/// Two hosts: A (100.64.0.1, which knows B's endpoint and may keep the
/// tunnel alive) and B (100.64.0.2, which learns A's from its first
/// handshake).
pub struct Sim {
    pub a: Host,
    pub b: Host,
    start: Instant,
    wall: SystemTime,
    /// Every datagram sent, in order.
    pub log: Vec<Sent>,
    /// While set, the network loses every datagram.
    pub cut: bool,
}

impl Sim {
    /// A and B with `keepalive` seconds of persistent keepalive on A's side
    /// (0: none). The clock starts at zero.
    pub fn new(keepalive: u16) -> Sim {
        MockClock::set_time(Duration::ZERO);
        let start = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let key_a = StaticSecret::random_from_rng(rand_core::OsRng);
        let key_b = StaticSecret::random_from_rng(rand_core::OsRng);
        let public_a = PublicKey::from(&key_a).to_bytes();
        let public_b = PublicKey::from(&key_b).to_bytes();
        let addr_a: SocketAddr = "198.18.0.1:51820".parse().expect("address");
        let addr_b: SocketAddr = "198.18.0.2:51820".parse().expect("address");
        let a = host(start, key_a, addr_a, [100, 64, 0, 1]);
        let b = host(start, key_b, addr_b, [100, 64, 0, 2]);
        let mut sim = Sim {
            a,
            b,
            start,
            wall,
            log: Vec::new(),
            cut: false,
        };
        peer(
            &mut sim.a,
            public_b,
            Some(addr_b),
            keepalive,
            "100.64.0.2/32",
        );
        peer(&mut sim.b, public_a, None, 0, "100.64.0.1/32");
        sim
    }

    pub fn elapsed(&self) -> Duration {
        MockClock::time()
    }

    fn now(&self) -> Instant {
        self.start + MockClock::time()
    }

    fn host(&mut self, side: Side) -> (&mut Host, &mut Host) {
        match side {
            Side::A => (&mut self.a, &mut self.b),
            Side::B => (&mut self.b, &mut self.a),
        }
    }

    /// `side` sends one UDP packet through the tunnel to the other's tunnel
    /// address, and the network delivers what follows from it.
    pub fn send(&mut self, side: Side, payload: &[u8]) {
        let now = self.now();
        let (from, to) = self.host(side);
        let mut packet = ipv4_udp(from.tunnel, to.tunnel, payload);
        let len = packet.len();
        packet.resize(len.next_multiple_of(16), 0);
        from.node
            .handle_tun_packet(&mut packet, len, now, &mut from.wire);
        self.deliver();
    }

    /// Runs both hosts' timers every tick for `span`, delivering whatever
    /// they send.
    pub fn run_for(&mut self, span: Duration) {
        let end = MockClock::time() + span;
        while MockClock::time() < end {
            MockClock::advance(TIMER_TICK);
            let now = self.now();
            let wall = self.wall + MockClock::time();
            for host in [&mut self.a, &mut self.b] {
                host.node
                    .handle_timers(now, wall, &mut host.buf, &mut host.wire);
            }
            self.deliver();
        }
    }

    /// Delivers datagrams, instantly, until none are in flight.
    fn deliver(&mut self) {
        for _ in 0..100 {
            let mut in_flight = Vec::new();
            for (side, host) in [(Side::A, &mut self.a), (Side::B, &mut self.b)] {
                for (to, datagram) in host.wire.sent.drain(..) {
                    in_flight.push((side, host.addr, to, datagram));
                }
            }
            if in_flight.is_empty() {
                return;
            }
            let now = self.now();
            for (side, from, to, datagram) in in_flight {
                self.log.push(Sent {
                    at: MockClock::time(),
                    from: side,
                    kind: Kind::of(&datagram),
                    delivered: !self.cut,
                });
                if self.cut {
                    continue;
                }
                let (_, receiver) = self.host(side);
                assert_eq!(receiver.addr, to, "sent to an address nobody has");
                receiver.node.handle_datagram(
                    from.into(),
                    &datagram,
                    &mut receiver.buf,
                    now,
                    &mut receiver.wire,
                );
            }
        }
        panic!("the simulated network did not settle");
    }

    /// When `from` sent messages of this kind (data of any session for
    /// `Kind::Data { .. }`), in simulated time.
    pub fn times(&self, from: Side, kind: fn(Kind) -> bool) -> Vec<Duration> {
        self.log
            .iter()
            .filter(|s| s.from == from && kind(s.kind))
            .map(|s| s.at)
            .collect()
    }
}

fn host(start: Instant, key: StaticSecret, addr: SocketAddr, tunnel: [u8; 4]) -> Host {
    let table: SharedRoutes = Arc::new(ArcSwap::from_pointee(Routes::default()));
    let mut node = Node::new(table.clone(), Arc::new(DropCounters::default()), start);
    node.apply(Change::SetPrivateKey(Some(key)));
    Host {
        node,
        table,
        addr,
        tunnel,
        wire: MemoryWire::default(),
        buf: vec![0; BUF_SIZE],
    }
}

fn peer(host: &mut Host, key: [u8; 32], endpoint: Option<SocketAddr>, keepalive: u16, ip: &str) {
    host.node.apply(Change::UpsertPeer(PeerSpec {
        handle: PEER,
        public_key: key,
        preshared_key: None,
        endpoint,
        persistent_keepalive: keepalive,
        route_source: None,
        stats: Arc::new(PeerStats::new(endpoint)),
    }));
    let net = |s: &str| s.parse::<ipnet::IpNet>().expect("cidr");
    let routes = Routes {
        peers: Arc::new(RouteTable::build([(net(ip), PEER)])),
        forward: Arc::new(RouteTable::build([(net("100.64.0.0/24"), ())])),
    };
    host.table.store(Arc::new(routes));
}

/// An IPv4/UDP packet with correct lengths (checksums are not checked by
/// anything on this path).
fn ipv4_udp(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let total = 28 + payload.len();
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&u16::try_from(total).expect("small").to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src);
    p[16..20].copy_from_slice(&dst);
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&9u16.to_be_bytes());
    p[24..26].copy_from_slice(
        &u16::try_from(8 + payload.len())
            .expect("small")
            .to_be_bytes(),
    );
    p.extend_from_slice(payload);
    p
}

#[cfg(test)]
mod tests;
