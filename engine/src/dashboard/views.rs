//! What the templates show, in the dashboard's own types, converted from the engine's: the
//! templates never see a store row, and no secret value is among these fields.

use serde::Serialize;
use serde_json::Value;

use crate::service::WorkflowOverview;
use crate::state::Millis;
use crate::store::{Alert, FireRecord, JobDetail, Notification, RunSummary, Usage, WebhookEvent};

#[derive(Debug, Clone, Serialize)]
pub(super) struct RunRow {
    pub id: String,
    pub workflow_id: String,
    pub version: i64,
    pub status: &'static str,
    pub finished: bool,
    pub parent_run_id: Option<String>,
    pub error: Option<String>,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    /// From start to end, or to now while it runs.
    pub took: Option<Millis>,
}

impl RunRow {
    pub fn new(run: RunSummary, now: Millis) -> Self {
        RunRow {
            took: run
                .started_at
                .map(|start| run.finished_at.unwrap_or(now) - start),
            finished: run.status.is_finished(),
            status: run.status.as_str(),
            id: run.id,
            workflow_id: run.workflow_id,
            version: run.version,
            parent_run_id: run.parent_run_id,
            error: run.error,
            created_at: run.created_at,
            started_at: run.started_at,
            finished_at: run.finished_at,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct WorkflowRow {
    pub id: String,
    pub name: Option<String>,
    pub description: Option<String>,
    pub category: Option<String>,
    pub version: i64,
    pub origin: &'static str,
    pub cron: Option<String>,
    pub timezone: Option<String>,
    pub paused: bool,
    pub next_fires: Vec<Millis>,
    pub last_fire_at: Option<Millis>,
    pub steps: usize,
}

impl From<&WorkflowOverview> for WorkflowRow {
    fn from(o: &WorkflowOverview) -> Self {
        let w = &o.workflow;
        WorkflowRow {
            id: o.state.id.clone(),
            name: w.name.clone(),
            description: w.description.clone(),
            category: w.category.clone(),
            version: o.state.latest_version,
            origin: match o.state.origin {
                crate::store::DefinitionOrigin::Files => "files",
                crate::store::DefinitionOrigin::Api => "api",
            },
            cron: w.schedule.as_ref().map(|s| s.cron.clone()),
            timezone: w.schedule.as_ref().map(|s| s.timezone.clone()),
            paused: o.state.paused,
            next_fires: o.next_fires.clone(),
            last_fire_at: o.state.last_fire_at,
            steps: w.steps.len(),
        }
    }
}

/// One attempt of a step, finished or running.
#[derive(Debug, Clone, Serialize)]
pub(super) struct AttemptView {
    pub step_id: String,
    pub attempt: u64,
    pub outcome: String,
    pub error: Option<String>,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub took: Option<Millis>,
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct StepView {
    pub step_id: String,
    pub state: &'static str,
    pub attempt: u32,
    pub output: Option<Value>,
    pub error: Option<String>,
    pub item_index: Option<i64>,
    pub run_after: Option<Millis>,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub took: Option<Millis>,
    pub attempts: Vec<AttemptView>,
    /// The items of a `for_each` step, in order.
    pub items: Vec<StepView>,
    /// Of a `for_each` step: how many items it has, listed or not.
    pub items_total: usize,
}

impl StepView {
    pub fn new(job: JobDetail, now: Millis) -> Self {
        let mut attempts: Vec<AttemptView> = job
            .attempts
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| {
                let at = |k: &str| a.get(k).and_then(Value::as_i64);
                AttemptView {
                    step_id: job.step_id.clone(),
                    attempt: a.get("attempt").and_then(Value::as_u64).unwrap_or(0),
                    outcome: a
                        .get("outcome")
                        .and_then(Value::as_str)
                        .unwrap_or("failed")
                        .to_owned(),
                    error: a.get("error").and_then(Value::as_str).map(str::to_owned),
                    started_at: at("started_at"),
                    finished_at: at("finished_at"),
                    took: at("started_at").map(|s| at("finished_at").unwrap_or(s) - s),
                }
            })
            .collect();
        let state = job.state.as_str();
        // The latest attempt is the job's own times, unless the list above already holds it.
        if job.started_at.is_some() && !attempts.iter().any(|a| a.attempt == job.attempt as u64) {
            attempts.push(AttemptView {
                step_id: job.step_id.clone(),
                attempt: job.attempt as u64,
                outcome: state.to_owned(),
                error: job.error.clone(),
                started_at: job.started_at,
                finished_at: job.finished_at,
                took: job.started_at.map(|s| job.finished_at.unwrap_or(now) - s),
            });
        }
        StepView {
            took: job.started_at.map(|s| job.finished_at.unwrap_or(now) - s),
            step_id: job.step_id,
            state,
            attempt: job.attempt,
            output: job.output,
            error: job.error,
            item_index: job.item_index,
            run_after: job.run_after,
            started_at: job.started_at,
            finished_at: job.finished_at,
            attempts,
            items: Vec::new(),
            items_total: 0,
        }
    }

    /// Keeps at most `shown` items of a `for_each` step: those that did not succeed first (what
    /// someone opens the page for), then the first by index.
    pub fn keep_items(&mut self, shown: usize) {
        self.items_total = self.items.len();
        if self.items.len() <= shown {
            return;
        }
        let items = std::mem::take(&mut self.items);
        let (mut kept, succeeded): (Vec<_>, Vec<_>) =
            items.into_iter().partition(|i| i.state != "succeeded");
        kept.truncate(shown);
        let room = shown - kept.len();
        kept.extend(succeeded.into_iter().take(room));
        kept.sort_by_key(|i| i.item_index);
        self.items = kept;
    }
}

/// A run's jobs as steps, each `for_each` step with its items under it.
pub(super) fn steps(jobs: Vec<JobDetail>, now: Millis) -> Vec<StepView> {
    let mut steps: Vec<StepView> = Vec::new();
    let mut items: Vec<StepView> = Vec::new();
    for job in jobs {
        let view = StepView::new(job, now);
        if view.item_index.is_some() {
            items.push(view);
        } else {
            steps.push(view);
        }
    }
    for item in items {
        let parent = item
            .step_id
            .split('[')
            .next()
            .unwrap_or_default()
            .to_owned();
        match steps.iter_mut().find(|s| s.step_id == parent) {
            Some(step) => step.items.push(item),
            None => steps.push(item),
        }
    }
    for step in &mut steps {
        step.items.sort_by_key(|i| i.item_index);
    }
    steps
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct FireRow {
    pub workflow_id: String,
    pub fire_at: Millis,
    pub run_id: Option<String>,
    pub skipped_reason: Option<String>,
    pub recorded_at: Millis,
    pub late: Millis,
}

impl From<FireRecord> for FireRow {
    fn from(f: FireRecord) -> Self {
        FireRow {
            late: (f.recorded_at - f.fire_at).max(0),
            workflow_id: f.workflow_id,
            fire_at: f.fire_at,
            run_id: f.run_id,
            skipped_reason: f.skipped_reason,
            recorded_at: f.recorded_at,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct AlertRow {
    pub workflow_id: String,
    pub run_id: Option<String>,
    pub kind: String,
    pub message: String,
    pub created_at: Millis,
}

impl From<Alert> for AlertRow {
    fn from(a: Alert) -> Self {
        AlertRow {
            workflow_id: a.workflow_id,
            run_id: a.run_id,
            kind: a.kind,
            message: a.message,
            created_at: a.created_at,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct WebhookRow {
    pub source: String,
    pub scope: String,
    pub event_id: String,
    pub workflow_id: Option<String>,
    pub run_id: Option<String>,
    pub error: Option<String>,
    pub received_at: Millis,
    pub payload: Value,
}

impl From<WebhookEvent> for WebhookRow {
    fn from(e: WebhookEvent) -> Self {
        WebhookRow {
            source: e.source,
            scope: e.scope,
            event_id: e.event_id,
            workflow_id: e.workflow_id,
            run_id: e.run_id,
            error: e.error,
            received_at: e.received_at,
            payload: e.payload,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct NotificationRow {
    pub run_id: String,
    pub workflow_id: String,
    pub url: String,
    pub run_status: &'static str,
    pub status: &'static str,
    pub finished_at: Option<Millis>,
}

impl From<Notification> for NotificationRow {
    fn from(n: Notification) -> Self {
        NotificationRow {
            run_id: n.run_id,
            workflow_id: n.workflow_id,
            url: n.url,
            run_status: n.run_status.as_str(),
            status: n.status.as_str(),
            finished_at: n.finished_at,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct UsageRow {
    pub day: String,
    pub provider: String,
    pub workflow_id: String,
    pub requests: u64,
    pub errors: u64,
    pub tokens: u64,
    pub cost: String,
}

impl From<Usage> for UsageRow {
    fn from(u: Usage) -> Self {
        UsageRow {
            cost: format!("{:.4}", u.cost),
            day: u.day,
            provider: u.provider,
            workflow_id: u.workflow_id,
            requests: u.requests,
            errors: u.errors,
            tokens: u.tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(index: i64, state: &'static str) -> StepView {
        StepView {
            step_id: format!("each[{index}]"),
            state,
            attempt: 1,
            output: None,
            error: None,
            item_index: Some(index),
            run_after: None,
            started_at: None,
            finished_at: None,
            took: None,
            attempts: Vec::new(),
            items: Vec::new(),
            items_total: 0,
        }
    }

    #[test]
    fn a_long_loop_lists_its_failed_items_then_its_first_ones() {
        let mut step = item(0, "failed");
        step.item_index = None;
        step.items = (0..250)
            .map(|i| {
                item(
                    i,
                    if [10, 200, 240].contains(&i) {
                        "failed"
                    } else {
                        "succeeded"
                    },
                )
            })
            .collect();
        step.keep_items(100);
        assert_eq!(step.items_total, 250);
        assert_eq!(step.items.len(), 100);
        let indexes: Vec<i64> = step.items.iter().filter_map(|i| i.item_index).collect();
        assert!(
            indexes.contains(&200) && indexes.contains(&240),
            "{indexes:?}"
        );
        assert!(
            indexes.windows(2).all(|w| w[0] < w[1]),
            "in order: {indexes:?}"
        );
        assert_eq!(indexes[..3], [0, 1, 2]);
    }
}
