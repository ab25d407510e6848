//! The blobs conformance suite against a local directory and against SeaweedFS's S3 gateway that
//! `infra/up.sh` started (a fresh key prefix per case, removed afterwards by the case's deletes
//! and the gateway's own clean-up of the test bucket), each also behind the memory cache.

use std::sync::Arc;

use confab_runtime::blobs::conformance::{self as suite, Fixture};
use confab_runtime::blobs::{Blobs, CacheLimits, CachedBlobs, LocalBlobs, S3Blobs};
use confab_runtime::blobs_conformance_tests;
use futures::StreamExt;

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
/// push each other out; `keeps_first_reads` as the setting (false by default).
fn cached_with(fixture: Fixture, keeps_first_reads: bool) -> Fixture {
    let limits = CacheLimits {
        total_bytes: 16 * 1024,
        object_bytes: 8 * 1024,
        keeps_first_reads,
    };
    Fixture {
        blobs: Arc::new(CachedBlobs::new(fixture.blobs, limits)),
    }
}

fn cached(fixture: Fixture) -> Fixture {
    cached_with(fixture, false)
}

/// Every read from the storage made as a shared read and checked against its name, on S3.
async fn cached_from_first_read_s3() -> Option<Fixture> {
    s3().await.map(|fixture| cached_with(fixture, true))
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
blobs_conformance_tests!(
    cached_from_first_read_seaweedfs_s3,
    super::cached_from_first_read_s3
);

/// The staging objects under `prefix` now.
async fn staging_objects(blobs: &S3Blobs, prefix: &str) -> usize {
    blobs
        .client()
        .list_objects_v2()
        .bucket(blobs.bucket())
        .prefix(format!("{prefix}staging/"))
        .send()
        .await
        .expect("lists the staging objects")
        .key_count()
        .unwrap_or(0) as usize
}

/// A staged body of known length up to a part is held in memory until its commit, within the
/// memory budget for all of them: with the budget taken, the next is staged in the storage, and
/// a held body gives its share back once its upload is done with it.
#[tokio::test]
async fn seaweedfs_s3_staged_bodies_are_held_within_the_memory_budget() {
    let Some(settings) = suite::s3_settings().await else {
        return;
    };
    let blobs = S3Blobs::new(&settings).with_held_budget(8 * 1024);
    let prefix = settings.prefix.clone();
    let held = blobs
        .stage(suite::pattern(7, 6000, 1000), Some(6000), 1 << 20)
        .await
        .expect("stages");
    assert_eq!(staging_objects(&blobs, &prefix).await, 0, "held in memory");
    let over_budget = blobs
        .stage(suite::pattern(8, 6000, 1000), Some(6000), 1 << 20)
        .await
        .expect("stages");
    assert_eq!(
        staging_objects(&blobs, &prefix).await,
        1,
        "staged in the storage once the budget is taken"
    );
    blobs.commit(&held).await.expect("commits");
    blobs.commit(&over_budget).await.expect("commits");
    assert_eq!(staging_objects(&blobs, &prefix).await, 0);
    for (staged, seed) in [(&held, 7u8), (&over_budget, 8)] {
        let read = blobs.get(&staged.name, None).await.expect("reads");
        let bytes: Vec<u8> = read
            .chunks
            .map(|chunk| chunk.expect("a chunk").to_vec())
            .concat()
            .await;
        let expected: Vec<u8> = (0..6000usize)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        assert_eq!(bytes, expected);
    }
    let names = [held.name.clone(), over_budget.name.clone()];
    drop(held);
    let again = blobs
        .stage(suite::pattern(9, 6000, 1000), Some(6000), 1 << 20)
        .await
        .expect("stages");
    assert_eq!(
        staging_objects(&blobs, &prefix).await,
        0,
        "held again once the first gave its share back"
    );
    blobs.discard(&again).await.expect("discards");
    for name in &names {
        blobs.delete(name).await.expect("deletes");
    }
}
