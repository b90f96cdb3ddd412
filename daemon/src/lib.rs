//! vpcgated: a userspace WireGuard subnet router.
//!
//! The crate is a core that does no I/O ([`core`], the `vpcgate-node` crate;
//! [`config`], [`subnet`]) inside a thin
//! I/O shell ([`dataplane`], [`netlink`], [`nat`], [`uapi`], [`control`], [`state`]),
//! started and stopped by [`daemon`]. ARCHITECTURE.md at the repository root
//! has the diagram and the thread map.

pub mod access;
pub mod config;
pub mod control;
/// The WireGuard node, a crate of its own so that nothing in it can do I/O.
pub use vpcgate_node as core;
pub mod daemon;
pub mod dataplane;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod nat;
pub mod netlink;
pub mod state;
pub mod subnet;
pub mod uapi;
