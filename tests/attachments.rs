//! Attachments end to end, on the embedded default (a local directory) and on the real stack
//! (SeaweedFS's S3 gateway, a fresh key prefix per test): upload, download with ranges and
//! validators, deduplication, refusals, messages that carry attachments, the chat's list, hiding
//! on deletion, the collector, thumbnails, and S3 going away.

mod support;

use support::on_both_stacks;

use std::sync::Arc;
use std::time::Duration;

use confab_runtime::blobs::{BlobName, Blobs};
use serde_json::{Value, json};
use support::{DEADLINE, Relay, SseStream, Stack, TestApp, spawn_app, spawn_with};

fn hex_sha256(bytes: &[u8]) -> String {
    BlobName::of(bytes).to_string()
}

async fn upload(
    app: &TestApp,
    token: &str,
    chat: &str,
    name: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut request = app
        .http
        .post(app.url(&format!("/v1/chats/{chat}/attachments")))
        .query(&[("name", name)])
        .bearer_auth(token)
        .body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    request.send().await.unwrap()
}

async fn uploaded(
    app: &TestApp,
    token: &str,
    chat: &str,
    name: &str,
    ct: &str,
    body: &[u8],
) -> Value {
    let response = upload(app, token, chat, name, Some(ct), body.to_vec()).await;
    assert_eq!(response.status(), 201, "{name}");
    response.json().await.unwrap()
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 256) as u8])
    }));
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}

/// A JPEG with an EXIF segment (with a GPS tag's name in it) right after its start marker.
fn jpeg_with_exif() -> Vec<u8> {
    let image = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
        400,
        300,
        image::Rgb([200, 10, 10]),
    ));
    let mut plain = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut plain),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    let payload = b"Exif\0\0MM\0*\0\0\0\x08GPSLatitude 52.5200 N";
    let mut segment = vec![0xFF, 0xE1];
    segment.extend_from_slice(&((payload.len() + 2) as u16).to_be_bytes());
    segment.extend_from_slice(payload);
    let mut with_exif = plain[..2].to_vec();
    with_exif.extend_from_slice(&segment);
    with_exif.extend_from_slice(&plain[2..]);
    with_exif
}

/// The app's attachment storage as the server opens it (small objects in the store's rows).
async fn app_blobs(app: &TestApp) -> Arc<dyn Blobs> {
    let store = confab::open_store(&app.config, false).await.unwrap();
    confab::open_blobs(&app.config, store).unwrap()
}

async fn objects(app: &TestApp) -> Vec<BlobName> {
    let blobs = app_blobs(app).await;
    blobs
        .list(None, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect()
}

/// One run of the collector, taking objects of any age.
async fn collect(
    store: &dyn confab_api::store::Store,
    blobs: &dyn Blobs,
) -> confab_api::domain::attachments::Collected {
    confab_api::domain::attachments::collect_garbage(store, blobs, Duration::ZERO, |_| {})
        .await
        .unwrap()
}

async fn list(app: &TestApp, token: &str, chat: &str, query: &str) -> Value {
    let response = app
        .get(token, &format!("/v1/chats/{chat}/attachments{query}"))
        .await;
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

async fn upload_and_download(stack: Stack) {
    let app = spawn_app(stack).await;
    let (alice, bob) = (app.token("alice").await, app.token("bob").await);
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;

    let text = b"hello attachments".to_vec();
    let meta = uploaded(
        &app,
        &alice,
        &chat,
        "notes.txt",
        "text/plain; charset=utf-8",
        &text,
    )
    .await;
    assert_eq!(meta["name"], "notes.txt");
    assert_eq!(meta["size"], 17);
    assert_eq!(meta["content_type"], "text/plain");
    assert_eq!(meta["sha256"], hex_sha256(&text));
    assert_eq!(meta["kind"], "file");
    assert_eq!(meta["uploader"], alice_id.as_str());
    assert_eq!(meta["chat_id"], chat.as_str());
    let id = meta["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/attachments/{id}");

    // bob, a member, downloads it: a download, never rendered in the app's origin.
    let got = app.get(&bob, &path).await;
    assert_eq!(got.status(), 200);
    let headers = got.headers().clone();
    assert!(
        headers["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment; filename=\"notes.txt\"")
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["content-type"], "text/plain");
    assert_eq!(headers["content-length"], "17");
    assert_eq!(headers["accept-ranges"], "bytes");
    let etag = headers["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", hex_sha256(&text)));
    assert_eq!(got.bytes().await.unwrap().as_ref(), text.as_slice());

    // Ranges and validators.
    let range = |value: &'static str| {
        app.http
            .get(app.url(&path))
            .bearer_auth(&bob)
            .header("range", value)
            .send()
    };
    let part = range("bytes=0-4").await.unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], "bytes 0-4/17");
    assert_eq!(part.bytes().await.unwrap().as_ref(), b"hello");
    let tail = range("bytes=-5").await.unwrap();
    assert_eq!(tail.status(), 206);
    assert_eq!(tail.bytes().await.unwrap().as_ref(), b"ments");
    let beyond = range("bytes=100-").await.unwrap();
    assert_eq!(beyond.status(), 416);
    assert_eq!(beyond.headers()["content-range"], "bytes */17");
    let cached = app
        .http
        .get(app.url(&path))
        .bearer_auth(&bob)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(cached.status(), 304);
    // `If-None-Match` compares weakly (RFC 9110, 13.1.2): a weak validator of the same bytes, in
    // a list, is the same copy; another tag is not.
    let if_none_match = |value: String| {
        app.http
            .get(app.url(&path))
            .bearer_auth(&bob)
            .header("if-none-match", value)
            .send()
    };
    let weak = if_none_match(format!("\"other\", W/{etag}")).await.unwrap();
    assert_eq!(weak.status(), 304, "a weak validator of the same bytes");
    let other = if_none_match("W/\"other\"".into()).await.unwrap();
    assert_eq!(other.status(), 200, "another tag");

    // The same bytes again, by someone else under another name: a new record, one object.
    let again = uploaded(&app, &bob, &chat, "copy.txt", "text/plain", &text).await;
    assert_ne!(again["id"], meta["id"]);
    assert_eq!(again["sha256"], meta["sha256"]);
    let names = objects(&app).await;
    assert_eq!(
        names
            .iter()
            .filter(|n| n.as_str() == hex_sha256(&text))
            .count(),
        1,
        "one object for the same bytes"
    );

    // HTML is served as a download; an image inline.
    let html = uploaded(
        &app,
        &alice,
        &chat,
        "page.html",
        "text/html",
        b"<script>alert(1)</script>",
    )
    .await;
    let got = app
        .get(
            &bob,
            &format!("/v1/attachments/{}", html["id"].as_str().unwrap()),
        )
        .await;
    assert!(
        got.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment;")
    );
    assert_eq!(got.headers()["x-content-type-options"], "nosniff");
    let picture = uploaded(&app, &alice, &chat, "dot.png", "image/png", &png(4, 4)).await;
    assert_eq!(picture["kind"], "image");
    let got = app
        .get(
            &bob,
            &format!("/v1/attachments/{}", picture["id"].as_str().unwrap()),
        )
        .await;
    assert!(
        got.headers()["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("inline;")
    );
    assert_eq!(got.headers()["content-type"], "image/png");

    // A larger body streams through (several parts on S3) and reads back the same.
    let large: Vec<u8> = (0..(9 * 1024 * 1024 + 3))
        .map(|i: u32| (i % 253) as u8)
        .collect();
    let big = uploaded(
        &app,
        &alice,
        &chat,
        "big.bin",
        "application/octet-stream",
        &large,
    )
    .await;
    assert_eq!(big["sha256"], hex_sha256(&large));
    let got = app
        .get(
            &bob,
            &format!("/v1/attachments/{}", big["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(got.status(), 200);
    assert!(got.bytes().await.unwrap().as_ref() == large.as_slice());
    app.stop().await;
}
on_both_stacks!(upload_and_download);

async fn refusals_keep_nothing(stack: Stack) {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    config.attachments.max_bytes = 64 * 1024;
    let app = spawn_with(stack, config, data).await;
    let (alice, bob, carol) = (
        app.token("alice").await,
        app.token("bob").await,
        app.token("carol").await,
    );
    let bob_id = app.me(&bob).await;
    app.me(&carol).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let kept = uploaded(&app, &alice, &chat, "kept.txt", "text/plain", b"kept").await;

    let problem = |response: reqwest::Response, status: u16| async move {
        assert_eq!(response.status(), status);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        response.json::<Value>().await.unwrap()
    };
    // Non-members: 403 on upload, 404 on download (an id reveals nothing); no token: 401.
    problem(
        upload(
            &app,
            &carol,
            &chat,
            "x.txt",
            Some("text/plain"),
            b"x".to_vec(),
        )
        .await,
        403,
    )
    .await;
    problem(
        app.get(
            &carol,
            &format!("/v1/attachments/{}", kept["id"].as_str().unwrap()),
        )
        .await,
        404,
    )
    .await;
    problem(
        app.get(&carol, &format!("/v1/chats/{chat}/attachments"))
            .await,
        403,
    )
    .await;
    let anonymous = app
        .http
        .post(app.url(&format!("/v1/chats/{chat}/attachments?name=a.txt")))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    problem(
        app.get(&bob, &format!("/v1/attachments/{}", uuid::Uuid::now_v7()))
            .await,
        404,
    )
    .await;
    problem(app.get(&bob, "/v1/attachments/not-an-id").await, 400).await;

    // Bad names, an empty body, types that contradict the bytes, a malformed type.
    for name in [
        "../etc/passwd",
        "a\\b",
        "bell\u{7}.txt",
        "line\nbreak",
        "",
        "..",
    ] {
        problem(
            upload(&app, &alice, &chat, name, Some("text/plain"), b"x".to_vec()).await,
            400,
        )
        .await;
    }
    let missing_name = app
        .http
        .post(app.url(&format!("/v1/chats/{chat}/attachments")))
        .bearer_auth(&alice)
        .body("x")
        .send()
        .await
        .unwrap();
    problem(missing_name, 400).await;
    problem(
        upload(
            &app,
            &alice,
            &chat,
            "empty.txt",
            Some("text/plain"),
            Vec::new(),
        )
        .await,
        400,
    )
    .await;
    problem(
        upload(
            &app,
            &alice,
            &chat,
            "fake.png",
            Some("image/png"),
            b"not a png".to_vec(),
        )
        .await,
        415,
    )
    .await;
    problem(
        upload(
            &app,
            &alice,
            &chat,
            "real.txt",
            Some("text/plain"),
            png(2, 2),
        )
        .await,
        415,
    )
    .await;
    problem(
        upload(
            &app,
            &alice,
            &chat,
            "pic.jpg",
            Some("image/jpeg"),
            png(2, 2),
        )
        .await,
        415,
    )
    .await;
    problem(
        upload(
            &app,
            &alice,
            &chat,
            "x.bin",
            Some("nonsense"),
            b"x".to_vec(),
        )
        .await,
        415,
    )
    .await;

    // Over the limit: with a declared length, and streamed without one.
    let body = vec![7u8; 100 * 1024];
    problem(
        upload(&app, &alice, &chat, "big.bin", None, body.clone()).await,
        413,
    )
    .await;
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(8 * 1024).map(|c| Ok(c.to_vec())).collect();
    let streamed = app
        .http
        .post(app.url(&format!("/v1/chats/{chat}/attachments?name=big.bin")))
        .bearer_auth(&alice)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    problem(streamed, 413).await;

    // Of all that, only the first upload was kept: one record, one object, nothing staged.
    let listed = list(&app, &alice, &chat, "").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(objects(&app).await, [BlobName::of(b"kept")]);
    let blobs = app_blobs(&app).await;
    assert_eq!(blobs.sweep_staging(Duration::ZERO).await.unwrap(), 0);
    app.stop().await;
}
on_both_stacks!(refusals_keep_nothing);

/// A name with a bidirectional formatting character, the classic "invoice\u{202E}fdp.exe" that
/// shows as "invoiceexe.pdf" among them, is refused like any other bad name (400, problem+json),
/// and nothing of the upload is kept.
async fn names_with_bidi_controls_are_refused_and_nothing_kept(stack: Stack) {
    let app = spawn_app(stack).await;
    let (alice, bob) = (app.token("alice").await, app.token("bob").await);
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    for bidi in [
        '\u{061C}', '\u{200E}', '\u{200F}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}',
        '\u{202E}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
    ] {
        let name = format!("invoice{bidi}fdp.exe");
        let response = upload(
            &app,
            &alice,
            &chat,
            &name,
            Some("application/octet-stream"),
            b"MZ not really".to_vec(),
        )
        .await;
        assert_eq!(response.status(), 400, "{name:?}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json",
            "{name:?}"
        );
        let problem: Value = response.json().await.unwrap();
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|detail| detail.contains("bidirectional")),
            "{name:?}: {problem}"
        );
    }
    let listed = list(&app, &alice, &chat, "").await;
    assert_eq!(listed["items"], json!([]), "{listed}");
    assert_eq!(objects(&app).await, Vec::<BlobName>::new());
    let blobs = app_blobs(&app).await;
    assert_eq!(blobs.sweep_staging(Duration::ZERO).await.unwrap(), 0);
    app.stop().await;
}
on_both_stacks!(names_with_bidi_controls_are_refused_and_nothing_kept);

/// `Content-Digest` with the body's SHA-256 in RFC 9530's form.
fn content_digest(bytes: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    format!(
        "sha-256=:{}:",
        base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(bytes))
    )
}

async fn upload_declared(
    app: &TestApp,
    token: &str,
    chat: &str,
    name: &str,
    content_type: &str,
    digest: &str,
    body: Vec<u8>,
) -> reqwest::Response {
    app.http
        .post(app.url(&format!("/v1/chats/{chat}/attachments")))
        .query(&[("name", name)])
        .bearer_auth(token)
        .header("content-type", content_type)
        .header("content-digest", digest)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// An upload whose SHA-256 the client declares is stored under it (once, however often it is
/// uploaded), and one whose body does not match, or whose type its bytes contradict, leaves
/// nothing; an object of the declared name that exists already is left as it was.
async fn declared_digests_store_once_and_refuse_a_mismatch(stack: Stack) {
    let app = spawn_app(stack).await;
    let (alice, bob) = (app.token("alice").await, app.token("bob").await);
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let problem = |response: reqwest::Response, status: u16, kind: &'static str| async move {
        assert_eq!(response.status(), status);
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let body = response.json::<Value>().await.unwrap();
        assert!(
            body["type"].as_str().unwrap_or_default().ends_with(kind),
            "{body}"
        );
        body
    };

    let bytes = b"declared bytes".to_vec();
    let digest = content_digest(&bytes);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let response = upload_declared(
            &app,
            &alice,
            &chat,
            "d.txt",
            "text/plain",
            &digest,
            bytes.clone(),
        )
        .await;
        assert_eq!(response.status(), 201);
        let stored: Value = response.json().await.unwrap();
        assert_eq!(stored["sha256"], hex_sha256(&bytes));
        assert_eq!(stored["size"], bytes.len());
        ids.push(stored["id"].as_str().unwrap().to_owned());
    }
    let read = app
        .get(&alice, &format!("/v1/attachments/{}", ids[1]))
        .await;
    assert_eq!(read.status(), 200);
    assert_eq!(read.bytes().await.unwrap().as_ref(), bytes.as_slice());
    assert_eq!(objects(&app).await, [BlobName::of(&bytes)], "one object");

    // A body unlike its digest: refused, whether or not the declared object exists.
    let other = b"other bytes".to_vec();
    problem(
        upload_declared(
            &app,
            &alice,
            &chat,
            "o.txt",
            "text/plain",
            &digest,
            other.clone(),
        )
        .await,
        400,
        "digest-mismatch",
    )
    .await;
    problem(
        upload_declared(
            &app,
            &alice,
            &chat,
            "o.txt",
            "text/plain",
            &content_digest(b"never uploaded"),
            other.clone(),
        )
        .await,
        400,
        "digest-mismatch",
    )
    .await;
    // Malformed, and a type the bytes contradict: refused before anything is written.
    for malformed in ["sha-256=:bm90IDMyIGJ5dGVz:", "sha-256=abc", "sha-256=:%%%:"] {
        problem(
            upload_declared(
                &app,
                &alice,
                &chat,
                "m.txt",
                "text/plain",
                malformed,
                other.clone(),
            )
            .await,
            400,
            "bad-request",
        )
        .await;
    }
    // Bytes that are not text: refused, not taken for an undeclared upload.
    let opaque = app
        .http
        .post(app.url(&format!("/v1/chats/{chat}/attachments")))
        .query(&[("name", "o.txt")])
        .bearer_auth(&alice)
        .header("content-type", "text/plain")
        .header(
            "content-digest",
            reqwest::header::HeaderValue::from_bytes(b"sha-256=:\xff:").unwrap(),
        )
        .body(other.clone())
        .send()
        .await
        .unwrap();
    problem(opaque, 400, "bad-request").await;
    problem(
        upload_declared(
            &app,
            &alice,
            &chat,
            "fake.png",
            "image/png",
            &content_digest(&other),
            other.clone(),
        )
        .await,
        415,
        "",
    )
    .await;
    assert_eq!(objects(&app).await, [BlobName::of(&bytes)], "nothing more");
    let listed = list(&app, &alice, &chat, "").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 2, "{listed}");

    // Only other algorithms: an upload like any other.
    let plain = upload_declared(
        &app,
        &alice,
        &chat,
        "p.txt",
        "text/plain",
        "sha-512=:AAAA:",
        other.clone(),
    )
    .await;
    assert_eq!(plain.status(), 201);
    let blobs = app_blobs(&app).await;
    assert_eq!(blobs.sweep_staging(Duration::ZERO).await.unwrap(), 0);
    app.stop().await;
}
on_both_stacks!(declared_digests_store_once_and_refuse_a_mismatch);

async fn messages_carry_attachments(stack: Stack) {
    let app = spawn_app(stack).await;
    let (alice, bob) = (app.token("alice").await, app.token("bob").await);
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let other = app.group_chat(&alice, &[&bob_id]).await;
    let mut sse = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob)).await;

    let file = uploaded(
        &app,
        &alice,
        &chat,
        "a.pdf",
        "application/pdf",
        b"%PDF-1.7 tiny",
    )
    .await;
    let elsewhere = uploaded(&app, &alice, &other, "b.txt", "text/plain", b"other chat").await;
    let bobs = uploaded(&app, &bob, &chat, "c.txt", "text/plain", b"bob's").await;
    let signals = format!("/v1/chats/{chat}/signals");

    // A message of attachments alone; the signal and its event carry their metadata.
    let sent = app
        .post(
            &alice,
            &signals,
            &json!({"kind": "message", "attachments": [file["id"]]}),
        )
        .await;
    assert_eq!(sent.status(), 201);
    let sent: Value = sent.json().await.unwrap();
    // As sent: the upload's metadata, and the message it went in.
    let mut file_sent = file.clone();
    file_sent["message_id"] = sent["id"].clone();
    assert_eq!(sent["attachments"], json!([file_sent]));
    let event = sse.next_of("signal.created").await;
    assert_eq!(event.data["data"]["attachments"], json!([file_sent]));
    let history: Value = app.get(&bob, &signals).await.json().await.unwrap();
    assert_eq!(history["items"][0]["attachments"], json!([file_sent]));
    let chats: Value = app.get(&bob, "/v1/chats").await.json().await.unwrap();
    let entry = chats["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == chat.as_str())
        .unwrap()
        .clone();
    assert_eq!(entry["latest_signal"]["attachments"], json!([file_sent]));

    // Another chat's upload, someone else's upload, one sent in another message already, an
    // unknown id, too many: 422.
    for ids in [
        json!([elsewhere["id"]]),
        json!([file["id"]]),
        json!([bobs["id"]]),
        json!([uuid::Uuid::now_v7()]),
        json!((0..11).map(|_| uuid::Uuid::now_v7()).collect::<Vec<_>>()),
    ] {
        let refused = app
            .post(
                &alice,
                &signals,
                &json!({"kind": "message", "text": "x", "attachments": ids}),
            )
            .await;
        assert_eq!(refused.status(), 422, "{ids}");
    }
    // A retry of the message that took an attachment (its nonce) names it again: the same
    // message comes back.
    let second = uploaded(&app, &alice, &chat, "d.txt", "text/plain", b"second").await;
    let with_nonce = json!({"kind": "message", "nonce": "n-1", "attachments": [second["id"]]});
    let first = app.post(&alice, &signals, &with_nonce).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    let again = app.post(&alice, &signals, &with_nonce).await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["attachments"][0]["message_id"], first["id"]);
    // Deleting the message that took it hides it; the message that was refused never had it.
    let deleted = app
        .http
        .delete(app.url(&format!("{signals}/{}", sent["id"].as_str().unwrap())))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let gone = app
        .get(
            &bob,
            &format!("/v1/attachments/{}", file["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(gone.status(), 404);
    app.stop().await;
}
on_both_stacks!(messages_carry_attachments);

async fn lists_page_by_kind(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let mut ids = Vec::new();
    for i in 0..5u8 {
        let (name, ct, body) = if i % 2 == 0 {
            (format!("f{i}.txt"), "text/plain", vec![b'a' + i; 10])
        } else {
            (format!("p{i}.png"), "image/png", png(3 + u32::from(i), 3))
        };
        ids.push(uploaded(&app, &alice, &chat, &name, ct, &body).await["id"].clone());
    }
    ids.reverse();
    let first = list(&app, &alice, &chat, "?limit=2").await;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    let rest = list(&app, &alice, &chat, &format!("?limit=10&cursor={cursor}")).await;
    assert!(rest["next_cursor"].is_null());
    let all: Vec<Value> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest["items"].as_array().unwrap())
        .map(|a| a["id"].clone())
        .collect();
    assert_eq!(all, ids);
    let images = list(&app, &alice, &chat, "?kind=image").await;
    let image_ids: Vec<Value> = images["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].clone())
        .collect();
    assert_eq!(image_ids, [ids[1].clone(), ids[3].clone()]);
    let files = list(&app, &alice, &chat, "?kind=file").await;
    assert_eq!(files["items"].as_array().unwrap().len(), 3);
    let bad = app
        .get(&alice, &format!("/v1/chats/{chat}/attachments?kind=video"))
        .await;
    assert_eq!(bad.status(), 400);
    let foreign = app
        .get(
            &alice,
            &format!("/v1/chats/{chat}/attachments?kind=image&cursor={cursor}"),
        )
        .await;
    assert_eq!(foreign.status(), 400, "a cursor of another listing");
    app.stop().await;
}
on_both_stacks!(lists_page_by_kind);

async fn deletion_hides_and_the_collector_removes(stack: Stack) {
    let app = spawn_app(stack).await;
    let (alice, bob) = (app.token("alice").await, app.token("bob").await);
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let signals = format!("/v1/chats/{chat}/signals");
    let (shared, alone) = (b"shared bytes".to_vec(), b"bytes of one".to_vec());
    let x = uploaded(&app, &alice, &chat, "x.txt", "text/plain", &shared).await;
    let y = uploaded(&app, &bob, &chat, "y.txt", "text/plain", &shared).await;
    let z = uploaded(&app, &alice, &chat, "z.txt", "text/plain", &alone).await;
    let send = |ids: Value| {
        let (app, alice, signals) = (&app, &alice, &signals);
        async move {
            let sent = app
                .post(
                    alice,
                    signals,
                    &json!({"kind": "message", "attachments": ids}),
                )
                .await;
            assert_eq!(sent.status(), 201);
            sent.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let m1 = send(json!([x["id"]])).await;
    let m2 = send(json!([z["id"]])).await;

    let deleted = app
        .http
        .delete(app.url(&format!("{signals}/{m1}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let tombstone: Value = deleted.json().await.unwrap();
    assert_eq!(tombstone["attachments"], json!([]));
    // Hidden from everyone: no download, not listed, not in history.
    for token in [&alice, &bob] {
        let gone = app
            .get(
                token,
                &format!("/v1/attachments/{}", x["id"].as_str().unwrap()),
            )
            .await;
        assert_eq!(gone.status(), 404);
        let listed = list(&app, token, &chat, "").await;
        assert!(
            listed["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|a| a["id"] != x["id"])
        );
    }
    let history: Value = app.get(&bob, &signals).await.json().await.unwrap();
    let m1_row = history["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == m1.as_str())
        .unwrap();
    assert_eq!(m1_row["attachments"], json!([]));

    // The collector keeps the shared bytes (y still refers to them), then removes z's once its
    // message is deleted.
    let store = confab::open_store(&app.config, false).await.unwrap();
    let blobs = app_blobs(&app).await;
    let run = collect(store.as_ref(), blobs.as_ref()).await;
    assert_eq!(run.removed, 0, "{run:?}");
    let deleted = app
        .http
        .delete(app.url(&format!("{signals}/{m2}")))
        .bearer_auth(&alice)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let mut progress = Vec::new();
    let run = confab_api::domain::attachments::collect_garbage(
        store.as_ref(),
        blobs.as_ref(),
        Duration::ZERO,
        |p| progress.push(p.scanned),
    )
    .await
    .unwrap();
    assert_eq!((run.scanned, run.removed), (2, 1), "{run:?}");
    assert!(!progress.is_empty(), "progress is reported");
    assert_eq!(objects(&app).await, [BlobName::of(&shared)]);
    let got = app
        .get(
            &bob,
            &format!("/v1/attachments/{}", y["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(got.bytes().await.unwrap().as_ref(), shared.as_slice());
    app.stop().await;
}
on_both_stacks!(deletion_hides_and_the_collector_removes);

/// The collector's race with an upload of the same bytes: the collector has marked the object (no
/// reference yet); the upload writes its reference, sees the mark and waits; the collector, which
/// checked before the reference, removes the object and lifts its mark; the upload then writes the
/// object again. The bytes are there at the end. Staged, and with a declared digest (whose body
/// streams to the storage before the reference is written, its last chunk held until then), small
/// enough to sit in the store and large enough for the bucket or directory.
async fn an_upload_outlives_a_collection_of_its_bytes(stack: Stack) {
    let app = spawn_app(stack).await;
    for (len, declared) in [(11, false), (11, true), (100_000, false), (100_000, true)] {
        an_upload_outlives_a_collection_of(&app, len, declared).await;
    }
    app.stop().await;
}

async fn an_upload_outlives_a_collection_of(app: &TestApp, len: usize, declared: bool) {
    let alice = app.token("alice").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let bytes: Vec<u8> = (0..len).map(|i| (i % 241) as u8 ^ declared as u8).collect();
    let name = BlobName::of(&bytes);
    // An earlier upload left the object, and its record was deleted: the object is garbage.
    let blobs: Arc<dyn Blobs> = app_blobs(app).await;
    blobs.put(bytes.clone().into()).await.unwrap();
    let store = confab::open_store(&app.config, false).await.unwrap();
    // The collector: no reference, so it marks the object…
    assert!(!store.blob_referenced(name.as_str()).await.unwrap());
    let until = time::OffsetDateTime::now_utc() + confab_api::domain::attachments::CONDEMN_LEASE;
    let run = uuid::Uuid::new_v4();
    store.condemn_blob(name.as_str(), run, until).await.unwrap();
    // …and, before it removes it, the upload of the same bytes arrives.
    let uploading = {
        let (http, url, alice) = (
            app.http.clone(),
            app.url(&format!("/v1/chats/{chat}/attachments?name=r.txt")),
            alice.clone(),
        );
        let bytes = bytes.clone();
        tokio::spawn(async move {
            let mut request = http.post(url).bearer_auth(alice);
            if declared {
                request = request.header("content-digest", content_digest(&bytes));
            }
            request.body(bytes).send().await.unwrap()
        })
    };
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !store.blob_referenced(name.as_str()).await.unwrap() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upload never wrote its reference"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !uploading.is_finished(),
        "the upload waits for the collection ({len} bytes, declared: {declared})"
    );
    // The collector read "unreferenced" before the reference: it removes the object, lifts the mark.
    blobs.delete(&name).await.unwrap();
    store.absolve_blob(name.as_str(), run).await.unwrap();
    let response = uploading.await.unwrap();
    assert_eq!(response.status(), 201);
    let meta: Value = response.json().await.unwrap();
    let got = app
        .get(
            &alice,
            &format!("/v1/attachments/{}", meta["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), bytes.as_slice());
    // In the storage itself, not only in the server's memory.
    assert_eq!(
        blobs.size(&name).await.unwrap(),
        Some(len as u64),
        "the object was made after the collection ({len} bytes, declared: {declared})"
    );
    // And a collection now keeps it.
    let run = collect(store.as_ref(), blobs.as_ref()).await;
    assert_eq!(run.removed, 0);
}
on_both_stacks!(an_upload_outlives_a_collection_of_its_bytes);

/// An attachment id as an upload that began `ago` would have made it.
fn id_begun(ago: Duration) -> uuid::Uuid {
    let at = std::time::SystemTime::now() - ago;
    let since = at.duration_since(std::time::UNIX_EPOCH).unwrap();
    uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
        uuid::NoContext,
        since.as_secs(),
        since.subsec_nanos(),
    ))
}

/// References no record will ever name do not keep their objects: an upload whose process
/// stopped two days ago between its reference and its record, and a picture that a failed
/// attempt referenced but its image's record does not name. The collector drops them and removes
/// their objects; it keeps the object of an upload that began a minute ago (it may still
/// finish) and the object a record names.
async fn the_collector_drops_orphaned_references(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let alice_id = app.me(&alice).await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let store = confab::open_store(&app.config, false).await.unwrap();
    let blobs = app_blobs(&app).await;
    let body = |seed: u8| -> Vec<u8> { (0..10_000u32).map(|i| (i % 239) as u8 ^ seed).collect() };
    let put = |bytes: Vec<u8>| {
        let blobs = Arc::clone(&blobs);
        async move { blobs.put(bytes.into()).await.unwrap() }
    };
    let stopped_upload = put(body(1)).await;
    let running_upload = put(body(2)).await;
    let recorded = put(body(3)).await;
    let unnamed_picture = put(body(4)).await;

    let two_days = Duration::from_secs(2 * 24 * 3600);
    store
        .add_blob_refs(id_begun(two_days), &[stopped_upload.to_string()])
        .await
        .unwrap();
    store
        .add_blob_refs(
            id_begun(Duration::from_secs(60)),
            &[running_upload.to_string()],
        )
        .await
        .unwrap();
    let image = confab_schema::Attachment {
        id: id_begun(two_days),
        chat_id: serde_json::from_value(json!(chat)).unwrap(),
        name: "old.png".into(),
        size: 10_000,
        content_type: "image/png".into(),
        sha256: recorded.to_string(),
        kind: confab_schema::AttachmentKind::Image,
        created_at: confab_schema::model::to_millis(time::OffsetDateTime::now_utc() - two_days),
        uploader: serde_json::from_value(json!(alice_id)).unwrap(),
        image: None,
        message_id: None,
    };
    store.put_attachment(&image).await.unwrap();
    store
        .add_blob_refs(image.id, &[unnamed_picture.to_string()])
        .await
        .unwrap();

    let run = collect(store.as_ref(), blobs.as_ref()).await;
    let mut left = objects(&app).await;
    left.sort();
    let mut expected = vec![running_upload.clone(), recorded.clone()];
    expected.sort();
    assert_eq!(
        left, expected,
        "the orphans' objects go, the others stay: {run:?}"
    );
    assert_eq!((run.removed, run.orphans_dropped), (2, 2), "{run:?}");
    assert!(
        !store
            .blob_referenced(stopped_upload.as_str())
            .await
            .unwrap()
    );
    assert!(
        !store
            .blob_referenced(unnamed_picture.as_str())
            .await
            .unwrap()
    );
    assert!(store.blob_referenced(recorded.as_str()).await.unwrap());
    // The record is untouched, and a second run finds nothing more to do.
    assert_eq!(store.get_attachments(&[image.id]).await.unwrap(), [image]);
    let again = collect(store.as_ref(), blobs.as_ref()).await;
    assert_eq!((again.removed, again.orphans_dropped), (0, 0), "{again:?}");
    app.stop().await;
}
on_both_stacks!(the_collector_drops_orphaned_references);

/// An upload may take `attachments.upload_timeout_secs` in all, however steadily its body
/// trickles in (each chunk well within the idle timeout): past that, 408 and nothing is kept,
/// neither a record nor an object, with a declared digest or without.
async fn an_upload_past_its_time_limit_is_refused_and_keeps_nothing(stack: Stack) {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    config.attachments.upload_timeout_secs = 3;
    let app = spawn_with(stack, config, data).await;
    let alice = app.token("alice").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let bytes: Vec<u8> = (0..40 * 1024u32).map(|i| (i % 233) as u8).collect();
    let store = confab::open_store(&app.config, false).await.unwrap();
    for declared in [false, true] {
        // 40 chunks 150 ms apart: 6 s in all.
        let chunks: Vec<Vec<u8>> = bytes.chunks(1024).map(<[u8]>::to_vec).collect();
        let trickle = futures::StreamExt::then(futures::stream::iter(chunks), |chunk| async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            Ok::<_, std::io::Error>(chunk)
        });
        let mut request = app
            .http
            .post(app.url(&format!("/v1/chats/{chat}/attachments")))
            .query(&[("name", "slow.bin")])
            .bearer_auth(&alice)
            .header("content-type", "application/octet-stream")
            .body(reqwest::Body::wrap_stream(trickle));
        if declared {
            request = request.header("content-digest", content_digest(&bytes));
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 408, "declared: {declared}");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
        let problem: Value = response.json().await.unwrap();
        assert!(
            problem["type"]
                .as_str()
                .unwrap()
                .ends_with("request-timeout"),
            "{problem}"
        );
    }
    assert_eq!(list(&app, &alice, &chat, "").await["items"], json!([]));
    assert_eq!(objects(&app).await, Vec::<BlobName>::new());
    let name = BlobName::of(&bytes);
    assert!(!store.blob_referenced(name.as_str()).await.unwrap());
    // A body that arrives in time is stored as ever.
    uploaded(
        &app,
        &alice,
        &chat,
        "quick.bin",
        "application/octet-stream",
        &bytes,
    )
    .await;
    app.stop().await;
}
on_both_stacks!(an_upload_past_its_time_limit_is_refused_and_keeps_nothing);

async fn wait_for_image(app: &TestApp, token: &str, chat: &str, id: &Value) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let listed = list(app, token, chat, "?limit=100").await;
        let found = listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == *id)
            .cloned()
            .unwrap();
        if !found["image"].is_null() || found["kind"] == "file" {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no thumbnail in time: {found}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn images_get_thumbnails_and_previews(stack: Stack) {
    let app = spawn_app(stack).await;
    let (alice, bob) = (app.token("alice").await, app.token("bob").await);
    let bob_id = app.me(&bob).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;

    let photo = uploaded(
        &app,
        &alice,
        &chat,
        "photo.jpg",
        "image/jpeg",
        &jpeg_with_exif(),
    )
    .await;
    assert_eq!(photo["kind"], "image");
    let done = wait_for_image(&app, &alice, &chat, &photo["id"]).await;
    assert_eq!(done["kind"], "image");
    assert_eq!(
        (
            done["image"]["width"].as_u64(),
            done["image"]["height"].as_u64()
        ),
        (Some(400), Some(300))
    );
    let thumbnail = &done["image"]["thumbnail"];
    assert_eq!(
        (thumbnail["width"].as_u64(), thumbnail["height"].as_u64()),
        (Some(320), Some(240))
    );
    let id = photo["id"].as_str().unwrap();
    let got = app
        .get(&bob, &format!("/v1/attachments/{id}/thumbnail"))
        .await;
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["content-type"], "image/jpeg");
    assert_eq!(
        got.headers()["etag"].to_str().unwrap(),
        format!("\"{}\"", thumbnail["sha256"].as_str().unwrap())
    );
    let bytes = got.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, thumbnail["size"].as_u64().unwrap());
    let decoded = image::load_from_memory(&bytes).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (320, 240));
    assert!(
        !bytes.windows(4).any(|w| w == b"Exif"),
        "no EXIF in the thumbnail"
    );
    assert!(!bytes.windows(3).any(|w| w == b"GPS"));
    let preview = app
        .get(&bob, &format!("/v1/attachments/{id}/preview"))
        .await;
    assert_eq!(preview.status(), 200);
    let preview = preview.bytes().await.unwrap();
    assert!(
        preview.len() < 2_000,
        "a preview is a few hundred bytes: {}",
        preview.len()
    );
    // A message carries the image's thumbnail and preview.
    let sent: Value = app
        .post(
            &alice,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": "look", "attachments": [photo["id"]]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(sent["attachments"][0]["image"]["thumbnail"], *thumbnail);
    // A file has no thumbnail.
    let file = uploaded(&app, &alice, &chat, "f.txt", "text/plain", b"words").await;
    let none = app
        .get(
            &bob,
            &format!("/v1/attachments/{}/thumbnail", file["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(none.status(), 404);

    // A decompression bomb (a header claiming 100000 × 100000 pixels) and a truncated image are
    // kept as plain files; the server goes on.
    let mut bomb = png(1, 1);
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let bomb = uploaded(&app, &alice, &chat, "bomb.png", "image/png", &bomb).await;
    let truncated = uploaded(
        &app,
        &alice,
        &chat,
        "cut.png",
        "image/png",
        &png(50, 50)[..60],
    )
    .await;
    for id in [&bomb["id"], &truncated["id"]] {
        let settled = wait_for_image(&app, &alice, &chat, id).await;
        assert_eq!(settled["kind"], "file", "{settled}");
        assert!(settled["image"].is_null());
    }
    // Re-filed: listed among the files, no longer among the images.
    let ids = |listed: Value| -> Vec<Value> {
        listed["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["id"].clone())
            .collect()
    };
    let images = ids(list(&app, &alice, &chat, "?kind=image&limit=100").await);
    let files = ids(list(&app, &alice, &chat, "?kind=file&limit=100").await);
    for id in [&bomb["id"], &truncated["id"]] {
        assert!(!images.contains(id) && files.contains(id), "{id}");
    }
    assert_eq!(app.get(&alice, "/v1/me").await.status(), 200);
    app.stop().await;
}
on_both_stacks!(images_get_thumbnails_and_previews);

/// Bodies kept in the store's rows stay readable when the limit is turned down to 0 later: the
/// server still looks in the table, it only stops writing to it.
async fn small_bodies_outlive_a_limit_of_zero(stack: Stack) {
    let app = spawn_app(stack).await;
    let alice = app.token("alice").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let kept = uploaded(
        &app,
        &alice,
        &chat,
        "kept.txt",
        "text/plain",
        b"kept inline",
    )
    .await;
    let name = BlobName::parse(kept["sha256"].as_str().unwrap()).unwrap();
    let mut config = app.config.clone();
    config.attachments.inline_bytes = 0;
    let store = confab::open_store(&config, false).await.unwrap();
    let blobs = confab::open_blobs(&config, store).unwrap();
    let mut read = blobs.get_sized(&name, 11, None).await.expect("still found");
    let mut bytes = Vec::new();
    while let Some(chunk) = futures::StreamExt::next(&mut read.chunks).await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(bytes, b"kept inline");
    assert!(
        blobs
            .list(None, 10)
            .await
            .unwrap()
            .iter()
            .any(|b| b.name == name)
    );
    app.stop().await;
}
on_both_stacks!(small_bodies_outlive_a_limit_of_zero);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_redirects_on_s3() {
    if !support::real_stack_available("presigned_redirects_on_s3").await {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(Stack::Real, data.path().to_path_buf());
    config.attachments.presigned_redirect = true;
    config.attachments.cache_object_bytes = 64;
    let app = spawn_with(Stack::Real, config, data).await;
    let alice = app.token("alice").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let get = |meta: Value| {
        no_redirects
            .get(app.url(&format!("/v1/attachments/{}", meta["id"].as_str().unwrap())))
            .bearer_auth(&alice)
            .send()
    };
    let downloaded_as_attachment = |response: &reqwest::Response| {
        response.status() == 200
            && response.headers()["content-disposition"]
                .to_str()
                .unwrap()
                .starts_with("attachment;")
    };
    // Up to the memory cache's object size the body is served, not redirected.
    let small = uploaded(&app, &alice, &chat, "small.html", "text/html", b"<i>hi</i>").await;
    let served = get(small).await.unwrap();
    assert!(downloaded_as_attachment(&served), "{served:?}");
    assert_eq!(served.bytes().await.unwrap().as_ref(), b"<i>hi</i>");
    // Over the cache's object size but kept in the store's rows: there is no URL to send the
    // client to, so confab serves it too.
    let kept_inline = format!("<u>{}</u>", "hi ".repeat(30));
    let kept_inline = uploaded(
        &app,
        &alice,
        &chat,
        "inline.html",
        "text/html",
        kept_inline.as_bytes(),
    )
    .await;
    let served = get(kept_inline).await.unwrap();
    assert!(downloaded_as_attachment(&served), "{served:?}");
    let page = format!("<b>{}</b>", "hi ".repeat(2000));
    let large = uploaded(
        &app,
        &alice,
        &chat,
        "page.html",
        "text/html",
        page.as_bytes(),
    )
    .await;
    let response = get(large).await.unwrap();
    assert_eq!(response.status(), 307);
    // The URL expires long before an hour: a browser must ask again each time, which also
    // checks the membership again.
    assert_eq!(response.headers()["cache-control"], "no-store");
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let fetched = reqwest::get(&location).await.unwrap();
    assert!(downloaded_as_attachment(&fetched), "{fetched:?}");
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), page.as_bytes());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_down_means_503_and_nothing_kept() {
    if !support::real_stack_available("s3_down_means_503_and_nothing_kept").await {
        return;
    }
    let endpoint = support::s3_endpoint();
    let relay = Relay::start(
        endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned(),
    )
    .await;
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(Stack::Real, data.path().to_path_buf());
    config.attachments.s3_endpoint = format!("http://{}", relay.addr);
    let direct = {
        let mut settings = config.attachments.s3_settings();
        settings.endpoint = endpoint;
        confab_runtime::blobs::S3Blobs::new(&settings)
    };
    let app = spawn_with(Stack::Real, config, data).await;
    let alice = app.token("alice").await;
    let bob_id = app.me(&app.token("bob").await).await;
    let chat = app.group_chat(&alice, &[&bob_id]).await;
    relay.cut();
    for body in [vec![2u8; 8 * 1024], vec![1u8; 6 * 1024 * 1024]] {
        let refused = upload(&app, &alice, &chat, "f.bin", None, body).await;
        assert_eq!(refused.status(), 503);
        assert_eq!(
            refused.headers()["content-type"],
            "application/problem+json"
        );
    }
    assert!(
        list(&app, &alice, &chat, "").await["items"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // A body small enough for the store's rows (`attachments.inline_bytes`) needs no S3 at all.
    let small = uploaded(
        &app,
        &alice,
        &chat,
        "small.bin",
        "application/octet-stream",
        b"small",
    )
    .await;
    let read = app
        .get(
            &alice,
            &format!("/v1/attachments/{}", small["id"].as_str().unwrap()),
        )
        .await;
    assert_eq!(read.status(), 200);
    assert_eq!(read.bytes().await.unwrap().as_ref(), b"small");
    assert!(direct.list(None, 10).await.unwrap().is_empty(), "no object");
    assert_eq!(
        direct.sweep_staging(Duration::ZERO).await.unwrap(),
        0,
        "nothing staged"
    );
    app.stop().await;
}
