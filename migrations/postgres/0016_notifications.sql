-- Where a run's end is announced: a workflow's `notifications` (an absolute webhook_url, and
-- whether success and failure are announced), copied onto each run as it is created.
ALTER TABLE runs ADD COLUMN notify JSONB;

-- The outbox of run notifications: written in the transaction that ends the run, then POSTed
-- by a sender until a 2xx (GET /api/notifications). A sender holds a row while it sends
-- (claim_token, claimed_until), so two senders never send one at once.
CREATE TABLE notifications (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       TEXT NOT NULL UNIQUE,
    run_id         TEXT NOT NULL,
    workflow_id    TEXT NOT NULL,
    url            TEXT NOT NULL,
    run_status     TEXT NOT NULL,
    run_error      TEXT,
    output         JSONB,  -- only up to 64 KiB: receivers get a link to a larger one
    output_omitted BOOLEAN NOT NULL DEFAULT false,
    started_at     BIGINT,
    finished_at    BIGINT,
    status         TEXT NOT NULL,
    attempts       INT NOT NULL DEFAULT 0,
    next_at        BIGINT NOT NULL,
    claim_token    TEXT,
    claimed_until  BIGINT,
    last_error     TEXT,
    created_at     BIGINT NOT NULL,
    delivered_at   BIGINT
);
CREATE INDEX notifications_due ON notifications (next_at) WHERE status = 'pending';
CREATE INDEX notifications_by_created ON notifications (created_at DESC, id DESC);
