//! The identity provider's sessions each user's tokens were seen in. Logging out everywhere ends
//! each of them by its id (`sid`): a revocation by session also refuses the tokens a device renews
//! in it after the logout, which a revocation by time alone (`iat` up to the logout) lets through,
//! since the provider's session goes on and renewing issues a token with a new `iat`. (The
//! provider's access tokens need not say when the user signed in, `auth_time`, so that cannot
//! tell a renewed token from a new sign-in.)
//!
//! [`SessionRecording`] records the session of every token it verifies before the token is
//! accepted, in a [`SessionLedger`] (the store), once per process and session: the first request
//! of a session in a process costs one write, the next ones a look-up in memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use confab_schema::UserId;

use crate::identity::{AuthError, Identity, Logout, Principal};

/// How long a session is recorded unless configured (`identity.session_ttl_secs`).
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// The sessions remembered as recorded in one process, at most; past it they are forgotten at
/// once (each then costs one more write).
const RECORDED_MAX: usize = 100_000;

/// Where sessions are recorded.
#[async_trait]
pub trait SessionLedger: Send + Sync + 'static {
    /// Records that `user` signed in with `session`, kept until `ttl` from now.
    async fn record(&self, user: UserId, session: &str, ttl: Duration) -> Result<(), String>;
}

/// An [`Identity`] that records the session of each token it accepts before accepting it.
pub struct SessionRecording {
    inner: Arc<dyn Identity>,
    ledger: Arc<dyn SessionLedger>,
    ttl: Duration,
    /// The sessions this process recorded, by user, and when.
    recorded: Mutex<Recorded>,
}

#[derive(Default)]
struct Recorded {
    by_user: HashMap<UserId, HashMap<String, Instant>>,
    count: usize,
}

impl SessionRecording {
    /// Records the sessions of the tokens `inner` accepts in `ledger`, each kept for `ttl`: it
    /// must outlive the longest session at the provider, or a session still renewing after it
    /// escapes a logout.
    pub fn new(
        inner: Arc<dyn Identity>,
        ledger: Arc<dyn SessionLedger>,
        ttl: Duration,
    ) -> SessionRecording {
        SessionRecording {
            inner,
            ledger,
            ttl: ttl.max(Duration::from_secs(60)),
            recorded: Mutex::default(),
        }
    }

    /// Whether this process recorded `session` of `user` recently enough: within half of its time
    /// to live, so that a session used for longer is written again before its record expires.
    fn is_recorded(&self, user: UserId, session: &str) -> bool {
        self.recorded.lock().is_ok_and(|recorded| {
            recorded
                .by_user
                .get(&user)
                .and_then(|sessions| sessions.get(session))
                .is_some_and(|at| at.elapsed() < self.ttl / 2)
        })
    }

    async fn record(&self, user: UserId, session: &str) -> Result<(), AuthError> {
        if self.is_recorded(user, session) {
            return Ok(());
        }
        // A token is refused while its session cannot be recorded: accepted, it could outlive a
        // logout everywhere.
        self.ledger
            .record(user, session, self.ttl)
            .await
            .map_err(|why| AuthError::Unavailable(format!("recording the session: {why}")))?;
        metrics::counter!("confab_sessions_recorded_total").increment(1);
        if let Ok(mut recorded) = self.recorded.lock() {
            if recorded.count >= RECORDED_MAX {
                *recorded = Recorded::default();
            }
            let previous = recorded
                .by_user
                .entry(user)
                .or_default()
                .insert(session.to_owned(), Instant::now());
            if previous.is_none() {
                recorded.count += 1;
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Identity for SessionRecording {
    async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let principal = self.inner.authenticate(token).await?;
        if let Some(session) = &principal.session {
            self.record(principal.user_id, session).await?;
        }
        Ok(principal)
    }

    async fn check(&self) -> Result<(), String> {
        self.inner.check().await
    }

    async fn verify_logout(&self, token: &str) -> Result<Logout, AuthError> {
        self.inner.verify_logout(token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::DevIdentity;

    /// Sessions recorded in memory, with a switch to fail.
    #[derive(Default)]
    struct Ledger {
        writes: Mutex<Vec<(UserId, String)>>,
        down: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl SessionLedger for Ledger {
        async fn record(&self, user: UserId, session: &str, _ttl: Duration) -> Result<(), String> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                return Err("the store is down".into());
            }
            self.writes.lock().unwrap().push((user, session.to_owned()));
            Ok(())
        }
    }

    #[tokio::test]
    async fn each_session_is_recorded_once_before_its_token_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Arc::new(DevIdentity::open(dir.path()).unwrap());
        let ledger = Arc::new(Ledger::default());
        let identity = SessionRecording::new(
            Arc::clone(&dev) as Arc<dyn Identity>,
            Arc::clone(&ledger) as Arc<dyn SessionLedger>,
            DEFAULT_SESSION_TTL,
        );
        let (first, second) = (
            dev.mint("alice", Duration::from_secs(600)),
            dev.mint("alice", Duration::from_secs(600)),
        );
        let alice = identity.authenticate(&first).await.unwrap();
        identity.authenticate(&first).await.unwrap();
        identity.authenticate(&second).await.unwrap();
        let writes = ledger.writes.lock().unwrap().clone();
        let mut expected = Vec::new();
        for token in [&first, &second] {
            let session = dev.authenticate(token).await.unwrap().session.unwrap();
            expected.push((alice.user_id, session));
        }
        assert_eq!(writes, expected, "one write per session");

        // A session that cannot be recorded is not accepted; a recorded one still is.
        ledger.down.store(true, std::sync::atomic::Ordering::SeqCst);
        let third = dev.mint("alice", Duration::from_secs(600));
        assert!(matches!(
            identity.authenticate(&third).await,
            Err(AuthError::Unavailable(_))
        ));
        assert!(identity.authenticate(&first).await.is_ok());
    }
}
