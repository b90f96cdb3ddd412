//! vpcgated: a userspace WireGuard subnet router.
//!
//! The decisions live in two crates that do no I/O: the WireGuard node
//! ([`core`], the `vpcgate-node` crate) and the control plane
//! (`vpcgate-plane`: the desired state, intents, the planner and the
//! reconciler). This crate is the shell around them: the data-path thread
//! ([`dataplane`]), the ports the control plane drives ([`ports`],
//! [`nat`], [`netlink`], [`state`]), the task that owns the control plane
//! ([`owner`]) and the servers that talk to it through a [`handle`]
//! ([`uapi`], [`control`], [`metrics`], [`health`], the last two over
//! [`http`]), and the DNS forwarder's sockets
//! around the `vpcgate-dns` core ([`dns`]), all wired up by [`daemon`].
//! ARCHITECTURE.md at the repository root has the diagram and the thread
//! map.

pub mod access;
pub mod control;
/// The WireGuard node, a crate of its own so that nothing in it can do I/O.
pub use vpcgate_node as core;
pub mod daemon;
pub mod dataplane;
pub mod dns;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod handle;
pub mod health;
pub mod http;
pub mod metrics;
pub mod nat;
pub mod netlink;
pub mod owner;
pub mod ports;
pub mod probes;
pub mod resolved;
pub mod state;
pub mod uapi;
pub mod unix;
