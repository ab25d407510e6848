//! The vocabulary every confab process shares: ids, the wire model, the event envelope published on the
//! bus, subject names and input limits.
//!
//! Invariant: this crate does no I/O. It is linked by every process and by clients' test code, so it
//! stays free of drivers, runtimes and sockets.

pub mod attachment;
pub mod call;
pub mod circle;
pub mod event;
pub mod ids;
pub mod limits;
pub mod model;
pub mod push;
pub mod settings;
pub mod subjects;

pub use attachment::{Attachment, AttachmentKind, AttachmentRef};
pub use event::{Envelope, Event, EventKind, LoggedEvent};
pub use ids::{ChatId, CircleId, DeviceId, IdError, SignalId, UserId};
pub use model::{Chat, ChatKind, Member, MemberRole, Signal, SignalKind, User};
