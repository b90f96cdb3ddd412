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
use crate::fakes::{FakeDatapath, FakeLinks, FakeNat, FakeStore, Files};
use crate::intent::{plan, Intent, NewPeer};
use crate::key::{b64, Key};
use crate::model::{Desired, LinkState, Persisted};
use crate::reconcile::{Applied, Engine, Ports};
use crate::settings::Settings;

type TestEngine = Engine<FakeStore, FakeNat, FakeLinks, FakeDatapath>;

/// The machine: its disk survives a crash, the kernel's state does not.
struct Machine {
    store: FakeStore,
    nat: FakeNat,
    links: FakeLinks,
    datapath: FakeDatapath,
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
        }
    }

    fn ports(&self) -> Ports<FakeStore, FakeNat, FakeLinks, FakeDatapath> {
        Ports {
            store: self.store.clone(),
            nat: self.nat.clone(),
            links: self.links.clone(),
            datapath: self.datapath.clone(),
        }
    }

    fn calls(&self) -> (u32, u32, u32, u32) {
        (
            self.store.0.borrow().writes,
            self.nat.0.borrow().calls,
            self.links.0.borrow().calls,
            self.datapath.0.borrow().calls,
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
    Advertise(Vec<usize>),
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
    RoutesOffered(Vec<usize>),
    LinkObserved {
        networks: Vec<usize>,
        mtu: u32,
    },
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
        nets().prop_map(Gen::Advertise),
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
        nets().prop_map(Gen::RoutesOffered),
        (nets(), prop_oneof![Just(1420u32), Just(1380)])
            .prop_map(|(networks, mtu)| Gen::LinkObserved { networks, mtu }),
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
                Just(PortKind::Bind)
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
        Gen::Advertise(nets) => Intent::Advertise {
            routes: nets.into_iter().map(|i| NETS[i].to_string()).collect(),
            exit_node: false,
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
        Gen::RoutesOffered(nets) => {
            let peers = &desired.device.peers;
            // A stale handle when there is no peer: the intent must be
            // ignored.
            let peer = peers
                .get(pick % peers.len().max(1))
                .map_or(u64::MAX, |p| p.handle);
            Intent::RoutesOffered {
                peer,
                routes: nets.into_iter().map(|i| net(i).trunc()).collect(),
                local: vec!["198.19.0.0/16".parse().expect("cidr")],
            }
        }
        Gen::LinkObserved { networks, mtu } => Intent::LinkObserved(LinkState {
            networks: networks.into_iter().map(|i| net(i).trunc()).collect(),
            mtu,
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
    let thread = m.datapath.0.borrow();
    let projected = desired.datapath();
    assert_eq!(thread.peers, projected.peers);
    assert_eq!(thread.private_key, projected.private_key);
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
        local: Vec::new(),
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
