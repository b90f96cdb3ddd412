//! Who can touch the daemon and its state. `ops.rs` shows an unprivileged
//! user cannot read through either socket and a `--socket-group` member
//! can use only the control socket; this adds that such users cannot
//! change anything either, with the socket modes as created and loosened by
//! hand; that the state directory and its files are private whatever the
//! umask and the directory's mode before; and that no descriptor of the
//! daemon leaks into the programs it runs.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use vpcgate_e2e::{
    gen_keypair, require_root, unique_ifname, vpcgate_bin, vpcgated_bin, wait_until, Netns, OrDie,
    Vpcgate, VpcgatedConfig, WgDev, UAPI_DIR,
};

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {:o} {}: {e}", mode, path.display()));
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Who runs a command: a stranger (uid 65534 with gid 1 and no other
/// group), or a member of the socket group (gid 65534, nogroup).
#[derive(Clone, Copy, Debug)]
enum User {
    Stranger,
    GroupMember,
}

fn run_as(ns: &Netns, user: User, argv: &[&str]) -> Output {
    let mut full = vec!["setpriv", "--reuid", "65534"];
    full.extend(match user {
        User::Stranger => ["--regid", "1", "--clear-groups"].as_slice(),
        User::GroupMember => ["--regid", "65534", "--groups", "65534"].as_slice(),
    });
    full.extend_from_slice(argv);
    ns.exec_raw(&full).or_die("run setpriv")
}

#[test]
fn unprivileged_users_can_change_nothing_through_either_socket() {
    require_root();
    let ns = Netns::new("ac").or_die("namespace");
    let mut cfg = VpcgatedConfig::new(51820, "100.64.0.1/24");
    // gid 65534 (nogroup) stands in for the package's vpcgate group.
    cfg.extra_args = vec!["--socket-group".into(), "nogroup".into()];
    let dev = WgDev::vpcgated(&ns, "ac", &cfg).or_die("vpcgated starts");
    let ctl = Vpcgate::for_dev(&dev).or_die("CLI");
    ctl.run(&["set", "--public-endpoint", "198.18.2.10:51820"])
        .or_die("public endpoint");
    ctl.run(&["peer", "add", "laptop"]).or_die("generated peer");
    // Walking into the scratch directory needs search permission.
    chmod(ns.dir(), 0o711);
    let snapshot = || {
        (
            ctl.run(&["status", "--json"]).or_die("status"),
            dev.wg(&["show", dev.name(), "dump"]).or_die("dump"),
        )
    };
    let before = snapshot();

    let bin = vpcgate_bin()
        .or_die("binary")
        .to_string_lossy()
        .into_owned();
    let socket = dev
        .control_socket()
        .expect("socket")
        .to_string_lossy()
        .into_owned();
    let key = gen_keypair().or_die("key");
    let key_file = ns.dir().join("key");
    key.write_private(&key_file).or_die("write key");
    chmod(&key_file, 0o644);
    let key_file = key_file.to_string_lossy().into_owned();
    let changes: Vec<Vec<&str>> = vec![
        vec!["advertise-routes", "198.18.64.0/20"],
        vec!["advertise-routes", "--clear"],
        vec!["set", "--snat", "off"],
        vec!["set", "--listen-port", "41000"],
        vec!["peer", "add", "intruder", "--public-key", &key.public],
        vec!["peer", "remove", "laptop"],
        vec!["peer", "config", "laptop"],
        vec!["status"],
    ];
    let wg_changes: Vec<Vec<&str>> = vec![
        vec!["wg", "set", dev.name(), "listen-port", "41000"],
        vec!["wg", "set", dev.name(), "private-key", &key_file],
        vec![
            "wg",
            "set",
            dev.name(),
            "peer",
            &key.public,
            "allowed-ips",
            "100.64.0.77/32",
        ],
        vec!["wg", "show", dev.name(), "private-key"],
    ];

    let mut tried = 0;
    for loosened in [false, true] {
        if loosened {
            // Past the file mode, the daemon's own credential check must hold.
            chmod(&dev.uapi_socket(), 0o666);
            chmod(dev.control_socket().expect("socket"), 0o666);
        }
        for args in &changes {
            let mut argv = vec![bin.as_str(), "--socket", socket.as_str()];
            argv.extend_from_slice(args);
            let out = run_as(&ns, User::Stranger, &argv);
            assert!(
                !out.status.success(),
                "a stranger ran vpcgate {args:?} (modes loosened: {loosened}): {out:?}"
            );
            assert!(out.stdout.is_empty(), "{args:?} printed {out:?}");
            tried += 1;
        }
        for argv in &wg_changes {
            // A stranger, and a member of the socket group: the UAPI hands
            // out the private key, so the group never gets it.
            for user in [User::Stranger, User::GroupMember] {
                let out = run_as(&ns, user, argv);
                assert!(
                    !out.status.success(),
                    "{argv:?} worked for {user:?} (modes loosened: {loosened}): {out:?}"
                );
                assert!(
                    !String::from_utf8_lossy(&out.stdout).contains('='),
                    "{argv:?} printed {out:?}"
                );
                tried += 1;
            }
        }
        assert_eq!(snapshot(), before, "refused users changed the state");
    }
    eprintln!("{tried} attempts refused");
}

#[test]
fn state_is_private_whatever_the_umask_and_the_directory_was() {
    require_root();
    let ns = Netns::new("ap").or_die("namespace");
    let state = ns.dir().join("state");
    std::fs::create_dir(&state).or_die("mkdir");
    chmod(&state, 0o777);
    chmod(ns.dir(), 0o755);
    let name = unique_ifname("ap");
    let socket = ns.dir().join("ap.ctl");
    let daemon = vpcgated_bin()
        .or_die("binary")
        .to_string_lossy()
        .into_owned();
    // Started with a umask that would make every file world-writable.
    let command = format!(
        "umask 000 && exec {daemon} --interface {name} --state-dir {} --socket {}",
        state.display(),
        socket.display()
    );
    let mut proc = ns
        .spawn("vpcgated-loose", &["sh", "-c", &command], &[])
        .or_die("spawn");
    wait_until(Duration::from_secs(20), "the daemon to serve", || {
        proc.check_running()?;
        Ok(ns.exec_raw(&["wg", "show", &name])?.status.success())
    })
    .or_die("ready");
    let ctl = vpcgate_bin()
        .or_die("binary")
        .to_string_lossy()
        .into_owned();
    let socket_s = socket.to_string_lossy().into_owned();
    for args in [
        &["set", "--public-endpoint", "198.18.2.10:51820"][..],
        &["peer", "add", "laptop"],
    ] {
        let mut argv = vec![ctl.as_str(), "--socket", &socket_s];
        argv.extend_from_slice(args);
        ns.exec(&argv).or_die("vpcgate");
    }

    assert_eq!(mode(&state), 0o700, "state dir");
    let mut names: Vec<String> = std::fs::read_dir(&state)
        .or_die("list")
        .map(|e| e.or_die("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["peers.json", "private.key", "settings.json"]);
    for name in &names {
        assert_eq!(mode(&state.join(name)), 0o600, "{name}");
    }
    let uapi = Path::new(UAPI_DIR).join(format!("{name}.sock"));
    assert_eq!(mode(&uapi), 0o600, "UAPI socket");
    assert_eq!(mode(&socket), 0o600, "control socket");

    // Someone else cannot look inside, let alone read the key.
    let state_s = state.to_string_lossy().into_owned();
    let key = state.join("private.key").to_string_lossy().into_owned();
    for argv in [&["ls", &state_s][..], &["cat", &key]] {
        let out = run_as(&ns, User::GroupMember, argv);
        assert!(!out.status.success(), "{argv:?} worked for nobody: {out:?}");
    }
    proc.terminate(Duration::from_secs(10)).or_die("stops");
}

/// The flags of one of this process's descriptors, if it is open.
fn fd_flags(pid: &str, fd: u32) -> Option<u32> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
}

/// Whether this test process holds `fd` without close-on-exec, so that
/// the daemon (started through `ip netns exec`) got it from us.
fn inherited_from_us(fd: u32) -> bool {
    fd_flags("self", fd).is_some_and(|flags| flags & libc::O_CLOEXEC as u32 == 0)
}

#[test]
fn programs_the_daemon_runs_inherit_none_of_its_descriptors() {
    require_root();
    let ns = Netns::new("af").or_die("namespace");
    let mut cfg = VpcgatedConfig::new(51820, "100.64.0.1/24,fd00:64::1/64");
    cfg.extra_args = vec!["--metrics-listen".into(), "127.0.0.1:9586".into()];
    let mut dev = WgDev::vpcgated(&ns, "af", &cfg).or_die("vpcgated starts");
    let ctl = Vpcgate::for_dev(&dev).or_die("CLI");
    // `nft` runs for each change of the advertised set.
    ctl.advertise(&["198.18.64.0/20"]).or_die("advertise");
    ctl.run(&["status"]).or_die("status");
    let pid = dev.process().pid();
    let mut open = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd")).or_die("list fds") {
        let fd: u32 = entry
            .or_die("fd")
            .file_name()
            .to_string_lossy()
            .parse()
            .or_die("fd number");
        // Standard input, output and error are meant to be inherited, and
        // so is whatever this test was itself given without close-on-exec.
        if fd <= 2 || inherited_from_us(fd) {
            continue;
        }
        let Some(flags) = fd_flags(&pid.to_string(), fd) else {
            continue; // closed meanwhile
        };
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        open.push(format!("{fd} -> {target}"));
        assert_ne!(
            flags & libc::O_CLOEXEC as u32,
            0,
            "fd {fd} ({target}) is not close-on-exec, so every `nft` the daemon runs gets it"
        );
    }
    assert!(
        open.iter().any(|f| f.contains("/dev/net/tun")),
        "the TUN was not among the descriptors checked: {open:?}"
    );
    dev.check_running().or_die("running");
}
