//! `noop`: succeeds at once with no output. For fan-in points, tests and benchmarks.

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;

use super::{StepCall, StepKind, StepOutcome, StepResult, parse_with, with_schema};

pub struct Noop;

/// `noop` takes nothing.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NoopWith {}

#[async_trait]
impl StepKind for Noop {
    fn name(&self) -> &'static str {
        "noop"
    }

    fn with_schema(&self) -> Value {
        with_schema::<NoopWith>()
    }

    async fn run(&self, call: StepCall) -> StepResult {
        let NoopWith {} = parse_with("noop", &call.with)?;
        Ok(StepOutcome::Output(Value::Null))
    }
}
