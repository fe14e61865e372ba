//! Shared by the end-to-end tests: a sandbox that runs the real binary against its own database,
//! and a counting HTTP server on 127.0.0.1 for steps to call.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::routing::get;
use serde_json::Value;

pub type Hits = Arc<Mutex<HashMap<String, u32>>>;

/// A counting HTTP server: `/slow/<name>` answers after 3 s, `/hang/<name>` after 2 min,
/// `/status/<code>` with that status, `/<name>` at once. `/flaky/<name>` counts each request as
/// `flaky/<name>/<Idempotency-Key header>` and answers 503 to the first request, 200 after.
/// `/brief/<name>` answers after 300 ms, counted as `<name>`, to keep work in flight.
/// `/expect/<header>/<sha256 hex>` answers 200 when the request has that header with a value of
/// that SHA-256 (a secret's value stays out of the URL), 403 otherwise.
pub fn start_counter() -> (String, Hits) {
    let hits: Hits = Arc::default();
    let state = hits.clone();
    async fn fast(State(h): State<Hits>, UrlPath(name): UrlPath<String>) -> &'static str {
        *h.lock().unwrap().entry(name).or_default() += 1;
        "{\"ok\": true}"
    }
    async fn slow(State(h): State<Hits>, UrlPath(name): UrlPath<String>) -> &'static str {
        *h.lock().unwrap().entry(format!("slow/{name}")).or_default() += 1;
        tokio::time::sleep(Duration::from_secs(3)).await;
        "{\"ok\": true}"
    }
    async fn brief(State(h): State<Hits>, UrlPath(name): UrlPath<String>) -> &'static str {
        *h.lock().unwrap().entry(name).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
        "{\"ok\": true}"
    }
    async fn status(UrlPath(code): UrlPath<u16>) -> axum::http::StatusCode {
        axum::http::StatusCode::from_u16(code).unwrap()
    }
    async fn flaky(
        State(h): State<Hits>,
        UrlPath(name): UrlPath<String>,
        headers: axum::http::HeaderMap,
    ) -> axum::http::StatusCode {
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("<none>");
        let mut h = h.lock().unwrap();
        let prefix = format!("flaky/{name}/");
        let before: u32 = h
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, n)| n)
            .sum();
        *h.entry(format!("{prefix}{key}")).or_default() += 1;
        if before == 0 {
            axum::http::StatusCode::SERVICE_UNAVAILABLE
        } else {
            axum::http::StatusCode::OK
        }
    }
    async fn expect(
        UrlPath((header, digest)): UrlPath<(String, String)>,
        headers: axum::http::HeaderMap,
    ) -> axum::http::StatusCode {
        use sha2::Digest;
        let seen = headers
            .get(&header)
            .map(|v| hex::encode(sha2::Sha256::digest(v.as_bytes())));
        if seen.as_deref() == Some(digest.as_str()) {
            axum::http::StatusCode::OK
        } else {
            axum::http::StatusCode::FORBIDDEN
        }
    }
    async fn hang() -> &'static str {
        tokio::time::sleep(Duration::from_secs(120)).await;
        "late"
    }
    let app = Router::new()
        .route("/status/{code}", get(status))
        .route("/hang/{name}", get(hang))
        .route("/expect/{header}/{value}", get(expect))
        .route("/flaky/{name}", get(flaky))
        .route("/slow/{name}", get(slow))
        .route("/brief/{name}", get(brief))
        .route("/{name}", get(fast))
        .with_state(state);
    (serve_in_thread(app), hits)
}

/// Serves `app` on a free port of 127.0.0.1 from a thread of its own (tests that block on the
/// real binary keep it answering); returns its base URL.
pub fn serve_in_thread(app: Router) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    format!("http://{addr}")
}

pub fn count(hits: &Hits, name: &str) -> u32 {
    hits.lock().unwrap().get(name).copied().unwrap_or(0)
}

pub struct Sandbox {
    pub dir: PathBuf,
    /// What `SWITCHYARD_DATABASE_URL` is for every process of this sandbox.
    pub database: String,
    /// The PostgreSQL schema this sandbox owns, dropped with it.
    schema: Option<String>,
    children: Vec<Child>,
    /// Processes started so far: names each one's log file.
    started: usize,
    /// More environment for every process of this sandbox.
    pub env: Vec<(String, String)>,
}

impl Sandbox {
    pub fn new(name: &str, definition: &str) -> Sandbox {
        let dir =
            std::env::temp_dir().join(format!("switchyard-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("definitions")).unwrap();
        std::fs::write(dir.join("definitions/test.yaml"), definition).unwrap();
        Sandbox {
            database: format!("sqlite://{}/switchyard.db", dir.display()),
            dir,
            schema: None,
            children: Vec::new(),
            started: 0,
            env: Vec::new(),
        }
    }

    /// A sandbox whose only definition is `file` of the repository's `definitions/`.
    pub fn shipped(name: &str, file: &str) -> Sandbox {
        let sandbox = Sandbox::new(name, "");
        std::fs::remove_file(sandbox.dir.join("definitions/test.yaml")).unwrap();
        let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("definitions");
        std::fs::copy(
            shipped.join(file),
            sandbox.dir.join("definitions").join(file),
        )
        .unwrap();
        sandbox
    }

    /// A sandbox on PostgreSQL, in a schema of its own. `None` (the test says it is skipped)
    /// when no server answers, unless `SWITCHYARD_REQUIRE_POSTGRES` is set, as in CI.
    pub fn postgres(name: &str, definition: &str) -> Option<Sandbox> {
        let mut sandbox = Sandbox::new(name, definition);
        let schema = format!("e2e_{}_{}", name.replace('-', "_"), std::process::id());
        let base = switchyard_engine::testing::postgres_url();
        let sep = if base.contains('?') { '&' } else { '?' };
        sandbox.database = format!("{base}{sep}options[search_path]={schema}");
        drop_schema(&schema);
        let out = sandbox.command().arg("migrate").output().unwrap();
        if !out.status.success() {
            switchyard_engine::testing::postgres_unreachable(String::from_utf8_lossy(&out.stderr));
            return None;
        }
        sandbox.schema = Some(schema);
        Some(sandbox)
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.current_dir(&self.dir)
            .env("SWITCHYARD_DATABASE_URL", &self.database)
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Starts a long-running process (`serve`, `worker`) with its stderr in `proc-<n>.log`;
    /// returns its number for [`Sandbox::kill`].
    pub fn spawn(&mut self, args: &[&str]) -> usize {
        self.spawn_env(args, &[])
    }

    /// [`Sandbox::spawn`] with more environment variables (`RUST_LOG`, keys).
    pub fn spawn_env(&mut self, args: &[&str], env: &[(&str, &str)]) -> usize {
        let log = self.dir.join(format!("proc-{}.log", self.started));
        let child = self
            .command()
            .envs(env.iter().copied())
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        self.children.push(child);
        self.started += 1;
        self.children.len() - 1
    }

    pub fn serve(&mut self) {
        self.serve_with_grace("1s");
    }

    /// `serve` with its own `--grace`, for the shutdown tests.
    pub fn serve_with_grace(&mut self, grace: &str) {
        // Port 0: parallel tests never race for a port.
        self.spawn(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "8",
            "--lease",
            "2s",
            "--grace",
            grace,
        ]);
    }

    /// Starts `serve` with the API on a free port, plus `extra` arguments, and waits until it
    /// answers `/health`; returns its base URL.
    pub fn serve_api(&mut self, extra: &[&str]) -> String {
        // A port picked here may be taken before `serve` binds it: then try another.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let listen = format!("127.0.0.1:{port}");
            let mut args = vec![
                "serve",
                "--listen",
                &listen,
                "--workers",
                "4",
                "--lease",
                "2s",
            ];
            args.extend_from_slice(extra);
            self.spawn(&args);
            let base = format!("http://{listen}");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if std::net::TcpStream::connect(&listen).is_ok() {
                    return base;
                }
                if self
                    .server_logs()
                    .contains(&format!("listening on {listen}"))
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "serve did not answer on {listen}\n{}",
                    self.server_logs()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("no free port for serve\n{}", self.server_logs());
    }

    /// The process id of one process this sandbox started.
    pub fn pid(&self, process: usize) -> u32 {
        self.children[process].id()
    }

    /// `kill -9` one process this sandbox started.
    pub fn kill(&mut self, process: usize) {
        let child = &mut self.children[process];
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// `kill -9` every process this sandbox started.
    pub fn kill_all(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            child.wait().unwrap();
        }
    }

    /// Sends SIGTERM to the newest server and waits for it to exit, failing the test if it is
    /// still running after `within`. Returns its exit status and how long it took.
    pub fn terminate_newest(&mut self, within: Duration) -> (std::process::ExitStatus, Duration) {
        let child = self.children.last_mut().expect("a server is running");
        let sent = Instant::now();
        let kill = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success(), "kill -TERM failed");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let took = sent.elapsed();
                self.children.pop();
                return (status, took);
            }
            // The child stays in `children`, so the sandbox's drop kills it.
            assert!(
                sent.elapsed() < within,
                "serve still running {within:?} after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that waits (`run --wait`), killing it if it takes over 30 s.
    pub fn output_within(&self, args: &[&str]) -> std::process::Output {
        let mut child = self
            .command()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                child.kill().unwrap();
                let logs: Vec<String> = std::fs::read_dir(&self.dir)
                    .unwrap()
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .filter_map(|p| std::fs::read_to_string(p).ok())
                    .collect();
                panic!("{args:?} did not finish within 30 s; logs: {logs:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.wait_with_output().unwrap()
    }

    pub fn show(&self, run: &str) -> Value {
        serde_json::from_str(&self.cli(&["show", run, "--json"])).unwrap()
    }

    /// What the servers of this sandbox wrote on stderr, for failure messages.
    pub fn server_logs(&self) -> String {
        let mut logs = String::new();
        for n in 0..self.started {
            let text =
                std::fs::read_to_string(self.dir.join(format!("proc-{n}.log"))).unwrap_or_default();
            logs.push_str(&format!("--- proc-{n}.log\n{text}"));
        }
        logs
    }

    pub fn wait_for(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ok() {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}\n{}",
                self.server_logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill_all();
        if let Some(schema) = &self.schema {
            drop_schema(schema);
        }
        if std::env::var_os("SWITCHYARD_KEEP_SANDBOX").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn drop_schema(schema: &str) {
    let _ = Command::new("psql")
        .args([
            &switchyard_engine::testing::postgres_url(),
            "-qc",
            &format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
        ])
        .stderr(Stdio::null())
        .status();
}

pub fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step_id"] == id)
        .unwrap()
}

/// The last line of a command's output: where `token create` prints the token.
pub fn last_line(out: &str) -> String {
    out.lines().last().unwrap_or_default().trim().to_owned()
}
