//! The control socket that `vpcgate` talks to, speaking the framed JSON
//! protocol of the `vpcgate-proto` crate.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use vpcgate_proto::{self as proto, Request, Response};

use crate::access::Access;
use crate::handle::Handle;

/// A client that stalls mid-frame is dropped after this long.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: UnixListener, daemon: Handle, access: Access) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) if !access.allows(std::os::fd::AsFd::as_fd(&stream)) => {
                tracing::warn!("refused a control connection from an unauthorised user");
            }
            Ok((stream, _)) => {
                let daemon = daemon.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(stream, &daemon).await {
                        tracing::debug!("control connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("control accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: UnixStream, daemon: &Handle) -> std::io::Result<()> {
    loop {
        let mut prefix = [0u8; 4];
        match stream.read_exact(&mut prefix).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let response = match proto::frame_len::<Request>(prefix) {
            Err(e) => {
                // The stream cannot be resynchronised after a bad length.
                send(
                    &mut stream,
                    Response::Error {
                        message: e.to_string(),
                    },
                )
                .await?;
                return Ok(());
            }
            Ok(len) => {
                let mut body = vec![0u8; len];
                tokio::time::timeout(FRAME_TIMEOUT, stream.read_exact(&mut body))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
                match proto::decode::<Request>(&body) {
                    Ok(request) => daemon.control(request).await,
                    Err(e) => Response::Error {
                        message: format!("{e}; is this vpcgate the same version as vpcgated?"),
                    },
                }
            }
        };
        send(&mut stream, response).await?;
    }
}

async fn send(stream: &mut UnixStream, mut response: Response) -> std::io::Result<()> {
    let frame = match proto::encode(&response) {
        Ok(frame) => zeroize::Zeroizing::new(frame),
        Err(e) => {
            tracing::error!("cannot send a reply: {e}");
            let error = Response::Error {
                message: format!("vpcgated cannot send its reply: {e}"),
            };
            zeroize::Zeroizing::new(proto::encode(&error).map_err(std::io::Error::other)?)
        }
    };
    // A client config holds the client's private key, an identity the
    // gateway's.
    if let Response::PeerConfig { config }
    | Response::Identity { document: config }
    | Response::PeerAdded {
        config: Some(config),
        ..
    } = &mut response
    {
        zeroize::Zeroize::zeroize(config);
    }
    stream.write_all(&frame).await
}
