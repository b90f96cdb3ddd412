//! TCP MSS clamping for SYNs crossing the tunnel.
//!
//! Hosts behind the router advertise an MSS that fits their own link, not the
//! smaller MTU of the WireGuard tunnel, and path-MTU discovery often fails
//! because ICMP is filtered somewhere. Lowering the MSS option in each SYN and
//! SYN-ACK keeps both ends' segments small enough to cross the tunnel whole.
//!
//! [`clamp`] rewrites a packet in place, through the checked view of
//! [`crate::packet`], and patches the TCP checksum incrementally, so it
//! never needs the pseudo-header. The view has checked the IP lengths; the
//! TCP header's own are validated here before the first write; anything it does not understand is
//! left exactly as it was. Nothing here allocates or panics.

use crate::packet::{be16, IpPacket, PROTO_TCP};

const IPV4_MIN_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const TCP_MIN_HEADER: usize = 20;

const TCP_CHECKSUM_AT: usize = 16;
const TCP_FLAG_SYN: u8 = 0x02;

const OPT_EOL: u8 = 0;
const OPT_NOP: u8 = 1;
const OPT_MSS: u8 = 2;
const OPT_MSS_LEN: usize = 4;

/// Lowers the MSS option of a TCP SYN or SYN-ACK carried in `packet` (a whole
/// IPv4 or IPv6 packet as read from a TUN) to at most `max_mss_v4` or
/// `max_mss_v6`, whichever matches the packet's family, updating the TCP
/// checksum incrementally (RFC 1624). Returns true if the packet was changed.
///
/// A maximum of 0 disables clamping for that family. An MSS already at or
/// below the maximum is left alone. Non-first IPv4 fragments, IPv6 packets
/// with extension headers, truncated packets and malformed TCP options are
/// left untouched. Never panics and never allocates, whatever the bytes.
///
/// The TUN must deliver packets with complete checksums (no checksum offload
/// or virtio-net header): the update patches whatever checksum is present.
pub fn clamp_mss(packet: &mut [u8], max_mss_v4: u16, max_mss_v6: u16) -> bool {
    match IpPacket::new_checked(packet) {
        Some(mut ip) => clamp(&mut ip, max_mss_v4, max_mss_v6),
        None => false,
    }
}

/// [`clamp_mss`] on a packet already parsed: the data path parses each
/// packet once and hands the same view to every check.
pub fn clamp<T: AsRef<[u8]> + AsMut<[u8]>>(
    ip: &mut IpPacket<T>,
    max_mss_v4: u16,
    max_mss_v6: u16,
) -> bool {
    if ip.protocol() != PROTO_TCP {
        return false;
    }
    let max = if ip.is_v4() { max_mss_v4 } else { max_mss_v6 };
    if max == 0 {
        return false;
    }
    // A later fragment has no TCP header, only a slice of payload that
    // could look like one; IPv6 extension headers would have to be walked
    // to find TCP, and SYNs carrying them are rare enough to pass
    // unclamped (the next header is then not TCP).
    match ip.transport_mut() {
        Some(segment) => clamp_segment(segment, max),
        None => false,
    }
}

/// The MSS that fits a tunnel MTU: `mtu - 40` for IPv4 and `mtu - 60` for
/// IPv6 (the fixed IP header plus a TCP header without options). An MTU too
/// small to carry any payload yields 0, which [`clamp_mss`] reads as "do not
/// clamp".
pub fn mss_for_mtu(mtu: u16) -> (u16, u16) {
    const V4_OVERHEAD: u16 = (IPV4_MIN_HEADER + TCP_MIN_HEADER) as u16;
    const V6_OVERHEAD: u16 = (IPV6_HEADER + TCP_MIN_HEADER) as u16;
    (
        mtu.saturating_sub(V4_OVERHEAD),
        mtu.saturating_sub(V6_OVERHEAD),
    )
}

/// Clamps every MSS option in a TCP segment that starts at `segment[0]`.
fn clamp_segment(segment: &mut [u8], max: u16) -> bool {
    let Some(header_len) = tcp_syn_header_len(segment) else {
        return false;
    };
    let Some(header) = segment.get_mut(..header_len) else {
        return false;
    };
    if !options_well_formed(header) {
        return false;
    }
    // Receivers act on the last MSS option they see, so a second one must
    // not slip past the clamp.
    let mut changed = false;
    let mut cursor = OptionCursor::new();
    while let Some(Ok(option)) = cursor.next_option(header) {
        if option.kind == OPT_MSS {
            changed |= clamp_option(header, option.value_at, max);
        }
    }
    changed
}

/// The TCP header length of a SYN whose header fits in `segment`.
fn tcp_syn_header_len(segment: &[u8]) -> Option<usize> {
    let header_len = usize::from(segment.get(12)? >> 4) * 4;
    let flags = *segment.get(13)?;
    if header_len < TCP_MIN_HEADER || header_len > segment.len() || flags & TCP_FLAG_SYN == 0 {
        return None;
    }
    Some(header_len)
}

fn options_well_formed(header: &[u8]) -> bool {
    let mut cursor = OptionCursor::new();
    while let Some(option) = cursor.next_option(header) {
        match option {
            Ok(o) if o.kind == OPT_MSS && o.len != OPT_MSS_LEN => return false,
            Ok(_) => {}
            Err(Malformed) => return false,
        }
    }
    true
}

/// Lowers the MSS value at `value_at` (relative to the TCP header) and
/// patches the checksum. The caller has checked both fields lie in `header`.
fn clamp_option(header: &mut [u8], value_at: usize, max: u16) -> bool {
    let (Some(old), Some(checksum)) = (be16(header, value_at), be16(header, TCP_CHECKSUM_AT))
    else {
        return false;
    };
    if old <= max {
        return false;
    }
    let checksum = update_checksum(checksum, value_at, old, max);
    put_be16(header, value_at, max) && put_be16(header, TCP_CHECKSUM_AT, checksum)
}

/// RFC 1624 eqn. 3, `HC' = ~(~HC + ~m + m')`, for a 16-bit field at byte
/// offset `at` from the start of the checksummed data.
///
/// The ones' complement sum runs over 16-bit words aligned to the TCP header
/// start (the pseudo-header is 12 or 40 bytes, so it does not shift that
/// alignment). A field at an odd offset straddles two words: its high byte
/// is the low byte of one word and its low byte the high byte of the next,
/// so it adds `(lo << 8) | hi` to the sum, which is the field byte-swapped.
/// Byte-swapping commutes with ones' complement addition (RFC 1071 §2(B)),
/// so swapping `m` and `m'` gives the exact update.
///
/// Eqn. 3 rather than eqn. 2 because it never yields 0xFFFF where a full
/// recomputation gives 0x0000: the inner sum is folded with end-around carry,
/// which is zero only if every term is zero, and `m'` is never zero here
/// (a maximum of 0 means "do not clamp"). So the result always equals what
/// recomputing the checksum from scratch would give.
fn update_checksum(checksum: u16, at: usize, old: u16, new: u16) -> u16 {
    let (m, m_new) = if at % 2 == 1 {
        (old.swap_bytes(), new.swap_bytes())
    } else {
        (old, new)
    };
    let sum = u32::from(!checksum) + u32::from(!m) + u32::from(m_new);
    // Three 16-bit terms add up to at most 0x2FFFD, so one end-around fold
    // leaves at most 0xFFFD + 2 = 0xFFFF and the cast is exact.
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Malformed;

/// One TCP option other than EOL, located relative to the TCP header start.
#[derive(Debug, Clone, Copy)]
struct TcpOption {
    kind: u8,
    /// The whole option's length, kind and length bytes included.
    len: usize,
    /// Where the option's body starts.
    value_at: usize,
}

/// Walks the options of a TCP header. It holds no borrow, so the caller may
/// write into the header between steps as long as it changes no kind or
/// length byte.
struct OptionCursor {
    at: usize,
}

impl OptionCursor {
    fn new() -> Self {
        OptionCursor { at: TCP_MIN_HEADER }
    }

    /// The next option, `None` at EOL or the end of the option area, or
    /// `Err` once for a length that is too small or runs past the area.
    fn next_option(&mut self, header: &[u8]) -> Option<Result<TcpOption, Malformed>> {
        let start = self.at;
        let kind = *header.get(start)?;
        let len = match kind {
            OPT_EOL => {
                self.at = header.len();
                return None;
            }
            OPT_NOP => 1,
            _ => match header.get(start + 1).map(|&l| usize::from(l)) {
                Some(len) if len >= 2 && start + len <= header.len() => len,
                _ => {
                    self.at = header.len();
                    return Some(Err(Malformed));
                }
            },
        };
        self.at = start + len;
        Some(Ok(TcpOption {
            kind,
            len,
            value_at: start + 2,
        }))
    }
}

fn put_be16(buf: &mut [u8], at: usize, value: u16) -> bool {
    match at.checked_add(2).and_then(|end| buf.get_mut(at..end)) {
        Some(dst) => {
            dst.copy_from_slice(&value.to_be_bytes());
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SYN: u8 = 0x02;
    const SYN_ACK: u8 = 0x12;
    const ACK: u8 = 0x10;

    const NOP: [u8; 1] = [1];
    const WSCALE: [u8; 3] = [3, 3, 7];
    const SACK_PERM: [u8; 2] = [4, 2];
    const TIMESTAMPS: [u8; 10] = [8, 10, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0];

    fn mss(value: u16) -> [u8; 4] {
        let [hi, lo] = value.to_be_bytes();
        [2, 4, hi, lo]
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    fn ip_header_len(v6: bool) -> usize {
        if v6 {
            IPV6_HEADER
        } else {
            IPV4_MIN_HEADER
        }
    }

    /// A TCP segment with `options` padded with EOL to a multiple of four.
    fn tcp_segment(flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut opts = options.to_vec();
        while !opts.len().is_multiple_of(4) {
            opts.push(OPT_EOL);
        }
        assert!(opts.len() <= 40, "options too long for a TCP header");
        let mut seg = vec![0u8; TCP_MIN_HEADER];
        seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
        seg[2..4].copy_from_slice(&443u16.to_be_bytes());
        seg[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
        if flags & ACK != 0 {
            seg[8..12].copy_from_slice(&0x0a0b_0c0du32.to_be_bytes());
        }
        seg[12] = (((TCP_MIN_HEADER + opts.len()) / 4) as u8) << 4;
        seg[13] = flags;
        seg[14..16].copy_from_slice(&64240u16.to_be_bytes());
        seg.extend_from_slice(&opts);
        seg.extend_from_slice(payload);
        seg
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, segment: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; IPV4_MIN_HEADER];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((IPV4_MIN_HEADER + segment.len()) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
        p[8] = 64;
        p[9] = protocol;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let header_checksum = !fold(sum_words(&p));
        p[10..12].copy_from_slice(&header_checksum.to_be_bytes());
        p.extend_from_slice(segment);
        p
    }

    fn ipv6(src: [u8; 16], dst: [u8; 16], next_header: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; IPV6_HEADER];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        p[6] = next_header;
        p[7] = 64;
        p[8..24].copy_from_slice(&src);
        p[24..40].copy_from_slice(&dst);
        p.extend_from_slice(payload);
        p
    }

    const V4_SRC: [u8; 4] = [100, 64, 0, 2];
    const V4_DST: [u8; 4] = [10, 0, 0, 5];
    const V6_SRC: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
    const V6_DST: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

    /// A SYN (or whatever `flags` say) with a correct TCP checksum.
    fn syn(v6: bool, flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
        let seg = tcp_segment(flags, options, payload);
        let mut p = if v6 {
            ipv6(V6_SRC, V6_DST, PROTO_TCP, &seg)
        } else {
            ipv4(V4_SRC, V4_DST, PROTO_TCP, &seg)
        };
        set_tcp_checksum(&mut p);
        p
    }

    fn sum_words(data: &[u8]) -> u32 {
        data.chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
            .sum()
    }

    fn fold(mut sum: u32) -> u16 {
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    /// The TCP segment's range, read from the packet the way a test trusts.
    fn segment_range(p: &[u8]) -> std::ops::Range<usize> {
        if p[0] >> 4 == 4 {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            ihl..usize::from(u16::from_be_bytes([p[2], p[3]]))
        } else {
            IPV6_HEADER..IPV6_HEADER + usize::from(u16::from_be_bytes([p[4], p[5]]))
        }
    }

    /// The TCP checksum computed from scratch, pseudo-header included,
    /// ignoring whatever the checksum field holds.
    fn tcp_checksum_from_scratch(p: &[u8]) -> u16 {
        let range = segment_range(p);
        let len = range.len() as u32;
        let pseudo = if p[0] >> 4 == 4 {
            sum_words(&p[12..20]) + u32::from(PROTO_TCP) + len
        } else {
            sum_words(&p[8..40]) + (len >> 16) + (len & 0xffff) + u32::from(PROTO_TCP)
        };
        let mut seg = p[range].to_vec();
        seg[16] = 0;
        seg[17] = 0;
        !fold(pseudo + sum_words(&seg))
    }

    fn set_tcp_checksum(p: &mut [u8]) {
        let c = tcp_checksum_from_scratch(p);
        let at = segment_range(p).start + TCP_CHECKSUM_AT;
        p[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }

    fn stored_tcp_checksum(p: &[u8]) -> u16 {
        let at = segment_range(p).start + TCP_CHECKSUM_AT;
        u16::from_be_bytes([p[at], p[at + 1]])
    }

    /// Absolute offset of the MSS value for an MSS option whose kind byte is
    /// at `option_at` within the option list.
    fn mss_value_at(v6: bool, option_at: usize) -> usize {
        ip_header_len(v6) + TCP_MIN_HEADER + option_at + 2
    }

    /// Asserts `after` is `before` with the MSS at each of `mss_at` set to
    /// `expected`, a checksum equal to a from-scratch one, and nothing else
    /// changed.
    fn assert_clamped(before: &[u8], after: &[u8], mss_at: &[usize], expected: u16) {
        assert_eq!(before.len(), after.len());
        for &at in mss_at {
            assert_eq!(
                u16::from_be_bytes([after[at], after[at + 1]]),
                expected,
                "MSS at {at}"
            );
        }
        assert_eq!(
            stored_tcp_checksum(after),
            tcp_checksum_from_scratch(after),
            "incremental checksum differs from a full recomputation"
        );
        let checksum_at = segment_range(after).start + TCP_CHECKSUM_AT;
        for (i, (b, a)) in before.iter().zip(after).enumerate() {
            let in_mss = mss_at.iter().any(|&at| i == at || i == at + 1);
            let in_checksum = i == checksum_at || i == checksum_at + 1;
            if !in_mss && !in_checksum {
                assert_eq!(b, a, "byte {i} changed");
            }
        }
    }

    /// Builds a SYN with `options` (holding an MSS of 1460 whose kind byte
    /// is at `option_at`), clamps it and checks the MSS went to `max`.
    fn clamp_and_check(v6: bool, flags: u8, options: &[u8], option_at: usize, max: u16) {
        let before = syn(v6, flags, options, b"");
        let at = mss_value_at(v6, option_at);
        assert_eq!(u16::from_be_bytes([before[at], before[at + 1]]), 1460);
        let mut after = before.clone();
        let (v4_max, v6_max) = if v6 { (9, max) } else { (max, 9) };
        assert!(clamp_mss(&mut after, v4_max, v6_max), "not clamped");
        assert_clamped(&before, &after, &[at], max);
    }

    fn layouts() -> Vec<(&'static str, Vec<u8>, usize)> {
        vec![
            ("first", cat(&[&mss(1460), &SACK_PERM]), 0),
            ("after one NOP (odd)", cat(&[&NOP, &mss(1460)]), 1),
            ("after two NOPs", cat(&[&NOP, &NOP, &mss(1460)]), 2),
            (
                "after three NOPs (odd)",
                cat(&[&NOP, &NOP, &NOP, &mss(1460)]),
                3,
            ),
            ("after window scale (odd)", cat(&[&WSCALE, &mss(1460)]), 3),
            ("after SACK-permitted", cat(&[&SACK_PERM, &mss(1460)]), 2),
            (
                "after timestamps",
                cat(&[&NOP, &NOP, &TIMESTAMPS, &mss(1460)]),
                12,
            ),
            (
                "last of a Linux-like SYN (odd)",
                cat(&[&TIMESTAMPS, &SACK_PERM, &WSCALE, &mss(1460)]),
                15,
            ),
            (
                "Linux order",
                cat(&[&mss(1460), &SACK_PERM, &TIMESTAMPS, &NOP, &WSCALE]),
                0,
            ),
            (
                "after an unknown option (odd)",
                cat(&[&[253, 5, 0xaa, 0xbb, 0xcc], &mss(1460)]),
                5,
            ),
        ]
    }

    #[test]
    fn clamps_v4_syn_at_every_position() {
        for (name, options, at) in layouts() {
            for max in [1360, 1220, 1, 1459, 0x0100, 0x00ff] {
                println!("{name}, max {max}");
                clamp_and_check(false, SYN, &options, at, max);
            }
        }
    }

    #[test]
    fn clamps_v6_syn_at_every_position() {
        for (name, options, at) in layouts() {
            for max in [1340, 1220, 1, 1459, 0x0100, 0x00ff] {
                println!("{name}, max {max}");
                clamp_and_check(true, SYN, &options, at, max);
            }
        }
    }

    #[test]
    fn clamps_syn_ack() {
        for v6 in [false, true] {
            clamp_and_check(v6, SYN_ACK, &cat(&[&NOP, &mss(1460)]), 1, 1300);
            clamp_and_check(v6, SYN_ACK, &mss(1460), 0, 1300);
        }
    }

    #[test]
    fn odd_offset_really_needs_the_byte_swap() {
        // 1460 = 0x05B4 -> 0x0501 changes only the low byte, so an update
        // that ignored alignment would put the delta in the wrong half.
        let before = syn(false, SYN, &cat(&[&NOP, &mss(0x05b4)]), b"");
        let mut after = before.clone();
        assert!(clamp_mss(&mut after, 0x0501, 0));
        assert_clamped(&before, &after, &[mss_value_at(false, 1)], 0x0501);
        let unswapped = update_checksum(stored_tcp_checksum(&before), 0, 0x05b4, 0x0501);
        assert_ne!(unswapped, stored_tcp_checksum(&after));
    }

    #[test]
    fn ignores_bytes_past_the_ip_length() {
        for v6 in [false, true] {
            let mut before = syn(v6, SYN, &mss(1460), b"xy");
            before.extend_from_slice(&[0x02, 0x04, 0xff, 0xff, 0x55]);
            let mut after = before.clone();
            assert!(clamp_mss(&mut after, 1200, 1200));
            assert_clamped(&before, &after, &[mss_value_at(v6, 0)], 1200);
        }
    }

    #[test]
    fn clamps_with_payload_of_odd_length() {
        for v6 in [false, true] {
            let before = syn(v6, SYN, &cat(&[&WSCALE, &mss(1460)]), b"odd");
            let mut after = before.clone();
            assert!(clamp_mss(&mut after, 1000, 1000));
            assert_clamped(&before, &after, &[mss_value_at(v6, 3)], 1000);
        }
    }

    #[test]
    fn clamps_every_mss_option() {
        let options = cat(&[&mss(1460), &NOP, &mss(9000)]);
        for v6 in [false, true] {
            let before = syn(v6, SYN, &options, b"");
            let mut after = before.clone();
            assert!(clamp_mss(&mut after, 1300, 1300));
            let at = [mss_value_at(v6, 0), mss_value_at(v6, 5)];
            assert_clamped(&before, &after, &at, 1300);
        }
    }

    #[test]
    fn first_v4_fragment_is_clamped() {
        let mut before = syn(false, SYN, &mss(1460), b"");
        before[6..8].copy_from_slice(&0x2000u16.to_be_bytes()); // MF, offset 0
        let mut after = before.clone();
        assert!(clamp_mss(&mut after, 1400, 0));
        assert_clamped(&before, &after, &[mss_value_at(false, 0)], 1400);
    }

    /// A two-byte payload chosen so the clamped packet's checksum is 0x0000,
    /// the value eqn. 2 of RFC 1624 would get wrong as 0xFFFF.
    fn packet_whose_clamp_yields_zero_checksum(v6: bool, max: u16) -> Vec<u8> {
        let mut probe = syn(v6, SYN, &cat(&[&NOP, &mss(1460)]), &[0, 0]);
        assert!(clamp_mss(&mut probe, max, max));
        // With payload word W the sum grows by W; the checksum is 0 when the
        // folded sum is 0xFFFF, i.e. W is the checksum computed with W = 0.
        let w = tcp_checksum_from_scratch(&probe);
        syn(v6, SYN, &cat(&[&NOP, &mss(1460)]), &w.to_be_bytes())
    }

    #[test]
    fn checksum_that_becomes_zero() {
        for v6 in [false, true] {
            let before = packet_whose_clamp_yields_zero_checksum(v6, 1300);
            let mut after = before.clone();
            assert!(clamp_mss(&mut after, 1300, 1300));
            assert_eq!(stored_tcp_checksum(&after), 0x0000);
            assert_clamped(&before, &after, &[mss_value_at(v6, 1)], 1300);
        }
    }

    #[test]
    fn checksum_that_starts_zero_or_as_negative_zero() {
        for v6 in [false, true] {
            // Find a payload word making the original checksum 0x0000.
            let probe = syn(v6, SYN, &mss(1460), &[0, 0]);
            let w = tcp_checksum_from_scratch(&probe);
            let zero = syn(v6, SYN, &mss(1460), &w.to_be_bytes());
            assert_eq!(stored_tcp_checksum(&zero), 0x0000);
            let mut after = zero.clone();
            assert!(clamp_mss(&mut after, 1300, 1300));
            assert_clamped(&zero, &after, &[mss_value_at(v6, 0)], 1300);

            // 0xFFFF is the same ones' complement value; a sender may use it.
            let mut negative = zero.clone();
            let at = segment_range(&negative).start + TCP_CHECKSUM_AT;
            negative[at..at + 2].copy_from_slice(&[0xff, 0xff]);
            let mut after = negative.clone();
            assert!(clamp_mss(&mut after, 1300, 1300));
            assert_clamped(&negative, &after, &[mss_value_at(v6, 0)], 1300);
        }
    }

    fn assert_untouched(packet: &[u8], max_v4: u16, max_v6: u16) {
        let mut copy = packet.to_vec();
        assert!(!clamp_mss(&mut copy, max_v4, max_v6), "reported a change");
        assert_eq!(copy, packet, "bytes changed");
    }

    #[test]
    fn leaves_small_mss_alone() {
        for v6 in [false, true] {
            assert_untouched(&syn(v6, SYN, &mss(1200), b""), 1200, 1200);
            assert_untouched(&syn(v6, SYN, &mss(536), b""), 1200, 1200);
            assert_untouched(&syn(v6, SYN, &cat(&[&NOP, &mss(1)]), b""), 1200, 1200);
        }
    }

    #[test]
    fn max_zero_disables_only_that_family() {
        let v4 = syn(false, SYN, &mss(1460), b"");
        let v6 = syn(true, SYN, &mss(1460), b"");
        assert_untouched(&v4, 0, 1200);
        assert_untouched(&v6, 1200, 0);
        assert!(clamp_mss(&mut v4.clone(), 1200, 0));
        assert!(clamp_mss(&mut v6.clone(), 0, 1200));
    }

    #[test]
    fn uses_the_max_of_the_packets_family() {
        let mut v4 = syn(false, SYN, &mss(1460), b"");
        let mut v6 = syn(true, SYN, &mss(1460), b"");
        assert!(clamp_mss(&mut v4, 1300, 1200));
        assert!(clamp_mss(&mut v6, 1300, 1200));
        assert_eq!(be16(&v4, mss_value_at(false, 0)), Some(1300));
        assert_eq!(be16(&v6, mss_value_at(true, 0)), Some(1200));
    }

    #[test]
    fn leaves_non_syn_alone() {
        for v6 in [false, true] {
            for flags in [ACK, 0x18, 0x11, 0x04, 0x00, 0xfd] {
                assert_untouched(&syn(v6, flags, &mss(1460), b""), 1200, 1200);
            }
        }
    }

    #[test]
    fn leaves_other_protocols_alone() {
        let seg = tcp_segment(SYN, &mss(1460), b"");
        assert_untouched(&ipv4(V4_SRC, V4_DST, 17, &seg), 1200, 1200);
        assert_untouched(&ipv6(V6_SRC, V6_DST, 17, &seg), 1200, 1200);
        assert_untouched(&ipv6(V6_SRC, V6_DST, 58, &seg), 1200, 1200);
    }

    #[test]
    fn leaves_non_first_fragments_alone() {
        for frag in [0x0001u16, 0x2001, 0x00b9, 0x1fff, 0x4001] {
            let mut p = syn(false, SYN, &mss(1460), b"");
            p[6..8].copy_from_slice(&frag.to_be_bytes());
            assert_untouched(&p, 1200, 1200);
        }
    }

    #[test]
    fn leaves_ipv6_extension_headers_alone() {
        // A hop-by-hop header (8 bytes, next header TCP) before the SYN.
        let seg = tcp_segment(SYN, &mss(1460), b"");
        let mut payload = vec![PROTO_TCP, 0, 1, 4, 0, 0, 0, 0];
        payload.extend_from_slice(&seg);
        for nh in [0u8, 43, 44, 60] {
            assert_untouched(&ipv6(V6_SRC, V6_DST, nh, &payload), 1200, 1200);
        }
    }

    #[test]
    fn leaves_truncated_packets_alone() {
        for v6 in [false, true] {
            let p = syn(v6, SYN, &cat(&[&NOP, &mss(1460)]), b"data");
            for cut in 0..p.len() {
                assert_untouched(&p[..cut], 1200, 1200);
            }
        }
    }

    #[test]
    fn leaves_ip_lengths_that_do_not_cover_the_tcp_header_alone() {
        let full = syn(false, SYN, &cat(&[&NOP, &mss(1460)]), b"");
        for total in [0u16, 19, 20, 39, 40, 43, 44] {
            let mut p = full.clone();
            p[2..4].copy_from_slice(&total.to_be_bytes());
            assert_untouched(&p, 1200, 1200);
        }
        let full = syn(true, SYN, &cat(&[&NOP, &mss(1460)]), b"");
        for payload_len in [0u16, 19, 20, 23, 24] {
            let mut p = full.clone();
            p[4..6].copy_from_slice(&payload_len.to_be_bytes());
            assert_untouched(&p, 1200, 1200);
        }
    }

    #[test]
    fn leaves_bad_ip_headers_alone() {
        let full = syn(false, SYN, &mss(1460), b"");
        for first in [0x40u8, 0x44, 0x4f, 0x55, 0x35, 0x05, 0xf5] {
            let mut p = full.clone();
            p[0] = first;
            assert_untouched(&p, 1200, 1200);
        }
        let full = syn(true, SYN, &mss(1460), b"");
        for first in [0x40u8, 0x70, 0x00] {
            let mut p = full.clone();
            p[0] = first;
            assert_untouched(&p, 1200, 1200);
        }
        assert_untouched(&[], 1200, 1200);
    }

    #[test]
    fn leaves_bad_data_offset_alone() {
        for v6 in [false, true] {
            let full = syn(v6, SYN, &mss(1460), b"");
            let off = ip_header_len(v6) + 12;
            for data_offset in [0u8, 1, 4, 7, 15] {
                let mut p = full.clone();
                p[off] = data_offset << 4;
                assert_untouched(&p, 1200, 1200);
            }
        }
    }

    #[test]
    fn leaves_malformed_options_alone() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("len 0 before", cat(&[&[3, 0, 7], &mss(1460)])),
            ("len 1 before", cat(&[&[3, 1, 7], &mss(1460)])),
            ("len 0 after", cat(&[&mss(1460), &[8, 0]])),
            ("len 1 after", cat(&[&mss(1460), &[8, 1]])),
            ("overrunning", cat(&[&mss(1460), &[8, 10, 1, 2]])),
            (
                "overrunning into padding",
                cat(&[&mss(1460), &NOP, &[5, 4, 0]]),
            ),
            ("MSS len 3", vec![2, 3, 5, 0xb4]),
            ("MSS len 5", vec![2, 5, 5, 0xb4, 0]),
            ("MSS len 2", cat(&[&[2, 2], &mss(1460)])),
            (
                "lone kind byte at the end",
                cat(&[&mss(1460), &NOP, &NOP, &NOP, &[9]]),
            ),
        ];
        for (name, options) in cases {
            println!("{name}");
            for v6 in [false, true] {
                assert_untouched(&syn(v6, SYN, &options, b""), 1200, 1200);
            }
        }
    }

    #[test]
    fn options_running_past_the_data_offset_are_malformed() {
        // A timestamps-sized option that would end inside the payload: the
        // data offset says six words, so only four option bytes belong to
        // the header and the MSS behind it is payload.
        for v6 in [false, true] {
            let mut seg = tcp_segment(SYN, &cat(&[&[8, 12, 0, 0], &mss(1460)]), b"");
            seg[12] = 6 << 4;
            let mut p = if v6 {
                ipv6(V6_SRC, V6_DST, PROTO_TCP, &seg)
            } else {
                ipv4(V4_SRC, V4_DST, PROTO_TCP, &seg)
            };
            set_tcp_checksum(&mut p);
            assert_untouched(&p, 1200, 1200);
        }
    }

    #[test]
    fn leaves_syn_without_mss_alone() {
        for v6 in [false, true] {
            assert_untouched(&syn(v6, SYN, b"", b""), 1200, 1200);
            let opts = cat(&[&NOP, &NOP, &TIMESTAMPS, &SACK_PERM, &WSCALE]);
            assert_untouched(&syn(v6, SYN, &opts, b""), 1200, 1200);
            // An MSS in the payload is not an option.
            assert_untouched(&syn(v6, SYN, b"", &mss(1460)), 1200, 1200);
        }
    }

    #[test]
    fn stops_at_end_of_option_list() {
        for v6 in [false, true] {
            let opts = cat(&[&NOP, &[OPT_EOL], &mss(1460)]);
            assert_untouched(&syn(v6, SYN, &opts, b""), 1200, 1200);
            // Garbage after EOL is padding and does not make the list
            // malformed: an MSS before it is still clamped.
            let opts = cat(&[&mss(1460), &[OPT_EOL, 8, 0, 0]]);
            let before = syn(v6, SYN, &opts, b"");
            let mut after = before.clone();
            assert!(clamp_mss(&mut after, 1200, 1200));
            assert_clamped(&before, &after, &[mss_value_at(v6, 0)], 1200);
        }
    }

    #[test]
    fn mss_for_common_mtus() {
        assert_eq!(mss_for_mtu(1420), (1380, 1360));
        assert_eq!(mss_for_mtu(1280), (1240, 1220));
        assert_eq!(mss_for_mtu(1500), (1460, 1440));
        assert_eq!(mss_for_mtu(u16::MAX), (65495, 65475));
        assert_eq!(mss_for_mtu(60), (20, 0));
        assert_eq!(mss_for_mtu(0), (0, 0));
    }

    #[test]
    fn update_checksum_matches_recomputation_on_words() {
        // A direct check of eqn. 3 against summing a small buffer, for both
        // alignments and values that exercise end-around carry.
        for (old, new) in [
            (0xffffu16, 1u16),
            (0x05b4, 0x0550),
            (0x8000, 0x7fff),
            (2, 1),
        ] {
            for at in [0usize, 1, 2, 3] {
                let mut buf = [0x9au8, 0xbc, 0xde, 0xf0, 0x12, 0x34];
                buf[at..at + 2].copy_from_slice(&old.to_be_bytes());
                let before = !fold(sum_words(&buf));
                buf[at..at + 2].copy_from_slice(&new.to_be_bytes());
                let after = !fold(sum_words(&buf));
                assert_eq!(update_checksum(before, at, old, new), after, "at {at}");
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Opt {
        Nop,
        WindowScale(u8),
        SackPermitted,
        Timestamps(u32, u32),
        Other(u8, Vec<u8>),
    }

    impl Opt {
        fn bytes(&self) -> Vec<u8> {
            match self {
                Opt::Nop => vec![1],
                Opt::WindowScale(s) => vec![3, 3, *s],
                Opt::SackPermitted => vec![4, 2],
                Opt::Timestamps(a, b) => cat(&[&[8, 10], &a.to_be_bytes(), &b.to_be_bytes()]),
                Opt::Other(kind, body) => cat(&[&[*kind, body.len() as u8 + 2], body]),
            }
        }
    }

    fn opt_strategy() -> impl Strategy<Value = Opt> {
        prop_oneof![
            Just(Opt::Nop),
            any::<u8>().prop_map(Opt::WindowScale),
            Just(Opt::SackPermitted),
            (any::<u32>(), any::<u32>()).prop_map(|(a, b)| Opt::Timestamps(a, b)),
            (3u8..=255, proptest::collection::vec(any::<u8>(), 0..8))
                .prop_map(|(k, body)| Opt::Other(k, body)),
        ]
    }

    /// Options with one MSS placed among them; the MSS kind's offset.
    fn options_with_mss(opts: &[Opt], index: usize, value: u16) -> Option<(Vec<u8>, usize)> {
        let index = index % (opts.len() + 1);
        let mut bytes: Vec<u8> = opts[..index].iter().flat_map(Opt::bytes).collect();
        let mss_at = bytes.len();
        bytes.extend_from_slice(&mss(value));
        bytes.extend(opts[index..].iter().flat_map(Opt::bytes));
        (bytes.len() <= 40).then_some((bytes, mss_at))
    }

    /// Pieces of an option area, well-formed or not, so random headers
    /// often get past the option walk instead of failing at the first byte.
    fn option_piece() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            3 => Just(vec![OPT_NOP]),
            1 => Just(vec![OPT_EOL]),
            3 => any::<u16>().prop_map(|v| mss(v).to_vec()),
            2 => (3u8..=255, proptest::collection::vec(any::<u8>(), 0..6))
                .prop_map(|(kind, body)| cat(&[&[kind, body.len() as u8 + 2], &body])),
            1 => proptest::collection::vec(any::<u8>(), 1..4),
        ]
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..128),
            max_v4 in any::<u16>(),
            max_v6 in any::<u16>(),
        ) {
            let mut copy = bytes.clone();
            if !clamp_mss(&mut copy, max_v4, max_v6) {
                prop_assert_eq!(copy, bytes);
            }
        }

        /// Random bytes behind a plausible IP header, so the TCP and option
        /// parsing sees most of the input. A change must keep a correct
        /// checksum correct and touch only MSS values and the checksum.
        #[test]
        fn random_tcp_headers_stay_consistent(
            v6 in any::<bool>(),
            fixed in proptest::collection::vec(any::<u8>(), 20),
            pieces in proptest::collection::vec(option_piece(), 0..10),
            payload in proptest::collection::vec(any::<u8>(), 0..8),
            data_offset in prop_oneof![1 => 0u8..16, 4 => Just(0u8)],
            syn_flag in any::<bool>(),
            max in any::<u16>(),
        ) {
            let area: Vec<u8> = pieces.concat();
            if area.len() > 40 {
                return Ok(());
            }
            let mut seg = cat(&[&fixed, &area, &payload]);
            // 0 stands for "the header ends where the generated options do".
            let data_offset = match data_offset {
                0 => (5 + area.len().div_ceil(4)) as u8,
                d => d,
            };
            while seg.len() < usize::from(data_offset) * 4 {
                seg.push(OPT_EOL);
            }
            seg[12] = (data_offset << 4) | (seg[12] & 0x0f);
            if syn_flag {
                seg[13] |= TCP_FLAG_SYN;
            }
            let mut before = if v6 {
                ipv6(V6_SRC, V6_DST, PROTO_TCP, &seg)
            } else {
                ipv4(V4_SRC, V4_DST, PROTO_TCP, &seg)
            };
            set_tcp_checksum(&mut before);
            let mut after = before.clone();
            let changed = clamp_mss(&mut after, max, max);
            if !changed {
                prop_assert_eq!(&after, &before);
                return Ok(());
            }
            let start = ip_header_len(v6);
            prop_assert!(before[start + 13] & TCP_FLAG_SYN != 0);
            prop_assert_eq!(stored_tcp_checksum(&after), tcp_checksum_from_scratch(&after));
            let header_end = start + usize::from(data_offset) * 4;
            for i in start + TCP_MIN_HEADER..header_end {
                if before[i] == after[i] {
                    continue;
                }
                // Byte i must belong to an MSS value lowered to `max`.
                let in_lowered_mss = [i, i - 1].into_iter().any(|j| {
                    j >= start + TCP_MIN_HEADER + 2
                        && j + 2 <= header_end
                        && after[j - 2..j] == [OPT_MSS, 4]
                        && be16(&after, j) == Some(max)
                        && be16(&before, j).is_some_and(|old| old > max)
                });
                prop_assert!(in_lowered_mss, "byte {} changed outside an MSS value", i);
            }
            prop_assert_eq!(&after[..start + 16], &before[..start + 16]);
            prop_assert_eq!(&after[start + 18..start + 20], &before[start + 18..start + 20]);
            prop_assert_eq!(&after[header_end..], &before[header_end..]);
        }

        #[test]
        fn random_valid_syns_clamp_exactly(
            v6 in any::<bool>(),
            ack in any::<bool>(),
            opts in proptest::collection::vec(opt_strategy(), 0..8),
            mss_index in any::<usize>(),
            orig in any::<u16>(),
            max in any::<u16>(),
            other_max in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..40),
            trailing in proptest::collection::vec(any::<u8>(), 0..6),
            src4 in any::<[u8; 4]>(),
            src6 in any::<[u8; 16]>(),
        ) {
            let Some((options, option_at)) = options_with_mss(&opts, mss_index, orig) else {
                return Ok(());
            };
            let flags = if ack { SYN_ACK } else { SYN };
            let seg = tcp_segment(flags, &options, &payload);
            let mut before = if v6 {
                ipv6(src6, V6_DST, PROTO_TCP, &seg)
            } else {
                ipv4(src4, V4_DST, PROTO_TCP, &seg)
            };
            set_tcp_checksum(&mut before);
            before.extend_from_slice(&trailing);

            let mut after = before.clone();
            let (max_v4, max_v6) = if v6 { (other_max, max) } else { (max, other_max) };
            let changed = clamp_mss(&mut after, max_v4, max_v6);

            let expect_change = max != 0 && orig > max;
            prop_assert_eq!(changed, expect_change);
            let expected = if expect_change { max } else { orig };
            let at = mss_value_at(v6, option_at);
            if expect_change {
                assert_clamped(&before, &after, &[at], expected);
            } else {
                prop_assert_eq!(&after, &before);
            }
            prop_assert_eq!(be16(&after, at), Some(expected));
            prop_assert_eq!(stored_tcp_checksum(&after), tcp_checksum_from_scratch(&after));
        }
    }
}
