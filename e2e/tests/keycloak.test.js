// The web client on the real stack: `confab serve` on Cassandra, NATS JetStream and Keycloak (as
// `infra/up.sh` started them), signing in through Keycloak's own login page with the
// authorization-code flow and PKCE, and signing out there again.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { serve, launch, page as pageOf } from "../support.js";

const DEADLINE = 20_000;
const issuer = process.env.CONFAB_TEST_OIDC_ISSUER;
// The dev realm lets the web client's origin on this port call Keycloak's token endpoint.
const PORT = 18080;

let server;
let browser;

before(async () => {
  if (!issuer) {
    if (process.env.CONFAB_REQUIRE_SERVICES === "1") {
      throw new Error("CONFAB_TEST_OIDC_ISSUER is not set: run infra/up.sh and source .infra/env");
    }
    return;
  }
  server = await serve({
    CONFAB_API__LISTEN: `127.0.0.1:${PORT}`,
    CONFAB_STORE__BACKEND: "cql",
    CONFAB_STORE__CQL_CONTACT_POINTS: process.env.CONFAB_TEST_CQL_CONTACT_POINTS || "127.0.0.1:9042",
    // One keyspace and prefix for every run: `serve` migrates it, and nothing piles up.
    CONFAB_STORE__KEYSPACE: "e2e_keycloak",
    CONFAB_STORE__REQUEST_TIMEOUT_MS: "20000",
    CONFAB_BUS__BACKEND: "nats",
    CONFAB_BUS__NATS_URL: process.env.CONFAB_TEST_NATS_URL || "nats://127.0.0.1:4222",
    CONFAB_BUS__SUBJECT_PREFIX: "e2ekc",
    CONFAB_IDENTITY__MODE: "oidc",
    CONFAB_IDENTITY__ISSUER_URL: issuer,
    CONFAB_IDENTITY__CLIENT_IDS: process.env.CONFAB_TEST_OIDC_CLIENT_ID || "confab-web",
    CONFAB_SECRET_KEY: randomBytes(32).toString("hex"),
  });
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.stop();
});

test("sign in through Keycloak's own page (PKCE), chat, and sign out there", async (t) => {
  if (!issuer) {
    t.skip("SKIPPED LOUDLY: no Keycloak (CONFAB_TEST_OIDC_ISSUER unset); run infra/up.sh first");
    console.error("keycloak.test.js: SKIPPED, no Keycloak configured");
    return;
  }
  const context = await browser.newContext({ viewport: { width: 1100, height: 720 } });
  const page = await pageOf(context, "alice", DEADLINE);
  await page.goto(`${server.base}/`);
  // No user-name form here: the identity provider signs people in.
  assert.equal(await page.locator("#sign-in-form").isVisible(), false);
  await page.getByRole("button", { name: "Sign in with your account" }).click();
  // Keycloak's login page, on Keycloak's origin.
  await page.waitForURL((url) => url.href.startsWith(issuer));
  await page.locator("#username").fill("alice");
  await page.locator("#password").fill("alice");
  await page.locator("#kc-login").click();
  // Back on confab, with the code exchanged for tokens and the page cleaned of it.
  await page.waitForURL((url) => url.href.startsWith(server.base));
  await page.locator("#connection.live").waitFor();
  assert.match(await page.locator("#me").textContent(), /alice/i);
  assert.equal(new URL(page.url()).search, "", "the code is not left in the address");
  assert.ok(await page.evaluate(() => sessionStorage.getItem("confab.refresh")), "a refresh token is kept");

  // The token works against the API.
  await page.locator("#rooms summary").click();
  await page.getByLabel("Start a circle").fill("Only me");
  await page.getByRole("button", { name: "Create" }).click();
  await page.locator("#circles li", { hasText: "Only me" }).waitFor();

  // Signing out ends the Keycloak session too: signing in again asks for the password.
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.waitForURL((url) => url.href.startsWith(server.base));
  await page.getByRole("button", { name: "Sign in with your account" }).click();
  await page.waitForURL((url) => url.href.startsWith(issuer));
  await page.locator("#password").waitFor();
  await context.close();
});
