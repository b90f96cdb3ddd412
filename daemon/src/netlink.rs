//! Interface configuration through rtnetlink: the TUN's address, MTU and
//! link state. No `ip` command is ever run.

use futures::TryStreamExt;
use ipnet::IpNet;
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

/// Learned routes get this metric, above the kernel's connected routes.
const LEARNED_ROUTE_METRIC: u32 = 100;

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink connection; the connection task runs on the current
    /// tokio runtime.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
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

    /// Makes the link carry exactly `addresses` (besides the IPv6
    /// link-local address the kernel assigns itself): missing ones are
    /// added, others removed, and ones already present are left alone.
    async fn set_addresses(&self, index: u32, addresses: &[IpNet]) -> Result<(), NetlinkError> {
        use netlink_packet_route::address::{AddressAttribute, AddressScope};
        let mut existing = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut present = Vec::new();
        let mut stale = Vec::new();
        while let Some(msg) = existing
            .try_next()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "listing addresses",
                source,
            })?
        {
            if msg.header.scope == AddressScope::Link {
                continue;
            }
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(ip) => IpNet::new(*ip, msg.header.prefix_len).ok(),
                _ => None,
            });
            match addr {
                Some(net) if addresses.contains(&net) => present.push(net),
                _ => stale.push(msg),
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
        for address in addresses.iter().filter(|a| !present.contains(a)) {
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
    /// Configures every tunnel address (one per family) on the link.
    pub async fn configure_all(
        &self,
        index: u32,
        addresses: &[IpNet],
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        self.set_addresses(index, addresses).await?;
        self.set_mtu_up(index, mtu).await
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
