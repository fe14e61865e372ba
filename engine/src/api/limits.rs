//! Rate limits (governor's GCRA buckets). Each user who logged in (over the API or into the
//! dashboard), each other token (by its id) and each client address without a valid token gets
//! its own bucket; `/health` and `/metrics` get a separate bucket per address, so a flood from
//! an address cannot make its probes fail.
//! Logins also count, before any password is hashed, against a bucket per user name and one per
//! client address. Over a limit, a request gets 429 with `Retry-After` and never reaches a
//! handler. With `--redis`, every bucket lives in Redis, one for all the processes behind a load
//! balancer; the process's own stand in while Redis does not answer.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, NotUntil, Quota};

use super::AppState;
use super::error::{ApiError, ErrorCode};
use crate::quotas::QuotaBuckets;

/// Requests per second and burst, per caller.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
    pub login: LoginLimit,
}

/// Login attempts per minute (also the burst), per user name and per client address.
#[derive(Debug, Clone, Copy)]
pub struct LoginLimit {
    pub per_user: NonZeroU32,
    pub per_address: NonZeroU32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: NonZeroU32::new(50).expect("non-zero"),
            burst: NonZeroU32::new(100).expect("non-zero"),
            login: LoginLimit::default(),
        }
    }
}

impl Default for LoginLimit {
    fn default() -> Self {
        LoginLimit {
            per_user: NonZeroU32::new(10).expect("non-zero"),
            per_address: NonZeroU32::new(60).expect("non-zero"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Caller {
    User(String),
    Token(String),
    Address(Option<IpAddr>),
    Probe(Option<IpAddr>),
}

pub struct RateLimiter {
    buckets: DefaultKeyedRateLimiter<Caller>,
    login_users: DefaultKeyedRateLimiter<String>,
    login_addresses: DefaultKeyedRateLimiter<Option<IpAddr>>,
    clock: DefaultClock,
    requests: std::sync::atomic::AtomicUsize,
    /// With `--redis`: the per-caller buckets live there, one for every process behind a load
    /// balancer; the buckets above stand in while Redis does not answer.
    shared: Option<(Arc<dyn QuotaBuckets>, RateLimit)>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit) -> Arc<Self> {
        Self::build(limit, None)
    }

    /// Per-caller limits kept in `buckets` (Redis), shared by every process that uses them.
    pub fn shared(limit: RateLimit, buckets: Arc<dyn QuotaBuckets>) -> Arc<Self> {
        Self::build(limit, Some(buckets))
    }

    fn build(limit: RateLimit, shared: Option<Arc<dyn QuotaBuckets>>) -> Arc<Self> {
        let quota = Quota::per_second(limit.per_second).allow_burst(limit.burst);
        let per_minute = |n: NonZeroU32| Quota::per_minute(n).allow_burst(n);
        Arc::new(RateLimiter {
            buckets: governor::RateLimiter::keyed(quota),
            login_users: governor::RateLimiter::keyed(per_minute(limit.login.per_user)),
            login_addresses: governor::RateLimiter::keyed(per_minute(limit.login.per_address)),
            clock: DefaultClock::default(),
            requests: Default::default(),
            shared: shared.map(|buckets| (buckets, limit)),
        })
    }

    /// The shared bucket's answer for `caller`: `None` when Redis does not answer, and the
    /// process's own bucket decides.
    async fn check_shared(
        &self,
        caller: &Caller,
        now: crate::state::Millis,
    ) -> Option<Result<(), ApiError>> {
        let (_, limit) = self.shared.as_ref()?;
        let key = match caller {
            Caller::User(name) => format!("api:user:{name}"),
            Caller::Token(jti) => format!("api:token:{jti}"),
            Caller::Address(a) => format!("api:address:{}", address_key(*a)),
            Caller::Probe(a) => format!("api:probe:{}", address_key(*a)),
        };
        // `burst` at once, refilled at `per_second`: GCRA's limit per period.
        let per = std::time::Duration::from_secs_f64(
            f64::from(limit.burst.get()) / f64::from(limit.per_second.get()),
        );
        self.take_shared(&key, limit.burst, per, now, "requests from this caller")
            .await
    }

    /// One take from the shared bucket `key`, `limit` per `per`: `None` when Redis does not
    /// answer.
    async fn take_shared(
        &self,
        key: &str,
        limit: NonZeroU32,
        per: std::time::Duration,
        now: crate::state::Millis,
        what: &str,
    ) -> Option<Result<(), ApiError>> {
        let (buckets, _) = self.shared.as_ref()?;
        match buckets.take(key, limit.get(), per, now, false).await {
            Ok(at) if at <= now => Some(Ok(())),
            Ok(at) => {
                let secs = ((at - now) as u64).div_ceil(1_000).max(1);
                Some(Err(ApiError::new(
                    ErrorCode::RateLimited,
                    format!("too many {what}; retry in {secs} s"),
                )
                .retry_after(secs)))
            }
            Err(e) => {
                tracing::warn!(error = %e, "shared rate limits unavailable; this process's own apply");
                None
            }
        }
    }

    /// Counts a login attempt for `username` from `address`: its address first, so one address
    /// trying many names cannot use up the buckets of those names beyond its own allowance.
    pub async fn check_login(
        &self,
        username: &str,
        address: Option<IpAddr>,
        now: crate::state::Millis,
    ) -> Result<(), ApiError> {
        // Names longer than any user's are cut, so they cannot grow the table without bound.
        let name: String = username.chars().take(64).collect();
        if let Some((_, limit)) = &self.shared {
            let minute = std::time::Duration::from_secs(60);
            let from_address = self
                .take_shared(
                    &format!("login:address:{}", address_key(address)),
                    limit.login.per_address,
                    minute,
                    now,
                    "login attempts from this address",
                )
                .await;
            match from_address {
                Some(Err(refused)) => return Err(refused),
                Some(Ok(())) => {
                    let for_user = self
                        .take_shared(
                            &format!("login:user:{name}"),
                            limit.login.per_user,
                            minute,
                            now,
                            "login attempts for this user",
                        )
                        .await;
                    if let Some(decided) = for_user {
                        return decided;
                    }
                }
                None => {}
            }
        }
        self.login_addresses
            .check_key(&address)
            .map_err(|not_until| self.too_many(not_until, "login attempts from this address"))?;
        self.login_users
            .check_key(&name)
            .map_err(|not_until| self.too_many(not_until, "login attempts for this user"))
    }

    fn too_many(
        &self,
        not_until: NotUntil<governor::clock::QuantaInstant>,
        what: &str,
    ) -> ApiError {
        let wait = not_until.wait_time_from(self.clock.now());
        let secs = (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1);
        ApiError::new(
            ErrorCode::RateLimited,
            format!("too many {what}; retry in {secs} s"),
        )
        .retry_after(secs)
    }
}

/// A client address as a shared bucket's key; one for callers whose address is not known.
fn address_key(address: Option<IpAddr>) -> String {
    address.map_or_else(|| "unknown".to_owned(), |a| a.to_string())
}

/// How many requests pass between sweeps of idle buckets, which keeps memory bounded by the
/// callers of the last moments rather than every caller ever seen.
const SWEEP_EVERY: usize = 4096;

/// The client's address, when the server recorded it.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(client_address(&parts.extensions)))
    }
}

fn client_address(extensions: &axum::http::Extensions) -> Option<IpAddr> {
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        // A dual-stack listener sees an IPv4 client as `::ffff:a.b.c.d`: one address, one
        // bucket.
        .map(|ConnectInfo(addr)| addr.ip().to_canonical())
}

pub async fn limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let limiter = &state.limiter;
    let address = client_address(request.extensions());
    let caller = if matches!(request.uri().path(), "/health" | "/metrics") {
        Caller::Probe(address)
    } else {
        // A token names the caller only when it verifies; a made-up one counts against its
        // address. A user's logins share one bucket.
        // A dashboard session is a login's token too, so its user's bucket counts it.
        let token = super::auth::bearer_token(request.headers())
            .or_else(|| crate::dashboard::session_token(request.headers()));
        let claims = match token {
            Some(token) => state.keys.verify(token, state.engine.now()).await.ok(),
            None => None,
        };
        match claims {
            Some(claims) if claims.user_version.is_some() => Caller::User(claims.sub),
            Some(claims) => Caller::Token(claims.jti),
            None => Caller::Address(address),
        }
    };
    let seen = limiter
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    if seen % SWEEP_EVERY == SWEEP_EVERY - 1 {
        limiter.buckets.retain_recent();
        limiter.login_users.retain_recent();
        limiter.login_addresses.retain_recent();
    }
    if let Some(decided) = limiter.check_shared(&caller, state.engine.now()).await {
        return match decided {
            Ok(()) => next.run(request).await,
            Err(refused) => refused.into_response(),
        };
    }
    match limiter.buckets.check_key(&caller) {
        Ok(()) => next.run(request).await,
        Err(not_until) => limiter
            .too_many(not_until, "requests from this caller")
            .into_response(),
    }
}

/// The longest path and query string served; a longer one gets 414 with the usual JSON body.
/// (Request lines over 64 KiB are refused by the HTTP layer itself, with a bare 414.)
const MAX_URI_BYTES: usize = 8 * 1024;

pub async fn uri_length(request: Request, next: Next) -> Response {
    let length = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if length > MAX_URI_BYTES {
        return ApiError::new(
            ErrorCode::UriTooLong,
            format!("the path and query are {length} bytes; at most {MAX_URI_BYTES} are served"),
        )
        .into_response();
    }
    next.run(request).await
}
