-- An id for this database, taken once: instances that share the database
-- share it, so their event-bus subjects meet, and other deployments on the
-- same NATS server get other subjects.
CREATE TABLE deployment (
    id TEXT NOT NULL
);
INSERT INTO deployment (id) VALUES (lower(hex(randomblob(16))));
