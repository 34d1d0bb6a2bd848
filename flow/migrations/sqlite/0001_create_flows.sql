-- Flows: one row per correlation id, derived from the flow's recorded
-- messages. Status is running, completed or failed; stalled is derived at
-- read time from the definition's deadline.
CREATE TABLE troupe_flows (
    id         TEXT        PRIMARY KEY,          -- the correlation id
    name       TEXT        NOT NULL,             -- the definition's name
    status     TEXT        NOT NULL,             -- running, completed, failed
    reason     TEXT        NOT NULL DEFAULT '',  -- why it failed; notes on contradicting ends
    started_at TIMESTAMP   NOT NULL,             -- time of its earliest message
    updated_at TIMESTAMP   NOT NULL,             -- when a message was last recorded, by the tracker's clock
    ended_at   TIMESTAMP,                        -- time of the message that ended it
    events     INTEGER     NOT NULL              -- messages recorded
);

-- Listing by status (running, stalled), oldest first; by name and status.
CREATE INDEX troupe_flows_status ON troupe_flows (status, started_at);
CREATE INDEX troupe_flows_name ON troupe_flows (name, status, started_at);

-- Every message recorded, once per (source, id): a flow's history.
CREATE TABLE troupe_flow_events (
    source       TEXT        NOT NULL,
    message_id   TEXT        NOT NULL,
    flow_id      TEXT        NOT NULL,  -- the correlation id
    definition   TEXT        NOT NULL,  -- the definition declaring the type, or ''
    role         TEXT        NOT NULL,  -- start, step, complete, fail, or ''
    type         TEXT        NOT NULL,
    subject      TEXT        NOT NULL,
    causation_id TEXT        NOT NULL,
    msg_time     TIMESTAMP   NOT NULL,  -- the message's time (the recording time if it has none)
    recorded_at  TIMESTAMP   NOT NULL,
    PRIMARY KEY (source, message_id)
);

CREATE INDEX troupe_flow_events_flow ON troupe_flow_events (flow_id, msg_time);
