//! The `http` step kind against real servers on 127.0.0.1: where it may send requests, what a
//! redirect to another origin keeps, and how secrets reach the wire.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Redirect};
use axum::routing::get;
use serde_json::{Value, json};
use switchyard_engine::definition::{Secrets, TemplateContext, render_value};
use switchyard_workers::steps::Http;
use switchyard_workers::{EgressPolicy, StepCall, StepKind, StepOutcome};

type Seen = Arc<Mutex<Vec<HeaderMap>>>;

/// `/seen` records its request's headers; `/hop?to=URL` redirects there (302).
async fn server() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let kept = seen.clone();
    let app = axum::Router::new()
        .route(
            "/seen",
            get(move |headers: HeaderMap| {
                kept.lock().unwrap().push(headers);
                async { axum::Json(json!({ "ok": true })) }
            }),
        )
        .route(
            "/echo",
            get(|headers: HeaderMap| async move {
                let seen: serde_json::Map<String, Value> = headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), Value::from(v.to_str().unwrap_or_default())))
                    .collect();
                axum::Json(Value::Object(seen))
            }),
        )
        .route(
            "/broken",
            get(|| async {
                let page = format!(
                    "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">\n<TITLE>502 Bad Gateway: \
                     upstream   refused</TITLE><style>{}</style></head>\n<body>...</body></html>",
                    "body { margin: 0 }".repeat(2_000)
                );
                (
                    axum::http::StatusCode::BAD_GATEWAY,
                    [("content-type", "text/html; charset=utf-8")],
                    page,
                )
            }),
        )
        .route(
            "/refuse",
            get(|headers: HeaderMap| async move {
                let key = headers["x-api-key"].to_str().unwrap_or_default().to_owned();
                (
                    axum::http::StatusCode::FORBIDDEN,
                    format!("key   {key}   is not valid"),
                )
            }),
        )
        .route(
            "/plain",
            get(|| async {
                (
                    axum::http::StatusCode::BAD_REQUEST,
                    format!("field `name`\n  is missing {}", "x".repeat(100_000)),
                )
            }),
        )
        .route(
            "/hop",
            get(
                |axum::extract::Query(q): axum::extract::Query<BTreeMap<String, String>>| async move {
                    Redirect::to(&q["to"]).into_response()
                },
            ),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (base, seen)
}

/// A call with `with` rendered as the worker renders it, with the secret `token`.
fn call(with: Value, reads_run_data: &[&str]) -> StepCall {
    let secrets = Secrets::new(BTreeMap::from([("token".to_owned(), "tok-123".to_owned())]));
    let ctx = TemplateContext {
        secrets: secrets.clone(),
        ..TemplateContext::default()
    };
    StepCall {
        reads_run_data: reads_run_data.iter().map(|f| (*f).to_owned()).collect(),
        ..StepCall::first_attempt(render_value(&with, &ctx).unwrap(), secrets)
    }
}

fn policy(allow: &[&str], deny: &[&str]) -> Http {
    Http::with_policy(Arc::new(EgressPolicy {
        allow: allow.iter().map(|d| d.parse().unwrap()).collect(),
        deny: deny.iter().map(|d| d.parse().unwrap()).collect(),
    }))
}

#[tokio::test]
async fn a_url_from_the_run_input_may_not_reach_loopback_unless_allowed() {
    let (base, seen) = server().await;
    let localhost = base.replace("127.0.0.1", "localhost");
    for url in [format!("{base}/seen"), format!("{localhost}/seen")] {
        let err = Http::new()
            .run(call(json!({ "url": url }), &["url"]))
            .await
            .unwrap_err();
        assert_eq!(err.kind, "egress", "{err}");
        assert!(!err.retryable);
        assert!(err.message.contains("loopback"), "{err}");
    }
    assert!(seen.lock().unwrap().is_empty(), "nothing was sent");
    // Written by the definition's author, or allowed by the operator: sent.
    Http::new()
        .run(call(json!({ "url": format!("{base}/seen") }), &[]))
        .await
        .unwrap();
    policy(&["127.0.0.1"], &[])
        .run(call(json!({ "url": format!("{base}/seen") }), &["url"]))
        .await
        .unwrap();
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_redirect_from_input_to_loopback_is_refused() {
    let (base, seen) = server().await;
    let (other, _) = server().await;
    // The first hop is allowed by name; the second, to a loopback address, is not.
    let url = format!(
        "{}/hop?to={base}/seen",
        other.replace("127.0.0.1", "localhost")
    );
    let err = policy(&["localhost"], &[])
        .run(call(json!({ "url": url }), &["url"]))
        .await
        .unwrap_err();
    assert_eq!(err.kind, "egress", "{err}");
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn deny_rules_bind_every_step() {
    let (base, seen) = server().await;
    let err = policy(&[], &["127.0.0.0/8"])
        .run(call(json!({ "url": format!("{base}/seen") }), &[]))
        .await
        .unwrap_err();
    assert_eq!(err.kind, "egress", "{err}");
    assert!(err.message.contains("--egress-deny 127.0.0.0/8"), "{err}");
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn secrets_reach_the_wire_only_through_headers_and_auth() {
    let (base, seen) = server().await;
    let outcome = Http::new()
        .run(call(
            json!({
                "url": format!("{base}/seen"),
                "headers": { "X-Api-Key": "key {{ secrets.token }}" },
                "auth": { "basic": { "username": "ann", "password": "{{ secrets.token }}" } },
            }),
            &[],
        ))
        .await
        .unwrap();
    let headers = seen.lock().unwrap().pop().unwrap();
    assert_eq!(headers["x-api-key"], "key tok-123");
    // base64("ann:tok-123")
    assert_eq!(headers["authorization"], "Basic YW5uOnRvay0xMjM=");
    let StepOutcome::Output(output) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(!output.to_string().contains("tok-123"), "{output}");
}

#[tokio::test]
async fn a_secret_changed_by_a_template_is_never_sent() {
    let (base, seen) = server().await;
    let err = Http::new()
        .run(call(
            json!({
                "url": format!("{base}/seen"),
                "headers": { "X-Api-Key": "{{ secrets.token | upper }}" },
            }),
            &[],
        ))
        .await
        .unwrap_err();
    assert!(err.message.contains("changed by a template"), "{err}");
    assert!(!err.retryable);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_redirect_to_another_origin_drops_every_header_that_carried_a_secret() {
    let (first, first_seen) = server().await;
    let (second, second_seen) = server().await;
    let with = |to: &str| {
        json!({
            "url": format!("{first}/hop?to={to}/seen"),
            "headers": { "X-Api-Key": "{{ secrets.token }}", "X-Plain": "visible" },
            "auth": { "bearer": "{{ secrets.token }}" },
        })
    };
    // Loopback is fine for a URL the author wrote; a redirect's target counts as chosen by the
    // server, so this test allows it.
    let http = policy(&["127.0.0.1"], &[]);
    http.run(call(with(&second), &[])).await.unwrap();
    let crossed = second_seen.lock().unwrap().pop().unwrap();
    assert_eq!(crossed["x-plain"], "visible");
    assert!(crossed.get("x-api-key").is_none(), "{crossed:?}");
    assert!(crossed.get("authorization").is_none(), "{crossed:?}");
    // To the same origin, the request keeps them.
    http.run(call(with(&first), &[])).await.unwrap();
    let kept = first_seen.lock().unwrap().pop().unwrap();
    assert_eq!(kept["x-api-key"], "tok-123");
    assert_eq!(kept["authorization"], "Bearer tok-123");
}

#[tokio::test]
async fn a_redirect_from_an_authors_url_to_loopback_is_refused_unless_allowed() {
    let (first, _) = server().await;
    let (second, seen) = server().await;
    let url = format!("{first}/hop?to={second}/seen");
    let err = Http::new()
        .run(call(json!({ "url": url }), &[]))
        .await
        .unwrap_err();
    assert_eq!(err.kind, "egress", "{err}");
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_url_from_run_data_gets_secrets_only_on_a_host_the_operator_allows_by_name() {
    let (base, seen) = server().await;
    let with = |host: &str| {
        json!({
            "url": format!("{}/seen", base.replace("127.0.0.1", host)),
            "headers": { "X-Api-Key": "{{ secrets.token }}" },
        })
    };
    // The address is allowed, so a URL without secrets would go; the name is not, and the
    // secret goes only to a host allowed by name.
    let http = policy(&["127.0.0.1"], &[]);
    let err = http
        .run(call(with("localhost"), &["url"]))
        .await
        .unwrap_err();
    assert_eq!(err.kind, "egress", "{err}");
    assert!(err.message.contains("secrets"), "{err}");
    assert!(seen.lock().unwrap().is_empty());
    http.run(call(with("127.0.0.1"), &["url"])).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_failed_answer_is_quoted_in_one_short_line_and_an_html_page_by_its_title() {
    let (base, _) = server().await;
    let failure = |path: &str| {
        let url = format!("{base}{path}");
        async move {
            Http::new()
                .run(call(json!({ "url": url }), &[]))
                .await
                .unwrap_err()
        }
    };
    let page = failure("/broken").await;
    assert!(
        page.message
            .ends_with("HTTP 502 Bad Gateway: 502 Bad Gateway: upstream refused"),
        "{}",
        page.message
    );
    assert!(page.retryable);
    let plain = failure("/plain").await;
    assert!(
        plain
            .message
            .contains("HTTP 400 Bad Request: field `name` is missing xxx"),
        "{}",
        plain.message
    );
    assert!(plain.message.ends_with("x..."), "{}", plain.message);
    assert!(plain.message.len() < 400, "{}", plain.message);
    assert!(!plain.retryable);
}

#[tokio::test]
async fn a_secret_echoed_in_a_refusal_is_redacted_before_the_excerpt_folds_its_spaces() {
    let (base, _) = server().await;
    let secrets = Secrets::new(BTreeMap::from([(
        "spaced".to_owned(),
        "tok  with  spaces".to_owned(),
    )]));
    let ctx = TemplateContext {
        secrets: secrets.clone(),
        ..TemplateContext::default()
    };
    let with = json!({
        "url": format!("{base}/refuse"),
        "headers": { "X-Api-Key": "{{ secrets.spaced }}" },
    });
    let call = StepCall::first_attempt(render_value(&with, &ctx).unwrap(), secrets);
    let failure = Http::new().run(call).await.unwrap_err();
    assert!(
        failure
            .message
            .ends_with("HTTP 403 Forbidden: key [secret] is not valid"),
        "{}",
        failure.message
    );
}

#[tokio::test]
async fn what_a_service_echoes_of_the_sent_secrets_is_not_kept() {
    let (base, _) = server().await;
    let call = call(
        json!({
            "url": format!("{base}/echo"),
            "headers": { "X-Api-Key": "key {{ secrets.token }}", "X-Plain": "visible" },
            "auth": { "basic": { "username": "ann", "password": "{{ secrets.token }}" } },
        }),
        &[],
    );
    let secrets = call.secrets.clone();
    let outcome = Http::new().run(call).await.unwrap();
    let StepOutcome::Output(mut output) = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        output.to_string().contains("tok-123"),
        "the service echoed it"
    );
    // What the worker does with every step's output and error before it is kept.
    secrets.redact_sent(&mut output);
    let kept = output.to_string();
    for sent in ["tok-123", "YW5uOnRvay0xMjM="] {
        assert!(!kept.contains(sent), "{sent} in {kept}");
    }
    assert_eq!(output["body"]["x-api-key"], "[secret]");
    assert_eq!(output["body"]["authorization"], "[secret]");
    assert_eq!(output["body"]["x-plain"], "visible");
}

#[tokio::test]
async fn a_signed_request_carries_an_hmac_of_the_exact_bytes_it_sends() {
    type Got = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;
    let got: Got = Arc::default();
    let kept = got.clone();
    let app = axum::Router::new().route(
        "/signed",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            kept.lock().unwrap().push((headers, body.to_vec()));
            async { axum::Json(json!({ "ok": true })) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let with = |body: Value, headers: Value| {
        json!({
            "method": "POST",
            "url": format!("{base}/signed"),
            "headers": headers,
            "body": body,
            "auth": { "hmac": {
                "secret": "{{ secrets.token }}",
                "header": "X-Signature",
                "algorithm": "sha512",
                "encoding": "base64",
                "prefix": "v1=",
            } },
        })
    };
    let http = Http::new();
    let out = http
        .run(call(with(json!({ "b": 1, "a": [1, 2] }), json!({})), &[]))
        .await
        .unwrap();
    assert!(matches!(out, StepOutcome::Output(_)));
    // A string under a Content-Type other than JSON goes as it is.
    http.run(call(
        with(
            json!("name=ann&city=paris"),
            json!({ "Content-Type": "application/x-www-form-urlencoded" }),
        ),
        &[],
    ))
    .await
    .unwrap();
    let got = got.lock().unwrap();
    let expect = |body: &[u8]| {
        use base64::Engine as _;
        use hmac::Mac as _;
        let mut mac = hmac::Hmac::<sha2::Sha512>::new_from_slice(b"tok-123").unwrap();
        mac.update(body);
        format!(
            "v1={}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        )
    };
    let (headers, body) = &got[0];
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        serde_json::from_slice::<Value>(body).unwrap(),
        json!({ "b": 1, "a": [1, 2] })
    );
    assert_eq!(headers["x-signature"], expect(body).as_str());
    let (headers, body) = &got[1];
    assert_eq!(body, b"name=ann&city=paris");
    assert_eq!(headers["content-type"], "application/x-www-form-urlencoded");
    assert_eq!(headers["x-signature"], expect(body).as_str());
}

#[tokio::test]
async fn an_api_key_header_from_auth_is_sent_and_never_echoed_back() {
    let (base, _) = server().await;
    let call = call(
        json!({
            "url": format!("{base}/echo"),
            "auth": { "header": { "name": "X-Api-Key", "value": "{{ secrets.token }}" } },
        }),
        &[],
    );
    let secrets = call.secrets.clone();
    let out = Http::new().run(call).await.unwrap();
    let StepOutcome::Output(mut out) = out else {
        panic!("{out:?}")
    };
    assert_eq!(
        out["body"]["x-api-key"], "tok-123",
        "the server saw the key"
    );
    // What the worker does with every step's output and error before it is kept.
    secrets.redact_sent(&mut out);
    assert_eq!(out["body"]["x-api-key"], "[secret]", "{out:#}");
}

#[tokio::test]
async fn a_form_file_naming_an_artifact_that_does_not_exist_fails_for_good_and_sends_nothing() {
    let (base, seen) = server().await;
    let dir = std::env::temp_dir().join(format!("switchyard-form-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = switchyard_engine::store::connect(&format!("sqlite://{}/s.db", dir.display()))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let mut upload = call(
        json!({
            "method": "POST",
            "url": format!("{base}/seen"),
            "multipart": { "files": [{ "name": "file", "artifact": { "artifact": { "id": "no-such-file" } } }] },
        }),
        &[],
    );
    upload.artifacts = switchyard_workers::artifacts::AttemptArtifacts::new(Some(Arc::new(
        switchyard_engine::artifacts::Artifacts::in_memory(store, 1 << 20),
    )));
    let err = Http::new().run(upload).await.unwrap_err();
    assert!(!err.retryable, "{err:?}");
    assert_eq!(err.kind, "artifact_not_found");
    assert!(err.message.contains("\"no-such-file\""), "{err:?}");
    assert!(seen.lock().unwrap().is_empty());
    // Both a body and a form is a mistake, named.
    let both = Http::new()
        .run(call(
            json!({ "url": format!("{base}/seen"), "body": {}, "multipart": { "fields": { "a": "b" } } }),
            &[],
        ))
        .await
        .unwrap_err();
    assert!(
        both.message.contains("one of `body` and `multipart`"),
        "{both:?}"
    );
    let _ = std::fs::remove_dir_all(dir);
}
