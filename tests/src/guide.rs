//! The topology of the managed-database guide: a laptop on the internet, a
//! gateway VM running vpcgated in a VPC that is peered with the database's
//! network, plus wrappers for the `vpcgate` CLI, for wg-quick client configs
//! and for a laptop that runs vpcgated itself with accepted routes.
//!
//! ```text
//!  client (laptop)         inet                gw (gateway VM)
//!  198.18.1.2/24 ======== 198.18.1.1/24        vpcgated, tunnel 100.64.0.1/24
//!  default via .1          198.18.2.1/24 ===== 198.18.2.10/24 (public, udp :51820)
//!                          (no VPC routes)     198.18.64.10/20 (VPC NIC)
//!                                                  ||
//!                     vpc (L2 switch: a bridge) ===++=== vpchost 198.18.64.20/20
//!                                                  ||
//!                          vpcr (VPC router / peering) 198.18.64.1/20
//!                                                      198.19.101.1/24
//!                                                  ||
//!                          db (managed database) 198.19.101.10/24,
//!                          route 198.18.64.0/20 via .1, nothing else
//! ```
//!
//! Extra laptops hang off inet on 198.18.N.0/24; a LAN can sit behind any
//! laptop. Every namespace has forwarding only where the design needs it and
//! `tcp_mtu_probing` 0, so a PMTU black hole stays a black hole.
//!
//! [`GuideNet::new_dual_stack`] adds IPv6 beside every IPv4 address above,
//! all in fd00::/8: client fd00:1::2/64 (default via inet's fd00:1::1), the
//! gateway's public fd00:2::10/64 (default via fd00:2::1), the VPC
//! fd00:64:40::/64 (gateway ::10, router ::1, host ::20, gateway route to
//! the peered range via ::1), the peered fd00:65:101::/64 (router ::1, db
//! ::10 with only a route to the VPC range via ::1). The gateway's tunnel
//! is then 100.64.0.1/24 and fd00:64::1/64 ([`GW_TUNNEL_ADDRS_DUAL`]).

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::netns::{run, run_raw, unique_ifname, veth, wait_until, Netns, Proc};
use crate::wg::{public_key_of, vpcgate_bin, VpcgatedConfig, WgDev, UAPI_DIR};

pub const GW_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 10);
pub const GW_PORT: u16 = 51820;
pub const GW_ENDPOINT: &str = "198.18.2.10:51820";
pub const GW_VPC: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 10);
pub const VPC_ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 1);
pub const VPC_HOST: Ipv4Addr = Ipv4Addr::new(198, 18, 64, 20);
pub const DB: Ipv4Addr = Ipv4Addr::new(198, 19, 101, 10);
pub const VPC_RANGE: &str = "198.18.64.0/20";
pub const PEERED_RANGE: &str = "198.19.101.0/24";
pub const GW_TUNNEL_ADDR: &str = "100.64.0.1/24";
pub const TUNNEL_NET: &str = "100.64.0.0/24";
/// Third octet of the first laptop's link to inet (198.18.1.0/24).
pub const CLIENT_NET: u8 = 1;

// The IPv6 side of [`GuideNet::new_dual_stack`].
pub const GW_PUBLIC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 0x10);
pub const GW_ENDPOINT6: &str = "[fd00:2::10]:51820";
/// inet's end of the gateway's public link.
pub const INET_GW_SIDE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 2, 0, 0, 0, 0, 0, 1);
pub const GW_VPC6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0x40, 0, 0, 0, 0, 0x10);
pub const VPC_ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0x40, 0, 0, 0, 0, 1);
pub const VPC_HOST6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x64, 0x40, 0, 0, 0, 0, 0x20);
pub const DB6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x65, 0x101, 0, 0, 0, 0, 0x10);
pub const VPC_RANGE6: &str = "fd00:64:40::/64";
pub const PEERED_RANGE6: &str = "fd00:65:101::/64";
/// `--address` of a dual-stack gateway: one IPv4 and one IPv6 tunnel address.
pub const GW_TUNNEL_ADDRS_DUAL: &str = "100.64.0.1/24,fd00:64::1/64";
pub const TUNNEL_NET6: &str = "fd00:64::/64";

/// `sysctl -qw KEY=VALUE` inside `ns`.
pub fn sysctl(ns: &Netns, key: &str, value: &str) -> Result<()> {
    ns.exec(&["sysctl", "-qw", &format!("{key}={value}")])
        .map(drop)
        .with_context(|| format!("sysctl {key}={value} in {}", ns.name()))
}

/// Turns off duplicate address detection for the interfaces created from
/// now on, link-local addresses included (`nodad` covers only the addresses
/// we add). While a router's link-local address is tentative, Linux sends no
/// neighbor solicitation for a packet it forwards, so the packet is lost:
/// the first WireGuard handshake would vanish in inet.
fn no_dad(ns: &Netns) -> Result<()> {
    sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")?;
    sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")
}

fn enable_forwarding(ns: &Netns) -> Result<()> {
    sysctl(ns, "net.ipv4.ip_forward", "1")?;
    sysctl(ns, "net.ipv6.conf.all.forwarding", "1")
}

/// The namespaces and links; no WireGuard anywhere yet.
pub struct GuideNet {
    pub inet: Netns,
    pub client: Netns,
    pub gw: Netns,
    pub vpcr: Netns,
    pub db: Netns,
    pub vpchost: Netns,
    /// Holds only the bridge that is the VPC subnet's switch.
    pub vpc_switch: Netns,
    pub gw_public_if: String,
    pub gw_vpc_if: String,
    /// Whether every link also has IPv6 (see the module doc).
    pub dual_stack: bool,
}

impl GuideNet {
    /// The IPv4-only network of the diagram.
    pub fn new() -> Result<GuideNet> {
        GuideNet::build(false)
    }

    /// The same network with IPv6 beside IPv4 everywhere (module doc).
    pub fn new_dual_stack() -> Result<GuideNet> {
        GuideNet::build(true)
    }

    fn build(dual_stack: bool) -> Result<GuideNet> {
        // The addresses of one interface: the IPv4 one, plus the IPv6 one
        // when dual-stack.
        let addrs = |v4: &'static str, v6: &'static str| -> Vec<&'static str> {
            if dual_stack {
                vec![v4, v6]
            } else {
                vec![v4]
            }
        };
        let inet = Netns::new("inet")?;
        let gw = Netns::new("gw")?;
        let vpc_switch = Netns::new("vpc")?;
        let vpcr = Netns::new("vpcr")?;
        let db = Netns::new("db")?;
        let vpchost = Netns::new("vpchost")?;
        let client = Netns::new("client")?;
        for ns in [&inet, &gw, &vpc_switch, &vpcr, &db, &vpchost, &client] {
            // Keep PMTU discovery the only mechanism: no probing around a
            // black hole (0 is the default; this makes it explicit).
            sysctl(ns, "net.ipv4.tcp_mtu_probing", "0")?;
            if dual_stack {
                no_dad(ns)?;
            }
        }
        for ns in [&inet, &gw, &vpcr] {
            enable_forwarding(ns)?;
        }

        let (gw_public_if, _) = veth(
            &gw,
            &inet,
            &addrs("198.18.2.10/24", "fd00:2::10/64"),
            &addrs("198.18.2.1/24", "fd00:2::1/64"),
        )
        .context("gateway public NIC")?;
        gw.ip(&["route", "add", "default", "via", "198.18.2.1"])?;

        // The VPC subnet is a bridge, so that the gateway, the VPC router
        // and the VPC host share one L2 segment as in a cloud subnet.
        vpc_switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        vpc_switch.ip(&["link", "set", "br0", "up"])?;
        let attach = |ns: &Netns, addrs: &[&str]| -> Result<String> {
            let (inside, port) = veth(ns, &vpc_switch, addrs, &[])
                .with_context(|| format!("VPC link of {}", ns.name()))?;
            vpc_switch.ip(&["link", "set", &port, "master", "br0"])?;
            Ok(inside)
        };
        let gw_vpc_if = attach(&gw, &addrs("198.18.64.10/20", "fd00:64:40::10/64"))?;
        attach(&vpcr, &addrs("198.18.64.1/20", "fd00:64:40::1/64"))?;
        attach(&vpchost, &addrs("198.18.64.20/20", "fd00:64:40::20/64"))?;
        gw.ip(&["route", "add", PEERED_RANGE, "via", "198.18.64.1"])?;

        veth(
            &vpcr,
            &db,
            &addrs("198.19.101.1/24", "fd00:65:101::1/64"),
            &addrs("198.19.101.10/24", "fd00:65:101::10/64"),
        )
        .context("peering link")?;
        db.ip(&["route", "add", VPC_RANGE, "via", "198.19.101.1"])?;

        if dual_stack {
            gw.ip(&["-6", "route", "add", "default", "via", "fd00:2::1"])?;
            gw.ip(&["route", "add", PEERED_RANGE6, "via", "fd00:64:40::1"])?;
            db.ip(&["route", "add", VPC_RANGE6, "via", "fd00:65:101::1"])?;
        }

        let net = GuideNet {
            inet,
            client: client.clone(),
            gw,
            vpcr,
            db,
            vpchost,
            vpc_switch,
            gw_public_if,
            gw_vpc_if,
            dual_stack,
        };
        net.link_laptop(&client, CLIENT_NET)?;
        Ok(net)
    }

    fn link_laptop(&self, laptop: &Netns, octet: u8) -> Result<()> {
        let (mut mine, mut inet) = (
            vec![format!("198.18.{octet}.2/24")],
            vec![format!("198.18.{octet}.1/24")],
        );
        if self.dual_stack {
            mine.push(format!("fd00:{octet}::2/64"));
            inet.push(format!("fd00:{octet}::1/64"));
        }
        let mine: Vec<&str> = mine.iter().map(String::as_str).collect();
        let inet: Vec<&str> = inet.iter().map(String::as_str).collect();
        veth(laptop, &self.inet, &mine, &inet)
            .with_context(|| format!("link of laptop {}", laptop.name()))?;
        laptop.ip(&[
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{octet}.1"),
        ])?;
        if self.dual_stack {
            laptop.ip(&[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:{octet}::1"),
            ])?;
        }
        Ok(())
    }

    /// Plugs `ns` into the VPC subnet's switch with `addrs` (in
    /// 198.18.64.0/20), as another host of the VPC.
    pub fn attach_to_vpc(&self, ns: &Netns, addrs: &[&str]) -> Result<String> {
        let (inside, port) = veth(ns, &self.vpc_switch, addrs, &[])
            .with_context(|| format!("VPC link of {}", ns.name()))?;
        self.vpc_switch
            .ip(&["link", "set", &port, "master", "br0"])?;
        Ok(inside)
    }

    /// Another laptop on the internet at 198.18.`octet`.2/24, and
    /// fd00:`octet`::2/64 if dual-stack (not 1, 2, 64-79 or a LAN's octet).
    pub fn add_laptop(&self, role: &str, octet: u8) -> Result<Netns> {
        let ns = Netns::new(role)?;
        sysctl(&ns, "net.ipv4.tcp_mtu_probing", "0")?;
        if self.dual_stack {
            no_dad(&ns)?;
        }
        self.link_laptop(&ns, octet)?;
        Ok(ns)
    }

    /// A LAN host behind `router` (a laptop): 198.18.`octet`.2/24, default
    /// via `router` at 198.18.`octet`.1, link MTU 1500, IPv4 only. Turns on
    /// forwarding in `router`.
    pub fn add_lan(&self, router: &Netns, role: &str, octet: u8) -> Result<Netns> {
        let lan = Netns::new(role)?;
        sysctl(&lan, "net.ipv4.tcp_mtu_probing", "0")?;
        let (r_if, l_if) = veth(
            router,
            &lan,
            &[&format!("198.18.{octet}.1/24")],
            &[&format!("198.18.{octet}.2/24")],
        )
        .context("LAN link")?;
        router.ip(&["link", "set", &r_if, "mtu", "1500"])?;
        lan.ip(&["link", "set", &l_if, "mtu", "1500"])?;
        lan.ip(&[
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.{octet}.1"),
        ])?;
        enable_forwarding(router)?;
        Ok(lan)
    }

    /// Makes the VPC router drop the ICMP that path-MTU discovery needs
    /// (IPv4 "fragmentation needed", IPv6 "packet too big") when forwarding,
    /// as a cloud security group that blocks ICMP does. Other ICMP (ping)
    /// still passes.
    pub fn drop_pmtu_icmp_in_vpcr(&self) -> Result<()> {
        let rules = "table inet vge2e_sg {\n\
             \tchain forward {\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\ticmp type destination-unreachable icmp code frag-needed counter drop\n\
             \t\ticmpv6 type packet-too-big counter drop\n\
             \t}\n\
             }\n";
        self.vpcr
            .exec_stdin(&["nft", "-f", "-"], rules.as_bytes())
            .map(drop)
            .context("installing the ICMP drop rule in vpcr")
    }

    /// Packets the rule of [`GuideNet::drop_pmtu_icmp_in_vpcr`] has dropped.
    pub fn pmtu_icmp_dropped(&self) -> Result<u64> {
        nft_counters(&self.vpcr, "inet", "vge2e_sg", "forward")
    }

    /// Starts counting the packets that reach the database from anywhere
    /// but its own router (i.e. from the tunnel, via the gateway), before
    /// any local filtering; see [`GuideNet::db_arrivals`].
    pub fn watch_db(&self) -> Result<()> {
        let rules = "table ip vge2e_watch {\n\
             \tchain prerouting {\n\
             \t\ttype filter hook prerouting priority raw; policy accept;\n\
             \t\tip daddr 198.19.101.10 ip saddr != 198.19.101.1 counter\n\
             \t}\n\
             }\n";
        self.db
            .exec_stdin(&["nft", "-f", "-"], rules.as_bytes())
            .map(drop)
            .context("installing the arrival counter in db")
    }

    /// Packets counted since [`GuideNet::watch_db`].
    pub fn db_arrivals(&self) -> Result<u64> {
        nft_counters(&self.db, "ip", "vge2e_watch", "prerouting")
    }
}

/// The sum of the packet counters of one nftables chain.
pub fn nft_counters(ns: &Netns, family: &str, table: &str, chain: &str) -> Result<u64> {
    let out = ns.exec(&["nft", "list", "chain", family, table, chain])?;
    let mut total = 0;
    for line in out.lines().filter(|l| l.contains("counter packets")) {
        let n = line
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .with_context(|| format!("no packet count in {line:?}"))?;
        total += n
            .parse::<u64>()
            .with_context(|| format!("bad packet count in {line:?}"))?;
    }
    Ok(total)
}

/// The `vpcgate` CLI pointed at one daemon's control socket, run inside
/// that daemon's namespace.
#[derive(Clone, Debug)]
pub struct Vpcgate {
    ns: Netns,
    socket: PathBuf,
    bin: PathBuf,
}

impl Vpcgate {
    pub fn for_dev(dev: &WgDev) -> Result<Vpcgate> {
        let socket = dev
            .control_socket()
            .with_context(|| format!("{} is not vpcgated", dev.name()))?
            .to_path_buf();
        Ok(Vpcgate {
            ns: dev.ns().clone(),
            socket,
            bin: vpcgate_bin()?,
        })
    }

    fn argv<'a>(&'a self, bin: &'a str, sock: &'a str, args: &[&'a str]) -> Vec<String> {
        // The machine as a plain one with no cloud, unless a test names a
        // DMI directory itself: `peer add` and `doctor` never ask the real
        // metadata service, whatever cloud this test machine runs on.
        let dmi = crate::metadata::plain_dmi(self.ns.dir());
        let mut argv: Vec<String> = [
            "ip",
            "netns",
            "exec",
            self.ns.name(),
            "env",
            &format!("VPCGATE_DMI_DIR={}", dmi.display()),
            bin,
            "--socket",
            sock,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(args.iter().map(|s| s.to_string()));
        argv
    }

    /// Runs `vpcgate --socket S ARGS` and returns its output whatever the
    /// exit status.
    pub fn output(&self, args: &[&str]) -> Result<Output> {
        self.output_stdin(args, None)
    }

    /// Like [`Vpcgate::output`] with arguments that need not be UTF-8.
    pub fn output_os(&self, args: &[&std::ffi::OsStr]) -> Result<Output> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", self.ns.name()])
            .arg(&self.bin)
            .env("VPCGATE_DMI_DIR", crate::metadata::plain_dmi(self.ns.dir()))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", self.bin.display()))?;
        Ok(out)
    }

    /// Like [`Vpcgate::output`] with `stdin` fed to the command.
    pub fn output_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
        let bin = self.bin.to_string_lossy().into_owned();
        let sock = self.socket.to_string_lossy().into_owned();
        let argv = self.argv(&bin, &sock, args);
        run_raw(&argv.iter().map(String::as_str).collect::<Vec<_>>(), stdin)
    }

    /// Runs the command and returns stdout; fails with stderr unless it
    /// exits 0.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        self.run_stdin(args, None)
    }

    pub fn run_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String> {
        let bin = self.bin.to_string_lossy().into_owned();
        let sock = self.socket.to_string_lossy().into_owned();
        let argv = self.argv(&bin, &sock, args);
        run(&argv.iter().map(String::as_str).collect::<Vec<_>>(), stdin)
    }

    pub fn status(&self) -> Result<Status> {
        let text = self.run(&["status", "--json"])?;
        Status::parse(&text).context("parsing `vpcgate status --json`")
    }

    /// `vpcgate advertise-routes ROUTES` (one comma-separated argument).
    pub fn advertise(&self, routes: &[&str]) -> Result<()> {
        let list = routes.join(",");
        self.run(&["advertise-routes", &list]).map(drop)
    }

    /// `vpcgate peer add NAME`: the wg-quick config it prints, parsed.
    pub fn add_client(&self, name: &str) -> Result<ClientConf> {
        let text = self.run(&["peer", "add", name])?;
        ClientConf::parse(&text)
            .with_context(|| format!("parsing the config `vpcgate peer add {name}` printed"))
    }
}

/// One peer of `vpcgate status --json`.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub name: Option<String>,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
}

/// `vpcgate status --json`: the fields the tests use, plus the whole value.
#[derive(Clone, Debug)]
pub struct Status {
    pub public_key: String,
    pub listen_port: u64,
    pub public_endpoint: Option<String>,
    pub advertised_routes: Vec<String>,
    pub accepted_routes: Vec<String>,
    pub snat: bool,
    pub mss_clamp: bool,
    pub warnings: Vec<String>,
    pub peers: Vec<PeerInfo>,
    /// Packets dropped, by reason (`not_advertised`, ...).
    pub drops: Vec<(String, u64)>,
    pub json: serde_json::Value,
}

impl Status {
    /// Parses `vpcgate status --json` through the protocol's own types, so a
    /// missing or mistyped field fails here.
    pub fn parse(text: &str) -> Result<Status> {
        let json: serde_json::Value = serde_json::from_str(text).context("status is not JSON")?;
        let s: vpcgate_proto::Status =
            serde_json::from_value(json.clone()).context("status JSON lacks a field")?;
        Ok(Status {
            public_key: s.public_key,
            listen_port: u64::from(s.listen_port),
            public_endpoint: s.public_endpoint,
            advertised_routes: s.advertised_routes,
            accepted_routes: s.accepted_routes,
            snat: s.snat,
            mss_clamp: s.mss_clamp,
            warnings: s.warnings,
            peers: s
                .peers
                .into_iter()
                .map(|p| PeerInfo {
                    name: p.name,
                    public_key: p.public_key,
                    endpoint: p.endpoint,
                    allowed_ips: p.allowed_ips,
                })
                .collect(),
            drops: s.drops,
            json,
        })
    }

    /// The drop counter for `reason`; `None` if status does not list it.
    pub fn dropped(&self, reason: &str) -> Option<u64> {
        self.drops
            .iter()
            .find(|(r, _)| r == reason)
            .map(|(_, n)| *n)
    }

    pub fn peer_named(&self, name: &str) -> Option<&PeerInfo> {
        self.peers.iter().find(|p| p.name.as_deref() == Some(name))
    }
}

/// A wg-quick configuration: sections of `Key = Value` lines.
#[derive(Clone, Debug)]
pub struct ClientConf {
    pub text: String,
    sections: Vec<(String, Vec<(String, String)>)>,
}

impl ClientConf {
    /// Parses the INI-like format strictly: every non-blank, non-comment
    /// line is a `[Section]` header or a `Key = Value` inside one.
    pub fn parse(text: &str) -> Result<ClientConf> {
        let mut sections: Vec<(String, Vec<(String, String)>)> = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                sections.push((name.trim().to_string(), Vec::new()));
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .with_context(|| format!("line {}: not `Key = Value`: {raw:?}", n + 1))?;
            let Some((_, entries)) = sections.last_mut() else {
                bail!("line {}: {raw:?} is outside any section", n + 1);
            };
            entries.push((k.trim().to_string(), v.trim().to_string()));
        }
        Ok(ClientConf {
            text: text.to_string(),
            sections,
        })
    }

    fn values(&self, section: &str, index: usize, key: &str) -> Vec<String> {
        self.sections
            .iter()
            .filter(|(s, _)| s.eq_ignore_ascii_case(section))
            .nth(index)
            .map(|(_, entries)| {
                entries
                    .iter()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(key))
                    .flat_map(|(_, v)| v.split(','))
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn section_count(&self, section: &str) -> usize {
        self.sections
            .iter()
            .filter(|(s, _)| s.eq_ignore_ascii_case(section))
            .count()
    }

    /// Every value of `key` in `[Interface]`, comma lists split.
    pub fn interface(&self, key: &str) -> Vec<String> {
        self.values("Interface", 0, key)
    }

    /// Every value of `key` in the first `[Peer]`, comma lists split.
    pub fn peer(&self, key: &str) -> Vec<String> {
        self.values("Peer", 0, key)
    }

    /// The single value of `key` in `[Interface]`.
    pub fn interface_one(&self, key: &str) -> Result<String> {
        one(self.interface(key), "Interface", key)
    }

    /// The single value of `key` in the first `[Peer]`.
    pub fn peer_one(&self, key: &str) -> Result<String> {
        one(self.peer(key), "Peer", key)
    }

    /// The IPv4 `Address` of `[Interface]`, without its prefix length.
    pub fn address4(&self) -> Result<Ipv4Addr> {
        let addrs = self.interface("Address");
        let a = addrs
            .iter()
            .find_map(|a| a.split('/').next()?.parse::<Ipv4Addr>().ok())
            .with_context(|| format!("no IPv4 Address in [Interface]: {addrs:?}"))?;
        Ok(a)
    }

    /// The IPv6 `Address` of `[Interface]`, without its prefix length.
    pub fn address6(&self) -> Result<Ipv6Addr> {
        let addrs = self.interface("Address");
        let a = addrs
            .iter()
            .find_map(|a| a.split('/').next()?.parse::<Ipv6Addr>().ok())
            .with_context(|| format!("no IPv6 Address in [Interface]: {addrs:?}"))?;
        Ok(a)
    }

    /// The public key that `[Interface] PrivateKey` belongs to.
    pub fn public_key(&self) -> Result<String> {
        public_key_of(&self.interface_one("PrivateKey")?)
    }
}

fn one(mut v: Vec<String>, section: &str, key: &str) -> Result<String> {
    if v.len() != 1 {
        bail!("[{section}] should have exactly one {key}, has {v:?}");
    }
    Ok(v.remove(0))
}

/// Keys whose handling by wg-quick reaches outside the namespace (hooks run
/// arbitrary commands). A config with any of them is refused rather than
/// brought up. `DNS` is handled by [`WgQuick`] itself.
const HOST_TOUCHING_KEYS: &[&str] = &["PreUp", "PostUp", "PreDown", "PostDown"];

/// A config without its `DNS =` lines, and the name servers they listed:
/// wg-quick would hand those to resolvconf, which edits the host's
/// /etc/resolv.conf, so [`WgQuick`] takes them out and writes the
/// namespace's resolv.conf itself, as resolvconf would.
pub fn split_dns(text: &str) -> (String, Vec<String>) {
    let mut servers = Vec::new();
    let mut rest = String::with_capacity(text.len());
    for line in text.lines() {
        let trimmed = line.trim();
        let is_dns = trimmed
            .split_once('=')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("DNS"));
        if is_dns {
            if let Some((_, v)) = trimmed.split_once('=') {
                servers.extend(
                    v.split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                );
            }
            continue;
        }
        rest.push_str(line);
        rest.push('\n');
    }
    (rest, servers)
}

/// Writes `text` as `<scratch of ns>/<unique iface>.conf`, mode 0600, and
/// returns the interface name wg-quick will derive from the file name.
pub fn write_wg_quick_conf(ns: &Netns, text: &str) -> Result<(String, PathBuf)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let iface = unique_ifname("q");
    let path = ns.dir().join(format!("{iface}.conf"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok((iface, path))
}

/// `wg-quick strip FILE` run in `ns`: the config as `wg setconf` takes it.
pub fn wg_quick_strip(ns: &Netns, conf: &Path) -> Result<String> {
    ns.exec(&["wg-quick", "strip", &conf.to_string_lossy()])
}

/// A stock WireGuard client brought up by `wg-quick up` with wireguard-go
/// (or vpcgated) as the userspace implementation (there is no kernel module
/// here; the variable makes the choice explicit). Dropping it runs
/// `wg-quick down`.
pub struct WgQuick {
    ns: Netns,
    iface: String,
    conf: PathBuf,
    up_log: Proc,
    up: bool,
    /// Whether `up` wrote the namespace's resolv.conf from `DNS =`.
    dns_set: bool,
}

impl WgQuick {
    pub fn up(ns: &Netns, conf: &ClientConf) -> Result<WgQuick> {
        WgQuick::up_with(ns, conf, "wireguard-go")
    }

    /// `wg-quick up` with `implementation` (a command wg-quick runs as
    /// `IMPLEMENTATION IFNAME`) in `WG_QUICK_USERSPACE_IMPLEMENTATION`.
    pub fn up_with(ns: &Netns, conf: &ClientConf, implementation: &str) -> Result<WgQuick> {
        for key in HOST_TOUCHING_KEYS {
            if !conf.interface(key).is_empty() {
                bail!("refusing to run wg-quick on a config with {key} (it acts outside the namespace):\n{}", conf.text);
            }
        }
        let (text, servers) = split_dns(&conf.text);
        let (iface, path) = write_wg_quick_conf(ns, &text)?;
        let path_s = path.to_string_lossy().into_owned();
        let dns_set = !servers.is_empty();
        if dns_set {
            // As resolvconf does for wg-quick: addresses are name servers,
            // anything else a search domain.
            let mut resolv = String::from("# from the wg-quick config's DNS = line\n");
            for s in &servers {
                if s.parse::<IpAddr>().is_ok() {
                    resolv.push_str(&format!("nameserver {s}\n"));
                } else {
                    resolv.push_str(&format!("search {s}\n"));
                }
            }
            ns.set_resolv_conf(&resolv)?;
        }
        // wireguard-go must daemonize, so WG_PROCESS_FOREGROUND is removed
        // from the environment: with 1 wg-quick would wait on it forever,
        // and any other value makes it re-exec itself endlessly (it appends
        // WG_PROCESS_FOREGROUND=1 for its child, but Go's getenv returns
        // the first of duplicate entries). The daemon keeps writing its
        // verbose log to the file wg-quick's output goes to.
        let mut up_log = ns.spawn(
            &format!("wg-quick-{iface}"),
            &[
                "env",
                "-u",
                "WG_PROCESS_FOREGROUND",
                &format!("WG_QUICK_USERSPACE_IMPLEMENTATION={implementation}"),
                "LOG_LEVEL=verbose",
                "VPCGATE_LOG=debug",
                "wg-quick",
                "up",
                &path_s,
            ],
            &[],
        )?;
        let status = up_log.wait_timeout(Duration::from_secs(30))?;
        let mut dev = WgQuick {
            ns: ns.clone(),
            iface,
            conf: path,
            up_log,
            up: true,
            dns_set,
        };
        match status {
            Some(s) if s.success() => {}
            Some(s) => {
                dev.up = false;
                bail!(
                    "`wg-quick up {}` failed ({s}):\n{}",
                    dev.conf.display(),
                    dev.up_log.log_tail(8 * 1024)
                );
            }
            None => bail!(
                "`wg-quick up {}` did not finish within 30 s:\n{}",
                dev.conf.display(),
                dev.up_log.log_tail(8 * 1024)
            ),
        }
        ns.exec(&["wg", "show", &dev.iface])
            .context("wg-quick up succeeded but `wg show` cannot reach the interface")?;
        Ok(dev)
    }

    pub fn iface(&self) -> &str {
        &self.iface
    }

    pub fn conf_path(&self) -> &Path {
        &self.conf
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The wg-quick output and the daemon's log so far.
    pub fn log_tail(&self) -> String {
        self.up_log.log_tail(16 * 1024)
    }

    /// `wg-quick down FILE`; deleting the link makes the daemon exit.
    pub fn down(&mut self) -> Result<()> {
        if !self.up {
            return Ok(());
        }
        self.up = false;
        if self.dns_set {
            // resolvconf -d, as wg-quick down runs it.
            self.ns.set_resolv_conf(crate::netns::NO_RESOLVER)?;
        }
        self.ns
            .exec(&["wg-quick", "down", &self.conf.to_string_lossy()])
            .map(drop)?;
        let sock = Path::new(UAPI_DIR).join(format!("{}.sock", self.iface));
        wait_until(
            Duration::from_secs(5),
            &format!("the daemon to remove {}", sock.display()),
            || Ok(!sock.exists()),
        )
    }
}

impl Drop for WgQuick {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!("cleanup: {e:#}");
        }
        // If wireguard-go was killed instead, its socket file stays behind
        // in the directory all namespaces share.
        let sock = Path::new(UAPI_DIR).join(format!("{}.sock", self.iface));
        let _ = fs::remove_file(sock);
    }
}

/// The gateway VM's vpcgated.
pub struct Gateway {
    pub dev: WgDev,
    pub ctl: Vpcgate,
    pub public_key: String,
}

/// The guide's whole setup: the network plus the gateway daemon.
pub struct Guide {
    pub gateway: Gateway,
    pub net: GuideNet,
}

impl Guide {
    /// The network with the gateway configured as the guide says: public
    /// endpoint 198.18.2.10:51820, advertising the VPC and peered ranges.
    pub fn new() -> Result<Guide> {
        let g = Guide::with_unconfigured_gateway()?;
        g.configure_gateway()?;
        Ok(g)
    }

    /// The network with vpcgated running on the gateway at 100.64.0.1/24,
    /// nothing set through the CLI yet.
    pub fn with_unconfigured_gateway() -> Result<Guide> {
        Guide::start_gateway(GuideNet::new()?, GW_TUNNEL_ADDR, &[])
    }

    /// The dual-stack network with vpcgated running on the gateway at
    /// [`GW_TUNNEL_ADDRS_DUAL`], nothing set through the CLI yet.
    pub fn dual_stack_with_unconfigured_gateway() -> Result<Guide> {
        Guide::start_gateway(GuideNet::new_dual_stack()?, GW_TUNNEL_ADDRS_DUAL, &[])
    }

    /// The gateway started and configured on `net`, which the caller may
    /// have extended first (a resolver in the VPC, say).
    pub fn on(net: GuideNet) -> Result<Guide> {
        Guide::on_with(net, &[])
    }

    /// As [`Guide::on`], with more arguments for the gateway's vpcgated
    /// (`--metrics-listen 127.0.0.1:9586`, say).
    pub fn on_with(net: GuideNet, args: &[&str]) -> Result<Guide> {
        let g = Guide::start_gateway(net, GW_TUNNEL_ADDR, args)?;
        g.configure_gateway()?;
        Ok(g)
    }

    fn start_gateway(net: GuideNet, address: &str, args: &[&str]) -> Result<Guide> {
        let mut cfg = VpcgatedConfig::new(GW_PORT, address);
        cfg.extra_args = args.iter().map(|a| a.to_string()).collect();
        let dev =
            WgDev::vpcgated(&net.gw, "g", &cfg).context("starting vpcgated on the gateway")?;
        let ctl = Vpcgate::for_dev(&dev)?;
        let public_key = dev.public_key()?;
        Ok(Guide {
            gateway: Gateway {
                dev,
                ctl,
                public_key,
            },
            net,
        })
    }

    pub fn configure_gateway(&self) -> Result<()> {
        let ctl = &self.gateway.ctl;
        ctl.run(&["set", "--public-endpoint", GW_ENDPOINT])?;
        ctl.advertise(&[VPC_RANGE, PEERED_RANGE])?;
        Ok(())
    }

    /// A laptop running vpcgated at `address` (e.g. `100.64.0.2/24`),
    /// added on the gateway as `name` with the /32 of that address, and
    /// given the gateway as a peer with `--accept-routes`.
    pub fn vpcgate_laptop(&self, ns: &Netns, name: &str, address: &str) -> Result<VpcgateLaptop> {
        let host = address.split('/').next().unwrap_or(address);
        let dev = WgDev::vpcgated(ns, "l", &VpcgatedConfig::new(GW_PORT, address))
            .context("starting vpcgated on the laptop")?;
        let ctl = Vpcgate::for_dev(&dev)?;
        let public_key = dev.public_key()?;
        self.gateway.ctl.run(&[
            "peer",
            "add",
            name,
            "--public-key",
            &public_key,
            "--allowed-ips",
            &format!("{host}/32"),
        ])?;
        ctl.run(&[
            "peer",
            "add",
            "gateway",
            "--public-key",
            &self.gateway.public_key,
            "--endpoint",
            GW_ENDPOINT,
            "--allowed-ips",
            "100.64.0.1/32",
            "--accept-routes",
        ])?;
        Ok(VpcgateLaptop {
            ns: ns.clone(),
            dev,
            ctl,
            public_key,
            gateway_key: self.gateway.public_key.clone(),
        })
    }
}

/// A laptop running vpcgated with the gateway as an accept-routes peer.
pub struct VpcgateLaptop {
    pub ns: Netns,
    pub dev: WgDev,
    pub ctl: Vpcgate,
    pub public_key: String,
    gateway_key: String,
}

/// What a laptop knows about routes at one moment.
#[derive(Clone, Debug, Default)]
pub struct RouteView {
    /// Prefixes of the OS routes through the laptop's TUN.
    pub os: Vec<String>,
    pub accepted: Vec<String>,
    /// The gateway peer's allowed IPs as `wg show dump` lists them.
    pub allowed_ips: Vec<String>,
}

impl RouteView {
    pub fn has(&self, prefix: &str) -> bool {
        self.os.iter().any(|p| p == prefix)
            && self.accepted.iter().any(|p| p == prefix)
            && self.allowed_ips.iter().any(|p| p == prefix)
    }

    pub fn lacks(&self, prefix: &str) -> bool {
        !self.os.iter().any(|p| p == prefix)
            && !self.accepted.iter().any(|p| p == prefix)
            && !self.allowed_ips.iter().any(|p| p == prefix)
    }
}

impl VpcgateLaptop {
    /// Prefixes routed through the TUN in the laptop's main table
    /// (`ip route show dev TUN`), host routes written as /32.
    pub fn os_routes(&self) -> Result<Vec<String>> {
        let out = self
            .ns
            .ip(&["-4", "-o", "route", "show", "dev", self.dev.name()])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(|p| {
                if p.contains('/') {
                    p.to_string()
                } else {
                    format!("{p}/32")
                }
            })
            .collect())
    }

    pub fn routes(&self) -> Result<RouteView> {
        Ok(RouteView {
            os: self.os_routes()?,
            accepted: self.ctl.status()?.accepted_routes,
            allowed_ips: self.dev.peer(&self.gateway_key)?.allowed_ips,
        })
    }

    /// Waits until every prefix of `present` is an OS route via the TUN, in
    /// `status.accepted_routes` and in the gateway peer's allowed IPs, and
    /// no prefix of `absent` is in any of them.
    pub fn wait_routes(
        &mut self,
        present: &[&str],
        absent: &[&str],
        timeout: Duration,
    ) -> Result<RouteView> {
        let mut last = RouteView::default();
        let res = wait_until(
            timeout,
            &format!(
                "{} to have routes {present:?} and not {absent:?}",
                self.ns.name()
            ),
            || {
                self.dev.check_running()?;
                last = self.routes()?;
                Ok(present.iter().all(|p| last.has(p)) && absent.iter().all(|p| last.lacks(p)))
            },
        );
        match res {
            Ok(()) => Ok(last),
            Err(e) => Err(e.context(format!("last seen: {last:?}"))),
        }
    }
}

/// `addr:port` as a socket address.
pub fn sock(addr: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(addr), port)
}
