//! Webhooks in and notifications out, against the real `switchyard serve` (release build), on
//! SQLite and PostgreSQL. `cargo bench --bench webhooks` prints, as measured on this machine:
//! - signed deliveries (`hmac-sha256`, `respond: accepted`) accepted per second: 20,000
//!   deliveries, each a distinct event, 64 in flight, the API's rate limit raised; the server
//!   runs no workers, so the figure is what accepting costs (a logged event and a run created
//!   for each, deliveries arriving together committed together);
//! - notifications delivered per second to a receiver in this process: the server restarted with
//!   workers runs those 20,000 one-step runs, and every run's end is notified; timed from the
//!   start to the last delivery, and from the first delivery to the last.
//!
//! `SWITCHYARD_BENCH_STORES` (default `sqlite,postgres`) and `SWITCHYARD_BENCH_POSTGRES` as for
//! the queue bench. Goal: at least 5,000 accepted deliveries per second on this machine.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hmac::Mac;
use serde_json::json;

const DELIVERIES: usize = 20_000;
const IN_FLIGHT: usize = 64;
const SECRET: &str = "bench-secret";

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn switchyard(dir: &std::path::Path, database: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.current_dir(dir)
        .env("SWITCHYARD_DATABASE_URL", database)
        .env("RUST_LOG", "warn");
    cmd
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `serve` on a free port with `workers`; waits until it answers.
async fn serve(dir: &std::path::Path, database: &str, workers: &str) -> (Server, String) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let server = Server(
        switchyard(dir, database)
            .args([
                "serve",
                "--listen",
                &listen,
                "--workers",
                workers,
                "--api-rate",
                "1000000",
                "--api-burst",
                "1000000",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://{listen}");
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if client.get(format!("{base}/health")).send().await.is_ok() {
            return (server, base);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("serve did not start");
}

/// Counts notifications received on `/notified`.
async fn receiver() -> (
    String,
    Arc<AtomicUsize>,
    Arc<std::sync::Mutex<Vec<Instant>>>,
) {
    let count = Arc::new(AtomicUsize::new(0));
    let times = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, t) = (count.clone(), times.clone());
    let app = axum::Router::new().route(
        "/notified",
        axum::routing::post(move || {
            let (c, t) = (c.clone(), t.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                t.lock().unwrap().push(Instant::now());
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, count, times)
}

fn signature(t: i64, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

async fn measure(store: &str, database: &str) {
    let dir = std::env::temp_dir().join(format!("switchyard-bench-hooks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("definitions")).unwrap();
    let (receiver_base, notified, times) = receiver().await;
    std::fs::write(
        dir.join("definitions/hooked.yaml"),
        format!(
            "id: hooked\nretention: 1h\n\
             notifications: {{on_success: true, webhook_url: \"{receiver_base}/notified\"}}\n\
             triggers:\n  - webhook: {{path: in, auth: hmac-sha256, secret: hook_secret}}\n\
             steps:\n  - {{id: a, type: noop}}\n"
        ),
    )
    .unwrap();
    let out = switchyard(&dir, database).arg("migrate").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = switchyard(&dir, database)
        .args(["token", "create", "--role", "admin"])
        .output()
        .unwrap();
    let admin = String::from_utf8_lossy(&out.stdout).trim().to_owned();

    let (server, base) = serve(&dir, database, "0").await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()
        .unwrap();
    let reply = client
        .put(format!("{base}/api/admin/secrets/hook_secret"))
        .bearer_auth(&admin)
        .json(&json!({"value": SECRET}))
        .send()
        .await
        .unwrap();
    assert!(
        reply.status().is_success(),
        "{}",
        reply.text().await.unwrap()
    );

    let next = Arc::new(AtomicUsize::new(0));
    let accepted = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let senders: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (client, base, next, accepted) =
                (client.clone(), base.clone(), next.clone(), accepted.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= DELIVERIES {
                        break;
                    }
                    let body = serde_json::to_vec(&json!({"order": n, "amount": 42})).unwrap();
                    let t = jiff::Timestamp::now().as_second();
                    let reply = client
                        .post(format!("{base}/api/hooks/in"))
                        .header("content-type", "application/json")
                        .header("x-signature", signature(t, &body))
                        .header("x-event-id", format!("evt-{n}"))
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    if reply.status() == reqwest::StatusCode::ACCEPTED {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap();
    }
    let took = started.elapsed();
    let accepted = accepted.load(Ordering::Relaxed);
    println!(
        "[{store}] signed webhook deliveries accepted: {:.0}/s ({accepted} of {DELIVERIES} in {:.2} s, {IN_FLIGHT} in flight)",
        accepted as f64 / took.as_secs_f64(),
        took.as_secs_f64()
    );
    drop(server);

    let started = Instant::now();
    let (server, _) = serve(&dir, database, "64").await;
    let deadline = Instant::now() + Duration::from_secs(600);
    while notified.load(Ordering::SeqCst) < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let got = notified.load(Ordering::SeqCst);
    let times = times.lock().unwrap().clone();
    let span = match (times.first(), times.last()) {
        (Some(first), Some(last)) => last.duration_since(*first),
        _ => Duration::ZERO,
    };
    println!(
        "[{store}] runs finished and notified: {:.0}/s ({got} of {accepted} in {:.2} s from the start); notifications from the first to the last: {:.0}/s",
        got as f64 / took.as_secs_f64(),
        took.as_secs_f64(),
        got as f64 / span.as_secs_f64().max(1e-9),
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!(
        "switchyard webhook benchmarks, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let postgres = std::env::var("SWITCHYARD_BENCH_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test?sslmode=disable".to_owned());
    let stores =
        std::env::var("SWITCHYARD_BENCH_STORES").unwrap_or_else(|_| "sqlite,postgres".to_owned());
    runtime.block_on(async {
        for store in stores.split(',').map(str::trim) {
            match store {
                "sqlite" => {
                    let dir = std::env::temp_dir()
                        .join(format!("switchyard-bench-hooks-{}", std::process::id()));
                    measure("sqlite", &format!("sqlite://{}/bench.db", dir.display())).await;
                }
                "postgres" => {
                    let schema = format!("bench_hooks_{}", std::process::id());
                    let admin = sqlx::PgPool::connect(&postgres).await.unwrap();
                    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&admin)
                        .await
                        .unwrap();
                    let sep = if postgres.contains('?') { '&' } else { '?' };
                    measure(
                        "postgres",
                        &format!("{postgres}{sep}options[search_path]={schema}"),
                    )
                    .await;
                    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .execute(&admin)
                        .await
                        .unwrap();
                }
                other => panic!("unknown store {other:?}: sqlite or postgres"),
            }
        }
    });
}
