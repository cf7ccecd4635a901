//! The delivery work itself, shared by the `dak.deliver` consumer and the retry
//! loop.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dak_runtime::bus::{self, DeadLetters, ProduceFuture, Producer, Record, Settle};
use dak_runtime::gateway::Gateways;
use dak_runtime::presence::{DeviceRoute, Presence};
use dak_runtime::status::{self, Reporter};
use dak_runtime::store::Durable;
use dak_runtime::{metrics, now_ms};
use dak_wire::event::{
    self, Ack, Connected, DeliverEvent, Delivery, DeviceStep, OfflineEvent, OfflineReason,
    RemovedDevice,
};
use dak_wire::frame::DEVICE_REMOVED;
use dak_wire::send::{SendItem, SendOutcome};
use dak_wire::{DeviceId, Message, Mid, ReceiptState, ServerFrame, UserId};
use futures_util::future::join_all;
use serde_json::value::RawValue;

use crate::inflight::{InFlight, Pending};
use crate::{Config, Deps};

/// Most deliveries the retry loop claims at once.
const CLAIM_LIMIT: usize = 1000;

/// A deadline past every real one (about 73 million years from 1970), and
/// far enough below `i64::MAX` that a store may add a lease to it.
const ORPHAN_HORIZON_MS: u64 = (i64::MAX as u64) / 4;

pub(crate) struct Core {
    config: Config,
    dead_letters: DeadLetters,
    inflight: Arc<dyn InFlight>,
    presence: Arc<dyn Presence>,
    gateways: Gateways,
    producer: Producer,
    status: Reporter,
    offline_topic: String,
    deliver_topic: String,
    /// See [`Deps::only_instance`].
    only_instance: bool,
    /// The deliveries [`Core::store_orphans`] handed to the inboxes. If the
    /// earlier process died before committing its `dak.deliver` offset, the
    /// same deliveries are read again; they are in the inbox already, so they
    /// are not sent live a second time.
    orphans: std::sync::Mutex<HashSet<DeliveryKey>>,
    /// Deliveries acked in a batch whose ack has not settled yet: still in
    /// flight, so an ack of the next batch would find them again.
    settling: Arc<std::sync::Mutex<HashSet<DeliveryKey>>>,
}

/// A delivery: to whom, to which device, what.
type DeliveryKey = (UserId, DeviceId, Mid);

/// Deliveries of [`Core::settling`] until this is dropped: when their ack
/// settled, or failed (then the batch is handled again and finds them).
struct Settling {
    set: Arc<std::sync::Mutex<HashSet<DeliveryKey>>>,
    keys: Vec<DeliveryKey>,
}

impl Settling {
    fn start(set: &Arc<std::sync::Mutex<HashSet<DeliveryKey>>>, keys: Vec<DeliveryKey>) -> Self {
        set.lock()
            .expect("settling lock")
            .extend(keys.iter().cloned());
        Self {
            set: set.clone(),
            keys,
        }
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        let mut set = self.set.lock().expect("settling lock");
        for key in &self.keys {
            set.remove(key);
        }
    }
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

/// What the retry loop does with a delivery it claimed past its deadline.
#[derive(Debug, PartialEq, Eq)]
enum Retry {
    /// Send it again, to the device's live socket.
    Send { url: String, connection: String },
    /// Hold it: sent to an earlier socket, and the device reconnected and is
    /// replaying. The new socket gets it once live.
    Hold,
    /// Hand it to the offline inbox.
    Offline(OfflineReason),
}

/// The retry loop's decision for `pending`, given the device's route in
/// presence now (`None`: presence knows no socket of the device, as after a
/// restart of `dak up`, whose presence starts empty).
fn retry_plan(pending: &Pending, route: Option<&DeviceRoute>, retries: u32) -> Retry {
    if pending.sends > retries {
        return Retry::Offline(OfflineReason::AckTimeout);
    }
    let Some(route) = route.filter(|r| r.gateway_url.is_some()) else {
        return Retry::Offline(OfflineReason::NotConnected);
    };
    match route.live_socket() {
        Some((url, connection)) => Retry::Send {
            url: url.to_owned(),
            connection: connection.to_owned(),
        },
        None if !pending.is_held() => Retry::Hold,
        // Held past its deadline: the replay never finished.
        None => Retry::Offline(OfflineReason::AckTimeout),
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
        dead_letters: DeadLetters,
        offline_topic: String,
        deliver_topic: String,
    ) -> Self {
        Self {
            status: deps.status,
            dead_letters,
            gateways: Gateways::new(deps.internal_token, config.gateway_timeout)
                .with_local(deps.local_gateway),
            config,
            inflight: deps.inflight,
            presence: deps.presence,
            producer: deps.producer,
            offline_topic,
            deliver_topic,
            only_instance: deps.only_instance,
            orphans: Default::default(),
            settling: Default::default(),
        }
    }

    fn is_orphan(&self, user: &UserId, device: &DeviceId, mid: Mid) -> bool {
        let orphans = self.orphans.lock().expect("orphans lock");
        !orphans.is_empty() && orphans.contains(&(user.clone(), device.clone(), mid))
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
    /// only be for a message delivered before it. What it returns settles
    /// once the batch's deliveries are durable in flight, and the acks'
    /// receipts, drops and status steps, and the replay requests, are on the
    /// bus.
    pub(crate) async fn handle_batch(&self, records: &[Record]) -> anyhow::Result<Settle> {
        let mut messages = Vec::new();
        let mut acks = Vec::new();
        let mut replays = Vec::new();
        let mut recorded = Vec::new();
        for record in records {
            match event::decode::<DeliverEvent>(&record.payload) {
                Ok(DeliverEvent::Message(d)) => {
                    metrics::message_age("session", d.message.ts);
                    messages.push(d);
                }
                Ok(DeliverEvent::Ack(a)) => acks.push(a),
                Ok(DeliverEvent::Connected(c)) => {
                    recorded.push(self.deliver(std::mem::take(&mut messages)).await?);
                    replays.extend(self.connected(c).await?);
                }
                Ok(DeliverEvent::Replayed(c)) => {
                    recorded.push(self.deliver(std::mem::take(&mut messages)).await?);
                    self.replayed(c).await?;
                }
                Ok(DeliverEvent::DeviceRemoved(removed)) => {
                    recorded.push(self.deliver(std::mem::take(&mut messages)).await?);
                    self.device_removed(removed).await?;
                }
                Err(e) => self.dead_letters.park(record, &e.message).await?,
            }
        }
        recorded.push(self.deliver(messages).await?);
        self.acks(acks, replays, recorded).await
    }

    /// Sends `deliveries` to their devices' sockets, holds them, or hands
    /// them to the inbox. Each is sent once the in-flight store has it,
    /// maybe before it is durable there: what this returns resolves once it
    /// is, and the batch settles only then.
    async fn deliver(&self, deliveries: Vec<Delivery>) -> anyhow::Result<Durable> {
        if deliveries.is_empty() {
            return Ok(Durable::already());
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
                if from_here(route)
                    || d.device.as_ref().is_some_and(|only| only != &route.device)
                    || self.is_orphan(&d.recipient, &route.device, d.message.mid)
                {
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

        // Recorded before sending, so an ack can never find its delivery
        // missing (the store answers calls in order; a crash before the
        // record is durable reads the batch again and sends it again);
        // reported `delivered` before sending too (see [`Core::report_sends`]),
        // meanwhile.
        let pending: Vec<Pending> = candidates.iter().map(|(p, _)| p.clone()).collect();
        let live: Vec<&Pending> = candidates
            .iter()
            .filter(|(_, target)| target.is_some())
            .map(|(p, _)| p)
            .collect();
        let ((fresh, durable), ()) = tokio::try_join!(
            async {
                let begun = metrics::timed("inflight_begin", self.inflight.begin_early(&pending));
                Ok::<_, anyhow::Error>(begun.await?)
            },
            metrics::timed("status_report", self.report_sends(live)),
        )?;
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
        for (p, outcome) in metrics::timed("gateway_send", self.send(to_send)).await {
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
        Ok(durable)
    }

    /// A device connected: ask persistence to replay its inbox to that socket.
    /// The request travels on `dak.offline` behind every `store` published for the
    /// user so far, so the replay includes all of them. Nothing later in the
    /// batch waits for it to be durable (the device's deliveries are held
    /// until `replayed` comes back): the batch settles once it is, so a
    /// crowd of devices connecting at once costs one wait, not one each.
    async fn connected(&self, connected: Connected) -> anyhow::Result<Option<ProduceFuture>> {
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
            return Ok(None);
        };
        let user = connected.user.clone();
        let event = OfflineEvent::Replay {
            connected,
            gateway_url,
        };
        Ok(Some(self.enqueue_offline(&user, &event)?))
    }

    /// The user removed the device: its socket, if it has one, gets
    /// `device.removed`, and its gateway closes it once that is written. A
    /// socket that is gone or not draining is left alone: it gets nothing
    /// new either way.
    async fn device_removed(&self, removed: RemovedDevice) -> anyhow::Result<()> {
        let RemovedDevice { user, device } = removed;
        let Some((url, connection)) = self.presence.socket(&user, &device).await? else {
            return Ok(());
        };
        let item = SendItem {
            user: user.clone(),
            device: device.clone(),
            connection: Some(connection),
            frame: RawValue::from_string(DEVICE_REMOVED.to_owned())?,
        };
        let outcome = self.gateways.send(&url, vec![item]).await;
        tracing::info!(%user, %device, ?outcome, "told the socket of a removed device");
        Ok(())
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

    /// Sends the senders of acked deliveries a `delivered` receipt for each,
    /// forwards what was not in flight to storage as a `drop`, and removes the
    /// acked deliveries once all of that is on the bus. The only session
    /// ([`Deps::only_instance`]) delivers the receipts itself, here, as it
    /// delivers messages; any other puts them on the senders' streams. It is
    /// left to settle: nothing later in the batch depends on it, and the next
    /// batch can start meanwhile. Until it settles the deliveries stay in flight, so an ack
    /// handled again (the process died, or the bus refused a record) finds
    /// them again and sends their receipts again, under the same `rid`.
    /// `replays`, the batch's replay requests, and `recorded`, its deliveries
    /// becoming durable in flight, settle with them.
    async fn acks(
        &self,
        acks: Vec<Ack>,
        replays: Vec<ProduceFuture>,
        mut recorded: Vec<Durable>,
    ) -> anyhow::Result<Settle> {
        let mut forwards: Vec<ProduceFuture> = replays;
        let mut acked = Vec::new();
        let mut done = Vec::new();
        let mut receipts = Vec::new();
        let found = metrics::timed("inflight_ack", self.inflight.acked(&acks)).await?;
        let found = {
            let settling = self.settling.lock().expect("settling lock");
            once_per_delivery(&acks, found, &settling)
        };
        for (ack, found) in acks.iter().zip(found) {
            let now = now_ms();
            let mut forward = Vec::new();
            for (mid, pending) in ack.mids.iter().zip(found) {
                match pending {
                    Some(p) => {
                        ::metrics::counter!(metrics::ACKED).increment(1);
                        acked.extend(status::device_step(
                            &p.message,
                            &ack.user,
                            Some(&ack.device),
                            DeviceStep::Acked,
                            now,
                        ));
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
                            if self.only_instance {
                                receipts.push(receipt);
                            } else {
                                let key = receipt.recipient.to_string();
                                let payload = event::encode(&DeliverEvent::Message(receipt));
                                forwards.push(self.producer.enqueue(
                                    &self.deliver_topic,
                                    &key,
                                    &payload,
                                )?);
                            }
                        }
                        // Past its deadline the delivery may be on its way to the
                        // inbox right now: tell storage to drop it, to be sure.
                        if now > p.deadline_ms {
                            forward.push(*mid);
                        }
                        done.push(p);
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
                forwards.push(self.enqueue_offline(&ack.user, &event)?);
            }
        }
        forwards.extend(self.status.enqueue(acked)?);
        // In flight (or on their way to the inbox) before the acked
        // deliveries go.
        recorded.push(self.deliver(receipts).await?);
        let inflight = self.inflight.clone();
        let keys = done
            .iter()
            .map(|p| (p.user.clone(), p.device.clone(), p.message.mid))
            .collect();
        let settling = Settling::start(&self.settling, keys);
        Ok(Settle::new(async move {
            let _settling = settling;
            let (durable, forwarded) =
                tokio::join!(Durable::all(recorded), bus::acknowledged_all(forwards));
            durable?;
            forwarded?;
            inflight.remove(&done).await?;
            Ok(())
        }))
    }

    /// Every delivery past its deadline: sent again, or handed to offline after
    /// the last retry. While the store is known to hold nothing, it sleeps
    /// until a delivery is written.
    pub(crate) async fn retry_loop(&self, shutdown: &dak_runtime::shutdown::Shutdown) {
        let mut tick = tokio::time::interval(self.config.scan_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut scans: u64 = 0;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.inflight.known_empty() {
                ::metrics::gauge!(metrics::INFLIGHT).set(0.0);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.inflight.wait_while_empty() => {}
                }
            }
            if let Err(e) = self.retry_due().await {
                tracing::warn!(error = %format!("{e:#}"), "retry scan failed");
            }
            // Counted on the first scan, then every 50th.
            if scans.is_multiple_of(50) {
                if let Ok(n) = self.inflight.count().await {
                    ::metrics::gauge!(metrics::INFLIGHT).set(n as f64);
                }
            }
            scans += 1;
        }
    }

    /// At start-up, when presence does not outlive the process (`dak up`):
    /// every delivery still in flight went to a socket of a process that is
    /// gone. Each goes to the device's inbox now, in the order it was sent,
    /// before anything newer for the device is routed, so the replay on the
    /// device's next connect keeps the conversation's order. Run it before
    /// the gateway takes sockets.
    pub(crate) async fn store_orphans(&self) -> anyhow::Result<()> {
        if self.presence.outlives_the_process() {
            return Ok(());
        }
        self.retry_due_at(Some(ORPHAN_HORIZON_MS)).await
    }

    async fn retry_due(&self) -> anyhow::Result<()> {
        self.retry_due_at(None).await
    }

    /// Claims what is due by `horizon` (default: now) and acts on each.
    /// Claims up to a horizon take no lease, so that whatever a crash leaves
    /// claimed is due again at the next start-up.
    async fn retry_due_at(&self, horizon: Option<u64>) -> anyhow::Result<()> {
        let lease = match horizon {
            Some(_) => 0,
            None => self.config.retry_lease.as_millis() as u64,
        };
        loop {
            let now = now_ms();
            // Claimed deliveries are leased, so this loop ends once everything
            // due was claimed.
            let claimed = self
                .inflight
                .claim_due(horizon.unwrap_or(now), lease, CLAIM_LIMIT)
                .await?;
            if claimed.is_empty() {
                return Ok(());
            }
            let mut offline = Offline::default();
            let mut finished = Vec::new();
            let mut to_send = Vec::new();
            let mut rehold = Vec::new();
            let routes = self.routes(claimed.iter().map(|p| &p.user)).await?;
            for mut p in claimed {
                let route = routes[&p.user].iter().find(|r| r.device == p.device);
                let plan = match horizon {
                    // Orphans: their socket is gone whatever presence says.
                    Some(_) => Retry::Offline(OfflineReason::NotConnected),
                    None => retry_plan(&p, route, self.config.retries),
                };
                match plan {
                    Retry::Send { url, connection } => {
                        if p.is_held() {
                            p.first_sent_ms = now;
                        }
                        p.sends += 1;
                        p.deadline_ms = self.ack_deadline(now);
                        to_send.push(Send {
                            pending: p,
                            url,
                            connection,
                        });
                    }
                    Retry::Hold => {
                        p.sends = 0;
                        p.deadline_ms = self.hold_deadline(now);
                        rehold.push(p);
                    }
                    Retry::Offline(reason) => {
                        if horizon.is_some() {
                            self.orphans.lock().expect("orphans lock").insert((
                                p.user.clone(),
                                p.device.clone(),
                                p.message.mid,
                            ));
                        }
                        offline.store(&p.user, Some(&p.device), reason, &p.message);
                        finished.push(p);
                    }
                }
            }
            // Concurrent, so a store with group commit writes them together.
            for held in join_all(rehold.iter().map(|p| self.inflight.resent(p))).await {
                held?;
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
        self.report_sends(to_send.iter().map(|d| &d.pending).collect())
            .await?;
        let mut resent = Vec::new();
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
                    resent.push(p);
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
        // Concurrent, so a store with group commit writes them together. An
        // update finds nothing when the ack arrived meanwhile: nothing to do.
        for updated in join_all(resent.iter().map(|p| self.inflight.resent(p))).await {
            updated?;
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
        let routes = metrics::timed("presence", self.presence.routes(&distinct)).await?;
        Ok(distinct.into_iter().zip(routes).collect())
    }

    /// Reports deliveries about to be sent `delivered` (or `retried`), and
    /// returns once the reports are kept: before the device can see the
    /// message, so that a read receipt from the device always finds the report
    /// ahead of it.
    async fn report_sends(&self, sends: Vec<&Pending>) -> anyhow::Result<()> {
        let now = now_ms();
        let steps: Vec<_> = sends
            .into_iter()
            .filter_map(|p| {
                let step = if p.sends > 1 {
                    DeviceStep::Retried
                } else {
                    DeviceStep::Delivered
                };
                status::device_step(&p.message, &p.user, Some(&p.device), step, now)
            })
            .collect();
        self.status.report(steps).await?;
        Ok(())
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
        let acks = offline
            .events
            .iter()
            .map(|(user, event)| self.enqueue_offline(user, event))
            .collect::<Result<Vec<_>, _>>()?;
        bus::acknowledged_all(acks).await?;
        Ok(())
    }

    /// Queues `event` on `dak.offline`, keyed by `user` like every event there.
    fn enqueue_offline(
        &self,
        user: &UserId,
        event: &OfflineEvent,
    ) -> Result<ProduceFuture, bus::BusError> {
        self.producer
            .enqueue(&self.offline_topic, user.as_str(), &event::encode(event))
    }
}

/// What the in-flight store found for `acks`, with a delivery acked more
/// than once in the batch kept at its first ack only, and one whose ack of
/// an earlier batch is `settling` not at all: it is acked (and its receipt
/// sent) once, as if the first ack had removed it before the next.
fn once_per_delivery(
    acks: &[Ack],
    found: Vec<Vec<Option<Pending>>>,
    settling: &HashSet<DeliveryKey>,
) -> Vec<Vec<Option<Pending>>> {
    let mut seen = HashSet::new();
    acks.iter()
        .zip(found)
        .map(|(ack, found)| {
            ack.mids
                .iter()
                .zip(found)
                .map(|(mid, pending)| {
                    pending.filter(|_| {
                        seen.insert((&ack.user, &ack.device, *mid))
                            && (settling.is_empty()
                                || !settling.contains(&(
                                    ack.user.clone(),
                                    ack.device.clone(),
                                    *mid,
                                )))
                    })
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use dak_wire::{ChatKind, ClientId, Mid};

    use super::*;

    fn pending(sends: u32) -> Pending {
        Pending {
            user: UserId::parse("bob").unwrap(),
            device: DeviceId::parse("phone").unwrap(),
            message: Message {
                mid: Mid::from_ulid(ulid::Ulid::new()),
                id: ClientId::parse("c1").unwrap(),
                from: UserId::parse("alice").unwrap(),
                from_device: DeviceId::default_device(),
                to: "bob".into(),
                chat: ChatKind::Direct,
                body: None,
                ephemeral: false,
                notice: None,
                ts: 1,
            },
            sends,
            first_sent_ms: 1,
            deadline_ms: 2,
        }
    }

    fn route(socket: Option<&str>, live: bool) -> DeviceRoute {
        DeviceRoute {
            device: DeviceId::parse("phone").unwrap(),
            gateway_url: socket.map(|_| "http://gateway".to_owned()),
            connection: socket.map(str::to_owned),
            live,
        }
    }

    #[test]
    fn a_delivery_whose_device_presence_does_not_know_goes_to_the_inbox() {
        // After a restart of `dak up`, presence is empty while the in-flight
        // file still has the deliveries of the earlier process's sockets.
        for sends in [0, 1, 3] {
            assert_eq!(
                retry_plan(&pending(sends), None, 3),
                Retry::Offline(OfflineReason::NotConnected),
                "sends = {sends}"
            );
        }
        // Known as a device, without a socket: the same.
        assert_eq!(
            retry_plan(&pending(1), Some(&route(None, false)), 3),
            Retry::Offline(OfflineReason::NotConnected)
        );
    }

    #[test]
    fn a_delivery_whose_device_reconnected_goes_to_the_new_socket() {
        assert_eq!(
            retry_plan(&pending(1), Some(&route(Some("conn-2"), true)), 3),
            Retry::Send {
                url: "http://gateway".into(),
                connection: "conn-2".into()
            }
        );
        // Held for a socket that is gone: sent to the live one that came since.
        assert!(matches!(
            retry_plan(&pending(0), Some(&route(Some("conn-2"), true)), 3),
            Retry::Send { .. }
        ));
    }

    #[test]
    fn a_delivery_whose_device_is_replaying_is_held_once() {
        let replaying = route(Some("conn-2"), false);
        assert_eq!(retry_plan(&pending(1), Some(&replaying), 3), Retry::Hold);
        assert_eq!(
            retry_plan(&pending(0), Some(&replaying), 3),
            Retry::Offline(OfflineReason::AckTimeout),
            "held past its deadline"
        );
    }

    #[test]
    fn a_delivery_out_of_retries_goes_to_the_inbox_wherever_its_device_is() {
        for r in [None, Some(route(Some("conn-2"), true))] {
            assert_eq!(
                retry_plan(&pending(4), r.as_ref(), 3),
                Retry::Offline(OfflineReason::AckTimeout)
            );
        }
        assert!(matches!(
            retry_plan(&pending(3), Some(&route(Some("c"), true)), 3),
            Retry::Send { .. }
        ));
    }

    #[test]
    fn a_delivery_acked_twice_in_one_batch_is_acked_once() {
        let (first, second) = (pending(1), pending(1));
        let ack = |mids: Vec<Mid>| Ack {
            user: first.user.clone(),
            device: first.device.clone(),
            mids,
        };
        let other_device = Ack {
            device: DeviceId::parse("tablet").unwrap(),
            ..ack(vec![first.message.mid])
        };
        let acks = [
            ack(vec![first.message.mid, first.message.mid]),
            ack(vec![second.message.mid, first.message.mid]),
            other_device,
        ];
        let mut tablets = first.clone();
        tablets.device = DeviceId::parse("tablet").unwrap();
        let found = vec![
            vec![Some(first.clone()), Some(first.clone())],
            vec![Some(second.clone()), Some(first.clone())],
            vec![Some(tablets)],
        ];
        let kept: Vec<Vec<Option<(Mid, String)>>> =
            once_per_delivery(&acks, found, &HashSet::new())
                .into_iter()
                .map(|found| {
                    found
                        .into_iter()
                        .map(|p| p.map(|p| (p.message.mid, p.device.to_string())))
                        .collect()
                })
                .collect();
        let phone = |p: &Pending| Some((p.message.mid, "phone".to_owned()));
        assert_eq!(
            kept,
            vec![
                vec![phone(&first), None],
                vec![phone(&second), None],
                vec![Some((first.message.mid, "tablet".to_owned()))],
            ]
        );
    }

    #[test]
    fn a_delivery_whose_earlier_ack_still_settles_is_not_acked_again() {
        // The device acked `first` in the batch before, whose receipt is
        // not on the bus yet: the delivery is still in flight, found again.
        let (first, second) = (pending(1), pending(1));
        let acks = [Ack {
            user: first.user.clone(),
            device: first.device.clone(),
            mids: vec![first.message.mid, second.message.mid],
        }];
        let found = vec![vec![Some(first.clone()), Some(second.clone())]];
        let settling =
            HashSet::from([(first.user.clone(), first.device.clone(), first.message.mid)]);
        let kept: Vec<Vec<Option<Mid>>> = once_per_delivery(&acks, found, &settling)
            .into_iter()
            .map(|found| {
                found
                    .into_iter()
                    .map(|p| p.map(|p| p.message.mid))
                    .collect()
            })
            .collect();
        assert_eq!(kept, vec![vec![None, Some(second.message.mid)]]);
    }
}
