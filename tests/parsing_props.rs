//! Properties of what clients hand back to the server: signed tokens, paging cursors, stream
//! tickets and bearer tokens. Whatever the input, parsing never panics and never verifies; what
//! the server signed verifies and round-trips; one flipped bit is refused.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, header};
use confab_api::ApiState;
use confab_api::domain::inputs::PageLimit;
use confab_api::domain::paging::Pager;
use confab_api::store::embedded::EmbeddedStore;
use confab_notifier::auth::StreamAuth;
use confab_runtime::bus::{EmbeddedBus, LogSettings};
use confab_runtime::identity::{DevIdentity, Identity, OidcIdentity, bearer_token};
use confab_runtime::signed::{Keyring, SignedError, Signer};

const SECRET: &str = "a deployment secret of some length, 32 bytes at least";
const OTHER_SECRET: &str = "another deployment's secret value, also long enough";
const TTL: std::time::Duration = std::time::Duration::from_secs(3600);

fn keyring(secret: &str) -> Keyring {
    Keyring::single(secret).expect("a strong secret")
}
use proptest::prelude::*;
use serde_json::Value;

/// `token` with bit `bit` (modulo its length) flipped, when the result is still a string.
fn flip(token: &str, bit: usize) -> Option<String> {
    let mut bytes = token.as_bytes().to_vec();
    let bit = bit % (bytes.len() * 8);
    bytes[bit / 8] ^= 1 << (bit % 8);
    String::from_utf8(bytes).ok()
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Text a client could send: anything, or something shaped like a signed token.
fn client_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_-]{0,60}",
        "[A-Za-z0-9_-]{0,80}\\.[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_-]{0,60}",
        proptest::collection::vec(any::<u8>(), 0..300)
            .prop_map(|bytes| String::from_utf8_lossy(&bytes).into_owned()),
    ]
}

/// A JSON payload of the kinds signed tokens carry.
fn payload() -> impl Strategy<Value = (String, i64, Vec<u8>)> {
    (
        any::<String>(),
        any::<i64>(),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
}

// Signed tokens (tickets and cursors are both made by `Signer`).
proptest! {
    #[test]
    fn signed_tokens_never_verify_from_client_text(text in client_text()) {
        let signer = Signer::new(&keyring(SECRET), "cursor", TTL);
        prop_assert!(signer.open::<Value>(&text).is_err());
    }

    #[test]
    fn signed_tokens_round_trip(value in payload()) {
        let signer = Signer::new(&keyring(SECRET), "cursor", TTL);
        let token = signer.sign(&value);
        prop_assert_eq!(signer.open::<(String, i64, Vec<u8>)>(&token), Ok(value));
    }

    #[test]
    fn signed_tokens_with_a_flipped_bit_are_refused(value in payload(), bit in any::<usize>()) {
        let signer = Signer::new(&keyring(SECRET), "cursor", TTL);
        let token = signer.sign(&value);
        if let Some(altered) = flip(&token, bit) {
            prop_assert!(signer.open::<Value>(&altered).is_err(), "{altered}");
        }
    }

    #[test]
    fn signed_tokens_verify_for_their_own_purpose_and_secret_only(value in payload()) {
        let signer = Signer::new(&keyring(SECRET), "cursor", TTL);
        let token = signer.sign(&value);
        let other_purpose = Signer::new(&keyring(SECRET), "stream-ticket", TTL);
        let other_secret = Signer::new(&keyring(OTHER_SECRET), "cursor", TTL);
        prop_assert_eq!(other_purpose.open::<Value>(&token), Err(SignedError::BadSignature));
        prop_assert_eq!(other_secret.open::<Value>(&token), Err(SignedError::BadSignature));
    }
}

/// An API state on embedded parts in a directory of its own (kept for the whole run).
fn api_state() -> &'static ApiState {
    static STATE: OnceLock<(ApiState, tempfile::TempDir)> = OnceLock::new();
    &STATE
        .get_or_init(|| {
            let _guard = runtime().enter();
            let dir = tempfile::tempdir().unwrap();
            let store = EmbeddedStore::open(&dir.path().join("store.sqlite")).unwrap();
            let bus =
                EmbeddedBus::open(&dir.path().join("bus.sqlite"), LogSettings::default()).unwrap();
            let identity = DevIdentity::open(dir.path()).unwrap();
            let state = ApiState::new(
                Arc::new(store),
                Arc::new(bus),
                Arc::new(identity),
                &keyring(SECRET),
            );
            (state, dir)
        })
        .0
}

fn pager(list: &str) -> Pager<'static> {
    Pager::new(
        api_state(),
        list.to_owned(),
        PageLimit::parse(None).unwrap(),
    )
}

// Paging cursors: a 400 for anything the server did not sign for this very list.
proptest! {
    #[test]
    fn cursors_never_open_from_client_text(text in client_text()) {
        prop_assert!(pager("signals:a").open::<Value>(Some(&text)).is_err());
    }

    #[test]
    fn cursors_round_trip(position in payload(), list in "[a-z]{1,10}:[0-9a-f-]{0,36}") {
        let pager = pager(&list);
        let cursor = pager.cursor(&position);
        let opened = pager.open::<(String, i64, Vec<u8>)>(Some(&cursor)).unwrap();
        prop_assert_eq!(opened, Some(position));
    }

    #[test]
    fn cursors_with_a_flipped_bit_are_refused(position in payload(), bit in any::<usize>()) {
        let pager = pager("signals:a");
        let cursor = pager.cursor(&position);
        if let Some(altered) = flip(&cursor, bit) {
            prop_assert!(pager.open::<Value>(Some(&altered)).is_err(), "{altered}");
        }
    }

    #[test]
    fn cursors_of_another_list_are_refused(position in payload(), a in "[a-z]{1,8}", b in "[a-z]{1,8}") {
        prop_assume!(a != b);
        let cursor = pager(&a).cursor(&position);
        prop_assert!(pager(&b).open::<Value>(Some(&cursor)).is_err());
    }
}

fn dev_identity() -> &'static (Arc<DevIdentity>, tempfile::TempDir) {
    static IDENTITY: OnceLock<(Arc<DevIdentity>, tempfile::TempDir)> = OnceLock::new();
    IDENTITY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        (Arc::new(DevIdentity::open(dir.path()).unwrap()), dir)
    })
}

fn stream_auth(secret: &str) -> StreamAuth {
    StreamAuth::new(
        Arc::clone(&dev_identity().0) as Arc<dyn Identity>,
        &keyring(secret),
        Duration::from_secs(60),
    )
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    headers
}

// Stream tickets (`?ticket=` on `/v1/events` and `/v1/ws`).
proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn tickets_never_open_from_client_text(text in client_text(), reconnect in any::<bool>()) {
        let auth = stream_auth(SECRET);
        let opened = runtime().block_on(auth.authenticate(&HeaderMap::new(), Some(&text), reconnect));
        prop_assert!(opened.is_err());
    }

    #[test]
    fn tickets_round_trip_and_refuse_a_flipped_bit(
        username in "[a-z][a-z0-9]{0,15}",
        bit in any::<usize>(),
        reconnect in any::<bool>(),
    ) {
        let auth = stream_auth(SECRET);
        let identity = &dev_identity().0;
        let token = identity.mint(&username, Duration::from_secs(600));
        let user = runtime().block_on(identity.authenticate(&token)).unwrap().user_id;
        let ticket = runtime().block_on(auth.issue(&bearer(&token))).unwrap().ticket;
        let opened = runtime()
            .block_on(auth.authenticate(&HeaderMap::new(), Some(&ticket), reconnect))
            .unwrap();
        prop_assert_eq!(opened.user, user);
        // Another deployment's secret does not open it.
        let elsewhere = stream_auth(OTHER_SECRET);
        prop_assert!(
            runtime()
                .block_on(elsewhere.authenticate(&HeaderMap::new(), Some(&ticket), reconnect))
                .is_err()
        );
        if let Some(altered) = flip(&ticket, bit) {
            let opened =
                runtime().block_on(auth.authenticate(&HeaderMap::new(), Some(&altered), reconnect));
            prop_assert!(opened.is_err(), "{altered}");
        }
    }
}

fn oidc_identity() -> &'static OidcIdentity {
    static OIDC: OnceLock<OidcIdentity> = OnceLock::new();
    // Nothing listens there: a token that got as far as needing keys could not be verified.
    OIDC.get_or_init(|| {
        // Its key refresher runs on the tests' runtime.
        let _entered = runtime().enter();
        OidcIdentity::new(
            "http://127.0.0.1:9/realms/none",
            vec!["confab".into()],
            30,
            Duration::from_secs(300),
        )
        .unwrap()
    })
}

// Bearer tokens: the `Authorization` header, dev tokens and provider tokens.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn authorization_headers_never_panic(value in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(value) = HeaderValue::from_bytes(&value) {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, value);
            if let Ok(token) = bearer_token(&headers) {
                prop_assert!(!token.is_empty());
            }
        }
    }

    #[test]
    fn tokens_never_verify_from_client_text(text in client_text()) {
        prop_assert!(runtime().block_on(dev_identity().0.authenticate(&text)).is_err());
        prop_assert!(runtime().block_on(oidc_identity().authenticate(&text)).is_err());
    }

    #[test]
    fn dev_tokens_round_trip_and_refuse_a_flipped_bit(
        username in "\\PC{1,40}",
        bit in any::<usize>(),
    ) {
        let identity = &dev_identity().0;
        let token = identity.mint(&username, Duration::from_secs(600));
        let principal = runtime().block_on(identity.authenticate(&token)).unwrap();
        prop_assert_eq!(&principal.username, &username);
        if let Some(altered) = flip(&token, bit) {
            prop_assert!(runtime().block_on(identity.authenticate(&altered)).is_err(), "{altered}");
        }
        // Another key does not verify it.
        let other = DevIdentity::open(tempfile::tempdir().unwrap().path()).unwrap();
        prop_assert!(runtime().block_on(other.authenticate(&token)).is_err());
    }

    #[test]
    fn expired_dev_tokens_are_refused(username in "[a-z]{1,12}", ago in 1i64..10_000_000) {
        let identity = &dev_identity().0;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let token = identity.mint_until(&username, now - ago);
        prop_assert!(runtime().block_on(identity.authenticate(&token)).is_err());
    }
}
