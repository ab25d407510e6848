//! The push queue on JetStream. Entries live in a key-value bucket (`<prefix>_push`, key
//! `<user>.<chat>`), pushes sent lately in another (`<prefix>_push_sent`, aged out after
//! [`SENT_MEMORY_MS`]). Finding the due ones without scanning every entry: each entry, when
//! created, puts one ticket (its key) on a work-queue stream (`<prefix>_push_due`) read by one
//! durable consumer that every notifier node shares. A node that takes a ticket before the entry
//! is due hands it back with a delay until then (a NAK with delay), so a ticket costs one delivery
//! per due time, not one per poll.
//!
//! Invariant: while an entry exists, a ticket for it is on the stream or in a node's hands. A
//! ticket is acknowledged only once its entry is gone or claimed (compare-and-delete by one node),
//! so a node that dies holding one lets it be redelivered after the ack wait, and a ticket whose
//! entry was cancelled is dropped. Two tickets for one entry (created again after a cancel) are
//! harmless: the first claims it, the second finds nothing.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind, kv};
use async_trait::async_trait;
use confab_schema::{ChatId, SignalId, UserId};
use futures::{StreamExt, TryStreamExt};

use super::{
    Cancelled, PendingPush, PushKind, PushMessage, PushQueue, SENT_MEMORY_MS, SentPush, key,
    unavailable,
};
use crate::bus::BusError;
use crate::kv_bucket::KvBucket;

/// Tickets looked at concurrently by one claim.
const TICKETS_IN_FLIGHT: usize = 32;

/// How long a node may hold a ticket before it is handed to another.
const ACK_WAIT: Duration = Duration::from_secs(30);

pub struct NatsPushQueue {
    context: jetstream::Context,
    pending: KvBucket,
    sent: KvBucket,
    /// Stream name, its one subject, and the consumer, opened on first use.
    tickets: String,
    ticket_subject: String,
    consumer: tokio::sync::OnceCell<PullConsumer>,
}

impl NatsPushQueue {
    pub async fn connect(url: &str, prefix: &str) -> Result<NatsPushQueue, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name("confab-push")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(3))
            .connect(url)
            .await
            .map_err(unavailable)?;
        let context = jetstream::new(client);
        let name = prefix.replace(['.', '-'], "_");
        let pending = KvBucket::on(
            context.clone(),
            kv::Config {
                bucket: format!("{name}_push"),
                description: "confab pending pushes: one per (user, chat)".into(),
                history: 1,
                ..Default::default()
            },
        );
        let sent = KvBucket::on(
            context.clone(),
            kv::Config {
                bucket: format!("{name}_push_sent"),
                description: "confab pushes sent lately, for their withdrawal".into(),
                history: 1,
                max_age: Duration::from_millis(SENT_MEMORY_MS.unsigned_abs()),
                ..Default::default()
            },
        );
        Ok(NatsPushQueue {
            context,
            pending,
            sent,
            tickets: format!("{name}_push_due"),
            ticket_subject: format!("{prefix}.push.due"),
            consumer: tokio::sync::OnceCell::new(),
        })
    }

    /// Deletes the buckets and the ticket stream (tests clean up with this).
    pub async fn delete_bucket(&self) -> Result<(), BusError> {
        self.pending.delete().await.map_err(unavailable)?;
        self.sent.delete().await.map_err(unavailable)?;
        match self.context.delete_stream(&self.tickets).await {
            Ok(_) => Ok(()),
            Err(error) if error.to_string().contains("not found") => Ok(()),
            Err(error) => Err(unavailable(error)),
        }
    }

    async fn kv(&self) -> Result<&kv::Store, BusError> {
        self.pending.store().await.map_err(unavailable)
    }

    async fn consumer(&self) -> Result<&PullConsumer, BusError> {
        self.consumer
            .get_or_try_init(|| async {
                let stream = self
                    .context
                    .get_or_create_stream(jetstream::stream::Config {
                        name: self.tickets.clone(),
                        description: Some("confab push tickets: one per pending push".into()),
                        subjects: vec![self.ticket_subject.clone()],
                        retention: RetentionPolicy::WorkQueue,
                        storage: StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map_err(unavailable)?;
                stream
                    .get_or_create_consumer(
                        "senders",
                        pull::Config {
                            durable_name: Some("senders".into()),
                            ack_policy: AckPolicy::Explicit,
                            ack_wait: ACK_WAIT,
                            max_ack_pending: 100_000,
                            ..Default::default()
                        },
                    )
                    .await
                    .map_err(unavailable)
            })
            .await
    }

    async fn pending(
        &self,
        kv: &kv::Store,
        key: &str,
    ) -> Result<Option<(PendingPush, u64)>, BusError> {
        let Some(entry) = kv.entry(key).await.map_err(unavailable)? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        Ok(serde_json::from_slice(&entry.value)
            .ok()
            .map(|push| (push, entry.revision)))
    }

    /// What `key`'s ticket finds at `now_ms`: the push, claimed, when it is due (then the ticket is
    /// done); nothing and the ticket handed back until the due time when it is not; nothing and
    /// the ticket done when the entry is gone.
    async fn claim_ticket(
        &self,
        kv: &kv::Store,
        key: &str,
        now_ms: i64,
    ) -> Result<(Option<PendingPush>, AckKind), BusError> {
        for _ in 0..16 {
            let Some((push, revision)) = self.pending(kv, key).await? else {
                return Ok((None, AckKind::Ack));
            };
            if push.due_ms > now_ms {
                let wait = u64::try_from(push.due_ms - now_ms).unwrap_or(0);
                return Ok((None, AckKind::Nak(Some(Duration::from_millis(wait)))));
            }
            // Compare-and-delete: the node whose delete lands sends it.
            if kv.delete_expect_revision(key, Some(revision)).await.is_ok() {
                return Ok((Some(push), AckKind::Ack));
            }
        }
        // Changing all the time: look again shortly.
        Ok((None, AckKind::Nak(Some(Duration::from_millis(100)))))
    }

    /// Puts `key`'s ticket on the stream, the entry just created at `revision`. When that fails
    /// the entry is taken back, so no entry is left without a ticket.
    async fn ticket(&self, kv: &kv::Store, key: &str, revision: u64) -> Result<(), BusError> {
        self.consumer().await?;
        let published = async {
            self.context
                .publish(self.ticket_subject.clone(), key.to_owned().into())
                .await
                .map_err(unavailable)?
                .await
                .map_err(unavailable)
        }
        .await;
        if let Err(error) = published {
            let _ = kv.delete_expect_revision(key, Some(revision)).await;
            return Err(error);
        }
        Ok(())
    }
}

#[async_trait]
impl PushQueue for NatsPushQueue {
    async fn schedule(
        &self,
        user: UserId,
        chat: ChatId,
        message: &PushMessage,
        due_ms: i64,
        expires_ms: i64,
    ) -> Result<(), BusError> {
        let kv = self.kv().await?;
        let key = key(user, chat);
        for _ in 0..16 {
            let (pending, revision) = match self.pending(kv, &key).await? {
                Some((push, revision)) => (Some(push), Some(revision)),
                None => (None, None),
            };
            let push = PendingPush::joined(pending, user, chat, message, due_ms, expires_ms);
            let value: bytes::Bytes = serde_json::to_vec(&push)?.into();
            match revision {
                // The entry's ticket is out already; it finds the entry as it is when it comes.
                Some(revision) => {
                    if kv.update(&key, value, revision).await.is_ok() {
                        return Ok(());
                    }
                }
                None => {
                    if let Ok(revision) = kv.create(&key, value).await {
                        return self.ticket(kv, &key, revision).await;
                    }
                }
            }
        }
        Err(unavailable("too many concurrent updates"))
    }

    async fn cancel(
        &self,
        user: UserId,
        chat: ChatId,
        up_to: SignalId,
        now_ms: i64,
    ) -> Result<Cancelled, BusError> {
        let kv = self.kv().await?;
        let key = key(user, chat);
        let mut outcome = Cancelled::Nothing;
        let mut settled = false;
        for _ in 0..16 {
            match self.pending(kv, &key).await? {
                Some((push, revision))
                    if push.kind == PushKind::Messages && push.newest <= up_to =>
                {
                    if kv
                        .delete_expect_revision(&key, Some(revision))
                        .await
                        .is_ok()
                    {
                        outcome = Cancelled::Pending;
                        settled = true;
                        break;
                    }
                    // Changed meanwhile: look again.
                }
                // Newer than what was read, or a withdrawal on its way: nothing to do.
                Some(_) => return Ok(outcome),
                None => {
                    settled = true;
                    break;
                }
            }
        }
        if !settled {
            return Err(unavailable("too many concurrent updates"));
        }
        // Nothing pending any more: a sent push that was read is withdrawn.
        let sent = self.sent.store().await.map_err(unavailable)?;
        let Some(entry) = sent.entry(&key).await.map_err(unavailable)? else {
            return Ok(outcome);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(outcome);
        }
        let Ok(record) = serde_json::from_slice::<SentPush>(&entry.value) else {
            return Ok(outcome);
        };
        if record.newest > up_to {
            return Ok(outcome);
        }
        // Whoever deletes the record queues the withdrawal; a concurrent cancel does not.
        if sent
            .delete_expect_revision(&key, Some(entry.revision))
            .await
            .is_err()
            || record.forget_ms <= now_ms
        {
            return Ok(outcome);
        }
        let withdrawal = PendingPush::withdrawal(user, chat, &record, now_ms);
        let value: bytes::Bytes = serde_json::to_vec(&withdrawal)?.into();
        // A push created meanwhile replaces the notification anyway: then none is needed.
        if let Ok(revision) = kv.create(&key, value).await {
            self.ticket(kv, &key, revision).await?;
            outcome = Cancelled::Withdrawn;
        }
        Ok(outcome)
    }

    async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Vec<PendingPush>, BusError> {
        let kv = self.kv().await?;
        let consumer = self.consumer().await?;
        let mut tickets = consumer
            .fetch()
            .max_messages(limit)
            .messages()
            .await
            .map_err(unavailable)?;
        let mut batch = Vec::with_capacity(limit);
        while let Some(ticket) = tickets.next().await {
            batch.push(ticket.map_err(unavailable)?);
        }
        // Tickets are looked at concurrently: each costs a read, a delete and an ack.
        let claimed: Vec<Option<PendingPush>> = futures::stream::iter(batch)
            .map(|ticket: jetstream::Message| async move {
                let key = String::from_utf8_lossy(&ticket.payload).into_owned();
                let (claimed, answer) = self.claim_ticket(kv, &key, now_ms).await?;
                if let Err(error) = ticket.ack_with(answer).await {
                    // Unanswered, the ticket comes back after the ack wait: late, never lost.
                    tracing::warn!(%error, "push ticket not answered");
                }
                Ok::<_, BusError>(claimed)
            })
            .buffer_unordered(TICKETS_IN_FLIGHT)
            .try_collect()
            .await?;
        Ok(claimed.into_iter().flatten().collect())
    }

    async fn sent(&self, push: &PendingPush, now_ms: i64) -> Result<(), BusError> {
        let Some(record) = SentPush::of(push, now_ms) else {
            return Ok(());
        };
        let sent = self.sent.store().await.map_err(unavailable)?;
        sent.put(
            key(push.user, push.chat),
            serde_json::to_vec(&record)?.into(),
        )
        .await
        .map_err(unavailable)?;
        Ok(())
    }
}
