//! `vpcgate doctor`'s `open_as` (ctl/src/doctor/open_as.rs) as root: it
//! must check the other user's access, not root's. The file is included
//! as it is; it needs only std and libc. Every test inside `ctl/` runs
//! unprivileged, so this one lives here.

#[path = "../../ctl/src/doctor/open_as.rs"]
#[allow(dead_code)]
mod open_as;

use std::io;

use open_as::open_as;

/// Opens files as nobody (65534) from a forked child. Needs root, to
/// become nobody; fails when not run as root, never passes silently.
#[test]
fn open_as_checks_the_users_access_not_roots() {
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "must run as root: this test becomes another user \
             (run `sudo -E cargo test --workspace --release`)"
        );
    }
    use std::os::unix::fs::PermissionsExt;
    const NOBODY: u32 = 65534;
    let dir = std::env::temp_dir().join(format!("vpcgate-doctor-open-as-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let file = |name: &str, mode: u32| {
        let path = dir.join(name);
        std::fs::write(&path, "").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        path
    };
    let private = file("private", 0o600);
    let open = file("open", 0o666);

    let refused = open_as(&private, NOBODY, NOBODY).expect("the check runs");
    assert_eq!(
        refused.as_ref().map_err(io::Error::raw_os_error),
        Err(Some(libc::EACCES)),
        "{refused:?}"
    );
    assert!(
        open_as(&open, NOBODY, NOBODY)
            .expect("the check runs")
            .is_ok(),
        "a 0666 file opens for nobody"
    );
    // As uid 0 the child opens it: the refusal came from becoming nobody.
    assert!(open_as(&private, 0, 0).expect("the check runs").is_ok());
    let gone = open_as(&dir.join("gone"), NOBODY, NOBODY).expect("the check runs");
    assert_eq!(
        gone.as_ref().map_err(io::Error::raw_os_error),
        Err(Some(libc::ENOENT)),
        "{gone:?}"
    );
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
