//! Checked views over IP packets read from the TUN or decrypted from a peer.
//!
//! A view is built once with `new_checked`, which validates every length the
//! accessors rely on; after that the accessors cannot panic. Nothing here
//! allocates: views borrow the caller's buffer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;

/// An IPv4 or IPv6 packet whose fixed header is known to be present.
#[derive(Debug, Clone, Copy)]
pub enum IpPacket<'a> {
    V4(&'a [u8]),
    V6(&'a [u8]),
}

impl<'a> IpPacket<'a> {
    /// Validates the version nibble and that the fixed header fits.
    pub fn new_checked(buf: &'a [u8]) -> Option<Self> {
        match buf.first()? >> 4 {
            4 if buf.len() >= IPV4_MIN_HEADER => Some(IpPacket::V4(buf)),
            6 if buf.len() >= IPV6_HEADER => Some(IpPacket::V6(buf)),
            _ => None,
        }
    }

    pub fn source(&self) -> IpAddr {
        match *self {
            IpPacket::V4(b) => IpAddr::V4(v4_at(b, 12)),
            IpPacket::V6(b) => IpAddr::V6(v6_at(b, 8)),
        }
    }

    pub fn destination(&self) -> IpAddr {
        match *self {
            IpPacket::V4(b) => IpAddr::V4(v4_at(b, 16)),
            IpPacket::V6(b) => IpAddr::V6(v6_at(b, 24)),
        }
    }

    /// The destination port of a UDP packet (of an IPv4 packet's first
    /// fragment; of an IPv6 packet with no extension headers).
    pub fn udp_destination_port(&self) -> Option<u16> {
        let (b, udp) = match *self {
            IpPacket::V4(b) => {
                let fragment_offset = u16::from_be_bytes([b[6], b[7]]) & 0x1fff;
                if b[9] != 17 || fragment_offset != 0 {
                    return None;
                }
                (b, usize::from(b[0] & 0x0f) * 4)
            }
            IpPacket::V6(b) if b[6] == 17 => (b, IPV6_HEADER),
            IpPacket::V6(_) => return None,
        };
        let port = b.get(udp + 2..udp + 4)?;
        Some(u16::from_be_bytes([port[0], port[1]]))
    }
}

// Callers guarantee the range through `new_checked`; the fallback keeps the
// accessors total anyway.
fn v4_at(b: &[u8], off: usize) -> Ipv4Addr {
    b.get(off..off + 4)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map_or(Ipv4Addr::UNSPECIFIED, Ipv4Addr::from)
}

fn v6_at(b: &[u8], off: usize) -> Ipv6Addr {
    b.get(off..off + 16)
        .and_then(|s| <[u8; 16]>::try_from(s).ok())
        .map_or(Ipv6Addr::UNSPECIFIED, Ipv6Addr::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_destination_port_of_v4_and_v6() {
        let mut v4 = [0u8; 28];
        v4[0] = 0x45;
        v4[9] = 17;
        v4[22..24].copy_from_slice(&51820u16.to_be_bytes());
        let view = IpPacket::new_checked(&v4).expect("IPv4");
        assert_eq!(view.udp_destination_port(), Some(51820));
        // A later fragment has no UDP header; TCP has no UDP port.
        v4[7] = 1;
        let view = IpPacket::new_checked(&v4).expect("IPv4");
        assert_eq!(view.udp_destination_port(), None);
        v4[7] = 0;
        v4[9] = 6;
        let view = IpPacket::new_checked(&v4).expect("IPv4");
        assert_eq!(view.udp_destination_port(), None);
        // A header that claims options past the end: no port, no panic.
        v4[9] = 17;
        v4[0] = 0x4f;
        let view = IpPacket::new_checked(&v4).expect("IPv4");
        assert_eq!(view.udp_destination_port(), None);

        let mut v6 = [0u8; 48];
        v6[0] = 0x60;
        v6[6] = 17;
        v6[42..44].copy_from_slice(&443u16.to_be_bytes());
        let view = IpPacket::new_checked(&v6).expect("IPv6");
        assert_eq!(view.udp_destination_port(), Some(443));
        let view = IpPacket::new_checked(&v6[..41]).expect("IPv6");
        assert_eq!(view.udp_destination_port(), None);
    }

    fn v4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p
    }

    #[test]
    fn v4_addresses() {
        let p = v4([100, 64, 0, 2], [198, 18, 0, 9]);
        let view = IpPacket::new_checked(&p).expect("valid header");
        assert_eq!(view.source(), "100.64.0.2".parse::<IpAddr>().expect("ip"));
        assert_eq!(
            view.destination(),
            "198.18.0.9".parse::<IpAddr>().expect("ip")
        );
    }

    #[test]
    fn v6_addresses() {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[8..24].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().expect("ip").octets());
        p[24..40].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().expect("ip").octets());
        let view = IpPacket::new_checked(&p).expect("valid header");
        assert_eq!(view.source(), "fd00::2".parse::<IpAddr>().expect("ip"));
        assert_eq!(view.destination(), "fd00::1".parse::<IpAddr>().expect("ip"));
    }

    #[test]
    fn rejects_short_and_unknown_versions() {
        assert!(IpPacket::new_checked(&[]).is_none());
        assert!(IpPacket::new_checked(&[0x45; 19]).is_none());
        assert!(IpPacket::new_checked(&[0x60; 39]).is_none());
        assert!(IpPacket::new_checked(&[0x50; 60]).is_none());
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..80)) {
            if let Some(v) = IpPacket::new_checked(&bytes) {
                let _ = (v.source(), v.destination());
            }
        }
    }
}
