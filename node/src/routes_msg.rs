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

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;

use crate::packet::IpPacket;

/// UDP port the exchange uses on tunnel addresses.
pub const PORT: u16 = 51819;
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
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

/// The largest packet `build_*` writes.
pub const MAX_PACKET: usize = IPV4_HEADER + UDP_HEADER + HEADER + MAX_ROUTES * 18;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSet {
    pub generation: u64,
    count: usize,
    entries: [Option<IpNet>; MAX_ROUTES],
}

impl RouteSet {
    pub fn routes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.entries[..self.count].iter().flatten().copied()
    }
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
            Ok(Message::Routes(set))
        }
        _ => Err(()),
    }
}

/// Writes a request from `src` to `dst` into `out`; returns its length.
pub fn build_request(src: Ipv4Addr, dst: Ipv4Addr, out: &mut [u8]) -> Option<usize> {
    build(src, dst, TYPE_REQUEST, 0, &[], out)
}

/// Writes an advertisement of `routes` (at most [`MAX_ROUTES`]) into `out`.
pub fn build_routes(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    generation: u64,
    routes: &[IpNet],
    out: &mut [u8],
) -> Option<usize> {
    build(src, dst, TYPE_ROUTES, generation, routes, out)
}

fn build(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    kind: u8,
    generation: u64,
    routes: &[IpNet],
    out: &mut [u8],
) -> Option<usize> {
    if routes.len() > MAX_ROUTES {
        return None;
    }
    let entries: usize = routes
        .iter()
        .map(|r| if r.addr().is_ipv4() { 6 } else { 18 })
        .sum();
    let payload_len = HEADER + entries;
    let total = IPV4_HEADER + UDP_HEADER + payload_len;
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
        let n = build_routes(GW, LAPTOP, 42, &routes, &mut buf).expect("fits");
        let Some((src, Ok(Message::Routes(set)))) = intercept(&buf[..n], LAPTOP) else {
            panic!("not intercepted");
        };
        assert_eq!(src, GW);
        assert_eq!(set.generation, 42);
        assert_eq!(set.routes().collect::<Vec<_>>(), routes);
    }

    #[test]
    fn limits_and_malformed_messages() {
        let mut buf = [0u8; MAX_PACKET];
        let too_many: Vec<IpNet> = (0..=MAX_ROUTES)
            .map(|i| {
                IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::new(198, 18, i as u8, 0), 24).expect("net"))
            })
            .collect();
        assert!(build_routes(GW, LAPTOP, 1, &too_many, &mut buf).is_none());
        assert!(build_routes(GW, LAPTOP, 1, &too_many[..MAX_ROUTES], &mut buf).is_some());

        let n = build_routes(GW, LAPTOP, 1, &nets(&["198.18.64.0/20"]), &mut buf).expect("fits");
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
