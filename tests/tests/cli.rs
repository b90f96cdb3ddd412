//! The `vpcgate` CLI against a real daemon: every subnet-routing command,
//! its `--json` form and its error paths. A refused command exits non-zero,
//! says what to do, and changes nothing; accepted changes survive a restart.

use std::process::Output;
use std::time::Duration;

use vpcgate_e2e::{gen_keypair, require_root, Netns, Vpcgate, VpcgatedConfig, WgDev};

struct Gateway {
    ns: Netns,
    dev: WgDev,
    cfg: VpcgatedConfig,
}

impl Gateway {
    fn start(tag: &str) -> Gateway {
        Gateway::start_with(tag, &[])
    }

    /// A gateway whose vpcgated gets `extra_args` as well.
    fn start_with(tag: &str, extra_args: &[&str]) -> Gateway {
        let ns = Netns::new(tag).expect("namespace");
        let mut cfg = VpcgatedConfig::new(51820, "100.64.0.1/24");
        cfg.state_dir = Some(ns.dir().join("state"));
        cfg.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        let dev = WgDev::vpcgated(&ns, tag, &cfg).expect("vpcgated starts");
        Gateway { ns, dev, cfg }
    }

    fn restart(&mut self) {
        self.dev
            .process()
            .terminate(Duration::from_secs(10))
            .expect("stops");
        self.dev = WgDev::vpcgated(&self.ns, "cr", &self.cfg).expect("restarts");
    }

    fn run(&self, args: &[&str]) -> Output {
        Vpcgate::for_dev(&self.dev)
            .and_then(|ctl| ctl.output(args))
            .expect("run vpcgate")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "vpcgate {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("UTF-8")
    }

    /// Runs a command that must be refused; returns its stderr.
    fn refused(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "vpcgate {args:?} should have failed");
        assert!(
            out.stdout.is_empty(),
            "a refused command printed to stdout: {out:?}"
        );
        String::from_utf8(out.stderr).expect("UTF-8")
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status JSON")
    }
}

#[test]
fn advertise_routes_validates_persists_and_clears() {
    require_root();
    let mut gw = Gateway::start("ca");
    assert_eq!(
        gw.ok(&["advertise-routes"]),
        "",
        "nothing advertised at first"
    );
    gw.ok(&[
        "advertise-routes",
        "198.18.64.0/20, 198.19.101.0/24",
        "fd00:99::/48",
    ]);
    let listed = "198.18.64.0/20\n198.19.101.0/24\nfd00:99::/48\n";
    assert_eq!(gw.ok(&["advertise-routes"]), listed);

    for (args, expected) in [
        (
            &["advertise-routes", "198.18.64.5/20"][..],
            "did you mean 198.18.64.0/20?",
        ),
        (
            &["advertise-routes", "198.18.64.5"][..],
            "did you mean 198.18.64.5/32?",
        ),
        (
            &["advertise-routes", "nonsense"][..],
            "is not a CIDR prefix",
        ),
        (
            &["advertise-routes", "100.64.0.0/16"][..],
            "overlaps the tunnel network",
        ),
        (&["advertise-routes", "0.0.0.0/0"][..], "--exit-node"),
        (
            &["advertise-routes", "198.18.0.0/24,198.18.0.0/24"][..],
            "listed twice",
        ),
        (
            &["advertise-routes", "198.18.0.0/16", "198.18.5.0/24"][..],
            "already covered by 198.18.0.0/16",
        ),
        (
            &["advertise-routes", "--clear", "198.18.0.0/16"][..],
            "cannot be used with",
        ),
    ] {
        let err = gw.refused(args);
        assert!(err.contains(expected), "{args:?}: {err}");
        assert_eq!(
            gw.ok(&["advertise-routes"]),
            listed,
            "{args:?} changed the set"
        );
    }

    let json: serde_json::Value =
        serde_json::from_str(&gw.ok(&["advertise-routes", "--json"])).expect("JSON");
    assert_eq!(json["routes"].as_array().map(Vec::len), Some(3));

    gw.restart();
    assert_eq!(
        gw.ok(&["advertise-routes"]),
        listed,
        "advertised routes survive a restart"
    );
    gw.ok(&["advertise-routes", "--exit-node", "0.0.0.0/0"]);
    assert_eq!(gw.ok(&["advertise-routes"]), "0.0.0.0/0\n");
    // A default route covers the tunnel network without taking its place:
    // the address can still change, and the daemon starts with it saved.
    gw.ok(&["set", "--address", "100.64.0.1/24,fd00:64::1/64"]);
    gw.ok(&["set", "--address", "100.64.0.1/24"]);
    gw.restart();
    assert_eq!(
        gw.ok(&["advertise-routes"]),
        "0.0.0.0/0\n",
        "an exit node survives a restart"
    );
    gw.ok(&["advertise-routes", "--clear"]);
    assert_eq!(gw.ok(&["advertise-routes"]), "");
}

#[test]
fn forwarding_off_is_reported() {
    require_root();
    let gw = Gateway::start("cb");
    gw.ns
        .exec(&["sysctl", "-qw", "net.ipv4.ip_forward=0"])
        .expect("sysctl");
    let out = gw.run(&["advertise-routes", "198.18.64.0/20"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("IPv4 forwarding is off") && err.contains("net.ipv4.ip_forward=1"),
        "{err}"
    );
    let warnings = gw.status()["warnings"].to_string();
    assert!(warnings.contains("IPv4 forwarding is off"), "{warnings}");
    // The human form puts them on a line of their own, after the report.
    let text = gw.ok(&["status"]);
    assert!(
        text.contains("\n\nwarning: IPv4 forwarding is off") && text.ends_with("/etc/sysctl.d)\n"),
        "{text}"
    );
    gw.ns
        .exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        .expect("sysctl");
    assert!(!gw.status()["warnings"]
        .to_string()
        .contains("forwarding is off"));
}

#[test]
fn set_switches_snat_and_clamping_and_validates() {
    require_root();
    let mut gw = Gateway::start("cc");
    let table = format!("vpcgate_{}", gw.dev.name());
    gw.ok(&["advertise-routes", "198.18.64.0/20"]);
    let rules = gw
        .ns
        .exec(&["nft", "list", "table", "inet", &table])
        .expect("our table exists");
    assert!(
        rules.contains("masquerade") && rules.contains("198.18.64.0/20"),
        "{rules}"
    );

    let status = gw.status();
    assert_eq!(
        (status["snat"].as_bool(), status["mss_clamp"].as_bool()),
        (Some(true), Some(true))
    );
    gw.ok(&["set", "--snat", "off", "--mss-clamp", "off"]);
    let status = gw.status();
    assert_eq!(
        (status["snat"].as_bool(), status["mss_clamp"].as_bool()),
        (Some(false), Some(false))
    );
    let rules = gw
        .ns
        .exec(&["nft", "list", "table", "inet", &table])
        .expect("table kept");
    assert!(
        !rules.contains("masquerade"),
        "SNAT off still masquerades:\n{rules}"
    );

    assert!(gw
        .refused(&["set", "--snat", "maybe"])
        .contains("on or off"));
    assert!(gw
        .refused(&["set", "--public-endpoint", "no-port"])
        .contains("HOST:PORT"));
    assert!(gw
        .refused(&["set", "--public-endpoint", "198.18.2.10:0"])
        .contains("HOST:PORT"));
    assert_eq!(gw.status()["public_endpoint"], serde_json::Value::Null);
    gw.ok(&["set", "--public-endpoint", "[fd00::10]:51820"]);
    gw.ok(&["set", "--snat", "on"]);

    gw.restart();
    let status = gw.status();
    assert_eq!(status["public_endpoint"], "[fd00::10]:51820");
    assert_eq!(
        (status["snat"].as_bool(), status["mss_clamp"].as_bool()),
        (Some(true), Some(false))
    );

    // The table is ours alone, and it goes when we go.
    gw.dev
        .process()
        .terminate(Duration::from_secs(10))
        .expect("stops");
    let out = gw
        .ns
        .exec_raw(&["nft", "list", "table", "inet", &table])
        .expect("run nft");
    assert!(
        !out.status.success(),
        "SNAT table left behind after SIGTERM"
    );
}

#[test]
fn peers_add_config_list_remove() {
    require_root();
    let mut gw = Gateway::start("cd");
    let err = gw.refused(&["peer", "add", "laptop"]);
    assert!(err.contains("--public-endpoint"), "{err}");
    gw.ok(&["set", "--public-endpoint", "198.18.2.10:51820"]);
    gw.ok(&["advertise-routes", "198.18.64.0/20"]);

    let out = gw.run(&["peer", "add", "laptop"]);
    assert!(out.status.success(), "{out:?}");
    let config = String::from_utf8(out.stdout).expect("UTF-8");
    assert!(
        config.starts_with("[Interface]\nPrivateKey = "),
        "stdout must be only the config:\n{config}"
    );
    assert!(config.contains("Address = 100.64.0.2/32"), "{config}");
    assert!(config.contains("Endpoint = 198.18.2.10:51820"), "{config}");
    assert!(
        config.contains("AllowedIPs = 100.64.0.0/24, 198.18.64.0/20"),
        "{config}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("added peer laptop"));
    assert_eq!(gw.ok(&["peer", "config", "laptop"]), config);

    // The generated client key pairs with the public key the gateway lists.
    let private = config
        .lines()
        .find_map(|l| l.strip_prefix("PrivateKey = "))
        .expect("private key line");
    let public = vpcgate_e2e::public_key_of(private).expect("wg pubkey");
    let peers: serde_json::Value =
        serde_json::from_str(&gw.ok(&["peer", "list", "--json"])).expect("JSON");
    assert_eq!(peers[0]["name"], "laptop");
    assert_eq!(peers[0]["public_key"], public.as_str());
    assert!(gw.dev.peer(&public).is_ok(), "wg show lists the new peer");

    // A new advertised route shows up in the reprinted config.
    gw.ok(&["advertise-routes", "198.18.64.0/20,198.19.101.0/24"]);
    assert!(gw
        .ok(&["peer", "config", "laptop"])
        .contains("198.19.101.0/24"));

    let own = gw.status()["public_key"].as_str().expect("key").to_string();
    let other = gen_keypair().expect("key");
    for (args, expected) in [
        (vec!["peer", "add", "laptop"], "already exists"),
        (vec!["peer", "add", "bad name"], "not a valid peer name"),
        (
            vec!["peer", "add", "x", "--public-key", "abc"],
            "not a base64 WireGuard key",
        ),
        (
            vec!["peer", "add", "x", "--public-key", &own],
            "own public key",
        ),
        (
            vec!["peer", "add", "x", "--public-key", &public],
            "already exists",
        ),
        (
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &other.public,
                "--allowed-ips",
                "100.64.0.2/32",
            ],
            "already belongs to peer laptop",
        ),
        (
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &other.public,
                "--allowed-ips",
                "198.18.1.1/24",
            ],
            "did you mean",
        ),
        (
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &other.public,
                "--endpoint",
                "nowhere",
            ],
            "HOST:PORT",
        ),
        (vec!["peer", "config", "ghost"], "no peer named"),
        (vec!["peer", "remove", "ghost"], "no peer named"),
    ] {
        let err = gw.refused(&args);
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    let peers: serde_json::Value =
        serde_json::from_str(&gw.ok(&["peer", "list", "--json"])).expect("JSON");
    assert_eq!(
        peers.as_array().map(Vec::len),
        Some(1),
        "a refused add changed the peers"
    );

    gw.ok(&[
        "peer",
        "add",
        "server",
        "--public-key",
        &other.public,
        "--endpoint",
        "198.18.9.9:51820",
        "--keepalive",
        "25",
    ]);
    let err = gw.refused(&["peer", "config", "server"]);
    assert!(err.contains("brought its own key"), "{err}");
    let server = gw.dev.peer(&other.public).expect("listed");
    assert_eq!(server.allowed_ips, ["100.64.0.3/32"], "next free address");
    assert_eq!(server.persistent_keepalive, Some(25));

    gw.restart();
    assert_eq!(
        gw.ok(&["peer", "config", "laptop"]).lines().next(),
        Some("[Interface]")
    );
    assert!(
        gw.dev.peer(&other.public).is_ok(),
        "peers survive a restart"
    );
    gw.ok(&["peer", "remove", "laptop"]);
    assert!(gw.dev.peer(&public).is_err(), "removed peer still listed");
    let status = gw.status();
    assert_eq!(status["peers"].as_array().map(Vec::len), Some(1));
    for key in [
        "public_key",
        "listen_port",
        "address",
        "public_endpoint",
        "advertised_routes",
        "accepted_routes",
        "snat",
        "mss_clamp",
        "warnings",
        "peers",
    ] {
        assert!(status.get(key).is_some(), "status --json lacks {key}");
    }
}

/// `--nat-form ip+ip6`, the form for systems without `inet` NAT: the rules
/// go into an `ip` and an `ip6` table, and `status` says so. No table exists
/// before routes are advertised, and none after they are cleared.
#[test]
fn forced_split_nat_form_is_used_and_reported() {
    require_root();
    let gw = Gateway::start_with("cn", &["--nat-form", "ip+ip6"]);
    let ours = |gw: &Gateway| -> Vec<String> {
        let tables = gw.ns.exec(&["nft", "list", "tables"]).expect("nft");
        tables
            .lines()
            .filter(|l| l.contains("vpcgate_"))
            .map(str::to_string)
            .collect()
    };
    assert!(
        ours(&gw).is_empty(),
        "a table before any route: {:?}",
        ours(&gw)
    );
    assert_eq!(gw.status()["snat_form"], serde_json::Value::Null);

    gw.ok(&["advertise-routes", "198.18.64.0/20,fd00:64:40::/64"]);
    let table = format!("vpcgate_{}", gw.dev.name());
    assert_eq!(
        ours(&gw),
        vec![format!("table ip {table}"), format!("table ip6 {table}")]
    );
    assert_eq!(gw.status()["snat_form"], "ip+ip6");
    assert!(gw.ok(&["status"]).contains("snat: on (ip+ip6 nftables)"));
    for family in ["ip", "ip6"] {
        let rules = gw
            .ns
            .exec(&["nft", "list", "table", family, &table])
            .expect("our table");
        assert!(rules.contains("masquerade"), "{rules}");
    }

    gw.ok(&["advertise-routes", "--clear"]);
    assert!(
        ours(&gw).is_empty(),
        "a table after clearing: {:?}",
        ours(&gw)
    );
}
