//! The package where it runs: a Debian booted with systemd in a
//! systemd-nspawn container (`--private-network`), the .deb installed with
//! dpkg, the service driven with `systemctl` and `vpcgate` inside it, and a
//! wireguard-go laptop and a "database" host outside it, each in a namespace
//! of the test's own joined to the container by a veth:
//!
//! ```text
//!  laptop ns                container (systemd, vpcgated)           vpc ns
//!  wg-quick/wireguard-go    wan0 198.18.60.1    vpc0 198.18.61.1    198.18.61.2
//!  198.18.60.2 ─────────────┘                        └──────────────┘
//! ```
//!
//! The vpc namespace has no route back to the tunnel network, so a ping from
//! the laptop to 198.18.61.2 is answered only if the gateway's SNAT works.
//!
//! - `fresh_install_under_systemd`: install, ready, SNAT, peers, reload,
//!   SIGKILL, the watchdog, the sandbox's score, broken and future state
//!   files, remove, reinstall, purge.
//! - `upgrade_from_0_1_0_keeps_everything`: the package of the last release
//!   (built from its commit) with a key, peers, advertised and accepted
//!   routes and non-default settings, upgraded to this tree's package; then
//!   a downgrade, which the old daemon refuses without touching the files.
//!
//! Needs root, debootstrap and systemd-container (`.ci/run` installs them).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vpcgate_e2e::{
    build_deb, release_deb, require_root, unix_now, wait_for_ping, wait_until, ClientConf,
    Container, Netns, OrDie, VpcgatedConfig, WgDev, WgQuick,
};

/// The last released commit (vpcgate 0.1.0), the upgrade's starting point.
const RELEASE_COMMIT: &str = "1b543c2";
const RELEASE_VERSION: &str = "0.1.0";

const WAN_GW: &str = "198.18.60.1";
const WAN_LAPTOP: &str = "198.18.60.2";
const VPC_RANGE: &str = "198.18.61.0/24";
const DB: &str = "198.18.61.2";
const ENDPOINT: &str = "198.18.60.1:51820";
const STATE: &str = "/var/lib/vpcgate";
const UNIT: &str = "vpcgated.service";
/// `systemd-analyze security` must rate the unit at most this exposed.
const MAX_EXPOSURE: f64 = 2.0;

/// How long systemd gets to (re)start the service: RestartSec=5 plus the
/// start itself, which takes well under a second. It protects against a
/// service that never comes back.
const RESTART_TIMEOUT: Duration = Duration::from_secs(120);
/// The unit's WatchdogSec is 30 s; then systemd sends SIGABRT (and SIGCONT,
/// so a stopped process acts on it) and restarts after RestartSec=5. It
/// protects against a watchdog that never fires.
const WATCHDOG_RESTART_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a laptop may take to get through the tunnel again. After the
/// gateway lost its sessions, wireguard-go handshakes again once its data
/// has gone unanswered for Keepalive-Timeout + Rekey-Timeout (15 s).
const RECONNECT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a ping through a working tunnel may take to be answered,
/// including the first handshake.
const PING_TIMEOUT: Duration = Duration::from_secs(30);

fn new_deb() -> PathBuf {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| build_deb("amd64").or_die("building this tree's package"))
        .clone()
}

/// The container, the laptop and the database host, wired as drawn above.
struct Site {
    c: Container,
    laptop: Netns,
    vpc: Netns,
}

impl Site {
    fn new(tag: &str) -> Result<Site> {
        require_root();
        let c = Container::boot(tag)?;
        let laptop = Netns::new("laptop")?;
        let vpc = Netns::new("vpc")?;
        c.veth(
            &laptop,
            "wan0",
            &format!("{WAN_GW}/24"),
            &format!("{WAN_LAPTOP}/24"),
        )?;
        c.veth(&vpc, "vpc0", "198.18.61.1/24", &format!("{DB}/24"))?;
        Ok(Site { c, laptop, vpc })
    }

    /// `vpcgate ARGS` inside the container, as root.
    fn vpcgate(&self, args: &[&str]) -> Result<String> {
        let mut argv = vec!["vpcgate"];
        argv.extend_from_slice(args);
        self.c.exec(&argv)
    }

    fn status_json(&self) -> Result<serde_json::Value> {
        let text = self.vpcgate(&["status", "--json"])?;
        serde_json::from_str(&text).with_context(|| format!("status is not JSON: {text}"))
    }

    fn public_key(&self) -> Result<String> {
        self.status_json()?["public_key"]
            .as_str()
            .map(str::to_string)
            .context("status has no public_key")
    }

    fn install(&self, deb: &std::path::Path) -> Result<String> {
        self.c.put(deb, "/var/tmp/install.deb")?;
        let out = self.c.exec_raw(&["dpkg", "-i", "/var/tmp/install.deb"])?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if !out.status.success() {
            bail!("dpkg -i {} failed ({}):\n{text}", deb.display(), out.status);
        }
        Ok(text)
    }

    fn main_pid(&self) -> Result<u32> {
        self.c
            .unit_property(UNIT, "MainPID")?
            .parse()
            .context("MainPID is not a number")
    }

    fn restarts(&self) -> Result<u32> {
        self.c
            .unit_property(UNIT, "NRestarts")?
            .parse()
            .context("NRestarts is not a number")
    }

    /// Active, running, and ready: with Type=notify, systemd reports
    /// "active" only once the daemon has sent READY=1.
    fn check_ready(&self) -> Result<()> {
        let ty = self.c.unit_property(UNIT, "Type")?;
        let active = self.c.unit_property(UNIT, "ActiveState")?;
        let sub = self.c.unit_property(UNIT, "SubState")?;
        if (ty.as_str(), active.as_str(), sub.as_str()) != ("notify", "active", "running") {
            bail!(
                "{UNIT} is {ty}/{active}/{sub}, not notify/active/running; its journal:\n{}",
                self.c.journal(UNIT)
            );
        }
        Ok(())
    }

    /// Waits until systemd has started a process other than `old` and it is
    /// ready.
    fn wait_restarted(&self, old: u32, timeout: Duration) -> Result<u32> {
        wait_until(timeout, "systemd to restart vpcgated", || {
            let pid = self.main_pid()?;
            let active = self.c.unit_property(UNIT, "ActiveState")?;
            Ok(pid != 0 && pid != old && active == "active")
        })
        .with_context(|| format!("journal:\n{}", self.c.journal(UNIT)))?;
        self.check_ready()?;
        self.main_pid()
    }

    /// The laptop's gateway peer's latest handshake, in Unix seconds.
    fn laptop_handshake(&self, wg: &WgQuick) -> Result<u64> {
        let out = self
            .laptop
            .exec(&["wg", "show", wg.iface(), "latest-handshakes"])?;
        out.split_whitespace()
            .nth(1)
            .context("no peer in `wg show latest-handshakes`")?
            .parse()
            .context("latest-handshake is not a number")
    }

    /// A cursor at the end of the container's journal, for [`Self::journal_after`].
    fn journal_cursor(&self) -> Result<String> {
        let out = self
            .c
            .exec(&["journalctl", "-n", "0", "--show-cursor", "--no-pager"])?;
        out.lines()
            .find_map(|l| l.strip_prefix("-- cursor: "))
            .map(str::to_string)
            .with_context(|| format!("no cursor in: {out}"))
    }

    fn journal_after(&self, cursor: &str) -> Result<String> {
        self.c.exec(&[
            "journalctl",
            "--no-pager",
            "-u",
            UNIT,
            &format!("--after-cursor={cursor}"),
        ])
    }

    /// The vpc namespace cannot answer the tunnel network by itself, so the
    /// ping below proves SNAT.
    fn check_no_route_back(&self) -> Result<()> {
        let out = self.vpc.exec_raw(&["ip", "route", "get", "100.64.0.2"])?;
        if out.status.success() {
            bail!(
                "the vpc namespace has a route to the tunnel: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(())
    }
}

/// What `status --json` shows of each peer's saved configuration.
fn saved_peers(status: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut peers: Vec<serde_json::Value> = status["peers"]
        .as_array()
        .map(|peers| {
            peers
                .iter()
                .map(|p| {
                    serde_json::json!([
                        p["name"],
                        p["public_key"],
                        p["allowed_ips"],
                        p["persistent_keepalive"],
                        p["accept_routes"],
                    ])
                })
                .collect()
        })
        .unwrap_or_default();
    peers.sort_by_key(|p| p.to_string());
    peers
}

/// The exposure `systemd-analyze security` prints for the unit.
fn exposure(text: &str) -> Result<f64> {
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .with_context(|| format!("no overall exposure in:\n{text}"))?;
    line.split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("cannot read the exposure from {line:?}"))
}

#[test]
fn exposure_is_read_from_systemd_analyze() {
    let text = "  NAME  DESCRIPTION  EXPOSURE\n✓ x\n\n→ Overall exposure level for vpcgated.service: 1.8 OK 🙂\n";
    assert_eq!(exposure(text).or_die("parse"), 1.8);
    assert!(exposure("nothing").is_err());
}

#[test]
fn fresh_install_under_systemd() {
    let deb = new_deb();
    let site = Site::new("f").or_die("setting up the container");
    let c = &site.c;
    // nspawn makes /dev/net/tun 0600, as some minimal images do; the
    // package must give its service user access by itself.
    c.exec(&["chmod", "0600", "/dev/net/tun"]).or_die("chmod");

    let out = site.install(&deb).or_die("installing the package");
    assert!(
        out.contains("vpcgate: installed"),
        "postinst's closing message is missing:\n{out}"
    );
    site.check_ready().or_die("after install");
    let pid = site.main_pid().or_die("MainPID");
    let user = c
        .exec(&["ps", "-o", "user=", "-p", &pid.to_string()])
        .or_die("ps");
    assert_eq!(user.trim(), "vpcgate", "vpcgated runs as {user}");
    let caps = c
        .exec(&["grep", "^CapEff:", &format!("/proc/{pid}/status")])
        .or_die("capabilities");
    // CAP_NET_ADMIN (bit 12) and CAP_NET_BIND_SERVICE (bit 10, for the DNS
    // forwarder's port 53), and nothing else.
    assert_eq!(
        caps.split_whitespace().nth(1),
        Some("0000000000001400"),
        "{caps}"
    );
    // Type=notify: `systemctl restart` returns once READY=1 came, and by
    // then the control socket answers.
    c.exec(&["systemctl", "restart", UNIT]).or_die("restart");
    let public_key = site
        .public_key()
        .or_die("status right after systemctl restart returned");
    let pid = site.main_pid().or_die("MainPID");

    // Doctor, as root, answers for the service user.
    let doctor = c.exec_raw(&[
        "env",
        // A closed port on the container's own loopback: doctor never
        // reaches a real metadata service.
        "VPCGATE_METADATA_ENDPOINT=http://127.0.0.1:9",
        "VPCGATE_DMI_DIR=/nonexistent",
        "vpcgate",
        "doctor",
    ]);
    let doctor = doctor.or_die("doctor");
    let doctor = String::from_utf8_lossy(&doctor.stdout);
    let tun_line = doctor
        .lines()
        .find(|l| l.contains("/dev/net/tun"))
        .unwrap_or_else(|| panic!("doctor says nothing about /dev/net/tun:\n{doctor}"));
    assert!(
        tun_line.contains("vpcgate") && tun_line.contains("opens"),
        "doctor's TUN check: {tun_line}"
    );

    // Routes, SNAT and a wg-quick laptop.
    site.vpcgate(&["advertise-routes", VPC_RANGE])
        .or_die("advertise-routes");
    site.vpcgate(&["set", "--public-endpoint", ENDPOINT])
        .or_die("set --public-endpoint");
    let conf = site.vpcgate(&["peer", "add", "laptop"]).or_die("peer add");
    let conf = ClientConf::parse(&conf).or_die("client config");
    let wg = WgQuick::up(&site.laptop, &conf).or_die("wg-quick up on the laptop");
    site.check_no_route_back().or_die("vpc routes");
    wait_for_ping(&site.laptop, DB, &[], PING_TIMEOUT).or_die("laptop → database through SNAT");
    let tables = c.exec(&["nft", "list", "tables"]).or_die("nft list tables");
    assert!(tables.contains("vpcgate"), "no SNAT table: {tables}");

    // Reload keeps the session: no new handshake, same process.
    let handshake = site.laptop_handshake(&wg).or_die("handshake");
    // Handshake times have one-second resolution: let the clock pass it, so
    // that a new handshake would show.
    wait_until(
        Duration::from_secs(5),
        "the clock to pass the handshake",
        || Ok(unix_now() > handshake),
    )
    .or_die("clock");
    let cursor = site.journal_cursor().or_die("cursor");
    c.exec(&["systemctl", "reload", UNIT]).or_die("reload");
    wait_until(Duration::from_secs(30), "the reload to be logged", || {
        Ok(site
            .journal_after(&cursor)?
            .contains("reloaded settings and peers"))
    })
    .or_die("reload");
    wait_for_ping(&site.laptop, DB, &[], PING_TIMEOUT).or_die("ping after reload");
    assert_eq!(
        site.main_pid().or_die("MainPID"),
        pid,
        "reload restarted the daemon"
    );
    assert_eq!(
        site.laptop_handshake(&wg).or_die("handshake"),
        handshake,
        "the reload cost the laptop its session"
    );

    // SIGKILL: systemd restarts it, with its key, peers and routes.
    let restarts = site.restarts().or_die("NRestarts");
    c.exec(&["kill", "-KILL", &pid.to_string()]).or_die("kill");
    let pid = site
        .wait_restarted(pid, RESTART_TIMEOUT)
        .or_die("restart after SIGKILL");
    assert_eq!(site.restarts().or_die("NRestarts"), restarts + 1);
    let status = site.status_json().or_die("status");
    assert_eq!(status["public_key"].as_str(), Some(public_key.as_str()));
    assert_eq!(status["advertised_routes"], serde_json::json!([VPC_RANGE]));
    assert_eq!(status["public_endpoint"].as_str(), Some(ENDPOINT));
    let names: Vec<&str> = status["peers"]
        .as_array()
        .map(|p| p.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["laptop"], "{status}");
    wait_for_ping(&site.laptop, DB, &[], RECONNECT_TIMEOUT)
        .or_die("the laptop reconnects after the restart");

    // The watchdog: a process that stops is restarted by systemd.
    let cursor = site.journal_cursor().or_die("cursor");
    c.exec(&["kill", "-STOP", &pid.to_string()])
        .or_die("SIGSTOP");
    site.wait_restarted(pid, WATCHDOG_RESTART_TIMEOUT)
        .or_die("restart by the watchdog");
    let journal = site.journal_after(&cursor).or_die("journal");
    assert!(
        journal.contains("Failed with result 'watchdog'"),
        "the restart was not the watchdog's:\n{journal}"
    );
    assert_eq!(site.public_key().or_die("status"), public_key);

    // The sandbox.
    let security = c
        .exec(&["systemd-analyze", "security", "--no-pager", UNIT])
        .or_die("systemd-analyze security");
    let level = exposure(&security).or_die("exposure");
    assert!(
        level <= MAX_EXPOSURE,
        "exposure {level} > {MAX_EXPOSURE}:\n{security}"
    );

    // Broken state files stop the start loudly, name the file, and are left
    // as they are.
    c.exec(&["systemctl", "stop", UNIT]).or_die("stop");
    c.sh(&format!(
        "cd {STATE} && for f in private.key settings.json peers.json; do cp -p $f /root/$f; done"
    ))
    .or_die("backup");
    let cases: [(&str, &str, &str); 4] = [
        ("private.key", "printf ''", "corrupt"),
        (
            "peers.json",
            "head -c $(($(stat -c %s /root/peers.json) / 2)) /root/peers.json",
            "corrupt",
        ),
        ("settings.json", "printf '\\377garbage\\n'", "corrupt"),
        (
            "settings.json",
            "printf '{\"format\": 99, \"settings\": {\"addresses\": []}}\\n'",
            "state format 99",
        ),
    ];
    for (file, write, says) in cases {
        let path = format!("{STATE}/{file}");
        c.sh(&format!("{write} > {path}"))
            .or_die("write a broken file");
        let before = c.exec(&["sha256sum", &path]).or_die("sha256sum");
        let cursor = site.journal_cursor().or_die("cursor");
        // Four failed starts in a row would trip StartLimitBurst.
        c.exec(&["systemctl", "reset-failed", UNIT])
            .or_die("reset-failed");
        let start = c.exec_raw(&["systemctl", "start", UNIT]).or_die("start");
        assert!(
            !start.status.success(),
            "vpcgated started with a broken {file} ({write})"
        );
        let journal = site.journal_after(&cursor).or_die("journal");
        assert!(
            journal.contains(&path) && journal.contains(says),
            "the journal does not name {path} with {says:?}:\n{journal}"
        );
        c.exec(&["systemctl", "stop", UNIT]).or_die("stop");
        assert_eq!(
            c.exec(&["sha256sum", &path]).or_die("sha256sum"),
            before,
            "{path} was changed by a start that failed"
        );
        c.sh(&format!("cp -p /root/{file} {path}"))
            .or_die("restore");
    }
    c.exec(&["systemctl", "reset-failed", UNIT])
        .or_die("reset-failed");
    c.exec(&["systemctl", "start", UNIT])
        .or_die("start with the files restored");
    site.check_ready().or_die("restored");
    assert_eq!(site.public_key().or_die("status"), public_key);

    // Remove keeps the state and the account; the SNAT table goes with the
    // daemon.
    let key_before = c
        .exec(&["sha256sum", &format!("{STATE}/private.key")])
        .or_die("sum");
    c.exec(&["dpkg", "-r", "vpcgate"]).or_die("dpkg -r");
    assert_eq!(
        c.unit_property(UNIT, "ActiveState").or_die("state"),
        "inactive"
    );
    assert!(
        !c.root().join("usr/bin/vpcgated").exists(),
        "vpcgated is still installed"
    );
    assert_eq!(
        c.exec(&["sha256sum", &format!("{STATE}/private.key")])
            .or_die("sum"),
        key_before,
        "remove changed the private key"
    );
    c.exec(&["getent", "passwd", "vpcgate"])
        .or_die("remove keeps the user");
    let tables = c.exec(&["nft", "list", "tables"]).or_die("nft");
    assert!(
        !tables.contains("vpcgate"),
        "the SNAT table outlived the daemon: {tables}"
    );

    // A reinstall is the same gateway.
    site.install(&deb).or_die("reinstalling");
    site.check_ready().or_die("after reinstall");
    assert_eq!(site.public_key().or_die("status"), public_key);
    wait_for_ping(&site.laptop, DB, &[], RECONNECT_TIMEOUT).or_die("the laptop after reinstall");

    // Purge leaves nothing behind.
    c.exec(&["dpkg", "-P", "vpcgate"]).or_die("dpkg -P");
    for (what, args) in [
        ("the user", &["getent", "passwd", "vpcgate"][..]),
        ("the group", &["getent", "group", "vpcgate"][..]),
        ("/var/lib/vpcgate", &["test", "-e", STATE][..]),
        ("/run/vpcgate", &["test", "-e", "/run/vpcgate"][..]),
        (
            "the unit file",
            &["test", "-e", "/lib/systemd/system/vpcgated.service"][..],
        ),
        (
            "the enablement link",
            &[
                "test",
                "-e",
                "/etc/systemd/system/multi-user.target.wants/vpcgated.service",
            ][..],
        ),
        (
            "the tmpfiles line",
            &["test", "-e", "/usr/lib/tmpfiles.d/vpcgate.conf"][..],
        ),
    ] {
        let out = c.exec_raw(args).or_die("check");
        assert!(!out.status.success(), "purge left {what} behind");
    }
    let tables = c.exec(&["nft", "list", "tables"]).or_die("nft");
    assert!(
        !tables.contains("vpcgate"),
        "purge left an nft table: {tables}"
    );
    assert_eq!(
        c.unit_property(UNIT, "LoadState").or_die("LoadState"),
        "not-found",
        "systemd still knows the unit"
    );
    drop(wg);
}

#[test]
fn upgrade_from_0_1_0_keeps_everything() {
    let old = release_deb(RELEASE_COMMIT, "amd64").or_die("building the 0.1.0 package");
    let new = new_deb();
    assert!(
        old.to_string_lossy()
            .contains(&format!("vpcgate_{RELEASE_VERSION}_amd64")),
        "{}",
        old.display()
    );
    let site = Site::new("u").or_die("setting up the container");
    let c = &site.c;
    // 0.1.0 needs /dev/net/tun 0666, as udev makes it on a normal host; it
    // did not bring its own access.
    c.exec(&["chmod", "0666", "/dev/net/tun"]).or_die("chmod");
    site.install(&old).or_die("installing 0.1.0");
    site.check_ready().or_die("0.1.0 after install");
    assert_eq!(
        c.exec(&["vpcgated", "--version"]).or_die("version").trim(),
        format!("vpcgated {RELEASE_VERSION}")
    );

    // Everything 0.1.0 can save: settings, advertised routes, a generated
    // client, a client with its own key, and a gateway peer whose routes
    // are accepted (another vpcgated, outside, in its own namespace).
    site.vpcgate(&[
        "set",
        "--public-endpoint",
        ENDPOINT,
        "--mtu",
        "1380",
        "--mss-clamp",
        "off",
    ])
    .or_die("set");
    site.vpcgate(&["advertise-routes", VPC_RANGE])
        .or_die("advertise-routes");
    let conf_text = site
        .vpcgate(&["peer", "add", "laptop"])
        .or_die("peer add laptop");
    site.vpcgate(&[
        "peer",
        "add",
        "phone",
        "--public-key",
        "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=",
        "--keepalive",
        "25",
    ])
    .or_die("peer add phone");
    let remote = Netns::new("remote").or_die("netns");
    c.veth(&remote, "wan1", "198.18.62.1/24", "198.18.62.2/24")
        .or_die("veth to the remote gateway");
    let other = WgDev::vpcgated(&remote, "r", &VpcgatedConfig::new(51821, "100.64.1.1/24"))
        .or_die("the remote gateway");
    let other_ctl = vpcgate_e2e::Vpcgate::for_dev(&other).or_die("its control socket");
    other_ctl
        .advertise(&["198.19.5.0/24"])
        .or_die("remote advertise-routes");
    let gw_key = site.public_key().or_die("status");
    other_ctl
        .run(&[
            "peer",
            "add",
            "site",
            "--public-key",
            &gw_key,
            "--allowed-ips",
            "100.64.0.0/24",
        ])
        .or_die("remote: peer add");
    site.vpcgate(&[
        "peer",
        "add",
        "remote",
        "--public-key",
        &other.public_key().or_die("remote key"),
        "--endpoint",
        "198.18.62.2:51821",
        "--allowed-ips",
        "100.64.1.1/32",
        "--accept-routes",
        "--keepalive",
        "25",
    ])
    .or_die("peer add remote --accept-routes");
    wait_until(
        Duration::from_secs(60),
        "0.1.0 to learn the remote's range",
        || {
            let status = site.status_json()?;
            Ok(status["accepted_routes"] == serde_json::json!(["198.19.5.0/24"]))
        },
    )
    .or_die("accepted routes");

    let conf = ClientConf::parse(&conf_text).or_die("client config");
    let wg = WgQuick::up(&site.laptop, &conf).or_die("wg-quick up");
    site.check_no_route_back().or_die("vpc routes");
    wait_for_ping(&site.laptop, DB, &[], PING_TIMEOUT).or_die("laptop → database on 0.1.0");
    let before = site.status_json().or_die("status");
    let laptop_conf_before = site
        .vpcgate(&["peer", "config", "laptop"])
        .or_die("peer config");
    let old_pid = site.main_pid().or_die("MainPID");
    // The files as 0.1.0 wrote them: no format marker.
    let settings_v1 = c
        .exec(&["cat", &format!("{STATE}/settings.json")])
        .or_die("cat");
    assert!(!settings_v1.contains("\"format\""), "{settings_v1}");

    // The upgrade.
    site.install(&new).or_die("upgrading");
    site.wait_restarted(old_pid, RESTART_TIMEOUT)
        .or_die("restart by postinst");
    assert_eq!(
        c.exec(&["vpcgated", "--version"]).or_die("version").trim(),
        format!("vpcgated {}", env!("CARGO_PKG_VERSION"))
    );
    let after = site.status_json().or_die("status after the upgrade");
    for field in [
        "public_key",
        "listen_port",
        "public_endpoint",
        "advertised_routes",
        "snat",
        "mss_clamp",
        "address",
        "addresses",
        "mtu",
    ] {
        assert_eq!(
            after.get(field),
            before.get(field),
            "{field} changed in the upgrade\nbefore: {before}\nafter: {after}"
        );
    }
    assert!(
        after["accepted_routes"] == serde_json::json!(["198.19.5.0/24"]),
        "the accepted route did not survive: {after}"
    );
    assert_eq!(
        saved_peers(&after),
        saved_peers(&before),
        "the peers changed in the upgrade"
    );
    assert_eq!(saved_peers(&after).len(), 3, "{after}");
    let laptop_conf_after = site
        .vpcgate(&["peer", "config", "laptop"])
        .or_die("peer config");
    for key in [
        "PrivateKey",
        "Address",
        "PublicKey",
        "AllowedIPs",
        "Endpoint",
    ] {
        let pick = |text: &str| -> Vec<String> {
            text.lines()
                .filter(|l| l.trim_start().starts_with(key))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(
            pick(&laptop_conf_after),
            pick(&laptop_conf_before),
            "{key} in the laptop's config changed"
        );
    }
    // The laptop carries on, with nothing changed on its side.
    wait_for_ping(&site.laptop, DB, &[], RECONNECT_TIMEOUT).or_die("laptop after the upgrade");
    // Every file is rewritten in the current format once the start went
    // well.
    let key_file = c
        .exec(&["cat", &format!("{STATE}/private.key")])
        .or_die("cat");
    assert!(
        key_file.starts_with("# vpcgate private key (state format 2)\n"),
        "{key_file}"
    );
    for file in ["settings.json", "peers.json"] {
        let text = c.exec(&["cat", &format!("{STATE}/{file}")]).or_die("cat");
        assert!(
            text.contains("\"format\": 2"),
            "{file} was not rewritten:\n{text}"
        );
    }

    // A downgrade: 0.1.0 cannot read format 2, refuses to start, and leaves
    // every file as it is; the upgrade again brings it all back.
    let sums = format!("sha256sum {STATE}/private.key {STATE}/settings.json {STATE}/peers.json");
    let sums_before = c.sh(&sums).or_die("sums");
    let cursor = site.journal_cursor().or_die("cursor");
    let out = site.install(&old).or_die("downgrading to 0.1.0");
    assert!(
        out.contains("did not start"),
        "0.1.0 started on format 2:\n{out}"
    );
    c.exec(&["systemctl", "stop", UNIT]).or_die("stop");
    let journal = site.journal_after(&cursor).or_die("journal");
    assert!(
        journal.contains(&format!("{STATE}/")),
        "0.1.0's refusal names no file:\n{journal}"
    );
    assert_eq!(
        c.sh(&sums).or_die("sums"),
        sums_before,
        "0.1.0 changed the state files"
    );
    site.install(&new).or_die("upgrading again");
    site.check_ready().or_die("after the second upgrade");
    assert_eq!(site.public_key().or_die("status"), gw_key);
    wait_for_ping(&site.laptop, DB, &[], RECONNECT_TIMEOUT).or_die("laptop after it all");
    drop(wg);
}
