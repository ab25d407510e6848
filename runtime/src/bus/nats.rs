//! The production event log: a JetStream stream of every chat subject, `<prefix>_events`. Its
//! stream sequence is the event's position. Each notifier node reads it live through one ordered
//! consumer; a resume reads it through a short-lived pull consumer filtered to the user's chats.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use confab_schema::{Envelope, LoggedEvent, subjects};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use time::OffsetDateTime;

use super::{Bus, BusError, ChatFilter, LogSettings, Page, ReadError, check_position};

/// A read filtered to more chats than this reads every chat's events and filters them here: the
/// server's per-subject filters cost more than they save past a few hundred subjects.
const MAX_SUBJECT_FILTERS: usize = 256;
const READ_BATCH: usize = 1024;
/// How long a check waits for a connection under way (at start, or again after a blip) before it
/// answers that the bus is down.
const CONNECTING_WAIT: Duration = Duration::from_secs(2);

fn unavailable(error: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(error.to_string())
}

/// The JetStream event log.
pub struct NatsBus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    prefix: String,
    settings: LogSettings,
    stream: tokio::sync::OnceCell<stream::Stream>,
    /// Whether the client's last connection event was a connect (not a disconnect): a check
    /// waits on it while the connection is being made.
    connected: tokio::sync::watch::Receiver<bool>,
}

impl NatsBus {
    /// Connects to `url`. Returns at once and keeps reconnecting in the background if the server is
    /// down, so a process can start (and report "not ready") before NATS is up. The stream is
    /// created (or its settings updated) on first use; [`NatsBus::ensure_stream`] does it now.
    pub async fn connect(
        url: &str,
        prefix: &str,
        settings: LogSettings,
    ) -> Result<NatsBus, BusError> {
        let (events, connected) = tokio::sync::watch::channel(false);
        let events = std::sync::Arc::new(events);
        let client = async_nats::ConnectOptions::new()
            .name("confab")
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(3))
            .event_callback(move |event| {
                let events = std::sync::Arc::clone(&events);
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            events.send_replace(true);
                        }
                        async_nats::Event::Disconnected => {
                            events.send_replace(false);
                        }
                        _ => {}
                    }
                }
            })
            .connect(url)
            .await
            .map_err(unavailable)?;
        Ok(NatsBus {
            jetstream: jetstream::new(client.clone()),
            client,
            prefix: prefix.to_owned(),
            settings,
            stream: tokio::sync::OnceCell::new(),
            connected,
        })
    }

    /// The stream's name for a subject prefix: dots and dashes become underscores.
    pub fn stream_name(prefix: &str) -> String {
        format!("{}_events", prefix.replace(['.', '-'], "_"))
    }

    /// Creates the stream, or brings an existing one's retention and duplicate window to the
    /// configured values. Idempotent.
    pub async fn ensure_stream(&self) -> Result<(), BusError> {
        self.stream().await.map(|_| ())
    }

    /// Deletes every stream named after this subject prefix: the event log, and the key-value
    /// buckets and queues of push, presence and revocations. For an isolated prefix that no other
    /// prefix extends, as tests and benchmarks make (`confab_bench_<run>`); returns how many it
    /// deleted.
    pub async fn delete_namespace(&self) -> Result<usize, BusError> {
        let base = self.prefix.replace(['.', '-'], "_");
        let (own, bucket) = (format!("{base}_"), format!("KV_{base}_"));
        let names: Vec<String> = self
            .jetstream
            .stream_names()
            .try_collect()
            .await
            .map_err(unavailable)?;
        let mut deleted = 0;
        for name in names
            .iter()
            .filter(|name| name.starts_with(&own) || name.starts_with(&bucket))
        {
            self.jetstream
                .delete_stream(name)
                .await
                .map_err(unavailable)?;
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Deletes the stream and every event in it (tests and benchmarks clean up with this).
    pub async fn delete_stream(&self) -> Result<(), BusError> {
        self.jetstream
            .delete_stream(Self::stream_name(&self.prefix))
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn stream(&self) -> Result<&stream::Stream, BusError> {
        self.stream
            .get_or_try_init(|| async {
                let config = stream::Config {
                    name: Self::stream_name(&self.prefix),
                    subjects: vec![subjects::all_chat_events(&self.prefix)],
                    retention: stream::RetentionPolicy::Limits,
                    storage: stream::StorageType::File,
                    max_age: self.settings.retention,
                    duplicate_window: self.settings.duplicate_window.min(self.settings.retention),
                    ..Default::default()
                };
                self.jetstream
                    .create_or_update_stream(config.clone())
                    .await
                    .map_err(unavailable)?;
                self.jetstream
                    .get_stream(&config.name)
                    .await
                    .map_err(unavailable)
            })
            .await
    }

    fn connected(&self) -> Result<(), BusError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            other => Err(BusError::Unavailable(format!("NATS connection {other}"))),
        }
    }

    async fn bounds(&self) -> Result<(u64, u64), BusError> {
        let state = self
            .stream()
            .await?
            .get_info()
            .await
            .map_err(unavailable)?
            .state;
        let first = if state.messages == 0 {
            state.last_sequence + 1
        } else {
            state.first_sequence
        };
        Ok((first, state.last_sequence))
    }
}

fn decode(seq: u64, subject: &str, payload: &[u8]) -> Option<LoggedEvent> {
    match serde_json::from_slice::<Envelope>(payload) {
        Ok(envelope) => Some(LoggedEvent { seq, envelope }),
        Err(error) => {
            tracing::warn!(%subject, seq, %error, "skipping an undecodable event");
            metrics::counter!("confab_bus_undecodable_total").increment(1);
            None
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, envelope: &Envelope) -> Result<u64, BusError> {
        // The client would otherwise buffer while disconnected and wait for the ack timeout.
        self.connected()?;
        self.stream().await?;
        let payload = serde_json::to_vec(envelope)?;
        let ack = self
            .jetstream
            .send_publish(
                subjects::chat_events(&self.prefix, envelope.chat_id),
                jetstream::message::PublishMessage::build()
                    .payload(payload.into())
                    .message_id(envelope.id.to_string()),
            )
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        Ok(ack.sequence)
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, LoggedEvent>, BusError> {
        // The ordered consumer recreates itself after a gap or a reconnect and resumes after the
        // last sequence it delivered, so the stream has no gap; it ends only on a terminal error.
        // But one that has delivered nothing yet comes back from the start of the stream (the
        // client's recreation asks for every message when it has none), so a node that was quiet
        // through a NATS restart would hand its clients a day of past events as new ones: what
        // is at or below the log's end when the subscription began, or already delivered, is
        // passed over.
        let (_, floor) = self.bounds().await?;
        let consumer = self
            .stream()
            .await?
            .create_consumer(consumer::pull::OrderedConfig {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: floor + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let messages = consumer.messages().await.map_err(unavailable)?;
        let mut delivered = floor;
        Ok(messages
            .take_while(|message| {
                let alive = match message {
                    Ok(_) => true,
                    Err(error) => {
                        tracing::error!(%error, "event subscription failed");
                        false
                    }
                };
                async move { alive }
            })
            .filter_map(move |message| {
                let event = message.ok().and_then(|message| {
                    let seq = message.info().ok()?.stream_sequence;
                    if seq <= delivered {
                        return None;
                    }
                    delivered = seq;
                    decode(seq, message.subject.as_str(), &message.payload)
                });
                std::future::ready(event)
            })
            .boxed())
    }

    async fn last_seq(&self) -> Result<u64, BusError> {
        Ok(self.bounds().await?.1)
    }

    async fn read_page(
        &self,
        after: u64,
        up_to: u64,
        chats: ChatFilter<'_>,
        max: usize,
        max_scan: usize,
    ) -> Result<Page, ReadError> {
        let (first, last) = self.bounds().await?;
        check_position(after, first, last)?;
        let up_to = up_to.min(last);
        let (max, max_scan) = (max.max(1), max_scan.max(1));
        let mut page = Page {
            events: Vec::new(),
            through: up_to.max(after),
            scanned: 0,
        };
        if after >= up_to {
            return Ok(page);
        }
        let filter_subjects = match chats {
            ChatFilter::Only(chats) if chats.is_empty() => return Ok(page),
            ChatFilter::Only(chats) if chats.len() <= MAX_SUBJECT_FILTERS => chats
                .iter()
                .map(|chat| subjects::chat_events(&self.prefix, *chat))
                .collect(),
            _ => Vec::new(),
        };
        let stream = self.stream().await?;
        let consumer: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                filter_subjects,
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let result = async {
            'batches: while page.events.len() < max && page.scanned < max_scan {
                // No more than the page can still take: what is fetched is held until read.
                let wanted = READ_BATCH
                    .min(max - page.events.len())
                    .min(max_scan - page.scanned);
                let mut batch = consumer
                    .fetch()
                    .max_messages(wanted)
                    .messages()
                    .await
                    .map_err(unavailable)?;
                let mut received = 0;
                while let Some(message) = batch.next().await {
                    let message = message.map_err(unavailable)?;
                    received += 1;
                    let seq = message.info().map_err(unavailable)?.stream_sequence;
                    if seq > up_to {
                        page.through = up_to;
                        break 'batches;
                    }
                    page.scanned += 1;
                    if let Some(event) = decode(seq, message.subject.as_str(), &message.payload)
                        && chats.admits(event.envelope.chat_id)
                    {
                        page.events.push(event);
                    }
                    page.through = seq;
                    if seq == up_to {
                        break 'batches;
                    }
                }
                if received == 0 {
                    // Nothing more of these subjects in the log: the range is read.
                    page.through = up_to;
                    break;
                }
            }
            Ok::<(), ReadError>(())
        }
        .await;
        let name = consumer.cached_info().name.clone();
        if let Err(error) = stream.delete_consumer(&name).await {
            // It expires by itself after its inactive threshold.
            tracing::debug!(%error, "replay consumer not deleted");
        }
        result.map(|()| page)
    }

    async fn appended_at(&self, seq: u64) -> Result<Option<OffsetDateTime>, BusError> {
        // The stream's own time of the message: the server stamps it as it stores it.
        match self.stream().await?.get_raw_message(seq).await {
            Ok(message) => Ok(Some(message.time)),
            Err(error) if error.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(unavailable(error)),
        }
    }

    async fn publish_ephemeral(&self, envelope: &Envelope) -> Result<(), BusError> {
        self.connected()?;
        let payload = serde_json::to_vec(envelope)?;
        self.client
            .publish(
                subjects::chat_live(&self.prefix, envelope.chat_id),
                payload.into(),
            )
            .await
            .map_err(unavailable)
    }

    async fn subscribe_ephemeral(&self) -> Result<BoxStream<'static, Envelope>, BusError> {
        let subscriber = self
            .client
            .subscribe(subjects::all_chat_live(&self.prefix))
            .await
            .map_err(unavailable)?;
        // The SUB must reach the server before the subscription counts as active.
        self.client.flush().await.map_err(unavailable)?;
        Ok(subscriber
            .filter_map(|message| async move {
                decode(0, message.subject.as_str(), &message.payload).map(|e| e.envelope)
            })
            .boxed())
    }

    async fn check(&self) -> Result<(), BusError> {
        if self.connected().is_ok() {
            return Ok(());
        }
        // Being connected (the process just started, or NATS blinked): a request that comes
        // then waits a moment rather than being refused at once.
        let mut connected = self.connected.clone();
        match tokio::time::timeout(CONNECTING_WAIT, connected.wait_for(|c| *c)).await {
            Ok(Ok(_)) => Ok(()),
            _ => self.connected(),
        }
    }
}
