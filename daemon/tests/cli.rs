//! The daemon's command line: flags parse, bad values are refused before
//! anything is touched.

use std::process::Command;

fn vpcgated() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vpcgated"))
}

#[test]
fn help_documents_every_flag() {
    let out = vpcgated().arg("--help").output().expect("run vpcgated");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--interface",
        "--state-dir",
        "--socket",
        "--listen-port",
        "--address",
        "--log-level",
    ] {
        assert!(text.contains(flag), "missing {flag} in:\n{text}");
    }
}

#[test]
fn bad_values_are_refused() {
    for args in [
        &["--address", "not-a-cidr"][..],
        &["--listen-port", "70000"][..],
        &["--interface", "a-name-that-is-far-too-long"][..],
        &["--interface", "../etc"][..],
        &["--mtu", "100"][..],
    ] {
        let out = vpcgated().args(args).output().expect("run vpcgated");
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?} should be a usage error"
        );
        assert!(!out.stderr.is_empty());
    }
}
