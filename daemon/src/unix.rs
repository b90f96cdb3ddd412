//! The daemon's Unix sockets (UAPI and control): claiming a path without
//! taking it from a live process, and removing it at exit only if it is
//! still ours.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tokio::net::UnixListener;

/// Creates the listening socket at `path`, replacing a stale socket file but
/// refusing to take over one that a live process still answers on.
pub fn bind_unix(path: &Path, group: Option<nix::unistd::Gid>) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        // Our umask would make it 0700; the socket's own mode is the gate,
        // so the directory must let a --socket-group member through.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if socket_is_live(path) {
                bail!(
                    "{} is in use by a running process; stop it first (is another vpcgated or \
                     wireguard-go using this interface name?)",
                    path.display()
                );
            }
            // `wg` also unlinks a socket nobody answers on; if it got there
            // first, the path is just as free.
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(e)
                        .with_context(|| format!("cannot remove stale socket {}", path.display()))
                }
                _ => {}
            }
        }
        Ok(_) => bail!("{} exists and is not a socket; remove it", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind {}", path.display()))?;
    let mode = match group {
        Some(gid) => {
            nix::unistd::chown(path, None, Some(gid))
                .with_context(|| format!("cannot give {} to group {gid}", path.display()))?;
            0o660
        }
        None => 0o600,
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot restrict {}", path.display()))?;
    Ok(listener)
}

/// Whether a process listens on the socket at `path`. A child we spawned
/// (`nft`) holds copies of all our descriptors from the fork until its
/// exec closes them; if we were killed in that window, the socket of the
/// dead daemon still accepts for a few milliseconds. So a socket that
/// accepts is asked again for a moment before it counts as in use.
fn socket_is_live(path: &Path) -> bool {
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);
    let deadline = std::time::Instant::now() + PATIENCE;
    for attempt in 0.. {
        if std::os::unix::net::UnixStream::connect(path).is_err() {
            if attempt > 0 {
                tracing::info!(
                    path = %path.display(),
                    "a stale socket answered for a moment (a child of the dead daemon held it)"
                );
            }
            return false;
        }
        if std::time::Instant::now() >= deadline {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    true
}

/// Removes a socket file only if it is still the one we created.
pub struct SocketFile {
    path: PathBuf,
    inode: u64,
}

impl SocketFile {
    pub fn new(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt;
        let inode = std::fs::symlink_metadata(path)
            .map(|m| m.ino())
            .unwrap_or(0);
        SocketFile {
            path: path.to_path_buf(),
            inode,
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
