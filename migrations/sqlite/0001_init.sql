-- Switchyard on SQLite. Times are milliseconds since the Unix epoch; JSON is stored as text.

CREATE TABLE workflows (
    id              TEXT PRIMARY KEY,
    latest_version  INTEGER NOT NULL,
    paused          INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);

-- Runs keep the version they started with, so every version ever run stays here.
CREATE TABLE workflow_versions (
    workflow_id  TEXT NOT NULL,
    version      INTEGER NOT NULL,
    definition   TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    PRIMARY KEY (workflow_id, version)
);

CREATE TABLE runs (
    id                 TEXT PRIMARY KEY,
    workflow_id        TEXT NOT NULL,
    version            INTEGER NOT NULL,
    status             TEXT NOT NULL,
    input              TEXT NOT NULL,
    output             TEXT,
    error              TEXT,
    parent_run_id      TEXT,
    parent_job_id      INTEGER,
    child_index        INTEGER,
    concurrency_key    TEXT,
    concurrency_limit  INTEGER,
    idempotency_key    TEXT UNIQUE,
    timeout_ms         INTEGER,
    deadline_at        INTEGER,
    retention_ms       INTEGER NOT NULL,
    expires_at         INTEGER,
    scheduled_at       INTEGER,
    created_at         INTEGER NOT NULL,
    started_at         INTEGER,
    finished_at        INTEGER
);
CREATE INDEX runs_by_created ON runs (created_at DESC, id DESC);
CREATE INDEX runs_by_workflow ON runs (workflow_id, created_at DESC, id DESC);
CREATE INDEX runs_by_status ON runs (status, created_at DESC, id DESC);
CREATE INDEX runs_by_parent_job ON runs (parent_job_id) WHERE parent_job_id IS NOT NULL;
CREATE INDEX runs_by_parent_run ON runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
CREATE INDEX runs_active_deadline ON runs (deadline_at)
    WHERE status IN ('pending', 'running') AND deadline_at IS NOT NULL;
CREATE INDEX runs_gated ON runs (concurrency_key, status, created_at)
    WHERE concurrency_key IS NOT NULL;
CREATE INDEX runs_expiring ON runs (expires_at) WHERE expires_at IS NOT NULL;

-- One row per step of a run: the job and its series of attempts.
CREATE TABLE jobs (
    id                INTEGER PRIMARY KEY,
    run_id            TEXT NOT NULL,
    step_id           TEXT NOT NULL,
    state             TEXT NOT NULL,
    needs             TEXT NOT NULL,
    pending_needs     INTEGER NOT NULL,
    is_sink           INTEGER NOT NULL,
    attempt           INTEGER NOT NULL DEFAULT 0,
    attempt_budget    INTEGER NOT NULL,
    max_attempts      INTEGER NOT NULL,
    run_after         INTEGER,
    lease_token       TEXT,
    lease_expires_at  INTEGER,
    checkpoint        TEXT,
    output            TEXT,
    error             TEXT,
    attempts          TEXT NOT NULL DEFAULT '[]',
    started_at        INTEGER,
    finished_at       INTEGER,
    UNIQUE (run_id, step_id)
);
-- The claim walks this index in its own order: due time, then id.
CREATE INDEX jobs_claimable ON jobs (run_after, id)
    WHERE state IN ('available', 'retrying', 'parked');
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'running';

-- A fire is unique on (workflow, fire time): two schedulers can never both start it.
CREATE TABLE fires (
    workflow_id     TEXT NOT NULL,
    fire_at         INTEGER NOT NULL,
    run_id          TEXT,
    skipped_reason  TEXT,
    recorded_at     INTEGER NOT NULL,
    PRIMARY KEY (workflow_id, fire_at)
);
