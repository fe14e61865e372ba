-- Every authenticated request to an inbound webhook, logged before it takes effect (GET
-- /api/webhook-events). An event id is unique per source, so a repeated delivery is answered with
-- what the first did and starts nothing. Pruned after 30 days.
CREATE TABLE webhook_events (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source       TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    workflow_id  TEXT,
    payload      JSONB NOT NULL,
    run_id       TEXT,
    error        TEXT,
    received_at  BIGINT NOT NULL,
    UNIQUE (source, event_id)
);
CREATE INDEX webhook_events_by_received ON webhook_events (received_at DESC, id DESC);
