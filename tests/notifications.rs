//! Run notifications through the real binary: written with the run's end, POSTed signed by the
//! sender, retried while the receiver fails, and never lost when the server is killed with
//! `kill -9` in between. The receiver is a real HTTP server on 127.0.0.1 started by the test.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{Sandbox, last_line, serve_in_thread};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

const SECRET: &str = "whsec-for-the-test";

#[derive(Clone, Default)]
struct Receiver {
    /// Answer 200 (else 503).
    accept: Arc<AtomicBool>,
    /// Each delivery: its headers, its body, and whether it was accepted.
    got: Arc<Mutex<Vec<(HeaderMap, String, bool)>>>,
}

impl Receiver {
    fn start() -> (String, Receiver) {
        async fn hook(State(r): State<Receiver>, headers: HeaderMap, body: String) -> StatusCode {
            let accept = r.accept.load(Ordering::SeqCst);
            r.got.lock().unwrap().push((headers, body, accept));
            if accept {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
        let receiver = Receiver::default();
        let app = axum::Router::new()
            .route("/hook", post(hook))
            .with_state(receiver.clone());
        (serve_in_thread(app), receiver)
    }

    fn deliveries(&self) -> Vec<(HeaderMap, String, bool)> {
        self.got.lock().unwrap().clone()
    }
}

/// What a receiver does with `X-Switchyard-Signature: t=..,v1=..`: the HMAC-SHA256 of
/// `"{t}.{body}"` under the shared secret, and a time close to its own.
fn signature_holds(header: &str, body: &str) -> bool {
    let parts: Vec<(&str, &str)> = header
        .split(',')
        .filter_map(|p| p.split_once('='))
        .collect();
    let t = parts.iter().find(|(k, _)| *k == "t").unwrap().1;
    let v1 = parts.iter().find(|(k, _)| *k == "v1").unwrap().1;
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    let fresh = (jiff::Timestamp::now().as_second() - t.parse::<i64>().unwrap()).abs() < 300;
    fresh && hex::encode(mac.finalize().into_bytes()) == v1
}

#[test]
fn a_notification_survives_kill_9_and_arrives_signed_once_the_receiver_answers() {
    let (base, receiver) = Receiver::start();
    let definition = format!(
        "id: told\n\
         notifications: {{onSuccess: true, onFailure: true, webhookUrl: \"{base}/hook\"}}\n\
         steps:\n  - {{id: a, type: transform, with: {{output: {{n: 1}}}}}}\n"
    );
    let mut sandbox = Sandbox::new("notify-kill", &definition);
    sandbox.env.push((
        "SWITCHYARD_SECRET_NOTIFICATION_SECRET".into(),
        SECRET.into(),
    ));
    sandbox.serve();
    let run = last_line(&sandbox.cli(&["run", "told"]));
    // The receiver refuses the first delivery; once that is recorded, the server dies.
    sandbox.wait_for("a first delivery, refused and recorded", || {
        let listed: Value =
            serde_json::from_str(&sandbox.cli(&["notifications", "--json"])).unwrap();
        listed[0]["attempts"].as_i64() >= Some(1)
    });
    sandbox.kill_all();
    receiver.accept.store(true, Ordering::SeqCst);
    sandbox.serve();
    let deadline = Instant::now() + Duration::from_secs(90);
    while !receiver
        .deliveries()
        .iter()
        .any(|(_, _, accepted)| *accepted)
    {
        assert!(
            Instant::now() < deadline,
            "no accepted delivery\n{}",
            sandbox.server_logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let deliveries = receiver.deliveries();
    assert!(deliveries.len() >= 2, "{deliveries:?}");
    let bodies: Vec<Value> = deliveries
        .iter()
        .map(|(_, body, _)| serde_json::from_str(body).unwrap())
        .collect();
    let event = bodies[0]["event_id"].as_str().unwrap();
    assert!(
        bodies.iter().all(|b| b["event_id"] == event),
        "one event, however often it is delivered: {bodies:?}"
    );
    for (headers, body, _) in &deliveries {
        let signature = headers["x-switchyard-signature"].to_str().unwrap();
        assert!(signature_holds(signature, body), "{signature} over {body}");
        assert_eq!(headers["x-switchyard-event-id"], event);
    }
    let last = bodies.last().unwrap();
    assert_eq!(last["run_id"], run.as_str());
    assert_eq!(last["workflow"], "told");
    assert_eq!(last["status"], "succeeded");
    assert_eq!(last["output"], serde_json::json!({"a": {"n": 1}}));
    assert!(last["finished_at"].as_i64() >= last["started_at"].as_i64());

    sandbox.wait_for("the delivery recorded", || {
        let listed: Value =
            serde_json::from_str(&sandbox.cli(&["notifications", "--json"])).unwrap();
        listed[0]["status"] == "delivered"
    });
    let listed: Value = serde_json::from_str(&sandbox.cli(&["notifications", "--json"])).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["event_id"], event);
    assert!(listed[0]["attempts"].as_i64() >= Some(2), "{listed}");
    assert!(
        listed[0]["last_error"].is_null(),
        "a delivered notification has no error to show: {listed}"
    );
    // Delivered once accepted: nothing more arrives.
    let settled = receiver.deliveries().len();
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(receiver.deliveries().len(), settled);
}
