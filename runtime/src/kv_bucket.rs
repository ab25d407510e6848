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

    /// Deletes the bucket and its records; a bucket that does not exist is not an error.
    pub async fn delete(&self) -> Result<(), String> {
        match self.context.delete_key_value(&self.config.bucket).await {
            Ok(_) => Ok(()),
            Err(error) if error.to_string().contains("not found") => Ok(()),
            Err(error) => Err(error.to_string()),
        }
    }
}
