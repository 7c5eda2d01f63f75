-- The nodes sharing this database. A node writes its row when it starts and at every heartbeat,
-- and deletes it when it stops; a row whose heartbeat is older than cluster.node_timeout_ms is a
-- node that died.
CREATE TABLE cluster_nodes (
    node_id      text   PRIMARY KEY,
    proxy        text   NOT NULL,
    admin        text   NOT NULL,
    version      text   NOT NULL,
    started_at   bigint NOT NULL,
    heartbeat_at bigint NOT NULL
);
