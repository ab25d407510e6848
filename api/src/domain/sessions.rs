//! Logging out everywhere: `POST /v1/me/logout-all` ends every session of the caller, and the
//! identity provider's back-channel logout (OpenID Connect Back-Channel Logout 1.0) ends the
//! session, or all sessions of the user, its logout token names. Either way the tokens of what
//! ended are refused from then on by every process, and the event streams opened with them end at
//! once (see `runtime::revocation`). Ending all of a user's sessions also removes their push
//! devices: a device keeps receiving previews of messages until its registration is gone, and
//! whoever signs in again registers it again.
//!
//! `logout-all` does not end the sessions at the provider (confab has no say there), so a device
//! can go on renewing its token in its session. Refusing the tokens issued up to the logout is
//! not enough, then: each session recorded for the user (every process records the session of a
//! token before accepting it, `runtime::sessions`) is ended by its id too, which refuses its
//! renewed tokens as well.

use confab_runtime::identity::{AuthError, Principal};
use confab_runtime::revocation::{Lasting, Revocation};
use confab_schema::UserId;
use futures::StreamExt;

use super::inputs::LogoutToken;
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;

/// How many sessions a logout everywhere revokes at once.
const REVOKED_AT_ONCE: usize = 16;

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The session a caller's token belongs to, which a logout ends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallerSession {
    /// The provider's session (`sid`), when the token names one.
    pub id: Option<String>,
    /// When the token was issued (`iat`, Unix seconds).
    pub issued_at: i64,
}

impl CallerSession {
    pub fn of(principal: &Principal) -> CallerSession {
        CallerSession {
            id: principal.session.clone(),
            issued_at: principal.issued_at,
        }
    }
}

impl ApiState {
    /// Ends every session of `user`: tokens issued up to now are refused, every session recorded
    /// for them is ended (with the tokens renewed in it later), and their push devices are
    /// removed.
    ///
    /// The devices are removed whatever happens to the sessions: a lost phone must stop getting
    /// previews, and the caller's own token is refused by then, so trying again would take a new
    /// sign-in. A failure of either is answered (the first one) once both were tried.
    pub async fn logout_all(&self, user: UserId) -> ApiResult<()> {
        let ended = self.end_sessions(user, now()).await;
        let removed = self.remove_all_devices(user).await;
        ended.and(removed)
    }

    /// Refuses the tokens of `user` issued up to `at`, and ends each session recorded for them.
    ///
    /// The user-wide revocation comes first, so that the tokens issued up to now are refused even
    /// if reading the sessions fails. A session first recorded while this runs may be missed by
    /// the read; the token that recorded it was issued before the logout (refused by the
    /// user-wide revocation) unless it was renewed after it, in a session confab had not seen
    /// before: that is the window `docs/SECURITY.md` describes. The sessions ended are forgotten,
    /// so that the next logout does not end them again.
    async fn end_sessions(&self, user: UserId, at: i64) -> ApiResult<()> {
        // Every token of the user issued later is issued after it: a token's lifetime will do.
        self.revoke(
            Revocation {
                user: Some(user),
                session: None,
                before: at,
            },
            Lasting::Tokens,
        )
        .await?;
        let sessions = self.store.sessions_of(user).await?;
        // A few at a time: a user who signed in very often has many.
        let outcomes: Vec<(String, ApiResult<()>)> = futures::stream::iter(sessions)
            .map(|session| async move {
                // The provider's session goes on, and may renew its tokens until it ends there.
                let ended = Revocation {
                    user: Some(user),
                    session: Some(session.clone()),
                    before: at,
                };
                let revoked = self.revoke(ended, Lasting::Session).await;
                (session, revoked)
            })
            .buffer_unordered(REVOKED_AT_ONCE)
            .collect()
            .await;
        let mut ended = Vec::with_capacity(outcomes.len());
        let mut failure = None;
        for (session, revoked) in outcomes {
            match revoked {
                Ok(()) => ended.push(session),
                Err(error) => {
                    failure.get_or_insert(error);
                }
            }
        }
        self.store.forget_sessions(user, &ended).await?;
        failure.map_or(Ok(()), Err)
    }

    /// Whether the session of a caller's token has ended since it was verified (a logout that
    /// raced the request).
    pub(crate) fn has_ended(&self, user: UserId, session: &CallerSession) -> bool {
        self.revocations.as_ref().is_some_and(|revocations| {
            revocations.is_revoked(user, session.id.as_deref(), session.issued_at)
        })
    }

    /// Ends what a back-channel logout token names, once it is verified (signature, issuer,
    /// audience, age, the logout event, no nonce). A token that does not verify is a 400, as the
    /// specification asks.
    pub async fn backchannel_logout(&self, token: &LogoutToken) -> ApiResult<()> {
        let logout = match self.identity.verify_logout(token.as_str()).await {
            Ok(logout) => logout,
            Err(AuthError::Unavailable(why)) => return Err(AuthError::Unavailable(why).into()),
            Err(error) => {
                return Err(ApiError::BadRequest(format!(
                    "the logout token is not valid: {error}"
                )));
            }
        };
        tracing::info!(user = ?logout.user, session = logout.session.is_some(), "back-channel logout");
        // The provider ended what it names: nothing renews in it, a token's lifetime will do.
        self.revoke(Revocation::of_logout(&logout), Lasting::Tokens)
            .await?;
        // A device is not tied to a session: only the end of all of them takes the user's devices.
        match (logout.user, &logout.session) {
            (Some(user), None) => self.remove_all_devices(user).await,
            _ => Ok(()),
        }
    }

    /// Removes every push device of `user`. Called after the revocation, which stands whatever
    /// happens here (a store outage must not keep a lost phone's session alive); a failure is
    /// answered as one, so the logout is not reported done while devices still get pushes.
    async fn remove_all_devices(&self, user: UserId) -> ApiResult<()> {
        for device in self.store.devices_of(user).await? {
            self.store.delete_device(user, device.id).await?;
        }
        Ok(())
    }

    async fn revoke(&self, revocation: Revocation, lasting: Lasting) -> ApiResult<()> {
        let Some(revocations) = &self.revocations else {
            return Err(ApiError::Auth(AuthError::Unavailable(
                "logouts are not enabled on this process".into(),
            )));
        };
        revocations
            .revoke_lasting(revocation, lasting)
            .await
            .map_err(|why| ApiError::Auth(AuthError::Unavailable(why)))
    }
}
