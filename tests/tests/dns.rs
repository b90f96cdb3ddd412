//! Private DNS, end to end, in the guide's topology with real servers: a
//! dnsmasq in the VPC plays the VPC's resolver and holds the private zone
//! (the gateway's own resolv.conf points at it, as DHCP sets it on a cloud
//! VM); PostgreSQL runs in the peered network; a stock wg-quick client,
//! fed the printed config (its resolv.conf set from the `DNS =` line as
//! resolvconf would), connects to the database by its private name with
//! psql. dig, a client we did not write, checks truncation and TCP, and
//! that nobody outside the tunnel gets an answer.

use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use vpcgate_e2e::{
    require_root, wait_until, Guide, GuideNet, Netns, OrDie, Proc, WgQuick, DB, GW_PUBLIC, GW_VPC,
};

/// The VPC's resolver: AWS puts it at the VPC's base address + 2.
const RESOLVER: &str = "198.18.64.2";
const ZONE: &str = "db.internal.example";
const FLOOD_ZONE: &str = "flood.db.internal.example";
/// The gateway's metrics, on its own loopback.
const METRICS_PORT: u16 = 9586;
const DB_NAME: &str = "cluster0.db.internal.example";
/// A name with so many addresses that its answer needs more than 512 bytes.
const BIG_NAME: &str = "big.db.internal.example";
const BIG_COUNT: usize = 60;
/// dnsmasq's TTL for its own records: long enough that no test outlives it.
const TTL: u32 = 3600;
const GW_DNS: &str = "100.64.0.1";
/// How long a name may take to resolve the first time. The gateway reads
/// its resolv.conf at once; this only stops a broken forwarder from
/// hanging the test, and allows for a machine many times slower.
const FIRST_ANSWER: Duration = Duration::from_secs(60);

/// dnsmasq in its own namespace on the VPC subnet, answering only from its
/// own records and logging every query it receives.
struct Resolver {
    ns: Netns,
    log: PathBuf,
    _proc: Proc,
}

impl Resolver {
    fn start(net: &GuideNet) -> Resolver {
        let ns = Netns::new("resolver").or_die("resolver namespace");
        net.attach_to_vpc(&ns, &[&format!("{RESOLVER}/20")])
            .or_die("resolver on the VPC subnet");
        let hosts = ns.dir().join("zone.hosts");
        let mut text = format!("{DB} {DB_NAME}\n");
        for i in 0..BIG_COUNT {
            text.push_str(&format!("198.19.101.{} {BIG_NAME}\n", 100 + i));
        }
        std::fs::write(&hosts, text).or_die("zone file");
        let log = ns.dir().join("queries.log");
        let args = [
            "dnsmasq".to_string(),
            "--keep-in-foreground".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--no-poll".into(),
            "--pid-file=".into(),
            "--user=root".into(),
            "--group=root".into(),
            format!("--listen-address={RESOLVER}"),
            "--bind-interfaces".into(),
            "--port=53".into(),
            format!("--addn-hosts={}", hosts.display()),
            format!("--local-ttl={TTL}"),
            format!("--local=/{ZONE}/"),
            // Every name under it has the database's address: a flood of
            // unique names whose every answer can be cached.
            format!("--address=/{FLOOD_ZONE}/{DB}"),
            // No cache of its own: every query it gets is counted.
            "--cache-size=0".into(),
            "--log-queries".into(),
            format!("--log-facility={}", log.display()),
        ];
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = ns.spawn("dnsmasq", &argv, &[]).or_die("start dnsmasq");
        let resolver = Resolver {
            ns,
            log,
            _proc: proc,
        };
        wait_until(Duration::from_secs(30), "dnsmasq to answer", || {
            Ok(dig(
                &resolver.ns,
                &["@198.18.64.2", DB_NAME, "+short", "+time=1", "+tries=1"],
            )
            .contains(&DB.to_string()))
        })
        .or_die("dnsmasq up");
        resolver
    }

    /// Queries dnsmasq logged for `name` so far (type A).
    fn queries_for(&self, name: &str) -> usize {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let needle = format!("query[A] {name} from");
        text.lines().filter(|l| l.contains(&needle)).count()
    }

    fn all_queries(&self) -> usize {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines().filter(|l| l.contains(": query[")).count()
    }
}

/// PostgreSQL in the peered network, listening on the database's address,
/// with a password.
struct Database {
    _proc: Proc,
}

const PG_PASSWORD: &str = "vpcgate-e2e";

fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .or_die("PostgreSQL is not installed (/usr/lib/postgresql)")
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .unwrap_or_else(|| panic!("no {name} under /usr/lib/postgresql/*/bin"))
}

impl Database {
    fn start(ns: &Netns) -> Database {
        let dir = ns.dir().join("pg");
        let data = dir.join("data");
        std::fs::create_dir_all(&dir).or_die("pg dir");
        std::fs::write(dir.join("pw"), PG_PASSWORD).or_die("pw file");
        ns.exec(&["chown", "-R", "postgres:postgres", &dir.to_string_lossy()])
            .or_die("chown");
        // The scratch directory above it is root's; postgres must get through.
        ns.exec(&["chmod", "0755", &ns.dir().to_string_lossy()])
            .or_die("chmod");
        let initdb = pg_bin("initdb");
        ns.exec(&[
            "runuser",
            "-u",
            "postgres",
            "--",
            &initdb.to_string_lossy(),
            "-D",
            &data.to_string_lossy(),
            "-U",
            "postgres",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            &format!("--pwfile={}", dir.join("pw").display()),
        ])
        .or_die("initdb");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 0.0.0.0/0 scram-sha-256\n",
        )
        .or_die("pg_hba.conf");
        let postgres = pg_bin("postgres");
        let proc = ns
            .spawn(
                "postgres",
                &[
                    "runuser",
                    "-u",
                    "postgres",
                    "--",
                    &postgres.to_string_lossy(),
                    "-D",
                    &data.to_string_lossy(),
                    "-c",
                    &format!("listen_addresses={DB}"),
                    "-c",
                    "port=5432",
                    "-c",
                    &format!("unix_socket_directories={}", dir.display()),
                ],
                &[],
            )
            .or_die("start postgres");
        wait_until(
            Duration::from_secs(60),
            "postgres to accept connections",
            || {
                Ok(ns
                    .exec_raw(&["bash", "-c", &format!("exec 3<>/dev/tcp/{DB}/5432")])
                    .is_ok_and(|o| o.status.success()))
            },
        )
        .or_die("postgres up");
        Database { _proc: proc }
    }
}

/// dig's output, whatever its exit status.
fn dig(ns: &Netns, args: &[&str]) -> String {
    let mut argv = vec!["dig"];
    argv.extend_from_slice(args);
    match ns.exec_raw(&argv) {
        Ok(out) => format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("cannot run dig: {e:#}"),
    }
}

/// Whether dig's output shows a DNS response of any kind.
fn got_response(out: &str) -> bool {
    out.contains("status:") || out.contains("ANSWER SECTION")
}

fn answer_count(out: &str) -> Option<usize> {
    let (_, rest) = out.split_once("ANSWER: ")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn flags(out: &str) -> String {
    out.lines()
        .find(|l| l.starts_with(";; flags:"))
        .unwrap_or_default()
        .to_string()
}

/// Waits until `client` gets the database's address from the gateway.
fn first_answer(client: &Netns) {
    let mut said = String::new();
    wait_until(FIRST_ANSWER, "the client's first answer", || {
        said = dig(
            client,
            &[
                &format!("@{GW_DNS}"),
                DB_NAME,
                "+short",
                "+time=2",
                "+tries=1",
            ],
        );
        Ok(said.contains(&DB.to_string()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\ndig said: {said}"));
}

struct Site {
    g: Guide,
    resolver: Resolver,
    _db: Database,
}

fn site() -> Site {
    require_root();
    let net = GuideNet::new().or_die("guide topology");
    let resolver = Resolver::start(&net);
    // The gateway VM's resolver, as the cloud's DHCP gives it.
    net.gw
        .set_resolv_conf(&format!("nameserver {RESOLVER}\n"))
        .or_die("gateway resolv.conf");
    let db = Database::start(&net.db);
    let g = Guide::on_with(
        net,
        &["--metrics-listen", &format!("127.0.0.1:{METRICS_PORT}")],
    )
    .or_die("gateway");
    Site {
        g,
        resolver,
        _db: db,
    }
}

fn up_client(site: &Site, name: &str, ns: &Netns) -> WgQuick {
    up_client_conf(site, name, ns).0
}

fn up_client_conf(site: &Site, name: &str, ns: &Netns) -> (WgQuick, vpcgate_e2e::ClientConf) {
    let conf = site.g.gateway.ctl.add_client(name).or_die("peer add");
    assert_eq!(
        conf.interface("DNS"),
        [GW_DNS],
        "the client config should name the gateway's forwarder:\n{}",
        conf.text
    );
    let q = WgQuick::up(ns, &conf).or_die("wg-quick up");
    assert!(
        ns.resolv_conf()
            .or_die("client resolv.conf")
            .contains(&format!("nameserver {GW_DNS}")),
        "the DNS = line should have set the client's resolver"
    );
    (q, conf)
}

#[test]
fn a_stock_client_reaches_the_database_by_its_private_name() {
    let s = site();
    let client = &s.g.net.client;
    let _q = up_client(&s, "laptop", client);
    let url = format!(
        "host={DB_NAME} port=5432 user=postgres dbname=postgres sslmode=disable connect_timeout=10"
    );
    let mut out = String::new();
    wait_until(FIRST_ANSWER, "psql to reach the database by name", || {
        let o = client
            .exec_raw(&[
                "env",
                &format!("PGPASSWORD={PG_PASSWORD}"),
                "psql",
                &url,
                "-tA",
                "-c",
                "select 6 * 7, inet_client_addr()",
            ])
            .or_die("psql");
        out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(o.status.success())
    })
    .unwrap_or_else(|e| panic!("{e:#}\npsql said: {out}"));
    // The answer, and the gateway's VPC address as the client's (SNAT).
    assert_eq!(out.trim(), format!("42|{GW_VPC}"), "psql printed {out:?}");
    assert!(s.resolver.queries_for(DB_NAME) >= 1, "dnsmasq saw no query");
    let status = s.g.gateway.ctl.run(&["status", "--json"]).or_die("status");
    assert!(
        status.contains(&format!("{RESOLVER}:53")) && status.contains("/etc/resolv.conf"),
        "status should name the upstream and where it came from: {status}"
    );
}

#[test]
fn a_big_answer_is_truncated_over_udp_without_edns_and_whole_over_tcp() {
    let s = site();
    let client = &s.g.net.client;
    let _q = up_client(&s, "laptop", client);
    let server = format!("@{GW_DNS}");
    let mut udp = String::new();
    wait_until(FIRST_ANSWER, "an answer over UDP", || {
        udp = dig(
            client,
            &[
                &server, BIG_NAME, "A", "+noedns", "+ignore", "+time=2", "+tries=1",
            ],
        );
        Ok(got_response(&udp))
    })
    .unwrap_or_else(|e| panic!("{e:#}\ndig said: {udp}"));
    assert!(flags(&udp).contains(" tc"), "no TC over UDP:\n{udp}");
    assert_eq!(answer_count(&udp), Some(0), "{udp}");
    assert!(
        !udp.contains("OPT PSEUDOSECTION"),
        "an OPT to a client without EDNS:\n{udp}"
    );
    let tcp = dig(
        client,
        &[&server, BIG_NAME, "A", "+tcp", "+time=5", "+tries=2"],
    );
    assert!(!flags(&tcp).contains(" tc"), "TC over TCP:\n{tcp}");
    assert_eq!(answer_count(&tcp), Some(BIG_COUNT), "{tcp}");
    // With EDNS 1232 over UDP it fits (60 A records are about 1 KB).
    let edns = dig(
        client,
        &[&server, BIG_NAME, "A", "+bufsize=1232", "+ignore"],
    );
    assert_eq!(answer_count(&edns), Some(BIG_COUNT), "{edns}");
    // Pipelined over one TCP connection: dig +keepopen sends them in turn.
    let two = dig(
        client,
        &[&server, "+tcp", "+keepopen", DB_NAME, BIG_NAME, "+short"],
    );
    assert!(
        two.contains(&DB.to_string()) && two.contains("198.19.101.100"),
        "{two}"
    );
}

#[test]
fn nobody_outside_the_tunnel_gets_an_answer() {
    let s = site();
    let net = &s.g.net;
    let (_q, conf) = up_client_conf(&s, "laptop", &net.client);
    let laptop_addr = conf.address4().or_die("laptop address").to_string();
    // The tunnel works: the client is answered.
    first_answer(&net.client);
    let before = s.resolver.all_queries();
    let quiet = |ns: &Netns, server: &str, what: &str| {
        for transport in ["+notcp", "+tcp"] {
            let out = dig(
                ns,
                &[
                    &format!("@{server}"),
                    DB_NAME,
                    transport,
                    "+time=2",
                    "+tries=1",
                ],
            );
            assert!(
                !got_response(&out),
                "{what} ({transport}) got an answer from {server}:\n{out}"
            );
        }
    };
    // The internet side: the gateway's public address, and the tunnel
    // address routed at the public interface.
    quiet(&net.inet, &GW_PUBLIC.to_string(), "the internet");
    net.inet
        .ip(&[
            "route",
            "add",
            "100.64.0.0/24",
            "via",
            &GW_PUBLIC.to_string(),
        ])
        .or_die("route");
    quiet(&net.inet, GW_DNS, "the internet");
    // The VPC side: the gateway's VPC address, and the tunnel address
    // routed at the VPC interface.
    quiet(&net.vpchost, &GW_VPC.to_string(), "a VPC host");
    net.vpchost
        .ip(&["route", "add", "100.64.0.0/24", "via", &GW_VPC.to_string()])
        .or_die("route");
    quiet(&net.vpchost, GW_DNS, "a VPC host");
    // A host outside that sends from a peer's tunnel address: the answer
    // would go into the tunnel, but the query must not even be forwarded.
    // Only the sockets' binding to the TUN stops this one.
    for ns in [&net.vpchost, &net.inet] {
        ns.ip(&["address", "add", &format!("{laptop_addr}/32"), "dev", "lo"])
            .or_die("a peer's address outside");
        for transport in ["+notcp", "+tcp"] {
            let out = dig(
                ns,
                &[
                    &format!("@{GW_DNS}"),
                    "-b",
                    &laptop_addr,
                    "spoofed.db.internal.example",
                    transport,
                    "+time=2",
                    "+tries=1",
                ],
            );
            assert!(
                !got_response(&out),
                "{ns:?} got an answer as the laptop:\n{out}"
            );
        }
    }
    // A peer that spoofs its inner source: an address that is not its own
    // (another peer's, and one nobody has) goes into the tunnel and is
    // dropped by cryptokey routing before it reaches any socket.
    let other = s.g.gateway.ctl.add_client("other").or_die("peer add other");
    let other_addr = other.address4().or_die("other's address").to_string();
    let iface = _q.iface().to_string();
    for spoofed in [other_addr.as_str(), "100.64.0.200"] {
        net.client
            .ip(&["address", "add", &format!("{spoofed}/32"), "dev", &iface])
            .or_die("spoofed address");
        let out = dig(
            &net.client,
            &[
                &format!("@{GW_DNS}"),
                "-b",
                spoofed,
                DB_NAME,
                "+time=2",
                "+tries=1",
            ],
        );
        assert!(
            !got_response(&out),
            "a query from {spoofed} was answered:\n{out}"
        );
    }
    assert_eq!(
        s.resolver.all_queries(),
        before,
        "the resolver saw queries nobody should have forwarded"
    );
}

#[test]
fn repeated_queries_reach_the_resolver_once_per_ttl_and_others_are_answered() {
    let s = site();
    let net = &s.g.net;
    let _q1 = up_client(&s, "laptop", &net.client);
    let laptop2 = net.add_laptop("laptop2", 3).or_die("second laptop");
    let _q2 = up_client(&s, "laptop2", &laptop2);
    first_answer(&net.client);
    let before = s.resolver.queries_for(DB_NAME);
    // 10,000 queries for the same name from the first laptop, at most 64
    // outstanding; each unanswered one is given up after a second.
    let flood = net
        .client
        .spawn(
            "flood",
            &["python3", "-c", FLOOD, GW_DNS, DB_NAME, "10000"],
            &[],
        )
        .or_die("flood");
    // Meanwhile the second laptop asks for another name 20 times.
    for i in 0..20 {
        let out = dig(
            &laptop2,
            &[
                &format!("@{GW_DNS}"),
                BIG_NAME,
                "+bufsize=1232",
                "+short",
                "+time=2",
                "+tries=5",
            ],
        );
        assert!(
            out.contains("198.19.101.100"),
            "query {i} of the second laptop was not answered during the flood:\n{out}"
        );
    }
    let mut flood = flood;
    let status = flood
        .wait_timeout(Duration::from_secs(600))
        .or_die("flood wait");
    let report = flood.log_tail(4096);
    assert!(
        status.is_some_and(|s| s.success()),
        "flood failed: {report}"
    );
    let answered: usize = report
        .lines()
        .find_map(|l| l.strip_prefix("answered "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count from the flood: {report}"));
    assert!(answered > 0, "{report}");
    // The TTL is an hour: the cache answered every one of them.
    assert_eq!(
        s.resolver.queries_for(DB_NAME),
        before,
        "queries reached the resolver though its answer was cached"
    );
}

/// Queries the flood must deliver to the forwarder, whatever the tunnel
/// drops on the way.
const FLOOD_QUERIES: u64 = 50_000;
/// What the flood may add to the gateway's peak memory: the cache's 4 MiB
/// budget, the query and reply queues (1,024 each, of at most 4 KiB), 256
/// queries in flight and 64 TCP connections' buffers, with room for the
/// allocator. The smallest VM has 512 MiB.
const FLOOD_GROWTH_LIMIT: u64 = 24 << 20;

/// VmRSS and VmHWM (the peak) of a process, in bytes.
fn memory(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).or_die("proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A query for `name` (type A, RD, no EDNS) with ID `id`.
fn wire_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[test]
fn a_query_flood_leaves_the_gateways_memory_bounded() {
    let mut s = site();
    let _q = up_client(&s, "laptop", &s.g.net.client);
    first_answer(&s.g.net.client);
    let pid = s.g.gateway.dev.process().pid();
    let (before, _) = memory(pid);
    let dns_status = |s: &Site| {
        let json = s.g.gateway.ctl.run(&["status", "--json"]).or_die("status");
        let json: serde_json::Value = serde_json::from_str(&json).or_die("status JSON");
        json["dns"].clone()
    };
    let queries = |s: &Site| {
        dns_status(s)["queries"]
            .as_u64()
            .unwrap_or_else(|| panic!("the gateway's forwarder is off"))
    };
    let start = queries(&s);
    let client = s.g.net.client.clone();
    // Unique names, in rounds of 2,000 sent back to back, until the
    // forwarder has counted enough of them: how many the tunnel drops on
    // the way changes only how many rounds it takes.
    let mut sent: u64 = 0;
    let mut answered: u64 = 0;
    while queries(&s) - start < FLOOD_QUERIES {
        assert!(
            sent < FLOOD_QUERIES * 20,
            "{sent} queries sent, only {} reached the forwarder",
            queries(&s) - start
        );
        let round = sent;
        let ns = client.clone();
        let got = std::thread::spawn(move || {
            ns.enter_current_thread().or_die("client namespace");
            let sock = UdpSocket::bind("0.0.0.0:0").or_die("bind");
            sock.connect((GW_DNS, 53)).or_die("connect");
            for i in round..round + 2000 {
                let name = format!("q{i}.{FLOOD_ZONE}");
                // A full socket buffer drops it, as the tunnel might.
                let _ = sock.send(&wire_query(i as u16, &name));
            }
            // Whatever came back by now; the count is only reported.
            sock.set_read_timeout(Some(Duration::from_millis(200)))
                .or_die("timeout");
            let mut buf = [0u8; 4096];
            let mut got = 0u64;
            while sock.recv(&mut buf).is_ok() {
                got += 1;
            }
            got
        })
        .join()
        .expect("flood thread");
        sent += 2000;
        answered += got;
    }
    // Then more TCP connections than it takes, each writing pipelined
    // queries and reading nothing back.
    let ns = client.clone();
    std::thread::spawn(move || {
        ns.enter_current_thread().or_die("client namespace");
        let mut conns = Vec::new();
        for c in 0..80u16 {
            let Ok(mut conn) = TcpStream::connect((GW_DNS, 53)) else {
                continue;
            };
            conn.set_write_timeout(Some(Duration::from_secs(2)))
                .or_die("timeout");
            let mut frames = Vec::new();
            for i in 0..200u16 {
                let q = wire_query(i, &format!("t{c}-{i}.{FLOOD_ZONE}"));
                frames.extend_from_slice(&(q.len() as u16).to_be_bytes());
                frames.extend_from_slice(&q);
            }
            // A forwarder that stops reading (its per-connection bound
            // on replies not yet written) makes this time out: expected.
            let _ = conn.write_all(&frames);
            conns.push(conn);
        }
        conns.len()
    })
    .join()
    .expect("tcp flood thread");
    let (after, peak) = memory(pid);
    let dns = dns_status(&s);
    // The metrics say what happened: every counted query, by transport,
    // and the flood's excess dropped as over the peer's rate.
    let metrics = vpcgate_e2e::raw_request(
        &s.g.net.gw,
        METRICS_PORT,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let metric = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the metrics:\n{metrics}"))
    };
    let udp = metric("vpcgate_dns_queries_total{transport=\"udp\"}");
    let tcp = metric("vpcgate_dns_queries_total{transport=\"tcp\"}");
    // Status, read after, counts at least as many (TCP connections may
    // still be read from).
    assert!(udp + tcp <= queries(&s), "metrics and status disagree");
    assert!(udp.saturating_sub(start) >= FLOOD_QUERIES, "{metrics}");
    assert!(
        metric("vpcgate_dns_results_total{result=\"rate_limited\"}") > 0,
        "one peer's flood of new names goes past its upstream rate:\n{metrics}"
    );
    assert!(metric("vpcgate_dns_cache_entries") > 0, "{metrics}");
    eprintln!(
        "dns flood: {} UDP queries sent, {} counted by the forwarder, {answered} answers read; \
         RSS {:.1} MiB before, {:.1} MiB after, peak {:.1} MiB; cache {} entries",
        sent,
        queries(&s) - start,
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        dns["cache_entries"],
    );
    assert!(
        peak.saturating_sub(before) <= FLOOD_GROWTH_LIMIT,
        "the flood took the gateway from {before} to a peak of {peak} bytes"
    );
    // And it still answers, once the flooding peer's rate has refilled.
    first_answer(&s.g.net.client);
}

/// Sends N queries for NAME to SERVER over UDP, with up to 64 outstanding,
/// and prints how many were answered.
const FLOOD: &str = r#"
import socket, struct, sys, time, select
server, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
def query(i):
    q = struct.pack(">HHHHHH", i & 0xFFFF, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack(">HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((server, 53))
sent = answered = 0
outstanding = {}
while sent < n or outstanding:
    while sent < n and len(outstanding) < 64:
        s.send(query(sent)); outstanding[sent & 0xFFFF] = time.monotonic(); sent += 1
    r, _, _ = select.select([s], [], [], 0.2)
    if r:
        data = s.recv(4096)
        if len(data) >= 12 and outstanding.pop(struct.unpack(">H", data[:2])[0], None) is not None:
            answered += 1
    now = time.monotonic()
    for k in [k for k, t in outstanding.items() if now - t > 1.0]:
        del outstanding[k]
print("answered", answered)
"#;

/// systemd-resolved as far as the daemon can tell: a `resolvectl` on the
/// daemon's PATH that keeps each link's servers, domains and default-route
/// flag in files, as `resolvectl status` would show them, and fails like a
/// host without resolved while `fail` exists.
struct FakeResolved {
    dir: PathBuf,
}

impl FakeResolved {
    fn new(ns: &Netns) -> FakeResolved {
        use std::os::unix::fs::PermissionsExt;
        let dir = ns.dir().join("fake-resolved");
        std::fs::create_dir_all(&dir).or_die("fake resolved dir");
        let script = dir.join("resolvectl");
        std::fs::write(
            &script,
            r#"#!/bin/sh
dir=$(dirname "$0")
echo "$*" >> "$dir/calls.log"
if [ -e "$dir/fail" ]; then
    echo "Failed to set DNS configuration: Unit dbus-org.freedesktop.resolve1.service not found." >&2
    exit 1
fi
case "$1" in
    dns) link=$2; shift 2; echo "$*" > "$dir/$link.dns" ;;
    domain) link=$2; shift 2; echo "$*" > "$dir/$link.domain" ;;
    default-route) echo "$3" > "$dir/$2.default-route" ;;
    revert) rm -f "$dir/$2.dns" "$dir/$2.domain" "$dir/$2.default-route" ;;
    *) echo "unknown command: $*" >&2; exit 1 ;;
esac
"#,
        )
        .or_die("fake resolvectl");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .or_die("chmod fake resolvectl");
        FakeResolved { dir }
    }

    fn path_env(&self) -> String {
        format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", self.dir.display())
    }

    /// The link's servers, routing domains and default-route flag.
    fn link(&self, link: &str) -> Option<(String, String, String)> {
        let read = |what: &str| {
            std::fs::read_to_string(self.dir.join(format!("{link}.{what}")))
                .ok()
                .map(|s| s.trim().to_string())
        };
        Some((read("dns")?, read("domain")?, read("default-route")?))
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.dir.join("calls.log")).unwrap_or_default()
    }
}

/// Long enough for a few route polls (2 s each) on a machine many times
/// slower than this one; it only bounds a daemon that never applies.
const LEARN: Duration = Duration::from_secs(60);

#[test]
fn a_vpcgate_client_gets_split_dns_from_its_gateway_and_loses_it_with_the_gateway() {
    let s = site();
    let gctl = &s.g.gateway.ctl;
    gctl.run(&["set", "--dns-zones", "internal.example,MongoDB.net."])
        .or_die("zones");
    let client = &s.g.net.client;
    let resolved = FakeResolved::new(client);
    let mut cfg = vpcgate_e2e::VpcgatedConfig::new(51821, "100.64.0.50/24");
    cfg.env.push(("PATH".into(), resolved.path_env()));
    let dev = vpcgate_e2e::WgDev::vpcgated(client, "sdc", &cfg).or_die("client vpcgated");
    let cctl = vpcgate_e2e::Vpcgate::for_dev(&dev).or_die("client CLI");
    let link = dev.name().to_string();
    let client_key = dev.public_key().or_die("client key");
    gctl.run(&[
        "peer",
        "add",
        "laptop",
        "--public-key",
        &client_key,
        "--allowed-ips",
        "100.64.0.50/32",
    ])
    .or_die("gateway knows the laptop");
    cctl.run(&[
        "peer",
        "add",
        "gateway",
        "--public-key",
        &s.g.gateway.public_key,
        "--endpoint",
        &format!("{GW_PUBLIC}:51820"),
        "--allowed-ips",
        "100.64.0.1/32",
        "--accept-routes",
    ])
    .or_die("laptop trusts the gateway");

    let zones_only = (
        GW_DNS.to_string(),
        "~internal.example ~mongodb.net".to_string(),
        "no".to_string(),
    );
    wait_until(LEARN, "the gateway's DNS on the laptop's TUN link", || {
        Ok(resolved.link(&link).as_ref() == Some(&zones_only))
    })
    .unwrap_or_else(|e| panic!("{e:#}\nresolvectl calls:\n{}", resolved.calls()));
    // The server it was given answers the private name through the tunnel.
    let said = dig(
        client,
        &[
            &format!("@{}", zones_only.0),
            DB_NAME,
            "+short",
            "+time=5",
            "+tries=3",
        ],
    );
    assert!(said.contains(&DB.to_string()), "dig said: {said}");
    let json = cctl.run(&["status", "--json"]).or_die("client status");
    let text = cctl.run(&["status"]).or_die("client status");
    assert!(
        text.contains(
            "split dns: ~internal.example, ~mongodb.net via 100.64.0.1 (offered by gateway)"
        ) && !text.contains("not applied"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&json).or_die("status JSON");
    assert_eq!(json["link_dns"]["applied"], true, "{json}");
    assert_eq!(json["link_dns"]["servers"][0], GW_DNS, "{json}");

    // The gateway's VM loses its resolver: its forwarder has nowhere to
    // forward, so it stops offering itself, and the laptop's names go back
    // to the laptop's own resolver. The resolver back, so is the offer.
    s.g.net
        .gw
        .set_resolv_conf("# no name server\n")
        .or_die("gateway without a resolver");
    wait_until(LEARN, "the offer to be withdrawn with the upstream", || {
        Ok(resolved.link(&link).is_none())
    })
    .unwrap_or_else(|e| panic!("{e:#}\nresolvectl calls:\n{}", resolved.calls()));
    s.g.net
        .gw
        .set_resolv_conf(&format!("nameserver {RESOLVER}\n"))
        .or_die("gateway resolver back");
    wait_until(LEARN, "the offer to come back with the upstream", || {
        Ok(resolved.link(&link).as_ref() == Some(&zones_only))
    })
    .unwrap_or_else(|e| panic!("{e:#}\nresolvectl calls:\n{}", resolved.calls()));

    // The gateway turns DNS off: the link's DNS goes. On again, it is back.
    gctl.run(&["set", "--dns", "off"]).or_die("dns off");
    wait_until(LEARN, "the link's DNS to be reverted", || {
        Ok(resolved.link(&link).is_none())
    })
    .unwrap_or_else(|e| panic!("{e:#}\nresolvectl calls:\n{}", resolved.calls()));
    assert!(resolved.calls().contains(&format!("revert {link}")));

    // With resolved away, status says so and prints the command instead.
    std::fs::write(resolved.dir.join("fail"), "").or_die("fail marker");
    gctl.run(&["set", "--dns", "on", "--dns-zones", "none"])
        .or_die("dns on for every name");
    let mut text = String::new();
    wait_until(LEARN, "status to print the command", || {
        text = cctl.run(&["status"]).or_die("status");
        Ok(text.contains("split dns is not applied"))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{text}"));
    assert!(
        text.contains(&format!(
            "to apply it by hand: resolvectl dns {link} {GW_DNS} && resolvectl domain {link} '~.'"
        )) && text.contains("dbus-org.freedesktop.resolve1.service not found"),
        "{text}"
    );
    // Retried until resolved answers.
    std::fs::remove_file(resolved.dir.join("fail")).or_die("resolved back");
    let every_name = (GW_DNS.to_string(), "~.".to_string(), "yes".to_string());
    wait_until(LEARN, "the retry to apply it", || {
        Ok(resolved.link(&link).as_ref() == Some(&every_name))
    })
    .unwrap_or_else(|e| panic!("{e:#}\nresolvectl calls:\n{}", resolved.calls()));

    // The gateway's peer goes away: so does its DNS.
    cctl.run(&["peer", "remove", "gateway"]).or_die("remove");
    wait_until(LEARN, "the link's DNS to go with its gateway", || {
        Ok(resolved.link(&link).is_none())
    })
    .unwrap_or_else(|e| panic!("{e:#}\nresolvectl calls:\n{}", resolved.calls()));
}

/// doctor's `dns` check, from `vpcgate doctor --json` on the gateway.
fn doctor_dns(s: &Site) -> (String, String) {
    let out =
        s.g.gateway
            .ctl
            .output(&["doctor", "--json"])
            .or_die("doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    let checks: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}): {text}"));
    let check = checks
        .as_array()
        .and_then(|all| all.iter().find(|c| c["id"] == "dns"))
        .unwrap_or_else(|| panic!("no dns check in {text}"));
    (
        check["status"].as_str().unwrap_or_default().to_string(),
        check["message"].as_str().unwrap_or_default().to_string(),
    )
}

#[test]
fn doctor_asks_the_upstream_and_fails_when_it_does_not_answer() {
    let s = site();
    let (status, message) = doctor_dns(&s);
    assert_eq!(status, "ok", "{message}");
    assert!(
        message.contains(&format!(
            "{RESOLVER}:53 (from /etc/resolv.conf), which answer"
        )),
        "{message}"
    );
    // The VM's resolver moves to an address where nothing answers; the
    // gateway follows its resolv.conf, and doctor says the upstream is dead.
    s.g.net
        .gw
        .set_resolv_conf("nameserver 198.18.64.3\n")
        .or_die("gateway resolv.conf");
    wait_until(LEARN, "the forwarder to follow resolv.conf", || {
        let json = s.g.gateway.ctl.run(&["status", "--json"]).or_die("status");
        Ok(json.contains("198.18.64.3:53"))
    })
    .or_die("upstream changed");
    let (status, message) = doctor_dns(&s);
    assert_eq!(status, "fail", "{message}");
    assert!(
        message.contains("no upstream (from /etc/resolv.conf) answers: 198.18.64.3:53"),
        "{message}"
    );
}
