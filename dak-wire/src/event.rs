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

use crate::group::{GroupCommand, SystemEvent};
use crate::id::{ChatKind, ClientId, DeviceId, Mid, UserId};
use crate::{ErrorCode, WireError};

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
    /// Opaque to the server: relayed exactly as the client sent it. Absent only
    /// in what the server writes itself (a [`Notice`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Box<RawValue>>,
    /// Reaches connected devices only: never retried, stored or pushed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ephemeral: bool,
    /// Set when the server, not a user, wrote this message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<Notice>,
    /// When the server accepted the message, in milliseconds since the Unix epoch.
    pub ts: u64,
}

/// Messages the server writes. Each travels and is stored like any message, but
/// reaches the client as its own kind of frame (see [`crate::frame::server_frame`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Notice {
    /// A group changed: a `message` frame with `system` and no body.
    Group(SystemEvent),
    /// `from` (on `from_device`) received or read the message `mid`: a `receipt`
    /// frame. Its own mid (the `rid`) is derived from what it reports, so the
    /// same receipt produced twice is one delivery.
    Receipt { mid: Mid, state: ReceiptState },
    /// `from` is typing: a `typing` frame, always ephemeral.
    Typing,
    /// The server could not apply the sender's message or group command `mid`
    /// (this message's own mid): a `rejected` frame to the sending device.
    Rejected { code: ErrorCode, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReceiptState {
    Delivered,
    Read,
}

impl ReceiptState {
    fn as_str(self) -> &'static str {
        match self {
            ReceiptState::Delivered => "delivered",
            ReceiptState::Read => "read",
        }
    }
}

impl Message {
    /// A message a user wrote and a recipient can acknowledge with a receipt:
    /// not a notice, not ephemeral.
    pub fn is_from_user(&self) -> bool {
        self.notice.is_none() && !self.ephemeral
    }

    /// The receipt `by` (on `device`) sends, at `ts`, for `of` — a message that
    /// `by` received from `of.from` — or `None` when `of` takes no receipt
    /// (a notice, an ephemeral message, or the sender's own message on another
    /// of its devices). In a group the receipt goes to the sender only.
    pub fn receipt_for(
        of: &Message,
        by: &UserId,
        device: &DeviceId,
        state: ReceiptState,
        ts: u64,
    ) -> Option<Delivery> {
        if !of.is_from_user() || by == &of.from {
            return None;
        }
        Some(Delivery {
            recipient: of.from.clone(),
            device: None,
            message: Message::receipt(of.mid, &of.from, by, device, state, ts),
        })
    }

    /// A receipt from `by` to `to` about message `mid`.
    pub fn receipt(
        mid: Mid,
        to: &UserId,
        by: &UserId,
        device: &DeviceId,
        state: ReceiptState,
        ts: u64,
    ) -> Message {
        Message {
            mid: receipt_mid(mid, by, device, state),
            id: ClientId::parse("receipt").expect("a valid client id"),
            from: by.clone(),
            from_device: device.clone(),
            to: to.to_string(),
            chat: ChatKind::Direct,
            body: None,
            ephemeral: false,
            notice: Some(Notice::Receipt { mid, state }),
            ts,
        }
    }

    /// Tells the sending device that its message or command `mid` was refused.
    pub fn rejection(
        mid: Mid,
        id: &ClientId,
        to: &UserId,
        device: &DeviceId,
        error: &WireError,
        ts: u64,
    ) -> Delivery {
        Delivery {
            recipient: to.clone(),
            device: Some(device.clone()),
            message: Message {
                mid,
                id: id.clone(),
                from: to.clone(),
                from_device: DeviceId::default_device(),
                to: to.to_string(),
                chat: ChatKind::Direct,
                body: None,
                ephemeral: false,
                notice: Some(Notice::Rejected {
                    code: error.code,
                    message: error.message.clone(),
                }),
                ts,
            },
        }
    }
}

/// The mid of a receipt: the reported message's timestamp (so receipts sort
/// near what they report) and 80 bits of an FNV-1a hash of what they report.
/// Deterministic, so a receipt produced twice (a redelivered ack, or both
/// session and persistence seeing it) is deduplicated like any repeated mid.
fn receipt_mid(mid: Mid, by: &UserId, device: &DeviceId, state: ReceiptState) -> Mid {
    fn fnv1a(seed: u64, parts: &[&[u8]]) -> u64 {
        let mut h = seed;
        for part in parts {
            for b in part.iter().chain(std::iter::once(&0xffu8)) {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }
    let text = mid.to_string();
    let parts: [&[u8]; 4] = [
        text.as_bytes(),
        by.as_str().as_bytes(),
        device.as_str().as_bytes(),
        state.as_str().as_bytes(),
    ];
    let high = fnv1a(0xcbf2_9ce4_8422_2325, &parts);
    let low = fnv1a(0x8422_2325_cbf2_9ce4, &parts);
    let random = (u128::from(high & 0xffff) << 64) | u128::from(low);
    Mid::from_ulid(ulid::Ulid::from_parts(mid.timestamp_ms(), random))
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

/// A device its user removed (`DELETE /v1/devices/{device}`): it gets no
/// copy of anything newer, its stored inbox and its push token go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedDevice {
    pub user: UserId,
    pub device: DeviceId,
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
    /// Create or change a group.
    Group(GroupCommand),
    DeviceRemoved(RemovedDevice),
}

/// `dak.deliver`, keyed by the recipient user: deliveries and acks for that user
/// in one ordered stream.
// Nearly every event is a `Message`: boxing it would add an allocation to the
// common case to save space in the rare one.
#[allow(clippy::large_enum_variant)]
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
    /// The user removed the device: session tells its socket, if it has one,
    /// which then closes.
    DeviceRemoved(RemovedDevice),
}

/// One message to every device of `recipient` (or to one of them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delivery {
    pub recipient: UserId,
    /// Only this device: a rejection goes to the device that sent the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceId>,
    pub message: Message,
}

/// `dak.group`, keyed by the group: its messages and the commands that change
/// it, in one ordered stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupEvent {
    /// A message (or typing) with `chat: group` and the group id in `to`.
    Message(Message),
    Command(GroupCommand),
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
    /// The user removed the device: persistence deletes its inbox, push its
    /// token. Published by message-router, as a token is: it comes before the
    /// token or the `replay` of a later registration of the same device. A
    /// `store` for the device that session published just after it (a
    /// message it routed while the device was still known) is kept, and
    /// expires.
    DeviceRemoved(RemovedDevice),
}

/// What happened to a message, as the services report it on `dak.status`,
/// keyed by the user it is about ([`StatusEvent::user`]): the feed of the
/// status store behind `GET /v1/messages/{mid}/status`. The steps towards a
/// user's devices and that user's read receipts are thus on one partition, in
/// the order they were reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusEvent {
    /// message-router took the message from `dak.inbound`.
    Accepted {
        mid: Mid,
        from: UserId,
        to: String,
        chat: ChatKind,
        at: u64,
    },
    /// A step of the message towards one device of `user` (or, with no
    /// `device`, towards the user's inbox for devices still to come).
    Device {
        mid: Mid,
        /// The message's sender, so that a read receipt can be checked against
        /// any one of these events.
        from: UserId,
        user: UserId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        device: Option<DeviceId>,
        step: DeviceStep,
        at: u64,
    },
    /// `by` says it read the message and asks that `to` be told. It is relayed
    /// only once a [`StatusEvent::Device`] showed the message went to `by` and
    /// came from `to`.
    Read {
        mid: Mid,
        to: UserId,
        by: UserId,
        device: DeviceId,
        at: u64,
    },
    /// Several events about one user, in order: what one batch of a service
    /// reports about that user, in one record.
    Batch(Vec<StatusEvent>),
}

impl StatusEvent {
    /// The mid the event is about; `None` for a batch.
    pub fn mid(&self) -> Option<Mid> {
        match self {
            StatusEvent::Accepted { mid, .. }
            | StatusEvent::Device { mid, .. }
            | StatusEvent::Read { mid, .. } => Some(*mid),
            StatusEvent::Batch(_) => None,
        }
    }

    /// The user the event is about, which keys its record: a device's user for
    /// a step, the reader for a read receipt, the sender for `accepted`.
    /// `None` for an empty batch.
    pub fn user(&self) -> Option<&UserId> {
        match self {
            StatusEvent::Accepted { from, .. } => Some(from),
            StatusEvent::Device { user, .. } => Some(user),
            StatusEvent::Read { by, .. } => Some(by),
            StatusEvent::Batch(events) => events.first().and_then(StatusEvent::user),
        }
    }

    /// The events of a batch (of batches), in order; any other event alone.
    pub fn flatten(self) -> Vec<StatusEvent> {
        match self {
            StatusEvent::Batch(events) => events.into_iter().flat_map(Self::flatten).collect(),
            event => vec![event],
        }
    }
}

/// The steps of a message towards one device, in the order they usually come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStep {
    /// Handed to the device's socket (reported just before the gateway writes
    /// it: a send that finds the socket gone is followed by `stored`).
    Delivered,
    /// Sent again after the ack timeout.
    Retried,
    /// Kept in the offline inbox.
    Stored,
    /// A push notification went to the device.
    Pushed,
    /// The device acked it while it was in flight.
    Acked,
    /// The device acked it from its inbox, which then dropped it.
    Dropped,
    /// Its user removed the device, and its inbox copy was deleted.
    Removed,
    /// The device's user said it read the message (a checked read receipt).
    Read,
}

impl DeviceStep {
    pub const ALL: [DeviceStep; 8] = [
        DeviceStep::Delivered,
        DeviceStep::Retried,
        DeviceStep::Stored,
        DeviceStep::Pushed,
        DeviceStep::Acked,
        DeviceStep::Dropped,
        DeviceStep::Removed,
        DeviceStep::Read,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeviceStep::Delivered => "delivered",
            DeviceStep::Retried => "retried",
            DeviceStep::Stored => "stored",
            DeviceStep::Pushed => "pushed",
            DeviceStep::Acked => "acked",
            DeviceStep::Dropped => "dropped",
            DeviceStep::Removed => "removed",
            DeviceStep::Read => "read",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|step| step.as_str() == s)
    }
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
            body: Some(RawValue::from_string(r#"{"cipher":"AAEC"}"#.into()).unwrap()),
            ephemeral: false,
            notice: None,
            ts: 1732380000123,
        }
    }

    #[test]
    fn events_round_trip_with_the_body_untouched() {
        let m = message();
        let bytes = encode(&DeliverEvent::Message(Delivery {
            recipient: UserId::parse("bob").unwrap(),
            device: None,
            message: m.clone(),
        }));
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with(r#"{"v":1,"event":{"message":"#), "{text}");
        let DeliverEvent::Message(d) = decode::<DeliverEvent>(&bytes).unwrap() else {
            panic!("expected a delivery");
        };
        assert_eq!(d.message.mid, m.mid);
        assert_eq!(d.message.body.unwrap().get(), r#"{"cipher":"AAEC"}"#);
    }

    #[test]
    fn a_status_batch_is_keyed_by_its_user_and_flattens_in_order() {
        let m = message();
        let bob = UserId::parse("bob").unwrap();
        let step = |step| StatusEvent::Device {
            mid: m.mid,
            from: m.from.clone(),
            user: bob.clone(),
            device: None,
            step,
            at: 1,
        };
        let batch = StatusEvent::Batch(vec![
            step(DeviceStep::Stored),
            StatusEvent::Batch(vec![step(DeviceStep::Pushed)]),
            step(DeviceStep::Dropped),
        ]);
        assert_eq!(batch.user(), Some(&bob));
        assert_eq!(batch.mid(), None);
        let back: StatusEvent = decode(&encode(&batch)).unwrap();
        assert_eq!(
            back.flatten(),
            vec![
                step(DeviceStep::Stored),
                step(DeviceStep::Pushed),
                step(DeviceStep::Dropped)
            ]
        );
        assert_eq!(StatusEvent::Batch(vec![]).user(), None);
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
    fn a_receipt_has_one_mid_per_what_it_reports() {
        let m = message();
        let bob = UserId::parse("bob").unwrap();
        let phone = DeviceId::parse("phone").unwrap();
        let tablet = DeviceId::parse("tablet").unwrap();
        let receipt = |device: &DeviceId, state, ts| {
            Message::receipt_for(&m, &bob, device, state, ts)
                .expect("a user message takes receipts")
        };
        let first = receipt(&phone, ReceiptState::Delivered, 10);
        assert_eq!(first.recipient, m.from, "receipts go back to the sender");
        assert_eq!(
            first.message.mid,
            receipt(&phone, ReceiptState::Delivered, 99).message.mid,
            "the same receipt produced twice keeps its mid"
        );
        assert_ne!(
            first.message.mid,
            receipt(&tablet, ReceiptState::Delivered, 10).message.mid
        );
        assert_ne!(
            first.message.mid,
            receipt(&phone, ReceiptState::Read, 10).message.mid
        );
        assert_ne!(first.message.mid, m.mid);
        assert_eq!(first.message.mid.timestamp_ms(), m.mid.timestamp_ms());

        // No receipts for receipts, for your own messages, or for ephemeral ones.
        assert!(
            Message::receipt_for(&first.message, &m.from, &phone, ReceiptState::Delivered, 1)
                .is_none()
        );
        assert!(Message::receipt_for(&m, &m.from, &tablet, ReceiptState::Delivered, 1).is_none());
        let typing = Message {
            ephemeral: true,
            ..m.clone()
        };
        assert!(Message::receipt_for(&typing, &bob, &phone, ReceiptState::Read, 1).is_none());
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
