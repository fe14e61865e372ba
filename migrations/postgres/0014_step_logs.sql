-- What a step printed (a script's output, a request and its status), per attempt, written with the
-- attempt's settlement and deleted with its run.
CREATE TABLE step_logs (
    id       BIGSERIAL PRIMARY KEY,
    run_id   TEXT COLLATE "C" NOT NULL,
    step_id  TEXT COLLATE "C" NOT NULL,
    attempt  INT NOT NULL,
    at       BIGINT NOT NULL,
    stream   TEXT NOT NULL,
    text     TEXT NOT NULL
);
CREATE INDEX step_logs_by_run ON step_logs (run_id, id);
