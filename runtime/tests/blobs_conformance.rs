//! The blobs conformance suite against a local directory and against SeaweedFS's S3 gateway that
//! `infra/up.sh` started (a fresh key prefix per case, removed afterwards by the case's deletes
//! and the gateway's own clean-up of the test bucket), each also behind the memory cache.

use std::sync::Arc;

use confab_runtime::blobs::conformance::Fixture;
use confab_runtime::blobs::{CacheLimits, CachedBlobs, LocalBlobs, S3Blobs, S3Settings};
use confab_runtime::blobs_conformance_tests;

async fn local() -> Option<Fixture> {
    let dir = tempfile::tempdir().expect("temp dir").keep();
    Some(Fixture {
        blobs: Arc::new(LocalBlobs::open(&dir).expect("opens")),
    })
}

/// The test bucket's settings from `CONFAB_TEST_S3_*`, or `None` (skipped) when the gateway is not
/// reachable and services are not required.
pub async fn s3_settings() -> Option<S3Settings> {
    let var = |name: &str, default: &str| {
        std::env::var(format!("CONFAB_TEST_S3_{name}")).unwrap_or_else(|_| default.into())
    };
    let endpoint = var("ENDPOINT", "http://127.0.0.1:8333");
    let address = endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    if tokio::net::TcpStream::connect(&address).await.is_err() {
        let required = std::env::var("CONFAB_REQUIRE_SERVICES").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "the S3 gateway is not reachable at {address}; infra/up.sh starts it"
        );
        eprintln!("SKIPPED an S3 blobs case: nothing at {address}; run infra/up.sh");
        return None;
    }
    Some(S3Settings {
        endpoint,
        bucket: var("BUCKET", "confab"),
        region: var("REGION", "us-east-1"),
        access_key: var("ACCESS_KEY", ""),
        secret_key: var("SECRET_KEY", ""),
        prefix: format!("t{}/", uuid::Uuid::new_v4().simple()),
        part_bytes: 5 * 1024 * 1024,
    })
}

async fn s3() -> Option<Fixture> {
    let settings = s3_settings().await?;
    Some(Fixture {
        blobs: Arc::new(S3Blobs::new(&settings)),
    })
}

/// The memory cache in front of a storage, small enough that the suite's objects both fit and
/// push each other out.
fn cached(fixture: Fixture) -> Fixture {
    let limits = CacheLimits {
        total_bytes: 16 * 1024,
        object_bytes: 8 * 1024,
    };
    Fixture {
        blobs: Arc::new(CachedBlobs::new(fixture.blobs, limits)),
    }
}

async fn cached_local() -> Option<Fixture> {
    local().await.map(cached)
}

async fn cached_s3() -> Option<Fixture> {
    s3().await.map(cached)
}

blobs_conformance_tests!(local_directory, super::local);
blobs_conformance_tests!(seaweedfs_s3, super::s3);
blobs_conformance_tests!(cached_local_directory, super::cached_local);
blobs_conformance_tests!(cached_seaweedfs_s3, super::cached_s3);
