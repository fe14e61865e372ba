-- Switchyard on PostgreSQL. Times are milliseconds since the Unix epoch, as on SQLite, so both
-- stores share one clock and one set of semantics; JSON is jsonb.

CREATE TABLE workflows (
    id              TEXT PRIMARY KEY,
    latest_version  BIGINT NOT NULL,
    paused          BOOLEAN NOT NULL DEFAULT false,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL
);

-- Runs keep the version they started with, so every version ever run stays here.
CREATE TABLE workflow_versions (
    workflow_id  TEXT NOT NULL,
    version      BIGINT NOT NULL,
    definition   JSONB NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (workflow_id, version)
);

CREATE TABLE runs (
    id                 TEXT PRIMARY KEY,
    workflow_id        TEXT NOT NULL,
    version            BIGINT NOT NULL,
    status             TEXT NOT NULL,
    input              JSONB NOT NULL,
    output             JSONB,
    error              TEXT,
    parent_run_id      TEXT,
    parent_job_id      BIGINT,
    child_index        BIGINT,
    concurrency_key    TEXT,
    concurrency_limit  BIGINT,
    idempotency_key    TEXT UNIQUE,
    timeout_ms         BIGINT,
    deadline_at        BIGINT,
    retention_ms       BIGINT NOT NULL,
    expires_at         BIGINT,
    scheduled_at       BIGINT,
    created_at         BIGINT NOT NULL,
    started_at         BIGINT,
    finished_at        BIGINT
);
CREATE INDEX runs_by_created ON runs (created_at DESC, id DESC);
CREATE INDEX runs_by_workflow ON runs (workflow_id, created_at DESC, id DESC);
CREATE INDEX runs_by_status ON runs (status, created_at DESC, id DESC);
CREATE INDEX runs_by_workflow_status ON runs (workflow_id, status, created_at DESC, id DESC);
CREATE INDEX runs_by_parent_job ON runs (parent_job_id) WHERE parent_job_id IS NOT NULL;
CREATE INDEX runs_by_parent_run ON runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runs_active_deadline ON runs (deadline_at)
    WHERE status IN ('pending', 'running') AND deadline_at IS NOT NULL;
CREATE INDEX runs_gated ON runs (concurrency_key, status, created_at)
    WHERE concurrency_key IS NOT NULL;
CREATE INDEX runs_expiring ON runs (expires_at) WHERE expires_at IS NOT NULL;
CREATE INDEX runs_active_by_workflow ON runs (workflow_id)
    WHERE status IN ('pending', 'running') AND parent_run_id IS NULL;

-- One row per step of a run: the job and its series of attempts.
CREATE TABLE jobs (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id            TEXT NOT NULL,
    step_id           TEXT NOT NULL,
    state             TEXT NOT NULL,
    needs             JSONB NOT NULL,
    pending_needs     INTEGER NOT NULL,
    is_sink           BOOLEAN NOT NULL,
    attempt           INTEGER NOT NULL DEFAULT 0,
    attempt_budget    INTEGER NOT NULL,
    max_attempts      INTEGER NOT NULL,
    run_after         BIGINT,
    lease_token       TEXT,
    lease_expires_at  BIGINT,
    checkpoint        JSONB,
    output            JSONB,
    error             TEXT,
    attempts          JSONB NOT NULL DEFAULT '[]',
    started_at        BIGINT,
    finished_at       BIGINT,
    UNIQUE (run_id, step_id)
);
-- The claim walks this index in its own order: due time, then id.
CREATE INDEX jobs_claimable ON jobs (run_after, id)
    WHERE state IN ('available', 'retrying', 'parked');
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'running';

-- A fire is unique on (workflow, fire time): two schedulers can never both start it.
CREATE TABLE fires (
    workflow_id     TEXT NOT NULL,
    fire_at         BIGINT NOT NULL,
    run_id          TEXT,
    skipped_reason  TEXT,
    recorded_at     BIGINT NOT NULL,
    PRIMARY KEY (workflow_id, fire_at)
);
