//! What the control plane and the node say to each other: the changes it
//! applies between batches, and the events it reports back.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use boringtun::x25519::StaticSecret;

use crate::{routes_msg, PeerHandle, PeerSpec};

/// Something the control plane must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A trusted peer advertised a new set of routes.
    RoutesLearned {
        peer: PeerHandle,
        routes: Vec<ipnet::IpNet>,
        /// Its DNS forwarder, if it offers one.
        dns: Option<Box<routes_msg::DnsOffer>>,
        priority: u16,
        at: Instant,
    },
    /// A trusted peer answered a poll with the set it advertised before:
    /// it is alive, and still offers the same.
    RoutesHeard {
        peer: PeerHandle,
        priority: u16,
        at: Instant,
    },
}

/// A change from the control plane. Each is applied whole, between batches.
pub enum Change {
    SetPrivateKey(Option<StaticSecret>),
    /// Adds the peer, or replaces the one with this handle (new session state).
    UpsertPeer(PeerSpec),
    RemovePeer(PeerHandle),
    SetEndpoint(PeerHandle, SocketAddr),
    /// This local address can no longer send (it was removed): peers whose
    /// replies left from it fall back to the kernel's choice.
    LocalAddressGone(IpAddr),
    SetKeepalive(PeerHandle, u16),
    SetRouteSource(PeerHandle, Option<Ipv4Addr>),
    /// Our own tunnel IPv4 address: the source of route messages, and where
    /// peers send route requests.
    SetLocalAddress(Option<Ipv4Addr>),
    /// The routes and the DNS forwarder advertised to peers that ask.
    SetAdvertised(Vec<ipnet::IpNet>, Option<Box<routes_msg::DnsOffer>>),
    /// The priority sent with every advertisement (lower is preferred).
    SetPriority(u16),
    /// Largest TCP MSS for IPv4 and IPv6 SYNs crossing the tunnel; 0 = off.
    SetMssClamp(u16, u16),
}
