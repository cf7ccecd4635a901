//! Every JSON example in docs/clients.md is a frame dak reads or writes.
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
