-- The job each nonce was given to, so a gap a finished job left below later transactions can be
-- filled (see `machine::fill_nonce_gap`). NULL for nonces given before this column existed, and
-- for steps run outside a job: those are never taken over.
ALTER TABLE chain_nonce_owners ADD COLUMN job_id INTEGER;
