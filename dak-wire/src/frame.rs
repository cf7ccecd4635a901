//! The WebSocket client protocol (DESIGN §4): JSON text frames.
//!
//! [`ClientFrame::parse`] is the single place where client input is checked:
//! size limits, JSON shape, ids, and that nobody speaks for another user. Every
//! refusal is a [`WireError`] whose message names what was wrong, so a client
//! developer can fix it from the error alone.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::event::{Message, Notice, ReceiptState};
use crate::group::{self, GroupOp, SystemEvent};
use crate::id::{ChatKind, ClientId, DeviceId, GroupId, Mid, UserId};
use crate::{ErrorCode, WireError};

/// Size limits on client input. Both are configurable; these are DESIGN's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest message `body`, in bytes of its JSON encoding.
    pub max_body_bytes: usize,
    /// The largest WebSocket frame, in bytes.
    pub max_frame_bytes: usize,
    /// The most members a group may have.
    pub max_group_members: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            max_frame_bytes: 96 * 1024,
            max_group_members: 1024,
        }
    }
}

/// Most mids one ack may carry.
pub const MAX_ACK_MIDS: usize = 1000;

/// A message as a client submits it, before the server gives it a mid.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub id: ClientId,
    /// A user id for a direct chat, a group id for a group chat.
    pub to: String,
    pub chat: ChatKind,
    pub body: Box<RawValue>,
    pub ephemeral: bool,
}

/// A group command as a client submits it, before the server gives it a mid.
#[derive(Debug, Clone)]
pub struct GroupRequest {
    pub id: ClientId,
    pub group: GroupId,
    pub op: GroupOp,
}

/// A read receipt as a client submits it.
#[derive(Debug, Clone)]
pub struct ReceiptRequest {
    /// When set, the server answers `accepted` with this id once it is durable.
    pub id: Option<ClientId>,
    pub mid: Mid,
    /// The sender of the message that was read.
    pub to: UserId,
    pub state: ReceiptState,
}

/// What a client may send.
#[derive(Debug, Clone)]
pub enum ClientFrame {
    Message(Outgoing),
    Ack { mids: Vec<Mid> },
    Receipt(ReceiptRequest),
    Typing { to: String, chat: ChatKind },
    Group(GroupRequest),
    Ping,
}

/// The fields any client frame may carry; which ones are required depends on `type`.
#[derive(Deserialize)]
struct RawFrame<'a> {
    #[serde(rename = "type")]
    kind: Option<String>,
    id: Option<String>,
    to: Option<String>,
    chat: Option<ChatKind>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
    from: Option<String>,
    mids: Option<Vec<String>>,
    ephemeral: Option<bool>,
    mid: Option<String>,
    state: Option<String>,
    group: Option<String>,
    name: Option<String>,
    members: Option<Vec<String>>,
    user: Option<String>,
}

/// A refused frame: the error and, when it could be read, the client's message id
/// so the client knows which outbox entry it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub error: WireError,
    pub id: Option<String>,
}

impl ClientFrame {
    /// Parses one text frame from `sender`. `from` is never taken from the client:
    /// a frame that names another sender is refused as `forbidden`.
    pub fn parse(text: &str, sender: &UserId, limits: &Limits) -> Result<Self, Refusal> {
        if text.len() > limits.max_frame_bytes {
            return Err(Refusal {
                error: WireError::too_large(format!(
                    "frame is {} bytes, the limit is {}",
                    text.len(),
                    limits.max_frame_bytes
                )),
                id: None,
            });
        }
        let raw: RawFrame = serde_json::from_str(text).map_err(|e| Refusal {
            error: WireError::bad_request(format!("malformed JSON: {e}")),
            id: None,
        })?;
        let id = raw.id.clone();
        Self::from_raw(raw, sender, limits).map_err(|error| Refusal { error, id })
    }

    fn from_raw(raw: RawFrame, sender: &UserId, limits: &Limits) -> Result<Self, WireError> {
        let kind = raw
            .kind
            .ok_or_else(|| WireError::bad_request("field `type` is missing"))?;
        match kind.as_str() {
            "message" => {
                if let Some(from) = &raw.from {
                    if from != sender.as_str() {
                        return Err(WireError::forbidden(
                            "`from` is set by the server from your token; you cannot send as another user",
                        ));
                    }
                }
                let mut message =
                    Outgoing::from_fields(raw.id, raw.to, raw.chat, raw.body, limits)?;
                message.ephemeral = raw.ephemeral.unwrap_or(false);
                Ok(ClientFrame::Message(message))
            }
            "receipt" => Ok(ClientFrame::Receipt(ReceiptRequest::from_fields(
                raw.id, raw.mid, raw.to, raw.state,
            )?)),
            "typing" => {
                let chat = raw.chat.unwrap_or(ChatKind::Direct);
                let to = recipient(raw.to, chat)?;
                Ok(ClientFrame::Typing { to, chat })
            }
            "group.create" | "group.add" | "group.remove" | "group.leave" | "group.rename" => {
                let id = ClientId::parse(
                    raw.id
                        .ok_or_else(|| WireError::bad_request("field `id` is missing"))?,
                )?;
                let group = GroupId::parse(
                    raw.group
                        .ok_or_else(|| WireError::bad_request("field `group` is missing"))?,
                )?;
                let op = match &kind["group.".len()..] {
                    "create" => GroupOp::Create {
                        name: group_name(raw.name)?,
                        members: members(raw.members.unwrap_or_default(), limits)?,
                    },
                    "add" => GroupOp::Add {
                        members: members(
                            raw.members.ok_or_else(|| {
                                WireError::bad_request("field `members` is missing")
                            })?,
                            limits,
                        )?,
                    },
                    "remove" => GroupOp::Remove {
                        user: UserId::parse(
                            raw.user
                                .ok_or_else(|| WireError::bad_request("field `user` is missing"))?,
                        )?,
                    },
                    "leave" => GroupOp::Remove {
                        user: sender.clone(),
                    },
                    _ => GroupOp::Rename {
                        name: group_name(raw.name)?,
                    },
                };
                Ok(ClientFrame::Group(GroupRequest { id, group, op }))
            }
            "ack" => {
                let mids = raw
                    .mids
                    .ok_or_else(|| WireError::bad_request("field `mids` is missing"))?;
                Ok(ClientFrame::Ack {
                    mids: parse_mids(&mids)?,
                })
            }
            "ping" => Ok(ClientFrame::Ping),
            other => Err(WireError::bad_request(format!(
                "unknown frame type `{}`",
                other.chars().take(40).collect::<String>()
            ))),
        }
    }
}

impl Outgoing {
    /// Builds a message from the fields shared by the WebSocket frame and the REST
    /// body, applying the same checks to both.
    pub fn from_fields(
        id: Option<String>,
        to: Option<String>,
        chat: Option<ChatKind>,
        body: Option<&RawValue>,
        limits: &Limits,
    ) -> Result<Self, WireError> {
        let id =
            ClientId::parse(id.ok_or_else(|| WireError::bad_request("field `id` is missing"))?)?;
        let chat = chat.unwrap_or(ChatKind::Direct);
        let to = recipient(to, chat)?;
        // serde reads `"body": null` as an absent field.
        let body = body.ok_or_else(|| WireError::bad_request("field `body` is missing or null"))?;
        if body.get().len() > limits.max_body_bytes {
            return Err(WireError::too_large(format!(
                "body is {} bytes, the limit is {}",
                body.get().len(),
                limits.max_body_bytes
            )));
        }
        Ok(Outgoing {
            id,
            to,
            chat,
            body: body.to_owned(),
            ephemeral: false,
        })
    }
}

impl ReceiptRequest {
    /// Builds a receipt from the fields shared by the WebSocket frame and the
    /// REST body. Clients send `read`; `delivered` is the server's to send.
    pub fn from_fields(
        id: Option<String>,
        mid: Option<String>,
        to: Option<String>,
        state: Option<String>,
    ) -> Result<Self, WireError> {
        let id = id.map(ClientId::parse).transpose()?;
        let mid =
            Mid::parse(&mid.ok_or_else(|| WireError::bad_request("field `mid` is missing"))?)?;
        let to = UserId::parse(to.ok_or_else(|| WireError::bad_request("field `to` is missing"))?)?;
        let state = match state.as_deref() {
            Some("read") => ReceiptState::Read,
            Some("delivered") => {
                return Err(WireError::bad_request(
                    "`delivered` receipts are sent by the server when a device acks; clients send `read`",
                ))
            }
            Some(other) => {
                return Err(WireError::bad_request(format!(
                    "unknown receipt state `{}`; clients send `read`",
                    other.chars().take(40).collect::<String>()
                )))
            }
            None => return Err(WireError::bad_request("field `state` is missing")),
        };
        Ok(Self { id, mid, to, state })
    }
}

/// The `to` of a message or typing frame: a user id for a direct chat, a group
/// id for a group chat.
fn recipient(to: Option<String>, chat: ChatKind) -> Result<String, WireError> {
    let to = to.ok_or_else(|| WireError::bad_request("field `to` is missing"))?;
    match chat {
        ChatKind::Direct => UserId::parse(to).map(String::from),
        ChatKind::Group => GroupId::parse(to).map(String::from),
    }
}

/// A group name from a request: required, checked.
pub fn group_name(name: Option<String>) -> Result<String, WireError> {
    let name = name.ok_or_else(|| WireError::bad_request("field `name` is missing"))?;
    group::check_name(&name)?;
    Ok(name)
}

/// The members named in a create or add, each checked, with the group size limit
/// applied to the list itself (the group's own size is group-router's to check).
pub fn members(members: Vec<String>, limits: &Limits) -> Result<Vec<UserId>, WireError> {
    if members.len() > limits.max_group_members {
        return Err(WireError::too_large(format!(
            "{} members in one request, a group holds at most {}",
            members.len(),
            limits.max_group_members
        )));
    }
    let mut users = members
        .into_iter()
        .map(UserId::parse)
        .collect::<Result<Vec<_>, _>>()?;
    users.sort_unstable();
    users.dedup();
    Ok(users)
}

/// Parses a batch of mids from an ack, with the batch limit applied.
pub fn parse_mids(mids: &[String]) -> Result<Vec<Mid>, WireError> {
    if mids.is_empty() {
        return Err(WireError::bad_request("`mids` is empty"));
    }
    if mids.len() > MAX_ACK_MIDS {
        return Err(WireError::too_large(format!(
            "{} mids in one ack, the limit is {MAX_ACK_MIDS}",
            mids.len()
        )));
    }
    mids.iter().map(|m| Mid::parse(m)).collect()
}

/// `sync.done` as encoded: the gateway recognises it among the frames it
/// forwards, to learn that a socket's replay is over.
pub const SYNC_DONE: &str = r#"{"type":"sync.done"}"#;

/// `device.removed` as encoded: the last frame a socket gets when its user
/// removed its device. The gateway recognises it and closes the socket with
/// [`DEVICE_REMOVED_CLOSE`] once it is written.
pub const DEVICE_REMOVED: &str = r#"{"type":"device.removed"}"#;

/// The close code after [`DEVICE_REMOVED`].
pub const DEVICE_REMOVED_CLOSE: u16 = 4001;

/// What the server sends to a client.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Accepted {
        id: &'a ClientId,
        mid: Mid,
        ts: u64,
    },
    Message(MessageFrame<'a>),
    /// `by` (on `device`) received or read `mid`. Acked by its `rid`.
    Receipt {
        rid: Mid,
        mid: Mid,
        by: &'a UserId,
        device: &'a DeviceId,
        state: ReceiptState,
        ts: u64,
    },
    Typing {
        from: &'a UserId,
        to: &'a str,
        chat: ChatKind,
    },
    /// The server could not apply the message or group command `mid` the client
    /// sent as `id`. Acked by `mid`.
    Rejected {
        mid: Mid,
        id: &'a ClientId,
        code: ErrorCode,
        message: &'a str,
        ts: u64,
    },
    /// Written as [`SYNC_DONE`].
    #[serde(rename = "sync.done")]
    SyncDone,
    /// Written as [`DEVICE_REMOVED`].
    #[serde(rename = "device.removed")]
    DeviceRemoved,
    Error {
        code: ErrorCode,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        message: &'a str,
    },
    Pong,
}

/// A message as its recipient sees it. The body is written out as it came in.
#[derive(Debug, Serialize)]
pub struct MessageFrame<'a> {
    pub mid: Mid,
    pub id: &'a ClientId,
    pub from: &'a UserId,
    pub to: &'a str,
    pub chat: ChatKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<&'a RawValue>,
    /// What changed, in a group's system message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<&'a SystemEvent>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
    pub ts: u64,
}

impl<'a> From<&'a Message> for ServerFrame<'a> {
    /// How a client sees a message: a message frame, or the frame of the notice
    /// the server wrote.
    fn from(m: &'a Message) -> Self {
        match &m.notice {
            None | Some(Notice::Group(_)) => ServerFrame::Message(MessageFrame {
                mid: m.mid,
                id: &m.id,
                from: &m.from,
                to: m.to.as_str(),
                chat: m.chat,
                body: m.body.as_deref(),
                system: match &m.notice {
                    Some(Notice::Group(event)) => Some(event),
                    _ => None,
                },
                ephemeral: m.ephemeral,
                ts: m.ts,
            }),
            Some(Notice::Receipt { mid, state }) => ServerFrame::Receipt {
                rid: m.mid,
                mid: *mid,
                by: &m.from,
                device: &m.from_device,
                state: *state,
                ts: m.ts,
            },
            Some(Notice::Typing) => ServerFrame::Typing {
                from: &m.from,
                to: m.to.as_str(),
                chat: m.chat,
            },
            Some(Notice::Rejected { code, message }) => ServerFrame::Rejected {
                mid: m.mid,
                id: &m.id,
                code: *code,
                message,
                ts: m.ts,
            },
        }
    }
}

impl ServerFrame<'_> {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

impl Refusal {
    pub fn to_frame(&self) -> ServerFrame<'_> {
        ServerFrame::Error {
            code: self.error.code,
            id: self.id.as_deref(),
            message: &self.error.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::DeviceId;

    fn alice() -> UserId {
        UserId::parse("alice").unwrap()
    }

    fn parse(text: &str) -> Result<ClientFrame, Refusal> {
        ClientFrame::parse(text, &alice(), &Limits::default())
    }

    fn refusal(text: &str) -> Refusal {
        parse(text).expect_err("frame should be refused")
    }

    #[test]
    fn parses_a_direct_message_and_keeps_the_body_verbatim() {
        let text = r#"{"type":"message","id":"c-17","to":"bob","chat":"direct","body":{"text":"hi", "n": [1, 2]}}"#;
        let ClientFrame::Message(m) = parse(text).unwrap() else {
            panic!("expected a message");
        };
        assert_eq!(m.id.as_str(), "c-17");
        assert_eq!(m.to, "bob");
        assert_eq!(m.chat, ChatKind::Direct);
        assert_eq!(m.body.get(), r#"{"text":"hi", "n": [1, 2]}"#);
    }

    #[test]
    fn chat_defaults_to_direct() {
        let ClientFrame::Message(m) =
            parse(r#"{"type":"message","id":"1","to":"bob","body":"x"}"#).unwrap()
        else {
            panic!("expected a message");
        };
        assert_eq!(m.chat, ChatKind::Direct);
    }

    #[test]
    fn parses_ack_and_ping() {
        let mid = Mid::from_ulid(ulid::Ulid::new());
        let ClientFrame::Ack { mids } =
            parse(&format!(r#"{{"type":"ack","mids":["{mid}"]}}"#)).unwrap()
        else {
            panic!("expected an ack");
        };
        assert_eq!(mids, vec![mid]);
        assert!(matches!(
            parse(r#"{"type":"ping"}"#).unwrap(),
            ClientFrame::Ping
        ));
    }

    #[test]
    fn malformed_json_is_a_bad_request_without_id() {
        let r = refusal(r#"{"type":"message","id":"c-1""#);
        assert_eq!(r.error.code, ErrorCode::BadRequest);
        assert!(
            r.error.message.starts_with("malformed JSON"),
            "{}",
            r.error.message
        );
        assert_eq!(r.id, None);
        assert_eq!(refusal("[1,2]").error.code, ErrorCode::BadRequest);
    }

    #[test]
    fn unknown_or_missing_type_is_a_bad_request() {
        let r = refusal(r#"{"type":"dance","id":"c-2"}"#);
        assert_eq!(r.error.code, ErrorCode::BadRequest);
        assert_eq!(r.error.message, "unknown frame type `dance`");
        assert_eq!(r.id.as_deref(), Some("c-2"));
        assert_eq!(
            refusal(r#"{"id":"c-2"}"#).error.message,
            "field `type` is missing"
        );
    }

    #[test]
    fn missing_fields_are_named() {
        let cases = [
            (
                r#"{"type":"message","to":"bob","body":1}"#,
                "field `id` is missing",
            ),
            (
                r#"{"type":"message","id":"c","body":1}"#,
                "field `to` is missing",
            ),
            (
                r#"{"type":"message","id":"c","to":"bob"}"#,
                "field `body` is missing or null",
            ),
            (
                r#"{"type":"message","id":"c","to":"bob","body":null}"#,
                "field `body` is missing or null",
            ),
            (r#"{"type":"ack"}"#, "field `mids` is missing"),
            (r#"{"type":"ack","mids":[]}"#, "`mids` is empty"),
        ];
        for (text, message) in cases {
            let r = refusal(text);
            assert_eq!(r.error.code, ErrorCode::BadRequest, "{text}");
            assert_eq!(r.error.message, message, "{text}");
        }
    }

    #[test]
    fn invalid_ids_are_refused() {
        for text in [
            r#"{"type":"message","id":"c 1","to":"bob","body":1}"#,
            r#"{"type":"message","id":"c","to":"bob/../x","body":1}"#,
            r#"{"type":"message","id":"c","to":"","body":1}"#,
            r#"{"type":"ack","mids":["nope"]}"#,
        ] {
            assert_eq!(refusal(text).error.code, ErrorCode::BadRequest, "{text}");
        }
    }

    #[test]
    fn wrong_chat_kind_is_refused() {
        assert_eq!(
            refusal(r#"{"type":"message","id":"c","to":"bob","chat":"broadcast","body":1}"#)
                .error
                .code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn oversize_body_and_frame_are_too_large() {
        let limits = Limits {
            max_body_bytes: 10,
            max_frame_bytes: 100,
            ..Limits::default()
        };
        let body = format!(
            r#"{{"type":"message","id":"c","to":"bob","body":"{}"}}"#,
            "x".repeat(20)
        );
        let r = ClientFrame::parse(&body, &alice(), &limits).unwrap_err();
        assert_eq!(r.error.code, ErrorCode::TooLarge);
        assert_eq!(r.id.as_deref(), Some("c"));
        let frame = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(200));
        assert_eq!(
            ClientFrame::parse(&frame, &alice(), &limits)
                .unwrap_err()
                .error
                .code,
            ErrorCode::TooLarge
        );
        // Exactly at the limit is fine.
        let at_limit = r#"{"type":"message","id":"c","to":"bob","body":"12345678"}"#;
        assert!(ClientFrame::parse(at_limit, &alice(), &limits).is_ok());
    }

    #[test]
    fn too_many_mids_in_one_ack() {
        let mid = Mid::from_ulid(ulid::Ulid::new()).to_string();
        let mids = vec![mid; MAX_ACK_MIDS + 1];
        let text = serde_json::json!({"type": "ack", "mids": mids}).to_string();
        assert_eq!(refusal(&text).error.code, ErrorCode::TooLarge);
    }

    #[test]
    fn a_client_cannot_speak_for_someone_else() {
        let r = refusal(r#"{"type":"message","id":"c","to":"bob","from":"mallory","body":1}"#);
        assert_eq!(r.error.code, ErrorCode::Forbidden);
        // Naming yourself is harmless.
        assert!(parse(r#"{"type":"message","id":"c","to":"bob","from":"alice","body":1}"#).is_ok());
    }

    #[test]
    fn group_chats_receipts_and_typing_parse() {
        let ClientFrame::Message(m) = parse(
            r#"{"type":"message","id":"c-18","to":"team-7","chat":"group","body":"hi","ephemeral":true}"#,
        )
        .unwrap() else {
            panic!("expected a message");
        };
        assert_eq!(
            (m.to.as_str(), m.chat, m.ephemeral),
            ("team-7", ChatKind::Group, true)
        );

        let mid = Mid::from_ulid(ulid::Ulid::new());
        let ClientFrame::Receipt(r) = parse(&format!(
            r#"{{"type":"receipt","mid":"{mid}","to":"bob","state":"read"}}"#
        ))
        .unwrap() else {
            panic!("expected a receipt");
        };
        assert_eq!(
            (r.mid, r.to.as_str(), r.state, r.id),
            (mid, "bob", ReceiptState::Read, None)
        );
        for (state, message) in [
            ("delivered", "`delivered` receipts are sent by the server when a device acks; clients send `read`"),
            ("seen", "unknown receipt state `seen`; clients send `read`"),
        ] {
            let text = format!(r#"{{"type":"receipt","mid":"{mid}","to":"bob","state":"{state}"}}"#);
            assert_eq!(refusal(&text).error.message, message);
        }

        let ClientFrame::Typing { to, chat } =
            parse(r#"{"type":"typing","to":"team-7","chat":"group"}"#).unwrap()
        else {
            panic!("expected typing");
        };
        assert_eq!((to.as_str(), chat), ("team-7", ChatKind::Group));
        assert_eq!(
            refusal(r#"{"type":"typing"}"#).error.message,
            "field `to` is missing"
        );
    }

    #[test]
    fn group_commands_parse_and_are_checked() {
        let ClientFrame::Group(g) = parse(
            r#"{"type":"group.create","id":"c-1","group":"team-7","name":"Team 7","members":["carol","bob","bob"]}"#,
        )
        .unwrap() else {
            panic!("expected a group command");
        };
        assert_eq!(g.group.as_str(), "team-7");
        let bob = UserId::parse("bob").unwrap();
        let carol = UserId::parse("carol").unwrap();
        assert_eq!(
            g.op,
            GroupOp::Create {
                name: "Team 7".into(),
                members: vec![bob.clone(), carol]
            },
            "members sorted, each once"
        );
        let ClientFrame::Group(g) =
            parse(r#"{"type":"group.leave","id":"c-2","group":"team-7"}"#).unwrap()
        else {
            panic!("expected a group command");
        };
        assert_eq!(
            g.op,
            GroupOp::Remove { user: alice() },
            "leaving removes yourself"
        );
        let ClientFrame::Group(g) =
            parse(r#"{"type":"group.remove","id":"c-3","group":"team-7","user":"bob"}"#).unwrap()
        else {
            panic!("expected a group command");
        };
        assert_eq!(g.op, GroupOp::Remove { user: bob });

        let limits = Limits {
            max_group_members: 2,
            ..Limits::default()
        };
        let text = r#"{"type":"group.add","id":"c","group":"g","members":["a","b","c"]}"#;
        assert_eq!(
            ClientFrame::parse(text, &alice(), &limits)
                .unwrap_err()
                .error
                .code,
            ErrorCode::TooLarge
        );
        let cases = [
            (
                r#"{"type":"group.add","id":"c","members":["a"]}"#,
                "field `group` is missing",
            ),
            (
                r#"{"type":"group.add","id":"c","group":"g"}"#,
                "field `members` is missing",
            ),
            (
                r#"{"type":"group.rename","id":"c","group":"g","name":"  "}"#,
                "group `name` is empty",
            ),
            (
                r#"{"type":"group.remove","id":"c","group":"g"}"#,
                "field `user` is missing",
            ),
            (
                r#"{"type":"group.create","group":"g","name":"x"}"#,
                "field `id` is missing",
            ),
        ];
        for (text, message) in cases {
            assert_eq!(refusal(text).error.message, message, "{text}");
        }
        for bad in [
            r#"{"type":"group.add","id":"c","group":"no such/group","members":["a"]}"#,
            r#"{"type":"group.add","id":"c","group":"g","members":["not valid"]}"#,
        ] {
            assert_eq!(refusal(bad).error.code, ErrorCode::BadRequest, "{bad}");
        }
    }

    #[test]
    fn notices_have_their_own_frames() {
        use crate::group::SystemKind;
        let bob = UserId::parse("bob").unwrap();
        let phone = DeviceId::parse("phone").unwrap();
        let of = Mid::from_ulid(ulid::Ulid::new());
        let receipt = Message::receipt(of, &alice(), &bob, &phone, ReceiptState::Delivered, 9);
        let json: serde_json::Value =
            serde_json::from_str(&ServerFrame::from(&receipt).to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type":"receipt","rid":receipt.mid.to_string(),"mid":of.to_string(),
                "by":"bob","device":"phone","state":"delivered","ts":9})
        );

        let mut system = receipt.clone();
        system.chat = ChatKind::Group;
        system.to = "team-7".into();
        system.notice = Some(Notice::Group(SystemEvent {
            event: SystemKind::Added,
            users: vec![UserId::parse("dave").unwrap()],
            count: None,
            by: alice(),
            name: None,
        }));
        let json: serde_json::Value =
            serde_json::from_str(&ServerFrame::from(&system).to_json()).unwrap();
        assert_eq!(
            json["system"],
            serde_json::json!({"event":"added","users":["dave"],"by":"alice"})
        );
        assert_eq!(
            (json["type"].as_str(), json.get("body")),
            (Some("message"), None)
        );

        let mut typing = system.clone();
        typing.notice = Some(Notice::Typing);
        assert_eq!(
            ServerFrame::from(&typing).to_json(),
            r#"{"type":"typing","from":"bob","to":"team-7","chat":"group"}"#
        );

        let rejection = Message::rejection(
            of,
            &ClientId::parse("c-9").unwrap(),
            &alice(),
            &phone,
            &WireError::forbidden("you are not a member of group `team-7`"),
            4,
        );
        assert_eq!(rejection.device, Some(phone));
        assert_eq!(
            ServerFrame::from(&rejection.message).to_json(),
            format!(
                r#"{{"type":"rejected","mid":"{of}","id":"c-9","code":"forbidden","message":"you are not a member of group `team-7`","ts":4}}"#
            )
        );
    }

    #[test]
    fn server_frames_have_the_documented_shape() {
        let id = ClientId::parse("c-17").unwrap();
        let mid = Mid::from_ulid(ulid::Ulid::new());
        let accepted = ServerFrame::Accepted {
            id: &id,
            mid,
            ts: 5,
        }
        .to_json();
        assert_eq!(
            accepted,
            format!(r#"{{"type":"accepted","id":"c-17","mid":"{mid}","ts":5}}"#)
        );

        let message = Message {
            mid,
            id: id.clone(),
            from: alice(),
            from_device: DeviceId::default_device(),
            to: "bob".into(),
            chat: ChatKind::Direct,
            body: Some(RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap()),
            ephemeral: false,
            notice: None,
            ts: 7,
        };
        let json: serde_json::Value =
            serde_json::from_str(&ServerFrame::from(&message).to_json()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type":"message","mid":mid.to_string(),"id":"c-17","from":"alice",
                "to":"bob","chat":"direct","body":{"text":"hi"},"ts":7})
        );
        assert_eq!(ServerFrame::SyncDone.to_json(), SYNC_DONE);
        assert_eq!(ServerFrame::DeviceRemoved.to_json(), DEVICE_REMOVED);
        assert_eq!(SYNC_DONE, r#"{"type":"sync.done"}"#);
        assert_eq!(ServerFrame::Pong.to_json(), r#"{"type":"pong"}"#);
        let error = ServerFrame::Error {
            code: ErrorCode::BadRequest,
            id: Some("c-19"),
            message: "field `to` is missing",
        };
        assert_eq!(
            error.to_json(),
            r#"{"type":"error","code":"bad_request","id":"c-19","message":"field `to` is missing"}"#
        );
    }
}
