//! The real binary under `kill -9`: a run survives the death of its server, finished steps are not
//! executed again, and a durable sleep keeps its wake-up time across the restart. Steps call a real
//! HTTP server on 127.0.0.1 started by the test, which counts the requests.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::routing::get;
use serde_json::Value;

type Hits = Arc<Mutex<HashMap<String, u32>>>;

/// A counting HTTP server: `/slow/<name>` answers after 3 s, `/<name>` at once.
fn start_counter() -> (String, Hits) {
    let hits: Hits = Arc::default();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let state = hits.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            async fn fast(State(h): State<Hits>, UrlPath(name): UrlPath<String>) -> &'static str {
                *h.lock().unwrap().entry(name).or_default() += 1;
                "{\"ok\": true}"
            }
            async fn slow(State(h): State<Hits>, UrlPath(name): UrlPath<String>) -> &'static str {
                *h.lock().unwrap().entry(format!("slow/{name}")).or_default() += 1;
                tokio::time::sleep(Duration::from_secs(3)).await;
                "{\"ok\": true}"
            }
            let app = Router::new()
                .route("/slow/{name}", get(slow))
                .route("/{name}", get(fast))
                .with_state(state);
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (format!("http://{addr}"), hits)
}

fn count(hits: &Hits, name: &str) -> u32 {
    hits.lock().unwrap().get(name).copied().unwrap_or(0)
}

struct Sandbox {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Sandbox {
    fn new(name: &str, definition: &str) -> Sandbox {
        let dir =
            std::env::temp_dir().join(format!("switchyard-e2e-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("definitions")).unwrap();
        std::fs::write(dir.join("definitions/test.yaml"), definition).unwrap();
        Sandbox {
            dir,
            children: Vec::new(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.current_dir(&self.dir)
            .env("SWITCHYARD_DATABASE_URL", db_url(&self.dir))
            .env("RUST_LOG", "warn");
        cmd
    }

    fn serve(&mut self) {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = self
            .command()
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--workers", "8", "--lease", "2s", "--grace", "1s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    /// `kill -9` every server this sandbox started.
    fn kill_all(&mut self) {
        for mut child in self.children.drain(..) {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn show(&self, run: &str) -> Value {
        serde_json::from_str(&self.cli(&["show", run, "--json"])).unwrap()
    }

    fn wait_for(&self, what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn db_url(dir: &Path) -> String {
    format!("sqlite://{}/switchyard.db", dir.display())
}

fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step_id"] == id)
        .unwrap()
}

#[test]
fn killed_server_resumes_run_without_repeating_finished_steps() {
    let (base, hits) = start_counter();
    let definition = format!(
        "id: chain\nretry: {{max_retries: 3, initial: 100ms}}\nsteps:\n\
         \x20 - {{id: a, type: http, with: {{url: \"{base}/a\"}}}}\n\
         \x20 - {{id: b, type: http, needs: [a], with: {{url: \"{base}/slow/b\"}}}}\n\
         \x20 - {{id: c, type: http, needs: [b], with: {{url: \"{base}/c\"}}}}\n"
    );
    let mut sandbox = Sandbox::new("kill", &definition);
    sandbox.serve();
    let run = sandbox.cli(&["run", "chain"]).trim().to_owned();
    sandbox.wait_for("step b in flight", || count(&hits, "slow/b") == 1);
    sandbox.kill_all();

    sandbox.serve();
    sandbox.wait_for("the run to finish", || {
        sandbox.show(&run)["status"] != "running"
    });
    let detail = sandbox.show(&run);
    assert_eq!(detail["status"], "succeeded", "{detail:#}");
    assert_eq!(count(&hits, "a"), 1, "finished step a ran again");
    assert_eq!(count(&hits, "c"), 1);
    assert_eq!(step(&detail, "a")["attempt"], 1);
    // b was cut off mid-request: at least once, and its lost attempt is on record.
    assert_eq!(count(&hits, "slow/b"), 2);
    assert_eq!(step(&detail, "b")["attempt"], 2);
}

#[test]
fn durable_sleep_survives_a_restart() {
    let mut sandbox = Sandbox::new(
        "sleep",
        "id: nap\nsteps:\n  - {id: rest, type: sleep, with: {duration: 4s}}\n  - {id: after, type: transform, needs: [rest], with: {output: done}}\n",
    );
    sandbox.serve();
    let run = sandbox.cli(&["run", "nap"]).trim().to_owned();
    sandbox.wait_for("the sleep to park", || {
        step(&sandbox.show(&run), "rest")["state"] == "parked"
    });
    let wake_at = step(&sandbox.show(&run), "rest")["run_after"]
        .as_i64()
        .unwrap();
    sandbox.kill_all();
    sandbox.serve();
    sandbox.wait_for("the run to finish", || {
        sandbox.show(&run)["status"] != "running"
    });
    let detail = sandbox.show(&run);
    assert_eq!(detail["status"], "succeeded", "{detail:#}");
    let rest = step(&detail, "rest");
    assert_eq!(
        rest["output"]["slept_until"], wake_at,
        "the sleep started over"
    );
    assert_eq!(rest["attempt"], 1);
}
