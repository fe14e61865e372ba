-- Where each version came from: definition files (`file`) or the API (`api`). On start, a file
-- that has not changed since it was last installed leaves a newer API version in place.
ALTER TABLE workflow_versions ADD COLUMN origin TEXT NOT NULL DEFAULT 'file';
