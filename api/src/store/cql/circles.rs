//! Circles, pairing pools and the removal of a whole chat, on CQL.
//!
//! A pairing pool is one partition of `pairing_slots`. Every change of a slot is a lightweight
//! transaction conditional on the slot's `version` (or on its absence), and a pairing changes both
//! users' slots in one conditional batch on that partition: Paxos applies the batch whole or not at
//! all, so of two processes that race to pair the same user, one wins and the other sees `false`.

use confab_schema::circle::{Circle, CircleMember};
use confab_schema::{Attachment, ChatId, CircleId, UserId};
use scylla::client::session::Session;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlTimestamp, CqlValue};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{CqlStore, MemberPut, applied, corrupt, limit_i32, qualify, rows, unavailable};

/// How often a seat change is retried against changes racing it.
const SEAT_ATTEMPTS: usize = 64;
use crate::store::{
    Slot, SlotState, SlotWrite, Store, StoreError, circle_pool, from_millis, millis,
};

/// The one partition of `circle_expiry`.
const EXPIRY_SHARD: i32 = 0;

/// How long past its circle's expiry a removal's row lives if the sweep does not remove it.
const REMOVAL_KEPT_PAST_EXPIRY_SECS: i64 = 3_600;

/// The longest time to live CQL accepts: 20 years.
const MAX_TTL_SECS: i32 = 20 * 365 * 24 * 3_600;

pub(super) struct CircleStatements {
    insert_circle: PreparedStatement,
    get_circle: PreparedStatement,
    set_code: PreparedStatement,
    insert_code: PreparedStatement,
    delete_code: PreparedStatement,
    code_lookup: PreparedStatement,
    add_member: PreparedStatement,
    rename_member: PreparedStatement,
    remove_member: PreparedStatement,
    record_removal: PreparedStatement,
    removal: PreparedStatement,
    delete_removals: PreparedStatement,
    seats_taken: PreparedStatement,
    member_seats: PreparedStatement,
    take_seats: PreparedStatement,
    delete_seats: PreparedStatement,
    members: PreparedStatement,
    delete_members: PreparedStatement,
    add_chat: PreparedStatement,
    chats: PreparedStatement,
    delete_chats: PreparedStatement,
    insert_expiry: PreparedStatement,
    expired: PreparedStatement,
    delete_expiry: PreparedStatement,
    delete_circle: PreparedStatement,
    slots: PreparedStatement,
    create_slot: PreparedStatement,
    replace_slot: PreparedStatement,
    delete_slot: PreparedStatement,
    delete_pool: PreparedStatement,
    // Removing a chat.
    delete_chat_row: PreparedStatement,
    chat_member_ids: PreparedStatement,
    delete_chat_members: PreparedStatement,
    delete_chat_settings: PreparedStatement,
    buckets: PreparedStatement,
    signal_ids: PreparedStatement,
    delete_reactions: PreparedStatement,
    delete_reaction_counts: PreparedStatement,
    delete_signals: PreparedStatement,
    delete_tallies: PreparedStatement,
    delete_buckets: PreparedStatement,
    delete_markers: PreparedStatement,
    delete_summary: PreparedStatement,
    delete_activity: PreparedStatement,
    delete_live_calls: PreparedStatement,
    delete_chat_call_claim: PreparedStatement,
}

impl CircleStatements {
    pub(super) async fn prepare(
        session: &Session,
        keyspace: &str,
    ) -> Result<CircleStatements, StoreError> {
        let prepare = |cql: &str| {
            let cql = qualify(cql, keyspace);
            async move { session.prepare(cql).await.map_err(unavailable) }
        };
        const SLOT_COLUMNS: &str =
            "user_id, kind, state, since, partner, chat_id, previous, version";
        Ok(CircleStatements {
            insert_circle: prepare(
                "INSERT INTO circles (id, name, description, rules, owner_id, access_code, max_members, created_at, expires_at) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            )
            .await?,
            get_circle: prepare(
                "SELECT name, description, rules, owner_id, access_code, max_members, created_at, expires_at FROM circles WHERE id = ?",
            )
            .await?,
            set_code: prepare("UPDATE circles SET access_code = ? WHERE id = ?").await?,
            insert_code: prepare("INSERT INTO circle_codes (code, circle_id) VALUES (?, ?)").await?,
            delete_code: prepare("DELETE FROM circle_codes WHERE code = ?").await?,
            code_lookup: prepare("SELECT circle_id FROM circle_codes WHERE code = ?").await?,
            add_member: prepare(
                "INSERT INTO circle_members (circle_id, user_id, display_name, joined_at) VALUES (?, ?, ?, ?) IF NOT EXISTS",
            )
            .await?,
            rename_member: prepare(
                "UPDATE circle_members SET display_name = ? WHERE circle_id = ? AND user_id = ? IF EXISTS",
            )
            .await?,
            remove_member: prepare(
                "DELETE FROM circle_members WHERE circle_id = ? AND user_id = ? IF EXISTS",
            )
            .await?,
            record_removal: prepare(
                "INSERT INTO circle_removals (circle_id, user_id, removed_at) VALUES (?, ?, ?) USING TTL ?",
            )
            .await?,
            removal: prepare(
                "SELECT user_id FROM circle_removals WHERE circle_id = ? AND user_id = ?",
            )
            .await?,
            delete_removals: prepare("DELETE FROM circle_removals WHERE circle_id = ?").await?,
            // The seat counts that circles kept before they were kept with the members.
            delete_seats: prepare("DELETE FROM circle_seats WHERE circle_id = ?").await?,
            seats_taken: prepare("SELECT seats_taken FROM circle_members WHERE circle_id = ? LIMIT 1")
                .await?,
            member_seats: prepare(
                "SELECT user_id, seats_taken FROM circle_members WHERE circle_id = ? AND user_id = ?",
            )
            .await?,
            // `IF seats_taken = ?` holds for a null bound to `?` while the cell is empty.
            take_seats: prepare(
                "UPDATE circle_members SET seats_taken = ? WHERE circle_id = ? IF seats_taken = ?",
            )
            .await?,
            members: prepare(
                "SELECT user_id, display_name, joined_at FROM circle_members WHERE circle_id = ?",
            )
            .await?,
            delete_members: prepare("DELETE FROM circle_members WHERE circle_id = ?").await?,
            add_chat: prepare("INSERT INTO circle_chats (circle_id, chat_id) VALUES (?, ?)").await?,
            chats: prepare("SELECT chat_id FROM circle_chats WHERE circle_id = ?").await?,
            delete_chats: prepare("DELETE FROM circle_chats WHERE circle_id = ?").await?,
            insert_expiry: prepare(
                "INSERT INTO circle_expiry (shard, expires_at, circle_id) VALUES (?, ?, ?)",
            )
            .await?,
            expired: prepare(
                "SELECT expires_at, circle_id FROM circle_expiry WHERE shard = ? AND expires_at <= ? LIMIT ?",
            )
            .await?,
            delete_expiry: prepare(
                "DELETE FROM circle_expiry WHERE shard = ? AND expires_at = ? AND circle_id = ?",
            )
            .await?,
            delete_circle: prepare("DELETE FROM circles WHERE id = ?").await?,
            slots: prepare(&format!("SELECT {SLOT_COLUMNS} FROM pairing_slots WHERE pool = ?"))
                .await?,
            create_slot: prepare(
                "INSERT INTO pairing_slots (pool, user_id, kind, state, since, partner, chat_id, previous, version) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) IF NOT EXISTS",
            )
            .await?,
            replace_slot: prepare(
                "UPDATE pairing_slots SET kind = ?, state = ?, since = ?, partner = ?, chat_id = ?, previous = ?, version = ? \
                 WHERE pool = ? AND user_id = ? IF version = ?",
            )
            .await?,
            delete_slot: prepare("DELETE FROM pairing_slots WHERE pool = ? AND user_id = ? IF version = ?")
                .await?,
            delete_pool: prepare("DELETE FROM pairing_slots WHERE pool = ?").await?,
            delete_chat_row: prepare("DELETE FROM chats WHERE id = ?").await?,
            chat_member_ids: prepare("SELECT user_id FROM chat_members WHERE chat_id = ?").await?,
            delete_chat_members: prepare("DELETE FROM chat_members WHERE chat_id = ?").await?,
            delete_chat_settings: prepare("DELETE FROM chat_member_settings WHERE chat_id = ?")
                .await?,
            buckets: prepare("SELECT bucket FROM signal_buckets WHERE chat_id = ?").await?,
            signal_ids: prepare("SELECT id FROM signals WHERE chat_id = ? AND bucket = ?").await?,
            delete_reactions: prepare("DELETE FROM reactions WHERE chat_id = ? AND signal_id = ?")
                .await?,
            delete_reaction_counts: prepare(
                "DELETE FROM reaction_counts WHERE chat_id = ? AND signal_id = ?",
            )
            .await?,
            delete_signals: prepare("DELETE FROM signals WHERE chat_id = ? AND bucket = ?").await?,
            delete_tallies: prepare("DELETE FROM reaction_tallies WHERE chat_id = ? AND bucket = ?")
                .await?,
            delete_buckets: prepare("DELETE FROM signal_buckets WHERE chat_id = ?").await?,
            delete_markers: prepare("DELETE FROM markers WHERE chat_id = ? AND kind = ?").await?,
            // A summary from before migration 11 (now in the chat's row).
            delete_summary: prepare("DELETE FROM chat_summaries WHERE chat_id = ?").await?,
            delete_activity: prepare("DELETE FROM chat_activity WHERE chat_id = ?").await?,
            delete_live_calls: prepare("DELETE FROM live_calls WHERE chat_id = ?").await?,
            // `chat_calls` is written by lightweight transactions only.
            delete_chat_call_claim: prepare("DELETE FROM chat_calls WHERE chat_id = ? IF EXISTS")
                .await?,
        })
    }
}

fn timestamp(at: OffsetDateTime) -> CqlTimestamp {
    CqlTimestamp(millis(at))
}

type SlotRow = (
    Uuid,
    Option<String>,
    Option<String>,
    Option<CqlTimestamp>,
    Option<Uuid>,
    Option<Uuid>,
    Option<Uuid>,
    Option<i64>,
);

fn to_slot(row: SlotRow) -> Result<Slot, StoreError> {
    let (user, kind, state, since, partner, chat, previous, version) = row;
    Ok(Slot {
        user_id: UserId(user),
        kind: kind.unwrap_or_default(),
        state: SlotState::parse(state.as_deref().unwrap_or_default())?,
        since: from_millis(since.map(|t| t.0).unwrap_or_default())?,
        partner: partner.map(UserId),
        chat: chat.map(ChatId),
        previous: previous.map(UserId),
        version: version.unwrap_or_default(),
    })
}

fn uuid_value(id: Option<Uuid>) -> Option<CqlValue> {
    id.map(CqlValue::Uuid)
}

/// The statement and bound values of one conditional slot write.
fn slot_statement<'a>(
    statements: &'a CircleStatements,
    pool: &str,
    write: &SlotWrite,
) -> (&'a PreparedStatement, Vec<Option<CqlValue>>) {
    let pool = Some(CqlValue::Text(pool.to_owned()));
    match write {
        SlotWrite::Create(slot) => (
            &statements.create_slot,
            vec![
                pool,
                Some(CqlValue::Uuid(slot.user_id.0)),
                Some(CqlValue::Text(slot.kind.clone())),
                Some(CqlValue::Text(slot.state.as_str().to_owned())),
                Some(CqlValue::Timestamp(timestamp(slot.since))),
                uuid_value(slot.partner.map(|u| u.0)),
                uuid_value(slot.chat.map(|c| c.0)),
                uuid_value(slot.previous.map(|u| u.0)),
                Some(CqlValue::BigInt(slot.version)),
            ],
        ),
        SlotWrite::Replace { expected, slot } => (
            &statements.replace_slot,
            vec![
                Some(CqlValue::Text(slot.kind.clone())),
                Some(CqlValue::Text(slot.state.as_str().to_owned())),
                Some(CqlValue::Timestamp(timestamp(slot.since))),
                uuid_value(slot.partner.map(|u| u.0)),
                uuid_value(slot.chat.map(|c| c.0)),
                uuid_value(slot.previous.map(|u| u.0)),
                Some(CqlValue::BigInt(slot.version)),
                pool,
                Some(CqlValue::Uuid(slot.user_id.0)),
                Some(CqlValue::BigInt(*expected)),
            ],
        ),
        SlotWrite::Delete { user, expected } => (
            &statements.delete_slot,
            vec![
                pool,
                Some(CqlValue::Uuid(user.0)),
                Some(CqlValue::BigInt(*expected)),
            ],
        ),
    }
}

impl CqlStore {
    fn circle_statements(&self) -> &CircleStatements {
        &self.circles
    }

    pub(super) async fn cql_delete_chat(&self, chat: ChatId) -> Result<(), StoreError> {
        let s = self.circle_statements();
        let session = &self.session;
        let id = chat.0;
        // The chat's activity before its row goes (the summary is in that row): the members'
        // activity rows are removed with it. A removal retried after the row went leaves those
        // rows to the readers, which drop a row of a chat the user is no longer in.
        let activity = self.summary_of(chat).await?.map(|(activity, _)| activity);
        // The chat row first: from then on the chat answers 404. Everything after is idempotent,
        // so a removal that failed half-way is finished by the next attempt.
        session
            .execute_unpaged(&s.delete_chat_row, (id,))
            .await
            .map_err(unavailable)?;
        let members: Vec<(Uuid,)> = rows(
            session
                .execute_unpaged(&s.chat_member_ids, (id,))
                .await
                .map_err(unavailable)?,
        )?;
        for (user,) in members {
            if let Some(activity) = activity {
                self.drop_activity_row(UserId(user), activity.0, id).await?;
            }
            self.forget_read_marker(chat, UserId(user)).await?;
            self.remove_member(chat, UserId(user)).await?;
        }
        let buckets: Vec<(i32,)> = rows(
            session
                .execute_unpaged(&s.buckets, (id,))
                .await
                .map_err(unavailable)?,
        )?;
        for (bucket,) in buckets {
            let signals: Vec<(Uuid,)> = rows(
                session
                    .execute_unpaged(&s.signal_ids, (id, bucket))
                    .await
                    .map_err(unavailable)?,
            )?;
            for (signal,) in signals {
                session
                    .execute_unpaged(&s.delete_reactions, (id, signal))
                    .await
                    .map_err(unavailable)?;
                session
                    .execute_unpaged(&s.delete_reaction_counts, (id, signal))
                    .await
                    .map_err(unavailable)?;
            }
            session
                .execute_unpaged(&s.delete_tallies, (id, bucket))
                .await
                .map_err(unavailable)?;
            session
                .execute_unpaged(&s.delete_signals, (id, bucket))
                .await
                .map_err(unavailable)?;
        }
        loop {
            let attachments: Vec<Attachment> = self.chat_attachments(chat, None, None, 500).await?;
            if attachments.is_empty() {
                break;
            }
            self.delete_attachments(&attachments).await?;
        }
        for kind in ["read", "delivered"] {
            session
                .execute_unpaged(&s.delete_markers, (id, kind))
                .await
                .map_err(unavailable)?;
        }
        for statement in [
            &s.delete_buckets,
            &s.delete_chat_members,
            &s.delete_chat_settings,
            &s.delete_summary,
            &s.delete_activity,
            &s.delete_live_calls,
            &s.delete_chat_call_claim,
        ] {
            session
                .execute_unpaged(statement, (id,))
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    pub(super) async fn cql_create_circle(&self, circle: &Circle) -> Result<(), StoreError> {
        let s = self.circle_statements();
        let code = circle
            .access_code
            .as_deref()
            .ok_or_else(|| corrupt("a circle needs an access code"))?;
        // The expiry entry first: a circle is never stored without the entry that removes it.
        self.session
            .execute_unpaged(
                &s.insert_expiry,
                (EXPIRY_SHARD, timestamp(circle.expires_at), circle.id.0),
            )
            .await
            .map_err(unavailable)?;
        self.session
            .execute_unpaged(
                &s.insert_circle,
                (
                    circle.id.0,
                    circle.name.as_str(),
                    circle.description.as_deref(),
                    circle.rules.as_deref(),
                    circle.owner_id.0,
                    code,
                    i32::try_from(circle.max_members).unwrap_or(i32::MAX),
                    timestamp(circle.created_at),
                    timestamp(circle.expires_at),
                ),
            )
            .await
            .map_err(unavailable)?;
        self.session
            .execute_unpaged(&s.insert_code, (code, circle.id.0))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn cql_get_circle(&self, id: CircleId) -> Result<Option<Circle>, StoreError> {
        type Row = (
            Option<String>,
            Option<String>,
            Option<String>,
            Option<Uuid>,
            Option<String>,
            Option<i32>,
            Option<CqlTimestamp>,
            Option<CqlTimestamp>,
        );
        let found: Vec<Row> = rows(
            self.session
                .execute_unpaged(&self.circle_statements().get_circle, (id.0,))
                .await
                .map_err(unavailable)?,
        )?;
        let Some((name, description, rules, owner, code, max, created, expires)) =
            found.into_iter().next()
        else {
            return Ok(None);
        };
        let (Some(owner), Some(created), Some(expires)) = (owner, created, expires) else {
            // A row left behind by a removal that raced an update: no circle.
            return Ok(None);
        };
        Ok(Some(Circle {
            id,
            name: name.unwrap_or_default(),
            description,
            rules,
            owner_id: UserId(owner),
            access_code: code,
            max_members: u32::try_from(max.unwrap_or_default()).unwrap_or_default(),
            created_at: from_millis(created.0)?,
            expires_at: from_millis(expires.0)?,
        }))
    }

    pub(super) async fn cql_circle_by_code(
        &self,
        code: &str,
    ) -> Result<Option<CircleId>, StoreError> {
        let found: Vec<(Option<Uuid>,)> = rows(
            self.session
                .execute_unpaged(&self.circle_statements().code_lookup, (code,))
                .await
                .map_err(unavailable)?,
        )?;
        Ok(found.into_iter().next().and_then(|(id,)| id).map(CircleId))
    }

    pub(super) async fn cql_rotate_circle_code(
        &self,
        id: CircleId,
        old: &str,
        new: &str,
    ) -> Result<(), StoreError> {
        let s = self.circle_statements();
        self.session
            .execute_unpaged(&s.insert_code, (new, id.0))
            .await
            .map_err(unavailable)?;
        self.session
            .execute_unpaged(&s.set_code, (new, id.0))
            .await
            .map_err(unavailable)?;
        self.session
            .execute_unpaged(&s.delete_code, (old,))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn cql_put_circle_member(
        &self,
        circle: CircleId,
        member: &CircleMember,
        max_members: u32,
    ) -> Result<MemberPut, StoreError> {
        let s = self.circle_statements();
        if self.rename_circle_member(circle, member).await? {
            return Ok(MemberPut::Renamed);
        }
        let max = i32::try_from(max_members).unwrap_or(i32::MAX);
        for _ in 0..SEAT_ATTEMPTS {
            let (taken, counted) = self.seats_taken(circle).await?;
            if counted >= max {
                return Ok(MemberPut::Full);
            }
            // The seat and the member row in one conditional batch on the circle's partition:
            // both or neither, and only while the count is the one read.
            let mut batch = Batch::new(BatchType::Logged);
            batch.append_statement(s.take_seats.clone());
            batch.append_statement(s.add_member.clone());
            let result = self
                .session
                .batch(
                    &batch,
                    (
                        (counted + 1, circle.0, taken),
                        (
                            circle.0,
                            member.user_id.0,
                            member.display_name.as_str(),
                            timestamp(member.joined_at),
                        ),
                    ),
                )
                .await
                .map_err(unavailable)?;
            if applied(result)? {
                return Ok(MemberPut::Added);
            }
            // Another join or removal moved the count, or the same user joined at the same moment
            // through another request.
            if self.rename_circle_member(circle, member).await? {
                return Ok(MemberPut::Renamed);
            }
        }
        Err(StoreError::Unavailable(
            "too many joins of one circle at once; try again".into(),
        ))
    }

    /// Renames `member` if they are in the circle; whether they were.
    async fn rename_circle_member(
        &self,
        circle: CircleId,
        member: &CircleMember,
    ) -> Result<bool, StoreError> {
        let renamed = self
            .session
            .execute_unpaged(
                &self.circle_statements().rename_member,
                (member.display_name.as_str(), circle.0, member.user_id.0),
            )
            .await
            .map_err(unavailable)?;
        applied(renamed)
    }

    /// The circle's seat count as stored (`None` for a circle from before it was kept with the
    /// members), and the count to go by: the stored one, or the number of members.
    async fn seats_taken(&self, circle: CircleId) -> Result<(Option<i32>, i32), StoreError> {
        let found: Vec<(Option<i32>,)> = rows(
            self.session
                .execute_unpaged(&self.circle_statements().seats_taken, (circle.0,))
                .await
                .map_err(unavailable)?,
        )?;
        match found.first().and_then(|(taken,)| *taken) {
            Some(taken) => Ok((Some(taken), taken)),
            None => {
                let members = self.cql_circle_members(circle).await?.len();
                Ok((None, i32::try_from(members).unwrap_or(i32::MAX)))
            }
        }
    }

    pub(super) async fn cql_circle_members(
        &self,
        circle: CircleId,
    ) -> Result<Vec<CircleMember>, StoreError> {
        let found: Vec<(Option<Uuid>, Option<String>, Option<CqlTimestamp>)> = rows(
            self.session
                .execute_unpaged(&self.circle_statements().members, (circle.0,))
                .await
                .map_err(unavailable)?,
        )?;
        found
            .into_iter()
            // A partition whose members all left still holds its seat count: one row without a
            // member.
            .filter_map(|(user, name, joined)| user.map(|user| (user, name, joined)))
            .map(|(user, name, joined)| {
                Ok(CircleMember {
                    user_id: UserId(user),
                    display_name: name.unwrap_or_default(),
                    joined_at: from_millis(joined.map(|t| t.0).unwrap_or_default())?,
                })
            })
            .collect()
    }

    pub(super) async fn cql_remove_circle_member(
        &self,
        circle: CircleId,
        user: UserId,
    ) -> Result<(), StoreError> {
        let s = self.circle_statements();
        for _ in 0..SEAT_ATTEMPTS {
            // No row: not a member (a removal retried after it was done).
            let found: Vec<(Uuid, Option<i32>)> = rows(
                self.session
                    .execute_unpaged(&s.member_seats, (circle.0, user.0))
                    .await
                    .map_err(unavailable)?,
            )?;
            let Some((_, stored)) = found.first().copied() else {
                return Ok(());
            };
            let counted = match stored {
                Some(taken) => taken,
                None => self.seats_taken(circle).await?.1,
            };
            // The member row and their seat in one conditional batch, as a join takes them.
            let mut batch = Batch::new(BatchType::Logged);
            batch.append_statement(s.remove_member.clone());
            batch.append_statement(s.take_seats.clone());
            let result = self
                .session
                .batch(
                    &batch,
                    ((circle.0, user.0), ((counted - 1).max(0), circle.0, stored)),
                )
                .await
                .map_err(unavailable)?;
            if applied(result)? {
                return Ok(());
            }
        }
        Err(StoreError::Unavailable(
            "too many changes of one circle at once; try again".into(),
        ))
    }

    pub(super) async fn cql_record_circle_removal(
        &self,
        circle: CircleId,
        user: UserId,
        circle_expires_at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let now = OffsetDateTime::now_utc();
        // The sweep removes the row with the circle; the time to live only bounds a row written
        // after the sweep went by (a removal racing the expiry). An hour past the expiry, so that
        // a database clock ahead of the API's never lets the row go while the circle is live.
        let live_secs = (circle_expires_at - now).whole_seconds() + REMOVAL_KEPT_PAST_EXPIRY_SECS;
        let ttl =
            i32::try_from(live_secs.clamp(1, i64::from(MAX_TTL_SECS))).unwrap_or(MAX_TTL_SECS);
        self.session
            .execute_unpaged(
                &self.circle_statements().record_removal,
                (circle.0, user.0, timestamp(now), ttl),
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn cql_removed_from_circle(
        &self,
        circle: CircleId,
        user: UserId,
    ) -> Result<bool, StoreError> {
        let found: Vec<(Uuid,)> = rows(
            self.session
                .execute_unpaged(&self.circle_statements().removal, (circle.0, user.0))
                .await
                .map_err(unavailable)?,
        )?;
        Ok(!found.is_empty())
    }

    pub(super) async fn cql_add_circle_chat(
        &self,
        circle: CircleId,
        chat: ChatId,
    ) -> Result<(), StoreError> {
        self.session
            .execute_unpaged(&self.circle_statements().add_chat, (circle.0, chat.0))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    pub(super) async fn cql_circle_chats(
        &self,
        circle: CircleId,
    ) -> Result<Vec<ChatId>, StoreError> {
        let found: Vec<(Uuid,)> = rows(
            self.session
                .execute_unpaged(&self.circle_statements().chats, (circle.0,))
                .await
                .map_err(unavailable)?,
        )?;
        Ok(found.into_iter().map(|(id,)| ChatId(id)).collect())
    }

    pub(super) async fn cql_expired_circles(
        &self,
        now: OffsetDateTime,
        limit: usize,
    ) -> Result<Vec<CircleId>, StoreError> {
        let found: Vec<(CqlTimestamp, Uuid)> = rows(
            self.session
                .execute_unpaged(
                    &self.circle_statements().expired,
                    (EXPIRY_SHARD, timestamp(now), limit_i32(limit)),
                )
                .await
                .map_err(unavailable)?,
        )?;
        Ok(found.into_iter().map(|(_, id)| CircleId(id)).collect())
    }

    pub(super) async fn cql_delete_circle(&self, id: CircleId) -> Result<(), StoreError> {
        let s = self.circle_statements();
        let circle = self.cql_get_circle(id).await?;
        self.session
            .execute_unpaged(&s.delete_pool, (circle_pool(id),))
            .await
            .map_err(unavailable)?;
        for statement in [
            &s.delete_members,
            &s.delete_removals,
            &s.delete_chats,
            &s.delete_seats,
        ] {
            self.session
                .execute_unpaged(statement, (id.0,))
                .await
                .map_err(unavailable)?;
        }
        if let Some(circle) = &circle {
            if let Some(code) = circle.access_code.as_deref() {
                self.session
                    .execute_unpaged(&s.delete_code, (code,))
                    .await
                    .map_err(unavailable)?;
            }
            self.session
                .execute_unpaged(&s.delete_circle, (id.0,))
                .await
                .map_err(unavailable)?;
            // Last: while it is there, the sweep comes back to finish.
            self.session
                .execute_unpaged(
                    &s.delete_expiry,
                    (EXPIRY_SHARD, timestamp(circle.expires_at), id.0),
                )
                .await
                .map_err(unavailable)?;
        } else {
            // The circle row is gone already: remove any expiry entry still naming it.
            let entries: Vec<(CqlTimestamp, Uuid)> = rows(
                self.session
                    .execute_unpaged(&s.expired, (EXPIRY_SHARD, CqlTimestamp(i64::MAX), i32::MAX))
                    .await
                    .map_err(unavailable)?,
            )?;
            for (at, circle) in entries.into_iter().filter(|(_, c)| *c == id.0) {
                self.session
                    .execute_unpaged(&s.delete_expiry, (EXPIRY_SHARD, at, circle))
                    .await
                    .map_err(unavailable)?;
            }
        }
        Ok(())
    }

    pub(super) async fn cql_slots(&self, pool: &str) -> Result<Vec<Slot>, StoreError> {
        let found: Vec<SlotRow> = rows(
            self.session
                .execute_unpaged(&self.circle_statements().slots, (pool,))
                .await
                .map_err(unavailable)?,
        )?;
        found.into_iter().map(to_slot).collect()
    }

    pub(super) async fn cql_write_slots(
        &self,
        pool: &str,
        writes: &[SlotWrite],
    ) -> Result<bool, StoreError> {
        let s = self.circle_statements();
        match writes {
            [] => Ok(true),
            [write] => {
                let (statement, values) = slot_statement(s, pool, write);
                let result = self
                    .session
                    .execute_unpaged(statement, values)
                    .await
                    .map_err(unavailable)?;
                applied(result)
            }
            writes => {
                // One partition, so one Paxos round decides every condition and applies every
                // write, or none.
                let mut batch = Batch::new(BatchType::Logged);
                let mut values = Vec::with_capacity(writes.len());
                for write in writes {
                    let (statement, bound) = slot_statement(s, pool, write);
                    batch.append_statement(statement.clone());
                    values.push(bound);
                }
                let result = self
                    .session
                    .batch(&batch, values)
                    .await
                    .map_err(unavailable)?;
                applied(result)
            }
        }
    }
}
