-- An id for this database, taken once: instances that share the database
-- share it, so their event-bus subjects meet, and other deployments on the
-- same NATS server get other subjects. `erasures` counts DeleteUser calls:
-- they change other users' message pages without an event in their logs,
-- so a first page cached against a user's newest event id is also checked
-- against it.
CREATE TABLE deployment (
    id       TEXT   NOT NULL,
    erasures INTEGER NOT NULL DEFAULT 0
);
INSERT INTO deployment (id) VALUES (lower(hex(randomblob(16))));
