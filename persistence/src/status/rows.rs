//! One step of a message as both status stores keep it: a row of columns.

use dak_wire::event::{DeviceStep, StatusEvent};
use dak_wire::{ChatKind, DeviceId, Mid, UserId};

/// The columns of one step, as both engines keep it. The message-level
/// `accepted` step has an empty user and device, and only it has a recipient
/// and a chat; a step for the user-level inbox has an empty device.
pub(super) struct Row {
    pub mid: String,
    pub user: String,
    pub device: String,
    pub state: &'static str,
    pub at: i64,
    pub sender: String,
    pub recipient: String,
    pub chat: &'static str,
}

/// The row of a step; `None` for a read receipt, which is not a step.
pub(super) fn row(step: &StatusEvent) -> Option<Row> {
    match step {
        StatusEvent::Accepted {
            mid,
            from,
            to,
            chat,
            at,
        } => Some(Row {
            mid: mid.to_string(),
            user: String::new(),
            device: String::new(),
            state: "accepted",
            at: *at as i64,
            sender: from.to_string(),
            recipient: to.clone(),
            chat: chat_str(*chat),
        }),
        StatusEvent::Device {
            mid,
            from,
            user,
            device,
            step,
            at,
        } => Some(Row {
            mid: mid.to_string(),
            user: user.to_string(),
            device: device.as_ref().map(|d| d.to_string()).unwrap_or_default(),
            state: step.as_str(),
            at: *at as i64,
            sender: from.to_string(),
            recipient: String::new(),
            chat: "",
        }),
        StatusEvent::Read { .. } | StatusEvent::Batch(_) => None,
    }
}

fn chat_str(chat: ChatKind) -> &'static str {
    match chat {
        ChatKind::Direct => "direct",
        ChatKind::Group => "group",
    }
}

/// A step from its columns, the inverse of [`columns`].
pub(super) fn from_columns(
    mid: Mid,
    (user, device, state, at, sender, recipient, chat): (
        String,
        String,
        String,
        i64,
        String,
        String,
        String,
    ),
) -> Result<StatusEvent, String> {
    let from = UserId::parse(&sender).map_err(|e| e.message)?;
    let at = at.max(0) as u64;
    if state == "accepted" {
        let chat = match chat.as_str() {
            "direct" => ChatKind::Direct,
            "group" => ChatKind::Group,
            other => return Err(format!("unknown chat `{other}`")),
        };
        return Ok(StatusEvent::Accepted {
            mid,
            from,
            to: recipient,
            chat,
            at,
        });
    }
    let step = DeviceStep::parse(&state).ok_or_else(|| format!("unknown state `{state}`"))?;
    Ok(StatusEvent::Device {
        mid,
        from,
        user: UserId::parse(&user).map_err(|e| e.message)?,
        device: if device.is_empty() {
            None
        } else {
            Some(DeviceId::parse(&device).map_err(|e| e.message)?)
        },
        step,
        at,
    })
}

/// When a step happened; 0 for a batch, which the stores never see.
pub(super) fn step_time(step: &StatusEvent) -> u64 {
    match step {
        StatusEvent::Accepted { at, .. }
        | StatusEvent::Device { at, .. }
        | StatusEvent::Read { at, .. } => *at,
        StatusEvent::Batch(_) => 0,
    }
}

/// When a step's retention ends: its mid's time plus `retention_ms`, in
/// milliseconds. `None` for a batch.
pub(super) fn kept_until(step: &StatusEvent, retention_ms: u64) -> Option<u64> {
    Some(step.mid()?.timestamp_ms() + retention_ms)
}
