//! Sends the pushes that came due: claims them from the [`PushQueue`] (each to one node), and
//! delivers each to every device of its user. Web Push for real (RFC 8291 payload encryption,
//! RFC 8292 VAPID); UnifiedPush as a plain POST to the distributor's endpoint; FCM and APNs in
//! [`crate::push_fcm`] and [`crate::push_apns`]. A device whose push service says it is gone
//! (404, 410, or the provider's own reason) is removed; 429 and 5xx are retried with backoff
//! within the push's time to live; a push past it is dropped, not sent late.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_runtime::presence::now_ms;
use confab_runtime::push_queue::{PendingPush, PushQueue};
use confab_runtime::vapid::VapidKeys;
use confab_runtime::webpush;
use confab_schema::push::{Device, Platform};
use confab_schema::{DeviceId, UserId};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::push_apns::Apns;
use crate::push_fcm::Fcm;

/// Where the sender finds a user's devices, and forgets one that is gone.
#[async_trait]
pub trait DeviceDirectory: Send + Sync + 'static {
    async fn devices_of(&self, user: UserId) -> Result<Vec<Device>, String>;
    async fn remove(&self, user: UserId, device: DeviceId) -> Result<(), String>;
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
    /// How often the queue is polled for due pushes.
    pub poll: Duration,
    /// Without a service-account key, FCM devices get nothing.
    pub fcm: Option<Arc<Fcm>>,
    /// Without a token key, APNs devices get nothing.
    pub apns: Option<Arc<Apns>>,
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

impl PushSender {
    /// Polls for due pushes until `shutdown`.
    pub fn start(self, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(self.poll);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = every.tick() => {}
                }
                // Shutdown does not wait for a queue that is down, nor for a slow push service.
                let round = async {
                    let due = match self.queue.claim_due(now_ms(), 256).await {
                        Ok(due) => due,
                        Err(error) => {
                            tracing::warn!(%error, "push queue unavailable");
                            return;
                        }
                    };
                    futures::stream::iter(due)
                        .for_each_concurrent(32, |push| {
                            let sender = self.clone();
                            async move { sender.send(push).await }
                        })
                        .await;
                };
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = round => {}
                }
            }
        })
    }

    async fn send(&self, push: PendingPush) {
        if push.expires_ms < now_ms() {
            metrics::counter!("confab_pushes_expired_total").increment(1);
            return;
        }
        let devices = match self.devices.devices_of(push.user).await {
            Ok(devices) => devices,
            Err(error) => {
                tracing::warn!(%error, "devices unavailable; push dropped");
                metrics::counter!("confab_pushes_failed_total", "platform" => "any").increment(1);
                return;
            }
        };
        let payload = serde_json::json!({
            "type": "messages",
            "chat_id": push.chat,
            "signal_id": push.newest,
            "author_id": push.author,
            "count": push.count,
        })
        .to_string();
        futures::future::join_all(
            devices
                .iter()
                .map(|device| self.deliver(&push, device, payload.as_bytes())),
        )
        .await;
    }

    async fn deliver(&self, push: &PendingPush, device: &Device, payload: &[u8]) {
        let platform = device.platform.as_str();
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
                    metrics::counter!("confab_pushes_sent_total", "platform" => platform)
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
                    tokio::time::sleep(wait.max(delay)).await;
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
        let authorization = match webpush::vapid_authorization(
            vapid,
            endpoint,
            &self.subject,
            time::OffsetDateTime::now_utc().unix_timestamp() + 12 * 3600,
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

fn classify(response: reqwest::Result<reqwest::Response>) -> Delivery {
    match response {
        Ok(response) => match response.status().as_u16() {
            200..=299 => Delivery::Sent,
            404 | 410 => Delivery::Gone,
            429 | 500..=599 => Delivery::Retry,
            _ => Delivery::Failed,
        },
        Err(_) => Delivery::Retry,
    }
}
