//! The real binary under `kill -9`: a run survives the death of its server, finished steps are not
//! executed again, and a durable sleep keeps its wake-up time across the restart. Steps call a real
//! HTTP server on 127.0.0.1 started by the test, which counts the requests.

mod common;

use common::{Sandbox, count, start_counter, step};

#[test]
fn killed_server_resumes_run_without_repeating_finished_steps() {
    let (base, hits) = start_counter();
    let definition = format!(
        "id: chain\nretry: {{max_retries: 3, initial: 100ms}}\nsteps:\n\
         \x20 - {{id: a, type: http, with: {{url: \"{base}/a\"}}}}\n\
         \x20 - {{id: b, type: http, needs: [a], with: {{url: \"{base}/slow/b\"}}}}\n\
         \x20 - {{id: c, type: http, needs: [b], with: {{url: \"{base}/c\"}}}}\n"
    );
    let mut sandbox = Sandbox::new("kill", &definition);
    sandbox.serve();
    let run = sandbox.cli(&["run", "chain"]).trim().to_owned();
    sandbox.wait_for("step b in flight", || count(&hits, "slow/b") == 1);
    sandbox.kill_all();

    sandbox.serve();
    sandbox.wait_for("the run to finish", || {
        sandbox.show(&run)["status"] != "running"
    });
    let detail = sandbox.show(&run);
    assert_eq!(detail["status"], "succeeded", "{detail:#}");
    assert_eq!(count(&hits, "a"), 1, "finished step a ran again");
    assert_eq!(count(&hits, "c"), 1);
    assert_eq!(step(&detail, "a")["attempt"], 1);
    // b was cut off mid-request: at least once, and its lost attempt is on record.
    assert_eq!(count(&hits, "slow/b"), 2);
    assert_eq!(step(&detail, "b")["attempt"], 2);
}

#[test]
fn durable_sleep_survives_a_restart() {
    let mut sandbox = Sandbox::new(
        "sleep",
        "id: nap\nsteps:\n  - {id: rest, type: sleep, with: {duration: 4s}}\n  - {id: after, type: transform, needs: [rest], with: {output: done}}\n",
    );
    sandbox.serve();
    let run = sandbox.cli(&["run", "nap"]).trim().to_owned();
    sandbox.wait_for("the sleep to park", || {
        step(&sandbox.show(&run), "rest")["state"] == "parked"
    });
    let wake_at = step(&sandbox.show(&run), "rest")["run_after"]
        .as_i64()
        .unwrap();
    sandbox.kill_all();
    sandbox.serve();
    sandbox.wait_for("the run to finish", || {
        sandbox.show(&run)["status"] != "running"
    });
    let detail = sandbox.show(&run);
    assert_eq!(detail["status"], "succeeded", "{detail:#}");
    let rest = step(&detail, "rest");
    assert_eq!(
        rest["output"]["slept_until"], wake_at,
        "the sleep started over"
    );
    assert_eq!(rest["attempt"], 1);
}

#[test]
fn a_loop_killed_midway_ends_every_item_and_runs_none_that_succeeded_again() {
    let (base, hits) = start_counter();
    let definition = format!(
        "id: many\nretry: {{max_retries: 3, initial: 100ms}}\nsteps:\n\
         \x20 - id: each\n\
         \x20   type: http\n\
         \x20   for_each: \"{{{{ range(1000) | list }}}}\"\n\
         \x20   parallel: 8\n\
         \x20   with: {{url: \"{base}/item-{{{{ index }}}}\"}}\n"
    );
    let mut sandbox = Sandbox::new("kill-loop", &definition);
    sandbox.serve();
    let run = sandbox.cli(&["run", "many"]).trim().to_owned();
    let called = || {
        (0..1000)
            .map(|i| count(&hits, &format!("item-{i}")))
            .collect::<Vec<u32>>()
    };
    sandbox.wait_for("a third of the items called", || {
        called().iter().filter(|n| **n > 0).count() >= 333
    });
    sandbox.kill_all();

    sandbox.serve();
    sandbox.wait_for("the run to finish", || {
        sandbox.show(&run)["status"] != "running"
    });
    let detail = sandbox.show(&run);
    assert_eq!(detail["status"], "succeeded", "{}", detail["error"]);
    assert_eq!(
        step(&detail, "each")["output"].as_array().unwrap().len(),
        1000
    );
    let calls = called();
    assert!(calls.iter().all(|n| *n >= 1), "every item ran");
    // Only items in flight when the server died (8 at most) may have been called twice; an item
    // that had succeeded never is: each call is an attempt on record.
    let repeated: u32 = calls.iter().map(|n| n - 1).sum();
    assert!(repeated <= 8, "{repeated} calls repeated");
    for (i, calls) in calls.iter().enumerate() {
        let item = step(&detail, &format!("each[{i}]"));
        assert_eq!(item["state"], "succeeded");
        assert!(
            u64::from(*calls) <= item["attempt"].as_u64().unwrap(),
            "item {i} was called {calls} times in {} attempts",
            item["attempt"]
        );
    }
}
