//! Events on the Kafka topics (DESIGN §6). Every event is JSON wrapped in a
//! versioned [`Envelope`] (`{"v":1,"event":{...}}`) so `kcat` shows it as text and
//! a consumer can refuse a version it does not know.
//!
//! Enums are externally tagged (`{"message":{...}}`) rather than internally
//! tagged: serde buffers internally tagged content, and the opaque message body
//! is a borrowed-through [`RawValue`] that must not be re-parsed.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::id::{ChatKind, ClientId, DeviceId, Mid, UserId};
use crate::WireError;

/// The event format version this build writes and reads.
pub const VERSION: u32 = 1;

/// A message once the server accepted it: what travels through every topic, what
/// the inbox stores, and what the recipient receives (see
/// [`crate::frame::MessageFrame`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub mid: Mid,
    /// The sender's own id for the message.
    pub id: ClientId,
    pub from: UserId,
    /// The device the sender used, so a sender's other devices can be told apart.
    pub from_device: DeviceId,
    /// A user id for direct chats.
    pub to: String,
    pub chat: ChatKind,
    /// Opaque to the server: relayed exactly as the client sent it.
    pub body: Box<RawValue>,
    /// When the server accepted the message, in milliseconds since the Unix epoch.
    pub ts: u64,
}

/// An ack from one device for mids it has stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub user: UserId,
    pub device: DeviceId,
    pub mids: Vec<Mid>,
}

/// A device's socket, as a gateway registered it. A reconnect is a new
/// connection, so events about an older socket can be told apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Connected {
    pub user: UserId,
    pub device: DeviceId,
    pub connection: String,
}

/// Where a device's push notifications go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Platform {
    Android,
    Ios,
    Web,
}

/// A device registered (or replaced) its push token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushToken {
    pub user: UserId,
    pub device: DeviceId,
    pub token: String,
    pub platform: Platform,
}

/// `dak.inbound`, keyed by the sender: everything clients send.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InboundEvent {
    Message(Message),
    Ack(Ack),
    /// A device connected: its stored inbox is to be replayed before anything new.
    Connected(Connected),
    PushToken(PushToken),
}

/// `dak.deliver`, keyed by the recipient user: deliveries and acks for that user
/// in one ordered stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliverEvent {
    Message(Delivery),
    Ack(Ack),
    /// A device connected; session asks persistence to replay its inbox.
    Connected(Connected),
    /// Persistence replayed the inbox to this connection and sent `sync.done`;
    /// from here on, session delivers to it directly.
    Replayed(Connected),
}

/// One message to every device of `recipient`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub recipient: UserId,
    pub message: Message,
}

/// Why a message went to the offline inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfflineReason {
    /// The device was not connected when the message was routed.
    NotConnected,
    /// The device was connected but did not ack after every retry.
    AckTimeout,
    /// The user has no device yet: the message waits in the user-level inbox.
    NoDevice,
}

/// `dak.offline`, keyed by the recipient user: what persistence stores and drops,
/// and what push wakes devices for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OfflineEvent {
    /// Keep `message` for `device` (or for the user when `device` is absent)
    /// until that device acks it.
    Store {
        user: UserId,
        device: Option<DeviceId>,
        reason: OfflineReason,
        message: Message,
    },
    /// The device acked these mids: drop them. May arrive for mids that were
    /// never stored (an ack that raced the offline hand-over), which is harmless.
    Drop(Ack),
    /// Replay the device's inbox to this connection through its gateway, then
    /// send `sync.done` and answer with [`DeliverEvent::Replayed`]. Ordered after
    /// every `store` session published for the user before it.
    Replay {
        connected: Connected,
        gateway_url: String,
    },
    /// For push: the device's token.
    PushToken(PushToken),
}

/// The versioned wrapper every event travels in.
#[derive(Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub v: u32,
    pub event: T,
}

/// Encodes an event for a Kafka record value.
pub fn encode<T: Serialize>(event: &T) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a, T> {
        v: u32,
        event: &'a T,
    }
    serde_json::to_vec(&Out { v: VERSION, event }).expect("events always serialize")
}

/// Decodes a Kafka record value, refusing unknown versions.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    #[derive(Deserialize)]
    struct Version {
        v: u32,
    }
    let envelope: Result<Envelope<T>, _> = serde_json::from_slice(bytes);
    match envelope {
        Ok(e) if e.v == VERSION => Ok(e.event),
        Ok(e) => Err(WireError::bad_request(format!(
            "event version {} is not supported",
            e.v
        ))),
        Err(e) => match serde_json::from_slice::<Version>(bytes) {
            Ok(v) if v.v != VERSION => Err(WireError::bad_request(format!(
                "event version {} is not supported",
                v.v
            ))),
            _ => Err(WireError::bad_request(format!("malformed event: {e}"))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> Message {
        Message {
            mid: Mid::from_ulid(ulid::Ulid::new()),
            id: ClientId::parse("c-1").unwrap(),
            from: UserId::parse("alice").unwrap(),
            from_device: DeviceId::parse("phone").unwrap(),
            to: "bob".into(),
            chat: ChatKind::Direct,
            body: RawValue::from_string(r#"{"cipher":"AAEC"}"#.into()).unwrap(),
            ts: 1732380000123,
        }
    }

    #[test]
    fn events_round_trip_with_the_body_untouched() {
        let m = message();
        let bytes = encode(&DeliverEvent::Message(Delivery {
            recipient: UserId::parse("bob").unwrap(),
            message: m.clone(),
        }));
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with(r#"{"v":1,"event":{"message":"#), "{text}");
        let DeliverEvent::Message(d) = decode::<DeliverEvent>(&bytes).unwrap() else {
            panic!("expected a delivery");
        };
        assert_eq!(d.message.mid, m.mid);
        assert_eq!(d.message.body.get(), r#"{"cipher":"AAEC"}"#);
    }

    #[test]
    fn offline_events_round_trip() {
        let ev = OfflineEvent::Store {
            user: UserId::parse("bob").unwrap(),
            device: Some(DeviceId::parse("tablet").unwrap()),
            reason: OfflineReason::AckTimeout,
            message: message(),
        };
        let back: OfflineEvent = decode(&encode(&ev)).unwrap();
        assert!(matches!(
            back,
            OfflineEvent::Store {
                reason: OfflineReason::AckTimeout,
                ..
            }
        ));
    }

    #[test]
    fn unknown_versions_and_garbage_are_refused() {
        let err = decode::<InboundEvent>(br#"{"v":2,"event":{"something":{}}}"#).unwrap_err();
        assert_eq!(err.message, "event version 2 is not supported");
        let err = decode::<InboundEvent>(b"not json").unwrap_err();
        assert!(
            err.message.starts_with("malformed event"),
            "{}",
            err.message
        );
    }
}
