//! Artifacts on the real binary: a file a step downloads is kept in an S3 bucket (moto's
//! server), sent on as a multipart file, and served by the API; one over the limit is refused.

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::Multipart;
use axum::routing::{get, post};
use common::{Sandbox, last_line, serve_in_thread, step};
use serde_json::json;
use sha2::Digest as _;

/// One part of a form the upload server received: name, file name, content type, bytes.
type Received = Arc<Mutex<Vec<(String, Option<String>, Option<String>, Vec<u8>)>>>;

/// `/audio` answers `audio` as `audio/mpeg`; `/big` answers 2 MiB of `application/pdf`;
/// `/upload` keeps the parts of a multipart form and answers as Pinata's `pinFileToIPFS` does.
fn file_server(audio: Vec<u8>) -> (String, Received) {
    let received: Received = Arc::default();
    let kept = received.clone();
    let app = Router::new()
        .route(
            "/audio",
            get(move || {
                let audio = audio.clone();
                async move { ([("content-type", "audio/mpeg")], audio) }
            }),
        )
        .route(
            "/big",
            get(|| async { ([("content-type", "application/pdf")], vec![7u8; 2 << 20]) }),
        )
        .route(
            "/upload",
            post(move |mut form: Multipart| {
                let kept = kept.clone();
                async move {
                    while let Some(field) = form.next_field().await.unwrap() {
                        let name = field.name().unwrap_or_default().to_owned();
                        let file = field.file_name().map(str::to_owned);
                        let kind = field.content_type().map(str::to_owned);
                        let bytes = field.bytes().await.unwrap().to_vec();
                        kept.lock().unwrap().push((name, file, kind, bytes));
                    }
                    axum::Json(json!({ "IpfsHash": "QmTest", "PinSize": 1 }))
                }
            }),
        );
    (serve_in_thread(app), received)
}

fn viewer_token(sandbox: &Sandbox) -> String {
    last_line(&sandbox.cli(&["token", "create", "--role", "viewer", "--ttl", "1h"]))
}

#[test]
fn a_downloaded_file_is_kept_in_a_bucket_sent_on_as_a_form_file_and_served_by_the_api() {
    let Some(s3) = switchyard_engine::testing::s3_server() else {
        return;
    };
    // Bytes that are no text: what an ElevenLabs answer looks like to the step.
    let audio: Vec<u8> = (0..300_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let (base, received) = file_server(audio.clone());
    let mut sandbox = Sandbox::new(
        "artifacts-s3",
        &format!(
            "id: podcast
steps:
  - id: speak
    type: http
    with: {{ url: \"{base}/audio\" }}
  - id: pin
    type: http
    needs: [speak]
    with:
      method: POST
      url: \"{base}/upload\"
      multipart:
        fields: {{ pinataMetadata: {{ name: episode }} }}
        files:
          - {{ name: file, artifact: \"{{{{ steps.speak.output.body }}}}\", filename: episode.mp3 }}
          - {{ name: notes, text: \"show notes {{{{ input.n }}}}\", filename: notes.txt }}
"
        ),
    );
    sandbox.env = s3
        .env()
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect();
    let api = sandbox.serve_api(&["--artifacts", "s3://artifacts/switchyard"]);
    let out = sandbox.output_within(&["run", "podcast", "--wait", "--input", r#"{"n": 7}"#]);
    let run = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "{}\n{:#}\n{}",
        String::from_utf8_lossy(&out.stderr),
        sandbox.show(&run),
        sandbox.server_logs()
    );
    let detail = sandbox.show(&run);
    let kept = &step(&detail, "speak")["output"]["body"]["artifact"];
    let sha256 = hex::encode(sha2::Sha256::digest(&audio));
    assert_eq!(kept["sha256"], sha256, "{detail:#}");
    assert_eq!(kept["size"], audio.len());
    assert_eq!(kept["content_type"], "audio/mpeg");
    assert_eq!(step(&detail, "pin")["output"]["body"]["IpfsHash"], "QmTest");

    // The form carried the field, the stored file and the text file.
    let parts = received.lock().unwrap().clone();
    let part = |name: &str| parts.iter().find(|p| p.0 == name).unwrap().clone();
    assert_eq!(part("pinataMetadata").3, br#"{"name":"episode"}"#);
    let file = part("file");
    assert_eq!(file.1.as_deref(), Some("episode.mp3"));
    assert_eq!(file.2.as_deref(), Some("audio/mpeg"));
    assert!(
        file.3 == audio,
        "the uploaded file differs from the stored one"
    );
    let notes = part("notes");
    assert_eq!(
        (notes.1.as_deref(), notes.3.as_slice()),
        (Some("notes.txt"), &b"show notes 7"[..])
    );

    // The bucket holds it under its hash; the API serves it to a viewer, as a file.
    let listing = reqwest::blocking::get(format!("{}/artifacts?list-type=2", s3.endpoint))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        listing.contains(&format!("switchyard/sha256/{sha256}")),
        "{listing}"
    );
    let token = viewer_token(&sandbox);
    let client = reqwest::blocking::Client::new();
    let got = client
        .get(format!(
            "{api}/api/artifacts/{}",
            kept["id"].as_str().unwrap()
        ))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.headers()["content-type"], "audio/mpeg");
    assert_eq!(got.headers()["x-content-type-options"], "nosniff");
    assert_eq!(got.headers()["x-artifact-sha256"], sha256.as_str());
    assert!(got.bytes().unwrap().to_vec() == audio);
    let missing = client
        .get(format!("{api}/api/artifacts/0000"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(missing.status(), 404);
    let anonymous = client
        .get(format!(
            "{api}/api/artifacts/{}",
            kept["id"].as_str().unwrap()
        ))
        .send()
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

#[test]
fn an_answer_over_the_artifact_limit_fails_its_step_for_good_and_keeps_nothing() {
    let (base, _) = file_server(Vec::new());
    let mut sandbox = Sandbox::new(
        "artifacts-limit",
        &format!(
            "id: big\nretry: {{max_retries: 3, initial: 50ms}}\nsteps:\n  - {{id: fetch, type: http, with: {{url: \"{base}/big\"}}}}\n"
        ),
    );
    sandbox.serve_api(&["--artifacts", "files", "--artifact-max-mib", "1"]);
    let out = sandbox.output_within(&["run", "big", "--wait"]);
    assert!(!out.status.success());
    let run = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let detail = sandbox.show(&run);
    let fetch = step(&detail, "fetch");
    assert_eq!(
        fetch["attempt"], 1,
        "a file too large is not retried: {detail:#}"
    );
    let error = fetch["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("over the artifact limit of 1048576 bytes"),
        "{detail:#}"
    );
    let stored: Vec<_> = walk(&sandbox.dir.join("files"));
    assert!(stored.is_empty(), "{stored:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}
