//! The admin HTTP API on the real binary: who may do what, idempotent starts, logins, refused
//! requests that change nothing, variables and secrets reaching runs, cursor pagination, rate
//! limits, metrics, and the OpenAPI document (also fuzzed with schemathesis).

mod common;

use std::fmt;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::Sandbox;
use reqwest::header::{CONNECTION, CONTENT_TYPE, HeaderMap, WWW_AUTHENTICATE};
use reqwest::{Method, RequestBuilder};
use serde_json::{Value, json};

/// `hello`'s runs stay running (an hour's durable sleep) until cancelled; its schedule (once a
/// year, no catch-up) does not fire during a test.
const HELLO: &str = "\
id: hello
schedule: {cron: \"0 0 1 1 *\", timezone: UTC, catch_up: none}
steps:
  - {id: greet, type: transform, with: {output: hi}}
  - {id: nap, type: sleep, needs: [greet], with: {duration: 1h}}
";

/// `hello` with a description: a new version when installed.
const HELLO_V2: &str = "\
id: hello
description: the second version
schedule: {cron: \"0 0 1 1 *\", timezone: UTC, catch_up: none}
steps:
  - {id: greet, type: transform, with: {output: hi}}
  - {id: nap, type: sleep, needs: [greet], with: {duration: 1h}}
";

/// A `serve` of its own with the API on a free port, and a client for it.
struct Api {
    sandbox: Sandbox,
    base: String,
    http: reqwest::Client,
}

/// An answer: its status, headers, raw text, and that text as JSON (`Null` when it is not JSON).
struct Reply {
    status: u16,
    headers: HeaderMap,
    text: String,
    body: Value,
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.text)
    }
}

impl Reply {
    /// Asserts an error answer: this status, and the JSON `{code, message}` with this code.
    fn assert_error(&self, status: u16, code: &str) -> &str {
        assert_eq!(self.status, status, "{self}");
        assert_eq!(self.body["code"], code, "{self}");
        let message = self.body["message"].as_str();
        assert!(message.is_some_and(|m| !m.is_empty()), "{self}");
        message.unwrap()
    }
}

impl Api {
    async fn start(name: &str) -> Api {
        Api::with_definition(name, HELLO).await
    }

    async fn with_definition(name: &str, definition: &str) -> Api {
        // The tests measure roles, not rate limits.
        Api::with_rate_limit(name, definition, "10000", "10000").await
    }

    async fn with_rate_limit(name: &str, definition: &str, rate: &str, burst: &str) -> Api {
        Api::launch(
            name,
            definition,
            &["--api-rate", rate, "--api-burst", burst],
            &[],
        )
        .await
    }

    /// `serve` with more arguments and environment variables.
    async fn launch(name: &str, definition: &str, extra: &[&str], env: &[(&str, &str)]) -> Api {
        let mut sandbox = Sandbox::new(&format!("api-{name}"), definition);
        let http = reqwest::Client::new();
        // A port picked here may be taken before `serve` binds it: then try another.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let listen = format!("127.0.0.1:{port}");
            let public_url = format!("http://{listen}");
            let mut args = vec![
                "serve",
                "--listen",
                &listen,
                "--public-url",
                &public_url,
                "--workers",
                "4",
                "--lease",
                "2s",
                "--grace",
                "1s",
            ];
            args.extend_from_slice(extra);
            sandbox.spawn_env(&args, env);
            let base = format!("http://{listen}");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if http.get(format!("{base}/health")).send().await.is_ok() {
                    return Api {
                        sandbox,
                        base,
                        http,
                    };
                }
                if sandbox
                    .server_logs()
                    .contains(&format!("listening on {listen}"))
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "serve did not answer on {listen}\n{}",
                    sandbox.server_logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("no free port for serve\n{}", sandbox.server_logs());
    }

    /// A token from `switchyard token create --role ROLE EXTRA...`: its last line of stdout.
    fn token(&self, role: &str, extra: &[&str]) -> String {
        let mut args = vec!["token", "create", "--role", role];
        args.extend_from_slice(extra);
        last_line(&self.sandbox.cli(&args))
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    fn authed(&self, method: Method, path: &str, token: &str) -> RequestBuilder {
        self.request(method, path).bearer_auth(token)
    }

    async fn get(&self, path: &str, token: &str) -> Reply {
        send(self.authed(Method::GET, path, token)).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> Reply {
        send(self.authed(Method::POST, path, token).json(&body)).await
    }

    async fn put(&self, path: &str, token: &str, body: Value) -> Reply {
        send(self.authed(Method::PUT, path, token).json(&body)).await
    }

    /// `PUT` or `POST` of a definition in YAML.
    async fn send_yaml(&self, method: Method, path: &str, token: &str, yaml: &str) -> Reply {
        send(
            self.authed(method, path, token)
                .header(CONTENT_TYPE, "application/yaml")
                .body(yaml.to_owned()),
        )
        .await
    }

    /// Starts a run of `workflow` and returns its id.
    async fn start_run(&self, workflow: &str, token: &str) -> String {
        let reply = self
            .post(
                &format!("/api/workflows/{workflow}/start"),
                token,
                json!({"input": {}}),
            )
            .await;
        assert_eq!(reply.status, 201, "{reply}");
        assert_eq!(reply.body["created"], true, "{reply}");
        reply.body["run_id"].as_str().unwrap().to_owned()
    }

    async fn run(&self, id: &str, token: &str) -> Reply {
        let reply = self.get(&format!("/api/runs/{id}"), token).await;
        assert_eq!(reply.status, 200, "{reply}");
        reply
    }

    /// Polls the run until it has ended; returns the last answer.
    async fn finished_run(&self, id: &str, token: &str) -> Reply {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reply = self.run(id, token).await;
            if !matches!(reply.body["status"].as_str(), Some("pending" | "running")) {
                return reply;
            }
            assert!(
                Instant::now() < deadline,
                "run {id} did not finish: {reply}\n{}",
                self.sandbox.server_logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The ids of every run, newest first.
    async fn run_ids(&self, token: &str) -> Vec<String> {
        let reply = self.get("/api/runs", token).await;
        assert_eq!(reply.status, 200, "{reply}");
        reply.body["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_owned())
            .collect()
    }
}

async fn send(request: RequestBuilder) -> Reply {
    let response = request.send().await.expect("the API answers");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        text,
        body,
    }
}

fn last_line(out: &str) -> String {
    out.lines()
        .last()
        .expect("a line of output")
        .trim()
        .to_owned()
}

/// The `(line, column)` after `request body:` in a definition error.
fn body_position(message: &str) -> Option<(u32, u32)> {
    let rest = &message[message.find("request body:")? + "request body:".len()..];
    let mut parts = rest.splitn(3, ':');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// What an operator may do, checked on `token`: start, cancel, retry, pause, resume.
async fn controls_runs_and_schedules(api: &Api, token: &str) {
    let run = api.start_run("hello", token).await;

    let reply = api
        .post(&format!("/api/runs/{run}/cancel"), token, json!({}))
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body["status"], "cancelled", "{reply}");
    assert_eq!(api.run(&run, token).await.body["status"], "cancelled");

    let reply = api
        .post(&format!("/api/runs/{run}/retry"), token, json!({}))
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body["status"], "running", "{reply}");
    assert_eq!(api.run(&run, token).await.body["status"], "running");

    for (action, paused) in [("pause", true), ("resume", false)] {
        let reply = api
            .post(&format!("/api/workflows/hello/{action}"), token, json!({}))
            .await;
        assert_eq!(reply.status, 200, "{action}: {reply}");
        assert_eq!(reply.body["paused"], paused, "{reply}");
        let shown = api.get("/api/workflows/hello", token).await;
        assert_eq!(shown.body["paused"], paused, "after {action}: {shown}");
    }
}

#[tokio::test]
async fn requests_without_a_valid_token_get_401_json_with_a_bearer_challenge() {
    let api = Api::start("unauthorized").await;
    let expiring = api.token("admin", &["--ttl", "1s"]);
    let made = Instant::now();
    let admin = api.token("admin", &[]);
    let viewer = api.token("viewer", &[]);
    let other_key = last_line(
        &String::from_utf8(
            api.sandbox
                .command()
                .env(
                    "SWITCHYARD_JWT_SECRET",
                    "another deployment's 32-byte secret",
                )
                .args(["token", "create", "--role", "admin"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap(),
    );
    assert_eq!(api.get("/api/runs", &admin).await.status, 200);

    let reply = send(api.request(Method::GET, "/api/runs")).await;
    reply.assert_error(401, "unauthorized");
    assert_eq!(
        reply
            .headers
            .get(WWW_AUTHENTICATE)
            .map(|v| v.to_str().unwrap()),
        Some("Bearer"),
        "{reply}"
    );

    // The admin token with one signature character changed.
    let (signed, signature) = admin.rsplit_once('.').unwrap();
    let mut changed: Vec<char> = signature.chars().collect();
    changed[10] = if changed[10] == 'A' { 'B' } else { 'A' };
    let changed_signature = format!("{signed}.{}", changed.into_iter().collect::<String>());
    // The viewer's claims under the admin token's signature.
    let (viewer_signed, _) = viewer.rsplit_once('.').unwrap();
    let (_, admin_signature) = admin.rsplit_once('.').unwrap();
    let spliced = format!("{viewer_signed}.{admin_signature}");

    let mut messages = Vec::new();
    for (what, token) in [
        ("a changed signature", changed_signature.as_str()),
        ("a signature from another token", &spliced),
        ("another deployment's key", &other_key),
        ("not a token", "not-a-token"),
    ] {
        for (method, path) in [
            (Method::GET, "/api/runs"),
            (Method::POST, "/api/workflows/hello/start"),
            (Method::GET, "/api/admin/users"),
        ] {
            let reply = send(api.authed(method.clone(), path, token).json(&json!({}))).await;
            let message = reply.assert_error(401, "unauthorized").to_owned();
            assert!(
                reply.headers.contains_key(WWW_AUTHENTICATE),
                "{what}, {method} {path}: {reply}"
            );
            messages.push(message);
        }
    }
    let reply = send(
        api.request(Method::GET, "/api/runs")
            .header("authorization", format!("Basic {admin}")),
    )
    .await;
    reply.assert_error(401, "unauthorized");

    tokio::time::sleep(Duration::from_secs(2).saturating_sub(made.elapsed())).await;
    let reply = api.get("/api/runs", &expiring).await;
    messages.push(reply.assert_error(401, "unauthorized").to_owned());
    assert!(reply.headers.contains_key(WWW_AUTHENTICATE), "{reply}");

    messages.dedup();
    assert_eq!(
        messages.len(),
        1,
        "forged and expired tokens are refused alike: {messages:?}"
    );
    assert!(
        api.run_ids(&admin).await.is_empty(),
        "a refused start started a run"
    );
}

#[tokio::test]
async fn viewer_reads_but_may_not_start_cancel_or_set_variables() {
    let api = Api::start("viewer").await;
    let viewer = api.token("viewer", &[]);
    let admin = api.token("admin", &[]);
    let run = api.start_run("hello", &admin).await;

    let reply = api.get("/api/runs", &viewer).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body["runs"][0]["id"], run.as_str(), "{reply}");
    let reply = api.get("/api/workflows", &viewer).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body[0]["id"], "hello", "{reply}");
    let reply = api.get("/api/workflows/hello", &viewer).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body["definition"]["id"], "hello", "{reply}");
    let reply = api.get("/api/fires", &viewer).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert!(reply.body.is_array(), "{reply}");
    assert_eq!(api.run(&run, &viewer).await.body["id"], run.as_str());

    let refused = [
        api.post("/api/workflows/hello/start", &viewer, json!({"input": {}}))
            .await,
        api.post(&format!("/api/runs/{run}/cancel"), &viewer, json!({}))
            .await,
        api.put("/api/admin/variables/x", &viewer, json!("value"))
            .await,
    ];
    for reply in &refused {
        let message = reply.assert_error(403, "forbidden");
        assert!(message.contains("viewer"), "{reply}");
    }

    assert_eq!(
        api.run_ids(&admin).await,
        [run.as_str()],
        "a run was started"
    );
    assert_eq!(api.run(&run, &admin).await.body["status"], "running");
    let vars = api.get("/api/admin/variables", &admin).await;
    assert_eq!(vars.body, json!([]), "{vars}");
}

#[tokio::test]
async fn operator_controls_runs_and_schedules_but_not_definitions_users_or_tokens() {
    let api = Api::start("operator").await;
    let operator = api.token("operator", &[]);
    controls_runs_and_schedules(&api, &operator).await;

    let before = api.get("/api/workflows/hello", &operator).await;
    let reply = api
        .send_yaml(Method::PUT, "/api/workflows/hello", &operator, HELLO_V2)
        .await;
    let message = reply.assert_error(403, "forbidden");
    assert!(message.contains("admin"), "{reply}");
    let after = api.get("/api/workflows/hello", &operator).await;
    assert_eq!(after.body["version"], 1, "{after}");
    assert_eq!(after.body["definition"], before.body["definition"]);

    api.get("/api/admin/users", &operator)
        .await
        .assert_error(403, "forbidden");
    api.post(
        "/api/admin/tokens",
        &operator,
        json!({"subject": "escalate", "role": "admin"}),
    )
    .await
    .assert_error(403, "forbidden");
}

#[tokio::test]
async fn admin_may_do_everything() {
    let api = Api::start("admin").await;
    let admin = api.token("admin", &[]);
    controls_runs_and_schedules(&api, &admin).await;
    for path in [
        "/api/runs",
        "/api/workflows",
        "/api/workflows/hello",
        "/api/fires",
        "/api/admin/variables",
        "/api/admin/secrets",
        "/api/admin/metrics",
    ] {
        let reply = api.get(path, &admin).await;
        assert_eq!(reply.status, 200, "{path}: {reply}");
    }

    let reply = api
        .send_yaml(Method::PUT, "/api/workflows/hello", &admin, HELLO_V2)
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body, json!({"id": "hello", "version": 2}), "{reply}");
    let shown = api.get("/api/workflows/hello", &admin).await;
    assert_eq!(shown.body["version"], 2, "{shown}");
    assert_eq!(shown.body["description"], "the second version", "{shown}");

    let reply = api.put("/api/admin/variables/x", &admin, json!(1)).await;
    assert_eq!(reply.status, 200, "{reply}");

    let reply = api
        .post(
            "/api/admin/users",
            &admin,
            json!({"name": "bob", "password": "a long password", "role": "viewer"}),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply}");
    let users = api.get("/api/admin/users", &admin).await;
    assert_eq!(users.status, 200, "{users}");
    assert_eq!(users.body[0]["name"], "bob", "{users}");
    assert!(!users.text.contains("argon2"), "a hash was listed: {users}");

    let reply = api
        .post(
            "/api/admin/tokens",
            &admin,
            json!({"subject": "ci", "role": "viewer", "ttl_secs": 3600}),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply}");
    assert_eq!(reply.body["role"], "viewer", "{reply}");
    let issued = reply.body["token"].as_str().unwrap();
    assert_eq!(api.get("/api/runs", issued).await.status, 200);
    api.post("/api/workflows/hello/start", issued, json!({}))
        .await
        .assert_error(403, "forbidden");
}

#[tokio::test]
async fn the_same_idempotency_key_starts_one_run() {
    let api = Api::start("idempotency").await;
    let operator = api.token("operator", &[]);
    let start = |key: &'static str| {
        send(
            api.authed(Method::POST, "/api/workflows/hello/start", &operator)
                .header("Idempotency-Key", key)
                .json(&json!({"input": {}})),
        )
    };

    let first = start("order-7").await;
    assert_eq!(first.status, 201, "{first}");
    assert_eq!(first.body["created"], true, "{first}");
    let run = first.body["run_id"].as_str().unwrap();

    let again = start("order-7").await;
    assert_eq!(again.status, 200, "{again}");
    assert_eq!(again.body["run_id"], run, "{again}");
    assert_eq!(again.body["created"], false, "{again}");

    let other = start("order-8").await;
    assert_eq!(other.status, 201, "{other}");
    assert_eq!(other.body["created"], true, "{other}");
    let second = other.body["run_id"].as_str().unwrap();
    assert_ne!(second, run);

    assert_eq!(api.run_ids(&operator).await, [second, run]);

    let reused = send(
        api.authed(Method::POST, "/api/workflows/hello/start", &operator)
            .header("Idempotency-Key", "order-7")
            .json(&json!({"input": {"name": "someone else"}})),
    )
    .await;
    reused.assert_error(409, "conflict");
    assert!(
        reused.body["message"].as_str().unwrap().contains(run),
        "{reused}"
    );
    assert_eq!(api.run_ids(&operator).await.len(), 2);
}

#[tokio::test]
async fn a_user_logs_in_with_the_password_set_on_the_command_line() {
    let api = Api::start("login").await;
    let out = api
        .sandbox
        .command()
        .env("SWITCHYARD_PASSWORD", "correct horse battery")
        .args(["user", "add", "alice", "--role", "operator"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let login = |username: &str, password: &str| {
        send(
            api.request(Method::POST, "/api/auth/login")
                .json(&json!({"username": username, "password": password})),
        )
    };

    let reply = login("alice", "correct horse battery").await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body["role"], "operator", "{reply}");
    assert_eq!(reply.body["subject"], "alice", "{reply}");
    let token = reply.body["token"].as_str().unwrap();
    let run = api.start_run("hello", token).await;
    let reply = api
        .post(&format!("/api/runs/{run}/cancel"), token, json!({}))
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    api.get("/api/admin/users", token)
        .await
        .assert_error(403, "forbidden");

    let wrong = login("alice", "wrong horse battery").await;
    let unknown = login("mallory", "correct horse battery").await;
    let wrong_message = wrong.assert_error(401, "unauthorized");
    let unknown_message = unknown.assert_error(401, "unauthorized");
    assert_eq!(
        wrong_message, unknown_message,
        "the answer must not tell which user names exist"
    );
    assert!(!wrong.text.contains("token"), "{wrong}");
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`, as n8n's HTTP Request node sends it.
fn n8n_signature(secret: &str, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test]
async fn n8n_starts_one_run_per_signed_event_and_every_event_is_logged() {
    let api = Api::start("n8n-webhook").await;
    let admin = api.token("admin", &[]);
    let viewer = api.token("viewer", &[]);
    const SECRET: &str = "shared with n8n";
    let deliver = |body: Vec<u8>, signature: String| {
        send(
            api.request(Method::POST, "/api/webhooks/n8n")
                .header(CONTENT_TYPE, "application/json")
                .header("X-Switchyard-Signature", signature)
                .body(body),
        )
    };
    let body = serde_json::to_vec(
        &json!({"event_id": "exec-41", "workflow": "hello", "input": {"name": "n8n"}}),
    )
    .unwrap();

    // Before the secret is set no signature can match, and nothing is logged.
    let reply = deliver(body.clone(), n8n_signature(SECRET, &body)).await;
    let message = reply.assert_error(401, "unauthorized");
    assert!(message.contains("n8n_webhook_secret"), "{message}");
    let reply = api
        .put(
            "/api/admin/secrets/n8n_webhook_secret",
            &admin,
            json!({"value": SECRET}),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply}");

    let reply = deliver(body.clone(), n8n_signature("another secret", &body)).await;
    reply.assert_error(401, "unauthorized");
    let reply = deliver(body.clone(), n8n_signature(SECRET, &body)).await;
    assert_eq!(reply.status, 201, "{reply}");
    let run = reply.body["run_id"].as_str().unwrap().to_owned();
    assert_eq!(reply.body["duplicate"], false, "{reply}");
    let started = api.run(&run, &viewer).await;
    assert_eq!(started.body["workflow_id"], "hello", "{started}");
    assert_eq!(started.body["input"], json!({"name": "n8n"}), "{started}");

    // n8n retries a delivery it did not see answered: the same event starts nothing new.
    let reply = deliver(body.clone(), n8n_signature(SECRET, &body)).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body["run_id"], run.as_str(), "{reply}");
    assert_eq!(reply.body["duplicate"], true, "{reply}");
    // The same id with another body is not a repeat, and says so.
    let changed = serde_json::to_vec(
        &json!({"event_id": "exec-41", "workflow": "hello", "input": {"name": "other"}}),
    )
    .unwrap();
    let reply = deliver(changed.clone(), n8n_signature(SECRET, &changed)).await;
    let message = reply.assert_error(409, "conflict");
    assert!(message.contains("another body"), "{message}");

    // A delivery refused because its workflow is not deployed yet is accepted when n8n retries
    // it once the workflow is: only an accepted delivery is final. Fields n8n adds are kept.
    let unknown = serde_json::to_vec(
        &json!({"event_id": "exec-42", "workflow": "nope", "executionId": "981"}),
    )
    .unwrap();
    let reply = deliver(unknown.clone(), n8n_signature(SECRET, &unknown)).await;
    reply.assert_error(404, "not_found");
    let reply = api
        .send_yaml(
            Method::POST,
            "/api/admin/workflows",
            &admin,
            "id: nope\nsteps:\n  - {id: a, type: noop}\n",
        )
        .await;
    assert!((200..300).contains(&reply.status), "{reply}");
    let reply = deliver(unknown.clone(), n8n_signature(SECRET, &unknown)).await;
    assert_eq!(reply.status, 201, "{reply}");
    assert_eq!(reply.body["duplicate"], false, "{reply}");
    let nope_run = reply.body["run_id"].as_str().unwrap().to_owned();

    // Without a signature, a webhook key (n8n's Header Auth credential) or an operator's token
    // is the way in; a viewer's is not enough, and a webhook key opens nothing else.
    let by_token = json!({"event_id": "exec-43", "workflow": "hello"});
    api.post("/api/webhooks/n8n", &viewer, by_token.clone())
        .await
        .assert_error(403, "forbidden");
    let key = api.token("webhook", &[]);
    let reply = api.post("/api/webhooks/n8n", &key, by_token).await;
    assert_eq!(reply.status, 201, "{reply}");
    let second_run = reply.body["run_id"].as_str().unwrap().to_owned();
    api.get("/api/runs", &key)
        .await
        .assert_error(403, "forbidden");
    let operator = api.token("operator", &[]);
    let reply = api
        .post(
            "/api/webhooks/n8n",
            &operator,
            json!({"event_id": "exec-44", "workflow": "hello"}),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply}");
    let third_run = reply.body["run_id"].as_str().unwrap().to_owned();
    send(api.request(Method::GET, "/api/webhook-events"))
        .await
        .assert_error(401, "unauthorized");

    let reply = api.get("/api/webhook-events?source=n8n", &viewer).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body[0]["event_id"], "exec-44", "{reply}");
    assert_eq!(reply.body[1]["event_id"], "exec-43", "{reply}");
    let events = &reply.body.as_array().unwrap()[2..];
    assert_eq!(
        events.len(),
        2,
        "only authenticated deliveries, once each: {reply}"
    );
    assert_eq!(events[0]["event_id"], "exec-42", "{reply}");
    assert_eq!(events[0]["run_id"], nope_run.as_str(), "{reply}");
    assert_eq!(events[0]["error"], Value::Null, "{reply}");
    assert_eq!(events[0]["payload"]["executionId"], "981", "{reply}");
    assert_eq!(events[1]["event_id"], "exec-41", "{reply}");
    assert_eq!(events[1]["run_id"], run.as_str(), "{reply}");
    assert_eq!(
        events[1]["payload"]["input"],
        json!({"name": "n8n"}),
        "{reply}"
    );
    assert_eq!(
        api.run_ids(&viewer).await,
        vec![third_run, second_run, nope_run, run],
        "one run per event"
    );
}

/// Waits for a step to call n8n: answers every POST to `/webhook/enrich` with `{accepted: true}`
/// and passes its body on.
async fn start_fake_n8n() -> (String, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    use axum::routing::post;
    let (calls, received) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/webhook/enrich",
        post(move |axum::Json(body): axum::Json<Value>| {
            let calls = calls.clone();
            async move {
                calls.send(body).unwrap();
                axum::Json(json!({"accepted": true}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, received)
}

#[tokio::test]
async fn an_n8n_step_waits_for_n8n_to_call_back_with_its_result() {
    let (n8n, mut calls) = start_fake_n8n().await;
    let definition = format!(
        "id: enrich\n\
         steps:\n  \
           - {{id: ask, type: n8n, with: {{url: \"{n8n}/webhook/enrich\", input: {{rows: 3}}, wait: true, timeout: 1m}}}}\n  \
           - {{id: done, type: transform, needs: [ask], with: {{output: \"{{{{ steps.ask.output.total }}}}\"}}}}\n"
    );
    let api = Api::with_definition("n8n-callback", &definition).await;
    let operator = api.token("operator", &[]);
    // n8n starts the run, under its execution's id...
    let reply = api
        .post(
            "/api/webhooks/n8n",
            &operator,
            json!({"event_id": "exec-7", "workflow": "enrich"}),
        )
        .await;
    assert_eq!(reply.status, 201, "{reply}");
    let run = reply.body["run_id"].as_str().unwrap().to_owned();

    let call = tokio::time::timeout(Duration::from_secs(30), calls.recv())
        .await
        .expect("the step calls n8n")
        .unwrap();
    assert_eq!(call["run_id"], run.as_str(), "{call}");
    assert_eq!(call["input"], json!({"rows": 3}), "{call}");
    let url = call["callback"]["url"].as_str().unwrap();
    assert_eq!(url, format!("{}/api/webhooks/n8n", api.base));
    let token = call["callback"]["token"].as_str().unwrap();
    let reply = api.run(&run, &operator).await;
    assert_eq!(reply.body["status"], "running", "{reply}");

    let forged = format!("{run}.ask.0000");
    let reply = api
        .post(
            "/api/webhooks/n8n",
            &operator,
            json!({"event_id": "e-1", "callback": forged, "output": {}}),
        )
        .await;
    reply.assert_error(409, "not_waiting");
    // ...and answers the step under the same id: another event, for the step it names.
    let answer = json!({"event_id": "exec-7", "callback": token, "output": {"total": 42}});
    let reply = send(
        api.authed(Method::POST, "/api/webhooks/n8n", &operator)
            .json(&answer),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body["run_id"], run.as_str(), "{reply}");
    assert_eq!(reply.body["duplicate"], false, "{reply}");
    let reply = api.post("/api/webhooks/n8n", &operator, answer).await;
    assert_eq!(
        reply.body["duplicate"], true,
        "n8n retrying is answered, not applied: {reply}"
    );
    let again = json!({"event_id": "e-3", "callback": token, "output": {"total": 0}});
    api.post("/api/webhooks/n8n", &operator, again)
        .await
        .assert_error(409, "not_waiting");

    let finished = api.finished_run(&run, &operator).await;
    assert_eq!(finished.body["status"], "succeeded", "{finished}");
    let done = &finished.body["output"]["done"];
    assert!(*done == json!(42) || *done == json!("42"), "{finished}");
    assert!(calls.try_recv().is_err(), "n8n was called once");
}

#[tokio::test]
async fn changing_or_deleting_a_user_ends_its_sessions() {
    let api = Api::start("sessions").await;
    let admin = api.token("admin", &[]);
    let login = |password: &'static str| {
        send(
            api.request(Method::POST, "/api/auth/login")
                .json(&json!({"username": "bob", "password": password})),
        )
    };
    let add_bob = |password: &str, role: &str| {
        api.post(
            "/api/admin/users",
            &admin,
            json!({"name": "bob", "password": password, "role": role}),
        )
    };
    assert_eq!(add_bob("first password", "operator").await.status, 201);
    let reply = login("first password").await;
    assert_eq!(reply.status, 200, "{reply}");
    let first = reply.body["token"].as_str().unwrap().to_owned();
    assert_eq!(api.get("/api/workflows", &first).await.status, 200);

    // A new password (the same role) ends the session of the old one.
    assert_eq!(add_bob("second password", "operator").await.status, 201);
    let message = api
        .get("/api/workflows", &first)
        .await
        .assert_error(401, "unauthorized")
        .to_owned();
    assert!(message.contains("log in again"), "{message}");
    let reply = login("second password").await;
    assert_eq!(reply.status, 200, "{reply}");
    let second = reply.body["token"].as_str().unwrap().to_owned();
    assert_eq!(api.get("/api/workflows", &second).await.status, 200);

    let deleted = api
        .authed(Method::DELETE, "/api/admin/users/bob", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    api.get("/api/workflows", &second)
        .await
        .assert_error(401, "unauthorized");
    // Tokens made on the command line belong to no user and are not affected.
    assert_eq!(api.get("/api/workflows", &admin).await.status, 200);
}

#[tokio::test]
async fn an_operator_signal_completes_a_waiting_step_once() {
    let api = Api::start("signals").await;
    let admin = api.token("admin", &[]);
    let operator = api.token("operator", &[]);
    let viewer = api.token("viewer", &[]);
    let approval = "\
id: approval
steps:
  - {id: approve, type: wait, with: {signal: approve, timeout: 1h}}
  - {id: publish, type: transform, needs: [approve], with: {output: \"{{ steps.approve.output.by }}\"}}
";
    let reply = api
        .send_yaml(Method::POST, "/api/admin/workflows", &admin, approval)
        .await;
    assert_eq!(reply.status, 201, "{reply}");
    let run = api.start_run("approval", &operator).await;
    let signal = format!("/api/runs/{run}/signals/approve");
    api.post(&signal, &viewer, json!({"payload": {"by": "ana"}}))
        .await
        .assert_error(403, "forbidden");
    api.post(
        &format!("/api/runs/{run}/signals/reject"),
        &operator,
        json!({}),
    )
    .await
    .assert_error(404, "not_found");
    // Sent whenever: before the step parks or after, it is kept.
    let reply = api
        .post(&signal, &operator, json!({"payload": {"by": "ana"}}))
        .await;
    assert_eq!(reply.status, 204, "{reply}");
    // A second signal: `conflict` while the step holds the first, `not_waiting` once it has
    // finished with it.
    let second = api
        .post(&signal, &operator, json!({"payload": {"by": "bo"}}))
        .await;
    assert_eq!(second.status, 409, "{second}");
    let finished = api.finished_run(&run, &operator).await;
    assert_eq!(finished.body["status"], "succeeded", "{finished}");
    assert_eq!(
        finished.body["output"],
        json!({"publish": "ana"}),
        "{finished}"
    );
    api.post(&signal, &operator, json!({"payload": null}))
        .await
        .assert_error(409, "not_waiting");
}

#[tokio::test]
async fn a_start_whose_input_fails_the_input_schema_is_refused_with_each_violation() {
    let api = Api::start("input-schema").await;
    let admin = api.token("admin", &[]);
    let typed = "\
id: typed
inputs: {count: 1}
input_schema:
  type: object
  required: [topic]
  properties:
    topic: {type: string, minLength: 1}
    count: {type: integer, minimum: 1}
steps:
  - {id: a, type: transform, with: {output: \"{{ input.topic }}\"}}
";
    let reply = api
        .send_yaml(Method::POST, "/api/admin/workflows", &admin, typed)
        .await;
    assert!((200..300).contains(&reply.status), "{reply}");
    let start = "/api/workflows/typed/start";
    let reply = api
        .post(start, &admin, json!({"input": {"count": "many"}}))
        .await;
    reply.assert_error(422, "invalid_input");
    let violations = reply.body["violations"].as_array().unwrap();
    let paths: Vec<&str> = violations
        .iter()
        .map(|v| v["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&""), "the missing topic: {reply}");
    assert!(paths.contains(&"/count"), "{reply}");
    assert!(
        violations
            .iter()
            .all(|v| !v["message"].as_str().unwrap().is_empty()),
        "{reply}"
    );
    api.post(
        start,
        &admin,
        json!({"input": {"topic": "rust"}, "priority": 500}),
    )
    .await
    .assert_error(422, "invalid_input");
    // Nothing started.
    let runs = api.get("/api/runs?workflow=typed", &admin).await;
    assert_eq!(
        runs.body["runs"].as_array().map(Vec::len),
        Some(0),
        "{runs}"
    );
    // The defaults count: a topic is enough.
    let reply = api
        .post(start, &admin, json!({"input": {"topic": "rust"}}))
        .await;
    assert!((200..300).contains(&reply.status), "{reply}");

    // A schema that is not one is refused when the workflow is stored, at its line.
    let broken = "id: typed\ninput_schema: {type: integr}\nsteps:\n  - {id: a, type: noop}\n";
    let reply = api
        .send_yaml(Method::PUT, "/api/workflows/typed", &admin, broken)
        .await;
    let message = reply.assert_error(422, "invalid_definition");
    assert!(message.contains("input_schema"), "{reply}");
    assert_eq!(
        body_position(message).map(|(line, _)| line),
        Some(2),
        "{reply}"
    );
}

#[tokio::test]
async fn an_uploaded_definition_is_refused_with_each_key_its_step_kind_does_not_take() {
    let api = Api::start("typed-with").await;
    let admin = api.token("admin", &[]);
    let typo = "id: typed\nsteps:\n  - id: a\n    type: http\n    with: {url: \"https://example.com\", methd: GET, timeout: 5 parsecs}\n";
    let reply = api
        .send_yaml(Method::POST, "/api/admin/workflows", &admin, typo)
        .await;
    let message = reply.assert_error(422, "invalid_definition");
    assert!(
        message.contains("request body:5:40: http step: `with` takes no key `methd`")
            && message.contains("not a duration"),
        "{reply}"
    );
    let listed = api.get("/api/workflows", &admin).await;
    assert!(
        !listed.to_string().contains("typed"),
        "nothing was stored: {listed}"
    );
}

#[tokio::test]
async fn bad_requests_are_refused_with_json_errors_and_change_nothing() {
    let api = Api::start("bad-input").await;
    let admin = api.token("admin", &[]);
    let before = api.get("/api/workflows/hello", &admin).await;
    assert_eq!(before.status, 200, "{before}");
    let start = "/api/workflows/hello/start";

    let reply = send(
        api.authed(Method::POST, start, &admin)
            .header(CONTENT_TYPE, "application/json")
            .body("{\"input\": {"),
    )
    .await;
    reply.assert_error(400, "invalid_json");

    // Wrong types: the input must be an object, a secret's value a string, a lifetime a number.
    api.post(start, &admin, json!({"input": "text"}))
        .await
        .assert_error(422, "invalid_input");
    api.post(start, &admin, json!({"input": {}, "inptu": {}}))
        .await
        .assert_error(422, "invalid_body");
    api.put("/api/admin/secrets/token", &admin, json!({"value": 5}))
        .await
        .assert_error(422, "invalid_body");
    api.post(
        "/api/admin/tokens",
        &admin,
        json!({"subject": "ci", "role": "viewer", "ttl_secs": "a day"}),
    )
    .await
    .assert_error(422, "invalid_body");

    api.get("/api/runs/no-such-run", &admin)
        .await
        .assert_error(404, "not_found");
    api.post(
        "/api/runs/01890000-0000-7000-8000-000000000000/cancel",
        &admin,
        json!({}),
    )
    .await
    .assert_error(404, "not_found");
    api.get("/api/workflows/nope", &admin)
        .await
        .assert_error(404, "not_found");
    api.post("/api/workflows/nope/start", &admin, json!({}))
        .await
        .assert_error(404, "not_found");

    let invalid = "\
id: hello
steps:
  - {id: greet, type: transform, with: {output: hi}}
  - {id: nap, type: sleep, needs: [nowhere], with: {duration: 1s}}
";
    let reply = api
        .send_yaml(Method::PUT, "/api/workflows/hello", &admin, invalid)
        .await;
    let message = reply.assert_error(422, "invalid_definition");
    assert!(message.contains("nowhere"), "{reply}");
    let (line, column) = body_position(message)
        .unwrap_or_else(|| panic!("no `request body:LINE:COLUMN:` in {reply}"));
    assert_eq!(line, 4, "{reply}");
    assert!(column > 0, "{reply}");

    let big = "x".repeat(3 * 1024 * 1024);
    let reply = send(
        api.authed(Method::POST, start, &admin)
            .json(&json!({"input": {"blob": big}}))
            .header(CONNECTION, "close"),
    )
    .await;
    reply.assert_error(413, "body_too_large");
    let reply = oversize_definition(&api, &admin).await;
    // Only the status here: its body is checked in `an_oversize_definition_body_gets_a_json_413`.
    assert_eq!(reply.status, 413, "{reply}");

    let reply = api.get("/api/no-such-endpoint", &admin).await;
    reply.assert_error(404, "not_found");
    let reply = send(api.authed(Method::DELETE, "/api/runs", &admin)).await;
    reply.assert_error(405, "method_not_allowed");

    let after = api.get("/api/workflows/hello", &admin).await;
    assert_eq!(after.body["version"], 1, "{after}");
    assert_eq!(after.body["definition"], before.body["definition"]);
    assert!(api.run_ids(&admin).await.is_empty(), "a run was started");
    let secrets = api.get("/api/admin/secrets", &admin).await;
    assert_eq!(secrets.body, json!([]), "{secrets}");
}

/// `PUT /api/workflows/hello` with a 3 MiB YAML body (a valid definition and a long comment).
async fn oversize_definition(api: &Api, token: &str) -> Reply {
    let yaml = format!("{HELLO_V2}# {}\n", "x".repeat(3 * 1024 * 1024));
    send(
        api.authed(Method::PUT, "/api/workflows/hello", token)
            .header(CONTENT_TYPE, "application/yaml")
            // The server closes the connection after a 413 without saying so; a pooled
            // connection reused after it fails with `IncompleteMessage`.
            .header(CONNECTION, "close")
            .body(yaml),
    )
    .await
}

#[tokio::test]
async fn an_oversize_definition_body_gets_a_json_413() {
    let api = Api::start("oversize-definition").await;
    let admin = api.token("admin", &[]);
    let reply = oversize_definition(&api, &admin).await;
    reply.assert_error(413, "body_too_large");
    let shown = api.get("/api/workflows/hello", &admin).await;
    assert_eq!(shown.body["version"], 1, "{shown}");
}

#[tokio::test]
async fn a_variable_set_over_the_api_reaches_the_next_run() {
    let api = Api::start("variables").await;
    let admin = api.token("admin", &[]);
    let reply = api
        .put(
            "/api/admin/variables/greeting",
            &admin,
            json!("hello from the API"),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body["value"], "hello from the API", "{reply}");

    let greeter = "\
id: greeter
steps:
  - {id: say, type: transform, with: {output: \"{{ vars.greeting }}\"}}
";
    let reply = api
        .send_yaml(Method::POST, "/api/admin/workflows", &admin, greeter)
        .await;
    assert_eq!(reply.status, 201, "{reply}");
    assert_eq!(
        reply.body,
        json!([{"id": "greeter", "version": 1}]),
        "{reply}"
    );

    let run = api.start_run("greeter", &admin).await;
    let done = api.finished_run(&run, &admin).await;
    assert_eq!(done.body["status"], "succeeded", "{done}");
    assert_eq!(
        done.body["output"],
        json!({"say": "hello from the API"}),
        "{done}"
    );

    let reply = api
        .put("/api/admin/variables/greeting", &admin, json!("changed"))
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    let run = api.start_run("greeter", &admin).await;
    let done = api.finished_run(&run, &admin).await;
    assert_eq!(done.body["output"], json!({"say": "changed"}), "{done}");
}

#[tokio::test]
async fn a_secret_set_over_the_api_is_never_returned() {
    const VALUE: &str = "sk-very-secret-4711";
    let api = Api::start("secrets").await;
    let admin = api.token("admin", &[]);
    let reply = api
        .put("/api/admin/secrets/token", &admin, json!({"value": VALUE}))
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body["name"], "token", "{reply}");
    assert!(!reply.text.contains(VALUE), "{reply}");

    let listed = api.get("/api/admin/secrets", &admin).await;
    assert_eq!(listed.status, 200, "{listed}");
    let names: Vec<&str> = listed
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["token"], "{listed}");
    assert!(listed.body[0].get("value").is_none(), "{listed}");
    assert!(!listed.text.contains(VALUE), "{listed}");
    let vars = api.get("/api/admin/variables", &admin).await;
    assert!(!vars.text.contains(VALUE), "{vars}");

    let leaker = "\
id: leaker
steps:
  - id: leak
    type: transform
    with:
      output: {raw: \"{{ secrets.token }}\", header: \"Bearer {{ secrets.token }}\"}
";
    let reply = api
        .send_yaml(Method::POST, "/api/admin/workflows", &admin, leaker)
        .await;
    assert_eq!(reply.status, 201, "{reply}");
    let run = api.start_run("leaker", &admin).await;
    let done = api.finished_run(&run, &admin).await;
    // A transform stores what it renders: a secret there fails the step instead.
    assert_eq!(done.body["status"], "failed", "{done}");
    assert!(
        done.body["error"]
            .as_str()
            .unwrap()
            .contains("uses a secret"),
        "{done}"
    );
    assert!(!done.text.contains(VALUE), "{done}");
    let listing = api.get("/api/runs", &admin).await;
    assert!(!listing.text.contains(VALUE), "{listing}");
}

#[tokio::test]
async fn runs_are_listed_newest_first_in_pages_that_follow_the_cursor() {
    let api = Api::start("pagination").await;
    let operator = api.token("operator", &[]);
    let mut started = Vec::new();
    for _ in 0..5 {
        started.push(api.start_run("hello", &operator).await);
    }

    let mut listed = Vec::new();
    let mut created = Vec::new();
    let mut path = "/api/runs?limit=2".to_owned();
    let mut sizes = Vec::new();
    for page in 1..=3 {
        let reply = api.get(&path, &operator).await;
        assert_eq!(reply.status, 200, "page {page}: {reply}");
        let runs = reply.body["runs"].as_array().unwrap();
        sizes.push(runs.len());
        for run in runs {
            listed.push(run["id"].as_str().unwrap().to_owned());
            created.push(run["created_at"].as_i64().unwrap());
        }
        match reply.body["next_cursor"].as_str() {
            Some(cursor) => {
                assert!(page < 3, "the last page has a cursor: {reply}");
                path = format!("/api/runs?limit=2&cursor={cursor}");
            }
            None => {
                assert_eq!(page, 3, "page {page} has no cursor: {reply}");
                assert_eq!(reply.body["next_cursor"], Value::Null, "{reply}");
            }
        }
    }
    assert_eq!(sizes, [2, 2, 1]);
    started.reverse();
    assert_eq!(listed, started, "every run once, newest first");
    assert!(created.windows(2).all(|w| w[0] >= w[1]), "{created:?}");
}

#[tokio::test]
async fn the_openapi_document_describes_the_api() {
    let api = Api::start("openapi").await;
    let reply = send(api.request(Method::GET, "/api/openapi.json")).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert!(reply.body.is_object(), "not JSON: {reply}");
    let version = reply.body["openapi"].as_str().unwrap_or_default();
    assert!(version.starts_with("3.1"), "openapi {version:?}");
    let paths = &reply.body["paths"];
    assert!(paths["/api/runs"]["get"].is_object(), "{paths:#}");
    assert!(
        paths["/api/workflows/{id}/start"]["post"].is_object(),
        "{paths:#}"
    );
    assert!(
        reply.body["components"]["securitySchemes"]["bearer"].is_object(),
        "{reply}"
    );
}

#[tokio::test]
async fn each_token_and_each_address_gets_its_own_rate_limit() {
    let api = Api::with_rate_limit("rate-limit", HELLO, "1", "3").await;
    let (first, second) = (api.token("viewer", &[]), api.token("viewer", &[]));
    for _ in 0..3 {
        let reply = api.get("/api/runs", &first).await;
        assert_eq!(reply.status, 200, "{reply}");
    }
    let limited = api.get("/api/runs", &first).await;
    limited.assert_error(429, "rate_limited");
    let wait: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&wait), "Retry-After: {wait}");
    // Another token, and callers without one, have buckets of their own.
    let reply = api.get("/api/runs", &second).await;
    assert_eq!(reply.status, 200, "{reply}");
    let public = send(api.request(Method::GET, "/api/stats")).await;
    assert_eq!(public.status, 200, "{public}");
}

#[tokio::test]
async fn the_scheme_of_the_authorization_header_is_case_insensitive() {
    let api = Api::start("bearer-case").await;
    let token = api.token("viewer", &[]);
    let reply = send(
        api.request(Method::GET, "/api/runs")
            .header("authorization", format!("bearer {token}")),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply}");
}

#[tokio::test]
async fn a_full_last_page_has_no_cursor() {
    let api = Api::start("last-page").await;
    let operator = api.token("operator", &[]);
    for _ in 0..4 {
        api.start_run("hello", &operator).await;
    }
    let first = api.get("/api/runs?limit=2", &operator).await;
    let cursor = first.body["next_cursor"].as_str().expect("a second page");
    let second = api
        .get(&format!("/api/runs?limit=2&cursor={cursor}"), &operator)
        .await;
    assert_eq!(second.body["runs"].as_array().unwrap().len(), 2, "{second}");
    assert_eq!(second.body["next_cursor"], Value::Null, "{second}");
}

/// `greet` succeeds, `boom` fails at once: one run of each.
const OUTCOMES: &str = "\
workflows:
  greet:
    steps: [{id: hi, type: transform, with: {output: hi}}]
  boom:
    steps: [{id: bad, type: http, with: {url: \"http://127.0.0.1:9/unreachable\"}}]
";

#[tokio::test]
async fn a_failed_run_is_listed_as_an_alert() {
    let api = Api::with_definition("alerts", OUTCOMES).await;
    let viewer = api.token("viewer", &[]);
    let operator = api.token("operator", &[]);
    let mut runs = Vec::new();
    for workflow in ["greet", "boom"] {
        let run = api.start_run(workflow, &operator).await;
        api.finished_run(&run, &operator).await;
        runs.push(run);
    }
    let alerts = api.get("/api/alerts", &viewer).await;
    assert_eq!(alerts.status, 200, "{alerts}");
    let listed = alerts.body.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{alerts}");
    assert_eq!(listed[0]["run_id"], runs[1].as_str(), "{alerts}");
    assert_eq!(listed[0]["workflow_id"], "boom");
    assert_eq!(listed[0]["kind"], "failed");
    let none = api.get("/api/alerts?workflow=greet", &viewer).await;
    assert_eq!(none.body, json!([]), "{none}");
}

#[tokio::test]
async fn metrics_count_runs_started_finished_and_failed() {
    let api = Api::with_definition("metrics", OUTCOMES).await;
    let operator = api.token("operator", &[]);
    for workflow in ["greet", "boom"] {
        let run = api.start_run(workflow, &operator).await;
        api.finished_run(&run, &operator).await;
    }
    let metrics = send(api.request(Method::GET, "/metrics")).await;
    assert_eq!(metrics.status, 200, "{metrics}");
    assert!(
        metrics.headers[CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let value = |series: &str| -> Option<f64> {
        metrics
            .text
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    };
    assert_eq!(
        value("workflow_runs_started_total{workflow=\"greet\"}"),
        Some(1.0),
        "{}",
        metrics.text
    );
    assert_eq!(
        value("workflow_runs_started_total{workflow=\"boom\"}"),
        Some(1.0)
    );
    assert_eq!(
        value("workflow_runs_finished_total{workflow=\"greet\",status=\"succeeded\"}"),
        Some(1.0)
    );
    assert_eq!(
        value("workflow_runs_finished_total{workflow=\"boom\",status=\"failed\"}"),
        Some(1.0)
    );
    assert_eq!(
        value("workflow_failures_total{workflow=\"boom\"}"),
        Some(1.0)
    );
    // Published at zero from the start, so an alert rule sees the series.
    assert_eq!(
        value("workflow_failures_total{workflow=\"greet\"}"),
        Some(0.0)
    );
    assert_eq!(value("workflow_queue_depth"), Some(0.0));
    assert!(metrics.text.contains(
        "workflow_step_duration_seconds_bucket{workflow=\"greet\",step=\"hi\",outcome=\"succeeded\""
    ));
    assert!(
        metrics
            .text
            .contains("workflow_claim_duration_seconds_count")
    );
}

/// schemathesis (PyPI) generates requests from the OpenAPI document, valid and invalid, as an
/// admin: no answer may be a 5xx, undocumented, or break its schema, and invalid requests must be
/// refused. `.ci/run` installs it; locally without it the test says it was skipped.
#[tokio::test]
async fn schemathesis_finds_no_server_error_and_no_answer_outside_the_schema() {
    // CI names the program; then it must run. Otherwise whatever is on PATH, if anything.
    let required = std::env::var("SWITCHYARD_SCHEMATHESIS").ok();
    let program = required.clone().unwrap_or_else(|| "schemathesis".into());
    if let Err(e) = std::process::Command::new(&program)
        .arg("--version")
        .output()
    {
        assert!(
            required.is_none(),
            "SWITCHYARD_SCHEMATHESIS={program} does not run: {e}"
        );
        switchyard_engine::testing::skipped(
            "SWITCHYARD_SCHEMATHESIS",
            "schemathesis is not installed (pip install schemathesis)",
        );
        return;
    }
    let api = Api::start("schemathesis").await;
    let admin = api.token("admin", &[]);
    let out = tokio::process::Command::new(&program)
        .args([
            "run",
            &format!("{}/api/openapi.json", api.base),
            "--header",
            &format!("Authorization: Bearer {admin}"),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance,negative_data_rejection",
            "--max-examples",
            "25",
            "--seed",
            "1",
            "--request-timeout",
            "10",
        ])
        .env("NO_COLOR", "1")
        // Its cache of found crashes goes in the sandbox, not the repository.
        .current_dir(&api.sandbox.dir)
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        api.sandbox.server_logs()
    );
}

#[tokio::test]
async fn a_worker_serves_its_own_metrics_and_no_api() {
    let mut sandbox = Sandbox::new("worker-metrics", OUTCOMES);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}");
    sandbox.spawn(&[
        "worker",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--workers",
        "2",
    ]);
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/health")).send().await.is_err() {
        assert!(Instant::now() < deadline, "{}", sandbox.server_logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Only this worker can run the step: no `serve` runs here.
    let out = sandbox.output_within(&["run", "greet", "--wait"]);
    assert!(out.status.success(), "{}", sandbox.server_logs());

    let metrics = send(http.get(format!("{base}/metrics"))).await;
    assert_eq!(metrics.status, 200, "{metrics}");
    assert!(
        metrics.text.contains(
            "workflow_step_duration_seconds_count{workflow=\"greet\",step=\"hi\",outcome=\"succeeded\"} 1"
        ),
        "{}",
        metrics.text
    );
    assert!(
        metrics
            .text
            .contains("workflow_runs_finished_total{workflow=\"greet\",status=\"succeeded\"} 1")
    );
    let api = send(http.get(format!("{base}/api/runs"))).await;
    assert_eq!(api.status, 404, "{api}");
}

#[tokio::test]
async fn removing_a_workflow_over_the_api_needs_admin_and_force_while_runs_go_on() {
    let api = Api::start("remove").await;
    let admin = api.token("admin", &[]);
    let operator = api.token("operator", &[]);
    api.start_run("hello", &operator).await;
    let path = "/api/workflows/hello";
    send(api.authed(Method::DELETE, path, &operator))
        .await
        .assert_error(403, "forbidden");
    let busy = send(api.authed(Method::DELETE, path, &admin)).await;
    assert!(
        busy.assert_error(409, "conflict").contains("--force"),
        "{busy}"
    );
    let removed = send(api.authed(Method::DELETE, &format!("{path}?force=true"), &admin)).await;
    assert_eq!(removed.status, 204, "{removed}");
    api.get(path, &admin).await.assert_error(404, "not_found");
    api.post(&format!("{path}/start"), &operator, json!({"input": {}}))
        .await
        .assert_error(404, "not_found");
    send(api.authed(Method::DELETE, path, &admin))
        .await
        .assert_error(404, "not_found");
    // Its runs stay readable.
    assert_eq!(api.run_ids(&admin).await.len(), 1);
}

#[tokio::test]
async fn a_refused_definition_body_stores_none_of_its_workflows() {
    let api = Api::start("atomic-create").await;
    let admin = api.token("admin", &[]);
    // The second workflow holds a NUL character, which no store keeps as it is.
    let body = json!({ "workflows": {
        "first": { "steps": [{ "id": "a", "type": "noop" }] },
        "second": { "description": "a\u{0}b", "steps": [{ "id": "a", "type": "noop" }] },
    }});
    let reply = send(
        api.authed(Method::POST, "/api/admin/workflows", &admin)
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string()),
    )
    .await;
    let message = reply.assert_error(422, "invalid_definition");
    assert!(message.contains("NUL"), "{reply}");
    api.get("/api/workflows/first", &admin)
        .await
        .assert_error(404, "not_found");
}

#[tokio::test]
async fn failure_counters_are_published_at_zero_before_any_run() {
    let api = Api::start("zero-metrics").await;
    let metrics = send(api.request(Method::GET, "/metrics")).await;
    assert_eq!(metrics.status, 200, "{metrics}");
    for series in [
        "workflow_failures_total{workflow=\"hello\"} 0",
        "workflow_runs_started_total{workflow=\"hello\"} 0",
        "workflow_runs_finished_total{workflow=\"hello\",status=\"failed\"} 0",
    ] {
        assert!(
            metrics.text.contains(series),
            "{series} in {}",
            metrics.text
        );
    }
}

/// The claims of a token, read without checking it.
fn claims_of(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// Waits until `path` with `token` answers `status`, for up to 5 s.
async fn eventually(api: &Api, path: &str, token: &str, status: u16) -> Reply {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let reply = api.get(path, token).await;
        if reply.status == status || Instant::now() > deadline {
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_revoked_token_is_refused_at_once() {
    let api = Api::start("revoke").await;
    let out = api
        .sandbox
        .command()
        .args(["token", "create", "--role", "admin"])
        .output()
        .unwrap();
    let admin = last_line(&String::from_utf8(out.stdout).unwrap());
    let jti = claims_of(&admin)["jti"].as_str().unwrap().to_owned();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&jti),
        "token create names the token's id on stderr"
    );
    let issued = api
        .post(
            "/api/admin/tokens",
            &admin,
            json!({"subject": "ci", "role": "viewer", "ttl_secs": 3600}),
        )
        .await;
    let viewer = issued.body["token"].as_str().unwrap().to_owned();
    let viewer_jti = claims_of(&viewer)["jti"].as_str().unwrap().to_owned();
    assert_eq!(api.get("/api/runs", &viewer).await.status, 200);

    let path = format!("/api/admin/tokens/{viewer_jti}");
    for _ in 0..2 {
        let reply = send(api.authed(Method::DELETE, &path, &admin)).await;
        assert_eq!(reply.status, 204, "revoking, and revoking again: {reply}");
    }
    let message = api
        .get("/api/runs", &viewer)
        .await
        .assert_error(401, "unauthorized")
        .to_owned();
    assert!(message.contains("revoked"), "{message}");
    api.authed(Method::DELETE, &path, &viewer)
        .send()
        .await
        .unwrap();

    // A login's token, revoked from the command line (another process): refused within a second.
    api.post(
        "/api/admin/users",
        &admin,
        json!({"name": "bob", "password": "a long password", "role": "viewer"}),
    )
    .await;
    let login = send(
        api.request(Method::POST, "/api/auth/login")
            .json(&json!({"username": "bob", "password": "a long password"})),
    )
    .await;
    let session = login.body["token"].as_str().unwrap().to_owned();
    assert_eq!(api.get("/api/runs", &session).await.status, 200);
    let session_jti = claims_of(&session)["jti"].as_str().unwrap().to_owned();
    let said = api.sandbox.cli(&["token", "revoke", &session_jti]);
    assert!(said.contains("revoked"), "{said}");
    eventually(&api, "/api/runs", &session, 401)
        .await
        .assert_error(401, "unauthorized");

    send(api.authed(Method::DELETE, &format!("/api/admin/tokens/{jti}"), &viewer))
        .await
        .assert_error(401, "unauthorized");
    assert_eq!(
        api.get("/api/runs", &admin).await.status,
        200,
        "others stand"
    );
}

#[tokio::test]
async fn admin_changes_are_listed_in_the_audit_log_newest_first() {
    const SECRET: &str = "sk-audit-4711";
    let api = Api::start("audit").await;
    let admin = api.token("admin", &[]);
    api.put("/api/admin/variables/region", &admin, json!("eu"))
        .await;
    api.put("/api/admin/secrets/key", &admin, json!({"value": SECRET}))
        .await;
    api.post(
        "/api/admin/users",
        &admin,
        json!({"name": "carol", "password": "a long password", "role": "operator"}),
    )
    .await;
    api.send_yaml(Method::PUT, "/api/workflows/hello", &admin, HELLO_V2)
        .await;
    let issued = api
        .post(
            "/api/admin/tokens",
            &admin,
            json!({"subject": "ci", "role": "viewer", "ttl_secs": 3600}),
        )
        .await;
    let jti = claims_of(issued.body["token"].as_str().unwrap())["jti"]
        .as_str()
        .unwrap()
        .to_owned();
    send(api.authed(Method::DELETE, &format!("/api/admin/tokens/{jti}"), &admin)).await;
    send(api.authed(Method::DELETE, "/api/admin/variables/region", &admin)).await;

    let reply = api.get("/api/admin/audit?limit=500", &admin).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert!(!reply.text.contains(SECRET), "{reply}");
    assert!(!reply.text.contains("a long password"), "{reply}");
    let entries = reply.body["entries"].as_array().unwrap();
    let seen: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e["action"].as_str().unwrap(), e["target"].as_str().unwrap()))
        .collect();
    let issued_at = seen.iter().position(|s| s.0 == "token.issue" && s.1 == jti);
    assert_eq!(
        &seen[..7],
        [
            ("variable.delete", "region"),
            ("token.revoke", jti.as_str()),
            ("token.issue", jti.as_str()),
            ("workflow.install", "hello"),
            ("user.set", "carol"),
            ("secret.set", "key"),
            ("variable.set", "region"),
        ],
        "{reply}"
    );
    assert_eq!(issued_at, Some(2));
    assert!(entries[..7].iter().all(|e| e["actor"] == "cli"), "{reply}");
    assert_eq!(entries[3]["detail"]["version"], 2, "{reply}");
    assert_eq!(entries[4]["detail"]["role"], "operator", "{reply}");

    // Pages follow the cursor; the last page has none.
    let first = api.get("/api/admin/audit?limit=4", &admin).await;
    let cursor = first.body["next_cursor"].as_str().unwrap();
    let second = api
        .get(&format!("/api/admin/audit?limit=4&cursor={cursor}"), &admin)
        .await;
    let second_actions: Vec<&str> = second.body["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        second_actions[..3],
        ["user.set", "secret.set", "variable.set"]
    );
    api.get("/api/admin/audit?cursor=x", &admin)
        .await
        .assert_error(400, "invalid_query");
    let operator = api.token("operator", &[]);
    api.get("/api/admin/audit", &operator)
        .await
        .assert_error(403, "forbidden");
}

#[tokio::test]
async fn a_path_over_the_limit_gets_a_json_414() {
    let api = Api::start("long-path").await;
    let admin = api.token("admin", &[]);
    let path = format!("/api/runs/{}", "r".repeat(20_000));
    api.get(&path, &admin)
        .await
        .assert_error(414, "uri_too_long");
}

#[tokio::test]
async fn probes_and_each_user_have_rate_buckets_of_their_own() {
    let api = Api::with_rate_limit("probe-buckets", HELLO, "1", "3").await;
    let admin = api.token("admin", &[]);
    api.post(
        "/api/admin/users",
        &admin,
        json!({"name": "dave", "password": "a long password", "role": "viewer"}),
    )
    .await;
    let login = || {
        send(
            api.request(Method::POST, "/api/auth/login")
                .json(&json!({"username": "dave", "password": "a long password"})),
        )
    };
    let first = login().await;
    let second = login().await;
    let (first, second) = (
        first.body["token"].as_str().unwrap().to_owned(),
        second.body["token"].as_str().unwrap().to_owned(),
    );
    // The address's bucket runs dry; its probes still pass.
    let mut public = 0;
    while send(api.request(Method::GET, "/api/stats")).await.status == 200 {
        public += 1;
        assert!(public <= 4, "the address is never limited");
    }
    // Of the probes' burst of 3, start-up's readiness check took one.
    for _ in 0..2 {
        let health = send(api.request(Method::GET, "/health")).await;
        assert_eq!(health.status, 200, "probes keep their allowance: {health}");
    }
    // Both sessions of one user draw on one bucket.
    for token in [&first, &second, &first] {
        assert_eq!(api.get("/api/runs", token).await.status, 200);
    }
    api.get("/api/runs", &second)
        .await
        .assert_error(429, "rate_limited");
    assert_eq!(api.get("/api/runs", &admin).await.status, 200);
}

#[tokio::test]
async fn logins_are_limited_per_user_name_and_per_address() {
    let api = Api::launch(
        "login-limits",
        HELLO,
        &["--login-rate", "1", "--login-address-rate", "4"],
        &[],
    )
    .await;
    let login = |username: &'static str| {
        send(
            api.request(Method::POST, "/api/auth/login")
                .json(&json!({"username": username, "password": "not the password"})),
        )
    };
    // Sent together: the limits are counted before any password is hashed, so which request
    // is refused may vary, but not how many.
    let (a, b) = tokio::join!(login("alice"), login("alice"));
    let mut replies = [a, b];
    replies.sort_by_key(|r| r.status);
    replies[0].assert_error(401, "unauthorized");
    let message = replies[1].assert_error(429, "rate_limited");
    assert!(message.contains("this user"), "{message}");
    assert!(replies[1].headers.contains_key("retry-after"));
    // Two attempts of the address's four are used: of three more, one is refused.
    let (a, b, c) = tokio::join!(login("bob"), login("carol"), login("dave"));
    let mut replies = [a, b, c];
    replies.sort_by_key(|r| r.status);
    replies[0].assert_error(401, "unauthorized");
    replies[1].assert_error(401, "unauthorized");
    let message = replies[2].assert_error(429, "rate_limited");
    assert!(message.contains("this address"), "{message}");
}

#[tokio::test]
async fn values_a_caller_sends_are_logged_escaped_and_truncated() {
    let api = Api::launch("log-escape", HELLO, &[], &[("RUST_LOG", "info")]).await;
    let forged = format!(
        "mallory\n2026-01-01T00:00:00Z  INFO login user=admin\u{1b}[2J{}",
        "x".repeat(3000)
    );
    let reply = send(
        api.request(Method::POST, "/api/auth/login")
            .json(&json!({"username": forged, "password": "whatever you like"})),
    )
    .await;
    reply.assert_error(401, "unauthorized");
    let logs = api.sandbox.server_logs();
    let line = logs
        .lines()
        .find(|l| l.contains("login refused"))
        .unwrap_or_else(|| panic!("no login line in\n{logs}"));
    assert!(line.contains(r"mallory\n2026"), "{line}");
    assert!(line.contains(r"\u{1b}"), "{line}");
    assert!(line.contains("bytes)"), "{line}");
    assert!(line.len() < 600, "{} bytes: {line}", line.len());
    assert!(!logs.contains('\u{1b}'), "an escape byte reached the log");
    assert!(
        !logs.lines().any(|l| l.starts_with("2026-01-01T00:00:00Z")),
        "a forged line"
    );
}

#[tokio::test]
async fn a_rotated_signing_key_keeps_earlier_tokens_valid_for_its_grace_period() {
    let api = Api::start("signing-rotation").await;
    let earlier = api.token("viewer", &[]);
    let earlier_kid = header_kid(&earlier);
    let said = api
        .sandbox
        .cli(&["keys", "rotate-signing", "--grace", "3s"]);
    let rotated = Instant::now();
    assert!(said.contains("is current"), "{said}");
    let later = api.token("viewer", &[]);
    assert_ne!(header_kid(&later), earlier_kid, "the new key signs");
    // The running server learns the new key from the first token that names it.
    assert_eq!(api.get("/api/runs", &later).await.status, 200);
    assert_eq!(
        api.get("/api/runs", &earlier).await.status,
        200,
        "in its grace period"
    );
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(rotated.elapsed())).await;
    api.get("/api/runs", &earlier)
        .await
        .assert_error(401, "unauthorized");
    assert_eq!(api.get("/api/runs", &later).await.status, 200);
}

/// The `kid` of a token's header.
fn header_kid(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    header["kid"].as_str().expect("a kid").to_owned()
}

#[tokio::test]
async fn a_runs_logs_are_paged_and_an_unknown_run_is_a_404() {
    let api = Api::start("logs-api").await;
    let operator = api.token("operator", &[]);
    let started = api
        .post(
            "/api/workflows/hello/start",
            &operator,
            json!({"input": {}}),
        )
        .await;
    let run = started.body["run_id"].as_str().unwrap().to_owned();
    let page = api.get(&format!("/api/runs/{run}/logs"), &operator).await;
    assert_eq!(page.status, 200, "{page}");
    assert_eq!(page.body["lines"], json!([]), "{page}");
    api.get(&format!("/api/runs/{run}/logs?limit=0"), &operator)
        .await
        .assert_error(400, "invalid_query");
    api.get("/api/runs/no-such-run/logs", &operator)
        .await
        .assert_error(404, "not_found");
}

#[tokio::test]
async fn following_a_runs_logs_streams_each_line_as_it_comes_and_ends_with_the_run() {
    let api = Api::launch(
        "logs-follow",
        "id: chatty
steps:
  - id: talk
    type: script
    with:
      run: sh
      code: |
        echo first
        echo second >&2
        sleep 3
        echo '{\"done\": true}'
",
        &["--allow-scripts"],
        &[],
    )
    .await;
    let viewer = api.token("viewer", &[]);
    let operator = api.token("operator", &[]);
    let run = api.start_run("chatty", &operator).await;
    let started = Instant::now();
    let mut reply = api
        .authed(
            Method::GET,
            &format!("/api/runs/{run}/logs/follow"),
            &viewer,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    assert!(
        reply.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    // A line comes while its step still runs, not when the attempt ends.
    let mut body = String::new();
    while !body.contains("first") {
        let chunk = tokio::time::timeout(Duration::from_secs(30), reply.chunk())
            .await
            .expect("a line came")
            .unwrap()
            .expect("the stream goes on until the run ends");
        body.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let status = api
        .authed(Method::GET, &format!("/api/runs/{run}"), &viewer)
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["status"]
        .clone();
    assert_eq!(status, "running", "{body}");
    // The stream ends by itself once the run has ended.
    let rest = tokio::time::timeout(Duration::from_secs(30), reply.text())
        .await
        .expect("the stream ended with the run")
        .unwrap();
    body.push_str(&rest);
    let lines: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    let texts: Vec<&str> = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
    // Each line as it was printed: the two before the pause (two pipes, in either order), then
    // the last one seconds later.
    assert_eq!(texts.len(), 3, "{body}");
    assert!(
        texts[..2].contains(&"first") && texts[..2].contains(&"second"),
        "{body}"
    );
    assert_eq!(texts[2], "{\"done\": true}", "{body}");
    let gap = lines[2]["at"].as_i64().unwrap() - lines[0]["at"].as_i64().unwrap();
    assert!(
        gap >= 2_900,
        "the lines carry the times they were printed at: {body}"
    );
    assert!(body.contains("\nid: "), "each event names its line: {body}");
    assert!(
        started.elapsed() >= Duration::from_millis(2_900),
        "it waited for the run"
    );
    // Resuming after the last line gives nothing more.
    let last = lines.last().unwrap()["id"].as_i64().unwrap();
    let again = api
        .authed(
            Method::GET,
            &format!("/api/runs/{run}/logs/follow"),
            &viewer,
        )
        .header("Last-Event-ID", last.to_string())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!again.contains("data: "), "{again}");
}

#[tokio::test]
async fn a_follow_ends_once_its_token_is_revoked() {
    let api = Api::with_definition(
        "follow-revoked",
        "id: slow\nsteps:\n  - {id: nap, type: sleep, with: {duration: 10m}}\n",
    )
    .await;
    let admin = api.token("admin", &[]);
    let issued = api
        .post(
            "/api/admin/tokens",
            &admin,
            json!({"subject": "watcher", "role": "viewer", "ttl_secs": 3600}),
        )
        .await;
    let viewer = issued.body["token"].as_str().unwrap().to_owned();
    let jti = claims_of(&viewer)["jti"].as_str().unwrap().to_owned();
    let run = api.start_run("slow", &admin).await;
    let mut reply = api
        .authed(
            Method::GET,
            &format!("/api/runs/{run}/logs/follow"),
            &viewer,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let revoked =
        send(api.authed(Method::DELETE, &format!("/api/admin/tokens/{jti}"), &admin)).await;
    assert_eq!(revoked.status, 204, "{revoked}");
    // The run sleeps for ten minutes; the stream ends long before, saying why.
    let mut body = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(chunk) = reply.chunk().await.unwrap() {
            body.push_str(&String::from_utf8_lossy(&chunk));
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the stream went on after the revocation: {body}"
    );
    assert!(body.contains("event: error"), "{body}");
    assert!(body.contains("revoked"), "{body}");
}

#[tokio::test]
async fn times_come_as_epoch_milliseconds_and_as_rfc3339_beside_them() {
    let api = Api::start("rfc3339").await;
    let operator = api.token("operator", &[]);
    let run = api.start_run("hello", &operator).await;
    let detail = api.run(&run, &operator).await;
    let created = detail.body["created_at"].as_i64().unwrap();
    let text = detail.body["created_at_rfc3339"].as_str().unwrap();
    assert!(text.ends_with('Z'), "{text}");
    let parsed: jiff::Timestamp = text.parse().unwrap();
    assert_eq!(parsed.as_millisecond(), created);
    assert!(detail.body["finished_at_rfc3339"].is_null(), "{detail}");
    let listed = api.get("/api/workflows", &operator).await;
    let fires = &listed.body[0]["schedule"]["next_fires_rfc3339"];
    assert_eq!(fires.as_array().map(Vec::len), Some(3), "{listed}");
}

/// Signs `body` at `t` as Stripe does (and as `hmac-sha256` triggers take it):
/// `t=<t>,v1=<hex HMAC-SHA256 of "t.body">`.
fn stripe_signature(secret: &str, t: i64, body: &[u8]) -> String {
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

const HOOKS: &str = "workflows:
  payments:
    triggers:
      - webhook: { path: stripe/payments, auth: stripe, secret: stripe_webhook_secret }
    steps:
      - { id: a, type: transform, with: { output: \"{{ input.body.data.object.amount }}\" } }
  signed:
    triggers:
      - webhook: { path: signed, auth: hmac-sha256, secret: hook_secret, respond: { wait: 10s } }
    steps:
      - { id: echo, type: transform, with: { output: { body: \"{{ input.body }}\", query: \"{{ input.query }}\", headers: \"{{ input.headers }}\" } } }
  tokened:
    triggers:
      - webhook: { path: tokened, auth: bearer, dedupe_key: \"{{ input.body.order }}\" }
    steps:
      - { id: a, type: noop }
  open:
    triggers:
      - webhook: { path: open, auth: none, public: true }
    steps:
      - { id: a, type: noop }
";

#[tokio::test]
async fn stripe_deliveries_start_one_run_per_event_and_forged_stale_or_foreign_ones_none() {
    let api = Api::with_definition("hooks-stripe", HOOKS).await;
    let admin = api.token("admin", &[]);
    let viewer = api.token("viewer", &[]);
    const SECRET: &str = "whsec_test_123";
    let reply = api
        .put(
            "/api/admin/secrets/stripe_webhook_secret",
            &admin,
            json!({"value": SECRET}),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply}");
    let event = serde_json::to_vec(&json!({
        "id": "evt_1", "type": "checkout.session.completed",
        "data": {"object": {"amount": 4200}},
    }))
    .unwrap();
    let deliver = |body: Vec<u8>, signature: Option<String>| {
        let mut request = api
            .request(Method::POST, "/api/hooks/stripe/payments")
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(signature) = signature {
            request = request.header("Stripe-Signature", signature);
        }
        send(request)
    };
    let now = jiff::Timestamp::now().as_second();

    // Refused, each with the same words: which check failed is not told.
    let mut tampered = event.clone();
    tampered[10] ^= 1;
    let refusals = [
        deliver(event.clone(), None).await,
        deliver(
            event.clone(),
            Some(stripe_signature("whsec_other", now, &event)),
        )
        .await,
        deliver(
            event.clone(),
            Some(stripe_signature(SECRET, now - 400, &event)),
        )
        .await,
        deliver(
            tampered.clone(),
            Some(stripe_signature(SECRET, now, &event)),
        )
        .await,
        deliver(event.clone(), Some(format!("t={now},v1=zz"))).await,
    ];
    let messages: Vec<String> = refusals
        .iter()
        .map(|r| r.assert_error(401, "unauthorized").to_owned())
        .collect();
    assert!(messages.iter().all(|m| *m == messages[0]), "{messages:?}");
    assert!(messages[0].starts_with("signature"), "{messages:?}");
    assert!(
        api.run_ids(&viewer).await.is_empty(),
        "no run from a refused delivery"
    );

    // Signed, with an older secret's signature beside it as Stripe sends while rolling.
    let signed = stripe_signature(SECRET, now, &event);
    let rolled = format!("{signed},v1={}", "0".repeat(64));
    let reply = deliver(event.clone(), Some(rolled)).await;
    assert_eq!(reply.status, 202, "{reply}");
    assert_eq!(reply.body["event_id"], "evt_1", "{reply}");
    assert_eq!(reply.body["duplicate"], false, "{reply}");
    let run = reply.body["run_id"].as_str().unwrap().to_owned();
    // Stripe retrying, or someone replaying it within the tolerance: the same run, no other.
    let reply = deliver(event.clone(), Some(signed)).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body["run_id"], run.as_str(), "{reply}");
    assert_eq!(reply.body["duplicate"], true, "{reply}");
    let finished = api.finished_run(&run, &viewer).await;
    assert_eq!(finished.body["status"], "succeeded", "{finished}");
    let amount = &finished.body["output"]["a"];
    assert!(
        *amount == json!(4200) || *amount == json!("4200"),
        "{finished}"
    );
    assert_eq!(
        finished.body["input"]["headers"].get("stripe-signature"),
        None,
        "the signature stays out of the input: {finished}"
    );
    // Stripe sends an event again with fields that changed since: its signed id names it.
    let resent = serde_json::to_vec(&json!({
        "id": "evt_1", "type": "checkout.session.completed", "pending_webhooks": 0,
        "data": {"object": {"amount": 4200}},
    }))
    .unwrap();
    let reply = deliver(resent.clone(), Some(stripe_signature(SECRET, now, &resent))).await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body["run_id"], run.as_str(), "{reply}");
    assert_eq!(api.run_ids(&viewer).await, vec![run.clone()]);
    let events = api
        .get("/api/webhook-events?source=hook:stripe/payments", &viewer)
        .await;
    assert_eq!(events.body.as_array().unwrap().len(), 1, "{events}");
    assert_eq!(events.body[0]["run_id"], run.as_str(), "{events}");

    send(api.request(Method::POST, "/api/hooks/nowhere"))
        .await
        .assert_error(404, "not_found");
}

#[tokio::test]
async fn hmac_bearer_and_public_triggers_take_what_they_should_and_can_wait_for_the_run() {
    let api = Api::with_definition("hooks-kinds", HOOKS).await;
    let admin = api.token("admin", &[]);
    let viewer = api.token("viewer", &[]);
    let reply = api
        .put(
            "/api/admin/secrets/hook_secret",
            &admin,
            json!({"value": "shh"}),
        )
        .await;
    assert_eq!(reply.status, 200, "{reply}");

    // hmac-sha256, answered once the run has ended (`respond: {wait}`), with its output.
    let body = br#"{"order": 7}"#.to_vec();
    let now = jiff::Timestamp::now().as_second();
    let reply = send(
        api.request(Method::POST, "/api/hooks/signed?src=shop")
            .header(CONTENT_TYPE, "application/json")
            .header("X-Signature", stripe_signature("shh", now, &body))
            .header("X-Event-Id", "order-7")
            .body(body.clone()),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply}");
    assert_eq!(reply.body["status"], "succeeded", "{reply}");
    // A signed delivery is named by what its signature covers, not by a header a replay
    // could change.
    let body_digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&body))
    };
    assert_eq!(reply.body["event_id"], body_digest.as_str(), "{reply}");
    let replay = send(
        api.request(Method::POST, "/api/hooks/signed?src=shop")
            .header(CONTENT_TYPE, "application/json")
            .header("X-Signature", stripe_signature("shh", now, &body))
            .header("X-Event-Id", "order-8")
            .body(body.clone()),
    )
    .await;
    assert_eq!(replay.body["run_id"], reply.body["run_id"], "{replay}");
    assert_eq!(replay.body["duplicate"], true, "{replay}");
    let echo = &reply.body["output"]["echo"];
    assert_eq!(echo["body"], json!({"order": 7}), "{reply}");
    assert_eq!(echo["query"], json!({"src": "shop"}), "{reply}");
    assert_eq!(echo["headers"]["x-event-id"], "order-7", "{reply}");
    assert_eq!(echo["headers"].get("x-signature"), None, "{reply}");

    // bearer: an operator's token or a webhook key, not a viewer's; `dedupe_key` names the
    // delivery.
    let order = json!({"order": "A-1"});
    api.post("/api/hooks/tokened", &viewer, order.clone())
        .await
        .assert_error(403, "forbidden");
    send(api.request(Method::POST, "/api/hooks/tokened").json(&order))
        .await
        .assert_error(401, "unauthorized");
    let key = api.token("webhook", &[]);
    let first = api.post("/api/hooks/tokened", &key, order.clone()).await;
    assert_eq!(first.status, 202, "{first}");
    assert_eq!(first.body["event_id"], "A-1", "{first}");
    let operator = api.token("operator", &[]);
    let again = api.post("/api/hooks/tokened", &operator, order).await;
    assert_eq!(again.status, 200, "{again}");
    assert_eq!(again.body["run_id"], first.body["run_id"], "{again}");

    // none, declared public: anyone; the same body twice is one delivery.
    let open = || {
        send(
            api.request(Method::POST, "/api/hooks/open")
                .header(CONTENT_TYPE, "text/plain")
                .body("ping"),
        )
    };
    let reply = open().await;
    assert_eq!(reply.status, 202, "{reply}");
    assert_eq!(open().await.body["run_id"], reply.body["run_id"]);
    let run = api
        .finished_run(reply.body["run_id"].as_str().unwrap(), &viewer)
        .await;
    assert_eq!(run.body["input"]["body"], "ping", "{run}");
}
