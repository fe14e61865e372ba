//! Values the runtime's tests share.

use serde_json::Value;
use switchyard_engine::store::{ClaimedJob, JobId, Lease};

/// Attempt `attempt` of job `id` of workflow `w` v1, in run `run_id`.
pub(crate) fn claimed(id: JobId, attempt: u32, run_id: &str) -> ClaimedJob {
    ClaimedJob {
        lease: Lease {
            job_id: id,
            attempt,
            token: format!("token-{id}-{attempt}"),
        },
        run_id: run_id.to_owned(),
        step_id: "a".to_owned(),
        workflow_id: "w".to_owned(),
        version: 1,
        input: Value::Null,
        scheduled_at: None,
        run_error: None,
        item: None,
        checkpoint: None,
        outputs: Default::default(),
    }
}
