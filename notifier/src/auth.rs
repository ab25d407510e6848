//! How a streaming client proves who it is: a bearer token (as for the API), or, for browsers whose
//! `EventSource`/`WebSocket` cannot set headers, a short-lived ticket from `POST /v1/events/ticket`
//! passed as `?ticket=`. Tickets are HMAC-signed with the deployment secret, so any instance can
//! check one without shared state.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use confab_runtime::identity::{AuthError, Identity, bearer_token};
use confab_runtime::signed::Signer;
use confab_schema::UserId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[derive(Clone)]
pub struct StreamAuth {
    identity: Arc<dyn Identity>,
    tickets: Signer,
    ticket_ttl: Duration,
}

#[derive(Serialize, Deserialize)]
struct Ticket {
    u: UserId,
    e: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IssuedTicket {
    pub ticket: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

impl StreamAuth {
    pub fn new(identity: Arc<dyn Identity>, secret: &[u8], ticket_ttl: Duration) -> StreamAuth {
        StreamAuth {
            identity,
            tickets: Signer::new(secret, "stream-ticket"),
            ticket_ttl,
        }
    }

    pub fn identity(&self) -> &Arc<dyn Identity> {
        &self.identity
    }

    /// A ticket for the bearer of `headers`.
    pub async fn issue(&self, headers: &HeaderMap) -> Result<IssuedTicket, AuthError> {
        let principal = self.identity.authenticate(bearer_token(headers)?).await?;
        let expires_at = OffsetDateTime::now_utc() + self.ticket_ttl;
        Ok(IssuedTicket {
            ticket: self.tickets.sign(&Ticket {
                u: principal.user_id,
                e: expires_at.unix_timestamp(),
            }),
            expires_at,
        })
    }

    /// The user a stream request is for: from its ticket when it has one, else its bearer token.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        ticket: Option<&str>,
    ) -> Result<UserId, AuthError> {
        match ticket {
            Some(ticket) => {
                let ticket: Ticket = self
                    .tickets
                    .open(ticket)
                    .map_err(|_| AuthError::Invalid("invalid ticket"))?;
                if ticket.e < OffsetDateTime::now_utc().unix_timestamp() {
                    return Err(AuthError::Expired);
                }
                Ok(ticket.u)
            }
            None => Ok(self
                .identity
                .authenticate(bearer_token(headers)?)
                .await?
                .user_id),
        }
    }
}
