//! Devices registered for push notifications: parsed and checked once here, owned by one user.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_runtime::identity::AuthError;
use confab_schema::push::{Device, Platform, WebPushKeys};
use confab_schema::{DeviceId, UserId};
use time::OffsetDateTime;

use super::Outcome;
use super::sessions::CallerSession;
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;

const MAX_ENDPOINT_BYTES: usize = 2048;
const MAX_TOKEN_BYTES: usize = 4096;
const MAX_TOPIC_BYTES: usize = 255;
/// The devices one user may register. Each push goes to every one of them, so without a bound
/// one account could make the notifier send as many requests per message as it likes.
pub const MAX_DEVICES_PER_USER: usize = 20;

/// How the API checks push registrations.
#[derive(Clone, Debug, Default)]
pub struct PushSettings {
    /// `http` endpoints on loopback hosts are accepted (tests, local development).
    pub allow_insecure_endpoints: bool,
    /// The VAPID public key; without one, Web Push devices are refused.
    pub vapid_public_key: Option<String>,
    /// How long a message waits unfetched before a push.
    pub delay: std::time::Duration,
    /// How long after its due time a push may still be sent.
    pub ttl: std::time::Duration,
    /// How long members' push settings, once read, are reused for the next messages (zero: read
    /// for every message).
    pub settings_cache: std::time::Duration,
}

/// A registration as the client sends it, before checking.
#[derive(Clone, Debug, Default)]
pub struct DeviceFields {
    pub platform: Option<String>,
    pub endpoint: Option<String>,
    pub p256dh: Option<String>,
    pub auth: Option<String>,
    pub token: Option<String>,
    pub topic: Option<String>,
}

/// A checked registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewDevice {
    platform: Platform,
    endpoint: Option<String>,
    keys: Option<WebPushKeys>,
    token: Option<String>,
    topic: Option<String>,
}

fn invalid(detail: impl Into<String>) -> ApiError {
    ApiError::Unprocessable(detail.into())
}

fn endpoint(raw: Option<String>, settings: &PushSettings) -> ApiResult<String> {
    use confab_runtime::addresses::is_public;
    let raw = raw.ok_or_else(|| invalid("endpoint is required"))?;
    if raw.len() > MAX_ENDPOINT_BYTES {
        return Err(invalid("endpoint is longer than 2048 bytes"));
    }
    let url = url::Url::parse(&raw).map_err(|_| invalid("endpoint is not a URL"))?;
    let (loopback, public) = match url.host() {
        Some(url::Host::Domain(host)) => {
            let local = host == "localhost" || host.ends_with(".localhost");
            // A name is checked again where it resolves, when a push is sent.
            (local, !local)
        }
        Some(url::Host::Ipv4(ip)) => (ip.is_loopback(), is_public(ip.into())),
        Some(url::Host::Ipv6(ip)) => (ip.is_loopback(), is_public(ip.into())),
        None => return Err(invalid("endpoint has no host")),
    };
    // Pushes are sent from inside the deployment: an endpoint on its own network would let a
    // client make it call its neighbours.
    if !public && !settings.allow_insecure_endpoints {
        return Err(invalid("endpoint must be a public address"));
    }
    match url.scheme() {
        "https" => {}
        "http" if settings.allow_insecure_endpoints && loopback => {}
        "http" => {
            return Err(invalid(
                "endpoint must be https (http only on loopback, when allowed)",
            ));
        }
        _ => return Err(invalid("endpoint must be an https URL")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("endpoint must not carry credentials"));
    }
    Ok(raw)
}

fn base64url_of_len(raw: Option<String>, name: &str, len: usize) -> ApiResult<String> {
    let raw = raw.ok_or_else(|| invalid(format!("keys.{name} is required")))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(raw.trim_end_matches('='))
        .map_err(|_| invalid(format!("keys.{name} is not base64url")))?;
    if bytes.len() != len {
        return Err(invalid(format!("keys.{name} must be {len} bytes")));
    }
    Ok(raw)
}

fn bounded(raw: Option<String>, name: &str, max: usize) -> ApiResult<String> {
    let raw = raw.ok_or_else(|| invalid(format!("{name} is required")))?;
    if raw.is_empty() || raw.len() > max || raw.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(format!(
            "{name} is 1 to {max} bytes without spaces"
        )));
    }
    Ok(raw)
}

fn absent(value: &Option<String>, name: &str, platform: &str) -> ApiResult<()> {
    match value {
        Some(_) => Err(invalid(format!(
            "{name} does not apply to {platform} devices"
        ))),
        None => Ok(()),
    }
}

impl NewDevice {
    pub fn parse(fields: DeviceFields, settings: &PushSettings) -> ApiResult<NewDevice> {
        let platform = match fields.platform.as_deref() {
            Some("webpush") => Platform::Webpush,
            Some("fcm") => Platform::Fcm,
            Some("apns") => Platform::Apns,
            Some("unifiedpush") => Platform::Unifiedpush,
            Some(_) => {
                return Err(invalid(
                    "platform is one of webpush, fcm, apns, unifiedpush",
                ));
            }
            None => return Err(invalid("platform is required")),
        };
        let name = platform.as_str();
        match platform {
            Platform::Webpush => {
                if settings.vapid_public_key.is_none() {
                    return Err(invalid(
                        "Web Push is not configured on this server (no VAPID key)",
                    ));
                }
                absent(&fields.token, "token", name)?;
                absent(&fields.topic, "topic", name)?;
                let p256dh = base64url_of_len(fields.p256dh, "p256dh", 65)?;
                let point = URL_SAFE_NO_PAD
                    .decode(p256dh.trim_end_matches('='))
                    .unwrap_or_default();
                if !confab_runtime::webpush::is_p256_public_key(&point) {
                    return Err(invalid("keys.p256dh is not a P-256 public key"));
                }
                let auth = base64url_of_len(fields.auth, "auth", 16)?;
                Ok(NewDevice {
                    platform,
                    endpoint: Some(endpoint(fields.endpoint, settings)?),
                    keys: Some(WebPushKeys { p256dh, auth }),
                    token: None,
                    topic: None,
                })
            }
            Platform::Unifiedpush => {
                absent(&fields.token, "token", name)?;
                absent(&fields.topic, "topic", name)?;
                absent(&fields.p256dh.or(fields.auth), "keys", name)?;
                Ok(NewDevice {
                    platform,
                    endpoint: Some(endpoint(fields.endpoint, settings)?),
                    keys: None,
                    token: None,
                    topic: None,
                })
            }
            Platform::Fcm => {
                absent(&fields.endpoint, "endpoint", name)?;
                absent(&fields.topic, "topic", name)?;
                absent(&fields.p256dh.or(fields.auth), "keys", name)?;
                Ok(NewDevice {
                    platform,
                    endpoint: None,
                    keys: None,
                    token: Some(bounded(fields.token, "token", MAX_TOKEN_BYTES)?),
                    topic: None,
                })
            }
            Platform::Apns => {
                absent(&fields.endpoint, "endpoint", name)?;
                absent(&fields.p256dh.or(fields.auth), "keys", name)?;
                let token = bounded(fields.token, "token", MAX_TOKEN_BYTES)?;
                if token.len() < 64 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid("an APNs token is at least 64 hexadecimal digits"));
                }
                Ok(NewDevice {
                    platform,
                    endpoint: None,
                    keys: None,
                    token: Some(token.to_ascii_lowercase()),
                    topic: Some(bounded(fields.topic, "topic", MAX_TOPIC_BYTES)?),
                })
            }
        }
    }

    /// Where the device's pushes go: its endpoint or its token.
    fn address(&self) -> &str {
        self.endpoint
            .as_deref()
            .or(self.token.as_deref())
            .unwrap_or_default()
    }
}

impl ApiState {
    /// Registers a device of the caller: `Created`, or `Existing` (updated) when they had
    /// registered it already. A device another user had registered becomes the caller's.
    /// Registers a device of `caller`, whose token is of `session`. A logout everywhere that
    /// read the caller's devices before this one was stored would miss it: so once it is stored,
    /// a registration whose session has ended meanwhile removes it again and is refused.
    pub async fn register_device(
        &self,
        caller: UserId,
        session: &CallerSession,
        new: NewDevice,
    ) -> ApiResult<Outcome<Device>> {
        let id = DeviceId::of(new.platform.as_str(), new.address());
        // Two registrations at once may both pass; the bound is there against abuse, not to
        // count exactly.
        let registered = self.store.devices_of(caller).await?;
        if registered.len() >= MAX_DEVICES_PER_USER && !registered.iter().any(|d| d.id == id) {
            return Err(ApiError::Conflict(format!(
                "at most {MAX_DEVICES_PER_USER} devices per user: remove one first"
            )));
        }
        // Registered again (an app does at every launch): it keeps when it was first registered,
        // in its one write. No write may come after the check of the session below, or it could
        // bring back a device a logout everywhere removed after that check.
        let created_at = registered.iter().find(|d| d.id == id).map_or_else(
            || confab_schema::model::to_millis(OffsetDateTime::now_utc()),
            |d| d.created_at,
        );
        let device = Device {
            id,
            user_id: caller,
            platform: new.platform,
            endpoint: new.endpoint,
            keys: new.keys,
            token: new.token,
            topic: new.topic,
            created_at,
        };
        let previous = self.store.put_device(&device).await?;
        if self.has_ended(caller, session) {
            match &previous {
                // It moved here from another user: it goes back to them.
                Some(previous) if previous.user_id != caller => {
                    self.store.put_device(previous).await?;
                }
                _ => {
                    self.store.delete_device(caller, device.id).await?;
                }
            }
            return Err(AuthError::Revoked.into());
        }
        match previous {
            Some(previous) if previous.user_id == caller => Ok(Outcome::Existing(device)),
            _ => Ok(Outcome::Created(device)),
        }
    }

    /// The caller's devices.
    pub async fn devices(&self, caller: UserId) -> ApiResult<Vec<Device>> {
        Ok(self.store.devices_of(caller).await?)
    }

    /// Removes one of the caller's devices; another user's is "no such device".
    pub async fn remove_device(&self, caller: UserId, id: DeviceId) -> ApiResult<()> {
        if self.store.delete_device(caller, id).await? {
            Ok(())
        } else {
            Err(ApiError::NotFound("no such device"))
        }
    }

    /// The VAPID public key browsers subscribe with.
    pub fn vapid_public_key(&self) -> ApiResult<String> {
        self.push.vapid_public_key.clone().ok_or(ApiError::NotFound(
            "Web Push is not configured on this server",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PushSettings {
        PushSettings {
            allow_insecure_endpoints: false,
            vapid_public_key: Some("key".into()),
            ..Default::default()
        }
    }

    fn webpush(endpoint: &str) -> DeviceFields {
        DeviceFields {
            platform: Some("webpush".into()),
            endpoint: Some(endpoint.into()),
            p256dh: Some(confab_runtime::vapid::VapidKeys::generate().public_key),
            auth: Some(URL_SAFE_NO_PAD.encode([1u8; 16])),
            ..Default::default()
        }
    }

    #[test]
    fn endpoints_are_https_unless_loopback_is_allowed() {
        assert!(NewDevice::parse(webpush("https://push.example/abc"), &settings()).is_ok());
        assert!(NewDevice::parse(webpush("http://push.example/abc"), &settings()).is_err());
        assert!(NewDevice::parse(webpush("http://127.0.0.1:9/x"), &settings()).is_err());
        let insecure = PushSettings {
            allow_insecure_endpoints: true,
            ..settings()
        };
        assert!(NewDevice::parse(webpush("http://127.0.0.1:9/x"), &insecure).is_ok());
        assert!(NewDevice::parse(webpush("http://localhost:9/x"), &insecure).is_ok());
        assert!(NewDevice::parse(webpush("http://10.0.0.1/x"), &insecure).is_err());
        assert!(NewDevice::parse(webpush("ftp://push.example/x"), &insecure).is_err());
        assert!(NewDevice::parse(webpush("https://u:p@push.example/x"), &settings()).is_err());
    }

    /// Pushes go out from inside the deployment: an endpoint on its own network (loopback,
    /// private ranges, the cloud's metadata service) is refused, whatever the scheme, unless the
    /// setting for local development allows it.
    #[test]
    fn endpoints_on_internal_addresses_are_refused() {
        for internal in [
            "https://127.0.0.1/x",
            "https://10.0.0.5/x",
            "https://192.168.1.10:8443/x",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/x",
            "https://[fd00::1]/x",
            "https://[::ffff:10.0.0.1]/x",
            "https://localhost/x",
            "https://push.localhost/x",
            "https://0.0.0.0/x",
        ] {
            let refused = NewDevice::parse(webpush(internal), &settings());
            assert!(
                matches!(&refused, Err(ApiError::Unprocessable(detail)) if detail.contains("public")),
                "{internal}: {refused:?}"
            );
        }
        assert!(NewDevice::parse(webpush("https://8.8.8.8/x"), &settings()).is_ok());
        let insecure = PushSettings {
            allow_insecure_endpoints: true,
            ..settings()
        };
        assert!(NewDevice::parse(webpush("https://10.0.0.5/x"), &insecure).is_ok());
    }

    #[test]
    fn each_platform_takes_its_own_fields() {
        let mut bad_key = webpush("https://push.example/abc");
        bad_key.p256dh = Some(URL_SAFE_NO_PAD.encode([4u8; 10]));
        assert!(NewDevice::parse(bad_key, &settings()).is_err());
        // 65 bytes, but no point of the curve: no push to it could be encrypted.
        let mut off_the_curve = webpush("https://push.example/abc");
        off_the_curve.p256dh = Some(URL_SAFE_NO_PAD.encode([4u8; 65]));
        assert!(NewDevice::parse(off_the_curve, &settings()).is_err());
        let fcm = DeviceFields {
            platform: Some("fcm".into()),
            token: Some("abc:def".into()),
            ..Default::default()
        };
        assert!(NewDevice::parse(fcm.clone(), &settings()).is_ok());
        let fcm_with_endpoint = DeviceFields {
            endpoint: Some("https://x".into()),
            ..fcm
        };
        assert!(NewDevice::parse(fcm_with_endpoint, &settings()).is_err());
        let apns = DeviceFields {
            platform: Some("apns".into()),
            token: Some("ab".repeat(32)),
            topic: Some("com.example.app".into()),
            ..Default::default()
        };
        assert!(NewDevice::parse(apns.clone(), &settings()).is_ok());
        let short = DeviceFields {
            token: Some("abc".into()),
            ..apns
        };
        assert!(NewDevice::parse(short, &settings()).is_err());
        let unconfigured = PushSettings::default();
        assert!(NewDevice::parse(webpush("https://push.example/abc"), &unconfigured).is_err());
        let unknown = DeviceFields {
            platform: Some("pager".into()),
            ..Default::default()
        };
        assert!(NewDevice::parse(unknown, &settings()).is_err());
    }
}
