-- Which message is about to carry an attachment: reserved by a send before its message is stored,
-- so that of two sends naming one attachment only one stores a message with it. Each write runs in
-- an immediate transaction, so a reservation is taken by one send only. `reserved_at_ms` lets a
-- send retake a reservation whose message was never stored.
CREATE TABLE attachment_reservations (
    id BLOB PRIMARY KEY,
    message_id BLOB NOT NULL,
    reserved_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
