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
};

class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

async function api(method, path, body) {
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

async function signIn(username) {
  const issued = await api("POST", "/v1/dev/sign-in", { username });
  session.token = issued.token;
}

async function start() {
  if (!session.token) {
    $("sign-in").hidden = false;
    $("app").hidden = true;
    return;
  }
  try {
    state.me = await api("GET", "/v1/me");
  } catch (error) {
    if (error.status === 401) {
      session.token = null;
      return start();
    }
    throw error;
  }
  state.users.set(state.me.id, state.me);
  $("sign-in").hidden = true;
  $("app").hidden = false;
  $("me").textContent = state.me.display_name || state.me.username;
  await loadChats();
  connect();
}

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

$("sign-out").addEventListener("click", () => {
  session.token = null;
  state.events?.close();
  location.reload();
});

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

$("new-chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("new-chat-error").textContent = "";
  const wanted = $("new-chat-user").value.trim().toLowerCase();
  try {
    const found = await api("GET", `/v1/users?q=${encodeURIComponent(wanted)}&limit=20`);
    const user = found.items.find((u) => u.username.toLowerCase() === wanted) || found.items[0];
    if (!user || user.id === state.me.id) throw new Error(`No user named ${wanted} has signed in yet`);
    state.users.set(user.id, user);
    const chat = await api("POST", "/v1/chats", { kind: "direct", members: [user.id] });
    chat.peer_id = user.id;
    state.chats.set(chat.id, { ...chat, ...(state.chats.get(chat.id) || {}) });
    $("new-chat-user").value = "";
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
  $("chat-title").textContent = "Pick a chat";
  renderMessages();
}

async function openChat(chatId) {
  state.open = chatId;
  state.messages.clear();
  state.seen.clear();
  state.older = null;
  const chat = state.chats.get(chatId);
  $("chat-title").textContent = chat ? chatTitle(chat) : "";
  $("compose").hidden = false;
  renderChats();
  const [page, members] = await Promise.all([
    api("GET", `/v1/chats/${chatId}/signals?limit=50`),
    api("GET", `/v1/chats/${chatId}/members?limit=100`),
  ]);
  if (state.open !== chatId) return;
  for (const signal of page.items) state.messages.set(signal.id, signal);
  state.older = page.next_cursor;
  for (const member of members.items) learnUser(member.user_id);
  if (chat) learnPeer(chat);
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
  for (const signal of page.items) state.messages.set(signal.id, signal);
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
  item.className = `message${mine ? " mine" : ""}`;
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
// answers the stored message instead of storing it twice.
$("compose").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("text").value;
  const chatId = state.open;
  if (!text.trim() || !chatId) return;
  const nonce = crypto.randomUUID();
  $("send-error").textContent = "";
  $("text").value = "";
  for (let attempt = 0; ; attempt++) {
    try {
      const sent = await api("POST", `/v1/chats/${chatId}/signals`, { kind: "message", text, nonce });
      upsertSignal(sent);
      return;
    } catch (error) {
      if (error instanceof ApiError || attempt >= 5) {
        $("text").value = text;
        $("send-error").textContent = `Not sent: ${error.message}`;
        return;
      }
      await new Promise((resolve) => setTimeout(resolve, 500 * 2 ** attempt));
    }
  }
});

function upsertSignal(signal) {
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

// ---- Live events ----

async function connect() {
  state.events?.close();
  let url = "/v1/events";
  try {
    const issued = await api("POST", "/v1/events/ticket");
    url += `?ticket=${encodeURIComponent(issued.ticket)}`;
    if (state.lastEventId) url += `&last_event_id=${encodeURIComponent(state.lastEventId)}`;
  } catch (error) {
    setLive(false);
    setTimeout(connect, 2000);
    return;
  }
  const events = new EventSource(url);
  state.events = events;
  events.onopen = () => setLive(true);
  events.onerror = () => {
    setLive(false);
    // The browser reconnects by itself (with Last-Event-ID); a stream it gave up on needs a
    // fresh ticket.
    if (events.readyState === EventSource.CLOSED && state.events === events) setTimeout(connect, 1000);
  };
  const on = (type, handle) =>
    events.addEventListener(type, (event) => {
      if (event.lastEventId) state.lastEventId = event.lastEventId;
      const message = JSON.parse(event.data || "{}");
      handle(message.data, message.chat_id);
    });
  // A fresh stream's `ready` names where it starts: resuming from there misses nothing.
  on("ready", () => {});
  on("signal.created", async (signal) => {
    // A chat new to this page is read whole, its unread count with it.
    const known = state.chats.has(signal.chat_id);
    if (!known) await loadChats();
    const chat = state.chats.get(signal.chat_id);
    if (!chat) return;
    const counted = !known || (chat.latest_signal && chat.latest_signal.id >= signal.id);
    if (!counted && signal.chat_id !== state.open && signal.author_id !== state.me.id) {
      chat.unread_count = (chat.unread_count || 0) + 1;
    }
    upsertSignal(signal);
    if (signal.chat_id === state.open && signal.author_id !== state.me.id) markRead();
  });
  on("signal.updated", upsertSignal);
  on("signal.deleted", upsertSignal);
  const reaction = (change) => {
    const signal = state.messages.get(change.signal_id);
    if (!signal) return;
    signal.reactions = { ...(signal.reactions || {}), [change.emoji]: change.count };
    renderMessages();
  };
  on("reaction.added", reaction);
  on("reaction.removed", reaction);
  on("read.updated", (change, chatId) => {
    if (!change || chatId !== state.open) return;
    const current = state.seen.get(change.user_id);
    state.seen.set(change.user_id, current ? newer(current, change.up_to) : change.up_to);
    learnUser(change.user_id);
    renderSeen();
  });
  on("member.joined", () => loadChats());
  on("member.left", () => loadChats());
  on("chat.updated", () => loadChats());
  // The server could not replay what was missed: read everything again.
  on("reset", async () => {
    await loadChats();
    if (state.open) await openChat(state.open);
  });
}

function setLive(live) {
  const badge = $("connection");
  badge.textContent = live ? "live" : "offline";
  badge.classList.toggle("live", live);
}

// A dropped network does not always end an open stream at once: end it, and resume from the last
// event id when the network is back.
window.addEventListener("offline", () => {
  state.events?.close();
  setLive(false);
});
window.addEventListener("online", () => {
  if (session.token && state.me) connect();
});

document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") markRead();
});

start();
