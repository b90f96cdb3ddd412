//! The kernel's routing tables as `/proc/net/route` and
//! `/proc/net/ipv6_route` show them, and our own longest-prefix match over
//! them, for the doctor's route checks (see [`super::host`] for why not
//! netlink).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `rtentry` flags shared by `/proc/net/route` and `/proc/net/ipv6_route`.
const RTF_GATEWAY: u32 = 0x0002;
const RTF_REJECT: u32 = 0x0200;
/// IPv6 only: a route to one of this host's own addresses.
const RTF_LOCAL: u32 = 0x8000_0000;

/// An IP prefix such as `198.18.64.0/20` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    /// Parses `ADDR/LEN`; a bare address is a host prefix.
    pub fn parse(text: &str) -> Option<Prefix> {
        let (addr, len) = match text.trim().split_once('/') {
            Some((a, l)) => (a.parse::<IpAddr>().ok()?, Some(l.parse::<u8>().ok()?)),
            None => (text.trim().parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        (len <= max).then_some(Prefix { addr, len })
    }

    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// The prefix with its host bits cleared.
    pub fn network(&self) -> Prefix {
        let addr = match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(self.len))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(self.len))),
        };
        Prefix {
            addr,
            len: self.len,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let m = mask32(self.len);
                u32::from(net) & m == u32::from(ip) & m
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let m = mask128(self.len);
                u128::from(net) & m == u128::from(ip) & m
            }
            _ => false,
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn mask32(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

fn mask128(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

/// One entry of the kernel's routing table as `/proc/net/*route` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub prefix: Prefix,
    pub gateway: Option<IpAddr>,
    /// `*` for a reject route in `/proc/net/route`.
    pub iface: String,
    pub metric: u32,
    /// unreachable, prohibit or blackhole: packets matching it are dropped.
    pub reject: bool,
    /// A route to one of this host's own addresses (IPv6 only).
    pub local: bool,
}

impl Route {
    /// `via GW dev IF`, as `ip route` would say it.
    pub fn describe(&self) -> String {
        match self.gateway {
            Some(gw) => format!("via {gw} dev {}", self.iface),
            None => format!("dev {}", self.iface),
        }
    }
}

/// Parses `/proc/net/route`. Addresses there are `__be32` values printed as
/// native integers, so their bytes in memory order are network order.
pub fn parse_route4(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let hex = |s: &str| u32::from_str_radix(s, 16).ok();
            let dest = Ipv4Addr::from(hex(f[1])?.to_ne_bytes());
            let gw = Ipv4Addr::from(hex(f[2])?.to_ne_bytes());
            let flags = hex(f[3])?;
            let metric = f[6].parse::<u32>().ok()?;
            let mask = u32::from(Ipv4Addr::from(hex(f[7])?.to_ne_bytes()));
            // A mask whose ones are not contiguous is no prefix.
            let len = mask.count_ones();
            if mask != mask32(len as u8) {
                return None;
            }
            Some(Route {
                prefix: Prefix {
                    addr: IpAddr::V4(dest),
                    len: len as u8,
                },
                gateway: (flags & RTF_GATEWAY != 0).then_some(IpAddr::V4(gw)),
                iface: f[0].to_string(),
                metric,
                reject: flags & RTF_REJECT != 0,
                local: false,
            })
        })
        .collect()
}

/// Parses `/proc/net/ipv6_route`: destination, its length, source, its
/// length, next hop, metric, refcount, use, flags, interface.
pub fn parse_route6(text: &str) -> Vec<Route> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            let addr = |s: &str| u128::from_str_radix(s, 16).ok().map(Ipv6Addr::from);
            let dest = addr(f[0])?;
            let len = u8::from_str_radix(f[1], 16).ok().filter(|l| *l <= 128)?;
            let next_hop = addr(f[4])?;
            let metric = u32::from_str_radix(f[5], 16).ok()?;
            let flags = u32::from_str_radix(f[8], 16).ok()?;
            Some(Route {
                prefix: Prefix {
                    addr: IpAddr::V6(dest),
                    len,
                },
                gateway: (flags & RTF_GATEWAY != 0 && !next_hop.is_unspecified())
                    .then_some(IpAddr::V6(next_hop)),
                iface: f[9].to_string(),
                metric,
                reject: flags & RTF_REJECT != 0,
                local: flags & RTF_LOCAL != 0,
            })
        })
        .collect()
}

/// The route the kernel would pick for `ip` among `routes`: the longest
/// matching prefix, then the lowest metric.
pub fn lookup(routes: &[Route], ip: IpAddr) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| r.prefix.contains(ip))
        .max_by_key(|r| (r.prefix.len, std::cmp::Reverse(r.metric)))
}

/// The default route with the lowest metric that delivers somewhere.
pub fn default_route(routes: &[Route]) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| r.prefix.len == 0 && !r.reject)
        .min_by_key(|r| r.metric)
}
