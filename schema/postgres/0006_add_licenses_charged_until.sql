-- One session across nodes (session metering): how far (wall clock, Unix ms) a license's
-- session time has been charged. A flush charges each license's session span only for the
-- time past it (the gap to it included when shorter than the idle timeout), and moves it on,
-- so requests of one key spread over several nodes are charged as one session. 0: never.
ALTER TABLE licenses ADD COLUMN charged_until bigint NOT NULL DEFAULT 0;
