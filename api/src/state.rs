//! What every operation works with: the store, the bus, identity, the cursor signer, the write
//! coalescers and the provisioning cache. Cheap to clone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use confab_runtime::bus::Bus;
use confab_runtime::identity::Identity;
use confab_runtime::presence::{EmbeddedPresence, Presence};
use confab_runtime::push_queue::PushQueue;
use confab_runtime::revocation::Revocations;
use confab_runtime::search::Search;
use confab_runtime::signed::{Keyring, Signer};

/// How long a paging cursor stays valid unless configured (`cursor_ttl_secs`).
pub const DEFAULT_CURSOR_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
use confab_schema::{ChatId, Signal, User, UserId};

use crate::coalesce::Coalescer;
use crate::domain::attachments::AttachmentSettings;
use crate::domain::calls::CallSettings;
use crate::domain::circles::CircleSettings;
use crate::domain::devices::PushSettings;
use crate::domain::pushes::PushSettingsCache;
use crate::limits::RateLimits;
use crate::outbox::Outbox;
use crate::store::Store;

/// The least time between two writes of one chat's position in its members' lists, and of one
/// author's read marker in a chat, while a burst keeps them coming (see `coalesce`): a busy chat
/// costs the store at most twenty of each a second, however quick it is. A send waits for the
/// write that carries it, so in such a burst a send's answer may take up to this much longer;
/// its event is published before, and is not delayed.
const BOOKKEEPING_PACE: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct ApiState {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) bus: Arc<dyn Bus>,
    pub(crate) identity: Arc<dyn Identity>,
    pub(crate) cursors: Signer,
    /// A chat's position in its members' lists, written once per burst rather than per signal,
    /// with the members to move it for and the newest signal.
    pub(crate) chat_activity: Arc<Coalescer<ChatId, (Vec<UserId>, Signal)>>,
    /// The push fan-out of each large chat: one pass in flight, the newest message next.
    pub(crate) large_chat_pushes: Arc<Coalescer<ChatId, Signal>>,
    /// Authors' read markers, moved by their own signals.
    pub(crate) author_markers: Arc<Coalescer<(ChatId, UserId), ()>>,
    /// Users provisioned recently, and when: see `domain::users`.
    pub(crate) provisioned: Arc<Mutex<HashMap<UserId, (User, Instant)>>>,
    /// How long the event log recognises a re-published event (`bus.duplicate_window_secs`): a
    /// retried send within it publishes its signal's event again, in case the first attempt could
    /// not.
    pub(crate) republish_window: Duration,
    /// When each (user, chat) last published a `typing` event: see `domain::typing`.
    pub(crate) typing: Arc<Mutex<HashMap<(UserId, ChatId), Instant>>>,
    /// Presence records (written by the notifiers) and custom statuses.
    pub(crate) presence: Arc<dyn Presence>,
    /// Per user, when their status was last announced, and whether one more is coming: see
    /// `domain::presence`.
    pub(crate) status_events: Arc<Mutex<HashMap<UserId, (Instant, bool)>>>,
    /// How push registrations are checked.
    pub(crate) push: PushSettings,
    /// Members' push settings as last read: see `domain::pushes`.
    pub(crate) push_settings: Arc<PushSettingsCache>,
    /// Pushes waiting for their delay (`None`: no pushes scheduled).
    pub(crate) push_queue: Option<Arc<dyn PushQueue>>,
    /// The message search engine (`None`: search answers 503).
    pub(crate) search: Option<Arc<dyn Search>>,
    /// Where attachments go (`None`: uploads and downloads answer 503).
    pub(crate) attachments: Option<AttachmentSettings>,
    /// Image decodes running at once (thumbnails are made off the request path).
    pub(crate) image_work: Arc<tokio::sync::Semaphore>,
    /// This process as a writer of the event outbox.
    pub(crate) outbox: Arc<Outbox>,
    /// Where logouts are recorded (`None`: logouts answer 503).
    pub(crate) revocations: Option<Arc<Revocations>>,
    /// Requests per user and class (`limits`); off unless set.
    pub(crate) rate_limits: Arc<RateLimits>,
    /// How circles and the matching queues behave.
    pub(crate) circles: CircleSettings,
    /// The ring timeout and the TURN servers.
    pub(crate) calls: CallSettings,
    /// Publishes retried in the background.
    pub(crate) retrying_publishes: crate::domain::events::RetryingPublishes,
    /// Events taking members out of a chat whose publish is being retried: the chat's later
    /// events wait for them.
    pub(crate) pending_leaves: crate::domain::events::PendingLeaves,
}

impl ApiState {
    pub fn new(
        store: Arc<dyn Store>,
        bus: Arc<dyn Bus>,
        identity: Arc<dyn Identity>,
        keyring: &Keyring,
    ) -> ApiState {
        ApiState {
            store,
            bus,
            identity,
            cursors: Signer::new(keyring, "cursor", DEFAULT_CURSOR_TTL),
            chat_activity: Arc::new(Coalescer::paced(BOOKKEEPING_PACE)),
            large_chat_pushes: Arc::default(),
            author_markers: Arc::new(Coalescer::paced(BOOKKEEPING_PACE)),
            provisioned: Arc::default(),
            republish_window: confab_runtime::bus::LogSettings::default().duplicate_window,
            typing: Arc::default(),
            presence: Arc::new(EmbeddedPresence::default()),
            status_events: Arc::default(),
            push: PushSettings::default(),
            push_settings: Arc::default(),
            push_queue: None,
            search: None,
            attachments: None,
            image_work: Arc::new(tokio::sync::Semaphore::new(2)),
            outbox: Arc::default(),
            revocations: None,
            rate_limits: Arc::new(RateLimits::off()),
            circles: CircleSettings::default(),
            calls: CallSettings::default(),
            retrying_publishes: Default::default(),
            pending_leaves: Default::default(),
        }
    }

    /// Where logouts are recorded.
    pub fn with_revocations(mut self, revocations: Arc<Revocations>) -> ApiState {
        self.revocations = Some(revocations);
        self
    }

    /// How long paging cursors stay valid.
    pub fn with_cursor_ttl(mut self, ttl: Duration) -> ApiState {
        self.cursors = self.cursors.with_ttl(ttl);
        self
    }

    /// How push registrations are checked.
    pub fn with_push(mut self, push: PushSettings) -> ApiState {
        self.push = push;
        self
    }

    /// Where pushes wait for their delay.
    pub fn with_push_queue(mut self, queue: Arc<dyn PushQueue>) -> ApiState {
        self.push_queue = Some(queue);
        self
    }

    /// The engine message search queries.
    pub fn with_search(mut self, search: Arc<dyn Search>) -> ApiState {
        self.search = Some(search);
        self
    }

    /// Where attachments are stored, and how they are served.
    pub fn with_attachments(mut self, attachments: AttachmentSettings) -> ApiState {
        self.attachments = Some(attachments);
        self
    }

    /// The rate limits per user (`limits.send`, `limits.edit`…).
    pub fn with_rate_limits(mut self, limits: RateLimits) -> ApiState {
        self.rate_limits = Arc::new(limits);
        self
    }

    /// How circles and the matching queues behave.
    pub fn with_circles(mut self, circles: CircleSettings) -> ApiState {
        self.circles = circles;
        self
    }

    /// How calls ring, and the TURN servers they use.
    pub fn with_calls(mut self, calls: CallSettings) -> ApiState {
        self.calls = calls;
        self
    }

    /// Where presence records live (shared with the notifiers).
    pub fn with_presence(mut self, presence: Arc<dyn Presence>) -> ApiState {
        self.presence = presence;
        self
    }

    /// Sets the window within which a retried send publishes its signal's event again; the log's
    /// duplicate window.
    pub fn with_republish_window(mut self, window: Duration) -> ApiState {
        self.republish_window = window;
        self
    }
}
