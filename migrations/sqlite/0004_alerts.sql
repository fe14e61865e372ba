-- A record of every run that failed or timed out, written in the transaction that ended it, for
-- operators (GET /api/alerts). Pruned after 30 days.
CREATE TABLE alerts (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    workflow_id  TEXT NOT NULL,
    run_id       TEXT NOT NULL,
    kind         TEXT NOT NULL,
    message      TEXT NOT NULL,
    created_at   INTEGER NOT NULL
);
CREATE INDEX alerts_by_created ON alerts (created_at DESC, id DESC);
