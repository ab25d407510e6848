//! The wire model: what the API returns and what events carry. JSON, snake_case, RFC 3339 UTC times.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::attachment::AttachmentRef;
use crate::call::CallSignal;
use crate::ids::{ChatId, SignalId, UserId};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct User {
    pub id: UserId,
    /// To others, a user name that is the user's e-mail address, or contains an `@`, is shown as
    /// `display_name`.
    pub username: String,
    /// To others, a display name that is the user's e-mail address, or contains an `@`, is shown
    /// as `user-` and the first 8 hex digits of `id`.
    pub display_name: String,
    /// Shown to its user only (`null` for others).
    pub email: Option<String>,
}

/// Defines a string-backed enum with its wire name, `FromStr` and `Display`.
macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $wire:tt),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        pub enum $name {
            $(#[serde(rename = $wire)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(&self) -> &'static str {
                match self {
                    $($name::$variant => $wire),+
                }
            }
        }

        impl FromStr for $name {
            type Err = UnknownVariant;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($wire => Ok($name::$variant),)+
                    other => Err(UnknownVariant {
                        kind: stringify!($name),
                        value: other.chars().take(64).collect(),
                    }),
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}
pub(crate) use wire_enum;

/// A stored value that names no known variant (e.g. a row written by a newer version).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("unknown {kind} `{value}`")]
pub struct UnknownVariant {
    pub kind: &'static str,
    pub value: String,
}

wire_enum!(
    /// What a chat is: a conversation of exactly two users, or a named group.
    ChatKind { Direct => "direct", Group => "group" }
);

wire_enum!(
    /// A member's role in a chat.
    MemberRole { Owner => "owner", Admin => "admin", Member => "member" }
);

impl MemberRole {
    /// Owners and admins manage the chat.
    pub fn is_admin(&self) -> bool {
        matches!(self, MemberRole::Owner | MemberRole::Admin)
    }
}

wire_enum!(
    /// What a signal records in a chat's history.
    SignalKind {
        Message => "message",
        Joined => "joined",
        Left => "left",
        Renamed => "renamed",
        Call => "call",
    }
);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Member {
    pub user_id: UserId,
    pub role: MemberRole,
    #[serde(with = "time::serde::rfc3339")]
    pub joined_at: OffsetDateTime,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Chat {
    pub id: ChatId,
    pub kind: ChatKind,
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub created_by: UserId,
    /// The caller's role; absent where the chat is not seen through a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub my_role: Option<MemberRole>,
    #[serde(default)]
    #[schema(value_type = Option<Signal>)]
    pub latest_signal: Option<Box<Signal>>,
    #[serde(default)]
    pub unread_count: u64,
}

/// One entry of a chat's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Signal {
    pub id: SignalId,
    pub chat_id: ChatId,
    pub kind: SignalKind,
    pub author_id: UserId,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    pub nonce: Option<String>,
    pub text: Option<String>,
    pub reply_to: Option<SignalId>,
    /// The attachments a message refers to, with their metadata.
    #[serde(default)]
    pub attachments: Vec<AttachmentRef>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub edited_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub deleted: bool,
    /// Emoji → number of users who reacted with it.
    #[serde(default)]
    pub reactions: BTreeMap<String, i64>,
    /// A `call` signal's call and what happened to it; absent on every other kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<CallSignal>,
}

impl Signal {
    /// What history keeps of a deleted signal: that it was, and no text or attachments.
    pub fn into_tombstone(self) -> Signal {
        Signal {
            deleted: true,
            text: None,
            attachments: Vec::new(),
            ..self
        }
    }
}

/// Truncates a time to whole milliseconds, the precision every store keeps.
pub fn to_millis(t: OffsetDateTime) -> OffsetDateTime {
    let nanos = t.unix_timestamp_nanos();
    let millis = nanos.div_euclid(1_000_000);
    OffsetDateTime::from_unix_timestamp_nanos(millis * 1_000_000).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_through_their_wire_names() {
        for kind in SignalKind::ALL {
            assert_eq!(kind.as_str().parse::<SignalKind>().as_ref(), Ok(kind));
            assert_eq!(
                serde_json::to_value(kind).ok(),
                Some(serde_json::json!(kind.as_str()))
            );
        }
        for role in MemberRole::ALL {
            assert_eq!(role.as_str().parse::<MemberRole>().as_ref(), Ok(role));
        }
        assert!("sticker".parse::<SignalKind>().is_err());
    }

    #[test]
    fn signal_serialises_with_the_documented_fields() {
        let id = SignalId::new();
        let signal = Signal {
            id,
            chat_id: ChatId::new(),
            kind: SignalKind::Message,
            author_id: UserId::from_subject("i", "s"),
            created_at: id.created_at().expect("v7"),
            nonce: Some("n1".into()),
            text: Some("hi".into()),
            reply_to: None,
            attachments: vec![],
            edited_at: None,
            deleted: false,
            reactions: BTreeMap::new(),
            call: None,
        };
        let json = serde_json::to_value(&signal).expect("serialises");
        let mut keys: Vec<&str> = json
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "attachments",
                "author_id",
                "chat_id",
                "created_at",
                "deleted",
                "edited_at",
                "id",
                "kind",
                "nonce",
                "reactions",
                "reply_to",
                "text"
            ]
        );
        let back: Signal = serde_json::from_value(json).expect("deserialises");
        assert_eq!(back, signal);
    }
}
