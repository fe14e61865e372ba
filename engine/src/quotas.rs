//! Shared rate limits: a step's `quota` (one bucket for every worker and process of a
//! database) and, with `--redis`, the API's rate limits. Buckets live in the database by
//! default, or in Redis (`--redis URL`) so that several control planes behind one load balancer
//! keep one limit. Both apply one rule, `state::quota_take` (GCRA).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::state::Millis;
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("redis: {0}")]
    Redis(String),
}

/// Where buckets are kept.
#[async_trait]
pub trait QuotaBuckets: Send + Sync {
    /// Takes from the bucket `name`, `limit` per `per`, at `now`; returns when the taker may go
    /// (now or earlier: at once). With `reserve`, a taker that must wait keeps its place;
    /// without, a refused one changes nothing.
    async fn take(
        &self,
        name: &str,
        limit: u32,
        per: Duration,
        now: Millis,
        reserve: bool,
    ) -> Result<Millis, QuotaError>;
}

/// Buckets in the database: one row each, changed under its lock.
pub struct StoreBuckets(pub Arc<dyn Store>);

#[async_trait]
impl QuotaBuckets for StoreBuckets {
    async fn take(
        &self,
        name: &str,
        limit: u32,
        per: Duration,
        now: Millis,
        reserve: bool,
    ) -> Result<Millis, QuotaError> {
        debug_assert!(reserve, "the database keeps steps' quotas, which reserve");
        Ok(self.0.take_quota(name, limit, per, now).await?)
    }
}

/// Buckets in Redis: `state::quota_take` as one Lua script, so each take is atomic across every
/// process that shares the server.
pub struct RedisBuckets {
    connection: redis::aio::ConnectionManager,
    script: redis::Script,
}

/// The longest a take waits for Redis's answer. API requests and steps wait on it, so a Redis
/// that stopped answering or is gone costs each of them this much, and then the caller's
/// fallback decides (the process's own API limits; a step waits and asks again).
pub const REDIS_ANSWER_TIMEOUT: Duration = Duration::from_millis(250);
/// The longest a (re)connection to Redis may take.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

impl RedisBuckets {
    /// Connects to `url` (`redis://host:port/db`); the connection reconnects by itself.
    pub async fn connect(url: &str) -> Result<Self, QuotaError> {
        let client = redis::Client::open(url).map_err(|e| QuotaError::Redis(e.to_string()))?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(REDIS_ANSWER_TIMEOUT))
            .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT));
        let connection = redis::aio::ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| QuotaError::Redis(e.to_string()))?;
        Ok(RedisBuckets {
            connection,
            script: redis::Script::new(include_str!("redis_quota.lua")),
        })
    }
}

#[async_trait]
impl QuotaBuckets for RedisBuckets {
    async fn take(
        &self,
        name: &str,
        limit: u32,
        per: Duration,
        now: Millis,
        reserve: bool,
    ) -> Result<Millis, QuotaError> {
        let per_us = per.as_micros().clamp(1, i64::MAX as u128) as i64;
        let mut connection = self.connection.clone();
        let mut script = self.script.key(format!("switchyard:quota:{name}"));
        script
            .arg(now)
            .arg(limit.max(1))
            .arg(per_us)
            .arg(i64::from(reserve));
        // The bound is the whole call's: while Redis is gone, a call waits on the manager's
        // reconnection, whose retries take seconds.
        let at: i64 =
            tokio::time::timeout(REDIS_ANSWER_TIMEOUT, script.invoke_async(&mut connection))
                .await
                .map_err(|_| QuotaError::Redis("no answer in time".into()))?
                .map_err(|e| QuotaError::Redis(e.to_string()))?;
        Ok(at)
    }
}
