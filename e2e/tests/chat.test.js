// Two people chat in the web client on `confab serve`, each in a browser context of their own,
// in Debian's Chromium driven by Playwright.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { serve, launch, page as pageOf } from "../support.js";

const screenshots = process.env.CONFAB_SCREENSHOTS; // a folder to keep screenshots in, if set
const DEADLINE = 15_000;

let server;
let base;
let browser;

before(async () => {
  server = await serve({});
  base = server.base;
  browser = await launch();
  if (screenshots) mkdirSync(screenshots, { recursive: true });
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

const messages = (page) => page.locator("#messages .message:not(.system) .text");

test("alice and bob chat live: messages, seen by, a reaction, an edit, typing and presence", async () => {
  const alice = await signedIn("alice");
  const bob = await signedIn("bob");

  await alice.page.getByLabel("New chat with").fill("bob");
  await alice.page.getByRole("button", { name: "Start" }).click();
  await alice.page.locator("#chat-title", { hasText: "bob" }).waitFor();
  await alice.page.getByPlaceholder("Message").fill("Hello bob!");
  await alice.page.keyboard.press("Enter");
  await messages(alice.page).filter({ hasText: "Hello bob!" }).waitFor();

  // Bob sees the chat appear, with an unread message, without reloading.
  const chatButton = bob.page.locator("#chats button", { hasText: "Hello bob!" });
  await chatButton.waitFor();
  await chatButton.locator(".unread", { hasText: "1" }).waitFor();
  await chatButton.click();
  await messages(bob.page).filter({ hasText: "Hello bob!" }).waitFor();

  // He has read it: alice sees so.
  await alice.page.locator("#seen-by", { hasText: "Seen by bob" }).waitFor();

  // A reaction and an edit show up live on the other side.
  await bob.page.locator(".message", { hasText: "Hello bob!" }).getByRole("button", { name: "👍" }).click();
  await alice.page.locator(".message", { hasText: "Hello bob!" }).locator(".reaction", { hasText: "👍 1" }).waitFor();
  const mine = alice.page.locator(".message.mine", { hasText: "Hello bob!" });
  await mine.getByRole("button", { name: "Edit" }).click();
  await alice.page.getByLabel("Edited text").fill("Hello bob, edited!");
  await alice.page.keyboard.press("Enter");
  await messages(bob.page).filter({ hasText: "Hello bob, edited!" }).waitFor();
  await bob.page.locator(".message", { hasText: "Hello bob, edited!" }).locator(".edited").waitFor();

  // Alice sees bob online, and typing.
  await alice.page.locator("#presence.online").waitFor();
  await bob.page.getByPlaceholder("Message").fill("I am typing a rep");
  await alice.page.locator("#typing", { hasText: "is typing" }).waitFor();

  if (screenshots) {
    await alice.page.screenshot({ path: join(screenshots, "chat-alice.png") });
    await bob.page.screenshot({ path: join(screenshots, "chat-bob.png") });
  }
  // Bob leaves: alice sees when he was last there.
  await bob.context.close();
  await alice.page.locator("#presence", { hasText: "last seen" }).waitFor();
  await alice.context.close();
});

test("a group of three, started with suggested names, reaches everyone in it", async () => {
  const carol = await signedIn("carol");
  const alice = await signedIn("alice");
  await alice.page.getByLabel("New chat with").fill("bo");
  await alice.page.locator('#user-suggestions option[value="bob"]').waitFor({ state: "attached" });
  await alice.page.getByLabel("New chat with").fill("bob, carol");
  await alice.page.getByLabel("Group name").fill("Trio");
  await alice.page.getByRole("button", { name: "Start" }).click();
  await alice.page.locator("#chat-title", { hasText: "Trio" }).waitFor();
  await alice.page.getByPlaceholder("Message").fill("hello, both of you");
  await alice.page.keyboard.press("Enter");
  await carol.page.locator("#chats button", { hasText: "Trio" }).click();
  await messages(carol.page).filter({ hasText: "hello, both of you" }).waitFor();
  // The direct chat of the first test stays first for the tests after this one.
  await alice.page.locator("#chats button", { hasText: "Bob" }).click();
  await alice.page.getByPlaceholder("Message").fill("back to us two");
  await alice.page.keyboard.press("Enter");
  await messages(alice.page).filter({ hasText: "back to us two" }).waitFor();
  await alice.context.close();
  await carol.context.close();
});

test("bob offline: alice's three messages all arrive once he is back, once each", async () => {
  const alice = await signedIn("alice");
  const bob = await signedIn("bob");
  // The chat of the first test, opened on both sides.
  for (const side of [alice, bob]) {
    await side.page.locator("#chats button").first().click();
    await side.page.locator("#compose").waitFor();
  }
  await bob.context.setOffline(true);
  await bob.page.locator("#connection:not(.live)").waitFor();
  const sent = ["one while away", "two while away", "three while away"];
  for (const text of sent) {
    await alice.page.getByPlaceholder("Message").fill(text);
    await alice.page.keyboard.press("Enter");
    await messages(alice.page).filter({ hasText: text }).waitFor();
  }
  await bob.context.setOffline(false);
  for (const text of sent) {
    await messages(bob.page).filter({ hasText: text }).waitFor({ timeout: 30_000 });
  }
  for (const text of sent) {
    assert.equal(await messages(bob.page).filter({ hasText: text }).count(), 1, `${text} once`);
  }
  await alice.context.close();
  await bob.context.close();
});

// Waits until `check` (run in the page) holds, within the deadline.
const until = (page, check, arg) => page.waitForFunction(check, arg, { timeout: DEADLINE });

test("an image shows its thumbnail on both sides, and search opens a message far back", async () => {
  const alice = await signedIn("alice");
  const bob = await signedIn("bob");
  for (const side of [alice, bob]) {
    await side.page.locator("#chats button").first().click();
    await side.page.locator("#compose").waitFor();
  }
  // A picture drawn in the page, uploaded through the file input with its progress shown.
  const png = Buffer.from(await alice.page.evaluate(() => new Promise((resolve) => {
    const canvas = document.createElement("canvas");
    canvas.width = 640;
    canvas.height = 400;
    const paint = canvas.getContext("2d");
    paint.fillStyle = "#2563eb";
    paint.fillRect(0, 0, 640, 400);
    paint.fillStyle = "#fde68a";
    paint.fillRect(80, 80, 300, 200);
    canvas.toBlob(async (blob) => resolve([...new Uint8Array(await blob.arrayBuffer())]), "image/png");
  })));
  await alice.page.locator("#attach").setInputFiles({ name: "square.png", mimeType: "image/png", buffer: png });
  const uploading = alice.page.waitForRequest((request) => request.url().includes("/attachments?name=square.png"));
  await alice.page.getByPlaceholder("Message").fill("a square for you");
  await alice.page.keyboard.press("Enter");
  // The file's SHA-256 goes with it, so the server writes it once, straight to its content address.
  const declared = (await uploading).headers()["content-digest"];
  assert.equal(declared, `sha-256=:${createHash("sha256").update(png).digest("base64")}:`);
  // Both sides show the thumbnail (320 px wide for a 640 px image), not the image itself.
  for (const side of [alice, bob]) {
    await until(side.page, () => {
      const picture = document.querySelector('#messages img[alt="square.png"]');
      return picture && picture.complete && picture.naturalWidth === 320;
    });
  }
  // With images not loaded automatically (a setting kept on the server), bob asks for this one.
  await bob.page.getByLabel("Load images automatically").uncheck();
  // Its low-quality preview (32 px wide for this picture) stands in until he asks.
  await until(bob.page, () => document.querySelector(".image-button img.preview")?.naturalWidth === 32);
  await bob.page.getByRole("button", { name: "🖼 Show square.png" }).click();
  await until(bob.page, () => document.querySelector('#messages img[alt="square.png"]')?.naturalWidth === 320);
  await bob.page.getByLabel("Load images automatically").check();
  // The chat's files list it.
  await bob.page.getByRole("button", { name: "All files" }).click();
  await bob.page.locator("#file-list", { hasText: "square.png" }).waitFor();
  if (screenshots) await bob.page.screenshot({ path: join(screenshots, "attachments.png") });

  // A message with a rare word, then enough others that it is no longer on the first page.
  await alice.page.evaluate(async () => {
    const token = sessionStorage.getItem("confab.token");
    const chat = document.querySelector("#chats button[aria-current=true]").dataset.chat;
    const post = (text) => fetch(`/v1/chats/${chat}/signals`, {
      method: "POST",
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: JSON.stringify({ kind: "message", text }),
    });
    await post("the hippopotamus report is ready");
    for (let i = 0; i < 60; i++) await post(`filler ${i}`);
  });
  await messages(bob.page).filter({ hasText: "filler 59" }).waitFor();
  // Bob comes back later: the chat opens on its newest page only.
  await bob.page.reload();
  await bob.page.locator("#connection.live").waitFor();
  await bob.page.locator("#chats button").first().click();
  await messages(bob.page).filter({ hasText: "filler 59" }).waitFor();
  assert.equal(await messages(bob.page).filter({ hasText: "hippopotamus" }).count(), 0, "not on the newest page");
  // Indexing follows the store: search again until the hit is there.
  await bob.page.getByLabel("Search my chats").fill("hippopotamus");
  const hit = bob.page.locator("#hits button", { has: bob.page.locator("mark", { hasText: "hippopotamus" }) });
  const deadline = Date.now() + DEADLINE;
  for (;;) {
    await bob.page.getByRole("button", { name: "Search", exact: true }).click();
    try {
      await hit.waitFor({ timeout: 1_000 });
      break;
    } catch (error) {
      if (Date.now() > deadline) throw error;
    }
  }
  if (screenshots) await bob.page.screenshot({ path: join(screenshots, "search.png") });
  await hit.click();
  await bob.page.locator("#messages .message.found", { hasText: "the hippopotamus report is ready" }).waitFor();
  await alice.context.close();
  await bob.context.close();
});

test("over one WebSocket: events and sends go through the ws-plexer, and resume after a drop", async () => {
  const alice = await signedIn("alice");
  const bob = await signedIn("bob");
  const bobsHttpCalls = [];
  bob.page.on("request", (request) => {
    if (request.url().includes("/v1/chats/")) bobsHttpCalls.push(`${request.method()} ${request.url()}`);
  });
  for (const side of [alice, bob]) {
    await side.page.getByLabel("Use one WebSocket for events and calls").check();
    await side.page.locator("#connection.live", { hasText: "WebSocket" }).waitFor();
    await side.page.locator("#chats button").first().click();
    await side.page.locator("#compose").waitFor();
  }
  await bob.page.getByPlaceholder("Message").fill("sent over the socket");
  await bob.page.keyboard.press("Enter");
  await messages(alice.page).filter({ hasText: "sent over the socket" }).waitFor();
  await messages(bob.page).filter({ hasText: "sent over the socket" }).waitFor();
  assert.deepEqual(bobsHttpCalls, [], "bob's chat calls all went over the socket");

  await bob.context.setOffline(true);
  await bob.page.locator("#connection:not(.live)").waitFor();
  const sent = ["socket one", "socket two"];
  for (const text of sent) {
    await alice.page.getByPlaceholder("Message").fill(text);
    await alice.page.keyboard.press("Enter");
    await messages(alice.page).filter({ hasText: text }).waitFor();
  }
  await bob.context.setOffline(false);
  await bob.page.locator("#connection.live", { hasText: "WebSocket" }).waitFor({ timeout: 30_000 });
  for (const text of sent) {
    await messages(bob.page).filter({ hasText: text }).waitFor({ timeout: 30_000 });
    assert.equal(await messages(bob.page).filter({ hasText: text }).count(), 1, `${text} once`);
  }
  await alice.context.close();
  await bob.context.close();
});

test("the service worker shows a push, closes it when withdrawn, and a click opens the chat", async () => {
  const alice = await signedIn("alice");
  await alice.context.grantPermissions(["notifications"], { origin: base });
  const worker = alice.context.serviceWorkers()[0] || (await alice.context.waitForEvent("serviceworker"));
  const chatId = await alice.page.locator("#chats button").first().getAttribute("data-chat");
  // Pushes as the server sends them (notifier/src/push.rs), dispatched in the worker: a real push
  // service is out of reach here.
  const inWorker = (script) => worker.evaluate(`(async () => {
    const chatId = ${JSON.stringify(chatId)};
    const push = (data) => self.dispatchEvent(new PushEvent("push", { data: JSON.stringify(data) }));
    const shown = () => self.registration.getNotifications({ tag: "chat:" + chatId });
    const until = async (check) => {
      const deadline = Date.now() + 10000;
      for (;;) {
        const found = await check();
        if (found) return found;
        if (Date.now() > deadline) throw new Error("not within the deadline");
        await new Promise((resolve) => setTimeout(resolve, 25));
      }
    };
    ${script}
  })()`);
  const first = await inWorker(`
    push({ type: "messages", chat_id: chatId, signal_id: "0190a000-0000-7000-8000-000000000002",
           author_id: "x", author_name: "Bob", count: 2, preview: "see you at noon" });
    const [notification] = await until(async () => (await shown()).length && shown());
    return { title: notification.title, body: notification.body, data: notification.data };
  `);
  assert.equal(first.title, "Bob and others: 2 new messages");
  assert.equal(first.body, "see you at noon");
  assert.equal(first.data.chat_id, chatId);
  // A withdrawal of what was read before it leaves it; one that covers it closes it.
  const left = await inWorker(`
    push({ type: "withdrawn", chat_id: chatId, up_to: "0190a000-0000-7000-8000-000000000001" });
    push({ type: "withdrawn", chat_id: "another-chat", up_to: "ffffffff" });
    await self.pushesHandled;
    return (await shown()).length;
  `);
  assert.equal(left, 1, "an older withdrawal leaves the notification");
  await inWorker(`
    push({ type: "withdrawn", chat_id: chatId, up_to: "0190a000-0000-7000-8000-000000000002" });
    await until(async () => (await shown()).length === 0);
  `);
  // The push of what was withdrawn, arriving after its withdrawal (its delivery retried), is not
  // shown again.
  const late = await inWorker(`
    push({ type: "messages", chat_id: chatId, signal_id: "0190a000-0000-7000-8000-000000000002",
           author_id: "x", author_name: "Bob", count: 2, preview: "see you at noon" });
    await self.pushesHandled;
    return (await shown()).length;
  `);
  assert.equal(late, 0, "a push overtaken by its withdrawal was shown");
  // Shown again and clicked: the open page shows the chat.
  await alice.page.evaluate(() => {
    history.replaceState(null, "", "/");
    document.querySelector("#chats button[aria-current=true]")?.removeAttribute("aria-current");
  });
  await inWorker(`
    push({ type: "messages", chat_id: chatId, signal_id: "0190a000-0000-7000-8000-000000000003",
           author_id: "x", author_name: "Bob", count: 1 });
    const [notification] = await until(async () => (await shown()).length && shown());
    self.dispatchEvent(new NotificationEvent("notificationclick", { notification }));
    await until(async () => (await shown()).length === 0);
  `);
  await alice.page.locator(`#chats button[data-chat="${chatId}"][aria-current=true]`).waitFor();
  await alice.page.locator("#compose").waitFor();
  await alice.context.close();
});

test("a circle joined by its code pairs two members into a chat, and a queue matches vent with listen", async () => {
  const alice = await signedIn("alice");
  const bob = await signedIn("bob");
  for (const side of [alice, bob]) await side.page.locator("#rooms summary").click();
  await alice.page.getByLabel("Start a circle").fill("Book club");
  await alice.page.getByRole("button", { name: "Create" }).click();
  const code = await alice.page.locator("#circles li", { hasText: "Book club" }).locator(".code").textContent();
  await bob.page.getByLabel("Join a circle with its code").fill(code);
  await bob.page.getByLabel("Your name in the circle").fill("Reader B");
  await bob.page.getByRole("button", { name: "Join", exact: true }).click();
  await bob.page.locator("#circles li", { hasText: "Book club" }).waitFor();

  await alice.page.locator("#circles li", { hasText: "Book club" }).getByRole("button", { name: "Find a partner" }).click();
  await alice.page.locator("#circles li", { hasText: "Waiting for a partner" }).waitFor();
  await bob.page.locator("#circles li", { hasText: "Book club" }).getByRole("button", { name: "Find a partner" }).click();
  // Both are taken to their new chat; alice knows bob by his name in the circle.
  for (const side of [alice, bob]) await side.page.locator("#circles li", { hasText: "Paired" }).waitFor();
  await alice.page.locator("#chat-title", { hasText: "Reader B" }).waitFor();
  await bob.page.locator("#compose").waitFor();
  await bob.page.getByPlaceholder("Message").fill("hello, partner");
  await bob.page.keyboard.press("Enter");
  await messages(alice.page).filter({ hasText: "hello, partner" }).waitFor();
  if (screenshots) await alice.page.screenshot({ path: join(screenshots, "circle.png") });

  // Queues: carol vents, dave listens; they are matched into a chat of their own.
  const carol = await signedIn("carol");
  const dave = await signedIn("dave");
  await carol.page.locator("#rooms summary").click();
  await dave.page.locator("#rooms summary").click();
  await carol.page.getByRole("button", { name: "Vent", exact: true }).click();
  await carol.page.locator("#queue-status", { hasText: "Waiting in vent" }).waitFor();
  await dave.page.getByRole("button", { name: "Listen", exact: true }).click();
  for (const side of [carol, dave]) await side.page.locator("#queue-status", { hasText: "Matched" }).waitFor();
  await carol.page.locator("#compose").waitFor();
  await carol.page.getByPlaceholder("Message").fill("thanks for listening");
  await carol.page.keyboard.press("Enter");
  await messages(dave.page).filter({ hasText: "thanks for listening" }).waitFor();
  for (const side of [alice, bob, carol, dave]) await side.context.close();
});

test("the sign-in refuses a bad user name with a clear message", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(DEADLINE);
  await page.goto(base + "/");
  await page.getByLabel("User name").fill("not a name!");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#sign-in-error", { hasText: "a user name is" }).waitFor();
  if (screenshots) await page.screenshot({ path: join(screenshots, "sign-in.png") });
  await context.close();
});
