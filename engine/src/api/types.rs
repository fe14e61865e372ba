//! The API's own shapes of what the engine and the store hold: runs, steps, fires, alerts,
//! webhook events, audit entries, users and the enums they carry, each converted with `From`. The
//! JSON the API answers with (and the CLI's `--json`) is defined here and next to the handlers,
//! never by a store row, so the store can change its types without changing the wire.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::service::WorkflowOverview;
use crate::state::Millis;
use crate::store;

/// `2026-12-01T03:43:26.123Z`: a time as RFC 3339, in UTC, for readers who do not count
/// milliseconds since the epoch.
fn rfc3339(ms: Millis) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ms.to_string())
}

fn rfc3339_opt(ms: Option<Millis>) -> Option<String> {
    ms.map(rfc3339)
}

fn rfc3339_all(ms: &[Millis]) -> Vec<String> {
    ms.iter().copied().map(rfc3339).collect()
}

/// An enum of the wire with the variants of an engine enum, converted both ways: a variant the
/// engine adds does not compile until the API names it.
macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident = $engine:path { $($variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl From<$engine> for $name {
            fn from(value: $engine) -> Self {
                use $engine as Engine;
                match value { $(Engine::$variant => $name::$variant),+ }
            }
        }

        impl From<$name> for $engine {
            fn from(value: $name) -> Self {
                use $engine as Engine;
                match value { $($name::$variant => Engine::$variant),+ }
            }
        }
    };
}

wire_enum!(
    /// The state of a run.
    RunStatus = crate::state::RunStatus {
        Pending,
        Running,
        Succeeded,
        Failed,
        Cancelled,
        TimedOut,
    }
);

wire_enum!(
    /// The state of a job: one step of one run, across its attempts.
    JobState = crate::state::JobState {
        Waiting,
        Available,
        Running,
        Retrying,
        Parked,
        Succeeded,
        Failed,
        Cancelled,
        Skipped,
    }
);

wire_enum!(
    /// What a caller may do: viewer, operator and admin each can do everything the ones before
    /// it can; webhook only delivers webhooks.
    Role = crate::auth::Role {
        Webhook,
        Viewer,
        Operator,
        Admin,
    }
);

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunSummary {
    pub id: String,
    pub workflow_id: String,
    pub version: i64,
    pub status: RunStatus,
    pub parent_run_id: Option<String>,
    pub error: Option<String>,
    pub created_at: Millis,
    /// `created_at` as RFC 3339, in UTC.
    pub created_at_rfc3339: String,
    pub started_at: Option<Millis>,
    /// `started_at` as RFC 3339, in UTC.
    pub started_at_rfc3339: Option<String>,
    pub finished_at: Option<Millis>,
    /// `finished_at` as RFC 3339, in UTC.
    pub finished_at_rfc3339: Option<String>,
}

impl From<store::RunSummary> for RunSummary {
    fn from(run: store::RunSummary) -> Self {
        RunSummary {
            id: run.id,
            workflow_id: run.workflow_id,
            version: run.version,
            status: run.status.into(),
            parent_run_id: run.parent_run_id,
            error: run.error,
            created_at: run.created_at,
            created_at_rfc3339: rfc3339(run.created_at),
            started_at: run.started_at,
            started_at_rfc3339: rfc3339_opt(run.started_at),
            finished_at: run.finished_at,
            finished_at_rfc3339: rfc3339_opt(run.finished_at),
        }
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunDetail {
    #[serde(flatten)]
    pub summary: RunSummary,
    pub input: Value,
    pub output: Option<Value>,
    pub scheduled_at: Option<Millis>,
    /// `scheduled_at` as RFC 3339, in UTC.
    pub scheduled_at_rfc3339: Option<String>,
    pub steps: Vec<JobDetail>,
}

impl From<store::RunDetail> for RunDetail {
    fn from(run: store::RunDetail) -> Self {
        RunDetail {
            summary: run.summary.into(),
            input: run.input,
            output: run.output,
            scheduled_at: run.scheduled_at,
            scheduled_at_rfc3339: rfc3339_opt(run.scheduled_at),
            steps: run.steps.into_iter().map(JobDetail::from).collect(),
        }
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct JobDetail {
    pub id: i64,
    pub step_id: String,
    pub state: JobState,
    pub attempt: u32,
    pub output: Option<Value>,
    pub error: Option<String>,
    /// Its place among the items of a `for_each` step, whose id its `step_id` starts with
    /// (`each[3]`).
    pub item_index: Option<i64>,
    /// Why a `skipped` step did not run: its `when` was false, its `run_if` could not hold, or
    /// (a failure handler) the run did not fail.
    pub skipped_reason: Option<String>,
    pub run_after: Option<Millis>,
    /// `run_after` as RFC 3339, in UTC.
    pub run_after_rfc3339: Option<String>,
    pub started_at: Option<Millis>,
    /// `started_at` as RFC 3339, in UTC.
    pub started_at_rfc3339: Option<String>,
    pub finished_at: Option<Millis>,
    /// `finished_at` as RFC 3339, in UTC.
    pub finished_at_rfc3339: Option<String>,
    /// One entry per unsuccessful attempt: `{attempt, started_at, finished_at, outcome, error}`;
    /// a succeeding attempt is the job's own `started_at`/`finished_at`.
    #[schema(value_type = Vec<Object>)]
    pub attempts: Value,
}

impl From<store::JobDetail> for JobDetail {
    fn from(job: store::JobDetail) -> Self {
        // The store keeps a skipped step's reason where an error would be.
        let (error, skipped_reason) = match job.state {
            crate::state::JobState::Skipped => (None, job.error),
            _ => (job.error, None),
        };
        JobDetail {
            id: job.id,
            step_id: job.step_id,
            state: job.state.into(),
            attempt: job.attempt,
            output: job.output,
            error,
            item_index: job.item_index,
            skipped_reason,
            run_after: job.run_after,
            run_after_rfc3339: rfc3339_opt(job.run_after),
            started_at: job.started_at,
            started_at_rfc3339: rfc3339_opt(job.started_at),
            finished_at: job.finished_at,
            finished_at_rfc3339: rfc3339_opt(job.finished_at),
            attempts: job.attempts,
        }
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FireRecord {
    pub workflow_id: String,
    pub fire_at: Millis,
    /// `fire_at` as RFC 3339, in UTC.
    pub fire_at_rfc3339: String,
    pub run_id: Option<String>,
    pub skipped_reason: Option<String>,
    pub recorded_at: Millis,
    /// `recorded_at` as RFC 3339, in UTC.
    pub recorded_at_rfc3339: String,
}

impl From<store::FireRecord> for FireRecord {
    fn from(fire: store::FireRecord) -> Self {
        FireRecord {
            workflow_id: fire.workflow_id,
            fire_at: fire.fire_at,
            fire_at_rfc3339: rfc3339(fire.fire_at),
            run_id: fire.run_id,
            skipped_reason: fire.skipped_reason,
            recorded_at: fire.recorded_at,
            recorded_at_rfc3339: rfc3339(fire.recorded_at),
        }
    }
}

/// A run that failed or timed out, recorded in the transaction that ended it, or a scheduled
/// fire whose run could not start.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Alert {
    pub id: i64,
    pub workflow_id: String,
    /// Absent for a refused fire.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// `failed` or `timed_out` (the run's status), or `fire_refused`.
    pub kind: String,
    /// The run's error, or why the fire started no run.
    pub message: String,
    pub created_at: Millis,
    /// `created_at` as RFC 3339, in UTC.
    pub created_at_rfc3339: String,
}

impl From<store::Alert> for Alert {
    fn from(alert: store::Alert) -> Self {
        Alert {
            id: alert.id,
            workflow_id: alert.workflow_id,
            run_id: alert.run_id,
            kind: alert.kind,
            message: alert.message,
            created_at: alert.created_at,
            created_at_rfc3339: rfc3339(alert.created_at),
        }
    }
}

wire_enum!(
    /// Where a run's notification stands: waiting for (another) delivery, delivered, or given
    /// up after its last attempt.
    NotificationStatus = crate::state::NotificationStatus {
        Pending,
        Delivered,
        Failed,
    }
);

/// A run's notification in the outbox, with its deliveries so far.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Notification {
    pub id: i64,
    /// Stable across deliveries: receivers drop repeats by it.
    pub event_id: String,
    pub run_id: String,
    pub workflow_id: String,
    pub url: String,
    /// How the run ended.
    pub run_status: RunStatus,
    pub status: NotificationStatus,
    /// Deliveries tried so far.
    pub attempts: i32,
    /// When the next delivery is due, while pending.
    pub next_at: Millis,
    pub next_at_rfc3339: String,
    /// What the last failed delivery got.
    pub last_error: Option<String>,
    pub created_at: Millis,
    pub created_at_rfc3339: String,
    pub delivered_at: Option<Millis>,
    pub delivered_at_rfc3339: Option<String>,
}

impl From<store::Notification> for Notification {
    fn from(n: store::Notification) -> Self {
        Notification {
            id: n.id,
            event_id: n.event_id,
            run_id: n.run_id,
            workflow_id: n.workflow_id,
            url: n.url,
            run_status: n.run_status.into(),
            status: n.status.into(),
            attempts: n.attempts,
            next_at: n.next_at,
            next_at_rfc3339: rfc3339(n.next_at),
            last_error: n.last_error,
            created_at: n.created_at,
            created_at_rfc3339: rfc3339(n.created_at),
            delivered_at: n.delivered_at,
            delivered_at_rfc3339: rfc3339_opt(n.delivered_at),
        }
    }
}

/// An inbound webhook event as logged, with what it did.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WebhookEvent {
    pub id: i64,
    pub source: String,
    pub event_id: String,
    pub workflow_id: Option<String>,
    /// The request body.
    pub payload: Value,
    /// The run it started.
    pub run_id: Option<String>,
    /// Why it was refused.
    pub error: Option<String>,
    pub received_at: Millis,
    /// `received_at` as RFC 3339, in UTC.
    pub received_at_rfc3339: String,
}

impl From<store::WebhookEvent> for WebhookEvent {
    fn from(event: store::WebhookEvent) -> Self {
        WebhookEvent {
            id: event.id,
            source: event.source,
            event_id: event.event_id,
            workflow_id: event.workflow_id,
            payload: event.payload,
            run_id: event.run_id,
            error: event.error,
            received_at: event.received_at,
            received_at_rfc3339: rfc3339(event.received_at),
        }
    }
}

/// An entry of the audit log.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    pub id: i64,
    /// When (ms since the epoch).
    pub at: Millis,
    /// `at` as RFC 3339, in UTC.
    pub at_rfc3339: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: Value,
}

impl From<store::AuditEntry> for AuditEntry {
    fn from(entry: store::AuditEntry) -> Self {
        AuditEntry {
            id: entry.id,
            at: entry.at,
            at_rfc3339: rfc3339(entry.at),
            actor: entry.actor,
            action: entry.action,
            target: entry.target,
            detail: entry.detail,
        }
    }
}

/// A user as listed: never the password hash.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct User {
    pub name: String,
    pub role: Role,
    pub updated_at: Millis,
    /// `updated_at` as RFC 3339, in UTC.
    pub updated_at_rfc3339: String,
}

impl From<crate::auth::User> for User {
    fn from(user: crate::auth::User) -> Self {
        User {
            name: user.name,
            role: user.role.into(),
            updated_at: user.updated_at,
            updated_at_rfc3339: rfc3339(user.updated_at),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WorkflowInfo {
    pub id: String,
    pub name: Option<String>,
    pub category: Option<String>,
    pub description: Option<String>,
    /// The version new runs start with.
    pub version: i64,
    pub paused: bool,
    pub schedule: Option<ScheduleInfo>,
    pub created_at: Millis,
    /// `created_at` as RFC 3339, in UTC.
    pub created_at_rfc3339: String,
    pub last_fire_at: Option<Millis>,
    /// `last_fire_at` as RFC 3339, in UTC.
    pub last_fire_at_rfc3339: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ScheduleInfo {
    pub cron: String,
    pub timezone: String,
    /// `skip`, `queue` or `allow`.
    #[schema(value_type = String)]
    pub overlap: crate::definition::Overlap,
    /// `none`, `latest` or `all`.
    #[schema(value_type = String)]
    pub catch_up: crate::definition::CatchUp,
    /// The next fire times (ms since the epoch); none while paused.
    pub next_fires: Vec<Millis>,
    /// `next_fires` as RFC 3339, in UTC.
    pub next_fires_rfc3339: Vec<String>,
}

impl From<&WorkflowOverview> for WorkflowInfo {
    fn from(overview: &WorkflowOverview) -> Self {
        let (state, workflow) = (&overview.state, &overview.workflow);
        let schedule = workflow.schedule.as_ref().map(|s| ScheduleInfo {
            cron: s.cron.clone(),
            timezone: s.timezone.clone(),
            overlap: s.overlap,
            catch_up: s.catch_up,
            next_fires: overview.next_fires.clone(),
            next_fires_rfc3339: rfc3339_all(&overview.next_fires),
        });
        WorkflowInfo {
            id: state.id.clone(),
            name: workflow.name.clone(),
            category: workflow.category.clone(),
            description: workflow.description.clone(),
            version: state.latest_version,
            paused: state.paused,
            schedule,
            created_at: state.created_at,
            created_at_rfc3339: rfc3339(state.created_at),
            last_fire_at: state.last_fire_at,
            last_fire_at_rfc3339: rfc3339_opt(state.last_fire_at),
        }
    }
}

/// A line a step printed.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LogLine {
    /// Increases with every line stored.
    pub id: i64,
    pub step_id: String,
    pub attempt: i32,
    /// When it was printed (ms since the epoch).
    pub at: Millis,
    /// `at` as RFC 3339, in UTC.
    pub at_rfc3339: String,
    /// `stdout`, `stderr`, or `info` (what a step kind notes: a request and its status).
    pub stream: String,
    pub text: String,
}

impl From<store::LogEntry> for LogLine {
    fn from(l: store::LogEntry) -> Self {
        LogLine {
            id: l.id,
            step_id: l.step_id,
            attempt: l.attempt,
            at: l.at,
            at_rfc3339: rfc3339(l.at),
            stream: l.stream,
            text: l.text,
        }
    }
}

/// What steps spent at one service, for one workflow, on one UTC day.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Usage {
    /// `openai`, or what an `http` step names as its `provider`.
    pub provider: String,
    pub workflow_id: String,
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub requests: u64,
    /// Calls that failed.
    pub errors: u64,
    pub tokens: u64,
    /// US dollars, at the prices in the variable `prices`.
    pub cost: f64,
}

impl From<store::Usage> for Usage {
    fn from(u: store::Usage) -> Self {
        Usage {
            provider: u.provider,
            workflow_id: u.workflow_id,
            day: u.day,
            requests: u.requests,
            errors: u.errors,
            tokens: u.tokens,
            cost: u.cost,
        }
    }
}
