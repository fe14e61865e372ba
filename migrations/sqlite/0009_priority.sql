-- Priority (-100..100, default 0): among due jobs, higher priority is claimed first, equal
-- priority first in, first out. `jobs_claimable` is keyed by priority, so each part of the claim
-- (above 0, 0, below 0) reads a range of due rows and nothing else; `jobs_claimable_ranked` holds
-- only jobs whose priority is not 0, in claim order, for the first and last parts.
ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
DROP INDEX jobs_claimable;
CREATE INDEX jobs_claimable ON jobs (priority, run_after, id)
    WHERE state IN ('available', 'retrying', 'parked');
CREATE INDEX jobs_claimable_ranked ON jobs (priority DESC, run_after, id)
    WHERE state IN ('available', 'retrying', 'parked') AND priority <> 0;
