//! The TUN link's DNS in systemd-resolved, the control plane's
//! [`Resolver`] port: split DNS to the forwarders that gateways trusted for
//! routes offer.
//!
//! It runs `resolvectl` (systemd 239 and later), or `systemd-resolve` where
//! only that exists (Ubuntu 18.04's systemd 237), found on `PATH`. Both ask
//! systemd-resolved over D-Bus, which lets a caller holding CAP_NET_ADMIN
//! change a link: the unit gives the daemon that capability, and the
//! program inherits it. resolved forgets a link's settings when the link
//! goes, so the TUN's removal at exit needs no revert.

use std::ffi::OsString;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use vpcgate_plane::errno::EIO;
use vpcgate_plane::ports::LinkDns;
use vpcgate_plane::ports::{PortError, Resolver};

/// resolvectl waits up to 25 s for D-Bus by default; a control plane that
/// waits that long answers nobody else meanwhile. A healthy resolved
/// answers in milliseconds, so this only bounds a hung one; the step is
/// retried later.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The two programs, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Program {
    Resolvectl,
    /// `systemd-resolve --interface IF --set-dns …`, before systemd 239.
    SystemdResolve,
}

#[derive(Debug, Default)]
pub struct Resolvectl;

impl Resolver for Resolvectl {
    async fn apply(&mut self, interface: &str, dns: Option<&LinkDns>) -> Result<(), PortError> {
        let (program, path) = find().ok_or_else(|| {
            PortError::new(
                EIO,
                "neither resolvectl nor systemd-resolve is installed, so systemd-resolved cannot be told",
            )
        })?;
        for invocation in commands(program, interface, dns) {
            run(&path, &invocation.args).await.or_else(|e| {
                if invocation.optional {
                    // `default-route` came with systemd 240; without it
                    // the link still answers its routing domains.
                    tracing::debug!("{e}");
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
        }
        match dns {
            Some(dns) => tracing::info!(
                interface,
                servers = ?dns.servers,
                domains = ?dns.domains,
                "systemd-resolved sends these names into the tunnel"
            ),
            None => tracing::info!(
                interface,
                "the tunnel's DNS is removed from systemd-resolved"
            ),
        }
        Ok(())
    }
}

/// One invocation, and whether its failure can be ignored.
struct Invocation {
    args: Vec<String>,
    optional: bool,
}

fn commands(program: Program, interface: &str, dns: Option<&LinkDns>) -> Vec<Invocation> {
    let run = |args: Vec<String>| Invocation {
        args,
        optional: false,
    };
    let strings = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let servers = |dns: &LinkDns| {
        dns.servers
            .iter()
            .map(IpAddr::to_string)
            .collect::<Vec<_>>()
    };
    match (program, dns) {
        (Program::Resolvectl, None) => vec![run(strings(&["revert", interface]))],
        (Program::Resolvectl, Some(dns)) => {
            let mut set_dns = strings(&["dns", interface]);
            set_dns.extend(servers(dns));
            let mut domain = strings(&["domain", interface]);
            domain.extend(dns.domains.iter().cloned());
            // Only the zones go to the tunnel, unless a gateway offers
            // every name ("~.").
            let every_name = dns.domains.iter().any(|d| d == "~.");
            vec![
                run(set_dns),
                run(domain),
                Invocation {
                    args: strings(&[
                        "default-route",
                        interface,
                        if every_name { "yes" } else { "no" },
                    ]),
                    optional: true,
                },
            ]
        }
        (Program::SystemdResolve, None) => {
            vec![run(strings(&["--interface", interface, "--revert"]))]
        }
        (Program::SystemdResolve, Some(dns)) => {
            let mut args = strings(&["--interface", interface]);
            for server in servers(dns) {
                args.extend(["--set-dns".to_string(), server]);
            }
            for domain in &dns.domains {
                args.extend(["--set-domain".to_string(), domain.clone()]);
            }
            vec![run(args)]
        }
    }
}

fn find() -> Option<(Program, PathBuf)> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    for (program, name) in [
        (Program::Resolvectl, "resolvectl"),
        (Program::SystemdResolve, "systemd-resolve"),
    ] {
        if let Some(found) = std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
        {
            return Some((program, found));
        }
    }
    None
}

async fn run(program: &std::path::Path, args: &[String]) -> Result<(), PortError> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| PortError::new(EIO, format!("cannot run {shown}: {e}")))?;
    let output = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            PortError::new(
                EIO,
                format!("{shown} did not finish in {} s", TIMEOUT.as_secs()),
            )
        })?
        .map_err(|e| PortError::new(EIO, format!("{shown}: {e}")))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let reason = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    Err(PortError::new(
        EIO,
        format!(
            "{shown} failed ({}){}",
            output.status,
            if reason.is_empty() {
                String::new()
            } else {
                format!(": {}", printable(reason.trim()))
            }
        ),
    ))
}

/// Another program's message, escaped so that it cannot garble a terminal
/// and cut at a length that keeps a status line readable.
fn printable(text: &str) -> String {
    const MAX: usize = 300;
    let escaped: String = text.chars().flat_map(char::escape_debug).collect();
    match escaped.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}…", &escaped[..at]),
        None => escaped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dns(domains: &[&str]) -> LinkDns {
        LinkDns {
            servers: vec![
                "100.64.0.1".parse().expect("ip"),
                "fd00::1".parse().expect("ip"),
            ],
            domains: domains.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn argv(program: Program, dns: Option<&LinkDns>) -> Vec<(String, bool)> {
        commands(program, "vpcgate0", dns)
            .into_iter()
            .map(|i| (i.args.join(" "), i.optional))
            .collect()
    }

    #[test]
    fn resolvectl_sets_servers_domains_and_default_route() {
        assert_eq!(
            argv(
                Program::Resolvectl,
                Some(&dns(&["~mongodb.net", "~internal.example"]))
            ),
            [
                ("dns vpcgate0 100.64.0.1 fd00::1".to_string(), false),
                (
                    "domain vpcgate0 ~mongodb.net ~internal.example".to_string(),
                    false
                ),
                ("default-route vpcgate0 no".to_string(), true),
            ]
        );
        assert_eq!(
            argv(Program::Resolvectl, Some(&dns(&["~."])))[2],
            ("default-route vpcgate0 yes".to_string(), true)
        );
        assert_eq!(
            argv(Program::Resolvectl, None),
            [("revert vpcgate0".to_string(), false)]
        );
    }

    #[test]
    fn systemd_resolve_before_239_takes_one_invocation() {
        assert_eq!(
            argv(Program::SystemdResolve, Some(&dns(&["~mongodb.net"]))),
            [(
                "--interface vpcgate0 --set-dns 100.64.0.1 --set-dns fd00::1 --set-domain ~mongodb.net"
                    .to_string(),
                false
            )]
        );
        assert_eq!(
            argv(Program::SystemdResolve, None),
            [("--interface vpcgate0 --revert".to_string(), false)]
        );
    }
}
