//! A JetStream key-value bucket that is opened (or created, idempotently) on first use, so a
//! process can start, and report itself not ready, before NATS is up. Send parity, presence and the
//! push queue each keep their records in one.

use std::time::Duration;

use async_nats::jetstream::{self, kv};

/// One bucket on one NATS connection.
pub struct KvBucket {
    context: jetstream::Context,
    config: kv::Config,
    store: tokio::sync::OnceCell<kv::Store>,
}

impl KvBucket {
    /// Connects to `url` as `client_name` (in the background while the server is down). `config`
    /// is what the bucket is created with when it does not exist: its name, description, history
    /// and age limit; storage is always file.
    pub async fn connect(
        url: &str,
        client_name: &str,
        config: kv::Config,
    ) -> Result<KvBucket, String> {
        let client = async_nats::ConnectOptions::new()
            .name(client_name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(3))
            .connect(url)
            .await
            .map_err(|e| e.to_string())?;
        Ok(KvBucket::on(jetstream::new(client), config))
    }

    /// A bucket reached through `context` (a connection shared with other buckets or streams).
    pub fn on(context: jetstream::Context, config: kv::Config) -> KvBucket {
        KvBucket {
            context,
            config: kv::Config {
                storage: jetstream::stream::StorageType::File,
                ..config
            },
            store: tokio::sync::OnceCell::new(),
        }
    }

    /// The bucket, opened or created on first use.
    pub async fn store(&self) -> Result<&kv::Store, String> {
        self.store
            .get_or_try_init(|| async {
                match self.context.get_key_value(&self.config.bucket).await {
                    Ok(store) => Ok(store),
                    Err(_) => self
                        .context
                        .create_key_value(self.config.clone())
                        .await
                        .map_err(|e| e.to_string()),
                }
            })
            .await
    }

    /// The JetStream context the bucket is reached through (to change its stream).
    pub fn context(&self) -> &jetstream::Context {
        &self.context
    }

    /// Deletes the bucket and its records; a bucket that does not exist is not an error.
    pub async fn delete(&self) -> Result<(), String> {
        match self.context.delete_key_value(&self.config.bucket).await {
            Ok(_) => Ok(()),
            Err(error) if error.to_string().contains("not found") => Ok(()),
            Err(error) => Err(error.to_string()),
        }
    }
}

/// Turns at the entries of a bucket, for one process: its compare-and-set writes of one key wait
/// for each other instead of racing. A burst of writes to one entry (messages into one chat for a
/// recipient's pending push, connections of one user for their presence) would otherwise lose to
/// each other again and again. Writes from other processes are still settled by the revision
/// check, with [`lost_a_race`] between attempts. The keys are spread over a fixed number of
/// locks by hash, so memory stays bounded whatever the number of keys.
pub struct EntryTurns {
    locks: Box<[tokio::sync::Mutex<()>]>,
}

/// How many locks [`EntryTurns`] spreads the keys over.
const ENTRY_LOCKS: usize = 1024;

/// How many times a compare-and-set write of one entry is tried against other processes' writes.
pub const ENTRY_ATTEMPTS: u32 = 16;

impl Default for EntryTurns {
    fn default() -> Self {
        EntryTurns {
            locks: (0..ENTRY_LOCKS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }
}

impl EntryTurns {
    /// This process's turn at `key`, held until the guard drops.
    pub async fn turn(&self, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        self.locks[Self::lock_of(key)].lock().await
    }

    /// Whether two keys take their turns at the same lock, so that one waits while the other's
    /// turn is held. Tests use it to find such keys.
    pub fn share_a_lock(a: &str, b: &str) -> bool {
        Self::lock_of(a) == Self::lock_of(b)
    }

    fn lock_of(key: &str) -> usize {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(key);
        usize::try_from(hash % ENTRY_LOCKS as u64).unwrap_or(0)
    }
}

/// A pause after losing a compare-and-set to another process (`attempt` counts from 1), random so
/// that the two do not meet again: up to 1 ms, doubling with each attempt up to 32 ms.
pub async fn lost_a_race(attempt: u32) {
    let most = 1_000u64 << attempt.min(5);
    tokio::time::sleep(Duration::from_micros(rand::random_range(0..most))).await;
}
