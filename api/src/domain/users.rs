//! Who is calling (provisioned from their token), and finding others.

use std::time::{Duration, Instant};

use confab_runtime::identity::Principal;
use confab_schema::{User, UserId};

use super::inputs::{BidiRule, PageLimit, UserQuery};
use super::paging::{Page, Pager};
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;
use crate::store::{looks_like_address, search_users};

/// How long a provisioned profile is trusted before the store is written again.
const PROVISION_REFRESH: Duration = Duration::from_secs(600);
const PROVISION_CACHE_MAX: usize = 100_000;

impl ApiState {
    /// The user a verified token names, provisioned from its claims: written on first sight, and
    /// again when the claims change or the cached copy is old. Their names come from the identity
    /// provider, so they cannot be refused as a name given to confab is: bidirectional
    /// embeddings, overrides and isolates, which could make them render as someone else's, are
    /// left out instead ([`BidiRule::HumanName`]; the marks stay, right-to-left names need them).
    pub async fn provision(&self, principal: Principal) -> ApiResult<User> {
        let user = user_of(principal);
        let fresh = self
            .provisioned
            .lock()
            .ok()
            .and_then(|cache| cache.get(&user.id).cloned())
            .is_some_and(|(cached, at)| cached == user && at.elapsed() < PROVISION_REFRESH);
        if !fresh {
            self.store.upsert_user(&user).await?;
            if let Ok(mut cache) = self.provisioned.lock() {
                if cache.len() >= PROVISION_CACHE_MAX {
                    cache.clear();
                }
                cache.insert(user.id, (user.clone(), Instant::now()));
            }
        }
        Ok(user)
    }

    /// A user's profile, for themself and for users who share a chat with them; their e-mail
    /// address (and a name that is one) only for themself.
    pub async fn user_profile(&self, caller: UserId, user: UserId) -> ApiResult<User> {
        self.require_shared_chat(caller, user).await?;
        let profile = self
            .store
            .get_user(user)
            .await?
            .ok_or(ApiError::NotFound("no such user"))?;
        Ok(shown_to(profile, caller))
    }

    /// Users whose user name or display name starts with `query`, or whose e-mail address is
    /// `query`, each once. E-mail addresses are private: each (and a name that is one) is shown to
    /// its own user only. A page reads a bounded number of rows; it may stop short, with a cursor.
    pub async fn search_users(
        &self,
        caller: UserId,
        query: UserQuery,
        cursor: Option<&str>,
        limit: PageLimit,
    ) -> ApiResult<Page<User>> {
        let pager = Pager::new(self, format!("users:{}", query.as_str()), limit);
        let after = pager.open::<(String, UserId)>(cursor)?;
        let (items, next) = search_users(&*self.store, query.as_str(), after, pager.limit).await?;
        Ok(Page {
            items: items
                .into_iter()
                .map(|user| shown_to(user, caller))
                .collect(),
            next_cursor: next.map(|position| pager.cursor(position)),
        })
    }
}

/// The user `principal` describes, their names without bidirectional embeddings, overrides and
/// isolates (a name of nothing else becomes [`neutral_name`]).
fn user_of(principal: Principal) -> User {
    let id = principal.user_id;
    let name = |given: &str| {
        let name = BidiRule::HumanName.without_refused(given);
        if name.trim().is_empty() && !given.trim().is_empty() {
            neutral_name(id)
        } else {
            name
        }
    };
    User {
        id,
        username: name(&principal.username),
        display_name: name(&principal.display_name),
        email: principal.email,
    }
}

/// `user` as `viewer` may see them: their e-mail address only when it is their own, and likewise
/// a user name or display name that is an address, or looks like one ([`name_shown_to_others`]
/// stands in for it).
pub fn shown_to(mut user: User, viewer: UserId) -> User {
    if user.id != viewer {
        let shown = name_shown_to_others(&user);
        if is_address_of(&user, &user.username) {
            user.username = shown.clone();
        }
        user.display_name = shown;
        user.email = None;
    }
    user
}

/// What others see of `user`'s name: their display name, unless it is (or looks like) an e-mail
/// address; then a neutral name made from their id, which they can see anyway.
pub fn name_shown_to_others(user: &User) -> String {
    if is_address_of(user, &user.display_name) {
        neutral_name(user.id)
    } else {
        user.display_name.clone()
    }
}

/// The name others see in place of one of `user`'s that they may not see: `user-` and the first
/// 8 hex digits of the id.
pub fn neutral_name(user: UserId) -> String {
    let id = user.0.simple().to_string();
    format!("user-{}", &id[..8])
}

/// Whether `name` (one of `user`'s names) is their e-mail address or looks like an address.
fn is_address_of(user: &User, name: &str) -> bool {
    let name = name.trim().to_lowercase();
    looks_like_address(&name)
        || user
            .email
            .as_deref()
            .is_some_and(|email| email.trim().to_lowercase() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(username: &str, display_name: &str, email: Option<&str>) -> User {
        User {
            id: UserId(uuid::Uuid::from_u128(
                0x1234_5678_9abc_def0_1234_5678_9abc_def0,
            )),
            username: username.into(),
            display_name: display_name.into(),
            email: email.map(str::to_owned),
        }
    }

    #[test]
    fn provisioned_names_lose_bidi_overrides_and_keep_marks() {
        let principal = |username: &str, display_name: &str| Principal {
            user_id: UserId(uuid::Uuid::from_u128(
                0x1234_5678_9abc_def0_1234_5678_9abc_def0,
            )),
            username: username.into(),
            display_name: display_name.into(),
            email: None,
            expires_at: 0,
            session: None,
            issued_at: 0,
        };
        // "Bob\u{202E}ecila" would show as "Bobalice".
        let user = user_of(principal("bob\u{2066}x\u{2069}", "Bob\u{202E}ecila"));
        assert_eq!(
            (user.username.as_str(), user.display_name.as_str()),
            ("bobx", "Bobecila")
        );
        let user = user_of(principal("dana", "\u{202E}\u{202C}"));
        assert_eq!(user.display_name, "user-12345678");
        let user = user_of(principal("dana", "שלום\u{200F}\u{061C}\u{200E}"));
        assert_eq!(user.display_name, "שלום\u{200F}\u{061C}\u{200E}");
    }

    #[test]
    fn names_that_are_addresses_are_shown_to_their_owner_only() {
        let other = UserId(uuid::Uuid::nil());
        // The address as the user name and as the display name (no name in the token).
        let dora = user(
            "Dora@Corp.example",
            "Dora@Corp.example",
            Some("dora@corp.example"),
        );
        assert_eq!(name_shown_to_others(&dora), "user-12345678");
        let shown = shown_to(dora.clone(), other);
        assert_eq!(
            (
                shown.username.as_str(),
                shown.display_name.as_str(),
                shown.email
            ),
            ("user-12345678", "user-12345678", None)
        );
        assert_eq!(shown_to(dora.clone(), dora.id), dora);
        // A user name equal to the address, without an '@' (a provider's own notion of one).
        let odd = user("dora.corp", "Dora", Some(" DORA.corp "));
        let shown = shown_to(odd, other);
        assert_eq!(
            (shown.username.as_str(), shown.display_name.as_str()),
            ("Dora", "Dora")
        );
        // Names that are not addresses are shown as they are.
        let bob = user("bob", "Bob", Some("bob@corp.example"));
        assert_eq!(name_shown_to_others(&bob), "Bob");
        let shown = shown_to(bob, other);
        assert_eq!(
            (shown.username.as_str(), shown.display_name.as_str()),
            ("bob", "Bob")
        );
    }
}
