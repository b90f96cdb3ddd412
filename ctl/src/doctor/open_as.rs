//! Opening a file as another user, to check the service user's access to
//! `/dev/net/tun` from a doctor run as root.
//!
//! Self-contained (std and libc only): `tests/tests/open_as.rs` includes
//! this file to test it as root, since every test inside `ctl/` runs
//! unprivileged.

use std::ffi::{CStr, CString};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;

/// What the child of [`open_as`] was doing when a call failed.
const STEP_SETGROUPS: u8 = 1;
const STEP_SETGID: u8 = 2;
const STEP_SETUID: u8 = 3;
const STEP_OPEN: u8 = 4;

/// Opens `path` for reading and writing as `uid` and `gid`, with no
/// supplementary groups and no capabilities, and closes it again. This runs
/// in a forked child, since a process that gives up root cannot get it back.
/// The outer error means the check could not be made (no fork, or the switch
/// to that user failed); the inner result is open's.
pub fn open_as(path: &Path, uid: libc::uid_t, gid: libc::gid_t) -> io::Result<io::Result<()>> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just opened both, and nothing else owns them.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the child only makes async-signal-safe calls and then _exits,
    // so fork is sound even when other threads hold locks.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: this is the child, c_path is a valid C string and writer
        // an open descriptor.
        unsafe { open_as_child(&c_path, uid, gid, writer.as_raw_fd()) }
    }
    drop(writer);
    // The child writes five bytes when a call fails and nothing when the
    // open succeeds; either way its exit closes the pipe.
    let mut report = Vec::new();
    let read = std::fs::File::from(reader).read_to_end(&mut report);
    let mut status = 0;
    loop {
        // SAFETY: pid is our child, and status a valid place for its status.
        if unsafe { libc::waitpid(pid, &mut status, 0) } == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    read?;
    match report[..] {
        [] if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 => Ok(Ok(())),
        [step, a, b, c, d] => {
            let e = io::Error::from_raw_os_error(i32::from_ne_bytes([a, b, c, d]));
            let call = match step {
                STEP_OPEN => return Ok(Err(e)),
                STEP_SETGROUPS => "setgroups",
                STEP_SETGID => "setgid",
                STEP_SETUID => "setuid",
                _ => "an unknown call",
            };
            Err(io::Error::new(
                e.kind(),
                format!("cannot become uid {uid} gid {gid} ({call}: {e})"),
            ))
        }
        _ => Err(io::Error::other(format!(
            "the child that opens {} as uid {uid} ended with wait status {status:#x}",
            path.display()
        ))),
    }
}

/// The child of [`open_as`]: only async-signal-safe calls, then `_exit`.
/// On failure it writes the step and errno to `report`.
///
/// # Safety
///
/// Only in a child just forked, whose other threads are gone; `report` must
/// be open.
unsafe fn open_as_child(path: &CStr, uid: libc::uid_t, gid: libc::gid_t, report: RawFd) -> ! {
    // SAFETY: each call takes valid arguments and is async-signal-safe; the
    // order matters, as setuid takes away the right to the other two.
    let step = unsafe {
        if libc::setgroups(0, ptr::null()) != 0 {
            STEP_SETGROUPS
        } else if libc::setgid(gid) != 0 {
            STEP_SETGID
        } else if libc::setuid(uid) != 0 {
            STEP_SETUID
        } else if libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        ) >= 0
        {
            // Exiting closes it.
            libc::_exit(0)
        } else {
            STEP_OPEN
        }
    };
    // SAFETY: __errno_location returns this thread's errno, always valid.
    let errno = unsafe { *libc::__errno_location() }.to_ne_bytes();
    let message = [step, errno[0], errno[1], errno[2], errno[3]];
    // SAFETY: message is valid for its length; a failed write leaves the
    // parent with no report and a non-zero status, which it reports.
    unsafe {
        libc::write(report, message.as_ptr().cast(), message.len());
        libc::_exit(1)
    }
}
