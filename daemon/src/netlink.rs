//! Interface configuration through rtnetlink: the TUN's address, MTU and
//! link state, and a subscription to the kernel's address and link events so
//! that changes made with ip(8) are followed. No `ip` command is ever run.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use netlink_packet_route::address::AddressMessage;
use rtnetlink::Handle;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(#[from] std::io::Error),
    #[error("interface {0} not found")]
    NoSuchLink(String),
    #[error("netlink request failed while {what}: {source}")]
    Request {
        what: &'static str,
        source: rtnetlink::Error,
    },
}

impl NetlinkError {
    /// The kernel had no such route, address or device: for a removal,
    /// the job is done.
    pub fn is_not_found(&self) -> bool {
        match self {
            NetlinkError::Request {
                source: rtnetlink::Error::NetlinkError(e),
                ..
            } => [-libc::ESRCH, -libc::ENOENT, -libc::ENODEV].contains(&e.raw_code()),
            NetlinkError::NoSuchLink(_) => true,
            _ => false,
        }
    }
}

/// Learned routes get this metric, above the kernel's connected routes.
const LEARNED_ROUTE_METRIC: u32 = 100;

/// Link and address changes, from [`Netlink::watch`]. Dropping it closes
/// the subscription.
pub struct Changes {
    messages: std::pin::Pin<Box<dyn futures::Stream<Item = ()> + Send>>,
    connection: tokio::task::JoinHandle<()>,
}

impl futures::Stream for Changes {
    type Item = ();

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<()>> {
        self.messages.as_mut().poll_next(cx)
    }
}

impl Drop for Changes {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

/// The kernel's multicast groups for link changes and IPv4 and IPv6
/// address changes (`RTMGRP_*`).
const WATCHED_GROUPS: u32 = rtnetlink::constants::RTMGRP_LINK
    | rtnetlink::constants::RTMGRP_IPV4_IFADDR
    | rtnetlink::constants::RTMGRP_IPV6_IFADDR;

impl Netlink {
    /// Opens a netlink connection; the connection task runs on the current
    /// tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// Subscribes to link and address changes in this namespace: one item
    /// per change. What changed is read afresh through [`Netlink`]: changes
    /// are rare, and a re-read cannot miss what a parser might misread.
    /// Subscribe before reading the state the changes apply to, so that
    /// nothing falls in between.
    pub fn watch() -> Result<Changes, NetlinkError> {
        use netlink_sys::AsyncSocket as _;
        let (mut connection, _handle, messages) = rtnetlink::new_connection()?;
        connection
            .socket_mut()
            .socket_mut()
            .bind(&netlink_sys::SocketAddr::new(0, WATCHED_GROUPS))?;
        Ok(Changes {
            messages: Box::pin(messages.map(|_| ())),
            connection: tokio::spawn(connection),
        })
    }

    pub async fn link_index(&self, name: &str) -> Result<u32, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(NetlinkError::NoSuchLink(name.to_string())),
            // The kernel answers ENODEV for an unknown name.
            Err(_) => Err(NetlinkError::NoSuchLink(name.to_string())),
        }
    }

    /// The link's addresses, with their prefix lengths, except IPv6
    /// link-local ones (which the kernel assigns itself).
    pub async fn addresses(&self, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
        Ok(self
            .address_messages(index)
            .await?
            .into_iter()
            .filter_map(|(net, _)| net)
            .collect())
    }

    /// The networks of the link's addresses (link-local ones aside), sorted
    /// and without repeats.
    pub async fn networks(&self, index: u32) -> Result<Vec<IpNet>, NetlinkError> {
        let mut networks: Vec<IpNet> = self
            .addresses(index)
            .await?
            .iter()
            .map(IpNet::trunc)
            .collect();
        networks.sort();
        networks.dedup();
        Ok(networks)
    }

    async fn address_messages(
        &self,
        index: u32,
    ) -> Result<Vec<(Option<IpNet>, AddressMessage)>, NetlinkError> {
        use netlink_packet_route::address::{AddressAttribute, AddressScope};
        let mut existing = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut found = Vec::new();
        while let Some(msg) = existing
            .try_next()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "listing addresses",
                source,
            })?
        {
            // The filter is applied in userspace by older kernels' replies.
            if msg.header.scope == AddressScope::Link || msg.header.index != index {
                continue;
            }
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => IpNet::new(*ip, msg.header.prefix_len).ok(),
                _ => None,
            });
            found.push((addr, msg));
        }
        Ok(found)
    }

    /// Replaces the addresses we set (`old`) with `new` on the link. Other
    /// addresses, such as ones added with ip(8), are left alone, and ones
    /// already present are not touched.
    async fn set_addresses(
        &self,
        index: u32,
        old: &[IpNet],
        new: &[IpNet],
    ) -> Result<(), NetlinkError> {
        let mut present = Vec::new();
        let mut stale = Vec::new();
        for (addr, msg) in self.address_messages(index).await? {
            match addr {
                Some(net) if new.contains(&net) => present.push(net),
                Some(net) if old.contains(&net) => stale.push(msg),
                _ => {}
            }
        }
        for msg in stale {
            self.handle
                .address()
                .del(msg)
                .execute()
                .await
                .map_err(|source| NetlinkError::Request {
                    what: "removing an old address",
                    source,
                })?;
        }
        for address in new.iter().filter(|a| !present.contains(a)) {
            self.handle
                .address()
                .add(index, address.addr(), address.prefix_len())
                .execute()
                .await
                .map_err(|source| NetlinkError::Request {
                    what: "adding the tunnel address",
                    source,
                })?;
        }
        Ok(())
    }

    /// Puts the tunnel addresses `new` on the link in place of `old`, sets
    /// the MTU and brings the link up.
    pub async fn configure_all(
        &self,
        index: u32,
        old: &[IpNet],
        new: &[IpNet],
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        self.set_addresses(index, old, new).await?;
        self.set_mtu_up(index, mtu).await
    }

    /// The link's MTU; `None` if the link is not in this namespace (deleted,
    /// or moved to another one).
    pub async fn mtu(&self, index: u32) -> Result<Option<u32>, NetlinkError> {
        use netlink_packet_route::link::LinkAttribute;
        let mut links = self.handle.link().get().match_index(index).execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(source) => Err(NetlinkError::Request {
                what: "reading the link",
                source,
            }),
        }
    }

    async fn set_mtu_up(&self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(index)
            .mtu(mtu)
            .up()
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "setting the MTU and bringing the link up",
                source,
            })
    }

    /// The route for `net` through the link, as both add and delete take it.
    fn route_message(&self, index: u32, net: IpNet) -> netlink_packet_route::route::RouteMessage {
        let request = self
            .handle
            .route()
            .add()
            .output_interface(index)
            .priority(LEARNED_ROUTE_METRIC)
            .protocol(netlink_packet_route::route::RouteProtocol::Static);
        match net {
            IpNet::V4(n) => request
                .v4()
                .destination_prefix(n.network(), n.prefix_len())
                .message_mut()
                .clone(),
            IpNet::V6(n) => request
                .v6()
                .destination_prefix(n.network(), n.prefix_len())
                .message_mut()
                .clone(),
        }
    }

    /// Routes `net` through the link (replacing our own earlier route).
    pub async fn add_route(&self, index: u32, net: IpNet) -> Result<(), NetlinkError> {
        let mut request = self.handle.route().add().replace();
        *request.message_mut() = self.route_message(index, net);
        request
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "adding a learned route",
                source,
            })
    }

    pub async fn del_route(&self, index: u32, net: IpNet) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .del(self.route_message(index, net))
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "removing a learned route",
                source,
            })
    }

    /// The main table's unicast routes through links other than `exclude`,
    /// default routes aside: each destination with the name of its link.
    pub async fn routes_elsewhere(
        &self,
        exclude: u32,
    ) -> Result<Vec<(IpNet, String)>, NetlinkError> {
        use netlink_packet_route::link::LinkAttribute;
        use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteHeader, RouteType};
        let failed = |what| move |source| NetlinkError::Request { what, source };
        let mut names = std::collections::HashMap::new();
        let mut links = self.handle.link().get().execute();
        while let Some(link) = links.try_next().await.map_err(failed("listing links"))? {
            for attr in &link.attributes {
                if let LinkAttribute::IfName(name) = attr {
                    names.insert(link.header.index, name.clone());
                }
            }
        }
        let mut found = Vec::new();
        for version in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
            let mut routes = self.handle.route().get(version).execute();
            while let Some(msg) = routes.try_next().await.map_err(failed("listing routes"))? {
                let len = msg.header.destination_prefix_length;
                let mut table = u32::from(msg.header.table);
                let (mut destination, mut oif) = (None, None);
                for attr in &msg.attributes {
                    match attr {
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                            destination = Some(std::net::IpAddr::V4(*a))
                        }
                        RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                            destination = Some(std::net::IpAddr::V6(*a))
                        }
                        RouteAttribute::Oif(index) => oif = Some(*index),
                        RouteAttribute::Table(t) => table = *t,
                        _ => {}
                    }
                }
                let (Some(destination), Some(oif)) = (destination, oif) else {
                    continue;
                };
                if len == 0
                    || oif == exclude
                    || msg.header.kind != RouteType::Unicast
                    || table != u32::from(RouteHeader::RT_TABLE_MAIN)
                {
                    continue;
                }
                if let Ok(net) = IpNet::new(destination, len) {
                    let name = names
                        .get(&oif)
                        .cloned()
                        .unwrap_or_else(|| format!("#{oif}"));
                    found.push((net.trunc(), name));
                }
            }
        }
        Ok(found)
    }

    /// Networks of the addresses on every link except `exclude`.
    pub async fn local_networks(&self, exclude: u32) -> Result<Vec<IpNet>, NetlinkError> {
        use netlink_packet_route::address::AddressAttribute;
        let mut addresses = self.handle.address().get().execute();
        let mut networks = Vec::new();
        while let Some(msg) =
            addresses
                .try_next()
                .await
                .map_err(|source| NetlinkError::Request {
                    what: "listing addresses",
                    source,
                })?
        {
            if msg.header.index == exclude {
                continue;
            }
            let len = msg.header.prefix_len;
            for attr in &msg.attributes {
                if let AddressAttribute::Address(ip) = attr {
                    if let Ok(net) = IpNet::new(*ip, len) {
                        networks.push(net.trunc());
                    }
                }
            }
        }
        Ok(networks)
    }
}

// The request type is `c_ulong` in glibc and `c_int` in musl; the casts
// keep the bits either way.
/// `TUNGETIFF`: the device's current name and flags.
const TUNGETIFF: libc::Ioctl = 0x8004_54d2_u32 as libc::Ioctl;
/// `TUNGETDEVNETNS` (Linux 5.2): a descriptor of the network namespace the
/// device is in now.
const TUNGETDEVNETNS: libc::Ioctl = 0x54e3;

/// The TUN device's current name (ip(8) may have renamed it).
pub fn tun_name(tun: BorrowedFd<'_>) -> io::Result<String> {
    // SAFETY: an all-zero `ifreq` is valid.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one `ifreq` into the live struct we pass.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNGETIFF, &mut ifr) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let name: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8(name).map_err(|_| io::Error::other("the TUN's name is not UTF-8"))
}

/// The network namespace the TUN device is in now: a device can be moved
/// with `ip link set IF netns NS` while we keep its descriptor.
pub fn tun_namespace(tun: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // SAFETY: TUNGETDEVNETNS takes no argument and returns a new descriptor.
    let fd = unsafe { libc::ioctl(tun.as_raw_fd(), TUNGETDEVNETNS) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just opened `fd` for us, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `ns` is the namespace this thread is in.
pub fn is_current_namespace(ns: BorrowedFd<'_>) -> io::Result<bool> {
    let here = std::fs::metadata(CURRENT_NAMESPACE)?;
    let there = nix::sys::stat::fstat(ns.as_raw_fd())?;
    Ok(here.dev() == there.st_dev && here.ino() == there.st_ino)
}

const CURRENT_NAMESPACE: &str = "/proc/thread-self/ns/net";

/// Runs `open` with this thread in namespace `ns`, then comes back. Sockets
/// made by `open` stay in `ns`. Needs CAP_SYS_ADMIN.
pub fn in_namespace<T>(
    ns: BorrowedFd<'_>,
    open: impl FnOnce() -> Result<T, NetlinkError>,
) -> io::Result<Result<T, NetlinkError>> {
    use nix::sched::{setns, CloneFlags};
    let home = std::fs::File::open(CURRENT_NAMESPACE)?;
    setns(ns, CloneFlags::CLONE_NEWNET)?;
    let opened = open();
    if let Err(e) = setns(&home, CloneFlags::CLONE_NEWNET) {
        // Everything this thread opens from now on would land there.
        tracing::error!("cannot return to our network namespace: {e}");
        std::process::abort();
    }
    Ok(opened)
}
