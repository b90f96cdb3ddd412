//! The control protocol between `vpcgate` and `vpcgated`.
//!
//! A message is a 4-byte big-endian length followed by that many bytes of
//! JSON. Each side refuses a frame over its limit before reading it, so a
//! hostile peer on the socket cannot make either side allocate without
//! bound: the daemon reads requests of at most [`MAX_FRAME`], the CLI
//! replies of at most [`MAX_RESPONSE`]. This crate holds only types and
//! framing: no I/O runtime, nothing of the data path.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Default path of the daemon's control socket.
pub const DEFAULT_SOCKET: &str = "/run/vpcgate/vpcgated.sock";

/// Environment variable that overrides the socket path for `vpcgate`.
pub const SOCKET_ENV: &str = "VPCGATE_SOCKET";

/// The largest request the daemon accepts.
pub const MAX_FRAME: usize = 1 << 20;

/// The largest reply the CLI accepts. The status and peer list of a
/// gateway with the most peers a UAPI request may add (100,000) run to
/// tens of megabytes, and the CLI trusts the daemon it talks to.
pub const MAX_RESPONSE: usize = 256 << 20;

/// The shared address space tunnels are given (RFC 6598), 100.64.0.0/10.
const TUNNEL_SPACE: (u32, u8) = (0x6440_0000, 10);

/// A tunnel address to suggest when the tunnel network clashes with a
/// network the host routes to: the `.1` of the first /24 in 100.64.0.0/10
/// that overlaps none of `taken` (IPv4 networks as address and prefix
/// length). Both the daemon's warning and doctor's fix give the same advice.
pub fn free_tunnel_address(taken: &[(std::net::Ipv4Addr, u8)]) -> Option<String> {
    let mask = |len: u8| {
        u32::MAX
            .checked_shl(32 - u32::from(len.min(32)))
            .unwrap_or(0)
    };
    let overlaps = |net: u32, len: u8| {
        taken.iter().any(|&(addr, their)| {
            let shorter = len.min(their);
            (u32::from(addr) ^ net) & mask(shorter) == 0
        })
    };
    let (base, len) = TUNNEL_SPACE;
    (0..1u32 << (24 - len))
        .map(|i| base + (i << 8))
        .find(|&net| !overlaps(net, 24))
        .map(|net| format!("{}/24", std::net::Ipv4Addr::from(net + 1)))
}

/// A message that travels in frames, with the largest frame it may have.
pub trait Framed {
    const MAX: usize;
}

impl Framed for Request {
    const MAX: usize = MAX_FRAME;
}

impl Framed for Response {
    const MAX: usize = MAX_RESPONSE;
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// Prints the advertised set.
    GetAdvertisedRoutes,
    /// Replaces the advertised set; an empty list clears it. Each entry is
    /// one prefix as the user typed it, validated by the daemon.
    AdvertiseRoutes {
        routes: Vec<String>,
        #[serde(default)]
        exit_node: bool,
        /// Health checks, `tcp:IP:PORT` each: a range is advertised only
        /// while every check inside it passes.
        #[serde(default)]
        checks: Vec<String>,
    },
    /// Stops (`on`) or resumes advertising every range, for maintenance.
    Drain {
        on: bool,
    },
    Set(SetOptions),
    PeerAdd(PeerAdd),
    PeerRemove {
        name: String,
    },
    PeerList,
    PeerConfig {
        name: String,
    },
    /// This gateway's key, peers and settings, for a second gateway.
    IdentityExport,
    /// Stand in for the gateway that exported `document`.
    IdentityImport {
        document: String,
    },
}

/// Settings to change; `None` leaves one as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetOptions {
    #[serde(default)]
    pub snat: Option<bool>,
    #[serde(default)]
    pub mss_clamp: Option<bool>,
    /// HOST:PORT that client configs point at.
    #[serde(default)]
    pub public_endpoint: Option<String>,
    #[serde(default)]
    pub listen_port: Option<u16>,
    /// This node's tunnel addresses, one IPv4 and/or one IPv6.
    #[serde(default)]
    pub address: Option<Vec<String>>,
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The DNS forwarder on the tunnel addresses, on or off.
    #[serde(default)]
    pub dns: Option<bool>,
    /// The resolvers it forwards to; `["auto"]`: the host's own.
    #[serde(default)]
    pub dns_upstream: Option<Vec<String>>,
    /// Zones vpcgate clients resolve through us; `["none"]`: none.
    #[serde(default)]
    pub dns_zones: Option<Vec<String>>,
    /// This gateway's priority among gateways that advertise the same
    /// range: lower is preferred.
    #[serde(default)]
    pub priority: Option<u16>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAdd {
    pub name: String,
    /// Base64; when absent the daemon generates the client's keypair.
    #[serde(default)]
    pub public_key: Option<String>,
    /// When empty, the next free tunnel address is assigned.
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub keepalive: Option<u16>,
    #[serde(default)]
    pub accept_routes: bool,
    #[serde(default)]
    pub accept_default_route: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case", deny_unknown_fields)]
// One reply per request, built and dropped at once: its size costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Response {
    Status(Status),
    Routes {
        routes: Vec<String>,
        /// What the user should know, e.g. forwarding is off.
        #[serde(default)]
        warnings: Vec<String>,
        #[serde(default)]
        checks: Vec<String>,
        #[serde(default)]
        draining: bool,
    },
    Done {
        message: String,
    },
    PeerAdded {
        name: String,
        allowed_ips: Vec<String>,
        /// The wg-quick config, when the daemon generated the client's key.
        config: Option<String>,
    },
    Peers {
        peers: Vec<PeerStatus>,
    },
    PeerConfig {
        config: String,
    },
    /// `identity export`'s document; it holds the private key.
    Identity {
        document: String,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub interface: String,
    pub public_key: String,
    pub listen_port: u16,
    /// The tunnel address (the IPv4 one if there are two).
    pub address: String,
    pub addresses: Vec<String>,
    pub mtu: u32,
    pub public_endpoint: Option<String>,
    pub advertised_routes: Vec<String>,
    pub accepted_routes: Vec<String>,
    pub snat: bool,
    /// The nftables form of the SNAT table (`inet`, or `ip+ip6` on older
    /// systems); `None` while there is no table (no advertised ranges).
    #[serde(default)]
    pub snat_form: Option<String>,
    pub mss_clamp: bool,
    pub warnings: Vec<String>,
    pub peers: Vec<PeerStatus>,
    /// Packets dropped, by reason.
    pub drops: Vec<(String, u64)>,
    /// The DNS forwarder; `None` while it is off.
    #[serde(default)]
    pub dns: Option<Box<DnsStatus>>,
    /// On a client: the DNS that gateways trusted for routes offer, as the
    /// TUN link's split DNS. `None` while none offers any.
    #[serde(default)]
    pub link_dns: Option<Box<LinkDnsStatus>>,
    /// On a gateway: the ranges the route exchange offers now (the
    /// advertised ones whose checks pass; none while draining).
    #[serde(default)]
    pub advertising: Vec<String>,
    #[serde(default)]
    pub draining: bool,
    #[serde(default)]
    pub checks: Vec<CheckStatus>,
    /// On a client: which gateway carries each accepted range.
    #[serde(default)]
    pub carriers: Vec<CarrierStatus>,
    /// On a client: how many times a range moved between gateways.
    #[serde(default)]
    pub failovers: u64,
}

/// One health check on a gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckStatus {
    /// `tcp:IP:PORT`.
    pub target: String,
    /// `healthy`, `unhealthy`, or `pending` before its first success.
    pub state: String,
    /// Seconds since the state last changed.
    #[serde(default)]
    pub for_secs: Option<u64>,
    /// The last probe: `connected`, `connection refused`, …
    #[serde(default)]
    pub last: Option<String>,
    #[serde(default)]
    pub last_ok: Option<bool>,
    /// The advertised ranges it governs.
    pub governs: Vec<String>,
}

/// One accepted range on a client, and the gateways that offer it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarrierStatus {
    pub range: String,
    /// The peer that carries it.
    pub via: String,
    /// Seconds since it took the range.
    pub for_secs: u64,
    /// Other gateways that offer it and are alive.
    pub standby: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkDnsStatus {
    pub servers: Vec<String>,
    /// systemd-resolved routing domains: `~ZONE`, or `~.` for every name.
    pub domains: Vec<String>,
    /// The peers that offer it.
    pub from: Vec<String>,
    /// Whether systemd-resolved holds it.
    pub applied: bool,
    /// Why it is not applied, if it is not.
    #[serde(default)]
    pub problem: Option<String>,
    /// The commands that apply it by hand.
    pub command: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsStatus {
    /// Where it answers: ADDRESS:53 on the TUN.
    pub listening: Vec<String>,
    /// Where it forwards to, in order.
    pub upstreams: Vec<String>,
    /// Where the upstreams came from: a resolv.conf's path, or `set`.
    pub upstream_source: String,
    pub zones: Vec<String>,
    /// What keeps it from working, if anything.
    #[serde(default)]
    pub problem: Option<String>,
    pub queries: u64,
    pub cache_hits: u64,
    pub cache_entries: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: Option<String>,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    /// Unix seconds, or None if never.
    pub latest_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
    #[serde(default)]
    pub accept_routes: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a message of {len} bytes is more than the {max} bytes allowed")]
    TooLarge { len: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Counts what serde writes, to size a frame before writing it.
struct Counter(usize);

impl Write for Counter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Encodes a message as one frame. The buffer is allocated once at its
/// final size and never grows, so a message holding a key (a client
/// config) leaves no stray copies behind; zeroize the frame after use.
pub fn encode<T: Serialize + Framed>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut counter = Counter(0);
    serde_json::to_writer(&mut counter, message)?;
    let len = counter.0;
    if len > T::MAX {
        return Err(FrameError::TooLarge { len, max: T::MAX });
    }
    let mut frame = Vec::with_capacity(4 + len);
    frame.extend_from_slice(&(len as u32).to_be_bytes());
    serde_json::to_writer(&mut frame, message)?;
    Ok(frame)
}

/// Reads a frame's length prefix and checks it against the limit for `T`.
pub fn frame_len<T: Framed>(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > T::MAX {
        return Err(FrameError::TooLarge { len, max: T::MAX });
    }
    Ok(len)
}

pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

/// Blocking write of one frame (the CLI side).
pub fn write_frame<T: Serialize + Framed>(
    w: &mut impl Write,
    message: &T,
) -> Result<(), FrameError> {
    w.write_all(&encode(message)?)?;
    w.flush()?;
    Ok(())
}

/// Blocking read of one frame (the CLI side). The body is read as it
/// arrives, so a length prefix alone allocates nothing.
pub fn read_frame<T: for<'a> Deserialize<'a> + Framed>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix)?;
    let len = frame_len::<T>(prefix)?;
    // Sized up front (within reason) so that a reply holding a key does
    // not leave copies behind as the buffer grows.
    let mut body = Vec::with_capacity(len.min(MAX_FRAME));
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    decode(&body)
}

#[cfg(test)]
mod tests {
    #[test]
    fn free_tunnel_address_skips_what_is_routed() {
        let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().expect("ip");
        assert_eq!(
            super::free_tunnel_address(&[]).as_deref(),
            Some("100.64.0.1/24")
        );
        // An EKS pod range as a secondary VPC CIDR, and the default route,
        // which covers everything and so is left out by callers.
        assert_eq!(
            super::free_tunnel_address(&[(ip("100.64.0.0"), 16)]).as_deref(),
            Some("100.65.0.1/24")
        );
        assert_eq!(
            super::free_tunnel_address(&[(ip("100.64.0.0"), 16), (ip("100.65.0.7"), 32)])
                .as_deref(),
            Some("100.65.1.1/24")
        );
        assert_eq!(
            super::free_tunnel_address(&[(ip("100.64.0.0"), 10)]),
            None,
            "nothing is free"
        );
    }

    use super::*;

    #[test]
    fn round_trip() {
        let frame = encode(&Request::Status).expect("encode");
        let back: Request = read_frame(&mut &frame[..]).expect("decode");
        assert_eq!(back, Request::Status);
    }

    #[test]
    fn oversized_prefix_is_refused_before_allocating() {
        let mut frame = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(b"{}");
        let err = read_frame::<Request>(&mut &frame[..]).expect_err("too large");
        assert!(matches!(err, FrameError::TooLarge { len, .. } if len == MAX_FRAME + 1));
        // A reply may be larger than any request.
        let mut frame = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(b"{}");
        let err = read_frame::<Response>(&mut &frame[..]).expect_err("truncated");
        assert!(matches!(err, FrameError::Io(_)), "{err:?}");
    }

    #[test]
    fn garbage_and_unknown_requests_are_errors() {
        for body in [&b"not json"[..], br#"{"request":"reboot"}"#] {
            assert!(
                decode::<Request>(body).is_err(),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn encoding_checks_the_limit_of_the_message() {
        let routes = vec!["198.18.64.0/20".to_string(); MAX_FRAME / 10];
        let request = Request::AdvertiseRoutes {
            routes: routes.clone(),
            exit_node: false,
            checks: Vec::new(),
        };
        assert!(matches!(
            encode(&request),
            Err(FrameError::TooLarge { max, .. }) if max == MAX_FRAME
        ));
        let response = Response::Routes {
            routes,
            warnings: Vec::new(),
            checks: Vec::new(),
            draining: false,
        };
        let frame = encode(&response).expect("a large reply encodes");
        assert_eq!(frame.len(), frame.capacity(), "the frame was reallocated");
        let back: Response = read_frame(&mut &frame[..]).expect("decode");
        assert_eq!(back, response);
    }

    #[test]
    fn truncated_frame_is_an_io_error() {
        let frame = encode(&Request::Status).expect("encode");
        let err = read_frame::<Request>(&mut &frame[..frame.len() - 1]).expect_err("short");
        assert!(matches!(err, FrameError::Io(_)));
    }
}
