//! Start-up, the control plane's shared state, and shutdown.
//!
//! The control plane runs on a single-threaded tokio runtime: the UAPI and
//! control sockets, netlink, nftables and signals. It owns the desired state
//! behind one lock, so changes are serialised, and turns each accepted change
//! into side effects in a fixed order: whatever can fail (binding a port,
//! nftables, writing state) happens first, then the data path is updated, and
//! only then is the change committed and acknowledged.

use std::collections::HashSet;
use std::io;
use std::net::Ipv4Addr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use base64::Engine;
use ipnet::IpNet;
use nix::errno::Errno;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Mutex;
use vpcgate_proto::{PeerStatus, Request, Response, SetOptions, Status};

use crate::config::{DeviceConfig, PeerConfig, Plan};
use crate::core::mss::mss_for_mtu;
use crate::core::{
    Change, DropCounters, DropReason, Event, PeerHandle, RouteTable, Routes, SharedRoutes,
};
use crate::dataplane::{create_tun, Command, Dataplane, Offload, Stopped, UdpSockets};
use crate::nat::{Nat, NatForm, NatState, NftNat};
use crate::netlink::Netlink;
use crate::state::{self, Settings, StateDir, StoredPeer, Versioned};
use crate::subnet::{self, ClientConfig, LearnPolicy};
use crate::uapi::proto::{Key, SetRequest};

pub const DEFAULT_ADDRESS: &str = "100.64.0.1/24";
pub const DEFAULT_PORT: u16 = 51820;
pub const DEFAULT_MTU: u32 = 1420;

/// What the command line asks for; `None` means "persisted value, else default".
#[derive(Debug, Clone)]
pub struct Options {
    pub interface: String,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub listen_port: Option<u16>,
    pub addresses: Option<Vec<IpNet>>,
    pub mtu: Option<u32>,
    /// Group allowed on the control socket besides root.
    pub socket_group: Option<String>,
    /// Serve Prometheus metrics here (off when None).
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Kernel offloads the data path may use.
    pub offload: Offload,
    /// A plain WireGuard interface, as wg-quick starts one (`vpcgated
    /// IFNAME`): no default tunnel address, no key until `wg` sets one, and
    /// a listen port the kernel picks until `wg` sets one.
    pub plain: bool,
    /// Force the SNAT table's nftables form; `None` detects it.
    pub nat_form: Option<NatForm>,
}

/// What the TUN device carries right now, as the kernel reports it: the
/// addresses wg-quick or ip(8) gave it as well as ours, and its MTU.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LinkState {
    /// The networks of the device's addresses (link-local ones aside).
    networks: Vec<IpNet>,
    mtu: u32,
}

/// How the control plane reaches the TUN through netlink: its namespace's
/// connection and the device's index there. Both change if the device is
/// moved to another namespace.
#[derive(Clone)]
struct Link {
    netlink: Netlink,
    index: u32,
}

/// Everything a change may touch, behind one lock.
struct Inner {
    config: DeviceConfig,
    settings: Settings,
    link: LinkState,
    nat: Box<dyn Nat>,
    /// Set when nftables refused our table; shown in status.
    nat_error: Option<String>,
}

pub struct Daemon {
    interface: String,
    link: std::sync::Mutex<Link>,
    /// A second descriptor of the TUN, for asking the kernel which network
    /// namespace the device is in (the data path owns the first).
    tun: std::os::fd::OwnedFd,
    inner: Mutex<Inner>,
    state: StateDir,
    dataplane: Dataplane,
    routes: SharedRoutes,
    counters: Arc<DropCounters>,
    offload: Offload,
}

fn b64(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Parses a base64 key: a peer's public key, or a private or preshared key
/// read back from `peers.json` (so the decoded bytes are zeroized).
pub(crate) fn parse_key(text: &str) -> Result<Key, String> {
    let bytes = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| {
                format!(
                    "{} is not a base64 WireGuard key (as `wg pubkey` prints)",
                    subnet::quote(text)
                )
            })?,
    );
    let mut key = Key([0; 32]);
    if bytes.len() != key.0.len() {
        return Err(format!(
            "{} is not a 32-byte WireGuard key",
            subnet::quote(text)
        ));
    }
    key.0.copy_from_slice(&bytes);
    Ok(key)
}

/// The networks this node's tunnel addresses live in.
fn tunnel_networks(settings: &Settings) -> Vec<IpNet> {
    settings.addresses.iter().map(IpNet::trunc).collect()
}

fn local_v4(settings: &Settings) -> Option<Ipv4Addr> {
    settings.addresses.iter().find_map(|a| match a {
        IpNet::V4(v4) => Some(v4.addr()),
        IpNet::V6(_) => None,
    })
}

/// The forwarding scope: packets from peers may go only here. That is the
/// networks of our tunnel addresses (`--address`, and whatever else the
/// device carries, as wg-quick and ip(8) add them) and the advertised
/// ranges.
fn forward_table(settings: &Settings, link: &LinkState) -> RouteTable<()> {
    RouteTable::build(
        tunnel_networks(settings)
            .into_iter()
            .chain(link.networks.iter().copied())
            .chain(settings.advertised_routes.iter().copied())
            .map(|net| (net, ())),
    )
}

/// The MSS clamp for the device's MTU as it is, which ip(8) may have set.
fn mss_change(settings: &Settings, mtu: u32) -> Change {
    if settings.mss_clamp {
        let (v4, v6) = mss_for_mtu(u16::try_from(mtu).unwrap_or(u16::MAX));
        Change::SetMssClamp(v4, v6)
    } else {
        Change::SetMssClamp(0, 0)
    }
}

fn nat_state(interface: &str, settings: &Settings) -> NatState {
    NatState {
        interface: interface.to_string(),
        enabled: settings.snat,
        ranges: settings.advertised_routes.clone(),
    }
}

pub(crate) fn stored_peers(config: &DeviceConfig) -> Vec<StoredPeer> {
    config
        .peers
        .iter()
        .map(|p| StoredPeer {
            name: p.name.clone(),
            public_key: b64(&p.public_key.0),
            private_key: p.client_private_key.as_ref().map(|k| b64(&k.0)),
            preshared_key: p.preshared_key.as_ref().map(|k| b64(&k.0)),
            endpoint: p.endpoint,
            persistent_keepalive: p.persistent_keepalive,
            allowed_ips: p.allowed_ips.clone(),
            accept_routes: p.accept_routes,
            accept_default_route: p.accept_default_route,
            learned_routes: p.learned.clone(),
        })
        .collect()
}

/// Rebuilds the peers saved on disk into a configuration.
pub(crate) fn restore_peers(
    config: &mut DeviceConfig,
    stored: &[StoredPeer],
    path: &Path,
) -> anyhow::Result<()> {
    let corrupt = |what: String| {
        anyhow::anyhow!(
            "{} is corrupt ({what}). Restore it from a backup, or move it aside to start with no peers",
            path.display()
        )
    };
    for s in stored {
        let public_key = parse_key(&s.public_key).map_err(corrupt)?;
        if config.peers.iter().any(|p| p.public_key == public_key) {
            return Err(corrupt(format!("peer {} is listed twice", s.public_key)));
        }
        if let Some(name) = s
            .name
            .as_deref()
            .filter(|n| config.peer_by_name(n).is_some())
        {
            return Err(corrupt(format!("the name {name} is used twice")));
        }
        // A secret that does not parse is not quoted back.
        let secret = |field: &str| {
            corrupt(format!(
                "the {field} of peer {} is not a base64 32-byte key",
                s.public_key
            ))
        };
        let client_private_key = s
            .private_key
            .as_deref()
            .map(parse_key)
            .transpose()
            .map_err(|_| secret("private_key"))?;
        let preshared_key = s
            .preshared_key
            .as_deref()
            .map(parse_key)
            .transpose()
            .map_err(|_| secret("preshared_key"))?;
        let peer = config
            .push_peer(public_key)
            .map_err(|e| corrupt(format!("too many peers: {e}")))?;
        peer.name = s.name.clone();
        peer.client_private_key = client_private_key;
        peer.preshared_key = preshared_key;
        peer.endpoint = s.endpoint;
        peer.stats.set_endpoint(s.endpoint);
        peer.persistent_keepalive = s.persistent_keepalive;
        peer.allowed_ips = s.allowed_ips.iter().map(IpNet::trunc).collect();
        peer.accept_routes = s.accept_routes;
        peer.accept_default_route = s.accept_default_route;
        // Only a trusted peer's routes are kept.
        if s.accept_routes {
            peer.learned = s.learned_routes.iter().map(IpNet::trunc).collect();
        }
    }
    Ok(())
}

fn forwarding_warnings(settings: &Settings) -> Vec<String> {
    let mut warnings = Vec::new();
    let read = |path: &str| std::fs::read_to_string(path).map(|s| s.trim() == "1").ok();
    let wants = |v4: bool| {
        settings
            .advertised_routes
            .iter()
            .any(|r| r.addr().is_ipv4() == v4)
    };
    if wants(true) && read("/proc/sys/net/ipv4/ip_forward") == Some(false) {
        warnings.push(
            "IPv4 forwarding is off, so advertised IPv4 ranges are unreachable: \
             sysctl -w net.ipv4.ip_forward=1 (and persist it in /etc/sysctl.d)"
                .to_string(),
        );
    }
    if wants(false) && read("/proc/sys/net/ipv6/conf/all/forwarding") == Some(false) {
        warnings.push(
            "IPv6 forwarding is off, so advertised IPv6 ranges are unreachable: \
             sysctl -w net.ipv6.conf.all.forwarding=1 (and persist it in /etc/sysctl.d)"
                .to_string(),
        );
    }
    warnings
}

impl Daemon {
    fn link(&self) -> Link {
        self.link.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the TUN's addresses and MTU and applies what changed: the
    /// forwarding scope, the data path's buffers and the MSS clamp. Returns
    /// false if the device is not in the namespace we look at (moved away,
    /// or deleted).
    async fn refresh_link(&self) -> bool {
        let link = self.link();
        let mtu = match link.netlink.mtu(link.index).await {
            Ok(Some(mtu)) => mtu,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!("cannot read the TUN's MTU: {e}");
                return true;
            }
        };
        let networks = match link.netlink.networks(link.index).await {
            Ok(networks) => networks,
            Err(e) => {
                tracing::warn!("cannot read the TUN's addresses: {e}");
                return true;
            }
        };
        let mut inner = self.inner.lock().await;
        let next = LinkState { networks, mtu };
        if next == inner.link {
            return true;
        }
        let old = std::mem::replace(&mut inner.link, next);
        if old.networks != inner.link.networks {
            tracing::info!(networks = ?inner.link.networks, "the TUN's networks changed; forwarding scope updated");
            self.publish(&inner, None);
        }
        if old.mtu != mtu {
            tracing::info!(mtu, "the TUN's MTU changed");
            self.dataplane.send(Command::SetMtu(mtu));
            self.dataplane
                .apply(vec![mss_change(&inner.settings, mtu)])
                .await;
        }
        true
    }

    /// The TUN is no longer in the namespace we watch. If it was moved to
    /// another one, watch it there from now on and return that namespace's
    /// changes; if it was deleted, the data path stops the daemon.
    async fn follow_tun_namespace(&self) -> Option<crate::netlink::Changes> {
        use std::os::fd::AsFd;
        let moved = crate::netlink::tun_namespace(self.tun.as_fd()).and_then(|ns| {
            if crate::netlink::is_current_namespace(ns.as_fd())? {
                return Ok(None);
            }
            let name = crate::netlink::tun_name(self.tun.as_fd())?;
            let opened = crate::netlink::in_namespace(ns.as_fd(), || {
                Ok((Netlink::connect()?, Netlink::watch()?))
            })?;
            Ok(Some((name, opened)))
        });
        let (name, (netlink, changes)) = match moved {
            Ok(Some((name, Ok(opened)))) => (name, opened),
            Ok(None) => return None,
            // Deleted: the data path sees it too, and stops the daemon.
            Err(e) if e.raw_os_error() == Some(libc::EBADFD) => return None,
            Ok(Some((_, Err(e)))) => {
                tracing::warn!("the TUN moved to another network namespace, and its netlink there failed: {e}; its addresses and MTU are no longer followed");
                return None;
            }
            Err(e) => {
                tracing::warn!("the TUN left this network namespace, and we cannot follow it ({e}); its addresses and MTU are no longer followed");
                return None;
            }
        };
        match netlink.link_index(&name).await {
            Ok(index) => {
                tracing::info!(interface = %name, index, "the TUN moved to another network namespace; following it there");
                *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Link { netlink, index };
                Some(changes)
            }
            Err(e) => {
                tracing::warn!("the TUN moved to another network namespace, but {e} there");
                None
            }
        }
    }

    fn publish(&self, inner: &Inner, peers: Option<RouteTable<PeerHandle>>) {
        let current = self.routes.load();
        let peers = match peers {
            Some(table) => Arc::new(table),
            None => current.peers.clone(),
        };
        self.routes.store(Arc::new(Routes {
            peers,
            forward: Arc::new(forward_table(&inner.settings, &inner.link)),
        }));
    }

    /// Runs a plan against the data path in the order described in
    /// ARCHITECTURE.md: adds, table, removals.
    async fn execute(&self, inner: &Inner, plan: Plan, peer_count: usize) {
        if let Some(fwmark) = plan.fwmark {
            self.dataplane.send(Command::SetFwmark(fwmark));
        }
        self.dataplane.apply(plan.before_table).await;
        if let Some(table) = plan.table {
            tracing::info!(
                prefixes = table.len(),
                peers = peer_count,
                "routing table updated"
            );
            self.publish(inner, Some(table));
        }
        self.dataplane.apply(plan.after_table).await;
    }

    /// Once everything has started: saves the settings (flags given at
    /// start override the file) and rewrites, in the current format, each
    /// state file that was in an older one. Until now those files were only
    /// read, so a start that failed left them as they were.
    async fn save_after_start(&self, outdated: Outdated) -> Result<(), state::StateError> {
        let inner = self.inner.lock().await;
        self.state.save_settings(&inner.settings)?;
        if outdated.key {
            if let Some(key) = &inner.config.private_key {
                self.state.save_key(key)?;
            }
        }
        if outdated.peers {
            self.state.save_peers(&stored_peers(&inner.config))?;
        }
        if outdated.any() {
            tracing::info!(
                format = state::FORMAT,
                "rewrote the state files of an older vpcgate in the current format"
            );
        }
        Ok(())
    }

    fn save_peers(&self, config: &DeviceConfig) -> Result<(), String> {
        self.state.save_peers(&stored_peers(config)).map_err(|e| {
            tracing::error!("{e}");
            e.to_string()
        })
    }

    /// Runs the plan and makes `next` current.
    async fn apply_plan(&self, inner: &mut Inner, next: DeviceConfig, plan: Plan) {
        let peer_count = next.peers.len();
        self.execute(inner, plan, peer_count).await;
        inner.config = next;
    }

    /// Saves the peers first, then applies: nothing is acknowledged that is
    /// not on disk.
    async fn commit_plan(
        &self,
        inner: &mut Inner,
        next: DeviceConfig,
        plan: Plan,
    ) -> Result<(), String> {
        self.save_peers(&next)?;
        self.apply_plan(inner, next, plan).await;
        Ok(())
    }

    /// Writes the reply to a UAPI `get`. It holds the private key, so `out`
    /// is sized first: growing it would free a copy of the key unzeroized.
    pub async fn uapi_get(&self, out: &mut zeroize::Zeroizing<String>) {
        let view = self.inner.lock().await.config.view();
        let needed = crate::uapi::proto::get_reply_capacity(&view);
        if out.capacity() < needed {
            *out = zeroize::Zeroizing::new(String::with_capacity(needed));
        }
        out.clear();
        crate::uapi::proto::format_get(&view, out);
    }

    /// Applies a `set`; on error nothing has changed. Returns a positive errno.
    pub async fn uapi_set(&self, request: SetRequest) -> Result<(), i32> {
        let touches_peers =
            request.replace_peers || !request.peers.is_empty() || request.private_key.is_some();
        let mut inner = self.inner.lock().await;
        let (mut next, plan) = inner.config.apply(request).map_err(|e| e as i32)?;

        let sockets = match plan.listen_port {
            Some(port) => {
                let sockets = UdpSockets::bind(port, next.fwmark, self.offload).map_err(|e| {
                    tracing::warn!("cannot bind UDP port {port}: {e}");
                    e.raw_os_error().unwrap_or(libc::EIO)
                })?;
                next.listen_port = sockets.port;
                Some(sockets)
            }
            None => None,
        };
        if plan.private_key_changed {
            // A cleared key is not saved: the node keeps its identity on disk.
            if let Some(key) = &next.private_key {
                self.state.save_key(key).map_err(|e| {
                    tracing::error!("{e}");
                    libc::EIO
                })?;
            }
        }
        if touches_peers {
            self.save_peers(&next).map_err(|_| libc::EIO)?;
        }
        if let Some(sockets) = &sockets {
            let mut settings = inner.settings.clone();
            settings.listen_port = sockets.port;
            self.state.save_settings(&settings).map_err(|e| {
                tracing::error!("{e}");
                libc::EIO
            })?;
            inner.settings = settings;
        }

        if let Some(sockets) = sockets {
            tracing::info!(port = sockets.port, "listen port changed");
            self.dataplane.send(Command::Sockets(sockets));
        }
        if plan.private_key_changed {
            tracing::info!("private key changed");
        }
        self.apply_plan(&mut inner, next, plan).await;
        Ok(())
    }

    pub async fn control(&self, request: Request) -> Response {
        let result = match request {
            Request::Status => Ok(Response::Status(self.status().await)),
            Request::GetAdvertisedRoutes => {
                let inner = self.inner.lock().await;
                Ok(Response::Routes {
                    routes: inner
                        .settings
                        .advertised_routes
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                    warnings: forwarding_warnings(&inner.settings),
                })
            }
            Request::AdvertiseRoutes { routes, exit_node } => {
                self.advertise(routes, exit_node).await
            }
            Request::Set(options) => self.set(options).await,
            Request::PeerAdd(add) => self.peer_add(add).await,
            Request::PeerRemove { name } => self.peer_remove(&name).await,
            Request::PeerList => {
                let inner = self.inner.lock().await;
                Ok(Response::Peers {
                    peers: inner.config.peers.iter().map(peer_status).collect(),
                })
            }
            Request::PeerConfig { name } => {
                let inner = self.inner.lock().await;
                match inner.config.peer_by_name(&name) {
                    Some(peer) => self
                        .client_config(&inner, peer)
                        .map(|config| Response::PeerConfig { config }),
                    None => Err(format!(
                        "no peer named {}; see `vpcgate peer list`",
                        subnet::quote(&name)
                    )),
                }
            }
        };
        result.unwrap_or_else(|message| Response::Error { message })
    }

    async fn advertise(&self, input: Vec<String>, exit_node: bool) -> Result<Response, String> {
        let mut inner = self.inner.lock().await;
        let input = subnet::split_list(&input);
        let routes =
            subnet::validate_advertised(&input, &tunnel_networks(&inner.settings), exit_node)?;
        let mut settings = inner.settings.clone();
        settings.advertised_routes = routes.clone();
        settings.exit_node = exit_node;
        self.commit_settings(&mut inner, settings).await?;
        let listed: Vec<String> = routes.iter().map(ToString::to_string).collect();
        tracing::info!(routes = %listed.join(","), "advertised routes changed");
        let mut warnings = forwarding_warnings(&inner.settings);
        let link = self.link();
        match link.netlink.routes_elsewhere(link.index).await {
            Ok(host_routes) => {
                let mut tunnel = tunnel_networks(&inner.settings);
                tunnel.extend(inner.link.networks.iter().copied());
                tunnel.sort();
                tunnel.dedup();
                warnings.extend(subnet::tunnel_overlap_warnings(&tunnel, &host_routes));
            }
            Err(e) => {
                tracing::warn!("cannot check the tunnel network against this host's routes: {e}")
            }
        }
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        Ok(Response::Routes {
            routes: listed,
            warnings,
        })
    }

    async fn set(&self, options: SetOptions) -> Result<Response, String> {
        let mut inner = self.inner.lock().await;
        let mut settings = inner.settings.clone();
        if let Some(endpoint) = &options.public_endpoint {
            subnet::validate_endpoint(endpoint)?;
            settings.public_endpoint = Some(endpoint.clone());
        }
        if let Some(snat) = options.snat {
            settings.snat = snat;
        }
        if let Some(mss) = options.mss_clamp {
            settings.mss_clamp = mss;
        }
        if let Some(mtu) = options.mtu {
            if !(1280..=65535).contains(&mtu) {
                return Err(format!(
                    "MTU {mtu} is out of range: use 1280 to 65535 (IPv6 needs at least 1280)"
                ));
            }
            settings.mtu = mtu;
        }
        if let Some(list) = &options.address {
            let mut addresses = Vec::new();
            for text in subnet::split_list(list) {
                addresses.push(text.parse::<IpNet>().map_err(|_| {
                    format!(
                        "{} is not an address with a prefix length, e.g. 100.64.0.1/24",
                        subnet::quote(&text)
                    )
                })?);
            }
            validate_addresses(&addresses)?;
            if let Some(clash) = settings.advertised_routes.iter().find(|r| {
                addresses
                    .iter()
                    .any(|a| subnet::overlaps_tunnel(&a.trunc(), r))
            }) {
                return Err(format!(
                    "the tunnel network would overlap the advertised route {clash}; change the advertised routes first"
                ));
            }
            settings.addresses = addresses;
        }
        let sockets = match options.listen_port {
            Some(port) if port != inner.config.listen_port => Some(
                UdpSockets::bind(port, inner.config.fwmark, self.offload).map_err(|e| {
                    format!("cannot listen on UDP port {port}: {e}; nothing was changed")
                })?,
            ),
            _ => None,
        };
        if let Some(sockets) = &sockets {
            settings.listen_port = sockets.port;
        }
        self.commit_settings(&mut inner, settings).await?;
        if let Some(sockets) = sockets {
            inner.config.listen_port = sockets.port;
            self.dataplane.send(Command::Sockets(sockets));
            self.dataplane.barrier().await;
        }
        let s = &inner.settings;
        tracing::info!(
            snat = s.snat,
            mss_clamp = s.mss_clamp,
            public_endpoint = ?s.public_endpoint,
            listen_port = s.listen_port,
            addresses = ?s.addresses,
            mtu = s.mtu,
            "settings applied"
        );
        Ok(Response::Done {
            message: format!(
                "snat {}, mss-clamp {}, public endpoint {}, listen port {}, address {}, mtu {}",
                if s.snat { "on" } else { "off" },
                if s.mss_clamp { "on" } else { "off" },
                s.public_endpoint.as_deref().unwrap_or("(not set)"),
                s.listen_port,
                s.addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                s.mtu,
            ),
        })
    }

    /// Applies new settings: nftables first (it can refuse), then disk, then
    /// the data path. A failure leaves everything as it was.
    async fn commit_settings(&self, inner: &mut Inner, settings: Settings) -> Result<(), String> {
        let nat_changed =
            nat_state(&self.interface, &settings) != nat_state(&self.interface, &inner.settings);
        if nat_changed {
            inner
                .nat
                .apply(&nat_state(&self.interface, &settings))
                .map_err(|e| format!("cannot apply the SNAT rules: {e}; nothing was changed"))?;
        }
        if let Err(e) = self.state.save_settings(&settings) {
            if nat_changed {
                let _ = inner
                    .nat
                    .apply(&nat_state(&self.interface, &inner.settings));
            }
            return Err(format!("{e}; nothing was changed"));
        }
        if nat_changed {
            inner.nat_error = None;
        }
        let old = std::mem::replace(&mut inner.settings, settings);
        let new = &inner.settings;
        let scope_changed =
            new.advertised_routes != old.advertised_routes || new.addresses != old.addresses;
        if new.addresses != old.addresses || new.mtu != old.mtu {
            // Saved already: a netlink failure here is reported, and the
            // next start applies the saved values.
            let link = self.link();
            link.netlink
                .configure_all(link.index, &old.addresses, &new.addresses, new.mtu)
                .await
                .map_err(|e| format!("saved, but the interface could not be updated: {e}"))?;
        }
        let mut changes = Vec::new();
        if new.advertised_routes != old.advertised_routes {
            changes.push(Change::SetAdvertised(new.advertised_routes.clone()));
        }
        if new.mtu != old.mtu && new.mtu != inner.link.mtu {
            inner.link.mtu = new.mtu;
            self.dataplane.send(Command::SetMtu(new.mtu));
        }
        if new.mss_clamp != old.mss_clamp || new.mtu != old.mtu {
            changes.push(mss_change(new, inner.link.mtu));
        }
        if new.addresses != old.addresses {
            changes.push(Change::SetLocalAddress(local_v4(new)));
        }
        self.dataplane.apply(changes).await;
        if scope_changed {
            self.publish(inner, None);
        }
        Ok(())
    }

    async fn peer_add(&self, add: vpcgate_proto::PeerAdd) -> Result<Response, String> {
        subnet::validate_name(&add.name)?;
        let mut inner = self.inner.lock().await;
        if inner.config.peer_by_name(&add.name).is_some() {
            return Err(format!(
                "a peer named {:?} already exists; remove it first (`vpcgate peer remove {}`)",
                add.name, add.name
            ));
        }
        let generate = add.public_key.is_none();
        if generate && inner.settings.public_endpoint.is_none() {
            return Err("set the address clients connect to first: \
                        vpcgate set --public-endpoint HOST:PORT"
                .to_string());
        }
        let client_private_key = generate.then(crate::state::generate_key);
        let public_key = match (&add.public_key, &client_private_key) {
            (Some(text), _) => parse_key(text)?,
            (None, Some(private)) => Key(crate::config::public_key_of(private)),
            (None, None) => return Err("no key".to_string()),
        };
        // The UAPI refuses it too, so `wg syncconf` could not send it back.
        if public_key.is_zero() {
            return Err("that key is all zeros, which no peer can have".to_string());
        }
        if Some(public_key.0) == inner.config.public_key() {
            return Err("that is this node's own public key".to_string());
        }
        if let Some(other) = inner
            .config
            .peers
            .iter()
            .find(|p| p.public_key == public_key)
        {
            return Err(format!(
                "a peer with that key already exists{}",
                other
                    .name
                    .as_ref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            ));
        }
        let endpoint = match &add.endpoint {
            Some(text) => {
                subnet::validate_endpoint(text)?;
                let mut resolved = tokio::net::lookup_host(text.as_str())
                    .await
                    .map_err(|e| format!("cannot resolve {text}: {e}"))?;
                Some(
                    resolved
                        .next()
                        .ok_or_else(|| format!("{text} resolves to no address"))?,
                )
            }
            None => None,
        };
        let mut allowed_ips = Vec::new();
        let mut listed = HashSet::new();
        for text in subnet::split_list(&add.allowed_ips) {
            let net = subnet::parse_prefix(&text)?;
            if !listed.insert(net) {
                return Err(format!("{net} is listed twice"));
            }
            allowed_ips.push(net);
        }
        if allowed_ips.is_empty() {
            let used: Vec<IpNet> = inner
                .config
                .peers
                .iter()
                .flat_map(|p| p.allowed_ips.iter().copied())
                .chain(
                    inner
                        .settings
                        .addresses
                        .iter()
                        .map(|a| IpNet::from(a.addr())),
                )
                .collect();
            for network in tunnel_networks(&inner.settings) {
                let address = subnet::next_free_address(&network, &used).ok_or_else(|| {
                    format!("no free address left in the tunnel network {network}")
                })?;
                allowed_ips.push(address);
            }
        }
        // Indexed once: a request may list tens of thousands of prefixes.
        let owners: std::collections::HashMap<IpNet, &PeerConfig> = inner
            .config
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().map(move |net| (*net, p)))
            .collect();
        for net in &allowed_ips {
            if let Some(owner) = owners.get(net) {
                return Err(format!(
                    "{net} already belongs to peer {}",
                    owner
                        .name
                        .clone()
                        .unwrap_or_else(|| b64(&owner.public_key.0))
                ));
            }
        }

        let (next, plan) = inner.config.transform(|next, _| {
            let peer = next
                .push_peer(public_key.clone())
                .map_err(|e| format!("cannot add a peer: {e}"))?;
            peer.name = Some(add.name.clone());
            peer.client_private_key = client_private_key.clone();
            peer.allowed_ips = allowed_ips.clone();
            peer.endpoint = endpoint;
            peer.stats.set_endpoint(endpoint);
            peer.persistent_keepalive = add.keepalive.unwrap_or(0);
            peer.accept_routes = add.accept_routes;
            peer.accept_default_route = add.accept_default_route;
            Ok::<_, String>(())
        })?;
        self.commit_plan(&mut inner, next, plan).await?;
        tracing::info!(peer = %add.name, allowed_ips = ?allowed_ips, "peer added");
        let config = match inner.config.peer_by_name(&add.name) {
            Some(peer) if generate => Some(self.client_config(&inner, peer)?),
            _ => None,
        };
        Ok(Response::PeerAdded {
            name: add.name,
            allowed_ips: allowed_ips.iter().map(ToString::to_string).collect(),
            config,
        })
    }

    async fn peer_remove(&self, name: &str) -> Result<Response, String> {
        let mut inner = self.inner.lock().await;
        let handle = inner
            .config
            .peer_by_name(name)
            .map(|p| p.handle)
            .ok_or_else(|| {
                format!(
                    "no peer named {}; see `vpcgate peer list`",
                    subnet::quote(name)
                )
            })?;
        let learned = inner
            .config
            .peers
            .iter()
            .find(|p| p.handle == handle)
            .map(|p| p.learned.clone());
        let (next, plan) = inner.config.transform(|next, _| {
            next.peers.retain(|p| p.handle != handle);
            Ok::<_, String>(())
        })?;
        self.commit_plan(&mut inner, next, plan).await?;
        let link = self.link();
        for net in learned.unwrap_or_default() {
            let _ = link.netlink.del_route(link.index, net).await;
        }
        tracing::info!(peer = %name, "peer removed");
        Ok(Response::Done {
            message: format!("removed peer {name}"),
        })
    }

    fn client_config(&self, inner: &Inner, peer: &PeerConfig) -> Result<String, String> {
        let name = peer.name.as_deref().unwrap_or("this peer");
        let private = peer.client_private_key.as_ref().ok_or_else(|| {
            format!("{name} brought its own key, so its config lives with it; only peers added without --public-key have one here")
        })?;
        let endpoint = inner.settings.public_endpoint.as_deref().ok_or_else(|| {
            "set the address clients connect to first: vpcgate set --public-endpoint HOST:PORT"
                .to_string()
        })?;
        let gateway = inner
            .config
            .public_key()
            .ok_or("this node has no private key")?;
        let allowed: Vec<IpNet> = tunnel_networks(&inner.settings)
            .into_iter()
            .chain(inner.settings.advertised_routes.iter().copied())
            .collect();
        let private = zeroize::Zeroizing::new(b64(&private.0));
        Ok(ClientConfig {
            private_key: &private,
            addresses: &peer.allowed_ips,
            mtu: inner.settings.mtu,
            gateway_public_key: &b64(&gateway),
            endpoint,
            allowed_ips: &allowed,
        }
        .render())
    }

    /// A trusted peer advertised routes: filter, install, and route them.
    async fn learn_routes(&self, handle: PeerHandle, offered: Vec<IpNet>) {
        let mut inner = self.inner.lock().await;
        let Some(peer) = inner.config.peers.iter().find(|p| p.handle == handle) else {
            return;
        };
        if !peer.accept_routes {
            return;
        }
        let link = self.link();
        let local = match link.netlink.local_networks(link.index).await {
            Ok(local) => local,
            Err(e) => {
                tracing::warn!("cannot list local networks, ignoring learned routes: {e}");
                return;
            }
        };
        let taken: HashSet<IpNet> = inner
            .config
            .peers
            .iter()
            .filter(|p| p.handle != handle)
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect();
        let tunnel = tunnel_networks(&inner.settings);
        let policy = LearnPolicy {
            accept_default_route: peer.accept_default_route,
            tunnel: &tunnel,
            local: &local,
            taken: &taken,
        };
        let (accepted, refused) = policy.filter(&offered);
        let name = peer.name.clone().unwrap_or_else(|| b64(&peer.public_key.0));
        for reason in &refused {
            tracing::warn!(peer = %name, "not accepting route {reason}");
        }
        let previous = peer.learned.clone();
        if accepted == previous {
            return;
        }
        let Ok((next, plan)) = inner.config.transform(|next, _| {
            if let Some(p) = next.peer_by_handle_mut(handle) {
                p.learned = accepted.clone();
            }
            Ok::<_, Errno>(())
        }) else {
            return;
        };
        // Saved first, so they come back after a restart; routes point into
        // the tunnel only once the data path can carry them.
        if let Err(e) = self.commit_plan(&mut inner, next, plan).await {
            tracing::error!("cannot save learned routes, not applying them: {e}");
            return;
        }
        for net in accepted.iter().filter(|n| !previous.contains(n)) {
            if let Err(e) = link.netlink.add_route(link.index, *net).await {
                tracing::warn!(route = %net, "cannot install learned route: {e}");
            }
        }
        for net in previous.iter().filter(|n| !accepted.contains(n)) {
            if let Err(e) = link.netlink.del_route(link.index, *net).await {
                tracing::debug!(route = %net, "cannot remove learned route: {e}");
            }
        }
        let listed: Vec<String> = accepted.iter().map(ToString::to_string).collect();
        tracing::info!(peer = %name, routes = %listed.join(","), "accepted routes changed");
    }

    pub async fn metrics_sample(&self) -> crate::metrics::Sample {
        let inner = self.inner.lock().await;
        crate::metrics::Sample {
            peers: inner
                .config
                .peers
                .iter()
                .map(|p| crate::metrics::PeerSample {
                    name: p.name.clone(),
                    public_key: b64(&p.public_key.0),
                    rx_bytes: p.stats.rx_bytes(),
                    tx_bytes: p.stats.tx_bytes(),
                    last_handshake: p.stats.last_handshake(),
                })
                .collect(),
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.as_str(), self.counters.get(*r)))
                .collect(),
            advertised_routes: inner.settings.advertised_routes.len(),
            accepted_routes: inner.config.peers.iter().map(|p| p.learned.len()).sum(),
        }
    }

    /// SIGHUP: re-reads the settings and peers files and applies what
    /// changed. Peers whose key is unchanged keep their sessions.
    pub async fn reload(&self) -> Result<(), String> {
        let settings = self
            .state
            .load_settings()
            .map_err(|e| e.to_string())?
            .map(|s| s.value);
        let stored = self.state.load_peers().map_err(|e| e.to_string())?.value;
        let mut inner = self.inner.lock().await;
        let mut fresh = DeviceConfig::new(None, inner.config.listen_port);
        restore_peers(&mut fresh, &stored, &self.state.path(state::PEERS_FILE))
            .map_err(|e| e.to_string())?;
        let (next, plan) = inner
            .config
            .transform(|next, _| {
                next.peers
                    .retain(|p| fresh.peers.iter().any(|f| f.public_key == p.public_key));
                for f in fresh.peers {
                    let peer = match next.peers.iter().position(|p| p.public_key == f.public_key) {
                        Some(i) => &mut next.peers[i],
                        None => {
                            let peer = next.push_peer(f.public_key.clone())?;
                            peer.stats.set_endpoint(f.endpoint);
                            peer
                        }
                    };
                    peer.adopt_settings(f);
                }
                Ok::<_, Errno>(())
            })
            .map_err(|e| format!("cannot apply the reloaded peers: {e}"))?;
        let peer_count = next.peers.len();
        self.apply_plan(&mut inner, next, plan).await;
        if let Some(mut settings) = settings {
            // The port and addresses in use stay; `vpcgate set` changes them.
            settings.listen_port = inner.settings.listen_port;
            self.commit_settings(&mut inner, settings).await?;
        }
        tracing::info!(peers = peer_count, "reloaded settings and peers");
        Ok(())
    }

    async fn status(&self) -> Status {
        let inner = self.inner.lock().await;
        let settings = &inner.settings;
        let mut warnings = forwarding_warnings(settings);
        if let Some(e) = &inner.nat_error {
            warnings.push(format!("SNAT is not in effect: {e}"));
        }
        Status {
            interface: self.interface.clone(),
            public_key: inner
                .config
                .public_key()
                .map(|k| b64(&k))
                .unwrap_or_default(),
            listen_port: inner.config.listen_port,
            address: settings
                .addresses
                .iter()
                .find(|a| a.addr().is_ipv4())
                .or(settings.addresses.first())
                .map(ToString::to_string)
                .unwrap_or_default(),
            addresses: settings.addresses.iter().map(ToString::to_string).collect(),
            mtu: settings.mtu,
            public_endpoint: settings.public_endpoint.clone(),
            advertised_routes: settings
                .advertised_routes
                .iter()
                .map(ToString::to_string)
                .collect(),
            accepted_routes: inner
                .config
                .peers
                .iter()
                .flat_map(|p| p.learned.iter().map(ToString::to_string))
                .collect(),
            snat: settings.snat,
            snat_form: inner.nat.form().map(|f| f.to_string()),
            mss_clamp: settings.mss_clamp,
            warnings,
            peers: inner.config.peers.iter().map(peer_status).collect(),
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), self.counters.get(*r)))
                .collect(),
        }
    }
}

fn peer_status(p: &PeerConfig) -> PeerStatus {
    PeerStatus {
        name: p.name.clone(),
        public_key: b64(&p.public_key.0),
        endpoint: p.stats.endpoint().or(p.endpoint).map(|e| e.to_string()),
        allowed_ips: p.effective_allowed_ips().map(ToString::to_string).collect(),
        latest_handshake: p.stats.last_handshake().and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        }),
        rx_bytes: p.stats.rx_bytes(),
        tx_bytes: p.stats.tx_bytes(),
        persistent_keepalive: Some(p.persistent_keepalive).filter(|&k| k > 0),
        accept_routes: p.accept_routes,
    }
}

/// Creates the listening socket at `path`, replacing a stale socket file but
/// refusing to take over one that a live process still answers on.
pub fn bind_unix(path: &Path, group: Option<nix::unistd::Gid>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        // Our umask would make it 0700; the socket's own mode is the gate,
        // so the directory must let a --socket-group member through.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if socket_is_live(path) {
                bail!(
                    "{} is in use by a running process; stop it first (is another vpcgated or \
                     wireguard-go using this interface name?)",
                    path.display()
                );
            }
            // `wg` also unlinks a socket nobody answers on; if it got there
            // first, the path is just as free.
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(e)
                        .with_context(|| format!("cannot remove stale socket {}", path.display()))
                }
                _ => {}
            }
        }
        Ok(_) => bail!("{} exists and is not a socket; remove it", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    let mode = match group {
        Some(gid) => {
            nix::unistd::chown(path, None, Some(gid))
                .with_context(|| format!("cannot give {} to group {gid}", path.display()))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(listener)
}

/// Whether a process listens on the socket at `path`. A child we spawned
/// (`nft`) holds copies of all our descriptors from the fork until its
/// exec closes them; if we were killed in that window, the socket of the
/// dead daemon still accepts for a few milliseconds. So a socket that
/// accepts is asked again for a moment before it counts as in use.
fn socket_is_live(path: &Path) -> bool {
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);
    let deadline = std::time::Instant::now() + PATIENCE;
    for attempt in 0.. {
        if std::os::unix::net::UnixStream::connect(path).is_err() {
            if attempt > 0 {
                tracing::info!(
                    path = %path.display(),
                    "a stale socket answered for a moment (a child of the dead daemon held it)"
                );
            }
            return false;
        }
        if std::time::Instant::now() >= deadline {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    true
}

/// Removes a socket file only if it is still the one we created.
struct SocketFile {
    path: PathBuf,
    inode: u64,
}

impl SocketFile {
    fn new(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::symlink_metadata(path)
            .map(|m| m.ino())
            .unwrap_or(0);
        SocketFile {
            path: path.to_path_buf(),
            inode,
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// At most one address per family, as `--address` documents.
pub fn validate_addresses(addresses: &[IpNet]) -> Result<(), String> {
    let v4 = addresses.iter().filter(|a| a.addr().is_ipv4()).count();
    let v6 = addresses.len() - v4;
    if addresses.is_empty() || v4 > 1 || v6 > 1 {
        return Err(
            "give one IPv4 and/or one IPv6 tunnel address, e.g. 100.64.0.1/24,fd00:64::1/64".into(),
        );
    }
    if let Some(a) = addresses
        .iter()
        .find(|a| a.addr() == a.network() && a.prefix_len() < a.max_prefix_len())
    {
        return Err(format!(
            "{a} is a network address; give this node's own address in it, e.g. {}",
            a.hosts().next().map(|h| h.to_string()).unwrap_or_default()
        ));
    }
    Ok(())
}

/// Which state files were read in an older format than [`state::FORMAT`].
#[derive(Debug, Clone, Copy)]
struct Outdated {
    key: bool,
    settings: bool,
    peers: bool,
}

impl Outdated {
    fn any(self) -> bool {
        self.key || self.settings || self.peers
    }
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let state = StateDir::open(&options.state_dir)?;
    // Every file is read, and its format checked, before anything is
    // written: a state directory from a newer vpcgate stays as it is.
    let saved_key = state.load_key()?;
    let saved = state.load_settings()?;
    let stored_peers = state.load_peers()?;
    let outdated = Outdated {
        key: saved_key.as_ref().is_some_and(Versioned::outdated),
        settings: saved.as_ref().is_some_and(Versioned::outdated),
        peers: stored_peers.outdated(),
    };
    let private_key = match saved_key {
        Some(key) => Some(key.value),
        None if options.plain => None,
        None => {
            let (key, _) = state.load_or_create_key()?;
            tracing::info!(path = %state.path(state::KEY_FILE).display(), "generated a new private key");
            Some(key.value)
        }
    };
    let mut settings = match saved {
        Some(settings) => settings.value,
        // wg-quick sets the addresses and, if the config has one, the port.
        None if options.plain => Settings::new(Vec::new(), 0),
        None => Settings::new(
            vec![DEFAULT_ADDRESS.parse().context("default address")?],
            DEFAULT_PORT,
        ),
    };
    if let Some(addresses) = &options.addresses {
        settings.addresses = addresses.clone();
    }
    if let Some(port) = options.listen_port {
        settings.listen_port = port;
    }
    if let Some(mtu) = options.mtu {
        settings.mtu = mtu;
    }
    if !(options.plain && settings.addresses.is_empty()) {
        validate_addresses(&settings.addresses).map_err(anyhow::Error::msg)?;
    }
    let tunnel = tunnel_networks(&settings);
    if let Some(clash) = settings
        .advertised_routes
        .iter()
        .find(|r| tunnel.iter().any(|t| subnet::overlaps_tunnel(t, r)))
    {
        bail!("the advertised route {clash} overlaps the tunnel network; pick another --address or change the advertised routes");
    }

    let uapi_path = crate::uapi::socket_path(&options.interface);
    // Claim both sockets before touching the network, so a second instance
    // fails without disturbing the first.
    let socket_group = options
        .socket_group
        .as_deref()
        .map(crate::access::resolve_group)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let uapi_listener = bind_unix(&uapi_path, None)?;
    let _uapi_file = SocketFile::new(&uapi_path);
    let control_listener = bind_unix(&options.socket, socket_group)?;
    let _control_file = SocketFile::new(&options.socket);

    let metrics_listener = match options.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?,
        ),
        None => None,
    };

    let tun = create_tun(&options.interface, options.offload.tun).map_err(|e| {
        anyhow::anyhow!(
            "cannot create TUN device {}: {e} (is /dev/net/tun present and may this user open \
             it, do we have CAP_NET_ADMIN, and is the name free? `vpcgate doctor` checks)",
            options.interface
        )
    })?;
    let netlink = Netlink::connect().context("cannot open netlink")?;
    // Subscribed before the first read, so no change falls in between.
    let link_changes = Netlink::watch().context("cannot subscribe to netlink events")?;
    let tun_index = netlink.link_index(&options.interface).await?;
    netlink
        .configure_all(tun_index, &[], &settings.addresses, settings.mtu)
        .await
        .with_context(|| format!("cannot configure {}", options.interface))?;
    let link = LinkState {
        networks: netlink
            .networks(tun_index)
            .await
            .with_context(|| format!("cannot read the addresses of {}", options.interface))?,
        mtu: settings.mtu,
    };
    let tun_fd = std::os::fd::AsFd::as_fd(&tun)
        .try_clone_to_owned()
        .context("cannot duplicate the TUN descriptor")?;

    let sockets = UdpSockets::bind(settings.listen_port, 0, options.offload)
        .with_context(|| format!("cannot bind UDP port {}", settings.listen_port))?;
    let port = sockets.port;

    let mut config = DeviceConfig::new(private_key, port);
    restore_peers(
        &mut config,
        &stored_peers.value,
        &state.path(state::PEERS_FILE),
    )?;
    let routes: SharedRoutes = Arc::new(ArcSwap::from_pointee(Routes::default()));
    let counters = Arc::new(DropCounters::default());
    let (exit_tx, mut exit_rx) = tokio::sync::oneshot::channel();
    let (events_tx, mut events_rx) = tokio::sync::mpsc::unbounded_channel();
    let dataplane = Dataplane::spawn(
        tun,
        settings.mtu,
        sockets,
        routes.clone(),
        counters.clone(),
        events_tx,
        exit_tx,
    )?;

    let mut nat: Box<dyn Nat> = Box::new(match options.nat_form {
        Some(form) => NftNat::with_form(form),
        None => NftNat::new(),
    });
    let nat_error = match nat.apply(&nat_state(&options.interface, &settings)) {
        Ok(()) => None,
        Err(e) => {
            tracing::error!("SNAT is not in effect: {e}");
            Some(e.to_string())
        }
    };
    for warning in forwarding_warnings(&settings) {
        tracing::warn!("{warning}");
    }

    let mut plan = config.initial_plan();
    plan.before_table.extend([
        Change::SetLocalAddress(local_v4(&settings)),
        Change::SetAdvertised(settings.advertised_routes.clone()),
        mss_change(&settings, settings.mtu),
    ]);
    let peer_count = config.peers.len();
    let daemon = Arc::new(Daemon {
        interface: options.interface.clone(),
        link: std::sync::Mutex::new(Link {
            netlink,
            index: tun_index,
        }),
        tun: tun_fd,
        inner: Mutex::new(Inner {
            config: DeviceConfig::new(None, port),
            settings: settings.clone(),
            link,
            nat,
            nat_error,
        }),
        state,
        dataplane,
        routes,
        counters,
        offload: options.offload,
    });
    {
        let mut inner = daemon.inner.lock().await;
        daemon.apply_plan(&mut inner, config, plan).await;
        // Routes learned before a restart are back before their peer answers.
        let link = daemon.link();
        for net in inner.config.peers.iter().flat_map(|p| p.learned.iter()) {
            if let Err(e) = link.netlink.add_route(link.index, *net).await {
                tracing::warn!(route = %net, "cannot restore a learned route: {e}");
            }
        }
    }

    // Everything that can fail has started; nothing is served yet.
    if let Err(e) = daemon.save_after_start(outdated).await {
        shut_down(daemon).await;
        return Err(e.into());
    }

    let uapi_task = tokio::spawn(crate::uapi::serve(uapi_listener, daemon.clone()));
    let control_task = tokio::spawn(crate::control::serve(
        control_listener,
        daemon.clone(),
        crate::access::Access {
            group: socket_group,
        },
    ));
    let events_task = tokio::spawn({
        let daemon = daemon.clone();
        async move {
            while let Some(event) = events_rx.recv().await {
                match event {
                    Event::RoutesLearned { peer, routes } => {
                        daemon.learn_routes(peer, routes).await
                    }
                }
            }
        }
    });
    let metrics_task = tokio::spawn({
        let daemon = daemon.clone();
        async move {
            if let Some(listener) = metrics_listener {
                crate::metrics::serve(listener, daemon).await;
            }
        }
    });
    let watchdog_task = tokio::spawn(watchdog(daemon.dataplane.heartbeat.clone()));
    let link_task = tokio::spawn(follow_link(daemon.clone(), link_changes));
    tracing::info!(
        interface = %options.interface,
        addresses = ?settings.addresses,
        port,
        peers = peer_count,
        public_key = %daemon.status().await.public_key,
        metrics = ?options.metrics_listen,
        "vpcgated is up"
    );
    // The data path is running and every socket is served: tell systemd.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let outcome = loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break Ok(()) }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break Ok(()) }
            _ = hup.recv() => {
                let mut states = vec![sd_notify::NotifyState::Reloading];
                states.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
                let _ = sd_notify::notify(&states);
                if let Err(e) = daemon.reload().await {
                    tracing::error!("reload failed, nothing changed: {e}");
                }
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
            }
            result = &mut exit_rx => break match result {
                Ok(Ok(Stopped::TunGone)) => {
                    tracing::info!(interface = %options.interface, "the TUN device was deleted: shutting down");
                    Ok(())
                }
                Ok(Err(e)) => Err(anyhow::Error::from(e).context("the data path failed")),
                _ => Err(anyhow::anyhow!("the data path stopped unexpectedly")),
            },
        }
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    for task in [
        uapi_task,
        control_task,
        events_task,
        metrics_task,
        watchdog_task,
        link_task,
    ] {
        task.abort();
        let _ = task.await;
    }
    shut_down(daemon).await;
    outcome
}

/// Removes the SNAT table and stops the data path, once no task holds the
/// daemon any more.
async fn shut_down(daemon: Arc<Daemon>) {
    if let Err(e) = daemon.inner.lock().await.nat.remove() {
        tracing::warn!("cannot remove the SNAT table: {e}");
    }
    match Arc::try_unwrap(daemon) {
        // Closing the TUN's only descriptor removes the interface and the
        // routes through it.
        Ok(daemon) => daemon.dataplane.shutdown(),
        Err(_) => tracing::warn!("control tasks still hold the daemon; exiting anyway"),
    }
}

/// Follows the TUN's addresses and MTU as wg-quick and ip(8) change them, in
/// whichever network namespace the device is.
async fn follow_link(daemon: Arc<Daemon>, mut changes: crate::netlink::Changes) {
    use futures::{FutureExt, StreamExt};
    // Set once the TUN is out of sight and could not be followed, so that
    // every later change in this namespace does not try (and log) again.
    let mut lost = false;
    loop {
        if daemon.refresh_link().await {
            lost = false;
        } else if !lost {
            if let Some(elsewhere) = daemon.follow_tun_namespace().await {
                changes = elsewhere;
                continue;
            }
            lost = true;
        }
        if changes.next().await.is_none() {
            tracing::warn!(
                "netlink events stopped; the TUN's addresses and MTU are no longer followed"
            );
            return;
        }
        // A burst (wg-quick adds several addresses) needs one re-read.
        while let Some(Some(())) = changes.next().now_or_never() {}
    }
}

/// Feeds systemd's watchdog while the data-path loop keeps turning. The loop
/// wakes at least every timer tick, so a heartbeat that stands still means
/// it is stuck, and systemd should restart us.
async fn watchdog(heartbeat: Arc<std::sync::atomic::AtomicU64>) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut last = heartbeat.load(std::sync::atomic::Ordering::Relaxed);
    loop {
        tokio::time::sleep(interval / 2).await;
        let now = heartbeat.load(std::sync::atomic::Ordering::Relaxed);
        if now != last {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        } else {
            tracing::error!(
                "the data path has not turned for {:?}; not feeding the watchdog",
                interval / 2
            );
        }
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_one_per_family() {
        let nets = |list: &[&str]| {
            list.iter()
                .map(|s| s.parse().expect("cidr"))
                .collect::<Vec<IpNet>>()
        };
        assert!(validate_addresses(&nets(&["100.64.0.1/24"])).is_ok());
        assert!(validate_addresses(&nets(&["100.64.0.1/24", "fd00:64::1/64"])).is_ok());
        assert!(validate_addresses(&nets(&[])).is_err());
        assert!(validate_addresses(&nets(&["100.64.0.1/24", "100.64.1.1/24"])).is_err());
        let err = validate_addresses(&nets(&["100.64.0.0/24"])).expect_err("network address");
        assert!(err.contains("100.64.0.1"), "{err}");
    }

    fn stored(name: &str, key: u8) -> StoredPeer {
        StoredPeer {
            name: Some(name.into()),
            public_key: b64(&[key; 32]),
            private_key: None,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: 0,
            allowed_ips: vec![format!("100.64.0.{key}/32").parse().expect("cidr")],
            accept_routes: false,
            accept_default_route: false,
            learned_routes: vec!["198.18.64.0/20".parse().expect("cidr")],
        }
    }

    fn garbled(name: &str) -> StoredPeer {
        let mut peer = stored(name, 2);
        peer.public_key = "garbage".into();
        peer
    }

    #[test]
    fn restored_peers_must_be_distinct_and_well_formed() {
        let path = Path::new("/state/peers.json");
        let mut config = DeviceConfig::new(None, 51820);
        restore_peers(&mut config, &[stored("a", 2), stored("b", 3)], path).expect("valid");
        assert_eq!(config.peers.len(), 2);
        assert_eq!(
            config.peer_by_name("b").map(|p| p.allowed_ips.len()),
            Some(1)
        );

        for (peers, expected) in [
            (vec![stored("a", 2), stored("b", 2)], "listed twice"),
            (vec![stored("a", 2), stored("a", 3)], "used twice"),
            (vec![garbled("a")], "not a base64"),
        ] {
            let mut config = DeviceConfig::new(None, 51820);
            let err = restore_peers(&mut config, &peers, path)
                .expect_err(expected)
                .to_string();
            assert!(
                err.contains(expected) && err.contains("/state/peers.json"),
                "{err}"
            );
        }
    }

    #[test]
    fn forward_scope_is_tunnel_plus_advertised() {
        let mut settings = Settings::new(vec!["100.64.0.1/24".parse().expect("cidr")], 51820);
        settings.advertised_routes = vec!["198.18.64.0/20".parse().expect("cidr")];
        let table = forward_table(
            &settings,
            &LinkState {
                networks: Vec::new(),
                mtu: 1420,
            },
        );
        for (addr, inside) in [
            ("100.64.0.9", true),
            ("198.18.70.1", true),
            ("169.254.169.254", false),
            ("198.19.101.10", false),
        ] {
            assert_eq!(
                table.lookup(addr.parse().expect("ip")).is_some(),
                inside,
                "{addr}"
            );
        }
    }
}
