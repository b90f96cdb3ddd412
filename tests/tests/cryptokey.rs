//! Cryptokey routing on vpcgated's receive side: a decrypted packet reaches
//! the TUN only if the longest-prefix match of its source address over all
//! peers' allowed-ips is the peer that sent it.
//!
//! Peer A (wireguard-go) owns 100.64.0.2 and also holds 100.64.0.99 on its
//! interface, from which it sends pings that vpcgated must drop or accept as
//! its configuration changes. "Reached the TUN" is measured by rx_packets of
//! vpcgated's TUN, which counts what the daemon writes into it.

use std::thread;
use std::time::Duration;

use vpcgate_e2e::{
    gen_keypair, ping_stats, require_root, wait_for_ping, wait_until, Impl, Node, Pair, PairSpec,
    TUNNEL_PREFIX4,
};

const SPOOF: &str = "100.64.0.99";
const PINGS: u32 = 5;

struct Probe {
    received: u32,
    tun_rx: u64,
}

/// Sends `PINGS` pings from A (optionally from `src`) to vpcgated and
/// reports replies and how many packets reached the receiver's TUN. Also checks
/// that A really encrypted and sent them, so "nothing arrived" cannot pass
/// because nothing was sent.
fn probe(gw: &Node, a: &Node, src: Option<&str>) -> Probe {
    let extra: Vec<&str> = src.map(|s| vec!["-I", s]).unwrap_or_default();
    let tun0 = gw.dev.stats().expect("vpcgated TUN counters");
    let a0 = a.dev.stats().expect("A's counters");
    let sent0 = a
        .dev
        .peer(&gw.public_key)
        .expect("A lists vpcgated")
        .tx_bytes;
    let stats = ping_stats(&a.ns, &gw.t4(), PINGS, &extra).expect("ping runs");
    assert_eq!(stats.transmitted, PINGS);
    let (mut a1, mut sent1) = (a0, sent0);
    wait_until(
        Duration::from_secs(10),
        "A to encrypt and send the pings",
        || {
            a1 = a.dev.stats()?;
            sent1 = a.dev.peer(&gw.public_key)?.tx_bytes;
            Ok(a1.tx_packets >= a0.tx_packets + u64::from(PINGS) && sent1 > sent0)
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "A did not send the pings into the tunnel (tun tx {} -> {}, peer tx bytes \
             {sent0} -> {sent1}): {e:#}",
            a0.tx_packets, a1.tx_packets
        )
    });
    // A packet that got through would reach the TUN right after decryption;
    // this window comes on top of ping's own 1 s wait for a reply.
    thread::sleep(Duration::from_millis(300));
    let tun1 = gw.dev.stats().expect("vpcgated TUN counters");
    Probe {
        received: stats.received,
        tun_rx: tun1.rx_packets - tun0.rx_packets,
    }
}

fn assert_accepted(gw: &Node, a: &Node, src: Option<&str>, step: &str) {
    wait_for_ping(
        &a.ns,
        &gw.t4(),
        &src.map(|s| vec!["-I", s]).unwrap_or_default(),
        Duration::from_secs(10),
    )
    .unwrap_or_else(|e| panic!("{step}: pings should get through: {e:#}"));
    let p = probe(gw, a, src);
    assert_eq!(p.received, PINGS, "{step}: all pings should be answered");
    assert!(
        p.tun_rx >= u64::from(PINGS),
        "{step}: the receiver's TUN rx_packets grew by {} for {PINGS} accepted pings",
        p.tun_rx
    );
}

fn assert_dropped(gw: &Node, a: &Node, src: &str, step: &str) {
    let p = probe(gw, a, Some(src));
    assert_eq!(p.received, 0, "{step}: pings from {src} were answered");
    assert_eq!(
        p.tun_rx, 0,
        "{step}: {} packets from {src} reached the receiver's TUN; they must be dropped",
        p.tun_rx
    );
}

#[test]
fn source_address_must_match_sending_peer() {
    scenario(Impl::Vpcgated);
}

/// The same checks against wireguard-go as the receiver, which implements
/// the rule: proves the scenario's expectations are those of WireGuard.
#[test]
fn reference_wireguard_go_receiver() {
    scenario(Impl::WireguardGo);
}

fn scenario(receiver: Impl) {
    require_root();
    let pair = Pair::new(PairSpec::new(receiver, Impl::WireguardGo))
        .expect("set up vpcgated and wireguard-go namespaces");
    let (gw, a) = (&pair.a, &pair.b);
    a.dev
        .add_addr(&format!("{SPOOF}/32"))
        .expect("extra address on A's interface");
    assert_eq!(
        gw.dev.peer(&a.public_key).expect("A listed").allowed_ips,
        ["100.64.0.2/32"]
    );

    // Legit pings move the counter, so a counter that stays put means
    // something below.
    assert_accepted(gw, a, None, "legit source 100.64.0.2");

    assert_dropped(gw, a, SPOOF, "A allowed 100.64.0.2/32 only");

    gw.dev
        .set_peer(&a.public_key, &[TUNNEL_PREFIX4], None)
        .expect("widen A's allowed-ips");
    assert_eq!(
        gw.dev.peer(&a.public_key).expect("A listed").allowed_ips,
        [TUNNEL_PREFIX4],
        "wg set allowed-ips replaces the list"
    );
    assert_accepted(gw, a, Some(SPOOF), "A allowed 100.64.0.0/24");

    let b = gen_keypair().expect("key for peer B");
    gw.dev
        .set_peer(&b.public, &[&format!("{SPOOF}/32")], None)
        .expect("add peer B owning the /32");
    assert_dropped(gw, a, SPOOF, "B owns 100.64.0.99/32");
    assert_accepted(gw, a, None, "legit source while B exists");

    gw.dev.remove_peer(&b.public).expect("remove peer B");
    assert!(
        gw.dev.dump().expect("dump").peer(&b.public).is_none(),
        "peer B still listed after `wg set ... peer B remove`"
    );
    assert_accepted(gw, a, Some(SPOOF), "B removed");
}
