-- The attempts (by their lease) whose usage `api_usage` holds (see `machine::count_usage`): a
-- batch of completions sent again after its commit was lost adds nothing twice. Deleted with
-- their jobs.
CREATE TABLE usage_counted (
    job_id      BIGINT NOT NULL,
    lease_token TEXT NOT NULL,
    PRIMARY KEY (job_id, lease_token)
);
