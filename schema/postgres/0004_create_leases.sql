-- Balances by lease (several nodes): a node admits a key only from the slice of its balance it
-- reserved here. `reserved_ms` is what every live lease of the license holds, so a slice is
-- granted only from `balance_ms - reserved_ms`. A flush takes what it charges off the node's
-- lease as it deducts it; a node gives its leases back when it stops, and its heartbeat renews
-- them: a lease not renewed past `expires_at` is given back by the next heartbeat of any node.
ALTER TABLE licenses ADD COLUMN reserved_ms bigint NOT NULL DEFAULT 0;

CREATE TABLE leases (
    license_id bigint NOT NULL REFERENCES licenses (id) ON DELETE CASCADE,
    node_id    text   NOT NULL,
    amount_ms  bigint NOT NULL CHECK (amount_ms >= 0),
    expires_at bigint NOT NULL,
    PRIMARY KEY (license_id, node_id)
);
CREATE INDEX leases_node ON leases (node_id);
CREATE INDEX leases_expires_at ON leases (expires_at);
