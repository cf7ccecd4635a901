//! `POST /internal/v1/send`: session hands a gateway a batch of frames to write
//! to sockets it holds, and learns per delivery whether it was written.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::id::{DeviceId, UserId};

#[derive(Debug, Serialize, Deserialize)]
pub struct SendRequest {
    pub deliveries: Vec<SendItem>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SendItem {
    pub user: UserId,
    pub device: DeviceId,
    /// When set, write only to this connection of the device: a replay meant for
    /// one socket must not land on its successor, which gets its own replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<String>,
    /// The complete server frame, already encoded: the gateway writes it as is.
    pub frame: Box<RawValue>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct SendResponse {
    /// One result per delivery, in request order.
    pub results: Vec<SendOutcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SendOutcome {
    /// Queued on the device's socket.
    Sent,
    /// This gateway holds no socket for the device (any more).
    NotConnected,
    /// The device's socket is not draining: its send queue is full.
    Busy,
}
