-- The chats each user recently stopped being a member of (they left or were removed, or the chat
-- was removed), for a resumed event stream to replay them up to the leaving. Written with the
-- removal; rows older than the store keeps them go a few at a time with later ones.
CREATE TABLE left_chats (
    user_id BLOB NOT NULL,
    chat_id BLOB NOT NULL,
    left_at INTEGER NOT NULL,
    PRIMARY KEY (user_id, chat_id)
) WITHOUT ROWID;
CREATE INDEX left_chats_by_user ON left_chats (user_id, left_at);
CREATE INDEX left_chats_by_age ON left_chats (left_at);
