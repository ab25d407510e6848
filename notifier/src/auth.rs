//! How a streaming client proves who it is: a bearer token (as for the API), or, for browsers whose
//! `EventSource`/`WebSocket` cannot set headers, a short-lived ticket from `POST /v1/events/ticket`
//! passed as `?ticket=`. Tickets are HMAC-signed with the deployment secret, so any instance can
//! check one without shared state.
//!
//! A ticket opens a stream within its short lifetime. A browser's `EventSource` reconnects by itself
//! with the URL it was given, so a *reconnect* (a request that resumes with a last event id) is
//! accepted with that same ticket for as long as the token it was issued from is valid. No stream
//! outlives that token: [`StreamIdentity::expires_at`] is when it ends.

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use confab_runtime::identity::{AuthError, Identity, bearer_token};
use confab_runtime::revocation::Revocations;
use confab_runtime::signed::{Keyring, Signer};
use confab_schema::UserId;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::hub::StreamSession;

#[derive(Clone)]
pub struct StreamAuth {
    identity: Arc<dyn Identity>,
    tickets: Signer,
    ticket_ttl: Duration,
    /// Logouts: a ticket of an ended session is refused like its token.
    revocations: Option<Arc<Revocations>>,
}

#[derive(Serialize, Deserialize)]
struct Ticket {
    /// The user.
    u: UserId,
    /// Opens a new stream until then (Unix seconds).
    e: i64,
    /// The expiry of the token it was issued from: reconnects until then, and no stream beyond.
    #[serde(default)]
    x: i64,
    /// The token's session (`sid`), so a logout also ends what its tickets open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    s: Option<String>,
    /// When the token was issued.
    #[serde(default)]
    i: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IssuedTicket {
    pub ticket: String,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// Who a stream is for, and until when.
#[derive(Clone, Debug)]
pub struct StreamIdentity {
    pub user: UserId,
    /// The bearer token, when the client sent one (a ticket carries none).
    pub token: Option<String>,
    /// When the stream must end (Unix seconds).
    pub expires_at: i64,
    /// The session the stream belongs to, which a logout ends.
    pub session: StreamSession,
}

impl StreamIdentity {
    /// The time left before the stream must end.
    pub fn remaining(&self) -> Duration {
        let left = self.expires_at - OffsetDateTime::now_utc().unix_timestamp();
        Duration::from_secs(u64::try_from(left).unwrap_or(0))
    }
}

impl StreamAuth {
    pub fn new(identity: Arc<dyn Identity>, keyring: &Keyring, ticket_ttl: Duration) -> StreamAuth {
        StreamAuth {
            identity,
            tickets: Signer::new(keyring, "stream-ticket", ticket_ttl),
            ticket_ttl,
            revocations: None,
        }
    }

    /// Refuses the tickets of sessions that logged out.
    pub fn with_revocations(mut self, revocations: Arc<Revocations>) -> StreamAuth {
        self.revocations = Some(revocations);
        self
    }

    pub fn identity(&self) -> &Arc<dyn Identity> {
        &self.identity
    }

    /// A ticket for the bearer of `headers`.
    pub async fn issue(&self, headers: &HeaderMap) -> Result<IssuedTicket, AuthError> {
        let principal = self.identity.authenticate(bearer_token(headers)?).await?;
        // Never past the token: a stream lives until the later of the two (a reconnect may come
        // after the ticket's own expiry), and no stream outlives its token.
        let ticket_end = OffsetDateTime::now_utc() + self.ticket_ttl;
        let expires_at = OffsetDateTime::from_unix_timestamp(principal.expires_at)
            .map_or(ticket_end, |token_end| ticket_end.min(token_end));
        Ok(IssuedTicket {
            ticket: self.tickets.sign_until(
                &Ticket {
                    u: principal.user_id,
                    e: expires_at.unix_timestamp(),
                    x: principal.expires_at,
                    s: principal.session.clone(),
                    i: principal.issued_at,
                },
                principal.expires_at.max(expires_at.unix_timestamp()),
            ),
            expires_at,
        })
    }

    /// Checks a bearer token: for a socket that refreshes its token.
    pub async fn token(&self, token: &str) -> Result<StreamIdentity, AuthError> {
        let principal = self.identity.authenticate(token).await?;
        Ok(StreamIdentity {
            user: principal.user_id,
            token: Some(token.to_owned()),
            expires_at: principal.expires_at,
            session: StreamSession {
                id: principal.session,
                issued_at: principal.issued_at,
            },
        })
    }

    /// Whether `ticket` opens a stream now (`reconnect`: resumes one, which a ticket allows for
    /// longer): signed here, not expired, and of a session that did not log out. A request
    /// carrying one is a signed-in user's, not an anonymous one.
    pub fn vouches_for(&self, ticket: &str, reconnect: bool) -> bool {
        self.ticket(ticket, reconnect).is_ok()
    }

    /// Who a stream request is for: from its ticket when it has one, else its bearer token.
    /// `reconnect` is true when the request resumes after a last event id.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        ticket: Option<&str>,
        reconnect: bool,
    ) -> Result<StreamIdentity, AuthError> {
        match ticket {
            Some(ticket) => self.ticket(ticket, reconnect),
            None => self.token(bearer_token(headers)?).await,
        }
    }

    /// Who a ticket is for, if it opens a stream now (see [`StreamAuth::authenticate`]).
    fn ticket(&self, ticket: &str, reconnect: bool) -> Result<StreamIdentity, AuthError> {
        let ticket: Ticket = self
            .tickets
            .open(ticket)
            .map_err(|_| AuthError::Invalid("invalid ticket"))?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let valid_until = if reconnect {
            ticket.x.max(ticket.e)
        } else {
            ticket.e
        };
        if valid_until < now {
            return Err(AuthError::Expired);
        }
        if self
            .revocations
            .as_ref()
            .is_some_and(|r| r.is_revoked(ticket.u, ticket.s.as_deref(), ticket.i))
        {
            return Err(AuthError::Revoked);
        }
        Ok(StreamIdentity {
            user: ticket.u,
            token: None,
            expires_at: ticket.x.max(ticket.e),
            session: StreamSession {
                id: ticket.s,
                issued_at: ticket.i,
            },
        })
    }
}
