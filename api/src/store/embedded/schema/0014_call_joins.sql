-- The join a participant is in a call under: its id, the one its `joined` signal's nonce is made
-- of. Put in by `INSERT OR IGNORE` and read back under one hold of the connection, so of joins of
-- one user racing one puts them in and the others read its id. Empty for a starter, and for a
-- participant put in before this column.
ALTER TABLE call_participants ADD COLUMN join_id BLOB;
