//! push: wakes devices that have messages waiting in their offline inbox.
//!
//! push owns the device push tokens ([`tokens`]) and consumes `dak.offline`
//! (consumer group `dak.push`, with the topic prefix):
//!
//! - `push_token`: a device registered or replaced its FCM token; stored, one
//!   per (user, device).
//! - `store`: a message went to a device's inbox (or to the user-level inbox,
//!   when the user has no device yet: then every token of the user is woken).
//!   Each target device that is not connected right now gets one FCM HTTP v1
//!   data message ([`fcm`]) carrying `mid`, `from`, `chat`, `conversation` and
//!   `ts` — never the body — collapsed per conversation. A token FCM reports as
//!   invalid is removed.
//! - `drop` and `replay` are persistence's business and are skipped.
//!
//! A woken app syncs at once, often over REST (`GET /v1/messages`), so a
//! notification goes out only once the message is in the inbox: push reads
//! the same `store` events as persistence, and before it sends a batch's
//! notifications it waits until persistence's consumer group has committed
//! past the batch (persistence commits only what it stored). If persistence
//! has not got there within `DAK_PUSH_STORE_WAIT`, the devices are woken
//! anyway, counted in `dak_push_before_stored_total`: a late inbox is found
//! by the next sync, a missing wake-up by nobody.
//! After such a batch, push waits again only once persistence has finished
//! everything before the batch at hand, so that a stuck or far behind
//! persistence costs one wait, not one per batch.
//! After the wait, presence is read again for the devices about to be woken:
//! one that connected meanwhile gets the message in its replay instead.
//!
//! Offsets are stored only after a batch's notifications were all sent or given
//! up (at-least-once): after a crash a device may be woken twice for one
//! message, which the app shrugs off, since it only syncs. When presence cannot
//! be read, devices are treated as not connected: a spare wake-up is cheaper
//! than a missed one. An undecodable event is counted in
//! `dak_dead_letters_total` and logged; persistence, which reads the same
//! topic, parks it in the dead-letter topic.

pub mod fcm;
pub mod metrics;
pub mod scylla;
pub mod standalone;
pub mod tokens;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dak_runtime::bus::{Bus, BusError, Consumer, DeadLetters, GroupProgress, Record};
use dak_runtime::now_ms;
use dak_runtime::presence::Presence;
use dak_runtime::shutdown::Shutdown;
use dak_runtime::status::{self, Reporter};
use dak_wire::event::{self, DeviceStep, Message, Notice, OfflineEvent, StatusEvent};
use dak_wire::{ChatKind, DeviceId, Mid, UserId};
use futures_util::StreamExt;

pub use fcm::{FcmError, FcmSender, LogSender, Notification, Outcome, Sender};
pub use tokens::{DeviceToken, PushTokens, SqliteTokens, TokenStoreError};

/// Consumer group of every push instance.
pub const GROUP: &str = "dak.push";

/// Consumer group of persistence, which stores what push wakes devices for
/// (persistence's `GROUP`; a test in `dak` keeps the two the same).
pub const STORE_GROUP: &str = "dak.persistence";

/// The token store's file inside the data directory.
pub const TOKENS_FILE: &str = "push-tokens.db";

/// Records taken from `dak.offline` per batch.
const BATCH: usize = 500;

/// Notifications of one batch in flight at once.
const CONCURRENCY: usize = 32;

/// push's own settings.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "push")]
pub struct Config {
    /// A Google service-account JSON file allowed to send with FCM. Unset: push
    /// only logs the notifications it would send.
    #[arg(long, env = "DAK_FCM_CREDENTIALS")]
    pub fcm_credentials: Option<PathBuf>,
    /// The Firebase project to send through; defaults to the `project_id` of the
    /// credentials.
    #[arg(long, env = "DAK_FCM_PROJECT_ID")]
    pub fcm_project_id: Option<String>,
    /// Where FCM's HTTP v1 API is.
    #[arg(
        long,
        env = "DAK_FCM_BASE_URL",
        default_value = "https://fcm.googleapis.com"
    )]
    pub fcm_base_url: String,
    /// How long FCM keeps trying to reach an offline device (at most 28 days).
    /// A day: a device that stays unreachable longer syncs its inbox when it is
    /// back anyway, and an older wake-up would only be noise.
    #[arg(long, env = "DAK_PUSH_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub push_ttl: Duration,
    /// Attempts per notification when FCM is throttling, failing or unreachable.
    #[arg(long, env = "DAK_PUSH_MAX_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub push_max_attempts: u32,
    /// The first retry's wait; it doubles per attempt, with jitter, up to 30 s.
    /// A `Retry-After` from FCM waits longer when it says so.
    #[arg(long, env = "DAK_PUSH_RETRY_BASE", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub push_retry_base: Duration,
    /// Longest a notification waits for persistence to store its message,
    /// so that the app it wakes finds the message when it syncs. Past it,
    /// the device is woken anyway.
    #[arg(long, env = "DAK_PUSH_STORE_WAIT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub push_store_wait: Duration,
}

/// The sender the configuration asks for: FCM with credentials, else a sender
/// that only logs (with a warning, since no device will be woken).
pub fn sender(config: &Config) -> Result<Arc<dyn Sender>, FcmError> {
    if config.fcm_credentials.is_some() {
        Ok(Arc::new(FcmSender::new(config)?))
    } else {
        tracing::warn!("DAK_FCM_CREDENTIALS is not set: push notifications are only logged");
        Ok(Arc::new(LogSender))
    }
}

/// Where the SQLite token store lives under a data directory.
pub fn tokens_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKENS_FILE)
}

/// What push works with.
pub struct Deps {
    pub tokens: Arc<dyn PushTokens>,
    pub presence: Arc<dyn Presence>,
    pub sender: Arc<dyn Sender>,
    /// Where push reports what it pushed ([`Reporter::on_bus`] for
    /// `dak.status`).
    pub status: Reporter,
}

pub struct Push {
    consumer: Consumer,
    /// What persistence stored of `dak.offline`.
    stored: GroupProgress,
    store_wait: Duration,
    /// Set when persistence was not there in time for the last batch: the
    /// next waits only if persistence has caught up with it.
    store_lagging: AtomicBool,
    dead_letters: DeadLetters,
    deps: Deps,
    status: Reporter,
    ttl: Duration,
}

/// One notification for one device, with whom it is for so a dead token can be
/// removed.
struct Wake {
    user: UserId,
    device: DeviceId,
    notification: Notification,
    /// The mid and sender of a message whose status is tracked, reported
    /// `pushed` once the notification went out.
    tracked: Option<(Mid, UserId)>,
}

impl Push {
    pub fn build(config: &Config, bus: &Bus, deps: Deps) -> Result<Self, BusError> {
        metrics::describe();
        let topics = bus.topics();
        let consumer = bus.consumer(&topics.group(GROUP), &[&topics.offline])?;
        let stored = bus.progress(&topics.group(STORE_GROUP), &topics.offline)?;
        Ok(Self {
            stored,
            store_wait: config.push_store_wait,
            store_lagging: AtomicBool::new(false),
            dead_letters: consumer.dead_letters(),
            consumer,
            status: deps.status.clone(),
            deps,
            ttl: config.push_ttl,
        })
    }

    pub async fn run(self, shutdown: Shutdown) -> anyhow::Result<()> {
        tracing::info!("push running");
        let this = &self;
        self.consumer
            .run(BATCH, &shutdown, |batch| async move {
                match this.handle_batch(&batch).await {
                    Ok(()) => Ok(batch),
                    Err(e) => Err((batch, e)),
                }
            })
            .await;
        Ok(())
    }

    /// Applies the batch's token registrations in order, works out who to wake
    /// for each stored message, then sends every notification, concurrently, and
    /// returns once they all finished.
    async fn handle_batch(&self, batch: &[Record]) -> anyhow::Result<()> {
        let mut events: Vec<OfflineEvent> = Vec::with_capacity(batch.len());
        for record in batch {
            match event::decode(&record.payload) {
                Ok(e) => events.push(e),
                // persistence, which reads the same topic, parks it; push
                // counts and logs it.
                Err(e) => self.dead_letters.park(record, &e.message).await?,
            }
        }
        // Token changes first, in order: a message stored in the same batch
        // then goes to the device's newest token, or to none once the device
        // is removed.
        for event in &events {
            match event {
                OfflineEvent::PushToken(token) => {
                    self.deps.tokens.upsert(token).await?;
                    tracing::debug!(user = %token.user, device = %token.device, "push token registered");
                }
                OfflineEvent::DeviceRemoved(removed) => {
                    let (user, device) = (&removed.user, &removed.device);
                    if let Some(held) = self.deps.tokens.for_device(user, device).await? {
                        self.deps.tokens.remove(user, device, &held.token).await?;
                        tracing::debug!(%user, %device, "push token of a removed device deleted");
                    }
                }
                OfflineEvent::Store { .. }
                | OfflineEvent::Drop(_)
                | OfflineEvent::Replay { .. } => {}
            }
        }

        let stored = || {
            events.iter().filter_map(|e| match e {
                OfflineEvent::Store {
                    user,
                    device,
                    message,
                    ..
                } => Some((user, device.as_ref(), message)),
                _ => None,
            })
        };
        let connected = self
            .connected_devices(stored().map(|(user, ..)| user))
            .await;
        // One lookup for the whole batch: one per stored message was the
        // most push could do, about 5,000 a second.
        let mut users: Vec<UserId> = stored()
            .filter(|(.., message)| is_worth_a_wake_up(message))
            .map(|(user, ..)| user.clone())
            .collect();
        users.sort_unstable();
        users.dedup();
        let tokens = self.deps.tokens.for_users(&users).await?;
        let mut wakes = Vec::new();
        for (user, device, message) in stored() {
            self.plan(user, device, message, &connected, &tokens, &mut wakes);
        }

        // A message stored twice (session retried its hand-over) wakes once.
        let mut seen = HashSet::new();
        wakes.retain(|w| {
            seen.insert((
                w.notification.token.clone(),
                w.notification.data["mid"].clone(),
            ))
        });
        if !wakes.is_empty() {
            self.hold_until_stored(batch, &mut wakes).await;
        }
        let pushed: Vec<StatusEvent> = futures_util::stream::iter(wakes)
            .map(|wake| self.wake(wake))
            .buffer_unordered(CONCURRENCY)
            .filter_map(std::future::ready)
            .collect()
            .await;
        self.status.report(pushed).await?;
        Ok(())
    }

    /// Waits until persistence has stored `batch` (see the module's notes),
    /// then drops from `wakes` the devices that connected meanwhile.
    async fn hold_until_stored(&self, batch: &[Record], wakes: &mut Vec<Wake>) {
        // After a batch persistence was late for, wait again only once
        // it has caught up with this one.
        let lagging =
            self.store_lagging.load(Ordering::Relaxed) && !self.stored.finished_before(batch).await;
        let wait = if lagging {
            Duration::ZERO
        } else {
            self.store_wait
        };
        let stored =
            dak_runtime::metrics::timed("store_wait", self.stored.wait_past(batch, wait)).await;
        self.store_lagging.store(!stored, Ordering::Relaxed);
        // A device that connected meanwhile gets the message in its
        // replay: it needs no wake-up.
        let connected = self.connected_devices(wakes.iter().map(|w| &w.user)).await;
        wakes.retain(|w| {
            let awake = connected.contains(&(w.user.clone(), w.device.clone()));
            if awake {
                skipped("connected", &w.notification.data["mid"]);
            }
            !awake
        });
        if !stored {
            ::metrics::counter!(metrics::BEFORE_STORED).increment(wakes.len() as u64);
            if !lagging {
                tracing::warn!(
                    wait = ?self.store_wait,
                    "persistence has not stored these messages yet; waking the devices anyway, without waiting until it catches up"
                );
            }
        }
    }

    /// The (user, device) pairs of `users` with a socket on a live gateway
    /// right now.
    async fn connected_devices<'u>(
        &self,
        users: impl Iterator<Item = &'u UserId>,
    ) -> HashSet<(UserId, DeviceId)> {
        let mut users: Vec<UserId> = users.cloned().collect();
        users.sort_unstable();
        users.dedup();
        if users.is_empty() {
            return HashSet::new();
        }
        match self.deps.presence.routes(&users).await {
            Ok(routes) => users
                .iter()
                .zip(routes)
                .flat_map(|(user, routes)| {
                    routes
                        .into_iter()
                        .filter(|r| r.gateway_url.is_some())
                        .map(move |r| (user.clone(), r.device))
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "reading presence failed, pushing to every device");
                HashSet::new()
            }
        }
    }

    /// Adds a notification for each device `message` waits for that is offline
    /// and has a token; `tokens` holds the registered devices of `user`.
    fn plan(
        &self,
        user: &UserId,
        device: Option<&DeviceId>,
        message: &Message,
        connected: &HashSet<(UserId, DeviceId)>,
        tokens: &HashMap<UserId, Vec<DeviceToken>>,
        wakes: &mut Vec<Wake>,
    ) {
        if !is_worth_a_wake_up(message) {
            skipped("receipt", message.mid);
            return;
        }
        let is_connected = |device: &DeviceId| connected.contains(&(user.clone(), device.clone()));
        let registered = tokens.get(user).map(Vec::as_slice).unwrap_or_default();
        let targets: Vec<&DeviceToken> = match device {
            Some(device) if is_connected(device) => {
                skipped("connected", message.mid);
                return;
            }
            Some(device) => registered.iter().filter(|t| &t.device == device).collect(),
            // The user-level inbox: whichever device comes first takes it over,
            // so wake them all.
            None => registered.iter().collect(),
        };
        if targets.is_empty() {
            skipped("no_token", message.mid);
        }
        for target in targets {
            if is_connected(&target.device) {
                skipped("connected", message.mid);
                continue;
            }
            wakes.push(Wake {
                user: user.clone(),
                tracked: status::is_tracked(message).then(|| (message.mid, message.from.clone())),
                device: target.device.clone(),
                notification: notification(user, message, target.clone(), self.ttl),
            });
        }
    }

    /// Sends one notification; the `pushed` status to report if it went out.
    async fn wake(&self, wake: Wake) -> Option<StatusEvent> {
        let n = &wake.notification;
        match self.deps.sender.send(n).await {
            Outcome::Sent => {
                ::metrics::counter!(metrics::SENT).increment(1);
                tracing::debug!(mid = %n.data["mid"], user = %wake.user, device = %wake.device, "pushed");
                return wake.tracked.map(|(mid, from)| StatusEvent::Device {
                    mid,
                    from,
                    user: wake.user,
                    device: Some(wake.device),
                    step: DeviceStep::Pushed,
                    at: now_ms(),
                });
            }
            Outcome::Failed(reason) => {
                ::metrics::counter!(metrics::FAILURES, "reason" => reason).increment(1);
            }
            Outcome::InvalidToken => {
                ::metrics::counter!(metrics::FAILURES, "reason" => "invalid_token").increment(1);
                match self
                    .deps
                    .tokens
                    .remove(&wake.user, &wake.device, &n.token)
                    .await
                {
                    Ok(true) => {
                        ::metrics::counter!(metrics::TOKENS_REMOVED).increment(1);
                        tracing::info!(user = %wake.user, device = %wake.device, token = %n.short_token(), "removed an invalid push token");
                    }
                    // The device registered a new token meanwhile.
                    Ok(false) => {}
                    // FCM will say so again on the next message.
                    Err(e) => {
                        tracing::warn!(user = %wake.user, device = %wake.device, error = %e, "removing an invalid push token")
                    }
                }
            }
        }
        None
    }
}

/// Receipts are synced with everything else but never worth waking a phone;
/// an ephemeral message is never stored to begin with.
fn is_worth_a_wake_up(message: &Message) -> bool {
    !message.ephemeral && !matches!(message.notice, Some(Notice::Receipt { .. }))
}

fn skipped(reason: &'static str, mid: impl std::fmt::Display) {
    ::metrics::counter!(metrics::SKIPPED, "reason" => reason).increment(1);
    tracing::debug!(%mid, reason, "not pushing");
}

fn notification(
    recipient: &UserId,
    message: &Message,
    target: DeviceToken,
    ttl: Duration,
) -> Notification {
    let chat = match message.chat {
        ChatKind::Direct => "direct",
        ChatKind::Group => "group",
    };
    let conversation = conversation(recipient, message);
    Notification {
        token: target.token,
        platform: target.platform,
        collapse_key: format!("{chat}:{conversation}"),
        data: [
            ("mid", message.mid.to_string()),
            ("from", message.from.to_string()),
            ("chat", chat.to_owned()),
            ("conversation", conversation.to_owned()),
            ("ts", message.ts.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        ttl,
    }
}

/// The conversation as the recipient sees it: the group, or the other person
/// of a direct chat (the peer, when a user's own message reaches their other
/// devices).
fn conversation<'m>(recipient: &UserId, message: &'m Message) -> &'m str {
    match message.chat {
        ChatKind::Group => &message.to,
        ChatKind::Direct if message.from == *recipient => &message.to,
        ChatKind::Direct => message.from.as_str(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dak_wire::event::Platform;
    use dak_wire::{ClientId, Mid};

    fn message(from: &str, to: &str, chat: ChatKind) -> Message {
        Message {
            mid: Mid::parse("01JD0000000000000000000000").unwrap(),
            id: ClientId::parse("c-1").unwrap(),
            from: UserId::parse(from).unwrap(),
            from_device: DeviceId::default_device(),
            to: to.into(),
            chat,
            body: Some(
                serde_json::value::RawValue::from_string(r#"{"secret":"x"}"#.into()).unwrap(),
            ),
            ephemeral: false,
            notice: None,
            ts: 1732380000123,
        }
    }

    fn token() -> DeviceToken {
        DeviceToken {
            device: DeviceId::parse("phone").unwrap(),
            token: "tok".into(),
            platform: Platform::Ios,
        }
    }

    #[test]
    fn conversations_are_seen_from_the_recipient() {
        let bob = UserId::parse("bob").unwrap();
        let alice = UserId::parse("alice").unwrap();
        let direct = message("alice", "bob", ChatKind::Direct);
        assert_eq!(conversation(&bob, &direct), "alice");
        assert_eq!(
            conversation(&alice, &direct),
            "bob",
            "alice's other devices"
        );
        let group = message("alice", "team-7", ChatKind::Group);
        assert_eq!(conversation(&bob, &group), "team-7");
    }

    #[test]
    fn notifications_carry_ids_and_never_the_body() {
        let bob = UserId::parse("bob").unwrap();
        let m = message("alice", "bob", ChatKind::Direct);
        let n = notification(&bob, &m, token(), Duration::from_secs(60));
        assert_eq!(n.collapse_key, "direct:alice");
        assert_eq!(n.token, "tok");
        assert_eq!(
            n.data.keys().map(String::as_str).collect::<Vec<_>>(),
            ["chat", "conversation", "from", "mid", "ts"]
        );
        assert_eq!(n.data["mid"], "01JD0000000000000000000000");
        assert_eq!(n.data["ts"], "1732380000123");
        assert!(!n.data.values().any(|v| v.contains("secret")));
    }
}
