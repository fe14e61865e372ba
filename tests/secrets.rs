//! Secrets on the real binary: whatever a definition does to a secret in a template, no output,
//! error or log holds it or a transform of it; it reaches the wire only through the fields a
//! step kind sends it in; and nothing a run shows depends on whether a guess was right.

mod common;

use common::{Sandbox, count, start_counter, step};

/// Letters no id, time or nonce of a run contains (those are digits and a-f).
const PIN: &str = "Qz8Wx";

/// Forms a template could turn the PIN into.
const FORMS: &[&str] = &["Qz8Wx", "QZ8WX", "qz8wx", "xW8zQ", "Qz8", "8Wx", "UXo4V3g"];

fn definitions(base: &str) -> String {
    let transform = |id: &str, output: &str| {
        format!(
            "  {id}:\n    steps:\n      - {{id: s, type: transform, with: {{output: \"{output}\"}}}}\n"
        )
    };
    let mut yaml = String::from("workflows:\n");
    for (id, output) in [
        ("plain", "{{ secrets.pin }}"),
        ("upper", "{{ secrets.pin | upper }}"),
        ("reversed", "{{ secrets.pin | reverse }}"),
        ("sliced", "{{ secrets.pin[0:2] }}"),
        ("concat_sliced", "{{ (secrets.pin ~ '')[2:] }}"),
        ("replaced", "{{ secrets.pin | replace('1', 'Q') }}"),
        ("escaped", "{{ secrets.pin | escape }}"),
        ("whole_map", "{{ secrets }}"),
        ("debugged", "{{ debug() }}"),
        ("echo", "{{ input.guess }}"),
    ] {
        yaml.push_str(&transform(id, output));
    }
    yaml.push_str(&format!(
        "  in_query:\n    steps:\n      - {{id: s, type: http, with: {{url: \"{base}/query\", \
         query: {{pin: \"{{{{ secrets.pin }}}}\"}}}}}}\n  \
         in_header:\n    steps:\n      - {{id: s, type: http, with: {{url: \"{base}/header\", \
         headers: {{X-Pin: \"{{{{ secrets.pin }}}}\"}}}}}}\n"
    ));
    yaml
}

#[test]
fn no_output_error_or_log_holds_a_secret_or_a_transform_of_one() {
    let (base, hits) = start_counter();
    let mut sandbox = Sandbox::new("secrets", &definitions(&base));
    sandbox
        .env
        .push(("SWITCHYARD_SECRET_PIN".into(), PIN.into()));
    sandbox.serve();
    let run = |workflow: &str, input: &str| {
        let out = sandbox.output_within(&["run", workflow, "--wait", "--input", input]);
        let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        (out.status.code(), sandbox.show(&id))
    };
    let mut shown = String::new();
    // A reference, whole or with its characters kept, is refused where it would be stored.
    for workflow in ["plain", "upper", "escaped", "in_query"] {
        let (code, detail) = run(workflow, "{}");
        assert_eq!(code, Some(1), "{workflow} must fail: {detail:#}");
        let error = step(&detail, "s")["error"].as_str().unwrap().to_owned();
        assert!(error.contains("uses a secret"), "{workflow}: {error}");
        shown.push_str(&detail.to_string());
    }
    // Cut or mangled, it is a fragment of a reference: text that holds no secret.
    for workflow in [
        "reversed",
        "sliced",
        "concat_sliced",
        "replaced",
        "whole_map",
        "debugged",
    ] {
        let (_, detail) = run(workflow, "{}");
        shown.push_str(&detail.to_string());
    }
    assert_eq!(
        count(&hits, "query"),
        0,
        "a secret in a query is never sent"
    );
    let (code, detail) = run("in_header", "{}");
    assert_eq!(code, Some(0), "{detail:#}");
    assert_eq!(count(&hits, "header"), 1);
    shown.push_str(&detail.to_string());

    let logs = sandbox.server_logs();
    for form in FORMS {
        assert!(!shown.contains(form), "a run shows {form:?}: {shown}");
        assert!(!logs.contains(form), "the log holds {form:?}: {logs}");
    }

    // A right guess and a wrong one come back alike: no oracle.
    for guess in [PIN, "0000"] {
        let (code, detail) = run("echo", &format!("{{\"guess\": \"{guess}\"}}"));
        assert_eq!(code, Some(0));
        assert_eq!(step(&detail, "s")["output"], guess, "{detail:#}");
    }
}
