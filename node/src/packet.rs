//! Checked views over IP packets read from the TUN or decrypted from a peer.
//!
//! One family of views, in the manner of smoltcp's `wire` module. A packet
//! is parsed once, by [`IpPacket::new_checked`], which validates every
//! length the accessors rely on: for IPv4, 20 ≤ header length ≤ total
//! length ≤ buffer; for IPv6, 40 + payload length ≤ buffer. After that the
//! accessors cannot panic, and everything that looks inside the packet
//! (the routing-loop check, the forwarding scope, route messages, MSS
//! clamping) works on that one view. A view is generic over its buffer, so
//! the same checked packet can be read through `&[u8]` and rewritten in
//! place through `&mut [u8]`. Nothing here allocates: views borrow the
//! caller's buffer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const UDP_HEADER: usize = 8;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV4_FRAGMENT_OFFSET: u16 = 0x1fff;

/// An IPv4 or IPv6 packet whose lengths have been checked.
#[derive(Debug, Clone, Copy)]
pub struct IpPacket<T> {
    buf: T,
    v6: bool,
    header_len: usize,
    total_len: usize,
}

impl<T: AsRef<[u8]>> IpPacket<T> {
    /// Checks the version and the lengths; `None` for anything that is not
    /// a whole IPv4 or IPv6 packet. Bytes past the total length (padding)
    /// are allowed and ignored.
    pub fn new_checked(buf: T) -> Option<Self> {
        let b = buf.as_ref();
        let (v6, header_len, total_len) = match b.first()? >> 4 {
            4 => {
                let header_len = usize::from(b.first()? & 0x0f) * 4;
                let total_len = usize::from(be16(b, 2)?);
                if header_len < IPV4_MIN_HEADER || header_len > total_len || total_len > b.len() {
                    return None;
                }
                (false, header_len, total_len)
            }
            6 => {
                let total_len = IPV6_HEADER + usize::from(be16(b, 4)?);
                if total_len > b.len() {
                    return None;
                }
                (true, IPV6_HEADER, total_len)
            }
            _ => return None,
        };
        Some(IpPacket {
            buf,
            v6,
            header_len,
            total_len,
        })
    }

    fn bytes(&self) -> &[u8] {
        self.buf.as_ref()
    }

    pub fn is_v4(&self) -> bool {
        !self.v6
    }

    /// The IP header's length; for IPv6 the fixed header (extension headers
    /// are not walked).
    pub fn header_len(&self) -> usize {
        self.header_len
    }

    /// The length the IP header gives the packet, at most the buffer's.
    pub fn total_len(&self) -> usize {
        self.total_len
    }

    pub fn source(&self) -> IpAddr {
        let b = self.bytes();
        match self.v6 {
            false => IpAddr::V4(v4_at(b, 12)),
            true => IpAddr::V6(v6_at(b, 8)),
        }
    }

    pub fn destination(&self) -> IpAddr {
        let b = self.bytes();
        match self.v6 {
            false => IpAddr::V4(v4_at(b, 16)),
            true => IpAddr::V6(v6_at(b, 24)),
        }
    }

    /// IPv4's protocol, or IPv6's next header.
    pub fn protocol(&self) -> u8 {
        let at = if self.v6 { 6 } else { 9 };
        self.bytes().get(at).copied().unwrap_or(0)
    }

    /// Whether this is an IPv4 fragment (first or later). IPv6 fragments
    /// live in an extension header, which shows as the protocol.
    pub fn is_fragment(&self) -> bool {
        !self.v6
            && be16(self.bytes(), 6)
                .is_some_and(|f| f & (IPV4_MORE_FRAGMENTS | IPV4_FRAGMENT_OFFSET) != 0)
    }

    /// Whether this is an IPv4 fragment other than the first, which holds
    /// no transport header, only a slice of payload that could look like
    /// one.
    pub fn is_later_fragment(&self) -> bool {
        !self.v6 && be16(self.bytes(), 6).is_some_and(|f| f & IPV4_FRAGMENT_OFFSET != 0)
    }

    /// The transport header and payload, bounded by the total length; `None`
    /// for a later fragment.
    pub fn transport(&self) -> Option<&[u8]> {
        if self.is_later_fragment() {
            return None;
        }
        self.bytes().get(self.header_len..self.total_len)
    }

    /// The UDP datagram this packet carries, if it carries one whose header
    /// is whole.
    pub fn udp(&self) -> Option<UdpPacket<'_>> {
        if self.protocol() != PROTO_UDP {
            return None;
        }
        UdpPacket::new_checked(self.transport()?)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IpPacket<T> {
    /// [`IpPacket::transport`], to rewrite in place.
    pub fn transport_mut(&mut self) -> Option<&mut [u8]> {
        if self.is_later_fragment() {
            return None;
        }
        let (start, end) = (self.header_len, self.total_len);
        self.buf.as_mut().get_mut(start..end)
    }
}

/// A UDP header and the payload its length field covers.
#[derive(Debug, Clone, Copy)]
pub struct UdpPacket<'a> {
    bytes: &'a [u8],
}

impl<'a> UdpPacket<'a> {
    /// Checks that the header is whole. The length field is honoured when
    /// it fits (8 ≤ length ≤ what the IP packet carries); otherwise the
    /// payload is what the IP packet carries, as the routing-loop check
    /// needs only the ports.
    pub fn new_checked(transport: &'a [u8]) -> Option<Self> {
        if transport.len() < UDP_HEADER {
            return None;
        }
        Some(UdpPacket { bytes: transport })
    }

    pub fn source_port(&self) -> u16 {
        be16(self.bytes, 0).unwrap_or(0)
    }

    pub fn destination_port(&self) -> u16 {
        be16(self.bytes, 2).unwrap_or(0)
    }

    /// Whether the length field agrees with the packet around it.
    pub fn length_ok(&self) -> bool {
        let len = usize::from(be16(self.bytes, 4).unwrap_or(0));
        (UDP_HEADER..=self.bytes.len()).contains(&len)
    }

    /// The payload, as far as the length field says when it agrees with the
    /// packet, else to the end of the packet.
    pub fn payload(&self) -> &'a [u8] {
        let end = if self.length_ok() {
            usize::from(be16(self.bytes, 4).unwrap_or(0))
        } else {
            self.bytes.len()
        };
        self.bytes.get(UDP_HEADER..end).unwrap_or_default()
    }
}

pub(crate) fn be16(b: &[u8], at: usize) -> Option<u16> {
    let bytes = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]))
}

// `new_checked` guarantees the range; the fallback keeps the accessors
// total anyway.
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

    /// An IPv4 packet with a correct total length.
    fn v4(src: [u8; 4], dst: [u8; 4], protocol: u8, transport: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + transport.len()) as u16).to_be_bytes());
        p[9] = protocol;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p.extend_from_slice(transport);
        p
    }

    fn v6(next_header: u8, transport: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(transport.len() as u16).to_be_bytes());
        p[6] = next_header;
        p[8..24].copy_from_slice(&"fd00::2".parse::<Ipv6Addr>().expect("ip").octets());
        p[24..40].copy_from_slice(&"fd00::1".parse::<Ipv6Addr>().expect("ip").octets());
        p.extend_from_slice(transport);
        p
    }

    fn udp(dst_port: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&40000u16.to_be_bytes());
        u[2..4].copy_from_slice(&dst_port.to_be_bytes());
        u[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(payload);
        u
    }

    #[test]
    fn addresses_and_lengths() {
        let p = v4([100, 64, 0, 2], [198, 18, 0, 9], 1, &[0; 8]);
        let view = IpPacket::new_checked(&p[..]).expect("valid");
        assert!(view.is_v4());
        assert_eq!(view.source(), "100.64.0.2".parse::<IpAddr>().expect("ip"));
        assert_eq!(
            view.destination(),
            "198.18.0.9".parse::<IpAddr>().expect("ip")
        );
        assert_eq!((view.header_len(), view.total_len()), (20, 28));
        assert_eq!(view.protocol(), 1);

        let p = v6(59, &[]);
        let view = IpPacket::new_checked(&p[..]).expect("valid");
        assert!(!view.is_v4());
        assert_eq!(view.source(), "fd00::2".parse::<IpAddr>().expect("ip"));
        assert_eq!(view.destination(), "fd00::1".parse::<IpAddr>().expect("ip"));
        assert_eq!((view.header_len(), view.total_len()), (40, 40));
    }

    #[test]
    fn header_length_within_total_length_within_buffer() {
        let good = v4([1; 4], [2; 4], 17, &udp(9, b"x"));
        assert!(IpPacket::new_checked(&good[..]).is_some());
        // Padding after the packet is allowed, and not part of it.
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 7]);
        let view = IpPacket::new_checked(&padded[..]).expect("padded");
        assert_eq!(view.total_len(), good.len());
        assert_eq!(view.transport().map(<[u8]>::len), Some(9));
        // A total length past the buffer.
        assert!(IpPacket::new_checked(&good[..good.len() - 1]).is_none());
        // A header length under 20, or past the total length.
        for ihl in [0u8, 1, 4] {
            let mut bad = good.clone();
            bad[0] = 0x40 | ihl;
            assert!(IpPacket::new_checked(&bad[..]).is_none(), "IHL {ihl}");
        }
        let mut bad = good.clone();
        bad[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert!(IpPacket::new_checked(&bad[..]).is_none());
        let mut options = good.clone();
        options[0] = 0x4f; // 60 bytes of header in a 29-byte packet
        assert!(IpPacket::new_checked(&options[..]).is_none());
        // IPv6: the payload length must fit the buffer.
        let six = v6(17, &udp(9, b"xy"));
        assert!(IpPacket::new_checked(&six[..]).is_some());
        assert!(IpPacket::new_checked(&six[..six.len() - 1]).is_none());
        // Short buffers and other versions.
        for bytes in [&[][..], &[0x45; 19], &[0x60; 39], &[0x50; 60]] {
            assert!(IpPacket::new_checked(bytes).is_none(), "{bytes:?}");
        }
    }

    #[test]
    fn udp_ports_and_payload() {
        let p = v4([1; 4], [2; 4], PROTO_UDP, &udp(51820, b"hello"));
        let view = IpPacket::new_checked(&p[..]).expect("valid");
        let u = view.udp().expect("udp");
        assert_eq!((u.source_port(), u.destination_port()), (40000, 51820));
        assert_eq!(u.payload(), b"hello");
        // TCP has no UDP view; neither has a header cut short.
        let tcp = v4([1; 4], [2; 4], PROTO_TCP, &udp(51820, b""));
        assert!(IpPacket::new_checked(&tcp[..])
            .expect("valid")
            .udp()
            .is_none());
        let short = v4([1; 4], [2; 4], PROTO_UDP, &[0; 7]);
        assert!(IpPacket::new_checked(&short[..])
            .expect("valid")
            .udp()
            .is_none());
        // A UDP length past the packet: the payload stops at the packet.
        let mut long = p.clone();
        long[24..26].copy_from_slice(&500u16.to_be_bytes());
        let view = IpPacket::new_checked(&long[..]).expect("valid");
        assert!(!view.udp().expect("udp").length_ok());
        assert_eq!(view.udp().expect("udp").payload(), b"hello");

        let six = v6(PROTO_UDP, &udp(443, b"q"));
        let view = IpPacket::new_checked(&six[..]).expect("valid");
        assert_eq!(view.udp().map(|u| u.destination_port()), Some(443));
    }

    #[test]
    fn fragments() {
        let mut p = v4([1; 4], [2; 4], PROTO_UDP, &udp(53, b"abc"));
        let at = |p: &Vec<u8>| {
            let view = IpPacket::new_checked(&p[..]).expect("valid");
            (
                view.is_fragment(),
                view.is_later_fragment(),
                view.udp().is_some(),
            )
        };
        assert_eq!(at(&p), (false, false, true));
        p[6] = 0x20; // more fragments: the first holds the UDP header
        assert_eq!(at(&p), (true, false, true));
        p[6] = 0;
        p[7] = 1; // offset 8: no transport header
        assert_eq!(at(&p), (true, true, false));
    }

    #[test]
    fn transport_is_rewritten_in_place() {
        let mut p = v4([1; 4], [2; 4], PROTO_UDP, &udp(53, b"abc"));
        let mut view = IpPacket::new_checked(&mut p[..]).expect("valid");
        view.transport_mut().expect("transport")[8] = b'x';
        assert_eq!(&p[28..], b"xbc");
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120)) {
            let mut bytes = bytes;
            if let Some(v) = IpPacket::new_checked(&bytes[..]) {
                proptest::prop_assert!(v.header_len() <= v.total_len());
                proptest::prop_assert!(v.total_len() <= bytes.len());
                let _ = (v.source(), v.destination(), v.protocol(), v.is_fragment());
                if let Some(t) = v.transport() {
                    proptest::prop_assert!(t.len() == v.total_len() - v.header_len());
                }
                if let Some(u) = v.udp() {
                    let _ = (u.source_port(), u.destination_port(), u.payload());
                }
            }
            if let Some(mut v) = IpPacket::new_checked(&mut bytes[..]) {
                if let Some(t) = v.transport_mut() {
                    t.fill(0);
                }
            }
        }
    }
}
