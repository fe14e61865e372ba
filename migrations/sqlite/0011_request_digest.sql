-- What a start under an idempotency key asked for (a digest of its input as sent, before the
-- workflow's defaults): the same key with another request is refused.
ALTER TABLE runs ADD COLUMN request_digest TEXT;
