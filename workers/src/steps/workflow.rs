//! `workflow`: starts child runs and waits for all of them; its output is the list of their
//! outputs, in order. `with: { workflows: [a, b] }` starts each once; `with: { workflow: a,
//! for_each: [...] }` starts `a` once per item, with `{item, index}` in its input. `with.input`
//! is merged into every child's input.

use async_trait::async_trait;
use serde_json::{Value, json};
use switchyard_engine::state::StepFailure;

use super::{ChildRun, StepCall, StepKind, StepOutcome, StepResult};

pub struct StartWorkflows;

fn invalid(message: impl Into<String>) -> StepFailure {
    StepFailure::permanent("invalid_parameters", message)
}

#[async_trait]
impl StepKind for StartWorkflows {
    fn name(&self) -> &'static str {
        "workflow"
    }

    async fn run(&self, call: StepCall) -> StepResult {
        let with = &call.with;
        let shared = match with.get("input") {
            None | Some(Value::Null) => serde_json::Map::new(),
            Some(Value::Object(map)) => map.clone(),
            Some(_) => return Err(invalid("workflow step: `with.input` must be an object")),
        };
        let children = if let Some(list) = with.get("workflows") {
            let ids = list
                .as_array()
                .ok_or_else(|| invalid("workflow step: `with.workflows` must be a list of ids"))?;
            ids.iter()
                .map(|id| {
                    let workflow = id.as_str().ok_or_else(|| {
                        invalid("workflow step: `with.workflows` must be a list of ids")
                    })?;
                    Ok(ChildRun {
                        workflow: workflow.to_owned(),
                        input: Value::Object(shared.clone()),
                    })
                })
                .collect::<Result<Vec<_>, StepFailure>>()?
        } else {
            let workflow = with
                .get("workflow")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid("workflow step needs `with.workflows` (a list) or `with.workflow`")
                })?;
            match with.get("for_each") {
                None => vec![ChildRun {
                    workflow: workflow.to_owned(),
                    input: Value::Object(shared),
                }],
                Some(Value::Array(items)) => items
                    .iter()
                    .enumerate()
                    .map(|(index, item)| {
                        let mut input = shared.clone();
                        input.insert("item".into(), item.clone());
                        input.insert("index".into(), json!(index));
                        ChildRun {
                            workflow: workflow.to_owned(),
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
