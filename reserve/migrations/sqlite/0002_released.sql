-- A confirmed reservation whose resource has been used and given back (an
-- agent back from a delivery) is recorded released (Reserver.ReleaseTx).
-- SQLite cannot change a CHECK constraint: the table is rebuilt.
CREATE TABLE troupe_reservations_0002 (
    id         TEXT        PRIMARY KEY,
    pool       TEXT        NOT NULL,
    resource   TEXT        NOT NULL DEFAULT '',
    owner      TEXT        NOT NULL DEFAULT '',
    state      TEXT        NOT NULL CHECK (state IN ('held', 'confirmed', 'cancelled', 'expired', 'refused', 'released')),
    expires_at TIMESTAMP,
    created_at TIMESTAMP   NOT NULL,
    updated_at TIMESTAMP   NOT NULL
);
INSERT INTO troupe_reservations_0002 (id, pool, resource, owner, state, expires_at, created_at, updated_at)
    SELECT id, pool, resource, owner, state, expires_at, created_at, updated_at FROM troupe_reservations;
DROP TABLE troupe_reservations;
ALTER TABLE troupe_reservations_0002 RENAME TO troupe_reservations;
CREATE INDEX troupe_reservations_pool ON troupe_reservations (pool, created_at);
CREATE INDEX troupe_reservations_owner ON troupe_reservations (owner, created_at);
