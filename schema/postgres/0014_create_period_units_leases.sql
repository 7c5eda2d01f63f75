-- A meter's period allowance (`period_units`) by lease (several nodes), as the period's time
-- and requests are (0007): a node admits a priced request only from the slice of each of its
-- meters' allowances it reserved here, so the nodes together never reserve past the cap.
--
-- A row per license and meter: the period it counts (its start, as the nodes' calendar
-- computes it) and what every committed flush used of it (counted by the flushes, by commit
-- time as `usage_units` is; a lease for a newer period counts it again from `usage_units`).
-- What the leases hold of it is the sum of their `lease_units` rows, read with the license
-- locked: no second count to drift.
CREATE TABLE period_units (
    license_id   bigint NOT NULL REFERENCES licenses (id) ON DELETE CASCADE,
    meter        text   NOT NULL,
    period_start bigint NOT NULL,
    used         bigint NOT NULL,
    PRIMARY KEY (license_id, meter)
);

-- A lease's slice of a meter's allowance in the license's period; given back with its lease.
CREATE TABLE lease_units (
    license_id bigint NOT NULL,
    node_id    text   NOT NULL,
    meter      text   NOT NULL,
    units      bigint NOT NULL CHECK (units >= 0),
    PRIMARY KEY (license_id, node_id, meter),
    FOREIGN KEY (license_id, node_id) REFERENCES leases (license_id, node_id) ON DELETE CASCADE
);
