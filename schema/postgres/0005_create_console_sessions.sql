-- The console's sign-ins where several nodes share the database, so any node serves a
-- signed-in browser: the SHA-256 digest of each session id (never the id), and when it
-- expires; and a key just made for a license, waiting to be shown once, sealed with the
-- session id (which only the browser has).
CREATE TABLE console_sessions (
    digest     bytea  PRIMARY KEY,
    expires_at bigint NOT NULL
);
CREATE INDEX console_sessions_expires_at ON console_sessions (expires_at);

CREATE TABLE console_keys (
    session_digest bytea  NOT NULL REFERENCES console_sessions (digest) ON DELETE CASCADE,
    license_id     bigint NOT NULL,
    sealed         bytea  NOT NULL,
    PRIMARY KEY (session_digest)
);
