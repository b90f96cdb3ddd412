//! vpcgate's control plane, with no I/O.
//!
//! It owns the one desired state of a node ([`model::Desired`]: the
//! WireGuard device, the settings, the TUN as the kernel reports it, and the
//! routes learned from peers), the policy that governs it ([`policy`]:
//! validation, route acceptance, address assignment, client configs), and
//! the two steps that change it:
//! - [`intent::plan`] turns the desired state and an [`intent::Intent`]
//!   from any source into the next desired state, or refuses it with an
//!   error that knows its errno and its message;
//! - [`reconcile::Reconciler`] brings the OS to a desired state through the
//!   [`ports`], idempotently, retrying what failed.
//!
//! [`reconcile::Engine`] holds both. The shell (`vpcgated`) owns one engine
//! on one task, implements the ports against the kernel, and feeds intents
//! in; [`fakes`] implements them in memory for tests. Nothing here opens a
//! socket or a file or reads the clock.

pub mod datapath;
pub mod device;
pub mod errno;
pub mod failover;
#[cfg(any(test, feature = "fakes"))]
pub mod fakes;
pub mod health;
pub mod identity;
pub mod intent;
pub mod key;
pub mod model;
pub mod policy;
pub mod ports;
pub mod reconcile;
pub mod settings;
pub mod stored;
pub mod text;
pub mod view;

#[cfg(test)]
mod tests;
