//! Calls: their record in a chat's history (`call` signals), their state, and the WebRTC signalling
//! relayed between their participants. Media never passes through confab.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::ids::{ChatId, UserId};
use crate::model::{UnknownVariant, wire_enum};

wire_enum!(
    /// What a `call` signal records: a call began (ringing the other members), a participant
    /// joined or left, the call ended, or nobody answered it in time.
    CallState {
        Started => "started",
        Joined => "joined",
        Left => "left",
        Ended => "ended",
        Missed => "missed",
    }
);

wire_enum!(
    /// Where a call is: ringing (only its starter is in it), active (someone answered), ended, or
    /// missed (nobody answered before the ring timeout).
    CallStatus {
        Ringing => "ringing",
        Active => "active",
        Ended => "ended",
        Missed => "missed",
    }
);

impl CallStatus {
    /// Whether participants can still join it and signal to each other.
    pub fn is_live(&self) -> bool {
        matches!(self, CallStatus::Ringing | CallStatus::Active)
    }
}

wire_enum!(
    /// A WebRTC signalling message: an SDP offer or answer, or an ICE candidate.
    CallSignalType { Offer => "offer", Answer => "answer", Ice => "ice" }
);

/// The call a `call` signal is about, and what happened to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallSignal {
    pub call_id: Uuid,
    pub state: CallState,
}

/// A call as the API answers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Call {
    /// UUIDv7.
    pub id: Uuid,
    pub chat_id: ChatId,
    pub started_by: UserId,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    /// Until when it rings: a call still ringing then becomes `missed`.
    #[serde(with = "time::serde::rfc3339")]
    pub ring_until: OffsetDateTime,
    pub status: CallStatus,
    /// Who is in the call now.
    pub participants: Vec<UserId>,
}

/// A signalling message relayed from one participant of a call to another: the `call.signal`
/// event, ephemeral (never stored nor replayed), delivered to `to` only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallRelay {
    pub call_id: Uuid,
    pub chat_id: ChatId,
    pub from: UserId,
    pub to: UserId,
    #[serde(rename = "type")]
    pub kind: CallSignalType,
    /// What the sender's WebRTC stack produced (an SDP description or an ICE candidate), as sent.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

/// Short-lived credentials for the TURN servers, in coturn's shared-secret scheme (the TURN REST
/// API): the user name is `<expiry, unix seconds>:<user id>`, the password
/// base64(HMAC-SHA1(secret, user name)).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TurnCredentials {
    pub username: String,
    pub password: String,
    /// Seconds the credentials stay valid.
    pub ttl: u64,
    pub uris: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_wire_names_round_trip() {
        for state in CallState::ALL {
            assert_eq!(state.as_str().parse::<CallState>().as_ref(), Ok(state));
        }
        for status in CallStatus::ALL {
            assert_eq!(status.as_str().parse::<CallStatus>().as_ref(), Ok(status));
        }
        assert!("sdp".parse::<CallSignalType>().is_err());
        let relay = CallRelay {
            call_id: Uuid::now_v7(),
            chat_id: ChatId::new(),
            from: UserId::from_subject("i", "a"),
            to: UserId::from_subject("i", "b"),
            kind: CallSignalType::Ice,
            payload: serde_json::json!({"candidate": "c"}),
        };
        let json = serde_json::to_value(&relay).expect("serialises");
        assert_eq!(json["type"], "ice");
        assert_eq!(
            serde_json::from_value::<CallRelay>(json).expect("parses"),
            relay
        );
    }
}
