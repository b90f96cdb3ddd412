//! `vpcgate peer add` on a cloud VM with no public endpoint set: the
//! address client configs point at is read from the provider's metadata
//! service, with doctor's DMI detection and HTTP client, and saved with
//! `Request::Set`, so a fresh VM needs no `vpcgate set --public-endpoint`
//! first. Off-cloud nothing is contacted, and vpcgated refuses the peer as
//! before, asking for `--public-endpoint`.

use std::path::PathBuf;

use anyhow::Context;
use vpcgate_proto::{PeerAdd, Request, Response, SetOptions, Status};

use crate::doctor::{cloud, http, CloudArgs};

/// Whether `add` needs a public endpoint that is not set. With its own key
/// a peer gets no config and needs none; a taken name is refused before the
/// endpoint is looked at, so it must not be the reason one is saved.
fn needed(status: &Status, add: &PeerAdd) -> bool {
    add.public_key.is_none()
        && status.public_endpoint.is_none()
        && !status
            .peers
            .iter()
            .any(|p| p.name.as_deref() == Some(add.name.as_str()))
}

/// Saves this VM's public address as the public endpoint when `add` needs
/// one and the metadata service has it. When it cannot, it says why on
/// stderr and leaves the refusal to vpcgated; a refused save is an error.
pub fn ensure(socket: &PathBuf, args: &CloudArgs, add: &PeerAdd) -> anyhow::Result<()> {
    let status = match crate::request(socket, &Request::Status)? {
        Response::Status(status) => status,
        other => return Err(crate::unexpected(other)),
    };
    if !needed(&status, add) {
        return Ok(());
    }
    let Some(provider) = cloud::detect(&cloud::Dmi::read(&args.dmi_dir)) else {
        return Ok(());
    };
    let found = http::Endpoint::parse(&args.metadata_endpoint)
        .map_err(|e| e.to_string())
        .and_then(|at| cloud::public_ipv4(provider, &at));
    let ip = match found {
        Ok(ip) => ip,
        Err(why) => {
            eprintln!(
                "vpcgate: no public address from the {provider} metadata service at {}: {why}",
                args.metadata_endpoint
            );
            return Ok(());
        }
    };
    let endpoint = format!("{ip}:{}", status.listen_port);
    let set = SetOptions {
        public_endpoint: Some(endpoint.clone()),
        ..SetOptions::default()
    };
    let saved = crate::request(socket, &Request::Set(set)).with_context(|| {
        format!(
            "cannot save {endpoint}, from the {provider} metadata service, as the public endpoint"
        )
    })?;
    match saved {
        Response::Done { .. } => {}
        other => return Err(crate::unexpected(other)),
    }
    eprintln!(
        "vpcgate: using public endpoint {endpoint} from the {provider} metadata service \
         (saved; change it with vpcgate set --public-endpoint)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;
    use vpcgate_proto::PeerStatus;

    fn status(public_endpoint: Option<&str>, peer: Option<&str>) -> Status {
        // Through JSON, so the test does not depend on every field of Status.
        let mut status: Status = serde_json::from_value(serde_json::json!({
            "interface": "vpcgate0", "public_key": "", "listen_port": 51820,
            "address": "100.64.0.1/24", "addresses": ["100.64.0.1/24"],
            "mtu": 1420, "public_endpoint": public_endpoint,
            "advertised_routes": [], "accepted_routes": [], "snat": true,
            "mss_clamp": true, "warnings": [], "peers": [], "drops": []
        }))
        .expect("status");
        if let Some(name) = peer {
            let peer: PeerStatus = serde_json::from_value(serde_json::json!({
                "name": name, "public_key": "", "endpoint": null, "allowed_ips": [],
                "latest_handshake": null, "rx_bytes": 0, "tx_bytes": 0,
                "persistent_keepalive": null
            }))
            .expect("peer");
            status.peers.push(peer);
        }
        status
    }

    #[test]
    fn only_a_generated_peer_without_an_endpoint_needs_one() {
        let laptop = PeerAdd {
            name: "laptop".into(),
            ..PeerAdd::default()
        };
        assert!(needed(&status(None, None), &laptop));
        assert!(needed(&status(None, Some("phone")), &laptop));
        assert!(!needed(&status(Some("gw.example:51820"), None), &laptop));
        assert!(
            !needed(&status(None, Some("laptop")), &laptop),
            "a taken name is refused anyway"
        );
        let own_key = PeerAdd {
            public_key: Some("hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=".into()),
            ..laptop
        };
        assert!(!needed(&status(None, None), &own_key));
    }

    /// A GCP metadata service on loopback that answers one request with
    /// `answer`.
    fn gcp_answering(answer: &'static str) -> (String, std::thread::JoinHandle<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let head = http::read_head(&mut conn);
            assert!(
                head.starts_with("GET /computeMetadata/v1/instance/network-interfaces/0/access-configs/0/external-ip HTTP/1.1\r\n")
                    && head.contains("\r\nMetadata-Flavor: Google\r\n"),
                "{head}"
            );
            let reply = format!(
                "HTTP/1.1 200 OK\r\nMetadata-Flavor: Google\r\nContent-Length: {}\r\n\r\n{answer}",
                answer.len()
            );
            conn.write_all(reply.as_bytes()).expect("write");
        });
        (url, server)
    }

    #[test]
    fn a_refused_save_is_an_error_with_the_daemons_message() {
        let dir = std::env::temp_dir().join(format!("vpcgate-endpoint-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("dmi")).expect("mkdir");
        std::fs::write(dir.join("dmi/sys_vendor"), "Google\n").expect("write");
        let socket = dir.join("ctl.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        // The daemon: Status without an endpoint, then the Set, refused.
        let daemon = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let asked: Request = vpcgate_proto::read_frame(&mut conn).expect("request");
            assert_eq!(asked, Request::Status);
            let mut status = status(None, None);
            status.listen_port = 51833;
            vpcgate_proto::write_frame(&mut conn, &Response::Status(status)).expect("reply");
            let (mut conn, _) = listener.accept().expect("accept");
            let asked: Request = vpcgate_proto::read_frame(&mut conn).expect("request");
            let message = "refused for the test".to_string();
            vpcgate_proto::write_frame(&mut conn, &Response::Error { message }).expect("reply");
            asked
        });
        let (url, metadata) = gcp_answering("203.0.113.7");
        let args = CloudArgs {
            metadata_endpoint: url,
            dmi_dir: dir.join("dmi"),
        };
        let add = PeerAdd {
            name: "laptop".into(),
            ..PeerAdd::default()
        };
        let err = ensure(&socket, &args, &add).expect_err("refused");
        assert_eq!(
            format!("{err:#}"),
            "cannot save 203.0.113.7:51833, from the GCP metadata service, as the public endpoint: refused for the test"
        );
        let set = daemon.join().expect("daemon");
        assert_eq!(
            set,
            Request::Set(SetOptions {
                public_endpoint: Some("203.0.113.7:51833".into()),
                ..SetOptions::default()
            })
        );
        metadata.join().expect("metadata");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
