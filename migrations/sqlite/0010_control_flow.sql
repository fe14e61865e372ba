-- Control flow within a run (`when`, `run_if`, `on_failure`). A run whose workflow uses any of
-- them has `flow` set on every job: its steps move by `flow::advance`, which reads the run's
-- jobs, instead of by counting succeeded needs. `run_if` is NULL for the default rule
-- (`all_succeeded`). A skipped job keeps its reason in `error`.
ALTER TABLE jobs ADD COLUMN run_if TEXT;
ALTER TABLE jobs ADD COLUMN flow INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN on_failure INTEGER NOT NULL DEFAULT 0;
-- A `for_each` step parks while its items run: one job each (`loop_job_id` names the step's job,
-- `item_index` its place, `item` its value), `parallel` (on the step's job) at a time.
ALTER TABLE jobs ADD COLUMN loop_job_id INTEGER;
ALTER TABLE jobs ADD COLUMN item_index INTEGER;
ALTER TABLE jobs ADD COLUMN item TEXT;
ALTER TABLE jobs ADD COLUMN parallel INTEGER;
-- On the step's job, while its items run: how many have not succeeded, and the index the next
-- release starts from (items start in order), so a loop's progress reads only what it changes.
ALTER TABLE jobs ADD COLUMN items_left INTEGER;
ALTER TABLE jobs ADD COLUMN next_item INTEGER;
CREATE INDEX jobs_loop_items ON jobs (loop_job_id, item_index) WHERE loop_job_id IS NOT NULL;
