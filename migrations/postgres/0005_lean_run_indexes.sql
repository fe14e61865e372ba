-- Finishing a run rewrites its row, and PostgreSQL adds an entry to every index whose predicate
-- the new row meets. Most runs succeed, so the status indexes leave succeeded runs out: a listing
-- of succeeded runs reads `runs_by_created` or `runs_by_workflow` instead, where nearly every row
-- matches. Runs without an idempotency key, nearly all of them, stay out of its index.
DROP INDEX runs_by_status;
CREATE INDEX runs_by_status ON runs (status, created_at DESC, id DESC)
    WHERE status <> 'succeeded';
DROP INDEX runs_by_workflow_status;
CREATE INDEX runs_by_workflow_status ON runs (workflow_id, status, created_at DESC, id DESC)
    WHERE status <> 'succeeded';
ALTER TABLE runs DROP CONSTRAINT runs_idempotency_key_key;
CREATE UNIQUE INDEX runs_by_idempotency_key ON runs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Keys compare byte-wise: ids and states are ASCII, and a locale's collation costs a strcoll in
-- every index comparison on the hot path.
ALTER TABLE runs
    ALTER COLUMN id TYPE TEXT COLLATE "C",
    ALTER COLUMN workflow_id TYPE TEXT COLLATE "C",
    ALTER COLUMN status TYPE TEXT COLLATE "C",
    ALTER COLUMN parent_run_id TYPE TEXT COLLATE "C",
    ALTER COLUMN concurrency_key TYPE TEXT COLLATE "C",
    ALTER COLUMN idempotency_key TYPE TEXT COLLATE "C";
ALTER TABLE jobs
    ALTER COLUMN run_id TYPE TEXT COLLATE "C",
    ALTER COLUMN step_id TYPE TEXT COLLATE "C",
    ALTER COLUMN state TYPE TEXT COLLATE "C";
