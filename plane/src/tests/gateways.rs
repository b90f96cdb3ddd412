//! Gateways and their clients: a gateway's health checks and drain, and
//! which of two gateways carries a range on a client.

use super::*;

fn advertise(engine: &mut TestEngine, routes: &[&str], checks: &[&str]) -> Result<(), String> {
    block_on(engine.handle(Intent::Advertise {
        routes: strings(routes),
        exit_node: false,
        checks: strings(checks),
    }))
    .map(|_| ())
    .map_err(|e| e.message)
}

fn probed(engine: &mut TestEngine, check: &str, ok: bool, at: std::time::Instant) {
    block_on(engine.handle(Intent::CheckResult {
        check: check.parse().expect("check"),
        ok,
        detail: if ok { "connected" } else { "timed out" }.into(),
        at,
    }))
    .expect("background intents are not refused");
}

const VPC: &str = "198.18.64.0/20";
const DB: &str = "198.19.101.0/24";
const DB_CHECK: &str = "tcp:198.19.101.10:5432";

#[test]
fn a_checked_range_is_offered_only_while_its_check_passes() {
    let machine = Machine::boot(FakeStore::default());
    let mut engine = machine.start();
    let offered = || -> Vec<String> {
        let thread = machine.datapath.0.borrow();
        thread.offered.iter().map(ToString::to_string).collect()
    };
    let err = advertise(&mut engine, &[VPC], &[DB_CHECK]).expect_err("outside");
    assert!(err.contains("in no advertised range"), "{err}");
    let err = advertise(&mut engine, &[VPC, DB], &["tcp:198.19.101.10"]).expect_err("form");
    assert!(err.contains("tcp:IP:PORT"), "{err}");
    assert!(
        offered().is_empty(),
        "a refused advertisement changed nothing"
    );
    advertise(&mut engine, &[VPC, DB], &[DB_CHECK]).expect("valid");
    assert_eq!(
        machine
            .store
            .0
            .borrow()
            .files
            .settings
            .as_ref()
            .map(|s| s.checks.len()),
        Some(1),
        "the check is saved with the ranges"
    );
    assert_eq!(offered(), strings(&[VPC]), "unproven: held back");
    let t0 = std::time::Instant::now();
    let s = |n: u64| t0 + std::time::Duration::from_secs(n);
    probed(&mut engine, DB_CHECK, true, s(0));
    assert_eq!(offered(), strings(&[VPC, DB]));
    probed(&mut engine, DB_CHECK, false, s(1));
    assert_eq!(offered(), strings(&[VPC, DB]), "one failure is not enough");
    probed(&mut engine, DB_CHECK, false, s(2));
    assert_eq!(offered(), strings(&[VPC]), "withdrawn after two");
    // Forwarding and SNAT keep the range: a client yet to move still gets
    // through, as far as the path allows.
    let desired = engine.desired();
    assert!(desired.forward_scope().contains(&DB.parse().expect("cidr")));
    assert!(desired.nat().ranges.contains(&DB.parse().expect("cidr")));
    let status = crate::view::status(
        desired,
        |_| Default::default(),
        crate::view::HostFacts {
            listen_port: 0,
            warnings: Vec::new(),
            snat_form: None,
            drops: Vec::new(),
            dns: None,
            link_dns_applied: true,
            link_dns_problem: None,
            now: s(5),
        },
    );
    assert_eq!(status.advertising, strings(&[VPC]));
    let check = &status.checks[0];
    assert_eq!(
        (check.state.as_str(), check.for_secs, check.last.as_deref()),
        ("unhealthy", Some(3), Some("timed out"))
    );
    assert_eq!(check.governs, strings(&[DB]));
    for n in 3..6 {
        probed(&mut engine, DB_CHECK, true, s(n));
    }
    assert_eq!(offered(), strings(&[VPC, DB]), "back after three");
    // Advertising again without the check drops it: always offered.
    advertise(&mut engine, &[VPC, DB], &[]).expect("valid");
    probed(&mut engine, DB_CHECK, false, s(6));
    probed(&mut engine, DB_CHECK, false, s(7));
    assert_eq!(offered(), strings(&[VPC, DB]));
    assert!(engine.desired().health.states().next().is_none());
}

#[test]
fn drain_offers_nothing_keeps_forwarding_and_survives_a_restart() {
    let machine = Machine::boot(FakeStore::default());
    let mut engine = machine.start();
    let offered = || machine.datapath.0.borrow().offered.len();
    advertise(&mut engine, &[VPC, DB], &[]).expect("valid");
    assert_eq!(offered(), 2);
    block_on(engine.handle(Intent::Drain(true))).expect("drain");
    assert_eq!(offered(), 0);
    assert!(engine
        .desired()
        .forward_scope()
        .contains(&DB.parse().expect("cidr")));
    // A new advertised set while draining is saved but not offered.
    advertise(&mut engine, &[VPC], &[]).expect("valid");
    assert_eq!(offered(), 0);
    drop(engine);
    let machine = Machine::boot(machine.store.clone());
    let mut engine = machine.start();
    assert!(
        engine.desired().settings.draining,
        "drain survives a restart"
    );
    assert_eq!(machine.datapath.0.borrow().offered.len(), 0);
    block_on(engine.handle(Intent::Drain(false))).expect("drain off");
    assert_eq!(machine.datapath.0.borrow().offered.len(), 1);
}

#[test]
fn a_range_two_gateways_offer_is_carried_by_one_and_moves_when_it_falls_silent() {
    let machine = Machine::boot(FakeStore::default());
    let (mut engine, [a, b]) = client_with_gateways(&machine);
    let t0 = std::time::Instant::now();
    let ms = |n: u64| t0 + std::time::Duration::from_millis(n);
    let db: IpNet = "198.19.101.0/24".parse().expect("cidr");
    let host: std::net::IpAddr = "198.19.101.5".parse().expect("ip");
    let via = || {
        machine
            .datapath
            .0
            .borrow()
            .table
            .as_ref()
            .and_then(|t| t.lookup(host))
    };
    let offer = |engine: &mut TestEngine, peer, priority, at| {
        block_on(engine.handle(Intent::RoutesOffered {
            peer,
            routes: vec![db],
            dns: None,
            local: Vec::new(),
            priority,
            at,
        }))
        .expect("background intents are not refused");
    };
    let heard = |engine: &mut TestEngine, peer, priority, at| {
        block_on(engine.handle(Intent::RoutesHeard { peer, priority, at }))
            .expect("background intents are not refused");
    };
    let tick = |engine: &mut TestEngine, at| {
        block_on(engine.handle(Intent::FailoverTick(at))).expect("tick");
    };
    offer(&mut engine, a, 100, ms(0));
    offer(&mut engine, b, 100, ms(100));
    assert_eq!(via(), Some(a), "the first to offer it carries it");
    assert_eq!(
        machine
            .links
            .0
            .borrow()
            .routes
            .iter()
            .filter(|r| **r == db)
            .count(),
        1
    );
    let carried = |engine: &TestEngine, p| {
        engine
            .desired()
            .device
            .peer_by_handle(p)
            .map(|p| p.learned.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        (carried(&engine, a), carried(&engine, b)),
        (vec![db], vec![])
    );
    // a falls silent after 0 ms; b goes on answering. At 2.5 s, b has it.
    heard(&mut engine, b, 100, ms(1100));
    heard(&mut engine, b, 100, ms(2100));
    tick(&mut engine, ms(2499));
    assert_eq!(via(), Some(a));
    tick(&mut engine, ms(2500));
    assert_eq!(via(), Some(b), "moved off the silent gateway");
    assert_eq!(
        (carried(&engine, a), carried(&engine, b)),
        (vec![], vec![db])
    );
    // a is back, preferred: only after its 10 s hold-down.
    for t in (3000..13_000).step_by(1000) {
        heard(&mut engine, a, 50, ms(t));
        heard(&mut engine, b, 100, ms(t + 100));
        assert_eq!(via(), Some(b), "at {t} ms");
    }
    assert_eq!(
        engine.desired().choice.next_deadline(ms(12_100)),
        Some(ms(13_000))
    );
    tick(&mut engine, ms(13_000));
    assert_eq!(via(), Some(a), "failback after the hold-down");
    // a is removed: b carries it at once.
    block_on(engine.handle(Intent::PeerRemove {
        name: "gw-a".into(),
    }))
    .expect("removed");
    assert_eq!(via(), Some(b));
    assert_eq!(engine.desired().choice.failovers(), 2);
}

#[test]
fn an_identity_makes_a_second_gateway_the_first_ones_twin() {
    use crate::identity::Identity;
    let first = Machine::boot(FakeStore::default());
    first.store.0.borrow_mut().files.key = Some(Key([3; 32]));
    let mut gw1 = first.start();
    advertise(&mut gw1, &[VPC, DB], &[DB_CHECK]).expect("advertise");
    block_on(gw1.handle(Intent::PeerAdd(NewPeer {
        request: PeerAdd {
            name: "laptop".into(),
            public_key: Some(b64(&[7; 32])),
            allowed_ips: vec!["100.64.0.5/32".into()],
            ..PeerAdd::default()
        },
        endpoint: None,
        generated_key: None,
    })))
    .expect("peer");
    let text = Identity::of(gw1.desired())
        .expect("it has a key")
        .to_text()
        .expect("written");

    let second = Machine::boot(FakeStore::default());
    second.store.0.borrow_mut().files.settings = Some({
        let mut own = initial_settings();
        own.listen_port = 51821;
        own
    });
    let mut gw2 = second.start();
    block_on(gw2.handle(Intent::Drain(true))).expect("drain");
    let before = (second.calls(), gw2.desired().clone());
    // Documents that are not whole and sound change nothing.
    let refused = [
        text.replace("vpcgate-identity/1", "vpcgate-identity/9"),
        {
            let mut keyless = Identity::parse(&text).expect("parsed");
            keyless.private_key = "not-a-key".into();
            keyless.to_text().expect("written")
        },
        text.replace("198.19.101.0/24", "198.19.102.0/24"),
        text.replace("\"format\"", "\"surprise\": 1, \"format\""),
        text[..text.len() / 2].to_string(),
    ];
    for (i, bad) in refused.into_iter().enumerate() {
        let outcome = Identity::parse(&bad).and_then(|identity| {
            block_on(gw2.handle(Intent::ImportIdentity(Box::new(identity))))
                .map(|_| ())
                .map_err(|e| e.message)
        });
        let err = outcome.expect_err(&format!("document {i} refused"));
        assert!(!err.is_empty());
    }
    assert!(
        (second.calls(), gw2.desired().clone()) == before,
        "a refused identity changed something"
    );

    let identity = Identity::parse(&text).expect("parsed");
    block_on(gw2.handle(Intent::ImportIdentity(Box::new(identity)))).expect("imported");
    let (one, two) = (gw1.desired(), gw2.desired());
    assert_eq!(two.device.public_key(), one.device.public_key());
    assert_eq!(
        two.settings.advertised_routes,
        one.settings.advertised_routes
    );
    assert_eq!(two.settings.checks, one.settings.checks);
    assert_eq!(two.settings.addresses, one.settings.addresses);
    let peers: Vec<_> = two
        .device
        .peers
        .iter()
        .map(|p| (p.name.clone(), p.public_key.0, p.allowed_ips.clone()))
        .collect();
    assert_eq!(
        peers,
        vec![(
            Some("laptop".to_string()),
            [7; 32],
            vec!["100.64.0.5/32".parse::<IpNet>().expect("cidr")]
        )]
    );
    assert_eq!(two.settings.listen_port, 51821, "the port stays its own");
    assert!(two.settings.draining, "and so does the drain");
    // Saved: a restart is the twin too.
    let gw2 = second.start();
    assert_eq!(gw2.desired().device.public_key(), one.device.public_key());
    assert_eq!(gw2.desired().device.peers.len(), 1);
}
