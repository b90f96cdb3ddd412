//! The CLI skeleton: help, version, and a clear error when no daemon answers.

use std::process::Command;

fn vpcgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vpcgate"))
}

#[test]
fn help_lists_commands() {
    let out = vpcgate().arg("--help").output().expect("run vpcgate");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("status"), "{text}");
    assert!(text.contains("--socket"), "{text}");
}

#[test]
fn version_matches_the_crate() {
    for args in [&["--version"][..], &["version"][..]] {
        let out = vpcgate().args(args).output().expect("run vpcgate");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    }
}

#[test]
fn status_without_a_daemon_fails_with_advice() {
    let socket = std::env::temp_dir().join(format!("vpcgate-none-{}.sock", std::process::id()));
    let out = vpcgate()
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .expect("run vpcgate");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach vpcgated"), "{err}");
    assert!(err.contains(&*socket.to_string_lossy()), "{err}");
}

#[test]
fn socket_comes_from_the_environment() {
    let out = vpcgate()
        .arg("status")
        .env("VPCGATE_SOCKET", "/nonexistent/from-env.sock")
        .output()
        .expect("run vpcgate");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/from-env.sock"));
}
