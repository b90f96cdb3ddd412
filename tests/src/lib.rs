//! Harness for vpcgate's network-namespace tests: it creates namespaces and
//! veth underlays, runs `vpcgated` and wireguard-go inside them, configures
//! both through `wg`, and generates and verifies traffic. Everything it
//! starts is owned by an RAII value, so a failing test still cleans up.
//!
//! The tests need root. Every entry point that touches the network calls
//! [`require_root`], which panics instead of letting a test pass silently.

mod flows;
mod guide;
mod netns;
mod pair;
mod traffic;
mod wg;

pub use flows::{tcp_download, tcp_reachable, Download, EchoSession};
pub use guide::{
    nft_counters, sock, sysctl, wg_quick_strip, write_wg_quick_conf, ClientConf, Gateway, Guide,
    GuideNet, PeerInfo, RouteView, Status, Vpcgate, VpcgateLaptop, WgQuick, CLIENT_NET, DB, DB6,
    GW_ENDPOINT, GW_ENDPOINT6, GW_PORT, GW_PUBLIC, GW_PUBLIC6, GW_TUNNEL_ADDR,
    GW_TUNNEL_ADDRS_DUAL, GW_VPC, GW_VPC6, INET_GW_SIDE6, PEERED_RANGE, PEERED_RANGE6, TUNNEL_NET,
    TUNNEL_NET6, VPC_HOST, VPC_HOST6, VPC_RANGE, VPC_RANGE6, VPC_ROUTER, VPC_ROUTER6,
};

pub use netns::{require_root, unique_ifname, veth, wait_until, Netns, Proc};
pub use pair::{
    start_node, Endpoints, Impl, Node, Pair, PairSpec, TUNNEL_PREFIX4, TUNNEL_PREFIX6,
    UNDERLAY_PREFIX4, UNDERLAY_PREFIX6,
};
pub use traffic::{
    iface_stats, iperf3, ping, ping_stats, send_udp, tcp_transfer, wait_for_ping, IfaceStats,
    Iperf, Pattern, PingStats, Transfer, UdpOutCounter,
};
pub use wg::{
    bin_dir, gen_keypair, gen_psk, public_key_of, unix_now, vpcgate_bin, vpcgated_bin, KeyPair,
    VpcgatedConfig, WgDev, WgDump, WgPeer, UAPI_DIR,
};

/// Fails the test with context: `result.or_die("what was being done")`.
pub trait OrDie<T> {
    fn or_die(self, what: &str) -> T;
}

impl<T> OrDie<T> for anyhow::Result<T> {
    #[track_caller]
    fn or_die(self, what: &str) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("{what}: {e:#}"),
        }
    }
}

/// A list of strings as a set, for order-insensitive comparisons.
pub fn set_of(items: &[String]) -> std::collections::BTreeSet<&str> {
    items.iter().map(String::as_str).collect()
}
