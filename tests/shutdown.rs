//! SIGTERM on the real binary: no new claims, running steps get `--grace` to finish, and what is
//! still running after it is given back uncounted for the next server.

mod common;

use std::time::Duration;

use common::{Sandbox, count, start_counter, step};

/// a → b (answers after 3 s) → c.
fn chain(base: &str) -> String {
    format!(
        "id: chain\nretry: {{max_retries: 3, initial: 100ms}}\nsteps:\n\
         \x20 - {{id: a, type: http, with: {{url: \"{base}/a\"}}}}\n\
         \x20 - {{id: b, type: http, needs: [a], with: {{url: \"{base}/slow/b\"}}}}\n\
         \x20 - {{id: c, type: http, needs: [b], with: {{url: \"{base}/c\"}}}}\n"
    )
}

#[test]
fn sigterm_lets_a_running_step_finish_within_grace_and_claims_nothing_new() {
    let (base, hits) = start_counter();
    let mut sandbox = Sandbox::new("sigterm-finish", &chain(&base));
    sandbox.serve_with_grace("8s");
    let run = sandbox.cli(&["run", "chain"]).trim().to_owned();
    sandbox.wait_for("step b in flight", || count(&hits, "slow/b") == 1);

    let (status, _) = sandbox.terminate_newest(Duration::from_secs(8 + 4));
    assert!(status.success(), "serve exited with {status}");
    let detail = sandbox.show(&run);
    assert_eq!(step(&detail, "b")["state"], "succeeded", "{detail:#}");
    assert_eq!(count(&hits, "c"), 0, "a stopping server claimed c");
    assert_eq!(detail["status"], "running");

    // The next server picks up where it stopped; b is not executed again.
    sandbox.serve();
    sandbox.wait_for("the run to finish", || {
        sandbox.show(&run)["status"] != "running"
    });
    assert_eq!(sandbox.show(&run)["status"], "succeeded");
    assert_eq!(count(&hits, "slow/b"), 1);
    assert_eq!(count(&hits, "c"), 1);
}

#[test]
fn sigterm_after_grace_releases_the_running_step_uncounted() {
    let (base, hits) = start_counter();
    let mut sandbox = Sandbox::new("sigterm-release", &chain(&base));
    sandbox.serve_with_grace("1s");
    let run = sandbox.cli(&["run", "chain"]).trim().to_owned();
    sandbox.wait_for("step b in flight", || count(&hits, "slow/b") == 1);

    // The grace is shorter than b's request: the server gives b back and exits cleanly.
    let (status, _) = sandbox.terminate_newest(Duration::from_secs(1 + 4));
    assert!(status.success(), "serve exited with {status}");
    let b = step(&sandbox.show(&run), "b").clone();
    assert_eq!(b["state"], "available", "{b:#}");

    sandbox.serve();
    sandbox.wait_for("the run to finish", || {
        sandbox.show(&run)["status"] != "running"
    });
    let detail = sandbox.show(&run);
    assert_eq!(detail["status"], "succeeded", "{detail:#}");
    assert_eq!(count(&hits, "a"), 1);
    assert_eq!(count(&hits, "slow/b"), 2);
    let b = step(&detail, "b");
    assert_eq!(b["attempt"], 1, "the released attempt was counted: {b:#}");
    assert_eq!(b["attempts"], serde_json::json!([]), "{b:#}");
}
