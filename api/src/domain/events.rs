//! Publishing the event of every change.
//!
//! Every request that changes something runs in a task of its own (`http::run_changes_to_completion`),
//! so a client that disconnects after its change is stored cannot stop the event from being
//! published. A
//! publish that fails is retried in the background with backoff, and counted; the log drops a copy
//! of an event id it already holds, so a retry that races a slow first attempt publishes once.

use std::time::Duration;

use confab_schema::Envelope;

use crate::outbox::Intent;
use crate::state::ApiState;

/// How long a failed publish is retried: the bus may be down for a while.
const RETRY_ATTEMPTS: u32 = 12;
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LONGEST_RETRY: Duration = Duration::from_secs(30);

impl ApiState {
    /// Appends `envelope` to the event log. The change it describes is stored already, so a failed
    /// publish does not fail the request: it is retried in the background until the bus takes it.
    pub(crate) async fn publish(&self, envelope: Envelope) {
        self.publish_in_order(vec![envelope]).await;
    }

    /// Appends `envelopes` to the event log in their order, as [`ApiState::publish`] appends one:
    /// from the first that fails on, they are retried in the background one after another, so
    /// none overtakes one before it.
    pub(crate) async fn publish_in_order(&self, envelopes: Vec<Envelope>) {
        let mut envelopes = envelopes.into_iter();
        while let Some(envelope) = envelopes.next() {
            let kind = envelope.event.kind().as_str();
            match self.bus.publish(&envelope).await {
                Ok(_) => {
                    metrics::counter!("confab_events_published_total", "type" => kind).increment(1);
                }
                Err(error) => {
                    tracing::warn!(%error, event = kind, chat = %envelope.chat_id, "event not published yet; retrying in the background");
                    let bus = std::sync::Arc::clone(&self.bus);
                    let failed = std::iter::once(envelope).chain(envelopes).collect();
                    tokio::spawn(retry_in_order(bus, failed));
                    return;
                }
            }
        }
    }

    /// Appends `envelope`, recorded in the outbox as `intent` before its change was stored, and
    /// then removes the entry. A failed publish is retried in the background for as long as the
    /// process lives (the entry keeps it for a sweep if the process dies first). Each retry
    /// publishes the change as the store holds it then, as a sweep does, or nothing when it was
    /// undone or superseded since: a late copy of the envelope as it was would route a member
    /// removed since back into the chat, or show an edit's text after the message's deletion.
    pub(crate) async fn publish_intended(&self, envelope: Envelope, intent: Intent) {
        let kind = envelope.event.kind().as_str();
        if self.bus.publish(&envelope).await.is_ok() {
            metrics::counter!("confab_events_published_total", "type" => kind).increment(1);
            self.outbox.settle(&self.store, intent);
            return;
        }
        tracing::warn!(event = kind, chat = %envelope.chat_id, "event not published yet; retrying in the background");
        metrics::counter!("confab_events_publish_retries_total", "type" => kind).increment(1);
        // The retry below settles it: this process's own sweep need not look at it.
        let intent = self.outbox.untrack(intent);
        let state = self.clone();
        tokio::spawn(async move {
            let mut delay = FIRST_RETRY;
            loop {
                tokio::time::sleep(delay).await;
                match state.publish_as_stored(envelope.clone()).await {
                    Ok(published) => {
                        if published {
                            metrics::counter!("confab_events_published_total", "type" => kind)
                                .increment(1);
                        }
                        state.outbox.settle_key(&state.store, intent);
                        return;
                    }
                    Err(error) => {
                        tracing::debug!(%error, event = kind, "event still not published");
                    }
                }
                delay = (delay * 2).min(LONGEST_RETRY);
            }
        });
    }

    /// Removes an outbox entry whose change was not stored (or whose event another request
    /// publishes).
    pub(crate) fn forgo(&self, intent: Intent) {
        self.outbox.settle(&self.store, intent);
    }
}

/// Publishes `envelopes` in their order, the first of which failed once: each is tried until the
/// bus takes it or [`RETRY_ATTEMPTS`] retries are spent, then the next (one given up on is
/// counted, and the next goes all the same).
async fn retry_in_order(
    bus: std::sync::Arc<dyn confab_runtime::bus::Bus>,
    envelopes: Vec<Envelope>,
) {
    for (index, envelope) in envelopes.into_iter().enumerate() {
        let kind = envelope.event.kind().as_str();
        // Each one after the first has not been tried yet.
        if index > 0 && bus.publish(&envelope).await.is_ok() {
            metrics::counter!("confab_events_published_total", "type" => kind).increment(1);
            continue;
        }
        metrics::counter!("confab_events_publish_retries_total", "type" => kind).increment(1);
        let mut delay = FIRST_RETRY;
        let mut published = false;
        for _ in 0..RETRY_ATTEMPTS {
            tokio::time::sleep(delay).await;
            if bus.publish(&envelope).await.is_ok() {
                published = true;
                break;
            }
            delay = (delay * 2).min(LONGEST_RETRY);
        }
        if published {
            metrics::counter!("confab_events_published_total", "type" => kind).increment(1);
        } else {
            metrics::counter!("confab_events_unpublished_total", "type" => kind).increment(1);
            tracing::error!(event = kind, chat = %envelope.chat_id, id = %envelope.id, "event not published: the bus refused every retry");
        }
    }
}
