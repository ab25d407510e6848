-- Attachments (the body is the attachment as JSON), and which attachments reference each
-- content-addressed object. The collector marks an object in blob_condemned before it removes it.
CREATE TABLE attachments (
    id BLOB PRIMARY KEY,
    chat_id BLOB NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX attachments_by_chat ON attachments (chat_id, kind, id);
CREATE INDEX attachments_by_chat_any_kind ON attachments (chat_id, id);

CREATE TABLE blob_refs (
    sha256 TEXT NOT NULL,
    attachment_id BLOB NOT NULL,
    PRIMARY KEY (sha256, attachment_id)
) WITHOUT ROWID;

CREATE TABLE blob_condemned (
    sha256 TEXT PRIMARY KEY,
    until_ms INTEGER NOT NULL
) WITHOUT ROWID;
