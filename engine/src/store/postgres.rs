//! PostgreSQL: one database shared by any number of schedulers and workers on any number of hosts.
//! Claims take rows with `FOR UPDATE SKIP LOCKED`, so workers never wait on each other's claims;
//! every statement handles a whole batch (`unnest` of column arrays or `jsonb_to_recordset`);
//! `LISTEN/NOTIFY` wakes workers in every process, with polling as the fallback.
//!
//! A queue's tables change faster than autovacuum re-analyses them (100k runs can go from
//! `running` to `succeeded` in seconds), so statements start from the batch and reach rows by
//! primary or unique key (joins from `unnest`, `LATERAL` lookups): their plans stay right whatever
//! the statistics say. A join the planner may turn into a scan of `runs` or `jobs` by `status`
//! costs tens of milliseconds per batch once statistics are stale.
//!
//! Under READ COMMITTED two transactions that each settle one of a run's last two steps would each
//! see the other step unfinished, and the run would never finish. So a transaction locks the runs
//! it settles (in id order) before it looks at their jobs, and the parent runs of the child runs it
//! finishes; concurrency gates are serialised per key with transaction-scoped advisory locks, which
//! a dead process cannot hold (its transaction ends with its connection).

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, QueryBuilder, Row};
use tokio::sync::Notify;

use super::*;
use crate::state::{JobState, Millis, RunStatus, settle_lost_lease};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

/// The states a run is still going in.
const ACTIVE_RUN: &str = "('pending', 'running')";
/// The states a job is not finished in.
const OPEN_JOB: &str = "('waiting', 'available', 'running', 'retrying', 'parked')";
/// States a job is claimed from; such a job has a `job_queue` row exactly when it has a
/// `run_after` (a parked job without one waits for its children, not for a time).
const CLAIMABLE_JOB: &str = "('available', 'retrying', 'parked')";

pub struct PostgresStore {
    pool: PgPool,
    wakeup: Arc<Notify>,
    /// The `NOTIFY` channel of this store's schema, so databases shared by several deployments
    /// (or test schemas) do not wake each other.
    channel: String,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl PostgresStore {
    /// Opens a pool of at most `max_connections` connections (plus one for `LISTEN`).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::UnsupportedUrl(format!("{}: {e}", redact_url(url))))?
            // Queue statements touch a few rows by index but are costed on the whole table: with
            // a large backlog the planner JIT-compiles them, which costs hundreds of
            // milliseconds per statement (a claim with 1M queued: 5 ms without, 520 ms with).
            // Every statement here has an index to follow, and a plan built while a table was
            // small, or without statistics (autovacuum may be off), must not scan it whole once
            // it has grown: a prepared statement keeps its plan.
            .options([("jit", "off"), ("enable_seqscan", "off")]);
        let pool = PgPoolOptions::new()
            // `PgListener` holds one of the pool's connections for as long as it listens.
            .max_connections(max_connections.max(1) + 1)
            // A ping before every use is a round trip on every transaction of the job cycle. A
            // connection that died idle (the server restarted) fails its first statement instead,
            // as a transient error that the callers retry, and is not returned to the pool.
            .test_before_acquire(false)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        let schema = search_path_schema(&pool).await?;
        let channel: String = format!("switchyard_{schema}").chars().take(63).collect();
        let wakeup = Arc::new(Notify::new());
        let listener = tokio::spawn(listen(pool.clone(), channel.clone(), wakeup.clone()));
        Ok(PostgresStore {
            pool,
            wakeup,
            channel,
            listener,
        })
    }

    /// Enqueues runs inside the caller's own transaction: they exist, and workers hear of them,
    /// once it commits, and never if it rolls back. The runs come from
    /// [`Engine::plan`](crate::service::Engine::plan); the connection may belong to any pool on
    /// the same database and schema.
    pub async fn enqueue_in(
        &self,
        conn: &mut PgConnection,
        runs: Vec<NewRun>,
        now: Millis,
    ) -> Result<Vec<RunId>> {
        let ids = insert_runs(conn, runs, now).await?;
        self.notify(conn).await?;
        Ok(ids)
    }

    async fn notify(&self, conn: &mut PgConnection) -> Result<()> {
        // Delivered at commit, to every listening process (this one included).
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(&self.channel)
            .execute(&mut *conn)
            .await?;
        Ok(())
    }
}

/// The first schema of the connection's `search_path`: where migrations create the tables.
async fn search_path_schema(pool: &PgPool) -> Result<String> {
    let path: String = sqlx::query_scalar("SHOW search_path")
        .fetch_one(pool)
        .await?;
    let first = path
        .split(',')
        .map(|s| s.trim().trim_matches('"'))
        .find(|s| *s != "$user" && !s.is_empty())
        .unwrap_or("public");
    Ok(first.to_owned())
}

/// Turns notifications into wake-ups until the store is dropped. While the connection is down,
/// notifications are lost, so every reconnection wakes the workers once to look for themselves.
async fn listen(pool: PgPool, channel: String, wakeup: Arc<Notify>) {
    let mut failures = 0u32;
    loop {
        let connected = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(&channel).await?;
            Ok::<_, sqlx::Error>(listener)
        }
        .await;
        let mut listener = match connected {
            Ok(listener) => listener,
            Err(e) => {
                failures += 1;
                let wait = Duration::from_millis(100 * 2u64.pow(failures.min(6)));
                tracing::warn!(error = %e, ?wait, "LISTEN connection failed; workers poll until it is back");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        failures = 0;
        wakeup.notify_one();
        loop {
            match listener.try_recv().await {
                Ok(Some(_)) => wakeup.notify_one(),
                // The connection dropped; the next `try_recv` reconnects and listens again.
                Ok(None) => wakeup.notify_one(),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection lost");
                    break;
                }
            }
        }
    }
}

/// Serialises transactions that touch the same key (a concurrency gate, a workflow's versions)
/// until they end.
async fn lock_key(conn: &mut PgConnection, key: &str) -> Result<()> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(key)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Locks runs in id order, so transactions locking overlapping sets never deadlock each other.
async fn lock_runs_of_jobs(conn: &mut PgConnection, jobs: &[JobId]) -> Result<()> {
    sqlx::query(
        "SELECT id FROM runs WHERE id IN (SELECT run_id FROM jobs WHERE id = ANY($1)) \
         ORDER BY id FOR UPDATE",
    )
    .bind(jobs)
    .fetch_all(&mut *conn)
    .await?;
    Ok(())
}

fn setting_from_row(row: &PgRow) -> Setting {
    Setting {
        name: row.get("name"),
        value: row.get("value"),
        updated_at: row.get("updated_at"),
    }
}

fn finished_from_row(row: &PgRow) -> Result<FinishedRun> {
    Ok(FinishedRun {
        id: row.get("id"),
        workflow_id: row.get("workflow_id"),
        status: parse_state(row.get::<&str, _>("status"))?,
        parent_job_id: row.get("parent_job_id"),
        concurrency_key: row.get("concurrency_key"),
    })
}

/// What a transaction changed that workers elsewhere should hear about.
#[derive(Default)]
struct Effects {
    /// Jobs became claimable: these, and others when `woke`.
    ready: Vec<JobId>,
    woke: bool,
    finished: FinishedRuns,
}

impl Effects {
    /// Whether other workers may find jobs this transaction made claimable and did not claim
    /// itself.
    fn wakes_others(&self, claimed: &[ClaimedJob]) -> bool {
        self.woke
            || self
                .ready
                .iter()
                .any(|id| !claimed.iter().any(|c| c.lease.job_id == *id))
    }
}

/// A step whose job just succeeded. Only a sink's success can finish its run: every other step
/// has a dependent that has not run yet.
struct Succeeded {
    run_id: RunId,
    step_id: String,
    is_sink: bool,
}

/// Inserts runs and their jobs: a constant number of statements however many runs. Returns the
/// run ids, in order, with an earlier run's id where its idempotency key was already used.
async fn insert_runs(
    conn: &mut PgConnection,
    runs: Vec<NewRun>,
    now: Millis,
) -> Result<Vec<RunId>> {
    let keys: Vec<&String> = runs
        .iter()
        .filter_map(|r| r.idempotency_key.as_ref())
        .collect();
    let mut known: BTreeMap<String, RunId> = if keys.is_empty() {
        BTreeMap::new()
    } else {
        sqlx::query_as(
            "SELECT idempotency_key, id FROM runs WHERE idempotency_key = ANY($1::text[])",
        )
        .bind(&keys)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect()
    };
    let fresh: Vec<NewRun> = runs
        .iter()
        .filter(|r| {
            r.idempotency_key
                .as_ref()
                .is_none_or(|k| !known.contains_key(k))
        })
        .cloned()
        .collect();

    // A gated run starts only while fewer than `limit` runs with its key are running and none
    // waits ahead of it.
    let gates: BTreeSet<&String> = fresh
        .iter()
        .filter_map(|r| r.concurrency.as_ref().map(|c| &c.key))
        .collect();
    let mut room: BTreeMap<String, i64> = BTreeMap::new();
    for key in gates {
        lock_key(conn, &format!("gate/{key}")).await?;
        let (running, pending): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'running'), \
                    count(*) FILTER (WHERE status = 'pending') \
             FROM runs WHERE concurrency_key = $1 AND status IN ('pending', 'running')",
        )
        .bind(key)
        .fetch_one(&mut *conn)
        .await?;
        let limit = fresh
            .iter()
            .find_map(|r| r.concurrency.as_ref().filter(|c| &c.key == key))
            .map_or(0, |c| c.limit);
        room.insert(key.clone(), if pending > 0 { 0 } else { limit - running });
    }

    let mut rows = Vec::with_capacity(fresh.len());
    let mut jobs = Vec::new();
    for run in &fresh {
        let gated = match &run.concurrency {
            None => false,
            Some(gate) => {
                let free = room.get_mut(&gate.key).expect("counted above");
                *free -= 1;
                *free < 0
            }
        };
        let status = if gated {
            RunStatus::Pending
        } else {
            RunStatus::Running
        };
        rows.push(json!({
            "id": run.id,
            "workflow_id": run.workflow_id,
            "version": run.version,
            "status": status.as_str(),
            "input": run.input,
            "parent_run_id": run.parent.as_ref().map(|p| &p.run_id),
            "parent_job_id": run.parent.as_ref().map(|p| p.job_id),
            "child_index": run.parent.as_ref().map(|p| p.index),
            "concurrency_key": run.concurrency.as_ref().map(|c| &c.key),
            "concurrency_limit": run.concurrency.as_ref().map(|c| c.limit),
            "idempotency_key": run.idempotency_key,
            "timeout_ms": run.timeout_ms,
            "deadline_at": run.timeout_ms.map(|t| now + t),
            "retention_ms": run.retention_ms,
            "scheduled_at": run.scheduled_at,
            "started_at": (!gated).then_some(now),
        }));
        for job in &run.jobs {
            jobs.push(json!({
                "run_id": run.id,
                "step_id": job.step_id,
                "needs": job.needs,
                "pending": job.needs.len(),
                "is_sink": job.is_sink,
                "budget": job.max_attempts,
                "ready": !gated && job.needs.is_empty(),
            }));
        }
    }
    let mut inserted: BTreeSet<RunId> = BTreeSet::new();
    if !rows.is_empty() {
        // A concurrent start with the same idempotency key may commit first: its run wins.
        inserted = sqlx::query_scalar(
            "INSERT INTO runs (id, workflow_id, version, status, input, parent_run_id, \
                 parent_job_id, child_index, concurrency_key, concurrency_limit, idempotency_key, \
                 timeout_ms, deadline_at, retention_ms, scheduled_at, created_at, started_at) \
             SELECT r.id, r.workflow_id, r.version, r.status, coalesce(r.input, 'null'), \
                 r.parent_run_id, r.parent_job_id, r.child_index, r.concurrency_key, \
                 r.concurrency_limit, r.idempotency_key, r.timeout_ms, r.deadline_at, \
                 r.retention_ms, r.scheduled_at, $2, r.started_at \
             FROM jsonb_to_recordset($1) AS r(id text, workflow_id text, version bigint, \
                 status text, input jsonb, parent_run_id text, parent_job_id bigint, \
                 child_index bigint, concurrency_key text, concurrency_limit bigint, \
                 idempotency_key text, timeout_ms bigint, deadline_at bigint, retention_ms bigint, \
                 scheduled_at bigint, started_at bigint) \
             ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
             RETURNING id",
        )
        .bind(Value::Array(rows))
        .bind(now)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
        jobs.retain(|j| inserted.contains(j["run_id"].as_str().unwrap_or_default()));
    }
    if !jobs.is_empty() {
        sqlx::query(
            "WITH made AS ( \
                 INSERT INTO jobs (run_id, step_id, state, needs, pending_needs, is_sink, \
                     attempt_budget, max_attempts, run_after) \
                 SELECT j.run_id, j.step_id, \
                     CASE WHEN j.ready THEN 'available' ELSE 'waiting' END, \
                     j.needs, j.pending, j.is_sink, j.budget, j.budget, $2 \
                 FROM jsonb_to_recordset($1) AS j(run_id text, step_id text, needs jsonb, \
                     pending int, is_sink boolean, budget int, ready boolean) \
                 RETURNING id, state, run_after) \
             INSERT INTO job_queue (run_after, job_id) \
             SELECT run_after, id FROM made WHERE state = 'available' ON CONFLICT DO NOTHING",
        )
        .bind(Value::Array(jobs))
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    // Keys that lost a race to a concurrent start: look up the winner.
    let lost: Vec<&String> = fresh
        .iter()
        .filter(|r| !inserted.contains(&r.id))
        .filter_map(|r| r.idempotency_key.as_ref())
        .collect();
    if !lost.is_empty() {
        let winners: Vec<(String, RunId)> = sqlx::query_as(
            "SELECT idempotency_key, id FROM runs WHERE idempotency_key = ANY($1::text[])",
        )
        .bind(&lost)
        .fetch_all(&mut *conn)
        .await?;
        known.extend(winners);
    }
    Ok(runs
        .iter()
        .map(|r| match &r.idempotency_key {
            Some(key) if !inserted.contains(&r.id) => {
                known.get(key).cloned().unwrap_or_else(|| r.id.clone())
            }
            _ => r.id.clone(),
        })
        .collect())
}

/// Applies settlements fenced by their leases, then everything that follows from them.
async fn complete_in(
    conn: &mut PgConnection,
    completions: Vec<Completion>,
    now: Millis,
    effects: &mut Effects,
) -> Result<Vec<JobId>> {
    if completions.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<JobId> = completions.iter().map(|c| c.lease.job_id).collect();
    let payload = completion_rows(&completions, now);
    // One statement, one round trip, in three parts:
    // - `locked` takes the runs' locks first, in id order (see `lock_runs_of_jobs`); the
    //   uncorrelated subquery in `settled`'s filter runs once, before any job is written.
    // - `settled`: only rows still `running` under the same attempt and token change, so a late
    //   answer from a worker whose lease expired matches nothing. `id = ANY($3)` keeps the lookup
    //   on the primary key whatever the statistics say. Jobs it leaves claimable join the queue. The attempt history records
    //   unsuccessful attempts only; the succeeding one is the row's own timings.
    // - `promoted`: the dependents of the steps that succeeded. It writes `waiting` rows,
    //   `settled` writes `running` ones, so the two never touch the same row.
    let rows = sqlx::query(&format!(
        "WITH locked AS MATERIALIZED ( \
             SELECT id FROM runs WHERE id IN (SELECT run_id FROM jobs WHERE id = ANY($3)) \
             ORDER BY id FOR UPDATE), \
         settled AS ( \
             UPDATE jobs SET \
                 state = c.state, \
                 output = c.output::jsonb, \
                 error = c.error, \
                 run_after = CASE WHEN c.state = 'parked' AND {CALLBACK_WAITING} THEN $2 \
                     ELSE c.run_after END, \
                 checkpoint = CASE WHEN {CALLBACK_WAITING} THEN c.checkpoint::jsonb \
                         || jsonb_build_object('callback', jobs.checkpoint->'callback') \
                     WHEN c.state IN ('parked', 'available') \
                         OR jsonb_typeof(coalesce(c.checkpoint::jsonb, jobs.checkpoint)) \
                             IS DISTINCT FROM 'object' \
                     THEN coalesce(c.checkpoint::jsonb, jobs.checkpoint) \
                     ELSE coalesce(c.checkpoint::jsonb, jobs.checkpoint) \
                         - 'callback_token' - 'callback' END, \
                 attempt = jobs.attempt - (c.state = 'available')::int, \
                 lease_token = NULL, \
                 finished_at = CASE WHEN c.state IN ('succeeded', 'failed') THEN $2 END, \
                 attempts = CASE WHEN c.state IN ('failed', 'retrying') \
                     THEN jobs.attempts || jsonb_build_array(jsonb_build_object( \
                         'attempt', jobs.attempt, 'started_at', jobs.started_at, \
                         'finished_at', $2::bigint, 'outcome', c.state, 'error', c.error)) \
                     ELSE jobs.attempts END \
             FROM jsonb_to_recordset($1) AS c(id bigint, attempt int, token text, state text, \
                 output text, error text, run_after bigint, checkpoint text) \
             WHERE jobs.id = ANY($3) AND jobs.id = c.id AND jobs.attempt = c.attempt \
                 AND jobs.lease_token = c.token AND jobs.state = 'running' \
                 AND (SELECT count(*) FROM locked) >= 0 \
             RETURNING jobs.id, jobs.run_id, jobs.step_id, jobs.state, jobs.error, jobs.is_sink, \
                 jobs.run_after), \
         requeued AS ( \
             INSERT INTO job_queue (run_after, job_id) SELECT run_after, id FROM settled \
             WHERE state IN {CLAIMABLE_JOB} AND run_after IS NOT NULL \
             ON CONFLICT DO NOTHING), \
         succeeded AS ( \
             SELECT run_id, step_id FROM settled WHERE state = 'succeeded' AND NOT is_sink), \
         {PROMOTE_DEPENDENTS} \
         SELECT id, run_id, step_id, state, error, is_sink, false AS promoted FROM settled \
         UNION ALL \
         SELECT id, NULL, NULL, state, NULL, NULL, true FROM promoted"
    ))
    .bind(payload)
    .bind(now)
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;

    let mut accepted_ids = Vec::with_capacity(rows.len());
    let mut sinks_succeeded = Vec::new();
    let mut failed = Vec::new();
    for row in &rows {
        let id: JobId = row.get("id");
        let state = parse_state::<JobState>(row.get::<&str, _>("state"))?;
        if row.get("promoted") {
            if state == JobState::Available {
                effects.ready.push(id);
            }
            continue;
        }
        accepted_ids.push(id);
        let run_id: String = row.get("run_id");
        let step_id: String = row.get("step_id");
        match state {
            JobState::Succeeded if row.get::<bool, _>("is_sink") => {
                sinks_succeeded.push(Succeeded {
                    run_id,
                    step_id,
                    is_sink: true,
                })
            }
            JobState::Failed => {
                let error: Option<String> = row.get("error");
                failed.push((
                    run_id,
                    format!("step {step_id} failed: {}", error.unwrap_or_default()),
                ));
            }
            JobState::Available | JobState::Retrying => effects.ready.push(id),
            _ => {}
        }
    }
    let children: Vec<NewRun> = completions
        .into_iter()
        .filter(|c| accepted_ids.contains(&c.lease.job_id))
        .flat_map(|c| c.children)
        .collect();
    if !children.is_empty() {
        insert_runs(conn, children, now).await?;
        effects.woke = true;
    }
    // The other steps that succeeded have promoted their dependents above.
    cascade(
        conn,
        sinks_succeeded,
        failed,
        RunStatus::Failed,
        now,
        effects,
    )
    .await?;
    Ok(accepted_ids)
}

/// In a settlement (`c`) of a job: a result delivered while the step ran, under the token it
/// parks with now (see `Store::deliver_callback`). The step keeps it and wakes at once. A callback
/// token lives as long as its attempt (parked, running, or given back by a worker shutting down):
/// any other settlement drops it, so a late answer to an attempt that ended is refused rather than
/// kept for the next one.
const CALLBACK_WAITING: &str = "(jobs.checkpoint ? 'callback' \
     AND c.checkpoint::jsonb->>'callback_token' = jobs.checkpoint->>'callback_token')";

/// Follows settled jobs to their consequences until nothing more changes: dependents become
/// available, runs finish, a finished child run settles its parent's `workflow` step (which may
/// finish the parent run in turn), and gates open for waiting runs.
async fn cascade(
    conn: &mut PgConnection,
    mut succeeded: Vec<Succeeded>,
    mut ended: Vec<(RunId, String)>,
    mut ended_as: RunStatus,
    now: Millis,
    effects: &mut Effects,
) -> Result<()> {
    loop {
        let mut finished = Vec::new();
        let (sinks, inner): (Vec<&Succeeded>, Vec<&Succeeded>) =
            succeeded.iter().partition(|s| s.is_sink);
        if !inner.is_empty() {
            effects
                .ready
                .extend(promote_dependents(conn, &inner, now).await?);
        }
        if !sinks.is_empty() {
            let runs: BTreeSet<&RunId> = sinks.iter().map(|s| &s.run_id).collect();
            finished.extend(finish_succeeded_runs(conn, &runs, now).await?);
        }
        if !ended.is_empty() {
            finished.extend(end_runs(conn, &ended, ended_as, now).await?);
        }
        effects.finished.add(&finished);
        effects.woke |= open_gates(conn, &finished, now).await?;
        (succeeded, ended) = settle_parents(conn, &finished, now).await?;
        // a parent whose child did not succeed fails like any step
        ended_as = RunStatus::Failed;
        if succeeded.is_empty() && ended.is_empty() {
            return Ok(());
        }
    }
}

/// Every waiting job counts down the needs that just succeeded, and becomes available (and
/// queued) at zero.
/// `OFFSET 0` keeps the lookup a per-step index probe; flattened into a join, it becomes a scan of
/// every job. Selects the ids of the jobs that became available, from `succeeded(run_id, step_id)`,
/// which the caller defines.
const PROMOTE_DEPENDENTS: &str = "promoted AS ( \
     UPDATE jobs SET \
         pending_needs = jobs.pending_needs - d.n, \
         state = CASE WHEN jobs.pending_needs - d.n <= 0 \
             AND (SELECT status FROM runs WHERE id = jobs.run_id) = 'running' \
             THEN 'available' ELSE 'waiting' END, \
         run_after = $2 \
     FROM (SELECT j.id, count(*) AS n FROM succeeded AS s \
           CROSS JOIN LATERAL (SELECT id FROM jobs WHERE run_id = s.run_id \
               AND state = 'waiting' AND needs ? s.step_id OFFSET 0) AS j \
           GROUP BY j.id) AS d \
     WHERE jobs.id = d.id \
     RETURNING jobs.id, jobs.state, jobs.run_after), \
 promoted_queued AS ( \
     INSERT INTO job_queue (run_after, job_id) \
     SELECT run_after, id FROM promoted WHERE state = 'available' \
     ON CONFLICT DO NOTHING)";

/// Promotes the dependents of steps that succeeded (see `PROMOTE_DEPENDENTS`); returns the jobs
/// that became available.
async fn promote_dependents(
    conn: &mut PgConnection,
    succeeded: &[&Succeeded],
    now: Millis,
) -> Result<Vec<JobId>> {
    let (runs, steps): (Vec<&str>, Vec<&str>) = succeeded
        .iter()
        .map(|s| (s.run_id.as_str(), s.step_id.as_str()))
        .unzip();
    Ok(sqlx::query_scalar(&format!(
        "WITH succeeded AS (SELECT * FROM unnest($1::text[], $3::text[]) AS c(run_id, step_id)), \
         {PROMOTE_DEPENDENTS} \
         SELECT id FROM promoted WHERE state = 'available'"
    ))
    .bind(&runs)
    .bind(now)
    .bind(&steps)
    .fetch_all(&mut *conn)
    .await?)
}

/// Marks `succeeded` the runs among `runs` whose every job succeeded; the output maps each sink
/// step to its output. One read of each run's jobs answers both.
async fn finish_succeeded_runs(
    conn: &mut PgConnection,
    runs: &BTreeSet<&RunId>,
    now: Millis,
) -> Result<Vec<FinishedRun>> {
    let ids: Vec<&str> = runs.iter().map(|r| r.as_str()).collect();
    let rows = sqlx::query(
        "UPDATE runs SET status = 'succeeded', finished_at = $2, expires_at = $2 + retention_ms, \
             output = s.output \
         FROM unnest($1::text[]) AS c(id) \
         CROSS JOIN LATERAL ( \
             SELECT bool_and(state = 'succeeded') AS done, \
                 coalesce(jsonb_object_agg(step_id, output) FILTER (WHERE is_sink), '{}') \
                     AS output \
             FROM jobs WHERE run_id = c.id) AS s \
         WHERE runs.id = c.id AND runs.status = 'running' AND s.done \
         RETURNING runs.id, runs.workflow_id, runs.status, runs.parent_job_id, \
             runs.concurrency_key",
    )
    .bind(&ids)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(finished_from_row).collect()
}

/// Ends active runs as `status` with their errors, and with them every open job and every active
/// descendant run (cancelled).
async fn end_runs(
    conn: &mut PgConnection,
    runs: &[(RunId, String)],
    status: RunStatus,
    now: Millis,
) -> Result<Vec<FinishedRun>> {
    let (ids, errors): (Vec<&str>, Vec<&str>) =
        runs.iter().map(|(r, e)| (r.as_str(), e.as_str())).unzip();
    let rows = sqlx::query(&format!(
        "UPDATE runs SET status = $3, error = c.error, finished_at = $4, \
             expires_at = $4 + retention_ms \
         FROM unnest($1::text[], $2::text[]) AS c(id, error) \
         WHERE runs.id = c.id AND runs.status IN {ACTIVE_RUN} \
         RETURNING runs.id, runs.workflow_id, runs.status, runs.parent_job_id, \
             runs.concurrency_key"
    ))
    .bind(&ids)
    .bind(&errors)
    .bind(status.as_str())
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let mut finished: Vec<FinishedRun> =
        rows.iter().map(finished_from_row).collect::<Result<_>>()?;
    if finished.is_empty() {
        return Ok(finished);
    }
    let roots: Vec<&str> = finished.iter().map(|r| r.id.as_str()).collect();
    if matches!(status, RunStatus::Failed | RunStatus::TimedOut) {
        sqlx::query(
            "INSERT INTO alerts (workflow_id, run_id, kind, message, created_at) \
             SELECT runs.workflow_id, runs.id, runs.status, coalesce(runs.error, ''), $2 \
             FROM unnest($1::text[]) AS c(id) JOIN runs ON runs.id = c.id",
        )
        .bind(&roots)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    let descendants = sqlx::query(&format!(
        "WITH RECURSIVE tree(id) AS ( \
             SELECT unnest($1::text[]) COLLATE \"C\" \
             UNION SELECT runs.id FROM runs JOIN tree ON runs.parent_run_id = tree.id) \
         UPDATE runs SET status = 'cancelled', error = 'its parent run ended', \
             finished_at = $2, expires_at = $2 + retention_ms \
         WHERE id IN (SELECT id FROM tree) AND status IN {ACTIVE_RUN} \
         RETURNING id, workflow_id, status, NULL::bigint AS parent_job_id, concurrency_key"
    ))
    .bind(&roots)
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    // Their parents are ending too, so only their gates matter, not their parents.
    finished.extend(
        descendants
            .iter()
            .map(finished_from_row)
            .collect::<Result<Vec<_>>>()?,
    );
    let all: Vec<&str> = finished.iter().map(|r| r.id.as_str()).collect();
    // Queue rows that no claim holds, never waiting for one (it may be waiting for a job row
    // this transaction holds): a claim that holds one takes its job, which is cancelled below
    // once that claim commits, and its worker learns so at its next heartbeat.
    sqlx::query(&format!(
        "DELETE FROM job_queue WHERE ctid = ANY(ARRAY( \
             SELECT q.ctid FROM job_queue AS q JOIN jobs AS j \
                 ON q.run_after = j.run_after AND q.job_id = j.id \
             WHERE j.run_id = ANY($1::text[]) AND j.state IN {CLAIMABLE_JOB} \
             FOR UPDATE OF q SKIP LOCKED))"
    ))
    .bind(&all)
    .execute(&mut *conn)
    .await?;
    sqlx::query(&format!(
        "UPDATE jobs SET state = 'cancelled', lease_token = NULL, finished_at = $2 \
         WHERE run_id = ANY($1::text[]) AND state IN {OPEN_JOB}"
    ))
    .bind(&all)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(finished)
}

/// Starts the oldest waiting runs behind each key whose runs just finished, up to the key's
/// limit. Returns whether jobs became claimable.
async fn open_gates(
    conn: &mut PgConnection,
    finished: &[FinishedRun],
    now: Millis,
) -> Result<bool> {
    let keys: BTreeSet<&String> = finished
        .iter()
        .filter_map(|r| r.concurrency_key.as_ref())
        .collect();
    let mut woke = false;
    for key in keys {
        lock_key(conn, &format!("gate/{key}")).await?;
        let (limit, running): (Option<i64>, i64) = sqlx::query_as(
            "SELECT (SELECT concurrency_limit FROM runs \
                     WHERE concurrency_key = $1 AND status = 'pending' \
                     ORDER BY created_at, id LIMIT 1), \
                    (SELECT count(*) FROM runs WHERE concurrency_key = $1 AND status = 'running')",
        )
        .bind(key)
        .fetch_one(&mut *conn)
        .await?;
        let free = limit.unwrap_or(0) - running;
        if free <= 0 {
            continue;
        }
        let started: Vec<String> = sqlx::query_scalar(
            "UPDATE runs SET status = 'running', started_at = $2, \
                 deadline_at = CASE WHEN timeout_ms IS NOT NULL THEN $2 + timeout_ms END \
             WHERE id IN (SELECT id FROM runs WHERE concurrency_key = $1 AND status = 'pending' \
                 ORDER BY created_at, id LIMIT $3) \
             RETURNING id",
        )
        .bind(key)
        .bind(now)
        .bind(free)
        .fetch_all(&mut *conn)
        .await?;
        if !started.is_empty() {
            woke |= make_ready(conn, &started, now).await? > 0;
        }
    }
    Ok(woke)
}

/// Makes the jobs of `runs` that wait for nothing available, and queues them; returns how many.
async fn make_ready(conn: &mut PgConnection, runs: &[String], now: Millis) -> Result<u64> {
    Ok(sqlx::query(
        "WITH made AS ( \
             UPDATE jobs SET state = 'available', run_after = $2 \
             WHERE run_id = ANY($1::text[]) AND state = 'waiting' AND pending_needs = 0 \
             RETURNING id, run_after) \
         INSERT INTO job_queue (run_after, job_id) \
         SELECT run_after, id FROM made ON CONFLICT DO NOTHING",
    )
    .bind(runs)
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// Settles the parked `workflow` steps whose child runs just finished: failed when a child did not
/// succeed, succeeded with the list of child outputs once every child succeeded.
async fn settle_parents(
    conn: &mut PgConnection,
    finished: &[FinishedRun],
    now: Millis,
) -> Result<(Vec<Succeeded>, Vec<(RunId, String)>)> {
    let mut succeeded = Vec::new();
    let mut failed = Vec::new();
    let mut parents: BTreeMap<JobId, Option<&FinishedRun>> = BTreeMap::new();
    for run in finished {
        if let Some(parent) = run.parent_job_id {
            let failure = parents.entry(parent).or_default();
            if run.status != RunStatus::Succeeded && failure.is_none() {
                *failure = Some(run);
            }
        }
    }
    if parents.is_empty() {
        return Ok((succeeded, failed));
    }
    // Children finishing in two transactions at once would each see the other still running;
    // the parent run's lock makes the second wait and then see the first.
    let parent_jobs: Vec<JobId> = parents.keys().copied().collect();
    lock_runs_of_jobs(conn, &parent_jobs).await?;
    for (parent, failure) in parents {
        if let Some(child) = failure {
            let error = format!("child run {} {}", child.id, child.status);
            let row = sqlx::query(
                "UPDATE jobs SET state = 'failed', error = $2, finished_at = $3, \
                     attempts = attempts || jsonb_build_array(jsonb_build_object('attempt', attempt, \
                         'started_at', started_at, 'finished_at', $3::bigint, \
                         'outcome', 'failed', 'error', $2::text)) \
                 WHERE id = $1 AND state = 'parked' RETURNING run_id, step_id",
            )
            .bind(parent)
            .bind(&error)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(row) = row {
                let step: String = row.get("step_id");
                failed.push((row.get("run_id"), format!("step {step} failed: {error}")));
            }
        } else {
            let row = sqlx::query(
                "UPDATE jobs SET state = 'succeeded', finished_at = $2, \
                     output = (SELECT coalesce(jsonb_agg(output ORDER BY child_index), '[]') \
                               FROM runs WHERE parent_job_id = $1) \
                 WHERE id = $1 AND state = 'parked' \
                     AND NOT EXISTS (SELECT 1 FROM runs \
                         WHERE parent_job_id = $1 AND status <> 'succeeded') \
                 RETURNING run_id, step_id, is_sink",
            )
            .bind(parent)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(row) = row {
                succeeded.push(Succeeded {
                    run_id: row.get("run_id"),
                    step_id: row.get("step_id"),
                    is_sink: row.get("is_sink"),
                });
            }
        }
    }
    Ok((succeeded, failed))
}

/// Leases up to `params.limit` due jobs in one statement: takes the oldest rows no other claim
/// holds, leases them, and reads what their workers need.
async fn claim_in(conn: &mut PgConnection, params: ClaimParams) -> Result<Vec<ClaimedJob>> {
    if params.limit == 0 {
        return Ok(Vec::new());
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    // Waking from a parked state continues the same attempt; anything else starts a new one.
    // The claim takes the queue's first rows no other claim holds and deletes them by address
    // (stable while locked); their jobs, reached by primary key, are claimed if they are still
    // claimable and due, since a race may leave a row behind (see `deliver_callback`). Whoever
    // else removes a queue row (a cancel, a callback) skips those a claim holds, so neither
    // waits for the other. One lease row covers the whole claim. Templates reference only steps
    // upstream of their own (definition validation), so a step without needs is given no outputs
    // and costs no lookup.
    let rows = sqlx::query(&format!(
        "WITH next AS MATERIALIZED ( \
             SELECT ctid, job_id FROM job_queue WHERE run_after <= $3 \
             ORDER BY run_after, job_id LIMIT $4 FOR UPDATE SKIP LOCKED), \
         dequeued AS ( \
             DELETE FROM job_queue WHERE ctid = ANY(ARRAY(SELECT ctid FROM next))), \
         claimed AS ( \
             UPDATE jobs SET state = 'running', \
                 attempt = jobs.attempt + (jobs.state <> 'parked')::int, \
                 lease_token = $1, \
                 started_at = CASE WHEN jobs.state = 'parked' THEN jobs.started_at ELSE $3 END \
             WHERE jobs.id = ANY(ARRAY(SELECT job_id FROM next)) \
                 AND jobs.state IN {CLAIMABLE_JOB} AND jobs.run_after <= $3 \
             RETURNING jobs.id, jobs.run_id, jobs.step_id, jobs.attempt, jobs.checkpoint, \
                 jobs.needs), \
         leased AS ( \
             INSERT INTO leases (token, expires_at, job_ids) \
             SELECT $1, $2, array_agg(id) FROM claimed HAVING count(*) > 0) \
         SELECT c.id, c.run_id, c.step_id, c.attempt, c.checkpoint, r.workflow_id, \
             r.version, r.input, r.scheduled_at, \
             CASE WHEN c.needs <> '[]' THEN (SELECT jsonb_object_agg(j.step_id, j.output) \
                 FROM jobs AS j WHERE j.run_id = c.run_id AND j.state = 'succeeded') \
             END AS outputs \
         FROM claimed AS c JOIN runs AS r ON r.id = c.run_id"
    ))
    .bind(&token)
    .bind(params.lease_until)
    .bind(params.now)
    .bind(i64::from(params.limit))
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .iter()
        .map(|row| ClaimedJob {
            lease: Lease {
                job_id: row.get("id"),
                attempt: attempt_of(row),
                token: token.clone(),
            },
            run_id: row.get("run_id"),
            step_id: row.get("step_id"),
            workflow_id: row.get("workflow_id"),
            version: row.get("version"),
            input: row.get("input"),
            scheduled_at: row.get("scheduled_at"),
            checkpoint: row.get("checkpoint"),
            outputs: match row.get::<Option<Value>, _>("outputs") {
                Some(Value::Object(map)) => map,
                _ => serde_json::Map::new(),
            },
        })
        .collect())
}

fn summary_from_row(row: &PgRow) -> Result<RunSummary> {
    Ok(RunSummary {
        id: row.get("id"),
        workflow_id: row.get("workflow_id"),
        version: row.get("version"),
        status: parse_state(row.get::<&str, _>("status"))?,
        parent_run_id: row.get("parent_run_id"),
        error: row.get("error"),
        created_at: row.get("created_at"),
        started_at: row.get("started_at"),
        finished_at: row.get("finished_at"),
    })
}

/// A row of its own in a namespace nothing lists: the write `probe_write` commits.
const PROBE_WRITE: &str = "INSERT INTO settings (namespace, name, value, updated_at) \
     VALUES ('probe', 'write', '0', $1) \
     ON CONFLICT (namespace, name) DO UPDATE SET updated_at = excluded.updated_at";

const WORKFLOW_STATE: &str = "SELECT w.id, w.latest_version, w.paused, w.created_at, v.origin, \
         (SELECT max(fire_at) FROM fires WHERE workflow_id = w.id) AS last_fire_at \
     FROM workflows AS w \
     JOIN workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.latest_version";

fn workflow_from_row(row: &PgRow) -> WorkflowState {
    WorkflowState {
        id: row.get("id"),
        latest_version: row.get("latest_version"),
        origin: DefinitionOrigin::parse(row.get("origin")),
        paused: row.get("paused"),
        created_at: row.get("created_at"),
        last_fire_at: row.get("last_fire_at"),
    }
}

const WEBHOOK_EVENT_COLUMNS: &str =
    "id, source, event_id, workflow_id, payload, run_id, error, received_at";

const SUMMARY_COLUMNS: &str =
    "id, workflow_id, version, status, parent_run_id, error, created_at, started_at, finished_at";

fn attempt_of(row: &PgRow) -> u32 {
    row.get::<i32, _>("attempt").max(0) as u32
}

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<()> {
        let schema = search_path_schema(&self.pool).await?;
        // Created only where missing: a user without CREATE on the database can still migrate
        // an existing schema. Processes starting together may race on the catalog; a second
        // look finds the winner's schema.
        for tries in 1..=5u64 {
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
                    .bind(&schema)
                    .fetch_one(&self.pool)
                    .await?;
            if exists {
                break;
            }
            let created = sqlx::query(&format!(
                "CREATE SCHEMA IF NOT EXISTS \"{}\"",
                schema.replace('"', "\"\"")
            ))
            .execute(&self.pool)
            .await;
            match created {
                Ok(_) => break,
                Err(_) if tries < 5 => tokio::time::sleep(Duration::from_millis(50 * tries)).await,
                Err(e) => return Err(StoreError::Migration(e.to_string())),
            }
        }
        // The migrator serialises concurrent processes on an advisory lock.
        MIGRATOR
            .run(&self.pool)
            .await
            .map_err(|e| StoreError::Migration(e.to_string()))
    }

    fn wakeup(&self) -> Arc<Notify> {
        self.wakeup.clone()
    }

    async fn upsert_workflows(
        &self,
        workflows: &[(String, Value)],
        origin: DefinitionOrigin,
        create_only: bool,
        actor: Option<&str>,
        now: Millis,
    ) -> Result<Vec<i64>> {
        let mut tx = self.pool.begin().await?;
        // In id order, so two installs of overlapping sets never deadlock.
        let mut ids: Vec<&String> = workflows.iter().map(|(id, _)| id).collect();
        ids.sort_unstable();
        for id in ids {
            lock_key(&mut tx, &format!("workflow/{id}")).await?;
        }
        let mut versions = Vec::with_capacity(workflows.len());
        for (id, definition) in workflows {
            let row = sqlx::query(
                "SELECT w.latest_version AS latest, \
                     (SELECT definition = $2 FROM workflow_versions \
                      WHERE workflow_id = $1 AND version = w.latest_version) AS latest_is_same, \
                     (SELECT definition = $2 FROM workflow_versions \
                      WHERE workflow_id = $1 AND origin = 'file' \
                      ORDER BY version DESC LIMIT 1) AS last_file_is_same, \
                     (SELECT coalesce(max(version), 0) FROM workflow_versions \
                      WHERE workflow_id = $1) AS highest \
                 FROM (SELECT 1) AS one LEFT JOIN workflows AS w ON w.id = $1",
            )
            .bind(id)
            .bind(definition)
            .fetch_one(&mut *tx)
            .await?;
            let stored = StoredDefinition {
                latest: row.get("latest"),
                latest_is_same: row
                    .get::<Option<bool>, _>("latest_is_same")
                    .unwrap_or(false),
                last_file_is_same: row
                    .get::<Option<bool>, _>("last_file_is_same")
                    .unwrap_or(false),
                highest: row.get("highest"),
            };
            let version = match decide_install(stored, origin, create_only, id)? {
                Install::Keep(version) => version,
                Install::Add(version) => {
                    sqlx::query(
                        "INSERT INTO workflow_versions \
                             (workflow_id, version, definition, created_at, origin) \
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(id)
                    .bind(version)
                    .bind(definition)
                    .bind(now)
                    .bind(origin.as_str())
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO workflows (id, latest_version, created_at, updated_at) \
                         VALUES ($1, $2, $3, $3) \
                         ON CONFLICT (id) DO UPDATE SET latest_version = $2, updated_at = $3",
                    )
                    .bind(id)
                    .bind(version)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                    if let Some(actor) = actor {
                        insert_audit(&mut tx, &install_audit(actor, id, version), now).await?;
                    }
                    version
                }
            };
            versions.push(version);
        }
        tx.commit().await?;
        Ok(versions)
    }

    async fn workflow(&self, id: &str) -> Result<Option<WorkflowState>> {
        let row = sqlx::query(&format!("{WORKFLOW_STATE} WHERE w.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(workflow_from_row))
    }

    async fn remove_workflow(&self, id: &str, force: bool) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        // A fire starting a run of it meanwhile waits for this, then finds it gone.
        lock_key(&mut tx, &format!("workflow/{id}")).await?;
        let removed = sqlx::query("DELETE FROM workflows WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if removed == 0 {
            return Err(StoreError::NotFound(format!("workflow {id}")));
        }
        // Refused, the transaction ends without its delete.
        let active: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM runs WHERE workflow_id = $1 AND status IN {ACTIVE_RUN}"
        ))
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if active > 0 && !force {
            return Err(StoreError::Conflict(format!(
                "workflow {id} has {active} runs that have not ended; cancel them, or remove it \
                 anyway (--force), and they finish with the version they started with"
            )));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn workflow_version(&self, id: &str, version: i64) -> Result<Value> {
        sqlx::query_scalar(
            "SELECT definition FROM workflow_versions WHERE workflow_id = $1 AND version = $2",
        )
        .bind(id)
        .bind(version)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("workflow {id} v{version}")))
    }

    async fn workflows(&self) -> Result<Vec<WorkflowState>> {
        let rows = sqlx::query(&format!("{WORKFLOW_STATE} ORDER BY w.id"))
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(workflow_from_row).collect())
    }

    async fn set_paused(&self, id: &str, paused: bool, now: Millis) -> Result<()> {
        let done = sqlx::query("UPDATE workflows SET paused = $1, updated_at = $2 WHERE id = $3")
            .bind(paused)
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("workflow {id}")));
        }
        Ok(())
    }

    async fn create_runs(&self, runs: Vec<NewRun>, now: Millis) -> Result<Vec<RunId>> {
        let mut tx = self.pool.begin().await?;
        let ids = insert_runs(&mut tx, runs, now).await?;
        self.notify(&mut tx).await?;
        tx.commit().await?;
        self.wakeup.notify_one();
        Ok(ids)
    }

    async fn fire(&self, fire: FireParams, now: Millis) -> Result<FireOutcome> {
        let mut tx = self.pool.begin().await?;
        let recorded = sqlx::query(
            "INSERT INTO fires (workflow_id, fire_at, recorded_at) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&fire.workflow_id)
        .bind(fire.fire_at)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if recorded.rows_affected() == 0 {
            return Ok(FireOutcome::AlreadyRecorded);
        }
        let paused: Option<bool> = sqlx::query_scalar("SELECT paused FROM workflows WHERE id = $1")
            .bind(&fire.workflow_id)
            .fetch_optional(&mut *tx)
            .await?;
        let mut skipped = paused.unwrap_or(false).then(|| "paused".to_owned());
        if skipped.is_none() && fire.skip_if_active {
            // Another scheduler may be starting the previous fire right now: wait for it.
            lock_key(&mut tx, &format!("workflow/{}", fire.workflow_id)).await?;
            let active: Option<String> = sqlx::query_scalar(&format!(
                "SELECT id FROM runs WHERE workflow_id = $1 AND status IN {ACTIVE_RUN} \
                 AND parent_run_id IS NULL LIMIT 1"
            ))
            .bind(&fire.workflow_id)
            .fetch_optional(&mut *tx)
            .await?;
            skipped = active.map(|run| format!("overlap: run {run} is still going"));
        }
        let outcome = match skipped {
            Some(reason) => {
                sqlx::query(
                    "UPDATE fires SET skipped_reason = $1 WHERE workflow_id = $2 AND fire_at = $3",
                )
                .bind(&reason)
                .bind(&fire.workflow_id)
                .bind(fire.fire_at)
                .execute(&mut *tx)
                .await?;
                FireOutcome::Skipped(reason)
            }
            None => {
                let ids = insert_runs(&mut tx, vec![fire.run], now).await?;
                sqlx::query("UPDATE fires SET run_id = $1 WHERE workflow_id = $2 AND fire_at = $3")
                    .bind(&ids[0])
                    .bind(&fire.workflow_id)
                    .bind(fire.fire_at)
                    .execute(&mut *tx)
                    .await?;
                self.notify(&mut tx).await?;
                FireOutcome::Started(ids[0].clone())
            }
        };
        tx.commit().await?;
        self.wakeup.notify_one();
        Ok(outcome)
    }

    async fn skip_fire(
        &self,
        workflow_id: &str,
        fire_at: Millis,
        reason: &str,
        now: Millis,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO fires (workflow_id, fire_at, skipped_reason, recorded_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(workflow_id)
        .bind(fire_at)
        .bind(reason)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn fires(&self, workflow_id: Option<&str>, limit: u32) -> Result<Vec<FireRecord>> {
        let rows = sqlx::query(
            "SELECT workflow_id, fire_at, run_id, skipped_reason, recorded_at FROM fires \
             WHERE $1::text IS NULL OR workflow_id = $1 ORDER BY fire_at DESC LIMIT $2",
        )
        .bind(workflow_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|row| FireRecord {
                workflow_id: row.get("workflow_id"),
                fire_at: row.get("fire_at"),
                run_id: row.get("run_id"),
                skipped_reason: row.get("skipped_reason"),
                recorded_at: row.get("recorded_at"),
            })
            .collect())
    }

    async fn claim(&self, params: ClaimParams) -> Result<Vec<ClaimedJob>> {
        let mut conn = self.pool.acquire().await?;
        claim_in(&mut conn, params).await
    }

    async fn heartbeat(&self, leases: &[Lease], lease_until: Millis) -> Result<Vec<JobId>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<JobId> = leases.iter().map(|l| l.job_id).collect();
        let attempts: Vec<i32> = leases.iter().map(|l| l.attempt as i32).collect();
        let tokens: Vec<&str> = leases.iter().map(|l| l.token.as_str()).collect();
        // A claim's lease row covers all its jobs: extending it for one extends it for the rest,
        // which the same worker holds (or has settled, or lost to a reclaim that changed their
        // token).
        Ok(sqlx::query_scalar(
            "WITH extended AS ( \
                 UPDATE leases SET expires_at = $4 WHERE token = ANY($3::text[])) \
             SELECT jobs.id \
             FROM unnest($1::bigint[], $2::int[], $3::text[]) AS c(id, attempt, token) \
             JOIN jobs ON jobs.id = c.id AND jobs.attempt = c.attempt \
                 AND jobs.lease_token = c.token AND jobs.state = 'running'",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(&tokens)
        .bind(lease_until)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn complete_and_claim(
        &self,
        completions: Vec<Completion>,
        claim: ClaimParams,
        now: Millis,
    ) -> Result<(Vec<JobId>, Vec<ClaimedJob>)> {
        let mut tx = self.pool.begin().await?;
        let mut effects = Effects::default();
        let accepted = complete_in(&mut tx, completions, now, &mut effects).await?;
        let claimed = claim_in(&mut tx, claim).await?;
        let wake_others = effects.wakes_others(&claimed);
        if wake_others {
            self.notify(&mut tx).await?;
        }
        tx.commit().await?;
        effects.finished.publish();
        if wake_others {
            self.wakeup.notify_one();
        }
        Ok((accepted, claimed))
    }

    async fn deliver_callback(
        &self,
        run_id: &str,
        step_id: &str,
        token: &str,
        result: Value,
        now: Millis,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        // The job's lock waits out a claim or a settlement of the step in flight, and the row is
        // then read again: a step that parked meanwhile is woken, one claimed meanwhile keeps the
        // result until it parks. Its old queue row goes only if no claim holds it (never waiting
        // for one, which may be waiting for this job): a claim that holds it takes the woken job
        // after this commits. A row left behind (held, or keyed by a park that committed after
        // this statement began) is dropped by the claim that meets it; one already keyed by now
        // stays, and the insert below finds it.
        let given: Option<Option<bool>> = sqlx::query_scalar(
            "WITH target AS MATERIALIZED ( \
                 SELECT id, state, run_after, checkpoint ? 'callback' AS answered FROM jobs \
                 WHERE run_id = $1 AND step_id = $2 \
                     AND state IN ('parked', 'running', 'available') \
                     AND checkpoint->>'callback_token' = $3 \
                     AND (NOT checkpoint ? 'callback' \
                         OR checkpoint->'callback'->'event_id' = $4::jsonb->'event_id') \
                 FOR UPDATE), \
             dequeued AS ( \
                 DELETE FROM job_queue WHERE ctid = ANY(ARRAY( \
                     SELECT q.ctid FROM job_queue AS q JOIN target AS t \
                         ON q.run_after = t.run_after AND q.job_id = t.id \
                     WHERE NOT t.answered AND t.state = 'parked' AND t.run_after <> $5 \
                     FOR UPDATE OF q SKIP LOCKED))), \
             given AS ( \
                 UPDATE jobs SET \
                     checkpoint = jobs.checkpoint || jsonb_build_object('callback', $4::jsonb), \
                     run_after = CASE WHEN t.state = 'parked' THEN $5 ELSE jobs.run_after END \
                 FROM target AS t WHERE jobs.id = t.id AND NOT t.answered \
                 RETURNING jobs.id, t.state = 'parked' AS woken), \
             queued AS ( \
                 INSERT INTO job_queue (run_after, job_id) SELECT $5, id FROM given WHERE woken \
                 ON CONFLICT DO NOTHING) \
             SELECT g.woken FROM target AS t LEFT JOIN given AS g ON g.id = t.id",
        )
        .bind(run_id)
        .bind(step_id)
        .bind(token)
        .bind(&result)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let woken = given == Some(Some(true));
        if woken {
            self.notify(&mut tx).await?;
        }
        tx.commit().await?;
        if woken {
            self.wakeup.notify_one();
        }
        Ok(given.is_some())
    }

    async fn sweep(&self, now: Millis) -> Result<Swept> {
        let mut tx = self.pool.begin().await?;
        // No row locks here: the fenced completion decides, should a worker or another sweeper
        // settle the same attempt at the same time.
        let expired = sqlx::query(
            "SELECT j.id, j.attempt, j.lease_token, j.max_attempts \
             FROM leases AS l JOIN jobs AS j ON j.id = ANY(l.job_ids) \
             WHERE l.expires_at <= $1 AND j.lease_token = l.token AND j.state = 'running' \
             LIMIT 1000",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let lost: Vec<Completion> = expired
            .iter()
            .map(|row| Completion {
                lease: Lease {
                    job_id: row.get("id"),
                    attempt: attempt_of(row),
                    token: row.get("lease_token"),
                },
                settlement: settle_lost_lease(
                    attempt_of(row),
                    row.get::<i32, _>("max_attempts").max(0) as u32,
                    now,
                ),
                children: Vec::new(),
            })
            .collect();
        let mut effects = Effects::default();
        let reclaimed = complete_in(&mut tx, lost, now, &mut effects).await?.len() as u64;
        // Expired leases none of whose jobs still runs under them (a claim's lease outlives its
        // jobs until it expires, so most have none) are done with.
        sqlx::query(
            "DELETE FROM leases AS l WHERE l.expires_at <= $1 \
                 AND NOT EXISTS (SELECT 1 FROM jobs AS j WHERE j.id = ANY(l.job_ids) \
                     AND j.lease_token = l.token AND j.state = 'running')",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;

        let late: Vec<(String, Option<i64>)> = sqlx::query_as(&format!(
            "SELECT id, timeout_ms FROM runs WHERE status IN {ACTIVE_RUN} AND deadline_at <= $1 \
             ORDER BY id LIMIT 1000"
        ))
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let late: Vec<(RunId, String)> = late
            .into_iter()
            .map(|(id, timeout)| {
                let limit = humantime::format_duration(Duration::from_millis(
                    timeout.unwrap_or(0).max(0) as u64,
                ));
                (id, format!("run timed out after {limit}"))
            })
            .collect();
        let timed_out = late.len() as u64;
        cascade(
            &mut tx,
            Vec::new(),
            late,
            RunStatus::TimedOut,
            now,
            &mut effects,
        )
        .await?;
        let woke = effects.wakes_others(&[]) || reclaimed > 0;
        if woke {
            self.notify(&mut tx).await?;
        }
        tx.commit().await?;
        effects.finished.publish();
        if woke {
            self.wakeup.notify_one();
        }
        Ok(Swept {
            reclaimed_jobs: reclaimed,
            timed_out_runs: timed_out,
        })
    }

    async fn queue_depth(&self, now: Millis) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM job_queue WHERE run_after <= $1")
                .bind(now)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn next_due(&self) -> Result<Option<Millis>> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT least( \
                 (SELECT min(run_after) FROM job_queue), \
                 (SELECT min(deadline_at) FROM runs \
                     WHERE status IN {ACTIVE_RUN} AND deadline_at IS NOT NULL))"
        ))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn cancel_run(&self, run_id: &str, now: Millis) -> Result<RunStatus> {
        let mut tx = self.pool.begin().await?;
        // Opening a gate locks the gate, then its pending runs; cancelling a pending run takes
        // them in the same order, so the two never deadlock.
        let gated: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT status, concurrency_key FROM runs WHERE id = $1")
                .bind(run_id)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((status, Some(key))) = &gated
            && status == "pending"
        {
            lock_key(&mut tx, &format!("gate/{key}")).await?;
        }
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM runs WHERE id = $1 FOR UPDATE")
                .bind(run_id)
                .fetch_optional(&mut *tx)
                .await?;
        let status: RunStatus =
            parse_state(&status.ok_or_else(|| StoreError::NotFound(format!("run {run_id}")))?)?;
        if status.is_finished() {
            return Ok(status);
        }
        let mut effects = Effects::default();
        cascade(
            &mut tx,
            Vec::new(),
            vec![(run_id.to_owned(), "cancelled".to_owned())],
            RunStatus::Cancelled,
            now,
            &mut effects,
        )
        .await?;
        if effects.wakes_others(&[]) {
            self.notify(&mut tx).await?;
        }
        tx.commit().await?;
        effects.finished.publish();
        Ok(RunStatus::Cancelled)
    }

    async fn retry_run(&self, run_id: &str, now: Millis) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM runs WHERE id = $1 FOR UPDATE")
                .bind(run_id)
                .fetch_optional(&mut *tx)
                .await?;
        let status: RunStatus =
            parse_state(&status.ok_or_else(|| StoreError::NotFound(format!("run {run_id}")))?)?;
        if !matches!(
            status,
            RunStatus::Failed | RunStatus::Cancelled | RunStatus::TimedOut
        ) {
            return Err(StoreError::Conflict(format!(
                "run {run_id} is {status}; only failed, cancelled or timed-out runs can be retried"
            )));
        }
        // A `workflow` step that started child runs waits for them again instead of starting new
        // ones: its children that did not succeed are retried with it, down the tree, and the
        // succeeded ones keep their outputs.
        let mut runs = vec![run_id.to_owned()];
        let mut waiting_parents: Vec<JobId> = Vec::new();
        let mut level = runs.clone();
        while !level.is_empty() {
            let rows: Vec<(JobId, String)> = sqlx::query_as(
                "SELECT j.id, c.id FROM jobs AS j JOIN runs AS c ON c.parent_job_id = j.id \
                 WHERE j.run_id = ANY($1::text[]) AND j.state IN ('failed', 'cancelled') \
                     AND c.status <> 'succeeded' \
                 ORDER BY c.id FOR UPDATE OF c",
            )
            .bind(&level)
            .fetch_all(&mut *tx)
            .await?;
            waiting_parents.extend(rows.iter().map(|(job, _)| *job));
            level = rows.into_iter().map(|(_, child)| child).collect();
            runs.extend(level.iter().cloned());
        }
        sqlx::query(
            "UPDATE runs SET status = 'running', error = NULL, output = NULL, finished_at = NULL, \
                 expires_at = NULL, \
                 deadline_at = CASE WHEN timeout_ms IS NOT NULL THEN $2 + timeout_ms END \
             WHERE id = ANY($1::text[])",
        )
        .bind(&runs)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE jobs SET state = 'parked', error = NULL, finished_at = NULL, run_after = NULL \
             WHERE id = ANY($1::bigint[])",
        )
        .bind(&waiting_parents)
        .execute(&mut *tx)
        .await?;
        // Succeeded steps keep their outputs; the rest wait for their needs again.
        sqlx::query(
            "UPDATE jobs SET state = 'waiting', output = NULL, error = NULL, checkpoint = NULL, \
                 finished_at = NULL, max_attempts = attempt + attempt_budget, \
                 pending_needs = (SELECT count(*) \
                     FROM jsonb_array_elements_text(jobs.needs) AS nd(step) \
                     JOIN jobs AS up ON up.run_id = jobs.run_id AND up.step_id = nd.step \
                     WHERE up.state <> 'succeeded') \
             WHERE run_id = ANY($1::text[]) AND state IN ('failed', 'cancelled')",
        )
        .bind(&runs)
        .execute(&mut *tx)
        .await?;
        make_ready(&mut tx, &runs, now).await?;
        self.notify(&mut tx).await?;
        tx.commit().await?;
        self.wakeup.notify_one();
        Ok(())
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        // Only the filters given reach the SQL, so the planner picks the index that serves them
        // in `created_at` order.
        let mut query = QueryBuilder::new(format!("SELECT {SUMMARY_COLUMNS} FROM runs WHERE true"));
        if let Some(workflow) = &filter.workflow_id {
            query.push(" AND workflow_id = ").push_bind(workflow);
        }
        if let Some(status) = filter.status {
            // A literal, not a parameter: only then can a plan use the status indexes, which
            // leave succeeded runs out.
            query.push(format_args!(" AND status = '{}'", status.as_str()));
        }
        if let Some(after) = filter.created_after {
            query.push(" AND created_at >= ").push_bind(after);
        }
        if let Some(before) = filter.created_before {
            query.push(" AND created_at < ").push_bind(before);
        }
        if let Some((at, id)) = &filter.after_cursor {
            query
                .push(" AND (created_at, id) < (")
                .push_bind(*at)
                .push(", ")
                .push_bind(id)
                .push(")");
        }
        query
            .push(" ORDER BY created_at DESC, id DESC LIMIT ")
            .push_bind(i64::from(filter.limit));
        let rows = query.build().fetch_all(&self.pool).await?;
        rows.iter().map(summary_from_row).collect()
    }

    async fn count_runs(&self, status: RunStatus, created_after: Option<Millis>) -> Result<i64> {
        // The status is a literal for the same reason as in `list_runs`.
        Ok(sqlx::query_scalar(&format!(
            "SELECT count(*) FROM runs WHERE status = '{}' \
             AND ($1::bigint IS NULL OR created_at >= $1)",
            status.as_str()
        ))
        .bind(created_after)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn run(&self, run_id: &str) -> Result<RunDetail> {
        let row = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS}, input, output, scheduled_at FROM runs WHERE id = $1"
        ))
        .bind(run_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("run {run_id}")))?;
        let steps = sqlx::query(
            "SELECT id, step_id, state, attempt, output, error, run_after, started_at, \
                 finished_at, attempts FROM jobs WHERE run_id = $1 ORDER BY id",
        )
        .bind(run_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(JobDetail {
                id: r.get("id"),
                step_id: r.get("step_id"),
                state: parse_state(r.get::<&str, _>("state"))?,
                attempt: attempt_of(r),
                output: r.get("output"),
                error: r.get("error"),
                run_after: r.get("run_after"),
                started_at: r.get("started_at"),
                finished_at: r.get("finished_at"),
                attempts: r.get("attempts"),
            })
        })
        .collect::<Result<_>>()?;
        Ok(RunDetail {
            summary: summary_from_row(&row)?,
            input: row.get("input"),
            output: row.get("output"),
            scheduled_at: row.get("scheduled_at"),
            steps,
        })
    }

    async fn prune(&self, now: Millis, limit: u32) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        // Fire records outlive their runs by the default retention; the newest of each workflow
        // stays, since the scheduler counts missed fires from it.
        sqlx::query(
            "DELETE FROM fires WHERE fire_at < $1 - 2592000000 \
             AND fire_at < (SELECT max(fire_at) FROM fires AS f WHERE f.workflow_id = fires.workflow_id)",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM alerts WHERE created_at < $1 - 2592000000")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM webhook_events WHERE received_at < $1 - 2592000000")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM revoked_tokens WHERE expires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM audit_log WHERE at < $1 - 7776000000")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM runs WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        sqlx::query("DELETE FROM jobs WHERE run_id = ANY($1::text[])")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        let deleted = sqlx::query("DELETE FROM runs WHERE id = ANY($1::text[])")
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(deleted)
    }

    async fn alerts(&self, workflow_id: Option<&str>, limit: u32) -> Result<Vec<Alert>> {
        Ok(sqlx::query_as(
            "SELECT id, workflow_id, run_id, kind, message, created_at FROM alerts \
             WHERE ($1::text IS NULL OR workflow_id = $1) \
             ORDER BY created_at DESC, id DESC LIMIT $2",
        )
        .bind(workflow_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn put_setting(
        &self,
        namespace: &str,
        name: &str,
        value: &Value,
        now: Millis,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (namespace, name, value, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (namespace, name) DO UPDATE SET value = excluded.value, \
                 updated_at = excluded.updated_at",
        )
        .bind(namespace)
        .bind(name)
        .bind(value)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn init_setting(
        &self,
        namespace: &str,
        name: &str,
        value: &Value,
        now: Millis,
    ) -> Result<Value> {
        // The upsert that changes nothing still returns the row, so one statement answers both
        // the winner and the losers of a race.
        Ok(sqlx::query_scalar(
            "INSERT INTO settings (namespace, name, value, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (namespace, name) DO UPDATE SET value = settings.value \
             RETURNING value",
        )
        .bind(namespace)
        .bind(name)
        .bind(value)
        .bind(now)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn setting(&self, namespace: &str, name: &str) -> Result<Option<Setting>> {
        let row = sqlx::query(
            "SELECT name, value, updated_at FROM settings WHERE namespace = $1 AND name = $2",
        )
        .bind(namespace)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(setting_from_row))
    }

    async fn settings(&self, namespace: &str) -> Result<Vec<Setting>> {
        let rows = sqlx::query(
            "SELECT name, value, updated_at FROM settings WHERE namespace = $1 ORDER BY name",
        )
        .bind(namespace)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(setting_from_row).collect())
    }

    async fn delete_setting(&self, namespace: &str, name: &str) -> Result<bool> {
        let deleted = sqlx::query("DELETE FROM settings WHERE namespace = $1 AND name = $2")
            .bind(namespace)
            .bind(name)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted > 0)
    }

    async fn record_webhook_event(
        &self,
        event: NewWebhookEvent,
        now: Millis,
    ) -> Result<(WebhookEvent, bool)> {
        let inserted: Option<WebhookEvent> = sqlx::query_as(&format!(
            "INSERT INTO webhook_events (source, event_id, workflow_id, payload, received_at) \
             VALUES ($1, $2, $3, $5::jsonb, $4) \
             ON CONFLICT (source, event_id) DO NOTHING \
             RETURNING {WEBHOOK_EVENT_COLUMNS}"
        ))
        .bind(&event.source)
        .bind(&event.event_id)
        .bind(&event.workflow_id)
        .bind(now)
        .bind(&event.payload)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(stored) = inserted {
            return Ok((stored, true));
        }
        let first = sqlx::query_as(&format!(
            "SELECT {WEBHOOK_EVENT_COLUMNS} FROM webhook_events \
             WHERE source = $1 AND event_id = $2"
        ))
        .bind(&event.source)
        .bind(&event.event_id)
        .fetch_one(&self.pool)
        .await?;
        Ok((first, false))
    }

    async fn settle_webhook_event(
        &self,
        id: i64,
        run_id: Option<&str>,
        error: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE webhook_events SET run_id = coalesce(run_id, $2), \
                 error = CASE WHEN coalesce(run_id, $2) IS NULL THEN coalesce(error, $3) END \
             WHERE id = $1",
        )
        .bind(id)
        .bind(run_id)
        .bind(error)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn webhook_events(&self, source: Option<&str>, limit: u32) -> Result<Vec<WebhookEvent>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {WEBHOOK_EVENT_COLUMNS} FROM webhook_events \
             WHERE ($1::text IS NULL OR source = $1) \
             ORDER BY received_at DESC, id DESC LIMIT $2"
        ))
        .bind(source)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }
    async fn probe_write(&self, now: Millis) -> Result<()> {
        sqlx::query(PROBE_WRITE)
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn change_settings(
        &self,
        changes: Vec<SettingChange>,
        audit: Option<NewAuditEntry>,
        now: Millis,
    ) -> Result<Vec<bool>> {
        let mut tx = self.pool.begin().await?;
        let mut applied = Vec::with_capacity(changes.len());
        for change in &changes {
            let rows = match change {
                SettingChange::Put {
                    namespace,
                    name,
                    value,
                } => sqlx::query(
                    "INSERT INTO settings (namespace, name, value, updated_at) \
                     VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (namespace, name) DO UPDATE SET value = excluded.value, \
                         updated_at = excluded.updated_at",
                )
                .bind(namespace)
                .bind(name)
                .bind(value)
                .bind(now),
                SettingChange::Delete { namespace, name } => {
                    sqlx::query("DELETE FROM settings WHERE namespace = $1 AND name = $2")
                        .bind(namespace)
                        .bind(name)
                }
                SettingChange::Swap {
                    namespace,
                    name,
                    old,
                    new,
                } => sqlx::query(
                    "UPDATE settings SET value = $1 \
                     WHERE namespace = $2 AND name = $3 AND value = $4::jsonb",
                )
                .bind(new)
                .bind(namespace)
                .bind(name)
                .bind(old),
            }
            .execute(&mut *tx)
            .await?
            .rows_affected();
            applied.push(rows > 0);
        }
        if let Some(entry) = audit
            && applied.iter().any(|a| *a)
        {
            insert_audit(&mut tx, &entry, now).await?;
        }
        tx.commit().await?;
        Ok(applied)
    }

    async fn record_audit(&self, entry: NewAuditEntry, now: Millis) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        insert_audit(&mut conn, &entry, now).await
    }

    async fn audit_log(&self, before: Option<i64>, limit: u32) -> Result<Vec<AuditEntry>> {
        Ok(sqlx::query_as(
            "SELECT id, at, actor, action, target, detail FROM audit_log \
             WHERE ($1::bigint IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
        )
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn revoke_token(
        &self,
        revocation: TokenRevocation,
        audit: NewAuditEntry,
        now: Millis,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let revoked = sqlx::query(
            "INSERT INTO revoked_tokens (jti, expires_at, revoked_at, revoked_by) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (jti) DO NOTHING",
        )
        .bind(&revocation.jti)
        .bind(revocation.expires_at)
        .bind(now)
        .bind(&revocation.revoked_by)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            > 0;
        if revoked {
            insert_audit(&mut tx, &audit, now).await?;
        }
        tx.commit().await?;
        Ok(revoked)
    }

    async fn revoked_tokens(&self, now: Millis) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT jti FROM revoked_tokens WHERE expires_at > $1")
                .bind(now)
                .fetch_all(&self.pool)
                .await?,
        )
    }
}

async fn insert_audit(conn: &mut PgConnection, entry: &NewAuditEntry, now: Millis) -> Result<()> {
    sqlx::query(
        "INSERT INTO audit_log (at, actor, action, target, detail) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(now)
    .bind(&entry.actor)
    .bind(&entry.action)
    .bind(&entry.target)
    .bind(&entry.detail)
    .execute(conn)
    .await?;
    Ok(())
}
