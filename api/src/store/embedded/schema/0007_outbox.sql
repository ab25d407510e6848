-- The event outbox (see the CQL migration of the same number): entries written before their
-- change, deleted once published; writers' heartbeats; who sweeps a silent writer, until when.
CREATE TABLE event_outbox (
    writer BLOB NOT NULL,
    bucket INTEGER NOT NULL,
    id BLOB NOT NULL,
    envelope BLOB NOT NULL,
    PRIMARY KEY (writer, bucket, id)
) WITHOUT ROWID;
CREATE TABLE outbox_writers (
    writer BLOB PRIMARY KEY,
    started_ms INTEGER NOT NULL,
    seen_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE outbox_sweeps (
    writer BLOB PRIMARY KEY,
    sweeper BLOB NOT NULL,
    until_ms INTEGER NOT NULL
) WITHOUT ROWID;
