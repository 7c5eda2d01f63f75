-- Usage sessions: rewritten with absolute values at each flush while open; `ended_at` is set
-- once the session idles out.
CREATE TABLE usage_sessions (
    id               TEXT    PRIMARY KEY,
    license_id       INTEGER NOT NULL REFERENCES licenses (id),
    started_at       INTEGER NOT NULL,
    last_activity_at INTEGER NOT NULL,
    ended_at         INTEGER,
    charged_ms       INTEGER NOT NULL DEFAULT 0,
    requests         INTEGER NOT NULL DEFAULT 0,
    bytes_in         INTEGER NOT NULL DEFAULT 0,
    bytes_out        INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX usage_sessions_license_time ON usage_sessions (license_id, started_at);
