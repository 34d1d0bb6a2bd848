-- Several statements in one migration, applied together or not at all.
CREATE TABLE transfers (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    from_id BIGINT NOT NULL REFERENCES accounts (id),
    to_id   BIGINT NOT NULL REFERENCES accounts (id),
    amount  BIGINT NOT NULL CHECK (amount > 0)
);
CREATE INDEX transfers_from_id ON transfers (from_id);
INSERT INTO accounts (id, owner, balance) VALUES (1, 'bank', 1000);
