//! Small HMAC-signed tokens: SSE/WebSocket tickets and opaque paging cursors. The payload is JSON,
//! base64url-encoded; the tag is HMAC-SHA256 over it with a purpose-specific key, so a ticket can
//! never be replayed as a cursor and neither can be forged or altered.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignedError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not match")]
    BadSignature,
}

/// Signs and opens tokens for one purpose.
#[derive(Clone)]
pub struct Signer {
    key: Vec<u8>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

impl Signer {
    /// A signer for `purpose`, keyed from the process secret.
    pub fn new(secret: &[u8], purpose: &str) -> Signer {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
        mac.update(b"confab-signer:");
        mac.update(purpose.as_bytes());
        Signer {
            key: mac.finalize().into_bytes().to_vec(),
        }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length")
    }

    pub fn sign<T: Serialize>(&self, payload: &T) -> String {
        let json = serde_json::to_vec(payload).unwrap_or_default();
        let body = URL_SAFE_NO_PAD.encode(json);
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{body}.{tag}")
    }

    pub fn open<T: DeserializeOwned>(&self, token: &str) -> Result<T, SignedError> {
        if token.len() > 4096 {
            return Err(SignedError::Malformed);
        }
        let (body, tag) = token.split_once('.').ok_or(SignedError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| SignedError::Malformed)?;
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        mac.verify_slice(&tag)
            .map_err(|_| SignedError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| SignedError::Malformed)?;
        serde_json::from_slice(&json).map_err(|_| SignedError::Malformed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_tampering() {
        let signer = Signer::new(b"secret", "cursor");
        let token = signer.sign(&("abc", 42));
        assert_eq!(signer.open::<(String, i32)>(&token), Ok(("abc".into(), 42)));

        let (body, tag) = token.split_once('.').expect("two parts");
        let forged_body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&("abc", 43)).expect("json"));
        assert_eq!(
            signer.open::<(String, i32)>(&format!("{forged_body}.{tag}")),
            Err(SignedError::BadSignature)
        );
        assert_eq!(
            signer.open::<(String, i32)>(body),
            Err(SignedError::Malformed)
        );
        assert_eq!(
            signer.open::<(String, i32)>("%%%.%%%"),
            Err(SignedError::Malformed)
        );
    }

    #[test]
    fn purposes_do_not_mix() {
        let cursor = Signer::new(b"secret", "cursor");
        let ticket = Signer::new(b"secret", "ticket");
        let token = cursor.sign(&1u32);
        assert_eq!(ticket.open::<u32>(&token), Err(SignedError::BadSignature));
    }
}
