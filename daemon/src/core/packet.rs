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
