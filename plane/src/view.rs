//! What `vpcgate status` and `peer list` report: the desired state, joined
//! with what only the data path knows (each peer's roamed endpoint, its
//! last handshake and its byte counts).

use std::net::SocketAddr;
use std::time::SystemTime;

use vpcgate_node::PeerHandle;
use vpcgate_proto::{CarrierStatus, CheckStatus, LinkDnsStatus, PeerStatus, Status};

use crate::device::PeerConfig;
use crate::key::b64;
use crate::model::Desired;

/// A peer's live figures, read from the data path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerLive {
    /// Where its packets come from now (roaming); `None`: never heard.
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

pub fn peer_status(p: &PeerConfig, live: &PeerLive) -> PeerStatus {
    PeerStatus {
        name: p.name.clone(),
        public_key: b64(&p.public_key.0),
        endpoint: live.endpoint.or(p.endpoint).map(|e| e.to_string()),
        allowed_ips: p.effective_allowed_ips().map(ToString::to_string).collect(),
        latest_handshake: live.last_handshake.and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .ok()
                .map(|d| d.as_secs())
        }),
        rx_bytes: live.rx_bytes,
        tx_bytes: live.tx_bytes,
        persistent_keepalive: Some(p.persistent_keepalive).filter(|&k| k > 0),
        accept_routes: p.accept_routes,
    }
}

/// What the shell adds to a status: facts about the host and the data
/// path's counters.
pub struct HostFacts {
    pub listen_port: u16,
    pub warnings: Vec<String>,
    pub snat_form: Option<String>,
    pub drops: Vec<(String, u64)>,
    /// The DNS forwarder as it runs; `None` while it is off.
    pub dns: Option<vpcgate_proto::DnsStatus>,
    /// Whether the resolver holds the link's DNS, and why not.
    pub link_dns_applied: bool,
    pub link_dns_problem: Option<String>,
    /// Now, for how long checks and carriers have held.
    pub now: std::time::Instant,
}

pub fn status(desired: &Desired, live: impl Fn(PeerHandle) -> PeerLive, host: HostFacts) -> Status {
    let settings = &desired.settings;
    let now = host.now;
    Status {
        interface: desired.interface.clone(),
        public_key: desired
            .device
            .public_key()
            .map(|k| b64(&k))
            .unwrap_or_default(),
        listen_port: host.listen_port,
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
        accepted_routes: desired
            .device
            .peers
            .iter()
            .flat_map(|p| p.learned.iter().map(ToString::to_string))
            .collect(),
        snat: settings.snat,
        snat_form: host.snat_form,
        mss_clamp: settings.mss_clamp,
        warnings: host.warnings,
        peers: desired
            .device
            .peers
            .iter()
            .map(|p| peer_status(p, &live(p.handle)))
            .collect(),
        drops: host.drops,
        dns: host.dns.map(Box::new),
        link_dns: desired.link_dns().map(|dns| {
            Box::new(LinkDnsStatus {
                servers: dns.servers.iter().map(ToString::to_string).collect(),
                domains: dns.domains.clone(),
                from: desired
                    .device
                    .peers
                    .iter()
                    .filter(|p| p.accept_routes && p.learned_dns.is_some())
                    .map(PeerConfig::label)
                    .collect(),
                applied: host.link_dns_applied,
                problem: host.link_dns_problem,
                command: dns.command(&desired.interface),
            })
        }),
        advertising: desired
            .advertising()
            .iter()
            .map(ToString::to_string)
            .collect(),
        draining: settings.draining,
        checks: checks(desired, now),
        carriers: carriers(desired, now),
        failovers: desired.choice.failovers(),
    }
}

fn label(desired: &Desired, handle: PeerHandle) -> String {
    desired
        .device
        .peer_by_handle(handle)
        .map_or_else(|| "a removed peer".to_string(), PeerConfig::label)
}

fn secs_since(now: std::time::Instant, then: std::time::Instant) -> u64 {
    now.saturating_duration_since(then).as_secs()
}

/// Each health check's state and last result.
pub fn checks(desired: &Desired, now: std::time::Instant) -> Vec<CheckStatus> {
    desired
        .health
        .states()
        .map(|(check, state)| CheckStatus {
            target: check.to_string(),
            state: match (state.healthy, state.proven) {
                (true, _) => "healthy",
                (false, true) => "unhealthy",
                (false, false) => "pending",
            }
            .to_string(),
            for_secs: state.since.map(|since| secs_since(now, since)),
            last: state.last.as_ref().map(|p| p.detail.clone()),
            last_ok: state.last.as_ref().map(|p| p.ok),
            governs: desired
                .settings
                .advertised_routes
                .iter()
                .filter(|r| r.contains(&check.target.ip()))
                .map(ToString::to_string)
                .collect(),
        })
        .collect()
}

/// Which gateway carries each range the choice holds, and who stands by.
pub fn carriers(desired: &Desired, now: std::time::Instant) -> Vec<CarrierStatus> {
    let label = |handle| label(desired, handle);
    desired
        .choice
        .owners()
        .iter()
        .map(|(range, owner)| CarrierStatus {
            range: range.to_string(),
            via: label(owner.gateway),
            for_secs: secs_since(now, owner.since),
            standby: desired
                .choice
                .standing_by(range, now)
                .into_iter()
                .map(label)
                .collect(),
        })
        .collect()
}

/// One peer's figures, as the metrics exposition needs them.
pub struct PeerSample {
    pub name: Option<String>,
    pub public_key: String,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub last_handshake: Option<SystemTime>,
}

/// What one metrics scrape reports.
pub struct Sample {
    pub peers: Vec<PeerSample>,
    pub drops: Vec<(&'static str, u64)>,
    pub advertised_routes: usize,
    pub accepted_routes: usize,
    /// The ranges the route exchange offers now.
    pub advertising: usize,
    pub draining: bool,
    /// Each check and whether it passes.
    pub checks: Vec<(String, bool)>,
    /// Each range a client carries, and the gateway that carries it.
    pub carriers: Vec<(String, String)>,
    pub failovers: u64,
}

pub fn sample(
    desired: &Desired,
    live: impl Fn(PeerHandle) -> PeerLive,
    drops: Vec<(&'static str, u64)>,
) -> Sample {
    Sample {
        peers: desired
            .device
            .peers
            .iter()
            .map(|p| {
                let live = live(p.handle);
                PeerSample {
                    name: p.name.clone(),
                    public_key: b64(&p.public_key.0),
                    rx_bytes: live.rx_bytes,
                    tx_bytes: live.tx_bytes,
                    last_handshake: live.last_handshake,
                }
            })
            .collect(),
        drops,
        advertised_routes: desired.settings.advertised_routes.len(),
        accepted_routes: desired.device.peers.iter().map(|p| p.learned.len()).sum(),
        advertising: desired.advertising().len(),
        draining: desired.settings.draining,
        checks: desired
            .health
            .states()
            .map(|(check, state)| (check.to_string(), state.healthy))
            .collect(),
        carriers: desired
            .choice
            .owners()
            .iter()
            .map(|(range, owner)| (range.to_string(), label(desired, owner.gateway)))
            .collect(),
        failovers: desired.choice.failovers(),
    }
}
