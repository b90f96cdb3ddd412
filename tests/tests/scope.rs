//! Forwarding scope on the wire: a peer reaches the advertised ranges and
//! the tunnel network, and nothing else the gateway can reach, even when
//! its own config claims more. Two such targets sit beside the guide's
//! gateway: a namespace that plays the cloud metadata service at
//! 169.254.169.254, and a management network (198.19.200.0/24) that the
//! gateway is on but does not advertise.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use vpcgate_e2e::{
    nft_counters, require_root, tcp_reachable, veth, wait_for_ping, ClientConf, Guide, Netns,
    OrDie, WgQuick, DB,
};

const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
const MGMT_HOST: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 10);
const PROBE: Duration = Duration::from_secs(3);

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(ip, port))
}

/// Counts every TCP packet that arrives for `port` in `ns`.
fn count_arrivals(ns: &Netns, port: u16) {
    let rules = format!(
        "table inet vge2e_arrivals {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\ttcp dport {port} counter\n\
         \t}}\n\
         }}\n"
    );
    ns.exec_stdin(&["nft", "-f", "-"], rules.as_bytes())
        .or_die("installing the arrival counter");
}

fn arrivals(ns: &Netns) -> u64 {
    nft_counters(ns, "inet", "vge2e_arrivals", "input").or_die("reading the arrival counter")
}

#[test]
fn peer_reaches_only_advertised_ranges_and_the_tunnel() {
    require_root();
    let g = Guide::new().or_die("the guide's network and gateway");
    let gw = &g.gateway;

    // The metadata service, link-local to the gateway as in a cloud.
    let imds = Netns::new("imds").or_die("metadata namespace");
    veth(
        &g.net.gw,
        &imds,
        &["169.254.0.1/16"],
        &["169.254.169.254/16"],
    )
    .or_die("metadata link");
    imds.ip(&["route", "add", "default", "via", "169.254.0.1"])
        .or_die("metadata default route");
    // A network the gateway is on but does not advertise. Its host routes
    // everything back through the gateway, so a leak would be answered.
    let mgmt = Netns::new("mgmt").or_die("management namespace");
    veth(
        &g.net.gw,
        &mgmt,
        &["198.19.200.1/24"],
        &["198.19.200.10/24"],
    )
    .or_die("management link");
    mgmt.ip(&["route", "add", "default", "via", "198.19.200.1"])
        .or_die("management default route");
    count_arrivals(&imds, 80);
    count_arrivals(&mgmt, 8080);

    // Both exist and answer the gateway itself, so a refusal below is the
    // gateway's doing, not a missing host.
    assert!(
        tcp_reachable(&imds, &g.net.gw, addr(METADATA, 80), PROBE).or_die("probe"),
        "the gateway should reach the metadata service itself"
    );
    assert!(
        tcp_reachable(&mgmt, &g.net.gw, addr(MGMT_HOST, 8080), PROBE).or_die("probe"),
        "the gateway should reach its management network itself"
    );

    // A client whose config claims both as well as what it was given.
    let given = gw.ctl.add_client("greedy").or_die("vpcgate peer add");
    let allowed = given.peer("AllowedIPs").join(", ");
    let greedy = given.text.replace(
        &format!("AllowedIPs = {allowed}"),
        &format!("AllowedIPs = {allowed}, 169.254.169.254/32, 198.19.200.0/24"),
    );
    assert_ne!(greedy, given.text, "the AllowedIPs line should be widened");
    let conf = ClientConf::parse(&greedy).or_die("widened config");
    let _client = WgQuick::up(&g.net.client, &conf).or_die("wg-quick up");
    wait_for_ping(&g.net.client, &DB.to_string(), &[], Duration::from_secs(20))
        .or_die("first ping to the database through the gateway");

    // In scope: the peered database and the gateway's tunnel address.
    assert!(
        tcp_reachable(&g.net.db, &g.net.client, addr(DB, 5432), PROBE).or_die("probe"),
        "the advertised database should be reachable"
    );
    assert!(
        tcp_reachable(
            &g.net.gw,
            &g.net.client,
            addr(Ipv4Addr::new(100, 64, 0, 1), 7000),
            PROBE
        )
        .or_die("probe"),
        "the gateway's tunnel address should be reachable"
    );

    // Out of scope: nothing arrives, and the gateway counts the drops.
    let dropped_before = gw
        .ctl
        .status()
        .or_die("status")
        .dropped("not_advertised")
        .expect("status lists not_advertised");
    let (imds_before, mgmt_before) = (arrivals(&imds), arrivals(&mgmt));
    assert!(
        !tcp_reachable(&imds, &g.net.client, addr(METADATA, 80), PROBE).or_die("probe"),
        "a peer must not reach the metadata service"
    );
    assert!(
        !tcp_reachable(&mgmt, &g.net.client, addr(MGMT_HOST, 8080), PROBE).or_die("probe"),
        "a peer must not reach the gateway's unadvertised network"
    );
    assert_eq!(
        arrivals(&imds),
        imds_before,
        "no packet from the peer may arrive at the metadata service"
    );
    assert_eq!(
        arrivals(&mgmt),
        mgmt_before,
        "no packet from the peer may arrive on the management network"
    );
    let dropped_after = gw
        .ctl
        .status()
        .or_die("status")
        .dropped("not_advertised")
        .expect("status lists not_advertised");
    assert!(
        dropped_after >= dropped_before + 2,
        "the gateway should count the refused SYNs as not_advertised: {dropped_before} -> {dropped_after}"
    );
}
