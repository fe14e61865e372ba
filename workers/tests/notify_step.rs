//! The `notify` step kind against a real HTTP server on 127.0.0.1: the same signed POST as run
//! notifications, sent from inside a run.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use axum::routing::post;
use serde_json::{Value, json};
use switchyard_engine::definition::{Secrets, TemplateContext, render_value};
use switchyard_engine::signature;
use switchyard_workers::steps::Notify;
use switchyard_workers::{StepCall, StepKind, StepOutcome};

type Got = Arc<Mutex<Vec<(HeaderMap, String)>>>;

async fn receiver() -> (String, Got) {
    let got: Got = Arc::default();
    let kept = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: HeaderMap, body: String| {
            kept.lock().unwrap().push((headers, body));
            async { axum::Json(json!({ "thanks": true })) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, got)
}

fn call(with: Value) -> StepCall {
    let secrets = Secrets::new(BTreeMap::from([(
        "notification_secret".to_owned(),
        "whsec".to_owned(),
    )]));
    let ctx = TemplateContext {
        secrets: secrets.clone(),
        ..TemplateContext::default()
    };
    StepCall {
        idempotency_key: "run-9:tell".into(),
        ..StepCall::first_attempt(render_value(&with, &ctx).unwrap(), secrets)
    }
}

#[tokio::test]
async fn a_notify_step_posts_its_body_signed_with_a_stable_event_id() {
    let (base, got) = receiver().await;
    let with = json!({
        "url": format!("{base}/hook"),
        "body": { "order": 7 },
        "secret": "{{ secrets.notification_secret }}",
    });
    let outcome = Notify::new(Default::default())
        .run(call(with))
        .await
        .unwrap();
    let StepOutcome::Output(output) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(output["status"], 200);
    assert_eq!(output["body"], json!({ "thanks": true }));
    let (headers, body) = got.lock().unwrap()[0].clone();
    let sent: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(sent, json!({ "order": 7, "event_id": "run-9:tell" }));
    assert_eq!(headers["idempotency-key"], "run-9:tell");
    assert_eq!(headers["x-switchyard-event-id"], "run-9:tell");
    let header = headers["x-switchyard-signature"].to_str().unwrap();
    let now = jiff::Timestamp::now().as_second();
    assert_eq!(
        signature::verify(b"whsec", header, body.as_bytes(), now, 300),
        Ok(())
    );
    assert!(
        !output.to_string().contains("whsec"),
        "the secret stays out of the output"
    );
}

#[tokio::test]
async fn a_signed_notification_never_goes_to_a_url_from_run_data() {
    let (_, got) = receiver().await;
    let mut call = call(json!({
        "url": "https://attacker.example/collect",
        "body": { "anything": "they choose" },
        "secret": "{{ secrets.notification_secret }}",
    }));
    call.reads_run_data = vec!["url".into()];
    let error = Notify::new(Default::default()).run(call).await.unwrap_err();
    assert!(
        !error.retryable
            && error
                .message
                .contains("only to a `url` the definition names"),
        "{error:?}"
    );
    assert!(got.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_url_from_run_data_may_not_reach_loopback() {
    let (base, got) = receiver().await;
    let mut call = call(json!({ "url": format!("{base}/hook") }));
    call.reads_run_data = vec!["url".into()];
    let error = Notify::new(Default::default()).run(call).await.unwrap_err();
    assert!(!error.retryable, "{error:?}");
    assert!(got.lock().unwrap().is_empty());
}
