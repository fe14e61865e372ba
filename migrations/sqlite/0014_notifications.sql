-- Where a run's end is announced: a workflow's `notifications` (an absolute webhook_url, and
-- whether success and failure are announced), copied onto each run as it is created.
ALTER TABLE runs ADD COLUMN notify TEXT;

-- The outbox of run notifications: written in the transaction that ends the run, then POSTed
-- by a sender until a 2xx (GET /api/notifications). A sender holds a row while it sends
-- (claim_token, claimed_until), so two senders never send one at once.
CREATE TABLE notifications (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id       TEXT NOT NULL UNIQUE,
    run_id         TEXT NOT NULL,
    workflow_id    TEXT NOT NULL,
    url            TEXT NOT NULL,
    run_status     TEXT NOT NULL,
    run_error      TEXT,
    output         TEXT,  -- only up to 64 KiB: receivers get a link to a larger one
    output_omitted INTEGER NOT NULL DEFAULT 0,
    started_at     INTEGER,
    finished_at    INTEGER,
    status         TEXT NOT NULL,
    attempts       INTEGER NOT NULL DEFAULT 0,
    next_at        INTEGER NOT NULL,
    claim_token    TEXT,
    claimed_until  INTEGER,
    last_error     TEXT,
    created_at     INTEGER NOT NULL,
    delivered_at   INTEGER
);
CREATE INDEX notifications_due ON notifications (next_at) WHERE status = 'pending';
CREATE INDEX notifications_by_created ON notifications (created_at DESC, id DESC);
