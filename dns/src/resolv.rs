//! The upstreams the host itself uses, from a resolv.conf: its
//! `nameserver` lines in order, as glibc reads them.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};

/// The name servers `text` lists, at port 53. An IPv6 link-local address
/// needs its interface (`fe80::1%eth0`); `scope` turns the name into an
/// index, and one it does not know drops the entry. Lines that are not
/// `nameserver` lines, and addresses that do not parse, are skipped as
/// glibc skips them.
pub fn nameservers(text: &str, scope: impl Fn(&str) -> Option<u32>) -> Vec<SocketAddr> {
    let mut list = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(word) = words.next() else { continue };
        let (addr, zone) = match word.split_once('%') {
            Some((addr, zone)) => (addr, Some(zone)),
            None => (word, None),
        };
        let Ok(ip) = addr.parse::<IpAddr>() else {
            continue;
        };
        if ip.is_unspecified() {
            continue;
        }
        let socket = match (ip, zone) {
            (IpAddr::V6(v6), Some(zone)) => match scope(zone) {
                Some(index) => SocketAddr::V6(SocketAddrV6::new(v6, 53, 0, index)),
                None => continue,
            },
            (IpAddr::V6(v6), None) if v6.is_unicast_link_local() => continue,
            (ip, _) => SocketAddr::new(ip, 53),
        };
        if !list.contains(&socket) {
            list.push(socket);
        }
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_in_order_as_glibc_reads_them() {
        let text = "# generated\nsearch ec2.internal\nnameserver 198.18.0.2\n\
                    nameserver   fd00::53  # comment\noptions edns0\nnameserver bogus\n\
                    nameserver 198.18.0.2\nnameserver 0.0.0.0\nnameserver\n\
                    nameserver fe80::1%eth0\nnameserver fe80::2%nope\nnameserver fe80::3\n";
        let got = nameservers(text, |zone| (zone == "eth0").then_some(2));
        let want: Vec<SocketAddr> = vec![
            "198.18.0.2:53".parse().expect("v4"),
            "[fd00::53]:53".parse().expect("v6"),
            SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().expect("ll"), 53, 0, 2)),
        ];
        assert_eq!(got, want);
        assert!(nameservers("", |_| None).is_empty());
    }
}
