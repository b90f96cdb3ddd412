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

    /// Gives the link exactly this address (replacing any of the same
    /// family we set before), this MTU, and brings it up.
    pub async fn configure(
        &self,
        index: u32,
        address: IpNet,
        mtu: u32,
    ) -> Result<(), NetlinkError> {
        self.set_address(index, address).await?;
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

    async fn set_address(&self, index: u32, address: IpNet) -> Result<(), NetlinkError> {
        let mut existing = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut stale = Vec::new();
        while let Some(msg) = existing
            .try_next()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "listing addresses",
                source,
            })?
        {
            let same_family = match address {
                IpNet::V4(_) => msg.header.family == netlink_packet_route::AddressFamily::Inet,
                IpNet::V6(_) => msg.header.family == netlink_packet_route::AddressFamily::Inet6,
            };
            // Keep IPv6 link-local addresses the kernel assigns itself.
            let link_local = msg.header.scope == netlink_packet_route::address::AddressScope::Link;
            if same_family && !link_local {
                stale.push(msg);
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
        self.handle
            .address()
            .add(index, address.addr(), address.prefix_len())
            .execute()
            .await
            .map_err(|source| NetlinkError::Request {
                what: "adding the tunnel address",
                source,
            })
    }
}
