//! Quota precision: ten workers share one bucket of 100 a second and take turns as fast as they
//! are given, for 10 s after the first second's burst; the count admitted in those 10 s should
//! be within 2% of 1,000. Each worker waits for its turn as a parked step does (its time, then
//! on), and an admission counts at the moment the worker goes on, as the wall clock sees it.
//! Against each place buckets live: SQLite, PostgreSQL, Redis. `cargo bench --bench quotas`.
//!
//! `SWITCHYARD_BENCH_STORES` (default `sqlite,postgres,redis`); `SWITCHYARD_BENCH_POSTGRES` and
//! `SWITCHYARD_REDIS_URL` as elsewhere.

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_engine::quotas::{QuotaBuckets, RedisBuckets, StoreBuckets};

const WORKERS: usize = 10;
const LIMIT: u32 = 100;
const WINDOW: Duration = Duration::from_secs(10);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

async fn measure(place: &str, buckets: Arc<dyn QuotaBuckets>) {
    let name = format!("bench-{}-{}", std::process::id(), now_ms());
    let start = Instant::now();
    // Admissions are counted from the end of the first second (the burst) for WINDOW.
    let from = start + Duration::from_secs(1);
    let until = from + WINDOW;
    let workers = (0..WORKERS).map(|_| {
        let (buckets, name) = (buckets.clone(), name.clone());
        tokio::spawn(async move {
            let (mut admitted, mut takes) = (0u32, 0u32);
            loop {
                let now = now_ms();
                let at = buckets
                    .take(&name, LIMIT, Duration::from_secs(1), now, true)
                    .await
                    .unwrap();
                takes += 1;
                if at > now {
                    tokio::time::sleep(Duration::from_millis((at - now) as u64)).await;
                }
                let went = Instant::now();
                if went >= until {
                    return (admitted, takes);
                }
                if went >= from {
                    admitted += 1;
                }
            }
        })
    });
    let mut admitted = 0;
    let mut takes = 0;
    for worker in workers {
        let (a, t) = worker.await.unwrap();
        admitted += a;
        takes += t;
    }
    let expected = f64::from(LIMIT) * WINDOW.as_secs_f64();
    println!(
        "{place:>9}: {admitted} admitted in {:?} at {LIMIT}/s by {WORKERS} workers ({takes} takes): \
         {:+.2}% of {expected}",
        WINDOW,
        (f64::from(admitted) - expected) / expected * 100.0,
    );
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("quota precision, {cores} cores");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let stores =
        std::env::var("SWITCHYARD_BENCH_STORES").unwrap_or_else(|_| "sqlite,postgres,redis".into());
    runtime.block_on(async {
        for place in stores.split(',') {
            let buckets: Arc<dyn QuotaBuckets> = match place {
                "sqlite" => {
                    let dir = std::env::temp_dir()
                        .join(format!("switchyard-quota-bench-{}", std::process::id()));
                    std::fs::create_dir_all(&dir).unwrap();
                    let store = switchyard_engine::store::connect(&format!(
                        "sqlite://{}/q.db",
                        dir.display()
                    ))
                    .await
                    .unwrap();
                    store.migrate().await.unwrap();
                    Arc::new(StoreBuckets(store))
                }
                "postgres" => {
                    let url = std::env::var("SWITCHYARD_BENCH_POSTGRES")
                        .unwrap_or_else(|_| switchyard_engine::testing::postgres_url());
                    let store = switchyard_engine::store::connect(&url).await.unwrap();
                    store.migrate().await.unwrap();
                    Arc::new(StoreBuckets(store))
                }
                "redis" => {
                    let url = std::env::var("SWITCHYARD_REDIS_URL")
                        .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
                    Arc::new(RedisBuckets::connect(&url).await.unwrap())
                }
                other => panic!("unknown place {other}"),
            };
            measure(place, buckets).await;
        }
    });
}
