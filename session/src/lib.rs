//! session: gets each delivery to every device of its recipient, and keeps at it
//! until the device acks or the message is handed to the offline inbox.
//!
//! It consumes `dak.deliver` (keyed by recipient, so one user's deliveries and
//! acks are one ordered stream) and, for each message:
//!
//! 1. looks up the recipient's devices in presence;
//! 2. for each connected device, records an in-flight delivery with an ack
//!    deadline in the session store, then hands the frame to the device's gateway
//!    (`POST /internal/v1/send`, one batch per gateway);
//! 3. for each device that is not connected — or when the user has no device
//!    yet — publishes a `store` event to `dak.offline`.
//!
//! A device that connects gets its stored inbox first: its `connected` event
//! (in the user's stream) makes session ask persistence, through `dak.offline`,
//! to replay the inbox to that socket. Until persistence answers `replayed`,
//! messages for the device are *held* in the session store rather than sent, so
//! nothing new overtakes the replay; `replayed` sends them, then the device is
//! live.
//!
//! Ephemeral messages (typing among them) go to connected devices once, and are
//! neither recorded in flight nor stored.
//!
//! An ack is counted with its latency, the sender's devices get a `delivered`
//! receipt (itself an ordinary delivery on `dak.deliver`, keyed by the
//! sender), and once the bus has the receipt the in-flight delivery is
//! removed; an ack handled again before that sends the receipt again. An ack
//! for a mid that is not in flight (late, or for a stored message) is forwarded to
//! `dak.offline` as a `drop`, so storage lets go of it.
//!
//! The retry loop claims deliveries past their deadline, sends them again up to
//! the configured number of retries, and then hands them to `dak.offline`. It
//! works from the session store only, so any instance resumes what a dead one
//! left (DESIGN §7.4–7.5).

mod config;
mod deliver;
pub mod inflight;
pub mod standalone;

use std::sync::Arc;

use dak_runtime::bus::{Bus, BusError, Consumer, Producer};
use dak_runtime::gateway::LocalGateway;
use dak_runtime::presence::Presence;
use dak_runtime::shutdown::Shutdown;
use dak_runtime::status::Reporter;

pub use config::Config;
use deliver::Core;
use inflight::InFlight;

/// Consumer group of every session instance.
pub const GROUP: &str = "dak.session";

/// Records taken from `dak.deliver` per batch.
const BATCH: usize = 1000;

/// Everything session needs from outside.
pub struct Deps {
    pub inflight: Arc<dyn InFlight>,
    pub presence: Arc<dyn Presence>,
    pub producer: Producer,
    /// Where session reports the steps of messages ([`Reporter::on_bus`] for
    /// `dak.status`).
    pub status: Reporter,
    pub internal_token: String,
    /// The gateway in this process, if any (`dak up`): sent to directly.
    pub local_gateway: Option<LocalGateway>,
    /// This is the only session, reading every user's stream (`dak up` on
    /// its embedded log, whose groups have one consumer each): it delivers
    /// the `delivered` receipt of an acked delivery itself, in the batch that
    /// handles the ack, instead of putting it on the sender's stream on
    /// `dak.deliver` for whichever session reads that (which would be
    /// itself, a batch later, after one more fsynced append).
    pub only_instance: bool,
}

pub struct Session {
    core: Core,
    consumer: Consumer,
}

/// The waits of a `dak.deliver` batch that session times in
/// `dak_step_seconds`: presence's routes, the in-flight store's `begin` (beside
/// the `delivered` steps' `status_report`), the gateways' `/send`,
/// and the in-flight store's `ack`.
const STEPS: [&str; 5] = [
    "presence",
    "inflight_begin",
    "status_report",
    "gateway_send",
    "inflight_ack",
];

/// What session counts, at zero until it happens.
fn register_metrics() {
    use dak_runtime::metrics::{self, register_counter, register_histogram};
    for name in [
        metrics::DELIVERED,
        metrics::ACKED,
        metrics::RETRIED,
        metrics::FORWARDED_ACKS,
        metrics::EPHEMERAL,
        metrics::RECEIPTS,
    ] {
        register_counter(name, &[]);
    }
    for reason in ["not_connected", "ack_timeout", "no_device"] {
        register_counter(metrics::OFFLINED, &[("reason", reason)]);
    }
    register_histogram(metrics::ACK_LATENCY, &[]);
    for stage in ["session", "sent"] {
        register_histogram(metrics::MESSAGE_AGE, &[("stage", stage)]);
    }
    for step in STEPS {
        register_histogram(metrics::STEP_SECONDS, &[("step", step)]);
    }
    // Registered, at zero, until the retry loop's first scan counts them.
    let _ = ::metrics::gauge!(metrics::INFLIGHT);
}

impl Session {
    pub fn build(config: Config, bus: &Bus, deps: Deps) -> Result<Self, BusError> {
        let topics = bus.topics();
        register_metrics();
        let consumer = bus
            .consumer(&topics.group(GROUP), &[&topics.deliver])?
            .with_dead_letters(deps.producer.clone());
        let core = Core::new(
            config,
            deps,
            consumer.dead_letters(),
            topics.offline.clone(),
            topics.deliver.clone(),
        );
        Ok(Self { core, consumer })
    }

    /// When presence does not outlive the process (`dak up`), hands every
    /// delivery left in flight by an earlier process to the inbox, in order.
    /// Call it before the gateway takes sockets and before [`Session::run`].
    pub async fn store_orphans(&self) -> anyhow::Result<()> {
        self.core.store_orphans().await
    }

    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        tracing::info!("session running");
        let core = &self.core;
        let deliveries = self
            .consumer
            .run_overlapped(BATCH, &shutdown, |batch| async move {
                match core.handle_batch(&batch).await {
                    Ok(settle) => Ok((batch, settle)),
                    Err(e) => Err((batch, e)),
                }
            });
        tokio::join!(deliveries, core.retry_loop(&shutdown));
        core.flush().await;
        Ok(())
    }
}
