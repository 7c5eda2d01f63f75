-- Keyless requests in guest mode are logged with the guest's id (client address or
-- X-Guest-ID) and no license.
ALTER TABLE access_logs ADD COLUMN guest_id TEXT;
