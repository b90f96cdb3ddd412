//! Source NAT for traffic from WireGuard peers to the advertised ranges.
//!
//! Packets that arrive on the TUN interface and are forwarded towards one of
//! the advertised ranges leave with the gateway's own address on the
//! outgoing interface (masquerade), so the peered network needs no return
//! route to the WireGuard addresses. This module owns the nftables tables
//! named `vpcgate_<ifname>` for its TUN interface, in the `inet`, `ip` and
//! `ip6` families, and never reads or touches any other table.
//!
//! The rules take one of two [`NatForm`]s. [`NatForm::Inet`] is one
//! `inet vpcgate_<ifname>` table holding both range sets and one chain; NAT
//! in an `inet` table needs nft 0.9.1 and Linux 5.2. [`NatForm::Split`] is
//! the same thing for older systems (Ubuntu 18.04): an `ip` table with the
//! IPv4 set and rule and an `ip6` table with the IPv6 ones, and a numeric
//! chain priority, since old nft does not know `srcnat`. [`NftNat::new`]
//! finds out which form the system takes: its first apply that has a NAT
//! chain tries `inet` and, if nft rejects that, the split form, and it keeps
//! to the form that worked. [`NftNat::with_form`] skips the detection.
//!
//! A table exists only while ranges are advertised: with no ranges, apply
//! deletes our tables and creates none.
//!
//! [`script`] turns a [`NatState`] into an nft script (pure). [`NftNat`]
//! feeds it to `nft -f -`; each apply is one nft transaction that deletes
//! our tables of both forms and recreates the one wanted in full, so the
//! kernel never sees half a ruleset and a change of form leaves no stale
//! table behind. The control plane's fake
//! (`vpcgate_plane::fakes::FakeNat`) stands in for it in tests.
//!
//! Table names: interface names may contain `-` and `.`, which we escape so
//! that every interface maps to its own table and no two collide: `_`
//! becomes `__`, `-` becomes `_h` and `.` becomes `_d` (`vpc-gate.0` ->
//! `vpcgate_vpc_hgate_d0`). ASCII letters and digits are kept as they are.
//!
//! `enabled = false` keeps the table(s) and the range sets but drops the
//! `postrouting` chain altogether. No masquerading happens then, and because
//! no NAT chain is registered on the hook, the kernel is not made to
//! connection-track every packet on our behalf.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ipnet::IpNet;
pub use vpcgate_plane::ports::{Nat, NatForm, NatState, PortError, UnknownNatForm};

/// Prefix of every table this module creates; the rest is the escaped
/// interface name.
pub const TABLE_PREFIX: &str = "vpcgate_";
/// Linux limits interface names to IFNAMSIZ - 1 bytes.
const IFNAME_MAX: usize = 15;
const SET4: &str = "ranges4";
const SET6: &str = "ranges6";
/// Where Debian and Fedora install nft, for when it is not in PATH (a
/// service's PATH often lacks the sbin directories).
pub const NFT_FALLBACK: &str = "/usr/sbin/nft";
const IP_FALLBACK: &str = "/usr/sbin/ip";
/// Every family a table of ours may have, whatever the form.
const FAMILIES: [&str; 3] = ["inet", "ip", "ip6"];

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

impl From<NatError> for PortError {
    fn from(e: NatError) -> Self {
        PortError::new(
            vpcgate_plane::errno::EIO,
            format!("cannot apply the SNAT rules: {e}"),
        )
    }
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
/// escaping); the same name in every family. The interface must already
/// have passed [`validate_interface`].
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
fn delete_table(out: &mut String, family: &str, table: &str) {
    let _ = writeln!(out, "table {family} {table} {{}}");
    let _ = writeln!(out, "delete table {family} {table}");
}

/// Deletes our tables of both forms. Declaring an `inet` table works on
/// systems that cannot do NAT in one, so this suits either form.
fn delete_tables(out: &mut String, table: &str) {
    for family in FAMILIES {
        delete_table(out, family, table);
    }
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

/// The `postrouting` chain; `rules` are (address keyword, set) pairs.
fn write_chain(out: &mut String, iface: &str, priority: &str, rules: &[(&str, &str)]) {
    // `iifname` does match in postrouting for forwarded packets (the
    // kernel keeps the input device); the traffic test checks it.
    let _ = writeln!(out, "\tchain postrouting {{");
    let _ = writeln!(
        out,
        "\t\ttype nat hook postrouting priority {priority}; policy accept;"
    );
    for (proto, set) in rules {
        let _ = writeln!(
            out,
            "\t\tiifname \"{iface}\" {proto} daddr @{set} masquerade"
        );
    }
    let _ = writeln!(out, "\t}}");
}

/// The nft script that makes the kernel match `desired` in `form`: it
/// deletes the interface's tables of both forms if present and, when there
/// are ranges, recreates the ones of `form` in full, all in the one
/// transaction that `nft -f` makes of its input. With no ranges the script
/// is the same for both forms. Fails only on an invalid interface name,
/// which never reaches the script.
pub fn script(desired: &NatState, form: NatForm) -> Result<String, NatError> {
    validate_interface(&desired.interface)?;
    let table = table_name(&desired.interface);
    let iface = &desired.interface;
    // An interval set rejects overlapping elements, so merge them first;
    // this also clears host bits and sorts, which keeps the script stable.
    let ranges = IpNet::aggregate(&desired.ranges);
    let v4: Vec<&IpNet> = ranges.iter().filter(|r| r.addr().is_ipv4()).collect();
    let v6: Vec<&IpNet> = ranges.iter().filter(|r| r.addr().is_ipv6()).collect();

    let mut out = String::new();
    delete_tables(&mut out, &table);
    if ranges.is_empty() {
        return Ok(out);
    }
    // The table's name says whose it is; a table comment would need nft
    // 0.9.7, newer than Ubuntu 20.04's 0.9.3.
    match form {
        NatForm::Inet => {
            let _ = writeln!(out, "table inet {table} {{");
            write_set(&mut out, SET4, "ipv4_addr", &v4);
            write_set(&mut out, SET6, "ipv6_addr", &v6);
            if desired.enabled {
                write_chain(&mut out, iface, "srcnat", &[("ip", SET4), ("ip6", SET6)]);
            }
            let _ = writeln!(out, "}}");
        }
        NatForm::Split => {
            // 100 is what `srcnat` stands for; nft before 0.9.1 knows only
            // numbers.
            for (family, proto, set, ty, members) in [
                ("ip", "ip", SET4, "ipv4_addr", &v4),
                ("ip6", "ip6", SET6, "ipv6_addr", &v6),
            ] {
                let _ = writeln!(out, "table {family} {table} {{");
                write_set(&mut out, set, ty, members);
                if desired.enabled {
                    write_chain(&mut out, iface, "100", &[(proto, set)]);
                }
                let _ = writeln!(out, "}}");
            }
        }
    }
    Ok(out)
}

/// The script that removes the tables of both forms for `interface`, if
/// they exist.
fn remove_script(interface: &str) -> String {
    let mut out = String::new();
    delete_tables(&mut out, &table_name(interface));
    out
}

/// Applies [`NatState`]s to the kernel by running `nft -f -`.
///
/// It remembers the last script it applied and skips the nft call when the
/// next one is identical. If something else edits or deletes the table, the
/// next *different* state repairs it; [`Nat::remove`] followed by
/// [`Nat::apply`] always runs nft. `remove` acts on the tables of the last
/// interface applied; on an instance that has applied nothing it does
/// nothing, and tables left by an earlier process, of either form, are
/// replaced by the next `apply` for the same interface.
///
/// Unless a form is forced ([`NftNat::with_form`], [`NftNat::force_form`]),
/// the form is found as the module doc says. Until then, applies without a
/// NAT chain (`enabled = false`) use `inet` without settling on it, since
/// old kernels take an `inet` table as long as it has no NAT chain.
#[derive(Debug, Default)]
pub struct NftNat {
    /// Run nft inside this network namespace (`ip netns exec`), for tests.
    netns: Option<String>,
    nft: Option<PathBuf>,
    /// The form to use: forced, or detected; `None` until detected.
    settled: Option<NatForm>,
    /// The interface whose tables may exist: removed on `remove`, and
    /// replaced in the same transaction if `apply` moves to another one.
    table_for: Option<String>,
    /// The script the kernel is known to match; `None` after a failure or a
    /// removal, so the next apply always runs.
    applied: Option<String>,
    /// The form of our tables in the kernel; `None` if there are none.
    current: Option<NatForm>,
}

impl NftNat {
    /// Detects the form on the first apply that needs a NAT chain.
    pub fn new() -> Self {
        Self::default()
    }

    /// Always uses `form`, without detection.
    pub fn with_form(form: NatForm) -> Self {
        Self::new().force_form(form)
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

    /// Always uses `form` instead of detecting it; combines with the
    /// constructors, as in `NftNat::in_netns(ns).force_form(form)`.
    pub fn force_form(self, form: NatForm) -> Self {
        NftNat {
            settled: Some(form),
            ..self
        }
    }

    /// Runs the nft at `path` instead of looking for it (tests give it an
    /// older nft's wrapper).
    pub fn with_nft(self, path: PathBuf) -> Self {
        NftNat {
            nft: Some(path),
            ..self
        }
    }

    /// The form this instance uses from now on: forced, or settled by
    /// detection; `None` while detection has not settled.
    pub fn settled(&self) -> Option<NatForm> {
        self.settled
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

    /// Runs `prefix` + the script for `desired` in the known form or, while
    /// none is known, in `inet` and then in the split form if nft rejects
    /// `inet`. Returns the form used and the script (without `prefix`).
    fn run_detecting(
        &mut self,
        desired: &NatState,
        prefix: &str,
        first: String,
    ) -> Result<(NatForm, String), NatError> {
        let form = self.settled.unwrap_or(NatForm::Inet);
        let inet_error = match self.run(&format!("{prefix}{first}")) {
            Ok(()) => return Ok((form, first)),
            // With no ranges the script is the same in both forms.
            Err(NatError::NftFailed { stderr })
                if self.settled.is_none() && !desired.ranges.is_empty() =>
            {
                stderr
            }
            Err(e) => return Err(e),
        };
        let split = script(desired, NatForm::Split)?;
        match self.run(&format!("{prefix}{split}")) {
            Ok(()) => {
                tracing::info!(
                    form = %NatForm::Split,
                    inet_error = %inet_error,
                    "nat: nft rejected the inet form (NAT in an inet table needs nft 0.9.1 and \
                     Linux 5.2); using an ip and an ip6 table instead"
                );
                self.settled = Some(NatForm::Split);
                Ok((NatForm::Split, split))
            }
            Err(NatError::NftFailed { stderr }) => Err(NatError::NftFailed {
                stderr: format!("as one inet table: {inet_error}; as ip and ip6 tables: {stderr}"),
            }),
            Err(e) => Err(e),
        }
    }
}

impl Nat for NftNat {
    fn apply(&mut self, desired: &NatState) -> Result<(), PortError> {
        NftNat::apply(self, desired).map_err(PortError::from)
    }

    fn remove(&mut self) -> Result<(), PortError> {
        NftNat::remove(self).map_err(PortError::from)
    }

    fn form(&self) -> Option<NatForm> {
        self.current
    }
}

/// The same operations with nft's own errors, for callers that want to tell
/// them apart; the port above is these, with errors as the control plane
/// reports them.
impl NftNat {
    /// Makes the kernel match `desired`, whole. Applying the same state
    /// twice runs nft once.
    pub fn apply(&mut self, desired: &NatState) -> Result<(), NatError> {
        let new = script(desired, self.settled.unwrap_or(NatForm::Inet))?;
        if self.applied.as_deref() == Some(new.as_str()) {
            tracing::debug!(interface = %desired.interface, "nat: unchanged, nft not run");
            return Ok(());
        }
        let mut prefix = String::new();
        if let Some(old) = &self.table_for {
            if *old != desired.interface {
                prefix.push_str(&remove_script(old));
            }
        }
        self.applied = None;
        let (form, new) = self.run_detecting(desired, &prefix, new)?;
        let has_table = !desired.ranges.is_empty();
        if self.settled.is_none() && has_table && desired.enabled {
            // The inet script just applied had a NAT chain: settled.
            tracing::info!(form = %form, "nat: nft takes NAT in an inet table; using it");
            self.settled = Some(form);
        }
        self.table_for = Some(desired.interface.clone());
        self.applied = Some(new);
        self.current = has_table.then_some(form);
        let table = table_name(&desired.interface);
        if has_table {
            tracing::info!(
                interface = %desired.interface,
                table = %table,
                form = %form,
                enabled = desired.enabled,
                ranges = ?IpNet::aggregate(&desired.ranges),
                "nat: applied"
            );
        } else {
            tracing::info!(
                interface = %desired.interface,
                table = %table,
                "nat: no advertised ranges, so no table"
            );
        }
        Ok(())
    }

    /// Removes our tables of both forms, if there are any.
    pub fn remove(&mut self) -> Result<(), NatError> {
        let Some(interface) = self.table_for.clone() else {
            return Ok(());
        };
        self.applied = None;
        self.run(&remove_script(&interface))?;
        self.table_for = None;
        self.current = None;
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

/// `name` in PATH, else `fallback`, if either is an executable file.
pub fn find_program(name: &str, fallback: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .chain(std::iter::once(PathBuf::from(fallback)))
        .find(|p| is_executable(p))
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
table ip vpcgate_vpcgate0 {}
delete table ip vpcgate_vpcgate0
table ip6 vpcgate_vpcgate0 {}
delete table ip6 vpcgate_vpcgate0
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
        assert_eq!(script(&s, NatForm::Inet).expect("valid state"), expected);
    }

    #[test]
    fn split_script_for_a_small_state() {
        let s = state(
            "vpc-gate0",
            true,
            &["198.19.8.0/22", "fd00:db8:f::/64", "198.19.0.0/24"],
        );
        let expected = "\
table inet vpcgate_vpc_hgate0 {}
delete table inet vpcgate_vpc_hgate0
table ip vpcgate_vpc_hgate0 {}
delete table ip vpcgate_vpc_hgate0
table ip6 vpcgate_vpc_hgate0 {}
delete table ip6 vpcgate_vpc_hgate0
table ip vpcgate_vpc_hgate0 {
\tset ranges4 {
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = { 198.19.0.0/24, 198.19.8.0/22 }
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority 100; policy accept;
\t\tiifname \"vpc-gate0\" ip daddr @ranges4 masquerade
\t}
}
table ip6 vpcgate_vpc_hgate0 {
\tset ranges6 {
\t\ttype ipv6_addr
\t\tflags interval
\t\telements = { fd00:db8:f::/64 }
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority 100; policy accept;
\t\tiifname \"vpc-gate0\" ip6 daddr @ranges6 masquerade
\t}
}
";
        assert_eq!(script(&s, NatForm::Split).expect("valid state"), expected);
    }

    /// The `table <family> <name> {` blocks of a script that create a table
    /// (not the empty declarations that precede a delete), as
    /// (family, body) pairs.
    fn created_tables(text: &str) -> Vec<(String, String)> {
        let mut tables = Vec::new();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            let Some(head) = line.strip_prefix("table ") else {
                continue;
            };
            let Some(head) = head.strip_suffix(" {") else {
                continue;
            };
            let family = head.split(' ').next().unwrap_or_default().to_string();
            let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "}").collect();
            tables.push((family, body.join("\n")));
        }
        tables
    }

    #[test]
    fn split_script_v4_only_keeps_an_empty_ip6_table() {
        let text =
            script(&state("wg0", true, &["198.19.0.0/24"]), NatForm::Split).expect("valid state");
        let tables = created_tables(&text);
        assert_eq!(tables.len(), 2, "{text}");
        let (ip, ip6) = (&tables[0], &tables[1]);
        assert_eq!(ip.0, "ip", "{text}");
        assert!(ip.1.contains("elements = { 198.19.0.0/24 }"), "{text}");
        assert!(ip.1.contains("ip daddr @ranges4 masquerade"), "{text}");
        assert!(!ip.1.contains("ranges6"), "{text}");
        assert_eq!(ip6.0, "ip6", "{text}");
        assert!(!ip6.1.contains("elements"), "{text}");
        assert!(ip6.1.contains("type ipv6_addr"), "{text}");
        assert!(ip6.1.contains("ip6 daddr @ranges6 masquerade"), "{text}");
        assert!(!ip6.1.contains("ranges4"), "{text}");
        assert!(!text.contains("table inet vpcgate_wg0 {\n"), "{text}");
        assert!(!text.contains("srcnat"), "{text}");
    }

    #[test]
    fn split_script_v6_only_keeps_an_empty_ip_table() {
        let text =
            script(&state("wg0", true, &["fd00:db8:1::/48"]), NatForm::Split).expect("valid state");
        let tables = created_tables(&text);
        assert_eq!(tables.len(), 2, "{text}");
        let (ip, ip6) = (&tables[0], &tables[1]);
        assert_eq!(ip.0, "ip", "{text}");
        assert!(!ip.1.contains("elements"), "{text}");
        assert!(ip.1.contains("type ipv4_addr"), "{text}");
        assert!(ip.1.contains("ip daddr @ranges4 masquerade"), "{text}");
        assert_eq!(ip6.0, "ip6", "{text}");
        assert!(ip6.1.contains("elements = { fd00:db8:1::/48 }"), "{text}");
        assert!(ip6.1.contains("ip6 daddr @ranges6 masquerade"), "{text}");
    }

    #[test]
    fn split_disabled_keeps_sets_but_has_no_chain() {
        let text = script(
            &state("wg0", false, &["198.19.0.0/24", "fd00:db8:1::/48"]),
            NatForm::Split,
        )
        .expect("valid state");
        let tables = created_tables(&text);
        let families: Vec<&str> = tables.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(families, ["ip", "ip6"], "{text}");
        assert!(
            tables[0].1.contains("elements = { 198.19.0.0/24 }"),
            "{text}"
        );
        assert!(
            tables[1].1.contains("elements = { fd00:db8:1::/48 }"),
            "{text}"
        );
        assert!(!text.contains("chain"), "{text}");
        assert!(!text.contains("masquerade"), "{text}");
    }

    #[test]
    fn every_script_deletes_the_tables_of_both_forms_first() {
        let deletes = "\
table inet vpcgate_wg0 {}
delete table inet vpcgate_wg0
table ip vpcgate_wg0 {}
delete table ip vpcgate_wg0
table ip6 vpcgate_wg0 {}
delete table ip6 vpcgate_wg0
";
        for form in [NatForm::Inet, NatForm::Split] {
            for enabled in [true, false] {
                let text =
                    script(&state("wg0", enabled, &["198.19.0.0/24"]), form).expect("valid state");
                assert!(text.starts_with(deletes), "{form} {enabled}: {text}");
                let families: Vec<String> =
                    created_tables(&text).into_iter().map(|(f, _)| f).collect();
                let expected: &[&str] = match form {
                    NatForm::Inet => &["inet"],
                    NatForm::Split => &["ip", "ip6"],
                };
                assert_eq!(families, expected, "{text}");
            }
        }
        assert_eq!(remove_script("wg0"), deletes);
    }

    #[test]
    fn script_with_no_ranges_only_deletes() {
        let expected = remove_script("wg0");
        for form in [NatForm::Inet, NatForm::Split] {
            for enabled in [true, false] {
                let text = script(&state("wg0", enabled, &[]), form).expect("valid state");
                assert_eq!(text, expected, "{form} {enabled}");
                assert!(created_tables(&text).is_empty(), "{text}");
            }
        }
    }

    #[test]
    fn form_names_round_trip() {
        assert_eq!(NatForm::Inet.to_string(), "inet");
        assert_eq!(NatForm::Split.to_string(), "ip+ip6");
        for form in [NatForm::Inet, NatForm::Split] {
            assert_eq!(form.to_string().parse::<NatForm>(), Ok(form));
        }
        assert_eq!("split".parse::<NatForm>(), Ok(NatForm::Split));
        let err = "ip".parse::<NatForm>().expect_err("not a form");
        assert!(err.to_string().contains("`inet`"), "{err}");
        assert!(err.to_string().contains("`ip+ip6`"), "{err}");
    }

    #[test]
    fn script_v6_only() {
        let text =
            script(&state("wg0", true, &["fd00:db8:1::/48"]), NatForm::Inet).expect("valid state");
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
    fn inet_disabled_keeps_sets_but_has_no_chain() {
        let text =
            script(&state("wg0", false, &["198.19.0.0/24"]), NatForm::Inet).expect("valid state");
        assert!(text.contains("elements = { 198.19.0.0/24 }"), "{text}");
        assert!(!text.contains("chain"), "{text}");
        assert!(!text.contains("masquerade"), "{text}");
    }

    #[test]
    fn overlapping_ranges_are_merged_and_host_bits_cleared() {
        // nft rejects overlapping elements in an interval set.
        for form in [NatForm::Inet, NatForm::Split] {
            let text = script(
                &state(
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
                ),
                form,
            )
            .expect("valid state");
            assert!(
                text.contains("elements = { 198.18.0.0/16, 198.19.0.0/23 }"),
                "{text}"
            );
            assert!(text.contains("elements = { fd00:db8::/32 }"), "{text}");
        }
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
            for form in [NatForm::Inet, NatForm::Split] {
                let err = script(&state(bad, true, &["198.19.0.0/24"]), form)
                    .expect_err(&format!("{bad:?} must be rejected"));
                assert!(matches!(err, NatError::BadInterface { .. }), "{err:?}");
            }
        }
    }

    #[test]
    fn nft_nat_rejects_bad_names_before_running_anything() {
        // No netns, no root: the name must fail before nft is looked for.
        for mut nat in [
            NftNat::in_netns("vgnat-never-created"),
            NftNat::in_netns("vgnat-never-created").force_form(NatForm::Split),
        ] {
            let err = nat
                .apply(&state("bad name", true, &[]))
                .expect_err("bad name");
            assert!(matches!(err, NatError::BadInterface { .. }), "{err:?}");
            assert_eq!(nat.form(), None);
            nat.remove().expect("nothing to remove");
        }
    }
}
