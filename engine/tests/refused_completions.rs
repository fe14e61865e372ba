//! A batch of completions that the database refuses because of one of them: the others still
//! commit, and that one fails its step with the database's reason. The refusal is real: a trigger
//! installed in the test's own database raises an error for one output, on both stores.

use std::sync::Arc;

use serde_json::{Value, json};
use switchyard_engine::clock::ManualClock;
use switchyard_engine::definition::{Format, WorkflowMap, parse_str};
use switchyard_engine::plan::{Trigger, plan_run};
use switchyard_engine::service::Engine;
use switchyard_engine::state::{RunStatus, Settlement};
use switchyard_engine::store::{ClaimParams, Completion, DefinitionOrigin, Store};

const T0: i64 = 1_800_000_000_000;
const LEASE: i64 = 30_000;

async fn a_refused_completion_fails_only_its_step(store: Arc<dyn Store>) {
    let engine = Engine::new(store.clone(), Arc::new(ManualClock::new(T0)));
    let mut workflows = WorkflowMap::new();
    for wf in parse_str(
        "one.yaml",
        "id: one\nsteps:\n  - {id: a, type: noop}\n",
        Format::Yaml,
    )
    .unwrap()
    {
        workflows.insert(wf.id.clone(), Arc::new(wf));
    }
    let version = engine
        .install(&workflows, DefinitionOrigin::Files, None)
        .await
        .unwrap()[0]
        .1;
    let runs = (0..10)
        .map(|_| plan_run(&workflows["one"], version, Value::Null, Trigger::default()).unwrap())
        .collect();
    store.create_runs(runs, T0).await.unwrap();
    let jobs = store
        .claim(ClaimParams {
            limit: 10,
            now: T0,
            lease_until: T0 + LEASE,
        })
        .await
        .unwrap();
    assert_eq!(jobs.len(), 10);
    let batch: Vec<Completion> = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| Completion {
            lease: job.lease.clone(),
            settlement: Settlement::Succeed {
                output: if i == 6 { json!("poison") } else { json!("ok") },
            },
            children: Vec::new(),
            logs: Vec::new(),
            artifacts: Vec::new(),
            usage: Vec::new(),
        })
        .collect();

    let (accepted, claimed) = engine.complete_and_claim(batch, 5, LEASE).await.unwrap();
    assert_eq!(
        accepted.len(),
        10,
        "every completion is recorded, one as a failure"
    );
    assert!(claimed.is_empty(), "nothing is left to claim");
    for (i, job) in jobs.iter().enumerate() {
        let run = engine.run(&job.run_id).await.unwrap();
        if i == 6 {
            assert_eq!(run.summary.status, RunStatus::Failed);
            let error = run.steps[0].error.as_deref().unwrap();
            assert!(
                error.contains("the database refused this attempt's result")
                    && error.contains("poisoned output"),
                "{error}"
            );
        } else {
            assert_eq!(run.summary.status, RunStatus::Succeeded, "{run:?}");
            assert_eq!(run.steps[0].output, Some(json!("ok")));
        }
    }
}

#[tokio::test]
async fn sqlite_batch_with_a_refused_completion_commits_the_others() {
    let dir = std::env::temp_dir().join(format!("switchyard-refused-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/store.db", dir.display());
    let store = switchyard_engine::store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let raw = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::query(
        "CREATE TRIGGER refuse_poison BEFORE UPDATE OF output ON jobs \
         WHEN NEW.output LIKE '%poison%' BEGIN SELECT RAISE(ABORT, 'poisoned output'); END",
    )
    .execute(&raw)
    .await
    .unwrap();
    a_refused_completion_fails_only_its_step(store).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn postgres_batch_with_a_refused_completion_commits_the_others() {
    let base = switchyard_engine::testing::postgres_url();
    let raw = match sqlx::PgPool::connect(&base).await {
        Ok(pool) => pool,
        Err(e) => {
            switchyard_engine::testing::postgres_unreachable(e);
            return;
        }
    };
    let schema = format!("refused_{}", std::process::id());
    let store = switchyard_engine::store::connect(&format!("{base}?options[search_path]={schema}"))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    for statement in [
        format!(
            "CREATE FUNCTION {schema}.refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF NEW.output::text LIKE '%poison%' THEN \
                 RAISE EXCEPTION 'poisoned output' USING ERRCODE = 'check_violation'; \
             END IF; RETURN NEW; END $$"
        ),
        format!(
            "CREATE TRIGGER refuse_poison BEFORE UPDATE OF output ON {schema}.jobs \
             FOR EACH ROW EXECUTE FUNCTION {schema}.refuse_poison()"
        ),
    ] {
        sqlx::query(&statement).execute(&raw).await.unwrap();
    }
    a_refused_completion_fails_only_its_step(store).await;
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&raw)
        .await
        .unwrap();
}
