-- A scheduled fire whose run cannot start (its input fails the workflow's input_schema) is a
-- failure without a run: its alert (kind `fire_refused`) has no run id.
ALTER TABLE alerts ALTER COLUMN run_id DROP NOT NULL;
