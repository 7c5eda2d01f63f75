-- Which of its license's keys a request presented (`license_keys.id`; none: a guest, a refusal
-- without a known key, or a row from before keys): a team's use split by key.
ALTER TABLE access_logs ADD COLUMN key_id INTEGER;
