-- Timers: a message (or an HTTP call) to deliver at due_at. A timer that
-- fires into the outbox or a local handler is deleted in the transaction
-- that applies its effect, so it fires once. An HTTP task is leased by
-- moving due_at forward by the lease and counting the attempt; the attempt
-- count fences a lease that was taken over.
CREATE TABLE troupe_timers (
    id         TEXT        PRIMARY KEY,
    kind       SMALLINT    NOT NULL,             -- 1 topic (outbox), 2 handler (local), 3 http
    target     TEXT        NOT NULL DEFAULT '',  -- the topic or the handler's name; '' for http
    due_at     TIMESTAMPTZ NOT NULL,
    payload    BYTEA       NOT NULL,             -- the message envelope (kinds 1, 2) or the HTTP task (3)
    schedule   TEXT        NOT NULL DEFAULT '',  -- the recurring schedule that made it, if any
    attempts   INTEGER     NOT NULL DEFAULT 0,
    last_error TEXT        NOT NULL DEFAULT '',
    failed_at  TIMESTAMPTZ,                      -- set when the timer gave up: kept for an operator
    created_at TIMESTAMPTZ NOT NULL
);

-- What the firing loop reads: pending timers fired in a transaction, due first.
CREATE INDEX troupe_timers_due ON troupe_timers (due_at, id) WHERE failed_at IS NULL AND kind < 3;

-- What the HTTP loop reads: pending HTTP tasks, due first.
CREATE INDEX troupe_timers_http_due ON troupe_timers (due_at, id) WHERE failed_at IS NULL AND kind = 3;

-- Failure records, newest first.
CREATE INDEX troupe_timers_failed ON troupe_timers (failed_at) WHERE failed_at IS NOT NULL;

-- The pending occurrence of each recurring schedule.
CREATE INDEX troupe_timers_schedule ON troupe_timers (schedule) WHERE schedule <> '';

-- Recurring schedules: each keeps one pending timer for its next occurrence;
-- firing it inserts the following one in the same transaction.
CREATE TABLE troupe_schedules (
    name       TEXT        PRIMARY KEY,
    definition BYTEA       NOT NULL,  -- the Schedule, as JSON
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
