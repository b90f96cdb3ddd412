//! The text protocol of the WireGuard cross-platform userspace API, which stock
//! `wg` speaks over `/var/run/wireguard/<iface>.sock`: a line-at-a-time
//! [`RequestParser`] for `get` and `set` requests, and the formatters for the
//! replies ([`format_get`], [`format_errno`]). It does no I/O and touches no
//! daemon state. A `set` is validated in full before it is handed over, so the
//! caller either applies all of it or, on any error, none of it; wireguard-go
//! instead applies lines as they arrive and can leave a half-applied change.
//! Errno values are Linux's, the only platform vpcgate runs on.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
pub use vpcgate_plane::device::{AllowedIpChange, PeerChange, SetRequest};
pub use vpcgate_plane::key::Key;
use zeroize::Zeroize;

/// The longest line `wg` sends is an `endpoint=` with a scoped IPv6 address,
/// under 100 bytes. 4096 leaves room for other clients and still bounds what
/// one line can cost.
pub const MAX_LINE_LEN: usize = 4096;

/// Peers in one `set` request. Together with [`MAX_ALLOWED_IPS`] this keeps a
/// parsed request under about 64 MiB while it grows, whatever a client sends.
pub const MAX_PEERS: usize = 100_000;

/// `allowed_ip` lines in one `set` request, counted across all peers.
pub const MAX_ALLOWED_IPS: usize = 1_000_000;

const E2BIG: i32 = 7;
const EINVAL: i32 = 22;
const EPROTO: i32 = 71;
const EMSGSIZE: i32 = 90;

/// How much of an offending key or value an error quotes back.
const EXCERPT_CHARS: usize = 64;

/// Parses a key as the UAPI sends it: exactly 64 hexadecimal digits, in
/// either case.
pub fn key_from_hex(s: &str) -> Result<Key, UapiError> {
    parse_key("key", s)
}

/// Lowercase hex, as `wg` and wireguard-go write keys. The returned
/// `String` is not zeroized on drop.
pub fn key_to_hex(key: &Key) -> String {
    let mut s = String::with_capacity(64);
    push_hex(&mut s, &key.0);
    s
}

/// One complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Get,
    Set(SetRequest),
}

/// What a `get` reports. The caller fills it from daemon state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceView {
    /// `None` or all zeros: no key, and no `private_key=` line.
    pub private_key: Option<Key>,
    /// 0 (not bound) is left out, as wireguard-go does.
    pub listen_port: u16,
    /// 0 is left out.
    pub fwmark: u32,
    pub peers: Vec<PeerView>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerView {
    pub public_key: Key,
    /// `None` is written as all zeros, as wireguard-go does.
    pub preshared_key: Option<Key>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: u16,
    /// Wall-clock time of the last handshake. `None`, or a time before the
    /// epoch, is written as 0/0, which `wg` shows as no handshake.
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub allowed_ips: Vec<IpNet>,
}

/// Why a request was refused. Messages quote at most a short excerpt of what
/// was sent and never key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UapiError {
    /// EMSGSIZE.
    #[error(
        "line is {len} bytes long; lines may be at most {} bytes",
        MAX_LINE_LEN
    )]
    LineTooLong { len: usize },
    /// EPROTO.
    #[error("line is not valid UTF-8")]
    NotUtf8,
    /// EPROTO.
    #[error("empty line where a request should start; send \"get=1\" or \"set=1\" first")]
    MissingOperation,
    /// EINVAL.
    #[error("unknown operation {0}; a request starts with \"get=1\" or \"set=1\"")]
    UnknownOperation(String),
    /// EINVAL, as wireguard-go answers trailing bytes after `get=1`.
    #[error("unexpected line {0} after \"get=1\"; a get request is \"get=1\" and an empty line")]
    TrailingGetLine(String),
    /// EPROTO, as wireguard-go answers a line without `=`.
    #[error("line {0} is not of the form key=value")]
    MissingEquals(String),
    /// EINVAL.
    #[error("unknown device key {0}")]
    UnknownDeviceKey(String),
    /// EINVAL.
    #[error("unknown peer key {0}")]
    UnknownPeerKey(String),
    /// EINVAL.
    #[error(
        "device key {0} after a public_key line; device settings must come before the first peer"
    )]
    DeviceKeyAfterPeer(String),
    /// EINVAL.
    #[error(
        "peer key {0} before any public_key line; start each peer with public_key=<64 hex digits>"
    )]
    PeerKeyBeforePublicKey(String),
    /// EINVAL.
    #[error("{field} must be 64 hexadecimal digits, got {len} bytes")]
    KeyLength { field: &'static str, len: usize },
    /// EINVAL.
    #[error("{field} must be 64 hexadecimal digits and contains something else")]
    KeyNotHex { field: &'static str },
    /// EINVAL.
    #[error("public_key is all zeros, which no peer can have")]
    ZeroPublicKey,
    /// EINVAL.
    #[error("{key}={value:?}: the only accepted value is \"true\"")]
    NotTrue { key: &'static str, value: String },
    /// EINVAL.
    #[error("{key}={value:?}: expected a whole number from 0 to {max}")]
    BadNumber {
        key: &'static str,
        value: String,
        max: u64,
    },
    /// EINVAL, as wireguard-go.
    #[error("protocol_version={0:?}: only version 1 exists")]
    BadProtocolVersion(String),
    /// EINVAL.
    #[error("endpoint={value:?}: {reason}")]
    BadEndpoint { value: String, reason: &'static str },
    /// EINVAL.
    #[error("allowed_ip={value:?}: {reason}")]
    BadAllowedIp { value: String, reason: &'static str },
    /// E2BIG.
    #[error(
        "more than {} peers in one request; split it into several set requests",
        MAX_PEERS
    )]
    TooManyPeers,
    /// E2BIG.
    #[error(
        "more than {} allowed_ip lines in one request; split it into several set requests",
        MAX_ALLOWED_IPS
    )]
    TooManyAllowedIps,
}

impl UapiError {
    /// The positive Linux errno for this error. Framing faults are EPROTO,
    /// like wireguard-go's line without `=`; a well-formed line whose key or
    /// value is wrong is EINVAL, as in wireguard-go; the size limits are
    /// EMSGSIZE (one line) and E2BIG (one request), so `wg` prints "Message
    /// too long" or "Argument list too long" rather than a vague error.
    pub fn errno(&self) -> i32 {
        match self {
            UapiError::LineTooLong { .. } => EMSGSIZE,
            UapiError::NotUtf8 | UapiError::MissingOperation | UapiError::MissingEquals(_) => {
                EPROTO
            }
            UapiError::TooManyPeers | UapiError::TooManyAllowedIps => E2BIG,
            UapiError::UnknownOperation(_)
            | UapiError::TrailingGetLine(_)
            | UapiError::UnknownDeviceKey(_)
            | UapiError::UnknownPeerKey(_)
            | UapiError::DeviceKeyAfterPeer(_)
            | UapiError::PeerKeyBeforePublicKey(_)
            | UapiError::KeyLength { .. }
            | UapiError::KeyNotHex { .. }
            | UapiError::ZeroPublicKey
            | UapiError::NotTrue { .. }
            | UapiError::BadNumber { .. }
            | UapiError::BadProtocolVersion(_)
            | UapiError::BadEndpoint { .. }
            | UapiError::BadAllowedIp { .. } => EINVAL,
        }
    }
}

/// Reads requests one line at a time.
///
/// Feed each line without its `'\n'`. A request ends at an empty line, which
/// returns `Ok(Some(request))`. When a line is bad, `push_line` returns the
/// error at once and the parser discards every later line up to and including
/// the empty line that ends the request, returning `Ok(None)` for each; it is
/// then ready for the next request. An empty line where a request should
/// start is itself the error ([`UapiError::MissingOperation`]) and leaves
/// nothing to discard. The caller should send
/// `format_errno(err.errno())` as soon as it sees the error, then keep
/// feeding lines, so one connection can carry many requests. (wireguard-go
/// replies and then drops the connection when it reads the rest of the bad
/// request as an unknown operation; `wg` opens a new connection per request,
/// so either is fine for it.) If the connection ends mid-request, drop the
/// parser: nothing has been applied.
#[derive(Debug, Default)]
pub struct RequestParser {
    state: State,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Idle,
    Get,
    Set(SetBuilder),
    Discarding,
}

#[derive(Debug, Default)]
struct SetBuilder {
    req: SetRequest,
    allowed_ip_lines: usize,
}

impl RequestParser {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push_line(&mut self, line: &str) -> Result<Option<Request>, UapiError> {
        if line.is_empty() {
            return self.end_of_request();
        }
        if matches!(self.state, State::Discarding) {
            return Ok(None);
        }
        let result = if line.len() > MAX_LINE_LEN {
            Err(UapiError::LineTooLong { len: line.len() })
        } else {
            self.line(line)
        };
        match result {
            Ok(()) => Ok(None),
            Err(err) => self.reject(err),
        }
    }

    /// Like [`push_line`](Self::push_line) for raw bytes off the socket;
    /// invalid UTF-8 is an error rather than something the caller must map.
    pub fn push_line_bytes(&mut self, line: &[u8]) -> Result<Option<Request>, UapiError> {
        if line.len() > MAX_LINE_LEN {
            return self.reject(UapiError::LineTooLong { len: line.len() });
        }
        match std::str::from_utf8(line) {
            Ok(line) => self.push_line(line),
            Err(_) => self.reject(UapiError::NotUtf8),
        }
    }

    fn reject(&mut self, err: UapiError) -> Result<Option<Request>, UapiError> {
        if matches!(self.state, State::Discarding) {
            return Ok(None);
        }
        self.state = State::Discarding;
        Err(err)
    }

    fn end_of_request(&mut self) -> Result<Option<Request>, UapiError> {
        match std::mem::take(&mut self.state) {
            State::Idle => Err(UapiError::MissingOperation),
            State::Get => Ok(Some(Request::Get)),
            State::Set(builder) => Ok(Some(Request::Set(builder.req))),
            State::Discarding => Ok(None),
        }
    }

    fn line(&mut self, line: &str) -> Result<(), UapiError> {
        match &mut self.state {
            State::Idle => {
                self.state = match line {
                    "get=1" => State::Get,
                    "set=1" => State::Set(SetBuilder::default()),
                    _ => return Err(UapiError::UnknownOperation(quote_line(line))),
                };
                Ok(())
            }
            State::Get => Err(UapiError::TrailingGetLine(quote_line(line))),
            State::Set(builder) => builder.line(line),
            State::Discarding => Ok(()),
        }
    }
}

impl SetBuilder {
    fn line(&mut self, line: &str) -> Result<(), UapiError> {
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| UapiError::MissingEquals(quote_line(line)))?;
        if key == "public_key" {
            return self.start_peer(value);
        }
        match self.req.peers.last_mut() {
            None => device_line(&mut self.req, key, value),
            Some(peer) => peer_line(peer, &mut self.allowed_ip_lines, key, value),
        }
    }

    fn start_peer(&mut self, value: &str) -> Result<(), UapiError> {
        if self.req.peers.len() >= MAX_PEERS {
            return Err(UapiError::TooManyPeers);
        }
        let public_key = parse_key("public_key", value)?;
        if public_key.is_zero() {
            return Err(UapiError::ZeroPublicKey);
        }
        push_scrubbing(&mut self.req.peers, PeerChange::new(public_key));
        Ok(())
    }
}

const DEVICE_KEYS: [&str; 4] = ["private_key", "listen_port", "fwmark", "replace_peers"];
const PEER_KEYS: [&str; 8] = [
    "update_only",
    "remove",
    "preshared_key",
    "endpoint",
    "persistent_keepalive_interval",
    "replace_allowed_ips",
    "allowed_ip",
    "protocol_version",
];

fn device_line(req: &mut SetRequest, key: &str, value: &str) -> Result<(), UapiError> {
    match key {
        "private_key" => req.private_key = Some(parse_maybe_zero_key("private_key", value)?),
        "listen_port" => req.listen_port = Some(parse_u16("listen_port", value)?),
        "fwmark" => req.fwmark = Some(parse_fwmark(value)?),
        "replace_peers" => req.replace_peers = parse_true("replace_peers", value)?,
        _ if PEER_KEYS.contains(&key) => {
            return Err(UapiError::PeerKeyBeforePublicKey(quote_line(key)))
        }
        _ => return Err(UapiError::UnknownDeviceKey(quote_line(key))),
    }
    Ok(())
}

fn peer_line(
    peer: &mut PeerChange,
    allowed_ip_lines: &mut usize,
    key: &str,
    value: &str,
) -> Result<(), UapiError> {
    match key {
        "update_only" => peer.update_only = parse_true("update_only", value)?,
        "remove" => peer.remove = parse_true("remove", value)?,
        "preshared_key" => peer.preshared_key = Some(parse_maybe_zero_key("preshared_key", value)?),
        "endpoint" => peer.endpoint = Some(parse_endpoint(value)?),
        "persistent_keepalive_interval" => {
            peer.persistent_keepalive = Some(parse_u16("persistent_keepalive_interval", value)?)
        }
        "replace_allowed_ips" => {
            peer.replace_allowed_ips = parse_true("replace_allowed_ips", value)?;
            peer.allowed_ips.clear();
        }
        "allowed_ip" => {
            *allowed_ip_lines += 1;
            if *allowed_ip_lines > MAX_ALLOWED_IPS {
                return Err(UapiError::TooManyAllowedIps);
            }
            peer.allowed_ips.push(parse_allowed_ip(value)?);
        }
        "protocol_version" => {
            if value != "1" {
                return Err(UapiError::BadProtocolVersion(excerpt(value)));
            }
        }
        _ if DEVICE_KEYS.contains(&key) => {
            return Err(UapiError::DeviceKeyAfterPeer(quote_line(key)))
        }
        _ => return Err(UapiError::UnknownPeerKey(quote_line(key))),
    }
    Ok(())
}

/// Growing a `Vec` frees the old buffer as it is, and `PeerChange` holds
/// preshared keys inline; zero the old buffer before letting it go.
fn push_scrubbing<T>(vec: &mut Vec<T>, item: T) {
    if vec.len() == vec.capacity() {
        let mut grown = Vec::with_capacity(vec.capacity().max(4) * 2);
        grown.append(vec);
        vec.spare_capacity_mut().zeroize();
        *vec = grown;
    }
    vec.push(item);
}

fn parse_key(field: &'static str, s: &str) -> Result<Key, UapiError> {
    if s.len() != 64 {
        return Err(UapiError::KeyLength {
            field,
            len: s.len(),
        });
    }
    let mut key = Key([0; 32]);
    hex::decode_to_slice(s, &mut key.0).map_err(|_| UapiError::KeyNotHex { field })?;
    Ok(key)
}

fn parse_maybe_zero_key(field: &'static str, s: &str) -> Result<Option<Key>, UapiError> {
    let key = parse_key(field, s)?;
    Ok((!key.is_zero()).then_some(key))
}

/// wireguard-go accepts nothing but `true` for its flag keys; so do we.
fn parse_true(key: &'static str, value: &str) -> Result<bool, UapiError> {
    if value == "true" {
        Ok(true)
    } else {
        Err(UapiError::NotTrue {
            key,
            value: excerpt(value),
        })
    }
}

/// Plain ASCII digits, like Go's `strconv.ParseUint(s, 10, _)`: no sign, no
/// spaces, no empty string.
fn parse_decimal(s: &str, max: u64) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok().filter(|&n| n <= max)
}

fn parse_u16(key: &'static str, value: &str) -> Result<u16, UapiError> {
    parse_decimal(value, u16::MAX.into())
        .and_then(|n| u16::try_from(n).ok())
        .ok_or_else(|| UapiError::BadNumber {
            key,
            value: excerpt(value),
            max: u16::MAX.into(),
        })
}

/// `wg` sends decimal; `0x` hex is accepted too, for hand-written requests.
fn parse_fwmark(value: &str) -> Result<u32, UapiError> {
    let mark = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(digits) if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u32::from_str_radix(digits, 16).ok()
        }
        Some(_) => None,
        None => parse_decimal(value, u32::MAX.into()).and_then(|n| u32::try_from(n).ok()),
    };
    mark.ok_or_else(|| UapiError::BadNumber {
        key: "fwmark",
        value: excerpt(value),
        max: u32::MAX.into(),
    })
}

/// `wg` resolves names itself and sends `ip:port` or `[ipv6]:port`. For a
/// link-local endpoint glibc's `getnameinfo` may add `%<ifname>`; turning a
/// name into an index is I/O, so only a numeric scope id is accepted here.
fn parse_endpoint(value: &str) -> Result<SocketAddr, UapiError> {
    value.parse::<SocketAddr>().map_err(|_| {
        let reason = if value.starts_with('[') && value.contains('%') {
            "an IPv6 scope must be a number, as in [fe80::1%2]:51820, not an interface name"
        } else {
            "expected ip:port or [ipv6]:port with a port from 0 to 65535; resolve host names before sending"
        };
        UapiError::BadEndpoint {
            value: excerpt(value),
            reason,
        }
    })
}

fn parse_allowed_ip(value: &str) -> Result<AllowedIpChange, UapiError> {
    let bad = |reason| UapiError::BadAllowedIp {
        value: excerpt(value),
        reason,
    };
    let (remove, cidr) = match value.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (addr, len) = cidr
        .split_once('/')
        .ok_or_else(|| bad("missing the /prefix-length; write one address as /32 or /128"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| bad("not an IPv4 or IPv6 address"))?;
    let len = parse_decimal(len, 128)
        .and_then(|n| u8::try_from(n).ok())
        .ok_or_else(|| {
            bad("the prefix length must be a number from 0 to 32 (IPv4) or 128 (IPv6)")
        })?;
    let net = IpNet::new(addr, len).map_err(|_| {
        bad("the prefix length is longer than the address (32 for IPv4, 128 for IPv6)")
    })?;
    Ok(AllowedIpChange {
        net: net.trunc(),
        remove,
    })
}

/// Longest key name an error quotes; every UAPI key name is shorter.
const NAME_CHARS: usize = 32;
/// Longest value an error quotes after a key name: too short to be a key.
const VALUE_CHARS: usize = 8;

/// How an error names a line or a key it did not expect, quoted. Such a
/// line may hold a key sent in the wrong place (`private_key=` before
/// `set=1`, or a typo in the key name), and errors are logged, so a
/// value is shown only when it is too short to be key material, and a name
/// only when it looks like one: letters, `_` and `-` (no UAPI key name has
/// a digit, and a hex or base64 key almost always does). Anything else is
/// described by its length.
fn quote_line(line: &str) -> String {
    let (name, value) = line
        .split_once('=')
        .map_or((line, None), |(name, value)| (name, Some(value)));
    let plausible = !name.is_empty()
        && name.len() <= NAME_CHARS
        && name
            .bytes()
            .all(|b| b.is_ascii_alphabetic() || b == b'_' || b == b'-');
    if !plausible {
        return format!("({} bytes, not shown)", line.len());
    }
    let shown = match value {
        None => name.to_string(),
        Some(value) if value.chars().count() <= VALUE_CHARS => format!("{name}={value}"),
        Some(_) => format!("{name}=…"),
    };
    format!("{shown:?}")
}

fn excerpt(s: &str) -> String {
    let mut out: String = s.chars().take(EXCERPT_CHARS).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// An upper bound on the length of [`format_get`]'s reply for `view`.
pub fn get_reply_capacity(view: &DeviceView) -> usize {
    // The longest possible lines: the key (77 bytes), port and fwmark, the
    // final errno; per peer two key lines, an endpoint, the counters and
    // keepalive (about 420 bytes); per allowed IP one line (at most 55).
    const DEVICE: usize = 256;
    const PEER: usize = 512;
    const ALLOWED_IP: usize = 64;
    view.peers.iter().fold(DEVICE, |total, peer| {
        total + PEER + ALLOWED_IP * peer.allowed_ips.len()
    })
}

/// Writes the reply to a successful `get`, ending with `errno=0` and the empty
/// line. The order is wireguard-go's. `out` receives the private key in hex;
/// zeroize it once it has been sent.
pub fn format_get(view: &DeviceView, out: &mut String) {
    if let Some(key) = view.private_key.as_ref().filter(|k| !k.is_zero()) {
        push_key_line(out, "private_key", &key.0);
    }
    if view.listen_port != 0 {
        push_line(out, "listen_port", view.listen_port);
    }
    if view.fwmark != 0 {
        push_line(out, "fwmark", view.fwmark);
    }
    for peer in &view.peers {
        push_key_line(out, "public_key", &peer.public_key.0);
        push_key_line(
            out,
            "preshared_key",
            peer.preshared_key.as_ref().map_or(&[0; 32], |k| &k.0),
        );
        push_line(out, "protocol_version", 1);
        if let Some(endpoint) = peer.endpoint {
            push_line(out, "endpoint", endpoint);
        }
        let (secs, nanos) = unix_time(peer.last_handshake);
        push_line(out, "last_handshake_time_sec", secs);
        push_line(out, "last_handshake_time_nsec", nanos);
        push_line(out, "tx_bytes", peer.tx_bytes);
        push_line(out, "rx_bytes", peer.rx_bytes);
        push_line(
            out,
            "persistent_keepalive_interval",
            peer.persistent_keepalive,
        );
        for net in &peer.allowed_ips {
            push_line(out, "allowed_ip", net.trunc());
        }
    }
    out.push_str("errno=0\n\n");
}

/// Writes `errno=N` and the empty line. Pass 0 for success or any errno,
/// such as [`UapiError::errno`]; the sign of `errno` is ignored and a failure
/// is always written negative, as wireguard-go does. `wg`'s `set` turns the
/// reply into `errno = -N` and prints `strerror` of it, so a positive value
/// would print "Unknown error -22". Its `get` reads only unsigned numbers and
/// reports any failure as EPROTO; every `get` `wg` sends succeeds, though.
pub fn format_errno(errno: i32, out: &mut String) {
    let negative = -i64::from(errno.unsigned_abs());
    // Writing to a String cannot fail.
    let _ = write!(out, "errno={negative}\n\n");
}

fn push_line(out: &mut String, key: &str, value: impl fmt::Display) {
    // Writing to a String cannot fail.
    let _ = writeln!(out, "{key}={value}");
}

fn push_key_line(out: &mut String, key: &str, bytes: &[u8; 32]) {
    out.push_str(key);
    out.push('=');
    push_hex(out, bytes);
    out.push('\n');
}

fn push_hex(out: &mut String, bytes: &[u8; 32]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

/// `wg` reads the seconds as a signed 64-bit number; clamp rather than wrap.
fn unix_time(t: Option<SystemTime>) -> (u64, u32) {
    const MAX_SECS: u64 = i64::MAX as u64;
    match t.and_then(|t| t.duration_since(UNIX_EPOCH).ok()) {
        Some(d) => (d.as_secs().min(MAX_SECS), d.subsec_nanos()),
        None => (0, 0),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
    use std::time::Duration;

    use ipnet::{Ipv4Net, Ipv6Net};
    use proptest::prelude::*;

    use super::*;

    const PRIV: &str = "e192cffe16d002aa4f891d813aaf7f27a5bc7fe769d1eed71294afa8dfc18d32";
    const PUB_A: &str = "7c2584951335e8060b7ca9090d7f4d80a155252522af9573641345e52d206446";
    const PUB_B: &str = "624d2b456276bf07292c32ecbf7c914fa2e2ad5389f4bd0a2aa54af72a0dd6c3";
    const PUB_C: &str = "bce58466861e9bcf9bebacc723d5809248fac1643aeb34e9f26f492fd5093e9a";
    const PSK: &str = "e5f00646d8587f1c670060bee076b831f522403232bb7f3d1751bdb7adbc85b8";
    const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn key(hex: &str) -> Key {
        key_from_hex(hex).expect("test key is valid hex")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("test prefix is valid")
    }

    fn add(s: &str) -> AllowedIpChange {
        AllowedIpChange {
            net: net(s),
            remove: false,
        }
    }

    fn del(s: &str) -> AllowedIpChange {
        AllowedIpChange {
            net: net(s),
            remove: true,
        }
    }

    /// Feeds `body` as it travels on the socket ("a\nb\n\n") and returns what
    /// each line produced.
    fn feed(p: &mut RequestParser, body: &str) -> Vec<Result<Option<Request>, UapiError>> {
        let body = body.strip_suffix('\n').expect("body ends with a newline");
        body.split('\n').map(|line| p.push_line(line)).collect()
    }

    fn parse_one(body: &str) -> Request {
        let mut p = RequestParser::new();
        let results = feed(&mut p, body);
        let (last, rest) = results.split_last().expect("at least one line");
        assert!(rest.iter().all(|r| *r == Ok(None)), "{results:?}");
        last.clone()
            .expect("request is valid")
            .expect("request is complete")
    }

    fn parse_set(body: &str) -> SetRequest {
        match parse_one(body) {
            Request::Set(set) => set,
            Request::Get => panic!("expected a set request"),
        }
    }

    fn assert_recovers(p: &mut RequestParser) {
        assert_eq!(p.push_line("get=1"), Ok(None));
        assert_eq!(p.push_line(""), Ok(Some(Request::Get)));
        let results = feed(p, "set=1\nlisten_port=1\n\n");
        let expected = SetRequest {
            listen_port: Some(1),
            ..SetRequest::default()
        };
        assert_eq!(results.last(), Some(&Ok(Some(Request::Set(expected)))));
    }

    /// Feeds a request that must fail on exactly one line, checks that the
    /// parser then serves the next requests, and returns the error.
    fn expect_error(body: &str) -> UapiError {
        let mut p = RequestParser::new();
        let results = feed(&mut p, body);
        assert!(
            results.iter().all(|r| matches!(r, Ok(None) | Err(_))),
            "no request may complete: {results:?}"
        );
        let mut errors = results.into_iter().filter_map(Result::err);
        let err = errors.next().expect("one line fails");
        assert_eq!(errors.next(), None, "only the first bad line is reported");
        assert_recovers(&mut p);
        err
    }

    fn peer(public_key: &str) -> PeerChange {
        PeerChange::new(key(public_key))
    }

    #[test]
    fn get_request() {
        assert_eq!(parse_one("get=1\n\n"), Request::Get);
    }

    #[test]
    fn empty_set_is_valid() {
        assert_eq!(parse_set("set=1\n\n"), SetRequest::default());
    }

    // wg set wg0 private-key k listen-port 51820 fwmark 0x1234 peer A
    //   preshared-key p endpoint 198.51.100.7:51820 persistent-keepalive 25
    //   allowed-ips 10.10.0.0/16,192.0.2.1/32,2001:db8:1::/48
    #[test]
    fn wg_set_request_body() {
        let body = format!(
            "set=1\n\
             private_key={PRIV}\n\
             listen_port=51820\n\
             fwmark=4660\n\
             public_key={PUB_A}\n\
             preshared_key={PSK}\n\
             endpoint=198.51.100.7:51820\n\
             persistent_keepalive_interval=25\n\
             replace_allowed_ips=true\n\
             allowed_ip=10.10.0.0/16\n\
             allowed_ip=192.0.2.1/32\n\
             allowed_ip=2001:db8:1::/48\n\
             \n"
        );
        let expected = SetRequest {
            private_key: Some(Some(key(PRIV))),
            listen_port: Some(51820),
            fwmark: Some(0x1234),
            replace_peers: false,
            peers: vec![PeerChange {
                preshared_key: Some(Some(key(PSK))),
                endpoint: Some("198.51.100.7:51820".parse().expect("addr")),
                persistent_keepalive: Some(25),
                replace_allowed_ips: true,
                allowed_ips: vec![
                    add("10.10.0.0/16"),
                    add("192.0.2.1/32"),
                    add("2001:db8:1::/48"),
                ],
                ..peer(PUB_A)
            }],
        };
        assert_eq!(parse_set(&body), expected);
    }

    // wg setconf: replace_peers, a v6 endpoint, keepalive off.
    #[test]
    fn wg_setconf_body() {
        let body = format!(
            "set=1\n\
             private_key={PRIV}\n\
             listen_port=51820\n\
             replace_peers=true\n\
             public_key={PUB_A}\n\
             endpoint=[2001:db8::7]:51820\n\
             persistent_keepalive_interval=0\n\
             replace_allowed_ips=true\n\
             allowed_ip=10.0.0.2/32\n\
             allowed_ip=fd00:1::2/128\n\
             public_key={PUB_B}\n\
             replace_allowed_ips=true\n\
             allowed_ip=172.22.101.0/24\n\
             \n"
        );
        let set = parse_set(&body);
        assert!(set.replace_peers);
        assert_eq!(set.fwmark, None);
        assert_eq!(
            set.peers,
            vec![
                PeerChange {
                    endpoint: Some(SocketAddr::V6(SocketAddrV6::new(
                        "2001:db8::7".parse().expect("addr"),
                        51820,
                        0,
                        0
                    ))),
                    persistent_keepalive: Some(0),
                    replace_allowed_ips: true,
                    allowed_ips: vec![add("10.0.0.2/32"), add("fd00:1::2/128")],
                    ..peer(PUB_A)
                },
                PeerChange {
                    replace_allowed_ips: true,
                    allowed_ips: vec![add("172.22.101.0/24")],
                    ..peer(PUB_B)
                },
            ]
        );
    }

    // wg syncconf: a peer gone from the file is removed, a kept peer loses its
    // preshared key, fwmark is cleared.
    #[test]
    fn wg_syncconf_body() {
        let body = format!(
            "set=1\n\
             fwmark=0\n\
             public_key={PUB_C}\n\
             remove=true\n\
             public_key={PUB_A}\n\
             preshared_key={ZERO}\n\
             endpoint=203.0.113.9:51820\n\
             replace_allowed_ips=true\n\
             allowed_ip=10.164.0.0/20\n\
             \n"
        );
        let set = parse_set(&body);
        assert_eq!(set.private_key, None);
        assert_eq!(set.fwmark, Some(0));
        assert_eq!(
            set.peers,
            vec![
                PeerChange {
                    remove: true,
                    ..peer(PUB_C)
                },
                PeerChange {
                    preshared_key: Some(None),
                    endpoint: Some("203.0.113.9:51820".parse().expect("addr")),
                    replace_allowed_ips: true,
                    allowed_ips: vec![add("10.164.0.0/20")],
                    ..peer(PUB_A)
                },
            ]
        );
    }

    // wg set wg0 peer A allowed-ips -10.1.0.0/16,+10.2.0.0/16,-fd00::/64
    #[test]
    fn allowed_ip_removals() {
        let body = format!(
            "set=1\npublic_key={PUB_A}\n\
             allowed_ip=-10.1.0.0/16\nallowed_ip=10.2.0.0/16\nallowed_ip=-fd00::/64\n\n"
        );
        let set = parse_set(&body);
        assert_eq!(
            set.peers[0].allowed_ips,
            vec![del("10.1.0.0/16"), add("10.2.0.0/16"), del("fd00::/64")]
        );
        assert!(!set.peers[0].replace_allowed_ips);
    }

    #[test]
    fn update_only_and_protocol_version() {
        let body = format!(
            "set=1\npublic_key={PUB_B}\nupdate_only=true\nprotocol_version=1\n\
             endpoint=192.0.2.10:4500\n\n"
        );
        let set = parse_set(&body);
        assert_eq!(
            set.peers,
            vec![PeerChange {
                update_only: true,
                endpoint: Some("192.0.2.10:4500".parse().expect("addr")),
                ..peer(PUB_B)
            }]
        );
    }

    #[test]
    fn zero_private_key_clears() {
        let set = parse_set(&format!("set=1\nprivate_key={ZERO}\n\n"));
        assert_eq!(set.private_key, Some(None));
    }

    #[test]
    fn host_bits_are_cleared() {
        let body = format!(
            "set=1\npublic_key={PUB_A}\nallowed_ip=10.1.2.3/8\nallowed_ip=-2001:db8::1/32\n\n"
        );
        let set = parse_set(&body);
        assert_eq!(
            set.peers[0].allowed_ips,
            vec![add("10.0.0.0/8"), del("2001:db8::/32")]
        );
    }

    #[test]
    fn scoped_ipv6_endpoint() {
        let body = format!("set=1\npublic_key={PUB_A}\nendpoint=[fe80::1%2]:51820\n\n");
        let set = parse_set(&body);
        let expected = SocketAddrV6::new("fe80::1".parse().expect("addr"), 51820, 0, 2);
        assert_eq!(set.peers[0].endpoint, Some(SocketAddr::V6(expected)));

        let err = expect_error(&format!(
            "set=1\npublic_key={PUB_A}\nendpoint=[fe80::1%eth0]:51820\n\n"
        ));
        assert!(
            matches!(err, UapiError::BadEndpoint { reason, .. } if reason.contains("scope")),
            "{err:?}"
        );
    }

    #[test]
    fn later_values_win_and_repeated_peers_are_kept_in_order() {
        let body = format!(
            "set=1\nlisten_port=1\nlisten_port=2\nprivate_key={PRIV}\nprivate_key={ZERO}\n\
             public_key={PUB_A}\npersistent_keepalive_interval=5\npersistent_keepalive_interval=0\n\
             public_key={PUB_B}\npublic_key={PUB_A}\nendpoint=192.0.2.1:1\n\n"
        );
        let set = parse_set(&body);
        assert_eq!(set.listen_port, Some(2));
        assert_eq!(set.private_key, Some(None));
        assert_eq!(
            set.peers,
            vec![
                PeerChange {
                    persistent_keepalive: Some(0),
                    ..peer(PUB_A)
                },
                peer(PUB_B),
                PeerChange {
                    endpoint: Some("192.0.2.1:1".parse().expect("addr")),
                    ..peer(PUB_A)
                },
            ]
        );
    }

    #[test]
    fn uppercase_hex_is_accepted() {
        let body = format!("set=1\npublic_key={}\n\n", PUB_A.to_uppercase());
        assert_eq!(parse_set(&body).peers, vec![peer(PUB_A)]);
    }

    #[test]
    fn fwmark_forms() {
        for (value, mark) in [
            ("0", 0),
            ("51820", 51820),
            ("4294967295", u32::MAX),
            ("0x1234", 0x1234),
            ("0XfFfFfFfF", u32::MAX),
        ] {
            let set = parse_set(&format!("set=1\nfwmark={value}\n\n"));
            assert_eq!(set.fwmark, Some(mark), "{value}");
        }
    }

    #[test]
    fn replace_allowed_ips_discards_earlier_lines_of_the_same_peer() {
        let body = format!(
            "set=1\npublic_key={PUB_A}\nallowed_ip=10.0.0.0/8\nreplace_allowed_ips=true\n\
             allowed_ip=10.1.0.0/16\n\n"
        );
        let set = parse_set(&body);
        assert!(set.peers[0].replace_allowed_ips);
        assert_eq!(set.peers[0].allowed_ips, vec![add("10.1.0.0/16")]);
    }

    #[test]
    fn lines_after_remove_are_still_validated() {
        let err = expect_error(&format!(
            "set=1\npublic_key={PUB_A}\nremove=true\nallowed_ip=10.0.0.0/33\n\n"
        ));
        assert!(matches!(err, UapiError::BadAllowedIp { .. }), "{err:?}");
    }

    #[test]
    fn several_requests_on_one_connection() {
        let mut p = RequestParser::new();
        let body = format!("get=1\n\nset=1\npublic_key={PUB_A}\nremove=true\n\nget=1\n\n");
        let done: Vec<Request> = feed(&mut p, &body)
            .into_iter()
            .filter_map(|r| r.expect("every line is valid"))
            .collect();
        let removal = SetRequest {
            peers: vec![PeerChange {
                remove: true,
                ..peer(PUB_A)
            }],
            ..SetRequest::default()
        };
        assert_eq!(
            done,
            vec![Request::Get, Request::Set(removal), Request::Get]
        );
    }

    #[test]
    fn bad_hex() {
        let bad = format!("{}g", &PRIV[..63]);
        for body in [
            format!("set=1\nprivate_key={bad}\n\n"),
            format!("set=1\npublic_key={bad}\n\n"),
            format!("set=1\npublic_key={PUB_A}\npreshared_key={bad}\n\n"),
            format!("set=1\nprivate_key={}\n\n", "é".repeat(32)),
        ] {
            let err = expect_error(&body);
            assert!(matches!(err, UapiError::KeyNotHex { .. }), "{err:?}");
            assert_eq!(err.errno(), EINVAL);
        }
    }

    #[test]
    fn wrong_key_length() {
        for (value, len) in [(&PRIV[..63], 63), (&format!("{PRIV}0")[..], 65), ("", 0)] {
            for field in ["private_key", "public_key"] {
                let err = expect_error(&format!("set=1\n{field}={value}\n\n"));
                assert_eq!(err, UapiError::KeyLength { field, len });
            }
        }
    }

    #[test]
    fn zero_public_key_is_rejected() {
        let err = expect_error(&format!("set=1\npublic_key={ZERO}\n\n"));
        assert_eq!(err, UapiError::ZeroPublicKey);
        assert_eq!(err.errno(), EINVAL);
    }

    #[test]
    fn unknown_keys() {
        let err = expect_error("set=1\nlisten-port=51820\n\n");
        assert_eq!(err, UapiError::UnknownDeviceKey("\"listen-port\"".into()));
        let err = expect_error(&format!("set=1\npublic_key={PUB_A}\nrx_bytes=5\n\n"));
        assert_eq!(err, UapiError::UnknownPeerKey("\"rx_bytes\"".into()));
        assert_eq!(err.errno(), EINVAL);
    }

    #[test]
    fn device_key_after_a_peer() {
        for line in [
            format!("private_key={PRIV}"),
            "listen_port=1".into(),
            "fwmark=1".into(),
            "replace_peers=true".into(),
        ] {
            let err = expect_error(&format!("set=1\npublic_key={PUB_A}\n{line}\n\n"));
            assert!(matches!(err, UapiError::DeviceKeyAfterPeer(_)), "{err:?}");
            assert_eq!(err.errno(), EINVAL);
        }
    }

    #[test]
    fn peer_key_before_any_peer() {
        for line in [
            "endpoint=192.0.2.1:1",
            "allowed_ip=10.0.0.0/8",
            "protocol_version=1",
        ] {
            let err = expect_error(&format!("set=1\n{line}\n\n"));
            assert!(
                matches!(err, UapiError::PeerKeyBeforePublicKey(_)),
                "{err:?}"
            );
        }
    }

    #[test]
    fn bad_protocol_version() {
        for value in ["2", "", "01", "1 "] {
            let err = expect_error(&format!(
                "set=1\npublic_key={PUB_A}\nprotocol_version={value}\n\n"
            ));
            assert_eq!(err, UapiError::BadProtocolVersion(value.into()));
            assert_eq!(err.errno(), EINVAL);
        }
    }

    #[test]
    fn bad_cidr() {
        for value in [
            "10.0.0.0/33",
            "fd00::/129",
            "10.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/-1",
            "10.0.0.0/+8",
            "10.0.0.0/8/8",
            "10.0.0.0/ 8",
            "fe80::1%2/64",
            "--10.0.0.0/8",
            "example.com/32",
            "/8",
            "-",
            "",
        ] {
            let err = expect_error(&format!(
                "set=1\npublic_key={PUB_A}\nallowed_ip={value}\n\n"
            ));
            assert!(
                matches!(err, UapiError::BadAllowedIp { .. }),
                "{value}: {err:?}"
            );
            assert_eq!(err.errno(), EINVAL);
        }
    }

    #[test]
    fn bare_ip_is_rejected() {
        for value in ["10.0.0.1", "-10.0.0.1", "2001:db8::1"] {
            let err = expect_error(&format!(
                "set=1\npublic_key={PUB_A}\nallowed_ip={value}\n\n"
            ));
            assert!(
                matches!(err, UapiError::BadAllowedIp { reason, .. } if reason.contains("prefix-length")),
                "{value}: {err:?}"
            );
        }
    }

    #[test]
    fn numbers_out_of_range() {
        for value in [
            "65536",
            "-1",
            "+1",
            " 1",
            "1 ",
            "",
            "0x10",
            "99999999999999999999999",
        ] {
            let err = expect_error(&format!("set=1\nlisten_port={value}\n\n"));
            assert!(
                matches!(
                    err,
                    UapiError::BadNumber {
                        key: "listen_port",
                        max: 65535,
                        ..
                    }
                ),
                "{value}: {err:?}"
            );
            let err = expect_error(&format!(
                "set=1\npublic_key={PUB_A}\npersistent_keepalive_interval={value}\n\n"
            ));
            assert!(
                matches!(err, UapiError::BadNumber { .. }),
                "{value}: {err:?}"
            );
        }
        for value in ["4294967296", "0x", "0x100000000", "0x+1", "-0", "0xg"] {
            let err = expect_error(&format!("set=1\nfwmark={value}\n\n"));
            assert!(
                matches!(err, UapiError::BadNumber { key: "fwmark", .. }),
                "{value}: {err:?}"
            );
        }
    }

    #[test]
    fn bad_endpoints() {
        for value in [
            "192.0.2.1:65536",
            "192.0.2.1",
            "192.0.2.1:",
            "example.com:51820",
            "2001:db8::1:51820",
            "[2001:db8::1]",
            "[2001:db8::1]:",
            "[192.0.2.1]:51820",
            "192.0.2.1:+1",
            "",
        ] {
            let err = expect_error(&format!("set=1\npublic_key={PUB_A}\nendpoint={value}\n\n"));
            assert!(
                matches!(err, UapiError::BadEndpoint { .. }),
                "{value}: {err:?}"
            );
            assert_eq!(err.errno(), EINVAL);
        }
    }

    #[test]
    fn flags_accept_only_true() {
        for (line, key) in [
            ("replace_peers=false", "replace_peers"),
            ("replace_peers=", "replace_peers"),
        ] {
            let err = expect_error(&format!("set=1\n{line}\n\n"));
            assert!(
                matches!(err, UapiError::NotTrue { key: k, .. } if k == key),
                "{err:?}"
            );
        }
        for (line, key) in [
            ("remove=1", "remove"),
            ("update_only=yes", "update_only"),
            ("replace_allowed_ips=True", "replace_allowed_ips"),
        ] {
            let err = expect_error(&format!("set=1\npublic_key={PUB_A}\n{line}\n\n"));
            assert!(
                matches!(err, UapiError::NotTrue { key: k, .. } if k == key),
                "{err:?}"
            );
        }
    }

    #[test]
    fn overlong_line() {
        let long = format!("allowed_ip={}", "1".repeat(MAX_LINE_LEN));
        let err = expect_error(&format!("set=1\npublic_key={PUB_A}\n{long}\n\n"));
        assert_eq!(err, UapiError::LineTooLong { len: long.len() });
        assert_eq!(err.errno(), EMSGSIZE);

        let err = expect_error(&format!("{}\n\n", "g".repeat(MAX_LINE_LEN + 1)));
        assert!(matches!(err, UapiError::LineTooLong { .. }), "{err:?}");

        // A line of exactly the limit is judged on its content.
        let at_limit = "x".repeat(MAX_LINE_LEN);
        let err = expect_error(&format!("set=1\n{at_limit}\n\n"));
        assert!(matches!(err, UapiError::MissingEquals(_)), "{err:?}");
    }

    #[test]
    fn missing_first_line() {
        let err = expect_error("\n");
        assert_eq!(err, UapiError::MissingOperation);
        assert_eq!(err.errno(), EPROTO);
    }

    #[test]
    fn garbage_first_line() {
        for line in [
            "hello",
            "get=2",
            "set=1 ",
            "GET=1",
            "get=1\r",
            "listen_port=1",
            "get",
        ] {
            let err = expect_error(&format!("{line}\n\n"));
            assert_eq!(err, UapiError::UnknownOperation(format!("{line:?}")));
            assert_eq!(err.errno(), EINVAL);
        }
    }

    #[test]
    fn get_must_be_followed_by_an_empty_line() {
        let err = expect_error("get=1\nlisten_port=1\n\n");
        assert!(matches!(err, UapiError::TrailingGetLine(_)), "{err:?}");
        assert_eq!(err.errno(), EINVAL);
    }

    #[test]
    fn line_without_equals() {
        let err = expect_error("set=1\nlisten_port\n\n");
        assert_eq!(err, UapiError::MissingEquals("\"listen_port\"".into()));
        assert_eq!(err.errno(), EPROTO);
    }

    #[test]
    fn invalid_utf8() {
        let mut p = RequestParser::new();
        assert_eq!(p.push_line_bytes(b"set=1"), Ok(None));
        assert_eq!(
            p.push_line_bytes(b"listen_port=\xff"),
            Err(UapiError::NotUtf8)
        );
        assert_eq!(p.push_line_bytes(b"also \xff ignored"), Ok(None));
        assert_eq!(p.push_line_bytes(b""), Ok(None));
        assert_recovers(&mut p);
        assert_eq!(UapiError::NotUtf8.errno(), EPROTO);
    }

    #[test]
    fn error_messages_quote_a_short_excerpt() {
        let err = expect_error(&format!("set=1\n{}=1\n\n", "k".repeat(1000)));
        assert_eq!(
            err,
            UapiError::UnknownDeviceKey("(1000 bytes, not shown)".into())
        );
        let err = expect_error(&format!(
            "set=1\npublic_key={PUB_A}\nendpoint={}\n\n",
            "1".repeat(1000)
        ));
        assert!(err.to_string().chars().count() < 200, "{err}");
    }

    #[test]
    fn get_reply_fits_its_capacity_at_the_longest() {
        let peer = PeerView {
            public_key: key(PUB_A),
            preshared_key: Some(key(PSK)),
            endpoint: Some(
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535"
                    .parse()
                    .expect("addr"),
            ),
            persistent_keepalive: u16::MAX,
            last_handshake: Some(UNIX_EPOCH + Duration::new(i64::MAX as u64, 999_999_999)),
            rx_bytes: u64::MAX,
            tx_bytes: u64::MAX,
            allowed_ips: vec![net("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120"); 3],
        };
        let view = DeviceView {
            private_key: Some(key(PRIV)),
            listen_port: u16::MAX,
            fwmark: u32::MAX,
            peers: vec![peer.clone(), peer],
        };
        let mut out = String::new();
        format_get(&view, &mut out);
        assert!(out.len() <= get_reply_capacity(&view), "{}", out.len());
    }

    #[test]
    fn lines_out_of_place_do_not_quote_keys() {
        let lines = [
            format!("private_key={PRIV}\n\n"),
            format!("get=1\nprivate_key={PRIV}\n\n"),
            format!("set=1\nprivate_key {PRIV}\n\n"),
            format!("set=1\nprivate_key:{PRIV}\n\n"),
            format!("set=1\n{PRIV}=1\n\n"),
            format!("set=1\nprivate_kye={PRIV}\n\n"),
            format!("set=1\npublic_key={PUB_A}\n{PRIV}\n\n"),
            format!("set=1\npublic_key={PUB_A}\nprivate_key={PRIV}\n\n"),
            format!("set=1\npreshared_key={PRIV}\n\n"),
        ];
        for request in &lines {
            let err = expect_error(request).to_string();
            assert!(!err.contains(&PRIV[..8]), "{err}");
        }
        let err = expect_error(&format!("private_key={PRIV}\n\n"));
        assert_eq!(err, UapiError::UnknownOperation("\"private_key=…\"".into()));
    }

    #[test]
    fn key_errors_do_not_quote_key_material() {
        let bad = format!("{}g", &PRIV[..63]);
        let err = expect_error(&format!("set=1\nprivate_key={bad}\n\n"));
        assert!(!err.to_string().contains(&PRIV[..63]), "{err}");
    }

    #[test]
    fn too_many_peers() {
        let mut p = RequestParser::new();
        let line = format!("public_key={PUB_A}");
        assert_eq!(p.push_line("set=1"), Ok(None));
        for _ in 0..MAX_PEERS {
            assert_eq!(p.push_line(&line), Ok(None));
        }
        assert_eq!(p.push_line(&line), Err(UapiError::TooManyPeers));
        assert_eq!(p.push_line(""), Ok(None));
        assert_recovers(&mut p);
        assert_eq!(UapiError::TooManyPeers.errno(), E2BIG);
    }

    #[test]
    fn too_many_allowed_ips_across_peers() {
        let mut p = RequestParser::new();
        assert_eq!(p.push_line("set=1"), Ok(None));
        assert_eq!(p.push_line(&format!("public_key={PUB_A}")), Ok(None));
        for _ in 0..MAX_ALLOWED_IPS / 2 {
            assert_eq!(p.push_line("allowed_ip=10.0.0.0/8"), Ok(None));
        }
        assert_eq!(p.push_line(&format!("public_key={PUB_B}")), Ok(None));
        for _ in 0..MAX_ALLOWED_IPS / 2 {
            assert_eq!(p.push_line("allowed_ip=10.0.0.0/8"), Ok(None));
        }
        assert_eq!(
            p.push_line("allowed_ip=10.0.0.0/8"),
            Err(UapiError::TooManyAllowedIps)
        );
        assert_eq!(p.push_line(""), Ok(None));
        assert_recovers(&mut p);
        assert_eq!(UapiError::TooManyAllowedIps.errno(), E2BIG);
    }

    #[test]
    fn key_basics() {
        let k = key(PRIV);
        assert_eq!(key_to_hex(&k), PRIV);
        assert_eq!(format!("{k:?}"), "Key(..)");
        assert!(!format!("{:?}", Some(Some(k.clone()))).contains("e1"));
        assert!(key(ZERO).is_zero());
        assert!(!k.is_zero());
        let mut last_differs = k.clone();
        last_differs.0[31] ^= 1;
        assert_ne!(k, last_differs);
        assert_eq!(k, k.clone());
        assert_eq!(
            key_from_hex("12"),
            Err(UapiError::KeyLength {
                field: "key",
                len: 2
            })
        );
    }

    #[test]
    fn format_get_exact_text() {
        let view = DeviceView {
            private_key: Some(key(PRIV)),
            listen_port: 51820,
            fwmark: 0,
            peers: vec![
                PeerView {
                    public_key: key(PUB_A),
                    preshared_key: Some(key(PSK)),
                    endpoint: Some("198.51.100.7:51820".parse().expect("addr")),
                    persistent_keepalive: 25,
                    last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)),
                    rx_bytes: 1024,
                    tx_bytes: 2048,
                    allowed_ips: vec![net("10.10.0.0/16"), net("2001:db8:1::/48")],
                },
                PeerView {
                    public_key: key(PUB_B),
                    preshared_key: None,
                    endpoint: Some("[2001:db8::7]:51820".parse().expect("addr")),
                    persistent_keepalive: 0,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    allowed_ips: vec![],
                },
                PeerView {
                    public_key: key(PUB_C),
                    preshared_key: None,
                    endpoint: None,
                    persistent_keepalive: 0,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    allowed_ips: vec![net("172.22.101.7/24")],
                },
            ],
        };
        let mut out = String::new();
        format_get(&view, &mut out);
        let expected = format!(
            "private_key={PRIV}\n\
             listen_port=51820\n\
             public_key={PUB_A}\n\
             preshared_key={PSK}\n\
             protocol_version=1\n\
             endpoint=198.51.100.7:51820\n\
             last_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=123456789\n\
             tx_bytes=2048\n\
             rx_bytes=1024\n\
             persistent_keepalive_interval=25\n\
             allowed_ip=10.10.0.0/16\n\
             allowed_ip=2001:db8:1::/48\n\
             public_key={PUB_B}\n\
             preshared_key={ZERO}\n\
             protocol_version=1\n\
             endpoint=[2001:db8::7]:51820\n\
             last_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\n\
             tx_bytes=0\n\
             rx_bytes=0\n\
             persistent_keepalive_interval=0\n\
             public_key={PUB_C}\n\
             preshared_key={ZERO}\n\
             protocol_version=1\n\
             last_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\n\
             tx_bytes=0\n\
             rx_bytes=0\n\
             persistent_keepalive_interval=0\n\
             allowed_ip=172.22.101.0/24\n\
             errno=0\n\
             \n"
        );
        assert_eq!(out, expected);
    }

    #[test]
    fn format_get_leaves_out_unset_device_fields() {
        let mut out = String::new();
        format_get(&DeviceView::default(), &mut out);
        assert_eq!(out, "errno=0\n\n");

        let view = DeviceView {
            private_key: Some(key(ZERO)),
            fwmark: 0x1234,
            ..DeviceView::default()
        };
        let mut out = String::new();
        format_get(&view, &mut out);
        assert_eq!(out, "fwmark=4660\nerrno=0\n\n");
    }

    #[test]
    fn handshake_before_the_epoch_reads_as_never() {
        let before = UNIX_EPOCH
            .checked_sub(Duration::from_secs(1))
            .expect("the platform represents times before 1970");
        assert_eq!(unix_time(Some(before)), (0, 0));
        assert_eq!(unix_time(None), (0, 0));
    }

    #[test]
    fn errno_replies() {
        let reply = |n| {
            let mut out = String::new();
            format_errno(n, &mut out);
            out
        };
        assert_eq!(reply(0), "errno=0\n\n");
        assert_eq!(reply(EINVAL), "errno=-22\n\n");
        assert_eq!(reply(-EINVAL), "errno=-22\n\n");
        assert_eq!(reply(i32::MIN), "errno=-2147483648\n\n");
        assert_eq!(reply(UapiError::ZeroPublicKey.errno()), "errno=-22\n\n");
    }

    // ---- property tests ----

    fn arb_key() -> impl Strategy<Value = Key> {
        any::<[u8; 32]>().prop_map(Key)
    }

    fn arb_nonzero_key() -> impl Strategy<Value = Key> {
        arb_key().prop_filter("non-zero", |k| !k.is_zero())
    }

    fn arb_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(a, len)| {
                IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), len).expect("len <= 32"))
            }),
            (any::<u128>(), 0u8..=128).prop_map(|(a, len)| {
                IpNet::V6(Ipv6Net::new(Ipv6Addr::from(a), len).expect("len <= 128"))
            }),
        ]
    }

    fn arb_endpoint() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<u32>(), any::<u16>())
                .prop_map(|(a, port)| SocketAddr::V4(SocketAddrV4::new(a.into(), port))),
            (
                any::<u128>(),
                any::<u16>(),
                prop_oneof![Just(0u32), any::<u32>()]
            )
                .prop_map(|(a, port, scope)| SocketAddr::V6(SocketAddrV6::new(
                    a.into(),
                    port,
                    0,
                    scope
                ))),
        ]
    }

    fn arb_peer_change() -> impl Strategy<Value = PeerChange> {
        (
            arb_nonzero_key(),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(proptest::option::of(arb_nonzero_key())),
            proptest::option::of(arb_endpoint()),
            proptest::option::of(any::<u16>()),
            any::<bool>(),
            proptest::collection::vec(
                (arb_net(), any::<bool>()).prop_map(|(net, remove)| AllowedIpChange {
                    net: net.trunc(),
                    remove,
                }),
                0..6,
            ),
        )
            .prop_map(
                |(
                    public_key,
                    remove,
                    update_only,
                    preshared_key,
                    endpoint,
                    persistent_keepalive,
                    replace_allowed_ips,
                    allowed_ips,
                )| PeerChange {
                    public_key,
                    remove,
                    update_only,
                    preshared_key,
                    endpoint,
                    persistent_keepalive,
                    replace_allowed_ips,
                    allowed_ips,
                },
            )
    }

    fn arb_set_request() -> impl Strategy<Value = SetRequest> {
        (
            proptest::option::of(proptest::option::of(arb_nonzero_key())),
            proptest::option::of(any::<u16>()),
            proptest::option::of(any::<u32>()),
            any::<bool>(),
            proptest::collection::vec(arb_peer_change(), 0..5),
        )
            .prop_map(|(private_key, listen_port, fwmark, replace_peers, peers)| {
                SetRequest {
                    private_key,
                    listen_port,
                    fwmark,
                    replace_peers,
                    peers,
                }
            })
    }

    /// A set body in the order `wg` writes one (ipc-uapi.h), plus
    /// `update_only`, which `wg` never sends but other clients do.
    fn wg_set_body(req: &SetRequest) -> String {
        let mut s = String::from("set=1\n");
        let hex_or_zero = |k: &Option<Key>| k.as_ref().map_or(ZERO.to_string(), key_to_hex);
        if let Some(k) = &req.private_key {
            s += &format!("private_key={}\n", hex_or_zero(k));
        }
        if let Some(port) = req.listen_port {
            s += &format!("listen_port={port}\n");
        }
        if let Some(mark) = req.fwmark {
            s += &format!("fwmark={mark}\n");
        }
        if req.replace_peers {
            s += "replace_peers=true\n";
        }
        for peer in &req.peers {
            s += &format!("public_key={}\n", key_to_hex(&peer.public_key));
            if peer.update_only {
                s += "update_only=true\n";
            }
            if peer.remove {
                s += "remove=true\n";
            }
            if let Some(k) = &peer.preshared_key {
                s += &format!("preshared_key={}\n", hex_or_zero(k));
            }
            if let Some(endpoint) = peer.endpoint {
                s += &format!("endpoint={endpoint}\n");
            }
            if let Some(secs) = peer.persistent_keepalive {
                s += &format!("persistent_keepalive_interval={secs}\n");
            }
            if peer.replace_allowed_ips {
                s += "replace_allowed_ips=true\n";
            }
            for change in &peer.allowed_ips {
                let sign = if change.remove { "-" } else { "" };
                s += &format!("allowed_ip={sign}{}\n", change.net);
            }
        }
        s + "\n"
    }

    const PEER_ORDER: [&str; 9] = [
        "preshared_key",
        "protocol_version",
        "endpoint",
        "last_handshake_time_sec",
        "last_handshake_time_nsec",
        "tx_bytes",
        "rx_bytes",
        "persistent_keepalive_interval",
        "allowed_ip",
    ];

    /// Reads a get reply the way `wg` does (ipc-uapi.h), and also checks that
    /// keys come in wireguard-go's order and that no per-peer key is missing.
    fn read_get_reply(text: &str) -> DeviceView {
        let body = text
            .strip_suffix("errno=0\n\n")
            .expect("reply ends with errno=0 and an empty line");
        let mut view = DeviceView::default();
        let mut device_rank = 0;
        let mut seen: Vec<Vec<&str>> = Vec::new();
        let mut handshakes: Vec<(u64, u32)> = Vec::new();
        for line in body.lines() {
            let (k, v) = line.split_once('=').expect("key=value");
            if k == "public_key" {
                view.peers.push(PeerView {
                    public_key: key_from_hex(v).expect("public key"),
                    preshared_key: None,
                    endpoint: None,
                    persistent_keepalive: 0,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    allowed_ips: Vec::new(),
                });
                seen.push(Vec::new());
                handshakes.push((0, 0));
                continue;
            }
            let (Some(peer), Some(keys), Some(hs)) = (
                view.peers.last_mut(),
                seen.last_mut(),
                handshakes.last_mut(),
            ) else {
                let rank = ["private_key", "listen_port", "fwmark"]
                    .iter()
                    .position(|&d| d == k)
                    .expect("known device key");
                assert!(rank >= device_rank, "device keys out of order");
                device_rank = rank + 1;
                match k {
                    "private_key" => view.private_key = Some(key(v)),
                    "listen_port" => view.listen_port = v.parse().expect("port"),
                    _ => view.fwmark = v.parse().expect("fwmark"),
                }
                continue;
            };
            let rank = PEER_ORDER
                .iter()
                .position(|&p| p == k)
                .expect("known peer key");
            if let Some(prev) = keys.last() {
                let prev_rank = PEER_ORDER.iter().position(|p| p == prev).expect("known");
                assert!(
                    rank > prev_rank || (rank == prev_rank && k == "allowed_ip"),
                    "{k} after {prev}"
                );
            }
            keys.push(k);
            match k {
                "preshared_key" => peer.preshared_key = Some(key(v)).filter(|k| !k.is_zero()),
                "protocol_version" => assert_eq!(v, "1"),
                "endpoint" => peer.endpoint = Some(v.parse().expect("endpoint")),
                "last_handshake_time_sec" => hs.0 = v.parse().expect("secs"),
                "last_handshake_time_nsec" => hs.1 = v.parse().expect("nsecs"),
                "tx_bytes" => peer.tx_bytes = v.parse().expect("tx"),
                "rx_bytes" => peer.rx_bytes = v.parse().expect("rx"),
                "persistent_keepalive_interval" => {
                    peer.persistent_keepalive = v.parse().expect("keepalive")
                }
                _ => peer.allowed_ips.push(v.parse().expect("prefix")),
            }
        }
        for (keys, (peer, hs)) in seen.iter().zip(view.peers.iter_mut().zip(&handshakes)) {
            for required in PEER_ORDER
                .iter()
                .filter(|&&k| k != "endpoint" && k != "allowed_ip")
            {
                assert!(keys.contains(required), "{required} missing");
            }
            if *hs != (0, 0) {
                peer.last_handshake = Some(UNIX_EPOCH + Duration::new(hs.0, hs.1));
            }
        }
        view
    }

    fn arb_peer_view() -> impl Strategy<Value = PeerView> {
        (
            arb_key(),
            proptest::option::of(arb_key()),
            proptest::option::of(arb_endpoint()),
            any::<u16>(),
            proptest::option::of((1u64..1 << 40, 0u32..1_000_000_000)),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(arb_net(), 0..5),
        )
            .prop_map(
                |(public_key, preshared_key, endpoint, keepalive, hs, rx, tx, allowed_ips)| {
                    PeerView {
                        public_key,
                        preshared_key,
                        endpoint,
                        persistent_keepalive: keepalive,
                        last_handshake: hs.map(|(s, n)| UNIX_EPOCH + Duration::new(s, n)),
                        rx_bytes: rx,
                        tx_bytes: tx,
                        allowed_ips,
                    }
                },
            )
    }

    fn arb_device_view() -> impl Strategy<Value = DeviceView> {
        (
            proptest::option::of(prop_oneof![Just(Key([0; 32])), arb_key()]),
            any::<u16>(),
            any::<u32>(),
            proptest::collection::vec(arb_peer_view(), 0..6),
        )
            .prop_map(|(private_key, listen_port, fwmark, peers)| DeviceView {
                private_key,
                listen_port,
                fwmark,
                peers,
            })
    }

    const KNOWN_KEYS: [&str; 16] = [
        "private_key",
        "listen_port",
        "fwmark",
        "replace_peers",
        "public_key",
        "public_key",
        "public_key",
        "update_only",
        "remove",
        "preshared_key",
        "endpoint",
        "persistent_keepalive_interval",
        "replace_allowed_ips",
        "allowed_ip",
        "allowed_ip",
        "protocol_version",
    ];

    /// Lines close enough to valid to get past the first checks.
    fn arb_near_valid_line() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            "[0-9a-fA-F]{64}",
            "[0-9a-f]{0,66}",
            Just(ZERO.to_string()),
            "-?[0-9]{1,3}(\\.[0-9]{1,3}){3}/[0-9]{1,3}",
            "-?[0-9a-f:]{2,20}/[0-9]{1,3}",
            "\\[[0-9a-f:%]{2,24}\\]:[0-9]{1,6}",
            "[0-9]{1,3}(\\.[0-9]{1,3}){3}:[0-9]{1,6}",
            "[0-9x+-]{0,12}",
            Just("true".to_string()),
            Just("1".to_string()),
            ".{0,20}",
        ];
        prop_oneof![
            8 => (proptest::sample::select(&KNOWN_KEYS[..]), value)
                .prop_map(|(k, v)| format!("{k}={v}")),
            1 => Just("get=1".to_string()),
            2 => Just("set=1".to_string()),
            2 => Just(String::new()),
            1 => ".{0,30}",
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            lines in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..40)
        ) {
            let mut p = RequestParser::new();
            for line in &lines {
                let _ = p.push_line_bytes(line);
            }
            let _ = p.push_line("");
            prop_assert_eq!(p.push_line("get=1"), Ok(None));
            prop_assert_eq!(p.push_line(""), Ok(Some(Request::Get)));
        }

        #[test]
        fn near_valid_lines_never_panic_and_results_reformat(
            lines in proptest::collection::vec(arb_near_valid_line(), 0..60)
        ) {
            let mut p = RequestParser::new();
            for line in &lines {
                if let Ok(Some(Request::Set(set))) = p.push_line(line) {
                    for peer in &set.peers {
                        prop_assert!(!peer.public_key.is_zero());
                        for change in &peer.allowed_ips {
                            prop_assert_eq!(change.net, change.net.trunc());
                        }
                    }
                    prop_assert_eq!(parse_set(&wg_set_body(&set)), set);
                }
            }
            let _ = p.push_line("");
            prop_assert_eq!(p.push_line("get=1"), Ok(None));
            prop_assert_eq!(p.push_line(""), Ok(Some(Request::Get)));
        }

        #[test]
        fn mutated_wg_bodies_never_panic_and_results_reformat(
            req in arb_set_request(),
            mutations in proptest::collection::vec(
                (any::<proptest::sample::Index>(), 0u8..4, arb_near_valid_line()),
                0..4,
            ),
        ) {
            let body = wg_set_body(&req);
            let mut lines: Vec<&str> = body.lines().collect();
            prop_assert_eq!(lines.pop(), Some(""));
            for (at, op, noise) in &mutations {
                let i = at.index(lines.len() + 1);
                match op {
                    0 if i < lines.len() => lines[i] = noise,
                    1 if i < lines.len() => {
                        lines.remove(i);
                    }
                    3 if i < lines.len() => lines.insert(i, lines[i]),
                    _ => lines.insert(i, noise),
                }
            }
            lines.push("");

            let mut p = RequestParser::new();
            let mut done = Vec::new();
            for line in &lines {
                if let Ok(Some(request)) = p.push_line(line) {
                    done.push(request);
                }
            }
            for request in &done {
                if let Request::Set(set) = request {
                    prop_assert_eq!(&parse_set(&wg_set_body(set)), set);
                }
            }
            if mutations.is_empty() {
                prop_assert_eq!(done, vec![Request::Set(req)]);
            }
            let _ = p.push_line("");
            prop_assert_eq!(p.push_line("get=1"), Ok(None));
            prop_assert_eq!(p.push_line(""), Ok(Some(Request::Get)));
        }

        #[test]
        fn wg_formatted_set_round_trips(req in arb_set_request()) {
            prop_assert_eq!(parse_set(&wg_set_body(&req)), req);
        }

        #[test]
        fn formatted_get_reads_back(view in arb_device_view()) {
            let mut out = String::new();
            format_get(&view, &mut out);
            let expected = DeviceView {
                private_key: view.private_key.clone().filter(|k| !k.is_zero()),
                peers: view
                    .peers
                    .iter()
                    .map(|p| PeerView {
                        preshared_key: p.preshared_key.clone().filter(|k| !k.is_zero()),
                        allowed_ips: p.allowed_ips.iter().map(IpNet::trunc).collect(),
                        ..p.clone()
                    })
                    .collect(),
                ..view.clone()
            };
            prop_assert_eq!(read_get_reply(&out), expected);
        }
    }
}
