//! Switchyard's engine: workflow definitions, the durable store, the run and job state machine,
//! the scheduler and the control operations the CLI and the HTTP API share.
#![forbid(unsafe_code)]

pub mod api;
pub mod artifacts;
pub mod auth;
pub mod callback;
pub mod clock;
pub mod dashboard;
pub mod definition;
pub mod flow;
pub mod health;
pub mod hooks;
mod intake;
pub mod keys;
pub mod maintenance;
pub mod metrics;
pub mod n8n_import;
pub mod plan;
pub mod quotas;
pub mod scheduler;
pub mod service;
pub mod settings;
pub mod signature;
pub mod state;
pub mod store;
#[doc(hidden)]
pub mod testing;
