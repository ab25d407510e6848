//! Apple Push Notification service with token-based authentication: each request carries a
//! provider token (an ES256 JWT signed with the account's `.p8` key, reused for 50 minutes) and
//! goes over HTTP/2, the only protocol APNs speaks.
//!
//! Answers: 200 is sent; 410, `BadDeviceToken` or `Unregistered` mean the device is gone; 429 and
//! 5xx are retried; a provider token refused as expired is renewed once.

use std::time::{Duration, Instant};

use confab_runtime::push_auth::ApnsKey;
use confab_runtime::push_queue::{PendingPush, PushKind};
use confab_schema::push::Device;
use serde_json::{Map, Value, json};

use crate::push::Delivery;
use crate::push_fcm::retry_after;

/// How long one provider token is used (APNs refuses tokens older than an hour).
const TOKEN_REUSE: Duration = Duration::from_secs(50 * 60);
/// APNs refuses new tokens more often than this (`TooManyProviderTokenUpdates`).
const MIN_TOKEN_AGE: Duration = Duration::from_secs(20 * 60);

/// An APNs sender for one developer account.
pub struct Apns {
    http: reqwest::Client,
    key: ApnsKey,
    base_url: String,
    token: std::sync::Mutex<Option<ProviderToken>>,
}

#[derive(Clone)]
struct ProviderToken {
    value: String,
    issued: Instant,
}

impl Apns {
    /// A sender to `base_url` (no trailing slash). It has a client of its own that speaks only
    /// HTTP/2: negotiated by ALPN (`h2`) over TLS, with prior knowledge over `http` (tests).
    pub fn new(key: ApnsKey, base_url: String, timeout: Duration) -> reqwest::Result<Apns> {
        Ok(Apns {
            http: reqwest::Client::builder()
                .http2_prior_knowledge()
                .timeout(timeout)
                .build()?,
            key,
            base_url,
            token: std::sync::Mutex::new(None),
        })
    }

    /// The provider token: the current one, or a new one when it is 50 minutes old, or when
    /// `refused` is the current one and APNs allows a renewal (it is 20 minutes old).
    fn bearer(&self, refused: Option<&str>) -> String {
        self.bearer_at(refused, Instant::now())
    }

    fn bearer_at(&self, refused: Option<&str>, now: Instant) -> String {
        let mut current = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(token) = current.as_ref() {
            let age = now.saturating_duration_since(token.issued);
            let refused = refused == Some(token.value.as_str());
            if age < TOKEN_REUSE && !(refused && age >= MIN_TOKEN_AGE) {
                return token.value.clone();
            }
        }
        let token = ProviderToken {
            value: self
                .key
                .token(time::OffsetDateTime::now_utc().unix_timestamp()),
            issued: now,
        };
        *current = Some(token.clone());
        token.value
    }

    /// Sends an alert for `push` to the device's token, in its app's topic.
    pub(crate) async fn deliver(
        &self,
        push: &PendingPush,
        device: &Device,
        payload: &[u8],
    ) -> Delivery {
        let (Some(token), Some(topic)) = (&device.token, &device.topic) else {
            return Delivery::Failed;
        };
        let chat = push.chat.0.to_string();
        // A withdrawal wakes the app silently (a background push of the same collapse id) to
        // take the chat's notification away; it cannot be an alert.
        let withdrawal = push.kind == PushKind::Withdrawal;
        let (body, push_type, priority) = if withdrawal {
            (background(payload).to_string(), "background", "5")
        } else {
            (alert(&chat, payload).to_string(), "alert", "10")
        };
        let url = format!("{}/3/device/{token}", self.base_url);
        let bearer = self.bearer(None);
        let send = |bearer: String| {
            self.http
                .post(&url)
                .header("authorization", format!("bearer {bearer}"))
                .header("apns-topic", topic)
                .header("apns-push-type", push_type)
                .header("apns-priority", priority)
                // After its time to live APNs drops it rather than deliver it late.
                .header("apns-expiration", (push.expires_ms / 1000).to_string())
                // A later push of the same chat replaces this one on the device.
                .header("apns-collapse-id", &chat)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
        };
        let mut answer = Answer::of(send(bearer.clone()).await).await;
        if matches!(&answer, Answer::Refused(403, reason, _)
            if reason == "ExpiredProviderToken" || reason == "InvalidProviderToken")
        {
            let renewed = self.bearer(Some(&bearer));
            if renewed != bearer {
                answer = Answer::of(send(renewed).await).await;
            }
        }
        answer.delivery()
    }
}

/// APNs' answer to one request.
enum Answer {
    Sent,
    Unreachable,
    Refused(u16, String, Option<Duration>),
}

impl Answer {
    async fn of(response: reqwest::Result<reqwest::Response>) -> Answer {
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                tracing::debug!(%error, "APNs unreachable");
                return Answer::Unreachable;
            }
        };
        let status = response.status().as_u16();
        if status == 200 {
            return Answer::Sent;
        }
        let wait = retry_after(response.headers());
        let body: Value = response.json().await.unwrap_or_default();
        let reason = body["reason"].as_str().unwrap_or_default().to_owned();
        Answer::Refused(status, reason, wait)
    }

    fn delivery(self) -> Delivery {
        match self {
            Answer::Sent => Delivery::Sent,
            Answer::Unreachable => Delivery::Retry,
            Answer::Refused(status, reason, wait) => match (status, reason.as_str()) {
                (410, _) | (_, "BadDeviceToken" | "Unregistered") => Delivery::Gone,
                (429 | 500..=599, _) => wait.map_or(Delivery::Retry, Delivery::RetryAfter),
                _ => {
                    tracing::warn!(status, reason, "APNs refused a push");
                    Delivery::Failed
                }
            },
        }
    }
}

/// The notification: an alert in the chat's thread, with the push's fields beside `aps` for the
/// app. The text names the sender and shows a preview when the payload carries them
/// (`author_name`, `preview`); otherwise it says how many messages are new.
fn alert(chat: &str, payload: &[u8]) -> Value {
    let mut fields = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(fields)) => fields,
        _ => Map::from_iter([(
            "payload".to_owned(),
            Value::String(String::from_utf8_lossy(payload).into_owned()),
        )]),
    };
    let count = fields.get("count").and_then(Value::as_u64).unwrap_or(1);
    let body = match fields.get("preview").and_then(Value::as_str) {
        Some(preview) if count == 1 => preview.to_owned(),
        _ if count == 1 => "New message".to_owned(),
        _ => format!("{count} new messages"),
    };
    let mut alert = Map::from_iter([("body".to_owned(), Value::String(body))]);
    if let Some(sender) = fields.get("author_name").and_then(Value::as_str) {
        alert.insert("title".into(), Value::String(sender.to_owned()));
    }
    fields.insert(
        "aps".into(),
        json!({
            "alert": alert,
            "thread-id": chat,
            "sound": "default",
            // Lets the app's notification service extension fetch and show the message itself.
            "mutable-content": 1,
        }),
    );
    Value::Object(fields)
}

/// A silent push for the app: the payload's fields beside `"aps":{"content-available":1}`.
fn background(payload: &[u8]) -> Value {
    let mut fields = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(fields)) => fields,
        _ => Map::new(),
    };
    fields.insert("aps".into(), json!({"content-available": 1}));
    Value::Object(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_withdrawal_is_silent() {
        let silent = background(br#"{"type":"withdrawn","chat_id":"c"}"#);
        assert_eq!(silent["aps"], json!({"content-available": 1}));
        assert_eq!(silent["type"], "withdrawn");
        assert!(silent["aps"].get("alert").is_none());
    }

    #[test]
    fn an_alert_counts_messages_and_keeps_the_fields() {
        let one = alert("c", br#"{"chat_id":"c","count":1}"#);
        assert_eq!(one["aps"]["alert"]["body"], "New message");
        assert_eq!(one["aps"]["thread-id"], "c");
        assert_eq!(one["chat_id"], "c");
        let three = alert("c", br#"{"count":3,"author_name":"Alice","preview":"hi"}"#);
        assert_eq!(three["aps"]["alert"]["body"], "3 new messages");
        assert_eq!(three["aps"]["alert"]["title"], "Alice");
        let previewed = alert("c", br#"{"count":1,"preview":"hi"}"#);
        assert_eq!(previewed["aps"]["alert"]["body"], "hi");
    }

    #[test]
    fn a_provider_token_is_reused_and_renewed_only_when_apns_allows() {
        use p256::pkcs8::EncodePrivateKey;
        let pem = p256::SecretKey::from_slice(&[3u8; 32])
            .unwrap()
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .unwrap();
        let key = ApnsKey::from_pem(&pem, "ABC123DEFG", "TEAM123456").unwrap();
        let apns = Apns::new(key, "http://127.0.0.1:9".into(), Duration::from_secs(1)).unwrap();
        let issued = || apns.token.lock().unwrap().as_ref().unwrap().issued;
        let start = Instant::now();
        let minutes = |m: u64| start + Duration::from_secs(m * 60);
        let first = apns.bearer_at(None, start);
        assert_eq!(apns.bearer_at(None, minutes(10)), first, "reused");
        // Refused while young: APNs would refuse a renewal too, so none is made.
        assert_eq!(apns.bearer_at(Some(&first), minutes(10)), first);
        assert_eq!(issued(), start);
        // Refused at 21 minutes: renewed.
        apns.bearer_at(Some(&first), minutes(21));
        assert_eq!(issued(), minutes(21));
        // Not refused: reused until 50 minutes, renewed before APNs would call it expired.
        apns.bearer_at(None, minutes(70));
        assert_eq!(issued(), minutes(21));
        apns.bearer_at(None, minutes(72));
        assert_eq!(issued(), minutes(72));
    }

    #[test]
    fn answers_map_to_deliveries() {
        let refused =
            |status, reason: &str| Answer::Refused(status, reason.into(), None).delivery();
        assert!(matches!(refused(410, "Unregistered"), Delivery::Gone));
        assert!(matches!(refused(400, "BadDeviceToken"), Delivery::Gone));
        assert!(matches!(refused(400, "BadTopic"), Delivery::Failed));
        assert!(matches!(refused(429, "TooManyRequests"), Delivery::Retry));
        assert!(matches!(
            refused(503, "ServiceUnavailable"),
            Delivery::Retry
        ));
        assert!(matches!(
            Answer::Refused(503, String::new(), Some(Duration::from_secs(1))).delivery(),
            Delivery::RetryAfter(_)
        ));
        assert!(matches!(Answer::Unreachable.delivery(), Delivery::Retry));
    }
}
