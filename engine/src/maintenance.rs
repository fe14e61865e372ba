//! Background upkeep every process with a store may run, any number of times at once (every
//! change is guarded): expired leases become lost attempts, overdue runs time out, and finished
//! runs past their retention are pruned.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::service::Engine;

/// How often leases and deadlines are checked when nothing is due sooner.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_BATCH: u32 = 1_000;
/// How often stored files no run names any longer are looked for.
const ARTIFACT_SWEEP_EVERY: Duration = Duration::from_secs(3600);

pub async fn run_maintenance(engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    let mut last_prune = tokio::time::Instant::now() - PRUNE_EVERY;
    let mut last_artifact_sweep = tokio::time::Instant::now();
    loop {
        match engine.store().sweep(engine.now()).await {
            Ok(swept) if swept != Default::default() => {
                tracing::info!(
                    reclaimed = swept.reclaimed_jobs,
                    timed_out = swept.timed_out_runs,
                    "sweep"
                )
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "sweep failed"),
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = tokio::time::Instant::now();
            loop {
                match engine.store().prune(engine.now(), PRUNE_BATCH).await {
                    Ok(n) if n == u64::from(PRUNE_BATCH) => continue,
                    Ok(0) => break,
                    Ok(n) => {
                        tracing::info!(runs = n, "pruned finished runs past their retention");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "prune failed");
                        break;
                    }
                }
            }
        }
        if let Some(artifacts) = engine.artifacts()
            && last_artifact_sweep.elapsed() >= ARTIFACT_SWEEP_EVERY
        {
            last_artifact_sweep = tokio::time::Instant::now();
            // Listing a bucket may take a while: the leases and deadlines above must not wait.
            let now = engine.now();
            tokio::spawn(async move {
                match artifacts.sweep(now, crate::artifacts::SWEEP_GRACE).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(files = n, "deleted artifacts no run names"),
                    Err(e) => tracing::warn!(error = %e, "artifact sweep failed"),
                }
            });
        }
        // A dropped sender means no one can ask us to stop any more: stop now.
        let stopped = tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => false,
            changed = shutdown.changed() => changed.is_err(),
        };
        if stopped || *shutdown.borrow() {
            return;
        }
    }
}
