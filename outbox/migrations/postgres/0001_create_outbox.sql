-- The outbox: messages written in the business transaction, relayed in seq
-- order per partition, marked delivered once the broker has acknowledged them.
CREATE TABLE troupe_outbox (
    seq          BIGSERIAL PRIMARY KEY,
    id           TEXT        NOT NULL,
    topic        TEXT        NOT NULL,
    subject      TEXT        NOT NULL DEFAULT '',
    partition    SMALLINT    NOT NULL,
    envelope     BYTEA       NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL,
    delivered_at TIMESTAMPTZ
);

-- What the relay reads: the pending rows of a partition, in seq order.
CREATE INDEX troupe_outbox_pending ON troupe_outbox (partition, seq) WHERE delivered_at IS NULL;

-- What retention deletes: delivered rows, oldest first.
CREATE INDEX troupe_outbox_delivered ON troupe_outbox (delivered_at) WHERE delivered_at IS NOT NULL;

-- Leases on partitions: a relay publishes a partition's rows only while it
-- holds the partition's unexpired lease.
CREATE TABLE troupe_outbox_leases (
    partition  SMALLINT    PRIMARY KEY,
    owner      TEXT        NOT NULL DEFAULT '',
    expires_at TIMESTAMPTZ NOT NULL
);

-- The relays alive, so that each can take its fair share of the partitions.
CREATE TABLE troupe_outbox_relays (
    owner      TEXT        PRIMARY KEY,
    expires_at TIMESTAMPTZ NOT NULL
);

-- Wake LISTENing relays at commit: NOTIFY in a transaction is delivered when
-- it commits, once per transaction for the same payload.
CREATE FUNCTION troupe_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('troupe_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER troupe_outbox_notify AFTER INSERT ON troupe_outbox
    FOR EACH STATEMENT EXECUTE FUNCTION troupe_outbox_notify();
