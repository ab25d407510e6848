//! Racing changes to one call settle to a consistent state: the last participants leaving at once
//! end the call (one of them sees nobody left), and an answer racing the last leave of an active
//! call is refused rather than joining a call that is over. A change whose signal was not written
//! (the write failed, or a write before it timed out after it was made) gets it once, from its
//! retry or from the sweep; and calls never stored hold up no missed call. The interleavings and
//! failures are forced by a store that holds or fails the writes a test names. On the embedded
//! default and on the real stack (the CQL store and NATS).

mod support;

use support::on_both_stacks;

use confab_api::domain::Outcome;
use confab_api::domain::chats::ChatToCreate;
use confab_api::error::ApiError;
use confab_api::store::Store;
use confab_schema::call::{Call, CallState, CallStatus};
use confab_schema::{ChatId, ChatKind, SignalKind, User, UserId};
use support::held_store::{Held, HeldApi};
use support::{DEADLINE, Stack};

impl HeldApi {
    async fn group(&self, owner: &User, members: &[&User]) -> ChatId {
        let chat = ChatToCreate::parse(
            ChatKind::Group,
            Some("call".into()),
            None,
            members.iter().map(|m| m.id).collect(),
        )
        .unwrap();
        match self.state.create_chat(owner, chat).await.unwrap() {
            confab_api::domain::Outcome::Created(chat)
            | confab_api::domain::Outcome::Existing(chat) => chat.id,
        }
    }

    /// The states of call `id` in `chat`'s history, oldest first, with their authors.
    async fn call_history(&self, chat: ChatId, id: uuid::Uuid) -> Vec<(CallState, UserId)> {
        let mut history: Vec<(CallState, UserId)> = self
            .store
            .signals_before(chat, None, 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|s| s.kind == SignalKind::Call)
            .filter_map(|s| {
                let call = s.call?;
                (call.call_id == id).then_some((call.state, s.author_id))
            })
            .collect();
        history.reverse();
        history
    }
}

/// The last two participants leave at once: the call ends, once. The first leave is held at its
/// removal while the second runs through, so each reads the other as present before its own
/// removal.
async fn the_last_participants_leaving_at_once_end_the_call(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = setup.group(&alice, &[&bob]).await;
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    let joined = setup.state.join_call(bob.id, call.id).await.unwrap();
    assert_eq!(joined.status, CallStatus::Active);

    setup.store.hold_next(Held::CallParticipant(false));
    let first = tokio::spawn({
        let state = setup.state.clone();
        async move { state.leave_call(alice.id, call.id).await }
    });
    setup.store.gate.arrived(1).await;
    setup.state.leave_call(bob.id, call.id).await.unwrap();
    setup.store.gate.release(1).await;
    tokio::time::timeout(DEADLINE, first)
        .await
        .expect("the held leave ends")
        .unwrap()
        .unwrap();

    let after = setup.store.get_call(call.id).await.unwrap().unwrap();
    assert_eq!(
        after.status,
        CallStatus::Ended,
        "a call nobody is left in ends"
    );
    assert!(
        setup
            .store
            .call_participants(call.id)
            .await
            .unwrap()
            .is_empty()
    );
    let ended = setup
        .call_history(chat, call.id)
        .await
        .into_iter()
        .filter(|(state, _)| *state == CallState::Ended)
        .count();
    assert_eq!(ended, 1, "one `ended` signal");
    setup.clean_up().await;
}

on_both_stacks!(the_last_participants_leaving_at_once_end_the_call);

/// An answer racing the last leave of an active call: held before it puts its participant in
/// while the last participant leaves and the call ends, it is refused (409) and takes its
/// participant back out, so the call stays ended with nobody in it.
async fn a_join_racing_the_last_leave_is_refused(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let carol = setup.user("carol").await;
    let chat = setup.group(&alice, &[&bob, &carol]).await;
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    setup.state.join_call(bob.id, call.id).await.unwrap();
    setup.state.leave_call(bob.id, call.id).await.unwrap();

    setup.store.hold_next(Held::CallParticipant(true));
    let join = tokio::spawn({
        let state = setup.state.clone();
        async move { state.join_call(carol.id, call.id).await }
    });
    setup.store.gate.arrived(1).await;
    let left = setup.state.leave_call(alice.id, call.id).await.unwrap();
    assert_eq!(left.status, CallStatus::Ended);
    setup.store.gate.release(1).await;
    let joined = tokio::time::timeout(DEADLINE, join)
        .await
        .expect("the held join ends")
        .unwrap();
    assert!(
        matches!(joined, Err(ApiError::Conflict(_))),
        "a join of a call that ended while it was on its way: {joined:?}"
    );
    let after = setup.store.get_call(call.id).await.unwrap().unwrap();
    assert_eq!(after.status, CallStatus::Ended);
    assert!(
        setup
            .store
            .call_participants(call.id)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        !setup
            .call_history(chat, call.id)
            .await
            .contains(&(CallState::Joined, carol.id)),
        "no `joined` for the refused answer"
    );
    setup.clean_up().await;
}

on_both_stacks!(a_join_racing_the_last_leave_is_refused);

/// Two joins of one member at once (two devices answering together): both are held where they
/// keep their join as pending, after each read the member as not in the call and no join pending,
/// so each goes on under a join of its own. The member is in the call once, with one `joined`
/// signal, and both joins answer the call as active with them in it.
async fn two_joins_of_one_member_at_once_are_one_join(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = setup.group(&alice, &[&bob]).await;
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());

    setup.store.hold(Held::PendingCallSignal(CallState::Joined));
    let (bob_id, call_id) = (bob.id, call.id);
    let join = || {
        let state = setup.state.clone();
        tokio::spawn(async move { state.join_call(bob_id, call_id).await })
    };
    let (first, second) = (join(), join());
    setup.store.gate.arrived(2).await;
    setup.store.gate.release(2).await;
    for joined in [first, second] {
        let joined = tokio::time::timeout(DEADLINE, joined)
            .await
            .expect("the held join ends")
            .unwrap()
            .unwrap();
        assert_eq!(joined.status, CallStatus::Active);
        assert!(joined.participants.contains(&bob.id), "{joined:?}");
    }
    let mut participants = setup.store.call_participants(call.id).await.unwrap();
    participants.sort();
    let mut both = vec![alice.id, bob.id];
    both.sort();
    assert_eq!(participants, both);
    assert_eq!(
        setup.states_by(chat, call.id, bob.id).await,
        [CallState::Joined],
        "one `joined` for two joins at once"
    );

    // A leave after them is one leave, and the next join a join of its own.
    setup.state.leave_call(bob.id, call.id).await.unwrap();
    setup.state.join_call(bob.id, call.id).await.unwrap();
    assert_eq!(
        setup.states_by(chat, call.id, bob.id).await,
        [CallState::Joined, CallState::Left, CallState::Joined]
    );
    setup.clean_up().await;
}

on_both_stacks!(two_joins_of_one_member_at_once_are_one_join);

/// Two leaves of one member at once (two devices hanging up together): both are held where they
/// keep their leave as pending, after each read the member as in the call and no leave pending.
/// Each leave goes under the join it ends, so the history has one `left`.
async fn two_leaves_of_one_member_at_once_are_one_leave(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = setup.group(&alice, &[&bob]).await;
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    setup.state.join_call(bob.id, call.id).await.unwrap();

    setup.store.hold(Held::PendingCallSignal(CallState::Left));
    let (bob_id, call_id) = (bob.id, call.id);
    let leave = || {
        let state = setup.state.clone();
        tokio::spawn(async move { state.leave_call(bob_id, call_id).await })
    };
    let (first, second) = (leave(), leave());
    setup.store.gate.arrived(2).await;
    setup.store.gate.release(2).await;
    for left in [first, second] {
        let left = tokio::time::timeout(DEADLINE, left)
            .await
            .expect("the held leave ends")
            .unwrap()
            .unwrap();
        assert_eq!(left.status, CallStatus::Active, "alice is still in");
        assert!(!left.participants.contains(&bob.id), "{left:?}");
    }
    assert_eq!(
        setup.states_by(chat, call.id, bob.id).await,
        [CallState::Joined, CallState::Left],
        "one `left` for two leaves at once"
    );
    setup.clean_up().await;
}

on_both_stacks!(two_leaves_of_one_member_at_once_are_one_leave);

impl HeldApi {
    /// How many `state` signals of call `id` the history holds, by `author`.
    async fn signals_of(
        &self,
        chat: ChatId,
        id: uuid::Uuid,
        state: CallState,
        author: UserId,
    ) -> usize {
        self.call_history(chat, id)
            .await
            .into_iter()
            .filter(|signal| *signal == (state, author))
            .count()
    }

    /// The states of call `id` in `chat`'s history by `author`, oldest first.
    async fn states_by(&self, chat: ChatId, id: uuid::Uuid, author: UserId) -> Vec<CallState> {
        self.call_history(chat, id)
            .await
            .into_iter()
            .filter(|(_, by)| *by == author)
            .map(|(state, _)| state)
            .collect()
    }
}

/// A join whose `joined` signal was not written (the write failed, or timed out after it was made),
/// or whose answer timed out after it moved the call: the member is in the call all the same, and
/// their retry writes the signal, once. A member who leaves and joins again has each of their joins
/// and leaves in the history.
async fn a_join_whose_signal_failed_is_announced_by_its_retry(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let carol = setup.user("carol").await;
    let dave = setup.user("dave").await;
    let chat = setup.group(&alice, &[&bob, &carol, &dave]).await;
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());

    for (member, fault) in [
        (&bob, Held::CallStatus(CallStatus::Active)),
        (&carol, Held::CallSignal(CallState::Joined)),
        (&dave, Held::CallSignal(CallState::Joined)),
    ] {
        if member.id == carol.id {
            setup.store.fail_next(fault);
        } else {
            setup.store.fail_next_after(fault);
        }
        let failed = setup.state.join_call(member.id, call.id).await;
        assert!(failed.is_err(), "{fault:?} failed: {failed:?}");
        for _ in 0..2 {
            let joined = setup.state.join_call(member.id, call.id).await.unwrap();
            assert_eq!(joined.status, CallStatus::Active);
        }
        assert_eq!(
            setup
                .signals_of(chat, call.id, CallState::Joined, member.id)
                .await,
            1,
            "one `joined` for {}'s join after {fault:?} failed, written by its retry",
            member.username
        );
    }

    setup.state.leave_call(bob.id, call.id).await.unwrap();
    setup.state.join_call(bob.id, call.id).await.unwrap();
    setup.state.leave_call(bob.id, call.id).await.unwrap();
    assert_eq!(
        setup.states_by(chat, call.id, bob.id).await,
        [
            CallState::Joined,
            CallState::Left,
            CallState::Joined,
            CallState::Left
        ],
        "a second join and leave are history too"
    );
    setup.clean_up().await;
}

on_both_stacks!(a_join_whose_signal_failed_is_announced_by_its_retry);

/// A leave whose `left` signal was not written: the member is out of the call all the same; their
/// retry writes the signal, once, and, when they were the last one in, ends the call.
async fn a_leave_whose_signal_failed_is_finished_by_its_retry(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = setup.group(&alice, &[&bob]).await;
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    setup.state.join_call(bob.id, call.id).await.unwrap();

    setup.store.fail_next(Held::CallSignal(CallState::Left));
    let failed = setup.state.leave_call(bob.id, call.id).await;
    assert!(failed.is_err(), "the signal failed: {failed:?}");
    let left = setup.state.leave_call(bob.id, call.id).await.unwrap();
    assert_eq!(left.status, CallStatus::Active);
    assert_eq!(left.participants, [alice.id]);
    assert_eq!(
        setup
            .signals_of(chat, call.id, CallState::Left, bob.id)
            .await,
        1,
        "one `left` for bob's leave, written by its retry"
    );
    let again = setup.state.leave_call(bob.id, call.id).await;
    assert!(
        matches!(again, Err(ApiError::Conflict(_))),
        "bob is out: {again:?}"
    );

    // The last one out: the failed leave wrote no signal and did not end the call; its retry does both.
    setup.store.fail_next(Held::CallSignal(CallState::Left));
    let failed = setup.state.leave_call(alice.id, call.id).await;
    assert!(failed.is_err(), "the signal failed: {failed:?}");
    let left = setup.state.leave_call(alice.id, call.id).await.unwrap();
    assert_eq!(
        left.status,
        CallStatus::Ended,
        "a call nobody is left in ends"
    );
    assert_eq!(
        setup.states_by(chat, call.id, alice.id).await,
        [CallState::Started, CallState::Left, CallState::Ended]
    );
    setup.clean_up().await;
}

on_both_stacks!(a_leave_whose_signal_failed_is_finished_by_its_retry);

/// A member who joins again while their leave is still under way, and whose join fails before
/// its `joined` is written: the leave, ending after, does not take away the join's pending record,
/// so the join's retry still writes its `joined` (the member is in the call; the history must say
/// so).
async fn a_rejoin_during_a_leave_keeps_its_pending_join(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = setup.group(&alice, &[&bob]).await;
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    setup.state.join_call(bob.id, call.id).await.unwrap();

    setup.store.hold_next(Held::CallSignal(CallState::Left));
    let leave = tokio::spawn({
        let state = setup.state.clone();
        let (bob, call) = (bob.id, call.id);
        async move { state.leave_call(bob, call).await }
    });
    setup.store.gate.arrived(1).await;
    setup.store.fail_next(Held::CallSignal(CallState::Joined));
    let failed = setup.state.join_call(bob.id, call.id).await;
    assert!(failed.is_err(), "the join's signal failed: {failed:?}");
    setup.store.gate.release(1).await;
    let left = tokio::time::timeout(DEADLINE, leave)
        .await
        .expect("the held leave ends")
        .unwrap();
    assert!(left.is_ok(), "{left:?}");
    let joined = setup.state.join_call(bob.id, call.id).await.unwrap();
    assert!(joined.participants.contains(&bob.id), "{joined:?}");
    assert_eq!(
        setup.states_by(chat, call.id, bob.id).await,
        [CallState::Joined, CallState::Left, CallState::Joined],
        "bob is in the call, and the history says so"
    );
    setup.clean_up().await;
}

on_both_stacks!(a_rejoin_during_a_leave_keeps_its_pending_join);

/// A member taken out of a chat is taken out of its calls as best it can be; when that fails and
/// they were the last one in, the call is left answered with nobody in it. It ends when next read:
/// a new start rings as a new call instead of quietly joining the empty one.
async fn an_answered_call_nobody_is_left_in_ends(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let carol = setup.user("carol").await;
    let chat = setup.group(&alice, &[&bob, &carol]).await;
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    setup.state.join_call(bob.id, call.id).await.unwrap();
    setup.state.leave_call(alice.id, call.id).await.unwrap();

    setup.store.fail_next(Held::CallParticipant(false));
    setup
        .state
        .remove_member(alice.id, chat, bob.id)
        .await
        .expect("bob is removed; taking him out of the call fails");
    let again = setup.state.start_call(&carol, chat).await.unwrap();
    assert!(
        matches!(again, Outcome::Created(_)),
        "a new call rings: {again:?}"
    );
    let again = the_call(again);
    assert_ne!(again.id, call.id);
    assert_eq!(again.status, CallStatus::Ringing);
    assert_eq!(
        setup
            .state
            .get_call(alice.id, call.id)
            .await
            .unwrap()
            .status,
        CallStatus::Ended
    );
    assert_eq!(
        setup.states_by(chat, call.id, alice.id).await,
        [CallState::Started, CallState::Left, CallState::Ended],
        "the empty call's end is in the history"
    );
    setup.clean_up().await;
}

on_both_stacks!(an_answered_call_nobody_is_left_in_ends);

/// A join that comes while the last participant's leave is under way (taken out, its `left` not
/// written yet) joins the call: the leave reads who is left after its write, and finds the
/// joiner. The end of a call nobody is in is only for calls no leave is deciding.
async fn a_join_during_the_last_leave_keeps_the_call(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let carol = setup.user("carol").await;
    let chat = setup.group(&alice, &[&bob, &carol]).await;
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    setup.state.join_call(carol.id, call.id).await.unwrap();
    setup.state.leave_call(carol.id, call.id).await.unwrap();

    setup.store.hold_next(Held::CallSignal(CallState::Left));
    let leave = tokio::spawn({
        let state = setup.state.clone();
        let (alice, call) = (alice.id, call.id);
        async move { state.leave_call(alice, call).await }
    });
    setup.store.gate.arrived(1).await;
    let joined = setup.state.join_call(bob.id, call.id).await;
    assert!(
        joined
            .as_ref()
            .is_ok_and(|joined| joined.status == CallStatus::Active),
        "bob joins while alice's leave is under way: {joined:?}"
    );
    setup.store.gate.release(1).await;
    let left = tokio::time::timeout(DEADLINE, leave)
        .await
        .expect("the held leave ends")
        .unwrap()
        .unwrap();
    assert_eq!(left.status, CallStatus::Active, "bob is in: {left:?}");
    assert_eq!(
        setup
            .state
            .get_call(bob.id, call.id)
            .await
            .unwrap()
            .participants,
        [bob.id]
    );
    setup.clean_up().await;
}

on_both_stacks!(a_join_during_the_last_leave_keeps_the_call);

/// A call's `ended` is written under its starter's name whoever ended it (here the one called,
/// declining): it does not count as the starter reading the chat, so a message sent to them
/// while it rang stays unread, and they are not among those who saw it.
async fn a_call_ended_by_another_leaves_the_starters_unread(stack: Stack) {
    use confab_api::domain::inputs::{MessageText, PageLimit};
    use confab_api::domain::signals::NewMessage;
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = ChatToCreate::parse(ChatKind::Direct, None, None, vec![bob.id]).unwrap();
    let chat = match setup.state.create_chat(&alice, chat).await.unwrap() {
        Outcome::Created(chat) | Outcome::Existing(chat) => chat.id,
    };
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    let message = NewMessage {
        nonce: None,
        text: Some(MessageText::parse("can't talk now".into()).unwrap()),
        reply_to: None,
        attachments: Default::default(),
    };
    let sent = match setup.state.send_message(&bob, chat, message).await.unwrap() {
        Outcome::Created(signal) | Outcome::Existing(signal) => signal.id,
    };
    let ended = setup.state.end_call(bob.id, call.id).await.unwrap();
    assert_eq!(ended.status, CallStatus::Ended);
    assert_eq!(
        setup.states_by(chat, call.id, alice.id).await,
        [CallState::Started, CallState::Ended]
    );
    assert_eq!(
        setup
            .state
            .get_chat(alice.id, chat)
            .await
            .unwrap()
            .unread_count,
        1,
        "bob's message is unread to alice"
    );
    let seen = setup
        .state
        .list_reached(
            confab_api::store::MarkerKind::Read,
            bob.id,
            chat,
            sent,
            None,
            PageLimit::parse(Some(10)).unwrap(),
        )
        .await
        .unwrap();
    let seen = serde_json::to_value(&seen).unwrap();
    assert_eq!(
        seen["items"].as_array().unwrap().len(),
        1,
        "bob only: {seen}"
    );
    setup.clean_up().await;
}

on_both_stacks!(a_call_ended_by_another_leaves_the_starters_unread);

/// An end whose `ended` signal was not written (the write failed, or the status change timed out
/// after it was made): the call is over all the same, and the sweep writes the signal, once.
async fn an_end_whose_signal_failed_is_finished_by_the_sweep(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = setup.group(&alice, &[&bob]).await;
    let ended = |id| setup.signals_of(chat, id, CallState::Ended, alice.id);

    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    setup.state.join_call(bob.id, call.id).await.unwrap();
    setup.store.fail_next(Held::CallSignal(CallState::Ended));
    let failed = setup.state.end_call(alice.id, call.id).await;
    assert!(failed.is_err(), "the signal failed: {failed:?}");
    let retried = setup.state.end_call(alice.id, call.id).await.unwrap();
    assert_eq!(retried.status, CallStatus::Ended);
    setup
        .state
        .sweep_missed_calls(time::OffsetDateTime::now_utc())
        .await
        .unwrap();
    assert_eq!(
        ended(call.id).await,
        1,
        "one `ended` signal, written by the sweep"
    );

    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    setup.state.join_call(bob.id, call.id).await.unwrap();
    setup
        .store
        .fail_next_after(Held::CallStatus(CallStatus::Ended));
    let failed = setup.state.end_call(alice.id, call.id).await;
    assert!(failed.is_err(), "the status change timed out: {failed:?}");
    for _ in 0..2 {
        setup
            .state
            .sweep_missed_calls(time::OffsetDateTime::now_utc())
            .await
            .unwrap();
    }
    assert_eq!(
        setup.store.get_call(call.id).await.unwrap().unwrap().status,
        CallStatus::Ended
    );
    assert_eq!(
        ended(call.id).await,
        1,
        "one `ended` signal, written by the sweep"
    );
    setup.clean_up().await;
}

on_both_stacks!(an_end_whose_signal_failed_is_finished_by_the_sweep);

/// A sweep that made a call missed and failed to write its `missed` signal: the next sweep writes
/// it, once.
async fn a_missed_call_whose_signal_failed_is_finished_by_the_next_sweep(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = setup.group(&alice, &[&bob]).await;
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    let rung_out = call.ring_until + time::Duration::seconds(1);

    setup.store.fail_next(Held::CallSignal(CallState::Missed));
    let failed = setup.state.sweep_missed_calls(rung_out).await;
    assert!(failed.is_err(), "the signal failed: {failed:?}");
    assert_eq!(
        setup.store.get_call(call.id).await.unwrap().unwrap().status,
        CallStatus::Missed
    );
    for _ in 0..2 {
        setup.state.sweep_missed_calls(rung_out).await.unwrap();
    }
    assert_eq!(
        setup
            .signals_of(chat, call.id, CallState::Missed, alice.id)
            .await,
        1,
        "one `missed` signal, written by the next sweep"
    );
    setup.clean_up().await;
}

on_both_stacks!(a_missed_call_whose_signal_failed_is_finished_by_the_next_sweep);

/// Starts whose call was never stored (on CQL a start lists its call for the sweeper before it
/// stores it, and may fail in between), more of them than a sweep reads at once: they hold up no
/// call that rings out after them, and their listings are forgotten once their calls can no longer
/// come.
async fn unstored_calls_hold_up_no_missed_call(stack: Stack) {
    /// More than a sweep reads at once.
    const UNSTORED: usize = 101;
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = setup.group(&alice, &[&bob]).await;

    setup.store.fail(Held::CallCreated, UNSTORED);
    for _ in 0..UNSTORED {
        let failed = setup.state.start_call(&alice, chat).await;
        assert!(failed.is_err(), "the call was not stored: {failed:?}");
    }
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    let rung_out = call.ring_until + time::Duration::seconds(1);
    let listed: std::collections::HashSet<uuid::Uuid> = setup
        .store
        .listed_calls_due(rung_out, None, 1_000)
        .await
        .unwrap()
        .into_iter()
        .map(|listing| listing.id)
        .collect();
    // The scenario, not the fix: the failed starts' listings are the held store's own (what a
    // CQL start that failed after its first write leaves), so this only checks the setup.
    assert_eq!(
        listed.len(),
        UNSTORED + 1,
        "the scenario: every start's call is listed"
    );

    let missed = setup.state.sweep_missed_calls(rung_out).await.unwrap();
    assert_eq!(
        missed, 1,
        "the stored call rang out behind the unstored ones"
    );
    assert_eq!(
        setup.store.get_call(call.id).await.unwrap().unwrap().status,
        CallStatus::Missed
    );
    assert_eq!(
        setup
            .signals_of(chat, call.id, CallState::Missed, alice.id)
            .await,
        1
    );

    let later = rung_out + time::Duration::hours(1);
    setup.state.sweep_missed_calls(later).await.unwrap();
    assert_eq!(
        setup
            .store
            .listed_calls_due(later, None, 1_000)
            .await
            .unwrap(),
        [],
        "the listings of calls never stored are forgotten"
    );
    setup.clean_up().await;
}

on_both_stacks!(unstored_calls_hold_up_no_missed_call);

/// A call whose row landed after the sweep forgot its listing (a write applied late, past the ten
/// minutes the sweep waits for a listed call): still ringing long past its ring time, and listed
/// nowhere. It shows as missed, cannot be answered, is no live call of its chat, and its reader
/// makes it missed, with its `missed` signal, once.
async fn a_call_stored_after_its_ring_time_is_missed(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = setup.group(&alice, &[&bob]).await;
    let now = confab_schema::model::to_millis(time::OffsetDateTime::now_utc());
    let late = confab_api::store::CallRecord {
        id: uuid::Uuid::now_v7(),
        chat_id: chat,
        started_by: alice.id,
        started_at: now - time::Duration::minutes(20),
        ring_until: now - time::Duration::minutes(19),
        status: CallStatus::Ringing,
    };
    setup.store.create_call(&late).await.unwrap();
    setup
        .store
        .forget_listed_call(&confab_api::store::ListedCall {
            id: late.id,
            chat_id: chat,
            due: late.ring_until,
        })
        .await
        .unwrap();

    let shown = setup.state.get_call(bob.id, late.id).await.unwrap();
    assert_eq!(shown.status, CallStatus::Missed, "{shown:?}");
    let answered = setup.state.join_call(bob.id, late.id).await;
    assert!(
        matches!(answered, Err(ApiError::Conflict(_))),
        "a call rung out cannot be answered: {answered:?}"
    );
    assert_eq!(
        setup.store.get_call(late.id).await.unwrap().unwrap().status,
        CallStatus::Missed
    );
    assert!(
        setup.store.live_calls(chat).await.unwrap().is_empty(),
        "no live call of the chat"
    );
    let later = time::OffsetDateTime::now_utc() + time::Duration::minutes(1);
    setup.state.sweep_missed_calls(later).await.unwrap();
    assert_eq!(
        setup.states_by(chat, late.id, alice.id).await,
        [CallState::Missed],
        "one `missed` signal"
    );
    assert!(
        setup
            .store
            .listed_calls_due(later, None, 1_000)
            .await
            .unwrap()
            .iter()
            .all(|listing| listing.id != late.id),
        "nothing of it is left listed"
    );
    setup.clean_up().await;
}

on_both_stacks!(a_call_stored_after_its_ring_time_is_missed);

/// A start whose `started` signal was not written: the call rings all the same, the start
/// answers with it (so the client has its call, and a retry starts no second one), and the sweep
/// writes the signal, once, before anything else of the call.
async fn a_start_whose_signal_failed_answers_its_call(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = setup.group(&alice, &[&bob]).await;

    setup.store.fail_next(Held::CallSignal(CallState::Started));
    let answered = setup.state.start_call(&alice, chat).await;
    let live = setup.store.live_calls(chat).await.unwrap();
    let [call] = live.as_slice() else {
        panic!("one call stored: {live:?}");
    };
    let call = call.clone();
    assert_eq!(call.status, CallStatus::Ringing);
    let answered = answered.expect("the start answers with the call it stored");
    assert!(
        matches!(&answered, Outcome::Created(started) if started.id == call.id),
        "the start answers with its call: {answered:?}"
    );
    assert_eq!(setup.states_by(chat, call.id, alice.id).await, []);

    let now = time::OffsetDateTime::now_utc();
    for _ in 0..2 {
        setup.state.sweep_missed_calls(now).await.unwrap();
    }
    assert_eq!(
        setup.states_by(chat, call.id, alice.id).await,
        [CallState::Started],
        "one `started`, written by the sweep"
    );
    let rung_out = call.ring_until + time::Duration::seconds(1);
    setup.state.sweep_missed_calls(rung_out).await.unwrap();
    assert_eq!(
        setup.states_by(chat, call.id, alice.id).await,
        [CallState::Started, CallState::Missed]
    );

    // A start that wrote its signal leaves nothing for the sweep before its ring time.
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    assert_eq!(
        setup
            .store
            .listed_calls_due(
                call.ring_until - time::Duration::milliseconds(1),
                None,
                1_000
            )
            .await
            .unwrap(),
        [],
        "no listing left by the start"
    );
    setup.clean_up().await;
}

on_both_stacks!(a_start_whose_signal_failed_answers_its_call);

/// The call a start answered with, started or joined.
fn the_call(started: Outcome<Call>) -> Call {
    match started {
        Outcome::Created(call) | Outcome::Existing(call) => call,
    }
}

/// Two members start a call in one chat at once: one call, with both in it, and one `started`;
/// a member starting a call while it is live joins it; once it is over, a start starts another.
/// Both starts are held at their store write, so neither stores before the other has looked.
async fn two_starts_in_one_chat_at_once_are_one_call(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let carol = setup.user("carol").await;
    let chat = setup.group(&alice, &[&bob, &carol]).await;

    setup.store.hold(Held::CallCreated);
    let starts: Vec<_> = [alice.clone(), bob.clone()]
        .into_iter()
        .map(|user| {
            let state = setup.state.clone();
            tokio::spawn(async move { state.start_call(&user, chat).await })
        })
        .collect();
    setup.store.gate.arrived(2).await;
    setup.store.lift(Held::CallCreated);
    setup.store.gate.release(2).await;
    let mut calls = Vec::new();
    for start in starts {
        let started = tokio::time::timeout(DEADLINE, start)
            .await
            .expect("the held start ends")
            .unwrap()
            .unwrap();
        calls.push(the_call(started));
    }
    assert_eq!(
        calls[0].id, calls[1].id,
        "one call for both starts: {calls:?}"
    );
    let call = calls[0].id;
    let live = setup.store.live_calls(chat).await.unwrap();
    assert_eq!(live.len(), 1, "one live call in the chat: {live:?}");
    let mut expected = vec![alice.id, bob.id];
    expected.sort();
    let mut participants = setup.store.call_participants(call).await.unwrap();
    participants.sort();
    assert_eq!(participants, expected, "both starters are in the call");
    assert_eq!(
        setup.store.get_call(call).await.unwrap().unwrap().status,
        CallStatus::Active
    );
    let history = setup.call_history(chat, call).await;
    assert_eq!(
        history
            .iter()
            .filter(|(state, _)| *state == CallState::Started)
            .count(),
        1,
        "one `started`: {history:?}"
    );

    let joined = the_call(setup.state.start_call(&carol, chat).await.unwrap());
    assert_eq!(
        joined.id, call,
        "a start in a chat with a live call joins it"
    );
    assert!(joined.participants.contains(&carol.id), "{joined:?}");

    setup.state.end_call(alice.id, call).await.unwrap();
    let next = the_call(setup.state.start_call(&carol, chat).await.unwrap());
    assert_ne!(next.id, call, "a call that is over is not joined");
    assert_eq!(next.participants, [carol.id]);
    setup.clean_up().await;
}

on_both_stacks!(two_starts_in_one_chat_at_once_are_one_call);

/// A circle expires while a call rings in one of its chats: the removal ends the call with the
/// chat, and the sweep that finds it rung out afterwards writes nothing into the removed chat
/// (no `missed` signal, no live-call rows) and forgets its listing.
async fn a_call_in_a_removed_chat_writes_nothing_into_it(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = setup.group(&alice, &[&bob]).await;
    let now = time::OffsetDateTime::now_utc();
    let circle = confab_schema::circle::Circle {
        id: confab_schema::CircleId::new(),
        name: "brief".into(),
        description: None,
        rules: None,
        owner_id: alice.id,
        access_code: Some(
            confab_api::domain::inputs::AccessCode::generate()
                .as_str()
                .to_owned(),
        ),
        max_members: 2,
        created_at: confab_schema::model::to_millis(now - time::Duration::hours(2)),
        expires_at: confab_schema::model::to_millis(now - time::Duration::hours(1)),
    };
    setup.store.create_circle(&circle).await.unwrap();
    setup.store.add_circle_chat(circle.id, chat).await.unwrap();
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());

    let removed = setup
        .state
        .sweep_expired_circles_in(10, std::time::Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(removed, 1, "the expired circle is removed");
    assert!(setup.store.get_chat(chat).await.unwrap().is_none());
    let record = setup.store.get_call(call.id).await.unwrap();
    assert!(
        record.as_ref().is_none_or(|r| !r.status.is_live()),
        "the removed chat's call is still live: {record:?}"
    );

    let rung_out = call.ring_until + time::Duration::seconds(1);
    setup.state.sweep_missed_calls(rung_out).await.unwrap();
    let written = setup.store.signals_before(chat, None, 100).await.unwrap();
    assert!(
        written.is_empty(),
        "written into the removed chat: {written:?}"
    );
    let live = setup.store.live_calls(chat).await.unwrap();
    assert!(live.is_empty(), "the removed chat's live calls: {live:?}");
    let listed = setup
        .store
        .listed_calls_due(rung_out + time::Duration::hours(1), None, 1_000)
        .await
        .unwrap();
    assert!(
        listed.iter().all(|listing| listing.id != call.id),
        "the removed chat's call is still listed: {listed:?}"
    );
    setup.clean_up().await;
}

on_both_stacks!(a_call_in_a_removed_chat_writes_nothing_into_it);

/// A call starts in a chat that is then removed without it (a start that passed its membership
/// check just before the removal): the sweep that finds it rung out writes nothing into the
/// removed chat (no `missed` signal, no live-call rows) and forgets its listing.
async fn the_sweep_writes_nothing_into_a_removed_chat(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let chat = setup.group(&alice, &[&bob]).await;
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    setup.store.delete_chat(chat).await.unwrap();

    let rung_out = call.ring_until + time::Duration::seconds(1);
    setup.state.sweep_missed_calls(rung_out).await.unwrap();
    let written: Vec<_> = setup
        .store
        .signals_before(chat, None, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| {
            s.call
                .as_ref()
                .is_some_and(|c| c.state != CallState::Started)
        })
        .collect();
    assert!(
        written.is_empty(),
        "written into the removed chat: {written:?}"
    );
    let live = setup.store.live_calls(chat).await.unwrap();
    assert!(live.is_empty(), "the removed chat's live calls: {live:?}");
    let listed = setup
        .store
        .listed_calls_due(rung_out + time::Duration::hours(1), None, 1_000)
        .await
        .unwrap();
    assert!(
        listed.iter().all(|listing| listing.id != call.id),
        "the removed chat's call is still listed: {listed:?}"
    );
    setup.clean_up().await;
}

on_both_stacks!(the_sweep_writes_nothing_into_a_removed_chat);

/// A member ends a ringing call just as another answers it: whichever status change the end's
/// first try finds (held after it was made, or held before it while the answer goes through),
/// the end ends the call, once.
async fn an_end_racing_an_answer_ends_the_call(stack: Stack) {
    for held_after in [true, false] {
        let setup = HeldApi::new(stack).await;
        let alice = setup.user("alice").await;
        let bob = setup.user("bob").await;
        let chat = setup.group(&alice, &[&bob]).await;
        let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
        assert_eq!(call.status, CallStatus::Ringing);

        let end_held = Held::CallStatus(CallStatus::Ended);
        if held_after {
            setup.store.hold_after(end_held);
        } else {
            setup.store.hold(end_held);
        }
        let ending = tokio::spawn({
            let state = setup.state.clone();
            async move { state.end_call(alice.id, call.id).await }
        });
        setup.store.gate.arrived(1).await;
        setup.store.lift(end_held);
        match setup.state.join_call(bob.id, call.id).await {
            Ok(answered) => assert_eq!(answered.status, CallStatus::Active),
            Err(ApiError::Conflict(_)) => {}
            Err(other) => panic!("the answer failed: {other:?}"),
        }
        setup.store.gate.release(1).await;
        let ended = tokio::time::timeout(DEADLINE, ending)
            .await
            .expect("the held end ends")
            .unwrap()
            .unwrap();
        assert_eq!(
            ended.status,
            CallStatus::Ended,
            "held after: {held_after}; the end answered {ended:?}"
        );
        assert_eq!(
            setup.store.get_call(call.id).await.unwrap().unwrap().status,
            CallStatus::Ended,
            "held after: {held_after}; the call is still live after its end"
        );
        assert_eq!(
            setup
                .signals_of(chat, call.id, CallState::Ended, alice.id)
                .await,
            1
        );
        setup.clean_up().await;
    }
}

on_both_stacks!(an_end_racing_an_answer_ends_the_call);

/// Two members join a call one seat short of full at once: each reads the call with a seat free
/// before either is in. The call never holds more than its cap, each join left out is refused
/// with 409 and is not in the call, and a seat left free is taken by the next join.
async fn joins_at_once_never_fill_a_call_past_its_cap(stack: Stack) {
    const CAP: usize = confab_schema::limits::MAX_CALL_PARTICIPANTS;
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let mut others = Vec::new();
    for i in 0..CAP + 1 {
        others.push(setup.user(&format!("member{i}")).await);
    }
    let chat = setup
        .group(&alice, &others.iter().collect::<Vec<_>>())
        .await;
    let call = the_call(setup.state.start_call(&alice, chat).await.unwrap());
    // Alice and all but three others: one seat left.
    for member in &others[..CAP - 2] {
        setup.state.join_call(member.id, call.id).await.unwrap();
    }
    let racing = [others[CAP - 2].id, others[CAP - 1].id];

    setup.store.hold(Held::CallParticipant(true));
    let joins: Vec<_> = racing
        .iter()
        .map(|&user| {
            let state = setup.state.clone();
            tokio::spawn(async move { state.join_call(user, call.id).await })
        })
        .collect();
    setup.store.gate.arrived(2).await;
    setup.store.lift(Held::CallParticipant(true));
    setup.store.gate.release(2).await;
    let mut refused = Vec::new();
    for (user, join) in racing.iter().zip(joins) {
        match tokio::time::timeout(DEADLINE, join).await.unwrap().unwrap() {
            Ok(_) => {}
            Err(ApiError::Conflict(_)) => refused.push(*user),
            Err(other) => panic!("a join failed: {other:?}"),
        }
    }
    let participants = setup.store.call_participants(call.id).await.unwrap();
    assert!(
        participants.len() <= CAP,
        "{} participants, the cap is {CAP}",
        participants.len()
    );
    assert!(!refused.is_empty(), "both racing joins got in");
    for user in &refused {
        assert!(
            !participants.contains(user),
            "a refused join is in the call"
        );
    }
    if participants.len() < CAP {
        let last = others[CAP].id;
        setup.state.join_call(last, call.id).await.unwrap();
    }
    assert_eq!(
        setup.store.call_participants(call.id).await.unwrap().len(),
        CAP
    );
    setup.clean_up().await;
}

on_both_stacks!(joins_at_once_never_fill_a_call_past_its_cap);
