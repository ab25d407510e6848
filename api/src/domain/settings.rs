//! A user's own settings and their settings per chat: read and replaced by their owner only.

use confab_schema::settings::{ChatSettings, MAX_PUSH_DELAY_MS, UserSettings};
use confab_schema::{ChatId, UserId};

use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;

fn delay(raw: Option<u32>) -> ApiResult<Option<u32>> {
    match raw {
        Some(ms) if ms > MAX_PUSH_DELAY_MS => Err(ApiError::Unprocessable(format!(
            "push_delay_ms is at most {MAX_PUSH_DELAY_MS} (one day)"
        ))),
        other => Ok(other),
    }
}

/// Settings a user sent for themselves, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewUserSettings(UserSettings);

impl NewUserSettings {
    pub fn parse(settings: UserSettings) -> ApiResult<NewUserSettings> {
        delay(settings.push_delay_ms)?;
        Ok(NewUserSettings(settings))
    }
}

/// Settings a member sent for a chat, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewChatSettings(ChatSettings);

impl NewChatSettings {
    pub fn parse(settings: ChatSettings) -> ApiResult<NewChatSettings> {
        delay(settings.push_delay_ms)?;
        Ok(NewChatSettings(settings))
    }
}

impl ApiState {
    /// The caller's settings (the defaults until they save some).
    pub async fn settings(&self, caller: UserId) -> ApiResult<UserSettings> {
        Ok(self
            .store
            .user_settings(&[caller])
            .await?
            .pop()
            .map(|(_, settings)| settings)
            .unwrap_or_default())
    }

    /// Replaces the caller's settings.
    pub async fn put_settings(
        &self,
        caller: UserId,
        settings: NewUserSettings,
    ) -> ApiResult<UserSettings> {
        let stored = self.store.put_user_settings(caller, &settings.0).await;
        // Also after an error: a write that timed out may have been applied.
        self.push_settings.forget_user(caller);
        if !settings.0.push_previews {
            self.drop_push_previews(caller).await;
        }
        stored?;
        Ok(settings.0)
    }

    /// The caller's settings for `chat` (members only).
    pub async fn chat_settings(&self, caller: UserId, chat: ChatId) -> ApiResult<ChatSettings> {
        self.require_member(chat, caller).await?;
        Ok(self
            .store
            .chat_settings(chat, caller)
            .await?
            .unwrap_or_default())
    }

    /// Replaces the caller's settings for `chat` (members only).
    pub async fn put_chat_settings(
        &self,
        caller: UserId,
        chat: ChatId,
        settings: NewChatSettings,
    ) -> ApiResult<ChatSettings> {
        self.require_member(chat, caller).await?;
        let stored = self
            .store
            .put_chat_settings(chat, caller, &settings.0)
            .await;
        // Also after an error: a write that timed out may have been applied.
        self.push_settings.forget_chat(chat);
        if settings.0.muted_at(time::OffsetDateTime::now_utc()) {
            self.drop_muted_push(caller, chat).await;
        }
        stored?;
        Ok(settings.0)
    }
}
