//! Faults of the database under the real binary: a full disk under SQLite, PostgreSQL stopped.
//! The process must say what is wrong (503 with the cause, `/health`), and recover by itself
//! once the cause is gone.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::Sandbox;
use serde_json::{Value, json};

const HELLO: &str = "\
id: hello
steps:
  - {id: greet, type: transform, with: {output: hi}}
";

/// A tmpfs of `size` mounted at `dir`, unmounted when dropped; `None` (the test says it is
/// skipped) where this process may not mount one.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output();
        match mounted {
            Ok(out) if out.status.success() => Some(Tmpfs(dir.to_owned())),
            Ok(out) => {
                switchyard_engine::testing::skipped(
                    "SWITCHYARD_REQUIRE_MOUNT",
                    &format!(
                        "a full disk needs a small file system, and mount failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                );
                None
            }
            Err(e) => {
                switchyard_engine::testing::skipped(
                    "SWITCHYARD_REQUIRE_MOUNT",
                    &format!("a full disk needs `mount`: {e}"),
                );
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn send(request: reqwest::RequestBuilder) -> (u16, Value) {
    let reply = request.send().await.unwrap();
    let status = reply.status().as_u16();
    (status, reply.json().await.unwrap_or(Value::Null))
}

/// GETs `url` until it answers `status` (within 10 s); returns that answer's body.
async fn poll(http: &reqwest::Client, url: &str, status: u16) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (got, body) = send(http.get(url)).await;
        if got == status {
            return body;
        }
        assert!(Instant::now() < deadline, "{url}: still {got} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fills the file system at `dir` to the last byte.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    let filler = dir.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .output();
    filler
}

#[tokio::test]
async fn sqlite_on_a_full_disk_answers_503_and_recovers_when_space_is_free() {
    let mut sandbox = Sandbox::new("disk-full", HELLO);
    let Some(fs) = Tmpfs::mount(&sandbox.dir.join("db"), "8m") else {
        return;
    };
    sandbox.database = format!("sqlite://{}/switchyard.db", fs.0.display());
    let token = common::last_line(&sandbox.cli(&["token", "create", "--role", "operator"]));
    let base = sandbox.serve_api(&[]);
    let http = reqwest::Client::new();
    let start = || {
        send(
            http.post(format!("{base}/api/workflows/hello/start"))
                .bearer_auth(&token)
                .json(&json!({"input": {}})),
        )
    };
    assert_eq!(start().await.0, 201);

    let filler = fill(&fs.0);
    // Every write now fails: each says so, and so does /health.
    for _ in 0..20 {
        let (status, body) = start().await;
        assert_eq!(status, 503, "{body}");
        assert!(body["message"].as_str().unwrap().contains("full"), "{body}");
    }
    // The probe behind /health runs every second.
    let health = poll(&http, &format!("{base}/health"), 503).await;
    assert!(
        health["database"].as_str().unwrap().contains("full"),
        "{health}"
    );

    std::fs::remove_file(filler).unwrap();
    // No restart: the next writes succeed, and /health says so.
    recovers(&sandbox, &http, &base, &token).await;
}

/// Starts runs until one is accepted (within 20 s), then waits for `/health` to say 200.
async fn recovers(sandbox: &Sandbox, http: &reqwest::Client, base: &str, token: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = send(
            http.post(format!("{base}/api/workflows/hello/start"))
                .bearer_auth(token)
                .json(&json!({"input": {}})),
        )
        .await;
        if status == 201 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {status} {body} after the fault ended\n{}",
            sandbox.server_logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    poll(http, &format!("{base}/health"), 200).await;
}

/// A TCP forwarder to PostgreSQL that can be cut: stopping it refuses new connections and
/// resets the open ones, as a stopped server does, without stopping the server other tests use.
struct Cuttable {
    port: u16,
    upstream: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Cuttable {
    fn new(upstream: &str) -> Cuttable {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut proxy = Cuttable {
            port,
            upstream: upstream.to_owned(),
            runtime: None,
        };
        proxy.resume();
        proxy
    }

    fn resume(&mut self) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", self.port)))
            .unwrap();
        let upstream = self.upstream.clone();
        runtime.spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        self.runtime = Some(runtime);
    }

    fn cut(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[tokio::test]
async fn with_postgres_stopped_health_and_the_api_answer_503_at_once_and_recover() {
    let Some(mut sandbox) = Sandbox::postgres("pg-down", HELLO) else {
        return;
    };
    let upstream = "127.0.0.1:5432";
    let mut proxy = tokio::task::spawn_blocking(move || Cuttable::new(upstream))
        .await
        .unwrap();
    sandbox.database = sandbox
        .database
        .replace(upstream, &format!("127.0.0.1:{}", proxy.port));
    let token = common::last_line(&sandbox.cli(&["token", "create", "--role", "operator"]));
    let base = sandbox.serve_api(&[]);
    let http = reqwest::Client::new();
    let start_url = format!("{base}/api/workflows/hello/start");
    let start = || {
        send(
            http.post(&start_url)
                .bearer_auth(&token)
                .json(&json!({"input": {}})),
        )
    };
    assert_eq!(start().await.0, 201);

    proxy = tokio::task::spawn_blocking(move || {
        proxy.cut();
        proxy
    })
    .await
    .unwrap();
    // Each answer comes within a second or so, never after the pool's 30 s timeout.
    let timed = |what: &'static str, reply: (u16, Value), took: Duration| {
        assert!(
            took < Duration::from_secs(3),
            "{what} took {took:?}: {reply:?}"
        );
        reply
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let asked = Instant::now();
        let (status, body) = timed(
            "/health",
            send(http.get(format!("{base}/health"))).await,
            asked.elapsed(),
        );
        if status == 503 {
            assert!(
                body["database"]
                    .as_str()
                    .unwrap()
                    .contains("does not answer"),
                "{body}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "/health still {status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let asked = Instant::now();
    let (status, body) = timed("a start", start().await, asked.elapsed());
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "unavailable", "{body}");

    proxy = tokio::task::spawn_blocking(move || {
        proxy.resume();
        proxy
    })
    .await
    .unwrap();
    recovers(&sandbox, &http, &base, &token).await;
    tokio::task::spawn_blocking(move || drop(proxy))
        .await
        .unwrap();
}
