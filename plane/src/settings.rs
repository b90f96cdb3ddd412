//! The node's own settings, as `vpcgate set` and `advertise-routes` change
//! them and `settings.json` keeps them, and the rules that hold for them.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use vpcgate_node::routes_msg::DnsOffer;

pub const DEFAULT_ADDRESS: &str = "100.64.0.1/24";
pub const DEFAULT_PORT: u16 = 51820;
pub const DEFAULT_MTU: u32 = 1420;

/// Settings that survive restarts. Flags given on the command line override
/// them and are then saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// This node's tunnel addresses: at most one IPv4 and one IPv6.
    pub addresses: Vec<IpNet>,
    /// The UDP port; 0 until one is bound (a plain interface before `wg`
    /// sets one lets the kernel choose).
    pub listen_port: u16,
    #[serde(default)]
    pub advertised_routes: Vec<IpNet>,
    /// Whether a default route may be advertised.
    #[serde(default)]
    pub exit_node: bool,
    #[serde(default = "enabled")]
    pub snat: bool,
    #[serde(default = "enabled")]
    pub mss_clamp: bool,
    /// HOST:PORT that client configs point at.
    #[serde(default)]
    pub public_endpoint: Option<String>,
    #[serde(default = "default_mtu")]
    pub mtu: u32,
    #[serde(default)]
    pub dns: DnsSettings,
    /// Sent with our advertisements: clients with two or more gateways for
    /// a range prefer the lowest.
    #[serde(default = "default_priority")]
    pub priority: u16,
    /// Targets that must answer for the advertised ranges around them to
    /// be advertised (`advertise-routes --check`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<crate::health::Check>,
    /// `vpcgate drain`: nothing is advertised, so clients move to another
    /// gateway, while forwarding goes on for whoever still sends.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// The DNS forwarder that answers tunnel peers on our tunnel addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSettings {
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// The resolvers to forward to; empty means the ones the host uses
    /// (its resolv.conf).
    #[serde(default)]
    pub upstreams: Vec<IpAddr>,
    /// The domains vpcgate clients send to us (split DNS), without the
    /// trailing dot; empty means none, so clients keep their own resolver.
    #[serde(default)]
    pub zones: Vec<String>,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            enabled: true,
            upstreams: Vec::new(),
            zones: Vec::new(),
        }
    }
}

fn enabled() -> bool {
    true
}

fn default_mtu() -> u32 {
    DEFAULT_MTU
}

fn default_priority() -> u16 {
    vpcgate_node::routes_msg::DEFAULT_PRIORITY
}

impl Settings {
    pub fn new(addresses: Vec<IpNet>, listen_port: u16) -> Settings {
        Settings {
            addresses,
            listen_port,
            advertised_routes: Vec::new(),
            exit_node: false,
            snat: true,
            mss_clamp: true,
            public_endpoint: None,
            mtu: default_mtu(),
            dns: DnsSettings::default(),
            priority: default_priority(),
            checks: Vec::new(),
            draining: false,
        }
    }

    /// The networks this node's tunnel addresses live in.
    pub fn tunnel_networks(&self) -> Vec<IpNet> {
        self.addresses.iter().map(IpNet::trunc).collect()
    }

    /// Where the DNS forwarder answers: our tunnel addresses, while it is
    /// on and this node is a gateway (it advertises ranges). A laptop that
    /// only accepts routes answers nobody; a plain interface has no
    /// addresses of its own (wg-quick's are not ours).
    pub fn dns_addresses(&self) -> Vec<IpAddr> {
        if self.dns.enabled && !self.advertised_routes.is_empty() {
            self.addresses.iter().map(IpNet::addr).collect()
        } else {
            Vec::new()
        }
    }

    /// What the route exchange tells clients about the DNS forwarder: the
    /// addresses it should answer on that `serving` (what it reports)
    /// says it does; `None` while there are none. Validation keeps the
    /// zones within what one offer carries, so nothing is lost here.
    pub fn dns_offer(&self, serving: &[IpAddr]) -> Option<DnsOffer> {
        let mut servers = self.dns_addresses();
        servers.retain(|a| serving.contains(a));
        if servers.is_empty() {
            return None;
        }
        let zones: Vec<&str> = self.dns.zones.iter().map(String::as_str).collect();
        DnsOffer::new(&servers, &zones).ok()
    }

    /// The IPv4 tunnel address: where route messages come from and go to.
    pub fn local_v4(&self) -> Option<Ipv4Addr> {
        self.addresses.iter().find_map(|a| match a {
            IpNet::V4(v4) => Some(v4.addr()),
            IpNet::V6(_) => None,
        })
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
}
