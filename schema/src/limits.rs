//! Input limits, checked by the API before anything reaches a store.

/// Longest message text, in Unicode scalar values.
pub const MAX_TEXT_CHARS: usize = 4_000;
/// Longest client nonce, in bytes.
pub const MAX_NONCE_BYTES: usize = 128;
/// Longest chat name, in Unicode scalar values.
pub const MAX_CHAT_NAME_CHARS: usize = 200;
/// Longest chat description, in Unicode scalar values.
pub const MAX_CHAT_DESCRIPTION_CHARS: usize = 2_000;
/// Most members named when a chat is created.
pub const MAX_INITIAL_MEMBERS: usize = 1_000;
/// Largest page of history.
pub const MAX_PAGE_SIZE: usize = 100;
/// Page size when the client names none.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Most participants in one call (signalling is a full mesh between them).
pub const MAX_CALL_PARTICIPANTS: usize = 16;
/// Largest payload of one relayed WebRTC signalling message, in bytes of JSON (an SDP offer with
/// its candidates is a few kilobytes).
pub const MAX_CALL_SIGNAL_BYTES: usize = 32 * 1024;
