//! Rate limits: each bearer token, and each client address without one, gets its own bucket
//! (governor's GCRA). Over the limit, a request gets 429 with `Retry-After` and never reaches a
//! handler; tokens are told apart by their id, so one busy script cannot starve the others.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use super::AppState;
use super::error::ApiError;

/// Requests per second and burst, per token and per client address.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: NonZeroU32::new(50).expect("non-zero"),
            burst: NonZeroU32::new(100).expect("non-zero"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Caller {
    Token(String),
    Address(Option<IpAddr>),
}

pub struct RateLimiter {
    buckets: DefaultKeyedRateLimiter<Caller>,
    clock: DefaultClock,
    requests: std::sync::atomic::AtomicUsize,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Arc<Self> {
        let quota = Quota::per_second(limit.per_second).allow_burst(limit.burst);
        Arc::new(RateLimiter {
            buckets: governor::RateLimiter::keyed(quota),
            clock: DefaultClock::default(),
            requests: Default::default(),
        })
    }
}

/// How many requests pass between sweeps of idle buckets, which keeps memory bounded by the
/// callers of the last moments rather than every caller ever seen.
const SWEEP_EVERY: usize = 4096;

pub async fn limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limiter = &state.limiter;
    // A token names the caller only when it verifies; a made-up one counts against its address.
    let token_id = super::auth::bearer_token(request.headers())
        .and_then(|t| state.keys.verify(t, state.engine.now()).ok())
        .map(|claims| claims.jti);
    let caller = match token_id {
        Some(id) => Caller::Token(id),
        None => Caller::Address(
            request
                .extensions()
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip()),
        ),
    };
    let seen = limiter
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if seen % SWEEP_EVERY == SWEEP_EVERY - 1 {
        limiter.buckets.retain_recent();
    }
    match limiter.buckets.check_key(&caller) {
        Ok(()) => next.run(request).await,
        Err(not_until) => {
            let wait = not_until.wait_time_from(limiter.clock.now());
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            ApiError {
                retry_after: Some(secs.max(1)),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!("too many requests from this caller; retry in {secs} s"),
                )
            }
            .into_response()
        }
    }
}
