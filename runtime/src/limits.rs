//! Rate limits: a token bucket per key (a user, or a client address) and class of request, kept in
//! memory by each process (the generic cell rate algorithm of `governor`).

use std::hash::Hash;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::RateLimit;
use crate::problem::Problem;

/// Keys kept before the buckets that are full again are dropped.
const PRUNE_ABOVE: usize = 100_000;

/// One [`RateLimit`] applied per key. Off when the setting is.
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    what: &'static str,
    limiter: Option<DefaultKeyedRateLimiter<K>>,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for KeyedLimit<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLimit")
            .field("what", &self.what)
            .field("on", &self.limiter.is_some())
            .finish()
    }
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// `what` names the requests limited, for the problem's detail ("messages sent").
    pub fn new(what: &'static str, limit: RateLimit) -> KeyedLimit<K> {
        let limiter = if limit.is_on() {
            let period =
                Duration::from_secs_f64(1.0 / limit.per_second).max(Duration::from_nanos(1));
            Quota::with_period(period).map(|quota| {
                let burst = NonZeroU32::new(limit.burst).unwrap_or(NonZeroU32::MIN);
                DefaultKeyedRateLimiter::keyed(quota.allow_burst(burst))
            })
        } else {
            None
        };
        KeyedLimit { what, limiter }
    }

    /// Takes a token of `key`'s bucket, or says how long to wait for one.
    pub fn check(&self, key: &K) -> Result<(), Limited> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        if limiter.len() > PRUNE_ABOVE {
            limiter.retain_recent();
        }
        limiter.check_key(key).map_err(|not_until| Limited {
            what: self.what,
            wait: not_until.wait_time_from(DefaultClock::default().now()),
        })
    }
}

/// A refusal: too many requests of one class; try again after `wait`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many {what}; try again in {wait:?}")]
pub struct Limited {
    pub what: &'static str,
    pub wait: Duration,
}

impl Limited {
    /// Whole seconds to wait, at least one (`Retry-After`).
    pub fn retry_after_secs(&self) -> u64 {
        self.wait.as_secs() + u64::from(self.wait.subsec_nanos() > 0)
    }
}

impl From<&Limited> for Problem {
    fn from(limited: &Limited) -> Problem {
        Problem::too_many_requests(
            format!(
                "too many {}; try again in {} s",
                limited.what,
                limited.retry_after_secs().max(1)
            ),
            limited.retry_after_secs().max(1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refuses_past_its_burst_and_says_when_to_retry() {
        let limit = KeyedLimit::new("things", RateLimit::new(0.5, 3));
        for _ in 0..3 {
            limit.check(&1).unwrap();
        }
        let refused = limit.check(&1).unwrap_err();
        assert!(refused.wait > Duration::from_secs(1) && refused.wait <= Duration::from_secs(2));
        assert_eq!(refused.retry_after_secs(), 2);
        // Another key has its own bucket.
        limit.check(&2).unwrap();
        let problem = Problem::from(&refused);
        assert_eq!(problem.status, 429);
        assert_eq!(problem.retry_after, Some(2));
    }

    #[test]
    fn an_off_limit_never_refuses() {
        let limit = KeyedLimit::new("things", RateLimit::OFF);
        for _ in 0..10_000 {
            limit.check(&1).unwrap();
        }
    }
}
