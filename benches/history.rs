//! Run history at scale on PostgreSQL: listing and filtering runs with 10M stored.
//! `cargo bench --bench history [-- ROWS]` seeds ROWS runs (default 10,000,000) once into the
//! schema `bench_history` of `SWITCHYARD_BENCH_POSTGRES` (default the local `test` database),
//! reuses them on later runs, and prints each query's median time over 20 runs through the store
//! (`list_runs`, the code the CLI and API use) with the plan PostgreSQL chose for it.

use std::time::{Duration, Instant};

use switchyard_engine::state::RunStatus;
use switchyard_engine::store::{RunFilter, connect};

const SCHEMA: &str = "bench_history";
const DAY_MS: i64 = 86_400_000;
/// The newest seeded run; the history spans the 90 days before it.
const NEWEST: i64 = 1_800_000_000_000;

#[tokio::main]
async fn main() {
    let rows: i64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let base = std::env::var("SWITCHYARD_BENCH_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let url = format!("{base}?options[search_path]={SCHEMA}");
    let store = connect(&url).await.expect("PostgreSQL is reachable");
    store.migrate().await.unwrap();
    let admin = sqlx::PgPool::connect(&url).await.unwrap();
    seed(&admin, rows).await;

    println!(
        "run history on PostgreSQL, {} stored runs, {} cores",
        count(&admin).await,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let recent = NEWEST - DAY_MS;
    let cases: Vec<(&str, RunFilter, String)> = vec![
        ("newest 50", filter(None, None, None), String::new()),
        (
            "one workflow",
            filter(Some("wf_07"), None, None),
            "workflow_id = 'wf_07'".into(),
        ),
        (
            "failed",
            filter(None, Some(RunStatus::Failed), None),
            "status = 'failed'".into(),
        ),
        (
            "succeeded (the status the status indexes leave out)",
            filter(None, Some(RunStatus::Succeeded), None),
            "status = 'succeeded'".into(),
        ),
        (
            "one workflow, succeeded",
            filter(Some("wf_07"), Some(RunStatus::Succeeded), None),
            "workflow_id = 'wf_07' AND status = 'succeeded'".into(),
        ),
        (
            "one workflow, failed",
            filter(Some("wf_07"), Some(RunStatus::Failed), None),
            "workflow_id = 'wf_07' AND status = 'failed'".into(),
        ),
        (
            "last 24 h, one workflow",
            filter(Some("wf_07"), None, Some(recent)),
            format!("workflow_id = 'wf_07' AND created_at >= {recent}"),
        ),
        (
            "rare: cancelled, one workflow",
            filter(Some("wf_19"), Some(RunStatus::Cancelled), None),
            "workflow_id = 'wf_19' AND status = 'cancelled'".into(),
        ),
    ];
    for (name, filter, sql_where) in cases {
        let mut times = Vec::new();
        let mut found = 0;
        for _ in 0..20 {
            let start = Instant::now();
            found = store.list_runs(&filter).await.unwrap().len();
            times.push(start.elapsed());
        }
        times.sort();
        println!(
            "{name}: median {:.2} ms, worst {:.2} ms ({found} rows)",
            ms(times[times.len() / 2]),
            ms(times[times.len() - 1])
        );
        let where_clause = if sql_where.is_empty() {
            String::new()
        } else {
            format!("WHERE {sql_where}")
        };
        let plan: Vec<String> = sqlx::query_scalar(&format!(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF) SELECT id, workflow_id, \
             version, status, parent_run_id, error, created_at, started_at, finished_at FROM runs \
             {where_clause} ORDER BY created_at DESC, id DESC LIMIT 50"
        ))
        .fetch_all(&admin)
        .await
        .unwrap();
        for line in plan {
            println!("    {line}");
        }
    }
}

fn filter(workflow: Option<&str>, status: Option<RunStatus>, after: Option<i64>) -> RunFilter {
    RunFilter {
        workflow_id: workflow.map(str::to_owned),
        status,
        created_after: after,
        limit: 50,
        ..RunFilter::default()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn count(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Seeds `rows` finished runs over 90 days across 20 workflows: mostly succeeded, some failed,
/// few cancelled. Skipped when the schema already holds that many.
async fn seed(pool: &sqlx::PgPool, rows: i64) {
    let have = count(pool).await;
    if have >= rows {
        return;
    }
    sqlx::query("TRUNCATE runs").execute(pool).await.unwrap();
    let chunk = 1_000_000i64;
    let started = Instant::now();
    let mut from = 0;
    while from < rows {
        let to = (from + chunk).min(rows);
        sqlx::query(
            "INSERT INTO runs (id, workflow_id, version, status, input, retention_ms, \
                 created_at, started_at, finished_at, expires_at) \
             SELECT lpad(to_hex(n), 16, '0') || '-seed', \
                 'wf_' || lpad((n % 20)::text, 2, '0'), 1, \
                 CASE WHEN abs(hashint8(n) % 1000) < 900 THEN 'succeeded' \
                      WHEN abs(hashint8(n) % 1000) < 980 THEN 'failed' \
                      WHEN abs(hashint8(n) % 1000) < 982 THEN 'cancelled' ELSE 'timed_out' END, \
                 '{}', 31536000000, \
                 $3 - (($4 - n) * 7776000000 / $4), \
                 $3 - (($4 - n) * 7776000000 / $4), \
                 $3 - (($4 - n) * 7776000000 / $4) + 1000, \
                 $3 + 31536000000 \
             FROM generate_series($1, $2 - 1) AS n",
        )
        .bind(from)
        .bind(to)
        .bind(NEWEST)
        .bind(rows)
        .execute(pool)
        .await
        .unwrap();
        from = to;
        eprintln!(
            "seeded {to} runs in {:.0} s",
            started.elapsed().as_secs_f64()
        );
    }
    sqlx::query("VACUUM ANALYZE runs")
        .execute(pool)
        .await
        .unwrap();
}
