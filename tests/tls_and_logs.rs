//! Serving in production: HTTPS with the operator's certificate, and logs a pipeline can read
//! (JSON, one object a line) with no colour codes when they do not go to a terminal.

mod common;

use std::time::Duration;

use common::Sandbox;
use serde_json::Value;

const HELLO: &str = "id: hello\nsteps:\n  - {id: greet, type: noop}\n";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_api_serves_https_with_the_given_certificate() {
    let mut sandbox = Sandbox::new("tls", HELLO);
    let (cert, key) = (sandbox.dir.join("cert.pem"), sandbox.dir.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost"])
        // A certificate that is its own trust anchor must not say it is a CA.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl makes a test certificate");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    sandbox.spawn(&[
        "serve",
        "--listen",
        &listen,
        "--workers",
        "0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    sandbox.wait_for("serve to listen", || {
        std::net::TcpStream::connect(&listen).is_ok()
    });
    let https = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap(),
        )
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .build()
        .unwrap();
    let reply = https
        .get(format!("https://localhost:{port}/health"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", sandbox.server_logs()));
    assert_eq!(reply.status(), 200);
    // The dashboard's cookies are only ever sent back over TLS.
    let login = https
        .get(format!("https://localhost:{port}/login"))
        .send()
        .await
        .unwrap();
    let cookie = login.headers()["set-cookie"].to_str().unwrap();
    assert!(
        cookie.contains("HttpOnly")
            && cookie.contains("SameSite=Strict")
            && cookie.ends_with("; Secure"),
        "{cookie}"
    );
    let plain = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/health"))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.unwrap().status().is_success(),
        "plain HTTP is not served on the TLS port"
    );

    let out = sandbox
        .command()
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(sandbox.dir.join("missing.pem"))
        .arg("--tls-key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(
        error.contains("missing.pem"),
        "the bad file is named: {error}"
    );
}

#[test]
fn json_logs_are_one_object_a_line_and_text_logs_carry_no_colour_codes() {
    for format in ["json", "text"] {
        let mut sandbox = Sandbox::new(&format!("logs-{format}"), HELLO);
        let listen = format!("127.0.0.1:{}", free_port());
        sandbox.spawn_env(
            &[
                "serve",
                "--listen",
                &listen,
                "--workers",
                "0",
                "--log-format",
                format,
            ],
            &[("RUST_LOG", "info")],
        );
        sandbox.wait_for("serve to log that it listens", || {
            sandbox.server_logs().contains("HTTP listening")
        });
        sandbox.kill_all();
        let logs = sandbox.server_logs();
        let lines: Vec<&str> = logs
            .lines()
            .filter(|l| !l.starts_with("--- proc-"))
            .collect();
        assert!(!lines.is_empty());
        assert!(
            !logs.contains('\u{1b}'),
            "{format}: colour codes in a file:\n{logs}"
        );
        if format == "json" {
            for line in &lines {
                let entry: Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
                assert!(entry["level"].is_string(), "{line}");
                assert!(entry["fields"]["message"].is_string(), "{line}");
            }
        } else {
            assert!(
                serde_json::from_str::<Value>(lines[0]).is_err(),
                "{}",
                lines[0]
            );
        }
    }
}
