//! The WebSocket client protocol (DESIGN §4): JSON text frames.
//!
//! [`ClientFrame::parse`] is the single place where client input is checked:
//! size limits, JSON shape, ids, and that nobody speaks for another user. Every
//! refusal is a [`WireError`] whose message names what was wrong, so a client
//! developer can fix it from the error alone.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::event::Message;
use crate::id::{ChatKind, ClientId, Mid, UserId};
use crate::{ErrorCode, WireError};

/// Size limits on client input. Both are configurable; these are DESIGN's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest message `body`, in bytes of its JSON encoding.
    pub max_body_bytes: usize,
    /// The largest WebSocket frame, in bytes.
    pub max_frame_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            max_frame_bytes: 96 * 1024,
        }
    }
}

/// Most mids one ack may carry.
pub const MAX_ACK_MIDS: usize = 1000;

/// A message as a client submits it, before the server gives it a mid.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub id: ClientId,
    pub to: UserId,
    pub chat: ChatKind,
    pub body: Box<RawValue>,
}

/// What a client may send.
#[derive(Debug, Clone)]
pub enum ClientFrame {
    Message(Outgoing),
    Ack { mids: Vec<Mid> },
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
                let message = Outgoing::from_fields(raw.id, raw.to, raw.chat, raw.body, limits)?;
                Ok(ClientFrame::Message(message))
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
        let to = UserId::parse(to.ok_or_else(|| WireError::bad_request("field `to` is missing"))?)?;
        let chat = chat.unwrap_or(ChatKind::Direct);
        if chat == ChatKind::Group {
            return Err(WireError::bad_request(
                "group chats are not available on this server yet",
            ));
        }
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
        })
    }
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
    #[serde(rename = "sync.done")]
    SyncDone,
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
    pub body: &'a RawValue,
    pub ts: u64,
}

impl<'a> From<&'a Message> for MessageFrame<'a> {
    fn from(m: &'a Message) -> Self {
        MessageFrame {
            mid: m.mid,
            id: &m.id,
            from: &m.from,
            to: m.to.as_str(),
            chat: m.chat,
            body: &m.body,
            ts: m.ts,
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
        assert_eq!(m.to.as_str(), "bob");
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
            body: RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap(),
            ts: 7,
        };
        let json: serde_json::Value =
            serde_json::from_str(&ServerFrame::Message(MessageFrame::from(&message)).to_json())
                .unwrap();
        assert_eq!(
            json,
            serde_json::json!({"type":"message","mid":mid.to_string(),"id":"c-17","from":"alice",
                "to":"bob","chat":"direct","body":{"text":"hi"},"ts":7})
        );
        assert_eq!(ServerFrame::SyncDone.to_json(), r#"{"type":"sync.done"}"#);
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
