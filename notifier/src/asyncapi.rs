//! The AsyncAPI 3 description of the events (`GET /v1/asyncapi.json`), generated from the same
//! types the events are serialised from: each message's payload is the schema of an [`Event`]
//! variant, so a new kind of event is described as soon as it exists.

use confab_schema::Event;

use crate::hub::REPLACED;
use serde_json::{Map, Value, json};
use utoipa::{PartialSchema, ToSchema};

/// The event types the document describes, in the order of [`Event`]'s variants.
pub fn event_types() -> Vec<String> {
    variants()
        .iter()
        .filter_map(|variant| variant["properties"]["type"]["enum"][0].as_str())
        .map(str::to_owned)
        .collect()
}

/// One JSON schema per [`Event`] variant: `{"type": <name>, "data": <payload>}` (the messages add
/// `chat_id`).
fn variants() -> Vec<Value> {
    let schema = serde_json::to_value(Event::schema()).unwrap_or(Value::Null);
    schema["oneOf"].as_array().cloned().unwrap_or_default()
}

/// The schemas the variants refer to, by name.
fn components() -> Map<String, Value> {
    let mut schemas = Vec::new();
    <Event as ToSchema>::schemas(&mut schemas);
    let mut components = Map::new();
    for (name, schema) in schemas {
        components.insert(name, serde_json::to_value(schema).unwrap_or(Value::Null));
    }
    components
}

/// A variant's schema with the `chat_id` every event carries beside its `type` and `data`.
fn with_chat_id(mut variant: Value) -> Value {
    if let Some(properties) = variant["properties"].as_object_mut() {
        properties.insert(
            "chat_id".into(),
            json!({"type": "string", "format": "uuid", "description": "The chat the event belongs to."}),
        );
    }
    if let Some(required) = variant["required"].as_array_mut() {
        required.push(json!("chat_id"));
    }
    variant
}

fn message_name(event_type: &str) -> String {
    event_type.replace('.', "_")
}

fn channel_refs(names: &[&str]) -> Vec<Value> {
    names
        .iter()
        .map(|n| json!({"$ref": format!("#/channels/socket/messages/{n}")}))
        .collect()
}

pub fn document() -> Value {
    let mut messages = Map::new();
    let mut sse_messages = Map::new();
    let mut ws_event_types = Vec::new();
    for variant in variants() {
        let Some(event_type) = variant["properties"]["type"]["enum"][0].as_str() else {
            continue;
        };
        let name = message_name(event_type);
        let ephemeral = matches!(
            event_type,
            "typing" | "user.connected" | "user.disconnected" | "presence.updated" | "call.signal"
        );
        messages.insert(
            name.clone(),
            json!({
                "name": event_type,
                "title": event_type,
                "summary": if ephemeral {
                    "Ephemeral: delivered live only, without an id, never replayed."
                } else {
                    "Logged: carries an id (its sequence) a client resumes from."
                },
                "payload": with_chat_id(variant.clone()),
            }),
        );
        sse_messages.insert(
            name.clone(),
            json!({"$ref": format!("#/components/messages/{name}")}),
        );
        ws_event_types.push(Value::String(event_type.to_owned()));
    }
    let frame = |properties: Value, required: &[&str]| json!({"type": "object", "required": required, "properties": properties});
    let ws_frames = json!({
        "ws_event": {"name": "event", "summary": "An event: the `type`, `chat_id` and `data` of an SSE event, with its id (absent for ephemeral ones).",
            "payload": frame(json!({"type": {"const": "event"}, "id": {"type": "string"}, "event": {"type": "string", "enum": ws_event_types}, "chat_id": {"type": "string", "format": "uuid"}, "data": {}}), &["type", "event", "chat_id", "data"])},
        "ws_ready": {"name": "ready", "summary": "The stream is live. A fresh stream's carries the id it starts after: a client resumes from it until its first event. A resumed stream's has none.",
            "payload": frame(json!({"type": {"const": "ready"}, "id": {"type": "string"}}), &["type"])},
        "ws_reset": {"name": "reset", "summary": "The stream could not resume: re-read the chat list and history. Its id is the position the stream now stands at: the client resumes from it until its next event.",
            "payload": frame(json!({"type": {"const": "reset"}, "id": {"type": "string"}, "reason": {"type": "string", "enum": ["expired", "unknown-id", "too-far-behind"]}}), &["type", "id", "reason"])},
        "ws_response": {"name": "response", "payload": frame(json!({"type": {"const": "response"}, "id": {"type": ["string", "number"]}, "status": {"type": "integer"}, "body": {}}), &["type", "id", "status"])},
        "ws_auth_accepted": {"name": "auth", "payload": frame(json!({"type": {"const": "auth"}, "expires_at": {"type": "string", "format": "date-time"}}), &["type"])},
        "ws_error": {"name": "error", "payload": frame(json!({"type": {"const": "error"}, "problem": {"type": "object"}}), &["type", "problem"])},
        "ws_request": {"name": "request", "summary": "An API call, answered by a `response` with the same id.",
            "payload": frame(json!({"type": {"const": "request"}, "id": {"type": ["string", "number"]}, "method": {"type": "string", "enum": ["GET", "POST", "PUT", "PATCH", "DELETE"]}, "path": {"type": "string", "pattern": "^/v1/"}, "body": {}}), &["type", "id", "method", "path"])},
        "ws_auth": {"name": "auth", "summary": "A fresh token for the same user.",
            "payload": frame(json!({"type": {"const": "auth"}, "token": {"type": "string"}}), &["type", "token"])},
        "ws_resume": {"name": "resume", "payload": frame(json!({"type": {"const": "resume"}, "last_event_id": {"type": ["string", "integer"]}}), &["type", "last_event_id"])},
    });
    let ws_frames = ws_frames.as_object().cloned().unwrap_or_default();
    // The SSE stream's own events, beside the events of the log.
    let sse_frames = json!({
        "sse_ready": {"name": "ready", "summary": "The stream is live. A fresh stream's has an `id:`, the position it starts after: a client resumes from it until its first event. A resumed stream's has none.",
            "payload": {"type": "object"}},
        "sse_reset": {"name": "reset", "summary": "The stream could not resume: re-read the chat list and history. Events after it continue normally. Its `id:` is the position the stream now stands at: the client resumes from it until its next event.",
            "payload": frame(json!({"type": {"const": "reset"}, "data": frame(json!({"reason": {"type": "string", "enum": ["expired", "unknown-id", "too-far-behind"]}}), &["reason"])}), &["type", "data"])},
        "sse_closed": {"name": "closed", "summary": "The last event: the server ended the stream. `replaced`: a newer stream of the same user took its place (a user holds at most `notifier.max_connections_per_user` streams on a node, and one more replaces the oldest). The client must not reconnect on its own, which would push out the newer stream in turn; only on its user's action.",
            "payload": frame(json!({"type": {"const": "closed"}, "data": frame(json!({"reason": {"type": "string", "enum": [REPLACED]}}), &["reason"])}), &["type", "data"])},
    });
    for (name, message) in sse_frames.as_object().cloned().unwrap_or_default() {
        sse_messages.insert(
            name.clone(),
            json!({"$ref": format!("#/components/messages/{name}")}),
        );
        messages.insert(name, message);
    }
    let reference = |name: &str| json!({"$ref": format!("#/components/messages/{name}")});
    let mut ws_channel_messages = Map::new();
    for name in ws_frames.keys() {
        ws_channel_messages.insert(name.clone(), reference(name));
    }
    messages.extend(ws_frames);
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "confab events",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Live events over Server-Sent Events (GET /v1/events) and WebSocket (GET /v1/ws, subprotocol confab.v1). Logged events carry an id; a client resumes after the last id it saw (Last-Event-ID, ?last_event_id=, or a resume frame).",
        },
        "channels": {
            "events": {
                "address": "/v1/events",
                "description": "Server-Sent Events: `event:` is the type, `id:` the sequence, `data:` the message payload. `ready` comes first; `closed` (reason `replaced`) ends a stream a newer one of the same user replaced.",
                "messages": sse_messages,
            },
            "socket": {
                "address": "/v1/ws",
                "description": "JSON text frames both ways. The server closes the socket with code 4001 when its token expires (send a fresh one in an `auth` frame before), 4003 for a token of another user, and 4009 (reason `replaced`) when a newer stream of the same user took its place (a user holds at most `notifier.max_connections_per_user` streams on a node, and one more replaces the oldest): the client must not reconnect on its own then, only on its user's action. A socket the server closes without a code resumes with its last event id.",
                "messages": ws_channel_messages,
            },
        },
        "operations": {
            "receiveEvents": {"action": "receive", "channel": {"$ref": "#/channels/events"}},
            "receiveFrames": {"action": "receive", "channel": {"$ref": "#/channels/socket"},
                "messages": channel_refs(&["ws_event", "ws_ready", "ws_reset", "ws_response", "ws_auth_accepted", "ws_error"])},
            "sendFrames": {"action": "send", "channel": {"$ref": "#/channels/socket"},
                "messages": channel_refs(&["ws_request", "ws_auth", "ws_resume"])},
        },
        "components": {
            "messages": messages,
            "schemas": components(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_is_a_message_with_its_payload_schemas() {
        let document = document();
        let types = event_types();
        assert!(types.len() >= 15, "{types:?}");
        for event_type in &types {
            let message = &document["components"]["messages"][message_name(event_type)];
            assert_eq!(message["name"], event_type.as_str());
            let data = &message["payload"]["properties"]["data"]["$ref"];
            let schema = data
                .as_str()
                .and_then(|r| r.strip_prefix("#/components/schemas/"))
                .unwrap_or_else(|| panic!("{event_type} refers to its payload: {message}"));
            assert!(
                document["components"]["schemas"][schema].is_object(),
                "{schema} is described"
            );
        }
    }

    #[test]
    fn the_streams_own_events_are_described() {
        let document = document();
        let sse = &document["channels"]["events"]["messages"];
        for (name, event) in [
            ("sse_ready", "ready"),
            ("sse_reset", "reset"),
            ("sse_closed", "closed"),
        ] {
            assert!(sse[name].is_object(), "{name} is on the SSE channel");
            assert_eq!(document["components"]["messages"][name]["name"], event);
        }
        let closed = &document["components"]["messages"]["sse_closed"]["payload"];
        assert_eq!(
            closed["properties"]["data"]["properties"]["reason"]["enum"],
            serde_json::json!(["replaced"])
        );
        let socket = document["channels"]["socket"]["description"]
            .as_str()
            .unwrap_or_default();
        assert!(socket.contains("4009 (reason `replaced`)"), "{socket}");
    }
}
