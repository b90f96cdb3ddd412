//! One entry point per fuzz target, shared by the cargo-fuzz targets in
//! `fuzz/` and by the corpus replay below, so each
//! harness is written once.
//!
//! Each function takes arbitrary bytes, feeds them to a parser of untrusted
//! input the way the daemon does, and checks invariants that must hold
//! whatever the bytes. It panics only when one of those breaks; any other
//! panic is a bug in the code under test. Not part of the daemon's API.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net};
use vpcgate_proto::{self as proto, FrameError, Request, Response};

use crate::core::mss::{clamp_mss, mss_for_mtu};
use crate::core::packet::IpPacket;
use crate::core::routes_msg::{self, Message, MAX_PACKET, MAX_ROUTES};
use crate::state;
use crate::uapi::text::{format_get, Request as UapiRequest, RequestParser};
use vpcgate_plane::device::DeviceConfig;
use vpcgate_plane::intent::{plan, Intent};
use vpcgate_plane::model::Desired;
use vpcgate_plane::settings::{validate_addresses, Settings};
use vpcgate_plane::stored::{restore_peers, stored_peers};
use vpcgate_plane::{key, policy as subnet};

mod dns;
pub use dns::dns;

/// A packet as read from the TUN or decrypted from a peer: the checked view,
/// then the MSS clamp under several limits, each on a fresh copy and all in
/// turn on one buffer.
pub fn packet(data: &[u8]) {
    check_view(data);
    let (v4_1280, v6_1280) = mss_for_mtu(1280);
    let (v4_1420, v6_1420) = mss_for_mtu(1420);
    let limits = [
        (u16::MAX, u16::MAX),
        (v4_1420, v6_1420),
        (0, v6_1420),
        (v4_1420, 0),
        (v4_1280, v6_1280),
        (536, 536),
        (1, 1),
        (0, 0),
    ];
    let mut chained = data.to_vec();
    for (v4, v6) in limits {
        let mut fresh = data.to_vec();
        let changed = clamp_mss(&mut fresh, v4, v6);
        check_clamp(data, &fresh, changed, v4, v6);

        let before = chained.clone();
        let changed = clamp_mss(&mut chained, v4, v6);
        check_clamp(&before, &chained, changed, v4, v6);
    }
}

fn check_view(data: &[u8]) {
    let view = IpPacket::new_checked(data).map(|v| (v.source(), v.destination()));
    let expected = match data.first().map(|b| b >> 4) {
        Some(4) if data.len() >= 20 => {
            Some((IpAddr::V4(v4_at(data, 12)), IpAddr::V4(v4_at(data, 16))))
        }
        Some(6) if data.len() >= 40 => {
            Some((IpAddr::V6(v6_at(data, 8)), IpAddr::V6(v6_at(data, 24))))
        }
        _ => None,
    };
    assert_eq!(view, expected, "the view reads the header's addresses");
}

fn check_clamp(before: &[u8], after: &[u8], changed: bool, max_v4: u16, max_v6: u16) {
    assert_eq!(before.len(), after.len(), "the length never changes");
    assert_eq!(
        changed,
        before != after,
        "the result says whether bytes changed"
    );
    if !changed {
        return;
    }
    let max = match before.first().map(|b| b >> 4) {
        Some(4) => max_v4,
        Some(6) => max_v6,
        other => panic!("changed a packet of IP version {other:?}"),
    };
    assert!(max != 0, "a limit of 0 means no clamping");
    assert!(max != u16::MAX, "no MSS exceeds 65535");
    let Some(tcp) = tcp_layout(before) else {
        panic!("changed a packet that is not one whole TCP header after a plain IP header");
    };
    let header_len = before
        .get(tcp.start + 12)
        .map_or(0, |b| usize::from(b >> 4) * 4);
    let writable = tcp.start + 16..tcp.start + header_len;
    for (i, (a, b)) in before.iter().zip(after).enumerate() {
        assert!(
            a == b || writable.contains(&i),
            "byte {i} changed outside the TCP checksum and options ({writable:?})"
        );
    }
    let (Some(old), Some(new)) = (checksum_state(before), checksum_state(after)) else {
        panic!("changed a packet whose TCP header is incomplete");
    };
    assert!(
        !old.exact || new.exact,
        "a checksum that matched a full recomputation still does"
    );
    assert!(
        !old.verifies || new.verifies,
        "a checksum that verified still does"
    );
    let mut again = after.to_vec();
    assert!(
        !clamp_mss(&mut again, max_v4, max_v6),
        "clamping again to the same limit changes nothing"
    );
}

/// Where a TCP segment lies and the sum of its pseudo-header, read the
/// plain way: the IP length field bounds the segment and no IPv6 extension
/// header is walked.
struct TcpLayout {
    start: usize,
    end: usize,
    pseudo_sum: u32,
}

fn tcp_layout(p: &[u8]) -> Option<TcpLayout> {
    const TCP: u8 = 6;
    match p.first()? >> 4 {
        4 => {
            let start = usize::from(p.first()? & 0x0f) * 4;
            let end = usize::from(be16(p, 2)?);
            if start < 20 || end < start || end > p.len() || *p.get(9)? != TCP {
                return None;
            }
            let len = (end - start) as u32;
            Some(TcpLayout {
                start,
                end,
                pseudo_sum: sum_words(p.get(12..20)?) + u32::from(TCP) + len,
            })
        }
        6 => {
            let len = usize::from(be16(p, 4)?);
            let end = 40 + len;
            if end > p.len() || *p.get(6)? != TCP {
                return None;
            }
            Some(TcpLayout {
                start: 40,
                end,
                pseudo_sum: sum_words(p.get(8..40)?) + u32::from(TCP) + len as u32,
            })
        }
        _ => None,
    }
}

struct ChecksumState {
    /// The stored checksum equals one computed from scratch.
    exact: bool,
    /// The ones' complement sum over pseudo-header and segment, checksum
    /// included, is all ones (RFC 1071), which also accepts 0xFFFF for 0.
    verifies: bool,
}

fn checksum_state(p: &[u8]) -> Option<ChecksumState> {
    let tcp = tcp_layout(p)?;
    let segment = p.get(tcp.start..tcp.end)?;
    let stored = be16(segment, 16)?;
    // The checksum sits at an even offset, so it is one whole word of the sum.
    let without = tcp.pseudo_sum + sum_words(segment) - u32::from(stored);
    Some(ChecksumState {
        exact: stored == !fold(without),
        verifies: fold(without + u32::from(stored)) == 0xffff,
    })
}

/// One connection's bytes on the UAPI socket, split into lines as the
/// server splits them, through the request parser. Each accepted `set` is
/// applied to the device state as the daemon applies it; each state must
/// survive `wg showconf | wg setconf`.
pub fn uapi(data: &[u8]) {
    let mut parser = RequestParser::new();
    // The same lines as text, for as long as every line is UTF-8.
    let mut text_parser = Some(RequestParser::new());
    let mut config = fresh_device();
    for line in data.split_inclusive(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let result = parser.push_line_bytes(line);
        match std::str::from_utf8(line) {
            Ok(text) => {
                if let Some(p) = &mut text_parser {
                    assert_eq!(p.push_line(text), result, "text and bytes agree");
                }
            }
            Err(_) => text_parser = None,
        }
        match result {
            Err(e) => {
                assert!(
                    [libc::EPROTO, libc::EINVAL, libc::EMSGSIZE, libc::E2BIG].contains(&e.errno()),
                    "unexpected errno {} for {e}",
                    e.errno()
                );
            }
            Ok(None) => {}
            Ok(Some(UapiRequest::Get)) => {
                let mut reply = String::new();
                format_get(&uapi_view(&config), &mut reply);
                assert!(reply.ends_with("errno=0\n\n"));
            }
            Ok(Some(UapiRequest::Set(set))) => {
                if let Ok(planned) = plan(&config, Intent::UapiSet(set)) {
                    config = planned.desired;
                    get_reply_round_trips(&config);
                }
            }
        }
    }
}

/// A device as a plain interface starts: no key, no address, no port.
fn fresh_device() -> Desired {
    match Desired::restore("fuzz0", None, Settings::new(Vec::new(), 0), &[]) {
        Ok(desired) => desired,
        Err(e) => panic!("an empty device does not build: {e}"),
    }
}

fn uapi_view(desired: &Desired) -> crate::uapi::text::DeviceView {
    crate::uapi::view(desired, desired.settings.listen_port, |_| {
        vpcgate_plane::view::PeerLive::default()
    })
}

/// What `wg showconf` then `wg setconf` does: the settable lines of a `get`
/// reply, sent back as a `set` that replaces every peer, rebuild the same
/// state on a fresh device.
fn get_reply_round_trips(config: &Desired) {
    const REPORT_ONLY: [&str; 5] = [
        "last_handshake_time_sec",
        "last_handshake_time_nsec",
        "tx_bytes",
        "rx_bytes",
        "errno",
    ];
    let view = uapi_view(config);
    let mut reply = String::new();
    format_get(&view, &mut reply);
    let settable = reply.lines().filter(|line| {
        let key = line.split_once('=').map_or(*line, |(key, _)| key);
        !line.is_empty() && !REPORT_ONLY.contains(&key)
    });
    let mut parser = RequestParser::new();
    let mut request = None;
    for line in ["set=1", "replace_peers=true"]
        .into_iter()
        .chain(settable)
        .chain([""])
    {
        match parser.push_line(line) {
            Ok(done) => request = done.or(request),
            Err(e) => panic!("line {line:?} of a get reply is refused: {e}"),
        }
    }
    let Some(UapiRequest::Set(set)) = request else {
        panic!("the set request built from a get reply did not complete");
    };
    let rebuilt = match plan(&fresh_device(), Intent::UapiSet(set)) {
        Ok(planned) => planned.desired,
        Err(e) => panic!("a get reply does not apply: {e}"),
    };
    assert_eq!(
        uapi_view(&rebuilt),
        view,
        "showconf then setconf changes nothing"
    );
}

/// One connection's bytes on the control socket: frames read as the daemon
/// reads them, each body decoded as a request (and as a response, which the
/// CLI reads with the same framing), then the daemon's pure checks on the
/// request's fields.
pub fn control(data: &[u8]) {
    let mut rest = data;
    while let Some((prefix, tail)) = rest.split_first_chunk::<4>() {
        // The daemon answers a length over the limit and closes. (A
        // response may be larger; this reads as the daemon does.)
        let Ok(len) = proto::frame_len::<Request>(*prefix) else {
            return;
        };
        // A body cut short is a connection that ended or stalled mid-frame.
        let Some((body, tail)) = tail.split_at_checked(len) else {
            return;
        };
        rest = tail;
        if let Ok(request) = proto::decode::<Request>(body) {
            assert_frame_round_trip(&request);
            check_request_fields(&request);
        }
        if let Ok(response) = proto::decode::<Response>(body) {
            assert_frame_round_trip(&response);
        }
    }
}

fn assert_frame_round_trip<T>(message: &T)
where
    T: serde::Serialize
        + for<'a> serde::Deserialize<'a>
        + proto::Framed
        + PartialEq
        + std::fmt::Debug,
{
    let frame = match proto::encode(message) {
        Ok(frame) => frame,
        // Defaults written out can make a body near the limit outgrow it.
        Err(FrameError::TooLarge { .. }) => return,
        Err(e) => panic!("a decoded message does not encode: {e}"),
    };
    match proto::read_frame::<T>(&mut &frame[..]) {
        Ok(back) => assert_eq!(&back, message, "encode then decode is the identity"),
        Err(e) => panic!("an encoded message does not decode: {e}"),
    }
}

/// The checks the daemon runs on a request's fields before touching any
/// state. Their answers may be errors; none may panic.
fn check_request_fields(request: &Request) {
    match request {
        Request::AdvertiseRoutes {
            routes,
            exit_node,
            checks,
        } => {
            let tunnel = [IpNet::V4(Ipv4Net::new_assert(
                Ipv4Addr::new(100, 64, 0, 0),
                24,
            ))];
            let input = subnet::split_list(routes);
            if let Ok(routes) = subnet::validate_advertised(&input, &tunnel, *exit_node) {
                assert_advertisable(&routes);
                if let Ok(checks) = vpcgate_plane::health::validate_checks(checks, &routes) {
                    for check in checks {
                        // Every accepted check governs an advertised range
                        // and reads back as itself.
                        assert!(routes.iter().any(|r| r.contains(&check.target.ip())));
                        assert_eq!(
                            check.to_string().parse::<vpcgate_plane::health::Check>(),
                            Ok(check)
                        );
                    }
                }
            }
        }
        Request::Set(options) => {
            if let Some(endpoint) = &options.public_endpoint {
                let _ = subnet::validate_endpoint(endpoint);
            }
            if let Some(list) = &options.address {
                let parsed: Result<Vec<IpNet>, _> = subnet::split_list(list)
                    .iter()
                    .map(|text| text.parse::<IpNet>())
                    .collect();
                if let Ok(addresses) = parsed {
                    let _ = validate_addresses(&addresses);
                }
            }
        }
        Request::PeerAdd(add) => {
            let _ = subnet::validate_name(&add.name);
            if let Some(key) = &add.public_key {
                let _ = key::parse_key(key);
            }
            if let Some(endpoint) = &add.endpoint {
                let _ = subnet::validate_endpoint(endpoint);
            }
            for text in subnet::split_list(&add.allowed_ips) {
                let _ = subnet::parse_prefix(&text);
            }
        }
        Request::IdentityImport { document } => {
            // A document that parses is checked whole; one that passes
            // reads back as itself.
            if let Ok(identity) = vpcgate_plane::identity::Identity::parse(document) {
                let current = vpcgate_plane::settings::Settings::new(Vec::new(), 51820);
                if vpcgate_plane::identity::validate(&identity, &current).is_ok() {
                    let text = identity.to_text().expect("an identity writes");
                    let back = vpcgate_plane::identity::Identity::parse(&text);
                    assert!(back.as_ref() == Ok(&identity), "identity round trip");
                }
            }
        }
        Request::Status
        | Request::IdentityExport
        | Request::Drain { .. }
        | Request::GetAdvertisedRoutes
        | Request::PeerRemove { .. }
        | Request::PeerList
        | Request::PeerConfig { .. } => {}
    }
}

/// A set that passed validation must fit one route advertisement and come
/// out of it unchanged.
fn assert_advertisable(routes: &[IpNet]) {
    assert!(routes.len() <= MAX_ROUTES);
    let (gateway, client) = (Ipv4Addr::new(100, 64, 0, 1), Ipv4Addr::new(100, 64, 0, 2));
    let mut buf = [0u8; MAX_PACKET];
    let Some(n) = routes_msg::build_routes(gateway, client, 7, routes, None, 100, &mut buf) else {
        panic!(
            "{} validated routes do not fit an advertisement",
            routes.len()
        );
    };
    match routes_msg::intercept(buf.get(..n).unwrap_or_default(), client) {
        Some((_, Ok(Message::Routes(set)))) => {
            assert_eq!(set.routes().collect::<Vec<_>>(), routes);
        }
        other => panic!("an advertisement of validated routes reads back as {other:?}"),
    }
}

/// The three state files, each parsed from the same bytes as the daemon
/// loads them at start and on SIGHUP; whatever loads must save and load
/// again to the same thing.
pub fn state(data: &[u8]) {
    // The loader reads each file with `read_to_string`, which refuses
    // anything but UTF-8 before the parsers see it.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(key) = state::parse_key_file(text).map(|k| k.value) {
        match state::parse_key_file(&state::encode_key_file(&key)) {
            Ok(again) => assert!(
                again.value == key && again.format == state::FORMAT,
                "a saved key loads as itself"
            ),
            Err(e) => panic!("a saved key does not load: {e}"),
        }
    }
    if let Ok(settings) = state::parse_settings(text).map(|s| s.value) {
        let _ = validate_addresses(&settings.addresses);
        let json = state::encode_settings(&settings).unwrap_or_default();
        match std::str::from_utf8(&json).map(state::parse_settings) {
            Ok(Ok(again)) => assert_eq!(
                again,
                state::Versioned {
                    value: settings,
                    format: state::FORMAT
                },
                "saved settings load as themselves"
            ),
            other => panic!("saved settings do not load: {other:?}"),
        }
    }
    if let Ok(stored) = state::parse_peers(text).map(|p| p.value) {
        let mut config = DeviceConfig::new(None);
        if restore_peers(&mut config, &stored).is_ok() {
            let saved = state::encode_peers(&stored_peers(&config)).unwrap_or_default();
            let reloaded = match std::str::from_utf8(&saved).map(state::parse_peers) {
                Ok(Ok(reloaded)) if reloaded.format == state::FORMAT => reloaded.value,
                Ok(Ok(reloaded)) => panic!("saved peers load as format {}", reloaded.format),
                Ok(Err(e)) => panic!("saved peers do not parse: {e}"),
                Err(e) => panic!("saved peers are not UTF-8: {e}"),
            };
            let mut again = DeviceConfig::new(None);
            if let Err(e) = restore_peers(&mut again, &reloaded) {
                panic!("saved peers do not load: {e}");
            }
            let resaved = state::encode_peers(&stored_peers(&again)).unwrap_or_default();
            assert!(
                *resaved == *saved,
                "loading saved peers and saving them again changes the file"
            );
        }
    }
}

/// A packet decrypted from a peer, offered to the route-exchange intercept
/// as the core offers it. Anything it accepts must be rebuilt by the
/// builders into a message that reads back the same.
pub fn routes_msg(data: &[u8]) {
    let Some(local) = data.get(16..20).map(|_| v4_at(data, 16)) else {
        assert_eq!(
            routes_msg::intercept(data, Ipv4Addr::UNSPECIFIED),
            None,
            "shorter than an IPv4 header"
        );
        return;
    };
    let elsewhere = Ipv4Addr::from(u32::from(local) ^ 1);
    assert_eq!(
        routes_msg::intercept(data, elsewhere),
        None,
        "a datagram for another address is not ours"
    );
    let Some((src, message)) = routes_msg::intercept(data, local) else {
        return;
    };
    assert_eq!(src, v4_at(data, 12), "the source is the IP header's");
    let Ok(message) = message else {
        return;
    };
    let mut buf = [0u8; MAX_PACKET];
    let built = match &message {
        Message::Request => routes_msg::build_request(src, local, &mut buf),
        Message::Routes(set) => {
            let routes: Vec<IpNet> = set.routes().collect();
            assert!(routes.len() <= MAX_ROUTES);
            assert!(
                routes.iter().all(|r| r.trunc() == *r),
                "only canonical prefixes are accepted"
            );
            let dns = set.dns.as_ref();
            if routes_msg::encoded_len(&routes, dns) > MAX_PACKET {
                // A receiver takes whatever one datagram holds; a sender
                // writes only what never needs fragmenting.
                assert!(routes_msg::build_routes(
                    src,
                    local,
                    1,
                    &routes,
                    dns,
                    set.priority,
                    &mut [0; 65536]
                )
                .is_none());
                return;
            }
            routes_msg::build_routes(
                src,
                local,
                set.generation,
                &routes,
                dns,
                set.priority,
                &mut buf,
            )
        }
    };
    let Some(n) = built else {
        panic!("an accepted message does not fit MAX_PACKET when rebuilt");
    };
    let packet = buf.get(..n).unwrap_or_default();
    assert_eq!(
        fold(sum_words(packet.get(..20).unwrap_or_default())),
        0xffff,
        "the rebuilt IPv4 header checksum verifies"
    );
    assert_eq!(
        routes_msg::intercept(packet, local),
        Some((src, Ok(message))),
        "a rebuilt message reads back the same"
    );
}

fn be16(buf: &[u8], at: usize) -> Option<u16> {
    match buf.get(at..at.checked_add(2)?)? {
        &[hi, lo] => Some(u16::from_be_bytes([hi, lo])),
        _ => None,
    }
}

fn v4_at(buf: &[u8], at: usize) -> Ipv4Addr {
    let mut octets = [0u8; 4];
    if let Some(src) = buf.get(at..at + 4) {
        octets.copy_from_slice(src);
    }
    Ipv4Addr::from(octets)
}

fn v6_at(buf: &[u8], at: usize) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    if let Some(src) = buf.get(at..at + 16) {
        octets.copy_from_slice(src);
    }
    Ipv6Addr::from(octets)
}

/// The sum of big-endian 16-bit words, an odd last byte padded with zero.
/// 65,535 words of 0xFFFF still fit a `u32`.
fn sum_words(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum()
}

/// Folds carries back in (ones' complement addition).
fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the
/// same entry points the cargo-fuzz targets call, so every input a fuzzer
/// ever kept, crash reproducers included, is rerun by the ordinary test
/// command on stable Rust. A missing or empty corpus directory fails: the
/// replay never passes by finding nothing.
#[cfg(test)]
mod corpus {
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::path::{Path, PathBuf};

    use super as fuzzing;

    fn replay(target: &str, run: fn(&[u8])) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
            panic!(
                "cannot read the corpus of fuzz target {target} at {}: {e}",
                dir.display()
            )
        });
        let mut files: Vec<PathBuf> = entries
            .map(|entry| entry.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
        files.retain(|path| path.is_file());
        files.sort();
        assert!(
            !files.is_empty(),
            "the corpus of fuzz target {target} at {} is empty; commit one (see fuzz/README.md)",
            dir.display()
        );
        for path in &files {
            let data = std::fs::read(path)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| run(&data))) {
                eprintln!("fuzz target {target} failed on {}", path.display());
                std::panic::resume_unwind(panic);
            }
        }
        println!("fuzz target {target}: replayed {} inputs", files.len());
    }

    #[test]
    fn packet_corpus() {
        replay("packet", fuzzing::packet);
    }

    #[test]
    fn uapi_corpus() {
        replay("uapi", fuzzing::uapi);
    }

    #[test]
    fn control_corpus() {
        replay("control", fuzzing::control);
    }

    #[test]
    fn state_corpus() {
        replay("state", fuzzing::state);
    }

    #[test]
    fn routes_msg_corpus() {
        replay("routes_msg", fuzzing::routes_msg);
    }

    #[test]
    fn dns_corpus() {
        replay("dns", fuzzing::dns);
    }
}
