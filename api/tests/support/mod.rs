//! What the api's integration tests share.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use confab_runtime::bus::BusError;
use confab_runtime::push_queue::{
    Cancelled, Claimed, EmbeddedPushQueue, PendingPush, PushMessage, PushQueue,
};
use confab_schema::{ChatId, Signal, SignalId, UserId};

/// A push queue whose first `failures` cancels fail, as one does while NATS restarts.
pub struct FailingCancels {
    pub inner: EmbeddedPushQueue,
    pub failures: AtomicU32,
}

#[async_trait]
impl PushQueue for FailingCancels {
    async fn schedule(
        &self,
        user: UserId,
        chat: ChatId,
        message: &PushMessage,
        due_ms: i64,
        expires_ms: i64,
    ) -> Result<(), BusError> {
        self.inner
            .schedule(user, chat, message, due_ms, expires_ms)
            .await
    }
    async fn cancel(
        &self,
        user: UserId,
        chat: ChatId,
        up_to: SignalId,
        now_ms: i64,
    ) -> Result<Cancelled, BusError> {
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(BusError::Unavailable("the push queue restarts".into()));
        }
        self.inner.cancel(user, chat, up_to, now_ms).await
    }
    async fn message_deleted(
        &self,
        user: UserId,
        chat: ChatId,
        deleted: SignalId,
        now_ms: i64,
    ) -> Result<Cancelled, BusError> {
        self.inner
            .message_deleted(user, chat, deleted, now_ms)
            .await
    }
    async fn drop_pending(&self, user: UserId, chat: ChatId) -> Result<bool, BusError> {
        self.inner.drop_pending(user, chat).await
    }
    async fn drop_previews(&self, user: UserId) -> Result<usize, BusError> {
        self.inner.drop_previews(user).await
    }
    async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Claimed, BusError> {
        self.inner.claim_due(now_ms, limit).await
    }
    async fn sent(&self, push: &PendingPush, now_ms: i64) -> Result<(), BusError> {
        self.inner.sent(push, now_ms).await
    }
}

/// The pushes claimable now, once there are any: a withdrawal is queued in the background.
/// Panics after twenty seconds without one.
pub async fn due_within_the_deadline(queue: &dyn PushQueue) -> Vec<PendingPush> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let due = queue
            .claim_due(confab_runtime::presence::now_ms(), 10)
            .await
            .expect("claims")
            .pushes;
        if !due.is_empty() {
            return due;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing was queued: the notification stays on the devices"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes `queue` remember a push to `user` announcing `message`, as one sent: scheduled, claimed
/// and recorded.
pub async fn sent_a_push(queue: &dyn PushQueue, user: UserId, chat: ChatId, message: &Signal) {
    let now = confab_runtime::presence::now_ms();
    let announcing = PushMessage {
        signal: message.id,
        author: message.author_id,
        author_name: "the author".into(),
        preview: None,
    };
    queue
        .schedule(user, chat, &announcing, now, now + 60_000)
        .await
        .expect("scheduled");
    let claimed = queue.claim_due(now, 10).await.expect("claims").pushes;
    assert_eq!(claimed.len(), 1, "the push is due");
    queue.sent(&claimed[0], now).await.expect("remembered");
}
