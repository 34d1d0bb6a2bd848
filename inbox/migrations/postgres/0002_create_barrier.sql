-- The saga participant's barrier (Inbox.BarrierTx): one row per side of a
-- saga step that a participant has done or ruled out. The primary key
-- serializes a step's action and compensation: the second to insert the
-- same key waits for the first's transaction, then sees its row.
--
-- op is the side the row stands for ('action' or 'compensation'); origin is
-- the side whose call inserted it. An 'action' row with origin
-- 'compensation' records that the compensation came first: the step's
-- action is then refused whenever it arrives.
CREATE TABLE troupe_barrier (
    saga_id    TEXT        NOT NULL,
    step       TEXT        NOT NULL,
    op         TEXT        NOT NULL CHECK (op IN ('action', 'compensation')),
    origin     TEXT        NOT NULL CHECK (origin IN ('action', 'compensation')),
    created_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (saga_id, step, op)
);
