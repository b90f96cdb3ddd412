//! Per-packet work on the data path: WireGuard encapsulation and
//! decapsulation with boringtun's `Tunn` (what `Node` calls for every
//! packet), and the TCP MSS clamp that every packet from the TUN passes
//! through.
//!
//! The two `Tunn`s complete a real handshake in memory first, so the timed
//! calls run on an established session: ChaCha20-Poly1305 over a 1400-byte
//! packet into a buffer the caller owns, as in the daemon.

use std::hint::black_box;
use std::time::Duration;

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use divan::counter::BytesCount;
use divan::Bencher;
use vpcgated::core::mss::clamp_mss;

fn main() {
    // As in routing.rs: half a second per benchmark unless `--min-time` says
    // otherwise.
    divan::Divan::default()
        .min_time(Duration::from_millis(500))
        .config_with_args()
        .main();
}

/// The inner packet: a full-size packet for the 1420-byte tunnel MTU that
/// still leaves room for a few option bytes.
const PACKET_LEN: usize = 1400;
/// WireGuard adds a 16-byte header and a 16-byte tag.
const OUT_LEN: usize = PACKET_LEN + 32;

const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// A valid IPv4 packet of `len` bytes (boringtun checks the IP header of what
/// it decrypts) with a UDP-style header and a fixed payload pattern.
fn ipv4_packet(len: usize, protocol: u8) -> Vec<u8> {
    let mut p = vec![0u8; len];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    p[8] = 64;
    p[9] = protocol;
    p[12..16].copy_from_slice(&[100, 64, 0, 1]);
    p[16..20].copy_from_slice(&[100, 64, 0, 2]);
    let checksum = ones_complement_sum(&p[..20]);
    p[10..12].copy_from_slice(&(!checksum).to_be_bytes());
    p[20..22].copy_from_slice(&40000u16.to_be_bytes());
    p[22..24].copy_from_slice(&5201u16.to_be_bytes());
    p[24..26].copy_from_slice(&((len - 20) as u16).to_be_bytes());
    for (i, b) in p[28..].iter_mut().enumerate() {
        *b = i as u8;
    }
    p
}

fn ones_complement_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Two peers with fixed keys, after a completed handshake: `a` initiated,
/// `b` has seen `a`'s first data packet (the keepalive), so both can send.
fn established_pair() -> (Tunn, Tunn) {
    let secret_a = StaticSecret::from([0x11; 32]);
    let secret_b = StaticSecret::from([0x22; 32]);
    let public_a = PublicKey::from(&secret_a);
    let public_b = PublicKey::from(&secret_b);
    let mut a = Tunn::new(secret_a, public_b, None, None, 1, None);
    let mut b = Tunn::new(secret_b, public_a, None, None, 2, None);

    let mut buf = vec![0u8; 2048];
    let mut reply = vec![0u8; 2048];
    let TunnResult::WriteToNetwork(init) = a.format_handshake_initiation(&mut buf, false) else {
        panic!("a did not produce a handshake initiation");
    };
    let TunnResult::WriteToNetwork(response) = b.decapsulate(None, init, &mut reply) else {
        panic!("b did not answer the handshake initiation");
    };
    let TunnResult::WriteToNetwork(keepalive) = a.decapsulate(None, response, &mut buf) else {
        panic!("a did not confirm the handshake with a keepalive");
    };
    match b.decapsulate(None, keepalive, &mut reply) {
        TunnResult::Done => {}
        _ => panic!("b did not accept a's keepalive"),
    }
    (a, b)
}

fn encapsulated_len(tunn: &mut Tunn, packet: &[u8], out: &mut [u8]) -> usize {
    match tunn.encapsulate(packet, out) {
        TunnResult::WriteToNetwork(datagram) => datagram.len(),
        _ => panic!("encapsulate on an established session did not produce a datagram"),
    }
}

#[divan::bench]
fn encapsulate_1400(bencher: Bencher) {
    let (mut a, _b) = established_pair();
    let packet = ipv4_packet(PACKET_LEN, PROTO_UDP);
    let mut out = vec![0u8; OUT_LEN];
    bencher
        .counter(BytesCount::new(PACKET_LEN))
        .bench_local(|| encapsulated_len(&mut a, black_box(&packet), &mut out));
}

/// Each input is a fresh datagram from `a` (untimed), since the receiver's
/// replay window rejects a counter it has seen.
#[divan::bench]
fn decapsulate_1400(bencher: Bencher) {
    let (mut a, mut b) = established_pair();
    let packet = ipv4_packet(PACKET_LEN, PROTO_UDP);
    let mut scratch = vec![0u8; OUT_LEN];
    let mut out = vec![0u8; OUT_LEN];
    bencher
        .counter(BytesCount::new(PACKET_LEN))
        .with_inputs(|| {
            let n = encapsulated_len(&mut a, &packet, &mut scratch);
            scratch[..n].to_vec()
        })
        .bench_local_refs(|datagram| match b.decapsulate(None, datagram, &mut out) {
            TunnResult::WriteToTunnelV4(inner, _) => inner.len(),
            _ => panic!("decapsulate rejected a fresh datagram"),
        });
}

/// An IPv4 or IPv6 TCP SYN carrying MSS 1460 then the usual SACK-permitted,
/// timestamp and window-scale options, with a correct checksum.
fn tcp_syn(v6: bool) -> Vec<u8> {
    let options: [u8; 20] = [
        2, 4, 0x05, 0xb4, // MSS 1460
        4, 2, // SACK permitted
        8, 10, 0, 0, 0, 1, 0, 0, 0, 0, // timestamps
        1, 3, 3, 7, // NOP, window scale 7
    ];
    let tcp_len = 20 + options.len();
    let mut tcp = vec![0u8; tcp_len];
    tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
    tcp[2..4].copy_from_slice(&443u16.to_be_bytes());
    tcp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    tcp[12] = ((tcp_len / 4) as u8) << 4;
    tcp[13] = 0x02;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    tcp[20..].copy_from_slice(&options);

    let (mut packet, pseudo) = if v6 {
        let mut ip = vec![0u8; 40];
        ip[0] = 0x60;
        ip[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        ip[6] = PROTO_TCP;
        ip[7] = 64;
        ip[8] = 0xfd;
        ip[23] = 1;
        ip[24] = 0xfd;
        ip[39] = 2;
        let mut pseudo = ip[8..40].to_vec();
        pseudo.extend_from_slice(&(tcp_len as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 6]);
        (ip, pseudo)
    } else {
        let mut ip = vec![0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        ip[8] = 64;
        ip[9] = PROTO_TCP;
        ip[12..16].copy_from_slice(&[100, 64, 0, 2]);
        ip[16..20].copy_from_slice(&[198, 18, 1, 10]);
        let checksum = ones_complement_sum(&ip);
        ip[10..12].copy_from_slice(&(!checksum).to_be_bytes());
        let mut pseudo = ip[12..20].to_vec();
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&(tcp_len as u16).to_be_bytes());
        (ip, pseudo)
    };
    let mut summed = pseudo;
    summed.extend_from_slice(&tcp);
    let checksum = !ones_complement_sum(&summed);
    tcp[16..18].copy_from_slice(&checksum.to_be_bytes());
    packet.extend_from_slice(&tcp);
    packet
}

/// A SYN whose MSS is above the limit: the clamp rewrites it. The original
/// bytes are copied back every iteration, so every call rewrites.
fn clamp_syn(bencher: Bencher, v6: bool) {
    let original = tcp_syn(v6);
    let mut packet = original.clone();
    assert!(
        clamp_mss(&mut packet, 1380, 1360),
        "the SYN was not clamped"
    );
    bencher.bench_local(|| {
        packet.copy_from_slice(&original);
        clamp_mss(black_box(&mut packet), 1380, 1360)
    });
}

#[divan::bench]
fn clamp_mss_syn_v4(bencher: Bencher) {
    clamp_syn(bencher, false);
}

#[divan::bench]
fn clamp_mss_syn_v6(bencher: Bencher) {
    clamp_syn(bencher, true);
}

/// A full-size packet that is not a SYN: what every other packet from the
/// TUN pays for the clamp.
#[divan::bench]
fn clamp_mss_non_syn(bencher: Bencher) {
    // TCP data offset 5 (no options), flags ACK only.
    let mut packet = ipv4_packet(PACKET_LEN, PROTO_TCP);
    packet[20 + 12] = 5 << 4;
    packet[20 + 13] = 0x10;
    assert!(!clamp_mss(&mut packet, 1380, 1360), "a non-SYN was changed");
    bencher.bench_local(|| clamp_mss(black_box(&mut packet), 1380, 1360));
}
