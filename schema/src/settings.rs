//! What a user chose: for themselves (push delay, previews, image loading) and per chat (mute,
//! push delay). Defaults apply to whatever was never set.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// The longest push delay a user or chat may choose (one day), in milliseconds.
pub const MAX_PUSH_DELAY_MS: u32 = 86_400_000;

/// A user's own settings. Clients read them to decide what to fetch; the push scheduler reads the
/// push fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserSettings {
    /// How long a message waits unfetched before this user's devices get a push, in ms; `null`
    /// for the server's default. A chat's own delay overrides it.
    #[serde(default)]
    pub push_delay_ms: Option<u32>,
    /// Whether pushes carry a preview of the message text (the sender's name is always there).
    #[serde(default = "yes")]
    pub push_previews: bool,
    /// Whether clients load images in chats without being asked.
    #[serde(default = "yes")]
    pub auto_load_images: bool,
    /// Whether clients show small low-quality previews first (metered connections).
    #[serde(default)]
    pub low_quality_previews: bool,
}

fn yes() -> bool {
    true
}

impl Default for UserSettings {
    fn default() -> Self {
        UserSettings {
            push_delay_ms: None,
            push_previews: true,
            auto_load_images: true,
            low_quality_previews: false,
        }
    }
}

/// A member's settings for one chat.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChatSettings {
    /// Muted for good: no pushes from this chat.
    #[serde(default)]
    pub muted: bool,
    /// Muted until then (RFC 3339), when not muted for good.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub muted_until: Option<OffsetDateTime>,
    /// This chat's push delay in ms, overriding the user's and the server's; `null` for theirs.
    #[serde(default)]
    pub push_delay_ms: Option<u32>,
}

impl ChatSettings {
    /// Whether pushes from the chat are held back at `now`.
    pub fn muted_at(&self, now: OffsetDateTime) -> bool {
        self.muted || self.muted_until.is_some_and(|until| until > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_take_their_defaults() {
        let user: UserSettings = serde_json::from_str("{}").unwrap();
        assert_eq!(user, UserSettings::default());
        let chat: ChatSettings = serde_json::from_str("{}").unwrap();
        assert_eq!(chat, ChatSettings::default());
    }

    #[test]
    fn a_mute_until_a_past_time_is_over() {
        let now = OffsetDateTime::now_utc();
        let until = |offset| ChatSettings {
            muted_until: Some(now + offset),
            ..ChatSettings::default()
        };
        assert!(until(time::Duration::hours(1)).muted_at(now));
        assert!(!until(-time::Duration::hours(1)).muted_at(now));
        assert!(
            ChatSettings {
                muted: true,
                ..ChatSettings::default()
            }
            .muted_at(now)
        );
    }
}
