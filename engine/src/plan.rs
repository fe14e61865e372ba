//! Turns a workflow definition and an input into the run the store creates.

use serde_json::Value;

use crate::definition::{PRIORITIES, TemplateContext, Violation, Workflow, render_str};
use crate::store::{ConcurrencyGate, NewJob, NewRun, ParentLink, RunId, check_storable};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// Only a version stored before workflows without steps ran in n8n has none: loading a
    /// definition gives one such a step.
    #[error("workflow {0} has no steps in this version: install its definition again")]
    NoSteps(String),
    #[error("input of workflow {workflow} must be a JSON object, got {got}")]
    InputNotObject { workflow: String, got: &'static str },
    #[error("concurrency key of workflow {workflow}: {message}")]
    ConcurrencyKey { workflow: String, message: String },
    #[error(
        "input of workflow {workflow} does not satisfy its input_schema: {}",
        violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    InputSchema {
        workflow: String,
        violations: Vec<Violation>,
    },
    /// A stored definition whose schema no longer compiles (it did when it was stored).
    #[error("input_schema of workflow {workflow}: {problem}")]
    BadInputSchema { workflow: String, problem: String },
    #[error("priority {0} is out of range: -100 to 100")]
    Priority(i32),
    #[error("input of workflow {workflow}: {problem}")]
    Unstorable {
        workflow: String,
        problem: crate::store::Unstorable,
    },
}

/// How a run came to be.
#[derive(Debug, Clone, Default)]
pub struct Trigger {
    pub parent: Option<ParentLink>,
    pub scheduled_at: Option<i64>,
    pub idempotency_key: Option<String>,
    /// Instead of the workflow's own priority.
    pub priority: Option<i32>,
}

pub fn new_run_id() -> RunId {
    uuid::Uuid::now_v7().to_string()
}

/// What a JSON value is, for an error that says what was given instead.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The run of `workflow` (at `version`) for `input`, merged over the workflow's input defaults.
pub fn plan_run(
    workflow: &Workflow,
    version: i64,
    input: Value,
    trigger: Trigger,
) -> Result<NewRun, PlanError> {
    if workflow.steps.is_empty() {
        return Err(PlanError::NoSteps(workflow.id.clone()));
    }
    let priority = trigger.priority.unwrap_or(workflow.priority);
    if !PRIORITIES.contains(&priority) {
        return Err(PlanError::Priority(priority));
    }
    let request_digest = trigger
        .idempotency_key
        .as_ref()
        .map(|_| crate::store::request_digest(&input, trigger.priority));
    let mut merged = workflow.inputs.clone();
    match input {
        Value::Null => {}
        Value::Object(given) => merged.extend(given),
        other => {
            return Err(PlanError::InputNotObject {
                workflow: workflow.id.clone(),
                got: kind_of(&other),
            });
        }
    }
    let input = Value::Object(merged);
    check_storable(&input).map_err(|problem| PlanError::Unstorable {
        workflow: workflow.id.clone(),
        problem,
    })?;
    if let Some(schema) = &workflow.input_schema {
        let schema = workflow
            .compiled_input_schema
            .get(schema)
            .map_err(|problem| PlanError::BadInputSchema {
                workflow: workflow.id.clone(),
                problem,
            })?;
        let violations = schema.violations(&input);
        if !violations.is_empty() {
            return Err(PlanError::InputSchema {
                workflow: workflow.id.clone(),
                violations,
            });
        }
    }
    let concurrency = match &workflow.concurrency {
        None => None,
        Some(c) => {
            let key = match &c.key {
                None => workflow.id.clone(),
                Some(template) => {
                    let ctx = TemplateContext {
                        input: input.clone(),
                        ..TemplateContext::default()
                    };
                    let rendered =
                        render_str(template, &ctx).map_err(|e| PlanError::ConcurrencyKey {
                            workflow: workflow.id.clone(),
                            message: e.to_string(),
                        })?;
                    format!("{}:{rendered}", workflow.id)
                }
            };
            Some(ConcurrencyGate {
                key,
                limit: i64::from(c.limit),
            })
        }
    };
    let flow = workflow.has_control_flow();
    let job = |step: &crate::definition::Step, on_failure: bool| NewJob {
        step_id: step.id.clone(),
        needs: step.needs.clone(),
        // A failure handler's output is no part of the run's.
        is_sink: !on_failure && !workflow.steps.iter().any(|o| o.needs.contains(&step.id)),
        max_attempts: workflow.retry_policy(step).max_retries.saturating_add(1),
        continue_on_error: step.continue_on_error,
        run_if: step.run_if,
        flow,
        on_failure,
    };
    let jobs = workflow
        .steps
        .iter()
        .map(|step| job(step, false))
        .chain(workflow.on_failure.iter().map(|step| job(step, true)))
        .collect();
    Ok(NewRun {
        id: new_run_id(),
        workflow_id: workflow.id.clone(),
        version,
        input,
        parent: trigger.parent,
        concurrency,
        timeout_ms: workflow.timeout.map(|t| t.0.as_millis() as i64),
        retention_ms: workflow.retention().as_millis() as i64,
        scheduled_at: trigger.scheduled_at,
        idempotency_key: trigger.idempotency_key,
        request_digest,
        priority,
        notify: workflow.notifications.as_ref().and_then(|n| {
            let url = n.webhook_url.as_ref().filter(|u| !u.starts_with('/'))?;
            (n.on_success || n.on_failure).then(|| crate::store::NotifyTarget {
                url: url.clone(),
                on_success: n.on_success,
                on_failure: n.on_failure,
            })
        }),
        jobs,
    })
}
