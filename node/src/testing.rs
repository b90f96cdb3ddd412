//! An in-memory [`Transmit`] sink, for tests of the node and of what is
//! built on it (`node/sim` enables the `testing` feature for it).

use std::net::{IpAddr, SocketAddr};

use crate::{Endpoint, Transmit};

/// Records every datagram the node sends and every packet it delivers.
#[derive(Default)]
pub struct MemoryWire {
    /// Datagrams sent, with their destination.
    pub sent: Vec<(SocketAddr, Vec<u8>)>,
    /// The local address each datagram in `sent` asked to leave from.
    pub sent_from: Vec<Option<IpAddr>>,
    /// Packets delivered to the TUN.
    pub tun: Vec<Vec<u8>>,
    udp_slot: Vec<u8>,
    tun_slot: Vec<u8>,
}

impl Transmit for MemoryWire {
    fn udp_slot(&mut self, len: usize) -> &mut [u8] {
        self.udp_slot.resize(len, 0);
        &mut self.udp_slot
    }
    fn commit_udp(&mut self, to: Endpoint, len: usize) -> bool {
        self.sent.push((to.remote, self.udp_slot[..len].to_vec()));
        self.sent_from.push(to.local);
        true
    }
    fn tun_slot(&mut self, len: usize) -> &mut [u8] {
        if self.tun_slot.len() < len {
            self.tun_slot.resize(len, 0);
        }
        &mut self.tun_slot
    }
    fn commit_tun(&mut self, len: usize) {
        self.tun.push(self.tun_slot[..len].to_vec());
        self.tun_slot.clear();
    }
}
