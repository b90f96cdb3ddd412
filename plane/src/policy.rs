//! Subnet-router policy, all pure: which prefixes may be advertised, which
//! learned routes a client accepts, which tunnel address a new peer gets,
//! and the wg-quick config a stock client receives.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

use vpcgate_node::routes_msg::{self, DnsOffer, MAX_ROUTES};

use crate::settings::Settings;
use crate::text::quote;

/// Splits what the user typed into prefixes: commas, spaces, or both.
pub fn split_list(items: &[String]) -> Vec<String> {
    items
        .iter()
        .flat_map(|item| item.split(|c: char| c == ',' || c.is_whitespace()))
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Parses one prefix, insisting on canonical form so the user sees exactly
/// what will be routed.
pub fn parse_prefix(text: &str) -> Result<IpNet, String> {
    match text.parse::<IpNet>() {
        Ok(net) if net.trunc() == net => Ok(net),
        Ok(net) => Err(format!(
            "{text} has host bits set; did you mean {}?",
            net.trunc()
        )),
        Err(_) => match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => Err(format!(
                "{text} is an address, not a prefix; did you mean {text}/32?"
            )),
            Ok(IpAddr::V6(_)) => Err(format!(
                "{text} is an address, not a prefix; did you mean {text}/128?"
            )),
            Err(_) => Err(format!(
                "{} is not a CIDR prefix (for example 198.18.64.0/20)",
                quote(text)
            )),
        },
    }
}

/// Validates a whole advertised set. Every problem is reported, not just
/// the first, so one correction fixes the command.
pub fn validate_advertised(
    input: &[String],
    tunnel: &[IpNet],
    exit_node: bool,
) -> Result<Vec<IpNet>, String> {
    // More than can be advertised needs cutting down whatever else is wrong;
    // checking each entry against the others would also take quadratic time.
    if input.len() > MAX_ROUTES {
        return Err(format!(
            "{} prefixes given; at most {MAX_ROUTES} can be advertised \
             (summarise them into larger prefixes)",
            input.len()
        ));
    }
    let mut problems = Vec::new();
    let mut routes: Vec<IpNet> = Vec::new();
    for text in input {
        let net = match parse_prefix(text) {
            Ok(net) => net,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        if net.prefix_len() == 0 && !exit_node {
            problems.push(format!(
                "{net} is a default route: it would send all of a client's traffic through this \
                 gateway; add --exit-node if that is what you want"
            ));
            continue;
        }
        if let Some(t) = tunnel.iter().find(|t| overlaps_tunnel(t, &net)) {
            problems.push(format!("{net} overlaps the tunnel network {}", t.trunc()));
            continue;
        }
        if routes.contains(&net) {
            problems.push(format!("{net} is listed twice"));
            continue;
        }
        if let Some(outer) = routes.iter().find(|r| r.contains(&net) || net.contains(*r)) {
            let (inner, outer) = if outer.contains(&net) {
                (net, *outer)
            } else {
                (*outer, net)
            };
            problems.push(format!(
                "{inner} is already covered by {outer}; list only {outer}"
            ));
            continue;
        }
        routes.push(net);
    }
    if problems.is_empty() {
        Ok(routes)
    } else {
        Err(problems.join("\n"))
    }
}

pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

/// Whether the advertised `route` would take the tunnel network's place.
/// A default route (an exit node) covers everything, the tunnel included,
/// but the tunnel's own, longer route keeps winning on the client, so it
/// does not count. Validation, `set --address` and start-up must agree on
/// this, or a saved exit node would stop the daemon from starting again.
pub fn overlaps_tunnel(tunnel: &IpNet, route: &IpNet) -> bool {
    overlaps(tunnel, route) && route.prefix_len() > 0
}

/// Which of a trusted peer's advertised routes a client installs.
pub struct LearnPolicy<'a> {
    pub accept_default_route: bool,
    /// Our own tunnel networks.
    pub tunnel: &'a [IpNet],
    /// Networks directly attached to this machine's other interfaces.
    pub local: &'a [IpNet],
    /// Prefixes other peers own by configuration.
    pub taken: &'a HashSet<IpNet>,
}

impl LearnPolicy<'_> {
    /// The accepted routes, and a reason for each refused one.
    pub fn filter(&self, routes: &[IpNet]) -> (Vec<IpNet>, Vec<String>) {
        let mut accepted = Vec::new();
        let mut refused = Vec::new();
        for net in routes.iter().take(MAX_ROUTES) {
            let net = net.trunc();
            if net.prefix_len() == 0 && !self.accept_default_route {
                refused.push(format!("{net}: default routes need --accept-default-route"));
            } else if let Some(t) = self.tunnel.iter().find(|t| overlaps_tunnel(t, &net)) {
                refused.push(format!("{net}: overlaps the tunnel network {}", t.trunc()));
            } else if let Some(lan) = self.local.iter().find(|lan| lan.contains(&net)) {
                // A route inside (or equal to) a local network would take
                // that network's traffic away from the LAN.
                refused.push(format!("{net}: inside the local network {}", lan.trunc()));
            } else if self.taken.contains(&net) {
                refused.push(format!("{net}: already an allowed IP of another peer"));
            } else if !accepted.contains(&net) {
                accepted.push(net);
            }
        }
        (accepted, refused)
    }
}

/// The lowest host address of `network` that is not in `used`.
pub fn next_free_address(network: &IpNet, used: &[IpNet]) -> Option<IpNet> {
    let taken = |addr: IpAddr| used.iter().any(|u| u.contains(&addr));
    match network {
        IpNet::V4(net) => net
            .hosts()
            .take(1 << 16)
            .find(|a| !taken(IpAddr::V4(*a)))
            .and_then(|a| ipnet::Ipv4Net::new(a, 32).ok())
            .map(IpNet::V4),
        IpNet::V6(net) => net
            .hosts()
            .skip(1)
            .take(1 << 16)
            .find(|a| !taken(IpAddr::V6(*a)))
            .and_then(|a| ipnet::Ipv6Net::new(a, 128).ok())
            .map(IpNet::V6),
    }
}

/// Peer names: short, and safe in file names and shell commands.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not a valid peer name: use 1-32 letters, digits, '-', '_' or '.', \
             not starting with '.' or '-'",
            quote(name)
        ))
    }
}

/// The most upstream resolvers and split-DNS zones a node keeps.
pub const MAX_DNS_UPSTREAMS: usize = 8;
pub const MAX_DNS_ZONES: usize = 32;

/// `vpcgate set --dns-upstream`: addresses of resolvers, or `auto` (or
/// nothing) for the host's own. Our own tunnel addresses would make the
/// forwarder ask itself.
pub fn validate_dns_upstreams(items: &[String], own: &[IpAddr]) -> Result<Vec<IpAddr>, String> {
    let items = split_list(items);
    if items.iter().any(|i| i == "auto") {
        return if items.len() == 1 {
            Ok(Vec::new())
        } else {
            Err("give either `auto` (the host's own resolvers) or addresses, not both".into())
        };
    }
    if items.len() > MAX_DNS_UPSTREAMS {
        return Err(format!(
            "at most {MAX_DNS_UPSTREAMS} DNS upstreams, not {}",
            items.len()
        ));
    }
    let mut list = Vec::new();
    for text in &items {
        let ip: IpAddr = text.parse().map_err(|_| {
            format!(
                "{} is not an IP address of a resolver (for example 198.18.0.2, or `auto` for the host's own)",
                quote(text)
            )
        })?;
        if ip.is_unspecified() || ip.is_multicast() {
            return Err(format!("{ip} cannot be a resolver's address"));
        }
        if own.contains(&ip) {
            return Err(format!(
                "{ip} is this gateway's own tunnel address, where the forwarder itself answers"
            ));
        }
        if !list.contains(&ip) {
            list.push(ip);
        }
    }
    Ok(list)
}

/// `vpcgate set --dns-zones`: domain names, lowercased and without the
/// trailing dot, or `none` (or nothing) for none.
pub fn validate_dns_zones(items: &[String]) -> Result<Vec<String>, String> {
    let items = split_list(items);
    if items.iter().any(|i| i == "none") {
        return if items.len() == 1 {
            Ok(Vec::new())
        } else {
            Err("give either `none` or zones, not both".into())
        };
    }
    if items.len() > MAX_DNS_ZONES {
        return Err(format!(
            "at most {MAX_DNS_ZONES} DNS zones, not {}",
            items.len()
        ));
    }
    let mut zones = Vec::new();
    for text in &items {
        let zone = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
        let valid = !zone.is_empty()
            && zone.len() <= 253
            && zone.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid {
            return Err(format!(
                "{} is not a domain name (for example mongodb.net or privatelink.database.windows.net)",
                quote(text)
            ));
        }
        if !zones.contains(&zone) {
            zones.push(zone);
        }
    }
    Ok(zones)
}

/// Whether the route exchange can carry what `settings` advertise: the
/// ranges and the DNS forwarder's zones share one datagram that must not be
/// fragmented.
pub fn validate_advertisement(settings: &Settings) -> Result<(), String> {
    let zones: Vec<&str> = settings.dns.zones.iter().map(String::as_str).collect();
    let servers = settings.dns_addresses();
    let offer = match servers.is_empty() {
        true => None,
        false => Some(DnsOffer::new(&servers, &zones)?),
    };
    let len = routes_msg::encoded_len(&settings.advertised_routes, offer.as_ref());
    if len > routes_msg::MAX_PACKET {
        return Err(format!(
            "the advertised routes and DNS zones would take {len} bytes in the route exchange, more than the {} one unfragmented message carries; advertise fewer or wider ranges, or name fewer DNS zones",
            routes_msg::MAX_PACKET
        ));
    }
    Ok(())
}

/// HOST:PORT or [IPv6]:PORT, as a client's `Endpoint =` line takes it.
pub fn validate_endpoint(text: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{} is not HOST:PORT (for example 203.0.113.7:51820 or gw.example.com:51820)",
            quote(text)
        )
    };
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return v6
            .parse::<std::net::Ipv6Addr>()
            .map(drop)
            .map_err(|_| bad());
    }
    if host.parse::<std::net::Ipv4Addr>().is_ok() {
        return Ok(());
    }
    let hostname = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if hostname {
        Ok(())
    } else {
        Err(bad())
    }
}

pub struct ClientConfig<'a> {
    pub private_key: &'a str,
    pub addresses: &'a [IpNet],
    pub mtu: u32,
    pub gateway_public_key: &'a str,
    pub endpoint: &'a str,
    pub allowed_ips: &'a [IpNet],
    /// The gateway's forwarder, for the `DNS =` line; empty: no line.
    pub dns: &'a [IpAddr],
}

impl ClientConfig<'_> {
    /// A complete wg-quick config.
    pub fn render(&self) -> String {
        let join = |nets: &[IpNet]| {
            nets.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mtu = self.mtu.to_string();
        let dns = if self.dns.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = self.dns.iter().map(ToString::to_string).collect();
            format!("\nDNS = {}", list.join(", "))
        };
        let parts = [
            "[Interface]\nPrivateKey = ",
            self.private_key,
            "\nAddress = ",
            &join(self.addresses),
            &dns,
            "\nMTU = ",
            &mtu,
            "\n\n[Peer]\nPublicKey = ",
            self.gateway_public_key,
            "\nEndpoint = ",
            self.endpoint,
            "\nAllowedIPs = ",
            &join(self.allowed_ips),
            "\nPersistentKeepalive = 25\n",
        ];
        // Sized once: a growing string would free copies of the key.
        let mut config = String::with_capacity(parts.iter().map(|p| p.len()).sum());
        for part in parts {
            config.push_str(part);
        }
        config
    }
}

/// One warning per tunnel network that overlaps a route this host has
/// through another link (`routes`: destination and link name). Many VPCs
/// route part of 100.64.0.0/10 themselves (EKS adds 100.64.0.0/16 for
/// pods), and then either the VPC's hosts or the peers become unreachable,
/// depending on which route wins. Each warning suggests a free address.
pub fn tunnel_overlap_warnings(tunnel: &[IpNet], routes: &[(IpNet, String)]) -> Vec<String> {
    let taken: Vec<(std::net::Ipv4Addr, u8)> = routes
        .iter()
        .filter_map(|(net, _)| match net {
            IpNet::V4(v4) => Some((v4.network(), v4.prefix_len())),
            IpNet::V6(_) => None,
        })
        .chain(tunnel.iter().filter_map(|net| match net {
            IpNet::V4(v4) => Some((v4.network(), v4.prefix_len())),
            IpNet::V6(_) => None,
        }))
        .collect();
    let advice = match vpcgate_proto::free_tunnel_address(&taken) {
        Some(free) => format!("pick a free tunnel address: vpcgate set --address {free}"),
        None => {
            "pick a tunnel address no route of this host covers: vpcgate set --address ADDR/LEN"
                .into()
        }
    };
    let mut warnings = Vec::new();
    for t in tunnel {
        for (route, link) in routes {
            if t.contains(route) || route.contains(t) {
                warnings.push(format!(
                    "the tunnel network {t} overlaps this host's route {route} dev {link}, so \
                     traffic to that range may go the wrong way; {advice}"
                ));
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_vpc_route_inside_the_tunnel_network_is_named_with_a_free_address() {
        let net = |s: &str| s.parse::<IpNet>().expect("net");
        let tunnel = [net("100.64.0.0/24")];
        let routes = vec![
            (net("198.18.0.0/20"), "eth0".to_string()),
            (net("100.64.0.0/16"), "eth0".to_string()),
        ];
        let warnings = super::tunnel_overlap_warnings(&tunnel, &routes);
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("100.64.0.0/16 dev eth0"),
            "{warnings:?}"
        );
        assert!(
            warnings[0].contains("vpcgate set --address 100.65.0.1/24"),
            "{warnings:?}"
        );
        assert!(super::tunnel_overlap_warnings(&tunnel, &routes[..1]).is_empty());
    }

    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lists_split_on_commas_and_spaces() {
        let got = split_list(&strings(&[
            "198.18.64.0/20,198.19.101.0/24",
            " fd00:1::/48 ,, ",
            "198.18.0.0/24",
        ]));
        assert_eq!(
            got,
            [
                "198.18.64.0/20",
                "198.19.101.0/24",
                "fd00:1::/48",
                "198.18.0.0/24"
            ]
        );
    }

    #[test]
    fn more_routes_than_can_be_advertised_are_refused_at_once() {
        let tunnel = nets(&["100.64.0.0/24"]);
        let many: Vec<String> = (0..100_000)
            .map(|i| format!("198.{}.{}.{}/32", 18 + (i >> 16), (i >> 8) & 0xff, i & 0xff))
            .collect();
        let err = validate_advertised(&many, &tunnel, false).expect_err("too many");
        assert!(err.contains("100000 prefixes given; at most 64"), "{err}");
        // As many bad entries as fit get one line, not one each.
        let junk = vec!["x".to_string(); 100_000];
        let err = validate_advertised(&junk, &tunnel, false).expect_err("junk");
        assert_eq!(err.lines().count(), 1, "{err:.200}");
        let max: Vec<String> = many.into_iter().take(MAX_ROUTES).collect();
        assert_eq!(
            validate_advertised(&max, &tunnel, false).map(|r| r.len()),
            Ok(MAX_ROUTES)
        );
    }

    #[test]
    fn advertised_routes_are_validated_with_advice() {
        let tunnel = nets(&["100.64.0.0/24"]);
        let ok = validate_advertised(
            &strings(&["198.18.64.0/20", "198.19.101.0/24", "fd00:9::/48"]),
            &tunnel,
            false,
        );
        assert_eq!(
            ok,
            Ok(nets(&["198.18.64.0/20", "198.19.101.0/24", "fd00:9::/48"]))
        );

        let cases = [
            ("198.18.64.5/20", "did you mean 198.18.64.0/20?"),
            ("198.18.64.5", "did you mean 198.18.64.5/32?"),
            ("fd00::1", "did you mean fd00::1/128?"),
            ("banana", "is not a CIDR prefix"),
            ("0.0.0.0/0", "--exit-node"),
            ("::/0", "--exit-node"),
            ("100.64.0.0/16", "overlaps the tunnel network 100.64.0.0/24"),
            ("100.64.0.128/25", "overlaps the tunnel network"),
        ];
        for (input, expected) in cases {
            let err = validate_advertised(&strings(&[input]), &tunnel, false).expect_err(input);
            assert!(err.contains(expected), "{input}: {err}");
        }
        let err = validate_advertised(
            &strings(&["198.18.64.0/20", "198.18.64.0/20"]),
            &tunnel,
            false,
        )
        .expect_err("duplicate");
        assert!(err.contains("listed twice"), "{err}");
        let err = validate_advertised(
            &strings(&["198.18.64.0/24", "198.18.64.0/20"]),
            &tunnel,
            false,
        )
        .expect_err("contained");
        assert!(
            err.contains("198.18.64.0/24 is already covered by 198.18.64.0/20"),
            "{err}"
        );
        assert_eq!(
            validate_advertised(&strings(&["0.0.0.0/0"]), &tunnel, true),
            Ok(nets(&["0.0.0.0/0"]))
        );
        // Several problems are all reported at once.
        let err = validate_advertised(&strings(&["1.2.3.4/8", "banana"]), &tunnel, false)
            .expect_err("two");
        assert_eq!(err.lines().count(), 2, "{err}");
    }

    #[test]
    fn learned_routes_respect_default_tunnel_and_lan() {
        let tunnel = nets(&["100.64.0.0/24"]);
        let local = nets(&["198.18.1.0/24"]);
        let taken: HashSet<IpNet> = nets(&["198.18.200.0/24"]).into_iter().collect();
        let policy = LearnPolicy {
            accept_default_route: false,
            tunnel: &tunnel,
            local: &local,
            taken: &taken,
        };
        let (accepted, refused) = policy.filter(&nets(&[
            "198.18.64.0/20",
            "0.0.0.0/0",
            "100.64.0.0/16",
            "198.18.1.0/24",
            "198.18.1.128/25",
            "198.18.0.0/16",
            "198.18.200.0/24",
        ]));
        // A route that contains the LAN is fine: the LAN's own route is more
        // specific and keeps winning.
        assert_eq!(accepted, nets(&["198.18.64.0/20", "198.18.0.0/16"]));
        assert_eq!(refused.len(), 5, "{refused:?}");
        let policy = LearnPolicy {
            accept_default_route: true,
            ..policy
        };
        let (accepted, _) = policy.filter(&nets(&["0.0.0.0/0"]));
        assert_eq!(accepted, nets(&["0.0.0.0/0"]));
    }

    #[test]
    fn next_free_address_skips_used_ones() {
        let net: IpNet = "100.64.0.1/24".parse().expect("cidr");
        let used = nets(&["100.64.0.1/32", "100.64.0.2/32", "100.64.0.4/30"]);
        assert_eq!(
            next_free_address(&net.trunc(), &used),
            Some("100.64.0.3/32".parse().expect("cidr"))
        );
        let full = nets(&["100.64.0.0/30"]);
        assert_eq!(
            next_free_address(&"100.64.0.0/30".parse().expect("cidr"), &full),
            None
        );
        let v6: IpNet = "fd00:64::/64".parse().expect("cidr");
        assert_eq!(
            next_free_address(&v6, &nets(&["fd00:64::1/128"])),
            Some("fd00:64::2/128".parse().expect("cidr"))
        );
    }

    #[test]
    fn names_and_endpoints() {
        for good in ["laptop", "alice-phone", "db_01", "a.b"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "has space",
            "semi;colon",
            &"x".repeat(33),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        for good in [
            "198.18.2.10:51820",
            "[fd00::1]:51820",
            "gw.example.com:51820",
        ] {
            assert!(validate_endpoint(good).is_ok(), "{good}");
        }
        for bad in [
            "198.18.2.10",
            "198.18.2.10:0",
            "198.18.2.10:70000",
            "[fd00::1:51820",
            "bad host:1",
            ":51820",
        ] {
            assert!(validate_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn client_config_is_complete() {
        let text = ClientConfig {
            private_key: "PRIV",
            addresses: &nets(&["100.64.0.2/32"]),
            mtu: 1420,
            gateway_public_key: "PUB",
            endpoint: "198.18.2.10:51820",
            allowed_ips: &nets(&["100.64.0.0/24", "198.18.64.0/20"]),
            dns: &[],
        }
        .render();
        assert_eq!(
            text,
            "[Interface]\nPrivateKey = PRIV\nAddress = 100.64.0.2/32\nMTU = 1420\n\n[Peer]\n\
             PublicKey = PUB\nEndpoint = 198.18.2.10:51820\nAllowedIPs = 100.64.0.0/24, \
             198.18.64.0/20\nPersistentKeepalive = 25\n"
        );
        let with_dns = ClientConfig {
            private_key: "PRIV",
            addresses: &nets(&["100.64.0.2/32", "fd00:64::2/128"]),
            mtu: 1420,
            gateway_public_key: "PUB",
            endpoint: "198.18.2.10:51820",
            allowed_ips: &nets(&["100.64.0.0/24"]),
            dns: &[
                "100.64.0.1".parse().expect("ip"),
                "fd00:64::1".parse().expect("ip"),
            ],
        }
        .render();
        assert!(
            with_dns.contains("\nAddress = 100.64.0.2/32, fd00:64::2/128\nDNS = 100.64.0.1, fd00:64::1\nMTU = 1420\n"),
            "{with_dns}"
        );
    }

    #[test]
    fn dns_upstreams_and_zones_are_checked() {
        let own: Vec<IpAddr> = vec!["100.64.0.1".parse().expect("ip")];
        let list = |s: &str| vec![s.to_string()];
        assert_eq!(
            validate_dns_upstreams(&list("198.18.0.2, fd00::53,198.18.0.2"), &own),
            Ok(vec![
                "198.18.0.2".parse().expect("ip"),
                "fd00::53".parse().expect("ip")
            ])
        );
        assert_eq!(validate_dns_upstreams(&list("auto"), &own), Ok(Vec::new()));
        for bad in [
            "auto,198.18.0.2",
            "100.64.0.1",
            "0.0.0.0",
            "ns.example",
            "224.0.0.1",
        ] {
            let err = validate_dns_upstreams(&list(bad), &own).expect_err(bad);
            assert!(!err.is_empty());
        }
        let many = (1..=9)
            .map(|i| format!("198.18.0.{i}"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(validate_dns_upstreams(&list(&many), &own).is_err());
        assert_eq!(
            validate_dns_zones(&list("MongoDB.net., privatelink.database.windows.net")),
            Ok(vec![
                "mongodb.net".into(),
                "privatelink.database.windows.net".into()
            ])
        );
        assert_eq!(validate_dns_zones(&list("none")), Ok(Vec::new()));
        for bad in ["a..b", "-x.net", "none,a.net", "ex%ample", "."] {
            assert!(validate_dns_zones(&list(bad)).is_err(), "{bad}");
        }
    }
}
