//! The push queue on JetStream. Entries live in a key-value bucket (`<prefix>_push`, key
//! `<user>.<chat>`), pushes sent lately in another (`<prefix>_push_sent`, aged out after
//! [`SENT_MEMORY_MS`]). Finding the due ones without scanning every entry: each entry has one
//! ticket (its key, its due time, and when the ticket was published), put on a work-queue stream
//! (`<prefix>_push_due`) just before the entry is created, and read by one durable consumer that
//! every notifier node shares. A ticket due later than a
//! second or two is published as a message schedule (`Nats-Schedule: @at …`, NATS 2.12 or
//! later) on a subject of its own below `<prefix>.push.at` (one per key and due time): the server
//! moves it to the consumer's subject [`LEAD_MS`] before the entry is due. Until then it is not
//! delivered, so tickets of pushes not yet due take no place among the consumer's unacknowledged
//! messages (capped at 100,000): however many wait, the due ones still come. A node that takes a
//! ticket holds it until due, unacknowledged, within the hold horizon ([`DEFAULT_HOLD`], at most
//! 5 s under the ack wait); one that comes early all the same (published at once, or handed back
//! by a node that shut down) is handed back with a delay (a NAK with delay) to come again
//! [`LEAD_MS`] before its due time. The ticket carries the entry's due time (which never moves,
//! but for an entry given a fresh ticket, below), so it is decided without reading the entry. The
//! horizon is short by default: a node killed while holding tickets lets them come back only
//! after the ack wait (30 s), and holding every ticket from its first fetch (20 s) did not make
//! pushes measurably more punctual (`confab bench-push --hold-ms`).
//!
//! Invariant: while an entry exists, a ticket for it is on the stream or in a node's hands. The
//! ticket is published before the entry is created, so neither a crash between the two nor a lost
//! acknowledgement of the create (whose retry finds the entry and joins it) leaves an entry
//! without one; a ticket whose create never landed finds no entry, and is dropped as one whose
//! entry was cancelled is. A ticket that finds no entry within [`CREATE_GRACE_MS`] of its
//! publication may have come before its entry's create landed (an entry due at once), so it comes
//! back, a little later each time, until then. A ticket is acknowledged only once its entry is
//! gone or claimed (compare-and-delete by one node), so a node that dies holding one lets it be
//! redelivered after the ack wait. An entry that a join finds overdue by more than
//! [`ORPHANED_AFTER`] (one written without a ticket by an older version, which created the entry
//! first) is given a fresh ticket by that join, and made due at once. A node that shuts down hands
//! its held tickets back first ([`PushQueue::release`]), so they come again at their due time,
//! not after the ack wait. Two tickets for one entry (created again after a cancel, or a create
//! that lost a race) are harmless: the first claims it, the second finds nothing (or the entry
//! not due yet, and comes back when it is).

use std::collections::{BinaryHeap, HashMap};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::stream::{RetentionPolicy, StorageType};
use async_nats::jetstream::{self, AckKind, kv};
use async_trait::async_trait;
use confab_schema::{ChatId, SignalId, UserId};
use futures::{StreamExt, TryStreamExt};

use super::{
    AfterDeletion, Cancelled, Claimed, PendingPush, PushKind, PushMessage, PushQueue,
    SENT_MEMORY_MS, SentPush, key, unavailable, user_prefix,
};
use crate::bus::BusError;
use crate::kv_bucket::{ENTRY_ATTEMPTS, EntryTurns, KvBucket, lost_a_race};

/// Tickets looked at concurrently by one claim.
const TICKETS_IN_FLIGHT: usize = 32;

/// How long the pending bucket keeps what was last written of an entry: a pending push is
/// claimed at its due time, at most a day (the longest delay a user sets) after its last write,
/// and this leaves as much again for an outage. Without an age, the delete marker a claim or a
/// cancel leaves stays for good, one for every user and chat that ever had a push.
pub const PENDING_MAX_AGE: Duration = Duration::from_secs(2 * 86_400);

pub struct NatsPushQueue {
    context: jetstream::Context,
    pending: KvBucket,
    sent: KvBucket,
    /// Stream name, its one subject, and the consumer, opened on first use.
    tickets: String,
    ticket_subject: String,
    /// The subjects below which a ticket waits for its time: one subject per entry version.
    schedule_subject: String,
    consumer: tokio::sync::OnceCell<PullConsumer>,
    /// Set once the pending bucket is known to age out what it holds ([`PENDING_MAX_AGE`]).
    pending_aged: tokio::sync::OnceCell<()>,
    /// Tickets due within the hold horizon, held unacknowledged until their due time, the
    /// earliest on top: the node claims them then.
    held: std::sync::Mutex<BinaryHeap<Held>>,
    /// How far ahead of its due time a ticket is held rather than handed back (ms).
    hold_ms: i64,
    /// This node's schedules and cancels of one pending entry take turns (a burst of messages
    /// into a chat writes each recipient's entry once per message).
    entry_turns: EntryTurns,
    /// Schedules waiting for their entry's turn, by key. The one whose turn comes writes every
    /// schedule queued for its entry by then, in one read and one compare-and-set: a burst costs
    /// a write per turn, not per message, and no queue builds behind a hot entry.
    queued: std::sync::Mutex<HashMap<String, Vec<QueuedSchedule>>>,
    /// The entries this node wrote last, with their revisions, by key. A schedule joins what it
    /// finds here and writes it with a compare-and-set on that revision, without reading the
    /// entry first: while nobody else wrote the entry (the common case in a burst into a chat),
    /// a turn costs one request to the server instead of two. Anything else written meanwhile (a
    /// claim, a cancel, another node's schedule) moved the revision, so the write is refused and
    /// the turn reads the entry as it is. Bounded by [`REMEMBERED_ENTRIES_MAX`].
    written: std::sync::Mutex<HashMap<String, (PendingPush, u64)>>,
    /// When the latest write of each entry started, kept only when schedules of that entry
    /// overlapped (it carried more than one, or more were waiting when it was done): the next
    /// write then starts no sooner than [`SCHEDULE_PACE`] after it. Bounded like `written`.
    paced: std::sync::Mutex<HashMap<String, tokio::time::Instant>>,
    /// The id of the next queued schedule.
    next_schedule_id: std::sync::atomic::AtomicU64,
    /// Tickets whose entry could not be read or claimed, told once per outage.
    undecided: OutageLog,
    /// Tickets whose answer (ack, NAK) did not reach the stream, told once per outage.
    unanswered: OutageLog,
}

/// While the key-value store or the stream is out, every ticket of every claim fails the same
/// way: a line each would bury the log (thousands a minute) and say nothing new.
const OUTAGE_REMINDER: Duration = Duration::from_secs(60);

/// What an [`OutageLog`] says about a failure.
#[derive(Debug, PartialEq, Eq)]
enum Tell {
    /// The first of an outage: told with its error.
    First,
    /// The outage goes on: told with how many failed since it was last told.
    Still(u64),
    /// Counted, not told.
    Nothing,
}

/// Failures of one kind, told once per outage instead of once each: the first with its error,
/// then at most one line per [`OUTAGE_REMINDER`] while they go on, and one when a request of the
/// kind succeeds again, with how many failed. (Each failure is also counted in a metric.)
#[derive(Default)]
pub struct OutageLog {
    outage: std::sync::Mutex<Option<Outage>>,
}

struct Outage {
    started: std::time::Instant,
    failures: u64,
    told_at: std::time::Instant,
    untold: u64,
}

impl OutageLog {
    fn failed(&self, now: std::time::Instant) -> Tell {
        let mut outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        let Some(outage) = outage.as_mut() else {
            *outage = Some(Outage {
                started: now,
                failures: 1,
                told_at: now,
                untold: 0,
            });
            return Tell::First;
        };
        outage.failures += 1;
        outage.untold += 1;
        if now.duration_since(outage.told_at) < OUTAGE_REMINDER {
            return Tell::Nothing;
        }
        outage.told_at = now;
        Tell::Still(std::mem::take(&mut outage.untold))
    }

    /// Ends the outage, if there was one: how many failed in it, and for how long.
    fn succeeded(&self, now: std::time::Instant) -> Option<(u64, Duration)> {
        let mut outage = self.outage.lock().unwrap_or_else(|e| e.into_inner());
        let ended = outage.take()?;
        Some((ended.failures, now.duration_since(ended.started)))
    }

    /// Counts a failure of `step` and logs it as [`OutageLog::failed`] says.
    pub fn warn(&self, step: &'static str, error: &dyn std::fmt::Display, what: &str) {
        metrics::counter!("confab_push_queue_failures_total", "step" => step).increment(1);
        match self.failed(std::time::Instant::now()) {
            Tell::First => tracing::warn!(%error, step, "{what}; further failures are summed up"),
            Tell::Still(failed) => {
                tracing::warn!(%error, step, failed, "{what}: still failing")
            }
            Tell::Nothing => {}
        }
    }

    /// Logs the end of an outage of `step`, if one was going on.
    pub fn recovered(&self, step: &'static str) {
        if let Some((failed, lasted)) = self.succeeded(std::time::Instant::now()) {
            tracing::info!(
                step,
                failed,
                lasted_ms = lasted.as_millis() as u64,
                "push queue recovered"
            );
        }
    }
}

/// While schedules of one entry overlap (a burst of messages into a chat), its writes start at
/// least this far apart, and every schedule that arrives meanwhile goes in the next write. A
/// write takes well under the 2 ms between two sends at 500 messages/s, so turns alone merged
/// almost none of a busy chat's schedules (1.03 writes per message in the send benchmark), and
/// each write is a compare-and-set on the stream. Once a write carries a single schedule with
/// nobody waiting, the entry's next write goes at once. A schedule that waits answers its send up
/// to this much later; its push is due as scheduled.
const SCHEDULE_PACE: Duration = Duration::from_millis(50);

/// How many entries a node remembers having written before it starts again empty: each is a
/// few hundred bytes, and only entries written again soon (bursts) gain from it.
const REMEMBERED_ENTRIES_MAX: usize = 16_384;

/// A schedule waiting for its entry's turn.
struct QueuedSchedule {
    /// Tells this schedule apart from the others queued for its entry.
    id: u64,
    message: PushMessage,
    due_ms: i64,
    expires_ms: i64,
    /// Told the outcome of the write that carried it.
    done: tokio::sync::oneshot::Sender<Result<(), String>>,
}

/// Where a queued schedule stands (see `NatsPushQueue::queued_schedule`).
enum QueuedState {
    /// A write took it along; its outcome comes by its channel.
    Taken,
    /// Queued; the entry's next write starts no sooner than this.
    Paced(tokio::time::Instant),
    /// Queued, and the entry may be written now.
    Due,
}

/// A ticket held until its due time.
struct Held {
    due_ms: i64,
    ticket: jetstream::Message,
}

// Ordered so that the heap's top is the earliest due.
impl Ord for Held {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.due_ms.cmp(&self.due_ms)
    }
}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.due_ms == other.due_ms
    }
}
impl Eq for Held {}

/// How far ahead of its due time a node holds a ticket by default: the lead, no more, so that a
/// node killed while holding tickets delays few pushes by the ack wait.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(2);

/// What a node does with a ticket now.
enum Decision {
    /// Answer it so (with the push, when this node claimed it).
    Answer(Option<PendingPush>, AckKind),
    /// Keep it, unanswered, until it is due at this time.
    Hold(i64),
}

/// A scheduled ticket comes this long before its due time, and one due beyond the hold horizon
/// is handed back to come again this long before it (then held). The server's redelivery after a
/// NAK with delay runs late under load (seconds at 2,000 tickets/s on two cores); this lead
/// absorbs that.
const LEAD_MS: i64 = 2_000;

/// The decision for a ticket whose entry is due at `due_ms`, not yet due at `now_ms`, on a node
/// holding tickets up to `hold_ms` ahead.
fn not_yet(due_ms: i64, now_ms: i64, hold_ms: i64) -> Decision {
    let wait = due_ms - now_ms;
    if wait <= hold_ms.max(LEAD_MS) {
        Decision::Hold(due_ms)
    } else {
        let back = u64::try_from(wait - LEAD_MS).unwrap_or(0);
        Decision::Answer(None, AckKind::Nak(Some(Duration::from_millis(back))))
    }
}

impl NatsPushQueue {
    /// How long a node may hold a ticket before it is handed to another: a node killed while
    /// holding one delays its push by this much.
    pub const ACK_WAIT: Duration = Duration::from_secs(30);

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
                max_age: PENDING_MAX_AGE,
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
            schedule_subject: format!("{prefix}.push.at"),
            consumer: tokio::sync::OnceCell::new(),
            pending_aged: tokio::sync::OnceCell::new(),
            held: std::sync::Mutex::new(BinaryHeap::new()),
            hold_ms: i64::try_from(DEFAULT_HOLD.as_millis()).unwrap_or(i64::MAX),
            entry_turns: EntryTurns::default(),
            queued: std::sync::Mutex::default(),
            written: std::sync::Mutex::default(),
            paced: std::sync::Mutex::default(),
            next_schedule_id: std::sync::atomic::AtomicU64::new(0),
            undecided: OutageLog::default(),
            unanswered: OutageLog::default(),
        })
    }

    /// Holds tickets up to `hold` ahead of their due time (at most 5 s under the ack wait, so a
    /// held ticket is claimed before the server would hand it to another node).
    #[must_use]
    pub fn holding(mut self, hold: Duration) -> NatsPushQueue {
        let most = Self::ACK_WAIT.saturating_sub(Duration::from_secs(5));
        self.hold_ms = i64::try_from(hold.min(most).as_millis()).unwrap_or(0);
        self
    }

    /// Deletes the buckets and the ticket stream (tests clean up with this).
    pub async fn delete_bucket(&self) -> Result<(), BusError> {
        // A bucket made again numbers its revisions from the start: what was remembered of this
        // one could match an entry of the next.
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.pending.delete().await.map_err(unavailable)?;
        self.sent.delete().await.map_err(unavailable)?;
        match self.context.delete_stream(&self.tickets).await {
            Ok(_) => Ok(()),
            Err(error) if error.to_string().contains("not found") => Ok(()),
            Err(error) => Err(unavailable(error)),
        }
    }

    async fn kv(&self) -> Result<&kv::Store, BusError> {
        let store = self.pending.store().await.map_err(unavailable)?;
        self.pending_aged
            .get_or_init(|| async {
                // A bucket made by an earlier version kept every entry's delete marker for good.
                // Tried once: the queue works without it (an account that may not change the
                // stream, say), only its markers stay.
                let aged = async {
                    let stream = self.context.get_stream(&store.stream_name).await?;
                    let mut config = stream.cached_info().config.clone();
                    if config.max_age.is_zero() {
                        config.max_age = PENDING_MAX_AGE;
                        self.context.update_stream(config).await?;
                    }
                    Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
                };
                if let Err(error) = aged.await {
                    tracing::warn!(%error, "the pending pushes' bucket keeps its delete markers");
                }
            })
            .await;
        Ok(store)
    }

    /// The consumer of due tickets, on a stream made (or brought up to date) on first use: it
    /// holds the due tickets on `<prefix>.push.due` and the scheduled ones on
    /// `<prefix>.push.at.>`, which the server moves to the due subject at their time.
    async fn consumer(&self) -> Result<&PullConsumer, BusError> {
        self.consumer
            .get_or_try_init(|| async {
                let info = self
                    .context
                    .create_or_update_stream(jetstream::stream::Config {
                        name: self.tickets.clone(),
                        description: Some("confab push tickets: one per pending push".into()),
                        subjects: vec![
                            self.ticket_subject.clone(),
                            format!("{}.>", self.schedule_subject),
                        ],
                        retention: RetentionPolicy::WorkQueue,
                        storage: StorageType::File,
                        allow_message_schedules: true,
                        ..Default::default()
                    })
                    .await
                    .map_err(unavailable)?;
                // A server without message schedules keeps the field unset, and would keep the
                // scheduled tickets as plain messages that never come due: refuse to start.
                if !info.config.allow_message_schedules {
                    return Err(unavailable(
                        "the NATS server has no message schedules (NATS 2.12 or later needed)",
                    ));
                }
                let stream = self
                    .context
                    .get_stream(&self.tickets)
                    .await
                    .map_err(unavailable)?;
                // Created, or updated in place: a consumer of an older version read the whole
                // stream, and would take the scheduled tickets before their time.
                stream
                    .create_consumer(pull::Config {
                        durable_name: Some("senders".into()),
                        filter_subject: self.ticket_subject.clone(),
                        ack_policy: AckPolicy::Explicit,
                        ack_wait: Self::ACK_WAIT,
                        max_ack_pending: 100_000,
                        ..Default::default()
                    })
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

    /// What `ticket` finds at `now_ms`: the push, claimed, when it is due (then the ticket is
    /// done); nothing and the ticket handed back until the due time when it is not; nothing and
    /// the ticket done when the entry is gone (back shortly if the entry may be still to come).
    async fn claim_ticket(
        &self,
        kv: &kv::Store,
        ticket: &Ticket,
        now_ms: i64,
    ) -> Result<Decision, BusError> {
        let key = ticket.key.as_str();
        for _ in 0..16 {
            let Some((push, revision)) = self.pending(kv, key).await? else {
                return Ok(Decision::Answer(
                    None,
                    no_entry(ticket.published_ms, now_ms),
                ));
            };
            if push.due_ms > now_ms {
                return Ok(not_yet(push.due_ms, now_ms, self.hold_ms));
            }
            // Compare-and-delete: the node whose delete lands sends it.
            if kv.delete_expect_revision(key, Some(revision)).await.is_ok() {
                return Ok(Decision::Answer(Some(push), AckKind::Ack));
            }
        }
        // Changing all the time: look again shortly.
        Ok(Decision::Answer(
            None,
            AckKind::Nak(Some(Duration::from_millis(100))),
        ))
    }

    /// Claims the due pushes among the held tickets that came due and up to `limit` fetched
    /// ones; answers those and whether the fetch came back full.
    async fn claim_batch(
        &self,
        now_ms: i64,
        limit: usize,
    ) -> Result<(Vec<PendingPush>, bool), BusError> {
        let kv = self.kv().await?;
        let consumer = self.consumer().await?;
        // At most `limit` held tickets, the earliest due first; the rest wait for the next claim.
        let (ripe, more_ripe): (Vec<jetstream::Message>, bool) = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            let mut ripe = Vec::new();
            while ripe.len() < limit && held.peek().is_some_and(|h| h.due_ms <= now_ms) {
                ripe.extend(held.pop().map(|h| h.ticket));
            }
            let more = held.peek().is_some_and(|h| h.due_ms <= now_ms);
            (ripe, more)
        };
        let room = limit - ripe.len();
        // With a full claim of held tickets, nothing is fetched this time.
        let mut batch = ripe;
        let mut fetched = 0;
        if room > 0 && !more_ripe {
            let mut tickets = consumer
                .fetch()
                .max_messages(room)
                .messages()
                .await
                .map_err(unavailable)?;
            while let Some(ticket) = tickets.next().await {
                batch.push(ticket.map_err(unavailable)?);
                fetched += 1;
            }
        }
        let full = more_ripe || fetched >= room;
        // Tickets are looked at concurrently: each costs a read, a delete and an ack. A ticket
        // that cannot be decided costs only itself: the pushes the others claimed (their entries
        // deleted already) are the caller's whatever happens to the rest of the batch.
        let claimed: Vec<Option<PendingPush>> = futures::stream::iter(batch)
            .map(|ticket: jetstream::Message| async move {
                let parsed = Ticket::parse(&ticket.payload);
                // Decided unread until the due time it carries: the entry's due time never
                // moves, so the early deliveries of a ticket cost no read.
                let decision = match parsed.due_ms {
                    Some(due) if due > now_ms => not_yet(due, now_ms, self.hold_ms),
                    _ if !is_entry_key(&parsed.key) => {
                        // Not a ticket this queue wrote (anyone who may publish on the subject
                        // can): no entry can ever answer it.
                        tracing::warn!(key = %parsed.key, "dropping a push ticket of no entry");
                        Decision::Answer(None, AckKind::Term)
                    }
                    _ => match self.claim_ticket(kv, &parsed, now_ms).await {
                        Ok(decision) => {
                            self.undecided.recovered("decide");
                            decision
                        }
                        Err(error) => {
                            // Back soon, to whichever node asks then: late, never lost.
                            self.undecided
                                .warn("decide", &error, "push ticket not decided");
                            Decision::Answer(None, AckKind::Nak(Some(RETRY_UNDECIDED)))
                        }
                    },
                };
                match decision {
                    Decision::Hold(due) => {
                        self.held
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Held {
                                due_ms: due,
                                ticket,
                            });
                        None
                    }
                    Decision::Answer(claimed, answer) => {
                        match ticket.ack_with(answer).await {
                            Ok(()) => self.unanswered.recovered("answer"),
                            // Unanswered, the ticket comes back after the ack wait: late, never
                            // lost.
                            Err(error) => {
                                self.unanswered
                                    .warn("answer", &error, "push ticket not answered");
                            }
                        }
                        claimed
                    }
                }
            })
            .buffer_unordered(TICKETS_IN_FLIGHT)
            .collect()
            .await;
        Ok((claimed.into_iter().flatten().collect(), full))
    }

    /// Puts a ticket for `key`'s entry, due at `due_ms`, on the stream: before the entry is
    /// created (or given a fresh ticket), so that no entry is ever without one. A ticket whose
    /// entry is then not written finds none, and is dropped.
    async fn ticket(&self, key: &str, due_ms: i64) -> Result<(), BusError> {
        self.consumer().await?;
        let now_ms = crate::presence::now_ms();
        let payload = Ticket::payload(key, due_ms, now_ms);
        let ack = match schedule_time(due_ms, now_ms) {
            // Due soon: on the due subject at once, held by whichever node takes it.
            None => self
                .context
                .publish(self.ticket_subject.clone(), payload)
                .await
                .map_err(unavailable)?,
            // Due later: the server keeps it aside and moves it to the due subject at its time,
            // so until then it takes no place among the consumer's unacknowledged tickets,
            // however many wait. One subject per key and due time: a schedule replaces the one on
            // its subject, which is a ticket for the same entry and time (a retry of this
            // publish, or a create that lost a race), never another's.
            Some(at) => {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Schedule", at.as_str());
                headers.insert("Nats-Schedule-Target", self.ticket_subject.as_str());
                self.context
                    .publish_with_headers(
                        format!("{}.{key}.{due_ms}", self.schedule_subject),
                        headers,
                        payload,
                    )
                    .await
                    .map_err(unavailable)?
            }
        };
        ack.await.map_err(unavailable)?;
        Ok(())
    }
}

/// When a ticket due at `due_ms` is put on the due subject by the server, as a `Nats-Schedule`
/// value, or `None` when it goes there at once. It comes [`LEAD_MS`] before its due time (whole
/// seconds, rounded up, so that it is never handed back when it comes), and is held from then.
fn schedule_time(due_ms: i64, now_ms: i64) -> Option<String> {
    let at_ms = due_ms - LEAD_MS;
    let at_s = at_ms.div_euclid(1_000) + i64::from(at_ms.rem_euclid(1_000) != 0);
    // Due within a second or so of now: a schedule would only add the scheduler's delay.
    if at_s * 1_000 <= now_ms + 1_000 {
        return None;
    }
    let at = time::OffsetDateTime::from_unix_timestamp(at_s).ok()?;
    let text = at
        .format(&time::format_description::well_known::Rfc3339)
        .ok()?;
    Some(format!("@at {text}"))
}

/// How soon a ticket whose entry could not be read comes back.
const RETRY_UNDECIDED: Duration = Duration::from_secs(1);

/// How long after its publication a ticket that finds no entry is looked at again rather than
/// dropped: its entry's create is the next request after the ticket's publication was
/// acknowledged, and the client gives up on a request after 5 s.
const CREATE_GRACE_MS: i64 = 10_000;

/// The shortest wait before a ticket that found no entry within [`CREATE_GRACE_MS`] is looked at
/// again; each wait after is as long as the ticket's age (so a few looks in all).
const CREATE_RECHECK_MS: i64 = 100;

/// What a ticket that found no entry at `now_ms` is answered: dropped, or, published less than
/// [`CREATE_GRACE_MS`] ago (its entry's create may not have landed yet), back a little later.
fn no_entry(published_ms: Option<i64>, now_ms: i64) -> AckKind {
    // The publisher's clock may be ahead of this node's: a ticket from its future is as young as
    // can be, not one to drop.
    let Some(age) = published_ms.map(|published| (now_ms - published).max(0)) else {
        return AckKind::Ack;
    };
    if age >= CREATE_GRACE_MS {
        return AckKind::Ack;
    }
    let back = age.max(CREATE_RECHECK_MS).min(CREATE_GRACE_MS - age);
    AckKind::Nak(Some(Duration::from_millis(back.unsigned_abs())))
}

/// A join that finds its entry overdue by more than this gives it a fresh ticket: the entry's own
/// ticket comes within the ack wait of its due time even from a node killed while holding it
/// (and the server's schedule runs seconds late at worst), so an entry this late most likely has
/// none (one left by an older version). A ticket too many is harmless: one claims, the other
/// finds nothing.
const ORPHANED_AFTER: Duration = Duration::from_secs(120);

/// Whether `key` names an entry this queue writes (see [`super::key`]).
fn is_entry_key(key: &str) -> bool {
    key.split_once('.').is_some_and(|(user, chat)| {
        user.parse::<UserId>().is_ok() && chat.parse::<ChatId>().is_ok()
    })
}

/// A ticket: its entry's key, the entry's due time, and when the ticket was published (tickets of
/// older versions carry the key alone, or the key and the due time).
struct Ticket {
    key: String,
    due_ms: Option<i64>,
    published_ms: Option<i64>,
}

impl Ticket {
    fn payload(key: &str, due_ms: i64, published_ms: i64) -> bytes::Bytes {
        format!("{key} {due_ms} {published_ms}").into()
    }

    fn parse(payload: &[u8]) -> Ticket {
        let text = String::from_utf8_lossy(payload);
        let mut fields = text.split(' ');
        let key = fields.next().unwrap_or_default().to_owned();
        let mut number = || fields.next().and_then(|field| field.parse().ok());
        let due_ms = number();
        let published_ms = number();
        Ticket {
            key,
            due_ms,
            published_ms,
        }
    }
}

impl NatsPushQueue {
    /// Adds `batch` to the entry `key`: one read, one compare-and-set, retried against other
    /// processes' writes.
    async fn write_schedules(
        &self,
        kv: &kv::Store,
        key: &str,
        user: UserId,
        chat: ChatId,
        batch: &[QueuedSchedule],
    ) -> Result<(), BusError> {
        let mut remembered = self.remembered(key);
        let mut attempt = 0;
        loop {
            let from_memory = remembered.is_some();
            let (pending, revision) = match remembered.take() {
                Some((push, revision)) => (Some(push), Some(revision)),
                None => match self.pending(kv, key).await? {
                    Some((push, revision)) => (Some(push), Some(revision)),
                    None => (None, None),
                },
            };
            let stored_due_ms = pending.as_ref().map(|push| push.due_ms);
            let mut push = pending;
            for queued in batch {
                push = Some(PendingPush::joined(
                    push,
                    user,
                    chat,
                    &queued.message,
                    queued.due_ms,
                    queued.expires_ms,
                ));
            }
            let Some(mut push) = push else {
                return Ok(()); // nothing queued and nothing pending: nothing to write
            };
            match revision {
                // The entry's ticket is out already; it finds the entry as it is when it comes.
                // Unless the entry is long overdue: then it most likely has none, and gets one
                // (first, as a new entry does), due now at the latest.
                Some(revision) => {
                    let now_ms = crate::presence::now_ms();
                    let orphaned_ms = i64::try_from(ORPHANED_AFTER.as_millis()).unwrap_or(i64::MAX);
                    if stored_due_ms.is_some_and(|due| due < now_ms.saturating_sub(orphaned_ms)) {
                        push.due_ms = push.due_ms.max(now_ms);
                        self.ticket(key, push.due_ms).await?;
                    }
                    let value: bytes::Bytes = serde_json::to_vec(&push)?.into();
                    if let Ok(revision) = kv.update(key, value, revision).await {
                        self.remember(key, push, revision);
                        return Ok(());
                    }
                }
                // The ticket first: whatever stops this here, no entry is left without one.
                None => {
                    self.ticket(key, push.due_ms).await?;
                    let value: bytes::Bytes = serde_json::to_vec(&push)?.into();
                    if let Ok(revision) = kv.create(key, value).await {
                        self.remember(key, push, revision);
                        return Ok(());
                    }
                }
            }
            // What this node remembered is not the entry any more: read it, at once. A write
            // refused after a read lost a race with another writer: wait a little.
            self.forget(key);
            if !from_memory {
                attempt += 1;
                if attempt == ENTRY_ATTEMPTS {
                    return Err(unavailable("too many concurrent updates"));
                }
                lost_a_race(attempt).await;
            }
        }
    }

    /// Drops the pending `push` at `key`, read at `revision`, before it goes out: deleted, or
    /// made again the withdrawal it took the place of (a ticket first, as for every entry).
    /// `None` when the entry changed meanwhile; else what is left of it: nothing, or that
    /// withdrawal's newest message and its entry's revision.
    async fn drop_entry(
        &self,
        kv: &kv::Store,
        key: &str,
        push: &PendingPush,
        revision: u64,
        now_ms: i64,
    ) -> Result<Option<Option<(SignalId, u64)>>, BusError> {
        let Some(withdrawal) = push.dropped(now_ms) else {
            // Its ticket finds the entry gone, and is dropped.
            if kv.delete_expect_revision(key, Some(revision)).await.is_ok() {
                self.forget(key);
                return Ok(Some(None));
            }
            return Ok(None);
        };
        self.ticket(key, withdrawal.due_ms).await?;
        let value: bytes::Bytes = serde_json::to_vec(&withdrawal)?.into();
        match kv.update(key, value, revision).await {
            Ok(revision) => {
                let newest = withdrawal.newest;
                self.remember(key, withdrawal, revision);
                Ok(Some(Some((newest, revision))))
            }
            Err(_) => Ok(None),
        }
    }

    /// Forgets the push sent to `user` in `chat` if `covered` says it is to be withdrawn, and queues
    /// its withdrawal unless it is forgotten by now; says whether it queued one. Called once
    /// nothing is pending for the chat but, with `waiting`, a withdrawal up to that message at
    /// that revision, which the new one replaces (it withdraws up to the newer of the two). A
    /// withdrawal that cannot be queued (an error) leaves the record, or puts it back, for the
    /// next read or deletion to try again.
    async fn withdraw_sent(
        &self,
        kv: &kv::Store,
        user: UserId,
        chat: ChatId,
        covered: impl FnOnce(&SentPush) -> bool,
        now_ms: i64,
        waiting: Option<(SignalId, u64)>,
    ) -> Result<bool, BusError> {
        let key = key(user, chat);
        let sent = self.sent.store().await.map_err(unavailable)?;
        let Some(entry) = sent.entry(&key).await.map_err(unavailable)? else {
            return Ok(false);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(false);
        }
        let Ok(record) = serde_json::from_slice::<SentPush>(&entry.value) else {
            return Ok(false);
        };
        if !covered(&record) {
            return Ok(false);
        }
        if record.forget_ms <= now_ms {
            // Too old to withdraw: the record goes, as its age would take it.
            let _ = sent
                .delete_expect_revision(&key, Some(entry.revision))
                .await;
            return Ok(false);
        }
        let mut withdrawal =
            PendingPush::withdrawal(user, chat, record.newest, record.author, now_ms);
        if let Some((newest, _)) = waiting {
            withdrawal.newest = withdrawal.newest.max(newest);
        }
        let value: bytes::Bytes = serde_json::to_vec(&withdrawal)?.into();
        // The ticket first, as for every entry, and before the record is deleted: a ticket that
        // cannot be put leaves the record for the next read or deletion, and one whose entry is
        // then not created finds none and is dropped (or finds a push created meanwhile, not
        // due yet, and comes back when it is).
        self.ticket(&key, withdrawal.due_ms).await?;
        // Whoever deletes the record queues the withdrawal; a concurrent cancel does not.
        if sent
            .delete_expect_revision(&key, Some(entry.revision))
            .await
            .is_err()
        {
            return Ok(false);
        }
        let created = match waiting {
            Some((_, revision)) => match kv.update(&key, value.clone(), revision).await {
                Ok(revision) => Ok(revision),
                // Claimed meanwhile (on its way to the devices): a withdrawal of its own.
                Err(error) if error.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    kv.create(&key, value).await
                }
                Err(error) => Err(error.into()),
            },
            None => kv.create(&key, value).await,
        };
        let queued = match created {
            Ok(_) => Ok(true),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(error) => Err(unavailable(error)),
        };
        if !matches!(queued, Ok(true)) {
            // Deleted, and its withdrawal not queued (an error, or a push created meanwhile,
            // which may yet be cancelled before it replaces the notification): the record goes
            // back, so that the next read or deletion withdraws the notification, which would
            // otherwise stay for good. Not over the record of a push sent since (`create`),
            // which replaced it. Should the withdrawal have been written after all (its answer
            // lost), or the record have been read and deleted by another node meanwhile, the
            // next read sends one more withdrawal of what it announced, which changes nothing on
            // a device.
            if let Err(error) = sent.create(&key, entry.value.clone()).await
                && error.kind() != kv::CreateErrorKind::AlreadyExists
            {
                tracing::warn!(%error, "a sent push's record was lost with its withdrawal");
            }
        }
        queued
    }

    /// Takes the preview off the pending push at `key`, if it has one; says whether it did.
    async fn drop_preview(&self, kv: &kv::Store, key: &str) -> Result<bool, BusError> {
        let _turn = self.entry_turns.turn(key).await;
        for attempt in 0..ENTRY_ATTEMPTS {
            if attempt > 0 {
                lost_a_race(attempt).await;
            }
            let Some((mut push, revision)) = self.pending(kv, key).await? else {
                return Ok(false);
            };
            if push.preview.take().is_none() {
                return Ok(false);
            }
            let value: bytes::Bytes = serde_json::to_vec(&push)?.into();
            // The entry's ticket is out already, and its due time stays: nothing else to write.
            if let Ok(revision) = kv.update(key, value, revision).await {
                self.remember(key, push, revision);
                return Ok(true);
            }
            // Changed meanwhile (a schedule, a claim): look again.
            self.forget(key);
        }
        Err(unavailable("too many concurrent updates"))
    }

    /// What this node last wrote to `key`'s entry, and its revision.
    fn remembered(&self, key: &str) -> Option<(PendingPush, u64)> {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
    }

    fn remember(&self, key: &str, push: PendingPush, revision: u64) {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        if written.len() >= REMEMBERED_ENTRIES_MAX && !written.contains_key(key) {
            written.clear();
        }
        written.insert(key.to_owned(), (push, revision));
    }

    /// Where the schedule `id` of `key` stands: taken along by a write, or still queued and
    /// waiting for the entry's pace (until when), or due to be written.
    fn queued_schedule(&self, key: &str, id: u64) -> QueuedState {
        let mine_queued = self
            .queued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .is_some_and(|queued| queued.iter().any(|q| q.id == id));
        if !mine_queued {
            return QueuedState::Taken;
        }
        match self.paced_mut().get(key) {
            Some(at) if *at + SCHEDULE_PACE > tokio::time::Instant::now() => {
                QueuedState::Paced(*at + SCHEDULE_PACE)
            }
            _ => QueuedState::Due,
        }
    }

    fn paced_mut(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::time::Instant>> {
        self.paced.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn forget(&self, key: &str) {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
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
        loop {
            let (done, outcome) = tokio::sync::oneshot::channel();
            let id = self
                .next_schedule_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.queued
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(key.clone())
                .or_default()
                .push(QueuedSchedule {
                    id,
                    message: message.clone(),
                    due_ms,
                    expires_ms,
                    done,
                });
            let waiting = |queue: &Self| {
                queue
                    .queued
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(&key)
            };
            // The pace is waited for outside the turn: a turn's lock is shared by every key on
            // its stripe, which must not wait for this entry's pace. A write that started while
            // this schedule waited sets a later pace, so it is looked at again once the turn is
            // ours; and a write that took this schedule along ends its part.
            let turn = loop {
                match self.queued_schedule(&key, id) {
                    QueuedState::Taken => break None,
                    QueuedState::Paced(next_write) => {
                        tokio::time::sleep_until(next_write).await;
                        continue;
                    }
                    QueuedState::Due => {}
                }
                let turn = self.entry_turns.turn(&key).await;
                match self.queued_schedule(&key, id) {
                    QueuedState::Taken => break None,
                    QueuedState::Paced(_) => {}
                    QueuedState::Due => break Some(turn),
                }
            };
            if turn.is_some() {
                // Every schedule queued for the entry by now, this one among them.
                let batch = self
                    .queued
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&key)
                    .unwrap_or_default();
                let started = tokio::time::Instant::now();
                let written = self
                    .write_schedules(kv, &key, user, chat, &batch)
                    .await
                    .map_err(|e| e.to_string());
                // Overlapping: it carried more than one, or more came while it was written.
                let overlapping = batch.len() > 1 || waiting(self);
                let mut paced = self.paced_mut();
                if overlapping {
                    if paced.len() >= REMEMBERED_ENTRIES_MAX {
                        // Only entries written within the pace still hold anyone back.
                        paced.retain(|_, at| at.elapsed() < SCHEDULE_PACE);
                    }
                    paced.insert(key.clone(), started);
                } else {
                    paced.remove(&key);
                }
                drop(paced);
                for queued in batch {
                    let _ = queued.done.send(written.clone());
                }
            }
            drop(turn);
            match outcome.await {
                Ok(written) => return written.map_err(unavailable),
                // The request whose turn carried it was dropped mid-write: queue it again. (Its
                // write may have landed; then the entry counts this message twice, which only
                // the notification's count shows.)
                Err(_) => continue,
            }
        }
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
        let _turn = self.entry_turns.turn(&key).await;
        let mut outcome = Cancelled::Nothing;
        let mut settled = false;
        let mut waiting = None;
        for attempt in 0..ENTRY_ATTEMPTS {
            if attempt > 0 {
                lost_a_race(attempt).await;
            }
            match self.pending(kv, &key).await? {
                Some((push, revision))
                    if push.kind == PushKind::Messages && push.newest <= up_to =>
                {
                    if let Some(left) = self.drop_entry(kv, &key, &push, revision, now_ms).await? {
                        outcome = Cancelled::Pending;
                        if left.is_some() {
                            // The withdrawal it took the place of, again on its way.
                            outcome = Cancelled::Withdrawn;
                            waiting = left;
                        }
                        settled = true;
                        break;
                    }
                    // Changed meanwhile: look again.
                    self.forget(&key);
                }
                // A withdrawal on its way: widened to a push sent since that this read covers.
                Some((push, revision)) if push.kind == PushKind::Withdrawal => {
                    waiting = Some((push.newest, revision));
                    settled = true;
                    break;
                }
                // Newer than what was read: nothing to do.
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
        // Nothing pending any more (but perhaps a withdrawal): a sent push that was read is
        // withdrawn.
        if self
            .withdraw_sent(kv, user, chat, |sent| sent.newest <= up_to, now_ms, waiting)
            .await?
        {
            outcome = Cancelled::Withdrawn;
        }
        Ok(outcome)
    }

    async fn message_deleted(
        &self,
        user: UserId,
        chat: ChatId,
        deleted: SignalId,
        now_ms: i64,
    ) -> Result<Cancelled, BusError> {
        let kv = self.kv().await?;
        let key = key(user, chat);
        let _turn = self.entry_turns.turn(&key).await;
        for attempt in 0..ENTRY_ATTEMPTS {
            if attempt > 0 {
                lost_a_race(attempt).await;
            }
            let (push, revision) = match self.pending(kv, &key).await? {
                Some((push, revision)) if push.kind == PushKind::Messages => (push, revision),
                // Nothing pending, or a withdrawal on its way (widened to the push): a push sent
                // announcing it is withdrawn.
                waiting => {
                    let waiting =
                        waiting.map(|(withdrawal, revision)| (withdrawal.newest, revision));
                    let withdrawn = self
                        .withdraw_sent(
                            kv,
                            user,
                            chat,
                            |sent| sent.newest == deleted,
                            now_ms,
                            waiting,
                        )
                        .await?;
                    return Ok(if withdrawn {
                        Cancelled::Withdrawn
                    } else {
                        Cancelled::Nothing
                    });
                }
            };
            match push.after_deletion(deleted) {
                AfterDeletion::Untouched => return Ok(Cancelled::Nothing),
                AfterDeletion::Dropped(push) => {
                    if let Some(waiting) =
                        self.drop_entry(kv, &key, &push, revision, now_ms).await?
                    {
                        // The push dropped would have replaced the notification on screen, which
                        // may show a message deleted while this one waited: nothing replaces it
                        // now, so it is withdrawn.
                        self.withdraw_sent(
                            kv,
                            user,
                            chat,
                            |sent| sent.newest <= deleted,
                            now_ms,
                            waiting,
                        )
                        .await?;
                        return Ok(Cancelled::Pending);
                    }
                }
                // The entry's ticket is out already, and its due time stays.
                AfterDeletion::Narrowed(push) => {
                    let value: bytes::Bytes = serde_json::to_vec(&push)?.into();
                    if let Ok(revision) = kv.update(&key, value, revision).await {
                        self.remember(&key, push, revision);
                        return Ok(Cancelled::Narrowed);
                    }
                }
            }
            // Changed meanwhile: look again.
            self.forget(&key);
        }
        Err(unavailable("too many concurrent updates"))
    }

    async fn drop_pending(&self, user: UserId, chat: ChatId) -> Result<bool, BusError> {
        let kv = self.kv().await?;
        let key = key(user, chat);
        let _turn = self.entry_turns.turn(&key).await;
        for attempt in 0..ENTRY_ATTEMPTS {
            if attempt > 0 {
                lost_a_race(attempt).await;
            }
            match self.pending(kv, &key).await? {
                Some((push, revision)) if push.kind == PushKind::Messages => {
                    // The withdrawal it took the place of stays, as any other would.
                    let now_ms = crate::presence::now_ms();
                    if self
                        .drop_entry(kv, &key, &push, revision, now_ms)
                        .await?
                        .is_some()
                    {
                        return Ok(true);
                    }
                    // Changed meanwhile: look again.
                    self.forget(&key);
                }
                Some(_) | None => return Ok(false),
            }
        }
        Err(unavailable("too many concurrent updates"))
    }

    async fn drop_previews(&self, user: UserId) -> Result<usize, BusError> {
        let kv = self.kv().await?;
        // The keys of the user's entries (deleted ones among them, until written again), one
        // request per page of subjects: no entry of anyone else is read.
        let keys: Vec<String> = kv
            .stream
            .info_with_subjects(format!("{}{}>", kv.prefix, user_prefix(user)))
            .await
            .map_err(unavailable)?
            .map(|subject| {
                subject.map(|(subject, _)| {
                    subject
                        .strip_prefix(kv.prefix.as_str())
                        .unwrap_or(&subject)
                        .to_owned()
                })
            })
            .try_collect()
            .await
            .map_err(unavailable)?;
        let changed: Vec<Result<bool, BusError>> = futures::stream::iter(keys)
            .map(|key| async move { self.drop_preview(kv, &key).await })
            .buffer_unordered(TICKETS_IN_FLIGHT)
            .collect()
            .await;
        let mut count = 0;
        for one in changed {
            count += usize::from(one?);
        }
        Ok(count)
    }

    async fn claim_due(&self, now_ms: i64, limit: usize) -> Result<Claimed, BusError> {
        // Tickets a fetch brings may not be due yet (held until due) or find their entry gone
        // (cancelled), so what says more may wait is a full fetch, not the number of pushes it
        // claimed.
        let (pushes, full) = self.claim_batch(now_ms, limit).await?;
        Ok(Claimed { pushes, more: full })
    }

    async fn release(&self) {
        let held: Vec<Held> =
            std::mem::take(&mut *self.held.lock().unwrap_or_else(|e| e.into_inner())).into_vec();
        let now = crate::presence::now_ms();
        futures::future::join_all(held.into_iter().map(
            |Held {
                 due_ms: due,
                 ticket,
             }| async move {
                // Back to the stream, to come again at its due time to whichever node asks then.
                let delay = Duration::from_millis(u64::try_from(due - now).unwrap_or(0));
                if let Err(error) = ticket.ack_with(AckKind::Nak(Some(delay))).await {
                    // Unanswered, it comes back after the ack wait: late, not lost.
                    self.unanswered
                        .warn("answer", &error, "held push ticket not handed back");
                }
            },
        ))
        .await;
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use async_nats::jetstream::AckKind;

    use super::{
        CREATE_GRACE_MS, CREATE_RECHECK_MS, Decision, LEAD_MS, OUTAGE_REMINDER, OutageLog, Tell,
        Ticket, no_entry, not_yet, schedule_time,
    };

    /// A ticket due later comes by schedule, the lead before its due time rounded up to a whole
    /// second; one due within about a second of that goes to the due subject at once.
    #[test]
    fn a_ticket_due_later_is_scheduled_a_lead_before_its_time() {
        // 2026-12-06T00:00:00Z
        let midnight = 1_796_515_200_000;
        let now = midnight - 60_000;
        assert_eq!(
            schedule_time(midnight + LEAD_MS, now).as_deref(),
            Some("@at 2026-12-06T00:00:00Z")
        );
        assert_eq!(
            schedule_time(midnight + LEAD_MS - 1, now).as_deref(),
            Some("@at 2026-12-06T00:00:00Z"),
            "rounded up, never earlier than the lead"
        );
        assert_eq!(
            schedule_time(midnight + LEAD_MS + 1, now).as_deref(),
            Some("@at 2026-12-06T00:00:01Z")
        );
        assert_eq!(schedule_time(now + LEAD_MS + 500, now), None, "due soon");
        assert_eq!(schedule_time(now - 5_000, now), None, "due already");
    }

    /// An outage is told once when it starts, then at most once per reminder period with how many
    /// failed since, and its end once; the next failure starts a new one.
    #[test]
    fn failures_are_told_once_per_outage() {
        let log = OutageLog::default();
        let start = std::time::Instant::now();
        assert_eq!(log.succeeded(start), None, "no outage to end");
        assert_eq!(log.failed(start), Tell::First);
        for i in 1..1_000 {
            assert_eq!(
                log.failed(start + Duration::from_millis(i)),
                Tell::Nothing,
                "failure {i}"
            );
        }
        assert_eq!(log.failed(start + OUTAGE_REMINDER), Tell::Still(1_000));
        assert_eq!(log.failed(start + OUTAGE_REMINDER), Tell::Nothing);
        let end = start + OUTAGE_REMINDER * 2;
        assert_eq!(log.succeeded(end), Some((1_002, OUTAGE_REMINDER * 2)));
        assert_eq!(log.succeeded(end), None, "told once");
        assert_eq!(log.failed(end), Tell::First, "a new outage");
    }

    #[test]
    fn a_ticket_within_the_horizon_is_held_and_a_later_one_comes_back_before_it_is_due() {
        let now = 1_796_000_000_000;
        assert!(
            matches!(not_yet(now + 10_000, now, 20_000), Decision::Hold(due) if due == now + 10_000)
        );
        assert!(matches!(
            not_yet(now + 20_000, now, 20_000),
            Decision::Hold(_)
        ));
        match not_yet(now + 60_000, now, 20_000) {
            Decision::Answer(None, AckKind::Nak(Some(back))) => {
                assert_eq!(
                    back,
                    Duration::from_millis(u64::try_from(60_000 - LEAD_MS).unwrap())
                );
            }
            _ => panic!("handed back with a delay"),
        }
        // A horizon shorter than the lead still holds what is due within the lead.
        assert!(matches!(not_yet(now + 1_000, now, 0), Decision::Hold(_)));
    }

    #[test]
    fn a_ticket_carries_its_due_time_and_old_ones_still_read() {
        let key = "4f8c2b1e-0000-4000-8000-000000000001.0190c2b1-0000-7000-8000-000000000002";
        let parsed = Ticket::parse(&Ticket::payload(key, 1_796_000_000_123, 1_796_000_000_001));
        assert_eq!(parsed.key, key);
        assert_eq!(parsed.due_ms, Some(1_796_000_000_123));
        assert_eq!(parsed.published_ms, Some(1_796_000_000_001));
        let due_only = Ticket::parse(format!("{key} 1796000000123").as_bytes());
        assert_eq!(due_only.key, key);
        assert_eq!(due_only.due_ms, Some(1_796_000_000_123));
        assert_eq!(due_only.published_ms, None);
        let old = Ticket::parse(key.as_bytes());
        assert_eq!(old.key, key);
        assert_eq!(old.due_ms, None);
    }

    /// A ticket that finds no entry is dropped, unless it was published within the grace (its
    /// entry's create may still be on its way): then it comes back, a little later each time,
    /// never past the grace. One of an older version (no publication time) is dropped.
    #[test]
    fn a_young_ticket_that_finds_no_entry_comes_back() {
        let published = 1_796_000_000_000;
        let back = |now: i64| match no_entry(Some(published), now) {
            AckKind::Nak(Some(delay)) => Some(i64::try_from(delay.as_millis()).unwrap()),
            AckKind::Ack => None,
            _ => panic!("acknowledged or handed back"),
        };
        assert_eq!(back(published + 2), Some(CREATE_RECHECK_MS));
        assert_eq!(back(published + 1_000), Some(1_000));
        assert_eq!(back(published + CREATE_GRACE_MS - 300), Some(300));
        assert_eq!(back(published + CREATE_GRACE_MS), None);
        assert!(matches!(no_entry(None, published), AckKind::Ack));
        // Published by a clock ahead of this node's: as young as can be.
        assert_eq!(back(published - 5), Some(CREATE_RECHECK_MS));
    }
}
