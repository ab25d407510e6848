// confab's service worker: shows a chat's push notification, closes it when the server withdraws
// it (the messages were read elsewhere), and opens the chat when it is clicked.

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

// One notification per chat: a newer push replaces it (same tag).
const tagOf = (chatId) => `chat:${chatId}`;

// How far each chat's notifications were withdrawn, while this worker runs: a push of messages
// no newer that arrives after its withdrawal (its delivery was retried, or came by another
// route) announces what was read, and is not shown. Signal ids are UUIDv7: as strings, they sort
// by time.
const withdrawnUpTo = new Map();

async function handlePush(push) {
  if (!push?.chat_id) return;
  const tag = tagOf(push.chat_id);
  if (push.type === "withdrawn") {
    if (!(withdrawnUpTo.get(push.chat_id) >= push.up_to)) withdrawnUpTo.set(push.chat_id, push.up_to);
    // Read up to `up_to`: a notification of anything newer stays.
    for (const shown of await self.registration.getNotifications({ tag })) {
      if (!shown.data?.signal_id || shown.data.signal_id <= push.up_to) shown.close();
    }
    return;
  }
  if (push.type !== "messages") return;
  if (push.signal_id && withdrawnUpTo.get(push.chat_id) >= push.signal_id) return;
  const author = push.author_name || "Someone";
  const title = push.count > 1 ? `${author} and others: ${push.count} new messages` : author;
  await self.registration.showNotification(title, {
    tag,
    renotify: true,
    body: push.preview || (push.count > 1 ? "New messages" : "New message"),
    data: { chat_id: push.chat_id, signal_id: push.signal_id },
  });
}

function readPush(event) {
  try {
    return event.data ? event.data.json() : null;
  } catch {
    return null;
  }
}

// An event made by a script rather than the browser cannot be kept alive with waitUntil; its
// work still runs.
function keepAlive(event, work) {
  try {
    event.waitUntil(work);
  } catch {
    work.catch((error) => console.warn("service worker", error));
  }
}

// Pushes are handled one after another, in the order they came, so that a withdrawal right after
// its push finds the notification shown. `pushesHandled` settles when every push so far is done.
self.pushesHandled = Promise.resolve();
self.addEventListener("push", (event) => {
  const push = readPush(event);
  self.pushesHandled = self.pushesHandled
    .then(() => handlePush(push))
    .catch((error) => console.warn("a push was not shown", error));
  keepAlive(event, self.pushesHandled);
});

async function openChat(chatId) {
  const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
  for (const client of windows) {
    client.postMessage({ type: "open-chat", chat_id: chatId });
    if ("focus" in client) return client.focus();
    return client;
  }
  return self.clients.openWindow(`/#chat=${encodeURIComponent(chatId)}`);
}

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  keepAlive(event, openChat(event.notification.data?.chat_id));
});
