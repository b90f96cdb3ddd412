//! The one desired state of a node: the WireGuard device, the node's
//! settings, and what the TUN carries as the kernel last reported it. Every
//! side effect is a projection of it: what the data path holds, the SNAT
//! table, the TUN's addresses and routes, and the state files.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use vpcgate_node::mss::mss_for_mtu;

use crate::datapath::{DatapathState, PeerState};
use crate::device::DeviceConfig;
use crate::key::Key;
use crate::ports::{LinkDns, NatState};
use crate::settings::Settings;
use crate::stored::{stored_peers, StoredPeer};

/// What the TUN device carries right now, as the kernel reports it: the
/// addresses wg-quick or ip(8) gave it as well as ours, and its MTU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    /// The networks of the device's addresses (link-local ones aside).
    pub networks: Vec<IpNet>,
    pub mtu: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The TUN interface's name.
    pub interface: String,
    pub device: DeviceConfig,
    pub settings: Settings,
    pub link: LinkState,
    /// Where the DNS forwarder answers with an upstream to ask, as it last
    /// reported: the route exchange offers only these, so a gateway whose
    /// forwarder cannot work does not take over its clients' names.
    pub dns_serving: Vec<IpAddr>,
    /// Which trusted gateway carries each range two or more offer; learned
    /// routes follow it. Not saved: the learned routes are, and seed it.
    pub choice: crate::failover::Choice,
    /// What the health checks found. Not saved: each target is proven
    /// again after a restart.
    pub health: crate::health::Health,
}

/// The state files' contents.
#[derive(Clone, PartialEq, Eq)]
pub struct Persisted {
    /// `None`: no key, and none is saved (a cleared key leaves the file).
    pub key: Option<Key>,
    pub settings: Settings,
    pub peers: Vec<StoredPeer>,
}

/// The tunnel's own addresses and MTU, as we set them on the TUN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    pub addresses: Vec<IpNet>,
    pub mtu: u32,
}

impl Desired {
    /// The desired state the state files describe, before the kernel has
    /// reported anything about the TUN. The error says why the peers file
    /// is corrupt.
    pub fn restore(
        interface: &str,
        key: Option<Key>,
        settings: Settings,
        peers: &[StoredPeer],
    ) -> Result<Desired, String> {
        let mut device = DeviceConfig::new(key);
        crate::stored::restore_peers(&mut device, peers)?;
        let mut health = crate::health::Health::default();
        health.follow(&settings.checks);
        Ok(Desired {
            interface: interface.to_string(),
            link: LinkState {
                networks: Vec::new(),
                mtu: settings.mtu,
            },
            device,
            settings,
            dns_serving: Vec::new(),
            choice: Default::default(),
            health,
        })
    }

    /// The forwarding scope: packets from peers may go only here. That is
    /// the networks of our tunnel addresses (`--address`, and whatever else
    /// the device carries, as wg-quick and ip(8) add them) and the
    /// advertised ranges.
    pub fn forward_scope(&self) -> Vec<IpNet> {
        let mut scope = self.settings.tunnel_networks();
        scope.extend(self.link.networks.iter().copied());
        scope.extend(self.settings.advertised_routes.iter().copied());
        scope
    }

    pub fn nat(&self) -> NatState {
        NatState {
            interface: self.interface.clone(),
            enabled: self.settings.snat,
            ranges: self.settings.advertised_routes.clone(),
        }
    }

    pub fn link_config(&self) -> LinkConfig {
        LinkConfig {
            addresses: self.settings.addresses.clone(),
            mtu: self.settings.mtu,
        }
    }

    /// The TUN link's DNS in the host's resolver: the forwarders trusted
    /// peers offer, for their zones. `None`: nobody offers one, and ours
    /// (if any) is removed.
    pub fn link_dns(&self) -> Option<LinkDns> {
        let mut dns = LinkDns {
            servers: Vec::new(),
            domains: Vec::new(),
        };
        for offer in self
            .device
            .peers
            .iter()
            .filter(|p| p.accept_routes)
            .filter_map(|p| p.learned_dns.as_ref())
        {
            for server in &offer.servers {
                if !dns.servers.contains(server) {
                    dns.servers.push(*server);
                }
            }
            let domains = match offer.zones.is_empty() {
                true => vec!["~.".to_string()],
                false => offer.zones.iter().map(|z| format!("~{z}")).collect(),
            };
            for domain in domains {
                if !dns.domains.contains(&domain) {
                    dns.domains.push(domain);
                }
            }
        }
        (!dns.servers.is_empty()).then_some(dns)
    }

    /// Routes learned from trusted peers, each routed through the TUN.
    pub fn os_routes(&self) -> BTreeSet<IpNet> {
        self.device
            .peers
            .iter()
            .flat_map(|p| p.learned.iter().copied())
            .collect()
    }

    pub fn persisted(&self) -> Persisted {
        Persisted {
            key: self.device.private_key.clone(),
            settings: self.settings.clone(),
            peers: stored_peers(&self.device),
        }
    }

    /// The MSS clamp for the device's MTU as it is, which ip(8) may have set.
    pub fn mss(&self) -> (u16, u16) {
        if self.settings.mss_clamp {
            mss_for_mtu(u16::try_from(self.link.mtu).unwrap_or(u16::MAX))
        } else {
            (0, 0)
        }
    }

    /// What the route exchange offers now: the advertised ranges whose
    /// checks pass, or nothing while draining. The forwarding scope and
    /// SNAT keep every advertised range, so connections that still arrive
    /// (a client yet to move, a stock client) keep working.
    pub fn advertising(&self) -> Vec<IpNet> {
        match self.settings.draining {
            true => Vec::new(),
            false => self.health.advertisable(&self.settings.advertised_routes),
        }
    }

    pub fn datapath(&self) -> DatapathState {
        let device = &self.device;
        // Learned routes come first so that a configured prefix, inserted
        // later, wins a tie: the last duplicate wins in `RouteTable::build`.
        let learned = device
            .peers
            .iter()
            .flat_map(|p| p.learned.iter().map(move |net| (*net, p.handle)));
        let configured = device
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().map(move |net| (*net, p.handle)));
        DatapathState {
            private_key: device.private_key.clone(),
            fwmark: device.fwmark,
            peers: device
                .peers
                .iter()
                .map(|p| {
                    (
                        p.handle,
                        PeerState {
                            handle: p.handle,
                            public_key: p.public_key.clone(),
                            preshared_key: p.preshared_key.clone(),
                            endpoint: p.endpoint,
                            persistent_keepalive: p.persistent_keepalive,
                            route_source: p.route_source(),
                        },
                    )
                })
                .collect::<BTreeMap<_, _>>(),
            routes: learned.chain(configured).collect(),
            forward: self.forward_scope(),
            mtu: self.link.mtu,
            mss: self.mss(),
            local_v4: self.settings.local_v4(),
            advertised: self.advertising(),
            advertised_dns: self.settings.dns_offer(&self.dns_serving),
            priority: self.settings.priority,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpcgate_node::RouteTable;

    #[test]
    fn forward_scope_is_tunnel_plus_link_plus_advertised() {
        let mut settings = Settings::new(vec!["100.64.0.1/24".parse().expect("cidr")], 51820);
        settings.advertised_routes = vec!["198.18.64.0/20".parse().expect("cidr")];
        let desired = Desired {
            interface: "vpcgate0".into(),
            device: DeviceConfig::new(None),
            settings,
            link: LinkState {
                networks: vec!["100.65.0.0/24".parse().expect("cidr")],
                mtu: 1420,
            },
            dns_serving: Vec::new(),
            choice: Default::default(),
            health: Default::default(),
        };
        let table = RouteTable::build(desired.forward_scope().into_iter().map(|n| (n, ())));
        for (addr, inside) in [
            ("100.64.0.9", true),
            ("100.65.0.9", true),
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
