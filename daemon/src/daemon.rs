//! Start-up, the control plane's shared state, and shutdown.
//!
//! The control plane runs on a single-threaded tokio runtime: the UAPI and
//! control sockets, netlink and signals. It owns the desired state and turns
//! each accepted change into side effects in a fixed order: whatever can fail
//! (binding a port, writing state) happens first, then the data path is
//! updated, and only then is the change committed and acknowledged.

use std::io;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use ipnet::IpNet;
use tokio::net::UnixListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Mutex;
use vpcgate_proto::{PeerStatus, Request, Response, Status};

use crate::config::DeviceConfig;
use crate::core::{DropCounters, DropReason, RouteTable, SharedTable};
use crate::dataplane::{Command, Dataplane, UdpSockets};
use crate::netlink::Netlink;
use crate::state::{Settings, StateDir};
use crate::uapi::proto::SetRequest;

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
    pub address: Option<IpNet>,
    pub mtu: u32,
}

pub struct Daemon {
    interface: String,
    config: Mutex<DeviceConfig>,
    settings: std::sync::Mutex<Settings>,
    state: StateDir,
    dataplane: Dataplane,
    table: SharedTable,
    counters: Arc<DropCounters>,
}

impl Daemon {
    pub async fn uapi_get(&self, out: &mut String) {
        let view = self.config.lock().await.view();
        crate::uapi::proto::format_get(&view, out);
    }

    /// Applies a `set`; on error nothing has changed. Returns a positive errno.
    pub async fn uapi_set(&self, request: SetRequest) -> Result<(), i32> {
        let mut config = self.config.lock().await;
        let (mut next, plan) = config.apply(request).map_err(|e| e as i32)?;

        let sockets = match plan.listen_port {
            Some(port) => {
                let sockets = UdpSockets::bind(port, next.fwmark).map_err(|e| {
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
        if let Some(sockets) = &sockets {
            let mut settings = self.lock_settings().clone();
            settings.listen_port = sockets.port;
            self.state.save_settings(&settings).map_err(|e| {
                tracing::error!("{e}");
                libc::EIO
            })?;
            *self.lock_settings() = settings;
        }

        if let Some(sockets) = sockets {
            tracing::info!(port = sockets.port, "listen port changed");
            self.dataplane.send(Command::Sockets(sockets));
        }
        if let Some(fwmark) = plan.fwmark {
            self.dataplane.send(Command::SetFwmark(fwmark));
        }
        if plan.private_key_changed {
            tracing::info!("private key changed");
        }
        self.dataplane.apply(plan.before_table).await;
        if let Some(table) = plan.table {
            tracing::info!(
                prefixes = table.len(),
                peers = next.peers.len(),
                "routing table updated"
            );
            self.table.store(Arc::new(table));
        }
        self.dataplane.apply(plan.after_table).await;
        *config = next;
        Ok(())
    }

    fn lock_settings(&self) -> std::sync::MutexGuard<'_, Settings> {
        self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub async fn control(&self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status(self.status().await),
        }
    }

    async fn status(&self) -> Status {
        use base64::Engine;
        let b64 = |k: &[u8; 32]| base64::engine::general_purpose::STANDARD.encode(k);
        let config = self.config.lock().await;
        let view = config.view();
        let settings = self.lock_settings().clone();
        Status {
            interface: self.interface.clone(),
            public_key: config.public_key().map(|k| b64(&k)).unwrap_or_default(),
            listen_port: config.listen_port,
            address: settings.address.to_string(),
            peers: view
                .peers
                .iter()
                .map(|p| PeerStatus {
                    public_key: b64(&p.public_key.0),
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
                    latest_handshake: p.last_handshake.and_then(|t| {
                        t.duration_since(std::time::UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_secs())
                    }),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    persistent_keepalive: Some(p.persistent_keepalive).filter(|&k| k > 0),
                })
                .collect(),
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), self.counters.get(*r)))
                .collect(),
        }
    }
}

/// Creates the listening socket at `path`, replacing a stale socket file but
/// refusing to take over one that a live process still answers on.
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!(
                    "{} is in use by a running process; stop it first (is another vpcgated or \
                     wireguard-go using this interface name?)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        }
        Ok(_) => bail!("{} exists and is not a socket; remove it", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(listener)
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

fn create_tun(name: &str) -> anyhow::Result<OwnedFd> {
    let mut config = tun::Configuration::default();
    config.tun_name(name);
    // Addresses, MTU and link state are set over netlink, not by the crate.
    config.platform_config(|p| {
        p.ensure_root_privileges(false);
    });
    let device = tun::create(&config).map_err(|e| {
        anyhow::anyhow!(
            "cannot create TUN device {name}: {e} (is /dev/net/tun present, do we have \
             CAP_NET_ADMIN, and is the name free?)"
        )
    })?;
    let fd = device.into_raw_fd();
    // SAFETY: into_raw_fd hands over sole ownership of a valid open descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub async fn run(options: Options) -> anyhow::Result<()> {
    let state = StateDir::open(&options.state_dir)?;
    let (private_key, generated) = state.load_or_create_key()?;
    if generated {
        tracing::info!(path = %state.path("private.key").display(), "generated a new private key");
    }
    let saved = state.load_settings()?;
    let settings = Settings {
        address: options
            .address
            .or(saved.as_ref().map(|s| s.address))
            .unwrap_or_else(|| DEFAULT_ADDRESS.parse().unwrap_or_else(|_| unreachable!())),
        listen_port: options
            .listen_port
            .or(saved.as_ref().map(|s| s.listen_port))
            .unwrap_or(DEFAULT_PORT),
    };

    let uapi_path = crate::uapi::socket_path(&options.interface);
    // Claim both sockets before touching the network, so a second instance
    // fails without disturbing the first.
    let uapi_listener = bind_unix(&uapi_path)?;
    let _uapi_file = SocketFile::new(&uapi_path);
    let control_listener = bind_unix(&options.socket)?;
    let _control_file = SocketFile::new(&options.socket);

    let tun = create_tun(&options.interface)?;
    let netlink = Netlink::connect().context("cannot open netlink")?;
    let index = netlink.link_index(&options.interface).await?;
    netlink
        .configure(index, settings.address, options.mtu)
        .await
        .with_context(|| format!("cannot configure {}", options.interface))?;

    let sockets = UdpSockets::bind(settings.listen_port, 0)
        .with_context(|| format!("cannot bind UDP port {}", settings.listen_port))?;
    state.save_settings(&settings)?;
    let port = sockets.port;

    let config = DeviceConfig::new(Some(private_key), port);
    let table: SharedTable = Arc::new(ArcSwap::from_pointee(RouteTable::empty()));
    let counters = Arc::new(DropCounters::default());
    let (exit_tx, mut exit_rx) = tokio::sync::oneshot::channel();
    let dataplane = Dataplane::spawn(tun, sockets, table.clone(), counters.clone(), exit_tx)?;
    let plan = config.initial_plan();
    dataplane.apply(plan.before_table).await;

    let daemon = Arc::new(Daemon {
        interface: options.interface.clone(),
        config: Mutex::new(config),
        settings: std::sync::Mutex::new(settings.clone()),
        state,
        dataplane,
        table,
        counters,
    });
    let uapi_task = tokio::spawn(crate::uapi::serve(uapi_listener, daemon.clone()));
    let control_task = tokio::spawn(crate::control::serve(control_listener, daemon.clone()));
    tracing::info!(
        interface = %options.interface,
        address = %settings.address,
        port,
        public_key = %daemon.status().await.public_key,
        "vpcgated is up"
    );

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let outcome = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); Ok(()) }
        _ = int.recv() => { tracing::info!("SIGINT: shutting down"); Ok(()) }
        result = &mut exit_rx => match result {
            Ok(Err(e)) => Err(anyhow::Error::from(e).context("the data path failed")),
            _ => Err(anyhow::anyhow!("the data path stopped unexpectedly")),
        },
    };
    uapi_task.abort();
    control_task.abort();
    let _ = uapi_task.await;
    let _ = control_task.await;
    match Arc::try_unwrap(daemon) {
        // Closing the TUN's only descriptor removes the interface.
        Ok(daemon) => daemon.dataplane.shutdown(),
        Err(_) => tracing::warn!("control tasks still hold the daemon; exiting anyway"),
    }
    outcome
}
