-- Several statements in one migration, applied together or not at all.
CREATE TABLE transfers (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    from_id INTEGER NOT NULL REFERENCES accounts (id),
    to_id   INTEGER NOT NULL REFERENCES accounts (id),
    amount  INTEGER NOT NULL CHECK (amount > 0)
);
CREATE INDEX transfers_from_id ON transfers (from_id);
INSERT INTO accounts (id, owner, balance) VALUES (1, 'bank', 1000);
