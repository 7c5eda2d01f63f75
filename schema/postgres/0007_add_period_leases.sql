-- Period allowances by lease (several nodes): a node admits a key on a plan with a period
-- allowance (time or requests) only from the slice of it that the node reserved here, as it
-- does from its balance. The license keeps what its current plan period used (`period_start`,
-- Unix ms, as the nodes' calendar computes it; counted by the flushes, by commit time as the
-- usage history is) and what the leases of that period hold; a lease request for a newer
-- period counts the period again from the usage history and voids the old period's slices.
ALTER TABLE licenses
    ADD COLUMN period_start bigint NOT NULL DEFAULT 0,
    ADD COLUMN period_used_ms bigint NOT NULL DEFAULT 0,
    ADD COLUMN period_requests bigint NOT NULL DEFAULT 0,
    ADD COLUMN period_reserved_ms bigint NOT NULL DEFAULT 0,
    ADD COLUMN period_reserved_requests bigint NOT NULL DEFAULT 0;

ALTER TABLE leases
    ADD COLUMN period_ms bigint NOT NULL DEFAULT 0 CHECK (period_ms >= 0),
    ADD COLUMN period_requests bigint NOT NULL DEFAULT 0 CHECK (period_requests >= 0);

-- Every flush, lease and change rewrites license rows: leave room on each page so the new
-- version stays on it (a HOT update, no index entries, no extending the table under load).
ALTER TABLE licenses SET (fillfactor = 70);
