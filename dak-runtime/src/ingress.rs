//! Ingress: how a gateway turns what a client sent into events on `dak.inbound`.
//! Both gateways use it, so a message sent over REST and one sent over the
//! WebSocket get the same mid rules, the same dedup and the same durability.
//!
//! Submitting is two steps so a connection can pipeline: [`Ingress::submit`]
//! queues the record in order, and [`Pending::accepted`] waits until the bus
//! acknowledged it. Only then may the client hear `accepted`.
//!
//! Outbox dedup comes in two shapes. Beside Kafka, a dedup store (Redis, or a
//! SQLite file) reserves the client id's mid before the produce and confirms
//! it after. On the embedded log, the log keeps the entries itself and writes
//! each in the transaction of its record ([`crate::bus::Log::append_once`]):
//! one write and one wait instead of three, and no moment at which the
//! record is on disk but its entry is not.

use std::sync::{Arc, Mutex};

use dak_wire::event::{
    self, Ack, Connected, InboundEvent, Message, Notice, PushToken, RemovedDevice,
};
use dak_wire::frame::{GroupRequest, Outgoing, ReceiptRequest};
use dak_wire::group::GroupCommand;
use dak_wire::{ChatKind, ClientId, DeviceId, Mid, UserId};

use crate::auth::Identity;
use crate::bus::log::{LogError, Once, OnceRecord};
use crate::bus::{BusError, Log, ProduceFuture, Producer};
use crate::dedup::{Dedup, Reservation};
use crate::metrics;

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// Refusals are logged at most this often while they go on; each one is
/// counted in the metrics.
const REFUSALS_LOGGED_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Logs that the bus or a store refused what a client sent (it hears
/// `unavailable`): the first at once, then one line per
/// [`REFUSALS_LOGGED_EVERY`] with how many came since.
pub fn log_refusal(error: &IngressError) {
    static SPARSE: crate::telemetry::Sparse = crate::telemetry::Sparse::new(REFUSALS_LOGGED_EVERY);
    if let Some(held_back) = SPARSE.admit(std::time::Instant::now()) {
        tracing::warn!(%error, refusals_not_logged = held_back, "ingress unavailable");
    }
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
    outbox: Outbox,
    mids: Arc<Mutex<ulid::Generator>>,
}

/// Where outbox dedup entries are kept.
#[derive(Clone)]
enum Outbox {
    /// A store beside the bus: reserve, produce, confirm.
    Store(Arc<dyn Dedup>),
    /// The embedded log, in the transaction of each record.
    Log(Log),
}

/// A message queued on the bus, not yet acknowledged.
pub struct Pending {
    accepted: Accepted,
    from: Identity,
    delivery: Option<Delivery>,
    /// Set when the mid was reserved in the dedup store and is to be confirmed.
    dedup: Option<Arc<dyn Dedup>>,
}

enum Delivery {
    Bus(ProduceFuture),
    /// The log decides the mid: the fresh one, or the one appended before.
    Once(tokio::sync::oneshot::Receiver<Result<Once, LogError>>),
}

impl Ingress {
    pub fn new(producer: Producer, inbound_topic: String, dedup: Arc<dyn Dedup>) -> Self {
        Self {
            producer,
            topic: inbound_topic,
            outbox: Outbox::Store(dedup),
            mids: Arc::new(Mutex::new(ulid::Generator::new())),
        }
    }

    /// Ingress onto an embedded log that keeps the outbox dedup entries
    /// itself (opened with [`Log::open_with_dedup`]).
    pub fn with_dedup_in(log: Log, inbound_topic: String) -> Self {
        Self {
            producer: Producer::Log(log.clone()),
            topic: inbound_topic,
            outbox: Outbox::Log(log),
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
        let Outgoing {
            id,
            to,
            chat,
            body,
            ephemeral,
        } = message;
        self.submit_once(from, id, |id, mid, ts| {
            InboundEvent::Message(Message {
                mid,
                id,
                from: from.user.clone(),
                from_device: from.device.clone(),
                to,
                chat,
                body: Some(body),
                ephemeral,
                notice: None,
                ts,
            })
        })
        .await
    }

    /// Queues a group command with the same mid rules as a message: a command
    /// sent again under the same client id keeps its mid.
    pub async fn submit_group(
        &self,
        from: &Identity,
        request: GroupRequest,
    ) -> Result<Pending, IngressError> {
        let GroupRequest { id, group, op } = request;
        self.submit_once(from, id, group_command(from, group, op))
            .await
    }

    /// Queues a group command that carries no client id (a REST call): it gets a
    /// fresh mid, and its client id is that mid. Group commands are idempotent
    /// by their effect, so a repeated call changes nothing twice.
    pub fn submit_group_fresh(
        &self,
        from: &Identity,
        group: dak_wire::GroupId,
        op: dak_wire::group::GroupOp,
    ) -> Result<Pending, IngressError> {
        let mid = self.next_mid();
        let id = ClientId::parse(mid.to_string()).expect("a mid is a valid client id");
        let ts = mid.timestamp_ms();
        self.enqueue(from, &id, (mid, ts), false, group_command(from, group, op))
    }

    /// Queues a read receipt. Its mid follows from what it reports, so sending it
    /// again is harmless and needs no dedup entry.
    pub fn receipt(
        &self,
        from: &Identity,
        request: &ReceiptRequest,
    ) -> Result<Pending, IngressError> {
        let message = Message::receipt(
            request.mid,
            &request.to,
            &from.user,
            &from.device,
            request.state,
            crate::now_ms(),
        );
        let id = request.id.clone().unwrap_or_else(|| message.id.clone());
        // The receipt's mid carries the reported message's time; its ts is now.
        let (mid, ts) = (message.mid, message.ts);
        self.enqueue(from, &id, (mid, ts), false, |_, _, _| {
            InboundEvent::Message(message)
        })
    }

    /// Queues a typing notice, without waiting for the bus: it is worth nothing
    /// late, and nothing is lost if it never arrives.
    pub fn typing(&self, from: &Identity, to: String, chat: ChatKind) -> Result<(), IngressError> {
        let mid = self.next_mid();
        let event = InboundEvent::Message(Message {
            mid,
            id: ClientId::parse("typing").expect("a valid client id"),
            from: from.user.clone(),
            from_device: from.device.clone(),
            to,
            chat,
            body: None,
            ephemeral: true,
            notice: Some(Notice::Typing),
            ts: mid.timestamp_ms(),
        });
        // Dropped with the future: nobody waits for typing to be durable.
        let _unawaited =
            self.producer
                .enqueue(&self.topic, from.user.as_str(), &event::encode(&event))?;
        Ok(())
    }

    /// Reserves (sender, client id) → mid in the dedup store and, unless an
    /// earlier submit already made it durable, queues the event built for it.
    async fn submit_once(
        &self,
        from: &Identity,
        id: ClientId,
        build: impl FnOnce(ClientId, Mid, u64) -> InboundEvent,
    ) -> Result<Pending, IngressError> {
        let fresh = self.next_mid();
        let fresh_ts = fresh.timestamp_ms();
        let dedup = match &self.outbox {
            Outbox::Store(dedup) => dedup,
            Outbox::Log(log) => {
                let event = build(id.clone(), fresh, fresh_ts);
                let record = OnceRecord {
                    user: from.user.to_string(),
                    client_id: id.to_string(),
                    mid: fresh,
                    ts: fresh_ts,
                    payload: event::encode(&event),
                    rebuild: Box::new(move |mid, ts| event::encode(&with_mid(event, mid, ts))),
                };
                let answer = log
                    .append_once(&self.topic, from.user.as_str().as_bytes(), record)
                    .map_err(BusError::from)?;
                return Ok(Pending {
                    accepted: Accepted {
                        id,
                        mid: fresh,
                        ts: fresh_ts,
                    },
                    from: from.clone(),
                    delivery: Some(Delivery::Once(answer)),
                    dedup: None,
                });
            }
        };
        let reserved = metrics::timed(
            "dedup_reserve",
            dedup.reserve(&from.user, &id, fresh, fresh_ts),
        );
        match reserved.await? {
            Reservation::New => self.enqueue(from, &id, (fresh, fresh_ts), true, build),
            Reservation::Existing { mid, ts, confirmed } => {
                ::metrics::counter!(metrics::DUPLICATES).increment(1);
                tracing::debug!(%mid, %id, confirmed, "outbox retry");
                if confirmed {
                    Ok(Pending {
                        accepted: Accepted { id, mid, ts },
                        from: from.clone(),
                        delivery: None,
                        dedup: None,
                    })
                } else {
                    self.enqueue(from, &id, (mid, ts), true, build)
                }
            }
        }
    }

    /// Queues the event for `mid`, accepted at `ts`, on `dak.inbound`, keyed by
    /// the sender. A `reserved` mid came from the dedup store and is confirmed
    /// there once the bus has it.
    fn enqueue(
        &self,
        from: &Identity,
        id: &ClientId,
        (mid, ts): (Mid, u64),
        reserved: bool,
        build: impl FnOnce(ClientId, Mid, u64) -> InboundEvent,
    ) -> Result<Pending, IngressError> {
        let payload = event::encode(&build(id.clone(), mid, ts));
        let delivery = self
            .producer
            .enqueue(&self.topic, from.user.as_str(), &payload)?;
        Ok(Pending {
            accepted: Accepted {
                id: id.clone(),
                mid,
                ts,
            },
            from: from.clone(),
            delivery: Some(Delivery::Bus(delivery)),
            dedup: match &self.outbox {
                Outbox::Store(dedup) if reserved => Some(dedup.clone()),
                _ => None,
            },
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
        delivery.await?;
        Ok(())
    }

    /// Queues a device's push-token registration and waits for the bus.
    pub async fn push_token(&self, token: PushToken) -> Result<(), IngressError> {
        let key = token.user.to_string();
        let event = InboundEvent::PushToken(token);
        let delivery = self
            .producer
            .enqueue(&self.topic, &key, &event::encode(&event))?;
        delivery.await?;
        Ok(())
    }

    /// Queues the removal of one of `user`'s devices and waits for the bus.
    pub async fn device_removed(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<(), IngressError> {
        let event = InboundEvent::DeviceRemoved(RemovedDevice {
            user: user.clone(),
            device: device.clone(),
        });
        let delivery = self
            .producer
            .enqueue(&self.topic, user.as_str(), &event::encode(&event))?;
        delivery.await?;
        Ok(())
    }

    /// Queues a device's ack on `dak.inbound` and waits for the bus.
    pub async fn ack(&self, from: &Identity, mids: Vec<Mid>) -> Result<(), IngressError> {
        let event = InboundEvent::Ack(Ack {
            user: from.user.clone(),
            device: from.device.clone(),
            mids,
        });
        let delivery =
            self.producer
                .enqueue(&self.topic, from.user.as_str(), &event::encode(&event))?;
        delivery.await?;
        Ok(())
    }
}

/// `event` under another mid and time.
fn with_mid(mut event: InboundEvent, mid: Mid, ts: u64) -> InboundEvent {
    match &mut event {
        InboundEvent::Message(message) => (message.mid, message.ts) = (mid, ts),
        InboundEvent::Group(command) => (command.mid, command.ts) = (mid, ts),
        _ => {}
    }
    event
}

/// Builds the `dak.inbound` event of a group command once its mid is known.
fn group_command(
    from: &Identity,
    group: dak_wire::GroupId,
    op: dak_wire::group::GroupOp,
) -> impl FnOnce(ClientId, Mid, u64) -> InboundEvent + '_ {
    move |id, mid, ts| {
        InboundEvent::Group(GroupCommand {
            mid,
            id,
            from: from.user.clone(),
            from_device: from.device.clone(),
            group,
            op,
            ts,
        })
    }
}

impl Pending {
    /// The client's id, for error frames.
    pub fn id(&self) -> &ClientId {
        &self.accepted.id
    }

    /// Waits for the bus to acknowledge it and records the mid as durable.
    /// Once the bus has it the message is accepted, whatever the dedup store
    /// says: a confirm that fails only means a resend of the same id is
    /// produced again, under the same mid (which the recipient drops), while
    /// answering `unavailable` would make the client resend for certain.
    pub async fn accepted(mut self) -> Result<Accepted, IngressError> {
        if let Some(Delivery::Once(answer)) = self.delivery {
            let once = metrics::timed("bus_ack", answer)
                .await
                .map_err(|_| LogError::Closed)
                .map_err(BusError::from)?;
            let a = &mut self.accepted;
            match once.map_err(BusError::from)? {
                Once::Appended { mid, ts } => {
                    (a.mid, a.ts) = (mid, ts);
                    ::metrics::counter!(metrics::ACCEPTED).increment(1);
                    tracing::debug!(mid = %a.mid, id = %a.id, "accepted");
                }
                Once::Existing { mid, ts } => {
                    (a.mid, a.ts) = (mid, ts);
                    ::metrics::counter!(metrics::DUPLICATES).increment(1);
                    tracing::debug!(mid = %a.mid, id = %a.id, "outbox retry");
                }
            }
            return Ok(self.accepted);
        }
        if let Some(Delivery::Bus(delivery)) = self.delivery {
            metrics::timed("bus_ack", delivery).await?;
            let a = &self.accepted;
            if let Some(dedup) = &self.dedup {
                let confirm = dedup.confirm(&self.from.user, &a.id, a.mid, a.ts);
                if let Err(e) = metrics::timed("dedup_confirm", confirm).await {
                    ::metrics::counter!(metrics::DEDUP_CONFIRM_FAILURES).increment(1);
                    tracing::warn!(mid = %a.mid, id = %a.id, error = %e, "accepted, but the dedup entry stays unconfirmed");
                }
            }
            ::metrics::counter!(metrics::ACCEPTED).increment(1);
            tracing::debug!(mid = %a.mid, id = %a.id, "accepted");
        }
        Ok(self.accepted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{Bus, Log, LogOptions, Topics};
    use crate::dedup::MemoryDedup;
    use crate::store::StoreResult;
    use dak_wire::{DeviceId, UserId};

    /// The in-process dedup store, with a confirm that always fails, as when
    /// Redis times out right after the bus acknowledged the message.
    struct ConfirmFails(MemoryDedup);

    #[async_trait::async_trait]
    impl Dedup for ConfirmFails {
        async fn reserve(
            &self,
            from: &UserId,
            id: &ClientId,
            mid: Mid,
            ts: u64,
        ) -> StoreResult<Reservation> {
            self.0.reserve(from, id, mid, ts).await
        }

        async fn confirm(&self, _: &UserId, _: &ClientId, _: Mid, _: u64) -> StoreResult<()> {
            Err(crate::store::StoreError::Corrupt("confirm refused".into()))
        }
    }

    fn alice() -> Identity {
        Identity {
            user: UserId::parse("alice").unwrap(),
            device: DeviceId::parse("phone").unwrap(),
        }
    }

    /// A message with client id `c-1`.
    fn hi_to_bob() -> Outgoing {
        Outgoing {
            id: ClientId::parse("c-1").unwrap(),
            to: "bob".into(),
            chat: ChatKind::Direct,
            body: serde_json::value::RawValue::from_string("\"hi\"".into()).unwrap(),
            ephemeral: false,
        }
    }

    #[tokio::test]
    async fn a_message_on_the_bus_is_accepted_even_if_its_dedup_confirm_fails() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(&dir.path().join("bus.db"), LogOptions::default()).unwrap();
        let bus = Bus::log(log.clone(), Topics::with_prefix(""));
        bus.create_topics().await.unwrap();
        let dedup = Arc::new(ConfirmFails(MemoryDedup::new(
            std::time::Duration::from_secs(60),
        )));
        let ingress = Ingress::new(bus.producer().unwrap(), bus.topics().inbound.clone(), dedup);
        let (alice, message) = (alice(), hi_to_bob());
        let first = ingress
            .submit(&alice, message.clone())
            .await
            .unwrap()
            .accepted()
            .await
            .expect("durable on the bus, so accepted");
        assert_eq!(log.len(&bus.topics().inbound).unwrap(), 1);
        // The resend keeps the mid (the entry was reserved under it).
        let again = ingress
            .submit(&alice, message)
            .await
            .unwrap()
            .accepted()
            .await
            .unwrap();
        assert_eq!(again.mid, first.mid);
    }

    #[tokio::test]
    async fn on_a_log_that_keeps_dedup_a_resent_id_is_appended_once_under_its_first_mid() {
        let dir = tempfile::tempdir().unwrap();
        let dedup = crate::bus::log::LogDedup {
            ttl: std::time::Duration::from_secs(60),
            max_entries: u64::MAX,
            import: None,
        };
        let log = Log::open_with_dedup(
            &dir.path().join("bus.db"),
            LogOptions::default(),
            Some(dedup),
        )
        .unwrap();
        let bus = Bus::log(log.clone(), Topics::with_prefix(""));
        bus.create_topics().await.unwrap();
        let inbound = bus.topics().inbound.clone();
        let ingress = Ingress::with_dedup_in(log.clone(), inbound.clone());
        let (alice, message) = (alice(), hi_to_bob());
        // Pipelined, as a socket does: the resend is queued before the first
        // is written.
        let first = ingress.submit(&alice, message.clone()).await.unwrap();
        let again = ingress.submit(&alice, message).await.unwrap();
        let (first, again) = (
            first.accepted().await.unwrap(),
            again.accepted().await.unwrap(),
        );
        assert_eq!(again.mid, first.mid);
        assert_eq!(again.ts, first.ts);
        assert_eq!(log.len(&inbound).unwrap(), 1, "one record for the id");

        let consumer = bus.consumer("g", &[inbound.as_str()]).unwrap();
        let shutdown = crate::shutdown::Shutdown::new();
        let records = consumer.next_batch(10, &shutdown).await.unwrap();
        let Ok(InboundEvent::Message(stored)) = event::decode::<InboundEvent>(&records[0].payload)
        else {
            panic!("a message on dak.inbound");
        };
        assert_eq!(stored.mid, first.mid, "the record carries the accepted mid");
    }
}
