//! The systemd unit, `systemd/vpcgated.service`: `systemd-analyze` scores its
//! sandbox at 2.0 or less and verifies it without complaint; it carries the
//! directives the daemon and the package rely on; and its system call filter
//! is as narrow as its comments say. These tests read files and run
//! `systemd-analyze` (systemd 250 or newer, for `--offline`); they need no
//! root.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const HIGHEST_EXPOSURE: f64 = 2.0;

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/vpcgated.service")
}

fn unit_text() -> String {
    let path = unit_path();
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `Key=value` line of the unit, in order, with its section.
fn directives(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            section = line[1..line.len() - 1].to_string();
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "keep directives on one line, the tests read them so: {line}"
        );
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a Key=value line: {line}"));
        out.push((section.clone(), key.trim().into(), value.trim().into()));
    }
    out
}

/// The values of `key` in [Service], in order.
fn service_values(text: &str, key: &str) -> Vec<String> {
    directives(text)
        .into_iter()
        .filter(|(section, k, _)| section == "Service" && k == key)
        .map(|(_, _, v)| v)
        .collect()
}

/// The one value of `key` in [Service]; fails if it is missing or repeated.
fn service_value(text: &str, key: &str) -> String {
    match service_values(text, key).as_slice() {
        [one] => one.clone(),
        [] => panic!("[Service] has no {key}="),
        many => panic!("[Service] sets {key}= {} times: {many:?}", many.len()),
    }
}

fn systemd_analyze(args: &[&str]) -> Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-analyze ({e}): install the systemd package (.ci/run does)")
        })
}

#[test]
fn sandbox_exposure_is_at_most_2_0() {
    let unit = unit_path();
    let out = systemd_analyze(&[
        "security",
        "--offline=true",
        "--no-pager",
        unit.to_str().expect("a UTF-8 path"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze security failed ({}); it needs systemd 250 or newer for --offline:\n{stderr}",
        out.status
    );
    // A misspelt directive is ignored with a warning, and silently weakens
    // the sandbox.
    assert!(
        stderr.trim().is_empty(),
        "systemd-analyze complains about the unit:\n{stderr}"
    );
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level for vpcgated.service:"))
        .unwrap_or_else(|| panic!("no overall exposure in:\n{stdout}"));
    let exposure: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the exposure from {line:?}"));
    let failing: Vec<&str> = stdout.lines().filter(|l| l.starts_with('✗')).collect();
    eprintln!("{line}");
    assert!(
        exposure <= HIGHEST_EXPOSURE,
        "exposure {exposure} is above {HIGHEST_EXPOSURE}; what counts against it:\n{}",
        failing.join("\n")
    );
}

/// `systemd-analyze verify` checks the unit as PID 1 would load it. It also
/// insists that ExecStart= names an existing executable, and /usr/bin/vpcgated
/// exists only where the package is installed, so it verifies a copy whose
/// ExecStart= runs /bin/true instead; every other line is the unit's own.
#[test]
fn systemd_analyze_verify_is_clean() {
    let text = unit_text();
    let exec_start = service_value(&text, "ExecStart");
    let daemon = "/usr/bin/vpcgated";
    assert!(exec_start.starts_with(daemon), "ExecStart={exec_start}");
    let copy = text.replace(
        &format!("ExecStart={daemon}"),
        &format!("ExecStart={}", which("true")),
    );
    let dir = std::env::temp_dir().join(format!("vpcgate-unit-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("vpcgated.service");
    std::fs::write(&path, copy).expect("write the copy");
    let out = systemd_analyze(&[
        "verify",
        "--man=no",
        "--no-pager",
        path.to_str().expect("a UTF-8 path"),
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify ({}):\n{stderr}",
        out.status
    );
}

fn which(program: &str) -> String {
    ["/usr/bin", "/bin"]
        .iter()
        .map(|dir| format!("{dir}/{program}"))
        .find(|p| Path::new(p).is_file())
        .unwrap_or_else(|| panic!("{program} not found in /usr/bin or /bin"))
}

#[test]
fn unit_has_the_directives_the_daemon_and_package_rely_on() {
    let text = unit_text();
    let expect = |key: &str, want: &str| {
        assert_eq!(service_value(&text, key), want, "{key}=");
    };
    // The daemon's readiness and liveness protocol.
    expect("Type", "notify");
    expect("NotifyAccess", "main");
    expect("WatchdogSec", "30");
    expect("Restart", "on-failure");
    expect("ExecReload", "/bin/kill -HUP $MAINPID");
    // SIGTERM to the daemon only, so the nft it runs on the way out survives.
    expect("KillMode", "mixed");
    // The package's account, and nothing but CAP_NET_ADMIN and, for the
    // DNS forwarder's port 53, CAP_NET_BIND_SERVICE.
    expect("User", "vpcgate");
    expect("Group", "vpcgate");
    expect(
        "CapabilityBoundingSet",
        "CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
    );
    expect("AmbientCapabilities", "CAP_NET_ADMIN CAP_NET_BIND_SERVICE");
    expect("NoNewPrivileges", "yes");
    // The TUN device, also under ProtectClock=, which restricts devices.
    expect("DevicePolicy", "closed");
    expect("DeviceAllow", "/dev/net/tun rw");
    expect("ProtectClock", "yes");
    // The daemon's default paths: /var/lib/vpcgate, /run/vpcgate and the
    // UAPI socket directory /var/run/wireguard, which others share.
    expect("StateDirectory", "vpcgate");
    expect("StateDirectoryMode", "0700");
    expect("UMask", "0077");
    let runtime: BTreeSet<String> = service_value(&text, "RuntimeDirectory")
        .split_whitespace()
        .map(String::from)
        .collect();
    assert_eq!(
        runtime,
        BTreeSet::from(["vpcgate".to_string(), "wireguard".to_string()]),
        "RuntimeDirectory="
    );
    expect("RuntimeDirectoryPreserve", "yes");
    expect("ProtectSystem", "strict");
    expect(
        "RestrictAddressFamilies",
        "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    );
    for key in [
        "ProtectHome",
        "PrivateTmp",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
    ] {
        expect(key, "yes");
    }
    expect("ProtectProc", "invisible");
    expect("SystemCallArchitectures", "native");
    let exec_start = service_value(&text, "ExecStart");
    assert!(
        exec_start == "/usr/bin/vpcgated" || exec_start.starts_with("/usr/bin/vpcgated "),
        "ExecStart={exec_start}"
    );
    let filters = service_values(&text, "SystemCallFilter");
    assert_eq!(
        filters.first().map(String::as_str),
        Some("@system-service"),
        "the first SystemCallFilter= must be the @system-service allow list"
    );
    let install: Vec<_> = directives(&text)
        .into_iter()
        .filter(|(s, k, _)| s == "Install" && k == "WantedBy")
        .map(|(_, _, v)| v)
        .collect();
    assert_eq!(install, ["multi-user.target"], "[Install] WantedBy=");
}

/// Expands system call groups the way this host's systemd defines them.
fn syscalls(names: &[&str]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for name in names {
        if !name.starts_with('@') {
            out.insert((*name).to_string());
            continue;
        }
        let listing = systemd_analyze(&["syscall-filter", "--no-pager", name]);
        assert!(
            listing.status.success(),
            "systemd-analyze syscall-filter {name}: {}",
            String::from_utf8_lossy(&listing.stderr)
        );
        let text = String::from_utf8_lossy(&listing.stdout).into_owned();
        let members: Vec<&str> = text
            .lines()
            .skip(1) // the group's own name
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert!(
            !members.is_empty(),
            "{name} is not a group this systemd knows"
        );
        out.extend(syscalls(&members));
    }
    out
}

/// The filter the unit ends up with, as systemd builds it: the first line is
/// an allow list, then each line adds to it or (with `~`) takes away.
#[test]
fn system_call_filter_is_as_narrow_as_documented() {
    let text = unit_text();
    let filters = service_values(&text, "SystemCallFilter");
    let mut allowed = BTreeSet::new();
    for (i, line) in filters.iter().enumerate() {
        let (deny, list) = match line.strip_prefix('~') {
            Some(list) => (true, list),
            None => (false, line.as_str()),
        };
        assert!(
            i > 0 || !deny,
            "the first SystemCallFilter= must allow, not deny"
        );
        let names: Vec<&str> = list.split_whitespace().collect();
        let set = syscalls(&names);
        if deny {
            allowed.retain(|s| !set.contains(s));
        } else {
            allowed.extend(set);
        }
    }
    let chown = syscalls(&["@chown"]);
    let privileged = syscalls(&["@privileged"]);
    let privileged: Vec<&String> = allowed
        .intersection(&privileged)
        .filter(|s| !chown.contains(*s))
        .collect();
    assert!(
        privileged.is_empty(),
        "privileged calls other than chown are allowed: {privileged:?}"
    );
    let resources = syscalls(&["@resources"]);
    let resources: Vec<&String> = allowed.intersection(&resources).collect();
    assert!(
        resources.is_empty(),
        "@resources calls are allowed: {resources:?}"
    );

    // The line for systemd before 239 must not widen the filter on a newer one.
    let service = syscalls(&["@system-service"]);
    let fallback = filters
        .iter()
        .find(|l| l.contains("@basic-io"))
        .expect("the SystemCallFilter= line for systemd before 239");
    let fallback: Vec<&str> = fallback.split_whitespace().collect();
    let outside: Vec<String> = syscalls(&fallback).difference(&service).cloned().collect();
    assert!(
        outside.is_empty(),
        "the fallback line allows calls outside @system-service: {outside:?}"
    );
}
