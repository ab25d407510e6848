// Two people chat in the web client on `confab serve`, each in a browser context of their own,
// in Debian's Chromium driven by Playwright.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const confab = process.env.CONFAB_BIN || join(root, "target", "debug", "confab");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const screenshots = process.env.CONFAB_SCREENSHOTS; // a folder to keep screenshots in, if set
const DEADLINE = 15_000;

let server;
let base;
let browser;
let dataDir;

before(async () => {
  dataDir = mkdtempSync(join(tmpdir(), "confab-e2e-"));
  const env = Object.fromEntries(
    Object.entries(process.env).filter(([key]) => !key.startsWith("CONFAB_")),
  );
  env.CONFAB_API__LISTEN = "127.0.0.1:0";
  server = spawn(confab, ["serve"], { cwd: dataDir, env, stdio: ["ignore", "pipe", "inherit"] });
  base = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("confab serve did not listen in time")), 60_000);
    server.once("exit", (code) => reject(new Error(`confab serve exited with ${code}`)));
    createInterface({ input: server.stdout }).on("line", (line) => {
      const at = line.indexOf(" listening on ");
      if (at >= 0) {
        clearTimeout(timer);
        resolve(line.slice(at + " listening on ".length).trim());
      }
    });
  });
  browser = await chromium.launch({
    executablePath: chromiumPath,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  if (screenshots) mkdirSync(screenshots, { recursive: true });
});

after(async () => {
  await browser?.close();
  server?.kill("SIGTERM");
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
});

async function signedIn(name) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const page = await context.newPage();
  page.setDefaultTimeout(DEADLINE);
  // What the page reports goes to the test's output, to read when a step times out.
  page.on("pageerror", (error) => console.error(`[${name}] page error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error" || message.type() === "warning") {
      console.error(`[${name}] console ${message.type()}: ${message.text()}`);
    }
  });
  await page.goto(base + "/");
  await page.getByLabel("User name").fill(name);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#connection.live").waitFor();
  return { context, page };
}

const messages = (page) => page.locator("#messages .message:not(.system) .text");

test("alice and bob chat live: messages, seen by, a reaction and an edit", async () => {
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

  if (screenshots) {
    await alice.page.screenshot({ path: join(screenshots, "chat-alice.png") });
    await bob.page.screenshot({ path: join(screenshots, "chat-bob.png") });
  }
  await alice.context.close();
  await bob.context.close();
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
