//! persistence: the offline inbox.
//!
//! It consumes `dak.offline`, keyed by user, and in that order:
//!
//! - `store`: keeps the message for the device (or for the user, when the user
//!   has no device yet), idempotently by mid, until the device acks it or it
//!   expires (`DAK_INBOX_TTL`, default 30 days);
//! - `drop`: the device acked these mids; they go, and the senders of those
//!   that were stored get a `delivered` receipt;
//! - `replay`: a device connected. Because the request comes behind every
//!   `store` published for the user before it, the inbox is complete once the
//!   stores before it are written: it is sent to that socket through its
//!   gateway, oldest first, followed by `sync.done`, and `replayed` goes back to
//!   session on `dak.deliver`, which then releases what it held for the device.
//!   Replays run in tasks of their own ([`replay`]), one at a time per device, so
//!   a socket that reads slowly holds up only itself, never the consumer.
//!
//! It serves `GET /v1/messages?after=<cursor>&limit=<n>` for background sync over
//! REST. Offsets are committed only after the inbox write.
//!
//! It also keeps the status of messages, from `dak.status` (or, inside `dak up`
//! on its embedded log, straight from the other services:
//! [`Persistence::keep_reports`]), checks and relays read receipts, and serves
//! `GET /v1/messages/{mid}/status` ([`status`]). It reports its own steps
//! there: `stored` (before the inbox write, so before any device can read the
//! message from the inbox), `delivered` for each replayed message, and
//! `dropped`.

mod config;
pub mod inbox;
mod replay;
pub mod scylla;
pub mod standalone;
pub mod status;
mod sync;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use dak_runtime::auth::Verifier;
use dak_runtime::bus::{self, Bus, BusError, Consumer, DeadLetters, Producer, Record};
use dak_runtime::gateway::{Gateways, LocalGateway};
use dak_runtime::shutdown::Shutdown;
use dak_runtime::status::{device_step, Reporter, Reports};
use dak_runtime::{metrics, now_ms};
use dak_wire::event::{self, Ack, Connected, DeliverEvent, DeviceStep, OfflineEvent};
use dak_wire::send::{SendItem, SendOutcome};
use dak_wire::ServerFrame;
use dak_wire::{DeviceId, Message, ReceiptState, UserId};
use serde_json::value::RawValue;

pub use config::Config;
use inbox::{Inbox, Stored};

/// Consumer group of every persistence instance.
pub const GROUP: &str = "dak.persistence";

/// Records taken from `dak.offline` per batch.
const BATCH: usize = 1000;

/// Messages per `/send` while replaying.
const REPLAY_PAGE: usize = 500;

pub const STORED: &str = "dak_messages_stored_total";
pub const DROPPED: &str = "dak_messages_dropped_total";
pub const EXPIRED: &str = "dak_messages_expired_total";
pub const REMOVED: &str = "dak_messages_removed_total";
pub const REPLAYED: &str = "dak_messages_replayed_total";
pub const SYNCED: &str = "dak_messages_synced_total";
pub const INBOX_DEPTH: &str = "dak_inbox_depth";

/// Everything persistence needs from outside.
pub struct Deps {
    pub inbox: Arc<dyn Inbox>,
    pub status: Arc<dyn status::StatusStore>,
    /// Where persistence reports its own steps: `dak.status`
    /// ([`Reporter::on_bus`]), or, in one process on the embedded log, the
    /// reporter whose reports [`Persistence::keep_reports`] keeps.
    pub reporter: Reporter,
    pub producer: Producer,
    pub verifier: Verifier,
    pub internal_token: String,
    /// The gateway in this process, if any (`dak up`): replayed to directly.
    pub local_gateway: Option<LocalGateway>,
}

pub struct Persistence {
    consumer: Consumer,
    shared: Arc<Shared>,
    status_consumer: Consumer,
    status: Arc<status::StatusShared>,
}

struct Shared {
    config: Config,
    inbox: Arc<dyn Inbox>,
    producer: Producer,
    verifier: Verifier,
    gateways: Gateways,
    deliver_topic: String,
    replays: replay::Replays,
    dead_letters: DeadLetters,
    status: Reporter,
}

impl Persistence {
    pub fn build(config: Config, bus: &Bus, deps: Deps) -> Result<Self, BusError> {
        let topics = bus.topics();
        describe();
        status::describe();
        let consumer = bus
            .consumer(&topics.group(GROUP), &[&topics.offline])?
            .with_dead_letters(deps.producer.clone());
        let status_consumer = bus
            .consumer(&topics.group(status::GROUP), &[&topics.status])?
            .with_dead_letters(deps.producer.clone());
        let status = Arc::new(status::StatusShared {
            store: deps.status,
            producer: deps.producer.clone(),
            deliver_topic: topics.deliver.clone(),
            dead_letters: status_consumer.dead_letters(),
            verifier: deps.verifier.clone(),
            inbox_ttl_ms: config.inbox_ttl.as_millis() as u64,
        });
        let shared = Arc::new(Shared {
            dead_letters: consumer.dead_letters(),
            gateways: Gateways::new(deps.internal_token, Duration::from_secs(10))
                .with_local(deps.local_gateway),
            config,
            inbox: deps.inbox,
            status: deps.reporter,
            producer: deps.producer,
            verifier: deps.verifier,
            deliver_topic: topics.deliver.clone(),
            replays: replay::Replays::default(),
        });
        Ok(Self {
            consumer,
            shared,
            status_consumer,
            status,
        })
    }

    /// `GET /v1/messages` and `GET /v1/messages/{mid}/status`, for the public
    /// address.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/messages", get(sync::messages))
            .with_state(self.shared.clone())
            .merge(
                Router::new()
                    .route("/v1/messages/{mid}/status", get(status::for_sender))
                    .with_state(self.status.clone()),
            )
    }

    /// `GET /v1/messages/{mid}/status` for any mid, for the admin address.
    pub fn admin_router(&self) -> Router {
        Router::new()
            .route("/v1/messages/{mid}/status", get(status::for_ops))
            .with_state(self.status.clone())
    }

    /// Keeps the steps the services of this process report to `reports`
    /// (from [`dak_runtime::status::in_process`]) in the status store, until
    /// every reporter is gone: run it as a task of its own, which outlives
    /// the services that report.
    pub fn keep_reports(
        &self,
        reports: Reports,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send + 'static {
        let status = self.status.clone();
        async move {
            status.keep_reports(reports).await;
            Ok(())
        }
    }

    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        tracing::info!("persistence running");
        let shared = &self.shared;
        let consume = self.consumer.run(BATCH, &shutdown, |batch| async move {
            match shared.handle_batch(&batch).await {
                Ok(()) => Ok(batch),
                Err(e) => Err((batch, e)),
            }
        });
        let status = &self.status;
        let consume_status = self
            .status_consumer
            .run(BATCH, &shutdown, |batch| async move {
                match status.handle_batch(&batch).await {
                    Ok(()) => Ok(batch),
                    Err(e) => Err((batch, e)),
                }
            });
        tokio::join!(consume, consume_status, shared.expiry_loop(&shutdown));
        shared.replays.finish(Duration::from_secs(5)).await;
        shared.producer.flush(Duration::from_secs(5)).await;
        Ok(())
    }
}

impl Shared {
    async fn handle_batch(self: &Arc<Self>, records: &[Record]) -> anyhow::Result<()> {
        let now = now_ms();
        let expires = now + self.config.inbox_ttl.as_millis() as u64;
        let mut stores = Vec::new();
        for record in records {
            let event = match event::decode::<OfflineEvent>(&record.payload) {
                Ok(event) => event,
                Err(e) => {
                    self.dead_letters.park(record, &e.message).await?;
                    continue;
                }
            };
            match event {
                OfflineEvent::Store {
                    user,
                    device,
                    message,
                    ..
                } => stores.push(Stored {
                    user,
                    device,
                    seq: record.offset as u64,
                    message,
                    expires_at_ms: expires,
                }),
                OfflineEvent::Drop(ack) => {
                    self.store(std::mem::take(&mut stores)).await?;
                    // The receipts go out before the messages go: handled
                    // again after a failure, the drop finds them again.
                    let acked = self.inbox.find(&ack.user, &ack.device, &ack.mids).await?;
                    self.delivered_receipts(&ack, &acked).await?;
                    let tombstone = now + self.config.tombstone_ttl.as_millis() as u64;
                    let dropped = self
                        .inbox
                        .drop_acked(&ack.user, &ack.device, &ack.mids, tombstone)
                        .await?;
                    let (step, counter) = (DeviceStep::Dropped, DROPPED);
                    self.left_the_inbox(&dropped, &ack.user, &ack.device, step, counter, now)
                        .await?;
                }
                OfflineEvent::Replay {
                    connected,
                    gateway_url,
                } => {
                    // The stores before it are written: the replay sees them.
                    self.store(std::mem::take(&mut stores)).await?;
                    self.start_replay(connected, gateway_url);
                }
                OfflineEvent::DeviceRemoved(removed) => {
                    // Stores before it were for the device while it was known.
                    self.store(std::mem::take(&mut stores)).await?;
                    let (user, device) = (&removed.user, &removed.device);
                    let gone = self.inbox.remove_device(user, device).await?;
                    tracing::info!(%user, %device, messages = gone.len(), "device removed: its inbox is deleted");
                    let (step, counter) = (DeviceStep::Removed, REMOVED);
                    self.left_the_inbox(&gone, user, device, step, counter, now)
                        .await?;
                }
                OfflineEvent::PushToken(_) => {}
            }
        }
        self.store(stores).await
    }

    /// `messages` left the device's inbox: each gets `step` in its status,
    /// `counter` counts them, and the depth gauge falls by as many.
    async fn left_the_inbox(
        &self,
        messages: &[Message],
        user: &UserId,
        device: &DeviceId,
        step: DeviceStep,
        counter: &'static str,
        now: u64,
    ) -> anyhow::Result<()> {
        let steps: Vec<_> = messages
            .iter()
            .filter_map(|m| device_step(m, user, Some(device), step, now))
            .collect();
        self.status.report(steps).await?;
        let n = messages.len() as u64;
        ::metrics::counter!(counter).increment(n);
        ::metrics::gauge!(INBOX_DEPTH).decrement(n as f64);
        Ok(())
    }

    /// The device acked messages it got from its inbox (a replay or a sync):
    /// their senders get a `delivered` receipt, as session sends for messages
    /// acked while in flight, once the bus has it. A receipt's mid follows
    /// from what it reports, so one that both produced is one delivery.
    async fn delivered_receipts(&self, ack: &Ack, acked: &[Message]) -> anyhow::Result<()> {
        let now = now_ms();
        let mut acks = Vec::new();
        for receipt in acked.iter().filter_map(|m| {
            Message::receipt_for(m, &ack.user, &ack.device, ReceiptState::Delivered, now)
        }) {
            ::metrics::counter!(metrics::RECEIPTS).increment(1);
            let key = receipt.recipient.to_string();
            let payload = event::encode(&DeliverEvent::Message(receipt));
            acks.push(self.producer.enqueue(&self.deliver_topic, &key, &payload)?);
        }
        bus::acknowledged_all(acks).await?;
        Ok(())
    }

    async fn store(&self, stores: Vec<Stored>) -> anyhow::Result<()> {
        if stores.is_empty() {
            return Ok(());
        }
        // Reported before the write: once written, a device may read it.
        let now = now_ms();
        let steps: Vec<_> = stores
            .iter()
            .filter_map(|s| {
                device_step(
                    &s.message,
                    &s.user,
                    s.device.as_ref(),
                    DeviceStep::Stored,
                    now,
                )
            })
            .collect();
        self.status.report(steps).await?;
        let stored = self.inbox.store(&stores).await?;
        ::metrics::counter!(STORED).increment(stored);
        // Kept current between the exact counts of the expiry loop.
        ::metrics::gauge!(INBOX_DEPTH).increment(stored as f64);
        Ok(())
    }

    /// Sends the device's inbox to its socket, then `sync.done`, then tells
    /// session the socket may go live.
    async fn replay(&self, connected: &Connected, gateway_url: &str) -> anyhow::Result<()> {
        let Connected {
            user,
            device,
            connection,
        } = connected;
        self.inbox.take_over(user, device).await?;
        let mut after = None;
        let mut replayed = 0;
        loop {
            let page = self
                .inbox
                .page(user, device, after, REPLAY_PAGE, now_ms())
                .await?;
            let full = page.len() == REPLAY_PAGE;
            after = page.last().map(|(seq, _)| *seq).or(after);
            let now = now_ms();
            let steps: Vec<_> = page
                .iter()
                .filter_map(|(_, m)| device_step(m, user, Some(device), DeviceStep::Delivered, now))
                .collect();
            self.status.report(steps).await?;
            let frames: Vec<String> = page
                .iter()
                .map(|(_, m)| ServerFrame::from(m).to_json())
                .collect();
            replayed += frames.len();
            if !self.send_in_order(connected, gateway_url, frames).await? {
                tracing::debug!(%user, %device, "socket gone during its replay");
                return Ok(());
            }
            if !full {
                break;
            }
        }
        if !self
            .send_in_order(
                connected,
                gateway_url,
                vec![ServerFrame::SyncDone.to_json()],
            )
            .await?
        {
            return Ok(());
        }
        ::metrics::counter!(REPLAYED).increment(replayed as u64);
        tracing::debug!(%user, %device, %connection, replayed, "replayed");
        let event = DeliverEvent::Replayed(connected.clone());
        let delivery =
            self.producer
                .enqueue(&self.deliver_topic, user.as_str(), &event::encode(&event))?;
        delivery.await?;
        Ok(())
    }

    /// Writes `frames` to the connection in order, waiting while its queue is
    /// full. False if the socket is gone.
    async fn send_in_order(
        &self,
        to: &Connected,
        gateway_url: &str,
        frames: Vec<String>,
    ) -> anyhow::Result<bool> {
        let mut rest = frames;
        let mut waits = 0;
        while !rest.is_empty() {
            let items = rest
                .iter()
                .map(|frame| SendItem {
                    user: to.user.clone(),
                    device: to.device.clone(),
                    connection: Some(to.connection.clone()),
                    frame: RawValue::from_string(frame.clone()).expect("server frames are JSON"),
                })
                .collect();
            // A gateway that fails answers `busy`: waited for like a full queue.
            let outcomes = self.gateways.send(gateway_url, items).await;
            // The gateway refuses everything after the first frame it could not
            // queue, so what was sent is a prefix.
            let sent = outcomes
                .iter()
                .take_while(|o| **o == SendOutcome::Sent)
                .count();
            if outcomes.get(sent) == Some(&SendOutcome::NotConnected) {
                return Ok(false);
            }
            rest.drain(..sent);
            if !rest.is_empty() {
                waits += 1;
                if waits > 600 {
                    tracing::warn!(user = %to.user, device = %to.device, "replay: socket not draining, giving up");
                    return Ok(false);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(true)
    }

    async fn expiry_loop(&self, shutdown: &Shutdown) {
        let mut tick = tokio::time::interval(self.config.expiry_interval);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.inbox.expire(now_ms()).await {
                Ok(n) => ::metrics::counter!(EXPIRED).increment(n),
                Err(e) => tracing::warn!(error = %e, "expiring the inbox failed"),
            }
            if let Ok(depth) = self.inbox.depth().await {
                ::metrics::gauge!(INBOX_DEPTH).set(depth as f64);
            }
        }
    }
}

fn describe() {
    use ::metrics::{describe_counter, describe_gauge};
    describe_counter!(STORED, "messages written to an offline inbox");
    describe_counter!(
        DROPPED,
        "stored messages removed because their device acked them"
    );
    describe_counter!(EXPIRED, "stored messages removed because their TTL ran out");
    describe_counter!(
        REMOVED,
        "stored messages deleted because their user removed the device"
    );
    describe_counter!(
        REPLAYED,
        "stored messages replayed to a device that connected"
    );
    describe_counter!(SYNCED, "stored messages served by GET /v1/messages");
    describe_gauge!(
        INBOX_DEPTH,
        "messages in the offline inbox, all devices together"
    );
    use dak_runtime::metrics::{register_counter, RECEIPTS};
    for name in [
        STORED, DROPPED, EXPIRED, REMOVED, REPLAYED, SYNCED, RECEIPTS,
    ] {
        register_counter(name, &[]);
    }
    // Registered, at zero, until the expiry loop's first round measures it.
    let _ = ::metrics::gauge!(INBOX_DEPTH);
}
