//! Routes the event log to the connections on this node, and opens each connection's stream at the
//! right place: now, or exactly after the last event its client saw.
//!
//! Routing is by interest, not by recipient lists: a connection is registered for the chats its
//! user is in (read once when it opens, through [`Membership`]), and the membership changes in the
//! log itself (an envelope's `joined` and `left`) keep that set current, in log order. An event is
//! rendered once per node and the same bytes are shared by every connection that receives it.
//!
//! Opening a stream without a gap or a duplicate (see `docs/ARCHITECTURE.md`, "Resume"):
//! 1. the connection registers as *pending*: it receives every event the node dispatches, in a
//!    channel of its own that no full buffer drops it for (it notes that it missed some instead),
//!    and the hub notes its user's membership changes;
//! 2. the user's chats are read;
//! 3. the connection is *installed*: the hub applies the noted changes to those chats, routes by
//!    them from now on, and answers the sequence `installed_at` of the last event it dispatched;
//! 4. a fresh stream delivers the pending events of the user's chats (filtered by [`visible`]),
//!    or, when its pending channel filled, those events read from the log instead, then everything
//!    routed to it. A resumed stream replays the log after the client's last id up
//!    to `installed_at` instead, and then skips what it replayed: of the chats the user is in, and
//!    of those they left recently ([`Membership::left_chats_of`]), up to the event that took them
//!    out, as the stream would have delivered them had it stayed open. Of its pending events it
//!    delivers the ephemeral ones (typing, presence, call signalling), which no log keeps.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use confab_runtime::bus::{Bus, BusError, ChatFilter, ReadError, SCAN_FACTOR};
use confab_runtime::config::RateLimit;
use confab_runtime::kv_bucket::EntryTurns;
use confab_runtime::limits::{KeyedLimit, Limited};
use confab_runtime::presence::{Change, HEARTBEAT_EVERY, Presence, PresenceRecord, now_ms};
use confab_runtime::revocation::{Revocation, Revocations};
use confab_runtime::telemetry::ReadinessCheck;
use confab_schema::{ChatId, Envelope, Event, LoggedEvent, UserId};
use futures::StreamExt;
use futures::future::BoxFuture;
use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A resume reads the log this many of its events at a time, the next page when its client has
/// taken the last: what a resume holds does not grow with `replay_limit`.
pub const REPLAY_PAGE: usize = 64;

/// A user's presence events go out at most this often.
pub const PRESENCE_EVENT_INTERVAL: Duration = Duration::from_secs(2);
/// A presence event goes to at most this many of the user's chats.
pub const MAX_PRESENCE_FANOUT: usize = 1_000;

/// A resume reads the chats a user left while away from at most this many of their most recent
/// leavings (see [`Membership::left_chats_of`]): the log is read filtered by chat, and this keeps
/// the filter, and the read of the leavings, bounded. A chat left before that many others gives a
/// resume nothing, not even its `member.left`.
pub const MAX_LEFT_CHATS_REPLAYED: usize = 200;

/// A resume reads the chats a user left from this long before the time of the event it resumes
/// after, not only from that time: the processes that stamp events and record leavings keep
/// clocks of their own, and a leaving's `member.left` can reach the log a while after the store
/// recorded it (a publish retried). A chat left earlier than that was out of the user's stream
/// before the position: none of its events in the range is theirs.
pub const LEFT_BEFORE_POSITION_MARGIN: Duration = Duration::from_secs(120);

/// How far apart a resume allows the clocks of two processes to be (the api process that recorded
/// a leaving and stamped its `member.left`, the one that stamped the event the client resumes
/// after, the log's) and still delivers every event of a chat the user was in. A chat whose
/// leaving was recorded more than this before the time of the event resumed after was out of
/// the stream before the position. One left closer to it than this is decided by the log: by
/// the user's last change of the chat shortly before the position ([`LEFT_AROUND_LOOKBACK`]),
/// else by when the log appended their first `member.left` of the chat in the range, which a late
/// copy of a leaving made before the position reaches no sooner than the log's duplicate window
/// after its original did (see [`ReplayMembership::left_around_position`]). So this is also
/// taken from the duplicate window to tell an original from a copy: half the default window (with
/// a window of this or less, every such chat the log before the position does not decide is out at
/// the start).
pub const CLOCK_SKEW_TOLERANCE: Duration = Duration::from_secs(60);

/// How many events of the log before the position a resume looks through for the user's last
/// membership change of each chat left around the position (see [`CLOCK_SKEW_TOLERANCE`]): found
/// there, it says whether they were a member at the position exactly as their stream had it,
/// whatever the clocks. Only what is not found there is left to the log's times.
pub const LEFT_AROUND_LOOKBACK: usize = 1_000;

/// A chat a user stopped being a member of, and when the store recorded it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeftChat {
    pub chat_id: ChatId,
    pub left_at: OffsetDateTime,
}

/// Where a notifier learns which chats a user is in, when one of their connections opens.
#[async_trait]
pub trait Membership: Send + Sync + 'static {
    async fn chats_of(&self, user: UserId) -> Result<Vec<ChatId>, String>;
    /// The chats `user` stopped being a member of (they left, were removed, or the chat was
    /// removed) at or after `since` and as far back as the log keeps events: those of their
    /// `limit` most recent leavings, newest first, each with the time of its latest leaving. Read
    /// after [`Membership::chats_of`]: a leaving is recorded before the chat stops being listed
    /// there, so a chat the user was in when the first read began is in one of the two answers.
    async fn left_chats_of(
        &self,
        user: UserId,
        since: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<LeftChat>, String>;
}

/// An event rendered once for every connection on this node that receives it.
#[derive(Debug)]
pub struct Outgoing {
    /// Its sequence in the log; 0 for an ephemeral event, which has none (and no id on the wire).
    pub seq: u64,
    pub envelope: Envelope,
    /// The whole SSE event (`id:` unless ephemeral, `event:`, `data:` with `{"type", "data"}`).
    /// Reference counted: every stream sends these same bytes, none copies them.
    pub sse_frame: bytes::Bytes,
    /// `{"type": "event", "id": …, "event": …, "data": …}`: a WebSocket text frame. Reference
    /// counted: every socket sends these same bytes, none copies them.
    pub ws_frame: axum::extract::ws::Utf8Bytes,
}

#[derive(Serialize)]
struct WsEventFrame<'a> {
    r#type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    event: &'static str,
    chat_id: &'a serde_json::Value,
    data: &'a serde_json::Value,
}

impl Outgoing {
    pub fn render(event: LoggedEvent) -> Outgoing {
        let client = event.envelope.client_json();
        let ws_frame = serde_json::to_string(&WsEventFrame {
            r#type: "event",
            id: (event.seq > 0).then(|| event.seq.to_string()),
            event: event.envelope.event.kind().as_str(),
            chat_id: &client["chat_id"],
            data: &client["data"],
        })
        .unwrap_or_default();
        let kind = event.envelope.event.kind().as_str();
        // `client` is one line of JSON (serde_json escapes newlines), so one `data:` line holds it.
        let sse_frame = if event.seq > 0 {
            format!("id: {}\nevent: {kind}\ndata: {client}\n\n", event.seq)
        } else {
            format!("event: {kind}\ndata: {client}\n\n")
        };
        Outgoing {
            seq: event.seq,
            sse_frame: sse_frame.into(),
            ws_frame: ws_frame.into(),
            envelope: event.envelope,
        }
    }
}

/// What a stream carries.
#[derive(Clone, Debug)]
pub enum Item {
    Event(Arc<Outgoing>),
    /// The stream could not resume where the client asked: it must re-read its chats and their
    /// history. Events after this one continue normally.
    Reset {
        reason: &'static str,
        /// The position the stream stands at: it delivers the events after this sequence, so a
        /// client that drops before its next event resumes from here (the reset's id), not from
        /// the id it could not resume from, which would only get it another reset.
        at: u64,
    },
    /// The hub ended the stream, for this reason, and the client should not reconnect on its own.
    /// The last item: `replaced` (a newer stream of the same user took its place, see [`Caps`]).
    Closed(&'static str),
}

/// Why the hub ended a stream: a newer stream of its user took its place at the per-user cap.
pub const REPLACED: &str = "replaced";

struct Connection {
    user: UserId,
    /// The session of the token the stream was opened with, for logouts.
    session: StreamSession,
    sender: mpsc::Sender<Arc<Outgoing>>,
    /// While pending, where everything the node dispatches goes: not `sender`, which it is
    /// dropped for filling. It fills with the events of every chat, not only its user's, for as
    /// long as the reads of its open take, so a full one only notes `missed_while_pending` (and
    /// its events are read from the log). Dropped at the install.
    pending_sender: Option<mpsc::Sender<Arc<Outgoing>>>,
    /// Its pending channel was full when a logged event came: what it holds is not the whole
    /// range up to the install.
    missed_while_pending: bool,
    /// `None` while pending: it receives everything, and `changes` notes its user's membership
    /// changes (chat, joined) until it is installed.
    chats: Option<HashSet<ChatId>>,
    changes: Vec<(ChatId, bool)>,
    /// Set by the hub before it drops `sender` when the stream's end has a reason its client is
    /// told ([`Item::Closed`]); shared with the [`Registration`].
    end: Arc<OnceLock<&'static str>>,
}

#[derive(Default)]
struct Routes {
    connections: HashMap<u64, Connection>,
    by_chat: HashMap<ChatId, HashSet<u64>>,
    by_user: HashMap<UserId, Vec<u64>>,
    pending: HashSet<u64>,
    /// The sequence of the last event dispatched.
    last_seq: u64,
}

impl Routes {
    /// Removes connection `id`, answering it and whether it was its user's last on this node.
    fn take(&mut self, id: u64) -> Option<(Connection, bool)> {
        let connection = self.connections.remove(&id)?;
        self.pending.remove(&id);
        for chat in connection.chats.iter().flatten() {
            if let Some(set) = self.by_chat.get_mut(chat) {
                set.remove(&id);
                if set.is_empty() {
                    self.by_chat.remove(chat);
                }
            }
        }
        let mut last = true;
        if let Some(list) = self.by_user.get_mut(&connection.user) {
            list.retain(|c| *c != id);
            last = list.is_empty();
            if last {
                self.by_user.remove(&connection.user);
            }
        }
        Some((connection, last))
    }

    /// Applies a membership change of `user` in `chat` to their connections.
    fn change(&mut self, user: UserId, chat: ChatId, joined: bool) {
        for id in self.by_user.get(&user).cloned().unwrap_or_default() {
            let Some(connection) = self.connections.get_mut(&id) else {
                continue;
            };
            match &mut connection.chats {
                None => connection.changes.push((chat, joined)),
                Some(chats) if joined => {
                    chats.insert(chat);
                    self.by_chat.entry(chat).or_default().insert(id);
                }
                Some(chats) => {
                    chats.remove(&chat);
                    if let Some(set) = self.by_chat.get_mut(&chat) {
                        set.remove(&id);
                        if set.is_empty() {
                            self.by_chat.remove(&chat);
                        }
                    }
                }
            }
        }
    }
}

/// The provider session a stream was opened in, so a logout can end it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamSession {
    /// The token's `sid`.
    pub id: Option<String>,
    /// When the token was issued (Unix seconds); 0 when unknown.
    pub issued_at: i64,
}

/// Why a stream could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the session has ended")]
    Revoked,
    #[error("this node's event subscription is down")]
    NotReady,
    #[error("this node holds as many streams as it may")]
    NodeFull,
    #[error("membership unavailable: {0}")]
    Membership(String),
    /// The user opened or resumed too many streams lately (`limits.stream_opens`).
    #[error(transparent)]
    Limited(#[from] Limited),
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The stream a resume was to take the place of has ended already (replaced by a newer
    /// stream, dropped): its socket closes, and must not take another stream's place.
    #[error("the stream to resume has ended")]
    Ended,
}

/// How many streams a node, and a user on it, may hold.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// More streams are refused ([`OpenError::NodeFull`]), except one that takes the place of its
    /// user's oldest (which leaves the count as it is).
    pub per_node: usize,
    /// A user's stream beyond this takes the place of their oldest on the node, which ends with
    /// [`Item::Closed`]`(`[`REPLACED`]`)`: a client whose earlier connections died unnoticed (a
    /// phone that changed networks, a half-open TCP connection) is never locked out by them. At
    /// least 1.
    pub per_user: usize,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            per_node: 200_000,
            per_user: 32,
        }
    }
}

/// The connections on this node.
#[derive(Clone)]
pub struct Hub {
    routes: Arc<RwLock<Routes>>,
    presence: Arc<dyn Presence>,
    /// This node's id in presence records.
    node: Arc<str>,
    /// When each user's last presence event went out, and whether a catch-up one is scheduled.
    presence_events: Arc<Mutex<HashMap<UserId, (Instant, bool)>>>,
    /// This node's writes of one user's presence record take turns (see [`Hub::record_presence`]).
    presence_turns: Arc<EntryTurns>,
    next_id: Arc<AtomicU64>,
    buffer: usize,
    replay_limit: usize,
    caps: Caps,
    /// Stream opens and resumes per user: each reads the store, and a resume the log.
    stream_opens: Arc<KeyedLimit<UserId>>,
    alive: Arc<AtomicBool>,
    bus: Arc<dyn Bus>,
    membership: Arc<dyn Membership>,
    /// Logouts: the streams they name end at once.
    revocations: Option<Arc<Revocations>>,
    /// How long the log recognises a re-published event id (`bus.duplicate_window_secs`): a copy
    /// of an event it keeps lands at least this long after the original.
    duplicate_window: Duration,
}

/// A connection's place in the hub; dropping it unregisters the connection.
struct Registration {
    hub: Hub,
    id: u64,
    /// The user had no other connection on this node.
    first_on_node: bool,
    /// The last sequence dispatched before it was registered: it receives what comes after.
    after: u64,
    events: mpsc::Receiver<Arc<Outgoing>>,
    /// What the node dispatched while it was pending (see [`Connection::pending_sender`]).
    pending_events: mpsc::Receiver<Arc<Outgoing>>,
    /// Why the hub ended it, if it said (see [`Connection::end`]).
    end: Arc<OnceLock<&'static str>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let taken = match self.hub.routes.write() {
            Ok(mut routes) => routes.take(self.id),
            Err(_) => None,
        };
        // `None`: the hub removed it already (it fell behind, its session logged out, a newer stream
        // of its user replaced it, or the node's subscription ended), and announced that removal.
        if let Some(removed) = taken {
            self.hub.closed(vec![removed]);
        }
    }
}

/// One client's stream of events.
pub struct Subscription {
    registration: Registration,
    /// What goes first: a reset, or the events that reached it while it opened.
    queue: VecDeque<Item>,
    /// The rest of a resume's replay, read from the log a page at a time as the client takes it.
    replay: Option<Replay>,
    /// The events routed to it while it opened, after the replay.
    routed: VecDeque<Item>,
    /// Routed events up to this sequence were replayed already.
    skip_up_to: u64,
    /// Whether it resumes after a client's last event id.
    resumed: bool,
    /// Its [`Item::Closed`] was handed out.
    told_end: bool,
    /// Its replay could not be read to the end: it ends, and its client resumes.
    interrupted: bool,
}

impl Subscription {
    /// For a fresh stream, the position it starts after: it delivers the user's events after
    /// this sequence, so a client that received none yet resumes from here (the `ready` event's
    /// id). `None` for a resumed stream, whose client has its own last id.
    pub fn fresh_after(&self) -> Option<u64> {
        (!self.resumed).then_some(self.registration.after)
    }

    /// Moves the stream to `session`, the session of a token that refreshed the client's: from
    /// now on a logout of that session ends it, and one of the session it was opened in does not.
    /// A logout of `session` that came after its token was checked ends it at once, as in
    /// [`Hub::open_in`].
    pub fn renew(&self, session: StreamSession) {
        self.registration.hub.renew(self.registration.id, session);
    }

    /// The next item, or `None` when the hub dropped this connection (it fell behind, its session
    /// logged out, or the node is shutting down): the client reconnects and resumes. A stream the
    /// hub ended with a reason its client must hear ([`REPLACED`]) gives the events it holds, then
    /// [`Item::Closed`], then `None`. A stream dropped while it replays ends at once (after
    /// [`Item::Closed`] when it has such a reason): what it held would follow a gap.
    ///
    /// Cancel safe: a replay page's read goes on where it was at the next call, and is taken
    /// whole or not at all, so a `select!` may drop this.
    pub async fn next(&mut self) -> Option<Item> {
        if self.interrupted {
            return None;
        }
        if let Some(item) = self.queue.pop_front() {
            return Some(item);
        }
        while let Some(replay) = &mut self.replay {
            if self.registration.events.is_closed() {
                // The hub dropped this connection (its session logged out, it fell behind, it
                // was replaced, the node is shutting down): the rest of the replay is not this
                // stream's to send. It ends here, as after a failed read of the log, so that a
                // client that resumes does so after the last event it took: the events routed
                // meanwhile would follow a gap.
                self.replay = None;
                self.routed.clear();
                self.interrupted = true;
                let reason = self.registration.end.get().filter(|_| !self.told_end)?;
                self.told_end = true;
                return Some(Item::Closed(reason));
            }
            // Rendered only now: a page holds envelopes, not three copies of each.
            if let Some(event) = replay.page.pop_front() {
                return Some(Item::Event(Arc::new(Outgoing::render(event))));
            }
            if replay.position >= replay.up_to {
                self.replay = None;
                break;
            }
            let reading = replay.reading.get_or_insert_with(|| {
                let bus = Arc::clone(&self.registration.hub.bus);
                let chats = Arc::clone(&replay.chats);
                let (position, up_to, max_scan) = (replay.position, replay.up_to, replay.max_scan);
                tokio::spawn(async move {
                    bus.read_page(
                        position,
                        up_to,
                        ChatFilter::Only(&chats),
                        REPLAY_PAGE,
                        max_scan,
                    )
                    .await
                })
            });
            let read = reading.await.unwrap_or_else(|error| {
                Err(ReadError::Bus(BusError::Unavailable(format!(
                    "a replay read ended: {error}"
                ))))
            });
            replay.reading = None;
            match read {
                Ok(page) if page.through > replay.position => {
                    replay.position = page.through;
                    let (user, current) = (replay.user, &replay.current);
                    replay.page.extend(
                        page.events
                            .into_iter()
                            .filter(|e| replay.membership.admits(user, &e.envelope, current)),
                    );
                }
                // No progress: the log ends before where it ended when the resume was checked.
                Ok(_) => self.replay = None,
                // The log dropped what is left since the resume was checked: the client re-reads.
                Err(
                    error @ (ReadError::Expired(_) | ReadError::Unknown(_) | ReadError::TooMany(_)),
                ) => {
                    // What follows is routed: the events after the end of the replay.
                    let at = replay.up_to;
                    self.replay = None;
                    metrics::counter!("confab_notifier_resets_total").increment(1);
                    let reason = match error {
                        ReadError::Expired(_) => "expired",
                        _ => "too-far-behind",
                    };
                    return Some(Item::Reset { reason, at });
                }
                // The client resumes after the last event it took, on this node or another.
                Err(ReadError::Bus(error)) => {
                    tracing::debug!(%error, "replay interrupted; the stream ends");
                    self.replay = None;
                    self.routed.clear();
                    self.interrupted = true;
                    return None;
                }
            }
        }
        if let Some(item) = self.routed.pop_front() {
            return Some(item);
        }
        loop {
            let Some(event) = self.registration.events.recv().await else {
                // The hub sets the reason before it drops the sender, so it is set by now.
                let reason = self.registration.end.get().filter(|_| !self.told_end)?;
                self.told_end = true;
                return Some(Item::Closed(reason));
            };
            if event.seq == 0 || event.seq > self.skip_up_to {
                return Some(Item::Event(event));
            }
        }
    }
}

/// Which of `events` (in log order) the user receives: a chat's events while they were a member,
/// the event that took them out included, as their stream routes them live (and so any
/// `member.left` naming them, which the live stream hands them in or out of the chat). Their first
/// membership change of a chat in the range tells whether they were a member at its start;
/// without one, they were a member all along if they are one at the end (`current`), and never
/// otherwise.
pub fn visible<T>(
    user: UserId,
    events: Vec<T>,
    envelope: impl Fn(&T) -> &Envelope,
    current: &HashSet<ChatId>,
) -> Vec<T> {
    let mut membership = ReplayMembership::default();
    for event in &events {
        membership.note_start(user, envelope(event));
    }
    events
        .into_iter()
        .filter(|event| membership.admits(user, envelope(event), current))
        .collect()
}

/// Whether a user is a member of each chat, followed through a range of the log (see
/// [`visible`]): first learnt from the whole range ([`ReplayMembership::note_start`]), then applied in
/// order ([`ReplayMembership::admits`]). Holds a flag per chat, not the events, so a replay can learn
/// it from one pass over the range and deliver from another.
#[derive(Default)]
struct ReplayMembership {
    member: HashMap<ChatId, bool>,
    /// The chats left around the position (see [`ReplayMembership::left_around_position`]), and
    /// what the log says of each.
    left_around: HashMap<ChatId, LeftAround>,
}

/// What the log says of a chat left around the position (see
/// [`ReplayMembership::left_around_position`]).
#[derive(Default)]
struct LeftAround {
    /// Whether the user was a member at the position, by their last change of the chat shortly
    /// before it; `None` when there is none.
    member_before: Option<bool>,
    /// The sequence and the time (its envelope's `at`) of the user's `member.left` that is the
    /// chat's first membership change in the range, if it is one.
    first_leaving: Option<(u64, OffsetDateTime)>,
}

impl ReplayMembership {
    /// Knowing already that the user was out of `chats` at the start of the range (the store
    /// recorded their leaving well before it): a `member.left` of theirs in it is a late copy of
    /// that leaving (a re-publish the log kept, past its duplicate window) or the leaving's own
    /// event arriving late, and lets nothing of the chat before it through.
    fn out_at_start(chats: impl IntoIterator<Item = ChatId>) -> ReplayMembership {
        ReplayMembership {
            member: chats.into_iter().map(|chat| (chat, false)).collect(),
            left_around: HashMap::new(),
        }
    }

    /// Notes `chats`, whose leaving the store recorded so close to the time of the event resumed
    /// after that the clocks cannot tell whether it came before or after it: the log decides. The
    /// user's last change of such a chat shortly before the position, if any, is how their stream
    /// had it ([`Hub::look_back`], [`ReplayMembership::known_at_start`]). Past that, what tells
    /// ([`ReplayMembership::decide_left_around`]) is the user's `member.left` that is the chat's
    /// first membership change in the range, if any. Its original publish reaches the
    /// log within moments of its making (its envelope's `at`), and a copy the log keeps (an outbox
    /// sweep or a retry, with the same envelope) no sooner than the duplicate window after the
    /// original: one the log appended within [`CLOCK_SKEW_TOLERANCE`] less than that window of its
    /// `at` is an original, so the user was a member until it, as their live stream routed them;
    /// one appended later may be a copy of a leaving the client's stream took before the position,
    /// so the chat was out at the start (a publish held back that long, by a crash before it, then
    /// costs its chat's events from the position up to it). Judged by the event's own `at`, not by
    /// the recorded time of the latest leaving, so that after a rejoin and another leaving, a late
    /// copy of the earlier one is still known for what it is. Without such an event, the chat is
    /// out at the start: the range has its joining first, or nothing of its membership at all.
    fn left_around_position(&mut self, chats: impl IntoIterator<Item = ChatId>) {
        self.left_around
            .extend(chats.into_iter().map(|chat| (chat, LeftAround::default())));
    }

    /// Notes whether the user was a member of chats left around the position at the start of the
    /// range, as `known` from their last change of each shortly before it in the log.
    fn known_at_start(&mut self, known: HashMap<ChatId, bool>) {
        for (chat, member) in known {
            if let Some(around) = self.left_around.get_mut(&chat) {
                around.member_before = Some(member);
            }
        }
    }

    /// Notes `event`, the next of the range in order, for [`ReplayMembership::note_start`] and
    /// [`ReplayMembership::left_around_position`].
    fn note_start_of(&mut self, user: UserId, event: &LoggedEvent) {
        let chat = event.envelope.chat_id;
        if event.envelope.left.contains(&user)
            && !event.envelope.joined.contains(&user)
            && !self.member.contains_key(&chat)
            && let Some(around) = self.left_around.get_mut(&chat)
        {
            around.first_leaving = Some((event.seq, event.envelope.at));
        }
        self.note_start(user, &event.envelope);
    }

    /// Decides the membership at the start of the chats left around the position, once the whole
    /// range is noted (see [`ReplayMembership::left_around_position`]), asking `bus`, for those
    /// the log before the position says nothing of, when it appended their first `member.left`.
    /// One read per such chat, and they are among the user's most recent leavings
    /// ([`MAX_LEFT_CHATS_REPLAYED`]). A chat is a member's at the start only up to a
    /// `member.left` of theirs in the range: one whose leaving is not in the log yet (its publish
    /// held back) gives them nothing, as the store has them out.
    async fn decide_left_around(
        &mut self,
        bus: &dyn Bus,
        duplicate_window: Duration,
    ) -> Result<(), BusError> {
        let on_time_within = duplicate_window.saturating_sub(CLOCK_SKEW_TOLERANCE);
        for (chat, around) in std::mem::take(&mut self.left_around) {
            let member_at_start = match (around.member_before, around.first_leaving) {
                (_, None) | (Some(false), _) => false,
                (Some(true), Some(_)) => true,
                (None, Some((seq, made_at))) => bus
                    .appended_at(seq)
                    .await?
                    .is_some_and(|appended| appended - made_at <= on_time_within),
            };
            // A member: [`ReplayMembership::note_start`] has them in, up to that `member.left`.
            if !member_at_start {
                self.member.insert(chat, false);
            }
        }
        Ok(())
    }

    /// Notes what `envelope` says about the user's membership at the start of the range: their
    /// first change of a chat in it tells whether they were a member before.
    fn note_start(&mut self, user: UserId, envelope: &Envelope) {
        if envelope.joined.contains(&user) {
            self.member.entry(envelope.chat_id).or_insert(false);
        } else if envelope.left.contains(&user) {
            self.member.entry(envelope.chat_id).or_insert(true);
        }
    }

    /// Whether the user receives `envelope`, the next event of the range in order. `current`: the
    /// chats they are in at the end of the range, which tells, for a chat whose membership they
    /// did not change in it, whether they were in it all along.
    fn admits(&mut self, user: UserId, envelope: &Envelope, current: &HashSet<ChatId>) -> bool {
        let chat = envelope.chat_id;
        let is_member = self
            .member
            .entry(chat)
            .or_insert_with(|| current.contains(&chat));
        if envelope.joined.contains(&user) {
            *is_member = true;
        }
        // A leaving goes to the user it names even when they are out already, as the live
        // stream hands it to them ([`Hub::dispatch`]): it tells them nothing they must not know.
        let keep = *is_member || envelope.left.contains(&user);
        if envelope.left.contains(&user) {
            *is_member = false;
        }
        keep
    }
}

/// A connection as [`Hub::install`] left it.
struct Installed {
    /// The last sequence dispatched.
    at: u64,
    /// The chats it routes by.
    chats: HashSet<ChatId>,
    /// The chats its user left while it was pending: their events up to that are in the log.
    left: HashSet<ChatId>,
    /// Its pending channel missed events dispatched while it was pending (it filled).
    missed: bool,
}

/// The part of a resume's replay still to read from the log.
struct Replay {
    user: UserId,
    /// The chats whose events it reads: those the user is in at the end (`current`), and those
    /// they left recently.
    chats: Arc<HashSet<ChatId>>,
    /// The read of the next page, under way: kept across a `select!` that drops
    /// [`Subscription::next`], so a socket that gets frames while it replays goes on with the
    /// read it started instead of starting it again (on JetStream, a consumer each time, left to
    /// expire) and never finishing.
    /// On a task of its own, which a subscription dropped meanwhile leaves to finish (and, on
    /// JetStream, delete its consumer).
    reading: Option<tokio::task::JoinHandle<Result<confab_runtime::bus::Page, ReadError>>>,
    current: HashSet<ChatId>,
    membership: ReplayMembership,
    /// The page read and not yet taken.
    page: VecDeque<LoggedEvent>,
    /// Read up to here.
    position: u64,
    up_to: u64,
    max_scan: usize,
}

impl Hub {
    /// `buffer` events are held per connection; a connection that falls further behind is closed
    /// (its client resumes from its last id) rather than slowing everyone else. A resume replays
    /// at most `replay_limit` events, else the client gets a reset.
    pub fn new(
        bus: Arc<dyn Bus>,
        membership: Arc<dyn Membership>,
        presence: Arc<dyn Presence>,
        buffer: usize,
        replay_limit: usize,
    ) -> Hub {
        Hub {
            routes: Arc::default(),
            presence,
            node: uuid::Uuid::new_v4().to_string().into(),
            presence_events: Arc::default(),
            presence_turns: Arc::default(),
            next_id: Arc::default(),
            buffer: buffer.max(1),
            replay_limit: replay_limit.max(1),
            caps: Caps::default(),
            stream_opens: Arc::new(KeyedLimit::new("stream opens and resumes", RateLimit::OFF)),
            alive: Arc::new(AtomicBool::new(false)),
            bus,
            membership,
            revocations: None,
            duplicate_window: confab_runtime::bus::LogSettings::default().duplicate_window,
        }
    }

    /// Sets the log's duplicate window (`bus.duplicate_window_secs`), which a resume relies on to
    /// tell a late copy of a `member.left` from its original.
    pub fn with_duplicate_window(mut self, window: Duration) -> Hub {
        self.duplicate_window = window;
        self
    }

    /// Ends the streams of sessions that log out.
    pub fn with_revocations(mut self, revocations: Arc<Revocations>) -> Hub {
        self.revocations = Some(revocations);
        self
    }

    /// Limits how often one user opens or resumes a stream on this node (`limits.stream_opens`);
    /// more are refused with [`OpenError::Limited`] before anything is read.
    pub fn with_stream_open_limit(mut self, limit: RateLimit) -> Hub {
        self.stream_opens = Arc::new(KeyedLimit::new("stream opens and resumes", limit));
        self
    }

    /// Sets the connection caps.
    pub fn with_caps(mut self, caps: Caps) -> Hub {
        self.caps = caps;
        self
    }

    /// Whether this node's subscription to the log is live.
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }

    /// Opens `user`'s stream: from now when `resume_after` is `None`, else exactly after that
    /// sequence (or with a [`Item::Reset`] first when the log cannot replay from there). At the
    /// per-user cap it takes the place of the user's oldest stream on this node ([`Caps`]).
    pub async fn open(
        &self,
        user: UserId,
        resume_after: Option<u64>,
    ) -> Result<Subscription, OpenError> {
        self.open_in(user, StreamSession::default(), resume_after)
            .await
    }

    /// [`Hub::open`] for a stream opened in `session`, which a logout ends.
    pub async fn open_in(
        &self,
        user: UserId,
        session: StreamSession,
        resume_after: Option<u64>,
    ) -> Result<Subscription, OpenError> {
        self.open_with(user, session, resume_after, None).await
    }

    /// [`Hub::open_in`] for a stream that is to take the place of `current`, the same client's
    /// (a WebSocket's `resume`, which drops `current` once this opens): at the per-user cap it is
    /// `current` that makes room, not the user's oldest stream, and it ends without a reason, so
    /// that if this open fails, `current` ends like a stream the hub dropped and its client
    /// resumes.
    pub async fn open_replacing(
        &self,
        current: &Subscription,
        user: UserId,
        session: StreamSession,
        resume_after: Option<u64>,
    ) -> Result<Subscription, OpenError> {
        self.open_with(user, session, resume_after, Some(current.registration.id))
            .await
    }

    async fn open_with(
        &self,
        user: UserId,
        session: StreamSession,
        resume_after: Option<u64>,
        replacing: Option<u64>,
    ) -> Result<Subscription, OpenError> {
        if !self.is_alive() {
            return Err(OpenError::NotReady);
        }
        // Before the stream registers: a refused resume leaves the stream it was to replace.
        let taken = self.stream_opens.take(&user, 1).inspect_err(|_| {
            metrics::counter!("confab_rate_limited_total", "class" => "StreamOpens").increment(1);
        })?;
        let opened = self
            .open_counted(user, session, resume_after, replacing)
            .await;
        // An open refused before it read the log (a full node, a store read) is given back: its
        // client's retry of a node that could not take it must not use up its allowance. One
        // that failed on the log may have scanned it, which is what the allowance limits.
        match &opened {
            Ok(_) | Err(OpenError::Bus(_)) => drop(taken),
            Err(_) => self.stream_opens.give_back(taken),
        }
        opened
    }

    async fn open_counted(
        &self,
        user: UserId,
        session: StreamSession,
        resume_after: Option<u64>,
        replacing: Option<u64>,
    ) -> Result<Subscription, OpenError> {
        let mut registration = self.register(user, session.clone(), replacing)?;
        // A logout that arrived after the token was checked and before the stream registered.
        if self
            .revocations
            .as_ref()
            .is_some_and(|r| r.is_revoked(user, session.id.as_deref(), session.issued_at))
        {
            return Err(OpenError::Revoked);
        }
        // When the client's last event was made: the leavings recorded well before are of chats
        // its stream no longer routed there, which the replay need not read.
        let position_at = match resume_after {
            Some(after) => self.time_of(after).await,
            None => None,
        };
        let chats: HashSet<ChatId> = self
            .membership
            .chats_of(user)
            .await
            .map_err(OpenError::Membership)?
            .into_iter()
            .collect();
        // After the chats, not beside them: a chat left meanwhile is in one of the two reads.
        let left_recently = match resume_after {
            Some(_) => {
                let since = position_at.map_or(OffsetDateTime::UNIX_EPOCH, |at| {
                    at - LEFT_BEFORE_POSITION_MARGIN
                });
                self.membership
                    .left_chats_of(user, since, MAX_LEFT_CHATS_REPLAYED)
                    .await
                    .map_err(OpenError::Membership)?
            }
            None => Vec::new(),
        };
        let Installed {
            at: installed_at,
            chats: current,
            left: left_while_pending,
            missed: missed_while_pending,
        } = self.install(registration.id, chats)?;
        if registration.first_on_node {
            let hub = self.clone();
            let chats = current.iter().copied().collect();
            tokio::spawn(async move { hub.announce(user, Some(chats)).await });
        }
        let mut queue = VecDeque::new();
        let mut replay = None;
        let mut skip_up_to = 0;
        let mut replayed = false;
        if let Some(after) = resume_after {
            // The chats the user left are read up to the event that took them out.
            let read: HashSet<ChatId> = current
                .iter()
                .copied()
                .chain(left_recently.iter().map(|left| left.chat_id))
                .chain(left_while_pending.iter().copied())
                .collect();
            // Left, and not joined again since. Its first `member.left` in the range may be a
            // late copy of the one the client's stream took before the position, and that copy
            // must not make the chat's events up to it theirs; or it may be the original, and
            // the chat's events up to it are theirs. The store's time of the leaving and the
            // time of the client's last event come from the clocks of different processes, so
            // only a leaving recorded well before that time is taken as before the position:
            // out at the start of the range, whatever the order of the `member.left`s in it.
            // One recorded around that time is decided by when the log appended its first
            // `member.left` there ([`ReplayMembership::left_around_position`]); one recorded well
            // after, by that first `member.left` (see [`visible`]).
            let left_since_position = left_recently
                .iter()
                .filter(|left| !current.contains(&left.chat_id))
                .filter(|left| !left_while_pending.contains(&left.chat_id));
            let (mut out_at_start, mut left_around) = (Vec::new(), Vec::new());
            if let Some(at) = position_at {
                for left in left_since_position {
                    if left.left_at < at - CLOCK_SKEW_TOLERANCE {
                        out_at_start.push(left.chat_id);
                    } else if left.left_at <= at + CLOCK_SKEW_TOLERANCE {
                        left_around.push(left.chat_id);
                    }
                }
            }
            let mut membership = ReplayMembership::out_at_start(out_at_start);
            membership.left_around_position(left_around);
            match self
                .check_replay(user, after, installed_at, read, current.clone(), membership)
                .await
            {
                Ok(checked) => {
                    metrics::counter!("confab_notifier_resumes_total").increment(1);
                    replay = Some(checked);
                    skip_up_to = after.max(installed_at);
                    replayed = true;
                }
                Err(ReadError::Bus(error)) => return Err(error.into()),
                Err(error) => {
                    metrics::counter!("confab_notifier_resets_total").increment(1);
                    tracing::debug!(%user, %error, "resume impossible; resetting");
                    // What follows is routed: the events after the install. Of those that
                    // reached the connection while it was pending, the logged ones are the reset's
                    // position or before it, and the client reads them again from history; the
                    // ephemeral ones (typing, presence, call signalling) are kept.
                    queue.push_back(Item::Reset {
                        reason: reset_reason(&error),
                        at: installed_at,
                    });
                    skip_up_to = installed_at;
                }
            }
        } else if missed_while_pending {
            // A fresh stream whose pending channel filled with the node's traffic: the events of
            // the user's chats from its start up to the install are read from the log instead,
            // as a resume from there reads them.
            metrics::counter!("confab_notifier_pending_overflows_total").increment(1);
            let read: HashSet<ChatId> = current
                .iter()
                .copied()
                .chain(left_while_pending.iter().copied())
                .collect();
            match self
                .check_replay(
                    user,
                    registration.after,
                    installed_at,
                    read,
                    current.clone(),
                    ReplayMembership::default(),
                )
                .await
            {
                Ok(checked) => {
                    replay = Some(checked);
                    skip_up_to = installed_at;
                }
                Err(ReadError::Bus(error)) => return Err(error.into()),
                Err(error) => {
                    metrics::counter!("confab_notifier_resets_total").increment(1);
                    tracing::debug!(%user, %error, "opening range not replayable; resetting");
                    queue.push_back(Item::Reset {
                        reason: reset_reason(&error),
                        at: installed_at,
                    });
                }
            }
            replayed = true;
        }
        // A logout that ended the session while its chats and its replay were read (which
        // `end_sessions` could not reach, the connection being pending): nothing goes to it.
        if self
            .revocations
            .as_ref()
            .is_some_and(|r| r.is_revoked(user, session.id.as_deref(), session.issued_at))
        {
            return Err(OpenError::Revoked);
        }
        // What reached the connection while it was pending: the events of every chat, and what
        // was routed to it since.
        let mut pending = Vec::new();
        while let Ok(event) = registration.pending_events.try_recv() {
            pending.push(event);
        }
        let mut routed = Vec::new();
        while let Ok(event) = registration.events.try_recv() {
            routed.push(event);
        }
        // Of what reached it while pending: on a fresh stream, everything; after a replay or a
        // reset, only the ephemeral events (typing, presence, call signalling), which no log keeps:
        // the logged ones are in the replay, or before the reset's position. Membership is decided
        // on all of them, their joins and leaves included, then they are kept.
        queue.extend(
            visible(user, pending, |e| &e.envelope, &current)
                .into_iter()
                .filter(|e| e.seq == 0 || (!replayed && e.seq > skip_up_to))
                .map(Item::Event),
        );
        let routed = routed
            .into_iter()
            .filter(|e| e.seq == 0 || e.seq > skip_up_to)
            .map(Item::Event)
            .collect();
        Ok(Subscription {
            registration,
            queue,
            replay,
            routed,
            skip_up_to,
            resumed: resume_after.is_some(),
            told_end: false,
            interrupted: false,
        })
    }

    /// Checks that the log can replay `user`'s events of `chats` after `after` up to `up_to`
    /// within the replay limit, and learns their membership at its start, reading it a page at a
    /// time and keeping none of it: the replay reads it again as its client takes it. A replay
    /// that fits in one page keeps that page, and reads nothing more. `current`: the chats the
    /// user is in at `up_to` (see [`visible`]); `membership`: what is known of their membership
    /// at `after` before the range is read.
    async fn check_replay(
        &self,
        user: UserId,
        after: u64,
        up_to: u64,
        chats: HashSet<ChatId>,
        current: HashSet<ChatId>,
        mut membership: ReplayMembership,
    ) -> Result<Replay, ReadError> {
        self.look_back(user, after, &mut membership).await?;
        let max_scan = self.replay_limit.saturating_mul(SCAN_FACTOR);
        let (mut position, mut found, mut scanned) = (after, 0usize, 0usize);
        let mut first_page = None;
        loop {
            let page = self
                .bus
                .read_page(
                    position,
                    up_to,
                    ChatFilter::Only(&chats),
                    REPLAY_PAGE,
                    max_scan - scanned,
                )
                .await?;
            found += page.events.len();
            scanned += page.scanned;
            let done = page.through >= up_to || page.through <= position;
            if found > self.replay_limit || (scanned >= max_scan && !done) {
                return Err(ReadError::TooMany(self.replay_limit));
            }
            for event in &page.events {
                membership.note_start_of(user, event);
            }
            if position == after && done {
                first_page = Some(page.events);
            }
            position = page.through;
            if done {
                break;
            }
        }
        membership
            .decide_left_around(&*self.bus, self.duplicate_window)
            .await?;
        let kept = first_page.is_some();
        let mut replay = Replay {
            user,
            chats: Arc::new(chats),
            reading: None,
            current,
            membership,
            page: VecDeque::new(),
            // With its one page kept, the range is read; else it is read again from the start.
            position: if kept { position } else { after },
            up_to,
            max_scan,
        };
        if let Some(events) = first_page {
            replay.page = events
                .into_iter()
                .filter(|e| replay.membership.admits(user, &e.envelope, &replay.current))
                .collect();
        }
        Ok(replay)
    }

    /// Learns whether `user` was a member at `after` of the chats `membership` has left around
    /// the position, from their last membership change of each in the [`LEFT_AROUND_LOOKBACK`]
    /// events of the log before it, read a page at a time and kept no longer than the page. A
    /// chat with none there, or a look that the log's retention cuts short, is left undecided.
    async fn look_back(
        &self,
        user: UserId,
        after: u64,
        membership: &mut ReplayMembership,
    ) -> Result<(), ReadError> {
        let chats: HashSet<ChatId> = membership.left_around.keys().copied().collect();
        if chats.is_empty() {
            return Ok(());
        }
        let lookback = u64::try_from(LEFT_AROUND_LOOKBACK).unwrap_or(u64::MAX);
        let (mut position, mut scanned) = (after.saturating_sub(lookback), 0);
        let mut last_change = HashMap::new();
        while position < after && scanned < LEFT_AROUND_LOOKBACK {
            let page = match self
                .bus
                .read_page(
                    position,
                    after,
                    ChatFilter::Only(&chats),
                    REPLAY_PAGE,
                    LEFT_AROUND_LOOKBACK - scanned,
                )
                .await
            {
                Ok(page) => page,
                Err(ReadError::Bus(error)) => return Err(ReadError::Bus(error)),
                // The log no longer holds where the look starts: its times decide.
                Err(_) => return Ok(()),
            };
            for event in &page.events {
                let envelope = &event.envelope;
                // In the order [`ReplayMembership::admits`] applies them: in, then out.
                if envelope.left.contains(&user) {
                    last_change.insert(envelope.chat_id, false);
                } else if envelope.joined.contains(&user) {
                    last_change.insert(envelope.chat_id, true);
                }
            }
            scanned += page.scanned.max(1);
            if page.through <= position {
                break;
            }
            position = page.through;
        }
        membership.known_at_start(last_change);
        Ok(())
    }

    /// When the event at `seq` was made (its envelope's time), if the log still holds it.
    async fn time_of(&self, seq: u64) -> Option<OffsetDateTime> {
        let before = seq.checked_sub(1)?;
        let page = self
            .bus
            .read_page(before, seq, ChatFilter::All, 1, 1)
            .await
            .ok()?;
        page.events
            .into_iter()
            .find(|event| event.seq == seq)
            .map(|event| event.envelope.at)
    }

    /// Registers a pending connection of `user`. At the per-user cap, the user's oldest connection
    /// (or `replacing`, when it is one of theirs) is taken out of the routes in the same step, so
    /// the user never holds more than the cap, and ends: with [`REPLACED`] unless it is
    /// `replacing`.
    fn register(
        &self,
        user: UserId,
        session: StreamSession,
        replacing: Option<u64>,
    ) -> Result<Registration, OpenError> {
        let (sender, events) = mpsc::channel(self.buffer);
        let (pending_sender, pending_events) = mpsc::channel(self.buffer);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let end = Arc::new(OnceLock::new());
        let mut first_on_node = false;
        let mut after = 0;
        let mut replaced = Vec::new();
        if let Ok(mut routes) = self.routes.write() {
            after = routes.last_seq;
            let per_user = self.caps.per_user.max(1);
            let theirs = routes.by_user.get(&user).map_or(0, Vec::len);
            // The stream this one replaces (a WebSocket's resume), if it is still routed.
            let own = replacing.filter(|r| {
                routes
                    .by_user
                    .get(&user)
                    .is_some_and(|mine| mine.contains(r))
            });
            // The stream to be replaced, ended meanwhile (a newer one of the user's took its
            // place, and its socket had not read that yet): a resume of it would take the place
            // of the user's next oldest, on another device, which would be told not to come back.
            if replacing.is_some() && own.is_none() {
                return Err(OpenError::Ended);
            }
            // A stream that takes another's place leaves the node's count as it is.
            if theirs < per_user && own.is_none() && routes.connections.len() >= self.caps.per_node
            {
                metrics::counter!("confab_notifier_refused_total", "cap" => "node").increment(1);
                return Err(OpenError::NodeFull);
            }
            routes.connections.insert(
                id,
                Connection {
                    user,
                    session,
                    sender,
                    pending_sender: Some(pending_sender),
                    missed_while_pending: false,
                    chats: None,
                    changes: Vec::new(),
                    end: Arc::clone(&end),
                },
            );
            let mine = routes.by_user.entry(user).or_default();
            mine.push(id);
            first_on_node = mine.len() == 1;
            routes.pending.insert(id);
            // Taken after the new one is in, so that none of these is its user's last: the user
            // stays online throughout. The stream replaced ends without a reason (its client
            // resumes on this one); the oldest beyond the cap ends as replaced.
            if let Some(taken) = own.and_then(|own| routes.take(own)) {
                replaced.push(taken);
            }
            while let Some(oldest) = routes
                .by_user
                .get(&user)
                .filter(|mine| mine.len() > per_user)
                .map(|mine| mine[0])
            {
                let Some((connection, last)) = routes.take(oldest) else {
                    break;
                };
                let _ = connection.end.set(REPLACED);
                metrics::counter!("confab_notifier_replaced_total").increment(1);
                tracing::debug!(%user, connection = oldest, "a newer stream replaces this one");
                replaced.push((connection, last));
            }
        }
        metrics::gauge!("confab_notifier_connections").increment(1.0);
        // Dropping their senders ends their streams, after the events they hold.
        self.closed(replaced);
        Ok(Registration {
            hub: self.clone(),
            id,
            first_on_node,
            after,
            events,
            pending_events,
            end,
        })
    }

    /// Routes connection `id` by `chats` (with the changes noted while it was pending) from now on.
    fn install(&self, id: u64, mut chats: HashSet<ChatId>) -> Result<Installed, OpenError> {
        let mut routes = self
            .routes
            .write()
            .map_err(|_| OpenError::Membership("hub poisoned".into()))?;
        let mut left = HashSet::new();
        let Some(connection) = routes.connections.get_mut(&id) else {
            // Dropped while pending (a logout, a newer stream of its user, the node's subscription
            // ending): the stream ends at once.
            return Ok(Installed {
                at: routes.last_seq,
                chats,
                left,
                missed: false,
            });
        };
        // Nothing more is dispatched to it as pending: what its channel holds is the range up
        // to the install, whole unless `missed`.
        connection.pending_sender = None;
        let missed = connection.missed_while_pending;
        for (chat, joined) in connection.changes.drain(..) {
            if joined {
                chats.insert(chat);
            } else {
                chats.remove(&chat);
                left.insert(chat);
            }
        }
        connection.chats = Some(chats.clone());
        for chat in &chats {
            routes.by_chat.entry(*chat).or_default().insert(id);
        }
        routes.pending.remove(&id);
        Ok(Installed {
            at: routes.last_seq,
            chats,
            left,
            missed,
        })
    }

    /// Whether `user` holds a connection (pending or installed) on this node.
    fn holds(&self, user: UserId) -> bool {
        self.routes
            .read()
            .is_ok_and(|routes| routes.by_user.contains_key(&user))
    }

    /// Takes over connections removed from the routes, each with whether it was its user's last on
    /// this node, and announces those users offline. Whoever removes a connection hands it here,
    /// once: the drop of its [`Registration`] finds it gone and announces nothing more.
    fn closed(&self, removed: Vec<(Connection, bool)>) {
        let gone = Self::gone_users(removed);
        if gone.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let hub = self.clone();
        // One task, a few users at a time: a node whose subscription ends drops every user at once.
        runtime.spawn(async move { hub.announce_gone(gone).await });
    }

    /// Writes the presence of the users `gone` left (their last connection here closed), and
    /// tells their chats, a few at a time.
    async fn announce_gone(&self, gone: Vec<(UserId, Option<Vec<ChatId>>)>) {
        futures::stream::iter(gone)
            .for_each_concurrent(32, |(user, chats)| self.announce(user, chats))
            .await;
    }

    /// The users whose last connection here is among `removed`, with the chats it routed.
    fn gone_users(removed: Vec<(Connection, bool)>) -> Vec<(UserId, Option<Vec<ChatId>>)> {
        let mut gone = Vec::new();
        for (connection, last) in removed {
            metrics::gauge!("confab_notifier_connections").decrement(1.0);
            if last {
                // A connection still pending knows no chats yet: its user's are read if needed.
                gone.push((
                    connection.user,
                    connection.chats.map(|c| c.into_iter().collect()),
                ));
            }
        }
        gone
    }

    /// Writes this node's part of `user`'s presence record as the routes have it now: a heartbeat
    /// while the user holds a connection here, else none. Answers the record before and after, and
    /// the time it was written at.
    ///
    /// Connections open and close on many tasks, and the writes they start run in any order (a
    /// connection that closes at once can have its "gone" written before its "connected", which
    /// would leave its user online with nobody to announce them offline). So a write does not say
    /// what changed: it reads the routes during its user's turn, and the last write, which starts
    /// after the last change, writes what holds.
    async fn record_presence(
        &self,
        user: UserId,
    ) -> Result<(PresenceRecord, PresenceRecord, i64), BusError> {
        let _turn = self.presence_turns.turn(&user.to_string()).await;
        let node = Arc::clone(&self.node);
        let now = now_ms();
        let change: Change = if self.holds(user) {
            Box::new(move |record| record.heartbeat(&node, now))
        } else {
            Box::new(move |record| record.gone(&node, now))
        };
        let (before, after) = self.presence.update(user, change).await?;
        Ok((before, after, now))
    }

    /// Records whether `user` holds a connection on this node ([`Hub::record_presence`]), and when
    /// that moves them between online and offline, tells the members of their chats: `chats`, or
    /// when unknown, their membership.
    async fn announce(&self, user: UserId, chats: Option<Vec<ChatId>>) {
        match self.record_presence(user).await {
            Ok((before, after, now)) => self.tell_change(user, chats, &before, &after, now).await,
            Err(error) => tracing::warn!(%error, %user, "presence not recorded"),
        }
    }

    /// Tells the chats of `user` (see [`Hub::announce`]) when their record moved between online and
    /// offline at `now`.
    async fn tell_change(
        &self,
        user: UserId,
        chats: Option<Vec<ChatId>>,
        before: &PresenceRecord,
        after: &PresenceRecord,
        now: i64,
    ) {
        let online = after.online(now);
        if before.online(now) == online {
            return;
        }
        let chats = match chats {
            Some(chats) => chats,
            None => match self.membership.chats_of(user).await {
                Ok(chats) => chats,
                Err(error) => {
                    tracing::warn!(%error, %user, "chats unknown; presence change not announced");
                    return;
                }
            },
        };
        let view = after.view(user, now);
        let event = if online {
            Event::UserConnected(view)
        } else {
            Event::UserDisconnected(view)
        };
        self.publish_presence(user, chats, event).await;
    }

    /// Publishes a presence event of `user` to their chats, at most one per user per
    /// [`PRESENCE_EVENT_INTERVAL`]: changes in between are summed up by one `presence.updated` at
    /// the end of the interval, with the state then.
    async fn publish_presence(&self, user: UserId, chats: Vec<ChatId>, event: Event) {
        let now = Instant::now();
        let wait = {
            let Ok(mut last) = self.presence_events.lock() else {
                return;
            };
            match last.get_mut(&user) {
                Some((at, scheduled)) if now.duration_since(*at) < PRESENCE_EVENT_INTERVAL => {
                    if *scheduled {
                        return;
                    }
                    *scheduled = true;
                    Some(PRESENCE_EVENT_INTERVAL - now.duration_since(*at))
                }
                _ => {
                    last.insert(user, (now, false));
                    if last.len() > 100_000 {
                        last.retain(|_, (at, scheduled)| {
                            *scheduled || now.duration_since(*at) < PRESENCE_EVENT_INTERVAL
                        });
                    }
                    None
                }
            }
        };
        if let Some(wait) = wait {
            metrics::counter!("confab_presence_events_coalesced_total").increment(1);
            let hub = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                if let Ok(mut last) = hub.presence_events.lock() {
                    last.insert(user, (Instant::now(), false));
                }
                if let Ok(record) = hub.presence.get(user).await {
                    let view = record.view(user, now_ms());
                    hub.send_to_chats(chats, Event::PresenceUpdated(view)).await;
                }
            });
            return;
        }
        self.send_to_chats(chats, event).await;
    }

    async fn send_to_chats(&self, chats: Vec<ChatId>, event: Event) {
        for chat in chats.into_iter().take(MAX_PRESENCE_FANOUT) {
            if let Err(error) = self
                .bus
                .publish_ephemeral(&Envelope::new(chat, event.clone()))
                .await
            {
                tracing::debug!(%error, "presence event not published");
                return;
            }
        }
    }

    /// Renews the presence of every user connected to this node, and sweeps silent nodes, until
    /// `shutdown`.
    async fn heartbeat(&self, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(HEARTBEAT_EVERY);
        // A sweep of many users takes long: it runs on a task of its own, one at a time, so that
        // this node's own heartbeats never wait for it (late, this node would be swept in turn).
        let mut sweeping: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    if let Some(sweep) = sweeping.take() {
                        sweep.abort();
                    }
                    // The worker forgets this node, once its users are written offline.
                    return;
                }
                _ = every.tick() => {}
            }
            let now = now_ms();
            if let Err(error) = self.presence.node_alive(&self.node, now).await {
                tracing::warn!(%error, "this node's heartbeat not recorded; trying again");
            }
            if sweeping
                .as_ref()
                .is_none_or(tokio::task::JoinHandle::is_finished)
            {
                let hub = self.clone();
                sweeping = Some(tokio::spawn(async move {
                    if let Err(error) = hub.sweep_claimed_nodes(now).await {
                        tracing::warn!(%error, "silent nodes not swept; trying again");
                    }
                }));
            }
            let users: Vec<UserId> = match self.routes.read() {
                Ok(routes) => routes.by_user.keys().copied().collect(),
                Err(_) => {
                    if let Some(sweep) = sweeping.take() {
                        sweep.abort();
                    }
                    return;
                }
            };
            // Each user's heartbeat is a write of what the routes hold for them now, so that one
            // whose last connection closed since `users` was read is not renewed after the write
            // that took them out.
            futures::stream::iter(users)
                .for_each_concurrent(32, |user| async move {
                    match self.record_presence(user).await {
                        // Online again: swept while this node was cut off (and so announced
                        // offline). Offline: their last connection closed meanwhile.
                        Ok((before, after, now)) => {
                            self.tell_change(user, None, &before, &after, now).await;
                        }
                        Err(error) => tracing::debug!(%error, "presence heartbeat failed"),
                    }
                })
                .await;
        }
    }

    /// Records this node alive at `now`, then takes every node silent for longer than the presence
    /// TTL (crashed: it never saw its connections close) out of its users' records, and tells the
    /// chats of those who are offline now. Answers how many users it announced offline.
    pub async fn sweep_silent_nodes(&self, now: i64) -> Result<usize, BusError> {
        self.presence.node_alive(&self.node, now).await?;
        self.sweep_claimed_nodes(now).await
    }

    /// The sweep of [`Hub::sweep_silent_nodes`], without this node's own record. Users are taken
    /// out several at a time; one whose record cannot be changed is left for the next sweeper
    /// (the node is forgotten only once all are done, and its claim lapses), and the others go
    /// on. A node back since it was claimed keeps what it wrote since (entries written after the
    /// claim at `now`), and is not forgotten.
    async fn sweep_claimed_nodes(&self, now: i64) -> Result<usize, BusError> {
        let mut announced = 0;
        for node in self.presence.claim_silent_nodes(&self.node, now).await? {
            let users = self.presence.users_on(&node).await?;
            tracing::info!(%node, users = users.len(), "sweeping a silent node's users");
            let swept: Vec<Result<Swept, BusError>> = futures::stream::iter(users)
                .map(|user| {
                    let node = node.clone();
                    async move { self.sweep_user(user, node, now).await }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            let failed = swept.iter().filter(|swept| swept.is_err()).count();
            let back = swept
                .iter()
                .filter(|swept| matches!(swept, Ok(Swept::Back)))
                .count();
            announced += swept
                .iter()
                .filter(|swept| matches!(swept, Ok(Swept::Announced)))
                .count();
            if back > 0 {
                tracing::info!(%node, back, "a silent node is back; not forgotten");
            } else if failed == 0 {
                self.presence.forget_node(&node).await?;
            } else {
                tracing::warn!(%node, failed, "users of a silent node left for the next sweep");
            }
        }
        Ok(announced)
    }

    /// Takes the silent `node`, claimed at `claimed_at`, out of `user`'s record, unless its entry
    /// there was written since (the node is back), and tells their chats when they are offline
    /// now.
    async fn sweep_user(
        &self,
        user: UserId,
        node: String,
        claimed_at: i64,
    ) -> Result<Swept, BusError> {
        let dead = node.clone();
        let change: Change = Box::new(move |record| {
            let before_the_claim = record.nodes.get(&dead).is_some_and(|at| *at <= claimed_at);
            if before_the_claim && let Some(at) = record.nodes.remove(&dead) {
                record.last_seen_ms = record.last_seen_ms.max(Some(at));
            }
        });
        let (before, after) = self.presence.update(user, change).await.inspect_err(
            |error| tracing::debug!(%error, %user, "a silent node's user not swept"),
        )?;
        if after.nodes.contains_key(&node) {
            return Ok(Swept::Back);
        }
        // Online elsewhere, or swept already: nothing to tell.
        if !before.nodes.contains_key(&node) || after.online(now_ms()) {
            return Ok(Swept::Quiet);
        }
        let chats = match self.membership.chats_of(user).await {
            Ok(chats) => chats,
            Err(error) => {
                tracing::warn!(%error, %user, "chats unknown; offline not announced");
                return Ok(Swept::Quiet);
            }
        };
        metrics::counter!("confab_presence_swept_offline_total").increment(1);
        self.publish_presence(
            user,
            chats,
            Event::UserDisconnected(after.view(user, now_ms())),
        )
        .await;
        Ok(Swept::Announced)
    }

    /// Hands an ephemeral event to the connections of its chat (and to pending ones), except the
    /// ones of the user it is about: nobody is told they are typing, or that they came online.
    /// Call signalling goes to its target's connections that route its chat only (the API checked
    /// that both ends are participants of the call and members of the chat).
    pub fn dispatch_ephemeral(&self, envelope: Envelope) {
        let Ok(routes) = self.routes.read() else {
            return;
        };
        let targets: Vec<&Connection> = if let Event::CallSignal(relay) = &envelope.event {
            // Call signalling goes to its one addressee's connections only, and not to one that
            // no longer routes the chat (its user left it). A pending connection's events are
            // filtered by its chats when it is installed.
            routes
                .by_user
                .get(&relay.to)
                .into_iter()
                .flatten()
                .filter_map(|id| routes.connections.get(id))
                .filter(|connection| {
                    connection
                        .chats
                        .as_ref()
                        .is_none_or(|chats| chats.contains(&envelope.chat_id))
                })
                .collect()
        } else {
            let subject = match &envelope.event {
                Event::Typing(typing) => Some(typing.user_id),
                Event::UserConnected(presence)
                | Event::UserDisconnected(presence)
                | Event::PresenceUpdated(presence) => Some(presence.user_id),
                _ => None,
            };
            routes
                .by_chat
                .get(&envelope.chat_id)
                .into_iter()
                .flatten()
                .chain(routes.pending.iter())
                .filter_map(|id| routes.connections.get(id))
                .filter(|connection| Some(connection.user) != subject)
                .collect()
        };
        if targets.is_empty() {
            return;
        }
        let outgoing = Arc::new(Outgoing::render(LoggedEvent { seq: 0, envelope }));
        for connection in targets {
            let sender = connection
                .pending_sender
                .as_ref()
                .unwrap_or(&connection.sender);
            // Ephemeral: a full buffer skips it rather than dropping the connection.
            if sender.try_send(Arc::clone(&outgoing)).is_ok() {
                metrics::counter!("confab_notifier_delivered_total").increment(1);
            }
        }
    }

    /// Hands `event` to the connections of its chat (and to pending ones), applying the membership
    /// change it carries: members who join receive it, members who leave receive it last. A
    /// leaving member's connection that no longer routes the chat receives it too: one that opened
    /// after the store took them out and before this event (a removal's event follows its write),
    /// which read its chats without this one.
    pub fn dispatch(&self, event: LoggedEvent) {
        let Ok(mut routes) = self.routes.write() else {
            return;
        };
        let chat = event.envelope.chat_id;
        for user in &event.envelope.joined {
            routes.change(*user, chat, true);
        }
        let mut targets: Vec<u64> = routes
            .by_chat
            .get(&chat)
            .into_iter()
            .flatten()
            .chain(routes.pending.iter())
            .copied()
            .collect();
        for user in &event.envelope.left {
            let unrouted = routes.by_user.get(user).into_iter().flatten().filter(|id| {
                routes
                    .connections
                    .get(id)
                    .and_then(|c| c.chats.as_ref())
                    .is_some_and(|chats| !chats.contains(&chat))
            });
            targets.extend(unrouted);
        }
        for user in &event.envelope.left {
            routes.change(*user, chat, false);
        }
        routes.last_seq = routes.last_seq.max(event.seq);
        if targets.is_empty() {
            return;
        }
        let outgoing = Arc::new(Outgoing::render(event));
        let mut slow = Vec::new();
        for id in targets {
            let Some(connection) = routes.connections.get_mut(&id) else {
                continue;
            };
            if let Some(pending) = &connection.pending_sender {
                // A pending connection is never slow: the events it misses are in the log.
                match pending.try_send(Arc::clone(&outgoing)) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        connection.missed_while_pending = true;
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                }
                continue;
            }
            match connection.sender.try_send(Arc::clone(&outgoing)) {
                Ok(()) => metrics::counter!("confab_notifier_delivered_total").increment(1),
                Err(mpsc::error::TrySendError::Full(_)) => slow.push(id),
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        let mut removed = Vec::new();
        for id in slow {
            tracing::warn!(connection = id, "closing a connection that fell behind");
            metrics::counter!("confab_notifier_slow_disconnects_total").increment(1);
            removed.extend(routes.take(id));
        }
        drop(routes);
        self.closed(removed);
    }

    fn renew(&self, id: u64, session: StreamSession) {
        let user = {
            let Ok(mut routes) = self.routes.write() else {
                return;
            };
            let Some(connection) = routes.connections.get_mut(&id) else {
                return;
            };
            connection.session = session.clone();
            connection.user
        };
        // A logout whose `end_sessions` came after the move finds the connection in its new
        // session; one whose `end_sessions` came before was recorded before that, so before
        // this check.
        if self
            .revocations
            .as_ref()
            .is_some_and(|r| r.is_revoked(user, session.id.as_deref(), session.issued_at))
        {
            let taken = match self.routes.write() {
                Ok(mut routes) => routes.take(id),
                Err(_) => None,
            };
            if let Some(connection) = taken {
                metrics::counter!("confab_notifier_logout_disconnects_total").increment(1);
                self.closed(vec![connection]);
            }
        }
    }

    /// Ends the streams `revocation` names: dropping a connection's sender ends its stream.
    pub fn end_sessions(&self, revocation: &Revocation) {
        self.end_where(|c| revocation.ends(c.user, c.session.id.as_deref(), c.session.issued_at));
    }

    /// Ends every stream whose session or user is revoked: what the revocations missed (their
    /// announcements came faster than they were handled) would have ended.
    pub fn end_revoked(&self) {
        let Some(revocations) = &self.revocations else {
            return;
        };
        self.end_where(|c| {
            revocations.is_revoked(c.user, c.session.id.as_deref(), c.session.issued_at)
        });
    }

    /// Ends the streams of the connections `revoked` says, for a logout.
    fn end_where(&self, revoked: impl Fn(&Connection) -> bool) {
        let Ok(mut routes) = self.routes.write() else {
            return;
        };
        let ended: Vec<u64> = routes
            .connections
            .iter()
            .filter(|(_, c)| revoked(c))
            .map(|(id, _)| *id)
            .collect();
        let mut removed = Vec::new();
        for id in ended {
            if let Some(connection) = routes.take(id) {
                metrics::counter!("confab_notifier_logout_disconnects_total").increment(1);
                removed.push(connection);
            }
        }
        drop(routes);
        self.closed(removed);
    }

    /// Subscribes to the log and dispatches it until `shutdown`. Returns once the subscription is
    /// active. When the subscription dies the node reports not ready, refuses new streams and ends
    /// the open ones, whose clients resume elsewhere.
    pub async fn start(
        &self,
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>, BusError> {
        let mut events = self.bus.subscribe().await?;
        let mut ephemeral = self.bus.subscribe_ephemeral().await?;
        let mut revoked = self.revocations.as_ref().map(|r| r.subscribe());
        let last = self.bus.last_seq().await?;
        if let Ok(mut routes) = self.routes.write() {
            routes.last_seq = routes.last_seq.max(last);
        }
        self.alive.store(true, Ordering::Release);
        {
            let hub = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move { hub.heartbeat(shutdown).await });
        }
        let hub = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    next = events.next() => match next {
                        Some(event) => {
                            let span = tracing::debug_span!("consume", seq = event.seq, event = event.envelope.event.kind().as_str(), chat = %event.envelope.chat_id);
                            let _entered = span.enter();
                            hub.dispatch(event);
                        }
                        None => {
                            tracing::error!("event subscription ended; this node is not ready");
                            metrics::counter!("confab_notifier_subscription_failures_total").increment(1);
                            break;
                        }
                    },
                    revocation = async {
                        match revoked.as_mut() {
                            Some(revoked) => revoked.recv().await,
                            None => std::future::pending().await,
                        }
                    } => match revocation {
                        Ok(revocation) => hub.end_sessions(&revocation),
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            // Which ones is not known: every stream is looked at.
                            tracing::warn!(missed, "logouts came faster than they were handled; every stream checked");
                            hub.end_revoked();
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => revoked = None,
                    },
                    next = ephemeral.next() => match next {
                        Some(envelope) => hub.dispatch_ephemeral(envelope),
                        None => {
                            tracing::error!("ephemeral event subscription ended; this node is not ready");
                            metrics::counter!("confab_notifier_subscription_failures_total").increment(1);
                            break;
                        }
                    }
                }
            }
            hub.alive.store(false, Ordering::Release);
            // Dropping every sender ends every client stream, so connections close cleanly.
            let removed: Vec<(Connection, bool)> = match hub.routes.write() {
                Ok(mut routes) => {
                    let ids: Vec<u64> = routes.connections.keys().copied().collect();
                    ids.into_iter().filter_map(|id| routes.take(id)).collect()
                }
                Err(_) => Vec::new(),
            };
            // Awaited here, within a bound: a process that stops right after would cancel a
            // task of their own, leaving its users online to their peers, with no node record
            // left for a sweep to find them by.
            let gone = Self::gone_users(removed);
            if tokio::time::timeout(SHUTDOWN_ANNOUNCING, hub.announce_gone(gone))
                .await
                .is_err()
            {
                // Its record stays, for a sweep to find the users left.
                tracing::warn!("users of a stopping node not all announced offline");
            } else if let Err(error) = hub.presence.forget_node(&hub.node).await {
                // A node that stops cleanly is nobody's to sweep.
                tracing::debug!(%error, "node record not removed; it will be swept");
            }
        }))
    }
}

/// What the sweep of a silent node did to one of its users.
enum Swept {
    /// Taken out, and announced offline.
    Announced,
    /// Taken out (or gone already), and online elsewhere or not announced.
    Quiet,
    /// Left: the node wrote the entry after it was claimed.
    Back,
}

/// How long a node that stops waits for its users' presence to be written offline.
const SHUTDOWN_ANNOUNCING: Duration = Duration::from_secs(10);

/// Readiness of a node's subscription to the log.
pub struct HubReadiness(pub Hub);

impl ReadinessCheck for HubReadiness {
    fn name(&self) -> &'static str {
        "event-subscription"
    }
    fn check(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            if self.0.is_alive() {
                Ok(())
            } else {
                Err("the node's subscription to the event log is down".into())
            }
        })
    }
}

/// Why a stream that could not replay its range is told to reset.
fn reset_reason(error: &ReadError) -> &'static str {
    match error {
        ReadError::Expired(_) => "expired",
        ReadError::Unknown(_) => "unknown-id",
        _ => "too-far-behind",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use confab_runtime::bus::{EmbeddedBus, LogSettings};
    use confab_runtime::presence::PRESENCE_TTL;
    use confab_schema::event::MemberChange;
    use confab_schema::{Event, Signal, SignalId, SignalKind};

    use super::*;

    fn message(chat: ChatId, text: &str) -> Envelope {
        let id = SignalId::new();
        Envelope::signal_created(Signal {
            id,
            chat_id: chat,
            kind: SignalKind::Message,
            author_id: UserId::from_subject("t", "author"),
            created_at: id.created_at().expect("v7"),
            nonce: None,
            text: Some(text.into()),
            reply_to: None,
            attachments: vec![],
            edited_at: None,
            deleted: false,
            reactions: Default::default(),
            call: None,
        })
    }

    fn joined(chat: ChatId, user: UserId) -> Envelope {
        Envelope::new(
            chat,
            Event::MemberJoined(MemberChange {
                user_id: user,
                role: None,
            }),
        )
        .joining(vec![user])
    }

    fn left(chat: ChatId, user: UserId) -> Envelope {
        Envelope::new(
            chat,
            Event::MemberLeft(MemberChange {
                user_id: user,
                role: None,
            }),
        )
        .leaving(vec![user])
    }

    fn text(envelope: &Envelope) -> String {
        match &envelope.event {
            Event::SignalCreated(signal) => signal.text.clone().unwrap_or_default(),
            other => other.kind().as_str().to_owned(),
        }
    }

    #[test]
    fn visible_follows_membership_through_the_range() {
        let me = UserId::from_subject("t", "me");
        let (stayed, joined_later, left_later, rejoined) =
            (ChatId::new(), ChatId::new(), ChatId::new(), ChatId::new());
        let events = vec![
            message(stayed, "s1"),
            message(joined_later, "before join"),
            message(left_later, "before leave"),
            joined(joined_later, me),
            message(joined_later, "after join"),
            left(left_later, me),
            message(left_later, "after leave"),
            left(rejoined, me),
            message(rejoined, "while out"),
            joined(rejoined, me),
            message(rejoined, "back"),
        ];
        let current: HashSet<ChatId> = [stayed, joined_later, rejoined].into();
        let seen: Vec<String> = visible(me, events, |e| e, &current)
            .iter()
            .map(text)
            .collect();
        assert_eq!(
            seen,
            [
                "s1",
                "before leave",
                "member.joined",
                "after join",
                "member.left",
                "member.left",
                "member.joined",
                "back"
            ]
        );
    }

    struct Fixed(HashMap<UserId, Vec<ChatId>>);

    #[async_trait]
    impl Membership for Fixed {
        async fn chats_of(&self, user: UserId) -> Result<Vec<ChatId>, String> {
            Ok(self.0.get(&user).cloned().unwrap_or_default())
        }
        async fn left_chats_of(
            &self,
            _: UserId,
            _: OffsetDateTime,
            _: usize,
        ) -> Result<Vec<LeftChat>, String> {
            Ok(Vec::new())
        }
    }

    /// One user's chats, and the chats they left, newest first.
    struct WithLeft {
        chats: Vec<ChatId>,
        left: Vec<LeftChat>,
    }

    #[async_trait]
    impl Membership for WithLeft {
        async fn chats_of(&self, _: UserId) -> Result<Vec<ChatId>, String> {
            Ok(self.chats.clone())
        }
        async fn left_chats_of(
            &self,
            _: UserId,
            since: OffsetDateTime,
            limit: usize,
        ) -> Result<Vec<LeftChat>, String> {
            Ok(self
                .left
                .iter()
                .filter(|left| left.left_at >= since)
                .take(limit)
                .copied()
                .collect())
        }
    }

    fn left_at(chat_id: ChatId, left_at: OffsetDateTime) -> LeftChat {
        LeftChat { chat_id, left_at }
    }

    /// The next logged event's text (presence events, which are ephemeral, skipped).
    async fn next_text(subscription: &mut Subscription) -> String {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), subscription.next())
                .await
                .expect("an item before the deadline")
                .expect("open")
            {
                Item::Event(event) if event.seq == 0 => continue,
                Item::Event(event) => return text(&event.envelope),
                Item::Reset { reason, .. } => return format!("reset:{reason}"),
                Item::Closed(reason) => return format!("closed:{reason}"),
            }
        }
    }

    /// The logged events' texts up to the one whose text is "end", that one included.
    async fn texts_up_to_end(subscription: &mut Subscription) -> Vec<String> {
        let mut seen = Vec::new();
        while seen.last().is_none_or(|last| last != "end") {
            seen.push(next_text(subscription).await);
        }
        seen
    }

    /// The next ephemeral presence event about `user` on `subscription`.
    async fn next_presence_of(subscription: &mut Subscription, user: UserId) -> Event {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), subscription.next())
                .await
                .expect("an item before the deadline")
                .expect("open")
            {
                Item::Event(event) => match &event.envelope.event {
                    Event::UserConnected(p)
                    | Event::UserDisconnected(p)
                    | Event::PresenceUpdated(p)
                        if p.user_id == user =>
                    {
                        return event.envelope.event.clone();
                    }
                    _ => {}
                },
                Item::Reset { reason, .. } => panic!("reset: {reason}"),
                Item::Closed(reason) => panic!("closed: {reason}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_nodes_users_are_announced_offline_by_another_node() {
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let presence: Arc<dyn Presence> =
            Arc::new(confab_runtime::presence::EmbeddedPresence::default());
        let (alice, bob) = (
            UserId::from_subject("t", "a"),
            UserId::from_subject("t", "b"),
        );
        let shared = ChatId::new();
        let node = || {
            Hub::new(
                Arc::clone(&bus),
                Arc::new(Fixed(HashMap::from([
                    (alice, vec![shared]),
                    (bob, vec![shared]),
                ]))),
                Arc::clone(&presence),
                16,
                100,
            )
        };
        let (a, b) = (node(), node());
        let shutdown = CancellationToken::new();
        let worker = b.start(shutdown.clone()).await.expect("starts");
        // Node a takes streams but runs no heartbeat: it is the node that will fall silent. (A
        // running heartbeat would renew bob's record at a moment the test cannot choose.)
        a.alive.store(true, Ordering::Release);
        let mut alices = b.open(alice, None).await.expect("opens");
        // Bob's only stream is on node a.
        let _bobs = a.open(bob, None).await.expect("opens");
        assert!(matches!(
            next_presence_of(&mut alices, bob).await,
            Event::UserConnected(_)
        ));
        let now = now_ms();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while presence.get(bob).await.expect("record").nodes.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "bob never recorded");
            tokio::task::yield_now().await;
        }
        // What each node's heartbeat does every tick (done here so the test does not wait for one).
        a.sweep_silent_nodes(now).await.expect("sweeps");
        assert_eq!(
            b.sweep_silent_nodes(now).await.expect("sweeps"),
            0,
            "node a is alive"
        );

        // Later, node a has been silent for longer than the TTL (it crashed: its connections
        // never closed). Node b sweeps it: bob is offline, and alice is told.
        let later = now + i64::try_from(PRESENCE_TTL.as_millis()).expect("ms") + 1_000;
        assert_eq!(b.sweep_silent_nodes(later).await.expect("sweeps"), 1);
        match next_presence_of(&mut alices, bob).await {
            Event::UserDisconnected(view) | Event::PresenceUpdated(view) => {
                assert_eq!(view.state, "offline", "{view:?}");
            }
            other => panic!("not an offline event: {other:?}"),
        }
        let record = presence.get(bob).await.expect("record");
        assert!(record.nodes.is_empty(), "node a is out of bob's record");
        assert!(record.last_seen_ms.is_some_and(|seen| seen >= now - 1_000));
        assert_eq!(
            b.sweep_silent_nodes(later).await.expect("sweeps"),
            0,
            "a node is swept once"
        );
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    /// Presence in memory where one node is silent and claimable for good, whose sweep reaches
    /// `users_on`: there it waits for good (`stuck`), or first renews the node's entry of each
    /// user it lists, at `renewed_at` (the node came back after it was claimed). Counts the
    /// heartbeats of each node.
    struct SweptPresence {
        records: confab_runtime::presence::EmbeddedPresence,
        silent: String,
        users: Vec<UserId>,
        stuck: bool,
        renewed_at: i64,
        alive: std::sync::Mutex<HashMap<String, usize>>,
    }

    #[async_trait]
    impl Presence for SweptPresence {
        async fn update(
            &self,
            user: UserId,
            change: Change,
        ) -> Result<(PresenceRecord, PresenceRecord), BusError> {
            self.records.update(user, change).await
        }
        async fn get(&self, user: UserId) -> Result<PresenceRecord, BusError> {
            self.records.get(user).await
        }
        async fn node_alive(&self, node: &str, now_ms: i64) -> Result<(), BusError> {
            *self
                .alive
                .lock()
                .expect("not poisoned")
                .entry(node.to_owned())
                .or_default() += 1;
            self.records.node_alive(node, now_ms).await
        }
        async fn claim_silent_nodes(
            &self,
            _by: &str,
            _now_ms: i64,
        ) -> Result<Vec<String>, BusError> {
            Ok(vec![self.silent.clone()])
        }
        async fn users_on(&self, node: &str) -> Result<Vec<UserId>, BusError> {
            if self.stuck {
                std::future::pending::<()>().await;
            }
            for user in &self.users {
                let (node, at) = (node.to_owned(), self.renewed_at);
                self.records
                    .update(
                        *user,
                        Box::new(move |record| {
                            record.nodes.insert(node.clone(), at);
                        }),
                    )
                    .await?;
            }
            Ok(self.users.clone())
        }
        async fn forget_node(&self, node: &str) -> Result<(), BusError> {
            self.records.forget_node(node).await
        }
    }

    /// A node claimed as silent comes back (its heartbeat renews its users' entries) while the
    /// sweep that claimed it runs: the sweep takes out no entry written since, and announces
    /// nobody offline.
    #[tokio::test]
    async fn a_sweep_leaves_the_entries_a_node_back_since_wrote() {
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let bob = UserId::from_subject("t", "b");
        let now = now_ms();
        let ttl = i64::try_from(PRESENCE_TTL.as_millis()).expect("ms");
        let presence = Arc::new(SweptPresence {
            records: confab_runtime::presence::EmbeddedPresence::default(),
            silent: "back".to_owned(),
            users: vec![bob],
            stuck: false,
            // Written after the claim: the node is back.
            renewed_at: now + 1_000,
            alive: std::sync::Mutex::default(),
        });
        // Bob's entry on node "back", written long ago.
        presence
            .records
            .update(
                bob,
                Box::new(move |record| {
                    record.nodes.insert("back".to_owned(), now - 2 * ttl);
                }),
            )
            .await
            .expect("written");
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(Fixed(HashMap::from([(bob, vec![ChatId::new()])]))),
            Arc::clone(&presence) as Arc<dyn Presence>,
            16,
            100,
        );
        assert_eq!(hub.sweep_silent_nodes(now).await.expect("sweeps"), 0);
        let record = presence.get(bob).await.expect("record");
        assert_eq!(
            record.nodes.get("back"),
            Some(&(now + 1_000)),
            "the entry the node wrote since it was claimed was taken out"
        );
    }

    /// A node crashed a little after its last heartbeat, once a user connected to it: their
    /// entry is younger than the presence TTL when the node is claimed, and still written before
    /// the claim. The sweep takes it out and announces them offline (no later sweep would find
    /// them: the node is forgotten).
    #[tokio::test]
    async fn a_sweep_takes_out_entries_written_after_the_nodes_last_heartbeat() {
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let bob = UserId::from_subject("t", "b");
        let now = now_ms();
        let presence = Arc::new(confab_runtime::presence::EmbeddedPresence::default());
        presence
            .node_alive("crashed", now - 60_000)
            .await
            .expect("alive once");
        presence
            .update(
                bob,
                Box::new(move |record| {
                    record.nodes.insert("crashed".to_owned(), now - 40_000);
                }),
            )
            .await
            .expect("connected after that");
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(Fixed(HashMap::from([(bob, vec![ChatId::new()])]))),
            Arc::clone(&presence) as Arc<dyn Presence>,
            16,
            100,
        );
        assert_eq!(hub.sweep_silent_nodes(now).await.expect("sweeps"), 1);
        let record = presence.get(bob).await.expect("record");
        assert!(record.nodes.is_empty(), "bob is left online: {record:?}");
    }

    /// A sweep that takes long (a silent node of many users) does not hold back this node's own
    /// heartbeats: late, this node would be taken for silent and swept in turn.
    #[tokio::test(start_paused = true)]
    async fn a_long_sweep_does_not_hold_back_the_nodes_heartbeats() {
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let presence = Arc::new(SweptPresence {
            records: confab_runtime::presence::EmbeddedPresence::default(),
            silent: "stuck".to_owned(),
            users: Vec::new(),
            stuck: true,
            renewed_at: 0,
            alive: std::sync::Mutex::default(),
        });
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(Fixed(HashMap::new())),
            Arc::clone(&presence) as Arc<dyn Presence>,
            16,
            100,
        );
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        // The clock is paused: three heartbeat ticks pass (at 0, 15 and 30 s).
        tokio::time::sleep(HEARTBEAT_EVERY * 2 + Duration::from_secs(5)).await;
        let beats = presence
            .alive
            .lock()
            .expect("not poisoned")
            .get(&*hub.node)
            .copied()
            .unwrap_or(0);
        assert!(
            beats >= 3,
            "this node's heartbeat was recorded {beats} times in 35 s"
        );
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    /// Presence in memory whose writes take a while, as over a network.
    #[derive(Default)]
    struct SlowPresence(confab_runtime::presence::EmbeddedPresence);

    #[async_trait]
    impl Presence for SlowPresence {
        async fn update(
            &self,
            user: UserId,
            change: Change,
        ) -> Result<(PresenceRecord, PresenceRecord), BusError> {
            tokio::time::sleep(Duration::from_millis(200)).await;
            self.0.update(user, change).await
        }
        async fn get(&self, user: UserId) -> Result<PresenceRecord, BusError> {
            self.0.get(user).await
        }
        async fn node_alive(&self, node: &str, now_ms: i64) -> Result<(), BusError> {
            self.0.node_alive(node, now_ms).await
        }
        async fn claim_silent_nodes(&self, by: &str, now_ms: i64) -> Result<Vec<String>, BusError> {
            self.0.claim_silent_nodes(by, now_ms).await
        }
        async fn users_on(&self, node: &str) -> Result<Vec<UserId>, BusError> {
            self.0.users_on(node).await
        }
        async fn forget_node(&self, node: &str) -> Result<(), BusError> {
            self.0.forget_node(node).await
        }
    }

    /// A node that stops cleanly has written its users offline by the time its worker ends: the
    /// process may stop right after, and its node record is gone, so no sweep would find them.
    #[tokio::test]
    async fn a_node_that_stops_has_written_its_users_offline() {
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let bob = UserId::from_subject("t", "b");
        let presence = Arc::new(SlowPresence::default());
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(Fixed(HashMap::from([(bob, vec![ChatId::new()])]))),
            Arc::clone(&presence) as Arc<dyn Presence>,
            16,
            100,
        );
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        let _bobs = hub.open(bob, None).await.expect("opens");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while presence.get(bob).await.expect("record").nodes.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "bob never recorded");
            tokio::task::yield_now().await;
        }
        shutdown.cancel();
        worker.await.expect("worker ends");
        let record = presence.get(bob).await.expect("record");
        assert!(record.nodes.is_empty(), "bob is left online: {record:?}");
    }

    /// Presence in memory that counts its updates, so a test knows when the writes it started are
    /// done.
    #[derive(Default)]
    struct CountedPresence {
        records: confab_runtime::presence::EmbeddedPresence,
        updates: AtomicU64,
    }

    #[async_trait]
    impl Presence for CountedPresence {
        async fn update(
            &self,
            user: UserId,
            change: Change,
        ) -> Result<(PresenceRecord, PresenceRecord), BusError> {
            let records = self.records.update(user, change).await;
            self.updates.fetch_add(1, Ordering::AcqRel);
            records
        }
        async fn get(&self, user: UserId) -> Result<PresenceRecord, BusError> {
            self.records.get(user).await
        }
        async fn node_alive(&self, node: &str, now_ms: i64) -> Result<(), BusError> {
            self.records.node_alive(node, now_ms).await
        }
        async fn claim_silent_nodes(&self, by: &str, now_ms: i64) -> Result<Vec<String>, BusError> {
            self.records.claim_silent_nodes(by, now_ms).await
        }
        async fn users_on(&self, node: &str) -> Result<Vec<UserId>, BusError> {
            self.records.users_on(node).await
        }
        async fn forget_node(&self, node: &str) -> Result<(), BusError> {
            self.records.forget_node(node).await
        }
    }

    /// The next presence event about `user` on `subscription` says they are offline.
    async fn told_offline(subscription: &mut Subscription, user: UserId) {
        match next_presence_of(subscription, user).await {
            Event::UserDisconnected(view) | Event::PresenceUpdated(view) => {
                assert_eq!(view.state, "offline", "{view:?}");
            }
            other => panic!("not an offline event: {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_the_hub_ends_are_announced_offline() {
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let presence: Arc<dyn Presence> =
            Arc::new(confab_runtime::presence::EmbeddedPresence::default());
        let (alice, bob, carol) = (
            UserId::from_subject("t", "a"),
            UserId::from_subject("t", "b"),
            UserId::from_subject("t", "c"),
        );
        let (shared, bobs) = (ChatId::new(), ChatId::new());
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(Fixed(HashMap::from([
                (alice, vec![shared]),
                (bob, vec![shared, bobs]),
                (carol, vec![shared]),
            ]))),
            Arc::clone(&presence),
            16,
            100,
        );
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        let mut alices = hub.open(alice, None).await.expect("opens");

        // Bob stops reading: a flood of his own chat fills his buffer and the hub drops him.
        let bobs_stream = hub.open(bob, None).await.expect("opens");
        assert!(matches!(
            next_presence_of(&mut alices, bob).await,
            Event::UserConnected(_)
        ));
        for i in 0..20 {
            bus.publish(&message(bobs, &format!("flood {i}")))
                .await
                .expect("publishes");
        }
        told_offline(&mut alices, bob).await;
        assert!(presence.get(bob).await.expect("record").nodes.is_empty());
        // His stream ends; its end announces nothing more.
        drop(bobs_stream);

        // Carol's session logs out: the hub ends her stream.
        let _carols = hub.open(carol, None).await.expect("opens");
        assert!(matches!(
            next_presence_of(&mut alices, carol).await,
            Event::UserConnected(_)
        ));
        hub.end_sessions(&Revocation {
            user: Some(carol),
            session: None,
            before: i64::MAX,
        });
        told_offline(&mut alices, carol).await;
        assert!(presence.get(carol).await.expect("record").nodes.is_empty());

        // The node's subscription ends (here, it shuts down): the streams it ends are announced
        // too, unlike those of a node that crashes, which another node sweeps.
        let presence_of_alice = presence.get(alice).await.expect("record");
        assert!(!presence_of_alice.nodes.is_empty(), "alice is online");
        shutdown.cancel();
        worker.await.expect("worker ends");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !presence.get(alice).await.expect("record").nodes.is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "alice still online");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_that_closes_at_once_leaves_its_user_offline() {
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let presence = Arc::new(CountedPresence::default());
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(Fixed(HashMap::new())),
            Arc::clone(&presence) as Arc<dyn Presence>,
            16,
            100,
        );
        // No heartbeat: the only writes are those of the connections.
        hub.alive.store(true, Ordering::Release);
        let users: Vec<UserId> = (0..50)
            .map(|i| UserId::from_subject("t", &format!("u{i}")))
            .collect();
        for user in &users {
            let hub = hub.clone();
            let user = *user;
            // Opened and dropped by one task on a worker, as by a request whose stream ends as it
            // opens: a worker tends to run the task spawned last first, so the announcement of the
            // close tends to run before that of the open.
            tokio::spawn(async move {
                let stream = hub.open(user, None).await.expect("opens");
                drop(stream);
            })
            .await
            .expect("task ends");
        }
        // Each connection writes its user's record twice: when it opened, when it closed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while presence.updates.load(Ordering::Acquire) < 2 * users.len() as u64 {
            assert!(tokio::time::Instant::now() < deadline, "writes never done");
            tokio::task::yield_now().await;
        }
        let mut online = Vec::new();
        for user in &users {
            if !presence.get(*user).await.expect("record").nodes.is_empty() {
                online.push(*user);
            }
        }
        assert!(
            online.is_empty(),
            "{} of {} users online with no connection",
            online.len(),
            users.len()
        );
    }

    /// A hub over a log in memory, routing by `membership`, started: the log, the hub, and the
    /// token that stops its worker, and the worker.
    async fn started_hub(
        membership: impl Membership + 'static,
    ) -> (
        Arc<dyn Bus>,
        Hub,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(membership),
            Arc::new(confab_runtime::presence::EmbeddedPresence::default()),
            16,
            100,
        );
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        (bus, hub, shutdown, worker)
    }

    /// Waits until the hub has dispatched the log up to `seq`.
    async fn dispatched_up_to(hub: &Hub, seq: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while hub.routes.read().expect("lock").last_seq < seq {
            assert!(tokio::time::Instant::now() < deadline, "never dispatched");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn call_signalling_reaches_its_addressee_only_in_a_chat_they_route() {
        use confab_schema::call::{CallRelay, CallSignalType};
        let (alice, bob) = (
            UserId::from_subject("t", "a"),
            UserId::from_subject("t", "b"),
        );
        let (shared, left) = (ChatId::new(), ChatId::new());
        let (_, hub, shutdown, worker) = started_hub(Fixed(HashMap::from([
            (alice, vec![shared]),
            (bob, vec![shared]),
        ])))
        .await;
        let mut alices = hub.open(alice, None).await.expect("opens");
        let signal = |chat: ChatId, to: UserId, sdp: &str| {
            Envelope::new(
                chat,
                Event::CallSignal(CallRelay {
                    call_id: uuid::Uuid::new_v4(),
                    chat_id: chat,
                    from: bob,
                    to,
                    kind: CallSignalType::Offer,
                    payload: serde_json::json!({ "sdp": sdp }),
                }),
            )
        };
        // A chat alice no longer routes, and another user's signal in hers: neither reaches her.
        hub.dispatch_ephemeral(signal(left, alice, "left chat"));
        hub.dispatch_ephemeral(signal(shared, bob, "for bob"));
        hub.dispatch_ephemeral(signal(shared, alice, "for alice"));
        let received = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match alices.next().await.expect("open") {
                    Item::Event(event) => {
                        if let Event::CallSignal(relay) = &event.envelope.event {
                            return relay.payload["sdp"].clone();
                        }
                    }
                    Item::Reset { reason, .. } => panic!("reset: {reason}"),
                    Item::Closed(reason) => panic!("closed: {reason}"),
                }
            }
        })
        .await
        .expect("a call signal");
        assert_eq!(received, "for alice");
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    /// Membership that answers once the test lets it, after saying it was asked; from then on,
    /// every read answers at once (the open may not be the only one to ask).
    struct Gated {
        chats: Vec<ChatId>,
        asked: tokio::sync::Notify,
        answer: tokio::sync::Notify,
        answering: std::sync::atomic::AtomicBool,
    }

    impl Gated {
        fn new(chats: Vec<ChatId>) -> Gated {
            Gated {
                chats,
                asked: tokio::sync::Notify::new(),
                answer: tokio::sync::Notify::new(),
                answering: std::sync::atomic::AtomicBool::new(false),
            }
        }

        /// Lets every read waiting, and every read after, answer.
        fn release(&self) {
            self.answering
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.answer.notify_waiters();
            self.answer.notify_one();
        }
    }

    #[async_trait]
    impl Membership for Gated {
        async fn chats_of(&self, _: UserId) -> Result<Vec<ChatId>, String> {
            self.asked.notify_one();
            loop {
                let answered = self.answer.notified();
                if self.answering.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                answered.await;
            }
            Ok(self.chats.clone())
        }
        async fn left_chats_of(
            &self,
            _: UserId,
            _: OffsetDateTime,
            _: usize,
        ) -> Result<Vec<LeftChat>, String> {
            Ok(Vec::new())
        }
    }

    /// A hub over a log in memory whose membership answers `chats` once released, started: the
    /// log, the membership, the hub, the token that stops its worker, and the worker.
    async fn gated_hub(
        chats: Vec<ChatId>,
    ) -> (
        Arc<dyn Bus>,
        Arc<Gated>,
        Hub,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let membership = Arc::new(Gated::new(chats));
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::clone(&membership) as Arc<dyn Membership>,
            Arc::new(confab_runtime::presence::EmbeddedPresence::default()),
            16,
            100,
        );
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        (bus, membership, hub, shutdown, worker)
    }

    /// Bob typing in `chat`: an ephemeral event.
    fn typing(chat: ChatId, bob: UserId) -> Envelope {
        Envelope::new(
            chat,
            Event::Typing(confab_schema::event::TypingChange {
                user_id: bob,
                expires_in_ms: 3_000,
            }),
        )
    }

    /// The logged events (sequence and text) up to the one whose text is "end", and the ephemeral
    /// ones among them.
    async fn logged_and_ephemeral_up_to_end(
        stream: &mut Subscription,
    ) -> (Vec<(u64, String)>, Vec<Envelope>) {
        let (mut logged, mut ephemeral) = (Vec::new(), Vec::new());
        while logged
            .last()
            .is_none_or(|(_, text): &(u64, String)| text != "end")
        {
            match tokio::time::timeout(Duration::from_secs(5), stream.next())
                .await
                .expect("an item before the deadline")
                .expect("open")
            {
                Item::Event(event) if event.seq == 0 => ephemeral.push(event.envelope.clone()),
                Item::Event(event) => logged.push((event.seq, text(&event.envelope))),
                other => panic!("{other:?}"),
            }
        }
        (logged, ephemeral)
    }

    /// A resume the log cannot replay (here a position it never issued) resets at the install,
    /// and what follows the reset comes after it: not the logged events that reached the stream
    /// while it opened, which the client's reread of history after the reset already holds; but
    /// the ephemeral ones, which no reread brings back.
    #[tokio::test]
    async fn a_reset_is_followed_only_by_events_after_it() {
        let alice = UserId::from_subject("t", "a");
        let bob = UserId::from_subject("t", "b");
        let (chat, added) = (ChatId::new(), ChatId::new());
        let (bus, membership, hub, shutdown, worker) = gated_hub(vec![chat, added]).await;
        bus.publish(&message(chat, "before"))
            .await
            .expect("publishes");
        let opening = {
            let hub = hub.clone();
            tokio::spawn(async move { hub.open(alice, Some(1_000_000)).await })
        };
        membership.asked.notified().await;
        let during = bus
            .publish(&message(chat, "during the open"))
            .await
            .expect("publishes");
        dispatched_up_to(&hub, during).await;
        hub.dispatch_ephemeral(typing(chat, bob));
        // Typing in a chat alice is added to only after it: not hers.
        hub.dispatch_ephemeral(typing(added, bob));
        let joined_at = bus.publish(&joined(added, alice)).await.expect("publishes");
        dispatched_up_to(&hub, joined_at).await;
        membership.release();
        let mut stream = tokio::time::timeout(Duration::from_secs(5), opening)
            .await
            .expect("the open ends")
            .expect("the task")
            .expect("opens");
        let reset_at = match tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .expect("an item before the deadline")
            .expect("open")
        {
            Item::Reset { at, .. } => at,
            other => panic!("not a reset first: {other:?}"),
        };
        bus.publish(&message(chat, "end")).await.expect("publishes");
        let (after_reset, ephemeral) = logged_and_ephemeral_up_to_end(&mut stream).await;
        assert!(
            after_reset.iter().all(|(seq, _)| *seq > reset_at),
            "after a reset at {reset_at}: {after_reset:?}"
        );
        // Typing, which no log keeps, is not dropped with them; but only in a chat she was in.
        let typed_in: Vec<ChatId> = ephemeral
            .iter()
            .filter(|e| matches!(&e.event, Event::Typing(t) if t.user_id == bob))
            .map(|e| e.chat_id)
            .collect();
        assert_eq!(
            typed_in,
            vec![chat],
            "the typing sent while the stream opened: {ephemeral:?}"
        );
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    /// A resume that replays the log delivers the ephemeral events that reached the stream
    /// while it opened (a call's offer must not be lost to a reconnect), besides the replay.
    #[tokio::test]
    async fn a_resume_keeps_the_ephemeral_events_that_came_while_it_opened() {
        let alice = UserId::from_subject("t", "a");
        let bob = UserId::from_subject("t", "b");
        let chat = ChatId::new();
        let (bus, membership, hub, shutdown, worker) = gated_hub(vec![chat]).await;
        let after = bus
            .publish(&message(chat, "seen"))
            .await
            .expect("publishes");
        bus.publish(&message(chat, "missed"))
            .await
            .expect("publishes");
        let opening = {
            let hub = hub.clone();
            tokio::spawn(async move { hub.open(alice, Some(after)).await })
        };
        membership.asked.notified().await;
        hub.dispatch_ephemeral(typing(chat, bob));
        membership.release();
        let mut stream = tokio::time::timeout(Duration::from_secs(5), opening)
            .await
            .expect("the open ends")
            .expect("the task")
            .expect("opens");
        bus.publish(&message(chat, "end")).await.expect("publishes");
        let (logged, ephemeral) = logged_and_ephemeral_up_to_end(&mut stream).await;
        let texts: Vec<&str> = logged.iter().map(|(_, text)| text.as_str()).collect();
        assert_eq!(texts, ["missed", "end"]);
        let typing = ephemeral
            .iter()
            .filter(|e| matches!(&e.event, Event::Typing(t) if t.user_id == bob))
            .count();
        assert_eq!(typing, 1, "the typing sent while the stream opened");
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    #[tokio::test]
    async fn a_stream_whose_session_ends_while_it_opens_gets_nothing() {
        use confab_runtime::revocation::Revocations;
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let alice = UserId::from_subject("t", "a");
        let chat = ChatId::new();
        bus.publish(&message(chat, "before the logout"))
            .await
            .expect("publishes");
        let revocations = Revocations::in_memory(Duration::from_secs(3600));
        let membership = Arc::new(Gated::new(vec![chat]));
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::clone(&membership) as Arc<dyn Membership>,
            Arc::new(confab_runtime::presence::EmbeddedPresence::default()),
            16,
            100,
        )
        .with_revocations(Arc::clone(&revocations));
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        let session = StreamSession {
            id: Some("ending".to_owned()),
            issued_at: 1,
        };
        let opening = {
            let hub = hub.clone();
            tokio::spawn(async move { hub.open_in(alice, session, Some(0)).await })
        };
        membership.asked.notified().await;
        let logout = Revocation {
            user: Some(alice),
            session: Some("ending".to_owned()),
            before: i64::MAX,
        };
        revocations
            .revoke(logout.clone())
            .await
            .expect("records the logout");
        hub.end_sessions(&logout);
        membership.release();
        let opened = tokio::time::timeout(Duration::from_secs(5), opening)
            .await
            .expect("the open ends")
            .expect("the task");
        assert!(
            matches!(opened, Err(OpenError::Revoked)),
            "a stream of an ended session opened, with its replay"
        );
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    /// A hub started over a log holding more than a page of one chat's messages ("history 0"…),
    /// of which alice is the one member: what a resume from the start replays page by page.
    struct Replaying {
        bus: Arc<dyn Bus>,
        alice: UserId,
        chat: ChatId,
        history: usize,
        hub: Hub,
        shutdown: CancellationToken,
        worker: tokio::task::JoinHandle<()>,
    }

    async fn replaying() -> Replaying {
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let alice = UserId::from_subject("t", "a");
        let chat = ChatId::new();
        // Under the replay limit below (100), over a page.
        let history = REPLAY_PAGE + 26;
        for i in 0..history {
            bus.publish(&message(chat, &format!("history {i}")))
                .await
                .expect("publishes");
        }
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(Fixed(HashMap::from([(alice, vec![chat])]))),
            Arc::new(confab_runtime::presence::EmbeddedPresence::default()),
            16,
            100,
        );
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        Replaying {
            bus,
            alice,
            chat,
            history,
            hub,
            shutdown,
            worker,
        }
    }

    #[tokio::test]
    async fn a_replaying_stream_whose_session_logs_out_sends_no_more_of_its_replay() {
        let Replaying {
            alice,
            hub,
            shutdown,
            worker,
            ..
        } = replaying().await;
        let session = StreamSession {
            id: Some("stolen".to_owned()),
            issued_at: 1,
        };
        let mut stream = hub.open_in(alice, session, Some(0)).await.expect("opens");
        assert_eq!(next_text(&mut stream).await, "history 0");
        hub.end_sessions(&Revocation {
            user: Some(alice),
            session: Some("stolen".to_owned()),
            before: i64::MAX,
        });
        let mut after = 0;
        tokio::time::timeout(Duration::from_secs(5), async {
            while stream.next().await.is_some() {
                after += 1;
            }
        })
        .await
        .expect("the stream ends");
        assert_eq!(after, 0, "replayed after the logout");
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    /// A stream dropped as too slow while it replays (live events filled its buffer) ends there:
    /// what it sent is a prefix of what it owed, with no gap for its resume to skip.
    #[tokio::test]
    async fn a_replaying_stream_dropped_as_slow_sends_nothing_past_a_gap() {
        let Replaying {
            bus,
            alice,
            chat,
            history,
            hub,
            shutdown,
            worker,
        } = replaying().await;
        let mut stream = hub.open(alice, Some(0)).await.expect("opens");
        assert_eq!(next_text(&mut stream).await, "history 0");
        for i in 0..40 {
            bus.publish(&message(chat, &format!("live {i}")))
                .await
                .expect("publishes");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !stream.registration.events.is_closed() {
            assert!(tokio::time::Instant::now() < deadline, "never dropped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut sent = vec!["history 0".to_owned()];
        tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(item) = stream.next().await {
                if let Item::Event(event) = item
                    && event.seq != 0
                {
                    sent.push(text(&event.envelope));
                }
            }
        })
        .await
        .expect("the stream ends");
        let owed: Vec<String> = (0..history)
            .map(|i| format!("history {i}"))
            .chain((0..40).map(|i| format!("live {i}")))
            .collect();
        assert_eq!(sent, owed[..sent.len()], "a gap in what was sent");
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    #[tokio::test]
    async fn a_renewed_stream_belongs_to_its_new_session() {
        use confab_runtime::revocation::Revocations;
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let alice = UserId::from_subject("t", "a");
        let chat = ChatId::new();
        let revocations = Revocations::in_memory(Duration::from_secs(3600));
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(Fixed(HashMap::from([(alice, vec![chat])]))),
            Arc::new(confab_runtime::presence::EmbeddedPresence::default()),
            16,
            100,
        )
        .with_revocations(Arc::clone(&revocations));
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        let session = |id: &str| StreamSession {
            id: Some(id.to_owned()),
            issued_at: 1,
        };
        let ends = |id: &str| Revocation {
            user: Some(alice),
            session: Some(id.to_owned()),
            before: i64::MAX,
        };
        let mut stream = hub
            .open_in(alice, session("first"), None)
            .await
            .expect("opens");
        stream.renew(session("second"));
        // The logout of the session it was opened in leaves it alone...
        hub.end_sessions(&ends("first"));
        bus.publish(&message(chat, "still here"))
            .await
            .expect("publishes");
        assert_eq!(next_text(&mut stream).await, "still here");
        // ...and one of its new session ends it.
        hub.end_sessions(&ends("second"));
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while stream.next().await.is_some() {}
        });
        ended.await.expect("the stream ends");

        // A logout recorded after the new token was checked, before the stream moved to its
        // session: the move ends the stream.
        let mut stream = hub
            .open_in(alice, session("third"), None)
            .await
            .expect("opens");
        revocations
            .revoke(ends("fourth"))
            .await
            .expect("records the logout");
        stream.renew(session("fourth"));
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while stream.next().await.is_some() {}
        });
        ended.await.expect("the stream ends");
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    /// More logouts at once than their announcements hold (a logout everywhere of a user with
    /// many sessions, a wave of back-channel logouts): the hub misses some announcements, and
    /// still ends the streams of every session they ended.
    #[tokio::test]
    async fn streams_of_logouts_missed_in_a_burst_end_all_the_same() {
        use confab_runtime::revocation::Revocations;
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let (alice, bob) = (
            UserId::from_subject("t", "a"),
            UserId::from_subject("t", "b"),
        );
        let chat = ChatId::new();
        let revocations = Revocations::in_memory(Duration::from_secs(3600));
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(Fixed(HashMap::from([
                (alice, vec![chat]),
                (bob, vec![chat]),
            ]))),
            Arc::new(confab_runtime::presence::EmbeddedPresence::default()),
            16,
            100,
        )
        .with_revocations(Arc::clone(&revocations));
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        let session = |id: &str| StreamSession {
            id: Some(id.to_owned()),
            issued_at: 1,
        };
        let mut ending = hub.open_in(alice, session("a"), None).await.expect("opens");
        let mut staying = hub.open_in(bob, session("b"), None).await.expect("opens");
        // In one go, without yielding to the hub (the test runs on one thread): the first
        // announcement is long gone from the channel when the hub next looks.
        for id in std::iter::once("a".to_owned()).chain((0..1_100).map(|i| format!("other {i}"))) {
            revocations
                .revoke(Revocation {
                    user: Some(alice),
                    session: Some(id),
                    before: i64::MAX,
                })
                .await
                .expect("records the logout");
        }
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while ending.next().await.is_some() {}
        });
        ended.await.expect("the stream of a logout missed ends");
        bus.publish(&message(chat, "still here"))
            .await
            .expect("publishes");
        assert_eq!(next_text(&mut staying).await, "still here");
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    #[tokio::test]
    async fn a_stream_beyond_the_per_user_cap_takes_the_place_of_the_users_oldest() {
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let [alice, bob, carol, dave] =
            ["a", "b", "c", "d"].map(|name| UserId::from_subject("t", name));
        let chat = ChatId::new();
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(Fixed(
                [alice, bob, carol, dave]
                    .into_iter()
                    .map(|user| (user, vec![chat]))
                    .collect(),
            )),
            Arc::new(confab_runtime::presence::EmbeddedPresence::default()),
            16,
            100,
        )
        .with_caps(Caps {
            per_node: 5,
            per_user: 3,
        });
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        let mut alices = Vec::new();
        for _ in 0..3 {
            alices.push(hub.open(alice, None).await.expect("opens"));
        }
        let mut bobs = hub.open(bob, None).await.expect("opens");
        bus.publish(&message(chat, "held"))
            .await
            .expect("publishes");
        for stream in alices.iter_mut().skip(1).chain([&mut bobs]) {
            assert_eq!(next_text(stream).await, "held");
        }

        // One more of alice's opens, and her oldest ends, saying why, after what it held.
        let mut newest = hub
            .open(alice, None)
            .await
            .expect("opens in the oldest's place");
        bus.publish(&message(chat, "after"))
            .await
            .expect("publishes");
        let mut oldest = alices.remove(0);
        assert_eq!(next_text(&mut oldest).await, "held");
        assert_eq!(next_text(&mut oldest).await, "closed:replaced");
        assert!(oldest.next().await.is_none(), "the closed item is the last");
        // The others go on, the new one gets events, and bob is unaffected.
        for stream in alices.iter_mut().chain([&mut newest, &mut bobs]) {
            assert_eq!(next_text(stream).await, "after");
        }
        {
            let routes = hub.routes.read().expect("lock");
            assert_eq!(routes.by_user[&alice].len(), 3, "alice holds her cap");
            assert_eq!(routes.connections.len(), 4);
        }

        // The node's cap still refuses a new user's stream...
        let carols = hub.open(carol, None).await.expect("opens");
        assert!(matches!(
            hub.open(dave, None).await,
            Err(OpenError::NodeFull)
        ));
        // ...but not one of a user at their own cap: it takes a place already counted.
        let _latest = hub.open(alice, None).await.expect("opens on a full node");
        let mut replaced = alices.remove(0);
        assert_eq!(next_text(&mut replaced).await, "closed:replaced");
        // The resume of a stream replaced already (its socket had not read that yet) opens
        // nothing: it took the place of her oldest stream left, another device's.
        let oldest_left = alices[0].registration.id;
        assert!(matches!(
            hub.open_replacing(&replaced, alice, StreamSession::default(), Some(0))
                .await,
            Err(OpenError::Ended)
        ));
        {
            let routes = hub.routes.read().expect("lock");
            assert!(
                routes.by_user[&alice].contains(&oldest_left),
                "the resume of a replaced stream pushed out another"
            );
        }

        // A stream opened to take the place of one of the same client's (a WebSocket's resume)
        // makes room with that one, which ends without a reason (its client resumes).
        let mut resumed = hub
            .open_replacing(&newest, alice, StreamSession::default(), Some(0))
            .await
            .expect("opens");
        assert_eq!(next_text(&mut resumed).await, "held");
        assert_eq!(next_text(&mut resumed).await, "after");
        let ended = tokio::time::timeout(Duration::from_secs(5), newest.next())
            .await
            .expect("ends");
        assert!(ended.is_none(), "ends without a reason: {ended:?}");
        bus.publish(&message(chat, "last"))
            .await
            .expect("publishes");
        assert_eq!(next_text(&mut alices[0]).await, "last", "not replaced");

        // A resume under its user's cap on a full node takes its own stream's place as well.
        let mut carol_resumed = hub
            .open_replacing(&carols, carol, StreamSession::default(), Some(0))
            .await
            .expect("a resume opens on a full node");
        assert_eq!(next_text(&mut carol_resumed).await, "held");
        {
            let routes = hub.routes.read().expect("lock");
            assert_eq!(routes.by_user[&carol].len(), 1, "carol's old stream is out");
            assert_eq!(routes.connections.len(), 5, "the node holds its cap");
        }
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    /// A log that counts the events each read hands out, to see how much of a replay the hub
    /// holds at once.
    struct CountingReads {
        log: Arc<dyn Bus>,
        /// The most events one read answered.
        largest: AtomicU64,
        /// Every event read answered, in total.
        total: AtomicU64,
        /// The chats each read was filtered to (`None`: every chat), in order.
        filters: Mutex<Vec<Option<HashSet<ChatId>>>>,
        /// Whether a page's read lets its caller's task go once before it reads (a read that is
        /// under way when its caller is polled).
        yielding: AtomicBool,
    }

    impl CountingReads {
        fn over(log: Arc<dyn Bus>) -> CountingReads {
            CountingReads {
                log,
                largest: AtomicU64::new(0),
                total: AtomicU64::new(0),
                filters: Mutex::default(),
                yielding: AtomicBool::new(false),
            }
        }

        fn filtered(&self, chats: ChatFilter<'_>) {
            let chats = match chats {
                ChatFilter::All => None,
                ChatFilter::Only(chats) => Some(chats.clone()),
            };
            self.filters.lock().expect("lock").push(chats);
        }

        fn counted(&self, events: &[LoggedEvent]) {
            let n = events.len() as u64;
            self.largest.fetch_max(n, Ordering::SeqCst);
            self.total.fetch_add(n, Ordering::SeqCst);
        }
    }

    #[async_trait]
    impl Bus for CountingReads {
        async fn publish(&self, envelope: &Envelope) -> Result<u64, BusError> {
            self.log.publish(envelope).await
        }
        async fn subscribe(
            &self,
        ) -> Result<futures::stream::BoxStream<'static, LoggedEvent>, BusError> {
            self.log.subscribe().await
        }
        async fn last_seq(&self) -> Result<u64, BusError> {
            self.log.last_seq().await
        }
        async fn read(
            &self,
            after: u64,
            up_to: u64,
            chats: ChatFilter<'_>,
            limit: usize,
        ) -> Result<Vec<LoggedEvent>, ReadError> {
            self.filtered(chats);
            let events = self.log.read(after, up_to, chats, limit).await?;
            self.counted(&events);
            Ok(events)
        }
        async fn read_page(
            &self,
            after: u64,
            up_to: u64,
            chats: ChatFilter<'_>,
            max: usize,
            max_scan: usize,
        ) -> Result<confab_runtime::bus::Page, ReadError> {
            self.filtered(chats);
            if self.yielding.load(Ordering::SeqCst) {
                tokio::task::yield_now().await;
            }
            let page = self
                .log
                .read_page(after, up_to, chats, max, max_scan)
                .await?;
            self.counted(&page.events);
            Ok(page)
        }
        async fn appended_at(&self, seq: u64) -> Result<Option<OffsetDateTime>, BusError> {
            self.log.appended_at(seq).await
        }
        async fn publish_ephemeral(&self, envelope: &Envelope) -> Result<(), BusError> {
            self.log.publish_ephemeral(envelope).await
        }
        async fn subscribe_ephemeral(
            &self,
        ) -> Result<futures::stream::BoxStream<'static, Envelope>, BusError> {
            self.log.subscribe_ephemeral().await
        }
        async fn check(&self) -> Result<(), BusError> {
            self.log.check().await
        }
    }

    /// A replay's page read that its caller drops (a socket's `select!` taking a frame that came
    /// first) goes on at the next call instead of starting again: a client sending frames while
    /// it replays would otherwise have each page read started over and over (on JetStream, a
    /// consumer each time, left to expire), and its replay never finish.
    #[tokio::test]
    async fn a_dropped_replay_read_goes_on_at_the_next_call() {
        use futures::FutureExt;
        let counting = Arc::new(CountingReads::over(Arc::new(
            EmbeddedBus::in_memory(LogSettings::default()).expect("log"),
        )));
        let bus: Arc<dyn Bus> = counting.clone();
        let me = UserId::from_subject("t", "me");
        let chat = ChatId::new();
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(Fixed(HashMap::from([(me, vec![chat])]))),
            Arc::new(confab_runtime::presence::EmbeddedPresence::default()),
            16,
            10_000,
        );
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        let mut last = 0;
        for i in 0..REPLAY_PAGE * 2 + 10 {
            last = bus
                .publish(&message(chat, &format!("missed {i}")))
                .await
                .expect("publishes");
        }
        dispatched_up_to(&hub, last).await;
        let mut stream = hub.open(me, Some(0)).await.expect("opens");
        assert_eq!(next_text(&mut stream).await, "missed 0");
        for i in 1..REPLAY_PAGE {
            assert_eq!(next_text(&mut stream).await, format!("missed {i}"));
        }
        counting.yielding.store(true, Ordering::SeqCst);
        let reads_before = counting.filters.lock().expect("lock").len();
        for _ in 0..20 {
            assert!(
                stream.next().now_or_never().is_none(),
                "the read is under way"
            );
        }
        assert_eq!(
            next_text(&mut stream).await,
            format!("missed {REPLAY_PAGE}")
        );
        let reads = counting.filters.lock().expect("lock").len() - reads_before;
        assert_eq!(reads, 1, "the page was read once, not once per call");
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    #[tokio::test]
    async fn a_resume_reads_the_log_in_pages_as_its_client_takes_them() {
        // However many events a resume replays, it holds a page of them at a time: one read of
        // the log answers at most this many, and it reads ahead of its client by at most that.
        const PAGE: u64 = 64;
        let counting = Arc::new(CountingReads::over(Arc::new(
            EmbeddedBus::in_memory(LogSettings::default()).expect("log"),
        )));
        let bus: Arc<dyn Bus> = counting.clone();
        let me = UserId::from_subject("t", "me");
        let (mine, joined_later) = (ChatId::new(), ChatId::new());
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(Fixed(HashMap::from([(me, vec![mine, joined_later])]))),
            Arc::new(confab_runtime::presence::EmbeddedPresence::default()),
            16,
            10_000,
        );
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        let after = bus
            .publish(&message(mine, "seen"))
            .await
            .expect("publishes");
        // The chat joined late has an event before the join, many pages before it: not theirs.
        bus.publish(&message(joined_later, "before my join"))
            .await
            .expect("publishes");
        let mut expected = Vec::new();
        for i in 0..300 {
            let text = format!("missed {i}");
            bus.publish(&message(mine, &text)).await.expect("publishes");
            expected.push(text);
        }
        bus.publish(&joined(joined_later, me))
            .await
            .expect("publishes");
        expected.push("member.joined".into());
        bus.publish(&message(joined_later, "after my join"))
            .await
            .expect("publishes");
        expected.push("after my join".into());
        let last = bus
            .publish(&message(mine, "last missed"))
            .await
            .expect("publishes");
        expected.push("last missed".into());
        dispatched_up_to(&hub, last).await;

        let mut stream = hub.open(me, Some(after)).await.expect("opens");
        assert!(
            counting.largest.load(Ordering::SeqCst) <= PAGE,
            "one read of the log answered {} events",
            counting.largest.load(Ordering::SeqCst)
        );
        let read_at_open = counting.total.load(Ordering::SeqCst);
        let mut seen = Vec::new();
        for _ in 0..expected.len() {
            seen.push(next_text(&mut stream).await);
            let read_since = counting.total.load(Ordering::SeqCst) - read_at_open;
            assert!(
                read_since <= seen.len() as u64 + PAGE,
                "{read_since} events read for {} taken",
                seen.len()
            );
        }
        assert_eq!(seen, expected, "exactly what was missed, in order");
        assert!(counting.largest.load(Ordering::SeqCst) <= PAGE);
        // Live events follow the replay, none twice.
        bus.publish(&message(mine, "live"))
            .await
            .expect("publishes");
        assert_eq!(next_text(&mut stream).await, "live");
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    #[tokio::test]
    async fn a_resume_replays_the_chats_left_meanwhile_up_to_the_leaving() {
        let me = UserId::from_subject("t", "me");
        // `gone`: left while away. `long_gone`: left before the position resumed from.
        let (stayed, gone, long_gone) = (ChatId::new(), ChatId::new(), ChatId::new());
        let now = OffsetDateTime::now_utc();
        let (bus, hub, shutdown, worker) = started_hub(WithLeft {
            chats: vec![stayed],
            left: vec![
                left_at(gone, now + Duration::from_secs(1)),
                left_at(long_gone, now - Duration::from_secs(1)),
            ],
        })
        .await;
        bus.publish(&left(long_gone, me)).await.expect("publishes");
        let after = bus
            .publish(&message(stayed, "seen"))
            .await
            .expect("publishes");
        let mut last = 0;
        for envelope in [
            message(gone, "while in"),
            message(long_gone, "long after leaving"),
            left(gone, me),
            message(gone, "after leaving"),
            message(stayed, "end"),
        ] {
            last = bus.publish(&envelope).await.expect("publishes");
        }
        dispatched_up_to(&hub, last).await;

        let mut stream = hub.open(me, Some(after)).await.expect("opens");
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.push(next_text(&mut stream).await);
        }
        assert_eq!(seen, ["while in", "member.left", "end"]);
        // Live, the chat left stays out.
        bus.publish(&message(gone, "still out"))
            .await
            .expect("publishes");
        bus.publish(&message(stayed, "live"))
            .await
            .expect("publishes");
        assert_eq!(next_text(&mut stream).await, "live");
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    #[tokio::test]
    async fn a_resume_reads_only_the_chats_left_after_its_position() {
        // Far more leavings than a filter of the log may name, all well before the position: none
        // of those chats has an event in the range for the user, and the replay reads none.
        let counting = Arc::new(CountingReads::over(Arc::new(
            EmbeddedBus::in_memory(LogSettings::default()).expect("log"),
        )));
        let bus: Arc<dyn Bus> = counting.clone();
        let me = UserId::from_subject("t", "me");
        let stayed = ChatId::new();
        let long_ago = OffsetDateTime::now_utc() - Duration::from_secs(3_600);
        let leavings: Vec<LeftChat> = (0..MAX_LEFT_CHATS_REPLAYED)
            .map(|_| left_at(ChatId::new(), long_ago))
            .collect();
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::new(WithLeft {
                chats: vec![stayed],
                left: leavings.clone(),
            }),
            Arc::new(confab_runtime::presence::EmbeddedPresence::default()),
            16,
            100,
        );
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        for chat in leavings.iter().take(3) {
            bus.publish(&left(chat.chat_id, me))
                .await
                .expect("publishes");
        }
        let after = bus
            .publish(&message(stayed, "seen"))
            .await
            .expect("publishes");
        let last = bus
            .publish(&message(stayed, "end"))
            .await
            .expect("publishes");
        dispatched_up_to(&hub, last).await;

        counting.filters.lock().expect("lock").clear();
        let mut stream = hub.open(me, Some(after)).await.expect("opens");
        assert_eq!(next_text(&mut stream).await, "end");
        let filters: Vec<HashSet<ChatId>> = counting
            .filters
            .lock()
            .expect("lock")
            .iter()
            .flatten()
            .cloned()
            .collect();
        assert!(!filters.is_empty(), "the replay read the log");
        for filter in filters {
            assert_eq!(
                (filter.len(), filter.contains(&stayed)),
                (1, true),
                "the replay reads the chat the user is in, and none they left before the position"
            );
        }
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    #[tokio::test]
    async fn a_late_copy_of_a_leaving_lets_nothing_of_the_chat_through() {
        let me = UserId::from_subject("t", "me");
        let (stayed, removed) = (ChatId::new(), ChatId::new());
        let removal = left(removed, me);
        let (bus, hub, shutdown, worker) = started_hub(WithLeft {
            chats: vec![stayed],
            left: vec![left_at(removed, removal.at)],
        })
        .await;
        bus.publish(&removal).await.expect("publishes");
        let after = bus
            .publish(&message(stayed, "seen"))
            .await
            .expect("publishes");
        bus.publish(&message(removed, "after the removal"))
            .await
            .expect("publishes");
        // Published again past the log's duplicate window: kept, under the same time.
        let copy = Envelope {
            id: uuid::Uuid::now_v7(),
            ..removal.clone()
        };
        bus.publish(&copy).await.expect("publishes");
        bus.publish(&message(removed, "after the copy"))
            .await
            .expect("publishes");
        let last = bus
            .publish(&message(stayed, "end"))
            .await
            .expect("publishes");
        dispatched_up_to(&hub, last).await;

        let mut stream = hub.open(me, Some(after)).await.expect("opens");
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.push(next_text(&mut stream).await);
        }
        assert_eq!(seen, ["member.left", "end"]);
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    #[tokio::test]
    async fn a_late_copy_of_a_leaving_far_back_in_the_log_lets_nothing_of_the_chat_through() {
        // The removal was made a minute and a half ago, and its original `member.left` is further
        // back in the log than a resume looks: the times alone tell, when the event resumed after
        // was made well after the removal, else the time the log appended the copy.
        for position_age in [Duration::from_secs(85), Duration::ZERO] {
            assert_eq!(
                late_copy_after_position(Duration::from_secs(90), position_age).await,
                ["member.left", "end"],
                "position made {position_age:?} ago"
            );
        }
    }

    /// Publishes `count` messages of a chat nobody in the test is in.
    async fn publish_elsewhere(bus: &Arc<dyn Bus>, count: usize) {
        let elsewhere = ChatId::new();
        for i in 0..count {
            bus.publish(&message(elsewhere, &format!("elsewhere {i}")))
                .await
                .expect("publishes");
        }
    }

    /// What a resume delivers when the user's removal from a chat, made `removal_age` ago, is in
    /// the log [`LEFT_AROUND_LOOKBACK`] events before the event resumed after (made
    /// `position_age` ago), and a copy of it after.
    async fn late_copy_after_position(
        removal_age: Duration,
        position_age: Duration,
    ) -> Vec<String> {
        let me = UserId::from_subject("t", "me");
        let (stayed, removed) = (ChatId::new(), ChatId::new());
        let now = OffsetDateTime::now_utc();
        let removal = Envelope {
            at: now - removal_age,
            ..left(removed, me)
        };
        let (bus, hub, shutdown, worker) = started_hub(WithLeft {
            chats: vec![stayed],
            left: vec![left_at(removed, removal.at)],
        })
        .await;
        bus.publish(&removal).await.expect("publishes");
        publish_elsewhere(&bus, LEFT_AROUND_LOOKBACK).await;
        let after = bus
            .publish(&Envelope {
                at: now - position_age,
                ..message(stayed, "seen")
            })
            .await
            .expect("publishes");
        bus.publish(&message(removed, "after the removal"))
            .await
            .expect("publishes");
        // Published again, and kept, past the log's duplicate window (as long after the removal
        // was made as that is, now): the same envelope, under a new id, which this log would
        // otherwise drop as it has not seen its window pass.
        let copy = Envelope {
            id: uuid::Uuid::now_v7(),
            ..removal.clone()
        };
        bus.publish(&copy).await.expect("publishes");
        bus.publish(&message(removed, "after the copy"))
            .await
            .expect("publishes");
        let last = bus
            .publish(&message(stayed, "end"))
            .await
            .expect("publishes");
        dispatched_up_to(&hub, last).await;

        let mut stream = hub.open(me, Some(after)).await.expect("opens");
        let seen = texts_up_to_end(&mut stream).await;
        shutdown.cancel();
        worker.await.expect("worker ends");
        seen
    }

    #[tokio::test]
    async fn a_leaving_recorded_by_a_clock_behind_keeps_the_chat_until_its_member_left() {
        let me = UserId::from_subject("t", "me");
        let (stayed, removed) = (ChatId::new(), ChatId::new());
        // The api process that removes the user runs five seconds behind the one that stamps the
        // event resumed after: its removal, made after that event, is stamped (and recorded)
        // before it.
        let removal = Envelope {
            at: OffsetDateTime::now_utc() - Duration::from_secs(5),
            ..left(removed, me)
        };
        let (bus, hub, shutdown, worker) = started_hub(WithLeft {
            chats: vec![stayed],
            left: vec![left_at(removed, removal.at)],
        })
        .await;
        let after = bus
            .publish(&message(stayed, "seen"))
            .await
            .expect("publishes");
        let mut last = 0;
        for envelope in [
            message(removed, "before the removal"),
            removal,
            message(removed, "after the removal"),
            message(stayed, "end"),
        ] {
            last = bus.publish(&envelope).await.expect("publishes");
        }
        dispatched_up_to(&hub, last).await;

        let mut stream = hub.open(me, Some(after)).await.expect("opens");
        assert_eq!(
            texts_up_to_end(&mut stream).await,
            ["before the removal", "member.left", "end"],
            "a member until the removal, as the live stream had it"
        );
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    #[tokio::test]
    async fn a_late_copy_of_a_leaving_before_a_rejoin_lets_nothing_before_the_rejoin_through() {
        let me = UserId::from_subject("t", "me");
        let (stayed, chat) = (ChatId::new(), ChatId::new());
        let now = OffsetDateTime::now_utc();
        // Left a minute and a half ago, before the event resumed after (further back in the log
        // than a resume looks); back in after it, and out again now: the store keeps the latest
        // leaving only, close to the position.
        let first_leaving = Envelope {
            at: now - Duration::from_secs(90),
            ..left(chat, me)
        };
        let second_leaving = left(chat, me);
        let (bus, hub, shutdown, worker) = started_hub(WithLeft {
            chats: vec![stayed],
            left: vec![left_at(chat, second_leaving.at)],
        })
        .await;
        bus.publish(&first_leaving).await.expect("publishes");
        publish_elsewhere(&bus, LEFT_AROUND_LOOKBACK).await;
        let after = bus
            .publish(&Envelope {
                at: now - Duration::from_secs(30),
                ..message(stayed, "seen")
            })
            .await
            .expect("publishes");
        // A copy of the first leaving, published again past the log's duplicate window.
        let copy = Envelope {
            id: uuid::Uuid::now_v7(),
            ..first_leaving
        };
        let mut last = 0;
        for envelope in [
            message(chat, "while out"),
            copy,
            message(chat, "still out"),
            joined(chat, me),
            message(chat, "back in"),
            second_leaving,
            message(chat, "out again"),
            message(stayed, "end"),
        ] {
            last = bus.publish(&envelope).await.expect("publishes");
        }
        dispatched_up_to(&hub, last).await;

        let mut stream = hub.open(me, Some(after)).await.expect("opens");
        assert_eq!(
            texts_up_to_end(&mut stream).await,
            [
                "member.left",
                "member.joined",
                "back in",
                "member.left",
                "end"
            ]
        );
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    #[tokio::test]
    async fn a_leaving_whose_member_left_is_not_in_the_log_yet_lets_nothing_of_the_chat_through() {
        let me = UserId::from_subject("t", "me");
        let (stayed, chat) = (ChatId::new(), ChatId::new());
        // Joined shortly before the event resumed after; removed around its time, and the
        // removal's `member.left` is still held back (a publish to be retried).
        let (bus, hub, shutdown, worker) = started_hub(WithLeft {
            chats: vec![stayed],
            left: vec![left_at(chat, OffsetDateTime::now_utc())],
        })
        .await;
        bus.publish(&joined(chat, me)).await.expect("publishes");
        let after = bus
            .publish(&message(stayed, "seen"))
            .await
            .expect("publishes");
        let mut last = 0;
        for envelope in [message(chat, "after the removal"), message(stayed, "end")] {
            last = bus.publish(&envelope).await.expect("publishes");
        }
        dispatched_up_to(&hub, last).await;

        let mut stream = hub.open(me, Some(after)).await.expect("opens");
        assert_eq!(
            texts_up_to_end(&mut stream).await,
            ["end"],
            "out of the chat, as the store has it"
        );
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    /// Opens `me`'s stream (fresh, or resumed after `resume_after`) on a hub holding 4 events per
    /// connection, while the store's read of their chats waits: the node dispatches an event of
    /// their chat, then more of other chats than the buffer holds, and only then the read
    /// answers. Answers what the stream delivers up to an event of their chat published after.
    async fn opened_through_a_busy_pending_phase(resume_after: Option<u64>) -> Vec<String> {
        let bus: Arc<dyn Bus> =
            Arc::new(EmbeddedBus::in_memory(LogSettings::default()).expect("log"));
        let me = UserId::from_subject("t", "me");
        let mine = ChatId::new();
        let membership = Arc::new(Gated::new(vec![mine]));
        let hub = Hub::new(
            Arc::clone(&bus),
            Arc::clone(&membership) as Arc<dyn Membership>,
            Arc::new(confab_runtime::presence::EmbeddedPresence::default()),
            4,
            100,
        );
        let shutdown = CancellationToken::new();
        let worker = hub.start(shutdown.clone()).await.expect("starts");
        let before = bus
            .publish(&message(mine, "before the open"))
            .await
            .expect("publishes");
        dispatched_up_to(&hub, before).await;
        let resume_after = resume_after.map(|_| before);
        let opening = {
            let hub = hub.clone();
            tokio::spawn(async move { hub.open(me, resume_after).await })
        };
        membership.asked.notified().await;
        let mut last = bus
            .publish(&message(mine, "while it opens"))
            .await
            .expect("publishes");
        let elsewhere = ChatId::new();
        for i in 0..12 {
            last = bus
                .publish(&message(elsewhere, &format!("elsewhere {i}")))
                .await
                .expect("publishes");
        }
        dispatched_up_to(&hub, last).await;
        membership.release();
        let mut stream = tokio::time::timeout(Duration::from_secs(20), opening)
            .await
            .expect("the open ends")
            .expect("the task")
            .expect("opens");
        bus.publish(&message(mine, "end")).await.expect("publishes");
        let seen = texts_up_to_end(&mut stream).await;
        shutdown.cancel();
        worker.await.expect("worker ends");
        seen
    }

    #[tokio::test]
    async fn a_fresh_stream_opening_on_a_busy_node_is_not_dropped() {
        assert_eq!(
            opened_through_a_busy_pending_phase(None).await,
            ["while it opens", "end"]
        );
    }

    #[tokio::test]
    async fn a_resume_opening_on_a_busy_node_is_not_dropped() {
        assert_eq!(
            opened_through_a_busy_pending_phase(Some(0)).await,
            ["while it opens", "end"]
        );
    }

    #[tokio::test]
    async fn a_member_out_of_a_chat_when_their_stream_opened_gets_its_leaving() {
        let me = UserId::from_subject("t", "me");
        // `removed`: the store took them out before the stream read their chats, and the
        // removal's event comes after.
        let (stayed, removed) = (ChatId::new(), ChatId::new());
        let (bus, hub, shutdown, worker) =
            started_hub(Fixed(HashMap::from([(me, vec![stayed])]))).await;
        let mut stream = hub.open(me, None).await.expect("opens");
        for envelope in [
            message(removed, "before, not routed"),
            left(removed, me),
            message(removed, "after"),
            message(stayed, "end"),
        ] {
            bus.publish(&envelope).await.expect("publishes");
        }
        assert_eq!(next_text(&mut stream).await, "member.left");
        assert_eq!(next_text(&mut stream).await, "end");
        shutdown.cancel();
        worker.await.expect("worker ends");
    }

    #[tokio::test]
    async fn routes_by_interest_and_follows_joins_and_leaves() {
        let (alice, bob) = (
            UserId::from_subject("t", "a"),
            UserId::from_subject("t", "b"),
        );
        let (shared, alices, later) = (ChatId::new(), ChatId::new(), ChatId::new());
        let membership = Fixed(HashMap::from([
            (alice, vec![shared, alices]),
            (bob, vec![shared]),
        ]));
        let (bus, hub, shutdown, worker) = started_hub(membership).await;
        let mut a = hub.open(alice, None).await.expect("opens");
        let mut b = hub.open(bob, None).await.expect("opens");
        for envelope in [
            message(alices, "for alice"),
            message(shared, "for both"),
            joined(later, bob),
            message(later, "bob joined"),
            left(shared, bob),
            message(shared, "bob left"),
        ] {
            bus.publish(&envelope).await.expect("publishes");
        }
        assert_eq!(next_text(&mut a).await, "for alice");
        assert_eq!(next_text(&mut a).await, "for both");
        assert_eq!(next_text(&mut b).await, "for both");
        assert_eq!(next_text(&mut b).await, "member.joined");
        assert_eq!(next_text(&mut b).await, "bob joined");
        assert_eq!(next_text(&mut b).await, "member.left");
        assert_eq!(next_text(&mut a).await, "member.left");
        assert_eq!(next_text(&mut a).await, "bob left");
        bus.publish(&message(alices, "end"))
            .await
            .expect("publishes");
        assert_eq!(next_text(&mut a).await, "end");
        let mut after_leaving = Vec::new();
        while let Ok(Some(Item::Event(event))) =
            tokio::time::timeout(Duration::from_millis(50), b.next()).await
        {
            after_leaving.push(text(&event.envelope));
        }
        assert!(
            after_leaving.iter().all(|t| t.starts_with("user.")),
            "bob got nothing logged after he left, and nothing of alice's chat: {after_leaving:?}"
        );

        // A connection that stops reading is dropped after its buffer; the others go on.
        let mut last = 0;
        for i in 0..20 {
            last = bus
                .publish(&message(alices, &format!("flood {i}")))
                .await
                .expect("publishes");
        }
        dispatched_up_to(&hub, last).await;
        let mut received = 0;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(5), a.next()).await {
            received += 1;
        }
        assert_eq!(received, 16, "alice was dropped when her buffer filled");
        shutdown.cancel();
        worker.await.expect("worker ends");
        assert!(!hub.is_alive());
        assert!(matches!(
            hub.open(bob, None).await,
            Err(OpenError::NotReady)
        ));
    }
}
