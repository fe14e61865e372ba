//! What one attempt spent at the services it called (the seed's `api_usage`): recorded with its
//! completion however it ends, and counted in the metrics per provider as it happens.

use std::sync::{Arc, Mutex};

use switchyard_engine::store::Usage;

#[derive(Clone, Default, Debug)]
pub struct UsageMeter(Arc<Mutex<Vec<Usage>>>);

impl UsageMeter {
    /// One call to `provider`: whether it failed, the tokens it took and what it cost (USD).
    pub fn record(&self, provider: &str, failed: bool, tokens: u64, cost: f64) {
        let labels = [("provider", provider.to_owned())];
        metrics::counter!("switchyard_provider_requests_total", &labels).increment(1);
        if failed {
            metrics::counter!("switchyard_provider_errors_total", &labels).increment(1);
        }
        metrics::counter!("switchyard_provider_tokens_total", &labels).increment(tokens);
        self.0.lock().expect("usage poisoned").push(Usage {
            provider: provider.to_owned(),
            requests: 1,
            errors: u64::from(failed),
            tokens,
            cost,
            ..Usage::default()
        });
    }

    /// What was recorded, for `workflow_id`'s completion; the meter is empty after.
    pub fn take(&self, workflow_id: &str) -> Vec<Usage> {
        let mut taken = std::mem::take(&mut *self.0.lock().expect("usage poisoned"));
        for usage in &mut taken {
            usage.workflow_id = workflow_id.to_owned();
        }
        taken
    }
}
