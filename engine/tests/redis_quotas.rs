//! Quota buckets in Redis, against the local server: the Lua script applies the same rule as
//! `state::quota_take`, atomically for every process that shares the server.

use std::time::Duration;

use switchyard_engine::quotas::{QuotaBuckets, RedisBuckets};
use switchyard_engine::state::quota_take;

fn redis_url() -> String {
    std::env::var("SWITCHYARD_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

async fn connect() -> Option<RedisBuckets> {
    match RedisBuckets::connect(&redis_url()).await {
        Ok(buckets) => Some(buckets),
        Err(e) => {
            switchyard_engine::testing::skipped(
                "SWITCHYARD_REQUIRE_REDIS",
                &format!("Redis at {} is not reachable ({e})", redis_url()),
            );
            None
        }
    }
}

fn unique(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_buckets_give_the_turns_the_rule_gives_to_concurrent_takers() {
    let Some(buckets) = connect().await else {
        return;
    };
    let buckets = std::sync::Arc::new(buckets);
    let name = unique("openai");
    let per = Duration::from_secs(1);
    let now = 1_800_000_000_000;
    let takes = (0..25).map(|_| {
        let (buckets, name) = (buckets.clone(), name.clone());
        async move { buckets.take(&name, 10, per, now, true).await.unwrap() }
    });
    let mut got = futures::future::join_all(takes).await;
    got.sort_unstable();
    let mut tat = 0;
    let expected: Vec<i64> = (0..25)
        .map(|_| {
            let take = quota_take(tat, now, 10, per, true);
            tat = take.tat_us.unwrap();
            take.at
        })
        .collect();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_take_without_reservation_changes_nothing_in_redis() {
    let Some(buckets) = connect().await else {
        return;
    };
    let name = unique("api");
    let per = Duration::from_secs(2);
    let now = 1_800_000_000_000;
    for _ in 0..2 {
        assert_eq!(buckets.take(&name, 2, per, now, false).await.unwrap(), now);
    }
    for _ in 0..3 {
        assert_eq!(
            buckets.take(&name, 2, per, now, false).await.unwrap(),
            now + 1_000,
            "refused, and the turn it names does not move"
        );
    }
    assert_eq!(
        buckets
            .take(&name, 2, per, now + 1_000, false)
            .await
            .unwrap(),
        now + 1_000
    );
}

/// A Redis that stops answering (frozen, its connection open) fails a take after
/// `REDIS_ANSWER_TIMEOUT`, so its caller's fallback decides; once it answers again, takes work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_fails_a_take_instead_of_holding_it() {
    let Some(redis) = switchyard_engine::testing::OwnRedis::start() else {
        return;
    };
    let buckets = RedisBuckets::connect(&redis.url).await.unwrap();
    let per = Duration::from_secs(1);
    let now = 1_800_000_000_000;
    assert_eq!(buckets.take("api", 10, per, now, false).await.unwrap(), now);
    redis.freeze();
    // Far longer than the answer timeout: a take that hung on the frozen server would end here.
    let take = tokio::time::timeout(
        Duration::from_secs(20),
        buckets.take("api", 10, per, now, false),
    )
    .await
    .expect("the take waited on a Redis that does not answer");
    assert!(take.is_err(), "{take:?}");
    redis.thaw();
    let mut again = Err(None);
    for _ in 0..50 {
        match buckets.take("api", 10, per, now, false).await {
            Ok(at) => {
                again = Ok(at);
                break;
            }
            Err(e) => again = Err(Some(e.to_string())),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(again, Ok(now), "takes work again once Redis answers");
}
