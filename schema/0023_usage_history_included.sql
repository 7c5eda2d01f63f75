-- What a plan includes each period (`[[plans]] included_minutes`): a usage row's time taken
-- from (or, negative, given back to) the plan's included allowance rather than the prepaid
-- balance. `delta_ms` stays the balance's change, so the balances still chain; a row's time is
-- `-delta_ms - priced_ms + included_ms`, and a period's use of its allowance is the sum of
-- `included_ms` over the period's rows.
ALTER TABLE usage_history ADD COLUMN included_ms INTEGER NOT NULL DEFAULT 0;
