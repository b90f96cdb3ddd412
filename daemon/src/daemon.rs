//! Start-up and shutdown: everything is wired here, once.
//!
//! Start-up reads every state file before writing any, claims the UAPI and
//! control sockets before touching the network (so a second instance fails
//! without disturbing the first), creates the TUN and binds the UDP port,
//! starts the data-path thread, and builds the control plane's engine over
//! the real ports. The engine's first pass configures the TUN, the SNAT
//! table and the state files; only then are the sockets served and systemd
//! told that we are ready. From there the [`Owner`] task runs the control
//! plane until a signal or the data path stops it.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use ipnet::IpNet;
use vpcgate_plane::model::Desired;
use vpcgate_plane::ports::{Notifier, ServiceState};
use vpcgate_plane::reconcile::{Applied, Engine, Ports};
use vpcgate_plane::settings::{validate_addresses, Settings, DEFAULT_ADDRESS, DEFAULT_PORT};

use crate::core::{DropCounters, Routes, SharedRoutes};
use crate::dataplane::{create_tun, Dataplane, Offload, UdpSockets};
use crate::handle::Handle;
use crate::nat::{NatForm, NftNat};
use crate::netlink::Netlink;
use crate::owner::{forwarding_warnings, Exit, Owner};
use crate::ports::{DatapathPort, NetLinks, SdNotifier, StateStore};
use crate::state::{self, StateDir, Versioned};
use crate::unix::{bind_unix, SocketFile};

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
    /// Where the load balancer's health probe is answered.
    pub health_listen: Option<std::net::SocketAddr>,
    /// Kernel offloads the data path may use.
    pub offload: Offload,
    /// A plain WireGuard interface, as wg-quick starts one (`vpcgated
    /// IFNAME`): no default tunnel address, no key until `wg` sets one, and
    /// a listen port the kernel picks until `wg` sets one.
    pub plain: bool,
    /// Force the SNAT table's nftables form; `None` detects it.
    pub nat_form: Option<NatForm>,
    /// Where the DNS forwarder reads the host's resolvers, the first file
    /// that exists.
    pub resolv_conf: Vec<PathBuf>,
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
    let tunnel = settings.tunnel_networks();
    if let Some(clash) = settings.advertised_routes.iter().find(|r| {
        tunnel
            .iter()
            .any(|t| vpcgate_plane::policy::overlaps_tunnel(t, r))
    }) {
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

    let metrics_listener = bind_http(options.metrics_listen, "metrics").await?;
    let health_listener = bind_http(options.health_listen, "the health endpoint").await?;

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
    let tun_fd = std::os::fd::AsFd::as_fd(&tun)
        .try_clone_to_owned()
        .context("cannot duplicate the TUN descriptor")?;

    let sockets = UdpSockets::bind(settings.listen_port, 0, options.offload)
        .with_context(|| format!("cannot bind UDP port {}", settings.listen_port))?;
    let port = sockets.port;
    let asked = settings.listen_port;
    let desired = Desired::restore(&options.interface, private_key, settings, &stored_peers.value)
        .map_err(|reason| {
            anyhow::anyhow!(
                "{} is corrupt ({reason}). Restore it from a backup, or move it aside to start with no peers",
                state.path(state::PEERS_FILE).display()
            )
        })?;

    let routes: SharedRoutes = Arc::new(ArcSwap::from_pointee(Routes::default()));
    let counters = Arc::new(DropCounters::default());
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
    let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
    let dataplane = Dataplane::spawn(
        tun,
        desired.settings.mtu,
        sockets,
        routes.clone(),
        counters.clone(),
        events_tx,
        exit_tx,
    )?;
    let heartbeat = dataplane.heartbeat.clone();
    let nat = match options.nat_form {
        Some(form) => NftNat::with_form(form),
        None => NftNat::new(),
    };
    let applied = Applied::at_start(&desired, !outdated.key, !outdated.peers, (asked, port));
    let ports = Ports {
        store: StateStore(state),
        nat,
        links: NetLinks {
            netlink,
            index: tun_index,
        },
        datapath: DatapathPort::new(dataplane, routes.clone(), options.offload),
        resolver: crate::resolved::Resolvectl,
    };
    let dns = crate::dns::Dns::spawn(
        options.interface.clone(),
        routes.clone(),
        options.resolv_conf.clone(),
    );
    let mut owner = Owner {
        engine: Engine::new(desired, ports, applied),
        counters,
        tun: tun_fd,
        notifier: SdNotifier,
        dns,
        probes: crate::probes::Probes::new(),
    };
    // Everything that can fail starts here; nothing is served yet.
    if let Err(failure) = owner.engine.start().await {
        owner.shut_down();
        bail!("cannot start {}: {}", options.interface, failure.error);
    }
    if outdated.any() {
        tracing::info!(
            format = state::FORMAT,
            "rewrote the state files of an older vpcgate in the current format"
        );
    }
    for warning in forwarding_warnings(&owner.engine.desired().settings) {
        tracing::warn!("{warning}");
    }
    // The addresses the TUN carries now, ours and any already there.
    owner.refresh_link().await;
    owner.dns.apply(&owner.engine.desired().settings);

    let (handle, calls) = Handle::new();
    let uapi_task = tokio::spawn(crate::uapi::serve(uapi_listener, handle.clone()));
    let control_task = tokio::spawn(crate::control::serve(
        control_listener,
        handle.clone(),
        crate::access::Access {
            group: socket_group,
        },
    ));
    let metrics_task = tokio::spawn({
        let handle = handle.clone();
        async move {
            if let Some(listener) = metrics_listener {
                crate::metrics::serve(listener, handle).await;
            }
        }
    });
    let health_task = tokio::spawn({
        let handle = handle.clone();
        let heartbeat = heartbeat.clone();
        async move {
            if let Some(listener) = health_listener {
                crate::health::serve(listener, handle, heartbeat).await;
            }
        }
    });
    let watchdog_task = tokio::spawn(watchdog(heartbeat, SdNotifier));
    let desired = owner.engine.desired();
    tracing::info!(
        interface = %options.interface,
        addresses = ?desired.settings.addresses,
        port,
        peers = desired.device.peers.len(),
        public_key = %desired.device.public_key().map(|k| vpcgate_plane::key::b64(&k)).unwrap_or_default(),
        metrics = ?options.metrics_listen,
        health = ?options.health_listen,
        "vpcgated is up"
    );
    // The data path is running and every socket is served: tell systemd.
    owner.notifier.notify(ServiceState::Ready);

    let outcome = owner.run(calls, events_rx, exit_rx, link_changes).await;
    owner.notifier.notify(ServiceState::Stopping);
    for task in [
        uapi_task,
        control_task,
        metrics_task,
        health_task,
        watchdog_task,
    ] {
        task.abort();
        let _ = task.await;
    }
    drop(handle);
    owner.shut_down();
    match outcome? {
        Exit::Signal => Ok(()),
        Exit::DataPath(result) => result,
    }
}

/// The listener for an optional HTTP server (`--metrics-listen`,
/// `--health-listen`), bound before start-up goes on.
async fn bind_http(
    addr: Option<std::net::SocketAddr>,
    what: &str,
) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    match addr {
        Some(addr) => Ok(Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot serve {what} on {addr}"))?,
        )),
        None => Ok(None),
    }
}

/// Feeds systemd's watchdog while the data-path loop keeps turning. The loop
/// wakes at least every timer tick, so a heartbeat that stands still means
/// it is stuck, and systemd should restart us.
async fn watchdog(heartbeat: Arc<std::sync::atomic::AtomicU64>, mut notifier: impl Notifier) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let mut last = heartbeat.load(std::sync::atomic::Ordering::Relaxed);
    loop {
        tokio::time::sleep(interval / 2).await;
        let now = heartbeat.load(std::sync::atomic::Ordering::Relaxed);
        if now != last {
            notifier.notify(ServiceState::Watchdog);
        } else {
            tracing::error!(
                "the data path has not turned for {:?}; not feeding the watchdog",
                interval / 2
            );
        }
        last = now;
    }
}
