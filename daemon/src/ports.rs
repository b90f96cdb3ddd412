//! The control plane's ports, implemented against the OS: the state
//! directory, netlink for the TUN's addresses and routes, the data-path
//! thread, and systemd's notify socket. The SNAT table's port is
//! [`crate::nat::NftNat`].

use std::collections::HashMap;
use std::sync::Arc;

use ipnet::IpNet;
use vpcgate_plane::datapath::{DatapathPlan, Step};
use vpcgate_plane::errno::EIO;
use vpcgate_plane::key::Key;
use vpcgate_plane::ports::{Datapath, Links, Notifier, PortError, ServiceState, Store};
use vpcgate_plane::settings::Settings;
use vpcgate_plane::stored::StoredPeer;
use vpcgate_plane::view::PeerLive;
use zeroize::Zeroizing;

use crate::core::{Change, PeerHandle, PeerSpec, PeerStats, Routes, SharedRoutes};
use crate::dataplane::{Command, Dataplane, Offload, UdpSockets};
use crate::netlink::Netlink;
use crate::state::{StateDir, StateError};

fn store_error(e: StateError) -> PortError {
    tracing::error!("{e}");
    PortError::new(EIO, e.to_string())
}

/// The state directory.
pub struct StateStore(pub StateDir);

impl Store for StateStore {
    fn save_key(&mut self, key: &Key) -> Result<(), PortError> {
        self.0.save_key(key).map_err(store_error)
    }
    fn save_settings(&mut self, settings: &Settings) -> Result<(), PortError> {
        self.0.save_settings(settings).map_err(store_error)
    }
    fn save_peers(&mut self, peers: &[StoredPeer]) -> Result<(), PortError> {
        self.0.save_peers(peers).map_err(store_error)
    }
}

/// How the control plane reaches the TUN through netlink: its namespace's
/// connection and the device's index there. Both change if the device is
/// moved to another namespace.
pub struct NetLinks {
    pub netlink: Netlink,
    pub index: u32,
}

impl Links for NetLinks {
    async fn configure(&mut self, old: &[IpNet], new: &[IpNet], mtu: u32) -> Result<(), PortError> {
        self.netlink
            .configure_all(self.index, old, new, mtu)
            .await
            .map_err(|e| PortError::new(EIO, format!("cannot update the interface: {e}")))
    }

    async fn add_route(&mut self, net: IpNet) -> Result<(), PortError> {
        // A replace: a route that is already there is success.
        self.netlink
            .add_route(self.index, net)
            .await
            .map_err(|e| PortError::new(EIO, format!("cannot install the route {net}: {e}")))
    }

    async fn del_route(&mut self, net: IpNet) -> Result<(), PortError> {
        match self.netlink.del_route(self.index, net).await {
            Ok(()) => Ok(()),
            // Gone already: with its device, or removed by hand.
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(PortError::new(
                EIO,
                format!("cannot remove the route {net}: {e}"),
            )),
        }
    }
}

/// The data-path thread, the routing snapshot it reads, and each peer's
/// statistics, which the thread updates and status reads.
pub struct DatapathPort {
    pub dataplane: Dataplane,
    routes: SharedRoutes,
    stats: HashMap<PeerHandle, Arc<PeerStats>>,
    offload: Offload,
}

impl DatapathPort {
    pub fn new(dataplane: Dataplane, routes: SharedRoutes, offload: Offload) -> Self {
        DatapathPort {
            dataplane,
            routes,
            stats: HashMap::new(),
            offload,
        }
    }

    pub fn live(&self, handle: PeerHandle) -> PeerLive {
        self.stats
            .get(&handle)
            .map_or_else(PeerLive::default, |s| PeerLive {
                endpoint: s.endpoint(),
                last_handshake: s.last_handshake(),
                rx_bytes: s.rx_bytes(),
                tx_bytes: s.tx_bytes(),
            })
    }

    /// Turns steps into the thread's changes and commands, in order.
    async fn run(&mut self, steps: Vec<Step>) {
        let mut changes = Vec::new();
        for step in steps {
            let change = match step {
                Step::SetPrivateKey(key) => {
                    Change::SetPrivateKey(key.map(|k| boringtun::x25519::StaticSecret::from(k.0)))
                }
                Step::UpsertPeer(peer) => {
                    let stats = self
                        .stats
                        .entry(peer.handle)
                        .or_insert_with(|| Arc::new(PeerStats::new(peer.endpoint)))
                        .clone();
                    Change::UpsertPeer(PeerSpec {
                        handle: peer.handle,
                        public_key: peer.public_key.0,
                        preshared_key: peer.preshared_key.as_ref().map(|k| Zeroizing::new(k.0)),
                        // A replaced session keeps the endpoint it roamed to.
                        endpoint: stats.endpoint().or(peer.endpoint),
                        persistent_keepalive: peer.persistent_keepalive,
                        route_source: peer.route_source,
                        stats,
                    })
                }
                Step::RemovePeer(handle) => {
                    self.stats.remove(&handle);
                    Change::RemovePeer(handle)
                }
                Step::SetEndpoint(handle, endpoint) => {
                    if let Some(stats) = self.stats.get(&handle) {
                        stats.set_endpoint(Some(endpoint));
                    }
                    Change::SetEndpoint(handle, endpoint)
                }
                Step::SetKeepalive(handle, keepalive) => Change::SetKeepalive(handle, keepalive),
                Step::SetRouteSource(handle, source) => Change::SetRouteSource(handle, source),
                Step::SetLocalAddress(address) => Change::SetLocalAddress(address),
                Step::SetAdvertised(routes, dns) => Change::SetAdvertised(routes, dns),
                Step::SetPriority(priority) => Change::SetPriority(priority),
                Step::SetMssClamp(v4, v6) => Change::SetMssClamp(v4, v6),
                Step::SetMtu(mtu) => {
                    self.flush(&mut changes);
                    self.dataplane.send(Command::SetMtu(mtu));
                    continue;
                }
                Step::SetFwmark(fwmark) => {
                    self.flush(&mut changes);
                    self.dataplane.send(Command::SetFwmark(fwmark));
                    continue;
                }
            };
            changes.push(change);
        }
        self.dataplane.apply(changes).await;
    }

    fn flush(&self, changes: &mut Vec<Change>) {
        if !changes.is_empty() {
            self.dataplane.send(Command::Apply(std::mem::take(changes)));
        }
    }
}

impl Datapath for DatapathPort {
    type Sockets = UdpSockets;

    fn bind(&mut self, port: u16, fwmark: u32) -> Result<(UdpSockets, u16), PortError> {
        match UdpSockets::bind(port, fwmark, self.offload) {
            Ok(sockets) => {
                let bound = sockets.port;
                Ok((sockets, bound))
            }
            Err(e) => {
                tracing::warn!("cannot bind UDP port {port}: {e}");
                Err(PortError::new(
                    e.raw_os_error().unwrap_or(EIO),
                    format!("cannot listen on UDP port {port}: {e}"),
                ))
            }
        }
    }

    async fn install(&mut self, sockets: UdpSockets) {
        self.dataplane.send(Command::Sockets(sockets));
        self.dataplane.barrier().await;
    }

    async fn apply(&mut self, plan: DatapathPlan) {
        self.run(plan.before).await;
        if let Some(publish) = plan.publish {
            let current = self.routes.load();
            let peers = publish.peers.map(Arc::new);
            if let Some(table) = &peers {
                tracing::info!(
                    prefixes = table.len(),
                    peers = self.stats.len(),
                    "routing table updated"
                );
            }
            self.routes.store(Arc::new(Routes {
                peers: peers.unwrap_or_else(|| current.peers.clone()),
                forward: publish
                    .forward
                    .map(Arc::new)
                    .unwrap_or_else(|| current.forward.clone()),
            }));
        }
        // Removals after the table: the thread reads the new snapshot on
        // its next packet, and no route names a peer it has forgotten.
        if !plan.after.is_empty() {
            self.run(plan.after).await;
        }
    }
}

/// systemd's notify socket; a no-op where there is none.
pub struct SdNotifier;

impl Notifier for SdNotifier {
    fn notify(&mut self, state: ServiceState) {
        let mut states = Vec::new();
        match state {
            ServiceState::Ready => states.push(sd_notify::NotifyState::Ready),
            ServiceState::Reloading => {
                states.push(sd_notify::NotifyState::Reloading);
                states.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
            }
            ServiceState::Stopping => states.push(sd_notify::NotifyState::Stopping),
            ServiceState::Watchdog => states.push(sd_notify::NotifyState::Watchdog),
        }
        let _ = sd_notify::notify(&states);
    }
}
