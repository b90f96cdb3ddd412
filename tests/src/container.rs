//! A Debian booted with systemd in a systemd-nspawn container, for testing
//! the package where it runs: installed with dpkg, started by systemd as
//! the hardened service, and driven with `systemctl` and `vpcgate`.
//!
//! The root file system is debootstrapped once from the mirror in this
//! machine's own apt sources and cached under `target/nspawn/`; every
//! [`Container`] boots a copy of it with `--private-network`, so nothing it
//! does reaches the host's network. Links into it are veths whose other end
//! is in a test namespace. Dropping a [`Container`] powers it off and
//! deletes its copy, also when the test failed; a test process killed
//! outright takes its containers with it (the parent-death signal), and the
//! copies it left are swept by the next run.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::netns::{require_root, wait_until, Netns};

/// What the cached system has besides debootstrap's minimal base: systemd as
/// init, and what the package and the tests use inside it.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "nftables",
    "iproute2",
    "iputils-ping",
    "procps",
];
/// How long a boot may take to reach multi-user. It protects against a
/// container that never finishes booting; a boot here takes about 3 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a clean poweroff may take before the container is killed.
const POWEROFF_TIMEOUT: Duration = Duration::from_secs(60);

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// `target/nspawn` of this workspace.
pub fn nspawn_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target"));
    target.join("nspawn")
}

/// Holds an exclusive `flock` on a file until dropped.
pub struct FileLock(#[allow(dead_code)] nix::fcntl::Flock<File>);

/// Takes an exclusive lock on `path` (created if needed), waiting for it, so
/// that test processes running at the same time do not build the same
/// cached thing twice.
pub fn lock_file(path: &Path) -> Result<FileLock> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map(FileLock)
        .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", path.display()))
}

/// One `deb` source of this machine's apt configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptSource {
    pub uri: String,
    pub suites: Vec<String>,
    pub components: Vec<String>,
}

/// The `deb` sources in one-line (`sources.list`) format.
pub fn parse_one_line_sources(text: &str) -> Vec<AptSource> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            if words.next()? != "deb" {
                return None;
            }
            let mut rest: Vec<&str> = words.collect();
            // Options in brackets: `deb [arch=amd64 signed-by=...] URI ...`.
            if rest.first()?.starts_with('[') {
                let end = rest.iter().position(|w| w.ends_with(']'))?;
                rest.drain(..=end);
            }
            let (uri, suite) = (rest.first()?, rest.get(1)?);
            Some(AptSource {
                uri: uri.to_string(),
                suites: vec![suite.to_string()],
                components: rest[2..].iter().map(|c| c.to_string()).collect(),
            })
        })
        .collect()
}

/// The `deb` sources in deb822 (`.sources`) format.
pub fn parse_deb822_sources(text: &str) -> Vec<AptSource> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields = std::collections::HashMap::new();
        for line in stanza.lines() {
            if line.starts_with('#') || line.starts_with(char::is_whitespace) {
                continue;
            }
            if let Some((key, value)) = line.split_once(':') {
                fields.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
        let words = |key: &str| -> Vec<String> {
            fields
                .get(key)
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_default()
        };
        if !words("types").iter().any(|t| t == "deb")
            || fields.get("enabled").is_some_and(|e| e == "no")
        {
            continue;
        }
        for uri in words("uris") {
            out.push(AptSource {
                uri,
                suites: words("suites"),
                components: words("components"),
            });
        }
    }
    out
}

/// This machine's release codename and the mirror its apt takes that
/// release's `main` from: what debootstrap is given, so that no registry
/// host is written into the repository.
pub fn host_mirror() -> Result<(String, String)> {
    let os_release =
        fs::read_to_string("/etc/os-release").context("cannot read /etc/os-release")?;
    let codename = os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .context("/etc/os-release names no VERSION_CODENAME")?;
    let mut sources = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        sources.extend(parse_one_line_sources(&text));
    }
    let mut files: Vec<PathBuf> = fs::read_dir("/etc/apt/sources.list.d")
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    for file in files {
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        match file.extension().and_then(|e| e.to_str()) {
            Some("list") => sources.extend(parse_one_line_sources(&text)),
            Some("sources") => sources.extend(parse_deb822_sources(&text)),
            _ => {}
        }
    }
    let source = sources
        .iter()
        .find(|s| {
            s.suites.contains(&codename)
                && s.components.iter().any(|c| c == "main")
                && (s.uri.starts_with("http://") || s.uri.starts_with("https://"))
        })
        .with_context(|| {
            format!(
                "no apt source of this machine serves {codename} main over http(s): {sources:?}"
            )
        })?;
    Ok((codename, source.uri.trim_end_matches('/').to_string()))
}

/// The cached root file system, debootstrapping it first if there is none.
pub fn rootfs() -> Result<PathBuf> {
    require_root();
    let (suite, mirror) = host_mirror()?;
    let dir = nspawn_dir();
    let _lock = lock_file(&dir.join("rootfs.lock"))?;
    // A new package list is a new cache entry.
    let list = PACKAGES.join(",");
    let hash = list.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let name = format!("rootfs-{suite}-{hash:08x}");
    let root = dir.join(&name);
    if root.join("usr/lib/systemd/systemd").exists() || root.join("lib/systemd/systemd").exists() {
        return Ok(root);
    }
    let tmp = dir.join(format!("{name}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    let log = dir.join(format!("{name}.log"));
    let started = Instant::now();
    let log_file = File::create(&log)?;
    let status = Command::new("debootstrap")
        .args(["--variant=minbase", &format!("--include={list}")])
        .arg(&suite)
        .arg(&tmp)
        .arg(&mirror)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .context("cannot run debootstrap (apt-get install debootstrap)")?;
    if !status.success() {
        let tail = fs::read_to_string(&log).unwrap_or_default();
        let _ = fs::remove_dir_all(&tmp);
        bail!(
            "debootstrap {suite} from {mirror} failed ({status}); the end of {}:\n{}",
            log.display(),
            crate::tail_lines(&tail, 30)
        );
    }
    fs::rename(&tmp, &root).with_context(|| format!("cannot rename to {}", root.display()))?;
    eprintln!(
        "debootstrapped {suite} from {mirror} into {} in {:.0} s",
        root.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(root)
}

/// Removes the copies left by test processes that no longer run.
fn sweep_stale_copies(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("run-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
            != Err(nix::errno::Errno::ESRCH);
        if !alive {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// A booted container.
pub struct Container {
    name: String,
    dir: PathBuf,
    log: PathBuf,
    nspawn: Child,
    leader: i32,
}

impl Container {
    /// Boots a fresh copy of the cached system, waiting until systemd has
    /// reached multi-user.
    pub fn boot(tag: &str) -> Result<Container> {
        let rootfs = rootfs()?;
        let parent = nspawn_dir();
        sweep_stale_copies(&parent);
        let name = format!(
            "vgt{}n{}{tag}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = parent.join(format!("run-{}-{name}", std::process::id()));
        let copy = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&rootfs)
            .arg(&dir)
            .status()
            .context("cannot run cp")?;
        if !copy.success() {
            let _ = fs::remove_dir_all(&dir);
            bail!("cannot copy {} to {}", rootfs.display(), dir.display());
        }
        fs::write(dir.join("etc/hostname"), format!("{name}\n"))?;
        let log = parent.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let mut cmd = Command::new("systemd-nspawn");
        cmd.arg("-D")
            .arg(&dir)
            .args(["-M", &name, "--boot", "--private-network"])
            // The host may have no systemd (a CI VM's init, say): no machine
            // registration and no scope unit, which need its bus.
            .args(["--register=no", "--keep-unit", "--console=read-only"])
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: prctl is async-signal-safe; it only sets a flag on the
        // child.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                // SIGTERM makes nspawn power the container off cleanly.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let nspawn = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                bail!("cannot run systemd-nspawn (apt-get install systemd-container): {e}");
            }
        };
        let mut container = Container {
            name,
            dir,
            log,
            nspawn,
            leader: 0,
        };
        container.leader = container.find_leader()?;
        let started = Instant::now();
        wait_until(BOOT_TIMEOUT, "the container to boot", || {
            let out = container.exec_raw(&["systemctl", "is-system-running"])?;
            let state = String::from_utf8_lossy(&out.stdout).trim().to_string();
            match state.as_str() {
                "running" => Ok(true),
                "degraded" => bail!(
                    "the container booted degraded: {}",
                    container
                        .sh("systemctl --failed --no-legend")
                        .unwrap_or_default()
                ),
                _ => Ok(false),
            }
        })
        .with_context(|| {
            format!(
                "booting {}; its console:\n{}",
                container.name,
                container.console_tail()
            )
        })?;
        eprintln!(
            "container {} booted in {:.1} s",
            container.name,
            started.elapsed().as_secs_f64()
        );
        Ok(container)
    }

    /// The container's init, as this machine sees it: the descendant of
    /// nspawn that is pid 1 in its own pid namespace.
    fn find_leader(&mut self) -> Result<i32> {
        let nspawn = i32::try_from(self.nspawn.id()).context("pid")?;
        let mut found = None;
        wait_until(Duration::from_secs(60), "the container's init", || {
            if let Some(status) = self.nspawn.try_wait()? {
                bail!("systemd-nspawn exited ({status}):\n{}", self.console_tail());
            }
            found = descendants(nspawn).into_iter().find(|&pid| {
                fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|s| {
                        s.lines()
                            .find_map(|l| l.strip_prefix("NSpid:"))
                            .map(|v| v.split_whitespace().last() == Some("1"))
                    })
                    .unwrap_or(false)
            });
            Ok(found.is_some())
        })?;
        found.context("no leader")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pid of the container's init on this machine, e.g. for
    /// `ip link set DEV netns PID`.
    pub fn leader(&self) -> i32 {
        self.leader
    }

    /// The container's root directory as this machine sees it. Files
    /// written under it appear in the container, except under the
    /// container's own mounts (/tmp, /run, /dev, /proc, /sys).
    pub fn root(&self) -> &Path {
        &self.dir
    }

    /// Runs a command inside the container, in every one of its namespaces,
    /// and returns its output whatever its status.
    pub fn exec_raw(&self, args: &[&str]) -> Result<Output> {
        let leader = self.leader.to_string();
        Command::new("nsenter")
            .args(["-t", &leader, "-m", "-u", "-i", "-n", "-p", "-C", "--"])
            .args(args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LC_ALL", "C")
            .env("SYSTEMD_PAGER", "")
            .env("SYSTEMD_COLORS", "0")
            .env("TERM", "dumb")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run nsenter for `{}`", args.join(" ")))
    }

    /// Runs a command inside the container; its stdout, or an error with
    /// its status and output.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let out = self.exec_raw(args)?;
        if !out.status.success() {
            bail!(
                "`{}` in {} failed ({}): {}{}",
                args.join(" "),
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `sh -c SCRIPT` inside the container.
    pub fn sh(&self, script: &str) -> Result<String> {
        self.exec(&["sh", "-c", script])
    }

    /// Copies a file of this machine to `inside` (an absolute path in the
    /// container that is not under one of its own mounts).
    pub fn put(&self, from: &Path, inside: &str) -> Result<()> {
        let to = self.dir.join(inside.trim_start_matches('/'));
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::copy(from, &to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        Ok(())
    }

    /// The journal of one unit, as `journalctl -u UNIT` prints it.
    pub fn journal(&self, unit: &str) -> String {
        match self.exec_raw(&[
            "journalctl",
            "--no-pager",
            "-o",
            "short-monotonic",
            "-u",
            unit,
        ]) {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(e) => format!("(cannot read the journal: {e})"),
        }
    }

    /// One property of a unit, as `systemctl show -p NAME --value` prints it.
    pub fn unit_property(&self, unit: &str, name: &str) -> Result<String> {
        Ok(self
            .exec(&["systemctl", "show", "-p", name, "--value", unit])?
            .trim()
            .to_string())
    }

    /// Connects the container to `ns` with a veth pair: `inside` (an
    /// interface name) gets `inside_addr`, and the end in `ns` gets
    /// `outside_addr`. Returns the name of the end in `ns`.
    pub fn veth(
        &self,
        ns: &Netns,
        inside: &str,
        inside_addr: &str,
        outside_addr: &str,
    ) -> Result<String> {
        let outside = crate::netns::unique_ifname("c");
        let leader = self.leader.to_string();
        ns.ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", inside, "netns", &leader,
        ])?;
        ns.ip(&["addr", "add", outside_addr, "dev", &outside])?;
        ns.ip(&["link", "set", &outside, "up"])?;
        self.exec(&["ip", "addr", "add", inside_addr, "dev", inside])?;
        self.exec(&["ip", "link", "set", inside, "up"])?;
        Ok(outside)
    }

    fn console_tail(&self) -> String {
        crate::tail_lines(&fs::read_to_string(&self.log).unwrap_or_default(), 40)
    }

    /// Powers the container off (killing it if that does not finish) and
    /// deletes its copy of the system.
    fn shutdown(&mut self) -> Result<()> {
        if self.nspawn.try_wait()?.is_none() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(self.nspawn.id())?);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + POWEROFF_TIMEOUT;
            while self.nspawn.try_wait()?.is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(100));
            }
            if self.nspawn.try_wait()?.is_none() {
                eprintln!("container {} did not power off; killing it", self.name);
                if self.leader > 0 {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(self.leader),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = self.nspawn.kill();
                let _ = self.nspawn.wait();
            }
        }
        let _ = fs::remove_dir_all(Path::new("/run/systemd/nspawn/propagate").join(&self.name));
        fs::remove_dir_all(&self.dir)
            .with_context(|| format!("cannot remove {}", self.dir.display()))?;
        let _ = fs::remove_file(&self.log);
        Ok(())
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "----- console of container {} -----\n{}\n----- end -----",
                self.name,
                self.console_tail()
            );
        }
        if let Err(e) = self.shutdown() {
            eprintln!("cannot clean up container {}: {e:#}", self.name);
        }
    }
}

/// Every descendant of `pid`, from /proc.
fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Ok(children) = fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                out.push(child);
                queue.push(child);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_sources_are_read() {
        let text = "# comment\n\
            deb http://deb.debian.org/debian bookworm main contrib\n\
            deb-src http://deb.debian.org/debian bookworm main\n\
            deb [arch=amd64 signed-by=/k.gpg] https://example.invalid/x bookworm-updates main # c\n";
        let sources = parse_one_line_sources(text);
        assert_eq!(
            sources,
            [
                AptSource {
                    uri: "http://deb.debian.org/debian".into(),
                    suites: vec!["bookworm".into()],
                    components: vec!["main".into(), "contrib".into()],
                },
                AptSource {
                    uri: "https://example.invalid/x".into(),
                    suites: vec!["bookworm-updates".into()],
                    components: vec!["main".into()],
                },
            ]
        );
    }

    #[test]
    fn deb822_sources_are_read() {
        let text = "Types: deb\n# http://snapshot.example.invalid/\nURIs: http://a.invalid/debian\n\
            Suites: bookworm bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n\n\
            Types: deb-src\nURIs: http://b.invalid/debian\nSuites: bookworm\nComponents: main\n\n\
            Types: deb\nURIs: http://c.invalid/debian\nSuites: bookworm\nComponents: main\nEnabled: no\n";
        let sources = parse_deb822_sources(text);
        assert_eq!(
            sources,
            [AptSource {
                uri: "http://a.invalid/debian".into(),
                suites: vec!["bookworm".into(), "bookworm-updates".into()],
                components: vec!["main".into()],
            }]
        );
    }
}
