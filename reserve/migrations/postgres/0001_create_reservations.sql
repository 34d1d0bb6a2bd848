-- Individual resources (a food packet, a delivery agent) in pools (the
-- packets of one dish, the agents). A resource is free, held by one
-- reservation until it is confirmed, cancelled or expires, or assigned to
-- the owner of a confirmed reservation. Try takes a free row with a
-- conditional UPDATE, so two reservations never hold the same resource.
CREATE TABLE troupe_resources (
    pool        TEXT        NOT NULL,
    id          TEXT        NOT NULL,
    state       TEXT        NOT NULL DEFAULT 'free' CHECK (state IN ('free', 'held', 'assigned')),
    reservation TEXT        NOT NULL DEFAULT '',  -- the holding reservation; '' when free
    owner       TEXT        NOT NULL DEFAULT '',  -- its owner (an order); '' when free
    updated_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (pool, id),
    CHECK ((state = 'free') = (reservation = ''))
);

-- What Try looks for: a pool's free resources, in id order.
CREATE INDEX troupe_resources_free ON troupe_resources (pool, id) WHERE state = 'free';

-- A reservation holds at most one resource.
CREATE UNIQUE INDEX troupe_resources_reservation ON troupe_resources (reservation) WHERE reservation <> '';

-- Reservations, kept after they end: a repeated Try, Confirm or Cancel reads
-- its answer here, and a Cancel that came before its Try leaves a row that
-- refuses the late Try.
CREATE TABLE troupe_reservations (
    id         TEXT        PRIMARY KEY,
    pool       TEXT        NOT NULL,               -- '' for a Cancel that came first
    resource   TEXT        NOT NULL DEFAULT '',    -- the resource it held; '' if none
    owner      TEXT        NOT NULL DEFAULT '',
    state      TEXT        NOT NULL CHECK (state IN ('held', 'confirmed', 'cancelled', 'expired', 'refused')),
    expires_at TIMESTAMPTZ,                        -- NULL for a Cancel that came first
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);

-- Listing for operators: by pool or owner, oldest first.
CREATE INDEX troupe_reservations_pool ON troupe_reservations (pool, created_at);
CREATE INDEX troupe_reservations_owner ON troupe_reservations (owner, created_at);
