//! Reporting what happens to messages on `dak.status` (see
//! [`dak_wire::event::StatusEvent`]): every service that moves a message on
//! reports its step through a [`Reporter`], and persistence keeps the steps in the
//! status store behind `GET /v1/messages/{mid}/status`.

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

    /// Queues one event, keyed by its mid; the future resolves once it is durable.
    pub fn enqueue(&self, event: &StatusEvent) -> Result<ProduceFuture, BusError> {
        let key = event.mid().to_string();
        self.producer
            .enqueue(&self.topic, &key, &event::encode(event))
    }

    /// Reports events and waits until every one is durable.
    pub async fn report(&self, events: &[StatusEvent]) -> Result<(), BusError> {
        let mut acks = Vec::with_capacity(events.len());
        for event in events {
            acks.push(self.enqueue(event)?);
        }
        bus::acknowledged_all(acks).await
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
