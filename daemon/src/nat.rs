//! Source NAT for traffic from WireGuard peers to the advertised ranges.
//!
//! Packets that arrive on the TUN interface and are forwarded towards one of
//! the advertised ranges leave with the gateway's own address on the
//! outgoing interface (masquerade), so the peered network needs no return
//! route to the WireGuard addresses. This module owns exactly one nftables
//! table per TUN interface, `inet vpcgate_<ifname>`, and never reads or
//! touches any other table.
//!
//! [`script`] turns a [`NatState`] into an nft script (pure). [`NftNat`]
//! feeds it to `nft -f -`; each apply is one nft transaction that replaces
//! the whole table, so the kernel never sees half a ruleset. [`FakeNat`]
//! records what it was asked, for tests of the daemon.
//!
//! Table names: interface names may contain `-` and `.`, which we escape so
//! that every interface maps to its own table and no two collide: `_`
//! becomes `__`, `-` becomes `_h` and `.` becomes `_d` (`vpc-gate.0` ->
//! `vpcgate_vpc_hgate_d0`). ASCII letters and digits are kept as they are.
//!
//! `enabled = false` keeps the table and its two range sets but drops the
//! `postrouting` chain altogether. No masquerading happens then, and because
//! no NAT chain is registered on the hook, the kernel is not made to
//! connection-track every packet on our behalf.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::IpNet;

/// Prefix of every table this module creates; the rest is the escaped
/// interface name.
const TABLE_PREFIX: &str = "vpcgate_";
/// Linux limits interface names to IFNAMSIZ - 1 bytes.
const IFNAME_MAX: usize = 15;
const SET4: &str = "ranges4";
const SET6: &str = "ranges6";
/// Where Debian and Fedora install nft, for when it is not in PATH (a
/// service's PATH often lacks the sbin directories).
const NFT_FALLBACK: &str = "/usr/sbin/nft";
const IP_FALLBACK: &str = "/usr/sbin/ip";

/// What the kernel should do for one TUN interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatState {
    /// The TUN interface; only traffic arriving on it is masqueraded.
    pub interface: String,
    /// Whether to masquerade at all (see the module doc for `false`).
    pub enabled: bool,
    /// Destinations whose traffic is masqueraded. Order, overlaps and host
    /// bits do not matter: the ranges are merged before they reach nft.
    pub ranges: Vec<IpNet>,
}

#[derive(Debug, thiserror::Error)]
pub enum NatError {
    #[error(
        "nft not found in PATH or at {NFT_FALLBACK}; install the nftables package \
         (SNAT for the advertised ranges needs it)"
    )]
    NftMissing,
    #[error("nft rejected the NAT ruleset: {stderr}")]
    NftFailed { stderr: String },
    #[error("invalid interface name {name:?}: {reason}")]
    BadInterface { name: String, reason: &'static str },
    #[error("running nft: {0}")]
    Io(#[from] io::Error),
}

/// Keeps the kernel's NAT rules for one TUN interface in line with a
/// desired [`NatState`].
pub trait Nat: Send + Sync {
    /// Makes the kernel match `desired`. Idempotent: applying the same state
    /// twice does nothing the second time (the real one may skip the nft call
    /// when unchanged).
    fn apply(&mut self, desired: &NatState) -> Result<(), NatError>;
    /// Removes the daemon's table (if present). Idempotent.
    fn remove(&mut self) -> Result<(), NatError>;
}

/// Checks that `name` can be a Linux interface name made only of
/// characters that are safe inside an nft quoted string and that
/// [`table_name`] can escape.
pub fn validate_interface(name: &str) -> Result<(), NatError> {
    let bad = |reason| {
        Err(NatError::BadInterface {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > IFNAME_MAX {
        return bad("it is longer than 15 bytes, the Linux limit");
    }
    if name == "." || name == ".." {
        return bad("Linux does not allow `.` or `..` as interface names");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return bad("use only ASCII letters, digits, `_`, `-` and `.`");
    }
    Ok(())
}

/// The nft table name for an interface (see the module doc for the
/// escaping). The interface must already have passed
/// [`validate_interface`].
pub fn table_name(interface: &str) -> String {
    let mut name = String::with_capacity(TABLE_PREFIX.len() + 2 * interface.len());
    name.push_str(TABLE_PREFIX);
    for c in interface.chars() {
        match c {
            '_' => name.push_str("__"),
            '-' => name.push_str("_h"),
            '.' => name.push_str("_d"),
            c => name.push(c),
        }
    }
    name
}

/// Declares the table and deletes it: together they delete it whether or
/// not it exists (`nft delete` alone fails on a missing table, and `destroy`
/// needs nft 1.0.8 and Linux 6.3).
fn delete_table(out: &mut String, table: &str) {
    let _ = writeln!(out, "table inet {table} {{}}");
    let _ = writeln!(out, "delete table inet {table}");
}

fn write_set(out: &mut String, name: &str, ty: &str, ranges: &[&IpNet]) {
    let _ = writeln!(out, "\tset {name} {{");
    let _ = writeln!(out, "\t\ttype {ty}");
    let _ = writeln!(out, "\t\tflags interval");
    if !ranges.is_empty() {
        let elements: Vec<String> = ranges.iter().map(|r| r.to_string()).collect();
        let _ = writeln!(out, "\t\telements = {{ {} }}", elements.join(", "));
    }
    let _ = writeln!(out, "\t}}");
}

/// The nft script that makes the kernel match `desired`: it deletes the
/// interface's table if present and recreates it in full, all in the one
/// transaction that `nft -f` makes of its input. Fails only on an invalid
/// interface name, which never reaches the script.
pub fn script(desired: &NatState) -> Result<String, NatError> {
    validate_interface(&desired.interface)?;
    let table = table_name(&desired.interface);
    let iface = &desired.interface;
    // An interval set rejects overlapping elements, so merge them first;
    // this also clears host bits and sorts, which keeps the script stable.
    let ranges = IpNet::aggregate(&desired.ranges);
    let v4: Vec<&IpNet> = ranges.iter().filter(|r| r.addr().is_ipv4()).collect();
    let v6: Vec<&IpNet> = ranges.iter().filter(|r| r.addr().is_ipv6()).collect();

    let mut out = String::new();
    delete_table(&mut out, &table);
    let _ = writeln!(out, "table inet {table} {{");
    // The table's name says whose it is; a table comment would need nft
    // 0.9.7, newer than Ubuntu 20.04's 0.9.3.
    write_set(&mut out, SET4, "ipv4_addr", &v4);
    write_set(&mut out, SET6, "ipv6_addr", &v6);
    if desired.enabled {
        // `iifname` does match in postrouting for forwarded packets (the
        // kernel keeps the input device); the traffic test checks it.
        let _ = writeln!(out, "\tchain postrouting {{");
        let _ = writeln!(
            out,
            "\t\ttype nat hook postrouting priority srcnat; policy accept;"
        );
        let _ = writeln!(out, "\t\tiifname \"{iface}\" ip daddr @{SET4} masquerade");
        let _ = writeln!(out, "\t\tiifname \"{iface}\" ip6 daddr @{SET6} masquerade");
        let _ = writeln!(out, "\t}}");
    }
    let _ = writeln!(out, "}}");
    Ok(out)
}

/// The script that removes the table for `interface` if it exists.
fn remove_script(interface: &str) -> String {
    let mut out = String::new();
    delete_table(&mut out, &table_name(interface));
    out
}

/// Applies [`NatState`]s to the kernel by running `nft -f -`.
///
/// It remembers the last script it applied and skips the nft call when the
/// next one is identical. If something else edits or deletes the table, the
/// next *different* state repairs it; [`Nat::remove`] followed by
/// [`Nat::apply`] always runs nft. `remove` acts on the table of the last
/// interface applied; on an instance that has applied nothing it does
/// nothing, and a table left by an earlier process is replaced by the next
/// `apply` for the same interface.
#[derive(Debug, Default)]
pub struct NftNat {
    /// Run nft inside this network namespace (`ip netns exec`), for tests.
    netns: Option<String>,
    nft: Option<PathBuf>,
    /// The interface whose table may exist: removed on `remove`, and
    /// replaced in the same transaction if `apply` moves to another one.
    table_for: Option<String>,
    /// The script the kernel is known to match; `None` after a failure or a
    /// removal, so the next apply always runs.
    applied: Option<String>,
}

impl NftNat {
    pub fn new() -> Self {
        Self::default()
    }

    /// An `NftNat` that runs nft as `ip netns exec <netns> nft`, so that
    /// tests can work in a throwaway network namespace. The daemon uses
    /// [`NftNat::new`] and acts on its own namespace.
    pub fn in_netns(netns: impl Into<String>) -> Self {
        NftNat {
            netns: Some(netns.into()),
            ..Self::default()
        }
    }

    fn nft_path(&mut self) -> Result<PathBuf, NatError> {
        if let Some(path) = &self.nft {
            return Ok(path.clone());
        }
        let path = find_program("nft", NFT_FALLBACK).ok_or(NatError::NftMissing)?;
        self.nft = Some(path.clone());
        Ok(path)
    }

    fn run(&mut self, script: &str) -> Result<(), NatError> {
        let nft = self.nft_path()?;
        let mut cmd = match &self.netns {
            None => Command::new(&nft),
            Some(ns) => {
                let ip = find_program("ip", IP_FALLBACK).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "`ip` not found to enter the netns")
                })?;
                let mut cmd = Command::new(ip);
                cmd.args([OsStr::new("netns"), OsStr::new("exec"), OsStr::new(ns)])
                    .arg(&nft);
                cmd
            }
        };
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        // Feed stdin from another thread so that neither side can block the
        // other whatever nft does with its pipes.
        let (written, output) = std::thread::scope(|s| {
            let writer = s.spawn(move || match stdin {
                Some(mut stdin) => stdin.write_all(script.as_bytes()),
                None => Ok(()),
            });
            let output = child.wait_with_output();
            let written = writer
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("stdin writer panicked")));
            (written, output)
        });
        let output = output?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(NatError::NftFailed {
                stderr: format!("{} ({})", stderr.trim(), output.status),
            });
        }
        // nft exited 0, so it read and applied its whole input; a write
        // error can only mean it exited early, which it reported above.
        match written {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e.into()),
            _ => Ok(()),
        }
    }
}

impl Nat for NftNat {
    fn apply(&mut self, desired: &NatState) -> Result<(), NatError> {
        let new = script(desired)?;
        if self.applied.as_deref() == Some(new.as_str()) {
            tracing::debug!(interface = %desired.interface, "nat: unchanged, nft not run");
            return Ok(());
        }
        let mut full = String::new();
        if let Some(old) = &self.table_for {
            if *old != desired.interface {
                full.push_str(&remove_script(old));
            }
        }
        full.push_str(&new);
        self.applied = None;
        self.run(&full)?;
        self.table_for = Some(desired.interface.clone());
        self.applied = Some(new);
        let ranges = IpNet::aggregate(&desired.ranges);
        tracing::info!(
            interface = %desired.interface,
            table = %table_name(&desired.interface),
            enabled = desired.enabled,
            ranges = ?ranges,
            "nat: applied"
        );
        Ok(())
    }

    fn remove(&mut self) -> Result<(), NatError> {
        let Some(interface) = self.table_for.clone() else {
            return Ok(());
        };
        self.applied = None;
        self.run(&remove_script(&interface))?;
        self.table_for = None;
        tracing::info!(table = %table_name(&interface), "nat: removed");
        Ok(())
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn find_program(name: &str, fallback: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .chain(std::iter::once(PathBuf::from(fallback)))
        .find(|p| is_executable(p))
}

/// Records what it was asked instead of touching the kernel.
#[derive(Debug, Default)]
pub struct FakeNat {
    /// Every state passed to a successful `apply`, repeats included.
    pub applied: Vec<NatState>,
    /// How many times `remove` succeeded.
    pub removed: usize,
    /// Returned by the next `apply` or `remove`, which then records nothing.
    pub fail_next: Option<NatError>,
}

impl FakeNat {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Nat for FakeNat {
    fn apply(&mut self, desired: &NatState) -> Result<(), NatError> {
        if let Some(e) = self.fail_next.take() {
            return Err(e);
        }
        // Reject what the real one rejects, so daemon tests see the same
        // errors.
        validate_interface(&desired.interface)?;
        self.applied.push(desired.clone());
        Ok(())
    }

    fn remove(&mut self) -> Result<(), NatError> {
        if let Some(e) = self.fail_next.take() {
            return Err(e);
        }
        self.removed += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("test CIDR")
    }

    fn state(interface: &str, enabled: bool, ranges: &[&str]) -> NatState {
        NatState {
            interface: interface.to_string(),
            enabled,
            ranges: ranges.iter().map(|r| net(r)).collect(),
        }
    }

    #[test]
    fn script_for_a_small_state() {
        let s = state(
            "vpcgate0",
            true,
            &["198.19.8.0/22", "fd00:db8:f::/64", "198.19.0.0/24"],
        );
        let expected = "\
table inet vpcgate_vpcgate0 {}
delete table inet vpcgate_vpcgate0
table inet vpcgate_vpcgate0 {
\tset ranges4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 198.19.0.0/24, 198.19.8.0/22 }
\t}
\tset ranges6 {
\t\ttype ipv6_addr
\t\tflags interval
\t\telements = { fd00:db8:f::/64 }
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tiifname \"vpcgate0\" ip daddr @ranges4 masquerade
\t\tiifname \"vpcgate0\" ip6 daddr @ranges6 masquerade
\t}
}
";
        assert_eq!(script(&s).expect("valid state"), expected);
    }

    #[test]
    fn script_with_no_ranges_has_no_elements() {
        let text = script(&state("wg0", true, &[])).expect("valid state");
        assert!(!text.contains("elements"), "{text}");
        assert!(text.contains("set ranges4 {"), "{text}");
        assert!(text.contains("set ranges6 {"), "{text}");
        assert!(text.contains("ip daddr @ranges4 masquerade"), "{text}");
    }

    #[test]
    fn script_v6_only() {
        let text = script(&state("wg0", true, &["fd00:db8:1::/48"])).expect("valid state");
        let expected_sets = "\
\tset ranges4 {
\t\ttype ipv4_addr
\t\tflags interval
\t}
\tset ranges6 {
\t\ttype ipv6_addr
\t\tflags interval
\t\telements = { fd00:db8:1::/48 }
\t}
";
        assert!(text.contains(expected_sets), "{text}");
    }

    #[test]
    fn disabled_keeps_sets_but_has_no_chain() {
        let text = script(&state("wg0", false, &["198.19.0.0/24"])).expect("valid state");
        assert!(text.contains("elements = { 198.19.0.0/24 }"), "{text}");
        assert!(!text.contains("chain"), "{text}");
        assert!(!text.contains("masquerade"), "{text}");
    }

    #[test]
    fn overlapping_ranges_are_merged_and_host_bits_cleared() {
        // nft rejects overlapping elements in an interval set.
        let text = script(&state(
            "wg0",
            true,
            &[
                "198.18.0.5/24",
                "198.18.0.0/16",
                "198.19.0.0/24",
                "198.19.1.0/24",
                "fd00:db8::/32",
                "fd00:db8:5::1/64",
            ],
        ))
        .expect("valid state");
        assert!(
            text.contains("elements = { 198.18.0.0/16, 198.19.0.0/23 }"),
            "{text}"
        );
        assert!(text.contains("elements = { fd00:db8::/32 }"), "{text}");
    }

    #[test]
    fn table_names_escape_without_collisions() {
        assert_eq!(table_name("vpcgate0"), "vpcgate_vpcgate0");
        assert_eq!(table_name("vpc-gate.0"), "vpcgate_vpc_hgate_d0");
        let names = ["a_b", "a-b", "a.b", "a__b", "a_hb", "a_db", "a_-b", "a-_b"];
        let mut tables: Vec<String> = names.iter().map(|n| table_name(n)).collect();
        tables.sort();
        tables.dedup();
        assert_eq!(tables.len(), names.len(), "{tables:?}");
        for t in &tables {
            assert!(
                t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                "{t}"
            );
        }
    }

    #[test]
    fn interface_names_are_validated() {
        for good in ["eth0", "a", "vpc-gate.0_x", "abcdefghijklmno"] {
            validate_interface(good).unwrap_or_else(|e| panic!("{good:?}: {e}"));
        }
        for bad in [
            "",
            "abcdefghijklmnop",
            ".",
            "..",
            "wg0\"",
            "wg0\" accept",
            "wg 0",
            "wg0;",
            "wg0}",
            "wg/0",
            "wgé",
            "wg0\n",
            "@ranges4",
        ] {
            let err = script(&state(bad, true, &["198.19.0.0/24"]))
                .expect_err(&format!("{bad:?} must be rejected"));
            assert!(matches!(err, NatError::BadInterface { .. }), "{err:?}");
        }
    }

    #[test]
    fn nft_nat_rejects_bad_names_before_running_anything() {
        // No netns, no root: the name must fail before nft is looked for.
        let mut nat = NftNat::in_netns("vgnat-never-created");
        let err = nat
            .apply(&state("bad name", true, &[]))
            .expect_err("bad name");
        assert!(matches!(err, NatError::BadInterface { .. }), "{err:?}");
        nat.remove().expect("nothing to remove");
    }

    #[test]
    fn fake_records_and_fails_on_request() {
        let mut fake = FakeNat::new();
        let s = state("wg0", true, &["198.19.0.0/24"]);
        fake.apply(&s).expect("apply");
        fake.apply(&s).expect("apply again");
        assert_eq!(fake.applied, vec![s.clone(), s.clone()]);

        fake.fail_next = Some(NatError::NftFailed {
            stderr: "boom".into(),
        });
        assert!(matches!(fake.apply(&s), Err(NatError::NftFailed { .. })));
        assert_eq!(fake.applied.len(), 2);
        assert!(fake.fail_next.is_none());

        assert!(matches!(
            fake.apply(&state("no good", true, &[])),
            Err(NatError::BadInterface { .. })
        ));

        fake.remove().expect("remove");
        fake.remove().expect("remove again");
        assert_eq!(fake.removed, 2);
    }
}

/// Tests against the real kernel. Each one runs in its own network
/// namespace (`ip netns add vgnat-<pid>-<n>`), which is deleted when the
/// test ends, pass or fail. They need root and fail, never skip, without it.
/// `NftNat::in_netns` runs nft through `ip netns exec`.
#[cfg(test)]
mod kernel_tests {
    use super::*;
    use std::fs::File;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::process::Output;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    fn require_root() {
        if !nix::unistd::geteuid().is_root() {
            panic!("must run as root: these tests create network namespaces and nftables tables");
        }
    }

    fn unique(prefix: &str) -> String {
        format!(
            "{prefix}{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        )
    }

    fn run(argv: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(text.as_bytes()).expect("write stdin");
        }
        child.wait_with_output().expect("wait")
    }

    fn check(argv: &[&str]) -> String {
        let out = run(argv, None);
        assert!(
            out.status.success(),
            "{argv:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A network namespace deleted on drop (also while unwinding).
    struct TestNs {
        name: String,
    }

    impl TestNs {
        fn new() -> Self {
            require_root();
            let name = unique("vgnat-");
            check(&["ip", "netns", "add", &name]);
            TestNs { name }
        }

        fn exec(&self, argv: &[&str]) -> String {
            let mut full = vec!["ip", "netns", "exec", &self.name];
            full.extend_from_slice(argv);
            check(&full)
        }

        fn nft_script(&self, text: &str) {
            let out = run(
                &["ip", "netns", "exec", &self.name, "nft", "-f", "-"],
                Some(text),
            );
            assert!(
                out.status.success(),
                "nft: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }

        fn ruleset(&self) -> String {
            self.exec(&["nft", "list", "ruleset"])
        }

        fn tables(&self) -> Vec<String> {
            self.exec(&["nft", "list", "tables"])
                .lines()
                .map(|l| l.trim().to_string())
                .filter(|l| !l.is_empty())
                .collect()
        }

        /// The table listing with handles (`nft -a`), or `None` if absent.
        fn table(&self, name: &str) -> Option<String> {
            let out = run(
                &[
                    "ip", "netns", "exec", &self.name, "nft", "-a", "list", "table", "inet", name,
                ],
                None,
            );
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        }

        fn nat(&self) -> NftNat {
            NftNat::in_netns(&self.name)
        }

        /// Runs `f` on a thread that has entered this namespace; sockets it
        /// creates stay in the namespace.
        fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            let path = format!("/run/netns/{}", self.name);
            std::thread::scope(|s| {
                s.spawn(|| {
                    let fd = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                    nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                    f()
                })
                .join()
                .expect("thread in netns panicked")
            })
        }
    }

    impl Drop for TestNs {
        fn drop(&mut self) {
            let out = run(&["ip", "netns", "del", &self.name], None);
            if !out.status.success() {
                eprintln!(
                    "could not delete netns {}: {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    fn state(interface: &str, enabled: bool, ranges: &[&str]) -> NatState {
        NatState {
            interface: interface.to_string(),
            enabled,
            ranges: ranges
                .iter()
                .map(|r| r.parse().expect("test CIDR"))
                .collect(),
        }
    }

    const FOREIGN: &str = "table inet other {\n\tchain c {\n\t}\n}\n";

    fn foreign_listing(ns: &TestNs) -> String {
        ns.exec(&["nft", "list", "table", "inet", "other"])
    }

    #[test]
    fn apply_replace_disable_remove() {
        let ns = TestNs::new();
        ns.nft_script(FOREIGN);
        let foreign = foreign_listing(&ns);
        let mut nat = ns.nat();
        let table = "vpcgate_vgt0";

        nat.apply(&state(
            "vgt0",
            true,
            &["198.19.0.0/24", "198.19.8.0/22", "fd00:db8:f::/64"],
        ))
        .expect("first apply");
        let listing = ns.table(table).expect("table exists");
        assert!(!listing.contains("comment"), "{listing}");
        assert!(
            listing.contains("elements = { 198.19.0.0/24, 198.19.8.0/22 }"),
            "{listing}"
        );
        assert!(
            listing.contains("elements = { fd00:db8:f::/64 }"),
            "{listing}"
        );
        assert!(
            listing.contains("type nat hook postrouting priority srcnat; policy accept;"),
            "{listing}"
        );
        assert!(
            listing.contains("iifname \"vgt0\" ip daddr @ranges4 masquerade"),
            "{listing}"
        );
        assert!(
            listing.contains("iifname \"vgt0\" ip6 daddr @ranges6 masquerade"),
            "{listing}"
        );
        assert_eq!(foreign_listing(&ns), foreign);

        // Same state again: nft is not run, so the handles stay the same.
        nat.apply(&state(
            "vgt0",
            true,
            &["198.19.8.0/22", "fd00:db8:f::/64", "198.19.0.0/24"],
        ))
        .expect("same again");
        assert_eq!(ns.table(table).as_deref(), Some(listing.as_str()));

        nat.apply(&state("vgt0", true, &["198.19.64.0/18"]))
            .expect("new ranges");
        let listing = ns.table(table).expect("table exists");
        assert!(
            listing.contains("elements = { 198.19.64.0/18 }"),
            "{listing}"
        );
        assert!(!listing.contains("198.19.0.0"), "{listing}");
        assert!(!listing.contains("198.19.8.0"), "{listing}");
        assert!(!listing.contains("2001:db8"), "{listing}");
        assert_eq!(listing.matches("masquerade").count(), 2, "{listing}");

        nat.apply(&state("vgt0", false, &["198.19.64.0/18"]))
            .expect("disable");
        let listing = ns.table(table).expect("table still exists when disabled");
        assert!(!listing.contains("masquerade"), "{listing}");
        assert!(!listing.contains("chain"), "{listing}");
        assert!(
            listing.contains("elements = { 198.19.64.0/18 }"),
            "{listing}"
        );
        assert_eq!(foreign_listing(&ns), foreign);

        nat.remove().expect("remove");
        assert!(ns.table(table).is_none(), "{}", ns.ruleset());
        assert_eq!(ns.tables(), vec!["table inet other".to_string()]);
        nat.remove().expect("remove again");
        assert_eq!(foreign_listing(&ns), foreign);

        // After a removal the same state is applied again for real.
        nat.apply(&state("vgt0", false, &["198.19.64.0/18"]))
            .expect("apply after remove");
        assert!(ns.table(table).is_some());
        nat.remove().expect("final remove");
        assert_eq!(ns.tables(), vec!["table inet other".to_string()]);
    }

    #[test]
    fn a_fresh_instance_replaces_a_leftover_table() {
        let ns = TestNs::new();
        let mut first = ns.nat();
        first
            .apply(&state("vgt0", true, &["198.19.0.0/24"]))
            .expect("apply");
        // A restarted daemon's first apply replaces the leftover table.
        let mut second = ns.nat();
        second
            .apply(&state("vgt0", true, &["198.19.1.0/24"]))
            .expect("apply over leftover");
        let listing = ns.table("vpcgate_vgt0").expect("table");
        assert!(
            listing.contains("elements = { 198.19.1.0/24 }"),
            "{listing}"
        );
        assert!(!listing.contains("198.19.0.0/24"), "{listing}");
        second.remove().expect("remove");
        assert!(ns.tables().is_empty(), "{}", ns.ruleset());
        // Removing before any apply has nothing to act on.
        ns.nat().remove().expect("remove on a fresh instance");
    }

    #[test]
    fn changing_interface_moves_the_table_in_one_apply() {
        let ns = TestNs::new();
        ns.nft_script(FOREIGN);
        let mut nat = ns.nat();
        nat.apply(&state("vgt-a", true, &["198.19.0.0/24"]))
            .expect("apply a");
        assert!(ns.table("vpcgate_vgt_ha").is_some());
        nat.apply(&state("vgt.b", true, &["198.19.0.0/24"]))
            .expect("apply b");
        assert!(ns.table("vpcgate_vgt_ha").is_none(), "{}", ns.ruleset());
        let listing = ns.table("vpcgate_vgt_db").expect("table b");
        assert!(listing.contains("iifname \"vgt.b\""), "{listing}");
        nat.remove().expect("remove");
        assert_eq!(ns.tables(), vec!["table inet other".to_string()]);
    }

    #[test]
    fn bad_interface_creates_nothing() {
        let ns = TestNs::new();
        ns.nft_script(FOREIGN);
        let before = ns.ruleset();
        let mut nat = ns.nat();
        for bad in ["vgt0\" accept", "", "waytoolonginterface0", "a b", "a;b"] {
            let err = nat
                .apply(&state(bad, true, &["198.19.0.0/24"]))
                .expect_err(bad);
            assert!(matches!(err, NatError::BadInterface { .. }), "{err:?}");
        }
        assert_eq!(ns.ruleset(), before);
        nat.remove().expect("remove");
        assert_eq!(ns.ruleset(), before);
    }

    #[test]
    fn nft_failure_is_reported_and_retried() {
        require_root();
        let mut nat = NftNat::in_netns(unique("vgnat-missing-"));
        let s = state("vgt0", true, &["198.19.0.0/24"]);
        for _ in 0..2 {
            let err = nat.apply(&s).expect_err("no such netns");
            assert!(matches!(err, NatError::NftFailed { .. }), "{err:?}");
        }
    }

    fn peer_seen(
        client: &TestNs,
        server: &TestNs,
        listen: SocketAddr,
    ) -> Result<SocketAddr, String> {
        let listener = server.enter(|| TcpListener::bind(listen).expect("bind"));
        let target = listener.local_addr().expect("local addr");
        let stream = client
            .enter(|| TcpStream::connect_timeout(&target, Duration::from_secs(3)))
            .map_err(|e| format!("connect to {target}: {e}"))?;
        let (_conn, peer) = listener.accept().expect("accept");
        drop(stream);
        Ok(peer)
    }

    /// client --(veth "TUN")--> gateway --(veth)--> far. The far end has a
    /// route back to the client's network, so without SNAT connections
    /// still work and show the client's own address.
    #[test]
    fn forwarded_traffic_leaves_with_the_gateway_address() {
        let client = TestNs::new();
        let gw = TestNs::new();
        let far = TestNs::new();
        let tun = "vgtun0";
        let out = "vgout0";

        gw.exec(&[
            "ip",
            "link",
            "add",
            tun,
            "type",
            "veth",
            "peer",
            "name",
            "c0",
            "netns",
            &client.name,
        ]);
        gw.exec(&[
            "ip", "link", "add", out, "type", "veth", "peer", "name", "f0", "netns", &far.name,
        ]);
        for (ns, dev, v4, v6) in [
            (&client, "c0", "198.18.1.2/24", "fd00:db8:c::2/64"),
            (&gw, tun, "198.18.1.1/24", "fd00:db8:c::1/64"),
            (&gw, out, "198.19.0.1/24", "fd00:db8:f::1/64"),
            (&far, "f0", "198.19.0.2/24", "fd00:db8:f::2/64"),
        ] {
            ns.exec(&["ip", "addr", "add", v4, "dev", dev]);
            ns.exec(&["ip", "addr", "add", v6, "dev", dev, "nodad"]);
            ns.exec(&["ip", "link", "set", dev, "up"]);
        }
        client.exec(&["ip", "route", "add", "default", "via", "198.18.1.1"]);
        client.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            "fd00:db8:c::1",
        ]);
        far.exec(&["ip", "route", "add", "198.18.1.0/24", "via", "198.19.0.1"]);
        far.exec(&[
            "ip",
            "-6",
            "route",
            "add",
            "fd00:db8:c::/64",
            "via",
            "fd00:db8:f::1",
        ]);
        gw.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        gw.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);

        let v4: SocketAddr = "198.19.0.2:0".parse().expect("addr");
        let v6: SocketAddr = "[fd00:db8:f::2]:0".parse().expect("addr");
        let ip = |s: &str| -> std::net::IpAddr { s.parse().expect("ip") };

        let mut nat = gw.nat();
        nat.apply(&state(tun, true, &["198.19.0.0/24", "fd00:db8:f::/64"]))
            .expect("apply");
        assert_eq!(
            peer_seen(&client, &far, v4).map(|p| p.ip()),
            Ok(ip("198.19.0.1"))
        );
        assert_eq!(
            peer_seen(&client, &far, v6).map(|p| p.ip()),
            Ok(ip("fd00:db8:f::1"))
        );

        // Destinations outside the ranges keep the client's address.
        nat.apply(&state(tun, true, &["198.19.128.0/17", "fd00:db8:e::/64"]))
            .expect("other ranges");
        assert_eq!(
            peer_seen(&client, &far, v4).map(|p| p.ip()),
            Ok(ip("198.18.1.2"))
        );
        assert_eq!(
            peer_seen(&client, &far, v6).map(|p| p.ip()),
            Ok(ip("fd00:db8:c::2"))
        );

        // Disabled: no masquerade even for the ranges.
        nat.apply(&state(tun, false, &["198.19.0.0/24", "fd00:db8:f::/64"]))
            .expect("disable");
        assert_eq!(
            peer_seen(&client, &far, v4).map(|p| p.ip()),
            Ok(ip("198.18.1.2"))
        );
        assert_eq!(
            peer_seen(&client, &far, v6).map(|p| p.ip()),
            Ok(ip("fd00:db8:c::2"))
        );

        // Traffic from another interface is not ours to masquerade: rename
        // the rule's interface away from the one the client uses.
        nat.apply(&state("vgother0", true, &["198.19.0.0/24"]))
            .expect("other iif");
        assert_eq!(
            peer_seen(&client, &far, v4).map(|p| p.ip()),
            Ok(ip("198.18.1.2"))
        );

        nat.remove().expect("remove");
        assert!(gw.tables().is_empty(), "{}", gw.ruleset());
    }
}
