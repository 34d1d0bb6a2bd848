-- The state of each branch of the parallel group in progress, as JSON by
-- branch name ({"credit": {"status": "sent", "attempt": 1}, ...}); '' when
-- the current step is no group in progress. Rows written before keep ''.
ALTER TABLE troupe_sagas ADD COLUMN branches TEXT NOT NULL DEFAULT '';

-- A participant's answers to actions it got over HTTP (saga.Participant's
-- HTTPHandler), kept with the barrier's row in the same transaction: a
-- repeated call (same saga, step) is answered as the first, data included.
CREATE TABLE troupe_saga_replies (
    saga_id    TEXT        NOT NULL,
    step       TEXT        NOT NULL,
    outcome    TEXT        NOT NULL,             -- success or failure
    reason     TEXT        NOT NULL DEFAULT '',  -- a failure's reason
    data       BLOB,                             -- a success's reply data, as JSON (NULL for none)
    created_at TIMESTAMP   NOT NULL,
    PRIMARY KEY (saga_id, step)
);
