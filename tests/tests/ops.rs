//! Operating the daemon: live settings, keys, socket access, metrics, the
//! systemd notify protocol, reload, and a SIGKILL restart that stock clients
//! ride through without being reconfigured.

use std::io::Write;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use vpcgate_e2e::{
    require_root, wait_for_ping, Endpoints, Impl, Netns, Pair, PairSpec, Vpcgate, VpcgatedConfig,
    WgDev,
};

fn start(ns: &Netns, tag: &str, cfg: &VpcgatedConfig) -> (WgDev, Vpcgate) {
    let dev = WgDev::vpcgated(ns, tag, cfg).expect("vpcgated starts");
    let ctl = Vpcgate::for_dev(&dev).expect("CLI");
    (dev, ctl)
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn set_changes_port_address_and_mtu_live() {
    require_root();
    let ns = Netns::new("oa").expect("namespace");
    let (dev, ctl) = start(&ns, "oa", &VpcgatedConfig::new(51820, "100.64.0.1/24"));
    let link = |what: &[&str]| {
        let mut args = vec!["-o"];
        args.extend_from_slice(what);
        args.extend_from_slice(&["dev", dev.name()]);
        ns.ip(&args).expect("ip")
    };

    ctl.run(&[
        "set",
        "--listen-port",
        "41000",
        "--address",
        "100.64.9.1/24,fd00:64:9::1/64",
        "--mtu",
        "1380",
    ])
    .expect("set");
    let status = ctl.status().expect("status");
    assert_eq!(status.listen_port, 41000);
    assert_eq!(
        status.json["addresses"],
        serde_json::json!(["100.64.9.1/24", "fd00:64:9::1/64"])
    );
    assert_eq!(status.json["mtu"], 1380);
    let addrs = link(&["addr", "show"]);
    assert!(
        addrs.contains("100.64.9.1/24") && addrs.contains("fd00:64:9::1/64"),
        "{addrs}"
    );
    assert!(
        !addrs.contains("100.64.0.1/24"),
        "old address left: {addrs}"
    );
    assert!(link(&["link", "show"]).contains(" mtu 1380 "));
    assert!(ns.exec(&["ss", "-uln"]).expect("ss").contains(":41000"));
    assert_eq!(
        dev.dump().expect("dump").listen_port,
        41000,
        "wg sees the new port"
    );

    // Dropping the IPv6 address removes it from the interface.
    ctl.run(&["set", "--address", "100.64.9.1/24"])
        .expect("set");
    assert!(!link(&["addr", "show"]).contains("fd00:64:9::1"));

    for (args, expected) in [
        (&["set", "--mtu", "100"][..], "1280 to 65535"),
        (&["set", "--address", "banana"][..], "not an address"),
        (
            &["set", "--address", "100.64.1.1/24,100.64.2.1/24"][..],
            "one IPv4",
        ),
        (
            &["set", "--address", "100.64.9.0/24"][..],
            "network address",
        ),
    ] {
        let out = ctl.output(args).expect("run");
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(
            stderr_of(&out).contains(expected),
            "{args:?}: {}",
            stderr_of(&out)
        );
    }
    let status = ctl.status().expect("status");
    assert_eq!(
        (status.listen_port, status.json["mtu"].as_u64()),
        (41000, Some(1380)),
        "a refused set changed something"
    );
}

#[test]
fn genkey_and_pubkey_agree_with_wg() {
    require_root();
    let ns = Netns::new("ob").expect("namespace");
    let (_dev, ctl) = start(&ns, "ob", &VpcgatedConfig::new(51820, "100.64.0.1/24"));
    let private = ctl.run(&["genkey"]).expect("genkey");
    let ours = ctl
        .run_stdin(&["pubkey"], Some(private.as_bytes()))
        .expect("pubkey");
    let theirs = vpcgate_e2e::public_key_of(private.trim()).expect("wg pubkey");
    assert_eq!(ours.trim(), theirs);
    let out = ctl.output(&["pubkey"]).expect("run");
    assert!(
        !out.status.success(),
        "pubkey with no key on stdin succeeded"
    );
    let version: serde_json::Value =
        serde_json::from_str(&ctl.run(&["--json", "version"]).expect("version")).expect("JSON");
    assert_eq!(version["version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn sockets_refuse_unprivileged_users_and_admit_the_socket_group() {
    require_root();
    let ns = Netns::new("oc").expect("namespace");
    let mut cfg = VpcgatedConfig::new(51820, "100.64.0.1/24");
    // gid 65534 (nogroup) stands in for the package's vpcgate group.
    cfg.extra_args = vec!["--socket-group".into(), "nogroup".into()];
    let (dev, _ctl) = start(&ns, "oc", &cfg);
    let bin = vpcgate_e2e::vpcgate_bin()
        .expect("binary")
        .to_string_lossy()
        .into_owned();
    let socket = dev
        .control_socket()
        .expect("socket")
        .to_string_lossy()
        .into_owned();
    // Walking into the scratch directory needs search permission.
    std::fs::set_permissions(
        ns.dir(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .expect("chmod");
    let as_user = |groups: &str| {
        ns.exec_raw(&[
            "setpriv", "--reuid", "65534", "--regid", "1", "--groups", groups, &bin, "--socket",
            &socket, "status",
        ])
        .expect("run setpriv")
    };
    // Someone with no business here: not root, not in the socket group.
    let stranger_status = || {
        ns.exec_raw(&[
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "1",
            "--clear-groups",
            &bin,
            "--socket",
            &socket,
            "status",
        ])
        .expect("run setpriv")
    };
    let stranger = stranger_status();
    assert!(
        !stranger.status.success(),
        "an unprivileged user read the status"
    );
    let member = as_user("65534");
    assert!(
        member.status.success(),
        "a --socket-group member was refused: {}",
        stderr_of(&member)
    );

    // The UAPI socket carries the private key: `wg` run by anyone else fails.
    let wg_as_nobody = || {
        ns.exec_raw(&[
            "setpriv",
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--groups",
            "65534",
            "wg",
            "show",
            dev.name(),
        ])
        .expect("run setpriv")
    };
    assert!(
        !wg_as_nobody().status.success(),
        "wg show worked for an unprivileged user"
    );

    // With the file modes loosened by hand, the daemon's own credential
    // check still refuses strangers on both sockets.
    let loosen = |path: &std::path::Path| {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .expect("chmod")
    };
    loosen(&dev.uapi_socket());
    loosen(dev.control_socket().expect("socket"));
    let out = wg_as_nobody();
    assert!(
        !out.status.success() || !String::from_utf8_lossy(&out.stdout).contains("private key"),
        "UAPI answered: {out:?}"
    );
    let stranger = stranger_status();
    assert!(
        !stranger.status.success(),
        "the credential check let a stranger in"
    );
    assert!(dev.dump().is_ok(), "root still manages the daemon");
    std::fs::set_permissions(
        dev.control_socket().expect("socket"),
        std::os::unix::fs::PermissionsExt::from_mode(0o660),
    )
    .expect("chmod");
    let meta = std::fs::metadata(dev.control_socket().expect("socket")).expect("stat");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777,
        0o660
    );
}

#[test]
fn metrics_expose_peers_drops_and_routes() {
    require_root();
    let ns = Netns::new("od").expect("namespace");
    ns.ip(&["link", "set", "lo", "up"]).expect("lo up");
    let mut cfg = VpcgatedConfig::new(51820, "100.64.0.1/24");
    cfg.extra_args = vec!["--metrics-listen".into(), "127.0.0.1:9586".into()];
    let (dev, ctl) = start(&ns, "od", &cfg);
    let peer = vpcgate_e2e::gen_keypair().expect("key");
    dev.set_peer(&peer.public, &["100.64.0.2/32"], None)
        .expect("peer");
    ctl.advertise(&["198.18.64.0/20"]).expect("advertise");
    // A packet to nowhere, to move a drop counter.
    let _ = ns.exec_raw(&["ping", "-c", "1", "-W", "1", "100.64.0.77"]);

    let fetch = |request: &str| {
        vpcgate_e2e::http_get(&ns, "127.0.0.1:9586".parse().expect("address"), request)
            .expect("metrics answer")
    };
    let no_route = |text: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix("vpcgate_dropped_packets_total{reason=\"no_route\"} "))
            .and_then(|n| n.parse().ok())
    };
    let mut text = String::new();
    vpcgate_e2e::wait_until(
        Duration::from_secs(10),
        "the ping to nowhere to be counted as no_route",
        || {
            text = fetch("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
            Ok(no_route(&text).is_some_and(|n| n >= 1))
        },
    )
    .unwrap_or_else(|e| panic!("{e:#}:\n{text}"));
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for needle in [
        format!(
            "vpcgate_peer_receive_bytes_total{{public_key=\"{}\",name=\"\"}} 0",
            peer.public
        ),
        "vpcgate_advertised_routes 1".to_string(),
        "vpcgate_accepted_routes 0".to_string(),
        "vpcgate_peers 1".to_string(),
    ] {
        assert!(text.contains(&needle), "missing {needle:?} in:\n{text}");
    }
    assert!(fetch("GET /secret HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
    assert!(fetch("garbage\r\n\r\n").starts_with("HTTP/1.1 404"));
}

#[test]
fn systemd_notify_ready_then_watchdog_and_reload() {
    require_root();
    let ns = Netns::new("oe").expect("namespace");
    let notify_path = ns.dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut cfg = VpcgatedConfig::new(51820, "100.64.0.1/24");
    cfg.state_dir = Some(ns.dir().join("state"));
    cfg.env = vec![
        (
            "NOTIFY_SOCKET".into(),
            notify_path.to_string_lossy().into_owned(),
        ),
        ("WATCHDOG_USEC".into(), "1000000".into()),
    ];
    let (mut dev, ctl) = start(&ns, "oe", &cfg);
    let mut buf = [0u8; 512];
    let mut next = || {
        let n = notify.recv(&mut buf).expect("a notify message");
        String::from_utf8_lossy(&buf[..n]).trim_end().to_string()
    };
    assert_eq!(next(), "READY=1");
    assert_eq!(
        next(),
        "WATCHDOG=1",
        "the watchdog is fed while the data path runs"
    );
    // The messages up to the READY=1 that ends a reload, WATCHDOG=1 left
    // out: the daemon sends READY=1 again after every reload, failed or not.
    let mut through_reload = || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut saw = Vec::new();
        while !saw.iter().any(|m: &String| m.starts_with("READY=1")) && Instant::now() < deadline {
            let m = next();
            if !m.starts_with("WATCHDOG") {
                saw.push(m);
            }
        }
        saw
    };

    // Reload: a peer added to peers.json by hand appears; the file's other
    // contents are applied; nothing is dropped.
    let keep = vpcgate_e2e::gen_keypair().expect("key");
    dev.set_peer(&keep.public, &["100.64.0.2/32"], None)
        .expect("peer");
    let path = ns.dir().join("state").join("peers.json");
    let mut peers: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("JSON");
    let added = vpcgate_e2e::gen_keypair().expect("key");
    // State format 2: {"format": 2, "peers": [...]}.
    assert_eq!(peers["format"], 2, "{peers}");
    peers["peers"]
        .as_array_mut()
        .expect("list")
        .push(serde_json::json!({
            "name": "by-hand", "public_key": added.public, "allowed_ips": ["100.64.0.3/32"]
        }));
    std::fs::write(&path, serde_json::to_string(&peers).expect("JSON")).expect("write");
    dev.process()
        .signal(nix::sys::signal::Signal::SIGHUP)
        .expect("SIGHUP");
    let saw = through_reload();
    assert!(
        saw.first().is_some_and(|m| m.starts_with("RELOADING=1"))
            && saw.last().is_some_and(|m| m.starts_with("READY=1")),
        "{saw:?}"
    );
    assert!(
        dev.peer(&added.public).is_ok(),
        "the hand-added peer was not loaded"
    );
    assert!(dev.peer(&keep.public).is_ok(), "an existing peer was lost");
    let status = ctl.status().expect("status");
    assert!(status.peer_named("by-hand").is_some());

    // A corrupt file on reload is refused; the daemon keeps running as it was.
    std::fs::write(&path, "{").expect("write");
    dev.process()
        .signal(nix::sys::signal::Signal::SIGHUP)
        .expect("SIGHUP");
    let saw = through_reload();
    assert!(
        saw.first().is_some_and(|m| m.starts_with("RELOADING=1"))
            && saw.last().is_some_and(|m| m.starts_with("READY=1")),
        "the bad reload was not handled: {saw:?}"
    );
    dev.check_running()
        .expect("still running after a bad reload");
    assert!(dev.peer(&added.public).is_ok());

    dev.process()
        .terminate(Duration::from_secs(10))
        .expect("stops");
    let last = std::iter::from_fn(|| {
        notify
            .recv(&mut buf)
            .ok()
            .map(|n| String::from_utf8_lossy(&buf[..n]).trim_end().to_string())
    })
    .find(|m| !m.starts_with("WATCHDOG") && !m.starts_with("READY") && !m.starts_with("RELOADING"));
    assert_eq!(last.as_deref(), Some("STOPPING=1"));
}

#[test]
fn sigkill_restart_keeps_key_peers_and_routes_and_clients_reconnect() {
    require_root();
    // vpcgated in a, a stock wireguard-go client in b that knows a's endpoint.
    let mut spec = PairSpec::new(Impl::Vpcgated, Impl::WireguardGo);
    spec.endpoints = Endpoints::BOnly;
    let mut pair = Pair::new(spec).expect("pair");
    wait_for_ping(&pair.b.ns, &pair.a.t4(), &[], Duration::from_secs(20)).expect("tunnel up");
    let ctl = Vpcgate::for_dev(&pair.a.dev).expect("CLI");
    ctl.advertise(&["198.18.64.0/20"]).expect("advertise");
    let before = ctl.status().expect("status");

    let state = pair.a.dev.state_dir().expect("state").to_path_buf();
    let name = pair.a.dev.name().to_string();
    pair.a
        .dev
        .process()
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("SIGKILL");
    let _ = pair.a.dev.process().wait_timeout(Duration::from_secs(10));
    let _ = std::fs::remove_file(pair.a.dev.uapi_socket());

    // Same state dir, same interface name, nothing else configured by hand.
    let mut cfg = VpcgatedConfig::new(pair.a.port, "100.64.0.1/24");
    cfg.state_dir = Some(state);
    let bin = vpcgate_e2e::vpcgated_bin()
        .expect("binary")
        .to_string_lossy()
        .into_owned();
    let socket = pair
        .a
        .ns
        .dir()
        .join("restarted.ctl")
        .to_string_lossy()
        .into_owned();
    let state_s = cfg
        .state_dir
        .as_ref()
        .expect("state")
        .to_string_lossy()
        .into_owned();
    let _restarted = pair
        .a
        .ns
        .spawn(
            "restarted",
            &[
                &bin,
                "--interface",
                &name,
                "--state-dir",
                &state_s,
                "--socket",
                &socket,
            ],
            &[],
        )
        .expect("restart");
    vpcgate_e2e::wait_until(
        Duration::from_secs(10),
        "the restarted daemon's UAPI",
        || {
            Ok(pair
                .a
                .ns
                .exec_raw(&["wg", "show", &name])
                .is_ok_and(|o| o.status.success()))
        },
    )
    .expect("restarted");
    let after_key = pair
        .a
        .ns
        .exec(&["wg", "show", &name, "public-key"])
        .expect("key");
    assert_eq!(
        after_key.trim(),
        before.public_key,
        "the private key changed across SIGKILL"
    );
    let peers = pair
        .a
        .ns
        .exec(&["wg", "show", &name, "allowed-ips"])
        .expect("peers");
    assert!(
        peers.contains(&pair.b.public_key) && peers.contains("100.64.0.2/32"),
        "{peers}"
    );
    let routes = pair
        .a
        .ns
        .exec(&[
            &vpcgate_e2e::vpcgate_bin().expect("bin").to_string_lossy(),
            "--socket",
            &socket,
            "advertise-routes",
        ])
        .expect("routes");
    assert_eq!(routes, "198.18.64.0/20\n");
    // The stock client was not touched: its next packets handshake again.
    // wireguard-go starts that handshake once data has gone unanswered for
    // KEEPALIVE_TIMEOUT + REKEY_TIMEOUT (15 s), hence the 30 s.
    wait_for_ping(&pair.b.ns, &pair.a.t4(), &[], Duration::from_secs(30))
        .expect("client reconnects unchanged");
}

#[test]
fn corrupt_state_files_stop_the_start_and_are_named() {
    require_root();
    let ns = Netns::new("of").expect("namespace");
    let state = ns.dir().join("state");
    let mut cfg = VpcgatedConfig::new(51820, "100.64.0.1/24");
    cfg.state_dir = Some(state.clone());
    let (mut dev, _ctl) = start(&ns, "of", &cfg);
    let key = std::fs::read_to_string(state.join("private.key")).expect("key");
    dev.process()
        .terminate(Duration::from_secs(10))
        .expect("stops");
    let name = dev.name().to_string();
    drop(dev);

    let bin = vpcgate_e2e::vpcgated_bin()
        .expect("binary")
        .to_string_lossy()
        .into_owned();
    let state_s = state.to_string_lossy().into_owned();
    let socket = ns.dir().join("x.ctl").to_string_lossy().into_owned();
    for (file, contents) in [
        ("private.key", ""),
        ("settings.json", "{\"addresses\": ["),
        ("peers.json", ""),
    ] {
        let path = state.join(file);
        let good = std::fs::read(&path).ok();
        std::fs::write(&path, contents).expect("corrupt");
        let out = ns
            .exec_raw(&[
                &bin,
                "--interface",
                &name,
                "--state-dir",
                &state_s,
                "--socket",
                &socket,
            ])
            .expect("run vpcgated");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with a corrupt {file}");
        assert!(
            err.contains(file) && err.contains("corrupt"),
            "{file}: {err}"
        );
        assert!(
            ns.ip(&["link", "show", "dev", &name]).is_err(),
            "a TUN was created despite a corrupt {file}"
        );
        match good {
            Some(good) => std::fs::write(&path, good).expect("restore"),
            None => std::fs::remove_file(&path).expect("remove"),
        }
    }
    assert_eq!(
        std::fs::read_to_string(state.join("private.key")).expect("key"),
        key,
        "the key was regenerated"
    );
}

#[test]
fn malformed_and_oversized_control_requests_get_errors_and_service_goes_on() {
    require_root();
    let ns = Netns::new("og").expect("namespace");
    let (dev, ctl) = start(&ns, "og", &VpcgatedConfig::new(51820, "100.64.0.1/24"));
    let path = dev.control_socket().expect("socket").to_path_buf();
    let exchange = |frame: &[u8]| -> Option<vpcgate_proto::Response> {
        let mut s = std::os::unix::net::UnixStream::connect(&path).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(frame).expect("send");
        vpcgate_proto::read_frame(&mut s).ok()
    };
    let frame = |body: &[u8]| {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(body);
        f
    };
    for bad in [
        frame(b"not json"),
        frame(br#"{"request":"reboot"}"#),
        frame(br#"{"request":"advertise_routes","routes":"oops"}"#),
        ((vpcgate_proto::MAX_FRAME + 1) as u32)
            .to_be_bytes()
            .to_vec(),
        u32::MAX.to_be_bytes().to_vec(),
    ] {
        match exchange(&bad) {
            Some(vpcgate_proto::Response::Error { message }) => assert!(!message.is_empty()),
            other => panic!("{:?} got {other:?}", String::from_utf8_lossy(&bad)),
        }
    }
    // A client that sends half a frame and stalls does not block others.
    let mut stalled = std::os::unix::net::UnixStream::connect(&path).expect("connect");
    stalled
        .write_all(&frame(b"{\"request\"")[..8])
        .expect("send");
    assert!(ctl.status().is_ok(), "the daemon stopped serving");
}

#[test]
fn learned_routes_come_back_after_a_restart_while_the_gateway_is_away() {
    require_root();
    let gw_ns = Netns::new("ohg").expect("namespace");
    let cl_ns = Netns::new("ohc").expect("namespace");
    vpcgate_e2e::veth(&gw_ns, &cl_ns, &["198.18.0.1/24"], &["198.18.0.2/24"]).expect("veth");
    let (mut gw, gctl) = start(&gw_ns, "ohg", &VpcgatedConfig::new(51820, "100.64.0.1/24"));
    let mut ccfg = VpcgatedConfig::new(51821, "100.64.0.2/24");
    ccfg.state_dir = Some(cl_ns.dir().join("state"));
    let (mut cl, cctl) = start(&cl_ns, "ohc", &ccfg);
    let (gw_pub, cl_pub) = (gw.public_key().expect("key"), cl.public_key().expect("key"));
    gctl.advertise(&["198.18.64.0/20"]).expect("advertise");
    gctl.run(&[
        "peer",
        "add",
        "laptop",
        "--public-key",
        &cl_pub,
        "--allowed-ips",
        "100.64.0.2/32",
    ])
    .expect("gateway knows the laptop");
    cctl.run(&[
        "peer",
        "add",
        "gateway",
        "--public-key",
        &gw_pub,
        "--endpoint",
        "198.18.0.1:51820",
        "--allowed-ips",
        "100.64.0.1/32",
        "--accept-routes",
    ])
    .expect("laptop trusts the gateway");
    let has_route = |ns: &Netns, dev: &str| {
        ns.ip(&["route", "show", "198.18.64.0/20"])
            .is_ok_and(|r| r.contains(&format!("dev {dev}")))
    };
    vpcgate_e2e::wait_until(
        Duration::from_secs(20),
        "the laptop to learn 198.18.64.0/20",
        || Ok(has_route(&cl_ns, cl.name())),
    )
    .expect("learned");

    gw.process()
        .terminate(Duration::from_secs(10))
        .expect("gateway stops");
    cl.process()
        .terminate(Duration::from_secs(10))
        .expect("laptop stops");
    drop(cl);
    let (cl, cctl) = start(&cl_ns, "ohc", &ccfg);
    assert!(
        has_route(&cl_ns, cl.name()),
        "the learned route was not restored at start"
    );
    let status = cctl.status().expect("status");
    assert_eq!(status.accepted_routes, ["198.18.64.0/20"]);
}
