-- Calls, their present participants, and the ringing ones by when their ring ends.
CREATE TABLE calls (
    id BLOB PRIMARY KEY,
    chat_id BLOB NOT NULL,
    started_by BLOB NOT NULL,
    started_at INTEGER NOT NULL,
    ring_until INTEGER NOT NULL,
    status TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX calls_ringing ON calls (ring_until) WHERE status = 'ringing';
CREATE TABLE call_participants (
    call_id BLOB NOT NULL,
    user_id BLOB NOT NULL,
    PRIMARY KEY (call_id, user_id)
) WITHOUT ROWID;
