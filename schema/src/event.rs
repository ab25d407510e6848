//! The event envelope published on the bus and delivered to clients.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::ids::{ChatId, UserId};
use crate::model::Signal;

/// What happened. Serialised as `{"type": "<kind>", "data": {...}}`; `type` is also the SSE event
/// name and the WebSocket frame's `event` field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum Event {
    #[serde(rename = "signal.created")]
    SignalCreated(Signal),
}

/// The kind of an [`Event`], for metrics and routing without looking at the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    SignalCreated,
}

impl EventKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::SignalCreated => "signal.created",
        }
    }
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::SignalCreated(_) => EventKind::SignalCreated,
        }
    }
}

/// An event with its routing: which chat it belongs to and which users receive it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per event; the SSE `id:` line.
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub chat_id: ChatId,
    /// Users this event is delivered to (the chat's members when it happened).
    pub recipients: Vec<UserId>,
    #[serde(flatten)]
    pub event: Event,
}

impl Envelope {
    pub fn new(chat_id: ChatId, recipients: Vec<UserId>, event: Event) -> Envelope {
        Envelope {
            id: Uuid::now_v7(),
            at: OffsetDateTime::now_utc(),
            chat_id,
            recipients,
            event,
        }
    }

    /// The event's `type` and `data` as the JSON a client receives.
    pub fn client_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.event).unwrap_or(serde_json::Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ids::SignalId;
    use crate::model::SignalKind;

    #[test]
    fn envelope_round_trips_with_type_and_data() {
        let id = SignalId::new();
        let chat = ChatId::new();
        let user = UserId::from_subject("i", "s");
        let envelope = Envelope::new(
            chat,
            vec![user],
            Event::SignalCreated(Signal {
                id,
                chat_id: chat,
                kind: SignalKind::Message,
                author_id: user,
                created_at: id.created_at().expect("v7"),
                nonce: None,
                text: Some("hi".into()),
                reply_to: None,
                attachments: vec![],
                edited_at: None,
                deleted: false,
                reactions: BTreeMap::new(),
            }),
        );
        let json = serde_json::to_value(&envelope).expect("serialises");
        assert_eq!(json["type"], "signal.created");
        assert_eq!(json["data"]["text"], "hi");
        let back: Envelope = serde_json::from_value(json).expect("deserialises");
        assert_eq!(back, envelope);
        assert_eq!(envelope.client_json()["type"], "signal.created");
    }
}
