//! A flood of wrong-password logins against the real `switchyard serve`: password hashes run on a
//! bounded set of threads, so the process's peak memory stays small, logins beyond the queue are
//! told to come back (503 with `Retry-After`), and authenticated requests are still answered.
//! Timings are measured in `benches/login_flood.rs`, not asserted here.

mod common;

use std::time::{Duration, Instant};

use common::Sandbox;
use serde_json::{Value, json};

pub const FLOOD_DEFINITION: &str = "\
id: hello
steps:
  - {id: greet, type: transform, with: {output: hi}}
";

/// A kernel figure of the process, in MiB: `VmHWM` (peak resident memory) or `VmRSS` (now).
fn memory_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kib / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_keeps_memory_bounded_and_authenticated_requests_answered() {
    let mut sandbox = Sandbox::new("login-flood", FLOOD_DEFINITION);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    // Rate limits far above the flood: the hashing threads and their queue are what is tested.
    let server = sandbox.spawn(&[
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--workers",
        "0",
        "--api-rate",
        "100000",
        "--api-burst",
        "100000",
        "--login-rate",
        "100000",
        "--login-address-rate",
        "100000",
    ]);
    let pid = sandbox.pid(server);
    let http = reqwest::Client::new();
    sandbox.wait_for("serve to answer", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let out = sandbox
        .command()
        .env("SWITCHYARD_PASSWORD", "correct horse battery")
        .args(["user", "add", "alice", "--role", "viewer"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = last_line(&sandbox.cli(&["token", "create", "--role", "viewer"]));

    // A small flood first: every hashing thread has its work area before memory is measured.
    let mut warm_up = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let login = http
            .post(format!("{base}/api/auth/login"))
            .json(&json!({"username": "alice", "password": "correct horse battery"}))
            .send();
        warm_up.spawn(login);
    }
    while let Some(reply) = warm_up.join_next().await {
        let status = reply.unwrap().unwrap().status();
        assert!(status == 200 || status == 503, "{status}");
    }
    let before = memory_mib(pid, "VmRSS:");

    // 300 at once, from four loopback addresses.
    let mut flood = Vec::new();
    for n in 0..300u32 {
        let http = reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([127, 0, 0, 1 + (n % 4) as u8]))
            .build()
            .unwrap();
        let url = format!("{base}/api/auth/login");
        flood.push(tokio::spawn(async move {
            let reply = http
                .post(url)
                .json(&json!({"username": "alice", "password": format!("wrong {n}")}))
                .send()
                .await
                .unwrap();
            let status = reply.status().as_u16();
            let retry_after = reply.headers().get("retry-after").is_some();
            let body: Value = reply.json().await.unwrap_or(Value::Null);
            (status, retry_after, body)
        }));
    }
    // While the flood is on: an authenticated request is answered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let during = Instant::now();
    let reply = http
        .get(format!("{base}/api/workflows"))
        .bearer_auth(&token)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200, "{}", sandbox.server_logs());
    let answered_in = during.elapsed();

    let mut refused = 0;
    let mut wrong = 0;
    for reply in flood {
        let (status, retry_after, body) = reply.await.unwrap();
        match status {
            401 => wrong += 1,
            503 | 429 => {
                assert!(retry_after, "{status} without Retry-After: {body}");
                assert!(body["code"].is_string(), "{body}");
                refused += 1;
            }
            other => panic!("a wrong password got {other}: {body}"),
        }
    }
    assert_eq!(wrong + refused, 300);
    assert!(wrong > 0, "no login was checked");
    assert!(refused > 0, "300 hashes at once were all queued");

    let peak = memory_mib(pid, "VmHWM:");
    // Memory returns to where it was: no hash allocates, and the hashing threads are the same.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = memory_mib(pid, "VmRSS:");
    eprintln!(
        "login flood: {wrong} checked, {refused} refused; RSS {before:.1} MiB before, peak \
         {peak:.1} MiB, {after:.1} MiB after; an authenticated request answered in {answered_in:?}"
    );
    assert!(peak <= 256.0, "peak RSS {peak:.1} MiB");
    assert!(
        after <= before + 16.0,
        "RSS {after:.1} MiB after the flood, {before:.1} MiB before"
    );
}

fn last_line(out: &str) -> String {
    out.lines().last().unwrap().trim().to_owned()
}
