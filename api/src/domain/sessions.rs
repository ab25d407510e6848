//! Logging out everywhere: `POST /v1/me/logout-all` ends every session of the caller, and the
//! identity provider's back-channel logout (OpenID Connect Back-Channel Logout 1.0) ends the
//! session, or all sessions of the user, its logout token names. Either way the tokens of what
//! ended are refused from then on by every process, and the event streams opened with them end at
//! once (see `runtime::revocation`). Ending all of a user's sessions also removes their push
//! devices: a device keeps receiving previews of messages until its registration is gone, and
//! whoever signs in again registers it again.

use confab_runtime::identity::AuthError;
use confab_runtime::revocation::Revocation;
use confab_schema::UserId;

use super::inputs::LogoutToken;
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

impl ApiState {
    /// Ends every session of `user`: tokens issued up to now are refused, and their push devices
    /// are removed.
    pub async fn logout_all(&self, user: UserId) -> ApiResult<()> {
        self.revoke(Revocation {
            user: Some(user),
            session: None,
            before: now(),
        })
        .await?;
        self.remove_all_devices(user).await
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
        self.revoke(Revocation::of_logout(&logout, now())).await?;
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

    async fn revoke(&self, revocation: Revocation) -> ApiResult<()> {
        let Some(revocations) = &self.revocations else {
            return Err(ApiError::Auth(AuthError::Unavailable(
                "logouts are not enabled on this process".into(),
            )));
        };
        revocations
            .revoke(revocation)
            .await
            .map_err(|why| ApiError::Auth(AuthError::Unavailable(why)))
    }
}
