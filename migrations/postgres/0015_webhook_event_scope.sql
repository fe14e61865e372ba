-- A webhook event id is unique per source and scope: runs a sender starts share one scope (''),
-- while each step it answers has its own (`run/step`), so that an answer reusing the id of a
-- delivery that started a run still reaches its step.
ALTER TABLE webhook_events ADD COLUMN scope TEXT NOT NULL DEFAULT '';
ALTER TABLE webhook_events DROP CONSTRAINT webhook_events_source_event_id_key;
CREATE UNIQUE INDEX webhook_events_once ON webhook_events (source, scope, event_id);
-- Answers logged before scopes existed keep a scope of their own, apart from the starts.
UPDATE webhook_events SET scope = 'answer' WHERE payload ? 'callback';
