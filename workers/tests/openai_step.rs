//! The `openai` step against a local server that answers as OpenAI's API documents it
//! (`POST /v1/chat/completions`, `POST /v1/images/generations`, its error objects): what the
//! step sends, what its output holds, and which failures are worth another attempt.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use serde_json::{Value, json};
use switchyard_engine::artifacts::Artifacts;
use switchyard_engine::definition::{Secrets, TemplateContext, render_value};
use switchyard_workers::artifacts::AttemptArtifacts;
use switchyard_workers::steps::OpenAi;
use switchyard_workers::{StepCall, StepKind, StepOutcome};

type Seen = Arc<Mutex<Vec<(HeaderMap, Value)>>>;

/// A PNG's first bytes: what the server sends back as the image.
const IMAGE: &[u8] = b"\x89PNG\r\n\x1a\nnot really an image";

async fn chat(State(seen): State<Seen>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    seen.lock().unwrap().push((headers, body.clone()));
    let prompt = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    let error = |status: u16, headers: Vec<(&'static str, &'static str)>, error: Value| {
        let mut response = (
            StatusCode::from_u16(status).unwrap(),
            Json(json!({ "error": error })),
        )
            .into_response();
        for (k, v) in headers {
            response.headers_mut().insert(k, v.parse().unwrap());
        }
        response
    };
    match prompt.as_str() {
        "slow down" => error(
            429,
            vec![("retry-after", "7")],
            json!({ "message": "Rate limit reached for gpt-4o-mini", "type": "requests", "param": null, "code": "rate_limit_exceeded" }),
        ),
        "no money" => error(
            429,
            vec![],
            json!({ "message": "You exceeded your current quota, please check your plan and billing details.", "type": "insufficient_quota", "param": null, "code": "insufficient_quota" }),
        ),
        "forbidden" => error(
            400,
            vec![],
            json!({ "message": "Your request was rejected as a result of our safety system.", "type": "invalid_request_error", "param": null, "code": "content_policy_violation" }),
        ),
        "wrong key" => error(
            401,
            vec![],
            json!({ "message": "Incorrect API key provided: sk-test-123. You can find your API key at https://platform.openai.com/account/api-keys.", "type": "invalid_request_error", "param": null, "code": "invalid_api_key" }),
        ),
        "down" => (StatusCode::BAD_GATEWAY, "upstream down").into_response(),
        _ => {
            let content = if body["response_format"]["type"] == "json_object" {
                r#"{"title": "Ten microphones", "score": 9}"#.to_owned()
            } else {
                format!("You said: {prompt}")
            };
            Json(json!({
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1_780_000_000u32,
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [{
                    "index": 0,
                    "message": { "role": "assistant", "content": content, "refusal": null },
                    "logprobs": null,
                    "finish_reason": "stop"
                }],
                "usage": { "prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20 }
            }))
            .into_response()
        }
    }
}

async fn images(State(seen): State<Seen>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    seen.lock().unwrap().push((headers, body.clone()));
    let n = body["n"].as_u64().unwrap_or(1);
    let data: Vec<Value> = (0..n)
        .map(|_| json!({ "b64_json": base64::engine::general_purpose::STANDARD.encode(IMAGE) }))
        .collect();
    Json(json!({
        "created": 1_780_000_000u32,
        "data": data,
        "output_format": "png",
        "usage": { "input_tokens": 10, "output_tokens": 100, "total_tokens": 110,
                   "input_tokens_details": { "text_tokens": 10, "image_tokens": 0 } }
    }))
    .into_response()
}

async fn server() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/images/generations", post(images))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, seen)
}

/// A call rendered as the worker renders it, with the secret `openai_api_key`.
fn call(with: Value, vars: Value) -> StepCall {
    let secrets = Secrets::new(BTreeMap::from([(
        "openai_api_key".to_owned(),
        "sk-test-123".to_owned(),
    )]));
    let ctx = TemplateContext {
        secrets: secrets.clone(),
        vars: vars.clone(),
        ..TemplateContext::default()
    };
    StepCall {
        vars,
        ..StepCall::first_attempt(render_value(&with, &ctx).unwrap(), secrets)
    }
}

async fn output(call: StepCall) -> Value {
    match OpenAi::default().run(call).await.unwrap() {
        StepOutcome::Output(v) => v,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_chat_in_json_mode_sends_the_documented_request_and_outputs_the_parsed_answer() {
    let (base, seen) = server().await;
    let out = output(call(
        json!({
            "base_url": base,
            "system": "You write listicles.",
            "prompt": "Rank microphones",
            "model": "gpt-4o-mini",
            "temperature": 0.2,
            "max_tokens": 300,
            "json": true,
        }),
        Value::Null,
    ))
    .await;
    assert_eq!(
        out["json"],
        json!({ "title": "Ten microphones", "score": 9 })
    );
    assert_eq!(out["usage"]["total_tokens"], 20);
    assert_eq!(out["finish_reason"], "stop");
    let (headers, body) = seen.lock().unwrap()[0].clone();
    assert_eq!(headers["authorization"], "Bearer sk-test-123");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert_eq!(body["response_format"], json!({ "type": "json_object" }));
    assert_eq!(body["max_completion_tokens"], 300);
    assert!((body["temperature"].as_f64().unwrap() - 0.2).abs() < 1e-6);
    assert_eq!(
        body["messages"],
        json!([
            { "role": "system", "content": "You write listicles." },
            { "role": "user", "content": "Rank microphones" }
        ])
    );
}

#[tokio::test]
async fn the_base_url_comes_from_vars_when_the_step_names_none() {
    let (base, seen) = server().await;
    let out = output(call(
        json!({ "messages": [{ "role": "user", "content": "hello" }] }),
        json!({ "openai_base_url": base }),
    ))
    .await;
    assert_eq!(out["text"], "You said: hello");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

async fn failure(prompt: &str) -> switchyard_engine::state::StepFailure {
    let (base, _) = server().await;
    let call = call(json!({ "base_url": base, "prompt": prompt }), Value::Null);
    let secrets = call.secrets.clone();
    let mut failure = OpenAi::default().run(call).await.unwrap_err();
    // What the worker does with every error before it is kept.
    let mut message = Value::String(failure.message);
    secrets.redact_sent(&mut message);
    failure.message = message.as_str().unwrap().to_owned();
    failure
}

#[tokio::test]
async fn a_rate_limit_is_retried_after_its_retry_after_and_a_spent_quota_is_not() {
    let limited = failure("slow down").await;
    assert!(limited.retryable, "{limited:?}");
    assert_eq!(limited.kind, "rate_limited");
    assert_eq!(limited.retry_after, Some(Duration::from_secs(7)));
    let spent = failure("no money").await;
    assert!(!spent.retryable, "{spent:?}");
    assert_eq!(spent.kind, "insufficient_quota");
    assert!(
        spent.message.contains("You exceeded your current quota"),
        "{spent:?}"
    );
    let down = failure("down").await;
    assert!(down.retryable, "{down:?}");
}

#[tokio::test]
async fn a_refused_request_fails_for_good_with_openais_message_and_never_the_key() {
    let refused = failure("forbidden").await;
    assert!(!refused.retryable);
    assert_eq!(refused.kind, "content_policy");
    assert!(
        refused
            .message
            .contains("rejected as a result of our safety system"),
        "{refused:?}"
    );
    let wrong = failure("wrong key").await;
    assert!(!wrong.retryable);
    assert!(!wrong.message.contains("sk-test-123"), "{wrong:?}");
    assert!(
        wrong
            .message
            .contains("Incorrect API key provided: [secret]"),
        "{wrong:?}"
    );
}

#[tokio::test]
async fn bad_parameters_fail_for_good_naming_what_is_wrong() {
    let (base, _) = server().await;
    for (with, says) in [
        (json!({ "base_url": base }), "one of `prompt`, `messages`"),
        (
            json!({ "base_url": base, "prompt": 3 }),
            "`with`: invalid type",
        ),
        (
            json!({ "base_url": base, "prompt": "x", "image": { "prompt": "y" } }),
            "no `prompt` or `messages` beside it",
        ),
        (
            json!({ "base_url": base, "messages": [{ "role": "robot", "content": "x" }] }),
            "unknown variant `robot`",
        ),
    ] {
        let err = OpenAi::default()
            .run(call(with.clone(), Value::Null))
            .await
            .unwrap_err();
        assert!(!err.retryable, "{with}: {err:?}");
        assert!(err.message.contains(says), "{with}: {err:?}");
    }
    let keyless = StepCall::first_attempt(
        json!({ "base_url": base, "prompt": "x" }),
        Secrets::default(),
    );
    let err = OpenAi::default().run(keyless).await.unwrap_err();
    assert!(
        err.message.contains("set the secret openai_api_key"),
        "{err:?}"
    );
}

#[tokio::test]
async fn generated_images_are_kept_as_artifacts() {
    let (base, seen) = server().await;
    let dir = std::env::temp_dir().join(format!("switchyard-openai-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = switchyard_engine::store::connect(&format!("sqlite://{}/store.db", dir.display()))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let artifacts = AttemptArtifacts::new(Some(Arc::new(Artifacts::in_memory(store, 1 << 20))));
    let mut call = call(
        json!({ "base_url": base, "image": { "prompt": "a microphone", "size": "1024x1024", "n": 2 } }),
        Value::Null,
    );
    call.artifacts = artifacts.clone();
    let out = output(call).await;
    let images = out["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    use sha2::Digest as _;
    assert_eq!(
        images[0]["artifact"]["sha256"],
        hex::encode(sha2::Sha256::digest(IMAGE))
    );
    assert_eq!(images[0]["artifact"]["content_type"], "image/png");
    assert_eq!(out["usage"]["total_tokens"], 110);
    assert_eq!(
        artifacts.take_saved().len(),
        2,
        "both go with the completion"
    );
    let (_, body) = seen.lock().unwrap()[0].clone();
    assert_eq!(body["model"], "gpt-image-1");
    assert_eq!(body["size"], "1024x1024");
    assert_eq!(body["n"], 2);
    let _ = std::fs::remove_dir_all(dir);
}
