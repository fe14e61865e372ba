//! A login flood against the real `switchyard serve` (release build): 3,000 wrong-password logins
//! from 40 loopback addresses, 300 in flight at a time, with the login rate limits raised so that
//! only the hashing threads and their queue stand in the way. `cargo bench --bench login_flood`
//! prints the server's peak RSS (VmHWM) and RSS after, how the logins were answered, and the
//! p50/p99 of an authenticated request (`GET /api/workflows`) before and during the flood.
//! Targets: peak RSS ≤ 256 MiB, p99 during the flood ≤ 100 ms.

use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

const LOGINS: u32 = 3_000;
const IN_FLIGHT: usize = 300;
const ADDRESSES: u32 = 40;

struct Server {
    child: Child,
    dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn switchyard(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.current_dir(dir)
        .env(
            "SWITCHYARD_DATABASE_URL",
            format!("sqlite://{}/bench.db", dir.display()),
        )
        .env("RUST_LOG", "warn");
    cmd
}

fn memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Authenticated requests one after another until `stop`; their latencies, sorted.
async fn measure(base: &str, token: &str, stop: Arc<AtomicBool>, at_most: usize) -> Vec<Duration> {
    let http = reqwest::Client::new();
    let mut took = Vec::new();
    while !stop.load(Ordering::Relaxed) && took.len() < at_most {
        let sent = Instant::now();
        let reply = http
            .get(format!("{base}/api/workflows"))
            .bearer_auth(token)
            .send()
            .await
            .expect("the API answers");
        assert_eq!(reply.status(), 200);
        reply.bytes().await.unwrap();
        took.push(sent.elapsed());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    took.sort();
    took
}

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("switchyard-bench-login-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("definitions")).unwrap();
    std::fs::write(
        dir.join("definitions/hello.yaml"),
        "id: hello\nsteps:\n  - {id: greet, type: noop}\n",
    )
    .unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let child = switchyard(&dir)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--workers",
            "0",
        ])
        .args(["--api-rate", "1000000", "--api-burst", "1000000"])
        .args(["--login-rate", "1000000", "--login-address-rate", "1000000"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server { child, dir };
    let pid = server.child.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let added = switchyard(&server.dir)
        .env("SWITCHYARD_PASSWORD", "correct horse battery")
        .args(["user", "add", "alice", "--role", "viewer"])
        .output()
        .unwrap();
    assert!(added.status.success());
    let token = switchyard(&server.dir)
        .args(["token", "create", "--role", "viewer"])
        .output()
        .unwrap();
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let idle_rss = memory_mib(pid, "VmRSS:");

    let quiet = measure(&base, &token, Arc::new(AtomicBool::new(false)), 200).await;

    let stop = Arc::new(AtomicBool::new(false));
    let during = tokio::spawn({
        let (base, token, stop) = (base.clone(), token.clone(), stop.clone());
        async move { measure(&base, &token, stop, usize::MAX).await }
    });
    let clients: Vec<reqwest::Client> = (0..ADDRESSES)
        .map(|n| {
            reqwest::Client::builder()
                .local_address(IpAddr::from([127, 0, 1, 1 + n as u8]))
                .build()
                .unwrap()
        })
        .collect();
    let started = Instant::now();
    let mut flood = tokio::task::JoinSet::new();
    let (mut checked, mut refused, mut other) = (0u32, 0u32, 0u32);
    for n in 0..LOGINS {
        if flood.len() >= IN_FLIGHT
            && let Some(status) = flood.join_next().await
        {
            match status.unwrap() {
                401 => checked += 1,
                429 | 503 => refused += 1,
                _ => other += 1,
            }
        }
        let login = clients[(n % ADDRESSES) as usize]
            .post(format!("{base}/api/auth/login"))
            .json(&json!({"username": "alice", "password": format!("wrong {n}")}))
            .send();
        flood.spawn(async move { login.await.map_or(0, |r| r.status().as_u16()) });
    }
    while let Some(status) = flood.join_next().await {
        match status.unwrap() {
            401 => checked += 1,
            429 | 503 => refused += 1,
            _ => other += 1,
        }
    }
    let flood_took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during = during.await.unwrap();
    let peak = memory_mib(pid, "VmHWM:");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = memory_mib(pid, "VmRSS:");
    // The hashing threads give their work areas back after 5 s without work.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let settled = memory_mib(pid, "VmRSS:");

    println!(
        "login flood: {LOGINS} wrong passwords from {ADDRESSES} addresses, {IN_FLIGHT} in flight, \
         in {:.1} s: {checked} checked (401), {refused} told to retry (503/429), {other} other",
        flood_took.as_secs_f64()
    );
    println!(
        "server RSS: {idle_rss:.1} MiB idle, peak {peak:.1} MiB (target <= 256), {after:.1} MiB \
         1 s after, {settled:.1} MiB 6 s after"
    );
    println!(
        "authenticated GET /api/workflows, quiet: p50 {:.2} ms, p99 {:.2} ms ({} requests)",
        ms(percentile(&quiet, 0.5)),
        ms(percentile(&quiet, 0.99)),
        quiet.len()
    );
    println!(
        "authenticated GET /api/workflows, during the flood: p50 {:.2} ms, p99 {:.2} ms (target \
         <= 100 ms; {} requests)",
        ms(percentile(&during, 0.5)),
        ms(percentile(&during, 0.99)),
        during.len()
    );
    drop(server);
}
