-- A user, CREATING between the two steps of its creation and ACTIVE after
-- them. Its id is the id of the registration it was created from.
CREATE TABLE users (
    id         TEXT      PRIMARY KEY,
    email      TEXT      NOT NULL,
    name       TEXT      NOT NULL,
    state      TEXT      NOT NULL,
    created_at TIMESTAMP NOT NULL
);

-- A user's login, written by the second step: an email address signs in
-- one user only.
CREATE TABLE logins (
    email   TEXT PRIMARY KEY,
    user_id TEXT NOT NULL UNIQUE
);
