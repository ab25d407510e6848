//! VAPID (RFC 8292) application server keys: the P-256 key pair whose public half browsers
//! subscribe with, and whose private half signs each Web Push request.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::elliptic_curve::sec1::ToSec1Point;
use rand::RngCore;

#[derive(Debug, thiserror::Error)]
#[error("invalid VAPID key: {0}")]
pub struct VapidKeyError(&'static str);

/// A VAPID key pair, both halves base64url without padding: the public key as the uncompressed
/// point (65 bytes), the private key as the scalar (32 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VapidKeys {
    pub public_key: String,
    pub private_key: String,
}

impl VapidKeys {
    /// A new random key pair.
    pub fn generate() -> VapidKeys {
        loop {
            let mut scalar = [0u8; 32];
            rand::rng().fill_bytes(&mut scalar);
            // A random 32-byte string is a valid scalar except with negligible probability.
            if let Ok(keys) = VapidKeys::from_private_key(&URL_SAFE_NO_PAD.encode(scalar)) {
                return keys;
            }
        }
    }

    /// The public key's bytes (the uncompressed point): also what a Web Push subscription's
    /// `p256dh` holds.
    pub fn public_key_bytes(&self) -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(&self.public_key).unwrap_or_default()
    }

    /// The pair of a private key.
    pub fn from_private_key(private_key: &str) -> Result<VapidKeys, VapidKeyError> {
        let scalar = URL_SAFE_NO_PAD
            .decode(private_key.trim())
            .map_err(|_| VapidKeyError("the private key is not base64url"))?;
        let secret = p256::SecretKey::from_slice(&scalar)
            .map_err(|_| VapidKeyError("the private key is not a P-256 scalar"))?;
        let point = secret.public_key().to_sec1_point(false);
        Ok(VapidKeys {
            public_key: URL_SAFE_NO_PAD.encode(point.as_bytes()),
            private_key: URL_SAFE_NO_PAD.encode(scalar),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_pair_is_consistent() {
        let keys = VapidKeys::generate();
        let public = URL_SAFE_NO_PAD.decode(&keys.public_key).expect("base64url");
        assert_eq!(public.len(), 65);
        assert_eq!(public[0], 4, "uncompressed point");
        assert_eq!(
            VapidKeys::from_private_key(&keys.private_key).expect("valid"),
            keys
        );
        assert_ne!(VapidKeys::generate(), keys);
        assert!(VapidKeys::from_private_key("not base64!").is_err());
        assert!(VapidKeys::from_private_key(&URL_SAFE_NO_PAD.encode([0u8; 32])).is_err());
    }
}
