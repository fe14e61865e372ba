-- Priority (-100..100, default 0): among due jobs, higher priority is claimed first, equal
-- priority first in, first out. Every job carries its run's priority into its queue row. Nearly
-- every row has priority 0, so the claim keeps walking the primary key for those, and a partial
-- index holds only the others: a priority-0 row costs no more to write than before.
ALTER TABLE runs ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE job_queue ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0;
CREATE INDEX job_queue_ranked ON job_queue (priority DESC, run_after, job_id) WHERE priority <> 0;
