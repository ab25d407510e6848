// Signing out of a browser that may be shared: nothing of the signed-out user keeps reaching it,
// on a server that sends Web Push.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { serve, launch, page as pageOf, vapidKeys } from "../support.js";

const DEADLINE = 15_000;
const ENDPOINT = "http://127.0.0.1:9/p/alice";

let server;
let base;
let browser;

before(async () => {
  // The made-up endpoint is plain http on loopback: allowed for tests only.
  server = await serve({ CONFAB_PUSH__ALLOW_INSECURE_ENDPOINTS: "true", ...(await vapidKeys()) });
  base = server.base;
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

// A real push service is out of reach here: the browser's subscription is made up in the page,
// with keys the server takes (p256dh a point of P-256, auth 16 bytes). It is kept in localStorage,
// as a browser keeps its own, so that a reload finds it; ending it is reported to the test.
function fakePush() {
  if (typeof window === "undefined" || !("PushManager" in window)) return;
  const KEPT = "e2e.push-subscription";
  const bytes = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0)).buffer;
  const text = (buffer) => btoa(String.fromCharCode(...new Uint8Array(buffer)));
  const kept = () => JSON.parse(localStorage.getItem(KEPT) || "null");
  const subscriptionOf = (saved) => ({
    endpoint: saved.endpoint,
    expirationTime: null,
    getKey: (name) => bytes(saved[name]),
    async unsubscribe() {
      localStorage.removeItem(KEPT);
      await window.pushUnsubscribed(saved.endpoint);
      return true;
    },
  });
  Notification.requestPermission = async () => "granted";
  PushManager.prototype.subscribe = async function () {
    if (!kept()) {
      const pair = await crypto.subtle.generateKey({ name: "ECDH", namedCurve: "P-256" }, true, ["deriveBits"]);
      localStorage.setItem(KEPT, JSON.stringify({
        endpoint: window.pushEndpoint,
        p256dh: text(await crypto.subtle.exportKey("raw", pair.publicKey)),
        auth: text(crypto.getRandomValues(new Uint8Array(16))),
      }));
    }
    return subscriptionOf(kept());
  };
  PushManager.prototype.getSubscription = async function () {
    return kept() && subscriptionOf(kept());
  };
}

const devicesOf = async (token) => {
  const response = await fetch(`${base}/v1/devices`, { headers: { Authorization: `Bearer ${token}` } });
  assert.equal(response.status, 200);
  return (await response.json()).items;
};

test("signing out removes this browser's push device, ends its subscription, and closes what it shows", async () => {
  const context = await browser.newContext();
  await context.grantPermissions(["notifications"], { origin: base });
  const unsubscribed = [];
  await context.exposeBinding("pushUnsubscribed", (_source, endpoint) => { unsubscribed.push(endpoint); });
  await context.addInitScript(`window.pushEndpoint = ${JSON.stringify(ENDPOINT)}; (${fakePush})();`);
  const page = await pageOf(context, "alice", DEADLINE);
  await page.goto(base + "/");
  await page.getByLabel("User name").fill("alice");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.locator("#connection.live").waitFor();

  // A circle, remembered in this browser for alice.
  await page.locator("#rooms summary").click();
  await page.getByLabel("Start a circle").fill("Book club");
  await page.getByRole("button", { name: "Create" }).click();
  await page.locator("#circles li", { hasText: "Book club" }).waitFor();

  await page.getByRole("button", { name: "Turn on notifications" }).click();
  await page.locator("#push-status", { hasText: "on" }).waitFor();
  const token = await page.evaluate(() => sessionStorage.getItem("confab.token"));
  assert.deepEqual((await devicesOf(token)).map((device) => device.endpoint), [ENDPOINT]);

  // Signed out later, from another page load: the subscription is the browser's, not the page's.
  await page.reload();
  await page.locator("#connection.live").waitFor();
  // A notification of alice's, as the service worker shows a push.
  const shown = () => page.evaluate(async () => {
    const registration = await navigator.serviceWorker.ready;
    return (await registration.getNotifications()).length;
  });
  await page.evaluate(async () => {
    const registration = await navigator.serviceWorker.ready;
    await registration.showNotification("Bob", { tag: "chat:x", body: "see you at noon" });
  });
  assert.equal(await shown(), 1);

  await page.getByRole("button", { name: "Sign out" }).click();
  await page.locator("#sign-in-form").waitFor();
  assert.deepEqual(await devicesOf(token), [], "the device is still registered on the server");
  assert.deepEqual(unsubscribed, [ENDPOINT], "the subscription was not ended");
  assert.equal(await shown(), 0, "alice's notification is still shown");
  // Her circles stay remembered for her (no server keeps that list), shown to her alone.
  const kept = await page.evaluate(() => Object.keys(localStorage).filter((key) => key.startsWith("confab.circles.")));
  assert.equal(kept.length, 1, "alice's circles were forgotten");
  await context.close();
});
