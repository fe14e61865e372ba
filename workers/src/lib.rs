//! Switchyard's workers: the runtime that claims jobs, runs them under a lease with heartbeats,
//! timeouts and cancellation, and completes them in batches; and the step kinds it runs.
#![forbid(unsafe_code)]

pub mod artifacts;
pub mod egress;
pub mod notifier;
pub mod runtime;
pub mod steps;
pub mod usage;

pub use egress::{Destination, EgressPolicy};
pub use runtime::{WorkerConfig, run_worker};
pub use steps::{N8n, N8nUrls, Registry, StepCall, StepKind, StepLog, StepOutcome, StepResult};
