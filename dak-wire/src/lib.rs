//! dak's wire types, shared by every part and free of I/O.
//!
//! - [`id`]: user, device, group and client ids, and the server's message id [`Mid`].
//! - [`frame`]: the WebSocket client protocol (DESIGN §4): what clients send and
//!   what the server answers, with the validation every ingress applies.
//! - [`group`]: group commands and the system notices they produce.
//! - [`event`]: the versioned JSON events on the Kafka topics (DESIGN §6).
//! - [`send`]: the internal `POST /internal/v1/send` request and response between
//!   session and a gateway.
//!
//! Parsing happens here, at the edge: a value of these types is valid by
//! construction, so the services behind the gateways never re-check it.

pub mod cursor;
pub mod error;
pub mod event;
pub mod frame;
pub mod group;
pub mod id;
pub mod send;

pub use error::{ErrorCode, WireError};
pub use event::{
    DeliverEvent, GroupEvent, InboundEvent, Message, Notice, OfflineEvent, ReceiptState,
};
pub use frame::{ClientFrame, Limits, ServerFrame};
pub use id::{ChatKind, ClientId, DeviceId, GroupId, Mid, UserId};
