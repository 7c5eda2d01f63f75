-- A flush adds its usage to the license's last history row while that row is a usage row of
-- the last minute (or of the session still running), in the same plan period and UTC day
-- (gateway/src/store/usage.rs, `joins`): a license in steady use writes one row a minute, not
-- one a flush. The flush finds that row by this index (a license's rows by id, newest first).
CREATE INDEX usage_history_license_id ON usage_history (license_id, id);
