//! Send parity for the CQL store: one signal per (chat, author, nonce), however many requests race.
//!
//! Cassandra and ScyllaDB can only arbitrate a race between writers with a lightweight transaction,
//! which is a Paxos round on every first send. Deciding a winner among concurrent writers needs
//! consensus: with plain writes and reads, a writer whose write is delayed can overtake one that
//! already answered. So the arbitration goes to the system that already runs consensus cheaply on
//! the send path, NATS JetStream: a key-value `create` is a compare-and-set on the stream's leader
//! (Raft-replicated in a cluster), and costs one request to NATS. See `docs/ARCHITECTURE.md`
//! ("Send parity") for the argument.
//!
//! [`SendParity::Lwt`] keeps the lightweight transaction, for deployments of the CQL store without
//! NATS.

use std::time::Duration;

use async_nats::jetstream::kv;
use confab_runtime::kv_bucket::KvBucket;
use confab_schema::{ChatId, Signal, SignalId, UserId};
use sha2::{Digest, Sha256};

use crate::store::StoreError;

/// How the CQL store settles racing sends of one nonce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SendParity {
    /// A JetStream key-value bucket holds one entry per nonce, created with compare-and-set.
    JetStream {
        /// NATS server URL.
        nats_url: String,
        /// Bucket name; one per keyspace.
        bucket: String,
    },
    /// `INSERT … IF NOT EXISTS` on `signal_nonces` (a Paxos round per send).
    Lwt,
}

/// The JetStream side of [`SendParity::JetStream`]. The bucket is opened on first use, so a
/// process can start (and report itself not ready) before NATS is up.
pub(crate) struct NonceBucket {
    bucket: KvBucket,
}

/// The outcome of [`NonceBucket::claim`].
pub(crate) enum Claim {
    /// This caller's signal now owns the nonce.
    Won,
    /// Another signal owns it: the one recorded when it was claimed (a tombstone once deleted).
    Taken(Box<Signal>),
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("nonce bucket: {error}"))
}

impl NonceBucket {
    /// Connects to NATS (in the background while it is down). Entries of the bucket expire after
    /// `ttl`.
    pub(crate) async fn connect(
        nats_url: &str,
        bucket: &str,
        ttl: Duration,
    ) -> Result<NonceBucket, StoreError> {
        let bucket = KvBucket::connect(
            nats_url,
            "confab-send-parity",
            kv::Config {
                bucket: bucket.to_owned(),
                description: "confab send parity: one entry per (chat, author, nonce)".into(),
                history: 1,
                max_age: ttl,
                ..Default::default()
            },
        )
        .await
        .map_err(unavailable)?;
        Ok(NonceBucket { bucket })
    }

    /// Connects and opens the bucket now, creating it if it does not exist (`confab migrate`).
    pub(crate) async fn open(
        nats_url: &str,
        bucket: &str,
        ttl: Duration,
    ) -> Result<NonceBucket, StoreError> {
        let opened = Self::connect(nats_url, bucket, ttl).await?;
        opened.kv().await?;
        Ok(opened)
    }

    /// The bucket, opened (or created, idempotently) on first use.
    async fn kv(&self) -> Result<&kv::Store, StoreError> {
        self.bucket.store().await.map_err(unavailable)
    }

    /// The key of a nonce: a hash, since nonces are arbitrary client strings and keys are subject
    /// tokens.
    fn key(chat: ChatId, author: UserId, nonce: &str) -> String {
        let mut hash = Sha256::new();
        hash.update(chat.0.as_bytes());
        hash.update(author.0.as_bytes());
        hash.update(nonce.as_bytes());
        hash.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Claims `signal`'s nonce for it, or returns the signal that holds it.
    pub(crate) async fn claim(&self, signal: &Signal, nonce: &str) -> Result<Claim, StoreError> {
        let key = Self::key(signal.chat_id, signal.author_id, nonce);
        let value = serde_json::to_vec(signal).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let kv = self.kv().await?;
        match kv.create(&key, value.into()).await {
            Ok(_) => Ok(Claim::Won),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => {
                let stored = kv.get(&key).await.map_err(unavailable)?;
                let Some(stored) = stored else {
                    // Expired between the two calls: the nonce is free again.
                    return Box::pin(self.claim(signal, nonce)).await;
                };
                let holder: Signal = serde_json::from_slice(&stored)
                    .map_err(|e| StoreError::Corrupt(format!("nonce entry: {e}")))?;
                Ok(Claim::Taken(Box::new(holder)))
            }
            Err(error) => Err(unavailable(error)),
        }
    }

    /// The id of the signal that holds the nonce, if any.
    pub(crate) async fn holder(
        &self,
        chat: ChatId,
        author: UserId,
        nonce: &str,
    ) -> Result<Option<SignalId>, StoreError> {
        let key = Self::key(chat, author, nonce);
        let Some(stored) = self.kv().await?.get(&key).await.map_err(unavailable)? else {
            return Ok(None);
        };
        let holder: Signal = serde_json::from_slice(&stored)
            .map_err(|e| StoreError::Corrupt(format!("nonce entry: {e}")))?;
        Ok(Some(holder.id))
    }

    /// Replaces the record of a deleted signal's nonce by its tombstone, so no deleted text stays
    /// in the bucket. A nonce that has already expired is left absent, and one sent again since
    /// (the record of another signal) is left as it is.
    pub(crate) async fn scrub(&self, tombstone: &Signal, nonce: &str) -> Result<(), StoreError> {
        let key = Self::key(tombstone.chat_id, tombstone.author_id, nonce);
        let kv = self.kv().await?;
        let Some(entry) = kv.entry(&key).await.map_err(unavailable)? else {
            return Ok(());
        };
        if entry.operation != kv::Operation::Put {
            return Ok(());
        }
        // The nonce may have expired and been sent again since: that record is the later
        // message's, which a retry of it must still find.
        let holder: Signal = serde_json::from_slice(&entry.value)
            .map_err(|e| StoreError::Corrupt(format!("nonce entry: {e}")))?;
        if holder.id != tombstone.id {
            return Ok(());
        }
        let value =
            serde_json::to_vec(tombstone).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        match kv.update(&key, value.into(), entry.revision).await {
            Ok(_) => Ok(()),
            // Changed meanwhile (only another scrub writes here): that one has scrubbed it.
            Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(()),
            Err(error) => Err(unavailable(error)),
        }
    }
}

/// Deletes a bucket (tests drop theirs with their keyspace). A missing bucket is not an error.
pub(crate) async fn delete_bucket(nats_url: &str, bucket: &str) -> Result<(), StoreError> {
    KvBucket::connect(
        nats_url,
        "confab-send-parity",
        kv::Config {
            bucket: bucket.to_owned(),
            ..Default::default()
        },
    )
    .await
    .map_err(unavailable)?
    .delete()
    .await
    .map_err(unavailable)
}
