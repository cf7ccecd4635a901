//! Reporting what happens to messages on `dak.status` (see
//! [`dak_wire::event::StatusEvent`]): every service that moves a message on
//! reports its step through a [`Reporter`], and persistence keeps the steps in the
//! status store behind `GET /v1/messages/{mid}/status`.

use std::collections::HashMap;

use dak_wire::event::{self, DeviceStep, StatusEvent};
use dak_wire::{DeviceId, Message, UserId};

use crate::bus::{self, BusError, ProduceFuture, Producer};

/// Where a service reports the steps of messages.
#[derive(Clone)]
pub struct Reporter {
    producer: Producer,
    topic: String,
}

impl Reporter {
    pub fn new(producer: Producer, topic: &str) -> Self {
        Self {
            producer,
            topic: topic.to_owned(),
        }
    }

    /// Queues events, one record per user they are about (in the order of
    /// their first event, each keeping its events' order); the futures resolve
    /// once the records are durable.
    pub fn enqueue(&self, events: Vec<StatusEvent>) -> Result<Vec<ProduceFuture>, BusError> {
        let mut by_user: Vec<(UserId, Vec<StatusEvent>)> = Vec::new();
        let mut index: HashMap<UserId, usize> = HashMap::new();
        for event in events {
            let Some(user) = event.user().cloned() else {
                continue;
            };
            let at = *index.entry(user.clone()).or_insert_with(|| {
                by_user.push((user, Vec::new()));
                by_user.len() - 1
            });
            by_user[at].1.push(event);
        }
        by_user
            .into_iter()
            .map(|(user, mut events)| {
                let record = if events.len() == 1 {
                    events.pop().expect("one event")
                } else {
                    StatusEvent::Batch(events)
                };
                self.producer
                    .enqueue(&self.topic, user.as_str(), &event::encode(&record))
            })
            .collect()
    }

    /// Reports events and waits until every one is durable.
    pub async fn report(&self, events: Vec<StatusEvent>) -> Result<(), BusError> {
        bus::acknowledged_all(self.enqueue(events)?).await
    }
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
