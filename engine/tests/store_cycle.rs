//! A worker's cycle in one call: `complete_and_claim` on the SQLite store. Each test gets a fresh
//! database; times are passed in, so no test sleeps.

use std::sync::Arc;

use serde_json::{Value, json};
use switchyard_engine::definition::{Format, Workflow, parse_str};
use switchyard_engine::plan::{Trigger, plan_run};
use switchyard_engine::state::{JobState, Millis, RunStatus, Settlement};
use switchyard_engine::store::{ClaimParams, ClaimedJob, Completion, Store};

const T0: Millis = 1_800_000_000_000;
const LEASE: Millis = 30_000;

struct TestDb {
    store: Arc<dyn Store>,
    dir: std::path::PathBuf,
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

async fn open_sqlite() -> TestDb {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "switchyard-cycle-{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/store.db", dir.display());
    let store = switchyard_engine::store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    TestDb { store, dir }
}

fn two_steps() -> Workflow {
    parse_str(
        "test.yaml",
        "id: two\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, needs: [a]}\n",
        Format::Yaml,
    )
    .unwrap()
    .remove(0)
}

async fn start(store: &dyn Store, wf: &Workflow) -> String {
    let version = store
        .upsert_workflow(&wf.id, &serde_json::to_value(wf).unwrap(), T0)
        .await
        .unwrap();
    let run = plan_run(wf, version, Value::Null, Trigger::default()).unwrap();
    store.create_runs(vec![run], T0).await.unwrap().remove(0)
}

fn params(limit: u32, now: Millis) -> ClaimParams {
    ClaimParams {
        limit,
        now,
        lease_until: now + LEASE,
    }
}

async fn claim(store: &dyn Store, limit: u32, now: Millis) -> Vec<ClaimedJob> {
    store.claim(params(limit, now)).await.unwrap()
}

fn done(job: &ClaimedJob, output: Value) -> Completion {
    Completion {
        lease: job.lease.clone(),
        settlement: Settlement::Succeed { output },
        children: Vec::new(),
    }
}

async fn job_state(store: &dyn Store, run: &str, step: &str) -> JobState {
    let detail = store.run(run).await.unwrap();
    detail
        .steps
        .into_iter()
        .find(|s| s.step_id == step)
        .unwrap()
        .state
}

#[tokio::test]
async fn complete_and_claim_commits_completions_and_claims_the_dependent_in_one_call() {
    let db = open_sqlite().await;
    let store = &*db.store;
    let run = start(store, &two_steps()).await;
    let a = claim(store, 10, T0).await.remove(0);
    assert_eq!(a.step_id, "a");

    let (accepted, claimed) = store
        .complete_and_claim(vec![done(&a, json!(42))], params(10, T0), T0)
        .await
        .unwrap();
    assert_eq!(accepted, vec![a.lease.job_id]);
    assert_eq!(claimed.len(), 1, "b became available and was claimed");
    let b = &claimed[0];
    assert_eq!(b.step_id, "b");
    assert_eq!(b.run_id, run);
    assert_eq!(b.outputs.get("a"), Some(&json!(42)), "b sees a's output");
    assert_eq!(job_state(store, &run, "a").await, JobState::Succeeded);
    assert_eq!(job_state(store, &run, "b").await, JobState::Running);

    // The claim's lease is a real one: completing b with it finishes the run.
    let (accepted, claimed) = store
        .complete_and_claim(vec![done(b, json!(7))], params(10, T0 + 1), T0 + 1)
        .await
        .unwrap();
    assert_eq!(accepted, vec![b.lease.job_id]);
    assert!(claimed.is_empty());
    let detail = store.run(&run).await.unwrap();
    assert_eq!(detail.summary.status, RunStatus::Succeeded);
    assert_eq!(detail.output, Some(json!({ "b": 7 })));
}

#[tokio::test]
async fn complete_and_claim_rejects_a_stale_lease_but_still_claims() {
    let db = open_sqlite().await;
    let store = &*db.store;
    let first_run = start(store, &two_steps()).await;
    let first = claim(store, 1, T0).await.remove(0);
    // The lease runs out and another worker takes the job over.
    assert_eq!(store.sweep(T0 + LEASE + 1).await.unwrap().reclaimed_jobs, 1);
    let second = claim(store, 1, T0 + LEASE + 2).await.remove(0);
    assert_eq!(second.lease.job_id, first.lease.job_id);
    let other_run = start(store, &two_steps()).await;

    let now = T0 + LEASE + 3;
    let (accepted, claimed) = store
        .complete_and_claim(vec![done(&first, json!("stale"))], params(10, now), now)
        .await
        .unwrap();
    assert!(accepted.is_empty(), "late completion was accepted");
    assert_eq!(
        job_state(store, &first_run, "a").await,
        JobState::Running,
        "the current attempt keeps the job"
    );
    let claimed: Vec<(&str, &str)> = claimed
        .iter()
        .map(|j| (j.run_id.as_str(), j.step_id.as_str()))
        .collect();
    assert_eq!(claimed, vec![(other_run.as_str(), "a")]);
}

#[tokio::test]
async fn complete_and_claim_with_limit_zero_only_completes() {
    let db = open_sqlite().await;
    let store = &*db.store;
    let run = start(store, &two_steps()).await;
    let a = claim(store, 10, T0).await.remove(0);

    let (accepted, claimed) = store
        .complete_and_claim(vec![done(&a, Value::Null)], params(0, T0), T0)
        .await
        .unwrap();
    assert_eq!(accepted, vec![a.lease.job_id]);
    assert!(claimed.is_empty());
    assert_eq!(job_state(store, &run, "b").await, JobState::Available);
    assert_eq!(claim(store, 10, T0).await[0].step_id, "b");
}

#[tokio::test]
async fn complete_and_claim_with_nothing_to_complete_is_a_claim() {
    let db = open_sqlite().await;
    let store = &*db.store;
    let run = start(store, &two_steps()).await;

    let (accepted, claimed) = store
        .complete_and_claim(Vec::new(), params(10, T0), T0)
        .await
        .unwrap();
    assert!(accepted.is_empty());
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].step_id, "a");
    assert_eq!(job_state(store, &run, "a").await, JobState::Running);
}
