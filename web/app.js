// The confab web client: plain modules, no build step. It talks to the same HTTP API and event
// stream as any other client.

const $ = (id) => document.getElementById(id);

const session = {
  get token() { return sessionStorage.getItem("confab.token"); },
  set token(value) {
    if (value) sessionStorage.setItem("confab.token", value);
    else sessionStorage.removeItem("confab.token");
  },
};

const state = {
  me: null,
  chats: new Map(), // chat id → chat
  users: new Map(), // user id → user
  open: null, // the open chat's id
  messages: new Map(), // signal id → signal, of the open chat
  older: null, // cursor of older history
  seen: new Map(), // user id → the newest signal id they read, in the open chat
  events: null, // the EventSource
  lastEventId: null,
  settings: { auto_load_images: true },
  shown: new Set(), // ids of images the user asked to see (with auto-load off)
  found: null, // the message a search hit opened
  typing: new Map(), // user id → when their typing notice ends (ms), in the open chat
  presence: new Map(), // user id → their presence
  socket: null, // the WebSocket, when events come that way
  replaced: false, // a newer stream of this user took this one's place: reconnect on request only
  calls: new Map(), // request frame id → its promise's resolve and reject
  lastCall: 0,
};

class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function api(method, path, body) {
  const carried = overSocket(method, path, body);
  if (carried) return carried;
  const headers = { Accept: "application/json" };
  if (session.token) headers.Authorization = `Bearer ${session.token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return null;
  const type = response.headers.get("Content-Type") || "";
  const data = type.includes("json") ? await response.json() : null;
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// Bytes (attachments, thumbnails): an <img> cannot send the token, so they are fetched and shown
// from object URLs.
function fetchBytes(path) {
  return fetch(path, { headers: { Authorization: `Bearer ${session.token}` } });
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Signal ids are UUIDv7: their text order is their time order.
const newer = (a, b) => (a > b ? a : b);

function nameOf(userId) {
  const user = state.users.get(userId);
  return user ? user.display_name || user.username : "…";
}

async function learnUser(userId) {
  if (state.users.has(userId)) return;
  state.users.set(userId, null);
  try {
    state.users.set(userId, await api("GET", `/v1/users/${userId}`));
  } catch {
    state.users.delete(userId);
    return;
  }
  renderChats();
  renderMessages();
  renderSeen();
  const open = state.chats.get(state.open);
  if (open) $("chat-title").textContent = chatTitle(open);
}

// ---- Sign-in ----

// How this server signs people in: "dev" (a user name, trusted), "oidc" (the identity provider,
// authorization code with PKCE), or "unavailable".
let signInConfig = { sign_in: "dev" };

async function signIn(username) {
  const issued = await api("POST", "/v1/dev/sign-in", { username });
  session.token = issued.token;
}

const oidc = {
  async metadata() {
    if (!this.found) {
      const response = await fetch(`${signInConfig.issuer}/.well-known/openid-configuration`);
      if (!response.ok) throw new Error(`the identity provider answered HTTP ${response.status}`);
      this.found = await response.json();
    }
    return this.found;
  },
  redirectUri: () => `${location.origin}/`,
  // Off to the identity provider, with a fresh verifier and state kept for the way back.
  async begin() {
    const meta = await this.metadata();
    const verifier = base64url(crypto.getRandomValues(new Uint8Array(32)));
    const challenge = base64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
    const nonce = base64url(crypto.getRandomValues(new Uint8Array(16)));
    sessionStorage.setItem("confab.pkce", JSON.stringify({ verifier, state: nonce }));
    const query = new URLSearchParams({
      client_id: signInConfig.client_id,
      response_type: "code",
      scope: "openid",
      redirect_uri: this.redirectUri(),
      state: nonce,
      code_challenge: challenge,
      code_challenge_method: "S256",
    });
    location.assign(`${meta.authorization_endpoint}?${query}`);
  },
  // Back from the identity provider: the code for tokens, once, with the verifier.
  async finish() {
    const params = new URLSearchParams(location.search);
    if (!params.has("code") && !params.has("error")) return;
    history.replaceState(null, "", "/");
    const saved = JSON.parse(sessionStorage.getItem("confab.pkce") || "null");
    sessionStorage.removeItem("confab.pkce");
    if (params.has("error")) throw new Error(params.get("error_description") || params.get("error"));
    if (!saved || saved.state !== params.get("state")) throw new Error("this sign-in was not started here; try again");
    await this.tokens({
      grant_type: "authorization_code",
      code: params.get("code"),
      redirect_uri: this.redirectUri(),
      code_verifier: saved.verifier,
    });
  },
  async tokens(grant) {
    const meta = await this.metadata();
    const response = await fetch(meta.token_endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ ...grant, client_id: signInConfig.client_id }),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(answer.error_description || answer.error || `HTTP ${response.status}`);
    session.token = answer.access_token;
    if (answer.refresh_token) sessionStorage.setItem("confab.refresh", answer.refresh_token);
    if (answer.id_token) sessionStorage.setItem("confab.id_token", answer.id_token);
    sessionStorage.setItem("confab.expires_at", String(Date.now() + (answer.expires_in || 0) * 1000));
    this.refreshIn(answer.expires_in);
  },
  // A fresh access token a little before this one expires; a WebSocket gets it too.
  refreshIn(seconds) {
    clearTimeout(this.timer);
    if (!seconds) return;
    this.timer = setTimeout(async () => {
      const refresh = sessionStorage.getItem("confab.refresh");
      if (!refresh) return;
      try {
        await this.tokens({ grant_type: "refresh_token", refresh_token: refresh });
        if (state.socket?.readyState === WebSocket.OPEN) {
          state.socket.send(JSON.stringify({ type: "auth", token: session.token }));
        }
      } catch (error) {
        console.warn("the session could not be renewed", error);
      }
    }, Math.max(5, seconds - 30) * 1000);
  },
  async signOut() {
    const idToken = sessionStorage.getItem("confab.id_token");
    sessionStorage.removeItem("confab.refresh");
    sessionStorage.removeItem("confab.id_token");
    const meta = await this.metadata().catch(() => null);
    if (!meta?.end_session_endpoint) return location.reload();
    const query = new URLSearchParams({ client_id: signInConfig.client_id, post_logout_redirect_uri: this.redirectUri() });
    if (idToken) query.set("id_token_hint", idToken);
    location.assign(`${meta.end_session_endpoint}?${query}`);
  },
};

$("oidc-sign-in-button").addEventListener("click", () => {
  oidc.begin().catch((error) => { $("sign-in-error").textContent = error.message; });
});

function showSignIn() {
  $("sign-in").hidden = false;
  $("app").hidden = true;
  $("sign-in-form").hidden = signInConfig.sign_in !== "dev";
  $("oidc-sign-in").hidden = signInConfig.sign_in !== "oidc";
  if (signInConfig.sign_in === "unavailable") {
    $("sign-in-error").textContent = "This server signs no one in from here.";
  }
}

async function start() {
  try {
    signInConfig = await (await fetch("/config.json")).json();
    if (signInConfig.sign_in === "oidc") await oidc.finish();
  } catch (error) {
    $("sign-in-error").textContent = `Not signed in: ${error.message}`;
  }
  if (!session.token) return showSignIn();
  try {
    state.me = await api("GET", "/v1/me");
  } catch (error) {
    if (error.status === 401) {
      session.token = null;
      // An OIDC session outlives its access token: renew it once before asking to sign in.
      const refresh = sessionStorage.getItem("confab.refresh");
      sessionStorage.removeItem("confab.refresh");
      if (signInConfig.sign_in === "oidc" && refresh) {
        await oidc.tokens({ grant_type: "refresh_token", refresh_token: refresh }).catch(() => {});
      }
      return start();
    }
    throw error;
  }
  if (signInConfig.sign_in === "oidc") {
    oidc.refreshIn((Number(sessionStorage.getItem("confab.expires_at")) - Date.now()) / 1000);
  }
  state.users.set(state.me.id, state.me);
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("me").textContent = state.me.display_name || state.me.username;
  try {
    state.settings = await api("GET", "/v1/me/settings");
  } catch (error) {
    console.warn("settings not read; defaults used", error);
  }
  $("auto-load").checked = state.settings.auto_load_images !== false;
  $("low-quality").checked = Boolean(state.settings.low_quality_previews);
  // A step that fails leaves the others to run: without its chat list, a page still goes live.
  await loadChatsAtStart();
  connect();
  registerWorker();
  refreshCircles().catch((error) => console.warn("circles not read", error));
  const linked = new URLSearchParams(location.hash.slice(1)).get("chat");
  if (linked && state.chats.has(linked)) {
    await openChat(linked).catch((error) => console.warn("linked chat not opened", error));
  }
}

// The chat list at start-up: when it cannot be read, start-up goes on without it, and it is read
// again, after a longer wait each time, until it comes.
async function loadChatsAtStart(failures = 0) {
  try {
    await loadChats();
  } catch (error) {
    console.warn("chats not read; trying again", error);
    const delay = Math.min(1000 * 2 ** failures, 30_000);
    setTimeout(() => { if (state.me) loadChatsAtStart(failures + 1); }, delay);
  }
}

// Start-up failed (the server answered 5xx, or could not be reached): said so, with a way to try
// again, rather than a blank page.
function startFailed(error) {
  console.warn("start-up failed", error);
  $("sign-in").hidden = true;
  $("app").hidden = true;
  $("start-error").textContent = `confab could not start: ${error.message}`;
  $("start-failed").hidden = false;
}

$("retry-start").addEventListener("click", () => {
  $("start-failed").hidden = true;
  start().catch(startFailed);
});

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("sign-in-error").textContent = "";
  try {
    await signIn($("username").value.trim());
    await start();
  } catch (error) {
    $("sign-in-error").textContent = error.message;
  }
});

$("sign-out").addEventListener("click", async () => {
  $("sign-out").disabled = true;
  // A server that does not answer must not keep anyone signed in: past this, sign-out goes on.
  await Promise.race([forgetThisBrowser(), sleep(5000)]);
  session.token = null;
  disconnect();
  if (signInConfig.sign_in === "oidc") return oidc.signOut();
  location.reload();
});

// A browser may be shared: once signed out, its pushes must stop showing this user's messages
// (author and preview), so its device is removed on the server (with the token, while it is
// still here), the subscription ended, and what is shown closed. Any step may fail; the others
// still run. The circles remembered for this user stay: no server keeps that list, so they would
// be lost for good, and the page shows them to this user only.
async function forgetThisBrowser() {
  const registration = await navigator.serviceWorker?.getRegistration().catch(() => null);
  try {
    const subscription = await registration?.pushManager?.getSubscription();
    if (subscription) {
      try {
        const devices = await api("GET", "/v1/devices");
        for (const device of devices.items) {
          if (device.platform === "webpush" && device.endpoint === subscription.endpoint) {
            await api("DELETE", `/v1/devices/${device.id}`);
          }
        }
      } catch (error) {
        console.warn("the push device was not removed", error);
      }
      await subscription.unsubscribe();
    }
  } catch (error) {
    console.warn("the push subscription was not ended", error);
  }
  try {
    for (const shown of (await registration?.getNotifications()) || []) shown.close();
  } catch (error) {
    console.warn("notifications were not closed", error);
  }
  sessionStorage.removeItem("confab.expires_at");
}

// ---- Chats ----

async function loadChats() {
  const page = await api("GET", "/v1/chats?limit=100");
  // Events may have told this page more than the list (its order is written after the event).
  const chats = new Map();
  for (const chat of page.items) {
    const local = state.chats.get(chat.id);
    if (local?.latest_signal && (!chat.latest_signal || local.latest_signal.id > chat.latest_signal.id)) {
      chat.latest_signal = local.latest_signal;
      chat.unread_count = Math.max(chat.unread_count || 0, local.unread_count || 0);
    }
    if (local?.peer_id) chat.peer_id = local.peer_id;
    chats.set(chat.id, chat);
  }
  state.chats = chats;
  for (const chat of chats.values()) learnPeer(chat);
  renderChats();
  if (state.open && !state.chats.has(state.open)) closeChat();
}

function chatTitle(chat) {
  if (chat.name) return chat.name;
  if (chat.kind !== "direct") return "Group";
  return chat.peer_id ? nameOf(chat.peer_id) : "Direct chat";
}

// A direct chat is named after the other person: find who, once per chat.
async function learnPeer(chat) {
  if (chat.kind !== "direct" || chat.peer_id || chat.peer_pending) return;
  chat.peer_pending = true;
  try {
    const members = await api("GET", `/v1/chats/${chat.id}/members?limit=2`);
    const peer = members.items.find((m) => m.user_id !== state.me.id);
    if (peer) {
      chat.peer_id = peer.user_id;
      await learnUser(peer.user_id);
    }
  } finally {
    chat.peer_pending = false;
  }
  renderChats();
  if (state.open === chat.id) $("chat-title").textContent = chatTitle(chat);
}

function renderChats() {
  const list = $("chats");
  list.replaceChildren();
  const chats = [...state.chats.values()].sort((a, b) =>
    (b.latest_signal?.id || b.id).localeCompare(a.latest_signal?.id || a.id));
  for (const chat of chats) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.chat = chat.id;
    button.setAttribute("aria-current", String(chat.id === state.open));
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = chatTitle(chat);
    button.append(title);
    const unread = document.createElement("span");
    if (chat.unread_count > 0 && chat.id !== state.open) {
      unread.className = "unread";
      unread.textContent = chat.unread_count;
      unread.setAttribute("aria-label", `${chat.unread_count} unread`);
    }
    button.append(unread);
    const latest = document.createElement("span");
    latest.className = "latest";
    latest.textContent = chat.latest_signal?.deleted ? "(deleted)" : chat.latest_signal?.text || "";
    button.append(latest);
    button.addEventListener("click", () => openChat(chat.id));
    item.append(button);
    list.append(item);
  }
}

// Suggestions while a name is typed: people who have signed in, found by name.
let suggesting = 0;
$("new-chat-user").addEventListener("input", async () => {
  const typed = $("new-chat-user").value.split(",").pop().trim();
  if (typed.length < 2) return;
  const asked = ++suggesting;
  try {
    const found = await api("GET", `/v1/users?q=${encodeURIComponent(typed)}&limit=10`);
    if (asked !== suggesting) return;
    const before = $("new-chat-user").value.split(",").slice(0, -1).map((n) => n.trim()).filter(Boolean);
    $("user-suggestions").replaceChildren(...found.items
      .filter((user) => user.id !== state.me.id)
      .map((user) => {
        const option = document.createElement("option");
        // A user found by a whole address is named by it again (others are not shown it).
        option.value = [...before, typed.includes("@") ? typed : user.username].join(", ");
        option.label = user.display_name || user.username;
        return option;
      }));
  } catch (error) {
    console.warn("no suggestions", error);
  }
});

// One person: a direct chat. Several: a group, named by the second field.
$("new-chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("new-chat-error").textContent = "";
  const wanted = [...new Set($("new-chat-user").value.split(",").map((n) => n.trim().toLowerCase()).filter(Boolean))];
  try {
    const users = [];
    for (const name of wanted) {
      const found = await api("GET", `/v1/users?q=${encodeURIComponent(name)}&limit=20`);
      // Others see a user name that is an address as the display name: a whole address is
      // matched by the one user it finds.
      const user = found.items.find((u) => u.username.toLowerCase() === name)
        || (name.includes("@") && found.items.length === 1 ? found.items[0] : undefined);
      if (!user) throw new Error(`No user named ${name} has signed in yet`);
      if (user.id === state.me.id) continue;
      state.users.set(user.id, user);
      users.push(user);
    }
    if (!users.length) throw new Error("Name someone other than yourself");
    const direct = users.length === 1 && !$("new-chat-name").value.trim();
    const chat = direct
      ? await api("POST", "/v1/chats", { kind: "direct", members: [users[0].id] })
      : await api("POST", "/v1/chats", {
          kind: "group",
          name: $("new-chat-name").value.trim() || users.map((u) => u.display_name || u.username).join(", "),
          members: users.map((u) => u.id),
        });
    if (direct) chat.peer_id = users[0].id;
    state.chats.set(chat.id, { ...chat, ...(state.chats.get(chat.id) || {}) });
    $("new-chat-user").value = "";
    $("new-chat-name").value = "";
    renderChats();
    await openChat(chat.id);
  } catch (error) {
    $("new-chat-error").textContent = error.message;
  }
});

// ---- One chat ----

function closeChat() {
  state.open = null;
  state.messages.clear();
  $("compose").hidden = true;
  $("show-files").hidden = true;
  $("files").hidden = true;
  $("chat-title").textContent = "Pick a chat";
  renderPresence();
  renderMessages();
}

async function openChat(chatId) {
  state.open = chatId;
  state.found = null;
  state.messages.clear();
  state.seen.clear();
  state.older = null;
  const chat = state.chats.get(chatId);
  $("chat-title").textContent = chat ? chatTitle(chat) : "";
  $("compose").hidden = false;
  $("show-files").hidden = false;
  $("files").hidden = true;
  renderChats();
  const [page, members] = await Promise.all([
    api("GET", `/v1/chats/${chatId}/signals?limit=50`),
    api("GET", `/v1/chats/${chatId}/members?limit=100`),
  ]);
  if (state.open !== chatId) return;
  for (const signal of page.items) mergeSignal(signal);
  state.older = page.next_cursor;
  for (const member of members.items) learnUser(member.user_id);
  if (chat) learnPeer(chat).then(() => loadPresence(chatId));
  state.typing.clear();
  renderTyping();
  renderMessages(true);
  await markRead();
  await loadSeen();
  $("text").focus();
}

$("older").addEventListener("click", async () => {
  if (!state.open || !state.older) return;
  const chatId = state.open;
  const page = await api("GET", `/v1/chats/${chatId}/signals?limit=50&cursor=${encodeURIComponent(state.older)}`);
  if (state.open !== chatId) return;
  for (const signal of page.items) mergeSignal(signal);
  state.older = page.next_cursor;
  renderMessages();
});

function newestId() {
  let newest = null;
  for (const id of state.messages.keys()) newest = newest ? newer(newest, id) : id;
  return newest;
}

async function markRead() {
  const chatId = state.open;
  const upTo = newestId();
  const chat = state.chats.get(chatId);
  if (!chatId || !upTo || document.visibilityState === "hidden") return;
  try {
    await api("POST", `/v1/chats/${chatId}/read`, { up_to: upTo });
    if (chat) chat.unread_count = 0;
    renderChats();
  } catch (error) {
    console.warn("read marker not moved", error);
  }
}

// Who has read my newest message.
async function loadSeen() {
  const chatId = state.open;
  const mine = [...state.messages.values()].filter((s) => s.author_id === state.me.id && s.kind === "message");
  const newestMine = mine.map((s) => s.id).sort().pop();
  if (!chatId || !newestMine) return renderSeen();
  const page = await api("GET", `/v1/chats/${chatId}/signals/${newestMine}/views?limit=100`);
  if (state.open !== chatId) return;
  for (const seen of page.items) {
    state.seen.set(seen.user_id, seen.up_to);
    learnUser(seen.user_id);
  }
  renderSeen();
}

function renderSeen() {
  const mine = [...state.messages.values()].filter((s) => s.author_id === state.me?.id && s.kind === "message");
  const newestMine = mine.map((s) => s.id).sort().pop();
  const readers = newestMine
    ? [...state.seen.entries()]
        .filter(([user, upTo]) => user !== state.me.id && upTo >= newestMine)
        .map(([user]) => nameOf(user))
    : [];
  $("seen-by").textContent = readers.length ? `Seen by ${readers.join(", ")}` : "";
}

function renderMessages(scrollToEnd = false) {
  const list = $("messages");
  const atEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.replaceChildren();
  $("older").hidden = !state.older;
  const signals = [...state.messages.values()].sort((a, b) => a.id.localeCompare(b.id));
  for (const signal of signals) list.append(renderMessage(signal));
  if (scrollToEnd || atEnd) list.scrollTop = list.scrollHeight;
}

function renderMessage(signal) {
  const item = document.createElement("li");
  item.dataset.signal = signal.id;
  if (signal.kind !== "message") {
    item.className = "message system";
    const verb = { joined: "joined", left: "left", renamed: "renamed the chat" }[signal.kind] || signal.kind;
    item.textContent = `${nameOf(signal.author_id)} ${verb}`;
    return item;
  }
  const mine = signal.author_id === state.me.id;
  item.className = `message${mine ? " mine" : ""}${signal.id === state.found ? " found" : ""}`;
  const author = document.createElement("div");
  author.className = "author";
  author.textContent = nameOf(signal.author_id);
  item.append(author);
  const text = document.createElement("div");
  text.className = "text";
  if (signal.deleted) {
    text.classList.add("deleted");
    text.textContent = "This message was deleted.";
    item.append(text);
    return item;
  }
  text.textContent = signal.text || "";
  item.append(text);
  if (signal.attachments?.length) item.append(renderAttachments(signal.attachments));
  if (signal.edited_at) {
    const edited = document.createElement("span");
    edited.className = "edited";
    edited.textContent = "(edited)";
    item.append(edited);
  }
  const reactions = document.createElement("div");
  reactions.className = "reactions";
  for (const [emoji, count] of Object.entries(signal.reactions || {})) {
    if (count <= 0) continue;
    const chip = document.createElement("span");
    chip.className = "reaction";
    chip.textContent = `${emoji} ${count}`;
    reactions.append(chip);
  }
  item.append(reactions);
  const actions = document.createElement("div");
  actions.className = "actions";
  actions.append(action("👍", "React with a thumbs up", () => react(signal, "👍")));
  if (mine) {
    actions.append(action("Edit", "Edit this message", () => startEdit(item, signal)));
    actions.append(action("Delete", "Delete this message", () => remove(signal)));
  }
  item.append(actions);
  return item;
}

function action(label, title, run) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "link";
  button.textContent = label;
  button.title = title;
  button.addEventListener("click", run);
  return button;
}

function startEdit(item, signal) {
  const form = document.createElement("form");
  form.className = "edit";
  const input = document.createElement("input");
  input.value = signal.text || "";
  input.setAttribute("aria-label", "Edited text");
  input.maxLength = 4000;
  const save = document.createElement("button");
  save.type = "submit";
  save.textContent = "Save";
  form.append(input, save);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const edited = await api("PATCH", `/v1/chats/${signal.chat_id}/signals/${signal.id}`, { text: input.value });
      upsertSignal(edited);
    } catch (error) {
      $("send-error").textContent = error.message;
    }
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Escape") renderMessages();
  });
  item.querySelector(".text").replaceWith(form);
  input.focus();
}

async function remove(signal) {
  try {
    upsertSignal(await api("DELETE", `/v1/chats/${signal.chat_id}/signals/${signal.id}`));
  } catch (error) {
    $("send-error").textContent = error.message;
  }
}

async function react(signal, emoji) {
  const path = `/v1/chats/${signal.chat_id}/signals/${signal.id}/reactions/${encodeURIComponent(emoji)}`;
  try {
    await api("PUT", path);
  } catch (error) {
    $("send-error").textContent = error.message;
  }
}

// A send carries a nonce; a retry after a network error sends the same one, so the server
// answers the stored message instead of storing it twice. Files are uploaded first, and the
// message refers to them.
$("compose").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("text").value;
  const files = [...$("attach").files];
  const chatId = state.open;
  if ((!text.trim() && !files.length) || !chatId) return;
  $("send-error").textContent = "";
  let attachments;
  try {
    attachments = await uploadAll(chatId, files);
  } catch (error) {
    $("pending").replaceChildren();
    $("send-error").textContent = `Not sent: ${error.message}`;
    return;
  }
  $("attach").value = "";
  $("pending").replaceChildren();
  const nonce = crypto.randomUUID();
  $("text").value = "";
  const body = { kind: "message", nonce, attachments };
  if (text.trim()) body.text = text;
  for (let attempt = 0; ; attempt++) {
    try {
      const sent = await api("POST", `/v1/chats/${chatId}/signals`, body);
      upsertSignal(sent);
      return;
    } catch (error) {
      if (error instanceof ApiError || attempt >= 5) {
        $("text").value = text;
        $("send-error").textContent = `Not sent: ${error.message}`;
        return;
      }
      await sleep(500 * 2 ** attempt);
    }
  }
});

// ---- Attachments ----

$("attach").addEventListener("change", () => {
  const names = [...$("attach").files].map((f) => f.name).join(", ");
  $("pending").textContent = names ? `To send: ${names}` : "";
});

// Uploads each file with its progress shown; answers their attachment ids.
async function uploadAll(chatId, files) {
  const ids = [];
  for (const file of files) {
    const line = document.createElement("span");
    line.textContent = `Uploading ${file.name}`;
    const bar = document.createElement("progress");
    bar.max = 1;
    bar.value = 0;
    bar.setAttribute("aria-label", `Upload of ${file.name}`);
    line.append(bar);
    $("pending").replaceChildren(line);
    const uploaded = await upload(chatId, file, (done) => { bar.value = done; });
    ids.push(uploaded.id);
  }
  return ids;
}

// A declared SHA-256 lets the server write a file once, straight to its content address (and
// refuse it if the bytes arrive otherwise). WebCrypto hashes whole buffers only, so files larger
// than this go without one.
const DIGEST_MAX_BYTES = 128 * 1024 * 1024;

async function contentDigest(file) {
  if (!globalThis.crypto?.subtle || file.size > DIGEST_MAX_BYTES) return null;
  const hash = new Uint8Array(await crypto.subtle.digest("SHA-256", await file.arrayBuffer()));
  let binary = "";
  for (const byte of hash) binary += String.fromCharCode(byte);
  return `sha-256=:${btoa(binary)}:`;
}

// fetch() cannot report upload progress; XMLHttpRequest can.
async function upload(chatId, file, onProgress) {
  const digest = await contentDigest(file);
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", `/v1/chats/${chatId}/attachments?name=${encodeURIComponent(file.name)}`);
    request.setRequestHeader("Authorization", `Bearer ${session.token}`);
    request.setRequestHeader("Content-Type", file.type || "application/octet-stream");
    if (digest) request.setRequestHeader("Content-Digest", digest);
    request.responseType = "json";
    request.upload.onprogress = (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    };
    request.onload = () => {
      if (request.status >= 200 && request.status < 300) resolve(request.response);
      else reject(new ApiError(request.status, request.response));
    };
    request.onerror = () => reject(new Error(`the upload of ${file.name} failed`));
    request.send(file);
  });
}

const pictures = new Map(); // attachment id → Promise of an object URL of its thumbnail

// A thumbnail is made after the upload answers: wait for it a little, then show the image itself.
function thumbnailOf(attachment) {
  if (!pictures.has(attachment.id)) {
    const made = (async () => {
      for (let attempt = 0; attempt < 10 && attachment.size > 0; attempt++) {
        const response = await fetchBytes(`/v1/attachments/${attachment.id}/thumbnail`);
        if (response.ok) return URL.createObjectURL(await response.blob());
        if (response.status !== 404) break;
        await sleep(Math.min(200 * 2 ** attempt, 2000));
      }
      const response = await fetchBytes(`/v1/attachments/${attachment.id}`);
      if (!response.ok) throw new ApiError(response.status, null);
      return URL.createObjectURL(await response.blob());
    })();
    pictures.set(attachment.id, made);
    made.catch(() => pictures.delete(attachment.id));
  }
  return pictures.get(attachment.id);
}

const previews = new Map(); // attachment id → Promise of an object URL of its preview

function previewOf(attachment) {
  if (!previews.has(attachment.id)) {
    const made = (async () => {
      const response = await fetchBytes(`/v1/attachments/${attachment.id}/preview`);
      if (!response.ok) throw new ApiError(response.status, null);
      return URL.createObjectURL(await response.blob());
    })();
    previews.set(attachment.id, made);
    made.catch(() => previews.delete(attachment.id));
  }
  return previews.get(attachment.id);
}

async function download(attachment) {
  const response = await fetchBytes(`/v1/attachments/${attachment.id}`);
  if (!response.ok) {
    $("send-error").textContent = `Not downloaded: HTTP ${response.status}`;
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = attachment.name || "attachment";
  link.click();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

function sizeOf(bytes) {
  if (bytes >= 1 << 20) return `${(bytes / (1 << 20)).toFixed(1)} MB`;
  if (bytes >= 1 << 10) return `${Math.round(bytes / (1 << 10))} KB`;
  return `${bytes} B`;
}

function fileLink(attachment) {
  return action(`📄 ${attachment.name} (${sizeOf(attachment.size)})`, "Download", () => download(attachment));
}

function renderAttachments(attachments) {
  const box = document.createElement("div");
  box.className = "attachments";
  for (const attachment of attachments) {
    // A signal carries each attachment's metadata; an id alone is shown as a file.
    const known = typeof attachment === "object" ? attachment : { id: attachment, name: "attachment", size: 0 };
    if (known.kind !== "image") {
      box.append(fileLink(known));
      continue;
    }
    if (!state.settings.auto_load_images && !state.shown.has(known.id)) {
      // Not loaded unasked: its tiny low-quality preview (a few hundred bytes) stands in.
      const show = action(`🖼 Show ${known.name}`, "Load this image", () => {
        state.shown.add(known.id);
        renderMessages();
      });
      show.classList.add("image-button");
      const blurred = document.createElement("img");
      blurred.alt = "";
      blurred.className = "preview";
      previewOf(known).then((url) => { blurred.src = url; }, () => blurred.remove());
      show.prepend(blurred);
      box.append(show);
      continue;
    }
    const picture = document.createElement("img");
    picture.alt = known.name;
    picture.dataset.attachment = known.id;
    if (known.image?.width && known.image?.height) {
      const scale = Math.min(1, 240 / Math.max(known.image.width, known.image.height));
      picture.width = Math.round(known.image.width * scale);
      picture.height = Math.round(known.image.height * scale);
    }
    picture.tabIndex = 0;
    picture.title = `${known.name}: open the full image`;
    picture.addEventListener("click", () => openFull(known));
    picture.addEventListener("keydown", (event) => {
      if (event.key === "Enter") openFull(known);
    });
    // On metered connections (a setting), the preview first, then the thumbnail over it.
    if (state.settings.low_quality_previews) {
      picture.classList.add("preview");
      previewOf(known).then((url) => { if (picture.classList.contains("preview")) picture.src = url; }, () => {});
    }
    thumbnailOf(known).then((url) => {
      picture.classList.remove("preview");
      picture.src = url;
    }, () => { picture.alt = `${known.name} (not available)`; });
    box.append(picture);
  }
  return box;
}

async function openFull(attachment) {
  const response = await fetchBytes(`/v1/attachments/${attachment.id}`);
  if (!response.ok) return;
  window.open(URL.createObjectURL(await response.blob()), "_blank", "noopener");
}

// Every file of the open chat, newest first.
$("show-files").addEventListener("click", async () => {
  const panel = $("files");
  if (!panel.hidden) {
    panel.hidden = true;
    return;
  }
  const chatId = state.open;
  const page = await api("GET", `/v1/chats/${chatId}/attachments?limit=100`);
  if (state.open !== chatId) return;
  const list = $("file-list");
  list.replaceChildren();
  for (const attachment of page.items) {
    const item = document.createElement("li");
    item.append(fileLink(attachment));
    list.append(item);
  }
  if (!page.items.length) list.textContent = "No files in this chat yet.";
  panel.hidden = false;
});

// The user's own settings, kept on the server for all their devices.
for (const [box, field] of [["auto-load", "auto_load_images"], ["low-quality", "low_quality_previews"]]) {
  $(box).addEventListener("change", async () => {
    const wanted = $(box).checked;
    try {
      state.settings = await api("PUT", "/v1/me/settings", { [field]: wanted });
    } catch (error) {
      $(box).checked = !wanted;
      $("send-error").textContent = `Setting not saved: ${error.message}`;
      return;
    }
    renderMessages();
  });
}

// ---- Search ----

// The server sends each hit's text as escaped HTML with <mark> around matches: rebuilt here from
// text nodes, so nothing in a message can become markup.
function highlighted(html) {
  const decode = document.createElement("textarea");
  const out = document.createElement("span");
  let marked = false;
  for (const part of html.split(/(<mark>|<\/mark>)/)) {
    if (part === "<mark>") marked = true;
    else if (part === "</mark>") marked = false;
    else if (part) {
      decode.innerHTML = part;
      const text = document.createTextNode(decode.value);
      if (marked) {
        const mark = document.createElement("mark");
        mark.append(text);
        out.append(mark);
      } else out.append(text);
    }
  }
  return out;
}

$("search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("search-error").textContent = "";
  const q = $("search-text").value.trim();
  if (!q) return;
  try {
    const page = await api("GET", `/v1/search?q=${encodeURIComponent(q)}&limit=20`);
    const list = $("hits");
    list.replaceChildren();
    for (const hit of page.items) {
      learnUser(hit.signal.author_id);
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.signal = hit.signal.id;
      const where = document.createElement("span");
      where.className = "where";
      const chat = state.chats.get(hit.chat_id);
      where.textContent = `${chat ? chatTitle(chat) : "A chat"} · ${nameOf(hit.signal.author_id)}`;
      button.append(where, highlighted(hit.highlight));
      button.addEventListener("click", () => reveal(hit.chat_id, hit.signal.id));
      item.append(button);
      list.append(item);
    }
    if (!page.items.length) list.textContent = "Nothing found.";
    $("search-results").hidden = false;
  } catch (error) {
    $("search-error").textContent = error.message;
  }
});

$("search-close").addEventListener("click", () => {
  $("search-results").hidden = true;
});

// Opens a chat at one message: older pages are read until it is there.
async function reveal(chatId, signalId) {
  if (state.open !== chatId || !state.messages.has(signalId)) await openChat(chatId);
  for (let pages = 0; !state.messages.has(signalId) && state.older && pages < 50; pages++) {
    const page = await api("GET", `/v1/chats/${chatId}/signals?limit=100&cursor=${encodeURIComponent(state.older)}`);
    if (state.open !== chatId) return;
    for (const signal of page.items) mergeSignal(signal);
    state.older = page.next_cursor;
  }
  state.found = signalId;
  renderMessages();
  document.querySelector(`#messages [data-signal="${CSS.escape(signalId)}"]`)?.scrollIntoView({ block: "center" });
}

// A page of history is the chat as it was when the page was read: an event that came while the
// page was on its way (a deletion, an edit) can be newer than the page's copy, and wins.
function mergeSignal(signal) {
  const known = state.messages.get(signal.id);
  if (known && (known.deleted || (!signal.deleted && editedAt(known) > editedAt(signal)))) return;
  state.messages.set(signal.id, signal);
}

const editedAt = (signal) => (signal.edited_at ? Date.parse(signal.edited_at) : 0);

function upsertSignal(signal) {
  // A deletion is final: no later event brings a deleted message back.
  if (!signal.deleted && state.messages.get(signal.id)?.deleted) return;
  const chat = state.chats.get(signal.chat_id);
  if (chat && (!chat.latest_signal || chat.latest_signal.id <= signal.id)) chat.latest_signal = signal;
  if (signal.chat_id !== state.open) return renderChats();
  const known = state.messages.get(signal.id);
  state.messages.set(signal.id, { ...signal, reactions: signal.reactions || known?.reactions || {} });
  learnUser(signal.author_id);
  renderMessages();
  renderSeen();
  renderChats();
}

// ---- Push notifications ----

// The service worker shows pushes while no page is open; it is registered at every start, and
// subscribed to pushes when the user asks.
async function registerWorker() {
  if (!("serviceWorker" in navigator)) return null;
  try {
    return await navigator.serviceWorker.register("/sw.js");
  } catch (error) {
    console.warn("service worker not registered", error);
    return null;
  }
}

// A notification clicked: the worker asks an open page to show the chat.
navigator.serviceWorker?.addEventListener("message", (event) => {
  if (event.data?.type === "open-chat" && state.chats.has(event.data.chat_id)) openChat(event.data.chat_id);
});

const base64url = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes)))
  .replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");

function fromBase64url(text) {
  const raw = atob(text.replaceAll("-", "+").replaceAll("_", "/"));
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

$("enable-push").addEventListener("click", async () => {
  const status = $("push-status");
  status.textContent = "";
  try {
    if (!("PushManager" in window)) throw new Error("this browser has no Web Push");
    if ((await Notification.requestPermission()) !== "granted") throw new Error("notifications are not allowed");
    let key;
    try {
      key = (await api("GET", "/v1/push/vapid-public-key")).public_key;
    } catch (error) {
      if (error.status === 404) throw new Error("this server sends no Web Push");
      throw error;
    }
    const registration = (await registerWorker()) || (await navigator.serviceWorker.ready);
    const subscription = await registration.pushManager.subscribe({
      userVisibleOnly: true,
      applicationServerKey: fromBase64url(key),
    });
    await api("POST", "/v1/devices", {
      platform: "webpush",
      endpoint: subscription.endpoint,
      keys: {
        p256dh: base64url(subscription.getKey("p256dh")),
        auth: base64url(subscription.getKey("auth")),
      },
    });
    status.textContent = "on";
  } catch (error) {
    status.textContent = `Not turned on: ${error.message}`;
  }
});

// ---- Typing and presence ----

let typingSentAt = 0;
// While the user types, the others hear of it at most every three seconds.
$("text").addEventListener("input", () => {
  const chatId = state.open;
  if (!chatId || !$("text").value || Date.now() - typingSentAt < 3000) return;
  typingSentAt = Date.now();
  api("POST", `/v1/chats/${chatId}/typing`, {}).catch((error) => console.warn("typing not sent", error));
});

function renderTyping() {
  const now = Date.now();
  const names = [...state.typing.entries()]
    .filter(([user, until]) => until > now && user !== state.me?.id)
    .map(([user]) => nameOf(user));
  $("typing").textContent = names.length ? `${names.join(", ")} ${names.length > 1 ? "are" : "is"} typing…` : "";
}

// A direct chat's header tells whether the other person is online.
async function loadPresence(chatId) {
  const chat = state.chats.get(chatId);
  if (!chat?.peer_id || state.open !== chatId) return renderPresence();
  try {
    state.presence.set(chat.peer_id, await api("GET", `/v1/users/${chat.peer_id}/presence`));
  } catch (error) {
    console.warn("presence not read", error);
  }
  renderPresence();
}

function renderPresence() {
  const chat = state.chats.get(state.open);
  const presence = chat?.peer_id ? state.presence.get(chat.peer_id) : null;
  const badge = $("presence");
  badge.className = `presence${presence?.state === "online" ? " online" : ""}`;
  if (!presence) {
    badge.textContent = "";
    return;
  }
  const status = presence.status_text ? ` · ${presence.status_text}` : "";
  if (presence.state === "online") badge.textContent = `online${status}`;
  else if (presence.last_seen_at) badge.textContent = `last seen ${new Date(presence.last_seen_at).toLocaleString()}${status}`;
  else badge.textContent = `${presence.state}${status}`;
}

// ---- Live events ----

// What each event does, whichever transport brought it.
const handlers = {
  // A fresh stream's `ready` names where it starts: resuming from there misses nothing.
  ready: () => {},
  "signal.created": async (signal) => {
    // A chat new to this page is read whole, its unread count with it.
    const known = state.chats.has(signal.chat_id);
    if (!known) await loadChats();
    const chat = state.chats.get(signal.chat_id);
    if (!chat) return;
    const counted = !known || (chat.latest_signal && chat.latest_signal.id >= signal.id);
    if (!counted && signal.chat_id !== state.open && signal.author_id !== state.me.id) {
      chat.unread_count = (chat.unread_count || 0) + 1;
    }
    state.typing.delete(signal.author_id);
    renderTyping();
    upsertSignal(signal);
    if (signal.chat_id === state.open && signal.author_id !== state.me.id) markRead();
  },
  "signal.updated": upsertSignal,
  "signal.deleted": upsertSignal,
  "read.updated": (change, chatId) => {
    if (!change || chatId !== state.open) return;
    const current = state.seen.get(change.user_id);
    state.seen.set(change.user_id, current ? newer(current, change.up_to) : change.up_to);
    learnUser(change.user_id);
    renderSeen();
  },
  typing: (change, chatId) => {
    if (chatId !== state.open || change.user_id === state.me.id) return;
    state.typing.set(change.user_id, Date.now() + change.expires_in_ms);
    renderTyping();
    setTimeout(renderTyping, change.expires_in_ms + 50);
  },
  "member.joined": () => loadChats(),
  "member.left": () => loadChats(),
  "chat.updated": () => loadChats(),
  // The server could not replay what was missed: read everything again.
  reset: async () => {
    await loadChats();
    if (state.open) await openChat(state.open);
  },
  // The server ended the stream and says why (`replaced`); it is not to be reopened by itself.
  closed: () => replaced(),
};
const reaction = (change) => {
  const signal = state.messages.get(change.signal_id);
  if (!signal) return;
  signal.reactions = { ...(signal.reactions || {}), [change.emoji]: change.count };
  renderMessages();
};
handlers["reaction.added"] = reaction;
handlers["reaction.removed"] = reaction;
const presence = (change) => {
  state.presence.set(change.user_id, change);
  renderPresence();
};
for (const type of ["user.connected", "user.disconnected", "presence.updated"]) handlers[type] = presence;

function dispatch(type, data, chatId, id) {
  if (id) state.lastEventId = id;
  const handle = handlers[type];
  if (handle) Promise.resolve(handle(data, chatId)).catch((error) => console.warn(`${type} not handled`, error));
}

// Events come over Server-Sent Events, or (a setting) over the ws-plexer's WebSocket, which then
// carries the API calls too.
const transport = {
  get kind() { return localStorage.getItem("confab.transport") === "ws" ? "ws" : "sse"; },
  set kind(value) { localStorage.setItem("confab.transport", value); },
};

// The session is over (it expired, or was ended elsewhere): a ticket is refused, and would be at
// every attempt. It is renewed once where the sign-in has a way to; otherwise the sign-in form
// comes back, rather than an "offline" that never ends.
async function sessionEnded() {
  const refresh = sessionStorage.getItem("confab.refresh");
  if (signInConfig.sign_in === "oidc" && refresh && !renewedSinceLive) {
    renewedSinceLive = true;
    try {
      await oidc.tokens({ grant_type: "refresh_token", refresh_token: refresh });
      return connect();
    } catch (error) {
      console.warn("the session could not be renewed", error);
    }
  }
  clearTimeout(reconnectTimer);
  clearTimeout(oidc.timer);
  disconnect();
  session.token = null;
  sessionStorage.removeItem("confab.refresh");
  // What the next sign-in shows is read again, for whoever it is.
  state.lastEventId = null;
  closeChat();
  state.chats.clear();
  renderChats();
  state.me = null;
  showSignIn();
  $("sign-in-error").textContent = "Your session has ended: sign in again.";
}

function disconnect() {
  state.events?.close();
  state.events = null;
  const socket = state.socket;
  state.socket = null;
  socket?.close();
  for (const { reject } of state.calls.values()) reject(new Error("the socket closed"));
  state.calls.clear();
}

let reconnectTimer = null;
let reconnectFailures = 0; // attempts since the stream was last live
let renewedSinceLive = false; // whether the token was renewed for the stream since it was live

// Another attempt later, each one after a longer wait (up to 30 s): a server that is down is not
// asked every second by every page left open on it.
function reconnectLater() {
  clearTimeout(reconnectTimer);
  const delay = Math.min(1000 * 2 ** reconnectFailures, 30_000);
  reconnectFailures++;
  reconnectTimer = setTimeout(connect, delay);
}

async function connect() {
  clearTimeout(reconnectTimer);
  disconnect();
  state.replaced = false;
  let ticket;
  try {
    ticket = (await api("POST", "/v1/events/ticket")).ticket;
  } catch (error) {
    setLive(false);
    if (error.status === 401) return sessionEnded();
    reconnectLater();
    return;
  }
  let query = `?ticket=${encodeURIComponent(ticket)}`;
  if (state.lastEventId) query += `&last_event_id=${encodeURIComponent(state.lastEventId)}`;
  if (transport.kind === "ws") connectSocket(query);
  else connectEventSource(query);
}

function connectEventSource(query) {
  const events = new EventSource(`/v1/events${query}`);
  state.events = events;
  events.onopen = () => setLive(true);
  events.onerror = () => {
    setLive(false);
    // The browser reconnects by itself (with Last-Event-ID); a stream it gave up on needs a
    // fresh ticket.
    if (events.readyState === EventSource.CLOSED && state.events === events) reconnectLater();
  };
  for (const type of Object.keys(handlers)) {
    events.addEventListener(type, (event) => {
      const message = JSON.parse(event.data || "{}");
      dispatch(type, message.data, message.chat_id, event.lastEventId);
    });
  }
}

function connectSocket(query) {
  const url = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/v1/ws${query}`;
  const socket = new WebSocket(url, "confab.v1");
  state.socket = socket;
  socket.onmessage = (message) => {
    const frame = JSON.parse(message.data);
    switch (frame.type) {
      case "ready":
        // A fresh stream names where it starts: resuming from there misses nothing.
        if (frame.id) state.lastEventId = frame.id;
        // A ticket opens the stream; API calls need the token itself.
        socket.send(JSON.stringify({ type: "auth", token: session.token }));
        break;
      case "auth":
        socket.authenticated = true;
        setLive(true);
        break;
      case "event":
        dispatch(frame.event, frame.data, frame.chat_id, frame.id);
        break;
      case "reset":
        // Its id is where the stream now stands: the next resume starts there.
        dispatch("reset", undefined, undefined, frame.id);
        break;
      case "response": {
        const call = state.calls.get(frame.id);
        state.calls.delete(frame.id);
        if (!call) break;
        if (frame.status >= 400) call.reject(new ApiError(frame.status, frame.body));
        else call.resolve(frame.status === 204 ? null : frame.body);
        break;
      }
      case "error":
        console.warn("socket error frame", frame.problem);
        break;
    }
  };
  socket.onclose = (event) => {
    if (state.socket !== socket) return;
    if (event.code === 4009) return replaced();
    setLive(false);
    disconnect();
    reconnectLater();
  };
}

// An API call as a request frame on the socket; `null` when there is no socket to carry it.
function overSocket(method, path, body) {
  const socket = state.socket;
  if (!socket?.authenticated || socket.readyState !== WebSocket.OPEN) return null;
  const id = ++state.lastCall;
  const frame = { type: "request", id, method, path };
  if (body !== undefined) frame.body = body;
  return new Promise((resolve, reject) => {
    state.calls.set(id, { resolve, reject });
    socket.send(JSON.stringify(frame));
  });
}

$("use-socket").checked = transport.kind === "ws";
$("use-socket").addEventListener("change", () => {
  transport.kind = $("use-socket").checked ? "ws" : "sse";
  if (state.me) connect();
});

function setLive(live, text) {
  if (live) {
    reconnectFailures = 0;
    renewedSinceLive = false;
  }
  const badge = $("connection");
  badge.textContent = text || (live ? `live${transport.kind === "ws" ? " (WebSocket)" : ""}` : "offline");
  badge.classList.toggle("live", live);
}

// A newer stream of this user (another tab or device, or this one reconnecting while its old
// connection lingered) took this stream's place: a user holds only so many. Reconnecting by itself
// would push that one out in turn, and the two would take turns for ever; so it waits until the
// user asks (a click on the badge) or comes back to the page.
function replaced() {
  disconnect();
  state.replaced = true;
  setLive(false, "replaced: click to reconnect");
}
$("connection").addEventListener("click", () => {
  if (state.replaced && session.token && state.me) connect();
});

// A dropped network does not always end an open stream at once: end it, and resume from the last
// event id when the network is back.
window.addEventListener("offline", () => {
  disconnect();
  setLive(false);
});
window.addEventListener("online", () => {
  if (session.token && state.me && !state.replaced) connect();
});

// ---- Circles and queues ----

// There is no list of a user's circles on the server: the ones joined here are remembered here.
const circles = {
  load() {
    try {
      return JSON.parse(localStorage.getItem(`confab.circles.${state.me.id}`) || "{}");
    } catch {
      return {};
    }
  },
  save(all) { localStorage.setItem(`confab.circles.${state.me.id}`, JSON.stringify(all)); },
  remember(circle, pairing) {
    const all = circles.load();
    all[circle.id] = { ...(all[circle.id] || {}), ...circle, ...(pairing ? { pairing } : {}) };
    circles.save(all);
  },
};

// Names in a circle's pairing chat are the names the members chose there.
function learnPairedNames(members) {
  for (const member of members || []) {
    if (member.user_id === state.me.id) continue;
    const known = state.users.get(member.user_id);
    state.users.set(member.user_id, { ...(known || { id: member.user_id, username: member.display_name }), display_name: member.display_name });
  }
}

async function refreshCircles() {
  const all = circles.load();
  await Promise.all(Object.keys(all).map(async (id) => {
    try {
      all[id] = { ...all[id], ...(await api("GET", `/v1/circles/${id}`)) };
    } catch (error) {
      // Expired (410), left or removed (403), or gone (404): forgotten here too.
      if (error.status >= 400 && error.status < 500) delete all[id];
    }
  }));
  circles.save(all);
  renderCircles();
}

function renderCircles() {
  const list = $("circles");
  list.replaceChildren();
  for (const circle of Object.values(circles.load())) {
    const item = document.createElement("li");
    item.dataset.circle = circle.id;
    const name = document.createElement("strong");
    name.textContent = circle.name;
    item.append(name);
    if (circle.access_code) {
      const code = document.createElement("div");
      code.append("Code: ");
      const value = document.createElement("span");
      value.className = "code";
      value.textContent = circle.access_code;
      code.append(value);
      item.append(code);
    }
    const pairing = document.createElement("div");
    pairing.className = "pairing";
    const status = document.createElement("span");
    status.className = "status-text";
    const state_ = circle.pairing?.state;
    status.textContent = state_ === "waiting" ? "Waiting for a partner…" : state_ === "paired" ? "Paired" : "";
    pairing.append(
      action("Find a partner", "Wait in this circle's lobby", () => pair(circle.id)),
      action("Stop", "Leave the lobby or end the pairing", () => unpair(circle.id)),
      status,
    );
    item.append(pairing);
    list.append(item);
  }
}

async function pair(circleId) {
  $("circle-error").textContent = "";
  try {
    const status = await api("POST", `/v1/circles/${circleId}/pair`, {});
    circles.remember({ id: circleId }, status);
    renderCircles();
    if (status.state === "paired" && status.chat_id) {
      await loadChats();
      await openChat(status.chat_id);
    }
  } catch (error) {
    $("circle-error").textContent = error.message;
  }
}

async function unpair(circleId) {
  $("circle-error").textContent = "";
  try {
    await api("DELETE", `/v1/circles/${circleId}/pair`);
    circles.remember({ id: circleId }, { state: null });
    renderCircles();
    await loadChats();
  } catch (error) {
    $("circle-error").textContent = error.message;
  }
}

$("join-circle-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("circle-error").textContent = "";
  try {
    const circle = await api("POST", "/v1/circles/join", {
      access_code: $("circle-code").value.trim(),
      display_name: $("circle-name").value.trim(),
    });
    circles.remember(circle);
    $("circle-code").value = "";
    renderCircles();
  } catch (error) {
    $("circle-error").textContent = error.message;
  }
});

$("new-circle-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("circle-error").textContent = "";
  try {
    const circle = await api("POST", "/v1/circles", { name: $("new-circle-name").value.trim() });
    circles.remember(circle);
    $("new-circle-name").value = "";
    renderCircles();
  } catch (error) {
    $("circle-error").textContent = error.message;
  }
});

let inQueue = null; // the queue this page waits or is matched in
for (const button of document.querySelectorAll("[data-queue]")) {
  button.addEventListener("click", async () => {
    const kind = button.dataset.queue;
    try {
      // Joining again while matched ends the match (`queue.unmatched`).
      const status = await api("POST", `/v1/queues/${kind}/join`, {});
      inQueue = kind;
      showQueue(kind, status);
      if (status.state === "paired" && status.chat_id) {
        await loadChats();
        await openChat(status.chat_id);
      }
    } catch (error) {
      $("queue-status").textContent = error.message;
    }
  });
}

// Leaves the queue, or ends the match for both (its chat is removed).
$("leave-queue").addEventListener("click", async () => {
  if (!inQueue) return;
  try {
    await api("DELETE", `/v1/queues/${inQueue}`);
    inQueue = null;
    showQueue(null);
    await loadChats();
  } catch (error) {
    $("queue-status").textContent = error.message;
  }
});

function showQueue(kind, status) {
  $("leave-queue").hidden = !kind;
  $("leave-queue").textContent = status?.state === "paired" ? "End match" : "Leave";
  if (!kind) $("queue-status").textContent = "";
  else if (status?.state === "paired") $("queue-status").textContent = `Matched in ${kind}`;
  else $("queue-status").textContent = `Waiting in ${kind}…`;
}

handlers["circle.paired"] = async (pairing) => {
  learnPairedNames(pairing.members);
  circles.remember({ id: pairing.circle_id }, { state: "paired", chat_id: pairing.chat.id });
  renderCircles();
  await loadChats();
  await openChat(pairing.chat.id);
};
handlers["circle.unpaired"] = async (ended) => {
  circles.remember({ id: ended.circle_id }, { state: null });
  renderCircles();
  await loadChats();
};
handlers["queue.matched"] = async (match) => {
  const mine = match.members.find((member) => member.user_id === state.me.id);
  inQueue = mine?.kind || inQueue;
  showQueue(inQueue, { state: "paired" });
  await loadChats();
  await openChat(match.chat.id);
};
// The match ended: its chat is gone. Ended by the partner (they left, or went away), this page is
// out of the queue; ended here (leaving, or joining again), the page already shows where it is.
handlers["queue.unmatched"] = async (ended) => {
  if (ended.by !== state.me.id) {
    inQueue = null;
    showQueue(null);
    $("queue-status").textContent = "The match ended";
  }
  await loadChats();
};

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState !== "visible") return;
  markRead();
  if (state.replaced && session.token && state.me) connect();
});

start().catch(startFailed);
