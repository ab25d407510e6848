// What the browser tests share: a `confab serve` of their own, and Debian's Chromium.

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { spawn, execFile } from "node:child_process";
import { promisify } from "node:util";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const confab = process.env.CONFAB_BIN || join(root, "target", "debug", "confab");
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";

// This process's environment without its CONFAB_ variables: the server is configured by the test
// alone.
const envWithoutConfab = () => Object.fromEntries(
  Object.entries(process.env).filter(([key]) => !key.startsWith("CONFAB_")),
);

// Starts `confab serve` in a fresh folder with `settings` as its only CONFAB_ variables; answers
// its address and a stop function.
export async function serve(settings) {
  const dataDir = mkdtempSync(join(tmpdir(), "confab-e2e-"));
  const env = envWithoutConfab();
  Object.assign(env, { CONFAB_API__LISTEN: "127.0.0.1:0" }, settings);
  const server = spawn(confab, ["serve"], { cwd: dataDir, env, stdio: ["ignore", "pipe", "inherit"] });
  const base = await new Promise((resolve, reject) => {
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
  return {
    base,
    // Waits for the server to exit before removing its folder: it writes there (the search
    // index among others) until its shutdown is over, and a folder removed under a writer
    // fails with ENOTEMPTY.
    async stop() {
      if (server.exitCode === null && server.signalCode === null) {
        const exited = new Promise((resolve) => server.once("exit", resolve));
        server.kill("SIGTERM");
        const timer = setTimeout(() => server.kill("SIGKILL"), 20_000);
        await exited;
        clearTimeout(timer);
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

// A fresh VAPID key pair from `confab vapid-keys`, as the settings that give it to `serve`.
export async function vapidKeys() {
  const dir = mkdtempSync(join(tmpdir(), "confab-e2e-"));
  try {
    const { stdout } = await promisify(execFile)(confab, ["vapid-keys"], { cwd: dir, env: envWithoutConfab() });
    return Object.fromEntries(stdout.trim().split("\n").map((line) => {
      const at = line.indexOf("=");
      return [line.slice(0, at), line.slice(at + 1)];
    }));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

export function launch() {
  return chromium.launch({
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
}

// A page whose errors and warnings go to the test's output, to read when a step times out.
export async function page(context, name, deadline) {
  const opened = await context.newPage();
  opened.setDefaultTimeout(deadline);
  opened.on("pageerror", (error) => console.error(`[${name}] page error: ${error.message}`));
  opened.on("console", (message) => {
    if (message.type() === "error" || message.type() === "warning") {
      console.error(`[${name}] console ${message.type()}: ${message.text()}`);
    }
  });
  return opened;
}
