//! The delivery work itself, shared by the `dak.deliver` consumer and the retry
//! loop.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use dak_runtime::bus::{self, ProduceFuture, Producer, Record};
use dak_runtime::gateway::Gateways;
use dak_runtime::presence::{DeviceRoute, Presence};
use dak_runtime::{metrics, now_ms};
use dak_wire::event::{self, Ack, Connected, DeliverEvent, Delivery, OfflineEvent, OfflineReason};
use dak_wire::send::{SendItem, SendOutcome};
use dak_wire::{DeviceId, Message, ReceiptState, ServerFrame, UserId};
use serde_json::value::RawValue;

use crate::inflight::{InFlight, Pending};
use crate::{Config, Deps};

/// Most deliveries the retry loop claims at once.
const CLAIM_LIMIT: usize = 1000;

pub(crate) struct Core {
    config: Config,
    inflight: Arc<dyn InFlight>,
    presence: Arc<dyn Presence>,
    gateways: Gateways,
    producer: Producer,
    offline_topic: String,
    deliver_topic: String,
}

/// Events for `dak.offline` collected while handling a batch, published together.
#[derive(Default)]
struct Offline {
    events: Vec<(UserId, OfflineEvent)>,
}

impl Offline {
    fn store(
        &mut self,
        user: &UserId,
        device: Option<&DeviceId>,
        reason: OfflineReason,
        message: &Message,
    ) {
        let label = match reason {
            OfflineReason::NotConnected => "not_connected",
            OfflineReason::AckTimeout => "ack_timeout",
            OfflineReason::NoDevice => "no_device",
        };
        ::metrics::counter!(metrics::OFFLINED, "reason" => label).increment(1);
        tracing::debug!(mid = %message.mid, %user, reason = label, "handing to offline");
        self.events.push((
            user.clone(),
            OfflineEvent::Store {
                user: user.clone(),
                device: device.cloned(),
                reason,
                message: message.clone(),
            },
        ));
    }
}

/// One delivery on its way to a socket.
struct Send {
    pending: Pending,
    url: String,
    connection: String,
}

impl Core {
    pub(crate) fn new(
        config: Config,
        deps: Deps,
        offline_topic: String,
        deliver_topic: String,
    ) -> Self {
        Self {
            gateways: Gateways::new(deps.internal_token, config.gateway_timeout),
            config,
            inflight: deps.inflight,
            presence: deps.presence,
            producer: deps.producer,
            offline_topic,
            deliver_topic,
        }
    }

    pub(crate) async fn flush(&self) {
        self.producer.flush(Duration::from_secs(5)).await;
    }

    fn ack_deadline(&self, now: u64) -> u64 {
        now + self.config.ack_timeout.as_millis() as u64
    }

    /// How long a message waits for its device's replay to finish: as long as it
    /// would wait for acks over every attempt.
    fn hold_deadline(&self, now: u64) -> u64 {
        now + self.config.ack_timeout.as_millis() as u64 * u64::from(self.config.retries + 1)
    }

    /// Handles one batch from `dak.deliver` in stream order. Consecutive messages
    /// are delivered together; a connect or replay event is a boundary, since it
    /// changes how the messages after it are routed. Acks go last: an ack can
    /// only be for a message delivered before it.
    pub(crate) async fn handle_batch(&self, records: &[Record]) -> anyhow::Result<()> {
        let mut messages = Vec::new();
        let mut acks = Vec::new();
        for record in records {
            match event::decode::<DeliverEvent>(&record.payload) {
                Ok(DeliverEvent::Message(d)) => {
                    metrics::message_age("session", d.message.ts);
                    messages.push(d);
                }
                Ok(DeliverEvent::Ack(a)) => acks.push(a),
                Ok(DeliverEvent::Connected(c)) => {
                    self.deliver(std::mem::take(&mut messages)).await?;
                    self.connected(c).await?;
                }
                Ok(DeliverEvent::Replayed(c)) => {
                    self.deliver(std::mem::take(&mut messages)).await?;
                    self.replayed(c).await?;
                }
                Err(e) => {
                    ::metrics::counter!(metrics::DROPPED_EVENTS, "topic" => "deliver").increment(1);
                    tracing::warn!(
                        partition = record.partition,
                        offset = record.offset,
                        reason = %e.message,
                        "dropping deliver event"
                    );
                }
            }
        }
        self.deliver(messages).await?;
        self.acks(acks).await
    }

    async fn deliver(&self, deliveries: Vec<Delivery>) -> anyhow::Result<()> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let routes = self.routes(deliveries.iter().map(|d| &d.recipient)).await?;
        let now = now_ms();
        let mut offline = Offline::default();
        let mut candidates: Vec<(Pending, Option<(String, String)>)> = Vec::new();
        let mut ephemeral = Vec::new();
        for d in deliveries {
            let devices = &routes[&d.recipient];
            // A sender's own other devices get what it wrote (typing included);
            // the device it came from does not. Notices go to every device.
            let written = matches!(d.message.notice, None | Some(dak_wire::Notice::Typing));
            let from_here = |route: &DeviceRoute| {
                written && d.recipient == d.message.from && route.device == d.message.from_device
            };
            if d.message.ephemeral {
                // Connected devices only: sent once, never held, retried or stored.
                for route in devices.iter().filter(|r| !from_here(r)) {
                    if let Some((url, connection)) = route.live_socket() {
                        ephemeral.push(Send {
                            pending: Pending {
                                user: d.recipient.clone(),
                                device: route.device.clone(),
                                message: d.message.clone(),
                                sends: 1,
                                first_sent_ms: now,
                                deadline_ms: now,
                            },
                            url: url.to_owned(),
                            connection: connection.to_owned(),
                        });
                    }
                }
                continue;
            }
            if let Some(only) = &d.device {
                if !devices.iter().any(|r| &r.device == only) {
                    offline.store(
                        &d.recipient,
                        Some(only),
                        OfflineReason::NotConnected,
                        &d.message,
                    );
                    continue;
                }
            } else if devices.is_empty() {
                offline.store(&d.recipient, None, OfflineReason::NoDevice, &d.message);
                continue;
            }
            for route in devices {
                if from_here(route) || d.device.as_ref().is_some_and(|only| only != &route.device) {
                    continue;
                }
                let pending = |sends, deadline_ms| Pending {
                    user: d.recipient.clone(),
                    device: route.device.clone(),
                    message: d.message.clone(),
                    sends,
                    first_sent_ms: now,
                    deadline_ms,
                };
                if let Some((url, connection)) = route.live_socket() {
                    let target = Some((url.to_owned(), connection.to_owned()));
                    candidates.push((pending(1, self.ack_deadline(now)), target));
                } else if route.gateway_url.is_some() {
                    // Connected, replay still running: hold it until `replayed`.
                    candidates.push((pending(0, self.hold_deadline(now)), None));
                } else {
                    offline.store(
                        &d.recipient,
                        Some(&route.device),
                        OfflineReason::NotConnected,
                        &d.message,
                    );
                }
            }
        }

        // Recorded before sending, so an ack can never find its delivery missing.
        let pending: Vec<Pending> = candidates.iter().map(|(p, _)| p.clone()).collect();
        let fresh = self.inflight.begin(&pending).await?;
        let to_send: Vec<Send> = candidates
            .into_iter()
            .zip(fresh)
            .filter_map(|((pending, target), fresh)| {
                let (url, connection) = target.filter(|_| fresh)?;
                Some(Send {
                    pending,
                    url,
                    connection,
                })
            })
            .collect();

        for (_, outcome) in self.send(ephemeral).await {
            if outcome == SendOutcome::Sent {
                ::metrics::counter!(metrics::EPHEMERAL).increment(1);
            }
        }

        let mut gone = Vec::new();
        for (p, outcome) in self.send(to_send).await {
            match outcome {
                SendOutcome::Sent => {
                    ::metrics::counter!(metrics::DELIVERED).increment(1);
                    metrics::message_age("sent", p.message.ts);
                }
                // The retry loop sends it again when the deadline passes.
                SendOutcome::Busy => {}
                SendOutcome::NotConnected => {
                    offline.store(
                        &p.user,
                        Some(&p.device),
                        OfflineReason::NotConnected,
                        &p.message,
                    );
                    gone.push(p);
                }
            }
        }
        self.publish(offline).await?;
        self.inflight.remove(&gone).await?;
        Ok(())
    }

    /// A device connected: ask persistence to replay its inbox to that socket.
    /// The request travels on `dak.offline` behind every `store` published for the
    /// user so far, so the replay includes all of them.
    async fn connected(&self, connected: Connected) -> anyhow::Result<()> {
        let routes = self.routes(std::iter::once(&connected.user)).await?;
        let socket = routes[&connected.user]
            .iter()
            .find(|r| {
                r.device == connected.device
                    && r.connection.as_deref() == Some(&connected.connection)
            })
            .and_then(|r| r.gateway_url.clone());
        let Some(gateway_url) = socket else {
            tracing::debug!(user = %connected.user, device = %connected.device, "connection gone before its replay");
            return Ok(());
        };
        let user = connected.user.clone();
        let event = OfflineEvent::Replay {
            connected,
            gateway_url,
        };
        let mut offline = Offline::default();
        offline.events.push((user, event));
        self.publish(offline).await
    }

    /// Persistence finished the replay: the socket goes live, and what was held
    /// for it is sent, in order, before anything newer.
    async fn replayed(&self, connected: Connected) -> anyhow::Result<()> {
        let Connected {
            user,
            device,
            connection,
        } = connected;
        if !self.presence.set_live(&user, &device, &connection).await? {
            // A newer connection took over; its own replay releases the held messages.
            return Ok(());
        }
        let routes = self.routes(std::iter::once(&user)).await?;
        let Some(url) = routes[&user]
            .iter()
            .find(|r| r.device == device)
            .and_then(|r| r.live_socket())
            .map(|(url, _)| url.to_owned())
        else {
            return Ok(());
        };
        let held = self.inflight.take_held(&user, &device).await?;
        tracing::debug!(%user, %device, held = held.len(), "device live");
        let now = now_ms();
        let to_send = held
            .into_iter()
            .map(|mut pending| {
                pending.sends = 1;
                pending.first_sent_ms = now;
                pending.deadline_ms = self.ack_deadline(now);
                Send {
                    pending,
                    url: url.clone(),
                    connection: connection.clone(),
                }
            })
            .collect();
        let mut offline = Offline::default();
        let mut gone = Vec::new();
        self.send_tracked(to_send, &mut offline, &mut gone).await?;
        self.publish(offline).await?;
        self.inflight.remove(&gone).await?;
        Ok(())
    }

    /// Removes acked deliveries, sends the senders a `delivered` receipt for
    /// each, and forwards what was not in flight to storage as a `drop`.
    async fn acks(&self, acks: Vec<Ack>) -> anyhow::Result<()> {
        let mut forwards: Vec<ProduceFuture> = Vec::new();
        for ack in acks {
            let found = self.inflight.ack(&ack.user, &ack.device, &ack.mids).await?;
            let now = now_ms();
            let mut forward = Vec::new();
            for (mid, pending) in ack.mids.iter().zip(found) {
                match pending {
                    Some(p) => {
                        ::metrics::counter!(metrics::ACKED).increment(1);
                        let latency = now.saturating_sub(p.first_sent_ms) as f64 / 1000.0;
                        ::metrics::histogram!(metrics::ACK_LATENCY).record(latency);
                        tracing::debug!(%mid, user = %ack.user, device = %ack.device, "acked");
                        if let Some(receipt) = Message::receipt_for(
                            &p.message,
                            &ack.user,
                            &ack.device,
                            ReceiptState::Delivered,
                            now,
                        ) {
                            ::metrics::counter!(metrics::RECEIPTS).increment(1);
                            let key = receipt.recipient.to_string();
                            let payload = event::encode(&DeliverEvent::Message(receipt));
                            forwards.push(self.producer.enqueue(
                                &self.deliver_topic,
                                &key,
                                &payload,
                            )?);
                        }
                        // Past its deadline the delivery may be on its way to the
                        // inbox right now: tell storage to drop it, to be sure.
                        if now > p.deadline_ms {
                            forward.push(*mid);
                        }
                    }
                    None => forward.push(*mid),
                }
            }
            if !forward.is_empty() {
                ::metrics::counter!(metrics::FORWARDED_ACKS).increment(forward.len() as u64);
                let event = OfflineEvent::Drop(Ack {
                    user: ack.user.clone(),
                    device: ack.device.clone(),
                    mids: forward,
                });
                let payload = event::encode(&event);
                forwards.push(self.producer.enqueue(
                    &self.offline_topic,
                    ack.user.as_str(),
                    &payload,
                )?);
            }
        }
        bus::acknowledged_all(forwards).await?;
        Ok(())
    }

    /// Every delivery past its deadline: sent again, or handed to offline after
    /// the last retry.
    pub(crate) async fn retry_loop(&self, shutdown: &dak_runtime::shutdown::Shutdown) {
        let mut tick = tokio::time::interval(self.config.scan_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut scans: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = self.retry_due().await {
                tracing::warn!(error = %format!("{e:#}"), "retry scan failed");
            }
            scans += 1;
            if scans.is_multiple_of(50) {
                if let Ok(n) = self.inflight.count().await {
                    ::metrics::gauge!(metrics::INFLIGHT).set(n as f64);
                }
            }
        }
    }

    async fn retry_due(&self) -> anyhow::Result<()> {
        let lease = self.config.retry_lease.as_millis() as u64;
        loop {
            let now = now_ms();
            // Claimed deliveries are leased, so this loop ends once everything
            // due was claimed.
            let claimed = self.inflight.claim_due(now, lease, CLAIM_LIMIT).await?;
            if claimed.is_empty() {
                return Ok(());
            }
            let mut offline = Offline::default();
            let mut finished = Vec::new();
            let (exhausted, again): (Vec<Pending>, Vec<Pending>) = claimed
                .into_iter()
                .partition(|p| p.sends > self.config.retries);
            for p in exhausted {
                offline.store(
                    &p.user,
                    Some(&p.device),
                    OfflineReason::AckTimeout,
                    &p.message,
                );
                finished.push(p);
            }

            let routes = self.routes(again.iter().map(|p| &p.user)).await?;
            let mut to_send = Vec::new();
            for mut p in again {
                let route = routes[&p.user].iter().find(|r| r.device == p.device);
                match route {
                    Some(route) if route.live_socket().is_some() => {
                        let (url, connection) = route.live_socket().expect("checked");
                        if p.is_held() {
                            p.first_sent_ms = now;
                        }
                        p.sends += 1;
                        p.deadline_ms = self.ack_deadline(now);
                        to_send.push(Send {
                            pending: p,
                            url: url.to_owned(),
                            connection: connection.to_owned(),
                        });
                    }
                    Some(route) if route.gateway_url.is_some() && !p.is_held() => {
                        // Sent to an earlier socket; the device reconnected and is
                        // replaying. Hold it for the new socket.
                        p.sends = 0;
                        p.deadline_ms = self.hold_deadline(now);
                        self.inflight.resent(&p).await?;
                    }
                    Some(route) if route.gateway_url.is_some() => {
                        // Held past its deadline: the replay never finished.
                        offline.store(
                            &p.user,
                            Some(&p.device),
                            OfflineReason::AckTimeout,
                            &p.message,
                        );
                        finished.push(p);
                    }
                    _ => {
                        offline.store(
                            &p.user,
                            Some(&p.device),
                            OfflineReason::NotConnected,
                            &p.message,
                        );
                        finished.push(p);
                    }
                }
            }
            self.send_tracked(to_send, &mut offline, &mut finished)
                .await?;
            // Published before the records go: a crash in between only repeats the
            // hand-over, which storage takes idempotently by mid.
            self.publish(offline).await?;
            self.inflight.remove(&finished).await?;
        }
    }

    /// Sends deliveries already recorded in flight and records each new send; a
    /// device found gone goes to `offline` and its delivery to `finished`.
    async fn send_tracked(
        &self,
        to_send: Vec<Send>,
        offline: &mut Offline,
        finished: &mut Vec<Pending>,
    ) -> anyhow::Result<()> {
        for (p, outcome) in self.send(to_send).await {
            match outcome {
                SendOutcome::Sent | SendOutcome::Busy => {
                    if p.sends > 1 {
                        ::metrics::counter!(metrics::RETRIED).increment(1);
                    }
                    if outcome == SendOutcome::Sent {
                        ::metrics::counter!(metrics::DELIVERED).increment(1);
                    }
                    tracing::debug!(mid = %p.message.mid, user = %p.user, device = %p.device, sends = p.sends, "sent");
                    // False when the ack arrived meanwhile: nothing left to do.
                    self.inflight.resent(&p).await?;
                }
                SendOutcome::NotConnected => {
                    offline.store(
                        &p.user,
                        Some(&p.device),
                        OfflineReason::NotConnected,
                        &p.message,
                    );
                    finished.push(p);
                }
            }
        }
        Ok(())
    }

    /// Presence for each distinct user, in one store round trip.
    async fn routes<'a>(
        &self,
        users: impl Iterator<Item = &'a UserId>,
    ) -> anyhow::Result<HashMap<UserId, Vec<DeviceRoute>>> {
        let mut distinct: Vec<UserId> = users.cloned().collect();
        distinct.sort_unstable();
        distinct.dedup();
        let routes = self.presence.routes(&distinct).await?;
        Ok(distinct.into_iter().zip(routes).collect())
    }

    /// Hands each delivery to its gateway, one request per gateway, addressed to
    /// the socket it was meant for.
    async fn send(&self, deliveries: Vec<Send>) -> Vec<(Pending, SendOutcome)> {
        if deliveries.is_empty() {
            return Vec::new();
        }
        let mut batches: HashMap<String, Vec<(usize, SendItem)>> = HashMap::new();
        for (i, d) in deliveries.iter().enumerate() {
            let frame = ServerFrame::from(&d.pending.message).to_json();
            let item = SendItem {
                user: d.pending.user.clone(),
                device: d.pending.device.clone(),
                connection: Some(d.connection.clone()),
                frame: RawValue::from_string(frame).expect("server frames are JSON"),
            };
            batches.entry(d.url.clone()).or_default().push((i, item));
        }
        let mut outcomes = vec![SendOutcome::NotConnected; deliveries.len()];
        for (i, outcome) in self.gateways.send_all(batches).await {
            outcomes[i] = outcome;
        }
        deliveries
            .into_iter()
            .map(|d| d.pending)
            .zip(outcomes)
            .collect()
    }

    async fn publish(&self, offline: Offline) -> anyhow::Result<()> {
        let mut acks = Vec::with_capacity(offline.events.len());
        for (user, event) in &offline.events {
            acks.push(self.producer.enqueue(
                &self.offline_topic,
                user.as_str(),
                &event::encode(event),
            )?);
        }
        bus::acknowledged_all(acks).await?;
        Ok(())
    }
}
