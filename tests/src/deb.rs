//! The Debian packages the tests install: this tree's, built with
//! `packaging/build-deb.sh`, and a past release's, built the same way from
//! its commit.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

/// The workspace's root directory.
pub fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// The last `lines` lines of `text`.
pub fn tail_lines(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The workspace version as Debian spells it: a Cargo pre-release `-`
/// becomes `~`, which sorts before the release.
pub fn deb_version() -> String {
    env!("CARGO_PKG_VERSION").replacen('-', "~", 1)
}

/// Runs `build-deb.sh ARCH` from `source` with `envs`; the package's path.
fn run_build(source: &Path, arch: &str, envs: &[(&str, OsString)]) -> Result<PathBuf> {
    let script = source.join("packaging/build-deb.sh");
    let started = Instant::now();
    let mut cmd = Command::new("bash");
    cmd.arg(&script).arg(arch).current_dir(source);
    for (key, value) in envs {
        cmd.env(key, value);
    }
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {}", script.display()))?;
    if !out.status.success() {
        bail!(
            "{} {arch} failed ({}); the end of its output:\n{}",
            script.display(),
            out.status,
            tail_lines(&String::from_utf8_lossy(&out.stderr), 60)
        );
    }
    eprintln!(
        "{} {arch}: {:.0} s",
        script.display(),
        started.elapsed().as_secs_f64()
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    ensure!(
        deb.is_file(),
        "build-deb.sh named {deb:?}, which is not a file"
    );
    Ok(deb)
}

/// This tree's package for `arch`, built now (cargo makes that quick when
/// nothing changed).
pub fn build_deb(arch: &str) -> Result<PathBuf> {
    let root = repo_root();
    let _lock = crate::container::lock_file(&root.join("target/packages.lock"))?;
    let deb = run_build(&root, arch, &[])?;
    let expected = format!("vpcgate_{}_{arch}.deb", deb_version());
    ensure!(
        deb.file_name().and_then(|n| n.to_str()) == Some(expected.as_str()),
        "build-deb.sh built {}, not {expected}",
        deb.display()
    );
    Ok(deb)
}

/// The package of a past release, built from `commit` of this repository
/// with that commit's own build script, in a target directory of its own
/// (the same crate names at the same relative paths would otherwise share
/// this tree's build artefacts). Kept under `target/nspawn/` and built only
/// once.
pub fn release_deb(commit: &str, arch: &str) -> Result<PathBuf> {
    let root = repo_root();
    let base = crate::container::nspawn_dir();
    let _lock = crate::container::lock_file(&base.join(format!("release-{commit}.lock")))?;
    let out_dir = base.join(format!("pkg-{commit}"));
    if let Some(deb) = std::fs::read_dir(&out_dir).ok().and_then(|entries| {
        entries
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(&format!("_{arch}.deb")))
    }) {
        return Ok(deb);
    }
    let known = Command::new("git")
        .args(["-C"])
        .arg(&root)
        .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
        .status()
        .context("cannot run git")?;
    ensure!(
        known.success(),
        "commit {commit} (the release the upgrade starts from) is not in this clone; \
         a shallow clone lacks it: run `git fetch --unshallow`"
    );
    let source = base.join(format!("src-{commit}"));
    let _ = std::fs::remove_dir_all(&source);
    std::fs::create_dir_all(&source)?;
    let archive = Command::new("sh")
        .arg("-c")
        .arg("git -C \"$1\" archive \"$2\" | tar -x -C \"$3\"")
        .args(["sh"])
        .arg(&root)
        .arg(commit)
        .arg(&source)
        .status()
        .context("cannot run git archive")?;
    ensure!(archive.success(), "git archive {commit} failed");
    // The release's own commit date, so that its package is the same bytes
    // each time (build-deb.sh falls back to Cargo.lock's date otherwise).
    let date = Command::new("git")
        .arg("-C")
        .arg(&root)
        .args(["log", "-1", "--format=%ct", commit])
        .output()
        .context("cannot run git log")?;
    let date = String::from_utf8_lossy(&date.stdout).trim().to_string();
    let target = base.join(format!("target-{commit}"));
    let mut envs = vec![
        ("VPCGATE_PKG_TARGET_DIR", target.clone().into_os_string()),
        ("VPCGATE_PKG_OUT_DIR", out_dir.into_os_string()),
    ];
    if !date.is_empty() {
        envs.push(("SOURCE_DATE_EPOCH", date.into()));
    }
    let deb = run_build(&source, arch, &envs)?;
    // The package is what is kept; its build takes a gigabyte.
    let _ = std::fs::remove_dir_all(&source);
    let _ = std::fs::remove_dir_all(&target);
    Ok(deb)
}
