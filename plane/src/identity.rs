//! A gateway's identity, for a second gateway behind the same load
//! balancer or floating address: its private key, its peers and its
//! settings. `vpcgate identity export` prints it on the first gateway and
//! `vpcgate identity import` applies it on the second, so that a stock
//! WireGuard client cannot tell them apart.
//!
//! What stays the second gateway's own: the port it listens on (set on
//! its command line or with `set --listen-port`) and whether it is
//! draining (maintenance of one machine, not of the pair).

use serde::{Deserialize, Serialize};

use crate::device::DeviceConfig;
use crate::key::{b64, clamped, parse_key, Key};
use crate::model::Desired;
use crate::settings::{validate_addresses, Settings};
use crate::stored::{restore_peers, stored_peers, StoredPeer};

/// The document's format; an import refuses any other.
pub const FORMAT: &str = "vpcgate-identity/1";

/// The document. It holds the private key, and the peers' generated keys,
/// so it is wiped when dropped.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub format: String,
    pub private_key: String,
    pub settings: Settings,
    pub peers: Vec<StoredPeer>,
}

impl Drop for Identity {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.private_key);
    }
}

impl Identity {
    /// This gateway's identity; `None` before it has a private key.
    pub fn of(desired: &Desired) -> Option<Identity> {
        let key = desired.device.private_key.as_ref()?;
        let mut settings = desired.settings.clone();
        settings.draining = false;
        Some(Identity {
            format: FORMAT.to_string(),
            private_key: b64(&key.0),
            settings,
            peers: stored_peers(&desired.device),
        })
    }

    /// The document as `identity export` prints it.
    pub fn to_text(&self) -> Result<String, String> {
        serde_json::to_string_pretty(self)
            .map(|mut text| {
                text.push('\n');
                text
            })
            .map_err(|e| format!("cannot write the identity: {e}"))
    }

    /// Reads a document; what is wrong with it, if anything.
    pub fn parse(text: &str) -> Result<Identity, String> {
        let identity: Identity = serde_json::from_str(text)
            .map_err(|e| format!("not an identity from `vpcgate identity export` ({e})"))?;
        if identity.format != FORMAT {
            return Err(format!(
                "an identity in format {}, and this vpcgated reads {FORMAT}",
                crate::text::quote(&identity.format)
            ));
        }
        Ok(identity)
    }
}

/// What an import would set, once `identity` is found whole and sound:
/// the private key and the settings, with the port and the drain kept
/// from `current`. The peers are checked as the peers file's are.
pub fn validate(identity: &Identity, current: &Settings) -> Result<(Key, Settings), String> {
    let key = parse_key(&identity.private_key).map_err(|e| format!("private key: {e}"))?;
    let mut settings = identity.settings.clone();
    validate_addresses(&settings.addresses)?;
    crate::policy::validate_advertisement(&settings)?;
    if let Some(check) = settings.checks.iter().find(|c| {
        !settings
            .advertised_routes
            .iter()
            .any(|r| r.contains(&c.target.ip()))
    }) {
        return Err(format!("{check} is in no advertised range"));
    }
    restore_peers(&mut DeviceConfig::new(None), &identity.peers)
        .map_err(|e| format!("peers: {e}"))?;
    settings.listen_port = current.listen_port;
    settings.draining = current.draining;
    Ok((clamped(key), settings))
}
