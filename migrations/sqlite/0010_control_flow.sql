-- Control flow within a run (`when`, `run_if`, `on_failure`). A run whose workflow uses any of
-- them has `flow` set on every job: its steps move by `flow::advance`, which reads the run's
-- jobs, instead of by counting succeeded needs. `run_if` is NULL for the default rule
-- (`all_succeeded`). A skipped job keeps its reason in `error`.
ALTER TABLE jobs ADD COLUMN run_if TEXT;
ALTER TABLE jobs ADD COLUMN flow INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN on_failure INTEGER NOT NULL DEFAULT 0;
