//! Typed ids. All ids are UUIDs on the wire; signal ids are UUIDv7, so they sort by creation time both
//! as bytes and in CQL's `uuid` clustering order.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not a valid id")]
pub struct IdError(pub String);

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(transparent)]
        #[schema(value_type = String, format = Uuid)]
        pub struct $name(pub Uuid);

        impl $name {
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.as_hyphenated().fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map($name).map_err(|_| IdError(s.chars().take(64).collect()))
            }
        }

        impl From<Uuid> for $name {
            fn from(value: Uuid) -> Self {
                $name(value)
            }
        }
    };
}

uuid_id!(
    /// A user. Derived deterministically from the identity provider's issuer and subject (UUIDv5), so
    /// every process maps a token to the same user without a lookup.
    UserId
);
uuid_id!(
    /// A chat (direct or group). UUIDv7.
    ChatId
);
uuid_id!(
    /// A signal in a chat's history. UUIDv7: time-ordered, and its embedded millisecond timestamp is
    /// the signal's `created_at`.
    SignalId
);

uuid_id!(
    /// A circle: a group joined with an access code whose members are paired at random. UUIDv7.
    CircleId
);

uuid_id!(
    /// A device registered for push notifications. UUIDv5 of its platform and its endpoint or
    /// token, so registering the same subscription again finds the same device.
    DeviceId
);

impl DeviceId {
    /// The id of the device with `platform` and `address` (endpoint or token).
    pub fn of(platform: &str, address: &str) -> DeviceId {
        DeviceId(Uuid::new_v5(
            &DEVICE_NAMESPACE,
            format!("{platform}|{address}").as_bytes(),
        ))
    }
}

/// Namespace for deriving [`DeviceId`]s.
const DEVICE_NAMESPACE: Uuid = Uuid::from_u128(0x6c0f_a1b2_4e5d_4c1a_9f00_c0fa_b000_0002);

/// Namespace for deriving [`UserId`]s from `issuer|subject` pairs.
const USER_NAMESPACE: Uuid = Uuid::from_u128(0x6c0f_a1b2_4e5d_4c1a_9f00_c0fa_b000_0001);

impl UserId {
    /// The user id for subject `sub` at identity provider `issuer`.
    pub fn from_subject(issuer: &str, sub: &str) -> UserId {
        UserId(Uuid::new_v5(
            &USER_NAMESPACE,
            format!("{issuer}|{sub}").as_bytes(),
        ))
    }
}

impl ChatId {
    pub fn new() -> ChatId {
        ChatId(Uuid::now_v7())
    }
}

impl CircleId {
    pub fn new() -> CircleId {
        CircleId(Uuid::now_v7())
    }
}

impl SignalId {
    /// A new id for a signal created now. `Uuid::now_v7` is monotonic within a process.
    pub fn new() -> SignalId {
        SignalId(Uuid::now_v7())
    }

    /// A new id as a signal created at `at` would get: history imported from elsewhere, and
    /// tests of what happens to signals made long ago (signals sent now get [`SignalId::new`]).
    pub fn made_at(at: OffsetDateTime) -> SignalId {
        let nanos = at.unix_timestamp_nanos().max(0);
        SignalId(Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX),
            (nanos % 1_000_000_000) as u32,
        )))
    }

    /// Milliseconds since the Unix epoch embedded in the id; `None` for ids that are not UUIDv7.
    pub fn unix_millis(&self) -> Option<i64> {
        let (secs, nanos) = self.0.get_timestamp()?.to_unix();
        Some(secs as i64 * 1000 + i64::from(nanos / 1_000_000))
    }

    /// The creation time embedded in the id.
    pub fn created_at(&self) -> Option<OffsetDateTime> {
        let millis = self.unix_millis()?;
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000).ok()
    }

    /// Whether this is a time-ordered (v7) id, the only kind confab issues for signals.
    pub fn is_time_ordered(&self) -> bool {
        self.0.get_version_num() == 7
    }
}

impl Default for ChatId {
    fn default() -> Self {
        Self::new()
    }
}

impl Default for CircleId {
    fn default() -> Self {
        CircleId::new()
    }
}

impl Default for SignalId {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_ids_sort_by_creation() {
        let ids: Vec<SignalId> = (0..1000).map(|_| SignalId::new()).collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert!(ids[0].is_time_ordered());
    }

    #[test]
    fn signal_id_carries_its_creation_time() {
        let before = OffsetDateTime::now_utc().unix_timestamp() * 1000;
        let id = SignalId::new();
        let millis = id.unix_millis().expect("v7");
        assert!(
            millis >= before && millis <= before + 5_000,
            "{millis} vs {before}"
        );
    }

    #[test]
    fn a_signal_id_made_at_a_time_carries_it() {
        let at = OffsetDateTime::now_utc() - time::Duration::minutes(10);
        let id = SignalId::made_at(at);
        assert!(id.is_time_ordered());
        assert_eq!(
            id.unix_millis(),
            Some((at.unix_timestamp_nanos() / 1_000_000) as i64)
        );
        assert_ne!(id, SignalId::made_at(at), "each id is new");
    }

    #[test]
    fn user_ids_are_stable_per_issuer_and_subject() {
        let a = UserId::from_subject("https://idp/realms/x", "123");
        assert_eq!(a, UserId::from_subject("https://idp/realms/x", "123"));
        assert_ne!(a, UserId::from_subject("https://idp/realms/y", "123"));
        assert_ne!(a, UserId::from_subject("https://idp/realms/x", "124"));
    }

    #[test]
    fn parse_rejects_garbage() {
        assert!("not-a-uuid".parse::<ChatId>().is_err());
        let id = ChatId::new();
        assert_eq!(id.to_string().parse::<ChatId>(), Ok(id));
    }
}
