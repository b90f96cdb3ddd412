//! vpcgated as a drop-in userspace WireGuard: started as `vpcgated IFNAME`
//! and configured with `ip` and `wg` exactly as wireguard-go is, or brought
//! up and down by wg-quick with `WG_QUICK_USERSPACE_IMPLEMENTATION`.
//!
//! - An interface whose addresses come from `ip address add` carries ping
//!   and TCP both ways; its forwarding scope follows the addresses live, and
//!   what is not one of them (a metadata-like address) stays out of reach.
//! - `wg-quick up` returns with vpcgated in the background, 20 MB cross
//!   each way against wireguard-go, and `wg-quick down` leaves no process
//!   and no socket.
//! - The TUN moved to another namespace keeps carrying traffic.
//! - MTU changes made with ip(8), up to 34,000 bytes and back, are followed.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use vpcgate_e2e::{
    gen_keypair, ping_stats, require_root, tcp_transfer, vpcgated_bin, wait_for_ping, wait_until,
    ClientConf, Impl, Netns, OrDie, Pair, PairSpec, Vpcgate, WgDev, WgQuick, UAPI_DIR,
};

/// How long a first handshake may take before a test gives up (normally
/// milliseconds).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a daemon may take to notice its TUN is gone and exit (it polls
/// the TUN at least every 250 ms; this only guards against a hang).
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a change made with ip(8) may take to reach the data path: one
/// netlink event and a table swap, normally well under a millisecond.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(10);

fn pair(a: Impl, b: Impl) -> Pair {
    require_root();
    Pair::new(PairSpec::new(a, b)).or_die("set up the pair")
}

fn both_ways(pair: &Pair, bytes: u64) {
    let (a, b) = (&pair.a, &pair.b);
    wait_for_ping(&a.ns, &b.t4(), &[], HANDSHAKE_TIMEOUT).or_die("a pings b");
    wait_for_ping(&b.ns, &a.t4(), &[], HANDSHAKE_TIMEOUT).or_die("b pings a");
    tcp_transfer(&b.ns, &a.ns, IpAddr::V4(b.tunnel4), 5201, bytes).or_die("TCP a <-> b server b");
    tcp_transfer(&a.ns, &b.ns, IpAddr::V4(a.tunnel4), 5202, bytes).or_die("TCP a <-> b server a");
}

fn dropped(dev: &WgDev, reason: &str) -> u64 {
    Vpcgate::for_dev(dev)
        .and_then(|ctl| ctl.status())
        .or_die("vpcgate status")
        .dropped(reason)
        .unwrap_or_else(|| panic!("status has no {reason} counter"))
}

#[test]
fn ip_configured_vpcgated_pair_carries_ping_and_tcp() {
    let mut pair = pair(Impl::VpcgatedPlain, Impl::VpcgatedPlain);
    both_ways(&pair, 4 << 20);
    pair.check_running().or_die("both still running");
}

#[test]
fn ip_configured_vpcgated_against_wireguard_go() {
    let mut pair = pair(Impl::VpcgatedPlain, Impl::WireguardGo);
    both_ways(&pair, 4 << 20);
    pair.check_running().or_die("both still running");
}

/// The scope is the networks of the TUN's addresses, read live: an address
/// added with ip(8) becomes reachable, and unreachable again once deleted.
/// An address on a's loopback that no TUN address covers (where a metadata
/// service would be) never is, though a's kernel would answer it.
#[test]
fn scope_follows_addresses_set_with_ip() {
    let mut pair = pair(Impl::VpcgatedPlain, Impl::WireguardGo);
    let (a, b) = (&pair.a, &pair.b);
    let extra = "100.64.7.1";
    let hidden = "198.19.254.254";
    a.ns.ip(&["addr", "add", &format!("{hidden}/32"), "dev", "lo"])
        .or_die("an address a's kernel answers but peers must not reach");
    let a_ips = [
        format!("{}/32", a.tunnel4),
        format!("{extra}/32"),
        format!("{hidden}/32"),
    ];
    let refs: Vec<&str> = a_ips.iter().map(String::as_str).collect();
    b.dev
        .set_peer(&a.public_key, &refs, Some(a.endpoint(false)))
        .or_die("b routes the extra addresses to a");
    for net in ["100.64.7.0/24", &format!("{hidden}/32")] {
        b.ns.ip(&["route", "add", net, "dev", b.dev.name()])
            .or_die("route into the tunnel");
    }
    wait_for_ping(&b.ns, &a.t4(), &[], HANDSHAKE_TIMEOUT).or_die("b pings a's tunnel address");

    let refused = |dst: &str, what: &str| {
        let before = dropped(&a.dev, "not_advertised");
        let stats = ping_stats(&b.ns, dst, 2, &[]).or_die("ping runs");
        assert_eq!(stats.received, 0, "{what}: {dst} answered");
        wait_until(FOLLOW_TIMEOUT, "a to count the drops", || {
            Ok(dropped(&a.dev, "not_advertised") >= before + 2)
        })
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    };
    refused(extra, "before the address exists");
    refused(hidden, "an address outside the tunnel networks");

    a.dev
        .add_addr(&format!("{extra}/24"))
        .or_die("ip address add");
    wait_for_ping(&b.ns, extra, &[], FOLLOW_TIMEOUT).or_die("the added address answers");
    tcp_transfer(&a.ns, &b.ns, extra.parse().or_die("ip"), 5203, 1 << 20)
        .or_die("TCP to the added address");

    a.ns.ip(&["addr", "del", &format!("{extra}/24"), "dev", a.dev.name()])
        .or_die("ip address del");
    // The kernel would no longer answer anyway; put the address on lo, so
    // only the scope can refuse it.
    a.ns.ip(&["addr", "add", &format!("{extra}/32"), "dev", "lo"])
        .or_die("the address moves to lo");
    refused(extra, "after the address left the TUN");
    refused(hidden, "still outside the tunnel networks");
    pair.check_running().or_die("both still running");
}

/// wg-quick brings vpcgated up as it would wireguard-go, against a
/// wireguard-go peer; `wg-quick down` deletes the link and vpcgated exits,
/// leaving no process and no socket.
#[test]
fn wg_quick_up_and_down() {
    require_root();
    let ns_a = Netns::new("qa").or_die("ns a");
    let ns_b = Netns::new("qb").or_die("ns b");
    vpcgate_e2e::veth(&ns_a, &ns_b, &["198.18.0.1/24"], &["198.18.0.2/24"]).or_die("veth");
    let b = WgDev::wireguard_go(&ns_b, "wqb").or_die("wireguard-go");
    let b_key = gen_keypair().or_die("key");
    b.configure(&b_key, 51821, &["100.64.0.2/24"])
        .or_die("configure b");
    let a_key = gen_keypair().or_die("key");
    b.set_peer(&a_key.public, &["100.64.0.1/32"], None)
        .or_die("b knows a");
    let conf = ClientConf::parse(&format!(
        "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.1/24\nListenPort = 51820\n\n\
         [Peer]\nPublicKey = {}\nAllowedIPs = 100.64.0.2/32\nEndpoint = 198.18.0.2:51821\n",
        a_key.private, b_key.public
    ))
    .or_die("config");
    let bin = vpcgated_bin().or_die("vpcgated");
    let mut up = WgQuick::up_with(&ns_a, &conf, &bin.to_string_lossy()).or_die("wg-quick up");
    let iface = up.iface().to_string();
    let cleanup = StateCleanup(iface.clone());

    // wg-quick returned, and the daemon goes on in the background.
    let daemons = vpcgated_pids(&ns_a);
    assert_eq!(daemons.len(), 1, "one vpcgated runs on: {}", up.log_tail());
    wait_for_ping(&ns_a, "100.64.0.2", &[], HANDSHAKE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", up.log_tail()));
    tcp_transfer(
        &ns_b,
        &ns_a,
        "100.64.0.2".parse().or_die("ip"),
        5204,
        20 << 20,
    )
    .unwrap_or_else(|e| panic!("20 MB each way: {e:#}\n{}", up.log_tail()));

    up.down()
        .unwrap_or_else(|e| panic!("wg-quick down: {e:#}\n{}", up.log_tail()));
    wait_until(EXIT_TIMEOUT, "vpcgated to exit after wg-quick down", || {
        Ok(vpcgated_pids(&ns_a).is_empty())
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", up.log_tail()));
    let uapi = Path::new(UAPI_DIR).join(format!("{iface}.sock"));
    let control = Path::new("/run/vpcgate").join(format!("{iface}.sock"));
    assert!(!uapi.exists(), "{} left behind", uapi.display());
    assert!(!control.exists(), "{} left behind", control.display());
    let log = up.log_tail();
    assert!(
        log.contains("the TUN device was deleted: shutting down"),
        "vpcgated did not exit cleanly:\n{log}"
    );
    drop(cleanup);
}

/// Removes the per-interface state wg-quick's vpcgated kept under
/// /var/lib/vpcgate (the interface name is unique to this test).
struct StateCleanup(String);

impl Drop for StateCleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(Path::new("/var/lib/vpcgate").join(&self.0));
        let _ = std::fs::remove_file(Path::new("/run/vpcgate").join(format!("{}.sock", self.0)));
    }
}

/// vpcgated processes in `ns`.
fn vpcgated_pids(ns: &Netns) -> Vec<i32> {
    ns.pids()
        .or_die("ip netns pids")
        .into_iter()
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.file_name().is_some_and(|n| n == "vpcgated"))
        })
        .collect()
}

/// `ip link set IF netns NS`: the TUN goes, its sockets stay behind with
/// the daemon, and traffic keeps flowing to whatever the new namespace
/// configures on it. The new namespace gives it another network than the
/// old one had, so only a scope that followed the device lets it through.
#[test]
fn tun_moved_to_another_namespace() {
    let mut pair = pair(Impl::VpcgatedPlain, Impl::WireguardGo);
    wait_for_ping(&pair.b.ns, &pair.a.t4(), &[], HANDSHAKE_TIMEOUT).or_die("first ping");
    let elsewhere = Netns::new("moved").or_die("ns");
    let (a, b) = (&pair.a, &pair.b);
    let dev = a.dev.name();
    let moved_to = "100.64.9.1";
    b.dev
        .set_peer(
            &a.public_key,
            &[&format!("{}/32", a.tunnel4), &format!("{moved_to}/32")],
            Some(a.endpoint(false)),
        )
        .or_die("b routes the new address to a");
    b.ns.ip(&["route", "add", "100.64.9.0/24", "dev", b.dev.name()])
        .or_die("route into the tunnel");
    a.ns.ip(&["link", "set", dev, "netns", elsewhere.name()])
        .or_die("move the TUN");
    elsewhere
        .ip(&["addr", "add", &format!("{moved_to}/24"), "dev", dev])
        .or_die("address in the new namespace");
    elsewhere
        .ip(&["link", "set", dev, "mtu", "1420", "up"])
        .or_die("up in the new namespace");
    elsewhere
        .ip(&["route", "add", &format!("{}/32", b.tunnel4), "dev", dev])
        .or_die("the way back to b");
    wait_for_ping(&b.ns, moved_to, &[], FOLLOW_TIMEOUT).or_die("b reaches the moved TUN");
    tcp_transfer(
        &elsewhere,
        &b.ns,
        moved_to.parse().or_die("ip"),
        5205,
        4 << 20,
    )
    .or_die("TCP with the moved TUN");
    pair.check_running().or_die("both still running");
}

/// MTU changes made with ip(8) reach the data path, in both directions:
/// 34,000-byte packets cross once both TUNs say so, then 1,420 again.
#[test]
fn follows_mtu_set_with_ip() {
    let mut pair = pair(Impl::VpcgatedPlain, Impl::VpcgatedPlain);
    wait_for_ping(&pair.a.ns, &pair.b.t4(), &[], HANDSHAKE_TIMEOUT).or_die("first ping");
    let set_mtu = |pair: &Pair, mtu: &str| {
        for node in [&pair.a, &pair.b] {
            node.ns
                .ip(&["link", "set", node.dev.name(), "mtu", mtu])
                .or_die("ip link set mtu");
        }
    };
    // A 33,000-byte ICMP payload that may not be fragmented inside the
    // tunnel: it crosses whole or not at all.
    let big_ping = |pair: &Pair| {
        ping_stats(&pair.a.ns, &pair.b.t4(), 1, &["-s", "33000", "-M", "do"])
            .or_die("ping runs")
            .received
    };
    set_mtu(&pair, "34000");
    wait_until(FOLLOW_TIMEOUT, "a 33,000-byte ping to cross", || {
        Ok(big_ping(&pair) == 1)
    })
    .or_die("large MTU");
    let (a, b) = (&pair.a, &pair.b);
    tcp_transfer(&b.ns, &a.ns, IpAddr::V4(b.tunnel4), 5206, 8 << 20).or_die("TCP at MTU 34,000");

    set_mtu(&pair, "1420");
    assert_eq!(big_ping(&pair), 0, "ping refuses a packet above the MTU");
    wait_for_ping(&a.ns, &b.t4(), &["-s", "1392", "-M", "do"], FOLLOW_TIMEOUT)
        .or_die("full-size packets at MTU 1420");
    tcp_transfer(&b.ns, &a.ns, IpAddr::V4(b.tunnel4), 5207, 8 << 20).or_die("TCP at MTU 1,420");
    pair.check_running().or_die("both still running");
}
