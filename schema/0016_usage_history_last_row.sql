-- A flush adds its usage to the license's last history row while that row is a usage row of
-- the last minute (or of the session still running), in the same plan period and UTC day
-- (gateway/src/store/usage.rs, `joins`): a license in steady use writes one row a minute, not
-- one a flush. The flush finds that row by this index (a license's rows by id, newest first).
CREATE INDEX usage_history_license_id ON usage_history (license_id, id);

-- Debits (time deducted by hand) by time, for the statistics, which show them on their own.
CREATE INDEX usage_history_debits ON usage_history (created_at) WHERE kind = 'debit';
