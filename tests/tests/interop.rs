//! vpcgated against Debian's wireguard-go, configured with `wg`: either side
//! can initiate, traffic flows both ways, and vpcgated's UAPI reports the
//! handshake time, endpoint and counters the way `wg` expects.

use std::net::IpAddr;
use std::thread;
use std::time::Duration;

use vpcgate_e2e::{
    ping, require_root, tcp_transfer, unix_now, wait_for_ping, Endpoints, Impl, Node, Pair,
    PairSpec, WgPeer,
};

const MB: u64 = 1024 * 1024;

#[test]
fn vpcgated_initiates() {
    interop(Impl::Vpcgated, Endpoints::AOnly);
}

#[test]
fn wireguard_go_initiates() {
    interop(Impl::Vpcgated, Endpoints::BOnly);
}

/// The same checks with wireguard-go in vpcgated's place: proves they are
/// what a reference implementation satisfies.
#[test]
fn reference_wireguard_go_both_ends() {
    interop(Impl::WireguardGo, Endpoints::AOnly);
}

fn check_handshake(peer: &WgPeer, t0: u64, who: &str) {
    let now = unix_now();
    assert_ne!(
        peer.latest_handshake, 0,
        "{who}: no handshake recorded: {peer:?}"
    );
    assert!(
        peer.latest_handshake <= now + 1,
        "{who}: handshake time {} is in the future (now {now})",
        peer.latest_handshake
    );
    assert!(
        peer.latest_handshake + 1 >= t0 && now.saturating_sub(peer.latest_handshake) <= 20,
        "{who}: handshake time {} is not a recent Unix time (test started {t0}, now {now}); \
         is it reported as elapsed time instead?",
        peer.latest_handshake
    );
}

/// `wg show NAME` must name the peer and print its handshake as "N seconds
/// ago" (a handshake reported as elapsed time prints "55 years ago").
fn check_human_show(gw: &Node, other: &Node) {
    // At the very second of the handshake wg prints "Now"; step past it.
    thread::sleep(Duration::from_millis(1100));
    let show = gw.dev.show().expect("wg show on vpcgated");
    assert!(
        show.contains(&format!("public key: {}", gw.public_key)),
        "wg show lacks the interface's public key:\n{show}"
    );
    assert!(
        show.contains(&format!("peer: {}", other.public_key)),
        "wg show lacks the peer:\n{show}"
    );
    let line = show
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("latest handshake:"))
        .unwrap_or_else(|| panic!("wg show has no 'latest handshake:' line:\n{show}"));
    assert!(
        line.ends_with(" ago")
            && line.contains("second")
            && !["year", "day", "hour"].iter().any(|u| line.contains(u)),
        "handshake should be seconds ago, got {line:?}:\n{show}"
    );
    assert!(
        show.contains("transfer:"),
        "wg show lacks transfer:\n{show}"
    );
}

/// `gw_impl` runs in node a (normally vpcgated), wireguard-go in node b.
fn interop(gw_impl: Impl, endpoints: Endpoints) {
    require_root();
    let mut spec = PairSpec::new(gw_impl, Impl::WireguardGo);
    spec.endpoints = endpoints;
    let mut pair = Pair::new(spec).expect("set up vpcgated and wireguard-go namespaces");
    let (gw, wgo) = (&pair.a, &pair.b);
    let (init, resp, who) = match endpoints {
        Endpoints::AOnly => (gw, wgo, "vpcgated"),
        _ => (wgo, gw, "wireguard-go"),
    };

    let t0 = unix_now();
    wait_for_ping(&init.ns, &resp.t4(), &[], Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{who} should initiate and reach its peer: {e:#}"));
    assert!(ping(&gw.ns, &wgo.t4(), 5), "ping vpcgated -> wireguard-go");
    assert!(ping(&wgo.ns, &gw.t4(), 5), "ping wireguard-go -> vpcgated");

    let peer = gw
        .dev
        .peer(&wgo.public_key)
        .expect("vpcgated lists the peer");
    check_handshake(&peer, t0, "vpcgated");
    assert_eq!(
        peer.endpoint,
        Some(wgo.endpoint(false)),
        "vpcgated's endpoint for wireguard-go (configured or learned)"
    );
    assert_eq!(peer.allowed_ips, ["100.64.0.2/32"]);
    let seen = wgo
        .dev
        .peer(&gw.public_key)
        .expect("wireguard-go lists vpcgated");
    check_handshake(&seen, t0, "wireguard-go");
    assert_eq!(
        seen.endpoint,
        Some(gw.endpoint(false)),
        "wireguard-go should see vpcgated's packets come from its listen port"
    );

    check_human_show(gw, wgo);

    let c1 = gw.dev.peer(&wgo.public_key).expect("peer listed");
    assert!(ping(&gw.ns, &wgo.t4(), 3), "ping vpcgated -> wireguard-go");
    assert!(ping(&wgo.ns, &gw.t4(), 3), "ping wireguard-go -> vpcgated");
    let c2 = gw
        .dev
        .wait_peer(
            &wgo.public_key,
            Duration::from_secs(3),
            "rx/tx counters to grow with the pings",
            |p| p.rx_bytes > c1.rx_bytes && p.tx_bytes > c1.tx_bytes,
        )
        .unwrap_or_else(|e| panic!("before the pings {c1:?}: {e:#}"));

    tcp_transfer(&wgo.ns, &gw.ns, IpAddr::V4(wgo.tunnel4), 5201, 20 * MB)
        .expect("20 MB each way, vpcgated connecting to wireguard-go");
    tcp_transfer(&gw.ns, &wgo.ns, IpAddr::V4(gw.tunnel4), 5202, 2 * MB)
        .expect("2 MB each way, wireguard-go connecting to vpcgated");
    gw.dev
        .wait_peer(
            &wgo.public_key,
            Duration::from_secs(3),
            "rx/tx counters to grow by the 22 MB carried each way",
            |p| p.rx_bytes >= c2.rx_bytes + 22 * MB && p.tx_bytes >= c2.tx_bytes + 22 * MB,
        )
        .unwrap_or_else(|e| panic!("before the transfers {c2:?}: {e:#}"));
    pair.a.dev.check_running().expect("vpcgated still running");
}
