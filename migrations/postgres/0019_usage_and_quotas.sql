-- What steps spent at the services they call, per provider, workflow and UTC day (the seed's
-- api_usage): written with each batch of completions, summed.
CREATE TABLE api_usage (
    provider    TEXT NOT NULL,
    workflow_id TEXT NOT NULL,
    day         TEXT NOT NULL,  -- YYYY-MM-DD, UTC
    requests    BIGINT NOT NULL DEFAULT 0,
    errors      BIGINT NOT NULL DEFAULT 0,
    tokens      BIGINT NOT NULL DEFAULT 0,
    cost        DOUBLE PRECISION NOT NULL DEFAULT 0,
    PRIMARY KEY (provider, workflow_id, day)
);
CREATE INDEX api_usage_by_day ON api_usage (day);

-- Shared rate limits (a step's `quota`): each bucket's theoretical arrival time (GCRA), in
-- microseconds; see `state::quota_take`.
CREATE TABLE quota_buckets (
    name   TEXT PRIMARY KEY,
    tat_us BIGINT NOT NULL
);
