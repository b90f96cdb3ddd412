//! Nodes wired together through an in-memory network: handshakes, data,
//! cryptokey routing, roaming and hostile input, with no sockets or TUN.

use super::*;
use boringtun::x25519::StaticSecret;

use crate::testing::MemoryWire as Wire;

struct Host {
    node: Node,
    table: SharedRoutes,
    counters: Arc<DropCounters>,
    public: [u8; 32],
    addr: SocketAddr,
    wire: Wire,
    routes: Vec<(ipnet::IpNet, PeerHandle)>,
    buf: Vec<u8>,
}

impl Host {
    fn new(addr: &str) -> Host {
        let secret = StaticSecret::random_from_rng(rand_core::OsRng);
        let public = PublicKey::from(&secret).to_bytes();
        let table: SharedRoutes = Arc::new(ArcSwap::from_pointee(Routes::default()));
        let counters = Arc::new(DropCounters::default());
        let mut node = Node::new(table.clone(), counters.clone(), Instant::now());
        node.apply(Change::SetPrivateKey(Some(secret)));
        Host {
            node,
            table,
            counters,
            public,
            addr: addr.parse().expect("socket address"),
            wire: Wire::default(),
            routes: Vec::new(),
            buf: vec![0; BUF_SIZE],
        }
    }

    fn add_peer(
        &mut self,
        handle: PeerHandle,
        key: [u8; 32],
        endpoint: Option<SocketAddr>,
        ips: &[&str],
    ) -> Arc<PeerStats> {
        let stats = Arc::new(PeerStats::new(endpoint));
        self.node.apply(Change::UpsertPeer(PeerSpec {
            handle,
            public_key: key,
            preshared_key: None,
            endpoint,
            persistent_keepalive: 0,
            route_source: None,
            stats: stats.clone(),
        }));
        for ip in ips {
            self.routes.push((ip.parse().expect("cidr"), handle));
        }
        self.publish();
        stats
    }

    fn remove_peer(&mut self, handle: PeerHandle) {
        self.routes.retain(|(_, h)| *h != handle);
        self.publish();
        self.node.apply(Change::RemovePeer(handle));
    }

    /// Publishes the peers' allowed IPs; packets may be forwarded to the
    /// tunnel network and to `scope`.
    fn publish(&self) {
        self.publish_scope(&[]);
    }

    fn publish_scope(&self, scope: &[&str]) {
        let forward = std::iter::once("100.64.0.0/24")
            .chain(scope.iter().copied())
            .map(|s| (s.parse().expect("cidr"), ()));
        self.table.store(Arc::new(Routes {
            peers: Arc::new(RouteTable::build(self.routes.iter().copied())),
            forward: Arc::new(RouteTable::build(forward)),
        }));
    }

    fn send_ip(&mut self, packet: &[u8]) {
        let mut packet = packet.to_vec();
        let len = packet.len();
        self.node
            .handle_tun_packet(&mut packet, len, Instant::now(), &mut self.wire);
    }

    fn receive(&mut self, from: SocketAddr, datagram: &[u8]) {
        self.node.handle_datagram(
            from.into(),
            datagram,
            &mut self.buf,
            Instant::now(),
            &mut self.wire,
        );
    }

    fn dropped(&self, reason: DropReason) -> u64 {
        self.counters.get(reason)
    }
}

/// Delivers datagrams between hosts until none are in flight. `from_addr`
/// lets a test pretend a host moved.
fn settle(hosts: &mut [&mut Host]) {
    for _ in 0..20 {
        let mut in_flight = Vec::new();
        for (i, host) in hosts.iter_mut().enumerate() {
            for (to, datagram) in host.wire.sent.drain(..) {
                in_flight.push((i, host.addr, to, datagram));
            }
        }
        if in_flight.is_empty() {
            return;
        }
        for (_, from, to, datagram) in in_flight {
            if let Some(host) = hosts.iter_mut().find(|h| h.addr == to) {
                host.receive(from, &datagram);
            }
        }
    }
    panic!("the simulated network did not settle");
}

fn ipv4(src: &str, dst: &str, payload: &[u8]) -> Vec<u8> {
    let src: std::net::Ipv4Addr = src.parse().expect("src");
    let dst: std::net::Ipv4Addr = dst.parse().expect("dst");
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p[8] = 64;
    p[9] = 17;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

const A: PeerHandle = 1 << 32;
const B: PeerHandle = (2 << 32) | 1;
const C: PeerHandle = (3 << 32) | 2;

/// Two hosts that know each other: a = 100.64.0.2, b = 100.64.0.1.
fn pair() -> (Host, Host) {
    let mut a = Host::new("198.18.0.2:51820");
    let mut b = Host::new("198.18.0.1:51820");
    let (a_pub, b_pub) = (a.public, b.public);
    a.add_peer(B, b_pub, Some(b.addr), &["100.64.0.1/32"]);
    b.add_peer(A, a_pub, None, &["100.64.0.2/32"]);
    (a, b)
}

#[test]
fn handshake_then_data_both_ways() {
    let (mut a, mut b) = pair();
    let hello = ipv4("100.64.0.2", "100.64.0.1", b"hello");
    a.send_ip(&hello);
    assert_eq!(a.wire.sent.len(), 1, "the first packet starts a handshake");
    settle(&mut [&mut a, &mut b]);
    assert_eq!(
        b.wire.tun,
        vec![hello],
        "the queued packet arrives after the handshake"
    );

    // b learned a's endpoint from the authenticated handshake and can answer.
    let reply = ipv4("100.64.0.1", "100.64.0.2", b"world");
    b.send_ip(&reply);
    settle(&mut [&mut a, &mut b]);
    assert_eq!(a.wire.tun, vec![reply]);
}

#[test]
fn inner_source_must_belong_to_the_sending_peer() {
    let (mut a, mut b) = pair();
    a.send_ip(&ipv4("100.64.0.2", "100.64.0.1", b"legit"));
    settle(&mut [&mut a, &mut b]);
    assert_eq!(b.wire.tun.len(), 1);

    a.send_ip(&ipv4("100.64.0.99", "100.64.0.1", b"spoofed"));
    settle(&mut [&mut a, &mut b]);
    assert_eq!(
        b.wire.tun.len(),
        1,
        "a spoofed source never reaches the TUN"
    );
    assert_eq!(b.dropped(DropReason::CryptokeyFilter), 1);
}

#[test]
fn a_more_specific_prefix_of_another_peer_wins_until_removed() {
    let (mut a, mut b) = pair();
    let a_pub = a.public;
    b.routes.clear();
    b.add_peer(A, a_pub, None, &["100.64.0.0/24"]);
    let probe = ipv4("100.64.0.99", "100.64.0.1", b"x");

    a.send_ip(&probe);
    settle(&mut [&mut a, &mut b]);
    assert_eq!(b.wire.tun.len(), 1, "a owns .99 through its /24");

    let other = Host::new("198.18.0.3:51820").public;
    b.add_peer(C, other, None, &["100.64.0.99/32"]);
    a.send_ip(&probe);
    settle(&mut [&mut a, &mut b]);
    assert_eq!(b.wire.tun.len(), 1, "the /32 of another peer wins");
    assert_eq!(b.dropped(DropReason::CryptokeyFilter), 1);

    b.remove_peer(C);
    a.send_ip(&probe);
    settle(&mut [&mut a, &mut b]);
    assert_eq!(b.wire.tun.len(), 2, "accepted again once that peer is gone");
}

#[test]
fn endpoint_follows_the_newest_authenticated_source() {
    let (mut a, mut b) = pair();
    let stats = b.add_peer(A, a.public, None, &["100.64.0.2/32"]);
    a.send_ip(&ipv4("100.64.0.2", "100.64.0.1", b"1"));
    settle(&mut [&mut a, &mut b]);
    assert_eq!(stats.endpoint(), Some(a.addr));

    a.addr = "198.18.7.7:40000".parse().expect("addr");
    a.send_ip(&ipv4("100.64.0.2", "100.64.0.1", b"2"));
    settle(&mut [&mut a, &mut b]);
    assert_eq!(stats.endpoint(), Some(a.addr), "the endpoint roamed");

    // A forged datagram from elsewhere does not move the endpoint.
    let mut forged = vec![4u8, 0, 0, 0];
    forged.extend_from_slice(&[0u8; 60]);
    b.receive("198.18.9.9:1".parse().expect("addr"), &forged);
    assert_eq!(stats.endpoint(), Some(a.addr));
}

#[test]
fn replies_leave_from_the_local_address_the_peer_wrote_to() {
    let (mut a, mut b) = pair();
    let (first, second): (IpAddr, IpAddr) = (
        "198.18.0.1".parse().expect("ip"),
        "198.18.0.11".parse().expect("ip"),
    );
    fn deliver_to_b(a: &mut Host, b: &mut Host, local: IpAddr) {
        for (_, datagram) in a.wire.sent.drain(..) {
            let from = Endpoint {
                remote: a.addr,
                local: Some(local),
            };
            b.node
                .handle_datagram(from, &datagram, &mut b.buf, Instant::now(), &mut b.wire);
        }
    }
    // a's initiation arrives at b's first address; the response leaves
    // from it.
    a.send_ip(&ipv4("100.64.0.2", "100.64.0.1", b"1"));
    deliver_to_b(&mut a, &mut b, first);
    assert_eq!(b.wire.sent_from, vec![Some(first)]);
    let (to, response) = b.wire.sent.remove(0);
    b.wire.sent_from.clear();
    assert_eq!(to, a.addr);
    a.receive(b.addr, &response);
    deliver_to_b(&mut a, &mut b, first);
    assert_eq!(b.wire.tun.len(), 1, "the queued packet arrived");

    // a now writes to b's second address: b's data follows.
    a.send_ip(&ipv4("100.64.0.2", "100.64.0.1", b"2"));
    deliver_to_b(&mut a, &mut b, second);
    b.send_ip(&ipv4("100.64.0.1", "100.64.0.2", b"3"));
    assert_eq!(b.wire.sent_from, vec![Some(second)]);

    // The second address is removed: the kernel chooses again.
    b.node.apply(Change::LocalAddressGone(second));
    b.send_ip(&ipv4("100.64.0.1", "100.64.0.2", b"4"));
    assert_eq!(b.wire.sent_from, vec![Some(second), None]);
    assert_eq!(b.wire.sent.len(), 2, "nothing was dropped");
}

#[test]
fn no_route_and_stale_handles_are_dropped_and_counted() {
    let (mut a, mut b) = pair();
    a.send_ip(&ipv4("100.64.0.2", "198.18.200.1", b"nowhere"));
    assert!(a.wire.sent.is_empty());
    assert_eq!(a.dropped(DropReason::NoRoute), 1);

    // A table entry whose generation no longer matches the peer in that slot.
    let stale = B + (7 << 32);
    a.routes = vec![("100.64.0.1/32".parse().expect("cidr"), stale)];
    a.publish();
    a.send_ip(&ipv4("100.64.0.2", "100.64.0.1", b"x"));
    assert!(a.wire.sent.is_empty());
    assert_eq!(a.dropped(DropReason::NoRoute), 2);
    settle(&mut [&mut a, &mut b]);
}

#[test]
fn low_order_peer_keys_never_cause_a_datagram() {
    let mut a = Host::new("198.18.0.2:51820");
    // The seven low-order points of Curve25519 that the kernel's selftest uses.
    let keys = [
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ]
    .map(|h| <[u8; 32]>::try_from(hex::decode(h).expect("hex")).expect("32 bytes"));
    for (i, key) in keys.into_iter().enumerate() {
        let handle = (i as u64 + 10) << 32 | (i as u64 + 10);
        a.add_peer(
            handle,
            key,
            Some("198.18.0.1:51820".parse().expect("addr")),
            &[],
        );
        a.node.apply(Change::SetKeepalive(handle, 1));
    }
    a.routes
        .push(("100.64.0.0/24".parse().expect("cidr"), 10 << 32 | 10));
    a.publish();
    a.send_ip(&ipv4("100.64.0.2", "100.64.0.1", b"x"));
    let later = Instant::now() + Duration::from_secs(30);
    a.node
        .handle_timers(later, SystemTime::now(), &mut a.buf, &mut a.wire);
    assert!(a.wire.sent.is_empty(), "sent {:?}", a.wire.sent.len());
}

#[test]
fn unknown_initiators_and_garbage_are_dropped() {
    let (mut a, _) = pair();
    let mut stranger = Host::new("198.18.0.9:1");
    stranger.add_peer(B, a.public, Some(a.addr), &["100.64.0.0/24"]);
    stranger.send_ip(&ipv4("100.64.0.9", "100.64.0.2", b"hi"));
    let (_, init) = stranger.wire.sent.pop().expect("an initiation");
    a.receive(stranger.addr, &init);
    assert!(a.wire.sent.is_empty());
    assert_eq!(a.dropped(DropReason::UnknownPeer), 1);

    for garbage in [
        &[][..],
        &[1, 0, 0, 0][..],
        &[4, 0, 0, 0, 1, 2, 3][..],
        &[9; 200][..],
    ] {
        a.receive(stranger.addr, garbage);
    }
    assert_eq!(a.dropped(DropReason::Malformed), 4);
    assert!(a.wire.sent.is_empty() && a.wire.tun.is_empty());
}

#[test]
fn persistent_keepalive_fires_when_idle() {
    let (mut a, mut b) = pair();
    a.send_ip(&ipv4("100.64.0.2", "100.64.0.1", b"up"));
    settle(&mut [&mut a, &mut b]);
    a.node.apply(Change::SetKeepalive(B, 5));
    let t = Instant::now() + Duration::from_secs(1);
    a.node
        .handle_timers(t, SystemTime::now(), &mut a.buf, &mut a.wire);
    assert_eq!(
        a.wire.sent.len(),
        1,
        "turning keepalive on sends one at once"
    );
    a.wire.sent.clear();
    let t2 = t + Duration::from_secs(2);
    a.node
        .handle_timers(t2, SystemTime::now(), &mut a.buf, &mut a.wire);
    assert!(a.wire.sent.is_empty(), "not again before the interval");
    let t3 = t + Duration::from_secs(6);
    a.node
        .handle_timers(t3, SystemTime::now(), &mut a.buf, &mut a.wire);
    assert_eq!(a.wire.sent.len(), 1, "again once idle for the interval");
    assert_eq!(
        a.wire.sent[0].1.len(),
        32,
        "a keepalive is an empty data message"
    );
}

proptest::proptest! {
    #[test]
    fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), kind in 0u8..6) {
        let (mut a, _) = pair();
        let mut bytes = bytes;
        if let Some(first) = bytes.first_mut() { *first = kind; }
        for b in bytes.iter_mut().skip(1).take(3) { *b = 0; }
        a.receive("198.18.0.1:51820".parse().expect("addr"), &bytes);
        a.send_ip(&bytes);
    }
}

#[test]
fn under_load_initiations_get_cookie_replies() {
    let (_a, mut b) = pair();
    // A stand-in that can force a fresh initiation each time, from a new
    // source address each time (many hosts, or spoofing): every one
    // carries a valid mac1 for b, and no source exceeds its own share.
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    b.add_peer(C, PublicKey::from(&secret).to_bytes(), None, &[]);
    let mut flooder = Tunn::new(secret, PublicKey::from(b.public), None, None, 9, None);
    let mut scratch = vec![0u8; BUF_SIZE];
    let mut cookies = 0;
    let mut responses = 0;
    for i in 0..400u16 {
        let TunnResult::WriteToNetwork(init) =
            flooder.format_handshake_initiation(&mut scratch, true)
        else {
            panic!("boringtun did not format an initiation");
        };
        let init = init.to_vec();
        let from: SocketAddr = format!("198.19.{}.{}:4000", i / 200, i % 200 + 1)
            .parse()
            .expect("address");
        b.receive(from, &init);
        for (to, reply) in b.wire.sent.drain(..) {
            assert_eq!(to, from, "replies go to the sender");
            match reply[0] {
                2 => responses += 1,
                3 => cookies += 1,
                other => panic!("unexpected message type {other}"),
            }
        }
    }
    assert!(responses > 0, "before the limit, initiations are answered");
    assert!(cookies > 0, "past the limit, b must demand a cookie");
    assert_eq!(responses + cookies, 400);
}

#[test]
fn a_flood_from_one_address_is_dropped_and_others_still_handshake() {
    let (mut a, mut b) = pair();
    let secret = StaticSecret::random_from_rng(rand_core::OsRng);
    b.add_peer(C, PublicKey::from(&secret).to_bytes(), None, &[]);
    let mut flooder = Tunn::new(secret, PublicKey::from(b.public), None, None, 9, None);
    let mut scratch = vec![0u8; BUF_SIZE];
    let attacker = "198.19.0.66";
    let start = Instant::now();
    for port in 0..400u16 {
        let TunnResult::WriteToNetwork(init) =
            flooder.format_handshake_initiation(&mut scratch, true)
        else {
            panic!("boringtun did not format an initiation");
        };
        let init = init.to_vec();
        let from: SocketAddr = format!("{attacker}:{}", 1024 + port)
            .parse()
            .expect("address");
        b.receive(from, &init);
    }
    // The first few are answered, the rest dropped without a reply, and
    // none of it puts b under load: nothing was a cookie.
    // The source's share: a burst of 5, then 20 a second while the loop ran.
    let share = 5 + (start.elapsed().as_secs_f64() * 20.0).ceil() as usize;
    let replies: Vec<u8> = b.wire.sent.drain(..).map(|(_, r)| r[0]).collect();
    assert!(
        !replies.is_empty() && replies.len() <= share,
        "at most {share} answered: {replies:?}"
    );
    assert!(
        replies.iter().all(|&t| t == 2),
        "responses, not cookies: {replies:?}"
    );
    assert_eq!(
        b.dropped(DropReason::RateLimited),
        400 - replies.len() as u64
    );

    // A real peer elsewhere handshakes at once, without a cookie round.
    let hello = ipv4("100.64.0.2", "100.64.0.1", b"hello");
    a.send_ip(&hello);
    settle(&mut [&mut a, &mut b]);
    assert_eq!(
        b.wire.tun,
        vec![hello],
        "a's handshake and packet got through"
    );
}

/// A TCP SYN from `src` to `dst` announcing MSS 1460.
fn syn(src: &str, dst: &str) -> Vec<u8> {
    let mut tcp = vec![0u8; 24];
    tcp[12] = 6 << 4; // data offset: 24 bytes
    tcp[13] = 0x02; // SYN
    tcp[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
    let mut p = ipv4(src, dst, &tcp);
    p[9] = 6;
    p
}

fn mss_of(packet: &[u8]) -> u16 {
    u16::from_be_bytes([packet[42], packet[43]])
}

/// A gateway (a) advertising 198.18.64.0/20 and a client (b) that sends it
/// everything.
fn gateway_and_client() -> (Host, Host) {
    let mut gw = Host::new("198.18.2.10:51820");
    let mut client = Host::new("198.18.1.2:51820");
    let (gw_pub, client_pub) = (gw.public, client.public);
    gw.add_peer(B, client_pub, None, &["100.64.0.2/32"]);
    gw.publish_scope(&["198.18.64.0/20"]);
    gw.node.apply(Change::SetLocalAddress(Some(
        "100.64.0.1".parse().expect("ip"),
    )));
    gw.node.apply(Change::SetAdvertised(
        vec!["198.18.64.0/20".parse().expect("cidr")],
        None,
    ));
    client.add_peer(A, gw_pub, Some(gw.addr), &["0.0.0.0/0"]);
    client.node.apply(Change::SetLocalAddress(Some(
        "100.64.0.2".parse().expect("ip"),
    )));
    (gw, client)
}

#[test]
fn peers_reach_only_the_tunnel_and_advertised_ranges() {
    let (mut gw, mut client) = gateway_and_client();
    client.send_ip(&ipv4("100.64.0.2", "198.18.64.5", b"db"));
    settle(&mut [&mut gw, &mut client]);
    assert_eq!(gw.wire.tun.len(), 1, "advertised range is forwarded");

    for outside in ["169.254.169.254", "198.19.101.10", "198.18.2.10"] {
        client.send_ip(&ipv4("100.64.0.2", outside, b"nope"));
        settle(&mut [&mut gw, &mut client]);
    }
    assert_eq!(
        gw.wire.tun.len(),
        1,
        "nothing outside the scope reaches the TUN"
    );
    assert_eq!(gw.dropped(DropReason::NotAdvertised), 3);

    // Withdrawing the range closes it at once, whatever the client still routes.
    gw.publish_scope(&[]);
    client.send_ip(&ipv4("100.64.0.2", "198.18.64.5", b"late"));
    settle(&mut [&mut gw, &mut client]);
    assert_eq!(gw.wire.tun.len(), 1);
    assert_eq!(gw.dropped(DropReason::NotAdvertised), 4);
}

#[test]
fn syn_mss_is_clamped_both_ways_when_enabled() {
    let (mut gw, mut client) = gateway_and_client();
    gw.node.apply(Change::SetMssClamp(1380, 1360));
    client.send_ip(&syn("100.64.0.2", "198.18.64.5"));
    settle(&mut [&mut gw, &mut client]);
    assert_eq!(
        mss_of(&gw.wire.tun[0]),
        1380,
        "inbound SYN clamped before the TUN"
    );

    // The gateway's outbound SYN-ACK direction: clamped before encryption.
    let mut reply = syn("198.18.64.5", "100.64.0.2");
    reply[33] = 0x12; // SYN+ACK
    gw.send_ip(&reply);
    settle(&mut [&mut gw, &mut client]);
    assert_eq!(mss_of(&client.wire.tun[0]), 1380);

    gw.node.apply(Change::SetMssClamp(0, 0));
    client.send_ip(&syn("100.64.0.2", "198.18.64.6"));
    settle(&mut [&mut gw, &mut client]);
    assert_eq!(mss_of(&gw.wire.tun[1]), 1460, "off leaves the SYN alone");
}

fn learned(host: &mut Host) -> Vec<Vec<String>> {
    learned_with_dns(host).into_iter().map(|(r, _)| r).collect()
}

/// Each report: the routes, and the DNS offer's servers and zones.
type Learned = (Vec<String>, Option<(Vec<String>, Vec<String>)>);

fn learned_with_dns(host: &mut Host) -> Vec<Learned> {
    host.node
        .drain_events()
        .filter_map(|event| match event {
            Event::RoutesLearned { routes, dns, .. } => Some((routes, dns)),
            Event::RoutesHeard { .. } => None,
        })
        .map(|(routes, dns)| {
            let dns = dns.map(|d| {
                (
                    d.servers().map(|s| s.to_string()).collect(),
                    d.zones().map(str::to_string).collect(),
                )
            });
            (routes.iter().map(ToString::to_string).collect(), dns)
        })
        .collect()
}

fn tick(host: &mut Host, at: Instant) {
    host.node
        .handle_timers(at, SystemTime::now(), &mut host.buf, &mut host.wire);
}

#[test]
fn a_trusting_client_learns_and_relearns_advertised_routes() {
    let (mut gw, mut client) = gateway_and_client();
    client.node.apply(Change::SetRouteSource(
        A,
        Some("100.64.0.1".parse().expect("ip")),
    ));
    let t0 = Instant::now();
    tick(&mut client, t0);
    settle(&mut [&mut gw, &mut client]);
    assert_eq!(
        learned(&mut client),
        vec![vec!["198.18.64.0/20".to_string()]]
    );

    // The same set again is not reported twice.
    tick(&mut client, t0 + routes_msg::POLL_INTERVAL);
    settle(&mut [&mut gw, &mut client]);
    assert!(learned(&mut client).is_empty());

    gw.node.apply(Change::SetAdvertised(
        vec![
            "198.18.64.0/20".parse().expect("cidr"),
            "198.19.101.0/24".parse().expect("cidr"),
        ],
        None,
    ));
    tick(&mut client, t0 + routes_msg::POLL_INTERVAL * 2);
    settle(&mut [&mut gw, &mut client]);
    assert_eq!(
        learned(&mut client),
        vec![vec![
            "198.18.64.0/20".to_string(),
            "198.19.101.0/24".to_string()
        ]]
    );

    // A DNS offer is news even when the routes are not.
    let offer = routes_msg::DnsOffer::new(&["100.64.0.1".parse().expect("ip")], &["mongodb.net"])
        .expect("valid");
    gw.node.apply(Change::SetAdvertised(
        vec![
            "198.18.64.0/20".parse().expect("cidr"),
            "198.19.101.0/24".parse().expect("cidr"),
        ],
        Some(Box::new(offer)),
    ));
    tick(&mut client, t0 + routes_msg::POLL_INTERVAL * 3);
    settle(&mut [&mut gw, &mut client]);
    assert_eq!(
        learned_with_dns(&mut client),
        vec![(
            vec!["198.18.64.0/20".to_string(), "198.19.101.0/24".to_string()],
            Some((
                vec!["100.64.0.1".to_string()],
                vec!["mongodb.net".to_string()]
            ))
        )]
    );
    assert!(
        gw.wire.tun.is_empty() && client.wire.tun.is_empty(),
        "route messages never reach a TUN"
    );
}

#[test]
fn routes_from_an_untrusted_peer_are_ignored() {
    let (mut gw, mut client) = gateway_and_client();
    // The gateway's side sends an advertisement the client never asked for.
    let mut msg = vec![0u8; routes_msg::MAX_PACKET];
    let n = routes_msg::build_routes(
        "100.64.0.1".parse().expect("ip"),
        "100.64.0.2".parse().expect("ip"),
        9,
        &["0.0.0.0/0".parse().expect("cidr")],
        None,
        routes_msg::DEFAULT_PRIORITY,
        &mut msg,
    )
    .expect("fits");
    gw.routes.push(("100.64.0.2/32".parse().expect("cidr"), B));
    gw.publish_scope(&[]);
    gw.send_ip(&msg[..n]);
    settle(&mut [&mut gw, &mut client]);
    assert!(
        learned(&mut client).is_empty(),
        "a peer without --accept-routes is not listened to"
    );
    assert!(client.wire.tun.is_empty());
}

#[test]
fn handshake_time_is_reported_without_waiting_for_a_tick() {
    let mut a = Host::new("198.18.0.2:51820");
    let mut b = Host::new("198.18.0.1:51820");
    let (a_pub, b_pub) = (a.public, b.public);
    let a_sees_b = a.add_peer(B, b_pub, Some(b.addr), &["100.64.0.1/32"]);
    let b_sees_a = b.add_peer(A, a_pub, None, &["100.64.0.2/32"]);
    let t0 = Instant::now();
    tick(&mut a, t0);
    tick(&mut b, t0);
    assert_eq!(a_sees_b.last_handshake(), None);

    a.send_ip(&ipv4("100.64.0.2", "100.64.0.1", b"hello"));
    settle(&mut [&mut a, &mut b]);
    let recent = |t: Option<SystemTime>| {
        t.and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < Duration::from_secs(5))
    };
    assert!(
        recent(a_sees_b.last_handshake()),
        "initiator: {:?}",
        a_sees_b.last_handshake()
    );
    assert!(
        recent(b_sees_a.last_handshake()),
        "responder: {:?}",
        b_sees_a.last_handshake()
    );
}

#[test]
fn a_tun_packet_whose_lengths_disagree_is_dropped_as_malformed() {
    let (mut a, mut b) = pair();
    a.send_ip(&ipv4("100.64.0.2", "100.64.0.1", b"first"));
    settle(&mut [&mut a, &mut b]);
    assert_eq!(b.wire.tun.len(), 1);

    // Total length past the bytes read, and a header length under 20.
    let mut long = ipv4("100.64.0.2", "100.64.0.1", b"cut short");
    long[2..4].copy_from_slice(&200u16.to_be_bytes());
    let mut ihl = ipv4("100.64.0.2", "100.64.0.1", b"bad ihl");
    ihl[0] = 0x44;
    for bad in [long, ihl] {
        a.send_ip(&bad);
    }
    settle(&mut [&mut a, &mut b]);
    assert_eq!(a.dropped(DropReason::Malformed), 2);
    assert_eq!(b.wire.tun.len(), 1, "neither was sent");

    // Bytes after the packet are not part of it.
    let good = ipv4("100.64.0.2", "100.64.0.1", b"trailer");
    let mut trailing = good.clone();
    trailing.extend_from_slice(&[0xee; 5]);
    a.send_ip(&trailing);
    settle(&mut [&mut a, &mut b]);
    assert_eq!(b.wire.tun.last(), Some(&good));
}
