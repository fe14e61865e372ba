//! PostgreSQL restarted under load, with the real binary: the processes reconnect by themselves,
//! no accepted run is lost, and completions that failed while the database was down are retried.
//! Alone in its test binary, since it takes the database away from everything else for a moment.

mod common;

use std::process::Command;

use common::{Sandbox, start_counter};

const RUNS: usize = 40;

fn restart_postgres() {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a Debian PostgreSQL cluster (pg_ctlcluster) to restart")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .next()
        .expect("a PostgreSQL version under /etc/postgresql");
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart"])
        .args(["--", "-m", "fast"])
        .status()
        .expect("pg_ctlcluster runs");
    assert!(status.success(), "restarting PostgreSQL failed");
}

fn postmaster_started() -> String {
    let out = Command::new("psql")
        .args([
            &switchyard_engine::testing::postgres_url(),
            "-Atc",
            "SELECT pg_postmaster_start_time()",
        ])
        .output()
        .expect("psql runs");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_accepted_run_finishes_across_a_database_restart() {
    let (base, hits) = start_counter();
    let definition = format!(
        "id: chain\nretry: {{max_retries: 5, initial: 100ms}}\nsteps:\n\
         \x20 - {{id: a, type: http, with: {{url: \"{base}/brief/{{{{ run.id }}}}-a\"}}}}\n\
         \x20 - {{id: b, type: http, needs: [a], with: {{url: \"{base}/brief/{{{{ run.id }}}}-b\"}}}}\n\
         \x20 - {{id: c, type: http, needs: [b], with: {{url: \"{base}/brief/{{{{ run.id }}}}-c\"}}}}\n"
    );
    let Some(mut sandbox) = Sandbox::postgres("pg-restart", &definition) else {
        return;
    };
    sandbox.spawn(&["serve", "--listen", "127.0.0.1:0", "--workers", "4"]);
    sandbox.spawn(&["worker", "--workers", "4"]);
    let mut runs: Vec<String> = (0..RUNS)
        .map(|_| sandbox.cli(&["run", "chain"]).trim().to_owned())
        .collect();
    sandbox.wait_for("work to flow", || {
        hits.lock().unwrap().values().sum::<u32>() >= 15
    });
    let before = postmaster_started();
    let done_before = hits.lock().unwrap().values().sum::<u32>();
    restart_postgres();
    assert_ne!(before, postmaster_started(), "PostgreSQL did not restart");
    assert!(
        done_before < (RUNS * 3) as u32,
        "the load was over before the restart"
    );
    // Accepted after the restart too.
    runs.extend((0..5).map(|_| sandbox.cli(&["run", "chain"]).trim().to_owned()));

    sandbox.wait_for("every run to finish", || {
        runs.iter()
            .all(|run| sandbox.show(run)["status"] != "running")
    });
    for run in &runs {
        let detail = sandbox.show(run);
        assert_eq!(detail["status"], "succeeded", "{detail:#}");
    }
    let hits = hits.lock().unwrap();
    for run in &runs {
        for step in ["a", "b", "c"] {
            assert!(
                hits.contains_key(&format!("{run}-{step}")),
                "step {step} of {run} never ran"
            );
        }
    }
}
