//! The small HTTP/1.1 responder behind `--metrics-listen` and
//! `--health-listen`: it reads one request head (at most [`MAX_REQUEST`]
//! bytes, within [`REQUEST_TIMEOUT`]), writes one answer and closes. Probes
//! and scrapes are rare, so nothing here is kept between requests, and none
//! of it touches the data path.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_REQUEST: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The request line's method and target, as sent.
pub struct Head {
    pub method: Vec<u8>,
    pub path: Vec<u8>,
}

impl Head {
    /// A GET of `path`, with or without a query string.
    pub fn is_get(&self, path: &str) -> bool {
        let p = path.as_bytes();
        self.method == b"GET"
            && (self.path == p
                || (self.path.starts_with(p) && self.path.get(p.len()) == Some(&b'?')))
    }
}

pub struct Reply {
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: &'static str, body: String) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }
}

/// What a listener answers.
pub trait Answer: Clone + Send + Sync + 'static {
    fn answer(&self, head: Head) -> impl Future<Output = Reply> + Send;
}

pub async fn serve(listener: TcpListener, what: &'static str, answer: impl Answer) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let answer = answer.clone();
                tokio::spawn(async move {
                    if let Err(e) = respond(stream, &answer).await {
                        tracing::debug!("{what} connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("{what} accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn respond(mut stream: TcpStream, answer: &impl Answer) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let read = async {
        let mut chunk = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, read)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let first = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = first.split(|&b| b == b' ');
    let request = Head {
        method: parts.next().unwrap_or_default().to_vec(),
        path: parts.next().unwrap_or_default().to_vec(),
    };
    let reply = answer.answer(request).await;
    let response = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        reply.status,
        reply.content_type,
        reply.body.len(),
        reply.body
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
