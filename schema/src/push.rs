//! Devices registered for push notifications.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{DeviceId, UserId};

/// Where a device's pushes go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// A browser's Push API subscription (RFC 8030 with RFC 8291 encryption and RFC 8292 VAPID).
    Webpush,
    /// Firebase Cloud Messaging (HTTP v1).
    Fcm,
    /// Apple Push Notification service.
    Apns,
    /// A UnifiedPush distributor's endpoint.
    Unifiedpush,
}

impl Platform {
    pub fn as_str(&self) -> &'static str {
        match self {
            Platform::Webpush => "webpush",
            Platform::Fcm => "fcm",
            Platform::Apns => "apns",
            Platform::Unifiedpush => "unifiedpush",
        }
    }
}

/// A Web Push subscription's keys, base64url as the browser gives them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WebPushKeys {
    /// The subscription's P-256 public key (65 bytes, uncompressed point).
    pub p256dh: String,
    /// The authentication secret (16 bytes).
    pub auth: String,
}

/// A device of a user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Device {
    pub id: DeviceId,
    pub user_id: UserId,
    pub platform: Platform,
    /// Web Push and UnifiedPush: where pushes are POSTed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Web Push: the subscription's keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<WebPushKeys>,
    /// FCM and APNs: the registration or device token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// APNs: the app's bundle id (`apns-topic`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}
