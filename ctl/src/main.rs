//! `vpcgate`: the control CLI for vpcgated. It speaks to the daemon only
//! through the framed protocol in `vpcgate-proto`. Results go to stdout;
//! messages and warnings go to stderr, so output can be piped into a file.

mod doctor;
mod identity;
mod public_endpoint;
mod qr;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, CommandFactory, Parser, Subcommand};
use vpcgate_proto::{self as proto, PeerAdd, PeerStatus, Request, Response, SetOptions, Status};

/// Control a vpcgated WireGuard subnet router.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The daemon's control socket.
    #[arg(long, global = true, env = proto::SOCKET_ENV, default_value = proto::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print JSON instead of text, for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show the node's key, port, routes, peers and drop counters.
    Status,
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
        /// Advertise the ranges that contain IP only while a TCP connection
        /// to IP:PORT opens (probed every second through this VM's own
        /// path; withdrawn after 2 failures, back after 3 successes).
        /// Repeatable, e.g. --check tcp:198.19.101.10:5432
        #[arg(long = "check", value_name = "tcp:IP:PORT", conflicts_with = "clear")]
        checks: Vec<String>,
    },
    /// Stop advertising every range, for maintenance: clients with another
    /// gateway move to it, and connections that still arrive are
    /// forwarded. It lasts across restarts until `drain --off`.
    Drain {
        /// End the drain: advertise again.
        #[arg(long)]
        off: bool,
    },
    /// Change settings; each is validated, saved and applied live.
    Set(SetArgs),
    /// Carry this gateway's identity (key, peers, settings) to a second
    /// gateway behind the same load balancer, for stock WireGuard clients.
    #[command(subcommand)]
    Identity(identity::IdentityCmd),
    /// Add, remove and list peers, and print client configs.
    #[command(subcommand)]
    Peer(PeerCmd),
    /// Print the version.
    Version,
    /// Generate a private key (base64), as `wg genkey` does.
    Genkey,
    /// Read a private key on stdin and print its public key, as `wg pubkey` does.
    Pubkey,
    /// Find what stops this VM from working as a subnet router, and how to
    /// fix each thing; exits non-zero when a check fails.
    Doctor {
        #[command(flatten)]
        cloud: doctor::CloudArgs,
    },
    /// Print the completion script for SHELL (the package installs bash's,
    /// zsh's and fish's).
    Completions {
        #[arg(value_enum)]
        shell: vpcgate_clidoc::Shell,
    },
    /// Decode a QR code printed by `--qr` from stdin (for tests).
    #[command(hide = true)]
    QrDecode,
    /// Write the manual pages, vpcgate.8 and one per subcommand, into DIR
    /// (for the package build).
    #[command(hide = true)]
    GenerateManPages { dir: PathBuf },
}

#[derive(Args, Debug)]
// At least one setting: a bare `vpcgate set` is an error that names them,
// not a page of help.
#[command(group(clap::ArgGroup::new("setting").required(true).multiple(true).args([
    "snat", "mss_clamp", "public_endpoint", "listen_port", "address", "mtu",
    "dns", "dns_upstream", "dns_zones",
])))]
// clap's own usage line lists every member of the group as one word, which
// neither a terminal nor troff can break.
#[command(override_usage = "vpcgate set --SETTING VALUE [--SETTING VALUE]... [OPTIONS]")]
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
    /// UDP port to listen on (0 picks a free one).
    #[arg(long)]
    listen_port: Option<u16>,
    /// This node's tunnel address(es): one IPv4 and/or one IPv6 CIDR, comma-separated.
    #[arg(long)]
    address: Option<String>,
    /// MTU of the tunnel interface (1280-65535).
    #[arg(long)]
    mtu: Option<u32>,
    /// Answer peers' DNS queries on the tunnel address(es), forwarding them
    /// to the VPC's resolver, so private names resolve from laptops (on by
    /// default; client configs then carry `DNS =`).
    #[arg(long, value_parser = on_off)]
    dns: Option<bool>,
    /// Resolvers to forward to, comma-separated, or `auto` for the ones this
    /// host uses (its resolv.conf; the default).
    #[arg(long, value_name = "IP[,IP]|auto")]
    dns_upstream: Option<String>,
    /// Domains vpcgate clients resolve through this gateway (split DNS),
    /// comma-separated, e.g. mongodb.net,eventstore.cloud; `none` for none.
    #[arg(long, value_name = "ZONE[,ZONE]|none")]
    dns_zones: Option<String>,
    /// This gateway's priority for clients that have two or more gateways
    /// for a range: the lowest healthy one carries it (default 100).
    #[arg(long, value_name = "N")]
    priority: Option<u16>,
}

#[derive(Subcommand, Debug)]
enum PeerCmd {
    /// Add a peer. Without --public-key, generate the client's keys and print
    /// its wg-quick config on stdout.
    ///
    /// A generated config needs the gateway's public endpoint. If none is set,
    /// on an AWS, GCP or Azure VM this VM's public IPv4 address is read from
    /// the metadata service and saved as the public endpoint, with the listen
    /// port; elsewhere set it first with `vpcgate set --public-endpoint`.
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
        #[arg(long)]
        qr: bool,
        #[command(flatten)]
        cloud: doctor::CloudArgs,
    },
    /// Remove a peer.
    Remove { name: String },
    /// List peers.
    List,
    /// Print a peer as a document that `peer import` on a second gateway
    /// adds with the same key, name and addresses (no secrets in it):
    /// `vpcgate peer export laptop | ssh gw2 sudo vpcgate peer import -`.
    Export { name: String },
    /// Add a peer from `peer export` (FILE, or - for standard input).
    Import { file: String },
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
    use std::io::Write;
    let frame = proto::encode(request).map_err(|e| match e {
        proto::FrameError::TooLarge { len, max } => anyhow::anyhow!(
            "this request is {len} bytes, more than the {max} vpcgated accepts; \
             give fewer or shorter arguments"
        ),
        e => e.into(),
    })?;
    let mut stream = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach vpcgated at {} (is it running? are you root? set --socket or {})",
            socket.display(),
            proto::SOCKET_ENV
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    stream.write_all(&frame)?;
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
    println!("  mtu: {}", status.mtu);
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
    print_failover(status);
    let onoff = |b: bool| if b { "on" } else { "off" };
    let form = match &status.snat_form {
        Some(form) => format!(" ({form} nftables)"),
        None => String::new(),
    };
    println!(
        "  snat: {}{form}, mss clamp: {}",
        onoff(status.snat),
        onoff(status.mss_clamp)
    );
    match &status.dns {
        Some(dns) => {
            println!(
                "  dns: on {} -> {} (from {})",
                list(&dns.listening),
                list(&dns.upstreams),
                if dns.upstream_source.is_empty() {
                    "nowhere"
                } else {
                    &dns.upstream_source
                }
            );
            if !dns.zones.is_empty() {
                println!("  dns zones: {}", dns.zones.join(", "));
            }
            println!(
                "  dns queries: {}, from cache: {}, cached answers: {}",
                dns.queries, dns.cache_hits, dns.cache_entries
            );
            if let Some(problem) = &dns.problem {
                println!("  dns problem: {problem}");
            }
        }
        None if status.advertised_routes.is_empty() => {
            println!("  dns: not served (a gateway serves it while it advertises ranges)")
        }
        None => println!("  dns: off"),
    }
    if let Some(link) = &status.link_dns {
        println!(
            "  split dns: {} via {} (offered by {})",
            list(&link.domains),
            list(&link.servers),
            list(&link.from)
        );
        if !link.applied {
            match &link.problem {
                Some(problem) => println!("  split dns is not applied: {problem}"),
                None => println!("  split dns is not applied yet"),
            }
            println!("  to apply it by hand: {}", link.command);
        }
    }
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
    // Part of the report, so on stdout after it: on stderr they could land
    // anywhere in a capture that merges the two.
    if !status.warnings.is_empty() {
        println!();
        for warning in &status.warnings {
            println!("warning: {warning}");
        }
    }
}

/// A gateway's drain and checks, and a client's carriers.
fn print_failover(status: &Status) {
    if status.draining {
        println!("  draining: nothing is offered to clients (`vpcgate drain --off` ends it)");
    } else if status.advertising != status.advertised_routes {
        let offered = match status.advertising.is_empty() {
            true => "(none)".to_string(),
            false => status.advertising.join(", "),
        };
        println!("  offered now: {offered} (the rest wait for their checks)");
    }
    let ago = |secs: Option<u64>| secs.map_or(String::new(), |s| format!(" for {s}s"));
    for check in &status.checks {
        let last = match (&check.last, check.last_ok) {
            (Some(last), Some(true)) => format!("last probe: {last}"),
            (Some(last), _) => format!("last probe failed: {last}"),
            (None, _) => "not probed yet".to_string(),
        };
        println!(
            "  check {}: {}{} ({last}), governs {}",
            check.target,
            check.state,
            ago(check.for_secs),
            check.governs.join(", ")
        );
    }
    if !status.accepted_routes.is_empty() {
        println!("  accepted routes: {}", status.accepted_routes.join(", "));
    }
    for carrier in &status.carriers {
        let standby = match carrier.standby.is_empty() {
            true => String::new(),
            false => format!(", standing by: {}", carrier.standby.join(", ")),
        };
        println!(
            "  {} via {} for {}s{standby}",
            carrier.range, carrier.via, carrier.for_secs
        );
    }
    if status.failovers > 0 {
        println!("  failovers: {}", status.failovers);
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

/// Prints a message: as `{"message": …}` on stdout with --json, else on stderr.
fn report(message: &str, json: bool) -> anyhow::Result<()> {
    if json {
        print_json(&serde_json::json!({ "message": message }))
    } else {
        eprintln!("{message}");
        Ok(())
    }
}

fn genkey() -> String {
    use base64::Engine;
    use rand_core::RngCore;
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    rand_core::OsRng.fill_bytes(&mut bytes[..]);
    // Clamped as `wg genkey` does.
    bytes[0] &= 248;
    bytes[31] = (bytes[31] & 127) | 64;
    base64::engine::general_purpose::STANDARD.encode(&bytes[..])
}

fn pubkey(private: &str) -> anyhow::Result<String> {
    use base64::Engine;
    let engine = base64::engine::general_purpose::STANDARD;
    let bytes = zeroize::Zeroizing::new(engine.decode(private.trim()).map_err(|_| {
        anyhow::anyhow!("stdin is not a base64 private key (as `vpcgate genkey` prints)")
    })?);
    let key: [u8; 32] = bytes
        .as_slice()
        .try_into()
        .map_err(|_| anyhow::anyhow!("stdin is not a 32-byte private key"))?;
    let secret = x25519_dalek::StaticSecret::from(key);
    Ok(engine.encode(x25519_dalek::PublicKey::from(&secret).as_bytes()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = &cli.socket;
    let json = cli.json;
    match cli.command {
        Cmd::Version if json => {
            print_json(&serde_json::json!({ "version": env!("CARGO_PKG_VERSION") }))?
        }
        Cmd::Version => println!("vpcgate {}", env!("CARGO_PKG_VERSION")),
        Cmd::Genkey => {
            let key = zeroize::Zeroizing::new(genkey());
            if json {
                print_json(&serde_json::json!({ "private_key": *key }))?;
            } else {
                println!("{}", *key);
            }
        }
        Cmd::Pubkey => {
            let mut private = zeroize::Zeroizing::new(String::new());
            std::io::stdin().read_to_string(&mut private)?;
            let public = pubkey(&private)?;
            if json {
                print_json(&serde_json::json!({ "public_key": public }))?;
            } else {
                println!("{public}");
            }
        }
        Cmd::Doctor { cloud } => doctor::run(doctor::Options {
            socket: socket.clone(),
            json,
            metadata_endpoint: cloud.metadata_endpoint,
            dmi_dir: cloud.dmi_dir,
        })?,
        Cmd::Completions { shell } => {
            use std::io::Write;
            let script = vpcgate_clidoc::completion(&Cli::command(), shell);
            let mut out = std::io::stdout().lock();
            out.write_all(&script)?;
            out.flush()?;
        }
        Cmd::GenerateManPages { dir } => {
            let see_also = ["vpcgated(8)", "wg(8)"];
            vpcgate_clidoc::write_man_pages(Cli::command(), "8", &see_also, &dir)?;
        }
        Cmd::QrDecode => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            print!("{}", qr::decode_rendered(&text)?);
        }
        Cmd::Status => match request(socket, &Request::Status)? {
            Response::Status(status) if json => print_json(&status)?,
            Response::Status(status) => print_status(&status),
            other => return Err(unexpected(other)),
        },
        Cmd::AdvertiseRoutes {
            routes,
            clear,
            exit_node,
            checks,
        } => {
            let req = if clear || !routes.is_empty() {
                Request::AdvertiseRoutes {
                    routes,
                    exit_node,
                    checks,
                }
            } else if !checks.is_empty() {
                bail!(
                    "give the ranges with their checks: advertise-routes sets both, e.g. \
                     vpcgate advertise-routes 198.19.101.0/24 --check tcp:198.19.101.10:5432"
                );
            } else {
                Request::GetAdvertisedRoutes
            };
            match request(socket, &req)? {
                Response::Routes {
                    routes,
                    warnings,
                    checks,
                    draining,
                } => {
                    if json {
                        print_json(&serde_json::json!({
                            "routes": routes,
                            "checks": checks,
                            "draining": draining,
                            "warnings": warnings,
                        }))?;
                    } else {
                        for route in &routes {
                            println!("{route}");
                        }
                        for check in &checks {
                            println!("check {check}");
                        }
                        if draining {
                            println!(
                                "draining: none of these is offered until `vpcgate drain --off`"
                            );
                        }
                    }
                    for warning in &warnings {
                        eprintln!("warning: {warning}");
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Drain { off } => match request(socket, &Request::Drain { on: !off })? {
            Response::Done { message } => report(&message, json)?,
            other => return Err(unexpected(other)),
        },
        Cmd::Identity(identity::IdentityCmd::Export) => {
            match request(socket, &Request::IdentityExport)? {
                Response::Identity { document } => {
                    identity::print(&zeroize::Zeroizing::new(document))?
                }
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Identity(identity::IdentityCmd::Import { file }) => {
            let document = identity::read(&file)?;
            let mut ask = Request::IdentityImport {
                document: document.to_string(),
            };
            let answer = request(socket, &ask);
            if let Request::IdentityImport { document } = &mut ask {
                zeroize::Zeroize::zeroize(document);
            }
            match answer? {
                Response::Done { message } => report(&message, json)?,
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Set(args) => {
            let options = SetOptions {
                snat: args.snat,
                mss_clamp: args.mss_clamp,
                public_endpoint: args.public_endpoint,
                listen_port: args.listen_port,
                address: args.address.map(|a| vec![a]),
                mtu: args.mtu,
                dns: args.dns,
                dns_upstream: args.dns_upstream.map(|a| vec![a]),
                dns_zones: args.dns_zones.map(|a| vec![a]),
                priority: args.priority,
            };
            match request(socket, &Request::Set(options))? {
                Response::Done { message } => report(&message, json)?,
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
            cloud,
        }) => {
            if qr && json {
                bail!("--qr and --json cannot be combined");
            }
            let add = PeerAdd {
                name,
                public_key,
                allowed_ips,
                endpoint,
                keepalive,
                accept_routes,
                accept_default_route,
            };
            public_endpoint::ensure(socket, &cloud, &add)?;
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
                Response::Done { message } => report(&message, json)?,
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Peer(PeerCmd::List) => match request(socket, &Request::PeerList)? {
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
        Cmd::Peer(PeerCmd::Export { name }) => match request(socket, &Request::PeerList)? {
            Response::Peers { peers } => print!("{}", identity::peer_document(&peers, &name)?),
            other => return Err(unexpected(other)),
        },
        Cmd::Peer(PeerCmd::Import { file }) => {
            let add = identity::read_peer(&file)?;
            match request(socket, &Request::PeerAdd(add))? {
                response @ Response::PeerAdded { .. } if json => print_json(&response)?,
                Response::PeerAdded {
                    name, allowed_ips, ..
                } => eprintln!(
                    "added peer {name} with allowed IPs {}",
                    allowed_ips.join(", ")
                ),
                other => return Err(unexpected(other)),
            }
        }
        Cmd::Peer(PeerCmd::Config { name, qr }) => {
            match request(socket, &Request::PeerConfig { name })? {
                Response::PeerConfig { config } if json => {
                    print_json(&serde_json::json!({ "config": config }))?
                }
                Response::PeerConfig { config } => print_config(&config, qr)?,
                other => return Err(unexpected(other)),
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    // `vpcgate peer list | head` should end quietly, as other Unix tools do,
    // not panic: Rust ignores SIGPIPE unless told otherwise.
    // SAFETY: restoring the default disposition of a signal has no
    // preconditions, and no other thread exists yet.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vpcgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn b64_of_hex(hex: &str) -> String {
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
            .collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn pubkey_matches_rfc7748() {
        // RFC 7748 section 6.1, Alice.
        let private =
            b64_of_hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let public = b64_of_hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
        assert_eq!(pubkey(&format!("{private}\n")).expect("valid"), public);
    }

    #[test]
    fn genkey_is_clamped_and_pubkey_refuses_garbage() {
        let key = genkey();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&key)
            .expect("base64");
        assert_eq!(bytes.len(), 32);
        assert_eq!(bytes[0] & 7, 0);
        assert_eq!(bytes[31] & 0xc0, 0x40);
        assert!(pubkey(&key).is_ok());
        assert!(pubkey("not a key").is_err());
        assert!(pubkey("AAAA").is_err());
    }
}
