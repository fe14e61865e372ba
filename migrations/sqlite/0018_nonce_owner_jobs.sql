-- The job each nonce was given to, so a gap a finished job left below later transactions can be
-- filled (see `machine::fill_nonce_gap`). NULL for nonces given before this column existed, and
-- for steps run outside a job: those are never filled.
ALTER TABLE chain_nonce_owners ADD COLUMN job_id INTEGER;

-- The step filling each gap. The nonce keeps its holder, who is given another only once the
-- filler's transaction is seen mined (see `machine::allocate_nonce`).
CREATE TABLE chain_nonce_fills (
    chain_id  INTEGER NOT NULL,
    address   TEXT NOT NULL,
    nonce     INTEGER NOT NULL,
    job_id    INTEGER NOT NULL,
    filled_at INTEGER NOT NULL,
    hash      TEXT,  -- the filler's transaction, once signed
    PRIMARY KEY (chain_id, address, nonce)
);
