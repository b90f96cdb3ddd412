//! vpcgated's SNAT tables (`vpcgated::nat::NftNat`) against the real
//! kernel and nft. Each test runs in its own network namespace (the
//! harness's `Netns`), which is deleted when the test ends, pass or fail;
//! `NftNat::in_netns` runs nft through `ip netns exec`. They need root and
//! fail, never skip, without it. (They were the daemon crate's
//! `nat::kernel_tests`; moved here, they leave that crate's unit tests
//! runnable by an unprivileged user.)

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use vpcgate_e2e::Netns;
use vpcgated::nat::*;

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// One of the harness's namespaces (deleted on drop, also while
/// unwinding), with nft helpers.
struct TestNs(Netns);

impl TestNs {
    fn new() -> Self {
        TestNs(Netns::new("nat").unwrap_or_else(|e| panic!("{e:#}")))
    }

    fn name(&self) -> &str {
        self.0.name()
    }

    fn exec(&self, argv: &[&str]) -> String {
        self.0.exec(argv).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn nft_script(&self, text: &str) {
        self.0
            .exec_stdin(&["nft", "-f", "-"], text.as_bytes())
            .unwrap_or_else(|e| panic!("nft: {e:#}"));
    }

    fn ruleset(&self) -> String {
        self.exec(&["nft", "list", "ruleset"])
    }

    /// Every table, as `table <family> <name>`, sorted.
    fn tables(&self) -> Vec<String> {
        let mut tables: Vec<String> = self
            .exec(&["nft", "list", "tables"])
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        tables.sort();
        tables
    }

    /// Our tables only.
    fn ours(&self) -> Vec<String> {
        let mut tables = self.tables();
        tables.retain(|t| t.contains(TABLE_PREFIX));
        tables
    }

    /// The table listing with handles (`nft -a`), or `None` if absent.
    fn table(&self, family: &str, name: &str) -> Option<String> {
        let out = self
            .0
            .exec_raw(&["nft", "-a", "list", "table", family, name])
            .unwrap_or_else(|e| panic!("{e:#}"));
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Detects the form, as the daemon's does.
    fn nat(&self) -> NftNat {
        NftNat::in_netns(self.name())
    }

    fn nat_in(&self, form: NatForm) -> NftNat {
        NftNat::in_netns(self.name()).force_form(form)
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it
    /// creates stay in the namespace.
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.0
                    .enter_current_thread()
                    .unwrap_or_else(|e| panic!("{e:#}"));
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
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
const OTHER: &str = "table inet other";

fn foreign_listing(ns: &TestNs) -> String {
    ns.exec(&["nft", "list", "table", "inet", "other"])
}

/// Our table names for `form`, as `TestNs::ours` lists them.
fn tables_of(form: NatForm, name: &str) -> Vec<String> {
    let families: &[&str] = match form {
        NatForm::Inet => &["inet"],
        NatForm::Split => &["ip", "ip6"],
    };
    families
        .iter()
        .map(|f| format!("table {f} {name}"))
        .collect()
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
    // This kernel and nft take the inet form, so detection picks it.
    assert_eq!(nat.form(), Some(NatForm::Inet));
    assert_eq!(ns.ours(), tables_of(NatForm::Inet, table));
    let listing = ns.table("inet", table).expect("table exists");
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
    assert_eq!(ns.table("inet", table).as_deref(), Some(listing.as_str()));

    nat.apply(&state("vgt0", true, &["198.19.64.0/18"]))
        .expect("new ranges");
    let listing = ns.table("inet", table).expect("table exists");
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
    let listing = ns
        .table("inet", table)
        .expect("table still exists when disabled");
    assert!(!listing.contains("masquerade"), "{listing}");
    assert!(!listing.contains("chain"), "{listing}");
    assert!(
        listing.contains("elements = { 198.19.64.0/18 }"),
        "{listing}"
    );
    assert_eq!(nat.form(), Some(NatForm::Inet));
    assert_eq!(foreign_listing(&ns), foreign);

    nat.remove().expect("remove");
    assert_eq!(nat.form(), None);
    assert!(ns.table("inet", table).is_none(), "{}", ns.ruleset());
    assert_eq!(ns.tables(), vec![OTHER.to_string()]);
    nat.remove().expect("remove again");
    assert_eq!(foreign_listing(&ns), foreign);

    // After a removal the same state is applied again for real.
    nat.apply(&state("vgt0", false, &["198.19.64.0/18"]))
        .expect("apply after remove");
    assert!(ns.table("inet", table).is_some());
    nat.remove().expect("final remove");
    assert_eq!(ns.tables(), vec![OTHER.to_string()]);
}

#[test]
fn split_form_creates_ip_and_ip6_tables_and_remove_deletes_both() {
    let ns = TestNs::new();
    ns.nft_script(FOREIGN);
    let foreign = foreign_listing(&ns);
    let mut nat = ns.nat_in(NatForm::Split);
    let table = "vpcgate_vgt0";

    nat.apply(&state(
        "vgt0",
        true,
        &["198.19.0.0/24", "198.19.8.0/22", "fd00:db8:f::/64"],
    ))
    .expect("apply");
    assert_eq!(nat.form(), Some(NatForm::Split));
    assert_eq!(ns.ours(), tables_of(NatForm::Split, table));
    let ip = ns.table("ip", table).expect("ip table");
    assert!(
        ip.contains("elements = { 198.19.0.0/24, 198.19.8.0/22 }"),
        "{ip}"
    );
    // nft lists priority 100 by its name.
    assert!(
        ip.contains("type nat hook postrouting priority srcnat; policy accept;"),
        "{ip}"
    );
    assert!(
        ip.contains("iifname \"vgt0\" ip daddr @ranges4 masquerade"),
        "{ip}"
    );
    assert!(!ip.contains("ranges6"), "{ip}");
    let ip6 = ns.table("ip6", table).expect("ip6 table");
    assert!(ip6.contains("elements = { fd00:db8:f::/64 }"), "{ip6}");
    assert!(
        ip6.contains("type nat hook postrouting priority srcnat; policy accept;"),
        "{ip6}"
    );
    assert!(
        ip6.contains("iifname \"vgt0\" ip6 daddr @ranges6 masquerade"),
        "{ip6}"
    );
    assert!(!ip6.contains("ranges4"), "{ip6}");

    // Unchanged: nft is not run.
    nat.apply(&state(
        "vgt0",
        true,
        &["fd00:db8:f::/64", "198.19.8.0/22", "198.19.0.0/24"],
    ))
    .expect("same again");
    assert_eq!(ns.table("ip", table).as_deref(), Some(ip.as_str()));
    assert_eq!(ns.table("ip6", table).as_deref(), Some(ip6.as_str()));

    // v4 only: the ip6 table stays, with an empty set.
    nat.apply(&state("vgt0", true, &["198.19.64.0/18"]))
        .expect("v4 only");
    assert_eq!(ns.ours(), tables_of(NatForm::Split, table));
    let ip6 = ns.table("ip6", table).expect("ip6 table");
    assert!(!ip6.contains("elements"), "{ip6}");
    assert!(ip6.contains("masquerade"), "{ip6}");

    nat.apply(&state(
        "vgt0",
        false,
        &["198.19.64.0/18", "fd00:db8:e::/64"],
    ))
    .expect("disable");
    assert_eq!(ns.ours(), tables_of(NatForm::Split, table));
    for family in ["ip", "ip6"] {
        let listing = ns.table(family, table).expect("table kept when disabled");
        assert!(!listing.contains("chain"), "{listing}");
        assert!(!listing.contains("masquerade"), "{listing}");
        assert!(listing.contains("elements = "), "{listing}");
    }
    assert_eq!(nat.form(), Some(NatForm::Split));

    nat.remove().expect("remove");
    assert_eq!(nat.form(), None);
    assert_eq!(ns.tables(), vec![OTHER.to_string()], "{}", ns.ruleset());
    nat.remove().expect("remove again");
    assert_eq!(foreign_listing(&ns), foreign);
}

#[test]
fn switching_forms_leaves_only_the_current_forms_tables() {
    let ns = TestNs::new();
    ns.nft_script(FOREIGN);
    let table = "vpcgate_vgt0";
    let s = state("vgt0", true, &["198.19.0.0/24", "fd00:db8:f::/64"]);
    // A fresh instance per step, as after a restart with another
    // `--nat-form`: its first apply always runs nft.
    for form in [NatForm::Inet, NatForm::Split, NatForm::Inet, NatForm::Split] {
        let mut nat = ns.nat_in(form);
        nat.apply(&s)
            .unwrap_or_else(|e| panic!("apply {form}: {e}"));
        assert_eq!(nat.form(), Some(form));
        let mut expected = tables_of(form, table);
        expected.push(OTHER.to_string());
        expected.sort();
        assert_eq!(ns.tables(), expected, "{form}: {}", ns.ruleset());
        let masquerades = ns.ruleset().matches("masquerade").count();
        assert_eq!(masquerades, 2, "{form}: {}", ns.ruleset());
    }
    // Whichever form an instance uses, `remove` deletes both.
    ns.nat_in(NatForm::Split).apply(&s).expect("split again");
    let mut inet = ns.nat_in(NatForm::Inet);
    inet.apply(&state("vgt0", false, &["198.19.0.0/24"]))
        .expect("inet, disabled");
    assert_eq!(ns.ours(), tables_of(NatForm::Inet, table));
    inet.remove().expect("remove");
    assert_eq!(ns.tables(), vec![OTHER.to_string()]);
}

#[test]
fn no_ranges_means_no_table() {
    for form in [NatForm::Inet, NatForm::Split] {
        let ns = TestNs::new();
        ns.nft_script(FOREIGN);
        let table = "vpcgate_vgt0";
        let only_other = vec![OTHER.to_string()];

        let mut nat = ns.nat_in(form);
        nat.apply(&state("vgt0", true, &[]))
            .expect("no ranges at first");
        assert_eq!(nat.form(), None);
        assert_eq!(ns.tables(), only_other, "{form}");

        nat.apply(&state("vgt0", true, &["198.19.0.0/24"]))
            .expect("ranges");
        assert_eq!(nat.form(), Some(form));
        assert_eq!(ns.ours(), tables_of(form, table), "{form}");

        nat.apply(&state("vgt0", true, &[]))
            .expect("ranges cleared");
        assert_eq!(nat.form(), None);
        assert_eq!(ns.tables(), only_other, "{form}: {}", ns.ruleset());
        nat.apply(&state("vgt0", false, &[]))
            .expect("cleared and disabled");
        assert_eq!(ns.tables(), only_other, "{form}");

        nat.apply(&state("vgt0", false, &["fd00:db8:f::/64"]))
            .expect("ranges again");
        assert_eq!(nat.form(), Some(form));
        assert_eq!(ns.ours(), tables_of(form, table), "{form}");

        // A restarted daemon with no ranges deletes the tables the
        // earlier one left, whatever their form.
        let foreign = foreign_listing(&ns);
        let mut fresh = ns.nat();
        fresh
            .apply(&state("vgt0", true, &[]))
            .expect("no ranges over a leftover");
        assert_eq!(fresh.form(), None);
        assert_eq!(ns.tables(), only_other, "{form}: {}", ns.ruleset());
        assert_eq!(foreign_listing(&ns), foreign);
    }
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
    let listing = ns.table("inet", "vpcgate_vgt0").expect("table");
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
fn changing_interface_moves_the_tables_in_one_apply() {
    for form in [NatForm::Inet, NatForm::Split] {
        let ns = TestNs::new();
        ns.nft_script(FOREIGN);
        let mut nat = ns.nat_in(form);
        nat.apply(&state("vgt-a", true, &["198.19.0.0/24"]))
            .expect("apply a");
        assert_eq!(ns.ours(), tables_of(form, "vpcgate_vgt_ha"));
        nat.apply(&state("vgt.b", true, &["198.19.0.0/24"]))
            .expect("apply b");
        assert_eq!(
            ns.ours(),
            tables_of(form, "vpcgate_vgt_db"),
            "{}",
            ns.ruleset()
        );
        assert!(
            ns.ruleset().contains("iifname \"vgt.b\""),
            "{}",
            ns.ruleset()
        );
        // Moving to an interface with no ranges leaves nothing.
        nat.apply(&state("vgt-c", true, &[])).expect("apply c");
        assert_eq!(ns.tables(), vec![OTHER.to_string()], "{}", ns.ruleset());
        nat.remove().expect("remove");
        assert_eq!(ns.tables(), vec![OTHER.to_string()]);
    }
}

#[test]
fn bad_interface_creates_nothing() {
    let ns = TestNs::new();
    ns.nft_script(FOREIGN);
    let before = ns.ruleset();
    for mut nat in [ns.nat(), ns.nat_in(NatForm::Split)] {
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
}

#[test]
fn nft_failure_is_reported_and_retried() {
    vpcgate_e2e::require_root();
    let missing = unique("vgnat-missing-");
    let s = state("vgt0", true, &["198.19.0.0/24"]);
    let mut nat = NftNat::in_netns(&missing);
    for _ in 0..2 {
        let err = nat.apply(&s).expect_err("no such netns");
        // Both forms were tried, and both failures are reported.
        match &err {
            NatError::NftFailed { stderr } => {
                assert!(stderr.contains("as one inet table: "), "{stderr}");
                assert!(stderr.contains("as ip and ip6 tables: "), "{stderr}");
            }
            _ => panic!("{err:?}"),
        }
        assert_eq!(nat.form(), None);
        assert_eq!(nat.settled(), None, "a failure settles on no form");
    }
    let mut forced = NftNat::in_netns(&missing).force_form(NatForm::Split);
    for _ in 0..2 {
        let err = forced.apply(&s).expect_err("no such netns");
        match &err {
            NatError::NftFailed { stderr } => {
                assert!(!stderr.contains("as one inet table"), "{stderr}")
            }
            _ => panic!("{err:?}"),
        }
        assert_eq!(forced.form(), None);
    }
}

/// An nft that behaves like one too old for NAT in an inet table: it
/// rejects any script naming the `srcnat` priority, which only the
/// inet form's NAT chain uses, and hands everything else to the real
/// nft. Deleted on drop.
struct OldNft {
    dir: PathBuf,
    path: PathBuf,
}

impl OldNft {
    fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let real = find_program("nft", NFT_FALLBACK).expect("nft installed");
        let dir = std::env::temp_dir().join(unique("vgnat-oldnft-"));
        std::fs::create_dir(&dir).expect("temp dir");
        let path = dir.join("nft");
        let text = format!(
            "#!/bin/sh\n\
             input=$(cat)\n\
             case \"$input\" in\n\
             *'priority srcnat'*)\n\
             \techo 'Error: Could not process rule: Operation not supported (simulated old system)' >&2\n\
             \texit 1 ;;\n\
             esac\n\
             printf '%s\\n' \"$input\" | '{}' \"$@\"\n",
            real.display()
        );
        std::fs::write(&path, text).expect("write fake nft");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod fake nft");
        OldNft { dir, path }
    }
}

impl Drop for OldNft {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn detection_settles_on_inet_only_once_a_nat_chain_was_taken() {
    let ns = TestNs::new();
    let table = "vpcgate_vgt0";
    let mut nat = ns.nat();
    nat.apply(&state("vgt0", true, &[])).expect("no ranges");
    assert_eq!((nat.form(), nat.settled()), (None, None));
    nat.apply(&state("vgt0", false, &["198.19.0.0/24"]))
        .expect("disabled");
    assert_eq!((nat.form(), nat.settled()), (Some(NatForm::Inet), None));
    nat.apply(&state("vgt0", true, &["198.19.0.0/24"]))
        .expect("enabled");
    assert_eq!(
        (nat.form(), nat.settled()),
        (Some(NatForm::Inet), Some(NatForm::Inet))
    );
    assert_eq!(ns.ours(), tables_of(NatForm::Inet, table));
    nat.remove().expect("remove");
    assert_eq!(nat.settled(), Some(NatForm::Inet), "detection is kept");
    assert!(ns.tables().is_empty());
}

#[test]
fn detection_falls_back_to_split_when_nft_rejects_inet_nat() {
    let old = OldNft::new();
    let ns = TestNs::new();
    ns.nft_script(FOREIGN);
    let table = "vpcgate_vgt0";
    let mut nat = ns.nat().with_nft(old.path.clone());

    // Without a NAT chain the inet table is taken, even here.
    nat.apply(&state("vgt0", false, &["198.19.0.0/24", "fd00:db8:f::/64"]))
        .expect("disabled");
    assert_eq!((nat.form(), nat.settled()), (Some(NatForm::Inet), None));
    assert_eq!(ns.ours(), tables_of(NatForm::Inet, table));

    // Enabling needs NAT, which this nft rejects in an inet table: the
    // split form replaces the inet table in the same apply.
    nat.apply(&state("vgt0", true, &["198.19.0.0/24", "fd00:db8:f::/64"]))
        .expect("enabled");
    assert_eq!(
        (nat.form(), nat.settled()),
        (Some(NatForm::Split), Some(NatForm::Split))
    );
    assert_eq!(ns.ours(), tables_of(NatForm::Split, table));
    let ip = ns.table("ip", table).expect("ip table");
    assert!(ip.contains("ip daddr @ranges4 masquerade"), "{ip}");
    let ip6 = ns.table("ip6", table).expect("ip6 table");
    assert!(ip6.contains("ip6 daddr @ranges6 masquerade"), "{ip6}");

    // Settled: later applies use the split form straight away.
    nat.apply(&state("vgt0", false, &["198.19.0.0/24"]))
        .expect("disabled again");
    assert_eq!(nat.form(), Some(NatForm::Split));
    assert_eq!(ns.ours(), tables_of(NatForm::Split, table));
    nat.apply(&state("vgt0", true, &[])).expect("no ranges");
    assert_eq!(nat.form(), None);
    assert_eq!(ns.ours(), Vec::<String>::new());
    nat.apply(&state("vgt0", true, &["fd00:db8:f::/64"]))
        .expect("ranges again");
    assert_eq!(nat.form(), Some(NatForm::Split));
    assert_eq!(ns.ours(), tables_of(NatForm::Split, table));

    // A fresh detecting instance on this nft goes straight to split.
    let mut fresh = ns.nat().with_nft(old.path.clone());
    fresh
        .apply(&state("vgt0", true, &["198.19.0.0/24"]))
        .expect("fresh");
    assert_eq!(fresh.form(), Some(NatForm::Split));
    fresh.remove().expect("remove");
    assert_eq!(ns.tables(), vec![OTHER.to_string()]);
}

fn peer_seen(client: &TestNs, server: &TestNs, listen: SocketAddr) -> Result<SocketAddr, String> {
    let listener = server.enter(|| TcpListener::bind(listen).expect("bind"));
    let target = listener.local_addr().expect("local addr");
    let stream = client
        .enter(|| TcpStream::connect_timeout(&target, Duration::from_secs(3)))
        .map_err(|e| format!("connect to {target}: {e}"))?;
    let (_conn, peer) = listener.accept().expect("accept");
    drop(stream);
    Ok(peer)
}

#[test]
fn forwarded_traffic_leaves_with_the_gateway_address_inet() {
    forwarded_traffic_leaves_with_the_gateway_address(NatForm::Inet);
}

#[test]
fn forwarded_traffic_leaves_with_the_gateway_address_split() {
    forwarded_traffic_leaves_with_the_gateway_address(NatForm::Split);
}

/// client --(veth "TUN")--> gateway --(veth)--> far, over TCP. The far
/// end has a route back to the client's network, so without SNAT
/// connections still work and show the client's own address.
fn forwarded_traffic_leaves_with_the_gateway_address(form: NatForm) {
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
        client.name(),
    ]);
    gw.exec(&[
        "ip",
        "link",
        "add",
        out,
        "type",
        "veth",
        "peer",
        "name",
        "f0",
        "netns",
        far.name(),
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
    let ip = |s: &str| -> IpAddr { s.parse().expect("ip") };
    let seen = |dst: SocketAddr| peer_seen(&client, &far, dst).map(|p| p.ip());
    let gateway = || (seen(v4), seen(v6));
    let masqueraded = (Ok(ip("198.19.0.1")), Ok(ip("fd00:db8:f::1")));
    let unchanged = (Ok(ip("198.18.1.2")), Ok(ip("fd00:db8:c::2")));
    let ours = tables_of(form, "vpcgate_vgtun0");

    let mut nat = gw.nat_in(form);
    nat.apply(&state(tun, true, &["198.19.0.0/24", "fd00:db8:f::/64"]))
        .expect("apply");
    assert_eq!(nat.form(), Some(form));
    assert_eq!(gw.ours(), ours);
    assert_eq!(gateway(), masqueraded, "{form}");

    // Destinations outside the ranges keep the client's address.
    nat.apply(&state(tun, true, &["198.19.128.0/17", "fd00:db8:e::/64"]))
        .expect("other ranges");
    assert_eq!(gateway(), unchanged, "{form}");

    // Disabled: no masquerade even for the ranges.
    nat.apply(&state(tun, false, &["198.19.0.0/24", "fd00:db8:f::/64"]))
        .expect("disable");
    assert_eq!(gateway(), unchanged, "{form}");

    // No ranges: no table, no masquerade; ranges again bring both back.
    nat.apply(&state(tun, true, &[])).expect("no ranges");
    assert!(gw.tables().is_empty(), "{}", gw.ruleset());
    assert_eq!(gateway(), unchanged, "{form}");
    nat.apply(&state(tun, true, &["198.19.0.0/24", "fd00:db8:f::/64"]))
        .expect("ranges again");
    assert_eq!(gw.ours(), ours);
    assert_eq!(gateway(), masqueraded, "{form}");

    // Traffic from another interface is not ours to masquerade: rename
    // the rule's interface away from the one the client uses.
    nat.apply(&state(
        "vgother0",
        true,
        &["198.19.0.0/24", "fd00:db8:f::/64"],
    ))
    .expect("other iif");
    assert_eq!(gateway(), unchanged, "{form}");

    nat.remove().expect("remove");
    assert!(gw.tables().is_empty(), "{}", gw.ruleset());
}
