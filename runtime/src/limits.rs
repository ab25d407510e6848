//! Rate limits: a token bucket per key (a user, or a client address) and class of request, kept in
//! memory by each process.
//!
//! Each bucket is kept as the generic cell rate algorithm keeps it: one instant per key, its
//! *theoretical arrival time* (TAT), the moment the bucket will be full again. A bucket of `burst`
//! tokens refilled one token every `interval` holds `burst - (TAT - now) / interval` tokens at
//! `now` (all of them once the TAT has passed). Taking `cost` tokens moves the TAT `cost`
//! intervals later; giving them back moves it earlier again.
//!
//! A request may cost more than one token (the chats allowance counts the people a request puts
//! into chats), and more than the whole burst (a group may start with more people than that). A
//! request that costs more than the burst is let through only when the bucket is full, and leaves
//! it in debt: its TAT lies further ahead than the burst reaches, so the key's next request waits
//! until the bucket has refilled to cover it. Over time a key so takes no more than `burst` plus
//! the rate, as with smaller requests; the only difference is that one large request is not
//! refused for ever.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::config::RateLimit;
use crate::problem::Problem;

/// Keys a shard keeps before its buckets that are full again are dropped.
const PRUNE_ABOVE: usize = 100_000 / SHARDS;

/// Independently locked parts of the buckets, so that keys hashed apart do not wait for each
/// other.
const SHARDS: usize = 16;

/// One [`RateLimit`] applied per key. Off when the setting is.
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    what: &'static str,
    buckets: Option<Buckets<K>>,
}

impl<K: Hash + Eq + Clone> std::fmt::Debug for KeyedLimit<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyedLimit")
            .field("what", &self.what)
            .field("on", &self.buckets.is_some())
            .finish()
    }
}

/// What a request took from a key's bucket, to give back with [`KeyedLimit::give_back`] if the
/// request turns out to have done nothing. Dropping it keeps the tokens taken.
#[derive(Debug)]
#[must_use = "dropping a take keeps its tokens; give it back if the request did nothing"]
pub struct Taken<K> {
    /// `None` when the limit is off.
    taken: Option<TakenFrom<K>>,
}

#[derive(Debug)]
struct TakenFrom<K> {
    key: K,
    /// The tokens taken, in nanoseconds of refill.
    cost: u64,
    /// The bucket's TAT just after they were taken, in nanoseconds from the buckets' epoch.
    until: u64,
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// `what` names the requests limited, for the problem's detail ("messages sent").
    pub fn new(what: &'static str, limit: RateLimit) -> KeyedLimit<K> {
        let buckets = limit.is_on().then(|| Buckets::new(limit));
        KeyedLimit { what, buckets }
    }

    /// Takes a token of `key`'s bucket, or says how long to wait for one.
    pub fn check(&self, key: &K) -> Result<(), Limited> {
        self.take(key, 1).map(drop)
    }

    /// Takes `cost` tokens of `key`'s bucket (a cost of 0 is taken as 1), or says how long to
    /// wait until the bucket holds them: nothing is taken then. A cost above the burst is taken
    /// only from a full bucket, which it leaves in debt (see the module's description); the wait
    /// for it is until the bucket is full.
    pub fn take(&self, key: &K, cost: u32) -> Result<Taken<K>, Limited> {
        let Some(buckets) = &self.buckets else {
            return Ok(Taken { taken: None });
        };
        buckets
            .take_at(key, cost, buckets.now())
            .map(|taken| Taken { taken: Some(taken) })
            .map_err(|wait| Limited {
                what: self.what,
                wait: Duration::from_nanos(wait),
            })
    }

    /// Gives back what [`take`](KeyedLimit::take) took, for a request that turned out to do
    /// nothing, as far as the bucket has not refilled it already: the bucket ends as if the
    /// request had not been made, requests taken meanwhile still counted. (Exactly so while no
    /// time passes; a request that ran long and was given back after one taken before it was
    /// given back too may get back up to the tokens that flowed in while it ran, and the bucket
    /// never holds more than its burst.)
    pub fn give_back(&self, taken: Taken<K>) {
        if let (Some(buckets), Some(taken)) = (&self.buckets, taken.taken) {
            buckets.give_back_at(taken, buckets.now());
        }
    }

    /// Gives back all but one token of what [`take`](KeyedLimit::take) took, as
    /// [`give_back`](KeyedLimit::give_back) does: for a request refused once it ran, which cost
    /// its checks, as any request does, but not what it would have made.
    pub fn give_back_all_but_one(&self, taken: Taken<K>) {
        if let (Some(buckets), Some(mut taken)) = (&self.buckets, taken.taken) {
            taken.cost = taken.cost.saturating_sub(buckets.interval);
            buckets.give_back_at(taken, buckets.now());
        }
    }
}

/// The buckets of a limit that is on. Times are nanoseconds from `epoch`.
struct Buckets<K> {
    /// How long one token takes to flow in.
    interval: u64,
    burst: u64,
    epoch: Instant,
    hasher: RandomState,
    shards: Box<[Mutex<Shard<K>>]>,
}

struct Shard<K> {
    /// Each key's TAT. A key whose TAT has passed has a full bucket, as has a key not kept.
    tats: HashMap<K, u64>,
    /// Keys above which the full buckets are dropped: at least [`PRUNE_ABOVE`], twice the keys
    /// left after the last pruning, so a shard of busy keys is not scanned on every request.
    prune_above: usize,
}

impl<K: Hash + Eq + Clone> Buckets<K> {
    fn new(limit: RateLimit) -> Buckets<K> {
        let interval = Duration::try_from_secs_f64(1.0 / limit.per_second)
            .unwrap_or(Duration::MAX)
            .max(Duration::from_nanos(1))
            .as_nanos();
        let burst = u64::from(limit.burst.max(1));
        Buckets {
            // At most a quarter of the clock's range for the whole burst: the burst's tolerance
            // must not saturate, or nothing would ever be past it (a rate of one in centuries is
            // as good as none).
            interval: u64::try_from(interval)
                .unwrap_or(u64::MAX)
                .min(u64::MAX / 4 / burst),
            burst,
            epoch: Instant::now(),
            hasher: RandomState::new(),
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        tats: HashMap::new(),
                        prune_above: PRUNE_ABOVE,
                    })
                })
                .collect(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, Shard<K>> {
        let index = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        // The critical sections below do not panic; a poisoned lock holds consistent numbers.
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes `cost` tokens at `now`, or answers the nanoseconds to wait.
    fn take_at(&self, key: &K, cost: u32, now: u64) -> Result<TakenFrom<K>, u64> {
        let cost = u64::from(cost.max(1));
        let tolerance = self.burst.saturating_mul(self.interval);
        let mut shard = self.shard(key);
        if shard.tats.len() > shard.prune_above {
            shard.tats.retain(|_, tat| *tat > now);
            shard.prune_above = PRUNE_ABOVE.max(shard.tats.len() * 2);
        }
        let tat = shard.tats.get(key).copied().unwrap_or(now).max(now);
        // What the bucket must hold: the cost, or all of it for a cost above the burst.
        let needed = cost.min(self.burst).saturating_mul(self.interval);
        let ahead = tat - now;
        let after = ahead.saturating_add(needed);
        if after > tolerance {
            return Err(after - tolerance);
        }
        let cost = cost.saturating_mul(self.interval);
        let until = tat.saturating_add(cost);
        shard.tats.insert(key.clone(), until);
        Ok(TakenFrom {
            key: key.clone(),
            cost,
            until,
        })
    }

    /// Gives back at `now` what a take took: the part of it the bucket has not refilled yet (its
    /// TAT at the take less `now`, at most its cost), and never more than the bucket lacks.
    fn give_back_at(&self, taken: TakenFrom<K>, now: u64) {
        let mut shard = self.shard(&taken.key);
        if let Some(tat) = shard.tats.get_mut(&taken.key) {
            let owed = taken
                .cost
                .min(taken.until.saturating_sub(now))
                .min(tat.saturating_sub(now));
            *tat -= owed;
        }
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

    const SECOND: u64 = 1_000_000_000;

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
        let taken = limit.take(&1, u32::MAX).unwrap();
        limit.give_back(taken);
    }

    /// One token a second, ten at most.
    fn buckets() -> Buckets<u32> {
        Buckets::new(RateLimit::new(1.0, 10))
    }

    #[test]
    fn a_take_costs_its_tokens_and_a_refused_one_nothing() {
        let buckets = buckets();
        buckets.take_at(&1, 4, 0).unwrap();
        buckets.take_at(&1, 4, 0).unwrap();
        // Two left: three wait a second, and take nothing.
        assert_eq!(buckets.take_at(&1, 3, 0).unwrap_err(), SECOND);
        buckets.take_at(&1, 2, 0).unwrap();
        assert_eq!(buckets.take_at(&1, 1, 0).unwrap_err(), SECOND);
        // Tokens flow in: three seconds later, three.
        buckets.take_at(&1, 3, 3 * SECOND).unwrap();
        assert!(buckets.take_at(&1, 1, 3 * SECOND).is_err());
        // A cost of 0 is a cost of 1.
        buckets.take_at(&1, 0, 4 * SECOND).unwrap();
        assert!(buckets.take_at(&1, 1, 4 * SECOND).is_err());
    }

    #[test]
    fn a_refused_request_keeps_one_token_of_its_take() {
        let limit = KeyedLimit::new("things", RateLimit::new(0.001, 10));
        let taken = limit.take(&1, 8).unwrap();
        limit.give_back_all_but_one(taken);
        // Nine left: nine more go, the tenth does not.
        let taken = limit.take(&1, 9).unwrap();
        assert!(limit.check(&1).is_err());
        limit.give_back(taken);
        drop(limit.take(&1, 9).unwrap());
        assert!(limit.check(&1).is_err());
    }

    #[test]
    fn a_rate_of_one_in_centuries_still_refuses_past_its_burst() {
        for limit in [RateLimit::new(1e-12, 1), RateLimit::new(1e-9, u32::MAX)] {
            let limit = KeyedLimit::new("things", limit);
            let burst = limit.buckets.as_ref().unwrap().burst;
            drop(limit.take(&1, u32::try_from(burst).unwrap()).unwrap());
            assert!(limit.check(&1).is_err(), "{limit:?} let one past its burst");
        }
    }

    #[test]
    fn a_take_above_the_burst_needs_a_full_bucket_and_leaves_a_debt() {
        let buckets = buckets();
        buckets.take_at(&1, 1, 0).unwrap();
        // Not full: wait the second until it is.
        assert_eq!(buckets.take_at(&1, 25, 0).unwrap_err(), SECOND);
        buckets.take_at(&1, 25, SECOND).unwrap();
        // 15 in debt: one more token waits 16 s, five 20 s.
        assert_eq!(buckets.take_at(&1, 1, SECOND).unwrap_err(), 16 * SECOND);
        assert_eq!(buckets.take_at(&1, 5, SECOND).unwrap_err(), 20 * SECOND);
        assert!(buckets.take_at(&1, 1, 16 * SECOND).is_err());
        buckets.take_at(&1, 1, 17 * SECOND).unwrap();
        // Full again 25 s after, and then 25 goes again.
        assert!(buckets.take_at(&1, 25, 26 * SECOND).is_err());
        buckets.take_at(&1, 25, 27 * SECOND).unwrap();
    }

    #[test]
    fn given_back_tokens_are_taken_again_and_others_taken_meanwhile_stay_taken() {
        let buckets = buckets();
        let first = buckets.take_at(&1, 6, 0).unwrap();
        let second = buckets.take_at(&1, 3, 0).unwrap();
        // Given back out of order, the other's three stay taken.
        buckets.give_back_at(first, 0);
        buckets.take_at(&1, 7, 0).unwrap();
        assert!(buckets.take_at(&1, 1, 0).is_err());
        buckets.give_back_at(second, 0);
        buckets.take_at(&1, 3, 0).unwrap();
        assert!(buckets.take_at(&1, 1, 0).is_err());

        // A debt given back: the bucket is full again, no fuller.
        let buckets = super::tests::buckets();
        let large = buckets.take_at(&2, 40, 0).unwrap();
        buckets.give_back_at(large, SECOND);
        buckets.take_at(&2, 10, SECOND).unwrap();
        assert!(buckets.take_at(&2, 1, SECOND).is_err());
    }

    #[test]
    fn what_has_flowed_back_in_is_not_given_back_again() {
        let buckets = buckets();
        // Five taken, the bucket full again when they are given back: nothing to give.
        let early = buckets.take_at(&1, 5, 0).unwrap();
        let _later = buckets.take_at(&1, 3, 10 * SECOND).unwrap();
        buckets.give_back_at(early, 10 * SECOND);
        buckets.take_at(&1, 7, 10 * SECOND).unwrap();
        assert!(buckets.take_at(&1, 1, 10 * SECOND).is_err());

        // Half flowed back in: the other half is given back.
        let buckets = super::tests::buckets();
        let taken = buckets.take_at(&1, 10, 0).unwrap();
        buckets.give_back_at(taken, 5 * SECOND);
        buckets.take_at(&1, 10, 5 * SECOND).unwrap();
        assert!(buckets.take_at(&1, 1, 5 * SECOND).is_err());
    }

    #[test]
    fn takes_and_gives_back_from_many_threads_add_up() {
        let limit = KeyedLimit::new("things", RateLimit::new(0.001, 10_000));
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for i in 0..1_000 {
                        let taken = limit.take(&1, 2).unwrap();
                        if i % 2 == 0 {
                            limit.give_back(taken);
                        }
                    }
                });
            }
        });
        // 8 × 500 × 2 kept: 2,000 left (and none has flowed in yet).
        let left = limit.take(&1, 2_000).unwrap();
        assert!(limit.take(&1, 1).is_err());
        limit.give_back(left);
        drop(limit.take(&1, 2_000).unwrap());
    }

    #[test]
    fn full_buckets_are_dropped_when_a_shard_grows_large() {
        let buckets = buckets();
        let in_first_shard = |key: &u32| buckets.hasher.hash_one(key).is_multiple_of(SHARDS as u64);
        let mut keys = (0..).filter(in_first_shard);
        for key in keys.by_ref().take(PRUNE_ABOVE + 1) {
            buckets.take_at(&key, 1, 0).unwrap();
        }
        assert_eq!(
            buckets.shards[0].lock().unwrap().tats.len(),
            PRUNE_ABOVE + 1
        );
        // All full again 1 s later: the shard's next take drops them.
        buckets
            .take_at(&keys.next().unwrap(), 1, 2 * SECOND)
            .unwrap();
        assert_eq!(buckets.shards[0].lock().unwrap().tats.len(), 1);
    }
}
