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

use super::{Usage, UsageFilter};
use crate::artifacts::ArtifactRef;
use std::collections::BTreeSet;
use std::ops::DerefMut;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{FromRow, PgConnection, QueryBuilder, Row};
use tokio::sync::Notify;

use super::driver::Driver;
use super::machine::{
    self, Disposition, Effects, ExpiredLease, FailedStep, FinishedRun, GateLoad, KeyedRun,
    LoopProgress, NewVersion, NonceFiller, NonceHolder, NonceState, NotificationUpdate,
    RecordCutoffs, SettingKey, Settled, SettledJob, Succeeded, Tx,
};
use super::sql::statement;
use super::*;
use crate::flow::FlowStep;
use crate::state::{JobState, Millis, RunStatus};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");

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
        first_connection(&options).await?;
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
        let ids = machine::insert_runs(&mut PgTx(&mut *conn), runs, now).await?;
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

/// How long `connect` tries for a first connection before it gives up and says why.
const FIRST_CONNECT: Duration = Duration::from_secs(5);

/// One connection of its own before the pool's: the pool retries a failing connection until its
/// acquire timeout and then says only that it timed out. A server that refuses connections or
/// is starting up (it may be restarting, or starting beside this process) is tried again until
/// [`FIRST_CONNECT`] has passed; then the last cause is the error.
async fn first_connection(options: &PgConnectOptions) -> Result<()> {
    let deadline = tokio::time::Instant::now() + FIRST_CONNECT;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let tried = tokio::time::timeout(
            left,
            <PgConnection as sqlx::Connection>::connect_with(options),
        )
        .await;
        let error = match tried {
            Ok(Ok(conn)) => {
                let _ = sqlx::Connection::close(conn).await;
                return Ok(());
            }
            Ok(Err(e)) => connect_error(e),
            Err(_) => {
                StoreError::Connect(format!("no answer within {} s", FIRST_CONNECT.as_secs()))
            }
        };
        let worth_waiting = match &error {
            StoreError::Unavailable(_) => true,
            StoreError::Connect(cause) => cause.starts_with("connection refused"),
            _ => false,
        };
        if !worth_waiting || tokio::time::Instant::now() + Duration::from_millis(250) >= deadline {
            return Err(error);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The first connection's failure, with its cause in words: nothing listens there, the host is
/// unknown, the database does not exist, or the server refused the user. A server starting up or
/// shutting down stays a transient `Unavailable`.
fn connect_error(e: sqlx::Error) -> StoreError {
    let cause = match &e {
        sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            "connection refused: is PostgreSQL running, on this host and port?".to_owned()
        }
        sqlx::Error::Io(io) if io.to_string().contains("lookup") => {
            format!("unknown host ({io})")
        }
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::Tls(tls) => format!("TLS: {tls}"),
        sqlx::Error::Database(db)
            if db
                .code()
                .is_some_and(|c| c == "3D000" || c.starts_with("28")) =>
        {
            db.message().to_owned()
        }
        _ => return StoreError::from(e),
    };
    StoreError::Connect(cause)
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

fn setting_from_row(row: &PgRow) -> Setting {
    Setting {
        name: row.get("name"),
        value: row.get("value"),
        updated_at: row.get("updated_at"),
    }
}

/// Every waiting job counts down the needs that just succeeded, and becomes available (and
/// queued) at zero. `OFFSET 0` keeps the lookup a per-step index probe; flattened into a join, it
/// becomes a scan of every job. Selects the jobs it changed from `succeeded(run_id, step_id)`,
/// which the statement around it defines.
const PROMOTE_DEPENDENTS: &str = "promoted AS ( \
     UPDATE jobs SET \
         pending_needs = jobs.pending_needs - d.n, \
         state = CASE WHEN jobs.pending_needs - d.n <= 0 \
             AND (SELECT status FROM runs WHERE id = jobs.run_id) = {run:running} \
             THEN {job:available} ELSE {job:waiting} END, \
         run_after = $2 \
     FROM (SELECT j.id, count(*) AS n FROM succeeded AS s \
           CROSS JOIN LATERAL (SELECT id FROM jobs WHERE run_id = s.run_id \
               AND state = {job:waiting} AND needs ? s.step_id OFFSET 0) AS j \
           GROUP BY j.id) AS d \
     WHERE jobs.id = d.id \
     RETURNING jobs.id, jobs.state, jobs.run_after, jobs.priority), \
 promoted_queued AS ( \
     INSERT INTO job_queue (run_after, job_id, priority) \
     SELECT run_after, id, priority FROM promoted WHERE state = {job:available} \
     ON CONFLICT DO NOTHING)";

/// In a settlement (`c`) of a job: a result delivered while the step ran, under the token it
/// parks with now (see `Store::deliver_callback`). The step keeps it and wakes at once. A callback
/// token lives as long as its attempt (parked, running, or given back by a worker shutting down):
/// any other settlement drops it, so a late answer to an attempt that ended is refused rather than
/// kept for the next one.
const CALLBACK_WAITING: &str = "(jobs.checkpoint ? 'callback' \
     AND c.checkpoint::jsonb->>'callback_token' = jobs.checkpoint->>'callback_token')";

/// A transaction's connection, as the state machine drives it: the caller's own too
/// (`enqueue_in`).
pub struct PgTx<C>(C);

#[async_trait]
impl<C: DerefMut<Target = PgConnection> + Send> Tx for PgTx<C> {
    async fn lock_key(&mut self, key: &str) -> Result<()> {
        lock_key(&mut self.0, key).await
    }

    async fn lock_runs_of_jobs(&mut self, jobs: &[JobId]) -> Result<()> {
        sqlx::query(
            "SELECT id FROM runs WHERE id IN (SELECT run_id FROM jobs WHERE id = ANY($1)) \
             ORDER BY id FOR UPDATE",
        )
        .bind(jobs)
        .fetch_all(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn runs_by_idempotency_key(&mut self, keys: &[&str]) -> Result<Vec<KeyedRun>> {
        Ok(sqlx::query_as(
            "SELECT idempotency_key, id, request_digest FROM runs WHERE idempotency_key = ANY($1::text[])",
        )
        .bind(keys)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn gate_load(&mut self, key: &str) -> Result<GateLoad> {
        let (running, pending, oldest_pending_limit) = sqlx::query_as(statement!(
            "SELECT count(*) FILTER (WHERE status = {run:running}), \
                 count(*) FILTER (WHERE status = {run:pending}), \
                 (SELECT concurrency_limit FROM runs \
                  WHERE concurrency_key = $1 AND status = {run:pending} \
                  ORDER BY created_at, id LIMIT 1) \
             FROM runs WHERE concurrency_key = $1 AND status IN {runs:active}"
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
            "INSERT INTO runs (id, workflow_id, version, status, input, parent_run_id, \
                 parent_job_id, child_index, concurrency_key, concurrency_limit, idempotency_key, \
                 timeout_ms, deadline_at, retention_ms, scheduled_at, created_at, started_at, \
                 priority, request_digest, notify) \
             SELECT r.id, r.workflow_id, r.version, r.status, coalesce(r.input, 'null'), \
                 r.parent_run_id, r.parent_job_id, r.child_index, r.concurrency_key, \
                 r.concurrency_limit, r.idempotency_key, r.timeout_ms, r.deadline_at, \
                 r.retention_ms, r.scheduled_at, $2, r.started_at, r.priority, r.request_digest, \
                 r.notify \
             FROM jsonb_to_recordset($1) AS r(id text, workflow_id text, version bigint, \
                 status text, input jsonb, parent_run_id text, parent_job_id bigint, \
                 child_index bigint, concurrency_key text, concurrency_limit bigint, \
                 idempotency_key text, timeout_ms bigint, deadline_at bigint, retention_ms bigint, \
                 scheduled_at bigint, started_at bigint, priority smallint, request_digest text, \
                 notify jsonb) \
             ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
             RETURNING id",
        )
        .bind(runs)
        .bind(now)
        .fetch_all(&mut *self.0)
        .await?;
        Ok(inserted.into_iter().collect())
    }

    async fn insert_job_rows(&mut self, jobs: Value, now: Millis) -> Result<()> {
        sqlx::query(statement!(
            "WITH made AS ( \
                 INSERT INTO jobs (run_id, step_id, state, needs, pending_needs, is_sink, \
                     attempt_budget, max_attempts, continue_on_error, run_if, flow, on_failure, \
                     priority, run_after) \
                 SELECT j.run_id, j.step_id, \
                     CASE WHEN j.ready THEN {job:available} ELSE {job:waiting} END, \
                     j.needs, j.pending, j.is_sink, j.budget, j.budget, j.continue_on_error, \
                     j.run_if, j.flow, j.on_failure, j.priority, $2 \
                 FROM jsonb_to_recordset($1) AS j(run_id text, step_id text, needs jsonb, \
                     pending int, is_sink boolean, budget int, continue_on_error boolean, \
                     run_if text, flow boolean, on_failure boolean, priority smallint, \
                     ready boolean) \
                 RETURNING id, state, run_after, priority) \
             INSERT INTO job_queue (run_after, job_id, priority) \
             SELECT run_after, id, priority FROM made WHERE state = {job:available} \
             ON CONFLICT DO NOTHING"
        ))
        .bind(jobs)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn settle_jobs(&mut self, rows: Value, ids: &[JobId], now: Millis) -> Result<Settled> {
        // One statement, one round trip, in three parts:
        // - `locked` takes the runs' locks first, in id order (see `lock_runs_of_jobs`); the
        //   uncorrelated subquery in `settled`'s filter runs once, before any job is written.
        // - `settled`: only rows still `running` under the same attempt and token change, so a
        //   late answer from a worker whose lease expired matches nothing. `id = ANY($3)` keeps
        //   the lookup on the primary key whatever the statistics say. Jobs it leaves claimable
        //   join the queue. The attempt history records unsuccessful attempts only; the
        //   succeeding one is the row's own timings.
        // - `promoted`: the dependents of the steps that succeeded. It writes `waiting` rows,
        //   `settled` writes `running` ones, so the two never touch the same row.
        let rows = sqlx::query(statement!(&format!(
            "WITH locked AS MATERIALIZED ( \
                 SELECT id FROM runs WHERE id IN (SELECT run_id FROM jobs WHERE id = ANY($3)) \
                 ORDER BY id FOR UPDATE), \
             settled AS ( \
                 UPDATE jobs SET \
                     state = c.state, \
                     output = c.output::jsonb, \
                     error = c.error, \
                     run_after = CASE WHEN c.state = {{job:parked}} AND {CALLBACK_WAITING} \
                         THEN $2 ELSE c.run_after END, \
                     checkpoint = CASE WHEN {CALLBACK_WAITING} THEN c.checkpoint::jsonb \
                             || jsonb_build_object('callback', jobs.checkpoint->'callback') \
                         WHEN c.state IN ({{job:parked}}, {{job:available}}) \
                             OR jsonb_typeof(coalesce(c.checkpoint::jsonb, jobs.checkpoint)) \
                                 IS DISTINCT FROM 'object' \
                         THEN coalesce(c.checkpoint::jsonb, jobs.checkpoint) \
                         ELSE coalesce(c.checkpoint::jsonb, jobs.checkpoint) \
                             - 'callback_token' - 'callback' END, \
                     attempt = jobs.attempt - (c.state = {{job:available}})::int, \
                     lease_token = NULL, \
                     finished_at = CASE WHEN c.state IN {{jobs:finishing}} THEN $2 END, \
                     attempts = CASE WHEN c.state IN {{jobs:counted}} \
                         THEN jobs.attempts || jsonb_build_array(jsonb_build_object( \
                             'attempt', jobs.attempt, 'started_at', jobs.started_at, \
                             'finished_at', $2::bigint, 'outcome', c.state, 'error', c.error)) \
                         ELSE jobs.attempts END \
                 FROM jsonb_to_recordset($1) AS c(id bigint, attempt int, token text, \
                     state text, output text, error text, run_after bigint, checkpoint text) \
                 WHERE jobs.id = ANY($3) AND jobs.id = c.id AND jobs.attempt = c.attempt \
                     AND jobs.lease_token = c.token AND jobs.state = {{job:running}} \
                     AND (SELECT count(*) FROM locked) >= 0 \
                 RETURNING jobs.id, jobs.run_id, jobs.step_id, jobs.state, jobs.error, \
                     jobs.is_sink, jobs.flow, jobs.loop_job_id, jobs.run_after, jobs.priority), \
             requeued AS ( \
                 INSERT INTO job_queue (run_after, job_id, priority) \
                 SELECT run_after, id, priority FROM settled \
                 WHERE state IN {{jobs:claimable}} AND run_after IS NOT NULL \
                 ON CONFLICT DO NOTHING), \
             succeeded AS ( \
                 SELECT run_id, step_id FROM settled \
                 WHERE state = {{job:succeeded}} AND NOT is_sink AND NOT flow \
                     AND loop_job_id IS NULL), \
             {PROMOTE_DEPENDENTS} \
             SELECT id, run_id, step_id, state, error, is_sink, flow, loop_job_id, \
                 false AS promoted \
             FROM settled \
             UNION ALL \
             SELECT id, NULL, NULL, state, NULL, NULL, NULL, NULL, true FROM promoted"
        )))
        .bind(rows)
        .bind(now)
        .bind(ids)
        .fetch_all(&mut *self.0)
        .await?;
        let mut settled = Settled::default();
        for row in &rows {
            let id: JobId = row.get("id");
            let state = parse_state::<JobState>(row.get::<&str, _>("state"))?;
            if row.get("promoted") {
                settled.promoted.push((id, state));
            } else {
                settled.jobs.push(SettledJob {
                    id,
                    run_id: row.get("run_id"),
                    step_id: row.get("step_id"),
                    state,
                    error: row.get("error"),
                    is_sink: row.get("is_sink"),
                    flow: row.get("flow"),
                    loop_job: row.get("loop_job_id"),
                });
            }
        }
        Ok(settled)
    }

    async fn promote_dependents(
        &mut self,
        succeeded: &[&Succeeded],
        now: Millis,
    ) -> Result<Vec<JobId>> {
        let (runs, steps): (Vec<&str>, Vec<&str>) = succeeded
            .iter()
            .map(|s| (s.run_id.as_str(), s.step_id.as_str()))
            .unzip();
        Ok(sqlx::query_scalar(statement!(&format!(
            "WITH succeeded AS ( \
                 SELECT * FROM unnest($1::text[], $3::text[]) AS c(run_id, step_id)), \
             {PROMOTE_DEPENDENTS} \
             SELECT id FROM promoted WHERE state = {{job:available}}"
        )))
        .bind(&runs)
        .bind(now)
        .bind(&steps)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn finish_done_runs(&mut self, runs: &[&str], now: Millis) -> Result<Vec<FinishedRun>> {
        // One read of each run's jobs answers both: whether all succeeded, and the output.
        Ok(sqlx::query_as(statement!(
            "UPDATE runs SET status = {run:succeeded}, finished_at = $2, \
                 expires_at = $2 + retention_ms, output = s.output \
             FROM unnest($1::text[]) AS c(id) \
             CROSS JOIN LATERAL ( \
                 SELECT bool_and(state IN {jobs:successful}) AS done, \
                     coalesce(jsonb_object_agg(step_id, output) FILTER (WHERE is_sink), '{}') \
                         AS output \
                 FROM jobs WHERE run_id = c.id AND loop_job_id IS NULL) AS s \
             WHERE runs.id = c.id AND runs.status = {run:running} AND s.done \
             RETURNING runs.id, runs.workflow_id, runs.status, runs.parent_job_id, \
                 runs.concurrency_key, runs.notify"
        ))
        .bind(runs)
        .bind(now)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn end_active_runs(
        &mut self,
        runs: &[(RunId, String)],
        status: RunStatus,
        now: Millis,
    ) -> Result<Vec<FinishedRun>> {
        let (ids, errors): (Vec<&str>, Vec<&str>) =
            runs.iter().map(|(r, e)| (r.as_str(), e.as_str())).unzip();
        Ok(sqlx::query_as(statement!(
            "UPDATE runs SET status = $3, error = c.error, finished_at = $4, \
                 expires_at = $4 + retention_ms \
             FROM unnest($1::text[], $2::text[]) AS c(id, error) \
             WHERE runs.id = c.id AND runs.status IN {runs:active} \
             RETURNING runs.id, runs.workflow_id, runs.status, runs.parent_job_id, \
                 runs.concurrency_key, runs.notify"
        ))
        .bind(&ids)
        .bind(&errors)
        .bind(status.as_str())
        .bind(now)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn raise_alerts(&mut self, runs: &[&str], now: Millis) -> Result<()> {
        sqlx::query(
            "INSERT INTO alerts (workflow_id, run_id, kind, message, created_at) \
             SELECT runs.workflow_id, runs.id, runs.status, coalesce(runs.error, ''), $2 \
             FROM unnest($1::text[]) AS c(id) JOIN runs ON runs.id = c.id",
        )
        .bind(runs)
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
        Ok(sqlx::query_as(statement!(
            "WITH RECURSIVE tree(id) AS ( \
                 SELECT unnest($1::text[]) COLLATE \"C\" \
                 UNION SELECT runs.id FROM runs JOIN tree ON runs.parent_run_id = tree.id) \
             UPDATE runs SET status = {run:cancelled}, error = $3, \
                 finished_at = $2, expires_at = $2 + retention_ms \
             WHERE id IN (SELECT id FROM tree) AND status IN {runs:active} \
             RETURNING id, workflow_id, status, parent_job_id, concurrency_key, notify"
        ))
        .bind(roots)
        .bind(now)
        .bind(error)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn cancel_open_jobs(&mut self, runs: &[&str], now: Millis) -> Result<()> {
        // Queue rows that no claim holds, never waiting for one (it may be waiting for a job row
        // this transaction holds): a claim that holds one takes its job, which is cancelled below
        // once that claim commits, and its worker learns so at its next heartbeat.
        sqlx::query(statement!(
            "DELETE FROM job_queue WHERE ctid = ANY(ARRAY( \
                 SELECT q.ctid FROM job_queue AS q JOIN jobs AS j \
                     ON q.priority = j.priority AND q.run_after = j.run_after \
                         AND q.job_id = j.id \
                 WHERE j.run_id = ANY($1::text[]) AND j.state IN {jobs:claimable} \
                 FOR UPDATE OF q SKIP LOCKED))"
        ))
        .bind(runs)
        .execute(&mut *self.0)
        .await?;
        sqlx::query(statement!(
            "UPDATE jobs SET state = {job:cancelled}, lease_token = NULL, finished_at = $2 \
             WHERE run_id = ANY($1::text[]) AND state IN {jobs:open}"
        ))
        .bind(runs)
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
            "UPDATE runs SET status = {run:running}, started_at = $2, \
                 deadline_at = CASE WHEN timeout_ms IS NOT NULL THEN $2 + timeout_ms END \
             WHERE id IN (SELECT id FROM runs \
                 WHERE concurrency_key = $1 AND status = {run:pending} \
                 ORDER BY created_at, id LIMIT $3) \
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
            "WITH made AS ( \
                 UPDATE jobs SET state = {job:available}, run_after = $2 \
                 WHERE run_id = ANY($1::text[]) AND state = {job:waiting} \
                     AND pending_needs = 0 \
                 RETURNING id, run_after, priority) \
             INSERT INTO job_queue (run_after, job_id, priority) \
             SELECT run_after, id, priority FROM made ON CONFLICT DO NOTHING"
        ))
        .bind(runs)
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
            "UPDATE jobs SET state = {job:failed}, error = $2, finished_at = $3, \
                 attempts = attempts || jsonb_build_array(jsonb_build_object( \
                     'attempt', attempt, 'started_at', started_at, 'finished_at', $3::bigint, \
                     'outcome', {job:failed}, 'error', $2::text)) \
             WHERE id = $1 AND state = {job:parked} RETURNING run_id, step_id, flow, loop_job_id"
        ))
        .bind(job)
        .bind(error)
        .bind(now)
        .fetch_optional(&mut *self.0)
        .await?)
    }

    async fn continuing_on_error(&mut self, jobs: &[JobId]) -> Result<BTreeSet<JobId>> {
        let tolerant: Vec<JobId> =
            sqlx::query_scalar("SELECT id FROM jobs WHERE id = ANY($1) AND continue_on_error")
                .bind(jobs)
                .fetch_all(&mut *self.0)
                .await?;
        Ok(tolerant.into_iter().collect())
    }

    async fn active_child_runs(&mut self, jobs: &[JobId]) -> Result<Vec<RunId>> {
        Ok(sqlx::query_scalar(statement!(
            "SELECT id FROM runs WHERE parent_job_id = ANY($1) AND status IN {runs:active}"
        ))
        .bind(jobs)
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
            "UPDATE jobs SET state = {job:succeeded}, error = $2, output = $3, finished_at = $4 \
             WHERE id = $1 AND state = {job:parked} RETURNING run_id, step_id, is_sink, flow, loop_job_id"
        ))
        .bind(job)
        .bind(error)
        .bind(Settlement::tolerated_output(error))
        .bind(now)
        .fetch_optional(&mut *self.0)
        .await?)
    }

    async fn succeed_parked_step(&mut self, job: JobId, now: Millis) -> Result<Option<Succeeded>> {
        Ok(sqlx::query_as(statement!(
            "UPDATE jobs SET state = {job:succeeded}, finished_at = $2, \
                 output = (SELECT coalesce(jsonb_agg(output ORDER BY child_index), '[]') \
                           FROM runs WHERE parent_job_id = $1) \
             WHERE id = $1 AND state = {job:parked} \
                 AND NOT EXISTS (SELECT 1 FROM runs \
                     WHERE parent_job_id = $1 AND status <> {run:succeeded}) \
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
        // The job's lock waits out a claim or a settlement of the step in flight, and the row is
        // then read again: a step that parked meanwhile is woken, one claimed meanwhile keeps the
        // result until it parks. Its old queue row goes only if no claim holds it (never waiting
        // for one, which may be waiting for this job): a claim that holds it takes the woken job
        // after this commits. A row left behind (held, or keyed by a park that committed after
        // this statement began) is dropped by the claim that meets it; one already keyed by now
        // stays, and the insert below finds it. The same delivery again (its event id) finds its
        // result taken already.
        let given: Option<Option<bool>> = sqlx::query_scalar(statement!(
            "WITH target AS MATERIALIZED ( \
                 SELECT id, state, run_after, priority, checkpoint ? 'callback' AS answered \
                 FROM jobs \
                 WHERE run_id = $1 AND step_id = $2 AND state IN {jobs:awaiting_answer} \
                     AND checkpoint->>'callback_token' = $3 \
                     AND (NOT checkpoint ? 'callback' \
                         OR checkpoint->'callback'->'event_id' = $4::jsonb->'event_id') \
                 FOR UPDATE), \
             dequeued AS ( \
                 DELETE FROM job_queue WHERE ctid = ANY(ARRAY( \
                     SELECT q.ctid FROM job_queue AS q JOIN target AS t \
                         ON q.priority = t.priority AND q.run_after = t.run_after \
                             AND q.job_id = t.id \
                     WHERE NOT t.answered AND t.state = {job:parked} AND t.run_after <> $5 \
                     FOR UPDATE OF q SKIP LOCKED))), \
             given AS ( \
                 UPDATE jobs SET \
                     checkpoint = jobs.checkpoint || jsonb_build_object('callback', $4::jsonb), \
                     run_after = CASE WHEN t.state = {job:parked} THEN $5 \
                         ELSE jobs.run_after END \
                 FROM target AS t WHERE jobs.id = t.id AND NOT t.answered \
                 RETURNING jobs.id, jobs.priority, t.state = {job:parked} AS woken), \
             queued AS ( \
                 INSERT INTO job_queue (run_after, job_id, priority) \
                 SELECT $5, id, priority FROM given WHERE woken \
                 ON CONFLICT DO NOTHING) \
             SELECT g.woken FROM target AS t LEFT JOIN given AS g ON g.id = t.id"
        ))
        .bind(&answer.run_id)
        .bind(&answer.step_id)
        .bind(&answer.token)
        .bind(&answer.result)
        .bind(now)
        .fetch_optional(&mut *self.0)
        .await?;
        Ok(given.map(|woken| woken == Some(true)))
    }

    async fn give_signal(&mut self, signal: &Signal, now: Millis) -> Result<Option<bool>> {
        // As `give_callback`, for a step in any open state: the lock waits out a claim or a
        // settlement in flight, a parked step wakes (its old queue row goes unless a claim holds
        // it), and any other keeps the signal as a callback under the token it parks with.
        let woken: Option<bool> = sqlx::query_scalar(statement!(
            "WITH target AS MATERIALIZED ( \
                 SELECT id, state, run_after, priority FROM jobs \
                 WHERE run_id = $1 AND step_id = $2 AND state IN {jobs:open} \
                     AND NOT coalesce(checkpoint ? 'callback', false) \
                     AND NOT (state = {job:running} AND CASE \
                         WHEN jsonb_typeof(checkpoint->'deadline') = 'number' \
                             AND jsonb_typeof(checkpoint->'attempt') = 'number' \
                         THEN (checkpoint->'deadline')::numeric <= $5 \
                             AND (checkpoint->'attempt')::numeric = attempt \
                         ELSE false END) \
                 FOR UPDATE), \
             dequeued AS ( \
                 DELETE FROM job_queue WHERE ctid = ANY(ARRAY( \
                     SELECT q.ctid FROM job_queue AS q JOIN target AS t \
                         ON q.priority = t.priority AND q.run_after = t.run_after \
                             AND q.job_id = t.id \
                     WHERE t.state = {job:parked} AND t.run_after <> $5 \
                     FOR UPDATE OF q SKIP LOCKED))), \
             given AS ( \
                 UPDATE jobs SET \
                     checkpoint = CASE WHEN jsonb_typeof(jobs.checkpoint) = 'object' \
                             THEN jobs.checkpoint ELSE '{}'::jsonb END \
                         || jsonb_build_object('callback_token', $3::text, 'callback', $4::jsonb), \
                     run_after = CASE WHEN t.state = {job:parked} THEN $5 \
                         ELSE jobs.run_after END \
                 FROM target AS t WHERE jobs.id = t.id \
                 RETURNING jobs.id, jobs.priority, t.state = {job:parked} AS woken), \
             queued AS ( \
                 INSERT INTO job_queue (run_after, job_id, priority) \
                 SELECT $5, id, priority FROM given WHERE woken \
                 ON CONFLICT DO NOTHING) \
             SELECT woken FROM given"
        ))
        .bind(&signal.run_id)
        .bind(&signal.step_id)
        .bind(crate::callback::signal_token(&signal.name))
        .bind(&signal.payload)
        .bind(now)
        .fetch_optional(&mut *self.0)
        .await?;
        Ok(woken)
    }

    async fn step_answer_state(
        &mut self,
        run_id: &str,
        step_id: &str,
    ) -> Result<Option<(JobState, bool)>> {
        let row = sqlx::query(
            "SELECT state, coalesce(checkpoint ? 'callback', false) AS answered FROM jobs \
             WHERE run_id = $1 AND step_id = $2",
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
        // No row locks here: the fenced completion decides, should a worker or another sweeper
        // settle the same attempt at the same time.
        let rows = sqlx::query(statement!(
            "SELECT j.id, j.attempt, j.lease_token, j.max_attempts \
             FROM leases AS l JOIN jobs AS j ON j.id = ANY(l.job_ids) \
             WHERE l.expires_at <= $1 AND j.lease_token = l.token AND j.state = {job:running} \
             LIMIT $2"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.0)
        .await?;
        Ok(rows
            .iter()
            .map(|row| ExpiredLease {
                lease: Lease {
                    job_id: row.get("id"),
                    attempt: attempt_of(row),
                    token: row.get("lease_token"),
                },
                max_attempts: row.get::<i32, _>("max_attempts").max(0) as u32,
            })
            .collect())
    }

    async fn drop_spent_leases(&mut self, now: Millis) -> Result<()> {
        // A claim's lease outlives its jobs until it expires, so most expired ones have none.
        sqlx::query(statement!(
            "DELETE FROM leases AS l WHERE l.expires_at <= $1 \
                 AND NOT EXISTS (SELECT 1 FROM jobs AS j WHERE j.id = ANY(l.job_ids) \
                     AND j.lease_token = l.token AND j.state = {job:running})"
        ))
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn overdue_runs(&mut self, now: Millis, limit: u32) -> Result<Vec<(RunId, Option<i64>)>> {
        Ok(sqlx::query_as(statement!(
            "SELECT id, timeout_ms FROM runs WHERE status IN {runs:active} AND deadline_at <= $1 \
             ORDER BY id LIMIT $2"
        ))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn lock_run(&mut self, run_id: &str) -> Result<Option<RunStatus>> {
        // Opening a gate locks the gate, then its pending runs; ending a pending run takes them
        // in the same order, so the two never deadlock.
        let gated: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT status, concurrency_key FROM runs WHERE id = $1")
                .bind(run_id)
                .fetch_optional(&mut *self.0)
                .await?;
        if let Some((status, Some(key))) = &gated
            && status == RunStatus::Pending.as_str()
        {
            lock_key(&mut self.0, &format!("gate/{key}")).await?;
        }
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM runs WHERE id = $1 FOR UPDATE")
                .bind(run_id)
                .fetch_optional(&mut *self.0)
                .await?;
        status.as_deref().map(parse_state).transpose()
    }

    async fn unsuccessful_children(&mut self, runs: &[RunId]) -> Result<Vec<(JobId, RunId)>> {
        Ok(sqlx::query_as(statement!(
            "SELECT j.id, c.id FROM jobs AS j JOIN runs AS c ON c.parent_job_id = j.id \
             WHERE j.run_id = ANY($1::text[]) AND j.state IN {jobs:unsuccessful} \
                 AND NOT j.on_failure AND j.loop_job_id IS NULL AND c.status <> {run:succeeded} \
             ORDER BY c.id FOR UPDATE OF c"
        ))
        .bind(runs)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn reopen_runs(&mut self, runs: &[RunId], now: Millis) -> Result<()> {
        sqlx::query(statement!(
            "UPDATE runs SET status = {run:running}, error = NULL, output = NULL, \
                 finished_at = NULL, expires_at = NULL, \
                 deadline_at = CASE WHEN timeout_ms IS NOT NULL THEN $2 + timeout_ms END \
             WHERE id = ANY($1::text[]) AND status NOT IN {runs:active}"
        ))
        .bind(runs)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn repark_steps(&mut self, jobs: &[JobId]) -> Result<()> {
        sqlx::query(statement!(
            "UPDATE jobs SET state = {job:parked}, error = NULL, finished_at = NULL, \
                 run_after = NULL \
             WHERE id = ANY($1::bigint[]) AND state IN {jobs:unsuccessful}"
        ))
        .bind(jobs)
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
             WHERE r.id = ANY($1::text[]) AND r.status = {run:running} AND j.flow \
             ORDER BY j.id"
        ))
        .bind(runs)
        .fetch_all(&mut *self.0)
        .await?;
        rows.iter()
            .map(|row| {
                let needs: Value = row.get("needs");
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
        let (ids, reasons): (Vec<JobId>, Vec<&str>) =
            jobs.iter().map(|(id, r)| (*id, r.as_str())).unzip();
        sqlx::query(statement!(
            "UPDATE jobs SET state = {job:skipped}, error = c.reason, finished_at = $3 \
             FROM unnest($1::bigint[], $2::text[]) AS c(id, reason) \
             WHERE jobs.id = c.id AND jobs.state = {job:waiting}"
        ))
        .bind(&ids)
        .bind(&reasons)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn make_jobs_available(&mut self, jobs: &[JobId], now: Millis) -> Result<Vec<JobId>> {
        Ok(sqlx::query_scalar(statement!(
            "WITH made AS ( \
                 UPDATE jobs SET state = {job:available}, run_after = $2 \
                 WHERE id = ANY($1) AND state = {job:waiting} \
                 RETURNING id, run_after, priority), \
             queued AS ( \
                 INSERT INTO job_queue (run_after, job_id, priority) \
                 SELECT run_after, id, priority FROM made ON CONFLICT DO NOTHING) \
             SELECT id FROM made"
        ))
        .bind(jobs)
        .bind(now)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn cancel_jobs(&mut self, jobs: &[JobId], now: Millis) -> Result<()> {
        // Queue rows as `cancel_open_jobs` removes them: those no claim holds.
        sqlx::query(statement!(
            "DELETE FROM job_queue WHERE ctid = ANY(ARRAY( \
                 SELECT q.ctid FROM job_queue AS q JOIN jobs AS j \
                     ON q.priority = j.priority AND q.run_after = j.run_after \
                         AND q.job_id = j.id \
                 WHERE j.id = ANY($1) AND j.state IN {jobs:claimable} \
                 FOR UPDATE OF q SKIP LOCKED))"
        ))
        .bind(jobs)
        .execute(&mut *self.0)
        .await?;
        sqlx::query(statement!(
            "UPDATE jobs SET state = {job:cancelled}, lease_token = NULL, finished_at = $2 \
             WHERE id = ANY($1) AND state IN {jobs:open}"
        ))
        .bind(jobs)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn begin_failure_handling(&mut self, run_id: &str, error: &str) -> Result<()> {
        sqlx::query(statement!(
            "UPDATE runs SET error = $2 WHERE id = $1 AND status = {run:running}"
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
                 pending_needs = jsonb_array_length(needs) + on_failure::int \
             WHERE id = ANY($1) AND state NOT IN {jobs:open}"
        ))
        .bind(jobs)
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
        // retry) ever makes it ready: `release_items` does. A retry's items that did not
        // succeed wait again, with the value rendered now; those past its list go.
        sqlx::query(statement!(
            "WITH l AS ( \
                 UPDATE jobs SET parallel = $3 WHERE id = $1 \
                 RETURNING run_id, step_id, attempt_budget, priority), \
             made AS ( \
                 INSERT INTO jobs (run_id, step_id, state, needs, pending_needs, is_sink, \
                     attempt_budget, max_attempts, priority, run_after, loop_job_id, \
                     item_index, item) \
                 SELECT l.run_id, l.step_id || '[' || (i.ord - 1) || ']', {job:waiting}, \
                     '[]', 1, false, l.attempt_budget, l.attempt_budget, l.priority, $4, $1, \
                     i.ord - 1, i.value \
                 FROM l CROSS JOIN jsonb_array_elements($2) WITH ORDINALITY AS i(value, ord) \
                 ON CONFLICT (run_id, step_id) DO UPDATE SET item = excluded.item, \
                     state = {job:waiting}, output = NULL, error = NULL, checkpoint = NULL, \
                     finished_at = NULL, max_attempts = jobs.attempt + jobs.attempt_budget \
                 WHERE jobs.state IN {jobs:unsuccessful}), \
             gone AS ( \
                 DELETE FROM jobs WHERE loop_job_id = $1 AND item_index >= jsonb_array_length($2) \
                 RETURNING id) \
             DELETE FROM usage_counted WHERE job_id IN (SELECT id FROM gone)"
        ))
        .bind(loop_job)
        .bind(Value::Array(items.to_vec()))
        .bind(parallel.map(|p| i32::try_from(p).unwrap_or(i32::MAX)))
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        // Counted once the statement above is seen: what a retry kept has succeeded.
        sqlx::query(statement!(
            "UPDATE jobs SET next_item = 0, items_left = (SELECT count(*) FROM jobs \
                 WHERE loop_job_id = $1 AND state <> {job:succeeded}) \
             WHERE id = $1"
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
            "UPDATE jobs SET items_left = items_left - $2 \
             WHERE id = $1 AND state = {job:parked} RETURNING items_left, parallel"
        ))
        .bind(loop_job)
        .bind(succeeded as i32)
        .fetch_optional(&mut *self.0)
        .await?;
        Ok(row.map(|row| LoopProgress {
            left: row.get::<Option<i32>, _>("items_left").map_or(0, i64::from),
            parallel: row.get::<Option<i32>, _>("parallel").map(i64::from),
        }))
    }

    async fn release_items(
        &mut self,
        loop_job: JobId,
        count: i64,
        now: Millis,
    ) -> Result<Vec<JobId>> {
        Ok(sqlx::query_scalar(statement!(
            "WITH made AS ( \
                 UPDATE jobs SET state = {job:available}, run_after = $3 \
                 WHERE id = ANY(ARRAY(SELECT id FROM jobs \
                     WHERE loop_job_id = $1 AND state = {job:waiting} \
                         AND item_index >= (SELECT next_item FROM jobs WHERE id = $1) \
                     ORDER BY item_index LIMIT $2)) \
                 RETURNING id, run_after, priority, item_index), \
             queued AS ( \
                 INSERT INTO job_queue (run_after, job_id, priority) \
                 SELECT run_after, id, priority FROM made ON CONFLICT DO NOTHING), \
             moved_on AS ( \
                 UPDATE jobs SET next_item = (SELECT max(item_index) + 1 FROM made) \
                 WHERE id = $1 AND EXISTS (SELECT 1 FROM made)) \
             SELECT id FROM made"
        ))
        .bind(loop_job)
        .bind(count)
        .bind(now)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn open_items(&mut self, loops: &[JobId]) -> Result<Vec<JobId>> {
        Ok(sqlx::query_scalar(statement!(
            "SELECT id FROM jobs WHERE loop_job_id = ANY($1) AND state IN {jobs:open}"
        ))
        .bind(loops)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn finish_loop(&mut self, loop_job: JobId, now: Millis) -> Result<Option<Succeeded>> {
        Ok(sqlx::query_as(statement!(
            "UPDATE jobs SET state = {job:succeeded}, finished_at = $2, checkpoint = NULL, \
                 output = (SELECT coalesce(jsonb_agg(output ORDER BY item_index), '[]') \
                           FROM jobs WHERE loop_job_id = $1) \
             WHERE id = $1 AND state = {job:parked} \
                 AND NOT EXISTS (SELECT 1 FROM jobs \
                     WHERE loop_job_id = $1 AND state <> {job:succeeded}) \
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
                 pending_needs = (SELECT count(*) \
                     FROM jsonb_array_elements_text(jobs.needs) AS nd(step) \
                     JOIN jobs AS up ON up.run_id = jobs.run_id AND up.step_id = nd.step \
                     WHERE up.state <> {job:succeeded}) \
             WHERE run_id = ANY($1::text[]) AND state IN {jobs:unsuccessful} AND NOT flow \
                 AND loop_job_id IS NULL"
        ))
        .bind(runs)
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
        let inserted: Vec<WebhookEvent> = sqlx::query_as(&format!(
            "INSERT INTO webhook_events \
                 (source, scope, event_id, workflow_id, payload, received_at) \
             SELECT e.source, e.scope, e.event_id, e.workflow_id, \
                 coalesce(e.payload, 'null'::jsonb), $2 \
             FROM jsonb_to_recordset($1) AS e(source text, scope text, event_id text, \
                 workflow_id text, payload jsonb) \
             ORDER BY e.source, e.scope, e.event_id \
             ON CONFLICT (source, scope, event_id) DO NOTHING \
             RETURNING {WEBHOOK_EVENT_COLUMNS}"
        ))
        .bind(Value::Array(rows.clone()))
        .bind(now)
        .fetch_all(&mut *self.0)
        .await?;
        let mut found = keyed_events(inserted, true);
        if found.len() < events.len() {
            // Logged before: read after the insert, which waited for any concurrent one.
            let earlier: Vec<WebhookEvent> = sqlx::query_as(&format!(
                "SELECT {} FROM webhook_events AS w \
                 JOIN jsonb_to_recordset($1) AS e(source text, scope text, event_id text) \
                     ON w.source = e.source AND w.scope = e.scope AND w.event_id = e.event_id",
                qualified(WEBHOOK_EVENT_COLUMNS, "w")
            ))
            .bind(Value::Array(rows))
            .fetch_all(&mut *self.0)
            .await?;
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
            "UPDATE webhook_events SET run_id = coalesce(webhook_events.run_id, s.run_id), \
                 error = CASE WHEN coalesce(webhook_events.run_id, s.run_id) IS NULL \
                     THEN s.error END \
             FROM jsonb_to_recordset($1) AS s(id bigint, run_id text, error text) \
             WHERE webhook_events.id = s.id",
        )
        .bind(rows)
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
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(new.workflow_id)
        .bind(new.version)
        .bind(new.definition)
        .bind(now)
        .bind(new.origin.as_str())
        .execute(&mut *self.0)
        .await?;
        sqlx::query(
            "INSERT INTO workflows (id, latest_version, created_at, updated_at) \
             VALUES ($1, $2, $3, $3) \
             ON CONFLICT (id) DO UPDATE SET latest_version = $2, updated_at = $3",
        )
        .bind(new.workflow_id)
        .bind(new.version)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn delete_workflow(&mut self, id: &str) -> Result<bool> {
        let deleted = sqlx::query("DELETE FROM workflows WHERE id = $1")
            .bind(id)
            .execute(&mut *self.0)
            .await?;
        Ok(deleted.rows_affected() > 0)
    }

    async fn active_runs_of(&mut self, workflow_id: &str) -> Result<i64> {
        Ok(sqlx::query_scalar(statement!(
            "SELECT count(*) FROM runs WHERE workflow_id = $1 AND status IN {runs:active}"
        ))
        .bind(workflow_id)
        .fetch_one(&mut *self.0)
        .await?)
    }

    async fn record_audit(&mut self, entry: &NewAuditEntry, now: Millis) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, target, detail) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(now)
        .bind(&entry.actor)
        .bind(&entry.action)
        .bind(&entry.target)
        .bind(&entry.detail)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn set_paused(&mut self, id: &str, paused: bool, now: Millis) -> Result<bool> {
        let done = sqlx::query("UPDATE workflows SET paused = $1, updated_at = $2 WHERE id = $3")
            .bind(paused)
            .bind(now)
            .bind(id)
            .execute(&mut *self.0)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn put_setting(&mut self, key: SettingKey<'_>, value: &Value, now: Millis) -> Result<()> {
        sqlx::query(
            "INSERT INTO settings (namespace, name, value, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (namespace, name) DO UPDATE SET value = excluded.value, \
                 updated_at = excluded.updated_at",
        )
        .bind(key.namespace)
        .bind(key.name)
        .bind(value)
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
        // The upsert that changes nothing still returns the row, so one statement answers both
        // the winner and the losers of a race.
        Ok(sqlx::query_scalar(
            "INSERT INTO settings (namespace, name, value, updated_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (namespace, name) DO UPDATE SET value = settings.value \
             RETURNING value",
        )
        .bind(key.namespace)
        .bind(key.name)
        .bind(value)
        .bind(now)
        .fetch_one(&mut *self.0)
        .await?)
    }

    async fn delete_setting(&mut self, key: SettingKey<'_>) -> Result<bool> {
        let deleted = sqlx::query("DELETE FROM settings WHERE namespace = $1 AND name = $2")
            .bind(key.namespace)
            .bind(key.name)
            .execute(&mut *self.0)
            .await?
            .rows_affected();
        Ok(deleted > 0)
    }

    async fn swap_setting(
        &mut self,
        key: SettingKey<'_>,
        old: &Value,
        new: &Value,
    ) -> Result<bool> {
        let swapped = sqlx::query(
            "UPDATE settings SET value = $1 \
             WHERE namespace = $2 AND name = $3 AND value = $4::jsonb",
        )
        .bind(new)
        .bind(key.namespace)
        .bind(key.name)
        .bind(old)
        .execute(&mut *self.0)
        .await?
        .rows_affected();
        Ok(swapped > 0)
    }

    async fn revoke_token(&mut self, revocation: &TokenRevocation, now: Millis) -> Result<bool> {
        let revoked = sqlx::query(
            "INSERT INTO revoked_tokens (jti, expires_at, revoked_at, revoked_by) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (jti) DO NOTHING",
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
            "SELECT (SELECT next_nonce FROM chain_nonces WHERE chain_id = $1 AND address = $2) \
                 AS next, \
             (SELECT nonce FROM chain_nonce_owners \
                 WHERE chain_id = $1 AND address = $2 AND owner = $3) AS owned",
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
             VALUES ($1, $2, $3, $4, $5, $6)",
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
             VALUES ($1, $2, $3 + 1, $4) \
             ON CONFLICT (chain_id, address) DO UPDATE \
             SET next_nonce = GREATEST(chain_nonces.next_nonce, excluded.next_nonce), \
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
             WHERE o.chain_id = $1 AND o.address = $2 AND o.nonce = $3",
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
             WHERE f.chain_id = $1 AND f.address = $2 AND f.nonce = $3",
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
            "UPDATE chain_nonce_fills SET hash = $5 \
             WHERE chain_id = $1 AND address = $2 AND nonce = $3 AND job_id = $4",
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
            "UPDATE chain_nonce_owners SET nonce = $4, allocated_at = $5 \
             WHERE chain_id = $1 AND address = $2 AND owner = $3",
        )
        .bind(chain_id)
        .bind(address)
        .bind(owner)
        .bind(nonce)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        sqlx::query(
            "UPDATE chain_nonces SET next_nonce = GREATEST(chain_nonces.next_nonce, $3 + 1), updated_at = $4 \
             WHERE chain_id = $1 AND address = $2",
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
             VALUES ($1, $2, $3, $4, $5) \
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
            "SELECT id FROM runs WHERE expires_at <= $1 LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn lock_quota(&mut self, name: &str) -> Result<i64> {
        sqlx::query(
            "INSERT INTO quota_buckets (name, tat_us) VALUES ($1, 0) ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .execute(&mut *self.0)
        .await?;
        Ok(
            sqlx::query_scalar("SELECT tat_us FROM quota_buckets WHERE name = $1 FOR UPDATE")
                .bind(name)
                .fetch_one(&mut *self.0)
                .await?,
        )
    }

    async fn set_quota(&mut self, name: &str, tat_us: i64) -> Result<()> {
        sqlx::query("UPDATE quota_buckets SET tat_us = $2 WHERE name = $1")
            .bind(name)
            .bind(tat_us)
            .execute(&mut *self.0)
            .await?;
        Ok(())
    }

    async fn add_usage(&mut self, rows: Value) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_usage (provider, workflow_id, day, requests, errors, tokens, cost) \
             SELECT u.provider, u.workflow_id, u.day, u.requests, u.errors, u.tokens, u.cost \
             FROM jsonb_to_recordset($1) AS u(provider text, workflow_id text, day text, \
                 requests bigint, errors bigint, tokens bigint, cost double precision) \
             ON CONFLICT (provider, workflow_id, day) DO UPDATE SET \
                 requests = api_usage.requests + excluded.requests, \
                 errors = api_usage.errors + excluded.errors, \
                 tokens = api_usage.tokens + excluded.tokens, \
                 cost = api_usage.cost + excluded.cost",
        )
        .bind(rows)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn note_usage_counted(&mut self, attempts: Value) -> Result<Vec<(JobId, String)>> {
        Ok(sqlx::query_as(
            "INSERT INTO usage_counted (job_id, lease_token) \
             SELECT a.job_id, a.lease_token \
             FROM jsonb_to_recordset($1) AS a(job_id bigint, lease_token text) \
             ON CONFLICT DO NOTHING RETURNING job_id, lease_token",
        )
        .bind(attempts)
        .fetch_all(&mut *self.0)
        .await?)
    }

    async fn insert_artifacts(&mut self, rows: Value, now: Millis) -> Result<()> {
        sqlx::query(
            "INSERT INTO artifacts (id, run_id, step_id, attempt, sha256, size, content_type, \
                 created_at) \
             SELECT a.id, a.run_id, a.step_id, a.attempt, a.sha256, a.size, a.content_type, $2 \
             FROM jsonb_to_recordset($1) AS a(id text, run_id text, step_id text, attempt int, \
                 sha256 text, size bigint, content_type text) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(rows)
        .bind(now)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn append_logs(&mut self, rows: Value) -> Result<()> {
        sqlx::query(
            "INSERT INTO step_logs (run_id, step_id, attempt, at, stream, text) \
             SELECT l.run_id, l.step_id, l.attempt, l.at, l.stream, l.text \
             FROM jsonb_to_recordset($1) AS l(run_id text, step_id text, attempt int, \
                 at bigint, stream text, text text)",
        )
        .bind(rows)
        .execute(&mut *self.0)
        .await?;
        Ok(())
    }

    async fn insert_notifications(&mut self, rows: Value, now: Millis) -> Result<()> {
        sqlx::query(statement!(
            "INSERT INTO notifications (event_id, run_id, workflow_id, url, run_status, \
                 run_error, output, output_omitted, started_at, finished_at, status, next_at, \
                 created_at) \
             SELECT n.event_id, r.id, r.workflow_id, n.url, r.status, r.error, \
                 CASE WHEN s.size <= $3 THEN r.output END, coalesce(s.size > $3, false), \
                 r.started_at, r.finished_at, {notice:pending}, $2, $2 \
             FROM jsonb_to_recordset($1) AS n(event_id text, run_id text, url text) \
             JOIN runs AS r ON r.id = n.run_id \
             CROSS JOIN LATERAL (SELECT octet_length(r.output::text) AS size) AS s"
        ))
        .bind(rows)
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
            "UPDATE notifications SET claim_token = $3, claimed_until = $2 \
             WHERE id IN (SELECT id FROM notifications \
                 WHERE status = {{notice:pending}} AND next_at <= $1 \
                     AND (claimed_until IS NULL OR claimed_until <= $1) \
                 ORDER BY next_at LIMIT $4 FOR UPDATE SKIP LOCKED) \
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
            "UPDATE notifications SET status = $3, attempts = $4, next_at = $5, \
                 last_error = $6, delivered_at = $7, claim_token = NULL, claimed_until = NULL \
             WHERE id = $1 AND claim_token = $2",
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
             WHERE id = $1 AND attempt = $2 AND lease_token = $3 AND state = {job:running}"
        ))
        .bind(lease.job_id)
        .bind(lease.attempt as i32)
        .bind(&lease.token)
        .fetch_optional(&mut *self.0)
        .await?)
    }

    async fn delete_runs(&mut self, runs: &[RunId]) -> Result<u64> {
        sqlx::query("DELETE FROM step_logs WHERE run_id = ANY($1::text[])")
            .bind(runs)
            .execute(&mut *self.0)
            .await?;
        sqlx::query("DELETE FROM artifacts WHERE run_id = ANY($1::text[])")
            .bind(runs)
            .execute(&mut *self.0)
            .await?;
        sqlx::query(
            "DELETE FROM usage_counted WHERE job_id IN \
             (SELECT id FROM jobs WHERE run_id = ANY($1::text[]))",
        )
        .bind(runs)
        .execute(&mut *self.0)
        .await?;
        sqlx::query("DELETE FROM jobs WHERE run_id = ANY($1::text[])")
            .bind(runs)
            .execute(&mut *self.0)
            .await?;
        Ok(sqlx::query("DELETE FROM runs WHERE id = ANY($1::text[])")
            .bind(runs)
            .execute(&mut *self.0)
            .await?
            .rows_affected())
    }

    async fn delete_old_records(&mut self, cutoffs: &RecordCutoffs) -> Result<()> {
        for (statement, before) in [
            (
                "DELETE FROM fires WHERE fire_at < $1 AND fire_at < \
                     (SELECT max(fire_at) FROM fires AS f WHERE f.workflow_id = fires.workflow_id)",
                cutoffs.records_before,
            ),
            (
                "DELETE FROM alerts WHERE created_at < $1",
                cutoffs.records_before,
            ),
            (
                "DELETE FROM webhook_events WHERE received_at < $1",
                cutoffs.records_before,
            ),
            (
                statement!(
                    "DELETE FROM notifications WHERE created_at < $1 \
                     AND status <> {notice:pending}"
                ),
                cutoffs.records_before,
            ),
            (
                "DELETE FROM revoked_tokens WHERE expires_at <= $1",
                cutoffs.revocations_before,
            ),
            ("DELETE FROM audit_log WHERE at < $1", cutoffs.audit_before),
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
            "INSERT INTO fires (workflow_id, fire_at, recorded_at) VALUES ($1, $2, $3) \
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
            sqlx::query_scalar("SELECT paused FROM workflows WHERE id = $1")
                .bind(workflow_id)
                .fetch_optional(&mut *self.0)
                .await?,
        )
    }

    async fn active_top_level_run(&mut self, workflow_id: &str) -> Result<Option<RunId>> {
        Ok(sqlx::query_scalar(statement!(
            "SELECT id FROM runs WHERE workflow_id = $1 AND status IN {runs:active} \
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
             VALUES ($1, 'fire_refused', $2, $3)",
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
            "UPDATE fires SET run_id = $3, skipped_reason = $4 \
             WHERE workflow_id = $1 AND fire_at = $2",
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

/// Leases up to `params.limit` due jobs in one statement: takes the oldest rows no other claim
/// holds, leases them, and reads what their workers need.
async fn claim_in(conn: &mut PgConnection, params: &ClaimParams) -> Result<Vec<ClaimedJob>> {
    if params.limit == 0 {
        return Ok(Vec::new());
    }
    let token = uuid::Uuid::new_v4().simple().to_string();
    // Waking from a parked state continues the same attempt; anything else starts a new one.
    // The claim takes the queue's first rows no other claim holds, higher priorities first (the
    // three parts of `next` run in turn, each only while the claim is not full: an `Append` under
    // a `Limit`; the middle one reads the primary key's range of due rows at priority 0, the
    // first and the last the partial index of the few rows whose priority is not 0), and deletes
    // them by address (stable while locked); their jobs, reached by primary key, are claimed if they are still
    // claimable and due, since a race may leave a row behind (see `deliver_callback`). Whoever
    // else removes a queue row (a cancel, a callback) skips those a claim holds, so neither
    // waits for the other. One lease row covers the whole claim. Templates reference only steps
    // upstream of their own (definition validation), so a step without needs is given no outputs
    // and costs no lookup. The outputs never include a `for_each` step's items; an item is
    // given the outputs its step was given, kept with that step, so no item reads its siblings.
    let rows = sqlx::query(statement!(
        "WITH next AS MATERIALIZED ( \
             SELECT ctid, job_id FROM ( \
                 SELECT ctid, job_id FROM job_queue \
                 WHERE priority <> 0 AND priority > 0 AND run_after <= $3 \
                 ORDER BY priority DESC, run_after, job_id LIMIT $4 \
                 FOR UPDATE SKIP LOCKED) AS high \
             UNION ALL \
             SELECT ctid, job_id FROM ( \
                 SELECT ctid, job_id FROM job_queue WHERE run_after <= $3 AND priority = 0 \
                 ORDER BY run_after, job_id LIMIT $4 FOR UPDATE SKIP LOCKED) AS normal \
             UNION ALL \
             SELECT ctid, job_id FROM ( \
                 SELECT ctid, job_id FROM job_queue \
                 WHERE priority <> 0 AND priority < 0 AND run_after <= $3 \
                 ORDER BY priority DESC, run_after, job_id LIMIT $4 \
                 FOR UPDATE SKIP LOCKED) AS low \
             LIMIT $4), \
         dequeued AS ( \
             DELETE FROM job_queue WHERE ctid = ANY(ARRAY(SELECT ctid FROM next))), \
         claimed AS ( \
             UPDATE jobs SET state = {job:running}, \
                 attempt = jobs.attempt + (jobs.state <> {job:parked})::int, \
                 lease_token = $1, \
                 started_at = CASE WHEN jobs.state = {job:parked} \
                     THEN jobs.started_at ELSE $3 END \
             WHERE jobs.id = ANY(ARRAY(SELECT job_id FROM next)) \
                 AND jobs.state IN {jobs:claimable} AND jobs.run_after <= $3 \
             RETURNING jobs.id, jobs.run_id, jobs.step_id, jobs.attempt, jobs.checkpoint, \
                 jobs.needs, jobs.loop_job_id, jobs.item_index, jobs.item), \
         leased AS ( \
             INSERT INTO leases (token, expires_at, job_ids) \
             SELECT $1, $2, array_agg(id) FROM claimed HAVING count(*) > 0) \
         SELECT c.id, c.run_id, c.step_id, c.attempt, c.checkpoint, r.workflow_id, \
             r.version, CASE WHEN c.loop_job_id IS NULL THEN r.input END AS input, \
             r.scheduled_at, r.error AS run_error, \
             c.loop_job_id, l.step_id AS loop_step, c.item_index, c.item, \
             CASE WHEN c.needs <> '[]' THEN (SELECT jsonb_object_agg(j.step_id, j.output) \
                 FROM jobs AS j WHERE j.run_id = c.run_id AND j.state IN {jobs:successful} \
                     AND j.loop_job_id IS NULL) \
             END AS outputs \
         FROM claimed AS c JOIN runs AS r ON r.id = c.run_id \
             LEFT JOIN jobs AS l ON l.id = c.loop_job_id"
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
            input: row.get::<Option<Value>, _>("input").unwrap_or(Value::Null),
            scheduled_at: row.get("scheduled_at"),
            run_error: row.get("run_error"),
            item: row
                .get::<Option<String>, _>("loop_step")
                .map(|step_id| LoopItem {
                    loop_job: row.get("loop_job_id"),
                    step_id,
                    index: row.get::<Option<i32>, _>("item_index").map_or(0, i64::from),
                    value: row.get::<Option<Value>, _>("item").unwrap_or(Value::Null),
                }),
            checkpoint: row.try_get("checkpoint").unwrap_or_else(|e| {
                tracing::error!(error = %e, "a step's checkpoint could not be read");
                None
            }),
            // A value the decoder refuses costs its job the outputs (its templates then say
            // what is missing), never the claim of every other job.
            outputs: match row.try_get::<Option<Value>, _>("outputs") {
                Ok(Some(Value::Object(map))) => map,
                Ok(_) => serde_json::Map::new(),
                Err(e) => {
                    tracing::error!(error = %e, "a step's outputs could not be read");
                    serde_json::Map::new()
                }
            },
        })
        .collect())
}

/// A row of its own in a namespace nothing lists: the write `probe_write` commits.
const PROBE_WRITE: &str = "INSERT INTO settings (namespace, name, value, updated_at) \
     VALUES ('probe', 'write', '0', $1) \
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

fn attempt_of(row: &PgRow) -> u32 {
    row.get::<i32, _>("attempt").max(0) as u32
}

#[async_trait]
impl Reads for PostgresStore {
    async fn workflow(&self, id: &str) -> Result<Option<WorkflowState>> {
        let row = sqlx::query(&format!("{WORKFLOW_STATE} WHERE w.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(WorkflowState::from_row).transpose()?)
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
        Ok(rows
            .iter()
            .map(WorkflowState::from_row)
            .collect::<sqlx::Result<_>>()?)
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

    async fn queue_depth(&self, now: Millis) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM job_queue WHERE priority = 0 AND run_after <= $1) \
                     + (SELECT count(*) FROM job_queue WHERE priority <> 0 AND run_after <= $1)",
        )
        .bind(now)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn next_due(&self) -> Result<Option<Millis>> {
        Ok(sqlx::query_scalar(statement!(
            "SELECT least( \
                 (SELECT min(run_after) FROM job_queue WHERE priority = 0), \
                 (SELECT min(run_after) FROM job_queue WHERE priority <> 0), \
                 (SELECT min(deadline_at) FROM runs \
                     WHERE status IN {runs:active} AND deadline_at IS NOT NULL))"
        ))
        .fetch_one(&self.pool)
        .await?)
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
        Ok(query.build_query_as().fetch_all(&self.pool).await?)
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
            "SELECT id, step_id, state, attempt, output, error, item_index, run_after, \
                 started_at, finished_at, attempts FROM jobs WHERE run_id = $1 ORDER BY id",
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
                item_index: r.get::<Option<i32>, _>("item_index").map(i64::from),
                run_after: r.get("run_after"),
                started_at: r.get("started_at"),
                finished_at: r.get("finished_at"),
                attempts: r.get("attempts"),
            })
        })
        .collect::<Result<_>>()?;
        Ok(RunDetail {
            summary: RunSummary::from_row(&row)?,
            input: row.get("input"),
            output: row.get("output"),
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
        Ok(sqlx::query_as(
            "SELECT id, step_id, attempt, at, stream, text FROM step_logs \
             WHERE run_id = $1 AND id > coalesce($2, 0) ORDER BY id LIMIT $3",
        )
        .bind(run_id)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn last_step_logs(&self, run_id: &str, limit: u32) -> Result<Vec<LogEntry>> {
        Ok(sqlx::query_as(
            "SELECT * FROM (SELECT id, step_id, attempt, at, stream, text FROM step_logs \
             WHERE run_id = $1 ORDER BY id DESC LIMIT $2) AS last ORDER BY id",
        )
        .bind(run_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn run_summary(&self, run_id: &str) -> Result<Option<RunSummary>> {
        Ok(
            sqlx::query_as(&format!("SELECT {SUMMARY_COLUMNS} FROM runs WHERE id = $1"))
                .bind(run_id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn child_runs(&self, parent: &str, limit: u32) -> Result<Vec<RunSummary>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {SUMMARY_COLUMNS} FROM runs WHERE parent_run_id = $1 \
             ORDER BY created_at, id LIMIT $2"
        ))
        .bind(parent)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn run_ids_starting(&self, prefix: &str, limit: u32) -> Result<Vec<RunId>> {
        Ok(sqlx::query_scalar(
            "SELECT id FROM runs WHERE id >= $1 AND id < $1 || '~' ORDER BY id LIMIT $2",
        )
        .bind(prefix)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn loop_context(&self, loop_job: JobId) -> Result<LoopContext> {
        let row = sqlx::query(
            "SELECT r.input, l.checkpoint->'outputs' AS outputs \
             FROM jobs AS l JOIN runs AS r ON r.id = l.run_id WHERE l.id = $1",
        )
        .bind(loop_job)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("the for_each step of job {loop_job}")))?;
        Ok(LoopContext {
            input: row.get("input"),
            outputs: match row.get::<Option<Value>, _>("outputs") {
                Some(Value::Object(map)) => map,
                _ => serde_json::Map::new(),
            },
        })
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

    async fn usage(&self, filter: &UsageFilter) -> Result<Vec<Usage>> {
        let rows: Vec<(String, String, String, i64, i64, i64, f64)> = sqlx::query_as(
            "SELECT provider, workflow_id, day, requests, errors, tokens, cost FROM api_usage \
             WHERE ($1::text IS NULL OR provider = $1) AND ($2::text IS NULL OR workflow_id = $2) \
                 AND ($3::text IS NULL OR day >= $3) AND ($4::text IS NULL OR day <= $4) \
             ORDER BY day DESC, provider, workflow_id LIMIT $5",
        )
        .bind(&filter.provider)
        .bind(&filter.workflow_id)
        .bind(&filter.from)
        .bind(&filter.to)
        .bind(i64::from(filter.limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(super::usage_row).collect())
    }

    async fn artifact(&self, id: &str) -> Result<Option<ArtifactRef>> {
        let row: Option<(String, String, i64, String)> =
            sqlx::query_as("SELECT id, sha256, size, content_type FROM artifacts WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(super::artifact_ref))
    }

    async fn artifact_hashes_named(&self, hashes: &[String]) -> Result<BTreeSet<String>> {
        let named: Vec<String> =
            sqlx::query_scalar("SELECT DISTINCT sha256 FROM artifacts WHERE sha256 = ANY($1)")
                .bind(hashes)
                .fetch_all(&self.pool)
                .await?;
        Ok(named.into_iter().collect())
    }

    async fn notifications(
        &self,
        status: Option<NotificationStatus>,
        limit: u32,
    ) -> Result<Vec<Notification>> {
        // A list need not carry up to a megabyte of output per row.
        Ok(sqlx::query_as(&format!(
            "SELECT {} FROM notifications WHERE ($1::text IS NULL OR status = $1) \
             ORDER BY created_at DESC, id DESC LIMIT $2",
            NOTIFICATION_COLUMNS.replace(" output,", " NULL::jsonb AS output,")
        ))
        .bind(status.map(NotificationStatus::as_str))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    async fn notification_counts(&self) -> Result<(i64, i64)> {
        Ok(sqlx::query_as(statement!(
            "SELECT count(*) FILTER (WHERE status = {notice:pending}), \
                 count(*) FILTER (WHERE status = {notice:failed}) FROM notifications"
        ))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
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

    async fn revoked_tokens(&self, now: Millis) -> Result<Vec<String>> {
        Ok(
            sqlx::query_scalar("SELECT jti FROM revoked_tokens WHERE expires_at > $1")
                .bind(now)
                .fetch_all(&self.pool)
                .await?,
        )
    }
}

#[async_trait]
impl Driver for PostgresStore {
    type Tx = PgTx<sqlx::Transaction<'static, sqlx::Postgres>>;
    type Leased = Vec<ClaimedJob>;

    async fn apply_migrations(&self) -> Result<()> {
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

    fn wakeups(&self) -> Arc<Notify> {
        self.wakeup.clone()
    }

    async fn begin(&self) -> Result<Self::Tx> {
        Ok(PgTx(self.pool.begin().await?))
    }

    /// Workers in every process hear of the jobs through a `NOTIFY` delivered at the commit.
    async fn commit(&self, mut tx: Self::Tx, effects: Effects, claimed: &[JobId]) -> Result<()> {
        let wake = effects.wakes_others(claimed);
        if wake {
            self.notify(&mut tx.0).await?;
        }
        tx.0.commit().await?;
        effects.publish();
        if wake {
            self.wakeup.notify_one();
        }
        Ok(())
    }

    async fn claim_jobs(&self, params: &ClaimParams) -> Result<Vec<ClaimedJob>> {
        let mut conn = self.pool.acquire().await?;
        claim_in(&mut conn, params).await
    }

    async fn lease(&self, tx: &mut Self::Tx, params: &ClaimParams) -> Result<Vec<ClaimedJob>> {
        claim_in(&mut tx.0, params).await
    }

    fn leased_ids(leased: &Vec<ClaimedJob>) -> Vec<JobId> {
        machine::claimed_ids(leased)
    }

    async fn claimed(&self, leased: Vec<ClaimedJob>) -> Result<Vec<ClaimedJob>> {
        Ok(leased)
    }

    async fn extend_leases(&self, leases: &[Lease], lease_until: Millis) -> Result<Vec<JobId>> {
        let ids: Vec<JobId> = leases.iter().map(|l| l.job_id).collect();
        let attempts: Vec<i32> = leases.iter().map(|l| l.attempt as i32).collect();
        let tokens: Vec<&str> = leases.iter().map(|l| l.token.as_str()).collect();
        // A claim's lease row covers all its jobs: extending it for one extends it for the rest,
        // which the same worker holds (or has settled, or lost to a reclaim that changed their
        // token).
        Ok(sqlx::query_scalar(statement!(
            "WITH extended AS ( \
                 UPDATE leases SET expires_at = $4 WHERE token = ANY($3::text[])) \
             SELECT jobs.id \
             FROM unnest($1::bigint[], $2::int[], $3::text[]) AS c(id, attempt, token) \
             JOIN jobs ON jobs.id = c.id AND jobs.attempt = c.attempt \
                 AND jobs.lease_token = c.token AND jobs.state = {job:running}"
        ))
        .bind(&ids)
        .bind(&attempts)
        .bind(&tokens)
        .bind(lease_until)
        .fetch_all(&self.pool)
        .await?)
    }
}
