-- A key's own expiry and limits, and the per-key daily rollup (as
-- schema/0022_key_limits_and_daily.sql).
ALTER TABLE license_keys ADD COLUMN expires_at bigint;
ALTER TABLE license_keys ADD COLUMN requests_per_second bigint;
ALTER TABLE license_keys ADD COLUMN max_concurrent bigint;
ALTER TABLE license_keys ADD COLUMN max_seconds_per_day bigint;

CREATE TABLE key_daily (
    key_id      bigint NOT NULL,
    day         bigint NOT NULL,
    license_id  bigint NOT NULL,
    calls       bigint NOT NULL,
    ok          bigint NOT NULL,
    duration_us bigint NOT NULL,
    last_at     bigint NOT NULL,
    PRIMARY KEY (key_id, day)
);
CREATE INDEX key_daily_license ON key_daily (license_id, day);
