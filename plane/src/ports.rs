//! The side effects the control plane asks for, one small trait per kind:
//! the state store, the SNAT table, the TUN's addresses and routes, and the
//! data path. Each is safe to call again with the same input, so a failed
//! step can simply be retried. The shell implements them against the OS
//! (`vpcgated`); the `fakes` module implements them in memory for tests.
//!
//! The futures of the async ports run on the control thread's
//! current-thread runtime and are never sent to another thread, so the
//! traits promise no `Send`.
#![allow(async_fn_in_trait)]

use std::fmt;
use std::str::FromStr;

use ipnet::IpNet;

use crate::datapath::DatapathPlan;
use crate::key::Key;
use crate::settings::Settings;
use crate::stored::StoredPeer;

/// Why a port could not do what it was asked. `errno` is what the UAPI
/// answers with; the message names what failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct PortError {
    pub errno: i32,
    pub message: String,
}

impl PortError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        PortError {
            errno,
            message: message.into(),
        }
    }
}

/// The state directory. Each save replaces one file whole and durably, or
/// fails and leaves it as it was.
pub trait Store {
    fn save_key(&mut self, key: &Key) -> Result<(), PortError>;
    fn save_settings(&mut self, settings: &Settings) -> Result<(), PortError>;
    fn save_peers(&mut self, peers: &[StoredPeer]) -> Result<(), PortError>;
}

/// What the kernel's SNAT rules should be for one TUN interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatState {
    /// The TUN interface; only traffic arriving on it is masqueraded.
    pub interface: String,
    /// Whether to masquerade at all: `false` keeps the range sets but
    /// registers no NAT chain, so nothing is connection-tracked for us.
    pub enabled: bool,
    /// Destinations whose traffic is masqueraded. Order, overlaps and host
    /// bits do not matter. Empty means no table at all.
    pub ranges: Vec<IpNet>,
}

/// How the NAT rules are laid out in nftables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NatForm {
    /// One `inet` table for both families: nft 0.9.1 and Linux 5.2 or newer.
    Inet,
    /// An `ip` and an `ip6` table, for systems too old for `Inet`.
    Split,
}

impl fmt::Display for NatForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NatForm::Inet => "inet",
            NatForm::Split => "ip+ip6",
        })
    }
}

/// A [`NatForm`] name that is neither `inet` nor `ip+ip6` (or `split`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown NAT form {0:?}: use `inet` (one inet table) or `ip+ip6` (an ip and an ip6 table, for nft older than 0.9.1 or Linux older than 5.2)")]
pub struct UnknownNatForm(pub String);

impl FromStr for NatForm {
    type Err = UnknownNatForm;

    /// Parses what [`Display`](fmt::Display) prints; `split` is accepted for
    /// `ip+ip6`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inet" => Ok(NatForm::Inet),
            "ip+ip6" | "split" => Ok(NatForm::Split),
            other => Err(UnknownNatForm(other.to_string())),
        }
    }
}

/// Keeps the kernel's NAT rules for one TUN interface in line with a
/// desired [`NatState`].
pub trait Nat {
    /// Makes the kernel match `desired`, whole.
    fn apply(&mut self, desired: &NatState) -> Result<(), PortError>;
    /// Removes the daemon's tables of both forms (if present).
    fn remove(&mut self) -> Result<(), PortError>;
    /// The form of the table(s) currently applied; `None` when there are
    /// none: nothing applied yet, no ranges, or removed.
    fn form(&self) -> Option<NatForm>;
}

/// The TUN device's own addresses and MTU, and the routes through it.
pub trait Links {
    /// Puts the tunnel addresses `new` on the link in place of `old` (other
    /// addresses, such as ones ip(8) added, stay), sets the MTU and brings
    /// the link up.
    async fn configure(&mut self, old: &[IpNet], new: &[IpNet], mtu: u32) -> Result<(), PortError>;
    /// Routes `net` through the link; a route that is already there is
    /// success.
    async fn add_route(&mut self, net: IpNet) -> Result<(), PortError>;
    /// Removes our route for `net`; one that is already gone is success.
    async fn del_route(&mut self, net: IpNet) -> Result<(), PortError>;
}

/// What the host's resolver should do with names for the TUN link, as
/// systemd-resolved takes it: the servers to ask, and the routing domains
/// (`~zone`, or `~.` for every name) whose names go to them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkDns {
    pub servers: Vec<std::net::IpAddr>,
    pub domains: Vec<String>,
}

impl LinkDns {
    /// The commands that apply it by hand on `interface`, for a host where
    /// the daemon could not.
    pub fn command(&self, interface: &str) -> String {
        let servers: Vec<String> = self.servers.iter().map(ToString::to_string).collect();
        let domains: Vec<String> = self.domains.iter().map(|d| format!("'{d}'")).collect();
        format!(
            "resolvectl dns {interface} {} && resolvectl domain {interface} {}",
            servers.join(" "),
            domains.join(" ")
        )
    }
}

/// The host's resolver (systemd-resolved) for the TUN link: split DNS to
/// the forwarders trusted peers offer.
pub trait Resolver {
    /// Makes the link's DNS servers and routing domains `dns`, whole;
    /// `None` removes what we set. Asked only when that changes, so a link
    /// we never set (wg-quick's `DNS =`) is left alone.
    async fn apply(&mut self, interface: &str, dns: Option<&LinkDns>) -> Result<(), PortError>;
}

/// The data-path thread: its sockets, its peers and the routing snapshot
/// it reads.
pub trait Datapath {
    /// Bound sockets not yet in use.
    type Sockets;
    /// Binds the UDP sockets for `port` (0: the kernel chooses) and reports
    /// the port bound. Nothing changes until they are installed.
    fn bind(&mut self, port: u16, fwmark: u32) -> Result<(Self::Sockets, u16), PortError>;
    /// Makes the data path send and receive on `sockets` from now on.
    async fn install(&mut self, sockets: Self::Sockets);
    /// Carries out a plan in its order: the steps before the table, the
    /// new snapshot, the steps after it (removals), and returns once the
    /// data path has them all. So no published table ever names a peer the
    /// data path does not have.
    async fn apply(&mut self, plan: DatapathPlan);
}

/// What the service manager is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    /// Started, or done reloading: every socket is served.
    Ready,
    Reloading,
    Stopping,
    /// The data path still turns.
    Watchdog,
}

/// The service manager (systemd's notify socket).
pub trait Notifier {
    fn notify(&mut self, state: ServiceState);
}
