-- As schema/0023_usage_history_included.sql: a usage row's time taken from a plan's included
-- allowance rather than the prepaid balance (plans that include time are not yet supported on
-- PostgreSQL, so this stays 0 here; the column keeps the stores' exports alike).
ALTER TABLE usage_history ADD COLUMN included_ms bigint NOT NULL DEFAULT 0;
