-- Users, chats, members and history.
CREATE TABLE users (
    id BLOB PRIMARY KEY,
    username TEXT NOT NULL,
    display_name TEXT NOT NULL,
    email TEXT,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE chats (
    id BLOB PRIMARY KEY,
    kind TEXT NOT NULL,
    name TEXT,
    description TEXT,
    created_at INTEGER NOT NULL,
    created_by BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE chat_members (
    chat_id BLOB NOT NULL,
    user_id BLOB NOT NULL,
    role TEXT NOT NULL,
    joined_at INTEGER NOT NULL,
    PRIMARY KEY (chat_id, user_id)
) WITHOUT ROWID;
CREATE INDEX chat_members_by_user ON chat_members (user_id, chat_id);
-- Signal ids are UUIDv7 stored big-endian, so byte order is time order.
CREATE TABLE signals (
    chat_id BLOB NOT NULL,
    id BLOB NOT NULL,
    kind TEXT NOT NULL,
    author_id BLOB NOT NULL,
    nonce TEXT,
    text TEXT,
    reply_to BLOB,
    attachments TEXT NOT NULL DEFAULT '[]',
    edited_at INTEGER,
    deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (chat_id, id)
) WITHOUT ROWID;
CREATE UNIQUE INDEX signals_send_parity ON signals (chat_id, author_id, nonce) WHERE nonce IS NOT NULL;
