//! The I/O shell around [`Node`]: one thread that owns the TUN and the UDP
//! sockets and runs the poll loop.
//!
//! The loop waits on the TUN, both UDP sockets and an eventfd that the
//! control plane rings after queueing a [`Command`]. Whatever is ready is
//! handled in bounded batches, so one busy direction cannot starve the other
//! or the timers:
//!
//! - **TUN to UDP.** With `IFF_VNET_HDR` and `TUNSETOFFLOAD` the kernel hands
//!   over TCP (and, from Linux 6.2, UDP) super-packets of up to 64 KiB, which
//!   tun-rs splits into MTU-sized segments. Each segment is encrypted straight
//!   into the [`Port`]'s send buffer, and consecutive datagrams to one
//!   endpoint leave in one `sendmsg` with `UDP_SEGMENT` (GSO).
//! - **UDP to TUN.** `recvmmsg` with `UDP_GRO` fills up to [`RX_BUFS`] buffers,
//!   each holding up to 64 datagrams of one flow. Each is decrypted straight
//!   into a TUN write buffer, and tun-rs's GRO table coalesces TCP segments
//!   back into super-packets before they are written.
//!
//! Every feature is detected at run time and falls back on its own: no
//! `IFF_VNET_HDR` means one packet per read and write, no GSO (Linux < 4.18)
//! one datagram per `sendmsg`, no GRO (Linux < 5.0) one datagram per
//! `recvmmsg` slot. All buffers are allocated when the thread starts (or the
//! MTU changes); the loop itself allocates nothing, and its memory has a
//! fixed ceiling whatever the load.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Instant, SystemTime};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::socket::{
    bind, getsockname, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, SockaddrIn,
    SockaddrIn6,
};
use quinn_udp::{RecvMeta, UdpSocketState};
use tun_rs::{GROTable, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::core::{
    Change, DropCounters, DropReason, Endpoint, Event, Node, SharedRoutes, Transmit, BUF_SIZE,
};

/// Output buffers for one TUN read: a 64 KiB super-packet split at the
/// smallest MSS TCP allows still fits.
const TUN_SEGMENTS: usize = 128;

/// Packets read from the TUN (after splitting) before the loop looks at the
/// sockets, and datagrams read from one socket before it looks at the TUN.
/// Large enough to amortise the poll call, small enough to keep latency fair.
const TURN_BUDGET: usize = 128;

/// Decrypted packets held for one coalesced TUN write.
const TUN_WRITE_BATCH: usize = 64;

/// Receive buffers per `recvmmsg`; with GRO each holds up to 64 datagrams.
pub const RX_BUFS: usize = 16;

/// The largest GRO'd receive the kernel builds.
const RX_BUF_SIZE: usize = 65_536;

/// Bytes in one GSO send, below IPv4's 64 KiB limit on a UDP payload.
const MAX_GSO_BYTES: usize = 65_000;

/// Socket buffers sized for a burst of a few hundred full-size datagrams;
/// the kernel counts this memory, not us, and it does not grow with load.
const SOCKET_BUFFER: usize = 1 << 20;

/// The largest packet the kernel hands over or takes back through the TUN
/// with offload on, and the capacity of each TUN write buffer.
const SUPER_PACKET: usize = 65_535;

pub enum Command {
    Apply(Vec<Change>),
    Sockets(UdpSockets),
    SetFwmark(u32),
    /// The TUN's MTU changed: segment buffers are resized to it.
    SetMtu(u32),
    /// Answered once every earlier command has been applied.
    Barrier(tokio::sync::oneshot::Sender<()>),
    Shutdown,
}

/// Why the data-path thread stopped without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// The control plane asked it to.
    Shutdown,
    /// The TUN device was deleted (`ip link del`, `wg-quick down`).
    TunGone,
}

/// Which kernel offloads the data path may use. All are on by default and
/// each still falls back when the kernel lacks it; turning one off is for
/// measuring what it brings and for testing the fallbacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offload {
    /// `IFF_VNET_HDR` and `TUNSETOFFLOAD` on the TUN.
    pub tun: bool,
    /// `UDP_SEGMENT` on send.
    pub gso: bool,
    /// `UDP_GRO` on receive.
    pub gro: bool,
}

impl Default for Offload {
    fn default() -> Self {
        Offload {
            tun: true,
            gso: true,
            gro: true,
        }
    }
}

/// One bound UDP socket and what quinn-udp learned about its kernel: how
/// many segments one GSO send may carry, and whether GRO is on.
pub struct Socket {
    socket: UdpSocket,
    state: UdpSocketState,
    v6: bool,
    offload: Offload,
    gso: bool,
    gro: bool,
}

impl Socket {
    fn new(fd: OwnedFd, v6: bool, offload: Offload) -> io::Result<Socket> {
        let socket = UdpSocket::from(fd);
        let (state, gro) = Socket::configure(&socket, v6, offload)?;
        Ok(Socket {
            socket,
            state,
            v6,
            offload,
            gso: offload.gso,
            gro,
        })
    }

    /// Lets quinn-udp probe the kernel and set its options (GRO, and
    /// `IP_PKTINFO`/`IPV6_RECVPKTINFO`, which tell us the address each
    /// datagram was sent to), then overrides what a tunnel needs otherwise.
    fn configure(
        socket: &UdpSocket,
        v6: bool,
        offload: Offload,
    ) -> io::Result<(UdpSocketState, bool)> {
        let state = UdpSocketState::new(socket.into())?;
        let gro = offload.gro && state.gro_segments() > 1;
        if !gro {
            // quinn-udp turns GRO on where the kernel has it.
            let _ = set_int(socket, libc::SOL_UDP, libc::UDP_GRO, 0);
        }
        // quinn-udp forbids fragmentation, as QUIC must. A tunnel should
        // not: like kernel WireGuard, let an outer packet that meets a
        // smaller path MTU be fragmented rather than dropped.
        if v6 {
            set_int(socket, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0)?;
            set_int(
                socket,
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DONT,
            )?;
        } else {
            set_int(
                socket,
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_DONT,
            )?;
        }
        Ok((state, gro))
    }

    /// Forgets what quinn-udp concluded from a failed send. A send from a
    /// local address that has gone fails with EINVAL, which quinn-udp also
    /// takes as the device refusing GSO, and it would stop using GSO on this
    /// socket for good. A device that really refuses GSO fails the next GSO
    /// send again, and quinn-udp turns it off again.
    fn reset_state(&mut self) {
        match Socket::configure(&self.socket, self.v6, self.offload) {
            Ok((state, gro)) => {
                self.state = state;
                self.gro = gro;
            }
            Err(e) => tracing::warn!("cannot reconfigure the UDP socket: {e}"),
        }
    }

    /// Datagrams one send may carry: 1 without GSO. quinn-udp lowers its
    /// figure to 1 if a GSO send fails with EIO or EINVAL.
    fn max_segments(&self) -> usize {
        if self.gso {
            self.state.max_gso_segments()
        } else {
            1
        }
    }

    /// Sends `contents`, cut into `segment`-byte datagrams if given. A full
    /// socket buffer is waited out briefly rather than dropping at once: TCP
    /// over the tunnel backs off far more on loss than on a short wait.
    fn send(&self, to: Endpoint, contents: &[u8], segment: Option<usize>) -> io::Result<()> {
        let transmit = quinn_udp::Transmit {
            destination: to.remote,
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: to.local,
        };
        for _ in 0..2 {
            match self.state.try_send((&self.socket).into(), &transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut pfd = [PollFd::new(self.socket.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut pfd, PollTimeout::from(10u8));
                }
                other => return other,
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }
}

fn set_int(socket: &UdpSocket, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the descriptor is open for the call, and the option value is a
    // live c_int whose size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The listen port's sockets: one per address family, each bound to the
/// same port. IPv6 is optional: a host without it still serves IPv4.
pub struct UdpSockets {
    pub v4: Socket,
    pub v6: Option<Socket>,
    pub port: u16,
}

impl UdpSockets {
    /// Binds the port on both families; port 0 picks one free on both.
    pub fn bind(port: u16, fwmark: u32, offload: Offload) -> io::Result<UdpSockets> {
        let (v4, v6, port) = bind_fds(port, fwmark)?;
        Ok(UdpSockets {
            v4: Socket::new(v4, false, offload)?,
            v6: v6.map(|fd| Socket::new(fd, true, offload)).transpose()?,
            port,
        })
    }

    pub fn set_fwmark(&self, fwmark: u32) -> io::Result<()> {
        setsockopt(&self.v4.socket, sockopt::Mark, &fwmark)?;
        if let Some(v6) = &self.v6 {
            setsockopt(&v6.socket, sockopt::Mark, &fwmark)?;
        }
        Ok(())
    }

    fn for_address(&self, to: &SocketAddr) -> Option<&Socket> {
        match to {
            SocketAddr::V4(_) => Some(&self.v4),
            SocketAddr::V6(_) => self.v6.as_ref(),
        }
    }

    fn for_address_mut(&mut self, to: &SocketAddr) -> Option<&mut Socket> {
        match to {
            SocketAddr::V4(_) => Some(&mut self.v4),
            SocketAddr::V6(_) => self.v6.as_mut(),
        }
    }

    /// What the kernel gave us, for the log.
    fn describe(&self) -> String {
        let gso = match self.v4.max_segments() {
            1 => "off".to_string(),
            n => format!("up to {n} segments"),
        };
        let gro = if self.v4.gro { "on" } else { "off" };
        format!("UDP GSO {gso}, GRO {gro}")
    }
}

fn bind_fds(port: u16, fwmark: u32) -> io::Result<(OwnedFd, Option<OwnedFd>, u16)> {
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
                return Ok((v4, None, bound));
            }
            Err(e) => return Err(e.into()),
        };
        setsockopt(&v6, sockopt::Ipv6V6Only, &true)?;
        let addr = SockaddrIn6::from(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, bound, 0, 0));
        match bind(v6.as_raw_fd(), &addr) {
            Ok(()) => return Ok((v4, Some(v6), bound)),
            // The port we were given for IPv4 is taken on IPv6: try another.
            Err(Errno::EADDRINUSE) if port == 0 => last_err = Some(Errno::EADDRINUSE),
            Err(Errno::EADDRNOTAVAIL | Errno::EAFNOSUPPORT) => {
                tracing::warn!("IPv6 is not available; listening on IPv4 only");
                return Ok((v4, None, bound));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last_err.unwrap_or(Errno::EADDRINUSE).into())
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

/// Creates the TUN with offload if the kernel has it (and `offload` allows),
/// and without if not.
pub fn create_tun(name: &str, offload: bool) -> io::Result<SyncDevice> {
    let build = |offload: bool| {
        tun_rs::DeviceBuilder::new()
            .name(name)
            .offload(offload)
            .build_sync()
    };
    if !offload {
        return build(false);
    }
    match build(true) {
        Ok(device) => Ok(device),
        Err(e) => {
            tracing::warn!("TUN offload is not available ({e}); one packet per read and write");
            build(false)
        }
    }
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
        tun: SyncDevice,
        mtu: u32,
        sockets: UdpSockets,
        routes: SharedRoutes,
        counters: Arc<DropCounters>,
        events: tokio::sync::mpsc::UnboundedSender<Event>,
        on_exit: tokio::sync::oneshot::Sender<io::Result<Stopped>>,
    ) -> io::Result<Dataplane> {
        tun.set_nonblocking(true)?;
        tracing::info!(
            "data path: TUN offload {}, {}",
            if tun.tcp_gso() { "on" } else { "off" },
            sockets.describe()
        );
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
                    let node = Node::new(routes, counters.clone(), Instant::now());
                    let mut worker = Worker {
                        node,
                        port: Port::new(tun, sockets, counters.clone()),
                        rx: Receive::new(mtu),
                        counters,
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

/// The receive side's buffers, allocated once.
struct Receive {
    /// One read from the TUN: a virtio-net header and up to 64 KiB.
    tun_raw: Box<[u8]>,
    /// The read split into segments, each as large as the MTU.
    segments: Vec<Box<[u8]>>,
    sizes: [usize; TUN_SEGMENTS],
    /// `recvmmsg` buffers and what the kernel said about each.
    udp: [Box<[u8]>; RX_BUFS],
    meta: [RecvMeta; RX_BUFS],
    /// Handshake replies, keepalives and timers.
    scratch: Box<[u8]>,
}

impl Receive {
    fn new(mtu: u32) -> Receive {
        let mut rx = Receive {
            tun_raw: vec![0; VIRTIO_NET_HDR_LEN + SUPER_PACKET].into_boxed_slice(),
            segments: Vec::new(),
            sizes: [0; TUN_SEGMENTS],
            udp: std::array::from_fn(|_| vec![0; RX_BUF_SIZE].into_boxed_slice()),
            meta: [RecvMeta::default(); RX_BUFS],
            scratch: vec![0; BUF_SIZE].into_boxed_slice(),
        };
        rx.set_mtu(mtu);
        rx
    }

    fn set_mtu(&mut self, mtu: u32) {
        let size = usize::try_from(mtu)
            .unwrap_or(SUPER_PACKET)
            .clamp(1280, SUPER_PACKET);
        self.segments = (0..TUN_SEGMENTS)
            .map(|_| vec![0; size].into_boxed_slice())
            .collect();
    }
}

struct Worker {
    node: Node,
    port: Port,
    rx: Receive,
    counters: Arc<DropCounters>,
    inbox: mpsc::Receiver<Command>,
    wake: Arc<EventFd>,
    heartbeat: Arc<AtomicU64>,
    /// Events are rare (a trusted peer's route set changed), so an unbounded
    /// channel costs nothing on the data path.
    events: tokio::sync::mpsc::UnboundedSender<Event>,
}

impl Worker {
    fn run(&mut self) -> io::Result<Stopped> {
        loop {
            self.heartbeat.fetch_add(1, Ordering::Relaxed);
            let now = Instant::now();
            let wait = self.node.next_timer().saturating_duration_since(now);
            let timeout = PollTimeout::try_from(wait.as_millis().clamp(1, 1000) as i32)
                .unwrap_or(PollTimeout::MAX);

            let v4 = self.port.sockets.v4.socket.as_fd();
            let v6 = self.port.sockets.v6.as_ref().map(|s| s.socket.as_fd());
            let mut fds = [
                PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
                PollFd::new(self.port.tun.as_fd(), PollFlags::POLLIN),
                PollFd::new(v4, PollFlags::POLLIN),
                PollFd::new(v6.unwrap_or(v4), PollFlags::POLLIN),
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
            let has_v6 = v6.is_some();

            if ready[0] && !self.handle_commands() {
                return Ok(Stopped::Shutdown);
            }
            let now = Instant::now();
            if ready[1] && self.read_tun(now)? == Some(Stopped::TunGone) {
                return Ok(Stopped::TunGone);
            }
            if ready[2] {
                self.read_udp(false, now);
            }
            if ready[3] && has_v6 {
                self.read_udp(true, now);
            }
            self.node.handle_timers(
                Instant::now(),
                SystemTime::now(),
                &mut self.rx.scratch,
                &mut self.port,
            );
            self.port.flush_udp();
            if let Some(local) = self.port.gone_local.take() {
                self.node.apply(Change::LocalAddressGone(local));
            }
            for event in self.node.drain_events() {
                let _ = self.events.send(event);
            }
        }
    }

    /// Reads, splits and encrypts up to [`TURN_BUDGET`] packets.
    fn read_tun(&mut self, now: Instant) -> io::Result<Option<Stopped>> {
        let rx = &mut self.rx;
        let mut handled = 0;
        while handled < TURN_BUDGET {
            let n = match self.port.tun.recv_multiple(
                &mut rx.tun_raw,
                &mut rx.segments,
                &mut rx.sizes,
                0,
            ) {
                Ok(n) => n,
                Err(e) if is_transient(&e) => break,
                // A deleted device answers every read with EBADFD.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBADFD | libc::ENODEV)) => {
                    return Ok(Some(Stopped::TunGone));
                }
                Err(e) => {
                    // A super-packet tun-rs could not split.
                    tracing::debug!("TUN read failed: {e}");
                    self.counters.add_n(DropReason::Malformed, 1);
                    handled += 1;
                    continue;
                }
            };
            for (segment, &len) in rx.segments.iter_mut().zip(&rx.sizes).take(n) {
                if len > 0 {
                    self.node
                        .handle_tun_packet(segment, len, now, &mut self.port);
                } else {
                    self.counters.add_n(DropReason::Malformed, 1);
                }
            }
            handled += n.max(1);
        }
        self.port.flush_udp();
        Ok(None)
    }

    /// Receives and decrypts up to [`TURN_BUDGET`] datagrams from one socket.
    fn read_udp(&mut self, v6: bool, now: Instant) {
        let mut handled = 0;
        while handled < TURN_BUDGET {
            let sockets = &self.port.sockets;
            let Some(socket) = (if v6 {
                sockets.v6.as_ref()
            } else {
                Some(&sockets.v4)
            }) else {
                return;
            };
            let mut slices = self.rx.udp.each_mut().map(|b| IoSliceMut::new(&mut b[..]));
            let received =
                match socket
                    .state
                    .recv((&socket.socket).into(), &mut slices, &mut self.rx.meta)
                {
                    Ok(n) => n,
                    Err(e) if is_transient(&e) => break,
                    // ICMP errors from earlier sends surface here; they are
                    // not ours to act on.
                    Err(e) => {
                        tracing::trace!("UDP receive failed: {e}");
                        break;
                    }
                };
            for (buf, meta) in self.rx.udp.iter().zip(&self.rx.meta).take(received) {
                let data = &buf[..meta.len.min(buf.len())];
                // With GRO one buffer holds a run of `stride`-byte datagrams.
                // An empty datagram is one too (and counted as malformed).
                let stride = if meta.stride == 0 {
                    data.len()
                } else {
                    meta.stride
                };
                let empty: &[&[u8]] = if data.is_empty() { &[&[]] } else { &[] };
                let from = Endpoint {
                    remote: meta.addr,
                    local: meta.dst_ip.filter(can_send_from),
                };
                for datagram in data.chunks(stride.max(1)).chain(empty.iter().copied()) {
                    self.node.handle_datagram(
                        from,
                        datagram,
                        &mut self.rx.scratch,
                        now,
                        &mut self.port,
                    );
                    handled += 1;
                }
            }
            self.port.flush_tun();
            if received < RX_BUFS {
                break;
            }
        }
        self.port.flush_tun();
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
                Command::Sockets(sockets) => {
                    self.port.flush_udp();
                    tracing::info!("UDP socket: {}", sockets.describe());
                    self.port.sockets = sockets;
                }
                Command::SetFwmark(fwmark) => {
                    if let Err(e) = self.port.sockets.set_fwmark(fwmark) {
                        tracing::warn!("cannot set fwmark {fwmark}: {e}");
                    }
                }
                Command::SetMtu(mtu) => self.rx.set_mtu(mtu),
                Command::Barrier(done) => {
                    let _ = done.send(());
                }
                Command::Shutdown => return false,
            }
        }
        true
    }
}

/// Whether replies may leave from `local`, the address a datagram was sent
/// to. Not from a multicast or broadcast address; and not from an IPv6
/// link-local one, which would need the interface as well: the kernel's
/// choice is right for those.
fn can_send_from(local: &IpAddr) -> bool {
    match local {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_multicast() || v6.is_unicast_link_local()),
    }
}

/// A send from a chosen local address failed in a way that says the address
/// cannot be used (it is no longer the host's): the IPv4 route lookup
/// answers ENETUNREACH for a source that is not local, IPv6's pktinfo check
/// EINVAL, and EADDRNOTAVAIL comes from some other paths. Any of them may
/// have another cause; retrying once without the source costs nothing then.
fn source_unusable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EADDRNOTAVAIL | libc::ENETUNREACH)
    )
}

fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Consecutive datagrams to one endpoint, all `segment` bytes long but the
/// last, which may be shorter: one GSO send.
struct Run {
    to: Endpoint,
    start: usize,
    bytes: usize,
    segment: usize,
    count: usize,
    /// The last datagram was short: nothing more may join.
    closed: bool,
}

/// The TUN and the sockets as the core's output sink, with the buffers that
/// batch what the core commits.
struct Port {
    tun: SyncDevice,
    sockets: UdpSockets,
    counters: Arc<DropCounters>,
    /// Encrypted datagrams waiting to be sent; `run` covers the tail of
    /// `send[..send_len]`, everything before it has been sent.
    send: Box<[u8]>,
    send_len: usize,
    run: Option<Run>,
    /// Decrypted packets waiting for a coalesced write, each behind room for
    /// a virtio-net header; each has room to grow into a super-packet.
    writes: Vec<Vec<u8>>,
    pending_writes: usize,
    gro: GROTable,
    /// A local address a send could not use, for the core to forget.
    gone_local: Option<IpAddr>,
}

impl Port {
    fn new(tun: SyncDevice, sockets: UdpSockets, counters: Arc<DropCounters>) -> Port {
        Port {
            tun,
            sockets,
            counters,
            send: vec![0; MAX_GSO_BYTES + BUF_SIZE].into_boxed_slice(),
            send_len: 0,
            run: None,
            writes: (0..TUN_WRITE_BATCH)
                .map(|_| Vec::with_capacity(VIRTIO_NET_HDR_LEN + SUPER_PACKET))
                .collect(),
            pending_writes: 0,
            gro: GROTable::default(),
            gone_local: None,
        }
    }

    /// Sends the pending run, as one GSO send if it has several datagrams.
    fn flush_udp(&mut self) {
        let Some(run) = self.run.take() else {
            return;
        };
        let contents = &self.send[run.start..run.start + run.bytes];
        let Some(socket) = self.sockets.for_address_mut(&run.to.remote) else {
            self.counters
                .add_n(DropReason::SendFailed, run.count as u64);
            return;
        };
        let segment = (run.count > 1).then_some(run.segment);
        let mut to = run.to;
        let mut result = socket.send(to, contents, segment);
        if let (Err(e), Some(local)) = (&result, to.local) {
            if source_unusable(e) {
                // Our address the peer wrote to has gone: answer from
                // whatever the kernel picks rather than not at all.
                tracing::debug!(%local, peer = %to.remote, "cannot send from {local} ({e}); the kernel picks the source");
                socket.reset_state();
                self.gone_local = Some(local);
                to.local = None;
                result = socket.send(to, contents, segment);
            }
        }
        let Err(e) = result else {
            return;
        };
        if segment.is_some() && e.kind() != io::ErrorKind::WouldBlock {
            // Some devices refuse GSO (EIO, EINVAL); quinn-udp turns it off
            // for the next send. This run goes one datagram at a time.
            tracing::debug!("GSO send to {} failed: {e}; sending one by one", to.remote);
            for datagram in contents.chunks(run.segment) {
                if socket.send(to, datagram, None).is_err() {
                    self.counters.add_n(DropReason::SendFailed, 1);
                }
            }
        } else {
            tracing::trace!("send to {} failed: {e}", to.remote);
            self.counters
                .add_n(DropReason::SendFailed, run.count as u64);
        }
    }

    /// Writes the pending packets, coalesced where tun-rs's GRO table can.
    fn flush_tun(&mut self) {
        if self.pending_writes == 0 {
            return;
        }
        let pending = &mut self.writes[..self.pending_writes];
        if let Err(e) = self
            .tun
            .send_multiple(&mut self.gro, pending, VIRTIO_NET_HDR_LEN)
        {
            tracing::trace!("TUN write failed: {e}");
        }
        for write in pending {
            write.clear();
        }
        self.pending_writes = 0;
    }
}

impl Transmit for Port {
    fn udp_slot(&mut self, len: usize) -> &mut [u8] {
        if self.send_len + len > self.send.len() {
            self.flush_udp();
            self.send_len = 0;
        }
        let end = (self.send_len + len).min(self.send.len());
        &mut self.send[self.send_len..end]
    }

    fn commit_udp(&mut self, to: Endpoint, len: usize) -> bool {
        let Some(socket) = self.sockets.for_address(&to.remote) else {
            return false;
        };
        let max_segments = socket.max_segments();
        let start = self.send_len;
        match &mut self.run {
            Some(run)
                if run.to == to
                    && !run.closed
                    && len <= run.segment
                    && run.count < max_segments
                    && run.bytes + len <= MAX_GSO_BYTES =>
            {
                run.count += 1;
                run.bytes += len;
                run.closed = len < run.segment;
            }
            _ => {
                self.flush_udp();
                self.run = Some(Run {
                    to,
                    start,
                    bytes: len,
                    segment: len,
                    count: 1,
                    closed: false,
                });
            }
        }
        self.send_len = start + len;
        true
    }

    fn tun_slot(&mut self, len: usize) -> &mut [u8] {
        let write = &mut self.writes[self.pending_writes];
        let want = (VIRTIO_NET_HDR_LEN + len).min(write.capacity());
        if write.len() < want {
            write.resize(want, 0);
        }
        &mut write[VIRTIO_NET_HDR_LEN..]
    }

    fn commit_tun(&mut self, len: usize) {
        self.writes[self.pending_writes].truncate(VIRTIO_NET_HDR_LEN + len);
        self.pending_writes += 1;
        if self.pending_writes == TUN_WRITE_BATCH {
            self.flush_tun();
        }
    }
}
