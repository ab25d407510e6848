-- E-mail addresses (and user names or display names that look like one), lower-cased, found only
-- whole: apart from `user_terms`, which a search scans by prefix. The terms are written again from
-- each user's row by the migration's code, which moves addresses out of `user_terms`.
CREATE TABLE user_addresses (
    address TEXT NOT NULL,
    user_id BLOB NOT NULL,
    PRIMARY KEY (address, user_id)
) WITHOUT ROWID;
CREATE INDEX user_addresses_by_user ON user_addresses (user_id);
-- A user's terms are replaced on every write of their profile: found by user, not by a scan.
CREATE INDEX user_terms_by_user ON user_terms (user_id);
