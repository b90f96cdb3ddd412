//! The one task that owns the control plane: the engine (desired state and
//! ports) and everything that feeds it. It takes calls from the servers
//! ([`crate::handle`]), route advertisements from the data path, the
//! kernel's reports about the TUN, signals and the retry timer, one at a
//! time, so changes are serialised without a lock.
//!
//! What it does itself is only what needs the OS before planning: resolve
//! a peer's endpoint, generate a client key, list local networks, read
//! `/proc` for warnings, re-read the state files on SIGHUP.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};
use vpcgate_plane::errno::{EINVAL, EIO, ENOKEY};
use vpcgate_plane::identity::Identity;
use vpcgate_plane::intent::{self, Error, Intent, NewPeer};
use vpcgate_plane::model::{Desired, LinkState};
use vpcgate_plane::ports::{Nat, Notifier, ServiceState};
use vpcgate_plane::reconcile::{Engine, Part};
use vpcgate_plane::settings::Settings;
use vpcgate_plane::view::{self, HostFacts, Sample};
use vpcgate_proto::{Request, Response, Status};
use zeroize::Zeroizing;

use crate::core::{DropCounters, DropReason, Event, PeerHandle};
use crate::dataplane::Stopped;
use crate::handle::Call;
use crate::nat::NftNat;
use crate::netlink::{Changes, Netlink};
use crate::ports::{DatapathPort, NetLinks, SdNotifier, StateStore};
use crate::resolved::Resolvectl;
use crate::uapi::text;

pub type RealEngine = Engine<StateStore, NftNat, NetLinks, DatapathPort, Resolvectl>;

/// A failed step is tried again after this long, doubling up to
/// [`RETRY_MAX`]: soon enough that a passing hiccup (netlink busy, nft
/// briefly locked) heals unnoticed, rare enough that a lasting failure
/// costs nothing.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(30);

pub struct Owner {
    pub engine: RealEngine,
    pub counters: Arc<DropCounters>,
    /// A second descriptor of the TUN, for asking the kernel which network
    /// namespace the device is in (the data path owns the first).
    pub tun: OwnedFd,
    pub notifier: SdNotifier,
    /// The DNS forwarder, which follows the settings.
    pub dns: crate::dns::Dns,
    /// The health checks' probes, which follow the settings.
    pub probes: crate::probes::Probes,
}

/// Why the owner stopped.
pub enum Exit {
    Signal,
    DataPath(anyhow::Result<()>),
}

impl Owner {
    fn desired(&self) -> &Desired {
        self.engine.desired()
    }

    fn live(&self) -> impl Fn(PeerHandle) -> view::PeerLive + '_ {
        let datapath = &self.engine.ports().datapath;
        move |handle| datapath.live(handle)
    }

    /// Serves until a signal or the data path ends it.
    pub async fn run(
        &mut self,
        mut calls: mpsc::Receiver<Call>,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut exit: oneshot::Receiver<std::io::Result<Stopped>>,
        mut changes: Changes,
    ) -> anyhow::Result<Exit> {
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut watching = true;
        // Set once the TUN is out of sight and could not be followed, so
        // that every later change in this namespace does not try (and log)
        // again.
        let mut lost = false;
        let mut delay = RETRY_FIRST;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut dns_serving = self.dns.serving();
        let mut probed = self
            .probes
            .take_results()
            .ok_or_else(|| anyhow::anyhow!("the owner runs once"))?;
        loop {
            self.dns.apply(&self.desired().settings);
            self.probes.follow(&self.engine.desired().settings.checks);
            if retry_at.is_none() && !self.engine.converged() {
                retry_at = Some(tokio::time::Instant::now() + delay);
            }
            let retry = async {
                match retry_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => futures::future::pending().await,
                }
            };
            // When a silent gateway is due to be taken for dead, or a
            // better one's hold-down ends.
            let failover_at = self
                .desired()
                .choice
                .next_deadline(std::time::Instant::now());
            let failover = async {
                match failover_at {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); return Ok(Exit::Signal) }
                _ = int.recv() => { tracing::info!("SIGINT: shutting down"); return Ok(Exit::Signal) }
                _ = hup.recv() => {
                    self.notifier.notify(ServiceState::Reloading);
                    self.reload().await;
                    self.notifier.notify(ServiceState::Ready);
                }
                result = &mut exit => return Ok(Exit::DataPath(match result {
                    Ok(Ok(Stopped::TunGone)) => {
                        tracing::info!(interface = %self.desired().interface, "the TUN device was deleted: shutting down");
                        Ok(())
                    }
                    Ok(Ok(Stopped::Shutdown)) => Ok(()),
                    Ok(Err(e)) => Err(anyhow::Error::from(e).context("the data path failed")),
                    Err(_) => Err(anyhow::anyhow!("the data path stopped unexpectedly")),
                })),
                Some(call) = calls.recv() => self.call(call).await,
                Some(event) = events.recv() => match event {
                    Event::RoutesLearned { peer, routes, dns, priority, at } => {
                        self.routes_learned(peer, routes, dns, priority, at).await
                    }
                    Event::RoutesHeard { peer, priority, at } => {
                        let _ = self.engine.handle(Intent::RoutesHeard { peer, priority, at }).await;
                    }
                },
                Some(outcome) = probed.recv() => {
                    let crate::probes::Outcome { check, ok, detail, at } = outcome;
                    let _ = self.engine.handle(Intent::CheckResult { check, ok, detail, at }).await;
                }
                () = failover => {
                    let _ = self.engine.handle(Intent::FailoverTick(std::time::Instant::now())).await;
                }
                Ok(()) = dns_serving.changed() => {
                    let serving = dns_serving.borrow_and_update().clone();
                    if serving != self.desired().dns_serving {
                        // Nothing to refuse: it is what the forwarder does.
                        let _ = self.engine.handle(Intent::DnsObserved(serving)).await;
                    }
                }
                change = changes.next(), if watching => {
                    if change.is_none() {
                        tracing::warn!("netlink events stopped; the TUN's addresses and MTU are no longer followed");
                        watching = false;
                        continue;
                    }
                    // A burst (wg-quick adds several addresses) needs one re-read.
                    while let Some(Some(())) = changes.next().now_or_never() {}
                    if self.refresh_link().await {
                        lost = false;
                    } else if !lost {
                        match self.follow_tun_namespace().await {
                            Some(elsewhere) => {
                                changes = elsewhere;
                                self.refresh_link().await;
                            }
                            None => lost = true,
                        }
                    }
                }
                () = retry => {
                    retry_at = None;
                    if self.engine.retry().await {
                        tracing::info!("every pending change is now in effect");
                        delay = RETRY_FIRST;
                    } else {
                        delay = (delay * 2).min(RETRY_MAX);
                    }
                }
            }
        }
    }

    async fn call(&mut self, call: Call) {
        match call {
            Call::UapiGet(reply) => {
                let _ = reply.send(self.uapi_get());
            }
            Call::UapiSet(request, reply) => {
                let errno = match self.engine.handle(Intent::UapiSet(request)).await {
                    Ok(_) => 0,
                    Err(e) => e.errno,
                };
                let _ = reply.send(errno);
            }
            Call::Control(request, reply) => {
                let response = self.control(request).await;
                let _ = reply.send(response);
            }
            Call::Metrics(reply) => {
                let _ = reply.send(crate::handle::Scrape {
                    sample: self.metrics(),
                    dns: self.dns.stats(),
                });
            }
        }
    }

    /// The reply to a UAPI `get`. It holds the private key, so it is sized
    /// first: growing it would free a copy of the key unzeroized.
    fn uapi_get(&self) -> Zeroizing<String> {
        let view = crate::uapi::view(self.desired(), self.engine.bound_port(), self.live());
        let mut out = Zeroizing::new(String::with_capacity(text::get_reply_capacity(&view)));
        text::format_get(&view, &mut out);
        out
    }

    async fn control(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Status => Ok(Response::Status(self.status())),
            Request::GetAdvertisedRoutes => {
                let settings = &self.desired().settings;
                Ok(Response::Routes {
                    routes: settings
                        .advertised_routes
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                    warnings: forwarding_warnings(settings),
                    checks: settings.checks.iter().map(ToString::to_string).collect(),
                    draining: settings.draining,
                })
            }
            Request::AdvertiseRoutes {
                routes,
                exit_node,
                checks,
            } => self.advertise(routes, exit_node, checks).await,
            Request::Drain { on } => self.handle(Intent::Drain(on)).await,
            Request::Set(options) => self.handle(Intent::Set(options)).await,
            Request::PeerAdd(add) => self.peer_add(add).await,
            Request::PeerRemove { name } => self.handle(Intent::PeerRemove { name }).await,
            Request::PeerList => {
                let live = self.live();
                Ok(Response::Peers {
                    peers: self
                        .desired()
                        .device
                        .peers
                        .iter()
                        .map(|p| view::peer_status(p, &live(p.handle)))
                        .collect(),
                })
            }
            Request::PeerConfig { name } => intent::peer_config(self.desired(), &name)
                .map(|config| Response::PeerConfig { config }),
            Request::IdentityExport => Identity::of(self.desired())
                .ok_or_else(|| Error::new(ENOKEY, "this node has no private key yet"))
                .and_then(|identity| identity.to_text().map_err(|e| Error::new(EIO, e)))
                .map(|document| Response::Identity { document }),
            Request::IdentityImport { mut document } => {
                let parsed = Identity::parse(&document);
                zeroize::Zeroize::zeroize(&mut document);
                match parsed {
                    Ok(identity) => {
                        self.handle(Intent::ImportIdentity(Box::new(identity)))
                            .await
                    }
                    Err(why) => Err(Error::new(
                        EINVAL,
                        format!("the identity is refused: {why}; nothing was changed"),
                    )),
                }
            }
        };
        result.unwrap_or_else(|e| Response::Error { message: e.message })
    }

    async fn handle(&mut self, intent: Intent) -> Result<Response, Error> {
        let reply = self.engine.handle(intent).await?;
        Ok(reply.unwrap_or(Response::Done {
            message: "done".to_string(),
        }))
    }

    async fn advertise(
        &mut self,
        routes: Vec<String>,
        exit_node: bool,
        checks: Vec<String>,
    ) -> Result<Response, Error> {
        let intent = Intent::Advertise {
            routes,
            exit_node,
            checks,
        };
        let reply = self.handle(intent).await?;
        let Response::Routes {
            routes,
            checks,
            draining,
            ..
        } = reply
        else {
            return Ok(reply);
        };
        let mut warnings = forwarding_warnings(&self.desired().settings);
        let links = &self.engine.ports().links;
        match links.netlink.routes_elsewhere(links.index).await {
            Ok(host_routes) => {
                let desired = self.desired();
                let mut tunnel = desired.settings.tunnel_networks();
                tunnel.extend(desired.link.networks.iter().copied());
                tunnel.sort();
                tunnel.dedup();
                warnings.extend(vpcgate_plane::policy::tunnel_overlap_warnings(
                    &tunnel,
                    &host_routes,
                ));
            }
            Err(e) => {
                tracing::warn!("cannot check the tunnel network against this host's routes: {e}")
            }
        }
        for warning in &warnings {
            tracing::warn!("{warning}");
        }
        Ok(Response::Routes {
            routes,
            warnings,
            checks,
            draining,
        })
    }

    /// Plans the request once without its endpoint, so that every mistake
    /// in it is reported before a name is looked up; then resolves the
    /// endpoint and generates the client's key, and applies it.
    async fn peer_add(&mut self, request: vpcgate_proto::PeerAdd) -> Result<Response, Error> {
        let generated_key = request
            .public_key
            .is_none()
            .then(crate::state::generate_key);
        intent::plan(
            self.desired(),
            Intent::PeerAdd(NewPeer {
                request: request.clone(),
                endpoint: None,
                generated_key: generated_key.clone(),
            }),
        )?;
        let endpoint = match &request.endpoint {
            Some(text) => Some(resolve(text).await?),
            None => None,
        };
        self.handle(Intent::PeerAdd(NewPeer {
            request,
            endpoint,
            generated_key,
        }))
        .await
    }

    fn status(&self) -> Status {
        let desired = self.desired();
        let mut warnings = forwarding_warnings(&desired.settings);
        warnings.extend(self.engine.pending());
        view::status(
            desired,
            self.live(),
            HostFacts {
                listen_port: self.engine.bound_port(),
                warnings,
                snat_form: self.engine.ports().nat.form().map(|f| f.to_string()),
                drops: DropReason::ALL
                    .iter()
                    .map(|r| (r.as_str().to_string(), self.counters.get(*r)))
                    .collect(),
                dns: self.dns.status(),
                link_dns_applied: self.engine.reconciler().applied().link_dns == desired.link_dns(),
                link_dns_problem: self
                    .engine
                    .reconciler()
                    .failures()
                    .iter()
                    .find(|f| f.part == Part::Dns)
                    .map(|f| f.error.message.clone()),
                now: std::time::Instant::now(),
            },
        )
    }

    fn metrics(&self) -> Sample {
        view::sample(
            self.desired(),
            self.live(),
            DropReason::ALL
                .iter()
                .map(|r| (r.as_str(), self.counters.get(*r)))
                .collect(),
        )
    }

    /// A peer advertised routes. Only a trusted peer's are considered,
    /// against the networks this host reaches without the tunnel.
    async fn routes_learned(
        &mut self,
        peer: PeerHandle,
        routes: Vec<ipnet::IpNet>,
        dns: Option<Box<crate::core::routes_msg::DnsOffer>>,
        priority: u16,
        at: std::time::Instant,
    ) {
        if !self
            .desired()
            .device
            .peer_by_handle(peer)
            .is_some_and(|p| p.accept_routes)
        {
            return;
        }
        let links = &self.engine.ports().links;
        let local = match links.netlink.local_networks(links.index).await {
            Ok(local) => local,
            Err(e) => {
                tracing::warn!("cannot list local networks, ignoring learned routes: {e}");
                return;
            }
        };
        let intent = Intent::RoutesOffered {
            peer,
            routes,
            dns,
            local,
            priority,
            at,
        };
        if let Err(e) = self.engine.handle(intent).await {
            tracing::error!("cannot save learned routes, not applying them: {e}");
        }
    }

    /// Reads the TUN's addresses and MTU and hands them to the engine.
    /// Returns false if the device is not in the namespace we look at
    /// (moved away, or deleted).
    pub async fn refresh_link(&mut self) -> bool {
        let links = &self.engine.ports().links;
        let mtu = match links.netlink.mtu(links.index).await {
            Ok(Some(mtu)) => mtu,
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!("cannot read the TUN's MTU: {e}");
                return true;
            }
        };
        let networks = match links.netlink.networks(links.index).await {
            Ok(networks) => networks,
            Err(e) => {
                tracing::warn!("cannot read the TUN's addresses: {e}");
                return true;
            }
        };
        let observed = LinkState { networks, mtu };
        if observed != self.desired().link {
            // Nothing to refuse: the kernel has it already.
            let _ = self.engine.handle(Intent::LinkObserved(observed)).await;
        }
        true
    }

    /// The TUN is no longer in the namespace we watch. If it was moved to
    /// another one, watch it there from now on and return that namespace's
    /// changes; if it was deleted, the data path stops the daemon.
    async fn follow_tun_namespace(&mut self) -> Option<Changes> {
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
                self.engine.ports_mut().links = NetLinks { netlink, index };
                Some(changes)
            }
            Err(e) => {
                tracing::warn!("the TUN moved to another network namespace, but {e} there");
                None
            }
        }
    }

    /// SIGHUP: re-reads the settings and peers files and applies what
    /// changed. Peers whose key is unchanged keep their sessions.
    async fn reload(&mut self) {
        let state = &self.engine.ports().store.0;
        let read = state
            .load_settings()
            .and_then(|settings| Ok((settings, state.load_peers()?)));
        let (settings, peers) = match read {
            Ok((settings, peers)) => (settings.map(|s| s.value), peers.value),
            Err(e) => {
                tracing::error!("reload failed, nothing changed: {e}");
                return;
            }
        };
        match self.engine.handle(Intent::Reload { settings, peers }).await {
            Ok(Some(Response::Done { message })) => tracing::info!("{message}"),
            Ok(_) => tracing::info!("reloaded settings and peers"),
            Err(e) => tracing::error!("reload failed, nothing changed: {e}"),
        }
    }

    /// Removes the SNAT table and stops the data path; closing the TUN's
    /// only descriptor removes the interface and the routes through it.
    pub fn shut_down(self) {
        let mut ports = self.engine.into_ports();
        if let Err(e) = ports.nat.remove() {
            tracing::warn!("cannot remove the SNAT table: {e}");
        }
        ports.datapath.dataplane.shutdown();
    }
}

async fn resolve(text: &str) -> Result<SocketAddr, Error> {
    let invalid = |message: String| Error::new(vpcgate_plane::errno::EINVAL, message);
    let mut resolved = tokio::net::lookup_host(text)
        .await
        .map_err(|e| invalid(format!("cannot resolve {text}: {e}")))?;
    resolved
        .next()
        .ok_or_else(|| invalid(format!("{text} resolves to no address")))
}

/// What the user should know about this host's forwarding sysctls.
pub fn forwarding_warnings(settings: &Settings) -> Vec<String> {
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
