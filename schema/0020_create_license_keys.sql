-- A license's keys: the license stays the account (balance, plan, allowances, usage, payments);
-- each of its keys opens it, and is revoked or rotated on its own. The key itself is never
-- stored, only its SHA-256 and a display prefix. Every license's key until now becomes its
-- first key, named "default". `licenses.key_hash` keeps that first key's hash (the license's
-- own key, as `keys rotate ID` without `--key` and older readers know it).
CREATE TABLE license_keys (
    id           INTEGER PRIMARY KEY,
    license_id   INTEGER NOT NULL REFERENCES licenses (id),
    key_hash     BLOB    NOT NULL UNIQUE,
    key_prefix   TEXT    NOT NULL,
    name         TEXT    NOT NULL,
    status       TEXT    NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_at   INTEGER NOT NULL,
    updated_at   INTEGER NOT NULL
);
CREATE INDEX license_keys_license ON license_keys (license_id);

-- Grows with every change to a license's keys (one added, revoked or rotated), as `version`
-- grows with every change to the row: a node holding a key in memory checks it against this,
-- and reads the key again when it has moved on.
ALTER TABLE licenses ADD COLUMN keys_version INTEGER NOT NULL DEFAULT 0;

INSERT INTO license_keys (license_id, key_hash, key_prefix, name, status, created_at, updated_at)
SELECT id, key_hash, key_prefix, 'default', 'active', created_at, updated_at
FROM licenses ORDER BY id;
