//! `vpcgate`: the control CLI for vpcgated. It speaks to the daemon only
//! through the framed protocol in `vpcgate-proto`. Results go to stdout;
//! messages and warnings go to stderr, so output can be piped into a file.

mod qr;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use vpcgate_proto::{self as proto, PeerAdd, PeerStatus, Request, Response, SetOptions, Status};

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
    /// Show the node's key, port, routes, peers and drop counters.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Replace the ranges this gateway advertises (CIDRs separated by commas
    /// and/or spaces); with none, print them.
    AdvertiseRoutes {
        /// For example 198.18.64.0/20,198.19.101.0/24
        routes: Vec<String>,
        /// Advertise nothing.
        #[arg(long, conflicts_with = "routes")]
        clear: bool,
        /// Allow a default route (0.0.0.0/0 or ::/0): clients send all traffic here.
        #[arg(long)]
        exit_node: bool,
        #[arg(long)]
        json: bool,
    },
    /// Change settings; each is validated, saved and applied live.
    Set(SetArgs),
    /// Add, remove and list peers, and print client configs.
    #[command(subcommand)]
    Peer(PeerCmd),
    /// Print the version.
    Version,
    /// Decode a QR code printed by `--qr` from stdin (for tests).
    #[command(hide = true)]
    QrDecode,
}

#[derive(Args, Debug)]
#[command(arg_required_else_help = true)]
struct SetArgs {
    /// Masquerade peer traffic to advertised ranges behind this gateway's address.
    #[arg(long, value_parser = on_off)]
    snat: Option<bool>,
    /// Lower the TCP MSS of SYNs crossing the tunnel to fit its MTU.
    #[arg(long, value_parser = on_off)]
    mss_clamp: Option<bool>,
    /// HOST:PORT that client configs point at (this VM's public address).
    #[arg(long)]
    public_endpoint: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum PeerCmd {
    /// Add a peer. Without --public-key, generate the client's keys and print
    /// its wg-quick config on stdout.
    Add {
        name: String,
        /// The peer's own public key (base64); it keeps its private key.
        #[arg(long)]
        public_key: Option<String>,
        /// CIDRs the peer may use as source [default: the next free tunnel address].
        #[arg(long)]
        allowed_ips: Vec<String>,
        /// Where to reach the peer, HOST:PORT.
        #[arg(long)]
        endpoint: Option<String>,
        /// Persistent keepalive interval in seconds.
        #[arg(long)]
        keepalive: Option<u16>,
        /// Trust this peer's advertised routes and install them.
        #[arg(long)]
        accept_routes: bool,
        /// Also accept a default route from it.
        #[arg(long, requires = "accept_routes")]
        accept_default_route: bool,
        /// Print the client config as a QR code, for the mobile apps.
        #[arg(long, conflicts_with = "json")]
        qr: bool,
        #[arg(long)]
        json: bool,
    },
    /// Remove a peer.
    Remove { name: String },
    /// List peers.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Print a generated peer's client config again, with the current routes.
    Config {
        name: String,
        #[arg(long)]
        qr: bool,
    },
}

fn on_off(value: &str) -> Result<bool, String> {
    match value {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{value:?}: expected on or off")),
    }
}

fn request(socket: &PathBuf, request: &Request) -> anyhow::Result<Response> {
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach vpcgated at {} (is it running? are you root? set --socket or {})",
            socket.display(),
            proto::SOCKET_ENV
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    proto::write_frame(&mut stream, request)?;
    match proto::read_frame(&mut stream)? {
        Response::Error { message } => bail!("{message}"),
        response => Ok(response),
    }
}

fn unexpected(response: Response) -> anyhow::Error {
    anyhow::anyhow!(
        "unexpected reply from vpcgated: {response:?}; are vpcgate and vpcgated the same version?"
    )
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn age(unix: Option<u64>) -> String {
    let Some(then) = unix else {
        return "never".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("{} seconds ago", now.saturating_sub(then))
}

fn print_peer(peer: &PeerStatus) {
    match &peer.name {
        Some(name) => println!("peer: {name} ({})", peer.public_key),
        None => println!("peer: {}", peer.public_key),
    }
    if let Some(endpoint) = &peer.endpoint {
        println!("  endpoint: {endpoint}");
    }
    println!("  allowed ips: {}", peer.allowed_ips.join(", "));
    println!("  latest handshake: {}", age(peer.latest_handshake));
    println!(
        "  transfer: {} B received, {} B sent",
        peer.rx_bytes, peer.tx_bytes
    );
    if let Some(k) = peer.persistent_keepalive {
        println!("  persistent keepalive: every {k} seconds");
    }
    if peer.accept_routes {
        println!("  accepts routes");
    }
}

fn print_status(status: &Status) {
    println!("interface: {}", status.interface);
    println!("  public key: {}", status.public_key);
    println!("  listening port: {}", status.listen_port);
    println!("  address: {}", status.addresses.join(", "));
    if let Some(endpoint) = &status.public_endpoint {
        println!("  public endpoint: {endpoint}");
    }
    let list = |l: &[String]| {
        if l.is_empty() {
            "(none)".to_string()
        } else {
            l.join(", ")
        }
    };
    println!("  advertised routes: {}", list(&status.advertised_routes));
    if !status.accepted_routes.is_empty() {
        println!("  accepted routes: {}", status.accepted_routes.join(", "));
    }
    let onoff = |b: bool| if b { "on" } else { "off" };
    println!(
        "  snat: {}, mss clamp: {}",
        onoff(status.snat),
        onoff(status.mss_clamp)
    );
    for peer in &status.peers {
        println!();
        print_peer(peer);
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
    for warning in &status.warnings {
        eprintln!("warning: {warning}");
    }
}

fn print_config(config: &str, as_qr: bool) -> anyhow::Result<()> {
    if as_qr {
        print!("{}", qr::render(config)?);
    } else {
        print!("{config}");
    }
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = &cli.socket;
    match cli.command {
        Cmd::Version => println!("vpcgate {}", env!("CARGO_PKG_VERSION")),
        Cmd::QrDecode => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            print!("{}", qr::decode_rendered(&text)?);
        }
        Cmd::Status { json } => match request(socket, &Request::Status)? {
            Response::Status(status) if json => print_json(&status)?,
            Response::Status(status) => print_status(&status),
            other => return Err(unexpected(other)),
        },
        Cmd::AdvertiseRoutes {
            routes,
            clear,
            exit_node,
            json,
        } => {
            let req = if clear || !routes.is_empty() {
                Request::AdvertiseRoutes { routes, exit_node }
            } else {
                Request::GetAdvertisedRoutes
            };
            match request(socket, &req)? {
                Response::Routes { routes, warnings } => {
                    if json {
                        print_json(&serde_json::json!({ "routes": routes, "warnings": warnings }))?;
                    } else {
                        for route in &routes {
                            println!("{route}");
                        }
                    }
                    for warning in &warnings {
                        eprintln!("warning: {warning}");
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Set(args) => {
            let options = SetOptions {
                snat: args.snat,
                mss_clamp: args.mss_clamp,
                public_endpoint: args.public_endpoint,
            };
            match request(socket, &Request::Set(options))? {
                Response::Done { message } if args.json => {
                    print_json(&serde_json::json!({ "message": message }))?
                }
                Response::Done { message } => eprintln!("{message}"),
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Peer(PeerCmd::Add {
            name,
            public_key,
            allowed_ips,
            endpoint,
            keepalive,
            accept_routes,
            accept_default_route,
            qr,
            json,
        }) => {
            let add = PeerAdd {
                name,
                public_key,
                allowed_ips,
                endpoint,
                keepalive,
                accept_routes,
                accept_default_route,
            };
            match request(socket, &Request::PeerAdd(add))? {
                response @ Response::PeerAdded { .. } if json => print_json(&response)?,
                Response::PeerAdded {
                    name,
                    allowed_ips,
                    config,
                } => {
                    eprintln!(
                        "added peer {name} with allowed IPs {}",
                        allowed_ips.join(", ")
                    );
                    match config {
                        Some(config) => {
                            print_config(&config, qr)?;
                            eprintln!(
                                "this config holds {name}'s private key: hand it over privately"
                            );
                        }
                        None if qr => {
                            bail!("{name} brought its own key, so there is no config to show")
                        }
                        None => {}
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Peer(PeerCmd::Remove { name }) => {
            match request(socket, &Request::PeerRemove { name })? {
                Response::Done { message } => eprintln!("{message}"),
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Peer(PeerCmd::List { json }) => match request(socket, &Request::PeerList)? {
            Response::Peers { peers } if json => print_json(&peers)?,
            Response::Peers { peers } => {
                for (i, peer) in peers.iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    print_peer(peer);
                }
            }
            other => return Err(unexpected(other)),
        },
        Cmd::Peer(PeerCmd::Config { name, qr }) => {
            match request(socket, &Request::PeerConfig { name })? {
                Response::PeerConfig { config } => print_config(&config, qr)?,
                other => return Err(unexpected(other)),
            }
        }
    }
    Ok(())
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
