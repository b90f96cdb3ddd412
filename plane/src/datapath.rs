//! What the data path should hold, derived from the desired state, and the
//! pure diff that turns one such state into the next as ordered steps.
//!
//! The order is what keeps cryptokey routing sound: peers are added and
//! changed before a new table is published, and removed only after it, so
//! no published table ever names a peer the data path lacks. Each table
//! value is a [`PeerHandle`] (slot and generation), so an entry that
//! outlives its peer can never match a newer peer in the same slot.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use vpcgate_node::routes_msg::DnsOffer;
use vpcgate_node::{PeerHandle, RouteTable};

use crate::key::Key;

/// One peer as the data path needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerState {
    pub handle: PeerHandle,
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    /// As configured; the data path keeps the roamed one.
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: u16,
    /// Where route requests go, for a peer trusted for routes.
    pub route_source: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathState {
    pub private_key: Option<Key>,
    pub fwmark: u32,
    pub peers: BTreeMap<PeerHandle, PeerState>,
    /// Cryptokey routing, in build order: a later duplicate wins.
    pub routes: Vec<(IpNet, PeerHandle)>,
    /// Where packets from peers may go.
    pub forward: Vec<IpNet>,
    pub mtu: u32,
    /// Largest TCP MSS for IPv4 and IPv6 SYNs; 0 = off.
    pub mss: (u16, u16),
    pub local_v4: Option<Ipv4Addr>,
    pub advertised: Vec<IpNet>,
    pub advertised_dns: Option<DnsOffer>,
    pub priority: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    SetPrivateKey(Option<Key>),
    /// Adds the peer, or replaces the one with its handle (a new session).
    UpsertPeer(PeerState),
    RemovePeer(PeerHandle),
    SetEndpoint(PeerHandle, SocketAddr),
    SetKeepalive(PeerHandle, u16),
    SetRouteSource(PeerHandle, Option<Ipv4Addr>),
    SetLocalAddress(Option<Ipv4Addr>),
    SetAdvertised(Vec<IpNet>, Option<Box<DnsOffer>>),
    SetPriority(u16),
    SetMssClamp(u16, u16),
    SetMtu(u32),
    SetFwmark(u32),
}

/// A new routing snapshot; `None` keeps that half as it is.
#[derive(Default)]
pub struct Publish {
    pub peers: Option<RouteTable<PeerHandle>>,
    pub forward: Option<RouteTable<()>>,
}

/// The steps from one data-path state to the next, in order.
#[derive(Default)]
pub struct DatapathPlan {
    pub before: Vec<Step>,
    pub publish: Option<Publish>,
    pub after: Vec<Step>,
}

impl DatapathPlan {
    pub fn is_empty(&self) -> bool {
        self.before.is_empty() && self.publish.is_none() && self.after.is_empty()
    }
}

/// The plan that brings a data path holding `old` (nothing yet: `None`) to
/// `new`.
pub fn diff(old: Option<&DatapathState>, new: &DatapathState) -> DatapathPlan {
    let mut plan = DatapathPlan::default();
    let before = &mut plan.before;
    let fresh = old.is_none();
    if old.map(|o| o.fwmark) != Some(new.fwmark) && !(fresh && new.fwmark == 0) {
        before.push(Step::SetFwmark(new.fwmark));
    }
    if old.map(|o| &o.private_key) != Some(&new.private_key) {
        before.push(Step::SetPrivateKey(new.private_key.clone()));
    }
    let none = BTreeMap::new();
    let old_peers = old.map_or(&none, |o| &o.peers);
    for (handle, peer) in &new.peers {
        let Some(prev) = old_peers.get(handle) else {
            before.push(Step::UpsertPeer(peer.clone()));
            continue;
        };
        if prev.preshared_key != peer.preshared_key || prev.public_key != peer.public_key {
            before.push(Step::UpsertPeer(peer.clone()));
            continue;
        }
        if prev.route_source != peer.route_source {
            before.push(Step::SetRouteSource(*handle, peer.route_source));
        }
        if prev.endpoint != peer.endpoint {
            if let Some(endpoint) = peer.endpoint {
                before.push(Step::SetEndpoint(*handle, endpoint));
            }
        }
        if prev.persistent_keepalive != peer.persistent_keepalive {
            before.push(Step::SetKeepalive(*handle, peer.persistent_keepalive));
        }
    }
    if old.map(|o| o.local_v4) != Some(new.local_v4) {
        before.push(Step::SetLocalAddress(new.local_v4));
    }
    if old.map(|o| (&o.advertised, o.advertised_dns)) != Some((&new.advertised, new.advertised_dns))
    {
        before.push(Step::SetAdvertised(
            new.advertised.clone(),
            new.advertised_dns.map(Box::new),
        ));
    }
    if old.map(|o| o.priority) != Some(new.priority) {
        before.push(Step::SetPriority(new.priority));
    }
    if old.map(|o| o.mtu) != Some(new.mtu) && !fresh {
        before.push(Step::SetMtu(new.mtu));
    }
    if old.map(|o| o.mss) != Some(new.mss) {
        before.push(Step::SetMssClamp(new.mss.0, new.mss.1));
    }
    let peers_changed = old.map(|o| &o.routes) != Some(&new.routes);
    let forward_changed = old.map(|o| &o.forward) != Some(&new.forward);
    if peers_changed || forward_changed {
        plan.publish = Some(Publish {
            peers: peers_changed.then(|| RouteTable::build(new.routes.iter().copied())),
            forward: forward_changed
                .then(|| RouteTable::build(new.forward.iter().map(|net| (*net, ())))),
        });
    }
    for handle in old_peers.keys() {
        if !new.peers.contains_key(handle) {
            plan.after.push(Step::RemovePeer(*handle));
        }
    }
    plan
}
