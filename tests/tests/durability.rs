//! Crash safety of the durable state. Changes made through the `vpcgate` CLI
//! are interleaved with SIGKILLs of the daemon at random moments: while a
//! command is in flight, while idle, and while the daemon is still starting.
//! After every restart a change the CLI acknowledged is there, a change that
//! was cut off is either wholly there or wholly absent, the key is the same,
//! and the state directory holds exactly its three well-formed, private
//! files. The random choices come from a seed that is printed (set
//! `VPCGATE_SEED` to replay one).

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use vpcgate_e2e::{
    gen_keypair, require_root, seed, unique_ifname, ClientConf, Netns, OrDie, Rng, Status, Vpcgate,
    VpcgatedConfig, WgDev,
};

const ITERATIONS: usize = 200;
const STATE_FILES: [&str; 3] = ["peers.json", "private.key", "settings.json"];
/// Advertised ranges to pick from; none overlaps another or the tunnel.
const ROUTE_POOL: [&str; 6] = [
    "198.18.64.0/20",
    "198.19.101.0/24",
    "198.19.102.0/24",
    "198.18.128.0/17",
    "fd00:99::/48",
    "fd00:98:1::/64",
];
const ADDRESS4: &str = "100.64.0.1/16";
const ADDRESS6: &str = "fd00:64::1/64";

#[derive(Clone, Debug, PartialEq, Eq)]
struct PeerModel {
    /// `None` for a generated peer until its key has been seen once.
    public_key: Option<String>,
    allowed_ips: Vec<String>,
    endpoint: Option<String>,
    keepalive: Option<u64>,
}

/// Everything the CLI can change, as `status --json` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Model {
    peers: BTreeMap<String, PeerModel>,
    advertised: Vec<String>,
    snat: bool,
    mss_clamp: bool,
    public_endpoint: Option<String>,
    listen_port: u64,
    addresses: Vec<String>,
    mtu: u64,
}

impl Model {
    fn of(status: &Status) -> Model {
        let json = &status.json;
        let strings = |v: &serde_json::Value| -> Vec<String> {
            let mut list: Vec<String> = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            list.sort();
            list
        };
        let mut peers = BTreeMap::new();
        for p in json["peers"].as_array().into_iter().flatten() {
            let name = p["name"]
                .as_str()
                .unwrap_or_else(|| panic!("a peer without a name appeared: {p}"))
                .to_string();
            peers.insert(
                name,
                PeerModel {
                    public_key: p["public_key"].as_str().map(str::to_string),
                    allowed_ips: strings(&p["allowed_ips"]),
                    endpoint: p["endpoint"].as_str().map(str::to_string),
                    keepalive: p["persistent_keepalive"].as_u64(),
                },
            );
        }
        Model {
            peers,
            advertised: strings(&json["advertised_routes"]),
            snat: status.snat,
            mss_clamp: status.mss_clamp,
            public_endpoint: status.public_endpoint.clone(),
            listen_port: status.listen_port,
            addresses: strings(&json["addresses"]),
            mtu: json["mtu"].as_u64().unwrap_or(0),
        }
    }

    /// Whether `actual` is this state; a generated peer whose key the model
    /// does not know yet matches any key.
    fn matches(&self, actual: &Model) -> bool {
        let mut expected = self.clone();
        for (name, peer) in expected.peers.iter_mut() {
            if peer.public_key.is_none() {
                peer.public_key = actual.peers.get(name).and_then(|p| p.public_key.clone());
            }
        }
        expected == *actual
    }

    /// Learns the keys of generated peers from a state that matched.
    fn pin_keys(&mut self, actual: &Model) {
        for (name, peer) in self.peers.iter_mut() {
            if peer.public_key.is_none() {
                peer.public_key = actual.peers.get(name).and_then(|p| p.public_key.clone());
            }
        }
    }
}

/// One CLI command and the state it leads to.
struct Op {
    args: Vec<String>,
    after: Model,
    /// The peer a generated `peer add` creates, to record its config.
    generated: Option<String>,
}

struct Generator {
    rng: Rng,
    next_peer: u32,
}

impl Generator {
    fn tunnel_ip(&mut self) -> String {
        self.next_peer += 1;
        let n = self.next_peer + 1;
        format!("100.64.{}.{}/32", n / 250, n % 250 + 2)
    }

    fn op(&mut self, model: &Model) -> Op {
        loop {
            let choice = self.rng.below(100);
            let op = match choice {
                0..=24 => Some(self.add_own_key(model)),
                25..=39 => Some(self.add_generated(model)),
                40..=54 => self.remove(model),
                55..=69 => Some(self.advertise(model)),
                _ => self.set(model),
            };
            if let Some(op) = op {
                return op;
            }
        }
    }

    fn add_own_key(&mut self, model: &Model) -> Op {
        let key = gen_keypair().or_die("wg genkey");
        let name = format!("own{}", self.next_peer);
        let mut allowed = vec![self.tunnel_ip()];
        if self.rng.percent(30) {
            allowed.push(format!("fd00:64::{:x}/128", self.next_peer + 2));
        }
        let mut args: Vec<String> = ["peer", "add", &name, "--public-key", &key.public]
            .map(str::to_string)
            .to_vec();
        args.push("--allowed-ips".into());
        args.push(allowed.join(","));
        let endpoint = self.rng.percent(50).then(|| {
            format!(
                "198.18.{}.{}:{}",
                self.rng.below(4),
                1 + self.rng.below(254),
                1024 + self.rng.below(60000)
            )
        });
        if let Some(e) = &endpoint {
            args.extend(["--endpoint".to_string(), e.clone()]);
        }
        let keepalive = self.rng.percent(40).then(|| 1 + self.rng.below(600));
        if let Some(k) = keepalive {
            args.extend(["--keepalive".to_string(), k.to_string()]);
        }
        let mut after = model.clone();
        allowed.sort();
        after.peers.insert(
            name,
            PeerModel {
                public_key: Some(key.public),
                allowed_ips: allowed,
                endpoint,
                keepalive,
            },
        );
        Op {
            args,
            after,
            generated: None,
        }
    }

    fn add_generated(&mut self, model: &Model) -> Op {
        let name = format!("gen{}", self.next_peer);
        let ip = self.tunnel_ip();
        let args = ["peer", "add", &name, "--allowed-ips", &ip]
            .map(str::to_string)
            .to_vec();
        let mut after = model.clone();
        after.peers.insert(
            name.clone(),
            PeerModel {
                public_key: None,
                allowed_ips: vec![ip],
                endpoint: None,
                keepalive: None,
            },
        );
        Op {
            args,
            after,
            generated: Some(name),
        }
    }

    fn remove(&mut self, model: &Model) -> Option<Op> {
        if model.peers.is_empty() {
            return None;
        }
        let index = self.rng.below(model.peers.len() as u64) as usize;
        let name = model.peers.keys().nth(index)?.clone();
        let mut after = model.clone();
        after.peers.remove(&name);
        Some(Op {
            args: ["peer", "remove", &name].map(str::to_string).to_vec(),
            after,
            generated: None,
        })
    }

    fn advertise(&mut self, model: &Model) -> Op {
        let mut after = model.clone();
        let mut args = vec!["advertise-routes".to_string()];
        match self.rng.below(10) {
            0 => {
                args.push("--clear".into());
                after.advertised.clear();
            }
            1 => {
                args.extend(["--exit-node".to_string(), "0.0.0.0/0".to_string()]);
                after.advertised = vec!["0.0.0.0/0".into()];
            }
            _ => {
                let chosen: Vec<&str> = ROUTE_POOL
                    .iter()
                    .copied()
                    .filter(|_| self.rng.percent(50))
                    .collect();
                let chosen = if chosen.is_empty() {
                    vec![ROUTE_POOL[0]]
                } else {
                    chosen
                };
                // Commas, spaces and separate arguments all separate.
                match self.rng.below(3) {
                    0 => args.push(chosen.join(",")),
                    1 => args.push(chosen.join(" ")),
                    _ => args.extend(chosen.iter().map(|r| r.to_string())),
                }
                after.advertised = chosen.iter().map(|r| r.to_string()).collect();
            }
        }
        after.advertised.sort();
        Op {
            args,
            after,
            generated: None,
        }
    }

    fn set(&mut self, model: &Model) -> Option<Op> {
        let mut after = model.clone();
        let mut args = vec!["set".to_string()];
        let on_off = |b: bool| if b { "on" } else { "off" }.to_string();
        if self.rng.percent(40) {
            after.snat = self.rng.percent(50);
            args.extend(["--snat".to_string(), on_off(after.snat)]);
        }
        if self.rng.percent(40) {
            after.mss_clamp = self.rng.percent(50);
            args.extend(["--mss-clamp".to_string(), on_off(after.mss_clamp)]);
        }
        if self.rng.percent(30) {
            let endpoint = format!(
                "198.18.2.{}:{}",
                1 + self.rng.below(254),
                51820 + self.rng.below(100)
            );
            after.public_endpoint = Some(endpoint.clone());
            args.extend(["--public-endpoint".to_string(), endpoint]);
        }
        if self.rng.percent(25) {
            after.listen_port = 41000 + self.rng.below(1000);
            args.extend(["--listen-port".to_string(), after.listen_port.to_string()]);
        }
        if self.rng.percent(25) {
            after.mtu = 1280 + self.rng.below(221);
            args.extend(["--mtu".to_string(), after.mtu.to_string()]);
        }
        if self.rng.percent(25) {
            after.addresses = if model.addresses.len() == 1 {
                vec![ADDRESS4.to_string(), ADDRESS6.to_string()]
            } else {
                vec![ADDRESS4.to_string()]
            };
            args.extend(["--address".to_string(), after.addresses.join(",")]);
            after.addresses.sort();
        }
        (args.len() > 1).then_some(Op {
            args,
            after,
            generated: None,
        })
    }
}

fn describe(out: &Output) -> String {
    format!(
        "{}: stdout {:?} stderr {:?}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every state file parses and is private; nothing else is in the directory.
fn check_state_dir(dir: &Path, key_text: &str, context: &str) {
    let mode = |p: &Path| {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{context}: stat {}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(dir), 0o700, "{context}: state dir mode");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{context}: list {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("{context}: {e}"))
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    assert!(
        names.iter().all(|n| STATE_FILES.contains(&n.as_str())),
        "{context}: leftover files in the state dir: {names:?}"
    );
    for name in &names {
        let path = dir.join(name);
        assert_eq!(mode(&path), 0o600, "{context}: mode of {name}");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{context}: read {name}: {e}"));
        match name.as_str() {
            "private.key" => assert_eq!(text, key_text, "{context}: private.key changed"),
            // Both in state format 2: {"format": 2, "settings"|"peers": ...}.
            "settings.json" => assert!(
                serde_json::from_str::<serde_json::Value>(&text)
                    .is_ok_and(|v| v["format"] == 2 && v["settings"].is_object()),
                "{context}: settings.json does not parse: {text:?}"
            ),
            _ => assert!(
                serde_json::from_str::<serde_json::Value>(&text)
                    .is_ok_and(|v| v["format"] == 2 && v["peers"].is_array()),
                "{context}: peers.json does not parse: {text:?}"
            ),
        }
    }
}

#[derive(Default, Debug)]
struct Tally {
    acknowledged_in_flight: u32,
    cut_off_but_applied: u32,
    cut_off_and_absent: u32,
    idle_kills: u32,
    startup_kills: u32,
    commands: u32,
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_change() {
    require_root();
    let seed = seed("durability ");
    let started = Instant::now();
    let ns = Netns::new("dur").or_die("namespace");
    let state = ns.dir().join("state");
    let mut cfg = VpcgatedConfig::new(51820, ADDRESS4);
    cfg.state_dir = Some(state.clone());
    cfg.log_level = "info".into();
    cfg.interface = Some(unique_ifname("dur"));

    // The first start takes --listen-port and --address; every restart
    // after that uses only what was saved, as systemd's restart would.
    let mut dev = WgDev::vpcgated(&ns, "dur", &cfg).or_die("first start");
    cfg.saved_settings = true;
    let ctl = Vpcgate::for_dev(&dev).or_die("CLI");
    ctl.run(&["set", "--public-endpoint", "198.18.2.10:51820"])
        .or_die("set the public endpoint");
    let key_text = std::fs::read_to_string(state.join("private.key")).or_die("read key");
    let public_key = ctl.status().or_die("status").public_key;
    let mut model = Model::of(&ctl.status().or_die("status"));
    let mut generator = Generator {
        rng: Rng(seed),
        next_peer: 0,
    };
    let mut configs: BTreeMap<String, String> = BTreeMap::new();
    let mut tally = Tally::default();

    for iteration in 0..ITERATIONS {
        let context = format!("seed {seed}, iteration {iteration}");
        // A few acknowledged changes first.
        for _ in 0..generator.rng.below(3) {
            let op = generator.op(&model);
            let args: Vec<&str> = op.args.iter().map(String::as_str).collect();
            let out = ctl.output(&args).or_die("run vpcgate");
            tally.commands += 1;
            assert!(
                out.status.success(),
                "{context}: vpcgate {args:?} failed: {}",
                describe(&out)
            );
            if let Some(name) = op.generated {
                configs.insert(name, String::from_utf8_lossy(&out.stdout).into_owned());
            }
            model = op.after;
        }

        // Then a SIGKILL: mostly while a command is in flight.
        let in_flight = generator.rng.percent(80).then(|| generator.op(&model));
        let delay = Duration::from_micros(generator.rng.below(30_000));
        let outcome = std::thread::scope(|scope| {
            let cli = in_flight.as_ref().map(|op| {
                let ctl = &ctl;
                scope.spawn(move || {
                    let args: Vec<&str> = op.args.iter().map(String::as_str).collect();
                    ctl.output(&args).or_die("run vpcgate")
                })
            });
            std::thread::sleep(delay);
            dev.process().signal(Signal::SIGKILL).or_die("SIGKILL");
            cli.map(|t| t.join().expect("CLI thread"))
        });
        let status = dev
            .process()
            .wait_timeout(Duration::from_secs(10))
            .or_die("wait");
        assert!(status.is_some(), "{context}: the daemon survived SIGKILL");
        drop(dev);

        eprintln!(
            "iteration {iteration}: SIGKILL after {delay:?} {}",
            match &in_flight {
                Some(op) => format!("during `vpcgate {}`", op.args.join(" ")),
                None => "while idle".to_string(),
            }
        );
        // Sometimes the restart itself is cut short.
        if generator.rng.percent(15) {
            eprintln!("iteration {iteration}: SIGKILL during start-up");
            tally.startup_kills += 1;
            let mut early = WgDev::vpcgated_unready(&ns, "dur", &cfg).or_die("spawn");
            std::thread::sleep(Duration::from_micros(generator.rng.below(300_000)));
            early.process().signal(Signal::SIGKILL).or_die("SIGKILL");
            let _ = early.process().wait_timeout(Duration::from_secs(10));
        }

        dev = WgDev::vpcgated(&ns, "dur", &cfg).unwrap_or_else(|e| {
            let listeners = ns.exec(&["ss", "-xlp"]).unwrap_or_default();
            let pids = ns.pids().unwrap_or_default();
            let procs: Vec<String> = pids
                .iter()
                .map(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default())
                .collect();
            panic!("{context}: restart after SIGKILL: {e:#}\nlisteners:\n{listeners}\nprocesses: {procs:?}")
        });
        let actual = Model::of(&ctl.status().or_die("status after restart"));
        match (&in_flight, &outcome) {
            (None, _) => {
                tally.idle_kills += 1;
                assert!(
                    model.matches(&actual),
                    "{context}: killed while idle, state changed:\nexpected {model:#?}\nactual {actual:#?}"
                );
            }
            (Some(op), Some(out)) => {
                tally.commands += 1;
                let args = op.args.join(" ");
                if out.status.success() {
                    tally.acknowledged_in_flight += 1;
                    assert!(
                        op.after.matches(&actual),
                        "{context}: `vpcgate {args}` was acknowledged but is lost:\n\
                         expected {:#?}\nactual {actual:#?}",
                        op.after
                    );
                    if let Some(name) = &op.generated {
                        configs.insert(name.clone(), String::from_utf8_lossy(&out.stdout).into());
                    }
                    model = op.after.clone();
                } else if op.after.matches(&actual) {
                    tally.cut_off_but_applied += 1;
                    model = op.after.clone();
                } else {
                    tally.cut_off_and_absent += 1;
                    assert!(
                        model.matches(&actual),
                        "{context}: `vpcgate {args}` was cut off ({}) and left a state that is \
                         neither before nor after:\nbefore {model:#?}\nafter {:#?}\nactual {actual:#?}",
                        describe(out),
                        op.after
                    );
                }
            }
            (Some(_), None) => unreachable!("a command in flight always has an outcome"),
        }
        model.pin_keys(&actual);
        assert_eq!(
            ctl.status().or_die("status").public_key,
            public_key,
            "{context}: the node's key changed"
        );
        check_state_dir(&state, &key_text, &context);
    }

    // A generated client's config, key included, comes back unchanged.
    let mut checked = 0;
    for (name, config) in &configs {
        if !model.peers.contains_key(name) {
            continue;
        }
        let again = ctl.run(&["peer", "config", name]).or_die("peer config");
        let key = |text: &str| {
            ClientConf::parse(text)
                .and_then(|c| c.interface_one("PrivateKey"))
                .or_die("config parses")
        };
        assert_eq!(key(&again), key(config), "{name}'s private key changed");
        checked += 1;
    }
    // One table of ours while routes are advertised, none otherwise,
    // however many times the daemon died holding it.
    let tables = ns.exec(&["nft", "list", "tables"]).or_die("nft");
    assert_eq!(
        tables.lines().filter(|l| l.contains("vpcgate_")).count(),
        usize::from(!model.advertised.is_empty()),
        "advertised {:?}: {tables}",
        model.advertised
    );
    eprintln!(
        "durability: {ITERATIONS} SIGKILLs in {:?}, {tally:?}, {checked} client configs reprinted",
        started.elapsed()
    );
}

/// A state directory of vpcgate 0.1.0 (the committed fixture): a start that
/// fails leaves every file exactly as it was; a start that succeeds runs on
/// the same key, settings and peers and then rewrites each file in the
/// current format.
#[test]
fn old_state_is_rewritten_only_after_a_successful_start() {
    require_root();
    let fixture = vpcgate_e2e::repo_root().join("daemon/fixtures/state/0.1.0/gateway");
    let ns = Netns::new("migrate").or_die("netns");
    let state = ns.dir().join("state");
    std::fs::create_dir_all(&state).or_die("mkdir");
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).or_die("chmod");
    for name in STATE_FILES {
        std::fs::copy(fixture.join(name), state.join(name)).or_die("copy the fixture");
        std::fs::set_permissions(state.join(name), std::fs::Permissions::from_mode(0o600))
            .or_die("chmod");
    }
    let read_all = || -> Vec<(String, String)> {
        STATE_FILES
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(state.join(n)).or_die("read");
                (n.to_string(), text)
            })
            .collect()
    };
    let original = read_all();
    let public_key = std::fs::read_to_string(fixture.join("public.key")).or_die("public.key");

    // A link of another kind holds the interface's name, so the TUN cannot
    // be created: the start fails after every file was read.
    let name = unique_ifname("m");
    let other_end = unique_ifname("m");
    ns.ip(&[
        "link", "add", &name, "type", "veth", "peer", "name", &other_end,
    ])
    .or_die("a veth by that name");
    let mut cfg = VpcgatedConfig::new(0, "");
    cfg.state_dir = Some(state.clone());
    cfg.interface = Some(name.clone());
    cfg.saved_settings = true;
    let mut failing = WgDev::vpcgated_unready(&ns, "m", &cfg).or_die("start");
    let status = failing
        .process()
        .wait_timeout(Duration::from_secs(60))
        .or_die("wait")
        .unwrap_or_else(|| panic!("vpcgated kept running with {name} taken"));
    assert!(!status.success(), "vpcgated started with {name} taken");
    let log = failing.process().log_tail(8 * 1024);
    assert!(
        log.contains("cannot create TUN device"),
        "it failed for another reason:\n{log}"
    );
    assert_eq!(
        read_all(),
        original,
        "a failed start changed the 0.1.0 state files"
    );
    drop(failing);

    ns.ip(&["link", "del", &name]).or_die("free the name");
    let dev = WgDev::vpcgated(&ns, "m", &cfg).or_die("start on the 0.1.0 state");
    assert_eq!(
        dev.public_key().or_die("key"),
        public_key.trim(),
        "another key"
    );
    let ctl = Vpcgate::for_dev(&dev).or_die("ctl");
    let status = ctl.status().or_die("status");
    assert_eq!(status.listen_port, 51901);
    assert_eq!(
        status.advertised_routes,
        ["198.18.64.0/20", "198.19.101.0/24"]
    );
    let mut names: Vec<String> = status.peers.iter().filter_map(|p| p.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["client", "laptop", "phone"]);
    let key_text = std::fs::read_to_string(state.join("private.key")).or_die("read");
    assert!(
        key_text.starts_with("# vpcgate private key (state format 2)\n"),
        "private.key was not rewritten: {key_text:?}"
    );
    check_state_dir(&state, &key_text, "after the migration");
}
