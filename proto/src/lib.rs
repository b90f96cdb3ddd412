//! The control protocol between `vpcgate` and `vpcgated`.
//!
//! A message is a 4-byte big-endian length followed by that many bytes of
//! JSON. Both sides refuse frames over [`MAX_FRAME`] before reading them, so
//! a hostile peer on the socket cannot make either side allocate without
//! bound. This crate holds only types and framing: no I/O runtime, nothing of
//! the data path.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Default path of the daemon's control socket.
pub const DEFAULT_SOCKET: &str = "/run/vpcgate/vpcgated.sock";

/// Environment variable that overrides the socket path for `vpcgate`.
pub const SOCKET_ENV: &str = "VPCGATE_SOCKET";

/// The largest frame either side accepts.
pub const MAX_FRAME: usize = 1 << 20;

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
pub enum Response {
    Status(Status),
    Routes {
        routes: Vec<String>,
        /// What the user should know, e.g. forwarding is off.
        #[serde(default)]
        warnings: Vec<String>,
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
    pub mss_clamp: bool,
    pub warnings: Vec<String>,
    pub peers: Vec<PeerStatus>,
    /// Packets dropped, by reason.
    pub drops: Vec<(String, u64)>,
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
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Encodes a message as one frame.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(message)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Reads a frame's length prefix and checks it against the limit.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, FrameError> {
    Ok(serde_json::from_slice(body)?)
}

/// Blocking write of one frame (the CLI side).
pub fn write_frame<T: Serialize>(w: &mut impl Write, message: &T) -> Result<(), FrameError> {
    w.write_all(&encode(message)?)?;
    w.flush()?;
    Ok(())
}

/// Blocking read of one frame (the CLI side).
pub fn read_frame<T: for<'a> Deserialize<'a>>(r: &mut impl Read) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    r.read_exact(&mut prefix)?;
    let mut body = vec![0u8; frame_len(prefix)?];
    r.read_exact(&mut body)?;
    decode(&body)
}

#[cfg(test)]
mod tests {
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
        assert!(matches!(err, FrameError::TooLarge(n) if n == MAX_FRAME + 1));
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
    fn truncated_frame_is_an_io_error() {
        let frame = encode(&Request::Status).expect("encode");
        let err = read_frame::<Request>(&mut &frame[..frame.len() - 1]).expect_err("short");
        assert!(matches!(err, FrameError::Io(_)));
    }
}
