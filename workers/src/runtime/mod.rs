//! The worker runtime. One loop per process claims jobs in batches up to its free slots, runs each
//! in its own task under the step's timeout, heartbeats every held lease in one statement, and
//! completes finished attempts in one batch, in the transaction that claims the next; two such
//! transactions may be in flight at once. A job whose lease is not extended (its run was
//! cancelled or timed out, or the lease was lost) has its task aborted: dropping the future is
//! what stops the step.
//!
//! [`worker_loop`] decides all of that without IO; [`driver`] does what it decides; [`attempt`]
//! is what a step's task runs.

mod attempt;
mod driver;
#[cfg(test)]
mod fixtures;
mod worker_loop;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use switchyard_engine::service::Engine;
use tokio::sync::watch;

use crate::steps::Registry;
use attempt::Steps;
use driver::RunStep;
use worker_loop::Timing;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Jobs run at once by this process.
    pub slots: usize,
    /// How long a claim holds a job without a heartbeat; heartbeats go out every third of it.
    pub lease: Duration,
    /// Longest wait between claims when no wake-up arrives.
    pub poll: Duration,
    /// On shutdown, how long running steps may take to finish before they are released.
    pub grace: Duration,
    /// Outputs larger than this (as JSON) are refused.
    pub max_output_bytes: usize,
    pub vars: Value,
    pub secrets: BTreeMap<String, String>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            slots: 64,
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(250),
            grace: Duration::from_secs(10),
            max_output_bytes: 1024 * 1024,
            vars: Value::Object(Default::default()),
            secrets: BTreeMap::new(),
        }
    }
}

/// Runs jobs until `shutdown` turns true, then stops claiming, lets running steps finish for the
/// grace period, and gives back what is still running.
pub async fn run_worker(
    engine: Arc<Engine>,
    registry: Registry,
    config: WorkerConfig,
    shutdown: watch::Receiver<bool>,
) {
    let millis = |d: Duration| d.as_millis().min(i64::MAX as u128) as i64;
    let timing = Timing {
        slots: config.slots,
        lease: millis(config.lease),
        poll: millis(config.poll),
        grace: millis(config.grace),
    };
    let steps = Arc::new(Steps {
        engine: engine.clone(),
        registry,
        config,
        loops: Default::default(),
    });
    let run_step: RunStep = Arc::new(move |job| Box::pin(attempt::execute(steps.clone(), job)));
    driver::drive(engine, run_step, timing, shutdown).await
}

/// The message a panic carried, if it carried one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".to_owned())
}
