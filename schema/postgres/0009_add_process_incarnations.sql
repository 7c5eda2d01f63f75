-- Processes, not only nodes. Two processes may run under one `[cluster] node_id`: a restart
-- after a crash, and a graceful upgrade, which runs the old and the new side by side. Each
-- process has an incarnation of its own (its start time and a random tag), and where this
-- build writes a node id (cluster_nodes, leases, and now usage_sessions and flushes) it writes
-- `<node_id>#<incarnation>`, so each process owns only what it made: its heartbeat row, its
-- leases (renewed and given back by it alone, so a new process never renews a dead one's,
-- and a process that forgot its leases in an outage gives its rows back before it leases
-- again), its sessions (ended only when their process is gone) and its flushes' sequence (a
-- flush whose COMMIT got no answer is looked up by it). The keys stay as they were, so a
-- process of the build before, running beside this one during a graceful upgrade, goes on
-- writing under its plain node id.
ALTER TABLE usage_sessions ADD COLUMN node_id text;
CREATE INDEX usage_sessions_open ON usage_sessions (node_id) WHERE ended_at IS NULL;

-- The last flush each process committed. A flush writes its row first, so a second look at
-- it (`INSERT … ON CONFLICT`) waits for the flush's transaction to end, and then tells
-- whether it committed.
CREATE TABLE flushes (
    node_id text   PRIMARY KEY,
    seq     bigint NOT NULL,
    at      bigint NOT NULL
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

-- How the database meters, one way for every process on it: session time is charged by the
-- union of every process's spans (store::session_time), which only means one thing if every
-- process fills the same holes. The first process to start writes its config's; the others
-- use these, and `tollgate migrate` changes them while no process runs.
CREATE TABLE metering_settings (
    id              integer PRIMARY KEY CHECK (id = 1),
    mode            text    NOT NULL,
    idle_timeout_ms bigint  NOT NULL,
    set_at          bigint  NOT NULL
);
