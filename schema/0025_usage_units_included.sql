-- What a plan includes each period (`[[plans]] included_units`, `included_requests`): a flush's
-- units of a meter the plan's allowance paid for. `charged_ms` is what the balance paid for
-- the row's units (the units not included, at the meter's price), and a usage row's
-- `priced_ms` what the balance paid for prices: what the plan paid is taken off both.
ALTER TABLE usage_units ADD COLUMN included_units INTEGER NOT NULL DEFAULT 0;
