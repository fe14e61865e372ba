//! `sleep`: durable. The job parks with its wake-up time and frees its worker slot; the store
//! hands it back when the time comes, after a restart too.

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_engine::state::StepFailure;

use super::{StepCall, StepKind, StepOutcome, StepResult, parse_with, with_schema};

pub struct Sleep;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SleepWith {
    /// How long, such as `30s`, `5m` or `1h 30m`.
    #[schemars(extend("format" = "duration"))]
    duration: String,
}

#[async_trait]
impl StepKind for Sleep {
    fn name(&self) -> &'static str {
        "sleep"
    }

    fn with_schema(&self) -> Value {
        with_schema::<SleepWith>()
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
                let SleepWith { duration: text } = parse_with("sleep", &call.with)?;
                let duration = humantime::parse_duration(&text).map_err(|e| {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn call(now: i64, checkpoint: Option<serde_json::Value>) -> StepCall {
        StepCall {
            with: json!({ "duration": "10s" }),
            secrets: Default::default(),
            reads_run_data: Vec::new(),
            checkpoint,
            idempotency_key: "r:s".into(),
            job_id: None,
            run_id: "r".into(),
            step_id: "s".into(),
            attempt: 1,
            now,
            log: Default::default(),
            artifacts: Default::default(),
            vars: serde_json::Value::Null,
            usage: Default::default(),
        }
    }

    #[tokio::test]
    async fn first_call_parks_until_the_wake_time() {
        let outcome = Sleep.run(call(1_000, None)).await.unwrap();
        assert_eq!(
            outcome,
            StepOutcome::Park {
                until: Some(11_000),
                checkpoint: json!({ "until": 11_000 })
            }
        );
    }

    #[tokio::test]
    async fn woken_sleep_keeps_its_original_wake_time() {
        let outcome = Sleep
            .run(call(50_000, Some(json!({ "until": 11_000 }))))
            .await
            .unwrap();
        assert_eq!(
            outcome,
            StepOutcome::Output(json!({ "slept_until": 11_000 }))
        );
    }

    #[tokio::test]
    async fn bad_duration_is_a_permanent_failure() {
        let mut c = call(0, None);
        c.with = json!({ "duration": "soon" });
        let err = Sleep.run(c).await.unwrap_err();
        assert!(!err.retryable);
        assert!(err.message.contains("soon"));
    }
}
