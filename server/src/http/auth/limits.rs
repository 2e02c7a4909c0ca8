//! Per-key limits: requests per minute, tokens per minute and requests in flight, checked
//! when a request is authenticated, before its body is read.
//!
//! Both per-minute limits are token buckets holding up to a minute's allowance and refilled
//! continuously (a key may burst its whole minute at once, then proceeds at the steady
//! rate). A request takes one unit from the request bucket when admitted. Tokens are not
//! known until the request has run, so a request is admitted while the token bucket is not
//! empty, and its prompt and generated tokens are taken afterwards, which may leave the bucket
//! in debt; the next request waits until the debt is refilled. The clock is a parameter, so
//! the arithmetic is tested without waiting.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

use super::keys::Limits;
use crate::http::error::{ApiError, ErrorKind, RETRY_AFTER_SECONDS};

/// A per-minute allowance refilled continuously.
#[derive(Debug, Clone)]
pub struct Bucket {
    capacity: f64,
    per_second: f64,
    level: f64,
    updated: Instant,
}

impl Bucket {
    /// A full bucket of `per_minute` units.
    pub fn per_minute(per_minute: u32, now: Instant) -> Self {
        let capacity = f64::from(per_minute);
        Self {
            capacity,
            per_second: capacity / 60.0,
            level: capacity,
            updated: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
    }

    /// `None` when a whole unit is available now, else the seconds until one is (at least 1).
    pub fn wait_for_one(&mut self, now: Instant) -> Option<u64> {
        self.refill(now);
        if self.level >= 1.0 {
            return None;
        }
        let seconds = ((1.0 - self.level) / self.per_second).ceil();
        // Saturating float-to-int conversion; the value is positive and at most ~60 s per
        // unit of debt.
        Some((seconds as u64).max(1))
    }

    /// Takes `units`, going into debt if there are not that many.
    pub fn take(&mut self, units: f64, now: Instant) {
        self.refill(now);
        self.level -= units;
    }

    pub fn level(&self) -> f64 {
        self.level
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    RequestsPerMinute,
    TokensPerMinute,
    MaxConcurrent,
}

impl Limit {
    /// The field of the key file.
    pub fn field(self) -> &'static str {
        match self {
            Self::RequestsPerMinute => "requests_per_minute",
            Self::TokensPerMinute => "tokens_per_minute",
            Self::MaxConcurrent => "max_concurrent",
        }
    }
}

/// A request over one of its key's limits: a 429 `rate_limit_exceeded` with `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub key: String,
    pub limit: Limit,
    pub value: u32,
    /// Seconds until the limit would let the request through.
    pub retry_after: u64,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let message = format!(
            "API key `{}` is over its {} limit of {}; retry in {} s",
            self.key,
            self.limit.field(),
            self.value,
            self.retry_after
        );
        let mut response = ApiError::new(ErrorKind::RateLimited, message).into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after));
        response
    }
}

/// The mutable part, behind one lock so a request is checked against all limits at once.
#[derive(Debug)]
struct State {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    in_flight: u32,
}

/// One key's limiter, shared by all its requests.
#[derive(Debug)]
pub struct KeyLimiter {
    key: String,
    limits: Limits,
    state: Mutex<State>,
}

impl KeyLimiter {
    /// `None` for a key without limits.
    pub fn new(key: &str, limits: Limits, now: Instant) -> Option<Self> {
        if limits.is_unlimited() {
            return None;
        }
        let state = State {
            requests: limits
                .requests_per_minute
                .map(|n| Bucket::per_minute(n, now)),
            tokens: limits.tokens_per_minute.map(|n| Bucket::per_minute(n, now)),
            in_flight: 0,
        };
        Some(Self {
            key: key.to_string(),
            limits,
            state: Mutex::new(state),
        })
    }

    /// A panic elsewhere while holding the lock leaves counts that are still usable.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a request (one request unit taken, one slot in flight held until the permit
    /// drops) or says which limit refuses it; a refused request takes nothing.
    pub fn admit(self: &Arc<Self>, now: Instant) -> Result<Permit, Refusal> {
        let mut state = self.state();
        let refuse = |limit: Limit, value: u32, retry_after: u64| Refusal {
            key: self.key.clone(),
            limit,
            value,
            retry_after,
        };
        if let Some(max) = self.limits.max_concurrent {
            if state.in_flight >= max {
                // A slot frees when some request ends, which nothing here can predict.
                return Err(refuse(Limit::MaxConcurrent, max, RETRY_AFTER_SECONDS));
            }
        }
        if let (Some(bucket), Some(value)) = (&mut state.tokens, self.limits.tokens_per_minute) {
            if let Some(wait) = bucket.wait_for_one(now) {
                return Err(refuse(Limit::TokensPerMinute, value, wait));
            }
        }
        if let (Some(bucket), Some(value)) = (&mut state.requests, self.limits.requests_per_minute)
        {
            if let Some(wait) = bucket.wait_for_one(now) {
                return Err(refuse(Limit::RequestsPerMinute, value, wait));
            }
            bucket.take(1.0, now);
        }
        state.in_flight += 1;
        Ok(Permit {
            limiter: self.clone(),
        })
    }

    /// Takes tokens a request used from the key's token bucket.
    pub fn charge_tokens(&self, tokens: usize, now: Instant) {
        if let Some(bucket) = &mut self.state().tokens {
            bucket.take(tokens as f64, now);
        }
    }

    /// Requests of this key in flight now.
    pub fn in_flight(&self) -> u32 {
        self.state().in_flight
    }
}

/// A request's slot among its key's requests in flight; freed on drop.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<KeyLimiter>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut state = self.limiter.state();
        state.in_flight = state.in_flight.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limiter(limits: Limits, now: Instant) -> Arc<KeyLimiter> {
        Arc::new(KeyLimiter::new("k", limits, now).expect("limited"))
    }

    #[test]
    fn bucket_refills_at_its_per_minute_rate_up_to_a_minute() {
        let t0 = Instant::now();
        let mut b = Bucket::per_minute(60, t0);
        b.take(60.0, t0);
        assert_eq!(b.wait_for_one(t0), Some(1));
        assert_eq!(b.wait_for_one(t0 + Duration::from_millis(1500)), None);
        assert!((b.level() - 1.5).abs() < 1e-9);
        assert_eq!(b.wait_for_one(t0 + Duration::from_secs(600)), None);
        assert_eq!(b.level(), 60.0, "capped at a minute's worth");
    }

    #[test]
    fn bucket_debt_is_paid_before_the_next_unit() {
        let t0 = Instant::now();
        let mut b = Bucket::per_minute(6, t0);
        b.take(12.0, t0);
        // Level -6 at 0.1 per second: 70 s until one whole unit.
        assert_eq!(b.wait_for_one(t0), Some(70));
        assert_eq!(b.wait_for_one(t0 + Duration::from_secs(69)), Some(1));
        assert_eq!(b.wait_for_one(t0 + Duration::from_secs(70)), None);
    }

    #[test]
    fn requests_per_minute_refuses_the_request_over_the_minute() {
        let t0 = Instant::now();
        let l = limiter(
            Limits {
                requests_per_minute: Some(2),
                ..Limits::default()
            },
            t0,
        );
        drop(l.admit(t0).expect("first"));
        drop(l.admit(t0).expect("second"));
        let refusal = l.admit(t0).expect_err("third");
        assert_eq!(refusal.limit, Limit::RequestsPerMinute);
        assert_eq!(refusal.retry_after, 30);
        assert!(l.admit(t0 + Duration::from_secs(30)).is_ok());
    }

    #[test]
    fn max_concurrent_counts_permits_alive() {
        let t0 = Instant::now();
        let l = limiter(
            Limits {
                max_concurrent: Some(1),
                ..Limits::default()
            },
            t0,
        );
        let held = l.admit(t0).expect("first");
        let refusal = l.admit(t0).expect_err("second while the first runs");
        assert_eq!(refusal.limit, Limit::MaxConcurrent);
        assert_eq!(refusal.retry_after, RETRY_AFTER_SECONDS);
        drop(held);
        assert_eq!(l.in_flight(), 0);
        assert!(l.admit(t0).is_ok());
    }

    #[test]
    fn tokens_per_minute_admits_until_the_used_tokens_run_it_dry() {
        let t0 = Instant::now();
        let l = limiter(
            Limits {
                tokens_per_minute: Some(600),
                requests_per_minute: Some(100),
                ..Limits::default()
            },
            t0,
        );
        drop(l.admit(t0).expect("first"));
        l.charge_tokens(700, t0);
        let refusal = l.admit(t0).expect_err("in debt");
        assert_eq!(refusal.limit, Limit::TokensPerMinute);
        // Level -100 at 10 per second: 10.1 s until one whole token.
        assert_eq!(refusal.retry_after, 11);
        assert!(l.admit(t0 + Duration::from_secs(11)).is_ok());
    }

    #[test]
    fn a_refused_request_takes_nothing() {
        let t0 = Instant::now();
        let l = limiter(
            Limits {
                requests_per_minute: Some(2),
                max_concurrent: Some(1),
                ..Limits::default()
            },
            t0,
        );
        let held = l.admit(t0).expect("first");
        assert_eq!(l.admit(t0).expect_err("busy").limit, Limit::MaxConcurrent);
        drop(held);
        assert!(l.admit(t0).is_ok(), "the refusal took no request unit");
    }

    #[test]
    fn unlimited_keys_have_no_limiter() {
        assert!(KeyLimiter::new("k", Limits::default(), Instant::now()).is_none());
    }
}
