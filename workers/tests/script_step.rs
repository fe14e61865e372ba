//! The `script` step kind on real interpreters: what goes in, what comes out, what it may see,
//! and that nothing it starts outlives its attempt.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard_engine::definition::{Secrets, TemplateContext, render_value};
use switchyard_workers::{Registry, StepCall, StepOutcome};

/// A call with `with` rendered as the worker renders it, with the secret `token`.
fn call(with: Value) -> StepCall {
    let secrets = Secrets::new(BTreeMap::from([("token".to_owned(), "tok-123".to_owned())]));
    let ctx = TemplateContext {
        secrets: secrets.clone(),
        ..TemplateContext::default()
    };
    StepCall::first_attempt(render_value(&with, &ctx).unwrap(), secrets)
}

async fn run(with: Value) -> Result<Value, switchyard_engine::state::StepFailure> {
    let registry = Registry::builtin().allowing_scripts();
    match registry.get("script").unwrap().run(call(with)).await? {
        StepOutcome::Output(output) => Ok(output),
        other => panic!("a script answers with output, not {other:?}"),
    }
}

#[tokio::test]
async fn a_script_reads_its_input_and_its_last_json_line_is_the_output() {
    let output = run(json!({
        "run": "python3",
        "code": "import json, sys\ndata = json.load(sys.stdin)\nprint('thinking...')\nprint(json.dumps({'words': len(data['text'].split())}))\nprint('done')\n",
        "input": { "text": "one two three" }
    }))
    .await
    .unwrap();
    assert_eq!(output, json!({ "words": 3 }));
    let nothing = run(json!({ "run": "sh", "code": "echo no json here" }))
        .await
        .unwrap();
    assert_eq!(nothing, Value::Null);
}

#[tokio::test]
async fn a_failing_script_fails_the_attempt_with_the_end_of_what_it_printed_to_stderr() {
    let failure = run(json!({
        "run": "bash",
        "code": "echo starting >&2\necho 'KeyError: price' >&2\nexit 3\n"
    }))
    .await
    .unwrap_err();
    assert!(failure.retryable, "{failure:?}");
    assert!(
        failure.message.contains("exited with status 3")
            && failure.message.contains("KeyError: price"),
        "{failure:?}"
    );
    let missing = run(json!({ "run": "no-such-interpreter", "code": "x" }))
        .await
        .unwrap_err();
    assert!(!missing.retryable, "{missing:?}");
    assert!(
        missing.message.contains("no-such-interpreter"),
        "{missing:?}"
    );
}

#[tokio::test]
async fn a_script_sees_only_the_variables_it_names_and_secrets_never_come_back() {
    let output = run(json!({
        "run": "sh",
        "code": "printf '{\"names\": \"%s\", \"token\": \"%s\"}\\n' \"$(env | cut -d= -f1 | sort | tr '\\n' ' ')\" \"$API_TOKEN\"",
        "env": { "API_TOKEN": "{{ secrets.token }}", "REGION": "eu" }
    }))
    .await
    .unwrap();
    let names: Vec<&str> = output["names"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .collect();
    for name in &names {
        assert!(
            [
                "API_TOKEN",
                "HOME",
                "LANG",
                "PATH",
                "PWD",
                "REGION",
                "SHLVL",
                "_",
                "OLDPWD"
            ]
            .contains(name),
            "the script saw {name}: {names:?}"
        );
    }
    assert!(names.contains(&"API_TOKEN") && names.contains(&"REGION"));
    assert_eq!(
        output["token"], "[secret]",
        "the secret went in, and not back out"
    );
}

#[tokio::test]
async fn a_script_whose_attempt_ends_early_is_killed_with_everything_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let script = run(json!({
        "run": "bash",
        "code": format!("sleep 300 &\necho $! > {}\nwait\n", pid_file.display())
    }));
    // The step's timeout, or a cancel: the attempt's future is dropped while the script runs.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), script)
            .await
            .is_err()
    );
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut gone = false;
    for _ in 0..50 {
        // `kill -0` fails once the process has been reaped or is a zombie of init.
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| !stat.contains(") Z "))
            .unwrap_or(false);
        if !alive {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gone,
        "the script's background `sleep` ({pid}) outlived its attempt"
    );
}

#[tokio::test]
async fn code_is_never_a_template() {
    let mut call = call(json!({ "run": "sh", "code": "echo {}" }));
    call.reads_run_data = vec!["code".into()];
    let failure = Registry::builtin()
        .allowing_scripts()
        .get("script")
        .unwrap()
        .run(call)
        .await
        .unwrap_err();
    assert!(failure.message.contains("written out"), "{failure:?}");
}

#[tokio::test]
async fn a_worker_runs_no_script_unless_its_operator_allows_it() {
    let failure = Registry::builtin()
        .get("script")
        .unwrap()
        .run(call(json!({ "run": "sh", "code": "echo hi" })))
        .await
        .unwrap_err();
    assert!(!failure.retryable);
    assert!(failure.message.contains("--allow-scripts"), "{failure:?}");
}

#[tokio::test]
async fn a_script_is_given_no_variable_that_changes_what_runs() {
    for name in [
        "BASH_ENV",
        "LD_PRELOAD",
        "PATH",
        "NODE_OPTIONS",
        "PYTHONPATH",
        "1BAD",
        "A-B",
    ] {
        let failure = run(json!({ "run": "sh", "code": "echo hi", "env": { name: "x" } }))
            .await
            .unwrap_err();
        assert!(
            failure
                .message
                .contains("not a variable a script may be given"),
            "{name}: {failure:?}"
        );
    }
}

#[tokio::test]
async fn a_script_that_leaves_something_running_ends_when_it_exits() {
    let started = std::time::Instant::now();
    let output = tokio::time::timeout(
        Duration::from_secs(20),
        run(json!({ "run": "sh", "code": "sleep 300 &\necho '{\"left\": true}'\n" })),
    )
    .await
    .expect("the step ended")
    .unwrap();
    assert_eq!(output, json!({ "left": true }));
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn a_secret_over_several_lines_is_redacted_whole_in_the_log() {
    let secrets = Secrets::new(BTreeMap::from([(
        "pem".to_owned(),
        "-----BEGIN KEY-----\nAAAA\n-----END KEY-----".to_owned(),
    )]));
    let ctx = TemplateContext {
        secrets: secrets.clone(),
        ..TemplateContext::default()
    };
    let with = json!({ "run": "sh", "code": "echo \"$KEY\"\necho done", "env": { "KEY": "{{ secrets.pem }}" } });
    let mut call = call(json!({}));
    call.with = render_value(&with, &ctx).unwrap();
    call.secrets = secrets;
    let log = call.log.clone();
    log.redact_with(call.secrets.clone());
    Registry::builtin()
        .allowing_scripts()
        .get("script")
        .unwrap()
        .run(call)
        .await
        .unwrap();
    assert!(
        log.take_live().is_none(),
        "no line is stored before the stream can be redacted whole"
    );
    let lines: Vec<String> = log.take().into_iter().map(|l| l.text).collect();
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("AAAA") || l.contains("BEGIN")),
        "{lines:?}"
    );
    assert!(lines.contains(&"[secret]".to_owned()), "{lines:?}");
}

#[tokio::test]
async fn lines_stored_while_a_script_runs_are_redacted_and_not_stored_again() {
    let secrets = Secrets::new(BTreeMap::from([("token".to_owned(), "s3cr3t".to_owned())]));
    let ctx = TemplateContext {
        secrets: secrets.clone(),
        ..TemplateContext::default()
    };
    let with = json!({ "run": "sh", "code": "echo \"token=$T\"\nsleep 30", "env": { "T": "{{ secrets.token }}" } });
    let mut call = call(json!({}));
    call.with = render_value(&with, &ctx).unwrap();
    call.secrets = secrets;
    let log = call.log.clone();
    log.redact_with(call.secrets.clone());
    let registry = Registry::builtin().allowing_scripts();
    let script = registry.get("script").unwrap().run(call);
    tokio::pin!(script);
    let live = loop {
        tokio::select! {
            _ = &mut script => panic!("the script ended early"),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        if let Some(lines) = log.take_live() {
            break lines;
        }
    };
    let texts: Vec<&str> = live.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["token=[secret]"]);
    assert!(log.take().is_empty(), "each line is handed out once");
}

#[tokio::test]
async fn what_a_script_printed_before_its_step_timed_out_is_kept() {
    let call = call(json!({ "run": "sh", "code": "echo before\nsleep 30\necho after" }));
    let log = call.log.clone();
    let registry = Registry::builtin().allowing_scripts();
    let script = registry.get("script").unwrap().run(call);
    assert!(
        tokio::time::timeout(Duration::from_secs(2), script)
            .await
            .is_err()
    );
    let lines: Vec<String> = log.take().into_iter().map(|l| l.text).collect();
    assert_eq!(lines, ["before"]);
}
