//! The worker loop's decisions, apart from its IO. [`WorkerLoop::next`] takes what happened (a
//! store call came back, steps ended, time passed) and the time, and returns what to do; the
//! driver does it and turns what follows into the next [`Event`]. Nothing here waits, reads a
//! clock, spawns or touches the store, so every rule of the loop is tested with plain values.
//!
//! Times are the engine clock's milliseconds, the clock leases and due times are written in: a
//! heartbeat's deadline moves with the leases it extends.

use std::collections::{HashMap, HashSet};

use switchyard_engine::state::{Millis, Settlement};
use switchyard_engine::store::{ClaimedJob, Completion, JobId, Lease, StoreError};

/// Store calls one loop keeps in flight. While one transaction completes and claims, the steps it
/// handed out finish and the next batch is already on its way, so neither the database nor the
/// steps wait for the other.
const STORE_CALLS_IN_FLIGHT: usize = 2;

/// The shortest wait before claiming again after a short claim: a job that fell due between the
/// claim and asking when the next one does has no wake-up to wait for.
const SHORTEST_CLAIM_WAIT: Millis = 5;

/// The loop's settings, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Jobs run at once; at least one.
    pub slots: usize,
    /// How long a claim or a heartbeat holds a job; heartbeats go out every third of it.
    pub lease: Millis,
    /// Longest wait between claims when no wake-up arrives.
    pub poll: Millis,
    /// After a shutdown, how long running steps may take before they are released.
    pub grace: Millis,
}

/// What happened since the last decision.
#[derive(Debug)]
pub(crate) enum Event {
    /// The loop starts with nothing held: it claims at once.
    Started,
    /// A [`Action::StoreCall`] came back: the jobs it claimed for the `asked` slots it reserved,
    /// or why it failed.
    StoreCallDone {
        asked: usize,
        claimed: Result<Vec<ClaimedJob>, StoreError>,
    },
    /// Step tasks that ended, all those ready at once, so that their completions share a batch.
    StepsEnded(Vec<StepEnd>),
    /// A [`Action::Heartbeat`] came back: the leases it carried, and the jobs whose lease the
    /// store extended.
    HeartbeatDone {
        leases: Vec<Lease>,
        kept: Result<Vec<JobId>, StoreError>,
    },
    /// The answer to [`Action::AskNextDue`]: when the next job falls due, if any job will.
    NextDue {
        after_call: u64,
        due: Option<Millis>,
    },
    /// The store made jobs claimable.
    WakeUp,
    /// Only time passed: a [`WorkerLoop::deadline`] came.
    Tick,
    /// Stop claiming; what runs gets the grace period.
    Shutdown,
}

/// How a step task ended.
#[derive(Debug)]
pub(crate) enum StepEnd {
    Done(Completion),
    /// A panic outside the step kind (a kind's own panic is its attempt's failure): nothing to
    /// complete. Its claim's lease runs out and the sweep reclaims the job.
    Panicked(Lease),
}

impl StepEnd {
    pub fn lease(&self) -> &Lease {
        match self {
            StepEnd::Done(completion) => &completion.lease,
            StepEnd::Panicked(lease) => lease,
        }
    }
}

/// What the driver must do, in order.
#[derive(Debug)]
pub(crate) enum Action {
    /// Complete `batch` and claim up to `asked` jobs in one transaction; answer with
    /// [`Event::StoreCallDone`].
    StoreCall {
        batch: Vec<Completion>,
        asked: usize,
    },
    /// Run the job's attempt in a task of its own; answer with [`Event::StepsEnded`].
    Spawn(Box<ClaimedJob>),
    /// Stop the task running under this lease (dropping its future is what stops the step): its
    /// result would not count, or it was released.
    Abort(Lease),
    /// Extend these leases until `until`, without waiting for it (the loop must keep driving the
    /// calls that hold connections a heartbeat may need); answer with [`Event::HeartbeatDone`].
    Heartbeat { leases: Vec<Lease>, until: Millis },
    /// Ask when the next job falls due; answer with [`Event::NextDue`] carrying `after_call`.
    AskNextDue { after_call: u64 },
    /// Stopped, and nothing is held or in flight: return.
    Exit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// No claims; running steps may finish until `grace_until`.
    Stopping {
        grace_until: Millis,
    },
    /// The grace is over and what still ran was released.
    Released,
}

/// The worker loop's state, changed only by [`WorkerLoop::next`].
pub(crate) struct WorkerLoop {
    timing: Timing,
    phase: Phase,
    /// The lease of every job whose task runs.
    held: HashMap<JobId, Lease>,
    /// Completions not yet sent.
    finished: Vec<Completion>,
    calls_in_flight: usize,
    /// Slots promised to the claims of calls in flight.
    reserved: usize,
    lone_claim_in_flight: bool,
    /// Store calls sent so far: an answer to [`Action::AskNextDue`] is dropped when a call went
    /// out after it was asked, since that call's own result tells what to do next.
    calls_sent: u64,
    want_claim: bool,
    claim_at: Option<Millis>,
    heartbeat_in_flight: bool,
    next_heartbeat: Millis,
}

impl WorkerLoop {
    pub fn new(timing: Timing) -> Self {
        WorkerLoop {
            timing: Timing {
                slots: timing.slots.max(1),
                ..timing
            },
            phase: Phase::Running,
            held: HashMap::new(),
            finished: Vec::new(),
            calls_in_flight: 0,
            reserved: 0,
            lone_claim_in_flight: false,
            calls_sent: 0,
            want_claim: true,
            claim_at: None,
            heartbeat_in_flight: false,
            next_heartbeat: 0,
        }
    }

    /// Takes `event`, which happened by `now`, and returns what to do.
    pub fn next(&mut self, event: Event, now: Millis) -> Vec<Action> {
        let mut actions = Vec::new();
        self.apply(event, now, &mut actions);
        self.on_time(now, &mut actions);
        self.send(&mut actions);
        if self.phase != Phase::Running
            && self.held.is_empty()
            && self.calls_in_flight == 0
            && self.finished.is_empty()
        {
            actions.push(Action::Exit);
        }
        actions
    }

    /// When the loop wants a [`Event::Tick`] if nothing else happens first.
    pub fn deadline(&self) -> Option<Millis> {
        let heartbeat =
            (!self.heartbeat_in_flight && !self.held.is_empty()).then_some(self.next_heartbeat);
        let grace = match self.phase {
            Phase::Stopping { grace_until } => Some(grace_until),
            _ => None,
        };
        [heartbeat, grace, self.claim_at]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether a wake-up would lead to a claim. Left unheard otherwise: the store signals one
    /// waiter, which should be a loop with room.
    pub fn takes_wakeups(&self) -> bool {
        self.phase == Phase::Running && self.held.len() + self.reserved < self.timing.slots
    }

    fn apply(&mut self, event: Event, now: Millis, actions: &mut Vec<Action>) {
        match event {
            Event::Started => self.next_heartbeat = now + self.heartbeat_every(),
            Event::StoreCallDone { asked, claimed } => {
                self.calls_in_flight -= 1;
                self.reserved -= asked;
                self.lone_claim_in_flight = false;
                match claimed {
                    Ok(jobs) => self.claimed(asked, jobs, actions),
                    Err(e) => {
                        tracing::warn!(error = %e, "claim failed; backing off");
                        self.claim_at = Some(now + self.timing.poll);
                    }
                }
            }
            Event::StepsEnded(ends) => {
                for end in ends {
                    // A task aborted as it ended has left `held` already, and its result does
                    // not count: its lease is gone, or it was released.
                    if self.held.get(&end.lease().job_id) != Some(end.lease()) {
                        continue;
                    }
                    self.held.remove(&end.lease().job_id);
                    if let StepEnd::Done(completion) = end {
                        self.finished.push(completion);
                    }
                }
            }
            Event::HeartbeatDone { leases, kept } => {
                self.heartbeat_in_flight = false;
                match kept {
                    Ok(kept) => {
                        let kept: HashSet<JobId> = kept.into_iter().collect();
                        // Only the leases this heartbeat carried: jobs claimed since are not in
                        // it, nor is a later lease on the same job.
                        for lease in leases.into_iter().filter(|l| !kept.contains(&l.job_id)) {
                            if self.held.get(&lease.job_id) == Some(&lease) {
                                tracing::info!(
                                    job = lease.job_id,
                                    "lease gone (cancelled, timed out or reclaimed): stopping the step"
                                );
                                self.held.remove(&lease.job_id);
                                actions.push(Action::Abort(lease));
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                }
            }
            Event::NextDue { after_call, due } => {
                if after_call == self.calls_sent {
                    let poll = self.timing.poll;
                    let wait =
                        due.map_or(poll, |due| (due - now).min(poll).max(SHORTEST_CLAIM_WAIT));
                    self.claim_at = Some(now + wait);
                }
            }
            Event::WakeUp => self.want_claim = true,
            Event::Tick => {}
            Event::Shutdown => {
                if self.phase == Phase::Running {
                    tracing::info!(running = self.held.len(), "worker stopping: no new claims");
                    self.phase = Phase::Stopping {
                        grace_until: now + self.timing.grace,
                    };
                }
            }
        }
    }

    fn claimed(&mut self, asked: usize, jobs: Vec<ClaimedJob>, actions: &mut Vec<Action>) {
        let got = jobs.len();
        for job in jobs {
            if self.phase == Phase::Running {
                self.held.insert(job.lease.job_id, job.lease.clone());
                actions.push(Action::Spawn(Box::new(job)));
            } else {
                // Claimed by a call sent before the shutdown: it has not started, so another
                // worker may as well start it.
                self.finished.push(released(job.lease));
            }
        }
        if asked > 0 && got == asked {
            // A full claim: more may be waiting.
            self.want_claim = true;
        } else if asked > 0 && self.phase == Phase::Running {
            actions.push(Action::AskNextDue {
                after_call: self.calls_sent,
            });
        }
    }

    fn on_time(&mut self, now: Millis, actions: &mut Vec<Action>) {
        if let Phase::Stopping { grace_until } = self.phase
            && now >= grace_until
        {
            tracing::info!(
                released = self.held.len(),
                "grace period over: releasing running jobs"
            );
            for (_, lease) in self.held.drain() {
                actions.push(Action::Abort(lease.clone()));
                self.finished.push(released(lease));
            }
            self.phase = Phase::Released;
        }
        if self.claim_at.is_some_and(|at| now >= at) {
            self.claim_at = None;
            self.want_claim = true;
        }
        if !self.heartbeat_in_flight && !self.held.is_empty() && now >= self.next_heartbeat {
            self.heartbeat_in_flight = true;
            self.next_heartbeat = now + self.heartbeat_every();
            actions.push(Action::Heartbeat {
                leases: self.held.values().cloned().collect(),
                until: now + self.timing.lease,
            });
        }
    }

    fn send(&mut self, actions: &mut Vec<Action>) {
        let free = match self.phase {
            Phase::Running => self
                .timing
                .slots
                .saturating_sub(self.held.len() + self.reserved),
            _ => 0,
        };
        // Finished attempts always carry a claim for the free slots: it costs no extra commit.
        let asked = if self.want_claim || !self.finished.is_empty() {
            free
        } else {
            0
        };
        // Only completions overlap, and only large batches: a database settles a job for less in
        // a batch of hundreds than in two of half the size, so a second batch goes out beside the
        // first only once it holds half the slots. A claim alone waits for the call in flight,
        // and is waited for: two claims at once would split the free slots between them, and a
        // claim for one slot that comes back full says nothing about what else is waiting.
        let send = if self.finished.is_empty() {
            asked > 0 && self.calls_in_flight == 0
        } else {
            self.calls_in_flight == 0
                || (self.calls_in_flight < STORE_CALLS_IN_FLIGHT
                    && !self.lone_claim_in_flight
                    && self.finished.len() >= self.timing.slots / 2)
        };
        if send {
            let batch = std::mem::take(&mut self.finished);
            self.lone_claim_in_flight = batch.is_empty();
            self.reserved += asked;
            self.want_claim = false;
            self.claim_at = None;
            self.calls_in_flight += 1;
            self.calls_sent += 1;
            actions.push(Action::StoreCall { batch, asked });
        }
    }

    fn heartbeat_every(&self) -> Millis {
        (self.timing.lease / 3).max(1)
    }
}

/// Gives a job back uncounted: its attempt did not happen, or was cut short by a shutdown.
fn released(lease: Lease) -> Completion {
    Completion {
        lease,
        settlement: Settlement::Release,
        children: Vec::new(),
        logs: Vec::new(),
        artifacts: Vec::new(),
        usage: Vec::new(),
    }
}

#[cfg(test)]
mod tests;
