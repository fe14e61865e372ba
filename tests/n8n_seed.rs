//! The seed's workflow file, unchanged, runs through a real n8n (2.8.4, from npm; `.ci/run`
//! installs it and names its binary in `SWITCHYARD_N8N`): Switchyard calls the n8n workflow of
//! `examples/n8n/` at `{--n8n-url}/webhook/amazon_influencer`, and n8n answers the waiting step
//! through `/api/webhooks/n8n` with a webhook key from its Header Auth credential.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Sandbox, last_line, step};

/// A running n8n, stopped when dropped.
struct N8n {
    child: Child,
    base: String,
    log: PathBuf,
}

impl Drop for N8n {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// n8n with its own home under `dir`: the credential holding `key`, then the example workflow
/// answering Switchyard at `switchyard`, imported and published; started on a free port.
fn start_n8n(binary: &Path, dir: &Path, key: &str, switchyard: &str) -> N8n {
    let home = dir.join("n8n");
    std::fs::create_dir_all(&home).unwrap();
    let port = free_port();
    let broker = free_port();
    let n8n = |args: &[&str]| {
        let mut command = Command::new(binary);
        command
            .args(args)
            .env("N8N_USER_FOLDER", &home)
            .env("N8N_PORT", port.to_string())
            .env("N8N_LISTEN_ADDRESS", "127.0.0.1")
            .env("N8N_RUNNERS_BROKER_PORT", broker.to_string())
            .env("N8N_DIAGNOSTICS_ENABLED", "false")
            .env("N8N_VERSION_NOTIFICATIONS_ENABLED", "false")
            .env("N8N_TEMPLATES_ENABLED", "false");
        command
    };
    let credentials = dir.join("n8n-credentials.json");
    std::fs::write(
        &credentials,
        serde_json::json!([{
            "id": "SwyWebhookKey001",
            "name": "Switchyard webhook key",
            "type": "httpHeaderAuth",
            "data": { "name": "Authorization", "value": format!("Bearer {key}") },
        }])
        .to_string(),
    )
    .unwrap();
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/n8n/amazon_influencer.json"),
    )
    .unwrap();
    // As README says: its answer goes to this Switchyard's address.
    assert!(shipped.contains("\"http://localhost:8080/api/webhooks/n8n\""));
    let example = dir.join("amazon_influencer.json");
    std::fs::write(
        &example,
        shipped.replace("http://localhost:8080", switchyard),
    )
    .unwrap();
    for args in [
        vec![
            "import:credentials".to_owned(),
            format!("--input={}", credentials.display()),
        ],
        vec![
            "import:workflow".to_owned(),
            format!("--input={}", example.display()),
        ],
        vec![
            "publish:workflow".to_owned(),
            "--id=SwyAmazonInflu01".to_owned(),
        ],
    ] {
        let out = n8n(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "n8n {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = dir.join("n8n.log");
    let child = n8n(&["start"])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let running = N8n {
        child,
        base: format!("http://127.0.0.1:{port}"),
        log,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = std::fs::read_to_string(&running.log).unwrap_or_default();
        if log.contains("Activated workflow") {
            return running;
        }
        assert!(Instant::now() < deadline, "n8n did not start:\n{log}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_seeds_workflow_runs_through_a_real_n8n_which_answers_with_a_webhook_key() {
    let Some(binary) = std::env::var_os("SWITCHYARD_N8N") else {
        switchyard_engine::testing::skipped(
            "SWITCHYARD_REQUIRE_N8N",
            "no n8n to run against: set SWITCHYARD_N8N to its binary (.ci/run installs n8n 2.8.4)",
        );
        return;
    };
    let mut sandbox = Sandbox::shipped("n8n-seed", "workflow-config.json");
    let key = last_line(&sandbox.cli(&[
        "token",
        "create",
        "--role",
        "webhook",
        "--ttl",
        "1d",
        "--subject",
        "n8n",
    ]));
    let listen = format!("127.0.0.1:{}", free_port());
    let public = format!("http://{listen}");
    let n8n = start_n8n(Path::new(&binary), &sandbox.dir, &key, &public);
    sandbox.spawn(&[
        "serve",
        "--listen",
        &listen,
        "--n8n-url",
        &n8n.base,
        "--public-url",
        &public,
    ]);
    sandbox.wait_for("serve to listen", || {
        std::net::TcpStream::connect(&listen).is_ok()
    });

    let out = sandbox.output_within(&["run", "amazon_influencer", "--wait"]);
    let run = last_line(&String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}\n{}\nn8n:\n{}",
        String::from_utf8_lossy(&out.stderr),
        sandbox.server_logs(),
        std::fs::read_to_string(&n8n.log).unwrap_or_default()
    );
    let shown = sandbox.show(&run);
    assert_eq!(shown["status"], "succeeded", "{shown}");
    // What n8n's workflow sent back, through the callback its HTTP Request node posted.
    let answered = &step(&shown, "n8n")["output"];
    assert_eq!(answered["posts"], 3, "{shown}");
    assert_eq!(answered["run_id"], run.as_str(), "{shown}");
}

#[test]
fn without_an_n8n_url_the_seeds_workflow_fails_with_an_error_that_names_the_flag() {
    let mut sandbox = Sandbox::shipped("n8n-seed-no-url", "workflow-config.json");
    sandbox.serve();
    let out = sandbox.output_within(&["run", "amazon_influencer", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "the run failed");
    let run = last_line(&String::from_utf8_lossy(&out.stdout));
    let shown = sandbox.show(&run);
    assert_eq!(shown["status"], "failed", "{shown}");
    let error = step(&shown, "n8n")["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(error.contains("--n8n-url"), "{shown}");
}
