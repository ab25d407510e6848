//! Sends the pushes that came due: claims them from the [`PushQueue`] (each to one node), and
//! delivers each to every device of its user. Web Push for real (RFC 8291 payload encryption,
//! RFC 8292 VAPID); UnifiedPush as a plain POST to the distributor's endpoint; FCM and APNs in
//! [`crate::push_fcm`] and [`crate::push_apns`]. A device whose push service says it is gone
//! (404, 410, or the provider's own reason) is removed; 429 and 5xx are retried with backoff,
//! not before the service's `Retry-After`, within the push's time to live; a push past it is
//! dropped, not sent late. A request that may have reached the service is not sent twice.
//!
//! A push is remembered as it goes out, so that reading the chat later sends a withdrawal:
//! a data message with the same `Topic` (Web Push) or collapse key, on which the client's service
//! worker or app takes the chat's notification away.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_runtime::presence::now_ms;
use confab_runtime::push_queue::{PendingPush, PushKind, PushQueue, preview};
use confab_runtime::vapid::VapidKeys;
use confab_runtime::webpush;
use confab_schema::call::CallState;
use confab_schema::push::{Device, Platform};
use confab_schema::{ChatId, DeviceId, Signal, SignalId, SignalKind, UserId};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::push_apns::Apns;
use crate::push_fcm::Fcm;

/// Where the sender finds a user's devices, and forgets one that is gone.
#[async_trait]
pub trait DeviceDirectory: Send + Sync + 'static {
    async fn devices_of(&self, user: UserId) -> Result<Vec<Device>, String>;
    async fn remove(&self, user: UserId, device: DeviceId) -> Result<(), String>;
    /// How far `user` has read or received `chat` (the further of their read and delivered
    /// markers), if at all.
    async fn reached(&self, user: UserId, chat: ChatId) -> Result<Option<SignalId>, String>;
    /// The message `id` of `chat` as it is now.
    async fn message(&self, chat: ChatId, id: SignalId) -> Result<Announced, String>;
    /// Up to `limit` signals of `chat` older than `before`, newest first, deleted ones included.
    async fn signals_before(
        &self,
        chat: ChatId,
        before: SignalId,
        limit: usize,
    ) -> Result<Vec<Signal>, String>;
    /// The name `user` is shown by, if they are known.
    async fn display_name(&self, user: UserId) -> Result<Option<String>, String>;
    /// Whether `user` is a member of `chat` now.
    async fn is_member(&self, user: UserId, chat: ChatId) -> Result<bool, String>;
}

/// What became of the message a push announces by the time it goes out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Announced {
    /// Still there: its text now (edited since, perhaps).
    Text(Option<String>),
    /// Deleted, or gone with its chat.
    Deleted,
}

/// How due pushes are looked for and sent.
#[derive(Clone)]
pub struct PushSender {
    pub queue: Arc<dyn PushQueue>,
    pub devices: Arc<dyn DeviceDirectory>,
    pub http: reqwest::Client,
    /// Without keys, Web Push devices get nothing.
    pub vapid: Option<VapidKeys>,
    pub subject: String,
    /// Signed VAPID tokens, reused per push service.
    pub vapid_tokens: Arc<webpush::VapidTokens>,
    /// How often the queue is polled for due pushes.
    pub poll: Duration,
    /// Without a service-account key, FCM devices get nothing.
    pub fcm: Option<Arc<Fcm>>,
    /// Without a token key, APNs devices get nothing.
    pub apns: Option<Arc<Apns>>,
}

/// The HTTP client pushes go out with. It follows no redirect: push services answer, they do not
/// redirect, and a redirect could lead a push (and its body) to the deployment's own network. A
/// name must resolve to a public address unless `allow_internal` (local development, tests):
/// registration refuses internal addresses written as such, and this catches the names.
pub fn http_client(timeout: Duration, allow_internal: bool) -> reqwest::Result<reqwest::Client> {
    let builder = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none());
    if allow_internal {
        builder.build()
    } else {
        builder.dns_resolver(Arc::new(PublicOnly)).build()
    }
}

/// Resolves a name to its public addresses only, and fails when it has none.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let addresses: Vec<std::net::SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|address| confab_runtime::addresses::is_public(address.ip()))
                .collect();
            if addresses.is_empty() {
                return Err(format!("{} has no public address", name.as_str()).into());
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// What became of one push to one device.
pub(crate) enum Delivery {
    Sent,
    Gone,
    Retry,
    /// Retry, not before the push service's `Retry-After`.
    RetryAfter(Duration),
    Failed,
}

const RETRIES: u32 = 4;
/// Pushes claimed at a time.
const BATCH: usize = 256;
/// Pushes in flight at a time.
const CONCURRENCY: usize = 64;
/// How many times a failed read for a claimed push (its devices, the recipient's membership and
/// markers, the message) is tried again (after 250, 500 and 1,000 ms).
const READ_RETRIES: u32 = 3;
/// How long a shutdown waits for the pushes this node claimed to go out.
const DRAIN: Duration = Duration::from_secs(10);
/// How many signals before a deleted newest message are read, at most, for the newest one that
/// is still there.
const REMAINING_SCAN: usize = 100;

/// Whether `signal` is of a kind a push announces: a message, or a call nobody answered (as
/// `api::domain::pushes` schedules them).
fn announces(signal: &Signal) -> bool {
    signal.kind == SignalKind::Message
        || signal
            .call
            .as_ref()
            .is_some_and(|call| call.state == CallState::Missed)
}

impl PushSender {
    /// Polls for due pushes until `shutdown`, and sends them. Claiming and sending overlap: the
    /// claimer hands pushes to the senders through a bounded channel, so it claims no more than
    /// they can take (a claimed push is out of the queue), and after a full batch it claims again
    /// at once, so a backlog drains at the speed of the push services, not of the poll.
    pub fn start(self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let (handoff, claimed) = futures::channel::mpsc::channel::<PendingPush>(BATCH);
            let sending = {
                let sender = self.clone();
                claimed.for_each_concurrent(CONCURRENCY, move |push| {
                    let sender = sender.clone();
                    async move { sender.send(push).await }
                })
            };
            // Claiming stops at shutdown, which closes the handoff: the senders then finish what
            // was claimed (it is out of the queue, so nobody else would send it), for up to
            // `DRAIN`; a push service that is down or slow does not hold the shutdown longer.
            let claiming = self.claim_until(shutdown.clone(), handoff);
            let queue = Arc::clone(&self.queue);
            let work = futures::future::join(claiming, sending);
            tokio::pin!(work);
            tokio::select! {
                _ = &mut work => {}
                () = shutdown.cancelled() => {
                    // What this node held for later goes back at once, for the nodes that stay,
                    // while the claimed pushes go out.
                    let release = tokio::time::timeout(Duration::from_secs(5), queue.release());
                    let (_, drained) =
                        futures::future::join(release, tokio::time::timeout(DRAIN, &mut work))
                            .await;
                    if drained.is_err() {
                        tracing::warn!("claimed pushes not sent by the end of the shutdown's drain");
                    }
                    return;
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), queue.release()).await;
        })
    }

    /// Claims due pushes into `handoff` until `shutdown`.
    async fn claim_until(
        &self,
        shutdown: CancellationToken,
        mut handoff: futures::channel::mpsc::Sender<PendingPush>,
    ) {
        use futures::SinkExt;
        let mut every = tokio::time::interval(self.poll);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backlog = false;
        // Polled every `poll`: an outage would otherwise log a line each time.
        let failures = confab_runtime::push_queue::OutageLog::default();
        while !shutdown.is_cancelled() {
            if !backlog {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = every.tick() => {}
                }
            }
            let claimed = match self.queue.claim_due(now_ms(), BATCH).await {
                Ok(claimed) => {
                    failures.recovered("claim");
                    claimed
                }
                Err(error) => {
                    failures.warn("claim", &error, "push queue unavailable");
                    backlog = false;
                    continue;
                }
            };
            backlog = claimed.more;
            for push in claimed.pushes {
                if handoff.send(push).await.is_err() {
                    return;
                }
            }
        }
    }

    async fn send(&self, mut push: PendingPush) {
        if push.expires_ms < now_ms() {
            metrics::counter!("confab_pushes_expired_total").increment(1);
            // The withdrawal it took the place of, if any, goes all the same.
            match push.dropped(now_ms()) {
                Some(withdrawal) => push = withdrawal,
                None => return,
            }
        }
        // Claimed, the push is out of the queue: a store that fails for a moment is tried again,
        // a few times (about 2 s), not for the push's whole time to live, which would hold a
        // sender slot for as long while the store is down.
        let devices = match self
            .read_again_on_failure(&push, "devices", || self.devices.devices_of(push.user))
            .await
        {
            Ok(devices) => devices,
            Err(error) => {
                tracing::warn!(%error, "devices unavailable; push dropped");
                metrics::counter!("confab_pushes_failed_total", "platform" => "any").increment(1);
                return;
            }
        };
        if devices.is_empty() {
            return;
        }
        if push.kind == PushKind::Messages && !self.last_look(&mut push).await {
            // Not going out: the withdrawal it took the place of (its notification would have
            // replaced the one taken away) goes instead, if there was one.
            match push.dropped(now_ms()) {
                Some(withdrawal) => push = withdrawal,
                None => return,
            }
        }
        // Remembered before it goes out, so a read or a deletion while it is on its way still
        // withdraws it (a withdrawal of a push that then failed is harmless).
        self.remember(&push).await;
        if push.kind == PushKind::Messages && !self.look_again(&push).await {
            return;
        }
        let payload = payload(&push);
        futures::future::join_all(
            devices
                .iter()
                .map(|device| self.deliver(&push, device, payload.as_bytes())),
        )
        .await;
    }

    /// The look after `push` was remembered; false when it is not to go out after all. A read
    /// of the chat, a deletion of the message it announces, or the user's removal from the chat,
    /// that came after the last look and before [`Self::remember`] wrote its record found the
    /// push neither pending (claimed) nor sent (not yet recorded), so it did nothing to it; one
    /// after the record finds it. Each writes its change (the marker, the tombstone, the
    /// membership) before it looks for the push, so this look or theirs sees the other. A push
    /// dropped here is taken back through the queue as the read, the deletion or the removal
    /// would have taken it back had it come after the record (`PushQueue::cancel`,
    /// `PushQueue::message_deleted`): the record just written replaced the one of an earlier
    /// push, whose notification this one would have replaced. (So a deletion takes away the
    /// notification of the burst's other messages, as it does once the push is out:
    /// re-announcing them here would need a second record and a second look, each with a window
    /// of its own.) A marker that cannot be read lets it go, as at the last look; a message or a
    /// membership that cannot be read stops it.
    async fn look_again(&self, push: &PendingPush) -> bool {
        let (reached, message, member) = futures::join!(
            self.devices.reached(push.user, push.chat),
            self.read_again_on_failure(push, "the message", || {
                self.devices.message(push.chat, push.newest)
            }),
            self.read_again_on_failure(push, "membership", || {
                self.devices.is_member(push.user, push.chat)
            }),
        );
        let reached = reached.unwrap_or_else(|error| {
            tracing::debug!(%error, "markers unavailable; sending anyway");
            None
        });
        let member = match member {
            Ok(member) => member,
            Err(error) => {
                tracing::warn!(%error, "membership unavailable; push dropped");
                metrics::counter!("confab_pushes_failed_total", "platform" => "any").increment(1);
                return false;
            }
        };
        // Out of the chat, or read: everything it announced is withdrawn.
        let taken_back = if !member || reached >= Some(push.newest) {
            self.queue
                .cancel(push.user, push.chat, push.newest, now_ms())
                .await
        } else {
            match message {
                Ok(Announced::Text(_)) => return true,
                Ok(Announced::Deleted) => {
                    self.queue
                        .message_deleted(push.user, push.chat, push.newest, now_ms())
                        .await
                }
                Err(error) => {
                    tracing::warn!(%error, "the message is unavailable; push dropped");
                    metrics::counter!("confab_pushes_failed_total", "platform" => "any")
                        .increment(1);
                    return false;
                }
            }
        };
        metrics::counter!("confab_pushes_cancelled_total").increment(1);
        if let Err(error) = taken_back {
            tracing::warn!(%error, "a push dropped after it was remembered was not taken back");
        }
        false
    }

    /// Remembers `push` as sent, for its withdrawal.
    async fn remember(&self, push: &PendingPush) {
        if let Err(error) = self.queue.sent(push, now_ms()).await {
            tracing::warn!(%error, "a push was not remembered; it will not be withdrawn");
        }
    }

    /// The last look before a push of messages rings; false when it is not to go out, and then
    /// it is not sent. A marker that moved past what it announces while it waited (or before a
    /// large chat's background pass scheduled it) makes it unneeded, and so does the user's
    /// leaving the chat (or being removed): nothing of a chat goes to someone who is no longer in
    /// it. Their settings are not read: they were when it was scheduled, and a mute or previews
    /// turned off since changed its queue entry then (`PushQueue::drop_pending`,
    /// `PushQueue::drop_previews`). Membership or the message that cannot be read (after a few
    /// tries) drop it: it must not go on what is not known, to someone who may have left, or
    /// with the id and author of a message that may be deleted.
    async fn last_look(&self, push: &mut PendingPush) -> bool {
        let (reached, member) = futures::join!(
            self.read_again_on_failure(push, "markers", || self
                .devices
                .reached(push.user, push.chat)),
            self.read_again_on_failure(push, "membership", || self
                .devices
                .is_member(push.user, push.chat)),
        );
        match member {
            Ok(true) => {}
            Ok(false) => {
                // Out of the chat: a notification of it they still have goes too. (Their removal
                // withdraws it, but a push scheduled from a member list read before the removal
                // may have been pending when it looked, which kept the record.) Up to what this
                // push announces only: a push scheduled later may be for a member added back.
                let taken_back = self
                    .queue
                    .cancel(push.user, push.chat, push.newest, now_ms())
                    .await;
                if let Err(error) = taken_back {
                    tracing::warn!(%error, "a leaver's notification was not withdrawn");
                }
                metrics::counter!("confab_pushes_cancelled_total").increment(1);
                return false;
            }
            Err(error) => {
                tracing::warn!(%error, "membership unavailable; push dropped");
                metrics::counter!("confab_pushes_failed_total", "platform" => "any").increment(1);
                return false;
            }
        }
        let reached = match reached {
            Ok(Some(reached)) if reached >= push.newest => {
                metrics::counter!("confab_pushes_cancelled_total").increment(1);
                return false;
            }
            Ok(reached) => reached,
            Err(error) => {
                // Unlike membership, a marker tells nothing private: at worst it rings for what
                // was read.
                tracing::debug!(%error, "markers unavailable; sending anyway");
                None
            }
        };
        // The text it shows is the message's as it is now: never a deleted one's, nor the
        // words an edit took back. (A deletion also takes the message out of the pending push,
        // which then says so, but one claimed already is on its way here.)
        let message = if push.newest_deleted {
            Ok(Announced::Deleted)
        } else {
            self.read_again_on_failure(push, "the message", || {
                self.devices.message(push.chat, push.newest)
            })
            .await
        };
        match message {
            Ok(Announced::Deleted) => {
                if !self.announce_remaining(push, reached).await {
                    metrics::counter!("confab_pushes_cancelled_total").increment(1);
                    return false;
                }
            }
            Ok(Announced::Text(text)) => {
                if push.preview.is_some() {
                    push.preview = text.as_deref().map(preview);
                }
            }
            Err(error) => {
                tracing::warn!(%error, "the message is unavailable; push dropped");
                metrics::counter!("confab_pushes_failed_total", "platform" => "any").increment(1);
                return false;
            }
        }
        true
    }

    /// `read`, tried again after 250, 500 and 1,000 ms while it fails and `push` is not past its
    /// time to live.
    async fn read_again_on_failure<T, Read, Reading>(
        &self,
        push: &PendingPush,
        what: &str,
        read: Read,
    ) -> Result<T, String>
    where
        Read: Fn() -> Reading,
        Reading: std::future::Future<Output = Result<T, String>>,
    {
        let mut wait = Duration::from_millis(250);
        let mut attempt = 0;
        loop {
            match read().await {
                Ok(value) => return Ok(value),
                Err(error) if attempt < READ_RETRIES && push.expires_ms > now_ms() => {
                    tracing::warn!(%error, what, "unavailable; trying again");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Makes `push`, whose newest message was deleted, announce the newest of its other messages
    /// that is still there (newer than `reached`, not the user's own): its id, author and text
    /// instead of the deleted one's, which must not reach a device by any of them. False when
    /// none is left, or they cannot be read: then it goes nowhere.
    async fn announce_remaining(&self, push: &mut PendingPush, reached: Option<SignalId>) -> bool {
        let older = match self
            .devices
            .signals_before(push.chat, push.newest, REMAINING_SCAN)
            .await
        {
            Ok(older) => older,
            Err(error) => {
                tracing::debug!(%error, "the messages before a deleted one are unavailable; push dropped");
                return false;
            }
        };
        // The messages it announces besides the deleted newest one (which its count leaves out
        // when the queue knew of the deletion); the newest of them still there takes its place,
        // and counts itself and those older.
        let mut left = if push.newest_deleted {
            push.count
        } else {
            push.count.saturating_sub(1)
        };
        let mut remaining = None;
        for signal in older {
            if left == 0 || reached.is_some_and(|reached| signal.id <= reached) {
                break;
            }
            if !announces(&signal) || signal.author_id == push.user {
                continue;
            }
            if signal.deleted {
                left -= 1;
                continue;
            }
            remaining = Some(signal);
            break;
        }
        let Some(remaining) = remaining else {
            return false;
        };
        let author_name = match self.devices.display_name(remaining.author_id).await {
            Ok(name) => name.unwrap_or_default(),
            Err(error) => {
                tracing::debug!(%error, "the author's name is unavailable; sent without it");
                String::new()
            }
        };
        push.newest = remaining.id;
        push.newest_deleted = false;
        push.author = remaining.author_id;
        push.author_name = author_name;
        push.count = left;
        if push.preview.is_some() {
            push.preview = remaining.text.as_deref().map(preview);
        }
        true
    }

    /// Sends `payload` to `device`, retrying what may pass.
    async fn deliver(&self, push: &PendingPush, device: &Device, payload: &[u8]) {
        let platform = device.platform.as_str();
        let kind = match push.kind {
            PushKind::Messages => "messages",
            PushKind::Withdrawal => "withdrawal",
        };
        let mut delay = Duration::from_millis(250);
        for attempt in 0..=RETRIES {
            let left_ms = push.expires_ms - now_ms();
            if left_ms <= 0 {
                metrics::counter!("confab_pushes_expired_total").increment(1);
                return;
            }
            let started = Instant::now();
            let outcome = match device.platform {
                Platform::Webpush => self.web_push(push, device, payload, left_ms).await,
                Platform::Unifiedpush => self.unified_push(device, payload).await,
                Platform::Fcm | Platform::Apns => match (device.platform, &self.fcm, &self.apns) {
                    (Platform::Fcm, Some(fcm), _) => {
                        fcm.deliver(push, device, payload, left_ms).await
                    }
                    (Platform::Apns, _, Some(apns)) => apns.deliver(push, device, payload).await,
                    _ => {
                        // Not configured (`push.fcm`, `push.apns`).
                        metrics::counter!("confab_pushes_unsupported_total", "platform" => platform)
                            .increment(1);
                        return;
                    }
                },
            };
            metrics::histogram!("confab_push_provider_seconds", "platform" => platform)
                .record(started.elapsed().as_secs_f64());
            match outcome {
                Delivery::Sent => {
                    metrics::counter!("confab_pushes_sent_total", "platform" => platform, "kind" => kind)
                        .increment(1);
                    return;
                }
                Delivery::Gone => {
                    metrics::counter!("confab_push_devices_gone_total", "platform" => platform)
                        .increment(1);
                    if let Err(error) = self.devices.remove(push.user, device.id).await {
                        tracing::warn!(%error, "a gone device was not removed");
                    }
                    return;
                }
                Delivery::Failed => break,
                Delivery::Retry if attempt < RETRIES => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Delivery::RetryAfter(wait) if attempt < RETRIES => {
                    // A pause that outlasts the push would only hold its sending slot from the
                    // pushes behind it.
                    let wait = wait.max(delay);
                    let left = u64::try_from(push.expires_ms - now_ms()).unwrap_or(0);
                    if wait >= Duration::from_millis(left) {
                        metrics::counter!("confab_pushes_expired_total").increment(1);
                        return;
                    }
                    tokio::time::sleep(wait).await;
                    delay *= 2;
                }
                Delivery::Retry | Delivery::RetryAfter(_) => break,
            }
        }
        metrics::counter!("confab_pushes_failed_total", "platform" => platform).increment(1);
    }

    async fn web_push(
        &self,
        push: &PendingPush,
        device: &Device,
        payload: &[u8],
        left_ms: i64,
    ) -> Delivery {
        let (Some(vapid), Some(endpoint), Some(keys)) =
            (&self.vapid, &device.endpoint, &device.keys)
        else {
            return Delivery::Failed;
        };
        let body = match webpush::encrypt(&keys.p256dh, &keys.auth, payload) {
            Ok(body) => body,
            Err(error) => {
                tracing::warn!(%error, "push not encrypted");
                return Delivery::Failed;
            }
        };
        let authorization = match self.vapid_tokens.authorization(
            vapid,
            endpoint,
            &self.subject,
            time::OffsetDateTime::now_utc().unix_timestamp(),
        ) {
            Ok(authorization) => authorization,
            Err(error) => {
                tracing::warn!(%error, "push not signed");
                return Delivery::Failed;
            }
        };
        // One chat's pushes replace each other on the device (RFC 8030 `Topic`).
        let topic = URL_SAFE_NO_PAD.encode(push.chat.0.as_bytes());
        let response = self
            .http
            .post(endpoint)
            .header("content-encoding", "aes128gcm")
            .header("content-type", "application/octet-stream")
            .header("ttl", (left_ms / 1000).max(1).to_string())
            .header("urgency", "normal")
            .header("topic", topic)
            .header("authorization", authorization)
            .body(body)
            .send()
            .await;
        classify(response)
    }

    async fn unified_push(&self, device: &Device, payload: &[u8]) -> Delivery {
        let Some(endpoint) = &device.endpoint else {
            return Delivery::Failed;
        };
        classify(self.http.post(endpoint).body(payload.to_vec()).send().await)
    }
}

/// What the device's app or service worker gets: new messages of a chat (a preview only when the
/// recipient allows it), or the withdrawal of that chat's notification.
fn payload(push: &PendingPush) -> String {
    match push.kind {
        PushKind::Messages => {
            let mut payload = serde_json::json!({
                "type": "messages",
                "chat_id": push.chat,
                "signal_id": push.newest,
                "author_id": push.author,
                "author_name": push.author_name,
                "count": push.count,
            });
            if let Some(preview) = &push.preview {
                payload["preview"] = preview.as_str().into();
            }
            payload.to_string()
        }
        PushKind::Withdrawal => serde_json::json!({
            "type": "withdrawn",
            "chat_id": push.chat,
            "up_to": push.newest,
        })
        .to_string(),
    }
}

/// What a Web Push service's or UnifiedPush distributor's answer means: a 429 or 5xx is tried
/// again, not before its `Retry-After` when it gives one.
fn classify(response: reqwest::Result<reqwest::Response>) -> Delivery {
    match response {
        Ok(response) => match response.status().as_u16() {
            200..=299 => Delivery::Sent,
            404 | 410 => Delivery::Gone,
            429 | 500..=599 => crate::push_fcm::retry_after(response.headers())
                .map_or(Delivery::Retry, Delivery::RetryAfter),
            _ => Delivery::Failed,
        },
        Err(error) => unanswered(&error),
    }
}

/// What a request that got no answer means. Only one that never reached the service (it could
/// not connect) is tried again: one that timed out or broke off after it was sent may have been
/// accepted, and a second copy would make the device alert twice (the notification is shown
/// with `renotify`), which is worse than a push lost.
pub(crate) fn unanswered(error: &reqwest::Error) -> Delivery {
    if error.is_connect() {
        Delivery::Retry
    } else {
        tracing::debug!(%error, "a push got no answer; not sent again");
        Delivery::Failed
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use confab_runtime::push_queue::{EmbeddedPushQueue, ReplacedWithdrawal};

    use super::*;

    /// A user's devices and the store's answers as a test sets them.
    struct Directory {
        device: Device,
        member: bool,
        /// How many of the next reads of each name fail.
        failures: Mutex<HashMap<&'static str, usize>>,
        /// How far the user has read or received the chat.
        reached: Mutex<Option<SignalId>>,
        /// After this many reads of the markers, they read as reaching this: the user read the
        /// chat meanwhile.
        read_meanwhile: Option<(usize, SignalId)>,
        /// After this many reads of a message, it reads as deleted: its author deleted it
        /// meanwhile.
        deleted_meanwhile: Option<usize>,
        /// After this many reads of the membership, the user is out: removed meanwhile.
        removed_meanwhile: Option<usize>,
        /// The chat's signals, newest first; empty, every message reads as still there.
        history: Vec<Signal>,
        /// The reads made of it, by name, in order.
        reads: Mutex<Vec<&'static str>>,
        /// A read of the devices waits while a test holds this.
        gate: tokio::sync::Mutex<()>,
        /// Told when a read of the devices starts.
        devices_read: tokio::sync::Notify,
    }

    impl Directory {
        fn new(device: Device, member: bool, history: Vec<Signal>) -> Directory {
            Directory {
                device,
                member,
                failures: Mutex::default(),
                reached: Mutex::default(),
                read_meanwhile: None,
                deleted_meanwhile: None,
                removed_meanwhile: None,
                history,
                reads: Mutex::default(),
                gate: tokio::sync::Mutex::new(()),
                devices_read: tokio::sync::Notify::new(),
            }
        }

        /// Makes the next `count` reads named `what` fail.
        fn failing(self, what: &'static str, count: usize) -> Directory {
            self.failures.lock().unwrap().insert(what, count);
            self
        }

        /// Makes the markers read as reaching `to` after `looks` reads of them.
        fn read_after(self, looks: usize, to: SignalId) -> Directory {
            Directory {
                read_meanwhile: Some((looks, to)),
                ..self
            }
        }

        /// Makes every message read as deleted after `reads` reads of messages.
        fn deleted_after(self, reads: usize) -> Directory {
            Directory {
                deleted_meanwhile: Some(reads),
                ..self
            }
        }

        /// Makes the user read as out of the chat after `reads` reads of the membership.
        fn removed_after(self, reads: usize) -> Directory {
            Directory {
                removed_meanwhile: Some(reads),
                ..self
            }
        }

        /// How many times `what` was read.
        fn times_read(&self, what: &str) -> usize {
            self.reads
                .lock()
                .unwrap()
                .iter()
                .filter(|r| **r == what)
                .count()
        }

        /// Records the read `what`; an error when it is to fail.
        fn read(&self, what: &'static str) -> Result<(), String> {
            self.reads.lock().unwrap().push(what);
            let mut failures = self.failures.lock().unwrap();
            match failures.get_mut(what) {
                Some(left) if *left > 0 => {
                    *left -= 1;
                    Err("the store is unavailable".into())
                }
                _ => Ok(()),
            }
        }
    }

    #[async_trait]
    impl DeviceDirectory for Directory {
        async fn devices_of(&self, _user: UserId) -> Result<Vec<Device>, String> {
            self.devices_read.notify_one();
            drop(self.gate.lock().await);
            self.read("devices_of")?;
            Ok(vec![self.device.clone()])
        }
        async fn remove(&self, _user: UserId, _device: DeviceId) -> Result<(), String> {
            Ok(())
        }
        async fn reached(&self, _user: UserId, _chat: ChatId) -> Result<Option<SignalId>, String> {
            self.read("reached")?;
            match self.read_meanwhile {
                Some((after, to)) if self.times_read("reached") > after => Ok(Some(to)),
                _ => Ok(*self.reached.lock().unwrap()),
            }
        }
        async fn message(&self, _chat: ChatId, id: SignalId) -> Result<Announced, String> {
            self.read("message")?;
            if self
                .deleted_meanwhile
                .is_some_and(|after| self.times_read("message") > after)
            {
                return Ok(Announced::Deleted);
            }
            Ok(match self.history.iter().find(|signal| signal.id == id) {
                Some(signal) if signal.deleted => Announced::Deleted,
                Some(signal) => Announced::Text(signal.text.clone()),
                None => Announced::Text(Some("the text as it is now".into())),
            })
        }
        async fn signals_before(
            &self,
            _chat: ChatId,
            before: SignalId,
            limit: usize,
        ) -> Result<Vec<Signal>, String> {
            self.read("signals_before")?;
            Ok(self
                .history
                .iter()
                .filter(|signal| signal.id < before)
                .take(limit)
                .cloned()
                .collect())
        }
        async fn display_name(&self, user: UserId) -> Result<Option<String>, String> {
            self.read("display_name")?;
            Ok(["alice", "carol"]
                .into_iter()
                .find(|name| UserId::from_subject("push-test", name) == user)
                .map(str::to_owned))
        }
        async fn is_member(&self, _user: UserId, _chat: ChatId) -> Result<bool, String> {
            self.read("is_member")?;
            if self
                .removed_meanwhile
                .is_some_and(|after| self.times_read("is_member") > after)
            {
                return Ok(false);
            }
            Ok(self.member)
        }
    }

    /// A UnifiedPush distributor on loopback that keeps what it is sent.
    /// Its `/redirect` answers with a redirect to `/up`; the port it listens on.
    async fn distributor() -> (u16, Arc<Mutex<Vec<String>>>) {
        let received: Arc<Mutex<Vec<String>>> = Arc::default();
        let kept = Arc::clone(&received);
        let router = axum::Router::new()
            .route(
                "/up",
                axum::routing::post(move |body: String| async move {
                    kept.lock().unwrap().push(body);
                    axum::http::StatusCode::CREATED
                }),
            )
            .route(
                "/redirect",
                axum::routing::post(|| async {
                    (
                        axum::http::StatusCode::TEMPORARY_REDIRECT,
                        [(axum::http::header::LOCATION, "/up")],
                    )
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, router).await });
        (port, received)
    }

    /// A sender whose user is a member of the push's chat or not, and whose first `failures`
    /// reads of the devices fail; the push it is to send; what its distributor receives.
    async fn setup(
        member: bool,
        failures: usize,
    ) -> (PushSender, PendingPush, Arc<Mutex<Vec<String>>>) {
        setup_at("127.0.0.1", "/up", member, failures, true).await
    }

    /// [`setup`] with the device's endpoint at `host` and `path` of the distributor, and a
    /// sender that may reach internal addresses or not.
    async fn setup_at(
        host: &str,
        path: &str,
        member: bool,
        failures: usize,
        allow_internal: bool,
    ) -> (PushSender, PendingPush, Arc<Mutex<Vec<String>>>) {
        let (port, received) = distributor().await;
        let endpoint = format!("http://{host}:{port}{path}");
        let user = UserId::from_subject("push-test", "bob");
        let device = Device {
            id: DeviceId(uuid::Uuid::new_v4()),
            user_id: user,
            platform: Platform::Unifiedpush,
            endpoint: Some(endpoint),
            keys: None,
            token: None,
            topic: None,
            created_at: time::OffsetDateTime::now_utc(),
        };
        // The file outlives the case; the OS cleans its temp directory.
        let path = tempfile::tempdir().unwrap().keep().join("push.sqlite3");
        let sender = PushSender {
            queue: Arc::new(EmbeddedPushQueue::open(&path).unwrap()),
            devices: Arc::new(
                Directory::new(device, member, Vec::new()).failing("devices_of", failures),
            ),
            http: http_client(Duration::from_secs(5), allow_internal).unwrap(),
            vapid: None,
            subject: "mailto:test@example.com".into(),
            vapid_tokens: Arc::default(),
            poll: Duration::from_millis(100),
            fcm: None,
            apns: None,
        };
        let now = now_ms();
        let push = PendingPush {
            user,
            chat: ChatId::new(),
            kind: PushKind::Messages,
            newest: SignalId::new(),
            author: UserId::from_subject("push-test", "alice"),
            author_name: "alice".into(),
            preview: Some("the text as it was".into()),
            count: 1,
            newest_deleted: false,
            due_ms: now,
            expires_ms: now + 60_000,
            replaced: None,
        };
        (sender, push, received)
    }

    /// A push claimed for someone who has left the chat (or was removed) since it was scheduled
    /// goes nowhere, whatever became of their markers.
    #[tokio::test]
    async fn a_push_for_someone_no_longer_in_the_chat_is_not_sent() {
        let (sender, push, received) = setup(false, 0).await;
        sender.send(push.clone()).await;
        assert!(
            received.lock().unwrap().is_empty(),
            "pushed to a former member: {:?}",
            received.lock().unwrap()
        );

        let (sender, push, received) = setup(true, 0).await;
        sender.send(push).await;
        let received = received.lock().unwrap();
        assert_eq!(received.len(), 1, "a member's push goes out");
        assert!(
            received[0].contains("the text as it is now"),
            "{received:?}"
        );
    }

    /// A claimed push is out of the queue: a store that fails for a moment when its devices are
    /// read delays it, and loses nothing.
    #[tokio::test]
    async fn a_push_whose_devices_fail_to_read_for_a_moment_is_still_sent() {
        let (sender, push, received) = setup(true, 2).await;
        sender.send(push).await;
        assert_eq!(
            received.lock().unwrap().len(),
            1,
            "the push was dropped after its devices failed to read"
        );
    }

    /// One push of messages costs the reads that decide whether and what it announces (devices,
    /// and membership, markers and the message before and after it is remembered), and no read
    /// of the recipient's settings: a mute or previews turned off while it waits change its queue
    /// entry when they are made.
    #[tokio::test]
    async fn a_push_reads_no_settings() {
        let (sender, push, received) = setup(true, 0).await;
        let directory = Arc::new(Directory::new(
            sender.devices.devices_of(push.user).await.unwrap()[0].clone(),
            true,
            Vec::new(),
        ));
        let sender = PushSender {
            devices: Arc::clone(&directory) as Arc<dyn DeviceDirectory>,
            ..sender
        };
        sender.send(push).await;
        assert_eq!(received.lock().unwrap().len(), 1, "the push goes out");
        let mut reads = directory.reads.lock().unwrap().clone();
        reads.sort_unstable();
        assert_eq!(
            reads,
            [
                "devices_of",
                "is_member",
                "is_member",
                "message",
                "message",
                "reached",
                "reached"
            ]
        );
    }

    /// The pushes `sender`'s queue has due now, by kind.
    async fn due_now(sender: &PushSender) -> Vec<PushKind> {
        let claimed = sender.queue.claim_due(now_ms() + 1, 10).await.unwrap();
        claimed.pushes.into_iter().map(|push| push.kind).collect()
    }

    /// A sender whose earlier push of the chat rang and was remembered, and the next push, of a
    /// newer message.
    async fn after_an_earlier_push() -> (PushSender, PendingPush, Arc<Mutex<Vec<String>>>) {
        let (sender, push, received) = setup(true, 0).await;
        let earlier = PendingPush {
            newest: SignalId::new(),
            ..push.clone()
        };
        let push = PendingPush {
            newest: SignalId::new(),
            ..push
        };
        sender.send(earlier).await;
        assert_eq!(received.lock().unwrap().len(), 1, "the earlier push rings");
        (sender, push, received)
    }

    /// A push that took the place of a waiting withdrawal (its notification would replace the one
    /// taken away), and then does not go out, its message read before the sender's last look,
    /// sends that withdrawal instead: the old notification, of a message read, would stay.
    #[tokio::test]
    async fn a_push_read_before_it_goes_sends_the_withdrawal_it_replaced() {
        let (sender, push, received) = setup(true, 0).await;
        let earlier = SignalId::new();
        let push = PendingPush {
            newest: SignalId::new(),
            replaced: Some(ReplacedWithdrawal {
                newest: earlier,
                author: push.author,
            }),
            ..push
        };
        let (sender, _) = reading_through(sender, &push, |device| {
            Directory::new(device, true, Vec::new()).read_after(0, push.newest)
        })
        .await;
        sender.send(push).await;
        let rang = received.lock().unwrap().clone();
        assert_eq!(rang.len(), 1, "{rang:?}");
        let body: serde_json::Value = serde_json::from_str(&rang[0]).expect("JSON");
        assert_eq!(
            (body["type"].as_str(), body["up_to"].as_str()),
            (Some("withdrawn"), Some(earlier.to_string().as_str())),
            "{body}"
        );
    }

    /// A read that lands after the sender's last look at the markers and before it remembers
    /// the push finds the push neither pending (it was claimed) nor sent (not yet remembered), so
    /// it withdraws nothing: the push must not ring for a message already read, and the
    /// notification of the push before it, which the read covers too, is still taken away.
    #[tokio::test]
    async fn a_read_between_the_last_look_and_the_record_stops_the_push() {
        let (sender, push, received) = after_an_earlier_push().await;
        let (sender, _) = reading_through(sender, &push, |device| {
            Directory::new(device, true, Vec::new()).read_after(1, push.newest)
        })
        .await;
        sender.send(push).await;
        let rang = received.lock().unwrap().clone();
        assert_eq!(
            rang.len(),
            1,
            "rang for a message read before it went out: {rang:?}"
        );
        assert_eq!(
            due_now(&sender).await,
            [PushKind::Withdrawal],
            "the earlier push, read too, is to be taken away"
        );

        // Read up to an older message only, it still goes out.
        let (sender, push, received) = setup(true, 0).await;
        let older = SignalId::new();
        let push = PendingPush {
            newest: SignalId::new(),
            ..push
        };
        let (sender, _) = reading_through(sender, &push, |device| {
            Directory::new(device, true, Vec::new()).read_after(1, older)
        })
        .await;
        sender.send(push).await;
        assert_eq!(
            received.lock().unwrap().len(),
            1,
            "an older read stops nothing"
        );
        assert!(due_now(&sender).await.is_empty(), "nothing to take away");
    }

    /// A message deleted after the sender read its text and before it remembered the push found
    /// the push neither pending nor sent: its text, author and id must not reach a device.
    #[tokio::test]
    async fn a_deletion_between_the_last_look_and_the_record_stops_the_push() {
        let (sender, push, received) = setup(true, 0).await;
        let (sender, directory) = reading_through(sender, &push, |device| {
            Directory::new(device, true, Vec::new()).deleted_after(1)
        })
        .await;
        sender.send(push).await;
        assert!(
            received.lock().unwrap().is_empty(),
            "a deleted message's push went out: {:?}",
            received.lock().unwrap()
        );
        assert_eq!(
            directory.times_read("message"),
            2,
            "the message is read again"
        );
        assert_eq!(
            due_now(&sender).await,
            [PushKind::Withdrawal],
            "taken back as the deletion would once the push was out"
        );
    }

    /// A member removed after the sender's last look and before it remembered the push: their
    /// removal found nothing to withdraw, so nothing of the chat must reach them now, and the
    /// notification of the push before it is taken away too, as the removal would have.
    #[tokio::test]
    async fn a_removal_between_the_last_look_and_the_record_stops_the_push() {
        let (sender, push, received) = after_an_earlier_push().await;
        let (sender, directory) = reading_through(sender, &push, |device| {
            Directory::new(device, true, Vec::new()).removed_after(1)
        })
        .await;
        sender.send(push).await;
        let rang = received.lock().unwrap().clone();
        assert_eq!(
            rang.len(),
            1,
            "a push reached a member removed before it went out: {rang:?}"
        );
        assert_eq!(
            directory.times_read("is_member"),
            2,
            "membership is read again"
        );
        assert_eq!(
            due_now(&sender).await,
            [PushKind::Withdrawal],
            "the earlier push is taken away, as the removal would have"
        );
    }

    /// A push claimed for someone no longer in the chat (scheduled from a member list read
    /// before their removal) goes nowhere, and the notification of the chat they still have is
    /// withdrawn: their removal may have found this push pending, and left the record alone.
    #[tokio::test]
    async fn a_push_for_someone_out_of_the_chat_withdraws_what_they_were_sent() {
        let (sender, push, received) = after_an_earlier_push().await;
        let (sender, _) = reading_through(sender, &push, |device| {
            Directory::new(device, false, Vec::new())
        })
        .await;
        sender.send(push).await;
        assert_eq!(received.lock().unwrap().len(), 1, "no push for a leaver");
        assert_eq!(
            due_now(&sender).await,
            [PushKind::Withdrawal],
            "the notification they had is withdrawn"
        );
    }

    /// A push endpoint that redirects is not followed: a redirect would take the push to an
    /// address nobody registered, such as one on the deployment's own network.
    #[tokio::test]
    async fn a_push_endpoint_that_redirects_is_not_followed() {
        let (sender, push, received) = setup_at("127.0.0.1", "/redirect", true, 0, true).await;
        sender.send(push).await;
        assert!(
            received.lock().unwrap().is_empty(),
            "the push followed its endpoint's redirect"
        );
    }

    /// A push endpoint whose name resolves to an internal address gets nothing, unless internal
    /// addresses are allowed.
    #[tokio::test]
    async fn a_push_endpoint_named_onto_an_internal_address_gets_nothing() {
        let (sender, push, received) = setup_at("localhost", "/up", true, 0, false).await;
        sender.send(push).await;
        assert!(
            received.lock().unwrap().is_empty(),
            "a push reached an internal address by name"
        );
        let (sender, push, received) = setup_at("localhost", "/up", true, 0, true).await;
        sender.send(push).await;
        assert_eq!(received.lock().unwrap().len(), 1, "allowed, it goes out");
    }

    /// A message of `chat` by `author` (a name of the `push-test` issuer), deleted or not.
    fn message_of(chat: ChatId, author: &str, text: &str, deleted: bool) -> Signal {
        Signal {
            id: SignalId::new(),
            chat_id: chat,
            kind: SignalKind::Message,
            author_id: UserId::from_subject("push-test", author),
            created_at: time::OffsetDateTime::now_utc(),
            nonce: None,
            text: (!deleted).then(|| text.to_owned()),
            reply_to: None,
            attachments: Vec::new(),
            edited_at: None,
            deleted,
            reactions: Default::default(),
            call: None,
        }
    }

    /// `sender` with `history` (oldest first) as its chat's signals.
    async fn with_history(
        sender: PushSender,
        push: &PendingPush,
        mut history: Vec<Signal>,
    ) -> PushSender {
        history.reverse();
        let device = sender.devices.devices_of(push.user).await.unwrap();
        PushSender {
            devices: Arc::new(Directory::new(device[0].clone(), true, history)),
            ..sender
        }
    }

    /// A push whose newest message was deleted before it went out (claimed before the deletion
    /// could take it back) shows nothing of that message, not even who wrote it: it announces the
    /// newest of its messages still there, by that one's author, with that one's text, counting
    /// one less.
    #[tokio::test]
    async fn a_push_whose_newest_message_was_deleted_announces_the_one_before() {
        let (sender, mut push, received) = setup(true, 0).await;
        let kept = message_of(push.chat, "carol", "carol's words", false);
        let gone = message_of(push.chat, "alice", "alice's secret", true);
        push.newest = gone.id;
        push.author = gone.author_id;
        push.author_name = "alice".into();
        push.preview = Some("alice's secret".into());
        push.count = 2;
        let sender = with_history(sender, &push, vec![kept.clone(), gone]).await;
        sender.send(push).await;
        let received = received.lock().unwrap();
        assert_eq!(received.len(), 1, "the push goes out: {received:?}");
        assert!(!received[0].contains("alice"), "{}", received[0]);
        let payload: serde_json::Value = serde_json::from_str(&received[0]).unwrap();
        assert_eq!(payload["signal_id"], kept.id.0.to_string());
        assert_eq!(payload["author_id"], kept.author_id.0.to_string());
        assert_eq!(payload["author_name"], "carol");
        assert_eq!(payload["preview"], "carol's words");
        assert_eq!(payload["count"], 1);
    }

    /// A push that the queue already knew had lost its newest message to a deletion (which left
    /// it only that message's id, and counts the others) announces the newest of the others still
    /// there, with its text when previews are allowed, without reading the deleted one.
    #[tokio::test]
    async fn a_push_whose_newest_message_the_queue_knew_deleted_announces_the_one_before() {
        let (sender, mut push, received) = setup(true, 0).await;
        let kept = message_of(push.chat, "carol", "carol's words", false);
        let gone = message_of(push.chat, "alice", "alice's secret", true);
        push.newest = gone.id;
        push.newest_deleted = true;
        push.author = gone.author_id;
        push.author_name = String::new();
        push.preview = Some(String::new());
        push.count = 1;
        let sender = with_history(sender, &push, vec![kept.clone(), gone]).await;
        sender.send(push).await;
        let received = received.lock().unwrap();
        assert_eq!(received.len(), 1, "the push goes out: {received:?}");
        assert!(!received[0].contains("alice"), "{}", received[0]);
        let payload: serde_json::Value = serde_json::from_str(&received[0]).unwrap();
        assert_eq!(payload["signal_id"], kept.id.0.to_string());
        assert_eq!(payload["author_name"], "carol");
        assert_eq!(payload["preview"], "carol's words");
        assert_eq!(payload["count"], 1);
    }

    /// When every message a push announces is deleted, or what is left was read already, it goes
    /// nowhere; so it does when the older messages cannot be told.
    #[tokio::test]
    async fn a_push_with_nothing_left_to_announce_is_not_sent() {
        let (sender, mut push, received) = setup(true, 0).await;
        let older = message_of(push.chat, "carol", "announced by an earlier push", false);
        let first = message_of(push.chat, "carol", "carol's secret", true);
        let own = message_of(push.chat, "bob", "bob's own", false);
        let gone = message_of(push.chat, "alice", "alice's secret", true);
        push.newest = gone.id;
        push.author = gone.author_id;
        push.count = 2;
        let sender = with_history(sender, &push, vec![older, first, own, gone]).await;
        sender.send(push).await;
        assert!(
            received.lock().unwrap().is_empty(),
            "{:?}",
            received.lock().unwrap()
        );
    }

    /// `sender` reading through `directory`, whose device is the one `sender` had.
    async fn reading_through(
        sender: PushSender,
        push: &PendingPush,
        directory: impl FnOnce(Device) -> Directory,
    ) -> (PushSender, Arc<Directory>) {
        let device = sender.devices.devices_of(push.user).await.unwrap()[0].clone();
        let directory = Arc::new(directory(device));
        let sender = PushSender {
            devices: Arc::clone(&directory) as Arc<dyn DeviceDirectory>,
            ..sender
        };
        (sender, directory)
    }

    /// A push whose recipient's membership, or whose message, cannot be read goes nowhere: it
    /// might reach someone who left the chat, or carry the id and author of a deleted message.
    /// A store that fails for a moment delays it.
    #[tokio::test]
    async fn a_push_whose_membership_or_message_cannot_be_read_is_not_sent() {
        for read in ["is_member", "message"] {
            let (sender, push, received) = setup(true, 0).await;
            let (sender, _) = reading_through(sender, &push, |device| {
                Directory::new(device, true, Vec::new()).failing(read, usize::MAX)
            })
            .await;
            sender.send(push).await;
            assert!(
                received.lock().unwrap().is_empty(),
                "sent while {read} could not be read: {:?}",
                received.lock().unwrap()
            );

            let (sender, push, received) = setup(true, 0).await;
            let (sender, _) = reading_through(sender, &push, |device| {
                Directory::new(device, true, Vec::new()).failing(read, 2)
            })
            .await;
            sender.send(push).await;
            let received = received.lock().unwrap();
            assert_eq!(
                received.len(),
                1,
                "{read} failed for a moment: {received:?}"
            );
            assert!(
                received[0].contains("the text as it is now"),
                "{received:?}"
            );
        }
    }

    /// A push endpoint on loopback that answers its first request 429 with `Retry-After: 2`,
    /// and 201 after; when each request came.
    async fn busy_endpoint() -> (String, Arc<Mutex<Vec<Instant>>>) {
        use axum::response::IntoResponse as _;
        let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let kept = Arc::clone(&arrivals);
        let router = axum::Router::new().route(
            "/busy",
            axum::routing::post(move || async move {
                let mut arrivals = kept.lock().unwrap();
                arrivals.push(Instant::now());
                if arrivals.len() == 1 {
                    (
                        axum::http::StatusCode::TOO_MANY_REQUESTS,
                        [(axum::http::header::RETRY_AFTER, "2")],
                    )
                        .into_response()
                } else {
                    axum::http::StatusCode::CREATED.into_response()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, router).await });
        (format!("http://127.0.0.1:{port}/busy"), arrivals)
    }

    /// A push service that asks for a pause (429 with `Retry-After`) is not asked again sooner.
    #[tokio::test]
    async fn a_push_service_is_not_asked_again_before_its_retry_after() {
        let (endpoint, arrivals) = busy_endpoint().await;
        let (sender, push, _) = setup(true, 0).await;
        let (sender, _) = reading_through(sender, &push, |mut device| {
            device.endpoint = Some(endpoint);
            Directory::new(device, true, Vec::new())
        })
        .await;
        sender.send(push).await;
        let arrivals = arrivals.lock().unwrap();
        assert_eq!(arrivals.len(), 2, "asked once more, then accepted");
        let waited = arrivals[1] - arrivals[0];
        assert!(
            waited >= Duration::from_secs(2),
            "asked again after {waited:?}, before its Retry-After of 2 s"
        );
    }

    /// A push whose request reached the service but got no answer (the connection broke off
    /// after it was sent) is not sent again: the service may have accepted it, and a second copy
    /// would make the device alert twice.
    #[tokio::test]
    async fn a_push_sent_without_an_answer_is_not_sent_again() {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&requests);
        tokio::spawn(async move {
            while let Ok((mut connection, _)) = listener.accept().await {
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    // Read the whole request (its body ends it), then hang up unanswered.
                    let mut request = Vec::new();
                    let mut chunk = [0; 4096];
                    while let Ok(read) = connection.read(&mut chunk).await {
                        if read == 0 {
                            break;
                        }
                        request.extend_from_slice(&chunk[..read]);
                        if request.ends_with(b"}") {
                            counted.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                    }
                });
            }
        });
        let (sender, push, _) = setup(true, 0).await;
        let (sender, _) = reading_through(sender, &push, |mut device| {
            device.endpoint = Some(format!("http://127.0.0.1:{port}/up"));
            Directory::new(device, true, Vec::new())
        })
        .await;
        sender.send(push).await;
        assert_eq!(
            requests.load(Ordering::SeqCst),
            1,
            "the push was sent again"
        );
    }
}
