//! The state machine, applied: every run and job transition (start, settle, promote, finish,
//! fail, cancel, time out, sweep, fire, child settles parent, gate opens, retry) is decided here,
//! once for every database, from what the transaction read; the decisions that need nothing
//! read are pure functions of `state.rs`. A driver (`sqlite.rs`, `postgres.rs`) implements [`Tx`]:
//! set-based primitives that each run a statement or two, guarded by the states this module
//! expects, and decide nothing. What a transaction did that others must hear of (jobs made
//! claimable, runs finished) is collected in [`Effects`] and acted on after the commit.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use serde_json::{Value, json};

use super::{
    CallbackAnswer, ClaimedJob, Completion, DefinitionOrigin, FireOutcome, FireParams, GapFill,
    Install, InstallParams, JobId, Lease, LogLine, NewAuditEntry, NewRun, NewWebhookEvent,
    NonceAllocation, NonceGap, NonceRequest, Notification, NotifyTarget, Result, RunId, Signal,
    SignalOutcome, SkippedFire, StoreError, StoredDefinition, Swept, TokenRevocation,
    WebhookAction, WebhookEvent, WebhookOutcome, completion_rows, decide_install, install_audit,
};
use crate::flow::{self, FlowStep, RunOutcome};
use crate::state::{
    JobState, Millis, NotificationStatus, RunStatus, Settlement, fire_skip_reason, gate_opening,
    gate_room, loop_start, settle_lost_lease, timeout_error,
};

/// A step whose job just succeeded. Only a sink's success can finish its run: every other step
/// has a dependent that has not run yet.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct Succeeded {
    pub run_id: RunId,
    pub step_id: String,
    pub is_sink: bool,
    /// Its run moves by `flow::advance`.
    pub flow: bool,
    /// The `for_each` step's job, when this is one of its items.
    #[sqlx(rename = "loop_job_id")]
    pub loop_job: Option<JobId>,
}

/// A parked step that just failed (see [`Tx::fail_parked_step`]).
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct FailedStep {
    pub run_id: RunId,
    pub step_id: String,
    pub flow: bool,
    #[sqlx(rename = "loop_job_id")]
    pub loop_job: Option<JobId>,
}

/// A run a transaction just finished, and what it may settle next.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct FinishedRun {
    pub id: RunId,
    pub workflow_id: String,
    pub status: RunStatus,
    pub parent_job_id: Option<JobId>,
    pub concurrency_key: Option<String>,
    pub notify: Option<sqlx::types::Json<NotifyTarget>>,
}

/// What a delivery of a notification leaves it as.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NotificationUpdate {
    pub status: NotificationStatus,
    pub attempts: i32,
    pub next_at: Millis,
    pub last_error: Option<String>,
    pub delivered_at: Option<Millis>,
}

/// Deliveries of a notification before it is given up as `failed`: with the waits of
/// [`notification_update`], about eight hours.
pub const NOTIFICATION_ATTEMPTS: i32 = 20;

/// A delivery's result decides what becomes of its notification: a 2xx delivers it; anything
/// else is tried again after 1 s, 2 s, 4 s ... at most an hour apart, until the last attempt
/// fails it.
pub(crate) fn notification_update(
    attempts_before: i32,
    result: std::result::Result<(), String>,
    now: Millis,
) -> NotificationUpdate {
    let attempts = attempts_before + 1;
    match result {
        Ok(()) => NotificationUpdate {
            status: NotificationStatus::Delivered,
            attempts,
            next_at: now,
            last_error: None,
            delivered_at: Some(now),
        },
        Err(error) => {
            let wait_secs = 1_i64 << (attempts - 1).clamp(0, 12);
            NotificationUpdate {
                status: if attempts >= NOTIFICATION_ATTEMPTS {
                    NotificationStatus::Failed
                } else {
                    NotificationStatus::Pending
                },
                attempts,
                next_at: now + wait_secs.min(3_600) * 1_000,
                last_error: Some(error),
                delivered_at: None,
            }
        }
    }
}

/// Records a sender's delivery of a notification it holds under `token`; returns whether it
/// still held it.
pub(crate) async fn settle_notification(
    tx: &mut dyn Tx,
    held: &Notification,
    token: &str,
    result: std::result::Result<(), String>,
    now: Millis,
) -> Result<bool> {
    let update = notification_update(held.attempts, result, now);
    tx.update_notification(held.id, token, &update).await
}

/// What follows from runs ending, in the transaction that ended them: their gates open, their
/// notifications join the outbox, and they are counted once it commits.
async fn runs_ended(
    tx: &mut dyn Tx,
    runs: &[FinishedRun],
    now: Millis,
    effects: &mut Effects,
) -> Result<()> {
    effects.finished(runs);
    if open_gates(tx, runs, now).await? {
        effects.woke();
    }
    let notices: Vec<Value> = runs
        .iter()
        .filter_map(|run| {
            let target = run.notify.as_ref()?;
            let wanted = match run.status {
                RunStatus::Succeeded => target.on_success,
                RunStatus::Failed | RunStatus::TimedOut => target.on_failure,
                _ => false,
            };
            wanted.then(|| {
                json!({
                    "event_id": uuid::Uuid::now_v7().to_string(),
                    "run_id": run.id,
                    "url": target.url,
                })
            })
        })
        .collect();
    if !notices.is_empty() {
        tx.insert_notifications(Value::Array(notices), now).await?;
    }
    Ok(())
}

/// A job a settlement changed, as the database returned it.
#[derive(Debug, Clone)]
pub(crate) struct SettledJob {
    pub id: JobId,
    pub run_id: RunId,
    pub step_id: String,
    pub state: JobState,
    pub error: Option<String>,
    pub is_sink: bool,
    pub flow: bool,
    /// The `for_each` step's job, when this job is one of its items.
    pub loop_job: Option<JobId>,
}

/// What [`Tx::settle_jobs`] changed: the settled jobs whose fence held, and the dependents of
/// the steps among them that succeeded, with their new state.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    pub jobs: Vec<SettledJob>,
    pub promoted: Vec<(JobId, JobState)>,
}

/// A lease whose time ran out with its job still `running`, and the job's attempt budget.
#[derive(Debug, Clone)]
pub(crate) struct ExpiredLease {
    pub lease: Lease,
    pub max_attempts: u32,
}

/// What a recorded fire or webhook event came to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Disposition<'a> {
    /// It started, or answered, this run.
    Run(&'a str),
    /// No run, for this reason.
    Declined(&'a str),
}

impl<'a> Disposition<'a> {
    pub fn run_id(self) -> Option<&'a str> {
        match self {
            Disposition::Run(id) => Some(id),
            Disposition::Declined(_) => None,
        }
    }

    pub fn reason(self) -> Option<&'a str> {
        match self {
            Disposition::Run(_) => None,
            Disposition::Declined(reason) => Some(reason),
        }
    }
}

/// A version of a workflow to store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NewVersion<'a> {
    pub workflow_id: &'a str,
    pub version: i64,
    pub definition: &'a Value,
    pub origin: DefinitionOrigin,
}

/// How far a `for_each` step's items have come (see [`Tx::count_down_loop`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoopProgress {
    /// Its items that have not succeeded yet.
    pub left: i64,
    pub parallel: Option<i64>,
}

/// A run started under an idempotency key.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct KeyedRun {
    pub idempotency_key: String,
    pub id: RunId,
    /// `None` for a run started before digests were kept: then any request matches.
    pub request_digest: Option<String>,
}

/// A setting's address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SettingKey<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

/// Before when each kind of record is deleted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordCutoffs {
    /// Fires (except each workflow's newest: the scheduler counts missed fires from it),
    /// alerts and webhook events.
    pub records_before: Millis,
    pub audit_before: Millis,
    /// Revocations of tokens that expired by then.
    pub revocations_before: Millis,
}

/// The runs of a concurrency key that hold or wait for a slot.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct GateLoad {
    pub running: i64,
    pub pending: i64,
    /// The limit the oldest waiting run was started under.
    pub oldest_pending_limit: Option<i64>,
}

/// One transaction of a database: the primitives the machine is made of. Each is set-based (a
/// batch costs a constant number of statements), guarded by the states named in its
/// documentation, and decides nothing beyond them.
#[async_trait]
pub(crate) trait Tx: Send {
    /// Serialises transactions on `key` (a gate, a workflow) until this one ends; a no-op where
    /// one writer serialises everything.
    async fn lock_key(&mut self, key: &str) -> Result<()>;
    /// Locks the runs of these jobs, in id order, before their jobs are read: two transactions
    /// settling a run's last two steps must not each see the other unfinished.
    async fn lock_runs_of_jobs(&mut self, jobs: &[JobId]) -> Result<()>;

    async fn runs_by_idempotency_key(&mut self, keys: &[&str]) -> Result<Vec<KeyedRun>>;
    async fn gate_load(&mut self, key: &str) -> Result<GateLoad>;
    /// Inserts runs (rows of [`run_rows`]) unless their idempotency key is taken; returns the
    /// ids inserted.
    async fn insert_run_rows(&mut self, runs: Value, now: Millis) -> Result<BTreeSet<RunId>>;
    /// Inserts jobs (rows of [`run_rows`]), `available` where ready, else `waiting`.
    async fn insert_job_rows(&mut self, jobs: Value, now: Millis) -> Result<()>;

    /// Applies settlements (rows of [`completion_rows`]) to jobs still `running` under the same
    /// attempt and lease token, and promotes the dependents of those that succeeded: a `waiting`
    /// job counts down its needs, and becomes `available` at zero while its run is `running`.
    async fn settle_jobs(&mut self, rows: Value, ids: &[JobId], now: Millis) -> Result<Settled>;
    /// The promotion of [`Tx::settle_jobs`], for steps that succeeded otherwise; returns the
    /// jobs that became `available`.
    async fn promote_dependents(
        &mut self,
        succeeded: &[&Succeeded],
        now: Millis,
    ) -> Result<Vec<JobId>>;
    /// Marks `succeeded` each `running` run among `runs` whose jobs all succeeded, with the sinks'
    /// outputs as its output.
    async fn finish_done_runs(&mut self, runs: &[&str], now: Millis) -> Result<Vec<FinishedRun>>;
    /// Ends each active run of `runs` as `status`, with its error.
    async fn end_active_runs(
        &mut self,
        runs: &[(RunId, String)],
        status: RunStatus,
        now: Millis,
    ) -> Result<Vec<FinishedRun>>;
    async fn raise_alerts(&mut self, runs: &[&str], now: Millis) -> Result<()>;
    /// Cancels the active runs below `roots`, with `error`.
    async fn cancel_descendants(
        &mut self,
        roots: &[&str],
        error: &str,
        now: Millis,
    ) -> Result<Vec<FinishedRun>>;
    /// Cancels the open jobs of `runs`.
    async fn cancel_open_jobs(&mut self, runs: &[&str], now: Millis) -> Result<()>;
    /// Starts the `count` oldest `pending` runs of `key`.
    async fn start_pending_runs(
        &mut self,
        key: &str,
        count: i64,
        now: Millis,
    ) -> Result<Vec<RunId>>;
    /// Makes the `waiting` jobs of `runs` that wait for nothing `available`; returns how many.
    async fn make_ready(&mut self, runs: &[RunId], now: Millis) -> Result<u64>;
    /// Those of `jobs` whose step says `continue_on_error`.
    async fn continuing_on_error(&mut self, jobs: &[JobId]) -> Result<BTreeSet<JobId>>;
    /// The active child runs of `workflow` steps.
    async fn active_child_runs(&mut self, jobs: &[JobId]) -> Result<Vec<RunId>>;
    /// Ends a `parked` step as tolerated (see `Settlement::Tolerate`); returns it when it was
    /// parked.
    async fn tolerate_parked_step(
        &mut self,
        job: JobId,
        error: &str,
        now: Millis,
    ) -> Result<Option<Succeeded>>;
    /// Fails a `parked` step with `error`; returns it when it was parked.
    async fn fail_parked_step(
        &mut self,
        job: JobId,
        error: &str,
        now: Millis,
    ) -> Result<Option<FailedStep>>;
    /// Succeeds a `parked` step whose child runs all succeeded, with their outputs in order.
    async fn succeed_parked_step(&mut self, job: JobId, now: Millis) -> Result<Option<Succeeded>>;

    /// Hands the answer to the step waiting for it (see `Store::deliver_callback`): `None` when
    /// no step takes it, else whether it woke a parked step.
    async fn give_callback(&mut self, answer: &CallbackAnswer, now: Millis)
    -> Result<Option<bool>>;

    /// Hands a signal to its step (see `Store::deliver_signal`) if the step is open, has no
    /// callback yet, and is not running past the `deadline` its current attempt parked with: `None` when it takes none, else
    /// whether it woke a parked step.
    async fn give_signal(&mut self, signal: &Signal, now: Millis) -> Result<Option<bool>>;
    /// A step's state, and whether it holds a callback (a signal); `None` when there is no such
    /// step.
    async fn step_answer_state(
        &mut self,
        run_id: &str,
        step_id: &str,
    ) -> Result<Option<(JobState, bool)>>;

    /// Leases whose time ran out with their job still `running`.
    async fn expired_leases(&mut self, now: Millis, limit: u32) -> Result<Vec<ExpiredLease>>;
    /// Forgets expired leases no job runs under any more.
    async fn drop_spent_leases(&mut self, now: Millis) -> Result<()>;
    /// Active runs past their deadline, with their timeout.
    async fn overdue_runs(&mut self, now: Millis, limit: u32) -> Result<Vec<(RunId, Option<i64>)>>;

    /// Locks a run for a change of its status; `None` when it does not exist.
    async fn lock_run(&mut self, run_id: &str) -> Result<Option<RunStatus>>;
    /// The child runs, not `succeeded`, of the `workflow` steps of `runs` that failed or were
    /// cancelled, each with that step's job.
    async fn unsuccessful_children(&mut self, runs: &[RunId]) -> Result<Vec<(JobId, RunId)>>;
    /// Puts finished runs back to `running`, with a new deadline.
    async fn reopen_runs(&mut self, runs: &[RunId], now: Millis) -> Result<()>;
    /// Puts failed or cancelled `workflow` steps back to `parked`, waiting for their children.
    async fn repark_steps(&mut self, jobs: &[JobId]) -> Result<()>;
    /// Puts the failed and cancelled jobs of `runs` back to `waiting`, with a fresh attempt
    /// budget and their needs counted again; jobs of runs with control flow are left to
    /// [`Tx::reset_jobs`].
    async fn reset_unsuccessful_jobs(&mut self, runs: &[RunId]) -> Result<()>;

    /// The steps of the `running` runs among `runs` whose steps move by `flow::advance`, each
    /// with the error its run failed with once its failure handlers have begun.
    async fn flow_steps(
        &mut self,
        runs: &[RunId],
    ) -> Result<Vec<(RunId, Option<String>, FlowStep)>>;
    /// Ends `waiting` jobs as `skipped`, each with its reason.
    async fn skip_waiting_jobs(&mut self, jobs: &[(JobId, String)], now: Millis) -> Result<()>;
    /// Makes `waiting` jobs `available` now; returns those it did.
    async fn make_jobs_available(&mut self, jobs: &[JobId], now: Millis) -> Result<Vec<JobId>>;
    /// Cancels the unfinished among `jobs`.
    async fn cancel_jobs(&mut self, jobs: &[JobId], now: Millis) -> Result<()>;
    /// Records the error of a `running` run whose failure handlers begin; it stays running.
    async fn begin_failure_handling(&mut self, run_id: &str, error: &str) -> Result<()>;
    /// Puts finished jobs of a run with control flow back to `waiting` (a retry), with a fresh
    /// attempt budget; `flow::advance` decides again when each runs.
    async fn reset_jobs(&mut self, jobs: &[JobId]) -> Result<()>;

    /// Creates the items of a `for_each` step's job, `waiting`, with the step's attempt budget;
    /// items it had already (a retry of its run) are kept, those that failed or were cancelled
    /// put back to `waiting`. Records on the step's job its `parallel`, how many items have not
    /// succeeded, and that releases start from the first.
    async fn insert_items(
        &mut self,
        loop_job: JobId,
        items: &[Value],
        parallel: Option<u32>,
        now: Millis,
    ) -> Result<()>;
    /// Counts `succeeded` more items of a `parked` `for_each` step as done; returns how many are
    /// left, and its `parallel` (`None` when the step is not parked).
    async fn count_down_loop(
        &mut self,
        loop_job: JobId,
        succeeded: i64,
    ) -> Result<Option<LoopProgress>>;
    /// Makes the next `count` `waiting` items of a `for_each` step `available`, in item order,
    /// from where the last release stopped (items start in order, so none waits before it).
    async fn release_items(
        &mut self,
        loop_job: JobId,
        count: i64,
        now: Millis,
    ) -> Result<Vec<JobId>>;
    /// The unfinished items of these `for_each` steps.
    async fn open_items(&mut self, loops: &[JobId]) -> Result<Vec<JobId>>;
    /// Succeeds a `parked` `for_each` step whose items all succeeded, with their outputs in item
    /// order; returns it when it did.
    async fn finish_loop(&mut self, loop_job: JobId, now: Millis) -> Result<Option<Succeeded>>;

    /// What the store holds of workflow `id`, compared with `definition`.
    async fn stored_definition(&mut self, id: &str, definition: &Value)
    -> Result<StoredDefinition>;
    /// Stores a version of a workflow as the one its new runs use.
    async fn add_version(&mut self, version: NewVersion<'_>, now: Millis) -> Result<()>;
    /// Deletes a workflow's row (its versions stay); returns whether it existed.
    async fn delete_workflow(&mut self, id: &str) -> Result<bool>;
    /// How many runs of the workflow are active.
    async fn active_runs_of(&mut self, workflow_id: &str) -> Result<i64>;
    async fn record_audit(&mut self, entry: &NewAuditEntry, now: Millis) -> Result<()>;
    /// Pauses or resumes a workflow; returns whether it exists.
    async fn set_paused(&mut self, id: &str, paused: bool, now: Millis) -> Result<bool>;

    /// Stores a setting, replacing any earlier value.
    async fn put_setting(&mut self, key: SettingKey<'_>, value: &Value, now: Millis) -> Result<()>;
    /// Stores `value` unless the setting exists; returns the stored value either way.
    async fn init_setting(
        &mut self,
        key: SettingKey<'_>,
        value: &Value,
        now: Millis,
    ) -> Result<Value>;
    /// Returns whether the setting existed.
    async fn delete_setting(&mut self, key: SettingKey<'_>) -> Result<bool>;
    /// Replaces the setting's value where it still is `old`; returns whether it did.
    async fn swap_setting(&mut self, key: SettingKey<'_>, old: &Value, new: &Value)
    -> Result<bool>;
    /// Records a revocation unless the token is revoked already; returns whether this call did.
    async fn revoke_token(&mut self, revocation: &TokenRevocation, now: Millis) -> Result<bool>;
    /// Writes a row of its own, in a namespace nothing lists.
    async fn probe_write(&mut self, now: Millis) -> Result<()>;

    /// The next nonce of the account (none allocated yet: `None`), and the one `owner` was
    /// given, if any. Call under [`Tx::lock_key`] of the account.
    async fn nonce_state(
        &mut self,
        chain_id: i64,
        address: &str,
        owner: &str,
    ) -> Result<NonceState>;
    /// Gives `nonce` to `owner` (in `job`) and makes the account's next nonce at least
    /// `nonce + 1`. The database refuses a nonce of the account given twice (`Conflict`).
    async fn record_nonce(
        &mut self,
        chain_id: i64,
        address: &str,
        owner: &str,
        nonce: i64,
        job: Option<JobId>,
        now: Millis,
    ) -> Result<()>;
    /// Who holds `nonce` of the account, if anyone, and the state of their job. Call under
    /// [`Tx::lock_key`] of the account.
    async fn nonce_holder(
        &mut self,
        chain_id: i64,
        address: &str,
        nonce: i64,
    ) -> Result<Option<NonceHolder>>;
    /// The step filling the gap at `nonce` of the account, if one is.
    async fn nonce_filler(
        &mut self,
        chain_id: i64,
        address: &str,
        nonce: i64,
    ) -> Result<Option<NonceFiller>>;
    /// Records the filler's transaction, when `job` still fills the gap.
    async fn note_fill_hash(
        &mut self,
        chain_id: i64,
        address: &str,
        nonce: i64,
        job: JobId,
        hash: &str,
    ) -> Result<()>;
    /// Gives `owner` `nonce` instead of the one it held, and makes the account's next nonce at
    /// least `nonce + 1`.
    async fn move_nonce(
        &mut self,
        chain_id: i64,
        address: &str,
        owner: &str,
        nonce: i64,
        now: Millis,
    ) -> Result<()>;
    /// Gives the gap at `nonce` of the account to `job` to fill (its transaction not yet known).
    async fn record_fill(
        &mut self,
        chain_id: i64,
        address: &str,
        nonce: i64,
        job: JobId,
        now: Millis,
    ) -> Result<()>;

    /// Up to `limit` runs whose retention ended by `now`, held for deletion.
    async fn expired_runs(&mut self, now: Millis, limit: u32) -> Result<Vec<RunId>>;
    /// Stores log lines (rows `{run_id, step_id, attempt, at, stream, text}`).
    async fn append_logs(&mut self, rows: Value) -> Result<()>;
    /// The bucket `name`'s theoretical arrival time (0 for a new one), held until the
    /// transaction ends.
    async fn lock_quota(&mut self, name: &str) -> Result<i64>;
    async fn set_quota(&mut self, name: &str, tat_us: i64) -> Result<()>;
    /// Adds usage (rows `{provider, workflow_id, day, requests, errors, tokens, cost}`, one per
    /// key, in key order) to what is recorded.
    async fn add_usage(&mut self, rows: Value) -> Result<()>;
    /// Notes that the attempts (rows `{job_id, lease_token}`) had their usage counted; returns
    /// those not noted before.
    async fn note_usage_counted(&mut self, attempts: Value) -> Result<Vec<(JobId, String)>>;
    /// Stores artifact references (rows `{id, run_id, step_id, attempt, sha256, size,
    /// content_type}`), made `now`.
    async fn insert_artifacts(&mut self, rows: Value, now: Millis) -> Result<()>;
    /// The run and step of the job `lease` holds, while it still runs under it.
    async fn held_job(&mut self, lease: &Lease) -> Result<Option<(RunId, String)>>;

    /// Writes notifications (rows `{event_id, run_id, url}`) of runs that just ended, each with
    /// what its run came to, `pending` and due `now`.
    async fn insert_notifications(&mut self, rows: Value, now: Millis) -> Result<()>;
    /// Holds up to `limit` pending notifications due by `now` that no sender holds, under
    /// `token` until `until`.
    async fn hold_notifications(
        &mut self,
        now: Millis,
        until: Millis,
        token: &str,
        limit: u32,
    ) -> Result<Vec<Notification>>;
    /// Applies `update` to a notification still held under `token`; returns whether it was.
    async fn update_notification(
        &mut self,
        id: i64,
        token: &str,
        update: &NotificationUpdate,
    ) -> Result<bool>;
    /// Deletes these runs with their jobs, logs and artifact references; returns how many runs
    /// it deleted.
    async fn delete_runs(&mut self, runs: &[RunId]) -> Result<u64>;
    /// Deletes the records whose retention ended (see [`RecordCutoffs`]).
    async fn delete_old_records(&mut self, cutoffs: &RecordCutoffs) -> Result<()>;

    /// Records a fire unless it is recorded already; returns whether this call recorded it.
    async fn record_fire(
        &mut self,
        workflow_id: &str,
        fire_at: Millis,
        now: Millis,
    ) -> Result<bool>;
    /// Whether the workflow is paused; `None` when it does not exist (it was removed).
    async fn workflow_paused(&mut self, workflow_id: &str) -> Result<Option<bool>>;
    /// An active run of the workflow that no other run started.
    async fn active_top_level_run(&mut self, workflow_id: &str) -> Result<Option<RunId>>;
    /// Logs each event (their keys distinct) unless one with its source, scope and id is
    /// logged; returns, in order, each event as logged, and whether this call logged it.
    async fn log_webhook_events(
        &mut self,
        events: &[&NewWebhookEvent],
        now: Millis,
    ) -> Result<Vec<(WebhookEvent, bool)>>;
    /// Records what the latest delivery of logged events did (rows `{id, run_id, error}`): the
    /// run it started or answered, or why it was refused (the machine settles an event only
    /// while no delivery has a run).
    async fn settle_webhook_events(&mut self, rows: Value) -> Result<()>;

    /// Records the alert of a fire that started no run though it should have.
    async fn raise_fire_alert(
        &mut self,
        workflow_id: &str,
        message: &str,
        now: Millis,
    ) -> Result<()>;
    /// Records what a recorded fire came to: its run, or why it was skipped.
    async fn settle_fire(
        &mut self,
        workflow_id: &str,
        fire_at: Millis,
        outcome: Disposition<'_>,
    ) -> Result<()>;
}

/// What a transaction did that the world outside it must hear of, once it has committed.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    /// Jobs that became claimable.
    ready: Vec<JobId>,
    /// Jobs became claimable that `ready` does not list (new runs, opened gates, retries).
    woke: bool,
    finished: Vec<(String, RunStatus)>,
    /// Workflows of fires refused.
    refused_fires: Vec<String>,
}

impl Effects {
    fn finished(&mut self, runs: &[FinishedRun]) {
        self.finished
            .extend(runs.iter().map(|r| (r.workflow_id.clone(), r.status)));
    }

    /// Marks that jobs became claimable in ways [`Effects::ready`] does not list.
    pub fn woke(&mut self) {
        self.woke = true;
    }

    /// Whether workers may find jobs this transaction made claimable and did not claim itself.
    pub fn wakes_others(&self, claimed: &[JobId]) -> bool {
        self.woke || self.ready.iter().any(|id| !claimed.contains(id))
    }

    /// Counts the runs finished, in the metrics. Only after the commit: a rolled-back
    /// transaction finished nothing.
    pub fn publish(self) {
        for (workflow, status) in self.finished {
            crate::metrics::run_finished(&workflow, status);
        }
        for workflow in self.refused_fires {
            crate::metrics::fire_refused(&workflow);
        }
    }
}

/// The rows to insert for `runs`, gated or not: runs as `insert_run_rows` reads them, and
/// their jobs as `insert_job_rows` does. The input and `needs` travel as JSON values, which each
/// driver stores as JSON.
fn run_rows(runs: &[(&NewRun, bool)], now: Millis) -> (Value, Vec<Value>) {
    let mut rows = Vec::with_capacity(runs.len());
    let mut jobs = Vec::new();
    for &(run, gated) in runs {
        let status = if gated {
            RunStatus::Pending
        } else {
            RunStatus::Running
        };
        rows.push(json!({
            "id": run.id,
            "workflow_id": run.workflow_id,
            "version": run.version,
            "status": status.as_str(),
            "input": run.input,
            "parent_run_id": run.parent.as_ref().map(|p| &p.run_id),
            "parent_job_id": run.parent.as_ref().map(|p| p.job_id),
            "child_index": run.parent.as_ref().map(|p| p.index),
            "concurrency_key": run.concurrency.as_ref().map(|c| &c.key),
            "concurrency_limit": run.concurrency.as_ref().map(|c| c.limit),
            "idempotency_key": run.idempotency_key,
            "request_digest": run.request_digest,
            "timeout_ms": run.timeout_ms,
            "deadline_at": run.timeout_ms.map(|t| now + t),
            "retention_ms": run.retention_ms,
            "scheduled_at": run.scheduled_at,
            "started_at": (!gated).then_some(now),
            "priority": run.priority,
            "notify": run.notify,
        }));
        for job in &run.jobs {
            // A failure handler waits for more than its needs, so that no count of succeeded
            // needs (a gate opening, a retry) ever makes it ready: `flow::advance` does.
            jobs.push(json!({
                "run_id": run.id,
                "step_id": job.step_id,
                "needs": job.needs,
                "pending": job.needs.len() + usize::from(job.on_failure),
                "is_sink": job.is_sink,
                "budget": job.max_attempts,
                "continue_on_error": job.continue_on_error,
                "run_if": (!job.run_if.is_default()).then(|| job.run_if.to_string()),
                "flow": job.flow,
                "on_failure": job.on_failure,
                "priority": run.priority,
                "ready": !gated && job.needs.is_empty() && !job.on_failure,
            }));
        }
    }
    (Value::Array(rows), jobs)
}

/// Creates runs and their first jobs. Returns each run's id, which is an earlier run's id where
/// its idempotency key was used before. A gated run starts only while fewer than its limit run
/// with its key and none waits ahead of it; the others wait as `pending`.
pub(crate) async fn insert_runs(
    tx: &mut dyn Tx,
    runs: Vec<NewRun>,
    now: Millis,
) -> Result<Vec<RunId>> {
    let keys: Vec<&str> = runs
        .iter()
        .filter_map(|r| r.idempotency_key.as_deref())
        .collect();
    let mut known: BTreeMap<String, RunId> = BTreeMap::new();
    if !keys.is_empty() {
        for earlier in tx.runs_by_idempotency_key(&keys).await? {
            same_input_under_key(&runs, &earlier)?;
            known.insert(earlier.idempotency_key, earlier.id);
        }
    }
    let fresh: Vec<&NewRun> = runs
        .iter()
        .filter(|r| {
            r.idempotency_key
                .as_ref()
                .is_none_or(|k| !known.contains_key(k))
        })
        .collect();
    let gates: BTreeSet<&str> = fresh
        .iter()
        .filter_map(|r| r.concurrency.as_ref().map(|c| c.key.as_str()))
        .collect();
    let mut room: BTreeMap<&str, i64> = BTreeMap::new();
    for key in gates {
        tx.lock_key(&format!("gate/{key}")).await?;
        let load = tx.gate_load(key).await?;
        let limit = fresh
            .iter()
            .find_map(|r| r.concurrency.as_ref().filter(|c| c.key == key))
            .map_or(0, |c| c.limit);
        room.insert(key, gate_room(limit, load.running, load.pending));
    }
    let planned: Vec<(&NewRun, bool)> = fresh
        .iter()
        .map(|run| {
            let gated = run.concurrency.as_ref().is_some_and(|gate| {
                let free = room.get_mut(gate.key.as_str()).expect("counted above");
                *free -= 1;
                *free < 0
            });
            (*run, gated)
        })
        .collect();
    let mut inserted = BTreeSet::new();
    if !planned.is_empty() {
        let (rows, jobs) = run_rows(&planned, now);
        // A concurrent start with the same idempotency key may commit first: its run wins.
        inserted = tx.insert_run_rows(rows, now).await?;
        let jobs: Vec<Value> = jobs
            .into_iter()
            .filter(|j| inserted.contains(j["run_id"].as_str().unwrap_or_default()))
            .collect();
        if !jobs.is_empty() {
            tx.insert_job_rows(Value::Array(jobs), now).await?;
        }
    }
    let lost: Vec<&str> = fresh
        .iter()
        .filter(|r| !inserted.contains(&r.id))
        .filter_map(|r| r.idempotency_key.as_deref())
        .collect();
    if !lost.is_empty() {
        for earlier in tx.runs_by_idempotency_key(&lost).await? {
            same_input_under_key(&runs, &earlier)?;
            known.insert(earlier.idempotency_key, earlier.id);
        }
    }
    Ok(runs
        .iter()
        .map(|r| match &r.idempotency_key {
            Some(key) if !inserted.contains(&r.id) => {
                known.get(key).cloned().unwrap_or_else(|| r.id.clone())
            }
            _ => r.id.clone(),
        })
        .collect())
}

/// Takes from the shared rate limit `name` (see [`crate::state::quota_take`]); returns when the
/// taker may go.
pub(crate) async fn take_quota(
    tx: &mut dyn Tx,
    name: &str,
    limit: u32,
    per: std::time::Duration,
    now: Millis,
) -> Result<Millis> {
    let tat = tx.lock_quota(name).await?;
    let take = crate::state::quota_take(tat, now, limit, per, true);
    if let Some(tat) = take.tat_us {
        tx.set_quota(name, tat).await?;
    }
    Ok(take.at)
}

/// Records what every attempt in the batch spent, accepted or not (a late attempt's calls were
/// made, and paid for, all the same), once: a batch sent again after its commit was lost finds
/// its attempts noted and adds nothing.
async fn count_usage(
    tx: &mut dyn Tx,
    spent: Vec<(JobId, String, Vec<super::Usage>)>,
    now: Millis,
) -> Result<()> {
    if spent.is_empty() {
        return Ok(());
    }
    let attempts: Vec<Value> = spent
        .iter()
        .map(|(job, token, _)| json!({ "job_id": job, "lease_token": token }))
        .collect();
    let fresh = tx.note_usage_counted(Value::Array(attempts)).await?;
    let usage = spent
        .iter()
        .filter(|(job, token, _)| fresh.iter().any(|(j, t)| j == job && t == token))
        .flat_map(|(_, _, usage)| usage);
    if let Some(rows) = usage_rows(usage, now) {
        tx.add_usage(rows).await?;
    }
    Ok(())
}

/// One row per provider, workflow and day, in key order, so two batches lock their rows in the
/// same order.
fn usage_rows<'a>(usage: impl Iterator<Item = &'a super::Usage>, now: Millis) -> Option<Value> {
    let mut usage = usage.peekable();
    usage.peek()?;
    let day = jiff::Timestamp::from_millisecond(now)
        .map(|t| t.strftime("%Y-%m-%d").to_string())
        .unwrap_or_default();
    let mut sums: BTreeMap<(&str, &str), super::Usage> = BTreeMap::new();
    for usage in usage {
        let sum = sums
            .entry((&usage.provider, &usage.workflow_id))
            .or_insert_with(|| super::Usage {
                provider: usage.provider.clone(),
                workflow_id: usage.workflow_id.clone(),
                ..Default::default()
            });
        sum.requests += usage.requests;
        sum.errors += usage.errors;
        sum.tokens += usage.tokens;
        sum.cost += usage.cost;
    }
    let rows: Vec<Value> = sums
        .values()
        .map(|u| {
            json!({
                "provider": super::storable_text(&u.provider),
                "workflow_id": u.workflow_id,
                "day": day,
                "requests": u.requests,
                "errors": u.errors,
                "tokens": u.tokens,
                "cost": if u.cost.is_finite() { u.cost } else { 0.0 },
            })
        })
        .collect();
    Some(Value::Array(rows))
}

/// Stores what the attempts whose settlement was accepted printed; a late attempt's lines go
/// with its refused settlement.
async fn keep_logs(
    tx: &mut dyn Tx,
    completions: &[Completion],
    settled: &[SettledJob],
) -> Result<()> {
    if completions.iter().all(|c| c.logs.is_empty()) {
        return Ok(());
    }
    let rows: Vec<Value> = accepted(completions, settled)
        .flat_map(|(c, job)| log_rows(&job.run_id, &job.step_id, c.lease.attempt, &c.logs))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    tx.append_logs(Value::Array(rows)).await
}

/// The completions whose settlement was accepted, with their jobs. Two attempts of one job may
/// complete in one batch (a worker that took its job again after losing it): the fence accepts
/// the later attempt only.
fn accepted<'a>(
    completions: &'a [Completion],
    settled: &'a [SettledJob],
) -> impl Iterator<Item = (&'a Completion, &'a SettledJob)> {
    let jobs: BTreeMap<JobId, &SettledJob> = settled.iter().map(|j| (j.id, j)).collect();
    let mut latest: BTreeMap<JobId, u32> = BTreeMap::new();
    for c in completions {
        let attempt = latest.entry(c.lease.job_id).or_default();
        *attempt = (*attempt).max(c.lease.attempt);
    }
    completions.iter().filter_map(move |c| {
        let job = *jobs.get(&c.lease.job_id)?;
        (latest.get(&c.lease.job_id) == Some(&c.lease.attempt)).then_some((c, job))
    })
}

/// Stores the references to the files that the attempts whose settlement was accepted made;
/// a late attempt's files go unnamed, and the artifact sweep deletes them.
async fn keep_artifacts(
    tx: &mut dyn Tx,
    completions: &[Completion],
    settled: &[SettledJob],
    now: Millis,
) -> Result<()> {
    if completions.iter().all(|c| c.artifacts.is_empty()) {
        return Ok(());
    }
    let rows: Vec<Value> = accepted(completions, settled)
        .flat_map(|(c, job)| {
            c.artifacts.iter().map(move |a| {
                json!({
                    "id": a.id,
                    "run_id": job.run_id,
                    "step_id": job.step_id,
                    "attempt": c.lease.attempt,
                    "sha256": a.sha256,
                    "size": a.size,
                    "content_type": super::storable_text(&a.content_type),
                })
            })
        })
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    tx.insert_artifacts(Value::Array(rows), now).await
}

fn log_rows<'a>(
    run_id: &'a str,
    step_id: &'a str,
    attempt: u32,
    lines: &'a [LogLine],
) -> impl Iterator<Item = Value> + 'a {
    lines.iter().map(move |line| {
        json!({
            "run_id": run_id,
            "step_id": step_id,
            "attempt": attempt,
            "at": line.at,
            "stream": line.stream,
            "text": super::storable_text(&line.text),
        })
    })
}

/// Stores lines an attempt printed so far, while its lease holds: a worker that lost its job
/// writes no more of it. Returns whether the lease held.
pub(crate) async fn append_live_logs(
    tx: &mut dyn Tx,
    lease: &Lease,
    lines: &[LogLine],
) -> Result<bool> {
    // Under the run's lock, as a completion's lines are: a follower reading the lines after the
    // last it saw never skips one that committed after a later one.
    tx.lock_runs_of_jobs(&[lease.job_id]).await?;
    let Some((run_id, step_id)) = tx.held_job(lease).await? else {
        return Ok(false);
    };
    let rows: Vec<Value> = log_rows(&run_id, &step_id, lease.attempt, lines).collect();
    if !rows.is_empty() {
        tx.append_logs(Value::Array(rows)).await?;
    }
    Ok(true)
}

/// What [`Tx::nonce_state`] read of an account and an owner.
#[derive(Debug, Clone, Copy, Default, sqlx::FromRow)]
pub(crate) struct NonceState {
    pub next: Option<i64>,
    pub owned: Option<i64>,
}

/// The nonce allocator's rule, for every worker on the database. Under the account's lock, so
/// two transactions never read the same next nonce:
/// - an owner keeps the nonce it was given (`Again`): an attempt that crashed between taking it
///   and storing its signed transaction takes it again, so no nonce is skipped; and since an
///   owner only ever signs with that one nonce, at most one of its transactions can be mined;
/// - unless the node has seen that nonce used since (`Spent`): then signing again could send a
///   second transaction, and the step must stop instead;
/// - a new owner gets the larger of the account's next nonce and the node's pending nonce (the
///   floor): nonces that a key also used elsewhere took are never given again, and every nonce
///   given is one above the last (`New`). The database refuses a nonce given twice.
pub(crate) async fn allocate_nonce(
    tx: &mut dyn Tx,
    request: &NonceRequest,
    now: Millis,
) -> Result<NonceAllocation> {
    let chain_id = i64::try_from(request.chain_id)
        .map_err(|_| StoreError::Rejected(format!("chain id {} is too large", request.chain_id)))?;
    let floor = i64::try_from(request.floor)
        .map_err(|_| StoreError::Rejected(format!("nonce {} is too large", request.floor)))?;
    tx.lock_key(&format!("chain_nonce/{chain_id}/{}", request.address))
        .await?;
    let state = tx
        .nonce_state(chain_id, &request.address, &request.owner)
        .await?;
    if let Some(owned) = state.owned {
        let owned_u64 = owned as u64;
        if owned >= floor {
            return Ok(NonceAllocation::Again(owned_u64));
        }
        let fill = tx.nonce_filler(chain_id, &request.address, owned).await?;
        let Some(hash) = fill.and_then(|f| f.hash) else {
            return Ok(NonceAllocation::Spent(owned_u64));
        };
        if request.filled != Some(owned_u64) {
            return Ok(NonceAllocation::Filled {
                nonce: owned_u64,
                hash,
            });
        }
        let nonce = state.next.unwrap_or(0).max(floor);
        tx.move_nonce(chain_id, &request.address, &request.owner, nonce, now)
            .await?;
        return Ok(NonceAllocation::New(nonce as u64));
    }
    let nonce = state.next.unwrap_or(0).max(floor);
    tx.record_nonce(
        chain_id,
        &request.address,
        &request.owner,
        nonce,
        request.job_id,
        now,
    )
    .await?;
    Ok(NonceAllocation::New(nonce as u64))
}

/// Who holds a nonce, as [`Tx::nonce_holder`] read it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct NonceHolder {
    pub job_id: Option<JobId>,
    /// The state of that job; `None` once it is no longer stored (its run was pruned).
    pub job_state: Option<JobState>,
    pub finished_at: Option<Millis>,
}

/// Which step fills a gap, as [`Tx::nonce_filler`] read it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct NonceFiller {
    pub job_id: JobId,
    /// The state of that job; `None` once it is no longer stored.
    pub job_state: Option<JobState>,
    /// The transaction it fills the gap with, once signed.
    pub hash: Option<String>,
}

/// How long after a step's job ended its nonce may be filled: a cancelled step's task stops at
/// its next heartbeat, and until then it may still send.
pub const NONCE_GAP_GRACE: Millis = 30_000;

/// Whether a step waiting with a later nonce may fill the gap below it, under the account's
/// lock. A gap is a nonce given to a step whose transaction the node does not have: its run was
/// cancelled between storing the signed transaction and sending it, or the node refused it until
/// the step failed. Every transaction of the key after it waits in the node's pool until the
/// nonce is used, so the waiting step fills it with one that does nothing.
/// - Only a nonce one of our steps was given is filled, once that step's job failed or was
///   cancelled [`NONCE_GAP_GRACE`] ago, or is no longer stored. A nonce no step holds was skipped
///   because another sender of the key had used it; one given outside a job has no end to wait
///   for: both are left alone (`Wait`).
/// - The holder keeps its nonce: retried, it is told `Filled` once the node has seen the nonce
///   used, and is given another only when it has seen the filler mined (`allocate_nonce`): the
///   engine cannot know whether its own transaction reached another node.
/// - One step fills a gap (`chain_nonce_fills`): the first to ask, again after a crash, or
///   another once that one's job has ended.
/// - Nothing at or past the account's next nonce is a gap: no step of ours waits above it.
pub(crate) async fn fill_nonce_gap(
    tx: &mut dyn Tx,
    gap: &NonceGap,
    now: Millis,
) -> Result<GapFill> {
    let chain_id = i64::try_from(gap.chain_id)
        .map_err(|_| StoreError::Rejected(format!("chain id {} is too large", gap.chain_id)))?;
    let nonce = i64::try_from(gap.nonce)
        .map_err(|_| StoreError::Rejected(format!("nonce {} is too large", gap.nonce)))?;
    tx.lock_key(&format!("chain_nonce/{chain_id}/{}", gap.address))
        .await?;
    let next = tx.nonce_state(chain_id, &gap.address, "").await?.next;
    if next.is_none_or(|next| nonce >= next) {
        return Ok(GapFill::Wait);
    }
    let Some(NonceHolder {
        job_id: Some(_),
        job_state,
        finished_at,
    }) = tx.nonce_holder(chain_id, &gap.address, nonce).await?
    else {
        return Ok(GapFill::Wait);
    };
    let ended = match job_state {
        None => true,
        Some(state) => {
            JobState::UNSUCCESSFUL.contains(&state)
                && finished_at.is_some_and(|at| at.saturating_add(NONCE_GAP_GRACE) <= now)
        }
    };
    if !ended {
        return Ok(GapFill::Wait);
    }
    match tx.nonce_filler(chain_id, &gap.address, nonce).await? {
        Some(filler) if filler.job_id == gap.job_id => Ok(GapFill::Fill),
        Some(filler) if filler.job_state.is_some_and(|s| !s.is_finished()) => Ok(GapFill::Wait),
        _ => {
            tx.record_fill(chain_id, &gap.address, nonce, gap.job_id, now)
                .await?;
            Ok(GapFill::Fill)
        }
    }
}

/// Notes the transaction a filler signed, before it is sent: the holder of the nonce, retried,
/// is told it ([`NonceAllocation::Filled`]), and once it is mined the holder's own transaction
/// never can be.
pub(crate) async fn note_nonce_fill(tx: &mut dyn Tx, gap: &NonceGap, hash: &str) -> Result<()> {
    let chain_id = i64::try_from(gap.chain_id)
        .map_err(|_| StoreError::Rejected(format!("chain id {} is too large", gap.chain_id)))?;
    let nonce = i64::try_from(gap.nonce)
        .map_err(|_| StoreError::Rejected(format!("nonce {} is too large", gap.nonce)))?;
    tx.note_fill_hash(chain_id, &gap.address, nonce, gap.job_id, hash)
        .await
}

/// A key names one request (Stripe's rule): reusing it with another input is a mistake to
/// report, not a start to answer with the earlier run.
fn same_input_under_key(runs: &[NewRun], earlier: &KeyedRun) -> Result<()> {
    let Some(stored) = &earlier.request_digest else {
        return Ok(());
    };
    let differs = runs.iter().any(|run| {
        run.idempotency_key.as_deref() == Some(earlier.idempotency_key.as_str())
            && run
                .request_digest
                .as_ref()
                .is_some_and(|asked| asked != stored)
    });
    if differs {
        return Err(StoreError::Conflict(format!(
            "this idempotency key started run {} with another input; a new run needs a new key",
            earlier.id
        )));
    }
    Ok(())
}

/// Applies settlements fenced by their leases, then everything that follows from them; returns
/// the jobs whose settlement was accepted.
pub(crate) async fn complete(
    tx: &mut dyn Tx,
    completions: Vec<Completion>,
    now: Millis,
    effects: &mut Effects,
) -> Result<Vec<JobId>> {
    if completions.is_empty() {
        return Ok(Vec::new());
    }
    let mut completions = completions;
    tolerate_failures(tx, &mut completions).await?;
    let ids: Vec<JobId> = completions.iter().map(|c| c.lease.job_id).collect();
    let settled = tx
        .settle_jobs(completion_rows(&completions, now), &ids, now)
        .await?;
    effects.ready.extend(
        settled
            .promoted
            .iter()
            .filter(|(_, state)| *state == JobState::Available)
            .map(|(id, _)| *id),
    );
    keep_logs(tx, &completions, &settled.jobs).await?;
    keep_artifacts(tx, &completions, &settled.jobs, now).await?;
    let spent: Vec<(JobId, String, Vec<super::Usage>)> = completions
        .iter()
        .filter(|c| !c.usage.is_empty())
        .map(|c| (c.lease.job_id, c.lease.token.clone(), c.usage.clone()))
        .collect();
    let mut accepted = Vec::with_capacity(settled.jobs.len());
    let mut sinks = Vec::new();
    let mut failed = Vec::new();
    let mut flowing = BTreeSet::new();
    let mut looping: BTreeMap<JobId, LoopMoves> = BTreeMap::new();
    for job in settled.jobs {
        accepted.push(job.id);
        if let Some(loop_job) = job.loop_job {
            match job.state {
                JobState::Available | JobState::Retrying => effects.ready.push(job.id),
                JobState::Failed => {
                    let error = format!(
                        "item {} failed: {}",
                        job.step_id,
                        job.error.unwrap_or_default()
                    );
                    looping
                        .entry(loop_job)
                        .or_default()
                        .failure
                        .get_or_insert(error);
                }
                JobState::Succeeded => looping.entry(loop_job).or_default().succeeded += 1,
                _ => {}
            }
            continue;
        }
        if job.flow && job.state.is_finished() {
            flowing.insert(job.run_id);
            continue;
        }
        match job.state {
            // The other steps that succeeded have promoted their dependents already.
            JobState::Succeeded if job.is_sink => sinks.push(Succeeded {
                run_id: job.run_id,
                step_id: job.step_id,
                is_sink: true,
                flow: false,
                loop_job: None,
            }),
            JobState::Failed => failed.push((
                job.run_id,
                format!(
                    "step {} failed: {}",
                    job.step_id,
                    job.error.unwrap_or_default()
                ),
            )),
            JobState::Available | JobState::Retrying => effects.ready.push(job.id),
            _ => {}
        }
    }
    // A `for_each` step's items are created in the transaction that parks it.
    for completion in &completions {
        if let Settlement::Loop {
            items, parallel, ..
        } = &completion.settlement
        {
            let job = completion.lease.job_id;
            if accepted.contains(&job) {
                tx.insert_items(job, items, *parallel, now).await?;
                looping.entry(job).or_default().started = true;
            }
        }
    }
    // Child runs a `workflow` step starts are created in the transaction that parks it.
    let children: Vec<NewRun> = completions
        .into_iter()
        .filter(|c| accepted.contains(&c.lease.job_id))
        .flat_map(|c| c.children)
        .collect();
    if !children.is_empty() {
        insert_runs(tx, children, now).await?;
        effects.woke();
    }
    let moved = Moved {
        succeeded: sinks,
        ended: failed,
        flowing,
        looping,
    };
    cascade(tx, moved, RunStatus::Failed, now, effects).await?;
    // Last: its rows stay locked until the commit, and every batch of a workflow touches them.
    count_usage(tx, spent, now).await?;
    Ok(accepted)
}

/// Moves `for_each` steps whose items settled: one whose item failed for good fails (or is
/// tolerated) and its other items are cancelled; one whose items all succeeded succeeds with
/// their outputs; the others start waiting items as room frees up under `parallel`.
async fn progress_loops(
    tx: &mut dyn Tx,
    looping: BTreeMap<JobId, LoopMoves>,
    now: Millis,
    effects: &mut Effects,
    moved: &mut Moved,
) -> Result<()> {
    for (loop_job, moves) in looping {
        match moves.failure {
            Some(error) => {
                let open = tx.open_items(&[loop_job]).await?;
                if !open.is_empty() {
                    tx.cancel_jobs(&open, now).await?;
                    // The child runs of `workflow` items: only their gates matter now.
                    let why = format!("a sibling of its item failed: {error}");
                    let cancelled = cancel_children(tx, &open, &why, now).await?;
                    runs_ended(tx, &cancelled, now, effects).await?;
                }
                fail_parked(tx, loop_job, &error, now, moved).await?;
            }
            None => {
                let Some(progress) = tx.count_down_loop(loop_job, moves.succeeded).await? else {
                    continue;
                };
                if progress.left <= 0 {
                    moved.succeeded.extend(tx.finish_loop(loop_job, now).await?);
                    continue;
                }
                let start = loop_start(progress.parallel, moves.started, moves.succeeded);
                if start > 0 {
                    effects
                        .ready
                        .extend(tx.release_items(loop_job, start, now).await?);
                }
            }
        }
    }
    Ok(())
}

/// Cancels the active child runs of `jobs` and everything under them; returns them, their
/// parent steps forgotten (those are ending: only their gates matter).
async fn cancel_children(
    tx: &mut dyn Tx,
    jobs: &[JobId],
    why: &str,
    now: Millis,
) -> Result<Vec<FinishedRun>> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let children = tx.active_child_runs(jobs).await?;
    if children.is_empty() {
        return Ok(Vec::new());
    }
    let roots: Vec<&str> = children.iter().map(String::as_str).collect();
    let ended = tx.cancel_descendants(&roots, why, now).await?;
    let all: Vec<&str> = ended.iter().map(|r| r.id.as_str()).collect();
    tx.cancel_open_jobs(&all, now).await?;
    Ok(ended
        .into_iter()
        .map(|r| FinishedRun {
            parent_job_id: None,
            ..r
        })
        .collect())
}

/// Fails a parked step (a `workflow` step whose child run failed, a `for_each` step whose item
/// did) with `error`, or tolerates it when it continues on error; returns it when tolerated.
async fn fail_parked(
    tx: &mut dyn Tx,
    job: JobId,
    error: &str,
    now: Millis,
    moved: &mut Moved,
) -> Result<Option<Succeeded>> {
    if tx.continuing_on_error(&[job]).await?.contains(&job) {
        let tolerated = tx.tolerate_parked_step(job, error, now).await?;
        moved.succeeded.extend(tolerated.clone());
        return Ok(tolerated);
    }
    if let Some(step) = tx.fail_parked_step(job, error, now).await? {
        if let Some(loop_job) = step.loop_job {
            let error = format!("item {} failed: {error}", step.step_id);
            moved
                .looping
                .entry(loop_job)
                .or_default()
                .failure
                .get_or_insert(error);
        } else if step.flow {
            moved.flowing.insert(step.run_id);
        } else {
            let error = format!("step {} failed: {error}", step.step_id);
            moved.ended.push((step.run_id, error));
        }
    }
    Ok(None)
}

/// A step that continues on error does not fail: whichever way its failure for good came (its
/// worker's result, a result the database refused, its lost last lease), it is tolerated.
async fn tolerate_failures(tx: &mut dyn Tx, completions: &mut [Completion]) -> Result<()> {
    let failing: Vec<JobId> = completions
        .iter()
        .filter(|c| matches!(c.settlement, Settlement::Fail { .. }))
        .map(|c| c.lease.job_id)
        .collect();
    if failing.is_empty() {
        return Ok(());
    }
    let tolerant = tx.continuing_on_error(&failing).await?;
    for completion in completions
        .iter_mut()
        .filter(|c| tolerant.contains(&c.lease.job_id))
    {
        let failed = std::mem::replace(&mut completion.settlement, Settlement::Release);
        completion.settlement = failed.continuing_on_error(true);
    }
    Ok(())
}

/// Follows settled jobs to their consequences until nothing more changes: dependents become
/// available, runs finish, a finished child run settles its parent's `workflow` step (which may
/// finish the parent run in turn), and gates open for waiting runs.
async fn cascade(
    tx: &mut dyn Tx,
    moved: Moved,
    mut ended_as: RunStatus,
    now: Millis,
    effects: &mut Effects,
) -> Result<()> {
    let mut moved = moved;
    loop {
        // Items first: a loop they finish is a step that succeeded or failed like any other.
        for item in std::mem::take(&mut moved.succeeded) {
            match item.loop_job {
                Some(loop_job) => moved.looping.entry(loop_job).or_default().succeeded += 1,
                None => moved.succeeded.push(item),
            }
        }
        if !moved.looping.is_empty() {
            let looping = std::mem::take(&mut moved.looping);
            progress_loops(tx, looping, now, effects, &mut moved).await?;
        }
        let Moved {
            succeeded,
            ended,
            mut flowing,
            ..
        } = std::mem::take(&mut moved);
        let mut finished = Vec::new();
        let (flow_steps, succeeded): (Vec<Succeeded>, Vec<Succeeded>) =
            succeeded.into_iter().partition(|s| s.flow);
        flowing.extend(flow_steps.into_iter().map(|s| s.run_id));
        let (sinks, inner): (Vec<&Succeeded>, Vec<&Succeeded>) =
            succeeded.iter().partition(|s| s.is_sink);
        if !inner.is_empty() {
            effects
                .ready
                .extend(tx.promote_dependents(&inner, now).await?);
        }
        if !sinks.is_empty() {
            let runs: BTreeSet<&str> = sinks.iter().map(|s| s.run_id.as_str()).collect();
            let runs: Vec<&str> = runs.into_iter().collect();
            finished.extend(tx.finish_done_runs(&runs, now).await?);
        }
        if !ended.is_empty() {
            finished.extend(end_runs(tx, &ended, ended_as, now).await?);
        }
        if !flowing.is_empty() {
            let runs: Vec<RunId> = std::mem::take(&mut flowing).into_iter().collect();
            finished.extend(advance(tx, &runs, now, effects).await?);
        }
        runs_ended(tx, &finished, now, effects).await?;
        let (parents, orphans) = settle_parents(tx, &finished, now).await?;
        moved = parents;
        if !orphans.is_empty() {
            // Their parent step has ended: only their gates matter, not their parent.
            let cancelled: Vec<FinishedRun> = end_runs(tx, &orphans, RunStatus::Cancelled, now)
                .await?
                .into_iter()
                .map(|r| FinishedRun {
                    parent_job_id: None,
                    ..r
                })
                .collect();
            runs_ended(tx, &cancelled, now, effects).await?;
        }
        // a parent whose child did not succeed fails like any step
        ended_as = RunStatus::Failed;
        if moved.succeeded.is_empty()
            && moved.ended.is_empty()
            && moved.flowing.is_empty()
            && moved.looping.is_empty()
        {
            return Ok(());
        }
    }
}

/// Ends active runs as `status` with their errors, and with them every open job and every active
/// descendant run (cancelled). A run that failed or timed out raises an alert.
async fn end_runs(
    tx: &mut dyn Tx,
    runs: &[(RunId, String)],
    status: RunStatus,
    now: Millis,
) -> Result<Vec<FinishedRun>> {
    let mut finished = tx.end_active_runs(runs, status, now).await?;
    if finished.is_empty() {
        return Ok(finished);
    }
    let roots: Vec<&str> = finished.iter().map(|r| r.id.as_str()).collect();
    if status.raises_alert() {
        tx.raise_alerts(&roots, now).await?;
    }
    let descendants = tx
        .cancel_descendants(&roots, "its parent run ended", now)
        .await?;
    // Their parents are ending too, so only their gates matter, not their parents.
    finished.extend(descendants.into_iter().map(|r| FinishedRun {
        parent_job_id: None,
        ..r
    }));
    let all: Vec<&str> = finished.iter().map(|r| r.id.as_str()).collect();
    tx.cancel_open_jobs(&all, now).await?;
    Ok(finished)
}

/// Applies `flow::advance` to runs with control flow whose steps finished: waiting steps run or
/// are skipped, and a run succeeds, fails, or begins its failure handlers. Returns the runs it
/// finished (with their descendants a failure handling cancelled, for their gates).
async fn advance(
    tx: &mut dyn Tx,
    runs: &[RunId],
    now: Millis,
    effects: &mut Effects,
) -> Result<Vec<FinishedRun>> {
    let mut by_run: BTreeMap<RunId, (Option<String>, Vec<FlowStep>)> = BTreeMap::new();
    for (run, failing, step) in tx.flow_steps(runs).await? {
        let entry = by_run.entry(run).or_insert_with(|| (failing, Vec::new()));
        entry.1.push(step);
    }
    let (mut ready, mut skipped, mut cancelled) = (Vec::new(), Vec::new(), Vec::new());
    let (mut succeed, mut fail, mut handle) = (Vec::new(), Vec::new(), Vec::new());
    // Cancelled steps that may have child runs or items to stop: `workflow` and `for_each`
    // steps park while they wait.
    let mut parked = Vec::new();
    for (run, (failing, steps)) in by_run {
        let decided = flow::advance(&steps, failing.as_deref());
        parked.extend(
            steps
                .iter()
                .filter(|s| s.state == JobState::Parked && decided.cancelled.contains(&s.job_id))
                .map(|s| s.job_id),
        );
        ready.extend(decided.ready);
        skipped.extend(decided.skipped);
        cancelled.extend(decided.cancelled);
        match decided.outcome {
            RunOutcome::Continue => {}
            RunOutcome::Succeed => succeed.push(run),
            RunOutcome::Fail(error) => fail.push((run, error)),
            RunOutcome::HandleFailure(error) => handle.push((run, error)),
        }
    }
    let mut finished = Vec::new();
    for (run, error) in &handle {
        tx.begin_failure_handling(run, error).await?;
    }
    if !cancelled.is_empty() {
        tx.cancel_jobs(&cancelled, now).await?;
        // The child runs of cancelled `workflow` steps: only their gates matter now, not their
        // parents.
        let items = if parked.is_empty() {
            Vec::new()
        } else {
            tx.open_items(&parked).await?
        };
        if !items.is_empty() {
            tx.cancel_jobs(&items, now).await?;
        }
        parked.extend(items);
        finished.extend(cancel_children(tx, &parked, "its parent run failed", now).await?);
    }
    if !skipped.is_empty() {
        tx.skip_waiting_jobs(&skipped, now).await?;
    }
    if !ready.is_empty() {
        effects
            .ready
            .extend(tx.make_jobs_available(&ready, now).await?);
    }
    if !succeed.is_empty() {
        let runs: Vec<&str> = succeed.iter().map(String::as_str).collect();
        finished.extend(tx.finish_done_runs(&runs, now).await?);
    }
    if !fail.is_empty() {
        finished.extend(end_runs(tx, &fail, RunStatus::Failed, now).await?);
    }
    Ok(finished)
}

/// Starts the oldest waiting runs behind each key whose runs just finished, up to the key's
/// limit. Returns whether jobs became claimable.
async fn open_gates(tx: &mut dyn Tx, finished: &[FinishedRun], now: Millis) -> Result<bool> {
    let keys: BTreeSet<&str> = finished
        .iter()
        .filter_map(|r| r.concurrency_key.as_deref())
        .collect();
    let mut woke = false;
    for key in keys {
        tx.lock_key(&format!("gate/{key}")).await?;
        let load = tx.gate_load(key).await?;
        let free = gate_opening(load.oldest_pending_limit, load.running);
        if free <= 0 {
            continue;
        }
        let started = tx.start_pending_runs(key, free, now).await?;
        if !started.is_empty() {
            woke |= tx.make_ready(&started, now).await? > 0;
        }
    }
    Ok(woke)
}

/// For each parked `workflow` step among the parents of `finished`: the first child that did not
/// succeed, if one did not (the step fails), else none (the step succeeds once every child has).
fn parent_outcomes(finished: &[FinishedRun]) -> BTreeMap<JobId, Option<&FinishedRun>> {
    let mut parents: BTreeMap<JobId, Option<&FinishedRun>> = BTreeMap::new();
    for run in finished {
        if let Some(parent) = run.parent_job_id {
            let failure = parents.entry(parent).or_default();
            if run.status != RunStatus::Succeeded && failure.is_none() {
                *failure = Some(run);
            }
        }
    }
    parents
}

/// Steps that moved, and what their runs do next.
#[derive(Debug, Default)]
struct Moved {
    /// Steps that succeeded, of runs without control flow: their dependents may run, and a
    /// sink's success may finish its run.
    succeeded: Vec<Succeeded>,
    /// Runs without control flow that end (as the cascade says), with their errors.
    ended: Vec<(RunId, String)>,
    /// Runs with control flow whose steps finished: `flow::advance` decides what follows.
    flowing: BTreeSet<RunId>,
    /// `for_each` steps whose items were created or settled.
    looping: BTreeMap<JobId, LoopMoves>,
}

/// What a transaction did to the items of one `for_each` step.
#[derive(Debug, Default)]
struct LoopMoves {
    /// Its items were created (or, on a retry, put back to waiting).
    started: bool,
    /// How many of its items succeeded.
    succeeded: i64,
    /// The first of its items that failed for good.
    failure: Option<String>,
}

/// What settling parents led to: the steps that moved, and child runs to cancel with their
/// errors.
type SettledParents = (Moved, Vec<(RunId, String)>);

/// Settles the parked `workflow` steps whose child runs just finished: failed when a child did not
/// succeed, succeeded with the list of child outputs once every child succeeded.
async fn settle_parents(
    tx: &mut dyn Tx,
    finished: &[FinishedRun],
    now: Millis,
) -> Result<SettledParents> {
    let mut moved = Moved::default();
    let mut orphans = Vec::new();
    let parents = parent_outcomes(finished);
    if parents.is_empty() {
        return Ok((moved, orphans));
    }
    // Children finishing in two transactions at once would each see the other still running;
    // the parent run's lock makes the second wait and then see the first.
    let parent_jobs: Vec<JobId> = parents.keys().copied().collect();
    tx.lock_runs_of_jobs(&parent_jobs).await?;
    for (parent, failure) in parents {
        match failure {
            Some(child) => {
                let error = format!("child run {} {}", child.id, child.status);
                if let Some(step) = fail_parked(tx, parent, &error, now, &mut moved).await? {
                    // Its other children are of no use to anyone now.
                    let why = format!("step {} of run {} ended", step.step_id, step.run_id);
                    for child in tx.active_child_runs(&[parent]).await? {
                        orphans.push((child, why.clone()));
                    }
                }
            }
            None => moved
                .succeeded
                .extend(tx.succeed_parked_step(parent, now).await?),
        }
    }
    Ok((moved, orphans))
}

/// Settles expired leases as lost attempts and times out runs past their deadline.
pub(crate) async fn sweep(tx: &mut dyn Tx, now: Millis, effects: &mut Effects) -> Result<Swept> {
    const BATCH: u32 = 1_000;
    let lost: Vec<Completion> = tx
        .expired_leases(now, BATCH)
        .await?
        .into_iter()
        .map(|expired| Completion {
            settlement: settle_lost_lease(expired.lease.attempt, expired.max_attempts, now),
            lease: expired.lease,
            children: Vec::new(),
            logs: Vec::new(),
            artifacts: Vec::new(),
            usage: Vec::new(),
        })
        .collect();
    let reclaimed = complete(tx, lost, now, effects).await?.len() as u64;
    if reclaimed > 0 {
        effects.woke();
    }
    tx.drop_spent_leases(now).await?;
    let late: Vec<(RunId, String)> = tx
        .overdue_runs(now, BATCH)
        .await?
        .into_iter()
        .map(|(id, timeout)| (id, timeout_error(timeout)))
        .collect();
    let timed_out = late.len() as u64;
    let moved = Moved {
        ended: late,
        ..Moved::default()
    };
    cascade(tx, moved, RunStatus::TimedOut, now, effects).await?;
    Ok(Swept {
        reclaimed_jobs: reclaimed,
        timed_out_runs: timed_out,
    })
}

/// Cancels an active run; a finished one keeps its status. Returns the run's status after.
pub(crate) async fn cancel_run(
    tx: &mut dyn Tx,
    run_id: &str,
    now: Millis,
    effects: &mut Effects,
) -> Result<RunStatus> {
    let status = tx
        .lock_run(run_id)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("run {run_id}")))?;
    if status.is_finished() {
        return Ok(status);
    }
    let moved = Moved {
        ended: vec![(run_id.to_owned(), "cancelled".to_owned())],
        ..Moved::default()
    };
    cascade(tx, moved, RunStatus::Cancelled, now, effects).await?;
    Ok(RunStatus::Cancelled)
}

/// Puts a run that did not succeed back to work: its failed and cancelled steps wait for their
/// needs again, and succeeded steps keep their outputs. A `workflow` step that started child runs
/// waits for them again instead of starting new ones: its children that did not succeed are
/// retried with it, down the tree.
pub(crate) async fn retry_run(
    tx: &mut dyn Tx,
    run_id: &str,
    now: Millis,
    effects: &mut Effects,
) -> Result<()> {
    let status = tx
        .lock_run(run_id)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("run {run_id}")))?;
    if !RunStatus::RETRYABLE.contains(&status) {
        return Err(StoreError::Conflict(format!(
            "run {run_id} is {status}; only failed, cancelled or timed-out runs can be retried"
        )));
    }
    let mut runs = vec![run_id.to_owned()];
    let mut waiting_parents: Vec<JobId> = Vec::new();
    let mut level = runs.clone();
    while !level.is_empty() {
        let children = tx.unsuccessful_children(&level).await?;
        waiting_parents.extend(children.iter().map(|(job, _)| *job));
        level = children.into_iter().map(|(_, child)| child).collect();
        runs.extend(level.iter().cloned());
    }
    tx.reopen_runs(&runs, now).await?;
    tx.repark_steps(&waiting_parents).await?;
    // Runs with control flow: `flow` decides what goes back to waiting, and then what runs.
    let mut flowing: BTreeMap<RunId, Vec<FlowStep>> = BTreeMap::new();
    for (run, _, step) in tx.flow_steps(&runs).await? {
        flowing.entry(run).or_default().push(step);
    }
    let reset: Vec<JobId> = flowing.values().flat_map(|s| flow::retried(s)).collect();
    if !reset.is_empty() {
        tx.reset_jobs(&reset).await?;
    }
    tx.reset_unsuccessful_jobs(&runs).await?;
    tx.make_ready(&runs, now).await?;
    if !flowing.is_empty() {
        let moved = Moved {
            flowing: flowing.into_keys().collect(),
            ..Moved::default()
        };
        cascade(tx, moved, RunStatus::Failed, now, effects).await?;
    }
    effects.woke();
    Ok(())
}

/// Records a schedule fire, unique on (workflow, fire time), and starts its run or records why
/// it was skipped.
pub(crate) async fn fire(
    tx: &mut dyn Tx,
    fire: FireParams,
    now: Millis,
    effects: &mut Effects,
) -> Result<FireOutcome> {
    let (workflow, at) = (fire.workflow_id.as_str(), fire.fire_at);
    if !tx.record_fire(workflow, at, now).await? {
        return Ok(FireOutcome::AlreadyRecorded);
    }
    // Another scheduler may be starting the previous fire right now, or the workflow being
    // removed: wait for either.
    tx.lock_key(&format!("workflow/{workflow}")).await?;
    let paused = tx.workflow_paused(workflow).await?;
    let active = if paused == Some(false) && fire.skip_if_active {
        tx.active_top_level_run(workflow).await?
    } else {
        None
    };
    match fire_skip_reason(paused, active.as_deref()) {
        Some(reason) => {
            tx.settle_fire(workflow, at, Disposition::Declined(&reason))
                .await?;
            Ok(FireOutcome::Skipped(reason))
        }
        None => {
            let run = insert_runs(tx, vec![fire.run.clone()], now)
                .await?
                .remove(0);
            tx.settle_fire(workflow, at, Disposition::Run(&run)).await?;
            effects.woke();
            Ok(FireOutcome::Started(run))
        }
    }
}

/// Records a fire that starts no run (see `Store::skip_fire`).
pub(crate) async fn skip_fire(
    tx: &mut dyn Tx,
    fire: SkippedFire<'_>,
    now: Millis,
    effects: &mut Effects,
) -> Result<bool> {
    if !tx.record_fire(fire.workflow_id, fire.fire_at, now).await? {
        return Ok(false);
    }
    tx.settle_fire(
        fire.workflow_id,
        fire.fire_at,
        Disposition::Declined(fire.reason),
    )
    .await?;
    if fire.refused {
        let at = jiff::Timestamp::from_millisecond(fire.fire_at)
            .map_or_else(|_| fire.fire_at.to_string(), |t| t.to_string());
        let message = format!("the fire at {at} started no run: {}", fire.reason);
        tx.raise_fire_alert(fire.workflow_id, &message, now).await?;
        effects.refused_fires.push(fire.workflow_id.to_owned());
    }
    Ok(true)
}

/// Stores each workflow as a new version where [`decide_install`] says so; returns the version
/// new runs of each use (see `Store::upsert_workflows`).
pub(crate) async fn upsert_workflows(
    tx: &mut dyn Tx,
    install: InstallParams<'_>,
    now: Millis,
) -> Result<Vec<i64>> {
    let InstallParams {
        workflows,
        origin,
        create_only,
        actor,
    } = install;
    // In id order, so two installs of overlapping sets never deadlock.
    let ids: BTreeSet<&str> = workflows.iter().map(|(id, _)| id.as_str()).collect();
    for id in ids {
        tx.lock_key(&format!("workflow/{id}")).await?;
    }
    let mut versions = Vec::with_capacity(workflows.len());
    for (id, definition) in workflows {
        let stored = tx.stored_definition(id, definition).await?;
        versions.push(match decide_install(stored, origin, create_only, id)? {
            Install::Keep(version) => version,
            Install::Add(version) => {
                let new = NewVersion {
                    workflow_id: id,
                    version,
                    definition,
                    origin,
                };
                tx.add_version(new, now).await?;
                if let Some(actor) = actor {
                    tx.record_audit(&install_audit(actor, id, version), now)
                        .await?;
                }
                version
            }
        });
    }
    Ok(versions)
}

/// Removes a workflow (see `Store::remove_workflow`).
pub(crate) async fn remove_workflow(tx: &mut dyn Tx, id: &str, force: bool) -> Result<()> {
    // A fire starting a run of it meanwhile waits for this, then finds it gone.
    tx.lock_key(&format!("workflow/{id}")).await?;
    if !tx.delete_workflow(id).await? {
        return Err(StoreError::NotFound(format!("workflow {id}")));
    }
    let active = tx.active_runs_of(id).await?;
    if active > 0 && !force {
        // Refused, the transaction ends without its delete.
        return Err(StoreError::Conflict(format!(
            "workflow {id} has {active} runs that have not ended; cancel them, or remove it \
             anyway (--force), and they finish with the version they started with"
        )));
    }
    Ok(())
}

/// Hands an outside result to the step waiting for it (see `Store::deliver_callback`).
pub(crate) async fn deliver_callback(
    tx: &mut dyn Tx,
    answer: &CallbackAnswer,
    now: Millis,
    effects: &mut Effects,
) -> Result<bool> {
    let given = tx.give_callback(answer, now).await?;
    if given == Some(true) {
        effects.woke();
    }
    Ok(given.is_some())
}

/// Hands a signal to its step (see `Store::deliver_signal`).
pub(crate) async fn deliver_signal(
    tx: &mut dyn Tx,
    signal: &Signal,
    now: Millis,
    effects: &mut Effects,
) -> Result<SignalOutcome> {
    if let Some(woke) = tx.give_signal(signal, now).await? {
        if woke {
            effects.woke();
        }
        return Ok(SignalOutcome::Delivered);
    }
    let state = tx
        .step_answer_state(&signal.run_id, &signal.step_id)
        .await?;
    Ok(match state {
        None => SignalOutcome::NotWaiting(format!(
            "run {} has no step {}",
            signal.run_id, signal.step_id
        )),
        Some((state, _)) if state.is_finished() => {
            SignalOutcome::NotWaiting(format!("step {} is {state}", signal.step_id))
        }
        Some((_, true)) => SignalOutcome::AlreadySignalled,
        Some(_) => SignalOutcome::NotWaiting(format!(
            "step {} timed out waiting for signal {}",
            signal.step_id, signal.name
        )),
    })
}

/// Logs webhook deliveries and does what each asks (see `Store::receive_webhooks`), with one
/// statement for all where it can: many deliveries share a transaction.
pub(crate) async fn receive_webhooks(
    tx: &mut dyn Tx,
    deliveries: Vec<(NewWebhookEvent, WebhookAction)>,
    now: Millis,
    effects: &mut Effects,
) -> Result<Vec<WebhookOutcome>> {
    // Each action is taken (moved) once, by its event's first delivery.
    let (events_all, mut actions): (Vec<NewWebhookEvent>, Vec<Option<WebhookAction>>) =
        deliveries.into_iter().map(|(e, a)| (e, Some(a))).unzip();
    // A delivery whose event came earlier in the same batch is a repeat of that one.
    let mut first_of: BTreeMap<(&str, &str, &str), usize> = BTreeMap::new();
    let mut repeat_of: BTreeMap<usize, usize> = BTreeMap::new();
    for (i, event) in events_all.iter().enumerate() {
        let key = (
            event.source.as_str(),
            event.scope.as_str(),
            event.event_id.as_str(),
        );
        match first_of.get(&key) {
            Some(&first) => {
                repeat_of.insert(i, first);
            }
            None => {
                first_of.insert(key, i);
            }
        }
    }
    let firsts: Vec<usize> = (0..events_all.len())
        .filter(|i| !repeat_of.contains_key(i))
        .collect();
    let events: Vec<&NewWebhookEvent> = firsts.iter().map(|&i| &events_all[i]).collect();
    let logged = tx.log_webhook_events(&events, now).await?;

    let mut outcomes: Vec<Option<WebhookOutcome>> = vec![None; events_all.len()];
    let mut starts: Vec<(usize, i64)> = Vec::new();
    let mut runs: Vec<NewRun> = Vec::new();
    let mut settled: Vec<(usize, i64)> = Vec::new();
    for (&i, (row, fresh)) in firsts.iter().zip(logged) {
        let event = &events_all[i];
        if !fresh {
            if row.payload != event.payload && !event.id_names_event {
                outcomes[i] = Some(WebhookOutcome::OtherBody);
                continue;
            }
            if let Some(run_id) = row.run_id {
                outcomes[i] = Some(WebhookOutcome::Done {
                    run_id,
                    repeated: true,
                });
                continue;
            }
        }
        // A first delivery, or a repeat of one that was refused (its cause may be fixed now:
        // only an accepted delivery is final).
        match actions[i].take().expect("each action is taken once") {
            WebhookAction::Refuse(reason) => {
                outcomes[i] = Some(WebhookOutcome::Refused(reason));
                settled.push((i, row.id));
            }
            WebhookAction::Answer(answer) => {
                outcomes[i] = Some(if deliver_callback(tx, &answer, now, effects).await? {
                    WebhookOutcome::Done {
                        run_id: answer.run_id,
                        repeated: false,
                    }
                } else {
                    WebhookOutcome::Refused(format!(
                        "no step {} of run {} waits under this callback token: it timed out, \
                         was cancelled, or has its result",
                        answer.step_id, answer.run_id
                    ))
                });
                settled.push((i, row.id));
            }
            WebhookAction::Start(run) => {
                starts.push((i, row.id));
                runs.push(*run);
            }
        }
    }
    if !runs.is_empty() {
        let ids = insert_runs(tx, runs, now).await?;
        effects.woke();
        for ((i, row), run_id) in starts.into_iter().zip(ids) {
            outcomes[i] = Some(WebhookOutcome::Done {
                run_id,
                repeated: false,
            });
            settled.push((i, row));
        }
    }
    let rows: Vec<Value> = settled
        .iter()
        .map(|&(i, id)| {
            let disposition = match outcomes[i].as_ref().expect("decided above") {
                WebhookOutcome::Done { run_id, .. } => Disposition::Run(run_id),
                WebhookOutcome::Refused(reason) => Disposition::Declined(reason),
                WebhookOutcome::OtherBody => unreachable!("never settled"),
            };
            json!({ "id": id, "run_id": disposition.run_id(), "error": disposition.reason() })
        })
        .collect();
    if !rows.is_empty() {
        tx.settle_webhook_events(Value::Array(rows)).await?;
    }
    for (i, first) in repeat_of {
        let same_body =
            events_all[i].id_names_event || events_all[i].payload == events_all[first].payload;
        outcomes[i] = Some(match outcomes[first].clone().expect("decided above") {
            _ if !same_body => WebhookOutcome::OtherBody,
            WebhookOutcome::Done { run_id, .. } => WebhookOutcome::Done {
                run_id,
                repeated: true,
            },
            other => other,
        });
    }
    Ok(outcomes
        .into_iter()
        .map(|o| o.expect("every delivery has its outcome"))
        .collect())
}

/// The ids of claimed jobs, for [`Effects::wakes_others`].
pub(crate) fn claimed_ids(claimed: &[ClaimedJob]) -> Vec<JobId> {
    claimed.iter().map(|c| c.lease.job_id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Settlement;

    fn finished(id: &str, status: RunStatus, parent: Option<JobId>) -> FinishedRun {
        FinishedRun {
            id: id.into(),
            workflow_id: "w".into(),
            status,
            parent_job_id: parent,
            concurrency_key: None,
            notify: None,
        }
    }

    #[test]
    fn a_parent_step_fails_with_its_first_unsuccessful_child_and_waits_otherwise() {
        let runs = [
            finished("a", RunStatus::Succeeded, Some(1)),
            finished("b", RunStatus::Failed, Some(1)),
            finished("c", RunStatus::Cancelled, Some(1)),
            finished("d", RunStatus::Succeeded, Some(2)),
            finished("e", RunStatus::Failed, None),
        ];
        let outcomes = parent_outcomes(&runs);
        assert_eq!(outcomes.len(), 2);
        assert_eq!(outcomes[&1].map(|r| r.id.as_str()), Some("b"));
        assert!(outcomes[&2].is_none());
    }

    #[test]
    fn a_notification_is_retried_at_doubling_waits_up_to_an_hour_then_given_up() {
        let mut attempts = 0;
        let mut waits = Vec::new();
        loop {
            let update = notification_update(attempts, Err("503".into()), 0);
            attempts = update.attempts;
            if update.status == NotificationStatus::Failed {
                break;
            }
            assert_eq!(update.status, NotificationStatus::Pending);
            waits.push(update.next_at / 1_000);
        }
        assert_eq!(attempts, NOTIFICATION_ATTEMPTS);
        assert_eq!(&waits[..4], [1, 2, 4, 8]);
        assert_eq!(*waits.last().unwrap(), 3_600);
        let delivered = notification_update(3, Ok(()), 7);
        assert_eq!(
            (delivered.status, delivered.delivered_at),
            (NotificationStatus::Delivered, Some(7))
        );
    }

    #[test]
    fn every_settlement_names_a_state_a_running_job_may_become() {
        let settlements = [
            Settlement::Succeed { output: json!(1) },
            Settlement::Retry {
                at: 0,
                error: "e".into(),
            },
            Settlement::Fail { error: "e".into() },
            Settlement::Tolerate { error: "e".into() },
            Settlement::Park {
                until: None,
                checkpoint: json!({}),
            },
            Settlement::Release,
        ];
        for target in settlements.iter().map(Settlement::target) {
            assert!(JobState::Running.can_become(target), "{target}");
        }
    }

    #[test]
    fn effects_wake_others_only_for_jobs_the_own_claim_did_not_take() {
        let mut effects = Effects {
            ready: vec![1, 2],
            ..Effects::default()
        };
        assert!(!effects.wakes_others(&[1, 2, 3]));
        assert!(effects.wakes_others(&[1]));
        effects.ready.clear();
        assert!(!effects.wakes_others(&[]));
        effects.woke();
        assert!(effects.wakes_others(&[1]));
    }
}
