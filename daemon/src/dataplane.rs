//! The I/O shell around [`Node`]: one thread that owns the TUN and the UDP
//! sockets and runs the poll loop.
//!
//! The loop waits on the TUN, both UDP sockets and an eventfd that the
//! control plane rings after queueing a [`Command`]. Whatever is ready is fed
//! to the core in batches of at most [`BATCH`] packets per source, so one busy
//! direction cannot starve the other or the timers. Buffers are allocated once
//! when the thread starts; the loop itself allocates nothing.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    bind, getsockname, recvfrom, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags,
    SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage,
};

use crate::core::{Change, DropCounters, Event, Node, SharedRoutes, Transmit, BUF_SIZE};

/// Packets taken from one source before the loop looks at the others. Large
/// enough to amortise the poll call, small enough to keep latency fair.
pub const BATCH: usize = 64;

/// Socket buffers sized for a burst of a few hundred full-size datagrams;
/// the kernel counts this memory, not us, and it does not grow with load.
const SOCKET_BUFFER: usize = 1 << 20;

pub enum Command {
    Apply(Vec<Change>),
    Sockets(UdpSockets),
    SetFwmark(u32),
    /// Answered once every earlier command has been applied.
    Barrier(tokio::sync::oneshot::Sender<()>),
    Shutdown,
}

/// The listen port's sockets: one per address family, each bound to the
/// same port. IPv6 is optional: a host without it still serves IPv4.
pub struct UdpSockets {
    pub v4: OwnedFd,
    pub v6: Option<OwnedFd>,
    pub port: u16,
}

impl UdpSockets {
    /// Binds the port on both families; port 0 picks one free on both.
    pub fn bind(port: u16, fwmark: u32) -> io::Result<UdpSockets> {
        let mut last_err = None;
        for _ in 0..16 {
            let v4 = udp_socket(AddressFamily::Inet, fwmark)?;
            bind(
                v4.as_raw_fd(),
                &SockaddrIn::from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
            )?;
            let bound = getsockname::<SockaddrIn>(v4.as_raw_fd())?.port();
            let v6 = match udp_socket(AddressFamily::Inet6, fwmark) {
                Ok(fd) => fd,
                Err(Errno::EAFNOSUPPORT) => {
                    tracing::warn!("IPv6 is not available; listening on IPv4 only");
                    return Ok(UdpSockets {
                        v4,
                        v6: None,
                        port: bound,
                    });
                }
                Err(e) => return Err(e.into()),
            };
            setsockopt(&v6, sockopt::Ipv6V6Only, &true)?;
            let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, bound, 0, 0));
            match bind(v6.as_raw_fd(), &addr) {
                Ok(()) => {
                    return Ok(UdpSockets {
                        v4,
                        v6: Some(v6),
                        port: bound,
                    })
                }
                // The port we were given for IPv4 is taken on IPv6: try another.
                Err(Errno::EADDRINUSE) if port == 0 => last_err = Some(Errno::EADDRINUSE),
                Err(Errno::EADDRNOTAVAIL | Errno::EAFNOSUPPORT) => {
                    tracing::warn!("IPv6 is not available; listening on IPv4 only");
                    return Ok(UdpSockets {
                        v4,
                        v6: None,
                        port: bound,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last_err.unwrap_or(Errno::EADDRINUSE).into())
    }

    pub fn set_fwmark(&self, fwmark: u32) -> io::Result<()> {
        setsockopt(&self.v4, sockopt::Mark, &fwmark)?;
        if let Some(v6) = &self.v6 {
            setsockopt(v6, sockopt::Mark, &fwmark)?;
        }
        Ok(())
    }
}

fn udp_socket(family: AddressFamily, fwmark: u32) -> Result<OwnedFd, Errno> {
    let fd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // Forcing past rmem_max needs CAP_NET_ADMIN, which we have in production;
    // without it the plain option is capped by the kernel, which is fine.
    if setsockopt(&fd, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(&fd, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if setsockopt(&fd, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(&fd, sockopt::SndBuf, &SOCKET_BUFFER);
    }
    if fwmark != 0 {
        setsockopt(&fd, sockopt::Mark, &fwmark)?;
    }
    Ok(fd)
}

/// The control plane's end of the data-path thread.
pub struct Dataplane {
    commands: mpsc::Sender<Command>,
    wake: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
    /// Loop iterations so far; a watchdog can see that the loop turns.
    pub heartbeat: Arc<AtomicU64>,
}

impl Dataplane {
    /// Starts the thread. `on_exit` fires when it stops for any reason.
    pub fn spawn(
        tun: OwnedFd,
        sockets: UdpSockets,
        routes: SharedRoutes,
        counters: Arc<DropCounters>,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
        on_exit: tokio::sync::oneshot::Sender<io::Result<()>>,
    ) -> io::Result<Dataplane> {
        nix::fcntl::fcntl(
            tun.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )?;
        let wake = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC,
        )?);
        let (commands, inbox) = mpsc::channel();
        let heartbeat = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new()
            .name("dataplane".into())
            .spawn({
                let wake = wake.clone();
                let heartbeat = heartbeat.clone();
                move || {
                    let node = Node::new(routes, counters, Instant::now());
                    let mut worker = Worker {
                        node,
                        tun,
                        sockets,
                        inbox,
                        wake,
                        heartbeat,
                        events,
                    };
                    let result = worker.run();
                    if let Err(e) = &result {
                        tracing::error!("data path stopped: {e}");
                    }
                    let _ = on_exit.send(result);
                }
            })?;
        Ok(Dataplane {
            commands,
            wake,
            thread: Some(thread),
            heartbeat,
        })
    }

    pub fn send(&self, command: Command) {
        if self.commands.send(command).is_ok() {
            let _ = self.wake.write(1);
        }
    }

    /// Applies changes and waits until the data path has them.
    pub async fn apply(&self, changes: Vec<Change>) {
        if !changes.is_empty() {
            self.send(Command::Apply(changes));
        }
        self.barrier().await;
    }

    pub async fn barrier(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.send(Command::Barrier(tx));
        let _ = rx.await;
    }

    /// Stops the thread and waits for it; its TUN and sockets close with it.
    pub fn shutdown(mut self) {
        self.send(Command::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Worker {
    node: Node,
    tun: OwnedFd,
    sockets: UdpSockets,
    inbox: mpsc::Receiver<Command>,
    wake: Arc<EventFd>,
    heartbeat: Arc<AtomicU64>,
    /// Events are rare (a trusted peer's route set changed), so an unbounded
    /// channel costs nothing on the data path.
    events: tokio::sync::mpsc::UnboundedSender<Event>,
}

/// The real sockets, as the core's output sink.
struct Io<'a> {
    tun: BorrowedFd<'a>,
    v4: BorrowedFd<'a>,
    v6: Option<BorrowedFd<'a>>,
}

impl Transmit for Io<'_> {
    fn send_udp(&mut self, to: SocketAddr, datagram: &[u8]) -> bool {
        let result = match to {
            SocketAddr::V4(a) => send_with_retry(self.v4, datagram, &SockaddrIn::from(a)),
            SocketAddr::V6(a) => match self.v6 {
                Some(fd) => send_with_retry(fd, datagram, &SockaddrIn6::from(a)),
                None => Err(Errno::EAFNOSUPPORT),
            },
        };
        if let Err(e) = result {
            tracing::trace!("send to {to} failed: {e}");
        }
        result.is_ok()
    }

    fn write_tun(&mut self, packet: &[u8]) {
        if let Err(e) = nix::unistd::write(self.tun, packet) {
            tracing::trace!("TUN write failed: {e}");
        }
    }
}

/// A full socket buffer is waited out briefly rather than dropping at once:
/// TCP over the tunnel backs off far more on loss than on a short wait.
fn send_with_retry(
    fd: BorrowedFd<'_>,
    datagram: &[u8],
    to: &dyn nix::sys::socket::SockaddrLike,
) -> Result<usize, Errno> {
    for _ in 0..2 {
        match sendto(fd.as_raw_fd(), datagram, to, MsgFlags::empty()) {
            Err(Errno::EAGAIN) => {
                let mut pfd = [PollFd::new(fd, PollFlags::POLLOUT)];
                let _ = poll(&mut pfd, PollTimeout::from(10u8));
            }
            other => return other,
        }
    }
    Err(Errno::EAGAIN)
}

impl Worker {
    fn run(&mut self) -> io::Result<()> {
        let mut rx = vec![0u8; BUF_SIZE].into_boxed_slice();
        let mut buf = vec![0u8; BUF_SIZE].into_boxed_slice();
        loop {
            self.heartbeat.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            let wait = self.node.next_timer().saturating_duration_since(now);
            let timeout = PollTimeout::try_from(wait.as_millis().clamp(1, 1000) as i32)
                .unwrap_or(PollTimeout::MAX);

            let v6 = self.sockets.v6.as_ref().map(AsFd::as_fd);
            let mut fds = [
                PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.tun.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.sockets.v4.as_fd(), PollFlags::POLLIN),
                PollFd::new(v6.unwrap_or(self.sockets.v4.as_fd()), PollFlags::POLLIN),
            ];
            match poll(&mut fds, timeout) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
            let ready: [bool; 4] = std::array::from_fn(|i| {
                fds[i]
                    .revents()
                    .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLERR))
            });

            if ready[0] && !self.handle_commands() {
                return Ok(());
            }

            let now = Instant::now();
            let mut io = Io {
                tun: self.tun.as_fd(),
                v4: self.sockets.v4.as_fd(),
                v6: self.sockets.v6.as_ref().map(AsFd::as_fd),
            };
            if ready[1] {
                for _ in 0..BATCH {
                    match nix::unistd::read(self.tun.as_raw_fd(), &mut rx) {
                        Ok(0) => return Err(io::Error::other("the TUN device went away")),
                        Ok(n) => self
                            .node
                            .handle_tun_packet(&mut rx[..n], &mut buf, now, &mut io),
                        Err(Errno::EAGAIN | Errno::EINTR) => break,
                        Err(Errno::EBADFD | Errno::ENODEV) => {
                            return Err(io::Error::other("the TUN device went away"))
                        }
                        Err(e) => {
                            tracing::debug!("TUN read failed: {e}");
                            break;
                        }
                    }
                }
            }
            let udp = [Some(io.v4), io.v6];
            for (i, fd) in udp.into_iter().enumerate() {
                let Some(fd) = fd.filter(|_| ready[2 + i]) else {
                    continue;
                };
                for _ in 0..BATCH {
                    match recvfrom::<SockaddrStorage>(fd.as_raw_fd(), &mut rx) {
                        Ok((n, Some(from))) => {
                            let Some(from) = socket_addr(&from) else {
                                continue;
                            };
                            self.node
                                .handle_datagram(from, &rx[..n], &mut buf, now, &mut io);
                        }
                        Ok((_, None)) => continue,
                        Err(Errno::EAGAIN | Errno::EINTR) => break,
                        // ICMP errors from earlier sends surface here; they are
                        // not ours to act on.
                        Err(_) => break,
                    }
                }
            }
            self.node
                .handle_timers(Instant::now(), SystemTime::now(), &mut buf, &mut io);
            for event in self.node.drain_events() {
                let _ = self.events.send(event);
            }
        }
    }

    /// Returns false on shutdown.
    fn handle_commands(&mut self) -> bool {
        let _ = self.wake.read();
        while let Ok(command) = self.inbox.try_recv() {
            match command {
                Command::Apply(changes) => {
                    for change in changes {
                        self.node.apply(change);
                    }
                }
                Command::Sockets(sockets) => self.sockets = sockets,
                Command::SetFwmark(fwmark) => {
                    if let Err(e) = self.sockets.set_fwmark(fwmark) {
                        tracing::warn!("cannot set fwmark {fwmark}: {e}");
                    }
                }
                Command::Barrier(done) => {
                    let _ = done.send(());
                }
                Command::Shutdown => return false,
            }
        }
        true
    }
}

fn socket_addr(addr: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(a) = addr.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::new(a.ip(), a.port())));
    }
    addr.as_sockaddr_in6().map(|a| {
        SocketAddr::V6(SocketAddrV6::new(
            a.ip(),
            a.port(),
            a.flowinfo(),
            a.scope_id(),
        ))
    })
}
