//! Bus subject names. Every event is published once, on its chat's subject; the envelope names its
//! recipients, and each notifier instance routes it to the recipients connected to it.

use crate::ids::ChatId;

/// The subject events of `chat` are published on.
pub fn chat_events(prefix: &str, chat: ChatId) -> String {
    format!("{prefix}.chat.{chat}")
}

/// The wildcard a notifier subscribes to for all chats' events.
pub fn all_chat_events(prefix: &str) -> String {
    format!("{prefix}.chat.>")
}

/// The subject `chat`'s ephemeral events (typing) travel on: outside the event log.
pub fn chat_live(prefix: &str, chat: ChatId) -> String {
    format!("{prefix}.live.{chat}")
}

/// The wildcard a notifier subscribes to for every chat's ephemeral events.
pub fn all_chat_live(prefix: &str) -> String {
    format!("{prefix}.live.>")
}

/// Whether `prefix` is usable as a subject prefix: dot-separated tokens of `[A-Za-z0-9_-]`.
pub fn is_valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|token| {
            !token.is_empty()
                && token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_nest_under_the_prefix() {
        let chat = ChatId::new();
        assert_eq!(chat_events("confab", chat), format!("confab.chat.{chat}"));
        assert_eq!(all_chat_events("t1.x"), "t1.x.chat.>");
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(is_valid_prefix("confab"));
        assert!(is_valid_prefix("test_1.a-b"));
        assert!(!is_valid_prefix(""));
        assert!(!is_valid_prefix("a..b"));
        assert!(!is_valid_prefix("a.*"));
        assert!(!is_valid_prefix("a b"));
    }
}
