//! `vpcgated`: the command line of the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ipnet::IpNet;
use tracing_subscriber::EnvFilter;
use vpcgated::daemon::{self, Options};

/// Userspace WireGuard subnet router. Manage peers with `wg` (the interface's
/// UAPI socket is /var/run/wireguard/<interface>.sock) or with `vpcgate`.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Name of the TUN interface to create.
    #[arg(long, default_value = "vpcgate0", value_parser = interface_name)]
    interface: String,
    /// Directory for the private key and settings (created 0700).
    #[arg(long, default_value = "/var/lib/vpcgate")]
    state_dir: PathBuf,
    /// Control socket for the `vpcgate` CLI.
    #[arg(long, default_value = vpcgate_proto::DEFAULT_SOCKET)]
    socket: PathBuf,
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
    /// Let members of this group use the control socket (mode 0660);
    /// otherwise it is root-only.
    #[arg(long)]
    socket_group: Option<String>,
    /// Kernel offloads not to use, comma-separated: tun, gso, gro. Each is
    /// detected at start and falls back on its own; this is for measuring
    /// and testing the fallbacks.
    #[arg(long, value_delimiter = ',', value_parser = ["tun", "gso", "gro"])]
    no_offload: Vec<String>,
    /// Log level (error, warn, info, debug, trace) or a tracing filter.
    /// Overrides VPCGATE_LOG.
    #[arg(long)]
    log_level: Option<String>,
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

fn main() -> ExitCode {
    let args = Args::parse();
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

    let options = Options {
        interface: args.interface,
        state_dir: args.state_dir,
        socket: args.socket,
        listen_port: args.listen_port,
        addresses: args.address,
        mtu: args.mtu,
        socket_group: args.socket_group,
        metrics_listen: args.metrics_listen,
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
