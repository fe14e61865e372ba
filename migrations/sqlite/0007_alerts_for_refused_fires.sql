-- A scheduled fire whose run cannot start (its input fails the workflow's input_schema) is a
-- failure without a run: its alert (kind `fire_refused`) has no run id. SQLite cannot drop a
-- NOT NULL in place, so the table is rebuilt.
CREATE TABLE alerts_rebuilt (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    workflow_id  TEXT NOT NULL,
    run_id       TEXT,
    kind         TEXT NOT NULL,
    message      TEXT NOT NULL,
    created_at   INTEGER NOT NULL
);
-- The ids go on from where they were, though every alert was pruned.
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'alerts_rebuilt', seq FROM sqlite_sequence WHERE name = 'alerts';
INSERT INTO alerts_rebuilt (id, workflow_id, run_id, kind, message, created_at)
    SELECT id, workflow_id, run_id, kind, message, created_at FROM alerts;
DROP TABLE alerts;
ALTER TABLE alerts_rebuilt RENAME TO alerts;
CREATE INDEX alerts_by_created ON alerts (created_at DESC, id DESC);
