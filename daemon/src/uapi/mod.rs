//! The WireGuard cross-platform userspace API on
//! `/var/run/wireguard/<interface>.sock`, so that stock `wg` manages vpcgated
//! as it manages wireguard-go.
//!
//! Each connection may carry several requests. A line over
//! [`MAX_LINE`] bytes or a malformed request is answered with an errno and the
//! connection keeps serving; nothing of a rejected `set` is applied.

pub mod proto;

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::access::Access;
use crate::daemon::Daemon;
use proto::{Request, RequestParser};

/// Longer than any line `wg` sends (a v6 CIDR or a hex key with its name).
pub const MAX_LINE: usize = 4096;

pub fn socket_path(interface: &str) -> std::path::PathBuf {
    std::path::Path::new("/var/run/wireguard").join(format!("{interface}.sock"))
}

pub async fn serve(listener: UnixListener, daemon: Arc<Daemon>) {
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

async fn handle(stream: UnixStream, daemon: &Daemon) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut parser = RequestParser::new();
    // A set request carries private and preshared keys; both buffers are
    // sized up front so they rarely reallocate and leave copies behind.
    let mut line = zeroize::Zeroizing::new(Vec::with_capacity(MAX_LINE + 1));
    // A get reply carries the private key in hex.
    let mut reply = zeroize::Zeroizing::new(String::with_capacity(4096));
    // Set once a request has failed: the rest of it is skipped up to its
    // terminating blank line, then the error is reported.
    let mut failed: Option<i32> = None;
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
        } else if line.len() > MAX_LINE {
            failed.get_or_insert(libc::EMSGSIZE);
            // Discard the rest of the overlong line.
            let mut sink = Vec::new();
            let _ = (&mut reader)
                .take(64 * 1024 * 1024)
                .read_until(b'\n', &mut sink)
                .await?;
            continue;
        }
        if let Some(errno) = failed {
            if line.is_empty() {
                failed = None;
                parser = RequestParser::new();
                reply.clear();
                proto::format_errno(errno, &mut reply);
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
                    Request::Get => daemon.uapi_get(&mut reply).await,
                    Request::Set(set) => {
                        let errno = match daemon.uapi_set(set).await {
                            Ok(()) => 0,
                            Err(errno) => errno,
                        };
                        proto::format_errno(errno, &mut reply);
                    }
                }
                write.write_all(reply.as_bytes()).await?;
            }
            Err(e) => {
                tracing::debug!("rejected UAPI request: {e}");
                if line.is_empty() {
                    parser = RequestParser::new();
                    reply.clear();
                    proto::format_errno(e.errno(), &mut reply);
                    write.write_all(reply.as_bytes()).await?;
                } else {
                    failed = Some(e.errno());
                }
            }
        }
    }
}
