//! The CLI as a user meets it: failures, timeouts, cancellation and bad input, on the real binary.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::{Sandbox, last_line, start_counter, step};

#[test]
fn failed_run_exits_non_zero_after_its_retries() {
    let (base, _hits) = start_counter();
    let mut sandbox = Sandbox::new(
        "fail",
        &format!(
            "id: broken\nretry: {{max_retries: 1, initial: 50ms}}\nsteps:\n  - {{id: call, type: http, with: {{url: \"{base}/status/503\"}}}}\n"
        ),
    );
    sandbox.serve();
    let out = sandbox.output_within(&["run", "broken", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let run = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let detail = sandbox.show(&run);
    assert_eq!(detail["status"], "failed");
    let call = step(&detail, "call");
    assert_eq!(call["attempt"], 2);
    assert!(call["error"].as_str().unwrap().contains("503"), "{call}");
    assert_eq!(call["attempts"].as_array().unwrap().len(), 2);
}

#[test]
fn client_error_is_not_retried() {
    let (base, _hits) = start_counter();
    let mut sandbox = Sandbox::new(
        "notfound",
        &format!(
            "id: missing\nretry: {{max_retries: 3, initial: 50ms}}\nsteps:\n  - {{id: call, type: http, with: {{url: \"{base}/status/404\"}}}}\n"
        ),
    );
    sandbox.serve();
    let out = sandbox.output_within(&["run", "missing", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let run = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(step(&sandbox.show(&run), "call")["attempt"], 1);
}

#[test]
fn cancel_stops_a_running_step_and_ends_run_wait_with_code_3() {
    let (base, _hits) = start_counter();
    let mut sandbox = Sandbox::new(
        "cancel",
        &format!(
            "id: hang\nsteps:\n  - {{id: call, type: http, with: {{url: \"{base}/hang/x\"}}}}\n"
        ),
    );
    sandbox.serve();
    let mut waiter = sandbox
        .command()
        .args(["run", "hang", "--wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut run = String::new();
    BufReader::new(waiter.stdout.take().unwrap())
        .read_line(&mut run)
        .unwrap();
    let run = run.trim().to_owned();
    sandbox.wait_for("the step to start", || {
        step(&sandbox.show(&run), "call")["state"] == "running"
    });
    sandbox.cli(&["cancel", &run]);
    let detail = sandbox.show(&run);
    assert_eq!(detail["status"], "cancelled");
    assert_eq!(step(&detail, "call")["state"], "cancelled");
    let mut code = None;
    sandbox.wait_for("run --wait to end", || {
        code = waiter.try_wait().unwrap().map(|s| s.code());
        code.is_some()
    });
    assert_eq!(code, Some(Some(3)));
}

#[test]
fn step_timeout_fails_the_attempt() {
    let (base, _hits) = start_counter();
    let mut sandbox = Sandbox::new(
        "steptimeout",
        &format!(
            "id: slowstep\nretry: {{max_retries: 0}}\nsteps:\n  - {{id: call, type: http, timeout: 300ms, with: {{url: \"{base}/hang/y\"}}}}\n"
        ),
    );
    sandbox.serve();
    let out = sandbox.output_within(&["run", "slowstep", "--wait"]);
    assert_eq!(out.status.code(), Some(1));
    let run = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let call = step(&sandbox.show(&run), "call").clone();
    assert!(
        call["error"].as_str().unwrap().contains("timed out"),
        "{call}"
    );
}

#[test]
fn run_timeout_marks_the_run_timed_out() {
    let mut sandbox = Sandbox::new(
        "runtimeout",
        "id: long\ntimeout: 1s\nsteps:\n  - {id: rest, type: sleep, with: {duration: 30s}}\n",
    );
    sandbox.serve();
    let out = sandbox.output_within(&["run", "long", "--wait"]);
    assert_eq!(out.status.code(), Some(4));
    let run = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(sandbox.show(&run)["status"], "timed_out");
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let sandbox = Sandbox::new(
        "badinput",
        "id: fine\ninput_schema: {properties: {n: {type: integer}}}\nsteps:\n  - {id: a, type: noop}\n",
    );
    for (args, expected) in [
        (
            vec!["run", "fine", "--input", r#"{"n": "seven"}"#],
            "does not satisfy its input_schema: at /n:",
        ),
        (
            vec!["run", "fine", "--input", "[1]"],
            "must be a JSON object",
        ),
        (vec!["run", "fine", "--input", "{oops"], "not valid JSON"),
        (vec!["run", "ghost"], "unknown workflow"),
        (vec!["show", "no-such-run"], "unknown run"),
        (vec!["cancel", "no-such-run"], "unknown run"),
        (vec!["signal", "no-such-run", "go"], "unknown run"),
        (
            vec![
                "run",
                "fine",
                "--priority",
                "-101",
                "--input",
                r#"{"n": 1}"#,
            ],
            "priority -101 is out of range",
        ),
        (
            vec!["signal", "no-such-run", "go", "--payload", "{oops"],
            "--payload is not valid JSON",
        ),
        (vec!["pause", "ghost"], "unknown workflow"),
    ] {
        let out = sandbox.command().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    assert_eq!(sandbox.cli(&["runs", "--json"]).trim(), "[]");
}

#[test]
fn invalid_definition_stops_serve_and_lists_every_error() {
    let sandbox = Sandbox::new(
        "invalid",
        "id: bad\nsteps:\n  - {id: a, type: teleport}\n  - {id: b, type: noop, needs: [nowhere]}\n",
    );
    std::fs::write(
        sandbox.dir.join("definitions/other.yaml"),
        "id: other\nschedule: \"not a cron\"\nsteps:\n  - {id: a, type: noop}\n",
    )
    .unwrap();
    let out = sandbox
        .command()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in ["test.yaml:3:", "teleport", "nowhere", "other.yaml:2:"] {
        assert!(stderr.contains(needle), "missing {needle:?} in {stderr}");
    }
    let validate = sandbox.command().arg("validate").output().unwrap();
    assert_eq!(validate.status.code(), Some(1));
}

#[test]
fn fanout_demo_aggregates_seven_children() {
    let mut sandbox = Sandbox::shipped("fanout", "fanout_demo.yaml");
    sandbox.serve();
    let out = sandbox.output_within(&["run", "fanout_demo", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let detail = sandbox.show(&run);
    assert_eq!(detail["output"]["aggregate"]["children"], 7);
    assert_eq!(
        detail["output"]["aggregate"]["results"][0]["report"],
        "amazon_influencer-item"
    );
    // `show` lists what the run started, and each step's output.
    let shown = sandbox.cli(&["show", &run]);
    let children: Vec<&str> = shown
        .lines()
        .skip_while(|l| *l != "child runs")
        .filter(|l| l.contains("fanout_child") && l.contains("succeeded"))
        .collect();
    assert_eq!(children.len(), 7, "{shown}");
    assert!(shown.contains("      output: {"), "{shown}");
}

#[test]
fn output_to_a_reader_that_went_away_ends_quietly() {
    let sandbox = Sandbox::new("pipe", "id: fine\nsteps:\n  - {id: a, type: noop}\n");
    // `switchyard schema | head -1`, with the reader gone before the first write.
    let mut child = sandbox
        .command()
        .arg("schema")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A schedule every second that never fires during the test's setup, with a step that stays
/// running (a durable sleep), so a run of it is active until cancelled.
const TICKING: &str = "\
id: ticking
schedule: {cron: \"* * * * * *\", timezone: UTC, catch_up: none}
steps:
  - {id: nap, type: sleep, with: {duration: 1h}}
";

#[test]
fn a_removed_workflow_stops_firing_and_serve_warns_about_a_schedule_without_its_file() {
    let mut sandbox = Sandbox::new("remove", TICKING);
    sandbox.serve();
    sandbox.wait_for("a fire", || {
        sandbox.cli(&["fires", "--json"]).contains("run_id\": \"")
    });
    // Its file goes; a new start says the schedule still fires from the database.
    sandbox.kill_all();
    std::fs::remove_file(sandbox.dir.join("definitions/test.yaml")).unwrap();
    std::fs::write(
        sandbox.dir.join("definitions/other.yaml"),
        "id: other\nsteps:\n  - {id: a, type: noop}\n",
    )
    .unwrap();
    sandbox.serve();
    sandbox.wait_for("the warning", || {
        sandbox
            .server_logs()
            .contains("no definition file provides this scheduled workflow")
    });
    // Runs of it are going: removing it needs --force.
    let refused = sandbox
        .command()
        .args(["remove", "ticking"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        why.contains("have not ended") && why.contains("--force"),
        "{why}"
    );
    sandbox.cli(&["remove", "ticking", "--force"]);
    let fires = |s: &Sandbox| {
        serde_json::from_str::<serde_json::Value>(&s.cli(&["fires", "--json"]))
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    let after_removal = fires(&sandbox);
    std::thread::sleep(std::time::Duration::from_millis(2_500));
    assert_eq!(fires(&sandbox), after_removal, "no fire after removal");
    let unknown = sandbox.command().args(["run", "ticking"]).output().unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("unknown workflow"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
}

#[test]
fn the_triage_example_branches_loops_and_runs_its_failure_handler() {
    let mut sandbox = Sandbox::shipped("triage", "triage.yaml");
    sandbox.serve();

    // No item scores high: the approval is skipped with its reason, and publish runs anyway.
    let out = sandbox.output_within(&["run", "triage", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let detail = sandbox.show(&run);
    let approve = step(&detail, "approve");
    assert_eq!(approve["state"], "skipped");
    assert!(
        approve["skipped_reason"]
            .as_str()
            .is_some_and(|r| r.contains("rendered false")),
        "{approve}"
    );
    assert_eq!(step(&detail, "report")["state"], "skipped");
    assert_eq!(detail["output"]["publish"]["scored"], 2);

    // An item without a score fails its child run: the failure handler reads the run's error.
    let out = sandbox.output_within(&[
        "run",
        "triage",
        "--wait",
        "--input",
        r#"{"items": [{"name": "a"}]}"#,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let run = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let detail = sandbox.show(&run);
    assert_eq!(detail["status"], "failed");
    let report = step(&detail, "report");
    assert_eq!(report["state"], "succeeded");
    assert!(
        report["output"]["failed"]
            .as_str()
            .is_some_and(|e| e.starts_with("step score_each failed")),
        "{report}"
    );
}

#[test]
fn run_wait_names_its_database_and_says_when_no_worker_takes_the_run() {
    let sandbox = Sandbox::new("noworker", "id: lonely\nsteps:\n  - {id: a, type: noop}\n");
    let mut waiter = sandbox
        .command()
        .args(["run", "lonely", "--wait"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(waiter.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let told = loop {
        let Some(line) = lines.next() else {
            break false;
        };
        let line = line.unwrap();
        seen.push(line.clone());
        if line.contains("no worker has taken this run") {
            break true;
        }
    };
    waiter.kill().unwrap();
    waiter.wait().unwrap();
    assert!(told, "no notice in:\n{}", seen.join("\n"));
    let file = sandbox.dir.join("switchyard.db");
    assert!(
        seen.iter()
            .any(|l| l.starts_with("waiting for run") && l.contains(&*file.to_string_lossy())),
        "the database is not named:\n{}",
        seen.join("\n")
    );
}

#[test]
fn a_command_that_creates_a_new_database_file_says_where() {
    let sandbox = Sandbox::new("newfile", "id: x\nsteps:\n  - {id: a, type: noop}\n");
    let out = sandbox.command().args(["runs"]).output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = sandbox.dir.join("switchyard.db");
    assert!(
        stderr.contains("created a new, empty database")
            && stderr.contains(&*file.to_string_lossy()),
        "{stderr}"
    );
    let again = sandbox.command().args(["runs"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&again.stderr).contains("created a new"),
        "an existing file is not new"
    );
}

#[test]
fn connection_errors_name_their_cause_and_the_url_as_typed() {
    let sandbox = Sandbox::new("badurl", "id: x\nsteps:\n  - {id: a, type: noop}\n");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let refused = format!("postgres://someone:hunter2@127.0.0.1:{port}/test");
    let path = sandbox.dir.join("x.db").display().to_string();
    for (url, cause) in [
        (refused.as_str(), "connection refused"),
        (
            "postgres://postgres@no-such-host.invalid/test",
            "unknown host",
        ),
        (path.as_str(), "not a database URL"),
    ] {
        let started = std::time::Instant::now();
        let out = sandbox
            .command()
            .args(["--database", url, "runs"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(cause), "{url}: {stderr}");
        assert!(
            !stderr.contains("hunter2"),
            "the password is shown: {stderr}"
        );
        let shown = url.replace("hunter2", "***");
        assert!(stderr.contains(&shown), "{shown} is not echoed: {stderr}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "{url} took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn workflows_lists_versions_schedules_and_next_fires_in_the_chosen_zone() {
    let sandbox = Sandbox::new(
        "workflows",
        "id: nightly\nschedule: {cron: \"0 3 * * *\", timezone: Europe/Paris}\nsteps:\n  - {id: a, type: noop}\n",
    );
    sandbox.cli(&["migrate"]);
    // `run` installs the definitions; the run itself is not what this test looks at.
    sandbox.cli(&["run", "nightly"]);
    let listed = sandbox.cli(&["--utc", "workflows"]);
    let row = listed
        .lines()
        .find(|l| l.starts_with("nightly"))
        .unwrap_or_else(|| panic!("{listed}"));
    assert!(row.contains("0 3 * * * (Europe/Paris)"), "{listed}");
    assert!(
        row.contains(":00:00 UTC") && row.ends_with("active"),
        "{listed}"
    );
    assert_eq!(
        listed.lines().filter(|l| l.contains(":00:00 UTC")).count(),
        3,
        "three next fires: {listed}"
    );
    sandbox.cli(&["pause", "nightly"]);
    let paused = sandbox.cli(&["workflows"]);
    let row = paused.lines().find(|l| l.starts_with("nightly")).unwrap();
    assert!(
        row.ends_with("paused") && !paused.contains(":00:00"),
        "{paused}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&sandbox.cli(&["workflows", "--json"])).unwrap();
    assert_eq!(json[0]["id"], "nightly");
    assert_eq!(json[0]["paused"], true);
}

#[test]
fn a_unique_start_of_a_run_id_names_the_run_and_an_ambiguous_one_is_refused() {
    let sandbox = Sandbox::new("prefix", "id: quick\nsteps:\n  - {id: a, type: noop}\n");
    let first = last_line(&sandbox.cli(&["run", "quick"]));
    let second = last_line(&sandbox.cli(&["run", "quick"]));
    let common = first
        .chars()
        .zip(second.chars())
        .take_while(|(a, b)| a == b)
        .count();
    let unique = &first[..common + 1];
    let shown = sandbox.cli(&["show", unique]);
    assert!(shown.starts_with(&format!("run       {first}")), "{shown}");
    let out = sandbox
        .command()
        .args(["show", &first[..common]])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("more than one run") && stderr.contains(&first) && stderr.contains(&second),
        "{stderr}"
    );
    sandbox.cli(&["cancel", unique]);
    assert_eq!(sandbox.show(&first)["status"], "cancelled");
}

#[tokio::test]
async fn serve_names_a_stored_definition_whose_with_its_kind_no_longer_takes() {
    let mut sandbox = Sandbox::new(
        "stored-with",
        "id: old\nsteps:\n  - {id: shape, type: transform, with: {output: 1}}\n",
    );
    sandbox.cli(&["migrate"]);
    sandbox.cli(&["run", "old"]);
    // As stored by a version that took anything in `with`, and not in a file any more.
    let pool = sqlx::SqlitePool::connect(&sandbox.database).await.unwrap();
    sqlx::query(
        "UPDATE workflow_versions SET definition = \
         json_set(definition, '$.steps[0].with', json('{\"outptu\": 1}'))",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    std::fs::remove_file(sandbox.dir.join("definitions/test.yaml")).unwrap();
    sandbox.serve();
    sandbox.wait_for("serve to name the stored step", || {
        let logs = sandbox.server_logs();
        logs.contains("transform step: `with` takes no key `outptu`") && logs.contains("step=shape")
    });
}

#[test]
fn logs_show_what_each_step_printed_without_its_secrets() {
    let (base, _hits) = start_counter();
    let mut sandbox = Sandbox::new(
        "logs",
        &format!(
            "id: printed
steps:
  - id: fetch
    type: http
    with: {{ url: \"{base}/status/200\" }}
  - id: count
    type: script
    needs: [fetch]
    with:
      run: sh
      env: {{ TOKEN: \"{{{{ secrets.token }}}}\" }}
      code: |
        echo \"counting with $TOKEN\"
        echo 'a warning' >&2
        word=abc
        echo \"length ${{#word}} {{{{ as written }}}}\"
        echo '{{\"n\": 3}}'
"
        ),
    );
    sandbox
        .env
        .push(("SWITCHYARD_SECRET_TOKEN".into(), "tok-9f8e7d".into()));
    sandbox
        .env
        .push(("SWITCHYARD_ALLOW_SCRIPTS".into(), "true".into()));
    sandbox.serve();
    let out = sandbox.output_within(&["run", "printed", "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let logs = sandbox.cli(&["logs", &run]);
    assert!(logs.contains("fetch#1 info | GET "), "{logs}");
    assert!(logs.contains("HTTP 200 OK in"), "{logs}");
    assert!(
        logs.contains("count#1 stdout | counting with [secret]"),
        "{logs}"
    );
    assert!(logs.contains("count#1 stderr | a warning"), "{logs}");
    // Code is taken as written: `${#word}` is the shell's, `{{ }}` is no template.
    assert!(
        logs.contains("count#1 stdout | length 3 {{ as written }}"),
        "{logs}"
    );
    assert!(
        !logs.contains("tok-9f8e7d"),
        "a secret reached the log: {logs}"
    );
    let only = sandbox.cli(&["logs", &run, "--step", "count"]);
    assert!(
        !only.contains("fetch#1") && only.contains("count#1"),
        "{only}"
    );
    assert_eq!(step(&sandbox.show(&run), "count")["output"]["n"], 3);
}
