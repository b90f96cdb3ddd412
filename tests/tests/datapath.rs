//! vpcgated on both ends of a veth underlay: the data path carries ping and
//! large TCP transfers intact, over IPv4 and over IPv6.

use std::net::IpAddr;
use std::time::Duration;

use vpcgate_e2e::{ping, require_root, tcp_transfer, wait_for_ping, Impl, OrDie, Pair, PairSpec};

const MB: u64 = 1024 * 1024;

#[test]
fn ipv4_ping_and_100mb_each_way() {
    require_root();
    let mut pair = Pair::new(PairSpec::new(Impl::Vpcgated, Impl::Vpcgated))
        .expect("set up two vpcgated namespaces");

    wait_for_ping(&pair.a.ns, &pair.b.t4(), &[], Duration::from_secs(20))
        .expect("first ping a -> b through vpcgated");
    assert!(ping(&pair.a.ns, &pair.b.t4(), 10), "ping a -> b");
    assert!(ping(&pair.b.ns, &pair.a.t4(), 10), "ping b -> a");

    let (a, b) = (&pair.a, &pair.b);
    tcp_transfer(&b.ns, &a.ns, IpAddr::V4(b.tunnel4), 5201, 100 * MB)
        .expect("100 MB each way between two vpcgated peers, verified byte for byte");

    // Each side sent and received 100 MB of TCP payload; the encrypted
    // datagrams that carried it are larger still.
    for (this, other) in [(a, b), (b, a)] {
        this.dev
            .wait_peer(
                &other.public_key,
                Duration::from_secs(3),
                "rx and tx counters to reach the 100 MB each way carried",
                |p| p.rx_bytes >= 100 * MB && p.tx_bytes >= 100 * MB,
            )
            .unwrap_or_else(|e| panic!("{}: {e:#}", this.dev.name()));
    }
    pair.check_running().or_die("both vpcgated still running");
}

#[test]
fn ipv6_inner_over_ipv6_underlay() {
    require_root();
    let mut spec = PairSpec::new(Impl::Vpcgated, Impl::Vpcgated);
    spec.ipv6_endpoints = true;
    spec.inner_ipv6 = true;
    let mut pair = Pair::new(spec).expect("set up two vpcgated namespaces");

    wait_for_ping(&pair.a.ns, &pair.b.t6(), &[], Duration::from_secs(20))
        .expect("first ping6 a -> b through vpcgated over the IPv6 underlay");
    assert!(ping(&pair.a.ns, &pair.b.t6(), 5), "ping6 a -> b");
    assert!(ping(&pair.b.ns, &pair.a.t6(), 5), "ping6 b -> a");
    assert!(
        ping(&pair.b.ns, &pair.a.t4(), 3),
        "inner IPv4 over the IPv6 underlay"
    );

    let (a, b) = (&pair.a, &pair.b);
    for (this, other) in [(a, b), (b, a)] {
        let peer = this.dev.peer(&other.public_key).expect("peer listed");
        assert_eq!(
            peer.endpoint,
            Some(other.endpoint(true)),
            "{} should reach its peer over the IPv6 underlay",
            this.dev.name()
        );
    }

    let a6 = a.tunnel6.expect("pair has inner IPv6");
    tcp_transfer(&a.ns, &b.ns, IpAddr::V6(a6), 5201, 10 * MB)
        .expect("10 MB each way over inner IPv6, verified byte for byte");
    pair.check_running().or_die("both vpcgated still running");
}

/// Each kernel offload falls back on its own. Side a runs with none of them
/// (one packet per TUN read and write, one datagram per send and per
/// receive slot), side b with all of them, so every combination of a
/// batching sender and a plain receiver is crossed in the two directions.
#[test]
fn without_kernel_offloads() {
    require_root();
    let mut spec = PairSpec::new(Impl::Vpcgated, Impl::Vpcgated);
    spec.a_args = vec!["--no-offload".into(), "tun,gso,gro".into()];
    let mut pair = Pair::new(spec).expect("set up two vpcgated namespaces");

    wait_for_ping(&pair.a.ns, &pair.b.t4(), &[], Duration::from_secs(20))
        .expect("first ping a -> b");
    let (a, b) = (&pair.a, &pair.b);
    tcp_transfer(&b.ns, &a.ns, IpAddr::V4(b.tunnel4), 5201, 50 * MB)
        .expect("50 MB each way between a plain and an offloading vpcgated");

    // The flag must really have turned the offloads off on a, and the
    // kernel must really have given them to b, or this proves nothing.
    let plain = a.dev.log_tail(64 * 1024);
    assert!(
        plain.contains("TUN offload off, UDP GSO off, GRO off"),
        "side a should run without offloads; its log:\n{plain}"
    );
    let offloading = b.dev.log_tail(64 * 1024);
    assert!(
        offloading.contains("TUN offload on, UDP GSO up to"),
        "side b should run with offloads; its log:\n{offloading}"
    );
    assert!(
        offloading.contains("GRO on"),
        "side b should receive with GRO; its log:\n{offloading}"
    );
    pair.check_running().or_die("both vpcgated still running");
}
