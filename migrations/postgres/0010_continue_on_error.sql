-- A step with `continue_on_error`: a failure for good ends it succeeded, with its error recorded
-- and `{error}` as its output, and its dependents run. The sweep and a failing child run read it
-- here, where no worker decides.
ALTER TABLE jobs ADD COLUMN continue_on_error BOOLEAN NOT NULL DEFAULT false;
