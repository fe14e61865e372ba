//! The store: every durable fact lives behind [`Store`]. One module per database holds all of its
//! SQL; nothing outside `store/` writes SQL. Operations are set-based, so one call handles a batch
//! of jobs in a constant number of statements, and every state change is guarded by the state it
//! expects (and, for jobs, by attempt and lease token).

mod driver;
mod machine;
pub use machine::NONCE_GAP_GRACE;
mod postgres;
mod sql;
mod sqlite;

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use crate::definition::RunIf;
use crate::state::{JobState, Millis, NotificationStatus, RunStatus, Settlement};

pub type RunId = String;
pub type JobId = i64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error(
        "not a database URL: {0} (a SQLite file is sqlite://PATH, relative to the current \
         folder, or sqlite:///ABSOLUTE/PATH; PostgreSQL is postgres://USER@HOST:PORT/DATABASE)"
    )]
    UnsupportedUrl(String),
    /// The first connection failed; the message names the cause (the caller names the URL).
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("migration failed: {0}")]
    Migration(String),
    /// A value the database cannot hold, such as a NUL character in PostgreSQL text.
    #[error("the database cannot store this value: {0}")]
    Rejected(String),
    #[error("database error: {0}")]
    Database(String),
    /// A stored value this process cannot read: encrypted under a master key it was not given,
    /// or altered. The message names the row and what to do.
    #[error("{0}")]
    Unreadable(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => StoreError::NotFound(e.to_string()),
            sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
                StoreError::Unavailable(e.to_string())
            }
            sqlx::Error::Database(db) if db.is_unique_violation() => {
                StoreError::Conflict(db.message().to_owned())
            }
            // PostgreSQL shutting down or restarting (57P01-57P03), a lost connection (08...),
            // a deadlock or serialisation failure (40...): worth trying again.
            sqlx::Error::Database(db)
                if db.code().is_some_and(|c| {
                    c.starts_with("57P") || c.starts_with("08") || c.starts_with("40")
                }) =>
            {
                StoreError::Unavailable(db.message().to_owned())
            }
            // PostgreSQL data exceptions (22...) and integrity violations (23...) other than a
            // taken key: the value, not the database, is at fault.
            sqlx::Error::Database(db)
                if db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .is_some()
                    && db
                        .code()
                        .is_some_and(|c| c.starts_with("22") || c.starts_with("23")) =>
            {
                StoreError::Rejected(db.message().to_owned())
            }
            // SQLite constraints other than a taken key (19: a check, a trigger, NOT NULL).
            sqlx::Error::Database(db)
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
                    && db
                        .code()
                        .and_then(|c| c.parse::<i32>().ok())
                        .is_some_and(|c| c & 0xff == 19) =>
            {
                StoreError::Rejected(db.message().to_owned())
            }
            // SQLite busy or locked past its busy timeout (another writer held the database), out
            // of disk space (13) or failing to read or write its files (10): worth trying again,
            // once the writer is done or space is free.
            sqlx::Error::Database(db)
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some()
                    && db
                        .code()
                        .and_then(|c| c.parse::<i32>().ok())
                        .is_some_and(|c| matches!(c & 0xff, 5 | 6 | 10 | 13)) =>
            {
                StoreError::Unavailable(db.message().to_owned())
            }
            _ => StoreError::Database(e.to_string()),
        }
    }
}

impl StoreError {
    /// Whether the same call may succeed if tried again: the database was away for a moment, or
    /// chose this transaction as the victim of a deadlock or a serialisation conflict.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Calls `op` again while it fails with a transient error, with jittered exponential backoff
/// (50 ms up to 5 s, 8 times), then returns its last result. Only for writes that are safe to
/// repeat: fenced completions, cancels, retries.
pub async fn retry_transient<T, F, Fut>(what: &'static str, op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    use backon::{ExponentialBuilder, Retryable};
    op.retry(
        ExponentialBuilder::default()
            .with_min_delay(std::time::Duration::from_millis(50))
            .with_max_delay(std::time::Duration::from_secs(5))
            .with_max_times(8)
            .with_jitter(),
    )
    .when(StoreError::is_transient)
    .notify(|e, wait| tracing::warn!(error = %e, ?wait, "{what} failed; retrying"))
    .await
}

/// Nesting deeper than this is refused. serde_json reads 127 levels back at most, and the store
/// wraps a value in a few levels of its own (a run's output maps steps to outputs, a `workflow`
/// step lists its children's, a callback sits in a checkpoint): deeper, a value would be stored
/// and then never read again.
pub const MAX_JSON_DEPTH: usize = 120;

/// Why a JSON value cannot be stored, with where in it the problem is (`$.body.name`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct Unstorable {
    pub path: String,
    pub problem: &'static str,
}

/// Checks that both stores can hold `value` and give it back unchanged: PostgreSQL refuses
/// NUL characters (U+0000) in text and `jsonb`, and nothing reads nesting deeper than
/// [`MAX_JSON_DEPTH`] back. Portable on purpose: a definition behaves the same on every store.
pub fn check_storable(value: &Value) -> std::result::Result<(), Unstorable> {
    // An explicit stack: the value may be as deep as whoever made it wanted.
    let mut stack: Vec<(&Value, String, usize)> = vec![(value, "$".to_owned(), 0)];
    while let Some((value, path, depth)) = stack.pop() {
        let fail = |problem| {
            Err(Unstorable {
                path: path.clone(),
                problem,
            })
        };
        match value {
            Value::String(s) if s.contains('\0') => {
                return fail("contains a NUL character (U+0000), which the database cannot store");
            }
            Value::Array(_) | Value::Object(_) if depth >= MAX_JSON_DEPTH => {
                return fail("is nested more than 120 levels deep");
            }
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    stack.push((item, format!("{path}[{i}]"), depth + 1));
                }
            }
            Value::Object(map) => {
                for (key, item) in map {
                    if key.contains('\0') {
                        return fail(
                            "has a key with a NUL character (U+0000), which the database cannot store",
                        );
                    }
                    stack.push((item, format!("{path}.{key}"), depth + 1));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A row of `api_usage`.
pub(crate) fn usage_row(
    (provider, workflow_id, day, requests, errors, tokens, cost): (
        String,
        String,
        String,
        i64,
        i64,
        i64,
        f64,
    ),
) -> Usage {
    Usage {
        provider,
        workflow_id,
        day,
        requests: requests.max(0) as u64,
        errors: errors.max(0) as u64,
        tokens: tokens.max(0) as u64,
        cost,
    }
}

/// An artifact's row (`id, sha256, size, content_type`) as a reference.
pub(crate) fn artifact_ref(
    (id, sha256, size, content_type): (String, String, i64, String),
) -> crate::artifacts::ArtifactRef {
    crate::artifacts::ArtifactRef {
        id,
        sha256,
        size: size.max(0) as u64,
        content_type,
    }
}

/// Text for a text column: NUL characters, which PostgreSQL refuses, become U+FFFD. For
/// diagnostics (errors), where losing that one character beats losing the whole message.
pub fn storable_text(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\u{fffd}").into()
    } else {
        text.into()
    }
}

/// A digest of a start's request: its input as sent (before the workflow's defaults, which a
/// new version may change) and its priority. JSON objects serialize with sorted keys, so the
/// same request always digests the same.
pub fn request_digest(input: &Value, priority: Option<i32>) -> String {
    use sha2::Digest;
    let text = serde_json::to_string(&serde_json::json!([input, priority]))
        .expect("a JSON value serializes");
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// How long fire records, alerts and webhook events are kept: the default retention of runs.
pub(crate) const RECORDS_KEPT_MS: Millis =
    crate::definition::DEFAULT_RETENTION.as_millis() as Millis;
/// How long the audit log is kept.
pub(crate) const AUDIT_KEPT_MS: Millis = 90 * 86_400_000;

/// JSON as text, the form both stores pass batches in.
fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("store payloads serialize")
}

/// A row of `Tx::flow_steps`, as both drivers read it.
fn flow_step(
    job_id: JobId,
    step_id: String,
    state: &str,
    needs: &Value,
    run_if: Option<&str>,
    on_failure: bool,
    error: Option<String>,
) -> Result<crate::flow::FlowStep> {
    Ok(crate::flow::FlowStep {
        job_id,
        step_id,
        state: parse_state(state)?,
        needs: needs
            .as_array()
            .map(|needs| {
                needs
                    .iter()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        run_if: run_if.map_or(Ok(RunIf::default()), parse_state)?,
        on_failure,
        error,
    })
}

fn parse_state<T: std::str::FromStr>(text: &str) -> Result<T> {
    text.parse()
        .map_err(|_| StoreError::Database(format!("unknown state {text:?} in database")))
}

/// Enums stored by name decode from text columns in either database, so a row type derives
/// `FromRow` once for both drivers.
macro_rules! decode_by_name {
    ($($ty:ty),*) => {$(
        impl<DB: sqlx::Database> sqlx::Type<DB> for $ty
        where
            str: sqlx::Type<DB>,
        {
            fn type_info() -> DB::TypeInfo {
                <str as sqlx::Type<DB>>::type_info()
            }
            fn compatible(ty: &DB::TypeInfo) -> bool {
                <str as sqlx::Type<DB>>::compatible(ty)
            }
        }

        impl<'r, DB: sqlx::Database> sqlx::Decode<'r, DB> for $ty
        where
            &'r str: sqlx::Decode<'r, DB>,
        {
            fn decode(
                value: DB::ValueRef<'r>,
            ) -> std::result::Result<Self, sqlx::error::BoxDynError> {
                let name = <&str as sqlx::Decode<DB>>::decode(value)?;
                Ok(parse_state(name)?)
            }
        }
    )*};
}
decode_by_name!(JobState, RunStatus, NotificationStatus, DefinitionOrigin);

/// One JSON row per completion, the batch both stores' fenced update reads. JSON values travel
/// as text, so a `null` output stays a JSON null rather than becoming NULL.
pub(crate) fn completion_rows(completions: &[Completion], now: Millis) -> Value {
    completions
        .iter()
        .map(|c| {
            let (output, error, run_after, checkpoint) = match &c.settlement {
                Settlement::Succeed { output } => (Some(to_json(output)), None, None, None),
                Settlement::Retry { at, error } => {
                    (None, Some(storable_text(error)), Some(*at), None)
                }
                Settlement::Fail { error } => (None, Some(storable_text(error)), None, None),
                Settlement::Tolerate { error } => {
                    let error = storable_text(error);
                    let output = to_json(&Settlement::tolerated_output(&error));
                    (Some(output), Some(error), None, None)
                }
                Settlement::Park { until, checkpoint } => {
                    (None, None, *until, Some(to_json(checkpoint)))
                }
                // Its items are created beside it (`machine::complete`); nothing wakes it.
                Settlement::Loop { checkpoint, .. } => {
                    (None, None, None, Some(to_json(checkpoint)))
                }
                Settlement::Release => (None, None, Some(now), None),
                // The reason is kept where an error would be; the API shows it as the reason.
                Settlement::Skip { reason } => (None, Some(storable_text(reason)), None, None),
            };
            serde_json::json!({
                "id": c.lease.job_id,
                "attempt": c.lease.attempt,
                "token": c.lease.token,
                "state": c.settlement.target().as_str(),
                "output": output,
                "error": error,
                "run_after": run_after,
                "checkpoint": checkpoint,
            })
        })
        .collect()
}

/// A run to create, with its jobs, in one transaction.
#[derive(Debug, Clone, Serialize)]
pub struct NewRun {
    pub id: RunId,
    pub workflow_id: String,
    pub version: i64,
    pub input: Value,
    /// The `workflow` step that started this run, and this run's place in its output list.
    pub parent: Option<ParentLink>,
    /// Runs sharing a key run at most `limit` at once; the rest wait as `pending`.
    pub concurrency: Option<ConcurrencyGate>,
    pub timeout_ms: Option<i64>,
    pub retention_ms: i64,
    pub scheduled_at: Option<Millis>,
    /// A second start with the same key returns the first run.
    pub idempotency_key: Option<String>,
    /// With a key: what the start asked for (see [`request_digest`]); a later start with the
    /// same key must ask for the same.
    pub request_digest: Option<String>,
    /// Its jobs are claimed before those of lower priority (see [`crate::definition::PRIORITIES`]).
    pub priority: i32,
    /// Where its end is announced, if anywhere.
    pub notify: Option<NotifyTarget>,
    pub jobs: Vec<NewJob>,
}

/// A run's notification in the outbox (`GET /api/notifications`).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Notification {
    pub id: i64,
    /// Stable across deliveries: a receiver drops repeats by it.
    pub event_id: String,
    pub run_id: RunId,
    pub workflow_id: String,
    pub url: String,
    /// How the run ended.
    pub run_status: RunStatus,
    pub run_error: Option<String>,
    /// The run's output, when it is at most [`NOTIFIED_OUTPUT_BYTES`].
    pub output: Option<sqlx::types::Json<Value>>,
    /// The run had a larger output, which the notification does not carry.
    pub output_omitted: bool,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub status: NotificationStatus,
    /// Deliveries tried so far.
    pub attempts: i32,
    /// When the next delivery is due, while pending.
    pub next_at: Millis,
    pub last_error: Option<String>,
    pub created_at: Millis,
    pub delivered_at: Option<Millis>,
}

/// The largest run output a notification carries; a larger one is left out (receivers read
/// the run).
pub const NOTIFIED_OUTPUT_BYTES: i64 = 64 * 1024;

/// Notifications a sender holds, each under `token` until `until`.
#[derive(Debug, Clone)]
pub struct HeldNotifications {
    pub token: String,
    pub until: Millis,
    pub notifications: Vec<Notification>,
}

/// Where and when a run's end is announced: its workflow's `notifications` with an absolute
/// `webhook_url`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NotifyTarget {
    pub url: String,
    pub on_success: bool,
    pub on_failure: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParentLink {
    pub run_id: RunId,
    pub job_id: JobId,
    pub index: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConcurrencyGate {
    pub key: String,
    pub limit: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct NewJob {
    pub step_id: String,
    pub needs: Vec<String>,
    /// No other step needs it: its output is part of the run's output.
    pub is_sink: bool,
    /// Attempts allowed per series (`max_retries + 1`).
    pub max_attempts: u32,
    /// A failure for good is tolerated (see [`Settlement::Tolerate`]).
    pub continue_on_error: bool,
    pub run_if: RunIf,
    /// Its run's steps move by `flow::advance` (see `Workflow::has_control_flow`).
    pub flow: bool,
    /// One of the workflow's `on_failure` steps.
    pub on_failure: bool,
}

/// A claimed job: who holds it, and everything a worker needs to run it.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub lease: Lease,
    pub run_id: RunId,
    pub step_id: String,
    pub workflow_id: String,
    pub version: i64,
    pub input: Value,
    pub scheduled_at: Option<Millis>,
    /// The error its run failed with, for a failure handler (`on_failure`) to read.
    pub run_error: Option<String>,
    /// The item this job runs, when it is one of a `for_each` step's.
    pub item: Option<LoopItem>,
    pub checkpoint: Option<Value>,
    /// Outputs of the run's succeeded steps, by step id (null for a skipped step).
    pub outputs: serde_json::Map<String, Value>,
}

/// What every item of a `for_each` step sees (see `Store::loop_context`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoopContext {
    pub input: Value,
    pub outputs: serde_json::Map<String, Value>,
}

/// One item of a `for_each` step, as its job is claimed: with neither its run's input nor any
/// outputs, which every item shares (`Store::loop_context`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoopItem {
    /// The `for_each` step's job.
    pub loop_job: JobId,
    /// The `for_each` step's id (the item's job is `step[index]`).
    pub step_id: String,
    pub index: i64,
    pub value: Value,
}

/// The fence of one attempt: a completion or heartbeat only counts while all three still match.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lease {
    pub job_id: JobId,
    pub attempt: u32,
    pub token: String,
}

#[derive(Debug, Clone)]
pub struct Completion {
    pub lease: Lease,
    pub settlement: Settlement,
    /// Child runs a `workflow` step starts; created in the same transaction as its parking.
    pub children: Vec<NewRun>,
    /// What the attempt printed; kept only when its settlement is accepted.
    pub logs: Vec<LogLine>,
    /// The files the attempt stored; named only when its settlement is accepted.
    pub artifacts: Vec<crate::artifacts::ArtifactRef>,
    /// What the attempt spent at the services it called; recorded however it ends.
    pub usage: Vec<Usage>,
}

/// Calls to a service (a provider: `openai`, or what an `http` step names) and what they
/// cost, for one workflow: a completion's share, or a day's sum (`GET /api/usage`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub provider: String,
    pub workflow_id: String,
    /// `YYYY-MM-DD` (UTC) in a day's sum; empty in a completion's share.
    #[serde(default)]
    pub day: String,
    pub requests: u64,
    pub errors: u64,
    pub tokens: u64,
    /// In US dollars, from `vars.prices`.
    pub cost: f64,
}

/// Which recorded usage to read.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub provider: Option<String>,
    pub workflow_id: Option<String>,
    /// Days from, and up to, inclusive (`YYYY-MM-DD`).
    pub from: Option<String>,
    pub to: Option<String>,
    pub limit: u32,
}

/// A line a step printed or noted during an attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub at: Millis,
    /// `stdout` or `stderr` (a script's), or `info` (what a kind notes: a request and its status).
    pub stream: String,
    pub text: String,
}

/// A stored log line.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct LogEntry {
    /// Increases with every line stored: where the next read goes on from.
    pub id: i64,
    pub step_id: String,
    pub attempt: i32,
    pub at: Millis,
    pub stream: String,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct ClaimParams {
    pub limit: u32,
    pub now: Millis,
    pub lease_until: Millis,
}

/// What became of a schedule fire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FireOutcome {
    Started(RunId),
    Skipped(String),
    /// Another scheduler recorded this fire first.
    AlreadyRecorded,
}

#[derive(Debug, Clone)]
pub struct FireParams {
    pub workflow_id: String,
    pub fire_at: Millis,
    /// Skip (with this reason) when a run of the workflow is still going.
    pub skip_if_active: bool,
    pub run: NewRun,
}

#[derive(Debug, Clone)]
pub struct FireRecord {
    pub workflow_id: String,
    pub fire_at: Millis,
    pub run_id: Option<RunId>,
    pub skipped_reason: Option<String>,
    pub recorded_at: Millis,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkflowState {
    pub id: String,
    pub latest_version: i64,
    /// Where the latest version came from.
    pub origin: DefinitionOrigin,
    pub paused: bool,
    pub created_at: Millis,
    pub last_fire_at: Option<Millis>,
}

/// What the store holds of a workflow about to be installed, read in the install's transaction.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoredDefinition {
    /// The version new runs use; `None` when the workflow does not exist (or was removed).
    pub latest: Option<i64>,
    /// The latest version's definition is the one being installed.
    pub latest_is_same: bool,
    /// The last version installed from files is the one being installed.
    pub last_file_is_same: bool,
    /// The highest version ever stored, 0 for none: a removed workflow installed again goes on
    /// counting, since its runs keep their versions.
    pub highest: i64,
}

/// What an install does with one workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// Nothing: runs keep using this version.
    Keep(i64),
    /// Store the definition as this version, the one new runs use.
    Add(i64),
}

/// The audit entry of a new version installed by `actor`.
pub(crate) fn install_audit(actor: &str, id: &str, version: i64) -> NewAuditEntry {
    NewAuditEntry {
        actor: actor.to_owned(),
        action: "workflow.install".into(),
        target: id.to_owned(),
        detail: serde_json::json!({ "version": version }),
    }
}

/// Decides an install, for both stores. From files, a definition equal to the last one installed
/// from files changes nothing, so a newer version from the API survives a restart; a definition
/// equal to the latest changes nothing either way.
pub fn decide_install(
    stored: StoredDefinition,
    origin: DefinitionOrigin,
    create_only: bool,
    id: &str,
) -> Result<Install> {
    match stored.latest {
        Some(_) if create_only => Err(StoreError::Conflict(format!(
            "workflow {id:?} exists; change it with PUT /api/workflows/{id}"
        ))),
        Some(latest)
            if stored.latest_is_same
                || (origin == DefinitionOrigin::Files && stored.last_file_is_same) =>
        {
            Ok(Install::Keep(latest))
        }
        _ => Ok(Install::Add(stored.highest + 1)),
    }
}

#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub workflow_id: Option<String>,
    pub status: Option<RunStatus>,
    pub created_after: Option<Millis>,
    pub created_before: Option<Millis>,
    /// Only runs after this one in the listing order (newest first): `(created_at, id)` of the
    /// last run of the previous page.
    pub after_cursor: Option<(Millis, RunId)>,
    pub limit: u32,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunSummary {
    pub id: RunId,
    pub workflow_id: String,
    pub version: i64,
    pub status: RunStatus,
    pub parent_run_id: Option<RunId>,
    pub error: Option<String>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
}

#[derive(Debug, Clone)]
pub struct RunDetail {
    pub summary: RunSummary,
    pub input: Value,
    pub output: Option<Value>,
    pub scheduled_at: Option<Millis>,
    pub steps: Vec<JobDetail>,
}

#[derive(Debug, Clone)]
pub struct JobDetail {
    pub id: JobId,
    pub step_id: String,
    pub state: JobState,
    pub attempt: u32,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// Its place among the items of a `for_each` step (`step_id` is `step[index]`).
    pub item_index: Option<i64>,
    pub run_after: Option<Millis>,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    /// One entry per unsuccessful attempt: `{attempt, started_at, finished_at, outcome, error}`;
    /// a succeeding attempt is the job's own `started_at`/`finished_at`.
    pub attempts: Value,
}

/// Runs and jobs a maintenance pass changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    pub reclaimed_jobs: u64,
    pub timed_out_runs: u64,
}

/// What the engine reads from the database: each answer one query or a few, changing nothing.
#[async_trait]
pub trait Reads: Send + Sync + 'static {
    /// One workflow's state, if it exists (was installed and not removed).
    async fn workflow(&self, id: &str) -> Result<Option<WorkflowState>>;
    async fn workflow_version(&self, id: &str, version: i64) -> Result<Value>;
    async fn workflows(&self) -> Result<Vec<WorkflowState>>;
    async fn fires(&self, workflow_id: Option<&str>, limit: u32) -> Result<Vec<FireRecord>>;
    /// Jobs claimable now: the backlog workers have not taken yet.
    async fn queue_depth(&self, now: Millis) -> Result<i64>;
    /// The earliest time a job becomes claimable or a run times out, if any. An expiring lease
    /// is not one: the sweep settles it, and wakes the workers if that made a job claimable.
    async fn next_due(&self) -> Result<Option<Millis>>;

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>>;
    /// Runs in `status`, created at or after `created_after` when given.
    async fn count_runs(&self, status: RunStatus, created_after: Option<Millis>) -> Result<i64>;
    async fn run(&self, run_id: &str) -> Result<RunDetail>;
    /// Up to `limit` log lines of `run_id` after the line `after` (from the first: `None`), in
    /// the order they were stored.
    async fn step_logs(
        &self,
        run_id: &str,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LogEntry>>;
    /// The last `limit` log lines of `run_id`, in the order they were stored.
    async fn last_step_logs(&self, run_id: &str, limit: u32) -> Result<Vec<LogEntry>>;
    /// One run without its steps.
    async fn run_summary(&self, run_id: &str) -> Result<Option<RunSummary>>;
    /// Up to `limit` child runs of `parent`, oldest first.
    async fn child_runs(&self, parent: &str, limit: u32) -> Result<Vec<RunSummary>>;
    /// Up to `limit` run ids that start with `prefix` (lower-case hex and dashes), in id order.
    async fn run_ids_starting(&self, prefix: &str, limit: u32) -> Result<Vec<RunId>>;
    /// What the items of a `for_each` step see besides their item: its run's input and the
    /// outputs the step was given. Read once per loop by a worker, not with every item.
    async fn loop_context(&self, loop_job: JobId) -> Result<LoopContext>;

    /// Alerts of failed and timed-out runs and refused fires, newest first.
    async fn alerts(&self, workflow_id: Option<&str>, limit: u32) -> Result<Vec<Alert>>;
    async fn setting(&self, namespace: &str, name: &str) -> Result<Option<Setting>>;
    /// Every setting of a namespace, by name.
    async fn settings(&self, namespace: &str) -> Result<Vec<Setting>>;
    /// Newest first.
    async fn webhook_events(&self, source: Option<&str>, limit: u32) -> Result<Vec<WebhookEvent>>;
    /// Recorded usage, newest day first.
    async fn usage(&self, filter: &UsageFilter) -> Result<Vec<Usage>>;
    /// The artifact `id` names.
    async fn artifact(&self, id: &str) -> Result<Option<crate::artifacts::ArtifactRef>>;
    /// Which of `hashes` an artifact still names.
    async fn artifact_hashes_named(&self, hashes: &[String]) -> Result<BTreeSet<String>>;
    /// Run notifications, newest first, without their runs' outputs.
    async fn notifications(
        &self,
        status: Option<NotificationStatus>,
        limit: u32,
    ) -> Result<Vec<Notification>>;
    /// How many notifications are pending and how many failed for good.
    async fn notification_counts(&self) -> Result<(i64, i64)>;
    /// A round trip that reads nothing: whether the database answers.
    async fn ping(&self) -> Result<()>;
    /// Newest first; with `before`, only entries older than that entry id.
    async fn audit_log(&self, before: Option<i64>, limit: u32) -> Result<Vec<AuditEntry>>;
    /// The ids of revoked tokens that would still be valid at `now`.
    async fn revoked_tokens(&self, now: Millis) -> Result<Vec<String>>;
}

/// Every durable change, each in one transaction. Implemented once, in `driver.rs`, for every
/// database driver; the reads come with it.
#[async_trait]
pub trait Store: Reads {
    /// Applies pending migrations; safe to call on every start.
    async fn migrate(&self) -> Result<()>;

    /// Signalled after a commit that made jobs claimable in this process.
    fn wakeup(&self) -> Arc<Notify>;

    /// Stores each workflow as a new version where [`decide_install`] says so, all in one
    /// transaction; returns the version new runs of each use.
    async fn upsert_workflows(&self, install: InstallParams<'_>, now: Millis) -> Result<Vec<i64>>;
    /// Removes a workflow: it stops being listed, scheduled and startable; its runs, fires and
    /// versions stay (runs keep the version they started with). While it has runs that have not
    /// ended, a `Conflict`, unless `force`.
    async fn remove_workflow(&self, id: &str, force: bool) -> Result<()>;
    async fn set_paused(&self, id: &str, paused: bool, now: Millis) -> Result<()>;

    /// Creates runs and their first jobs in one transaction. Returns each run's id, which is an
    /// earlier run's id where the idempotency key was seen before.
    async fn create_runs(&self, runs: Vec<NewRun>, now: Millis) -> Result<Vec<RunId>>;

    /// Records a schedule fire, unique on (workflow, fire time), and starts its run or records why
    /// it was skipped, in one transaction.
    async fn fire(&self, fire: FireParams, now: Millis) -> Result<FireOutcome>;
    /// Records a fire that started no run unless that fire is recorded already; returns whether
    /// this call recorded it. A refused fire also raises its alert, in the same transaction.
    async fn skip_fire(&self, fire: SkippedFire<'_>, now: Millis) -> Result<bool>;

    /// Leases up to `limit` claimable jobs, oldest due first.
    async fn claim(&self, params: ClaimParams) -> Result<Vec<ClaimedJob>>;
    /// Extends the leases still held; returns the job ids whose lease was extended. A job missing
    /// from the answer was cancelled or reclaimed: its worker must drop it.
    async fn heartbeat(&self, leases: &[Lease], lease_until: Millis) -> Result<Vec<JobId>>;
    /// Holds up to `limit` pending notifications that are due, for one sender, for `hold_ms`: no
    /// other sender gets them meanwhile.
    async fn hold_notifications(
        &self,
        now: Millis,
        hold_ms: Millis,
        limit: u32,
    ) -> Result<HeldNotifications>;
    /// Records how a delivery of `held` went (an error is tried again later, or fails it for
    /// good); returns whether the sender still held it.
    async fn settle_notification(
        &self,
        held: &Notification,
        token: &str,
        result: std::result::Result<(), String>,
        now: Millis,
    ) -> Result<bool>;
    /// Stores lines an attempt printed so far, while its lease holds (so `logs --follow` shows
    /// a long step as it goes); returns whether it held. The rest go with its completion.
    async fn append_live_logs(&self, lease: &Lease, lines: &[LogLine]) -> Result<bool>;
    /// Takes from the shared rate limit `name`, `limit` per `per`; returns when the taker may go
    /// (now or earlier: at once). A taker that must wait keeps its place.
    async fn take_quota(
        &self,
        name: &str,
        limit: u32,
        per: std::time::Duration,
        now: Millis,
    ) -> Result<Millis>;
    /// Applies settlements whose lease still holds; returns the accepted job ids. Also settles
    /// what follows in the same transaction: dependents become available, runs finish, parents
    /// of finished child runs settle, concurrency gates open. Then, in the same transaction,
    /// claims up to `claim.limit` jobs (none at 0): a worker cycle pays one commit, not two.
    async fn complete_and_claim(
        &self,
        completions: Vec<Completion>,
        claim: ClaimParams,
        now: Millis,
    ) -> Result<(Vec<JobId>, Vec<ClaimedJob>)>;
    /// `complete_and_claim` without the claim.
    async fn complete(&self, completions: Vec<Completion>, now: Millis) -> Result<Vec<JobId>> {
        let nothing = ClaimParams {
            limit: 0,
            now,
            lease_until: now,
        };
        Ok(self.complete_and_claim(completions, nothing, now).await?.0)
    }

    /// Hands an outside result (such as n8n calling back) to the step `step_id` of `run_id` that
    /// waits for it: the step whose checkpoint holds `callback_token: token` and no result yet.
    /// The result joins the checkpoint as `callback`. A parked step wakes now; a step still
    /// running (it has not parked yet), or given back to run again, keeps the result, and wakes
    /// as soon as it parks under the same token. Returns whether a step took the result. A result with the same `event_id` as
    /// the one the step took already counts as taken: a repeated delivery.
    async fn deliver_callback(&self, answer: &CallbackAnswer, now: Millis) -> Result<bool>;
    /// Hands a signal's payload to the step that waits for it, whatever it is doing: a parked
    /// step wakes now; one not yet run, running, or to be retried keeps it (as a callback under
    /// [`crate::callback::signal_token`]) and takes it when it parks or runs. A step takes one
    /// signal; a running step past its timeout takes none.
    async fn deliver_signal(&self, signal: &Signal, now: Millis) -> Result<SignalOutcome>;

    /// Settles expired leases as lost attempts and times out runs past their deadline.
    async fn sweep(&self, now: Millis) -> Result<Swept>;

    async fn cancel_run(&self, run_id: &str, now: Millis) -> Result<RunStatus>;
    /// Puts a finished, unsuccessful run's failed and cancelled steps back in line.
    async fn retry_run(&self, run_id: &str, now: Millis) -> Result<()>;
    /// Deletes finished runs whose retention has passed, at most `limit`; returns how many.
    async fn prune(&self, now: Millis, limit: u32) -> Result<u64>;

    /// Stores a setting, replacing any earlier value.
    async fn put_setting(
        &self,
        namespace: &str,
        name: &str,
        value: &Value,
        now: Millis,
    ) -> Result<()>;
    /// Stores `value` unless the setting exists, and returns the stored value either way: processes
    /// racing to initialise a setting all end up with the same one.
    async fn init_setting(
        &self,
        namespace: &str,
        name: &str,
        value: &Value,
        now: Millis,
    ) -> Result<Value>;
    /// Returns whether the setting existed.
    async fn delete_setting(&self, namespace: &str, name: &str) -> Result<bool>;

    /// Logs inbound webhook deliveries, each once per (source, scope, event id), and does what
    /// each asks, all in one transaction (one commit for many callers): a repeated delivery is
    /// answered with what the first did, and does nothing again. One outcome per delivery, in
    /// order.
    async fn receive_webhooks(
        &self,
        deliveries: Vec<(NewWebhookEvent, WebhookAction)>,
        now: Millis,
    ) -> Result<Vec<WebhookOutcome>>;

    /// [`Store::receive_webhooks`] for one delivery.
    async fn receive_webhook(
        &self,
        event: NewWebhookEvent,
        action: WebhookAction,
        now: Millis,
    ) -> Result<WebhookOutcome> {
        let mut outcomes = self.receive_webhooks(vec![(event, action)], now).await?;
        Ok(outcomes.remove(0))
    }

    /// Commits one small write, to learn whether the database can write at all (a full disk
    /// fails it); see `health.rs`.
    async fn probe_write(&self, now: Millis) -> Result<()>;
    /// Applies `changes` in one transaction, with `audit` recorded in it when any change applied.
    /// Returns, per change, whether it applied: a put always does, a delete when the setting
    /// existed, a swap when the stored value still equals its `old`. So a concurrent write wins
    /// over a re-encryption, and processes racing to make the same swap make it once.
    async fn change_settings(
        &self,
        changes: Vec<SettingChange>,
        audit: Option<NewAuditEntry>,
        now: Millis,
    ) -> Result<Vec<bool>>;
    async fn record_audit(&self, entry: NewAuditEntry, now: Millis) -> Result<()>;
    /// Revokes a token by its id, with `audit` in the same transaction. Returns whether this call
    /// revoked it: revoking it again changes nothing.
    async fn revoke_token(
        &self,
        revocation: TokenRevocation,
        audit: NewAuditEntry,
        now: Millis,
    ) -> Result<bool>;
    /// The nonce a step sends its transaction with: one per owner, the same on every attempt,
    /// and no two owners the same nonce of an account, whichever processes ask at once (see
    /// `machine::allocate_nonce`).
    async fn allocate_nonce(&self, request: &NonceRequest, now: Millis) -> Result<NonceAllocation>;
    /// Whether the job waiting above `gap.nonce` may fill it with a transaction of its own (see
    /// `machine::fill_nonce_gap`); if so, the nonce is now its.
    async fn fill_nonce_gap(&self, gap: &NonceGap, now: Millis) -> Result<GapFill>;
    /// Records the transaction `hash` the job of `gap` fills it with, before it is sent.
    async fn note_nonce_fill(&self, gap: &NonceGap, hash: &str) -> Result<()>;
}

/// One change of [`Store::change_settings`].
#[derive(Debug, Clone, PartialEq)]
pub enum SettingChange {
    Put {
        namespace: String,
        name: String,
        value: Value,
    },
    Delete {
        namespace: String,
        name: String,
    },
    /// Replaces the value only while it is still `old`, keeping `updated_at`: the same value in
    /// another form (encrypted, or under another key).
    Swap {
        namespace: String,
        name: String,
        old: Value,
        new: Value,
    },
}

/// An entry for the audit log: who changed what. Never a secret's value or a password.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAuditEntry {
    /// A user, a token's subject, or `cli:<OS user>` for the command line.
    pub actor: String,
    /// Such as `secret.set` or `token.revoke`.
    pub action: String,
    /// What was changed: a variable's, secret's, user's or workflow's name, a token's id.
    pub target: String,
    pub detail: Value,
}

/// An entry of the audit log.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: i64,
    /// When (ms since the epoch).
    pub at: Millis,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: Value,
}

/// A nonce asked for by a step that sends a transaction from `address` on `chain_id` (see
/// [`Store::allocate_nonce`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonceRequest {
    pub chain_id: u64,
    /// The sender, as `0x` and 40 lowercase hex digits: one spelling per account.
    pub address: String,
    /// Who asks, stable across its attempts: its run, step and item (`run:step[index]`).
    pub owner: String,
    /// The node's pending nonce for `address`: transactions below it were sent already, by
    /// Switchyard or by anyone else holding the key.
    pub floor: u64,
    /// The job the step runs in; none outside one (a kind tried on its own). A nonce whose job
    /// has ended without sending may be filled by another ([`Store::fill_nonce_gap`]).
    pub job_id: Option<JobId>,
    /// The owner's nonce, told [`NonceAllocation::Filled`], whose filler the step has seen
    /// mined: its own transaction can never be, and it is given a new nonce.
    pub filled: Option<u64>,
}

/// A nonce of an account that the node has not seen, though a transaction with a later one
/// waits in its pool: nothing of the account is mined until something takes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonceGap {
    pub chain_id: u64,
    /// As in [`NonceRequest::address`].
    pub address: String,
    /// The node's pending nonce: the first one it has no transaction for.
    pub nonce: u64,
    /// The job that waits above the gap and would fill it.
    pub job_id: JobId,
}

/// What [`Store::fill_nonce_gap`] answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapFill {
    /// The nonce is the asker's: it signs a transaction that does nothing with it (an empty
    /// transfer to itself), so those after it can be mined.
    Fill,
    /// The nonce belongs to a step that may still send its transaction, or to none of ours with
    /// anything after it: the asker keeps waiting.
    Wait,
}

/// What [`Store::allocate_nonce`] gave a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NonceAllocation {
    /// A nonce no other step was given: one above every nonce allocated on the account so far
    /// and at least the node's pending nonce.
    New(u64),
    /// The nonce this owner was given before, still above what the node has seen: an attempt
    /// that crashed before its transaction was stored signs again with it, leaving no gap.
    Again(u64),
    /// The nonce this owner was given before, which the node has seen used since: by this
    /// step's own transaction (whose record was lost, as a retried run clears it) or by another
    /// sender of the key. Signing another transaction could send twice, so the step must not.
    Spent(u64),
    /// As `Spent`, but another step filled the nonce with the transaction `hash`: if that is
    /// the one mined, this owner's own never can be, and it may ask again with
    /// [`NonceRequest::filled`].
    Filled { nonce: u64, hash: String },
}

/// A token revoked before it expires.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRevocation {
    pub jti: String,
    /// When the revocation may be forgotten: the token would have expired by then.
    pub expires_at: Millis,
    pub revoked_by: String,
}

/// An inbound webhook event to log.
#[derive(Debug, Clone, Default)]
pub struct NewWebhookEvent {
    /// Who sent it, such as `n8n`.
    pub source: String,
    /// Where its id is unique within its source: `""` for what starts runs, `run/step` for an
    /// answer to that step.
    pub scope: String,
    /// The sender's id of the delivery.
    pub event_id: String,
    pub workflow_id: Option<String>,
    pub payload: Value,
    /// A repeat of its id is the same event whatever its body (the id is signed); else a
    /// repeat with another body is refused.
    pub id_names_event: bool,
}

/// A signal for the step `step_id` of `run_id`, the `wait` step that waits for `name`.
#[derive(Debug, Clone)]
pub struct Signal {
    pub run_id: RunId,
    pub step_id: String,
    pub name: String,
    pub payload: Value,
}

/// What became of a signal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalOutcome {
    /// The step has it: it wakes if parked, or takes it when it runs.
    Delivered,
    /// The step took a signal already.
    AlreadySignalled,
    /// The step no longer waits: it finished (`state`), or timed out while running.
    NotWaiting(String),
}

/// An outside result for the step `step_id` of `run_id` that waits under `token`.
#[derive(Debug, Clone)]
pub struct CallbackAnswer {
    pub run_id: RunId,
    pub step_id: String,
    pub token: String,
    pub result: Value,
}

/// A schedule fire that starts no run (see [`Store::skip_fire`]).
#[derive(Debug, Clone, Copy)]
pub struct SkippedFire<'a> {
    pub workflow_id: &'a str,
    pub fire_at: Millis,
    pub reason: &'a str,
    /// The fire should have started a run and could not (its input fails the workflow's
    /// `input_schema`): a failure, with an alert, rather than a skip an operator chose (paused,
    /// missed).
    pub refused: bool,
}

/// Workflows to store (see [`Store::upsert_workflows`]).
#[derive(Debug, Clone, Copy)]
pub struct InstallParams<'a> {
    /// `(id, definition)` pairs.
    pub workflows: &'a [(String, Value)],
    pub origin: DefinitionOrigin,
    /// A workflow that exists already is a `Conflict`, and nothing is stored.
    pub create_only: bool,
    /// Who installs them: each new version is then in the audit log (`workflow.install`), in
    /// the same transaction.
    pub actor: Option<&'a str>,
}

/// What an inbound webhook delivery asks for, decided by the engine before the store sees it.
#[derive(Debug, Clone)]
pub enum WebhookAction {
    /// Start this run (planned with the delivery's idempotency key).
    Start(Box<NewRun>),
    /// Hand the result to the step that waits for it (see [`Store::deliver_callback`]).
    Answer(CallbackAnswer),
    /// Nothing can be done (no such workflow, an input the workflow refuses): logged with this
    /// reason.
    Refuse(String),
}

/// What became of a webhook delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// It started this run, or answered a step of it; `repeated` when an earlier delivery of the
    /// same event did.
    Done { run_id: RunId, repeated: bool },
    /// This delivery is refused, with this reason, now logged; a later delivery of the same
    /// event is tried again.
    Refused(String),
    /// An earlier delivery of this event id had another body.
    OtherBody,
}

/// An inbound webhook event as logged, with what it did.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct WebhookEvent {
    pub id: i64,
    pub source: String,
    /// `""` for what starts runs, `run/step` for an answer to that step.
    pub scope: String,
    pub event_id: String,
    pub workflow_id: Option<String>,
    /// The request body.
    pub payload: Value,
    /// The run it started.
    pub run_id: Option<RunId>,
    /// Why it was refused.
    pub error: Option<String>,
    pub received_at: Millis,
}

/// `columns` (`"a, b"`) each prefixed by `table.`: where a join would make them ambiguous.
pub(crate) fn qualified(columns: &str, table: &str) -> String {
    columns
        .split(',')
        .map(|c| format!("{table}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Logged events by (source, scope, event id), each with whether this transaction logged it.
pub(crate) fn keyed_events(
    rows: Vec<WebhookEvent>,
    fresh: bool,
) -> std::collections::HashMap<(String, String, String), (WebhookEvent, bool)> {
    rows.into_iter()
        .map(|row| {
            let key = (row.source.clone(), row.scope.clone(), row.event_id.clone());
            (key, (row, fresh))
        })
        .collect()
}

/// A run that failed or timed out, recorded in the transaction that ended it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Alert {
    pub id: i64,
    pub workflow_id: String,
    /// `None` for a fire that started no run.
    pub run_id: Option<RunId>,
    /// `failed` or `timed_out` (a run's status), or `fire_refused`.
    pub kind: String,
    /// The run's error, or why the fire started none.
    pub message: String,
    pub created_at: Millis,
}

/// Where a definition version came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefinitionOrigin {
    /// Definition files, installed when a control plane starts (or `run` is used).
    Files,
    /// `PUT /api/workflows/{id}` or `POST /api/admin/workflows`.
    Api,
}

impl DefinitionOrigin {
    pub fn as_str(self) -> &'static str {
        match self {
            DefinitionOrigin::Files => "file",
            DefinitionOrigin::Api => "api",
        }
    }
}

impl std::str::FromStr for DefinitionOrigin {
    type Err = std::convert::Infallible;

    /// Only `api` is the API's; anything else came from files.
    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        Ok(if text == "api" {
            DefinitionOrigin::Api
        } else {
            DefinitionOrigin::Files
        })
    }
}

/// One value operators set at runtime, in a namespace (`vars`, `secrets`, `users`, `system`).
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub name: String,
    pub value: Value,
    pub updated_at: Millis,
}

/// How a process connects: what `--db-connections` sets.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The most connections the PostgreSQL pool opens (`LISTEN` takes one more). SQLite always
    /// uses one writer and four readers.
    pub max_connections: u32,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            max_connections: 10,
        }
    }
}

/// The URL with its password masked, for messages and logs.
pub fn redact_url(url: &str) -> String {
    const HIDDEN: &str = "***";
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some(HIDDEN));
            }
            // libpq also takes the password as a parameter (`?password=...`).
            if parsed.query_pairs().any(|(k, _)| k == "password") {
                let pairs: Vec<(String, String)> = parsed
                    .query_pairs()
                    .map(|(k, v)| {
                        let v = if k == "password" {
                            HIDDEN.into()
                        } else {
                            v.into_owned()
                        };
                        (k.into_owned(), v)
                    })
                    .collect();
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        // Shown as typed when it cannot hold a password: a path given for a URL, say. Not a
        // libpq `key=value` string or anything with user information in it.
        Err(_) if !url.contains(['@', '=']) => url.to_owned(),
        Err(_) => {
            "<a database URL that does not parse, not shown: it may hold a password>".to_owned()
        }
    }
}

/// Opens the store a database URL names.
pub async fn connect(url: &str) -> Result<Arc<dyn Store>> {
    connect_with(url, &ConnectOptions::default()).await
}

pub async fn connect_with(url: &str, options: &ConnectOptions) -> Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        if let Some(file) = sqlite_file(url) {
            keep_private(&file)?;
        }
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        Ok(Arc::new(
            PostgresStore::connect(url, options.max_connections).await?,
        ))
    } else {
        Err(StoreError::UnsupportedUrl(redact_url(url)))
    }
}

/// The file of a `sqlite:` URL; `None` for an in-memory database or any other URL.
pub fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    use std::str::FromStr;
    if !url.starts_with("sqlite:") || url.contains(":memory:") || url.contains("mode=memory") {
        return None;
    }
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url).ok()?;
    let file = options.get_filename();
    (!file.as_os_str().is_empty() && file != std::path::Path::new(":memory:"))
        .then(|| file.to_path_buf())
}

/// A SQLite database holds every secret's ciphertext, the password hashes and the run history:
/// its files are created readable by their owner only, and files created before that are made so.
/// SQLite gives the `-wal` and `-shm` files the database file's mode.
fn keep_private(file: &std::path::Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let failed = |e: std::io::Error| StoreError::Database(format!("{}: {e}", file.display()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(file)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(failed(e)),
        }
        for suffix in ["", "-wal", "-shm"] {
            let mut name = file.as_os_str().to_owned();
            name.push(suffix);
            let path = std::path::PathBuf::from(name);
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if meta.permissions().mode() & 0o077 != 0 {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(failed)?;
                tracing::warn!(path = %path.display(), "database file was readable by other users; now 0600");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_database_url_is_shown_without_its_password() {
        for (url, shown) in [
            ("postgres://app:s3cret@db/sy", "postgres://app:***@db/sy"),
            (
                "postgres://app@db/sy?sslmode=require&password=s3cret",
                "postgres://app@db/sy?sslmode=require&password=***",
            ),
            ("/tmp/x.db", "/tmp/x.db"),
            ("sqlite://switchyard.db", "sqlite://switchyard.db"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
        for url in ["host=db user=app password=s3cret", "nope://a:s3cret@[bad"] {
            assert!(!redact_url(url).contains("s3cret"), "{url}");
        }
    }

    #[test]
    fn only_a_sqlite_url_names_a_file() {
        assert_eq!(
            sqlite_file("sqlite://data/s.db"),
            Some(std::path::PathBuf::from("data/s.db"))
        );
        assert_eq!(sqlite_file("postgres://app:s3cret@db/sy"), None);
        assert_eq!(sqlite_file("sqlite::memory:"), None);
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn values_a_store_cannot_hold_are_named_with_their_path() {
        assert!(check_storable(&json!({"a": [1, "two", {"b": null}]})).is_ok());
        let nul = check_storable(&json!({"body": {"items": ["ok", "a\u{0}b"]}})).unwrap_err();
        assert_eq!(nul.path, "$.body.items[1]");
        assert!(nul.to_string().contains("NUL"), "{nul}");
        let key = check_storable(&json!({"x": {"k\u{0}": 1}})).unwrap_err();
        assert_eq!(key.path, "$.x");
        let mut deep = json!(1);
        for _ in 0..=MAX_JSON_DEPTH {
            deep = json!([deep]);
        }
        assert!(
            check_storable(&deep)
                .unwrap_err()
                .problem
                .contains("120 levels")
        );
    }

    #[test]
    fn diagnostic_text_keeps_everything_but_nul() {
        assert_eq!(storable_text("a\u{0}b"), "a\u{fffd}b");
        assert!(matches!(
            storable_text("plain"),
            std::borrow::Cow::Borrowed("plain")
        ));
    }
}
