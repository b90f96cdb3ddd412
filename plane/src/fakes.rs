//! In-memory ports, for tests of the control plane that need no root.
//!
//! Each fake is a cheap handle on shared state, so a test can keep one to
//! look at what the port was told after giving another to the engine, and
//! can keep the store's files across a simulated crash. Every fake can be
//! told to fail its next operations; the store can also "crash": after a
//! given number of writes every later one fails, as a power cut would
//! leave it.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use ipnet::IpNet;
use vpcgate_node::{PeerHandle, RouteTable};

use crate::datapath::{DatapathPlan, PeerState, Step};
use crate::errno::{EADDRINUSE, EIO};
use crate::key::Key;
use crate::ports::{
    Datapath, LinkDns, Links, Nat, NatForm, NatState, Notifier, PortError, Resolver, ServiceState,
    Store,
};
use crate::settings::Settings;
use crate::stored::StoredPeer;

/// Makes the next `n` operations of a fake fail.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    pub fail_next: u32,
    /// Operations that failed so far.
    pub failed: u32,
}

impl Faults {
    fn check(&mut self, what: &str) -> Result<(), PortError> {
        if self.fail_next > 0 {
            self.fail_next -= 1;
            self.failed += 1;
            return Err(PortError::new(EIO, format!("{what} failed (injected)")));
        }
        Ok(())
    }
}

/// The state files, as a disk would hold them.
#[derive(Default, Clone)]
pub struct Files {
    pub key: Option<Key>,
    pub settings: Option<Settings>,
    pub peers: Vec<StoredPeer>,
}

#[derive(Default)]
pub struct StoreState {
    pub files: Files,
    pub faults: Faults,
    /// Writes left before the crash; `None`: no crash planned.
    pub crash_after: Option<u32>,
    pub crashed: bool,
    pub writes: u32,
}

#[derive(Clone, Default)]
pub struct FakeStore(pub Rc<RefCell<StoreState>>);

impl FakeStore {
    fn write(&self, what: &str, apply: impl FnOnce(&mut Files)) -> Result<(), PortError> {
        let mut s = self.0.borrow_mut();
        if s.crashed {
            return Err(PortError::new(EIO, "the machine is down"));
        }
        if s.crash_after == Some(0) {
            s.crashed = true;
            return Err(PortError::new(EIO, "the machine is down"));
        }
        s.faults.check(what)?;
        if let Some(n) = s.crash_after.as_mut() {
            *n -= 1;
        }
        s.writes += 1;
        apply(&mut s.files);
        Ok(())
    }
}

impl Store for FakeStore {
    fn save_key(&mut self, key: &Key) -> Result<(), PortError> {
        self.write("saving the key", |f| f.key = Some(key.clone()))
    }
    fn save_settings(&mut self, settings: &Settings) -> Result<(), PortError> {
        self.write("saving the settings", |f| {
            f.settings = Some(settings.clone())
        })
    }
    fn save_peers(&mut self, peers: &[StoredPeer]) -> Result<(), PortError> {
        self.write("saving the peers", |f| f.peers = peers.to_vec())
    }
}

#[derive(Default)]
pub struct NatTable {
    pub state: Option<NatState>,
    pub faults: Faults,
    pub calls: u32,
}

#[derive(Clone, Default)]
pub struct FakeNat(pub Rc<RefCell<NatTable>>);

impl Nat for FakeNat {
    fn apply(&mut self, desired: &NatState) -> Result<(), PortError> {
        let mut t = self.0.borrow_mut();
        t.calls += 1;
        t.faults.check("nft")?;
        t.state = Some(desired.clone());
        Ok(())
    }
    fn remove(&mut self) -> Result<(), PortError> {
        let mut t = self.0.borrow_mut();
        t.calls += 1;
        t.faults.check("nft")?;
        t.state = None;
        Ok(())
    }
    fn form(&self) -> Option<NatForm> {
        self.0
            .borrow()
            .state
            .as_ref()
            .filter(|s| !s.ranges.is_empty())
            .map(|_| NatForm::Inet)
    }
}

#[derive(Default)]
pub struct Link {
    pub addresses: Vec<IpNet>,
    pub mtu: u32,
    pub routes: BTreeSet<IpNet>,
    pub faults: Faults,
    pub calls: u32,
}

#[derive(Clone, Default)]
pub struct FakeLinks(pub Rc<RefCell<Link>>);

impl Links for FakeLinks {
    async fn configure(&mut self, old: &[IpNet], new: &[IpNet], mtu: u32) -> Result<(), PortError> {
        let mut l = self.0.borrow_mut();
        l.calls += 1;
        l.faults.check("netlink")?;
        l.addresses.retain(|a| !old.contains(a));
        for a in new {
            if !l.addresses.contains(a) {
                l.addresses.push(*a);
            }
        }
        l.mtu = mtu;
        Ok(())
    }
    async fn add_route(&mut self, net: IpNet) -> Result<(), PortError> {
        let mut l = self.0.borrow_mut();
        l.calls += 1;
        l.faults.check("netlink")?;
        l.routes.insert(net);
        Ok(())
    }
    async fn del_route(&mut self, net: IpNet) -> Result<(), PortError> {
        let mut l = self.0.borrow_mut();
        l.calls += 1;
        l.faults.check("netlink")?;
        l.routes.remove(&net);
        Ok(())
    }
}

/// systemd-resolved's per-link DNS, as `resolvectl status` would show it.
#[derive(Default)]
pub struct ResolverState {
    /// Each link's servers and routing domains; a reverted link is absent.
    pub links: BTreeMap<String, LinkDns>,
    pub faults: Faults,
    pub calls: u32,
}

#[derive(Clone, Default)]
pub struct FakeResolver(pub Rc<RefCell<ResolverState>>);

impl Resolver for FakeResolver {
    async fn apply(&mut self, interface: &str, dns: Option<&LinkDns>) -> Result<(), PortError> {
        let mut r = self.0.borrow_mut();
        r.calls += 1;
        r.faults.check("systemd-resolved")?;
        match dns {
            Some(dns) => r.links.insert(interface.to_string(), dns.clone()),
            None => r.links.remove(interface),
        };
        Ok(())
    }
}

/// The data path's thread, as far as the control plane can tell.
#[derive(Default)]
pub struct Thread {
    pub private_key: Option<Key>,
    pub peers: BTreeMap<PeerHandle, PeerState>,
    pub table: Option<RouteTable<PeerHandle>>,
    pub forward: Option<RouteTable<()>>,
    /// The port in use, and the ports the machine's other programs hold.
    pub port: Option<u16>,
    pub taken: BTreeSet<u16>,
    pub mtu: u32,
    /// The ranges and DNS servers the route exchange offers, as last set.
    pub offered: Vec<IpNet>,
    pub offered_dns: Vec<std::net::IpAddr>,
    pub faults: Faults,
    /// Calls that asked for something (bind, install, apply).
    pub calls: u32,
    /// Times a published table named a peer the thread did not have.
    pub dangling: u32,
}

impl Thread {
    fn check_table(&mut self) {
        if let Some(table) = &self.table {
            if table.values().any(|h| !self.peers.contains_key(&h)) {
                self.dangling += 1;
            }
        }
    }

    fn step(&mut self, step: Step) {
        match step {
            Step::SetPrivateKey(key) => self.private_key = key,
            Step::UpsertPeer(peer) => {
                self.peers.insert(peer.handle, peer);
            }
            Step::RemovePeer(handle) => {
                self.peers.remove(&handle);
            }
            Step::SetEndpoint(handle, endpoint) => {
                if let Some(p) = self.peers.get_mut(&handle) {
                    p.endpoint = Some(endpoint);
                }
            }
            Step::SetKeepalive(handle, keepalive) => {
                if let Some(p) = self.peers.get_mut(&handle) {
                    p.persistent_keepalive = keepalive;
                }
            }
            Step::SetRouteSource(handle, source) => {
                if let Some(p) = self.peers.get_mut(&handle) {
                    p.route_source = source;
                }
            }
            Step::SetMtu(mtu) => self.mtu = mtu,
            Step::SetAdvertised(ranges, dns) => {
                self.offered = ranges;
                self.offered_dns = dns.map(|d| d.servers().collect()).unwrap_or_default();
            }
            Step::SetLocalAddress(_)
            | Step::SetPriority(_)
            | Step::SetMssClamp(..)
            | Step::SetFwmark(_) => {}
        }
    }
}

#[derive(Clone, Default)]
pub struct FakeDatapath(pub Rc<RefCell<Thread>>);

impl Datapath for FakeDatapath {
    type Sockets = u16;

    fn bind(&mut self, port: u16, _fwmark: u32) -> Result<(u16, u16), PortError> {
        let mut t = self.0.borrow_mut();
        t.calls += 1;
        t.faults.check("binding")?;
        if t.taken.contains(&port) {
            return Err(PortError::new(
                EADDRINUSE,
                format!("cannot listen on UDP port {port}: Address in use"),
            ));
        }
        // 0: the kernel picks one.
        let bound = if port == 0 { 40_000 } else { port };
        Ok((bound, bound))
    }

    async fn install(&mut self, sockets: u16) {
        let mut t = self.0.borrow_mut();
        t.calls += 1;
        t.port = Some(sockets);
    }

    async fn apply(&mut self, plan: DatapathPlan) {
        let mut t = self.0.borrow_mut();
        t.calls += 1;
        // The thread reads the published table between any two steps.
        for step in plan.before {
            t.step(step);
            t.check_table();
        }
        if let Some(publish) = plan.publish {
            if let Some(peers) = publish.peers {
                t.table = Some(peers);
            }
            if let Some(forward) = publish.forward {
                t.forward = Some(forward);
            }
        }
        t.check_table();
        for step in plan.after {
            t.step(step);
            t.check_table();
        }
    }
}

#[derive(Clone, Default)]
pub struct FakeNotifier(pub Rc<RefCell<Vec<ServiceState>>>);

impl Notifier for FakeNotifier {
    fn notify(&mut self, state: ServiceState) {
        self.0.borrow_mut().push(state);
    }
}
