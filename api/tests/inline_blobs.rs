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
use futures::StreamExt;

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
    let mut read = read.expect("reads");
    let mut all = Vec::new();
    while let Some(chunk) = read.chunks.next().await {
        all.extend_from_slice(&chunk.expect("a chunk"));
    }
    assert_eq!(all.len() as u64, read.len);
    Bytes::from(all)
}

/// Bytes above the limit whose name starts with the hex digit `first`.
fn large_named(first: char, seed: u8) -> Bytes {
    body_named(first, seed, UP_TO + 100)
}

fn body_named(first: char, seed: u8, len: usize) -> Bytes {
    (0u32..)
        .map(|n| {
            let mut bytes = vec![seed; len];
            bytes[..4].copy_from_slice(&n.to_le_bytes());
            Bytes::from(bytes)
        })
        .find(|bytes| BlobName::of(bytes).as_str().starts_with(first))
        .expect("some counter gives the digit")
}

/// The storage may answer a page shorter than asked without being at its end (S3 counts keys
/// that are not object names, then leaves them out). Paging the two places as one must still
/// list every object: the merged page may not run past what the short page covered.
#[tokio::test]
async fn a_short_page_from_the_storage_hides_nothing() {
    let Some(settings) = suite::s3_settings().await else {
        return;
    };
    let storage = Arc::new(S3Blobs::new(&settings));
    // A key under `blobs/` that is no object name, between the objects named 1… and 3….
    storage
        .client()
        .put_object()
        .bucket(&settings.bucket)
        .key(format!("{}blobs/2-not-an-object", settings.prefix))
        .body(confab_runtime::blobs::s3_sdk::primitives::ByteStream::from_static(b"x"))
        .send()
        .await
        .expect("puts a stray key");
    let blobs = inline(store(), storage.clone());
    let mut all = Vec::new();
    for (first, seed) in [('1', 1), ('3', 2), ('6', 3)] {
        all.push(blobs.put(large_named(first, seed)).await.expect("puts"));
    }
    for (first, seed) in [('4', 4), ('8', 5)] {
        all.push(blobs.put(body_named(first, seed, 100)).await.expect("puts"));
    }
    all.sort();
    let mut listed = Vec::new();
    let mut after: Option<BlobName> = None;
    loop {
        let page = blobs.list(after.as_ref(), 2).await.expect("lists");
        let Some(last) = page.last() else { break };
        after = Some(last.name.clone());
        listed.extend(page.into_iter().map(|b| b.name));
    }
    assert_eq!(listed, all, "every object once, in name order");
    for name in &all {
        blobs.delete(name).await.expect("deletes");
    }
    storage
        .client()
        .delete_object()
        .bucket(&settings.bucket)
        .key(format!("{}blobs/2-not-an-object", settings.prefix))
        .send()
        .await
        .expect("removes the stray key");
}

/// With the limit at 0 nothing new goes to the store, but what it kept before is still read,
/// listed and deleted (a deployment that turns the table off keeps its small attachments).
#[tokio::test]
async fn a_limit_of_zero_still_finds_what_the_store_kept() {
    let dir = tempfile::tempdir().expect("temp dir").keep();
    let storage: Arc<dyn Blobs> = Arc::new(LocalBlobs::open(&dir).expect("opens"));
    let store = store();
    let before = inline(Arc::clone(&store), Arc::clone(&storage));
    let kept = Bytes::from_static(b"kept in the store");
    let name = before.put(kept.clone()).await.expect("puts");

    let off: Arc<dyn Blobs> = Arc::new(InlineBlobs::new(
        Arc::new(StoreSmallObjects(store.clone())),
        Arc::clone(&storage),
        0,
    ));
    assert_eq!(
        read(off.get_sized(&name, kept.len() as u64, None).await).await,
        kept
    );
    let later = Bytes::from_static(b"written after");
    let later_name = off.put(later.clone()).await.expect("puts");
    use confab_api::store::Store;
    assert_eq!(
        store
            .small_object(later_name.as_str())
            .await
            .expect("reads"),
        None,
        "nothing new in the store"
    );
    assert_eq!(
        storage.size(&later_name).await.expect("size"),
        Some(later.len() as u64)
    );
    let staged = off
        .stage(
            futures::stream::iter([Ok(Bytes::from_static(b"staged"))]).boxed(),
            Some(6),
            100,
        )
        .await
        .expect("stages");
    off.commit(&staged).await.expect("commits");
    assert_eq!(storage.size(&staged.name).await.expect("size"), Some(6));
    let mut listed: Vec<BlobName> = off
        .list(None, 10)
        .await
        .expect("lists")
        .into_iter()
        .map(|b| b.name)
        .collect();
    listed.sort();
    let mut all = vec![name.clone(), later_name, staged.name];
    all.sort();
    assert_eq!(listed, all);
    off.delete(&name).await.expect("deletes");
    assert_eq!(
        store.small_object(name.as_str()).await.expect("reads"),
        None
    );
}
