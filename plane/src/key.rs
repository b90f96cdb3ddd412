//! WireGuard keys as the control plane holds them: 32 bytes that are
//! zeroized on drop, compared in constant time and never printed, with the
//! conversions the model needs (public key, clamping, base64 as `wg` prints
//! keys). Hex, the UAPI's form, belongs to the UAPI text protocol.

use std::fmt;

use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::text::quote;

/// A 32-byte key. Secrets are zeroized on drop, equality takes the same time
/// whatever the contents, and `Debug` never shows the bytes.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Key(pub [u8; 32]);

impl Key {
    pub fn is_zero(&self) -> bool {
        ct_eq(&self.0, &[0; 32])
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

impl Eq for Key {}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

pub fn public_key_of(private: &Key) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(private.0)).to_bytes()
}

/// Clears and sets the bits X25519 ignores, as the kernel and wireguard-go
/// do when a key is set, so `wg show` reads back the key actually in use.
pub fn clamped(mut key: Key) -> Key {
    key.0[0] &= 248;
    key.0[31] = (key.0[31] & 127) | 64;
    key
}

pub fn b64(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Parses a base64 key: a peer's public key, or a private or preshared key
/// read back from `peers.json` (so the decoded bytes are zeroized).
pub fn parse_key(text: &str) -> Result<Key, String> {
    let bytes = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| {
                format!(
                    "{} is not a base64 WireGuard key (as `wg pubkey` prints)",
                    quote(text)
                )
            })?,
    );
    let mut key = Key([0; 32]);
    if bytes.len() != key.0.len() {
        return Err(format!("{} is not a 32-byte WireGuard key", quote(text)));
    }
    key.0.copy_from_slice(&bytes);
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_and_refusals() {
        let key = Key([7; 32]);
        assert_eq!(parse_key(&b64(&key.0)), Ok(key));
        assert!(parse_key("not base64!").is_err());
        assert!(parse_key(&b64(&[1; 32])[..20]).is_err());
        assert!(Key([0; 32]).is_zero() && !Key([1; 32]).is_zero());
        assert_eq!(format!("{:?}", Key([9; 32])), "Key(..)");
    }
}
