-- Usage alerts on a meter's period allowance (`period_units`): their kind is the limit's
-- name, `period_units.<meter>`. A wider check: nodes of the previous build write none of
-- these, and their kinds still pass.
ALTER TABLE usage_alerts DROP CONSTRAINT usage_alerts_kind_check;
ALTER TABLE usage_alerts ADD CONSTRAINT usage_alerts_kind_check
    CHECK (kind IN ('period_time', 'period_requests', 'balance') OR kind LIKE 'period_units.%');
