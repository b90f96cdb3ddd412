//! The host checks of `vpcgate doctor`: IP forwarding, reverse-path
//! filtering, routes to the advertised ranges, the tunnel MTU, the UDP listen
//! port, nftables and `/dev/net/tun`.
//!
//! Everything is read from `/proc`, `/sys` and `/dev` under roots held by
//! [`Host`], so tests point it at fixture directories. Routes come from
//! `/proc/net/route` and `/proc/net/ipv6_route` with our own longest-prefix
//! match rather than from netlink or `ip route get`: the CLI stays free of an
//! async runtime and of child processes for everything but `nft` and the
//! TUN check's fork. The price is that only the main routing table is seen
//! for IPv4 (that is all `/proc/net/route` shows) and policy routing rules
//! are ignored, which is what a gateway VM uses anyway.
//!
//! `/dev/net/tun` is opened as the user vpcgated runs as: run as root,
//! doctor forks a child that becomes the service user `vpcgate` and tries.
//!
//! The parsers and the functions that turn what was read into a [`Check`]
//! are pure; only the methods of [`Host`], [`open_as`] (in `open_as.rs`) and the user lookup
//! touch the system.

use super::open_as::open_as;
use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::ptr;
use std::time::{Duration, Instant};

pub use super::routes::{default_route, lookup, parse_route4, parse_route6, Prefix, Route};
use super::{Check, Level};

/// WireGuard's overhead over IPv4: 20 (IP) + 8 (UDP) + 32 (header and tag).
pub const OVERHEAD_V4: u32 = 60;
/// Over IPv6: 40 (IP) + 8 (UDP) + 32.
pub const OVERHEAD_V6: u32 = 80;
/// What a path across the internet carries without fragmenting; a NIC with a
/// larger MTU (AWS's 9001) does not make the internet carry more.
pub const INTERNET_MTU: u32 = 1500;
/// IPv6 needs at least this much inside the tunnel; vpcgated refuses less.
pub const MIN_TUNNEL_MTU: u32 = 1280;

/// Where a `sysctl -w` setting is kept across reboots. Our files are named
/// 90-vpcgate-*.conf: after the distribution's and cloud images' files (GCE's
/// 60-gce-network-security.conf sets strict rp_filter), before 99-sysctl.conf,
/// and never the packaged 90-vpcgate.conf itself, which a file of the same
/// name in /etc would replace.
const SYSCTL_D: &str = "/etc/sysctl.d";

/// The account the package's unit runs vpcgated as.
pub const SERVICE_USER: &str = "vpcgate";
/// What `systemd-tmpfiles` calls the package's file that gives the service
/// user access to `/dev/net/tun` (/usr/lib/tmpfiles.d/vpcgate.conf).
const TMPFILES_CONF: &str = "vpcgate.conf";

/// How long `nft list tables` may take before it counts as hung.
const NFT_TIMEOUT: Duration = Duration::from_secs(5);
/// Where Debian and Fedora install nft, for when PATH lacks the sbin dirs.
const NFT_FALLBACK: &str = "/usr/sbin/nft";

/// Local UDP ports in `/proc/net/udp` or `/proc/net/udp6`.
pub fn parse_udp_ports(text: &str) -> BTreeSet<u16> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let local = line.split_whitespace().nth(1)?;
            let (_, port) = local.rsplit_once(':')?;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

/// The kernel applies the larger of `conf/all/rp_filter` and
/// `conf/IF/rp_filter` (Documentation/networking/ip-sysctl.rst).
pub fn effective_rp_filter(all: u8, iface: u8) -> u8 {
    all.max(iface)
}

/// Whether the name can be used as one path component under /sys or /proc.
fn plain_ifname(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/')
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TunState {
    Usable,
    Missing,
    NotCharDevice,
    /// EACCES: the file's mode and ACL do not let that user open it.
    Denied,
    OpenFailed(String),
    /// Doctor could not become the service user to try.
    Unchecked(String),
}

/// Whose access to `/dev/net/tun` doctor checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunUser {
    /// The service user, from a child that took its uid and gid.
    Service,
    /// Root, as there is no service user: without the package vpcgated runs
    /// as root.
    Root,
    /// Whoever runs doctor (this uid): not root, so it cannot become the
    /// service user.
    Caller(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftState {
    Works(PathBuf),
    Missing,
    Fails { path: PathBuf, error: String },
}

/// The system as doctor reads it. `Host::system()` is the real one; tests
/// build one over fixture directories.
#[derive(Debug, Clone)]
pub struct Host {
    pub proc: PathBuf,
    pub sys: PathBuf,
    pub dev: PathBuf,
}

impl Host {
    pub fn system() -> Host {
        Host {
            proc: PathBuf::from("/proc"),
            sys: PathBuf::from("/sys"),
            dev: PathBuf::from("/dev"),
        }
    }

    fn read(path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    /// The path of a sysctl such as `["net", "ipv4", "ip_forward"]`.
    pub fn sysctl_path(&self, key: &[&str]) -> PathBuf {
        key.iter()
            .fold(self.proc.join("sys"), |path, part| path.join(part))
    }

    /// A numeric sysctl; an unreadable or non-numeric one is an error that
    /// names the file.
    pub fn sysctl(&self, key: &[&str]) -> Result<u8, String> {
        let path = self.sysctl_path(key);
        let text = Self::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        text.trim()
            .parse::<u8>()
            .map_err(|_| format!("{} holds {:?}, not a number", path.display(), text.trim()))
    }

    pub fn routes4(&self) -> io::Result<Vec<Route>> {
        Self::read(&self.proc.join("net/route")).map(|t| parse_route4(&t))
    }

    /// IPv6 routes; none when IPv6 is disabled and the file is absent.
    pub fn routes6(&self) -> io::Result<Vec<Route>> {
        match Self::read(&self.proc.join("net/ipv6_route")) {
            Ok(text) => Ok(parse_route6(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    pub fn iface_mtu(&self, name: &str) -> Option<u32> {
        if !plain_ifname(name) {
            return None;
        }
        Self::read(&self.sys.join("class/net").join(name).join("mtu"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The interface's MAC address, lower case with colons.
    pub fn iface_mac(&self, name: &str) -> Option<String> {
        if !plain_ifname(name) {
            return None;
        }
        let mac = Self::read(&self.sys.join("class/net").join(name).join("address")).ok()?;
        let mac = mac.trim().to_ascii_lowercase();
        (!mac.is_empty()).then_some(mac)
    }

    /// Bound UDP ports: (IPv4, IPv6).
    pub fn udp_ports(&self) -> io::Result<(BTreeSet<u16>, BTreeSet<u16>)> {
        let v4 = parse_udp_ports(&Self::read(&self.proc.join("net/udp"))?);
        let v6 = match Self::read(&self.proc.join("net/udp6")) {
            Ok(text) => parse_udp_ports(&text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(e),
        };
        Ok((v4, v6))
    }

    /// Opens the TUN clone device the way vpcgated does, without creating
    /// an interface (that takes an ioctl this never sends). As root, and
    /// where the service user exists, it opens it as that user: root opens
    /// it whatever its mode, the service user only if its mode or ACL
    /// allows.
    pub fn tun(&self) -> (TunUser, TunState) {
        let path = self.dev.join("net/tun");
        // SAFETY: geteuid cannot fail and touches no memory.
        let euid = unsafe { libc::geteuid() };
        let service = if euid == 0 {
            lookup_user(SERVICE_USER)
        } else {
            None
        };
        let who = match service {
            Some(_) => TunUser::Service,
            None if euid == 0 => TunUser::Root,
            None => TunUser::Caller(euid),
        };
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return (who, TunState::Missing),
            Err(e) => return (who, TunState::OpenFailed(e.to_string())),
            Ok(meta) if !meta.file_type().is_char_device() => {
                return (who, TunState::NotCharDevice)
            }
            Ok(_) => {}
        }
        let opened = match service {
            Some((uid, gid)) => match open_as(&path, uid, gid) {
                Ok(opened) => opened,
                Err(e) => return (who, TunState::Unchecked(e.to_string())),
            },
            None => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map(drop),
        };
        let state = match opened {
            Ok(()) => TunState::Usable,
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => TunState::Denied,
            Err(e) => TunState::OpenFailed(e.to_string()),
        };
        (who, state)
    }

    /// Runs `nft list tables` with a time limit.
    pub fn nft(&self) -> NftState {
        let found = std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join("nft"))
            .chain(std::iter::once(PathBuf::from(NFT_FALLBACK)))
            .find(|p| p.is_file());
        let Some(path) = found else {
            return NftState::Missing;
        };
        let child = Command::new(&path)
            .args(["list", "tables"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                return NftState::Fails {
                    path,
                    error: e.to_string(),
                }
            }
        };
        let deadline = Instant::now() + NFT_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return NftState::Fails {
                        path,
                        error: format!("`nft list tables` did not finish in {NFT_TIMEOUT:?}"),
                    };
                }
                Err(e) => {
                    return NftState::Fails {
                        path,
                        error: e.to_string(),
                    }
                }
            }
        }
        match child.wait_with_output() {
            Ok(out) if out.status.success() => NftState::Works(path),
            Ok(out) => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let first = stderr.lines().next().unwrap_or("").trim();
                NftState::Fails {
                    path,
                    error: format!("`nft list tables` failed ({}): {first}", out.status),
                }
            }
            Err(e) => NftState::Fails {
                path,
                error: e.to_string(),
            },
        }
    }
}

/// The uid and gid of the user `name`; none if there is no such user or the
/// user database cannot be read.
fn lookup_user(name: &str) -> Option<(libc::uid_t, libc::gid_t)> {
    let name = CString::new(name).ok()?;
    let mut size = 4096;
    loop {
        // SAFETY: passwd is plain data, for which all zeros is a valid value.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; size];
        let mut found: *mut libc::passwd = ptr::null_mut();
        // SAFETY: every pointer is valid for the call, and buf's length is
        // the one given; the strings in entry point into buf, which is not
        // read after it is dropped.
        let rc = unsafe {
            libc::getpwnam_r(
                name.as_ptr(),
                &mut entry,
                buf.as_mut_ptr(),
                buf.len(),
                &mut found,
            )
        };
        match rc {
            0 if found.is_null() => return None,
            0 => return Some((entry.pw_uid, entry.pw_gid)),
            libc::ERANGE if size < 1 << 20 => size *= 4,
            _ => return None,
        }
    }
}

/// Whether a setting matters: ranges of its family are advertised, none are,
/// or the daemon could not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Required,
    NotNeeded,
    Unknown,
}

fn persist(file: &str, line: &str) -> String {
    format!("printf '{line}\\n' > {SYSCTL_D}/{file}  # keeps it across reboots")
}

/// IPv4 or IPv6 forwarding; `value` is the sysctl as read.
pub fn forwarding(v6: bool, need: Need, value: Result<u8, String>) -> Check {
    let (family, key) = if v6 {
        ("IPv6", "net.ipv6.conf.all.forwarding")
    } else {
        ("IPv4", "net.ipv4.ip_forward")
    };
    let id = if v6 {
        "ipv6_forwarding"
    } else {
        "ipv4_forwarding"
    };
    let file = if v6 {
        "90-vpcgate-ipv6-forwarding.conf"
    } else {
        "90-vpcgate-ipv4-forwarding.conf"
    };
    match value {
        Err(e) => Check::new(id, Level::Warn, format!("cannot tell whether {family} forwarding is on: {e}"))
            .fix(format!("sysctl {key}  # should print {key} = 1")),
        Ok(1) => Check::new(id, Level::Ok, format!("{family} forwarding is on ({key} = 1)")),
        Ok(v) if need == Need::NotNeeded => Check::new(
            id,
            Level::Ok,
            format!("{family} forwarding is off ({key} = {v}); no {family} range is advertised, so it is not needed yet"),
        ),
        Ok(v) => {
            let mut check = Check::new(
                id,
                Level::Fail,
                format!("{family} forwarding is off ({key} = {v}), so the kernel drops what peers send to the advertised {family} ranges"),
            )
            .fix(format!("sysctl -w {key}=1"))
            .fix(persist(file, &format!("{key} = 1")));
            if v6 {
                check = check.fix(
                    "if this VM learns its IPv6 default route from router advertisements, keep \
                     accepting them: sysctl -w net.ipv6.conf.<interface>.accept_ra=2"
                        .to_string(),
                );
            }
            check
        }
    }
}

/// The route the gateway itself uses for an advertised range. `others` are
/// the other advertised ranges, for the command that stops advertising it;
/// `hint` is a route already used for another range, whose gateway and
/// interface likely reach this one too.
pub fn route(
    range: Prefix,
    found: Option<&Route>,
    tun: &str,
    others: &[Prefix],
    hint: Option<&Route>,
) -> Check {
    let subject = range.to_string();
    let id = "route";
    let stop = if others.is_empty() {
        "or stop advertising it: vpcgate advertise-routes --clear".to_string()
    } else {
        let rest: Vec<String> = others.iter().map(Prefix::to_string).collect();
        format!(
            "or stop advertising it: vpcgate advertise-routes {}",
            rest.join(",")
        )
    };
    let add = match hint {
        Some(r) => format!("ip route add {range} {}  # then persist it in the network configuration", r.describe()),
        None => format!(
            "ip route add {range} via <VPC router> dev <VPC interface>  # then persist it in the network configuration"
        ),
    };
    let check = match found {
        None => Check::new(
            id,
            Level::Fail,
            format!("no route to {range}: this VM cannot reach it, so neither can its peers"),
        )
        .fix(add)
        .fix(stop),
        Some(r) if r.reject => Check::new(
            id,
            Level::Fail,
            format!("{range} matches the unreachable route {} (unreachable, prohibit or blackhole), so packets to it are dropped", r.prefix),
        )
        .fix(add.replacen("ip route add", "ip route replace", 1))
        .fix(stop),
        Some(r) if r.iface == tun => Check::new(
            id,
            Level::Fail,
            format!("{range} is routed into the tunnel itself ({}, {}): packets from peers would loop back to them", r.prefix, r.describe()),
        )
        .fix(add.replacen("ip route add", "ip route replace", 1))
        .fix(stop),
        Some(r) if r.local => Check::new(
            id,
            Level::Ok,
            format!("{range} is this VM's own address"),
        ),
        Some(r) if r.prefix.len == 0 => Check::new(
            id,
            Level::Ok,
            format!("{range} is reached by the default route {}; make sure that is the VPC side", r.describe()),
        ),
        Some(r) => {
            let through = match r.gateway {
                Some(gw) => format!("goes via {gw} on {}", r.iface),
                None => format!("is directly reachable on {}", r.iface),
            };
            let wider = if r.prefix == range {
                String::new()
            } else {
                format!(" (route {})", r.prefix)
            };
            Check::new(id, Level::Ok, format!("{range} {through}{wider}"))
        }
    };
    check.subject(subject)
}

/// Strict reverse-path filtering on an interface that leads to advertised
/// ranges.
pub fn rp_filter(iface: &str, all: Result<u8, String>, own: Result<u8, String>) -> Check {
    let id = "rp_filter";
    let (all, own) = match (all, own) {
        (Ok(a), Ok(o)) => (a, o),
        (Err(e), _) | (_, Err(e)) => {
            return Check::new(id, Level::Warn, format!("cannot read the reverse-path filter of {iface}: {e}"))
                .fix(format!("sysctl net.ipv4.conf.all.rp_filter net.ipv4.conf.{iface}.rp_filter  # 0 or 2 is fine, 1 is strict"))
                .subject(iface.to_string());
        }
    };
    let effective = effective_rp_filter(all, own);
    let found = format!(
        "net.ipv4.conf.all.rp_filter = {all}, net.ipv4.conf.{iface}.rp_filter = {own}; the kernel uses the larger"
    );
    let check = match effective {
        1 => Check::new(
            id,
            Level::Warn,
            format!("strict reverse-path filtering on {iface}, which leads to advertised ranges ({found}): a reply that arrives on another interface than the route back to its sender is dropped"),
        )
        .fix(format!("sysctl -w net.ipv4.conf.{iface}.rp_filter=2"))
        .fix(persist("90-vpcgate-rp-filter.conf", &format!("net.ipv4.conf.{iface}.rp_filter = 2"))),
        0 => Check::new(id, Level::Ok, format!("no reverse-path filtering on {iface} ({found})")),
        _ => Check::new(id, Level::Ok, format!("loose reverse-path filtering on {iface} ({found})")),
    };
    check.subject(iface.to_string())
}

/// Whether two prefixes share any address.
fn overlap(a: &Prefix, b: &Prefix) -> bool {
    a.contains(b.network().addr) || b.contains(a.network().addr)
}

/// The tunnel networks against the networks this host routes elsewhere. A
/// VPC that routes part of 100.64.0.0/10 itself (EKS pod ranges, for one)
/// makes that part unreachable through the VPC from the gateway, or peers'
/// packets unroutable, depending on which route wins. Default routes cover
/// everything and are not a clash.
pub fn tunnel_overlap(tunnel_iface: &str, tunnel: &[Prefix], routes: &[Route]) -> Check {
    let id = "tunnel-network";
    let clashes: Vec<String> = routes
        .iter()
        .filter(|r| r.prefix.len > 0 && r.iface != tunnel_iface && !r.local)
        .flat_map(|r| {
            tunnel
                .iter()
                .filter(|t| overlap(t, &r.prefix))
                .map(move |t| {
                    format!(
                        "{t} overlaps the route {} {}",
                        r.prefix.network(),
                        r.describe()
                    )
                })
        })
        .collect();
    if clashes.is_empty() {
        let nets: Vec<String> = tunnel.iter().map(ToString::to_string).collect();
        return Check::new(
            id,
            Level::Ok,
            format!(
                "the tunnel network ({}) overlaps no route of this host",
                nets.join(", ")
            ),
        );
    }
    let taken: Vec<(Ipv4Addr, u8)> = routes
        .iter()
        .filter(|r| r.prefix.len > 0)
        .filter_map(|r| match r.prefix.network().addr {
            IpAddr::V4(a) => Some((a, r.prefix.len)),
            IpAddr::V6(_) => None,
        })
        .collect();
    let check = Check::new(
        id,
        Level::Fail,
        format!(
            "the tunnel network clashes with this host's routes: {}",
            clashes.join("; ")
        ),
    );
    match vpcgate_proto::free_tunnel_address(&taken) {
        Some(free) => check.fix(format!(
            "vpcgate set --address {free}  # a free part of 100.64.0.0/10; then hand out client configs again"
        )),
        None => check.fix("vpcgate set --address ADDR/LEN  # a range no route of this host covers".into()),
    }
}

/// What the tunnel MTU allows: the largest tunnel MTU whose packets still fit
/// the path with IPv4 and with IPv6 outer headers.
pub fn mtu_limit(nic_mtu: Option<u32>) -> u32 {
    nic_mtu.map_or(INTERNET_MTU, |m| m.min(INTERNET_MTU))
}

/// The tunnel MTU against the NIC that carries the tunnel and the internet's
/// 1500. Decision: fitting the 80 bytes of an IPv6 outer header is ok,
/// fitting only IPv4's 60 is a warning (IPv6 endpoints fragment), fitting
/// neither fails (every full-size packet is fragmented, and some networks
/// drop fragments).
pub fn mtu(tunnel: &str, tunnel_mtu: Option<u32>, nic: Option<(&str, Option<u32>)>) -> Check {
    let id = "mtu";
    let Some(tunnel_mtu) = tunnel_mtu else {
        return Check::new(id, Level::Warn, format!("cannot read the MTU of {tunnel}")).fix(
            format!("ip link show {tunnel}  # is vpcgated's interface there?"),
        );
    };
    let nic_mtu = nic.and_then(|(_, m)| m);
    let limit = mtu_limit(nic_mtu);
    let path = match nic {
        Some((name, Some(m))) if m < INTERNET_MTU => format!("{name}'s MTU {m}"),
        Some((name, Some(m))) => format!("the internet's {INTERNET_MTU} ({name}'s MTU is {m})"),
        Some((name, None)) => format!("the internet's {INTERNET_MTU} ({name}'s MTU is unreadable)"),
        None => format!("the internet's {INTERNET_MTU} (no default route, so the NIC is unknown)"),
    };
    let suggested = limit.saturating_sub(OVERHEAD_V6).max(MIN_TUNNEL_MTU);
    let fix = format!(
        "vpcgate set --mtu {suggested}  # then hand out client configs again: vpcgate peer config NAME"
    );
    if tunnel_mtu + OVERHEAD_V6 <= limit {
        Check::new(
            id,
            Level::Ok,
            format!(
                "tunnel MTU {tunnel_mtu} + {OVERHEAD_V6} bytes of WireGuard over IPv6 fits {path}"
            ),
        )
    } else if tunnel_mtu + OVERHEAD_V4 <= limit {
        Check::new(
            id,
            Level::Warn,
            format!("tunnel MTU {tunnel_mtu} fits {path} only over IPv4 ({tunnel_mtu} + {OVERHEAD_V4}); over IPv6 ({tunnel_mtu} + {OVERHEAD_V6} = {}) packets are fragmented", tunnel_mtu + OVERHEAD_V6),
        )
        .fix(fix)
    } else {
        Check::new(
            id,
            Level::Fail,
            format!("tunnel MTU {tunnel_mtu} + {OVERHEAD_V4} bytes of WireGuard over IPv4 = {} exceeds {path}: every full-size packet is fragmented", tunnel_mtu + OVERHEAD_V4),
        )
        .fix(fix)
    }
}

pub fn listen_port(port: u16, bound: io::Result<(BTreeSet<u16>, BTreeSet<u16>)>) -> Check {
    let id = "listen_port";
    match bound {
        Err(e) => Check::new(id, Level::Warn, format!("cannot read /proc/net/udp: {e}")).fix(
            format!("ss -ulnp 'sport = :{port}'  # should list vpcgated"),
        ),
        Ok((v4, v6)) => {
            let families: Vec<&str> = [(v4.contains(&port), "IPv4"), (v6.contains(&port), "IPv6")]
                .into_iter()
                .filter_map(|(bound, name)| bound.then_some(name))
                .collect();
            if families.is_empty() {
                Check::new(
                    id,
                    Level::Fail,
                    format!("vpcgated says it listens on UDP port {port}, but nothing in this network namespace is bound to it, so no handshake can reach it"),
                )
                .fix("systemctl restart vpcgated".to_string())
                .fix("journalctl -u vpcgated -e  # why it lost the port".to_string())
            } else {
                Check::new(
                    id,
                    Level::Ok,
                    format!(
                        "UDP port {port} is bound ({}); the cloud firewall must let it in too",
                        families.join(", ")
                    ),
                )
            }
        }
    }
}

/// Whether `/dev/net/tun` opens, for whom: see [`Host::tun`].
pub fn tun(path: &Path, who: TunUser, state: TunState) -> Check {
    let id = "tun_device";
    let p = path.display();
    let (user, note) = match who {
        TunUser::Service => (format!("the service user {SERVICE_USER}"), String::new()),
        TunUser::Root => (
            "root".to_string(),
            format!(
                "; there is no user {SERVICE_USER}, and without the package vpcgated runs as root"
            ),
        ),
        TunUser::Caller(uid) => (
            format!("uid {uid}, who runs doctor"),
            format!("; only doctor run as root checks it for the service user {SERVICE_USER}"),
        ),
    };
    match state {
        TunState::Usable => Check::new(id, Level::Ok, format!("{p} opens for {user}{note}")),
        // Opening the clone device grants nothing by itself: creating an
        // interface takes TUNSETIFF, which needs CAP_NET_ADMIN. That is why
        // udev makes it 0666; systemd-nspawn and some minimal images make
        // it 0600.
        TunState::Denied => match who {
            TunUser::Service => Check::new(
                id,
                Level::Fail,
                format!("{p} does not open for {user} (permission denied), so vpcgated cannot create its interface"),
            )
            .fix(format!("systemd-tmpfiles --create {TMPFILES_CONF}  # the package's ACL entry for {SERVICE_USER}, which every boot applies again"))
            .fix("or make it 0666, as udev does: chmod 0666 /dev/net/tun  # lasts until /dev is rebuilt at the next boot".to_string()),
            TunUser::Caller(_) => Check::new(
                id,
                Level::Warn,
                format!("{p} does not open for {user} (permission denied), which does not say whether vpcgated can open it{note}"),
            )
            .fix(format!("sudo vpcgate doctor  # checks it for the service user {SERVICE_USER}")),
            TunUser::Root => Check::new(
                id,
                Level::Fail,
                format!("{p} does not open for {user} (permission denied), so vpcgated cannot create its interface{note}"),
            )
            .fix("chmod 0666 /dev/net/tun  # as udev makes it".to_string())
            .fix("in a container: pass the device and the capability (docker run --device /dev/net/tun --cap-add NET_ADMIN)".to_string()),
        },
        TunState::Unchecked(e) => Check::new(
            id,
            Level::Warn,
            format!("cannot tell whether {p} opens for {user}: {e}"),
        )
        .fix(format!("runuser -u {SERVICE_USER} -- sh -c ': <>/dev/net/tun'  # the same check by hand: silent if it opens")),
        TunState::Missing => Check::new(id, Level::Fail, format!("{p} is missing, so vpcgated cannot create its interface"))
            .fix("modprobe tun".to_string())
            .fix("mkdir -p /dev/net && mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun  # if it is still missing".to_string()),
        TunState::NotCharDevice => Check::new(id, Level::Fail, format!("{p} is not a character device"))
            .fix("rm /dev/net/tun && mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun".to_string()),
        TunState::OpenFailed(e) => Check::new(id, Level::Fail, format!("{p} does not open for {user}: {e}"))
            .fix("modprobe tun".to_string())
            .fix("in a container: pass the device and the capability (docker run --device /dev/net/tun --cap-add NET_ADMIN)".to_string()),
    }
}

pub fn nftables(state: NftState) -> Check {
    let id = "nftables";
    match state {
        NftState::Works(path) => Check::new(
            id,
            Level::Ok,
            format!("`nft list tables` works ({})", path.display()),
        ),
        NftState::Missing => Check::new(
            id,
            Level::Fail,
            format!(
                "nft is not in PATH nor at {NFT_FALLBACK}, so vpcgated cannot write its SNAT table"
            ),
        )
        .fix(
            "apt-get install nftables  # Debian, Ubuntu; dnf install nftables on Fedora, RHEL"
                .to_string(),
        ),
        NftState::Fails { path, error } => Check::new(
            id,
            Level::Fail,
            format!("{} does not work: {error}", path.display()),
        )
        .fix("modprobe nf_tables".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        Prefix::parse(s).expect("prefix")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    // Captured in a namespace on x86_64: default via 198.18.2.1 dev inet0,
    // 198.18.64.0/20 dev vpc0, 198.19.101.0/24 via 198.18.64.1 metric 100,
    // a more specific 198.19.101.128/25 via the TUN, and an unreachable
    // 198.19.200.0/24.
    const ROUTE4: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        inet0\t00000000\t010212C6\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
        inet0\t000212C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
        vpc0\t004012C6\t00000000\t0001\t0\t0\t0\t00F0FFFF\t0\t0\t0\n\
        vpc0\t006513C6\t014012C6\t0003\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
        vg0\t806513C6\t00000000\t0001\t0\t0\t0\t80FFFFFF\t0\t0\t0\n\
        *\t00C813C6\t00000000\t0201\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";

    const ROUTE6: &str = "\
fd000064004000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     vpc0
fd000064004000000000000000000010 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001     vpc0
fd000065010100000000000000000000 40 00000000000000000000000000000000 00 fd000064004000000000000000000001 00000400 00000002 00000000 00000003     vpc0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";

    #[test]
    fn prefixes_parse_print_and_contain() {
        assert_eq!(p("198.18.64.0/20").to_string(), "198.18.64.0/20");
        assert_eq!(p("198.18.64.5").len, 32);
        assert_eq!(p("fd00::1/64").network().to_string(), "fd00::/64");
        assert_eq!(p("100.64.0.1/24").network().to_string(), "100.64.0.0/24");
        assert!(Prefix::parse("198.18.0.0/33").is_none());
        assert!(Prefix::parse("nonsense/8").is_none());
        assert!(p("198.18.64.0/20").contains(ip("198.18.79.255")));
        assert!(!p("198.18.64.0/20").contains(ip("198.18.80.0")));
        assert!(p("0.0.0.0/0").contains(ip("203.0.113.1")));
        assert!(!p("0.0.0.0/0").contains(ip("::1")));
        assert!(p("::/0").contains(ip("fd00::1")));
    }

    #[test]
    fn parses_proc_net_route() {
        let routes = parse_route4(ROUTE4);
        assert_eq!(routes.len(), 6);
        assert_eq!(routes[0].prefix, p("0.0.0.0/0"));
        assert_eq!(routes[0].gateway, Some(ip("198.18.2.1")));
        assert_eq!(routes[2].prefix, p("198.18.64.0/20"));
        assert_eq!(routes[2].gateway, None);
        assert_eq!(routes[3].metric, 100);
        assert_eq!(routes[3].describe(), "via 198.18.64.1 dev vpc0");
        assert!(routes[5].reject);
    }

    #[test]
    fn longest_prefix_wins_then_lowest_metric() {
        let routes = parse_route4(ROUTE4);
        let via = |a: &str| lookup(&routes, ip(a)).map(|r| (r.prefix.to_string(), r.iface.clone()));
        assert_eq!(
            via("198.18.64.0"),
            Some(("198.18.64.0/20".into(), "vpc0".into()))
        );
        assert_eq!(
            via("198.19.101.0"),
            Some(("198.19.101.0/24".into(), "vpc0".into()))
        );
        assert_eq!(
            via("198.19.101.200"),
            Some(("198.19.101.128/25".into(), "vg0".into()))
        );
        assert_eq!(
            via("203.0.113.9"),
            Some(("0.0.0.0/0".into(), "inet0".into()))
        );
        assert!(lookup(&routes, ip("198.19.200.0")).is_some_and(|r| r.reject));
        let no_default: Vec<Route> = routes.into_iter().filter(|r| r.prefix.len > 0).collect();
        assert!(lookup(&no_default, ip("203.0.113.9")).is_none());

        let mut tie = parse_route4(ROUTE4);
        tie.push(Route {
            metric: 50,
            iface: "vpc1".into(),
            ..tie[3].clone()
        });
        assert_eq!(
            lookup(&tie, ip("198.19.101.7")).map(|r| r.iface.as_str()),
            Some("vpc1")
        );
    }

    #[test]
    fn parses_proc_net_ipv6_route() {
        let routes = parse_route6(ROUTE6);
        assert_eq!(routes.len(), 4);
        assert_eq!(routes[0].prefix, p("fd00:64:40::/64"));
        assert!(routes[1].local);
        assert_eq!(routes[2].gateway, Some(ip("fd00:64:40::1")));
        let r = lookup(&routes, ip("fd00:65:101::")).expect("route");
        assert_eq!(r.describe(), "via fd00:64:40::1 dev vpc0");
        // Only the kernel's catch-all unreachable entry matches elsewhere.
        assert!(lookup(&routes, ip("fd00:99::")).is_some_and(|r| r.reject));
        assert!(default_route(&routes).is_none());
    }

    #[test]
    fn default_route_skips_reject_entries() {
        let routes = parse_route4(ROUTE4);
        assert_eq!(
            default_route(&routes).map(|r| r.iface.as_str()),
            Some("inet0")
        );
    }

    #[test]
    fn parses_udp_sockets() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
            \x20 12: 00000000:CA6C 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 123 2 0000000000000000 0\n\
            \x20 13: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 124 2 0000000000000000 0\n";
        let ports = parse_udp_ports(text);
        assert!(ports.contains(&51820));
        assert!(ports.contains(&53));
        assert_eq!(ports.len(), 2);
        let v6 = "  sl  local_address                         remote_address                        st\n\
            \x20  5: 00000000000000000000000000000000:CA6C 00000000000000000000000000000000:0000 07\n";
        assert!(parse_udp_ports(v6).contains(&51820));
    }

    #[test]
    fn rp_filter_is_the_larger_of_all_and_the_interface() {
        for (all, own, want) in [
            (0, 0, 0),
            (0, 1, 1),
            (1, 0, 1),
            (2, 1, 2),
            (1, 2, 2),
            (0, 2, 2),
        ] {
            assert_eq!(effective_rp_filter(all, own), want, "all={all} iface={own}");
        }
        let strict = rp_filter("vpc0", Ok(1), Ok(0));
        assert_eq!(strict.status, Level::Warn);
        assert_eq!(strict.subject.as_deref(), Some("vpc0"));
        assert!(strict.message.contains("strict"), "{}", strict.message);
        assert_eq!(strict.fix[0], "sysctl -w net.ipv4.conf.vpc0.rp_filter=2");
        assert!(strict.fix[1].contains("/etc/sysctl.d/"), "{:?}", strict.fix);
        assert_eq!(rp_filter("vpc0", Ok(1), Ok(2)).status, Level::Ok);
        assert_eq!(rp_filter("vpc0", Ok(0), Ok(0)).status, Level::Ok);
        assert!(rp_filter("vpc0", Ok(2), Ok(0)).message.starts_with("loose"));
        assert_eq!(
            rp_filter("vpc0", Err("gone".into()), Ok(0)).status,
            Level::Warn
        );
    }

    #[test]
    fn tunnel_network_clashing_with_a_vpc_route_fails_with_a_free_address() {
        let route = |net: &str, iface: &str| Route {
            prefix: Prefix::parse(net).expect("prefix"),
            gateway: None,
            iface: iface.into(),
            metric: 0,
            reject: false,
            local: false,
        };
        let tunnel = [Prefix::parse("100.64.0.1/24").expect("prefix")];
        let mut routes = vec![
            route("0.0.0.0/0", "eth0"),
            route("198.18.0.0/20", "eth0"),
            route("100.64.0.0/24", "vpcgate0"),
        ];
        let ok = tunnel_overlap("vpcgate0", &tunnel, &routes);
        assert_eq!(ok.status, Level::Ok, "{}", ok.message);

        // An EKS pod range routed by the VPC.
        routes.push(route("100.64.0.0/16", "eth0"));
        let clash = tunnel_overlap("vpcgate0", &tunnel, &routes);
        assert_eq!(clash.status, Level::Fail);
        assert!(
            clash.message.contains("100.64.0.0/16 dev eth0"),
            "{}",
            clash.message
        );
        assert!(
            clash.fix[0].starts_with("vpcgate set --address 100.65.0.1/24"),
            "{:?}",
            clash.fix
        );
    }

    #[test]
    fn mtu_rule() {
        assert_eq!(mtu_limit(Some(9001)), 1500);
        assert_eq!(mtu_limit(Some(1460)), 1460);
        assert_eq!(mtu_limit(None), 1500);

        let aws = mtu("vg0", Some(1420), Some(("eth0", Some(9001))));
        assert_eq!(aws.status, Level::Ok, "{}", aws.message);
        assert!(aws.fix.is_empty());

        // GCP's 1460: 1420 + 60 = 1480 does not fit.
        let gcp = mtu("vg0", Some(1420), Some(("ens4", Some(1460))));
        assert_eq!(gcp.status, Level::Fail, "{}", gcp.message);
        assert!(
            gcp.message.contains("1480") && gcp.message.contains("ens4's MTU 1460"),
            "{}",
            gcp.message
        );
        assert!(gcp.fix[0].contains("--mtu 1380"), "{:?}", gcp.fix);
        assert_eq!(
            mtu("vg0", Some(1380), Some(("ens4", Some(1460)))).status,
            Level::Ok
        );

        // Fits IPv4's 60 but not IPv6's 80.
        let v4_only = mtu("vg0", Some(1440), Some(("eth0", Some(1500))));
        assert_eq!(v4_only.status, Level::Warn, "{}", v4_only.message);
        assert!(v4_only.fix[0].contains("--mtu 1420"), "{:?}", v4_only.fix);

        let unknown_nic = mtu("vg0", Some(1420), None);
        assert_eq!(unknown_nic.status, Level::Ok);
        assert!(unknown_nic.message.contains("no default route"));

        // Never suggests less than IPv6's minimum.
        let tiny = mtu("vg0", Some(1420), Some(("eth0", Some(1300))));
        assert!(tiny.fix[0].contains("--mtu 1280"), "{:?}", tiny.fix);
        assert_eq!(mtu("vg0", None, None).status, Level::Warn);
    }

    #[test]
    fn forwarding_messages_and_fixes() {
        let off = forwarding(false, Need::Required, Ok(0));
        assert_eq!(off.status, Level::Fail);
        assert_eq!(off.id, "ipv4_forwarding");
        assert!(
            off.message.contains("net.ipv4.ip_forward = 0"),
            "{}",
            off.message
        );
        assert_eq!(off.fix[0], "sysctl -w net.ipv4.ip_forward=1");
        assert!(
            off.fix[1].contains("net.ipv4.ip_forward = 1") && off.fix[1].contains("/etc/sysctl.d/")
        );
        assert_eq!(forwarding(false, Need::Unknown, Ok(0)).status, Level::Fail);
        assert_eq!(forwarding(false, Need::NotNeeded, Ok(0)).status, Level::Ok);
        assert_eq!(forwarding(false, Need::Required, Ok(1)).status, Level::Ok);
        let v6 = forwarding(true, Need::Required, Ok(0));
        assert_eq!(v6.id, "ipv6_forwarding");
        assert_eq!(v6.fix[0], "sysctl -w net.ipv6.conf.all.forwarding=1");
        assert!(v6.fix.iter().any(|f| f.contains("accept_ra=2")));
        assert_eq!(
            forwarding(true, Need::Required, Err("x".into())).status,
            Level::Warn
        );
    }

    #[test]
    fn route_messages_and_fixes() {
        let routes = parse_route4(ROUTE4);
        let find = |r: &str| lookup(&routes, p(r).addr);
        let hint = find("198.19.101.0/24");
        let others = [p("198.18.64.0/20")];

        let ok = route(p("198.19.101.0/24"), hint, "vg0", &others, None);
        assert_eq!(ok.status, Level::Ok);
        assert_eq!(ok.subject.as_deref(), Some("198.19.101.0/24"));
        assert_eq!(ok.message, "198.19.101.0/24 goes via 198.18.64.1 on vpc0");
        let connected = route(
            p("198.18.64.0/20"),
            find("198.18.64.0/20"),
            "vg0",
            &[],
            None,
        );
        assert_eq!(
            connected.message,
            "198.18.64.0/20 is directly reachable on vpc0"
        );
        let wider = route(
            p("198.18.65.0/24"),
            find("198.18.65.0/24"),
            "vg0",
            &[],
            None,
        );
        assert!(
            wider.message.ends_with("(route 198.18.64.0/20)"),
            "{}",
            wider.message
        );

        let by_default = route(
            p("203.0.113.0/24"),
            find("203.0.113.0/24"),
            "vg0",
            &others,
            None,
        );
        assert_eq!(by_default.status, Level::Ok);
        assert!(
            by_default.message.contains("default route"),
            "{}",
            by_default.message
        );

        let none = route(p("198.19.200.0/24"), None, "vg0", &others, hint);
        assert_eq!(none.status, Level::Fail);
        assert!(
            none.message.starts_with("no route to 198.19.200.0/24"),
            "{}",
            none.message
        );
        assert!(
            none.fix[0].starts_with("ip route add 198.19.200.0/24 via 198.18.64.1 dev vpc0"),
            "{:?}",
            none.fix
        );
        assert_eq!(
            none.fix[1],
            "or stop advertising it: vpcgate advertise-routes 198.18.64.0/20"
        );
        let alone = route(p("198.19.200.0/24"), None, "vg0", &[], None);
        assert!(
            alone.fix[0].contains("via <VPC router> dev <VPC interface>"),
            "{:?}",
            alone.fix
        );
        assert!(alone.fix[1].ends_with("--clear"));

        let reject = route(
            p("198.19.200.0/24"),
            find("198.19.200.0/24"),
            "vg0",
            &others,
            hint,
        );
        assert_eq!(reject.status, Level::Fail);
        assert!(reject.message.contains("unreachable"), "{}", reject.message);
        assert!(
            reject.fix[0].starts_with("ip route replace"),
            "{:?}",
            reject.fix
        );

        let looped = route(
            p("198.19.101.128/25"),
            find("198.19.101.128/25"),
            "vg0",
            &others,
            hint,
        );
        assert_eq!(looped.status, Level::Fail);
        assert!(
            looped.message.contains("into the tunnel"),
            "{}",
            looped.message
        );
    }

    #[test]
    fn listen_port_tun_and_nft_messages() {
        let bound = listen_port(51820, Ok(([51820].into(), [51820].into())));
        assert_eq!(bound.status, Level::Ok);
        assert!(bound.message.contains("IPv4, IPv6"), "{}", bound.message);
        let free = listen_port(51820, Ok(([53].into(), BTreeSet::new())));
        assert_eq!(free.status, Level::Fail);
        assert_eq!(free.fix[0], "systemctl restart vpcgated");

        let path = Path::new("/dev/net/tun");
        let service = tun(path, TunUser::Service, TunState::Usable);
        assert_eq!(service.status, Level::Ok);
        assert_eq!(
            service.message,
            "/dev/net/tun opens for the service user vpcgate"
        );
        let missing = tun(path, TunUser::Service, TunState::Missing);
        assert_eq!(missing.status, Level::Fail);
        assert_eq!(missing.fix[0], "modprobe tun");
        let failed = tun(
            path,
            TunUser::Service,
            TunState::OpenFailed("Operation not permitted".into()),
        );
        assert_eq!(failed.status, Level::Fail);
        assert!(
            failed
                .message
                .ends_with("for the service user vpcgate: Operation not permitted"),
            "{}",
            failed.message
        );

        assert_eq!(
            nftables(NftState::Works("/usr/sbin/nft".into())).status,
            Level::Ok
        );
        let missing = nftables(NftState::Missing);
        assert_eq!(missing.status, Level::Fail);
        assert!(missing.fix[0].starts_with("apt-get install nftables"));
        let broken = nftables(NftState::Fails {
            path: "/usr/sbin/nft".into(),
            error: "Operation not supported".into(),
        });
        assert!(broken.message.contains("Operation not supported"));
        assert_eq!(broken.fix[0], "modprobe nf_tables");
    }

    #[test]
    fn tun_says_whose_access_it_checked() {
        let path = Path::new("/dev/net/tun");

        // systemd-nspawn's 0600 device: the service user is refused.
        let denied = tun(path, TunUser::Service, TunState::Denied);
        assert_eq!(denied.status, Level::Fail);
        assert!(
            denied.message.starts_with(
                "/dev/net/tun does not open for the service user vpcgate (permission denied)"
            ),
            "{}",
            denied.message
        );
        assert!(
            denied.fix[0].starts_with("systemd-tmpfiles --create vpcgate.conf  #"),
            "{:?}",
            denied.fix
        );
        assert!(
            denied.fix[1].contains(": chmod 0666 /dev/net/tun  #"),
            "{:?}",
            denied.fix
        );

        let root = tun(path, TunUser::Root, TunState::Usable);
        assert_eq!(root.status, Level::Ok);
        assert_eq!(
            root.message,
            "/dev/net/tun opens for root; there is no user vpcgate, and without the package vpcgated runs as root"
        );
        let root_denied = tun(path, TunUser::Root, TunState::Denied);
        assert_eq!(root_denied.status, Level::Fail);
        assert!(
            root_denied.fix[0].starts_with("chmod 0666 /dev/net/tun"),
            "{:?}",
            root_denied.fix
        );

        let caller = tun(path, TunUser::Caller(1000), TunState::Usable);
        assert_eq!(caller.status, Level::Ok);
        assert_eq!(
            caller.message,
            "/dev/net/tun opens for uid 1000, who runs doctor; only doctor run as root checks it for the service user vpcgate"
        );
        // Refused for an operator says nothing about the service user.
        let caller_denied = tun(path, TunUser::Caller(1000), TunState::Denied);
        assert_eq!(caller_denied.status, Level::Warn);
        assert!(
            caller_denied.fix[0].starts_with("sudo vpcgate doctor"),
            "{:?}",
            caller_denied.fix
        );

        let unchecked = tun(
            path,
            TunUser::Service,
            TunState::Unchecked(
                "cannot become uid 998 gid 998 (setuid: Operation not permitted)".into(),
            ),
        );
        assert_eq!(unchecked.status, Level::Warn);
        assert!(
            unchecked.message.starts_with(
                "cannot tell whether /dev/net/tun opens for the service user vpcgate: cannot become"
            ),
            "{}",
            unchecked.message
        );
        assert!(
            unchecked.fix[0].starts_with("runuser -u vpcgate -- sh -c ': <>/dev/net/tun'"),
            "{:?}",
            unchecked.fix
        );
    }

    #[test]
    fn host_reads_fixture_directories() {
        let root = std::env::temp_dir().join(format!("vpcgate-doctor-host-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let write = |rel: &str, text: &str| {
            let path = root.join(rel);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, text).expect("write");
        };
        write("proc/sys/net/ipv4/ip_forward", "1\n");
        write("proc/sys/net/ipv4/conf/vpc0/rp_filter", "2\n");
        write("proc/sys/net/ipv4/conf/all/rp_filter", "garbage\n");
        write("proc/net/route", ROUTE4);
        write(
            "proc/net/udp",
            "header\n 1: 00000000:CA6C 00000000:0000 07\n",
        );
        write("sys/class/net/vg0/mtu", "1420\n");
        write("sys/class/net/vpc0/address", "02:00:00:AA:BB:01\n");
        write("dev/net/tun", "");
        let host = Host {
            proc: root.join("proc"),
            sys: root.join("sys"),
            dev: root.join("dev"),
        };
        assert_eq!(host.sysctl(&["net", "ipv4", "ip_forward"]), Ok(1));
        assert_eq!(
            host.sysctl(&["net", "ipv4", "conf", "vpc0", "rp_filter"]),
            Ok(2)
        );
        assert!(host
            .sysctl(&["net", "ipv4", "conf", "all", "rp_filter"])
            .is_err_and(|e| e.contains("garbage")));
        assert!(host
            .sysctl(&["net", "ipv6", "conf", "all", "forwarding"])
            .is_err());
        assert_eq!(host.routes4().expect("routes").len(), 6);
        assert!(host.routes6().expect("no file, no routes").is_empty());
        assert_eq!(host.iface_mtu("vg0"), Some(1420));
        assert_eq!(host.iface_mtu("../vg0"), None);
        assert_eq!(host.iface_mac("vpc0").as_deref(), Some("02:00:00:aa:bb:01"));
        let (v4, v6) = host.udp_ports().expect("udp");
        assert!(v4.contains(&51820) && v6.is_empty());
        // A regular file is not the TUN clone device.
        assert_eq!(host.tun().1, TunState::NotCharDevice);
        std::fs::remove_dir_all(&root).expect("cleanup");
    }
}
