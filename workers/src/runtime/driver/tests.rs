//! The driver against an in-memory store: that events reach the loop and its actions happen
//! (steps spawned, aborted and given back, the loop returning). Leases are short so heartbeats
//! come within milliseconds; every wait is for a condition, bounded so a failure cannot hang.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use switchyard_engine::clock::{Clock, SystemClock};
use switchyard_engine::state::{Millis, Settlement};
use switchyard_engine::store::{ClaimedJob, Completion, JobId, Lease, StoreError};
use tokio::sync::{Notify, watch};

use super::{RunStep, Timing, WorkerStore, drive};
use crate::runtime::fixtures::claimed;

/// What a test step does, by its job's run id.
const FINISHES: &str = "finishes";
const HANGS: &str = "hangs";
const PANICS: &str = "panics";

#[derive(Default)]
struct State {
    queue: VecDeque<ClaimedJob>,
    /// Leases the store holds, by job.
    leases: HashMap<JobId, Lease>,
    recorded: Vec<Completion>,
    /// Jobs whose step started, and whose step's future was dropped before it finished.
    started: Vec<JobId>,
    dropped: Vec<JobId>,
}

#[derive(Default)]
struct FakeStore {
    state: Mutex<State>,
    wakeup: Arc<Notify>,
    changed: Notify,
}

impl FakeStore {
    fn with_jobs(jobs: &[(JobId, &str)]) -> Arc<FakeStore> {
        let store = FakeStore::default();
        store.state.lock().unwrap().queue = jobs
            .iter()
            .map(|&(id, behaviour)| claimed(id, 1, behaviour))
            .collect();
        Arc::new(store)
    }

    fn change(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.state.lock().unwrap());
        self.changed.notify_waiters();
    }

    /// Waits until `done` holds; fails the test after ten seconds.
    async fn until(&self, what: &str, done: impl Fn(&State) -> bool) {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if done(&self.state.lock().unwrap()) {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .unwrap_or_else(|_| panic!("waited ten seconds for {what}"));
    }

    fn recorded(&self) -> Vec<(JobId, Settlement)> {
        let state = self.state.lock().unwrap();
        let mut recorded: Vec<_> = state
            .recorded
            .iter()
            .map(|c| (c.lease.job_id, c.settlement.clone()))
            .collect();
        recorded.sort_by_key(|(id, _)| *id);
        recorded
    }
}

#[async_trait]
impl WorkerStore for FakeStore {
    fn now(&self) -> Millis {
        SystemClock.now()
    }
    fn wakeup(&self) -> Arc<Notify> {
        self.wakeup.clone()
    }
    async fn complete_and_claim(
        &self,
        batch: Vec<Completion>,
        limit: u32,
        _lease: Millis,
    ) -> Result<(Vec<JobId>, Vec<ClaimedJob>), StoreError> {
        let mut accepted = Vec::new();
        let mut claimed = Vec::new();
        self.change(|state| {
            for completion in batch {
                let id = completion.lease.job_id;
                if state.leases.get(&id) == Some(&completion.lease) {
                    state.leases.remove(&id);
                    accepted.push(id);
                    state.recorded.push(completion);
                }
            }
            while claimed.len() < limit as usize
                && let Some(job) = state.queue.pop_front()
            {
                state.leases.insert(job.lease.job_id, job.lease.clone());
                claimed.push(job);
            }
        });
        Ok((accepted, claimed))
    }
    async fn heartbeat(&self, leases: &[Lease], _until: Millis) -> Result<Vec<JobId>, StoreError> {
        let state = self.state.lock().unwrap();
        Ok(leases
            .iter()
            .filter(|l| state.leases.get(&l.job_id) == Some(l))
            .map(|l| l.job_id)
            .collect())
    }
    async fn next_due(&self) -> Result<Option<Millis>, StoreError> {
        Ok(None)
    }
}

/// Records that a hanging step's future was dropped.
struct DropGuard(Arc<FakeStore>, JobId);

impl Drop for DropGuard {
    fn drop(&mut self) {
        let id = self.1;
        self.0.change(|state| state.dropped.push(id));
    }
}

/// Steps that succeed at once, never finish, or panic, as their job's run id says.
fn steps(store: &Arc<FakeStore>) -> RunStep {
    let store = store.clone();
    Arc::new(move |job: ClaimedJob| {
        let store = store.clone();
        Box::pin(async move {
            let id = job.lease.job_id;
            store.change(|state| state.started.push(id));
            match job.run_id.as_str() {
                HANGS => {
                    let _dropped = DropGuard(store, id);
                    std::future::pending::<()>().await
                }
                PANICS => panic!("not in a step kind"),
                _ => {}
            }
            Completion {
                lease: job.lease,
                settlement: Settlement::Succeed {
                    output: Value::Null,
                },
                children: Vec::new(),
                logs: Vec::new(),
                artifacts: Vec::new(),
                usage: Vec::new(),
            }
        })
    })
}

fn timing(slots: usize) -> Timing {
    Timing {
        slots,
        lease: 150,
        poll: 20,
        grace: 100,
    }
}

/// A driver running on a fake store.
struct Running {
    stop: watch::Sender<bool>,
    driver: tokio::task::JoinHandle<()>,
}

fn start(store: &Arc<FakeStore>, timing: Timing) -> Running {
    let (stop, stopped) = watch::channel(false);
    let driver = tokio::spawn(drive(store.clone(), steps(store), timing, stopped));
    Running { stop, driver }
}

impl Running {
    /// Signals the shutdown and waits for the driver to return.
    async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(10), self.driver)
            .await
            .expect("the driver returned")
            .expect("the driver did not panic");
    }
}

#[tokio::test]
async fn every_queued_job_runs_and_is_recorded_once() {
    let jobs: Vec<(JobId, &str)> = (1..=50).map(|id| (id, FINISHES)).collect();
    let store = FakeStore::with_jobs(&jobs);
    let driver = start(&store, timing(8));
    store
        .until("every job recorded", |s| s.recorded.len() == 50)
        .await;
    driver.stop().await;
    let recorded = store.recorded();
    assert_eq!(
        recorded.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        (1..=50).collect::<Vec<_>>()
    );
    assert!(
        recorded
            .iter()
            .all(|(_, s)| matches!(s, Settlement::Succeed { .. }))
    );
}

#[tokio::test]
async fn a_step_whose_lease_the_store_dropped_is_stopped() {
    let store = FakeStore::with_jobs(&[(1, HANGS), (2, HANGS)]);
    let driver = start(&store, timing(4));
    store
        .until("both steps started", |s| s.started.len() == 2)
        .await;
    // Run 1 cancelled: the store holds its lease no more.
    store.change(|state| {
        state.leases.remove(&1);
    });
    store.until("step 1 stopped", |s| s.dropped == [1]).await;
    assert!(store.recorded().is_empty());
    driver.stop().await;
    // Only step 2 was still running at the shutdown.
    assert_eq!(store.recorded(), [(2, Settlement::Release)]);
}

#[tokio::test]
async fn a_step_still_running_after_the_grace_is_given_back_and_the_driver_returns() {
    let store = FakeStore::with_jobs(&[(1, HANGS)]);
    let driver = start(&store, timing(4));
    store.until("the step started", |s| s.started == [1]).await;
    driver.stop().await;
    assert_eq!(store.state.lock().unwrap().dropped, [1]);
    assert_eq!(store.recorded(), [(1, Settlement::Release)]);
}

#[tokio::test]
async fn a_step_task_that_panicked_frees_its_slot() {
    let store = FakeStore::with_jobs(&[(1, PANICS), (2, FINISHES)]);
    let driver = start(&store, timing(1));
    store
        .until("the next job recorded", |s| s.recorded.len() == 1)
        .await;
    driver.stop().await;
    assert_eq!(
        store.recorded(),
        [(
            2,
            Settlement::Succeed {
                output: Value::Null
            }
        )]
    );
}
