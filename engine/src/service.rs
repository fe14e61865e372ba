//! The operations every surface shares (CLI, HTTP API, scheduler, workers): install definitions,
//! start, cancel and retry runs, pause schedules, read history.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::clock::Clock;
use crate::definition::{Workflow, WorkflowMap};
use crate::plan::{PlanError, Trigger, plan_run};
use crate::scheduler::CronSchedule;
use crate::state::{Millis, RunStatus, Settlement};
use crate::store::{
    Alert, AuditEntry, CallbackAnswer, ClaimParams, ClaimedJob, Completion, ConnectOptions,
    DefinitionOrigin, FireOutcome, FireParams, FireRecord, InstallParams, JobId, NewRun,
    NewWebhookEvent, RunDetail, RunFilter, RunId, RunSummary, Signal, SignalOutcome, Store,
    StoreError, WebhookAction, WebhookEvent, WebhookOutcome, WorkflowState, check_storable,
    retry_transient,
};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("unknown workflow {0:?}")]
    UnknownWorkflow(String),
    #[error("unknown run {0:?}")]
    UnknownRun(String),
    #[error(transparent)]
    Artifact(#[from] crate::artifacts::ArtifactError),
    #[error("{given:?} starts more than one run's id ({matches}): give more of it")]
    AmbiguousRun { given: String, matches: String },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error("stored definition of {id} v{version} does not load: {message}")]
    CorruptDefinition {
        id: String,
        version: i64,
        message: String,
    },
    /// A webhook event id delivered before with another body.
    #[error(
        "event {0} was delivered before with another body: a repeat carries the same body, and \
         another event needs another id"
    )]
    EventIdReused(String),
    /// An answer a store cannot hold.
    #[error("answer {0}")]
    UnstorableAnswer(crate::store::Unstorable),
    /// A webhook body a store cannot log.
    #[error("body {0}")]
    UnstorableEvent(crate::store::Unstorable),
    /// An answer or a signal for a step that no longer waits for one.
    #[error("{0}")]
    NotWaiting(String),
    #[error("workflow {workflow} has no `wait` step for signal {name:?}")]
    UnknownSignal { workflow: String, name: String },
    #[error("step {step} took a signal {name} already; a step takes one")]
    AlreadySignalled { step: String, name: String },
    /// A signal payload a store cannot hold.
    #[error("signal payload {0}")]
    UnstorableSignal(crate::store::Unstorable),
    #[error("definition of {id}: {problem}")]
    UnstorableDefinition {
        id: String,
        problem: crate::store::Unstorable,
    },
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        EngineError::Store(e)
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// What an inbound webhook delivery asks the engine to do.
#[derive(Debug, Clone)]
pub enum WebhookDelivery {
    /// Start a run of `workflow` with `input`; of `known` (a version and its definition) where
    /// the caller has read it already, else of the latest version.
    Start {
        workflow: String,
        input: Value,
        known: Option<(i64, Arc<Workflow>)>,
    },
    /// Hand `result` to the step of `run_id` waiting under `token`.
    Answer {
        run_id: RunId,
        step_id: String,
        token: String,
        result: Value,
    },
}

impl WebhookDelivery {
    /// Where its event id must be unique: among the starts of its source, or among the answers
    /// to its step (a sender may reuse the id of the delivery that started the run).
    fn scope(&self) -> String {
        match self {
            WebhookDelivery::Start { .. } => String::new(),
            WebhookDelivery::Answer {
                run_id, step_id, ..
            } => format!("{run_id}/{step_id}"),
        }
    }
}

/// Workflow versions by (id, version), loaded from the store once and kept: a version never
/// changes once stored.
#[derive(Default)]
struct VersionCache(Mutex<HashMap<(String, i64), Arc<Workflow>>>);

/// A workflow as it stands: what the store holds of it, the definition its new runs use, and
/// when its schedule fires next (never while paused).
#[derive(Debug, Clone)]
pub struct WorkflowOverview {
    pub state: WorkflowState,
    pub workflow: Arc<Workflow>,
    pub next_fires: Vec<Millis>,
}

impl WorkflowOverview {
    fn new(state: WorkflowState, workflow: Arc<Workflow>, now: Millis, fires: usize) -> Self {
        let next_fires = match workflow.schedule.as_ref().map(CronSchedule::parse) {
            Some(Ok(cron)) if !state.paused => {
                std::iter::successors(cron.next_after(now), |at| cron.next_after(*at))
                    .take(fires)
                    .collect()
            }
            _ => Vec::new(),
        };
        WorkflowOverview {
            state,
            workflow,
            next_fires,
        }
    }
}

pub struct Engine {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    versions: VersionCache,
    settings: crate::settings::SettingsCache,
    health: crate::health::DatabaseHealth,
    hooks: crate::hooks::HookIndex,
    intake: std::sync::OnceLock<crate::intake::Intake>,
    artifacts: std::sync::OnceLock<Arc<crate::artifacts::Artifacts>>,
    quotas: std::sync::OnceLock<Arc<dyn crate::quotas::QuotaBuckets>>,
}

impl Engine {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Self {
        Engine {
            store,
            clock,
            versions: VersionCache::default(),
            settings: Default::default(),
            health: Default::default(),
            hooks: Default::default(),
            intake: Default::default(),
            artifacts: Default::default(),
            quotas: Default::default(),
        }
    }

    /// Keeps steps' quota buckets in `buckets` (Redis) rather than in the database (set once,
    /// before the engine works).
    pub fn set_quotas(&self, buckets: Arc<dyn crate::quotas::QuotaBuckets>) {
        let _ = self.quotas.set(buckets);
    }

    /// Where steps' quota buckets are kept: the database unless [`Engine::set_quotas`] said.
    pub fn quotas(&self) -> Arc<dyn crate::quotas::QuotaBuckets> {
        self.quotas
            .get_or_init(|| Arc::new(crate::quotas::StoreBuckets(self.store.clone())))
            .clone()
    }

    /// Keeps artifacts under `location` (a folder, or `s3://bucket/prefix`), each at most
    /// `max_size` bytes; once, before the engine serves or works.
    pub fn keep_artifacts_in(
        &self,
        location: &str,
        max_size: u64,
    ) -> Result<(), crate::artifacts::ArtifactError> {
        let artifacts = crate::artifacts::Artifacts::open(location, self.store.clone(), max_size)?;
        let _ = self.artifacts.set(Arc::new(artifacts));
        Ok(())
    }

    /// Recorded usage of the services steps call, newest day first.
    pub async fn usage(
        &self,
        filter: &crate::store::UsageFilter,
    ) -> Result<Vec<crate::store::Usage>> {
        Ok(self.store.usage(filter).await?)
    }

    /// The file artifact `id` names, as it is read.
    pub async fn artifact_file(
        &self,
        id: &str,
    ) -> Result<(
        crate::artifacts::ArtifactRef,
        futures::stream::BoxStream<'static, Result<bytes::Bytes, crate::artifacts::ArtifactError>>,
    )> {
        let artifacts = self
            .artifacts()
            .ok_or_else(|| crate::artifacts::ArtifactError::NotFound(id.to_owned()))?;
        Ok(artifacts.open_file(id).await?)
    }

    /// Where artifacts are kept, if anywhere.
    pub fn artifacts(&self) -> Option<Arc<crate::artifacts::Artifacts>> {
        self.artifacts.get().cloned()
    }

    /// The webhook intake, started on first use (on the runtime of its first caller).
    fn intake(&self) -> &crate::intake::Intake {
        self.intake
            .get_or_init(|| crate::intake::Intake::start(self.store.clone(), self.clock.clone()))
    }

    pub(crate) fn hooks(&self) -> &crate::hooks::HookIndex {
        &self.hooks
    }

    /// The store itself, for the worker runtime and tests. Surfaces (the API, the CLI) must not
    /// use it: they go through `Engine`'s operations.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(crate) fn settings_cache(&self) -> &crate::settings::SettingsCache {
        &self.settings
    }

    pub(crate) fn database_health(&self) -> &crate::health::DatabaseHealth {
        &self.health
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn now(&self) -> i64 {
        self.clock.now()
    }

    /// Stores each workflow as a new version where it changed, all or none. Runs already going
    /// keep theirs.
    /// With `actor`, each new version is in the audit log, in the same transaction.
    pub async fn install(
        &self,
        workflows: &WorkflowMap,
        origin: DefinitionOrigin,
        actor: Option<&str>,
    ) -> Result<Vec<(String, i64)>> {
        self.store_definitions(workflows, origin, false, actor)
            .await
    }

    /// Stores workflows that do not exist yet, all or none: one that exists is a conflict.
    pub async fn create(&self, workflows: &WorkflowMap, actor: &str) -> Result<Vec<(String, i64)>> {
        self.store_definitions(workflows, DefinitionOrigin::Api, true, Some(actor))
            .await
    }

    async fn store_definitions(
        &self,
        workflows: &WorkflowMap,
        origin: DefinitionOrigin,
        create_only: bool,
        actor: Option<&str>,
    ) -> Result<Vec<(String, i64)>> {
        let mut definitions = Vec::with_capacity(workflows.len());
        for (id, workflow) in workflows {
            let definition =
                serde_json::to_value(workflow.as_ref()).expect("definitions serialize to JSON");
            check_storable(&definition).map_err(|problem| EngineError::UnstorableDefinition {
                id: id.clone(),
                problem,
            })?;
            definitions.push((id.clone(), definition));
        }
        let versions = self
            .store
            .upsert_workflows(
                InstallParams {
                    workflows: &definitions,
                    origin,
                    create_only,
                    actor,
                },
                self.now(),
            )
            .await?;
        // Not cached here: the version new runs use may be a newer one from the API that these
        // files leave in place, and `version` reads what the store holds.
        Ok(workflows
            .keys()
            .zip(versions)
            .map(|(id, version)| {
                crate::metrics::workflow_known(id);
                (id.clone(), version)
            })
            .collect())
    }

    /// Removes a workflow: no more fires or starts; its runs stay. While runs of it have not
    /// ended, a conflict unless `force`.
    pub async fn remove(&self, id: &str, force: bool) -> Result<()> {
        self.store
            .remove_workflow(id, force)
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => EngineError::UnknownWorkflow(id.to_owned()),
                other => other.into(),
            })
    }

    /// Workflows that fire from the database although `files` no longer provide them: their
    /// latest version came from a file, and they have a schedule.
    pub async fn schedules_without_files(&self, files: &WorkflowMap) -> Result<Vec<String>> {
        let mut orphans = Vec::new();
        for state in self.workflows().await? {
            if state.origin == DefinitionOrigin::Files
                && !files.contains_key(&state.id)
                && self
                    .version(&state.id, state.latest_version)
                    .await?
                    .schedule
                    .is_some()
            {
                orphans.push(state.id);
            }
        }
        Ok(orphans)
    }

    /// The definition a run of `id` at `version` follows.
    pub async fn version(&self, id: &str, version: i64) -> Result<Arc<Workflow>> {
        let key = (id.to_owned(), version);
        if let Some(found) = self.versions.0.lock().expect("poisoned").get(&key) {
            return Ok(found.clone());
        }
        let value = self
            .store
            .workflow_version(id, version)
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => EngineError::UnknownWorkflow(id.to_owned()),
                other => other.into(),
            })?;
        let mut workflow: Workflow =
            serde_json::from_value(value).map_err(|e| EngineError::CorruptDefinition {
                id: id.to_owned(),
                version,
                message: e.to_string(),
            })?;
        workflow.id = id.to_owned();
        let workflow = Arc::new(workflow);
        self.versions
            .0
            .lock()
            .expect("poisoned")
            .insert(key, workflow.clone());
        Ok(workflow)
    }

    /// The latest stored version of `id`.
    pub async fn latest(&self, id: &str) -> Result<(i64, Arc<Workflow>)> {
        let state = self.workflow_state(id).await?;
        Ok((
            state.latest_version,
            self.version(id, state.latest_version).await?,
        ))
    }

    pub async fn workflow_state(&self, id: &str) -> Result<WorkflowState> {
        self.store
            .workflow(id)
            .await?
            .ok_or_else(|| EngineError::UnknownWorkflow(id.to_owned()))
    }

    pub async fn workflows(&self) -> Result<Vec<WorkflowState>> {
        Ok(self.store.workflows().await?)
    }

    /// Every workflow with the definition its new runs use and its next `fires` fire times.
    pub async fn overviews(&self, fires: usize) -> Result<Vec<WorkflowOverview>> {
        let now = self.now();
        let mut out = Vec::new();
        for state in self.workflows().await? {
            let workflow = self.version(&state.id, state.latest_version).await?;
            out.push(WorkflowOverview::new(state, workflow, now, fires));
        }
        Ok(out)
    }

    pub async fn overview(&self, id: &str, fires: usize) -> Result<WorkflowOverview> {
        let state = self.workflow_state(id).await?;
        let workflow = self.version(id, state.latest_version).await?;
        Ok(WorkflowOverview::new(state, workflow, self.now(), fires))
    }

    /// Plans a run of the latest version of `id`.
    pub async fn plan(&self, id: &str, input: Value, trigger: Trigger) -> Result<NewRun> {
        let (version, workflow) = self.latest(id).await?;
        Ok(plan_run(&workflow, version, input, trigger)?)
    }

    /// Starts a run of the latest version of `id`. Returns its id, and whether it is new: with
    /// an idempotency key already used, it is the run that key started.
    pub async fn start(&self, id: &str, input: Value, trigger: Trigger) -> Result<(RunId, bool)> {
        let run = self.plan(id, input, trigger).await?;
        let planned = run.id.clone();
        let ids = self.store.create_runs(vec![run], self.now()).await?;
        let run_id = ids.into_iter().next().expect("one run in, one id out");
        let created = run_id == planned;
        if created {
            crate::metrics::run_started(id);
        }
        Ok((run_id, created))
    }

    pub async fn fire(&self, params: FireParams) -> Result<FireOutcome> {
        let (workflow, fire_at) = (params.workflow_id.clone(), params.fire_at);
        let outcome = self.store.fire(params, self.now()).await?;
        if let FireOutcome::Started(_) = outcome {
            crate::metrics::run_started(&workflow);
            let late = (self.now() - fire_at).max(0) as u64;
            crate::metrics::fire_recorded(std::time::Duration::from_millis(late));
        }
        Ok(outcome)
    }

    /// Records finished attempts and claims up to `limit` jobs leased for `lease_ms`, in one
    /// transaction: a worker cycle pays one commit. Transient database errors are retried (the
    /// completions are fenced, so a retry after an unnoticed commit changes nothing). A batch
    /// the database refuses for another reason is split until the completions it can hold are
    /// recorded, and each one it cannot hold fails its step with the database's reason, so one
    /// bad value never costs the other steps of the batch their results. A claim that fails is
    /// an error; the caller tries again.
    pub async fn complete_and_claim(
        &self,
        batch: Vec<Completion>,
        limit: u32,
        lease_ms: i64,
    ) -> Result<(Vec<JobId>, Vec<ClaimedJob>), StoreError> {
        let claim = || {
            let now = self.now();
            ClaimParams {
                limit,
                now,
                lease_until: now + lease_ms,
            }
        };
        if batch.is_empty() {
            return self
                .store
                .claim(claim())
                .await
                .map(|jobs| (Vec::new(), jobs));
        }
        let whole = retry_transient("completion", || {
            self.store
                .complete_and_claim(batch.clone(), claim(), self.now())
        })
        .await;
        match whole {
            // Only a value the database refuses is worth finding; any other error (a full disk,
            // a timeout) leaves the completions to their leases, to run again.
            Err(e @ StoreError::Rejected(_)) => {
                tracing::warn!(error = %e, jobs = batch.len(), "the database refused a batch of completions; recording them apart");
                Ok((self.complete_apart(batch).await, Vec::new()))
            }
            other => other,
        }
    }

    /// Halves a refused batch until each part commits or is one completion; such a one is
    /// recorded as its step's failure instead.
    async fn complete_apart(&self, batch: Vec<Completion>) -> Vec<JobId> {
        let mut accepted = Vec::new();
        let mut parts = vec![batch];
        while let Some(mut part) = parts.pop() {
            let done = retry_transient("completion", || {
                self.store.complete(part.clone(), self.now())
            })
            .await;
            match done {
                Ok(ids) => accepted.extend(ids),
                Err(e @ StoreError::Rejected(_)) if part.len() > 1 => {
                    tracing::debug!(error = %e, jobs = part.len(), "part of a batch refused; halving it");
                    let second = part.split_off(part.len() / 2);
                    parts.push(part);
                    parts.push(second);
                }
                Err(e @ StoreError::Rejected(_)) => {
                    let refused = part.remove(0);
                    tracing::error!(job = refused.lease.job_id, error = %e, "the database refused an attempt's result; failing its step");
                    let failure = Completion {
                        lease: refused.lease,
                        settlement: Settlement::Fail {
                            error: format!("the database refused this attempt's result: {e}"),
                        },
                        children: Vec::new(),
                        logs: Vec::new(),
                        artifacts: Vec::new(),
                        usage: Vec::new(),
                    };
                    match retry_transient("completion", || {
                        self.store.complete(vec![failure.clone()], self.now())
                    })
                    .await
                    {
                        Ok(ids) => accepted.extend(ids),
                        Err(e) => {
                            tracing::error!(error = %e, "could not record that failure either; the lease will expire and the step run again")
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, jobs = part.len(), "could not record completions; their leases will expire and the steps run again")
                }
            }
        }
        accepted
    }

    /// Logs an inbound webhook delivery and does what it asks (start a run, or answer a step
    /// that waits), in one transaction. Returns the run it started or answered, and whether an
    /// earlier delivery of the same event did. A delivery that cannot be done is logged with its
    /// reason and is an error; so is a repeat of one refused before.
    pub async fn receive_webhook(
        &self,
        event: NewWebhookEvent,
        delivery: WebhookDelivery,
    ) -> Result<(RunId, bool)> {
        // Logged whole: a body no store can hold (a NUL, nesting too deep) is refused here, not
        // in the batch it would fail.
        check_storable(&event.payload).map_err(EngineError::UnstorableEvent)?;
        let event = NewWebhookEvent {
            scope: delivery.scope(),
            ..event
        };
        let mut refusal = None;
        let action = match delivery {
            WebhookDelivery::Start {
                workflow,
                input,
                known,
            } => {
                // A repeated delivery whose first left no run (it failed on the way) asks for the
                // same run: the key makes it the first's, or starts it now.
                // The source's length keeps the key unambiguous: a hook's path may hold `/`.
                let trigger = Trigger {
                    idempotency_key: Some(format!(
                        "{}:{}/{}",
                        event.source.len(),
                        event.source,
                        event.event_id
                    )),
                    ..Trigger::default()
                };
                let planned = match known {
                    Some((version, definition)) => {
                        plan_run(&definition, version, input, trigger).map_err(EngineError::from)
                    }
                    None => self.plan(&workflow, input, trigger).await,
                };
                match planned {
                    Ok(run) => WebhookAction::Start(Box::new(run)),
                    Err(e @ (EngineError::UnknownWorkflow(_) | EngineError::Plan(_))) => {
                        let action = WebhookAction::Refuse(e.to_string());
                        refusal = Some(e);
                        action
                    }
                    Err(e) => return Err(e),
                }
            }
            WebhookDelivery::Answer {
                run_id,
                step_id,
                token,
                result,
            } => {
                // The answer joins the step's checkpoint: it must be storable there.
                if let Err(problem) = check_storable(&result) {
                    let error = EngineError::UnstorableAnswer(problem);
                    refusal = Some(error);
                    WebhookAction::Refuse("the answer cannot be stored".to_owned())
                } else {
                    WebhookAction::Answer(CallbackAnswer {
                        run_id,
                        step_id,
                        token,
                        result,
                    })
                }
            }
        };
        let (event_id, workflow) = (event.event_id.clone(), event.workflow_id.clone());
        let started = matches!(action, WebhookAction::Start(_));
        match self.intake().receive(event, action).await? {
            WebhookOutcome::Done { run_id, repeated } => {
                if started && !repeated {
                    crate::metrics::run_started(workflow.as_deref().unwrap_or_default());
                }
                Ok((run_id, repeated))
            }
            WebhookOutcome::Refused(reason) => {
                Err(refusal.unwrap_or(EngineError::NotWaiting(reason)))
            }
            WebhookOutcome::OtherBody => Err(EngineError::EventIdReused(event_id)),
        }
    }

    pub async fn cancel(&self, run_id: &str) -> Result<RunStatus> {
        retry_transient("cancel", || self.store.cancel_run(run_id, self.now()))
            .await
            .map_err(|e| not_found_as_run(e, run_id))
    }

    /// Sends signal `name` with `payload` to the run's `wait` step that waits for it.
    pub async fn signal(&self, run_id: &str, name: &str, payload: Value) -> Result<()> {
        check_storable(&payload).map_err(EngineError::UnstorableSignal)?;
        let run = self.run(run_id).await?.summary;
        let workflow = self.version(&run.workflow_id, run.version).await?;
        let step = workflow
            .step_waiting_for(name)
            .ok_or_else(|| EngineError::UnknownSignal {
                workflow: run.workflow_id.clone(),
                name: name.to_owned(),
            })?;
        let signal = Signal {
            run_id: run_id.to_owned(),
            step_id: step.id.clone(),
            name: name.to_owned(),
            payload,
        };
        let outcome =
            retry_transient("signal", || self.store.deliver_signal(&signal, self.now())).await?;
        match outcome {
            SignalOutcome::Delivered => Ok(()),
            SignalOutcome::AlreadySignalled => Err(EngineError::AlreadySignalled {
                step: signal.step_id,
                name: signal.name,
            }),
            SignalOutcome::NotWaiting(why) => Err(EngineError::NotWaiting(format!(
                "{why}: signal {name} is not taken"
            ))),
        }
    }

    pub async fn retry(&self, run_id: &str) -> Result<()> {
        retry_transient("retry", || self.store.retry_run(run_id, self.now()))
            .await
            .map_err(|e| not_found_as_run(e, run_id))
    }

    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        self.store
            .set_paused(id, paused, self.now())
            .await
            .map_err(|e| match e {
                StoreError::NotFound(_) => EngineError::UnknownWorkflow(id.to_owned()),
                other => other.into(),
            })
    }

    pub async fn runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        Ok(self.store.list_runs(filter).await?)
    }

    /// The run a person means by `given`: its id, or the start of exactly one run's id (as
    /// `switchyard runs` shows them; ids start with their time, so runs started close together
    /// share the first characters).
    pub async fn resolve_run(&self, given: &str) -> Result<RunId> {
        let prefix = given.to_ascii_lowercase();
        if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            return Err(EngineError::UnknownRun(given.to_owned()));
        }
        const SHOWN: usize = 3;
        let found = self
            .store
            .run_ids_starting(&prefix, SHOWN as u32 + 1)
            .await?;
        match found.as_slice() {
            [] => Err(EngineError::UnknownRun(given.to_owned())),
            [one] => Ok(one.clone()),
            many => {
                let mut matches = many[..many.len().min(SHOWN)].join(", ");
                if many.len() > SHOWN {
                    matches.push_str(", ...");
                }
                Err(EngineError::AmbiguousRun {
                    given: given.to_owned(),
                    matches,
                })
            }
        }
    }

    /// One run without its steps.
    pub async fn run_summary(&self, run_id: &str) -> Result<RunSummary> {
        self.store
            .run_summary(run_id)
            .await?
            .ok_or_else(|| EngineError::UnknownRun(run_id.to_owned()))
    }

    /// The last `limit` lines `run_id`'s steps printed, oldest first.
    pub async fn last_step_logs(
        &self,
        run_id: &str,
        limit: u32,
    ) -> Result<Vec<crate::store::LogEntry>> {
        Ok(self.store.last_step_logs(run_id, limit).await?)
    }

    /// Up to `limit` lines `run_id`'s steps printed, after the line `after`.
    pub async fn step_logs(
        &self,
        run_id: &str,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<crate::store::LogEntry>> {
        Ok(self.store.step_logs(run_id, after, limit).await?)
    }

    /// Up to `limit` runs that `run_id`'s `workflow` steps started, oldest first.
    pub async fn child_runs(&self, run_id: &str, limit: u32) -> Result<Vec<RunSummary>> {
        Ok(self.store.child_runs(run_id, limit).await?)
    }

    pub async fn run(&self, run_id: &str) -> Result<RunDetail> {
        self.store
            .run(run_id)
            .await
            .map_err(|e| not_found_as_run(e, run_id))
    }

    pub async fn fires(&self, workflow_id: Option<&str>, limit: u32) -> Result<Vec<FireRecord>> {
        Ok(self.store.fires(workflow_id, limit).await?)
    }

    /// Opens the database `url` names, applies its pending migrations, and runs on `clock`.
    pub async fn open(
        url: &str,
        options: &ConnectOptions,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, StoreError> {
        let store = crate::store::connect_with(url, options).await?;
        store.migrate().await?;
        Ok(Engine::new(store, clock))
    }

    /// Runs in `status`, created at or after `created_after` when given.
    pub async fn count_runs(
        &self,
        status: RunStatus,
        created_after: Option<Millis>,
    ) -> Result<i64> {
        Ok(self.store.count_runs(status, created_after).await?)
    }

    /// Jobs claimable now that no worker has taken.
    pub async fn queue_depth(&self) -> Result<i64> {
        Ok(self.store.queue_depth(self.now()).await?)
    }

    /// Alerts of failed and timed-out runs, newest first.
    pub async fn alerts(&self, workflow_id: Option<&str>, limit: u32) -> Result<Vec<Alert>> {
        Ok(self.store.alerts(workflow_id, limit).await?)
    }

    /// Inbound webhook events, newest first.
    pub async fn webhook_events(
        &self,
        source: Option<&str>,
        limit: u32,
    ) -> Result<Vec<WebhookEvent>> {
        Ok(self.store.webhook_events(source, limit).await?)
    }

    /// Run notifications, newest first.
    pub async fn notifications(
        &self,
        status: Option<crate::state::NotificationStatus>,
        limit: u32,
    ) -> Result<Vec<crate::store::Notification>> {
        Ok(self.store.notifications(status, limit).await?)
    }

    /// The audit log, newest first; with `before`, only entries older than that entry id.
    pub async fn audit_log(&self, before: Option<i64>, limit: u32) -> Result<Vec<AuditEntry>> {
        Ok(self.store.audit_log(before, limit).await?)
    }
}

fn not_found_as_run(e: StoreError, run_id: &str) -> EngineError {
    match e {
        StoreError::NotFound(_) => EngineError::UnknownRun(run_id.to_owned()),
        other => other.into(),
    }
}
