//! The WireGuard cross-platform userspace API on
//! `/var/run/wireguard/<interface>.sock`, so that stock `wg` manages vpcgated
//! as it manages wireguard-go.
//!
//! Each connection may carry several requests. A line over
//! [`MAX_LINE`] bytes or a malformed request is answered with an errno and the
//! connection keeps serving; nothing of a rejected `set` is applied. Memory
//! per connection is bounded whatever a client sends.

pub mod text;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use vpcgate_node::PeerHandle;
use vpcgate_plane::model::Desired;
use vpcgate_plane::view::PeerLive;

use crate::access::Access;
use crate::handle::Handle;
use text::{DeviceView, PeerView, Request, RequestParser};

/// Longer than any line `wg` sends (a v6 CIDR or a hex key with its name).
pub const MAX_LINE: usize = 4096;

/// The device as a `get` reports it: the desired state, with each peer's
/// live endpoint, handshake and counters, and the port actually bound.
pub fn view(
    desired: &Desired,
    listen_port: u16,
    live: impl Fn(PeerHandle) -> PeerLive,
) -> DeviceView {
    DeviceView {
        private_key: desired.device.private_key.clone(),
        listen_port,
        fwmark: desired.device.fwmark,
        peers: desired
            .device
            .peers
            .iter()
            .map(|p| {
                let live = live(p.handle);
                PeerView {
                    public_key: p.public_key.clone(),
                    preshared_key: p.preshared_key.clone(),
                    endpoint: live.endpoint.or(p.endpoint),
                    persistent_keepalive: p.persistent_keepalive,
                    last_handshake: live.last_handshake,
                    rx_bytes: live.rx_bytes,
                    tx_bytes: live.tx_bytes,
                    allowed_ips: p.effective_allowed_ips().copied().collect(),
                }
            })
            .collect(),
    }
}

pub fn socket_path(interface: &str) -> std::path::PathBuf {
    std::path::Path::new("/var/run/wireguard").join(format!("{interface}.sock"))
}

pub async fn serve(listener: UnixListener, daemon: Handle) {
    loop {
        match listener.accept().await {
            // The UAPI carries the private key: root and our own user only.
            Ok((stream, _)) if !Access::OWNER_ONLY.allows(std::os::fd::AsFd::as_fd(&stream)) => {
                tracing::warn!("refused a UAPI connection from an unauthorised user");
            }
            Ok((stream, _)) => {
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &daemon).await {
                        tracing::debug!("UAPI connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("UAPI accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// How much is read from the socket at a time.
const READ_CHUNK: usize = 8192;

/// What [`LineReader::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line (without its `'\n'`) is in the caller's buffer.
    Complete,
    /// A line longer than [`MAX_LINE`] ended; it was read and dropped.
    TooLong,
    /// The connection ended; a partial last line is dropped.
    End,
}

/// Splits a connection into lines. Unlike tokio's `BufReader`, its buffer
/// is zeroized when dropped (a `set` carries private and preshared keys),
/// and an overlong line is skipped as it streams past rather than gathered
/// in memory, so one client cannot make the daemon hold megabytes.
struct LineReader {
    buf: zeroize::Zeroizing<Vec<u8>>,
    start: usize,
    end: usize,
}

impl LineReader {
    fn new() -> LineReader {
        LineReader {
            buf: zeroize::Zeroizing::new(vec![0; READ_CHUNK]),
            start: 0,
            end: 0,
        }
    }

    /// Reads the next line into `line`, which must have room for
    /// [`MAX_LINE`] bytes so that it never reallocates (a reallocation would
    /// leave a copy of a key behind).
    async fn next_line<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut R,
        line: &mut Vec<u8>,
    ) -> std::io::Result<Line> {
        line.clear();
        let mut too_long = false;
        loop {
            let pending = &self.buf[self.start..self.end];
            let newline = pending.iter().position(|&b| b == b'\n');
            let piece = &pending[..newline.unwrap_or(pending.len())];
            if too_long || line.len() + piece.len() > MAX_LINE {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(piece);
            }
            if let Some(at) = newline {
                self.start += at + 1;
                return Ok(if too_long {
                    Line::TooLong
                } else {
                    Line::Complete
                });
            }
            self.start = 0;
            self.end = reader.read(&mut self.buf[..]).await?;
            if self.end == 0 {
                line.clear();
                return Ok(Line::End);
            }
        }
    }
}

async fn handle(stream: UnixStream, daemon: &Handle) -> std::io::Result<()> {
    let (mut read, mut write) = stream.into_split();
    let mut lines = LineReader::new();
    let mut parser = RequestParser::new();
    let mut line = zeroize::Zeroizing::new(Vec::with_capacity(MAX_LINE));
    // A get reply carries the private key in hex; see `Owner::uapi_get`.
    let mut reply = zeroize::Zeroizing::new(String::with_capacity(4096));
    // Set once a request has failed: the rest of it is skipped up to its
    // terminating blank line, then the error is reported.
    let mut failed: Option<i32> = None;
    loop {
        match lines.next_line(&mut read, &mut line).await? {
            Line::End => return Ok(()),
            Line::TooLong => {
                failed.get_or_insert(libc::EMSGSIZE);
                continue;
            }
            Line::Complete => {}
        }
        if let Some(errno) = failed {
            if line.is_empty() {
                failed = None;
                parser = RequestParser::new();
                reply.clear();
                text::format_errno(errno, &mut reply);
                write.write_all(reply.as_bytes()).await?;
            }
            continue;
        }
        match parser.push_line_bytes(&line) {
            Ok(None) => {}
            Ok(Some(request)) => {
                parser = RequestParser::new();
                reply.clear();
                match request {
                    Request::Get => match daemon.uapi_get().await {
                        Some(full) => reply = full,
                        None => text::format_errno(crate::handle::ESHUTDOWN, &mut reply),
                    },
                    Request::Set(set) => {
                        let errno = match daemon.uapi_set(set).await {
                            Ok(()) => 0,
                            Err(errno) => errno,
                        };
                        text::format_errno(errno, &mut reply);
                    }
                }
                write.write_all(reply.as_bytes()).await?;
            }
            Err(e) => {
                tracing::debug!("rejected UAPI request: {e}");
                if line.is_empty() {
                    parser = RequestParser::new();
                    reply.clear();
                    text::format_errno(e.errno(), &mut reply);
                    write.write_all(reply.as_bytes()).await?;
                } else {
                    failed = Some(e.errno());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(input: &[u8]) -> Vec<(Line, Vec<u8>)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut reader = input;
            let mut lines = LineReader::new();
            let mut line = Vec::with_capacity(MAX_LINE);
            let capacity = line.capacity();
            let mut out = Vec::new();
            loop {
                let got = lines.next_line(&mut reader, &mut line).await.expect("read");
                assert_eq!(line.capacity(), capacity, "the line buffer moved");
                let end = got == Line::End;
                out.push((got, line.clone()));
                if end {
                    return out;
                }
            }
        })
    }

    #[test]
    fn splits_lines_across_reads_and_drops_overlong_ones() {
        let long = vec![b'a'; 3 * READ_CHUNK + 5];
        let limit = vec![b'b'; MAX_LINE];
        let mut input = b"get=1\n\n".to_vec();
        input.extend_from_slice(&long);
        input.extend_from_slice(b"\nset=1\n");
        input.extend_from_slice(&limit);
        input.extend_from_slice(b"\npartial");
        let got = lines_of(&input);
        let expected = vec![
            (Line::Complete, b"get=1".to_vec()),
            (Line::Complete, Vec::new()),
            (Line::TooLong, Vec::new()),
            (Line::Complete, b"set=1".to_vec()),
            (Line::Complete, limit),
            (Line::End, Vec::new()),
        ];
        assert_eq!(got.len(), expected.len());
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert!(g == e, "line {i}: {:?} {} bytes", g.0, g.1.len());
        }
    }
}
