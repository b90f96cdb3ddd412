//! vpcgated's process contract: what it sets up on start, that its key
//! survives a restart, and that SIGTERM removes the TUN and both sockets.

use std::time::Duration;

use vpcgate_e2e::{public_key_of, require_root, wait_until, Netns, VpcgatedConfig, WgDev};

#[test]
fn starts_configured_and_sigterm_cleans_up() {
    require_root();
    let ns = Netns::new("lc").expect("namespace");
    // WgDev::vpcgated already waits for the TUN to be UP with the address
    // and MTU 1420, and for `wg show` to work.
    let mut dev = WgDev::vpcgated(&ns, "vl", &VpcgatedConfig::new(51820, "100.64.0.1/24"))
        .expect("vpcgated starts");
    let name = dev.name().to_string();
    let uapi = dev.uapi_socket();
    let ctl = dev
        .control_socket()
        .expect("control socket path")
        .to_path_buf();
    wait_until(Duration::from_secs(10), "the control socket", || {
        Ok(ctl.exists())
    })
    .unwrap_or_else(|e| panic!("{}: {e:#}", ctl.display()));

    let dump = dev.dump().expect("wg show dump");
    assert_eq!(dump.listen_port, 51820);
    assert!(dump.peers.is_empty(), "fresh daemon has peers: {dump:?}");
    assert_ne!(
        dump.private_key, "(none)",
        "vpcgated reports no private key"
    );
    assert_eq!(
        public_key_of(&dump.private_key).expect("wg pubkey"),
        dump.public_key,
        "UAPI private_key does not match the public key (is it returning the public key?)"
    );

    let state = dev.state_dir().expect("state dir").to_path_buf();
    let entries = std::fs::read_dir(&state)
        .unwrap_or_else(|e| panic!("state dir {} not created: {e}", state.display()))
        .count();
    assert!(entries > 0, "no key persisted in {}", state.display());

    let status = dev
        .process()
        .terminate(Duration::from_secs(10))
        .expect("vpcgated exits on SIGTERM");
    assert!(status.success(), "vpcgated exited with {status} on SIGTERM");
    assert!(!uapi.exists(), "UAPI socket {} left behind", uapi.display());
    assert!(
        !ctl.exists(),
        "control socket {} left behind",
        ctl.display()
    );
    assert!(
        ns.ip(&["link", "show", "dev", &name]).is_err(),
        "TUN {name} still exists after exit"
    );
    let out = ns.exec_raw(&["wg", "show", &name]).expect("run wg show");
    assert!(!out.status.success(), "`wg show {name}` works after exit");
}

#[test]
fn private_key_persists_across_restart() {
    require_root();
    let ns = Netns::new("rs").expect("namespace");
    let mut cfg = VpcgatedConfig::new(51820, "100.64.0.1/24");
    cfg.state_dir = Some(ns.dir().join("state"));

    let mut first = WgDev::vpcgated(&ns, "vr", &cfg).expect("first start");
    let key1 = first.public_key().expect("public key");
    first
        .process()
        .terminate(Duration::from_secs(10))
        .expect("first instance stops");
    drop(first);

    let second = WgDev::vpcgated(&ns, "vr", &cfg).expect("second start, same state dir");
    let key2 = second.public_key().expect("public key");
    assert_eq!(
        key1, key2,
        "public key changed across a restart with the same state dir"
    );
}
