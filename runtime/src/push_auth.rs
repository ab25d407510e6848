//! The credentials of the native push services and the JWTs they sign: FCM's service-account key
//! (RS256 assertions for the OAuth 2.0 JWT-bearer grant, RFC 7523) and APNs' token key (`.p8`,
//! ES256 provider tokens). Keys are parsed once, when the configuration is checked; nothing here
//! talks to a network.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

/// Where Google issues access tokens when a key names no `token_uri`.
pub const GOOGLE_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The OAuth scope that sends FCM messages.
pub const FCM_SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// How long an assertion is valid (Google accepts at most one hour).
const ASSERTION_SECS: i64 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum PushKeyError {
    #[error("the service-account key is not JSON as Google issues it: {0}")]
    Json(String),
    #[error("the service-account key's `{0}` is empty")]
    Missing(&'static str),
    #[error("the service-account key's `private_key` is not a PEM RSA private key")]
    Rsa,
    #[error("the service-account key's RSA key has {0} bits; at least 2048 are needed")]
    RsaSize(usize),
    #[error("the APNs key is not a PKCS #8 PEM P-256 private key (a `.p8` file)")]
    P256,
    #[error("the APNs {0} must be 10 letters or digits, as Apple issues it")]
    AppleId(&'static str),
}

/// The fields of a Google service-account key file that FCM needs; the others are ignored.
#[derive(Deserialize)]
struct ServiceAccountFile {
    project_id: String,
    private_key: String,
    #[serde(default)]
    private_key_id: Option<String>,
    client_email: String,
    #[serde(default)]
    token_uri: Option<String>,
}

/// A Google service account: which project it sends for, and the key that signs its assertions.
#[derive(Clone)]
pub struct ServiceAccount {
    pub project_id: String,
    pub client_email: String,
    /// Where its assertions are exchanged for access tokens.
    pub token_uri: String,
    key_id: Option<String>,
    signing: rsa::pkcs1v15::SigningKey<sha2::Sha256>,
}

impl std::fmt::Debug for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccount")
            .field("project_id", &self.project_id)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

impl ServiceAccount {
    /// Parses a key file's JSON (`project_id`, `client_email`, `private_key` as PEM, `token_uri`).
    pub fn from_json(json: &str) -> Result<ServiceAccount, PushKeyError> {
        use rsa::pkcs1::DecodeRsaPrivateKey;
        use rsa::pkcs8::DecodePrivateKey;
        use rsa::traits::PublicKeyParts;
        let file: ServiceAccountFile =
            serde_json::from_str(json).map_err(|e| PushKeyError::Json(e.to_string()))?;
        for (value, name) in [
            (&file.project_id, "project_id"),
            (&file.client_email, "client_email"),
        ] {
            if value.trim().is_empty() {
                return Err(PushKeyError::Missing(name));
            }
        }
        let pem = file.private_key.trim();
        let key = rsa::RsaPrivateKey::from_pkcs8_pem(pem)
            .or_else(|_| rsa::RsaPrivateKey::from_pkcs1_pem(pem))
            .map_err(|_| PushKeyError::Rsa)?;
        let bits = key.size() * 8;
        if bits < 2048 {
            return Err(PushKeyError::RsaSize(bits));
        }
        Ok(ServiceAccount {
            project_id: file.project_id.trim().to_owned(),
            client_email: file.client_email.trim().to_owned(),
            token_uri: file
                .token_uri
                .filter(|uri| !uri.trim().is_empty())
                .unwrap_or_else(|| GOOGLE_TOKEN_URI.to_owned()),
            key_id: file.private_key_id.filter(|id| !id.is_empty()),
            signing: rsa::pkcs1v15::SigningKey::new(key),
        })
    }

    /// The signed JWT (RS256) that asks `audience` (the token URI) for an access token with
    /// `scope`, issued at `now` (Unix seconds) and valid for an hour.
    pub fn assertion(&self, scope: &str, audience: &str, now: i64) -> String {
        use rsa::signature::{RandomizedSigner, SignatureEncoding};
        let header = match &self.key_id {
            Some(kid) => serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": kid}),
            None => serde_json::json!({"alg": "RS256", "typ": "JWT"}),
        };
        let claims = serde_json::json!({
            "iss": self.client_email,
            "scope": scope,
            "aud": audience,
            "iat": now,
            "exp": now + ASSERTION_SECS,
        });
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        // Blinded: the private-key operation's timing does not depend on the key.
        let signature = self
            .signing
            .sign_with_rng(&mut rsa::rand_core::OsRng, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }
}

/// An APNs token key (the `.p8` file of an Apple developer account), with its key id and team id.
#[derive(Clone)]
pub struct ApnsKey {
    pub key_id: String,
    pub team_id: String,
    signing: p256::ecdsa::SigningKey,
}

impl std::fmt::Debug for ApnsKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApnsKey")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .finish_non_exhaustive()
    }
}

fn apple_id(value: &str, what: &'static str) -> Result<String, PushKeyError> {
    let value = value.trim();
    if value.len() == 10 && value.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(value.to_owned())
    } else {
        Err(PushKeyError::AppleId(what))
    }
}

impl ApnsKey {
    /// Parses the `.p8` file's PEM (PKCS #8 of a P-256 key).
    pub fn from_pem(pem: &str, key_id: &str, team_id: &str) -> Result<ApnsKey, PushKeyError> {
        use p256::pkcs8::DecodePrivateKey;
        let signing =
            p256::ecdsa::SigningKey::from_pkcs8_pem(pem.trim()).map_err(|_| PushKeyError::P256)?;
        Ok(ApnsKey {
            key_id: apple_id(key_id, "key id")?,
            team_id: apple_id(team_id, "team id")?,
            signing,
        })
    }

    /// The provider token (ES256 JWT) issued at `now` (Unix seconds). APNs accepts one for an
    /// hour and refuses new ones more often than every 20 minutes, so callers reuse it.
    pub fn token(&self, now: i64) -> String {
        use p256::ecdsa::signature::Signer;
        let header = serde_json::json!({"alg": "ES256", "kid": self.key_id});
        let claims = serde_json::json!({"iss": self.team_id, "iat": now});
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature: p256::ecdsa::Signature = self.signing.sign(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::pkcs8::EncodePrivateKey;

    fn parts(jwt: &str) -> (serde_json::Value, serde_json::Value, Vec<u8>) {
        let mut parts = jwt.split('.');
        let mut json = || {
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next().unwrap()).unwrap()).unwrap()
        };
        let (header, claims) = (json(), json());
        let signature = URL_SAFE_NO_PAD
            .decode(jwt.rsplit('.').next().unwrap())
            .unwrap();
        (header, claims, signature)
    }

    #[test]
    fn an_apns_token_verifies_with_the_public_half() {
        use p256::ecdsa::signature::Verifier;
        let secret = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        let pem = secret
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .unwrap()
            .to_string();
        let key = ApnsKey::from_pem(&pem, "ABC123DEFG", "TEAM123456").unwrap();
        let token = key.token(1_700_000_000);
        let (header, claims, signature) = parts(&token);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], "ABC123DEFG");
        assert_eq!(claims["iss"], "TEAM123456");
        assert_eq!(claims["iat"], 1_700_000_000);
        let signed = token.rsplit_once('.').unwrap().0;
        p256::ecdsa::VerifyingKey::from(&p256::ecdsa::SigningKey::from(&secret))
            .verify(
                signed.as_bytes(),
                &p256::ecdsa::Signature::from_slice(&signature).unwrap(),
            )
            .unwrap();
    }

    #[test]
    fn a_service_account_assertion_verifies_with_the_public_half() {
        use rsa::pkcs8::DecodePrivateKey;
        use rsa::signature::Verifier;
        let json = include_str!("../../tests/fixtures/fcm-test-service-account.json");
        let account = ServiceAccount::from_json(json).unwrap();
        assert_eq!(account.project_id, "confab-contract-test");
        assert_eq!(account.token_uri, GOOGLE_TOKEN_URI);
        let jwt = account.assertion(FCM_SCOPE, "https://tokens.example/token", 1_700_000_000);
        let (header, claims, signature) = parts(&jwt);
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["kid"], "0123456789abcdef0123456789abcdef01234567");
        assert_eq!(claims["iss"], account.client_email);
        assert_eq!(claims["scope"], FCM_SCOPE);
        assert_eq!(claims["aud"], "https://tokens.example/token");
        assert_eq!(claims["exp"], 1_700_003_600);
        let pem: serde_json::Value = serde_json::from_str(json).unwrap();
        let private =
            rsa::RsaPrivateKey::from_pkcs8_pem(pem["private_key"].as_str().unwrap()).unwrap();
        rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(private.to_public_key())
            .verify(
                jwt.rsplit_once('.').unwrap().0.as_bytes(),
                &rsa::pkcs1v15::Signature::try_from(signature.as_slice()).unwrap(),
            )
            .unwrap();
    }

    #[test]
    fn bad_keys_and_ids_are_refused() {
        let pem = p256::SecretKey::from_slice(&[7u8; 32])
            .unwrap()
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .unwrap()
            .to_string();
        assert!(matches!(
            ApnsKey::from_pem("not a key", "ABC123DEFG", "TEAM123456"),
            Err(PushKeyError::P256)
        ));
        assert!(matches!(
            ApnsKey::from_pem(&pem, "short", "TEAM123456"),
            Err(PushKeyError::AppleId("key id"))
        ));
        assert!(matches!(
            ApnsKey::from_pem(&pem, "ABC123DEFG", "TEAM-12345"),
            Err(PushKeyError::AppleId("team id"))
        ));
        assert!(matches!(
            ServiceAccount::from_json("{}"),
            Err(PushKeyError::Json(_))
        ));
        assert!(matches!(
            ServiceAccount::from_json(
                r#"{"project_id":"p","client_email":"a@b","private_key":"nope"}"#
            ),
            Err(PushKeyError::Rsa)
        ));
        assert!(matches!(
            ServiceAccount::from_json(
                r#"{"project_id":" ","client_email":"a@b","private_key":"nope"}"#
            ),
            Err(PushKeyError::Missing("project_id"))
        ));
    }
}
