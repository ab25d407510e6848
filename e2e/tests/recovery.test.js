// The web client when things go wrong around it: answers that arrive late, a session the server
// no longer takes, a start-up the server fails, and a stream that cannot resume.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { serve, launch, page as pageOf } from "../support.js";

const DEADLINE = 15_000;

let server;
let base;
let browser;

before(async () => {
  server = await serve({});
  base = server.base;
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

async function signedIn(name) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const page = await pageOf(context, name, DEADLINE);
  await page.goto(base + "/");
  await page.getByLabel("User name").fill(name);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#connection.live").waitFor();
  return { context, page };
}

// `from` starts a direct chat with `to` (signed in before) and sends `texts` there.
async function chat(from, to, texts) {
  await from.page.getByLabel("New chat with").fill(to);
  await from.page.getByRole("button", { name: "Start" }).click();
  await from.page.locator("#chat-title", { hasText: to }).waitFor();
  for (const text of texts) await send(from, text);
}

// A message sent in the chat open on `from`'s page.
async function send(from, text) {
  await from.page.getByPlaceholder("Message").fill(text);
  await from.page.keyboard.press("Enter");
  await messages(from.page).filter({ hasText: text }).waitFor();
}

const messages = (page) => page.locator("#messages .message:not(.system) .text");

// Polls `check` (in the test) until it holds, within the deadline.
async function eventually(check, what) {
  const deadline = Date.now() + DEADLINE;
  for (;;) {
    const found = check();
    if (found) return found;
    if (Date.now() > deadline) throw new Error(`not within the deadline: ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

const unavailable = (route) => route.fulfill({
  status: 503,
  contentType: "application/problem+json",
  body: JSON.stringify({ type: "about:blank", title: "Service Unavailable", status: 503, detail: "try again later" }),
});

test("a history page read before a deletion and an edit does not bring the old copies back", async () => {
  const bob = await signedIn("bob");
  const alice = await signedIn("alice");
  await chat(alice, "bob", ["kept as it was", "to be edited", "to be deleted"]);
  await bob.page.locator("#chats button", { hasText: "to be deleted" }).waitFor();

  // Bob's first page of history is read now, and reaches his page only once alice has changed it.
  let pageRead;
  const read = new Promise((resolve) => { pageRead = resolve; });
  let release;
  const released = new Promise((resolve) => { release = resolve; });
  await bob.page.route((url) => url.pathname.endsWith("/signals") && url.searchParams.get("limit") === "50", async (route) => {
    const response = await route.fetch();
    pageRead();
    await released;
    await route.fulfill({ response });
  });
  await bob.page.locator("#chats button", { hasText: "to be deleted" }).click();
  await read;

  const mine = (text) => alice.page.locator(".message.mine", { hasText: text });
  await mine("to be edited").getByRole("button", { name: "Edit" }).click();
  await alice.page.getByLabel("Edited text").fill("edited after the page was read");
  await alice.page.keyboard.press("Enter");
  await messages(alice.page).filter({ hasText: "edited after the page was read" }).waitFor();
  await mine("to be deleted").getByRole("button", { name: "Delete" }).click();
  await messages(alice.page).filter({ hasText: "This message was deleted." }).waitFor();
  // Bob's events told him both.
  await bob.page.locator("#chats button .latest", { hasText: "(deleted)" }).waitFor();
  await messages(bob.page).filter({ hasText: "edited after the page was read" }).waitFor();

  release();
  // The page is in once its untouched message shows.
  await messages(bob.page).filter({ hasText: "kept as it was" }).waitFor();
  assert.equal(await messages(bob.page).filter({ hasText: "to be deleted" }).count(), 0, "the deleted message came back");
  assert.equal(await messages(bob.page).filter({ hasText: "to be edited" }).count(), 0, "the edit was undone");
  assert.equal(await messages(bob.page).filter({ hasText: "edited after the page was read" }).count(), 1);
  assert.equal(await messages(bob.page).filter({ hasText: "This message was deleted." }).count(), 1);
  await alice.context.close();
  await bob.context.close();
});

test("a session the server no longer takes brings back the sign-in form, not an endless offline", async () => {
  const carol = await signedIn("carol");
  await carol.page.route("**/v1/events/ticket", (route) => route.fulfill({
    status: 401,
    contentType: "application/problem+json",
    body: JSON.stringify({ type: "about:blank", title: "Unauthorized", status: 401, detail: "the token has expired" }),
  }));
  // The stream drops; the ticket for the next one is refused.
  await carol.context.setOffline(true);
  await carol.page.locator("#connection:not(.live)").waitFor();
  await carol.context.setOffline(false);
  await carol.page.locator("#sign-in-form").waitFor();
  await carol.page.locator("#sign-in-error", { hasText: "session has ended" }).waitFor();
  assert.equal(await carol.page.evaluate(() => sessionStorage.getItem("confab.token")), null);

  // Signing in again brings the app back, live.
  await carol.page.unrouteAll();
  await carol.page.getByLabel("User name").fill("carol");
  await carol.page.getByRole("button", { name: "Sign in" }).click();
  await carol.page.locator("#connection.live").waitFor();
  await carol.context.close();
});

test("a start-up the server fails says so, and trying again brings the app up", async () => {
  const dave = await signedIn("dave");
  await dave.page.route("**/v1/me", unavailable, { times: 1 });
  await dave.page.reload();
  await dave.page.locator("#start-error", { hasText: "try again later" }).waitFor();
  await dave.page.getByRole("button", { name: "Try again" }).click();
  await dave.page.locator("#connection.live").waitFor();
  await dave.context.close();
});

test("a chat list that fails at start-up does not keep the page offline, and comes once it can", async () => {
  const erin = await signedIn("erin");
  const frank = await signedIn("frank");
  await chat(frank, "erin", ["hello erin"]);
  await erin.page.locator("#chats button", { hasText: "hello erin" }).waitFor();
  await erin.page.route((url) => url.pathname === "/v1/chats" && url.searchParams.get("limit") === "100", unavailable, { times: 1 });
  await erin.page.reload();
  await erin.page.locator("#connection.live").waitFor();
  await erin.page.locator("#chats button", { hasText: "hello erin" }).waitFor();
  await erin.context.close();
  await frank.context.close();
});

test("over the WebSocket, a reset's id is where the next resume starts", async () => {
  const gina = await signedIn("gina");
  const hank = await signedIn("hank");
  // Hank's sockets go through the test, which sees each frame and can add its own.
  const opened = []; // each socket's URL
  const created = []; // the ids of the signal.created events that came to hank
  let chatsAsked = 0; // hank's reads of his chat list over the socket
  let page;
  let upstream;
  await hank.page.routeWebSocket(/\/v1\/ws/, (socket) => {
    opened.push(new URL(socket.url()));
    page = socket;
    upstream = socket.connectToServer();
    upstream.onMessage((message) => {
      const frame = JSON.parse(message);
      if (frame.type === "event" && frame.event === "signal.created") created.push(frame.id);
      socket.send(message);
    });
    socket.onMessage((message) => {
      const frame = JSON.parse(message);
      if (frame.type === "request" && frame.path.startsWith("/v1/chats?")) chatsAsked++;
      upstream.send(message);
    });
  });
  await hank.page.getByLabel("Use one WebSocket for events and calls").check();
  await hank.page.locator("#connection.live", { hasText: "WebSocket" }).waitFor();

  await chat(gina, "hank", ["first"]);
  const first = await eventually(() => created[0], "the event of the first message");
  await send(gina, "second");
  await eventually(() => created.length >= 2, "the event of the second message");
  await hank.page.locator("#chats button", { hasText: "second" }).waitFor();

  // The server could not resume, and stands at the first message: hank reads his chats again.
  const asked = chatsAsked;
  page.send(JSON.stringify({ type: "reset", reason: "too-far-behind", id: first }));
  await eventually(() => chatsAsked > asked, "the chat list read again after the reset");
  // The socket drops: the next one resumes where the reset stood.
  upstream.close();
  await eventually(() => opened.length === 2, "a second socket");
  assert.equal(opened[1].searchParams.get("last_event_id"), first);
  await hank.page.locator("#connection.live", { hasText: "WebSocket" }).waitFor();
  await gina.context.close();
  await hank.context.close();
});
