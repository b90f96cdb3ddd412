//! Route advertisement between vpcgate daemons, inside the tunnel.
//!
//! A node that trusts a peer's routes (`--accept-routes`) asks for them every
//! [`POLL_INTERVAL`] with a small UDP datagram sent through the tunnel to the
//! peer's tunnel address on [`PORT`]; the peer answers with its advertised
//! set and a generation number that changes whenever the set does. Both
//! messages travel encrypted and are subject to cryptokey routing like any
//! other packet, so only the peer that owns the tunnel address can answer.
//! The receiving core intercepts them before the TUN: they never reach the
//! kernel, and stock WireGuard peers never see one.
//!
//! Wire format (UDP payload, big-endian):
//!
//! ```text
//! 0      4       5      6       7       8              16
//! "VPCG" version  type   flags   count   generation u64  entries…
//! entry: family u8 (4 | 6), prefix length u8, address (4 | 16 bytes)
//! ```
//!
//! `type` is 1 for a request (no entries) and 2 for an advertisement.
//!
//! An advertisement with flag [`FLAG_DNS`] carries the gateway's DNS
//! forwarder after its entries:
//!
//! ```text
//! servers u8, server: family u8 (4 | 6), address (4 | 16 bytes)
//! zones u8, zone: length u8, name (lower-case ASCII, no trailing dot)
//! ```
//!
//! No zones means every name. Receivers that predate the flag read the
//! entries and ignore what follows them, so the section needs no new
//! version.
//!
//! Every advertisement this version writes sets flag [`FLAG_PRIORITY`] and
//! ends with the gateway's priority, a u16 (lower is preferred; clients
//! choose among gateways that offer the same range by it). One without
//! the flag, from an older gateway, has [`DEFAULT_PRIORITY`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;

use crate::packet::IpPacket;

/// UDP port the exchange uses on tunnel addresses.
pub const PORT: u16 = 51819;
/// Each answer also tells the client its gateway is alive, so this sets
/// how soon a dead one is noticed: a client takes a gateway for dead after
/// 2.5 polls without an answer, which allows one lost reply and still moves
/// traffic within 3 s. Idle, that costs two small datagrams a second per
/// gateway.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// At most this many advertised prefixes: 64 IPv6 entries still fit one
/// datagram well under the 1280-byte IPv6 minimum MTU.
pub const MAX_ROUTES: usize = 64;

const MAGIC: &[u8; 4] = b"VPCG";
const VERSION: u8 = 1;
const TYPE_REQUEST: u8 = 1;
const TYPE_ROUTES: u8 = 2;
const HEADER: usize = 16;
const IPV4_HEADER: usize = 20;
const UDP_HEADER: usize = 8;

/// The advertisement carries a DNS section.
pub const FLAG_DNS: u8 = 1;
/// The advertisement ends with the gateway's priority.
pub const FLAG_PRIORITY: u8 = 2;
/// A gateway's priority when it sets none (`vpcgate set --priority`).
pub const DEFAULT_PRIORITY: u16 = 100;
/// At most this many DNS servers in an offer (the gateway's tunnel
/// addresses).
pub const MAX_DNS_SERVERS: usize = 4;
/// At most this many zones in an offer.
pub const MAX_DNS_ZONES: usize = 32;
/// The zones' encoding (a length byte and the name each) takes at most
/// this many bytes.
pub const MAX_ZONE_BYTES: usize = 512;

/// The largest packet `build_*` writes. With WireGuard's 32 bytes and an
/// IPv6 underlay's 48 it still fits GCP's 1460-byte VPC MTU, so it is never
/// fragmented; [`encoded_len`] says whether an advertisement fits.
pub const MAX_PACKET: usize = 1380;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSet {
    pub generation: u64,
    count: usize,
    entries: [Option<IpNet>; MAX_ROUTES],
    pub dns: Option<DnsOffer>,
    pub priority: u16,
}

impl RouteSet {
    pub fn routes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.entries[..self.count].iter().flatten().copied()
    }
}

/// A gateway's DNS forwarder: where it answers, and for which zones (none:
/// every name). Fixed-size, so that parsing one allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DnsOffer {
    servers: [Option<IpAddr>; MAX_DNS_SERVERS],
    /// The zones as they travel: a length byte and the name, each.
    zones: [u8; MAX_ZONE_BYTES],
    zones_len: usize,
}

impl std::fmt::Debug for DnsOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsOffer")
            .field("servers", &self.servers().collect::<Vec<_>>())
            .field("zones", &self.zones().collect::<Vec<_>>())
            .finish()
    }
}

impl DnsOffer {
    /// An offer of `servers` for `zones` (lower-case names without the
    /// trailing dot; none: every name). The error says which limit or name
    /// is refused.
    pub fn new(servers: &[IpAddr], zones: &[&str]) -> Result<DnsOffer, String> {
        if servers.is_empty() || servers.len() > MAX_DNS_SERVERS {
            return Err(format!(
                "a DNS offer names 1 to {MAX_DNS_SERVERS} servers, not {}",
                servers.len()
            ));
        }
        if zones.len() > MAX_DNS_ZONES {
            return Err(format!(
                "at most {MAX_DNS_ZONES} DNS zones, not {}",
                zones.len()
            ));
        }
        let mut offer = DnsOffer {
            servers: [None; MAX_DNS_SERVERS],
            zones: [0; MAX_ZONE_BYTES],
            zones_len: 0,
        };
        for (slot, server) in offer.servers.iter_mut().zip(servers) {
            *slot = Some(*server);
        }
        for zone in zones {
            if !is_zone(zone.as_bytes()) {
                return Err(format!("{zone:?} is not a DNS zone the route exchange can carry: lower-case letters, digits, '-' and '_' in dot-separated labels of at most 63, at most 253 in all"));
            }
            let end = offer.zones_len + 1 + zone.len();
            if end > MAX_ZONE_BYTES {
                return Err(format!(
                    "the DNS zones take more than the {MAX_ZONE_BYTES} bytes the route exchange carries (one more than each name's length)"
                ));
            }
            offer.zones[offer.zones_len] = zone.len() as u8;
            offer.zones[offer.zones_len + 1..end].copy_from_slice(zone.as_bytes());
            offer.zones_len = end;
        }
        Ok(offer)
    }

    pub fn servers(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.servers.iter().flatten().copied()
    }

    /// The zones, as names without the trailing dot; none means every name.
    pub fn zones(&self) -> impl Iterator<Item = &str> + '_ {
        let mut rest = &self.zones[..self.zones_len];
        std::iter::from_fn(move || {
            let (&len, tail) = rest.split_first()?;
            let (name, tail) = tail.split_at_checked(usize::from(len))?;
            rest = tail;
            // Built only from names `is_zone` accepted: ASCII.
            std::str::from_utf8(name).ok()
        })
    }

    fn encoded_len(&self) -> usize {
        let servers: usize = self
            .servers()
            .map(|s| if s.is_ipv4() { 5 } else { 17 })
            .sum();
        1 + servers + 1 + self.zones_len
    }
}

/// A zone name as the exchange carries it: lower-case LDH (and '_') labels
/// of 1 to 63 bytes, at most 253 bytes in all, no trailing dot.
fn is_zone(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(b))
        })
}

/// The length of the advertisement of `routes` and `dns`; the gateway
/// refuses a configuration whose advertisement would exceed
/// [`MAX_PACKET`].
pub fn encoded_len(routes: &[IpNet], dns: Option<&DnsOffer>) -> usize {
    let entries: usize = routes
        .iter()
        .map(|r| if r.addr().is_ipv4() { 6 } else { 18 })
        .sum();
    IPV4_HEADER + UDP_HEADER + HEADER + entries + dns.map_or(0, DnsOffer::encoded_len) + 2
}

// A message lives on the stack for the moment it is handled; boxing the
// large variant would allocate per message instead.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Request,
    Routes(RouteSet),
}

/// If `packet` is an IPv4 UDP datagram to `local:PORT` with our magic, its
/// source and message. Anything else, including malformed messages, is None
/// and handled as ordinary traffic by the caller.
pub fn intercept(packet: &[u8], local: Ipv4Addr) -> Option<(Ipv4Addr, Result<Message, ()>)> {
    intercept_view(&IpPacket::new_checked(packet)?, local)
}

/// [`intercept`] on a packet already parsed.
pub fn intercept_view<T: AsRef<[u8]>>(
    ip: &IpPacket<T>,
    local: Ipv4Addr,
) -> Option<(Ipv4Addr, Result<Message, ()>)> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (ip.source(), ip.destination()) else {
        return None;
    };
    if dst != local || ip.is_fragment() {
        return None;
    }
    let udp = ip.udp()?;
    if udp.destination_port() != PORT {
        return None;
    }
    let payload = udp.payload();
    if payload.get(..4)? != MAGIC {
        return None;
    }
    Some((src, parse(payload)))
}

fn parse(payload: &[u8]) -> Result<Message, ()> {
    let header = payload.get(..HEADER).ok_or(())?;
    if header[4] != VERSION {
        return Err(());
    }
    let count = usize::from(header[7]);
    let generation = u64::from_be_bytes(header[8..16].try_into().map_err(|_| ())?);
    match header[5] {
        TYPE_REQUEST => Ok(Message::Request),
        TYPE_ROUTES => {
            if count > MAX_ROUTES {
                return Err(());
            }
            let mut set = RouteSet {
                generation,
                count,
                entries: [None; MAX_ROUTES],
                dns: None,
                priority: DEFAULT_PRIORITY,
            };
            let mut rest = &payload[HEADER..];
            for slot in set.entries.iter_mut().take(count) {
                let (&family, tail) = rest.split_first().ok_or(())?;
                let (&len, tail) = tail.split_first().ok_or(())?;
                let (net, tail) = match family {
                    4 => {
                        let bytes: [u8; 4] = tail.get(..4).ok_or(())?.try_into().map_err(|_| ())?;
                        let net =
                            ipnet::Ipv4Net::new(Ipv4Addr::from(bytes), len).map_err(|_| ())?;
                        (IpNet::V4(net), &tail[4..])
                    }
                    6 => {
                        let bytes: [u8; 16] =
                            tail.get(..16).ok_or(())?.try_into().map_err(|_| ())?;
                        let net =
                            ipnet::Ipv6Net::new(Ipv6Addr::from(bytes), len).map_err(|_| ())?;
                        (IpNet::V6(net), &tail[16..])
                    }
                    _ => return Err(()),
                };
                // Only canonical prefixes are meaningful; reject the rest.
                if net.trunc() != net {
                    return Err(());
                }
                *slot = Some(net);
                rest = tail;
            }
            if header[6] & FLAG_DNS != 0 {
                let (dns, tail) = parse_dns(rest)?;
                set.dns = Some(dns);
                rest = tail;
            }
            if header[6] & FLAG_PRIORITY != 0 {
                let (bytes, _) = rest.split_first_chunk::<2>().ok_or(())?;
                set.priority = u16::from_be_bytes(*bytes);
            }
            Ok(Message::Routes(set))
        }
        _ => Err(()),
    }
}

/// The DNS section at the start of `section`, and what follows it.
fn parse_dns(section: &[u8]) -> Result<(DnsOffer, &[u8]), ()> {
    let (&count, mut rest) = section.split_first().ok_or(())?;
    let count = usize::from(count);
    if count == 0 || count > MAX_DNS_SERVERS {
        return Err(());
    }
    let mut offer = DnsOffer {
        servers: [None; MAX_DNS_SERVERS],
        zones: [0; MAX_ZONE_BYTES],
        zones_len: 0,
    };
    for slot in offer.servers.iter_mut().take(count) {
        let (&family, tail) = rest.split_first().ok_or(())?;
        let (addr, tail) = match family {
            4 => {
                let (bytes, tail) = tail.split_first_chunk::<4>().ok_or(())?;
                (IpAddr::from(*bytes), tail)
            }
            6 => {
                let (bytes, tail) = tail.split_first_chunk::<16>().ok_or(())?;
                (IpAddr::from(*bytes), tail)
            }
            _ => return Err(()),
        };
        *slot = Some(addr);
        rest = tail;
    }
    let (&zones, mut rest) = rest.split_first().ok_or(())?;
    if usize::from(zones) > MAX_DNS_ZONES {
        return Err(());
    }
    for _ in 0..zones {
        let (&len, tail) = rest.split_first().ok_or(())?;
        let (name, tail) = tail.split_at_checked(usize::from(len)).ok_or(())?;
        let end = offer.zones_len + 1 + name.len();
        if !is_zone(name) || end > MAX_ZONE_BYTES {
            return Err(());
        }
        offer.zones[offer.zones_len] = len;
        offer.zones[offer.zones_len + 1..end].copy_from_slice(name);
        offer.zones_len = end;
        rest = tail;
    }
    Ok((offer, rest))
}

/// Writes a request from `src` to `dst` into `out`; returns its length.
pub fn build_request(src: Ipv4Addr, dst: Ipv4Addr, out: &mut [u8]) -> Option<usize> {
    build(src, dst, None, out)
}

/// Writes an advertisement of `routes` (at most [`MAX_ROUTES`]) and `dns`
/// into `out`. `None` when it does not fit `out` or [`MAX_PACKET`].
pub fn build_routes(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    generation: u64,
    routes: &[IpNet],
    dns: Option<&DnsOffer>,
    priority: u16,
    out: &mut [u8],
) -> Option<usize> {
    let advertisement = Advertisement {
        generation,
        routes,
        dns,
        priority,
    };
    build(src, dst, Some(&advertisement), out)
}

/// What an advertisement says, for [`build`].
struct Advertisement<'a> {
    generation: u64,
    routes: &'a [IpNet],
    dns: Option<&'a DnsOffer>,
    priority: u16,
}

/// A request with `None`, else an advertisement.
fn build(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    advertisement: Option<&Advertisement>,
    out: &mut [u8],
) -> Option<usize> {
    let (kind, generation, routes, dns) = match advertisement {
        Some(a) => (TYPE_ROUTES, a.generation, a.routes, a.dns),
        None => (TYPE_REQUEST, 0, &[][..], None),
    };
    let total = match advertisement {
        Some(_) => encoded_len(routes, dns),
        None => IPV4_HEADER + UDP_HEADER + HEADER,
    };
    if routes.len() > MAX_ROUTES || total > MAX_PACKET {
        return None;
    }
    let payload_len = total - IPV4_HEADER - UDP_HEADER;
    let out = out.get_mut(..total)?;
    out.fill(0);
    out[0] = 0x45;
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[6] = 0x40; // don't fragment
    out[8] = 64;
    out[9] = 17;
    out[12..16].copy_from_slice(&src.octets());
    out[16..20].copy_from_slice(&dst.octets());
    let checksum = ipv4_checksum(&out[..IPV4_HEADER]);
    out[10..12].copy_from_slice(&checksum.to_be_bytes());
    let udp = &mut out[IPV4_HEADER..];
    udp[0..2].copy_from_slice(&PORT.to_be_bytes());
    udp[2..4].copy_from_slice(&PORT.to_be_bytes());
    udp[4..6].copy_from_slice(&((UDP_HEADER + payload_len) as u16).to_be_bytes());
    // A zero UDP checksum means "none" over IPv4; the tunnel authenticates.
    let payload = &mut udp[UDP_HEADER..];
    payload[..4].copy_from_slice(MAGIC);
    payload[4] = VERSION;
    payload[5] = kind;
    payload[6] = match (advertisement, dns) {
        (None, _) => 0,
        (Some(_), Some(_)) => FLAG_DNS | FLAG_PRIORITY,
        (Some(_), None) => FLAG_PRIORITY,
    };
    payload[7] = routes.len() as u8;
    payload[8..16].copy_from_slice(&generation.to_be_bytes());
    let mut at = HEADER;
    for route in routes {
        payload[at + 1] = route.prefix_len();
        match route.addr() {
            IpAddr::V4(a) => {
                payload[at] = 4;
                payload[at + 2..at + 6].copy_from_slice(&a.octets());
                at += 6;
            }
            IpAddr::V6(a) => {
                payload[at] = 6;
                payload[at + 2..at + 18].copy_from_slice(&a.octets());
                at += 18;
            }
        }
    }
    if let Some(dns) = dns {
        let servers = dns.servers().count();
        payload[at] = servers as u8;
        at += 1;
        for server in dns.servers() {
            match server {
                IpAddr::V4(a) => {
                    payload[at] = 4;
                    payload[at + 1..at + 5].copy_from_slice(&a.octets());
                    at += 5;
                }
                IpAddr::V6(a) => {
                    payload[at] = 6;
                    payload[at + 1..at + 17].copy_from_slice(&a.octets());
                    at += 17;
                }
            }
        }
        payload[at] = dns.zones().count() as u8;
        at += 1;
        payload[at..at + dns.zones_len].copy_from_slice(&dns.zones[..dns.zones_len]);
        at += dns.zones_len;
    }
    if let Some(a) = advertisement {
        payload[at..at + 2].copy_from_slice(&a.priority.to_be_bytes());
    }
    Some(total)
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 1);
    const LAPTOP: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    #[test]
    fn request_round_trip_and_checksum() {
        let mut buf = [0u8; MAX_PACKET];
        let n = build_request(LAPTOP, GW, &mut buf).expect("fits");
        assert_eq!(ipv4_checksum(&buf[..20]), 0, "header checksum verifies");
        assert_eq!(
            intercept(&buf[..n], GW),
            Some((LAPTOP, Ok(Message::Request)))
        );
        assert_eq!(intercept(&buf[..n], LAPTOP), None, "only for the addressee");
    }

    #[test]
    fn routes_round_trip_v4_and_v6() {
        let routes = nets(&[
            "198.18.64.0/20",
            "198.19.101.0/24",
            "fd00:64:1::/48",
            "0.0.0.0/0",
        ]);
        let mut buf = [0u8; MAX_PACKET];
        let n = build_routes(GW, LAPTOP, 42, &routes, None, 100, &mut buf).expect("fits");
        let Some((src, Ok(Message::Routes(set)))) = intercept(&buf[..n], LAPTOP) else {
            panic!("not intercepted");
        };
        assert_eq!(src, GW);
        assert_eq!(set.generation, 42);
        assert_eq!(set.routes().collect::<Vec<_>>(), routes);
        assert_eq!(set.dns, None);
    }

    #[test]
    fn the_priority_follows_the_entries_and_the_dns_section() {
        let routes = nets(&["198.18.64.0/20"]);
        let offer = DnsOffer::new(&[GW.into()], &["mongodb.net"]).expect("valid");
        for dns in [None, Some(&offer)] {
            let mut buf = [0u8; MAX_PACKET];
            let n = build_routes(GW, LAPTOP, 3, &routes, dns, 50, &mut buf).expect("fits");
            assert_eq!(n, encoded_len(&routes, dns));
            let Some((_, Ok(Message::Routes(set)))) = intercept(&buf[..n], LAPTOP) else {
                panic!("not intercepted");
            };
            assert_eq!((set.priority, set.dns.is_some()), (50, dns.is_some()));
            // From a gateway before priorities: the default.
            let mut old = buf;
            old[28 + 6] &= !FLAG_PRIORITY;
            let Some((_, Ok(Message::Routes(set)))) = intercept(&old[..n], LAPTOP) else {
                panic!("not intercepted");
            };
            assert_eq!(set.priority, DEFAULT_PRIORITY);
            // One byte short, with the IP and UDP lengths to match: the
            // flag promises a priority that is not there, so it is refused.
            let mut short = buf;
            short[2..4].copy_from_slice(&((n - 1) as u16).to_be_bytes());
            short[24..26].copy_from_slice(&((n - 21) as u16).to_be_bytes());
            assert_eq!(
                intercept(&short[..n - 1], LAPTOP).map(|(_, m)| m.is_ok()),
                Some(false)
            );
        }
    }

    #[test]
    fn dns_offer_round_trip() {
        let routes = nets(&["198.18.64.0/20", "fd00:64:1::/48"]);
        let servers: Vec<IpAddr> = vec![GW.into(), "fd00:64::1".parse().expect("ip")];
        for zones in [
            &[][..],
            &["mongodb.net", "internal.example", "_x.y-z.example"][..],
        ] {
            let offer = DnsOffer::new(&servers, zones).expect("valid");
            let mut buf = [0u8; MAX_PACKET];
            let n =
                build_routes(GW, LAPTOP, 7, &routes, Some(&offer), 100, &mut buf).expect("fits");
            assert_eq!(n, encoded_len(&routes, Some(&offer)));
            let Some((_, Ok(Message::Routes(set)))) = intercept(&buf[..n], LAPTOP) else {
                panic!("not intercepted");
            };
            assert_eq!(set.routes().collect::<Vec<_>>(), routes);
            let got = set.dns.expect("a DNS section");
            assert_eq!(got.servers().collect::<Vec<_>>(), servers);
            assert_eq!(got.zones().collect::<Vec<_>>(), zones);

            // A receiver from before the DNS section reads the same routes:
            // it parses the entries and stops there, as this one does when
            // the flag is clear.
            let mut old = buf;
            old[28 + 6] = 0;
            let Some((_, Ok(Message::Routes(set)))) = intercept(&old[..n], LAPTOP) else {
                panic!("not intercepted without the flag");
            };
            assert_eq!(set.routes().collect::<Vec<_>>(), routes);
            assert_eq!(set.dns, None);

            // Every truncation of the section is refused, never misread.
            for cut in (n - offer.encoded_len())..n {
                let mut short = buf;
                let total = cut as u16;
                short[2..4].copy_from_slice(&total.to_be_bytes());
                short[10..12].fill(0);
                let checksum = ipv4_checksum(&short[..20]);
                short[10..12].copy_from_slice(&checksum.to_be_bytes());
                let udp = (cut - 20) as u16;
                short[24..26].copy_from_slice(&udp.to_be_bytes());
                assert!(
                    matches!(intercept(&short[..cut], LAPTOP), Some((_, Err(())))),
                    "cut at {cut} of {n}"
                );
            }
        }
    }

    #[test]
    fn dns_offers_are_validated() {
        let gw: IpAddr = GW.into();
        assert!(DnsOffer::new(&[], &[]).is_err(), "no server");
        assert!(DnsOffer::new(&[gw; 5], &[]).is_err(), "too many servers");
        for bad in [
            "",
            "Upper.example",
            "a..b",
            "trailing.",
            ".lead",
            "sp ace",
            &"a".repeat(64),
        ] {
            assert!(DnsOffer::new(&[gw], &[bad]).is_err(), "{bad:?}");
        }
        let zones: Vec<String> = (0..33).map(|i| format!("z{i}.example")).collect();
        let refs: Vec<&str> = zones.iter().map(String::as_str).collect();
        assert!(DnsOffer::new(&[gw], &refs).is_err(), "33 zones");
        assert!(DnsOffer::new(&[gw], &refs[..32]).is_ok(), "32 zones");
        let long: Vec<String> = (0..3).map(|i| format!("{i}{}", ".a".repeat(100))).collect();
        let refs: Vec<&str> = long.iter().map(String::as_str).collect();
        assert!(DnsOffer::new(&[gw], &refs).is_err(), "more than 512 bytes");

        // 64 IPv6 routes and the largest offer do not fit one packet:
        // building refuses rather than writing a fragment.
        let routes: Vec<IpNet> = (0..MAX_ROUTES)
            .map(|i| format!("fd00:{i:x}::/32").parse().expect("net"))
            .collect();
        let zones: Vec<String> = (0..20).map(|i| format!("zone{i:02}.example.com")).collect();
        let refs: Vec<&str> = zones.iter().map(String::as_str).collect();
        let offer = DnsOffer::new(&[gw], &refs).expect("valid");
        assert!(encoded_len(&routes, Some(&offer)) > MAX_PACKET);
        let mut buf = [0u8; 2048];
        assert!(build_routes(GW, LAPTOP, 1, &routes, Some(&offer), 100, &mut buf).is_none());
        assert!(build_routes(GW, LAPTOP, 1, &routes, None, 100, &mut buf).is_some());
    }

    #[test]
    fn limits_and_malformed_messages() {
        let mut buf = [0u8; MAX_PACKET];
        let too_many: Vec<IpNet> = (0..=MAX_ROUTES)
            .map(|i| {
                IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::new(198, 18, i as u8, 0), 24).expect("net"))
            })
            .collect();
        assert!(build_routes(GW, LAPTOP, 1, &too_many, None, 100, &mut buf).is_none());
        assert!(
            build_routes(GW, LAPTOP, 1, &too_many[..MAX_ROUTES], None, 100, &mut buf).is_some()
        );

        let n = build_routes(
            GW,
            LAPTOP,
            1,
            &nets(&["198.18.64.0/20"]),
            None,
            100,
            &mut buf,
        )
        .expect("fits");
        let payload = 28;
        for (offset, value) in [
            (payload + 4, 9u8), // version
            (payload + 5, 7),   // type
            (payload + 7, 2),   // count beyond the data
            (payload + 7, 200), // count beyond the limit
            (payload + 16, 5),  // family
            (payload + 17, 40), // prefix too long
            (payload + 21, 1),  // host bits set
        ] {
            let mut bad = buf;
            bad[offset] = value;
            let got = intercept(&bad[..n], LAPTOP);
            assert!(
                matches!(got, Some((_, Err(())))),
                "offset {offset} value {value}: {got:?}"
            );
        }
        let mut other_port = buf;
        other_port[23] = 53;
        assert_eq!(
            intercept(&other_port[..n], LAPTOP),
            None,
            "ordinary UDP passes through"
        );
        assert_eq!(
            intercept(&buf[..n - 3], LAPTOP),
            None,
            "truncated: total length exceeds data"
        );
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut bytes = bytes;
            if bytes.len() > 40 {
                // Steer a share of inputs past the IP/UDP checks.
                bytes[0] = 0x45;
                let total = bytes.len() as u16;
                bytes[2..4].copy_from_slice(&total.to_be_bytes());
                bytes[6] = 0;
                bytes[7] = 0;
                bytes[9] = 17;
                bytes[16..20].copy_from_slice(&GW.octets());
                bytes[22..24].copy_from_slice(&PORT.to_be_bytes());
                bytes[28..32].copy_from_slice(MAGIC);
            }
            let _ = intercept(&bytes, GW);
        }
    }
}
