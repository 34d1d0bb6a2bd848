-- The outbox: messages written in the business transaction, relayed in seq
-- order per partition, marked delivered once the broker has acknowledged them.
CREATE TABLE troupe_outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT      NOT NULL,
    topic        TEXT      NOT NULL,
    subject      TEXT      NOT NULL DEFAULT '',
    partition    INTEGER   NOT NULL,
    envelope     BLOB      NOT NULL,
    created_at   TIMESTAMP NOT NULL,
    delivered_at TIMESTAMP
);

-- What the relay reads: the pending rows of a partition, in seq order.
CREATE INDEX troupe_outbox_pending ON troupe_outbox (partition, seq) WHERE delivered_at IS NULL;

-- What retention deletes: delivered rows, oldest first.
CREATE INDEX troupe_outbox_delivered ON troupe_outbox (delivered_at) WHERE delivered_at IS NOT NULL;

-- Leases on partitions: a relay publishes a partition's rows only while it
-- holds the partition's unexpired lease.
CREATE TABLE troupe_outbox_leases (
    partition  INTEGER   PRIMARY KEY,
    owner      TEXT      NOT NULL DEFAULT '',
    expires_at TIMESTAMP NOT NULL
);

-- The relays alive, so that each can take its fair share of the partitions.
CREATE TABLE troupe_outbox_relays (
    owner      TEXT      PRIMARY KEY,
    expires_at TIMESTAMP NOT NULL
);
