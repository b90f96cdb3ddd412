//! Traffic between namespaces: ping, byte-for-byte verified TCP transfers,
//! and interface packet counters.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::guide::nft_counters;
use crate::netns::{wait_until, Netns};

/// A stalled transfer fails after this long instead of hanging the suite.
const IO_TIMEOUT: Duration = Duration::from_secs(60);
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
const CHUNK: usize = 64 * 1024;

/// Deterministic pseudo-random byte stream (xorshift64*), generated on the
/// fly so that any amount of data can be sent and checked in O(1) memory.
#[derive(Clone, Debug)]
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern {
            // xorshift has a fixed point at 0.
            state: seed | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_word(&mut self) -> [u8; 8] {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes()
    }

    /// Fills `out` with the next `out.len()` bytes of the stream.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut i = 0;
        while i < out.len() && self.used < 8 {
            out[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        let mut words = out[i..].chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_word());
        }
        let tail = words.into_remainder();
        if !tail.is_empty() {
            self.word = self.next_word();
            let n = tail.len();
            tail.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }
}

/// Outcome of [`tcp_transfer`]; the durations are informational only.
#[derive(Clone, Debug)]
pub struct Transfer {
    pub bytes: u64,
    pub client_to_server: Duration,
    pub server_to_client: Duration,
    /// The client address of each of the two connections as the server's
    /// `accept` saw it (after any NAT on the way).
    pub server_saw: [SocketAddr; 2],
}

fn mbit_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64().max(1e-9) / 1e6
}

/// Sends `bytes` of `Pattern::new(seed)`, half-closes, and waits for the
/// receiver to close its side.
fn send_pattern(mut s: TcpStream, seed: u64, bytes: u64) -> Result<Duration> {
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let start = Instant::now();
    let mut pat = Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        pat.fill(&mut buf[..n]);
        s.write_all(&buf[..n])
            .with_context(|| format!("send failed after {sent} of {bytes} bytes"))?;
        sent += n as u64;
    }
    s.shutdown(Shutdown::Write)
        .context("shutdown(SHUT_WR) after sending")?;
    // The receiver closes once it has read and checked everything.
    let mut sink = [0u8; 64];
    loop {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(n) => bail!("receiver unexpectedly sent {n} bytes back"),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("waiting for the receiver to close"),
        }
    }
    Ok(start.elapsed())
}

/// Reads until EOF, checking every byte against `Pattern::new(seed)` and the
/// total against `bytes`.
fn receive_verified(mut s: TcpStream, seed: u64, bytes: u64) -> Result<Duration> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let start = Instant::now();
    verify_stream(&mut s, seed, bytes)?;
    Ok(start.elapsed())
}

/// Reads `r` to EOF and checks it is exactly `bytes` of `Pattern::new(seed)`;
/// the error names the first mismatching offset.
fn verify_stream(r: &mut impl Read, seed: u64, bytes: u64) -> Result<()> {
    let mut pat = Pattern::new(seed);
    let mut buf = vec![0u8; 4 * CHUNK];
    let mut want = vec![0u8; 4 * CHUNK];
    let mut got = 0u64;
    loop {
        let n = match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("receive failed after {got} of {bytes} bytes (stall or reset)")
                })
            }
        };
        if got + n as u64 > bytes {
            bail!("received more than the {bytes} bytes sent");
        }
        pat.fill(&mut want[..n]);
        if buf[..n] != want[..n] {
            let i = buf[..n]
                .iter()
                .zip(&want[..n])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            bail!(
                "data corrupted at byte offset {}: got {:#04x}, want {:#04x}",
                got + i as u64,
                buf[i],
                want[i]
            );
        }
        got += n as u64;
    }
    if got != bytes {
        bail!("stream ended after {got} of {bytes} bytes");
    }
    Ok(())
}

pub(crate) fn accept_with_deadline(listener: &TcpListener) -> Result<(TcpStream, SocketAddr)> {
    accept_until(listener, Instant::now() + ACCEPT_TIMEOUT)
}

/// Accepts one connection on a non-blocking listener, or fails at `deadline`.
pub(crate) fn accept_until(
    listener: &TcpListener,
    deadline: Instant,
) -> Result<(TcpStream, SocketAddr)> {
    loop {
        match listener.accept() {
            Ok((s, peer)) => {
                s.set_nonblocking(false)?;
                return Ok((s, peer));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                if Instant::now() >= deadline {
                    bail!("no connection arrived in time");
                }
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
}

pub(crate) fn join<T>(h: thread::JoinHandle<Result<T>>, who: &str) -> Result<T> {
    match h.join() {
        Ok(r) => r.with_context(|| format!("{who} side")),
        Err(_) => Err(anyhow!("{who} thread panicked")),
    }
}

/// Transfers `bytes` from client to server and then `bytes` from server to
/// client over two TCP connections to `server_addr:port`, checking every
/// byte. The server listens inside `server`, the client connects from inside
/// `client`; each runs on its own thread that has entered its namespace.
pub fn tcp_transfer(
    server: &Netns,
    client: &Netns,
    server_addr: IpAddr,
    port: u16,
    bytes: u64,
) -> Result<Transfer> {
    const SEED_UP: u64 = 0x9e37_79b9_7f4a_7c15;
    const SEED_DOWN: u64 = 0xd1b5_4a32_d192_ed03;
    let addr = SocketAddr::new(server_addr, port);
    let (ready_tx, ready_rx) = mpsc::channel::<()>();

    let server_ns = server.clone();
    let srv = thread::Builder::new()
        .name(format!("tcp-server-{}", server.name()))
        .spawn(move || -> Result<(Duration, [SocketAddr; 2])> {
            server_ns.enter_current_thread()?;
            let listener = TcpListener::bind(addr)
                .with_context(|| format!("bind {addr} in {}", server_ns.name()))?;
            listener.set_nonblocking(true)?;
            // The receiver is gone only if the client thread already failed.
            let _ = ready_tx.send(());
            let (up, saw_up) = accept_with_deadline(&listener).context("first connection")?;
            receive_verified(up, SEED_UP, bytes).context("client -> server")?;
            let (down, saw_down) = accept_with_deadline(&listener).context("second connection")?;
            let took = send_pattern(down, SEED_DOWN, bytes).context("server -> client")?;
            Ok((took, [saw_up, saw_down]))
        })
        .context("spawning server thread")?;

    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        return Err(join(srv, "server")
            .err()
            .unwrap_or_else(|| anyhow!("server never became ready")));
    }

    let client_ns = client.clone();
    let cli = thread::Builder::new()
        .name(format!("tcp-client-{}", client.name()))
        .spawn(move || -> Result<(Duration, Duration)> {
            client_ns.enter_current_thread()?;
            let connect = || {
                TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
                    .with_context(|| format!("connect to {addr} from {}", client_ns.name()))
            };
            let up = send_pattern(connect()?, SEED_UP, bytes).context("client -> server")?;
            let down =
                receive_verified(connect()?, SEED_DOWN, bytes).context("server -> client")?;
            Ok((up, down))
        })
        .context("spawning client thread")?;

    let cli_res = join(cli, "client");
    let srv_res = join(srv, "server");
    match (cli_res, srv_res) {
        (Ok((up, _)), Ok((down, server_saw))) => {
            let t = Transfer {
                bytes,
                client_to_server: up,
                server_to_client: down,
                server_saw,
            };
            eprintln!(
                "tcp {} -> {addr} in {}: {bytes} bytes up in {:.2?} ({:.0} Mbit/s), down in {:.2?} ({:.0} Mbit/s)",
                client.name(),
                server.name(),
                t.client_to_server,
                mbit_s(bytes, t.client_to_server),
                t.server_to_client,
                mbit_s(bytes, t.server_to_client),
            );
            Ok(t)
        }
        (Err(c), Ok(_)) => Err(c),
        (Ok(_), Err(s)) => Err(s),
        (Err(c), Err(s)) => Err(anyhow!("client: {c:#}; server: {s:#}")),
    }
}

/// Result of one `ping` run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingStats {
    pub transmitted: u32,
    pub received: u32,
}

/// Runs `ping -n -c COUNT -W 1 -i 0.2 [EXTRA...] DST` in `ns` and parses the
/// summary line. Works for IPv4 and IPv6 destinations.
///
/// iputils stops as soon as every request is answered. `-W 1` bounds only a
/// run that got no reply at all: after the last request it waits 1 s. Once a
/// reply has come, it waits twice the slowest round trip seen (at least the
/// 0.2 s interval), so the wait for stragglers grows with a slow machine.
pub fn ping_stats(ns: &Netns, dst: &str, count: u32, extra: &[&str]) -> Result<PingStats> {
    let count_s = count.to_string();
    let mut argv = vec!["ping", "-n", "-c", &count_s, "-W", "1", "-i", "0.2"];
    argv.extend_from_slice(extra);
    argv.push(dst);
    let out = ns.exec_raw(&argv)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let parse = || -> Option<PingStats> {
        let line = stdout.lines().find(|l| l.contains("packets transmitted"))?;
        let mut nums = line
            .split(',')
            .map(|part| part.split_whitespace().next().and_then(|n| n.parse().ok()));
        Some(PingStats {
            transmitted: nums.next()??,
            received: nums.next()??,
        })
    };
    parse().with_context(|| {
        format!(
            "no summary from `{}` in {} ({}): {}{}",
            argv.join(" "),
            ns.name(),
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// True iff all `count` echo requests from `ns` to `dst` were answered.
pub fn ping(ns: &Netns, dst: &str, count: u32) -> bool {
    matches!(ping_stats(ns, dst, count, &[]), Ok(s) if s.received == count)
}

/// Pings once per attempt until a reply arrives or `timeout` passes; use it
/// to wait for a tunnel's first handshake. `extra` goes to ping (e.g. `-I`).
pub fn wait_for_ping(ns: &Netns, dst: &str, extra: &[&str], timeout: Duration) -> Result<()> {
    wait_until(
        timeout,
        &format!(
            "{dst} to answer ping {} from {}",
            extra.join(" "),
            ns.name()
        ),
        || Ok(ping_stats(ns, dst, 1, extra)?.received == 1),
    )
}

/// What one `iperf3` run carried, from the client's JSON report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Iperf {
    /// Bytes the server received; for UDP, 0 if it lost every datagram.
    pub received_bytes: u64,
    pub udp: bool,
}

/// Runs `iperf3` for `secs` seconds: a one-off server bound to `addr:port`
/// in `server`, the client in `client` sending to it (UDP at 50 Mbit/s with
/// `udp`). The duration is for the report only; nothing is asserted about
/// speed. Fails if either side fails or the report cannot be read.
pub fn iperf3(
    server: &Netns,
    client: &Netns,
    addr: IpAddr,
    port: u16,
    secs: u32,
    udp: bool,
) -> Result<Iperf> {
    let addr_s = addr.to_string();
    let port_s = port.to_string();
    let mut srv = server.spawn(
        &format!("iperf3-server-{port}"),
        &[
            "iperf3",
            "--server",
            "--one-off",
            "--bind",
            &addr_s,
            "--port",
            &port_s,
        ],
        &[],
    )?;
    let listening = format!("sport = :{port}");
    wait_until(
        Duration::from_secs(10),
        &format!("iperf3 to listen on {addr_s}:{port} in {}", server.name()),
        || {
            srv.check_running()?;
            Ok(!server.exec(&["ss", "-Htln", &listening])?.trim().is_empty())
        },
    )?;
    // `timeout` bounds a client stuck on a dead tunnel.
    let limit = (secs + 20).to_string();
    let secs_s = secs.to_string();
    let mut argv = vec![
        "timeout",
        &limit,
        "iperf3",
        "--client",
        &addr_s,
        "--port",
        &port_s,
        "--time",
        &secs_s,
        "--connect-timeout",
        "5000",
        "--json",
    ];
    if udp {
        argv.extend_from_slice(&["--udp", "--bitrate", "50M"]);
    }
    let out = client.exec_raw(&argv)?;
    let report = String::from_utf8_lossy(&out.stdout);
    let what = || {
        format!(
            "`{}` in {} ({}): {}{}",
            argv.join(" "),
            client.name(),
            out.status,
            report.chars().take(2000).collect::<String>(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    };
    if !out.status.success() {
        bail!("iperf3 client failed: {}", what());
    }
    let json: serde_json::Value =
        serde_json::from_str(&report).with_context(|| format!("bad JSON from {}", what()))?;
    // `sum_received` is the server's side of the run, for TCP and UDP alike.
    let received = &json["end"]["sum_received"];
    let mut received_bytes = received["bytes"]
        .as_u64()
        .with_context(|| format!("no end.sum_received.bytes in {}", what()))?;
    if udp {
        let packets = received["packets"].as_u64().unwrap_or(0);
        let lost = received["lost_packets"].as_u64().unwrap_or(0);
        if packets <= lost {
            received_bytes = 0;
        }
    }
    match srv.wait_timeout(Duration::from_secs(10))? {
        Some(status) if status.success() => {}
        Some(status) => bail!("iperf3 server exited with {status}"),
        None => bail!("iperf3 server still running after the client finished"),
    }
    eprintln!(
        "iperf3 {} {} -> {addr_s}:{port} in {}: {received_bytes} bytes in {secs} s ({:.0} Mbit/s)",
        if udp { "udp" } else { "tcp" },
        client.name(),
        server.name(),
        mbit_s(received_bytes, Duration::from_secs(u64::from(secs)))
    );
    Ok(Iperf {
        received_bytes,
        udp,
    })
}

/// Sends one UDP datagram with `payload` to each of `to` from a fresh
/// socket inside `ns` (on a thread that enters it), and returns at once.
pub fn send_udp(ns: &Netns, to: &[SocketAddr], payload: &[u8]) -> Result<()> {
    let ns = ns.clone();
    let to = to.to_vec();
    let payload = payload.to_vec();
    let sender = thread::Builder::new()
        .name(format!("udp-sender-{}", ns.name()))
        .spawn(move || -> Result<()> {
            ns.enter_current_thread()?;
            for dst in &to {
                let bind: SocketAddr = if dst.is_ipv4() {
                    (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let sock = std::net::UdpSocket::bind(bind)
                    .with_context(|| format!("bind {bind} in {}", ns.name()))?;
                sock.send_to(&payload, dst)
                    .with_context(|| format!("send to {dst} from {}", ns.name()))?;
            }
            Ok(())
        })
        .context("spawning the UDP sender thread")?;
    join(sender, "UDP sender")
}

/// Counts the UDP datagrams that processes in a namespace send to one
/// address and port, with an nftables rule in the output hook: it sees every
/// datagram a local socket sends, delivered or not.
pub struct UdpOutCounter {
    ns: Netns,
    table: String,
}

impl UdpOutCounter {
    /// Installs the rule in its own table, `inet vge2e_udp_PORT`, so
    /// counters for different ports in one namespace do not collide.
    pub fn new(ns: &Netns, to: SocketAddr) -> Result<UdpOutCounter> {
        let table = format!("vge2e_udp_{}", to.port());
        let family = if to.is_ipv4() { "ip" } else { "ip6" };
        let rules = format!(
            "table inet {table} {{\n\
             \tchain out {{\n\
             \t\ttype filter hook output priority filter; policy accept;\n\
             \t\t{family} daddr {} udp dport {} counter\n\
             \t}}\n\
             }}\n",
            to.ip(),
            to.port()
        );
        ns.exec_stdin(&["nft", "-f", "-"], rules.as_bytes())
            .with_context(|| format!("installing a UDP counter for {to} in {}", ns.name()))?;
        Ok(UdpOutCounter {
            ns: ns.clone(),
            table,
        })
    }

    /// Datagrams counted so far.
    pub fn packets(&self) -> Result<u64> {
        nft_counters(&self.ns, "inet", &self.table, "out")
    }
}

/// Sends a raw HTTP/1.1 `request` to `addr` from inside `ns` and returns the
/// whole response (the server closes the connection after it).
pub fn http_get(ns: &Netns, addr: SocketAddr, request: &str) -> Result<String> {
    thread::scope(|scope| {
        scope
            .spawn(|| -> Result<String> {
                ns.enter_current_thread()?;
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                    .with_context(|| format!("cannot connect to {addr} in {}", ns.name()))?;
                stream.set_read_timeout(Some(Duration::from_secs(10)))?;
                stream.write_all(request.as_bytes())?;
                let mut text = String::new();
                stream
                    .read_to_string(&mut text)
                    .with_context(|| format!("reading the answer from {addr}"))?;
                Ok(text)
            })
            .join()
            .map_err(|_| anyhow!("the HTTP client thread panicked"))?
    })
}

/// Packet counters from `/sys/class/net/IFACE/statistics` in a namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfaceStats {
    pub rx_packets: u64,
    pub tx_packets: u64,
}

/// Reads the counters through `ip netns exec`, which remounts /sys so that
/// it shows the namespace's interfaces.
pub fn iface_stats(ns: &Netns, iface: &str) -> Result<IfaceStats> {
    let base = format!("/sys/class/net/{iface}/statistics");
    let rx = format!("{base}/rx_packets");
    let tx = format!("{base}/tx_packets");
    let out = ns.exec(&["cat", &rx, &tx])?;
    let mut it = out.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(rx_packets)), Some(Ok(tx_packets))) => Ok(IfaceStats {
            rx_packets,
            tx_packets,
        }),
        _ => bail!("cannot parse counters of {iface} in {}: {out:?}", ns.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(seed: u64, len: usize) -> Vec<u8> {
        let mut p = Pattern::new(seed);
        let mut out = Vec::new();
        while out.len() < len {
            out.extend_from_slice(&p.next_word());
        }
        out.truncate(len);
        out
    }

    #[test]
    fn pattern_is_independent_of_chunking() {
        let want = reference(7, 1000);
        for step in [1usize, 3, 7, 8, 9, 64, 333, 1000] {
            let mut p = Pattern::new(7);
            let mut got = Vec::new();
            while got.len() < want.len() {
                let n = step.min(want.len() - got.len());
                let mut buf = vec![0u8; n];
                p.fill(&mut buf);
                got.extend_from_slice(&buf);
            }
            assert_eq!(got, want, "chunk size {step}");
        }
    }

    fn verify(data: &[u8], bytes: u64) -> Result<()> {
        verify_stream(&mut std::io::Cursor::new(data), 42, bytes)
    }

    #[test]
    fn verifier_reports_first_bad_offset() {
        let good = reference(42, 300_000);
        verify(&good, 300_000).expect("intact stream verifies");
        let mut bad = good.clone();
        bad[270_001] ^= 0x40;
        bad[270_500] ^= 0x01;
        let err = format!(
            "{:#}",
            verify(&bad, 300_000).expect_err("corruption detected")
        );
        assert!(err.contains("offset 270001"), "{err}");
        let err = format!("{:#}", verify(&good[..1000], 300_000).expect_err("short"));
        assert!(err.contains("after 1000 of 300000"), "{err}");
        assert!(verify(&good, 299_999).is_err(), "extra bytes detected");
    }

    #[test]
    fn seeds_differ() {
        assert_ne!(reference(1, 64), reference(2, 64));
        assert_ne!(reference(0, 64), vec![0u8; 64]);
    }
}
