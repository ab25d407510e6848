-- Attachments' bytes up to `attachments.inline_bytes`, kept here instead of the directory.
CREATE TABLE small_objects (
    sha256 TEXT PRIMARY KEY,
    bytes BLOB NOT NULL,
    stored_at_ms INTEGER NOT NULL
);
