//! The loop's decisions, driven by a fake driver that keeps what the loop set in motion (store
//! calls, step tasks, a heartbeat, next-due questions) until a test says how each ends. Time is a
//! [`ManualClock`]: nothing sleeps.

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;
use switchyard_engine::clock::{Clock, ManualClock};
use switchyard_engine::state::{Millis, Settlement};
use switchyard_engine::store::{ClaimedJob, Completion, JobId, Lease, StoreError};

use super::{Action, Event, StepEnd, Timing, WorkerLoop};
use crate::runtime::fixtures::claimed;

const START: Millis = 1_000_000;
const LEASE: Millis = 30_000;
const POLL: Millis = 250;
const GRACE: Millis = 10_000;

/// A store call the loop sent and no one answered yet.
#[derive(Debug)]
struct Call {
    batch: Vec<Completion>,
    asked: usize,
}

struct Fake {
    core: WorkerLoop,
    clock: ManualClock,
    calls: VecDeque<Call>,
    /// Jobs whose task runs, by job.
    running: BTreeMap<JobId, ClaimedJob>,
    aborted: Vec<Lease>,
    heartbeat: Option<(Vec<Lease>, Millis)>,
    heartbeats_sent: usize,
    next_due_asked: Vec<u64>,
    exited: bool,
    /// What the store was asked to record, in order.
    recorded: Vec<Completion>,
}

impl Fake {
    /// A loop of `slots` started at `START`: its first claim is in flight.
    fn started(slots: usize) -> Fake {
        let mut fake = Fake {
            core: WorkerLoop::new(Timing {
                slots,
                lease: LEASE,
                poll: POLL,
                grace: GRACE,
            }),
            clock: ManualClock::new(START),
            calls: VecDeque::new(),
            running: BTreeMap::new(),
            aborted: Vec::new(),
            heartbeat: None,
            heartbeats_sent: 0,
            next_due_asked: Vec::new(),
            exited: false,
            recorded: Vec::new(),
        };
        fake.on(Event::Started);
        fake
    }

    /// A loop of `slots` holding jobs `ids`, claimed by its first call, and nothing in flight.
    fn holding(slots: usize, ids: &[JobId]) -> Fake {
        let mut fake = Fake::started(slots);
        fake.answer_call(ids);
        fake.next_due_asked.clear();
        fake
    }

    fn on(&mut self, event: Event) {
        assert!(!self.exited, "an event after the loop exited");
        for action in self.core.next(event, self.clock.now()) {
            match action {
                Action::StoreCall { batch, asked } => self.calls.push_back(Call { batch, asked }),
                Action::Spawn(job) => {
                    let old = self.running.insert(job.lease.job_id, *job);
                    assert!(old.is_none(), "two tasks for one job");
                }
                Action::Abort(lease) => {
                    let job = self
                        .running
                        .remove(&lease.job_id)
                        .expect("abort a running task");
                    assert_eq!(job.lease, lease, "aborted another lease's task");
                    self.aborted.push(lease);
                }
                Action::Heartbeat { leases, until } => {
                    assert!(self.heartbeat.is_none(), "two heartbeats in flight");
                    self.heartbeats_sent += 1;
                    self.heartbeat = Some((leases, until));
                }
                Action::AskNextDue { after_call } => self.next_due_asked.push(after_call),
                Action::Exit => self.exited = true,
            }
        }
    }

    /// The oldest call in flight comes back, having recorded its batch and claimed `ids`.
    fn answer_call(&mut self, ids: &[JobId]) -> Call {
        self.answer_call_with(ids.iter().map(|&id| job(id, 1)).collect())
    }

    fn answer_call_with(&mut self, jobs: Vec<ClaimedJob>) -> Call {
        let call = self.calls.pop_front().expect("a call in flight");
        assert!(jobs.len() <= call.asked, "claimed more than asked");
        self.recorded.extend(call.batch.iter().cloned());
        self.on(Event::StoreCallDone {
            asked: call.asked,
            claimed: Ok(jobs),
        });
        call
    }

    /// The tasks of `ids` end with their attempt succeeded, all at once.
    fn finish(&mut self, ids: &[JobId]) {
        let ends = ids
            .iter()
            .map(|id| {
                let job = self.running.remove(id).expect("a running task");
                StepEnd::Done(succeeded(&job.lease))
            })
            .collect();
        self.on(Event::StepsEnded(ends));
    }

    /// The heartbeat in flight comes back having extended every lease but those of `lost`.
    fn answer_heartbeat(&mut self, lost: &[JobId]) {
        let (leases, _) = self.heartbeat.take().expect("a heartbeat in flight");
        let kept = leases
            .iter()
            .map(|l| l.job_id)
            .filter(|id| !lost.contains(id))
            .collect();
        self.on(Event::HeartbeatDone {
            leases,
            kept: Ok(kept),
        });
    }

    /// Moves the clock to the loop's deadline and tells it.
    fn wait_for_deadline(&mut self) {
        let at = self.core.deadline().expect("a deadline");
        self.clock.set(at.max(self.clock.now()));
        self.on(Event::Tick);
    }

    fn advance(&mut self, by: Millis) {
        self.clock.advance(by);
        self.on(Event::Tick);
    }

    fn running_ids(&self) -> Vec<JobId> {
        self.running.keys().copied().collect()
    }

    fn heartbeat_jobs(&self) -> Vec<JobId> {
        let (leases, _) = self.heartbeat.as_ref().expect("a heartbeat in flight");
        let mut ids: Vec<JobId> = leases.iter().map(|l| l.job_id).collect();
        ids.sort();
        ids
    }
}

fn job(id: JobId, attempt: u32) -> ClaimedJob {
    claimed(id, attempt, "run")
}

fn succeeded(lease: &Lease) -> Completion {
    Completion {
        lease: lease.clone(),
        settlement: Settlement::Succeed {
            output: Value::Null,
        },
        children: Vec::new(),
        logs: Vec::new(),
        artifacts: Vec::new(),
        usage: Vec::new(),
    }
}

fn jobs_of(batch: &[Completion]) -> Vec<JobId> {
    batch.iter().map(|c| c.lease.job_id).collect()
}

// Pipelining

#[test]
fn the_loop_starts_with_a_claim_for_every_slot() {
    let fake = Fake::started(4);
    assert_eq!(fake.calls.len(), 1);
    assert_eq!(fake.calls[0].asked, 4);
    assert!(fake.calls[0].batch.is_empty());
}

#[test]
fn claimed_jobs_are_spawned_and_a_full_claim_claims_again() {
    let mut fake = Fake::started(8);
    fake.answer_call(&[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(fake.running_ids(), [1, 2, 3, 4, 5, 6, 7, 8]);
    // Every slot is held: nothing to claim until a step ends, and then with its completion.
    assert!(fake.calls.is_empty());
    assert!(!fake.core.takes_wakeups());
    fake.finish(&[3]);
    assert_eq!(fake.calls.len(), 1);
    assert_eq!(jobs_of(&fake.calls[0].batch), [3]);
    assert_eq!(fake.calls[0].asked, 1);
}

#[test]
fn finished_attempts_always_carry_a_claim_for_the_free_slots() {
    let mut fake = Fake::started(4);
    // A short claim: nothing wants a claim until the next job falls due.
    fake.answer_call(&[1, 2]);
    assert!(fake.calls.is_empty());
    fake.finish(&[1]);
    let call = &fake.calls[0];
    assert_eq!(jobs_of(&call.batch), [1]);
    assert_eq!(call.asked, 3, "two free slots, and the one just freed");
}

#[test]
fn a_second_call_goes_out_beside_the_first_only_with_half_the_slots_finished() {
    let mut fake = Fake::holding(8, &[1, 2, 3, 4, 5, 6, 7, 8]);
    fake.finish(&[1]);
    assert_eq!(fake.calls.len(), 1);
    // Three finished while the first call is in flight: less than half the slots, so they wait.
    fake.finish(&[2]);
    fake.finish(&[3, 4]);
    assert_eq!(fake.calls.len(), 1);
    fake.finish(&[5]);
    assert_eq!(fake.calls.len(), 2);
    assert_eq!(jobs_of(&fake.calls[1].batch), [2, 3, 4, 5]);
    // The first call's free slot is reserved for it; the second claims the other four.
    assert_eq!(fake.calls[1].asked, 4);
    // Never a third, however many finish; fewer than half wait until no call is in flight.
    fake.finish(&[6, 7, 8]);
    assert_eq!(fake.calls.len(), 2);
    fake.answer_call(&[]);
    assert_eq!(fake.calls.len(), 1);
    fake.answer_call(&[]);
    assert_eq!(fake.calls.len(), 1);
    assert_eq!(jobs_of(&fake.calls[0].batch), [6, 7, 8]);
}

#[test]
fn a_lone_claim_is_never_sent_beside_another_call() {
    let mut fake = Fake::holding(8, &[1, 2, 3, 4, 5, 6, 7, 8]);
    fake.finish(&[1]);
    assert_eq!(fake.calls.len(), 1);
    // A slot frees with nothing to record, and a wake-up comes, while a completion is in flight:
    // the claim waits for it.
    let lease = fake.running.remove(&2).unwrap().lease;
    fake.on(Event::StepsEnded(vec![StepEnd::Panicked(lease)]));
    fake.on(Event::WakeUp);
    assert_eq!(fake.calls.len(), 1);
    fake.answer_call(&[]);
    // Then it claims every free slot, that one's and the one the answer left empty.
    assert_eq!(fake.calls.len(), 1);
    assert!(fake.calls[0].batch.is_empty());
    assert_eq!(fake.calls[0].asked, 2);
}

#[test]
fn completions_wait_for_a_lone_claim_in_flight() {
    let mut fake = Fake::holding(8, &[1, 2, 3, 4]);
    fake.on(Event::WakeUp);
    assert_eq!(fake.calls.len(), 1);
    assert_eq!(fake.calls[0].asked, 4);
    // Half the slots finish while the lone claim is out: they go only once it is back.
    fake.finish(&[1, 2, 3, 4]);
    assert_eq!(fake.calls.len(), 1);
    fake.answer_call(&[5, 6]);
    assert_eq!(fake.calls.len(), 1);
    assert_eq!(jobs_of(&fake.calls[0].batch), [1, 2, 3, 4]);
    assert_eq!(fake.calls[0].asked, 6);
}

#[test]
fn after_a_short_claim_the_loop_claims_again_when_the_next_job_falls_due() {
    let mut fake = Fake::started(4);
    fake.answer_call(&[1]);
    assert_eq!(fake.next_due_asked, [1]);
    fake.on(Event::NextDue {
        after_call: 1,
        due: Some(START + 100),
    });
    assert!(fake.calls.is_empty());
    assert_eq!(fake.core.deadline(), Some(START + 100));
    fake.advance(99);
    assert!(fake.calls.is_empty());
    fake.advance(1);
    assert_eq!(fake.calls.len(), 1);
    assert_eq!(fake.calls[0].asked, 3);
}

#[test]
fn a_job_due_already_or_far_off_is_claimed_between_a_moment_and_the_poll_interval() {
    let mut fake = Fake::started(4);
    fake.answer_call(&[]);
    fake.on(Event::NextDue {
        after_call: 1,
        due: Some(START - 50),
    });
    assert_eq!(fake.core.deadline(), Some(START + 5));
    fake.wait_for_deadline();
    fake.answer_call(&[]);
    let now = fake.clock.now();
    fake.on(Event::NextDue {
        after_call: 2,
        due: Some(now + 60_000),
    });
    assert_eq!(fake.core.deadline(), Some(now + POLL));
    fake.on(Event::NextDue {
        after_call: 2,
        due: None,
    });
    assert_eq!(fake.core.deadline(), Some(now + POLL));
}

#[test]
fn a_next_due_answer_older_than_a_later_call_is_ignored() {
    let mut fake = Fake::started(4);
    fake.answer_call(&[1]);
    assert_eq!(fake.next_due_asked, [1]);
    // The step ends before the answer: its completion goes out with a claim.
    fake.finish(&[1]);
    assert_eq!(fake.calls.len(), 1);
    fake.on(Event::NextDue {
        after_call: 1,
        due: Some(START + 100),
    });
    assert_eq!(fake.core.deadline(), None);
    fake.answer_call(&[]);
    assert_eq!(fake.next_due_asked, [1, 2]);
}

#[test]
fn a_failed_claim_is_tried_again_after_the_poll_interval() {
    let mut fake = Fake::started(4);
    let call = fake.calls.pop_front().unwrap();
    fake.on(Event::StoreCallDone {
        asked: call.asked,
        claimed: Err(StoreError::Unavailable("gone".to_owned())),
    });
    assert!(fake.calls.is_empty());
    assert_eq!(fake.core.deadline(), Some(START + POLL));
    fake.wait_for_deadline();
    assert_eq!(fake.calls.len(), 1);
    assert_eq!(fake.calls[0].asked, 4);
}

#[test]
fn a_claim_timer_that_fires_while_a_call_is_in_flight_is_not_a_busy_wait() {
    let mut fake = Fake::holding(8, &[1, 2, 3, 4, 5, 6, 7, 8]);
    fake.finish(&[1, 2, 3, 4]);
    fake.finish(&[5, 6, 7, 8]);
    assert_eq!(fake.calls.len(), 2);
    let first = fake.calls.pop_front().unwrap();
    fake.on(Event::StoreCallDone {
        asked: first.asked,
        claimed: Err(StoreError::Unavailable("gone".to_owned())),
    });
    fake.wait_for_deadline();
    // The claim waits for the call in flight, and the loop has nothing to wake up for.
    assert_eq!(fake.calls.len(), 1);
    assert_eq!(fake.core.deadline(), None);
    fake.answer_call(&[]);
    assert_eq!(fake.calls.len(), 1);
    assert_eq!(fake.calls[0].asked, 8);
}

// Heartbeats

#[test]
fn heartbeats_go_out_every_third_of_the_lease_with_every_held_lease() {
    let mut fake = Fake::holding(4, &[1, 2, 3]);
    assert_eq!(fake.core.deadline(), Some(START + LEASE / 3));
    fake.advance(LEASE / 3 - 1);
    assert_eq!(fake.heartbeats_sent, 0);
    fake.advance(1);
    assert_eq!(fake.heartbeat_jobs(), [1, 2, 3]);
    assert_eq!(
        fake.heartbeat.as_ref().unwrap().1,
        START + LEASE / 3 + LEASE,
        "extended by a whole lease from now"
    );
    // Never two in flight: the next goes once this one is back and the interval passed.
    fake.advance(LEASE / 3);
    assert_eq!(fake.heartbeats_sent, 1);
    fake.answer_heartbeat(&[]);
    assert_eq!(fake.heartbeats_sent, 2, "overdue, so at once");
    assert!(fake.aborted.is_empty());
}

#[test]
fn no_heartbeat_goes_out_while_nothing_is_held() {
    let mut fake = Fake::holding(4, &[1]);
    fake.finish(&[1]);
    fake.answer_call(&[]);
    assert_eq!(fake.core.deadline(), None);
    fake.advance(LEASE);
    assert_eq!(fake.heartbeats_sent, 0);
}

#[test]
fn a_lease_missing_from_a_heartbeat_aborts_its_step() {
    let mut fake = Fake::holding(4, &[1, 2, 3]);
    fake.wait_for_deadline();
    fake.answer_heartbeat(&[2]);
    assert_eq!(fake.aborted, [job(2, 1).lease]);
    assert_eq!(fake.running_ids(), [1, 3]);
    // The next heartbeat carries only the leases still held.
    fake.wait_for_deadline();
    assert_eq!(fake.heartbeat_jobs(), [1, 3]);
}

#[test]
fn a_lease_claimed_after_the_heartbeat_went_out_is_not_aborted() {
    let mut fake = Fake::holding(4, &[1, 2]);
    fake.wait_for_deadline();
    assert_eq!(fake.heartbeat_jobs(), [1, 2]);
    // Job 2's attempt ends and the job is claimed again, as its second attempt, with job 3,
    // while the heartbeat is out.
    fake.finish(&[2]);
    fake.answer_call_with(vec![job(2, 2), job(3, 1)]);
    // The store no longer knew the first lease of job 2 (completed), nor any of job 3 then.
    fake.answer_heartbeat(&[2]);
    assert!(fake.aborted.is_empty());
    assert_eq!(fake.running_ids(), [1, 2, 3]);
    assert_eq!(fake.running[&2].lease.attempt, 2);
}

#[test]
fn a_failed_heartbeat_aborts_nothing_and_the_next_goes_out_on_time() {
    let mut fake = Fake::holding(4, &[1, 2]);
    fake.wait_for_deadline();
    let (leases, _) = fake.heartbeat.take().unwrap();
    fake.on(Event::HeartbeatDone {
        leases,
        kept: Err(StoreError::Unavailable("gone".to_owned())),
    });
    assert!(fake.aborted.is_empty());
    assert_eq!(fake.core.deadline(), Some(START + 2 * (LEASE / 3)));
}

// Cancel

#[test]
fn a_cancelled_run_has_its_step_aborted_and_its_slot_freed() {
    let mut fake = Fake::holding(2, &[1, 2]);
    assert!(!fake.core.takes_wakeups());
    fake.wait_for_deadline();
    // Run 1 was cancelled: the store did not extend its lease.
    fake.answer_heartbeat(&[1]);
    assert_eq!(fake.aborted, [job(1, 1).lease]);
    assert_eq!(fake.running_ids(), [2]);
    // The last claim was full, so the freed slot is claimed at once; nothing to record for it.
    assert_eq!(fake.calls.len(), 1);
    assert_eq!(fake.calls[0].asked, 1);
    assert!(fake.calls[0].batch.is_empty());
}

#[test]
fn the_result_of_a_step_aborted_as_it_ended_is_not_recorded() {
    let mut fake = Fake::holding(2, &[1, 2]);
    fake.wait_for_deadline();
    fake.answer_heartbeat(&[1]);
    fake.answer_call(&[]);
    // The task had finished before the abort reached it.
    fake.on(Event::StepsEnded(vec![StepEnd::Done(succeeded(
        &job(1, 1).lease,
    ))]));
    assert!(fake.calls.is_empty());
    fake.finish(&[2]);
    assert_eq!(jobs_of(&fake.calls[0].batch), [2]);
}

// Shutdown

#[test]
fn a_stopping_loop_claims_nothing() {
    let mut fake = Fake::holding(4, &[1, 2]);
    fake.on(Event::Shutdown);
    assert!(!fake.core.takes_wakeups());
    fake.on(Event::WakeUp);
    assert!(fake.calls.is_empty());
    fake.finish(&[1]);
    assert_eq!(fake.calls[0].asked, 0);
}

#[test]
fn steps_that_finish_within_the_grace_are_completed_and_then_the_loop_exits() {
    let mut fake = Fake::holding(4, &[1, 2]);
    fake.on(Event::Shutdown);
    assert_eq!(fake.core.deadline(), Some(START + LEASE / 3));
    fake.advance(GRACE - 1);
    fake.finish(&[1, 2]);
    assert!(!fake.exited, "a call is in flight");
    let call = fake.answer_call(&[]);
    assert_eq!(jobs_of(&call.batch), [1, 2]);
    assert!(
        call.batch
            .iter()
            .all(|c| matches!(c.settlement, Settlement::Succeed { .. }))
    );
    assert!(fake.exited);
    assert!(fake.aborted.is_empty());
}

#[test]
fn after_the_grace_what_still_runs_is_released_uncounted() {
    let mut fake = Fake::holding(4, &[1, 2, 3]);
    fake.clock.set(START + 1_000);
    fake.on(Event::Shutdown);
    fake.finish(&[1]);
    fake.answer_call(&[]);
    // A heartbeat still keeps the steps that run.
    fake.wait_for_deadline();
    assert_eq!(fake.heartbeat_jobs(), [2, 3]);
    fake.answer_heartbeat(&[]);
    assert_eq!(fake.core.deadline(), Some(START + 1_000 + GRACE));
    fake.wait_for_deadline();
    let mut aborted: Vec<JobId> = fake.aborted.iter().map(|l| l.job_id).collect();
    aborted.sort();
    assert_eq!(aborted, [2, 3]);
    let call = &fake.calls[0];
    assert_eq!(call.asked, 0);
    assert_eq!(call.batch.len(), 2);
    assert!(
        call.batch
            .iter()
            .all(|c| c.settlement == Settlement::Release)
    );
    assert!(!fake.exited);
    fake.answer_call(&[]);
    assert!(fake.exited);
    assert_eq!(fake.core.deadline(), None);
}

#[test]
fn jobs_a_call_claims_after_the_shutdown_are_given_back_unstarted() {
    let mut fake = Fake::started(4);
    fake.on(Event::Shutdown);
    fake.answer_call(&[1, 2]);
    assert!(fake.running.is_empty());
    let call = fake.answer_call(&[]);
    assert_eq!(jobs_of(&call.batch), [1, 2]);
    assert!(
        call.batch
            .iter()
            .all(|c| c.settlement == Settlement::Release)
    );
    assert!(fake.exited);
}

#[test]
fn a_loop_with_nothing_held_or_in_flight_exits_at_once_on_shutdown() {
    let mut fake = Fake::started(4);
    fake.answer_call(&[]);
    fake.on(Event::Shutdown);
    assert!(fake.exited);
}

// A panic outside a step kind

#[test]
fn a_step_task_that_panicked_keeps_no_slot_and_no_heartbeat() {
    let mut fake = Fake::holding(2, &[1, 2]);
    let lease = fake.running.remove(&1).unwrap().lease;
    fake.on(Event::StepsEnded(vec![StepEnd::Panicked(lease)]));
    // Its slot is claimed again at once (the last claim was full), and nothing is recorded for
    // it: its lease runs out and the sweep reclaims the job.
    assert_eq!(fake.calls.len(), 1);
    assert_eq!(fake.calls[0].asked, 1);
    assert!(fake.calls[0].batch.is_empty());
    fake.answer_call(&[]);
    fake.wait_for_deadline();
    assert_eq!(fake.heartbeat_jobs(), [2]);
    fake.finish(&[2]);
    fake.answer_call(&[]);
    assert_eq!(jobs_of(&fake.recorded), [2]);
}

// The architecture

#[test]
fn the_core_does_no_io_and_reads_no_clock() {
    let code: String = include_str!("../worker_loop.rs")
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    for reach in [
        "tokio",
        "async",
        ".await",
        "Instant",
        "SystemTime",
        "Clock",
        "Engine",
        "std::fs",
        "std::net",
        "std::thread",
        "rand::",
    ] {
        assert!(!code.contains(reach), "worker_loop.rs uses {reach}");
    }
}
