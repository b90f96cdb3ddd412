//! The peers as `peers.json` keeps them, and the two conversions between
//! that form and the model. Keys are base64, as `wg` prints them.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::device::DeviceConfig;
use crate::key::{b64, parse_key};

/// A peer as saved on disk.
// No Debug: it holds secrets.
#[derive(
    Clone, PartialEq, Eq, Serialize, Deserialize, zeroize::Zeroize, zeroize::ZeroizeOnDrop,
)]
#[serde(deny_unknown_fields)]
pub struct StoredPeer {
    #[serde(default)]
    pub name: Option<String>,
    pub public_key: String,
    /// The client's private key, when `vpcgate peer add` generated it, so
    /// that `vpcgate peer config` can print the config again.
    #[serde(default)]
    pub private_key: Option<String>,
    #[serde(default)]
    pub preshared_key: Option<String>,
    #[serde(default)]
    #[zeroize(skip)]
    pub endpoint: Option<std::net::SocketAddr>,
    #[serde(default)]
    pub persistent_keepalive: u16,
    #[serde(default)]
    #[zeroize(skip)]
    pub allowed_ips: Vec<IpNet>,
    #[serde(default)]
    pub accept_routes: bool,
    #[serde(default)]
    pub accept_default_route: bool,
    /// Routes learned from this peer (accept-routes), so they are back at
    /// once after a restart, before the peer answers again.
    #[serde(default)]
    #[zeroize(skip)]
    pub learned_routes: Vec<IpNet>,
}

/// The peers as they are saved.
pub fn stored_peers(config: &DeviceConfig) -> Vec<StoredPeer> {
    config
        .peers
        .iter()
        .map(|p| StoredPeer {
            name: p.name.clone(),
            public_key: b64(&p.public_key.0),
            private_key: p.client_private_key.as_ref().map(|k| b64(&k.0)),
            preshared_key: p.preshared_key.as_ref().map(|k| b64(&k.0)),
            endpoint: p.endpoint,
            persistent_keepalive: p.persistent_keepalive,
            allowed_ips: p.allowed_ips.clone(),
            accept_routes: p.accept_routes,
            accept_default_route: p.accept_default_route,
            learned_routes: p.learned.clone(),
        })
        .collect()
}

/// Rebuilds saved peers into `config`. The error says why the file is
/// corrupt; the caller names the file.
pub fn restore_peers(config: &mut DeviceConfig, stored: &[StoredPeer]) -> Result<(), String> {
    for s in stored {
        let public_key = parse_key(&s.public_key)?;
        if config.peers.iter().any(|p| p.public_key == public_key) {
            return Err(format!("peer {} is listed twice", s.public_key));
        }
        if let Some(name) = s
            .name
            .as_deref()
            .filter(|n| config.peer_by_name(n).is_some())
        {
            return Err(format!("the name {name} is used twice"));
        }
        // A secret that does not parse is not quoted back.
        let secret = |field: &str| {
            format!(
                "the {field} of peer {} is not a base64 32-byte key",
                s.public_key
            )
        };
        let client_private_key = s
            .private_key
            .as_deref()
            .map(parse_key)
            .transpose()
            .map_err(|_| secret("private_key"))?;
        let preshared_key = s
            .preshared_key
            .as_deref()
            .map(parse_key)
            .transpose()
            .map_err(|_| secret("preshared_key"))?;
        let peer = config
            .push_peer(public_key)
            .map_err(|_| "too many peers".to_string())?;
        peer.name = s.name.clone();
        peer.client_private_key = client_private_key;
        peer.preshared_key = preshared_key;
        peer.endpoint = s.endpoint;
        peer.persistent_keepalive = s.persistent_keepalive;
        peer.allowed_ips = s.allowed_ips.iter().map(IpNet::trunc).collect();
        peer.accept_routes = s.accept_routes;
        peer.accept_default_route = s.accept_default_route;
        // Only a trusted peer's routes are kept.
        if s.accept_routes {
            peer.learned = s.learned_routes.iter().map(IpNet::trunc).collect();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(name: &str, key: u8) -> StoredPeer {
        StoredPeer {
            name: Some(name.into()),
            public_key: b64(&[key; 32]),
            private_key: None,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: 0,
            allowed_ips: vec![format!("100.64.0.{key}/32").parse().expect("cidr")],
            accept_routes: false,
            accept_default_route: false,
            learned_routes: vec!["198.18.64.0/20".parse().expect("cidr")],
        }
    }

    fn garbled(name: &str) -> StoredPeer {
        let mut peer = stored(name, 2);
        peer.public_key = "garbage".into();
        peer
    }

    #[test]
    fn restored_peers_must_be_distinct_and_well_formed() {
        let mut config = DeviceConfig::new(None);
        restore_peers(&mut config, &[stored("a", 2), stored("b", 3)]).expect("valid");
        assert_eq!(config.peers.len(), 2);
        assert_eq!(
            config.peer_by_name("b").map(|p| p.allowed_ips.len()),
            Some(1)
        );
        // An untrusted peer's saved routes are not taken.
        assert!(config.peers.iter().all(|p| p.learned.is_empty()));

        for (peers, expected) in [
            (vec![stored("a", 2), stored("b", 2)], "listed twice"),
            (vec![stored("a", 2), stored("a", 3)], "used twice"),
            (vec![garbled("a")], "not a base64"),
        ] {
            let mut config = DeviceConfig::new(None);
            let err = restore_peers(&mut config, &peers).expect_err(expected);
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn saving_and_restoring_keeps_every_field() {
        let mut trusted = stored("gw", 4);
        trusted.accept_routes = true;
        trusted.private_key = Some(b64(&[5; 32]));
        trusted.persistent_keepalive = 25;
        let peers = vec![stored("a", 2), trusted];
        let mut config = DeviceConfig::new(None);
        restore_peers(&mut config, &peers).expect("valid");
        let mut expected = peers;
        expected[0].learned_routes.clear();
        assert!(stored_peers(&config) == expected);
    }
}
