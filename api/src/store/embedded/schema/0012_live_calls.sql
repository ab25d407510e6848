-- A chat's ringing and active calls, for a member who leaves the chat to leave them too.
CREATE INDEX calls_live_by_chat ON calls (chat_id, id) WHERE status IN ('ringing', 'active');
