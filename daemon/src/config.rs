//! The device's desired state (keys, port, peers and their allowed IPs) and
//! the pure step that applies a UAPI `set` to it.
//!
//! Applying a request never mutates the current state: it builds the next
//! state and a [`Plan`] of what the data path must do to get there. The
//! caller commits both only when every part of the request was valid, so a
//! rejected request changes nothing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use boringtun::x25519::{PublicKey, StaticSecret};
use ipnet::IpNet;
use zeroize::Zeroizing;

use crate::core::{Change, PeerHandle, PeerSpec, PeerStats, RouteTable, MAX_PEERS};
use nix::errno::Errno;

use crate::uapi::proto::{DeviceView, Key, PeerView, SetRequest};

#[derive(Clone)]
pub struct PeerConfig {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    /// The endpoint as configured; the live (roamed) one is in `stats`.
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<IpNet>,
    pub handle: PeerHandle,
    pub stats: Arc<PeerStats>,
    /// Set by `vpcgate peer add`; peers added with `wg` have none.
    pub name: Option<String>,
    /// The client's private key, when we generated it.
    pub client_private_key: Option<Key>,
    /// Trust this peer's advertised routes.
    pub accept_routes: bool,
    pub accept_default_route: bool,
    /// Routes learned from this peer (accept-routes); part of its allowed
    /// IPs for cryptokey routing, kept apart from the configured ones.
    pub learned: Vec<IpNet>,
}

impl PeerConfig {
    fn new(public_key: Key, handle: PeerHandle) -> PeerConfig {
        PeerConfig {
            public_key,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: 0,
            allowed_ips: Vec::new(),
            handle,
            stats: Arc::new(PeerStats::new(None)),
            name: None,
            client_private_key: None,
            accept_routes: false,
            accept_default_route: false,
            learned: Vec::new(),
        }
    }

    fn spec(&self) -> PeerSpec {
        PeerSpec {
            handle: self.handle,
            public_key: self.public_key.0,
            preshared_key: self.preshared_key.as_ref().map(|k| Zeroizing::new(k.0)),
            endpoint: self.stats.endpoint().or(self.endpoint),
            persistent_keepalive: self.persistent_keepalive,
            route_source: self.route_source(),
            stats: self.stats.clone(),
        }
    }

    /// Where route requests go: the peer's tunnel address, taken as the
    /// first IPv4 host route in its allowed IPs, when it is trusted for routes.
    pub fn route_source(&self) -> Option<std::net::Ipv4Addr> {
        if !self.accept_routes {
            return None;
        }
        self.allowed_ips.iter().find_map(|net| match net {
            IpNet::V4(v4) if v4.prefix_len() == 32 => Some(v4.addr()),
            _ => None,
        })
    }

    /// Takes every configured setting from `other`, keeping this peer's
    /// handle, statistics and learned routes (so its session survives).
    pub fn adopt_settings(&mut self, other: PeerConfig) {
        self.name = other.name.clone();
        self.client_private_key = other.client_private_key.clone();
        self.preshared_key = other.preshared_key.clone();
        self.endpoint = other.endpoint;
        self.persistent_keepalive = other.persistent_keepalive;
        self.allowed_ips = other.allowed_ips.clone();
        self.accept_routes = other.accept_routes;
        self.accept_default_route = other.accept_default_route;
    }

    /// Every prefix this peer owns for cryptokey routing.
    pub fn effective_allowed_ips(&self) -> impl Iterator<Item = &IpNet> {
        self.allowed_ips.iter().chain(self.learned.iter())
    }
}

/// Hands out peer handles: a slot (reused after removal) and a generation
/// that is never reused.
#[derive(Clone, Default)]
struct Handles {
    next_slot: u32,
    free: Vec<u32>,
    generation: u32,
}

impl Handles {
    fn allocate(&mut self) -> Result<PeerHandle, Errno> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if self.next_slot < MAX_PEERS => {
                self.next_slot += 1;
                self.next_slot - 1
            }
            None => return Err(Errno::ENOSPC),
        };
        self.generation = self.generation.wrapping_add(1);
        Ok(u64::from(self.generation) << 32 | u64::from(slot))
    }

    fn release(&mut self, handle: PeerHandle) {
        self.free.push(crate::core::handle_slot(handle));
    }
}

#[derive(Clone, Default)]
pub struct DeviceConfig {
    pub private_key: Option<Key>,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerConfig>,
    handles: Handles,
}

/// What the data path must do to reach the next state, in order.
#[derive(Default)]
pub struct Plan {
    /// Applied before the new table is published: the key, new and changed peers.
    pub before_table: Vec<Change>,
    /// Published when allowed IPs or the peer set changed.
    pub table: Option<RouteTable<PeerHandle>>,
    /// Applied after the table: removals, so no route ever names a peer the
    /// data path has already forgotten.
    pub after_table: Vec<Change>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub private_key_changed: bool,
}

pub fn public_key_of(private: &Key) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(private.0)).to_bytes()
}

/// Clears and sets the bits X25519 ignores, as the kernel and wireguard-go
/// do when a key is set, so `wg show` reads back the key actually in use.
fn clamped(mut key: Key) -> Key {
    key.0[0] &= 248;
    key.0[31] = (key.0[31] & 127) | 64;
    key
}

/// Which peer holds each allowed IP.
fn owner_index(peers: &[PeerConfig]) -> HashMap<IpNet, PeerHandle> {
    peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().map(move |net| (*net, p.handle)))
        .collect()
}

/// Forgets that `handle` holds `nets`.
fn disown(owners: &mut HashMap<IpNet, PeerHandle>, nets: &[IpNet], handle: PeerHandle) {
    for net in nets {
        if owners.get(net) == Some(&handle) {
            owners.remove(net);
        }
    }
}

impl DeviceConfig {
    pub fn new(private_key: Option<Key>, listen_port: u16) -> Self {
        DeviceConfig {
            private_key: private_key.map(clamped),
            listen_port,
            ..DeviceConfig::default()
        }
    }

    pub fn public_key(&self) -> Option<[u8; 32]> {
        self.private_key.as_ref().map(public_key_of)
    }

    /// The changes that bring an empty data path to this state.
    pub fn initial_plan(&self) -> Plan {
        let mut plan = Plan::default();
        plan.before_table.push(Change::SetPrivateKey(
            self.private_key.as_ref().map(|k| StaticSecret::from(k.0)),
        ));
        plan.before_table
            .extend(self.peers.iter().map(|p| Change::UpsertPeer(p.spec())));
        plan.table = Some(self.route_table());
        plan
    }

    pub fn route_table(&self) -> RouteTable<PeerHandle> {
        // Learned routes come first so that a configured prefix, inserted
        // later, wins a tie: the last duplicate wins in `build`.
        let learned = self
            .peers
            .iter()
            .flat_map(|p| p.learned.iter().map(move |net| (*net, p.handle)));
        let configured = self
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().map(move |net| (*net, p.handle)));
        RouteTable::build(learned.chain(configured))
    }

    pub fn peer_by_name(&self, name: &str) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.name.as_deref() == Some(name))
    }

    pub fn peer_by_handle_mut(&mut self, handle: PeerHandle) -> Option<&mut PeerConfig> {
        self.peers.iter_mut().find(|p| p.handle == handle)
    }

    /// Adds a peer with a fresh handle.
    pub fn push_peer(&mut self, public_key: Key) -> Result<&mut PeerConfig, Errno> {
        let handle = self.handles.allocate()?;
        self.peers.push(PeerConfig::new(public_key, handle));
        let last = self.peers.len() - 1;
        Ok(&mut self.peers[last])
    }

    /// Applies a parsed `set` to a copy of this state.
    pub fn apply(&self, req: SetRequest) -> Result<(DeviceConfig, Plan), Errno> {
        self.transform(|next, plan| next.apply_request(req, plan))
    }

    /// Runs `edit` on a copy of this state and plans the changes it made.
    pub fn transform<E>(
        &self,
        edit: impl FnOnce(&mut DeviceConfig, &mut Plan) -> Result<(), E>,
    ) -> Result<(DeviceConfig, Plan), E> {
        let mut next = self.clone();
        let mut plan = Plan::default();
        edit(&mut next, &mut plan)?;
        if next.private_key != self.private_key {
            plan.private_key_changed = true;
        }
        self.diff_into(&mut next, &mut plan);
        Ok((next, plan))
    }

    fn apply_request(&mut self, req: SetRequest, plan: &mut Plan) -> Result<(), Errno> {
        let current_port = self.listen_port;
        let current_fwmark = self.fwmark;
        let next = self;

        if let Some(private_key) = req.private_key {
            next.private_key = private_key.map(clamped);
            // As in the kernel: a peer with our own public key is dropped.
            if let Some(own) = next.public_key() {
                next.peers.retain(|p| p.public_key.0 != own);
            }
        }
        if let Some(port) = req.listen_port {
            if port != current_port {
                plan.listen_port = Some(port);
            }
            next.listen_port = port;
        }
        if let Some(fwmark) = req.fwmark {
            if fwmark != current_fwmark {
                plan.fwmark = Some(fwmark);
            }
            next.fwmark = fwmark;
        }
        if req.replace_peers {
            next.peers.clear();
        }

        let own = next.public_key();
        // Built on first use and kept in step with every change below:
        // finding owners by scanning the peers' lists would make a request
        // with n allowed IPs cost O(n²) (130,000 of them took seconds).
        let mut owners: Option<HashMap<IpNet, PeerHandle>> = None;
        for change in req.peers {
            // The kernel silently ignores a peer that is ourselves.
            if Some(change.public_key.0) == own {
                continue;
            }
            let existing = next
                .peers
                .iter()
                .position(|p| p.public_key == change.public_key);
            if change.remove {
                if let Some(i) = existing {
                    let gone = next.peers.remove(i);
                    if let Some(owners) = owners.as_mut() {
                        disown(owners, &gone.allowed_ips, gone.handle);
                    }
                }
                continue;
            }
            let index = match existing {
                Some(i) => i,
                None if change.update_only => continue,
                None => {
                    next.push_peer(change.public_key.clone())?;
                    next.peers.len() - 1
                }
            };
            let peer = &mut next.peers[index];
            if let Some(psk) = change.preshared_key {
                peer.preshared_key = psk;
            }
            if let Some(endpoint) = change.endpoint {
                peer.endpoint = Some(endpoint);
            }
            if let Some(keepalive) = change.persistent_keepalive {
                peer.persistent_keepalive = keepalive;
            }
            let handle = peer.handle;
            if change.replace_allowed_ips {
                if let Some(owners) = owners.as_mut() {
                    disown(owners, &peer.allowed_ips, handle);
                }
                peer.allowed_ips.clear();
            }
            if change.allowed_ips.is_empty() {
                continue;
            }
            let owners = owners.get_or_insert_with(|| owner_index(&next.peers));
            for ip in change.allowed_ips {
                if ip.remove {
                    disown(owners, &[ip.net], handle);
                    next.peers[index].allowed_ips.retain(|n| *n != ip.net);
                    continue;
                }
                match owners.insert(ip.net, handle) {
                    Some(owner) if owner == handle => {}
                    Some(owner) => {
                        // An allowed IP has one owner: giving it to this peer
                        // takes it from the other, as in the kernel.
                        if let Some(other) = next.peers.iter_mut().find(|p| p.handle == owner) {
                            other.allowed_ips.retain(|n| *n != ip.net);
                        }
                        next.peers[index].allowed_ips.push(ip.net);
                    }
                    None => next.peers[index].allowed_ips.push(ip.net),
                }
            }
        }
        Ok(())
    }

    fn diff_into(&self, next: &mut DeviceConfig, plan: &mut Plan) {
        if plan.private_key_changed {
            plan.before_table.push(Change::SetPrivateKey(
                next.private_key.as_ref().map(|k| StaticSecret::from(k.0)),
            ));
        }
        let old: HashMap<PeerHandle, &PeerConfig> =
            self.peers.iter().map(|p| (p.handle, p)).collect();
        let mut routes_changed = false;
        for peer in &next.peers {
            match old.get(&peer.handle) {
                None => {
                    routes_changed = true;
                    plan.before_table.push(Change::UpsertPeer(peer.spec()));
                }
                Some(prev) => {
                    if prev.allowed_ips != peer.allowed_ips || prev.learned != peer.learned {
                        routes_changed = true;
                    }
                    if prev.route_source() != peer.route_source() {
                        plan.before_table
                            .push(Change::SetRouteSource(peer.handle, peer.route_source()));
                    }
                    if prev.preshared_key != peer.preshared_key {
                        plan.before_table.push(Change::UpsertPeer(peer.spec()));
                        continue;
                    }
                    if prev.endpoint != peer.endpoint {
                        if let Some(endpoint) = peer.endpoint {
                            peer.stats.set_endpoint(Some(endpoint));
                            plan.before_table
                                .push(Change::SetEndpoint(peer.handle, endpoint));
                        }
                    }
                    if prev.persistent_keepalive != peer.persistent_keepalive {
                        plan.before_table
                            .push(Change::SetKeepalive(peer.handle, peer.persistent_keepalive));
                    }
                }
            }
        }
        let kept: HashMap<PeerHandle, ()> = next.peers.iter().map(|p| (p.handle, ())).collect();
        for peer in &self.peers {
            if !kept.contains_key(&peer.handle) {
                routes_changed = true;
                plan.after_table.push(Change::RemovePeer(peer.handle));
                next.handles.release(peer.handle);
            }
        }
        if routes_changed {
            plan.table = Some(next.route_table());
        }
    }

    /// The state as `wg show` reports it.
    pub fn view(&self) -> DeviceView {
        DeviceView {
            private_key: self.private_key.clone(),
            listen_port: self.listen_port,
            fwmark: self.fwmark,
            peers: self
                .peers
                .iter()
                .map(|p| PeerView {
                    public_key: p.public_key.clone(),
                    preshared_key: p.preshared_key.clone(),
                    endpoint: p.stats.endpoint().or(p.endpoint),
                    persistent_keepalive: p.persistent_keepalive,
                    last_handshake: p.stats.last_handshake(),
                    rx_bytes: p.stats.rx_bytes(),
                    tx_bytes: p.stats.tx_bytes(),
                    allowed_ips: p.effective_allowed_ips().copied().collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uapi::proto::{AllowedIpChange, PeerChange};

    fn key(b: u8) -> Key {
        Key([b; 32])
    }

    fn peer(k: u8, ips: &[&str]) -> PeerChange {
        PeerChange {
            public_key: key(k),
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: ips
                .iter()
                .map(|s| AllowedIpChange {
                    net: s.parse().expect("cidr"),
                    remove: false,
                })
                .collect(),
        }
    }

    fn set(peers: Vec<PeerChange>) -> SetRequest {
        SetRequest {
            peers,
            ..SetRequest::default()
        }
    }

    fn ips(cfg: &DeviceConfig, k: u8) -> Vec<String> {
        cfg.peers
            .iter()
            .find(|p| p.public_key == key(k))
            .map(|p| p.allowed_ips.iter().map(ToString::to_string).collect())
            .unwrap_or_default()
    }

    #[test]
    fn allowed_ip_moves_to_its_new_owner() {
        let cfg = DeviceConfig::new(Some(key(1)), 51820);
        let (cfg, _) = cfg
            .apply(set(vec![peer(2, &["100.64.0.0/24"])]))
            .expect("valid");
        let (cfg, plan) = cfg
            .apply(set(vec![peer(3, &["100.64.0.0/24", "100.64.1.0/24"])]))
            .expect("valid");
        assert!(ips(&cfg, 2).is_empty());
        assert_eq!(ips(&cfg, 3), ["100.64.0.0/24", "100.64.1.0/24"]);
        let table = plan.table.expect("routes changed");
        let owner = cfg.peers[1].handle;
        assert_eq!(table.lookup("100.64.0.9".parse().expect("ip")), Some(owner));
    }

    #[test]
    fn ownership_stays_single_through_one_request() {
        let cfg = DeviceConfig::new(Some(key(1)), 51820);
        let (cfg, _) = cfg
            .apply(set(vec![peer(2, &["100.64.0.0/24", "100.64.1.0/24"])]))
            .expect("valid");
        // In one request: 3 takes one of 2's prefixes; 2 replaces its list
        // with that prefix again; 4 takes 3's other prefix and is removed;
        // 3 takes that prefix once more.
        let mut back = peer(2, &["100.64.0.0/24"]);
        back.replace_allowed_ips = true;
        let mut gone = peer(4, &[]);
        gone.remove = true;
        let (cfg, plan) = cfg
            .apply(set(vec![
                peer(3, &["100.64.0.0/24", "100.64.2.0/24"]),
                back,
                peer(4, &["100.64.2.0/24"]),
                gone,
                peer(3, &["100.64.2.0/24"]),
            ]))
            .expect("valid");
        assert_eq!(ips(&cfg, 2), ["100.64.0.0/24"]);
        assert_eq!(ips(&cfg, 3), ["100.64.2.0/24"]);
        assert_eq!(cfg.peers.len(), 2);
        let table = plan.table.expect("routes changed");
        let lookup = |ip: &str| table.lookup(ip.parse().expect("ip"));
        assert_eq!(lookup("100.64.0.9"), Some(cfg.peers[0].handle));
        assert_eq!(lookup("100.64.1.9"), None);
        assert_eq!(lookup("100.64.2.9"), Some(cfg.peers[1].handle));
    }

    #[test]
    fn private_key_is_stored_clamped() {
        let cfg = DeviceConfig::new(Some(key(0xff)), 51820);
        let mut want = [0xff; 32];
        want[0] = 0xf8;
        want[31] = 0x7f;
        assert_eq!(cfg.private_key, Some(Key(want)));
        let (cfg, _) = DeviceConfig::new(None, 51820)
            .apply(SetRequest {
                private_key: Some(Some(key(0xff))),
                ..SetRequest::default()
            })
            .expect("valid");
        assert_eq!(cfg.private_key, Some(Key(want)));
        assert_eq!(cfg.public_key(), Some(public_key_of(&key(0xff))));
    }

    #[test]
    fn update_only_does_not_create_and_remove_removes() {
        let cfg = DeviceConfig::new(Some(key(1)), 51820);
        let mut only = peer(2, &["100.64.0.2/32"]);
        only.update_only = true;
        let (cfg, plan) = cfg.apply(set(vec![only])).expect("valid");
        assert!(cfg.peers.is_empty());
        assert!(plan.before_table.is_empty() && plan.table.is_none());

        let (cfg, _) = cfg
            .apply(set(vec![peer(2, &["100.64.0.2/32"])]))
            .expect("valid");
        let handle = cfg.peers[0].handle;
        let mut gone = peer(2, &[]);
        gone.remove = true;
        let (cfg, plan) = cfg.apply(set(vec![gone])).expect("valid");
        assert!(cfg.peers.is_empty());
        assert!(matches!(plan.after_table[..], [Change::RemovePeer(h)] if h == handle));
        let table = plan.table.expect("routes changed");
        assert_eq!(table.lookup("100.64.0.2".parse().expect("ip")), None);
    }

    #[test]
    fn replace_allowed_ips_and_removals() {
        let cfg = DeviceConfig::new(Some(key(1)), 51820);
        let (cfg, _) = cfg
            .apply(set(vec![peer(2, &["100.64.0.0/24", "fd00::/64"])]))
            .expect("valid");
        let mut change = peer(2, &["100.64.9.0/24"]);
        change.replace_allowed_ips = true;
        let (cfg, _) = cfg.apply(set(vec![change])).expect("valid");
        assert_eq!(ips(&cfg, 2), ["100.64.9.0/24"]);
        let mut change = peer(2, &["100.64.9.0/24"]);
        change.allowed_ips[0].remove = true;
        let (cfg, _) = cfg.apply(set(vec![change])).expect("valid");
        assert!(ips(&cfg, 2).is_empty());
    }

    #[test]
    fn own_key_peer_is_ignored_and_dropped_on_key_change() {
        let own = key(1);
        let own_public = Key(public_key_of(&own));
        let cfg = DeviceConfig::new(Some(key(9)), 51820);
        let (cfg, _) = cfg
            .apply(set(vec![PeerChange {
                public_key: own_public.clone(),
                ..peer(0, &["100.64.0.2/32"])
            }]))
            .expect("valid");
        assert_eq!(cfg.peers.len(), 1);
        let (cfg, plan) = cfg
            .apply(SetRequest {
                private_key: Some(Some(own)),
                ..SetRequest::default()
            })
            .expect("valid");
        assert!(cfg.peers.is_empty());
        assert!(plan.private_key_changed);
        let (cfg, _) = cfg
            .apply(set(vec![PeerChange {
                public_key: own_public,
                ..peer(0, &["100.64.0.2/32"])
            }]))
            .expect("valid");
        assert!(cfg.peers.is_empty());
    }

    #[test]
    fn replace_peers_gives_fresh_handles_and_reuses_slots_safely() {
        let cfg = DeviceConfig::new(Some(key(1)), 51820);
        let (cfg, _) = cfg
            .apply(set(vec![peer(2, &["100.64.0.2/32"])]))
            .expect("valid");
        let old = cfg.peers[0].handle;
        let (cfg, plan) = cfg
            .apply(SetRequest {
                replace_peers: true,
                peers: vec![peer(2, &["100.64.0.2/32"])],
                ..SetRequest::default()
            })
            .expect("valid");
        let new = cfg.peers[0].handle;
        assert_ne!(old, new);
        assert!(matches!(plan.after_table[..], [Change::RemovePeer(h)] if h == old));
        // A later peer may take the freed slot, but never the old handle.
        let (cfg, _) = cfg
            .apply(set(vec![peer(3, &["100.64.0.3/32"])]))
            .expect("valid");
        assert!(cfg.peers.iter().all(|p| p.handle != old));
    }

    #[test]
    fn the_current_state_is_untouched_by_apply() {
        let cfg = DeviceConfig::new(Some(key(1)), 51820);
        let _ = cfg
            .apply(SetRequest {
                listen_port: Some(1),
                peers: vec![peer(2, &["100.64.0.2/32"])],
                ..SetRequest::default()
            })
            .expect("valid");
        assert!(cfg.peers.is_empty());
        assert_eq!(cfg.listen_port, 51820);
    }
}
