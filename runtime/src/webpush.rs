//! Web Push as a browser's push service expects it: the payload encrypted per RFC 8291
//! (`aes128gcm`, RFC 8188) for the subscription's keys, and the request signed per RFC 8292
//! (VAPID, an ES256 JWT). No push service is contacted here; the sender POSTs what this builds.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes128Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use p256::ecdsa::signature::Signer;
use p256::elliptic_curve::sec1::ToSec1Point;
use rand::RngCore;
use sha2::Sha256;

/// The record size announced in the header: the whole payload is one record.
const RECORD_SIZE: u32 = 4096;
/// The largest payload one record carries (the record size, less the tag and the delimiter).
pub const MAX_PAYLOAD: usize = 3993;

#[derive(Debug, thiserror::Error)]
pub enum WebPushError {
    #[error("invalid subscription key: {0}")]
    Key(&'static str),
    #[error("payload of {0} bytes is larger than one record")]
    TooLarge(usize),
    #[error("encryption failed")]
    Encryption,
    #[error("invalid endpoint: {0}")]
    Endpoint(&'static str),
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// HKDF-SHA-256 (RFC 5869) for outputs of at most 32 bytes: extract with `salt`, expand with
/// `info`.
fn hkdf(salt: &[u8], ikm: &[u8], info: &[u8], len: usize) -> Vec<u8> {
    let prk = hmac_sha256(salt, &[ikm]);
    hmac_sha256(&prk, &[info, &[1u8]])[..len].to_vec()
}

fn decode(value: &str, what: &'static str) -> Result<Vec<u8>, WebPushError> {
    URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('='))
        .map_err(|_| WebPushError::Key(what))
}

/// Encrypts `plaintext` for the subscription whose keys are `p256dh` and `auth` (base64url, as
/// the browser gives them). Returns the request body: the `aes128gcm` header and one record.
pub fn encrypt(p256dh: &str, auth: &str, plaintext: &[u8]) -> Result<Vec<u8>, WebPushError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    loop {
        let mut scalar = [0u8; 32];
        rand::rng().fill_bytes(&mut scalar);
        // A random 32-byte string is a valid scalar except with negligible probability.
        if let Ok(ephemeral) = p256::SecretKey::from_slice(&scalar) {
            return encrypt_with(&ephemeral, &salt, p256dh, auth, plaintext);
        }
    }
}

/// Whether `bytes` is a P-256 public key, as a subscription's `p256dh` must be (an uncompressed
/// point on the curve): pushes to a key that is not one could never be encrypted.
pub fn is_p256_public_key(bytes: &[u8]) -> bool {
    p256::PublicKey::from_sec1_bytes(bytes).is_ok()
}

/// [`encrypt`] with a given application-server key and salt (RFC 8291's test vector fixes both).
pub fn encrypt_with(
    ephemeral: &p256::SecretKey,
    salt: &[u8; 16],
    p256dh: &str,
    auth: &str,
    plaintext: &[u8],
) -> Result<Vec<u8>, WebPushError> {
    if plaintext.len() > MAX_PAYLOAD {
        return Err(WebPushError::TooLarge(plaintext.len()));
    }
    let ua_public = decode(p256dh, "p256dh is not base64url")?;
    let auth = decode(auth, "auth is not base64url")?;
    if auth.len() != 16 {
        return Err(WebPushError::Key("auth is not 16 bytes"));
    }
    let ua_key = p256::PublicKey::from_sec1_bytes(&ua_public)
        .map_err(|_| WebPushError::Key("p256dh is not a P-256 point"))?;
    let as_public = ephemeral.public_key().to_sec1_point(false);
    let as_public = as_public.as_bytes();
    let shared = p256::ecdh::diffie_hellman(ephemeral.to_nonzero_scalar(), ua_key.as_affine());
    // RFC 8291 section 3.3: the input keying material binds both public keys and the auth secret.
    let mut key_info = b"WebPush: info\0".to_vec();
    key_info.extend_from_slice(&ua_public);
    key_info.extend_from_slice(as_public);
    let ikm = hkdf(&auth, shared.raw_secret_bytes(), &key_info, 32);
    let cek = hkdf(salt, &ikm, b"Content-Encoding: aes128gcm\0", 16);
    let nonce = hkdf(salt, &ikm, b"Content-Encoding: nonce\0", 12);
    // One record, the last: the plaintext, then the delimiter 0x02, no padding.
    let mut record = plaintext.to_vec();
    record.push(2);
    let cipher = Aes128Gcm::new_from_slice(&cek).map_err(|_| WebPushError::Encryption)?;
    let sealed = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &record,
                aad: b"",
            },
        )
        .map_err(|_| WebPushError::Encryption)?;
    let mut body = Vec::with_capacity(16 + 4 + 1 + as_public.len() + sealed.len());
    body.extend_from_slice(salt);
    body.extend_from_slice(&RECORD_SIZE.to_be_bytes());
    body.push(u8::try_from(as_public.len()).unwrap_or(65));
    body.extend_from_slice(as_public);
    body.extend_from_slice(&sealed);
    Ok(body)
}

/// The `Authorization` header of a push to `endpoint` (RFC 8292): `vapid t=<ES256 JWT>, k=<public
/// key>`, the JWT's audience being the endpoint's origin, valid until `expires_at` (Unix seconds,
/// at most 24 hours ahead), with `subject` (a `mailto:` or `https:` contact).
pub fn vapid_authorization(
    keys: &crate::vapid::VapidKeys,
    endpoint: &str,
    subject: &str,
    expires_at: i64,
) -> Result<String, WebPushError> {
    let url = url::Url::parse(endpoint).map_err(|_| WebPushError::Endpoint("not a URL"))?;
    let audience = url.origin().ascii_serialization();
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
    let claims = URL_SAFE_NO_PAD.encode(
        serde_json::json!({"aud": audience, "exp": expires_at, "sub": subject}).to_string(),
    );
    let scalar = decode(&keys.private_key, "the VAPID private key is not base64url")?;
    let signing = p256::ecdsa::SigningKey::from_slice(&scalar)
        .map_err(|_| WebPushError::Key("the VAPID private key is not a P-256 scalar"))?;
    let signed = format!("{header}.{claims}");
    let signature: p256::ecdsa::Signature = signing.sign(signed.as_bytes());
    Ok(format!(
        "vapid t={signed}.{}, k={}",
        URL_SAFE_NO_PAD.encode(signature.to_bytes()),
        keys.public_key
    ))
}

/// VAPID authorizations by push service origin, each reused until an hour before it expires: a
/// token is an ECDSA signature, and one push service takes many pushes. At most `capacity`
/// origins are kept: a device's endpoint is the client's to choose, so the origins are too.
pub struct VapidTokens {
    by_audience: std::sync::Mutex<std::collections::HashMap<String, (String, i64)>>,
    capacity: usize,
}

/// How many push service origins [`VapidTokens`] keeps by default: the real push services are a
/// handful, and a distributor per self-hosted server a few thousand at most.
const VAPID_ORIGINS_KEPT: usize = 10_000;

impl Default for VapidTokens {
    fn default() -> Self {
        VapidTokens::with_capacity(VAPID_ORIGINS_KEPT)
    }
}

/// How long a VAPID token is valid (RFC 8292 allows at most 24 hours).
const VAPID_VALIDITY_SECS: i64 = 12 * 3600;

impl VapidTokens {
    /// Keeps at most `capacity` origins' tokens.
    pub fn with_capacity(capacity: usize) -> VapidTokens {
        VapidTokens {
            by_audience: std::sync::Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    /// The `Authorization` header for `endpoint` at `now` (Unix seconds): a cached one while it
    /// has more than an hour left, else a new one.
    pub fn authorization(
        &self,
        keys: &crate::vapid::VapidKeys,
        endpoint: &str,
        subject: &str,
        now: i64,
    ) -> Result<String, WebPushError> {
        let url = url::Url::parse(endpoint).map_err(|_| WebPushError::Endpoint("not a URL"))?;
        let audience = url.origin().ascii_serialization();
        if let Ok(cache) = self.by_audience.lock()
            && let Some((header, expires)) = cache.get(&audience)
            && *expires - now > 3600
        {
            return Ok(header.clone());
        }
        let expires = now + VAPID_VALIDITY_SECS;
        let header = vapid_authorization(keys, endpoint, subject, expires)?;
        if let Ok(mut cache) = self.by_audience.lock() {
            if cache.len() >= self.capacity && !cache.contains_key(&audience) {
                // The ones past reuse go first; when none is, all of them (each is made again
                // with one signature when next needed).
                cache.retain(|_, (_, expires)| *expires - now > 3600);
                if cache.len() >= self.capacity {
                    cache.clear();
                }
            }
            cache.insert(audience, (header.clone(), expires));
        }
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Endpoints are the clients' to choose: however many origins pushes go to, the tokens kept
    /// stay within the capacity, and the newest one is kept.
    #[test]
    fn vapid_tokens_are_kept_for_at_most_capacity_origins() {
        let keys = crate::vapid::VapidKeys::generate();
        let tokens = VapidTokens::with_capacity(8);
        let now = 1_800_000_000;
        for i in 0..50 {
            let endpoint = format!("https://push{i}.example/x");
            tokens
                .authorization(&keys, &endpoint, "mailto:ops@example.com", now)
                .expect("signs");
            let kept = tokens.by_audience.lock().unwrap();
            assert!(kept.len() <= 8, "{} origins kept", kept.len());
            assert!(kept.contains_key(&format!("https://push{i}.example")));
        }
    }

    /// RFC 8291, appendix A: the same keys, salt and message give the same body, byte for byte.
    #[test]
    fn rfc_8291_test_vector() {
        let as_private = URL_SAFE_NO_PAD
            .decode("yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw")
            .unwrap();
        let ephemeral = p256::SecretKey::from_slice(&as_private).unwrap();
        let salt: [u8; 16] = URL_SAFE_NO_PAD
            .decode("DGv6ra1nlYgDCS1FRnbzlw")
            .unwrap()
            .try_into()
            .unwrap();
        let body = encrypt_with(
            &ephemeral,
            &salt,
            "BCVxsr7N_eNgVRqvHtD0zTZsEc6-VV-JvLexhqUzORcxaOzi6-AYWXvTBHm4bjyPjs7Vd8pZGH6SRpkNtoIAiw4",
            "BTBZMqHH6r4Tts7J_aSIgg",
            b"When I grow up, I want to be a watermelon",
        )
        .unwrap();
        assert_eq!(
            URL_SAFE_NO_PAD.encode(body),
            "DGv6ra1nlYgDCS1FRnbzlwAAEABBBP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A_yl95bQpu6cVPTpK4Mqgkf1CXztLVBSt2Ks3oZwbuwXPXLWyouBWLVWGNWQexSgSxsj_Qulcy4a-fN"
        );
    }

    #[test]
    fn a_vapid_header_verifies_with_its_public_key() {
        use p256::ecdsa::signature::Verifier;
        let keys = crate::vapid::VapidKeys::generate();
        let header = vapid_authorization(
            &keys,
            "https://push.example.net:8443/send/abc?x=1",
            "mailto:ops@example.com",
            2_000_000_000,
        )
        .unwrap();
        let (token, key) = header
            .strip_prefix("vapid t=")
            .unwrap()
            .split_once(", k=")
            .unwrap();
        assert_eq!(key, keys.public_key);
        let (signed, signature) = token.rsplit_once('.').unwrap();
        let claims: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(signed.split_once('.').unwrap().1)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["aud"], "https://push.example.net:8443");
        let verifying =
            p256::ecdsa::VerifyingKey::from_sec1_bytes(&keys.public_key_bytes()).unwrap();
        let signature =
            p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).unwrap())
                .unwrap();
        verifying.verify(signed.as_bytes(), &signature).unwrap();
    }
}
