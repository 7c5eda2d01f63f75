-- Units the app reports (`[[meters]]`), charged at their prices on `reported` routes.
--
-- A usage row's charge may hold prices as well as time (a `fixed` route's price, the meters'
-- prices): `priced_ms` is that part, so a plan period's time allowance counts time only.
ALTER TABLE usage_history ADD COLUMN priced_ms INTEGER NOT NULL DEFAULT 0;

-- Each flush's units, a row per license and meter it charged: a period's allowance of a meter
-- (`period_units`) is summed from these, and so are the daily figures.
CREATE TABLE usage_units (
    id         INTEGER PRIMARY KEY,
    license_id INTEGER NOT NULL,
    meter      TEXT    NOT NULL,
    units      INTEGER NOT NULL,
    charged_ms INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX usage_units_license ON usage_units (license_id, created_at);

-- Which route a request was on (`[[routes]]` path; none: no route) and what it was charged
-- in units (`name=value, …`).
ALTER TABLE access_logs ADD COLUMN route TEXT;
ALTER TABLE access_logs ADD COLUMN units TEXT;
