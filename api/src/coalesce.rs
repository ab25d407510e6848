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
//! A coalescer may be *paced*: a key's next write then starts no sooner than the pace after the
//! previous one started, and the requests arriving meanwhile ride along with it. Without a pace the
//! number of writes follows the store's speed (the quicker a write, the fewer requests it gathers),
//! so a quick store got more writes for the same messages. The pace applies only while requests
//! for a key overlap (a busy chat): a key nobody waits on is forgotten, so requests one after
//! another (a person typing) each write at once.
//!
//! Coalescing is per process; writers in other processes are ordered by the store itself (see
//! `Store::touch_chat` and `Store::advance_marker`), as before.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use confab_schema::SignalId;

/// One write in flight per key; the newest wanted value goes next. See the module docs.
pub struct Coalescer<K, P> {
    slots: Mutex<HashMap<K, Arc<Slot<P>>>>,
    /// The least time from the start of one write of a key to the start of its next.
    pace: Duration,
}

struct Slot<P> {
    /// The newest value asked for, with what its write needs.
    wanted: Mutex<Option<(SignalId, P)>>,
    /// Held while a write is in flight, or waits for its pace: the newest value written through
    /// this slot, and when its last write started.
    written: tokio::sync::Mutex<Written>,
}

#[derive(Default)]
struct Written {
    newest: Option<SignalId>,
    started: Option<tokio::time::Instant>,
}

impl<K, P> Default for Coalescer<K, P> {
    fn default() -> Self {
        Coalescer::paced(Duration::ZERO)
    }
}

impl<K, P> Coalescer<K, P> {
    /// A coalescer whose writes of one key start at least `pace` apart (see the module docs).
    pub fn paced(pace: Duration) -> Self {
        Coalescer {
            slots: Mutex::new(HashMap::new()),
            pace,
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
                    written: tokio::sync::Mutex::new(Written::default()),
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
            if written.newest.is_some_and(|newest| newest >= value) {
                return Ok(());
            }
            if let Some(started) = written.started {
                // Requests arriving meanwhile queue behind this one and ride along.
                tokio::time::sleep_until(started + self.pace).await;
            }
            written.started = Some(tokio::time::Instant::now());
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
            written.newest = Some(newest);
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

    /// A steady stream of requests into one key (one every millisecond for 200 ms, each write
    /// taking three) costs one write per pace, not one per write's duration, and every
    /// caller returns after a write covering its value; the last write carries the newest.
    #[tokio::test(start_paused = true)]
    async fn a_paced_key_writes_once_per_pace_under_a_stream() {
        const PACE: Duration = Duration::from_millis(50);
        let coalescer = Arc::new(Coalescer::<u8, ()>::paced(PACE));
        let writes = Arc::new(Mutex::new(Vec::<(tokio::time::Instant, SignalId)>::new()));
        let mut tasks = Vec::new();
        let mut ids = Vec::new();
        for _ in 0..200 {
            std::thread::sleep(Duration::from_micros(50));
            let id = SignalId::new();
            ids.push(id);
            let coalescer = Arc::clone(&coalescer);
            let writes = Arc::clone(&writes);
            tasks.push(tokio::spawn(async move {
                coalescer
                    .advance(0, id, (), |newest, ()| async move {
                        writes
                            .lock()
                            .unwrap()
                            .push((tokio::time::Instant::now(), newest));
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        Ok::<(), ()>(())
                    })
                    .await
            }));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for task in tasks {
            assert_eq!(task.await.unwrap(), Ok(()));
        }
        let writes = writes.lock().unwrap();
        assert!(
            writes.len() <= 6,
            "{} writes in 200 ms at a pace of 50 ms",
            writes.len()
        );
        for pair in writes.windows(2) {
            assert!(
                pair[1].0 - pair[0].0 >= PACE,
                "two writes closer than the pace"
            );
            assert!(pair[0].1 < pair[1].1, "a write went backwards");
        }
        assert_eq!(writes.last().map(|w| w.1), ids.last().copied());
        assert_eq!(coalescer.pending_keys(), 0, "the key was not forgotten");
    }

    /// Requests one after another (nobody waiting on the key) are never held back by the pace.
    #[tokio::test]
    async fn a_lone_request_is_not_paced() {
        let coalescer = Coalescer::<u8, ()>::paced(Duration::from_secs(3_600));
        for _ in 0..3 {
            tokio::time::timeout(
                Duration::from_secs(10),
                coalescer.advance(0, SignalId::new(), (), |_, ()| async { Ok::<(), ()>(()) }),
            )
            .await
            .expect("a lone request writes at once")
            .unwrap();
        }
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
