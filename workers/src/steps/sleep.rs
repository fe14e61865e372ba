//! `sleep`: durable. The job parks with its wake-up time and frees its worker slot; the store
//! hands it back when the time comes, after a restart too.

use async_trait::async_trait;
use serde_json::json;
use switchyard_engine::state::StepFailure;

use super::{StepCall, StepKind, StepOutcome, StepResult, str_field};

pub struct Sleep;

#[async_trait]
impl StepKind for Sleep {
    fn name(&self) -> &'static str {
        "sleep"
    }

    async fn run(&self, call: StepCall) -> StepResult {
        let until = match call
            .checkpoint
            .as_ref()
            .and_then(|c| c.get("until"))
            .and_then(|u| u.as_i64())
        {
            Some(until) => until,
            None => {
                let text = str_field(&call.with, "sleep", "duration")?;
                let duration = humantime::parse_duration(text).map_err(|e| {
                    StepFailure::permanent(
                        "invalid_parameters",
                        format!("sleep step: `with.duration` {text:?}: {e}"),
                    )
                })?;
                call.now.saturating_add(duration.as_millis() as i64)
            }
        };
        if call.now >= until {
            Ok(StepOutcome::Output(json!({ "slept_until": until })))
        } else {
            Ok(StepOutcome::Park {
                until: Some(until),
                checkpoint: json!({ "until": until }),
            })
        }
    }
}
