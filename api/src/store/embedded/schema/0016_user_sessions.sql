-- The identity provider's sessions (`sid`) each user's tokens were seen in, until they expire:
-- logging out everywhere ends each of them by its id. Expired rows are skipped when read and
-- removed when the user's sessions are next written.
CREATE TABLE user_sessions (
    user_id BLOB NOT NULL,
    session TEXT NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    PRIMARY KEY (user_id, session)
) WITHOUT ROWID;
