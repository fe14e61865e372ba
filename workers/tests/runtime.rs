//! The worker loop on a real SQLite store: what its concurrency must never cost, and what a step
//! kind that panics costs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;
use switchyard_engine::clock::SystemClock;
use switchyard_engine::definition::{Format, WorkflowMap, parse_str};
use switchyard_engine::plan::{Trigger, plan_run};
use switchyard_engine::service::Engine;
use switchyard_engine::state::RunStatus;
use switchyard_engine::store::{DefinitionOrigin, RunFilter};
use switchyard_workers::{
    Registry, StepCall, StepKind, StepOutcome, StepResult, WorkerConfig, run_worker,
};
use tokio::sync::watch;

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// SQLite has one writer connection. Store calls in flight hold it between their statements, so
/// a heartbeat that waited for it inside the loop, while the loop no longer drove the call
/// holding it, would stall both until the pool gave up, and the leases would run out meanwhile.
/// Leases of 300 ms put a heartbeat beside nearly every batch; a lease that ran out shows as a
/// second attempt once the sweeper reclaims it.
/// An engine on a fresh SQLite file in `dir`, with `yaml` installed as workflow `id`; returns
/// the engine, the workflows and `id`'s version.
async fn engine_with(dir: &TempDir, yaml: &str, id: &str) -> (Arc<Engine>, WorkflowMap, i64) {
    std::fs::create_dir_all(&dir.0).unwrap();
    let store =
        switchyard_engine::store::connect(&format!("sqlite://{}/store.db", dir.0.display()))
            .await
            .unwrap();
    store.migrate().await.unwrap();
    let engine = Arc::new(Engine::new(store, Arc::new(SystemClock)));
    let mut workflows = WorkflowMap::new();
    for wf in parse_str("test.yaml", yaml, Format::Yaml).unwrap() {
        workflows.insert(wf.id.clone(), Arc::new(wf));
    }
    let versions = engine
        .install(&workflows, DefinitionOrigin::Files)
        .await
        .unwrap();
    let (_, version) = versions.into_iter().find(|(w, _)| w == id).unwrap();
    (engine, workflows, version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_never_wait_behind_a_batch_in_flight() {
    const RUNS: usize = 5_000;
    let dir = TempDir(
        std::env::temp_dir().join(format!("switchyard-runtime-test-{}", std::process::id())),
    );
    let (engine, workflows, version) =
        engine_with(&dir, "id: one\nsteps:\n  - {id: a, type: noop}\n", "one").await;
    for _ in 0..RUNS / 1_000 {
        let runs = (0..1_000)
            .map(|_| plan_run(&workflows["one"], version, Value::Null, Trigger::default()).unwrap())
            .collect();
        engine
            .store()
            .create_runs(runs, engine.now())
            .await
            .unwrap();
    }

    let (stop, stopped) = watch::channel(false);
    let worker = tokio::spawn(run_worker(
        engine.clone(),
        Registry::builtin(),
        WorkerConfig {
            slots: 200,
            lease: Duration::from_millis(300),
            ..WorkerConfig::default()
        },
        stopped.clone(),
    ));
    let sweeper = tokio::spawn(switchyard_engine::maintenance::run_maintenance(
        engine.clone(),
        stopped,
    ));
    let running = RunFilter {
        status: Some(RunStatus::Running),
        limit: 1,
        ..RunFilter::default()
    };
    // A guard against hanging the suite, far above the second or so this takes.
    let give_up = Instant::now() + Duration::from_secs(300);
    while !engine.runs(&running).await.unwrap().is_empty() {
        assert!(Instant::now() < give_up, "the runs never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send_replace(true);
    worker.await.unwrap();
    sweeper.await.unwrap();

    let runs = engine
        .runs(&RunFilter {
            limit: RUNS as u32,
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(runs.len(), RUNS);
    let mut retried = Vec::new();
    for run in &runs {
        assert_eq!(run.status, RunStatus::Succeeded, "{run:?}");
        let detail = engine.store().run(&run.id).await.unwrap();
        retried.extend(
            detail
                .steps
                .iter()
                .filter(|s| s.attempt != 1)
                .map(|s| (run.id.clone(), s.attempt)),
        );
    }
    assert!(
        retried.is_empty(),
        "{} steps took another attempt after their lease ran out, e.g. {:?}",
        retried.len(),
        &retried[..retried.len().min(5)]
    );
}

/// Panics on its first attempt, succeeds on the next.
struct PanicsOnce;

#[async_trait]
impl StepKind for PanicsOnce {
    fn name(&self) -> &'static str {
        "panics_once"
    }
    async fn run(&self, call: StepCall) -> StepResult {
        if call.attempt == 1 {
            panic!("first attempt");
        }
        Ok(StepOutcome::Output(Value::from(call.attempt)))
    }
}

/// A panic fails the attempt at once, under the step's retry policy: nothing waits for a lease
/// (an hour here) to run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_kind_that_panics_fails_its_attempt_and_is_retried() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("switchyard-panic-test-{}", std::process::id())));
    let (engine, workflows, version) = engine_with(
        &dir,
        "id: shaky\nretry: {max_retries: 1, initial: 10ms}\nsteps:\n  - {id: a, type: panics_once}\n",
        "shaky",
    )
    .await;
    let run = plan_run(
        &workflows["shaky"],
        version,
        Value::Null,
        Trigger::default(),
    )
    .unwrap();
    let run_id = engine
        .store()
        .create_runs(vec![run], engine.now())
        .await
        .unwrap()
        .remove(0);
    let mut registry = Registry::builtin();
    registry.add(PanicsOnce);
    let (stop, stopped) = watch::channel(false);
    let worker = tokio::spawn(run_worker(
        engine.clone(),
        registry,
        WorkerConfig {
            slots: 4,
            lease: Duration::from_secs(3_600),
            ..WorkerConfig::default()
        },
        stopped,
    ));
    let give_up = Instant::now() + Duration::from_secs(60);
    let detail = loop {
        let detail = engine.store().run(&run_id).await.unwrap();
        if detail.summary.status != RunStatus::Running {
            break detail;
        }
        assert!(Instant::now() < give_up, "the run never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.send_replace(true);
    worker.await.unwrap();
    assert_eq!(detail.summary.status, RunStatus::Succeeded, "{detail:?}");
    let step = &detail.steps[0];
    assert_eq!(step.attempt, 2);
    let error = step.attempts[0]["error"].as_str().unwrap();
    assert!(error.contains("panicked: first attempt"), "{error}");
}
