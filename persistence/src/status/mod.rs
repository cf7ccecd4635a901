//! Message status: where a message is, per device.
//!
//! Every service reports the steps of a message on `dak.status`, keyed by the
//! user each step is about ([`dak_runtime::status`]): message-router `accepted`, session
//! `delivered`, `retried` and `acked`, persistence `stored` and `dropped`
//! (acked from the inbox), push `pushed`. persistence keeps them in a
//! [`StatusStore`] for `DAK_STATUS_RETENTION` (default 30 days, as long as the
//! inbox keeps a message), and serves them:
//!
//! - `GET /v1/messages/{mid}/status` on the public address, to the message's
//!   sender (anyone else gets `forbidden`, as for a mid that does not exist);
//! - the same path on the admin address, for any mid, without a token.
//!
//! A read receipt a client sends comes here as well
//! ([`StatusEvent::Read`]), and is relayed to the message's sender only when
//! the status shows the message went to the reader ([`may_relay`]). Session
//! and persistence report a step before the device can see the message, and a
//! user's steps and read receipts are on one partition (keyed by that user), so
//! a genuine receipt always comes after a step that allows it. Inside `dak up`
//! on its embedded log the steps come without the bus, in the order they were
//! reported (`Persistence::keep_reports`), and the same holds.

mod rows;
mod scylla;
mod sqlite;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dak_runtime::bus::{self, DeadLetters, Producer, Record};
use dak_runtime::http::ApiError;
use dak_runtime::now_ms;
use dak_runtime::status::Reports;
use dak_wire::event::{self, DeliverEvent, Delivery, DeviceStep, StatusEvent};
use dak_wire::{ChatKind, ErrorCode, Message, Mid, ReceiptState, UserId};
use serde::Serialize;

pub use scylla::ScyllaStatus;
pub use sqlite::SqliteStatus;

/// Consumer group of persistence's status consumer.
pub const GROUP: &str = "dak.persistence.status";

/// Most reports of this process's services kept in one step.
const REPORTS_PER_STEP: usize = 256;

pub const RECORDED: &str = "dak_status_events_total";
pub const READ_RECEIPTS: &str = "dak_read_receipts_total";

/// Where the steps of messages are kept.
///
/// Both engines keep one contract (the suite in `tests/status`): a step is one
/// of [`StatusEvent::Accepted`] or [`StatusEvent::Device`] (a
/// [`StatusEvent::Read`] is never stored as such: once checked, it is stored as
/// the device step `read`); the same step reported again (a redelivered event,
/// a second retry) is kept once, with its earliest time; steps are kept for the
/// store's retention, counted from the mid's own time.
#[async_trait]
pub trait StatusStore: Send + Sync + 'static {
    async fn record(&self, steps: &[StatusEvent]) -> anyhow::Result<()>;
    /// Every step kept for `mid`, oldest first.
    async fn steps(&self, mid: Mid) -> anyhow::Result<Vec<StatusEvent>>;
}

/// Whether a read receipt from `by` to `to` may reach `to`, given the steps of
/// its message: only when the message went to `by` (to one of its devices, or
/// its inbox) and came from `to`. A receipt for a message `by` never got, or
/// addressed to someone other than its sender, is refused.
pub fn may_relay(steps: &[StatusEvent], by: &UserId, to: &UserId) -> bool {
    steps.iter().any(|step| {
        matches!(step, StatusEvent::Device { from, user, step, .. }
            if user == by && from == to && *step != DeviceStep::Read)
    })
}

/// A message's status as the API shows it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct MessageStatus {
    pub mid: Mid,
    pub from: UserId,
    /// Where the message was sent (a user or a group); absent when its
    /// `accepted` step is not known (yet).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted_at: Option<u64>,
    pub devices: Vec<DeviceStatus>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct DeviceStatus {
    pub user: UserId,
    /// `null` for the user-level inbox of a user with no device yet.
    pub device: Option<String>,
    /// The latest step, or `expired` when the latest is `stored` or `pushed`
    /// and the inbox no longer keeps the message.
    pub state: &'static str,
    pub at: u64,
    pub history: Vec<Step>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Step {
    pub state: &'static str,
    pub at: u64,
}

/// Builds the view of a message from its steps; `None` when none is known.
/// `inbox_ttl_ms` and `now` tell when a stored message has expired.
pub fn view(mid: Mid, steps: &[StatusEvent], inbox_ttl_ms: u64, now: u64) -> Option<MessageStatus> {
    let mut status = MessageStatus {
        mid,
        from: UserId::parse("unknown").expect("a valid user id"),
        to: None,
        chat: None,
        accepted_at: None,
        devices: Vec::new(),
    };
    let mut devices: BTreeMap<(UserId, Option<String>), Vec<Step>> = BTreeMap::new();
    let mut known = false;
    for step in steps {
        match step {
            StatusEvent::Accepted {
                from, to, chat, at, ..
            } => {
                status.from = from.clone();
                status.to = Some(to.clone());
                status.chat = Some(*chat);
                status.accepted_at = Some(*at);
            }
            StatusEvent::Device {
                from,
                user,
                device,
                step,
                at,
                ..
            } => {
                status.from = from.clone();
                let key = (user.clone(), device.as_ref().map(|d| d.to_string()));
                devices.entry(key).or_default().push(Step {
                    state: step.as_str(),
                    at: *at,
                });
            }
            StatusEvent::Read { .. } | StatusEvent::Batch(_) => continue,
        }
        known = true;
    }
    if !known {
        return None;
    }
    for ((user, device), mut history) in devices {
        history.sort_by_key(|s| (s.at, DeviceStep::parse(s.state)));
        let last = history.last().expect("a device has a step");
        let expired = matches!(last.state, "stored" | "pushed")
            && history
                .iter()
                .filter(|s| s.state == "stored")
                .all(|s| s.at + inbox_ttl_ms < now);
        status.devices.push(DeviceStatus {
            user,
            device,
            state: if expired { "expired" } else { last.state },
            at: last.at,
            history,
        });
    }
    Some(status)
}

/// What the status consumer and the status API work with.
pub(crate) struct StatusShared {
    pub store: Arc<dyn StatusStore>,
    pub producer: Producer,
    pub deliver_topic: String,
    pub dead_letters: DeadLetters,
    pub verifier: dak_runtime::auth::Verifier,
    pub inbox_ttl_ms: u64,
}

impl StatusShared {
    /// Records a batch of `dak.status` in order; relays each read receipt that
    /// the steps before it allow.
    pub(crate) async fn handle_batch(&self, records: &[Record]) -> anyhow::Result<()> {
        let mut events = Vec::with_capacity(records.len());
        for record in records {
            match event::decode::<StatusEvent>(&record.payload) {
                Ok(event) => events.extend(event.flatten()),
                Err(e) => self.dead_letters.park(record, &e.message).await?,
            }
        }
        self.keep(events).await
    }

    /// Keeps the reports of this process's services as they come, reports
    /// queued meanwhile together ([`dak_runtime::status::in_process`]): the
    /// same as a batch of `dak.status`, without the bus. Ends once every
    /// reporter is gone.
    pub(crate) async fn keep_reports(&self, mut reports: Reports) {
        let mut taken = Vec::new();
        while reports.recv_many(&mut taken, REPORTS_PER_STEP).await > 0 {
            let mut answers = Vec::with_capacity(taken.len());
            let mut events = Vec::new();
            for report in taken.drain(..) {
                events.extend(report.events.into_iter().flat_map(StatusEvent::flatten));
                answers.push(report.answer);
            }
            let outcome = self.keep(events).await.map_err(|e| {
                tracing::warn!(error = %format!("{e:#}"), "status reports not kept");
                format!("{e:#}")
            });
            for answer in answers {
                // The service may have stopped waiting; nothing to do then.
                let _ = answer.send(outcome.clone());
            }
        }
    }

    /// Records steps in order; relays each read receipt that the steps before
    /// it allow.
    async fn keep(&self, events: Vec<StatusEvent>) -> anyhow::Result<()> {
        let mut steps = Vec::with_capacity(events.len());
        let mut relays = Vec::new();
        for event in events {
            let StatusEvent::Read {
                mid,
                to,
                by,
                device,
                at,
            } = event
            else {
                steps.push(event);
                continue;
            };
            // The steps before it count: write them first.
            self.store.record(&std::mem::take(&mut steps)).await?;
            let known = self.store.steps(mid).await?;
            if !may_relay(&known, &by, &to) {
                ::metrics::counter!(READ_RECEIPTS, "outcome" => "refused").increment(1);
                tracing::info!(%mid, %by, %to, "read receipt refused: the message did not go to its reader, or not from its addressee");
                continue;
            }
            ::metrics::counter!(READ_RECEIPTS, "outcome" => "relayed").increment(1);
            let receipt = Message::receipt(mid, &to, &by, &device, ReceiptState::Read, at);
            let payload = event::encode(&DeliverEvent::Message(Delivery {
                recipient: to.clone(),
                device: None,
                message: receipt,
            }));
            relays.push(
                self.producer
                    .enqueue(&self.deliver_topic, to.as_str(), &payload)?,
            );
            steps.push(StatusEvent::Device {
                mid,
                from: to,
                user: by,
                device: Some(device),
                step: DeviceStep::Read,
                at,
            });
        }
        ::metrics::counter!(RECORDED).increment(steps.len() as u64);
        self.store.record(&steps).await?;
        bus::acknowledged_all(relays).await?;
        Ok(())
    }

    async fn load(&self, mid: &str) -> Result<(Mid, Option<MessageStatus>), ApiError> {
        let mid = Mid::parse(mid).map_err(ApiError::from)?;
        let steps = self.store.steps(mid).await.map_err(|e| {
            tracing::warn!(error = %e, "status read failed");
            ApiError::new(
                ErrorCode::Unavailable,
                "message status is unavailable, retry later",
            )
        })?;
        Ok((mid, view(mid, &steps, self.inbox_ttl_ms, now_ms())))
    }
}

/// `GET /v1/messages/{mid}/status` on the public address: for the sender only.
pub(crate) async fn for_sender(
    State(shared): State<Arc<StatusShared>>,
    headers: HeaderMap,
    Path(mid): Path<String>,
) -> Result<Json<MessageStatus>, ApiError> {
    let header = headers.get("authorization").and_then(|v| v.to_str().ok());
    let identity = shared.verifier.verify_header(header).await?;
    let (mid, status) = shared.load(&mid).await?;
    match status {
        Some(status) if status.from == identity.user => Ok(Json(status)),
        _ => Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("message `{mid}` is not known, or you did not send it"),
        )),
    }
}

/// The same on the admin address: any mid, no token; 404 for an unknown mid.
pub(crate) async fn for_ops(
    State(shared): State<Arc<StatusShared>>,
    Path(mid): Path<String>,
) -> Response {
    match shared.load(&mid).await {
        Ok((_, Some(status))) => Json(status).into_response(),
        Ok((mid, None)) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": {
                "code": "not_found",
                "message": format!("no status is kept for message `{mid}`"),
            }})),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

pub(crate) fn describe() {
    ::metrics::describe_counter!(RECORDED, "message status steps written to the status store");
    ::metrics::describe_counter!(
        READ_RECEIPTS,
        "read receipts clients sent, relayed to the sender or refused (the message did not go to the reader, or not from the addressee)"
    );
    dak_runtime::metrics::register_counter(RECORDED, &[]);
    for outcome in ["relayed", "refused"] {
        dak_runtime::metrics::register_counter(READ_RECEIPTS, &[("outcome", outcome)]);
    }
}

#[cfg(test)]
mod tests {
    use dak_wire::DeviceId;

    use super::*;

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    fn mid() -> Mid {
        Mid::from_ulid(ulid::Ulid::from_parts(1_000, 7))
    }

    fn device_step(to: &str, device: Option<&str>, step: DeviceStep, at: u64) -> StatusEvent {
        StatusEvent::Device {
            mid: mid(),
            from: user("alice"),
            user: user(to),
            device: device.map(|d| DeviceId::parse(d).unwrap()),
            step,
            at,
        }
    }

    #[test]
    fn a_read_receipt_needs_the_message_to_have_gone_to_its_reader_from_its_addressee() {
        let steps = [
            StatusEvent::Accepted {
                mid: mid(),
                from: user("alice"),
                to: "bob".into(),
                chat: ChatKind::Direct,
                at: 1,
            },
            device_step("bob", Some("phone"), DeviceStep::Delivered, 2),
        ];
        assert!(may_relay(&steps, &user("bob"), &user("alice")));
        // Carol never got it; and bob cannot send alice's receipt to mallory.
        assert!(!may_relay(&steps, &user("carol"), &user("alice")));
        assert!(!may_relay(&steps, &user("bob"), &user("mallory")));
        // `accepted` alone names no reader.
        assert!(!may_relay(&steps[..1], &user("bob"), &user("alice")));
        // Stored for the user (no device yet) counts as gone to the user.
        let stored = [device_step("bob", None, DeviceStep::Stored, 2)];
        assert!(may_relay(&stored, &user("bob"), &user("alice")));
        // A read step is the outcome of a check, not a reason for another.
        let read = [device_step("bob", Some("phone"), DeviceStep::Read, 2)];
        assert!(!may_relay(&read, &user("bob"), &user("alice")));
    }

    #[test]
    fn the_view_shows_each_device_with_its_latest_step_and_history() {
        let steps = [
            device_step("bob", Some("phone"), DeviceStep::Acked, 30),
            StatusEvent::Accepted {
                mid: mid(),
                from: user("alice"),
                to: "bob".into(),
                chat: ChatKind::Direct,
                at: 10,
            },
            device_step("bob", Some("phone"), DeviceStep::Delivered, 20),
            device_step("bob", Some("tablet"), DeviceStep::Stored, 20),
            device_step("bob", Some("tablet"), DeviceStep::Pushed, 25),
        ];
        let status = view(mid(), &steps, 1_000, 100).unwrap();
        assert_eq!(status.from, user("alice"));
        assert_eq!(status.to.as_deref(), Some("bob"));
        assert_eq!(status.accepted_at, Some(10));
        let phone = &status.devices[0];
        assert_eq!(
            (phone.device.as_deref(), phone.state, phone.at),
            (Some("phone"), "acked", 30)
        );
        assert_eq!(
            phone.history,
            vec![
                Step {
                    state: "delivered",
                    at: 20
                },
                Step {
                    state: "acked",
                    at: 30
                }
            ]
        );
        let tablet = &status.devices[1];
        assert_eq!(
            (tablet.device.as_deref(), tablet.state),
            (Some("tablet"), "pushed")
        );
        // Once the inbox no longer keeps it, a stored message has expired.
        let later = view(mid(), &steps, 1_000, 1_021).unwrap();
        assert_eq!(later.devices[1].state, "expired");
        assert_eq!(later.devices[0].state, "acked");
        assert_eq!(view(mid(), &[], 1_000, 100), None);
    }
}
