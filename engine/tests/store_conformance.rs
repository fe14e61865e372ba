//! The store conformance suite: the same behaviours, run against every store. A store is done when
//! it passes. Each test gets a fresh database; times are passed in, so no test sleeps.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::{Value, json};
use switchyard_engine::definition::{Format, Workflow, parse_str};
use switchyard_engine::plan::{Trigger, plan_run};
use switchyard_engine::state::{JobState, Millis, NotificationStatus, RunStatus, Settlement};
use switchyard_engine::store::{
    CallbackAnswer, ClaimParams, ClaimedJob, Completion, DefinitionOrigin, FireOutcome, FireParams,
    GapFill, InstallParams, JobId, LogLine, NewAuditEntry, NewRun, NewWebhookEvent,
    NonceAllocation, NonceGap, NonceRequest, RunFilter, SettingChange, Signal, SignalOutcome,
    SkippedFire, Store, StoreError, TokenRevocation, WebhookAction, WebhookOutcome,
};

const T0: Millis = 1_800_000_000_000;
const LEASE: Millis = 30_000;

fn workflow(yaml: &str) -> Workflow {
    parse_str("test.yaml", yaml, Format::Yaml)
        .expect("test workflow parses")
        .remove(0)
}

fn linear() -> Workflow {
    workflow(
        "id: linear\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, needs: [a]}\n  - {id: c, type: noop, needs: [b]}\n",
    )
}

fn installing(workflows: &[(String, Value)], origin: DefinitionOrigin) -> InstallParams<'_> {
    InstallParams {
        workflows,
        origin,
        create_only: false,
        actor: None,
    }
}

async fn install(store: &dyn Store, wf: &Workflow) -> i64 {
    store
        .upsert_workflows(
            installing(
                &[(wf.id.clone(), serde_json::to_value(wf).unwrap())],
                DefinitionOrigin::Files,
            ),
            T0,
        )
        .await
        .unwrap()[0]
}

async fn start(store: &dyn Store, wf: &Workflow, trigger: Trigger) -> String {
    let version = install(store, wf).await;
    let run = plan_run(wf, version, Value::Null, trigger).unwrap();
    store.create_runs(vec![run], T0).await.unwrap().remove(0)
}

fn planned(store_version: i64, wf: &Workflow) -> NewRun {
    plan_run(wf, store_version, Value::Null, Trigger::default()).unwrap()
}

async fn claim(store: &dyn Store, now: Millis, limit: u32) -> Vec<ClaimedJob> {
    store.claim(params(limit, now)).await.unwrap()
}

fn park(job: &ClaimedJob, until: Millis, checkpoint: Value) -> Completion {
    Completion {
        lease: job.lease.clone(),
        settlement: Settlement::Park {
            until: Some(until),
            checkpoint,
        },
        children: Vec::new(),
        logs: Vec::new(),
        artifacts: Vec::new(),
        usage: Vec::new(),
    }
}

fn done(job: &ClaimedJob, output: Value) -> Completion {
    Completion {
        lease: job.lease.clone(),
        settlement: Settlement::Succeed { output },
        children: Vec::new(),
        logs: Vec::new(),
        artifacts: Vec::new(),
        usage: Vec::new(),
    }
}

fn failed(job: &ClaimedJob, error: &str) -> Completion {
    Completion {
        lease: job.lease.clone(),
        settlement: Settlement::Fail {
            error: error.into(),
        },
        children: Vec::new(),
        logs: Vec::new(),
        artifacts: Vec::new(),
        usage: Vec::new(),
    }
}

/// Parks the claimed `workflow` step `fan` of `run` with `count` child runs of `child`, as a
/// worker does; returns the children's run ids in order.
async fn park_with_children(
    store: &dyn Store,
    run: &str,
    fan: &ClaimedJob,
    child: &Workflow,
    child_version: i64,
    count: i64,
) -> Vec<String> {
    let children: Vec<NewRun> = (0..count)
        .map(|index| {
            let mut r = planned(child_version, child);
            r.parent = Some(switchyard_engine::store::ParentLink {
                run_id: run.to_owned(),
                job_id: fan.lease.job_id,
                index,
            });
            r
        })
        .collect();
    let ids = children.iter().map(|r| r.id.clone()).collect();
    store
        .complete(
            vec![Completion {
                lease: fan.lease.clone(),
                settlement: Settlement::Park {
                    until: None,
                    checkpoint: json!({}),
                },
                children,
                logs: Vec::new(),
                artifacts: Vec::new(),
                usage: Vec::new(),
            }],
            T0,
        )
        .await
        .unwrap();
    ids
}

async fn run_status(store: &dyn Store, id: &str) -> RunStatus {
    store.run(id).await.unwrap().summary.status
}

async fn job_state(store: &dyn Store, run: &str, step: &str) -> JobState {
    store
        .run(run)
        .await
        .unwrap()
        .steps
        .into_iter()
        .find(|s| s.step_id == step)
        .unwrap()
        .state
}

pub async fn steps_run_in_dependency_order_and_the_run_succeeds(store: Arc<dyn Store>) {
    let run = start(&*store, &linear(), Trigger::default()).await;
    for (i, step) in ["a", "b", "c"].iter().enumerate() {
        let now = T0 + i as Millis;
        let jobs = claim(&*store, now, 10).await;
        assert_eq!(jobs.len(), 1, "only {step} is ready");
        assert_eq!(jobs[0].step_id, *step);
        let accepted = store
            .complete(vec![done(&jobs[0], json!({ "step": step }))], now)
            .await
            .unwrap();
        assert_eq!(accepted.len(), 1);
    }
    let detail = store.run(&run).await.unwrap();
    assert_eq!(detail.summary.status, RunStatus::Succeeded);
    assert_eq!(detail.output, Some(json!({ "c": { "step": "c" } })));
}

pub async fn claimed_job_sees_outputs_of_finished_steps(store: Arc<dyn Store>) {
    start(&*store, &linear(), Trigger::default()).await;
    let a = claim(&*store, T0, 10).await;
    store
        .complete(vec![done(&a[0], json!(42))], T0)
        .await
        .unwrap();
    let b = claim(&*store, T0, 10).await;
    assert_eq!(b[0].outputs.get("a"), Some(&json!(42)));
}

pub async fn independent_steps_are_claimed_together_and_fan_in_waits_for_all(
    store: Arc<dyn Store>,
) {
    let wf = workflow(
        "id: diamond\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop}\n  - {id: join, type: noop, needs: [a, b]}\n",
    );
    let run = start(&*store, &wf, Trigger::default()).await;
    let jobs = claim(&*store, T0, 10).await;
    assert_eq!(jobs.len(), 2);
    store
        .complete(vec![done(&jobs[0], json!(1))], T0)
        .await
        .unwrap();
    assert!(
        claim(&*store, T0, 10).await.is_empty(),
        "join waits for both"
    );
    store
        .complete(vec![done(&jobs[1], json!(2))], T0)
        .await
        .unwrap();
    let join = claim(&*store, T0, 10).await;
    assert_eq!(join[0].step_id, "join");
    store
        .complete(vec![done(&join[0], Value::Null)], T0)
        .await
        .unwrap();
    assert_eq!(run_status(&*store, &run).await, RunStatus::Succeeded);
}

pub async fn late_completion_from_expired_lease_is_rejected(store: Arc<dyn Store>) {
    let run = start(&*store, &linear(), Trigger::default()).await;
    let first = claim(&*store, T0, 1).await.remove(0);
    // The worker goes quiet; its lease runs out and the job is reclaimed as a lost attempt.
    let swept = store.sweep(T0 + LEASE + 1).await.unwrap();
    assert_eq!(swept.reclaimed_jobs, 1);
    let second = claim(&*store, T0 + LEASE + 2, 1).await.remove(0);
    assert_eq!(second.lease.job_id, first.lease.job_id);
    assert_eq!(second.lease.attempt, first.lease.attempt + 1);
    // The first worker wakes up and reports: nothing changes.
    let late = store
        .complete(vec![done(&first, json!("stale"))], T0 + LEASE + 3)
        .await
        .unwrap();
    assert!(late.is_empty(), "late completion was accepted");
    assert_eq!(job_state(&*store, &run, "a").await, JobState::Running);
    let current = store
        .complete(vec![done(&second, json!("fresh"))], T0 + LEASE + 4)
        .await
        .unwrap();
    assert_eq!(current, vec![second.lease.job_id]);
    let detail = store.run(&run).await.unwrap();
    assert_eq!(detail.steps[0].output, Some(json!("fresh")));
}

pub async fn completion_with_a_forged_token_is_rejected(store: Arc<dyn Store>) {
    start(&*store, &linear(), Trigger::default()).await;
    let mut job = claim(&*store, T0, 1).await.remove(0);
    job.lease.token = "forged".into();
    assert!(
        store
            .complete(vec![done(&job, Value::Null)], T0)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn heartbeat_extends_a_lease_so_it_is_not_reclaimed(store: Arc<dyn Store>) {
    start(&*store, &linear(), Trigger::default()).await;
    let job = claim(&*store, T0, 1).await.remove(0);
    let kept = store
        .heartbeat(std::slice::from_ref(&job.lease), T0 + 2 * LEASE)
        .await
        .unwrap();
    assert_eq!(kept, vec![job.lease.job_id]);
    assert_eq!(store.sweep(T0 + LEASE + 1).await.unwrap().reclaimed_jobs, 0);
    assert_eq!(
        store
            .sweep(T0 + 2 * LEASE + 1)
            .await
            .unwrap()
            .reclaimed_jobs,
        1
    );
}

pub async fn retry_waits_for_its_stored_time(store: Arc<dyn Store>) {
    let run = start(&*store, &linear(), Trigger::default()).await;
    let job = claim(&*store, T0, 1).await.remove(0);
    store
        .complete(
            vec![Completion {
                lease: job.lease.clone(),
                settlement: Settlement::Retry {
                    at: T0 + 5_000,
                    error: "boom".into(),
                },
                children: Vec::new(),
                logs: Vec::new(),
                artifacts: Vec::new(),
                usage: Vec::new(),
            }],
            T0,
        )
        .await
        .unwrap();
    assert_eq!(job_state(&*store, &run, "a").await, JobState::Retrying);
    assert!(claim(&*store, T0 + 4_999, 1).await.is_empty());
    assert_eq!(store.next_due().await.unwrap(), Some(T0 + 5_000));
    let again = claim(&*store, T0 + 5_000, 1).await.remove(0);
    assert_eq!(again.lease.attempt, 2);
    let detail = store.run(&run).await.unwrap();
    assert_eq!(detail.steps[0].attempts.as_array().unwrap().len(), 1);
}

pub async fn failed_step_fails_the_run_and_cancels_the_rest(store: Arc<dyn Store>) {
    let wf = workflow(
        "id: two\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop}\n  - {id: c, type: noop, needs: [a]}\n",
    );
    let run = start(&*store, &wf, Trigger::default()).await;
    let jobs = claim(&*store, T0, 10).await;
    let a = jobs.iter().find(|j| j.step_id == "a").unwrap();
    store.complete(vec![failed(a, "bad")], T0).await.unwrap();
    let detail = store.run(&run).await.unwrap();
    assert_eq!(detail.summary.status, RunStatus::Failed);
    assert!(detail.summary.error.unwrap().contains("step a failed: bad"));
    assert_eq!(job_state(&*store, &run, "b").await, JobState::Cancelled);
    assert_eq!(job_state(&*store, &run, "c").await, JobState::Cancelled);
    let b = jobs.iter().find(|j| j.step_id == "b").unwrap();
    assert!(
        store
            .heartbeat(std::slice::from_ref(&b.lease), T0)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn retry_run_reruns_only_unsuccessful_steps(store: Arc<dyn Store>) {
    let run = start(&*store, &linear(), Trigger::default()).await;
    let a = claim(&*store, T0, 1).await.remove(0);
    store
        .complete(vec![done(&a, json!("a"))], T0)
        .await
        .unwrap();
    let b = claim(&*store, T0, 1).await.remove(0);
    store.complete(vec![failed(&b, "x")], T0).await.unwrap();
    assert_eq!(run_status(&*store, &run).await, RunStatus::Failed);
    store.retry_run(&run, T0 + 1).await.unwrap();
    let next = claim(&*store, T0 + 1, 10).await;
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].step_id, "b");
    assert_eq!(job_state(&*store, &run, "a").await, JobState::Succeeded);
    assert!(matches!(
        store.retry_run(&run, T0).await,
        Err(StoreError::Conflict(_))
    ));
}

pub async fn cancel_ends_the_run_and_drops_held_leases(store: Arc<dyn Store>) {
    let run = start(&*store, &linear(), Trigger::default()).await;
    let job = claim(&*store, T0, 1).await.remove(0);
    assert_eq!(
        store.cancel_run(&run, T0).await.unwrap(),
        RunStatus::Cancelled
    );
    assert!(
        store
            .heartbeat(std::slice::from_ref(&job.lease), T0 + LEASE)
            .await
            .unwrap()
            .is_empty(),
        "a cancelled step's worker learns it at its next heartbeat"
    );
    assert!(
        store
            .complete(vec![done(&job, Value::Null)], T0)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.cancel_run(&run, T0).await.unwrap(),
        RunStatus::Cancelled
    );
    assert!(matches!(
        store.cancel_run("nope", T0).await,
        Err(StoreError::NotFound(_))
    ));
}

pub async fn run_past_its_deadline_times_out(store: Arc<dyn Store>) {
    let wf = workflow("id: slow\ntimeout: 10s\nsteps:\n  - {id: a, type: noop}\n");
    let run = start(&*store, &wf, Trigger::default()).await;
    let job = claim(&*store, T0, 1).await.remove(0);
    assert_eq!(store.sweep(T0 + 9_999).await.unwrap().timed_out_runs, 0);
    assert_eq!(store.sweep(T0 + 10_000).await.unwrap().timed_out_runs, 1);
    assert_eq!(run_status(&*store, &run).await, RunStatus::TimedOut);
    let alerts = store.alerts(Some("slow"), 10).await.unwrap();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(
        (alerts[0].run_id.as_deref(), alerts[0].kind.as_str()),
        (Some(run.as_str()), "timed_out")
    );
    assert!(
        store
            .heartbeat(std::slice::from_ref(&job.lease), T0 + LEASE)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn parked_job_wakes_at_its_time_with_its_checkpoint(store: Arc<dyn Store>) {
    start(&*store, &linear(), Trigger::default()).await;
    let job = claim(&*store, T0, 1).await.remove(0);
    store
        .complete(
            vec![park(&job, T0 + 60_000, json!({ "until": T0 + 60_000 }))],
            T0,
        )
        .await
        .unwrap();
    assert!(claim(&*store, T0 + 59_999, 1).await.is_empty());
    let woken = claim(&*store, T0 + 60_000, 1).await.remove(0);
    assert_eq!(woken.lease.attempt, 1, "waking is not a new attempt");
    assert_eq!(woken.checkpoint, Some(json!({ "until": T0 + 60_000 })));
}

/// Cancelling leaves nothing of a run to claim: neither its queued jobs nor its sleeping ones,
/// and the queue depth and next due time forget them.
pub async fn cancelled_runs_leave_nothing_claimable(store: Arc<dyn Store>) {
    let sleeping = start(&*store, &linear(), Trigger::default()).await;
    let job = claim(&*store, T0, 1).await.remove(0);
    store
        .complete(vec![park(&job, T0 + 60_000, json!({}))], T0)
        .await
        .unwrap();
    let queued = start(&*store, &linear(), Trigger::default()).await;
    let kept = start(&*store, &linear(), Trigger::default()).await;
    assert_eq!(store.queue_depth(T0 + 60_000).await.unwrap(), 3);
    for run in [&queued, &sleeping] {
        store.cancel_run(run, T0).await.unwrap();
    }
    assert_eq!(store.queue_depth(T0 + 60_000).await.unwrap(), 1);
    assert_eq!(store.next_due().await.unwrap(), Some(T0));
    let left = claim(&*store, T0 + 60_000, 10).await;
    assert_eq!(
        left.iter().map(|j| &j.run_id).collect::<Vec<_>>(),
        vec![&kept]
    );
    assert_eq!(store.next_due().await.unwrap(), None);
}

fn answer(run_id: &str, step_id: &str, token: &str, result: Value) -> CallbackAnswer {
    CallbackAnswer {
        run_id: run_id.into(),
        step_id: step_id.into(),
        token: token.into(),
        result,
    }
}

fn park_for_callback(job: &ClaimedJob, token: &str, until: Millis) -> Completion {
    park(job, until, json!({ "callback_token": token }))
}

/// A run whose first step stored callback token `token` (parking for no time, as the `n8n` step
/// does) and runs again, about to call out.
async fn running_under_token(store: &dyn Store, token: &str) -> (String, ClaimedJob) {
    let run = start(store, &linear(), Trigger::default()).await;
    let job = claim(store, T0, 1).await.remove(0);
    store
        .complete(vec![park_for_callback(&job, token, T0)], T0)
        .await
        .unwrap();
    (run, claim(store, T0, 1).await.remove(0))
}

pub async fn callback_wakes_a_parked_step_once_with_its_result(store: Arc<dyn Store>) {
    let run = start(&*store, &linear(), Trigger::default()).await;
    let job = claim(&*store, T0, 1).await.remove(0);
    let parked = park_for_callback(&job, "t1", T0 + 60_000);
    store.complete(vec![parked], T0).await.unwrap();
    let result = json!({ "event_id": "e1", "output": { "rows": 3 } });
    for (run_id, step, token) in [(&*run, "a", "t2"), (&*run, "b", "t1"), ("nope", "a", "t1")] {
        assert!(
            !store
                .deliver_callback(&answer(run_id, step, token, result.clone()), T0 + 1)
                .await
                .unwrap(),
            "{run_id}/{step} under {token}"
        );
    }
    assert!(claim(&*store, T0 + 1, 1).await.is_empty());
    assert!(
        store
            .deliver_callback(&answer(&run, "a", "t1", result.clone()), T0 + 1)
            .await
            .unwrap()
    );
    assert!(
        !store
            .deliver_callback(
                &answer(&run, "a", "t1", json!({ "event_id": "e2" })),
                T0 + 2
            )
            .await
            .unwrap(),
        "a token takes one result"
    );
    assert!(
        store
            .deliver_callback(&answer(&run, "a", "t1", result.clone()), T0 + 2)
            .await
            .unwrap(),
        "the same delivery again counts as taken"
    );
    let woken = claim(&*store, T0 + 1, 1).await.remove(0);
    assert_eq!(woken.lease.attempt, 1, "waking is not a new attempt");
    assert_eq!(
        woken.checkpoint,
        Some(json!({ "callback_token": "t1", "callback": result }))
    );
    assert_eq!(
        store.next_due().await.unwrap(),
        None,
        "the deadline is gone"
    );
}

fn gated() -> Workflow {
    workflow(
        "id: gated\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: wait, needs: [a], with: {signal: go}}\n",
    )
}

fn signal(run_id: &str, payload: Value) -> Signal {
    Signal {
        run_id: run_id.into(),
        step_id: "b".into(),
        name: "go".into(),
        payload,
    }
}

/// The checkpoint the `wait` step parks with.
fn waiting_for_go(job: &ClaimedJob, deadline: Millis) -> Completion {
    park(
        job,
        deadline,
        json!({ "callback_token": "signal:go", "attempt": job.lease.attempt, "deadline": deadline }),
    )
}

/// A run of `gated` whose `wait` step was just claimed.
async fn at_the_wait_step(store: &dyn Store) -> (String, ClaimedJob) {
    let run = start(store, &gated(), Trigger::default()).await;
    let a = claim(store, T0, 1).await.remove(0);
    store
        .complete(vec![done(&a, Value::Null)], T0)
        .await
        .unwrap();
    (run, claim(store, T0, 1).await.remove(0))
}

pub async fn a_signal_before_its_step_ran_is_kept_and_a_second_is_refused(store: Arc<dyn Store>) {
    let run = start(&*store, &gated(), Trigger::default()).await;
    let payload = json!({ "approved_by": "ana" });
    assert_eq!(
        store
            .deliver_signal(&signal(&run, payload.clone()), T0)
            .await
            .unwrap(),
        SignalOutcome::Delivered,
        "kept while the step waits for its needs"
    );
    assert_eq!(
        store
            .deliver_signal(&signal(&run, json!("again")), T0)
            .await
            .unwrap(),
        SignalOutcome::AlreadySignalled
    );
    let a = claim(&*store, T0, 1).await.remove(0);
    store
        .complete(vec![done(&a, Value::Null)], T0)
        .await
        .unwrap();
    let b = claim(&*store, T0, 1).await.remove(0);
    assert_eq!(b.step_id, "b");
    assert_eq!(
        b.checkpoint,
        Some(json!({ "callback_token": "signal:go", "callback": payload }))
    );
}

pub async fn a_signal_wakes_its_parked_step_at_once(store: Arc<dyn Store>) {
    let (run, b) = at_the_wait_step(&*store).await;
    store
        .complete(vec![waiting_for_go(&b, T0 + 60_000)], T0)
        .await
        .unwrap();
    assert!(claim(&*store, T0 + 1, 1).await.is_empty(), "parked");
    assert_eq!(
        store
            .deliver_signal(&signal(&run, json!(7)), T0 + 1)
            .await
            .unwrap(),
        SignalOutcome::Delivered
    );
    let woken = claim(&*store, T0 + 1, 1).await.remove(0);
    assert_eq!(woken.step_id, "b");
    assert_eq!(woken.lease.attempt, 1, "waking is not a new attempt");
    assert_eq!(woken.checkpoint.unwrap()["callback"], json!(7));
    assert_eq!(
        store.next_due().await.unwrap(),
        None,
        "the deadline is gone"
    );
}

pub async fn a_signal_to_a_running_step_wakes_it_as_it_parks_unless_it_timed_out(
    store: Arc<dyn Store>,
) {
    let (run, b) = at_the_wait_step(&*store).await;
    store
        .deliver_signal(&signal(&run, json!("yes")), T0 + 1)
        .await
        .unwrap();
    store
        .complete(vec![waiting_for_go(&b, T0 + 60_000)], T0 + 2)
        .await
        .unwrap();
    let woken = claim(&*store, T0 + 2, 1).await.remove(0);
    assert_eq!(woken.checkpoint.unwrap()["callback"], json!("yes"));

    // Another run, whose step runs past its deadline: it is failing by its timeout.
    let (late, b) = at_the_wait_step(&*store).await;
    store
        .complete(vec![waiting_for_go(&b, T0 + 10)], T0)
        .await
        .unwrap();
    let timing_out = claim(&*store, T0 + 10, 1).await.remove(0);
    assert_eq!(timing_out.lease.job_id, b.lease.job_id);
    let refused = store
        .deliver_signal(&signal(&late, json!("too late")), T0 + 11)
        .await
        .unwrap();
    assert!(
        matches!(&refused, SignalOutcome::NotWaiting(why) if why.contains("timed out")),
        "{refused:?}"
    );
    // It fails by its timeout and is retried: its next attempt waits again, and takes a signal
    // although the deadline its first attempt parked with is past.
    let retry = Completion {
        lease: timing_out.lease.clone(),
        settlement: Settlement::Retry {
            at: T0 + 20,
            error: "timeout".into(),
        },
        children: Vec::new(),
        logs: Vec::new(),
        artifacts: Vec::new(),
        usage: Vec::new(),
    };
    store.complete(vec![retry], T0 + 11).await.unwrap();
    let again = claim(&*store, T0 + LEASE * 10, 1).await.remove(0);
    assert_eq!(again.lease.attempt, 2);
    assert_eq!(
        store
            .deliver_signal(&signal(&late, json!("now")), T0 + LEASE * 10)
            .await
            .unwrap(),
        SignalOutcome::Delivered
    );
}

pub async fn a_signal_to_a_finished_step_or_a_missing_run_is_refused(store: Arc<dyn Store>) {
    let run = start(&*store, &gated(), Trigger::default()).await;
    store
        .deliver_signal(&signal(&run, json!(1)), T0)
        .await
        .unwrap();
    store.cancel_run(&run, T0).await.unwrap();
    let refused = store
        .deliver_signal(&signal(&run, Value::Null), T0 + 1)
        .await
        .unwrap();
    assert!(
        matches!(&refused, SignalOutcome::NotWaiting(why) if why.contains("cancelled")),
        "{refused:?}"
    );
    let missing = store
        .deliver_signal(&signal("no-such-run", Value::Null), T0 + 1)
        .await
        .unwrap();
    assert!(
        matches!(missing, SignalOutcome::NotWaiting(_)),
        "{missing:?}"
    );
}

/// The outside system may answer before its caller has parked: the result waits in the running
/// step and wakes it as it parks.
pub async fn callback_before_the_step_parks_wakes_it_as_it_parks(store: Arc<dyn Store>) {
    let (run, running) = running_under_token(&*store, "t1").await;
    let result = json!({ "output": 42 });
    assert!(
        store
            .deliver_callback(&answer(&run, "a", "t1", result.clone()), T0 + 1)
            .await
            .unwrap()
    );
    store
        .complete(vec![park_for_callback(&running, "t1", T0 + 60_000)], T0 + 2)
        .await
        .unwrap();
    let woken = claim(&*store, T0 + 2, 1).await.remove(0);
    assert_eq!(
        woken.checkpoint,
        Some(json!({ "callback_token": "t1", "callback": result }))
    );
    // Parked under another token (a new attempt's), the step does not take an old result.
    store
        .complete(vec![park_for_callback(&woken, "t2", T0 + 60_000)], T0 + 3)
        .await
        .unwrap();
    assert!(claim(&*store, T0 + 3, 1).await.is_empty());
}

/// A token belongs to one attempt: once the attempt ends another way than parking, a late
/// answer is refused, and the next attempt does not find it.
pub async fn callback_for_an_attempt_that_ended_is_refused(store: Arc<dyn Store>) {
    let (run, running) = running_under_token(&*store, "t1").await;
    let retry = Completion {
        lease: running.lease.clone(),
        settlement: Settlement::Retry {
            at: T0 + 1_000,
            error: "n8n answered 502".into(),
        },
        children: Vec::new(),
        logs: Vec::new(),
        artifacts: Vec::new(),
        usage: Vec::new(),
    };
    store.complete(vec![retry], T0).await.unwrap();
    assert!(
        !store
            .deliver_callback(&answer(&run, "a", "t1", json!({ "output": 1 })), T0 + 1)
            .await
            .unwrap()
    );
    let next = claim(&*store, T0 + 1_000, 1).await.remove(0);
    assert_eq!(next.lease.attempt, 2);
    assert_eq!(next.checkpoint, Some(json!({})));
}

/// A worker shutting down gives its step back within the same attempt: the step keeps an answer
/// it got meanwhile, and its token.
pub async fn a_step_given_back_keeps_its_callback(store: Arc<dyn Store>) {
    let (run, running) = running_under_token(&*store, "t1").await;
    let result = json!({ "event_id": "e1", "output": 7 });
    assert!(
        store
            .deliver_callback(&answer(&run, "a", "t1", result.clone()), T0 + 1)
            .await
            .unwrap()
    );
    let released = Completion {
        lease: running.lease.clone(),
        settlement: Settlement::Release,
        children: Vec::new(),
        logs: Vec::new(),
        artifacts: Vec::new(),
        usage: Vec::new(),
    };
    store.complete(vec![released], T0 + 2).await.unwrap();
    let again = claim(&*store, T0 + 2, 1).await.remove(0);
    assert_eq!(again.lease.attempt, 1);
    assert_eq!(
        again.checkpoint,
        Some(json!({ "callback_token": "t1", "callback": result }))
    );
}

/// A checkpoint may be any JSON value, not only an object.
pub async fn a_step_parked_with_a_scalar_checkpoint_settles(store: Arc<dyn Store>) {
    let run = start(&*store, &linear(), Trigger::default()).await;
    let job = claim(&*store, T0, 1).await.remove(0);
    store
        .complete(vec![park(&job, T0, json!(null))], T0)
        .await
        .unwrap();
    let woken = claim(&*store, T0, 1).await.remove(0);
    assert_eq!(
        store
            .complete(vec![done(&woken, json!(1))], T0)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(job_state(&*store, &run, "a").await, JobState::Succeeded);
}

fn tolerant() -> Workflow {
    workflow(
        "id: tolerant\nsteps:\n  - {id: a, type: noop, continue_on_error: true, retry: {max_retries: 0}}\n  - {id: b, type: noop, needs: [a]}\n",
    )
}

/// `a` ended succeeded with its error recorded and `{error}` as its output, and `b` runs.
async fn assert_tolerated(store: &dyn Store, run: &str, error: &str) {
    let detail = store.run(run).await.unwrap();
    let a = detail.steps.iter().find(|s| s.step_id == "a").unwrap();
    assert_eq!(a.state, JobState::Succeeded, "{detail:?}");
    assert!(
        a.error.as_deref().is_some_and(|e| e.contains(error)),
        "{detail:?}"
    );
    assert!(
        a.output
            .as_ref()
            .is_some_and(|o| o["error"].as_str().is_some_and(|e| e.contains(error))),
        "{detail:?}"
    );
    let b = claim(store, T0 + LEASE * 2, 1).await.remove(0);
    assert_eq!(b.step_id, "b");
    assert!(b.outputs["a"]["error"].is_string(), "{:?}", b.outputs);
    store
        .complete(vec![done(&b, Value::Null)], T0 + LEASE * 2)
        .await
        .unwrap();
    assert_eq!(run_status(store, run).await, RunStatus::Succeeded);
}

pub async fn a_step_that_continues_on_error_fails_alone_and_its_dependents_run(
    store: Arc<dyn Store>,
) {
    let run = start(&*store, &tolerant(), Trigger::default()).await;
    let a = claim(&*store, T0, 1).await.remove(0);
    // A failure as any path reports it (a worker's, a result the database refused): the store
    // knows the step continues on error.
    store.complete(vec![failed(&a, "boom")], T0).await.unwrap();
    assert_tolerated(&*store, &run, "boom").await;
}

pub async fn a_lost_last_attempt_of_a_step_that_continues_on_error_is_tolerated(
    store: Arc<dyn Store>,
) {
    let run = start(&*store, &tolerant(), Trigger::default()).await;
    claim(&*store, T0, 1).await;
    store.sweep(T0 + LEASE).await.unwrap();
    assert_tolerated(&*store, &run, "worker lost").await;
}

pub async fn a_workflow_step_that_continues_on_error_tolerates_a_failed_child(
    store: Arc<dyn Store>,
) {
    let child = workflow("id: child\nsteps:\n  - {id: only, type: noop}\n");
    let parent = workflow(
        "id: parent\nsteps:\n  - {id: a, type: workflow, continue_on_error: true, with: {workflows: [child, child]}}\n  - {id: b, type: noop, needs: [a]}\n",
    );
    let child_version = install(&*store, &child).await;
    let run = start(&*store, &parent, Trigger::default()).await;
    let fan = claim(&*store, T0, 1).await.remove(0);
    let children = park_with_children(&*store, &run, &fan, &child, child_version, 2).await;
    let jobs = claim(&*store, T0, 2).await;
    let first = jobs.iter().find(|j| j.run_id == children[0]).unwrap();
    store
        .complete(vec![failed(first, "child broke")], T0)
        .await
        .unwrap();
    assert_eq!(
        run_status(&*store, &children[1]).await,
        RunStatus::Cancelled,
        "the other child is of no use once its parent step has ended"
    );
    assert_tolerated(&*store, &run, "failed").await;
}

pub async fn workflow_step_succeeds_with_child_outputs_in_order(store: Arc<dyn Store>) {
    let child = workflow("id: child\nsteps:\n  - {id: only, type: noop}\n");
    let parent = workflow(
        "id: parent\nsteps:\n  - {id: fan, type: workflow, with: {workflows: [child, child]}}\n",
    );
    let child_version = install(&*store, &child).await;
    let run = start(&*store, &parent, Trigger::default()).await;
    let fan = claim(&*store, T0, 1).await.remove(0);
    park_with_children(&*store, &run, &fan, &child, child_version, 2).await;
    let jobs = claim(&*store, T0, 10).await;
    assert_eq!(jobs.len(), 2);
    // Finish them out of order: the output keeps the children's order.
    for (job, out) in jobs.iter().rev().zip(["second", "first"]) {
        store
            .complete(vec![done(job, json!(out))], T0)
            .await
            .unwrap();
    }
    let detail = store.run(&run).await.unwrap();
    assert_eq!(detail.summary.status, RunStatus::Succeeded);
    assert_eq!(
        detail.output,
        Some(json!({ "fan": [{ "only": "first" }, { "only": "second" }] }))
    );
}

pub async fn retry_reopens_failed_child_runs_and_keeps_the_succeeded_ones(store: Arc<dyn Store>) {
    let child = workflow("id: child\nsteps:\n  - {id: only, type: noop}\n");
    let parent = workflow(
        "id: parent\nsteps:\n  - {id: fan, type: workflow, with: {workflows: [child, child]}}\n  - {id: after, type: noop, needs: [fan]}\n",
    );
    let child_version = install(&*store, &child).await;
    let run = start(&*store, &parent, Trigger::default()).await;
    let fan = claim(&*store, T0, 1).await.remove(0);
    let children = park_with_children(&*store, &run, &fan, &child, child_version, 2).await;
    let (first_child, second_child) = (children[0].clone(), children[1].clone());
    let jobs = claim(&*store, T0, 10).await;
    let job_of = |run: &str| jobs.iter().find(|j| j.run_id == run).unwrap();
    store
        .complete(vec![done(job_of(&first_child), json!("first"))], T0)
        .await
        .unwrap();
    store
        .complete(vec![failed(job_of(&second_child), "boom")], T0)
        .await
        .unwrap();
    assert_eq!(run_status(&*store, &run).await, RunStatus::Failed);

    store.retry_run(&run, T0 + 1).await.unwrap();
    assert_eq!(run_status(&*store, &run).await, RunStatus::Running);
    assert_eq!(job_state(&*store, &run, "fan").await, JobState::Parked);
    assert_eq!(
        run_status(&*store, &first_child).await,
        RunStatus::Succeeded
    );
    assert_eq!(run_status(&*store, &second_child).await, RunStatus::Running);
    // Only the failed child's step runs again; the `workflow` step starts no new children.
    let again = claim(&*store, T0 + 1, 10).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].run_id, second_child);
    store
        .complete(vec![done(&again[0], json!("second"))], T0 + 2)
        .await
        .unwrap();
    let after = claim(&*store, T0 + 2, 10).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].step_id, "after");
    assert_eq!(
        after[0].outputs.get("fan"),
        Some(&json!([{ "only": "first" }, { "only": "second" }]))
    );
    store
        .complete(vec![done(&after[0], json!(null))], T0 + 2)
        .await
        .unwrap();
    assert_eq!(run_status(&*store, &run).await, RunStatus::Succeeded);
}

/// A webhook delivery's start of `wf`, under the idempotency key `key`.
fn keyed_start(wf: &Workflow, version: i64, key: &str) -> WebhookAction {
    let trigger = Trigger {
        idempotency_key: Some(key.into()),
        ..Trigger::default()
    };
    WebhookAction::Start(Box::new(
        plan_run(wf, version, Value::Null, trigger).unwrap(),
    ))
}

pub async fn a_webhook_event_is_logged_once_per_source_scope_and_id(store: Arc<dyn Store>) {
    let wf = linear();
    let version = install(&*store, &wf).await;
    let event = |id: &str, source: &str| NewWebhookEvent {
        source: source.into(),
        event_id: id.into(),
        workflow_id: Some("linear".into()),
        payload: json!({ "event_id": id }),
        ..NewWebhookEvent::default()
    };
    let start = |key: &str| keyed_start(&wf, version, key);
    let first = store
        .receive_webhook(event("e-1", "n8n"), start("n8n/e-1"), T0)
        .await
        .unwrap();
    let WebhookOutcome::Done { run_id, repeated } = first else {
        panic!("{first:?}")
    };
    assert!(!repeated);
    assert_eq!(run_status(&*store, &run_id).await, RunStatus::Running);
    let again = store
        .receive_webhook(event("e-1", "n8n"), start("n8n/e-1"), T0 + 1)
        .await
        .unwrap();
    assert_eq!(
        again,
        WebhookOutcome::Done {
            run_id: run_id.clone(),
            repeated: true
        },
        "a repeated delivery starts nothing"
    );
    assert_eq!(
        store
            .list_runs(&RunFilter {
                limit: 10,
                ..RunFilter::default()
            })
            .await
            .unwrap()
            .len(),
        1
    );
    // The same id with another body is a mistake to report, not a repeat.
    let other_body = NewWebhookEvent {
        payload: json!({ "event_id": "e-1", "changed": true }),
        ..event("e-1", "n8n")
    };
    assert_eq!(
        store
            .receive_webhook(other_body, start("n8n/e-1"), T0 + 1)
            .await
            .unwrap(),
        WebhookOutcome::OtherBody
    );
    // The same id from another source is another event. Refused, it is tried again when it
    // comes again (its cause may be fixed): only an accepted delivery is final.
    let refused = WebhookAction::Refuse("no such workflow".into());
    assert_eq!(
        store
            .receive_webhook(event("e-1", "stripe"), refused.clone(), T0 + 2)
            .await
            .unwrap(),
        WebhookOutcome::Refused("no such workflow".into())
    );
    let retried = store
        .receive_webhook(event("e-1", "stripe"), start("stripe/e-1"), T0 + 3)
        .await
        .unwrap();
    let WebhookOutcome::Done {
        run_id: stripe_run,
        repeated: false,
    } = retried
    else {
        panic!("{retried:?}")
    };
    assert_ne!(stripe_run, run_id);
    // An answer is deduplicated among its step's answers, apart from the starts: the id of
    // the delivery that started the run reaches the step.
    let answer_to_a = |token: &str| {
        (
            NewWebhookEvent {
                scope: format!("{run_id}/a"),
                ..event("e-1", "n8n")
            },
            WebhookAction::Answer(answer(&run_id, "a", token, json!({ "output": 1 }))),
        )
    };
    let (scoped, action) = answer_to_a("nobody");
    let outcome = store.receive_webhook(scoped, action, T0 + 3).await.unwrap();
    assert!(
        matches!(&outcome, WebhookOutcome::Refused(why) if why.contains("waits")),
        "taken as its own event: {outcome:?}"
    );
    // An answer no step waits for is refused, and logged so.
    let answer = WebhookAction::Answer(answer(&run_id, "a", "nobody", json!({ "output": 1 })));
    let not_waiting = store
        .receive_webhook(event("e-2", "n8n"), answer, T0 + 4)
        .await
        .unwrap();
    assert!(
        matches!(not_waiting, WebhookOutcome::Refused(_)),
        "{not_waiting:?}"
    );

    let all = store.webhook_events(None, 10).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|e| (e.source.as_str(), e.event_id.as_str()))
            .collect::<Vec<_>>(),
        [
            ("n8n", "e-2"),
            ("n8n", "e-1"),
            ("stripe", "e-1"),
            ("n8n", "e-1")
        ],
        "newest first"
    );
    assert!(all[0].error.as_deref().is_some_and(|e| e.contains("waits")));
    assert!(all[1].error.as_deref().is_some_and(|e| e.contains("waits")));
    assert_eq!(all[2].run_id.as_deref(), Some(stripe_run.as_str()));
    assert_eq!(all[2].error, None, "accepted at last");
    assert_eq!(all[3].run_id.as_deref(), Some(run_id.as_str()));
    assert_eq!(all[3].payload, json!({ "event_id": "e-1" }));
    assert_eq!(all[3].received_at, T0);
    assert_eq!(
        store.webhook_events(Some("n8n"), 10).await.unwrap().len(),
        3
    );
}

pub async fn deliveries_in_one_batch_are_each_answered_and_a_repeat_in_it_starts_nothing(
    store: Arc<dyn Store>,
) {
    let wf = linear();
    let version = install(&*store, &wf).await;
    let event = |id: &str, body: Value| NewWebhookEvent {
        source: "hook:in".into(),
        event_id: id.into(),
        workflow_id: Some("linear".into()),
        payload: body,
        ..NewWebhookEvent::default()
    };
    let start = |key: &str| keyed_start(&wf, version, key);
    let outcomes = store
        .receive_webhooks(
            vec![
                (event("a", json!(1)), start("hook:in/a")),
                (event("b", json!(2)), WebhookAction::Refuse("no".into())),
                (event("a", json!(1)), start("hook:in/a")),
                (event("a", json!(9)), start("hook:in/a")),
                (event("c", json!(3)), start("hook:in/c")),
            ],
            T0,
        )
        .await
        .unwrap();
    let WebhookOutcome::Done {
        run_id: a,
        repeated: false,
    } = &outcomes[0]
    else {
        panic!("{outcomes:?}")
    };
    assert_eq!(outcomes[1], WebhookOutcome::Refused("no".into()));
    assert_eq!(
        outcomes[2],
        WebhookOutcome::Done {
            run_id: a.clone(),
            repeated: true
        }
    );
    assert_eq!(outcomes[3], WebhookOutcome::OtherBody);
    assert!(
        matches!(&outcomes[4], WebhookOutcome::Done { run_id, repeated: false } if run_id != a),
        "{outcomes:?}"
    );
    let runs = store
        .list_runs(&RunFilter {
            limit: 10,
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(runs.len(), 2, "one run per event");
    let logged = store.webhook_events(Some("hook:in"), 10).await.unwrap();
    assert_eq!(logged.len(), 3, "each event logged once");
    // Delivered again in a later batch: the same runs, nothing new.
    let again = store
        .receive_webhooks(vec![(event("a", json!(1)), start("hook:in/a"))], T0 + 1)
        .await
        .unwrap();
    assert_eq!(
        again[0],
        WebhookOutcome::Done {
            run_id: a.clone(),
            repeated: true
        }
    );
}

pub async fn a_webhook_event_delivered_twice_at_once_starts_one_run(store: Arc<dyn Store>) {
    let wf = linear();
    let version = install(&*store, &wf).await;
    let deliver = || {
        let store = store.clone();
        let run = plan_run(
            &wf,
            version,
            Value::Null,
            Trigger {
                idempotency_key: Some("n8n/twice".into()),
                ..Trigger::default()
            },
        )
        .unwrap();
        async move {
            let event = NewWebhookEvent {
                source: "n8n".into(),
                event_id: "twice".into(),
                workflow_id: Some("linear".into()),
                payload: json!({}),
                ..NewWebhookEvent::default()
            };
            store
                .receive_webhook(event, WebhookAction::Start(Box::new(run)), T0)
                .await
                .unwrap()
        }
    };
    let (a, b) = tokio::join!(tokio::spawn(deliver()), tokio::spawn(deliver()));
    let runs: Vec<WebhookOutcome> = vec![a.unwrap(), b.unwrap()];
    let ids: std::collections::BTreeSet<String> = runs
        .iter()
        .map(|o| match o {
            WebhookOutcome::Done { run_id, .. } => run_id.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(ids.len(), 1, "{runs:?}");
}

pub async fn a_fire_creates_exactly_one_run_with_two_schedulers(store: Arc<dyn Store>) {
    let wf = linear();
    let version = install(&*store, &wf).await;
    let fire = || FireParams {
        workflow_id: wf.id.clone(),
        fire_at: T0,
        skip_if_active: false,
        run: planned(version, &wf),
    };
    let (first, second) = tokio::join!(store.fire(fire(), T0), store.fire(fire(), T0));
    let outcomes = [first.unwrap(), second.unwrap()];
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| matches!(o, FireOutcome::Started(_)))
            .count(),
        1
    );
    assert!(outcomes.contains(&FireOutcome::AlreadyRecorded));
    let runs = store
        .list_runs(&RunFilter {
            limit: 10,
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(runs.len(), 1);
}

pub async fn overlapping_fire_is_skipped_with_its_reason(store: Arc<dyn Store>) {
    let wf = linear();
    let version = install(&*store, &wf).await;
    for at in [T0, T0 + 1] {
        store
            .fire(
                FireParams {
                    workflow_id: wf.id.clone(),
                    fire_at: at,
                    skip_if_active: true,
                    run: planned(version, &wf),
                },
                at,
            )
            .await
            .unwrap();
    }
    let fires = store.fires(Some("linear"), 10).await.unwrap();
    assert_eq!(fires.len(), 2);
    let skipped = fires.iter().find(|f| f.fire_at == T0 + 1).unwrap();
    assert!(skipped.skipped_reason.as_ref().unwrap().contains("overlap"));
}

pub async fn paused_workflow_fires_are_recorded_as_skipped(store: Arc<dyn Store>) {
    let wf = linear();
    let version = install(&*store, &wf).await;
    store.set_paused("linear", true, T0).await.unwrap();
    let outcome = store
        .fire(
            FireParams {
                workflow_id: wf.id.clone(),
                fire_at: T0,
                skip_if_active: false,
                run: planned(version, &wf),
            },
            T0,
        )
        .await
        .unwrap();
    assert_eq!(outcome, FireOutcome::Skipped("paused".into()));
    assert!(store.workflows().await.unwrap()[0].paused);
    assert!(matches!(
        store.set_paused("ghost", true, T0).await,
        Err(StoreError::NotFound(_))
    ));
}

/// What a table test does to a job.
#[derive(Debug, Clone, Copy)]
enum Event {
    /// Its worker reports success, under the lease the job last had.
    Complete,
    /// A worker claims whatever is due.
    Claim,
    /// Its run is cancelled.
    Cancel,
    /// The sweep runs after every lease has expired.
    Sweep,
}

/// Puts the first job of a new run of `pair` (a → b) in `state` (for `waiting`, the second);
/// returns the run, the step and the lease that job last had (a made-up one if none).
async fn job_in_state(
    store: &dyn Store,
    pair: &Workflow,
    state: JobState,
) -> (String, &'static str, switchyard_engine::store::Lease) {
    let run = start(store, pair, Trigger::default()).await;
    let step = if state == JobState::Waiting { "b" } else { "a" };
    let job_id = store
        .run(&run)
        .await
        .unwrap()
        .steps
        .iter()
        .find(|j| j.step_id == step)
        .unwrap()
        .id;
    let leased = matches!(
        state,
        JobState::Running
            | JobState::Retrying
            | JobState::Parked
            | JobState::Succeeded
            | JobState::Failed
            | JobState::Skipped
    );
    let lease = if leased {
        claim(store, T0, 1_000)
            .await
            .into_iter()
            .find(|j| j.lease.job_id == job_id)
            .expect("the new run's job is claimed")
            .lease
    } else {
        switchyard_engine::store::Lease {
            job_id,
            attempt: 0,
            token: "never-leased".into(),
        }
    };
    let settle = |settlement| {
        let lease = lease.clone();
        async move {
            store
                .complete(
                    vec![Completion {
                        lease,
                        settlement,
                        children: Vec::new(),
                        logs: Vec::new(),
                        artifacts: Vec::new(),
                        usage: Vec::new(),
                    }],
                    T0,
                )
                .await
                .unwrap()
        }
    };
    let later = T0 + 10_000;
    match state {
        JobState::Retrying => {
            settle(Settlement::Retry {
                at: later,
                error: "again".into(),
            })
            .await;
        }
        JobState::Parked => {
            settle(Settlement::Park {
                until: Some(later),
                checkpoint: json!({}),
            })
            .await;
        }
        JobState::Succeeded => {
            settle(Settlement::Succeed { output: json!(1) }).await;
        }
        JobState::Failed => {
            settle(Settlement::Fail {
                error: "broken".into(),
            })
            .await;
        }
        JobState::Cancelled => {
            store.cancel_run(&run, T0).await.unwrap();
        }
        JobState::Skipped => {
            settle(Settlement::Skip {
                reason: "when rendered false".into(),
            })
            .await;
        }
        JobState::Waiting | JobState::Available | JobState::Running => {}
    }
    assert_eq!(
        job_state(store, &run, step).await,
        state,
        "set-up of {state}"
    );
    (run, step, lease)
}

/// Every job state meets every event, on the real store, and the state that follows is the
/// one the transition table allows: drift between a driver and the table shows here.
pub async fn every_job_state_meets_every_event_as_the_table_says(store: Arc<dyn Store>) {
    let pair = workflow(
        "id: pair\nretry: {max_retries: 3}\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, needs: [a]}\n",
    );
    let due = T0 + 20_000;
    for &from in JobState::ALL {
        for event in [Event::Complete, Event::Claim, Event::Cancel, Event::Sweep] {
            let (run, step, lease) = job_in_state(&*store, &pair, from).await;
            let expected = match event {
                Event::Complete => {
                    let accepted = store
                        .complete(vec![done_with(&lease, json!(2))], T0 + 1)
                        .await
                        .unwrap();
                    assert_eq!(
                        !accepted.is_empty(),
                        from == JobState::Running,
                        "{from}: completion accepted"
                    );
                    if from == JobState::Running {
                        JobState::Succeeded
                    } else {
                        from
                    }
                }
                Event::Claim => {
                    let claimed = claim(&*store, due, 1_000).await;
                    let ours = claimed.iter().any(|j| j.run_id == run && j.step_id == step);
                    assert_eq!(ours, JobState::CLAIMABLE.contains(&from), "{from}: claimed");
                    if ours { JobState::Running } else { from }
                }
                Event::Cancel => {
                    store.cancel_run(&run, T0 + 1).await.unwrap();
                    if JobState::OPEN.contains(&from) {
                        JobState::Cancelled
                    } else {
                        from
                    }
                }
                Event::Sweep => {
                    store.sweep(due + LEASE).await.unwrap();
                    if from == JobState::Running {
                        JobState::Retrying
                    } else {
                        from
                    }
                }
            };
            let to = job_state(&*store, &run, step).await;
            assert_eq!(to, expected, "{from} + {event:?}");
            assert!(
                to == from || from.can_become(to),
                "{from} + {event:?} became {to}, which the table forbids"
            );
        }
    }
}

fn done_with(lease: &switchyard_engine::store::Lease, output: Value) -> Completion {
    Completion {
        lease: lease.clone(),
        settlement: Settlement::Succeed { output },
        children: Vec::new(),
        logs: Vec::new(),
        artifacts: Vec::new(),
        usage: Vec::new(),
    }
}

pub async fn a_fire_of_a_removed_workflow_is_skipped_as_removed(store: Arc<dyn Store>) {
    let wf = linear();
    let version = install(&*store, &wf).await;
    store.remove_workflow("linear", false).await.unwrap();
    let outcome = store
        .fire(
            FireParams {
                workflow_id: wf.id.clone(),
                fire_at: T0,
                skip_if_active: true,
                run: planned(version, &wf),
            },
            T0,
        )
        .await
        .unwrap();
    assert_eq!(outcome, FireOutcome::Skipped("removed".into()));
    let runs = store
        .list_runs(&RunFilter {
            limit: 10,
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert!(runs.is_empty(), "{runs:?}");
}

pub async fn concurrency_key_holds_runs_until_a_slot_frees(store: Arc<dyn Store>) {
    let wf = workflow(
        "id: keyed\nconcurrency: {limit: 1, key: \"{{ input.region }}\"}\nsteps:\n  - {id: a, type: noop}\n",
    );
    let version = install(&*store, &wf).await;
    let make = |region: &str| {
        plan_run(
            &wf,
            version,
            json!({ "region": region }),
            Trigger::default(),
        )
        .unwrap()
    };
    let ids = store
        .create_runs(vec![make("us"), make("us"), make("de")], T0)
        .await
        .unwrap();
    assert_eq!(run_status(&*store, &ids[1]).await, RunStatus::Pending);
    let jobs = claim(&*store, T0, 10).await;
    assert_eq!(jobs.len(), 2, "one us run and the de run");
    let us = jobs.iter().find(|j| j.run_id == ids[0]).unwrap();
    store
        .complete(vec![done(us, Value::Null)], T0)
        .await
        .unwrap();
    assert_eq!(run_status(&*store, &ids[1]).await, RunStatus::Running);
    assert_eq!(claim(&*store, T0, 10).await[0].run_id, ids[1]);
}

/// Whether the store's wake-up fires within a second; consumes it.
async fn woken(store: &dyn Store) -> bool {
    tokio::time::timeout(std::time::Duration::from_secs(1), store.wakeup().notified())
        .await
        .is_ok()
}

pub async fn a_gate_that_opens_wakes_the_workers(store: Arc<dyn Store>) {
    let wf = workflow("id: gated\ntimeout: 1s\nconcurrency: 1\nsteps:\n  - {id: a, type: noop}\n");
    let version = install(&*store, &wf).await;
    // (A run's timeout counts from its creation, waiting included.)
    let mut ids = store
        .create_runs(vec![planned(version, &wf), planned(version, &wf)], T0)
        .await
        .unwrap();
    assert_eq!(run_status(&*store, &ids[1]).await, RunStatus::Pending);
    while woken(&*store).await {}
    // A cancel frees the slot: the next run starts, and workers hear of its job.
    store.cancel_run(&ids[0], T0 + 500).await.unwrap();
    assert_eq!(run_status(&*store, &ids[1]).await, RunStatus::Running);
    assert!(
        woken(&*store).await,
        "a cancel that opened the gate woke no one"
    );
    // So does a run that times out.
    ids.extend(
        store
            .create_runs(vec![planned(version, &wf)], T0 + 1_000)
            .await
            .unwrap(),
    );
    while woken(&*store).await {}
    store.sweep(T0 + 1_600).await.unwrap();
    assert_eq!(run_status(&*store, &ids[1]).await, RunStatus::TimedOut);
    assert_eq!(run_status(&*store, &ids[2]).await, RunStatus::Running);
    assert!(
        woken(&*store).await,
        "a timeout that opened the gate woke no one"
    );
}

pub async fn idempotency_key_returns_the_first_run(store: Arc<dyn Store>) {
    let trigger = Trigger {
        idempotency_key: Some("order-7".into()),
        ..Trigger::default()
    };
    let first = start(&*store, &linear(), trigger.clone()).await;
    let second = start(&*store, &linear(), trigger).await;
    assert_eq!(first, second);
}

pub async fn a_reused_idempotency_key_with_another_input_is_a_conflict(store: Arc<dyn Store>) {
    let trigger = Trigger {
        idempotency_key: Some("order-8".into()),
        ..Trigger::default()
    };
    let version = install(&*store, &linear()).await;
    let with = |input: Value| plan_run(&linear(), version, input, trigger.clone()).unwrap();
    let first = store
        .create_runs(vec![with(json!({"amount": 5}))], T0)
        .await
        .unwrap();
    let again = store
        .create_runs(vec![with(json!({"amount": 5}))], T0)
        .await
        .unwrap();
    assert_eq!(first, again, "the same input is the same request");
    let other = store
        .create_runs(vec![with(json!({"amount": 6}))], T0)
        .await
        .unwrap_err();
    assert!(
        matches!(&other, StoreError::Conflict(m) if m.contains(&first[0])),
        "{other:?}"
    );
    let all = RunFilter {
        limit: 10,
        ..RunFilter::default()
    };
    let runs = store.list_runs(&all).await.unwrap();
    assert_eq!(runs.len(), 1, "the refused start changed nothing");

    // What counts is the request as sent: a new version's defaults change the run's input, not
    // what an honest retry asks for.
    let mut changed = linear();
    changed.inputs.insert("region".into(), json!("eu"));
    let version = install(&*store, &changed).await;
    let retried = plan_run(&changed, version, json!({"amount": 5}), trigger.clone()).unwrap();
    assert_eq!(store.create_runs(vec![retried], T0).await.unwrap(), first);
}

pub async fn runs_are_found_by_the_start_of_their_id(store: Arc<dyn Store>) {
    let first = start(&*store, &linear(), Trigger::default()).await;
    let second = start(&*store, &linear(), Trigger::default()).await;
    let common = first
        .chars()
        .zip(second.chars())
        .take_while(|(a, b)| a == b)
        .count();
    let both = store.run_ids_starting(&first[..common], 10).await.unwrap();
    let mut expected = vec![first.clone(), second.clone()];
    expected.sort();
    assert_eq!(both, expected);
    assert_eq!(
        store
            .run_ids_starting(&first[..common + 1], 10)
            .await
            .unwrap(),
        std::slice::from_ref(&first)
    );
    assert_eq!(store.run_ids_starting(&first, 10).await.unwrap(), [first]);
    assert!(
        store
            .run_ids_starting("ffffffff", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn run_keeps_the_version_it_started_with(store: Arc<dyn Store>) {
    let run = start(&*store, &linear(), Trigger::default()).await;
    let mut changed = linear();
    changed.name = Some("changed".into());
    assert_eq!(install(&*store, &changed).await, 2);
    assert_eq!(
        install(&*store, &changed).await,
        2,
        "unchanged: same version"
    );
    assert_eq!(store.run(&run).await.unwrap().summary.version, 1);
    let job = claim(&*store, T0, 1).await.remove(0);
    assert_eq!(job.version, 1);
}

fn printed(completion: Completion, text: &str) -> Completion {
    Completion {
        logs: vec![LogLine {
            at: T0,
            stream: "stdout".into(),
            text: text.into(),
        }],
        ..completion
    }
}

pub async fn the_last_lines_of_a_run_are_read_oldest_first(store: Arc<dyn Store>) {
    let wf = workflow("id: chatty\nsteps:\n  - {id: a, type: noop}\n");
    let run = start(&*store, &wf, Trigger::default()).await;
    let job = claim(&*store, T0, 1).await.remove(0);
    let lines: Vec<LogLine> = (0..5)
        .map(|n| LogLine {
            at: T0 + n,
            stream: "stdout".into(),
            text: format!("line {n}"),
        })
        .collect();
    store
        .complete(
            vec![Completion {
                logs: lines,
                ..done(&job, Value::Null)
            }],
            T0 + 10,
        )
        .await
        .unwrap();
    let last = store.last_step_logs(&run, 2).await.unwrap();
    let texts: Vec<&str> = last.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts, ["line 3", "line 4"]);
    assert_eq!(store.last_step_logs(&run, 10).await.unwrap().len(), 5);
    assert!(
        store
            .last_step_logs("no-such-run", 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn an_attempts_lines_are_kept_only_with_its_accepted_settlement(store: Arc<dyn Store>) {
    let wf = workflow("id: short\nretention: 1h\nsteps:\n  - {id: a, type: noop}\n");
    let run = start(&*store, &wf, Trigger::default()).await;
    let first = claim(&*store, T0, 1).await.remove(0);
    store.sweep(T0 + LEASE + 1).await.unwrap();
    let second = claim(&*store, T0 + LEASE + 2, 1).await.remove(0);
    let late = store
        .complete(
            vec![printed(done(&first, json!(1)), "late")],
            T0 + LEASE + 3,
        )
        .await
        .unwrap();
    assert!(late.is_empty());
    store
        .complete(
            vec![printed(done(&second, json!(2)), "kept\0 with a NUL")],
            T0 + LEASE + 4,
        )
        .await
        .unwrap();
    let lines = store.step_logs(&run, None, 10).await.unwrap();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0].step_id, "a");
    assert_eq!(lines[0].attempt, 2);
    assert_eq!(lines[0].stream, "stdout");
    assert_eq!(lines[0].text, "kept\u{fffd} with a NUL");
    assert!(
        store
            .step_logs(&run, Some(lines[0].id), 10)
            .await
            .unwrap()
            .is_empty()
    );
    store.prune(T0 + LEASE + 4 + 3_600_000, 100).await.unwrap();
    assert!(
        store.step_logs(&run, None, 10).await.unwrap().is_empty(),
        "pruned with the run"
    );
}

pub async fn lines_stored_while_a_step_runs_are_kept_only_under_its_lease(store: Arc<dyn Store>) {
    let run = start(&*store, &linear(), Trigger::default()).await;
    let first = claim(&*store, T0, 1).await.remove(0);
    let line = |text: &str| LogLine {
        at: T0,
        stream: "stdout".into(),
        text: text.into(),
    };
    assert!(
        store
            .append_live_logs(&first.lease, &[line("one"), line("two")])
            .await
            .unwrap()
    );
    let forged = switchyard_engine::store::Lease {
        token: "forged".into(),
        ..first.lease.clone()
    };
    assert!(
        !store
            .append_live_logs(&forged, &[line("forged")])
            .await
            .unwrap()
    );
    store.sweep(T0 + LEASE + 1).await.unwrap();
    let second = claim(&*store, T0 + LEASE + 2, 1).await.remove(0);
    assert!(
        !store
            .append_live_logs(&first.lease, &[line("late")])
            .await
            .unwrap(),
        "the first attempt lost its job"
    );
    assert!(
        store
            .append_live_logs(&second.lease, &[line("three")])
            .await
            .unwrap()
    );
    store
        .complete(
            vec![printed(done(&second, json!(2)), "four")],
            T0 + LEASE + 3,
        )
        .await
        .unwrap();
    let lines = store.step_logs(&run, None, 10).await.unwrap();
    let seen: Vec<(i32, &str)> = lines.iter().map(|l| (l.attempt, l.text.as_str())).collect();
    assert_eq!(seen, [(1, "one"), (1, "two"), (2, "three"), (2, "four")]);
    assert!(lines.iter().all(|l| l.step_id == "a"));
}

pub async fn a_run_that_ends_writes_its_notification_and_one_sender_at_a_time_delivers_it(
    store: Arc<dyn Store>,
) {
    let wf = workflow(
        "id: told\nnotifications: {onSuccess: true, onFailure: true, webhookUrl: 'https://receiver.test/hook'}\n\
         steps:\n  - {id: a, type: noop}\n",
    );
    let run = start(&*store, &wf, Trigger::default()).await;
    assert!(store.notifications(None, 10).await.unwrap().is_empty());
    let job = claim(&*store, T0, 1).await.remove(0);
    store
        .complete(vec![done(&job, json!({"n": 1}))], T0 + 5)
        .await
        .unwrap();
    // Written with the run's end, in its transaction.
    let listed = store.notifications(None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].run_id, run);
    assert_eq!(listed[0].run_status, RunStatus::Succeeded);
    assert_eq!(listed[0].status, NotificationStatus::Pending);
    assert_eq!(listed[0].url, "https://receiver.test/hook");
    assert_eq!(store.notification_counts().await.unwrap(), (1, 0));

    let first = store.hold_notifications(T0 + 5, 60_000, 10).await.unwrap();
    assert_eq!(first.notifications.len(), 1);
    let held = &first.notifications[0];
    assert_eq!(
        held.output.as_ref().map(|o| &o.0),
        Some(&json!({"a": {"n": 1}}))
    );
    assert_eq!(held.finished_at, Some(T0 + 5));
    assert!(
        store
            .hold_notifications(T0 + 6, 60_000, 10)
            .await
            .unwrap()
            .notifications
            .is_empty(),
        "a second sender gets nothing while the first holds it"
    );
    assert!(
        store
            .settle_notification(held, &first.token, Err("HTTP 503".into()), T0 + 10)
            .await
            .unwrap()
    );
    let after = &store.notifications(None, 10).await.unwrap()[0];
    assert_eq!(
        (after.status, after.attempts, after.next_at),
        (NotificationStatus::Pending, 1, T0 + 1_010)
    );
    assert_eq!(after.last_error.as_deref(), Some("HTTP 503"));
    assert!(
        store
            .hold_notifications(T0 + 1_009, 60_000, 10)
            .await
            .unwrap()
            .notifications
            .is_empty(),
        "not due before its retry"
    );
    let second = store
        .hold_notifications(T0 + 1_010, 60_000, 10)
        .await
        .unwrap();
    assert_eq!(
        second.notifications[0].event_id, held.event_id,
        "the same event"
    );
    assert!(
        !store
            .settle_notification(held, &first.token, Ok(()), T0 + 1_011)
            .await
            .unwrap(),
        "the first hold is over"
    );
    assert!(
        store
            .settle_notification(&second.notifications[0], &second.token, Ok(()), T0 + 1_012)
            .await
            .unwrap()
    );
    let delivered = &store
        .notifications(Some(NotificationStatus::Delivered), 10)
        .await
        .unwrap()[0];
    assert_eq!(delivered.delivered_at, Some(T0 + 1_012));
    assert_eq!(delivered.attempts, 2);
    assert_eq!(store.notification_counts().await.unwrap(), (0, 0));
}

pub async fn a_notification_carries_an_output_up_to_64_kib_and_says_when_it_left_one_out(
    store: Arc<dyn Store>,
) {
    let wf = workflow(
        "id: big\nnotifications: {on_success: true, webhook_url: 'https://receiver.test/b'}\n\
         steps:\n  - {id: a, type: noop}\n",
    );
    for (i, size) in [60_000, 70_000].into_iter().enumerate() {
        start(&*store, &wf, Trigger::default()).await;
        let job = claim(&*store, T0 + i as i64, 1).await.remove(0);
        store
            .complete(vec![done(&job, json!("x".repeat(size)))], T0 + i as i64)
            .await
            .unwrap();
    }
    let held = store.hold_notifications(T0 + 5, 60_000, 10).await.unwrap();
    let mut kept: Vec<(bool, bool)> = held
        .notifications
        .iter()
        .map(|n| (n.output.is_some(), n.output_omitted))
        .collect();
    kept.sort();
    assert_eq!(kept, [(false, true), (true, false)]);
}

pub async fn only_the_ends_a_workflow_asks_for_are_notified(store: Arc<dyn Store>) {
    let wf = workflow(
        "id: quiet\nnotifications: {on_failure: true, webhook_url: 'https://receiver.test/f'}\n\
         steps:\n  - {id: a, type: noop}\n",
    );
    start(&*store, &wf, Trigger::default()).await;
    let job = claim(&*store, T0, 1).await.remove(0);
    store
        .complete(vec![done(&job, Value::Null)], T0)
        .await
        .unwrap();
    assert!(store.notifications(None, 10).await.unwrap().is_empty());
    let failing = start(&*store, &wf, Trigger::default()).await;
    let job = claim(&*store, T0 + 1, 1).await.remove(0);
    store
        .complete(vec![failed(&job, "boom")], T0 + 1)
        .await
        .unwrap();
    let listed = store.notifications(None, 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].run_id, failing);
    assert_eq!(listed[0].run_status, RunStatus::Failed);
    // A path is where n8n calls back, not a receiver of notifications.
    let bridge = workflow(
        "id: bridge\nnotifications: {onSuccess: true, webhookUrl: /api/webhooks/n8n}\n\
         steps:\n  - {id: a, type: noop}\n",
    );
    start(&*store, &bridge, Trigger::default()).await;
    let job = claim(&*store, T0 + 2, 1).await.remove(0);
    store
        .complete(vec![done(&job, Value::Null)], T0 + 2)
        .await
        .unwrap();
    assert_eq!(store.notifications(None, 10).await.unwrap().len(), 1);
}

pub async fn finished_runs_are_pruned_after_retention(store: Arc<dyn Store>) {
    let wf = workflow("id: short\nretention: 1h\nsteps:\n  - {id: a, type: noop}\n");
    let run = start(&*store, &wf, Trigger::default()).await;
    let job = claim(&*store, T0, 1).await.remove(0);
    store
        .complete(vec![done(&job, Value::Null)], T0)
        .await
        .unwrap();
    assert_eq!(store.prune(T0 + 3_599_999, 100).await.unwrap(), 0);
    assert_eq!(store.prune(T0 + 3_600_000, 100).await.unwrap(), 1);
    assert!(matches!(
        store.run(&run).await,
        Err(StoreError::NotFound(_))
    ));
}

/// Bytes to store as a file.
fn file(
    text: &'static str,
) -> futures::stream::Once<futures::future::Ready<Result<bytes::Bytes, std::convert::Infallible>>> {
    futures::stream::once(futures::future::ready(Ok(bytes::Bytes::from_static(
        text.as_bytes(),
    ))))
}

pub async fn a_file_is_named_only_by_an_accepted_settlement_and_swept_once_no_run_names_it(
    store: Arc<dyn Store>,
) {
    use switchyard_engine::artifacts::{ArtifactError, Artifacts};
    let artifacts = Artifacts::in_memory(store.clone(), 16);
    let wf = workflow("id: files\nretention: 1h\nsteps:\n  - {id: a, type: noop}\n");
    let run = start(&*store, &wf, Trigger::default()).await;
    let first = claim(&*store, T0, 1).await.remove(0);
    let late = artifacts.save("audio/mpeg", file("late")).await.unwrap();
    store.sweep(T0 + LEASE + 1).await.unwrap();
    let second = claim(&*store, T0 + LEASE + 2, 1).await.remove(0);
    let kept = artifacts.save("audio/mpeg", file("kept")).await.unwrap();
    assert_eq!(kept.size, 4);
    assert_eq!(
        kept.sha256,
        "79f076abdd19a752db7267bfff2f9022161d120dea919fdaca2ffdfc24ca8c96"
    );
    let with_file =
        |job: &ClaimedJob, saved: &switchyard_engine::artifacts::ArtifactRef| Completion {
            artifacts: vec![saved.clone()],
            ..done(job, saved.to_output())
        };
    store
        .complete(
            vec![with_file(&first, &late), with_file(&second, &kept)],
            T0 + LEASE + 3,
        )
        .await
        .unwrap();
    assert_eq!(store.artifact(&kept.id).await.unwrap(), Some(kept.clone()));
    assert_eq!(
        store.artifact(&late.id).await.unwrap(),
        None,
        "its attempt lost the job"
    );
    assert!(matches!(
        artifacts.open_file(&late.id).await,
        Err(ArtifactError::NotFound(_))
    ));
    // Nothing is swept within its grace; after it, the file no row names. Files are dated by
    // the clock of where they are kept.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert_eq!(
        artifacts
            .sweep(now, std::time::Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        artifacts
            .sweep(now + 86_400_000 * 365 * 30, std::time::Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    let (_, bytes) = artifacts.open_file(&kept.id).await.unwrap();
    let read: Vec<bytes::Bytes> = futures::TryStreamExt::try_collect(bytes).await.unwrap();
    assert_eq!(read.concat(), b"kept");
    assert!(matches!(
        artifacts
            .save("audio/mpeg", file("seventeen bytes!!"))
            .await,
        Err(ArtifactError::TooLarge { limit: 16 })
    ));
    // Pruned with its run, then swept.
    assert_eq!(
        store.prune(T0 + LEASE + 3 + 3_600_000, 100).await.unwrap(),
        1
    );
    assert!(matches!(
        store.run(&run).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.artifact(&kept.id).await.unwrap(), None);
    assert_eq!(
        artifacts
            .sweep(now + 86_400_000 * 365 * 30, std::time::Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    assert!(artifacts.read(&kept.sha256).await.is_err());
}

pub async fn a_quota_lets_its_limit_through_then_gives_each_waiting_taker_its_own_turn(
    store: Arc<dyn Store>,
) {
    let per = std::time::Duration::from_secs(1);
    let takes = (0..20).map(|_| {
        let store = store.clone();
        async move { store.take_quota("openai", 10, per, T0).await.unwrap() }
    });
    let mut ats = futures::future::join_all(takes).await;
    ats.sort_unstable();
    let expected: Vec<Millis> = std::iter::repeat_n(T0, 10)
        .chain((1..=10).map(|i| T0 + i * 100))
        .collect();
    assert_eq!(
        ats, expected,
        "ten at once, then one every 100 ms, none twice"
    );
    // Another bucket is another limit.
    assert_eq!(store.take_quota("pinata", 1, per, T0).await.unwrap(), T0);
}

pub async fn usage_is_summed_per_provider_workflow_and_day_from_every_attempt(
    store: Arc<dyn Store>,
) {
    use switchyard_engine::store::{Usage, UsageFilter};
    let wf = workflow("id: spend\nsteps:\n  - {id: a, type: noop}\n");
    start(&*store, &wf, Trigger::default()).await;
    start(&*store, &wf, Trigger::default()).await;
    let jobs = claim(&*store, T0, 2).await;
    let spent = |tokens: u64, failed: bool| Usage {
        provider: "openai".into(),
        workflow_id: "spend".into(),
        requests: 1,
        errors: u64::from(failed),
        tokens,
        cost: tokens as f64 / 1e6,
        ..Usage::default()
    };
    let with_usage = |completion: Completion, usage: Vec<Usage>| Completion {
        usage,
        ..completion
    };
    // A forged lease is refused, but what its attempt spent was spent.
    let forged = switchyard_engine::store::Lease {
        token: "forged".into(),
        ..jobs[1].lease.clone()
    };
    store
        .complete(
            vec![
                with_usage(
                    done(&jobs[0], Value::Null),
                    vec![spent(20, false), spent(0, true)],
                ),
                with_usage(done_with(&forged, Value::Null), vec![spent(5, false)]),
            ],
            T0,
        )
        .await
        .unwrap();
    store
        .complete(
            vec![with_usage(
                done(&jobs[1], Value::Null),
                vec![spent(7, false)],
            )],
            T0 + 86_400_000,
        )
        .await
        .unwrap();
    let all = UsageFilter {
        limit: 10,
        ..UsageFilter::default()
    };
    let rows = store.usage(&all).await.unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let day = |at: Millis| {
        jiff::Timestamp::from_millisecond(at)
            .unwrap()
            .strftime("%Y-%m-%d")
            .to_string()
    };
    assert_eq!(
        (rows[0].day.clone(), rows[0].requests, rows[0].tokens),
        (day(T0 + 86_400_000), 1, 7)
    );
    assert_eq!(
        (
            rows[1].day.clone(),
            rows[1].requests,
            rows[1].errors,
            rows[1].tokens
        ),
        (day(T0), 3, 1, 25)
    );
    assert!((rows[1].cost - 25e-6).abs() < 1e-12);
    let one_day = UsageFilter {
        from: Some(day(T0)),
        to: Some(day(T0)),
        limit: 10,
        ..UsageFilter::default()
    };
    assert_eq!(store.usage(&one_day).await.unwrap().len(), 1);
    let other = UsageFilter {
        provider: Some("pinata".into()),
        limit: 10,
        ..UsageFilter::default()
    };
    assert!(store.usage(&other).await.unwrap().is_empty());
}

pub async fn a_batch_sent_again_after_its_commit_was_lost_counts_its_usage_once(
    store: Arc<dyn Store>,
) {
    use switchyard_engine::store::{Usage, UsageFilter};
    let wf = workflow("id: resent\nsteps:\n  - {id: a, type: noop}\n");
    start(&*store, &wf, Trigger::default()).await;
    let jobs = claim(&*store, T0, 1).await;
    let batch = vec![Completion {
        usage: vec![Usage {
            provider: "openai".into(),
            workflow_id: "resent".into(),
            requests: 1,
            tokens: 30,
            ..Usage::default()
        }],
        ..done(&jobs[0], Value::Null)
    }];
    let accepted = store.complete(batch.clone(), T0).await.unwrap();
    assert_eq!(accepted, vec![jobs[0].lease.job_id]);
    // The worker did not hear the commit and sends the same batch again.
    let again = store.complete(batch, T0 + 10).await.unwrap();
    assert!(again.is_empty(), "{again:?}");
    let all = UsageFilter {
        workflow_id: Some("resent".into()),
        limit: 10,
        ..UsageFilter::default()
    };
    let rows = store.usage(&all).await.unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| (r.requests, r.tokens))
            .collect::<Vec<_>>(),
        vec![(1, 30)]
    );
}

pub async fn old_fire_records_are_pruned_but_the_latest_stays(store: Arc<dyn Store>) {
    install(&*store, &linear()).await;
    for at in [T0, T0 + 1_000] {
        store
            .skip_fire(skipped("linear", at, "paused", false), at)
            .await
            .unwrap();
    }
    store.prune(T0 + 31 * 86_400_000, 100).await.unwrap();
    let fires = store.fires(Some("linear"), 10).await.unwrap();
    assert_eq!(fires.len(), 1);
    assert_eq!(fires[0].fire_at, T0 + 1_000);
}

fn skipped<'a>(
    workflow_id: &'a str,
    fire_at: Millis,
    reason: &'a str,
    refused: bool,
) -> SkippedFire<'a> {
    SkippedFire {
        workflow_id,
        fire_at,
        reason,
        refused,
    }
}

pub async fn a_refused_fire_is_recorded_once_with_an_alert_and_a_chosen_skip_without(
    store: Arc<dyn Store>,
) {
    install(&*store, &linear()).await;
    let why = "input of workflow linear does not satisfy its input_schema: at /: missing topic";
    assert!(
        store
            .skip_fire(skipped("linear", T0, why, true), T0)
            .await
            .unwrap()
    );
    // Another scheduler refusing the same fire records nothing more.
    assert!(
        !store
            .skip_fire(skipped("linear", T0, why, true), T0 + 1)
            .await
            .unwrap()
    );
    store
        .skip_fire(skipped("linear", T0 + 1_000, "paused", false), T0 + 1_000)
        .await
        .unwrap();
    let fires = store.fires(Some("linear"), 10).await.unwrap();
    assert_eq!(fires.len(), 2, "{fires:?}");
    assert!(fires.iter().all(|f| f.run_id.is_none()), "{fires:?}");
    assert_eq!(fires[1].skipped_reason.as_deref(), Some(why));
    let alerts = store.alerts(Some("linear"), 10).await.unwrap();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].kind, "fire_refused");
    assert_eq!(alerts[0].run_id, None);
    assert!(alerts[0].message.contains(why), "{alerts:?}");
}

pub async fn higher_priority_is_claimed_first_and_equal_priority_in_order(store: Arc<dyn Store>) {
    let wf = workflow("id: one\nsteps:\n  - {id: a, type: noop}\n");
    let version = install(&*store, &wf).await;
    let mut created: Vec<(i32, String)> = Vec::new();
    // Low first, then a backlog at the default, then urgent ones: each enqueued a moment later.
    let plan: Vec<i32> = [vec![-10; 3], vec![0; 200], vec![50, 10, 50, 10]].concat();
    for (n, priority) in plan.into_iter().enumerate() {
        let trigger = Trigger {
            priority: Some(priority),
            ..Trigger::default()
        };
        let run = plan_run(&wf, version, Value::Null, trigger).unwrap();
        let id = store
            .create_runs(vec![run], T0 + n as Millis)
            .await
            .unwrap()
            .remove(0);
        created.push((priority, id));
    }
    let now = T0 + 1_000;
    let order = |p: i32| -> Vec<String> {
        created
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, id)| id.clone())
            .collect()
    };
    // Which jobs a claim takes is what priority decides; a claim's jobs start together.
    let taken = |jobs: &[ClaimedJob]| -> BTreeSet<String> {
        jobs.iter().map(|j| j.run_id.clone()).collect()
    };
    let first = claim(&*store, now, 5).await;
    let expected: BTreeSet<String> = [order(50), order(10), order(0)[..1].to_vec()]
        .concat()
        .into_iter()
        .collect();
    assert_eq!(
        taken(&first),
        expected,
        "the highest first, then the oldest of the backlog"
    );
    let second = claim(&*store, now, 199).await;
    assert_eq!(
        taken(&second),
        order(0)[1..].iter().cloned().collect(),
        "the rest of the backlog before the lowest"
    );
    let last = claim(&*store, now, 1_000).await;
    assert_eq!(taken(&last), order(-10).into_iter().collect());

    // An urgent job not yet due waits; the backlog behind it is claimed meanwhile.
    let urgent = Trigger {
        priority: Some(100),
        ..Trigger::default()
    };
    let run = plan_run(&wf, version, Value::Null, urgent).unwrap();
    store.create_runs(vec![run], now).await.unwrap();
    let job = claim(&*store, now, 1).await.remove(0);
    store
        .complete(vec![failed(&job, "try later")], now)
        .await
        .unwrap();
    let normal = plan_run(&wf, version, Value::Null, Trigger::default()).unwrap();
    let normal = store
        .create_runs(vec![normal], now)
        .await
        .unwrap()
        .remove(0);
    let next = claim(&*store, now, 1).await;
    assert_eq!(next.len(), 1, "the retry is not due yet");
    assert_eq!(next[0].run_id, normal);
}

pub async fn batch_claim_takes_up_to_the_limit_oldest_first(store: Arc<dyn Store>) {
    let wf = workflow("id: one\nsteps:\n  - {id: a, type: noop}\n");
    let version = install(&*store, &wf).await;
    let runs: Vec<NewRun> = (0..250).map(|_| planned(version, &wf)).collect();
    let ids = store.create_runs(runs, T0).await.unwrap();
    let first = claim(&*store, T0, 100).await;
    assert_eq!(first.len(), 100);
    assert_eq!(store.queue_depth(T0).await.unwrap(), 150);
    let accepted = store
        .complete(first.iter().map(|j| done(j, Value::Null)).collect(), T0)
        .await
        .unwrap();
    assert_eq!(accepted.len(), 100);
    assert_eq!(run_status(&*store, &ids[0]).await, RunStatus::Succeeded);
    assert_eq!(claim(&*store, T0, 1_000).await.len(), 150);
}

/// Many runs whose steps finish in separate transactions at the same moment: each run must see
/// its other step's completion, however the transactions interleave.
pub async fn parallel_last_steps_completed_at_once_still_finish_the_run(store: Arc<dyn Store>) {
    let wf = workflow("id: pair\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop}\n");
    let version = install(&*store, &wf).await;
    let runs: Vec<NewRun> = (0..40).map(|_| planned(version, &wf)).collect();
    let ids = store.create_runs(runs, T0).await.unwrap();
    let jobs = claim(&*store, T0, 100).await;
    assert_eq!(jobs.len(), 80);
    let (a, b): (Vec<_>, Vec<_>) = jobs.iter().partition(|j| j.step_id == "a");
    let one_by_one = |jobs: Vec<&ClaimedJob>| {
        let store = store.clone();
        let jobs: Vec<Completion> = jobs.into_iter().map(|j| done(j, json!(1))).collect();
        tokio::spawn(async move {
            for c in jobs {
                store.complete(vec![c], T0).await.unwrap();
            }
        })
    };
    let (x, y) = tokio::join!(one_by_one(a), one_by_one(b));
    x.unwrap();
    y.unwrap();
    for id in ids {
        assert_eq!(
            run_status(&*store, &id).await,
            RunStatus::Succeeded,
            "run {id}"
        );
    }
}

/// Claimers racing for one backlog: every job is handed out exactly once.
pub async fn concurrent_claims_never_hand_out_a_job_twice(store: Arc<dyn Store>) {
    let wf = workflow("id: one\nsteps:\n  - {id: a, type: noop}\n");
    let version = install(&*store, &wf).await;
    let runs: Vec<NewRun> = (0..300).map(|_| planned(version, &wf)).collect();
    store.create_runs(runs, T0).await.unwrap();
    let claimers: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let jobs = claim(&*store, T0, 7).await;
                    if jobs.is_empty() {
                        return got;
                    }
                    got.extend(jobs.into_iter().map(|j| j.lease.job_id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for c in claimers {
        all.extend(c.await.unwrap());
    }
    let distinct: std::collections::BTreeSet<_> = all.iter().collect();
    assert_eq!(all.len(), 300);
    assert_eq!(distinct.len(), 300, "a job was claimed twice");
}

/// Children of one `workflow` step finishing in separate transactions at once: the parent step
/// settles when the last one lands, whichever it is.
pub async fn children_finishing_at_once_settle_their_parent(store: Arc<dyn Store>) {
    let child = workflow("id: child\nsteps:\n  - {id: only, type: noop}\n");
    let parent =
        workflow("id: parent\nsteps:\n  - {id: fan, type: workflow, with: {workflows: [child]}}\n");
    let child_version = install(&*store, &child).await;
    let mut parents = Vec::new();
    for _ in 0..10 {
        let run = start(&*store, &parent, Trigger::default()).await;
        let fan = claim(&*store, T0, 1).await.remove(0);
        park_with_children(&*store, &run, &fan, &child, child_version, 2).await;
        parents.push(run);
    }
    let jobs = claim(&*store, T0, 100).await;
    assert_eq!(jobs.len(), 20);
    let completions: Vec<_> = jobs
        .iter()
        .map(|j| {
            let store = store.clone();
            let c = done(j, json!("x"));
            tokio::spawn(async move { store.complete(vec![c], T0).await.unwrap() })
        })
        .collect();
    for c in completions {
        c.await.unwrap();
    }
    for run in parents {
        assert_eq!(
            run_status(&*store, &run).await,
            RunStatus::Succeeded,
            "run {run}"
        );
    }
}

fn nonce_request(chain_id: u64, owner: &str, floor: u64) -> NonceRequest {
    NonceRequest {
        filled: None,
        chain_id,
        address: "0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266".into(),
        owner: owner.into(),
        floor,
        job_id: None,
    }
}

pub async fn nonces_are_allocated_once_per_step_without_gaps_across_concurrent_workers(
    store: Arc<dyn Store>,
) {
    // 40 steps, each asking twice at once (its attempt and a retry after a crash), from as many
    // tasks as the runtime runs in parallel.
    let asks = (0..80).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            let owner = format!("run:step[{}]", i % 40);
            let got = store
                .allocate_nonce(&nonce_request(31337, &owner, 0), T0)
                .await
                .unwrap();
            (owner, got)
        })
    });
    let mut by_owner: std::collections::BTreeMap<String, Vec<NonceAllocation>> = Default::default();
    for ask in asks {
        let (owner, got) = ask.await.unwrap();
        by_owner.entry(owner).or_default().push(got);
    }
    let mut nonces = BTreeSet::new();
    for (owner, mut got) in by_owner {
        got.sort_by_key(|a| matches!(a, NonceAllocation::Again(_)));
        let [NonceAllocation::New(first), NonceAllocation::Again(again)] = got[..] else {
            panic!("{owner} was given {got:?}, not one new nonce and the same again");
        };
        assert_eq!(first, again, "{owner}");
        assert!(nonces.insert(first), "nonce {first} given twice");
    }
    assert_eq!(
        nonces,
        (0..40).collect(),
        "every nonce from 0 given once, none skipped"
    );
}

pub async fn a_nonce_is_at_least_the_nodes_pending_one_and_a_spent_one_is_never_given_again(
    store: Arc<dyn Store>,
) {
    let ask = |chain_id, owner, floor| {
        let store = store.clone();
        async move {
            store
                .allocate_nonce(&nonce_request(chain_id, owner, floor), T0)
                .await
                .unwrap()
        }
    };
    // The key sent 5 transactions elsewhere: the first step takes 5.
    assert_eq!(ask(1, "r:a", 5).await, NonceAllocation::New(5));
    // Records past any retention are pruned; a step's nonce is not (a run retried months later
    // must find it, or it would sign a second transaction).
    store.prune(T0 + 400 * 86_400_000, 100).await.unwrap();
    // The node has not seen 5 yet: the next step still takes 6, not the node's 5.
    assert_eq!(ask(1, "r:b", 5).await, NonceAllocation::New(6));
    // A crashed attempt asks again before its transaction reached the node.
    assert_eq!(ask(1, "r:a", 5).await, NonceAllocation::Again(5));
    // The node saw nonce 5 used since: the step must not sign another transaction.
    assert_eq!(ask(1, "r:a", 6).await, NonceAllocation::Spent(5));
    // Used elsewhere far ahead: the next step jumps to the node's nonce.
    assert_eq!(ask(1, "r:c", 20).await, NonceAllocation::New(20));
    assert_eq!(ask(1, "r:d", 0).await, NonceAllocation::New(21));
    // Each chain and each address counts on its own.
    assert_eq!(ask(8453, "r:a", 0).await, NonceAllocation::New(0));
    let other = NonceRequest {
        address: "0x70997970c51812dc3a010c7d01b50e0d17dc79c8".into(),
        ..nonce_request(1, "r:e", 0)
    };
    assert_eq!(
        store.allocate_nonce(&other, T0).await.unwrap(),
        NonceAllocation::New(0)
    );
}

pub async fn a_nonce_a_cancelled_step_never_sent_is_filled_by_the_step_waiting_above_it(
    store: Arc<dyn Store>,
) {
    use switchyard_engine::store::NONCE_GAP_GRACE;
    let one = workflow("id: one\nsteps:\n  - {id: send, type: noop}\n");
    let mut runs = Vec::new();
    let mut jobs = Vec::new();
    for _ in 0..3 {
        runs.push(start(&*store, &one, Trigger::default()).await);
        jobs.push(claim(&*store, T0, 1).await.remove(0).lease.job_id);
    }
    let allocate = |i: usize, floor: u64| {
        let (store, owner, job) = (store.clone(), format!("{}:send", runs[i]), jobs[i]);
        async move {
            let request = NonceRequest {
                job_id: Some(job),
                ..nonce_request(1, &owner, floor)
            };
            store.allocate_nonce(&request, T0).await.unwrap()
        }
    };
    let fill = |nonce: u64, job: JobId, at: Millis| {
        let store = store.clone();
        async move {
            let gap = NonceGap {
                chain_id: 1,
                address: nonce_request(1, "", 0).address,
                nonce,
                job_id: job,
            };
            store.fill_nonce_gap(&gap, at).await.unwrap()
        }
    };
    let late = T0 + NONCE_GAP_GRACE;
    assert_eq!(allocate(0, 0).await, NonceAllocation::New(0));
    assert_eq!(allocate(1, 0).await, NonceAllocation::New(1));
    // The first step has signed and not yet sent: its nonce stays its own while it may.
    assert_eq!(fill(0, jobs[1], late).await, GapFill::Wait);
    // Its run is cancelled before it sends; once its task has surely stopped, the step waiting
    // with nonce 1 fills 0.
    store.cancel_run(&runs[0], T0).await.unwrap();
    assert_eq!(fill(0, jobs[1], T0 + 1).await, GapFill::Wait);
    assert_eq!(fill(0, jobs[1], late).await, GapFill::Fill);
    // It asks again after a crash and keeps it; another waiting step does not take it from it.
    assert_eq!(fill(0, jobs[1], late).await, GapFill::Fill);
    assert_eq!(allocate(2, 0).await, NonceAllocation::New(2));
    assert_eq!(fill(0, jobs[2], late).await, GapFill::Wait);
    // A filler whose job ended leaves its gap to the next step that asks.
    store.cancel_run(&runs[1], T0).await.unwrap();
    assert_eq!(fill(0, jobs[2], late).await, GapFill::Fill);
    // The cancelled run, retried, keeps its nonce: once the node has seen it used it signs
    // nothing, for the engine cannot know whether its own transaction went out elsewhere...
    store.retry_run(&runs[0], late).await.unwrap();
    assert_eq!(allocate(0, 1).await, NonceAllocation::Spent(0));
    // ... unless it finds the filler's transaction mined: then its own never can be, and it
    // gets a new nonce.
    let gap = NonceGap {
        chain_id: 1,
        address: nonce_request(1, "", 0).address,
        nonce: 0,
        job_id: jobs[2],
    };
    store.note_nonce_fill(&gap, "0xf111").await.unwrap();
    assert_eq!(
        allocate(0, 1).await,
        NonceAllocation::Filled {
            nonce: 0,
            hash: "0xf111".into()
        }
    );
    let seen_mined = NonceRequest {
        job_id: Some(jobs[0]),
        filled: Some(0),
        ..nonce_request(1, &format!("{}:send", runs[0]), 1)
    };
    assert_eq!(
        store.allocate_nonce(&seen_mined, late).await.unwrap(),
        NonceAllocation::New(3)
    );
    assert_eq!(allocate(0, 1).await, NonceAllocation::Again(3));
    // Nothing at or past the next nonce is a gap of ours.
    assert_eq!(fill(4, jobs[2], late).await, GapFill::Wait);
    // Nonces skipped because another sender of the key used them are no gap of ours either.
    let skipping = NonceRequest {
        job_id: Some(jobs[2]),
        ..nonce_request(1, "skipping", 5)
    };
    assert_eq!(
        store.allocate_nonce(&skipping, T0).await.unwrap(),
        NonceAllocation::New(5)
    );
    assert_eq!(fill(4, jobs[2], late).await, GapFill::Wait);
    // A nonce given outside any job is never filled, whatever waits above it.
    assert_eq!(
        store
            .allocate_nonce(&nonce_request(1, "outside", 0), T0)
            .await
            .unwrap(),
        NonceAllocation::New(6)
    );
    // A step that failed for good with its nonce unsent leaves it to the next waiting step.
    let failing = start(&*store, &one, Trigger::default()).await;
    let job = claim(&*store, T0, 1).await.remove(0);
    let request = NonceRequest {
        job_id: Some(job.lease.job_id),
        ..nonce_request(1, &format!("{failing}:send"), 0)
    };
    assert_eq!(
        store.allocate_nonce(&request, T0).await.unwrap(),
        NonceAllocation::New(7)
    );
    assert_eq!(fill(6, jobs[2], late).await, GapFill::Wait);
    store
        .complete(vec![failed(&job, "refused")], T0)
        .await
        .unwrap();
    assert_eq!(fill(7, jobs[2], late).await, GapFill::Fill);
}

fn two_steps() -> Workflow {
    workflow("id: two\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, needs: [a]}\n")
}

fn params(limit: u32, now: Millis) -> ClaimParams {
    ClaimParams {
        limit,
        now,
        lease_until: now + LEASE,
    }
}

pub async fn complete_and_claim_commits_completions_and_claims_the_dependent(
    store: Arc<dyn Store>,
) {
    let run = start(&*store, &two_steps(), Trigger::default()).await;
    let a = claim(&*store, T0, 10).await.remove(0);
    assert_eq!(a.step_id, "a");

    let (accepted, claimed) = store
        .complete_and_claim(vec![done(&a, json!(42))], params(10, T0), T0)
        .await
        .unwrap();
    assert_eq!(accepted, vec![a.lease.job_id]);
    assert_eq!(claimed.len(), 1, "b became available and was claimed");
    let b = &claimed[0];
    assert_eq!(b.step_id, "b");
    assert_eq!(b.run_id, run);
    assert_eq!(b.outputs.get("a"), Some(&json!(42)), "b sees a's output");
    assert_eq!(job_state(&*store, &run, "a").await, JobState::Succeeded);
    assert_eq!(job_state(&*store, &run, "b").await, JobState::Running);

    // The claim's lease is a real one: completing b with it finishes the run.
    let (accepted, claimed) = store
        .complete_and_claim(vec![done(b, json!(7))], params(10, T0 + 1), T0 + 1)
        .await
        .unwrap();
    assert_eq!(accepted, vec![b.lease.job_id]);
    assert!(claimed.is_empty());
    let detail = store.run(&run).await.unwrap();
    assert_eq!(detail.summary.status, RunStatus::Succeeded);
    assert_eq!(detail.output, Some(json!({ "b": 7 })));
}

pub async fn complete_and_claim_rejects_a_stale_lease_but_still_claims(store: Arc<dyn Store>) {
    let first_run = start(&*store, &two_steps(), Trigger::default()).await;
    let first = claim(&*store, T0, 1).await.remove(0);
    // The lease runs out and another worker takes the job over.
    assert_eq!(store.sweep(T0 + LEASE + 1).await.unwrap().reclaimed_jobs, 1);
    let second = claim(&*store, T0 + LEASE + 2, 1).await.remove(0);
    assert_eq!(second.lease.job_id, first.lease.job_id);
    let other_run = start(&*store, &two_steps(), Trigger::default()).await;

    let now = T0 + LEASE + 3;
    let (accepted, claimed) = store
        .complete_and_claim(vec![done(&first, json!("stale"))], params(10, now), now)
        .await
        .unwrap();
    assert!(accepted.is_empty(), "late completion was accepted");
    assert_eq!(
        job_state(&*store, &first_run, "a").await,
        JobState::Running,
        "the current attempt keeps the job"
    );
    let claimed: Vec<(&str, &str)> = claimed
        .iter()
        .map(|j| (j.run_id.as_str(), j.step_id.as_str()))
        .collect();
    assert_eq!(claimed, vec![(other_run.as_str(), "a")]);
}

pub async fn complete_and_claim_with_limit_zero_only_completes(store: Arc<dyn Store>) {
    let run = start(&*store, &two_steps(), Trigger::default()).await;
    let a = claim(&*store, T0, 10).await.remove(0);

    let (accepted, claimed) = store
        .complete_and_claim(vec![done(&a, Value::Null)], params(0, T0), T0)
        .await
        .unwrap();
    assert_eq!(accepted, vec![a.lease.job_id]);
    assert!(claimed.is_empty());
    assert_eq!(job_state(&*store, &run, "b").await, JobState::Available);
    assert_eq!(claim(&*store, T0, 10).await[0].step_id, "b");
}

pub async fn complete_and_claim_with_nothing_to_complete_is_a_claim(store: Arc<dyn Store>) {
    let run = start(&*store, &two_steps(), Trigger::default()).await;

    let (accepted, claimed) = store
        .complete_and_claim(Vec::new(), params(10, T0), T0)
        .await
        .unwrap();
    assert!(accepted.is_empty());
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].step_id, "a");
    assert_eq!(job_state(&*store, &run, "a").await, JobState::Running);
}

/// Completing a keyed run opens its gate and starts the next pending run, while that pending run
/// is being cancelled: both calls succeed (no deadlock between gate and run locks) and the gate
/// ends consistent, round after round.
pub async fn cancelling_a_pending_run_while_its_gate_opens_never_fails(store: Arc<dyn Store>) {
    let wf = workflow(
        "id: keyed\nconcurrency: {limit: 1, key: \"{{ input.region }}\"}\nsteps:\n  - {id: a, type: noop}\n",
    );
    let version = install(&*store, &wf).await;
    for round in 0..20 {
        let make =
            || plan_run(&wf, version, json!({ "region": "us" }), Trigger::default()).unwrap();
        let now = T0 + round;
        let ids = store.create_runs(vec![make(), make()], now).await.unwrap();
        let holder = claim(&*store, now, 10).await.remove(0);
        assert_eq!(holder.run_id, ids[0]);
        let completing = {
            let store = store.clone();
            let c = done(&holder, Value::Null);
            tokio::spawn(async move { store.complete(vec![c], now).await })
        };
        let cancelling = {
            let store = store.clone();
            let pending = ids[1].clone();
            tokio::spawn(async move { store.cancel_run(&pending, now).await })
        };
        let completed = completing.await.unwrap();
        let cancelled = cancelling.await.unwrap();
        assert_eq!(completed.unwrap().len(), 1, "round {round}");
        assert_eq!(cancelled.unwrap(), RunStatus::Cancelled, "round {round}");
        assert_eq!(run_status(&*store, &ids[0]).await, RunStatus::Succeeded);
        assert_eq!(run_status(&*store, &ids[1]).await, RunStatus::Cancelled);
        assert!(claim(&*store, now, 10).await.is_empty(), "round {round}");
    }
}

pub async fn settings_are_stored_replaced_listed_and_deleted(store: Arc<dyn Store>) {
    assert_eq!(store.setting("vars", "region").await.unwrap(), None);
    store
        .put_setting("vars", "region", &json!("eu"), T0)
        .await
        .unwrap();
    store
        .put_setting("vars", "region", &json!({"id": "de"}), T0 + 1)
        .await
        .unwrap();
    store
        .put_setting("vars", "amazon", &json!(["a", "b"]), T0)
        .await
        .unwrap();
    store
        .put_setting("secrets", "region", &json!("hidden"), T0)
        .await
        .unwrap();
    let region = store.setting("vars", "region").await.unwrap().unwrap();
    assert_eq!(region.value, json!({"id": "de"}));
    assert_eq!(region.updated_at, T0 + 1);
    let names: Vec<String> = store
        .settings("vars")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["amazon", "region"], "one namespace, by name");
    assert!(store.delete_setting("vars", "region").await.unwrap());
    assert!(!store.delete_setting("vars", "region").await.unwrap());
    assert_eq!(
        store
            .setting("secrets", "region")
            .await
            .unwrap()
            .unwrap()
            .value,
        json!("hidden"),
        "namespaces are apart"
    );
}

pub async fn racing_initialisations_of_a_setting_agree_on_one_value(store: Arc<dyn Store>) {
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .init_setting("system", "signing_key", &json!(format!("key-{i}")), T0)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut seen = Vec::new();
    for racer in racers {
        seen.push(racer.await.unwrap());
    }
    assert!(seen.iter().all(|v| *v == seen[0]), "{seen:?}");
    assert_eq!(
        store
            .setting("system", "signing_key")
            .await
            .unwrap()
            .unwrap()
            .value,
        seen[0]
    );
}

pub async fn an_unchanged_definition_file_keeps_a_newer_version_from_the_api(
    store: Arc<dyn Store>,
) {
    let def = |n: i64| json!({ "id": "flow", "steps": [{ "id": "a", "type": "noop", "with": { "n": n } }] });
    let put = |n: i64, origin| {
        let store = store.clone();
        async move {
            store
                .upsert_workflows(installing(&[("flow".to_owned(), def(n))], origin), T0)
                .await
                .unwrap()[0]
        }
    };
    assert_eq!(put(1, DefinitionOrigin::Files).await, 1);
    assert_eq!(put(2, DefinitionOrigin::Api).await, 2);
    // A restart installs the same file again: the API's version stays current.
    assert_eq!(put(1, DefinitionOrigin::Files).await, 2);
    assert_eq!(store.workflow_version("flow", 2).await.unwrap(), def(2));
    // The file changed since: it wins.
    assert_eq!(put(3, DefinitionOrigin::Files).await, 3);
    assert_eq!(
        put(3, DefinitionOrigin::Api).await,
        3,
        "equal to the latest"
    );
    assert_eq!(put(3, DefinitionOrigin::Files).await, 3);
}

pub async fn creating_workflows_stores_all_of_them_or_none(store: Arc<dyn Store>) {
    let def = |id: &str| json!({ "id": id, "steps": [{ "id": "a", "type": "noop" }] });
    install(&*store, &linear()).await;
    let batch = [
        ("fresh".to_owned(), def("fresh")),
        ("linear".to_owned(), def("linear")),
    ];
    let refused = store
        .upsert_workflows(
            InstallParams {
                create_only: true,
                ..installing(&batch, DefinitionOrigin::Api)
            },
            T0,
        )
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    assert!(
        store.workflow("fresh").await.unwrap().is_none(),
        "nothing stored"
    );
    let created = store
        .upsert_workflows(
            InstallParams {
                create_only: true,
                ..installing(&batch[..1], DefinitionOrigin::Api)
            },
            T0,
        )
        .await
        .unwrap();
    assert_eq!(created, [1]);
    let fresh = store.workflow("fresh").await.unwrap().unwrap();
    assert_eq!(fresh.origin, DefinitionOrigin::Api);
    assert_eq!(fresh.latest_version, 1);
}

pub async fn a_removed_workflow_is_gone_until_installed_again_with_a_new_version(
    store: Arc<dyn Store>,
) {
    let wf = linear();
    start(&*store, &wf, Trigger::default()).await;
    let refused = store.remove_workflow("linear", false).await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    assert!(store.workflow("linear").await.unwrap().is_some());
    store.remove_workflow("linear", true).await.unwrap();
    assert!(store.workflow("linear").await.unwrap().is_none());
    assert!(store.workflows().await.unwrap().is_empty());
    assert!(matches!(
        store.remove_workflow("linear", true).await,
        Err(StoreError::NotFound(_))
    ));
    // Its run still reads its version; installed again, the same file is a new version.
    assert!(store.workflow_version("linear", 1).await.is_ok());
    assert_eq!(install(&*store, &wf).await, 2);
    assert_eq!(
        store
            .workflow("linear")
            .await
            .unwrap()
            .unwrap()
            .latest_version,
        2
    );
}

pub async fn failed_runs_raise_alerts_and_cancelled_ones_do_not(store: Arc<dyn Store>) {
    let failing = start(&*store, &linear(), Trigger::default()).await;
    let job = claim(&*store, T0, 1).await.remove(0);
    store
        .complete(vec![failed(&job, "boom")], T0)
        .await
        .unwrap();
    let cancelled = start(&*store, &linear(), Trigger::default()).await;
    store.cancel_run(&cancelled, T0).await.unwrap();

    let alerts = store.alerts(None, 10).await.unwrap();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0].run_id.as_deref(), Some(failing.as_str()));
    assert_eq!(alerts[0].workflow_id, "linear");
    assert_eq!(alerts[0].kind, "failed");
    assert!(alerts[0].message.contains("boom"), "{alerts:?}");
    assert!(store.alerts(Some("other"), 10).await.unwrap().is_empty());
}

fn audit(action: &str, target: &str) -> NewAuditEntry {
    NewAuditEntry {
        actor: "alice".into(),
        action: action.into(),
        target: target.into(),
        detail: json!({"n": 1}),
    }
}

fn put(name: &str, value: Value) -> SettingChange {
    SettingChange::Put {
        namespace: "secrets".into(),
        name: name.into(),
        value,
    }
}

fn swap(name: &str, old: Value, new: Value) -> SettingChange {
    SettingChange::Swap {
        namespace: "secrets".into(),
        name: name.into(),
        old,
        new,
    }
}

pub async fn setting_changes_apply_with_their_audit_entry_and_swaps_only_over_the_value_seen(
    store: Arc<dyn Store>,
) {
    let applied = store
        .change_settings(
            vec![
                put("a", json!("plain")),
                swap("b", json!("x"), json!("y")),
                SettingChange::Delete {
                    namespace: "secrets".into(),
                    name: "c".into(),
                },
            ],
            Some(audit("secret.set", "a")),
            T0,
        )
        .await
        .unwrap();
    assert_eq!(
        applied,
        [true, false, false],
        "a swap or delete of nothing applies nothing"
    );
    let sealed = json!({"enc": "test", "ct": "..."});
    let stale = store
        .change_settings(
            vec![swap("a", json!("other"), sealed.clone())],
            None,
            T0 + 5,
        )
        .await
        .unwrap();
    assert_eq!(stale, [false], "a value changed since it was read is kept");
    let swapped = store
        .change_settings(
            vec![swap("a", json!("plain"), sealed.clone())],
            Some(audit("keys.rotate", "secrets")),
            T0 + 5,
        )
        .await
        .unwrap();
    assert_eq!(swapped, [true]);
    let a = store.setting("secrets", "a").await.unwrap().unwrap();
    assert_eq!(a.value, sealed);
    assert_eq!(a.updated_at, T0, "a swap is the same value in another form");
    let again = store
        .change_settings(
            vec![swap("a", json!("plain"), json!("late"))],
            Some(audit("keys.rotate", "secrets")),
            T0 + 6,
        )
        .await
        .unwrap();
    assert_eq!(
        again,
        [false],
        "a second process making the same swap changes nothing"
    );
    let deleted = store
        .change_settings(
            vec![SettingChange::Delete {
                namespace: "secrets".into(),
                name: "a".into(),
            }],
            Some(audit("secret.delete", "a")),
            T0 + 7,
        )
        .await
        .unwrap();
    assert_eq!(deleted, [true]);
    assert_eq!(store.setting("secrets", "a").await.unwrap(), None);

    let log = store.audit_log(None, 10).await.unwrap();
    let actions: Vec<(&str, Millis)> = log.iter().map(|e| (e.action.as_str(), e.at)).collect();
    assert_eq!(
        actions,
        [
            ("secret.delete", T0 + 7),
            ("keys.rotate", T0 + 5),
            ("secret.set", T0)
        ],
        "one entry per change that applied, newest first"
    );
    assert_eq!(log[0].actor, "alice");
    assert_eq!(log[0].target, "a");
    assert_eq!(log[0].detail, json!({"n": 1}));
}

pub async fn the_audit_log_pages_newest_first_and_forgets_after_90_days(store: Arc<dyn Store>) {
    const DAY: Millis = 86_400_000;
    for n in 0..5 {
        store
            .record_audit(audit("variable.set", &format!("v{n}")), T0 + n)
            .await
            .unwrap();
    }
    let first = store.audit_log(None, 2).await.unwrap();
    let targets = |page: &[switchyard_engine::store::AuditEntry]| -> Vec<String> {
        page.iter().map(|e| e.target.clone()).collect()
    };
    assert_eq!(targets(&first), ["v4", "v3"]);
    let second = store.audit_log(Some(first[1].id), 2).await.unwrap();
    assert_eq!(targets(&second), ["v2", "v1"]);
    let last = store.audit_log(Some(second[1].id), 2).await.unwrap();
    assert_eq!(targets(&last), ["v0"]);

    store
        .record_audit(audit("user.set", "late"), T0 + 10 * DAY)
        .await
        .unwrap();
    store.prune(T0 + 90 * DAY + 3, 100).await.unwrap();
    let kept = store.audit_log(None, 10).await.unwrap();
    assert_eq!(
        targets(&kept),
        ["late", "v4", "v3"],
        "entries of 90 days and more go"
    );
}

pub async fn a_revoked_token_is_listed_until_it_would_have_expired(store: Arc<dyn Store>) {
    let revoke = |jti: &str, expires_at: Millis| {
        let store = store.clone();
        let revocation = TokenRevocation {
            jti: jti.into(),
            expires_at,
            revoked_by: "alice".into(),
        };
        async move {
            store
                .revoke_token(revocation, audit("token.revoke", "t"), T0)
                .await
                .unwrap()
        }
    };
    assert!(revoke("t1", T0 + 1_000).await);
    assert!(
        !revoke("t1", T0 + 1_000).await,
        "revoking twice changes nothing"
    );
    assert!(revoke("t2", T0 + 5_000).await);
    let mut listed = store.revoked_tokens(T0).await.unwrap();
    listed.sort();
    assert_eq!(listed, ["t1", "t2"]);
    assert_eq!(store.revoked_tokens(T0 + 1_000).await.unwrap(), ["t2"]);
    let audited = store.audit_log(None, 10).await.unwrap();
    assert_eq!(audited.len(), 2, "one entry per revocation: {audited:?}");

    store.prune(T0 + 1_000, 100).await.unwrap();
    assert!(
        revoke("t1", T0 + 1_000).await,
        "the expired revocation was pruned"
    );
}

// Control flow: `when`, `run_if`, `on_failure`. A worker renders `when` and reports a skip; the
// store decides everything that follows.

fn skip(job: &ClaimedJob, reason: &str) -> Completion {
    Completion {
        lease: job.lease.clone(),
        settlement: Settlement::Skip {
            reason: reason.into(),
        },
        children: Vec::new(),
        logs: Vec::new(),
        artifacts: Vec::new(),
        usage: Vec::new(),
    }
}

async fn step_detail(
    store: &dyn Store,
    run: &str,
    step: &str,
) -> switchyard_engine::store::JobDetail {
    store
        .run(run)
        .await
        .unwrap()
        .steps
        .into_iter()
        .find(|s| s.step_id == step)
        .unwrap()
}

/// Completes every job claimable at `now` with `output`, and returns their step ids, sorted.
async fn finish_ready(store: &dyn Store, now: Millis) -> Vec<String> {
    let jobs = claim(store, now, 100).await;
    let completions = jobs.iter().map(|j| done(j, json!(j.step_id))).collect();
    store.complete(completions, now).await.unwrap();
    let mut steps: Vec<String> = jobs.into_iter().map(|j| j.step_id).collect();
    steps.sort();
    steps
}

pub async fn a_skipped_step_skips_its_dependents_unless_their_rule_allows_and_the_run_succeeds(
    store: Arc<dyn Store>,
) {
    let wf = workflow(
        "id: branch\nsteps:\n  - {id: a, type: noop}\n  - {id: b, type: noop, needs: [a], when: '{{ false }}'}\n  - {id: c, type: noop, needs: [b]}\n  - {id: d, type: noop, needs: [c]}\n  - {id: e, type: noop, needs: [b], run_if: none_failed}\n",
    );
    let run = start(&*store, &wf, Trigger::default()).await;
    assert_eq!(finish_ready(&*store, T0).await, ["a"]);
    let b = claim(&*store, T0, 10).await;
    assert_eq!(b.len(), 1, "only b is ready");
    store
        .complete(vec![skip(&b[0], "when rendered false")], T0)
        .await
        .unwrap();
    let b = step_detail(&*store, &run, "b").await;
    assert_eq!(b.state, JobState::Skipped);
    assert_eq!(b.error.as_deref(), Some("when rendered false"));
    let c = step_detail(&*store, &run, "c").await;
    assert_eq!(c.state, JobState::Skipped);
    assert_eq!(c.error.as_deref(), Some("it needs b, which was skipped"));
    assert_eq!(job_state(&*store, &run, "d").await, JobState::Skipped);
    assert_eq!(run_status(&*store, &run).await, RunStatus::Running);
    assert_eq!(finish_ready(&*store, T0).await, ["e"]);
    let detail = store.run(&run).await.unwrap();
    assert_eq!(detail.summary.status, RunStatus::Succeeded, "{detail:?}");
    assert_eq!(detail.output, Some(json!({ "d": null, "e": "e" })));
}

pub async fn each_run_if_decides_after_a_failure_and_the_run_fails_when_all_have_finished(
    store: Arc<dyn Store>,
) {
    let wf = workflow(
        "id: rules\nsteps:\n  - {id: a, type: noop, retry: {max_retries: 0}}\n  - {id: slow, type: noop}\n  - {id: done, type: noop, needs: [a, slow], run_if: all_done}\n  - {id: rescue, type: noop, needs: [a], run_if: any_failed}\n  - {id: careful, type: noop, needs: [a], run_if: none_failed}\n  - {id: plain, type: noop, needs: [a]}\n  - {id: after_slow, type: noop, needs: [slow], run_if: any_failed}\n",
    );
    let run = start(&*store, &wf, Trigger::default()).await;
    let jobs = claim(&*store, T0, 10).await;
    assert_eq!(jobs.len(), 2);
    let a = jobs.iter().find(|j| j.step_id == "a").unwrap();
    let slow = jobs.iter().find(|j| j.step_id == "slow").unwrap();
    store.complete(vec![failed(a, "boom")], T0).await.unwrap();
    // A step that runs after failures waits: the run goes on, `slow` with it.
    assert_eq!(run_status(&*store, &run).await, RunStatus::Running);
    for (step, reason) in [
        ("careful", "it needs a, which failed"),
        ("plain", "it needs a, which failed"),
    ] {
        let detail = step_detail(&*store, &run, step).await;
        assert_eq!(detail.state, JobState::Skipped, "{step}");
        assert_eq!(detail.error.as_deref(), Some(reason), "{step}");
    }
    assert_eq!(finish_ready(&*store, T0).await, ["rescue"]);
    store
        .complete(vec![done(slow, json!("slow"))], T0)
        .await
        .unwrap();
    assert_eq!(
        step_detail(&*store, &run, "after_slow")
            .await
            .error
            .as_deref(),
        Some("run_if any_failed: no step it needs failed")
    );
    assert_eq!(finish_ready(&*store, T0).await, ["done"]);
    let detail = store.run(&run).await.unwrap();
    assert_eq!(detail.summary.status, RunStatus::Failed, "{detail:?}");
    assert_eq!(detail.summary.error.as_deref(), Some("step a failed: boom"));
}

fn handled() -> Workflow {
    workflow(
        "id: handled\nsteps:\n  - {id: a, type: noop, retry: {max_retries: 0}}\n  - {id: b, type: noop}\n  - {id: c, type: noop, needs: [a]}\non_failure:\n  - {id: alert, type: noop}\n  - {id: cleanup, type: noop, needs: [alert]}\n",
    )
}

pub async fn failure_handlers_run_once_after_a_failure_and_the_run_stays_failed(
    store: Arc<dyn Store>,
) {
    let run = start(&*store, &handled(), Trigger::default()).await;
    let jobs = claim(&*store, T0, 10).await;
    assert_eq!(jobs.len(), 2, "the handlers wait for the run to fail");
    let a = jobs.iter().find(|j| j.step_id == "a").unwrap();
    let b = jobs.iter().find(|j| j.step_id == "b").unwrap();
    store.complete(vec![failed(a, "boom")], T0).await.unwrap();
    assert_eq!(run_status(&*store, &run).await, RunStatus::Running);
    assert_eq!(job_state(&*store, &run, "b").await, JobState::Cancelled);
    assert_eq!(job_state(&*store, &run, "c").await, JobState::Skipped);
    // The cancelled step's worker learns it has lost its job.
    assert!(
        store
            .heartbeat(std::slice::from_ref(&b.lease), T0)
            .await
            .unwrap()
            .is_empty()
    );
    let alert = claim(&*store, T0, 10).await;
    assert_eq!(alert.len(), 1);
    assert_eq!(alert[0].step_id, "alert");
    assert_eq!(alert[0].run_error.as_deref(), Some("step a failed: boom"));
    store
        .complete(vec![done(&alert[0], json!("sent"))], T0)
        .await
        .unwrap();
    assert_eq!(finish_ready(&*store, T0).await, ["cleanup"]);
    let detail = store.run(&run).await.unwrap();
    assert_eq!(detail.summary.status, RunStatus::Failed, "{detail:?}");
    assert_eq!(detail.summary.error.as_deref(), Some("step a failed: boom"));
    assert!(
        claim(&*store, T0 + LEASE * 10, 10).await.is_empty(),
        "they ran once"
    );
    let alerts = store.alerts(Some("handled"), 10).await.unwrap();
    assert_eq!(alerts.len(), 1, "one failure, one alert");
}

pub async fn failure_handlers_are_skipped_when_the_run_succeeds(store: Arc<dyn Store>) {
    let run = start(&*store, &handled(), Trigger::default()).await;
    assert_eq!(finish_ready(&*store, T0).await, ["a", "b"]);
    assert_eq!(finish_ready(&*store, T0).await, ["c"]);
    let detail = store.run(&run).await.unwrap();
    assert_eq!(detail.summary.status, RunStatus::Succeeded, "{detail:?}");
    assert_eq!(detail.output, Some(json!({ "b": "b", "c": "c" })));
    let alert = step_detail(&*store, &run, "alert").await;
    assert_eq!(alert.state, JobState::Skipped);
    assert_eq!(alert.error.as_deref(), Some("the run did not fail"));
}

pub async fn retry_of_a_run_with_control_flow_reruns_only_what_failed(store: Arc<dyn Store>) {
    let wf = workflow(
        "id: again\nsteps:\n  - {id: a, type: noop}\n  - {id: gate, type: noop, needs: [a], when: '{{ false }}'}\n  - {id: x, type: noop, needs: [a], retry: {max_retries: 0}}\n  - {id: after_x, type: noop, needs: [x]}\non_failure:\n  - {id: alert, type: noop}\n",
    );
    let run = start(&*store, &wf, Trigger::default()).await;
    assert_eq!(finish_ready(&*store, T0).await, ["a"]);
    let jobs = claim(&*store, T0, 10).await;
    let gate = jobs.iter().find(|j| j.step_id == "gate").unwrap();
    let x = jobs.iter().find(|j| j.step_id == "x").unwrap();
    store
        .complete(
            vec![skip(gate, "when rendered false"), failed(x, "down")],
            T0,
        )
        .await
        .unwrap();
    assert_eq!(finish_ready(&*store, T0).await, ["alert"]);
    assert_eq!(run_status(&*store, &run).await, RunStatus::Failed);

    store.retry_run(&run, T0 + 1).await.unwrap();
    assert_eq!(job_state(&*store, &run, "gate").await, JobState::Skipped);
    assert_eq!(job_state(&*store, &run, "alert").await, JobState::Waiting);
    assert_eq!(finish_ready(&*store, T0 + 1).await, ["x"]);
    assert_eq!(finish_ready(&*store, T0 + 1).await, ["after_x"]);
    let detail = store.run(&run).await.unwrap();
    assert_eq!(detail.summary.status, RunStatus::Succeeded, "{detail:?}");
    assert_eq!(job_state(&*store, &run, "alert").await, JobState::Skipped);
}

// Loops: a `for_each` step parks with its items, which run as jobs of their own.

fn looped(job: &ClaimedJob, items: Vec<Value>, parallel: Option<u32>) -> Completion {
    Completion {
        lease: job.lease.clone(),
        settlement: Settlement::Loop {
            items,
            parallel,
            checkpoint: json!({ "outputs": job.outputs }),
        },
        children: Vec::new(),
        logs: Vec::new(),
        artifacts: Vec::new(),
        usage: Vec::new(),
    }
}

fn each_of(yaml_extra: &str) -> Workflow {
    workflow(&format!(
        "id: each\nsteps:\n  - {{id: list, type: noop}}\n  - {{id: each, type: noop, needs: [list], for_each: '{{{{ steps.list.output }}}}'{yaml_extra}}}\n  - {{id: after, type: noop, needs: [each]}}\n"
    ))
}

/// Starts a run of `wf` and parks its `each` step with `count` items; returns the run.
async fn start_loop(store: &dyn Store, wf: &Workflow, count: i64, parallel: Option<u32>) -> String {
    let run = start(store, wf, Trigger::default()).await;
    let list = claim(store, T0, 1).await.remove(0);
    store
        .complete(vec![done(&list, json!("listed"))], T0)
        .await
        .unwrap();
    let each = claim(store, T0, 1).await.remove(0);
    assert_eq!(each.step_id, "each");
    assert!(each.item.is_none());
    let items = (0..count).map(|i| json!({ "n": i })).collect();
    let accepted = store
        .complete(vec![looped(&each, items, parallel)], T0)
        .await
        .unwrap();
    assert_eq!(accepted.len(), 1);
    run
}

pub async fn a_loop_runs_at_most_parallel_items_at_once_and_gives_their_outputs_in_order(
    store: Arc<dyn Store>,
) {
    let wf = each_of(", parallel: 10");
    let run = start_loop(&*store, &wf, 1_000, Some(10)).await;
    let mut finished = 0;
    while finished < 1_000 {
        let jobs = claim(&*store, T0, 100).await;
        assert!(!jobs.is_empty(), "items are left to run");
        assert!(jobs.len() <= 10, "{} items at once", jobs.len());
        for job in &jobs {
            let item = job.item.as_ref().expect("an item");
            assert_eq!(item.step_id, "each");
            assert_eq!(job.step_id, format!("each[{}]", item.index));
            assert_eq!(item.value, json!({ "n": item.index }));
            // What every item shares is read once per loop, not carried by each claim.
            assert!(job.outputs.is_empty() && job.input.is_null(), "{job:?}");
        }
        let shared = store
            .loop_context(jobs[0].item.as_ref().unwrap().loop_job)
            .await
            .unwrap();
        assert_eq!(shared.outputs.get("list"), Some(&json!("listed")));
        // Out of order: the step's output keeps the items' order.
        let completions = jobs
            .iter()
            .rev()
            .map(|j| done(j, json!(j.item.as_ref().unwrap().index * 2)))
            .collect();
        store.complete(completions, T0).await.unwrap();
        finished += jobs.len();
    }
    let after = claim(&*store, T0, 10).await;
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].step_id, "after");
    let expected: Vec<i64> = (0..1_000).map(|i| i * 2).collect();
    assert_eq!(after[0].outputs["each"], json!(expected));
    assert!(
        !after[0].outputs.contains_key("each[0]"),
        "items are not steps"
    );
    store
        .complete(vec![done(&after[0], json!("done"))], T0)
        .await
        .unwrap();
    assert_eq!(run_status(&*store, &run).await, RunStatus::Succeeded);
}

pub async fn a_failing_item_is_retried_alone_and_one_failing_for_good_fails_its_step(
    store: Arc<dyn Store>,
) {
    let wf = each_of("");
    let run = start_loop(&*store, &wf, 3, None).await;
    let jobs = claim(&*store, T0, 10).await;
    assert_eq!(jobs.len(), 3, "no limit: every item at once");
    let later = T0 + 5_000;
    let completions = jobs
        .iter()
        .map(|j| match j.item.as_ref().unwrap().index {
            1 => Completion {
                lease: j.lease.clone(),
                settlement: Settlement::Retry {
                    at: later,
                    error: "flaky".into(),
                },
                children: Vec::new(),
                logs: Vec::new(),
                artifacts: Vec::new(),
                usage: Vec::new(),
            },
            i => done(j, json!(i)),
        })
        .collect();
    store.complete(completions, T0).await.unwrap();
    assert!(claim(&*store, T0, 10).await.is_empty());
    let again = claim(&*store, later, 10).await;
    assert_eq!(again.len(), 1, "only the failed item runs again");
    assert_eq!(again[0].item.as_ref().unwrap().index, 1);
    assert_eq!(again[0].lease.attempt, 2);
    store
        .complete(vec![done(&again[0], json!(1))], later)
        .await
        .unwrap();
    assert_eq!(
        store
            .run(&run)
            .await
            .unwrap()
            .steps
            .iter()
            .find(|s| s.step_id == "each")
            .unwrap()
            .output,
        Some(json!([0, 1, 2]))
    );

    let broken = start_loop(&*store, &wf, 3, None).await;
    let jobs = claim(&*store, T0, 10).await;
    let first = jobs
        .iter()
        .find(|j| j.item.as_ref().unwrap().index == 0)
        .unwrap();
    store
        .complete(vec![failed(first, "boom")], T0)
        .await
        .unwrap();
    let detail = store.run(&broken).await.unwrap();
    assert_eq!(detail.summary.status, RunStatus::Failed);
    assert_eq!(
        detail.summary.error.as_deref(),
        Some("step each failed: item each[0] failed: boom")
    );
    assert_eq!(
        job_state(&*store, &broken, "each[1]").await,
        JobState::Cancelled
    );
}

pub async fn retry_of_a_run_with_a_loop_reruns_only_the_items_that_did_not_succeed(
    store: Arc<dyn Store>,
) {
    let wf = each_of("");
    let run = start_loop(&*store, &wf, 3, None).await;
    let jobs = claim(&*store, T0, 10).await;
    let item = |i: i64| {
        jobs.iter()
            .find(|j| j.item.as_ref().unwrap().index == i)
            .unwrap()
    };
    store
        .complete(vec![done(item(0), json!("zero"))], T0)
        .await
        .unwrap();
    store
        .complete(vec![failed(item(1), "down")], T0)
        .await
        .unwrap();
    assert_eq!(run_status(&*store, &run).await, RunStatus::Failed);
    assert_eq!(
        job_state(&*store, &run, "each[2]").await,
        JobState::Cancelled
    );

    store.retry_run(&run, T0 + 1).await.unwrap();
    // The step renders its items again, as a worker does; the one that succeeded is kept. Its
    // list is shorter now: the items past it go, the others run with today's values.
    let each = claim(&*store, T0 + 1, 10).await;
    assert_eq!(each.len(), 1);
    assert_eq!(each[0].step_id, "each");
    let items = vec![json!({ "n": 0 }), json!({ "n": "one" })];
    store
        .complete(vec![looped(&each[0], items, None)], T0 + 1)
        .await
        .unwrap();
    let rerun = claim(&*store, T0 + 1, 10).await;
    assert_eq!(rerun.len(), 1);
    assert_eq!(rerun[0].item.as_ref().unwrap().index, 1);
    assert_eq!(rerun[0].item.as_ref().unwrap().value, json!({ "n": "one" }));
    let completions = rerun
        .iter()
        .map(|j| done(j, json!(j.item.as_ref().unwrap().index)))
        .collect();
    store.complete(completions, T0 + 1).await.unwrap();
    let detail = store.run(&run).await.unwrap();
    let each = detail.steps.iter().find(|s| s.step_id == "each").unwrap();
    assert_eq!(each.output, Some(json!(["zero", 1])), "{detail:?}");
    let zero = detail
        .steps
        .iter()
        .find(|s| s.step_id == "each[0]")
        .unwrap();
    assert_eq!(zero.attempt, 1, "the item that succeeded did not run again");
}

pub async fn a_loop_that_continues_on_error_ends_with_its_error_and_the_run_goes_on(
    store: Arc<dyn Store>,
) {
    let wf = each_of(", continue_on_error: true");
    let run = start_loop(&*store, &wf, 3, None).await;
    let jobs = claim(&*store, T0, 10).await;
    let first = jobs
        .iter()
        .find(|j| j.item.as_ref().unwrap().index == 0)
        .unwrap();
    store
        .complete(vec![failed(first, "boom")], T0)
        .await
        .unwrap();
    let detail = store.run(&run).await.unwrap();
    let each = detail.steps.iter().find(|s| s.step_id == "each").unwrap();
    assert_eq!(each.state, JobState::Succeeded);
    assert_eq!(
        each.output,
        Some(json!({ "error": "item each[0] failed: boom" }))
    );
    assert_eq!(finish_ready(&*store, T0).await, ["after"]);
    assert_eq!(
        run_status(&*store, &run).await,
        RunStatus::Succeeded,
        "its failed and cancelled items do not hold the run"
    );
}

pub async fn a_looped_workflow_step_starts_the_next_item_when_a_child_run_ends(
    store: Arc<dyn Store>,
) {
    let child = workflow("id: child\nsteps:\n  - {id: only, type: noop}\n");
    let child_version = install(&*store, &child).await;
    let wf = workflow(
        "id: each\nsteps:\n  - {id: each, type: workflow, for_each: '{{ [1, 2] }}', parallel: 1, with: {workflow: child}}\n",
    );
    let run = start(&*store, &wf, Trigger::default()).await;
    let each = claim(&*store, T0, 1).await.remove(0);
    store
        .complete(vec![looped(&each, vec![json!(1), json!(2)], Some(1))], T0)
        .await
        .unwrap();
    for index in 0..2 {
        let item = claim(&*store, T0, 10).await;
        assert_eq!(item.len(), 1, "one item at a time");
        assert_eq!(item[0].item.as_ref().unwrap().index, index);
        park_with_children(&*store, &run, &item[0], &child, child_version, 1).await;
        let only = claim(&*store, T0, 10).await;
        assert_eq!(only.len(), 1, "the item's child, and no other item");
        assert_eq!(only[0].step_id, "only");
        store
            .complete(vec![done(&only[0], json!(index))], T0)
            .await
            .unwrap();
    }
    let detail = store.run(&run).await.unwrap();
    assert_eq!(detail.summary.status, RunStatus::Succeeded, "{detail:?}");
    assert_eq!(
        detail.output,
        Some(json!({ "each": [[{ "only": 0 }], [{ "only": 1 }]] }))
    );
}

macro_rules! conformance {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;
            conformance!(@tests $open;
                steps_run_in_dependency_order_and_the_run_succeeds,
                claimed_job_sees_outputs_of_finished_steps,
                independent_steps_are_claimed_together_and_fan_in_waits_for_all,
                late_completion_from_expired_lease_is_rejected,
                completion_with_a_forged_token_is_rejected,
                heartbeat_extends_a_lease_so_it_is_not_reclaimed,
                lines_stored_while_a_step_runs_are_kept_only_under_its_lease,
                a_run_that_ends_writes_its_notification_and_one_sender_at_a_time_delivers_it,
                only_the_ends_a_workflow_asks_for_are_notified,
                a_notification_carries_an_output_up_to_64_kib_and_says_when_it_left_one_out,
                retry_waits_for_its_stored_time,
                failed_step_fails_the_run_and_cancels_the_rest,
                retry_run_reruns_only_unsuccessful_steps,
                cancel_ends_the_run_and_drops_held_leases,
                run_past_its_deadline_times_out,
                parked_job_wakes_at_its_time_with_its_checkpoint,
                cancelled_runs_leave_nothing_claimable,
                callback_wakes_a_parked_step_once_with_its_result,
                callback_before_the_step_parks_wakes_it_as_it_parks,
                a_step_that_continues_on_error_fails_alone_and_its_dependents_run,
                higher_priority_is_claimed_first_and_equal_priority_in_order,
                nonces_are_allocated_once_per_step_without_gaps_across_concurrent_workers,
                a_nonce_is_at_least_the_nodes_pending_one_and_a_spent_one_is_never_given_again,
                a_nonce_a_cancelled_step_never_sent_is_filled_by_the_step_waiting_above_it,
                a_lost_last_attempt_of_a_step_that_continues_on_error_is_tolerated,
                a_workflow_step_that_continues_on_error_tolerates_a_failed_child,
                a_signal_before_its_step_ran_is_kept_and_a_second_is_refused,
                a_signal_wakes_its_parked_step_at_once,
                a_signal_to_a_running_step_wakes_it_as_it_parks_unless_it_timed_out,
                a_signal_to_a_finished_step_or_a_missing_run_is_refused,
                callback_for_an_attempt_that_ended_is_refused,
                a_step_given_back_keeps_its_callback,
                a_step_parked_with_a_scalar_checkpoint_settles,
                workflow_step_succeeds_with_child_outputs_in_order,
                retry_reopens_failed_child_runs_and_keeps_the_succeeded_ones,
                a_webhook_event_is_logged_once_per_source_scope_and_id,
                a_webhook_event_delivered_twice_at_once_starts_one_run,
                deliveries_in_one_batch_are_each_answered_and_a_repeat_in_it_starts_nothing,
                a_fire_creates_exactly_one_run_with_two_schedulers,
                overlapping_fire_is_skipped_with_its_reason,
                paused_workflow_fires_are_recorded_as_skipped,
                concurrency_key_holds_runs_until_a_slot_frees,
                idempotency_key_returns_the_first_run,
                a_reused_idempotency_key_with_another_input_is_a_conflict,
                runs_are_found_by_the_start_of_their_id,
                run_keeps_the_version_it_started_with,
                finished_runs_are_pruned_after_retention,
                a_file_is_named_only_by_an_accepted_settlement_and_swept_once_no_run_names_it,
                a_quota_lets_its_limit_through_then_gives_each_waiting_taker_its_own_turn,
                usage_is_summed_per_provider_workflow_and_day_from_every_attempt,
                a_batch_sent_again_after_its_commit_was_lost_counts_its_usage_once,
                the_last_lines_of_a_run_are_read_oldest_first,
                an_attempts_lines_are_kept_only_with_its_accepted_settlement,
                old_fire_records_are_pruned_but_the_latest_stays,
                a_refused_fire_is_recorded_once_with_an_alert_and_a_chosen_skip_without,
                batch_claim_takes_up_to_the_limit_oldest_first,
                parallel_last_steps_completed_at_once_still_finish_the_run,
                concurrent_claims_never_hand_out_a_job_twice,
                children_finishing_at_once_settle_their_parent,
                complete_and_claim_commits_completions_and_claims_the_dependent,
                complete_and_claim_rejects_a_stale_lease_but_still_claims,
                complete_and_claim_with_limit_zero_only_completes,
                complete_and_claim_with_nothing_to_complete_is_a_claim,
                cancelling_a_pending_run_while_its_gate_opens_never_fails,
                settings_are_stored_replaced_listed_and_deleted,
                racing_initialisations_of_a_setting_agree_on_one_value,
                an_unchanged_definition_file_keeps_a_newer_version_from_the_api,
                failed_runs_raise_alerts_and_cancelled_ones_do_not,
                creating_workflows_stores_all_of_them_or_none,
                a_removed_workflow_is_gone_until_installed_again_with_a_new_version,
                a_gate_that_opens_wakes_the_workers,
                a_fire_of_a_removed_workflow_is_skipped_as_removed,
                every_job_state_meets_every_event_as_the_table_says,
                setting_changes_apply_with_their_audit_entry_and_swaps_only_over_the_value_seen,
                the_audit_log_pages_newest_first_and_forgets_after_90_days,
                a_revoked_token_is_listed_until_it_would_have_expired,
                a_skipped_step_skips_its_dependents_unless_their_rule_allows_and_the_run_succeeds,
                each_run_if_decides_after_a_failure_and_the_run_fails_when_all_have_finished,
                failure_handlers_run_once_after_a_failure_and_the_run_stays_failed,
                failure_handlers_are_skipped_when_the_run_succeeds,
                retry_of_a_run_with_control_flow_reruns_only_what_failed,
                a_loop_runs_at_most_parallel_items_at_once_and_gives_their_outputs_in_order,
                a_failing_item_is_retried_alone_and_one_failing_for_good_fails_its_step,
                retry_of_a_run_with_a_loop_reruns_only_the_items_that_did_not_succeed,
                a_looped_workflow_step_starts_the_next_item_when_a_child_run_ends,
                a_loop_that_continues_on_error_ends_with_its_error_and_the_run_goes_on,
            );
        }
    };
    (@tests $open:expr; $($name:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some((store, db)) = $open.await else { return };
                super::$name(store).await;
                db.remove().await;
            }
        )+
    };
}

/// A test's own database: a SQLite file in a temporary folder, or a PostgreSQL schema. Removed
/// when the test passes; a failed test's stays for a look.
enum TestDb {
    Sqlite(std::path::PathBuf),
    Postgres { admin: sqlx::PgPool, schema: String },
}

impl TestDb {
    async fn remove(self) {
        match self {
            TestDb::Sqlite(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            TestDb::Postgres { admin, schema } => {
                sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
                    .execute(&admin)
                    .await
                    .unwrap();
            }
        }
    }
}

fn unique_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

async fn open_sqlite() -> Option<(Arc<dyn Store>, TestDb)> {
    let dir = std::env::temp_dir().join(format!("switchyard-test-{}", unique_name()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}/store.db", dir.display());
    let store = switchyard_engine::store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    Some((store, TestDb::Sqlite(dir)))
}

/// The database the PostgreSQL tests use; each test migrates its own schema in it. Without a
/// server the tests say they are skipped, unless `SWITCHYARD_REQUIRE_POSTGRES` is set (CI).
async fn open_postgres() -> Option<(Arc<dyn Store>, TestDb)> {
    let base = switchyard_engine::testing::postgres_url();
    let admin = match sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&base)
        .await
    {
        Ok(pool) => pool,
        Err(e) => {
            switchyard_engine::testing::postgres_unreachable(e);
            return None;
        }
    };
    let schema = format!("conformance_{}", unique_name());
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options[search_path]={schema}");
    let store = switchyard_engine::store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    Some((store, TestDb::Postgres { admin, schema }))
}

conformance!(sqlite, open_sqlite());
conformance!(postgres, open_postgres());
