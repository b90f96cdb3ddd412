//! The Linux errno values the control plane answers with. The UAPI sends
//! them to `wg` as `errno=N`; the numbers are Linux's, the only platform
//! vpcgate runs on, and are written out here so that the pure crates need
//! no libc.

pub const EIO: i32 = 5;
pub const EEXIST: i32 = 17;
pub const ENODEV: i32 = 19;
pub const EINVAL: i32 = 22;
pub const ENOSPC: i32 = 28;
pub const EADDRINUSE: i32 = 98;
pub const ENOKEY: i32 = 126;
