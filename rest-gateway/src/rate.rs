//! The per-user rate limit on REST writes: a token bucket per user, refilled
//! at `rate` requests per second up to a burst of twice that.
//!
//! Memory is bounded: at most `max_users` buckets are kept. A bucket that
//! has refilled is the same as no bucket, so those go first when the map is
//! full; if every user is still busy, an eighth of the buckets are dropped
//! (those users start again with a full burst), so the sweep runs at most
//! once per `max_users / 8` new users. Each bucket costs about 100 bytes
//! plus the user id.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use dak_wire::UserId;
use tokio::time::Instant;

/// The settings of [`RateLimiter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per second per user; 0 turns the limit off.
    pub per_second: u32,
    /// Most users whose buckets are kept at once.
    pub max_users: usize,
}

pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    max_users: usize,
    buckets: Mutex<HashMap<UserId, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        let rate = f64::from(limit.per_second);
        Self {
            rate,
            burst: rate * 2.0,
            max_users: limit.max_users.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request of `user`'s at `now`; `Err` says how long until
    /// the next one is allowed.
    pub(crate) fn take(&self, user: &UserId, now: Instant) -> Result<(), Duration> {
        if self.rate == 0.0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= self.max_users && !buckets.contains_key(user) {
            self.make_room(&mut buckets, now);
        }
        let bucket = buckets.entry(user.clone()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        bucket.tokens = self.refilled(bucket, now);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate))
        }
    }

    fn refilled(&self, bucket: &Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        (bucket.tokens + elapsed * self.rate).min(self.burst)
    }

    fn make_room(&self, buckets: &mut HashMap<UserId, Bucket>, now: Instant) {
        buckets.retain(|_, bucket| self.refilled(bucket, now) < self.burst);
        if buckets.len() >= self.max_users {
            let evict: Vec<UserId> = buckets
                .keys()
                .take((self.max_users / 8).max(1))
                .cloned()
                .collect();
            for user in evict {
                buckets.remove(&user);
            }
        }
    }

    #[cfg(test)]
    fn users(&self) -> usize {
        self.buckets.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    #[test]
    fn a_burst_of_twice_the_rate_then_the_rate() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 5,
            max_users: 10,
        });
        let (alice, t0) = (user("alice"), Instant::now());
        for _ in 0..10 {
            assert!(limiter.take(&alice, t0).is_ok());
        }
        let wait = limiter.take(&alice, t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(200));
        // Others are not affected.
        assert!(limiter.take(&user("bob"), t0).is_ok());
        // One token back after 200 ms, and only one.
        let t1 = t0 + Duration::from_millis(200);
        assert!(limiter.take(&alice, t1).is_ok());
        assert!(limiter.take(&alice, t1).is_err());
    }

    #[test]
    fn zero_turns_the_limit_off() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 0,
            max_users: 1,
        });
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(limiter.take(&user("alice"), t0).is_ok());
        }
        assert_eq!(limiter.users(), 0);
    }

    #[test]
    fn the_buckets_kept_are_bounded() {
        let limiter = RateLimiter::new(RateLimit {
            per_second: 1,
            max_users: 16,
        });
        let t0 = Instant::now();
        for i in 0..1000 {
            let _ = limiter.take(&user(&format!("u{i}")), t0);
            assert!(limiter.users() <= 16);
        }
        // Later, a busy user keeps its (empty) bucket while the idle ones
        // (refilled) make room for new users.
        let t1 = t0 + Duration::from_secs(5);
        let busy = user("busy");
        assert!(limiter.take(&busy, t1).is_ok());
        assert!(limiter.take(&busy, t1).is_ok());
        for i in 0..15 {
            assert!(limiter.take(&user(&format!("v{i}")), t1).is_ok());
        }
        assert_eq!(limiter.users(), 16);
        let wait = limiter.take(&busy, t1);
        assert!(wait.is_err(), "the busy user's bucket was kept");
    }
}
