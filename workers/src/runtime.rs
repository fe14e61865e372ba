//! The worker runtime. One loop per process claims jobs in batches up to its free slots, runs each
//! in its own task under the step's timeout, heartbeats every held lease in one statement, and
//! completes finished attempts in one batch, in the transaction that claims the next; two such
//! transactions may be in flight at once. A job whose
//! lease is not extended (its run was cancelled or timed out, or the lease was lost) has its task
//! aborted: dropping the future is what stops the step.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use serde_json::{Value, json};
use switchyard_engine::definition::{
    Secrets, TemplateContext, TemplateError, has_template, reads_run_data, render_value,
};
use switchyard_engine::plan::{Trigger, plan_run};
use switchyard_engine::service::Engine;
use switchyard_engine::state::{AttemptResult, Settlement, StepFailure, settle};
use switchyard_engine::store::{ClaimedJob, Completion, JobId, Lease, ParentLink, check_storable};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tracing::Instrument;

use crate::steps::{ChildRun, Registry, StepCall, StepOutcome};

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs run at once by this process.
    pub slots: usize,
    /// How long a claim holds a job without a heartbeat; heartbeats go out every third of it.
    pub lease: Duration,
    /// Longest wait between claims when no wake-up arrives.
    pub poll: Duration,
    /// On shutdown, how long running steps may take to finish before they are released.
    pub grace: Duration,
    /// Outputs larger than this (as JSON) are refused.
    pub max_output_bytes: usize,
    pub vars: Value,
    pub secrets: BTreeMap<String, String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            slots: 64,
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(250),
            grace: Duration::from_secs(10),
            max_output_bytes: 1024 * 1024,
            vars: Value::Object(Default::default()),
            secrets: BTreeMap::new(),
        }
    }
}

struct Shared {
    engine: Arc<Engine>,
    registry: Registry,
    config: WorkerConfig,
}

/// Store calls one loop keeps in flight. While one transaction completes and claims, the steps it
/// handed out finish and the next batch is already on its way, so neither the database nor the
/// steps wait for the other.
const STORE_CALLS_IN_FLIGHT: usize = 2;

/// The leases a heartbeat carried, and those the store extended.
type HeartbeatResult = (
    Vec<Lease>,
    Result<Vec<JobId>, switchyard_engine::store::StoreError>,
);

/// What a store call gives back: the jobs it claimed and how many it asked for.
struct Claimed {
    asked: usize,
    jobs: Result<Vec<ClaimedJob>, switchyard_engine::store::StoreError>,
}

/// Runs jobs until `shutdown` turns true, then stops claiming, lets running steps finish for the
/// grace period, and gives back what is still running.
pub async fn run_worker(
    engine: Arc<Engine>,
    registry: Registry,
    config: WorkerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let store = engine.store().clone();
    let wakeup = store.wakeup();
    let lease_ms = config.lease.as_millis() as i64;
    let slots = config.slots.max(1);
    let poll = config.poll;
    let grace = config.grace;
    let shared = Arc::new(Shared {
        engine: engine.clone(),
        registry,
        config,
    });
    let mut tasks: JoinSet<Completion> = JoinSet::new();
    let mut held: HashMap<JobId, (Lease, AbortHandle)> = HashMap::new();
    let mut finished: Vec<Completion> = Vec::new();
    let mut calls: FuturesUnordered<BoxFuture<'static, Claimed>> = FuturesUnordered::new();
    // Slots promised to claims in flight.
    let mut reserved = 0usize;
    let mut beating: Option<BoxFuture<'static, HeartbeatResult>> = None;
    let mut heartbeat = tokio::time::interval(Duration::from_millis((lease_ms / 3).max(1) as u64));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping: Option<tokio::time::Instant> = None;
    let mut want_claim = true;
    let mut lone_claim_in_flight = false;
    let mut claim_at: Option<tokio::time::Instant> = None;
    // After a short claim: when the next job falls due. Asked after the claimed jobs started.
    // Counted so that the answer is dropped when a later call went out meanwhile: that call's
    // own result tells what to do next.
    let mut calls_sent = 0u64;
    let mut next_due: Option<BoxFuture<'static, (u64, Option<i64>)>> = None;

    loop {
        let free = match stopping {
            None => slots.saturating_sub(held.len() + reserved),
            Some(_) => 0,
        };
        // Finished attempts always carry a claim for the free slots: it costs no extra commit.
        let asked = if want_claim || !finished.is_empty() {
            free
        } else {
            0
        };
        // Only completions overlap, and only large batches: a database settles a job for less
        // in a batch of hundreds than in two of half the size, so a second batch goes out beside
        // the first only once it holds half the slots. A claim alone waits for the call in
        // flight, and is waited for: two claims at once would split the free slots between
        // them, and a claim for one slot that comes back full says nothing about what else is
        // waiting.
        let send = if finished.is_empty() {
            asked > 0 && calls.is_empty()
        } else {
            calls.is_empty()
                || (calls.len() < STORE_CALLS_IN_FLIGHT
                    && !lone_claim_in_flight
                    && finished.len() >= slots / 2)
        };
        if send {
            let batch = std::mem::take(&mut finished);
            lone_claim_in_flight = batch.is_empty();
            reserved += asked;
            want_claim = false;
            claim_at = None;
            calls.push(Box::pin(store_call(engine.clone(), batch, asked, lease_ms)));
            calls_sent += 1;
        }
        if stopping.is_some() && held.is_empty() && calls.is_empty() && finished.is_empty() {
            return;
        }

        let can_claim = stopping.is_none() && held.len() + reserved < slots;
        tokio::select! {
            biased;
            changed = shutdown.changed(), if stopping.is_none() => {
                if changed.is_err() || *shutdown.borrow() {
                    tracing::info!(running = held.len(), "worker stopping: no new claims");
                    stopping = Some(tokio::time::Instant::now() + grace);
                }
            }
            Some(claimed) = calls.next(), if !calls.is_empty() => {
                reserved -= claimed.asked;
                lone_claim_in_flight = false;
                match claimed.jobs {
                    Ok(jobs) => {
                        let got = jobs.len();
                        for job in jobs {
                            let lease = job.lease.clone();
                            let handle = tasks.spawn(execute(shared.clone(), job));
                            held.insert(lease.job_id, (lease, handle));
                        }
                        if claimed.asked > 0 && got == claimed.asked {
                            // A full claim: more may be waiting.
                            want_claim = true;
                        } else if claimed.asked > 0 {
                            let store = store.clone();
                            let sent = calls_sent;
                            next_due = Some(Box::pin(async move {
                                (sent, store.next_due().await.ok().flatten())
                            }));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "claim failed; backing off");
                        claim_at = Some(tokio::time::Instant::now() + poll);
                    }
                }
            }
            (sent, due) = async { next_due.as_mut().expect("guarded").await }, if next_due.is_some() => {
                next_due = None;
                if sent != calls_sent {
                    continue;
                }
                // Never zero: a job that fell due between the claim and the query has no
                // wake-up to wait for, so claim again soon.
                let wait = due.map_or(poll, |due| {
                    Duration::from_millis((due - engine.now()).max(0) as u64)
                        .clamp(Duration::from_millis(5), poll)
                });
                claim_at = Some(tokio::time::Instant::now() + wait);
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                for done in std::iter::once(done).chain(std::iter::from_fn(|| tasks.try_join_next())) {
                    match done {
                        Ok(c) => {
                            held.remove(&c.lease.job_id);
                            finished.push(c);
                        }
                        // Aborted tasks have left `held` already. A panic outside the step kind
                        // (a step kind's own is its attempt's failure) keeps no slot and no
                        // heartbeat: once its claim's lease runs out, the sweeper reclaims it.
                        Err(e) if e.is_panic() => {
                            tracing::error!(error = %e, "step panicked");
                            held.retain(|_, (_, handle)| handle.id() != e.id());
                        }
                        Err(_) => {}
                    }
                }
            }
            _ = heartbeat.tick(), if !held.is_empty() && beating.is_none() => {
                // In flight like the other store calls, never awaited here: the loop must keep
                // driving the calls that hold connections the heartbeat may be waiting for.
                let leases: Vec<Lease> = held.values().map(|(l, _)| l.clone()).collect();
                let until = engine.now() + lease_ms;
                let store = store.clone();
                beating = Some(Box::pin(async move {
                    let kept = store.heartbeat(&leases, until).await;
                    (leases, kept)
                }));
            }
            (leases, kept) = async { beating.as_mut().expect("guarded").await }, if beating.is_some() => {
                beating = None;
                match kept {
                    Ok(kept) => {
                        let kept: HashSet<JobId> = kept.into_iter().collect();
                        // Only the leases this heartbeat carried: jobs claimed since are not in
                        // it, nor is a later lease on the same job.
                        for lease in leases.iter().filter(|l| !kept.contains(&l.job_id)) {
                            if held.get(&lease.job_id).is_some_and(|(held, _)| held == lease)
                                && let Some((_, handle)) = held.remove(&lease.job_id)
                            {
                                tracing::info!(job = lease.job_id, "lease gone (cancelled, timed out or reclaimed): stopping the step");
                                handle.abort();
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
            _ = async { tokio::time::sleep_until(stopping.expect("guarded")).await }, if stopping.is_some() => {
                // Grace is over: stop what still runs and give it back uncounted.
                let released: Vec<Completion> = held
                    .drain()
                    .map(|(_, (lease, handle))| {
                        handle.abort();
                        Completion { lease, settlement: Settlement::Release, children: Vec::new() }
                    })
                    .collect();
                tracing::info!(released = released.len(), "grace period over: released running jobs");
                finished.extend(released);
            }
            _ = wakeup.notified(), if can_claim => want_claim = true,
            _ = async { tokio::time::sleep_until(claim_at.expect("guarded")).await },
                if can_claim && claim_at.is_some() => want_claim = true,
        }
    }
}

/// Completes `batch` and claims up to `asked` jobs in one transaction
/// ([`Engine::complete_and_claim`]).
async fn store_call(
    engine: Arc<Engine>,
    batch: Vec<Completion>,
    asked: usize,
    lease_ms: i64,
) -> Claimed {
    let started = std::time::Instant::now();
    let done = engine
        .complete_and_claim(batch.clone(), asked as u32, lease_ms)
        .await;
    switchyard_engine::metrics::claimed(started.elapsed());
    let jobs = match done {
        Ok((accepted, claimed)) => {
            // Child runs exist once their parent's parking committed.
            for c in batch.iter().filter(|c| accepted.contains(&c.lease.job_id)) {
                for child in &c.children {
                    switchyard_engine::metrics::run_started(&child.workflow_id);
                }
            }
            Ok(claimed)
        }
        Err(e) if !batch.is_empty() => {
            tracing::error!(error = %e, "could not record completions; their leases will expire and the jobs run again");
            Err(e)
        }
        Err(e) => Err(e),
    };
    Claimed { asked, jobs }
}

async fn execute(shared: Arc<Shared>, job: ClaimedJob) -> Completion {
    let span = tracing::info_span!("step", run = %job.run_id, workflow = %job.workflow_id,
        step = %job.step_id, attempt = job.lease.attempt);
    async move {
        let started = std::time::Instant::now();
        let (result, children) = attempt(&shared, &job).await;
        let now = shared.engine.now();
        let policy = match shared.engine.version(&job.workflow_id, job.version).await {
            Ok(workflow) => workflow
                .step(&job.step_id)
                .map(|s| workflow.retry_policy(s))
                .unwrap_or_default(),
            Err(_) => Default::default(),
        };
        let settlement = settle(job.lease.attempt, &policy, result, now, rand::random());
        switchyard_engine::metrics::step_finished(
            &job.workflow_id,
            &job.step_id,
            settlement.target().as_str(),
            started.elapsed(),
        );
        match &settlement {
            Settlement::Succeed { .. } => tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "step succeeded"
            ),
            Settlement::Retry { at, error } => {
                tracing::warn!(%error, retry_at = at, "step failed; will retry")
            }
            Settlement::Fail { error } => tracing::warn!(%error, "step failed"),
            Settlement::Park { until, .. } => tracing::info!(?until, "step parked"),
            Settlement::Release => {}
        }
        Completion {
            lease: job.lease.clone(),
            settlement,
            children,
        }
    }
    .instrument(span)
    .await
}

/// Runs one attempt of a claimed job. Never fails: every problem is an attempt result.
async fn attempt(
    shared: &Shared,
    job: &ClaimedJob,
) -> (AttemptResult, Vec<switchyard_engine::store::NewRun>) {
    let engine = &shared.engine;
    let config = &shared.config;
    let failed = |f: StepFailure| (AttemptResult::Failed(f), Vec::new());
    let workflow = match engine.version(&job.workflow_id, job.version).await {
        Ok(w) => w,
        Err(e) => return failed(StepFailure::transient("definition", e.to_string())),
    };
    let Some(step) = workflow.step(&job.step_id) else {
        return failed(StepFailure::permanent(
            "definition",
            format!(
                "step {} is not in {} v{}",
                job.step_id, job.workflow_id, job.version
            ),
        ));
    };
    let Some(kind) = shared.registry.get(&step.kind) else {
        return failed(StepFailure::permanent(
            "unknown_step_kind",
            format!("this worker has no step kind {:?}", step.kind),
        ));
    };
    let (vars, secrets) = match template_values(engine, config).await {
        Ok(values) => values,
        Err(e) => {
            return failed(StepFailure::transient(
                "settings",
                format!("variables and secrets could not be read: {e}"),
            ));
        }
    };
    let secrets = Secrets::new(secrets);
    let ctx = TemplateContext {
        input: job.input.clone(),
        steps: job.outputs.clone(),
        vars,
        secrets: secrets.clone(),
        run: json!({
            "id": job.run_id,
            "workflow": job.workflow_id,
            "version": job.version,
            "step": job.step_id,
            "attempt": job.lease.attempt,
            "scheduled_at": job.scheduled_at,
        }),
        env: BTreeMap::new(),
    };
    // A template may sort or search long lists within its fuel for seconds: off the async
    // threads, where it would stall every other step of this worker.
    let rendered = if has_template(&step.with) {
        let template = step.with.clone();
        tokio::task::spawn_blocking(move || render_value(&template, &ctx))
            .await
            .unwrap_or_else(|e| Err(TemplateError::Render(format!("the render stopped: {e}"))))
    } else {
        Ok(step.with.clone())
    };
    let with = match rendered {
        Ok(with) => with,
        Err(e) => return failed(StepFailure::permanent("template", e.to_string())),
    };
    // A reference anywhere else would be sent, stored or shown as it is: refuse the attempt.
    let allowed = kind.secret_fields();
    let misplaced = match &with {
        Value::Object(fields) => fields
            .iter()
            .filter(|(field, _)| !allowed.contains(&field.as_str()))
            .find_map(|(field, value)| Some((field.as_str(), secrets.find_in(value)?))),
        other => secrets.find_in(other).map(|path| ("", path)),
    };
    if let Some((field, path)) = misplaced {
        let where_ = match allowed {
            [] => "nowhere".to_owned(),
            fields => fields
                .iter()
                .map(|f| format!("`with.{f}`"))
                .collect::<Vec<_>>()
                .join(" and "),
        };
        return failed(StepFailure::permanent(
            "secret_misplaced",
            format!(
                "`with.{field}` uses a secret (at {path}); {} steps take secrets in {where_}",
                step.kind
            ),
        ));
    }
    let reads_run_data = match &step.with {
        Value::Object(fields) => fields
            .iter()
            .filter(|(_, template)| reads_run_data(template))
            .map(|(field, _)| field.clone())
            .collect(),
        _ => Vec::new(),
    };
    let call = StepCall {
        with,
        secrets,
        reads_run_data,
        checkpoint: job.checkpoint.clone(),
        idempotency_key: format!("{}:{}", job.run_id, job.step_id),
        run_id: job.run_id.clone(),
        step_id: job.step_id.clone(),
        attempt: job.lease.attempt,
        now: engine.now(),
    };
    // A step kind that panics fails its attempt like any error, under the step's retry policy:
    // the job is settled now, not when a lease its claim shares with other jobs runs out.
    let run = async {
        // The call itself inside the guarded future: a kind may panic before its future exists.
        AssertUnwindSafe(async { kind.run(call).await })
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".to_owned());
                Err(StepFailure::transient(
                    "panic",
                    format!("step kind {} panicked: {message}", step.kind),
                ))
            })
    };
    let outcome = match step.timeout {
        Some(limit) => match tokio::time::timeout(limit.0, run).await {
            Ok(outcome) => outcome,
            Err(_) => Err(StepFailure::transient(
                "timeout",
                format!(
                    "step timed out after {}",
                    humantime::format_duration(limit.0)
                ),
            )),
        },
        None => run.await,
    };
    match outcome {
        Ok(StepOutcome::Output(output)) => {
            let size = serde_json::to_vec(&output).map_or(0, |v| v.len());
            if size > config.max_output_bytes {
                return failed(StepFailure::permanent(
                    "output_too_large",
                    format!(
                        "output is {size} bytes; the limit is {} bytes",
                        config.max_output_bytes
                    ),
                ));
            }
            // Refused here, the value fails only this attempt; in the batch, it would fail
            // every completion beside it.
            if let Err(problem) = check_storable(&output) {
                return failed(StepFailure::permanent(
                    "output_unstorable",
                    format!("output {problem}"),
                ));
            }
            (AttemptResult::Succeeded { output }, Vec::new())
        }
        Ok(StepOutcome::Park { until, checkpoint }) => match check_storable(&checkpoint) {
            Ok(()) => (AttemptResult::Parked { until, checkpoint }, Vec::new()),
            Err(problem) => failed(StepFailure::permanent(
                "checkpoint_unstorable",
                format!("checkpoint {problem}"),
            )),
        },
        Ok(StepOutcome::StartChildren(children)) => {
            match plan_children(engine, job, children).await {
                Ok(runs) => (
                    AttemptResult::Parked {
                        until: None,
                        checkpoint: json!({ "children": runs.iter().map(|r| &r.id).collect::<Vec<_>>() }),
                    },
                    runs,
                ),
                Err(f) => failed(f),
            }
        }
        Err(failure) => failed(failure),
    }
}

/// The variables and secrets a step's templates see: this process's own (from its environment),
/// with the ones stored over the API taking precedence.
async fn template_values(
    engine: &Engine,
    config: &WorkerConfig,
) -> Result<(Value, BTreeMap<String, String>), switchyard_engine::store::StoreError> {
    let stored = switchyard_engine::settings::template_values(engine).await?;
    let mut vars = match &config.vars {
        Value::Object(map) => map.clone(),
        _ => serde_json::Map::new(),
    };
    vars.extend(stored.vars.clone());
    let mut secrets = config.secrets.clone();
    secrets.extend(stored.secrets.clone());
    Ok((Value::Object(vars), secrets))
}

async fn plan_children(
    engine: &Engine,
    job: &ClaimedJob,
    children: Vec<ChildRun>,
) -> Result<Vec<switchyard_engine::store::NewRun>, StepFailure> {
    let mut runs = Vec::with_capacity(children.len());
    for (index, child) in children.into_iter().enumerate() {
        let (version, workflow) = engine
            .latest(&child.workflow)
            .await
            .map_err(|e| StepFailure::permanent("child_workflow", e.to_string()))?;
        let trigger = Trigger {
            parent: Some(ParentLink {
                run_id: job.run_id.clone(),
                job_id: job.lease.job_id,
                index: index as i64,
            }),
            ..Trigger::default()
        };
        runs.push(
            plan_run(&workflow, version, child.input, trigger)
                .map_err(|e| StepFailure::permanent("child_workflow", e.to_string()))?,
        );
    }
    Ok(runs)
}
