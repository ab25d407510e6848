-- User search terms, chat activity, reactions and markers.
CREATE TABLE user_terms (
    term TEXT NOT NULL,
    user_id BLOB NOT NULL,
    PRIMARY KEY (term, user_id)
) WITHOUT ROWID;
CREATE TABLE chat_activity (
    chat_id BLOB PRIMARY KEY,
    activity BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE reactions (
    chat_id BLOB NOT NULL,
    signal_id BLOB NOT NULL,
    emoji TEXT NOT NULL,
    user_id BLOB NOT NULL,
    PRIMARY KEY (chat_id, signal_id, emoji, user_id)
) WITHOUT ROWID;
CREATE TABLE markers (
    chat_id BLOB NOT NULL,
    kind TEXT NOT NULL,
    user_id BLOB NOT NULL,
    up_to BLOB NOT NULL,
    PRIMARY KEY (chat_id, kind, user_id)
) WITHOUT ROWID;
