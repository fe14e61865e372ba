//! `workflow`: starts child runs and waits for all of them; its output is the list of their
//! outputs, in order. `with: { workflows: [a, b] }` starts each once; `with: { workflow: a,
//! for_each: [...] }` starts `a` once per item, with `{item, index}` in its input. `with.input`
//! is merged into every child's input.

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use switchyard_engine::state::StepFailure;

use super::{ChildRun, StepCall, StepKind, StepOutcome, StepResult, parse_with, with_schema};

pub struct StartWorkflows;

/// Either `workflows` (each started once) or `workflow` (once, or once per item of
/// `for_each`); the definition check says which combinations it takes.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WorkflowWith {
    /// Workflow ids, each started once.
    workflows: Option<Vec<String>>,
    /// A workflow id, started once or once per item of `for_each`.
    workflow: Option<String>,
    /// A list: one child run of `workflow` per item, with `{item, index}` in its input.
    #[schemars(with = "Option<Vec<serde_json::Value>>")]
    for_each: Option<Value>,
    /// Merged into every child's input.
    input: Option<Map<String, Value>>,
}

fn invalid(message: impl Into<String>) -> StepFailure {
    StepFailure::permanent("invalid_parameters", message)
}

#[async_trait]
impl StepKind for StartWorkflows {
    fn name(&self) -> &'static str {
        "workflow"
    }

    fn with_schema(&self) -> Value {
        with_schema::<WorkflowWith>()
    }

    async fn run(&self, call: StepCall) -> StepResult {
        let with: WorkflowWith = parse_with("workflow", &call.with)?;
        let shared = with.input.unwrap_or_default();
        let children = if let Some(ids) = with.workflows {
            ids.into_iter()
                .map(|workflow| ChildRun {
                    workflow,
                    input: Value::Object(shared.clone()),
                })
                .collect()
        } else {
            let workflow = with.workflow.ok_or_else(|| {
                invalid("workflow step needs `with.workflows` (a list) or `with.workflow`")
            })?;
            match with.for_each {
                None | Some(Value::Null) => vec![ChildRun {
                    workflow,
                    input: Value::Object(shared),
                }],
                Some(Value::Array(items)) => items
                    .into_iter()
                    .enumerate()
                    .map(|(index, item)| {
                        let mut input = shared.clone();
                        input.insert("item".into(), item);
                        input.insert("index".into(), json!(index));
                        ChildRun {
                            workflow: workflow.clone(),
                            input: Value::Object(input),
                        }
                    })
                    .collect(),
                Some(_) => {
                    return Err(invalid(
                        "workflow step: `with.for_each` must render to a list",
                    ));
                }
            }
        };
        Ok(StepOutcome::StartChildren(children))
    }
}
