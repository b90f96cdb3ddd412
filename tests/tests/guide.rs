//! The managed-database guide, end to end: a gateway VM in a VPC peered with
//! the database's network advertises both ranges, SNATs to its VPC address
//! and clamps TCP MSS; laptops reach the database through it with stock
//! wg-quick or with vpcgated accepting the routes. See `src/guide.rs` for
//! the topology.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use vpcgate_e2e::{
    ping, require_root, set_of, sock, tcp_download, tcp_reachable, tcp_transfer, wait_for_ping,
    wg_quick_strip, write_wg_quick_conf, ClientConf, EchoSession, Guide, Netns, OrDie, WgQuick, DB,
    GW_ENDPOINT, GW_VPC, PEERED_RANGE, TUNNEL_NET, VPC_HOST, VPC_RANGE,
};

const MB: u64 = 1024 * 1024;
/// Accepted routes are polled every ~2 s; "within seconds" gets this long.
const ROUTE_CHANGE: Duration = Duration::from_secs(10);
/// The tunnel MTU of the gateway (vpcgated's default) minus 40 bytes of
/// IPv4 and TCP headers: the largest MSS that fits through the tunnel.
const TUNNEL_MSS: u32 = 1420 - 40;

/// Checks a client config printed by the gateway: one interface with a key,
/// a tunnel address and an MTU; one peer that is the gateway at its public
/// endpoint, routing the tunnel network and both advertised ranges.
fn check_client_conf(conf: &ClientConf, gw_key: &str) {
    let text = &conf.text;
    assert_eq!(conf.section_count("Interface"), 1, "config:\n{text}");
    assert_eq!(conf.section_count("Peer"), 1, "config:\n{text}");
    conf.interface_one("PrivateKey")
        .or_die("[Interface] PrivateKey");
    let addr = conf.address4().or_die("[Interface] Address");
    assert!(
        addr.octets()[..3] == [100, 64, 0] && addr.octets()[3] > 1,
        "client address {addr} should be a free address of {TUNNEL_NET}:\n{text}"
    );
    let mtu: u32 = conf
        .interface_one("MTU")
        .or_die("[Interface] MTU")
        .parse()
        .unwrap_or_else(|e| panic!("MTU is not a number ({e}):\n{text}"));
    assert!((1280..=1420).contains(&mtu), "MTU {mtu}:\n{text}");
    assert_eq!(
        conf.peer_one("PublicKey").or_die("[Peer] PublicKey"),
        gw_key
    );
    assert_eq!(
        conf.peer_one("Endpoint").or_die("[Peer] Endpoint"),
        GW_ENDPOINT
    );
    let allowed = conf.peer("AllowedIPs");
    for want in [TUNNEL_NET, VPC_RANGE, PEERED_RANGE] {
        assert!(
            allowed.iter().any(|a| a == want),
            "AllowedIPs {allowed:?} lacks {want}:\n{text}"
        );
    }
    let keepalive: u32 = conf
        .peer_one("PersistentKeepalive")
        .or_die("[Peer] PersistentKeepalive")
        .parse()
        .unwrap_or_else(|e| panic!("PersistentKeepalive is not a number ({e}):\n{text}"));
    assert!(keepalive > 0, "PersistentKeepalive 0:\n{text}");
}

/// `wg-quick strip` accepts the config and hands `wg setconf` its keys.
fn check_strips(ns: &Netns, conf: &ClientConf) {
    let (_, path) = write_wg_quick_conf(ns, &conf.text).or_die("writing the client config");
    let stripped = wg_quick_strip(ns, &path).or_die("`wg-quick strip` of the client config");
    let s = ClientConf::parse(&stripped).or_die("parsing `wg-quick strip` output");
    assert_eq!(
        s.interface_one("PrivateKey").ok(),
        conf.interface_one("PrivateKey").ok(),
        "stripped:\n{stripped}"
    );
    assert!(
        s.interface("Address").is_empty() && s.interface("MTU").is_empty(),
        "strip keeps wg-quick-only keys:\n{stripped}"
    );
    assert_eq!(s.peer("AllowedIPs"), conf.peer("AllowedIPs"));
    assert_eq!(s.peer("Endpoint"), conf.peer("Endpoint"));
}

#[test]
fn stock_client_reaches_peered_service() {
    require_root();
    let mut g = Guide::new().or_die("guide topology with a configured gateway");
    let gw = &g.gateway;
    let st = gw.ctl.status().or_die("gateway status");
    assert!(st.snat, "SNAT should be on by default: {:?}", st.json);
    assert!(
        st.mss_clamp,
        "MSS clamping should be on by default: {:?}",
        st.json
    );
    assert_eq!(st.public_endpoint.as_deref(), Some(GW_ENDPOINT));
    assert_eq!(
        set_of(&st.advertised_routes),
        BTreeSet::from([VPC_RANGE, PEERED_RANGE])
    );

    let conf = gw
        .ctl
        .add_client("laptop")
        .or_die("`vpcgate peer add laptop` printing a wg-quick config");
    check_client_conf(&conf, &gw.public_key);
    check_strips(&g.net.client, &conf);
    let client_key = conf.public_key().or_die("public key of the client config");
    let addr = conf.address4().or_die("client address");
    let st = gw.ctl.status().or_die("gateway status");
    let peer = st
        .peer_named("laptop")
        .unwrap_or_else(|| panic!("gateway status lists no peer `laptop`: {:?}", st.json));
    assert_eq!(
        peer.public_key, client_key,
        "the config's key is the peer's"
    );
    assert_eq!(peer.allowed_ips, [format!("{addr}/32")]);

    let _laptop = WgQuick::up(&g.net.client, &conf).or_die("wg-quick up on the laptop");
    wait_for_ping(&g.net.client, &DB.to_string(), &[], Duration::from_secs(20))
        .or_die("first ping from the laptop to the database through the gateway");
    assert!(ping(&g.net.client, &DB.to_string(), 5), "ping db");

    let t = tcp_transfer(&g.net.db, &g.net.client, IpAddr::V4(DB), 5432, 50 * MB)
        .or_die("50 MB each way between the laptop and the database, verified");
    for saw in t.server_saw {
        assert_eq!(
            saw.ip(),
            IpAddr::V4(GW_VPC),
            "the database must see the gateway's VPC address (SNAT)"
        );
    }
    // Counters may be published a moment after the traffic that moved them.
    gw.dev
        .wait_peer(
            &client_key,
            Duration::from_secs(3),
            "the gateway's counters for the laptop to account for 50 MB each way",
            |p| p.latest_handshake > 0 && p.rx_bytes >= 50 * MB && p.tx_bytes >= 50 * MB,
        )
        .or_die("gateway peer counters");
    g.gateway
        .dev
        .check_running()
        .or_die("gateway vpcgated still running");
}

#[test]
fn vpcgate_client_accepts_routes() {
    require_root();
    let g = Guide::new().or_die("guide topology with a configured gateway");
    let mut laptop = g
        .vpcgate_laptop(&g.net.client, "laptop2", "100.64.0.2/24")
        .or_die("vpcgated on the laptop, peered with the gateway");

    let view = laptop
        .wait_routes(&[VPC_RANGE, PEERED_RANGE], &[], Duration::from_secs(20))
        .or_die("the laptop accepting both advertised ranges");
    assert_eq!(
        set_of(&view.accepted),
        BTreeSet::from([VPC_RANGE, PEERED_RANGE]),
        "accepted routes"
    );
    let st = g.gateway.ctl.status().or_die("gateway status");
    let peer = st
        .peer_named("laptop2")
        .unwrap_or_else(|| panic!("gateway status lists no peer `laptop2`: {:?}", st.json));
    assert_eq!(peer.public_key, laptop.public_key);
    assert_eq!(peer.allowed_ips, ["100.64.0.2/32"]);

    wait_for_ping(&g.net.client, &DB.to_string(), &[], Duration::from_secs(20))
        .or_die("first ping from the laptop to the database");
    assert!(
        ping(&g.net.client, &VPC_HOST.to_string(), 3),
        "ping VPC host"
    );
    let t = tcp_transfer(&g.net.db, &g.net.client, IpAddr::V4(DB), 5432, 50 * MB)
        .or_die("50 MB each way between the vpcgate laptop and the database, verified");
    for saw in t.server_saw {
        assert_eq!(
            saw.ip(),
            IpAddr::V4(GW_VPC),
            "database sees the SNAT address"
        );
    }
    laptop.dev.check_running().or_die("laptop vpcgated running");
}

#[test]
fn route_changes() {
    require_root();
    let g = Guide::new().or_die("guide topology with a configured gateway");
    let mut laptop = g
        .vpcgate_laptop(&g.net.client, "laptop2", "100.64.0.2/24")
        .or_die("vpcgated on the laptop, peered with the gateway");
    laptop
        .wait_routes(&[VPC_RANGE, PEERED_RANGE], &[], Duration::from_secs(20))
        .or_die("the laptop accepting both advertised ranges");

    // A stock client whose config, made now, keeps listing the peered range.
    let phone = g.net.add_laptop("stock", 4).or_die("second laptop");
    let stock_conf = g
        .gateway
        .ctl
        .add_client("stock")
        .or_die("`vpcgate peer add stock`");
    check_client_conf(&stock_conf, &g.gateway.public_key);
    let stock_addr = stock_conf.address4().or_die("stock client address");
    assert_ne!(
        stock_addr.to_string(),
        "100.64.0.2",
        "the gateway handed out laptop2's address again"
    );
    let _stock = WgQuick::up(&phone, &stock_conf).or_die("wg-quick up on the stock client");
    g.net
        .watch_db()
        .or_die("counting packets that reach the database");
    let db = DB.to_string();
    wait_for_ping(&phone, &db, &[], Duration::from_secs(20)).or_die("stock client -> db");
    wait_for_ping(&g.net.client, &db, &[], Duration::from_secs(20)).or_die("vpcgate laptop -> db");

    let mut echo = EchoSession::start(
        &g.net.vpchost,
        &g.net.client,
        sock(VPC_HOST, 7000),
        Duration::from_millis(200),
    )
    .or_die("long-lived TCP session from the laptop to the VPC host");
    echo.wait_more_rounds(5, Duration::from_secs(10))
        .or_die("echo session running");

    // Withdraw the peered range.
    g.gateway
        .ctl
        .advertise(&[VPC_RANGE])
        .or_die("`vpcgate advertise-routes 198.18.64.0/20`");
    let listed = g
        .gateway
        .ctl
        .run(&["advertise-routes"])
        .or_die("`vpcgate advertise-routes` listing");
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        [VPC_RANGE],
        "advertised set after the withdrawal"
    );
    laptop
        .wait_routes(&[VPC_RANGE], &[PEERED_RANGE], ROUTE_CHANGE)
        .or_die("the laptop dropping the withdrawn range within seconds");
    echo.check_alive()
        .or_die("VPC session across the withdrawal");
    // Without SNAT for the withdrawn range the database could not answer
    // anyway, so count what reaches it: nothing may.
    let not_advertised = || {
        g.gateway
            .ctl
            .status()
            .or_die("gateway status")
            .dropped("not_advertised")
            .unwrap_or_else(|| panic!("gateway status lists no not_advertised counter"))
    };
    let refused_before = not_advertised();
    let arrived_before = g.net.db_arrivals().or_die("db arrival counter");
    assert!(
        !ping(&phone, &db, 3),
        "the stock client still reaches the database through a withdrawn range: \
         the gateway must not forward to it"
    );
    assert!(
        !tcp_reachable(&g.net.db, &phone, sock(DB, 5433), Duration::from_secs(3))
            .or_die("TCP probe"),
        "the stock client opened a TCP connection to the database through a withdrawn range"
    );
    assert!(
        !ping(&g.net.client, &db, 2),
        "the vpcgate laptop still reaches the withdrawn range"
    );
    let arrived = g.net.db_arrivals().or_die("db arrival counter") - arrived_before;
    assert_eq!(
        arrived, 0,
        "{arrived} packets from the tunnel reached the database while its range was \
         withdrawn: the gateway must not forward to a withdrawn range"
    );
    // Not because they never got there: the gateway refused the stock
    // client's pings.
    let refused = not_advertised() - refused_before;
    assert!(
        refused >= 3,
        "the gateway refused {refused} packets while the stock client sent 3 pings \
         and a TCP probe into the withdrawn range"
    );
    echo.wait_more_rounds(5, Duration::from_secs(10))
        .or_die("VPC session while the peered range is withdrawn");

    // Advertise it again.
    g.gateway
        .ctl
        .advertise(&[VPC_RANGE, PEERED_RANGE])
        .or_die("re-advertising both ranges");
    laptop
        .wait_routes(&[VPC_RANGE, PEERED_RANGE], &[], ROUTE_CHANGE)
        .or_die("the laptop accepting the range again within seconds");
    wait_for_ping(&g.net.client, &db, &[], ROUTE_CHANGE)
        .or_die("the vpcgate laptop reaching the database again");
    assert!(
        tcp_reachable(
            &g.net.db,
            &g.net.client,
            sock(DB, 5434),
            Duration::from_secs(5)
        )
        .or_die("TCP probe"),
        "TCP from the vpcgate laptop to the database after re-advertising"
    );
    wait_for_ping(&phone, &db, &[], ROUTE_CHANGE)
        .or_die("the stock client reaching the database again");
    assert!(
        g.net.db_arrivals().or_die("db arrival counter") > arrived_before,
        "the arrival counter does not count tunnel traffic to the database"
    );

    echo.wait_more_rounds(5, Duration::from_secs(10))
        .or_die("VPC session after the changes");
    let (rounds, saw) = echo
        .finish()
        .or_die("the VPC session surviving every route change");
    assert_eq!(
        saw.ip(),
        IpAddr::V4(GW_VPC),
        "VPC host sees the SNAT address"
    );
    eprintln!("VPC session: {rounds} echoes");
    laptop.dev.check_running().or_die("laptop vpcgated running");
}

#[test]
fn mss_clamping_prevents_the_pmtu_black_hole() {
    require_root();
    const BYTES: u64 = 5 * MB;
    let g = Guide::new().or_die("guide topology with a configured gateway");
    assert!(
        g.gateway.ctl.status().or_die("status").mss_clamp,
        "MSS clamping should be on by default"
    );
    let conf = g.gateway.ctl.add_client("router").or_die("peer add");
    let stock = WgQuick::up(&g.net.client, &conf).or_die("wg-quick up on the LAN router");
    let lan = g
        .net
        .add_lan(&g.net.client, "lan", 3)
        .or_die("LAN behind the stock client");
    let masq = format!(
        "table ip vge2e_lan {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\toifname \"{}\" ip saddr 198.18.3.0/24 masquerade\n\
         \t}}\n\
         }}\n",
        stock.iface()
    );
    g.net
        .client
        .exec_stdin(&["nft", "-f", "-"], masq.as_bytes())
        .or_die("masquerading the LAN into the tunnel");
    g.net
        .drop_pmtu_icmp_in_vpcr()
        .or_die("dropping PMTU ICMP in the VPC router");
    for ns in [&g.net.client, &lan] {
        let rules = ns.exec(&["nft", "list", "ruleset"]).or_die("nft ruleset");
        assert!(
            !rules.contains("maxseg"),
            "something clamps MSS in {}:\n{rules}",
            ns.name()
        );
    }
    let db = DB.to_string();
    wait_for_ping(&lan, &db, &[], Duration::from_secs(20))
        .or_die("LAN host -> db (small packets pass)");

    let d = tcp_download(
        &g.net.db,
        &lan,
        sock(DB, 5432),
        BYTES,
        Duration::from_secs(120),
    )
    .or_die("connecting from the LAN host to the database");
    if let Err(e) = &d.outcome {
        panic!(
            "with MSS clamping on, 5 MB db -> LAN should arrive, but: {e:#} \
             (server MSS {}, PMTU ICMP dropped by vpcr: {:?})",
            d.server_mss,
            g.net.pmtu_icmp_dropped().ok()
        );
    }
    assert!(
        d.server_mss <= TUNNEL_MSS,
        "clamped: the database should send segments of at most {TUNNEL_MSS} bytes, sends {}",
        d.server_mss
    );
    assert_eq!(d.server_saw.ip(), IpAddr::V4(GW_VPC));

    g.gateway
        .ctl
        .run(&["set", "--mss-clamp", "off"])
        .or_die("`vpcgate set --mss-clamp off`");
    assert!(
        !g.gateway.ctl.status().or_die("status").mss_clamp,
        "status after --mss-clamp off"
    );
    let d = tcp_download(
        &g.net.db,
        &lan,
        sock(DB, 5433),
        BYTES,
        Duration::from_secs(15),
    )
    .or_die("connecting from the LAN host to the database without clamping");
    assert!(
        d.server_mss > TUNNEL_MSS,
        "without clamping the LAN host's MSS (1460) should reach the database \
         unchanged, but the database's MSS is {}: something else clamps",
        d.server_mss
    );
    assert!(
        !d.completed() && d.received < BYTES,
        "without clamping, the full-size segments should vanish in the PMTU black hole, \
         but {} of {BYTES} bytes arrived",
        d.received
    );
    if let Err(e) = &d.outcome {
        eprintln!("unclamped download stalled as expected: {e:#}");
    }
    assert!(
        g.net.pmtu_icmp_dropped().or_die("ICMP counter") > 0,
        "the gateway should have sent fragmentation-needed ICMP, which vpcr drops"
    );

    g.gateway
        .ctl
        .run(&["set", "--mss-clamp", "on"])
        .or_die("`vpcgate set --mss-clamp on`");
    let d = tcp_download(
        &g.net.db,
        &lan,
        sock(DB, 5434),
        BYTES,
        Duration::from_secs(120),
    )
    .or_die("connecting after turning clamping back on");
    if let Err(e) = &d.outcome {
        panic!("with MSS clamping back on, a new connection should complete: {e:#}");
    }
}

#[test]
fn client_config_and_qr() {
    require_root();
    let g = Guide::with_unconfigured_gateway().or_die("guide topology, gateway not configured");
    let ctl = &g.gateway.ctl;

    let out = ctl
        .output(&["peer", "add", "early"])
        .or_die("running `vpcgate peer add early`");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "`peer add` without a public endpoint should fail; stdout:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains("--public-endpoint"),
        "the error should say to set --public-endpoint; stderr: {stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "a failed `peer add` printed a config"
    );
    let st = ctl.status().or_die("status");
    assert!(
        st.peer_named("early").is_none(),
        "the failed `peer add` left a peer behind: {:?}",
        st.json
    );

    g.configure_gateway().or_die("configuring the gateway");
    let qr = ctl
        .run(&["peer", "add", "phone", "--qr"])
        .or_die("`vpcgate peer add phone --qr`");
    assert!(
        !qr.contains("PrivateKey") && !qr.contains("[Interface]"),
        "--qr should print a QR code, not the config:\n{qr}"
    );
    let decoded = ctl
        .run_stdin(&["qr-decode"], Some(qr.as_bytes()))
        .or_die("`vpcgate qr-decode` of the QR code");
    let config = ctl
        .run(&["peer", "config", "phone"])
        .or_die("`vpcgate peer config phone`");
    assert_eq!(
        decoded.trim_end(),
        config.trim_end(),
        "the QR code should hold exactly the config"
    );
    let qr_again = ctl
        .run(&["peer", "config", "phone", "--qr"])
        .or_die("`vpcgate peer config phone --qr`");
    let decoded_again = ctl
        .run_stdin(&["qr-decode"], Some(qr_again.as_bytes()))
        .or_die("`vpcgate qr-decode` of the second QR code");
    assert_eq!(decoded_again.trim_end(), config.trim_end());

    let conf = ClientConf::parse(&config).or_die("parsing `peer config phone`");
    check_client_conf(&conf, &g.gateway.public_key);
    check_strips(&g.net.client, &conf);
    let st = ctl.status().or_die("status");
    let phone = st
        .peer_named("phone")
        .unwrap_or_else(|| panic!("no peer `phone` in status: {:?}", st.json));
    assert_eq!(
        phone.public_key,
        conf.public_key().or_die("public key of the config")
    );
}
