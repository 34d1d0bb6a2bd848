-- Saga instances, each a persistent state machine owned by this service.
CREATE TABLE troupe_sagas (
    id          TEXT        PRIMARY KEY,
    name        TEXT        NOT NULL,
    version     INTEGER     NOT NULL,
    status      TEXT        NOT NULL,             -- running, compensating, completed, compensated, parked
    step        INTEGER     NOT NULL,             -- the step in progress (running) or being undone (compensating)
    awaiting    TEXT        NOT NULL DEFAULT '',  -- '', 'action' or 'compensation': a reply is awaited for step
    attempt     INTEGER     NOT NULL DEFAULT 0,   -- sends of the awaited command
    data        BYTEA       NOT NULL,             -- the saga's data, as JSON
    reason      TEXT        NOT NULL DEFAULT '',  -- why it compensates, or is parked
    history_seq INTEGER     NOT NULL DEFAULT 0,
    created_at  TIMESTAMPTZ NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL
);

-- Listing by status (unfinished, parked), oldest first.
CREATE INDEX troupe_sagas_status ON troupe_sagas (status, updated_at);

-- Every transition of every saga, for the dashboard and the CLI.
CREATE TABLE troupe_saga_history (
    saga_id TEXT        NOT NULL,
    seq     INTEGER     NOT NULL,
    step    TEXT        NOT NULL,
    op      TEXT        NOT NULL,
    attempt INTEGER     NOT NULL,
    event   TEXT        NOT NULL,
    detail  TEXT        NOT NULL DEFAULT '',
    at      TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (saga_id, seq)
);
