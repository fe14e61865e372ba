//! What a local reader of the database finds: files only their owner may read, secrets and the
//! token signing keys encrypted under a master key kept outside the database, values from before
//! encryption encrypted on start, and a master key rotation that leaves the old key unneeded.

mod common;

use std::time::{Duration, Instant};

use common::Sandbox;
use serde_json::{Value, json};
use sha2::Digest;

/// Sends the secret in a header to a server that answers 200 only when it is `SECRET`: the run
/// succeeds only if the stored secret decrypted.
fn greeter() -> String {
    let (base, _) = common::start_counter();
    let digest = hex::encode(sha2::Sha256::digest(SECRET));
    format!(
        "id: greeter\nsteps:\n  - {{id: say, type: http, with: {{url: \"{base}/expect/x-greeting/{digest}\", \
         headers: {{X-Greeting: \"{{{{ secrets.greeting }}}}\"}}}}}}\n"
    )
}
const SECRET: &str = "sk-at-rest-4711";
const KEY_A: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
const KEY_B: &str = "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff000102030405060708090a0b0c0d0e0f";

/// A master key's id: the first 8 hex characters of its SHA-256.
fn key_id(hex_key: &str) -> String {
    hex::encode(&sha2::Sha256::digest(hex::decode(hex_key).unwrap())[..4])
}

/// Starts `serve` with `env` and returns its base URL once it answers.
async fn serve(sandbox: &mut Sandbox, env: &[(&str, &str)]) -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    sandbox.spawn_env(&["serve", "--listen", &listen, "--workers", "2"], env);
    sandbox.wait_for("serve to answer", || {
        std::net::TcpStream::connect(&listen).is_ok()
    });
    format!("http://{listen}")
}

fn cli(sandbox: &Sandbox, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    sandbox
        .command()
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap()
}

fn admin_token(sandbox: &Sandbox, env: &[(&str, &str)]) -> String {
    let out = cli(sandbox, env, &["token", "create", "--role", "admin"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_owned()
}

async fn put_secret(base: &str, token: &str) {
    let reply = reqwest::Client::new()
        .put(format!("{base}/api/admin/secrets/greeting"))
        .bearer_auth(token)
        .json(&json!({"value": SECRET}))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
}

/// Runs `greeter` and returns the finished run: it succeeds only if the secret was read.
async fn run_greeter(base: &str, token: &str) -> Value {
    let http = reqwest::Client::new();
    let started: Value = http
        .post(format!("{base}/api/workflows/greeter/start"))
        .bearer_auth(token)
        .json(&json!({"input": {}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let run = started["run_id"].as_str().expect("a run id").to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let detail: Value = http
            .get(format!("{base}/api/runs/{run}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !matches!(detail["status"].as_str(), Some("pending" | "running")) {
            return detail;
        }
        assert!(Instant::now() < deadline, "run did not finish: {detail}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `settings` rows of a namespace, as a local reader of the file sees them.
async fn stored(sandbox: &Sandbox, namespace: &str) -> Vec<(String, Value)> {
    let pool = sqlx::SqlitePool::connect(&format!("{}?mode=ro", sandbox.database))
        .await
        .unwrap();
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT name, value FROM settings WHERE namespace = ? ORDER BY name")
            .bind(namespace)
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    rows.into_iter()
        .map(|(name, value)| (name, serde_json::from_str(&value).unwrap()))
        .collect()
}

fn assert_sealed_under(value: &Value, key: &str) {
    assert_eq!(value["enc"], "xchacha20poly1305", "{value}");
    assert_eq!(value["kid"], key_id(key), "{value}");
}

#[tokio::test]
async fn secrets_and_signing_keys_are_encrypted_in_files_only_their_owner_reads() {
    use std::os::unix::fs::PermissionsExt;
    let mut sandbox = Sandbox::new("at-rest", &greeter());
    let base = serve(&mut sandbox, &[]).await;
    let admin = admin_token(&sandbox, &[]);
    put_secret(&base, &admin).await;
    let run = run_greeter(&base, &admin).await;
    assert_eq!(run["status"], "succeeded", "{run}");
    assert!(!run.to_string().contains(SECRET), "{run}");

    let key_file = sandbox.dir.join("switchyard.db.key");
    let master = std::fs::read_to_string(&key_file).unwrap();
    let secrets = stored(&sandbox, "secrets").await;
    assert_eq!(secrets.len(), 1);
    assert_sealed_under(&secrets[0].1, master.trim());
    let system = stored(&sandbox, "system").await;
    assert_eq!(system[0].0, "jwt_signing_key");
    assert_sealed_under(&system[0].1, master.trim());

    for name in [
        "switchyard.db",
        "switchyard.db-wal",
        "switchyard.db-shm",
        "switchyard.db.key",
    ] {
        let path = sandbox.dir.join(name);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{name}: {mode:o}");
        if name != "switchyard.db.key" {
            let bytes = std::fs::read(&path).unwrap();
            let found = bytes.windows(SECRET.len()).any(|w| w == SECRET.as_bytes());
            assert!(!found, "{name} holds the secret in plaintext");
        }
    }
}

#[tokio::test]
async fn values_stored_before_encryption_are_encrypted_on_start_and_still_work() {
    let mut sandbox = Sandbox::new("at-rest-upgrade", &greeter());
    let out = cli(&sandbox, &[], &["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // As an earlier version left them: a plaintext secret and signing key.
    let signing_key = "5e".repeat(32);
    let pool = sqlx::SqlitePool::connect(&sandbox.database).await.unwrap();
    for (namespace, name, value) in [
        ("secrets", "greeting", json!(SECRET)),
        ("system", "jwt_signing_key", json!(signing_key)),
    ] {
        sqlx::query("INSERT OR REPLACE INTO settings VALUES (?, ?, ?, 1)")
            .bind(namespace)
            .bind(name)
            .bind(value.to_string())
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    let earlier_token = legacy_token(&signing_key);

    let base = serve(&mut sandbox, &[]).await;
    let reply = reqwest::Client::new()
        .get(format!("{base}/api/workflows"))
        .bearer_auth(&earlier_token)
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200, "a token from before still verifies");
    let master = std::fs::read_to_string(sandbox.dir.join("switchyard.db.key")).unwrap();
    assert_sealed_under(&stored(&sandbox, "secrets").await[0].1, master.trim());
    assert_sealed_under(&stored(&sandbox, "system").await[0].1, master.trim());
    let run = run_greeter(&base, &earlier_token).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}

/// An HS256 token as an earlier version signed it: no `kid`, the stored hex string as the key.
fn legacy_token(key: &str) -> String {
    use base64::Engine;
    use hmac::Mac;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let now = jiff::Timestamp::now().as_second();
    let header = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims =
        json!({"sub": "old", "role": "admin", "iat": now, "exp": now + 3600, "jti": "legacy-1"});
    let body = b64.encode(claims.to_string());
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{header}.{body}").as_bytes());
    format!(
        "{header}.{body}.{}",
        b64.encode(mac.finalize().into_bytes())
    )
}

#[tokio::test]
async fn a_master_key_rotation_reencrypts_everything_and_a_missing_key_is_named() {
    let mut sandbox = Sandbox::new("key-rotation", &greeter());
    let only_a = [("SWITCHYARD_MASTER_KEY", KEY_A)];
    let base = serve(&mut sandbox, &only_a).await;
    let admin = admin_token(&sandbox, &only_a);
    put_secret(&base, &admin).await;
    sandbox.kill_all();
    assert!(
        !sandbox.dir.join("switchyard.db.key").exists(),
        "a key given in the environment writes no key file"
    );

    let rotated = cli(
        &sandbox,
        &[("SWITCHYARD_MASTER_KEY", &format!("{KEY_B},{KEY_A}"))],
        &["keys", "rotate"],
    );
    let said = String::from_utf8_lossy(&rotated.stdout);
    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    assert!(
        said.starts_with("2 "),
        "the secret and the signing keys: {said}"
    );
    assert!(said.contains(&key_id(KEY_B)), "{said}");
    assert_sealed_under(&stored(&sandbox, "secrets").await[0].1, KEY_B);
    assert_sealed_under(&stored(&sandbox, "system").await[0].1, KEY_B);

    let refused = cli(&sandbox, &only_a, &["token", "create", "--role", "admin"]);
    assert!(!refused.status.success());
    let error = String::from_utf8_lossy(&refused.stderr);
    assert!(error.contains(&key_id(KEY_B)), "{error}");
    assert!(error.contains("SWITCHYARD_MASTER_KEY"), "{error}");
    assert!(!error.contains("panicked"), "{error}");

    let only_b = [("SWITCHYARD_MASTER_KEY", KEY_B)];
    let base = serve(&mut sandbox, &only_b).await;
    let admin = admin_token(&sandbox, &only_b);
    let run = run_greeter(&base, &admin).await;
    assert_eq!(run["status"], "succeeded", "{run}");
}
