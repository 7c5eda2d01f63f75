-- The daily upload cap (`max_upload_bytes_per_day`): request-body bytes of charged requests per
-- license and UTC day, kept with the day's time and requests by the flush, and read back when a
-- key is first seen so that a restart starts from the day's count. Existing days start at 0.
ALTER TABLE usage_daily ADD COLUMN bytes_in INTEGER NOT NULL DEFAULT 0;
ALTER TABLE plans ADD COLUMN max_upload_bytes_per_day INTEGER;
