//! The event bus. The API publishes one [`Envelope`] per change on its chat's subject; notifiers
//! subscribe to every chat's subject and route by recipients. [`NatsBus`] is the production
//! implementation; [`EmbeddedBus`] is an in-process broadcast for `confab serve`.

use std::sync::Arc;

use async_trait::async_trait;
use confab_schema::{Envelope, subjects};
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::telemetry::ReadinessCheck;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("event bus unavailable: {0}")]
    Unavailable(String),
    #[error("event could not be encoded: {0}")]
    Encode(#[from] serde_json::Error),
}

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes `envelope` on its chat's subject.
    async fn publish(&self, envelope: &Envelope) -> Result<(), BusError>;
    /// Every envelope published from now on, for all chats. The subscription is active when this
    /// returns.
    async fn subscribe(&self) -> Result<BoxStream<'static, Envelope>, BusError>;
    /// Whether publishing works now.
    async fn check(&self) -> Result<(), BusError>;
}

/// Readiness of a [`Bus`].
pub struct BusReadiness(pub Arc<dyn Bus>);

impl ReadinessCheck for BusReadiness {
    fn name(&self) -> &'static str {
        "bus"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.0.check().await.map_err(|e| e.to_string()) })
    }
}

/// NATS core publish/subscribe.
pub struct NatsBus {
    client: async_nats::Client,
    prefix: String,
}

impl NatsBus {
    /// Connects to `url`. Returns at once and keeps reconnecting in the background if the server is
    /// down, so a process can start (and report "not ready") before NATS is up.
    pub async fn connect(url: &str, prefix: &str) -> Result<NatsBus, BusError> {
        let client = async_nats::ConnectOptions::new()
            .name("confab")
            .retry_on_initial_connect()
            .connection_timeout(std::time::Duration::from_secs(3))
            .connect(url)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        Ok(NatsBus {
            client,
            prefix: prefix.to_owned(),
        })
    }

    fn connected(&self) -> Result<(), BusError> {
        match self.client.connection_state() {
            async_nats::connection::State::Connected => Ok(()),
            other => Err(BusError::Unavailable(format!("NATS connection {other}"))),
        }
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        // The client would otherwise buffer while disconnected and report success.
        self.connected()?;
        let payload = serde_json::to_vec(envelope)?;
        self.client
            .publish(
                subjects::chat_events(&self.prefix, envelope.chat_id),
                payload.into(),
            )
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, Envelope>, BusError> {
        let subscriber = self
            .client
            .subscribe(subjects::all_chat_events(&self.prefix))
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        // The SUB must reach the server before we say the subscription is active.
        self.client
            .flush()
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        Ok(subscriber
            .filter_map(|message| async move {
                match serde_json::from_slice::<Envelope>(&message.payload) {
                    Ok(envelope) => Some(envelope),
                    Err(error) => {
                        tracing::warn!(subject = %message.subject, %error, "dropping undecodable event");
                        metrics::counter!("confab_bus_undecodable_total").increment(1);
                        None
                    }
                }
            })
            .boxed())
    }

    async fn check(&self) -> Result<(), BusError> {
        self.connected()
    }
}

/// In-process broadcast. Subscribers that fall more than `capacity` events behind lose the oldest.
pub struct EmbeddedBus {
    sender: broadcast::Sender<Arc<Envelope>>,
}

impl EmbeddedBus {
    pub fn new(capacity: usize) -> EmbeddedBus {
        let (sender, _) = broadcast::channel(capacity.max(16));
        EmbeddedBus { sender }
    }
}

#[async_trait]
impl Bus for EmbeddedBus {
    async fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        // No subscribers is not an error: nobody is connected.
        let _ = self.sender.send(Arc::new(envelope.clone()));
        Ok(())
    }

    async fn subscribe(&self) -> Result<BoxStream<'static, Envelope>, BusError> {
        Ok(BroadcastStream::new(self.sender.subscribe())
            .filter_map(|item| async move {
                match item {
                    Ok(envelope) => Some(Envelope::clone(&envelope)),
                    Err(BroadcastStreamRecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "event subscriber lagged; events dropped");
                        metrics::counter!("confab_bus_lagged_events_total").increment(missed);
                        None
                    }
                }
            })
            .boxed())
    }

    async fn check(&self) -> Result<(), BusError> {
        Ok(())
    }
}

/// One behavioural suite for every [`Bus`]; `runtime/tests/bus_conformance.rs` runs it against NATS
/// and the embedded bus.
pub mod conformance {
    use std::time::Duration;

    use confab_schema::{ChatId, Envelope, Event, Signal, SignalId, SignalKind, UserId};
    use futures::StreamExt;

    use super::Bus;

    const DEADLINE: Duration = Duration::from_secs(10);

    fn envelope(chat: ChatId, text: &str) -> Envelope {
        let id = SignalId::new();
        let author = UserId::from_subject("conformance", "author");
        Envelope::new(
            chat,
            vec![author],
            Event::SignalCreated(Signal {
                id,
                chat_id: chat,
                kind: SignalKind::Message,
                author_id: author,
                created_at: id.created_at().expect("v7"),
                nonce: None,
                text: Some(text.into()),
                reply_to: None,
                attachments: vec![],
                edited_at: None,
                deleted: false,
                reactions: Default::default(),
            }),
        )
    }

    /// Runs every check against `bus`. `isolated` is a bus on the same server with another subject
    /// prefix (or another embedded bus): nothing published on one may reach the other.
    pub async fn test_suite(bus: &dyn Bus, isolated: &dyn Bus) {
        bus.check().await.expect("bus is usable");
        let mut first = bus.subscribe().await.expect("subscribes");
        let mut second = bus.subscribe().await.expect("subscribes");
        let mut other = isolated.subscribe().await.expect("subscribes");

        // Every subscriber sees every chat's events, in publication order.
        let (one, two) = (ChatId::new(), ChatId::new());
        let sent: Vec<Envelope> = (0..50)
            .map(|i| envelope(if i % 2 == 0 { one } else { two }, &format!("m{i}")))
            .collect();
        for envelope in &sent {
            bus.publish(envelope).await.expect("publishes");
        }
        for subscriber in [&mut first, &mut second] {
            for expected in &sent {
                let received = tokio::time::timeout(DEADLINE, subscriber.next())
                    .await
                    .expect("delivered before the deadline")
                    .expect("subscription open");
                assert_eq!(&received, expected);
            }
        }

        // Another prefix hears nothing of it, and its own events come through.
        let own = envelope(one, "isolated");
        isolated.publish(&own).await.expect("publishes");
        let received = tokio::time::timeout(DEADLINE, other.next())
            .await
            .expect("delivered before the deadline")
            .expect("subscription open");
        assert_eq!(received, own, "the isolated bus saw only its own event");

        // Publishing with nobody listening is fine.
        drop((first, second, other));
        bus.publish(&envelope(one, "nobody listens"))
            .await
            .expect("publishes");
    }
}
