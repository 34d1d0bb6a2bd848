-- One row per message handled by a consumer group: its presence is what
-- makes a redelivered message a duplicate. A message is identified by its
-- source and id, as CloudEvents defines.
CREATE TABLE troupe_inbox (
    consumer   TEXT      NOT NULL,
    message_id TEXT      NOT NULL,
    source     TEXT      NOT NULL,
    handled_at TIMESTAMP NOT NULL,
    PRIMARY KEY (consumer, message_id, source)
) WITHOUT ROWID;

-- Retention deletes by age.
CREATE INDEX troupe_inbox_handled_at ON troupe_inbox (handled_at);
