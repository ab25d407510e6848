-- Send parity moves from a unique index on `signals` to a table of its own, so a nonce can expire
-- (retries come within minutes) while the signal keeps its nonce for the client that sent it.
CREATE TABLE signal_nonces (
    chat_id BLOB NOT NULL,
    author_id BLOB NOT NULL,
    nonce TEXT NOT NULL,
    signal_id BLOB NOT NULL,
    claimed_at INTEGER NOT NULL,
    PRIMARY KEY (chat_id, author_id, nonce)
) WITHOUT ROWID;
CREATE INDEX signal_nonces_by_age ON signal_nonces (claimed_at);
INSERT INTO signal_nonces (chat_id, author_id, nonce, signal_id, claimed_at)
    SELECT chat_id, author_id, nonce, id, CAST(strftime('%s', 'now') AS INTEGER) * 1000
    FROM signals WHERE nonce IS NOT NULL;
DROP INDEX signals_send_parity;
