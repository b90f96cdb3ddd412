//! Harness for vpcgate's network-namespace tests: it creates namespaces and
//! veth underlays, runs `vpcgated` and wireguard-go inside them, configures
//! both through `wg`, and generates and verifies traffic. Everything it
//! starts is owned by an RAII value, so a failing test still cleans up.
//!
//! The tests need root. Every entry point that touches the network calls
//! [`require_root`], which panics instead of letting a test pass silently.

mod container;
mod deb;
mod flows;
mod guide;
mod metadata;
mod netns;
mod pair;
mod rng;
mod traffic;
mod wg;

pub use container::{host_mirror, lock_file, nspawn_dir, rootfs, Container, FileLock};
pub use deb::{build_deb, deb_version, release_deb, repo_root, tail_lines};
pub use flows::{tcp_download, tcp_reachable, Download, EchoSession};
pub use guide::{
    nft_counters, sock, sysctl, wg_quick_strip, write_wg_quick_conf, ClientConf, Gateway, Guide,
    GuideNet, PeerInfo, RouteView, Status, Vpcgate, VpcgateLaptop, WgQuick, CLIENT_NET, DB, DB6,
    GW_ENDPOINT, GW_ENDPOINT6, GW_PORT, GW_PUBLIC, GW_PUBLIC6, GW_TUNNEL_ADDR,
    GW_TUNNEL_ADDRS_DUAL, GW_VPC, GW_VPC6, INET_GW_SIDE6, PEERED_RANGE, PEERED_RANGE6, TUNNEL_NET,
    TUNNEL_NET6, VPC_HOST, VPC_HOST6, VPC_RANGE, VPC_RANGE6, VPC_ROUTER, VPC_ROUTER6,
};

pub use metadata::{plain_dmi, raw_request, Cloud, FakeMetadata, Seen, METADATA_VPC_MAC};
pub use rng::{seed, Rng};

pub use netns::{require_root, unique_ifname, veth, wait_until, Netns, Proc};
pub use pair::{
    start_node, Endpoints, Impl, Node, Pair, PairSpec, TUNNEL_PREFIX4, TUNNEL_PREFIX6,
    UNDERLAY_PREFIX4, UNDERLAY_PREFIX6,
};
pub use traffic::{
    http_get, iface_stats, iperf3, ping, ping_stats, send_udp, tcp_transfer, wait_for_ping,
    IfaceStats, Iperf, Pattern, PingStats, Transfer, UdpOutCounter,
};
pub use wg::{
    bin_dir, gen_keypair, gen_psk, public_key_of, unix_now, vpcgate_bin, vpcgated_bin, KeyPair,
    VpcgatedConfig, WgDev, WgDump, WgPeer, UAPI_DIR,
};

/// Fails the test with context: `result.or_die("what was being done")`.
pub trait OrDie<T> {
    fn or_die(self, what: &str) -> T;
}

impl<T, E: std::fmt::Display> OrDie<T> for Result<T, E> {
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

/// Decodes standard base64 (with `=` padding), as `wg` prints keys.
pub fn base64_decode(text: &str) -> anyhow::Result<Vec<u8>> {
    let value = |c: u8| -> anyhow::Result<u32> {
        Ok(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => anyhow::bail!("{text:?} is not base64"),
        }
        .into())
    };
    let body = text.trim().trim_end_matches('=');
    let mut out = Vec::with_capacity(body.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in body.bytes() {
        acc = (acc << 6) | value(c)?;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// A base64 key in lowercase hex, the form the UAPI uses.
pub fn key_hex(base64: &str) -> anyhow::Result<String> {
    let bytes = base64_decode(base64)?;
    if bytes.len() != 32 {
        anyhow::bail!("{base64:?} is not a 32-byte key");
    }
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hex_decodes_base64() {
        // RFC 7748 section 6.1, Alice's public key.
        assert_eq!(
            key_hex("hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=").expect("valid"),
            "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
        );
        assert!(key_hex("AAAA").is_err());
        assert!(key_hex("not base64!").is_err());
    }
}
