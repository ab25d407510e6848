//! The event envelope published on the bus and delivered to clients.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::call::CallRelay;
use crate::circle::{CirclePairing, CircleUnpairing, QueueMatch, QueueUnmatching};
use crate::ids::{ChatId, SignalId, UserId};
use crate::model::{Chat, MemberRole, Signal};

/// A reaction added or removed, with the emoji's count after the change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReactionChange {
    pub signal_id: SignalId,
    pub emoji: String,
    pub user_id: UserId,
    pub count: i64,
}

/// A member's read (or delivery) marker moved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MarkerChange {
    pub user_id: UserId,
    pub up_to: SignalId,
}

/// A member joined, left or changed role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MemberChange {
    pub user_id: UserId,
    pub role: Option<MemberRole>,
}

/// A member is typing in a chat; clients show it for `expires_in_ms` unless renewed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TypingChange {
    pub user_id: UserId,
    pub expires_in_ms: u64,
}

/// A user's presence as others see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserPresence {
    pub user_id: UserId,
    /// `online`, `away` or `offline`.
    pub state: String,
    /// When they were last seen connected (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen_at: Option<String>,
    /// Their custom status text, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_text: Option<String>,
    /// When their custom status ends by itself (RFC 3339), if it does: no event says so then, a
    /// client stops showing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_expires_at: Option<String>,
}

/// What happened. Serialised as `{"type": "<kind>", "data": {...}}`; `type` is also the SSE event
/// name and the WebSocket frame's `event` field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", content = "data")]
pub enum Event {
    #[serde(rename = "signal.created")]
    SignalCreated(Signal),
    /// A message edited. Never one deleted: a deletion is final, and an edit whose event would
    /// reach the log after the deletion's is followed by another `signal.deleted`.
    #[serde(rename = "signal.updated")]
    SignalUpdated(Signal),
    /// A message deleted (a tombstone, without text). Final: no later event shows it again; the
    /// same message's deletion may come more than once.
    #[serde(rename = "signal.deleted")]
    SignalDeleted(Signal),
    #[serde(rename = "reaction.added")]
    ReactionAdded(ReactionChange),
    #[serde(rename = "reaction.removed")]
    ReactionRemoved(ReactionChange),
    #[serde(rename = "read.updated")]
    ReadUpdated(MarkerChange),
    #[serde(rename = "delivered.updated")]
    DeliveredUpdated(MarkerChange),
    #[serde(rename = "member.joined")]
    MemberJoined(MemberChange),
    #[serde(rename = "member.left")]
    MemberLeft(MemberChange),
    #[serde(rename = "member.updated")]
    MemberUpdated(MemberChange),
    #[serde(rename = "chat.updated")]
    ChatUpdated(Box<Chat>),
    /// Ephemeral: never logged nor replayed.
    #[serde(rename = "typing")]
    Typing(TypingChange),
    /// Ephemeral: a member of the chat came online (their first connection on any node).
    #[serde(rename = "user.connected")]
    UserConnected(UserPresence),
    /// Ephemeral: a member of the chat went offline (their last connection closed).
    #[serde(rename = "user.disconnected")]
    UserDisconnected(UserPresence),
    /// Ephemeral: a member's presence or custom status changed.
    #[serde(rename = "presence.updated")]
    PresenceUpdated(UserPresence),
    /// Two members of a circle were paired; published on the new chat, which they join with it.
    #[serde(rename = "circle.paired")]
    CirclePaired(Box<CirclePairing>),
    /// A circle pairing ended; its two members leave its chat with this event.
    #[serde(rename = "circle.unpaired")]
    CircleUnpaired(CircleUnpairing),
    /// Two users of the matching queues were matched; published on the new chat, which they join
    /// with it.
    #[serde(rename = "queue.matched")]
    QueueMatched(Box<QueueMatch>),
    /// A queue match ended; its two users leave its chat with this event, and the chat is removed.
    #[serde(rename = "queue.unmatched")]
    QueueUnmatched(QueueUnmatching),
    /// Ephemeral: WebRTC signalling from another participant of a call, to this user only.
    #[serde(rename = "call.signal")]
    CallSignal(CallRelay),
}

/// The kind of an [`Event`], for metrics and routing without looking at the payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    SignalCreated,
    SignalUpdated,
    SignalDeleted,
    ReactionAdded,
    ReactionRemoved,
    ReadUpdated,
    DeliveredUpdated,
    MemberJoined,
    MemberLeft,
    MemberUpdated,
    ChatUpdated,
    Typing,
    UserConnected,
    UserDisconnected,
    PresenceUpdated,
    CirclePaired,
    CircleUnpaired,
    QueueMatched,
    QueueUnmatched,
    CallSignal,
}

impl EventKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            EventKind::SignalCreated => "signal.created",
            EventKind::SignalUpdated => "signal.updated",
            EventKind::SignalDeleted => "signal.deleted",
            EventKind::ReactionAdded => "reaction.added",
            EventKind::ReactionRemoved => "reaction.removed",
            EventKind::ReadUpdated => "read.updated",
            EventKind::DeliveredUpdated => "delivered.updated",
            EventKind::MemberJoined => "member.joined",
            EventKind::MemberLeft => "member.left",
            EventKind::MemberUpdated => "member.updated",
            EventKind::ChatUpdated => "chat.updated",
            EventKind::Typing => "typing",
            EventKind::UserConnected => "user.connected",
            EventKind::UserDisconnected => "user.disconnected",
            EventKind::PresenceUpdated => "presence.updated",
            EventKind::CirclePaired => "circle.paired",
            EventKind::CircleUnpaired => "circle.unpaired",
            EventKind::QueueMatched => "queue.matched",
            EventKind::QueueUnmatched => "queue.unmatched",
            EventKind::CallSignal => "call.signal",
        }
    }
}

impl Event {
    pub fn kind(&self) -> EventKind {
        match self {
            Event::SignalCreated(_) => EventKind::SignalCreated,
            Event::SignalUpdated(_) => EventKind::SignalUpdated,
            Event::SignalDeleted(_) => EventKind::SignalDeleted,
            Event::ReactionAdded(_) => EventKind::ReactionAdded,
            Event::ReactionRemoved(_) => EventKind::ReactionRemoved,
            Event::ReadUpdated(_) => EventKind::ReadUpdated,
            Event::DeliveredUpdated(_) => EventKind::DeliveredUpdated,
            Event::MemberJoined(_) => EventKind::MemberJoined,
            Event::MemberLeft(_) => EventKind::MemberLeft,
            Event::MemberUpdated(_) => EventKind::MemberUpdated,
            Event::ChatUpdated(_) => EventKind::ChatUpdated,
            Event::Typing(_) => EventKind::Typing,
            Event::UserConnected(_) => EventKind::UserConnected,
            Event::UserDisconnected(_) => EventKind::UserDisconnected,
            Event::PresenceUpdated(_) => EventKind::PresenceUpdated,
            Event::CirclePaired(_) => EventKind::CirclePaired,
            Event::CircleUnpaired(_) => EventKind::CircleUnpaired,
            Event::QueueMatched(_) => EventKind::QueueMatched,
            Event::QueueUnmatched(_) => EventKind::QueueUnmatched,
            Event::CallSignal(_) => EventKind::CallSignal,
        }
    }
}

/// An event with its routing. It names no recipient list: every event is published once on its
/// chat's subject, and each notifier delivers it to the connections interested in that chat. Only
/// membership changes name users: those who start receiving the chat's events with this one
/// (`joined`: at most the initial members of a new chat, or the one member added) and those who stop
/// after it (`left`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per event. The log drops a re-publication of an id it has already stored.
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub chat_id: ChatId,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub joined: Vec<UserId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left: Vec<UserId>,
    #[serde(flatten)]
    pub event: Event,
}

impl Envelope {
    pub fn new(chat_id: ChatId, event: Event) -> Envelope {
        Envelope {
            id: Uuid::now_v7(),
            at: OffsetDateTime::now_utc(),
            chat_id,
            joined: Vec::new(),
            left: Vec::new(),
            event,
        }
    }

    /// The `signal.created` event of `signal`. Its id is the signal's id, so that publishing it
    /// again (a retried send) is recognised as the same event.
    pub fn signal_created(signal: Signal) -> Envelope {
        Envelope {
            id: signal.id.as_uuid(),
            ..Envelope::new(signal.chat_id, Event::SignalCreated(signal))
        }
    }

    /// The deletion of `signal`, which carries its tombstone whatever `signal` holds: deleted text
    /// goes nowhere. Every attempt to delete one signal makes an envelope with the same id, so the
    /// log keeps one of them within its duplicate window.
    pub fn signal_deleted(signal: Signal) -> Envelope {
        Envelope {
            id: Uuid::new_v5(&signal.id.as_uuid(), b"signal.deleted"),
            ..Envelope::new(
                signal.chat_id,
                Event::SignalDeleted(signal.into_tombstone()),
            )
        }
    }

    /// `users` receive this chat's events from this event on.
    pub fn joining(mut self, users: Vec<UserId>) -> Envelope {
        self.joined = users;
        self
    }

    /// `users` receive this event, and none of the chat's events after it.
    pub fn leaving(mut self, users: Vec<UserId>) -> Envelope {
        self.left = users;
        self
    }

    /// The event's `type`, `chat_id` and `data` as the JSON a client receives: the chat, because
    /// a marker, reaction or membership change does not name it in its data.
    pub fn client_json(&self) -> serde_json::Value {
        let mut json = serde_json::to_value(&self.event).unwrap_or(serde_json::Value::Null);
        if let Some(object) = json.as_object_mut() {
            object.insert("chat_id".into(), serde_json::json!(self.chat_id));
        }
        json
    }
}

/// An event as the log stored it: `seq` is its position in the log, increasing by publication
/// order, and the id a client resumes from.
#[derive(Clone, Debug, PartialEq)]
pub struct LoggedEvent {
    pub seq: u64,
    pub envelope: Envelope,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::SignalKind;

    #[test]
    fn envelope_round_trips_with_type_and_data() {
        let id = SignalId::new();
        let chat = ChatId::new();
        let user = UserId::from_subject("i", "s");
        let envelope = Envelope::signal_created(Signal {
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
            call: None,
        })
        .joining(vec![user]);
        let json = serde_json::to_value(&envelope).expect("serialises");
        assert_eq!(json["type"], "signal.created");
        assert_eq!(json["data"]["text"], "hi");
        let back: Envelope = serde_json::from_value(json).expect("deserialises");
        assert_eq!(back, envelope);
        assert_eq!(envelope.client_json()["type"], "signal.created");
        assert_eq!(
            envelope.client_json()["chat_id"],
            serde_json::json!(envelope.chat_id)
        );
        assert_eq!(
            envelope.id,
            id.as_uuid(),
            "a signal's event has the signal's id"
        );
        let bare =
            serde_json::to_value(Envelope::new(chat, envelope.event.clone())).expect("serialises");
        assert!(bare.get("joined").is_none() && bare.get("left").is_none());
    }

    #[test]
    fn every_kind_names_its_wire_type() {
        let user = UserId::from_subject("i", "s");
        let change = MarkerChange {
            user_id: user,
            up_to: SignalId::new(),
        };
        for event in [
            Event::ReadUpdated(change.clone()),
            Event::DeliveredUpdated(change),
        ] {
            let json = serde_json::to_value(&event).expect("serialises");
            assert_eq!(json["type"], event.kind().as_str());
        }
    }
}
