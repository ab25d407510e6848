//! Publishing the event of every change.

use confab_schema::{ChatId, Envelope, Event, UserId};

use crate::error::ApiResult;
use crate::state::ApiState;

impl ApiState {
    /// Publishes `event` on `chat` to `recipients`. Stored is stored: a failed publish is logged and
    /// counted, and history still has the change.
    pub(crate) async fn publish(&self, chat: ChatId, recipients: Vec<UserId>, event: Event) {
        let kind = event.kind().as_str();
        let envelope = Envelope::new(chat, recipients, event);
        match self.bus.publish(&envelope).await {
            Ok(()) => {
                metrics::counter!("confab_events_published_total", "type" => kind).increment(1)
            }
            Err(error) => {
                tracing::warn!(%error, event = kind, %chat, "event not published");
                metrics::counter!("confab_events_unpublished_total", "type" => kind).increment(1);
            }
        }
    }

    /// Publishes `event` to every current member of `chat`.
    pub(crate) async fn publish_to_members(&self, chat: ChatId, event: Event) -> ApiResult<()> {
        let recipients = self
            .store
            .members(chat)
            .await?
            .into_iter()
            .map(|m| m.user_id)
            .collect();
        self.publish(chat, recipients, event).await;
        Ok(())
    }
}
