//! The common topology: two namespaces joined by a veth underlay, each with
//! one WireGuard implementation, configured as each other's peer.
//!
//! ```text
//!  ns a                                   ns b
//!  tunnel 100.64.0.1/24 [fd00:64::1/64]   tunnel 100.64.0.2/24 [fd00:64::2/64]
//!  udp :51820                             udp :51821
//!  veth 198.18.0.1/24 fd00:18::1/64  ===  veth 198.18.0.2/24 fd00:18::2/64
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context, Result};

use crate::netns::{veth, Netns};
use crate::wg::{gen_keypair, VpcgatedConfig, WgDev};

pub const UNDERLAY_PREFIX4: &str = "198.18.0.0/24";
pub const UNDERLAY_PREFIX6: &str = "fd00:18::/64";
pub const TUNNEL_PREFIX4: &str = "100.64.0.0/24";
pub const TUNNEL_PREFIX6: &str = "fd00:64::/64";

/// Which WireGuard implementation a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// Debian's wireguard-go, configured with `wg` and `ip`.
    WireguardGo,
    /// The daemon under test.
    Vpcgated,
    /// The daemon under test as a plain WireGuard interface (`vpcgated
    /// IFNAME`), configured with `wg` and `ip` exactly as wireguard-go is.
    VpcgatedPlain,
}

/// Which side is told the other's endpoint (and so can initiate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    Both,
    /// Only `a` knows `b`'s endpoint: `a` must initiate.
    AOnly,
    /// Only `b` knows `a`'s endpoint: `b` must initiate.
    BOnly,
}

#[derive(Clone, Debug)]
pub struct PairSpec {
    pub a: Impl,
    pub b: Impl,
    pub endpoints: Endpoints,
    /// Configure endpoints with the IPv6 underlay addresses.
    pub ipv6_endpoints: bool,
    /// Also give both tunnel interfaces fd00:64::N/64 and route it.
    pub inner_ipv6: bool,
    /// Extra command-line arguments for a vpcgated on side a and side b.
    pub a_args: Vec<String>,
    pub b_args: Vec<String>,
    /// Prefix length of the tunnel IPv4 addresses (100.64.0.N/len): 24
    /// unless a test needs more of 100.64.0.0/10 routed into the tunnel.
    pub tunnel_prefix_len: u8,
}

impl PairSpec {
    pub fn new(a: Impl, b: Impl) -> PairSpec {
        PairSpec {
            a,
            b,
            endpoints: Endpoints::Both,
            ipv6_endpoints: false,
            inner_ipv6: false,
            a_args: Vec::new(),
            b_args: Vec::new(),
            tunnel_prefix_len: 24,
        }
    }
}

/// One side of a [`Pair`].
pub struct Node {
    pub dev: WgDev,
    pub ns: Netns,
    pub imp: Impl,
    pub public_key: String,
    pub port: u16,
    pub underlay4: Ipv4Addr,
    pub underlay6: Ipv6Addr,
    pub tunnel4: Ipv4Addr,
    pub tunnel6: Option<Ipv6Addr>,
}

impl Node {
    /// Where the other side reaches this node's UDP socket.
    pub fn endpoint(&self, ipv6: bool) -> SocketAddr {
        let ip = if ipv6 {
            IpAddr::V6(self.underlay6)
        } else {
            IpAddr::V4(self.underlay4)
        };
        SocketAddr::new(ip, self.port)
    }

    /// The tunnel IPv4 address as a string, for ping.
    pub fn t4(&self) -> String {
        self.tunnel4.to_string()
    }

    /// The tunnel IPv6 address as a string; empty if the pair has none.
    pub fn t6(&self) -> String {
        self.tunnel6.map(|a| a.to_string()).unwrap_or_default()
    }

    /// What the other side lists as this node's allowed IPs: the tunnel
    /// /32 and, with inner IPv6, the /128.
    pub fn allowed_ips(&self) -> Vec<String> {
        let mut v = vec![format!("{}/32", self.tunnel4)];
        if let Some(t6) = self.tunnel6 {
            v.push(format!("{t6}/128"));
        }
        v
    }
}

/// Two connected nodes; see the module doc for addresses.
pub struct Pair {
    pub a: Node,
    pub b: Node,
}

/// Starts node number `index` (1 = a, 2 = b) in `ns`: listen port
/// 51819 + index, tunnel 100.64.0.index (and fd00:64::index with
/// `spec.inner_ipv6`). Its underlay addresses are taken to be 198.18.0.index
/// and fd00:18::index; a test with another underlay overwrites the fields.
/// A vpcgated gets `spec.a_args` or `spec.b_args`. No peers are configured.
pub fn start_node(ns: Netns, imp: Impl, index: u8, spec: &PairSpec) -> Result<Node> {
    let port = 51819 + u16::from(index);
    let tunnel4 = Ipv4Addr::new(100, 64, 0, index);
    let tunnel6 = spec
        .inner_ipv6
        .then(|| Ipv6Addr::new(0xfd00, 0x64, 0, 0, 0, 0, 0, u16::from(index)));
    let mut addrs = vec![format!("{tunnel4}/{}", spec.tunnel_prefix_len)];
    if let Some(t6) = tunnel6 {
        addrs.push(format!("{t6}/64"));
    }
    let role = if index == 1 { "a" } else { "b" };
    let (dev, public_key) = match imp {
        Impl::WireguardGo | Impl::VpcgatedPlain => {
            let dev = if imp == Impl::WireguardGo {
                WgDev::wireguard_go(&ns, &format!("w{role}"))?
            } else {
                WgDev::vpcgated_plain(&ns, &format!("p{role}"))?
            };
            let key = gen_keypair()?;
            let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
            dev.configure(&key, port, &addr_refs)?;
            (dev, key.public)
        }
        Impl::Vpcgated => {
            // vpcgated takes both tunnel addresses through --address, so it
            // knows both tunnel networks and forwards to them.
            let mut config = VpcgatedConfig::new(port, &addrs.join(","));
            config.extra_args = if index == 1 {
                spec.a_args.clone()
            } else {
                spec.b_args.clone()
            };
            let dev = WgDev::vpcgated(&ns, &format!("v{role}"), &config)?;
            let pk = dev.public_key()?;
            (dev, pk)
        }
    };
    Ok(Node {
        dev,
        ns,
        imp,
        public_key,
        port,
        underlay4: Ipv4Addr::new(198, 18, 0, index),
        underlay6: Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, u16::from(index)),
        tunnel4,
        tunnel6,
    })
}

impl Pair {
    /// Builds the topology and configures both sides as each other's peer
    /// (allowed-ips: the other's tunnel /32 and /128). No traffic is sent.
    pub fn new(spec: PairSpec) -> Result<Pair> {
        let ns_a = Netns::new("a")?;
        let ns_b = Netns::new("b")?;
        veth(
            &ns_a,
            &ns_b,
            &["198.18.0.1/24", "fd00:18::1/64"],
            &["198.18.0.2/24", "fd00:18::2/64"],
        )?;
        let a = start_node(ns_a, spec.a, 1, &spec).context("starting node a")?;
        let b = start_node(ns_b, spec.b, 2, &spec).context("starting node b")?;
        let a_knows_b = matches!(spec.endpoints, Endpoints::Both | Endpoints::AOnly);
        let b_knows_a = matches!(spec.endpoints, Endpoints::Both | Endpoints::BOnly);
        for (this, other, knows) in [(&a, &b, a_knows_b), (&b, &a, b_knows_a)] {
            let ips = other.allowed_ips();
            let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
            let ep = knows.then(|| other.endpoint(spec.ipv6_endpoints));
            this.dev
                .set_peer(&other.public_key, &refs, ep)
                .with_context(|| format!("adding peer to {}", this.dev.name()))?;
        }
        Ok(Pair { a, b })
    }

    /// Fails with the log of whichever side has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.a.dev.check_running().context("node a")?;
        self.b.dev.check_running().context("node b")
    }
}
