//! The control plane against a reference model, over the fakes: random
//! sequences of intents from every source, with injected port failures and
//! crashes followed by a restart from the fake store.
//!
//! After every step:
//! - a refused intent changed nothing in memory;
//! - whatever was acknowledged is in the store (a request's answer, or a
//!   background change that was applied);
//! - a pass over a converged state asks no port for anything;
//! - no published routing table names a peer the data path lacks.
//!
//! Once faults stop, retries converge and every port holds what the
//! desired state projects. After a crash, the restart holds everything
//! acknowledged, and each file is either what was acknowledged or what the
//! request in flight would have written.

use futures::executor::block_on;
use ipnet::IpNet;
use proptest::prelude::*;
use vpcgate_node::RouteTable;
use vpcgate_proto::{PeerAdd, SetOptions};

use crate::device::{AllowedIpChange, PeerChange, SetRequest};
use crate::fakes::{FakeDatapath, FakeLinks, FakeNat, FakeResolver, FakeStore, Files};
use crate::intent::{plan, Intent, NewPeer};
use crate::key::{b64, Key};
use crate::model::{Desired, LinkState, Persisted};
use crate::reconcile::{Applied, Engine, Ports};
use crate::settings::Settings;

mod gateways;

type TestEngine = Engine<FakeStore, FakeNat, FakeLinks, FakeDatapath, FakeResolver>;

/// The machine: its disk survives a crash, the kernel's state does not.
struct Machine {
    store: FakeStore,
    nat: FakeNat,
    links: FakeLinks,
    datapath: FakeDatapath,
    resolver: FakeResolver,
}

impl Machine {
    fn boot(store: FakeStore) -> Machine {
        let datapath = FakeDatapath::default();
        // Another program holds this port.
        datapath.0.borrow_mut().taken.insert(TAKEN_PORT);
        Machine {
            store,
            nat: FakeNat::default(),
            links: FakeLinks::default(),
            datapath,
            resolver: FakeResolver::default(),
        }
    }

    fn ports(&self) -> Ports<FakeStore, FakeNat, FakeLinks, FakeDatapath, FakeResolver> {
        Ports {
            store: self.store.clone(),
            nat: self.nat.clone(),
            links: self.links.clone(),
            datapath: self.datapath.clone(),
            resolver: self.resolver.clone(),
        }
    }

    fn calls(&self) -> (u32, u32, u32, u32, u32) {
        (
            self.store.0.borrow().writes,
            self.nat.0.borrow().calls,
            self.links.0.borrow().calls,
            self.datapath.0.borrow().calls,
            self.resolver.0.borrow().calls,
        )
    }

    /// Starts the daemon from what the disk holds, as vpcgated does.
    fn start(&self) -> TestEngine {
        let files = self.store.0.borrow().files.clone();
        let settings = files.settings.clone().unwrap_or_else(initial_settings);
        let desired = Desired::restore("vpcgate0", files.key.clone(), settings, &files.peers)
            .expect("the store holds only what the engine wrote");
        let asked = desired.settings.listen_port;
        let bound = if asked == 0 { 40_000 } else { asked };
        self.datapath.0.borrow_mut().port = Some(bound);
        let applied = Applied::at_start(&desired, true, true, (asked, bound));
        let mut engine = Engine::new(desired, self.ports(), applied);
        block_on(engine.start()).expect("start");
        engine
    }
}

const TAKEN_PORT: u16 = 51999;

fn initial_settings() -> Settings {
    Settings::new(vec!["100.64.0.1/24".parse().expect("cidr")], 51820)
}

fn files_of(persisted: &Persisted, before: &Files) -> Files {
    Files {
        // A cleared key is not saved.
        key: persisted.key.clone().or_else(|| before.key.clone()),
        settings: Some(persisted.settings.clone()),
        peers: persisted.peers.clone(),
    }
}

fn same_files(a: &Files, b: &Files) -> bool {
    a.key == b.key && a.settings == b.settings && a.peers == b.peers
}

#[derive(Debug, Clone)]
enum Op {
    /// An intent; `peer` picks a current peer for intents that name one.
    Intent(Gen, usize),
    /// The next `n` operations of a port fail.
    Fault(PortKind, u32),
    /// The machine goes down after `n` more writes; the next intent runs
    /// into it, and the daemon starts again.
    Crash(u32),
    /// The retry timer fires.
    Retry,
}

#[derive(Debug, Clone, Copy)]
enum PortKind {
    Store,
    Nat,
    Links,
    Bind,
    Resolver,
}

/// A peer section of a UAPI set: key byte, remove, allowed IPs (index into
/// [`NETS`], remove).
type GenPeer = (u8, bool, Vec<(usize, bool)>);

/// An intent, before it is bound to the current peers.
#[derive(Debug, Clone)]
enum Gen {
    UapiSet {
        key: Option<u8>,
        port: Option<u16>,
        replace: bool,
        peers: Vec<GenPeer>,
    },
    /// Ranges, and whether a check on the database host comes with them.
    Advertise(Vec<usize>, bool),
    Drain(bool),
    /// A probe of that check passed or failed.
    CheckResult(bool),
    Set {
        snat: Option<bool>,
        mtu: Option<u32>,
        port: Option<u16>,
        address: Option<usize>,
    },
    PeerAdd {
        name: usize,
        key: u8,
        generated: bool,
        accept_routes: bool,
    },
    PeerRemove(usize),
    /// Routes, and a DNS offer: whether it names the peer's own address
    /// (else one it does not own), and whether it names zones.
    RoutesOffered(Vec<usize>, Option<(bool, bool)>),
    LinkObserved {
        networks: Vec<usize>,
        mtu: u32,
    },
    /// The forwarder answers on the first tunnel address, or nowhere.
    DnsObserved(bool),
    Reload {
        mss_clamp: bool,
        drop_first: bool,
    },
}

const NETS: [&str; 6] = [
    "198.18.64.0/20",
    "198.19.101.0/24",
    "100.64.0.9/32",
    "fd00:64::/64",
    "100.64.0.0/16",
    "0.0.0.0/0",
];
/// A check on a host in `NETS[1]`.
const CHECK: &str = "tcp:198.19.101.10:5432";
const ADDRESSES: [&str; 3] = ["100.64.0.1/24", "100.65.0.1/24", "100.64.0.0/24"];
const NAMES: [&str; 3] = ["laptop", "phone", "gw-b"];

fn net(i: usize) -> IpNet {
    NETS[i % NETS.len()].parse().expect("cidr")
}

fn gen() -> impl Strategy<Value = Gen> {
    let nets = || prop::collection::vec(0..NETS.len(), 0..3);
    prop_oneof![
        (
            prop::option::of(1u8..4),
            prop::option::of(prop_oneof![
                Just(51820u16),
                Just(51821),
                Just(0),
                Just(TAKEN_PORT)
            ]),
            any::<bool>(),
            prop::collection::vec(
                (
                    2u8..7,
                    any::<bool>(),
                    prop::collection::vec((0..NETS.len(), any::<bool>()), 0..3)
                ),
                0..3
            ),
        )
            .prop_map(|(key, port, replace, peers)| Gen::UapiSet {
                key,
                port,
                replace,
                peers
            }),
        (nets(), any::<bool>()).prop_map(|(nets, checked)| Gen::Advertise(nets, checked)),
        any::<bool>().prop_map(Gen::Drain),
        any::<bool>().prop_map(Gen::CheckResult),
        (
            prop::option::of(any::<bool>()),
            prop::option::of(prop_oneof![Just(1000u32), Just(1280), Just(1420)]),
            prop::option::of(prop_oneof![Just(51820u16), Just(51822), Just(TAKEN_PORT)]),
            prop::option::of(0..ADDRESSES.len()),
        )
            .prop_map(|(snat, mtu, port, address)| Gen::Set {
                snat,
                mtu,
                port,
                address
            }),
        (0..NAMES.len(), 2u8..7, any::<bool>(), any::<bool>()).prop_map(
            |(name, key, generated, accept_routes)| Gen::PeerAdd {
                name,
                key,
                generated,
                accept_routes
            }
        ),
        (0..NAMES.len()).prop_map(Gen::PeerRemove),
        (nets(), proptest::option::of((any::<bool>(), any::<bool>())))
            .prop_map(|(nets, dns)| Gen::RoutesOffered(nets, dns)),
        (nets(), prop_oneof![Just(1420u32), Just(1380)])
            .prop_map(|(networks, mtu)| Gen::LinkObserved { networks, mtu }),
        any::<bool>().prop_map(Gen::DnsObserved),
        (any::<bool>(), any::<bool>()).prop_map(|(mss_clamp, drop_first)| Gen::Reload {
            mss_clamp,
            drop_first
        }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (gen(), any::<usize>()).prop_map(|(g, p)| Op::Intent(g, p)),
        2 => (
            prop_oneof![
                Just(PortKind::Store),
                Just(PortKind::Nat),
                Just(PortKind::Links),
                Just(PortKind::Bind),
                Just(PortKind::Resolver)
            ],
            1u32..3
        )
            .prop_map(|(k, n)| Op::Fault(k, n)),
        1 => (0u32..3).prop_map(Op::Crash),
        1 => Just(Op::Retry),
    ]
}

fn bind(gen: Gen, pick: usize, desired: &Desired, files: &Files) -> Intent {
    let key = |b: u8| Key([b; 32]);
    match gen {
        Gen::UapiSet {
            key: private,
            port,
            replace,
            peers,
        } => Intent::UapiSet(SetRequest {
            private_key: private.map(|b| Some(key(b))),
            listen_port: port,
            fwmark: None,
            replace_peers: replace,
            peers: peers
                .into_iter()
                .map(|(k, remove, ips)| PeerChange {
                    remove,
                    allowed_ips: ips
                        .into_iter()
                        .map(|(i, remove)| AllowedIpChange {
                            net: net(i).trunc(),
                            remove,
                        })
                        .collect(),
                    ..PeerChange::new(key(k))
                })
                .collect(),
        }),
        Gen::Advertise(nets, checked) => Intent::Advertise {
            routes: nets.into_iter().map(|i| NETS[i].to_string()).collect(),
            exit_node: false,
            checks: match checked {
                true => vec![CHECK.to_string()],
                false => Vec::new(),
            },
        },
        Gen::Drain(on) => Intent::Drain(on),
        Gen::CheckResult(ok) => Intent::CheckResult {
            check: CHECK.parse().expect("check"),
            ok,
            detail: "probed".into(),
            at: std::time::Instant::now(),
        },
        Gen::Set {
            snat,
            mtu,
            port,
            address,
        } => Intent::Set(SetOptions {
            snat,
            mtu,
            listen_port: port,
            address: address.map(|i| vec![ADDRESSES[i].to_string()]),
            public_endpoint: Some("gw.example:51820".into()),
            ..SetOptions::default()
        }),
        Gen::PeerAdd {
            name,
            key: k,
            generated,
            accept_routes,
        } => Intent::PeerAdd(NewPeer {
            request: PeerAdd {
                name: NAMES[name].to_string(),
                public_key: (!generated).then(|| b64(&[k; 32])),
                accept_routes,
                ..PeerAdd::default()
            },
            endpoint: None,
            generated_key: generated.then(|| key(k + 100)),
        }),
        Gen::PeerRemove(name) => Intent::PeerRemove {
            name: NAMES[name].to_string(),
        },
        Gen::RoutesOffered(nets, dns) => {
            let peers = &desired.device.peers;
            // A stale handle when there is no peer: the intent must be
            // ignored.
            let chosen = peers.get(pick % peers.len().max(1));
            let peer = chosen.map_or(u64::MAX, |p| p.handle);
            let dns = dns.and_then(|(own, zones)| {
                let server = match own {
                    true => chosen?.allowed_ips.first()?.addr(),
                    false => "198.51.100.53".parse().expect("ip"),
                };
                let zones: &[&str] = if zones { &["mongodb.net"] } else { &[] };
                vpcgate_node::routes_msg::DnsOffer::new(&[server], zones)
                    .ok()
                    .map(Box::new)
            });
            Intent::RoutesOffered {
                peer,
                routes: nets.into_iter().map(|i| net(i).trunc()).collect(),
                dns,
                local: vec!["198.19.0.0/16".parse().expect("cidr")],
                priority: vpcgate_node::routes_msg::DEFAULT_PRIORITY,
                at: std::time::Instant::now(),
            }
        }
        Gen::LinkObserved { networks, mtu } => Intent::LinkObserved(LinkState {
            networks: networks.into_iter().map(|i| net(i).trunc()).collect(),
            mtu,
        }),
        Gen::DnsObserved(answers) => Intent::DnsObserved(match answers {
            true => vec!["100.64.0.1".parse().expect("ip")],
            false => Vec::new(),
        }),
        Gen::Reload {
            mss_clamp,
            drop_first,
        } => {
            let mut settings = files.settings.clone();
            if let Some(s) = settings.as_mut() {
                s.mss_clamp = mss_clamp;
            }
            let mut peers = files.peers.clone();
            if drop_first && !peers.is_empty() {
                peers.remove(0);
            }
            Intent::Reload { settings, peers }
        }
    }
}

/// Every port holds what `desired` projects.
fn assert_ports_match(m: &Machine, engine: &TestEngine) {
    let desired = engine.desired();
    assert!(engine.converged(), "not converged: {:?}", engine.pending());
    assert_eq!(m.nat.0.borrow().state.as_ref(), Some(&desired.nat()));
    let link = m.links.0.borrow();
    assert_eq!(link.addresses, desired.settings.addresses);
    assert_eq!(link.routes, desired.os_routes());
    assert_eq!(
        m.resolver.0.borrow().links.get("vpcgate0"),
        desired.link_dns().as_ref()
    );
    let thread = m.datapath.0.borrow();
    let projected = desired.datapath();
    assert_eq!(thread.peers, projected.peers);
    assert_eq!(thread.private_key, projected.private_key);
    assert_eq!(thread.offered, projected.advertised);
    let table = thread.table.as_ref().expect("a table was published");
    let expected = RouteTable::build(projected.routes.iter().copied());
    for (net, _) in &projected.routes {
        for addr in [net.network(), net.broadcast()] {
            assert_eq!(table.lookup(addr), expected.lookup(addr), "{addr}");
        }
    }
    let files = m.store.0.borrow().files.clone();
    assert!(same_files(&files, &files_of(&desired.persisted(), &files)));
}

fn run(ops: Vec<Op>) {
    let store = FakeStore::default();
    store.0.borrow_mut().files = Files {
        key: Some(crate::key::clamped(Key([1; 32]))),
        settings: None,
        peers: Vec::new(),
    };
    let mut machine = Machine::boot(store);
    let mut engine = machine.start();
    let mut acked = machine.store.0.borrow().files.clone();
    let mut in_flight_files: Option<Files> = None;
    for op in ops {
        match op {
            Op::Fault(kind, n) => match kind {
                PortKind::Store => machine.store.0.borrow_mut().faults.fail_next += n,
                PortKind::Nat => machine.nat.0.borrow_mut().faults.fail_next += n,
                PortKind::Links => machine.links.0.borrow_mut().faults.fail_next += n,
                PortKind::Bind => machine.datapath.0.borrow_mut().faults.fail_next += n,
                PortKind::Resolver => machine.resolver.0.borrow_mut().faults.fail_next += n,
            },
            Op::Crash(n) => machine.store.0.borrow_mut().crash_after = Some(n),
            Op::Retry => {
                block_on(engine.retry());
            }
            Op::Intent(gen, pick) => {
                let files = machine.store.0.borrow().files.clone();
                let intent = bind(gen, pick, engine.desired(), &files);
                let before = engine.desired().clone();
                let in_flight = plan(&before, intent.clone())
                    .ok()
                    .map(|p| files_of(&p.desired.persisted(), &files));
                let request = intent.is_request();
                let result = block_on(engine.handle(intent));
                match &result {
                    Err(_) => assert_eq!(
                        engine.desired(),
                        &before,
                        "a refused intent changed the state"
                    ),
                    Ok(_) => {
                        if request || engine.desired() != &before {
                            let now = machine.store.0.borrow().files.clone();
                            if engine.reconciler().store_in_step(engine.desired()) {
                                assert!(
                                    same_files(
                                        &now,
                                        &files_of(&engine.desired().persisted(), &now)
                                    ),
                                    "acknowledged but not stored"
                                );
                                acked = now;
                            } else {
                                // Only a change nobody waits for may be
                                // unsaved, and only one without files.
                                assert!(!request, "a request was acknowledged unsaved");
                            }
                        }
                    }
                }
                in_flight_files = in_flight;
            }
        }
        if machine.store.0.borrow().crashed {
            let disk = machine.store.0.borrow().files.clone();
            let current = files_of(&engine.desired().persisted(), &acked);
            let mut candidates = vec![acked.clone(), current];
            candidates.extend(in_flight_files.take());
            let key = |f: &Files| f.key.as_ref().map(|k| k.0);
            assert!(
                candidates.iter().any(|c| key(c) == key(&disk)),
                "the key file holds no state we had"
            );
            assert!(
                candidates.iter().any(|c| c.settings == disk.settings),
                "the settings file holds no state we had"
            );
            assert!(
                candidates.iter().any(|c| c.peers == disk.peers),
                "the peers file holds no state we had"
            );
            // The machine comes back; the kernel's state is gone.
            {
                let mut s = machine.store.0.borrow_mut();
                s.crashed = false;
                s.crash_after = None;
                s.faults.fail_next = 0;
            }
            machine = Machine::boot(machine.store.clone());
            engine = machine.start();
            acked = machine.store.0.borrow().files.clone();
            assert!(engine.converged(), "{:?}", engine.pending());
        }
        assert_eq!(
            machine.datapath.0.borrow().dangling,
            0,
            "a table named a missing peer"
        );
        if engine.converged() {
            let calls = machine.calls();
            block_on(engine.retry());
            assert_eq!(
                machine.calls(),
                calls,
                "a pass over a converged state asked for something"
            );
        }
    }
    // Faults stop; retries converge.
    machine.store.0.borrow_mut().faults.fail_next = 0;
    machine.store.0.borrow_mut().crash_after = None;
    machine.nat.0.borrow_mut().faults.fail_next = 0;
    machine.links.0.borrow_mut().faults.fail_next = 0;
    machine.datapath.0.borrow_mut().faults.fail_next = 0;
    machine.resolver.0.borrow_mut().faults.fail_next = 0;
    // The taken port stays taken: a desired port nobody can bind is the
    // one thing that cannot converge, and no request may have asked for it.
    assert!(block_on(engine.retry()), "{:?}", engine.pending());
    assert_ports_match(&machine, &engine);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_control_plane_matches_its_model(ops in prop::collection::vec(op(), 1..40)) {
        run(ops);
    }
}

#[test]
fn a_taken_port_is_refused_and_changes_nothing() {
    let machine = Machine::boot(FakeStore::default());
    let mut engine = machine.start();
    let before = engine.desired().clone();
    let err = block_on(engine.handle(Intent::Set(SetOptions {
        listen_port: Some(TAKEN_PORT),
        snat: Some(false),
        ..SetOptions::default()
    })))
    .expect_err("taken");
    assert!(err.message.contains("nothing was changed"), "{err}");
    assert_eq!(err.errno, crate::errno::EADDRINUSE);
    assert_eq!(engine.desired(), &before);
    assert_eq!(
        machine.store.0.borrow().files.settings,
        Some(before.settings)
    );
}

#[test]
fn a_failed_route_install_is_retried_until_it_succeeds() {
    let machine = Machine::boot(FakeStore::default());
    let mut engine = machine.start();
    let add = Intent::PeerAdd(NewPeer {
        request: PeerAdd {
            name: "gw-b".into(),
            public_key: Some(b64(&[7; 32])),
            allowed_ips: vec!["100.64.0.7/32".into()],
            accept_routes: true,
            ..PeerAdd::default()
        },
        endpoint: None,
        generated_key: None,
    });
    block_on(engine.handle(add)).expect("added");
    let peer = engine.desired().device.peers[0].handle;
    machine.links.0.borrow_mut().faults.fail_next = 2;
    let offered: IpNet = "198.18.64.0/20".parse().expect("cidr");
    block_on(engine.handle(Intent::RoutesOffered {
        peer,
        routes: vec![offered],
        dns: None,
        local: Vec::new(),
        priority: vpcgate_node::routes_msg::DEFAULT_PRIORITY,
        at: std::time::Instant::now(),
    }))
    .expect("learned");
    assert!(!machine.links.0.borrow().routes.contains(&offered));
    assert!(!engine.converged());
    assert!(!block_on(engine.retry()));
    assert!(block_on(engine.retry()));
    assert!(machine.links.0.borrow().routes.contains(&offered));
}

#[test]
fn a_start_that_fails_writes_no_file() {
    // Files of an older format cannot be put back once rewritten, so a
    // start writes them only once the interface is configured.
    let machine = Machine::boot(FakeStore::default());
    machine.links.0.borrow_mut().faults.fail_next = 1;
    let desired =
        Desired::restore("vpcgate0", Some(Key([3; 32])), initial_settings(), &[]).expect("restore");
    let applied = Applied::at_start(&desired, false, false, (51820, 51820));
    let mut engine = Engine::new(desired, machine.ports(), applied);
    let failure = block_on(engine.start()).expect_err("the interface is refused");
    assert_eq!(failure.part, crate::reconcile::Part::Links);
    assert_eq!(machine.store.0.borrow().writes, 0, "a file was written");
}

/// A client with two gateways trusted for routes.
fn client_with_gateways(machine: &Machine) -> (TestEngine, [u64; 2]) {
    let mut engine = machine.start();
    for (name, key, address) in [("gw-a", 7, "100.64.0.7/32"), ("gw-b", 8, "100.64.0.8/32")] {
        let add = Intent::PeerAdd(NewPeer {
            request: PeerAdd {
                name: name.into(),
                public_key: Some(b64(&[key; 32])),
                allowed_ips: vec![address.into()],
                accept_routes: true,
                ..PeerAdd::default()
            },
            endpoint: None,
            generated_key: None,
        });
        block_on(engine.handle(add)).expect("added");
    }
    let peers = &engine.desired().device.peers;
    let handles = [peers[0].handle, peers[1].handle];
    (engine, handles)
}

fn offer_dns(engine: &mut TestEngine, peer: u64, servers: &[&str], zones: &[&str]) {
    let servers: Vec<std::net::IpAddr> = servers.iter().map(|s| s.parse().expect("ip")).collect();
    let dns = (!servers.is_empty())
        .then(|| vpcgate_node::routes_msg::DnsOffer::new(&servers, zones).expect("a valid offer"));
    block_on(engine.handle(Intent::RoutesOffered {
        peer,
        routes: Vec::new(),
        dns: dns.map(Box::new),
        local: Vec::new(),
        priority: vpcgate_node::routes_msg::DEFAULT_PRIORITY,
        at: std::time::Instant::now(),
    }))
    .expect("background intents are not refused");
}

fn resolver_link(machine: &Machine) -> Option<(Vec<String>, Vec<String>)> {
    machine
        .resolver
        .0
        .borrow()
        .links
        .get("vpcgate0")
        .map(|dns| {
            (
                dns.servers.iter().map(ToString::to_string).collect(),
                dns.domains.clone(),
            )
        })
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn offered_dns_becomes_split_dns_on_the_tun_link_and_goes_away_with_its_gateway() {
    let machine = Machine::boot(FakeStore::default());
    let (mut engine, [a, b]) = client_with_gateways(&machine);
    assert_eq!(
        machine.resolver.0.borrow().calls,
        0,
        "nothing offered: the link's DNS is never touched"
    );

    // Only the address the gateway owns for cryptokey routing is used.
    offer_dns(
        &mut engine,
        a,
        &["100.64.0.7", "198.51.100.53"],
        &["mongodb.net", "internal.example"],
    );
    assert_eq!(
        resolver_link(&machine),
        Some((
            strings(&["100.64.0.7"]),
            strings(&["~mongodb.net", "~internal.example"])
        ))
    );
    // An offer pointing only outside the gateway is no offer.
    offer_dns(&mut engine, b, &["198.51.100.53"], &[]);
    assert_eq!(
        resolver_link(&machine).expect("still a").0,
        strings(&["100.64.0.7"])
    );
    // A second gateway for every name joins the first.
    offer_dns(&mut engine, b, &["100.64.0.8"], &[]);
    assert_eq!(
        resolver_link(&machine),
        Some((
            strings(&["100.64.0.7", "100.64.0.8"]),
            strings(&["~mongodb.net", "~internal.example", "~."])
        ))
    );
    let calls = machine.resolver.0.borrow().calls;
    offer_dns(&mut engine, b, &["100.64.0.8"], &[]);
    assert_eq!(
        machine.resolver.0.borrow().calls,
        calls,
        "a repeat asks nothing"
    );

    // Withdrawn by one gateway; its peer removed for the other.
    offer_dns(&mut engine, a, &[], &[]);
    assert_eq!(
        resolver_link(&machine),
        Some((strings(&["100.64.0.8"]), strings(&["~."])))
    );
    block_on(engine.handle(Intent::PeerRemove {
        name: "gw-b".into(),
    }))
    .expect("removed");
    assert_eq!(
        resolver_link(&machine),
        None,
        "reverted with its last gateway"
    );
    assert!(engine.converged());
}

#[test]
fn a_resolver_that_fails_is_retried_and_status_names_the_command() {
    let machine = Machine::boot(FakeStore::default());
    let (mut engine, [a, _]) = client_with_gateways(&machine);
    machine.resolver.0.borrow_mut().faults.fail_next = 1;
    offer_dns(&mut engine, a, &["100.64.0.7"], &["mongodb.net"]);
    assert_eq!(resolver_link(&machine), None);
    assert!(!engine.converged());
    let pending = engine.pending().join("\n");
    assert!(
        pending.contains(
            "resolvectl dns vpcgate0 100.64.0.7 && resolvectl domain vpcgate0 '~mongodb.net'"
        ),
        "{pending}"
    );
    assert!(block_on(engine.retry()));
    assert!(resolver_link(&machine).is_some());
    assert!(engine.pending().is_empty());
}

#[test]
fn advertised_ranges_and_dns_zones_must_fit_one_route_message() {
    let machine = Machine::boot(FakeStore::default());
    let mut engine = machine.start();
    let v6: Vec<String> = (0..64).map(|i| format!("fd00:{i:x}::/32")).collect();
    block_on(engine.handle(Intent::Advertise {
        routes: v6.clone(),
        exit_node: false,
        checks: Vec::new(),
    }))
    .expect("64 IPv6 ranges fit with the default DNS offer");
    let zones: Vec<String> = (0..20).map(|i| format!("zone{i:02}.example.com")).collect();
    let before = engine.desired().clone();
    let err = block_on(engine.handle(Intent::Set(SetOptions {
        dns_zones: Some(zones.clone()),
        ..SetOptions::default()
    })))
    .expect_err("too big together");
    assert!(err.message.contains("route exchange"), "{err}");
    assert_eq!(engine.desired(), &before, "nothing changed");
    // Fewer ranges make room for the zones; then more ranges are refused.
    block_on(engine.handle(Intent::Advertise {
        routes: v6[..8].to_vec(),
        exit_node: false,
        checks: Vec::new(),
    }))
    .expect("fewer ranges");
    block_on(engine.handle(Intent::Set(SetOptions {
        dns_zones: Some(zones),
        ..SetOptions::default()
    })))
    .expect("zones fit now");
    assert!(block_on(engine.handle(Intent::Advertise {
        routes: v6,
        exit_node: false,
        checks: Vec::new(),
    }))
    .is_err());
    assert_eq!(engine.desired().settings.advertised_routes.len(), 8);
}

#[test]
fn dns_is_offered_only_while_the_forwarder_answers() {
    let machine = Machine::boot(FakeStore::default());
    let mut engine = machine.start();
    block_on(engine.handle(Intent::Advertise {
        routes: vec!["198.18.64.0/20".into()],
        exit_node: false,
        checks: Vec::new(),
    }))
    .expect("advertise");
    let offered = || machine.datapath.0.borrow().offered_dns.clone();
    let gw: std::net::IpAddr = "100.64.0.1".parse().expect("ip");
    assert!(
        offered().is_empty(),
        "the forwarder has not said it answers"
    );
    let serving = |engine: &mut TestEngine, list: Vec<std::net::IpAddr>| {
        block_on(engine.handle(Intent::DnsObserved(list))).expect("background intent");
    };
    serving(&mut engine, vec![gw]);
    assert_eq!(offered(), vec![gw]);
    // Its upstreams ran out: clients stop sending it their names.
    serving(&mut engine, Vec::new());
    assert!(offered().is_empty());
    // An address it answers on that the settings do not name is not ours
    // to offer.
    serving(&mut engine, vec!["100.64.0.9".parse().expect("ip")]);
    assert!(offered().is_empty());
    serving(&mut engine, vec![gw]);
    assert_eq!(offered(), vec![gw]);
    block_on(engine.handle(Intent::Set(SetOptions {
        dns: Some(false),
        ..SetOptions::default()
    })))
    .expect("dns off");
    assert!(offered().is_empty(), "off in the settings: never offered");
}
