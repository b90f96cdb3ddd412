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

#[test]
fn a_closed_pipe_ends_quietly() {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = vpcgate()
        .arg("version")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vpcgate");
    // The reader goes away before vpcgate writes, as with `| head -0`.
    drop(child.stdout.take());
    let status = child.wait().expect("wait");
    let mut err = String::new();
    let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(
        status.code(),
        Some(101),
        "vpcgate panicked on a closed pipe"
    );
}
