//! The DNS forwarder's shell: the sockets around `vpcgate_dns::Forwarder`.
//!
//! It answers on our tunnel addresses, port 53, UDP and TCP, on sockets
//! bound to the TUN device (`SO_BINDTODEVICE`), so a query that reaches
//! the host by any other interface (the internet side, the VPC) finds no
//! socket at all. A query on the TUN has passed the data path's cryptokey
//! check, so its source address names the peer that sent it, and the
//! routing snapshot says which one: that is who its rate limit is charged
//! to. Each upstream query leaves from a fresh socket (a new random source
//! port), connected to that upstream, and lives until the forwarder is
//! done with it.
//!
//! One task owns the forwarder. Listener, connection and upstream tasks
//! feed it through two bounded queues, one for clients' queries and one
//! for upstream replies (served first, so a flood of queries cannot make
//! the answers to earlier ones late).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{
    bind, listen, setsockopt, socket, sockopt, AddressFamily, Backlog, SockFlag, SockType,
    SockaddrStorage,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use vpcgate_dns::{Config, Forwarder, Output, Result as Outcome, Stats, Ticket, Transport};
use vpcgate_plane::settings::Settings;
use vpcgate_proto::DnsStatus;

use crate::core::SharedRoutes;

/// Clients' queries waiting for the forwarder; past this UDP queries are
/// dropped (and counted) and TCP connections wait.
const QUERY_QUEUE: usize = 1024;
/// Upstream replies waiting for the forwarder.
const REPLY_QUEUE: usize = 1024;
/// The largest query taken: a question and an OPT record are far smaller;
/// anything longer is not a query we should forward.
const MAX_QUERY: usize = 4096;
/// The largest upstream reply over UDP: we advertise 1,232 bytes, so
/// anything bigger is a broken upstream, and is cut short by the read.
const MAX_UDP_REPLY: usize = 4096;
/// Datagrams read from one upstream socket before it is closed: a reply
/// and some stray ones; a flood on that port ends here.
const MAX_UPSTREAM_DATAGRAMS: usize = 16;
/// TCP connections from peers at once, and from one peer.
const MAX_TCP: usize = 64;
const MAX_TCP_PER_PEER: usize = 8;
/// A TCP connection with no query for this long is closed (RFC 7766 asks
/// for an idle timeout of seconds); a frame that has started must be
/// complete within the same time, or the connection counts as stalled.
/// These protect the connection slots from clients that hold them: a
/// well-behaved client finishes a frame in one round trip, so a
/// machine 10× slower or faster is far inside them.
const TCP_IDLE: Duration = Duration::from_secs(10);
const TCP_FRAME: Duration = Duration::from_secs(10);
/// Replies queued for one TCP client that does not read them.
const TCP_REPLIES: usize = 16;
/// An upstream task ends after this long whatever happens, well after the
/// forwarder has given up on it (it tries each upstream for 2 s).
const UPSTREAM_TASK_LIMIT: Duration = Duration::from_secs(30);
/// How often resolv.conf is read again, and a failed listener retried.
const REFRESH: Duration = Duration::from_secs(5);

/// What the forwarder should do, as the settings say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// Our tunnel addresses; empty while the forwarder is off.
    pub listen: Vec<IpAddr>,
    /// Set with `--dns-upstream`; empty: the host's resolv.conf.
    pub upstreams: Vec<IpAddr>,
    pub zones: Vec<String>,
}

impl DnsConfig {
    pub fn of(settings: &Settings) -> DnsConfig {
        DnsConfig {
            listen: settings.dns_addresses(),
            upstreams: settings.dns.upstreams.clone(),
            zones: settings.dns.zones.clone(),
        }
    }
}

#[derive(Clone)]
enum Client {
    Udp {
        socket: Arc<UdpSocket>,
        to: SocketAddr,
    },
    Tcp {
        replies: mpsc::Sender<Vec<u8>>,
    },
}

struct Query {
    peer: u64,
    client: Client,
    transport: Transport,
    wire: Vec<u8>,
}

enum Upstream {
    Reply {
        ticket: Ticket,
        from: SocketAddr,
        wire: Vec<u8>,
    },
    Failed(Ticket),
}

enum Inbound {
    Query(Query),
    Count(Outcome),
}

/// What the task reports, for status and metrics.
#[derive(Debug, Clone, Default)]
struct Report {
    listening: Vec<SocketAddr>,
    upstreams: Vec<SocketAddr>,
    source: String,
    problem: Option<String>,
    stats: Stats,
}

/// The handle the owner keeps.
pub struct Dns {
    config: watch::Sender<DnsConfig>,
    report: Arc<Mutex<Report>>,
    serving: watch::Receiver<Vec<IpAddr>>,
    task: JoinHandle<()>,
}

impl Dns {
    /// Starts the forwarder's task; it does nothing until [`Dns::apply`]
    /// gives it addresses. `device` is the TUN the listeners are bound to.
    pub fn spawn(device: String, routes: SharedRoutes, resolv_conf: Vec<PathBuf>) -> Dns {
        let (config, watched) = watch::channel(DnsConfig::default());
        let report = Arc::new(Mutex::new(Report::default()));
        let (serving_tx, serving) = watch::channel(Vec::new());
        let task = tokio::spawn(
            Service {
                device,
                routes,
                resolv_conf,
                report: report.clone(),
                serving: serving_tx,
                listeners: HashMap::new(),
                upstream_tasks: HashMap::new(),
                tcp: Arc::new(Mutex::new(TcpSlots::default())),
            }
            .run(watched),
        );
        Dns {
            config,
            report,
            serving,
            task,
        }
    }

    /// Where the forwarder answers with an upstream to ask, sorted; it
    /// changes when a listener comes or goes or the upstreams run out or
    /// come back. Only these addresses are offered to clients.
    pub fn serving(&self) -> watch::Receiver<Vec<IpAddr>> {
        self.serving.clone()
    }

    /// Follows the settings; a call that changes nothing does nothing.
    pub fn apply(&self, settings: &Settings) {
        send_if_changed(&self.config, DnsConfig::of(settings));
    }

    /// The forwarder's counters, for metrics; `None` while it is off.
    pub fn stats(&self) -> Option<Stats> {
        if self.config.borrow().listen.is_empty() {
            return None;
        }
        Some(self.report.lock().ok()?.stats.clone())
    }

    pub fn status(&self) -> Option<DnsStatus> {
        let config = self.config.borrow().clone();
        if config.listen.is_empty() {
            return None;
        }
        let report = self.report.lock().ok()?.clone();
        let strings = |list: &[SocketAddr]| list.iter().map(ToString::to_string).collect();
        Some(DnsStatus {
            listening: strings(&report.listening),
            upstreams: strings(&report.upstreams),
            upstream_source: report.source,
            zones: config.zones,
            problem: report.problem,
            queries: report.stats.queries_udp + report.stats.queries_tcp,
            cache_hits: report.stats.result(Outcome::Cache),
            cache_entries: report.stats.cache_entries,
        })
    }
}

/// Publishes `value` only if it differs from what the channel holds, so
/// that receivers wake for changes only.
fn send_if_changed<T: PartialEq>(tx: &watch::Sender<T>, value: T) {
    tx.send_if_modified(|current| {
        let changed = *current != value;
        if changed {
            *current = value;
        }
        changed
    });
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Default)]
struct TcpSlots {
    total: usize,
    by_peer: HashMap<u64, usize>,
}

/// One TCP connection's place in [`TcpSlots`], given back when it ends.
struct TcpSlot {
    slots: Arc<Mutex<TcpSlots>>,
    peer: u64,
}

impl TcpSlot {
    fn take(slots: &Arc<Mutex<TcpSlots>>, peer: u64) -> Option<TcpSlot> {
        let mut s = slots.lock().ok()?;
        let mine = s.by_peer.get(&peer).copied().unwrap_or(0);
        if s.total >= MAX_TCP || mine >= MAX_TCP_PER_PEER {
            return None;
        }
        s.total += 1;
        s.by_peer.insert(peer, mine + 1);
        Some(TcpSlot {
            slots: slots.clone(),
            peer,
        })
    }
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        if let Ok(mut s) = self.slots.lock() {
            s.total = s.total.saturating_sub(1);
            if let Some(n) = s.by_peer.get_mut(&self.peer) {
                *n -= 1;
                if *n == 0 {
                    s.by_peer.remove(&self.peer);
                }
            }
        }
    }
}

/// The UDP and TCP listeners on one address; their tasks end with it.
struct Listener {
    tasks: [JoinHandle<()>; 2],
}

impl Drop for Listener {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct Service {
    device: String,
    routes: SharedRoutes,
    resolv_conf: Vec<PathBuf>,
    report: Arc<Mutex<Report>>,
    serving: watch::Sender<Vec<IpAddr>>,
    listeners: HashMap<IpAddr, Listener>,
    upstream_tasks: HashMap<Ticket, JoinHandle<()>>,
    tcp: Arc<Mutex<TcpSlots>>,
}

impl Service {
    async fn run(mut self, mut config: watch::Receiver<DnsConfig>) {
        let (queries_tx, mut queries) = mpsc::channel::<Inbound>(QUERY_QUEUE);
        let (replies_tx, mut replies) = mpsc::channel::<Upstream>(REPLY_QUEUE);
        let mut forwarder: Forwarder<Client, _> = Forwarder::new(
            Config::default(),
            rand_core::OsRng,
            std::time::Instant::now(),
        );
        let mut current = DnsConfig::default();
        let mut refresh = tokio::time::interval(REFRESH);
        loop {
            let deadline = forwarder.next_deadline();
            let timer = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                    None => futures::future::pending().await,
                }
            };
            let now = std::time::Instant::now;
            let outputs = tokio::select! {
                biased;
                Some(reply) = replies.recv() => match reply {
                    Upstream::Reply { ticket, from, wire } => {
                        forwarder.handle_reply(ticket, from, &wire, now())
                    }
                    Upstream::Failed(ticket) => forwarder.handle_failure(ticket, now()),
                },
                () = timer => forwarder.handle_timeout(now()),
                changed = config.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    current = config.borrow_and_update().clone();
                    self.reconfigure(&current, &mut forwarder, &queries_tx);
                    Vec::new()
                }
                _ = refresh.tick() => {
                    self.reconfigure(&current, &mut forwarder, &queries_tx);
                    Vec::new()
                }
                Some(inbound) = queries.recv() => match inbound {
                    Inbound::Query(q) => forwarder.handle_query(q.peer, q.client, q.transport, &q.wire, now()),
                    Inbound::Count(result) => {
                        forwarder.count(result);
                        Vec::new()
                    }
                },
            };
            self.perform(outputs, &replies_tx);
            if let Ok(mut report) = self.report.lock() {
                report.stats = forwarder.stats();
            }
        }
    }

    /// Listens where `config` says and reads the upstreams again. Safe to
    /// call any number of times: what is already right stays.
    fn reconfigure(
        &mut self,
        config: &DnsConfig,
        forwarder: &mut Forwarder<Client, rand_core::OsRng>,
        queries: &mpsc::Sender<Inbound>,
    ) {
        let mut problems = Vec::new();
        self.listeners
            .retain(|addr, _| config.listen.contains(addr));
        for &addr in &config.listen {
            if self.listeners.contains_key(&addr) {
                continue;
            }
            match self.listen(addr, queries) {
                Ok(listener) => {
                    tracing::info!(address = %addr, "DNS forwarder listening on {addr} port 53 (UDP and TCP, {} only)", self.device);
                    self.listeners.insert(addr, listener);
                }
                Err(e) => problems.push(format!(
                    "cannot listen on {}: {e}",
                    SocketAddr::new(addr, 53)
                )),
            }
        }
        let (upstreams, source, problem) = if config.listen.is_empty() {
            (Vec::new(), String::new(), None)
        } else {
            find_upstreams(config, &self.resolv_conf)
        };
        problems.extend(problem);
        if upstreams != forwarder.upstreams() && !config.listen.is_empty() {
            let list: Vec<String> = upstreams.iter().map(ToString::to_string).collect();
            tracing::info!("DNS upstreams: {} (from {source})", list.join(", "));
        }
        forwarder.set_upstreams(upstreams.clone());
        let mut serving: Vec<IpAddr> = match upstreams.is_empty() {
            true => Vec::new(),
            false => self.listeners.keys().copied().collect(),
        };
        serving.sort();
        send_if_changed(&self.serving, serving);
        let problem = (!problems.is_empty()).then(|| problems.join("; "));
        if let Ok(mut report) = self.report.lock() {
            if problem.is_some() && problem != report.problem {
                tracing::warn!("DNS forwarder: {}", problem.as_deref().unwrap_or_default());
            }
            let mut listening: Vec<SocketAddr> = self
                .listeners
                .keys()
                .map(|a| SocketAddr::new(*a, 53))
                .collect();
            listening.sort();
            report.listening = listening;
            report.upstreams = upstreams;
            report.source = source;
            report.problem = problem;
        }
    }

    fn listen(&self, addr: IpAddr, queries: &mpsc::Sender<Inbound>) -> io::Result<Listener> {
        let udp = UdpSocket::from_std(std::net::UdpSocket::from(bound_socket(
            addr,
            SockType::Datagram,
            &self.device,
        )?))?;
        let tcp = TcpListener::from_std(std::net::TcpListener::from(bound_socket(
            addr,
            SockType::Stream,
            &self.device,
        )?))?;
        let udp = tokio::spawn(udp_loop(
            Arc::new(udp),
            self.routes.clone(),
            queries.clone(),
        ));
        let tcp = tokio::spawn(tcp_loop(
            tcp,
            self.routes.clone(),
            queries.clone(),
            self.tcp.clone(),
        ));
        Ok(Listener { tasks: [udp, tcp] })
    }

    fn perform(&mut self, outputs: Vec<Output<Client>>, replies: &mpsc::Sender<Upstream>) {
        for output in outputs {
            match output {
                Output::Reply {
                    client: Client::Udp { socket, to },
                    wire,
                } => {
                    // A full send buffer drops the answer; the client asks again.
                    let _ = socket.try_send_to(&wire, to);
                }
                Output::Reply {
                    client: Client::Tcp { replies },
                    wire,
                } => {
                    let _ = replies.try_send(wire);
                }
                Output::Send(send) => {
                    let ticket = send.ticket;
                    let task = tokio::spawn(upstream_exchange(send, replies.clone()));
                    self.upstream_tasks.insert(ticket, task);
                }
                Output::Close(ticket) => {
                    if let Some(task) = self.upstream_tasks.remove(&ticket) {
                        task.abort();
                    }
                }
            }
        }
        self.upstream_tasks.retain(|_, task| !task.is_finished());
    }
}

/// The upstreams to use, where they came from, and what is wrong if none.
fn find_upstreams(
    config: &DnsConfig,
    resolv_conf: &[PathBuf],
) -> (Vec<SocketAddr>, String, Option<String>) {
    if !config.upstreams.is_empty() {
        let list = config
            .upstreams
            .iter()
            .map(|ip| SocketAddr::new(*ip, 53))
            .collect();
        return (list, "vpcgate set --dns-upstream".into(), None);
    }
    for path in resolv_conf {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                let shown = path.display().to_string();
                return (
                    Vec::new(),
                    shown,
                    Some(format!("cannot read {}: {e}", path.display())),
                );
            }
        };
        return from_resolv_conf(&text, path, &config.listen);
    }
    (
        Vec::new(),
        String::new(),
        Some(format!(
            "none of {} exists; give the resolvers with `vpcgate set --dns-upstream IP`",
            resolv_conf
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    )
}

fn from_resolv_conf(
    text: &str,
    path: &Path,
    own: &[IpAddr],
) -> (Vec<SocketAddr>, String, Option<String>) {
    let scope = |name: &str| nix::net::if_::if_nametoindex(name).ok();
    // Our own addresses there would make us ask ourselves.
    let list: Vec<SocketAddr> = vpcgate_dns::resolv::nameservers(text, scope)
        .into_iter()
        .filter(|s| !own.contains(&s.ip()))
        .collect();
    let shown = path.display().to_string();
    if list.is_empty() {
        let problem = format!(
            "{shown} lists no name server to forward to; give one with `vpcgate set --dns-upstream IP`"
        );
        return (list, shown, Some(problem));
    }
    (list, shown, None)
}

/// A socket on `addr` port 53 that only the TUN's traffic reaches.
/// `IP_FREEBIND` lets it bind before the kernel has put the address on the
/// link (we set it there ourselves a moment earlier or later).
fn bound_socket(addr: IpAddr, kind: SockType, device: &str) -> io::Result<OwnedFd> {
    let family = match addr {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        kind,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    setsockopt(&fd, sockopt::IpFreebind, &true)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    setsockopt(&fd, sockopt::BindToDevice, &OsString::from(device))?;
    let sockaddr = SockaddrStorage::from(SocketAddr::new(addr, 53));
    bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &sockaddr)?;
    if kind == SockType::Stream {
        listen(&fd, Backlog::new(64).map_err(io::Error::from)?)?;
    }
    Ok(fd)
}

/// The peer that owns `addr` in the routing snapshot.
fn peer_of(routes: &SharedRoutes, addr: IpAddr) -> Option<u64> {
    routes.load().peers.lookup(addr)
}

async fn udp_loop(socket: Arc<UdpSocket>, routes: SharedRoutes, queries: mpsc::Sender<Inbound>) {
    // One byte more than a query may have, to tell a long one from a fit.
    let mut buf = vec![0u8; MAX_QUERY + 1];
    loop {
        let (len, from) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                // Not expected on a bound, unconnected socket; a pause
                // keeps a lasting error from spinning.
                tracing::debug!("DNS UDP receive failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(peer) = peer_of(&routes, from.ip()) else {
            let _ = queries.try_send(Inbound::Count(Outcome::Outside));
            continue;
        };
        let inbound = if len > MAX_QUERY {
            Inbound::Count(Outcome::Malformed)
        } else {
            Inbound::Query(Query {
                peer,
                client: Client::Udp {
                    socket: socket.clone(),
                    to: from,
                },
                transport: Transport::Udp,
                wire: buf[..len].to_vec(),
            })
        };
        if queries.try_send(inbound).is_err() {
            // The forwarder is behind: this query is lost, as on a full
            // socket buffer. Counted when there is room to count it.
            let _ = queries.try_send(Inbound::Count(Outcome::Overloaded));
        }
    }
}

async fn tcp_loop(
    listener: TcpListener,
    routes: SharedRoutes,
    queries: mpsc::Sender<Inbound>,
    slots: Arc<Mutex<TcpSlots>>,
) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, most likely: wait for some to close
                // rather than spin.
                tracing::debug!("DNS TCP accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(peer) = peer_of(&routes, from.ip()) else {
            let _ = queries.try_send(Inbound::Count(Outcome::Outside));
            continue;
        };
        let Some(slot) = TcpSlot::take(&slots, peer) else {
            let _ = queries.try_send(Inbound::Count(Outcome::Overloaded));
            continue;
        };
        tokio::spawn(tcp_connection(stream, peer, queries.clone(), slot));
    }
}

/// Why a TCP frame was not read.
enum FrameError {
    Closed,
    Oversized,
}

/// One client connection: queries in, pipelined, each answered as soon as
/// its answer is there (RFC 7766 allows any order; the IDs match them up).
async fn tcp_connection(
    stream: TcpStream,
    peer: u64,
    queries: mpsc::Sender<Inbound>,
    _slot: TcpSlot,
) {
    let (mut reader, mut writer) = stream.into_split();
    let (replies, mut pending) = mpsc::channel::<Vec<u8>>(TCP_REPLIES);
    let write = async move {
        while let Some(wire) = pending.recv().await {
            let Ok(len) = u16::try_from(wire.len()) else {
                continue;
            };
            let frame = [&len.to_be_bytes()[..], &wire].concat();
            match tokio::time::timeout(TCP_FRAME, writer.write_all(&frame)).await {
                Ok(Ok(())) => {}
                _ => return,
            }
        }
    };
    let read = async move {
        loop {
            let mut first = [0u8; 1];
            match tokio::time::timeout(TCP_IDLE, reader.read(&mut first)).await {
                Ok(Ok(1)) => {}
                _ => return,
            }
            let frame = async {
                let mut second = [0u8; 1];
                reader
                    .read_exact(&mut second)
                    .await
                    .map_err(|_| FrameError::Closed)?;
                let len = usize::from(u16::from_be_bytes([first[0], second[0]]));
                if !(12..=MAX_QUERY).contains(&len) {
                    return Err(FrameError::Oversized);
                }
                let mut body = vec![0u8; len];
                reader
                    .read_exact(&mut body)
                    .await
                    .map_err(|_| FrameError::Closed)?;
                Ok(body)
            };
            let outcome = match tokio::time::timeout(TCP_FRAME, frame).await {
                Ok(Ok(wire)) => Inbound::Query(Query {
                    peer,
                    client: Client::Tcp {
                        replies: replies.clone(),
                    },
                    transport: Transport::Tcp,
                    wire,
                }),
                Ok(Err(FrameError::Oversized)) => {
                    let _ = queries.send(Inbound::Count(Outcome::Malformed)).await;
                    return;
                }
                Ok(Err(FrameError::Closed)) => return,
                Err(_) => {
                    let _ = queries.send(Inbound::Count(Outcome::Stalled)).await;
                    return;
                }
            };
            if queries.send(outcome).await.is_err() {
                return;
            }
        }
        // The reader's sender goes here; the writer ends once the last
        // answer the forwarder owes this connection is written.
    };
    // Reading stops at EOF, but answers already owed are still written.
    tokio::join!(read, write);
}

/// One upstream query from a socket of its own, until the forwarder has
/// what it needs and aborts this task.
async fn upstream_exchange(send: vpcgate_dns::Send, replies: mpsc::Sender<Upstream>) {
    let ticket = send.ticket;
    let exchange = async {
        match send.transport {
            Transport::Udp => udp_exchange(&send, &replies).await,
            Transport::Tcp => tcp_exchange(&send, &replies).await,
        }
    };
    // Running out of time needs no report: the forwarder has its own
    // deadline, long passed by then.
    if let Ok(Err(e)) = tokio::time::timeout(UPSTREAM_TASK_LIMIT, exchange).await {
        tracing::debug!(upstream = %send.upstream, "DNS upstream failed: {e}");
        let _ = replies.send(Upstream::Failed(ticket)).await;
    }
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        SocketAddr::V6(_) => SocketAddr::from(([0u16; 8], 0)),
    }
}

async fn udp_exchange(
    send: &vpcgate_dns::Send,
    replies: &mpsc::Sender<Upstream>,
) -> io::Result<()> {
    // Port 0: the kernel picks a random free port for each query.
    let socket = UdpSocket::bind(unspecified_for(send.upstream)).await?;
    socket.connect(send.upstream).await?;
    socket.send(&send.wire).await?;
    let mut buf = vec![0u8; MAX_UDP_REPLY];
    for _ in 0..MAX_UPSTREAM_DATAGRAMS {
        let len = socket.recv(&mut buf).await?;
        let reply = Upstream::Reply {
            ticket: send.ticket,
            from: send.upstream,
            wire: buf[..len].to_vec(),
        };
        if replies.send(reply).await.is_err() {
            break;
        }
    }
    Ok(())
}

async fn tcp_exchange(
    send: &vpcgate_dns::Send,
    replies: &mpsc::Sender<Upstream>,
) -> io::Result<()> {
    let mut stream = TcpStream::connect(send.upstream).await?;
    let len = u16::try_from(send.wire.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    stream
        .write_all(&[&len.to_be_bytes()[..], &send.wire].concat())
        .await?;
    let mut prefix = [0u8; 2];
    stream.read_exact(&mut prefix).await?;
    let mut wire = vec![0u8; usize::from(u16::from_be_bytes(prefix))];
    stream.read_exact(&mut wire).await?;
    let _ = replies
        .send(Upstream::Reply {
            ticket: send.ticket,
            from: send.upstream,
            wire,
        })
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_come_from_the_settings_else_the_first_resolv_conf() {
        let dir = std::env::temp_dir().join(format!("vpcgate-dns-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let resolved = dir.join("resolved.conf");
        let classic = dir.join("resolv.conf");
        std::fs::write(&classic, "nameserver 198.18.0.2\nnameserver 100.64.0.1\n").expect("w");
        let mut config = DnsConfig {
            listen: vec!["100.64.0.1".parse().expect("ip")],
            ..DnsConfig::default()
        };
        let paths = [resolved.clone(), classic.clone()];
        let (list, source, problem) = find_upstreams(&config, &paths);
        // Our own address is left out: we would be asking ourselves.
        assert_eq!(list, vec!["198.18.0.2:53".parse().expect("sa")]);
        assert_eq!((source, problem), (classic.display().to_string(), None));
        std::fs::write(&resolved, "nameserver 198.18.0.9\n").expect("w");
        assert_eq!(
            find_upstreams(&config, &paths).0,
            vec!["198.18.0.9:53".parse().expect("sa")]
        );
        std::fs::write(&resolved, "# nothing\n").expect("w");
        let (list, _, problem) = find_upstreams(&config, &paths);
        assert!(list.is_empty() && problem.is_some_and(|p| p.contains("--dns-upstream")));
        config.upstreams = vec!["198.18.5.5".parse().expect("ip")];
        let (list, source, problem) = find_upstreams(&config, &paths);
        assert_eq!(list, vec!["198.18.5.5:53".parse().expect("sa")]);
        assert!(source.contains("--dns-upstream") && problem.is_none());
        let none = find_upstreams(
            &DnsConfig {
                upstreams: Vec::new(),
                ..config
            },
            &[dir.join("absent")],
        );
        assert!(none.0.is_empty() && none.2.is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tcp_slots_are_bounded_per_peer_and_in_all_and_given_back() {
        let slots = Arc::new(Mutex::new(TcpSlots::default()));
        let mine: Vec<TcpSlot> = (0..MAX_TCP_PER_PEER)
            .filter_map(|_| TcpSlot::take(&slots, 1))
            .collect();
        assert_eq!(mine.len(), MAX_TCP_PER_PEER);
        assert!(TcpSlot::take(&slots, 1).is_none());
        let others: Vec<TcpSlot> = (2..200).filter_map(|p| TcpSlot::take(&slots, p)).collect();
        assert_eq!(mine.len() + others.len(), MAX_TCP);
        drop(mine);
        assert!(TcpSlot::take(&slots, 1).is_some());
        drop(others);
        let s = slots.lock().expect("lock");
        assert_eq!((s.total, s.by_peer.len()), (0, 0));
    }
}
