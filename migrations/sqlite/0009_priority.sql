-- Priority (-100..100, default 0): among due jobs, higher priority is claimed first, equal
-- priority first in, first out. Nearly every job has priority 0: the claim walks
-- `jobs_claimable` for those (now with the priority in it, so it reads no row to tell), and a
-- partial index holds only the others, so a priority-0 job costs no more to write than before.
ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
DROP INDEX jobs_claimable;
CREATE INDEX jobs_claimable ON jobs (run_after, id, priority)
    WHERE state IN ('available', 'retrying', 'parked');
CREATE INDEX jobs_claimable_ranked ON jobs (priority DESC, run_after, id)
    WHERE state IN ('available', 'retrying', 'parked') AND priority <> 0;
