//! Keys stay secret: with vpcgated logging at `trace`, a generated client,
//! a private key and a preshared key set over the UAPI, requests that quote
//! keys in the wrong places, a handshake, traffic and a reload, no private
//! or preshared key shows up in the log, in `status`, `peer list`,
//! `advertise-routes` or the metrics, in base64 or hex, whole or in part.
//! The one place a key may appear is `peer config` of a generated client,
//! and then only that client's own key.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;
use vpcgate_e2e::{
    gen_keypair, http_get, key_hex, require_root, veth, wait_for_ping, wait_until, Netns, OrDie,
    Vpcgate, VpcgatedConfig, WgDev,
};

/// A window this long of a key's text is treated as a leak: 16 base64
/// characters are 96 bits of the key, 16 hex digits 64 bits.
const WINDOW: usize = 16;

struct Secret {
    what: &'static str,
    forms: Vec<String>,
}

impl Secret {
    fn new(what: &'static str, base64: &str) -> Secret {
        let hex = key_hex(base64).or_die("key");
        Secret {
            what,
            forms: vec![base64.to_string(), hex.clone(), hex.to_uppercase()],
        }
    }

    /// The first window of this secret found in `text`.
    fn leaked_in(&self, text: &str) -> Option<String> {
        self.forms.iter().find_map(|form| {
            let bytes = form.as_bytes();
            bytes.windows(WINDOW).find_map(|w| {
                let w = std::str::from_utf8(w).ok()?;
                text.contains(w).then(|| w.to_string())
            })
        })
    }
}

fn assert_no_secret(secrets: &[Secret], text: &str, place: &str) {
    for s in secrets {
        if let Some(window) = s.leaked_in(text) {
            let at = text.find(&window).unwrap_or(0);
            let from = text[..at]
                .char_indices()
                .rev()
                .nth(80)
                .map_or(0, |(i, _)| i);
            panic!(
                "{place} contains part of the {} ({window}) near: {:?}",
                s.what,
                &text[from..(at + window.len()).min(text.len())]
            );
        }
    }
}

/// One raw UAPI request; returns the reply (up to its blank line).
fn uapi(socket: &Path, request: &str) -> String {
    let mut s = UnixStream::connect(socket).or_die("connect to the UAPI");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .or_die("timeout");
    s.write_all(request.as_bytes()).or_die("send");
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    while !reply.ends_with(b"\n\n") {
        let n = s.read(&mut chunk).or_die("read");
        assert!(n > 0, "UAPI closed after {reply:?}");
        reply.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(reply).or_die("UTF-8")
}

#[test]
fn no_key_reaches_the_log_status_or_metrics() {
    require_root();
    let ns_a = Netns::new("sa").or_die("namespace");
    let ns_b = Netns::new("sb").or_die("namespace");
    veth(&ns_a, &ns_b, &["198.18.0.1/24"], &["198.18.0.2/24"]).or_die("veth");
    let state = ns_a.dir().join("state");
    let mut cfg = VpcgatedConfig::new(51820, "100.64.0.1/24");
    cfg.state_dir = Some(state.clone());
    cfg.log_level = "trace".into();
    cfg.extra_args = vec!["--metrics-listen".into(), "127.0.0.1:9586".into()];
    let mut gw = WgDev::vpcgated(&ns_a, "sa", &cfg).or_die("vpcgated starts");
    let ctl = Vpcgate::for_dev(&gw).or_die("CLI");
    let first_key = gw.show_field("private-key").or_die("read key");

    ctl.run(&["set", "--public-endpoint", "198.18.0.1:51820"])
        .or_die("public endpoint");
    let laptop = ctl.add_client("laptop").or_die("generated client");
    let laptop_key = laptop.interface_one("PrivateKey").or_die("client key");

    // wireguard-go in b; vpcgated gets a new key and a preshared key for it
    // over the UAPI, as `wg set` sends them (hex).
    let client = WgDev::wireguard_go(&ns_b, "sb").or_die("wireguard-go");
    let client_key = gen_keypair().or_die("key");
    client
        .configure(&client_key, 51821, &["100.64.0.2/24"])
        .or_die("configure wireguard-go");
    let node = gen_keypair().or_die("key");
    let psk = ns_a.exec(&["wg", "genpsk"]).or_die("wg genpsk");
    let psk = psk.trim().to_string();
    let (node_hex, psk_hex, client_hex) = (
        key_hex(&node.private).or_die("hex"),
        key_hex(&psk).or_die("hex"),
        key_hex(&client_key.public).or_die("hex"),
    );
    let reply = uapi(
        &gw.uapi_socket(),
        &format!(
            "set=1\nprivate_key={node_hex}\npublic_key={client_hex}\npreshared_key={psk_hex}\n\
             endpoint=198.18.0.2:51821\nallowed_ip=100.64.0.2/32\n\n"
        ),
    );
    assert_eq!(reply, "errno=0\n\n");
    assert_eq!(ctl.status().or_die("status").public_key, node.public);

    // Requests that carry keys where they do not belong: each is refused,
    // and the daemon's account of why (logged at debug) must not quote them.
    for bad in [
        format!("private_key={node_hex}\n\n"),
        format!("set=1\nprivate_key {node_hex}\n\n"),
        format!("set=1\nprivate_key:{node_hex}\n\n"),
        format!("get=1\nprivate_key={node_hex}\n\n"),
        format!("set=1\npreshared_key={psk_hex}\n\n"),
        format!("set=1\npublic_key={client_hex}\npreshared_key={psk_hex}0\n\n"),
        format!("set=1\npublic_key={client_hex}\npreshared_key={psk_hex}\nbogus=1\n\n"),
        format!("set=1\n{psk_hex}={node_hex}\n\n"),
        format!("set=1\npublic_key={client_hex}\n{psk_hex}=1\n\n"),
        format!("set=1\nprivate_key={}\n\n", node.private),
    ] {
        let reply = uapi(&gw.uapi_socket(), &bad);
        assert!(reply.starts_with("errno=-"), "{reply}");
    }

    let psk_file = ns_b.dir().join("psk");
    std::fs::write(&psk_file, format!("{psk}\n")).or_die("write psk");
    client
        .set(&[
            "peer",
            &node.public,
            "preshared-key",
            &psk_file.to_string_lossy(),
            "allowed-ips",
            "100.64.0.1/32",
            "endpoint",
            "198.18.0.1:51820",
        ])
        .or_die("client's peer");
    wait_for_ping(&ns_b, "100.64.0.1", &[], Duration::from_secs(20)).or_die("handshake");
    wait_for_ping(&ns_a, "100.64.0.2", &[], Duration::from_secs(5)).or_die("ping back");
    let peer = gw.peer(&client_key.public).or_die("peer");
    assert_eq!(
        peer.preshared_key.as_deref(),
        Some(psk.as_str()),
        "wg sees the preshared key over the UAPI"
    );

    // A reload and a peer removal log too. The reload is waited for, so that
    // the log checked at the end covers it however slow the machine.
    gw.process().signal(Signal::SIGHUP).or_die("SIGHUP");
    let log_path = gw.process().log_path().to_path_buf();
    wait_until(Duration::from_secs(10), "the reload to be logged", || {
        let log = std::fs::read_to_string(&log_path)?;
        Ok(log.contains("reloaded settings and peers") || log.contains("reload failed"))
    })
    .or_die("reload");
    ctl.run(&[
        "peer",
        "add",
        "spare",
        "--public-key",
        &gen_keypair().or_die("key").public,
    ])
    .or_die("peer add");
    ctl.run(&["peer", "remove", "spare"]).or_die("peer remove");

    let secrets = [
        Secret::new("first node private key", first_key.trim()),
        Secret::new("node private key set over the UAPI", &node.private),
        Secret::new("preshared key", &psk),
        Secret::new("generated client's private key", &laptop_key),
    ];
    let mut outputs = Vec::new();
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["peer", "list"],
        &["peer", "list", "--json"],
        &["advertise-routes", "--json"],
        &["--json", "version"],
    ] {
        let out = ctl.output(args).or_die("run vpcgate");
        assert!(out.status.success(), "{args:?}: {out:?}");
        outputs.push((
            format!("vpcgate {}", args.join(" ")),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ));
    }
    let metrics = http_get(
        &ns_a,
        "127.0.0.1:9586".parse().or_die("address"),
        "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .or_die("metrics");
    assert!(metrics.contains(&client_key.public), "{metrics}");
    outputs.push(("the metrics".into(), metrics));
    for (place, text) in &outputs {
        assert_no_secret(&secrets, text, place);
    }

    // `peer config` is for handing a client its config: its own key only.
    for args in [
        &["peer", "config", "laptop"][..],
        &["--json", "peer", "config", "laptop"],
    ] {
        let config = ctl.run(args).or_die("peer config");
        assert!(
            config.contains(&laptop_key),
            "{args:?} lacks the client's key"
        );
        assert_no_secret(
            &secrets[..3],
            &config,
            &format!("vpcgate {}", args.join(" ")),
        );
    }

    // The log, complete once the daemon has exited, was written at trace.
    gw.process()
        .terminate(Duration::from_secs(10))
        .or_die("vpcgated stops");
    let log = std::fs::read_to_string(gw.process().log_path()).or_die("read the log");
    assert!(
        log.contains(" TRACE "),
        "the log has no trace lines, so the test proves little:\n{log}"
    );
    assert!(log.contains("rejected UAPI request"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_no_secret(&secrets, &log, "the daemon's log");
}
