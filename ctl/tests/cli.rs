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

#[test]
fn completions_come_from_the_cli() {
    for shell in ["bash", "zsh", "fish"] {
        let out = vpcgate()
            .args(["completions", shell])
            .output()
            .expect("run vpcgate");
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8_lossy(&out.stdout);
        for shown in ["advertise-routes", "accept-routes", "completions"] {
            assert!(script.contains(shown), "{shell}: no {shown} in {script}");
        }
        // Hidden, as in --help.
        for hidden in ["qr-decode", "generate-man-pages"] {
            assert!(!script.contains(hidden), "{shell}: {hidden} in {script}");
        }
    }
    let out = vpcgate()
        .args(["completions", "tcsh"])
        .output()
        .expect("run vpcgate");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values: bash"));
}

/// Roff without its font changes and with plain hyphens.
fn plain(roff: &str) -> String {
    roff.replace("\\fB", "")
        .replace("\\fI", "")
        .replace("\\fR", "")
        .replace("\\-", "-")
}

#[test]
fn man_pages_cover_every_subcommand_they_name() {
    let dir = std::env::temp_dir().join(format!("vpcgate-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = vpcgate()
        .arg("generate-man-pages")
        .arg(&dir)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .output()
        .expect("run vpcgate");
    let pages: std::collections::BTreeMap<String, String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .map(|e| {
                    let path = e.expect("a directory entry").path();
                    let text = std::fs::read_to_string(&path).expect("a page");
                    let name = path.file_name().expect("a name").to_string_lossy();
                    (name.into_owned(), plain(&text))
                })
                .collect()
        })
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{out:?}");
    let top = pages.get("vpcgate.8").expect("vpcgate.8");
    let title = format!(
        ".TH vpcgate 8 2023-11-14 \"vpcgate {}\"",
        env!("CARGO_PKG_VERSION")
    );
    assert!(top.contains(&title), "dated SOURCE_DATE_EPOCH: {top}");
    assert!(
        top.contains("VPCGATE_SOCKET") && top.contains("--json"),
        "{top}"
    );
    assert!(top.contains("vpcgated(8)"), "SEE ALSO: {top}");
    let add = pages.get("vpcgate-peer-add.8").expect("vpcgate-peer-add.8");
    assert!(add.contains("--accept-routes"), "{add}");
    // Every page a page refers to exists, and every page is referred to.
    let mut named = std::collections::BTreeSet::from(["vpcgate.8".to_string()]);
    for text in pages.values() {
        for (i, _) in text.match_indices("(8)") {
            let start = text[..i]
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .map_or(0, |j| j + 1);
            let name = &text[start..i];
            if name.starts_with("vpcgate-") {
                assert!(
                    pages.contains_key(&format!("{name}.8")),
                    "{name}(8) is named but missing"
                );
                named.insert(format!("{name}.8"));
            }
        }
    }
    let shipped: std::collections::BTreeSet<String> = pages.keys().cloned().collect();
    assert_eq!(shipped, named, "pages that no page names");
    for hidden in ["qr-decode", "generate-man-pages", "vpcgate-help"] {
        assert!(
            pages
                .iter()
                .all(|(name, text)| !name.contains(hidden) && !text.contains(hidden)),
            "{hidden} is documented"
        );
    }
}
