//! The dashboard's pages with a big history on PostgreSQL. `cargo bench --bench dashboard
//! [-- ROWS]` seeds ROWS runs (default 1,000,000, over 90 days) once into the schema
//! `bench_dashboard` of `SWITCHYARD_BENCH_POSTGRES` (default the local `test` database), starts
//! the real `switchyard serve` on it (no workers), logs in, and prints for each page the median
//! and the slowest of 21 loads, measured at the client over loopback (so the server's time is at
//! most that), against the 50 ms each page must stay under.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SCHEMA: &str = "bench_dashboard";
const DAY_MS: i64 = 86_400_000;
const BUDGET_MS: f64 = 50.0;
const KEY: &str = "6b65792d666f722d7468652d64617368626f6172642d62656e63682d31323334";
const PASSWORD: &str = "bench password";
/// A run whose loop has `LOOP_ITEMS` items (the most a `for_each` takes), each with its attempts.
const LOOP_RUN: &str = "ffffffffffffffff-loop";
const LOOP_ITEMS: i64 = 10_000;
/// Fires, webhook events and notifications seeded beside the runs.
const RECORDS: i64 = 200_000;

const DEFINITIONS: &str = r#"
workflows:
  bench:
    schedule: "*/5 * * * *"
    input_schema: {type: object, properties: {region: {type: string}}}
    steps:
      - {id: fetch, type: noop}
      - {id: write, type: noop, needs: [fetch]}
      - {id: publish, type: noop, needs: [write]}
  other:
    steps:
      - {id: only, type: noop}
"#;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::main]
async fn main() {
    let rows: i64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let base = std::env::var("SWITCHYARD_BENCH_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let admin = sqlx::PgPool::connect(&base)
        .await
        .expect("PostgreSQL is reachable");
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {SCHEMA}"))
        .execute(&admin)
        .await
        .unwrap();
    let url = format!("{base}?options[search_path]={SCHEMA}");
    let dir =
        std::env::temp_dir().join(format!("switchyard-bench-dashboard-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("definitions")).unwrap();
    std::fs::write(dir.join("definitions/bench.yaml"), DEFINITIONS).unwrap();
    let command = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        c.current_dir(&dir)
            .env("SWITCHYARD_DATABASE_URL", &url)
            .env("SWITCHYARD_MASTER_KEY", KEY)
            .env("SWITCHYARD_PASSWORD", PASSWORD)
            .env("RUST_LOG", "warn");
        c
    };
    let migrated = command().arg("migrate").output().unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    seed(&pool, rows).await;
    seed_records(&pool).await;
    let added = command()
        .args(["user", "add", "bench", "--role", "admin"])
        .output()
        .unwrap();
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let _server = Server(
        command()
            .args([
                "serve",
                "--listen",
                &listen,
                "--workers",
                "0",
                "--api-rate",
                "100000",
                "--api-burst",
                "100000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(&listen).is_err() {
        assert!(Instant::now() < deadline, "serve did not listen");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let site = format!("http://{listen}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cookie = login(&http, &site).await;
    let run = sqlx::query_scalar::<_, String>(
        "SELECT id FROM runs WHERE status = 'failed' AND id <> $1 ORDER BY created_at DESC LIMIT 1",
    )
    .bind(LOOP_RUN)
    .fetch_one(&pool)
    .await
    .unwrap();

    println!(
        "dashboard pages on PostgreSQL, {} stored runs, {} cores (client-side time over loopback)",
        count(&pool).await,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let pages = [
        "/".to_owned(),
        "/overview/cards".to_owned(),
        "/overview/series".to_owned(),
        "/workflows".to_owned(),
        "/workflows/bench".to_owned(),
        "/runs".to_owned(),
        "/runs?status=failed".to_owned(),
        "/runs?workflow=bench&status=succeeded".to_owned(),
        "/runs?from=2020-01-01T00:00".to_owned(),
        format!("/runs/{run}"),
        format!("/runs/{run}/live"),
        format!("/runs/{LOOP_RUN}"),
        format!("/runs/{LOOP_RUN}/live"),
        "/fires".to_owned(),
        "/webhooks".to_owned(),
        "/notifications".to_owned(),
        "/alerts".to_owned(),
        "/usage".to_owned(),
        "/admin".to_owned(),
    ];
    let mut over = 0;
    for page in &pages {
        let mut times = Vec::new();
        for _ in 0..21 {
            let started = Instant::now();
            let reply = http
                .get(format!("{site}{page}"))
                .header("cookie", &cookie)
                .send()
                .await
                .unwrap();
            let status = reply.status();
            reply.bytes().await.unwrap();
            times.push(started.elapsed().as_secs_f64() * 1e3);
            assert!(status.is_success(), "{page}: {status}");
        }
        times.sort_by(f64::total_cmp);
        let (median, slowest) = (times[times.len() / 2], times[times.len() - 1]);
        let mark = if median > BUDGET_MS {
            over += 1;
            "  OVER 50 ms"
        } else {
            ""
        };
        println!("  {page:<42} median {median:>7.1} ms   slowest {slowest:>7.1} ms{mark}");
    }
    println!(
        "{} pages, {over} with a median over {BUDGET_MS} ms",
        pages.len()
    );
}

/// A session cookie for the bench's admin, logged in through the form as a browser would.
async fn login(http: &reqwest::Client, site: &str) -> String {
    let form = http.get(format!("{site}/login")).send().await.unwrap();
    let login_cookie = form.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_owned();
    let html = form.text().await.unwrap();
    let token = html
        .split("name=\"login_token\" value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the login form has its token")
        .to_owned();
    let reply = http
        .post(format!("{site}/login"))
        .header("cookie", login_cookie)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "username=bench&password={}&next=/&login_token={token}",
            PASSWORD.replace(' ', "+")
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 303, "login failed");
    reply
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("switchyard_session="))
        .and_then(|v| v.split(';').next())
        .expect("a session cookie")
        .to_owned()
}

/// Seeds what the other pages read: a run whose loop has `LOOP_ITEMS` items, with its jobs and
/// attempts (one item in 50 failed once before it succeeded, one in 500 failed), and `RECORDS`
/// fires (one in ten skipped), webhook events and notifications over the last 90 days. Skipped
/// when the loop's run exists.
async fn seed_records(pool: &sqlx::PgPool) {
    let seeded: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE id = $1")
        .bind(LOOP_RUN)
        .fetch_one(pool)
        .await
        .unwrap();
    if seeded > 0 {
        return;
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let started = Instant::now();
    let statements = [
        "INSERT INTO runs (id, workflow_id, version, status, input, retention_ms, created_at, \
             started_at, finished_at, expires_at, error) \
         VALUES ($1, 'bench', 1, 'failed', '{}', 31536000000, $2 - 3600000, $2 - 3600000, \
             $2 - 600000, $2 + 31536000000, 'step write failed: item 499 failed')",
        "WITH fetched AS ( \
             INSERT INTO jobs (run_id, step_id, state, needs, pending_needs, is_sink, attempt, \
                 attempt_budget, max_attempts, output, attempts, started_at, finished_at) \
             VALUES ($1, 'fetch', 'succeeded', '[]', 0, false, 1, 4, 4, '{\"items\": 10000}', \
                 jsonb_build_array(jsonb_build_object('attempt', 1, 'started_at', $2 - 3600000, \
                     'finished_at', $2 - 3599000, 'outcome', 'succeeded')), \
                 $2 - 3600000, $2 - 3599000) \
             RETURNING id), \
         parent AS ( \
             INSERT INTO jobs (run_id, step_id, state, needs, pending_needs, is_sink, attempt, \
                 attempt_budget, max_attempts, error, started_at, finished_at, parallel, \
                 items_left, next_item) \
             VALUES ($1, 'write', 'failed', '[\"fetch\"]', 0, true, 1, 4, 4, \
                 'item 499 failed: seeded', $2 - 3599000, $2 - 600000, 16, 0, $3) \
             RETURNING id) \
         INSERT INTO jobs (run_id, step_id, state, needs, pending_needs, is_sink, attempt, \
             attempt_budget, max_attempts, output, error, attempts, started_at, finished_at, \
             loop_job_id, item_index, item) \
         SELECT $1, 'write[' || n || ']', \
             CASE WHEN n % 500 = 499 THEN 'failed' ELSE 'succeeded' END, '[]', 0, false, \
             CASE WHEN n % 50 = 7 THEN 2 ELSE 1 END, 4, 4, \
             CASE WHEN n % 500 = 499 THEN NULL ELSE jsonb_build_object('text', 'item ' || n) END, \
             CASE WHEN n % 500 = 499 THEN 'seeded' END, \
             CASE WHEN n % 50 = 7 THEN jsonb_build_array( \
                 jsonb_build_object('attempt', 1, 'started_at', $2 - 3599000 + n * 200, \
                     'finished_at', $2 - 3599000 + n * 200 + 50, 'outcome', 'retrying', \
                     'error', 'HTTP 503'), \
                 jsonb_build_object('attempt', 2, 'started_at', $2 - 3599000 + n * 200 + 100, \
                     'finished_at', $2 - 3599000 + n * 200 + 180, 'outcome', 'succeeded')) \
             ELSE jsonb_build_array(jsonb_build_object('attempt', 1, \
                 'started_at', $2 - 3599000 + n * 200, \
                 'finished_at', $2 - 3599000 + n * 200 + 180, \
                 'outcome', CASE WHEN n % 500 = 499 THEN 'failed' ELSE 'succeeded' END)) END, \
             $2 - 3599000 + n * 200, $2 - 3599000 + n * 200 + 180, \
             parent.id, n, to_jsonb(n) \
         FROM parent, fetched, generate_series(0, $3 - 1) AS n",
        "INSERT INTO fires (workflow_id, fire_at, run_id, skipped_reason, recorded_at) \
         SELECT 'bench', $1 - n * 300000, NULL, \
             CASE WHEN n % 10 = 0 THEN 'overlap: the previous run was still going' END, \
             $1 - n * 300000 \
         FROM generate_series(1, $2) AS n",
        "INSERT INTO webhook_events (source, event_id, workflow_id, payload, received_at, scope) \
         SELECT 'stripe', 'evt_' || n, 'bench', jsonb_build_object('type', 'charge.succeeded', \
             'amount', n % 5000), $1 - n * 38880, '' \
         FROM generate_series(1, $2) AS n",
        "INSERT INTO notifications (event_id, run_id, workflow_id, url, run_status, status, \
             attempts, next_at, created_at, delivered_at) \
         SELECT 'ntf_' || n, lpad(to_hex(n), 16, '0') || '-seed', 'bench', \
             'https://hooks.example.com/runs', 'succeeded', 'delivered', 1, \
             $1 - n * 38880, $1 - n * 38880, $1 - n * 38880 + 200 \
         FROM generate_series(1, $2) AS n",
    ];
    // All or nothing: the check above skips a half-seeded schema otherwise.
    let mut tx = pool.begin().await.unwrap();
    let (run, jobs, records) = (&statements[..1], &statements[1..2], &statements[2..]);
    for statement in run {
        sqlx::query(statement)
            .bind(LOOP_RUN)
            .bind(now)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    for statement in jobs {
        sqlx::query(statement)
            .bind(LOOP_RUN)
            .bind(now)
            .bind(LOOP_ITEMS)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    for statement in records {
        sqlx::query(statement)
            .bind(now)
            .bind(RECORDS)
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    for table in ["jobs", "fires", "webhook_events", "notifications"] {
        sqlx::query(&format!("VACUUM ANALYZE {table}"))
            .execute(pool)
            .await
            .unwrap();
    }
    eprintln!(
        "seeded a loop of {LOOP_ITEMS} items and {RECORDS} fires, webhook events and \
         notifications in {:.0} s",
        started.elapsed().as_secs_f64()
    );
}

async fn count(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Seeds `rows` finished runs of `bench` over the 90 days before now: mostly succeeded, some
/// failed, few cancelled. Skipped when the schema already holds that many.
async fn seed(pool: &sqlx::PgPool, rows: i64) {
    if count(pool).await >= rows {
        return;
    }
    sqlx::query("TRUNCATE runs CASCADE")
        .execute(pool)
        .await
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let started = Instant::now();
    let chunk = 500_000i64;
    let mut from = 0;
    while from < rows {
        let to = (from + chunk).min(rows);
        sqlx::query(
            "INSERT INTO runs (id, workflow_id, version, status, input, retention_ms, \
                 created_at, started_at, finished_at, expires_at, error) \
             SELECT lpad(to_hex(n), 16, '0') || '-seed', \
                 CASE WHEN n % 10 = 0 THEN 'other' ELSE 'bench' END, 1, \
                 s.status, '{}', 31536000000, \
                 $3 - (($4 - n) * $5 / $4), \
                 $3 - (($4 - n) * $5 / $4), \
                 $3 - (($4 - n) * $5 / $4) + 1000, \
                 $3 + 31536000000, \
                 CASE WHEN s.status = 'failed' THEN 'step write failed: seeded' END \
             FROM generate_series($1, $2 - 1) AS n, \
             LATERAL (SELECT CASE WHEN abs(hashint8(n) % 1000) < 900 THEN 'succeeded' \
                      WHEN abs(hashint8(n) % 1000) < 980 THEN 'failed' \
                      WHEN abs(hashint8(n) % 1000) < 982 THEN 'cancelled' ELSE 'timed_out' END AS status) s",
        )
        .bind(from)
        .bind(to)
        .bind(now)
        .bind(rows)
        .bind(90 * DAY_MS)
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
