//! The data-path core: peers, cryptokey routing and WireGuard timers, with no I/O.
//!
//! [`Node`] owns every peer's boringtun [`Tunn`] and reads the routing table
//! snapshot that the control plane publishes. The shell feeds it packets from
//! the TUN, datagrams from UDP and timer ticks, and it answers through a
//! [`Transmit`] sink that the shell implements (the real sockets, or an
//! in-memory network in tests). The only clock reads are the ones boringtun
//! does internally for its own session timers; everything of ours takes `now`
//! from the caller.
//!
//! One thread owns a `Node`, so nothing here locks: the table is read through
//! an `arc_swap::Cache`, and statistics are plain atomic stores by their only
//! writer.

mod limiter;
mod messages;
pub mod mss;
pub mod packet;
pub mod routes_msg;
pub mod table;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use boringtun::noise::errors::WireGuardError;
use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use limiter::SourceLimiter;
pub use messages::{Change, Event};
use packet::IpPacket;
pub use table::RouteTable;

/// Identifies one configured peer: the low 32 bits are its slot, the high 32
/// bits a generation, so a table entry that outlives its peer never matches
/// the next peer placed in the same slot.
pub type PeerHandle = u64;

pub fn handle_slot(handle: PeerHandle) -> u32 {
    handle as u32
}

/// boringtun shifts the peer index left by 8 to form session indices, so a
/// slot must fit in 24 bits.
pub const MAX_PEERS: u32 = 1 << 24;

/// What the control plane publishes for the data path, replaced whole.
#[derive(Default)]
pub struct Routes {
    /// Cryptokey routing: every peer's allowed IPs.
    pub peers: Arc<RouteTable<PeerHandle>>,
    /// Where packets from peers may go: the tunnel networks and the
    /// advertised ranges. Anything else is dropped, even if a stale client
    /// config still routes it here.
    pub forward: Arc<RouteTable<()>>,
}

pub type SharedRoutes = Arc<ArcSwap<Routes>>;

/// Size of every scratch buffer handed to the core: the largest IP packet plus
/// WireGuard's 32 bytes of framing, rounded up.
pub const BUF_SIZE: usize = 65_536 + 64;

/// How often boringtun's timers run; boringtun's own device uses the same.
pub const TIMER_TICK: Duration = Duration::from_millis(250);

/// boringtun counts a pre-verified initiation twice (our mac1 check before the
/// peer lookup, then its own), so its under-load threshold is doubled.
const HANDSHAKES_PER_SECOND_BEFORE_COOKIES: u64 = 2 * 100;

/// The smallest slot worth asking for: a handshake initiation, the largest
/// message boringtun may write in place of a data packet it has to queue.
const MIN_UDP_SLOT: usize = 148;

/// Data messages add a 16-byte header and a 16-byte tag.
const DATA_OVERHEAD: usize = 32;

/// Where a peer is reached: its address, and the one of ours it last wrote
/// to. Replies leave from that local address, so a peer that picked one of
/// several addresses of ours never sees our end of the tunnel move. `None`
/// leaves the choice to the kernel, as for an endpoint set by configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub remote: SocketAddr,
    pub local: Option<IpAddr>,
}

impl From<SocketAddr> for Endpoint {
    fn from(remote: SocketAddr) -> Self {
        Endpoint {
            remote,
            local: None,
        }
    }
}

/// Where the core sends what it produces.
///
/// Packets are encrypted and decrypted straight into the sink's buffers:
/// the core asks for a slot, writes into it, and commits the bytes it
/// wrote. A sink is free to batch committed packets (UDP GSO, TUN GRO) until
/// its owner flushes it.
pub trait Transmit {
    /// Room for the next outgoing datagram, at least `len` bytes long.
    fn udp_slot(&mut self, len: usize) -> &mut [u8];
    /// Sends the first `len` bytes of the last slot to `to`, now or in a
    /// batch, from `to.local` if it is set. Returns false if no socket can
    /// reach `to`.
    fn commit_udp(&mut self, to: Endpoint, len: usize) -> bool;
    /// Room for the next packet to the TUN, at least `len` bytes long.
    /// Asking again before committing returns the same bytes.
    fn tun_slot(&mut self, len: usize) -> &mut [u8];
    /// Delivers the first `len` bytes of the last TUN slot.
    fn commit_tun(&mut self, len: usize);

    /// Sends a copy of `datagram`: for handshake messages, cookies and
    /// keepalives, which are built elsewhere.
    fn send_udp(&mut self, to: Endpoint, datagram: &[u8]) -> bool {
        let len = datagram.len();
        match self.udp_slot(len).get_mut(..len) {
            Some(slot) => slot.copy_from_slice(datagram),
            None => return false,
        }
        self.commit_udp(to, len)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No peer's allowed IPs cover the destination.
    NoRoute,
    /// The peer has no endpoint yet.
    NoEndpoint,
    /// The inner source is not an allowed IP of the peer that sent it.
    CryptokeyFilter,
    /// Not an IP packet, or not a WireGuard message.
    Malformed,
    /// A message for a peer we do not have.
    UnknownPeer,
    /// A handshake or cookie message that failed to verify.
    HandshakeFailed,
    /// A data message that failed to decrypt, or a replay.
    DecryptFailed,
    /// The socket refused a datagram.
    SendFailed,
    /// From a peer, to a destination outside the advertised ranges and the
    /// tunnel networks.
    NotAdvertised,
    /// A handshake initiation beyond its source address's share.
    RateLimited,
    /// A packet from the TUN that is UDP to the endpoint of the very peer it
    /// would be sent to: the endpoint is routed into the tunnel, and sending
    /// it would feed our own datagrams back to us.
    RoutingLoop,
}

impl DropReason {
    pub const ALL: [DropReason; 11] = [
        DropReason::NoRoute,
        DropReason::NoEndpoint,
        DropReason::CryptokeyFilter,
        DropReason::Malformed,
        DropReason::UnknownPeer,
        DropReason::HandshakeFailed,
        DropReason::DecryptFailed,
        DropReason::SendFailed,
        DropReason::NotAdvertised,
        DropReason::RateLimited,
        DropReason::RoutingLoop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoRoute => "no_route",
            DropReason::NoEndpoint => "no_endpoint",
            DropReason::CryptokeyFilter => "cryptokey_filter",
            DropReason::Malformed => "malformed",
            DropReason::UnknownPeer => "unknown_peer",
            DropReason::HandshakeFailed => "handshake_failed",
            DropReason::DecryptFailed => "decrypt_failed",
            DropReason::SendFailed => "send_failed",
            DropReason::NotAdvertised => "not_advertised",
            DropReason::RateLimited => "rate_limited",
            DropReason::RoutingLoop => "routing_loop",
        }
    }
}

/// Drop counters, readable from any thread.
#[derive(Debug, Default)]
pub struct DropCounters {
    counts: [AtomicU64; DropReason::ALL.len()],
}

impl DropCounters {
    fn add(&self, reason: DropReason) {
        self.add_n(reason, 1);
    }

    /// Counts `n` packets dropped at once, for the I/O shell's batches.
    pub fn add_n(&self, reason: DropReason, n: u64) {
        self.counts[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        self.counts[reason as usize].load(Ordering::Relaxed)
    }
}

/// A peer's live statistics, written by the data path once per tick and read
/// by the control plane.
#[derive(Debug, Default)]
pub struct PeerStats {
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
    /// Unix time of the last completed handshake in nanoseconds; 0 = never.
    last_handshake_ns: AtomicU64,
    /// Written only when the endpoint changes (roaming or configuration).
    endpoint: Mutex<Option<SocketAddr>>,
}

impl PeerStats {
    pub fn new(endpoint: Option<SocketAddr>) -> Self {
        PeerStats {
            endpoint: Mutex::new(endpoint),
            ..PeerStats::default()
        }
    }

    // Only the data-path thread writes the counters, so a load and a store
    // suffice: no locked read-modify-write per packet, and readers on other
    // threads always see a whole value.
    fn add_rx(&self, bytes: usize) {
        let now = self.rx_bytes.load(Ordering::Relaxed);
        self.rx_bytes.store(now + bytes as u64, Ordering::Relaxed);
    }

    fn add_tx(&self, bytes: usize) {
        let now = self.tx_bytes.load(Ordering::Relaxed);
        self.tx_bytes.store(now + bytes as u64, Ordering::Relaxed);
    }

    pub fn rx_bytes(&self) -> u64 {
        self.rx_bytes.load(Ordering::Relaxed)
    }

    pub fn tx_bytes(&self) -> u64 {
        self.tx_bytes.load(Ordering::Relaxed)
    }

    pub fn last_handshake(&self) -> Option<SystemTime> {
        match self.last_handshake_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(UNIX_EPOCH + Duration::from_nanos(ns)),
        }
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        *self.endpoint.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_endpoint(&self, endpoint: Option<SocketAddr>) {
        *self.endpoint.lock().unwrap_or_else(|e| e.into_inner()) = endpoint;
    }
}

/// Everything the core needs to run one peer.
pub struct PeerSpec {
    pub handle: PeerHandle,
    pub public_key: [u8; 32],
    pub preshared_key: Option<Zeroizing<[u8; 32]>>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: u16,
    /// Set when we trust this peer's routes: its tunnel address, where route
    /// requests go.
    pub route_source: Option<Ipv4Addr>,
    pub stats: Arc<PeerStats>,
}

struct Identity {
    secret: StaticSecret,
    public: PublicKey,
    limiter: Arc<RateLimiter>,
}

struct Peer {
    handle: PeerHandle,
    public_key: [u8; 32],
    preshared_key: Option<Zeroizing<[u8; 32]>>,
    /// None while we have no private key, or when the peer's key is of low
    /// order: such a peer must never cause a datagram.
    tunn: Option<Tunn>,
    endpoint: Option<Endpoint>,
    persistent_keepalive: u16,
    last_sent: Option<Instant>,
    session_established: Option<Instant>,
    route_source: Option<Ipv4Addr>,
    routes_generation: Option<u64>,
    next_route_poll: Option<Instant>,
    stats: Arc<PeerStats>,
}

impl Peer {
    fn send(
        &mut self,
        datagram: &[u8],
        now: Instant,
        counters: &DropCounters,
        tx: &mut impl Transmit,
    ) {
        let Some(endpoint) = self.endpoint else {
            counters.add(DropReason::NoEndpoint);
            return;
        };
        if tx.send_udp(endpoint, datagram) {
            self.stats.add_tx(datagram.len());
            self.last_sent = Some(now);
        } else {
            counters.add(DropReason::SendFailed);
        }
    }

    /// Encrypts `packet` straight into the sink's next UDP slot and sends it.
    /// Before the first session boringtun queues the packet and writes a
    /// handshake initiation instead.
    fn encrypt(
        &mut self,
        packet: &[u8],
        now: Instant,
        counters: &DropCounters,
        tx: &mut impl Transmit,
    ) {
        let Some(tunn) = self.tunn.as_mut() else {
            counters.add(DropReason::NoRoute);
            return;
        };
        let slot = tx.udp_slot((packet.len() + DATA_OVERHEAD).max(MIN_UDP_SLOT));
        let len = match tunn.encapsulate(packet, slot) {
            TunnResult::WriteToNetwork(datagram) => datagram.len(),
            TunnResult::Err(_) => return counters.add(DropReason::SendFailed),
            // Queued inside boringtun until the handshake completes.
            _ => return,
        };
        let Some(endpoint) = self.endpoint else {
            counters.add(DropReason::NoEndpoint);
            return;
        };
        if tx.commit_udp(endpoint, len) {
            self.stats.add_tx(len);
            self.last_sent = Some(now);
        } else {
            counters.add(DropReason::SendFailed);
        }
    }
}

pub struct Node {
    identity: Option<Identity>,
    peers: Vec<Option<Peer>>,
    by_key: HashMap<[u8; 32], u32>,
    routes: arc_swap::Cache<SharedRoutes, Arc<Routes>>,
    counters: Arc<DropCounters>,
    next_tick: Instant,
    next_limiter_reset: Instant,
    local_v4: Option<Ipv4Addr>,
    advertised: Vec<ipnet::IpNet>,
    advertised_dns: Option<routes_msg::DnsOffer>,
    priority: u16,
    /// Changes with every advertised set, so receivers can skip repeats.
    advertised_generation: u64,
    mss: (u16, u16),
    /// The wall clock at a known instant, refreshed every tick, so that a
    /// handshake seen between ticks gets a Unix time without a clock read.
    wall_at: (Instant, SystemTime),
    /// Route messages are built here, then encrypted into the caller's buffer.
    control_buf: Box<[u8; routes_msg::MAX_PACKET]>,
    events: Vec<Event>,
    /// Handshake initiations per source address.
    sources: SourceLimiter,
}

impl Node {
    pub fn new(routes: SharedRoutes, counters: Arc<DropCounters>, now: Instant) -> Self {
        Node {
            identity: None,
            peers: Vec::new(),
            by_key: HashMap::new(),
            routes: arc_swap::Cache::new(routes),
            counters,
            next_tick: now,
            next_limiter_reset: now,
            local_v4: None,
            advertised: Vec::new(),
            advertised_dns: None,
            priority: routes_msg::DEFAULT_PRIORITY,
            advertised_generation: 0,
            mss: (0, 0),
            wall_at: (now, UNIX_EPOCH),
            control_buf: Box::new([0; routes_msg::MAX_PACKET]),
            events: Vec::new(),
            sources: SourceLimiter::new(now),
        }
    }

    /// Events since the last call, oldest first.
    pub fn drain_events(&mut self) -> std::vec::Drain<'_, Event> {
        self.events.drain(..)
    }

    /// When `handle_timers` next wants to run.
    pub fn next_timer(&self) -> Instant {
        self.next_tick
    }

    pub fn apply(&mut self, change: Change) {
        match change {
            Change::SetPrivateKey(secret) => self.set_private_key(secret),
            Change::UpsertPeer(spec) => self.upsert_peer(spec),
            Change::RemovePeer(handle) => {
                if let Some(peer) = self.peer_mut(handle) {
                    let key = peer.public_key;
                    self.by_key.remove(&key);
                    self.peers[handle_slot(handle) as usize] = None;
                }
            }
            Change::SetEndpoint(handle, endpoint) => {
                if let Some(peer) = self.peer_mut(handle) {
                    peer.endpoint = Some(endpoint.into());
                    peer.stats.set_endpoint(Some(endpoint));
                }
            }
            Change::LocalAddressGone(address) => {
                for peer in self.peers.iter_mut().flatten() {
                    if let Some(endpoint) = peer.endpoint.as_mut() {
                        if endpoint.local == Some(address) {
                            endpoint.local = None;
                        }
                    }
                }
            }
            Change::SetKeepalive(handle, secs) => {
                if let Some(peer) = self.peer_mut(handle) {
                    peer.persistent_keepalive = secs;
                    // As in the kernel, turning keepalive on sends one at once.
                    peer.last_sent = None;
                }
            }
            Change::SetRouteSource(handle, source) => {
                if let Some(peer) = self.peer_mut(handle) {
                    peer.route_source = source;
                    peer.routes_generation = None;
                    peer.next_route_poll = None;
                }
            }
            Change::SetLocalAddress(address) => self.local_v4 = address,
            Change::SetAdvertised(routes, dns) => {
                self.advertised = routes;
                self.advertised_dns = dns.map(|d| *d);
                self.advertised_generation = self.advertised_generation.wrapping_add(1);
            }
            Change::SetMssClamp(v4, v6) => self.mss = (v4, v6),
            Change::SetPriority(priority) => self.priority = priority,
        }
    }

    fn set_private_key(&mut self, secret: Option<StaticSecret>) {
        self.identity = secret.map(|secret| {
            let public = PublicKey::from(&secret);
            let limiter = Arc::new(RateLimiter::new(
                &public,
                HANDSHAKES_PER_SECOND_BEFORE_COOKIES,
            ));
            Identity {
                secret,
                public,
                limiter,
            }
        });
        for (slot, peer) in self.peers.iter_mut().enumerate() {
            if let Some(peer) = peer {
                peer.tunn = new_tunn(self.identity.as_ref(), peer, slot as u32);
                peer.session_established = None;
            }
        }
    }

    fn upsert_peer(&mut self, spec: PeerSpec) {
        let slot = handle_slot(spec.handle);
        if slot >= MAX_PEERS {
            return;
        }
        let index = slot as usize;
        if self.peers.len() <= index {
            self.peers.resize_with(index + 1, || None);
        }
        if let Some(old) = self.peers[index].take() {
            self.by_key.remove(&old.public_key);
        }
        let mut peer = Peer {
            handle: spec.handle,
            public_key: spec.public_key,
            preshared_key: spec.preshared_key,
            tunn: None,
            endpoint: spec.endpoint.map(Endpoint::from),
            persistent_keepalive: spec.persistent_keepalive,
            last_sent: None,
            session_established: None,
            route_source: spec.route_source,
            routes_generation: None,
            next_route_poll: None,
            stats: spec.stats,
        };
        peer.tunn = new_tunn(self.identity.as_ref(), &peer, slot);
        self.by_key.insert(peer.public_key, slot);
        self.peers[index] = Some(peer);
    }

    fn peer_mut(&mut self, handle: PeerHandle) -> Option<&mut Peer> {
        peer_by_handle(&mut self.peers, handle)
    }

    /// One IP packet read from the TUN, `buf[..len]`: route it to a peer
    /// and encrypt it. The rest of `buf` is room for padding: the plaintext
    /// is zero-padded to a multiple of 16 bytes where `buf` has room (the
    /// data path's buffers are one MTU long), so packet sizes leak less.
    pub fn handle_tun_packet(
        &mut self,
        buf: &mut [u8],
        len: usize,
        now: Instant,
        tx: &mut impl Transmit,
    ) {
        // Parsed once: the routing-loop check and the MSS clamp read the
        // same view.
        let Some(mut ip) = buf.get_mut(..len).and_then(IpPacket::new_checked) else {
            self.counters.add(DropReason::Malformed);
            return;
        };
        let destination = ip.destination();
        let udp_port = ip.udp().map(|u| u.destination_port());
        let routes = self.routes.load();
        let Some(peer) = routes
            .peers
            .lookup(destination)
            .and_then(|handle| peer_by_handle(&mut self.peers, handle))
        else {
            self.counters.add(DropReason::NoRoute);
            return;
        };
        if udp_port.is_some_and(|port| {
            peer.endpoint.map(|e| e.remote) == Some(SocketAddr::new(destination, port))
        }) {
            self.counters.add(DropReason::RoutingLoop);
            return;
        }
        mss::clamp(&mut ip, self.mss.0, self.mss.1);
        let padded = len.next_multiple_of(16).min(buf.len());
        buf[len..padded].fill(0);
        peer.encrypt(&buf[..padded], now, &self.counters, tx);
    }

    /// One datagram received on the listen port: `from.remote` sent it to
    /// our address `from.local` (when the socket could tell).
    pub fn handle_datagram(
        &mut self,
        from: Endpoint,
        datagram: &[u8],
        buf: &mut [u8],
        now: Instant,
        tx: &mut impl Transmit,
    ) {
        let counters = &*self.counters;
        let (slot, is_cookie, is_data) = match Tunn::parse_incoming_packet(datagram) {
            Err(_) => return counters.add(DropReason::Malformed),
            Ok(Packet::HandshakeInit(_)) => {
                let Some(identity) = self.identity.as_ref() else {
                    return counters.add(DropReason::UnknownPeer);
                };
                if !self.sources.allow(from.remote.ip(), now) {
                    return counters.add(DropReason::RateLimited);
                }
                // mac1 (and, under load, the cookie) is checked before the
                // Diffie-Hellman that identifies the sender.
                let init =
                    match identity
                        .limiter
                        .verify_packet(Some(from.remote.ip()), datagram, buf)
                    {
                        Ok(Packet::HandshakeInit(init)) => init,
                        Ok(_) => return counters.add(DropReason::Malformed),
                        Err(TunnResult::WriteToNetwork(cookie)) => {
                            if !tx.send_udp(from, cookie) {
                                counters.add(DropReason::SendFailed);
                            }
                            return;
                        }
                        // A bad mac1: not meant for us, and checked without
                        // any Diffie-Hellman.
                        Err(_) => return counters.add(DropReason::Malformed),
                    };
                let Ok(half) = parse_handshake_anon(&identity.secret, &identity.public, &init)
                else {
                    return counters.add(DropReason::HandshakeFailed);
                };
                match self.by_key.get(&half.peer_static_public) {
                    Some(&slot) => (slot, false, false),
                    None => return counters.add(DropReason::UnknownPeer),
                }
            }
            Ok(Packet::HandshakeResponse(p)) => (p.receiver_idx >> 8, false, false),
            Ok(Packet::PacketCookieReply(p)) => (p.receiver_idx >> 8, true, false),
            Ok(Packet::PacketData(p)) => (p.receiver_idx >> 8, false, true),
        };

        let Some(peer) = self.peers.get_mut(slot as usize).and_then(Option::as_mut) else {
            return counters.add(DropReason::UnknownPeer);
        };
        let Some(tunn) = peer.tunn.as_mut() else {
            return counters.add(DropReason::UnknownPeer);
        };
        let routes = self.routes.load();
        let mut answer_route_request = None;
        // Data is decrypted straight into the TUN's next slot; handshake
        // messages into the scratch buffer.
        let outcome = if is_data {
            let slot = tx.tun_slot(datagram.len());
            match tunn.decapsulate(Some(from.remote.ip()), datagram, slot) {
                TunnResult::WriteToNetwork(reply) => match buf.get_mut(..reply.len()) {
                    Some(copy) => {
                        copy.copy_from_slice(reply);
                        Decrypted::Reply(reply.len())
                    }
                    None => Decrypted::Nothing,
                },
                other => Decrypted::from(other),
            }
        } else {
            Decrypted::from(tunn.decapsulate(Some(from.remote.ip()), datagram, buf))
        };
        let is_v4 = matches!(outcome, Decrypted::V4(..));
        let is_packet = is_v4 || matches!(outcome, Decrypted::V6(..));
        let inner_len = match outcome {
            Decrypted::Failed(e) => {
                return counters.add(match e {
                    WireGuardError::InvalidPacket => DropReason::Malformed,
                    WireGuardError::DuplicateCounter
                    | WireGuardError::InvalidCounter
                    | WireGuardError::InvalidAeadTag
                    | WireGuardError::NoCurrentSession
                    | WireGuardError::WrongIndex
                    | WireGuardError::WrongKey => DropReason::DecryptFailed,
                    _ => DropReason::HandshakeFailed,
                });
            }
            Decrypted::Nothing => None,
            Decrypted::Reply(len) => {
                // A handshake answer goes back where the message came from.
                if tx.send_udp(from, &buf[..len]) {
                    peer.stats.add_tx(len);
                    peer.last_sent = Some(now);
                } else {
                    counters.add(DropReason::SendFailed);
                }
                // A completed handshake releases packets queued while it ran.
                while let TunnResult::WriteToNetwork(queued) = tunn.decapsulate(None, &[], buf) {
                    if tx.send_udp(from, queued) {
                        peer.stats.add_tx(queued.len());
                    } else {
                        counters.add(DropReason::SendFailed);
                    }
                }
                None
            }
            Decrypted::V4(len, source) => {
                (routes.peers.lookup_v4(source) == Some(peer.handle)).then_some(len)
            }
            Decrypted::V6(len, source) => {
                (routes.peers.lookup_v6(source) == Some(peer.handle)).then_some(len)
            }
        };
        if is_packet && inner_len.is_none() {
            counters.add(DropReason::CryptokeyFilter);
        }
        if let Some(len) = inner_len {
            if !is_data {
                // Only data messages carry packets; this is belt and braces.
                if let Some(slot) = tx.tun_slot(len).get_mut(..len) {
                    slot.copy_from_slice(&buf[..len]);
                }
            }
            // Parsed once: route messages, the forwarding scope and the MSS
            // clamp all read this view. (boringtun has checked the lengths
            // already; a packet it passes and this refuses is counted.)
            match IpPacket::new_checked(&mut tx.tun_slot(len)[..len]) {
                None => counters.add(DropReason::Malformed),
                Some(mut ip) => {
                    let intercepted = match self.local_v4 {
                        Some(local) if is_v4 => routes_msg::intercept_view(&ip, local),
                        _ => None,
                    };
                    match intercepted {
                        Some((requester, Ok(routes_msg::Message::Request))) => {
                            answer_route_request = Some(requester);
                        }
                        Some((_, Ok(routes_msg::Message::Routes(set)))) => {
                            // Only a peer we trust for routes is listened to.
                            if peer.route_source.is_some() {
                                let (priority, at) = (set.priority, now);
                                if peer.routes_generation != Some(set.generation) {
                                    peer.routes_generation = Some(set.generation);
                                    self.events.push(Event::RoutesLearned {
                                        peer: peer.handle,
                                        routes: set.routes().collect(),
                                        dns: set.dns.map(Box::new),
                                        priority,
                                        at,
                                    });
                                } else {
                                    self.events.push(Event::RoutesHeard {
                                        peer: peer.handle,
                                        priority,
                                        at,
                                    });
                                }
                            }
                        }
                        Some((_, Err(()))) => counters.add(DropReason::Malformed),
                        None => {
                            if routes.forward.lookup(ip.destination()).is_some() {
                                mss::clamp(&mut ip, self.mss.0, self.mss.1);
                                tx.commit_tun(len);
                            } else {
                                counters.add(DropReason::NotAdvertised);
                            }
                        }
                    }
                }
            }
        }

        // Everything that reaches here was authenticated, except a cookie
        // reply, which does not prove the sender's identity.
        if !is_cookie {
            peer.stats.add_rx(datagram.len());
            if peer.endpoint != Some(from) {
                if peer.endpoint.map(|e| e.remote) != Some(from.remote) {
                    peer.stats.set_endpoint(Some(from.remote));
                }
                peer.endpoint = Some(from);
                tracing::debug!(
                    peer = %short_key(&peer.public_key),
                    endpoint = %from.remote,
                    local = ?from.local,
                    "peer endpoint changed"
                );
            }
            // A responder's session starts with the first data message, so
            // data is watched too until the first session exists.
            let (base, base_wall) = self.wall_at;
            // Before the first tick there is no wall-clock reference yet.
            if (!is_data || peer.session_established.is_none()) && base_wall != UNIX_EPOCH {
                let wall = base_wall + now.saturating_duration_since(base);
                track_handshake(peer, now, wall);
            }
        }

        if let (Some(requester), Some(local)) = (answer_route_request, self.local_v4) {
            let Some(len) = routes_msg::build_routes(
                local,
                requester,
                self.advertised_generation,
                &self.advertised,
                self.advertised_dns.as_ref(),
                self.priority,
                &mut self.control_buf[..],
            ) else {
                return;
            };
            if let Some(tunn) = peer.tunn.as_mut() {
                if let TunnResult::WriteToNetwork(datagram) =
                    tunn.encapsulate(&self.control_buf[..len], buf)
                {
                    peer.send(datagram, now, counters, tx);
                }
            }
        }
    }

    /// Runs boringtun's timers, persistent keepalives and bookkeeping. Call it
    /// when `next_timer()` has passed; calling it early is harmless.
    pub fn handle_timers(
        &mut self,
        now: Instant,
        wall: SystemTime,
        buf: &mut [u8],
        tx: &mut impl Transmit,
    ) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TIMER_TICK;
        self.wall_at = (now, wall);
        if now >= self.next_limiter_reset {
            if let Some(identity) = &self.identity {
                identity.limiter.reset_count();
            }
            self.next_limiter_reset = now + Duration::from_secs(1);
        }
        let counters = &*self.counters;
        for peer in self.peers.iter_mut().flatten() {
            let Some(tunn) = peer.tunn.as_mut() else {
                continue;
            };
            if let TunnResult::WriteToNetwork(datagram) = tunn.update_timers(buf) {
                peer.send(datagram, now, counters, tx);
            }
            let Some(tunn) = peer.tunn.as_mut() else {
                continue;
            };
            let keepalive = Duration::from_secs(u64::from(peer.persistent_keepalive));
            if peer.persistent_keepalive > 0
                && peer.endpoint.is_some()
                && peer
                    .last_sent
                    .is_none_or(|sent| now.saturating_duration_since(sent) >= keepalive)
            {
                if let TunnResult::WriteToNetwork(datagram) = tunn.encapsulate(&[], buf) {
                    peer.send(datagram, now, counters, tx);
                } else {
                    // A handshake is already under way; the queued empty
                    // packet goes out when it completes.
                    peer.last_sent = Some(now);
                }
            }
            track_handshake(peer, now, wall);
            poll_routes(
                peer,
                self.local_v4,
                &mut self.control_buf[..],
                buf,
                now,
                counters,
                tx,
            );
        }
    }
}

/// What one `decapsulate` produced, without the borrow of its buffer.
enum Decrypted {
    Nothing,
    /// A handshake reply of this length, in the scratch buffer.
    Reply(usize),
    /// An inner packet of this length and its source.
    V4(usize, Ipv4Addr),
    V6(usize, Ipv6Addr),
    Failed(WireGuardError),
}

impl From<TunnResult<'_>> for Decrypted {
    fn from(result: TunnResult<'_>) -> Self {
        match result {
            TunnResult::Done => Decrypted::Nothing,
            TunnResult::Err(e) => Decrypted::Failed(e),
            TunnResult::WriteToNetwork(reply) => Decrypted::Reply(reply.len()),
            TunnResult::WriteToTunnelV4(packet, source) => Decrypted::V4(packet.len(), source),
            TunnResult::WriteToTunnelV6(packet, source) => Decrypted::V6(packet.len(), source),
        }
    }
}

/// Asks a trusted peer for its routes every [`routes_msg::POLL_INTERVAL`].
fn poll_routes(
    peer: &mut Peer,
    local: Option<Ipv4Addr>,
    control_buf: &mut [u8],
    buf: &mut [u8],
    now: Instant,
    counters: &DropCounters,
    tx: &mut impl Transmit,
) {
    let (Some(local), Some(target)) = (local, peer.route_source) else {
        return;
    };
    if peer.next_route_poll.is_some_and(|at| now < at) {
        return;
    }
    peer.next_route_poll = Some(now + routes_msg::POLL_INTERVAL);
    let Some(len) = routes_msg::build_request(local, target, control_buf) else {
        return;
    };
    let Some(tunn) = peer.tunn.as_mut() else {
        return;
    };
    if let TunnResult::WriteToNetwork(datagram) = tunn.encapsulate(&control_buf[..len], buf) {
        peer.send(datagram, now, counters, tx);
    }
}

fn peer_by_handle(peers: &mut [Option<Peer>], handle: PeerHandle) -> Option<&mut Peer> {
    peers
        .get_mut(handle_slot(handle) as usize)
        .and_then(Option::as_mut)
        .filter(|peer| peer.handle == handle)
}

fn new_tunn(identity: Option<&Identity>, peer: &Peer, slot: u32) -> Option<Tunn> {
    let identity = identity?;
    let public = PublicKey::from(peer.public_key);
    // A low-order key makes the shared secret all zeros: such a peer must
    // never handshake, so it gets no session state at all.
    if !identity.secret.diffie_hellman(&public).was_contributory() {
        tracing::warn!(peer = %short_key(&peer.public_key), "ignoring peer with a low-order public key");
        return None;
    }
    Some(Tunn::new(
        identity.secret.clone(),
        public,
        peer.preshared_key.as_deref().copied(),
        None,
        slot,
        Some(identity.limiter.clone()),
    ))
}

/// Notices completed handshakes and expired sessions from boringtun's view.
fn track_handshake(peer: &mut Peer, now: Instant, wall: SystemTime) {
    let since = peer.tunn.as_ref().and_then(Tunn::time_since_last_handshake);
    match since {
        Some(age) => {
            let established = now.checked_sub(age).unwrap_or(now);
            // Rekeys are minutes apart; jitter between two reads is not.
            let is_new = peer
                .session_established
                .is_none_or(|prev| established > prev + Duration::from_secs(1));
            if is_new {
                if peer.session_established.is_none() {
                    tracing::info!(peer = %short_key(&peer.public_key), "peer up");
                }
                peer.session_established = Some(established);
                let at = wall.checked_sub(age).unwrap_or(wall);
                let ns = at
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
                peer.stats.last_handshake_ns.store(ns, Ordering::Relaxed);
            }
        }
        None => {
            if peer.session_established.take().is_some() {
                tracing::info!(peer = %short_key(&peer.public_key), "peer down: session expired");
            }
        }
    }
}

/// The first characters of a key's base64 form, as `wg` users know it.
pub fn short_key(key: &[u8; 32]) -> String {
    use base64::Engine;
    let mut s = base64::engine::general_purpose::STANDARD.encode(key);
    s.truncate(8);
    s
}

#[cfg(test)]
mod tests;
