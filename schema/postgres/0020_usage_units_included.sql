-- As schema/0025_usage_units_included.sql: a flush's units of a meter the plan's included
-- allowance paid for; `charged_ms` is what the balance paid for the rest.
ALTER TABLE usage_units ADD COLUMN included_units bigint NOT NULL DEFAULT 0;
