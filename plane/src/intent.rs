//! Intents, the one way the desired state changes, and [`plan`], the pure
//! function that turns the desired state and an intent into the next
//! desired state and the answer for whoever asked.
//!
//! Every source becomes an intent: a `wg set` on the UAPI socket, a
//! `vpcgate` command on the control socket, SIGHUP's re-read of the state
//! files, a peer's route advertisement, and the kernel's report of the
//! TUN's addresses and MTU. Planning never touches the OS: whatever needs it
//! (resolving an endpoint, generating a key, listing local networks) the
//! shell does first and puts in the intent. A refused intent is an
//! [`Error`] that knows its errno and its message, and changes nothing.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use ipnet::IpNet;
use vpcgate_node::routes_msg::DnsOffer;
use vpcgate_node::PeerHandle;
use vpcgate_proto::{PeerAdd, Response, SetOptions};

use crate::device::{DeviceConfig, LearnedDns, PeerConfig, SetRequest};
use crate::errno::{EINVAL, EIO};
use crate::failover;
use crate::key::{b64, parse_key, public_key_of, Key};
use crate::model::{Desired, LinkState};
use crate::policy::{self, ClientConfig, LearnPolicy};
use crate::settings::{validate_addresses, Settings};
use crate::stored::{restore_peers, StoredPeer};

#[derive(Clone, PartialEq, Eq)]
pub enum Intent {
    /// A UAPI `set`, parsed and validated as a whole.
    UapiSet(SetRequest),
    /// `vpcgate advertise-routes`.
    Advertise {
        routes: Vec<String>,
        exit_node: bool,
        /// `--check tcp:IP:PORT`, as typed.
        checks: Vec<String>,
    },
    /// `vpcgate drain` (true) and `drain --off` (false).
    Drain(bool),
    /// A health check's probe ended.
    CheckResult {
        check: crate::health::Check,
        ok: bool,
        detail: String,
        at: Instant,
    },
    /// `vpcgate set`.
    Set(SetOptions),
    /// `vpcgate peer add`, with what the shell found out first.
    PeerAdd(NewPeer),
    /// `vpcgate peer remove`.
    PeerRemove { name: String },
    /// A peer advertised routes over the route exchange. `local` is the
    /// networks this host reaches without the tunnel, as the kernel lists
    /// them now.
    RoutesOffered {
        peer: PeerHandle,
        routes: Vec<IpNet>,
        dns: Option<Box<DnsOffer>>,
        local: Vec<IpNet>,
        priority: u16,
        at: Instant,
    },
    /// A peer answered a route poll with what it offered before.
    RoutesHeard {
        peer: PeerHandle,
        priority: u16,
        at: Instant,
    },
    /// The time the failover choice asked to be woken at has come.
    FailoverTick(Instant),
    /// The kernel reported the TUN's addresses and MTU.
    LinkObserved(LinkState),
    /// The DNS forwarder reported where it answers with an upstream to
    /// ask (nowhere while it has none).
    DnsObserved(Vec<IpAddr>),
    /// `vpcgate identity import`: another gateway's key, peers and
    /// settings, to stand in for it.
    ImportIdentity(Box<crate::identity::Identity>),
    /// SIGHUP: the state files as they were just read.
    Reload {
        settings: Option<Settings>,
        peers: Vec<StoredPeer>,
    },
}

impl std::fmt::Debug for Intent {
    // Keys stay out of logs: only the intent's kind is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind())
    }
}

impl Intent {
    pub fn kind(&self) -> &'static str {
        match self {
            Intent::UapiSet(_) => "uapi-set",
            Intent::Advertise { .. } => "advertise-routes",
            Intent::Drain(_) => "drain",
            Intent::CheckResult { .. } => "check-result",
            Intent::Set(_) => "set",
            Intent::PeerAdd(_) => "peer-add",
            Intent::PeerRemove { .. } => "peer-remove",
            Intent::RoutesOffered { .. } => "routes-offered",
            Intent::RoutesHeard { .. } => "routes-heard",
            Intent::FailoverTick(_) => "failover-tick",
            Intent::LinkObserved(_) => "link-observed",
            Intent::DnsObserved(_) => "dns-observed",
            Intent::Reload { .. } => "reload",
            Intent::ImportIdentity(_) => "identity-import",
        }
    }

    /// Whether someone waits for the answer: such an intent is refused
    /// whole when a port it needs fails. Background intents (the kernel's
    /// and peers' reports) converge instead.
    pub fn is_request(&self) -> bool {
        !matches!(
            self,
            Intent::RoutesOffered { .. }
                | Intent::RoutesHeard { .. }
                | Intent::FailoverTick(_)
                | Intent::CheckResult { .. }
                | Intent::LinkObserved(_)
                | Intent::DnsObserved(_)
        )
    }
}

/// A `peer add` request, its endpoint resolved and, when the client gets
/// a generated key, that key.
#[derive(Clone, PartialEq, Eq)]
pub struct NewPeer {
    pub request: PeerAdd,
    pub endpoint: Option<SocketAddr>,
    pub generated_key: Option<Key>,
}

/// Why an intent was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// What the UAPI answers with.
    pub errno: i32,
    pub message: String,
}

impl Error {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Error {
            errno,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Error::new(EINVAL, message)
    }
}

impl From<String> for Error {
    fn from(message: String) -> Self {
        Error::invalid(message)
    }
}

/// The next desired state, and the answer to send once it is in effect.
#[derive(Debug)]
pub struct Planned {
    pub desired: Desired,
    /// `None` when nobody waits (background intents, UAPI sets).
    pub reply: Option<Response>,
    /// What changed, for the one log line a state change gets.
    pub summary: Option<String>,
}

impl Planned {
    fn new(desired: Desired, reply: Option<Response>, summary: Option<String>) -> Self {
        Planned {
            desired,
            reply,
            summary,
        }
    }
}

/// Plans `intent` against `current`. On error `current` is all there is:
/// nothing changed.
pub fn plan(current: &Desired, intent: Intent) -> Result<Planned, Error> {
    let mut next = current.clone();
    let (reply, summary) = match intent {
        Intent::UapiSet(request) => {
            if let Some(port) = request.listen_port {
                next.settings.listen_port = port;
            }
            let key_changed = request.private_key.is_some();
            next.device.apply_set(request).map_err(|errno| {
                Error::new(errno, "the set request cannot be applied (too many peers)")
            })?;
            (None, key_changed.then(|| "private key changed".to_string()))
        }
        Intent::Advertise {
            routes,
            exit_node,
            checks,
        } => {
            let input = policy::split_list(&routes);
            let routes =
                policy::validate_advertised(&input, &next.settings.tunnel_networks(), exit_node)?;
            let checks = crate::health::validate_checks(&policy::split_list(&checks), &routes)?;
            next.settings.advertised_routes = routes.clone();
            next.settings.exit_node = exit_node;
            next.settings.checks = checks;
            policy::validate_advertisement(&next.settings)?;
            let listed: Vec<String> = routes.iter().map(ToString::to_string).collect();
            let checks: Vec<String> = next
                .settings
                .checks
                .iter()
                .map(ToString::to_string)
                .collect();
            let mut summary = format!("advertised routes changed: {}", listed.join(","));
            if !checks.is_empty() {
                summary.push_str(&format!(", checked by {}", checks.join(",")));
            }
            (
                Some(Response::Routes {
                    routes: listed,
                    warnings: Vec::new(),
                    checks,
                    draining: next.settings.draining,
                }),
                Some(summary),
            )
        }
        Intent::Drain(on) => {
            next.settings.draining = on;
            let message = match on {
                true => {
                    "draining: no range is advertised, so clients move to another gateway; \
                         forwarding goes on for connections that still arrive; \
                         `vpcgate drain --off` ends it"
                }
                false => "drain ended: the advertised ranges are offered again",
            };
            let changed = on != current.settings.draining;
            (
                Some(Response::Done {
                    message: message.to_string(),
                }),
                changed.then(|| message.to_string()),
            )
        }
        Intent::CheckResult {
            check,
            ok,
            detail,
            at,
        } => {
            let note =
                next.health
                    .record(check, ok, detail.clone(), at)
                    .map(|healthy| match healthy {
                        true => format!("health check {check} passes: its ranges are advertised"),
                        false => format!(
                            "health check {check} fails ({detail}): its ranges are withdrawn"
                        ),
                    });
            (None, note)
        }
        Intent::Set(options) => {
            apply_options(&mut next, &options)?;
            let s = &next.settings;
            let message = format!(
                "snat {}, mss-clamp {}, public endpoint {}, listen port {}, address {}, mtu {}, dns {}, priority {}",
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
                dns_summary(&s.dns),
                s.priority,
            );
            let summary = format!("settings applied: {message}");
            (Some(Response::Done { message }), Some(summary))
        }
        Intent::PeerAdd(add) => {
            let name = add.request.name.clone();
            let allowed = add_peer(&mut next, add)?;
            let config = match next.device.peer_by_name(&name) {
                Some(peer) if peer.client_private_key.is_some() => {
                    Some(client_config(&next, peer)?)
                }
                _ => None,
            };
            let listed: Vec<String> = allowed.iter().map(ToString::to_string).collect();
            let summary = format!("peer {name} added with allowed IPs {}", listed.join(","));
            (
                Some(Response::PeerAdded {
                    name,
                    allowed_ips: listed,
                    config,
                }),
                Some(summary),
            )
        }
        Intent::PeerRemove { name } => {
            let handle = next
                .device
                .peer_by_name(&name)
                .map(|p| p.handle)
                .ok_or_else(|| no_peer(&name))?;
            next.device.peers.retain(|p| p.handle != handle);
            (
                Some(Response::Done {
                    message: format!("removed peer {name}"),
                }),
                Some(format!("peer {name} removed")),
            )
        }
        Intent::RoutesOffered {
            peer,
            routes,
            dns,
            local,
            priority,
            at,
        } => {
            let routes = learn_routes(&mut next, peer, &routes, &local, priority, at);
            let dns = learn_dns(&mut next, peer, dns.as_deref());
            let summary: Vec<String> = routes.into_iter().chain(dns).collect();
            (None, (!summary.is_empty()).then(|| summary.join("; ")))
        }
        Intent::RoutesHeard { peer, priority, at } => {
            let trusted = next
                .device
                .peer_by_handle(peer)
                .is_some_and(|p| p.accept_routes);
            let moves = match trusted {
                true => {
                    remember_owners(&mut next, at);
                    next.choice.heard(peer, None, priority, at)
                }
                false => Vec::new(),
            };
            (None, carry_chosen(&mut next, &moves))
        }
        Intent::FailoverTick(at) => {
            remember_owners(&mut next, at);
            let moves = next.choice.tick(at);
            (None, carry_chosen(&mut next, &moves))
        }
        Intent::LinkObserved(link) => {
            let mut notes = Vec::new();
            if link.networks != next.link.networks {
                notes.push(format!(
                    "the TUN's networks changed to {:?}; forwarding scope updated",
                    link.networks
                ));
            }
            if link.mtu != next.link.mtu {
                notes.push(format!("the TUN's MTU changed to {}", link.mtu));
            }
            next.link = link;
            (None, (!notes.is_empty()).then(|| notes.join("; ")))
        }
        Intent::DnsObserved(serving) => {
            let offered = |d: &Desired| d.settings.dns_offer(&d.dns_serving).is_some();
            let was = offered(&next);
            next.dns_serving = serving;
            let note = match (was, offered(&next)) {
                (true, false) => Some(
                    "the DNS forwarder cannot answer: no longer offered to clients".to_string(),
                ),
                (false, true) => Some("the DNS forwarder answers: offered to clients".to_string()),
                _ => None,
            };
            (None, note)
        }
        Intent::ImportIdentity(identity) => {
            let (key, settings) = crate::identity::validate(&identity, &next.settings)
                .map_err(|why| Error::new(EINVAL, format!("the identity is refused: {why}")))?;
            // As `wg set private-key` does: a peer with our new key goes.
            next.device
                .apply_set(crate::device::SetRequest {
                    private_key: Some(Some(key)),
                    ..Default::default()
                })
                .map_err(|errno| Error::new(errno, "the identity cannot be applied"))?;
            reload(&mut next, Some(settings), &identity.peers)?;
            let message = format!(
                "identity imported: public key {}, {} peers, {} advertised ranges",
                next.device
                    .public_key()
                    .map(|k| crate::key::b64(&k))
                    .unwrap_or_default(),
                next.device.peers.len(),
                next.settings.advertised_routes.len()
            );
            (
                Some(Response::Done {
                    message: message.clone(),
                }),
                Some(message),
            )
        }
        Intent::Reload { settings, peers } => {
            reload(&mut next, settings, &peers)?;
            // The reply, not a summary: the owner logs it even when the
            // files held nothing new, so a SIGHUP is always answered.
            let message = format!(
                "reloaded settings and peers ({} peers)",
                next.device.peers.len()
            );
            (Some(Response::Done { message }), None)
        }
    };
    // Advertise and SIGHUP's reload may change the checks.
    next.health.follow(&next.settings.checks);
    // A gateway no longer trusted for routes (removed, or accept-routes
    // off) gives up what it carried; another may take it at once.
    let gone: Vec<u64> = next
        .choice
        .gateways()
        .filter(|g| {
            !next
                .device
                .peer_by_handle(*g)
                .is_some_and(|p| p.accept_routes)
        })
        .collect();
    let mut moves = Vec::new();
    if let (false, Some(at)) = (gone.is_empty(), next.choice.latest()) {
        remember_owners(&mut next, at);
    }
    for gateway in gone {
        moves.extend(next.choice.forget(gateway));
    }
    let summary = match carry_chosen(&mut next, &moves) {
        Some(more) => Some(summary.map_or(more.clone(), |s| format!("{s}; {more}"))),
        None => summary,
    };
    next.device.release_removed(&current.device);
    Ok(Planned::new(next, reply, summary))
}

/// Gives each trusted gateway's learned routes what the choice says it
/// carries; a summary of the moves, if any.
fn carry_chosen(next: &mut Desired, moves: &[failover::Move]) -> Option<String> {
    if moves.is_empty() {
        return None;
    }
    for peer in next.device.peers.iter_mut() {
        if peer.accept_routes {
            peer.learned = next.choice.carried_by(peer.handle);
        }
    }
    let name = |handle: Option<u64>| match handle {
        Some(h) => next
            .device
            .peer_by_handle(h)
            .map_or_else(|| "a removed peer".to_string(), |p| p.label()),
        None => "nobody".to_string(),
    };
    let said: Vec<String> = moves
        .iter()
        .map(|m| match (m.from, m.to) {
            (None, Some(to)) => format!("{} via {}", m.range, name(Some(to))),
            (Some(from), None) => format!("{} no longer via {}", m.range, name(Some(from))),
            (from, to) => format!("{} moved from {} to {}", m.range, name(from), name(to)),
        })
        .collect();
    Some(format!("accepted routes: {}", said.join(", ")))
}

/// Seeds the choice with the routes each trusted gateway carried when the
/// state files were written, so a restart keeps traffic where it was.
fn remember_owners(next: &mut Desired, at: Instant) {
    for peer in &next.device.peers {
        if peer.accept_routes {
            for range in &peer.learned {
                next.choice.remember(*range, peer.handle, at);
            }
        }
    }
}

fn dns_summary(dns: &crate::settings::DnsSettings) -> String {
    if !dns.enabled {
        return "off".into();
    }
    let upstreams = if dns.upstreams.is_empty() {
        "the host's resolvers".to_string()
    } else {
        let list: Vec<String> = dns.upstreams.iter().map(ToString::to_string).collect();
        list.join(",")
    };
    let zones = if dns.zones.is_empty() {
        String::new()
    } else {
        format!(", zones {}", dns.zones.join(","))
    };
    format!("on (upstream {upstreams}{zones})")
}

fn no_peer(name: &str) -> Error {
    Error::invalid(format!(
        "no peer named {}; see `vpcgate peer list`",
        crate::text::quote(name)
    ))
}

fn apply_options(next: &mut Desired, options: &SetOptions) -> Result<(), Error> {
    let settings = &mut next.settings;
    if let Some(endpoint) = &options.public_endpoint {
        policy::validate_endpoint(endpoint)?;
        settings.public_endpoint = Some(endpoint.clone());
    }
    if let Some(snat) = options.snat {
        settings.snat = snat;
    }
    if let Some(mss) = options.mss_clamp {
        settings.mss_clamp = mss;
    }
    if let Some(priority) = options.priority {
        settings.priority = priority;
    }
    if let Some(mtu) = options.mtu {
        if !(1280..=65535).contains(&mtu) {
            return Err(Error::invalid(format!(
                "MTU {mtu} is out of range: use 1280 to 65535 (IPv6 needs at least 1280)"
            )));
        }
        settings.mtu = mtu;
    }
    if let Some(list) = &options.address {
        let mut addresses = Vec::new();
        for text in policy::split_list(list) {
            addresses.push(text.parse::<IpNet>().map_err(|_| {
                Error::invalid(format!(
                    "{} is not an address with a prefix length, e.g. 100.64.0.1/24",
                    crate::text::quote(&text)
                ))
            })?);
        }
        validate_addresses(&addresses)?;
        if let Some(clash) = settings.advertised_routes.iter().find(|r| {
            addresses
                .iter()
                .any(|a| policy::overlaps_tunnel(&a.trunc(), r))
        }) {
            return Err(Error::invalid(format!(
                "the tunnel network would overlap the advertised route {clash}; change the advertised routes first"
            )));
        }
        settings.addresses = addresses;
    }
    if let Some(port) = options.listen_port {
        settings.listen_port = port;
    }
    if let Some(on) = options.dns {
        settings.dns.enabled = on;
    }
    if let Some(list) = &options.dns_upstream {
        let own: Vec<std::net::IpAddr> = settings.addresses.iter().map(IpNet::addr).collect();
        settings.dns.upstreams = policy::validate_dns_upstreams(list, &own)?;
    }
    if let Some(list) = &options.dns_zones {
        settings.dns.zones = policy::validate_dns_zones(list)?;
    }
    policy::validate_advertisement(settings)?;
    if let Some(clash) = settings
        .dns
        .upstreams
        .iter()
        .find(|u| settings.addresses.iter().any(|a| a.addr() == **u))
    {
        return Err(Error::invalid(format!(
            "the DNS upstream {clash} would be this gateway's own tunnel address; change it first (vpcgate set --dns-upstream)"
        )));
    }
    if options.mtu.is_some() {
        // We set it on the TUN; the kernel's report follows.
        next.link.mtu = next.settings.mtu;
    }
    Ok(())
}

/// Validates a `peer add` and adds the peer; returns its allowed IPs.
fn add_peer(next: &mut Desired, add: NewPeer) -> Result<Vec<IpNet>, Error> {
    let NewPeer {
        request,
        endpoint,
        generated_key,
    } = add;
    policy::validate_name(&request.name)?;
    let device = &next.device;
    if device.peer_by_name(&request.name).is_some() {
        return Err(Error::new(
            crate::errno::EEXIST,
            format!(
                "a peer named {:?} already exists; remove it first (`vpcgate peer remove {}`)",
                request.name, request.name
            ),
        ));
    }
    if request.public_key.is_none() && next.settings.public_endpoint.is_none() {
        return Err(Error::invalid(
            "set the address clients connect to first: vpcgate set --public-endpoint HOST:PORT",
        ));
    }
    let public_key = match (&request.public_key, &generated_key) {
        (Some(text), _) => parse_key(text)?,
        (None, Some(private)) => Key(public_key_of(private)),
        (None, None) => return Err(Error::invalid("no key was given or generated")),
    };
    // The UAPI refuses it too, so `wg syncconf` could not send it back.
    if public_key.is_zero() {
        return Err(Error::invalid(
            "that key is all zeros, which no peer can have",
        ));
    }
    if Some(public_key.0) == device.public_key() {
        return Err(Error::invalid("that is this node's own public key"));
    }
    if let Some(other) = device.peers.iter().find(|p| p.public_key == public_key) {
        return Err(Error::new(
            crate::errno::EEXIST,
            format!(
                "a peer with that key already exists{}",
                other
                    .name
                    .as_ref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            ),
        ));
    }
    if let Some(text) = &request.endpoint {
        policy::validate_endpoint(text)?;
    }
    let mut allowed_ips = Vec::new();
    let mut listed = HashSet::new();
    for text in policy::split_list(&request.allowed_ips) {
        let net = policy::parse_prefix(&text)?;
        if !listed.insert(net) {
            return Err(Error::invalid(format!("{net} is listed twice")));
        }
        allowed_ips.push(net);
    }
    if allowed_ips.is_empty() {
        allowed_ips = assign_addresses(next)?;
    }
    // Indexed once: a request may list tens of thousands of prefixes.
    let owners: HashMap<IpNet, &PeerConfig> = device
        .peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().map(move |net| (*net, p)))
        .collect();
    for net in &allowed_ips {
        if let Some(owner) = owners.get(net) {
            return Err(Error::new(
                crate::errno::EEXIST,
                format!("{net} already belongs to peer {}", owner.label()),
            ));
        }
    }
    let peer = next
        .device
        .push_peer(public_key)
        .map_err(|errno| Error::new(errno, "cannot add a peer: too many peers"))?;
    peer.name = Some(request.name);
    peer.client_private_key = generated_key;
    peer.allowed_ips = allowed_ips.clone();
    peer.endpoint = endpoint;
    peer.persistent_keepalive = request.keepalive.unwrap_or(0);
    peer.accept_routes = request.accept_routes;
    peer.accept_default_route = request.accept_default_route;
    Ok(allowed_ips)
}

/// The next free address in each tunnel network, for a peer added without
/// `--allowed-ips`.
fn assign_addresses(desired: &Desired) -> Result<Vec<IpNet>, Error> {
    let used: Vec<IpNet> = desired
        .device
        .peers
        .iter()
        .flat_map(|p| p.allowed_ips.iter().copied())
        .chain(
            desired
                .settings
                .addresses
                .iter()
                .map(|a| IpNet::from(a.addr())),
        )
        .collect();
    desired
        .settings
        .tunnel_networks()
        .iter()
        .map(|network| {
            policy::next_free_address(network, &used).ok_or_else(|| {
                Error::new(
                    crate::errno::ENOSPC,
                    format!("no free address left in the tunnel network {network}"),
                )
            })
        })
        .collect()
}

/// The wg-quick config of a peer whose key we generated.
pub fn client_config(desired: &Desired, peer: &PeerConfig) -> Result<String, Error> {
    let name = peer.name.as_deref().unwrap_or("this peer");
    let private = peer.client_private_key.as_ref().ok_or_else(|| {
        Error::invalid(format!("{name} brought its own key, so its config lives with it; only peers added without --public-key have one here"))
    })?;
    let endpoint = desired.settings.public_endpoint.as_deref().ok_or_else(|| {
        Error::invalid(
            "set the address clients connect to first: vpcgate set --public-endpoint HOST:PORT",
        )
    })?;
    let gateway = desired
        .device
        .public_key()
        .ok_or_else(|| Error::invalid("this node has no private key"))?;
    let allowed: Vec<IpNet> = desired
        .settings
        .tunnel_networks()
        .into_iter()
        .chain(desired.settings.advertised_routes.iter().copied())
        .collect();
    let private = zeroize::Zeroizing::new(b64(&private.0));
    Ok(ClientConfig {
        private_key: &private,
        addresses: &peer.allowed_ips,
        mtu: desired.settings.mtu,
        gateway_public_key: &b64(&gateway),
        endpoint,
        allowed_ips: &allowed,
        dns: &desired.settings.dns_addresses(),
    }
    .render())
}

/// `vpcgate peer config NAME`.
pub fn peer_config(desired: &Desired, name: &str) -> Result<String, Error> {
    let peer = desired
        .device
        .peer_by_name(name)
        .ok_or_else(|| no_peer(name))?;
    client_config(desired, peer)
}

/// A trusted peer offered routes: keep what the policy accepts. Returns a
/// summary when the accepted set changed.
fn learn_routes(
    next: &mut Desired,
    handle: PeerHandle,
    offered: &[IpNet],
    local: &[IpNet],
    priority: u16,
    at: Instant,
) -> Option<String> {
    let device: &DeviceConfig = &next.device;
    let peer = device.peer_by_handle(handle)?;
    if !peer.accept_routes {
        return None;
    }
    let taken: HashSet<IpNet> = device
        .peers
        .iter()
        .filter(|p| p.handle != handle)
        .flat_map(|p| p.allowed_ips.iter().copied())
        .collect();
    let tunnel = next.settings.tunnel_networks();
    let learn = LearnPolicy {
        accept_default_route: peer.accept_default_route,
        tunnel: &tunnel,
        local,
        taken: &taken,
    };
    let (accepted, refused) = learn.filter(offered);
    let name = peer.label();
    for reason in &refused {
        tracing::warn!(peer = %name, "not accepting route {reason}");
    }
    // Which gateway carries each range is the choice's: with one gateway,
    // everything it offers; with two or more for a range, one of them.
    remember_owners(next, at);
    let moves = next.choice.heard(handle, Some(&accepted), priority, at);
    carry_chosen(next, &moves)
}

/// Takes the DNS forwarder a trusted peer offers, keeping only the servers
/// that cryptokey routing sends to that peer: an offer cannot point a
/// client's resolver anywhere else.
fn learn_dns(next: &mut Desired, handle: PeerHandle, offer: Option<&DnsOffer>) -> Option<String> {
    let peer = next.device.peer_by_handle_mut(handle)?;
    if !peer.accept_routes {
        return None;
    }
    let name = peer.label();
    let learned = offer.and_then(|offer| {
        let (servers, refused): (Vec<IpAddr>, Vec<IpAddr>) = offer
            .servers()
            .partition(|s| peer.allowed_ips.iter().any(|net| net.contains(s)));
        for server in &refused {
            tracing::warn!(peer = %name, "not using DNS server {server}: it is not among the peer's allowed IPs");
        }
        (!servers.is_empty()).then(|| LearnedDns {
            servers,
            zones: offer.zones().map(str::to_string).collect(),
        })
    });
    if learned == peer.learned_dns {
        return None;
    }
    let summary = match &learned {
        None => format!("{name} no longer offers DNS"),
        Some(dns) => {
            let servers: Vec<String> = dns.servers.iter().map(ToString::to_string).collect();
            let zones = match dns.zones.is_empty() {
                true => "every name".to_string(),
                false => dns.zones.join(","),
            };
            format!("{name} offers DNS at {} for {zones}", servers.join(","))
        }
    };
    peer.learned_dns = learned;
    Some(summary)
}

/// SIGHUP: takes the peers and settings from the files. Peers whose key is
/// unchanged keep their handle, and so their session. The port and the
/// addresses' owner stay: `vpcgate set` changes the port.
fn reload(
    next: &mut Desired,
    settings: Option<Settings>,
    stored: &[StoredPeer],
) -> Result<(), Error> {
    let mut fresh = DeviceConfig::new(None);
    restore_peers(&mut fresh, stored)
        .map_err(|reason| Error::new(EIO, format!("the peers file is corrupt ({reason})")))?;
    let device = &mut next.device;
    device
        .peers
        .retain(|p| fresh.peers.iter().any(|f| f.public_key == p.public_key));
    for f in fresh.peers.drain(..) {
        let peer = match device
            .peers
            .iter()
            .position(|p| p.public_key == f.public_key)
        {
            Some(i) => &mut device.peers[i],
            None => device.push_peer(f.public_key.clone()).map_err(|errno| {
                Error::new(errno, "cannot apply the reloaded peers: too many peers")
            })?,
        };
        peer.adopt_settings(f);
    }
    if let Some(mut settings) = settings {
        settings.listen_port = next.settings.listen_port;
        next.settings = settings;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Settings;

    fn desired() -> Desired {
        let mut settings = Settings::new(vec!["100.64.0.1/24".parse().expect("cidr")], 51820);
        settings.public_endpoint = Some("gw.example:51820".into());
        Desired {
            interface: "vpcgate0".into(),
            device: DeviceConfig::new(Some(Key([1; 32]))),
            settings,
            link: LinkState {
                networks: Vec::new(),
                mtu: 1420,
            },
            dns_serving: Vec::new(),
            choice: Default::default(),
            health: Default::default(),
        }
    }

    fn add(name: &str, key: u8) -> Intent {
        Intent::PeerAdd(NewPeer {
            request: PeerAdd {
                name: name.into(),
                ..PeerAdd::default()
            },
            endpoint: None,
            generated_key: Some(Key([key; 32])),
        })
    }

    #[test]
    fn peers_get_the_next_free_address_and_a_config() {
        let first = plan(&desired(), add("laptop", 2)).expect("valid");
        let Some(Response::PeerAdded {
            allowed_ips,
            config: Some(config),
            ..
        }) = first.reply
        else {
            panic!("not a peer-added reply: {:?}", first.reply);
        };
        assert_eq!(allowed_ips, ["100.64.0.2/32"]);
        assert!(config.contains("Endpoint = gw.example:51820"), "{config}");
        let second = plan(&first.desired, add("phone", 3)).expect("valid");
        assert_eq!(
            second
                .desired
                .device
                .peer_by_name("phone")
                .map(|p| p.allowed_ips.clone()),
            Some(vec!["100.64.0.3/32".parse().expect("cidr")])
        );
    }

    #[test]
    fn refusals_name_the_errno_and_change_nothing() {
        let one = plan(&desired(), add("laptop", 2)).expect("valid").desired;
        for (intent, errno, words) in [
            (add("laptop", 3), crate::errno::EEXIST, "already exists"),
            (
                Intent::PeerRemove {
                    name: "nobody".into(),
                },
                EINVAL,
                "no peer named",
            ),
            (
                Intent::Set(SetOptions {
                    mtu: Some(1000),
                    ..SetOptions::default()
                }),
                EINVAL,
                "out of range",
            ),
            (
                Intent::Advertise {
                    routes: vec!["100.64.0.0/16".into()],
                    exit_node: false,
                    checks: Vec::new(),
                },
                EINVAL,
                "",
            ),
        ] {
            let err = plan(&one, intent).expect_err(words);
            assert_eq!(err.errno, errno, "{err}");
            assert!(err.message.contains(words), "{err}");
        }
    }

    #[test]
    fn routes_are_learned_only_from_trusted_peers() {
        let mut d = desired();
        let trusted = d.device.push_peer(Key([4; 32])).expect("room").handle;
        d.device
            .peer_by_handle_mut(trusted)
            .expect("peer")
            .accept_routes = true;
        let untrusted = d.device.push_peer(Key([5; 32])).expect("room").handle;
        let offer = |peer| Intent::RoutesOffered {
            peer,
            routes: vec!["198.18.64.0/20".parse().expect("cidr")],
            dns: None,
            local: Vec::new(),
            priority: vpcgate_node::routes_msg::DEFAULT_PRIORITY,
            at: std::time::Instant::now(),
        };
        let learned = plan(&d, offer(trusted)).expect("valid").desired;
        assert_eq!(learned.os_routes().len(), 1);
        let ignored = plan(&d, offer(untrusted)).expect("valid");
        assert_eq!(ignored.desired, d);
        assert!(ignored.summary.is_none());
    }

    #[test]
    fn reload_keeps_the_handles_of_unchanged_peers_and_the_port() {
        let d = plan(&desired(), add("laptop", 2)).expect("valid").desired;
        let handle = d.device.peers[0].handle;
        let mut file = d.persisted();
        file.settings.listen_port = 1;
        file.settings.mss_clamp = false;
        let next = plan(
            &d,
            Intent::Reload {
                settings: Some(file.settings),
                peers: file.peers,
            },
        )
        .expect("valid")
        .desired;
        assert_eq!(next.device.peers[0].handle, handle);
        assert_eq!(next.settings.listen_port, 51820);
        assert!(!next.settings.mss_clamp);
    }
}
