//! Ended sessions: "log out everywhere" and OpenID Connect back-channel logouts. A
//! [`Revocation`] ends one provider session (`sid`: its tokens are refused from now on), or every
//! token of a user issued up to a time. Every process keeps the revocations in memory, checks each
//! authenticated token against them ([`RevocationAware`]) and ends the streams they name (the hub
//! subscribes to [`Revocations::subscribe`]).
//!
//! With NATS they are shared through a JetStream key-value bucket (`<prefix>_revocations`, one key
//! per user or session, kept for the longer of `identity.revocation_ttl_secs` and
//! `identity.session_ttl_secs`: a session a logout everywhere ended may renew its tokens at the
//! provider until the provider's session ends): every process watches it, so a
//! logout received by one API process ends streams on every notifier and is refused everywhere.
//! `confab serve` keeps them in memory and appends each to a file in its data directory
//! (`revocations.jsonl`), read back at start, so a restart does not bring a logged-out session's
//! tokens back.

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
    /// A revocation of what a logout token names.
    pub fn of_logout(logout: &Logout, now: i64) -> Revocation {
        Revocation {
            user: logout.user,
            session: logout.session.clone(),
            before: now,
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Default)]
struct Known {
    /// Every token of the user issued at or before this time is refused.
    users: HashMap<UserId, i64>,
    /// Sessions ended, with when.
    sessions: HashMap<String, i64>,
}

/// The revocations this process knows, kept current.
pub struct Revocations {
    known: std::sync::RwLock<Known>,
    ended: broadcast::Sender<Revocation>,
    ttl: Duration,
    bucket: Option<KvBucket>,
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
    pub fn in_memory(ttl: Duration) -> Arc<Revocations> {
        Arc::new(Revocations::empty(ttl, None))
    }

    /// None known yet; watching from the start unless they come from a bucket.
    fn empty(ttl: Duration, bucket: Option<KvBucket>) -> Revocations {
        Revocations {
            known: std::sync::RwLock::default(),
            ended: broadcast::channel(1024).0,
            ttl,
            watching: AtomicBool::new(bucket.is_none()),
            bucket,
            file: None,
            rewatch: tokio::sync::Notify::new(),
        }
    }

    /// Revocations of a single process, recorded in `file` and read back from it: those still
    /// within `ttl` are kept (the file is rewritten with only them), the rest forgotten.
    pub fn in_file(file: std::path::PathBuf, ttl: Duration) -> Result<Arc<Revocations>, String> {
        let revocations = Revocations::empty(ttl, None);
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|error| format!("creating {}: {error}", dir.display()))?;
        }
        let horizon = now() - i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let mut kept = String::new();
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                for line in text.lines().filter(|l| !l.trim().is_empty()) {
                    match serde_json::from_str::<Revocation>(line) {
                        Ok(revocation) if revocation.before > horizon => {
                            revocations.apply(&revocation, false);
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
        ttl: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Result<Arc<Revocations>, String> {
        let bucket = bucket(url, prefix, ttl).await?;
        let revocations = Arc::new(Revocations::empty(ttl, Some(bucket)));
        tokio::spawn(watch(Arc::downgrade(&revocations), shutdown));
        Ok(revocations)
    }

    /// Records `revocation` (shared with every process) and ends what it names here.
    pub async fn revoke(&self, revocation: Revocation) -> Result<(), String> {
        let Some(key) = revocation.key() else {
            return Err("a revocation names a user or a session".into());
        };
        match &self.bucket {
            None => {
                if let Some(file) = &self.file {
                    append(file, &revocation).await?;
                }
                self.apply(&revocation, true);
            }
            Some(bucket) => {
                let store = bucket.store().await?;
                let value = serde_json::to_vec(&revocation).map_err(|e| e.to_string())?;
                store
                    .put(key, value.into())
                    .await
                    .map_err(|e| e.to_string())?;
                // Refused here at once; the watch tells this process's streams, and every other
                // process, in a moment.
                self.apply(&revocation, false);
            }
        }
        metrics::counter!("confab_revocations_total").increment(1);
        Ok(())
    }

    fn apply(&self, revocation: &Revocation, announce: bool) {
        if let Ok(mut known) = self.known.write() {
            match (&revocation.session, revocation.user) {
                (Some(session), _) => {
                    known.sessions.insert(session.clone(), revocation.before);
                }
                (None, Some(user)) => {
                    let before = known.users.entry(user).or_insert(revocation.before);
                    *before = (*before).max(revocation.before);
                }
                (None, None) => {}
            }
            // Forget what no live token can be affected by any more.
            let horizon = now() - i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX / 2);
            if known.users.len() + known.sessions.len() > 10_000 {
                known.users.retain(|_, before| *before > horizon);
                known.sessions.retain(|_, at| *at > horizon);
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
                .is_some_and(|before| issued_at <= *before)
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
async fn append(file: &std::path::Path, revocation: &Revocation) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let mut line = serde_json::to_vec(revocation).map_err(|e| e.to_string())?;
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
    // A bucket an older version made keeps the age limit it was made with otherwise: a shorter
    // one forgets revocations while the sessions they ended can still renew tokens.
    .map(KvBucket::kept_current)
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
            let store = this.bucket.as_ref().ok_or("no bucket")?.store().await?;
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
                            match serde_json::from_slice::<Revocation>(&value) {
                                Ok(revocation) => this.apply(&revocation, true),
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
                match serde_json::from_slice::<Revocation>(&entry.value) {
                    Ok(revocation) => this.apply(&revocation, true),
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
}
