//! Firebase Cloud Messaging, HTTP v1: a data message to a registration token, authorised by an
//! OAuth 2.0 access token that the service account obtains with a signed JWT (the JWT-bearer
//! grant, RFC 7523) and that is kept until shortly before it expires.
//!
//! Answers: 2xx is sent; `UNREGISTERED`, 404, or `INVALID_ARGUMENT` about the token mean the
//! device is gone; 429 and 5xx are retried (after `Retry-After` when given); a 401 gets one fresh
//! access token and one more try.

use std::time::{Duration, Instant};

use confab_runtime::push_auth::{FCM_SCOPE, ServiceAccount};
use confab_runtime::push_queue::PendingPush;
use confab_schema::push::Device;
use serde_json::{Map, Value, json};

use crate::push::Delivery;

/// How long before its expiry an access token is replaced.
const REFRESH_MARGIN: Duration = Duration::from_secs(120);

/// An FCM project's sender.
pub struct Fcm {
    http: reqwest::Client,
    account: ServiceAccount,
    send_url: String,
    token_uri: String,
    /// The current access token; the lock also makes concurrent sends wait for one refresh.
    token: tokio::sync::Mutex<Option<AccessToken>>,
}

struct AccessToken {
    value: String,
    refresh_at: Instant,
}

impl Fcm {
    /// A sender for `account`'s project at `base_url` (no trailing slash), whose access tokens
    /// come from `token_uri`.
    pub fn new(
        http: reqwest::Client,
        account: ServiceAccount,
        base_url: &str,
        token_uri: String,
    ) -> Fcm {
        Fcm {
            send_url: format!(
                "{base_url}/v1/projects/{}/messages:send",
                account.project_id
            ),
            http,
            account,
            token_uri,
            token: tokio::sync::Mutex::new(None),
        }
    }

    /// Sends `payload` (a JSON object, its values become the data message's strings) to the
    /// device's registration token.
    pub(crate) async fn deliver(
        &self,
        push: &PendingPush,
        device: &Device,
        payload: &[u8],
        left_ms: i64,
    ) -> Delivery {
        let Some(token) = &device.token else {
            return Delivery::Failed;
        };
        let message = message(token, &push.chat.0.to_string(), payload, left_ms);
        let access = match self.access_token(None).await {
            Ok(access) => access,
            Err(delivery) => return delivery,
        };
        let mut response = self.post(&access, &message).await;
        if matches!(&response, Ok(r) if r.status() == reqwest::StatusCode::UNAUTHORIZED) {
            // Revoked or expired early: one fresh token, one more try.
            let access = match self.access_token(Some(&access)).await {
                Ok(access) => access,
                Err(delivery) => return delivery,
            };
            response = self.post(&access, &message).await;
        }
        classify(response).await
    }

    async fn post(&self, access: &str, message: &Value) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(&self.send_url)
            .bearer_auth(access)
            .json(message)
            .send()
            .await
    }

    /// The cached access token, or a new one when it is due for refresh or is `stale` (refused).
    async fn access_token(&self, stale: Option<&str>) -> Result<String, Delivery> {
        let mut cached = self.token.lock().await;
        if let Some(token) = cached.as_ref()
            && token.refresh_at > Instant::now()
            && Some(token.value.as_str()) != stale
        {
            return Ok(token.value.clone());
        }
        *cached = None;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let assertion = self.account.assertion(FCM_SCOPE, &self.token_uri, now);
        let response = self
            .http
            .post(&self.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(error) => {
                tracing::warn!(%error, "FCM access token not obtained");
                return Err(Delivery::Retry);
            }
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let body: Value = response.json().await.unwrap_or_default();
        match (status.as_u16(), body["access_token"].as_str()) {
            (200..=299, Some(value)) => {
                let expires_in = body["expires_in"].as_u64().unwrap_or(3600);
                let lifetime = Duration::from_secs(expires_in).saturating_sub(REFRESH_MARGIN);
                *cached = Some(AccessToken {
                    value: value.to_owned(),
                    refresh_at: Instant::now() + lifetime,
                });
                Ok(value.to_owned())
            }
            (429 | 500..=599, _) => Err(retry_after.map_or(Delivery::Retry, Delivery::RetryAfter)),
            _ => {
                // A refused grant (a revoked key, a wrong clock) is not retried.
                tracing::error!(
                    %status,
                    error = %body["error"],
                    description = %body["error_description"],
                    "FCM refused the service account's access token request"
                );
                Err(Delivery::Failed)
            }
        }
    }
}

/// The `messages:send` body: a data message (FCM data values are strings) that a later one of the
/// same chat replaces (`collapse_key`), kept by FCM no longer than the push's time to live.
fn message(token: &str, chat: &str, payload: &[u8], left_ms: i64) -> Value {
    let data: Map<String, Value> = match serde_json::from_slice::<Value>(payload) {
        Ok(Value::Object(fields)) => fields
            .into_iter()
            .filter_map(|(key, value)| match value {
                Value::Null => None,
                Value::String(text) => Some((key, Value::String(text))),
                other => Some((key, Value::String(other.to_string()))),
            })
            .collect(),
        _ => Map::from_iter([(
            "payload".to_owned(),
            Value::String(String::from_utf8_lossy(payload).into_owned()),
        )]),
    };
    json!({
        "message": {
            "token": token,
            "data": data,
            "android": {
                "collapse_key": chat,
                "priority": "high",
                "ttl": format!("{}s", (left_ms / 1000).max(1)),
            },
        }
    })
}

/// What FCM's answer means for the device.
async fn classify(response: reqwest::Result<reqwest::Response>) -> Delivery {
    let response = match response {
        Ok(response) => response,
        Err(error) => return crate::push::unanswered(&error),
    };
    let status = response.status().as_u16();
    if (200..300).contains(&status) {
        return Delivery::Sent;
    }
    let retry = retry_after(response.headers());
    let body: Value = response.json().await.unwrap_or_default();
    let error = &body["error"];
    let code = error["details"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|detail| detail["errorCode"].as_str())
        .or_else(|| error["status"].as_str())
        .unwrap_or_default();
    match (status, code) {
        (_, "UNREGISTERED") | (404, _) => Delivery::Gone,
        (400, "INVALID_ARGUMENT") if about_the_token(error) => Delivery::Gone,
        (429 | 500..=599, _) => retry.map_or(Delivery::Retry, Delivery::RetryAfter),
        _ => {
            tracing::warn!(status, code, message = %error["message"], "FCM refused a push");
            Delivery::Failed
        }
    }
}

/// Whether an `INVALID_ARGUMENT` is about the registration token rather than the message.
fn about_the_token(error: &Value) -> bool {
    let names_the_token = error["details"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|detail| detail["fieldViolations"].as_array().into_iter().flatten())
        .any(|violation| violation["field"] == "message.token");
    names_the_token
        || error["message"]
            .as_str()
            .is_some_and(|m| m.to_ascii_lowercase().contains("registration token"))
}

/// The longest wait a `Retry-After` may impose: the sender's round waits for its slowest push.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// A `Retry-After` header (seconds or an HTTP date), capped at [`MAX_RETRY_AFTER`].
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    let wait = match value.trim().parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = time::OffsetDateTime::parse(
                value.trim(),
                &time::format_description::well_known::Rfc2822,
            )
            .ok()?;
            let left = at - time::OffsetDateTime::now_utc();
            Duration::try_from(left).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_carries_strings_a_collapse_key_and_a_ttl() {
        let message = message(
            "tok",
            "chat-1",
            br#"{"type":"messages","count":3,"chat_id":"chat-1","preview":null}"#,
            90_500,
        );
        assert_eq!(message["message"]["token"], "tok");
        assert_eq!(message["message"]["data"]["count"], "3");
        assert_eq!(message["message"]["data"]["type"], "messages");
        assert!(message["message"]["data"].get("preview").is_none());
        assert_eq!(message["message"]["android"]["collapse_key"], "chat-1");
        assert_eq!(message["message"]["android"]["ttl"], "90s");
    }

    #[test]
    fn a_token_error_is_told_from_a_message_error() {
        let token = json!({"message": "The registration token is not a valid FCM registration token",
            "status": "INVALID_ARGUMENT"});
        let field = json!({"status": "INVALID_ARGUMENT", "message": "Invalid value", "details": [
            {"@type": "type.googleapis.com/google.rpc.BadRequest",
             "fieldViolations": [{"field": "message.token", "description": "bad"}]}]});
        let payload = json!({"status": "INVALID_ARGUMENT", "message": "Invalid JSON payload"});
        assert!(about_the_token(&token));
        assert!(about_the_token(&field));
        assert!(!about_the_token(&payload));
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date_and_is_capped() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after", "86400".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
        headers.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), Some(Duration::ZERO));
    }
}
