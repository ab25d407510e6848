//! The authorization matrix: every operation of the OpenAPI description confab serves (which is
//! generated from the router, so the two cannot drift) against every kind of caller: anonymous, a
//! bad token, an expired token, a signed-in user who is not in the chat, a member, an admin and the
//! owner. Each cell is a real request with real ids and a body valid for the caller who should
//! succeed, so the status it gets reflects authorization, not validation.
//!
//! Every call that a WebSocket request frame can make is made that way too, on a socket of the same
//! caller, and must get the same status.
//!
//! An operation without a row in [`cases`] fails the test by name: a new route cannot be added
//! without saying who may call it.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use confab_runtime::identity::DevIdentity;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{DEADLINE, Stack, TestApp};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// Who calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Anonymous,
    BadToken,
    Expired,
    NonMember,
    Member,
    Admin,
    Owner,
}

const CALLERS: [Who; 7] = [
    Who::Anonymous,
    Who::BadToken,
    Who::Expired,
    Who::NonMember,
    Who::Member,
    Who::Admin,
    Who::Owner,
];

impl Who {
    /// The dev-realm user playing this part (the three unauthenticated callers pretend to be the
    /// owner).
    fn username(self) -> &'static str {
        match self {
            Who::NonMember => "dave",
            Who::Member => "carol",
            Who::Admin => "bob",
            Who::Anonymous | Who::BadToken | Who::Expired | Who::Owner => "alice",
        }
    }

    fn signed_in(self) -> bool {
        matches!(self, Who::NonMember | Who::Member | Who::Admin | Who::Owner)
    }
}

/// What a path parameter names, when a case does not take the default.
#[derive(Clone, Copy, Debug)]
enum Pick {
    User(Who),
    /// The owner's message instead of the member's.
    OwnersMessage,
    /// This queue instead of the one every signed-in caller waits in.
    Queue(&'static str),
}

#[derive(Clone, Copy)]
enum Body {
    None,
    Json(fn(&Fixture, Who) -> Value),
    /// Raw bytes with this content type.
    Bytes(&'static str),
}

/// One row of the matrix.
struct Case {
    /// `METHOD /path/{param}` as in the OpenAPI description.
    op: &'static str,
    /// What this row is about, when an operation has several.
    note: &'static str,
    query: &'static str,
    picks: &'static [(&'static str, Pick)],
    body: Body,
    /// Anonymous, bad token, expired token, non-member, member, admin, owner.
    expect: [u16; 7],
    /// It ends the caller's sessions: run after every other row, over HTTP only (its caller's
    /// token is refused afterwards).
    ends_sessions: bool,
}

const fn case(op: &'static str, expect: [u16; 7]) -> Case {
    Case {
        op,
        note: "",
        query: "",
        picks: &[],
        body: Body::None,
        expect,
        ends_sessions: false,
    }
}

impl Case {
    const fn note(mut self, note: &'static str) -> Case {
        self.note = note;
        self
    }
    const fn query(mut self, query: &'static str) -> Case {
        self.query = query;
        self
    }
    const fn picks(mut self, picks: &'static [(&'static str, Pick)]) -> Case {
        self.picks = picks;
        self
    }
    const fn json(mut self, body: fn(&Fixture, Who) -> Value) -> Case {
        self.body = Body::Json(body);
        self
    }
    const fn ends_sessions(mut self) -> Case {
        self.ends_sessions = true;
        self
    }
    const fn bytes(mut self, content_type: &'static str) -> Case {
        self.body = Body::Bytes(content_type);
        self
    }
}

/// Signed in as anyone.
const ANYONE: [u16; 7] = [401, 401, 401, 200, 200, 200, 200];
/// Members read.
const MEMBERS: [u16; 7] = [401, 401, 401, 403, 200, 200, 200];
/// The queue every signed-in caller waits in; nobody waits in its counterpart (`listen`), so
/// nobody is matched.
const WAITING_QUEUE: &str = "vent";

/// Members of the circle read.
const CIRCLE_MEMBERS: [u16; 7] = MEMBERS;
/// Members of the call's chat: 404 to others, so a call id tells them nothing.
const CALL_MEMBERS: [u16; 7] = [401, 401, 401, 404, 200, 200, 200];

/// The expected status of every operation for every caller.
fn cases() -> Vec<Case> {
    vec![
        // The caller themself.
        case("GET /v1/me", ANYONE),
        case("GET /v1/users", ANYONE).query("q=a"),
        case("PUT /v1/me/status", ANYONE).json(|_, _| json!({"text": "busy"})),
        case(
            "GET /v1/users/{user_id}/presence",
            [401, 401, 401, 404, 200, 200, 200],
        )
        .note("the owner's: shown to who shares a chat with them")
        .picks(&[("user_id", Pick::User(Who::Owner))]),
        case(
            "GET /v1/users/{user_id}",
            [401, 401, 401, 404, 200, 200, 200],
        )
        .note("the owner's profile: shown to who shares a chat with them")
        .picks(&[("user_id", Pick::User(Who::Owner))]),
        case("GET /v1/me/settings", ANYONE),
        case(
            "POST /v1/me/logout-all",
            [401, 401, 401, 204, 204, 204, 204],
        )
        .note("the caller's own sessions")
        .ends_sessions(),
        case("POST /v1/auth/backchannel-logout", [400; 7])
            .note("no logout token: the identity provider's signed token is what authorizes it"),
        case("PUT /v1/me/settings", ANYONE).json(|_, _| json!({"push_previews": false})),
        case("POST /v1/devices", [401, 401, 401, 201, 201, 201, 201])
            .json(|_, _| json!({"platform": "fcm", "token": unique_token()})),
        case("GET /v1/devices", ANYONE),
        case(
            "DELETE /v1/devices/{device_id}",
            [401, 401, 401, 404, 404, 404, 204],
        )
        .note("the owner's device"),
        case("GET /v1/push/vapid-public-key", [404; 7]).note("public; no VAPID key configured"),
        // Chats.
        case("POST /v1/chats", [401, 401, 401, 201, 201, 201, 201]).json(|f, who| {
            let other = if who == Who::NonMember {
                Who::Owner
            } else {
                Who::NonMember
            };
            json!({"kind": "group", "name": "another", "members": [f.user(other)]})
        }),
        case("GET /v1/chats", ANYONE),
        case("GET /v1/chats/{chat_id}", MEMBERS),
        case(
            "PATCH /v1/chats/{chat_id}",
            [401, 401, 401, 403, 403, 200, 200],
        )
        .json(|_, _| json!({"name": "renamed"})),
        case("GET /v1/chats/{chat_id}/settings", MEMBERS),
        case("PUT /v1/chats/{chat_id}/settings", MEMBERS).json(|_, _| json!({"muted": true})),
        case(
            "POST /v1/chats/{chat_id}/typing",
            [401, 401, 401, 403, 204, 204, 204],
        )
        .json(|_, _| json!({})),
        // Members.
        case("GET /v1/chats/{chat_id}/members", MEMBERS),
        case(
            "POST /v1/chats/{chat_id}/members",
            [401, 401, 401, 403, 403, 201, 201],
        )
        .note("the outsider as a member")
        .json(|f, _| json!({"user_id": f.user(Who::NonMember)})),
        case(
            "POST /v1/chats/{chat_id}/members",
            [401, 401, 401, 403, 403, 403, 201],
        )
        .note("the outsider as an owner")
        .json(|f, _| json!({"user_id": f.user(Who::NonMember), "role": "owner"})),
        case(
            "DELETE /v1/chats/{chat_id}/members/{user_id}",
            [401, 401, 401, 403, 204, 204, 204],
        )
        .note("the member (who may leave)")
        .picks(&[("user_id", Pick::User(Who::Member))]),
        case(
            "DELETE /v1/chats/{chat_id}/members/{user_id}",
            [401, 401, 401, 403, 403, 204, 204],
        )
        .note("the admin")
        .picks(&[("user_id", Pick::User(Who::Admin))]),
        case(
            "DELETE /v1/chats/{chat_id}/members/{user_id}",
            [401, 401, 401, 403, 403, 403, 422],
        )
        .note("the last owner (who hands over first)")
        .picks(&[("user_id", Pick::User(Who::Owner))]),
        case(
            "PATCH /v1/chats/{chat_id}/members/{user_id}",
            [401, 401, 401, 403, 403, 200, 200],
        )
        .note("the member made admin")
        .picks(&[("user_id", Pick::User(Who::Member))])
        .json(|_, _| json!({"role": "admin"})),
        case(
            "PATCH /v1/chats/{chat_id}/members/{user_id}",
            [401, 401, 401, 403, 403, 403, 200],
        )
        .note("the admin made owner")
        .picks(&[("user_id", Pick::User(Who::Admin))])
        .json(|_, _| json!({"role": "owner"})),
        // Signals.
        case(
            "POST /v1/chats/{chat_id}/signals",
            [401, 401, 401, 403, 201, 201, 201],
        )
        .json(|_, _| json!({"kind": "message", "text": "hello"})),
        case("GET /v1/chats/{chat_id}/signals", MEMBERS),
        case(
            "PATCH /v1/chats/{chat_id}/signals/{signal_id}",
            [401, 401, 401, 403, 200, 403, 403],
        )
        .note("the member's message: its author only")
        .json(|_, _| json!({"text": "edited"})),
        case("DELETE /v1/chats/{chat_id}/signals/{signal_id}", MEMBERS)
            .note("the member's message: its author, an admin or an owner"),
        case(
            "DELETE /v1/chats/{chat_id}/signals/{signal_id}",
            [401, 401, 401, 403, 403, 200, 200],
        )
        .note("the owner's message")
        .picks(&[("signal_id", Pick::OwnersMessage)]),
        case("GET /v1/search", ANYONE).query("q=hello"),
        case("GET /v1/search", MEMBERS)
            .note("in one chat")
            .query("q=hello&chat_id={chat_id}"),
        // Reactions and markers.
        case(
            "PUT /v1/chats/{chat_id}/signals/{signal_id}/reactions/{emoji}",
            [401, 401, 401, 403, 201, 201, 201],
        ),
        case(
            "DELETE /v1/chats/{chat_id}/signals/{signal_id}/reactions/{emoji}",
            MEMBERS,
        ),
        case(
            "GET /v1/chats/{chat_id}/signals/{signal_id}/reactions",
            MEMBERS,
        ),
        case("POST /v1/chats/{chat_id}/read", MEMBERS).json(|f, _| json!({"up_to": f.message})),
        case("POST /v1/chats/{chat_id}/delivered", MEMBERS)
            .json(|f, _| json!({"up_to": f.message})),
        case("GET /v1/chats/{chat_id}/signals/{signal_id}/views", MEMBERS),
        case(
            "GET /v1/chats/{chat_id}/signals/{signal_id}/deliveries",
            MEMBERS,
        ),
        // Attachments.
        case(
            "POST /v1/chats/{chat_id}/attachments",
            [401, 401, 401, 403, 201, 201, 201],
        )
        .query("name=notes.txt")
        .bytes("text/plain"),
        case("GET /v1/chats/{chat_id}/attachments", MEMBERS),
        case(
            "GET /v1/attachments/{attachment_id}",
            [401, 401, 401, 404, 200, 200, 200],
        )
        .note("404 to outsiders: an id reveals nothing"),
        case(
            "GET /v1/attachments/{attachment_id}/thumbnail",
            [401, 401, 401, 404, 200, 200, 200],
        ),
        case(
            "GET /v1/attachments/{attachment_id}/preview",
            [401, 401, 401, 404, 200, 200, 200],
        ),
        // Circles: the owner made it; the admin and the member of the chat joined it with its
        // code (a circle has no admins: the admin is one more member there).
        case("POST /v1/circles", [401, 401, 401, 201, 201, 201, 201])
            .json(|_, _| json!({"name": "another circle"})),
        case("GET /v1/circles/{circle_id}", CIRCLE_MEMBERS),
        case("POST /v1/circles/join", [401, 401, 401, 201, 200, 200, 200])
            .note("with the circle's code: the outsider joins, members are renamed")
            .json(|f, _| json!({"access_code": f.circle_code, "display_name": "a new name"})),
        case(
            "POST /v1/circles/{circle_id}/access-code",
            [401, 401, 401, 403, 403, 403, 200],
        ),
        case("GET /v1/circles/{circle_id}/members", CIRCLE_MEMBERS),
        case(
            "DELETE /v1/circles/{circle_id}/members/{user_id}",
            [401, 401, 401, 403, 204, 403, 204],
        )
        .note("the member: who may leave, or be removed by the owner"),
        case(
            "DELETE /v1/circles/{circle_id}/members/{user_id}",
            [401, 401, 401, 403, 403, 403, 422],
        )
        .note("the owner, who stays until the circle expires")
        .picks(&[("user_id", Pick::User(Who::Owner))]),
        case(
            "POST /v1/circles/{circle_id}/pair",
            [401, 401, 401, 403, 202, 202, 202],
        )
        .note("an empty lobby: the caller waits"),
        case(
            "DELETE /v1/circles/{circle_id}/pair",
            [401, 401, 401, 403, 204, 204, 204],
        ),
        // Queues: each caller acts on their own place only. Every signed-in caller waits in the
        // `vent` queue, where nobody listens.
        case(
            "POST /v1/queues/{kind}/join",
            [401, 401, 401, 202, 202, 202, 202],
        ),
        case("GET /v1/queues/{kind}", ANYONE).note("the queue the caller waits in"),
        case("GET /v1/queues/{kind}", [401, 401, 401, 404, 404, 404, 404])
            .note("a queue the caller is not in")
            .picks(&[("kind", Pick::Queue("talk"))]),
        case(
            "DELETE /v1/queues/{kind}",
            [401, 401, 401, 204, 204, 204, 204],
        )
        .note("the last queue row: the callers leave the queue they wait in"),
        // Calls: the owner started one in the chat, and the member answered it.
        case(
            "POST /v1/chats/{chat_id}/calls",
            [401, 401, 401, 403, 200, 200, 200],
        )
        .note("the chat has a live call: the caller joins it"),
        case("GET /v1/calls/turn-credentials", ANYONE),
        case("GET /v1/calls/{call_id}", CALL_MEMBERS),
        case("POST /v1/calls/{call_id}/join", CALL_MEMBERS),
        case(
            "POST /v1/calls/{call_id}/leave",
            [401, 401, 401, 404, 200, 409, 200],
        )
        .note("participants leave; the admin is not in the call"),
        case(
            "POST /v1/calls/{call_id}/end",
            [401, 401, 401, 404, 403, 200, 200],
        )
        .note("a group call: its starter or an admin"),
        case(
            "POST /v1/calls/{call_id}/signal",
            [401, 401, 401, 404, 204, 403, 204],
        )
        .note("to every other participant: participants only")
        .json(|_, _| json!({"to": "all", "type": "offer", "payload": {"sdp": "v=0"}})),
        // Events.
        case("GET /v1/events", ANYONE),
        case("POST /v1/events/ticket", ANYONE),
        case("GET /v1/ws", [401, 401, 401, 101, 101, 101, 101]),
    ]
}

/// A group chat with an owner (alice), an admin (bob) and a member (carol); dave is in no chat.
struct Fixture {
    chat: String,
    /// The member's message.
    message: String,
    owners_message: String,
    device: String,
    /// An image of the member's, with its thumbnail and preview made (reading fixtures only).
    attachment: Option<String>,
    /// A circle of the owner's that the admin and the member joined.
    circle: String,
    circle_code: String,
    /// A call in the chat that the owner started and the member answered.
    call: String,
    users: [(Who, String); 4],
}

impl Fixture {
    fn user(&self, who: Who) -> &str {
        &self
            .users
            .iter()
            .find(|(w, _)| *w == who)
            .expect("a signed-in caller")
            .1
    }
}

/// Tokens for every caller.
struct Tokens {
    signed_in: Vec<(Who, String)>,
    /// The signed-in callers' user ids.
    ids: Vec<(Who, String)>,
    bad: String,
    expired: Option<String>,
}

impl Tokens {
    async fn new(app: &TestApp) -> Tokens {
        let mut signed_in = Vec::new();
        let mut ids = Vec::new();
        for who in CALLERS.into_iter().filter(|w| w.signed_in()) {
            let token = app.token(who.username()).await;
            ids.push((who, app.me(&token).await));
            signed_in.push((who, token));
        }
        let owner = signed_in[3].1.clone();
        // The owner's token with its signature altered.
        let (signed, signature) = owner.rsplit_once('.').unwrap();
        let flipped = if signature.starts_with('A') { 'B' } else { 'A' };
        let bad = format!("{signed}.{flipped}{}", &signature[1..]);
        // Only the dev identity can mint a token that has expired already; Keycloak's lifetimes
        // are set by the realm.
        let expired = (app.stack == Stack::Embedded).then(|| {
            DevIdentity::open(&app.config.data_dir).unwrap().mint_until(
                "alice",
                time::OffsetDateTime::now_utc().unix_timestamp() - 60,
            )
        });
        Tokens {
            signed_in,
            ids,
            bad,
            expired,
        }
    }

    /// The `Authorization` header's token for `who`; `None` for anonymous. `Err` when this stack
    /// cannot make one.
    fn of(&self, who: Who) -> Result<Option<&str>, ()> {
        match who {
            Who::Anonymous => Ok(None),
            Who::BadToken => Ok(Some(&self.bad)),
            Who::Expired => self.expired.as_deref().map(Some).ok_or(()),
            _ => Ok(Some(
                &self.signed_in.iter().find(|(w, _)| *w == who).unwrap().1,
            )),
        }
    }
}

async fn expect_status(response: reqwest::Response, status: u16, what: &str) -> Value {
    let got = response.status().as_u16();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{what}: {body}");
    body
}

/// A fresh fixture; `for_reading` adds an image attachment (its thumbnail and preview made), and
/// `device` a device of the owner's.
async fn make_fixture(app: &TestApp, tokens: &Tokens, for_reading: bool, device: bool) -> Fixture {
    let token = |who: Who| tokens.of(who).unwrap().unwrap().to_owned();
    let (owner, member) = (token(Who::Owner), token(Who::Member));
    let users: [(Who, String); 4] = tokens.ids.clone().try_into().unwrap();
    let id = |who: Who| users.iter().find(|(w, _)| *w == who).unwrap().1.clone();
    let chat = app
        .group_chat(&owner, &[&id(Who::Admin), &id(Who::Member)])
        .await;
    expect_status(
        app.http
            .patch(app.url(&format!("/v1/chats/{chat}/members/{}", id(Who::Admin))))
            .bearer_auth(&owner)
            .json(&json!({"role": "admin"}))
            .send()
            .await
            .unwrap(),
        200,
        "making the admin",
    )
    .await;
    let owners_message = send(app, &owner, &chat, "hello from the owner").await;
    let message = send(app, &member, &chat, "hello from the member").await;
    let device = if device {
        expect_status(
            app.post(
                &owner,
                "/v1/devices",
                &json!({"platform": "fcm", "token": unique_token()}),
            )
            .await,
            201,
            "registering the owner's device",
        )
        .await["id"]
            .as_str()
            .unwrap()
            .to_owned()
    } else {
        String::new()
    };
    let attachment = if for_reading {
        Some(image_attachment(app, &member, &chat).await)
    } else {
        None
    };
    let circle = expect_status(
        app.post(&owner, "/v1/circles", &json!({"name": "the circle"}))
            .await,
        201,
        "making the circle",
    )
    .await;
    let circle_code = circle["access_code"].as_str().unwrap().to_owned();
    for who in [Who::Admin, Who::Member] {
        expect_status(
            app.post(
                &token(who),
                "/v1/circles/join",
                &json!({"access_code": circle_code, "display_name": who.username()}),
            )
            .await,
            201,
            "joining the circle",
        )
        .await;
    }
    let call = expect_status(
        app.post(&owner, &format!("/v1/chats/{chat}/calls"), &json!({}))
            .await,
        201,
        "starting the call",
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    expect_status(
        app.post(&member, &format!("/v1/calls/{call}/join"), &json!({}))
            .await,
        200,
        "answering the call",
    )
    .await;
    Fixture {
        chat,
        message,
        owners_message,
        device,
        attachment,
        circle: circle["id"].as_str().unwrap().to_owned(),
        circle_code,
        call,
        users,
    }
}

async fn send(app: &TestApp, token: &str, chat: &str, text: &str) -> String {
    let body = expect_status(
        app.post(
            token,
            &format!("/v1/chats/{chat}/signals"),
            &json!({"kind": "message", "text": text}),
        )
        .await,
        201,
        "sending",
    )
    .await;
    body["id"].as_str().unwrap().to_owned()
}

fn unique_token() -> String {
    format!("fcm-{}", uuid::Uuid::new_v4().simple())
}

/// Uploads a small PNG and waits until its thumbnail and preview are made.
async fn image_attachment(app: &TestApp, token: &str, chat: &str) -> String {
    let picture = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(8, 8, |x, y| {
        image::Rgb([(x * 30) as u8, (y * 30) as u8, 90])
    }));
    let mut png = Vec::new();
    picture
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let response = app
        .http
        .post(app.url(&format!("/v1/chats/{chat}/attachments")))
        .query(&[("name", "dot.png")])
        .bearer_auth(token)
        .header("content-type", "image/png")
        .body(png)
        .send()
        .await
        .unwrap();
    let id = expect_status(response, 201, "uploading an image").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    for variant in ["thumbnail", "preview"] {
        loop {
            let status = app
                .get(token, &format!("/v1/attachments/{id}/{variant}"))
                .await
                .status();
            if status == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the image's {variant} is never made ({status})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    id
}

/// `template` with its `{params}` replaced by the fixture's ids.
fn fill(template: &str, case: &Case, fixture: &Fixture) -> String {
    let mut filled = template.to_owned();
    let pick = |name: &str| case.picks.iter().find(|(n, _)| *n == name).map(|(_, p)| *p);
    let chosen = |name: &str, default: String| match pick(name) {
        Some(Pick::User(who)) => fixture.user(who).to_owned(),
        Some(Pick::OwnersMessage) => fixture.owners_message.clone(),
        Some(Pick::Queue(kind)) => kind.to_owned(),
        None => default,
    };
    let params = [
        ("chat_id", fixture.chat.clone()),
        ("signal_id", fixture.message.clone()),
        ("user_id", fixture.user(Who::Member).to_owned()),
        ("device_id", fixture.device.clone()),
        (
            "attachment_id",
            fixture.attachment.clone().unwrap_or_default(),
        ),
        ("emoji", "%F0%9F%91%8D".to_owned()),
        ("circle_id", fixture.circle.clone()),
        ("call_id", fixture.call.clone()),
        ("kind", WAITING_QUEUE.to_owned()),
    ];
    for (name, default) in params {
        let placeholder = format!("{{{name}}}");
        if filled.contains(&placeholder) {
            filled = filled.replace(&placeholder, &chosen(name, default));
        }
    }
    assert!(
        !filled.contains('{'),
        "{template}: a path parameter the matrix cannot fill; teach `fill` its name"
    );
    filled
}

/// The status `who` gets for `case`.
async fn call(app: &TestApp, case: &Case, fixture: &Fixture, who: Who, token: Option<&str>) -> u16 {
    let (method, template) = case.op.split_once(' ').unwrap();
    let mut path = fill(template, case, fixture);
    if !case.query.is_empty() {
        path = format!("{path}?{}", fill(case.query, case, fixture));
    }
    if case.op == "GET /v1/ws" {
        let url = format!("{}{path}", app.base.replacen("http://", "ws://", 1));
        let mut request = url.into_client_request().unwrap();
        if let Some(token) = token {
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        return match tokio_tungstenite::connect_async(request).await {
            Ok((socket, response)) => {
                drop(socket);
                response.status().as_u16()
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                response.status().as_u16()
            }
            Err(other) => panic!("GET /v1/ws: {other}"),
        };
    }
    let mut request = app
        .http
        .request(method.parse().unwrap(), app.url(&path))
        .timeout(DEADLINE);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request = match case.body {
        Body::None => request,
        Body::Json(body) => request.json(&body(fixture, who)),
        Body::Bytes(content_type) => request
            .header("content-type", content_type)
            .body("some notes"),
    };
    // Only the status matters; an event stream is dropped unread.
    request.send().await.unwrap().status().as_u16()
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket of `token`'s user, past its `ready` frame.
async fn open_socket(app: &TestApp, token: &str) -> Socket {
    let url = format!("{}/v1/ws", app.base.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let ready = next_frame(&mut socket).await;
    assert_eq!(ready["type"], "ready", "{ready}");
    socket
}

async fn next_frame(socket: &mut Socket) -> Value {
    tokio::time::timeout(DEADLINE, async {
        loop {
            match socket.next().await.expect("socket open").expect("frame") {
                Message::Text(text) => return serde_json::from_str::<Value>(&text).unwrap(),
                _ => continue,
            }
        }
    })
    .await
    .expect("a frame arrives before the deadline")
}

/// Whether a case can be made as a WebSocket request frame: JSON calls, not the streams.
fn as_frame(case: &Case) -> bool {
    !matches!(case.body, Body::Bytes(_))
        && !case.ends_sessions
        && !case.op.starts_with("GET /v1/ws")
        && !case.op.contains(" /v1/events")
}

/// The status `who` gets for `case` sent as a request frame on their socket.
async fn call_by_frame(
    socket: &mut Socket,
    id: u64,
    case: &Case,
    fixture: &Fixture,
    who: Who,
) -> u16 {
    let (method, template) = case.op.split_once(' ').unwrap();
    let mut path = fill(template, case, fixture);
    if !case.query.is_empty() {
        path = format!("{path}?{}", fill(case.query, case, fixture));
    }
    let mut frame = json!({"type": "request", "id": id, "method": method, "path": path});
    if let Body::Json(body) = case.body {
        frame["body"] = body(fixture, who);
    }
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    loop {
        let frame = next_frame(socket).await;
        if frame["type"] == "response" && frame["id"] == id {
            return u16::try_from(frame["status"].as_u64().unwrap()).unwrap();
        }
        assert_ne!(frame["type"], "error", "{frame}");
    }
}

/// The operations of the OpenAPI description confab serves.
async fn documented_operations(app: &TestApp) -> BTreeSet<String> {
    let doc: Value = app
        .http
        .get(app.url("/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut operations = BTreeSet::new();
    for (path, methods) in doc["paths"].as_object().unwrap() {
        for method in methods.as_object().unwrap().keys() {
            operations.insert(format!("{} {path}", method.to_uppercase()));
        }
    }
    operations
}

async fn authorization_matrix(stack: Stack) {
    let data = tempfile::tempdir().unwrap();
    let mut config = support::config_for(stack, data.path().to_path_buf());
    // TURN servers, so that their credentials are there to be refused or given.
    config.calls.turn_secret = Some("matrix-turn-secret".into());
    config.calls.turn_uris = "turn:turn.example.org:3478".into();
    // Waiting callers keep their place in the queue while the matrix runs, though they keep no
    // stream open.
    config.queues.disconnect_grace_ms = 24 * 3_600_000;
    // Each row's fixture has two users join a circle, makes a chat and starts a call in it, the
    // queue rows join and leave, and every frame row opens a socket of its own: far more than
    // their rate limits (`abuse_limits` tests those) let the same users do in a few seconds.
    config.limits.circle_join = confab_runtime::config::RateLimit::OFF;
    config.limits.queue = confab_runtime::config::RateLimit::OFF;
    config.limits.chats = confab_runtime::config::RateLimit::OFF;
    config.limits.calls = confab_runtime::config::RateLimit::OFF;
    config.limits.stream_opens = confab_runtime::config::RateLimit::OFF;
    let app = support::spawn_with(stack, config, data).await;
    let mut cases = cases();
    // The rows that end sessions go last, so every other row runs with live tokens.
    cases.sort_by_key(|case| case.ends_sessions);

    // Every documented operation has a row, and every row a documented operation.
    let documented = documented_operations(&app).await;
    let covered: BTreeSet<String> = cases.iter().map(|c| c.op.to_owned()).collect();
    let missing: Vec<_> = documented.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "operations without a row in the authorization matrix (tests/authz_matrix.rs, `cases`): \
         {missing:?}; add one saying which callers may call each"
    );
    let stale: Vec<_> = covered.difference(&documented).collect();
    assert!(
        stale.is_empty(),
        "rows of the authorization matrix for operations confab does not serve: {stale:?}"
    );

    let tokens = Tokens::new(&app).await;
    if tokens.expired.is_none() {
        eprintln!("{stack:?}: no expired token on this stack; that column is not checked");
    }
    // Reads share one fixture; every change by a signed-in caller gets a fresh one, so one cell's
    // change cannot decide another's status. The unauthenticated callers share the reading
    // fixture: they must change nothing.
    let shared = make_fixture(&app, &tokens, true, true).await;
    for who in CALLERS.into_iter().filter(|w| w.signed_in()) {
        expect_status(
            app.post(
                tokens.of(who).unwrap().unwrap(),
                &format!("/v1/queues/{WAITING_QUEUE}/join"),
                &json!({}),
            )
            .await,
            202,
            "waiting in the queue",
        )
        .await;
    }
    let mut failures = Vec::new();
    let mut cells = 0;
    for case in &cases {
        let changes = !case.op.starts_with("GET ");
        for (column, who) in CALLERS.into_iter().enumerate() {
            let Ok(token) = tokens.of(who) else {
                continue;
            };
            let fresh;
            // A row that ends sessions needs no fixture, and could not make one afterwards.
            let fixture = if changes && who.signed_in() && !case.ends_sessions {
                fresh = make_fixture(&app, &tokens, false, case.op.contains("{device_id}")).await;
                &fresh
            } else {
                &shared
            };
            let expected = case.expect[column];
            let mut check = |how: &str, got: u16, expected: u16| {
                cells += 1;
                if got != expected {
                    let note = if case.note.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", case.note)
                    };
                    let query = if case.query.is_empty() {
                        String::new()
                    } else {
                        format!("?{}", case.query)
                    };
                    failures.push(format!(
                        "{}{query}{note} {how}: {who:?} got {got}, expected {expected}",
                        case.op
                    ));
                }
            };
            check(
                "over HTTP",
                call(&app, case, fixture, who, token).await,
                expected,
            );
            if who.signed_in() && as_frame(case) {
                let fresh;
                let fixture = if changes {
                    fresh =
                        make_fixture(&app, &tokens, false, case.op.contains("{device_id}")).await;
                    &fresh
                } else {
                    &shared
                };
                // A socket per call: one left unread between calls would fill with events.
                let mut socket = open_socket(&app, token.unwrap()).await;
                let got = call_by_frame(&mut socket, 1, case, fixture, who).await;
                let _ = socket.close(None).await;
                // An attachment's bytes are not JSON: a socket refuses to carry them (406,
                // `not-json`) once the caller may read them, and the client asks over HTTP.
                let bytes = case.op.starts_with("GET /v1/attachments/{attachment_id}");
                let by_frame = if bytes && expected == 200 {
                    406
                } else {
                    expected
                };
                check("as a WebSocket frame", got, by_frame);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cells} cells of the authorization matrix differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
    app.stop().await;
}

#[tokio::test]
async fn authorization_matrix_on_the_embedded_default() {
    Box::pin(authorization_matrix(Stack::Embedded)).await;
}

#[tokio::test]
async fn authorization_matrix_on_the_real_stack() {
    if !support::real_stack_available("authorization_matrix_on_the_real_stack").await {
        return;
    }
    Box::pin(authorization_matrix(Stack::Real)).await;
}
