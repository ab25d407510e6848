//! Coalescing of "newest wins" writes.
//!
//! Some writes only matter for their newest value: a chat's position in its members' chat lists,
//! an author's read marker. Under a burst of messages into one chat, writing each of them costs the
//! store several statements per message for values that the next message overwrites at once. A
//! [`Coalescer`] keeps at most one such write per key in flight: requests that arrive meanwhile
//! wait for it, and the next write carries the newest value wanted so far. Every caller still
//! returns only after a write covering its value has succeeded, so a client that reads after its
//! own request sees at least its own value.
//!
//! Coalescing is per process; writers in other processes are ordered by the store itself (see
//! `Store::touch_chat` and `Store::advance_marker`), as before.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use confab_schema::SignalId;

/// One write in flight per key; the newest wanted value goes next. See the module docs.
pub struct Coalescer<K, P> {
    slots: Mutex<HashMap<K, Arc<Slot<P>>>>,
}

struct Slot<P> {
    /// The newest value asked for, with what its write needs.
    wanted: Mutex<Option<(SignalId, P)>>,
    /// Held while a write is in flight; the newest value written through this slot.
    written: tokio::sync::Mutex<Option<SignalId>>,
}

impl<K, P> Default for Coalescer<K, P> {
    fn default() -> Self {
        Coalescer {
            slots: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Hash + Eq + Clone, P: Clone> Coalescer<K, P> {
    /// Makes sure a value at least as new as `value` is written for `key`: by this caller's own
    /// `write`, or by a write of another caller that carried a newer value. A failed write fails
    /// its own caller only; the next waiter tries again with the newest value.
    pub async fn advance<F, Fut, E>(
        &self,
        key: K,
        value: SignalId,
        payload: P,
        write: F,
    ) -> Result<(), E>
    where
        F: FnOnce(SignalId, P) -> Fut,
        Fut: Future<Output = Result<(), E>>,
    {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(slots.entry(key.clone()).or_insert_with(|| {
                Arc::new(Slot {
                    wanted: Mutex::new(None),
                    written: tokio::sync::Mutex::new(None),
                })
            }))
        };
        let next = {
            let mut wanted = slot.wanted.lock().unwrap_or_else(|e| e.into_inner());
            if wanted.as_ref().is_none_or(|(newest, _)| *newest < value) {
                *wanted = Some((value, payload.clone()));
            }
            wanted.clone()
        };
        let result = async {
            let mut written = slot.written.lock().await;
            if written.is_some_and(|newest| newest >= value) {
                return Ok(());
            }
            // Take the newest value wanted by now: requests that queued behind the previous
            // write ride along with this one.
            let (newest, payload) = slot
                .wanted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .or(next)
                .unwrap_or((value, payload));
            write(newest, payload).await?;
            *written = Some(newest);
            Ok(())
        }
        .await;
        // Forget the key once nobody else holds its slot (ours and the map's are the last two).
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&slot) == 2 {
            slots.remove(&key);
        }
        result
    }

    /// Keys with a write in flight or waiting; for tests and metrics.
    pub fn pending_keys(&self) -> usize {
        self.slots.lock().map(|s| s.len()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// A burst of advances while one write is held back ends in far fewer writes than requests,
    /// the last write carries the newest value, and every caller returns after a covering write.
    #[tokio::test]
    async fn a_burst_coalesces_into_few_writes_and_ends_on_the_newest() {
        let coalescer = Arc::new(Coalescer::<u8, ()>::default());
        let writes = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(Mutex::new(None::<SignalId>));
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let ids: Vec<SignalId> = (0..50)
            .map(|_| {
                // Distinct, increasing ids even within one millisecond.
                std::thread::sleep(Duration::from_micros(50));
                SignalId::new()
            })
            .collect();
        let mut tasks = Vec::new();
        for id in ids.iter().copied() {
            let coalescer = Arc::clone(&coalescer);
            let writes = Arc::clone(&writes);
            let last = Arc::clone(&last);
            let mut release = release_rx.clone();
            tasks.push(tokio::spawn(async move {
                coalescer
                    .advance(0, id, (), |newest, ()| async move {
                        // The first write waits until every request has queued.
                        let _ = release.wait_for(|released| *released).await;
                        writes.fetch_add(1, Ordering::SeqCst);
                        let mut last = last.lock().unwrap();
                        assert!(last.is_none_or(|l| l < newest), "a write went backwards");
                        *last = Some(newest);
                        Ok::<(), ()>(())
                    })
                    .await
            }));
        }
        // Let every request reach the coalescer (each holds the slot) before the first write ends.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let holders = {
                let slots = coalescer.slots.lock().unwrap();
                slots.get(&0).map(Arc::strong_count).unwrap_or_default()
            };
            if holders == ids.len() + 1 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {holders} holders"
            );
            tokio::task::yield_now().await;
        }
        release_tx.send(true).unwrap();
        for task in tasks {
            assert_eq!(task.await.unwrap(), Ok(()));
        }
        let writes = writes.load(Ordering::SeqCst);
        assert!(writes <= 2, "{writes} writes for one burst");
        assert_eq!(*last.lock().unwrap(), ids.last().copied());
        assert_eq!(coalescer.pending_keys(), 0, "the key was not forgotten");
    }

    /// A failed write fails only its caller; the next caller writes the newest value itself.
    #[tokio::test]
    async fn a_failed_write_is_retried_by_the_next_caller() {
        let coalescer = Coalescer::<u8, ()>::default();
        let first = SignalId::new();
        let failed = coalescer
            .advance(0, first, (), |_, ()| async { Err::<(), _>("store down") })
            .await;
        assert_eq!(failed, Err("store down"));
        let second = SignalId::new();
        let written = Mutex::new(None);
        coalescer
            .advance(0, second, (), |newest, ()| {
                *written.lock().unwrap() = Some(newest);
                async { Ok::<(), &str>(()) }
            })
            .await
            .unwrap();
        assert_eq!(*written.lock().unwrap(), Some(second));
    }

    /// Different keys never wait for each other.
    #[tokio::test]
    async fn keys_are_independent() {
        let coalescer = Arc::new(Coalescer::<u8, ()>::default());
        let (hold_tx, hold_rx) = tokio::sync::oneshot::channel::<()>();
        let held = {
            let coalescer = Arc::clone(&coalescer);
            tokio::spawn(async move {
                coalescer
                    .advance(1, SignalId::new(), (), |_, ()| async move {
                        let _ = hold_rx.await;
                        Ok::<(), ()>(())
                    })
                    .await
            })
        };
        let other = tokio::time::timeout(
            Duration::from_secs(10),
            coalescer.advance(2, SignalId::new(), (), |_, ()| async { Ok::<(), ()>(()) }),
        )
        .await;
        assert_eq!(other, Ok(Ok(())));
        hold_tx.send(()).unwrap();
        assert_eq!(held.await.unwrap(), Ok(()));
    }
}
