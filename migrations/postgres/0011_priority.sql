-- Priority (-100..100, default 0): among due jobs, higher priority is claimed first, equal
-- priority first in, first out. Every job carries its run's priority into its queue row, and the
-- queue is keyed by it, so each part of the claim (above 0, 0, below 0) reads a range of due
-- rows and nothing else. `job_queue_ranked` holds only rows whose priority is not 0, in claim
-- order, for the first and last parts.
ALTER TABLE runs ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE job_queue ADD COLUMN priority SMALLINT NOT NULL DEFAULT 0;
ALTER TABLE job_queue DROP CONSTRAINT job_queue_pkey;
ALTER TABLE job_queue ADD PRIMARY KEY (priority, run_after, job_id);
CREATE INDEX job_queue_ranked ON job_queue (priority DESC, run_after, job_id) WHERE priority <> 0;
