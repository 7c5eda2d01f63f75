-- Processes, not only nodes. Two processes may run under one `[cluster] node_id`: a restart
-- after a crash, and a graceful upgrade, which runs the old and the new side by side. Each
-- process has an incarnation of its own (its start time and a random tag), and owns only what
-- it made: its heartbeat row, its leases (renewed and given back by it alone, so a new process
-- never renews a dead one's, and a process that forgot its leases in an outage gives its rows
-- back before it leases again), its sessions (ended at start only when their process is gone),
-- and its flushes' sequence (a flush whose COMMIT got no answer is looked up by it).
ALTER TABLE cluster_nodes ADD COLUMN incarnation text NOT NULL DEFAULT '';
ALTER TABLE cluster_nodes DROP CONSTRAINT cluster_nodes_pkey;
ALTER TABLE cluster_nodes ADD PRIMARY KEY (node_id, incarnation);

ALTER TABLE leases ADD COLUMN incarnation text NOT NULL DEFAULT '';
ALTER TABLE leases DROP CONSTRAINT leases_pkey;
ALTER TABLE leases ADD PRIMARY KEY (license_id, node_id, incarnation);
DROP INDEX leases_node;
CREATE INDEX leases_process ON leases (node_id, incarnation);

ALTER TABLE usage_sessions ADD COLUMN node_id text, ADD COLUMN incarnation text;
CREATE INDEX usage_sessions_open ON usage_sessions (node_id, incarnation)
    WHERE ended_at IS NULL;

-- The last flush each process committed. A flush writes its row first, so a second look at
-- it (`INSERT … ON CONFLICT`) waits for the flush's transaction to end, and then tells
-- whether it committed.
CREATE TABLE flushes (
    node_id     text   NOT NULL,
    incarnation text   NOT NULL,
    seq         bigint NOT NULL,
    at          bigint NOT NULL,
    PRIMARY KEY (node_id, incarnation)
);

-- Changes are stamped on the database's clock, whatever the writer's reads, so the poll that
-- backs the change notices (`updated_at >= since`, on the same clock) misses none made by a
-- process whose clock is behind.
CREATE FUNCTION tollgate_stamp_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.updated_at IS DISTINCT FROM OLD.updated_at THEN
        NEW.updated_at := (extract(epoch FROM clock_timestamp()) * 1000)::bigint;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER licenses_stamp_changes BEFORE INSERT OR UPDATE ON licenses
    FOR EACH ROW EXECUTE FUNCTION tollgate_stamp_change();
