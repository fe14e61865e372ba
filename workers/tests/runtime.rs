//! The worker loop on a real SQLite store: what its concurrency must never cost, and what a step
//! kind that panics costs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value;
use switchyard_engine::clock::SystemClock;
use switchyard_engine::definition::{Format, Workflow, WorkflowMap, parse_str};
use switchyard_engine::plan::{Trigger, plan_run};
use switchyard_engine::service::Engine;
use switchyard_engine::state::{RunStatus, StepFailure};
use switchyard_engine::store::{DefinitionOrigin, InstallParams, RunDetail, RunFilter};
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
    engine_on(&format!("sqlite://{}/store.db", dir.0.display()), yaml, id).await
}

/// An engine on the store at `url`, with `yaml` installed as workflow `id`.
async fn engine_on(url: &str, yaml: &str, id: &str) -> (Arc<Engine>, WorkflowMap, i64) {
    let store = switchyard_engine::store::connect(url).await.unwrap();
    store.migrate().await.unwrap();
    let engine = Arc::new(Engine::new(store, Arc::new(SystemClock)));
    let mut workflows = WorkflowMap::new();
    for wf in parse_str("test.yaml", yaml, Format::Yaml).unwrap() {
        workflows.insert(wf.id.clone(), Arc::new(wf));
    }
    let versions = engine
        .install(&workflows, DefinitionOrigin::Files, None)
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

/// Starts a run of `workflow` at `version` and runs a worker with leases of an hour (so nothing
/// waits for one to run out) until the run ends; returns the run.
async fn run_to_its_end(
    engine: &Arc<Engine>,
    registry: Registry,
    workflow: &Workflow,
    version: i64,
) -> RunDetail {
    let run = plan_run(workflow, version, Value::Null, Trigger::default()).unwrap();
    let run_id = engine
        .store()
        .create_runs(vec![run], engine.now())
        .await
        .unwrap()
        .remove(0);
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
    detail
}

/// Panics on its first attempt, succeeds on the next.
struct PanicsOnce;

#[async_trait]
impl StepKind for PanicsOnce {
    fn name(&self) -> &'static str {
        "panics_once"
    }
    fn with_schema(&self) -> Value {
        serde_json::json!({})
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
    let mut registry = Registry::builtin();
    registry.add(PanicsOnce);
    let detail = run_to_its_end(&engine, registry, &workflows["shaky"], version).await;
    assert_eq!(detail.summary.status, RunStatus::Succeeded, "{detail:?}");
    let step = &detail.steps[0];
    assert_eq!(step.attempt, 2);
    let error = step.attempts[0]["error"].as_str().unwrap();
    assert!(error.contains("panicked: first attempt"), "{error}");
}

/// A stored definition that does not load fails its step at once, naming the definition and
/// why: no retry would read it better, and its own retry policy (five retries here) is in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_definition_that_does_not_load_fails_its_step_naming_why() {
    let dir = TempDir(
        std::env::temp_dir().join(format!("switchyard-corrupt-test-{}", std::process::id())),
    );
    let (engine, workflows, _) = engine_with(
        &dir,
        "id: broken\nretry: {max_retries: 5, initial: 10ms}\nsteps:\n  - {id: a, type: noop}\n",
        "broken",
    )
    .await;
    // A later version stored as something this build cannot read.
    let corrupt = engine
        .store()
        .upsert_workflows(
            InstallParams {
                workflows: &[("broken".to_owned(), serde_json::json!({ "steps": "none" }))],
                origin: DefinitionOrigin::Api,
                create_only: false,
                actor: None,
            },
            engine.now(),
        )
        .await
        .unwrap()[0];
    let detail = run_to_its_end(&engine, Registry::builtin(), &workflows["broken"], corrupt).await;
    assert_eq!(detail.summary.status, RunStatus::Failed, "{detail:?}");
    let step = &detail.steps[0];
    assert_eq!(step.attempt, 1, "{detail:?}");
    let error = step.error.as_deref().unwrap();
    assert!(
        error.starts_with(&format!(
            "definition_unreadable: the definition of broken v{corrupt} could not be read: stored definition of broken v{corrupt} does not load"
        )),
        "{error}"
    );
}

/// A PostgreSQL schema of a test's own, dropped when the test ends. `None` (the test says it is
/// skipped) without a server, unless `SWITCHYARD_REQUIRE_POSTGRES` is set, as in CI.
struct PgSchema {
    base: String,
    schema: String,
}

impl PgSchema {
    async fn new(name: &str) -> Option<PgSchema> {
        let base = switchyard_engine::testing::postgres_url();
        if let Err(e) = switchyard_engine::store::connect(&base).await {
            switchyard_engine::testing::postgres_unreachable(e);
            return None;
        }
        let schema = format!("runtime_{name}_{}", std::process::id());
        Some(PgSchema { base, schema })
    }

    fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options[search_path]={}", self.base, self.schema)
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let _ = std::process::Command::new("psql")
            .args([
                &self.base,
                "-qc",
                &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema),
            ])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Puts a NUL character (which PostgreSQL cannot store) where its input says: in its output
/// (`poison: output`) or its error message (`poison: error`); otherwise succeeds.
struct Poison;

#[async_trait]
impl StepKind for Poison {
    fn name(&self) -> &'static str {
        "poison"
    }
    fn with_schema(&self) -> Value {
        serde_json::json!({})
    }
    async fn run(&self, call: StepCall) -> StepResult {
        match call.with["poison"].as_str() {
            Some("output") => Ok(StepOutcome::Output(serde_json::json!({ "text": "a\0b" }))),
            Some("error") => Err(StepFailure::permanent("poison", "a bad \0 byte")),
            _ => Ok(StepOutcome::Output(Value::from("fine"))),
        }
    }
}

const POISON: &str = "\
id: mixed
inputs: {poison: none}
retry: {max_retries: 0}
steps:
  - {id: a, type: poison, with: {poison: \"{{ input.poison }}\"}}
";

/// Forty runs complete in one batch; two of them carry a NUL character. The two fail on their
/// own with a reason, and the other thirty-eight succeed at their first attempt: nothing waits
/// for a lease (an hour here) to run out and nothing runs twice.
async fn a_value_the_database_cannot_hold_fails_only_its_own_step(url: &str) {
    let (engine, workflows, version) = engine_on(url, POISON, "mixed").await;
    let input = |poison: &str| serde_json::json!({ "poison": poison });
    let mut runs = vec![
        plan_run(
            &workflows["mixed"],
            version,
            input("output"),
            Trigger::default(),
        )
        .unwrap(),
        plan_run(
            &workflows["mixed"],
            version,
            input("error"),
            Trigger::default(),
        )
        .unwrap(),
    ];
    runs.extend((0..38).map(|_| {
        plan_run(
            &workflows["mixed"],
            version,
            Value::Null,
            Trigger::default(),
        )
        .unwrap()
    }));
    let ids = engine
        .store()
        .create_runs(runs, engine.now())
        .await
        .unwrap();
    let mut registry = Registry::builtin();
    registry.add(Poison);
    let (stop, stopped) = watch::channel(false);
    let worker = tokio::spawn(run_worker(
        engine.clone(),
        registry,
        WorkerConfig {
            slots: 64,
            lease: Duration::from_secs(3_600),
            ..WorkerConfig::default()
        },
        stopped,
    ));
    let running = RunFilter {
        status: Some(RunStatus::Running),
        limit: 1,
        ..RunFilter::default()
    };
    let give_up = Instant::now() + Duration::from_secs(60);
    while !engine.runs(&running).await.unwrap().is_empty() {
        assert!(Instant::now() < give_up, "the runs never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send_replace(true);
    worker.await.unwrap();

    let output_run = engine.run(&ids[0]).await.unwrap();
    assert_eq!(output_run.summary.status, RunStatus::Failed);
    let error = output_run.steps[0].error.as_deref().unwrap();
    assert!(error.contains("$.text") && error.contains("NUL"), "{error}");
    let error_run = engine.run(&ids[1]).await.unwrap();
    assert_eq!(error_run.summary.status, RunStatus::Failed);
    let error = error_run.steps[0].error.as_deref().unwrap();
    assert!(error.contains("a bad \u{fffd} byte"), "{error}");
    for id in &ids[2..] {
        let run = engine.run(id).await.unwrap();
        assert_eq!(run.summary.status, RunStatus::Succeeded, "{run:?}");
        assert_eq!(run.steps[0].attempt, 1, "{run:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_sqlite_cannot_hold_fails_only_its_own_step() {
    let dir = TempDir(
        std::env::temp_dir().join(format!("switchyard-poison-test-{}", std::process::id())),
    );
    std::fs::create_dir_all(&dir.0).unwrap();
    a_value_the_database_cannot_hold_fails_only_its_own_step(&format!(
        "sqlite://{}/store.db",
        dir.0.display()
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_postgres_cannot_hold_fails_only_its_own_step() {
    let Some(schema) = PgSchema::new("poison").await else {
        return;
    };
    a_value_the_database_cannot_hold_fails_only_its_own_step(&schema.url()).await;
}

/// Answers with `with.bytes` bytes of JSON text.
struct Sized;

#[async_trait]
impl StepKind for Sized {
    fn name(&self) -> &'static str {
        "sized"
    }
    fn with_schema(&self) -> Value {
        serde_json::json!({})
    }
    async fn run(&self, call: StepCall) -> StepResult {
        let bytes = call.with["bytes"].as_u64().unwrap() as usize;
        // A JSON string of `bytes` bytes, quotes included.
        Ok(StepOutcome::Output(Value::String("x".repeat(bytes - 2))))
    }
}

/// Outputs are JSON in the database, up to 1 MiB each: one byte more fails the step for good,
/// naming the limit (files go to artifacts instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_over_one_mib_fails_its_step_for_good_naming_the_limit() {
    let dir = TempDir(
        std::env::temp_dir().join(format!("switchyard-output-limit-{}", std::process::id())),
    );
    let (engine, workflows, version) = engine_with(
        &dir,
        "id: big\nretry: {max_retries: 3, initial: 10ms}\nsteps:\n  \
         - {id: fits, type: sized, with: {bytes: 1048576}}\n  \
         - {id: over, type: sized, needs: [fits], with: {bytes: 1048577}}\n",
        "big",
    )
    .await;
    let mut registry = Registry::builtin();
    registry.add(Sized);
    let detail = run_to_its_end(&engine, registry, &workflows["big"], version).await;
    assert_eq!(detail.summary.status, RunStatus::Failed, "{detail:?}");
    assert_eq!(detail.steps[0].state.as_str(), "succeeded");
    let over = &detail.steps[1];
    assert_eq!(over.attempt, 1, "not retried");
    let error = over.error.as_deref().unwrap_or_default();
    assert!(
        error.contains("output is 1048577 bytes; the limit is 1048576 bytes"),
        "{error}"
    );
}

/// Five items share a bucket of two a second: two run at once, the others park, their slots
/// free, until their turns, and none fails or spends an attempt waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_over_their_quota_park_until_their_turn_and_do_not_fail() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("switchyard-quota-test-{}", std::process::id())));
    let (engine, workflows, version) = engine_with(
        &dir,
        "id: limited\nsteps:\n  - id: call\n    type: noop\n    for_each: \"{{ [1, 2, 3, 4, 5] }}\"\n    quota: {name: api, limit: 2, per: 1s}\n",
        "limited",
    )
    .await;
    let detail = run_to_its_end(&engine, Registry::builtin(), &workflows["limited"], version).await;
    assert_eq!(detail.summary.status, RunStatus::Succeeded, "{detail:?}");
    let logs = engine
        .store()
        .step_logs(&detail.summary.id, None, 100)
        .await
        .unwrap();
    let waited = logs
        .iter()
        .filter(|l| l.text.starts_with("quota api: waiting"))
        .count();
    assert_eq!(waited, 3, "{logs:?}");
    assert!(
        logs.iter().all(|l| l.attempt == 1),
        "waiting spends no attempt: {logs:?}"
    );
}

/// Parks once, as a kind waiting for an outside answer does (an n8n execution, a transaction's
/// receipt); its first attempt then fails, its second succeeds.
struct ParksThenFailsOnce;

#[async_trait]
impl StepKind for ParksThenFailsOnce {
    fn name(&self) -> &'static str {
        "parks_then_fails_once"
    }
    fn with_schema(&self) -> Value {
        serde_json::json!({})
    }
    async fn run(&self, call: StepCall) -> StepResult {
        match (call.checkpoint, call.attempt) {
            (None, _) => Ok(StepOutcome::Park {
                until: Some(0),
                checkpoint: serde_json::json!({ "sent": true }),
            }),
            (Some(_), 1) => Err(StepFailure::transient("flaky", "the answer was lost")),
            (Some(_), _) => Ok(StepOutcome::Output(Value::Null)),
        }
    }
}

/// A step takes one turn from its quota per attempt: waking from its own park to see the
/// answer is the same call and takes none; a retry is a new call and takes its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wake_takes_no_turn_of_its_quota_and_a_retry_takes_one() {
    let dir =
        TempDir(std::env::temp_dir().join(format!("switchyard-quota-park-{}", std::process::id())));
    let (engine, workflows, version) = engine_with(
        &dir,
        "id: once\nretry: {max_retries: 1, initial: 10ms}\nsteps:\n  - {id: call, type: parks_then_fails_once, quota: {name: hourly, limit: 2, per: 1h}}\n",
        "once",
    )
    .await;
    let mut registry = Registry::builtin();
    registry.add(ParksThenFailsOnce);
    let detail = run_to_its_end(&engine, registry, &workflows["once"], version).await;
    assert_eq!(detail.summary.status, RunStatus::Succeeded, "{detail:?}");
    assert_eq!(detail.steps[0].attempt, 2);
    let logs = engine
        .store()
        .step_logs(&detail.summary.id, None, 100)
        .await
        .unwrap();
    assert!(
        !logs
            .iter()
            .any(|l| l.text.starts_with("quota hourly: waiting")),
        "two turns of two, and no wait: {logs:?}"
    );
    // Both turns are taken: the next is half an hour away.
    let now = engine.now();
    let next = engine
        .quotas()
        .take("hourly", 2, Duration::from_secs(3_600), now, true)
        .await
        .unwrap();
    assert!(next > now + 1_700_000, "{}", next - now);
}

/// A quota kept in a Redis that stops answering: the step waits, spending no attempt, and runs
/// once Redis answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_quota_bucket_cannot_be_reached_waits_and_does_not_fail() {
    let Some(redis) = switchyard_engine::testing::OwnRedis::start() else {
        return;
    };
    let dir = TempDir(
        std::env::temp_dir().join(format!("switchyard-quota-frozen-{}", std::process::id())),
    );
    let (engine, workflows, version) = engine_with(
        &dir,
        "id: frozen\nretry: {max_retries: 1, initial: 10ms}\nsteps:\n  - {id: call, type: noop, quota: {name: api, limit: 10, per: 1s}}\n",
        "frozen",
    )
    .await;
    engine.set_quotas(Arc::new(
        switchyard_engine::quotas::RedisBuckets::connect(&redis.url)
            .await
            .unwrap(),
    ));
    redis.freeze();
    let thaw = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        redis.thaw();
        redis
    });
    let detail = run_to_its_end(&engine, Registry::builtin(), &workflows["frozen"], version).await;
    drop(thaw.await.unwrap());
    assert_eq!(detail.summary.status, RunStatus::Succeeded, "{detail:?}");
    assert_eq!(detail.steps[0].attempt, 1, "waiting spent no attempt");
    let logs = engine
        .store()
        .step_logs(&detail.summary.id, None, 100)
        .await
        .unwrap();
    assert!(
        logs.iter().any(|l| l
            .text
            .starts_with("quota api: its bucket cannot be reached")),
        "{logs:?}"
    );
}

/// A quota named without a limit reads it from the variable `quotas`; with neither, the step
/// fails for good, saying how to set one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_without_a_limit_anywhere_fails_saying_how_to_set_one() {
    let dir = TempDir(
        std::env::temp_dir().join(format!("switchyard-quota-unset-{}", std::process::id())),
    );
    let (engine, workflows, version) = engine_with(
        &dir,
        "id: unset\nretry: {max_retries: 3, initial: 10ms}\nsteps:\n  - {id: call, type: noop, quota: {name: pinata}}\n",
        "unset",
    )
    .await;
    let detail = run_to_its_end(&engine, Registry::builtin(), &workflows["unset"], version).await;
    assert_eq!(detail.summary.status, RunStatus::Failed);
    assert_eq!(detail.steps[0].attempt, 1);
    let error = detail.steps[0].error.as_deref().unwrap_or_default();
    assert!(error.contains("quota pinata has no limit"), "{error}");
    assert!(
        error.contains(r#"{"pinata": {"limit": N, "per": "1m"}}"#),
        "{error}"
    );
}
