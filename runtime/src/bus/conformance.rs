//! One behavioural suite for every [`Bus`], split into cases so one failure does not hide the
//! rest. `runtime/tests/bus_conformance.rs` runs each case against the JetStream log and the
//! embedded log through [`bus_conformance_tests!`](crate::bus_conformance_tests).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use confab_schema::{ChatId, Envelope, LoggedEvent, Signal, SignalId, SignalKind, UserId};
use futures::StreamExt;
use futures::stream::BoxStream;
use time::OffsetDateTime;

use super::{Bus, ChatFilter, LogSettings, ReadError};

const DEADLINE: Duration = Duration::from_secs(10);

/// Two logs that must not see each other's events (two subject prefixes on one server, or two
/// embedded logs).
pub struct Fixture {
    pub bus: Arc<dyn Bus>,
    pub isolated: Arc<dyn Bus>,
}

/// A message event of `chat`.
pub fn message(chat: ChatId, text: &str) -> Envelope {
    let id = SignalId::new();
    let author = UserId::from_subject("conformance", "author");
    Envelope::signal_created(Signal {
        id,
        chat_id: chat,
        kind: SignalKind::Message,
        author_id: author,
        created_at: id.created_at().expect("v7"),
        nonce: None,
        text: Some(text.into()),
        reply_to: None,
        attachments: vec![],
        edited_at: None,
        deleted: false,
        reactions: Default::default(),
        call: None,
    })
}

async fn next(subscriber: &mut BoxStream<'static, LoggedEvent>) -> LoggedEvent {
    tokio::time::timeout(DEADLINE, subscriber.next())
        .await
        .expect("delivered before the deadline")
        .expect("subscription open")
}

/// Every subscriber sees every chat's events in publication order, each with the sequence the
/// publisher got back; sequences increase.
pub async fn delivers_in_order_with_sequences(fixture: Fixture) {
    let bus = fixture.bus;
    bus.check().await.expect("bus is usable");
    let mut first = bus.subscribe().await.expect("subscribes");
    let mut second = bus.subscribe().await.expect("subscribes");
    let (one, two) = (ChatId::new(), ChatId::new());
    let mut sent = Vec::new();
    for i in 0..50 {
        let envelope = message(if i % 2 == 0 { one } else { two }, &format!("m{i}"));
        let seq = bus.publish(&envelope).await.expect("publishes");
        sent.push(LoggedEvent { seq, envelope });
    }
    assert!(
        sent.windows(2).all(|pair| pair[0].seq < pair[1].seq),
        "sequences increase"
    );
    assert_eq!(
        bus.last_seq().await.expect("last"),
        sent.last().expect("sent").seq
    );
    for subscriber in [&mut first, &mut second] {
        for expected in &sent {
            assert_eq!(&next(subscriber).await, expected);
        }
    }
}

/// Publishing an envelope id again stores nothing new and answers the first sequence.
pub async fn drops_a_republished_id(fixture: Fixture) {
    let bus = fixture.bus;
    let mut live = bus.subscribe().await.expect("subscribes");
    let chat = ChatId::new();
    let original = message(chat, "once");
    let seq = bus.publish(&original).await.expect("publishes");
    assert_eq!(bus.publish(&original).await.expect("republishes"), seq);
    let after = message(chat, "after");
    let after_seq = bus.publish(&after).await.expect("publishes");
    assert_eq!(next(&mut live).await.envelope, original);
    assert_eq!(
        next(&mut live).await.envelope,
        after,
        "the republished event came through once"
    );
    let read = bus
        .read(seq - 1, after_seq, ChatFilter::All, 100)
        .await
        .expect("reads");
    assert_eq!(read.len(), 2);
}

/// A read returns exactly the events after a position up to a bound, of the chats asked for.
pub async fn reads_a_range_of_some_chats(fixture: Fixture) {
    let bus = fixture.bus;
    let (one, two, three) = (ChatId::new(), ChatId::new(), ChatId::new());
    let start = bus.last_seq().await.expect("last");
    let mut sent = Vec::new();
    for i in 0..30 {
        let chat = [one, two, three][i % 3];
        let envelope = message(chat, &format!("r{i}"));
        let seq = bus.publish(&envelope).await.expect("publishes");
        sent.push(LoggedEvent { seq, envelope });
    }
    let wanted: HashSet<ChatId> = [one, three].into();
    let from = sent[4].seq;
    let up_to = sent[24].seq;
    let read = bus
        .read(from, up_to, ChatFilter::Only(&wanted), 1000)
        .await
        .expect("reads");
    let expected: Vec<LoggedEvent> = sent
        .iter()
        .filter(|e| e.seq > from && e.seq <= up_to && wanted.contains(&e.envelope.chat_id))
        .cloned()
        .collect();
    assert_eq!(read, expected);
    // The same range a few at a time, each page after the last one's end.
    let mut paged = Vec::new();
    let mut position = from;
    while position < up_to {
        let page = bus
            .read_page(position, up_to, ChatFilter::Only(&wanted), 4, 1000)
            .await
            .expect("reads a page");
        assert!(page.events.len() <= 4, "a page holds at most its max");
        assert!(page.through > position, "each page moves on");
        paged.extend(page.events);
        position = page.through;
    }
    assert_eq!(paged, expected, "the pages make up the range");
    let scanning = bus
        .read_page(from, up_to, ChatFilter::All, 100, 3)
        .await
        .expect("reads a page");
    assert_eq!(scanning.scanned, 3, "it looks at no more than it may");
    assert_eq!(
        scanning.through, sent[7].seq,
        "and ends where it stopped looking"
    );
    let all = bus
        .read(start, u64::MAX, ChatFilter::All, 1000)
        .await
        .expect("reads");
    assert_eq!(all, sent, "nothing else was published on this log");
    let nothing: HashSet<ChatId> = HashSet::new();
    assert!(
        bus.read(start, u64::MAX, ChatFilter::Only(&nothing), 10)
            .await
            .expect("reads")
            .is_empty()
    );
    assert!(matches!(
        bus.read(start, u64::MAX, ChatFilter::All, 29).await,
        Err(ReadError::TooMany(29))
    ));
    // Filtered to many quiet chats, an old position costs a bounded scan, not the whole log.
    let quiet: HashSet<ChatId> = (0..300).map(|_| ChatId::new()).collect();
    assert!(matches!(
        bus.read(start, u64::MAX, ChatFilter::Only(&quiet), 1).await,
        Err(ReadError::TooMany(1))
    ));
    let last = sent.last().expect("sent").seq;
    assert!(
        bus.read(last, u64::MAX, ChatFilter::All, 10)
            .await
            .expect("reads at the end")
            .is_empty()
    );
}

/// A position the log never issued is refused, not read as "nothing new".
pub async fn refuses_a_position_never_issued(fixture: Fixture) {
    let bus = fixture.bus;
    bus.publish(&message(ChatId::new(), "x"))
        .await
        .expect("publishes");
    let last = bus.last_seq().await.expect("last");
    assert!(matches!(
        bus.read(last + 1, u64::MAX, ChatFilter::All, 10).await,
        Err(ReadError::Unknown(_))
    ));
    assert!(matches!(
        bus.read(u64::MAX / 2, u64::MAX, ChatFilter::All, 10).await,
        Err(ReadError::Unknown(_))
    ));
}

/// Retention as configured for this case ([`short_retention`]): a position whose successors
/// expired is refused, and the log's sequence keeps counting.
pub async fn refuses_an_expired_position(fixture: Fixture) {
    let bus = fixture.bus;
    let first = bus
        .publish(&message(ChatId::new(), "soon gone"))
        .await
        .expect("publishes");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match bus
            .read(first - 1, u64::MAX, ChatFilter::All, 100_000)
            .await
        {
            Err(ReadError::Expired(_)) => break,
            Ok(_) => {}
            Err(other) => panic!("unexpected {other}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the event never expired"
        );
        // Something is published meanwhile, as in a live deployment.
        bus.publish(&message(ChatId::new(), "tick"))
            .await
            .expect("publishes");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let later = bus
        .publish(&message(ChatId::new(), "later"))
        .await
        .expect("publishes");
    assert!(later > first);
}

/// The settings [`refuses_an_expired_position`] runs with.
pub fn short_retention() -> LogSettings {
    LogSettings {
        retention: Duration::from_secs(1),
        duplicate_window: Duration::from_millis(500),
    }
}

/// A subscriber that stops reading for a while still gets every event, in order, when it reads
/// again.
pub async fn a_slow_subscriber_misses_nothing(fixture: Fixture) {
    let bus = fixture.bus;
    let mut slow = bus.subscribe().await.expect("subscribes");
    let chat = ChatId::new();
    let mut seqs = Vec::new();
    let published: Vec<Envelope> = (0..5000).map(|i| message(chat, &format!("s{i}"))).collect();
    for chunk in published.chunks(100) {
        let acks = futures::future::join_all(chunk.iter().map(|e| bus.publish(e))).await;
        for ack in acks {
            seqs.push(ack.expect("publishes"));
        }
    }
    seqs.sort_unstable();
    for expected in seqs {
        assert_eq!(next(&mut slow).await.seq, expected);
    }
}

/// Ephemeral events reach live subscribers and are not logged.
pub async fn ephemeral_events_are_delivered_not_logged(fixture: Fixture) {
    let bus = fixture.bus;
    let mut live = bus.subscribe_ephemeral().await.expect("subscribes");
    let mut other = fixture
        .isolated
        .subscribe_ephemeral()
        .await
        .expect("subscribes");
    let before = bus.last_seq().await.expect("last");
    let typing = message(ChatId::new(), "typing");
    bus.publish_ephemeral(&typing).await.expect("publishes");
    let received = tokio::time::timeout(DEADLINE, live.next())
        .await
        .expect("delivered before the deadline")
        .expect("subscription open");
    assert_eq!(received, typing);
    assert_eq!(bus.last_seq().await.expect("last"), before, "not logged");
    let own = message(ChatId::new(), "other's");
    fixture
        .isolated
        .publish_ephemeral(&own)
        .await
        .expect("publishes");
    let received = tokio::time::timeout(DEADLINE, other.next())
        .await
        .expect("delivered before the deadline")
        .expect("subscription open");
    assert_eq!(received, own, "isolated from the other log");
}

/// The log tells when it appended each event it holds, by its own clock, and nothing of a
/// sequence it never issued. Its clock may be another machine's: "when" is checked loosely.
pub async fn tells_when_it_appended_an_event(fixture: Fixture) {
    let bus = fixture.bus;
    let before = OffsetDateTime::now_utc();
    let seq = bus
        .publish(&message(ChatId::new(), "stamped"))
        .await
        .expect("publishes");
    let after = OffsetDateTime::now_utc();
    let appended = bus
        .appended_at(seq)
        .await
        .expect("answers")
        .expect("the log holds the event");
    let leeway = Duration::from_secs(5);
    assert!(
        appended >= before - leeway && appended <= after + leeway,
        "appended at {appended}, published between {before} and {after}"
    );
    assert_eq!(bus.appended_at(seq + 1_000).await.expect("answers"), None);
}

/// Another prefix (or another embedded log) hears nothing of this one.
pub async fn prefixes_are_isolated(fixture: Fixture) {
    let mut other = fixture.isolated.subscribe().await.expect("subscribes");
    fixture
        .bus
        .publish(&message(ChatId::new(), "not for the other"))
        .await
        .expect("publishes");
    let own = message(ChatId::new(), "isolated");
    fixture.isolated.publish(&own).await.expect("publishes");
    assert_eq!(
        next(&mut other).await.envelope,
        own,
        "the isolated log saw only its own event"
    );
}

/// One `#[tokio::test]` per case of the bus conformance suite. `$make` is an async function from
/// [`LogSettings`] to a [`Fixture`], or `None` when its backend is unavailable and skipped.
#[macro_export]
macro_rules! bus_conformance_tests {
    ($module:ident, $make:path) => {
        mod $module {
            use $crate::bus::LogSettings;
            use $crate::bus::conformance as suite;

            macro_rules! case {
                ($case:ident, $settings:expr) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        if let Some(fixture) = $make($settings).await {
                            suite::$case(fixture).await;
                        }
                    }
                };
            }

            case!(delivers_in_order_with_sequences, LogSettings::default());
            case!(drops_a_republished_id, LogSettings::default());
            case!(reads_a_range_of_some_chats, LogSettings::default());
            case!(refuses_a_position_never_issued, LogSettings::default());
            case!(refuses_an_expired_position, suite::short_retention());
            case!(a_slow_subscriber_misses_nothing, LogSettings::default());
            case!(prefixes_are_isolated, LogSettings::default());
            case!(tells_when_it_appended_an_event, LogSettings::default());
            case!(
                ephemeral_events_are_delivered_not_logged,
                LogSettings::default()
            );
        }
    };
}
