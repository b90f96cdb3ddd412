//! TCP flows for the guide tests, beyond [`crate::tcp_transfer`]: a verified
//! download with a deadline that reports how far it got (to tell a PMTU
//! black hole from a broken path), a long-lived echo session that must
//! survive route changes, and a one-byte reachability probe.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::socket::{getsockopt, sockopt};

use crate::netns::Netns;
use crate::traffic::{accept_until, join, Pattern};

const CHUNK: usize = 64 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const SEED_DOWNLOAD: u64 = 0x5851_f42d_4c95_7f2d;

/// Binds `addr` inside `ns` from the calling thread, which must be one the
/// caller spawned for that namespace.
fn bind_in(ns: &Netns, addr: SocketAddr) -> Result<TcpListener> {
    ns.enter_current_thread()?;
    let l = TcpListener::bind(addr).with_context(|| format!("bind {addr} in {}", ns.name()))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Outcome of [`tcp_download`].
#[derive(Debug)]
pub struct Download {
    pub bytes: u64,
    /// Verified bytes the client received before it finished or gave up.
    pub received: u64,
    /// The client's address as the server's `accept` saw it.
    pub server_saw: SocketAddr,
    /// `TCP_MAXSEG` of the server's socket right after accept: the segment
    /// size it will send, i.e. the MSS the client's SYN announced once it
    /// arrived (clamped or not), minus TCP options.
    pub server_mss: u32,
    /// `Ok(elapsed)` once every byte arrived intact; otherwise why not.
    pub outcome: Result<Duration>,
}

impl Download {
    pub fn completed(&self) -> bool {
        self.outcome.is_ok()
    }
}

/// The client in `client` connects to `addr` (a server in `server`), which
/// sends `bytes` of a pseudo-random pattern; the client verifies every byte.
/// The client gives up once `deadline` has passed since the connection was
/// established. A failure to set up (bind, accept, connect) is an `Err`; a
/// transfer that broke or stalled after connecting is an `Ok` whose
/// `outcome` is the error.
pub fn tcp_download(
    server: &Netns,
    client: &Netns,
    addr: SocketAddr,
    bytes: u64,
    deadline: Duration,
) -> Result<Download> {
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let (conn_tx, conn_rx) = mpsc::channel::<TcpStream>();
    let server_ns = server.clone();
    let srv = thread::Builder::new()
        .name(format!("download-server-{}", server.name()))
        .spawn(move || -> Result<(SocketAddr, u32)> {
            let l = bind_in(&server_ns, addr)?;
            let _ = ready_tx.send(());
            let (mut s, peer) = accept_until(&l, Instant::now() + Duration::from_secs(30))?;
            let mss = getsockopt(&s, sockopt::TcpMaxSeg).context("getsockopt(TCP_MAXSEG)")?;
            // The test thread shuts this clone down to unblock a stalled send.
            let _ = conn_tx.send(s.try_clone()?);
            s.set_write_timeout(Some(deadline + Duration::from_secs(10)))?;
            let mut pat = Pattern::new(SEED_DOWNLOAD);
            let mut buf = vec![0u8; CHUNK];
            let mut sent = 0u64;
            while sent < bytes {
                let n = (bytes - sent).min(CHUNK as u64) as usize;
                pat.fill(&mut buf[..n]);
                if s.write_all(&buf[..n]).is_err() {
                    // The client gave up; its side reports why.
                    return Ok((peer, mss));
                }
                sent += n as u64;
            }
            let _ = s.shutdown(Shutdown::Write);
            Ok((peer, mss))
        })
        .context("spawning download server")?;
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        return Err(join(srv, "server")
            .err()
            .unwrap_or_else(|| anyhow!("download server never became ready")));
    }

    let client_ns = client.clone();
    let cli = thread::Builder::new()
        .name(format!("download-client-{}", client.name()))
        .spawn(move || -> Result<(u64, Result<Duration>)> {
            client_ns.enter_current_thread()?;
            let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
                .with_context(|| format!("connect to {addr} from {}", client_ns.name()))?;
            let start = Instant::now();
            let end = start + deadline;
            let mut pat = Pattern::new(SEED_DOWNLOAD);
            let mut buf = vec![0u8; CHUNK];
            let mut want = vec![0u8; CHUNK];
            let mut got = 0u64;
            let outcome = loop {
                let left = end.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break Err(anyhow!(
                        "stalled: {got} of {bytes} bytes after {deadline:?}"
                    ));
                }
                s.set_read_timeout(Some(left))?;
                match s.read(&mut buf) {
                    Ok(0) if got == bytes => break Ok(start.elapsed()),
                    Ok(0) => break Err(anyhow!("stream ended after {got} of {bytes} bytes")),
                    Ok(n) => {
                        if got + n as u64 > bytes {
                            break Err(anyhow!("received more than the {bytes} bytes sent"));
                        }
                        pat.fill(&mut want[..n]);
                        if buf[..n] != want[..n] {
                            break Err(anyhow!(
                                "data corrupted within bytes {got}..{}",
                                got + n as u64
                            ));
                        }
                        got += n as u64;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        break Err(anyhow!(
                            "stalled: {got} of {bytes} bytes after {deadline:?}"
                        ));
                    }
                    Err(e) => {
                        break Err(anyhow!(e)
                            .context(format!("receive failed after {got} of {bytes} bytes")))
                    }
                }
            };
            Ok((got, outcome))
        })
        .context("spawning download client")?;

    let cli_res = join(cli, "client");
    if let Ok(conn) = conn_rx.recv_timeout(Duration::from_secs(1)) {
        let _ = conn.shutdown(Shutdown::Both);
    }
    let srv_res = join(srv, "server");
    let (received, outcome) = cli_res?;
    let (server_saw, server_mss) = srv_res?;
    if let Ok(took) = &outcome {
        eprintln!(
            "download {addr} ({}) -> {}: {bytes} bytes in {took:.2?}, server mss {server_mss}",
            server.name(),
            client.name()
        );
    }
    Ok(Download {
        bytes,
        received,
        server_saw,
        server_mss,
        outcome,
    })
}

/// A TCP connection kept open while a test changes things around it: the
/// client sends a 64-byte numbered message every `interval` and checks that
/// the server echoes it back unchanged.
pub struct EchoSession {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    client: Option<thread::JoinHandle<Result<u64>>>,
    server: Option<thread::JoinHandle<Result<SocketAddr>>>,
    server_conn: Option<TcpStream>,
    label: String,
}

/// How long one echo may take before the session counts as broken. Long
/// enough for TCP to ride out a short disruption by retransmitting (its
/// backoff doubles from 200 ms), so only a connection that really died
/// fails.
const ECHO_TIMEOUT: Duration = Duration::from_secs(20);
const ECHO_MSG: usize = 64;

impl EchoSession {
    pub fn start(
        server: &Netns,
        client: &Netns,
        addr: SocketAddr,
        interval: Duration,
    ) -> Result<EchoSession> {
        let (ready_tx, ready_rx) = mpsc::channel::<()>();
        let (conn_tx, conn_rx) = mpsc::channel::<TcpStream>();
        let server_ns = server.clone();
        let srv = thread::Builder::new()
            .name(format!("echo-server-{}", server.name()))
            .spawn(move || -> Result<SocketAddr> {
                let l = bind_in(&server_ns, addr)?;
                let _ = ready_tx.send(());
                let (mut s, peer) = accept_until(&l, Instant::now() + Duration::from_secs(30))?;
                let _ = conn_tx.send(s.try_clone()?);
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => return Ok(peer),
                        Ok(n) => s.write_all(&buf[..n]).context("echo back")?,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) => return Err(e).context("echo server read"),
                    }
                }
            })
            .context("spawning echo server")?;
        if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
            return Err(join(srv, "echo server")
                .err()
                .unwrap_or_else(|| anyhow!("echo server never became ready")));
        }
        let server_conn_rx = conn_rx;

        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (stop_c, rounds_c) = (stop.clone(), rounds.clone());
        let client_ns = client.clone();
        let cli = thread::Builder::new()
            .name(format!("echo-client-{}", client.name()))
            .spawn(move || -> Result<u64> {
                client_ns.enter_current_thread()?;
                let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
                    .with_context(|| format!("connect to {addr} from {}", client_ns.name()))?;
                s.set_read_timeout(Some(ECHO_TIMEOUT))?;
                s.set_write_timeout(Some(ECHO_TIMEOUT))?;
                let mut slowest = Duration::ZERO;
                let mut seq = 0u64;
                while !stop_c.load(Ordering::Relaxed) {
                    let mut msg = [b'.'; ECHO_MSG];
                    let text = format!("echo {seq:020} ");
                    msg[..text.len()].copy_from_slice(text.as_bytes());
                    let sent_at = Instant::now();
                    s.write_all(&msg)
                        .with_context(|| format!("sending echo {seq}"))?;
                    let mut back = [0u8; ECHO_MSG];
                    s.read_exact(&mut back).with_context(|| {
                        format!("waiting up to {ECHO_TIMEOUT:?} for echo {seq}")
                    })?;
                    if back != msg {
                        bail!(
                            "echo {seq} came back as {:?}",
                            String::from_utf8_lossy(&back)
                        );
                    }
                    slowest = slowest.max(sent_at.elapsed());
                    seq += 1;
                    rounds_c.store(seq, Ordering::Relaxed);
                    thread::sleep(interval);
                }
                s.shutdown(Shutdown::Write)
                    .context("closing the echo session")?;
                eprintln!("echo session: {seq} round trips, slowest {slowest:.2?}");
                Ok(seq)
            })
            .context("spawning echo client")?;
        let server_conn = server_conn_rx.recv_timeout(CONNECT_TIMEOUT + Duration::from_secs(5));
        let mut session = EchoSession {
            stop,
            rounds,
            client: Some(cli),
            server: Some(srv),
            server_conn: server_conn.ok(),
            label: format!("{} -> {addr}", client.name()),
        };
        if session.server_conn.is_none() {
            let err = session.finish().err();
            return Err(err.unwrap_or_else(|| anyhow!("echo server saw no connection")));
        }
        Ok(session)
    }

    /// Round trips completed so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Fails (with the client's error) if the session has already ended.
    pub fn check_alive(&mut self) -> Result<()> {
        if self.client.as_ref().is_some_and(|h| !h.is_finished()) {
            return Ok(());
        }
        let err = self
            .client
            .take()
            .map(|h| join(h, "echo client"))
            .and_then(Result::err)
            .unwrap_or_else(|| anyhow!("echo client ended"));
        Err(err.context(format!("echo session {} ended early", self.label)))
    }

    /// Waits until `n` more round trips have completed.
    pub fn wait_more_rounds(&mut self, n: u64, timeout: Duration) -> Result<()> {
        let target = self.rounds() + n;
        let deadline = Instant::now() + timeout;
        while self.rounds() < target {
            self.check_alive()?;
            if Instant::now() >= deadline {
                bail!(
                    "echo session {}: {} round trips, want {target} within {timeout:?}",
                    self.label,
                    self.rounds()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Stops the client, closes the connection and returns the round trips
    /// completed, or the first error of either side. Also returns the address
    /// the server saw.
    pub fn finish(&mut self) -> Result<(u64, SocketAddr)> {
        self.stop.store(true, Ordering::Relaxed);
        let cli = self
            .client
            .take()
            .map(|h| join(h, "echo client"))
            .unwrap_or_else(|| Err(anyhow!("echo client already reaped")));
        if cli.is_err() {
            if let Some(c) = &self.server_conn {
                let _ = c.shutdown(Shutdown::Both);
            }
        }
        let srv = self
            .server
            .take()
            .map(|h| join(h, "echo server"))
            .unwrap_or_else(|| Err(anyhow!("echo server already reaped")));
        self.server_conn = None;
        match (cli, srv) {
            (Ok(n), Ok(peer)) => Ok((n, peer)),
            (Err(c), _) => Err(c.context(format!("echo session {}", self.label))),
            (Ok(_), Err(s)) => Err(s.context(format!("echo session {}", self.label))),
        }
    }
}

impl Drop for EchoSession {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(c) = &self.server_conn {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// Whether a TCP connection from `client` to a listener on `addr` in
/// `server` can be made and carry one byte each way within `timeout`.
pub fn tcp_reachable(
    server: &Netns,
    client: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<bool> {
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let server_ns = server.clone();
    let srv = thread::Builder::new()
        .name(format!("probe-server-{}", server.name()))
        .spawn(move || -> Result<bool> {
            let l = bind_in(&server_ns, addr)?;
            let _ = ready_tx.send(());
            let Ok((mut s, _)) = accept_until(&l, Instant::now() + timeout) else {
                return Ok(false);
            };
            s.set_read_timeout(Some(timeout))?;
            let mut b = [0u8; 1];
            Ok(s.read_exact(&mut b).is_ok() && s.write_all(&b).is_ok())
        })
        .context("spawning probe server")?;
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        return Err(join(srv, "probe server")
            .err()
            .unwrap_or_else(|| anyhow!("probe server never became ready")));
    }
    let client_ns = client.clone();
    let cli = thread::Builder::new()
        .name(format!("probe-client-{}", client.name()))
        .spawn(move || -> Result<bool> {
            client_ns.enter_current_thread()?;
            let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
                return Ok(false);
            };
            s.set_read_timeout(Some(timeout))?;
            let mut b = [0x5a];
            Ok(s.write_all(&b).is_ok() && s.read_exact(&mut b).is_ok() && b == [0x5a])
        })
        .context("spawning probe client")?;
    let c = join(cli, "probe client")?;
    let s = join(srv, "probe server")?;
    Ok(c && s)
}
