//! The worker loop's IO: turns tokio's events (store calls and heartbeats coming back, step tasks
//! ending, wake-ups, timers, the shutdown signal) into [`Event`]s for [`WorkerLoop`], and does
//! the [`Action`]s it returns. It decides nothing itself.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use switchyard_engine::service::Engine;
use switchyard_engine::state::Millis;
use switchyard_engine::store::{ClaimedJob, Completion, JobId, Lease, StoreError};
use tokio::sync::{Notify, watch};
use tokio::task::{AbortHandle, JoinSet};

use super::panic_message;
use super::worker_loop::{Action, Event, StepEnd, Timing, WorkerLoop};

/// What the worker loop asks of the database, and nothing more: [`Engine`] in a process, an
/// in-memory fake in the driver's tests.
#[async_trait]
pub(crate) trait WorkerStore: Send + Sync + 'static {
    /// The time leases and due times are written in.
    fn now(&self) -> Millis;
    /// Signalled when a commit made jobs claimable.
    fn wakeup(&self) -> Arc<Notify>;
    /// Records `batch` and claims up to `limit` jobs for `lease` ms, in one transaction
    /// ([`Engine::complete_and_claim`]); returns the jobs whose completion counted, and the
    /// claimed ones.
    async fn complete_and_claim(
        &self,
        batch: Vec<Completion>,
        limit: u32,
        lease: Millis,
    ) -> Result<(Vec<JobId>, Vec<ClaimedJob>), StoreError>;
    /// Extends the leases still held until `until`; returns their jobs.
    async fn heartbeat(&self, leases: &[Lease], until: Millis) -> Result<Vec<JobId>, StoreError>;
    /// When the next job becomes claimable, if one will.
    async fn next_due(&self) -> Result<Option<Millis>, StoreError>;
}

#[async_trait]
impl WorkerStore for Engine {
    fn now(&self) -> Millis {
        Engine::now(self)
    }
    fn wakeup(&self) -> Arc<Notify> {
        self.store().wakeup()
    }
    async fn complete_and_claim(
        &self,
        batch: Vec<Completion>,
        limit: u32,
        lease: Millis,
    ) -> Result<(Vec<JobId>, Vec<ClaimedJob>), StoreError> {
        Engine::complete_and_claim(self, batch, limit, lease).await
    }
    async fn heartbeat(&self, leases: &[Lease], until: Millis) -> Result<Vec<JobId>, StoreError> {
        self.store().heartbeat(leases, until).await
    }
    async fn next_due(&self) -> Result<Option<Millis>, StoreError> {
        self.store().next_due().await
    }
}

/// Runs one attempt of a claimed job to its completion.
pub(crate) type RunStep = Arc<dyn Fn(ClaimedJob) -> BoxFuture<'static, Completion> + Send + Sync>;

/// Runs the worker loop until it exits after `shutdown` turned true (or its sender was dropped).
pub(crate) async fn drive(
    store: Arc<dyn WorkerStore>,
    run_step: RunStep,
    timing: Timing,
    mut shutdown: watch::Receiver<bool>,
) {
    let wakeup = store.wakeup();
    let mut core = WorkerLoop::new(timing);
    let mut tasks: JoinSet<StepEnd> = JoinSet::new();
    let mut running: HashMap<Lease, AbortHandle> = HashMap::new();
    // Store calls, heartbeats and next-due questions in flight, each answering with its event.
    let mut replies: FuturesUnordered<BoxFuture<'static, Event>> = FuturesUnordered::new();
    let mut told_to_stop = false;
    let mut event = Event::Started;
    loop {
        for action in core.next(event, store.now()) {
            match action {
                Action::StoreCall { batch, asked } => {
                    replies.push(Box::pin(store_call(
                        store.clone(),
                        batch,
                        asked,
                        timing.lease,
                    )));
                }
                Action::Spawn(job) => {
                    let lease = job.lease.clone();
                    let run_step = run_step.clone();
                    let handle = tasks.spawn(async move {
                        let lease = job.lease.clone();
                        // The call inside the guarded future: it may panic before its future
                        // exists.
                        match AssertUnwindSafe(async move { run_step(*job).await })
                            .catch_unwind()
                            .await
                        {
                            Ok(completion) => StepEnd::Done(completion),
                            Err(panic) => {
                                tracing::error!(
                                    job = lease.job_id,
                                    panic = panic_message(&*panic),
                                    "step task panicked; its lease will run out"
                                );
                                StepEnd::Panicked(lease)
                            }
                        }
                    });
                    running.insert(lease, handle);
                }
                Action::Abort(lease) => {
                    if let Some(handle) = running.remove(&lease) {
                        handle.abort();
                    }
                }
                Action::Heartbeat { leases, until } => {
                    let store = store.clone();
                    replies.push(Box::pin(async move {
                        let kept = store.heartbeat(&leases, until).await;
                        Event::HeartbeatDone { leases, kept }
                    }));
                }
                Action::AskNextDue { after_call } => {
                    let store = store.clone();
                    replies.push(Box::pin(async move {
                        let due = store.next_due().await.ok().flatten();
                        Event::NextDue { after_call, due }
                    }));
                }
                Action::Exit => return,
            }
        }
        let deadline = core.deadline().map(|at| {
            let wait = Duration::from_millis((at - store.now()).max(0) as u64);
            tokio::time::Instant::now() + wait
        });
        let takes_wakeups = core.takes_wakeups();
        event = tokio::select! {
            biased;
            changed = shutdown.changed(), if !told_to_stop => {
                if changed.is_err() || *shutdown.borrow() {
                    told_to_stop = true;
                    Event::Shutdown
                } else {
                    Event::Tick
                }
            }
            Some(reply) = replies.next(), if !replies.is_empty() => reply,
            Some(ended) = tasks.join_next(), if !tasks.is_empty() => {
                // Every task that ended by now, so that their completions share a batch. An
                // aborted task ends with an error and counts for nothing.
                let ends: Vec<StepEnd> = std::iter::once(ended)
                    .chain(std::iter::from_fn(|| tasks.try_join_next()))
                    .filter_map(Result::ok)
                    .collect();
                for end in &ends {
                    running.remove(end.lease());
                }
                Event::StepsEnded(ends)
            }
            _ = wakeup.notified(), if takes_wakeups => Event::WakeUp,
            _ = async { tokio::time::sleep_until(deadline.expect("guarded")).await },
                if deadline.is_some() => Event::Tick,
        };
    }
}

/// Completes `batch` and claims up to `asked` jobs in one transaction.
async fn store_call(
    store: Arc<dyn WorkerStore>,
    batch: Vec<Completion>,
    asked: usize,
    lease: Millis,
) -> Event {
    let children: Vec<(JobId, Vec<String>)> = batch
        .iter()
        .filter(|c| !c.children.is_empty())
        .map(|c| {
            let workflows = c.children.iter().map(|r| r.workflow_id.clone()).collect();
            (c.lease.job_id, workflows)
        })
        .collect();
    let completions = batch.len();
    let started = std::time::Instant::now();
    let done = store.complete_and_claim(batch, asked as u32, lease).await;
    switchyard_engine::metrics::claimed(started.elapsed());
    let claimed = match done {
        Ok((accepted, claimed)) => {
            // Child runs exist once their parent's parking committed.
            for (_, workflows) in children.iter().filter(|(job, _)| accepted.contains(job)) {
                for workflow in workflows {
                    switchyard_engine::metrics::run_started(workflow);
                }
            }
            Ok(claimed)
        }
        Err(e) => {
            if completions > 0 {
                tracing::error!(error = %e, "could not record completions; their leases will expire and the jobs run again");
            }
            Err(e)
        }
    };
    Event::StoreCallDone { asked, claimed }
}

#[cfg(test)]
mod tests;
