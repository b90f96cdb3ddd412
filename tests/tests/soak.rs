//! Two minutes at full load on a gateway with a thousand configured peers,
//! while its advertised routes change every second: every change is
//! acknowledged, the transfer runs to the end, nothing is dropped as
//! malformed or undecryptable, and the daemon's memory stays flat.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use vpcgate_e2e::{require_root, wait_for_ping, wait_until, Impl, OrDie, Pair, PairSpec, Vpcgate};

const SOAK: Duration = Duration::from_secs(120);
const PEERS: usize = 1000;
const MIB: u64 = 1024 * 1024;

#[test]
fn thousand_peers_full_load_and_route_churn() {
    require_root();
    let mut pair = Pair::new(PairSpec::new(Impl::Vpcgated, Impl::Vpcgated))
        .expect("set up two vpcgated namespaces");
    wait_for_ping(&pair.b.ns, &pair.a.t4(), &[], Duration::from_secs(20))
        .expect("first ping b -> a");

    // 999 more peers on the gateway (a), each with a /32 and an endpoint,
    // added the way an operator would: `wg addconf`.
    let conf = pair.a.ns.dir().join("peers.conf");
    let script = format!(
        "import base64, os\n\
         for i in range({n}):\n\
         \x20   key = base64.b64encode(os.urandom(32)).decode()\n\
         \x20   print('[Peer]\\nPublicKey = %s\\nAllowedIPs = 100.65.%d.%d/32\\nEndpoint = 198.18.0.2:%d' % (key, i // 250, i % 250 + 1, 40000 + i))\n",
        n = PEERS - 1
    );
    let text = pair
        .a
        .ns
        .exec(&["python3", "-c", &script])
        .expect("generate peers");
    fs::write(&conf, text).expect("write peers.conf");
    let conf = conf.to_str().expect("utf-8 path");
    pair.a
        .dev
        .wg(&["addconf", pair.a.dev.name(), conf])
        .expect("wg addconf 999 peers");
    let listed = pair.a.dev.dump().expect("wg show dump").peers.len();
    assert_eq!(listed, PEERS, "the gateway should list {PEERS} peers");

    let ctl = Vpcgate::for_dev(&pair.a.dev).expect("vpcgate CLI for a");

    // Full load: one TCP stream from the client (b) into the gateway (a)
    // for the whole soak.
    let mut server = pair
        .a
        .ns
        .spawn(
            "iperf3-server",
            &["iperf3", "-s", "-1", "-B", &pair.a.t4(), "-p", "5301"],
            &[],
        )
        .expect("start iperf3 server");
    wait_until(Duration::from_secs(10), "iperf3 to listen on :5301", || {
        server.check_running()?;
        let listening = pair.a.ns.exec(&["ss", "-Htln", "sport = :5301"])?;
        Ok(!listening.trim().is_empty())
    })
    .or_die("iperf3 server");
    let client_ns = pair.b.ns.clone();
    let target = pair.a.t4();
    let secs = SOAK.as_secs().to_string();
    let load = thread::spawn(move || {
        client_ns.exec(&["iperf3", "-c", &target, "-p", "5301", "-t", &secs, "-J"])
    });

    // Routes change every second; memory is sampled every second.
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut changes = 0u32;
    while start.elapsed() < SOAK {
        let k = changes % 50;
        let routes = [
            format!("198.19.{}.0/24", 2 * k),
            format!("198.19.{}.0/24", 2 * k + 1),
        ];
        let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
        ctl.advertise(&routes)
            .unwrap_or_else(|e| panic!("route change {changes} was refused: {e:#}"));
        changes += 1;
        samples.push((start.elapsed(), pair.a.dev.process().rss().or_die("RSS")));
        // On one-second ticks, however long the change took.
        let next = Duration::from_secs(u64::from(changes));
        thread::sleep(next.saturating_sub(start.elapsed()));
    }
    let report = load
        .join()
        .expect("iperf3 thread")
        .expect("iperf3 ran for the whole soak");
    drop(server);

    let json: serde_json::Value = serde_json::from_str(&report).expect("iperf3 JSON");
    assert!(
        json.get("error").is_none(),
        "iperf3 reported an error: {}",
        json["error"]
    );
    let received = json["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    let seconds = json["end"]["sum_received"]["seconds"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(
        received > 0 && seconds >= SOAK.as_secs_f64() - 1.0,
        "the load should run for the whole soak: {received} bytes in {seconds} s"
    );
    eprintln!(
        "soak: {changes} route changes, {} MB moved in {seconds:.0} s",
        received / 1_000_000
    );

    // Flat: after the first 20 s (buffers touched, 1,000 peers' state
    // built), the resident set grows by less than 1 MiB to the end.
    let settled: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= Duration::from_secs(20))
        .map(|&(_, r)| r)
        .collect();
    let first = settled.first().copied().expect("samples after 20 s");
    let peak = settled.iter().copied().max().unwrap_or(first);
    eprintln!(
        "soak: RSS {} KiB at 20 s, peak {} KiB after",
        first / 1024,
        peak / 1024
    );
    assert!(
        peak <= first + MIB,
        "RSS grew from {} KiB to {} KiB under steady load: {samples:?}",
        first / 1024,
        peak / 1024
    );
    assert!(
        peak <= 64 * MIB,
        "RSS with {PEERS} peers should stay within 64 MiB, was {} KiB",
        peak / 1024
    );

    // No errors: nothing arrived that failed to parse or decrypt, the
    // daemon is alive, and its log has no error.
    let status = ctl.status().expect("status after the soak");
    for reason in ["malformed", "decrypt_failed", "handshake_failed"] {
        assert_eq!(
            status.dropped(reason),
            Some(0),
            "{reason} drops during the soak"
        );
    }
    pair.a.dev.check_running().expect("gateway still running");
    let log = pair.a.dev.log_tail(1 << 20);
    assert!(
        !log.contains("ERROR") && !log.contains("panicked"),
        "the gateway logged an error during the soak:\n{log}"
    );
}
