//! SQLite: the embedded default. WAL with `synchronous=FULL`, so a committed transition survives
//! power loss. All writes go through one connection (SQLite has one writer anyway; queueing in the
//! pool beats retrying on `SQLITE_BUSY`), reads through a small pool. Every statement handles a whole
//! batch, passing it as a JSON array to `json_each`: with sqlx each statement costs ~100 µs, so
//! statements per batch, not rows, set the throughput.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, SqliteConnection};
use tokio::sync::Notify;

use super::*;
use crate::state::{JobState, Millis, RunStatus, settle_lost_lease};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// The states a run is still going in.
const ACTIVE_RUN: &str = "('pending', 'running')";
/// The states a job is not finished in.
const OPEN_JOB: &str = "('waiting', 'available', 'running', 'retrying', 'parked')";

pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    wakeup: Arc<Notify>,
}

impl SqliteStore {
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::UnsupportedUrl(format!("{}: {e}", redact_url(url))))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
            .pragma("cache_size", "-16384");
        let writer = open_pool(options.clone(), 1, true).await?;
        let reader = open_pool(options.read_only(true), 4, false).await?;
        Ok(SqliteStore {
            writer,
            reader,
            wakeup: Arc::new(Notify::new()),
        })
    }
}

/// Switching a new file to WAL needs a moment of exclusive access; a second process starting at
/// the same time gets `database is locked` and tries again.
async fn open_pool(options: SqliteConnectOptions, size: u32, writer: bool) -> Result<SqlitePool> {
    let mut tries = 0;
    loop {
        let mut pool = SqlitePoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(60));
        if writer {
            // When a COMMIT fails on a full disk, SQLite has rolled the transaction back
            // already; sqlx's ROLLBACK then fails and leaves the connection counting an open
            // transaction, so every later BEGIN on it fails. Such a connection (or one whose
            // dropped transaction is still rolling back) is closed, not reused: the next is new.
            pool = pool.before_acquire(|conn, _| {
                Box::pin(async move { Ok(!sqlx::Connection::is_in_transaction(conn)) })
            });
        }
        match pool.connect_with(options.clone()).await {
            Ok(pool) => return Ok(pool),
            Err(e) if tries < 20 && e.to_string().contains("locked") => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50 * tries)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

impl SqliteStore {
    /// Write transactions take the write lock up front (`BEGIN IMMEDIATE`): a deferred one that
    /// reads first and then writes fails at once with `SQLITE_BUSY` when another process writes,
    /// instead of waiting out the busy timeout.
    async fn write_tx(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Jobs a claim just leased, not yet read out: the runs and outputs are read after the commit,
/// through the reader pool.
#[derive(Default)]
struct Leased {
    token: String,
    rows: Vec<SqliteRow>,
}

/// The write half of a claim: leases up to `limit` claimable jobs, oldest due first.
async fn lease_jobs(conn: &mut SqliteConnection, params: &ClaimParams) -> Result<Leased> {
    let token = uuid::Uuid::new_v4().simple().to_string();
    // Waking from a parked state continues the same attempt; anything else starts a new one.
    let rows = sqlx::query(
        "UPDATE jobs SET state = 'running', attempt = attempt + (state != 'parked'), \
             lease_token = ?1, lease_expires_at = ?2, \
             started_at = CASE WHEN state = 'parked' THEN started_at ELSE ?3 END \
         WHERE id IN (SELECT id FROM jobs \
             WHERE state IN ('available', 'retrying', 'parked') AND run_after <= ?3 \
             ORDER BY run_after, id LIMIT ?4) \
         RETURNING id, run_id, step_id, attempt, checkpoint",
    )
    .bind(&token)
    .bind(params.lease_until)
    .bind(params.now)
    .bind(params.limit)
    .fetch_all(&mut *conn)
    .await?;
    Ok(Leased { token, rows })
}

impl SqliteStore {
    /// The read half of a claim, after its commit: each leased job with its run and the run's
    /// outputs so far.
    async fn claimed_jobs(&self, leased: Leased) -> Result<Vec<ClaimedJob>> {
        let Leased { token, rows } = leased;
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let run_ids: BTreeSet<String> = rows.iter().map(|r| r.get("run_id")).collect();
        let run_ids = to_json(&run_ids);
        let runs: BTreeMap<String, SqliteRow> = sqlx::query(
            "SELECT id, workflow_id, version, input, scheduled_at FROM runs \
             WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(&run_ids)
        .fetch_all(&self.reader)
        .await?
        .into_iter()
        .map(|r| (r.get("id"), r))
        .collect();
        let mut outputs: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
        for row in sqlx::query(
            "SELECT run_id, step_id, output FROM jobs \
             WHERE run_id IN (SELECT value FROM json_each(?)) AND state = 'succeeded'",
        )
        .bind(&run_ids)
        .fetch_all(&self.reader)
        .await?
        {
            outputs.entry(row.get("run_id")).or_default().insert(
                row.get("step_id"),
                parse_json(row.get("output")).unwrap_or(Value::Null),
            );
        }
        rows.iter()
            .map(|row| {
                let run_id: String = row.get("run_id");
                let run = runs
                    .get(&run_id)
                    .ok_or_else(|| StoreError::NotFound(format!("run {run_id}")))?;
                Ok(ClaimedJob {
                    lease: Lease {
                        job_id: row.get("id"),
                        attempt: row.get("attempt"),
                        token: token.clone(),
                    },
                    step_id: row.get("step_id"),
                    workflow_id: run.get("workflow_id"),
                    version: run.get("version"),
                    input: parse_json(run.get("input")).unwrap_or(Value::Null),
                    scheduled_at: run.get("scheduled_at"),
                    checkpoint: parse_json(row.get("checkpoint")),
                    outputs: outputs.get(&run_id).cloned().unwrap_or_default(),
                    run_id,
                })
            })
            .collect()
    }
}

fn setting_from_row(row: &SqliteRow) -> Result<Setting> {
    let name: String = row.get("name");
    let value = parse_json(row.get("value"))
        .ok_or_else(|| StoreError::Database(format!("setting {name} is not JSON")))?;
    Ok(Setting {
        name,
        value,
        updated_at: row.get("updated_at"),
    })
}

fn parse_json(text: Option<String>) -> Option<Value> {
    text.and_then(|t| serde_json::from_str(&t).ok())
}

fn finished_from_row(row: &SqliteRow) -> Result<FinishedRun> {
    Ok(FinishedRun {
        id: row.get("id"),
        workflow_id: row.get("workflow_id"),
        status: parse_state(row.get::<&str, _>("status"))?,
        parent_job_id: row.get("parent_job_id"),
        concurrency_key: row.get("concurrency_key"),
    })
}

/// Inserts runs and their jobs: two statements however many runs. Returns the run ids, in order,
/// with an earlier run's id where its idempotency key was already used.
async fn insert_runs(
    conn: &mut SqliteConnection,
    runs: Vec<NewRun>,
    now: Millis,
) -> Result<Vec<RunId>> {
    let mut ids = Vec::with_capacity(runs.len());
    let mut fresh = Vec::with_capacity(runs.len());
    for run in runs {
        if let Some(key) = &run.idempotency_key {
            let existing: Option<String> =
                sqlx::query_scalar("SELECT id FROM runs WHERE idempotency_key = ?")
                    .bind(key)
                    .fetch_optional(&mut *conn)
                    .await?;
            if let Some(existing) = existing {
                ids.push(existing);
                continue;
            }
        }
        ids.push(run.id.clone());
        fresh.push(run);
    }
    if fresh.is_empty() {
        return Ok(ids);
    }

    // A gated run starts only while fewer than `limit` runs with its key are running and none
    // waits ahead of it.
    let mut room: BTreeMap<String, i64> = BTreeMap::new();
    let mut rows = Vec::with_capacity(fresh.len());
    let mut jobs = Vec::new();
    for run in &fresh {
        let gated = match &run.concurrency {
            None => false,
            Some(gate) => {
                if !room.contains_key(&gate.key) {
                    let row = sqlx::query(
                        "SELECT coalesce(sum(status = 'running'), 0) AS running, \
                                coalesce(sum(status = 'pending'), 0) AS pending \
                         FROM runs WHERE concurrency_key = ? AND status IN ('pending', 'running')",
                    )
                    .bind(&gate.key)
                    .fetch_one(&mut *conn)
                    .await?;
                    let (running, pending): (i64, i64) = (row.get("running"), row.get("pending"));
                    let free = if pending > 0 { 0 } else { gate.limit - running };
                    room.insert(gate.key.clone(), free);
                }
                let free = room.get_mut(&gate.key).expect("inserted above");
                if *free > 0 {
                    *free -= 1;
                    false
                } else {
                    true
                }
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
            "input": to_json(&run.input),
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
                "needs": to_json(&job.needs),
                "pending": job.needs.len(),
                "is_sink": job.is_sink,
                "budget": job.max_attempts,
                "ready": !gated && job.needs.is_empty(),
            }));
        }
    }
    sqlx::query(
        "INSERT INTO runs (id, workflow_id, version, status, input, parent_run_id, parent_job_id, \
             child_index, concurrency_key, concurrency_limit, idempotency_key, timeout_ms, \
             deadline_at, retention_ms, scheduled_at, created_at, started_at) \
         SELECT r.value->>'id', r.value->>'workflow_id', r.value->>'version', r.value->>'status', \
             r.value->>'input', r.value->>'parent_run_id', r.value->>'parent_job_id', \
             r.value->>'child_index', r.value->>'concurrency_key', r.value->>'concurrency_limit', \
             r.value->>'idempotency_key', r.value->>'timeout_ms', r.value->>'deadline_at', \
             r.value->>'retention_ms', r.value->>'scheduled_at', ?2, r.value->>'started_at' \
         FROM json_each(?1) AS r",
    )
    .bind(to_json(&rows))
    .bind(now)
    .execute(&mut *conn)
    .await?;
    if !jobs.is_empty() {
        sqlx::query(
            "INSERT INTO jobs (run_id, step_id, state, needs, pending_needs, is_sink, \
                 attempt_budget, max_attempts, run_after) \
             SELECT j.value->>'run_id', j.value->>'step_id', \
                 CASE WHEN j.value->>'ready' THEN 'available' ELSE 'waiting' END, \
                 j.value->>'needs', j.value->>'pending', j.value->>'is_sink', \
                 j.value->>'budget', j.value->>'budget', ?2 \
             FROM json_each(?1) AS j",
        )
        .bind(to_json(&jobs))
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    Ok(ids)
}

/// Applies settlements fenced by their leases, then everything that follows from them.
async fn complete_in(
    conn: &mut SqliteConnection,
    completions: Vec<Completion>,
    now: Millis,
    finished_runs: &mut FinishedRuns,
) -> Result<Vec<JobId>> {
    if completions.is_empty() {
        return Ok(Vec::new());
    }
    let payload = completion_rows(&completions, now);
    // Only rows still `running` under the same attempt and token change: a late answer from a
    // worker whose lease expired matches nothing.
    let accepted = sqlx::query(
        // Each field is read out of the JSON once (MATERIALIZED), not at every use: JSON
        // extraction is what this statement spends its time on. Each element's text is taken
        // out of the array once (`e`) too: every `value` of `json_each` renders the element
        // anew, while the fields of one `v` share one parse (about 25% of this statement). The
        // attempt history records unsuccessful attempts only; the succeeding one is the row's
        // own timings. A result delivered while the step ran, under the token it parks with now,
        // stays in its checkpoint and wakes it at once; settled any other way than parked, a
        // step drops its callback token (see `CALLBACK_WAITING` in postgres.rs).
        "WITH e AS MATERIALIZED (SELECT value AS v FROM json_each(?1)), \
         c AS MATERIALIZED (SELECT v->>'id' AS id, v->>'attempt' AS attempt, \
             v->>'token' AS token, v->>'state' AS state, v->>'output' AS output, \
             v->>'error' AS error, v->>'run_after' AS run_after, \
             v->>'checkpoint' AS checkpoint FROM e) \
         UPDATE jobs SET \
             state = c.state, \
             output = c.output, \
             error = c.error, \
             run_after = CASE WHEN c.state = 'parked' AND jobs.checkpoint->'callback' IS NOT NULL \
                     AND c.checkpoint->>'callback_token' = jobs.checkpoint->>'callback_token' \
                 THEN ?2 ELSE c.run_after END, \
             checkpoint = CASE WHEN jobs.checkpoint->'callback' IS NOT NULL \
                     AND c.checkpoint->>'callback_token' = jobs.checkpoint->>'callback_token' \
                 THEN json_set(c.checkpoint, '$.callback', json(jobs.checkpoint->'callback')) \
                 WHEN c.state IN ('parked', 'available') THEN coalesce(c.checkpoint, jobs.checkpoint) \
                 ELSE json_remove(coalesce(c.checkpoint, jobs.checkpoint), \
                     '$.callback_token', '$.callback') END, \
             attempt = jobs.attempt - (c.state = 'available'), \
             lease_token = NULL, \
             lease_expires_at = NULL, \
             finished_at = CASE WHEN c.state IN ('succeeded', 'failed') THEN ?2 END, \
             attempts = CASE WHEN c.state IN ('failed', 'retrying') \
                 THEN json_insert(jobs.attempts, '$[#]', json_object('attempt', jobs.attempt, \
                     'started_at', jobs.started_at, 'finished_at', ?2, \
                     'outcome', c.state, 'error', c.error)) \
                 ELSE jobs.attempts END \
         FROM c \
         WHERE jobs.id = c.id AND jobs.attempt = c.attempt \
             AND jobs.lease_token = c.token AND jobs.state = 'running' \
         RETURNING jobs.id, jobs.run_id, jobs.step_id, jobs.state, jobs.error",
    )
    .bind(to_json(&payload))
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;

    let mut accepted_ids = Vec::with_capacity(accepted.len());
    let mut succeeded = Vec::new();
    let mut failed = Vec::new();
    for row in &accepted {
        let id: JobId = row.get("id");
        accepted_ids.push(id);
        let run_id: String = row.get("run_id");
        let step_id: String = row.get("step_id");
        match parse_state::<JobState>(row.get::<&str, _>("state"))? {
            JobState::Succeeded => succeeded.push((run_id, step_id)),
            JobState::Failed => {
                let error: Option<String> = row.get("error");
                failed.push((
                    run_id,
                    format!("step {step_id} failed: {}", error.unwrap_or_default()),
                ));
            }
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
    }
    cascade(
        conn,
        succeeded,
        failed,
        RunStatus::Failed,
        now,
        finished_runs,
    )
    .await?;
    Ok(accepted_ids)
}

/// Follows settled jobs to their consequences until nothing more changes: dependents become
/// available, runs finish, a finished child run settles its parent's `workflow` step (which may
/// finish the parent run in turn), and gates open for waiting runs.
async fn cascade(
    conn: &mut SqliteConnection,
    mut succeeded: Vec<(RunId, String)>,
    mut ended: Vec<(RunId, String)>,
    mut ended_as: RunStatus,
    now: Millis,
    finished_runs: &mut FinishedRuns,
) -> Result<()> {
    loop {
        let mut finished = Vec::new();
        if !succeeded.is_empty() {
            promote_dependents(conn, &succeeded, now).await?;
            let runs: BTreeSet<&RunId> = succeeded.iter().map(|(r, _)| r).collect();
            finished.extend(finish_succeeded_runs(conn, &runs, now).await?);
        }
        if !ended.is_empty() {
            finished.extend(end_runs(conn, &ended, ended_as, now).await?);
        }
        finished_runs.add(&finished);
        open_gates(conn, &finished, now).await?;
        (succeeded, ended) = settle_parents(conn, &finished, now).await?;
        // a parent whose child did not succeed fails like any step
        ended_as = RunStatus::Failed;
        if succeeded.is_empty() && ended.is_empty() {
            return Ok(());
        }
    }
}

/// One statement: every waiting job counts down the needs that just succeeded, and becomes
/// available at zero.
async fn promote_dependents(
    conn: &mut SqliteConnection,
    succeeded: &[(RunId, String)],
    now: Millis,
) -> Result<()> {
    sqlx::query(
        "UPDATE jobs SET \
             pending_needs = jobs.pending_needs - d.n, \
             state = CASE WHEN jobs.pending_needs - d.n <= 0 \
                 AND (SELECT status FROM runs WHERE id = jobs.run_id) = 'running' \
                 THEN 'available' ELSE 'waiting' END, \
             run_after = ?2 \
         FROM (SELECT j.id AS id, count(*) AS n FROM json_each(?1) AS c \
               JOIN jobs AS j ON j.run_id = c.value->>0 AND j.state = 'waiting' \
               JOIN json_each(j.needs) AS nd ON nd.value = c.value->>1 \
               GROUP BY j.id) AS d \
         WHERE jobs.id = d.id",
    )
    .bind(to_json(&succeeded))
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Marks `succeeded` the runs among `runs` whose every job succeeded; the output maps each sink
/// step to its output.
async fn finish_succeeded_runs(
    conn: &mut SqliteConnection,
    runs: &BTreeSet<&RunId>,
    now: Millis,
) -> Result<Vec<FinishedRun>> {
    let rows = sqlx::query(
        "UPDATE runs SET status = 'succeeded', finished_at = ?2, expires_at = ?2 + retention_ms, \
             output = (SELECT json_group_object(step_id, json(output)) FROM jobs \
                       WHERE run_id = runs.id AND is_sink = 1) \
         WHERE id IN (SELECT value FROM json_each(?1)) AND +status = 'running' \
             AND NOT EXISTS (SELECT 1 FROM jobs WHERE run_id = runs.id AND state != 'succeeded') \
         RETURNING id, workflow_id, status, parent_job_id, concurrency_key",
    )
    .bind(to_json(&runs))
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    // (`+status` keeps SQLite from walking every running run by the status index.)
    rows.iter().map(finished_from_row).collect()
}

/// Ends active runs as `status` with their errors, and with them every open job and every active
/// descendant run (cancelled).
async fn end_runs(
    conn: &mut SqliteConnection,
    runs: &[(RunId, String)],
    status: RunStatus,
    now: Millis,
) -> Result<Vec<FinishedRun>> {
    let rows = sqlx::query(&format!(
        "UPDATE runs SET status = ?2, error = c.value->>1, finished_at = ?3, \
             expires_at = ?3 + retention_ms \
         FROM json_each(?1) AS c \
         WHERE runs.id = c.value->>0 AND +runs.status IN {ACTIVE_RUN} \
         RETURNING runs.id, runs.workflow_id, runs.status, runs.parent_job_id, \
             runs.concurrency_key"
    ))
    .bind(to_json(&runs))
    .bind(status.as_str())
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    let mut finished: Vec<FinishedRun> =
        rows.iter().map(finished_from_row).collect::<Result<_>>()?;
    if finished.is_empty() {
        return Ok(finished);
    }
    let roots: Vec<&RunId> = finished.iter().map(|r| &r.id).collect();
    if matches!(status, RunStatus::Failed | RunStatus::TimedOut) {
        sqlx::query(
            "INSERT INTO alerts (workflow_id, run_id, kind, message, created_at) \
             SELECT workflow_id, id, status, coalesce(error, ''), ?2 FROM runs \
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(to_json(&roots))
        .bind(now)
        .execute(&mut *conn)
        .await?;
    }
    let descendants = sqlx::query(&format!(
        "WITH RECURSIVE tree(id) AS ( \
             SELECT value FROM json_each(?1) \
             UNION SELECT runs.id FROM runs JOIN tree ON runs.parent_run_id = tree.id) \
         UPDATE runs SET status = 'cancelled', error = 'its parent run ended', \
             finished_at = ?2, expires_at = ?2 + retention_ms \
         WHERE id IN (SELECT id FROM tree) AND status IN {ACTIVE_RUN} \
         RETURNING id, workflow_id, status, NULL AS parent_job_id, concurrency_key"
    ))
    .bind(to_json(&roots))
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
    let all: Vec<&RunId> = finished.iter().map(|r| &r.id).collect();
    sqlx::query(&format!(
        "UPDATE jobs SET state = 'cancelled', lease_token = NULL, lease_expires_at = NULL, \
             finished_at = ?2 \
         WHERE run_id IN (SELECT value FROM json_each(?1)) AND state IN {OPEN_JOB}"
    ))
    .bind(to_json(&all))
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(finished)
}

/// Starts the oldest waiting runs behind each key whose runs just finished, up to the key's limit.
async fn open_gates(
    conn: &mut SqliteConnection,
    finished: &[FinishedRun],
    now: Millis,
) -> Result<()> {
    let keys: BTreeSet<&String> = finished
        .iter()
        .filter_map(|r| r.concurrency_key.as_ref())
        .collect();
    for key in keys {
        let started: Vec<String> = sqlx::query_scalar(
            "UPDATE runs SET status = 'running', started_at = ?2, \
                 deadline_at = CASE WHEN timeout_ms IS NOT NULL THEN ?2 + timeout_ms END \
             WHERE id IN ( \
                 SELECT id FROM runs WHERE concurrency_key = ?1 AND status = 'pending' \
                 ORDER BY created_at, id \
                 LIMIT max(0, coalesce((SELECT concurrency_limit FROM runs \
                     WHERE concurrency_key = ?1 AND status = 'pending' \
                     ORDER BY created_at, id LIMIT 1), 0) \
                   - (SELECT count(*) FROM runs WHERE concurrency_key = ?1 AND status = 'running'))) \
             RETURNING id",
        )
        .bind(key)
        .bind(now)
        .fetch_all(&mut *conn)
        .await?;
        if !started.is_empty() {
            sqlx::query(
                "UPDATE jobs SET state = 'available', run_after = ?2 \
                 WHERE run_id IN (SELECT value FROM json_each(?1)) AND state = 'waiting' \
                     AND pending_needs = 0",
            )
            .bind(to_json(&started))
            .bind(now)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// Settles the parked `workflow` steps whose child runs just finished: failed when a child did not
/// succeed, succeeded with the list of child outputs once every child succeeded.
async fn settle_parents(
    conn: &mut SqliteConnection,
    finished: &[FinishedRun],
    now: Millis,
) -> Result<(Vec<(RunId, String)>, Vec<(RunId, String)>)> {
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
    for (parent, failure) in parents {
        if let Some(child) = failure {
            let row = sqlx::query(
                "UPDATE jobs SET state = 'failed', error = ?2, finished_at = ?3, \
                     attempts = json_insert(attempts, '$[#]', json_object('attempt', attempt, \
                         'started_at', started_at, 'finished_at', ?3, 'outcome', 'failed', \
                         'error', ?2)) \
                 WHERE id = ?1 AND state = 'parked' RETURNING run_id, step_id",
            )
            .bind(parent)
            .bind(format!("child run {} {}", child.id, child.status))
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(row) = row {
                let step: String = row.get("step_id");
                failed.push((
                    row.get("run_id"),
                    format!(
                        "step {step} failed: child run {} {}",
                        child.id, child.status
                    ),
                ));
            }
        } else {
            let row = sqlx::query(
                "UPDATE jobs SET state = 'succeeded', finished_at = ?2, \
                     output = (SELECT json_group_array(json(output)) FROM \
                         (SELECT output FROM runs WHERE parent_job_id = ?1 ORDER BY child_index)) \
                 WHERE id = ?1 AND state = 'parked' \
                     AND NOT EXISTS (SELECT 1 FROM runs \
                         WHERE parent_job_id = ?1 AND status != 'succeeded') \
                 RETURNING run_id, step_id",
            )
            .bind(parent)
            .bind(now)
            .fetch_optional(&mut *conn)
            .await?;
            if let Some(row) = row {
                succeeded.push((row.get("run_id"), row.get("step_id")));
            }
        }
    }
    Ok((succeeded, failed))
}

fn summary_from_row(row: &SqliteRow) -> Result<RunSummary> {
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
     VALUES ('probe', 'write', '0', ?1) \
     ON CONFLICT (namespace, name) DO UPDATE SET updated_at = excluded.updated_at";

const WORKFLOW_STATE: &str = "SELECT w.id, w.latest_version, w.paused, w.created_at, v.origin, \
         (SELECT max(fire_at) FROM fires WHERE workflow_id = w.id) AS last_fire_at \
     FROM workflows AS w \
     JOIN workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.latest_version";

fn workflow_from_row(row: &SqliteRow) -> WorkflowState {
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

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<()> {
        // Two processes starting on a new file both see no migration applied and race; the loser
        // fails on `CREATE TABLE`. Looking again finds the winner's migration recorded.
        let mut tries = 0;
        loop {
            match MIGRATOR.run(&self.writer).await {
                Ok(()) => return Ok(()),
                Err(_) if tries < 5 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100 * tries)).await;
                }
                Err(e) => return Err(StoreError::Migration(e.to_string())),
            }
        }
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
        let mut tx = self.write_tx().await?;
        let mut versions = Vec::with_capacity(workflows.len());
        for (id, definition) in workflows {
            let text = to_json(definition);
            let row = sqlx::query(
                "SELECT w.latest_version AS latest, \
                     (SELECT definition = ?2 FROM workflow_versions \
                      WHERE workflow_id = ?1 AND version = w.latest_version) AS latest_is_same, \
                     (SELECT definition = ?2 FROM workflow_versions \
                      WHERE workflow_id = ?1 AND origin = 'file' \
                      ORDER BY version DESC LIMIT 1) AS last_file_is_same, \
                     (SELECT coalesce(max(version), 0) FROM workflow_versions \
                      WHERE workflow_id = ?1) AS highest \
                 FROM (SELECT 1) LEFT JOIN workflows AS w ON w.id = ?1",
            )
            .bind(id)
            .bind(&text)
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
                         VALUES (?, ?, ?, ?, ?)",
                    )
                    .bind(id)
                    .bind(version)
                    .bind(&text)
                    .bind(now)
                    .bind(origin.as_str())
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query(
                        "INSERT INTO workflows (id, latest_version, created_at, updated_at) \
                         VALUES (?1, ?2, ?3, ?3) \
                         ON CONFLICT (id) DO UPDATE SET latest_version = ?2, updated_at = ?3",
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
        let row = sqlx::query(&format!("{WORKFLOW_STATE} WHERE w.id = ?"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.as_ref().map(workflow_from_row))
    }

    async fn remove_workflow(&self, id: &str, force: bool) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let removed = sqlx::query("DELETE FROM workflows WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if removed == 0 {
            return Err(StoreError::NotFound(format!("workflow {id}")));
        }
        // Refused, the transaction ends without its delete.
        let active: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM runs WHERE workflow_id = ? AND status IN {ACTIVE_RUN}"
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
        let text: Option<String> = sqlx::query_scalar(
            "SELECT definition FROM workflow_versions WHERE workflow_id = ? AND version = ?",
        )
        .bind(id)
        .bind(version)
        .fetch_optional(&self.reader)
        .await?;
        parse_json(text).ok_or_else(|| StoreError::NotFound(format!("workflow {id} v{version}")))
    }

    async fn workflows(&self) -> Result<Vec<WorkflowState>> {
        let rows = sqlx::query(&format!("{WORKFLOW_STATE} ORDER BY w.id"))
            .fetch_all(&self.reader)
            .await?;
        Ok(rows.iter().map(workflow_from_row).collect())
    }

    async fn set_paused(&self, id: &str, paused: bool, now: Millis) -> Result<()> {
        let done = sqlx::query("UPDATE workflows SET paused = ?, updated_at = ? WHERE id = ?")
            .bind(paused)
            .bind(now)
            .bind(id)
            .execute(&self.writer)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("workflow {id}")));
        }
        Ok(())
    }

    async fn create_runs(&self, runs: Vec<NewRun>, now: Millis) -> Result<Vec<RunId>> {
        let mut tx = self.write_tx().await?;
        let ids = insert_runs(&mut tx, runs, now).await?;
        tx.commit().await?;
        self.wakeup.notify_one();
        Ok(ids)
    }

    async fn fire(&self, fire: FireParams, now: Millis) -> Result<FireOutcome> {
        let mut tx = self.write_tx().await?;
        let recorded = sqlx::query(
            "INSERT INTO fires (workflow_id, fire_at, recorded_at) VALUES (?, ?, ?) \
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
        let paused: Option<bool> = sqlx::query_scalar("SELECT paused FROM workflows WHERE id = ?")
            .bind(&fire.workflow_id)
            .fetch_optional(&mut *tx)
            .await?;
        let mut skipped = paused.unwrap_or(false).then(|| "paused".to_owned());
        if skipped.is_none() && fire.skip_if_active {
            let active: Option<String> = sqlx::query_scalar(&format!(
                "SELECT id FROM runs WHERE workflow_id = ? AND status IN {ACTIVE_RUN} \
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
                    "UPDATE fires SET skipped_reason = ? WHERE workflow_id = ? AND fire_at = ?",
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
                sqlx::query("UPDATE fires SET run_id = ? WHERE workflow_id = ? AND fire_at = ?")
                    .bind(&ids[0])
                    .bind(&fire.workflow_id)
                    .bind(fire.fire_at)
                    .execute(&mut *tx)
                    .await?;
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
             VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(workflow_id)
        .bind(fire_at)
        .bind(reason)
        .bind(now)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn fires(&self, workflow_id: Option<&str>, limit: u32) -> Result<Vec<FireRecord>> {
        let rows = sqlx::query(
            "SELECT workflow_id, fire_at, run_id, skipped_reason, recorded_at FROM fires \
             WHERE ?1 IS NULL OR workflow_id = ?1 ORDER BY fire_at DESC LIMIT ?2",
        )
        .bind(workflow_id)
        .bind(limit)
        .fetch_all(&self.reader)
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
        let mut conn = self.writer.acquire().await?;
        let leased = lease_jobs(&mut conn, &params).await?;
        drop(conn);
        self.claimed_jobs(leased).await
    }

    async fn heartbeat(&self, leases: &[Lease], lease_until: Millis) -> Result<Vec<JobId>> {
        if leases.is_empty() {
            return Ok(Vec::new());
        }
        Ok(sqlx::query_scalar(
            "UPDATE jobs SET lease_expires_at = ?2 FROM json_each(?1) AS c \
             WHERE jobs.id = c.value->>'job_id' AND jobs.attempt = c.value->>'attempt' \
                 AND jobs.lease_token = c.value->>'token' AND jobs.state = 'running' \
             RETURNING jobs.id",
        )
        .bind(to_json(&leases))
        .bind(lease_until)
        .fetch_all(&self.writer)
        .await?)
    }

    async fn complete_and_claim(
        &self,
        completions: Vec<Completion>,
        claim: ClaimParams,
        now: Millis,
    ) -> Result<(Vec<JobId>, Vec<ClaimedJob>)> {
        let mut tx = self.write_tx().await?;
        let mut finished = FinishedRuns::default();
        let accepted = complete_in(&mut tx, completions, now, &mut finished).await?;
        let leased = if claim.limit == 0 {
            Leased::default()
        } else {
            lease_jobs(&mut tx, &claim).await?
        };
        tx.commit().await?;
        finished.publish();
        // A claim that came back short took every due job these completions made claimable.
        if !accepted.is_empty() && leased.rows.len() == claim.limit as usize {
            self.wakeup.notify_one();
        }
        Ok((accepted, self.claimed_jobs(leased).await?))
    }

    async fn deliver_callback(
        &self,
        run_id: &str,
        step_id: &str,
        token: &str,
        result: Value,
        now: Millis,
    ) -> Result<bool> {
        let mut tx = self.write_tx().await?;
        let woken: Option<bool> = sqlx::query_scalar(
            "UPDATE jobs SET checkpoint = json_set(checkpoint, '$.callback', json(?4)), \
                 run_after = CASE WHEN state = 'parked' THEN ?5 ELSE run_after END \
             WHERE run_id = ?1 AND step_id = ?2 AND state IN ('parked', 'running', 'available') \
                 AND checkpoint->>'callback_token' = ?3 AND checkpoint->'callback' IS NULL \
             RETURNING state = 'parked'",
        )
        .bind(run_id)
        .bind(step_id)
        .bind(token)
        .bind(to_json(&result))
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        // The same delivery again (n8n retrying) finds its result taken already.
        let repeated = woken.is_none()
            && sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM jobs \
                 WHERE run_id = ?1 AND step_id = ?2 \
                     AND state IN ('parked', 'running', 'available') \
                     AND checkpoint->>'callback_token' = ?3 \
                     AND checkpoint->'callback'->>'event_id' = json(?4)->>'event_id'",
            )
            .bind(run_id)
            .bind(step_id)
            .bind(token)
            .bind(to_json(&result))
            .fetch_one(&mut *tx)
            .await?
                > 0;
        tx.commit().await?;
        if woken == Some(true) {
            self.wakeup.notify_one();
        }
        Ok(woken.is_some() || repeated)
    }

    async fn sweep(&self, now: Millis) -> Result<Swept> {
        let mut tx = self.write_tx().await?;
        let expired = sqlx::query(
            "SELECT id, attempt, lease_token, max_attempts FROM jobs \
             WHERE state = 'running' AND lease_expires_at <= ? LIMIT 1000",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let lost: Vec<Completion> = expired
            .iter()
            .map(|row| Completion {
                lease: Lease {
                    job_id: row.get("id"),
                    attempt: row.get("attempt"),
                    token: row.get("lease_token"),
                },
                settlement: settle_lost_lease(row.get("attempt"), row.get("max_attempts"), now),
                children: Vec::new(),
            })
            .collect();
        let mut finished = FinishedRuns::default();
        let reclaimed = complete_in(&mut tx, lost, now, &mut finished).await?.len() as u64;

        let late: Vec<(String, Option<i64>)> = sqlx::query_as(&format!(
            "SELECT id, timeout_ms FROM runs WHERE status IN {ACTIVE_RUN} AND deadline_at <= ? \
             LIMIT 1000"
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
            &mut finished,
        )
        .await?;
        tx.commit().await?;
        finished.publish();
        if reclaimed > 0 {
            self.wakeup.notify_one();
        }
        Ok(Swept {
            reclaimed_jobs: reclaimed,
            timed_out_runs: timed_out,
        })
    }

    async fn queue_depth(&self, now: Millis) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM jobs \
             WHERE state IN ('available', 'retrying', 'parked') AND run_after <= ?",
        )
        .bind(now)
        .fetch_one(&self.reader)
        .await?)
    }

    async fn next_due(&self) -> Result<Option<Millis>> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT min( \
                 coalesce((SELECT min(run_after) FROM jobs \
                     WHERE state IN ('available', 'retrying', 'parked')), 9000000000000000000), \
                 coalesce((SELECT min(deadline_at) FROM runs \
                     WHERE status IN {ACTIVE_RUN} AND deadline_at IS NOT NULL), 9000000000000000000))"
        ))
        .fetch_one(&self.reader)
        .await
        .map(|due: i64| (due < 9_000_000_000_000_000_000).then_some(due))?)
    }

    async fn cancel_run(&self, run_id: &str, now: Millis) -> Result<RunStatus> {
        let mut tx = self.write_tx().await?;
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM runs WHERE id = ?")
            .bind(run_id)
            .fetch_optional(&mut *tx)
            .await?;
        let status: RunStatus =
            parse_state(&status.ok_or_else(|| StoreError::NotFound(format!("run {run_id}")))?)?;
        if status.is_finished() {
            return Ok(status);
        }
        let mut finished = FinishedRuns::default();
        cascade(
            &mut tx,
            Vec::new(),
            vec![(run_id.to_owned(), "cancelled".to_owned())],
            RunStatus::Cancelled,
            now,
            &mut finished,
        )
        .await?;
        tx.commit().await?;
        finished.publish();
        Ok(RunStatus::Cancelled)
    }

    async fn retry_run(&self, run_id: &str, now: Millis) -> Result<()> {
        let mut tx = self.write_tx().await?;
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM runs WHERE id = ?")
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
                 WHERE j.run_id IN (SELECT value FROM json_each(?1)) \
                     AND j.state IN ('failed', 'cancelled') AND c.status != 'succeeded'",
            )
            .bind(json!(level))
            .fetch_all(&mut *tx)
            .await?;
            waiting_parents.extend(rows.iter().map(|(job, _)| *job));
            level = rows.into_iter().map(|(_, child)| child).collect();
            runs.extend(level.iter().cloned());
        }
        let runs = json!(runs);
        sqlx::query(
            "UPDATE runs SET status = 'running', error = NULL, output = NULL, finished_at = NULL, \
                 expires_at = NULL, \
                 deadline_at = CASE WHEN timeout_ms IS NOT NULL THEN ?2 + timeout_ms END \
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(&runs)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE jobs SET state = 'parked', error = NULL, finished_at = NULL, run_after = NULL \
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(json!(waiting_parents))
        .execute(&mut *tx)
        .await?;
        // Succeeded steps keep their outputs; the rest wait for their needs again.
        sqlx::query(
            "UPDATE jobs SET state = 'waiting', output = NULL, error = NULL, checkpoint = NULL, \
                 finished_at = NULL, max_attempts = attempt + attempt_budget, \
                 pending_needs = (SELECT count(*) FROM json_each(jobs.needs) AS nd \
                     JOIN jobs AS up ON up.run_id = jobs.run_id AND up.step_id = nd.value \
                     WHERE up.state != 'succeeded') \
             WHERE run_id IN (SELECT value FROM json_each(?1)) AND state IN ('failed', 'cancelled')",
        )
        .bind(&runs)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE jobs SET state = 'available', run_after = ?2 \
             WHERE run_id IN (SELECT value FROM json_each(?1)) AND state = 'waiting' \
                 AND pending_needs = 0",
        )
        .bind(&runs)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.wakeup.notify_one();
        Ok(())
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        let rows = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM runs \
             WHERE (?1 IS NULL OR workflow_id = ?1) AND (?2 IS NULL OR status = ?2) \
                 AND (?3 IS NULL OR created_at >= ?3) AND (?4 IS NULL OR created_at < ?4) \
                 AND (?6 IS NULL OR (created_at, id) < (?6, ?7)) \
             ORDER BY created_at DESC, id DESC LIMIT ?5"
        ))
        .bind(&filter.workflow_id)
        .bind(filter.status.map(|s| s.as_str()))
        .bind(filter.created_after)
        .bind(filter.created_before)
        .bind(filter.limit)
        .bind(filter.after_cursor.as_ref().map(|(at, _)| *at))
        .bind(filter.after_cursor.as_ref().map(|(_, id)| id.as_str()))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(summary_from_row).collect()
    }

    async fn count_runs(&self, status: RunStatus, created_after: Option<Millis>) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE status = ?1 AND (?2 IS NULL OR created_at >= ?2)",
        )
        .bind(status.as_str())
        .bind(created_after)
        .fetch_one(&self.reader)
        .await?)
    }

    async fn run(&self, run_id: &str) -> Result<RunDetail> {
        let row = sqlx::query(&format!(
            "SELECT {SUMMARY_COLUMNS}, input, output, scheduled_at FROM runs WHERE id = ?"
        ))
        .bind(run_id)
        .fetch_optional(&self.reader)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("run {run_id}")))?;
        let steps = sqlx::query(
            "SELECT id, step_id, state, attempt, output, error, run_after, started_at, \
                 finished_at, attempts FROM jobs WHERE run_id = ? ORDER BY id",
        )
        .bind(run_id)
        .fetch_all(&self.reader)
        .await?
        .iter()
        .map(|r| {
            Ok(JobDetail {
                id: r.get("id"),
                step_id: r.get("step_id"),
                state: parse_state(r.get::<&str, _>("state"))?,
                attempt: r.get("attempt"),
                output: parse_json(r.get("output")),
                error: r.get("error"),
                run_after: r.get("run_after"),
                started_at: r.get("started_at"),
                finished_at: r.get("finished_at"),
                attempts: parse_json(r.get("attempts")).unwrap_or(Value::Array(Vec::new())),
            })
        })
        .collect::<Result<_>>()?;
        Ok(RunDetail {
            summary: summary_from_row(&row)?,
            input: parse_json(row.get("input")).unwrap_or(Value::Null),
            output: parse_json(row.get("output")),
            scheduled_at: row.get("scheduled_at"),
            steps,
        })
    }

    async fn prune(&self, now: Millis, limit: u32) -> Result<u64> {
        let mut tx = self.write_tx().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM runs WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        // Fire records outlive their runs by the default retention; the newest of each workflow
        // stays, since the scheduler counts missed fires from it.
        sqlx::query(
            "DELETE FROM fires WHERE fire_at < ?1 - 2592000000 \
             AND fire_at < (SELECT max(fire_at) FROM fires AS f WHERE f.workflow_id = fires.workflow_id)",
        )
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM alerts WHERE created_at < ?1 - 2592000000")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM webhook_events WHERE received_at < ?1 - 2592000000")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM revoked_tokens WHERE expires_at <= ?1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM audit_log WHERE at < ?1 - 7776000000")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        if ids.is_empty() {
            tx.commit().await?;
            return Ok(0);
        }
        let ids = to_json(&ids);
        sqlx::query("DELETE FROM jobs WHERE run_id IN (SELECT value FROM json_each(?))")
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
        let deleted = sqlx::query("DELETE FROM runs WHERE id IN (SELECT value FROM json_each(?))")
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
             WHERE (?1 IS NULL OR workflow_id = ?1) ORDER BY created_at DESC, id DESC LIMIT ?2",
        )
        .bind(workflow_id)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?)
    }

    async fn put_setting(
        &self,
        namespace: &str,
        name: &str,
        value: &Value,
        now: Millis,
    ) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO settings (namespace, name, value, updated_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (namespace, name) DO UPDATE SET value = excluded.value, \
                 updated_at = excluded.updated_at",
        )
        .bind(namespace)
        .bind(name)
        .bind(to_json(value))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn init_setting(
        &self,
        namespace: &str,
        name: &str,
        value: &Value,
        now: Millis,
    ) -> Result<Value> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO settings (namespace, name, value, updated_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (namespace, name) DO NOTHING",
        )
        .bind(namespace)
        .bind(name)
        .bind(to_json(value))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let stored: String =
            sqlx::query_scalar("SELECT value FROM settings WHERE namespace = ? AND name = ?")
                .bind(namespace)
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
        tx.commit().await?;
        parse_json(Some(stored))
            .ok_or_else(|| StoreError::Database(format!("setting {namespace}/{name} is not JSON")))
    }

    async fn setting(&self, namespace: &str, name: &str) -> Result<Option<Setting>> {
        let row = sqlx::query(
            "SELECT name, value, updated_at FROM settings WHERE namespace = ? AND name = ?",
        )
        .bind(namespace)
        .bind(name)
        .fetch_optional(&self.reader)
        .await?;
        row.as_ref().map(setting_from_row).transpose()
    }

    async fn settings(&self, namespace: &str) -> Result<Vec<Setting>> {
        let rows = sqlx::query(
            "SELECT name, value, updated_at FROM settings WHERE namespace = ? ORDER BY name",
        )
        .bind(namespace)
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(setting_from_row).collect()
    }

    async fn delete_setting(&self, namespace: &str, name: &str) -> Result<bool> {
        let mut tx = self.write_tx().await?;
        let deleted = sqlx::query("DELETE FROM settings WHERE namespace = ? AND name = ?")
            .bind(namespace)
            .bind(name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(deleted > 0)
    }

    async fn record_webhook_event(
        &self,
        event: NewWebhookEvent,
        now: Millis,
    ) -> Result<(WebhookEvent, bool)> {
        let inserted: Option<WebhookEvent> = sqlx::query_as(&format!(
            "INSERT INTO webhook_events (source, event_id, workflow_id, payload, received_at) \
             VALUES (?1, ?2, ?3, ?5, ?4) \
             ON CONFLICT (source, event_id) DO NOTHING \
             RETURNING {WEBHOOK_EVENT_COLUMNS}"
        ))
        .bind(&event.source)
        .bind(&event.event_id)
        .bind(&event.workflow_id)
        .bind(now)
        .bind(&event.payload)
        .fetch_optional(&self.writer)
        .await?;
        if let Some(stored) = inserted {
            return Ok((stored, true));
        }
        let first = sqlx::query_as(&format!(
            "SELECT {WEBHOOK_EVENT_COLUMNS} FROM webhook_events \
             WHERE source = ?1 AND event_id = ?2"
        ))
        .bind(&event.source)
        .bind(&event.event_id)
        .fetch_one(&self.writer)
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
            "UPDATE webhook_events SET run_id = coalesce(run_id, ?2), \
                 error = CASE WHEN coalesce(run_id, ?2) IS NULL THEN coalesce(error, ?3) END \
             WHERE id = ?1",
        )
        .bind(id)
        .bind(run_id)
        .bind(error)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn webhook_events(&self, source: Option<&str>, limit: u32) -> Result<Vec<WebhookEvent>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {WEBHOOK_EVENT_COLUMNS} FROM webhook_events \
             WHERE (?1 IS NULL OR source = ?1) \
             ORDER BY received_at DESC, id DESC LIMIT ?2"
        ))
        .bind(source)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?)
    }
    async fn probe_write(&self, now: Millis) -> Result<()> {
        let mut tx = self.write_tx().await?;
        sqlx::query(PROBE_WRITE).bind(now).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn change_settings(
        &self,
        changes: Vec<SettingChange>,
        audit: Option<NewAuditEntry>,
        now: Millis,
    ) -> Result<Vec<bool>> {
        let mut tx = self.write_tx().await?;
        let mut applied = Vec::with_capacity(changes.len());
        for change in &changes {
            let rows = match change {
                SettingChange::Put {
                    namespace,
                    name,
                    value,
                } => sqlx::query(
                    "INSERT INTO settings (namespace, name, value, updated_at) VALUES (?, ?, ?, ?) \
                     ON CONFLICT (namespace, name) DO UPDATE SET value = excluded.value, \
                         updated_at = excluded.updated_at",
                )
                .bind(namespace)
                .bind(name)
                .bind(to_json(value))
                .bind(now),
                SettingChange::Delete { namespace, name } => {
                    sqlx::query("DELETE FROM settings WHERE namespace = ? AND name = ?")
                        .bind(namespace)
                        .bind(name)
                }
                // Stored text is what `to_json` made of the value, so the text compares.
                SettingChange::Swap {
                    namespace,
                    name,
                    old,
                    new,
                } => sqlx::query(
                    "UPDATE settings SET value = ? WHERE namespace = ? AND name = ? AND value = ?",
                )
                .bind(to_json(new))
                .bind(namespace)
                .bind(name)
                .bind(to_json(old)),
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
        let mut tx = self.write_tx().await?;
        insert_audit(&mut tx, &entry, now).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn audit_log(&self, before: Option<i64>, limit: u32) -> Result<Vec<AuditEntry>> {
        Ok(sqlx::query_as(
            "SELECT id, at, actor, action, target, detail FROM audit_log \
             WHERE (?1 IS NULL OR id < ?1) ORDER BY id DESC LIMIT ?2",
        )
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?)
    }

    async fn revoke_token(
        &self,
        revocation: TokenRevocation,
        audit: NewAuditEntry,
        now: Millis,
    ) -> Result<bool> {
        let mut tx = self.write_tx().await?;
        let revoked = sqlx::query(
            "INSERT INTO revoked_tokens (jti, expires_at, revoked_at, revoked_by) \
             VALUES (?, ?, ?, ?) ON CONFLICT (jti) DO NOTHING",
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
            sqlx::query_scalar("SELECT jti FROM revoked_tokens WHERE expires_at > ?")
                .bind(now)
                .fetch_all(&self.reader)
                .await?,
        )
    }
}

async fn insert_audit(
    conn: &mut SqliteConnection,
    entry: &NewAuditEntry,
    now: Millis,
) -> Result<()> {
    sqlx::query("INSERT INTO audit_log (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)")
        .bind(now)
        .bind(&entry.actor)
        .bind(&entry.action)
        .bind(&entry.target)
        .bind(to_json(&entry.detail))
        .execute(conn)
        .await?;
    Ok(())
}
