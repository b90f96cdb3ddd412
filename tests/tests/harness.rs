//! Checks the harness itself with wireguard-go on both ends, so that a
//! failure in the vpcgated tests points at vpcgated and not at the harness.

use std::net::IpAddr;
use std::time::Duration;

use vpcgate_e2e::{
    gen_keypair, ping, ping_stats, public_key_of, require_root, tcp_transfer, unique_ifname,
    unix_now, wait_for_ping, Impl, Netns, Pair, PairSpec,
};

const MB: u64 = 1024 * 1024;

#[test]
fn wireguard_go_pair_ping_and_transfer() {
    require_root();
    let pair = Pair::new(PairSpec::new(Impl::WireguardGo, Impl::WireguardGo))
        .expect("set up two wireguard-go namespaces");
    let (a, b) = (&pair.a, &pair.b);
    let t0 = unix_now();

    wait_for_ping(&a.ns, &b.t4(), &[], Duration::from_secs(15)).expect("first ping a -> b");
    assert!(ping(&a.ns, &b.t4(), 5), "ping a -> b through the tunnel");
    assert!(ping(&b.ns, &a.t4(), 5), "ping b -> a through the tunnel");

    let peer = a.dev.peer(&b.public_key).expect("a lists b");
    let now = unix_now();
    assert!(
        peer.latest_handshake >= t0.saturating_sub(1) && peer.latest_handshake <= now + 1,
        "handshake time {} not within [{t0}, {now}]",
        peer.latest_handshake
    );
    assert_eq!(peer.endpoint, Some(b.endpoint(false)));
    assert_eq!(peer.allowed_ips, ["100.64.0.2/32"]);

    let before = a.dev.stats().expect("a's counters");
    tcp_transfer(&b.ns, &a.ns, IpAddr::V4(b.tunnel4), 5201, 20 * MB)
        .expect("20 MB each way between two wireguard-go peers");
    let after = a.dev.stats().expect("a's counters");
    assert!(after.rx_packets > before.rx_packets + 1000);
    assert!(after.tx_packets > before.tx_packets + 1000);

    a.dev
        .wait_peer(
            &b.public_key,
            Duration::from_secs(3),
            "counters to reflect 20 MB each way",
            |p| p.rx_bytes >= 20 * MB && p.tx_bytes >= 20 * MB,
        )
        .expect("a's counters for b");
}

#[test]
fn wireguard_go_pair_ipv6_inside_and_outside() {
    require_root();
    let mut spec = PairSpec::new(Impl::WireguardGo, Impl::WireguardGo);
    spec.ipv6_endpoints = true;
    spec.inner_ipv6 = true;
    let pair = Pair::new(spec).expect("set up two wireguard-go namespaces");
    let (a, b) = (&pair.a, &pair.b);

    wait_for_ping(&a.ns, &b.t6(), &[], Duration::from_secs(15)).expect("first ping6 a -> b");
    assert!(ping(&b.ns, &a.t6(), 3), "ping6 b -> a");
    assert!(ping(&a.ns, &b.t4(), 3), "ping a -> b over the v6 underlay");
    assert_eq!(
        a.dev.peer(&b.public_key).expect("a lists b").endpoint,
        Some(b.endpoint(true))
    );
    tcp_transfer(
        &a.ns,
        &b.ns,
        IpAddr::V6(a.tunnel6.expect("inner v6")),
        5201,
        5 * MB,
    )
    .expect("5 MB each way over IPv6");
}

#[test]
fn wg_show_nonexistent_interface_fails() {
    require_root();
    let ns = Netns::new("nx").expect("namespace");
    let name = unique_ifname("nx");
    let out = ns.exec_raw(&["wg", "show", &name]).expect("run wg show");
    assert!(
        !out.status.success(),
        "`wg show {name}` succeeded for an interface that does not exist: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn peer_without_endpoint_cannot_initiate() {
    // The interop tests rely on a side without an endpoint being unable to
    // start the handshake; check that premise with wireguard-go.
    require_root();
    let mut spec = PairSpec::new(Impl::WireguardGo, Impl::WireguardGo);
    spec.endpoints = vpcgate_e2e::Endpoints::AOnly;
    let pair = Pair::new(spec).expect("pair");
    let stats = ping_stats(&pair.b.ns, &pair.a.t4(), 2, &[]).expect("ping runs");
    assert_eq!(
        stats.received, 0,
        "b reached a without knowing its endpoint"
    );
    assert_eq!(
        pair.b
            .dev
            .peer(&pair.a.public_key)
            .expect("b lists a")
            .latest_handshake,
        0
    );
    wait_for_ping(&pair.a.ns, &pair.b.t4(), &[], Duration::from_secs(15)).expect("a initiates");
    assert!(
        ping(&pair.b.ns, &pair.a.t4(), 3),
        "b answers after a initiated"
    );
}

#[test]
fn keypair_is_valid() {
    let k = gen_keypair().expect("wg genkey");
    assert_ne!(k.private, k.public);
    assert_eq!(k.public, public_key_of(&k.private).expect("wg pubkey"));
}
