//! `vpcgate`: the control CLI for vpcgated. It speaks to the daemon only
//! through the framed protocol in `vpcgate-proto`.

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use vpcgate_proto::{self as proto, Request, Response, Status};

/// Control a vpcgated WireGuard subnet router.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = proto::SOCKET_ENV, default_value = proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show the node's key, port, address, peers and drop counters.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the version.
    Version,
}

fn request(socket: &PathBuf, request: &Request) -> anyhow::Result<Response> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach vpcgated at {} (is it running? are you root? set --socket or {})",
            socket.display(),
            proto::SOCKET_ENV
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    proto::write_frame(&mut stream, request)?;
    Ok(proto::read_frame(&mut stream)?)
}

fn print_status(status: &Status) {
    println!("interface: {}", status.interface);
    println!("  public key: {}", status.public_key);
    println!("  listening port: {}", status.listen_port);
    println!("  address: {}", status.address);
    for peer in &status.peers {
        println!();
        println!("peer: {}", peer.public_key);
        if let Some(endpoint) = &peer.endpoint {
            println!("  endpoint: {endpoint}");
        }
        println!("  allowed ips: {}", peer.allowed_ips.join(", "));
        if let Some(secs) = peer.latest_handshake {
            println!("  latest handshake: {secs} (unix time)");
        }
        println!(
            "  transfer: {} B received, {} B sent",
            peer.rx_bytes, peer.tx_bytes
        );
        if let Some(k) = peer.persistent_keepalive {
            println!("  persistent keepalive: every {k} seconds");
        }
    }
    let drops: Vec<String> = status
        .drops
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(reason, n)| format!("{reason}={n}"))
        .collect();
    if !drops.is_empty() {
        println!();
        println!("dropped packets: {}", drops.join(" "));
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Version => {
            println!("vpcgate {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Cmd::Status { json } => match request(&cli.socket, &Request::Status)? {
            Response::Status(status) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    print_status(&status);
                }
                Ok(())
            }
            Response::Error { message } => bail!("vpcgated refused the request: {message}"),
        },
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vpcgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}
