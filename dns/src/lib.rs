//! vpcgate's DNS forwarder, without I/O: tunnel peers' queries go to the
//! resolvers the gateway itself uses (on a cloud VM, the VPC's resolver,
//! the only one that answers for private zones), through a bounded cache,
//! per-peer rate limits and a bound on queries in flight.
//!
//! The shell (vpcgated) owns the sockets: it feeds [`Forwarder`] each
//! query with the peer it came from, each datagram or TCP reply an
//! upstream socket receives, and the time; it carries out the
//! [`Output`]s. Parsing is hickory-proto's. What a forwarding proxy must do
//! (RFC 5625, RFC 5452, RFC 7766) is in [`forwarder`] and [`message`].

pub mod cache;
pub mod forwarder;
pub mod limit;
pub mod message;
pub mod resolv;
pub mod stats;

pub use forwarder::{Config, Forwarder, Output, Send, Ticket, Transport};
pub use limit::Rate;
pub use stats::{Latency, Result, Stats};

#[cfg(test)]
mod tests;
