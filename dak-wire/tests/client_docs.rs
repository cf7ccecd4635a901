//! Every JSON example in docs/clients.md is a frame dak reads or writes, and
//! every example in docs/asyncapi.yaml matches its schema there and is a frame
//! or an event dak reads or writes.
//!
//! Each ```json block there follows a `<!-- frames: client -->` or
//! `<!-- frames: server -->` line and holds one frame per line. A client frame
//! must parse with [`ClientFrame::parse`], as the gateways parse what clients
//! send, and name no field that frame type does not read. A server frame is
//! built again from its fields with dak's wire types and written with
//! [`ServerFrame::to_json`]: the result must be the example, field for field.

use dak_wire::frame::MessageFrame;
use dak_wire::group::SystemEvent;
use dak_wire::{
    ChatKind, ClientFrame, ClientId, DeviceId, ErrorCode, GroupId, Limits, Mid, ReceiptState,
    ServerFrame, UserId,
};
use serde_json::value::RawValue;
use serde_json::Value;

const CLIENTS_MD: &str = include_str!("../../docs/clients.md");

#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    Client,
    Server,
}

/// (side, line number, frame) for every line of every ```json block.
fn examples(doc: &str) -> Vec<(Side, usize, &str)> {
    let mut found = Vec::new();
    let mut side = None;
    let mut lines = doc.lines().enumerate();
    while let Some((n, line)) = lines.next() {
        match line.trim() {
            "<!-- frames: client -->" => side = Some(Side::Client),
            "<!-- frames: server -->" => side = Some(Side::Server),
            "```json" => {
                let side = side
                    .take()
                    .unwrap_or_else(|| panic!("line {}: a ```json block with no `<!-- frames: client|server -->` line before it", n + 1));
                for (n, line) in lines.by_ref() {
                    if line.trim() == "```" {
                        break;
                    }
                    if !line.trim().is_empty() {
                        found.push((side, n + 1, line));
                    }
                }
            }
            "" => {}
            _ => side = None,
        }
    }
    found
}

/// The fields each client frame type reads (dak-wire's `RawFrame`).
fn client_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "message" => &["type", "id", "to", "chat", "body", "ephemeral"],
        "ack" => &["type", "mids"],
        "receipt" => &["type", "id", "mid", "to", "state"],
        "typing" => &["type", "to", "chat"],
        "ping" => &["type"],
        "group.create" => &["type", "id", "group", "name", "members"],
        "group.add" => &["type", "id", "group", "members"],
        "group.remove" => &["type", "id", "group", "user"],
        "group.leave" => &["type", "id", "group"],
        "group.rename" => &["type", "id", "group", "name"],
        _ => &[],
    }
}

fn check_client(frame: &str) -> Result<(), String> {
    let sender = UserId::parse("alice").unwrap();
    ClientFrame::parse(frame, &sender, &Limits::default())
        .map_err(|refusal| format!("refused: {:?}", refusal.error))?;
    let value: Value = serde_json::from_str(frame).map_err(|e| e.to_string())?;
    let kind = value["type"].as_str().unwrap_or_default();
    let known = client_fields(kind);
    for field in value.as_object().ok_or("not an object")?.keys() {
        if !known.contains(&field.as_str()) {
            return Err(format!("`{kind}` frames have no field `{field}`"));
        }
    }
    Ok(())
}

fn check_server(frame: &str) -> Result<(), String> {
    let value: Value = serde_json::from_str(frame).map_err(|e| e.to_string())?;
    let rebuilt: Value = serde_json::from_str(&server_frame(&value)?).unwrap();
    if rebuilt == value {
        Ok(())
    } else {
        Err(format!("dak writes this frame as {rebuilt}"))
    }
}

/// The frame dak writes for the fields of `v`, each parsed with its wire type.
fn server_frame(v: &Value) -> Result<String, String> {
    let text = |k: &str| -> Result<String, String> {
        v[k].as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("field `{k}` is missing or not a string"))
    };
    let typed = |k: &str| -> Result<Value, String> {
        v.get(k)
            .cloned()
            .ok_or_else(|| format!("field `{k}` is missing"))
    };
    let ts = || {
        v["ts"]
            .as_u64()
            .ok_or("field `ts` is missing or not a number")
    };
    let mid = |k: &str| Mid::parse(&text(k)?).map_err(|e| e.message);
    let user = |k: &str| UserId::parse(text(k)?).map_err(|e| e.message);
    let client_id = || ClientId::parse(text("id")?).map_err(|e| e.message);
    let chat = || -> Result<ChatKind, String> {
        serde_json::from_value(typed("chat")?).map_err(|e| e.to_string())
    };
    let to = |chat: ChatKind| -> Result<String, String> {
        let to = text("to")?;
        match chat {
            ChatKind::Direct => UserId::parse(to).map(String::from),
            ChatKind::Group => GroupId::parse(to).map(String::from),
        }
        .map_err(|e| e.message)
    };
    let json = match v["type"].as_str().unwrap_or_default() {
        "accepted" => ServerFrame::Accepted {
            id: &client_id()?,
            mid: mid("mid")?,
            ts: ts()?,
        }
        .to_json(),
        "message" => {
            let chat = chat()?;
            let body = v
                .get("body")
                .map(|body| RawValue::from_string(body.to_string()).unwrap());
            let system: Option<SystemEvent> = match v.get("system") {
                Some(s) => Some(serde_json::from_value(s.clone()).map_err(|e| e.to_string())?),
                None => None,
            };
            ServerFrame::Message(MessageFrame {
                mid: mid("mid")?,
                id: &client_id()?,
                from: &user("from")?,
                to: &to(chat)?,
                chat,
                body: body.as_deref(),
                system: system.as_ref(),
                ephemeral: v["ephemeral"].as_bool().unwrap_or(false),
                ts: ts()?,
            })
            .to_json()
        }
        "receipt" => {
            let state: ReceiptState =
                serde_json::from_value(typed("state")?).map_err(|e| e.to_string())?;
            ServerFrame::Receipt {
                rid: mid("rid")?,
                mid: mid("mid")?,
                by: &user("by")?,
                device: &DeviceId::parse(text("device")?).map_err(|e| e.message)?,
                state,
                ts: ts()?,
            }
            .to_json()
        }
        "typing" => {
            let chat = chat()?;
            ServerFrame::Typing {
                from: &user("from")?,
                to: &to(chat)?,
                chat,
            }
            .to_json()
        }
        "rejected" => {
            let code: ErrorCode =
                serde_json::from_value(typed("code")?).map_err(|e| e.to_string())?;
            ServerFrame::Rejected {
                mid: mid("mid")?,
                id: &client_id()?,
                code,
                message: &text("message")?,
                ts: ts()?,
            }
            .to_json()
        }
        "error" => {
            let code: ErrorCode =
                serde_json::from_value(typed("code")?).map_err(|e| e.to_string())?;
            let id = v.get("id").map(|_| text("id")).transpose()?;
            ServerFrame::Error {
                code,
                id: id.as_deref(),
                message: &text("message")?,
            }
            .to_json()
        }
        "sync.done" => ServerFrame::SyncDone.to_json(),
        "device.removed" => ServerFrame::DeviceRemoved.to_json(),
        "pong" => ServerFrame::Pong.to_json(),
        other => return Err(format!("dak sends no `{other}` frame")),
    };
    Ok(json)
}

#[test]
fn every_json_example_in_clients_md_is_a_frame_dak_reads_or_writes() {
    let examples = examples(CLIENTS_MD);
    let count = |side| examples.iter().filter(|(s, _, _)| *s == side).count();
    assert!(count(Side::Client) >= 8, "{examples:?}");
    assert!(count(Side::Server) >= 10, "{examples:?}");
    let failures: Vec<String> = examples
        .iter()
        .filter_map(|&(side, line, frame)| {
            let checked = match side {
                Side::Client => check_client(frame),
                Side::Server => check_server(frame),
            };
            checked
                .err()
                .map(|e| format!("docs/clients.md:{line}: {frame}\n  {e}"))
        })
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn the_check_refuses_frames_dak_would_not_read_or_write() {
    let mid = "01JD6Q3R5C8V7B2N4M1K0ZXY9A";
    // Misspelt or missing fields, unknown types and values.
    assert!(check_client(r#"{"type":"ack","mds":[]}"#).is_err());
    assert!(check_client(
        r#"{"type":"message","id":"c-1","to":"bob","chat":"direct","body":1,"from":"eve"}"#
    )
    .is_err());
    assert!(check_client(
        r#"{"type":"message","id":"c-1","to":"bob","chat":"direct","body":1,"colour":"red"}"#
    )
    .is_err());
    assert!(
        check_client(r#"{"type":"message","id":"c-1","to":"bob","chat":"direct","body":1}"#)
            .is_ok()
    );
    let accepted = format!(r#"{{"type":"accepted","id":"c-1","mid":"{mid}","ts":1}}"#);
    assert!(check_server(&accepted).is_ok());
    assert!(check_server(&accepted.replace("\"ts\":1", "\"ts\":1,\"extra\":true")).is_err());
    assert!(check_server(&accepted.replace(mid, "not-a-mid")).is_err());
    assert!(check_server(r#"{"type":"error","code":"teapot","message":"no"}"#).is_err());
    assert!(check_server(r#"{"type":"sync_done"}"#).is_err());
    // A block with no side is refused.
    let unmarked = "text\n\n```json\n{\"type\":\"ping\"}\n```\n";
    assert!(std::panic::catch_unwind(|| examples(unmarked)).is_err());
    let marked = "<!-- frames: client -->\n```json\n{\"type\":\"ping\"}\n```\n";
    assert_eq!(
        examples(marked),
        vec![(Side::Client, 3, "{\"type\":\"ping\"}")]
    );
}

// docs/asyncapi.yaml: the machine-readable schemas of the frames and events.

const ASYNCAPI: &str = include_str!("../../docs/asyncapi.yaml");

fn asyncapi() -> Value {
    serde_yaml::from_str(ASYNCAPI).expect("docs/asyncapi.yaml is YAML")
}

/// The value a local `$ref` (`#/a/b`) points at.
fn resolve<'a>(root: &'a Value, reference: &str) -> &'a Value {
    let pointer = reference
        .strip_prefix('#')
        .unwrap_or_else(|| panic!("only local refs: {reference}"));
    root.pointer(pointer)
        .unwrap_or_else(|| panic!("dangling ref {reference}"))
}

/// Whether `s` matches `pattern`, of the one form the schemas use:
/// `^[class]{m,n}$` or `^[class]{n}$`, the class made of ranges and characters.
fn matches_pattern(pattern: &str, s: &str) -> Result<bool, String> {
    let unsupported = || format!("pattern `{pattern}` is not of the form ^[…]{{m,n}}$");
    let body = pattern
        .strip_prefix("^[")
        .and_then(|p| p.strip_suffix('$'))
        .ok_or_else(unsupported)?;
    let (class, count) = body.split_once("]{").ok_or_else(unsupported)?;
    let count = count.strip_suffix('}').ok_or_else(unsupported)?;
    let (min, max) = match count.split_once(',') {
        Some((a, b)) => (a.parse::<usize>(), b.parse::<usize>()),
        None => (count.parse(), count.parse()),
    };
    let (min, max) = (
        min.map_err(|_| unsupported())?,
        max.map_err(|_| unsupported())?,
    );
    let chars: Vec<char> = class.chars().collect();
    let mut allowed: Vec<(char, char)> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if i + 2 < chars.len() && chars[i + 1] == '-' {
            allowed.push((chars[i], chars[i + 2]));
            i += 3;
        } else {
            allowed.push((chars[i], chars[i]));
            i += 1;
        }
    }
    let n = s.chars().count();
    Ok((min..=max).contains(&n)
        && s.chars()
            .all(|c| allowed.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c))))
}

/// Checks `value` against `schema`, for the JSON Schema keywords the schemas in
/// docs/asyncapi.yaml use; any other keyword is an error, so that the check
/// never passes by ignoring one.
fn validate(root: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    let schema = schema
        .as_object()
        .ok_or(format!("{at}: schema is not an object"))?;
    for (keyword, rule) in schema {
        let fail = |what: String| Err(format!("{at}: {what} (value {value})"));
        match keyword.as_str() {
            "description" => {}
            "$ref" => validate(root, resolve(root, rule.as_str().unwrap()), value, at)?,
            "type" => {
                let ok = match rule.as_str().unwrap() {
                    "object" => value.is_object(),
                    "string" => value.is_string(),
                    "integer" => value.is_u64() || value.is_i64(),
                    "boolean" => value.is_boolean(),
                    "array" => value.is_array(),
                    other => return fail(format!("unknown type {other}")),
                };
                if !ok {
                    return fail(format!("not of type {rule}"));
                }
            }
            "const" if value != rule => return fail(format!("is not {rule}")),
            "enum" if !rule.as_array().unwrap().contains(value) => {
                return fail(format!("is not one of {rule}"))
            }
            "const" | "enum" => {}
            "pattern" => {
                let s = value.as_str().unwrap_or_default();
                if !matches_pattern(rule.as_str().unwrap(), s)? {
                    return fail(format!("does not match {rule}"));
                }
            }
            "minLength" | "maxLength" | "minimum" | "maxItems" => {
                let bound = rule.as_u64().unwrap();
                let measured = match keyword.as_str() {
                    "minLength" | "maxLength" => value.as_str().map(|s| s.chars().count() as u64),
                    "maxItems" => value.as_array().map(|a| a.len() as u64),
                    _ => value.as_u64(),
                };
                let ok = measured.is_none_or(|m| match keyword.as_str() {
                    "minLength" | "minimum" => m >= bound,
                    _ => m <= bound,
                });
                if !ok {
                    return fail(format!("breaks {keyword} {bound}"));
                }
            }
            "items" => {
                for (i, item) in value.as_array().into_iter().flatten().enumerate() {
                    validate(root, rule, item, &format!("{at}[{i}]"))?;
                }
            }
            "required" => {
                for field in rule.as_array().unwrap() {
                    let field = field.as_str().unwrap();
                    if value.get(field).is_none() {
                        return fail(format!("lacks required `{field}`"));
                    }
                }
            }
            "properties" => {
                let properties = rule.as_object().unwrap();
                for (field, v) in value.as_object().into_iter().flatten() {
                    match properties.get(field) {
                        Some(s) => validate(root, s, v, &format!("{at}.{field}"))?,
                        None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                            return fail(format!("has no property `{field}`"))
                        }
                        None => {}
                    }
                }
            }
            "additionalProperties" => {}
            "oneOf" => {
                let matched = rule
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|s| validate(root, s, value, at).is_ok())
                    .count();
                if matched != 1 {
                    return fail(format!("matches {matched} of oneOf, not 1"));
                }
            }
            other => return fail(format!("keyword `{other}` is not checked")),
        }
    }
    Ok(())
}

/// Decodes an event as dak's consumer of `topic` does, and writes it again.
fn round_trip_event(topic: &str, payload: &Value) -> Result<Value, String> {
    use dak_wire::event::{
        self, DeliverEvent, GroupEvent, InboundEvent, OfflineEvent, StatusEvent,
    };
    fn again<T: serde::Serialize + serde::de::DeserializeOwned>(
        bytes: &[u8],
    ) -> Result<Value, String> {
        let decoded: T = event::decode(bytes).map_err(|e| e.message)?;
        Ok(serde_json::from_slice(&event::encode(&decoded)).unwrap())
    }
    let bytes = serde_json::to_vec(payload).unwrap();
    match topic {
        "dak.inbound" => again::<InboundEvent>(&bytes),
        "dak.group" => again::<GroupEvent>(&bytes),
        "dak.deliver" => again::<DeliverEvent>(&bytes),
        "dak.offline" => again::<OfflineEvent>(&bytes),
        "dak.status" => again::<StatusEvent>(&bytes),
        other => Err(format!("no event type for topic {other}")),
    }
}

#[test]
fn every_example_in_asyncapi_matches_its_schema_and_dak_reads_or_writes_it() {
    let root = asyncapi();
    let direction = |name: &str| -> Option<&'static str> {
        let listed = |operation: &str| {
            root["operations"][operation]["messages"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["$ref"] == format!("#/channels/socket/messages/{name}"))
        };
        match (listed("clientSends"), listed("clientReceives")) {
            (true, false) => Some("client"),
            (false, true) => Some("server"),
            _ => None,
        }
    };
    let mut checked = 0;
    let mut failures = Vec::new();
    for (channel_name, channel) in root["channels"].as_object().unwrap() {
        let address = channel["address"].as_str().unwrap();
        for (name, reference) in channel["messages"].as_object().unwrap() {
            let message = resolve(&root, reference["$ref"].as_str().unwrap());
            let examples = message["examples"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            if examples.is_empty() {
                failures.push(format!("{channel_name}/{name}: no example"));
            }
            for example in examples {
                let payload = &example["payload"];
                let at = format!("{channel_name}/{name}");
                let mut outcome = validate(&root, &message["payload"], payload, &at);
                if outcome.is_ok() {
                    outcome = match (channel_name.as_str(), direction(name)) {
                        ("socket", Some("client")) => check_client(&payload.to_string()),
                        ("socket", Some("server")) => check_server(&payload.to_string()),
                        ("socket", _) => Err("in neither clientSends nor clientReceives".into()),
                        _ => round_trip_event(address, payload).and_then(|again| {
                            if &again == payload {
                                Ok(())
                            } else {
                                Err(format!("dak writes it as {again}"))
                            }
                        }),
                    };
                }
                match outcome {
                    Ok(()) => checked += 1,
                    Err(e) => failures.push(format!("{at}: {payload}\n  {e}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    assert!(checked >= 30, "only {checked} examples");
}

#[test]
fn the_schemas_list_every_error_code_and_status_step_dak_has() {
    let root = asyncapi();
    let listed = |pointer: &str| -> Vec<String> {
        root.pointer(pointer)
            .unwrap_or_else(|| panic!("{pointer}"))
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let codes: Vec<String> = ErrorCode::ALL
        .iter()
        .map(|c| c.as_str().to_owned())
        .collect();
    assert_eq!(listed("/components/schemas/ErrorCode/enum"), codes);
    let steps: Vec<String> = dak_wire::event::DeviceStep::ALL
        .iter()
        .map(|s| s.as_str().to_owned())
        .collect();
    assert_eq!(
        listed("/components/schemas/StatusStep/oneOf/1/properties/device/properties/step/enum"),
        steps
    );
}

#[test]
fn the_schema_check_refuses_what_breaks_a_schema() {
    let root = asyncapi();
    let accepted = &root["components"]["messages"]["ServerAccepted"]["payload"];
    let ok =
        serde_json::json!({"type":"accepted","id":"c-1","mid":"01JD6Q3R5C8V7B2N4M1K0ZXY9A","ts":1});
    assert_eq!(validate(&root, accepted, &ok, "ok"), Ok(()));
    for bad in [
        serde_json::json!({"type":"accepted","id":"c-1","mid":"01JD6Q3R5C8V7B2N4M1K0ZXY9A"}),
        serde_json::json!({"type":"accepted","id":"c 1","mid":"01JD6Q3R5C8V7B2N4M1K0ZXY9A","ts":1}),
        serde_json::json!({"type":"accepted","id":"c-1","mid":"01jd6q3r5c8v7b2n4m1k0zxy9a","ts":1}),
        serde_json::json!({"type":"accepted","id":"c-1","mid":"01JD6Q3R5C8V7B2N4M1K0ZXY9A","ts":"1"}),
        serde_json::json!({"type":"accepted","id":"c-1","mid":"01JD6Q3R5C8V7B2N4M1K0ZXY9A","ts":1,"x":1}),
        serde_json::json!({"type":"acepted","id":"c-1","mid":"01JD6Q3R5C8V7B2N4M1K0ZXY9A","ts":1}),
    ] {
        assert!(validate(&root, accepted, &bad, "bad").is_err(), "{bad}");
    }
    let status = &root["components"]["messages"]["StatusEvent"]["payload"];
    let two_kinds = serde_json::json!({"v":1,"event":{"read":{},"accepted":{}}});
    assert!(validate(&root, status, &two_kinds, "bad").is_err());
}
