//! SQLite: the embedded default. WAL with `synchronous=FULL`, so a committed transition survives
//! power loss. All writes go through one connection (SQLite has one writer anyway; queueing in the
//! pool beats retrying on `SQLITE_BUSY`), reads through a small pool. Every statement handles a whole
//! batch, passing it as a JSON array to `json_each`: with sqlx each statement costs ~100 µs, so
//! statements per batch, not rows, set the throughput.

use super::{Usage, UsageFilter};
use crate::artifacts::ArtifactRef;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::DerefMut;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{FromRow, Row, SqliteConnection};
use tokio::sync::Notify;

use super::driver::Driver;
use super::machine::{
    Disposition, Effects, ExpiredLease, FailedStep, FinishedRun, GateLoad, KeyedRun, LoopProgress,
    NewVersion, NonceFiller, NonceHolder, NonceState, NotificationUpdate, RecordCutoffs,
    SettingKey, Settled, SettledJob, Succeeded, Tx,
};
use super::sql::statement;
use super::*;
use crate::flow::FlowStep;
use crate::state::{JobState, Millis, RunStatus};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

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

/// Jobs a claim just leased, not yet read out: the runs and outputs are read after the commit,
/// through the reader pool.
#[derive(Default)]
pub struct Leased {
    token: String,
    rows: Vec<SqliteRow>,
}

/// The write half of a claim: leases up to `limit` claimable jobs, higher priority first, oldest
/// due first within a priority.
async fn lease_jobs(conn: &mut SqliteConnection, params: &ClaimParams) -> Result<Leased> {
    let token = uuid::Uuid::new_v4().simple().to_string();
    // Waking from a parked state continues the same attempt; anything else starts a new one.
    // The three parts run in turn while the claim is not full; the first and the last walk the
    // partial index of the few jobs whose priority is not 0, the middle one `jobs_claimable`.
    let rows = sqlx::query(statement!(
        "UPDATE jobs SET state = {job:running}, attempt = attempt + (state != {job:parked}), \
             lease_token = ?1, lease_expires_at = ?2, \
             started_at = CASE WHEN state = {job:parked} THEN started_at ELSE ?3 END \
         WHERE id IN ( \
             SELECT id FROM (SELECT id FROM jobs \
                 WHERE state IN {jobs:claimable} AND priority <> 0 AND priority > 0 \
                     AND run_after <= ?3 \
                 ORDER BY priority DESC, run_after, id LIMIT ?4) \
             UNION ALL \
             SELECT id FROM (SELECT id FROM jobs \
                 WHERE state IN {jobs:claimable} AND run_after <= ?3 AND priority = 0 \
                 ORDER BY run_after, id LIMIT ?4) \
             UNION ALL \
             SELECT id FROM (SELECT id FROM jobs \
                 WHERE state IN {jobs:claimable} AND priority <> 0 AND priority < 0 \
                     AND run_after <= ?3 \
                 ORDER BY priority DESC, run_after, id LIMIT ?4) \
             LIMIT ?4) \
         RETURNING id, run_id, step_id, attempt, checkpoint, loop_job_id, item_index, item"
    ))
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
            "SELECT id, workflow_id, version, input, scheduled_at, error FROM runs \
             WHERE id IN (SELECT value FROM json_each(?))",
        )
        .bind(&run_ids)
        .fetch_all(&self.reader)
        .await?
        .into_iter()
        .map(|r| (r.get("id"), r))
        .collect();
        // An item is given neither its run's input nor outputs: every item shares them
        // (`Store::loop_context`).
        let loop_ids: BTreeSet<JobId> = rows
            .iter()
            .filter_map(|r| r.get::<Option<JobId>, _>("loop_job_id"))
            .collect();
        let mut loops: BTreeMap<JobId, String> = BTreeMap::new();
        if !loop_ids.is_empty() {
            for row in sqlx::query(
                "SELECT id, step_id FROM jobs WHERE id IN (SELECT value FROM json_each(?))",
            )
            .bind(to_json(&loop_ids))
            .fetch_all(&self.reader)
            .await?
            {
                loops.insert(row.get("id"), row.get("step_id"));
            }
        }
        let mut outputs: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
        for row in sqlx::query(statement!(
            "SELECT run_id, step_id, output FROM jobs \
             WHERE run_id IN (SELECT value FROM json_each(?)) AND state IN {jobs:successful} \
                 AND loop_job_id IS NULL"
        ))
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
                let looped = row
                    .get::<Option<JobId>, _>("loop_job_id")
                    .and_then(|id| Some((id, loops.get(&id)?)));
                Ok(ClaimedJob {
                    lease: Lease {
                        job_id: row.get("id"),
                        attempt: row.get("attempt"),
                        token: token.clone(),
                    },
                    step_id: row.get("step_id"),
                    workflow_id: run.get("workflow_id"),
                    version: run.get("version"),
                    input: match looped {
                        Some(_) => Value::Null,
                        None => parse_json(run.get("input")).unwrap_or(Value::Null),
                    },
                    scheduled_at: run.get("scheduled_at"),
                    run_error: run.get("error"),
                    item: looped.map(|(loop_job, step_id)| LoopItem {
                        loop_job,
                        step_id: step_id.clone(),
                        index: row.get::<Option<i64>, _>("item_index").unwrap_or_default(),
                        value: parse_json(row.get("item")).unwrap_or(Value::Null),
                    }),
                    checkpoint: parse_json(row.get("checkpoint")),
                    outputs: match looped {
                        Some(_) => serde_json::Map::new(),
                        None => outputs.get(&run_id).cloned().unwrap_or_default(),
                    },
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

/// Rows read whole, then mapped. `query_as` maps each row while the statement still streams
/// them from SQLite's worker thread; reading them first drained 100k jobs 5% faster (2 cores).
fn rows_as<T: for<'r> FromRow<'r, SqliteRow>>(rows: Vec<SqliteRow>) -> Result<Vec<T>> {
    Ok(rows.iter().map(T::from_row).collect::<sqlx::Result<_>>()?)
}

/// A write transaction's connection, as the state machine drives it. One writer serialises every
/// transaction, so locks are no-ops. Batches travel as JSON arrays read by `json_each`.
pub struct SqliteTx<C>(C);

#[async_trait]
impl<C: DerefMut<Target = SqliteConnection> + Send> Tx for SqliteTx<C> {
    async fn lock_key(&mut self, _key: &str) -> Result<()> {
        Ok(())
    }

    async fn lock_runs_of_jobs(&mut self, _jobs: &[JobId]) -> Result<()> {
        Ok(())
    }

    async fn runs_by_idempotency_key(&mut self, keys: &[&str]) -> Result<Vec<KeyedRun>> {
        rows_as(
            sqlx::query(
                "SELECT idempotency_key, id, request_digest FROM runs \
             WHERE idempotency_key IN (SELECT value FROM json_each(?))",
            )
            .bind(to_json(&keys))
            .fetch_all(&mut *self.0)
            .await?,
        )
    }

    async fn gate_load(&mut self, key: &str) -> Result<GateLoad> {
        let (running, pending, oldest_pending_limit) = sqlx::query_as(statement!(
            "SELECT coalesce(sum(status = {run:running}), 0), \
                 coalesce(sum(status = {run:pending}), 0), \
                 (SELECT concurrency_limit FROM runs \
                  WHERE concurrency_key = ?1 AND status = {run:pending} \
                  ORDER BY created_at, id LIMIT 1) \
             FROM runs WHERE concurrency_key = ?1 AND status IN {runs:active}"
        ))
        .bind(key)
        .fetch_one(&mut *self.0)
        .await?;
        Ok(GateLoad {
            running,
            pending,
            oldest_pending_limit,
        })
    }

    async fn insert_run_rows(&mut self, runs: Value, now: Millis) -> Result<BTreeSet<RunId>> {
        let inserted: Vec<String> = sqlx::query_scalar(
            // `WHERE true`: SQLite reads `ON CONFLICT` after a bare SELECT as a join clause.
            "INSERT INTO runs (id, workflow_id, version, status, input, parent_run_id, \
                 parent_job_id, child_index, concurrency_key, concurrency_limit, idempotency_key, \
                 timeout_ms, deadline_at, retention_ms, scheduled_at, created_at, started_at, \
                 priority, request_digest, notify) \
             SELECT r.value->>'id', r.value->>'workflow_id', r.value->>'version', \
                 r.value->>'status', coalesce(r.value->'input', 'null'), \
                 r.value->>'parent_run_id', r.value->>'parent_job_id', r.value->>'child_index', \
                 r.value->>'concurrency_key', r.value->>'concurrency_limit', \
                 r.value->>'idempotency_key', r.value->>'timeout_ms', r.value->>'deadline_at', \
                 r.value->>'retention_ms', r.value->>'scheduled_at', ?2, r.value->>'started_at', \
                 r.value->>'priority', r.value->>'request_digest', r.value->>'notify' \
             FROM json_each(?1) AS r WHERE true \
             ON CONFLICT DO NOTHING RETURNING id",
        )
        .bind(to_json(&runs))
        .bind(now)
        .fetch_all(&mut *self.0)
        .await?;
        Ok(inserted.into_iter().collect())
    }

    async fn insert_job_rows(&mut self, jobs: Value, now: Millis) -> Result<()> {
        sqlx::query(statement!(
            "INSERT INTO jobs (run_id, step_id, state, needs, pending_needs, is_sink, \
                 attempt_budget, max_attempts, continue_on_error, run_if, flow, on_failure, \
                 priority, run_after) \
             SELECT j.value->>'run_id', j.value->>'step_id', \
                 CASE WHEN j.value->>'ready' THEN {job:available} ELSE {job:waiting} END, \
                 j.value->>'needs', j.value->>'pending', j.value->>'is_sink', \
                 j.value->>'budget', j.value->>'budget', j.value->>'continue_on_error', \
                 j.value->>'run_if', j.value->>'flow', j.value->>'on_failure', \
                 j.value->>'priority', ?2 \
             FROM json_each(?1) AS j"
        ))
        .bind(to_json(&jobs))
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn settle_jobs(&mut self, rows: Value, _ids: &[JobId], now: Millis) -> Result<Settled> {
        let settled = sqlx::query(statement!(
            // Each field is read out of the JSON once (MATERIALIZED), not at every use: JSON
            // extraction is what this statement spends its time on. Each element's text is taken
            // out of the array once (`e`) too: every `value` of `json_each` renders the element
            // anew, while the fields of one `v` share one parse (about 25% of this statement).
            // The attempt history records unsuccessful attempts only; the succeeding one is the
            // row's own timings. A result delivered while the step ran, under the token it parks
            // with now, stays in its checkpoint and wakes it at once; settled any other way than
            // parked or given back, a step drops its callback token, so a late answer to an
            // attempt that ended is refused rather than kept for the next one.
            "WITH e AS MATERIALIZED (SELECT value AS v FROM json_each(?1)), \
             c AS MATERIALIZED (SELECT v->>'id' AS id, v->>'attempt' AS attempt, \
                 v->>'token' AS token, v->>'state' AS state, v->>'output' AS output, \
                 v->>'error' AS error, v->>'run_after' AS run_after, \
                 v->>'checkpoint' AS checkpoint FROM e) \
             UPDATE jobs SET \
                 state = c.state, \
                 output = c.output, \
                 error = c.error, \
                 run_after = CASE WHEN c.state = {job:parked} \
                         AND jobs.checkpoint->'callback' IS NOT NULL \
                         AND c.checkpoint->>'callback_token' = jobs.checkpoint->>'callback_token' \
                     THEN ?2 ELSE c.run_after END, \
                 checkpoint = CASE WHEN jobs.checkpoint->'callback' IS NOT NULL \
                         AND c.checkpoint->>'callback_token' = jobs.checkpoint->>'callback_token' \
                     THEN json_set(c.checkpoint, '$.callback', json(jobs.checkpoint->'callback')) \
                     WHEN c.state IN ({job:parked}, {job:available}) \
                     THEN coalesce(c.checkpoint, jobs.checkpoint) \
                     ELSE json_remove(coalesce(c.checkpoint, jobs.checkpoint), \
                         '$.callback_token', '$.callback') END, \
                 attempt = jobs.attempt - (c.state = {job:available}), \
                 lease_token = NULL, \
                 lease_expires_at = NULL, \
                 finished_at = CASE WHEN c.state IN {jobs:finishing} THEN ?2 END, \
                 attempts = CASE WHEN c.state IN {jobs:counted} \
                     THEN json_insert(jobs.attempts, '$[#]', json_object('attempt', jobs.attempt, \
                         'started_at', jobs.started_at, 'finished_at', ?2, \
                         'outcome', c.state, 'error', c.error)) \
                     ELSE jobs.attempts END \
             FROM c \
             WHERE jobs.id = c.id AND jobs.attempt = c.attempt \
                 AND jobs.lease_token = c.token AND jobs.state = {job:running} \
             RETURNING jobs.id, jobs.run_id, jobs.step_id, jobs.state, jobs.error, jobs.is_sink, \
                 jobs.flow, jobs.loop_job_id"
        ))
        .bind(to_json(&rows))
        .bind(now)
        .fetch_all(&mut *self.0)
        .await?;
        let jobs = settled
            .iter()
            .map(|row| {
                Ok(SettledJob {
                    id: row.get("id"),
                    run_id: row.get("run_id"),
                    step_id: row.get("step_id"),
                    state: parse_state(row.get::<&str, _>("state"))?,
                    error: row.get("error"),
                    is_sink: row.get("is_sink"),
                    flow: row.get("flow"),
                    loop_job: row.get("loop_job_id"),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let succeeded: Vec<(&str, &str)> = jobs
            .iter()
            .filter(|j| {
                j.state == JobState::Succeeded && !j.is_sink && !j.flow && j.loop_job.is_none()
            })
            .map(|j| (j.run_id.as_str(), j.step_id.as_str()))
            .collect();
        let promoted = if succeeded.is_empty() {
            Vec::new()
        } else {
            promote(&mut self.0, &succeeded, now).await?
        };
        Ok(Settled { jobs, promoted })
    }

    async fn promote_dependents(
        &mut self,
        succeeded: &[&Succeeded],
        now: Millis,
    ) -> Result<Vec<JobId>> {
        let steps: Vec<(&str, &str)> = succeeded
            .iter()
            .map(|s| (s.run_id.as_str(), s.step_id.as_str()))
            .collect();
        Ok(promote(&mut self.0, &steps, now)
            .await?
            .into_iter()
            .filter(|(_, state)| *state == JobState::Available)
            .map(|(id, _)| id)
            .collect())
    }

    async fn finish_done_runs(&mut self, runs: &[&str], now: Millis) -> Result<Vec<FinishedRun>> {
        // (`+status` keeps SQLite from walking every running run by the status index.)
        rows_as(
            sqlx::query(statement!(
                "UPDATE runs SET status = {run:succeeded}, finished_at = ?2, \
                 expires_at = ?2 + retention_ms, \
                 output = (SELECT json_group_object(step_id, json(output)) FROM jobs \
                           WHERE run_id = runs.id AND is_sink = 1) \
             WHERE id IN (SELECT value FROM json_each(?1)) AND +status = {run:running} \
                 AND NOT EXISTS (SELECT 1 FROM jobs WHERE run_id = runs.id \
                     AND state NOT IN {jobs:successful} AND loop_job_id IS NULL) \
             RETURNING id, workflow_id, status, parent_job_id, concurrency_key, notify"
            ))
            .bind(to_json(&runs))
            .bind(now)
            .fetch_all(&mut *self.0)
            .await?,
        )
    }

    async fn end_active_runs(
        &mut self,
        runs: &[(RunId, String)],
        status: RunStatus,
        now: Millis,
    ) -> Result<Vec<FinishedRun>> {
        rows_as(
            sqlx::query(statement!(
                "UPDATE runs SET status = ?2, error = c.value->>1, finished_at = ?3, \
                 expires_at = ?3 + retention_ms \
             FROM json_each(?1) AS c \
             WHERE runs.id = c.value->>0 AND +runs.status IN {runs:active} \
             RETURNING runs.id, runs.workflow_id, runs.status, runs.parent_job_id, \
                 runs.concurrency_key, runs.notify"
            ))
            .bind(to_json(&runs))
            .bind(status.as_str())
            .bind(now)
            .fetch_all(&mut *self.0)
            .await?,
        )
    }

    async fn raise_alerts(&mut self, runs: &[&str], now: Millis) -> Result<()> {
        sqlx::query(
            "INSERT INTO alerts (workflow_id, run_id, kind, message, created_at) \
             SELECT workflow_id, id, status, coalesce(error, ''), ?2 FROM runs \
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(to_json(&runs))
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn cancel_descendants(
        &mut self,
        roots: &[&str],
        error: &str,
        now: Millis,
    ) -> Result<Vec<FinishedRun>> {
        rows_as(
            sqlx::query(statement!(
                "WITH RECURSIVE tree(id) AS ( \
                 SELECT value FROM json_each(?1) \
                 UNION SELECT runs.id FROM runs JOIN tree ON runs.parent_run_id = tree.id) \
             UPDATE runs SET status = {run:cancelled}, error = ?3, \
                 finished_at = ?2, expires_at = ?2 + retention_ms \
             WHERE id IN (SELECT id FROM tree) AND status IN {runs:active} \
             RETURNING id, workflow_id, status, parent_job_id, concurrency_key, notify"
            ))
            .bind(to_json(&roots))
            .bind(now)
            .bind(error)
            .fetch_all(&mut *self.0)
            .await?,
        )
    }

    async fn cancel_open_jobs(&mut self, runs: &[&str], now: Millis) -> Result<()> {
        sqlx::query(statement!(
            "UPDATE jobs SET state = {job:cancelled}, lease_token = NULL, \
                 lease_expires_at = NULL, finished_at = ?2 \
             WHERE run_id IN (SELECT value FROM json_each(?1)) AND state IN {jobs:open}"
        ))
        .bind(to_json(&runs))
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn start_pending_runs(
        &mut self,
        key: &str,
        count: i64,
        now: Millis,
    ) -> Result<Vec<RunId>> {
        Ok(sqlx::query_scalar(statement!(
            "UPDATE runs SET status = {run:running}, started_at = ?2, \
                 deadline_at = CASE WHEN timeout_ms IS NOT NULL THEN ?2 + timeout_ms END \
             WHERE id IN (SELECT id FROM runs \
                 WHERE concurrency_key = ?1 AND status = {run:pending} \
                 ORDER BY created_at, id LIMIT ?3) \
             RETURNING id"
        ))
        .bind(key)
        .bind(now)
        .bind(count)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn make_ready(&mut self, runs: &[RunId], now: Millis) -> Result<u64> {
        Ok(sqlx::query(statement!(
            "UPDATE jobs SET state = {job:available}, run_after = ?2 \
             WHERE run_id IN (SELECT value FROM json_each(?1)) AND state = {job:waiting} \
                 AND pending_needs = 0"
        ))
        .bind(to_json(&runs))
        .bind(now)
        .execute(&mut *self.0)
        .await?
        .rows_affected())
    }

    async fn fail_parked_step(
        &mut self,
        job: JobId,
        error: &str,
        now: Millis,
    ) -> Result<Option<FailedStep>> {
        Ok(sqlx::query_as(statement!(
            "UPDATE jobs SET state = {job:failed}, error = ?2, finished_at = ?3, \
                 attempts = json_insert(attempts, '$[#]', json_object('attempt', attempt, \
                     'started_at', started_at, 'finished_at', ?3, 'outcome', {job:failed}, \
                     'error', ?2)) \
             WHERE id = ?1 AND state = {job:parked} RETURNING run_id, step_id, flow, loop_job_id"
        ))
        .bind(job)
        .bind(error)
        .bind(now)
        .fetch_optional(&mut *self.0)
        .await?)
    }

    async fn continuing_on_error(&mut self, jobs: &[JobId]) -> Result<BTreeSet<JobId>> {
        let tolerant: Vec<JobId> = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE id IN (SELECT value FROM json_each(?)) \
             AND continue_on_error",
        )
        .bind(to_json(&serde_json::json!(jobs)))
        .fetch_all(&mut *self.0)
        .await?;
        Ok(tolerant.into_iter().collect())
    }

    async fn active_child_runs(&mut self, jobs: &[JobId]) -> Result<Vec<RunId>> {
        Ok(sqlx::query_scalar(statement!(
            "SELECT id FROM runs WHERE parent_job_id IN (SELECT value FROM json_each(?)) \
                 AND status IN {runs:active}"
        ))
        .bind(to_json(&jobs))
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn tolerate_parked_step(
        &mut self,
        job: JobId,
        error: &str,
        now: Millis,
    ) -> Result<Option<Succeeded>> {
        Ok(sqlx::query_as(statement!(
            "UPDATE jobs SET state = {job:succeeded}, error = ?2, output = ?3, finished_at = ?4 \
             WHERE id = ?1 AND state = {job:parked} RETURNING run_id, step_id, is_sink, flow, loop_job_id"
        ))
        .bind(job)
        .bind(error)
        .bind(to_json(&Settlement::tolerated_output(error)))
        .bind(now)
        .fetch_optional(&mut *self.0)
        .await?)
    }

    async fn succeed_parked_step(&mut self, job: JobId, now: Millis) -> Result<Option<Succeeded>> {
        Ok(sqlx::query_as(statement!(
            "UPDATE jobs SET state = {job:succeeded}, finished_at = ?2, \
                 output = (SELECT json_group_array(json(output)) FROM \
                     (SELECT output FROM runs WHERE parent_job_id = ?1 ORDER BY child_index)) \
             WHERE id = ?1 AND state = {job:parked} \
                 AND NOT EXISTS (SELECT 1 FROM runs \
                     WHERE parent_job_id = ?1 AND status != {run:succeeded}) \
             RETURNING run_id, step_id, is_sink, flow, loop_job_id"
        ))
        .bind(job)
        .bind(now)
        .fetch_optional(&mut *self.0)
        .await?)
    }

    async fn give_callback(
        &mut self,
        answer: &CallbackAnswer,
        now: Millis,
    ) -> Result<Option<bool>> {
        let woken: Option<bool> = sqlx::query_scalar(statement!(
            "UPDATE jobs SET checkpoint = json_set(checkpoint, '$.callback', json(?4)), \
                 run_after = CASE WHEN state = {job:parked} THEN ?5 ELSE run_after END \
             WHERE run_id = ?1 AND step_id = ?2 AND state IN {jobs:awaiting_answer} \
                 AND checkpoint->>'callback_token' = ?3 AND checkpoint->'callback' IS NULL \
             RETURNING state = {job:parked}"
        ))
        .bind(&answer.run_id)
        .bind(&answer.step_id)
        .bind(&answer.token)
        .bind(to_json(&answer.result))
        .bind(now)
        .fetch_optional(&mut *self.0)
        .await?;
        if woken.is_some() {
            return Ok(woken);
        }
        // The same delivery again (n8n retrying) finds its result taken already.
        let repeated: i64 = sqlx::query_scalar(statement!(
            "SELECT count(*) FROM jobs \
             WHERE run_id = ?1 AND step_id = ?2 AND state IN {jobs:awaiting_answer} \
                 AND checkpoint->>'callback_token' = ?3 \
                 AND checkpoint->'callback'->>'event_id' = json(?4)->>'event_id'"
        ))
        .bind(&answer.run_id)
        .bind(&answer.step_id)
        .bind(&answer.token)
        .bind(to_json(&answer.result))
        .fetch_one(&mut *self.0)
        .await?;
        Ok((repeated > 0).then_some(false))
    }

    async fn give_signal(&mut self, signal: &Signal, now: Millis) -> Result<Option<bool>> {
        Ok(sqlx::query_scalar(statement!(
            "UPDATE jobs SET \
                 checkpoint = json_set(CASE WHEN json_type(checkpoint) = 'object' \
                         THEN checkpoint ELSE '{}' END, \
                     '$.callback_token', ?3, '$.callback', json(?4)), \
                 run_after = CASE WHEN state = {job:parked} THEN ?5 ELSE run_after END \
             WHERE run_id = ?1 AND step_id = ?2 AND state IN {jobs:open} \
                 AND (json_type(checkpoint) IS NOT 'object' OR checkpoint->'callback' IS NULL) \
                 AND NOT (state = {job:running} \
                     AND coalesce(json_type(checkpoint, '$.deadline') IN ('integer', 'real') \
                         AND checkpoint->>'deadline' <= ?5 \
                         AND checkpoint->>'attempt' = attempt, 0)) \
             RETURNING state = {job:parked}"
        ))
        .bind(&signal.run_id)
        .bind(&signal.step_id)
        .bind(crate::callback::signal_token(&signal.name))
        .bind(to_json(&signal.payload))
        .bind(now)
        .fetch_optional(&mut *self.0)
        .await?)
    }

    async fn step_answer_state(
        &mut self,
        run_id: &str,
        step_id: &str,
    ) -> Result<Option<(JobState, bool)>> {
        let row = sqlx::query(
            "SELECT state, coalesce(json_type(checkpoint) = 'object' \
                 AND checkpoint->'callback' IS NOT NULL, 0) AS answered \
             FROM jobs WHERE run_id = ? AND step_id = ?",
        )
        .bind(run_id)
        .bind(step_id)
        .fetch_optional(&mut *self.0)
        .await?;
        row.map(|row| {
            let state = parse_state::<JobState>(row.get::<&str, _>("state"))?;
            Ok((state, row.get("answered")))
        })
        .transpose()
    }

    async fn expired_leases(&mut self, now: Millis, limit: u32) -> Result<Vec<ExpiredLease>> {
        let rows = sqlx::query(statement!(
            "SELECT id, attempt, lease_token, max_attempts FROM jobs \
             WHERE state = {job:running} AND lease_expires_at <= ? LIMIT ?"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *self.0)
        .await?;
        Ok(rows
            .iter()
            .map(|row| ExpiredLease {
                lease: Lease {
                    job_id: row.get("id"),
                    attempt: row.get("attempt"),
                    token: row.get("lease_token"),
                },
                max_attempts: row.get("max_attempts"),
            })
            .collect())
    }

    async fn drop_spent_leases(&mut self, _now: Millis) -> Result<()> {
        // A lease lives in its job's row here, and goes with the attempt.
        Ok(())
    }

    async fn overdue_runs(&mut self, now: Millis, limit: u32) -> Result<Vec<(RunId, Option<i64>)>> {
        rows_as(sqlx::query(statement!(
            "SELECT id, timeout_ms FROM runs WHERE status IN {runs:active} AND deadline_at <= ? \
             ORDER BY id LIMIT ?"
        ))
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn lock_run(&mut self, run_id: &str) -> Result<Option<RunStatus>> {
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM runs WHERE id = ?")
            .bind(run_id)
            .fetch_optional(&mut *self.0)
            .await?;
        status.as_deref().map(parse_state).transpose()
    }

    async fn unsuccessful_children(&mut self, runs: &[RunId]) -> Result<Vec<(JobId, RunId)>> {
        rows_as(
            sqlx::query(statement!(
                "SELECT j.id, c.id FROM jobs AS j JOIN runs AS c ON c.parent_job_id = j.id \
             WHERE j.run_id IN (SELECT value FROM json_each(?1)) \
                 AND j.state IN {jobs:unsuccessful} AND NOT j.on_failure \
                 AND j.loop_job_id IS NULL AND c.status != {run:succeeded}"
            ))
            .bind(to_json(&runs))
            .fetch_all(&mut *self.0)
            .await?,
        )
    }

    async fn reopen_runs(&mut self, runs: &[RunId], now: Millis) -> Result<()> {
        sqlx::query(statement!(
            "UPDATE runs SET status = {run:running}, error = NULL, output = NULL, \
                 finished_at = NULL, expires_at = NULL, \
                 deadline_at = CASE WHEN timeout_ms IS NOT NULL THEN ?2 + timeout_ms END \
             WHERE id IN (SELECT value FROM json_each(?1)) AND status NOT IN {runs:active}"
        ))
        .bind(to_json(&runs))
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn repark_steps(&mut self, jobs: &[JobId]) -> Result<()> {
        sqlx::query(statement!(
            "UPDATE jobs SET state = {job:parked}, error = NULL, finished_at = NULL, \
                 run_after = NULL \
             WHERE id IN (SELECT value FROM json_each(?1)) AND state IN {jobs:unsuccessful}"
        ))
        .bind(to_json(&jobs))
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn insert_items(
        &mut self,
        loop_job: JobId,
        items: &[Value],
        parallel: Option<u32>,
        now: Millis,
    ) -> Result<()> {
        // An item waits for one need no step names, so no count of needs (a gate opening, a
        // retry) ever makes it ready: `release_items` does.
        // A retry's items: those past the list rendered now go, the others run again.
        sqlx::query(
            "DELETE FROM usage_counted WHERE job_id IN \
             (SELECT id FROM jobs WHERE loop_job_id = ?1 AND item_index >= ?2)",
        )
        .bind(loop_job)
        .bind(items.len() as i64)
        .execute(&mut *self.0)
        .await?;
        sqlx::query("DELETE FROM jobs WHERE loop_job_id = ?1 AND item_index >= ?2")
            .bind(loop_job)
            .bind(items.len() as i64)
            .execute(&mut *self.0)
            .await?;
        sqlx::query(statement!(
            "UPDATE jobs SET state = {job:waiting}, output = NULL, error = NULL, \
                 checkpoint = NULL, finished_at = NULL, max_attempts = attempt + attempt_budget \
             WHERE loop_job_id = ?1 AND state IN {jobs:unsuccessful}"
        ))
        .bind(loop_job)
        .execute(&mut *self.0)
        .await?;
        sqlx::query("UPDATE jobs SET parallel = ?2 WHERE id = ?1")
            .bind(loop_job)
            .bind(parallel)
            .execute(&mut *self.0)
            .await?;
        sqlx::query(statement!(
            "INSERT INTO jobs (run_id, step_id, state, needs, pending_needs, is_sink, \
                 attempt_budget, max_attempts, priority, run_after, loop_job_id, item_index, item) \
             SELECT l.run_id, l.step_id || '[' || i.key || ']', {job:waiting}, '[]', 1, 0, \
                 l.attempt_budget, l.attempt_budget, l.priority, ?3, l.id, i.key, i.value \
             FROM jobs AS l, json_each(?2) AS i WHERE l.id = ?1 \
             ON CONFLICT (run_id, step_id) DO UPDATE SET item = excluded.item \
                 WHERE jobs.state != {job:succeeded}"
        ))
        .bind(loop_job)
        // Each item as its JSON text, which `json_each` hands back as it is.
        .bind(to_json(&items.iter().map(to_json).collect::<Vec<String>>()))
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        sqlx::query(statement!(
            "UPDATE jobs SET next_item = 0, items_left = (SELECT count(*) FROM jobs \
                 WHERE loop_job_id = ?1 AND state != {job:succeeded}) \
             WHERE id = ?1"
        ))
        .bind(loop_job)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn count_down_loop(
        &mut self,
        loop_job: JobId,
        succeeded: i64,
    ) -> Result<Option<LoopProgress>> {
        let row = sqlx::query(statement!(
            "UPDATE jobs SET items_left = items_left - ?2 \
             WHERE id = ?1 AND state = {job:parked} RETURNING items_left, parallel"
        ))
        .bind(loop_job)
        .bind(succeeded)
        .fetch_optional(&mut *self.0)
        .await?;
        Ok(row.map(|row| LoopProgress {
            left: row.get::<Option<i64>, _>("items_left").unwrap_or(0),
            parallel: row.get("parallel"),
        }))
    }

    async fn release_items(
        &mut self,
        loop_job: JobId,
        count: i64,
        now: Millis,
    ) -> Result<Vec<JobId>> {
        let made: Vec<(JobId, i64)> = sqlx::query_as(statement!(
            "UPDATE jobs SET state = {job:available}, run_after = ?3 \
             WHERE id IN (SELECT id FROM jobs WHERE loop_job_id = ?1 AND state = {job:waiting} \
                 AND item_index >= (SELECT next_item FROM jobs WHERE id = ?1) \
                 ORDER BY item_index LIMIT ?2) \
             RETURNING id, item_index"
        ))
        .bind(loop_job)
        .bind(count)
        .bind(now)
        .fetch_all(&mut *self.0)
        .await?;
        if let Some(last) = made.iter().map(|(_, index)| *index).max() {
            sqlx::query("UPDATE jobs SET next_item = ?2 WHERE id = ?1")
                .bind(loop_job)
                .bind(last + 1)
                .execute(&mut *self.0)
                .await?;
        }
        Ok(made.into_iter().map(|(id, _)| id).collect())
    }

    async fn open_items(&mut self, loops: &[JobId]) -> Result<Vec<JobId>> {
        Ok(sqlx::query_scalar(statement!(
            "SELECT id FROM jobs WHERE loop_job_id IN (SELECT value FROM json_each(?1)) \
                 AND state IN {jobs:open}"
        ))
        .bind(to_json(&loops))
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn finish_loop(&mut self, loop_job: JobId, now: Millis) -> Result<Option<Succeeded>> {
        Ok(sqlx::query_as(statement!(
            "UPDATE jobs SET state = {job:succeeded}, finished_at = ?2, checkpoint = NULL, \
                 output = (SELECT coalesce(json_group_array(json(output)), '[]') \
                           FROM (SELECT output FROM jobs WHERE loop_job_id = ?1 \
                                 ORDER BY item_index)) \
             WHERE id = ?1 AND state = {job:parked} \
                 AND NOT EXISTS (SELECT 1 FROM jobs \
                     WHERE loop_job_id = ?1 AND state != {job:succeeded}) \
             RETURNING run_id, step_id, is_sink, flow, loop_job_id"
        ))
        .bind(loop_job)
        .bind(now)
        .fetch_optional(&mut *self.0)
        .await?)
    }

    async fn reset_unsuccessful_jobs(&mut self, runs: &[RunId]) -> Result<()> {
        sqlx::query(statement!(
            "UPDATE jobs SET state = {job:waiting}, output = NULL, error = NULL, \
                 checkpoint = NULL, finished_at = NULL, max_attempts = attempt + attempt_budget, \
                 pending_needs = (SELECT count(*) FROM json_each(jobs.needs) AS nd \
                     JOIN jobs AS up ON up.run_id = jobs.run_id AND up.step_id = nd.value \
                     WHERE up.state != {job:succeeded}) \
             WHERE run_id IN (SELECT value FROM json_each(?1)) AND state IN {jobs:unsuccessful} \
                 AND NOT flow AND loop_job_id IS NULL"
        ))
        .bind(to_json(&runs))
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn flow_steps(
        &mut self,
        runs: &[RunId],
    ) -> Result<Vec<(RunId, Option<String>, FlowStep)>> {
        let rows = sqlx::query(statement!(
            "SELECT j.id, j.run_id, j.step_id, j.state, j.needs, j.run_if, j.on_failure, \
                 j.error, r.error AS run_error \
             FROM runs AS r JOIN jobs AS j ON j.run_id = r.id \
             WHERE r.id IN (SELECT value FROM json_each(?1)) AND r.status = {run:running} \
                 AND j.flow \
             ORDER BY j.id"
        ))
        .bind(to_json(&runs))
        .fetch_all(&mut *self.0)
        .await?;
        rows.iter()
            .map(|row| {
                let needs: Value = serde_json::from_str(row.get("needs"))
                    .map_err(|e| StoreError::Database(format!("needs of a job: {e}")))?;
                let step = flow_step(
                    row.get("id"),
                    row.get("step_id"),
                    row.get("state"),
                    &needs,
                    row.get("run_if"),
                    row.get("on_failure"),
                    row.get("error"),
                )?;
                Ok((row.get("run_id"), row.get("run_error"), step))
            })
            .collect()
    }

    async fn skip_waiting_jobs(&mut self, jobs: &[(JobId, String)], now: Millis) -> Result<()> {
        sqlx::query(statement!(
            "UPDATE jobs SET state = {job:skipped}, error = c.value->>1, finished_at = ?2 \
             FROM json_each(?1) AS c \
             WHERE jobs.id = c.value->>0 AND jobs.state = {job:waiting}"
        ))
        .bind(to_json(&jobs))
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn make_jobs_available(&mut self, jobs: &[JobId], now: Millis) -> Result<Vec<JobId>> {
        Ok(sqlx::query_scalar(statement!(
            "UPDATE jobs SET state = {job:available}, run_after = ?2 \
             WHERE id IN (SELECT value FROM json_each(?1)) AND state = {job:waiting} \
             RETURNING id"
        ))
        .bind(to_json(&jobs))
        .bind(now)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn cancel_jobs(&mut self, jobs: &[JobId], now: Millis) -> Result<()> {
        sqlx::query(statement!(
            "UPDATE jobs SET state = {job:cancelled}, lease_token = NULL, \
                 lease_expires_at = NULL, finished_at = ?2 \
             WHERE id IN (SELECT value FROM json_each(?1)) AND state IN {jobs:open}"
        ))
        .bind(to_json(&jobs))
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn begin_failure_handling(&mut self, run_id: &str, error: &str) -> Result<()> {
        sqlx::query(statement!(
            "UPDATE runs SET error = ?2 WHERE id = ?1 AND status = {run:running}"
        ))
        .bind(run_id)
        .bind(storable_text(error).as_ref())
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn reset_jobs(&mut self, jobs: &[JobId]) -> Result<()> {
        // Needs counted whole (and one more for a failure handler): no count of succeeded needs
        // makes them ready; `flow::advance` does.
        sqlx::query(statement!(
            "UPDATE jobs SET state = {job:waiting}, output = NULL, error = NULL, \
                 checkpoint = NULL, finished_at = NULL, max_attempts = attempt + attempt_budget, \
                 pending_needs = json_array_length(needs) + on_failure \
             WHERE id IN (SELECT value FROM json_each(?1)) AND state NOT IN {jobs:open}"
        ))
        .bind(to_json(&jobs))
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn log_webhook_events(
        &mut self,
        events: &[&NewWebhookEvent],
        now: Millis,
    ) -> Result<Vec<(WebhookEvent, bool)>> {
        let rows: Vec<Value> = events
            .iter()
            .map(|e| {
                serde_json::json!({
                    "source": e.source, "scope": e.scope, "event_id": e.event_id,
                    "workflow_id": e.workflow_id, "payload": e.payload,
                })
            })
            .collect();
        let rows = to_json(&rows);
        // `WHERE true`: SQLite reads `ON CONFLICT` after a bare SELECT as a join clause.
        let inserted: Vec<WebhookEvent> = rows_as(
            sqlx::query(&format!(
                "INSERT INTO webhook_events \
                     (source, scope, event_id, workflow_id, payload, received_at) \
                 SELECT e.value->>'source', e.value->>'scope', e.value->>'event_id', \
                     e.value->>'workflow_id', e.value->'payload', ?2 \
                 FROM json_each(?1) AS e WHERE true \
                 ON CONFLICT (source, scope, event_id) DO NOTHING \
                 RETURNING {WEBHOOK_EVENT_COLUMNS}"
            ))
            .bind(&rows)
            .bind(now)
            .fetch_all(&mut *self.0)
            .await?,
        )?;
        let mut found = keyed_events(inserted, true);
        if found.len() < events.len() {
            let earlier: Vec<WebhookEvent> = rows_as(
                sqlx::query(&format!(
                    "SELECT {} FROM webhook_events AS w \
                     JOIN json_each(?1) AS e ON w.source = e.value->>'source' \
                         AND w.scope = e.value->>'scope' AND w.event_id = e.value->>'event_id'",
                    qualified(WEBHOOK_EVENT_COLUMNS, "w")
                ))
                .bind(&rows)
                .fetch_all(&mut *self.0)
                .await?,
            )?;
            for (key, row) in keyed_events(earlier, false) {
                found.entry(key).or_insert(row);
            }
        }
        events
            .iter()
            .map(|e| {
                found
                    .remove(&(e.source.clone(), e.scope.clone(), e.event_id.clone()))
                    .ok_or_else(|| StoreError::Unavailable("a webhook event was not logged".into()))
            })
            .collect()
    }

    async fn settle_webhook_events(&mut self, rows: Value) -> Result<()> {
        sqlx::query(
            // A run a concurrent delivery recorded stays: only an accepted delivery is final.
            "UPDATE webhook_events \
             SET run_id = coalesce(webhook_events.run_id, s.value->>'run_id'), \
                 error = CASE WHEN coalesce(webhook_events.run_id, s.value->>'run_id') IS NULL \
                     THEN s.value->>'error' END \
             FROM json_each(?1) AS s WHERE webhook_events.id = s.value->>'id'",
        )
        .bind(to_json(&rows))
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn stored_definition(
        &mut self,
        id: &str,
        definition: &Value,
    ) -> Result<StoredDefinition> {
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
        .bind(to_json(definition))
        .fetch_one(&mut *self.0)
        .await?;
        Ok(StoredDefinition {
            latest: row.get("latest"),
            latest_is_same: row
                .get::<Option<bool>, _>("latest_is_same")
                .unwrap_or(false),
            last_file_is_same: row
                .get::<Option<bool>, _>("last_file_is_same")
                .unwrap_or(false),
            highest: row.get("highest"),
        })
    }

    async fn add_version(&mut self, new: NewVersion<'_>, now: Millis) -> Result<()> {
        sqlx::query(
            "INSERT INTO workflow_versions (workflow_id, version, definition, created_at, origin) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(new.workflow_id)
        .bind(new.version)
        .bind(to_json(new.definition))
        .bind(now)
        .bind(new.origin.as_str())
        .execute(&mut *self.0)
        .await?;
        sqlx::query(
            "INSERT INTO workflows (id, latest_version, created_at, updated_at) \
             VALUES (?1, ?2, ?3, ?3) \
             ON CONFLICT (id) DO UPDATE SET latest_version = ?2, updated_at = ?3",
        )
        .bind(new.workflow_id)
        .bind(new.version)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn delete_workflow(&mut self, id: &str) -> Result<bool> {
        let deleted = sqlx::query("DELETE FROM workflows WHERE id = ?")
            .bind(id)
            .execute(&mut *self.0)
            .await?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn active_runs_of(&mut self, workflow_id: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(statement!(
            "SELECT count(*) FROM runs WHERE workflow_id = ? AND status IN {runs:active}"
        ))
        .bind(workflow_id)
        .fetch_one(&mut *self.0)
        .await?)
    }

    async fn record_audit(&mut self, entry: &NewAuditEntry, now: Millis) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(now)
        .bind(&entry.actor)
        .bind(&entry.action)
        .bind(&entry.target)
        .bind(to_json(&entry.detail))
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn set_paused(&mut self, id: &str, paused: bool, now: Millis) -> Result<bool> {
        let done = sqlx::query("UPDATE workflows SET paused = ?, updated_at = ? WHERE id = ?")
            .bind(paused)
            .bind(now)
            .bind(id)
            .execute(&mut *self.0)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn put_setting(&mut self, key: SettingKey<'_>, value: &Value, now: Millis) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (namespace, name, value, updated_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (namespace, name) DO UPDATE SET value = excluded.value, \
                 updated_at = excluded.updated_at",
        )
        .bind(key.namespace)
        .bind(key.name)
        .bind(to_json(value))
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn init_setting(
        &mut self,
        key: SettingKey<'_>,
        value: &Value,
        now: Millis,
    ) -> Result<Value> {
        sqlx::query(
            "INSERT INTO settings (namespace, name, value, updated_at) VALUES (?, ?, ?, ?) \
             ON CONFLICT (namespace, name) DO NOTHING",
        )
        .bind(key.namespace)
        .bind(key.name)
        .bind(to_json(value))
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        let stored: String =
            sqlx::query_scalar("SELECT value FROM settings WHERE namespace = ? AND name = ?")
                .bind(key.namespace)
                .bind(key.name)
                .fetch_one(&mut *self.0)
                .await?;
        parse_json(Some(stored)).ok_or_else(|| {
            StoreError::Database(format!(
                "setting {}/{} is not JSON",
                key.namespace, key.name
            ))
        })
    }

    async fn delete_setting(&mut self, key: SettingKey<'_>) -> Result<bool> {
        let deleted = sqlx::query("DELETE FROM settings WHERE namespace = ? AND name = ?")
            .bind(key.namespace)
            .bind(key.name)
            .execute(&mut *self.0)
            .await?
            .rows_affected();
        Ok(deleted > 0)
    }

    // Stored text is what `to_json` made of the value, so the text compares.
    async fn swap_setting(
        &mut self,
        key: SettingKey<'_>,
        old: &Value,
        new: &Value,
    ) -> Result<bool> {
        let swapped = sqlx::query(
            "UPDATE settings SET value = ? WHERE namespace = ? AND name = ? AND value = ?",
        )
        .bind(to_json(new))
        .bind(key.namespace)
        .bind(key.name)
        .bind(to_json(old))
        .execute(&mut *self.0)
        .await?
        .rows_affected();
        Ok(swapped > 0)
    }

    async fn revoke_token(&mut self, revocation: &TokenRevocation, now: Millis) -> Result<bool> {
        let revoked = sqlx::query(
            "INSERT INTO revoked_tokens (jti, expires_at, revoked_at, revoked_by) \
             VALUES (?, ?, ?, ?) ON CONFLICT (jti) DO NOTHING",
        )
        .bind(&revocation.jti)
        .bind(revocation.expires_at)
        .bind(now)
        .bind(&revocation.revoked_by)
        .execute(&mut *self.0)
        .await?
        .rows_affected();
        Ok(revoked > 0)
    }

    async fn probe_write(&mut self, now: Millis) -> Result<()> {
        sqlx::query(PROBE_WRITE)
            .bind(now)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn nonce_state(
        &mut self,
        chain_id: i64,
        address: &str,
        owner: &str,
    ) -> Result<NonceState> {
        Ok(sqlx::query_as(
            "SELECT (SELECT next_nonce FROM chain_nonces WHERE chain_id = ?1 AND address = ?2) \
                 AS next, \
             (SELECT nonce FROM chain_nonce_owners \
                 WHERE chain_id = ?1 AND address = ?2 AND owner = ?3) AS owned",
        )
        .bind(chain_id)
        .bind(address)
        .bind(owner)
        .fetch_one(&mut *self.0)
        .await?)
    }

    async fn record_nonce(
        &mut self,
        chain_id: i64,
        address: &str,
        owner: &str,
        nonce: i64,
        job: Option<JobId>,
        now: Millis,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO chain_nonce_owners (chain_id, address, owner, nonce, allocated_at, job_id) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(chain_id)
        .bind(address)
        .bind(owner)
        .bind(nonce)
        .bind(now)
        .bind(job)
        .execute(&mut *self.0)
        .await?;
        sqlx::query(
            "INSERT INTO chain_nonces (chain_id, address, next_nonce, updated_at) \
             VALUES (?1, ?2, ?3 + 1, ?4) \
             ON CONFLICT (chain_id, address) DO UPDATE \
             SET next_nonce = MAX(next_nonce, excluded.next_nonce), \
                 updated_at = excluded.updated_at",
        )
        .bind(chain_id)
        .bind(address)
        .bind(nonce)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn nonce_holder(
        &mut self,
        chain_id: i64,
        address: &str,
        nonce: i64,
    ) -> Result<Option<NonceHolder>> {
        Ok(sqlx::query_as(
            "SELECT o.job_id, j.state AS job_state, j.finished_at FROM chain_nonce_owners o \
             LEFT JOIN jobs j ON j.id = o.job_id \
             WHERE o.chain_id = ?1 AND o.address = ?2 AND o.nonce = ?3",
        )
        .bind(chain_id)
        .bind(address)
        .bind(nonce)
        .fetch_optional(&mut *self.0)
        .await?)
    }

    async fn nonce_filler(
        &mut self,
        chain_id: i64,
        address: &str,
        nonce: i64,
    ) -> Result<Option<NonceFiller>> {
        Ok(sqlx::query_as(
            "SELECT f.job_id, j.state AS job_state, f.hash FROM chain_nonce_fills f \
             LEFT JOIN jobs j ON j.id = f.job_id \
             WHERE f.chain_id = ?1 AND f.address = ?2 AND f.nonce = ?3",
        )
        .bind(chain_id)
        .bind(address)
        .bind(nonce)
        .fetch_optional(&mut *self.0)
        .await?)
    }

    async fn note_fill_hash(
        &mut self,
        chain_id: i64,
        address: &str,
        nonce: i64,
        job: JobId,
        hash: &str,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE chain_nonce_fills SET hash = ?5 \
             WHERE chain_id = ?1 AND address = ?2 AND nonce = ?3 AND job_id = ?4",
        )
        .bind(chain_id)
        .bind(address)
        .bind(nonce)
        .bind(job)
        .bind(hash)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn move_nonce(
        &mut self,
        chain_id: i64,
        address: &str,
        owner: &str,
        nonce: i64,
        now: Millis,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE chain_nonce_owners SET nonce = ?4, allocated_at = ?5 \
             WHERE chain_id = ?1 AND address = ?2 AND owner = ?3",
        )
        .bind(chain_id)
        .bind(address)
        .bind(owner)
        .bind(nonce)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        sqlx::query(
            "UPDATE chain_nonces SET next_nonce = MAX(next_nonce, ?3 + 1), updated_at = ?4 \
             WHERE chain_id = ?1 AND address = ?2",
        )
        .bind(chain_id)
        .bind(address)
        .bind(nonce)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn record_fill(
        &mut self,
        chain_id: i64,
        address: &str,
        nonce: i64,
        job: JobId,
        now: Millis,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO chain_nonce_fills (chain_id, address, nonce, job_id, filled_at) \
             VALUES (?1, ?2, ?3, ?4, ?5) \
             ON CONFLICT (chain_id, address, nonce) DO UPDATE \
             SET job_id = excluded.job_id, filled_at = excluded.filled_at, hash = NULL",
        )
        .bind(chain_id)
        .bind(address)
        .bind(nonce)
        .bind(job)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn expired_runs(&mut self, now: Millis, limit: u32) -> Result<Vec<RunId>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM runs WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn lock_quota(&mut self, name: &str) -> Result<i64> {
        // The one writer holds every bucket already.
        let tat: Option<i64> =
            sqlx::query_scalar("SELECT tat_us FROM quota_buckets WHERE name = ?")
                .bind(name)
                .fetch_optional(&mut *self.0)
                .await?;
        Ok(tat.unwrap_or(0))
    }

    async fn set_quota(&mut self, name: &str, tat_us: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO quota_buckets (name, tat_us) VALUES (?1, ?2) \
             ON CONFLICT (name) DO UPDATE SET tat_us = excluded.tat_us",
        )
        .bind(name)
        .bind(tat_us)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn add_usage(&mut self, rows: Value) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_usage (provider, workflow_id, day, requests, errors, tokens, cost) \
             SELECT u.value->>'provider', u.value->>'workflow_id', u.value->>'day', \
                 u.value->>'requests', u.value->>'errors', u.value->>'tokens', u.value->>'cost' \
             FROM json_each(?1) AS u WHERE true \
             ON CONFLICT (provider, workflow_id, day) DO UPDATE SET \
                 requests = api_usage.requests + excluded.requests, \
                 errors = api_usage.errors + excluded.errors, \
                 tokens = api_usage.tokens + excluded.tokens, \
                 cost = api_usage.cost + excluded.cost",
        )
        .bind(to_json(&rows))
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn note_usage_counted(&mut self, attempts: Value) -> Result<Vec<(JobId, String)>> {
        Ok(sqlx::query_as(
            "INSERT INTO usage_counted (job_id, lease_token) \
             SELECT a.value->>'job_id', a.value->>'lease_token' FROM json_each(?1) AS a \
             WHERE true ON CONFLICT DO NOTHING RETURNING job_id, lease_token",
        )
        .bind(to_json(&attempts))
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn insert_artifacts(&mut self, rows: Value, now: Millis) -> Result<()> {
        sqlx::query(
            "INSERT OR IGNORE INTO artifacts (id, run_id, step_id, attempt, sha256, size, \
                 content_type, created_at) \
             SELECT a.value->>'id', a.value->>'run_id', a.value->>'step_id', \
                 a.value->>'attempt', a.value->>'sha256', a.value->>'size', \
                 a.value->>'content_type', ?2 \
             FROM json_each(?1) AS a",
        )
        .bind(to_json(&rows))
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn append_logs(&mut self, rows: Value) -> Result<()> {
        sqlx::query(
            "INSERT INTO step_logs (run_id, step_id, attempt, at, stream, text) \
             SELECT l.value->>'run_id', l.value->>'step_id', l.value->>'attempt', \
                 l.value->>'at', l.value->>'stream', l.value->>'text' \
             FROM json_each(?1) AS l",
        )
        .bind(to_json(&rows))
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn insert_notifications(&mut self, rows: Value, now: Millis) -> Result<()> {
        sqlx::query(statement!(
            "INSERT INTO notifications (event_id, run_id, workflow_id, url, run_status, \
                 run_error, output, output_omitted, started_at, finished_at, status, next_at, \
                 created_at) \
             SELECT n.value->>'event_id', r.id, r.workflow_id, n.value->>'url', r.status, \
                 r.error, \
                 CASE WHEN length(CAST(r.output AS BLOB)) <= ?3 THEN r.output END, \
                 coalesce(length(CAST(r.output AS BLOB)) > ?3, 0), \
                 r.started_at, r.finished_at, {notice:pending}, ?2, ?2 \
             FROM json_each(?1) AS n JOIN runs AS r ON r.id = n.value->>'run_id'"
        ))
        .bind(to_json(&rows))
        .bind(now)
        .bind(NOTIFIED_OUTPUT_BYTES)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn hold_notifications(
        &mut self,
        now: Millis,
        until: Millis,
        token: &str,
        limit: u32,
    ) -> Result<Vec<Notification>> {
        Ok(sqlx::query_as(statement!(&format!(
            "UPDATE notifications SET claim_token = ?3, claimed_until = ?2 \
             WHERE id IN (SELECT id FROM notifications \
                 WHERE status = {{notice:pending}} AND next_at <= ?1 \
                     AND (claimed_until IS NULL OR claimed_until <= ?1) \
                 ORDER BY next_at LIMIT ?4) \
             RETURNING {NOTIFICATION_COLUMNS}"
        )))
        .bind(now)
        .bind(until)
        .bind(token)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn update_notification(
        &mut self,
        id: i64,
        token: &str,
        update: &NotificationUpdate,
    ) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE notifications SET status = ?3, attempts = ?4, next_at = ?5, \
                 last_error = ?6, delivered_at = ?7, claim_token = NULL, claimed_until = NULL \
             WHERE id = ?1 AND claim_token = ?2",
        )
        .bind(id)
        .bind(token)
        .bind(update.status.as_str())
        .bind(update.attempts)
        .bind(update.next_at)
        .bind(&update.last_error)
        .bind(update.delivered_at)
        .execute(&mut *self.0)
        .await?
        .rows_affected()
            == 1)
    }

    async fn held_job(&mut self, lease: &Lease) -> Result<Option<(RunId, String)>> {
        Ok(sqlx::query_as(statement!(
            "SELECT run_id, step_id FROM jobs \
             WHERE id = ? AND attempt = ? AND lease_token = ? AND state = {job:running}"
        ))
        .bind(lease.job_id)
        .bind(lease.attempt)
        .bind(&lease.token)
        .fetch_optional(&mut *self.0)
        .await?)
    }

    async fn delete_runs(&mut self, runs: &[RunId]) -> Result<u64> {
        let ids = to_json(&runs);
        sqlx::query("DELETE FROM step_logs WHERE run_id IN (SELECT value FROM json_each(?))")
            .bind(&ids)
            .execute(&mut *self.0)
            .await?;
        sqlx::query("DELETE FROM artifacts WHERE run_id IN (SELECT value FROM json_each(?))")
            .bind(&ids)
            .execute(&mut *self.0)
            .await?;
        sqlx::query(
            "DELETE FROM usage_counted WHERE job_id IN \
             (SELECT id FROM jobs WHERE run_id IN (SELECT value FROM json_each(?)))",
        )
        .bind(&ids)
        .execute(&mut *self.0)
        .await?;
        sqlx::query("DELETE FROM jobs WHERE run_id IN (SELECT value FROM json_each(?))")
            .bind(&ids)
            .execute(&mut *self.0)
            .await?;
        Ok(
            sqlx::query("DELETE FROM runs WHERE id IN (SELECT value FROM json_each(?))")
                .bind(&ids)
                .execute(&mut *self.0)
                .await?
                .rows_affected(),
        )
    }

    async fn delete_old_records(&mut self, cutoffs: &RecordCutoffs) -> Result<()> {
        for (statement, before) in [
            (
                "DELETE FROM fires WHERE fire_at < ?1 AND fire_at < \
                     (SELECT max(fire_at) FROM fires AS f WHERE f.workflow_id = fires.workflow_id)",
                cutoffs.records_before,
            ),
            (
                "DELETE FROM alerts WHERE created_at < ?1",
                cutoffs.records_before,
            ),
            (
                "DELETE FROM webhook_events WHERE received_at < ?1",
                cutoffs.records_before,
            ),
            (
                statement!(
                    "DELETE FROM notifications WHERE created_at < ?1 \
                     AND status <> {notice:pending}"
                ),
                cutoffs.records_before,
            ),
            (
                "DELETE FROM revoked_tokens WHERE expires_at <= ?1",
                cutoffs.revocations_before,
            ),
            ("DELETE FROM audit_log WHERE at < ?1", cutoffs.audit_before),
        ] {
            sqlx::query(statement)
                .bind(before)
                .execute(&mut *self.0)
                .await?;
        }
        Ok(())
    }

    async fn record_fire(
        &mut self,
        workflow_id: &str,
        fire_at: Millis,
        now: Millis,
    ) -> Result<bool> {
        let recorded = sqlx::query(
            "INSERT INTO fires (workflow_id, fire_at, recorded_at) VALUES (?, ?, ?) \
             ON CONFLICT DO NOTHING",
        )
        .bind(workflow_id)
        .bind(fire_at)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(recorded.rows_affected() == 1)
    }

    async fn workflow_paused(&mut self, workflow_id: &str) -> Result<Option<bool>> {
        Ok(
            sqlx::query_scalar("SELECT paused FROM workflows WHERE id = ?")
                .bind(workflow_id)
                .fetch_optional(&mut *self.0)
                .await?,
        )
    }

    async fn active_top_level_run(&mut self, workflow_id: &str) -> Result<Option<RunId>> {
        Ok(sqlx::query_scalar(statement!(
            "SELECT id FROM runs WHERE workflow_id = ? AND status IN {runs:active} \
             AND parent_run_id IS NULL LIMIT 1"
        ))
        .bind(workflow_id)
        .fetch_optional(&mut *self.0)
        .await?)
    }

    async fn raise_fire_alert(
        &mut self,
        workflow_id: &str,
        message: &str,
        now: Millis,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO alerts (workflow_id, kind, message, created_at) \
             VALUES (?1, 'fire_refused', ?2, ?3)",
        )
        .bind(workflow_id)
        .bind(message)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn settle_fire(
        &mut self,
        workflow_id: &str,
        fire_at: Millis,
        outcome: Disposition<'_>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE fires SET run_id = ?3, skipped_reason = ?4 \
             WHERE workflow_id = ?1 AND fire_at = ?2",
        )
        .bind(workflow_id)
        .bind(fire_at)
        .bind(outcome.run_id())
        .bind(outcome.reason())
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }
}

/// Every waiting job of the runs of `succeeded` counts down the needs that just succeeded, and
/// becomes available at zero while its run is running. One statement; returns the jobs changed
/// with their new state.
async fn promote(
    conn: &mut SqliteConnection,
    succeeded: &[(&str, &str)],
    now: Millis,
) -> Result<Vec<(JobId, JobState)>> {
    let rows = sqlx::query(statement!(
        "UPDATE jobs SET \
             pending_needs = jobs.pending_needs - d.n, \
             state = CASE WHEN jobs.pending_needs - d.n <= 0 \
                 AND (SELECT status FROM runs WHERE id = jobs.run_id) = {run:running} \
                 THEN {job:available} ELSE {job:waiting} END, \
             run_after = ?2 \
         FROM (SELECT j.id AS id, count(*) AS n FROM json_each(?1) AS c \
               JOIN jobs AS j ON j.run_id = c.value->>0 AND j.state = {job:waiting} \
               JOIN json_each(j.needs) AS nd ON nd.value = c.value->>1 \
               GROUP BY j.id) AS d \
         WHERE jobs.id = d.id \
         RETURNING jobs.id, jobs.state"
    ))
    .bind(to_json(&succeeded))
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|row| Ok((row.get("id"), parse_state(row.get::<&str, _>("state"))?)))
        .collect()
}

/// A row of its own in a namespace nothing lists: the write `probe_write` commits.
const PROBE_WRITE: &str = "INSERT INTO settings (namespace, name, value, updated_at) \
     VALUES ('probe', 'write', '0', ?1) \
     ON CONFLICT (namespace, name) DO UPDATE SET updated_at = excluded.updated_at";

const WORKFLOW_STATE: &str = "SELECT w.id, w.latest_version, w.paused, w.created_at, v.origin, \
         (SELECT max(fire_at) FROM fires WHERE workflow_id = w.id) AS last_fire_at \
     FROM workflows AS w \
     JOIN workflow_versions AS v ON v.workflow_id = w.id AND v.version = w.latest_version";

const NOTIFICATION_COLUMNS: &str = "id, event_id, run_id, workflow_id, url, run_status, \
     run_error, output, output_omitted, started_at, finished_at, status, attempts, next_at, last_error, \
     created_at, delivered_at";

const WEBHOOK_EVENT_COLUMNS: &str =
    "id, source, scope, event_id, workflow_id, payload, run_id, error, received_at";

const SUMMARY_COLUMNS: &str =
    "id, workflow_id, version, status, parent_run_id, error, created_at, started_at, finished_at";

#[async_trait]
impl Reads for SqliteStore {
    async fn workflow(&self, id: &str) -> Result<Option<WorkflowState>> {
        let row = sqlx::query(&format!("{WORKFLOW_STATE} WHERE w.id = ?"))
            .bind(id)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.as_ref().map(WorkflowState::from_row).transpose()?)
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
        Ok(rows
            .iter()
            .map(WorkflowState::from_row)
            .collect::<sqlx::Result<_>>()?)
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

    async fn queue_depth(&self, now: Millis) -> Result<i64> {
        Ok(sqlx::query_scalar(statement!(
            "SELECT (SELECT count(*) FROM jobs \
                 WHERE state IN {jobs:claimable} AND priority = 0 AND run_after <= ?1) \
             + (SELECT count(*) FROM jobs \
                 WHERE state IN {jobs:claimable} AND priority <> 0 AND run_after <= ?1)"
        ))
        .bind(now)
        .fetch_one(&self.reader)
        .await?)
    }

    async fn next_due(&self) -> Result<Option<Millis>> {
        Ok(sqlx::query_scalar(statement!(
            "SELECT min( \
                 coalesce((SELECT min(run_after) FROM jobs \
                     WHERE state IN {jobs:claimable} AND priority = 0), 9000000000000000000), \
                 coalesce((SELECT min(run_after) FROM jobs \
                     WHERE state IN {jobs:claimable} AND priority <> 0), 9000000000000000000), \
                 coalesce((SELECT min(deadline_at) FROM runs \
                     WHERE status IN {runs:active} AND deadline_at IS NOT NULL), \
                     9000000000000000000))"
        ))
        .fetch_one(&self.reader)
        .await
        .map(|due: i64| (due < 9_000_000_000_000_000_000).then_some(due))?)
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<RunSummary>> {
        rows_as(
            sqlx::query(&format!(
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
            .await?,
        )
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
            "SELECT id, step_id, state, attempt, output, error, item_index, run_after, \
                 started_at, finished_at, attempts FROM jobs WHERE run_id = ? ORDER BY id",
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
                item_index: r.get("item_index"),
                run_after: r.get("run_after"),
                started_at: r.get("started_at"),
                finished_at: r.get("finished_at"),
                attempts: parse_json(r.get("attempts")).unwrap_or(Value::Array(Vec::new())),
            })
        })
        .collect::<Result<_>>()?;
        Ok(RunDetail {
            summary: RunSummary::from_row(&row)?,
            input: parse_json(row.get("input")).unwrap_or(Value::Null),
            output: parse_json(row.get("output")),
            scheduled_at: row.get("scheduled_at"),
            steps,
        })
    }

    async fn step_logs(
        &self,
        run_id: &str,
        after: Option<i64>,
        limit: u32,
    ) -> Result<Vec<LogEntry>> {
        rows_as(
            sqlx::query(
                "SELECT id, step_id, attempt, at, stream, text FROM step_logs \
                 WHERE run_id = ?1 AND id > coalesce(?2, 0) ORDER BY id LIMIT ?3",
            )
            .bind(run_id)
            .bind(after)
            .bind(limit)
            .fetch_all(&self.reader)
            .await?,
        )
    }

    async fn last_step_logs(&self, run_id: &str, limit: u32) -> Result<Vec<LogEntry>> {
        rows_as(
            sqlx::query(
                "SELECT * FROM (SELECT id, step_id, attempt, at, stream, text FROM step_logs \
                 WHERE run_id = ?1 ORDER BY id DESC LIMIT ?2) ORDER BY id",
            )
            .bind(run_id)
            .bind(limit)
            .fetch_all(&self.reader)
            .await?,
        )
    }

    async fn run_summary(&self, run_id: &str) -> Result<Option<RunSummary>> {
        let row = sqlx::query(&format!("SELECT {SUMMARY_COLUMNS} FROM runs WHERE id = ?"))
            .bind(run_id)
            .fetch_optional(&self.reader)
            .await?;
        Ok(row.as_ref().map(RunSummary::from_row).transpose()?)
    }

    async fn child_runs(&self, parent: &str, limit: u32) -> Result<Vec<RunSummary>> {
        rows_as(
            sqlx::query(&format!(
                "SELECT {SUMMARY_COLUMNS} FROM runs WHERE parent_run_id = ? \
                 ORDER BY created_at, id LIMIT ?"
            ))
            .bind(parent)
            .bind(limit)
            .fetch_all(&self.reader)
            .await?,
        )
    }

    async fn run_ids_starting(&self, prefix: &str, limit: u32) -> Result<Vec<RunId>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM runs WHERE id >= ?1 AND id < ?1 || '~' ORDER BY id LIMIT ?2",
        )
        .bind(prefix)
        .bind(limit)
        .fetch_all(&self.reader)
        .await?)
    }

    async fn loop_context(&self, loop_job: JobId) -> Result<LoopContext> {
        let row = sqlx::query(
            "SELECT r.input, l.checkpoint->'outputs' AS outputs \
             FROM jobs AS l JOIN runs AS r ON r.id = l.run_id WHERE l.id = ?",
        )
        .bind(loop_job)
        .fetch_optional(&self.reader)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("the for_each step of job {loop_job}")))?;
        Ok(LoopContext {
            input: parse_json(row.get("input")).unwrap_or(Value::Null),
            outputs: match parse_json(row.get("outputs")) {
                Some(Value::Object(map)) => map,
                _ => serde_json::Map::new(),
            },
        })
    }

    async fn alerts(&self, workflow_id: Option<&str>, limit: u32) -> Result<Vec<Alert>> {
        rows_as(
            sqlx::query(
                "SELECT id, workflow_id, run_id, kind, message, created_at FROM alerts \
             WHERE (?1 IS NULL OR workflow_id = ?1) ORDER BY created_at DESC, id DESC LIMIT ?2",
            )
            .bind(workflow_id)
            .bind(limit)
            .fetch_all(&self.reader)
            .await?,
        )
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

    async fn webhook_events(&self, source: Option<&str>, limit: u32) -> Result<Vec<WebhookEvent>> {
        rows_as(
            sqlx::query(&format!(
                "SELECT {WEBHOOK_EVENT_COLUMNS} FROM webhook_events \
             WHERE (?1 IS NULL OR source = ?1) \
             ORDER BY received_at DESC, id DESC LIMIT ?2"
            ))
            .bind(source)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?,
        )
    }

    async fn usage(&self, filter: &UsageFilter) -> Result<Vec<Usage>> {
        let rows: Vec<(String, String, String, i64, i64, i64, f64)> = sqlx::query_as(
            "SELECT provider, workflow_id, day, requests, errors, tokens, cost FROM api_usage \
             WHERE (?1 IS NULL OR provider = ?1) AND (?2 IS NULL OR workflow_id = ?2) \
                 AND (?3 IS NULL OR day >= ?3) AND (?4 IS NULL OR day <= ?4) \
             ORDER BY day DESC, provider, workflow_id LIMIT ?5",
        )
        .bind(&filter.provider)
        .bind(&filter.workflow_id)
        .bind(&filter.from)
        .bind(&filter.to)
        .bind(filter.limit)
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(super::usage_row).collect())
    }

    async fn artifact(&self, id: &str) -> Result<Option<ArtifactRef>> {
        let row: Option<(String, String, i64, String)> =
            sqlx::query_as("SELECT id, sha256, size, content_type FROM artifacts WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.reader)
                .await?;
        Ok(row.map(super::artifact_ref))
    }

    async fn artifact_hashes_named(&self, hashes: &[String]) -> Result<BTreeSet<String>> {
        let named: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT sha256 FROM artifacts \
             WHERE sha256 IN (SELECT value FROM json_each(?))",
        )
        .bind(serde_json::to_string(hashes).expect("strings serialize"))
        .fetch_all(&self.reader)
        .await?;
        Ok(named.into_iter().collect())
    }

    async fn notifications(
        &self,
        status: Option<NotificationStatus>,
        limit: u32,
    ) -> Result<Vec<Notification>> {
        // A list need not carry up to a megabyte of output per row.
        rows_as(
            sqlx::query(&format!(
                "SELECT {} FROM notifications WHERE (?1 IS NULL OR status = ?1) \
                 ORDER BY created_at DESC, id DESC LIMIT ?2",
                NOTIFICATION_COLUMNS.replace(" output,", " NULL AS output,")
            ))
            .bind(status.map(NotificationStatus::as_str))
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?,
        )
    }

    async fn notification_counts(&self) -> Result<(i64, i64)> {
        Ok(sqlx::query_as(statement!(
            "SELECT coalesce(sum(status = {notice:pending}), 0), \
                 coalesce(sum(status = {notice:failed}), 0) FROM notifications"
        ))
        .fetch_one(&self.reader)
        .await?)
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.reader).await?;
        Ok(())
    }

    async fn audit_log(&self, before: Option<i64>, limit: u32) -> Result<Vec<AuditEntry>> {
        rows_as(
            sqlx::query(
                "SELECT id, at, actor, action, target, detail FROM audit_log \
             WHERE (?1 IS NULL OR id < ?1) ORDER BY id DESC LIMIT ?2",
            )
            .bind(before)
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?,
        )
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

#[async_trait]
impl Driver for SqliteStore {
    type Tx = SqliteTx<sqlx::Transaction<'static, sqlx::Sqlite>>;
    type Leased = Leased;

    async fn apply_migrations(&self) -> Result<()> {
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

    fn wakeups(&self) -> Arc<Notify> {
        self.wakeup.clone()
    }

    /// Write transactions take the write lock up front (`BEGIN IMMEDIATE`): a deferred one that
    /// reads first and then writes fails at once with `SQLITE_BUSY` when another process writes,
    /// instead of waiting out the busy timeout.
    async fn begin(&self) -> Result<Self::Tx> {
        Ok(SqliteTx(self.writer.begin_with("BEGIN IMMEDIATE").await?))
    }

    /// One process holds the database, so waking its own workers is waking everyone.
    async fn commit(&self, tx: Self::Tx, effects: Effects, claimed: &[JobId]) -> Result<()> {
        tx.0.commit().await?;
        if effects.wakes_others(claimed) {
            self.wakeup.notify_one();
        }
        effects.publish();
        Ok(())
    }

    async fn claim_jobs(&self, params: &ClaimParams) -> Result<Vec<ClaimedJob>> {
        let mut conn = self.writer.acquire().await?;
        let leased = lease_jobs(&mut conn, params).await?;
        drop(conn);
        self.claimed_jobs(leased).await
    }

    async fn lease(&self, tx: &mut Self::Tx, params: &ClaimParams) -> Result<Leased> {
        lease_jobs(&mut tx.0, params).await
    }

    fn leased_ids(leased: &Leased) -> Vec<JobId> {
        leased.rows.iter().map(|r| r.get("id")).collect()
    }

    async fn claimed(&self, leased: Leased) -> Result<Vec<ClaimedJob>> {
        self.claimed_jobs(leased).await
    }

    async fn extend_leases(&self, leases: &[Lease], lease_until: Millis) -> Result<Vec<JobId>> {
        Ok(sqlx::query_scalar(statement!(
            "UPDATE jobs SET lease_expires_at = ?2 FROM json_each(?1) AS c \
             WHERE jobs.id = c.value->>'job_id' AND jobs.attempt = c.value->>'attempt' \
                 AND jobs.lease_token = c.value->>'token' AND jobs.state = {job:running} \
             RETURNING jobs.id"
        ))
        .bind(to_json(&leases))
        .bind(lease_until)
        .fetch_all(&self.writer)
        .await?)
    }
}
