//! `vpcgated`: the command line of the daemon.
//!
//! Two ways to start it. As a gateway (`vpcgated [--interface NAME]`, what
//! the systemd unit runs): it stays in the foreground, with a default tunnel
//! address and its state in /var/lib/vpcgate. As a plain WireGuard
//! interface (`vpcgated IFNAME`, wireguard-go's calling convention, which
//! wg-quick uses through `WG_QUICK_USERSPACE_IMPLEMENTATION`): it starts in
//! the background, returns once `wg` can talk to it, and keeps its state per
//! interface; wg-quick sets its key, peers, addresses and MTU.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use ipnet::IpNet;
use tracing_subscriber::EnvFilter;
use vpcgated::daemon::{self, Options};
use vpcgated::nat::NatForm;

/// Userspace WireGuard subnet router. Manage peers with `wg` (the interface's
/// UAPI socket is /var/run/wireguard/<interface>.sock) or with `vpcgate`.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Args {
    /// Run as a plain WireGuard interface named IFNAME, as wireguard-go
    /// does: in the background once `wg` can reach it, with no default
    /// address, and state in /var/lib/vpcgate/IFNAME. This is how
    /// `WG_QUICK_USERSPACE_IMPLEMENTATION=vpcgated wg-quick up` starts it.
    #[arg(value_parser = interface_name, conflicts_with = "interface", value_name = "IFNAME")]
    ifname: Option<String>,
    /// With IFNAME: stay in the foreground (also WG_PROCESS_FOREGROUND=1).
    #[arg(short, long)]
    foreground: bool,
    /// Name of the TUN interface to create (as a gateway) [default: vpcgate0].
    #[arg(long, value_parser = interface_name)]
    interface: Option<String>,
    /// Directory for the private key and settings (created 0700)
    /// [default: /var/lib/vpcgate, or /var/lib/vpcgate/IFNAME].
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Control socket for the `vpcgate` CLI
    /// [default: /run/vpcgate/vpcgated.sock, or /run/vpcgate/IFNAME.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// UDP listen port [default: the saved one, else 51820]; 0 picks a free port.
    #[arg(long)]
    listen_port: Option<u16>,
    /// Tunnel address(es) of this node, as CIDR: one IPv4 and/or one IPv6,
    /// comma-separated [default: the saved ones, else 100.64.0.1/24].
    #[arg(long, value_delimiter = ',')]
    address: Option<Vec<IpNet>>,
    /// MTU of the TUN interface [default: the saved one, else 1420].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1280..=65535))]
    mtu: Option<u32>,
    /// Serve Prometheus metrics on this address, e.g. 127.0.0.1:9586 (off by default).
    #[arg(long)]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Answer a load balancer's health probe over HTTP on this address,
    /// e.g. 0.0.0.0:8080 (off by default): 200 while the data path runs, an
    /// advertised range is healthy by its checks and the gateway is not
    /// draining; 503 otherwise.
    #[arg(long)]
    health_listen: Option<std::net::SocketAddr>,
    /// Let members of this group use the control socket (mode 0660);
    /// otherwise it is root-only.
    #[arg(long)]
    socket_group: Option<String>,
    /// Kernel offloads not to use, comma-separated: tun, gso, gro. Each is
    /// detected at start and falls back on its own; this is for measuring
    /// and testing the fallbacks.
    #[arg(long, value_delimiter = ',', value_parser = ["tun", "gso", "gro"])]
    no_offload: Vec<String>,
    /// The nftables form of the SNAT table: `inet` (nft 0.9.1+, Linux 5.2+)
    /// or `ip+ip6` (separate tables, for older systems such as Ubuntu
    /// 18.04) [default: inet where it works, else ip+ip6].
    #[arg(long, value_parser = parse_nat_form)]
    nat_form: Option<NatForm>,
    /// Where the DNS forwarder reads the host's resolvers: the first of
    /// these files that exists, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "/run/systemd/resolve/resolv.conf,/etc/resolv.conf"
    )]
    resolv_conf: Vec<PathBuf>,
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    /// Overrides VPCGATE_LOG.
    #[arg(long)]
    log_level: Option<String>,
    /// Write the manual page, vpcgated.8, into DIR, and exit (for the
    /// package build).
    #[arg(long, hide = true, exclusive = true, value_name = "DIR")]
    generate_man_pages: Option<PathBuf>,
    /// Print the completion script for SHELL, and exit (for the package
    /// build).
    #[arg(long, hide = true, exclusive = true, value_enum, value_name = "SHELL")]
    generate_completions: Option<vpcgate_clidoc::Shell>,
}

/// `--generate-man-pages` and `--generate-completions`: what the package
/// ships, from the definitions above. Nothing else runs.
fn generate(args: &Args) -> Option<ExitCode> {
    use std::io::Write;
    let result = if let Some(dir) = &args.generate_man_pages {
        let see_also = ["vpcgate(8)", "wg(8)", "wg-quick(8)"];
        vpcgate_clidoc::write_man_pages(Args::command(), "8", &see_also, dir)
            .map(drop)
            .map_err(|e| e.to_string())
    } else if let Some(shell) = args.generate_completions {
        let script = vpcgate_clidoc::completion(&Args::command(), shell);
        let mut out = std::io::stdout().lock();
        out.write_all(&script)
            .and_then(|()| out.flush())
            .map_err(|e| format!("cannot write the completion script: {e}"))
    } else {
        return None;
    };
    Some(match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vpcgated: {e}");
            ExitCode::FAILURE
        }
    })
}

fn parse_nat_form(text: &str) -> Result<NatForm, String> {
    text.parse()
        .map_err(|e: vpcgated::nat::UnknownNatForm| e.to_string())
}

fn interface_name(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if valid {
        Ok(name.to_string())
    } else {
        Err("an interface name is 1-15 characters of letters, digits, '-', '_' or '.'".into())
    }
}

/// How long a background start may take before the parent gives up on it:
/// start-up is milliseconds, so this only stops a wedged start from hanging
/// wg-quick forever.
const BACKGROUND_START_LIMIT: Duration = Duration::from_secs(60);

/// Starts this same command again in the background, in a session of its
/// own, and returns once its UAPI socket answers `wg`, as wireguard-go does.
/// The child logs to our stderr only if a log level was asked for.
fn start_in_background(ifname: &str, verbose: bool) -> ExitCode {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("vpcgated: cannot find our own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let log = || {
        if verbose {
            Stdio::inherit()
        } else {
            Stdio::null()
        }
    };
    let mut command = Command::new(exe);
    command
        .args(std::env::args_os().skip(1))
        .env("WG_PROCESS_FOREGROUND", "1")
        .stdin(Stdio::null())
        .stdout(log())
        .stderr(log());
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        command.pre_exec(|| nix::unistd::setsid().map(drop).map_err(Into::into));
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("vpcgated: cannot start the daemon: {e}");
            return ExitCode::FAILURE;
        }
    };
    let uapi = vpcgated::uapi::socket_path(ifname);
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                eprintln!(
                    "vpcgated: the daemon for {ifname} exited while starting ({status}); \
                     run `vpcgated --foreground {ifname}` to see why"
                );
                return ExitCode::FAILURE;
            }
            Ok(None) => {}
            Err(e) => {
                eprintln!("vpcgated: cannot watch the daemon: {e}");
                return ExitCode::FAILURE;
            }
        }
        if answered_by(&uapi, child.id()) {
            return ExitCode::SUCCESS;
        }
        if started.elapsed() > BACKGROUND_START_LIMIT {
            eprintln!(
                "vpcgated: the daemon for {ifname} did not answer on {} within {:?}; stopping it",
                uapi.display(),
                BACKGROUND_START_LIMIT
            );
            let _ = child.kill();
            let _ = child.wait();
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether the process `pid` listens on the UAPI socket at `path` and
/// answers a `get` there: `wg` can use the interface.
fn answered_by(path: &Path, pid: u32) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    use std::io::{BufRead, BufReader, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(path) else {
        return false;
    };
    let ours = getsockopt(&stream, PeerCredentials)
        .is_ok_and(|cred| u32::try_from(cred.pid()).ok() == Some(pid));
    if !ours
        || stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .is_err()
    {
        return false;
    }
    if stream.write_all(b"get=1\n\n").is_err() {
        return false;
    }
    BufReader::new(stream)
        .lines()
        .map_while(Result::ok)
        .any(|line| line == "errno=0")
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = generate(&args) {
        return code;
    }
    let foreground =
        args.foreground || std::env::var("WG_PROCESS_FOREGROUND").is_ok_and(|v| v == "1");
    if let (Some(ifname), false) = (&args.ifname, foreground) {
        let verbose = args.log_level.is_some() || std::env::var_os("VPCGATE_LOG").is_some();
        return start_in_background(ifname, verbose);
    }
    let level = args
        .log_level
        .clone()
        .or_else(|| std::env::var("VPCGATE_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let filter = match EnvFilter::try_new(&level) {
        // netlink-packet-route warns about every kernel attribute newer than
        // itself; that is not the operator's concern.
        Ok(filter) if !level.contains("netlink") => filter.add_directive(
            "netlink_packet_route=error"
                .parse()
                .unwrap_or_else(|_| unreachable!("a valid directive")),
        ),
        Ok(filter) => filter,
        Err(e) => {
            eprintln!("vpcgated: invalid --log-level {level:?}: {e}");
            return ExitCode::from(2);
        }
    };
    // journald adds its own timestamps; a plain stderr gets ours.
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_target(false);
    if under_journald {
        builder.without_time().init();
    } else {
        builder.init();
    }

    // Every file and socket we create is private to root.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));

    let plain = args.ifname.is_some();
    let interface = args
        .ifname
        .or(args.interface)
        .unwrap_or_else(|| "vpcgate0".into());
    let (state_dir, socket) = if plain {
        (
            Path::new("/var/lib/vpcgate").join(&interface),
            Path::new("/run/vpcgate").join(format!("{interface}.sock")),
        )
    } else {
        (
            PathBuf::from("/var/lib/vpcgate"),
            PathBuf::from(vpcgate_proto::DEFAULT_SOCKET),
        )
    };
    let options = Options {
        state_dir: args.state_dir.unwrap_or(state_dir),
        socket: args.socket.unwrap_or(socket),
        interface,
        plain,
        nat_form: args.nat_form,
        listen_port: args.listen_port,
        addresses: args.address,
        mtu: args.mtu,
        socket_group: args.socket_group,
        metrics_listen: args.metrics_listen,
        health_listen: args.health_listen,
        resolv_conf: args.resolv_conf,
        offload: vpcgated::dataplane::Offload {
            tun: !args.no_offload.iter().any(|o| o == "tun"),
            gso: !args.no_offload.iter().any(|o| o == "gso"),
            gro: !args.no_offload.iter().any(|o| o == "gro"),
        },
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vpcgated: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(daemon::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_options_are_hidden_and_stand_alone() {
        Args::command().debug_assert();
        let args = Args::try_parse_from(["vpcgated", "--generate-completions", "zsh"])
            .expect("--generate-completions alone");
        assert_eq!(args.generate_completions, Some(vpcgate_clidoc::Shell::Zsh));
        let args = Args::try_parse_from(["vpcgated", "wg0"]).expect("IFNAME alone");
        assert_eq!(args.ifname.as_deref(), Some("wg0"));
        assert!(args.generate_man_pages.is_none() && args.generate_completions.is_none());
        for with_more in [
            &["--generate-completions", "bash", "wg0"][..],
            &["--generate-man-pages", "/tmp/x", "--foreground"][..],
        ] {
            let argv = std::iter::once("vpcgated").chain(with_more.iter().copied());
            assert!(Args::try_parse_from(argv).is_err(), "{with_more:?}");
        }
        let help = Args::command().render_long_help().to_string();
        assert!(!help.contains("--generate"), "{help}");
    }

    #[test]
    fn man_page_and_completions_document_the_flags() {
        let pages =
            vpcgate_clidoc::man_pages(Args::command(), "8", "2024-01-01", &[]).expect("render");
        let names: Vec<&str> = pages.iter().map(|p| p.file_name.as_str()).collect();
        assert_eq!(names, ["vpcgated.8"]);
        let roff = String::from_utf8_lossy(&pages[0].roff).replace("\\-", "-");
        for needle in ["--nat-form", "--socket-group", "IFNAME", "ip+ip6"] {
            assert!(roff.contains(needle), "no {needle} in:\n{roff}");
        }
        assert!(!roff.contains("--generate"), "{roff}");
        for shell in [vpcgate_clidoc::Shell::Bash, vpcgate_clidoc::Shell::Fish] {
            let script = vpcgate_clidoc::completion(&Args::command(), shell);
            let script = String::from_utf8_lossy(&script);
            assert!(script.contains("nat-form"), "{shell}: {script}");
            assert!(!script.contains("generate"), "{shell}: {script}");
        }
    }
}
