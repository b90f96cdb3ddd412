//! `vpcgate doctor`: finds what stops this VM from working as a subnet
//! router and says how to fix each thing.
//!
//! It asks vpcgated for its view (interface, port, advertised ranges, SNAT)
//! with `Request::Status`, reads the host in the caller's network namespace
//! (`host`), and on a cloud VM recognised from DMI asks the provider's
//! metadata service about the instance (`cloud`). Each finding is a
//! [`Check`]: ok, warn or fail, what was found, and for anything not ok the
//! commands that fix it. A failed check makes the exit status non-zero; a
//! warning does not.

pub mod cloud;
mod dns;
mod host;
pub mod http;
mod open_as;
mod routes;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use vpcgate_proto::{self as proto, Request, Response};

use host::{Host, Need, Prefix};

/// Overrides `--metadata-endpoint`'s default (tests use a fake on loopback).
pub const METADATA_ENDPOINT_ENV: &str = "VPCGATE_METADATA_ENDPOINT";
/// Overrides `--dmi-dir`'s default.
pub const DMI_DIR_ENV: &str = "VPCGATE_DMI_DIR";
pub const DEFAULT_DMI_DIR: &str = "/sys/class/dmi/id";
pub use cloud::DEFAULT_ENDPOINT as DEFAULT_METADATA_ENDPOINT;

/// Where to learn which cloud this VM is on and to ask its metadata
/// service: doctor and `peer add` take the same flags.
#[derive(clap::Args, Debug, Clone)]
pub struct CloudArgs {
    /// Base URL of the cloud metadata service (tests use a fake).
    #[arg(long, env = METADATA_ENDPOINT_ENV, default_value = DEFAULT_METADATA_ENDPOINT)]
    pub metadata_endpoint: String,
    /// Where DMI identifies the machine (and so its cloud).
    #[arg(long, env = DMI_DIR_ENV, default_value = DEFAULT_DMI_DIR)]
    pub dmi_dir: PathBuf,
}

/// How long doctor waits for vpcgated: it answers Status at once or is stuck.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

/// One finding. `subject` says which range, interface or provider a check
/// that can repeat is about; `fix` holds commands, one per entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub id: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub status: Level,
    pub message: String,
    pub fix: Vec<String>,
}

impl Check {
    pub fn new(id: &'static str, status: Level, message: String) -> Check {
        Check {
            id,
            subject: None,
            status,
            message,
            fix: Vec::new(),
        }
    }

    pub fn fix(mut self, line: String) -> Check {
        self.fix.push(line);
        self
    }

    pub fn subject(mut self, subject: String) -> Check {
        self.subject = Some(subject);
        self
    }
}

pub struct Options {
    pub socket: PathBuf,
    pub json: bool,
    pub metadata_endpoint: String,
    pub dmi_dir: PathBuf,
}

/// What doctor needs from vpcgated's status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonView {
    pub interface: String,
    pub listen_port: u16,
    pub ranges: Vec<Prefix>,
    pub snat: bool,
    /// The SNAT table's nftables form (`inet` or `ip+ip6`), if it has one.
    pub snat_form: Option<String>,
    /// What vpcgated set on its TUN; the interface's own MTU is preferred.
    pub mtu: u32,
    /// The tunnel networks, e.g. 100.64.0.0/24.
    pub tunnel_networks: Vec<String>,
    pub dns: Option<proto::DnsStatus>,
    pub link_dns: Option<proto::LinkDnsStatus>,
}

impl DaemonView {
    fn from_status(status: &proto::Status) -> DaemonView {
        DaemonView {
            interface: status.interface.clone(),
            listen_port: status.listen_port,
            ranges: status
                .advertised_routes
                .iter()
                .filter_map(|r| Prefix::parse(r))
                .collect(),
            snat: status.snat,
            snat_form: status.snat_form.clone(),
            mtu: status.mtu,
            tunnel_networks: status
                .addresses
                .iter()
                .filter_map(|a| Prefix::parse(a))
                .map(|p| p.network().to_string())
                .collect(),
            dns: status.dns.as_deref().cloned(),
            link_dns: status.link_dns.as_deref().cloned(),
        }
    }
}

fn ask_daemon(socket: &Path) -> Result<proto::Status, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(DAEMON_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(DAEMON_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    proto::write_frame(&mut stream, &Request::Status).map_err(|e| e.to_string())?;
    match proto::read_frame(&mut stream).map_err(|e| e.to_string())? {
        Response::Status(status) => Ok(status),
        Response::Error { message } => Err(message),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

fn daemon_check(socket: &Path, view: &Result<DaemonView, String>) -> Check {
    let id = "daemon";
    let socket_text = socket.display();
    match view {
        Ok(v) => {
            let ranges = match v.ranges.len() {
                0 => "no advertised ranges".to_string(),
                1 => "1 advertised range".to_string(),
                n => format!("{n} advertised ranges"),
            };
            let snat = match (v.snat, &v.snat_form) {
                (false, _) => "off".to_string(),
                (true, Some(form)) => format!("on ({form} nftables)"),
                (true, None) => "on".to_string(),
            };
            Check::new(
                id,
                Level::Ok,
                format!(
                    "vpcgated answers on {socket_text}: interface {}, UDP port {}, {ranges}, SNAT {snat}",
                    v.interface, v.listen_port
                ),
            )
        }
        Err(e) => {
            let mut check = Check::new(
                id,
                Level::Fail,
                format!("vpcgated does not answer on {socket_text} ({e}); the checks that need its settings are skipped"),
            )
            .fix("systemctl start vpcgated".to_string())
            .fix("journalctl -u vpcgated -e  # if it does not stay up".to_string());
            if socket != Path::new(proto::DEFAULT_SOCKET) {
                check = check.fix(format!(
                    "or, if it runs with another --socket: vpcgate --socket PATH doctor (this run used {socket_text})"
                ));
            }
            check
        }
    }
}

fn advertised_check(view: &DaemonView) -> Check {
    let id = "advertised_routes";
    if view.ranges.is_empty() {
        Check::new(
            id,
            Level::Warn,
            "vpcgated advertises no ranges, so peers reach nothing beyond the tunnel".to_string(),
        )
        .fix(
            "vpcgate advertise-routes CIDR[,CIDR...]  # the VPC's range and the peered ones"
                .to_string(),
        )
    } else {
        let list: Vec<String> = view.ranges.iter().map(Prefix::to_string).collect();
        Check::new(id, Level::Ok, format!("advertises {}", list.join(", ")))
    }
}

/// Runs every check. Separated from printing so tests can look at the list.
pub fn run_checks(host: &Host, options: &Options) -> Vec<Check> {
    let mut checks = Vec::new();
    let view = ask_daemon(&options.socket).map(|s| DaemonView::from_status(&s));
    checks.push(daemon_check(&options.socket, &view));
    let view = view.ok();
    if let Some(v) = &view {
        checks.push(advertised_check(v));
        checks.push(dns::forwarder(
            v.dns.as_ref(),
            !v.ranges.is_empty(),
            dns::probe,
        ));
        if let Some(link) = &v.link_dns {
            checks.push(dns::split(link));
        }
    }

    let need = |v4: bool| match &view {
        None => Need::Unknown,
        Some(v) if v.ranges.iter().any(|r| r.is_ipv4() == v4) => Need::Required,
        Some(_) => Need::NotNeeded,
    };
    checks.push(host::forwarding(
        false,
        need(true),
        host.sysctl(&["net", "ipv4", "ip_forward"]),
    ));
    if need(false) == Need::Required {
        checks.push(host::forwarding(
            true,
            Need::Required,
            host.sysctl(&["net", "ipv6", "conf", "all", "forwarding"]),
        ));
    }

    let routes4 = host.routes4();
    let routes6 = host.routes6();
    // The interface that carries the tunnel: the default route's.
    let default_iface = routes4
        .as_ref()
        .ok()
        .and_then(|r| host::default_route(r))
        .or_else(|| routes6.as_ref().ok().and_then(|r| host::default_route(r)))
        .map(|r| r.iface.clone());
    let mut vpc_ifaces: Vec<String> = Vec::new();

    if let Some(v) = &view {
        match (&routes4, &routes6) {
            (Err(e), _) | (_, Err(e)) => checks.push(
                Check::new(
                    "route",
                    Level::Warn,
                    format!("cannot read the routing table: {e}"),
                )
                .fix("ip route; ip -6 route".to_string()),
            ),
            (Ok(r4), Ok(r6)) => {
                let table = |p: &Prefix| if p.is_ipv4() { r4 } else { r6 };
                let found: Vec<Option<&host::Route>> = v
                    .ranges
                    .iter()
                    .map(|p| host::lookup(table(p), p.network().addr))
                    .collect();
                // A route already used for another range of the same family
                // is the best guess at how to reach a missing one.
                let usable = |r: &&host::Route| !r.reject && !r.local && r.iface != v.interface;
                for (i, range) in v.ranges.iter().enumerate() {
                    let others: Vec<Prefix> = v
                        .ranges
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, p)| *p)
                        .collect();
                    let hint = found
                        .iter()
                        .zip(&v.ranges)
                        .filter(|(_, p)| p.is_ipv4() == range.is_ipv4())
                        .filter_map(|(r, _)| *r)
                        .filter(usable)
                        .find(|r| r.gateway.is_some());
                    checks.push(host::route(*range, found[i], &v.interface, &others, hint));
                    if let Some(r) = found[i].filter(usable) {
                        if range.is_ipv4() && !vpc_ifaces.contains(&r.iface) {
                            vpc_ifaces.push(r.iface.clone());
                        }
                    }
                }
            }
        }
        if let Ok(r4) = &routes4 {
            let tunnel: Vec<Prefix> = v
                .tunnel_networks
                .iter()
                .filter_map(|t| Prefix::parse(t))
                .filter(Prefix::is_ipv4)
                .collect();
            if !tunnel.is_empty() {
                checks.push(host::tunnel_overlap(&v.interface, &tunnel, r4));
            }
        }
        for iface in &vpc_ifaces {
            checks.push(host::rp_filter(
                iface,
                host.sysctl(&["net", "ipv4", "conf", "all", "rp_filter"]),
                host.sysctl(&["net", "ipv4", "conf", iface, "rp_filter"]),
            ));
        }
        let nic = default_iface
            .as_deref()
            .map(|name| (name, host.iface_mtu(name)));
        let tunnel_mtu = host.iface_mtu(&v.interface).or(Some(v.mtu));
        checks.push(host::mtu(&v.interface, tunnel_mtu, nic));
        checks.push(host::listen_port(v.listen_port, host.udp_ports()));
    }
    checks.push(host::nftables(host.nft()));
    let (tun_user, tun_state) = host.tun();
    checks.push(host::tun(&host.dev.join("net/tun"), tun_user, tun_state));

    let dmi = cloud::Dmi::read(&options.dmi_dir);
    let provider = cloud::detect(&dmi);
    let vpc_mac = vpc_ifaces
        .first()
        .or(default_iface.as_ref())
        .and_then(|iface| host.iface_mac(iface));
    let instance = provider.map(|p| {
        http::Endpoint::parse(&options.metadata_endpoint)
            .map_err(|e| e.to_string())
            .and_then(|ep| cloud::fetch(p, &ep, vpc_mac.as_deref()))
    });
    checks.push(cloud::detection(
        &dmi,
        provider,
        instance.as_ref(),
        &options.metadata_endpoint,
    ));
    if let Some(p) = provider {
        let instance = instance.as_ref().and_then(|r| r.as_ref().ok());
        let tunnel = view
            .as_ref()
            .map(|v| v.tunnel_networks.clone())
            .unwrap_or_default();
        checks.push(cloud::forwarding_switch(
            p,
            instance,
            view.as_ref().map(|v| v.snat),
            &tunnel,
        ));
    }
    checks
}

/// The text report: one line per check, its fixes indented below it, and a
/// closing count.
pub fn render_text(checks: &[Check]) -> String {
    let mut out = String::new();
    for check in checks {
        let name = match &check.subject {
            Some(s) => format!("{} {s}", check.id),
            None => check.id.to_string(),
        };
        out.push_str(&format!(
            "{:<4}  {name}: {}\n",
            check.status.label(),
            check.message
        ));
        for line in &check.fix {
            // Cloud advice says itself whether a line checks, fixes or
            // clicks; everything else is a fix.
            let labelled = ["check: ", "fix: ", "console: "]
                .iter()
                .any(|label| line.starts_with(label));
            let label = if labelled { "" } else { "fix: " };
            out.push_str(&format!("      {label}{line}\n"));
        }
    }
    let count = |l: Level| checks.iter().filter(|c| c.status == l).count();
    out.push_str(&format!(
        "{} failed, {} warnings, {} ok\n",
        count(Level::Fail),
        count(Level::Warn),
        count(Level::Ok)
    ));
    out
}

/// Runs doctor and prints its report; an error when a check failed, so the
/// exit status is non-zero.
pub fn run(options: Options) -> anyhow::Result<()> {
    let checks = run_checks(&Host::system(), &options);
    if options.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        print!("{}", render_text(&checks));
    }
    let failed = checks.iter().filter(|c| c.status == Level::Fail).count();
    if failed > 0 {
        anyhow::bail!(
            "doctor found {failed} failing check{}",
            if failed == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json_shapes() {
        let checks = vec![
            Check::new("daemon", Level::Ok, "vpcgated answers".into()),
            Check::new(
                "ipv4_forwarding",
                Level::Fail,
                "IPv4 forwarding is off".into(),
            )
            .fix("sysctl -w net.ipv4.ip_forward=1".into()),
            Check::new("rp_filter", Level::Warn, "strict".into())
                .subject("eth0".into())
                .fix("a".into())
                .fix("check: b".into()),
        ];
        let text = render_text(&checks);
        assert_eq!(
            text,
            "ok    daemon: vpcgated answers\n\
             FAIL  ipv4_forwarding: IPv4 forwarding is off\n\
             \x20     fix: sysctl -w net.ipv4.ip_forward=1\n\
             WARN  rp_filter eth0: strict\n\
             \x20     fix: a\n\
             \x20     check: b\n\
             1 failed, 1 warnings, 1 ok\n"
        );
        let json = serde_json::to_value(&checks).expect("json");
        assert_eq!(json[0]["id"], "daemon");
        assert_eq!(json[0]["status"], "ok");
        assert_eq!(json[0]["fix"], serde_json::json!([]));
        assert!(json[0].get("subject").is_none());
        assert_eq!(json[1]["status"], "fail");
        assert_eq!(json[2]["status"], "warn");
        assert_eq!(json[2]["subject"], "eth0");
    }

    #[test]
    fn daemon_view_from_status() {
        // Through JSON, so the test does not depend on every field of Status.
        let status: proto::Status = serde_json::from_value(serde_json::json!({
            "interface": "vpcgate0", "public_key": "", "listen_port": 51820,
            "address": "100.64.0.1/24", "addresses": ["100.64.0.1/24", "fd00:64::1/64"],
            "mtu": 1420, "public_endpoint": null,
            "advertised_routes": ["198.18.64.0/20", "fd00:65:101::/64"],
            "accepted_routes": [], "snat": true, "mss_clamp": true,
            "warnings": [], "peers": [], "drops": []
        }))
        .expect("status");
        let view = DaemonView::from_status(&status);
        assert_eq!(view.ranges.len(), 2);
        assert_eq!(view.tunnel_networks, ["100.64.0.0/24", "fd00:64::/64"]);
        let ok = daemon_check(Path::new(proto::DEFAULT_SOCKET), &Ok(view.clone()));
        assert_eq!(ok.status, Level::Ok);
        assert!(
            ok.message.contains("2 advertised ranges, SNAT on"),
            "{}",
            ok.message
        );
        assert_eq!(advertised_check(&view).status, Level::Ok);
        let empty = DaemonView {
            ranges: vec![],
            ..view
        };
        assert_eq!(advertised_check(&empty).status, Level::Warn);
    }

    #[test]
    fn a_missing_daemon_fails_with_the_fix() {
        let down = daemon_check(
            Path::new(proto::DEFAULT_SOCKET),
            &Err("No such file".into()),
        );
        assert_eq!(down.status, Level::Fail);
        assert_eq!(down.fix[0], "systemctl start vpcgated");
        assert_eq!(down.fix.len(), 2);
        let elsewhere = daemon_check(Path::new("/tmp/x.sock"), &Err("refused".into()));
        assert!(elsewhere.fix[2].contains("--socket"), "{:?}", elsewhere.fix);
    }

    #[test]
    fn without_a_daemon_the_host_checks_still_run() {
        let root = std::env::temp_dir().join(format!("vpcgate-doctor-run-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let write = |rel: &str, text: &str| {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        };
        write("proc/sys/net/ipv4/ip_forward", "0\n");
        write("proc/net/route", "Iface\tDestination\n");
        let host = Host {
            proc: root.join("proc"),
            sys: root.join("sys"),
            dev: root.join("dev"),
        };
        let options = Options {
            socket: root.join("none.sock"),
            json: false,
            metadata_endpoint: DEFAULT_METADATA_ENDPOINT.into(),
            dmi_dir: root.join("dmi"),
        };
        let checks = run_checks(&host, &options);
        let ids: Vec<&str> = checks.iter().map(|c| c.id).collect();
        assert_eq!(
            ids,
            [
                "daemon",
                "ipv4_forwarding",
                "nftables",
                "tun_device",
                "cloud"
            ]
        );
        assert_eq!(checks[0].status, Level::Fail);
        assert_eq!(
            checks[1].status,
            Level::Fail,
            "a gateway needs IPv4 forwarding"
        );
        assert_eq!(
            checks[3].status,
            Level::Fail,
            "no TUN device in the fixture"
        );
        assert_eq!(
            checks[4].status,
            Level::Ok,
            "no DMI, no cloud, no metadata request"
        );
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}
