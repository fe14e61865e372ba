//! `noop`: succeeds at once with no output. For fan-in points, tests and benchmarks.

use async_trait::async_trait;
use serde_json::Value;

use super::{StepCall, StepKind, StepOutcome, StepResult};

pub struct Noop;

#[async_trait]
impl StepKind for Noop {
    fn name(&self) -> &'static str {
        "noop"
    }

    async fn run(&self, _call: StepCall) -> StepResult {
        Ok(StepOutcome::Output(Value::Null))
    }
}
