-- The files steps made (engine/src/artifacts.rs), by reference: a row per file an accepted
-- attempt named in its output, written with its settlement and deleted with its run. The bytes
-- are outside the database, stored once under their SHA-256.
CREATE TABLE artifacts (
    id           TEXT PRIMARY KEY,
    run_id       TEXT NOT NULL,
    step_id      TEXT NOT NULL,
    attempt      INT NOT NULL,
    sha256       TEXT NOT NULL,
    size         BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX artifacts_by_run ON artifacts (run_id);
CREATE INDEX artifacts_by_sha256 ON artifacts (sha256);
