//! A huge answer costs the `http` step no more memory than its body limit: it reads in chunks
//! and stops at the limit. Peak memory is read from the kernel, so this file holds one test.

use axum::body::Body;
use axum::routing::get;
use serde_json::json;
use switchyard_workers::steps::Http;
use switchyard_workers::{StepCall, StepKind};

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn call(url: String) -> StepCall {
    StepCall::first_attempt(json!({ "url": url }), Default::default())
}

#[tokio::test]
async fn a_300_mb_answer_is_refused_within_bounded_memory() {
    const CHUNK: usize = 1024 * 1024;
    // 300 chunks of 1 MiB, streamed without a length, and the same with one.
    let streamed = || {
        let chunks = (0..300).map(|_| Ok::<_, std::io::Error>(vec![b'x'; CHUNK]));
        Body::from_stream(futures::stream::iter(chunks))
    };
    let app = axum::Router::new()
        .route("/stream", get(move || async move { streamed() }))
        .route(
            "/sized",
            get(|| async {
                (
                    [(
                        axum::http::header::CONTENT_LENGTH,
                        (300 * CHUNK).to_string(),
                    )],
                    Body::from_stream(futures::stream::iter(
                        (0..300).map(|_| Ok::<_, std::io::Error>(vec![b'x'; CHUNK])),
                    )),
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let before = peak_rss_kib();
    for path in ["stream", "sized"] {
        let err = Http::new()
            .run(call(format!("{base}/{path}")))
            .await
            .unwrap_err();
        assert_eq!(err.kind, "response_too_large", "{err}");
        assert!(!err.retryable);
    }
    let grown_mib = (peak_rss_kib() - before) / 1024;
    assert!(grown_mib <= 32, "peak memory grew by {grown_mib} MiB");
}
