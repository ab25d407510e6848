//! Who is online: each notifier node heartbeats the users it holds live connections for into one
//! record per user, and a user is online while some node's heartbeat is fresh. A node that crashes
//! stops heartbeating, so its users go offline within [`PRESENCE_TTL`] without anyone cleaning up.
//! The record also keeps the user's last-seen time and their custom status.
//!
//! Each node also records itself alive every [`HEARTBEAT_EVERY`]. A node silent for longer than
//! [`PRESENCE_TTL`] is claimed by one live node ([`Presence::claim_silent_nodes`]), which takes it
//! out of its users' records and tells their chats of those now offline: nobody else would, since
//! the crashed node never saw its connections close.
//!
//! [`NatsPresence`] keeps the records in a JetStream key-value bucket (`<prefix>_presence`), updated
//! with compare-and-set so nodes never overwrite each other; [`EmbeddedPresence`] keeps them in
//! memory, for `confab serve` (one process is the only node).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::kv;
use async_trait::async_trait;
use confab_schema::UserId;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::bus::BusError;
use crate::kv_bucket::{ENTRY_ATTEMPTS, EntryTurns, KvBucket, lost_a_race};

/// How often a node renews the presence of the users connected to it.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(15);
/// A heartbeat older than this no longer counts: a crashed node's users are offline after it.
pub const PRESENCE_TTL: Duration = Duration::from_secs(45);

/// What a user shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PresenceState {
    Online,
    Away,
    Offline,
}

/// A user's custom status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomStatus {
    pub text: Option<String>,
    pub away: bool,
    /// When it stops applying (Unix ms); never when absent.
    pub expires_at_ms: Option<i64>,
}

/// One user's presence record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRecord {
    /// Node id → its last heartbeat for this user (Unix ms).
    #[serde(default)]
    pub nodes: BTreeMap<String, i64>,
    /// The last time the user was seen connected (Unix ms).
    #[serde(default)]
    pub last_seen_ms: Option<i64>,
    #[serde(default)]
    pub status: Option<CustomStatus>,
}

pub fn now_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

fn ttl_ms() -> i64 {
    i64::try_from(PRESENCE_TTL.as_millis()).unwrap_or(i64::MAX)
}

impl PresenceRecord {
    pub fn online(&self, now_ms: i64) -> bool {
        self.nodes.values().any(|at| now_ms - at < ttl_ms())
    }

    /// The custom status, unless it has expired.
    pub fn active_status(&self, now_ms: i64) -> Option<&CustomStatus> {
        self.status
            .as_ref()
            .filter(|s| s.expires_at_ms.is_none_or(|at| at > now_ms))
    }

    pub fn state(&self, now_ms: i64) -> PresenceState {
        if !self.online(now_ms) {
            PresenceState::Offline
        } else if self.active_status(now_ms).is_some_and(|s| s.away) {
            PresenceState::Away
        } else {
            PresenceState::Online
        }
    }

    /// `node` holds a live connection of the user now.
    pub fn heartbeat(&mut self, node: &str, now_ms: i64) {
        self.nodes.insert(node.to_owned(), now_ms);
        self.last_seen_ms = Some(now_ms);
        self.nodes.retain(|_, at| now_ms - *at < ttl_ms());
    }

    /// `node` holds no connection of the user any more.
    pub fn gone(&mut self, node: &str, now_ms: i64) {
        if self.nodes.remove(node).is_some() {
            self.last_seen_ms = Some(now_ms);
        }
        self.nodes.retain(|_, at| now_ms - *at < ttl_ms());
    }
}

/// A change to a presence record.
pub type Change = Box<dyn Fn(&mut PresenceRecord) + Send + Sync>;

#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Applies `change` to `user`'s record atomically; answers the record before and after.
    async fn update(
        &self,
        user: UserId,
        change: Change,
    ) -> Result<(PresenceRecord, PresenceRecord), BusError>;
    async fn get(&self, user: UserId) -> Result<PresenceRecord, BusError>;
    /// Records `node` alive at `now_ms`.
    async fn node_alive(&self, node: &str, now_ms: i64) -> Result<(), BusError>;
    /// The nodes silent for longer than [`PRESENCE_TTL`] at `now_ms`, claimed for `by`: a silent
    /// node is answered to one claimant only (again after [`CLAIM_LAPSES`], should that claimant
    /// die before it forgets the node).
    async fn claim_silent_nodes(&self, by: &str, now_ms: i64) -> Result<Vec<String>, BusError>;
    /// The users whose records name `node`. Reads every record: only a silent node is looked up.
    async fn users_on(&self, node: &str) -> Result<Vec<UserId>, BusError>;
    /// Forgets a node (a swept one, or one shutting down).
    async fn forget_node(&self, node: &str) -> Result<(), BusError>;
}

/// A claim on a silent node lapses after this, so that another node sweeps it if its claimant died.
pub const CLAIM_LAPSES: Duration = Duration::from_secs(600);

/// A node's own record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Its last heartbeat (Unix ms).
    pub seen_ms: i64,
    /// The node sweeping it, and since when (Unix ms).
    #[serde(default)]
    pub claimed: Option<(String, i64)>,
}

impl NodeRecord {
    /// Silent at `now_ms`, and not claimed by a sweeper that may still be at work.
    fn claimable(&self, now_ms: i64) -> bool {
        let lapse = i64::try_from(CLAIM_LAPSES.as_millis()).unwrap_or(i64::MAX);
        now_ms - self.seen_ms >= ttl_ms()
            && self
                .claimed
                .as_ref()
                .is_none_or(|(_, since)| now_ms - since >= lapse)
    }
}

/// Presence in memory: one process is the only node.
#[derive(Default)]
pub struct EmbeddedPresence {
    records: Mutex<HashMap<UserId, PresenceRecord>>,
    nodes: Mutex<HashMap<String, NodeRecord>>,
}

fn poisoned<T>(_: T) -> BusError {
    BusError::Unavailable("presence poisoned".into())
}

#[async_trait]
impl Presence for EmbeddedPresence {
    async fn update(
        &self,
        user: UserId,
        change: Change,
    ) -> Result<(PresenceRecord, PresenceRecord), BusError> {
        let mut records = self
            .records
            .lock()
            .map_err(|_| BusError::Unavailable("presence poisoned".into()))?;
        let record = records.entry(user).or_default();
        let before = record.clone();
        change(record);
        Ok((before, record.clone()))
    }

    async fn get(&self, user: UserId) -> Result<PresenceRecord, BusError> {
        let records = self
            .records
            .lock()
            .map_err(|_| BusError::Unavailable("presence poisoned".into()))?;
        Ok(records.get(&user).cloned().unwrap_or_default())
    }

    async fn node_alive(&self, node: &str, now_ms: i64) -> Result<(), BusError> {
        self.nodes.lock().map_err(poisoned)?.insert(
            node.to_owned(),
            NodeRecord {
                seen_ms: now_ms,
                claimed: None,
            },
        );
        Ok(())
    }

    async fn claim_silent_nodes(&self, by: &str, now_ms: i64) -> Result<Vec<String>, BusError> {
        let mut nodes = self.nodes.lock().map_err(poisoned)?;
        let mut claimed = Vec::new();
        for (node, record) in nodes.iter_mut() {
            if node != by && record.claimable(now_ms) {
                record.claimed = Some((by.to_owned(), now_ms));
                claimed.push(node.clone());
            }
        }
        Ok(claimed)
    }

    async fn users_on(&self, node: &str) -> Result<Vec<UserId>, BusError> {
        let records = self.records.lock().map_err(poisoned)?;
        Ok(records
            .iter()
            .filter(|(_, record)| record.nodes.contains_key(node))
            .map(|(user, _)| *user)
            .collect())
    }

    async fn forget_node(&self, node: &str) -> Result<(), BusError> {
        self.nodes.lock().map_err(poisoned)?.remove(node);
        Ok(())
    }
}

fn unavailable(error: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("presence: {error}"))
}

/// Presence in a JetStream key-value bucket, one key per user, and the nodes' own records in a
/// second bucket (`<prefix>_presence_nodes`), one key per node.
pub struct NatsPresence {
    bucket: KvBucket,
    nodes: KvBucket,
    /// This node's updates of one user's record take turns.
    entry_turns: EntryTurns,
}

impl NatsPresence {
    /// Connects (in the background while NATS is down); the bucket is created on first use.
    pub async fn connect(url: &str, prefix: &str) -> Result<NatsPresence, BusError> {
        let bucket = KvBucket::connect(
            url,
            "confab-presence",
            kv::Config {
                bucket: format!("{}_presence", prefix.replace(['.', '-'], "_")),
                description: "confab presence: one record per user".into(),
                history: 1,
                ..Default::default()
            },
        )
        .await
        .map_err(unavailable)?;
        let nodes = KvBucket::connect(
            url,
            "confab-presence-nodes",
            kv::Config {
                bucket: format!("{}_presence_nodes", prefix.replace(['.', '-'], "_")),
                description: "confab presence: one record per notifier node".into(),
                history: 1,
                ..Default::default()
            },
        )
        .await
        .map_err(unavailable)?;
        Ok(NatsPresence {
            bucket,
            nodes,
            entry_turns: EntryTurns::default(),
        })
    }

    /// Deletes the buckets (tests clean up with this).
    pub async fn delete_bucket(&self) -> Result<(), BusError> {
        self.nodes.delete().await.map_err(unavailable)?;
        self.bucket.delete().await.map_err(unavailable)
    }

    async fn kv(&self) -> Result<&kv::Store, BusError> {
        self.bucket.store().await.map_err(unavailable)
    }
}

/// Every key of a bucket.
async fn all_keys(kv: &kv::Store) -> Result<Vec<String>, BusError> {
    kv.keys()
        .await
        .map_err(unavailable)?
        .try_collect()
        .await
        .map_err(unavailable)
}

fn decode(bytes: &[u8]) -> PresenceRecord {
    serde_json::from_slice(bytes).unwrap_or_default()
}

#[async_trait]
impl Presence for NatsPresence {
    async fn update(
        &self,
        user: UserId,
        change: Change,
    ) -> Result<(PresenceRecord, PresenceRecord), BusError> {
        let kv = self.kv().await?;
        let key = user.to_string();
        // Compare-and-set: another node's concurrent update makes this one read again; this
        // node's own updates of the user (many connections at once) take turns.
        let _turn = self.entry_turns.turn(&key).await;
        for attempt in 0..ENTRY_ATTEMPTS {
            if attempt > 0 {
                lost_a_race(attempt).await;
            }
            let entry = kv.entry(&key).await.map_err(unavailable)?;
            let (before, revision) = match &entry {
                Some(entry) if entry.operation == kv::Operation::Put => {
                    (decode(&entry.value), Some(entry.revision))
                }
                Some(entry) => (PresenceRecord::default(), Some(entry.revision)),
                None => (PresenceRecord::default(), None),
            };
            let mut after = before.clone();
            change(&mut after);
            let value: bytes::Bytes = serde_json::to_vec(&after)?.into();
            let written = match revision {
                Some(revision) => kv.update(&key, value, revision).await.map(|_| ()).is_ok(),
                None => kv.create(&key, value).await.map(|_| ()).is_ok(),
            };
            if written {
                return Ok((before, after));
            }
        }
        Err(BusError::Unavailable(
            "presence: too many concurrent updates".into(),
        ))
    }

    async fn get(&self, user: UserId) -> Result<PresenceRecord, BusError> {
        let kv = self.kv().await?;
        Ok(kv
            .get(user.to_string())
            .await
            .map_err(unavailable)?
            .map(|bytes| decode(&bytes))
            .unwrap_or_default())
    }

    async fn node_alive(&self, node: &str, now_ms: i64) -> Result<(), BusError> {
        let nodes = self.nodes.store().await.map_err(unavailable)?;
        let record = NodeRecord {
            seen_ms: now_ms,
            claimed: None,
        };
        nodes
            .put(node, serde_json::to_vec(&record)?.into())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn claim_silent_nodes(&self, by: &str, now_ms: i64) -> Result<Vec<String>, BusError> {
        let nodes = self.nodes.store().await.map_err(unavailable)?;
        let keys = all_keys(nodes).await?;
        let mut claimed = Vec::new();
        for node in keys {
            if node == by {
                continue;
            }
            let Some(entry) = nodes.entry(&node).await.map_err(unavailable)? else {
                continue;
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            let Ok(mut record) = serde_json::from_slice::<NodeRecord>(&entry.value) else {
                continue;
            };
            if !record.claimable(now_ms) {
                continue;
            }
            record.claimed = Some((by.to_owned(), now_ms));
            // Compare-and-set: of racing sweepers, one claims the node.
            if nodes
                .update(&node, serde_json::to_vec(&record)?.into(), entry.revision)
                .await
                .is_ok()
            {
                claimed.push(node);
            }
        }
        Ok(claimed)
    }

    async fn users_on(&self, node: &str) -> Result<Vec<UserId>, BusError> {
        let kv = self.kv().await?;
        let keys = all_keys(kv).await?;
        let found: Vec<Option<UserId>> = futures::stream::iter(keys)
            .map(|key| async move {
                let user = key.parse().ok()?;
                let bytes = kv.get(&key).await.ok()??;
                decode(&bytes).nodes.contains_key(node).then_some(user)
            })
            .buffer_unordered(32)
            .collect()
            .await;
        Ok(found.into_iter().flatten().collect())
    }

    async fn forget_node(&self, node: &str) -> Result<(), BusError> {
        let nodes = self.nodes.store().await.map_err(unavailable)?;
        nodes.purge(node).await.map_err(unavailable)?;
        Ok(())
    }
}

impl PresenceRecord {
    /// How `user` appears to others now.
    pub fn view(&self, user: UserId, now_ms: i64) -> confab_schema::event::UserPresence {
        let state = match self.state(now_ms) {
            PresenceState::Online => "online",
            PresenceState::Away => "away",
            PresenceState::Offline => "offline",
        };
        confab_schema::event::UserPresence {
            user_id: user,
            state: state.into(),
            last_seen_at: self.last_seen_ms.and_then(|ms| {
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                    .ok()?
                    .format(&time::format_description::well_known::Rfc3339)
                    .ok()
            }),
            status_text: self
                .active_status(now_ms)
                .and_then(|status| status.text.clone()),
            status_expires_at: self
                .active_status(now_ms)
                .and_then(|status| status.expires_at_ms)
                .and_then(|ms| {
                    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                        .ok()?
                        .format(&time::format_description::well_known::Rfc3339)
                        .ok()
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_online_while_a_node_heartbeats() {
        let mut record = PresenceRecord::default();
        assert_eq!(record.state(0), PresenceState::Offline);
        record.heartbeat("a", 1_000);
        record.heartbeat("b", 2_000);
        assert_eq!(record.state(2_000), PresenceState::Online);
        record.gone("a", 3_000);
        assert!(record.online(3_000), "node b still holds a connection");
        // Node b crashed: its heartbeat ages out.
        assert!(!record.online(2_000 + ttl_ms()));
        assert_eq!(record.last_seen_ms, Some(3_000));
        record.status = Some(CustomStatus {
            text: Some("lunch".into()),
            away: true,
            expires_at_ms: Some(10_000),
        });
        record.heartbeat("b", 4_000);
        assert_eq!(record.state(5_000), PresenceState::Away);
        assert_eq!(
            record.state(11_000),
            PresenceState::Online,
            "status expired"
        );
    }
}
