//! Who is calling (provisioned from their token), and finding others.

use std::time::{Duration, Instant};

use confab_runtime::identity::Principal;
use confab_schema::{User, UserId};

use super::inputs::{PageLimit, UserQuery};
use super::paging::{Page, Pager};
use crate::error::{ApiError, ApiResult};
use crate::state::ApiState;
use crate::store::search_users;

/// How long a provisioned profile is trusted before the store is written again.
const PROVISION_REFRESH: Duration = Duration::from_secs(600);
const PROVISION_CACHE_MAX: usize = 100_000;

impl ApiState {
    /// The user a verified token names, provisioned from its claims: written on first sight, and
    /// again when the claims change or the cached copy is old.
    pub async fn provision(&self, principal: Principal) -> ApiResult<User> {
        let user = User {
            id: principal.user_id,
            username: principal.username,
            display_name: principal.display_name,
            email: principal.email,
        };
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
    /// address only for themself.
    pub async fn user_profile(&self, caller: UserId, user: UserId) -> ApiResult<User> {
        self.require_shared_chat(caller, user).await?;
        let mut profile = self
            .store
            .get_user(user)
            .await?
            .ok_or(ApiError::NotFound("no such user"))?;
        if caller != user {
            profile.email = None;
        }
        Ok(profile)
    }

    /// Users whose user name or display name starts with `query`, or whose e-mail address is
    /// `query`, each once. E-mail addresses are private: each is shown to its own user only.
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

/// `user` as `viewer` may see them: their e-mail address only when it is their own.
pub fn shown_to(mut user: User, viewer: UserId) -> User {
    if user.id != viewer {
        user.email = None;
    }
    user
}
