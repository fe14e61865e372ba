//! `transform`: its output is its rendered `with.output` (or the whole `with` when there is no
//! `output` key). Templates did the work already.

use async_trait::async_trait;

use super::{StepCall, StepKind, StepOutcome, StepResult};

pub struct Transform;

#[async_trait]
impl StepKind for Transform {
    fn name(&self) -> &'static str {
        "transform"
    }

    async fn run(&self, call: StepCall) -> StepResult {
        let output = match call.with {
            serde_json::Value::Object(mut map) if map.contains_key("output") => {
                map.remove("output").unwrap_or_default()
            }
            other => other,
        };
        Ok(StepOutcome::Output(output))
    }
}
