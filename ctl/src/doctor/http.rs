//! A minimal HTTP/1.1 client for cloud metadata services: plain `http://`,
//! one request per connection, short timeouts, a bounded response, no
//! proxies (a metadata service must never be asked through one) and no
//! redirects. Metadata services are local to the VM, so nothing more is
//! needed and no HTTP crate is pulled in.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// The largest response read; metadata documents are a few KiB.
const MAX_RESPONSE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0} is not an http://HOST[:PORT][/PATH] URL")]
    BadUrl(String),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, io::Error),
    #[error("no answer from {0} in time")]
    Timeout(String),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("malformed HTTP response: {0}")]
    Malformed(&'static str),
    #[error("response larger than {MAX_RESPONSE} bytes")]
    TooLarge,
}

/// Where requests go: `http://host:port` plus a path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub prefix: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Endpoint, HttpError> {
        let bad = || HttpError::BadUrl(url.to_string());
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(port) => (host, port.parse().map_err(|_| bad())?),
                None if after.is_empty() => (host, 80),
                None => return Err(bad()),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, port.parse().map_err(|_| bad())?),
                None => (authority, 80),
            }
        };
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b));
        if !valid {
            return Err(bad());
        }
        Ok(Endpoint {
            host: host.to_string(),
            port,
            prefix: prefix.to_string(),
        })
    }

    /// The URL, for messages.
    pub fn url(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 80 {
            format!("http://{host}{}", self.prefix)
        } else {
            format!("http://{host}:{}{}", self.port, self.prefix)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// A header's value; names compare case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request and reads the whole answer, all within `timeout`.
pub fn request(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Response, HttpError> {
    let deadline = Instant::now() + timeout;
    let target = format!("{}:{}", endpoint.host, endpoint.port);
    let addrs: Vec<_> = (endpoint.host.as_str(), endpoint.port)
        .to_socket_addrs()
        .map_err(|e| HttpError::Connect(target.clone(), e))?
        .collect();
    let addr = addrs.first().ok_or_else(|| {
        HttpError::Connect(
            target.clone(),
            io::Error::new(io::ErrorKind::NotFound, "no address"),
        )
    })?;
    let mut stream = TcpStream::connect_timeout(addr, timeout)
        .map_err(|e| HttpError::Connect(target.clone(), e))?;

    let host = if endpoint.host.contains(':') {
        format!("[{}]", endpoint.host)
    } else {
        endpoint.host.clone()
    };
    let mut head = format!(
        "{method} {}{path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: vpcgate-doctor\r\nAccept: */*\r\nConnection: close\r\n",
        endpoint.prefix
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if method != "GET" {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    stream.set_write_timeout(Some(remaining(deadline, &target)?))?;
    stream.write_all(head.as_bytes())?;

    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        stream.set_read_timeout(Some(remaining(deadline, &target)?))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if raw.len() > MAX_RESPONSE {
                    return Err(HttpError::TooLarge);
                }
                // A complete response may come without the server closing.
                if let Ok(Some(response)) = parse_response(&raw) {
                    return Ok(response);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HttpError::Timeout(target));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    match parse_response(&raw)? {
        Some(response) => Ok(response),
        None => parse_until_eof(&raw),
    }
}

fn remaining(deadline: Instant, target: &str) -> Result<Duration, HttpError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(HttpError::Timeout(target.to_string()));
    }
    Ok(left)
}

/// A response's status line and headers, and where its body starts.
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    body_start: usize,
}

/// Splits the status line and headers from the body.
fn parse_head(raw: &[u8]) -> Result<Option<Head>, HttpError> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head =
        std::str::from_utf8(&raw[..end]).map_err(|_| HttpError::Malformed("non-UTF-8 header"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or(HttpError::Malformed("empty"))?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("not an HTTP/1.x status line"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or(HttpError::Malformed("bad status code"))?;
    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::Malformed("header without a colon"))?;
        headers.push((name.trim().to_string(), value.trim().to_string()));
    }
    Ok(Some(Head {
        status,
        headers,
        body_start: end + 4,
    }))
}

/// Parses a response; `Ok(None)` means more bytes are needed to know where
/// the body ends.
pub fn parse_response(raw: &[u8]) -> Result<Option<Response>, HttpError> {
    let Some(Head {
        status,
        headers,
        body_start,
    }) = parse_head(raw)?
    else {
        return Ok(None);
    };
    let body = &raw[body_start..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let body = if find("Transfer-Encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        match decode_chunked(body)? {
            Some(body) => body,
            None => return Ok(None),
        }
    } else if let Some(len) = find("Content-Length") {
        let len: usize = len
            .parse()
            .map_err(|_| HttpError::Malformed("bad Content-Length"))?;
        if body.len() < len {
            return Ok(None);
        }
        body[..len].to_vec()
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else {
        // The body runs to the end of the connection.
        return Ok(None);
    };
    Ok(Some(Response {
        status,
        headers,
        body,
    }))
}

/// For a response whose body ends with the connection.
fn parse_until_eof(raw: &[u8]) -> Result<Response, HttpError> {
    let Head {
        status,
        headers,
        body_start,
    } = parse_head(raw)?.ok_or(HttpError::Malformed("connection closed inside the header"))?;
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("Transfer-Encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let sized = headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("Content-Length"));
    if chunked || sized {
        return Err(HttpError::Malformed("connection closed inside the body"));
    }
    Ok(Response {
        status,
        headers,
        body: raw[body_start..].to_vec(),
    })
}

/// Decodes a chunked body; `Ok(None)` when it is not complete yet.
pub fn decode_chunked(mut data: &[u8]) -> Result<Option<Vec<u8>>, HttpError> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_line = std::str::from_utf8(&data[..eol])
            .map_err(|_| HttpError::Malformed("bad chunk size"))?;
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| HttpError::Malformed("bad chunk size"))?;
        if size > MAX_RESPONSE {
            return Err(HttpError::TooLarge);
        }
        data = &data[eol + 2..];
        if size == 0 {
            // Trailers, if any, are ignored; the final CRLF may still be in flight.
            return Ok(Some(body));
        }
        if data.len() < size + 2 {
            return Ok(None);
        }
        if &data[size..size + 2] != b"\r\n" {
            return Err(HttpError::Malformed("chunk without its CRLF"));
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Reads a request's head on a test server's connection, up to the blank
/// line (or the end of the connection).
#[cfg(test)]
pub fn read_head(conn: &mut impl Read) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let ep = Endpoint::parse("http://169.254.169.254").expect("parse");
        assert_eq!(
            (ep.host.as_str(), ep.port, ep.prefix.as_str()),
            ("169.254.169.254", 80, "")
        );
        assert_eq!(ep.url(), "http://169.254.169.254");
        let ep = Endpoint::parse("http://127.0.0.1:8080/fake/").expect("parse");
        assert_eq!((ep.port, ep.prefix.as_str()), (8080, "/fake"));
        assert_eq!(ep.url(), "http://127.0.0.1:8080/fake");
        let ep = Endpoint::parse("http://[fd00:ec2::254]:80").expect("parse");
        assert_eq!(ep.host, "fd00:ec2::254");
        assert_eq!(ep.url(), "http://[fd00:ec2::254]");
        for bad in [
            "https://169.254.169.254",
            "169.254.169.254",
            "http://",
            "http://host:port",
            "http://a b",
            "http://[::1",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_with_length_chunks_or_eof() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nMetadata-Flavor: Google\r\n\r\nhello";
        let r = parse_response(raw).expect("ok").expect("complete");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        assert_eq!(r.header("metadata-flavor"), Some("Google"));
        assert!(parse_response(&raw[..raw.len() - 1]).expect("ok").is_none());

        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\ni-01\r\n6;x=y\r\n234567\r\n0\r\n\r\n";
        let r = parse_response(chunked).expect("ok").expect("complete");
        assert_eq!(r.text(), "i-01234567");
        assert!(parse_response(&chunked[..60]).expect("ok").is_none());

        let eof = b"HTTP/1.0 404 Not Found\r\nServer: x\r\n\r\nnot here";
        assert!(parse_response(eof).expect("ok").is_none());
        let r = parse_until_eof(eof).expect("ok");
        assert_eq!((r.status, r.text().as_str()), (404, "not here"));
        let r = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n")
            .expect("ok")
            .expect("complete");
        assert!(r.body.is_empty());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for raw in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
        ] {
            assert!(
                parse_response(raw).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        assert!(parse_until_eof(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc").is_err());
    }

    #[test]
    fn talks_to_a_loopback_server_and_times_out() {
        use std::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let seen = read_head(&mut conn);
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
                .expect("write");
            // A second client is accepted but never answered.
            let (_silent, _) = listener.accept().expect("accept");
            std::thread::sleep(Duration::from_millis(800));
            seen
        });
        let ep = Endpoint::parse(&format!("http://127.0.0.1:{port}/base")).expect("endpoint");
        let r = request(
            &ep,
            "PUT",
            "/token",
            &[("X-Test", "1")],
            Duration::from_secs(2),
        )
        .expect("request");
        assert_eq!(r.text(), "hi");
        let started = Instant::now();
        let err =
            request(&ep, "GET", "/slow", &[], Duration::from_millis(300)).expect_err("timeout");
        assert!(matches!(err, HttpError::Timeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let seen = server.join().expect("server");
        assert!(seen.starts_with("PUT /base/token HTTP/1.1\r\n"), "{seen}");
        assert!(
            seen.contains("X-Test: 1\r\n") && seen.contains("Content-Length: 0\r\n"),
            "{seen}"
        );
    }
}
