-- Circles, their access codes, members and pairing chats; pairing pools (a circle's lobby, the
-- matching queues). See the CQL migration of the same number.
CREATE TABLE circles (
    id BLOB PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT,
    rules TEXT,
    owner_id BLOB NOT NULL,
    access_code TEXT NOT NULL,
    max_members INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX circles_by_expiry ON circles (expires_at);
CREATE TABLE circle_codes (
    code TEXT PRIMARY KEY,
    circle_id BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE circle_members (
    circle_id BLOB NOT NULL,
    user_id BLOB NOT NULL,
    display_name TEXT NOT NULL,
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (circle_id, user_id)
) WITHOUT ROWID;
CREATE TABLE circle_chats (
    circle_id BLOB NOT NULL,
    chat_id BLOB NOT NULL,
    PRIMARY KEY (circle_id, chat_id)
) WITHOUT ROWID;
CREATE TABLE pairing_slots (
    pool TEXT NOT NULL,
    user_id BLOB NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    since INTEGER NOT NULL,
    partner BLOB,
    chat_id BLOB,
    previous BLOB,
    version INTEGER NOT NULL,
    PRIMARY KEY (pool, user_id)
) WITHOUT ROWID;
