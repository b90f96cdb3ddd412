//! Doctor's DNS checks: on a gateway, whether the forwarder listens and
//! whether each upstream it forwards to answers a query from this host; on
//! a client, whether the split DNS a gateway offers is in effect.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use vpcgate_proto::{DnsStatus, LinkDnsStatus};

use super::{Check, Level};

/// A resolver on the VPC answers in milliseconds; this allows for one many
/// times slower, and bounds doctor's run when one never answers.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The forwarder and its upstreams. `probe` asks one upstream a question
/// and says whether it answered (any response code: it is up).
pub fn forwarder(
    dns: Option<&DnsStatus>,
    gateway: bool,
    probe: impl Fn(SocketAddr) -> Result<(), String>,
) -> Check {
    let id = "dns";
    let Some(dns) = dns else {
        return match gateway {
            true => Check::new(
                id,
                Level::Ok,
                "the DNS forwarder is off, so clients resolve names themselves".to_string(),
            )
            .fix(
                "vpcgate set --dns on  # to let clients resolve the VPC's private names"
                    .to_string(),
            ),
            false => Check::new(
                id,
                Level::Ok,
                "no DNS forwarder: this node advertises no ranges".to_string(),
            ),
        };
    };
    if let Some(problem) = &dns.problem {
        let mut check = Check::new(
            id,
            Level::Fail,
            format!("the DNS forwarder does not work: {problem}"),
        );
        if dns.upstreams.is_empty() {
            check = check.fix("vpcgate set --dns-upstream IP  # the VPC's resolver".to_string());
        }
        return check;
    }
    let mut silent = Vec::new();
    let mut answering = Vec::new();
    for upstream in &dns.upstreams {
        let Ok(addr) = upstream.parse::<SocketAddr>() else {
            silent.push(format!("{upstream} (not an address)"));
            continue;
        };
        match probe(addr) {
            Ok(()) => answering.push(upstream.clone()),
            Err(e) => silent.push(format!("{upstream} ({e})")),
        }
    }
    let source = match dns.upstream_source.as_str() {
        "" => String::new(),
        s => format!(" (from {s})"),
    };
    let listening = dns.listening.join(", ");
    match (answering.is_empty(), silent.is_empty()) {
        (_, true) => Check::new(
            id,
            Level::Ok,
            format!(
                "answers tunnel peers on {listening}, forwarding to {}{source}, which answer",
                answering.join(", ")
            ),
        ),
        (false, false) => Check::new(
            id,
            Level::Warn,
            format!(
                "answers tunnel peers on {listening}; of its upstreams{source}, {} answer and {} do not",
                answering.join(", "),
                silent.join(", ")
            ),
        ),
        (true, false) => Check::new(
            id,
            Level::Fail,
            format!(
                "answers tunnel peers on {listening}, but no upstream{source} answers: {}",
                silent.join(", ")
            ),
        )
        .fix("vpcgate set --dns-upstream IP  # the VPC's resolver, if the VM's own is wrong".to_string()),
    }
}

/// A client's split DNS, as the gateways offer it.
pub fn split(link: &LinkDnsStatus) -> Check {
    let id = "split_dns";
    let what = format!(
        "{} via {} (offered by {})",
        link.domains.join(", "),
        link.servers.join(", "),
        link.from.join(", ")
    );
    if link.applied {
        return Check::new(id, Level::Ok, format!("systemd-resolved sends {what}"));
    }
    let why = link.problem.as_deref().unwrap_or("not applied yet");
    Check::new(
        id,
        Level::Warn,
        format!("the gateway's DNS is not in effect ({why}): {what}"),
    )
    .fix(link.command.clone())
}

/// Asks `upstream` for the root's NS records over UDP from a fresh socket;
/// any response with our ID counts.
pub fn probe(upstream: SocketAddr) -> Result<(), String> {
    let bind: SocketAddr = match upstream {
        SocketAddr::V4(_) => "0.0.0.0:0",
        SocketAddr::V6(_) => "[::]:0",
    }
    .parse()
    .map_err(|e| format!("{e}"))?;
    let socket = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    socket.connect(upstream).map_err(|e| e.to_string())?;
    let id = query_id();
    socket.send(&query(id)).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let mut buf = [0u8; 1232];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no answer in {} s", PROBE_TIMEOUT.as_secs()));
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match socket.recv(&mut buf) {
            Ok(n) if is_reply(&buf[..n], id) => return Ok(()),
            // Something else on our port: keep waiting for ours.
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!("no answer in {} s", PROBE_TIMEOUT.as_secs()))
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A query ID that differs from run to run; nothing depends on it being
/// unpredictable (the socket is connected and ours alone).
fn query_id() -> u16 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    (nanos ^ std::process::id()) as u16
}

/// `. IN NS`, recursion desired.
fn query(id: u16) -> [u8; 17] {
    let mut q = [0u8; 17];
    q[..2].copy_from_slice(&id.to_be_bytes());
    q[2] = 0x01; // RD
    q[5] = 1; // QDCOUNT
              // Question: the root name (one zero byte, q[12]), type NS, class IN.
    q[13..15].copy_from_slice(&2u16.to_be_bytes());
    q[15..17].copy_from_slice(&1u16.to_be_bytes());
    q
}

fn is_reply(packet: &[u8], id: u16) -> bool {
    packet.len() >= 12 && packet[..2] == id.to_be_bytes() && packet[2] & 0x80 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(upstreams: &[&str], problem: Option<&str>) -> DnsStatus {
        DnsStatus {
            listening: vec!["100.64.0.1:53".into()],
            upstreams: upstreams.iter().map(|s| s.to_string()).collect(),
            upstream_source: "/etc/resolv.conf".into(),
            problem: problem.map(str::to_string),
            ..DnsStatus::default()
        }
    }

    fn answers_only(up: &'static str) -> impl Fn(SocketAddr) -> Result<(), String> {
        move |addr| match addr.to_string() == up {
            true => Ok(()),
            false => Err("no answer in 2 s".into()),
        }
    }

    #[test]
    fn upstreams_are_judged_by_whether_they_answer() {
        let probe = answers_only("198.18.64.2:53");
        let ok = forwarder(Some(&status(&["198.18.64.2:53"], None)), true, &probe);
        assert_eq!(ok.status, Level::Ok, "{ok:?}");
        assert!(
            ok.message
                .contains("198.18.64.2:53 (from /etc/resolv.conf)"),
            "{ok:?}"
        );
        let some = forwarder(
            Some(&status(&["198.18.64.2:53", "198.18.64.3:53"], None)),
            true,
            &probe,
        );
        assert_eq!(some.status, Level::Warn, "{some:?}");
        assert!(
            some.message.contains("198.18.64.3:53 (no answer in 2 s)"),
            "{some:?}"
        );
        let none = forwarder(Some(&status(&["198.18.64.3:53"], None)), true, &probe);
        assert_eq!(none.status, Level::Fail, "{none:?}");
        let broken = forwarder(
            Some(&status(&[], Some("/etc/resolv.conf lists no name server"))),
            true,
            &probe,
        );
        assert_eq!(broken.status, Level::Fail);
        assert!(
            broken.fix[0].starts_with("vpcgate set --dns-upstream"),
            "{broken:?}"
        );
        assert_eq!(forwarder(None, true, &probe).status, Level::Ok);
    }

    #[test]
    fn split_dns_not_in_effect_gives_the_command() {
        let mut link = LinkDnsStatus {
            servers: vec!["100.64.0.1".into()],
            domains: vec!["~mongodb.net".into()],
            from: vec!["gateway".into()],
            applied: true,
            problem: None,
            command:
                "resolvectl dns vpcgate0 100.64.0.1 && resolvectl domain vpcgate0 '~mongodb.net'"
                    .into(),
        };
        assert_eq!(split(&link).status, Level::Ok);
        link.applied = false;
        link.problem = Some("resolvectl failed".into());
        let check = split(&link);
        assert_eq!(check.status, Level::Warn);
        assert_eq!(check.fix, [link.command.clone()]);
    }

    #[test]
    fn the_probe_is_a_root_ns_query_and_only_our_reply_counts() {
        let q = query(0xabcd);
        assert_eq!(&q[..4], &[0xab, 0xcd, 0x01, 0x00]);
        assert_eq!(&q[4..12], &[0, 1, 0, 0, 0, 0, 0, 0]);
        let mut reply = q;
        reply[2] |= 0x80;
        assert!(is_reply(&reply, 0xabcd));
        assert!(!is_reply(&q, 0xabcd), "a query is not a reply");
        assert!(!is_reply(&reply, 0xabce), "another ID");
        assert!(!is_reply(&reply[..11], 0xabcd), "short");
    }
}
