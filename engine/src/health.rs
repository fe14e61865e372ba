//! What `/health` reports ([`Engine::health`]): whether this process can reach its database and
//! write to it, and whether its scheduler ticks ([`Heartbeats`]). A background task probes the
//! database once a second with a deadline ([`watch_database`]), so `/health` and the API answer
//! at once while the database is away, instead of each request waiting out the connection pool's
//! timeout; and a database that answers but cannot write (a full disk) is told apart from one
//! that is gone.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;

use crate::service::Engine;
use crate::state::Millis;

/// How long a probe may take before the database counts as not answering.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(1);
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe older than this is taken again before it is reported.
const FRESH_FOR_MS: Millis = 2_000;

/// A scheduler ticks at least once a minute; twice that without a tick means it is stuck.
const SCHEDULER_STALE_MS: Millis = 120_000;

/// Liveness facts the tasks of a process publish for `/health`.
#[derive(Debug, Default)]
pub struct Heartbeats {
    /// When the scheduler last finished a tick (ms); 0 when no scheduler runs here.
    pub scheduler_tick_at: AtomicI64,
}

impl Heartbeats {
    /// When this process's scheduler last ticked; `None` when none runs here.
    pub fn scheduler_tick(&self) -> Option<Millis> {
        let at = self.scheduler_tick_at.load(Ordering::Relaxed);
        (at != 0).then_some(at)
    }
}

/// The health of a process: its database as last probed, and its scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub database: DatabaseState,
    /// Milliseconds since this process's scheduler last ticked; `None` when none runs here.
    pub scheduler_tick_ms_ago: Option<Millis>,
}

impl Health {
    /// Whether the scheduler ticked lately; `None` when none runs here.
    pub fn scheduler_alive(&self) -> Option<bool> {
        self.scheduler_tick_ms_ago
            .map(|ago| ago < SCHEDULER_STALE_MS)
    }
}

/// What the last probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseState {
    /// Not probed yet.
    Unknown,
    /// It answered and took a write; with the jobs claimable now, if it counted them in time.
    Ok { queue_depth: Option<i64> },
    /// It answers, but a write failed (a full disk, a read-only file).
    CannotWrite {
        queue_depth: Option<i64>,
        cause: String,
    },
    /// It did not answer within the deadline, or refused the connection.
    Unreachable { cause: String },
}

impl DatabaseState {
    /// Why the database cannot serve, if it cannot.
    pub fn problem(&self) -> Option<String> {
        match self {
            DatabaseState::Ok { .. } | DatabaseState::Unknown => None,
            DatabaseState::CannotWrite { cause, .. } => Some(format!("cannot write: {cause}")),
            DatabaseState::Unreachable { cause } => Some(format!("does not answer: {cause}")),
        }
    }

    /// Jobs claimable now, when the database answered.
    pub fn queue_depth(&self) -> Option<i64> {
        match self {
            DatabaseState::Ok { queue_depth } | DatabaseState::CannotWrite { queue_depth, .. } => {
                *queue_depth
            }
            DatabaseState::Unreachable { .. } | DatabaseState::Unknown => None,
        }
    }
}

#[derive(Debug, Clone)]
struct Probe {
    at: Millis,
    state: DatabaseState,
}

/// The last probe, shared by the probing task and whoever reports it; one probe at a time, so a
/// flood of `/health` requests against a struggling database starts no more of them.
#[derive(Debug, Default)]
pub(crate) struct DatabaseHealth {
    last: RwLock<Option<Probe>>,
    probing: tokio::sync::Mutex<()>,
}

impl Engine {
    /// This process's health: the database as last probed (again when that is old), and how
    /// long ago the scheduler of `heartbeats` ticked.
    pub async fn health(&self, heartbeats: &Heartbeats) -> Health {
        let scheduler_tick_ms_ago = heartbeats.scheduler_tick().map(|at| self.now() - at);
        Health {
            database: self.database().await,
            scheduler_tick_ms_ago,
        }
    }

    /// Probes the database now: a round trip that reads nothing, then a small write, each within
    /// [`PROBE_DEADLINE`]; and the queue's depth, which a large backlog may make too slow to
    /// count, without it deciding anything. A probe already going is waited for, not doubled.
    pub async fn probe_database(&self) -> DatabaseState {
        let asked = self.now();
        let _probing = self.database_health().probing.lock().await;
        if let Some(probe) = self.last_probe().filter(|p| p.at >= asked) {
            return probe.state;
        }
        let now = self.now();
        let store = self.store();
        let within = |what: &'static str| format!("{what} took over {PROBE_DEADLINE:?}");
        let ping = || async {
            match tokio::time::timeout(PROBE_DEADLINE, store.ping()).await {
                Err(_) => Err(within("an answer")),
                Ok(answer) => answer.map_err(|e| e.to_string()),
            }
        };
        let state = match ping().await {
            Err(cause) => DatabaseState::Unreachable { cause },
            Ok(()) => {
                let queue_depth = tokio::time::timeout(PROBE_DEADLINE, store.queue_depth(now))
                    .await
                    .ok()
                    .and_then(Result::ok);
                let written =
                    match tokio::time::timeout(PROBE_DEADLINE, store.probe_write(now)).await {
                        Ok(written) => written.map_err(|e| e.to_string()),
                        Err(_) => Err(within("a write")),
                    };
                match written {
                    Ok(()) => DatabaseState::Ok { queue_depth },
                    // A write that failed because the server went away is not a full disk.
                    Err(cause) => match ping().await {
                        Err(cause) => DatabaseState::Unreachable { cause },
                        Ok(()) => DatabaseState::CannotWrite { queue_depth, cause },
                    },
                }
            }
        };
        let previous = self
            .database_health()
            .last
            .write()
            .expect("health lock poisoned")
            .replace(Probe {
                at: now,
                state: state.clone(),
            });
        let was = previous.map(|p| p.state.problem());
        match (was.flatten(), state.problem()) {
            (None, Some(problem)) => tracing::error!(%problem, "the database fails"),
            (Some(_), None) => tracing::info!("the database is back"),
            _ => {}
        }
        state
    }

    /// The database's state as last probed, probing again when that is over two seconds old.
    pub async fn database(&self) -> DatabaseState {
        match self.last_probe() {
            Some(probe) if self.now() - probe.at < FRESH_FOR_MS => probe.state,
            _ => self.probe_database().await,
        }
    }

    /// Why requests should not wait for the database: it did not answer its last probe.
    pub fn database_unreachable(&self) -> Option<String> {
        match self.last_probe()?.state {
            state @ DatabaseState::Unreachable { .. } => state.problem(),
            _ => None,
        }
    }

    fn last_probe(&self) -> Option<Probe> {
        self.database_health()
            .last
            .read()
            .expect("health lock poisoned")
            .clone()
    }
}

/// Probes the database every second until `shutdown` turns true.
pub async fn watch_database(engine: Arc<Engine>, mut shutdown: watch::Receiver<bool>) {
    loop {
        engine.probe_database().await;
        let stopped = tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => false,
            changed = shutdown.changed() => changed.is_err(),
        };
        if stopped || *shutdown.borrow() {
            return;
        }
    }
}
