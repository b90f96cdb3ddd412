//! Writes the seed inputs each fuzz target started from: valid packets,
//! UAPI requests as `wg` sends them, control frames as `vpcgate` sends them,
//! state files as the daemon saves them, and route messages as its core
//! builds them. Where the daemon has an encoder, the seed comes from it.
//!
//! `cargo run --example seeds -- DIR` writes `DIR/<target>/<name>`.

use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::IpNet;
use vpcgate_proto::{self as proto, PeerAdd, PeerStatus, Request, Response, SetOptions, Status};
use vpcgated::core::routes_msg::{self, MAX_PACKET, MAX_ROUTES};
use vpcgated::state::{self, Settings, StoredPeer};
use vpcgated::state::Key;

fn main() -> std::io::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "seeds".to_string());
    let out = Path::new(&out);
    for (target, seeds) in [
        ("packet", packet_seeds()),
        ("uapi", uapi_seeds()),
        ("control", control_seeds()),
        ("state", state_seeds()),
        ("routes_msg", routes_msg_seeds()),
        ("dns", dns_seeds()),
    ] {
        let dir = out.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
        println!("{target}: {} seeds", seeds.len());
    }
    Ok(())
}

type Seeds = Vec<(String, Vec<u8>)>;

fn net(text: &str) -> IpNet {
    text.parse().expect("seed prefix")
}

// Packets -----------------------------------------------------------------

const SYN: u8 = 0x02;
const SYN_ACK: u8 = 0x12;
const ACK_PSH: u8 = 0x18;

fn mss(value: u16) -> Vec<u8> {
    let [hi, lo] = value.to_be_bytes();
    vec![2, 4, hi, lo]
}

/// Linux's SYN options: MSS, SACK permitted, timestamps, NOP, window scale.
fn linux_options(value: u16) -> Vec<u8> {
    [
        mss(value),
        vec![4, 2, 8, 10, 0, 1, 0xe2, 0x40, 0, 0, 0, 0, 1, 3, 3, 7],
    ]
    .concat()
}

fn tcp(flags: u8, options: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut options = options.to_vec();
    while !options.len().is_multiple_of(4) {
        options.push(0);
    }
    let mut seg = vec![0u8; 20];
    seg[0..2].copy_from_slice(&40000u16.to_be_bytes());
    seg[2..4].copy_from_slice(&443u16.to_be_bytes());
    seg[4..8].copy_from_slice(&0x0102_0304u32.to_be_bytes());
    if flags & 0x10 != 0 {
        seg[8..12].copy_from_slice(&0x0a0b_0c0du32.to_be_bytes());
    }
    seg[12] = (((20 + options.len()) / 4) as u8) << 4;
    seg[13] = flags;
    seg[14..16].copy_from_slice(&64240u16.to_be_bytes());
    seg.extend_from_slice(&options);
    seg.extend_from_slice(payload);
    seg
}

fn sum(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)])))
        .sum()
}

fn checksum(sum: u32) -> u16 {
    let mut sum = sum;
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// IPv4 with `ip_options` after the fixed header; a TCP segment gets its
/// checksum. `fragment` is the flags-and-offset field.
fn ipv4(protocol: u8, ip_options: &[u8], fragment: u16, mut payload: Vec<u8>) -> Vec<u8> {
    let header_len = 20 + ip_options.len();
    let mut p = vec![0u8; 20];
    p[0] = 0x40 | (header_len / 4) as u8;
    p[2..4].copy_from_slice(&((header_len + payload.len()) as u16).to_be_bytes());
    p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    p[6..8].copy_from_slice(&fragment.to_be_bytes());
    p[8] = 64;
    p[9] = protocol;
    p[12..16].copy_from_slice(&[100, 64, 0, 2]);
    p[16..20].copy_from_slice(&[198, 18, 64, 10]);
    p.extend_from_slice(ip_options);
    let header = checksum(sum(&p));
    p[10..12].copy_from_slice(&header.to_be_bytes());
    if protocol == 6 {
        let pseudo = sum(&p[12..20]) + 6 + payload.len() as u32;
        let c = checksum(pseudo + sum(&payload));
        payload[16..18].copy_from_slice(&c.to_be_bytes());
    }
    p.extend_from_slice(&payload);
    p
}

fn ipv6(next_header: u8, mut payload: Vec<u8>, tcp_at: usize) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    p[6] = next_header;
    p[7] = 64;
    let src: std::net::Ipv6Addr = "fd00:64::2".parse().expect("v6");
    let dst: std::net::Ipv6Addr = "fd00:64:40::10".parse().expect("v6");
    p[8..24].copy_from_slice(&src.octets());
    p[24..40].copy_from_slice(&dst.octets());
    if next_header == 6 {
        let len = (payload.len() - tcp_at) as u32;
        let pseudo = sum(&p[8..40]) + 6 + len;
        let c = checksum(pseudo + sum(&payload[tcp_at..]));
        payload[tcp_at + 16..tcp_at + 18].copy_from_slice(&c.to_be_bytes());
    }
    p.extend_from_slice(&payload);
    p
}

fn packet_seeds() -> Seeds {
    let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1];
    icmp.extend_from_slice(b"ping");
    let mut udp = vec![0x9c, 0x40, 0, 53, 0, 12, 0, 0];
    udp.extend_from_slice(b"dns?");
    let mut hop_by_hop = vec![6, 0, 1, 4, 0, 0, 0, 0];
    hop_by_hop.extend_from_slice(&tcp(SYN, &linux_options(1440), &[]));
    vec![
        (
            "v4-syn-linux",
            ipv4(6, &[], 0x4000, tcp(SYN, &linux_options(1460), &[])),
        ),
        (
            "v4-synack",
            ipv4(6, &[], 0x4000, tcp(SYN_ACK, &linux_options(1460), &[])),
        ),
        (
            "v4-syn-mss-only",
            ipv4(6, &[], 0, tcp(SYN, &mss(8960), &[])),
        ),
        (
            "v4-syn-odd-offset",
            ipv4(6, &[], 0, tcp(SYN, &[&[1][..], &mss(1460)].concat(), &[])),
        ),
        (
            "v4-syn-two-mss",
            ipv4(6, &[], 0, tcp(SYN, &[mss(1460), mss(9000)].concat(), &[])),
        ),
        (
            "v4-syn-ip-options",
            ipv4(6, &[1, 1, 1, 0], 0, tcp(SYN, &linux_options(1460), &[])),
        ),
        (
            "v4-syn-first-fragment",
            ipv4(6, &[], 0x2000, tcp(SYN, &mss(1460), &[])),
        ),
        (
            "v4-syn-small-mss",
            ipv4(6, &[], 0x4000, tcp(SYN, &linux_options(536), &[])),
        ),
        (
            "v4-syn-with-data",
            ipv4(6, &[], 0, tcp(SYN, &mss(1460), b"fast open")),
        ),
        (
            "v4-ack-data",
            ipv4(6, &[], 0x4000, tcp(ACK_PSH, &[], b"GET / HTTP/1.1\r\n\r\n")),
        ),
        ("v4-icmp-echo", ipv4(1, &[], 0, icmp.clone())),
        ("v4-udp", ipv4(17, &[], 0, udp)),
        (
            "v6-syn-linux",
            ipv6(6, tcp(SYN, &linux_options(1440), &[]), 0),
        ),
        (
            "v6-synack",
            ipv6(6, tcp(SYN_ACK, &linux_options(1440), &[]), 0),
        ),
        (
            "v6-syn-odd-offset",
            ipv6(6, tcp(SYN, &[&[1][..], &mss(1440)].concat(), &[]), 0),
        ),
        ("v6-hop-by-hop-syn", ipv6(0, hop_by_hop, 8)),
        ("v6-icmp-echo", ipv6(58, icmp, 0)),
    ]
    .into_iter()
    .map(|(name, bytes)| (name.to_string(), bytes))
    .collect()
}

// UAPI --------------------------------------------------------------------

const PRIVATE: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
const PEER_A: &str = "c6cf31ba1c4ae0ba12e3a23f6b7a5ba69b71a6eb34c7b8f1ca4d0d2b5c2a2b61";
const PEER_B: &str = "662b6d3efc8a0e03ba0a74c3b7c0d4f84b8c1e6cc4ee6f5a8ab76b45d31f0d49";
const PSK: &str = "188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d58dacce4ce6f58b";
const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn uapi_seeds() -> Seeds {
    let set_peer = format!(
        "set=1\npublic_key={PEER_A}\nendpoint=198.18.0.2:51820\n\
         persistent_keepalive_interval=25\nreplace_allowed_ips=true\n\
         allowed_ip=100.64.0.2/32\nallowed_ip=198.18.64.0/20\n\n"
    );
    let setconf = format!(
        "set=1\nprivate_key={PRIVATE}\nlisten_port=51820\nfwmark=0\nreplace_peers=true\n\
         public_key={PEER_A}\npreshared_key={PSK}\nendpoint=[fd00:2::10]:51820\n\
         persistent_keepalive_interval=0\nreplace_allowed_ips=true\n\
         allowed_ip=100.64.0.2/32\nallowed_ip=fd00:64::2/128\n\
         public_key={PEER_B}\npreshared_key={ZERO}\nreplace_allowed_ips=true\n\
         allowed_ip=0.0.0.0/0\nallowed_ip=::/0\n\n"
    );
    let edits = format!(
        "set=1\nlisten_port=0\nfwmark=0x2a\npublic_key={PEER_A}\nupdate_only=true\n\
         allowed_ip=-198.18.64.0/20\nendpoint=[fe80::1%2]:51820\nprotocol_version=1\n\
         public_key={PEER_B}\nremove=true\n\n"
    );
    let several = format!("get=1\n\n{set_peer}get=1\n\nset=1\nprivate_key={ZERO}\n\n");
    let bad_then_good = format!("set=1\nlisten_port=70000\npublic_key={PEER_A}\n\nget=1\n\n");
    vec![
        ("get", "get=1\n\n".to_string()),
        ("set-peer", set_peer),
        ("setconf", setconf),
        ("edits", edits),
        ("several-requests", several),
        ("error-then-get", bad_then_good),
    ]
    .into_iter()
    .map(|(name, text)| (name.to_string(), text.into_bytes()))
    .collect()
}

// Control -----------------------------------------------------------------

fn request(r: &Request) -> Vec<u8> {
    proto::encode(r).expect("encode request")
}

fn response(r: &Response) -> Vec<u8> {
    proto::encode(r).expect("encode response")
}

fn raw_frame(json: &str) -> Vec<u8> {
    let mut f = (json.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(json.as_bytes());
    f
}

fn peer_status(name: Option<&str>) -> PeerStatus {
    PeerStatus {
        name: name.map(str::to_string),
        public_key: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into(),
        endpoint: Some("198.18.0.2:51820".into()),
        allowed_ips: vec!["100.64.0.2/32".into()],
        latest_handshake: Some(1_700_000_000),
        rx_bytes: 1234,
        tx_bytes: 5678,
        persistent_keepalive: Some(25),
        accept_routes: true,
    }
}

fn control_seeds() -> Seeds {
    let requests = vec![
        ("status", Request::Status),
        ("get-routes", Request::GetAdvertisedRoutes),
        (
            "advertise",
            Request::AdvertiseRoutes {
                routes: vec![
                    "198.18.64.0/20,198.19.101.0/24".into(),
                    "fd00:64:1::/48".into(),
                ],
                exit_node: false,
                checks: vec![
                    "tcp:198.19.101.10:5432".into(),
                    "tcp:[fd00:64:1::10]:27017".into(),
                ],
            },
        ),
        ("drain", Request::Drain { on: true }),
        ("identity-export", Request::IdentityExport),
        (
            "identity-import",
            Request::IdentityImport {
                document: concat!(
                    r#"{"format":"vpcgate-identity/1","#,
                    r#""private_key":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=","#,
                    r#""settings":{"addresses":["100.64.0.1/24"],"listen_port":51820,"#,
                    r#""advertised_routes":["198.19.101.0/24"],"#,
                    r#""checks":["tcp:198.19.101.10:5432"]},"peers":[]}"#
                )
                .to_string(),
            },
        ),
        (
            "advertise-exit-node",
            Request::AdvertiseRoutes {
                routes: vec!["0.0.0.0/0".into(), "::/0".into()],
                exit_node: true,
                checks: vec![],
            },
        ),
        (
            "set-all",
            Request::Set(SetOptions {
                snat: Some(false),
                mss_clamp: Some(true),
                public_endpoint: Some("gw.example.com:51820".into()),
                listen_port: Some(51820),
                address: Some(vec!["100.64.0.1/24".into(), "fd00:64::1/64".into()]),
                mtu: Some(1380),
                dns: Some(true),
                dns_upstream: Some(vec!["198.18.64.2".into(), "fd00:64::53".into()]),
                dns_zones: Some(vec!["mongodb.net".into(), "internal.example".into()]),
                priority: Some(50),
            }),
        ),
        (
            "set-endpoint-v6",
            Request::Set(SetOptions {
                public_endpoint: Some("[fd00:2::10]:51820".into()),
                ..SetOptions::default()
            }),
        ),
        (
            "peer-add-generated",
            Request::PeerAdd(PeerAdd {
                name: "laptop".into(),
                ..PeerAdd::default()
            }),
        ),
        (
            "peer-add-own-key",
            Request::PeerAdd(PeerAdd {
                name: "office-gw".into(),
                public_key: Some("xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=".into()),
                allowed_ips: vec!["100.64.0.9/32 10.20.0.0/16".into()],
                endpoint: Some("198.18.0.2:51820".into()),
                keepalive: Some(25),
                accept_routes: true,
                accept_default_route: false,
            }),
        ),
        (
            "peer-remove",
            Request::PeerRemove {
                name: "laptop".into(),
            },
        ),
        ("peer-list", Request::PeerList),
        (
            "peer-config",
            Request::PeerConfig {
                name: "laptop".into(),
            },
        ),
    ];
    let mut seeds: Seeds = requests
        .iter()
        .map(|(name, r)| (format!("request-{name}"), request(r)))
        .collect();
    seeds.push((
        "connection-three-requests".into(),
        [
            request(&Request::Status),
            request(&Request::PeerList),
            request(&Request::GetAdvertisedRoutes),
        ]
        .concat(),
    ));
    seeds.push((
        "request-minimal-peer-add".into(),
        raw_frame(r#"{"request":"peer_add","name":"phone"}"#),
    ));
    seeds.push((
        "request-unknown".into(),
        raw_frame(r#"{"request":"reboot"}"#),
    ));
    seeds.push((
        "oversized-prefix".into(),
        [&((1u32 << 20) + 1).to_be_bytes()[..], b"{}"].concat(),
    ));
    let status = Status {
        interface: "vpcgate0".into(),
        public_key: "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=".into(),
        listen_port: 51820,
        address: "100.64.0.1/24".into(),
        addresses: vec!["100.64.0.1/24".into(), "fd00:64::1/64".into()],
        mtu: 1420,
        public_endpoint: Some("gw.example.com:51820".into()),
        advertised_routes: vec!["198.18.64.0/20".into()],
        accepted_routes: vec![],
        snat: true,
        snat_form: Some("inet".into()),
        mss_clamp: true,
        warnings: vec!["IPv4 forwarding is off".into()],
        peers: vec![peer_status(Some("laptop")), peer_status(None)],
        drops: vec![("not_advertised".into(), 3), ("source".into(), 0)],
        dns: Some(Box::new(vpcgate_proto::DnsStatus {
            listening: vec!["100.64.0.1:53".into()],
            upstreams: vec!["198.18.64.2:53".into()],
            upstream_source: "/etc/resolv.conf".into(),
            zones: vec!["mongodb.net".into()],
            problem: None,
            queries: 12,
            cache_hits: 4,
            cache_entries: 3,
        })),
        link_dns: Some(Box::new(vpcgate_proto::LinkDnsStatus {
            servers: vec!["100.64.0.9".into()],
            domains: vec!["~mongodb.net".into()],
            from: vec!["gateway".into()],
            applied: false,
            problem: Some("resolvectl failed".into()),
            command: "resolvectl dns vpcgate0 100.64.0.9 && resolvectl domain vpcgate0 '~mongodb.net'".into(),
        })),
        advertising: vec![],
        draining: true,
        checks: vec![vpcgate_proto::CheckStatus {
            target: "tcp:198.18.64.20:443".into(),
            state: "unhealthy".into(),
            for_secs: Some(4),
            last: Some("connection refused".into()),
            last_ok: Some(false),
            governs: vec!["198.18.64.0/20".into()],
        }],
        carriers: vec![vpcgate_proto::CarrierStatus {
            range: "198.19.101.0/24".into(),
            via: "gw-b".into(),
            for_secs: 12,
            standby: vec!["gw-a".into()],
        }],
        failovers: 2,
    };
    let responses = [
        ("status", Response::Status(status)),
        (
            "routes",
            Response::Routes {
                routes: vec!["198.18.64.0/20".into()],
                warnings: vec![],
                checks: vec!["tcp:198.18.64.20:443".into()],
                draining: true,
            },
        ),
        (
            "done",
            Response::Done {
                message: "removed peer laptop".into(),
            },
        ),
        (
            "peer-added",
            Response::PeerAdded {
                name: "laptop".into(),
                allowed_ips: vec!["100.64.0.2/32".into()],
                config: Some("[Interface]\nPrivateKey = x\n".into()),
            },
        ),
        (
            "peers",
            Response::Peers {
                peers: vec![peer_status(Some("laptop"))],
            },
        ),
        (
            "peer-config",
            Response::PeerConfig {
                config: "[Interface]\n".into(),
            },
        ),
        (
            "error",
            Response::Error {
                message: "no peer named \"x\"".into(),
            },
        ),
    ];
    seeds.extend(
        responses
            .iter()
            .map(|(name, r)| (format!("response-{name}"), response(r))),
    );
    seeds
}

// State files -------------------------------------------------------------

/// A key in base64 as the daemon writes keys, from a repeated byte.
fn b64(byte: u8) -> String {
    state::encode_key_file(&Key([byte; 32])).trim().to_string()
}

fn stored(name: Option<&str>, key: u8) -> StoredPeer {
    StoredPeer {
        name: name.map(str::to_string),
        public_key: b64(key),
        private_key: None,
        preshared_key: None,
        endpoint: None,
        persistent_keepalive: 0,
        allowed_ips: vec![],
        accept_routes: false,
        accept_default_route: false,
        learned_routes: vec![],
    }
}

fn state_seeds() -> Seeds {
    let key = Key([
        0x48, 0x3c, 0x1d, 0x92, 0x6e, 0x0a, 0x55, 0x71, 0x02, 0xbb, 0x4f, 0x90, 0x1e, 0x77, 0x3a,
        0x08, 0xd1, 0x25, 0x6f, 0xc3, 0x99, 0x41, 0x0e, 0x7d, 0xaa, 0x13, 0x5c, 0x86, 0x2f, 0xe4,
        0x31, 0x58,
    ]);
    let defaults = Settings::new(vec![net("100.64.0.1/24")], 51820);
    let mut full = Settings::new(vec![net("100.64.0.1/24"), net("fd00:64::1/64")], 51820);
    full.advertised_routes = vec![net("198.18.64.0/20"), net("fd00:64:40::/48")];
    full.exit_node = true;
    full.snat = false;
    full.mss_clamp = false;
    full.public_endpoint = Some("[fd00:2::10]:51820".into());
    full.mtu = 1380;

    let mut laptop = stored(Some("laptop"), 0x11);
    laptop.private_key = Some(b64(0x48));
    laptop.allowed_ips = vec![net("100.64.0.2/32"), net("fd00:64::2/128")];
    let mut office = stored(Some("office-gw"), 0x22);
    office.preshared_key = Some(b64(0x33));
    office.endpoint = Some("198.18.0.2:51820".parse().expect("endpoint"));
    office.persistent_keepalive = 25;
    office.allowed_ips = vec![net("100.64.0.9/32")];
    office.accept_routes = true;
    office.accept_default_route = true;
    office.learned_routes = vec![net("10.20.0.0/16"), net("0.0.0.0/0")];
    let mut wg_added = stored(None, 0x44);
    wg_added.endpoint = Some("[fd00:2::20]:51820".parse().expect("endpoint"));

    let settings = |s: &Settings| state::encode_settings(s).expect("encode settings");
    let peers = |p: &[StoredPeer]| state::encode_peers(p).expect("encode peers").to_vec();
    vec![
        (
            "private.key",
            state::encode_key_file(&key).as_bytes().to_vec(),
        ),
        ("settings-default.json", settings(&defaults)),
        ("settings-full.json", settings(&full)),
        (
            "settings-minimal.json",
            br#"{"addresses":["100.64.0.1/24"],"listen_port":51820}"#.to_vec(),
        ),
        ("peers-empty.json", b"[]\n".to_vec()),
        ("peers.json", peers(&[laptop, office, wg_added])),
    ]
    .into_iter()
    .map(|(name, bytes)| (name.to_string(), bytes))
    .collect()
}

// Route messages ----------------------------------------------------------

fn routes_msg_seeds() -> Seeds {
    let gateway = Ipv4Addr::new(100, 64, 0, 1);
    let laptop = Ipv4Addr::new(100, 64, 0, 2);
    let mut buf = [0u8; MAX_PACKET];
    let mut seeds = Seeds::new();
    let n = routes_msg::build_request(laptop, gateway, &mut buf).expect("request fits");
    seeds.push(("request".into(), buf[..n].to_vec()));
    let sets: Vec<(&str, Vec<IpNet>)> = vec![
        ("routes-empty", vec![]),
        (
            "routes-v4",
            vec![net("198.18.64.0/20"), net("198.19.101.0/24")],
        ),
        (
            "routes-mixed",
            vec![
                net("198.18.64.0/20"),
                net("fd00:64:1::/48"),
                net("0.0.0.0/0"),
                net("::/0"),
            ],
        ),
        (
            "routes-max",
            (0..MAX_ROUTES)
                .map(|i| net(&format!("10.{i}.0.0/16")))
                .collect(),
        ),
    ];
    for (i, (name, routes)) in sets.into_iter().enumerate() {
        let n = routes_msg::build_routes(gateway, laptop, 1 + i as u64, &routes, None, 100, &mut buf)
            .expect("routes fit");
        seeds.push((name.into(), buf[..n].to_vec()));
    }
    let offer = routes_msg::DnsOffer::new(
        &[gateway.into(), "fd00:64::1".parse().expect("ip")],
        &["mongodb.net", "privatelink.database.windows.net"],
    )
    .expect("a valid offer");
    let n = routes_msg::build_routes(
        gateway,
        laptop,
        9,
        &[net("198.18.64.0/20")],
        Some(&offer),
        50,
        &mut buf,
    )
    .expect("routes and DNS fit");
    seeds.push(("routes-dns".into(), buf[..n].to_vec()));
    let n = routes_msg::build_request(laptop, gateway, &mut buf).expect("request fits");
    let mut other_port = buf[..n].to_vec();
    other_port[22..24].copy_from_slice(&53u16.to_be_bytes());
    seeds.push(("ordinary-udp".into(), other_port));
    seeds
}

// DNS forwarder scripts ----------------------------------------------------
//
// Each seed is a script for `fuzzing::dns`: a byte of upstreams (bit i is
// upstream i), then operations, each an opcode byte and its arguments, in
// the order the harness reads them.

/// A well-formed query: ID, EDNS size (0 for none), labels of a–z, a
/// query type (0 A, 1 AAAA, 2 AXFR, 3 TXT), then the asking peer and TCP.
fn dns_query(id: u16, edns: u16, labels: &[&str], qtype: u8, peer: u8, tcp: bool) -> Vec<u8> {
    let mut op = vec![1];
    op.extend_from_slice(&id.to_be_bytes());
    op.push(1); // opcode QUERY
    op.extend_from_slice(&edns.to_be_bytes());
    op.push(labels.len().saturating_sub(1) as u8);
    for label in labels {
        op.push(label.len().saturating_sub(1) as u8);
        op.extend(label.bytes().map(|b| b - b'a'));
    }
    op.extend_from_slice(&[qtype, 1, peer, u8::from(tcp)]);
    op
}

/// The reply to the `pick`th open upstream query: RCODE selector (0 NOERROR,
/// 4 SERVFAIL, 5 NXDOMAIN, 6 REFUSED), TC, and `answers` A records.
fn dns_reply(pick: u8, rcode: u8, tc: bool, answers: u8, ttl: u16) -> Vec<u8> {
    let flags = rcode | if tc { 0x80 } else { 0 };
    let mut op = vec![2, pick, 1, flags, answers];
    op.extend_from_slice(&ttl.to_be_bytes());
    op
}

fn dns_wait(ms: u16) -> Vec<u8> {
    let mut op = vec![5];
    op.extend_from_slice(&ms.to_be_bytes());
    op
}

fn dns_seeds() -> Seeds {
    let db = ["cluster", "db", "internal"];
    let script = |upstreams: u8, ops: Vec<Vec<u8>>| {
        let mut s = vec![upstreams];
        s.extend(ops.into_iter().flatten());
        s
    };
    vec![
        (
            "seed-answered".into(),
            script(
                1,
                vec![dns_query(7, 1232, &db, 0, 0, false), dns_reply(0, 0, false, 2, 60)],
            ),
        ),
        (
            "seed-cached".into(),
            script(
                1,
                vec![
                    dns_query(7, 1232, &db, 0, 0, false),
                    dns_reply(0, 0, false, 1, 60),
                    dns_wait(1000),
                    dns_query(8, 0, &db, 0, 1, true),
                ],
            ),
        ),
        (
            "seed-truncated-for-udp".into(),
            script(
                1,
                vec![dns_query(9, 0, &db, 0, 0, false), dns_reply(0, 0, false, 80, 60)],
            ),
        ),
        (
            "seed-tc-retried-over-tcp".into(),
            script(
                1,
                vec![
                    dns_query(10, 1232, &db, 1, 0, false),
                    dns_reply(0, 0, true, 0, 0),
                    dns_reply(0, 0, false, 60, 300),
                ],
            ),
        ),
        (
            "seed-servfail-then-next".into(),
            script(
                3,
                vec![
                    dns_query(11, 1232, &db, 3, 2, false),
                    dns_reply(0, 4, false, 0, 0),
                    dns_reply(0, 5, false, 0, 900),
                ],
            ),
        ),
        (
            "seed-timeouts".into(),
            script(
                7,
                vec![
                    dns_query(12, 512, &db, 0, 0, false),
                    dns_query(13, 512, &db, 0, 1, true),
                    dns_wait(2500),
                    dns_wait(2500),
                    dns_wait(2500),
                ],
            ),
        ),
        (
            "seed-axfr-refused".into(),
            script(1, vec![dns_query(14, 0, &["internal"], 2, 0, true)]),
        ),
        (
            "seed-garbage".into(),
            script(1, vec![vec![0, 5, 0xff, 0, 0, 1, 2, 3, 0]]),
        ),
        (
            "seed-upstreams-change-mid-query".into(),
            script(
                3,
                vec![
                    dns_query(15, 1232, &db, 0, 0, false),
                    vec![6, 2],
                    dns_reply(0, 0, true, 0, 0),
                    dns_reply(0, 0, false, 3, 60),
                ],
            ),
        ),
    ]
}
