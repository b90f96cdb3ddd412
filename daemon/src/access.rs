//! Who may talk to the daemon's sockets.
//!
//! File permissions are the first gate (0600, or 0660 with `--socket-group`);
//! the kernel's record of the connecting process (SO_PEERCRED and
//! SO_PEERGROUPS) is the second, so a socket file whose mode was loosened by
//! hand still refuses strangers.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::unistd::{Gid, Uid};

#[derive(Debug, Clone, Copy)]
pub struct Access {
    /// Members of this group may use the control socket too.
    pub group: Option<Gid>,
}

impl Access {
    /// Root and our own user only.
    pub const OWNER_ONLY: Access = Access { group: None };

    /// Whether the process on the other end of `socket` may use it.
    pub fn allows(&self, socket: BorrowedFd<'_>) -> bool {
        let Ok(cred) =
            nix::sys::socket::getsockopt(&socket, nix::sys::socket::sockopt::PeerCredentials)
        else {
            return false;
        };
        let uid = Uid::from_raw(cred.uid());
        if uid.is_root() || uid == Uid::effective() {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        Gid::from_raw(cred.gid()) == group || peer_groups(socket).contains(&group)
    }
}

/// The peer's supplementary groups (SO_PEERGROUPS, Linux 4.13+); empty when
/// the kernel cannot tell, which only ever denies.
fn peer_groups(socket: BorrowedFd<'_>) -> Vec<Gid> {
    let mut groups = [0 as libc::gid_t; 256];
    let mut len = std::mem::size_of_val(&groups) as libc::socklen_t;
    // SAFETY: the buffer and its length describe valid writable memory, and
    // the kernel writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERGROUPS,
            groups.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Vec::new();
    }
    let count = (len as usize / std::mem::size_of::<libc::gid_t>()).min(groups.len());
    groups[..count].iter().map(|g| Gid::from_raw(*g)).collect()
}

/// Resolves `--socket-group`.
pub fn resolve_group(name: &str) -> Result<Gid, String> {
    match nix::unistd::Group::from_name(name) {
        Ok(Some(group)) => Ok(group.gid),
        Ok(None) => Err(format!(
            "no group named {name:?}; create it (groupadd --system {name}) or drop --socket-group"
        )),
        Err(e) => Err(format!("cannot look up group {name:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn our_own_connections_are_allowed() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        assert!(Access::OWNER_ONLY.allows(a.as_fd()));
    }

    #[test]
    fn unknown_group_is_a_clear_error() {
        let err = resolve_group("no-such-group-vpcgate-test").expect_err("missing");
        assert!(err.contains("groupadd"), "{err}");
        assert!(resolve_group("root").is_ok());
    }
}
