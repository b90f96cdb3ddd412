//! WireGuard devices under test: `vpcgated` or wireguard-go running in a
//! namespace, configured and inspected with `wg` over the UAPI socket, plus
//! key generation and a parser for `wg show NAME dump`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::netns::{add_addr, run, unique_ifname, wait_until, Netns, Proc};
use crate::traffic::{iface_stats, IfaceStats};

/// Where wireguard-go and vpcgated put `NAME.sock`; shared by all namespaces.
pub const UAPI_DIR: &str = "/var/run/wireguard";
/// How long a freshly started daemon gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Seconds since the Unix epoch, the unit of `latest-handshake`.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The directory holding `vpcgated`: `$VPCGATE_BIN_DIR`, else two levels
/// above this test binary (`target/<profile>/deps/x` -> `target/<profile>`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("VPCGATE_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("cannot find the test binary's path")?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .with_context(|| format!("{} has no grandparent directory", exe.display()))
}

/// Path of the `vpcgated` binary; fails with how to build it.
pub fn vpcgated_bin() -> Result<PathBuf> {
    let dir = bin_dir()?;
    let bin = dir.join("vpcgated");
    if !bin.is_file() {
        bail!(
            "vpcgated not found at {}: build it: `cargo test --workspace --release` builds it \
             (or point VPCGATE_BIN_DIR at the directory that holds it)",
            bin.display()
        );
    }
    Ok(bin)
}

/// Path of the `vpcgate` CLI, from the same directory as `vpcgated`.
pub fn vpcgate_bin() -> Result<PathBuf> {
    let dir = bin_dir()?;
    let bin = dir.join("vpcgate");
    if !bin.is_file() {
        bail!(
            "vpcgate not found at {}: build it with `cargo build --release -p vpcgate` \
             (or point VPCGATE_BIN_DIR at the directory that holds it)",
            bin.display()
        );
    }
    Ok(bin)
}

/// A WireGuard key pair in base64, as `wg genkey` / `wg pubkey` print it.
#[derive(Clone, Debug)]
pub struct KeyPair {
    pub private: String,
    pub public: String,
}

impl KeyPair {
    /// Writes the private key to `path` (mode 0600) for `wg set private-key`.
    pub fn write_private(&self, path: &Path) -> Result<()> {
        write_secret(path, &self.private)
    }
}

/// Writes a base64 secret and a newline to `path`, created with mode 0600.
fn write_secret(path: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    writeln!(f, "{secret}").with_context(|| format!("cannot write {}", path.display()))
}

/// The public key for a base64 private key, computed by `wg pubkey`.
pub fn public_key_of(private: &str) -> Result<String> {
    Ok(
        run(&["wg", "pubkey"], Some(format!("{private}\n").as_bytes()))?
            .trim()
            .to_string(),
    )
}

/// A fresh key pair from `wg genkey` and `wg pubkey`.
pub fn gen_keypair() -> Result<KeyPair> {
    let private = run(&["wg", "genkey"], None)?.trim().to_string();
    let public = public_key_of(&private)?;
    if private.len() != 44 || public.len() != 44 {
        bail!("unexpected key lengths from wg genkey/pubkey: {private:?} {public:?}");
    }
    Ok(KeyPair { private, public })
}

/// A fresh preshared key from `wg genpsk`.
pub fn gen_psk() -> Result<String> {
    let psk = run(&["wg", "genpsk"], None)?.trim().to_string();
    if psk.len() != 44 {
        bail!("unexpected preshared key from wg genpsk: {psk:?}");
    }
    Ok(psk)
}

/// `wg show NAME dump`, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgDump {
    pub private_key: String,
    pub public_key: String,
    pub listen_port: u16,
    /// `off` or the mark as printed.
    pub fwmark: String,
    pub peers: Vec<WgPeer>,
}

/// One peer line of `wg show NAME dump`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgPeer {
    pub public_key: String,
    pub preshared_key: Option<String>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<String>,
    /// Unix seconds; 0 means never.
    pub latest_handshake: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: Option<u16>,
}

impl WgDump {
    /// Parses the tab-separated output of `wg show NAME dump`: one interface
    /// line, then one line per peer.
    pub fn parse(text: &str) -> Result<WgDump> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let first = lines.next().context("empty `wg show dump` output")?;
        let f: Vec<&str> = first.split('\t').collect();
        if f.len() != 4 {
            bail!(
                "interface line of `wg show dump` has {} fields, want 4: {first:?}",
                f.len()
            );
        }
        let listen_port = f[2]
            .parse()
            .with_context(|| format!("bad listen port in {first:?}"))?;
        let mut peers = Vec::new();
        for line in lines {
            let p: Vec<&str> = line.split('\t').collect();
            if p.len() != 8 {
                bail!(
                    "peer line of `wg show dump` has {} fields, want 8: {line:?}",
                    p.len()
                );
            }
            let num = |s: &str, what: &str| -> Result<u64> {
                s.parse::<u64>()
                    .with_context(|| format!("bad {what} {s:?} in {line:?}"))
            };
            peers.push(WgPeer {
                public_key: p[0].to_string(),
                preshared_key: (p[1] != "(none)").then(|| p[1].to_string()),
                endpoint: if p[2] == "(none)" {
                    None
                } else {
                    Some(
                        p[2].parse()
                            .with_context(|| format!("bad endpoint in {line:?}"))?,
                    )
                },
                allowed_ips: if p[3] == "(none)" {
                    Vec::new()
                } else {
                    p[3].split(',').map(str::to_string).collect()
                },
                latest_handshake: num(p[4], "latest handshake")?,
                rx_bytes: num(p[5], "rx bytes")?,
                tx_bytes: num(p[6], "tx bytes")?,
                persistent_keepalive: if p[7] == "off" {
                    None
                } else {
                    Some(
                        p[7].parse()
                            .with_context(|| format!("bad keepalive in {line:?}"))?,
                    )
                },
            });
        }
        Ok(WgDump {
            private_key: f[0].to_string(),
            public_key: f[1].to_string(),
            listen_port,
            fwmark: f[3].to_string(),
            peers,
        })
    }

    pub fn peer(&self, public_key: &str) -> Option<&WgPeer> {
        self.peers.iter().find(|p| p.public_key == public_key)
    }
}

/// Options for starting `vpcgated`.
#[derive(Clone, Debug)]
pub struct VpcgatedConfig {
    pub listen_port: u16,
    /// Tunnel address in CIDR form, e.g. `100.64.0.1/24`.
    pub address: String,
    /// `None` uses a fresh directory in the namespace's scratch dir.
    pub state_dir: Option<PathBuf>,
    pub log_level: String,
    /// More flags, appended after the ones above.
    pub extra_args: Vec<String>,
    /// Extra environment for the daemon (e.g. NOTIFY_SOCKET).
    pub env: Vec<(String, String)>,
    /// A fixed interface name, to restart on the same one (and so the same
    /// UAPI and control socket paths); `None` makes a fresh name from the tag.
    pub interface: Option<String>,
    /// Leave out `--listen-port` and `--address`, so the daemon takes them
    /// (and the MTU) from `settings.json` in its state dir, as a restart by
    /// systemd does; readiness then waits for the TUN to match that file.
    pub saved_settings: bool,
}

impl VpcgatedConfig {
    pub fn new(listen_port: u16, address: &str) -> VpcgatedConfig {
        VpcgatedConfig {
            listen_port,
            address: address.to_string(),
            state_dir: None,
            log_level: "debug".to_string(),
            extra_args: Vec::new(),
            env: Vec::new(),
            interface: None,
            saved_settings: false,
        }
    }
}

/// The addresses (comma-separated) and MTU that `settings.json` in
/// `state_dir` gives the TUN.
fn saved_tun_settings(state_dir: &Path) -> Result<(String, u32)> {
    let path = state_dir.join("settings.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let file: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    // State format 1 (vpcgate 0.1.0) is the bare settings object.
    let json = file.get("settings").unwrap_or(&file);
    let addresses: Vec<&str> = json["addresses"]
        .as_array()
        .with_context(|| format!("{} has no addresses: {text}", path.display()))?
        .iter()
        .filter_map(serde_json::Value::as_str)
        .collect();
    let mtu = json["mtu"]
        .as_u64()
        .and_then(|m| u32::try_from(m).ok())
        .with_context(|| format!("{} has no mtu: {text}", path.display()))?;
    Ok((addresses.join(","), mtu))
}

/// A running WireGuard implementation in a namespace, addressed by its
/// interface name. Dropping it stops the process.
pub struct WgDev {
    ns: Netns,
    name: String,
    proc: Proc,
    state_dir: Option<PathBuf>,
    control_socket: Option<PathBuf>,
    /// The socket file a killed predecessor on the same name left behind.
    stale_socket: Option<SocketFileId>,
}

/// Tells one socket file from another at the same path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct SocketFileId {
    inode: u64,
    ctime_nsec: i64,
    ctime: i64,
}

impl SocketFileId {
    fn of(path: &Path) -> Option<SocketFileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::symlink_metadata(path).ok()?;
        Some(SocketFileId {
            inode: m.ino(),
            ctime: m.ctime(),
            ctime_nsec: m.ctime_nsec(),
        })
    }
}

impl WgDev {
    /// Starts Debian's wireguard-go in the foreground and waits until `wg`
    /// can talk to it. The device has no key, port, address or peers yet;
    /// see [`WgDev::configure`].
    pub fn wireguard_go(ns: &Netns, tag: &str) -> Result<WgDev> {
        let name = unique_ifname(tag);
        let proc = ns.spawn(
            &format!("wireguard-go-{name}"),
            &["wireguard-go", "-f", &name],
            &[("LOG_LEVEL", "verbose"), ("WG_PROCESS_FOREGROUND", "1")],
        )?;
        let mut dev = WgDev {
            ns: ns.clone(),
            name,
            proc,
            state_dir: None,
            control_socket: None,
            stale_socket: None,
        };
        dev.wait_ready()?;
        Ok(dev)
    }

    /// Starts `vpcgated IFNAME` in the foreground: a plain WireGuard
    /// interface, as wg-quick starts it, and waits until `wg` can talk to
    /// it. Like [`WgDev::wireguard_go`], it has no key, address or peers
    /// yet; [`WgDev::configure`] sets them with `wg` and `ip`.
    pub fn vpcgated_plain(ns: &Netns, tag: &str) -> Result<WgDev> {
        let bin = vpcgated_bin()?.to_string_lossy().into_owned();
        let name = unique_ifname(tag);
        let state_dir = ns.dir().join(format!("state-{name}"));
        let control_socket = ns.dir().join(format!("{name}.ctl"));
        let state_s = state_dir.to_string_lossy().into_owned();
        let sock_s = control_socket.to_string_lossy().into_owned();
        let proc = ns.spawn(
            &format!("vpcgated-{name}"),
            &[
                &bin,
                "--foreground",
                "--state-dir",
                &state_s,
                "--socket",
                &sock_s,
                "--log-level",
                "debug",
                &name,
            ],
            &[("RUST_BACKTRACE", "1")],
        )?;
        let mut dev = WgDev {
            ns: ns.clone(),
            name,
            proc,
            state_dir: Some(state_dir),
            control_socket: Some(control_socket),
            stale_socket: None,
        };
        dev.wait_ready()?;
        Ok(dev)
    }

    /// Starts `vpcgated` and waits until its UAPI socket answers `wg show`
    /// and its TUN is up with the configured address and MTU 1420 (with
    /// [`VpcgatedConfig::saved_settings`], with the saved ones).
    pub fn vpcgated(ns: &Netns, tag: &str, cfg: &VpcgatedConfig) -> Result<WgDev> {
        let mut dev = WgDev::vpcgated_unready(ns, tag, cfg)?;
        dev.wait_ready()?;
        if cfg.saved_settings {
            let state_dir = dev.state_dir.clone().context("vpcgated has a state dir")?;
            let (addresses, mtu) = saved_tun_settings(&state_dir)?;
            dev.wait_tun_configured(&addresses, mtu)?;
        } else {
            dev.wait_tun_configured(&cfg.address, 1420)?;
        }
        Ok(dev)
    }

    /// Starts `vpcgated` and returns at once, without waiting for it to be
    /// ready (e.g. to kill it while it starts).
    pub fn vpcgated_unready(ns: &Netns, tag: &str, cfg: &VpcgatedConfig) -> Result<WgDev> {
        let bin = vpcgated_bin()?;
        let name = cfg.interface.clone().unwrap_or_else(|| unique_ifname(tag));
        let state_dir = match &cfg.state_dir {
            Some(d) => d.clone(),
            None => ns.dir().join(format!("state-{name}")),
        };
        let control_socket = ns.dir().join(format!("{name}.ctl"));
        let port = cfg.listen_port.to_string();
        let bin_s = bin.to_string_lossy().into_owned();
        let state_s = state_dir.to_string_lossy().into_owned();
        let sock_s = control_socket.to_string_lossy().into_owned();
        let mut argv = vec![
            bin_s.as_str(),
            "--interface",
            &name,
            "--state-dir",
            &state_s,
            "--socket",
            &sock_s,
            "--log-level",
            &cfg.log_level,
            // The namespace's own file (see `Netns::new`), never the
            // host's systemd-resolved list.
            "--resolv-conf",
            "/etc/resolv.conf",
        ];
        if !cfg.saved_settings {
            argv.extend([
                "--listen-port",
                port.as_str(),
                "--address",
                cfg.address.as_str(),
            ]);
        }
        argv.extend(cfg.extra_args.iter().map(String::as_str));
        let mut env = vec![("RUST_BACKTRACE", "1")];
        env.extend(cfg.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let stale_socket = SocketFileId::of(&Path::new(UAPI_DIR).join(format!("{name}.sock")));
        let proc = ns.spawn(&format!("vpcgated-{name}"), &argv, &env)?;
        Ok(WgDev {
            ns: ns.clone(),
            name,
            proc,
            state_dir: Some(state_dir),
            control_socket: Some(control_socket),
            stale_socket,
        })
    }

    /// Ready means: the process is alive, the UAPI socket exists and
    /// `wg show NAME` succeeds. A socket file left by a killed predecessor
    /// is not probed: `wg` unlinks a socket nobody answers on, and doing so
    /// while the daemon replaces it could unlink the daemon's new one.
    fn wait_ready(&mut self) -> Result<()> {
        let sock = self.uapi_socket();
        let what = format!(
            "{} to serve {} (`wg show {}` succeeding in {})",
            self.proc.label(),
            sock.display(),
            self.name,
            self.ns.name()
        );
        let ns = self.ns.clone();
        let name = self.name.clone();
        let proc = &mut self.proc;
        let stale = self.stale_socket;
        let res = wait_until(READY_TIMEOUT, &what, || {
            proc.check_running()?;
            match SocketFileId::of(&sock) {
                None => return Ok(false),
                Some(id) if Some(id) == stale => return Ok(false),
                Some(_) => {}
            }
            Ok(ns.exec_raw(&["wg", "show", &name])?.status.success())
        });
        self.with_log(res)
    }

    /// Adds the process log to a timeout; an early exit already quotes it.
    fn with_log(&mut self, res: Result<()>) -> Result<()> {
        match res {
            Err(e) if self.proc.try_status()?.is_none() => Err(e.context(format!(
                "{} log so far:\n{}",
                self.proc.label(),
                self.proc.log_tail(8 * 1024)
            ))),
            other => other,
        }
    }

    fn wait_tun_configured(&mut self, address: &str, mtu: u32) -> Result<()> {
        let what = format!(
            "TUN {} in {} to be UP with {address} and mtu {mtu}",
            self.name,
            self.ns.name()
        );
        let ns = self.ns.clone();
        let name = self.name.clone();
        let want_mtu = format!(" mtu {mtu} ");
        // `--address` may list one IPv4 and one IPv6 address, comma-separated.
        let want_addrs: Vec<String> = address.split(',').map(|a| format!(" {a} ")).collect();
        let proc = &mut self.proc;
        let mut last = String::new();
        let res = wait_until(Duration::from_secs(10), &what, || {
            proc.check_running()?;
            let link = ns.exec_raw(&["ip", "-o", "link", "show", "dev", &name])?;
            let addrs = ns.exec_raw(&["ip", "-o", "addr", "show", "dev", &name])?;
            let link = String::from_utf8_lossy(&link.stdout).into_owned();
            let addrs = String::from_utf8_lossy(&addrs.stdout).into_owned();
            last = format!("{link}{addrs}");
            let up = link
                .split_once('<')
                .and_then(|(_, rest)| rest.split_once('>'))
                .is_some_and(|(flags, _)| flags.split(',').any(|f| f == "UP"));
            Ok(up
                && link.contains(&want_mtu)
                && want_addrs.iter().all(|a| addrs.contains(a.as_str())))
        })
        .with_context(|| format!("last seen: {last:?}"));
        self.with_log(res)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    pub fn process(&mut self) -> &mut Proc {
        &mut self.proc
    }

    pub fn uapi_socket(&self) -> PathBuf {
        Path::new(UAPI_DIR).join(format!("{}.sock", self.name))
    }

    /// `--state-dir` (vpcgated only).
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
    }

    /// `--socket` (vpcgated only).
    pub fn control_socket(&self) -> Option<&Path> {
        self.control_socket.as_deref()
    }

    /// Runs `wg ARGS` in the device's namespace.
    pub fn wg(&self, args: &[&str]) -> Result<String> {
        let mut argv = vec!["wg"];
        argv.extend_from_slice(args);
        self.ns.exec(&argv)
    }

    /// Runs `wg set NAME ARGS`.
    pub fn set(&self, args: &[&str]) -> Result<()> {
        let mut argv = vec!["set", self.name.as_str()];
        argv.extend_from_slice(args);
        self.wg(&argv).map(drop)
    }

    /// Sets the private key and listen port, adds `addrs` (CIDR) to the
    /// interface, and brings it up with MTU 1420. For wireguard-go, which
    /// starts blank; vpcgated does all of this itself.
    pub fn configure(&self, key: &KeyPair, listen_port: u16, addrs: &[&str]) -> Result<()> {
        let key_path = self.ns.dir().join(format!("{}.key", self.name));
        key.write_private(&key_path)?;
        let key_s = key_path.to_string_lossy().into_owned();
        let port = listen_port.to_string();
        self.set(&["private-key", &key_s, "listen-port", &port])?;
        for addr in addrs {
            self.add_addr(addr)?;
        }
        self.ns
            .ip(&["link", "set", &self.name, "mtu", "1420", "up"])
            .map(drop)
    }

    /// `ip addr add ADDR dev NAME` (IPv6 without DAD).
    pub fn add_addr(&self, addr: &str) -> Result<()> {
        add_addr(&self.ns, &self.name, addr)
    }

    /// Adds or updates a peer; `allowed_ips` replaces its list.
    pub fn set_peer(
        &self,
        public_key: &str,
        allowed_ips: &[&str],
        endpoint: Option<SocketAddr>,
    ) -> Result<()> {
        let ips = allowed_ips.join(",");
        let mut args = vec!["peer", public_key, "allowed-ips", ips.as_str()];
        let ep = endpoint.map(|e| e.to_string());
        if let Some(ep) = &ep {
            args.push("endpoint");
            args.push(ep);
        }
        self.set(&args)
    }

    /// Writes a base64 secret (private or preshared key) to a 0600 file in
    /// the namespace's scratch directory, for `wg set ... private-key FILE`.
    pub fn secret_file(&self, label: &str, secret: &str) -> Result<String> {
        let path = self.ns.dir().join(format!("{}-{label}.key", self.name));
        write_secret(&path, secret)?;
        Ok(path.to_string_lossy().into_owned())
    }

    /// `wg set NAME private-key FILE`.
    pub fn set_private_key(&self, private: &str) -> Result<()> {
        let file = self.secret_file("private", private)?;
        self.set(&["private-key", &file])
    }

    /// `wg set NAME peer KEY preshared-key FILE`.
    pub fn set_preshared_key(&self, public_key: &str, psk: &str) -> Result<()> {
        let file = self.secret_file("psk", psk)?;
        self.set(&["peer", public_key, "preshared-key", &file])
    }

    /// `wg setconf NAME FILE` with `conf` as the file.
    pub fn setconf(&self, conf: &str) -> Result<()> {
        let path = self.ns.dir().join(format!("{}-setconf.conf", self.name));
        std::fs::write(&path, conf).with_context(|| format!("cannot write {}", path.display()))?;
        self.wg(&["setconf", &self.name, &path.to_string_lossy()])
            .map(drop)
    }

    /// `wg show NAME FIELD` (e.g. `endpoints`, `peers`, `private-key`),
    /// with the trailing newline removed.
    pub fn show_field(&self, field: &str) -> Result<String> {
        Ok(self
            .wg(&["show", &self.name, field])?
            .trim_end_matches('\n')
            .to_string())
    }

    /// `wg show NAME allowed-ips`, parsed: each peer's key and prefixes, in
    /// the order listed; a peer with none lists `(none)`, returned as empty.
    pub fn allowed_ips(&self) -> Result<Vec<(String, Vec<String>)>> {
        let text = self.wg(&["show", &self.name, "allowed-ips"])?;
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|line| {
                let (key, ips) = line
                    .split_once('\t')
                    .with_context(|| format!("no tab in `wg show allowed-ips` line {line:.80?}"))?;
                let ips = match ips {
                    "(none)" => Vec::new(),
                    _ => ips.split(' ').map(str::to_string).collect(),
                };
                Ok((key.to_string(), ips))
            })
            .collect()
    }

    pub fn remove_peer(&self, public_key: &str) -> Result<()> {
        self.set(&["peer", public_key, "remove"])
    }

    /// `wg show NAME public-key`.
    pub fn public_key(&self) -> Result<String> {
        Ok(self
            .wg(&["show", &self.name, "public-key"])?
            .trim()
            .to_string())
    }

    /// `wg show NAME dump`, parsed.
    pub fn dump(&self) -> Result<WgDump> {
        let text = self.wg(&["show", &self.name, "dump"])?;
        WgDump::parse(&text).with_context(|| format!("parsing `wg show {} dump`", self.name))
    }

    /// The peer's line of the dump; fails if the peer is not listed.
    pub fn peer(&self, public_key: &str) -> Result<WgPeer> {
        let dump = self.dump()?;
        match dump.peer(public_key) {
            Some(p) => Ok(p.clone()),
            None => bail!(
                "peer {public_key} not listed by `wg show {} dump`: {dump:?}",
                self.name
            ),
        }
    }

    /// Polls the peer's dump line until `pred` holds (counters may be
    /// published a moment after the traffic that moved them); the error
    /// shows the last line seen.
    pub fn wait_peer(
        &self,
        public_key: &str,
        timeout: Duration,
        what: &str,
        mut pred: impl FnMut(&WgPeer) -> bool,
    ) -> Result<WgPeer> {
        let mut last = None;
        let res = wait_until(timeout, what, || {
            let p = self.peer(public_key)?;
            let ok = pred(&p);
            last = Some(p);
            Ok(ok)
        });
        match (res, last) {
            (Ok(()), Some(p)) => Ok(p),
            (Err(e), Some(p)) => Err(e.context(format!("last seen on {}: {p:?}", self.name))),
            (Err(e), None) => Err(e),
            (Ok(()), None) => bail!("peer {public_key} not read"),
        }
    }

    /// `wg show NAME`, the human-readable form.
    pub fn show(&self) -> Result<String> {
        self.wg(&["show", &self.name])
    }

    /// Packet counters of the interface.
    pub fn stats(&self) -> Result<IfaceStats> {
        iface_stats(&self.ns, &self.name)
    }

    /// Fails with the log if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.proc.check_running()
    }

    /// The last `max` bytes of the process's log.
    pub fn log_tail(&self, max: u64) -> String {
        self.proc.log_tail(max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = "cGsAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\tcHViAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\t51820\toff\n\
        cGVlcjEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\t(none)\t198.18.0.2:51821\t100.64.0.2/32,fd00:64::2/128\t1700000000\t1234\t5678\toff\n\
        cGVlcjIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\t(none)\t[fd00:18::2]:51821\t(none)\t0\t0\t0\t25\n";

    #[test]
    fn parses_dump() {
        let d = WgDump::parse(DUMP).expect("dump parses");
        assert_eq!(d.listen_port, 51820);
        assert_eq!(d.fwmark, "off");
        assert_eq!(d.peers.len(), 2);
        let p = &d.peers[0];
        assert_eq!(p.endpoint, Some("198.18.0.2:51821".parse().expect("addr")));
        assert_eq!(p.allowed_ips, ["100.64.0.2/32", "fd00:64::2/128"]);
        assert_eq!(
            (p.latest_handshake, p.rx_bytes, p.tx_bytes),
            (1_700_000_000, 1234, 5678)
        );
        assert_eq!(p.persistent_keepalive, None);
        let q = &d.peers[1];
        assert_eq!(
            q.endpoint,
            Some("[fd00:18::2]:51821".parse().expect("addr"))
        );
        assert!(q.allowed_ips.is_empty());
        assert_eq!(q.persistent_keepalive, Some(25));
        assert!(d.peer(&q.public_key).is_some());
    }

    #[test]
    fn rejects_short_lines() {
        assert!(WgDump::parse("").is_err());
        assert!(WgDump::parse("a\tb\t1\n").is_err());
        assert!(WgDump::parse("a\tb\t1\toff\nx\ty\n").is_err());
    }
}
