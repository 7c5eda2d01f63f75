-- One session across nodes by the sessions' spans (store::session_time): a license's charged
-- session time is the union of its sessions' spans (started_at to last_activity_at), holes up
-- to the idle timeout filled, and a flush is charged what its spans change of it. One
-- watermark per license (`charged_until`) could not say which time a failed request made the
-- database charge, so a give-back returned time no flush had charged. This build no longer
-- reads or writes it; it stays for a process of the build before, still running beside this
-- one during a graceful upgrade, and goes in a later migration.
-- A flush reads the spans near the ones it writes: by license and end.
CREATE INDEX usage_sessions_license_activity ON usage_sessions (license_id, last_activity_at);
