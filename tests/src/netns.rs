//! Network namespaces, the processes that run inside them, veth links, and
//! the unique naming that lets tests run in parallel threads.
//!
//! A [`Netns`] is a cheap clone of a shared handle; the namespace, its
//! scratch directory and anything still running in it go away when the last
//! clone is dropped. A [`Proc`] is a child process whose output goes to a log
//! file; dropping it stops the process and prints the tail of that log, which
//! the test harness shows only when the test fails.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sched::CloneFlags;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Prefix of every namespace this harness creates; used to sweep namespaces
/// left behind by a test process that was killed before it could clean up.
const NS_PREFIX: &str = "vge2e-";
/// Root of the per-namespace scratch directories.
const SCRATCH_ROOT: &str = "/tmp/vpcgate-e2e";
/// Linux limits interface names to IFNAMSIZ - 1 bytes.
const IFNAMSIZ_MAX: usize = 15;
/// How much of a process log is printed when its [`Proc`] is dropped.
const LOG_TAIL_BYTES: u64 = 48 * 1024;

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SWEEP: Once = Once::new();

/// Panics unless the effective uid is 0. Never skip: a test that cannot run
/// must not look like a test that passed.
#[track_caller]
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "must run as root: these tests create network namespaces \
             (run `sudo -E cargo test --workspace --release`)"
        );
    }
}

fn next_id() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    out.into_iter().map(char::from).collect()
}

/// An interface name unique across every test in every concurrently running
/// test process: `vg` + pid + counter (both base 36) + `tag`.
///
/// Uniqueness matters beyond the namespace because the UAPI socket directory
/// `/var/run/wireguard/` is shared by all namespaces.
pub fn unique_ifname(tag: &str) -> String {
    let name = format!(
        "vg{}{}{}",
        base36(u64::from(std::process::id())),
        base36(u64::from(next_id())),
        tag
    );
    assert!(
        name.len() <= IFNAMSIZ_MAX,
        "interface name {name:?} is longer than {IFNAMSIZ_MAX} bytes; use a shorter tag"
    );
    name
}

/// Polls `probe` every 100 ms until it returns `Ok(true)` or `timeout`
/// passes. An `Err` from `probe` is fatal and returned at once (e.g. the
/// process being waited for has exited); a condition not met yet is
/// `Ok(false)`.
pub fn wait_until<F>(timeout: Duration, what: &str, mut probe: F) -> Result<()>
where
    F: FnMut() -> Result<bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if probe().with_context(|| format!("while waiting for {what}"))? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a command (in whatever namespace the caller is in) and returns its
/// output whatever the exit status.
pub(crate) fn run_raw(argv: &[&str], stdin: Option<&[u8]>) -> Result<Output> {
    let (prog, args) = argv.split_first().context("empty command line")?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{}`", argv.join(" ")))?;
    if let Some(input) = stdin {
        use std::io::Write;
        let mut pipe = child.stdin.take().context("child stdin missing")?;
        pipe.write_all(input)
            .with_context(|| format!("cannot write stdin of `{}`", argv.join(" ")))?;
    }
    child
        .wait_with_output()
        .with_context(|| format!("cannot wait for `{}`", argv.join(" ")))
}

/// Runs a command and returns its stdout, failing with the command line,
/// status and stderr if it does not exit 0.
pub(crate) fn run(argv: &[&str], stdin: Option<&[u8]>) -> Result<String> {
    let out = run_raw(argv, stdin)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}{}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}`: non-UTF-8 output", argv.join(" ")))
}

struct NetnsInner {
    name: String,
    dir: PathBuf,
}

/// A network namespace created for one test, with a scratch directory for
/// logs, keys, state and sockets.
#[derive(Clone)]
pub struct Netns {
    inner: Arc<NetnsInner>,
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.inner.name)
    }
}

impl Netns {
    /// Creates a namespace named `vge2e-PID-N-ROLE` with loopback up.
    pub fn new(role: &str) -> Result<Netns> {
        require_root();
        SWEEP.call_once(sweep_stale_namespaces);
        let name = format!("{NS_PREFIX}{}-{}-{role}", std::process::id(), next_id());
        let dir = Path::new(SCRATCH_ROOT).join(&name);
        fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create scratch dir {}", dir.display()))?;
        run(&["ip", "netns", "add", &name], None)?;
        // From here on Drop deletes the namespace and the directory.
        let ns = Netns {
            inner: Arc::new(NetnsInner { name, dir }),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        // Its own resolv.conf, which `ip netns exec` mounts over
        // /etc/resolv.conf, so nothing in it can reach the host's resolver.
        ns.set_resolv_conf(NO_RESOLVER)?;
        Ok(ns)
    }

    /// Replaces the namespace's /etc/resolv.conf (as `ip netns exec` shows
    /// it to what runs there) with `text`, as resolvconf or DHCP would.
    /// Only processes started afterwards see the change if it is the first.
    pub fn set_resolv_conf(&self, text: &str) -> Result<()> {
        let dir = Path::new(NETNS_ETC).join(self.name());
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("resolv.conf");
        // Written in place, not replaced: the file is bind-mounted into
        // running processes' view, and a rename would leave them the old one.
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    }

    /// The namespace's resolv.conf, as [`Netns::set_resolv_conf`] left it.
    pub fn resolv_conf(&self) -> Result<String> {
        let path = Path::new(NETNS_ETC).join(self.name()).join("resolv.conf");
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Scratch directory removed together with the namespace.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    fn exec_argv<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut argv = vec!["ip", "netns", "exec", self.name()];
        argv.extend_from_slice(args);
        argv
    }

    /// Runs `args` inside the namespace; returns stdout, or an error carrying
    /// the command, the exit status and stderr.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        run(&self.exec_argv(args), None)
    }

    /// Like [`Netns::exec`] but returns the output whatever the exit status.
    pub fn exec_raw(&self, args: &[&str]) -> Result<Output> {
        run_raw(&self.exec_argv(args), None)
    }

    /// Like [`Netns::exec`] with `stdin` fed to the command.
    pub fn exec_stdin(&self, args: &[&str], stdin: &[u8]) -> Result<String> {
        run(&self.exec_argv(args), Some(stdin))
    }

    /// Runs `ip -n NS args...`.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut argv = vec!["ip", "-n", self.name()];
        argv.extend_from_slice(args);
        run(&argv, None)
    }

    /// Starts `args` inside the namespace with stdout and stderr going to
    /// `<scratch>/<label>.log`. `env` is added to the inherited environment.
    pub fn spawn(&self, label: &str, args: &[&str], env: &[(&str, &str)]) -> Result<Proc> {
        let log_path = self.dir().join(format!("{label}.log"));
        let log = File::create(&log_path)
            .with_context(|| format!("cannot create log {}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("cannot dup log {}", log_path.display()))?;
        let argv = self.exec_argv(args);
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        for (k, v) in env {
            cmd.env(k, v);
        }
        // `ip netns exec` execs the command in place, so this pid is the
        // pid of the program itself and signals reach it directly.
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", argv.join(" ")))?;
        Ok(Proc {
            child,
            label: label.to_string(),
            cmdline: argv.join(" "),
            log_path,
            ns: self.clone(),
            exited: None,
        })
    }

    /// Moves the calling thread into this namespace. `setns(CLONE_NEWNET)`
    /// affects only the calling thread, so call this from a thread spawned
    /// for the purpose, never from the test's own thread.
    pub fn enter_current_thread(&self) -> Result<()> {
        let path = format!("/run/netns/{}", self.name());
        let f = File::open(&path).with_context(|| format!("cannot open {path}"))?;
        nix::sched::setns(&f, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("setns({path}, CLONE_NEWNET)"))
    }

    /// Pids of every process in the namespace (`ip netns pids`).
    pub fn pids(&self) -> Result<Vec<i32>> {
        ns_pids(self.name())
    }
}

fn ns_pids(name: &str) -> Result<Vec<i32>> {
    let out = run(&["ip", "netns", "pids", name], None)?;
    out.split_whitespace()
        .map(|p| {
            p.parse::<i32>()
                .with_context(|| format!("bad pid {p:?} from `ip netns pids {name}`"))
        })
        .collect()
}

fn destroy_namespace(name: &str) {
    match ns_pids(name) {
        Ok(pids) => {
            for pid in pids {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        Err(e) => eprintln!("cleanup: {e:#}"),
    }
    if let Err(e) = run(&["ip", "netns", "del", name], None) {
        eprintln!("cleanup: {e:#}");
    }
}

/// What a namespace's resolv.conf holds until a test gives it a resolver.
pub const NO_RESOLVER: &str = "# a vpcgate test namespace: no resolver\n";

/// Where `ip netns exec` finds per-namespace files for /etc.
const NETNS_ETC: &str = "/etc/netns";

impl Drop for NetnsInner {
    fn drop(&mut self) {
        destroy_namespace(&self.name);
        let _ = fs::remove_dir_all(Path::new(NETNS_ETC).join(&self.name));
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("cleanup: cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// Removes namespaces (and scratch dirs) of harness processes that no longer
/// exist, e.g. after a test binary was killed with SIGKILL.
fn sweep_stale_namespaces() {
    let Ok(list) = run(&["ip", "netns", "list"], None) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("removing stale namespace {name} of dead test process {pid}");
        destroy_namespace(name);
        let _ = fs::remove_dir_all(Path::new(SCRATCH_ROOT).join(name));
        let _ = fs::remove_dir_all(Path::new(NETNS_ETC).join(name));
    }
}

/// A child process running in a namespace, with its output in a log file.
/// Dropping it sends SIGTERM, then SIGKILL after 5 s, and prints the log tail.
pub struct Proc {
    child: Child,
    label: String,
    cmdline: String,
    log_path: PathBuf,
    ns: Netns,
    exited: Option<ExitStatus>,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        // Pids fit in i32 on Linux (pid_max <= 2^22).
        self.child.id() as i32
    }

    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `max` bytes of the process's output.
    pub fn log_tail(&self, max: u64) -> String {
        let mut f = match File::open(&self.log_path) {
            Ok(f) => f,
            Err(e) => return format!("<cannot open {}: {e}>", self.log_path.display()),
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = len.saturating_sub(max);
        if f.seek(SeekFrom::Start(start)).is_err() {
            return String::from("<cannot seek log>");
        }
        let mut buf = Vec::new();
        if let Err(e) = f.read_to_end(&mut buf) {
            return format!("<cannot read log: {e}>");
        }
        let text = String::from_utf8_lossy(&buf).into_owned();
        if start > 0 {
            format!("[... {start} bytes omitted ...]\n{text}")
        } else {
            text
        }
    }

    /// CPU time (user + system) the process has used so far, from
    /// `/proc/PID/stat`.
    pub fn cpu_time(&self) -> Result<Duration> {
        let path = format!("/proc/{}/stat", self.pid());
        let stat = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        // The command name in field 2 may contain spaces; the fields after
        // its closing parenthesis are plain numbers. utime and stime are
        // fields 14 and 15, i.e. the 12th and 13th after the parenthesis.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .with_context(|| format!("no ')' in {path}: {stat:?}"))?;
        let ticks: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(str::parse)
            .collect::<std::result::Result<_, _>>()
            .with_context(|| format!("bad utime/stime in {path}: {stat:?}"))?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks.len() != 2 || hz <= 0 {
            bail!("cannot read CPU time from {path}: {stat:?} (CLK_TCK {hz})");
        }
        Ok(Duration::from_secs_f64(
            (ticks[0] + ticks[1]) as f64 / hz as f64,
        ))
    }

    /// Resident memory of the process in bytes (`VmRSS`).
    pub fn rss(&self) -> Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .with_context(|| format!("no VmRSS in {path}"))
    }

    /// `Some(status)` once the process has exited.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .with_context(|| format!("waitpid({}) for {}", self.pid(), self.label))?;
        }
        Ok(self.exited)
    }

    /// Fails, quoting the log, if the process has already exited.
    pub fn check_running(&mut self) -> Result<()> {
        match self.try_status()? {
            None => Ok(()),
            Some(status) => bail!(
                "{} exited unexpectedly ({status}); `{}`; log:\n{}",
                self.label,
                self.cmdline,
                self.log_tail(8 * 1024)
            ),
        }
    }

    /// Sends `sig` if the process is still running.
    pub fn signal(&mut self, sig: Signal) -> Result<()> {
        if self.try_status()?.is_none() {
            kill(Pid::from_raw(self.pid()), sig)
                .with_context(|| format!("kill({}, {sig}) for {}", self.pid(), self.label))?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit. Returns the exit
    /// status; fails (after SIGKILL) if the process did not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(Signal::SIGTERM)?;
        match self.wait_timeout(timeout)? {
            Some(status) => Ok(status),
            None => {
                self.signal(Signal::SIGKILL)?;
                let _ = self.wait_timeout(Duration::from_secs(5));
                bail!(
                    "{} did not exit within {timeout:?} of SIGTERM; killed it. log:\n{}",
                    self.label,
                    self.log_tail(8 * 1024)
                )
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = self.terminate(Duration::from_secs(5)) {
            eprintln!("cleanup: {e:#}");
        }
        let status = self
            .exited
            .map(|s| s.to_string())
            .unwrap_or_else(|| "not reaped".into());
        eprintln!(
            "----- {} (pid {}, netns {}, {status}) `{}` -----\n{}\n----- end of {} -----",
            self.label,
            self.child.id(),
            self.ns.name(),
            self.cmdline,
            self.log_tail(LOG_TAIL_BYTES).trim_end(),
            self.label
        );
    }
}

/// Connects `a` and `b` with a veth pair and brings both ends up. Addresses
/// are CIDR strings; IPv6 ones get `nodad` so they are usable at once.
/// Returns the interface names in `a` and in `b`.
pub fn veth(a: &Netns, b: &Netns, addrs_a: &[&str], addrs_b: &[&str]) -> Result<(String, String)> {
    let if_a = unique_ifname("u");
    let if_b = unique_ifname("u");
    // Both ends are created directly in their namespaces; nothing ever
    // appears in the root namespace.
    a.ip(&[
        "link",
        "add",
        &if_a,
        "type",
        "veth",
        "peer",
        "name",
        &if_b,
        "netns",
        b.name(),
    ])
    .context("creating veth pair")?;
    for (ns, ifname, addrs) in [(a, &if_a, addrs_a), (b, &if_b, addrs_b)] {
        for addr in addrs {
            add_addr(ns, ifname, addr)?;
        }
        ns.ip(&["link", "set", ifname, "up"])?;
    }
    Ok((if_a, if_b))
}

/// `ip addr add ADDR dev IFACE`, with `nodad` for IPv6 so the address is not
/// left tentative for a second or two.
pub(crate) fn add_addr(ns: &Netns, ifname: &str, addr: &str) -> Result<()> {
    let mut args = vec!["addr", "add", addr, "dev", ifname];
    if addr.contains(':') {
        args.push("nodad");
    }
    ns.ip(&args)
        .with_context(|| format!("adding {addr} to {ifname} in {}", ns.name()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base36_encodes() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(4_194_304), "2hwcg");
    }

    #[test]
    fn ifnames_fit_and_differ() {
        let a = unique_ifname("gw");
        let b = unique_ifname("gw");
        assert_ne!(a, b);
        assert!(a.len() <= IFNAMSIZ_MAX);
    }
}
