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

-- The license's own key (`licenses.key_hash`, its first key or its oldest active one) is
-- mirrored here by the database itself, so a build from before keys, still running beside this
-- one during an upgrade (`tollgate reload`, a rolling upgrade), writes keys this build reads: a
-- license it creates gets its first key, and a rotation it makes replaces that key here and
-- moves the license's keys_version (this build then reads its cached keys again). A change this
-- build makes to the own key names a key already here, which the mirror leaves alone.
CREATE TRIGGER licenses_first_key AFTER INSERT ON licenses
BEGIN
    INSERT OR IGNORE INTO license_keys (license_id, key_hash, key_prefix, name, status,
                                        created_at, updated_at)
    VALUES (NEW.id, NEW.key_hash, NEW.key_prefix, 'default', 'active', NEW.created_at,
            NEW.updated_at);
END;

CREATE TRIGGER licenses_own_key_changed AFTER UPDATE OF key_hash ON licenses
WHEN NEW.key_hash IS NOT OLD.key_hash
BEGIN
    UPDATE license_keys SET key_hash = NEW.key_hash, key_prefix = NEW.key_prefix,
                            updated_at = NEW.updated_at
    WHERE license_id = NEW.id AND key_hash = OLD.key_hash
      AND NOT EXISTS (SELECT 1 FROM license_keys WHERE key_hash = NEW.key_hash);
    UPDATE licenses SET keys_version = keys_version + 1 WHERE id = NEW.id;
END;
