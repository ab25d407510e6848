//! Routes bus envelopes to the connections of their recipients on this instance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use confab_runtime::bus::{Bus, BusError};
use confab_schema::{Envelope, UserId};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

type Connections = HashMap<UserId, Vec<(u64, mpsc::Sender<Arc<Envelope>>)>>;

/// Connections on this instance, by user.
#[derive(Clone)]
pub struct Hub {
    connections: Arc<RwLock<Connections>>,
    next_id: Arc<AtomicU64>,
    buffer: usize,
}

/// A client's registration; dropping it unregisters the connection.
pub struct Registration {
    hub: Hub,
    user: UserId,
    id: u64,
    pub events: mpsc::Receiver<Arc<Envelope>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(self.user, self.id);
    }
}

impl Hub {
    /// `buffer` events are held per connection; a connection that falls further behind is closed
    /// (its client reconnects and reads history) rather than slowing everyone else.
    pub fn new(buffer: usize) -> Hub {
        Hub {
            connections: Arc::default(),
            next_id: Arc::default(),
            buffer: buffer.max(1),
        }
    }

    pub fn register(&self, user: UserId) -> Registration {
        let (sender, events) = mpsc::channel(self.buffer);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut connections) = self.connections.write() {
            connections.entry(user).or_default().push((id, sender));
        }
        metrics::gauge!("confab_notifier_connections").increment(1.0);
        Registration {
            hub: self.clone(),
            user,
            id,
            events,
        }
    }

    fn unregister(&self, user: UserId, id: u64) {
        if let Ok(mut connections) = self.connections.write()
            && let Some(list) = connections.get_mut(&user)
        {
            let before = list.len();
            list.retain(|(conn, _)| *conn != id);
            if list.len() < before {
                metrics::gauge!("confab_notifier_connections").decrement(1.0);
            }
            if list.is_empty() {
                connections.remove(&user);
            }
        }
    }

    /// Hands `envelope` to every connection of its recipients.
    pub fn dispatch(&self, envelope: Envelope) {
        let envelope = Arc::new(envelope);
        let mut slow = Vec::new();
        if let Ok(connections) = self.connections.read() {
            for user in &envelope.recipients {
                for (id, sender) in connections.get(user).into_iter().flatten() {
                    match sender.try_send(Arc::clone(&envelope)) {
                        Ok(()) => metrics::counter!("confab_notifier_delivered_total").increment(1),
                        Err(mpsc::error::TrySendError::Full(_)) => slow.push((*user, *id)),
                        Err(mpsc::error::TrySendError::Closed(_)) => {}
                    }
                }
            }
        }
        for (user, id) in slow {
            tracing::warn!(%user, connection = id, "closing a connection that fell behind");
            metrics::counter!("confab_notifier_slow_disconnects_total").increment(1);
            self.unregister(user, id);
        }
    }

    /// Subscribes to every chat's events and dispatches them until `shutdown`. Returns once the
    /// subscription is active; the returned task ends after shutdown.
    pub async fn start(
        &self,
        bus: Arc<dyn Bus>,
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, BusError> {
        let mut events = bus.subscribe().await?;
        let hub = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    next = events.next() => match next {
                        Some(envelope) => {
                            let span = tracing::debug_span!("consume", event = envelope.event.kind().as_str(), chat = %envelope.chat_id);
                            let _entered = span.enter();
                            hub.dispatch(envelope);
                        }
                        None => {
                            tracing::error!("event subscription ended");
                            break;
                        }
                    }
                }
            }
            // Dropping every sender ends every client stream, so connections close cleanly.
            if let Ok(mut connections) = hub.connections.write() {
                connections.clear();
            }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_schema::{ChatId, Event, Signal, SignalId, SignalKind};

    fn envelope(recipients: Vec<UserId>) -> Envelope {
        let id = SignalId::new();
        let chat = ChatId::new();
        Envelope::new(
            chat,
            recipients.clone(),
            Event::SignalCreated(Signal {
                id,
                chat_id: chat,
                kind: SignalKind::Message,
                author_id: recipients[0],
                created_at: id.created_at().expect("v7"),
                nonce: None,
                text: Some("x".into()),
                reply_to: None,
                attachments: vec![],
                edited_at: None,
                deleted: false,
                reactions: Default::default(),
            }),
        )
    }

    #[test]
    fn delivers_only_to_recipients_and_drops_slow_connections() {
        let hub = Hub::new(2);
        let (alice, bob, carol) = (
            UserId::from_subject("t", "a"),
            UserId::from_subject("t", "b"),
            UserId::from_subject("t", "c"),
        );
        let mut a = hub.register(alice);
        let mut b1 = hub.register(bob);
        let mut b2 = hub.register(bob);
        let mut c = hub.register(carol);
        let sent = envelope(vec![alice, bob]);
        hub.dispatch(sent.clone());
        assert_eq!(*a.events.try_recv().expect("alice"), sent);
        assert_eq!(*b1.events.try_recv().expect("bob 1"), sent);
        assert_eq!(*b2.events.try_recv().expect("bob 2"), sent);
        assert!(c.events.try_recv().is_err(), "carol is not a recipient");

        // Alice stops reading: after her buffer of 2 she is disconnected, bob is not.
        for _ in 0..3 {
            hub.dispatch(envelope(vec![alice, bob]));
            let _ = b1.events.try_recv();
            let _ = b2.events.try_recv();
        }
        while a.events.try_recv().is_ok() {}
        assert!(matches!(
            a.events.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        hub.dispatch(envelope(vec![bob]));
        assert!(b1.events.try_recv().is_ok());
        drop(b2);
        hub.dispatch(envelope(vec![bob]));
        assert!(b1.events.try_recv().is_ok());
    }
}
