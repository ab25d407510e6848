-- Devices registered for push notifications; the body is the device as JSON.
CREATE TABLE devices (
    id BLOB PRIMARY KEY,
    user_id BLOB NOT NULL,
    body TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX devices_by_user ON devices (user_id);
