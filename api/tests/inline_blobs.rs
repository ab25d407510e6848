//! The blobs conformance suite against small objects kept in the store's rows
//! ([`InlineBlobs`] over [`StoreSmallObjects`]), in front of a local directory and of SeaweedFS's S3
//! gateway that `infra/up.sh` started. Bodies up to 4 KiB go to the store, larger ones to the
//! storage, so the suite's cases (bodies of 0 bytes to 11 MiB) cross the limit both ways. Each case
//! gets a fresh embedded store and storage; the CQL store's side of the table has its own case in
//! the store conformance suite, and `tests/attachments.rs` runs both stacks end to end.

use std::sync::Arc;

use bytes::Bytes;
use confab_api::store::StoreSmallObjects;
use confab_api::store::embedded::EmbeddedStore;
use confab_runtime::blobs::conformance::{self as suite, Fixture};
use confab_runtime::blobs::{BlobName, Blobs, InlineBlobs, LocalBlobs, S3Blobs};
use confab_runtime::blobs_conformance_tests;

const UP_TO: usize = 4096;

fn store() -> Arc<EmbeddedStore> {
    let dir = tempfile::tempdir().expect("temp dir").keep();
    Arc::new(EmbeddedStore::open(&dir.join("confab.db")).expect("opens"))
}

fn inline(store: Arc<EmbeddedStore>, inner: Arc<dyn Blobs>) -> Arc<dyn Blobs> {
    Arc::new(InlineBlobs::new(
        Arc::new(StoreSmallObjects(store)),
        inner,
        UP_TO,
    ))
}

async fn local() -> Option<Fixture> {
    let dir = tempfile::tempdir().expect("temp dir").keep();
    let inner = Arc::new(LocalBlobs::open(&dir).expect("opens"));
    Some(Fixture {
        blobs: inline(store(), inner),
    })
}

async fn s3() -> Option<Fixture> {
    let settings = suite::s3_settings().await?;
    Some(Fixture {
        blobs: inline(store(), Arc::new(S3Blobs::new(&settings))),
    })
}

blobs_conformance_tests!(inline_local_directory, super::local);
blobs_conformance_tests!(inline_seaweedfs_s3, super::s3);

/// A small body is in the store, not in the storage; a larger one in the storage, not the store;
/// each reads back through either way of asking, and a deletion removes it from wherever it is.
#[tokio::test]
async fn small_bodies_live_in_the_store_and_large_ones_in_the_storage() {
    let Some(settings) = suite::s3_settings().await else {
        return;
    };
    let store = store();
    let storage: Arc<dyn Blobs> = Arc::new(S3Blobs::new(&settings));
    let blobs = inline(Arc::clone(&store), Arc::clone(&storage));
    let small = Bytes::from(vec![7u8; UP_TO]);
    let large = Bytes::from(vec![8u8; UP_TO + 1]);
    let small_name = blobs.put(small.clone()).await.expect("puts");
    let large_name = blobs.put(large.clone()).await.expect("puts");

    use confab_api::store::Store;
    assert_eq!(
        store
            .small_object(small_name.as_str())
            .await
            .expect("reads"),
        Some(small.to_vec())
    );
    assert_eq!(storage.size(&small_name).await.expect("size"), None);
    assert_eq!(
        store
            .small_object(large_name.as_str())
            .await
            .expect("reads"),
        None
    );
    assert_eq!(
        storage.size(&large_name).await.expect("size"),
        Some(large.len() as u64)
    );

    for (name, bytes) in [(&small_name, &small), (&large_name, &large)] {
        let size = bytes.len() as u64;
        assert_eq!(&read(blobs.get(name, None).await).await, bytes);
        assert_eq!(&read(blobs.get_sized(name, size, None).await).await, bytes);
        assert_eq!(
            read(blobs.get_sized(name, size, Some((1, 10))).await).await,
            bytes[1..=10]
        );
    }
    // An object stored in the other place than its size says (the limit changed since) is found.
    let moved = Bytes::from(vec![9u8; 10]);
    let moved_name = storage.put(moved.clone()).await.expect("puts");
    assert_eq!(
        read(blobs.get_sized(&moved_name, 10, None).await).await,
        moved
    );
    assert_eq!(
        read(blobs.get_sized(&small_name, UP_TO as u64 * 2, None).await).await,
        small
    );
    let missing = BlobName::of(b"missing");
    assert!(matches!(
        blobs.get_sized(&missing, 10_000, None).await,
        Err(confab_runtime::blobs::BlobError::NotFound)
    ));

    let presentation = confab_runtime::blobs::Presentation {
        content_type: "application/octet-stream".into(),
        content_disposition: None,
    };
    let ttl = std::time::Duration::from_secs(60);
    assert_eq!(
        blobs
            .presign(&small_name, ttl, &presentation)
            .await
            .expect("presigns"),
        None,
        "no URL for bytes in the store"
    );
    assert!(
        blobs
            .presign(&large_name, ttl, &presentation)
            .await
            .expect("presigns")
            .is_some()
    );

    let listed: Vec<BlobName> = blobs
        .list(None, 10)
        .await
        .expect("lists")
        .into_iter()
        .map(|b| b.name)
        .collect();
    let mut all = vec![small_name.clone(), large_name.clone(), moved_name.clone()];
    all.sort();
    assert_eq!(listed, all);
    for name in &all {
        blobs.delete(name).await.expect("deletes");
    }
    assert!(blobs.list(None, 10).await.expect("lists").is_empty());
    assert_eq!(
        store
            .small_object(small_name.as_str())
            .await
            .expect("reads"),
        None
    );
}

async fn read(
    read: Result<confab_runtime::blobs::BlobRead, confab_runtime::blobs::BlobError>,
) -> Bytes {
    use futures::StreamExt;
    let mut read = read.expect("reads");
    let mut all = Vec::new();
    while let Some(chunk) = read.chunks.next().await {
        all.extend_from_slice(&chunk.expect("a chunk"));
    }
    assert_eq!(all.len() as u64, read.len);
    Bytes::from(all)
}
