//! Hostile input: malformed, oversized and plain random input on every
//! surface the daemon has. The CLI refuses bad arguments with a message and
//! changes nothing; garbage and floods on the control and UAPI sockets
//! leave both serving, with bounded memory and no leaked connections; and
//! malformed WireGuard datagrams of every type are counted as drops while a
//! real peer's session carries on undisturbed.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use vpcgate_e2e::{
    gen_keypair, require_root, seed, wait_for_ping, wait_until, Netns, OrDie, Pair, PairSpec, Rng,
    Status, Vpcgate, VpcgatedConfig, WgDev,
};

/// A gateway with some state: a public endpoint, advertised ranges, a
/// generated client and a peer with its own key.
fn configured_gateway(tag: &str, extra_args: &[&str]) -> (Netns, WgDev, Vpcgate) {
    let ns = Netns::new(tag).or_die("namespace");
    let mut cfg = VpcgatedConfig::new(51820, "100.64.0.1/24");
    cfg.state_dir = Some(ns.dir().join("state"));
    cfg.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
    let dev = WgDev::vpcgated(&ns, tag, &cfg).or_die("vpcgated starts");
    let ctl = Vpcgate::for_dev(&dev).or_die("CLI");
    ctl.run(&["set", "--public-endpoint", "198.18.2.10:51820"])
        .or_die("public endpoint");
    ctl.advertise(&["198.18.64.0/20", "198.19.101.0/24"])
        .or_die("advertise");
    ctl.run(&["peer", "add", "laptop"]).or_die("generated peer");
    let server = gen_keypair().or_die("key");
    ctl.run(&[
        "peer",
        "add",
        "server",
        "--public-key",
        &server.public,
        "--allowed-ips",
        "100.64.0.9/32",
        "--endpoint",
        "198.18.0.9:51820",
    ])
    .or_die("peer with its own key");
    (ns, dev, ctl)
}

/// Everything a client can observe of the daemon's state.
fn snapshot(dev: &WgDev, ctl: &Vpcgate) -> (String, String) {
    (
        ctl.run(&["status", "--json"]).or_die("status"),
        dev.wg(&["show", dev.name(), "dump"]).or_die("wg show dump"),
    )
}

fn no_panic_in_log(dev: &mut WgDev) {
    dev.check_running().or_die("vpcgated still running");
    let log = std::fs::read_to_string(dev.process().log_path()).or_die("read the daemon's log");
    assert!(!log.contains("panicked"), "the daemon panicked:\n{log}");
}

/// The refusal of one command: non-zero, nothing on stdout, a short
/// message on stderr that mentions one of `expected`, and no panic.
fn assert_refused(what: &str, out: &Output, expected: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    let shown: String = err.chars().take(600).collect();
    assert!(
        !out.status.success(),
        "{what}: accepted; stdout {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        out.status.code().map(|c| c == 1 || c == 2),
        Some(true),
        "{what}: exit {} (a signal or an odd code); stderr {shown}",
        out.status
    );
    assert!(
        out.stdout.is_empty(),
        "{what}: a refused command printed to stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!err.trim().is_empty(), "{what}: no message");
    for bad in ["panicked", "RUST_BACKTRACE", "stack backtrace"] {
        assert!(!err.contains(bad), "{what}: {bad} in {shown}");
    }
    // clap quotes a bad value back whole; vpcgate's own messages (and the
    // daemon's) cut what they quote short.
    assert!(
        err.starts_with("error: ") || err.len() <= 1024,
        "{what}: a {}-byte message is not a clear one: {shown}…",
        err.len()
    );
    assert!(
        expected.iter().any(|e| err.contains(e)),
        "{what}: message does not say any of {expected:?}: {shown}"
    );
}

/// `n` distinct /32s in 198.18.0.0/15.
fn many_routes(n: u32) -> Vec<String> {
    (0..n)
        .map(|i| format!("198.{}.{}.{}/32", 18 + (i >> 16), (i >> 8) & 0xff, i & 0xff))
        .collect()
}

/// Splits `items` into comma-joined arguments under Linux's 128 KiB limit
/// for one argument.
fn as_arguments(items: &[String]) -> Vec<String> {
    let mut args = vec![String::new()];
    for item in items {
        let last = args.last_mut().expect("one argument");
        if last.len() + item.len() + 1 > 120 * 1024 {
            args.push(item.clone());
        } else {
            if !last.is_empty() {
                last.push(',');
            }
            last.push_str(item);
        }
    }
    args
}

#[test]
fn cli_refuses_hostile_arguments_and_changes_nothing() {
    require_root();
    let (_ns, mut dev, ctl) = configured_gateway("hc", &[]);
    let before = snapshot(&dev, &ctl);
    let key = gen_keypair().or_die("key");
    let huge = "9".repeat(100_000);
    let long_name = "a".repeat(100_000);
    let one_argument = as_arguments(&many_routes(100_000))
        .into_iter()
        .next()
        .expect("an argument");
    let wide = format!("{},198.18.64.0/20", "0".repeat(50_000));
    let huge_endpoint = format!("{long_name}:51820");
    let name33 = "b".repeat(33);

    let cases: Vec<(&str, Vec<&str>, &[&str])> = vec![
        // advertise-routes
        (
            "control character",
            vec!["advertise-routes", "198.18.64.0/20\x01"],
            &["not a CIDR prefix"],
        ),
        (
            "escape sequence",
            vec!["advertise-routes", "\x1b[2J\x1b]0;pwned\x07"],
            &["not a CIDR prefix"],
        ),
        (
            "DEL",
            vec!["advertise-routes", "198.18.64.0/2\x7f"],
            &["not a CIDR prefix"],
        ),
        (
            "fullwidth digits",
            vec!["advertise-routes", "１９８.18.64.0/20"],
            &["not a CIDR prefix"],
        ),
        (
            "zero-width space",
            vec!["advertise-routes", "198.18.64.0/20\u{200b}"],
            &["not a CIDR prefix"],
        ),
        (
            "right-to-left override",
            vec!["advertise-routes", "\u{202e}02/0.46.81.891"],
            &["not a CIDR prefix"],
        ),
        (
            "emoji",
            vec!["advertise-routes", "🦀"],
            &["not a CIDR prefix"],
        ),
        (
            "negative length",
            vec!["advertise-routes", "198.18.64.0/-1"],
            &["not a CIDR prefix"],
        ),
        (
            "length 33",
            vec!["advertise-routes", "198.18.64.0/33"],
            &["not a CIDR prefix"],
        ),
        (
            "overflowing length",
            vec!["advertise-routes", "198.18.64.0/18446744073709551617"],
            &["not a CIDR prefix"],
        ),
        (
            "huge number",
            vec!["advertise-routes", &huge],
            &["not a CIDR prefix"],
        ),
        (
            "IPv6 length 129",
            vec!["advertise-routes", "fd00:99::/129"],
            &["not a CIDR prefix"],
        ),
        (
            "octet 256",
            vec!["advertise-routes", "198.18.256.0/24"],
            &["not a CIDR prefix"],
        ),
        (
            "leading zeros",
            vec!["advertise-routes", &wide],
            &["not a CIDR prefix"],
        ),
        (
            "9000 routes in one argument",
            vec!["advertise-routes", &one_argument],
            &["at most 64"],
        ),
        (
            "clear and routes",
            vec!["advertise-routes", "--clear", "198.18.64.0/20"],
            &["cannot be used with"],
        ),
        (
            "unknown flag",
            vec!["advertise-routes", "--exit-nod", "0.0.0.0/0"],
            &["unexpected argument"],
        ),
        // set
        (
            "negative port",
            vec!["set", "--listen-port", "-1"],
            &["unexpected argument", "invalid value"],
        ),
        (
            "port 65536",
            vec!["set", "--listen-port", "65536"],
            &["invalid value"],
        ),
        (
            "overflowing port",
            vec!["set", "--listen-port", "18446744073709551616"],
            &["invalid value"],
        ),
        (
            "empty port",
            vec!["set", "--listen-port", ""],
            &["invalid value"],
        ),
        (
            "hex port",
            vec!["set", "--listen-port", "0x10"],
            &["invalid value"],
        ),
        ("MTU 0", vec!["set", "--mtu", "0"], &["1280 to 65535"]),
        (
            "MTU 65536",
            vec!["set", "--mtu", "65536"],
            &["1280 to 65535"],
        ),
        (
            "MTU 2^32",
            vec!["set", "--mtu", "4294967296"],
            &["invalid value"],
        ),
        ("MTU -1280", vec!["set", "--mtu=-1280"], &["invalid value"]),
        ("MTU huge", vec!["set", "--mtu", &huge], &["invalid value"]),
        ("snat ON", vec!["set", "--snat", "ON"], &["on or off"]),
        ("snat empty", vec!["set", "--snat", ""], &["on or off"]),
        (
            "snat escape",
            vec!["set", "--snat", "\x1b[31m"],
            &["on or off"],
        ),
        (
            "endpoint empty",
            vec!["set", "--public-endpoint", ""],
            &["HOST:PORT"],
        ),
        (
            "endpoint colon",
            vec!["set", "--public-endpoint", ":"],
            &["HOST:PORT"],
        ),
        (
            "endpoint port 65536",
            vec!["set", "--public-endpoint", "198.18.2.10:65536"],
            &["HOST:PORT"],
        ),
        (
            "endpoint negative port",
            vec!["set", "--public-endpoint", "198.18.2.10:-1"],
            &["HOST:PORT"],
        ),
        (
            "endpoint open bracket",
            vec!["set", "--public-endpoint", "[fd00::10:51820"],
            &["HOST:PORT"],
        ),
        (
            "endpoint escape",
            vec!["set", "--public-endpoint", "\x1b[2J.example:51820"],
            &["HOST:PORT"],
        ),
        (
            "endpoint unicode",
            vec!["set", "--public-endpoint", "шлюз.example:51820"],
            &["HOST:PORT"],
        ),
        (
            "endpoint huge",
            vec!["set", "--public-endpoint", &huge_endpoint],
            &["HOST:PORT"],
        ),
        (
            "endpoint newline",
            vec![
                "set",
                "--public-endpoint",
                "gw.example:51820\nEndpoint = 198.18.9.9:1",
            ],
            &["HOST:PORT"],
        ),
        ("address empty", vec!["set", "--address", ""], &["one IPv4"]),
        (
            "address /33",
            vec!["set", "--address", "100.64.0.1/33"],
            &["not an address"],
        ),
        (
            "address /129",
            vec!["set", "--address", "fd00:64::1/129"],
            &["not an address"],
        ),
        (
            "address twice",
            vec!["set", "--address", "100.64.0.1/24,100.64.0.1/24"],
            &["one IPv4"],
        ),
        (
            "address over an advertised range",
            vec!["set", "--address", "198.18.64.1/24"],
            &["overlap"],
        ),
        (
            "address default",
            vec!["set", "--address", "0.0.0.0/0"],
            &["network address", "overlap"],
        ),
        (
            "address huge",
            vec!["set", "--address", &huge],
            &["not an address"],
        ),
        ("set nothing", vec!["set"], &["Usage"]),
        // peer add
        (
            "empty name",
            vec!["peer", "add", ""],
            &["not a valid peer name"],
        ),
        (
            "huge name",
            vec!["peer", "add", &long_name],
            &["not a valid peer name"],
        ),
        (
            "path name",
            vec!["peer", "add", "../../etc/passwd"],
            &["not a valid peer name"],
        ),
        (
            "escape name",
            vec!["peer", "add", "x\x1b[2J"],
            &["not a valid peer name"],
        ),
        (
            "newline name",
            vec!["peer", "add", "x\n[Peer]"],
            &["not a valid peer name"],
        ),
        (
            "unicode name",
            vec!["peer", "add", "ноутбук"],
            &["not a valid peer name"],
        ),
        (
            "emoji name",
            vec!["peer", "add", "💻"],
            &["not a valid peer name"],
        ),
        (
            "dot name",
            vec!["peer", "add", "."],
            &["not a valid peer name"],
        ),
        (
            "33-byte name",
            vec!["peer", "add", &name33],
            &["not a valid peer name"],
        ),
        (
            "key empty",
            vec!["peer", "add", "x", "--public-key", ""],
            &["not a base64", "32-byte"],
        ),
        (
            "key short",
            vec!["peer", "add", "x", "--public-key", &key.public[..43]],
            &["not a base64", "32-byte"],
        ),
        (
            "key of 33 bytes",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            ],
            &["32-byte"],
        ),
        (
            "key in hex",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
            ],
            &["32-byte", "not a base64"],
        ),
        (
            "key huge",
            vec!["peer", "add", "x", "--public-key", &long_name],
            &["32-byte", "not a base64"],
        ),
        (
            "key escape",
            vec!["peer", "add", "x", "--public-key", "\x1b[2J"],
            &["not a base64"],
        ),
        (
            "all-zero key",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            ],
            &["all zeros"],
        ),
        (
            "allowed IP twice",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &key.public,
                "--allowed-ips",
                "100.64.0.5/32,100.64.0.5/32",
            ],
            &["listed twice"],
        ),
        (
            "allowed IP /33",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &key.public,
                "--allowed-ips",
                "100.64.0.2/33",
            ],
            &["not a CIDR prefix"],
        ),
        (
            "allowed IP 999",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &key.public,
                "--allowed-ips",
                "999.1.1.1/32",
            ],
            &["not a CIDR prefix"],
        ),
        (
            "allowed IP junk",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &key.public,
                "--allowed-ips",
                "\u{202e}\x07",
            ],
            &["not a CIDR prefix"],
        ),
        (
            "endpoint port 0",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &key.public,
                "--endpoint",
                "198.18.0.1:0",
            ],
            &["HOST:PORT"],
        ),
        (
            "endpoint no port",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &key.public,
                "--endpoint",
                "[fd00::1]",
            ],
            &["HOST:PORT"],
        ),
        (
            "endpoint escape host",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &key.public,
                "--endpoint",
                "\x1b[2J:51820",
            ],
            &["HOST:PORT"],
        ),
        (
            "keepalive -1",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &key.public,
                "--keepalive=-1",
            ],
            &["invalid value"],
        ),
        (
            "keepalive 65536",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &key.public,
                "--keepalive",
                "65536",
            ],
            &["invalid value"],
        ),
        (
            "keepalive float",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &key.public,
                "--keepalive",
                "1e3",
            ],
            &["invalid value"],
        ),
        (
            "default route without accept",
            vec![
                "peer",
                "add",
                "x",
                "--public-key",
                &key.public,
                "--accept-default-route",
            ],
            &["--accept-routes"],
        ),
        (
            "qr with json",
            vec!["--json", "peer", "add", "x", "--qr"],
            &["cannot be combined"],
        ),
        // peer remove / config / list, status, version, genkey
        (
            "remove empty",
            vec!["peer", "remove", ""],
            &["no peer named"],
        ),
        (
            "remove huge",
            vec!["peer", "remove", &long_name],
            &["no peer named"],
        ),
        (
            "remove escape",
            vec!["peer", "remove", "\x1b[2J"],
            &["no peer named"],
        ),
        (
            "remove by key",
            vec!["peer", "remove", &key.public],
            &["no peer named"],
        ),
        (
            "config escape",
            vec!["peer", "config", "\x1b]0;x\x07"],
            &["no peer named"],
        ),
        (
            "config of a peer with its own key",
            vec!["peer", "config", "server"],
            &["brought its own key"],
        ),
        (
            "list with an argument",
            vec!["peer", "list", "x"],
            &["unexpected argument"],
        ),
        (
            "status with an argument",
            vec!["status", "--verbose"],
            &["unexpected argument"],
        ),
        (
            "unknown command",
            vec!["reboot"],
            &["unrecognized subcommand"],
        ),
        (
            "version with an argument",
            vec!["version", "x"],
            &["unexpected argument"],
        ),
        (
            "genkey with an argument",
            vec!["genkey", "--bits", "4096"],
            &["unexpected argument"],
        ),
    ];
    let mut refused = 0;
    for (what, args, expected) in &cases {
        let out = ctl.output(args).or_die("run vpcgate");
        assert_refused(what, &out, expected);
        assert_eq!(snapshot(&dev, &ctl), before, "{what}: the state changed");
        refused += 1;
    }

    // 100,000 routes: more than one request may carry.
    let routes = many_routes(100_000);
    let mut args = vec!["advertise-routes".to_string()];
    args.extend(as_arguments(&routes));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ctl.output(&argv).or_die("run vpcgate");
    assert_refused(
        "100,000 routes",
        &out,
        &["more than the 1048576 vpcgated accepts"],
    );
    let mut args = ["peer", "add", "x", "--public-key", &key.public]
        .map(str::to_string)
        .to_vec();
    for chunk in as_arguments(&routes) {
        args.extend(["--allowed-ips".to_string(), chunk]);
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ctl.output(&argv).or_die("run vpcgate");
    assert_refused(
        "100,000 allowed IPs",
        &out,
        &["more than the 1048576 vpcgated accepts"],
    );
    // Thousands of bad entries give one short message, not thousands.
    let junk = vec!["x".to_string(); 60_000];
    let mut args = vec!["advertise-routes".to_string()];
    args.extend(as_arguments(&junk));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ctl.output(&argv).or_die("run vpcgate");
    assert_refused(
        "60,000 bad routes",
        &out,
        &["60000 prefixes given; at most 64"],
    );
    assert_eq!(
        snapshot(&dev, &ctl),
        before,
        "a flood of routes changed the state"
    );

    // Arguments that are not UTF-8 at all.
    for args in [
        vec![&b"advertise-routes"[..], b"198.18.64.0/20\xff"],
        vec![b"peer", b"add", b"\xc3\x28"],
        vec![b"set", b"--public-endpoint", b"\xfe\xfe:51820"],
    ] {
        let os: Vec<&OsStr> = args.iter().map(|a| OsStr::from_bytes(a)).collect();
        let out = ctl.output_os(&os).or_die("run vpcgate");
        assert_refused(&format!("{os:?}"), &out, &["invalid UTF-8"]);
        refused += 1;
    }
    assert_eq!(
        snapshot(&dev, &ctl),
        before,
        "non-UTF-8 arguments changed the state"
    );

    // Hostile stdin for the commands that read it.
    let mut rng = Rng(seed(""));
    let garbage = rng.bytes(10 << 20);
    for (what, args, stdin, expected) in [
        (
            "pubkey of 10 MB of junk",
            vec!["pubkey"],
            &garbage[..],
            &[
                "not a base64",
                "UTF-8",
                "stream did not contain valid UTF-8",
            ][..],
        ),
        (
            "pubkey of NULs",
            vec!["pubkey"],
            &[0u8; 44][..],
            &["not a base64"][..],
        ),
        (
            "pubkey of a short key",
            vec!["pubkey"],
            b"AAAA\n",
            &["32-byte"][..],
        ),
        (
            "qr-decode of junk",
            vec!["qr-decode"],
            b"\x1b[2J\xe2\x96\x88\xe2\x96\x88 \n",
            &["QR", "qr", "decode"][..],
        ),
    ] {
        let out = ctl.output_stdin(&args, Some(stdin)).or_die("run vpcgate");
        assert_refused(what, &out, expected);
        refused += 1;
    }

    // A socket that is not vpcgated's.
    for socket in ["/dev/null", "/", "", "/nonexistent/vpcgated.sock"] {
        let bin = vpcgate_e2e::vpcgate_bin().or_die("binary");
        let out = dev
            .ns()
            .exec_raw(&[&bin.to_string_lossy(), "--socket", socket, "status"])
            .or_die("run vpcgate");
        assert_refused(
            &format!("--socket {socket:?}"),
            &out,
            &["cannot reach vpcgated", "a value is required"],
        );
        refused += 1;
    }

    assert_eq!(snapshot(&dev, &ctl), before, "the state changed");
    no_panic_in_log(&mut dev);
    eprintln!("{} hostile commands refused, state unchanged", refused + 3);
}

/// Resident memory high-water mark of `pid` in KiB, after resetting it, so
/// that each measurement covers only what follows.
fn reset_peak(pid: i32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").or_die("reset VmHWM");
}

fn peak_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).or_die("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .or_die("list fds")
        .count()
}

fn connect(path: &Path) -> UnixStream {
    let s = UnixStream::connect(path).or_die("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .or_die("read timeout");
    s.set_write_timeout(Some(Duration::from_secs(20)))
        .or_die("write timeout");
    s
}

/// Writes `total` bytes of `chunk` repeated; returns how many were taken
/// before the daemon closed the connection.
fn write_flood(stream: &mut UnixStream, chunk: &[u8], total: usize) -> usize {
    let mut written = 0;
    while written < total {
        match stream.write(chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n,
        }
    }
    written
}

fn control_frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// Reads UAPI replies (each ends with a blank line) until `n` have come.
fn uapi_replies(stream: &mut UnixStream, n: usize) -> String {
    let mut reply = Vec::new();
    let mut chunk = [0u8; 4096];
    while reply.windows(2).filter(|w| w == b"\n\n").count() < n {
        let got = stream.read(&mut chunk).or_die("read UAPI reply");
        assert!(
            got > 0,
            "UAPI closed after {:?}",
            String::from_utf8_lossy(&reply)
        );
        reply.extend_from_slice(&chunk[..got]);
    }
    String::from_utf8(reply).or_die("UTF-8 reply")
}

#[test]
fn socket_garbage_and_floods_leave_both_sockets_serving() {
    require_root();
    let (_ns, mut dev, ctl) = configured_gateway("hs", &[]);
    let pid = dev.process().pid();
    let control = dev.control_socket().expect("control socket").to_path_buf();
    let uapi = dev.uapi_socket();
    let before = snapshot(&dev, &ctl);
    let get_before = {
        let mut s = connect(&uapi);
        s.write_all(b"get=1\n\n").or_die("send");
        uapi_replies(&mut s, 1)
    };
    let fds_before = open_fds(pid);
    let mut rng = Rng(seed(""));
    const MB100: usize = 100 << 20;

    // 100 MB on the control socket behind a length no frame may have: the
    // daemon answers an error and stops reading at once.
    reset_peak(pid);
    let base = peak_kib(pid);
    let mut s = connect(&control);
    let written = write_flood(&mut s, &[0xff; 64 * 1024], MB100);
    let reply: Result<vpcgate_proto::Response, _> = vpcgate_proto::read_frame(&mut s);
    assert!(
        matches!(&reply, Ok(vpcgate_proto::Response::Error { message }) if message.contains("1048576")),
        "{reply:?}"
    );
    assert!(
        written < MB100,
        "the daemon read all 100 MB behind a bad length"
    );
    drop(s);
    // 100 MB of maximal frames of junk: each is read, refused, and answered.
    let mut s = connect(&control);
    let frame = control_frame(&vec![b'x'; vpcgate_proto::MAX_FRAME]);
    let replies = std::thread::scope(|scope| {
        let mut reader = s.try_clone().or_die("clone");
        let counter = scope.spawn(move || {
            let mut n = 0;
            while let Ok(vpcgate_proto::Response::Error { .. }) =
                vpcgate_proto::read_frame::<vpcgate_proto::Response>(&mut reader)
            {
                n += 1;
            }
            n
        });
        let written = write_flood(&mut s, &frame, MB100);
        assert!(written >= MB100, "the daemon stopped reading valid frames");
        s.shutdown(std::net::Shutdown::Write).or_die("shutdown");
        counter.join().expect("reader")
    });
    drop(s);
    assert!(replies >= MB100 / frame.len(), "{replies} error replies");
    let grown = peak_kib(pid).saturating_sub(base);
    assert!(
        grown < 16 * 1024,
        "200 MB on the control socket grew the daemon by {grown} KiB"
    );

    // 100 MB on the UAPI socket as one line: refused with EMSGSIZE, and
    // the daemon does not hold the line in memory.
    reset_peak(pid);
    let base = peak_kib(pid);
    let mut s = connect(&uapi);
    s.write_all(b"set=1\n").or_die("send");
    let written = write_flood(&mut s, &[b'a'; 64 * 1024], MB100);
    assert_eq!(written, MB100, "the UAPI stopped reading a long line");
    s.write_all(b"\n\nget=1\n\n").or_die("send");
    let replies = uapi_replies(&mut s, 2);
    assert!(replies.starts_with("errno=-90\n\n"), "{replies:.200}");
    assert!(
        replies.ends_with(&get_before),
        "the same connection still serves"
    );
    drop(s);
    let grown = peak_kib(pid).saturating_sub(base);
    assert!(
        grown < 16 * 1024,
        "a 100 MB UAPI line grew the daemon by {grown} KiB"
    );

    // Many connections at once: random bytes, junk frames, and half frames
    // that stall, on both sockets.
    let mut stalled = Vec::new();
    for i in 0..64 {
        let mut c = connect(&control);
        let mut frame = control_frame(br#"{"request":"status"}"#);
        frame.truncate(1 + i % (frame.len() - 1));
        c.write_all(&frame).or_die("send half a frame");
        stalled.push(c);
        let mut u = connect(&uapi);
        u.write_all(b"set=1\nprivate_key=0000")
            .or_die("send half a line");
        stalled.push(u);
    }
    for _ in 0..300 {
        let len = rng.below(8192) as usize;
        let junk = rng.bytes(len);
        for path in [&control, &uapi] {
            let mut c = connect(path);
            let _ = c.write_all(&junk);
            let _ = c.shutdown(std::net::Shutdown::Write);
            let mut sink = Vec::new();
            let _ = c.read_to_end(&mut sink);
        }
    }
    for _ in 0..100 {
        let len = rng.below(4096) as usize;
        let mut c = connect(&control);
        c.write_all(&control_frame(&rng.bytes(len))).or_die("send");
        let reply = vpcgate_proto::read_frame::<vpcgate_proto::Response>(&mut c);
        assert!(
            matches!(reply, Ok(vpcgate_proto::Response::Error { .. })),
            "a junk frame got {reply:?}"
        );
    }
    // Junk lines and a real request on one UAPI connection.
    let mut u = connect(&uapi);
    for _ in 0..50 {
        let len = 1 + rng.below(200) as usize;
        let mut line = rng.bytes(len);
        line.retain(|&b| b != b'\n');
        if line.is_empty() {
            line.push(b'x');
        }
        line.extend_from_slice(b"\n\n");
        u.write_all(&line).or_die("send");
    }
    u.write_all(b"get=1\n\n").or_die("send");
    let replies = uapi_replies(&mut u, 51);
    assert_eq!(
        replies.matches("errno=-").count(),
        50,
        "each junk request is refused: {replies:.300}"
    );
    assert!(replies.ends_with(&get_before));
    // Both sockets answer while the stalled clients wait.
    assert_eq!(snapshot(&dev, &ctl), before, "the state changed");

    drop(stalled);
    drop(u);
    wait_until(
        Duration::from_secs(15),
        "the daemon to close every connection",
        || Ok(open_fds(pid) <= fds_before),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {} fds, {fds_before} before", open_fds(pid)));
    assert_eq!(snapshot(&dev, &ctl), before, "the state changed");
    no_panic_in_log(&mut dev);
}

/// Sizes of the WireGuard messages: initiation, response, cookie reply,
/// and the smallest data message (an empty, keepalive one).
const SIZES: [(u8, usize); 4] = [(1, 148), (2, 92), (3, 64), (4, 32)];

/// What a datagram must be counted as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Counted as `malformed`, or, for an initiation beyond its source's
    /// share, as `rate_limited`.
    Malformed,
    UnknownPeer,
    /// Reaches the real peer's session and fails to verify there: counted
    /// as `handshake_failed` or `decrypt_failed`.
    Rejected,
}

fn message(rng: &mut Rng, kind: u8, len: usize, receiver: Option<u32>) -> Vec<u8> {
    let mut d = rng.bytes(len);
    if len >= 4 {
        d[..4].copy_from_slice(&[kind, 0, 0, 0]);
    } else if len > 0 {
        d[0] = kind;
    }
    // The receiver index sits after the type (and, in a response, after
    // the sender index); `index >> 8` is the peer's slot.
    let at = if kind == 2 { 8 } else { 4 };
    if let Some(index) = receiver.filter(|_| kind != 1 && len >= at + 4) {
        d[at..at + 4].copy_from_slice(&index.to_le_bytes());
    }
    d
}

fn datagrams(rng: &mut Rng) -> Vec<(Vec<u8>, Expect)> {
    let mut out = Vec::new();
    for (kind, size) in SIZES {
        // Truncated at every length.
        for len in 0..size {
            out.push((message(rng, kind, len, None), Expect::Malformed));
        }
        // One byte to 16 bytes too long (data messages have no maximum).
        if kind != 4 {
            for extra in 1..=16 {
                out.push((message(rng, kind, size + extra, None), Expect::Malformed));
            }
        }
        // Reserved bytes that are not zero.
        for reserved in 1..=3 {
            let mut d = message(rng, kind, size, None);
            d[reserved] = 1 + rng.below(255) as u8;
            out.push((d, Expect::Malformed));
        }
        // The right length with random contents: for a peer that does not
        // exist, and for the real peer's slot (0).
        for _ in 0..20 {
            let missing = 0x100 * (1 + rng.below(0xff_fffe) as u32) + rng.below(256) as u32;
            if kind == 1 {
                // Initiations are routed by the sender's key, which a random
                // one fails to prove: a bad mac1 is malformed (past the
                // source's share it is rate-limited before that check).
                out.push((message(rng, kind, size, None), Expect::Malformed));
            } else {
                out.push((message(rng, kind, size, Some(missing)), Expect::UnknownPeer));
                let slot0 = rng.below(256) as u32;
                out.push((message(rng, kind, size, Some(slot0)), Expect::Rejected));
            }
        }
    }
    // Wrong type bytes at every message size.
    for kind in [0u8, 5, 6, 0x7f, 0x80, 0xff] {
        for (_, size) in SIZES {
            out.push((message(rng, kind, size, None), Expect::Malformed));
        }
    }
    // Data messages up to the largest UDP payload.
    for len in [33, 100, 1420, 9000, 65_507] {
        let missing = 0x100 * (1 + rng.below(0xff_fffe) as u32);
        out.push((message(rng, 4, len, Some(missing)), Expect::UnknownPeer));
        let slot0 = rng.below(256) as u32;
        out.push((message(rng, 4, len, Some(slot0)), Expect::Rejected));
    }
    out
}

fn drops(status: &Status) -> (u64, u64, u64) {
    let n = |r: &str| {
        status
            .dropped(r)
            .unwrap_or_else(|| panic!("status lists no {r} counter: {:?}", status.drops))
    };
    (
        n("malformed") + n("rate_limited"),
        n("unknown_peer"),
        n("handshake_failed") + n("decrypt_failed"),
    )
}

#[test]
fn malformed_datagrams_are_counted_and_a_live_session_is_undisturbed() {
    require_root();
    let mut pair = Pair::new(PairSpec::new(
        vpcgate_e2e::Impl::Vpcgated,
        vpcgate_e2e::Impl::WireguardGo,
    ))
    .or_die("pair");
    wait_for_ping(&pair.b.ns, &pair.a.t4(), &[], Duration::from_secs(20)).or_die("tunnel up");
    let ctl = Vpcgate::for_dev(&pair.a.dev).or_die("CLI");
    let session = pair.a.dev.peer(&pair.b.public_key).or_die("peer");
    assert_ne!(session.latest_handshake, 0);
    let start = drops(&ctl.status().or_die("status"));

    let mut rng = Rng(seed(""));
    let list = datagrams(&mut rng);
    let want = |e: Expect| list.iter().filter(|(_, x)| *x == e).count() as u64;
    let expected = (
        want(Expect::Malformed),
        want(Expect::UnknownPeer),
        want(Expect::Rejected),
    );
    eprintln!(
        "{} datagrams: {expected:?} malformed, unknown-peer, rejected",
        list.len()
    );

    // Sent from the real peer's namespace (another port), to both the IPv4
    // and the IPv6 socket, in batches small enough that the socket buffer
    // never overflows, with the tunnel in use throughout.
    let targets: [SocketAddr; 2] = [pair.a.endpoint(false), pair.a.endpoint(true)];
    let ns_b = pair.b.ns.clone();
    let attacker = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                ns_b.enter_current_thread().or_die("enter namespace");
                let v4 = UdpSocket::bind("0.0.0.0:0").or_die("bind");
                let v6 = UdpSocket::bind("[::]:0").or_die("bind");
                (v4, v6)
            })
            .join()
            .expect("socket thread")
    });
    let mut sent = (0u64, 0u64, 0u64);
    for (i, batch) in list.chunks(64).enumerate() {
        let target = targets[i % 2];
        let socket = if target.is_ipv4() {
            &attacker.0
        } else {
            &attacker.1
        };
        for (datagram, expect) in batch {
            socket.send_to(datagram, target).or_die("send");
            match expect {
                Expect::Malformed => sent.0 += 1,
                Expect::UnknownPeer => sent.1 += 1,
                Expect::Rejected => sent.2 += 1,
            }
        }
        let total = sent.0 + sent.1 + sent.2;
        let mut seen = start;
        wait_until(Duration::from_secs(10), "the batch to be counted", || {
            seen = drops(&ctl.status()?);
            Ok((seen.0 - start.0) + (seen.1 - start.1) + (seen.2 - start.2) >= total)
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}: sent (malformed, unknown_peer, rejected) {sent:?}, counted {:?}",
                (seen.0 - start.0, seen.1 - start.1, seen.2 - start.2)
            )
        });
        if i % 8 == 0 {
            wait_for_ping(&pair.b.ns, &pair.a.t4(), &[], Duration::from_secs(5))
                .or_die("the tunnel works during the flood");
        }
    }
    let end = drops(&ctl.status().or_die("status"));
    assert_eq!(
        (end.0 - start.0, end.1 - start.1, end.2 - start.2),
        expected,
        "drops by reason (malformed, unknown_peer, handshake/decrypt failed)"
    );

    // The session is the one from before: no new handshake, no roaming to
    // the attacker's port, and traffic in both directions.
    wait_for_ping(&pair.b.ns, &pair.a.t4(), &[], Duration::from_secs(5)).or_die("b to a");
    wait_for_ping(&pair.a.ns, &pair.b.t4(), &[], Duration::from_secs(5)).or_die("a to b");
    let after = pair.a.dev.peer(&pair.b.public_key).or_die("peer");
    assert_eq!(
        after.latest_handshake, session.latest_handshake,
        "the garbage forced a new handshake"
    );
    assert_eq!(
        after.endpoint,
        Some(pair.b.endpoint(false)),
        "the endpoint moved"
    );
    assert!(after.rx_bytes > session.rx_bytes && after.tx_bytes > session.tx_bytes);
    no_panic_in_log(&mut pair.a.dev);
}

#[test]
fn status_and_peer_list_work_for_thousands_of_peers() {
    require_root();
    let ns = Netns::new("hp").or_die("namespace");
    let dev = WgDev::vpcgated(&ns, "hp", &VpcgatedConfig::new(51820, "100.64.0.1/16"))
        .or_die("vpcgated starts");
    let ctl = Vpcgate::for_dev(&dev).or_die("CLI");
    // More peers than fit a 1 MiB reply, in one UAPI request as `wg
    // setconf` would send them.
    const PEERS: u32 = 6000;
    let mut rng = Rng(seed(""));
    let mut request = String::from("set=1\n");
    for i in 0..PEERS {
        let key: String = rng.bytes(32).iter().map(|b| format!("{b:02x}")).collect();
        request.push_str(&format!(
            "public_key={key}\nallowed_ip=100.64.{}.{}/32\n",
            1 + i / 250,
            1 + i % 250
        ));
    }
    request.push('\n');
    let mut s = connect(&dev.uapi_socket());
    s.write_all(request.as_bytes()).or_die("send");
    assert_eq!(uapi_replies(&mut s, 1), "errno=0\n\n");

    let status = ctl.run(&["status", "--json"]).or_die("status");
    assert!(
        status.len() > vpcgate_proto::MAX_FRAME,
        "only {} bytes: the test needs a reply over 1 MiB",
        status.len()
    );
    let status = Status::parse(&status).or_die("status parses");
    assert_eq!(status.peers.len(), PEERS as usize);
    let list: serde_json::Value =
        serde_json::from_str(&ctl.run(&["peer", "list", "--json"]).or_die("peer list"))
            .or_die("JSON");
    assert_eq!(list.as_array().map(Vec::len), Some(PEERS as usize));
    let text = ctl.run(&["peer", "list"]).or_die("peer list");
    assert_eq!(text.matches("peer: ").count(), PEERS as usize);
}
