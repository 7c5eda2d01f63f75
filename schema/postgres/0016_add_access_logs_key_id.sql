-- Which of its license's keys a request presented (as schema/0021_add_access_logs_key_id.sql).
ALTER TABLE access_logs ADD COLUMN key_id bigint;
