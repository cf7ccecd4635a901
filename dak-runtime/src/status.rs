//! Reporting what happens to messages (see [`dak_wire::event::StatusEvent`]):
//! every service that moves a message on reports its step through a
//! [`Reporter`], and persistence keeps the steps in the status store behind
//! `GET /v1/messages/{mid}/status`.
//!
//! Separate services report on `dak.status` ([`Reporter::on_bus`]). Inside one
//! process on the embedded log (`dak up`), that topic would only carry the
//! steps from one thread to another through the fsynced log, and back out
//! again: there every service reports to persistence's task directly
//! ([`in_process`]), which keeps them in the status store as it keeps what it
//! reads from `dak.status`.

use std::collections::HashMap;

use dak_wire::event::{self, DeviceStep, StatusEvent};
use dak_wire::{DeviceId, Message, UserId};
use tokio::sync::{mpsc, oneshot};

use crate::bus::{self, BusError, ProduceFuture, Producer};

/// Where a service reports the steps of messages. Cheap to clone.
#[derive(Clone)]
pub struct Reporter(Sink);

#[derive(Clone)]
enum Sink {
    Bus { producer: Producer, topic: String },
    InProcess(mpsc::UnboundedSender<Report>),
}

/// Steps reported in this process, in the order they were reported, for the
/// task that keeps them ([`in_process`]).
pub type Reports = mpsc::UnboundedReceiver<Report>;

/// One service's report: its events, in order, and where to answer once they
/// are kept (or with why not).
pub struct Report {
    pub events: Vec<StatusEvent>,
    pub answer: oneshot::Sender<Result<(), String>>,
}

/// A reporter whose reports go to the task that takes `Reports`, in the
/// order they are made, instead of onto the bus. Its futures resolve when that
/// task answers; the task ends once every clone of the reporter is gone.
pub fn in_process() -> (Reporter, Reports) {
    let (reports, queue) = mpsc::unbounded_channel();
    (Reporter(Sink::InProcess(reports)), queue)
}

impl Reporter {
    /// Reports on `topic` (`dak.status`) through `producer`.
    pub fn on_bus(producer: Producer, topic: &str) -> Self {
        Self(Sink::Bus {
            producer,
            topic: topic.to_owned(),
        })
    }

    /// Queues events now, in order; the futures resolve once they are kept. On
    /// the bus that is one record per user they are about (in the order of
    /// their first event, each keeping its events' order), durable on the
    /// bus; in the process, one report, kept in the status store.
    pub fn enqueue(&self, events: Vec<StatusEvent>) -> Result<Vec<ProduceFuture>, BusError> {
        match &self.0 {
            Sink::Bus { producer, topic } => by_user(events)
                .into_iter()
                .map(|mut events| {
                    let record = if events.len() == 1 {
                        events.pop().expect("one event")
                    } else {
                        StatusEvent::Batch(events)
                    };
                    let key = record.user().expect("grouped by user").clone();
                    producer.enqueue(topic, key.as_str(), &event::encode(&record))
                })
                .collect(),
            Sink::InProcess(reports) => {
                let events: Vec<_> = events.into_iter().filter(|e| e.user().is_some()).collect();
                if events.is_empty() {
                    return Ok(Vec::new());
                }
                let (answer, answered) = oneshot::channel();
                reports
                    .send(Report { events, answer })
                    .map_err(|_| BusError::Status("its task has stopped".into()))?;
                Ok(vec![ProduceFuture::in_process(answered)])
            }
        }
    }

    /// Reports events and waits until every one is kept.
    pub async fn report(&self, events: Vec<StatusEvent>) -> Result<(), BusError> {
        bus::acknowledged_all(self.enqueue(events)?).await
    }
}

/// Events grouped by the user they are about, in the order of each user's
/// first event, each group in its events' order; events about no user go.
fn by_user(events: Vec<StatusEvent>) -> Vec<Vec<StatusEvent>> {
    let mut groups: Vec<Vec<StatusEvent>> = Vec::new();
    let mut index: HashMap<UserId, usize> = HashMap::new();
    for event in events {
        let Some(user) = event.user() else {
            continue;
        };
        let at = match index.get(user) {
            Some(&at) => at,
            None => {
                index.insert(user.clone(), groups.len());
                groups.push(Vec::new());
                groups.len() - 1
            }
        };
        groups[at].push(event);
    }
    groups
}

/// Whether `message` has a status worth reporting: a message a user wrote,
/// not one the server wrote (receipts, notices) and not typing.
pub fn is_tracked(message: &Message) -> bool {
    message.is_from_user()
}

/// The event for a step of `message` towards `user`'s `device`, or `None` for a
/// message whose status is not tracked.
pub fn device_step(
    message: &Message,
    user: &UserId,
    device: Option<&DeviceId>,
    step: DeviceStep,
    at: u64,
) -> Option<StatusEvent> {
    is_tracked(message).then(|| StatusEvent::Device {
        mid: message.mid,
        from: message.from.clone(),
        user: user.clone(),
        device: device.cloned(),
        step,
        at,
    })
}
