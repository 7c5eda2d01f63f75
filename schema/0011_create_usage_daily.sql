-- Analytics rollups, kept by the flusher in the flush transaction so that questions about a
-- license or the whole system over days never scan access_logs or usage_history.
--
-- access_daily gains a latency histogram: h0..h13 count requests by duration, with upper
-- bounds of 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000 and 10000 ms, and h13 for
-- anything longer (gateway/src/store/flush.rs, LATENCY_BOUNDS_US). Rows with license_id 0 are
-- guests (keyless requests in guest mode), all together.
ALTER TABLE access_daily ADD COLUMN h0 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE access_daily ADD COLUMN h1 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE access_daily ADD COLUMN h2 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE access_daily ADD COLUMN h3 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE access_daily ADD COLUMN h4 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE access_daily ADD COLUMN h5 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE access_daily ADD COLUMN h6 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE access_daily ADD COLUMN h7 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE access_daily ADD COLUMN h8 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE access_daily ADD COLUMN h9 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE access_daily ADD COLUMN h10 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE access_daily ADD COLUMN h11 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE access_daily ADD COLUMN h12 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE access_daily ADD COLUMN h13 INTEGER NOT NULL DEFAULT 0;
CREATE INDEX access_daily_day ON access_daily (day);

-- Time charged and requests counted per license and UTC day (from the usage history).
CREATE TABLE usage_daily (
    license_id INTEGER NOT NULL,
    day        INTEGER NOT NULL, -- days since 1970-01-01 (UTC)
    charged_ms INTEGER NOT NULL,
    requests   INTEGER NOT NULL,
    PRIMARY KEY (license_id, day)
) WITHOUT ROWID;

CREATE INDEX usage_daily_day ON usage_daily (day);

INSERT INTO usage_daily (license_id, day, charged_ms, requests)
SELECT license_id, created_at / 86400000, sum(-delta_ms), sum(requests)
FROM usage_history WHERE kind = 'usage' GROUP BY license_id, created_at / 86400000;
