-- A webhook event id is unique per source and scope: runs a sender starts share one scope (''),
-- while each step it answers has its own (`run/step`), so that an answer reusing the id of a
-- delivery that started a run still reaches its step. SQLite cannot drop a table's UNIQUE
-- constraint: the table is built again.
CREATE TABLE webhook_events_scoped (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    source       TEXT NOT NULL,
    scope        TEXT NOT NULL DEFAULT '',
    event_id     TEXT NOT NULL,
    workflow_id  TEXT,
    payload      TEXT NOT NULL,
    run_id       TEXT,
    error        TEXT,
    received_at  INTEGER NOT NULL,
    UNIQUE (source, scope, event_id)
);
INSERT INTO webhook_events_scoped
    (id, source, event_id, workflow_id, payload, run_id, error, received_at)
SELECT id, source, event_id, workflow_id, payload, run_id, error, received_at FROM webhook_events;
-- Answers logged before scopes existed keep a scope of their own, apart from the starts.
UPDATE webhook_events_scoped SET scope = 'answer'
WHERE json_type(payload, '$.callback') IS NOT NULL;
DROP TABLE webhook_events;
ALTER TABLE webhook_events_scoped RENAME TO webhook_events;
CREATE INDEX webhook_events_by_received ON webhook_events (received_at DESC, id DESC);
