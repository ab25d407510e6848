//! One behavioural suite for every [`Blobs`], split into cases. `runtime/tests/blobs_conformance.rs`
//! runs each case against SeaweedFS's S3 gateway (a fresh key prefix per case) and a local
//! directory through [`blobs_conformance_tests!`](crate::blobs_conformance_tests). Bodies are made
//! in memory as they stream; nothing is read from or written to disk by the suite itself.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;

use super::{BlobError, BlobName, Blobs, ByteChunks, Presentation, S3Settings};

/// A fresh, empty store: its multipart part size is 5 MiB where it has parts.
pub struct Fixture {
    pub blobs: Arc<dyn Blobs>,
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

/// `len` bytes of a pattern seeded by `seed`, in chunks of `chunk`.
pub fn pattern(seed: u8, len: usize, chunk: usize) -> ByteChunks {
    let mut sent = 0usize;
    futures::stream::iter(std::iter::from_fn(move || {
        if sent >= len {
            return None;
        }
        let n = chunk.min(len - sent);
        let bytes: Vec<u8> = (sent..sent + n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
        sent += n;
        Some(Ok(Bytes::from(bytes)))
    }))
    .boxed()
}

async fn collect(chunks: ByteChunks) -> Vec<u8> {
    let mut all = Vec::new();
    let mut chunks = chunks;
    while let Some(chunk) = chunks.next().await {
        all.extend_from_slice(&chunk.expect("reads"));
    }
    all
}

/// Removes every object a case made (the S3 cases share a bucket with other tests).
async fn empty(blobs: &dyn Blobs) {
    for object in blobs.list(None, 1000).await.expect("lists") {
        blobs.delete(&object.name).await.expect("deletes");
    }
}

fn expected(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A staged body is named by its SHA-256, counted and its head kept; committed, it reads back
/// whole, and nothing is left in staging.
pub async fn stages_and_commits_by_hash(fixture: Fixture) {
    let blobs = fixture.blobs;
    blobs.check().await.expect("usable");
    let staged = blobs
        .stage(pattern(1, 100_000, 4096), None, 1 << 20)
        .await
        .expect("stages");
    let bytes = expected(1, 100_000);
    assert_eq!(staged.size, 100_000);
    assert_eq!(staged.name, BlobName::of(&bytes));
    assert_eq!(staged.head, bytes[..super::HEAD_BYTES]);
    assert_eq!(blobs.size(&staged.name).await.expect("size"), None);
    blobs.commit(&staged).await.expect("commits");
    assert_eq!(blobs.size(&staged.name).await.expect("size"), Some(100_000));
    let read = blobs.get(&staged.name, None).await.expect("reads");
    assert_eq!(read.len, 100_000);
    assert_eq!(collect(read.chunks).await, bytes);
    assert_eq!(
        blobs.sweep_staging(Duration::ZERO).await.expect("sweeps"),
        0,
        "nothing left in staging"
    );
    empty(blobs.as_ref()).await;
}

/// The same bytes staged and committed twice are one object.
pub async fn the_same_bytes_are_one_object(fixture: Fixture) {
    let blobs = fixture.blobs;
    let first = blobs
        .stage(pattern(2, 5000, 999), None, 1 << 20)
        .await
        .expect("stages");
    // With its length given, as an HTTP body with a `Content-Length` (sent as it arrives).
    let second = blobs
        .stage(pattern(2, 5000, 1234), Some(5000), 1 << 20)
        .await
        .expect("stages");
    assert_eq!(first.name, second.name);
    blobs.commit(&first).await.expect("commits");
    blobs.commit(&second).await.expect("commits again");
    let listed = blobs.list(None, 100).await.expect("lists");
    assert_eq!(listed.len(), 1, "one object: {listed:?}");
    assert_eq!(listed[0].name, first.name);
    assert_eq!(listed[0].size, 5000);
    assert_eq!(
        blobs.sweep_staging(Duration::ZERO).await.expect("sweeps"),
        0
    );
    empty(blobs.as_ref()).await;
}

/// A body of several parts streams through (multipart on S3) and reads back, whole and by range.
pub async fn a_long_body_streams_in_parts(fixture: Fixture) {
    let blobs = fixture.blobs;
    let len = 11 * 1024 * 1024 + 17;
    let staged = blobs
        .stage(pattern(3, len, 64 * 1024), Some(len as u64), 1 << 30)
        .await
        .expect("stages");
    let bytes = expected(3, len);
    assert_eq!(staged.size, len as u64);
    assert_eq!(staged.name, BlobName::of(&bytes));
    blobs.commit(&staged).await.expect("commits");
    let whole = blobs.get(&staged.name, None).await.expect("reads");
    assert_eq!(whole.len, len as u64);
    assert!(
        collect(whole.chunks).await == bytes,
        "reads back the same bytes"
    );
    let (start, end) = (5 * 1024 * 1024 - 10, 5 * 1024 * 1024 + 10);
    let slice = blobs
        .get(&staged.name, Some((start as u64, end as u64)))
        .await
        .expect("reads a range");
    assert_eq!(slice.len, 21);
    assert_eq!(collect(slice.chunks).await, bytes[start..=end]);
    blobs.delete(&staged.name).await.expect("deletes");
    assert_eq!(blobs.size(&staged.name).await.expect("size"), None);
}

/// A body over the limit is refused, in one part or after several, and leaves nothing behind.
pub async fn over_the_limit_keeps_nothing(fixture: Fixture) {
    let blobs = fixture.blobs;
    for length in [None, Some(2000)] {
        let small = blobs.stage(pattern(4, 2000, 100), length, 1999).await;
        assert!(matches!(small, Err(BlobError::TooLarge(1999))), "{small:?}");
    }
    let exact = blobs
        .stage(pattern(4, 2000, 100), Some(2000), 2000)
        .await
        .expect("the limit itself is fine");
    blobs.discard(&exact).await.expect("discards");
    let long = blobs
        .stage(
            pattern(5, 12 * 1024 * 1024, 256 * 1024),
            None,
            6 * 1024 * 1024,
        )
        .await;
    assert!(matches!(long, Err(BlobError::TooLarge(_))), "{long:?}");
    assert_eq!(
        blobs.sweep_staging(Duration::ZERO).await.expect("sweeps"),
        0
    );
    assert!(blobs.list(None, 10).await.expect("lists").is_empty());
}

/// A body that ends with an error (the client went away) leaves nothing behind.
pub async fn a_cut_body_keeps_nothing(fixture: Fixture) {
    let blobs = fixture.blobs;
    for len in [1000, 7 * 1024 * 1024] {
        let body = pattern(6, len, 64 * 1024)
            .chain(futures::stream::once(async {
                Err(std::io::Error::other("client went away"))
            }))
            .boxed();
        let staged = blobs.stage(body, None, 1 << 30).await;
        assert!(matches!(staged, Err(BlobError::Body(_))), "{staged:?}");
        // Cut before the length it was sent with.
        let body = pattern(6, len / 2, 64 * 1024)
            .chain(futures::stream::once(async {
                Err(std::io::Error::other("client went away"))
            }))
            .boxed();
        let staged = blobs.stage(body, Some(len as u64), 1 << 30).await;
        assert!(matches!(staged, Err(BlobError::Body(_))), "{staged:?}");
    }
    assert_eq!(
        blobs.sweep_staging(Duration::ZERO).await.expect("sweeps"),
        0
    );
    assert!(blobs.list(None, 10).await.expect("lists").is_empty());
}

/// Missing objects: `None` size, `NotFound` reads, deletion is a no-op. An empty body stages.
pub async fn missing_objects_and_empty_bodies(fixture: Fixture) {
    let blobs = fixture.blobs;
    let missing = BlobName::of(b"never stored");
    assert_eq!(blobs.size(&missing).await.expect("size"), None);
    assert!(matches!(
        blobs.get(&missing, None).await,
        Err(BlobError::NotFound)
    ));
    blobs
        .delete(&missing)
        .await
        .expect("deleting nothing is fine");
    let empty = blobs
        .stage(futures::stream::empty().boxed(), None, 10)
        .await
        .expect("stages");
    assert_eq!(empty.size, 0);
    assert_eq!(empty.name, BlobName::of(b""));
    blobs.discard(&empty).await.expect("discards");
    assert_eq!(
        blobs.sweep_staging(Duration::ZERO).await.expect("sweeps"),
        0
    );
}

/// Small bytes go in by `put`; listing pages in name order; deletion removes.
pub async fn puts_lists_and_deletes(fixture: Fixture) {
    let blobs = fixture.blobs;
    let mut names = Vec::new();
    for i in 0..5u8 {
        let name = blobs
            .put(Bytes::from(vec![i; 10 + usize::from(i)]))
            .await
            .expect("puts");
        assert_eq!(name, BlobName::of(&vec![i; 10 + usize::from(i)]));
        names.push(name);
    }
    names.sort();
    let first = blobs.list(None, 2).await.expect("lists");
    let rest = blobs
        .list(Some(&first[1].name), 10)
        .await
        .expect("lists on");
    let listed: Vec<BlobName> = first.iter().chain(&rest).map(|b| b.name.clone()).collect();
    assert_eq!(listed, names);
    blobs.delete(&names[0]).await.expect("deletes");
    let listed = blobs.list(None, 10).await.expect("lists");
    assert_eq!(listed.len(), 4);
    assert!(listed.iter().all(|b| b.name != names[0]));
    empty(blobs.as_ref()).await;
}

/// A presigned URL (where the storage has them) reads the object without credentials, presented
/// as asked.
pub async fn presigned_urls_read_the_object(fixture: Fixture) {
    let blobs = fixture.blobs;
    let name = blobs
        .put(Bytes::from_static(b"<html>hi</html>"))
        .await
        .expect("puts");
    let presentation = Presentation {
        content_type: "text/html".into(),
        content_disposition: Some("attachment; filename=\"a.html\"".into()),
    };
    let Some(url) = blobs
        .presign(&name, Duration::from_secs(60), &presentation)
        .await
        .expect("presigns")
    else {
        empty(blobs.as_ref()).await;
        return;
    };
    let response = reqwest::get(&url).await.expect("fetches");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-disposition")
            .and_then(|v| v.to_str().ok()),
        Some("attachment; filename=\"a.html\"")
    );
    assert_eq!(
        response.bytes().await.expect("body").as_ref(),
        b"<html>hi</html>"
    );
    empty(blobs.as_ref()).await;
}

/// A body with a declared name becomes that object (in one part or several), and once it exists
/// a second upload of the same bytes is read, checked and not written again.
pub async fn a_declared_body_becomes_its_object(fixture: Fixture) {
    let blobs = fixture.blobs;
    // Without and with a known length (an HTTP body with a `Content-Length`), in one part and in
    // several.
    let cases = [
        (20u8, 3000usize, false),
        (22, 1024 * 1024 + 3, true),
        (21, 11 * 1024 * 1024 + 5, false),
        (23, 6 * 1024 * 1024 + 1, true),
    ];
    for (seed, len, known) in cases {
        let length = known.then_some(len as u64);
        let bytes = expected(seed, len);
        let name = BlobName::of(&bytes);
        let size = blobs
            .put_declared(pattern(seed, len, 64 * 1024), &name, length, 1 << 30)
            .await
            .expect("stores");
        assert_eq!(size, len as u64);
        assert_eq!(blobs.size(&name).await.expect("size"), Some(len as u64));
        let read = blobs.get(&name, None).await.expect("reads");
        assert!(collect(read.chunks).await == bytes, "reads back the bytes");
        let again = blobs
            .put_declared(pattern(seed, len, 64 * 1024), &name, length, 1 << 30)
            .await
            .expect("stores again");
        assert_eq!(again, len as u64);
        // Existing or not, a body unlike the name is refused.
        let forged = blobs
            .put_declared(pattern(seed + 1, len, 64 * 1024), &name, length, 1 << 30)
            .await;
        assert!(matches!(forged, Err(BlobError::Mismatch(_))), "{forged:?}");
        assert_eq!(blobs.size(&name).await.expect("size"), Some(len as u64));
        let read = blobs.get(&name, None).await.expect("reads");
        assert!(
            collect(read.chunks).await == bytes,
            "a refused body leaves the object as it was"
        );
    }
    assert_eq!(
        blobs.list(None, 10).await.expect("lists").len(),
        cases.len()
    );
    assert_eq!(
        blobs.sweep_staging(Duration::ZERO).await.expect("sweeps"),
        0,
        "nothing left in staging or half-uploaded"
    );
    empty(blobs.as_ref()).await;
}

/// A body unlike its declared name, over the limit, or cut short leaves no object and nothing
/// half-uploaded, in one part or after several.
pub async fn a_declared_body_that_fails_keeps_nothing(fixture: Fixture) {
    let blobs = fixture.blobs;
    let cases = [3000usize, 1024 * 1024, 11 * 1024 * 1024]
        .into_iter()
        .flat_map(|len| [(len, None), (len, Some(len as u64))]);
    for (len, length) in cases {
        let claimed = BlobName::of(&expected(30, len));
        let unlike = blobs
            .put_declared(pattern(31, len, 64 * 1024), &claimed, length, 1 << 30)
            .await;
        match unlike {
            Err(BlobError::Mismatch(actual)) => {
                assert_eq!(actual, BlobName::of(&expected(31, len)));
            }
            other => panic!("not refused as a mismatch: {other:?}"),
        }
        let over = blobs
            .put_declared(
                pattern(30, len, 64 * 1024),
                &claimed,
                length,
                len as u64 - 1,
            )
            .await;
        assert!(matches!(over, Err(BlobError::TooLarge(_))), "{over:?}");
        let cut = pattern(30, len / 2, 64 * 1024)
            .chain(futures::stream::once(async {
                Err(std::io::Error::other("client went away"))
            }))
            .boxed();
        let cut = blobs.put_declared(cut, &claimed, length, 1 << 30).await;
        assert!(matches!(cut, Err(BlobError::Body(_))), "{cut:?}");
        assert_eq!(blobs.size(&claimed).await.expect("size"), None);
    }
    assert!(blobs.list(None, 10).await.expect("lists").is_empty());
    assert_eq!(
        blobs.sweep_staging(Duration::ZERO).await.expect("sweeps"),
        0,
        "nothing left in staging or half-uploaded"
    );
}

/// A body longer or shorter than the length it came with is refused and leaves nothing, staged
/// or declared, in one part or several; its declared name or its own makes no difference.
pub async fn a_body_unlike_its_length_keeps_nothing(fixture: Fixture) {
    let blobs = fixture.blobs;
    for len in [3000usize, 1024 * 1024, 11 * 1024 * 1024] {
        let name = BlobName::of(&expected(40, len));
        for length in [len as u64 - 1, len as u64 + 1] {
            let staged = blobs
                .stage(pattern(40, len, 64 * 1024), Some(length), 1 << 30)
                .await;
            assert!(
                matches!(staged, Err(BlobError::Body(_))),
                "{len} bytes said to be {length}: {staged:?}"
            );
            let declared = blobs
                .put_declared(pattern(40, len, 64 * 1024), &name, Some(length), 1 << 30)
                .await;
            assert!(
                matches!(declared, Err(BlobError::Body(_))),
                "{len} bytes said to be {length}: {declared:?}"
            );
            assert_eq!(blobs.size(&name).await.expect("size"), None);
        }
    }
    assert!(blobs.list(None, 10).await.expect("lists").is_empty());
    assert_eq!(
        blobs.sweep_staging(Duration::ZERO).await.expect("sweeps"),
        0,
        "nothing left in staging or half-uploaded"
    );
}

#[macro_export]
macro_rules! blobs_conformance_tests {
    ($module:ident, $make:path) => {
        mod $module {
            use $crate::blobs::conformance as suite;

            macro_rules! case {
                ($case:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        if let Some(fixture) = $make().await {
                            suite::$case(fixture).await;
                        }
                    }
                };
            }

            case!(stages_and_commits_by_hash);
            case!(the_same_bytes_are_one_object);
            case!(a_long_body_streams_in_parts);
            case!(over_the_limit_keeps_nothing);
            case!(a_cut_body_keeps_nothing);
            case!(missing_objects_and_empty_bodies);
            case!(puts_lists_and_deletes);
            case!(presigned_urls_read_the_object);
            case!(a_declared_body_becomes_its_object);
            case!(a_declared_body_that_fails_keeps_nothing);
            case!(a_body_unlike_its_length_keeps_nothing);
        }
    };
}
