//! Small HMAC-signed tokens: SSE/WebSocket tickets and opaque paging cursors.
//!
//! A token is `<key id>.<body>.<tag>`: the body is base64url JSON `{"x": expiry, "p": payload}`,
//! the tag HMAC-SHA256 over `<key id>.<body>` with a key derived from the named secret and the
//! token's purpose. So a ticket can never be replayed as a cursor, neither can be forged or altered,
//! every token expires, and secrets can be rotated: a [`Keyring`] signs with its first secret and
//! opens tokens signed by any of them, so tokens signed before a rotation stay valid until the old
//! secret is removed.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use time::OffsetDateTime;

type HmacSha256 = Hmac<Sha256>;

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignedError {
    #[error("malformed token")]
    Malformed,
    #[error("token signature does not match")]
    BadSignature,
    #[error("token signed with an unknown key")]
    UnknownKey,
    #[error("token expired")]
    Expired,
}

/// The deployment's signing secrets, each with an id. The first signs; all of them verify.
#[derive(Clone)]
pub struct Keyring {
    keys: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        write!(f, "Keyring({ids:?})")
    }
}

/// Why a secret is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("no secret given")]
    Empty,
    #[error("key id `{0}` must be 1-32 letters, digits, `_` or `-`")]
    BadId(String),
    #[error("key id `{0}` is given twice")]
    DuplicateId(String),
    #[error("the secret of key `{0}` is shorter than {MIN_SECRET_BYTES} bytes")]
    TooShort(String),
    #[error(
        "the secret of key `{0}` is a placeholder or has too little variety; generate one with `openssl rand -hex 32`"
    )]
    Placeholder(String),
    #[error("expected `id:secret` pairs separated by commas")]
    Syntax,
}

/// Words found in the placeholder values of example configurations.
const PLACEHOLDER_WORDS: &[&str] = &[
    "replace-me",
    "replace_me",
    "replaceme",
    "change-me",
    "change_me",
    "changeme",
    "placeholder",
    "example",
    "your-secret",
    "openssl-rand",
];

fn check_secret(id: &str, secret: &str) -> Result<(), SecretError> {
    if secret.len() < MIN_SECRET_BYTES {
        return Err(SecretError::TooShort(id.to_owned()));
    }
    let lower = secret.to_ascii_lowercase();
    let distinct = secret
        .bytes()
        .collect::<std::collections::HashSet<u8>>()
        .len();
    if PLACEHOLDER_WORDS.iter().any(|word| lower.contains(word)) || distinct < 8 {
        return Err(SecretError::Placeholder(id.to_owned()));
    }
    Ok(())
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 32
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Keyring {
    /// The id a single `secret_key` gets.
    pub const DEFAULT_ID: &'static str = "default";

    /// One secret under [`Keyring::DEFAULT_ID`], checked.
    pub fn single(secret: &str) -> Result<Keyring, SecretError> {
        check_secret(Keyring::DEFAULT_ID, secret)?;
        Ok(Keyring {
            keys: vec![(Keyring::DEFAULT_ID.to_owned(), secret.as_bytes().to_vec())],
        })
    }

    /// Parses `id1:secret1,id2:secret2`, checking every secret. The first signs.
    pub fn parse(list: &str) -> Result<Keyring, SecretError> {
        let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (id, secret) = item.split_once(':').ok_or(SecretError::Syntax)?;
            let id = id.trim();
            if !valid_id(id) {
                return Err(SecretError::BadId(id.to_owned()));
            }
            if keys.iter().any(|(known, _)| known == id) {
                return Err(SecretError::DuplicateId(id.to_owned()));
            }
            check_secret(id, secret)?;
            keys.push((id.to_owned(), secret.as_bytes().to_vec()));
        }
        if keys.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Keyring { keys })
    }

    /// A fresh random secret, for one process.
    pub fn random() -> Keyring {
        Keyring {
            keys: vec![("local".to_owned(), rand::random::<[u8; 32]>().to_vec())],
        }
    }

    /// The id of the key that signs.
    pub fn signing_id(&self) -> &str {
        &self.keys[0].0
    }
}

/// Signs and opens tokens for one purpose.
#[derive(Clone)]
pub struct Signer {
    /// (key id, purpose key), the signing one first.
    keys: Vec<(String, Vec<u8>)>,
    /// How long a token signed with [`Signer::sign`] is valid.
    ttl: Duration,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(..)")
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope<P> {
    /// Expiry, Unix seconds.
    x: i64,
    p: P,
}

impl Signer {
    /// A signer for `purpose` with the keyring's secrets; [`Signer::sign`] makes tokens valid for
    /// `ttl`.
    pub fn new(keyring: &Keyring, purpose: &str, ttl: Duration) -> Signer {
        let keys = keyring
            .keys
            .iter()
            .map(|(id, secret)| {
                let mut mac =
                    HmacSha256::new_from_slice(secret).expect("HMAC takes keys of any length");
                mac.update(b"confab-signer:");
                mac.update(purpose.as_bytes());
                (id.clone(), mac.finalize().into_bytes().to_vec())
            })
            .collect();
        Signer { keys, ttl }
    }

    /// The same signer with another time to live.
    pub fn with_ttl(mut self, ttl: Duration) -> Signer {
        self.ttl = ttl;
        self
    }

    fn mac(key: &[u8]) -> HmacSha256 {
        HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length")
    }

    /// A token for `payload`, valid for the signer's time to live.
    pub fn sign<T: Serialize>(&self, payload: &T) -> String {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 2);
        self.sign_until(payload, now.saturating_add(ttl))
    }

    /// A token for `payload`, valid until `expires` (Unix seconds).
    pub fn sign_until<T: Serialize>(&self, payload: &T, expires: i64) -> String {
        let (id, key) = &self.keys[0];
        let json = serde_json::to_vec(&Envelope {
            x: expires,
            p: payload,
        })
        .unwrap_or_default();
        let signed = format!("{id}.{}", URL_SAFE_NO_PAD.encode(json));
        let mut mac = Signer::mac(key);
        mac.update(signed.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{signed}.{tag}")
    }

    pub fn open<T: DeserializeOwned>(&self, token: &str) -> Result<T, SignedError> {
        if token.len() > 4096 {
            return Err(SignedError::Malformed);
        }
        let (signed, tag) = token.rsplit_once('.').ok_or(SignedError::Malformed)?;
        let (id, body) = signed.split_once('.').ok_or(SignedError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| SignedError::Malformed)?;
        let (_, key) = self
            .keys
            .iter()
            .find(|(known, _)| known == id)
            .ok_or(SignedError::UnknownKey)?;
        let mut mac = Signer::mac(key);
        mac.update(signed.as_bytes());
        mac.verify_slice(&tag)
            .map_err(|_| SignedError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| SignedError::Malformed)?;
        let envelope: Envelope<T> =
            serde_json::from_slice(&json).map_err(|_| SignedError::Malformed)?;
        if envelope.x < OffsetDateTime::now_utc().unix_timestamp() {
            return Err(SignedError::Expired);
        }
        Ok(envelope.p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "a3f1c9e27b4d8605f1e2d3c4b5a69788";
    const B: &str = "0f9e8d7c6b5a49382716a5b4c3d2e1f0";

    fn ring(list: &str) -> Keyring {
        Keyring::parse(list).expect("valid keyring")
    }

    fn hour() -> Duration {
        Duration::from_secs(3600)
    }

    #[test]
    fn round_trips_and_refuses_tampering() {
        let signer = Signer::new(&Keyring::single(A).unwrap(), "cursor", hour());
        let token = signer.sign(&("abc", 42));
        assert_eq!(signer.open::<(String, i32)>(&token), Ok(("abc".into(), 42)));

        let (signed, tag) = token.rsplit_once('.').expect("three parts");
        let (id, _) = signed.split_once('.').expect("three parts");
        let forged_body = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&serde_json::json!({"x": 9_999_999_999i64, "p": ["abc", 43]}))
                .expect("json"),
        );
        assert_eq!(
            signer.open::<(String, i32)>(&format!("{id}.{forged_body}.{tag}")),
            Err(SignedError::BadSignature)
        );
        assert_eq!(
            signer.open::<(String, i32)>(signed),
            Err(SignedError::Malformed)
        );
        assert_eq!(
            signer.open::<(String, i32)>(&format!("other.{}", token.split_once('.').unwrap().1)),
            Err(SignedError::UnknownKey)
        );
        assert_eq!(
            signer.open::<(String, i32)>("default.%%%.%%%"),
            Err(SignedError::Malformed)
        );
        assert_eq!(
            signer.open::<(String, i32)>("nodots"),
            Err(SignedError::Malformed)
        );
    }

    #[test]
    fn purposes_do_not_mix() {
        let keys = Keyring::single(A).unwrap();
        let cursor = Signer::new(&keys, "cursor", hour());
        let ticket = Signer::new(&keys, "ticket", hour());
        let token = cursor.sign(&1u32);
        assert_eq!(ticket.open::<u32>(&token), Err(SignedError::BadSignature));
    }

    #[test]
    fn tokens_expire() {
        let signer = Signer::new(&Keyring::single(A).unwrap(), "cursor", hour());
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert_eq!(
            signer.open::<u32>(&signer.sign_until(&7u32, now - 1)),
            Err(SignedError::Expired)
        );
        assert_eq!(
            signer.open::<u32>(&signer.sign_until(&7u32, now + 5)),
            Ok(7)
        );
    }

    #[test]
    fn a_rotated_keyring_opens_old_tokens_and_signs_with_the_new_key() {
        let before = Signer::new(&ring(&format!("old:{A}")), "ticket", hour());
        let old_token = before.sign(&"alice");
        let after = Signer::new(&ring(&format!("new:{B},old:{A}")), "ticket", hour());
        assert_eq!(after.open::<String>(&old_token), Ok("alice".into()));
        let new_token = after.sign(&"bob");
        assert!(new_token.starts_with("new."));
        // Once the old key is removed, what it signed is refused.
        let removed = Signer::new(&ring(&format!("new:{B}")), "ticket", hour());
        assert_eq!(
            removed.open::<String>(&old_token),
            Err(SignedError::UnknownKey)
        );
        assert_eq!(removed.open::<String>(&new_token), Ok("bob".into()));
        // A token naming a known id but signed by another secret is a forgery.
        let impostor = Signer::new(&ring(&format!("new:{A}")), "ticket", hour());
        assert_eq!(
            removed.open::<String>(&impostor.sign(&"bob")),
            Err(SignedError::BadSignature)
        );
    }

    #[test]
    fn weak_and_placeholder_secrets_are_refused() {
        assert_eq!(
            Keyring::single("short").err(),
            Some(SecretError::TooShort("default".into()))
        );
        assert!(matches!(
            Keyring::single("REPLACE-ME-with-openssl-rand-hex-32"),
            Err(SecretError::Placeholder(_))
        ));
        assert!(matches!(
            Keyring::single("change-me-to-the-output-of-openssl-rand-hex-32"),
            Err(SecretError::Placeholder(_))
        ));
        assert!(matches!(
            Keyring::single("changemechangemechangemechangeme"),
            Err(SecretError::Placeholder(_))
        ));
        assert!(matches!(
            Keyring::single(&"a".repeat(64)),
            Err(SecretError::Placeholder(_))
        ));
        assert!(matches!(
            Keyring::single(&"ab12".repeat(16)),
            Err(SecretError::Placeholder(_))
        ));
        assert!(Keyring::single(A).is_ok());
        assert_eq!(
            Keyring::parse(&format!("a:{A},a:{B}")).err(),
            Some(SecretError::DuplicateId("a".into()))
        );
        assert_eq!(
            Keyring::parse(&format!("a.b:{A}")).err(),
            Some(SecretError::BadId("a.b".into()))
        );
        assert_eq!(Keyring::parse(A).err(), Some(SecretError::Syntax));
        assert_eq!(Keyring::parse(" , ").err(), Some(SecretError::Empty));
        assert_eq!(
            Keyring::parse(&format!("a:{A},b:short")).err(),
            Some(SecretError::TooShort("b".into()))
        );
    }
}
