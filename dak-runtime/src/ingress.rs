//! Ingress: how a gateway turns what a client sent into events on `dak.inbound`.
//! Both gateways use it, so a message sent over REST and one sent over the
//! WebSocket get the same mid rules, the same dedup and the same durability.
//!
//! Submitting is two steps so a connection can pipeline: [`Ingress::submit`]
//! queues the record in order, and [`Pending::accepted`] waits until Kafka
//! acknowledged it. Only then may the client hear `accepted`.

use std::sync::{Arc, Mutex};

use dak_wire::event::{self, Ack, Connected, InboundEvent, Message, PushToken};
use dak_wire::frame::Outgoing;
use dak_wire::{ClientId, Mid};
use rdkafka::producer::DeliveryFuture;

use crate::auth::Identity;
use crate::dedup::{Dedup, Reservation};
use crate::kafka::{self, Producer};
use crate::metrics;

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What the client hears once its message is durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub id: ClientId,
    pub mid: Mid,
    pub ts: u64,
}

#[derive(Clone)]
pub struct Ingress {
    producer: Producer,
    topic: String,
    dedup: Arc<dyn Dedup>,
    mids: Arc<Mutex<ulid::Generator>>,
}

/// A message queued for Kafka, not yet acknowledged.
pub struct Pending {
    accepted: Accepted,
    from: Identity,
    delivery: Option<DeliveryFuture>,
    dedup: Arc<dyn Dedup>,
}

impl Ingress {
    pub fn new(producer: Producer, inbound_topic: String, dedup: Arc<dyn Dedup>) -> Self {
        Self {
            producer,
            topic: inbound_topic,
            dedup,
            mids: Arc::new(Mutex::new(ulid::Generator::new())),
        }
    }

    fn next_mid(&self) -> Mid {
        let mut generator = self.mids.lock().expect("mid generator lock");
        // The generator only fails when 2^80 ids are asked for in one millisecond.
        Mid::from_ulid(generator.generate().unwrap_or_else(|_| ulid::Ulid::new()))
    }

    /// Gives the message its mid (the earlier one, for an outbox retry) and queues
    /// it on `dak.inbound`, keyed by the sender.
    pub async fn submit(
        &self,
        from: &Identity,
        message: Outgoing,
    ) -> Result<Pending, IngressError> {
        let fresh = self.next_mid();
        let fresh_ts = fresh.timestamp_ms();
        let (mid, ts, produce) = match self
            .dedup
            .reserve(&from.user, &message.id, fresh, fresh_ts)
            .await?
        {
            Reservation::New => (fresh, fresh_ts, true),
            Reservation::Existing { mid, ts, confirmed } => {
                ::metrics::counter!(metrics::DUPLICATES).increment(1);
                tracing::debug!(%mid, id = %message.id, confirmed, "outbox retry");
                (mid, ts, !confirmed)
            }
        };
        let delivery = if produce {
            let event = InboundEvent::Message(Message {
                mid,
                id: message.id.clone(),
                from: from.user.clone(),
                from_device: from.device.clone(),
                to: message.to.to_string(),
                chat: message.chat,
                body: message.body,
                ts,
            });
            let payload = event::encode(&event);
            Some(
                self.producer
                    .enqueue(&self.topic, from.user.as_str(), &payload)?,
            )
        } else {
            None
        };
        Ok(Pending {
            accepted: Accepted {
                id: message.id,
                mid,
                ts,
            },
            from: from.clone(),
            delivery,
            dedup: self.dedup.clone(),
        })
    }

    /// Announces a new socket on `dak.inbound`, which starts its inbox replay.
    pub async fn connected(&self, from: &Identity, connection: &str) -> Result<(), IngressError> {
        let event = InboundEvent::Connected(Connected {
            user: from.user.clone(),
            device: from.device.clone(),
            connection: connection.to_owned(),
        });
        let delivery =
            self.producer
                .enqueue(&self.topic, from.user.as_str(), &event::encode(&event))?;
        kafka::acknowledged(delivery).await?;
        Ok(())
    }

    /// Queues a device's push-token registration and waits for Kafka.
    pub async fn push_token(&self, token: PushToken) -> Result<(), IngressError> {
        let key = token.user.to_string();
        let event = InboundEvent::PushToken(token);
        let delivery = self
            .producer
            .enqueue(&self.topic, &key, &event::encode(&event))?;
        kafka::acknowledged(delivery).await?;
        Ok(())
    }

    /// Queues a device's ack on `dak.inbound` and waits for Kafka.
    pub async fn ack(&self, from: &Identity, mids: Vec<Mid>) -> Result<(), IngressError> {
        let event = InboundEvent::Ack(Ack {
            user: from.user.clone(),
            device: from.device.clone(),
            mids,
        });
        let delivery =
            self.producer
                .enqueue(&self.topic, from.user.as_str(), &event::encode(&event))?;
        kafka::acknowledged(delivery).await?;
        Ok(())
    }
}

impl Pending {
    /// The client's id, for error frames.
    pub fn id(&self) -> &ClientId {
        &self.accepted.id
    }

    /// Waits for Kafka's acknowledgement and records the mid as durable.
    pub async fn accepted(self) -> Result<Accepted, IngressError> {
        if let Some(delivery) = self.delivery {
            kafka::acknowledged(delivery).await?;
            let a = &self.accepted;
            self.dedup
                .confirm(&self.from.user, &a.id, a.mid, a.ts)
                .await?;
            ::metrics::counter!(metrics::ACCEPTED).increment(1);
            tracing::debug!(mid = %a.mid, id = %a.id, "accepted");
        }
        Ok(self.accepted)
    }
}
