//! Runs `node/sim`: the node's WireGuard timers on a simulated clock.
//!
//! That package is a workspace of its own because it builds boringtun with
//! `mock-instant`, which must never reach vpcgated; this test is how
//! `cargo test --workspace` runs it. It builds into its own target
//! directory, so it never waits on this build's lock.

use std::path::Path;
use std::process::Command;

#[test]
fn wireguard_timers_hold_on_a_simulated_clock() {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("sim/Cargo.toml");
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("node-sim");
    let out = Command::new(cargo)
        .args(["test", "--locked", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        // The outer build's settings are for the outer build.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo for {}: {e}", manifest.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the simulated-clock tests failed:\n{stdout}\n{stderr}"
    );
    // They ran, rather than being filtered away or not found.
    let passed: usize = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("test result: ok. "))
        .filter_map(|l| l.split_once(" passed")?.0.parse::<usize>().ok())
        .sum();
    assert!(
        passed >= 5,
        "only {passed} simulated-clock tests ran:\n{stdout}"
    );
}
