//! Circles and matching queues, on the embedded default and on the real stack: access codes,
//! members, random pairing that never repeats the previous partner, pairing raced through two API
//! processes, expiry that removes everything, queues matched oldest first and left on disconnect,
//! presence and reactions in the new chats, matches that end for both, and the problems bad input
//! gets. The races and failures of the lobby and the expiry sweep are played on a store that holds
//! or fails the writes a test names.

mod support;

use support::on_both_stacks;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use confab_api::domain::circles::{CircleSettings, NewCircle};
use confab_api::domain::inputs::{AccessCode, CircleDisplayName};
use confab_api::domain::queues::queue_pool;
use confab_api::error::ApiError;
use confab_api::store::{Slot, SlotState, SlotWrite, Store, circle_pool};
use confab_schema::circle::{Circle, CircleMember, PairingState, QueueKind};
use confab_schema::event::EventKind;
use confab_schema::{ChatId, CircleId, Event, User};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use support::held_store::{Held, HeldApi};
use support::{DEADLINE, SseStream, Stack, TestApp, spawn_app, spawn_with};
use time::OffsetDateTime;

/// The users a test may use: the real stack's identity provider knows four.
const USERS: [&str; 4] = ["alice", "bob", "carol", "dave"];

struct Person {
    token: String,
    id: String,
}

async fn people(app: &TestApp, names: &[&str]) -> Vec<Person> {
    let mut found = Vec::new();
    for name in names {
        let token = app.token(name).await;
        let id = app.me(&token).await;
        found.push(Person { token, id });
    }
    found
}

async fn problem(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    response.json().await.unwrap()
}

/// Creates a circle owned by `owner` and has every other person join it; answers its id and code.
async fn circle_of(
    app: &TestApp,
    owner: &Person,
    others: &[&Person],
    body: Value,
) -> (String, String) {
    let created = app.post(&owner.token, "/v1/circles", &body).await;
    assert_eq!(created.status(), 201);
    let circle: Value = created.json().await.unwrap();
    let id = circle["id"].as_str().unwrap().to_owned();
    let code = circle["access_code"].as_str().unwrap().to_owned();
    for (i, other) in others.iter().enumerate() {
        let joined = app
            .post(
                &other.token,
                "/v1/circles/join",
                &json!({"access_code": code, "display_name": format!("member {i}")}),
            )
            .await;
        assert_eq!(joined.status(), 201);
    }
    (id, code)
}

async fn codes_members_and_problems(stack: Stack) {
    let app = spawn_app(stack).await;
    let p = people(&app, &USERS).await;
    let (alice, bob, carol, dave) = (&p[0], &p[1], &p[2], &p[3]);

    // Creation: bad input is refused with problems.
    for bad in [
        json!({"name": ""}),
        json!({"name": "c", "ttl_hours": 0}),
        json!({"name": "c", "ttl_hours": -1}),
        json!({"name": "c", "ttl_hours": 100000}),
        json!({"name": "c", "max_members": 1}),
    ] {
        problem(app.post(&alice.token, "/v1/circles", &bad).await, 422).await;
    }
    let created = app
        .post(
            &alice.token,
            "/v1/circles",
            &json!({"name": "Night owls", "rules": "be kind", "max_members": 3, "display_name": "Al"}),
        )
        .await;
    assert_eq!(created.status(), 201);
    let circle: Value = created.json().await.unwrap();
    let id = circle["id"].as_str().unwrap().to_owned();
    let code = circle["access_code"].as_str().unwrap().to_owned();
    assert_eq!(code.len(), 12);
    assert!(
        code.bytes()
            .all(|b| b"23456789ABCDEFGHJKMNPQRSTUVWXYZ".contains(&b)),
        "{code}"
    );
    assert_eq!(circle["rules"], "be kind");
    let expires = time::OffsetDateTime::parse(
        circle["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let hours = (expires - time::OffsetDateTime::now_utc()).whole_hours();
    assert!(
        (71..=72).contains(&hours),
        "default time to live is 72 h: {hours}"
    );

    // Wrong codes: malformed → 422, well-formed but unknown → 404.
    problem(
        app.post(
            &bob.token,
            "/v1/circles/join",
            &json!({"access_code": "nope", "display_name": "B"}),
        )
        .await,
        422,
    )
    .await;
    problem(
        app.post(
            &bob.token,
            "/v1/circles/join",
            &json!({"access_code": "222222222222", "display_name": "B"}),
        )
        .await,
        404,
    )
    .await;
    problem(app.get(&bob.token, &format!("/v1/circles/{id}")).await, 403).await;
    problem(app.get(&bob.token, "/v1/circles/not-an-id").await, 400).await;
    // Codes may be typed in lower case with dashes.
    let typed = format!("{}-{}", &code[..6], &code[6..]).to_lowercase();
    let joined = app
        .post(
            &bob.token,
            "/v1/circles/join",
            &json!({"access_code": typed, "display_name": "Bobby"}),
        )
        .await;
    assert_eq!(joined.status(), 201);
    let seen: Value = joined.json().await.unwrap();
    assert!(
        seen.get("access_code").is_none(),
        "only the owner sees the code"
    );
    problem(
        app.post(
            &bob.token,
            &format!("/v1/circles/{id}/access-code"),
            &json!({}),
        )
        .await,
        403,
    )
    .await;
    // Joining again renames.
    let again = app
        .post(
            &bob.token,
            "/v1/circles/join",
            &json!({"access_code": code, "display_name": "Bob B"}),
        )
        .await;
    assert_eq!(again.status(), 200);
    let joined = app
        .post(
            &carol.token,
            "/v1/circles/join",
            &json!({"access_code": code, "display_name": "Cee"}),
        )
        .await;
    assert_eq!(joined.status(), 201);
    // Full.
    problem(
        app.post(
            &dave.token,
            "/v1/circles/join",
            &json!({"access_code": code, "display_name": "D"}),
        )
        .await,
        409,
    )
    .await;
    let members: Vec<Value> = app
        .get(&bob.token, &format!("/v1/circles/{id}/members"))
        .await
        .json()
        .await
        .unwrap();
    let names: Vec<(&str, &str)> = members
        .iter()
        .map(|m| {
            (
                m["user_id"].as_str().unwrap(),
                m["display_name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            (alice.id.as_str(), "Al"),
            (bob.id.as_str(), "Bob B"),
            (carol.id.as_str(), "Cee")
        ]
    );

    // Removal: members cannot remove others, the owner can; the owner cannot leave.
    problem(
        app.delete(
            &bob.token,
            &format!("/v1/circles/{id}/members/{}", carol.id),
        )
        .await,
        403,
    )
    .await;
    problem(
        app.delete(
            &alice.token,
            &format!("/v1/circles/{id}/members/{}", alice.id),
        )
        .await,
        422,
    )
    .await;
    assert_eq!(
        app.delete(
            &alice.token,
            &format!("/v1/circles/{id}/members/{}", carol.id)
        )
        .await
        .status(),
        204
    );
    problem(
        app.get(&carol.token, &format!("/v1/circles/{id}/members"))
            .await,
        403,
    )
    .await;
    // Leaving.
    assert_eq!(
        app.delete(&bob.token, &format!("/v1/circles/{id}/members/{}", bob.id))
            .await
            .status(),
        204
    );
    // Now there is room; a rotated code replaces the old one.
    let rotated: Value = app
        .post(
            &alice.token,
            &format!("/v1/circles/{id}/access-code"),
            &json!({}),
        )
        .await
        .json()
        .await
        .unwrap();
    let new_code = rotated["access_code"].as_str().unwrap();
    assert_ne!(new_code, code);
    problem(
        app.post(
            &dave.token,
            "/v1/circles/join",
            &json!({"access_code": code, "display_name": "D"}),
        )
        .await,
        404,
    )
    .await;
    let joined = app
        .post(
            &dave.token,
            "/v1/circles/join",
            &json!({"access_code": new_code, "display_name": "D"}),
        )
        .await;
    assert_eq!(joined.status(), 201);

    // Queues: unknown kinds are 404 problems.
    problem(
        app.post(&alice.token, "/v1/queues/shout/join", &json!({}))
            .await,
        404,
    )
    .await;
    problem(app.get(&alice.token, "/v1/queues/talk").await, 404).await;
    problem(app.delete(&alice.token, "/v1/queues/shout").await, 404).await;
    app.stop().await;
}

#[tokio::test]
async fn codes_members_and_problems_on_the_embedded_default() {
    Box::pin(codes_members_and_problems(Stack::Embedded)).await;
}

#[tokio::test]
async fn codes_members_and_problems_on_the_real_stack() {
    if !support::real_stack_available("codes_members_and_problems_on_the_real_stack").await {
        return;
    }
    Box::pin(codes_members_and_problems(Stack::Real)).await;
}

/// A member the owner removed cannot join again with the code they know: the join answers 403
/// and they are not listed. A member who left by themself may come back with the same code.
async fn a_member_the_owner_removed_cannot_join_again(stack: Stack) {
    let app = spawn_app(stack).await;
    let p = people(&app, &USERS).await;
    let (owner, removed, leaver) = (&p[0], &p[1], &p[2]);
    let (id, code) = circle_of(&app, owner, &[removed, leaver], json!({"name": "Kept out"})).await;
    assert_eq!(
        app.delete(
            &owner.token,
            &format!("/v1/circles/{id}/members/{}", removed.id)
        )
        .await
        .status(),
        204
    );
    let refused = problem(
        app.post(
            &removed.token,
            "/v1/circles/join",
            &json!({"access_code": code, "display_name": "back again"}),
        )
        .await,
        403,
    )
    .await;
    assert!(
        refused["detail"]
            .as_str()
            .is_some_and(|detail| detail.contains("removed")),
        "{refused}"
    );
    let listed: Vec<Value> = app
        .get(&owner.token, &format!("/v1/circles/{id}/members"))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        listed.iter().all(|m| m["user_id"] != removed.id.as_str()),
        "{listed:?}"
    );
    problem(
        app.post(
            &removed.token,
            &format!("/v1/circles/{id}/pair"),
            &json!({}),
        )
        .await,
        403,
    )
    .await;

    // Leaving by oneself is no removal: the same code lets the leaver in again.
    assert_eq!(
        app.delete(
            &leaver.token,
            &format!("/v1/circles/{id}/members/{}", leaver.id)
        )
        .await
        .status(),
        204
    );
    let rejoined = app
        .post(
            &leaver.token,
            "/v1/circles/join",
            &json!({"access_code": code, "display_name": "back"}),
        )
        .await;
    assert_eq!(rejoined.status(), 201);
    let listed: Vec<Value> = app
        .get(&owner.token, &format!("/v1/circles/{id}/members"))
        .await
        .json()
        .await
        .unwrap();
    assert!(
        listed.iter().any(|m| m["user_id"] == leaver.id.as_str()),
        "{listed:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_member_the_owner_removed_cannot_join_again_on_the_embedded_default() {
    Box::pin(a_member_the_owner_removed_cannot_join_again(
        Stack::Embedded,
    ))
    .await;
}

#[tokio::test]
async fn a_member_the_owner_removed_cannot_join_again_on_the_real_stack() {
    if !support::real_stack_available(
        "a_member_the_owner_removed_cannot_join_again_on_the_real_stack",
    )
    .await
    {
        return;
    }
    Box::pin(a_member_the_owner_removed_cannot_join_again(Stack::Real)).await;
}

/// A model of the lobby, checked against what the API answers through many random rounds of
/// entering and leaving: a pairing never repeats anyone's previous partner, a pair always has a
/// partner who was waiting, and nobody waits while an eligible partner waits too.
async fn pairing_never_repeats_the_previous_partner(stack: Stack, seed: u64, rounds: usize) {
    let app = spawn_app(stack).await;
    let p = people(&app, &USERS).await;
    let others: Vec<&Person> = p[1..].iter().collect();
    let (circle, _) = circle_of(&app, &p[0], &others, json!({"name": "roulette"})).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum State {
        Idle,
        Waiting,
        Paired(usize),
    }
    let mut state = vec![State::Idle; p.len()];
    let mut previous: Vec<Option<usize>> = vec![None; p.len()];
    let index_of: HashMap<&str, usize> = p
        .iter()
        .enumerate()
        .map(|(i, x)| (x.id.as_str(), i))
        .collect();
    let mut pairings = 0;
    for round in 0..rounds {
        let who = rng.random_range(0..p.len());
        let path = format!("/v1/circles/{circle}/pair");
        if rng.random_bool(0.6) {
            let response = app.post(&p[who].token, &path, &json!({})).await;
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap();
            match state[who] {
                State::Paired(partner) => {
                    assert_eq!(status, 200, "round {round}: {body}");
                    assert_eq!(body["partner_id"], p[partner].id.as_str());
                }
                State::Idle | State::Waiting => {
                    let eligible = |other: usize| {
                        other != who
                            && state[other] == State::Waiting
                            && previous[who] != Some(other)
                            && previous[other] != Some(who)
                    };
                    if status == 200 {
                        let partner = index_of[body["partner_id"].as_str().unwrap()];
                        assert!(
                            eligible(partner),
                            "round {round}: {who} paired with {partner}, previous {previous:?}, states {state:?}"
                        );
                        state[who] = State::Paired(partner);
                        state[partner] = State::Paired(who);
                        previous[who] = Some(partner);
                        previous[partner] = Some(who);
                        pairings += 1;
                    } else {
                        assert_eq!(status, 202, "round {round}: {body}");
                        assert_eq!(body["state"], "waiting");
                        assert!(
                            !(0..p.len()).any(eligible),
                            "round {round}: {who} waits while an eligible partner waits: {state:?} {previous:?}"
                        );
                        state[who] = State::Waiting;
                    }
                }
            }
        } else {
            assert_eq!(app.delete(&p[who].token, &path).await.status(), 204);
            if let State::Paired(partner) = state[who] {
                state[partner] = State::Idle;
            }
            state[who] = State::Idle;
        }
    }
    assert!(
        pairings >= rounds / 10,
        "the rounds paired people: {pairings}"
    );
    app.stop().await;
}

#[tokio::test]
async fn pairing_never_repeats_the_previous_partner_on_the_embedded_default() {
    for seed in [1, 2, 3] {
        Box::pin(pairing_never_repeats_the_previous_partner(
            Stack::Embedded,
            seed,
            150,
        ))
        .await;
    }
}

#[tokio::test]
async fn pairing_never_repeats_the_previous_partner_on_the_real_stack() {
    if !support::real_stack_available(
        "pairing_never_repeats_the_previous_partner_on_the_real_stack",
    )
    .await
    {
        return;
    }
    Box::pin(pairing_never_repeats_the_previous_partner(
        Stack::Real,
        7,
        80,
    ))
    .await;
}

/// Two API processes on one store: everyone enters the lobby (and the talk queue) at once, half
/// through each. Nobody ends up in two pairings, and pairs agree with each other.
async fn racing_through_two_apis_pairs_nobody_twice(stack: Stack) {
    let first = spawn_app(stack).await;
    // The second process shares the first one's store, bus and keys.
    let second = spawn_with(stack, first.config.clone(), tempfile::tempdir().unwrap()).await;
    let apps = [&first, &second];
    let p = people(&first, &USERS).await;
    let others: Vec<&Person> = p[1..].iter().collect();
    let (circle, _) = circle_of(&first, &p[0], &others, json!({"name": "race"})).await;
    let path = format!("/v1/circles/{circle}/pair");
    let bases = [first.base.as_str(), second.base.as_str()];
    let tokens_and_ids: Vec<(String, String)> =
        p.iter().map(|q| (q.token.clone(), q.id.clone())).collect();
    for round in 0..3 {
        support::race_lobby_round(&bases, &tokens_and_ids, &path, round).await;
    }

    // The talk queue, raced the same way: two matches, each user in one.
    futures::future::join_all(p.iter().enumerate().map(|(i, person)| async move {
        let response = apps[i % 2]
            .post(&person.token, "/v1/queues/talk/join", &json!({}))
            .await;
        assert!(matches!(response.status().as_u16(), 200 | 202));
    }))
    .await;
    let mut matched: HashMap<String, String> = HashMap::new();
    for person in &p {
        let status: Value = first
            .get(&person.token, "/v1/queues/talk")
            .await
            .json()
            .await
            .unwrap();
        assert_eq!(
            status["state"], "paired",
            "four talkers make two matches: {status}"
        );
        matched.insert(
            person.id.clone(),
            status["partner_id"].as_str().unwrap().to_owned(),
        );
    }
    for (user, partner) in &matched {
        assert_eq!(matched.get(partner), Some(user));
    }
    second.stop().await;
    first.stop().await;
}

#[tokio::test]
async fn racing_through_two_apis_pairs_nobody_twice_on_the_embedded_default() {
    Box::pin(racing_through_two_apis_pairs_nobody_twice(Stack::Embedded)).await;
}

#[tokio::test]
async fn racing_through_two_apis_pairs_nobody_twice_on_the_real_stack() {
    if !support::real_stack_available(
        "racing_through_two_apis_pairs_nobody_twice_on_the_real_stack",
    )
    .await
    {
        return;
    }
    Box::pin(racing_through_two_apis_pairs_nobody_twice(Stack::Real)).await;
}

/// Waits until `check` holds, failing after the deadline.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A pairing's chat gets `circle.paired`, reactions and the partner's presence; ending it tells
/// both; expiry then removes the circle, its members, pairings, chats and messages.
async fn pairs_chat_and_expire(stack: Stack) {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    config.circles.sweep_interval_ms = 100;
    let app = spawn_with(stack, config, data).await;
    let p = people(&app, &USERS[..3]).await;
    let (alice, bob, carol) = (&p[0], &p[1], &p[2]);
    // Ten seconds to live.
    let (circle, code) = circle_of(
        &app,
        alice,
        &[bob],
        json!({"name": "brief", "ttl_hours": 10.0 / 3600.0, "display_name": "Al"}),
    )
    .await;
    let path = format!("/v1/circles/{circle}/pair");
    let mut alices = SseStream::open(
        app.http
            .get(app.url("/v1/events"))
            .bearer_auth(&alice.token),
    )
    .await;
    let bobs = SseStream::open(app.http.get(app.url("/v1/events")).bearer_auth(&bob.token)).await;
    assert_eq!(
        app.post(&alice.token, &path, &json!({})).await.status(),
        202
    );
    let paired = app.post(&bob.token, &path, &json!({})).await;
    assert_eq!(paired.status(), 200);
    let paired: Value = paired.json().await.unwrap();
    let chat = paired["chat_id"].as_str().unwrap().to_owned();
    let event = alices.next_of("circle.paired").await;
    assert_eq!(event.data["data"]["chat"]["id"], chat.as_str());
    assert_eq!(event.data["data"]["circle_id"], circle.as_str());
    let names: HashSet<&str> = event.data["data"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["display_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, HashSet::from(["Al", "member 0"]));

    // Messages and likes (reactions) in the pairing's chat.
    let sent = app
        .post(
            &bob.token,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": "hi"}),
        )
        .await;
    assert_eq!(sent.status(), 201);
    let signal: Value = sent.json().await.unwrap();
    let signal_id = signal["id"].as_str().unwrap();
    assert_eq!(
        alices.next_of("signal.created").await.data["data"]["text"],
        "hi"
    );
    let liked = app
        .http
        .put(app.url(&format!(
            "/v1/chats/{chat}/signals/{signal_id}/reactions/%E2%9D%A4"
        )))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert!(liked.status().is_success(), "{}", liked.status());
    let like = alices.next_of("reaction.added").await;
    assert_eq!(like.data["data"]["count"], 1);
    // Someone outside the pairing cannot read it, nor learn that it exists (a direct chat).
    assert_eq!(
        app.get(&carol.token, &format!("/v1/chats/{chat}/signals"))
            .await
            .status(),
        404
    );

    // The partner's connection events reach the other.
    drop(bobs);
    loop {
        let event = alices.next_event().await;
        if event.data["data"]["user_id"] == bob.id.as_str()
            && (event.event == "user.disconnected"
                || (event.event == "presence.updated" && event.data["data"]["state"] == "offline"))
        {
            break;
        }
    }

    // Ending the pairing tells both, and both leave its chat.
    assert_eq!(app.delete(&bob.token, &path).await.status(), 204);
    let ended = alices.next_of("circle.unpaired").await;
    assert_eq!(ended.data["data"]["chat_id"], chat.as_str());
    assert_eq!(ended.data["data"]["by"], bob.id.as_str());
    assert_eq!(
        app.get(&alice.token, &format!("/v1/chats/{chat}"))
            .await
            .status(),
        404
    );

    // Expiry: 410 first or 404 once swept, and then everything is gone.
    let circle_path = format!("/v1/circles/{circle}");
    eventually("the circle expires", || async {
        matches!(
            app.get(&alice.token, &circle_path).await.status().as_u16(),
            404 | 410
        )
    })
    .await;
    eventually("the sweep removes the circle", || async {
        app.get(&alice.token, &circle_path).await.status() == 404
    })
    .await;
    problem(
        app.get(&alice.token, &format!("{circle_path}/members"))
            .await,
        404,
    )
    .await;
    problem(app.post(&bob.token, &path, &json!({})).await, 404).await;
    problem(
        app.post(
            &carol.token,
            "/v1/circles/join",
            &json!({"access_code": code, "display_name": "C"}),
        )
        .await,
        404,
    )
    .await;
    // The pairing's chat and its messages are gone: 404 (not 403) for its former members, and
    // out of their chat lists.
    for person in [alice, bob] {
        problem(
            app.get(&person.token, &format!("/v1/chats/{chat}")).await,
            404,
        )
        .await;
        problem(
            app.get(&person.token, &format!("/v1/chats/{chat}/signals"))
                .await,
            404,
        )
        .await;
        let chats: Value = app
            .get(&person.token, "/v1/chats")
            .await
            .json()
            .await
            .unwrap();
        assert!(
            chats["items"]
                .as_array()
                .unwrap()
                .iter()
                .all(|c| c["id"] != chat.as_str()),
            "{chats}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn pairs_chat_and_expire_on_the_embedded_default() {
    Box::pin(pairs_chat_and_expire(Stack::Embedded)).await;
}

#[tokio::test]
async fn pairs_chat_and_expire_on_the_real_stack() {
    if !support::real_stack_available("pairs_chat_and_expire_on_the_real_stack").await {
        return;
    }
    Box::pin(pairs_chat_and_expire(Stack::Real)).await;
}

/// A pairing still standing when its circle expires ends for both before its chat is removed:
/// `circle.unpaired` (no `by`: nobody ended it) reaches a member's open stream, and a member who
/// was away gets it on their resume. The pairing's announcement, published again by the end, is
/// received once.
async fn a_pairing_standing_at_expiry_ends_for_both(stack: Stack) {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    config.circles.sweep_interval_ms = 100;
    let app = spawn_with(stack, config, data).await;
    let p = people(&app, &USERS[..2]).await;
    let (alice, bob) = (&p[0], &p[1]);
    // Eight seconds to live.
    let (circle, _) = circle_of(
        &app,
        alice,
        &[bob],
        json!({"name": "brief", "ttl_hours": 8.0 / 3600.0}),
    )
    .await;
    let path = format!("/v1/circles/{circle}/pair");
    let open = |person: &Person| {
        app.http
            .get(app.url("/v1/events"))
            .bearer_auth(&person.token)
    };
    let mut alices = SseStream::open(open(alice)).await;
    let mut bobs = SseStream::open(open(bob)).await;
    assert_eq!(
        app.post(&alice.token, &path, &json!({})).await.status(),
        202
    );
    let paired = app.post(&bob.token, &path, &json!({})).await;
    assert_eq!(paired.status(), 200);
    let paired: Value = paired.json().await.unwrap();
    let chat = paired["chat_id"].as_str().unwrap().to_owned();
    let announced = alices.next_of("circle.paired").await;
    assert_eq!(announced.data["data"]["chat"]["id"], chat.as_str());
    // Bob goes away after the announcement, and comes back after the expiry.
    let last_seen = bobs
        .next_of("circle.paired")
        .await
        .id
        .expect("a logged event");
    drop(bobs);

    let circle_path = format!("/v1/circles/{circle}");
    eventually("the sweep removes the circle", || async {
        app.get(&alice.token, &circle_path).await.status() == 404
    })
    .await;

    let ended = |event: &support::SseEvent| {
        assert_eq!(event.data["data"]["chat_id"], chat.as_str(), "{:?}", event);
        assert_eq!(
            event.data["data"]["circle_id"],
            circle.as_str(),
            "{:?}",
            event
        );
        assert!(
            event.data["data"].get("by").is_none(),
            "nobody ended it: {:?}",
            event
        );
    };
    // Live: the end comes, and the announcement is not received again before it.
    loop {
        let event = alices.next_event().await;
        assert_ne!(
            event.event, "circle.paired",
            "the announcement came twice: {event:?}"
        );
        if event.event == "circle.unpaired" {
            ended(&event);
            break;
        }
    }
    // On a resume.
    let mut resumed = SseStream::open(open(bob).header("Last-Event-ID", &last_seen)).await;
    loop {
        let event = resumed.next_event().await;
        assert_ne!(
            event.event, "circle.paired",
            "the announcement came twice: {event:?}"
        );
        if event.event == "circle.unpaired" {
            ended(&event);
            break;
        }
    }
    // And the chat is gone for both.
    for person in [alice, bob] {
        problem(
            app.get(&person.token, &format!("/v1/chats/{chat}")).await,
            404,
        )
        .await;
    }
    app.stop().await;
}

on_both_stacks!(a_pairing_standing_at_expiry_ends_for_both);

/// Queues: oldest first, `queue.matched` to both, 409 for the other queue of a pool; a user whose
/// event stream closed is taken out after the grace period, one still connected stays.
async fn queues_match_oldest_first_and_forget_the_disconnected(stack: Stack) {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    config.queues.disconnect_grace_ms = 300;
    config.queues.sweep_interval_ms = 50;
    let app = spawn_with(stack, config, data).await;
    let p = people(&app, &USERS).await;
    let (alice, bob, carol, dave) = (&p[0], &p[1], &p[2], &p[3]);
    let streams: Vec<SseStream> = futures::future::join_all(p.iter().map(|person| {
        SseStream::open(
            app.http
                .get(app.url("/v1/events"))
                .bearer_auth(&person.token),
        )
    }))
    .await;
    let mut streams: Vec<Option<SseStream>> = streams.into_iter().map(Some).collect();

    // Two venters wait (nobody listens yet); a listener gets the older one.
    assert_eq!(
        app.post(&alice.token, "/v1/queues/vent/join", &json!({}))
            .await
            .status(),
        202
    );
    assert_eq!(
        app.post(&bob.token, "/v1/queues/vent/join", &json!({}))
            .await
            .status(),
        202
    );
    problem(
        app.post(&alice.token, "/v1/queues/listen/join", &json!({}))
            .await,
        409,
    )
    .await;
    let matched = app
        .post(&carol.token, "/v1/queues/listen/join", &json!({}))
        .await;
    assert_eq!(matched.status(), 200);
    let matched: Value = matched.json().await.unwrap();
    assert_eq!(matched["partner_id"], alice.id.as_str(), "oldest first");
    assert_eq!(matched["kind"], "listen");
    let chat = matched["chat_id"].as_str().unwrap();
    for i in [0, 2] {
        let event = streams[i].as_mut().unwrap().next_of("queue.matched").await;
        assert_eq!(event.data["data"]["chat"]["id"], chat);
    }
    let alices: Value = app
        .get(&alice.token, "/v1/queues/vent")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(alices["state"], "paired");
    assert_eq!(alices["partner_id"], carol.id.as_str());
    // Bob still waits; he leaves and joins talk instead.
    let bobs: Value = app
        .get(&bob.token, "/v1/queues/vent")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(bobs["state"], "waiting");
    assert_eq!(
        app.delete(&bob.token, "/v1/queues/vent").await.status(),
        204
    );
    problem(app.get(&bob.token, "/v1/queues/vent").await, 404).await;
    assert_eq!(
        app.post(&bob.token, "/v1/queues/talk/join", &json!({}))
            .await
            .status(),
        202
    );

    // Dave waits to vent, then his stream closes: he is taken out after the grace period, while
    // Bob (connected, waiting longer) stays.
    assert_eq!(
        app.post(&dave.token, "/v1/queues/vent/join", &json!({}))
            .await
            .status(),
        202
    );
    streams[3] = None;
    eventually("a disconnected user leaves the queue", || async {
        app.get(&dave.token, "/v1/queues/vent").await.status() == 404
    })
    .await;
    let bobs: Value = app
        .get(&bob.token, "/v1/queues/talk")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(bobs["state"], "waiting", "a connected user stays");
    app.stop().await;
}

#[tokio::test]
async fn queues_match_oldest_first_and_forget_the_disconnected_on_the_embedded_default() {
    Box::pin(queues_match_oldest_first_and_forget_the_disconnected(
        Stack::Embedded,
    ))
    .await;
}

#[tokio::test]
async fn queues_match_oldest_first_and_forget_the_disconnected_on_the_real_stack() {
    if !support::real_stack_available(
        "queues_match_oldest_first_and_forget_the_disconnected_on_the_real_stack",
    )
    .await
    {
        return;
    }
    Box::pin(queues_match_oldest_first_and_forget_the_disconnected(
        Stack::Real,
    ))
    .await;
}

/// Whether `chat` is gone for `person`: 404 (not 403) for it and its messages, and out of their
/// chat list.
async fn assert_chat_gone(app: &TestApp, person: &Person, chat: &str) {
    for path in [
        format!("/v1/chats/{chat}"),
        format!("/v1/chats/{chat}/signals"),
    ] {
        problem(app.get(&person.token, &path).await, 404).await;
    }
    let chats: Value = app
        .get(&person.token, "/v1/chats")
        .await
        .json()
        .await
        .unwrap();
    assert!(
        chats["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["id"] != chat),
        "{chats}"
    );
}

async fn join_talk(app: &TestApp, person: &Person) -> reqwest::Response {
    app.post(&person.token, "/v1/queues/talk/join", &json!({}))
        .await
}

/// A queue match ends for both when one of the two leaves the queue, joins it again, or goes
/// away (no live stream for the grace period): the partner gets `queue.unmatched`, and the match's
/// chat is gone for both, so a former stranger can write to neither.
async fn queue_matches_end_for_both(stack: Stack) {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    config.queues.disconnect_grace_ms = 300;
    config.queues.sweep_interval_ms = 50;
    let app = spawn_with(stack, config, data).await;
    let p = people(&app, &USERS[..3]).await;
    let (alice, bob, carol) = (&p[0], &p[1], &p[2]);
    let streams: Vec<SseStream> = futures::future::join_all(p.iter().map(|person| {
        SseStream::open(
            app.http
                .get(app.url("/v1/events"))
                .bearer_auth(&person.token),
        )
    }))
    .await;
    let mut streams: Vec<Option<SseStream>> = streams.into_iter().map(Some).collect();
    let chat_of = |matched: Value| matched["chat_id"].as_str().unwrap().to_owned();

    // Alice and Bob are matched and talk.
    assert_eq!(join_talk(&app, alice).await.status(), 202);
    let matched = join_talk(&app, bob).await;
    assert_eq!(matched.status(), 200);
    let first = chat_of(matched.json().await.unwrap());
    for i in [0, 1] {
        let event = streams[i].as_mut().unwrap().next_of("queue.matched").await;
        assert_eq!(event.data["data"]["chat"]["id"], first.as_str());
    }
    let sent = app
        .post(
            &bob.token,
            &format!("/v1/chats/{first}/signals"),
            &json!({"kind": "message", "text": "hello, stranger"}),
        )
        .await;
    assert_eq!(sent.status(), 201);

    // Alice leaves the queue: the match ends for both, and Bob is told.
    assert_eq!(
        app.delete(&alice.token, "/v1/queues/talk").await.status(),
        204
    );
    let ended = streams[1]
        .as_mut()
        .unwrap()
        .next_of("queue.unmatched")
        .await;
    assert_eq!(ended.data["data"]["chat_id"], first.as_str());
    assert_eq!(ended.data["data"]["by"], alice.id.as_str());
    for person in [alice, bob] {
        assert_chat_gone(&app, person, &first).await;
        problem(app.get(&person.token, "/v1/queues/talk").await, 404).await;
    }
    problem(
        app.post(
            &bob.token,
            &format!("/v1/chats/{first}/signals"),
            &json!({"kind": "message", "text": "still there?"}),
        )
        .await,
        404,
    )
    .await;

    // Bob is matched with Carol, then joins again: that match ends too, and he waits anew.
    assert_eq!(join_talk(&app, bob).await.status(), 202);
    let matched = join_talk(&app, carol).await;
    assert_eq!(matched.status(), 200);
    let second = chat_of(matched.json().await.unwrap());
    let rejoined = join_talk(&app, bob).await;
    assert_eq!(rejoined.status(), 202);
    let rejoined: Value = rejoined.json().await.unwrap();
    assert_eq!(rejoined["state"], "waiting");
    for i in [1, 2] {
        let ended = streams[i]
            .as_mut()
            .unwrap()
            .next_of("queue.unmatched")
            .await;
        assert_eq!(ended.data["data"]["chat_id"], second.as_str());
        assert_eq!(ended.data["data"]["by"], bob.id.as_str());
    }
    for person in [bob, carol] {
        assert_chat_gone(&app, person, &second).await;
    }
    problem(app.get(&carol.token, "/v1/queues/talk").await, 404).await;

    // Alice is matched with the waiting Bob, then goes away: after the grace period the match
    // ends, and Bob is told.
    let matched = join_talk(&app, alice).await;
    assert_eq!(matched.status(), 200);
    let third = chat_of(matched.json().await.unwrap());
    streams[0] = None;
    let ended = streams[1]
        .as_mut()
        .unwrap()
        .next_of("queue.unmatched")
        .await;
    assert_eq!(ended.data["data"]["chat_id"], third.as_str());
    assert_eq!(ended.data["data"]["by"], alice.id.as_str());
    for person in [alice, bob] {
        assert_chat_gone(&app, person, &third).await;
    }
    problem(app.get(&bob.token, "/v1/queues/talk").await, 404).await;
    app.stop().await;
}

#[tokio::test]
async fn queue_matches_end_for_both_on_the_embedded_default() {
    Box::pin(queue_matches_end_for_both(Stack::Embedded)).await;
}

#[tokio::test]
async fn queue_matches_end_for_both_on_the_real_stack() {
    if !support::real_stack_available("queue_matches_end_for_both_on_the_real_stack").await {
        return;
    }
    Box::pin(queue_matches_end_for_both(Stack::Real)).await;
}

impl HeldApi {
    /// A circle `owner` made, which `others` joined.
    async fn circle(&self, owner: &User, others: &[&User]) -> Circle {
        let new = NewCircle::parse(
            &CircleSettings::default(),
            "lobby".into(),
            None,
            None,
            None,
            None,
            None,
        )
        .unwrap();
        let circle = self.state.create_circle(owner, new).await.unwrap();
        let code = AccessCode::parse(circle.access_code.as_deref().unwrap()).unwrap();
        for other in others {
            let name = CircleDisplayName::parse(other.username.clone()).unwrap();
            self.state
                .join_circle(other.id, code.clone(), name)
                .await
                .unwrap();
        }
        circle
    }

    /// Stores a circle of `owner`'s that expires at `expires_at`, bypassing the API (which makes
    /// none that expired).
    async fn circle_expiring(&self, owner: &User, expires_at: OffsetDateTime) -> CircleId {
        let circle = Circle {
            id: CircleId::new(),
            name: "brief".into(),
            description: None,
            rules: None,
            owner_id: owner.id,
            access_code: Some(AccessCode::generate().as_str().to_owned()),
            max_members: 2,
            created_at: confab_schema::model::to_millis(expires_at - Duration::from_secs(3600)),
            expires_at: confab_schema::model::to_millis(expires_at),
        };
        self.store.create_circle(&circle).await.unwrap();
        circle.id
    }
}

/// The owner removes a member whose entry into the lobby passed its membership check but has not
/// written its slot yet (held there until the removal is done): the entry is refused, and the
/// removed member is not left in the lobby, where anyone entering would be paired with them.
async fn a_member_removed_while_entering_the_lobby_is_not_left_in_it(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let owner = setup.user("owner").await;
    let removed = setup.user("removed").await;
    let other = setup.user("other").await;
    let circle = setup.circle(&owner, &[&removed, &other]).await;
    setup.store.hold_next(Held::Slots);
    let entry = tokio::spawn({
        let state = setup.state.clone();
        let (user, circle) = (removed.id, circle.id);
        async move { state.enter_circle_lobby(user, circle).await }
    });
    setup.store.gate.arrived(1).await;
    setup
        .state
        .remove_circle_member(owner.id, circle.id, removed.id)
        .await
        .unwrap();
    setup.store.gate.release(1).await;
    let entered = entry.await.unwrap();
    assert!(
        matches!(entered, Err(ApiError::Forbidden(_))),
        "a removed member entered the lobby: {entered:?}"
    );
    let slots = setup.store.slots(&circle_pool(circle.id)).await.unwrap();
    assert!(
        slots.iter().all(|slot| slot.user_id != removed.id),
        "{slots:?}"
    );
    // The next member to enter waits: there is nobody to be paired with.
    let waiting = setup
        .state
        .enter_circle_lobby(other.id, circle.id)
        .await
        .unwrap();
    assert_eq!(waiting.state, PairingState::Waiting, "{waiting:?}");
    setup.clean_up().await;
}

on_both_stacks!(a_member_removed_while_entering_the_lobby_is_not_left_in_it);

/// The owner removes a member whose join with the code (as a member: a rename) read no removal
/// yet and has not written its member row (held there until the removal is done): the join,
/// finding the removal after its write, takes itself out and is refused, and the removed member
/// is not left in the circle.
async fn a_join_racing_the_owners_removal_does_not_let_the_removed_back_in(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let owner = setup.user("owner").await;
    let removed = setup.user("removed").await;
    let circle = setup.circle(&owner, &[&removed]).await;
    let code = AccessCode::parse(circle.access_code.as_deref().unwrap()).unwrap();
    setup.store.hold_next(Held::CircleMemberPut);
    let join = tokio::spawn({
        let state = setup.state.clone();
        let (user, code) = (removed.id, code.clone());
        async move {
            let name = CircleDisplayName::parse("back again".into()).unwrap();
            state.join_circle(user, code, name).await
        }
    });
    setup.store.gate.arrived(1).await;
    setup
        .state
        .remove_circle_member(owner.id, circle.id, removed.id)
        .await
        .unwrap();
    setup.store.gate.release(1).await;
    let joined = join.await.unwrap();
    assert!(
        matches!(joined, Err(ApiError::Forbidden(_))),
        "a removed member joined again: {joined:?}"
    );
    let members = setup.store.circle_members(circle.id).await.unwrap();
    assert!(
        members.iter().all(|m| m.user_id != removed.id),
        "{members:?}"
    );
    // And a join after the removal is refused before it writes anything.
    let name = CircleDisplayName::parse("again".into()).unwrap();
    let again = setup.state.join_circle(removed.id, code, name).await;
    assert!(matches!(again, Err(ApiError::Forbidden(_))), "{again:?}");
    setup.clean_up().await;
}

on_both_stacks!(a_join_racing_the_owners_removal_does_not_let_the_removed_back_in);

/// A join that failed after it wrote its member row and before it took itself out again (having
/// found the owner's removal) left the removed member in the circle: the join's retry, refused,
/// takes them out.
async fn a_refused_join_takes_out_what_a_failed_one_left(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let owner = setup.user("owner").await;
    let removed = setup.user("removed").await;
    let circle = setup.circle(&owner, &[&removed]).await;
    let code = AccessCode::parse(circle.access_code.as_deref().unwrap()).unwrap();
    setup
        .state
        .remove_circle_member(owner.id, circle.id, removed.id)
        .await
        .unwrap();
    // What the failed join left: its member row, written after the removal.
    let left_behind = confab_schema::circle::CircleMember {
        user_id: removed.id,
        display_name: "back again".into(),
        joined_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
    };
    setup
        .store
        .put_circle_member(circle.id, &left_behind, circle.max_members)
        .await
        .unwrap();

    let name = CircleDisplayName::parse("back again".into()).unwrap();
    let again = setup.state.join_circle(removed.id, code, name).await;
    assert!(matches!(again, Err(ApiError::Forbidden(_))), "{again:?}");
    let members = setup.store.circle_members(circle.id).await.unwrap();
    assert!(
        members.iter().all(|m| m.user_id != removed.id),
        "the refused join left the removed member in: {members:?}"
    );
    setup.clean_up().await;
}

on_both_stacks!(a_refused_join_takes_out_what_a_failed_one_left);

/// One sweep removes every expired circle, however many batches they take, and a circle whose
/// removal fails holds up none of the others: it goes with the next sweep. A live circle stays.
async fn one_sweep_removes_every_expired_circle_past_a_failing_one(stack: Stack) {
    const BATCH: usize = 3;
    let budget = Duration::from_secs(60);
    let setup = HeldApi::new(stack).await;
    let owner = setup.user("owner").await;
    let now = OffsetDateTime::now_utc();
    let live = setup.circle(&owner, &[]).await.id;
    let exists = |id: CircleId| {
        let store = Arc::clone(&setup.store);
        async move { store.get_circle(id).await.unwrap().is_some() }
    };

    // More than two batches.
    let mut expired = Vec::new();
    for i in 0..7 {
        let at = now - Duration::from_secs(3600) + Duration::from_secs(i);
        expired.push(setup.circle_expiring(&owner, at).await);
    }
    let removed = setup
        .state
        .sweep_expired_circles_in(BATCH, budget)
        .await
        .unwrap();
    assert_eq!(removed, expired.len(), "removed in one sweep");
    for id in &expired {
        assert!(!exists(*id).await, "expired circle {id} is still there");
    }

    // The first removal fails: the others go all the same.
    let mut expired = Vec::new();
    for i in 0..5 {
        let at = now - Duration::from_secs(60) + Duration::from_secs(i);
        expired.push(setup.circle_expiring(&owner, at).await);
    }
    setup.store.fail_next(Held::CircleDeleted);
    let removed = setup
        .state
        .sweep_expired_circles_in(BATCH, budget)
        .await
        .unwrap();
    assert_eq!(removed, expired.len() - 1, "all but the failing one");
    let mut left = Vec::new();
    for id in &expired {
        if exists(*id).await {
            left.push(*id);
        }
    }
    assert_eq!(left.len(), 1, "{left:?}");
    let removed = setup
        .state
        .sweep_expired_circles_in(BATCH, budget)
        .await
        .unwrap();
    assert_eq!(removed, 1, "the next sweep removes it");
    assert!(!exists(left[0]).await);
    assert!(exists(live).await, "a live circle stays");
    setup.clean_up().await;
}

on_both_stacks!(one_sweep_removes_every_expired_circle_past_a_failing_one);

/// A user leaves a queue and joins it again (here on its other side): the new wait must not be
/// changed by a write made from a read of the first one (a match or a sweep that raced with the
/// leave), even though both began as new slots.
async fn a_wait_begun_again_is_not_changed_by_a_write_read_from_the_one_before(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let pool = queue_pool(QueueKind::Vent);
    let slot = |store: Arc<support::held_store::HeldStore>| async move {
        store
            .slots(pool)
            .await
            .unwrap()
            .into_iter()
            .find(|slot| slot.user_id == alice.id)
    };
    setup
        .state
        .join_queue(alice.id, QueueKind::Vent)
        .await
        .unwrap();
    let first = slot(Arc::clone(&setup.store)).await.expect("waiting");
    setup
        .state
        .leave_queue(alice.id, QueueKind::Vent)
        .await
        .unwrap();
    setup
        .state
        .join_queue(alice.id, QueueKind::Listen)
        .await
        .unwrap();
    // A sweep that found the first wait gone away removes it now.
    let stale = SlotWrite::Delete {
        user: alice.id,
        expected: first.version,
    };
    assert!(
        !setup.store.write_slots(pool, &[stale]).await.unwrap(),
        "a removal read from the first wait applied to the second"
    );
    let second = slot(Arc::clone(&setup.store)).await.expect("still waiting");
    assert_eq!(second.kind, "listen", "{second:?}");
    setup.clean_up().await;
}

on_both_stacks!(a_wait_begun_again_is_not_changed_by_a_write_read_from_the_one_before);

/// A removal from a circle fails after the member row went, before the removed member's wait in
/// the lobby ended: a retry of it (by the owner, or of the member's own leave) finishes it, so
/// the next member to enter is not paired with someone no longer in the circle.
async fn a_removal_that_failed_half_way_is_finished_by_its_retry(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let owner = setup.user("owner").await;
    let removed = setup.user("removed").await;
    let leaving = setup.user("leaving").await;
    let other = setup.user("other").await;
    let circle = setup.circle(&owner, &[&removed, &leaving, &other]).await;
    for (person, by) in [(&removed, &owner), (&leaving, &leaving)] {
        let waiting = setup
            .state
            .enter_circle_lobby(person.id, circle.id)
            .await
            .unwrap();
        assert_eq!(waiting.state, PairingState::Waiting, "{waiting:?}");
        setup.store.fail_next(Held::Slots);
        let failed = setup
            .state
            .remove_circle_member(by.id, circle.id, person.id)
            .await;
        assert!(
            failed.is_err(),
            "the scenario: the removal failed: {failed:?}"
        );
        let retried = setup
            .state
            .remove_circle_member(by.id, circle.id, person.id)
            .await;
        assert!(
            retried.is_ok(),
            "{}'s removal was not finished by its retry: {retried:?}",
            person.username
        );
        let slots = setup.store.slots(&circle_pool(circle.id)).await.unwrap();
        assert!(
            slots.iter().all(|slot| slot.user_id != person.id),
            "{} is left in the lobby: {slots:?}",
            person.username
        );
    }
    // The next member to enter waits: there is nobody to be paired with.
    let waiting = setup
        .state
        .enter_circle_lobby(other.id, circle.id)
        .await
        .unwrap();
    assert_eq!(waiting.state, PairingState::Waiting, "{waiting:?}");
    // Nobody removes a member who was never in the lobby twice.
    let again = setup
        .state
        .remove_circle_member(owner.id, circle.id, removed.id)
        .await;
    assert!(matches!(again, Err(ApiError::NotFound(_))), "{again:?}");
    setup.clean_up().await;
}

on_both_stacks!(a_removal_that_failed_half_way_is_finished_by_its_retry);

/// A removal from a circle fails after the member row went, before the removed member's wait in
/// the lobby ended, and nobody retries it: the next member to enter is not paired with someone
/// no longer in the circle (who would get a chat with them, and their name).
async fn a_removed_member_left_in_the_lobby_is_paired_with_nobody(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let owner = setup.user("owner").await;
    let removed = setup.user("removed").await;
    let other = setup.user("other").await;
    let circle = setup.circle(&owner, &[&removed, &other]).await;
    let waiting = setup
        .state
        .enter_circle_lobby(removed.id, circle.id)
        .await
        .unwrap();
    assert_eq!(waiting.state, PairingState::Waiting, "{waiting:?}");
    setup.store.fail_next(Held::Slots);
    let failed = setup
        .state
        .remove_circle_member(owner.id, circle.id, removed.id)
        .await;
    assert!(
        failed.is_err(),
        "the scenario: the removal failed: {failed:?}"
    );
    let entered = setup
        .state
        .enter_circle_lobby(other.id, circle.id)
        .await
        .unwrap();
    assert_eq!(
        (entered.state, entered.partner_id),
        (PairingState::Waiting, None),
        "paired with a member removed: {entered:?}"
    );
    let left = chats_left_to(&setup.store, &other, &removed).await;
    assert!(left.is_empty(), "{left}");
    setup.clean_up().await;
}

on_both_stacks!(a_removed_member_left_in_the_lobby_is_paired_with_nobody);

/// Bob's entry into the lobby passes its check while the circle is live, and pairs him with
/// Alice only once it has expired (held until then): the sweep of the expired circle may have
/// read its chats before that chat was recorded, so the pairing is undone and its chat goes, and
/// Bob is told the circle expired. Before, the chat of the two outlived the circle for good.
async fn a_pairing_made_as_its_circle_expires_does_not_outlive_it(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let owner = setup.user("owner").await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let expires_at = OffsetDateTime::now_utc() + Duration::from_secs(2);
    let circle = setup.circle_expiring(&owner, expires_at).await;
    for user in [&alice, &bob] {
        let member = confab_schema::circle::CircleMember {
            user_id: user.id,
            display_name: user.username.clone(),
            joined_at: confab_schema::model::to_millis(OffsetDateTime::now_utc()),
        };
        setup
            .store
            .put_circle_member(circle, &member, 3)
            .await
            .unwrap();
    }
    let waiting = setup
        .state
        .enter_circle_lobby(alice.id, circle)
        .await
        .unwrap();
    assert_eq!(waiting.state, PairingState::Waiting, "{waiting:?}");
    setup.store.hold_next(Held::Slots);
    let entry = tokio::spawn({
        let state = setup.state.clone();
        let user = bob.id;
        async move { state.enter_circle_lobby(user, circle).await }
    });
    setup.store.gate.arrived(1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while OffsetDateTime::now_utc() <= expires_at {
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    setup.store.gate.release(1).await;
    let entered = entry.await.unwrap();
    assert!(
        matches!(entered, Err(ApiError::Gone(_))),
        "an entry into an expired circle: {entered:?}"
    );
    let left = chats_left_to(&setup.store, &alice, &bob).await;
    assert!(left.is_empty(), "{left}");
    // Nor does the circle's sweep announce it.
    setup.state.sweep_expired_circles().await.unwrap();
    let last = setup.bus.inner.last_seq().await.unwrap();
    let announced: Vec<&'static str> = setup
        .bus
        .inner
        .read(0, last, confab_runtime::bus::ChatFilter::All, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|logged| logged.envelope.event.kind().as_str())
        .filter(|kind| kind.starts_with("circle."))
        .collect();
    assert!(
        !announced.contains(&"circle.paired"),
        "the undone pairing was announced: {announced:?}"
    );
    setup.clean_up().await;
}

on_both_stacks!(a_pairing_made_as_its_circle_expires_does_not_outlive_it);

/// Alice, and Bob waiting in the `listen` queue, where the next to join `vent` is paired with him.
async fn bob_listening(setup: &HeldApi) -> (User, User) {
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    setup
        .state
        .join_queue(bob.id, QueueKind::Listen)
        .await
        .unwrap();
    (alice, bob)
}

/// Alice's join of the `vent` queue, on its way.
fn alice_vents(
    setup: &HeldApi,
    alice: &User,
) -> tokio::task::JoinHandle<confab_api::error::ApiResult<confab_schema::circle::PairingStatus>> {
    let state = setup.state.clone();
    let user = alice.id;
    tokio::spawn(async move { state.join_queue(user, QueueKind::Vent).await })
}

/// The owner of a circle of Alice and Bob, Alice, Bob, the circle, and what Bob's entry of its
/// lobby answered: the next to enter is paired with him.
async fn bob_in_a_lobby(
    setup: &HeldApi,
) -> (
    User,
    User,
    User,
    Circle,
    confab_schema::circle::PairingStatus,
) {
    let owner = setup.user("owner").await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let circle = setup.circle(&owner, &[&alice, &bob]).await;
    let entered = setup
        .state
        .enter_circle_lobby(bob.id, circle.id)
        .await
        .unwrap();
    (owner, alice, bob, circle, entered)
}

/// `user`'s entry of `circle`'s lobby, on its way.
fn enters_the_lobby(
    setup: &HeldApi,
    user: &User,
    circle: &Circle,
) -> tokio::task::JoinHandle<confab_api::error::ApiResult<confab_schema::circle::PairingStatus>> {
    let state = setup.state.clone();
    let (user, circle) = (user.id, circle.id);
    tokio::spawn(async move { state.enter_circle_lobby(user, circle).await })
}

/// The chats `a` is in that `b` is in too, and those in `a`'s chat list: what a pairing of the
/// two left behind.
async fn chats_left_to(store: &Arc<support::held_store::HeldStore>, a: &User, b: &User) -> String {
    let mut shared = Vec::new();
    for chat in store.chats_of(a.id).await.unwrap() {
        let members = store.members(chat).await.unwrap();
        if members.iter().any(|m| m.user_id == b.id) {
            shared.push(chat);
        }
    }
    let listed = store.chats_by_activity(a.id, None, 10).await.unwrap();
    if shared.is_empty() && listed.is_empty() {
        return String::new();
    }
    format!("shared with {}: {shared:?}; listed: {listed:?}", b.username)
}

/// Bob waits in `listen`; Alice's join of `vent` pairs them, and Bob leaves the queue while
/// Alice's side is still making the chat (held there). The match ended before it was announced:
/// no chat of the two is left (nothing would ever remove it), and Alice's join answers 409 (her
/// match ended meanwhile; she joins again), neither a chat nor a 404.
async fn a_match_ended_while_its_chat_is_made_leaves_no_chat(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let (alice, bob) = bob_listening(&setup).await;
    setup.store.hold_next(Held::ChatCreated);
    let join = alice_vents(&setup, &alice);
    setup.store.gate.arrived(1).await;
    setup
        .state
        .leave_queue(bob.id, QueueKind::Listen)
        .await
        .unwrap();
    setup.store.gate.release(1).await;
    let joined = join.await.unwrap();
    let left = chats_left_to(&setup.store, &alice, &bob).await;
    assert!(left.is_empty(), "an ended match left its chat: {left}");
    assert!(
        matches!(joined, Err(ApiError::Conflict(_))),
        "alice's join answered {joined:?}"
    );
    setup.clean_up().await;
}

on_both_stacks!(a_match_ended_while_its_chat_is_made_leaves_no_chat);

/// The circle's version: Bob waits in the lobby; Alice's entry pairs them, and while her side is
/// still making the chat (held there) Bob leaves the lobby, or the owner removes him. Neither is
/// left a member of that chat, and Alice's entry answers 409 (her pairing ended meanwhile).
async fn a_pairing_ended_while_its_chat_is_made_leaves_no_chat(stack: Stack) {
    for removal in [false, true] {
        // A gate opens once: each case has its own.
        let setup = HeldApi::new(stack).await;
        let (owner, alice, bob, circle, waiting) = bob_in_a_lobby(&setup).await;
        assert_eq!(waiting.state, PairingState::Waiting, "{waiting:?}");
        setup.store.hold_next(Held::ChatCreated);
        let entry = enters_the_lobby(&setup, &alice, &circle);
        setup.store.gate.arrived(1).await;
        if removal {
            setup
                .state
                .remove_circle_member(owner.id, circle.id, bob.id)
                .await
                .unwrap();
        } else {
            setup
                .state
                .leave_circle_lobby(bob.id, circle.id)
                .await
                .unwrap();
        }
        setup.store.gate.release(1).await;
        let entered = entry.await.unwrap();
        let left = chats_left_to(&setup.store, &alice, &bob).await;
        assert!(
            left.is_empty(),
            "an ended pairing (removal: {removal}) left its chat: {left}"
        );
        assert!(
            matches!(entered, Err(ApiError::Conflict(_))),
            "alice's entry (removal: {removal}) answered {entered:?}"
        );
        setup.clean_up().await;
    }
}

on_both_stacks!(a_pairing_ended_while_its_chat_is_made_leaves_no_chat);

/// Whether `error` is the 409 a leave answers when a match took the caller's wait first, with the
/// problem type that says so.
fn is_matched_meanwhile(error: &ApiError) -> bool {
    let problem = confab_runtime::Problem::from(error);
    problem.status == 409 && problem.kind.ends_with("/matched")
}

/// Bob waits, and leaves while a join of Alice's pairs them (his leave's slot write is held until
/// the match is made and announced). The match took his wait before his leave could: the leave
/// answers 409 `matched` and the match stands for both (Alice was told of it); it is not undone
/// behind her back. The same in a circle's lobby.
async fn a_leave_racing_a_match_leaves_the_match_standing(stack: Stack) {
    // The queue. A gate opens once: each case has its own.
    let setup = HeldApi::new(stack).await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    setup
        .state
        .join_queue(bob.id, QueueKind::Listen)
        .await
        .unwrap();
    setup.store.hold_next(Held::Slots);
    let leave = tokio::spawn({
        let state = setup.state.clone();
        let user = bob.id;
        async move { state.leave_queue(user, QueueKind::Listen).await }
    });
    setup.store.gate.arrived(1).await;
    let matched = setup
        .state
        .join_queue(alice.id, QueueKind::Vent)
        .await
        .unwrap();
    assert_eq!(matched.state, PairingState::Paired, "{matched:?}");
    setup.store.gate.release(1).await;
    let left = leave.await.unwrap();
    assert!(
        left.as_ref().is_err_and(is_matched_meanwhile),
        "bob's leave answered {left:?}"
    );
    for (person, partner, kind) in [
        (&alice, &bob, QueueKind::Vent),
        (&bob, &alice, QueueKind::Listen),
    ] {
        let status = setup.state.queue_status(person.id, kind).await;
        assert!(
            status.as_ref().is_ok_and(|status| {
                status.state == PairingState::Paired
                    && status.partner_id == Some(partner.id)
                    && status.chat_id == matched.chat_id
            }),
            "{}'s match did not stand: {status:?}",
            person.username
        );
    }
    assert!(!chats_left_to(&setup.store, &bob, &alice).await.is_empty());
    setup.clean_up().await;

    // The lobby.
    let setup = HeldApi::new(stack).await;
    let (_, alice, bob, circle, waiting) = bob_in_a_lobby(&setup).await;
    assert_eq!(waiting.state, PairingState::Waiting, "{waiting:?}");
    setup.store.hold_next(Held::Slots);
    let leave = tokio::spawn({
        let state = setup.state.clone();
        let (user, circle) = (bob.id, circle.id);
        async move { state.leave_circle_lobby(user, circle).await }
    });
    setup.store.gate.arrived(1).await;
    let paired = setup
        .state
        .enter_circle_lobby(alice.id, circle.id)
        .await
        .unwrap();
    assert_eq!(paired.state, PairingState::Paired, "{paired:?}");
    setup.store.gate.release(1).await;
    let left = leave.await.unwrap();
    assert!(
        left.as_ref().is_err_and(is_matched_meanwhile),
        "bob's lobby leave answered {left:?}"
    );
    let slots = setup.store.slots(&circle_pool(circle.id)).await.unwrap();
    for (person, partner) in [(&alice, &bob), (&bob, &alice)] {
        assert!(
            slots.iter().any(|slot| slot.user_id == person.id
                && slot.state == SlotState::Paired
                && slot.partner == Some(partner.id)
                && slot.chat == paired.chat_id),
            "{}'s pairing did not stand: {slots:?}",
            person.username
        );
    }
    assert!(!chats_left_to(&setup.store, &bob, &alice).await.is_empty());
    setup.clean_up().await;
}

on_both_stacks!(a_leave_racing_a_match_leaves_the_match_standing);

/// The owner removes Bob, idle in the lobby, while an entry of his that passed its membership
/// check before the removal puts him back to waiting, and Alice enters: all of it between the
/// removal's read of his slot and its removal of it (held there). Alice's entry, which reads the
/// members after its own write, does not pair her with someone no longer in the circle; the
/// removal then takes his wait away, and no chat of the two is left.
async fn a_member_paired_while_removed_is_not_left_in_the_pairing(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let owner = setup.user("owner").await;
    let alice = setup.user("alice").await;
    let bob = setup.user("bob").await;
    let circle = setup.circle(&owner, &[&alice, &bob]).await;
    let pool = circle_pool(circle.id);
    setup
        .state
        .enter_circle_lobby(bob.id, circle.id)
        .await
        .unwrap();
    setup
        .state
        .leave_circle_lobby(bob.id, circle.id)
        .await
        .unwrap();
    let slot_of = |user: &User| {
        let (store, pool, user) = (Arc::clone(&setup.store), pool.clone(), user.id);
        async move {
            store
                .slots(&pool)
                .await
                .unwrap()
                .into_iter()
                .find(|slot| slot.user_id == user)
        }
    };
    let idle = slot_of(&bob).await.expect("bob's idle slot");
    assert_eq!(idle.state, SlotState::Idle, "{idle:?}");

    setup.store.hold_next(Held::Slots);
    let removal = tokio::spawn({
        let state = setup.state.clone();
        let (owner, circle, user) = (owner.id, circle.id, bob.id);
        async move { state.remove_circle_member(owner, circle, user).await }
    });
    setup.store.gate.arrived(1).await;
    // Bob's entry, past its membership check, writes his wait (straight to the store: the gate
    // holds the removal's write).
    let waiting = Slot {
        state: SlotState::Waiting,
        since: OffsetDateTime::now_utc(),
        version: idle.version + 1,
        ..idle.clone()
    };
    let rewaited = setup
        .store
        .inner
        .write_slots(
            &pool,
            &[SlotWrite::Replace {
                expected: idle.version,
                slot: waiting,
            }],
        )
        .await
        .unwrap();
    assert!(rewaited);
    let entered = setup
        .state
        .enter_circle_lobby(alice.id, circle.id)
        .await
        .unwrap();
    assert_eq!(
        (entered.state, entered.partner_id),
        (PairingState::Waiting, None),
        "paired with a member removed: {entered:?}"
    );
    setup.store.gate.release(1).await;
    removal.await.unwrap().unwrap();

    assert_eq!(slot_of(&bob).await, None, "bob is left in the lobby");
    let alices = slot_of(&alice).await;
    assert!(
        alices
            .as_ref()
            .is_some_and(|slot| slot.state != SlotState::Paired),
        "alice is left paired with a removed member: {alices:?}"
    );
    let left = chats_left_to(&setup.store, &alice, &bob).await;
    assert!(left.is_empty(), "the pairing's chat is left open: {left}");
    setup.clean_up().await;
}

on_both_stacks!(a_member_paired_while_removed_is_not_left_in_the_pairing);

/// The kinds of the events of `chat` in the log, in its order.
async fn event_kinds_of(setup: &HeldApi, chat: ChatId) -> Vec<&'static str> {
    setup
        .bus
        .events_of(chat)
        .await
        .iter()
        .map(|logged| logged.envelope.event.kind().as_str())
        .collect()
}

/// Bob waits, and Alice's join matches them; while her side is on its way to announce the match
/// (its `queue.matched` held before the log), Bob leaves and ends it. Streams deliver the log in
/// its order, so the end must come after the match's announcement, which comes once: a
/// `queue.matched` after the `queue.unmatched` would tell both of a match that is over, in a
/// chat that is gone. The same in a circle's lobby.
async fn a_match_is_announced_before_its_end(stack: Stack) {
    // The queue. A gate opens once: each case has its own.
    let setup = HeldApi::new(stack).await;
    let (alice, bob) = bob_listening(&setup).await;
    setup.bus.hold_next(EventKind::QueueMatched);
    let join = alice_vents(&setup, &alice);
    setup.bus.gate.arrived(1).await;
    let matched = setup
        .state
        .queue_status(bob.id, QueueKind::Listen)
        .await
        .unwrap();
    let chat = matched.chat_id.expect("bob is matched");
    setup
        .state
        .leave_queue(bob.id, QueueKind::Listen)
        .await
        .unwrap();
    setup.bus.gate.release(1).await;
    join.await.unwrap().ok();
    let kinds = event_kinds_of(&setup, chat).await;
    assert_eq!(
        kinds,
        ["queue.matched", "queue.unmatched"],
        "the events of the match's chat"
    );
    let mut joined = setup.bus.events_of(chat).await[0].envelope.joined.clone();
    joined.sort();
    let mut pair = vec![alice.id, bob.id];
    pair.sort();
    assert_eq!(
        joined, pair,
        "the match's announcement routes its chat to both"
    );
    setup.clean_up().await;

    // The lobby.
    let setup = HeldApi::new(stack).await;
    let (_, alice, bob, circle, _) = bob_in_a_lobby(&setup).await;
    setup.bus.hold_next(EventKind::CirclePaired);
    let entry = enters_the_lobby(&setup, &alice, &circle);
    setup.bus.gate.arrived(1).await;
    let slots = setup.store.slots(&circle_pool(circle.id)).await.unwrap();
    let chat = slots
        .iter()
        .find(|slot| slot.user_id == bob.id)
        .and_then(|slot| slot.chat)
        .expect("bob is paired");
    setup
        .state
        .leave_circle_lobby(bob.id, circle.id)
        .await
        .unwrap();
    setup.bus.gate.release(1).await;
    entry.await.unwrap().ok();
    let kinds = event_kinds_of(&setup, chat).await;
    assert_eq!(
        kinds,
        ["circle.paired", "circle.unpaired"],
        "the events of the pairing's chat"
    );
    setup.clean_up().await;
}

on_both_stacks!(a_match_is_announced_before_its_end);

/// Bob waits and Alice's join matches them. Bob leaves while her side has still to make the chat
/// (held there), so his end's first close finds no chat; his slot write waits (held) until her
/// side has made the chat and found the match standing, and then his second close fails, as a
/// process that stopped between the two would. The chat is whole, and no slot names it as a
/// match any more: the retry of his leave finishes the end (the chat is removed, and Alice is
/// told), as a retried circle removal finishes a half-failed one.
async fn an_end_stopped_between_its_two_closes_is_finished_by_its_retry(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let (alice, bob) = bob_listening(&setup).await;
    setup.under.hold_next(Held::ChatCreated);
    let join = alice_vents(&setup, &alice);
    setup.under.gate.arrived(1).await;
    setup.store.hold_next(Held::Slots);
    let leave = tokio::spawn({
        let state = setup.state.clone();
        let user = bob.id;
        async move { state.leave_queue(user, QueueKind::Listen).await }
    });
    setup.store.gate.arrived(1).await;
    // His first close is done (it comes before his slot write); his second one fails.
    setup.store.fail_every(Held::MemberRemoved);
    setup.under.gate.release(1).await;
    let matched = join.await.unwrap().unwrap();
    assert_eq!(matched.state, PairingState::Paired, "{matched:?}");
    let chat = matched.chat_id.expect("a chat");
    setup.store.gate.release(1).await;
    let failed = leave.await.unwrap();
    assert!(failed.is_err(), "the scenario: the end failed: {failed:?}");
    setup.store.lift(Held::MemberRemoved);
    assert!(
        !chats_left_to(&setup.store, &alice, &bob).await.is_empty(),
        "the scenario: the chat is whole"
    );

    setup
        .state
        .leave_queue(bob.id, QueueKind::Listen)
        .await
        .unwrap();
    let left = chats_left_to(&setup.store, &alice, &bob).await;
    assert!(
        left.is_empty(),
        "the end's retry left the match's chat open: {left}"
    );
    assert_eq!(setup.store.get_chat(chat).await.unwrap(), None);
    let kinds = event_kinds_of(&setup, chat).await;
    assert_eq!(kinds.last(), Some(&"queue.unmatched"), "{kinds:?}");
    setup.clean_up().await;
}

on_both_stacks!(an_end_stopped_between_its_two_closes_is_finished_by_its_retry);

/// Before circle names were kept from being addresses, an owner's name in their circle defaulted
/// to their display name, which is their e-mail address when the identity provider uses it as the
/// user name and sends no name. Such a row, stored as that code stored it, is shown to the other
/// members neither in the circle's member list nor in `circle.paired`; its owner still sees it.
async fn an_old_circle_name_that_is_an_address_is_not_shown_to_others(stack: Stack) {
    let setup = HeldApi::new(stack).await;
    let owner = setup.user("dora@corp.example").await;
    let member = setup.user("erin").await;
    let circle = setup.circle(&owner, &[&member]).await;
    let address = owner.display_name.clone();
    let mut stored = setup.store.circle_members(circle.id).await.unwrap();
    let mut old = stored.remove(stored.iter().position(|m| m.user_id == owner.id).unwrap());
    old.display_name = address.clone();
    setup
        .store
        .put_circle_member(circle.id, &old, circle.max_members)
        .await
        .unwrap();
    let neutral = format!("user-{}", &owner.id.0.simple().to_string()[..8]);

    let name_in = |members: &[CircleMember]| {
        members
            .iter()
            .find(|m| m.user_id == owner.id)
            .map(|m| m.display_name.clone())
            .unwrap()
    };
    let seen = setup
        .state
        .circle_members(member.id, circle.id)
        .await
        .unwrap();
    assert_eq!(name_in(&seen), neutral, "{seen:?}");
    let own = setup
        .state
        .circle_members(owner.id, circle.id)
        .await
        .unwrap();
    assert_eq!(name_in(&own), address, "{own:?}");

    setup
        .state
        .enter_circle_lobby(owner.id, circle.id)
        .await
        .unwrap();
    let paired = setup
        .state
        .enter_circle_lobby(member.id, circle.id)
        .await
        .unwrap();
    let chat = paired.chat_id.expect("paired");
    let announced: Vec<_> = setup
        .bus
        .events_of(chat)
        .await
        .into_iter()
        .filter_map(|logged| match logged.envelope.event {
            Event::CirclePaired(pairing) => Some(pairing.members),
            _ => None,
        })
        .collect();
    assert_eq!(announced.len(), 1, "{announced:?}");
    let names: HashMap<_, _> = announced[0]
        .iter()
        .map(|m| (m.user_id, m.display_name.as_str()))
        .collect();
    assert_eq!(
        names,
        HashMap::from([(owner.id, neutral.as_str()), (member.id, "erin")])
    );
    setup.clean_up().await;
}

on_both_stacks!(an_old_circle_name_that_is_an_address_is_not_shown_to_others);
