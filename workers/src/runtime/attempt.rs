//! One attempt of a claimed job, in its own task: read the step's definition, render its `with`,
//! run its kind under the step's timeout, and settle the result under the step's retry policy.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use serde_json::{Value, json};
use switchyard_engine::definition::{
    MAX_ITEMS, RetryPolicy, Secrets, Step, TemplateContext, TemplateError, has_template, is_truthy,
    reads_run_data, render_value,
};
use switchyard_engine::plan::{Trigger, kind_of, plan_run};
use switchyard_engine::service::{Engine, EngineError};
use switchyard_engine::state::{AttemptResult, Settlement, StepFailure, settle};
use switchyard_engine::store::{
    ClaimedJob, Completion, JobId, Lease, LoopContext, NewRun, ParentLink, check_storable,
};
use tracing::Instrument;

use super::{WorkerConfig, panic_message};
use crate::artifacts::AttemptArtifacts;
use crate::steps::EVERY_FIELD;
use crate::steps::{ChildRun, Registry, StepCall, StepLog, StepOutcome};
use crate::usage::UsageMeter;

/// What every attempt of this process shares.
pub(super) struct Steps {
    pub engine: Arc<Engine>,
    pub registry: Registry,
    pub config: WorkerConfig,
    /// What the items of running loops share, by the loop step's job (see [`Steps::loop_context`]).
    pub loops: std::sync::Mutex<BTreeMap<JobId, Arc<LoopContext>>>,
}

/// How many loops' contexts a worker keeps; past it, it forgets them all and reads again.
const LOOPS_KEPT: usize = 64;

impl Steps {
    /// The run input and outputs every item of a loop sees: read once per loop, not carried by
    /// each item's claim (a loop over a list in its input would carry the list 10,000 times).
    async fn loop_context(&self, loop_job: JobId) -> Result<Arc<LoopContext>, EngineError> {
        if let Some(context) = self.lock_loops().get(&loop_job) {
            return Ok(context.clone());
        }
        let context = Arc::new(self.engine.store().loop_context(loop_job).await?);
        let mut loops = self.lock_loops();
        if loops.len() >= LOOPS_KEPT {
            loops.clear();
        }
        loops.insert(loop_job, context.clone());
        Ok(context)
    }

    fn lock_loops(&self) -> std::sync::MutexGuard<'_, BTreeMap<JobId, Arc<LoopContext>>> {
        self.loops
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

pub(super) async fn execute(shared: Arc<Steps>, job: ClaimedJob) -> Completion {
    let span = tracing::info_span!("step", run = %job.run_id, workflow = %job.workflow_id,
        step = %job.step_id, attempt = job.lease.attempt);
    async move {
        let started = std::time::Instant::now();
        let log = StepLog::default();
        let files = AttemptArtifacts::new(shared.engine.artifacts());
        let usage = UsageMeter::default();
        let (result, children, policy) =
            match shared.engine.version(&job.workflow_id, job.version).await {
                Err(e) => (
                    AttemptResult::Failed(unreadable_definition(&job, &e)),
                    Vec::new(),
                    RetryPolicy::default(),
                ),
                // An item of a `for_each` step runs that step.
                Ok(workflow) => {
                    match workflow.step(job.item.as_ref().map_or(&job.step_id, |i| &i.step_id)) {
                        None => (
                            AttemptResult::Failed(StepFailure::permanent(
                                "definition",
                                format!(
                                    "step {} is not in {} v{}",
                                    job.step_id, job.workflow_id, job.version
                                ),
                            )),
                            Vec::new(),
                            RetryPolicy::default(),
                        ),
                        Some(step) => {
                            let (result, children) = storing_live_logs(
                                &shared.engine,
                                &job.lease,
                                &log,
                                attempt(&shared, &job, step, &log, &files, &usage),
                            )
                            .await;
                            (result, children, workflow.retry_policy(step))
                        }
                    }
                }
            };
        let now = shared.engine.now();
        // A failure of a step that continues on error is tolerated by the store, whichever way
        // it came.
        let settlement = settle(job.lease.attempt, &policy, result, now, rand::random());
        let settlement_kept = matches!(
            settlement,
            Settlement::Succeed { .. } | Settlement::Park { .. }
        );
        // An item counts as its step: one series per step, not per item.
        switchyard_engine::metrics::step_finished(
            &job.workflow_id,
            job.item.as_ref().map_or(&job.step_id, |i| &i.step_id),
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
            // A worker never decides a toleration: the store does, for a step that continues
            // on error.
            Settlement::Fail { error } | Settlement::Tolerate { error } => {
                tracing::warn!(%error, "step failed")
            }
            Settlement::Park {
                until: Some(until), ..
            } => tracing::info!(until, "step parked"),
            Settlement::Park { until: None, .. } => {
                tracing::info!("step parked until an answer or a signal wakes it")
            }
            Settlement::Loop { items, .. } => {
                tracing::info!(items = items.len(), "step waits for its items")
            }
            Settlement::Skip { reason } => tracing::info!(%reason, "step skipped"),
            Settlement::Release => {}
        }
        Completion {
            lease: job.lease.clone(),
            settlement,
            children,
            logs: log.take(),
            // A file counts only for the result that names it: a failed attempt's are swept.
            artifacts: if settlement_kept {
                files.take_saved()
            } else {
                Vec::new()
            },
            usage: usage.take(&job.workflow_id),
        }
    }
    .instrument(span)
    .await
}

/// How often the lines a running step printed are stored, for `logs --follow`.
const LIVE_LOGS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs `work`, storing what the attempt prints every [`LIVE_LOGS_EVERY`] meanwhile. A write
/// under way when `work` ends is finished, not dropped, so that no line is stored twice: the
/// lines left go with the completion.
async fn storing_live_logs<T>(
    engine: &Engine,
    lease: &Lease,
    log: &StepLog,
    work: impl Future<Output = T>,
) -> T {
    let done = tokio::sync::Notify::new();
    let work = async {
        let out = work.await;
        done.notify_one();
        out
    };
    let store = async {
        loop {
            tokio::select! {
                () = done.notified() => return,
                () = tokio::time::sleep(LIVE_LOGS_EVERY) => {}
            }
            let Some(lines) = log.take_live() else {
                continue;
            };
            match engine.store().append_live_logs(lease, &lines).await {
                Ok(true) => {}
                // Its job is someone else's now: its completion will be refused, lines and all.
                Ok(false) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "log lines wait for the completion");
                    log.put_back(lines);
                }
            }
        }
    };
    tokio::join!(work, store).0
}

/// Runs one attempt of a claimed job. Never fails: every problem is an attempt result.
async fn attempt(
    shared: &Steps,
    job: &ClaimedJob,
    step: &Step,
    log: &StepLog,
    files: &AttemptArtifacts,
    usage: &UsageMeter,
) -> (AttemptResult, Vec<NewRun>) {
    let engine = &shared.engine;
    let config = &shared.config;
    let failed = |f: StepFailure| (AttemptResult::Failed(f), Vec::new());
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
    let (input, steps) = match &job.item {
        None => (job.input.clone(), job.outputs.clone()),
        // An item whose step renders nothing needs none of it (copying a large input for each
        // of 10,000 items is what a loop spends its time on).
        Some(_) if !has_template(&step.with) => (Value::Null, serde_json::Map::new()),
        Some(item) => match shared.loop_context(item.loop_job).await {
            Ok(shared) => (shared.input.clone(), shared.outputs.clone()),
            Err(e) => {
                return failed(StepFailure::transient(
                    "loop_context",
                    format!("the input and outputs of its loop could not be read: {e}"),
                ));
            }
        },
    };
    let ctx = TemplateContext {
        input,
        steps,
        vars: vars.clone(),
        secrets: secrets.clone(),
        run: json!({
            "id": job.run_id,
            "workflow": job.workflow_id,
            "version": job.version,
            "step": job.step_id,
            "attempt": job.lease.attempt,
            "scheduled_at": job.scheduled_at,
            "error": job.run_error,
        }),
        env: BTreeMap::new(),
        item: job.item.as_ref().map(|i| (i.value.clone(), i.index)),
    };
    // A step woken from a park has run already: its condition held. An item's step did too.
    let first_run = first_run(job);
    if let (Some(when), true) = (&step.when, first_run) {
        let condition = Value::String(when.clone());
        let scope = ctx.clone();
        let rendered = tokio::task::spawn_blocking(move || render_value(&condition, &scope))
            .await
            .unwrap_or_else(|e| Err(TemplateError::Render(format!("the render stopped: {e}"))));
        match rendered {
            Ok(value) if !is_truthy(&value) => {
                let shown = serde_json::to_string(&value).unwrap_or_default();
                let reason = format!("when {when:?} rendered {shown}");
                return (AttemptResult::Skipped { reason }, Vec::new());
            }
            Ok(_) => {}
            Err(e) => {
                return failed(StepFailure::permanent("template", format!("when: {e}")));
            }
        }
    }
    if let (Some(for_each), true) = (&step.for_each, first_run) {
        return match loop_items(for_each, &ctx, &secrets).await {
            Ok(items) if items.is_empty() => (
                AttemptResult::Succeeded {
                    output: Value::Array(items),
                },
                Vec::new(),
            ),
            // Its items run with the outputs it was given: kept with it, read once per item.
            Ok(items) => (
                AttemptResult::Looped {
                    items,
                    parallel: step.parallel,
                    checkpoint: json!({ "outputs": job.outputs }),
                },
                Vec::new(),
            ),
            Err(failure) => failed(failure),
        };
    }
    // A template may sort or search long lists within its fuel for seconds: off the async
    // threads, where it would stall every other step of this worker.
    // Fields the kind takes as written (a script's code) are not templates, whatever they hold.
    let literal = kind.literal_fields();
    let (template, kept) = match &step.with {
        Value::Object(fields) if !literal.is_empty() => {
            let (kept, rest): (serde_json::Map<_, _>, serde_json::Map<_, _>) = fields
                .clone()
                .into_iter()
                .partition(|(field, _)| literal.contains(&field.as_str()));
            (Value::Object(rest), kept)
        }
        other => (other.clone(), serde_json::Map::new()),
    };
    let rendered = if has_template(&template) {
        let template = template.clone();
        tokio::task::spawn_blocking(move || render_value(&template, &ctx))
            .await
            .unwrap_or_else(|e| Err(TemplateError::Render(format!("the render stopped: {e}"))))
    } else {
        Ok(template.clone())
    };
    let with = match rendered {
        Ok(Value::Object(mut fields)) => {
            fields.extend(kept);
            Value::Object(fields)
        }
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
    let reads_run_data = match &template {
        Value::Object(fields) => fields
            .iter()
            .filter(|(_, template)| reads_run_data(template))
            .map(|(field, _)| field.clone())
            .collect(),
        // A `with` rendered whole from run data: every field may come from it.
        whole if reads_run_data(whole) => vec![EVERY_FIELD.to_owned()],
        _ => Vec::new(),
    };
    if let Some(quota) = &step.quota {
        match wait_for_quota(engine, job, quota, &vars, log).await {
            Ok(None) => {}
            Ok(Some(parked)) => return (parked, Vec::new()),
            Err(f) => return failed(f),
        }
    }
    let sent = secrets.clone();
    log.redact_with(sent.clone());
    let call = StepCall {
        with,
        secrets,
        reads_run_data,
        checkpoint: kinds_checkpoint(job.checkpoint.as_ref()),
        idempotency_key: format!("{}:{}", job.run_id, job.step_id),
        job_id: Some(job.lease.job_id),
        run_id: job.run_id.clone(),
        step_id: job.step_id.clone(),
        attempt: job.lease.attempt,
        now: engine.now(),
        log: log.clone(),
        artifacts: files.clone(),
        vars,
        usage: usage.clone(),
    };
    // A step kind that panics fails its attempt like any error, under the step's retry policy:
    // the job is settled now, not when a lease its claim shares with other jobs runs out.
    let run = async {
        // The call itself inside the guarded future: a kind may panic before its future exists.
        AssertUnwindSafe(async { kind.run(call).await })
            .catch_unwind()
            .await
            .unwrap_or_else(|panic| {
                Err(StepFailure::transient(
                    "panic",
                    format!(
                        "step kind {} panicked: {}",
                        step.kind,
                        panic_message(&*panic)
                    ),
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
        Ok(StepOutcome::Output(mut output)) => {
            sent.redact_sent(&mut output);
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
            Ok(()) => {
                let checkpoint = with_quota_note(checkpoint, step, job, engine.now());
                (AttemptResult::Parked { until, checkpoint }, Vec::new())
            }
            Err(problem) => failed(StepFailure::permanent(
                "checkpoint_unstorable",
                format!("checkpoint {problem}"),
            )),
        },
        Ok(StepOutcome::StartChildren(children)) => {
            match plan_children(engine, job, children).await {
                Ok(runs) => {
                    let children =
                        json!({ "children": runs.iter().map(|r| &r.id).collect::<Vec<_>>() });
                    let checkpoint = with_quota_note(children, step, job, engine.now());
                    (
                        AttemptResult::Parked {
                            until: None,
                            checkpoint,
                        },
                        runs,
                    )
                }
                Err(f) => failed(f),
            }
        }
        Err(mut failure) => {
            let mut message = Value::String(failure.message);
            sent.redact_sent(&mut message);
            failure.message = message.as_str().unwrap_or_default().to_owned();
            failed(failure)
        }
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
) -> Result<Vec<NewRun>, StepFailure> {
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

/// Why an attempt failed when its step's definition could not be read. Without the definition
/// there is no retry policy to follow but the default: a database that was away for a moment
/// is worth its retries; a definition that is gone or does not load reads no better next time.
fn unreadable_definition(job: &ClaimedJob, e: &EngineError) -> StepFailure {
    let message = format!(
        "the definition of {} v{} could not be read: {e}",
        job.workflow_id, job.version
    );
    match e {
        EngineError::Store(e) if e.is_transient() => {
            StepFailure::transient("definition_unreadable", message)
        }
        _ => StepFailure::permanent("definition_unreadable", message),
    }
}

/// Where a step parked for its quota notes it in its checkpoint, beside whatever its kind keeps.
const QUOTA_KEY: &str = "quota";
/// How long a step waits before asking again for a turn its quota's bucket could not give
/// (Redis or the database did not answer).
const QUOTA_UNREACHABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A parking step's checkpoint with the note that this attempt had its quota's turn, so waking
/// for its answer (an n8n execution's, a transaction's receipt) takes none; the next attempt, a
/// new call, takes its own.
fn with_quota_note(
    checkpoint: Value,
    step: &Step,
    job: &ClaimedJob,
    now: switchyard_engine::state::Millis,
) -> Value {
    let (Some(quota), Value::Object(mut kept)) = (&step.quota, checkpoint.clone()) else {
        return checkpoint;
    };
    kept.insert(
        QUOTA_KEY.to_owned(),
        json!({ "name": quota.name, "attempt": job.lease.attempt, "at": now }),
    );
    Value::Object(kept)
}

/// The checkpoint the kind kept, without the runtime's note of a quota wait.
fn kinds_checkpoint(checkpoint: Option<&Value>) -> Option<Value> {
    match checkpoint? {
        Value::Null => None,
        Value::Object(kept) if kept.contains_key(QUOTA_KEY) => {
            let mut kept = kept.clone();
            kept.remove(QUOTA_KEY);
            (!kept.is_empty()).then_some(Value::Object(kept))
        }
        other => Some(other.clone()),
    }
}

/// Takes the step's turn from its quota bucket. `Ok(None)`: it may run now (its turn came, or
/// it was woken at the turn it parked for); `Ok(Some(parked))`: park until its turn, slot free,
/// the turn kept in the checkpoint so the wake does not take another.
async fn wait_for_quota(
    engine: &switchyard_engine::service::Engine,
    job: &ClaimedJob,
    quota: &switchyard_engine::definition::QuotaSpec,
    vars: &Value,
    log: &StepLog,
) -> Result<Option<AttemptResult>, StepFailure> {
    // A kind that keeps a bare value has no room for the note of its turn: it is woken with its
    // turn taken.
    if job
        .checkpoint
        .as_ref()
        .is_some_and(|c| !c.is_object() && !c.is_null())
    {
        return Ok(None);
    }
    let noted = job.checkpoint.as_ref().and_then(|c| c.get(QUOTA_KEY));
    if let Some(noted) =
        noted.filter(|q| q["attempt"].as_u64() == Some(u64::from(job.lease.attempt)))
    {
        // Its turn is taken: a signal or an answer that woke it early does not move the turn.
        return Ok(match noted["at"].as_i64() {
            Some(at) if at > engine.now() => Some(AttemptResult::Parked {
                until: Some(at),
                checkpoint: job.checkpoint.clone().unwrap_or_default(),
            }),
            _ => None,
        });
    }
    let set = &vars["quotas"][&quota.name];
    let limit = quota
        .limit
        .or_else(|| set["limit"].as_u64().and_then(|l| u32::try_from(l).ok()))
        .filter(|l| *l > 0);
    let per = quota.per.map(|p| p.0).or_else(|| {
        set["per"]
            .as_str()
            .and_then(|p| humantime::parse_duration(p).ok())
    });
    let (Some(limit), Some(per)) = (limit, per.filter(|p| !p.is_zero())) else {
        return Err(StepFailure::permanent(
            "quota",
            format!(
                "quota {} has no limit: give the step `quota: {{name, limit, per}}`, or set the \
                 variable quotas to {{\"{}\": {{\"limit\": N, \"per\": \"1m\"}}}}",
                quota.name, quota.name
            ),
        ));
    };
    let now = engine.now();
    let at = match engine
        .quotas()
        .take(&quota.name, limit, per, now, true)
        .await
    {
        Ok(at) => at,
        // The bucket's keeper (Redis, the database) is away: no turn can be given, and the
        // step has not failed, so it waits as a step over its quota does, spending no attempt.
        Err(e) => {
            log.line(
                "warn",
                format!(
                    "quota {}: its bucket cannot be reached ({e}); trying again in {} s",
                    quota.name,
                    QUOTA_UNREACHABLE_WAIT.as_secs()
                ),
            );
            return Ok(Some(AttemptResult::Parked {
                until: Some(now.saturating_add(QUOTA_UNREACHABLE_WAIT.as_millis() as i64)),
                checkpoint: job.checkpoint.clone().unwrap_or_default(),
            }));
        }
    };
    if at <= now {
        return Ok(None);
    }
    let note = json!({ "name": quota.name, "attempt": job.lease.attempt, "at": at });
    // Only the runtime's own keys are here (the kind has kept nothing yet): the note joins them.
    let mut checkpoint = match job.checkpoint.clone() {
        Some(Value::Object(kept)) => kept,
        _ => serde_json::Map::new(),
    };
    checkpoint.insert(QUOTA_KEY.to_owned(), note);
    let checkpoint = Value::Object(checkpoint);
    log.line(
        "info",
        format!("quota {}: waiting {} ms for its turn", quota.name, at - now),
    );
    Ok(Some(AttemptResult::Parked {
        until: Some(at),
        checkpoint,
    }))
}

/// Whether this claim starts the step's series: it has not parked yet. A callback or signal
/// delivered before it ran waits in its checkpoint, alone; so does a note of a quota wait. An
/// item's step started long before.
fn first_run(job: &ClaimedJob) -> bool {
    job.item.is_none() && !kept_by_kind(job.checkpoint.as_ref())
}

/// Whether the step's kind has kept something of its own: it has run, and parked or failed
/// since. What the runtime keeps beside it (an early callback, a quota note) does not count.
fn kept_by_kind(checkpoint: Option<&Value>) -> bool {
    match checkpoint {
        None | Some(Value::Null) => false,
        Some(Value::Object(kept)) => kept
            .keys()
            .any(|k| k != "callback" && k != "callback_token" && k != QUOTA_KEY),
        Some(_) => true,
    }
}

/// The items a `for_each` renders: a list of at most [`MAX_ITEMS`] values a store can hold,
/// none holding a secret (items are stored; a secret's reference would be, and would not
/// resolve).
async fn loop_items(
    for_each: &str,
    ctx: &TemplateContext,
    secrets: &Secrets,
) -> Result<Vec<Value>, StepFailure> {
    let template = Value::String(for_each.to_owned());
    let scope = ctx.clone();
    let rendered = tokio::task::spawn_blocking(move || render_value(&template, &scope))
        .await
        .unwrap_or_else(|e| Err(TemplateError::Render(format!("the render stopped: {e}"))))
        .map_err(|e| StepFailure::permanent("template", format!("for_each: {e}")))?;
    let Value::Array(items) = rendered else {
        return Err(StepFailure::permanent(
            "for_each",
            format!("must render to a list, not {}", kind_of(&rendered)),
        ));
    };
    if items.len() > MAX_ITEMS {
        return Err(StepFailure::permanent(
            "for_each",
            format!(
                "rendered {} items; a step loops over {MAX_ITEMS} at most",
                items.len()
            ),
        ));
    }
    for (index, item) in items.iter().enumerate() {
        check_storable(item).map_err(|problem| {
            StepFailure::permanent("for_each", format!("item {index} {problem}"))
        })?;
        if let Some(path) = secrets.find_in(item) {
            return Err(StepFailure::permanent(
                "secret_misplaced",
                format!("for_each item {index} holds a secret (at {path}); items are stored"),
            ));
        }
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use switchyard_engine::store::StoreError;

    use super::*;
    use crate::runtime::fixtures::claimed;

    fn settled(attempt: u32, e: EngineError) -> Settlement {
        let job = claimed(7, attempt, "run");
        let failure = unreadable_definition(&job, &e);
        settle(
            attempt,
            &RetryPolicy::default(),
            AttemptResult::Failed(failure),
            0,
            0.0,
        )
    }

    #[test]
    fn a_definition_the_database_could_not_serve_for_a_moment_is_retried_under_the_default_policy()
    {
        let away = || EngineError::Store(StoreError::Unavailable("pool timed out".to_owned()));
        let Settlement::Retry { error, .. } = settled(1, away()) else {
            panic!("not retried");
        };
        assert_eq!(
            error,
            "definition_unreadable: the definition of w v1 could not be read: database unavailable: pool timed out"
        );
        let last = RetryPolicy::default().max_retries + 1;
        assert!(matches!(settled(last, away()), Settlement::Fail { .. }));
    }

    #[test]
    fn a_definition_that_does_not_load_or_is_gone_fails_its_step_at_once() {
        let corrupt = EngineError::CorruptDefinition {
            id: "w".to_owned(),
            version: 1,
            message: "invalid type".to_owned(),
        };
        assert_eq!(
            settled(1, corrupt),
            Settlement::Fail {
                error: "definition_unreadable: the definition of w v1 could not be read: stored definition of w v1 does not load: invalid type".to_owned()
            }
        );
        let gone = EngineError::UnknownWorkflow("w".to_owned());
        assert!(matches!(settled(1, gone), Settlement::Fail { .. }));
    }
}
