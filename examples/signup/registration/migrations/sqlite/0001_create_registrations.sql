-- A registration: a sign-up waiting for its email address to be confirmed,
-- confirmed (Users is creating the user), or completed. The confirmation
-- token is kept as its SHA-256, so the table alone cannot confirm anything.
CREATE TABLE registrations (
    id           TEXT      PRIMARY KEY,
    email        TEXT      NOT NULL,
    name         TEXT      NOT NULL,
    token_sha256 TEXT      NOT NULL,
    state        TEXT      NOT NULL,
    last_failure TEXT      NOT NULL DEFAULT '',
    created_at   TIMESTAMP NOT NULL
);
