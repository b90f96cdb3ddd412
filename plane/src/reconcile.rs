//! Making the OS match the desired state, through the ports, and the
//! [`Engine`] that owns both and is the only writer of either.
//!
//! The reconciler remembers what each port was last told successfully
//! ([`Applied`]) and asks a port for something only where the desired
//! state differs from that, so reconciling the same state twice asks for
//! nothing. A step that fails leaves its part of [`Applied`] as it was, so
//! the next pass asks again: failures are retried until they succeed.
//!
//! The steps run in a fixed order. What can refuse a change comes first:
//! binding a new port, the SNAT table, the state files, the TUN's
//! addresses and MTU. For a request that someone waits on, a failure there
//! undoes the earlier steps and refuses the request, so nothing is
//! acknowledged that is not on disk and nothing changes when a request
//! fails. Then the data path (which cannot fail) and the routes through
//! the TUN, which point into the tunnel only once the data path carries
//! them.

use std::collections::BTreeSet;

use ipnet::IpNet;
use vpcgate_proto::Response;

use crate::datapath::{diff, DatapathState};
use crate::intent::{plan, Error, Intent};
use crate::key::Key;
use crate::model::{Desired, LinkConfig};
use crate::ports::{Datapath, LinkDns, Links, Nat, NatState, PortError, Resolver, Store};
use crate::settings::Settings;
use crate::stored::StoredPeer;

/// The ports the control plane drives.
pub struct Ports<S, N, L, D, R> {
    pub store: S,
    pub nat: N,
    pub links: L,
    pub datapath: D,
    pub resolver: R,
}

/// Which parts refuse a change when they fail; the others are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gates {
    pub port: bool,
    pub nat: bool,
    pub store: bool,
    pub links: bool,
    /// Write the state files after the interface is configured rather
    /// than before.
    pub store_last: bool,
}

impl Gates {
    /// A request someone waits on: refused unless it is bound, in the SNAT
    /// table, on disk and on the interface.
    pub const REQUEST: Gates = Gates {
        port: true,
        nat: true,
        store: true,
        links: true,
        store_last: false,
    };
    /// Start-up: the daemon does not start without its port, its state
    /// files and its interface; a refused SNAT table is reported and
    /// retried. The files are written last, so a start that fails leaves
    /// files of an older format as they were: they cannot be put back.
    pub const START: Gates = Gates {
        port: true,
        nat: false,
        store: true,
        links: true,
        store_last: true,
    };
    /// Routes a peer offered are used only once they are saved, so that
    /// they are back after a restart; the peer offers them again anyway.
    pub const LEARNED: Gates = Gates {
        port: false,
        nat: false,
        store: true,
        links: false,
        store_last: false,
    };
    /// The kernel's reports, and retries: nothing to refuse.
    pub const CONVERGE: Gates = Gates {
        port: false,
        nat: false,
        store: false,
        links: false,
        store_last: false,
    };

    pub fn for_intent(intent: &Intent) -> Gates {
        match intent {
            Intent::RoutesOffered { .. } | Intent::RoutesHeard { .. } | Intent::FailoverTick(_) => {
                Gates::LEARNED
            }
            // A probe's result changes only what is offered: nothing to
            // refuse, and a refusal could not be answered to anyone.
            Intent::LinkObserved(_) | Intent::DnsObserved(_) | Intent::CheckResult { .. } => {
                Gates::CONVERGE
            }
            _ => Gates::REQUEST,
        }
    }
}

/// What each port was last told successfully. `None`: not known, so the
/// next pass tells it.
#[derive(Clone, Default)]
pub struct Applied {
    /// The port asked for and the port bound (they differ when 0 was asked).
    pub listen: Option<(u16, u16)>,
    pub nat: Option<NatState>,
    pub key: Option<Key>,
    pub settings: Option<Settings>,
    pub peers: Option<Vec<StoredPeer>>,
    pub datapath: Option<DatapathState>,
    pub link: Option<LinkConfig>,
    pub routes: BTreeSet<IpNet>,
    /// The link's DNS as the resolver holds it from us; `None` at start,
    /// when we have set nothing.
    pub link_dns: Option<LinkDns>,
}

impl Applied {
    /// What the ports hold when the daemon starts: the key file and the
    /// peers file as read (`None` for one in an older format, which is then
    /// rewritten), a bound port, and nothing else yet. The settings are
    /// always saved at start, since flags given on the command line
    /// override the file.
    pub fn at_start(
        desired: &Desired,
        key_current: bool,
        peers_current: bool,
        listen: (u16, u16),
    ) -> Applied {
        Applied {
            listen: Some(listen),
            key: desired.device.private_key.clone().filter(|_| key_current),
            peers: peers_current.then(|| crate::stored::stored_peers(&desired.device)),
            ..Applied::default()
        }
    }
}

/// One part of the OS, for reporting what is not yet in effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    Port,
    Nat,
    Store,
    Links,
    Routes,
    Dns,
}

/// A step that failed and will be retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub part: Part,
    pub error: PortError,
}

pub struct Reconciler<S, N, L, D, R> {
    pub ports: Ports<S, N, L, D, R>,
    applied: Applied,
    /// The failures of the last pass, for status.
    failures: Vec<Failure>,
}

impl<S: Store, N: Nat, L: Links, D: Datapath, R: Resolver> Reconciler<S, N, L, D, R> {
    pub fn new(ports: Ports<S, N, L, D, R>, applied: Applied) -> Self {
        Reconciler {
            ports,
            applied,
            failures: Vec::new(),
        }
    }

    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    pub fn failures(&self) -> &[Failure] {
        &self.failures
    }

    /// The port the data path listens on now.
    pub fn bound_port(&self) -> u16 {
        self.applied.listen.map_or(0, |(_, bound)| bound)
    }

    /// Whether every port holds what `desired` asks for.
    pub fn converged(&self, desired: &Desired) -> bool {
        let a = &self.applied;
        a.listen.map(|(asked, _)| asked) == Some(desired.settings.listen_port)
            && a.nat.as_ref() == Some(&desired.nat())
            && self.store_in_step(desired)
            && a.datapath.as_ref() == Some(&desired.datapath())
            && a.link.as_ref() == Some(&desired.link_config())
            && a.routes == desired.os_routes()
            && a.link_dns == desired.link_dns()
    }

    /// Whether the state files hold what `desired` would save.
    pub fn store_in_step(&self, desired: &Desired) -> bool {
        let a = &self.applied;
        let key_saved = match &desired.device.private_key {
            // A cleared key is not saved: the node keeps its identity on disk.
            None => true,
            Some(key) => a.key.as_ref() == Some(key),
        };
        key_saved
            && a.settings.as_ref() == Some(&desired.settings)
            && a.peers.as_ref() == Some(&crate::stored::stored_peers(&desired.device))
    }

    /// Brings the ports to `desired`. A failure in a gated part undoes
    /// what this pass did before it and is returned; other failures are
    /// recorded and retried by the next pass.
    pub async fn reconcile(&mut self, desired: &Desired, gates: Gates) -> Result<(), Failure> {
        self.failures.clear();
        let before = self.applied.clone();

        // The port: bound first, installed only with the data path's step.
        let asked = desired.settings.listen_port;
        let mut sockets = None;
        let rebind = self.applied.listen.map(|(a, _)| a) != Some(asked);
        // Asking for the port we already hold (bound when 0 was asked) is
        // not a new bind: it could only fail with EADDRINUSE.
        if rebind && asked != 0 && asked == self.bound_port() {
            self.applied.listen = Some((asked, asked));
        } else if rebind {
            match self.ports.datapath.bind(asked, desired.device.fwmark) {
                Ok((bound, port)) => sockets = Some((bound, port)),
                // The sockets just bound close unused if a later gate refuses.
                Err(error) => self.fail(Part::Port, error, gates.port)?,
            }
        }

        let nat = desired.nat();
        if self.applied.nat.as_ref() != Some(&nat) {
            match self.ports.nat.apply(&nat) {
                Ok(()) => self.applied.nat = Some(nat),
                Err(error) => self.fail(Part::Nat, error, gates.nat)?,
            }
        }

        if !gates.store_last {
            self.save_step(desired, gates, &before)?;
        }

        let link = desired.link_config();
        if self.applied.link.as_ref() != Some(&link) {
            let old = self
                .applied
                .link
                .as_ref()
                .map_or(Vec::new(), |l| l.addresses.clone());
            match self
                .ports
                .links
                .configure(&old, &link.addresses, link.mtu)
                .await
            {
                Ok(()) => self.applied.link = Some(link),
                Err(error) => {
                    let failure = Failure {
                        part: Part::Links,
                        error,
                    };
                    if gates.links {
                        // Some of the new addresses may be on the link
                        // now: the next pass takes away what it should not
                        // carry.
                        let mut stray = old.to_vec();
                        stray.extend(link.addresses.iter().copied());
                        self.undo(&before);
                        self.applied.link = Some(LinkConfig {
                            addresses: stray,
                            mtu: 0,
                        });
                        return Err(failure);
                    }
                    self.failures.push(failure);
                }
            }
        }
        if gates.store_last {
            self.save_step(desired, gates, &before)?;
        }

        if let Some((bound, port)) = sockets {
            self.ports.datapath.install(bound).await;
            self.applied.listen = Some((asked, port));
            tracing::info!(port, "listen port changed");
        }
        let datapath = desired.datapath();
        if self.applied.datapath.as_ref() != Some(&datapath) {
            let steps = diff(self.applied.datapath.as_ref(), &datapath);
            self.ports.datapath.apply(steps).await;
            self.applied.datapath = Some(datapath);
        }

        // Routes point into the tunnel only once the data path carries them.
        let routes = desired.os_routes();
        for net in routes.difference(&self.applied.routes.clone()) {
            match self.ports.links.add_route(*net).await {
                Ok(()) => {
                    self.applied.routes.insert(*net);
                }
                Err(error) => self.failures.push(Failure {
                    part: Part::Routes,
                    error,
                }),
            }
        }
        for net in self.applied.routes.clone().difference(&routes) {
            match self.ports.links.del_route(*net).await {
                Ok(()) => {
                    self.applied.routes.remove(net);
                }
                Err(error) => self.failures.push(Failure {
                    part: Part::Routes,
                    error,
                }),
            }
        }
        // The resolver sends names into the tunnel only once it carries
        // them; it cannot refuse a change, so it is never a gate.
        let dns = desired.link_dns();
        if self.applied.link_dns != dns {
            match self
                .ports
                .resolver
                .apply(&desired.interface, dns.as_ref())
                .await
            {
                Ok(()) => self.applied.link_dns = dns,
                Err(error) => self.failures.push(Failure {
                    part: Part::Dns,
                    error,
                }),
            }
        }
        for failure in &self.failures {
            tracing::warn!(part = ?failure.part, "not yet in effect, will retry: {}", failure.error);
        }
        Ok(())
    }

    /// The store's step: refuses the pass, after putting back what it
    /// changed, when the store is a gate.
    fn save_step(
        &mut self,
        desired: &Desired,
        gates: Gates,
        before: &Applied,
    ) -> Result<(), Failure> {
        match self.save(desired) {
            Err(error) if gates.store => {
                self.undo(before);
                self.fail(Part::Store, error, true)
            }
            Err(error) => self.fail(Part::Store, error, false),
            Ok(()) => Ok(()),
        }
    }

    /// A failed step: refuses the pass when `gated`, else is recorded to
    /// be retried.
    fn fail(&mut self, part: Part, error: PortError, gated: bool) -> Result<(), Failure> {
        let failure = Failure { part, error };
        if gated {
            return Err(failure);
        }
        self.failures.push(failure);
        Ok(())
    }

    /// Writes each state file whose contents differ from what it holds.
    fn save(&mut self, desired: &Desired) -> Result<(), PortError> {
        if let Some(key) = &desired.device.private_key {
            if self.applied.key.as_ref() != Some(key) {
                self.ports.store.save_key(key)?;
                self.applied.key = Some(key.clone());
            }
        }
        if self.applied.settings.as_ref() != Some(&desired.settings) {
            self.ports.store.save_settings(&desired.settings)?;
            self.applied.settings = Some(desired.settings.clone());
        }
        let peers = crate::stored::stored_peers(&desired.device);
        if self.applied.peers.as_ref() != Some(&peers) {
            self.ports.store.save_peers(&peers)?;
            self.applied.peers = Some(peers);
        }
        Ok(())
    }

    /// Puts back what this pass changed before a gated failure: the SNAT
    /// table and the files already rewritten. Whatever cannot be put back
    /// stays recorded as it is, so the next pass rewrites it.
    fn undo(&mut self, before: &Applied) {
        if self.applied.nat != before.nat {
            if let Some(nat) = &before.nat {
                match self.ports.nat.apply(nat) {
                    Ok(()) => self.applied.nat = before.nat.clone(),
                    Err(e) => tracing::warn!("cannot put the SNAT table back: {e}"),
                }
            }
        }
        if self.applied.key != before.key {
            if let Some(key) = &before.key {
                if self.ports.store.save_key(key).is_ok() {
                    self.applied.key = before.key.clone();
                }
            }
        }
        if self.applied.settings != before.settings {
            if let Some(settings) = &before.settings {
                if self.ports.store.save_settings(settings).is_ok() {
                    self.applied.settings = before.settings.clone();
                }
            }
        }
        if self.applied.peers != before.peers {
            if let Some(peers) = &before.peers {
                if self.ports.store.save_peers(peers).is_ok() {
                    self.applied.peers = before.peers.clone();
                }
            }
        }
    }
}

/// The control plane: the desired state and the reconciler, changed only
/// through [`Engine::handle`].
pub struct Engine<S, N, L, D, R> {
    desired: Desired,
    reconciler: Reconciler<S, N, L, D, R>,
}

impl<S: Store, N: Nat, L: Links, D: Datapath, R: Resolver> Engine<S, N, L, D, R> {
    /// An engine over `desired`, with `applied` saying what the ports
    /// already hold (the files just read, the port just bound). Nothing is
    /// asked of the ports until [`Engine::start`].
    pub fn new(desired: Desired, ports: Ports<S, N, L, D, R>, applied: Applied) -> Self {
        Engine {
            desired,
            reconciler: Reconciler::new(ports, applied),
        }
    }

    /// The first pass. A failure of a part the daemon cannot run without
    /// is returned.
    pub async fn start(&mut self) -> Result<(), Failure> {
        let desired = self.desired.clone();
        self.reconciler.reconcile(&desired, Gates::START).await
    }

    /// Gives the ports back, to shut them down.
    pub fn into_ports(self) -> Ports<S, N, L, D, R> {
        self.reconciler.ports
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    pub fn ports(&self) -> &Ports<S, N, L, D, R> {
        &self.reconciler.ports
    }

    pub fn ports_mut(&mut self) -> &mut Ports<S, N, L, D, R> {
        &mut self.reconciler.ports
    }

    pub fn reconciler(&self) -> &Reconciler<S, N, L, D, R> {
        &self.reconciler
    }

    pub fn bound_port(&self) -> u16 {
        self.reconciler.bound_port()
    }

    pub fn converged(&self) -> bool {
        self.reconciler.converged(&self.desired)
    }

    /// Plans `intent` and brings the OS to the result. On `Err` nothing
    /// changed. `Ok(None)`: nobody waits for an answer.
    pub async fn handle(&mut self, intent: Intent) -> Result<Option<Response>, Error> {
        let gates = Gates::for_intent(&intent);
        let kind = intent.kind();
        let planned = plan(&self.desired, intent)?;
        if planned.desired == self.desired {
            // Nothing to change; a pass still retries what failed before.
            if !self.converged() {
                self.retry().await;
            }
            return Ok(planned.reply);
        }
        if let Err(failure) = self.reconciler.reconcile(&planned.desired, gates).await {
            let message = format!("{}; nothing was changed", failure.error.message);
            tracing::warn!(intent = kind, "refused: {message}");
            return Err(Error::new(failure.error.errno, message));
        }
        self.desired = planned.desired;
        if let Some(summary) = &planned.summary {
            tracing::info!("{summary}");
        }
        Ok(planned.reply)
    }

    /// Another pass over the current desired state; returns whether it has
    /// converged.
    pub async fn retry(&mut self) -> bool {
        let desired = self.desired.clone();
        // Nothing is gated, so this cannot be refused.
        let _ = self.reconciler.reconcile(&desired, Gates::CONVERGE).await;
        self.converged()
    }

    /// What is not in effect yet, for status.
    pub fn pending(&self) -> Vec<String> {
        self.reconciler
            .failures()
            .iter()
            .map(|f| match f.part {
                Part::Nat => format!("SNAT is not in effect: {}", f.error),
                Part::Port => format!("the listen port is not bound: {}", f.error),
                Part::Store => format!("a state file is not up to date: {}", f.error),
                Part::Links => format!("the interface is not up to date: {}", f.error),
                Part::Routes => format!("a learned route is not installed: {}", f.error),
                Part::Dns => match self.desired.link_dns() {
                    Some(dns) => format!(
                        "the DNS a gateway offers is not in effect ({}); to apply it by hand: {}",
                        f.error,
                        dns.command(&self.desired.interface)
                    ),
                    None => format!("the DNS a gateway offered is not removed: {}", f.error),
                },
            })
            .collect()
    }
}
