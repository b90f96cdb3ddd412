//! The managed-database guide over IPv6: a dual-stack gateway (tunnel
//! 100.64.0.1/24 and fd00:64::1/64, public endpoint `[fd00:2::10]:51820`)
//! advertises IPv6 ranges, and a stock wg-quick client reaches them as it
//! reaches IPv4 ones: forwarded, SNATed to the gateway's VPC address, and
//! nothing outside the advertised ranges. See `src/guide.rs` for the
//! topology.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use vpcgate_e2e::{
    nft_counters, ping, require_root, set_of, tcp_reachable, tcp_transfer, wait_for_ping,
    ClientConf, Guide, Netns, OrDie, Vpcgate, WgQuick, DB, DB6, GW_ENDPOINT6, GW_TUNNEL_ADDRS_DUAL,
    GW_VPC6, INET_GW_SIDE6, PEERED_RANGE, PEERED_RANGE6, TUNNEL_NET, TUNNEL_NET6, VPC_HOST6,
    VPC_RANGE, VPC_RANGE6,
};

const MB: u64 = 1024 * 1024;
const NOT_ADVERTISED: &str = "not_advertised";
/// The out-of-scope destination: inet's end of the gateway's public link,
/// which the gateway can reach directly. The client routes it into the
/// tunnel; the gateway must not forward it.
const OUTSIDE6: &str = "fd00:2::1/128";
/// Echo requests the out-of-scope ping sends.
const OUTSIDE_PINGS: u32 = 3;

fn not_advertised_drops(ctl: &Vpcgate) -> u64 {
    let st = ctl.status().or_die("gateway status");
    st.dropped(NOT_ADVERTISED).unwrap_or_else(|| {
        panic!(
            "`vpcgate status --json` has no {NOT_ADVERTISED} drop counter: {:?}",
            st.json["drops"]
        )
    })
}

/// `conf` with `extra` appended to the peer's AllowedIPs.
fn with_extra_allowed_ip(conf: &ClientConf, extra: &str) -> ClientConf {
    let mut found = false;
    let text: String = conf
        .text
        .lines()
        .map(|line| {
            if line.trim_start().starts_with("AllowedIPs") {
                found = true;
                format!("{line}, {extra}\n")
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    assert!(found, "no AllowedIPs line in:\n{}", conf.text);
    ClientConf::parse(&text).or_die("parsing the edited config")
}

/// Counts echo requests and TCP packets to [`OUTSIDE6`] arriving in `inet`,
/// from anywhere, before any filtering.
fn watch_outside(inet: &Netns) {
    let addr = OUTSIDE6.trim_end_matches("/128");
    let rules = format!(
        "table ip6 vge2e_outside {{\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tip6 daddr {addr} icmpv6 type echo-request counter\n\
         \t\tip6 daddr {addr} meta l4proto tcp counter\n\
         \t}}\n\
         }}\n"
    );
    inet.exec_stdin(&["nft", "-f", "-"], rules.as_bytes())
        .or_die("installing the arrival counter in inet");
}

fn outside_arrivals(inet: &Netns) -> u64 {
    nft_counters(inet, "ip6", "vge2e_outside", "prerouting").or_die("inet arrival counter")
}

#[test]
fn ipv6_ranges_end_to_end() {
    require_root();
    let mut g = Guide::dual_stack_with_unconfigured_gateway()
        .or_die("dual-stack guide topology with vpcgated on the gateway");
    let gw = &g.gateway;
    gw.ctl
        .run(&["set", "--public-endpoint", GW_ENDPOINT6])
        .or_die("`vpcgate set --public-endpoint [fd00:2::10]:51820`");
    let ranges = [VPC_RANGE6, PEERED_RANGE6, VPC_RANGE, PEERED_RANGE];
    gw.ctl
        .advertise(&ranges)
        .or_die("advertising the IPv6 and IPv4 ranges");
    let st = gw.ctl.status().or_die("gateway status");
    assert_eq!(
        set_of(&st.advertised_routes),
        BTreeSet::from(ranges),
        "advertised routes: {:?}",
        st.json
    );
    assert_eq!(
        st.json["addresses"],
        serde_json::json!(GW_TUNNEL_ADDRS_DUAL.split(',').collect::<Vec<_>>()),
        "tunnel addresses in status"
    );
    assert!(st.snat, "SNAT should be on by default: {:?}", st.json);
    assert!(
        st.warnings.is_empty(),
        "forwarding is on for both families, yet status warns: {:?}",
        st.warnings
    );
    let nat = g
        .net
        .gw
        .exec(&[
            "nft",
            "list",
            "table",
            "inet",
            &format!("vpcgate_{}", gw.dev.name()),
        ])
        .or_die("the daemon's nftables table");
    for range in [VPC_RANGE6, PEERED_RANGE6] {
        assert!(
            nat.contains(range),
            "the SNAT table lacks the advertised {range}:\n{nat}"
        );
    }

    let conf = gw
        .ctl
        .add_client("laptop6")
        .or_die("`vpcgate peer add laptop6` printing a wg-quick config");
    let text = &conf.text;
    let addresses = conf.interface("Address");
    assert_eq!(
        set_of(&addresses),
        BTreeSet::from(["100.64.0.2/32", "fd00:64::2/128"]),
        "the next free IPv4 /32 and IPv6 /128 of the tunnel networks:\n{text}"
    );
    let allowed = conf.peer("AllowedIPs");
    assert_eq!(
        set_of(&allowed),
        BTreeSet::from([
            TUNNEL_NET,
            TUNNEL_NET6,
            VPC_RANGE6,
            PEERED_RANGE6,
            VPC_RANGE,
            PEERED_RANGE
        ]),
        "AllowedIPs should be the tunnel networks and the advertised ranges:\n{text}"
    );
    assert_eq!(
        conf.peer_one("Endpoint").or_die("[Peer] Endpoint"),
        GW_ENDPOINT6
    );
    assert_eq!(
        conf.peer_one("PublicKey").or_die("[Peer] PublicKey"),
        gw.public_key
    );
    let client_key = conf.public_key().or_die("public key of the client config");
    let client6 = conf.address6().or_die("client IPv6 address");
    let st = gw.ctl.status().or_die("gateway status");
    let peer = st
        .peer_named("laptop6")
        .unwrap_or_else(|| panic!("gateway status lists no peer `laptop6`: {:?}", st.json));
    assert_eq!(peer.public_key, client_key);
    assert_eq!(set_of(&peer.allowed_ips), set_of(&addresses));

    // Were the gateway to forward to OUTSIDE6, inet could answer: it has a
    // route back to the tunnel network through the gateway.
    g.net
        .inet
        .ip(&["route", "add", TUNNEL_NET6, "via", "fd00:2::10"])
        .or_die("inet's route back to the tunnel network");
    watch_outside(&g.net.inet);
    let conf = with_extra_allowed_ip(&conf, OUTSIDE6);
    let _laptop = WgQuick::up(&g.net.client, &conf).or_die("wg-quick up on the laptop");

    let db = DB6.to_string();
    wait_for_ping(&g.net.client, &db, &[], Duration::from_secs(20))
        .or_die("first IPv6 ping from the laptop to the database through the gateway");
    assert!(ping(&g.net.client, &db, 5), "ping6 db");
    assert!(
        ping(&g.net.client, &VPC_HOST6.to_string(), 3),
        "ping6 the VPC host"
    );
    assert!(
        ping(&g.net.client, "fd00:64::1", 3),
        "ping6 the gateway's tunnel address"
    );
    assert!(
        ping(&g.net.client, &DB.to_string(), 3),
        "IPv4 still works beside IPv6: ping db"
    );

    let t = tcp_transfer(&g.net.db, &g.net.client, IpAddr::V6(DB6), 5432, 20 * MB)
        .or_die("20 MB each way over IPv6 between the laptop and the database, verified");
    for saw in t.server_saw {
        assert_eq!(
            saw.ip(),
            IpAddr::V6(GW_VPC6),
            "the database must see the gateway's VPC address {GW_VPC6} (SNAT), \
             not the client's {client6}"
        );
    }
    gw.dev
        .wait_peer(
            &client_key,
            Duration::from_secs(3),
            "the gateway's counters for the laptop to account for 20 MB each way",
            |p| p.rx_bytes >= 20 * MB && p.tx_bytes >= 20 * MB,
        )
        .or_die("gateway peer counters");

    // A destination the client routes into the tunnel but the gateway does
    // not advertise.
    let outside = OUTSIDE6.trim_end_matches("/128");
    let drops_before = not_advertised_drops(&gw.ctl);
    let arrived_before = outside_arrivals(&g.net.inet);
    assert!(
        !ping(&g.net.client, outside, OUTSIDE_PINGS),
        "{outside} answered through the tunnel: the gateway forwards outside the \
         advertised ranges"
    );
    assert!(
        !tcp_reachable(
            &g.net.inet,
            &g.net.client,
            SocketAddr::new(IpAddr::V6(INET_GW_SIDE6), 5433),
            Duration::from_secs(3)
        )
        .or_die("TCP probe"),
        "TCP from the laptop to {outside} through the tunnel connected"
    );
    let arrived = outside_arrivals(&g.net.inet) - arrived_before;
    assert_eq!(
        arrived, 0,
        "{arrived} packets from the tunnel reached {outside}: the gateway must not \
         forward outside the advertised ranges"
    );
    let drops = not_advertised_drops(&gw.ctl) - drops_before;
    assert!(
        drops >= u64::from(OUTSIDE_PINGS),
        "{NOT_ADVERTISED} grew by {drops} while the laptop sent {OUTSIDE_PINGS} pings and \
         TCP SYNs to {outside}"
    );
    eprintln!("{NOT_ADVERTISED} drops for {outside}: {drops}");
    // The counter does count what reaches inet from the gateway's side.
    assert!(
        ping(&g.net.gw, outside, 1),
        "the gateway itself reaches {outside}"
    );
    assert!(
        outside_arrivals(&g.net.inet) > arrived_before,
        "the arrival counter in inet does not count pings from the gateway"
    );

    assert!(
        ping(&g.net.client, &db, 3),
        "the database is still reachable after the refused packets"
    );
    g.gateway
        .dev
        .check_running()
        .or_die("gateway vpcgated still running");
}
