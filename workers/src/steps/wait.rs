//! `wait`: parks, its worker slot free, until an operator sends the signal it waits for
//! (`with: { signal: NAME, timeout: 24h }`), whose payload becomes its output. The signal is
//! delivered as a callback under [`signal_token`], so one that arrives before the step has
//! parked (or even run) is kept, and the step takes it when it runs. Past `timeout` (none by
//! default: it waits as long as its run may) the attempt fails retryably, under the step's retry
//! policy, and a retry waits again.

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use switchyard_engine::callback::signal_token;
use switchyard_engine::state::StepFailure;

use super::{StepCall, StepKind, StepOutcome, StepResult, parse_with, with_schema};

pub struct Wait;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WaitWith {
    /// The signal's name (`[a-z0-9_-]+`), as `switchyard signal RUN NAME` sends it.
    signal: String,
    /// How long to wait before the attempt fails, such as `24h`; none: as long as the run may.
    #[schemars(extend("format" = "duration"))]
    timeout: Option<String>,
}

fn invalid(message: String) -> StepFailure {
    StepFailure::permanent("invalid_parameters", message)
}

#[async_trait]
impl StepKind for Wait {
    fn name(&self) -> &'static str {
        "wait"
    }

    fn with_schema(&self) -> Value {
        with_schema::<WaitWith>()
    }

    async fn run(&self, call: StepCall) -> StepResult {
        let WaitWith {
            signal: name,
            timeout,
        } = parse_with("wait", &call.with)?;
        let token = signal_token(&name);
        let checkpoint = call
            .checkpoint
            .as_ref()
            .filter(|c| c["callback_token"].as_str() == Some(token.as_str()));
        if let Some(payload) = checkpoint.and_then(|c| c.get("callback")) {
            return Ok(StepOutcome::Output(payload.clone()));
        }
        // What this attempt parked with; an earlier attempt's deadline is not this one's.
        let parked = checkpoint.filter(|c| c["attempt"].as_u64() == Some(u64::from(call.attempt)));
        let Some(parked) = parked else {
            let wait = match &timeout {
                None => None,
                Some(text) => Some(
                    humantime::parse_duration(text)
                        .map_err(|e| invalid(format!("wait step: `with.timeout` {text:?}: {e}")))?,
                ),
            };
            let deadline = wait.map(|t| call.now.saturating_add(t.as_millis() as i64));
            return Ok(StepOutcome::Park {
                until: deadline,
                checkpoint: json!({
                    "callback_token": token,
                    "attempt": call.attempt,
                    "deadline": deadline,
                    "timeout": timeout,
                }),
            });
        };
        let deadline = parked["deadline"].as_i64();
        if deadline.is_some_and(|deadline| call.now >= deadline) {
            return Err(StepFailure::transient(
                "timeout",
                format!(
                    "no signal {name} came within {}",
                    parked["timeout"].as_str().unwrap_or_default()
                ),
            ));
        }
        Ok(StepOutcome::Park {
            until: deadline,
            checkpoint: parked.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(now: i64, attempt: u32, checkpoint: Option<Value>) -> StepCall {
        StepCall {
            with: json!({ "signal": "approve", "timeout": "10s" }),
            secrets: Default::default(),
            reads_run_data: Vec::new(),
            checkpoint,
            idempotency_key: "r:s".into(),
            job_id: None,
            run_id: "r".into(),
            step_id: "s".into(),
            attempt,
            now,
            log: Default::default(),
            artifacts: Default::default(),
            vars: serde_json::Value::Null,
            usage: Default::default(),
        }
    }

    fn parked(outcome: StepOutcome) -> (Option<i64>, Value) {
        match outcome {
            StepOutcome::Park { until, checkpoint } => (until, checkpoint),
            other => panic!("not parked: {other:?}"),
        }
    }

    #[tokio::test]
    async fn it_parks_until_its_timeout_and_then_fails_retryably() {
        let (until, checkpoint) = parked(Wait.run(call(1_000, 1, None)).await.unwrap());
        assert_eq!(until, Some(11_000));
        assert_eq!(checkpoint["callback_token"], "signal:approve");
        // Woken early (a restart), it parks again until the same time.
        let again = Wait
            .run(call(5_000, 1, Some(checkpoint.clone())))
            .await
            .unwrap();
        assert_eq!(parked(again).0, Some(11_000));
        let late = Wait.run(call(11_000, 1, Some(checkpoint))).await;
        let failure = late.unwrap_err();
        assert!(failure.retryable, "{failure:?}");
        assert!(failure.to_string().contains("approve"), "{failure}");
    }

    #[tokio::test]
    async fn a_signal_becomes_the_output_whenever_it_came() {
        // Before the step ran: the store wrote it without an attempt.
        let early = json!({ "callback_token": "signal:approve", "callback": { "ok": true } });
        assert_eq!(
            Wait.run(call(1_000, 1, Some(early))).await.unwrap(),
            StepOutcome::Output(json!({ "ok": true }))
        );
        // While it was parked.
        let (_, mut checkpoint) = parked(Wait.run(call(1_000, 1, None)).await.unwrap());
        checkpoint["callback"] = json!("yes");
        assert_eq!(
            Wait.run(call(2_000, 1, Some(checkpoint))).await.unwrap(),
            StepOutcome::Output(json!("yes"))
        );
    }

    #[tokio::test]
    async fn a_retry_waits_again_with_a_new_deadline() {
        let (_, checkpoint) = parked(Wait.run(call(1_000, 1, None)).await.unwrap());
        let (until, _) = parked(Wait.run(call(20_000, 2, Some(checkpoint))).await.unwrap());
        assert_eq!(until, Some(30_000));
    }
}
