-- The members each circle's owner removed, who cannot join it again with its code. Removed with
-- the circle by the expiry sweep. See the CQL migration `circle_removals`.
CREATE TABLE circle_removals (
    circle_id BLOB NOT NULL,
    user_id BLOB NOT NULL,
    removed_at INTEGER NOT NULL,
    PRIMARY KEY (circle_id, user_id)
) WITHOUT ROWID;
