-- Login throttling, shared by every instance using the database.
-- Accounts are keyed "user:<id>" (username and email count together) or
-- "name:<lower-cased login>" for names that match no account, so unknown
-- names are throttled exactly like real ones.
CREATE TABLE login_account_throttle (
    account_key  TEXT    PRIMARY KEY,
    failures     BIGINT  NOT NULL DEFAULT 0,
    locked_until BIGINT  NOT NULL DEFAULT 0
);

-- Failed logins per source address in a window that opens at its first failure.
CREATE TABLE login_address_throttle (
    address      TEXT    PRIMARY KEY,
    window_start BIGINT  NOT NULL,
    failures     BIGINT  NOT NULL DEFAULT 0
);
