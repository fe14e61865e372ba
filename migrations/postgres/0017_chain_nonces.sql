-- The nonce allocator of `chain` steps, shared by every worker on the database (see
-- `machine::allocate_nonce`): per account (chain, sender address), the next nonce to give.
CREATE TABLE chain_nonces (
    chain_id   BIGINT NOT NULL,
    address    TEXT COLLATE "C" NOT NULL,  -- 0x and 40 lowercase hex digits
    next_nonce BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (chain_id, address)
);

-- The nonce each step (owner: `run:step[index]`, stable across attempts) was given, so an attempt
-- after a crash signs with the same one. A nonce of an account is given once: the unique key
-- refuses a second owner. Rows are kept: a run retried after any time must find
-- the nonce its step was given, or it would sign a second transaction.
CREATE TABLE chain_nonce_owners (
    chain_id     BIGINT NOT NULL,
    address      TEXT COLLATE "C" NOT NULL,
    owner        TEXT COLLATE "C" NOT NULL,
    nonce        BIGINT NOT NULL,
    allocated_at BIGINT NOT NULL,
    PRIMARY KEY (chain_id, address, owner),
    UNIQUE (chain_id, address, nonce)
);
CREATE INDEX chain_nonce_owners_by_age ON chain_nonce_owners (allocated_at);
