-- The sweeper's list of calls, a table of its own as on CQL (`ringing_calls` there): a ringing call
-- until its ring ends (`due`: its `ring_until`), and a call being ended from before its status moves
-- (`due`: when its end began); either stays listed until its `missed` or `ended` signal is written.
CREATE TABLE listed_calls (
    due INTEGER NOT NULL,
    call_id BLOB NOT NULL,
    chat_id BLOB NOT NULL,
    PRIMARY KEY (due, call_id)
) WITHOUT ROWID;
INSERT INTO listed_calls (due, call_id, chat_id)
    SELECT ring_until, id, chat_id FROM calls WHERE status = 'ringing';
DROP INDEX calls_ringing;
-- A participant's join or leave whose `joined` or `left` signal may not be written yet: written
-- before the change, removed once its signal is.
CREATE TABLE pending_call_signals (
    call_id BLOB NOT NULL,
    user_id BLOB NOT NULL,
    state TEXT NOT NULL,
    change_id BLOB NOT NULL,
    PRIMARY KEY (call_id, user_id)
) WITHOUT ROWID;
