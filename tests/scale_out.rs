//! Scale-out on PostgreSQL with the real binary: two control planes (`serve --workers 0`) and three
//! `worker` processes on one database. One worker is killed with `kill -9` under load and one
//! control plane after it: every run still finishes, a step is executed again only where the dead
//! worker held it, and a per-second schedule fires exactly once per second throughout.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Sandbox, start_counter};
use serde_json::Value;

const RUNS: usize = 30;
const VICTIM_SLOTS: usize = 4;

fn definitions(base: &str) -> String {
    format!(
        "workflows:\n\
         \x20 load:\n\
         \x20   retry: {{max_retries: 5, initial: 100ms}}\n\
         \x20   steps:\n\
         \x20     - {{id: a, type: http, with: {{url: \"{base}/brief/{{{{ run.id }}}}-a\"}}}}\n\
         \x20     - {{id: b, type: http, needs: [a], with: {{url: \"{base}/brief/{{{{ run.id }}}}-b\"}}}}\n\
         \x20     - {{id: c, type: http, needs: [b], with: {{url: \"{base}/brief/{{{{ run.id }}}}-c\"}}}}\n\
         \x20 tick:\n\
         \x20   schedule: {{cron: \"* * * * * *\", overlap: allow}}\n\
         \x20   steps: [{{id: t, type: noop}}]\n"
    )
}

fn json(sandbox: &Sandbox, args: &[&str]) -> Value {
    serde_json::from_str(&sandbox.cli(args)).unwrap()
}

#[test]
fn runs_finish_across_processes_when_a_worker_and_a_scheduler_die() {
    let (base, hits) = start_counter();
    let Some(mut sandbox) = Sandbox::postgres("scale-out", &definitions(&base)) else {
        return;
    };
    let control = ["serve", "--listen", "127.0.0.1:0", "--workers", "0"];
    let _first_control = sandbox.spawn(&control);
    let second_control = sandbox.spawn(&control);
    let slots = VICTIM_SLOTS.to_string();
    let worker = ["worker", "--workers", &slots, "--lease", "2s"];
    let victim = sandbox.spawn(&worker);
    sandbox.spawn(&worker);
    sandbox.spawn(&worker);

    let runs: Vec<String> = (0..RUNS)
        .map(|_| sandbox.cli(&["run", "load"]).trim().to_owned())
        .collect();
    sandbox.wait_for("work to flow", || {
        hits.lock().unwrap().values().sum::<u32>() >= 20
    });
    sandbox.kill(victim);
    // Let the schedule fire a few times with one control plane gone.
    std::thread::sleep(Duration::from_secs(1));
    sandbox.kill(second_control);

    sandbox.wait_for("every run to finish", || {
        runs.iter()
            .all(|run| sandbox.show(run)["status"] != "running")
    });
    let mut lost_attempts = 0;
    for run in &runs {
        let detail = sandbox.show(run);
        assert_eq!(detail["status"], "succeeded", "{detail:#}");
        for step in detail["steps"].as_array().unwrap() {
            lost_attempts += step["attempts"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["error"].as_str().unwrap_or("").contains("worker lost"))
                .count();
        }
    }
    let hits = hits.lock().unwrap().clone();
    let duplicates: u32 = hits.values().map(|n| n.saturating_sub(1)).sum();
    eprintln!("dead worker's lost attempts: {lost_attempts}; steps run twice: {duplicates}");
    assert_eq!(hits.len(), RUNS * 3, "a step never ran: {hits:?}");
    assert!(
        lost_attempts <= VICTIM_SLOTS,
        "{lost_attempts} attempts lost, but the dead worker held at most {VICTIM_SLOTS}"
    );
    assert!(
        duplicates as usize <= lost_attempts,
        "{duplicates} steps ran twice, only {lost_attempts} were held by the dead worker"
    );

    // Exactly one fire per second, before and after the deaths, and one run per fire. The
    // schedulers stop first, so the fires and the runs are read from the same history (a fire and
    // its run commit together).
    sandbox.kill_all();
    let fires = json(
        &sandbox,
        &["fires", "--workflow", "tick", "--limit", "1000", "--json"],
    );
    let mut at: Vec<i64> = fires
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["fire_at"].as_i64().unwrap())
        .collect();
    at.sort();
    eprintln!("{} fires, one per second", at.len());
    assert!(at.len() >= 3, "the schedule hardly fired: {fires:#}");
    for pair in at.windows(2) {
        assert_eq!(pair[1] - pair[0], 1_000, "fires not one per second: {at:?}");
    }
    let started = json(
        &sandbox,
        &["runs", "--workflow", "tick", "--limit", "1000", "--json"],
    );
    let mut per_fire: BTreeMap<i64, usize> = BTreeMap::new();
    for run in started.as_array().unwrap() {
        let detail = sandbox.show(run["id"].as_str().unwrap());
        *per_fire
            .entry(detail["scheduled_at"].as_i64().unwrap())
            .or_default() += 1;
    }
    assert!(
        per_fire.values().all(|n| *n == 1),
        "a fire started two runs: {per_fire:?}"
    );
    assert_eq!(per_fire.len(), at.len(), "a fire started no run");
}
