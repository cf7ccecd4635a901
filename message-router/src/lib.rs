//! message-router: reads everything clients send from `dak.inbound`, checks it,
//! and routes it.
//!
//! - A direct message goes to `dak.deliver`, keyed by the recipient, so every
//!   delivery and ack for one user is one ordered stream.
//! - An ack, and a device's connection (which starts its inbox replay), go to
//!   `dak.deliver`, keyed by the user.
//! - A push-token registration goes to `dak.offline`, keyed by the user, where
//!   push keeps its tokens.
//!
//! - A group message (typing included) and a group command go to `dak.group`,
//!   keyed by the group, where group-router applies them in the group's order.
//!
//! Each message a user wrote is reported `accepted` on `dak.status`. A read
//! receipt a client sent goes to `dak.status` too, keyed by its reader:
//! persistence relays it to the message's sender only once the status
//! shows the message went to the reader (see `persistence::status`). An
//! event that cannot be decoded or routed is parked in the dead-letter topic
//! (see [`dak_runtime::bus::DeadLetters`]): one bad record must not stall a
//! partition. Offsets are committed only after the routed records were
//! acknowledged by Kafka.

pub mod standalone;

use dak_runtime::bus::{self, Bus, BusError, Consumer, DeadLetters, Producer, Record};
use dak_runtime::metrics;
use dak_runtime::shutdown::Shutdown;
use dak_runtime::status::Reporter;
use dak_wire::event::{
    self, DeliverEvent, Delivery, GroupEvent, InboundEvent, OfflineEvent, RemovedDevice,
    StatusEvent,
};
use dak_wire::{ChatKind, GroupId, Message, Notice, UserId};

/// Consumer group of every message-router instance.
pub const GROUP: &str = "dak.message-router";

/// Records taken from `dak.inbound` per batch.
const BATCH: usize = 1000;

pub struct MessageRouter {
    consumer: Consumer,
    dead_letters: DeadLetters,
    producer: Producer,
    status: Reporter,
    deliver_topic: String,
    offline_topic: String,
    group_topic: String,
}

/// Where one inbound event goes.
#[derive(Debug)]
pub enum Route {
    Deliver {
        key: UserId,
        event: DeliverEvent,
    },
    Offline {
        key: UserId,
        event: OfflineEvent,
    },
    Group {
        key: GroupId,
        event: GroupEvent,
    },
    /// A client's read receipt, to be checked before it is relayed.
    Status(StatusEvent),
    /// A device its user removed: to `dak.offline`, as a push token goes, for
    /// its inbox and token; and to `dak.deliver`, for session to tell its
    /// socket. Both keyed by the user.
    DeviceRemoved(RemovedDevice),
    Drop(String),
}

/// What message-router counts, at zero until it happens.
fn register_metrics() {
    for kind in [
        "message",
        "ack",
        "connected",
        "replayed",
        "push_token",
        "device_removed",
        "group_message",
        "group_command",
        "read_receipt",
    ] {
        metrics::register_counter(metrics::ROUTED, &[("kind", kind)]);
    }
    metrics::register_histogram(metrics::MESSAGE_AGE, &[("stage", "routed")]);
}

impl MessageRouter {
    /// A router producing through `producer`, reporting the steps of messages
    /// and read receipts to `status` ([`Reporter::on_bus`] for `dak.status`).
    pub fn build(bus: &Bus, producer: Producer, status: Reporter) -> Result<Self, BusError> {
        let topics = bus.topics();
        register_metrics();
        let consumer = bus
            .consumer(&topics.group(GROUP), &[&topics.inbound])?
            .with_dead_letters(producer.clone());
        Ok(Self {
            dead_letters: consumer.dead_letters(),
            consumer,
            status,
            producer,
            deliver_topic: topics.deliver.clone(),
            offline_topic: topics.offline.clone(),
            group_topic: topics.group.clone(),
        })
    }

    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        tracing::info!("message-router running");
        let this = &self;
        self.consumer
            .run(BATCH, &shutdown, |batch| async move {
                match this.route_batch(&batch).await {
                    Ok(()) => Ok(batch),
                    Err(e) => Err((batch, e)),
                }
            })
            .await;
        self.producer.flush(std::time::Duration::from_secs(5)).await;
        Ok(())
    }

    async fn route_batch(&self, batch: &[Record]) -> anyhow::Result<()> {
        let mut acks = Vec::with_capacity(batch.len());
        let mut status = Vec::new();
        for record in batch {
            match route(&record.payload) {
                Route::Deliver { key, event } => {
                    let kind = match &event {
                        DeliverEvent::Message(d) => {
                            metrics::message_age("routed", d.message.ts);
                            status.extend(accepted(&d.message));
                            "message"
                        }
                        DeliverEvent::Ack(_) => "ack",
                        DeliverEvent::Connected(_) => "connected",
                        DeliverEvent::Replayed(_) => "replayed",
                        DeliverEvent::DeviceRemoved(_) => "device_removed",
                    };
                    ::metrics::counter!(metrics::ROUTED, "kind" => kind).increment(1);
                    let payload = event::encode(&event);
                    acks.push(self.producer.enqueue(
                        &self.deliver_topic,
                        key.as_str(),
                        &payload,
                    )?);
                }
                Route::DeviceRemoved(removed) => {
                    ::metrics::counter!(metrics::ROUTED, "kind" => "device_removed").increment(1);
                    let key = removed.user.to_string();
                    let offline = event::encode(&OfflineEvent::DeviceRemoved(removed.clone()));
                    let deliver = event::encode(&DeliverEvent::DeviceRemoved(removed));
                    acks.push(self.producer.enqueue(&self.offline_topic, &key, &offline)?);
                    acks.push(self.producer.enqueue(&self.deliver_topic, &key, &deliver)?);
                }
                Route::Offline { key, event } => {
                    ::metrics::counter!(metrics::ROUTED, "kind" => "push_token").increment(1);
                    let payload = event::encode(&event);
                    acks.push(self.producer.enqueue(
                        &self.offline_topic,
                        key.as_str(),
                        &payload,
                    )?);
                }
                Route::Group { key, event } => {
                    let kind = match &event {
                        GroupEvent::Message(message) => {
                            status.extend(accepted(message));
                            "group_message"
                        }
                        GroupEvent::Command(_) => "group_command",
                    };
                    ::metrics::counter!(metrics::ROUTED, "kind" => kind).increment(1);
                    let payload = event::encode(&event);
                    acks.push(
                        self.producer
                            .enqueue(&self.group_topic, key.as_str(), &payload)?,
                    );
                }
                Route::Status(event) => {
                    ::metrics::counter!(metrics::ROUTED, "kind" => "read_receipt").increment(1);
                    status.push(event);
                }
                Route::Drop(reason) => self.dead_letters.park(record, &reason).await?,
            }
        }
        acks.extend(self.status.enqueue(status)?);
        bus::acknowledged_all(acks).await?;
        Ok(())
    }
}

/// Decides where one `dak.inbound` record goes.
pub fn route(payload: &[u8]) -> Route {
    let event: InboundEvent = match event::decode(payload) {
        Ok(e) => e,
        Err(e) => return Route::Drop(e.message),
    };
    match event {
        InboundEvent::Message(Message {
            mid,
            from,
            from_device,
            to,
            notice: Some(Notice::Receipt { mid: of, .. }),
            ts,
            ..
        }) => match UserId::parse(&to) {
            // Only clients send receipts through `dak.inbound`; the server's own
            // `delivered` receipts go straight to `dak.deliver`.
            Ok(to) => {
                tracing::debug!(%mid, %of, "checking read receipt");
                Route::Status(StatusEvent::Read {
                    mid: of,
                    to,
                    by: from,
                    device: from_device,
                    at: ts,
                })
            }
            Err(e) => Route::Drop(e.message),
        },
        InboundEvent::Message(message) => match message.chat {
            ChatKind::Direct => match UserId::parse(message.to.as_str()) {
                Ok(recipient) => {
                    tracing::debug!(mid = %message.mid, "routing direct message");
                    Route::Deliver {
                        key: recipient.clone(),
                        event: DeliverEvent::Message(Delivery {
                            recipient,
                            device: None,
                            message,
                        }),
                    }
                }
                Err(e) => Route::Drop(e.message),
            },
            ChatKind::Group => match GroupId::parse(message.to.as_str()) {
                Ok(group) => Route::Group {
                    key: group,
                    event: GroupEvent::Message(message),
                },
                Err(e) => Route::Drop(e.message),
            },
        },
        InboundEvent::Group(command) => Route::Group {
            key: command.group.clone(),
            event: GroupEvent::Command(command),
        },
        InboundEvent::Ack(ack) => Route::Deliver {
            key: ack.user.clone(),
            event: DeliverEvent::Ack(ack),
        },
        InboundEvent::Connected(connected) => Route::Deliver {
            key: connected.user.clone(),
            event: DeliverEvent::Connected(connected),
        },
        InboundEvent::PushToken(token) => Route::Offline {
            key: token.user.clone(),
            event: OfflineEvent::PushToken(token),
        },
        InboundEvent::DeviceRemoved(removed) => Route::DeviceRemoved(removed),
    }
}

/// The `accepted` status of a message a user wrote.
fn accepted(message: &Message) -> Option<StatusEvent> {
    dak_runtime::status::is_tracked(message).then(|| StatusEvent::Accepted {
        mid: message.mid,
        from: message.from.clone(),
        to: message.to.clone(),
        chat: message.chat,
        at: message.ts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dak_wire::event::{Ack, Message};
    use dak_wire::{ClientId, DeviceId, Mid};
    use serde_json::value::RawValue;

    fn message(to: &str, chat: ChatKind) -> Message {
        Message {
            mid: Mid::from_ulid(ulid::Ulid::new()),
            id: ClientId::parse("c1").unwrap(),
            from: UserId::parse("alice").unwrap(),
            from_device: DeviceId::default_device(),
            to: to.into(),
            chat,
            body: Some(RawValue::from_string("1".into()).unwrap()),
            ephemeral: false,
            notice: None,
            ts: 1,
        }
    }

    #[test]
    fn direct_messages_are_keyed_by_recipient() {
        let m = message("bob", ChatKind::Direct);
        let mid = m.mid;
        match route(&event::encode(&InboundEvent::Message(m))) {
            Route::Deliver {
                key,
                event: DeliverEvent::Message(d),
            } => {
                assert_eq!(key.as_str(), "bob");
                assert_eq!(d.recipient.as_str(), "bob");
                assert_eq!(d.message.mid, mid);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn acks_are_keyed_by_the_acking_user() {
        let ack = Ack {
            user: UserId::parse("bob").unwrap(),
            device: DeviceId::parse("tablet").unwrap(),
            mids: vec![Mid::from_ulid(ulid::Ulid::new())],
        };
        match route(&event::encode(&InboundEvent::Ack(ack.clone()))) {
            Route::Deliver {
                key,
                event: DeliverEvent::Ack(a),
            } => {
                assert_eq!(key.as_str(), "bob");
                assert_eq!(a, ack);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// A removal goes to `dak.offline` as a push token does, keyed by the
    /// user, so a later token of the same device comes after it; and to
    /// `dak.deliver` for session.
    #[test]
    fn device_removals_go_to_the_offline_and_deliver_topics() {
        let removed = RemovedDevice {
            user: UserId::parse("bob").unwrap(),
            device: DeviceId::parse("laptop").unwrap(),
        };
        match route(&event::encode(&InboundEvent::DeviceRemoved(
            removed.clone(),
        ))) {
            Route::DeviceRemoved(r) => assert_eq!(r, removed),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn group_messages_are_keyed_by_group() {
        let m = message("team-7", ChatKind::Group);
        match route(&event::encode(&InboundEvent::Message(m))) {
            Route::Group {
                key,
                event: GroupEvent::Message(m),
            } => {
                assert_eq!(key.as_str(), "team-7");
                assert_eq!(m.to, "team-7");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn read_receipts_go_to_the_status_topic_to_be_checked() {
        let bob = UserId::parse("bob").unwrap();
        let phone = DeviceId::parse("phone").unwrap();
        let read = message("bob", ChatKind::Direct);
        let receipt = Message::receipt(
            read.mid,
            &read.from,
            &bob,
            &phone,
            dak_wire::ReceiptState::Read,
            5,
        );
        match route(&event::encode(&InboundEvent::Message(receipt))) {
            Route::Status(StatusEvent::Read {
                mid,
                to,
                by,
                device,
                at,
            }) => {
                assert_eq!(mid, read.mid);
                assert_eq!(to.as_str(), "alice");
                assert_eq!(by, bob);
                assert_eq!(device, phone);
                assert_eq!(at, 5);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn only_messages_users_wrote_are_reported_accepted() {
        let m = message("bob", ChatKind::Direct);
        assert!(matches!(
            accepted(&m),
            Some(StatusEvent::Accepted { mid, .. }) if mid == m.mid
        ));
        let mut typing = m.clone();
        typing.ephemeral = true;
        assert_eq!(accepted(&typing), None);
        let notice = Message::receipt(
            m.mid,
            &m.from,
            &UserId::parse("bob").unwrap(),
            &DeviceId::default_device(),
            dak_wire::ReceiptState::Delivered,
            5,
        );
        assert_eq!(accepted(&notice), None);
    }

    #[test]
    fn garbage_and_invalid_recipients_are_dropped() {
        assert!(matches!(route(b"{not json"), Route::Drop(_)));
        assert!(matches!(route(br#"{"v":9,"event":{}}"#), Route::Drop(_)));
        let bad = message("not a user", ChatKind::Direct);
        assert!(matches!(
            route(&event::encode(&InboundEvent::Message(bad))),
            Route::Drop(_)
        ));
    }
}
