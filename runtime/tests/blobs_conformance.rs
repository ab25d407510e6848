//! The blobs conformance suite against a local directory and against SeaweedFS's S3 gateway that
//! `infra/up.sh` started (a fresh key prefix per case, removed afterwards by the case's deletes
//! and the gateway's own clean-up of the test bucket), each also behind the memory cache.

use std::sync::Arc;

use confab_runtime::blobs::conformance::{self as suite, Fixture};
use confab_runtime::blobs::{CacheLimits, CachedBlobs, LocalBlobs, S3Blobs};
use confab_runtime::blobs_conformance_tests;

async fn local() -> Option<Fixture> {
    let dir = tempfile::tempdir().expect("temp dir").keep();
    Some(Fixture {
        blobs: Arc::new(LocalBlobs::open(&dir).expect("opens")),
    })
}

async fn s3() -> Option<Fixture> {
    let settings = suite::s3_settings().await?;
    let blobs = S3Blobs::new(&settings);
    // As the readiness check does at start-up: asked first, so that every case of a body with
    // a known length takes the streamed path, not the held one.
    assert!(
        blobs.checks_checksums().await,
        "SeaweedFS refuses a PUT whose x-amz-checksum-sha256 is wrong"
    );
    Some(Fixture {
        blobs: Arc::new(blobs),
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
