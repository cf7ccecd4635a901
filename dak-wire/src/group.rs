//! Group chat: the commands that change a group, and the system notice every
//! member receives about each change (DESIGN §4).
//!
//! Commands travel like messages: a client sends one (WebSocket or REST), the
//! gateway gives it a mid and puts it on `dak.inbound`, message-router moves it to
//! `dak.group` keyed by the group, and group-router applies it in the group's
//! order, so a change made while offline or in a background sync lands in order
//! with the chat around it.

use serde::{Deserialize, Serialize};

use crate::id::{ClientId, DeviceId, GroupId, Mid, UserId};

/// Most bytes in a group name.
pub const MAX_NAME_BYTES: usize = 256;

/// A change to a group, as its author asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupOp {
    /// Creates the group with its author as admin. Creating a group that the
    /// same author already created changes nothing, so a client may retry it.
    Create {
        name: String,
        members: Vec<UserId>,
    },
    /// Admins only.
    Add {
        members: Vec<UserId>,
    },
    /// Removing someone else is for admins; removing yourself is leaving, which
    /// anyone may do.
    Remove {
        user: UserId,
    },
    Rename {
        name: String,
    },
}

/// A group command once the server accepted it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCommand {
    /// The mid of the system notice the change produces.
    pub mid: Mid,
    pub id: ClientId,
    pub from: UserId,
    pub from_device: DeviceId,
    pub group: GroupId,
    pub op: GroupOp,
    pub ts: u64,
}

/// What a member is allowed to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    Member,
}

/// What happened to a group, as members see it in the `system` object of a
/// body-less group message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SystemKind {
    Created,
    Added,
    Removed,
    Left,
    Promoted,
    Renamed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemEvent {
    pub event: SystemKind,
    /// Who was created with, added, removed, left or promoted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserId>,
    /// Set when the change was about more users than `users` names (past
    /// `DAK_GROUP_NOTICE_USERS`): how many it was about. The app reads the
    /// members with `GET /v1/groups/{g}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<usize>,
    pub by: UserId,
    /// The group's name, for `created` and `renamed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Checks a group name: not blank, at most [`MAX_NAME_BYTES`].
pub fn check_name(name: &str) -> Result<(), crate::WireError> {
    if name.trim().is_empty() {
        return Err(crate::WireError::bad_request("group `name` is empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(crate::WireError::too_large(format!(
            "group name is {} bytes, the limit is {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    Ok(())
}
