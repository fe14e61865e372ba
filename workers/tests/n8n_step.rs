//! The `n8n` step kind against a real HTTP server standing in for n8n's Webhook trigger.

use std::sync::{Arc, Mutex};

use axum::routing::post;
use serde_json::{Value, json};
use switchyard_workers::{N8n, N8nUrls, StepCall, StepKind, StepOutcome};

/// Answers every POST to `/webhook/flow` with `{"rows": 7}` and keeps the bodies it got; a
/// POST to `/webhook-waiting/{execution}` as n8n answers a resume: 200 with what its Wait node
/// passes on for execution 1, 409 for 2 (running), 404 for any other.
async fn fake_n8n() -> (String, Arc<Mutex<Vec<Value>>>) {
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let kept = bodies.clone();
    let app = axum::Router::new()
        .route(
            "/webhook/flow",
            post(move |axum::Json(body): axum::Json<Value>| {
                kept.lock().unwrap().push(body);
                async { axum::Json(json!({ "rows": 7 })) }
            }),
        )
        .route(
            "/webhook-waiting/{execution}",
            post(
                |axum::extract::Path(execution): axum::extract::Path<u32>,
                 axum::Json(body): axum::Json<Value>| async move {
                    use axum::http::StatusCode;
                    match execution {
                        1 => (
                            StatusCode::OK,
                            axum::Json(json!({ "resumed_with": body["input"] })),
                        ),
                        2 => (
                            StatusCode::CONFLICT,
                            axum::Json(
                                json!({ "message": "The execution \"2\" is running already." }),
                            ),
                        ),
                        _ => (
                            StatusCode::NOT_FOUND,
                            axum::Json(
                                json!({ "message": "The requested webhook is not registered." }),
                            ),
                        ),
                    }
                },
            ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, bodies)
}

fn call(with: Value, checkpoint: Option<Value>, now: i64) -> StepCall {
    StepCall {
        with,
        secrets: Default::default(),
        reads_run_data: Vec::new(),
        checkpoint,
        idempotency_key: "run-1:ask".into(),
        job_id: None,
        run_id: "run-1".into(),
        step_id: "ask".into(),
        attempt: 1,
        now,
        log: Default::default(),
        artifacts: Default::default(),
        vars: serde_json::Value::Null,
        usage: Default::default(),
    }
}

fn public(url: &str) -> N8nUrls {
    N8nUrls {
        public: Some(url.into()),
        ..N8nUrls::default()
    }
}

fn parked(outcome: StepOutcome) -> (Option<i64>, Value) {
    match outcome {
        StepOutcome::Park { until, checkpoint } => (until, checkpoint),
        other => panic!("expected the step to park, got {other:?}"),
    }
}

#[tokio::test]
async fn without_wait_the_step_succeeds_with_the_answer_of_n8n() {
    let (n8n, bodies) = fake_n8n().await;
    let with = json!({ "url": format!("{n8n}/webhook/flow"), "input": { "q": 1 } });
    let outcome = N8n::new(N8nUrls::default())
        .run(call(with, None, 0))
        .await
        .unwrap();
    assert_eq!(outcome, StepOutcome::Output(json!({ "rows": 7 })));
    assert_eq!(
        *bodies.lock().unwrap(),
        vec![json!({ "run_id": "run-1", "step_id": "ask", "input": { "q": 1 } })]
    );
}

#[tokio::test]
async fn a_waiting_step_stores_its_token_then_calls_n8n_then_waits_until_its_deadline() {
    let (n8n, bodies) = fake_n8n().await;
    let step = N8n::new(public("https://switchyard.example/"));
    let with = json!({ "url": format!("{n8n}/webhook/flow"), "wait": true, "timeout": "10s" });

    let (until, first) = parked(step.run(call(with.clone(), None, 1_000)).await.unwrap());
    assert_eq!(
        until,
        Some(1_000),
        "the token is stored before n8n hears of it"
    );
    assert!(bodies.lock().unwrap().is_empty());
    let secret = first["callback_token"].as_str().unwrap().to_owned();
    assert_eq!(secret.len(), 32);

    let (until, waiting) = parked(
        step.run(call(with.clone(), Some(first), 1_005))
            .await
            .unwrap(),
    );
    assert_eq!(
        until,
        Some(11_000),
        "the deadline counts from the first call"
    );
    let sent = bodies.lock().unwrap()[0].clone();
    assert_eq!(
        sent["callback"],
        json!({
            "url": "https://switchyard.example/api/webhooks/n8n",
            "token": format!("run-1.ask.{secret}"),
        })
    );

    // Woken early (nothing to read yet): wait on. Woken at the deadline: time out, retryably.
    let (until, _) = parked(
        step.run(call(with.clone(), Some(waiting.clone()), 5_000))
            .await
            .unwrap(),
    );
    assert_eq!(until, Some(11_000));
    let late = step
        .run(call(with.clone(), Some(waiting.clone()), 11_000))
        .await
        .unwrap_err();
    assert!(late.retryable && late.message.contains("10s"), "{late:?}");
    assert_eq!(bodies.lock().unwrap().len(), 1, "n8n is called once");

    let mut answered = waiting.clone();
    answered["callback"] = json!({ "output": { "total": 3 } });
    let outcome = step
        .run(call(with.clone(), Some(answered), 6_000))
        .await
        .unwrap();
    assert_eq!(outcome, StepOutcome::Output(json!({ "total": 3 })));
    let mut failed = waiting.clone();
    failed["callback"] = json!({ "error": "sheet not found" });
    let error = step
        .run(call(with.clone(), Some(failed), 6_000))
        .await
        .unwrap_err();
    assert!(
        error.retryable && error.message.contains("sheet not found"),
        "{error:?}"
    );

    // A new attempt starts over under a new token.
    let mut retry = call(with, Some(waiting), 20_000);
    retry.attempt = 2;
    let (until, fresh) = parked(step.run(retry).await.unwrap());
    assert_eq!(until, Some(20_000));
    assert_ne!(fresh["callback_token"].as_str().unwrap(), secret);
}

#[tokio::test]
async fn a_waiting_step_without_a_public_address_fails_and_calls_nothing() {
    let (n8n, bodies) = fake_n8n().await;
    let with = json!({ "url": format!("{n8n}/webhook/flow"), "wait": true });
    let error = N8n::new(N8nUrls::default())
        .run(call(with, None, 0))
        .await
        .unwrap_err();
    assert!(
        !error.retryable && error.message.contains("--public-url"),
        "{error:?}"
    );
    assert!(bodies.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_webhook_path_is_called_under_the_n8n_url_and_without_it_the_error_names_the_flag() {
    let (n8n, bodies) = fake_n8n().await;
    let with = json!({ "webhook": "flow", "input": { "q": 2 } });
    let step = N8n::new(N8nUrls {
        n8n: Some(format!("{n8n}/")),
        public: None,
    });
    let outcome = step.run(call(with.clone(), None, 0)).await.unwrap();
    assert_eq!(outcome, StepOutcome::Output(json!({ "rows": 7 })));
    assert_eq!(bodies.lock().unwrap()[0]["input"], json!({ "q": 2 }));

    let error = N8n::new(N8nUrls::default())
        .run(call(with, None, 0))
        .await
        .unwrap_err();
    assert!(
        !error.retryable && error.message.contains("--n8n-url"),
        "{error:?}"
    );
    let both = json!({ "webhook": "flow", "url": format!("{n8n}/webhook/flow") });
    let error = step.run(call(both, None, 0)).await.unwrap_err();
    assert!(error.message.contains("exactly one of"), "{error:?}");
    assert_eq!(bodies.lock().unwrap().len(), 1, "nothing more was called");
}

#[tokio::test]
async fn a_relative_callback_url_is_given_to_n8n_under_the_public_url() {
    let (n8n, bodies) = fake_n8n().await;
    let step = N8n::new(public("https://switchyard.example"));
    let with = json!({
        "url": format!("{n8n}/webhook/flow"),
        "wait": true,
        "callback_url": "/api/webhooks/n8n",
    });
    let (_, stored) = parked(step.run(call(with.clone(), None, 0)).await.unwrap());
    parked(step.run(call(with, Some(stored), 1)).await.unwrap());
    assert_eq!(
        bodies.lock().unwrap()[0]["callback"]["url"],
        "https://switchyard.example/api/webhooks/n8n"
    );
}

#[tokio::test]
async fn resuming_a_wait_node_gives_its_answer_and_names_what_409_and_404_mean() {
    let (n8n, _) = fake_n8n().await;
    let step = N8n::new(N8nUrls::default());
    let resume = |execution: u32| json!({ "resume_url": format!("{n8n}/webhook-waiting/{execution}"), "input": { "ok": true } });
    let outcome = step.run(call(resume(1), None, 0)).await.unwrap();
    assert_eq!(
        outcome,
        StepOutcome::Output(json!({ "resumed_with": { "ok": true } }))
    );
    let running = step.run(call(resume(2), None, 0)).await.unwrap_err();
    assert!(
        running.retryable && running.message.contains("not waiting in a Wait node"),
        "{running:?}"
    );
    let gone = step.run(call(resume(3), None, 0)).await.unwrap_err();
    assert!(
        !gone.retryable && gone.message.contains("nothing waits at this resume URL"),
        "{gone:?}"
    );
}

#[tokio::test]
async fn a_target_from_run_data_may_not_reach_loopback_nor_leave_the_webhook_path() {
    let (n8n, bodies) = fake_n8n().await;
    let step = N8n::new(N8nUrls {
        n8n: Some(n8n.clone()),
        public: None,
    });
    for (field, with) in [
        (
            "resume_url",
            json!({ "resume_url": format!("{n8n}/webhook-waiting/1") }),
        ),
        ("url", json!({ "url": format!("{n8n}/webhook/flow") })),
    ] {
        let mut from_input = call(with, None, 0);
        from_input.reads_run_data = vec![field.to_owned()];
        let error = step.run(from_input).await.unwrap_err();
        assert!(!error.retryable, "{field}: {error:?}");
    }
    for path in ["../rest/workflows", "flow/../../x", "a//b", "flow?x=1"] {
        let error = step
            .run(call(json!({ "webhook": path }), None, 0))
            .await
            .unwrap_err();
        assert!(
            error.message.contains("not a Webhook trigger's path"),
            "{path}: {error:?}"
        );
    }
    assert!(bodies.lock().unwrap().is_empty(), "nothing reached n8n");
    // A path from run data goes to the n8n the operator named, wherever that is.
    let mut path_from_input = call(json!({ "webhook": "flow" }), None, 0);
    path_from_input.reads_run_data = vec!["webhook".to_owned()];
    step.run(path_from_input).await.unwrap();
}
