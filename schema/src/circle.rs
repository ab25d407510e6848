//! Circles (groups joined with an access code, whose members are paired at random) and matching
//! queues, as clients see them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{ChatId, CircleId, UserId};
use crate::model::{Chat, UnknownVariant};

/// A circle. `access_code` is shown to its owner only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Circle {
    pub id: CircleId,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<String>,
    pub owner_id: UserId,
    /// The code others join with; present for the owner only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_code: Option<String>,
    /// The most members it takes.
    pub max_members: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the circle and everything in it (members, pairings, their chats) is removed.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// A member of a circle, under the name they chose for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CircleMember {
    pub user_id: UserId,
    pub display_name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub joined_at: OffsetDateTime,
}

crate::model::wire_enum!(
    /// Where a user stands in a circle's lobby or a queue.
    PairingState { Waiting => "waiting", Paired => "paired" }
);

/// A user's place in a circle's lobby or a matching queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PairingStatus {
    pub state: PairingState,
    /// Since when they wait, or since when they are paired.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// The chat of the pairing, when paired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_id: Option<ChatId>,
    /// The partner, when paired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partner_id: Option<UserId>,
    /// The queue, for a matching queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<QueueKind>,
}

crate::model::wire_enum!(
    /// A matching queue: `vent` is matched with `listen`, `talk` with `talk`.
    QueueKind { Vent => "vent", Listen => "listen", Talk => "talk" }
);

impl QueueKind {
    /// The queue whose users this one's are matched with.
    pub fn counterpart(&self) -> QueueKind {
        match self {
            QueueKind::Vent => QueueKind::Listen,
            QueueKind::Listen => QueueKind::Vent,
            QueueKind::Talk => QueueKind::Talk,
        }
    }
}

/// A member of a new pairing, with the name they use in the circle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PairedMember {
    pub user_id: UserId,
    pub display_name: String,
}

/// Two members of a circle were paired into a new chat (`circle.paired`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CirclePairing {
    pub circle_id: CircleId,
    pub chat: Chat,
    pub members: Vec<PairedMember>,
}

/// A pairing ended (`circle.unpaired`): its chat takes no more signals from either member.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CircleUnpairing {
    pub circle_id: CircleId,
    pub chat_id: ChatId,
    /// Who ended it; absent when the circle's expiry ended it (its chat is removed with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<UserId>,
}

/// A user matched in a queue (`queue.matched`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueMatchMember {
    pub user_id: UserId,
    pub kind: QueueKind,
}

/// Two users of the matching queues were matched into a new chat (`queue.matched`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueMatch {
    pub chat: Chat,
    pub members: Vec<QueueMatchMember>,
}

/// A queue match ended (`queue.unmatched`): both users left its chat, which is removed with its
/// messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QueueUnmatching {
    pub chat_id: ChatId,
    /// Who ended it: by leaving the queue or joining it again, or by going away (no live
    /// connection for `queues.disconnect_grace_ms`).
    pub by: UserId,
}
