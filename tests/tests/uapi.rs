//! The WireGuard UAPI contract: stock `wg` (set, setconf, syncconf,
//! showconf) and raw requests on the socket behave as they do against
//! wireguard-go; rejected requests answer an errno and change nothing; the
//! socket is root-only; stale sockets are replaced and live ones respected.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use vpcgate_e2e::{gen_keypair, require_root, Netns, VpcgatedConfig, WgDev};

fn start(ns: &Netns, tag: &str) -> WgDev {
    WgDev::vpcgated(ns, tag, &VpcgatedConfig::new(51820, "100.64.0.1/24")).expect("vpcgated starts")
}

/// Sends raw UAPI text and reads replies until `replies` blank-line-terminated
/// answers have arrived.
fn raw(socket: &Path, request: &[u8], replies: usize) -> String {
    let mut stream = UnixStream::connect(socket).expect("connect to the UAPI socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request).expect("send request");
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    while reply.windows(2).filter(|w| w == b"\n\n").count() < replies {
        let n = stream.read(&mut chunk).expect("read reply");
        assert!(
            n > 0,
            "socket closed after {:?}",
            String::from_utf8_lossy(&reply)
        );
        reply.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(reply).expect("UTF-8 reply")
}

#[test]
fn wg_set_remove_and_allowed_ip_ownership() {
    require_root();
    let ns = Netns::new("ua").expect("namespace");
    let dev = start(&ns, "ua");
    let (p1, p2) = (gen_keypair().expect("key"), gen_keypair().expect("key"));

    dev.set(&[
        "peer",
        &p1.public,
        "allowed-ips",
        "100.64.0.2/32,100.64.9.0/24",
        "endpoint",
        "198.18.0.9:51820",
        "persistent-keepalive",
        "25",
    ])
    .expect("add peer 1");
    let peer = dev.peer(&p1.public).expect("peer 1 listed");
    assert_eq!(peer.allowed_ips, ["100.64.0.2/32", "100.64.9.0/24"]);
    assert_eq!(
        peer.endpoint.map(|e| e.to_string()).as_deref(),
        Some("198.18.0.9:51820")
    );
    assert_eq!(peer.persistent_keepalive, Some(25));

    // `allowed-ips` replaces the set (replace_allowed_ips=true).
    dev.set(&["peer", &p1.public, "allowed-ips", "100.64.0.2/32"])
        .expect("replace");
    assert_eq!(
        dev.peer(&p1.public).expect("peer 1").allowed_ips,
        ["100.64.0.2/32"]
    );

    // A prefix has one owner: giving it to peer 2 takes it from peer 1.
    dev.set(&[
        "peer",
        &p2.public,
        "allowed-ips",
        "100.64.0.2/32,fd00:64::2/128",
    ])
    .expect("add peer 2");
    assert!(dev.peer(&p1.public).expect("peer 1").allowed_ips.is_empty());
    assert_eq!(
        dev.peer(&p2.public).expect("peer 2").allowed_ips,
        ["100.64.0.2/32", "fd00:64::2/128"]
    );

    dev.set(&["peer", &p1.public, "remove"])
        .expect("remove peer 1");
    let dump = dev.dump().expect("dump");
    assert!(dump.peer(&p1.public).is_none(), "peer 1 still listed");
    assert!(dump.peer(&p2.public).is_some(), "peer 2 was lost");
}

#[test]
fn setconf_replaces_peers_and_syncconf_round_trips_showconf() {
    require_root();
    let ns = Netns::new("ub").expect("namespace");
    let dev = start(&ns, "ub");
    let keys: Vec<_> = (0..3).map(|_| gen_keypair().expect("key")).collect();
    for (i, k) in keys.iter().enumerate() {
        dev.set(&[
            "peer",
            &k.public,
            "allowed-ips",
            &format!("100.64.0.{}/32", i + 2),
        ])
        .expect("add");
    }
    let own = dev.dump().expect("dump");

    // showconf -> syncconf of the same text changes nothing.
    let conf = dev.wg(&["showconf", dev.name()]).expect("showconf");
    assert!(
        conf.contains("PrivateKey = "),
        "showconf lacks the private key:\n{conf}"
    );
    let path = ns.dir().join("sync.conf");
    std::fs::write(&path, &conf).expect("write conf");
    dev.wg(&["syncconf", dev.name(), &path.to_string_lossy()])
        .expect("syncconf");
    let after = dev.dump().expect("dump");
    assert_eq!(after.private_key, own.private_key);
    assert_eq!(after.peers.len(), 3);

    // syncconf with one peer removed removes exactly that peer.
    let fewer: String = conf
        .split("\n[Peer]")
        .filter(|section| !section.contains(&keys[1].public))
        .collect::<Vec<_>>()
        .join("\n[Peer]");
    std::fs::write(&path, &fewer).expect("write conf");
    dev.wg(&["syncconf", dev.name(), &path.to_string_lossy()])
        .expect("syncconf");
    let after = dev.dump().expect("dump");
    assert_eq!(after.peers.len(), 2, "{after:?}");
    assert!(after.peer(&keys[1].public).is_none());

    // setconf sends replace_peers: only the file's peers remain.
    let only = format!(
        "[Peer]\nPublicKey = {}\nAllowedIPs = 100.64.0.7/32\n",
        keys[2].public
    );
    std::fs::write(&path, &only).expect("write conf");
    dev.wg(&["setconf", dev.name(), &path.to_string_lossy()])
        .expect("setconf");
    let after = dev.dump().expect("dump");
    assert_eq!(after.peers.len(), 1, "{after:?}");
    assert_eq!(after.peers[0].allowed_ips, ["100.64.0.7/32"]);
}

#[test]
fn raw_requests_errno_and_update_only() {
    require_root();
    let ns = Netns::new("uc").expect("namespace");
    let dev = start(&ns, "uc");
    let sock = dev.uapi_socket();
    let peer = gen_keypair().expect("key");
    let peer_hex = vpcgate_e2e::key_hex(&peer.public).expect("hex");
    assert_eq!(peer_hex.len(), 64);

    // update_only never creates a peer.
    let req =
        format!("set=1\npublic_key={peer_hex}\nupdate_only=true\nallowed_ip=100.64.0.2/32\n\n");
    assert_eq!(raw(&sock, req.as_bytes(), 1), "errno=0\n\n");
    assert!(dev.dump().expect("dump").peers.is_empty());

    let before = raw(&sock, b"get=1\n\n", 1);
    assert!(before.starts_with("private_key="), "{before}");
    assert!(before.ends_with("errno=0\n\n"), "{before}");

    // Each bad request is refused with a negative errno (as wireguard-go
    // sends it), and a valid peer line earlier in it is not applied.
    let bad = [
        format!("set=1\npublic_key={peer_hex}\nallowed_ip=100.64.0.2/32\nbogus_key=1\n\n"),
        format!("set=1\npublic_key={peer_hex}\nallowed_ip=100.64.0.2\n\n"),
        format!("set=1\npublic_key={peer_hex}\nprotocol_version=2\n\n"),
        format!("set=1\npublic_key={peer_hex}\nendpoint=not-an-address\n\n"),
        "set=1\nlisten_port=70000\n\n".to_string(),
        "set=1\nprivate_key=abcd\n\n".to_string(),
        "bogus=1\n\n".to_string(),
        format!(
            "set=1\npublic_key={peer_hex}\nallowed_ip={}\n\n",
            "1".repeat(5000)
        ),
    ];
    for req in &bad {
        let reply = raw(&sock, req.as_bytes(), 1);
        assert!(
            reply.starts_with("errno=-") && reply.ends_with("\n\n"),
            "request {req:.80?} got {reply:?}"
        );
        assert_ne!(reply, "errno=0\n\n");
    }
    assert_eq!(
        raw(&sock, b"get=1\n\n", 1),
        before,
        "a rejected request changed state"
    );

    // One connection carries several requests; an error does not end it.
    let mixed = format!("get=1\n\nset=1\nnope=1\n\nset=1\npublic_key={peer_hex}\nallowed_ip=100.64.0.3/32\n\nget=1\n\n");
    let replies = raw(&sock, mixed.as_bytes(), 4);
    let parts: Vec<&str> = replies.split_inclusive("\n\n").collect();
    assert_eq!(parts.len(), 4, "{replies:?}");
    assert!(parts[1].starts_with("errno=-"));
    assert_eq!(parts[2], "errno=0\n\n");
    assert!(
        parts[3].contains(&format!("public_key={peer_hex}")),
        "{}",
        parts[3]
    );
    assert!(parts[3].contains("allowed_ip=100.64.0.3/32"));
    assert!(
        parts[3].contains("last_handshake_time_sec=0\n"),
        "never handshaken must be 0"
    );

    // Garbage bytes do not take the daemon down.
    let _ =
        UnixStream::connect(&sock).and_then(|mut s| s.write_all(&[0xff, 0, 0x80, b'\n', b'\n']));
    assert!(dev.dump().is_ok(), "daemon stopped answering after garbage");
}

#[test]
fn socket_is_root_only_and_a_live_socket_is_never_taken() {
    require_root();
    let ns = Netns::new("ud").expect("namespace");
    let mut dev = start(&ns, "ud");
    let meta = std::fs::metadata(dev.uapi_socket()).expect("stat UAPI socket");
    assert_eq!(meta.uid(), 0);
    assert_eq!(
        meta.permissions().mode() & 0o077,
        0,
        "UAPI socket mode {:o}",
        meta.mode()
    );
    let ctl = dev.control_socket().expect("control socket").to_path_buf();
    let meta = std::fs::metadata(&ctl).expect("stat control socket");
    assert_eq!(
        meta.permissions().mode() & 0o077,
        0,
        "control socket mode {:o}",
        meta.mode()
    );

    // A second daemon on the same interface name must refuse, and leave the
    // first one serving.
    let bin = vpcgate_e2e::vpcgated_bin().expect("binary");
    let state = ns.dir().join("second-state");
    let out = ns
        .exec_raw(&[
            &bin.to_string_lossy(),
            "--interface",
            dev.name(),
            "--state-dir",
            &state.to_string_lossy(),
            "--socket",
            &ns.dir().join("second.ctl").to_string_lossy(),
            "--listen-port",
            "0",
        ])
        .expect("run a second vpcgated");
    assert!(
        !out.status.success(),
        "a second daemon took over a live interface"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use"), "{err}");
    assert!(dev.dump().is_ok(), "the first daemon stopped serving");
    dev.check_running().expect("first daemon still running");
}

#[test]
fn a_stale_socket_is_replaced() {
    require_root();
    let ns = Netns::new("ue").expect("namespace");
    let name = vpcgate_e2e::unique_ifname("ue");
    let path = Path::new(vpcgate_e2e::UAPI_DIR).join(format!("{name}.sock"));
    std::fs::create_dir_all(vpcgate_e2e::UAPI_DIR).expect("uapi dir");
    // A socket file nobody listens on, as a crash leaves behind.
    drop(UnixListener::bind(&path).expect("bind stale socket"));
    assert!(path.exists());

    let bin = vpcgate_e2e::vpcgated_bin().expect("binary");
    let mut proc = ns
        .spawn(
            "stale",
            &[
                &bin.to_string_lossy(),
                "--interface",
                &name,
                "--state-dir",
                &ns.dir().join("st").to_string_lossy(),
                "--socket",
                &ns.dir().join("st.ctl").to_string_lossy(),
                "--listen-port",
                "0",
            ],
            &[],
        )
        .expect("spawn");
    vpcgate_e2e::wait_until(
        Duration::from_secs(10),
        "the daemon to serve the replaced socket",
        || {
            proc.check_running()?;
            Ok(ns
                .exec_raw(&["wg", "show", &name])
                .is_ok_and(|o| o.status.success()))
        },
    )
    .expect("daemon replaced the stale socket");
    proc.terminate(Duration::from_secs(10)).expect("stops");
    assert!(!path.exists(), "socket left behind");
}

#[test]
fn listen_port_and_private_key_changes_apply_and_persist() {
    require_root();
    let ns = Netns::new("uf").expect("namespace");
    let mut cfg = VpcgatedConfig::new(0, "100.64.0.1/24");
    cfg.state_dir = Some(ns.dir().join("state"));
    let mut dev = WgDev::vpcgated(&ns, "uf", &cfg).expect("start");
    let picked = dev.dump().expect("dump").listen_port;
    assert_ne!(picked, 0, "port 0 must pick a real port");

    dev.set(&["listen-port", "41641"]).expect("change port");
    assert_eq!(dev.dump().expect("dump").listen_port, 41641);
    let ss = ns.exec(&["ss", "-uln"]).expect("ss");
    assert!(ss.contains(":41641"), "nothing bound on 41641:\n{ss}");
    assert!(
        !ss.contains(&format!(":{picked} ")),
        "old port {picked} still bound:\n{ss}"
    );

    // A port that is taken is refused, and the old one stays. The socket is
    // created by a thread inside the namespace; it stays bound there.
    let holder = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns.enter_current_thread().expect("enter namespace");
                std::net::UdpSocket::bind("0.0.0.0:41700").expect("hold port 41700")
            })
            .join()
            .expect("holder thread")
    });
    assert!(
        dev.set(&["listen-port", "41700"]).is_err(),
        "binding a taken port succeeded"
    );
    assert_eq!(dev.dump().expect("dump").listen_port, 41641);
    drop(holder);

    let key = gen_keypair().expect("key");
    let key_file = ns.dir().join("new.key");
    key.write_private(&key_file).expect("write key");
    dev.set(&["private-key", &key_file.to_string_lossy()])
        .expect("change key");
    assert_eq!(dev.public_key().expect("public key"), key.public);

    dev.process()
        .terminate(Duration::from_secs(10))
        .expect("stop");
    drop(dev);
    let mut cfg = cfg.clone();
    cfg.listen_port = 41641;
    let dev = WgDev::vpcgated(&ns, "uf", &cfg).expect("restart");
    assert_eq!(
        dev.public_key().expect("public key"),
        key.public,
        "the new key was not persisted"
    );
}
