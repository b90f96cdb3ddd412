//! The WireGuard device as `wg` sees it (the private key, the fwmark and the
//! peers with their allowed IPs and learned routes) and the pure step that
//! applies a `wg set` to it ([`SetRequest`], whatever protocol carried it).
//!
//! Applying a request works on a copy: the caller keeps the current state
//! until every part of the request was valid, so a rejected request changes
//! nothing. Peer statistics are not here: they belong to the data path and
//! are kept by its port, keyed by [`PeerHandle`].

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::IpNet;
use vpcgate_node::{handle_slot, PeerHandle, MAX_PEERS};

use crate::errno::ENOSPC;
use crate::key::{clamped, public_key_of, Key};

/// A validated `set`. `None` means the request did not mention the setting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetRequest {
    /// `Some(None)`: the request cleared the key (sent all zeros).
    pub private_key: Option<Option<Key>>,
    pub listen_port: Option<u16>,
    /// `Some(0)` clears the mark.
    pub fwmark: Option<u32>,
    /// Remove every existing peer before applying `peers`.
    pub replace_peers: bool,
    /// In the order sent. One public key may appear more than once; apply the
    /// entries in order, as wireguard-go applies lines.
    pub peers: Vec<PeerChange>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    pub public_key: Key,
    /// Remove the peer; every other field is then to be ignored.
    pub remove: bool,
    /// Change the peer only if it already exists; never create it.
    pub update_only: bool,
    /// `Some(None)`: the request cleared the key (sent all zeros).
    pub preshared_key: Option<Option<Key>>,
    pub endpoint: Option<SocketAddr>,
    /// `Some(0)` turns the keepalive off.
    pub persistent_keepalive: Option<u16>,
    /// Drop the peer's existing allowed IPs before applying `allowed_ips`.
    /// `allowed_ip` lines that came before `replace_allowed_ips=true` in the
    /// same peer section are discarded, since the replacement undoes them.
    pub replace_allowed_ips: bool,
    /// In the order sent, host bits cleared.
    pub allowed_ips: Vec<AllowedIpChange>,
}

impl PeerChange {
    /// A change that names the peer and alters nothing.
    pub fn new(public_key: Key) -> Self {
        PeerChange {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AllowedIpChange {
    pub net: IpNet,
    /// Sent as `allowed_ip=-<cidr>`: remove this prefix from the peer.
    pub remove: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: Key,
    pub preshared_key: Option<Key>,
    /// The endpoint as configured; the live (roamed) one is the data path's.
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<IpNet>,
    pub handle: PeerHandle,
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
    /// The DNS forwarder this peer offers (accept-routes), as accepted.
    /// Not saved: the peer offers it again within a poll of a restart.
    pub learned_dns: Option<LearnedDns>,
}

/// A gateway's DNS forwarder as a client uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LearnedDns {
    /// Its addresses; only ones this peer owns for cryptokey routing.
    pub servers: Vec<std::net::IpAddr>,
    /// The zones it resolves; none: every name.
    pub zones: Vec<String>,
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
            name: None,
            client_private_key: None,
            accept_routes: false,
            accept_default_route: false,
            learned: Vec::new(),
            learned_dns: None,
        }
    }

    /// Where route requests go: the peer's tunnel address, taken as the
    /// first IPv4 host route in its allowed IPs, when it is trusted for routes.
    pub fn route_source(&self) -> Option<Ipv4Addr> {
        if !self.accept_routes {
            return None;
        }
        self.allowed_ips.iter().find_map(|net| match net {
            IpNet::V4(v4) if v4.prefix_len() == 32 => Some(v4.addr()),
            _ => None,
        })
    }

    /// Takes every configured setting from `other`, keeping this peer's
    /// handle and learned routes (so its session survives).
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

    /// The peer's name, or its key where it has none, for messages.
    pub fn label(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| crate::key::b64(&self.public_key.0))
    }
}

/// Hands out peer handles: a slot (reused after removal) and a generation
/// that is never reused.
#[derive(Clone, Default, Debug, PartialEq, Eq)]
struct Handles {
    next_slot: u32,
    free: Vec<u32>,
    generation: u32,
}

impl Handles {
    fn allocate(&mut self) -> Result<PeerHandle, i32> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if self.next_slot < MAX_PEERS => {
                self.next_slot += 1;
                self.next_slot - 1
            }
            None => return Err(ENOSPC),
        };
        self.generation = self.generation.wrapping_add(1);
        Ok(u64::from(self.generation) << 32 | u64::from(slot))
    }

    fn release(&mut self, handle: PeerHandle) {
        self.free.push(handle_slot(handle));
    }
}

#[derive(Clone, Default, Debug, PartialEq, Eq)]
pub struct DeviceConfig {
    pub private_key: Option<Key>,
    pub fwmark: u32,
    pub peers: Vec<PeerConfig>,
    handles: Handles,
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
    pub fn new(private_key: Option<Key>) -> Self {
        DeviceConfig {
            private_key: private_key.map(clamped),
            ..DeviceConfig::default()
        }
    }

    pub fn public_key(&self) -> Option<[u8; 32]> {
        self.private_key.as_ref().map(public_key_of)
    }

    pub fn peer_by_name(&self, name: &str) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.name.as_deref() == Some(name))
    }

    pub fn peer_by_handle(&self, handle: PeerHandle) -> Option<&PeerConfig> {
        self.peers.iter().find(|p| p.handle == handle)
    }

    pub fn peer_by_handle_mut(&mut self, handle: PeerHandle) -> Option<&mut PeerConfig> {
        self.peers.iter_mut().find(|p| p.handle == handle)
    }

    /// Adds a peer with a fresh handle.
    pub fn push_peer(&mut self, public_key: Key) -> Result<&mut PeerConfig, i32> {
        let handle = self.handles.allocate()?;
        self.peers.push(PeerConfig::new(public_key, handle));
        let last = self.peers.len() - 1;
        Ok(&mut self.peers[last])
    }

    /// Frees the slots of the peers `before` had and this state no longer
    /// has, so later peers can take them (with a new generation).
    pub fn release_removed(&mut self, before: &DeviceConfig) {
        let kept: HashSet<PeerHandle> = self.peers.iter().map(|p| p.handle).collect();
        for peer in &before.peers {
            if !kept.contains(&peer.handle) {
                self.handles.release(peer.handle);
            }
        }
    }

    /// Applies a parsed `set` in place; the caller works on a copy. Returns
    /// an errno when the request cannot be applied.
    pub fn apply_set(&mut self, req: SetRequest) -> Result<(), i32> {
        let next = self;

        if let Some(private_key) = req.private_key {
            next.private_key = private_key.map(clamped);
            // As in the kernel: a peer with our own public key is dropped.
            if let Some(own) = next.public_key() {
                next.peers.retain(|p| p.public_key.0 != own);
            }
        }
        if let Some(fwmark) = req.fwmark {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::{diff, DatapathPlan, Step};
    use crate::model::{Desired, LinkState};
    use crate::settings::Settings;

    /// Applies `req` to a copy, as the planner does, and returns the copy
    /// with the data-path steps from the old state to it.
    trait Apply {
        fn apply(&self, req: SetRequest) -> Result<(DeviceConfig, DatapathPlan), i32>;
    }

    impl Apply for DeviceConfig {
        fn apply(&self, req: SetRequest) -> Result<(DeviceConfig, DatapathPlan), i32> {
            let mut next = self.clone();
            next.apply_set(req)?;
            next.release_removed(self);
            let project = |device: &DeviceConfig| {
                Desired {
                    interface: "t".into(),
                    device: device.clone(),
                    settings: Settings::new(Vec::new(), 0),
                    link: LinkState {
                        networks: Vec::new(),
                        mtu: 1420,
                    },
                    dns_serving: Vec::new(),
                    choice: Default::default(),
                    health: Default::default(),
                }
                .datapath()
            };
            let plan = diff(Some(&project(self)), &project(&next));
            Ok((next, plan))
        }
    }

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
        let cfg = DeviceConfig::new(Some(key(1)));
        let (cfg, _) = cfg
            .apply(set(vec![peer(2, &["100.64.0.0/24"])]))
            .expect("valid");
        let (cfg, plan) = cfg
            .apply(set(vec![peer(3, &["100.64.0.0/24", "100.64.1.0/24"])]))
            .expect("valid");
        assert!(ips(&cfg, 2).is_empty());
        assert_eq!(ips(&cfg, 3), ["100.64.0.0/24", "100.64.1.0/24"]);
        let table = plan.publish.and_then(|p| p.peers).expect("routes changed");
        let owner = cfg.peers[1].handle;
        assert_eq!(table.lookup("100.64.0.9".parse().expect("ip")), Some(owner));
    }

    #[test]
    fn ownership_stays_single_through_one_request() {
        let cfg = DeviceConfig::new(Some(key(1)));
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
        let table = plan.publish.and_then(|p| p.peers).expect("routes changed");
        let lookup = |ip: &str| table.lookup(ip.parse().expect("ip"));
        assert_eq!(lookup("100.64.0.9"), Some(cfg.peers[0].handle));
        assert_eq!(lookup("100.64.1.9"), None);
        assert_eq!(lookup("100.64.2.9"), Some(cfg.peers[1].handle));
    }

    #[test]
    fn private_key_is_stored_clamped() {
        let cfg = DeviceConfig::new(Some(key(0xff)));
        let mut want = [0xff; 32];
        want[0] = 0xf8;
        want[31] = 0x7f;
        assert_eq!(cfg.private_key, Some(Key(want)));
        let (cfg, _) = DeviceConfig::new(None)
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
        let cfg = DeviceConfig::new(Some(key(1)));
        let mut only = peer(2, &["100.64.0.2/32"]);
        only.update_only = true;
        let (cfg, plan) = cfg.apply(set(vec![only])).expect("valid");
        assert!(cfg.peers.is_empty());
        assert!(plan.is_empty());

        let (cfg, _) = cfg
            .apply(set(vec![peer(2, &["100.64.0.2/32"])]))
            .expect("valid");
        let handle = cfg.peers[0].handle;
        let mut gone = peer(2, &[]);
        gone.remove = true;
        let (cfg, plan) = cfg.apply(set(vec![gone])).expect("valid");
        assert!(cfg.peers.is_empty());
        assert!(matches!(plan.after[..], [Step::RemovePeer(h)] if h == handle));
        let table = plan.publish.and_then(|p| p.peers).expect("routes changed");
        assert_eq!(table.lookup("100.64.0.2".parse().expect("ip")), None);
    }

    #[test]
    fn replace_allowed_ips_and_removals() {
        let cfg = DeviceConfig::new(Some(key(1)));
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
        let cfg = DeviceConfig::new(Some(key(9)));
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
        assert!(plan
            .before
            .iter()
            .any(|s| matches!(s, Step::SetPrivateKey(_))));
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
        let cfg = DeviceConfig::new(Some(key(1)));
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
        assert!(matches!(plan.after[..], [Step::RemovePeer(h)] if h == old));
        // A later peer may take the freed slot, but never the old handle.
        let (cfg, _) = cfg
            .apply(set(vec![peer(3, &["100.64.0.3/32"])]))
            .expect("valid");
        assert!(cfg.peers.iter().all(|p| p.handle != old));
    }

    #[test]
    fn the_current_state_is_untouched_by_apply() {
        let cfg = DeviceConfig::new(Some(key(1)));
        let _ = cfg
            .apply(SetRequest {
                peers: vec![peer(2, &["100.64.0.2/32"])],
                ..SetRequest::default()
            })
            .expect("valid");
        assert!(cfg.peers.is_empty());
    }
}
