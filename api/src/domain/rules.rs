//! Who may do what: every authorization rule of the API, as pure functions of roles, chat kinds and
//! authorship. Operations load what a rule needs and ask here; nothing else decides.
//!
//! Membership itself (only members read or post) is checked against the store in
//! [`super::access`].

use confab_schema::{ChatKind, Member, MemberRole, Signal, SignalKind, UserId};

use crate::error::{ApiError, ApiResult};

/// Clients post messages; joins, leaves and renames are written by the server.
pub fn may_post(kind: SignalKind) -> ApiResult<()> {
    if kind != SignalKind::Message {
        return Err(ApiError::Unprocessable(format!(
            "signals of kind `{kind}` are written by the server, not posted"
        )));
    }
    Ok(())
}

/// Only the author edits, and only a message that is not deleted.
pub fn may_edit(caller: UserId, signal: &Signal) -> ApiResult<()> {
    if signal.author_id != caller {
        return Err(ApiError::Forbidden("only the author edits a signal"));
    }
    if signal.kind != SignalKind::Message || signal.deleted {
        return Err(not_editable());
    }
    Ok(())
}

/// The refusal of an edit of something that is not a live message.
pub fn not_editable() -> ApiError {
    ApiError::Unprocessable("only messages that are not deleted can be edited".into())
}

/// The author, or a group's owner or admin, deletes a message. A direct chat has no moderators:
/// its two members (both owners) delete only their own, so neither can erase what the other said.
pub fn may_delete(
    caller: UserId,
    role: MemberRole,
    kind: ChatKind,
    signal: &Signal,
) -> ApiResult<()> {
    if signal.author_id != caller && (!role.is_admin() || kind == ChatKind::Direct) {
        return Err(ApiError::Forbidden(
            "only the author or a group's admin deletes a signal",
        ));
    }
    if signal.kind != SignalKind::Message {
        return Err(ApiError::Unprocessable(
            "only messages can be deleted".into(),
        ));
    }
    Ok(())
}

/// Owners and admins rename or describe a group; a direct chat has neither.
pub fn may_change_chat(role: MemberRole, kind: ChatKind) -> ApiResult<()> {
    if kind == ChatKind::Direct {
        return Err(ApiError::Unprocessable(
            "a direct chat has no name or description".into(),
        ));
    }
    if !role.is_admin() {
        return Err(ApiError::Forbidden("only owners and admins change a chat"));
    }
    Ok(())
}

/// Owners and admins add members to a group; only owners add owners.
pub fn may_add_member(role: MemberRole, kind: ChatKind, new_role: MemberRole) -> ApiResult<()> {
    if kind == ChatKind::Direct {
        return Err(ApiError::Unprocessable(
            "a direct chat takes no new members".into(),
        ));
    }
    if !role.is_admin() {
        return Err(ApiError::Forbidden("only owners and admins add members"));
    }
    if new_role == MemberRole::Owner && role != MemberRole::Owner {
        return Err(ApiError::Forbidden("only owners make owners"));
    }
    Ok(())
}

/// Members of a direct chat stay; anyone leaves a group; owners remove anyone and admins remove
/// members; the last owner hands over ownership before leaving.
pub fn may_remove_member(
    caller: UserId,
    role: MemberRole,
    kind: ChatKind,
    target: &Member,
    members: &[Member],
) -> ApiResult<()> {
    members_can_leave(kind)?;
    if target.user_id != caller {
        let allowed = match role {
            MemberRole::Owner => true,
            MemberRole::Admin => target.role == MemberRole::Member,
            MemberRole::Member => false,
        };
        if !allowed {
            return Err(ApiError::Forbidden(
                "owners remove anyone, admins remove members",
            ));
        }
    }
    if target.role == MemberRole::Owner && owners(members) == 1 && members.len() > 1 {
        return Err(ApiError::Unprocessable(
            "the last owner hands over ownership before leaving".into(),
        ));
    }
    Ok(())
}

/// Members of a direct chat cannot leave or be removed.
pub fn members_can_leave(kind: ChatKind) -> ApiResult<()> {
    if kind == ChatKind::Direct {
        return Err(ApiError::Unprocessable(
            "members of a direct chat cannot leave or be removed".into(),
        ));
    }
    Ok(())
}

/// Roles in a direct chat do not change.
pub fn roles_can_change(kind: ChatKind) -> ApiResult<()> {
    if kind == ChatKind::Direct {
        return Err(ApiError::Unprocessable(
            "roles in a direct chat do not change".into(),
        ));
    }
    Ok(())
}

/// Roles in a direct chat do not change. Owners change any role; admins move people between
/// `member` and `admin`. A chat keeps at least one owner.
pub fn may_set_role(
    role: MemberRole,
    kind: ChatKind,
    target: &Member,
    new_role: MemberRole,
    members: &[Member],
) -> ApiResult<()> {
    roles_can_change(kind)?;
    let allowed = match role {
        MemberRole::Owner => true,
        MemberRole::Admin => target.role != MemberRole::Owner && new_role != MemberRole::Owner,
        MemberRole::Member => false,
    };
    if !allowed {
        return Err(ApiError::Forbidden(
            "owners change any role; admins move members and admins",
        ));
    }
    if target.role == MemberRole::Owner && new_role != MemberRole::Owner && owners(members) == 1 {
        return Err(ApiError::Unprocessable(
            "a chat keeps at least one owner".into(),
        ));
    }
    Ok(())
}

fn owners(members: &[Member]) -> usize {
    members
        .iter()
        .filter(|m| m.role == MemberRole::Owner)
        .count()
}

/// Who ends a call for everyone: in a direct chat, either member (hanging up, or the one called
/// declining while it rings); in a group, its starter or an owner or admin. Others leave it.
pub fn may_end_call(
    caller: UserId,
    role: MemberRole,
    kind: ChatKind,
    started_by: UserId,
) -> ApiResult<()> {
    let allowed = match kind {
        ChatKind::Direct => true,
        ChatKind::Group => caller == started_by || role.is_admin(),
    };
    if !allowed {
        return Err(ApiError::Forbidden(
            "only the call's starter or an admin ends a group call; leave it instead",
        ));
    }
    Ok(())
}

/// Signalling goes from a participant of a call to another participant.
pub fn may_relay(caller: UserId, participants: &[UserId], to: UserId) -> ApiResult<()> {
    if !participants.contains(&caller) {
        return Err(ApiError::Forbidden("you are not in this call"));
    }
    if to == caller {
        return Err(ApiError::Unprocessable(
            "signalling goes to another participant, not to yourself".into(),
        ));
    }
    if !participants.contains(&to) {
        return Err(ApiError::Unprocessable(
            "`to` is not a participant of this call".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use confab_schema::{ChatId, SignalId};
    use time::OffsetDateTime;

    fn user(name: &str) -> UserId {
        UserId::from_subject("rules", name)
    }

    fn member(name: &str, role: MemberRole) -> Member {
        Member {
            user_id: user(name),
            role,
            joined_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn message_by(author: &str) -> Signal {
        let id = SignalId::new();
        Signal {
            id,
            chat_id: ChatId::new(),
            kind: SignalKind::Message,
            author_id: user(author),
            created_at: id.created_at().unwrap(),
            nonce: None,
            text: Some("hi".into()),
            reply_to: None,
            attachments: vec![],
            edited_at: None,
            deleted: false,
            reactions: Default::default(),
            call: None,
        }
    }

    fn status(result: ApiResult<()>) -> u16 {
        match result {
            Ok(()) => 200,
            Err(ApiError::Forbidden(_)) => 403,
            Err(ApiError::Unprocessable(_)) => 422,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn posting_is_for_messages() {
        assert_eq!(status(may_post(SignalKind::Message)), 200);
        for kind in [SignalKind::Joined, SignalKind::Left, SignalKind::Renamed] {
            assert_eq!(status(may_post(kind)), 422);
        }
    }

    #[test]
    fn edits_and_deletions() {
        let mine = message_by("alice");
        assert_eq!(status(may_edit(user("alice"), &mine)), 200);
        assert_eq!(status(may_edit(user("bob"), &mine)), 403);
        let deleted = Signal {
            deleted: true,
            ..mine.clone()
        };
        assert_eq!(status(may_edit(user("alice"), &deleted)), 422);
        let joined = Signal {
            kind: SignalKind::Joined,
            ..mine.clone()
        };
        assert_eq!(status(may_edit(user("alice"), &joined)), 422);

        use ChatKind::{Direct, Group};
        for kind in [Group, Direct] {
            assert_eq!(
                status(may_delete(user("alice"), MemberRole::Member, kind, &mine)),
                200
            );
            assert_eq!(
                status(may_delete(user("bob"), MemberRole::Member, kind, &mine)),
                403
            );
            assert_eq!(
                status(may_delete(user("alice"), MemberRole::Owner, kind, &joined)),
                422
            );
        }
        for role in [MemberRole::Admin, MemberRole::Owner] {
            assert_eq!(status(may_delete(user("bob"), role, Group, &mine)), 200);
            assert_eq!(status(may_delete(user("bob"), role, Direct, &mine)), 403);
        }
    }

    #[test]
    fn chat_changes_and_additions() {
        use ChatKind::{Direct, Group};
        use MemberRole::{Admin, Member, Owner};
        assert_eq!(status(may_change_chat(Owner, Group)), 200);
        assert_eq!(status(may_change_chat(Admin, Group)), 200);
        assert_eq!(status(may_change_chat(Member, Group)), 403);
        assert_eq!(status(may_change_chat(Owner, Direct)), 422);

        assert_eq!(status(may_add_member(Owner, Group, Owner)), 200);
        assert_eq!(status(may_add_member(Admin, Group, Admin)), 200);
        assert_eq!(status(may_add_member(Admin, Group, Owner)), 403);
        assert_eq!(status(may_add_member(Member, Group, Member)), 403);
        assert_eq!(status(may_add_member(Owner, Direct, Member)), 422);
    }

    #[test]
    fn removals_and_roles() {
        use MemberRole::{Admin, Member, Owner};
        let members = vec![member("o", Owner), member("a", Admin), member("m", Member)];
        let remove = |caller: &str, role, target: &confab_schema::Member| {
            status(may_remove_member(
                user(caller),
                role,
                ChatKind::Group,
                target,
                &members,
            ))
        };
        assert_eq!(remove("o", Owner, &members[1]), 200);
        assert_eq!(remove("a", Admin, &members[2]), 200);
        assert_eq!(remove("a", Admin, &members[0]), 403);
        assert_eq!(remove("m", Member, &members[1]), 403);
        assert_eq!(remove("m", Member, &members[2]), 200, "anyone leaves");
        assert_eq!(remove("o", Owner, &members[0]), 422, "the last owner");
        assert_eq!(
            status(may_remove_member(
                user("o"),
                Owner,
                ChatKind::Direct,
                &members[1],
                &members
            )),
            422
        );

        let set = |role, target: &confab_schema::Member, new_role| {
            status(may_set_role(
                role,
                ChatKind::Group,
                target,
                new_role,
                &members,
            ))
        };
        assert_eq!(set(Owner, &members[2], Owner), 200);
        assert_eq!(set(Admin, &members[2], Admin), 200);
        assert_eq!(set(Admin, &members[2], Owner), 403);
        assert_eq!(set(Admin, &members[0], Member), 403);
        assert_eq!(set(Member, &members[2], Admin), 403);
        assert_eq!(set(Owner, &members[0], Member), 422, "keeps an owner");
    }

    #[test]
    fn calls_end_by_their_starter_or_an_admin_and_signal_between_participants() {
        let (a, b, c) = (user("a"), user("b"), user("c"));
        assert!(may_end_call(b, MemberRole::Member, ChatKind::Direct, a).is_ok());
        assert!(may_end_call(a, MemberRole::Member, ChatKind::Group, a).is_ok());
        assert!(may_end_call(c, MemberRole::Admin, ChatKind::Group, a).is_ok());
        assert!(may_end_call(b, MemberRole::Member, ChatKind::Group, a).is_err());
        assert!(may_relay(a, &[a, b], b).is_ok());
        assert!(matches!(
            may_relay(c, &[a, b], b),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            may_relay(a, &[a, b], c),
            Err(ApiError::Unprocessable(_))
        ));
        assert!(matches!(
            may_relay(a, &[a, b], a),
            Err(ApiError::Unprocessable(_))
        ));
    }
}
