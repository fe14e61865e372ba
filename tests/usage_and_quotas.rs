//! Usage and shared limits on the real binary: what steps spend is recorded per provider and
//! day and counted in the metrics; with `--redis`, two control planes behind one load balancer
//! enforce one API rate limit and one login limit.

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::post;
use common::{Sandbox, last_line, serve_in_thread};
use serde_json::{Value, json};

fn redis_url() -> String {
    std::env::var("SWITCHYARD_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// Whether the local Redis answers; the test says it is skipped when not.
fn redis_answers() -> bool {
    let up = std::net::TcpStream::connect("127.0.0.1:6379").is_ok();
    if !up {
        switchyard_engine::testing::skipped(
            "SWITCHYARD_REQUIRE_REDIS",
            "no Redis on 127.0.0.1:6379 (.ci/run starts one)",
        );
    }
    up
}

/// Answers `POST /v1/chat/completions` as OpenAI documents it, and `POST /pin` as Pinata.
fn services() -> (String, Arc<Mutex<u32>>) {
    let calls: Arc<Mutex<u32>> = Arc::default();
    let counted = calls.clone();
    let app = Router::new()
        .route(
            "/v1/chat/completions",
            post(move || {
                *counted.lock().unwrap() += 1;
                async {
                    axum::Json(json!({
                        "id": "chatcmpl-1", "object": "chat.completion", "created": 1_780_000_000u32,
                        "model": "gpt-4o-mini-2024-07-18",
                        "choices": [{ "index": 0, "finish_reason": "stop",
                            "message": { "role": "assistant", "content": "Ten microphones", "refusal": null } }],
                        "usage": { "prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20 }
                    }))
                }
            }),
        )
        .route(
            "/pin",
            post(|| async { axum::Json(json!({ "IpfsHash": "QmTest" })) }),
        );
    (serve_in_thread(app), calls)
}

fn get(url: &str, token: &str) -> reqwest::blocking::Response {
    reqwest::blocking::Client::new()
        .get(url)
        .bearer_auth(token)
        .send()
        .unwrap()
}

#[test]
fn what_steps_spend_is_recorded_per_provider_and_day_and_counted_in_the_metrics() {
    let (base, calls) = services();
    let mut sandbox = Sandbox::new(
        "usage",
        &format!(
            "id: listicle
steps:
  - id: write
    type: openai
    quota: {{ name: openai-usage-test, limit: 5, per: 1s }}
    with: {{ base_url: \"{base}/v1\", prompt: Rank microphones }}
  - id: pin
    type: http
    needs: [write]
    with: {{ method: POST, url: \"{base}/pin\", body: {{ text: \"{{{{ steps.write.output.text }}}}\" }}, provider: pinata }}
"
        ),
    );
    sandbox.env = vec![("SWITCHYARD_SECRET_OPENAI_API_KEY".into(), "sk-test".into())];
    let api = sandbox.serve_api(&[]);
    let admin = last_line(&sandbox.cli(&["token", "create", "--role", "admin", "--ttl", "1h"]));
    let prices = reqwest::blocking::Client::new()
        .put(format!("{api}/api/admin/variables/prices"))
        .bearer_auth(&admin)
        .json(&json!({ "gpt-4o-mini": { "input": 0.15, "output": 0.6 } }))
        .send()
        .unwrap();
    assert_eq!(prices.status(), 200);
    let out = sandbox.output_within(&["run", "listicle", "--wait"]);
    let run = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(out.status.success(), "{:#}", sandbox.show(&run));
    assert_eq!(*calls.lock().unwrap(), 1);

    let usage: Vec<Value> = get(&format!("{api}/api/usage"), &admin).json().unwrap();
    let row = |provider: &str| {
        usage
            .iter()
            .find(|r| r["provider"] == provider)
            .unwrap_or_else(|| panic!("no {provider} in {usage:#?}"))
            .clone()
    };
    let openai = row("openai");
    assert_eq!(openai["workflow_id"], "listicle");
    assert_eq!(
        (openai["requests"].as_u64(), openai["tokens"].as_u64()),
        (Some(1), Some(20))
    );
    let cost = openai["cost"].as_f64().unwrap();
    assert!(
        (cost - (12.0 * 0.15 + 8.0 * 0.6) / 1e6).abs() < 1e-12,
        "{cost}"
    );
    assert_eq!(row("pinata")["requests"], 1);
    let bad = get(&format!("{api}/api/usage?from=yesterday"), &admin);
    assert_eq!(bad.status(), 400);

    let metrics = get(&format!("{api}/metrics"), &admin).text().unwrap();
    assert!(
        metrics.contains("switchyard_provider_requests_total{provider=\"openai\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_provider_tokens_total{provider=\"openai\"} 20"),
        "{metrics}"
    );
}

#[test]
fn two_control_planes_with_one_redis_enforce_one_api_rate_limit() {
    if !redis_answers() {
        return;
    }
    let mut sandbox = Sandbox::new(
        "shared-limit",
        "id: idle\nsteps:\n  - {id: a, type: noop}\n",
    );
    let limits = [
        "--redis",
        &redis_url(),
        "--api-rate",
        "1",
        "--api-burst",
        "3",
    ];
    let first = sandbox.serve_api(&limits);
    let second = sandbox.serve_api(&limits);
    let token = last_line(&sandbox.cli(&["token", "create", "--role", "viewer", "--ttl", "1h"]));
    let status = |base: &str| {
        get(&format!("{base}/api/workflows"), &token)
            .status()
            .as_u16()
    };
    // A burst of three for the caller, wherever its requests land.
    assert_eq!(
        [status(&first), status(&second), status(&first)],
        [200, 200, 200]
    );
    let refused = get(&format!("{second}/api/workflows"), &token);
    assert_eq!(
        refused.status(),
        429,
        "the second process counts the first one's requests"
    );
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(status(&first), 429);
}

#[test]
fn two_control_planes_with_one_redis_count_one_users_logins_together() {
    if !redis_answers() {
        return;
    }
    let mut sandbox = Sandbox::new(
        "shared-logins",
        "id: idle\nsteps:\n  - {id: a, type: noop}\n",
    );
    let limits = [
        "--redis",
        &redis_url(),
        "--login-rate",
        "2",
        "--login-address-rate",
        "1000",
    ];
    let first = sandbox.serve_api(&limits);
    let second = sandbox.serve_api(&limits);
    // A name of this run's own: Redis keeps the buckets of earlier runs for a minute.
    let name = format!(
        "guess-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let login = |base: &str| {
        reqwest::blocking::Client::new()
            .post(format!("{base}/api/auth/login"))
            .json(&json!({ "username": name, "password": "a guess" }))
            .send()
            .unwrap()
    };
    assert_eq!(login(&first).status(), 401);
    assert_eq!(login(&second).status(), 401);
    // Each process alone would allow a third guess; together they have had two.
    let refused = login(&first);
    assert_eq!(
        refused.status(),
        429,
        "the guesses sent to the other process count"
    );
    let body: Value = refused.json().unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("this user"),
        "{body}"
    );
}
