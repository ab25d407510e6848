-- A user's own settings, and each member's settings per chat; the body is the settings as JSON.
CREATE TABLE user_settings (
    user_id BLOB PRIMARY KEY,
    body TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE chat_member_settings (
    chat_id BLOB NOT NULL,
    user_id BLOB NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (chat_id, user_id)
) WITHOUT ROWID;
