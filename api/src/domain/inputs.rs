//! Typed inputs, parsed once at the edge (HTTP today, WebSocket request frames later). A value of
//! one of these types is valid by construction, so operations never check it again.

use confab_schema::limits::{
    DEFAULT_PAGE_SIZE, MAX_CALL_SIGNAL_BYTES, MAX_CHAT_DESCRIPTION_CHARS, MAX_CHAT_NAME_CHARS,
    MAX_NONCE_BYTES, MAX_PAGE_SIZE, MAX_TEXT_CHARS,
};

use confab_runtime::blobs::BlobName;
use confab_schema::attachment::{MAX_ATTACHMENT_NAME_BYTES, MAX_ATTACHMENTS_PER_MESSAGE};

use crate::error::{ApiError, ApiResult};

/// What the nonces of the call signals the server writes begin with (`call:<call>:<state>…`,
/// under the call's starter or participant). Parity is per (chat, author, nonce), so a client's
/// nonce with this beginning could take the place of a call's signal; none is accepted.
pub(crate) const CALL_NONCE_PREFIX: &str = "call:";

/// A client's send-parity token: 1 to 128 bytes, not beginning as the server's call nonces do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nonce(String);

impl Nonce {
    pub fn parse(value: String) -> ApiResult<Nonce> {
        if value.is_empty() || value.len() > MAX_NONCE_BYTES {
            return Err(ApiError::Unprocessable(format!(
                "nonce must be 1 to {MAX_NONCE_BYTES} bytes"
            )));
        }
        if value.starts_with(CALL_NONCE_PREFIX) {
            return Err(ApiError::Unprocessable(format!(
                "nonce must not begin with `{CALL_NONCE_PREFIX}`, kept for the server's call signals"
            )));
        }
        Ok(Nonce(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// The text of a message: 1 to 4,000 characters, not only white space.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageText(String);

impl MessageText {
    pub fn parse(value: String) -> ApiResult<MessageText> {
        if value.trim().is_empty() || value.chars().count() > MAX_TEXT_CHARS {
            return Err(ApiError::Unprocessable(format!(
                "text must be 1 to {MAX_TEXT_CHARS} characters"
            )));
        }
        Ok(MessageText(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// Checks a bounded, non-blank string field.
fn bounded(field: &str, value: String, max: usize) -> ApiResult<String> {
    if value.trim().is_empty() || value.chars().count() > max {
        return Err(ApiError::Unprocessable(format!(
            "{field} must be 1 to {max} characters"
        )));
    }
    Ok(value)
}

/// Which Unicode bidirectional formatting characters (all of general category Cf, so
/// `char::is_control` misses them) a field refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BidiRule {
    /// A name people read and pick a sender by: the embeddings, overrides and isolates (U+202A
    /// to U+202E, U+2066 to U+2069) reorder the text around them, so "Bob\u{202E}ecila" shows as
    /// "Bobalice" and a name can be made to render as someone else's. The marks (LRM U+200E, RLM
    /// U+200F, ALM U+061C) only set the direction of neutral characters next to them, as
    /// right-to-left writing needs, and stay allowed.
    HumanName,
    /// A file name: every bidirectional formatting character, the marks too. A file name is
    /// seldom typed in a right-to-left script with marks, and what it shows must be what it is:
    /// "invoice\u{202E}fdp.exe" shows as "invoiceexe.pdf".
    FileName,
}

/// Whether `c` is a bidirectional embedding, override or isolate (U+202A to U+202E, U+2066 to
/// U+2069).
pub fn is_bidi_override(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Whether `c` is any bidirectional formatting character: an override (see
/// [`is_bidi_override`]) or a mark (ALM U+061C, LRM U+200E, RLM U+200F).
pub fn is_bidi_control(c: char) -> bool {
    is_bidi_override(c) || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}')
}

impl BidiRule {
    /// Whether a field under this rule refuses `c`: the one check of bidirectional formatting
    /// characters every name goes through.
    pub fn refuses(self, c: char) -> bool {
        match self {
            BidiRule::HumanName => is_bidi_override(c),
            BidiRule::FileName => is_bidi_control(c),
        }
    }

    /// `value` without the characters this rule refuses: for names that come from elsewhere (an
    /// identity provider's token, a row stored before the rule) and cannot be refused.
    pub fn without_refused(self, value: &str) -> String {
        value.chars().filter(|&c| !self.refuses(c)).collect()
    }

    /// What a field under this rule refuses, for the refusal's message.
    fn refused(self) -> &'static str {
        match self {
            BidiRule::HumanName => {
                "bidirectional embeddings, overrides or isolates (U+202A to U+202E, U+2066 to U+2069)"
            }
            BidiRule::FileName => {
                "bidirectional formatting characters (U+061C, U+200E, U+200F, U+202A to U+202E, \
                 U+2066 to U+2069)"
            }
        }
    }
}

/// A bounded, non-blank name people read (see [`BidiRule::HumanName`]).
fn human_name(field: &str, value: String, max: usize) -> ApiResult<String> {
    let value = bounded(field, value, max)?;
    let rule = BidiRule::HumanName;
    if value.chars().any(|c| rule.refuses(c)) {
        return Err(ApiError::Unprocessable(format!(
            "{field} must not contain {}",
            rule.refused()
        )));
    }
    Ok(value)
}

/// A group's (or a circle's) name: 1 to 200 characters, without bidirectional embeddings,
/// overrides or isolates (422; they could make it render as another name, see
/// [`BidiRule::HumanName`]). The marks LRM, RLM and ALM are allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatName(String);

impl ChatName {
    pub fn parse(value: String) -> ApiResult<ChatName> {
        human_name("name", value, MAX_CHAT_NAME_CHARS).map(ChatName)
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// A custom status text: 1 to 100 characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusText(String);

impl StatusText {
    pub const MAX_CHARS: usize = 100;

    /// Shown next to the user's name: refused as a name is (bidirectional overrides), and with
    /// no control character (a newline, NUL or escape) nor only invisible ones.
    pub fn parse(value: String) -> ApiResult<StatusText> {
        let value = human_name("text", value, Self::MAX_CHARS)?;
        if value.chars().any(char::is_control) {
            return Err(ApiError::Unprocessable(
                "text must not contain control characters".into(),
            ));
        }
        let invisible = |c: char| {
            c.is_whitespace()
                || matches!(c, '\u{200B}'..='\u{200F}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}' | '\u{180E}' | '\u{115F}' | '\u{1160}' | '\u{3164}' | '\u{FFA0}')
        };
        if value.chars().all(invisible) {
            return Err(ApiError::Unprocessable("text must show something".into()));
        }
        Ok(StatusText(value))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// A group's description: 1 to 2,000 characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatDescription(String);

impl ChatDescription {
    pub fn parse(value: String) -> ApiResult<ChatDescription> {
        bounded("description", value, MAX_CHAT_DESCRIPTION_CHARS).map(ChatDescription)
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// A change of a group's description: a new one, or clearing it (an empty string on the wire).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DescriptionChange {
    Set(ChatDescription),
    Clear,
}

impl DescriptionChange {
    pub fn parse(value: String) -> ApiResult<DescriptionChange> {
        if value.chars().count() > MAX_CHAT_DESCRIPTION_CHARS {
            return Err(ApiError::Unprocessable(format!(
                "description must be at most {MAX_CHAT_DESCRIPTION_CHARS} characters"
            )));
        }
        if value.trim().is_empty() {
            return Ok(DescriptionChange::Clear);
        }
        Ok(DescriptionChange::Set(ChatDescription(value)))
    }
}

/// Longest reaction, in bytes (a family emoji with skin tones is about 35).
const MAX_EMOJI_BYTES: usize = 64;

/// A reaction: one emoji (or emoji sequence) in Unicode form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Emoji(String);

impl Emoji {
    pub fn parse(value: String) -> ApiResult<Emoji> {
        if !valid_emoji(&value) {
            return Err(ApiError::BadRequest(
                "a reaction is one emoji in Unicode form".into(),
            ));
        }
        Ok(Emoji(value))
    }

    /// A reaction to take back: any that may be stored, also one an earlier version took that
    /// [`Emoji::parse`] now refuses (it could not be taken back otherwise).
    pub fn parse_stored(value: String) -> ApiResult<Emoji> {
        if value.is_empty()
            || value.len() > MAX_EMOJI_BYTES
            || value.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ApiError::BadRequest(
                "a reaction is one emoji in Unicode form".into(),
            ));
        }
        Ok(Emoji(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// Whether `c` is a pictographic code point that can stand as an emoji.
fn is_pictographic(c: char) -> bool {
    matches!(c as u32,
        0x00A9 | 0x00AE | 0x203C | 0x2049 | 0x2122 | 0x2139 | 0x2194..=0x21AA | 0x231A..=0x23FF
        | 0x24C2 | 0x25AA..=0x25FE | 0x2600..=0x27BF | 0x2934 | 0x2935 | 0x2B00..=0x2BFF | 0x3030
        | 0x303D | 0x3297 | 0x3299 | 0x1F000..=0x1FAFF)
}

/// One emoji as Unicode writes it (UTS #51): a keycap (`1️⃣`), a flag of two regional
/// indicators, a subdivision flag (🏴 and tags), or pictographs joined by zero-width joiners,
/// each with at most an emoji presentation selector and a skin tone. Nothing else: two emoji, a
/// joiner at an end, a stray keycap or tag would each be a reaction of its own that looks like
/// another (`👍` and `👍` with an invisible tag), or many at once.
fn valid_emoji(emoji: &str) -> bool {
    if emoji.is_empty() || emoji.len() > MAX_EMOJI_BYTES {
        return false;
    }
    let chars: Vec<char> = emoji.chars().collect();
    let regional = |c: char| ('\u{1F1E6}'..='\u{1F1FF}').contains(&c);
    let tag = |c: char| ('\u{E0020}'..='\u{E007E}').contains(&c);
    match chars[..] {
        ['0'..='9' | '#' | '*', ref rest @ ..] => {
            matches!(rest, ['\u{FE0F}', '\u{20E3}'] | ['\u{20E3}'])
        }
        [first, second] if regional(first) => regional(second),
        _ if chars.iter().any(|c| regional(*c)) => false,
        ['\u{1F3F4}', ref tags @ .., '\u{E007F}'] if !tags.is_empty() => {
            tags.iter().all(|c| tag(*c))
        }
        _ if chars.iter().any(|c| tag(*c) || *c == '\u{E007F}') => false,
        _ => chars.split(|c| *c == '\u{200D}').all(valid_emoji_element),
    }
}

/// A pictograph, with at most an emoji presentation selector and a skin tone after it.
fn valid_emoji_element(element: &[char]) -> bool {
    let tone = |c: char| ('\u{1F3FB}'..='\u{1F3FF}').contains(&c);
    match element {
        [base, rest @ ..] if is_pictographic(*base) && !tone(*base) => match rest {
            [] | ['\u{FE0F}'] => true,
            [modifier] | ['\u{FE0F}', modifier] => tone(*modifier),
            _ => false,
        },
        _ => false,
    }
}

/// A page size: 1 to 100, 50 when absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageLimit(usize);

impl PageLimit {
    pub fn parse(limit: Option<usize>) -> ApiResult<PageLimit> {
        let limit = limit.unwrap_or(DEFAULT_PAGE_SIZE);
        if (1..=MAX_PAGE_SIZE).contains(&limit) {
            Ok(PageLimit(limit))
        } else {
            Err(ApiError::BadRequest(format!(
                "limit must be 1 to {MAX_PAGE_SIZE}"
            )))
        }
    }

    pub fn get(&self) -> usize {
        self.0
    }
}

/// Longest user-search prefix.
const MAX_QUERY_CHARS: usize = 64;

/// A user-search prefix: trimmed and lower-cased, 1 to 64 characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserQuery(String);

impl UserQuery {
    pub fn parse(value: &str) -> ApiResult<UserQuery> {
        let q = value.trim().to_lowercase();
        let chars = q.chars().count();
        if chars == 0 || chars > MAX_QUERY_CHARS {
            return Err(ApiError::BadRequest(format!(
                "q must be 1 to {MAX_QUERY_CHARS} characters"
            )));
        }
        Ok(UserQuery(q))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Longest message-search query.
pub const MAX_SEARCH_CHARS: usize = 200;
/// Most words a message-search query may have: Meilisearch reads the first ten of a query and
/// ignores the rest, so a longer one would find messages without every word.
pub const MAX_SEARCH_WORDS: usize = 10;
/// Longest word (in bytes) a message search can find: the embedded engine indexes no longer word
/// (nor reads one in a query), so a longer one would be left out of the query silently.
pub const MAX_SEARCH_WORD_BYTES: usize = 63;

/// What to find in messages: trimmed, 1 to 200 characters, with at least one letter or digit (a
/// query of punctuation alone would match everything).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SearchText(String);

impl SearchText {
    pub fn parse(value: &str) -> ApiResult<SearchText> {
        let q = value.trim();
        let chars = q.chars().count();
        if chars == 0 || chars > MAX_SEARCH_CHARS {
            return Err(ApiError::BadRequest(format!(
                "q must be 1 to {MAX_SEARCH_CHARS} characters"
            )));
        }
        if !q.chars().any(char::is_alphanumeric) {
            return Err(ApiError::BadRequest(
                "q must contain a letter or a digit".into(),
            ));
        }
        // Every word must match: a word an engine would drop must not be taken quietly.
        let words: Vec<&str> = q
            .split(|c: char| !c.is_alphanumeric())
            .filter(|word| !word.is_empty())
            .collect();
        if words.len() > MAX_SEARCH_WORDS {
            return Err(ApiError::BadRequest(format!(
                "q may have at most {MAX_SEARCH_WORDS} words"
            )));
        }
        if words.iter().any(|word| word.len() > MAX_SEARCH_WORD_BYTES) {
            return Err(ApiError::BadRequest(format!(
                "a word of q may be at most {MAX_SEARCH_WORD_BYTES} bytes long"
            )));
        }
        Ok(SearchText(q.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The SHA-256 a client declares for an upload's body in `Content-Digest` (RFC 9530:
/// `sha-256=:<base64>:`, possibly among other algorithms, which are ignored). With one, the upload
/// is written once, straight to its content address, and refused if the body does not match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredDigest(BlobName);

impl DeclaredDigest {
    /// `None` when the header is absent or names no SHA-256; 400 when its SHA-256 is malformed.
    pub fn parse(header: Option<&str>) -> ApiResult<Option<DeclaredDigest>> {
        use base64::Engine;
        let Some(header) = header else {
            return Ok(None);
        };
        let malformed = || {
            ApiError::BadRequest(
                "Content-Digest's sha-256 must be `sha-256=:<base64 of 32 bytes>:`".into(),
            )
        };
        for member in header.split(',') {
            let Some((algorithm, value)) = member.trim().split_once('=') else {
                continue;
            };
            if !algorithm.trim().eq_ignore_ascii_case("sha-256") {
                continue;
            }
            let encoded = value
                .trim()
                .strip_prefix(':')
                .and_then(|v| v.strip_suffix(':'))
                .ok_or_else(malformed)?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| malformed())?;
            let digest: [u8; 32] = bytes.try_into().map_err(|_| malformed())?;
            return Ok(Some(DeclaredDigest(BlobName::from_digest(digest))));
        }
        Ok(None)
    }

    pub fn name(&self) -> &BlobName {
        &self.0
    }
}

/// An attachment's file name: 1 to 255 bytes, no path separators (`/`, `\\`), no control
/// characters, no bidirectional formatting characters (not even the marks, see
/// [`BidiRule::FileName`]), not `.` or `..`; else 400.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachmentName(String);

impl AttachmentName {
    pub fn parse(value: Option<String>) -> ApiResult<AttachmentName> {
        let Some(value) = value else {
            return Err(ApiError::BadRequest("name is required".into()));
        };
        if value.trim().is_empty() || value.len() > MAX_ATTACHMENT_NAME_BYTES {
            return Err(ApiError::BadRequest(format!(
                "name must be 1 to {MAX_ATTACHMENT_NAME_BYTES} bytes"
            )));
        }
        let rule = BidiRule::FileName;
        if value.contains(['/', '\\']) || value.chars().any(|c| c.is_control() || rule.refuses(c)) {
            return Err(ApiError::BadRequest(format!(
                "name must not contain path separators, control characters or {}",
                rule.refused()
            )));
        }
        if value == "." || value == ".." {
            return Err(ApiError::BadRequest("name must name a file".into()));
        }
        Ok(AttachmentName(value))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// The media type a client declares for an upload: `type/subtype`, lower-cased, parameters
/// dropped; `application/octet-stream` when none is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeclaredType(String);

impl DeclaredType {
    pub const GENERIC: &str = "application/octet-stream";

    pub fn parse(value: Option<&str>) -> ApiResult<DeclaredType> {
        let Some(value) = value else {
            return Ok(DeclaredType(Self::GENERIC.into()));
        };
        let essence = value
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        let token = |s: &str| {
            !s.is_empty()
                && s.len() <= 127
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        match essence.split_once('/') {
            Some((kind, sub)) if token(kind) && token(sub) => Ok(DeclaredType(essence)),
            _ => Err(ApiError::UnsupportedMediaType(format!(
                "Content-Type `{}` is not a media type",
                value.chars().take(64).collect::<String>()
            ))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_generic(&self) -> bool {
        self.0 == Self::GENERIC
    }
}

/// Up to [`MAX_ATTACHMENTS_PER_MESSAGE`] distinct attachment ids, in the order given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttachmentIds(Vec<uuid::Uuid>);

impl AttachmentIds {
    pub fn parse(ids: Vec<uuid::Uuid>) -> ApiResult<AttachmentIds> {
        let mut distinct = Vec::with_capacity(ids.len());
        for id in ids {
            if !distinct.contains(&id) {
                distinct.push(id);
            }
        }
        if distinct.len() > MAX_ATTACHMENTS_PER_MESSAGE {
            return Err(ApiError::Unprocessable(format!(
                "at most {MAX_ATTACHMENTS_PER_MESSAGE} attachments per message"
            )));
        }
        Ok(AttachmentIds(distinct))
    }

    pub fn as_slice(&self) -> &[uuid::Uuid] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Who a call's signalling message goes to: one participant, or every other participant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayTarget {
    User(confab_schema::UserId),
    All,
}

impl RelayTarget {
    /// `"all"` or a user id.
    pub fn parse(value: &str) -> ApiResult<RelayTarget> {
        if value == "all" {
            return Ok(RelayTarget::All);
        }
        value.parse().map(RelayTarget::User).map_err(|_| {
            ApiError::Unprocessable("`to` must be a participant's user id or \"all\"".into())
        })
    }
}

/// What a WebRTC stack produced for one signalling message (an SDP description or an ICE
/// candidate): a JSON object or string of at most `MAX_CALL_SIGNAL_BYTES` bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct SignalPayload(serde_json::Value);

impl SignalPayload {
    pub fn parse(value: serde_json::Value) -> ApiResult<SignalPayload> {
        if !(value.is_object() || value.is_string()) {
            return Err(ApiError::Unprocessable(
                "payload must be a JSON object or string".into(),
            ));
        }
        let size = serde_json::to_vec(&value)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > MAX_CALL_SIGNAL_BYTES {
            return Err(ApiError::PayloadTooLarge(format!(
                "a signalling payload is at most {MAX_CALL_SIGNAL_BYTES} bytes"
            )));
        }
        Ok(SignalPayload(value))
    }

    pub fn into_inner(self) -> serde_json::Value {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_texts() {
        assert_eq!(SearchText::parse("  hello ").unwrap().as_str(), "hello");
        assert!(SearchText::parse("").is_err());
        assert!(SearchText::parse("   ").is_err());
        assert!(SearchText::parse("?!").is_err());
        let longest = format!("{} {}", vec!["b".repeat(19); 9].join(" "), "c".repeat(20));
        assert_eq!(longest.chars().count(), MAX_SEARCH_CHARS);
        assert!(SearchText::parse(&longest).is_ok());
        assert!(SearchText::parse(&format!("{longest}d")).is_err());
        // Every word must match: no more words than Meilisearch reads, none longer than the
        // embedded engine indexes.
        let ten = (0..MAX_SEARCH_WORDS)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>();
        assert!(SearchText::parse(&ten.join(" ")).is_ok());
        assert!(SearchText::parse(&format!("{} secret", ten.join(" "))).is_err());
        assert!(SearchText::parse(&format!("{}, secret!", ten.join("-"))).is_err());
        assert!(SearchText::parse(&"f".repeat(MAX_SEARCH_WORD_BYTES)).is_ok());
        assert!(SearchText::parse(&format!("deploy {}", "f".repeat(64))).is_err());
        assert!(SearchText::parse(&"é".repeat(32)).is_err(), "64 bytes");
    }

    #[test]
    fn status_texts_show_something_plain() {
        assert!(StatusText::parse("at the clinic 🏥".into()).is_ok());
        for bad in [
            "a\u{202E}b",
            "\u{0000}x",
            "two\nlines",
            "\u{200B}",
            "\u{200B} \u{FEFF}",
        ] {
            assert!(StatusText::parse(bad.into()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_reaction_stored_before_is_taken_back_whatever_its_form() {
        assert!(Emoji::parse("👍👍".into()).is_err());
        assert!(Emoji::parse_stored("👍👍".into()).is_ok());
        for bad in ["", "a b", &"x".repeat(65)] {
            assert!(Emoji::parse_stored(bad.into()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn emoji_forms() {
        for ok in [
            "👍",
            "🎉",
            "❤️",
            "👍🏽",
            "👨‍👩‍👧",
            "🇫🇷",
            "1️⃣",
            "#️⃣",
            "🏴\u{E0067}\u{E0062}\u{E0065}\u{E006E}\u{E0067}\u{E007F}",
        ] {
            assert!(Emoji::parse(ok.into()).is_ok(), "{ok}");
        }
        for ok in ["🏳️‍🌈", "❤️‍🔥", "🧑🏽‍🚀", "☺", "🙂"] {
            assert!(Emoji::parse(ok.into()).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a",
            ":thumbsup:",
            "👍 ",
            "1",
            "👍x",
            "<script>",
            &"👍".repeat(17),
            // Each of these would be a reaction of its own that looks like another, or many.
            "👍👍",
            "👍\u{E0041}",
            "\u{20E3}",
            "1\u{20E3}\u{20E3}",
            "❤\u{200D}",
            "\u{200D}❤",
            "❤\u{FE0E}",
            "🇫🇷🇫",
            "🏴\u{E007F}",
            "🏽",
        ] {
            assert!(Emoji::parse(bad.into()).is_err(), "{bad}");
        }
    }

    #[test]
    fn bounds() {
        assert!(MessageText::parse("hi".into()).is_ok());
        assert!(MessageText::parse("  ".into()).is_err());
        assert!(MessageText::parse("x".repeat(MAX_TEXT_CHARS)).is_ok());
        assert!(MessageText::parse("x".repeat(MAX_TEXT_CHARS + 1)).is_err());
        assert!(Nonce::parse(String::new()).is_err());
        assert!(Nonce::parse("n".repeat(MAX_NONCE_BYTES + 1)).is_err());
        assert!(Nonce::parse("call:0190a1b2-0000-7000-8000-000000000000:ended".into()).is_err());
        assert!(Nonce::parse("recall:1".into()).is_ok());
        assert!(ChatName::parse("x".repeat(MAX_CHAT_NAME_CHARS + 1)).is_err());
        assert_eq!(
            DescriptionChange::parse(" ".into()).unwrap(),
            DescriptionChange::Clear
        );
        assert_eq!(PageLimit::parse(None).unwrap().get(), DEFAULT_PAGE_SIZE);
        assert!(PageLimit::parse(Some(0)).is_err());
        assert!(PageLimit::parse(Some(MAX_PAGE_SIZE + 1)).is_err());
        assert_eq!(UserQuery::parse("  AlI ").unwrap().as_str(), "ali");
        assert!(UserQuery::parse(" ").is_err());
    }

    /// The marks: left-to-right, right-to-left, Arabic letter.
    const BIDI_MARKS: &[char] = &['\u{200E}', '\u{200F}', '\u{061C}'];
    /// The embeddings, overrides (U+202A to U+202E) and isolates (U+2066 to U+2069).
    const BIDI_OVERRIDES: &[char] = &[
        '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}', '\u{202E}', '\u{2066}', '\u{2067}',
        '\u{2068}', '\u{2069}',
    ];

    #[test]
    fn human_names_refuse_overrides_and_keep_marks() {
        for bidi in BIDI_OVERRIDES {
            let name = format!("Bob{bidi}ecila");
            for refused in [
                ChatName::parse(name.clone()).map(|_| ()),
                CircleDisplayName::parse(name.clone()).map(|_| ()),
            ] {
                assert!(
                    matches!(&refused, Err(ApiError::Unprocessable(why)) if why.contains("overrides")),
                    "{name:?}: {refused:?}"
                );
            }
        }
        // Right-to-left text needs the marks: "שלום" then a mark, "علي" with ALM.
        for name in ["שלום\u{200F} (2)", "\u{200E}Dana", "علي\u{061C}"] {
            assert!(ChatName::parse(name.into()).is_ok(), "{name:?}");
            assert!(CircleDisplayName::parse(name.into()).is_ok(), "{name:?}");
        }
        // An address, or anything like one, is never a circle name others see.
        for address in ["dora@corp.example", "a@b", " @ "] {
            assert!(
                matches!(
                    CircleDisplayName::parse(address.into()),
                    Err(ApiError::Unprocessable(_))
                ),
                "{address:?}"
            );
        }
        assert!(BIDI_MARKS.iter().all(|&c| !BidiRule::HumanName.refuses(c)));
        assert!(
            BIDI_MARKS
                .iter()
                .chain(BIDI_OVERRIDES)
                .all(|&c| BidiRule::FileName.refuses(c))
        );
    }

    #[test]
    fn attachment_names_and_types() {
        assert!(AttachmentName::parse(Some("report (1).pdf".into())).is_ok());
        assert!(AttachmentName::parse(Some("фото.jpg".into())).is_ok());
        for bad in ["", " ", "a/b", "..\\x", "a\nb", "a\u{0}", ".", ".."] {
            assert!(AttachmentName::parse(Some(bad.into())).is_err(), "{bad:?}");
        }
        assert!(AttachmentName::parse(None).is_err());
        assert!(AttachmentName::parse(Some("x".repeat(256))).is_err());
        // Every bidirectional formatting character, the marks too: "invoice\u{202E}fdp.exe"
        // would show as "invoiceexe.pdf".
        for bidi in BIDI_MARKS.iter().chain(BIDI_OVERRIDES) {
            let name = format!("invoice{bidi}fdp.exe");
            let refused = AttachmentName::parse(Some(name.clone())).expect_err(&name);
            assert!(
                matches!(&refused, ApiError::BadRequest(why) if why.contains("bidirectional")),
                "{name:?}: {refused:?}"
            );
        }
        assert_eq!(
            DeclaredType::parse(Some("Image/PNG; q=1"))
                .unwrap()
                .as_str(),
            "image/png"
        );
        assert!(DeclaredType::parse(None).unwrap().is_generic());
        assert!(DeclaredType::parse(Some("png")).is_err());
        assert!(DeclaredType::parse(Some("a/b/c")).is_err());
        let id = uuid::Uuid::now_v7();
        assert_eq!(AttachmentIds::parse(vec![id, id]).unwrap().as_slice(), [id]);
        assert!(AttachmentIds::parse((0..11).map(|_| uuid::Uuid::now_v7()).collect()).is_err());
    }
}

/// A back-channel logout token as posted: 1 to 16 KiB, otherwise opaque until verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogoutToken(String);

impl LogoutToken {
    pub fn parse(value: String) -> ApiResult<LogoutToken> {
        let value = value.trim().to_owned();
        if value.is_empty() || value.len() > 16 * 1024 {
            return Err(ApiError::BadRequest(
                "logout_token must be 1 to 16384 bytes".into(),
            ));
        }
        Ok(LogoutToken(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A circle's rules: 1 to 4,000 characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CircleRules(String);

impl CircleRules {
    pub const MAX_CHARS: usize = 4_000;

    pub fn parse(value: String) -> ApiResult<CircleRules> {
        bounded("rules", value, Self::MAX_CHARS).map(CircleRules)
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// The name a member goes by in one circle, which every member sees: 1 to 64 characters,
/// trimmed, without bidirectional embeddings, overrides or isolates (see [`BidiRule::HumanName`];
/// the marks are allowed), and without an `@` (422 for either). A name with an `@` is, or looks
/// like, an e-mail address, which other users never see (`users::name_shown_to_others`); refused
/// here, so a member is told rather than shown under another name. A member row stored before
/// this rule is masked where it is shown (`circles::circle_name_shown_to_others`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CircleDisplayName(String);

impl CircleDisplayName {
    pub const MAX_CHARS: usize = 64;

    pub fn parse(value: String) -> ApiResult<CircleDisplayName> {
        let value = human_name("display_name", value.trim().to_owned(), Self::MAX_CHARS)?;
        if crate::store::looks_like_address(&value) {
            return Err(ApiError::Unprocessable(
                "display_name must not contain '@': others are never shown an e-mail address"
                    .into(),
            ));
        }
        Ok(CircleDisplayName(value))
    }

    pub fn into_inner(self) -> String {
        self.0
    }
}

/// A circle's access code: [`AccessCode::LEN`] characters of [`AccessCode::ALPHABET`] (digits and
/// upper-case letters without the look-alikes 0, 1, I, L, O), drawn from `rand`'s thread-local
/// CSPRNG (ChaCha, seeded from the operating system): 31^12 ≈ 2^59 codes, so guessing one is hopeless. Clients may type it in lower case, with
/// spaces or dashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessCode(String);

impl AccessCode {
    pub const ALPHABET: &'static [u8] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
    pub const LEN: usize = 12;

    /// A fresh code.
    pub fn generate() -> AccessCode {
        use rand::Rng;
        let mut rng = rand::rng();
        let code = (0..Self::LEN)
            .map(|_| char::from(Self::ALPHABET[rng.random_range(0..Self::ALPHABET.len())]))
            .collect();
        AccessCode(code)
    }

    /// A code as a client typed it: 422 unless it can be a code at all.
    pub fn parse(value: &str) -> ApiResult<AccessCode> {
        let code: String = value
            .chars()
            .filter(|c| !matches!(c, ' ' | '-'))
            .map(|c| c.to_ascii_uppercase())
            .collect();
        if code.len() != Self::LEN || !code.bytes().all(|b| Self::ALPHABET.contains(&b)) {
            return Err(ApiError::Unprocessable(format!(
                "an access code is {} characters of {}",
                Self::LEN,
                String::from_utf8_lossy(Self::ALPHABET)
            )));
        }
        Ok(AccessCode(code))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A circle's time to live, in hours (fractions allowed), within `(0, max]`; at least one second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CircleTtl(std::time::Duration);

impl CircleTtl {
    pub fn parse(hours: Option<f64>, default: f64, max: f64) -> ApiResult<CircleTtl> {
        let hours = hours.unwrap_or(default);
        if !hours.is_finite() || hours <= 0.0 || hours > max {
            return Err(ApiError::Unprocessable(format!(
                "ttl_hours must be above 0 and at most {max}"
            )));
        }
        let ttl = std::time::Duration::from_secs_f64(hours * 3_600.0);
        Ok(CircleTtl(ttl.max(std::time::Duration::from_secs(1))))
    }

    pub fn duration(&self) -> std::time::Duration {
        self.0
    }
}

/// A matching queue named in a path: `vent`, `listen` or `talk`, else 404 (there is no such queue).
pub fn queue_kind(value: &str) -> ApiResult<confab_schema::circle::QueueKind> {
    value
        .parse()
        .map_err(|_| ApiError::NotFound("no such queue; the queues are vent, listen and talk"))
}
