//! `transform`: its output is its rendered `with.output`. Templates did the work already.

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use super::{StepCall, StepKind, StepOutcome, StepResult, parse_with, with_schema};

pub struct Transform;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct TransformWith {
    /// The step's output: any value, with templates anywhere in it.
    #[schemars(with = "serde_json::Value")]
    output: Value,
}

#[async_trait]
impl StepKind for Transform {
    fn name(&self) -> &'static str {
        "transform"
    }

    fn with_schema(&self) -> Value {
        with_schema::<TransformWith>()
    }

    async fn run(&self, call: StepCall) -> StepResult {
        let TransformWith { output } = parse_with("transform", &call.with)?;
        Ok(StepOutcome::Output(output))
    }
}
