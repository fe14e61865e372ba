//! `switchyard import-n8n` through the real binary, on exports made by a real n8n 2.8.4 (the
//! fixtures were imported into n8n and exported again with `n8n export:workflow`): each
//! becomes a definition that loads, with a report, and one runs as the n8n workflow did.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::{Sandbox, step};
use serde_json::{Value, json};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/n8n")
        .join(name)
}

/// Imports `name` into `definitions/<stem>.yaml` of the sandbox; returns the definition as a
/// value and the report.
fn import(sandbox: &Sandbox, name: &str) -> (Value, String) {
    let stem = name.trim_end_matches(".json");
    let out = sandbox.dir.join(format!("definitions/{stem}.yaml"));
    let done = run(
        sandbox,
        &[
            "import-n8n",
            fixture(name).to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
    );
    assert!(done.status.success(), "{}", text(&done.stderr));
    let yaml = std::fs::read_to_string(&out).unwrap();
    let definition: Value = serde_saphyr::from_str(&yaml).unwrap();
    (definition, text(&done.stderr))
}

fn run(sandbox: &Sandbox, args: &[&str]) -> Output {
    sandbox.command().args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn row<'r>(report: &'r str, node: &str) -> &'r str {
    report
        .lines()
        .find(|l| l.starts_with(node))
        .unwrap_or_else(|| panic!("no line for {node} in\n{report}"))
}

#[test]
fn five_real_exports_become_definitions_that_load_with_a_report_of_each_node() {
    let sandbox = Sandbox::new(
        "import-n8n",
        "id: enrich_leads\nsteps: [{id: a, type: noop}]\n",
    );

    let (chain, report) = import(&sandbox, "schedule_http_chain.json");
    assert_eq!(
        chain["schedule"],
        json!({"cron": "15 */2 * * *", "timezone": "Europe/Berlin"})
    );
    assert_eq!(chain["steps"][0]["type"], "http");
    assert_eq!(
        chain["steps"][0]["retry"],
        json!({"max_retries": 3, "backoff": "fixed", "initial": "2000ms"})
    );
    assert_eq!(chain["steps"][0]["with"]["query"], json!({"region": "eu"}));
    assert_eq!(
        chain["steps"][1]["with"]["body"]["first"],
        "{{ steps.fetch_prices.output.body.items[0].sku }}"
    );
    assert!(row(&report, "Post summary").contains("credential is not carried over"));

    let (router, report) = import(&sandbox, "webhook_if.json");
    assert_eq!(
        router["triggers"][0]["webhook"],
        json!({"path": "orders", "auth": "none", "public": true, "respond": {"wait": "30s"}})
    );
    assert_eq!(
        router["steps"][0]["when"],
        "{{ (input.body.amount > 100) }}"
    );
    assert_eq!(
        router["steps"][1]["when"],
        "{{ (not (input.body.amount > 100)) }}"
    );
    assert_eq!(router["steps"][1]["continue_on_error"], true);
    assert!(row(&report, "Big order?").contains("`when`"));

    let (caller, report) = import(&sandbox, "sub_workflow.json");
    assert_eq!(caller["timeout"], "600s");
    assert_eq!(
        caller["steps"][0]["with"]["workflows"],
        json!(["enrich_leads"])
    );
    assert!(row(&report, "Enrich").contains("import that workflow too"));

    let (waits, report) = import(&sandbox, "wait_node.json");
    let kinds: Vec<&str> = waits["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["sleep", "http", "wait", "transform"]);
    assert_eq!(waits["steps"][0]["with"]["duration"], "5m");
    assert_eq!(waits["triggers"][0]["webhook"]["auth"], "bearer");
    assert!(row(&report, "Request").contains("webhook key"));

    let (sheet, report) = import(&sandbox, "unsupported.json");
    assert_eq!(sheet["steps"][0]["type"], "n8n");
    assert!(row(&report, "Read sheet").contains("stays in n8n"));
    assert!(row(&report, "Shout").contains("not translated"));
    assert!(row(&report, "Daily").contains("only its first rule"));

    // Everything imported loads together, as `serve` would load it.
    let checked = run(&sandbox, &["validate"]);
    assert!(checked.status.success(), "{}", text(&checked.stderr));
}

#[test]
fn what_is_not_an_n8n_export_is_refused_and_named() {
    let sandbox = Sandbox::new("import-n8n-bad", "id: a\nsteps: [{id: a, type: noop}]\n");
    for (file, content, says) in [
        ("garbage.json", "garbage{", "not JSON"),
        (
            "other.json",
            r#"{"openapi": "3.0.0"}"#,
            "not an n8n workflow export",
        ),
    ] {
        let path = sandbox.dir.join(file);
        std::fs::write(&path, content).unwrap();
        let done = run(&sandbox, &["import-n8n", path.to_str().unwrap()]);
        assert!(!done.status.success());
        let stderr = text(&done.stderr);
        assert!(stderr.contains(file) && stderr.contains(says), "{stderr}");
        assert!(done.stdout.is_empty());
    }
}

#[tokio::test]
async fn an_imported_webhook_and_if_run_as_they_did_in_n8n() {
    let mut sandbox = Sandbox::new("import-n8n-run", "id: a\nsteps: [{id: a, type: noop}]\n");
    import(&sandbox, "webhook_if.json");
    let base = sandbox.serve_api(&[]);
    let answer: Value = reqwest::Client::new()
        .post(format!("{base}/api/hooks/orders"))
        .json(&json!({"amount": 150, "id": "o-9"}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(answer["status"], "succeeded", "{answer}");
    let run = sandbox.show(answer["run_id"].as_str().unwrap());
    assert_eq!(
        step(&run, "big_order")["output"],
        json!({"label": "big", "order": {"id": "o-9"}})
    );
    assert_eq!(step(&run, "small_order")["state"], "skipped", "{run}");
}
