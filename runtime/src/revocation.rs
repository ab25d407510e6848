//! Ended sessions: "log out everywhere" and OpenID Connect back-channel logouts. A
//! [`Revocation`] ends one provider session (`sid`: its tokens are refused from now on), or every
//! token of a user issued up to a time. Every process keeps the revocations in memory, checks each
//! authenticated token against them ([`RevocationAware`]) and ends the streams they name (the hub
//! subscribes to [`Revocations::subscribe`]).
//!
//! With NATS they are shared through a JetStream key-value bucket (`<prefix>_revocations`, one key
//! per user or session): every process watches it, so a logout received by one API process ends
//! streams on every notifier and is refused everywhere. `confab serve` keeps them in memory and
//! appends each to a file in its data directory (`revocations.jsonl`), read back at start, so a
//! restart does not bring a logged-out session's tokens back.
//!
//! Each revocation is kept as long as it can refuse something ([`Lasting`], [`Keep`]): most only
//! as long as a token issued before them lives (`identity.revocation_ttl_secs`); a session that a
//! logout everywhere ended in confab alone, whose tokens the provider may go on renewing until
//! its own session ends, as long as a session lives (`identity.session_ttl_secs`). In the bucket
//! each record carries its own time to live (`Nats-TTL`), the bucket's age limit being the longer
//! one; the file and the memory forget each record at its own time.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use confab_schema::UserId;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::broadcast;

use crate::identity::{AuthError, Identity, Logout, Principal};
use crate::kv_bucket::KvBucket;

/// One ended session, or every session of a user up to a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The user, when known (always, unless a logout token names only a session).
    pub user: Option<UserId>,
    /// The provider session that ended; `None`: every token of `user` issued up to `before`.
    pub session: Option<String>,
    /// When the logout happened (Unix seconds): tokens issued at or before it are refused.
    pub before: i64,
}

impl Revocation {
    /// A revocation of what a logout token names: of a user, their tokens issued up to the
    /// logout token's own issue, by the provider's clock that stamps them all (a logout token
    /// is accepted only within the leeway of this process's clock). Not up to the time it
    /// arrives: the same token posted again later, which a logout naming no session gives no
    /// way to tell, would end the sessions signed in since.
    pub fn of_logout(logout: &Logout) -> Revocation {
        Revocation {
            user: logout.user,
            session: logout.session.clone(),
            before: logout.issued_at,
        }
    }

    /// Whether a token (or a stream opened with one) of `user`, in `session`, issued at
    /// `issued_at`, is ended by this revocation.
    pub fn ends(&self, user: UserId, session: Option<&str>, issued_at: i64) -> bool {
        match &self.session {
            Some(ended) => session == Some(ended.as_str()),
            None => self.user == Some(user) && issued_at <= self.before,
        }
    }

    fn key(&self) -> Option<String> {
        match (&self.session, self.user) {
            (Some(session), _) => Some(format!("s_{}", hex(&Sha256::digest(session.as_bytes())))),
            (None, Some(user)) => Some(format!("u_{}", user.0.simple())),
            (None, None) => None,
        }
    }
}

/// How long a revocation must be kept to refuse what it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lasting {
    /// As long as a token issued before it lives: a user-wide revocation (later tokens are issued
    /// after it), or a session the provider ended too (back-channel logout), which renews nothing.
    Tokens,
    /// As long as a session lives at the provider: a session ended in confab alone (by a logout
    /// everywhere), whose tokens the provider may renew, with a new `iat`, until it ends there.
    Session,
}

/// How long each [`Lasting`] keeps a revocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keep {
    /// [`Lasting::Tokens`]: `identity.revocation_ttl_secs`.
    pub tokens: Duration,
    /// [`Lasting::Session`]: `identity.session_ttl_secs`, never less than `tokens`.
    pub sessions: Duration,
}

impl Keep {
    fn of(&self, lasting: Lasting) -> Duration {
        match lasting {
            Lasting::Tokens => self.tokens,
            Lasting::Session => self.sessions.max(self.tokens),
        }
    }

    fn longest(&self) -> Duration {
        self.of(Lasting::Session)
    }
}

/// Both for `ttl` (tests, and processes that keep every revocation alike).
impl From<Duration> for Keep {
    fn from(ttl: Duration) -> Keep {
        Keep {
            tokens: ttl,
            sessions: ttl,
        }
    }
}

/// A revocation as recorded (a bucket's value, a line of the file): with when it may be forgotten.
#[derive(Debug, Serialize, Deserialize)]
struct Recorded {
    #[serde(flatten)]
    revocation: Revocation,
    /// Unix seconds. Records of earlier versions have none: they are kept the longest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    until: Option<i64>,
}

impl Recorded {
    fn until(&self, keep: &Keep) -> i64 {
        self.until
            .unwrap_or_else(|| self.revocation.before.saturating_add(secs(keep.longest())))
    }
}

fn secs(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX / 2)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Default)]
struct Known {
    /// Every token of the user issued at or before the first time is refused, until the second
    /// (Unix seconds).
    users: HashMap<UserId, (i64, i64)>,
    /// Sessions ended, with until when they are refused.
    sessions: HashMap<String, i64>,
}

/// The revocations this process knows, kept current.
pub struct Revocations {
    known: std::sync::RwLock<Known>,
    ended: broadcast::Sender<Revocation>,
    keep: Keep,
    bucket: Option<KvBucket>,
    /// The bucket's stream is as this version needs it (see `conform`).
    conformed: tokio::sync::OnceCell<()>,
    /// Where a single process records them (`confab serve`), one JSON object per line.
    file: Option<std::path::PathBuf>,
    /// The watch of the bucket is established (always true without one).
    watching: AtomicBool,
    /// Told to drop the watch and watch again (see [`Revocations::watch_again`]).
    rewatch: tokio::sync::Notify,
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl Revocations {
    /// Revocations in this process's memory only (`confab serve`).
    pub fn in_memory(keep: impl Into<Keep>) -> Arc<Revocations> {
        Arc::new(Revocations::empty(keep.into(), None))
    }

    /// None known yet; watching from the start unless they come from a bucket.
    fn empty(keep: Keep, bucket: Option<KvBucket>) -> Revocations {
        Revocations {
            known: std::sync::RwLock::default(),
            ended: broadcast::channel(1024).0,
            keep,
            watching: AtomicBool::new(bucket.is_none()),
            bucket,
            conformed: tokio::sync::OnceCell::new(),
            file: None,
            rewatch: tokio::sync::Notify::new(),
        }
    }

    /// Revocations of a single process, recorded in `file` and read back from it: those still
    /// to be kept are (the file is rewritten with only them), the rest forgotten.
    pub fn in_file(
        file: std::path::PathBuf,
        keep: impl Into<Keep>,
    ) -> Result<Arc<Revocations>, String> {
        let keep = keep.into();
        let revocations = Revocations::empty(keep, None);
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|error| format!("creating {}: {error}", dir.display()))?;
        }
        let now = now();
        let mut kept = String::new();
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    match serde_json::from_str::<Recorded>(line) {
                        Ok(recorded) if recorded.until(&keep) > now => {
                            revocations.apply(&recorded, false);
                            kept.push_str(line);
                            kept.push('\n');
                        }
                        Ok(_) => {}
                        // A line cut short by a crash mid-write: the rest is still good.
                        Err(error) => tracing::warn!(%error, "unreadable revocation skipped"),
                    }
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(format!("reading {}: {error}", file.display())),
        }
        let compacted = file.with_extension("jsonl.tmp");
        std::fs::write(&compacted, kept)
            .and_then(|()| std::fs::rename(&compacted, &file))
            .map_err(|error| format!("writing {}: {error}", file.display()))?;
        Ok(Arc::new(Revocations {
            file: Some(file),
            ..revocations
        }))
    }

    /// Revocations shared through a key-value bucket on the NATS at `url`; a background task
    /// watches it until `shutdown`.
    pub async fn nats(
        url: &str,
        prefix: &str,
        keep: impl Into<Keep>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Arc<Revocations>, String> {
        let keep = keep.into();
        let bucket = bucket(url, prefix, keep.longest()).await?;
        let revocations = Arc::new(Revocations::empty(keep, Some(bucket)));
        tokio::spawn(watch(Arc::downgrade(&revocations), shutdown));
        Ok(revocations)
    }

    /// Records `revocation` (shared with every process) for as long as a token lives, and ends
    /// what it names here.
    pub async fn revoke(&self, revocation: Revocation) -> Result<(), String> {
        self.revoke_lasting(revocation, Lasting::Tokens).await
    }

    /// Records `revocation` (shared with every process) for as long as `lasting` says, and ends
    /// what it names here.
    pub async fn revoke_lasting(
        &self,
        revocation: Revocation,
        lasting: Lasting,
    ) -> Result<(), String> {
        let Some(key) = revocation.key() else {
            return Err("a revocation names a user or a session".into());
        };
        let keep = self.keep.of(lasting);
        let mut recorded = Recorded {
            until: Some(revocation.before.saturating_add(secs(keep))),
            revocation,
        };
        match &self.bucket {
            None => {
                if let Some(file) = &self.file {
                    append(file, &recorded).await?;
                }
                self.apply(&recorded, true);
            }
            Some(bucket) => {
                let store = self.conformed_store(bucket).await?;
                // One record per key: a later revocation of the same session or user never
                // shortens what an earlier one kept (a back-channel logout, kept for a token's
                // lifetime, after a logout everywhere, kept for the session's). Two at once may
                // both read the older record; the one written last is kept, as before.
                // Not read, the earlier one may be shortened; but a logout the provider posts once
                // must not be lost for it.
                let earlier = match store.get(&key).await {
                    Ok(value) => value,
                    Err(error) => {
                        tracing::warn!(%error, "the revocation before this one not read; written over");
                        None
                    }
                }
                .and_then(|value| serde_json::from_slice::<Recorded>(&value).ok());
                if let Some(earlier) = earlier {
                    recorded.revocation.before =
                        recorded.revocation.before.max(earlier.revocation.before);
                    recorded.until =
                        Some(recorded.until(&self.keep).max(earlier.until(&self.keep)));
                }
                let keep = keep.max(Duration::from_secs(
                    u64::try_from(recorded.until(&self.keep) - now()).unwrap_or(0),
                ));
                let value = serde_json::to_vec(&recorded).map_err(|e| e.to_string())?;
                put_with_ttl(bucket, store, &key, value, keep).await?;
                // Refused here at once; the watch tells this process's streams, and every other
                // process, in a moment.
                self.apply(&recorded, false);
            }
        }
        metrics::counter!("confab_revocations_total").increment(1);
        Ok(())
    }

    /// The bucket, its stream conformed once (see `conform`).
    async fn conformed_store<'a>(&self, bucket: &'a KvBucket) -> Result<&'a kv::Store, String> {
        let store = bucket.store().await?;
        self.conformed
            .get_or_try_init(|| conform(bucket, store, self.keep.longest()))
            .await?;
        Ok(store)
    }

    fn apply(&self, recorded: &Recorded, announce: bool) {
        let revocation = &recorded.revocation;
        let until = recorded.until(&self.keep);
        if let Ok(mut known) = self.known.write() {
            match (&revocation.session, revocation.user) {
                (Some(session), _) => {
                    // Never shortened by a later revocation of the same session.
                    let kept = known.sessions.entry(session.clone()).or_insert(until);
                    *kept = (*kept).max(until);
                }
                (None, Some(user)) => {
                    let ended = known
                        .users
                        .entry(user)
                        .or_insert((revocation.before, until));
                    *ended = (ended.0.max(revocation.before), ended.1.max(until));
                }
                (None, None) => {}
            }
            // Forget what no live token can be affected by any more, each at its own time.
            if known.users.len() + known.sessions.len() > 10_000 {
                let now = now();
                known.users.retain(|_, (_, until)| *until > now);
                known.sessions.retain(|_, until| *until > now);
            }
        }
        if announce {
            let _ = self.ended.send(revocation.clone());
        }
    }

    /// Whether a token of `user` in `session`, issued at `issued_at`, is revoked.
    pub fn is_revoked(&self, user: UserId, session: Option<&str>, issued_at: i64) -> bool {
        let Ok(known) = self.known.read() else {
            return true;
        };
        session.is_some_and(|s| known.sessions.contains_key(s))
            || known
                .users
                .get(&user)
                .is_some_and(|(before, _)| issued_at <= *before)
    }

    /// Revocations as they arrive, for ending streams.
    pub fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.ended.subscribe()
    }

    /// Whether revocations made elsewhere reach this process.
    pub fn check(&self) -> Result<(), String> {
        if self.watching.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err("not watching the revocations bucket".into())
        }
    }

    /// Drops the watch of the bucket and watches it again, as after the connection to NATS was
    /// lost: not ready until it is watched again. Tests use it, since a test cannot take the
    /// connection away from under one process.
    pub fn watch_again(&self) {
        if self.bucket.is_some() {
            self.watching.store(false, Ordering::Release);
            self.rewatch.notify_one();
        }
    }

    /// Deletes the bucket of the deployment at `url` with `prefix` (tests clean up with this).
    pub async fn delete_nats_bucket(url: &str, prefix: &str) -> Result<(), String> {
        bucket(url, prefix, Duration::from_secs(60))
            .await?
            .delete()
            .await
    }
}

/// Appends `revocation` to `file` and waits until it is on disk: a logout is answered only once
/// it would survive a crash.
async fn append(file: &std::path::Path, recorded: &Recorded) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut line = serde_json::to_vec(recorded).map_err(|e| e.to_string())?;
    line.push(b'\n');
    let mut out = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .await
        .map_err(|e| format!("recording a revocation in {}: {e}", file.display()))?;
    out.write_all(&line).await.map_err(|e| e.to_string())?;
    out.sync_data().await.map_err(|e| e.to_string())
}

/// Puts `value` at `key` with a time to live of its own (`Nats-TTL`, whole seconds, at least one).
/// `kv::Store::put` sets none. The bucket is reached without a JetStream domain, so its keys are
/// published under the store's own prefix.
async fn put_with_ttl(
    bucket: &KvBucket,
    store: &kv::Store,
    key: &str,
    value: Vec<u8>,
    ttl: Duration,
) -> Result<(), String> {
    let subject = format!(
        "{}{key}",
        store.put_prefix.as_ref().unwrap_or(&store.prefix)
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_TTL,
        ttl.as_secs().max(1).to_string().as_str(),
    );
    bucket
        .context()
        .publish_with_headers(subject, headers, value.into())
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Brings the bucket's stream to what this version needs: per-message time to live allowed, and an
/// age limit of at least `max_age`. A bucket created by an earlier version has neither; a put with
/// a time to live into it would be refused.
async fn conform(bucket: &KvBucket, store: &kv::Store, max_age: Duration) -> Result<(), String> {
    let stream = bucket
        .context()
        .get_stream(&store.stream_name)
        .await
        .map_err(|e| e.to_string())?;
    let config = &stream.cached_info().config;
    if config.allow_message_ttl && config.max_age >= max_age {
        return Ok(());
    }
    let mut config = config.clone();
    config.allow_message_ttl = true;
    config.max_age = config.max_age.max(max_age);
    bucket
        .context()
        .update_stream(config)
        .await
        .map_err(|e| format!("allowing a time to live per revocation: {e}"))?;
    Ok(())
}

async fn bucket(url: &str, prefix: &str, ttl: Duration) -> Result<KvBucket, String> {
    KvBucket::connect(
        url,
        "confab-revocations",
        kv::Config {
            bucket: format!("{}_revocations", prefix.replace(['.', '-'], "_")),
            description: "confab: ended sessions".into(),
            history: 1,
            max_age: ttl.max(Duration::from_secs(60)),
            ..Default::default()
        },
    )
    .await
}

/// Applies the bucket's records (those already there, then each new one) until `shutdown`,
/// watching again after an error. A watch made again starts after the last revision it applied:
/// the revocations made meanwhile are announced, and not the whole bucket again (every stream of
/// the node checked against each, on every reconnection).
async fn watch(
    revocations: std::sync::Weak<Revocations>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    // The revision after the last record applied, once one was.
    let mut resume_at: Option<u64> = None;
    loop {
        let Some(this) = revocations.upgrade() else {
            return;
        };
        let watched = async {
            let store = this
                .conformed_store(this.bucket.as_ref().ok_or("no bucket")?)
                .await?;
            let mut entries = match resume_at {
                Some(revision) => store
                    .watch_from_revision(">", revision)
                    .await
                    .map_err(|e| e.to_string())?,
                None => {
                    let entries = store
                        .watch_with_history(">")
                        .await
                        .map_err(|e| e.to_string())?;
                    // The watch replays the bucket too, but only as it is read: the process says
                    // it is ready once every revocation already made is applied, so that no
                    // revoked token is accepted in the moments after a start.
                    let mut keys = store.keys().await.map_err(|e| e.to_string())?;
                    while let Some(key) = keys.next().await {
                        let key = key.map_err(|e| e.to_string())?;
                        if let Some(value) = store.get(&key).await.map_err(|e| e.to_string())? {
                            match serde_json::from_slice::<Recorded>(&value) {
                                Ok(recorded) => this.apply(&recorded, true),
                                Err(error) => tracing::warn!(%error, key, "unreadable revocation"),
                            }
                        }
                    }
                    entries
                }
            };
            // Made again, the watch delivers what was missed at once; tokens were checked
            // against what this process knew all along.
            this.watching.store(true, Ordering::Release);
            while let Some(entry) = entries.next().await {
                let entry = entry.map_err(|e| e.to_string())?;
                resume_at = Some(entry.revision + 1);
                if entry.operation != kv::Operation::Put {
                    continue;
                }
                match serde_json::from_slice::<Recorded>(&entry.value) {
                    Ok(recorded) => this.apply(&recorded, true),
                    Err(error) => tracing::warn!(%error, key = entry.key, "unreadable revocation"),
                }
            }
            Err::<(), String>("the watch ended".into())
        };
        let result = tokio::select! {
            () = shutdown.cancelled() => return,
            result = watched => result,
            () = this.rewatch.notified() => Err("told to watch again".into()),
        };
        this.watching.store(false, Ordering::Release);
        if let Err(error) = result {
            tracing::warn!(%error, "revocations not watched; retrying");
        }
        drop(this);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// An [`Identity`] that refuses the tokens of ended sessions.
pub struct RevocationAware {
    pub inner: Arc<dyn Identity>,
    pub revocations: Arc<Revocations>,
}

#[async_trait]
impl Identity for RevocationAware {
    async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let principal = self.inner.authenticate(token).await?;
        if self.revocations.is_revoked(
            principal.user_id,
            principal.session.as_deref(),
            principal.issued_at,
        ) {
            return Err(AuthError::Revoked);
        }
        Ok(principal)
    }

    async fn check(&self) -> Result<(), String> {
        self.inner.check().await?;
        self.revocations.check()
    }

    async fn verify_logout(&self, token: &str) -> Result<Logout, AuthError> {
        self.inner.verify_logout(token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sessions_and_users_are_revoked_and_announced() {
        let revocations = Revocations::in_memory(Duration::from_secs(3600));
        let mut ended = revocations.subscribe();
        let (alice, bob) = (
            UserId::from_subject("i", "alice"),
            UserId::from_subject("i", "bob"),
        );
        let t = now();
        revocations
            .revoke(Revocation {
                user: Some(alice),
                session: Some("s1".into()),
                before: t,
            })
            .await
            .unwrap();
        assert!(revocations.is_revoked(alice, Some("s1"), t - 5));
        assert!(
            revocations.is_revoked(alice, Some("s1"), t + 5),
            "a session ends for good"
        );
        assert!(!revocations.is_revoked(alice, Some("s2"), t - 5));
        assert_eq!(ended.recv().await.unwrap().session.as_deref(), Some("s1"));

        revocations
            .revoke(Revocation {
                user: Some(bob),
                session: None,
                before: t,
            })
            .await
            .unwrap();
        assert!(revocations.is_revoked(bob, Some("any"), t));
        assert!(revocations.is_revoked(bob, None, 0));
        assert!(
            !revocations.is_revoked(bob, None, t + 1),
            "a later login works"
        );
        assert!(!revocations.is_revoked(alice, None, t - 1));
        let announced = ended.recv().await.unwrap();
        assert!(announced.ends(bob, Some("x"), t - 1));
        assert!(!announced.ends(alice, Some("x"), t - 1));
    }

    /// A logout token of a user (no session) ends their tokens issued up to it, not those issued
    /// since: the same token posted again later ends no session signed in after it.
    #[tokio::test]
    async fn a_users_logout_posted_again_ends_no_later_sign_in() {
        let revocations = Revocations::in_memory(Duration::from_secs(3600));
        let alice = UserId::from_subject("i", "alice");
        let logged_out_at = now() - 100;
        let logout = Logout {
            user: Some(alice),
            session: None,
            issued_at: logged_out_at,
        };
        revocations
            .revoke(Revocation::of_logout(&logout))
            .await
            .unwrap();
        assert!(revocations.is_revoked(alice, Some("before"), logged_out_at - 1));
        assert!(
            !revocations.is_revoked(alice, Some("since"), logged_out_at + 50),
            "a sign-in after the logout is ended by the same token posted again"
        );
    }

    /// A logout everywhere keeps its session revoked for the session's lifetime; a back-channel
    /// logout of the same session after it, kept for a token's, does not shorten that.
    #[tokio::test]
    async fn a_later_revocation_of_a_session_does_not_shorten_it() {
        let revocations = Revocations::in_memory(Keep {
            tokens: Duration::from_secs(3600),
            sessions: Duration::from_secs(30 * 86_400),
        });
        let alice = UserId::from_subject("i", "alice");
        let ended_at = now() - 7200;
        let ended = |session: &str| Revocation {
            user: Some(alice),
            session: Some(session.to_owned()),
            before: ended_at,
        };
        revocations
            .revoke_lasting(ended("everywhere"), Lasting::Session)
            .await
            .unwrap();
        revocations
            .revoke_lasting(ended("everywhere"), Lasting::Tokens)
            .await
            .unwrap();
        // Enough others, past their time, that the ones past theirs are forgotten.
        for i in 0..10_001 {
            revocations
                .revoke_lasting(ended(&format!("other {i}")), Lasting::Tokens)
                .await
                .unwrap();
        }
        assert!(!revocations.is_revoked(alice, Some("other 0"), ended_at + 1));
        assert!(
            revocations.is_revoked(alice, Some("everywhere"), ended_at + 1),
            "the session's revocation was cut to a token's lifetime"
        );
    }

    #[tokio::test]
    async fn revocations_in_a_file_outlive_the_process_until_their_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("revocations.jsonl");
        let ttl = Duration::from_secs(3600);
        let (alice, bob) = (
            UserId::from_subject("i", "alice"),
            UserId::from_subject("i", "bob"),
        );
        let t = now();
        let first = Revocations::in_file(file.clone(), ttl).unwrap();
        assert!(!first.is_revoked(alice, None, t));
        for revocation in [
            Revocation {
                user: Some(alice),
                session: None,
                before: t,
            },
            Revocation {
                user: Some(bob),
                session: Some("s1".into()),
                before: t,
            },
            // Older than the time to live: forgotten at the next start.
            Revocation {
                user: Some(bob),
                session: None,
                before: t - 7200,
            },
        ] {
            first.revoke(revocation).await.unwrap();
        }
        drop(first);
        // A crash mid-write leaves half a line.
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str("{\"user\":");
        std::fs::write(&file, text).unwrap();

        let again = Revocations::in_file(file.clone(), ttl).unwrap();
        assert!(
            again.is_revoked(alice, None, t - 1),
            "a logout survives a restart"
        );
        assert!(!again.is_revoked(alice, None, t + 1));
        assert!(again.is_revoked(bob, Some("s1"), t + 1));
        assert!(
            !again.is_revoked(bob, None, t - 7300),
            "an expired one is forgotten"
        );
        let kept = std::fs::read_to_string(&file).unwrap();
        assert_eq!(
            kept.lines().count(),
            2,
            "the file keeps only what is live: {kept}"
        );
    }

    /// Each revocation is kept as long as it lasts: one of a session ended in confab alone (the
    /// provider may renew its tokens) for a session's lifetime, every other one for a token's.
    #[tokio::test]
    async fn each_revocation_is_kept_as_long_as_it_lasts() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("revocations.jsonl");
        let keep = Keep {
            tokens: Duration::from_secs(3600),
            sessions: Duration::from_secs(30 * 24 * 3600),
        };
        let alice = UserId::from_subject("i", "alice");
        let t = now();
        // Two hours ago: past a token's lifetime, within a session's.
        let ended = |session: Option<&str>| Revocation {
            user: Some(alice),
            session: session.map(str::to_owned),
            before: t - 7200,
        };
        let first = Revocations::in_file(file.clone(), keep).unwrap();
        first
            .revoke_lasting(ended(Some("ended-at-the-provider")), Lasting::Tokens)
            .await
            .unwrap();
        first
            .revoke_lasting(ended(Some("ended-in-confab")), Lasting::Session)
            .await
            .unwrap();
        first.revoke(ended(None)).await.unwrap();
        drop(first);
        // A line of an earlier version, which says nothing of how long: kept the longest.
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str(&serde_json::to_string(&ended(Some("of-an-earlier-version"))).unwrap());
        text.push('\n');
        std::fs::write(&file, text).unwrap();

        let again = Revocations::in_file(file.clone(), keep).unwrap();
        assert!(
            !again.is_revoked(alice, Some("ended-at-the-provider"), t),
            "a session the provider ended is forgotten after a token's lifetime"
        );
        assert!(!again.is_revoked(alice, None, t - 7300));
        assert!(
            again.is_revoked(alice, Some("ended-in-confab"), t),
            "a session the provider may renew is kept for a session's lifetime"
        );
        assert!(again.is_revoked(alice, Some("of-an-earlier-version"), t));
        let kept = std::fs::read_to_string(&file).unwrap();
        assert_eq!(kept.lines().count(), 2, "{kept}");
    }
}
