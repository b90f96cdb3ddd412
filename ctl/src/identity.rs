//! Carrying clients to a second gateway: one peer (`vpcgate peer export |
//! peer import`, public data only), or the whole identity (`vpcgate
//! identity export | import`: the key, peers and settings, for a twin
//! behind the same load balancer).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Context};
use clap::Subcommand;
use zeroize::Zeroizing;

/// The largest document read; the daemon's request limit is the same.
const MAX_DOCUMENT: u64 = vpcgate_proto::MAX_FRAME as u64;

#[derive(Subcommand, Debug)]
pub enum IdentityCmd {
    /// Print this gateway's private key, peers and settings as one
    /// document. It is as secret as the key file: pipe it to the second
    /// gateway (`ssh gw2 vpcgate identity import -`) or keep it mode 0600.
    Export,
    /// Become the gateway that exported FILE (`-`: standard input): its
    /// private key, peers and settings replace this one's, live and saved.
    /// The listen port and a drain stay this gateway's own. A file readable
    /// by group or others is refused.
    Import { file: String },
}

/// The document, read from `file` or standard input, wiped when dropped.
pub fn read(file: &str) -> anyhow::Result<Zeroizing<String>> {
    let mut text = Zeroizing::new(String::new());
    if file == "-" {
        std::io::stdin()
            .take(MAX_DOCUMENT + 1)
            .read_to_string(&mut text)
            .context("reading the identity from standard input")?;
    } else {
        let path = Path::new(file);
        let mut f =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mode = f.metadata()?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "{} is readable by group or others (mode {mode:04o}); it holds a private key: \
                 `chmod 600 {}` first",
                path.display(),
                path.display()
            );
        }
        (&mut f)
            .take(MAX_DOCUMENT + 1)
            .read_to_string(&mut text)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    if text.len() as u64 > MAX_DOCUMENT {
        bail!("the identity is larger than {MAX_DOCUMENT} bytes; it is not one from `identity export`");
    }
    Ok(text)
}

/// One peer as `peer export` prints it: the `peer add` request that adds
/// it again, with its key, name, addresses, keepalive and route trust.
/// Its endpoint stays out: a client's is wherever it roams from, and a
/// second gateway learns it the same way.
pub fn peer_document(peers: &[vpcgate_proto::PeerStatus], name: &str) -> anyhow::Result<String> {
    let Some(peer) = peers.iter().find(|p| p.name.as_deref() == Some(name)) else {
        bail!("no peer is named {name:?}; `vpcgate peer list` shows them");
    };
    let add = vpcgate_proto::PeerAdd {
        name: name.to_string(),
        public_key: Some(peer.public_key.clone()),
        allowed_ips: peer.allowed_ips.clone(),
        endpoint: None,
        keepalive: peer.persistent_keepalive,
        accept_routes: peer.accept_routes,
        accept_default_route: false,
    };
    Ok(serde_json::to_string(&add)? + "\n")
}

/// A `peer export` document, read from `file` or standard input.
pub fn read_peer(file: &str) -> anyhow::Result<vpcgate_proto::PeerAdd> {
    let mut text = String::new();
    let what = if file == "-" {
        std::io::stdin()
            .take(MAX_DOCUMENT + 1)
            .read_to_string(&mut text)?;
        "standard input".to_string()
    } else {
        std::fs::File::open(file)
            .with_context(|| format!("cannot open {file}"))?
            .take(MAX_DOCUMENT + 1)
            .read_to_string(&mut text)?;
        file.to_string()
    };
    let add: vpcgate_proto::PeerAdd = serde_json::from_str(&text)
        .with_context(|| format!("{what} does not hold a peer from `vpcgate peer export NAME`"))?;
    if add.public_key.is_none() || add.allowed_ips.is_empty() {
        bail!("{what}: an exported peer has its public key and allowed IPs; this one lacks them");
    }
    Ok(add)
}

/// Writes the exported document to standard output, and nowhere else.
pub fn print(document: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(document.as_bytes())?;
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exported_peer_reads_back_as_the_request_that_adds_it() {
        let peer = vpcgate_proto::PeerStatus {
            name: Some("laptop".into()),
            public_key: "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=".into(),
            endpoint: Some("198.18.1.2:51820".into()),
            allowed_ips: vec!["100.64.0.5/32".into()],
            latest_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: Some(25),
            accept_routes: false,
        };
        let text = peer_document(&[peer], "laptop").expect("exported");
        let dir = std::env::temp_dir().join(format!("vpcgate-peer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("laptop.json");
        std::fs::write(&path, &text).expect("write");
        let add = read_peer(path.to_str().expect("utf-8")).expect("read");
        assert_eq!(add.name, "laptop");
        assert_eq!(
            add.public_key.as_deref(),
            Some("AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=")
        );
        assert_eq!(add.allowed_ips, vec!["100.64.0.5/32".to_string()]);
        assert_eq!((add.keepalive, add.endpoint), (Some(25), None));
        std::fs::write(&path, r#"{"name":"x"}"#).expect("write");
        assert!(
            read_peer(path.to_str().expect("utf-8")).is_err(),
            "no key, refused"
        );
        assert!(peer_document(&[], "laptop").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_group_readable_file_is_refused_and_a_private_one_read() {
        let dir = std::env::temp_dir().join(format!("vpcgate-identity-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("identity.json");
        std::fs::write(&path, "{}").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let err = read(path.to_str().expect("utf-8")).expect_err("refused");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            read(path.to_str().expect("utf-8")).expect("read").as_str(),
            "{}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
