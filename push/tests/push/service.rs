//! The whole push service: `dak.offline` on the embedded log, presence in
//! Redis, tokens in SQLite, and FcmSender against the fake Google.
//!
//! persistence does not run here. push sends only what persistence's group
//! has finished, so the harness finishes `dak.offline` as that group itself:
//! at once (as if every store took no time), or when a test says so.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dak_runtime::bus::{Bus, Consumer, Producer};
use dak_runtime::presence::{Connection, DeviceRoute, Gateway, Presence, RedisPresence};
use dak_runtime::shutdown::Shutdown;
use dak_runtime::status::Reporter;
use dak_runtime::store::StoreResult;
use dak_wire::event::{
    self, Message, OfflineEvent, OfflineReason, Platform, PushToken, RemovedDevice,
};
use dak_wire::{ChatKind, ClientId, DeviceId, Mid, UserId};
use push::{Deps, FcmSender, Push, PushTokens, SqliteTokens};
use serde_json::value::RawValue;

use crate::fake_fcm::{FakeFcm, SendRequest};

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn device(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

fn message(from: &str, to: &str, chat: ChatKind) -> Message {
    Message {
        mid: Mid::from_ulid(ulid::Ulid::new()),
        id: ClientId::parse(format!("c-{}", ulid::Ulid::new())).unwrap(),
        from: user(from),
        from_device: DeviceId::default_device(),
        to: to.into(),
        chat,
        body: Some(RawValue::from_string(r#"{"cipher":"c2VjcmV0"}"#.into()).unwrap()),
        ephemeral: false,
        notice: None,
        ts: 1732380000123,
    }
}

/// The harness's Redis presence as push sees it: every read of it (a
/// `routes` call) is counted, so that a test can tell when push has read
/// presence for a batch.
struct Counted {
    inner: Arc<RedisPresence>,
    reads: tokio::sync::watch::Sender<usize>,
}

#[async_trait::async_trait]
impl Presence for Counted {
    async fn connect(&self, conn: &Connection) -> StoreResult<()> {
        self.inner.connect(conn).await
    }
    async fn disconnect(&self, conn: &Connection) -> StoreResult<()> {
        self.inner.disconnect(conn).await
    }
    async fn set_live(
        &self,
        user: &UserId,
        device: &DeviceId,
        connection: &str,
    ) -> StoreResult<bool> {
        self.inner.set_live(user, device, connection).await
    }
    async fn register_device(&self, user: &UserId, device: &DeviceId) -> StoreResult<()> {
        self.inner.register_device(user, device).await
    }
    async fn unregister_device(&self, user: &UserId, device: &DeviceId) -> StoreResult<()> {
        self.inner.unregister_device(user, device).await
    }
    async fn socket(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> StoreResult<Option<(String, String)>> {
        self.inner.socket(user, device).await
    }
    async fn heartbeat(&self, gateway: &Gateway, ttl: Duration) -> StoreResult<()> {
        self.inner.heartbeat(gateway, ttl).await
    }
    async fn gateway_stopped(&self, gateway: &Gateway) -> StoreResult<()> {
        self.inner.gateway_stopped(gateway).await
    }
    async fn routes(&self, users: &[UserId]) -> StoreResult<Vec<Vec<DeviceRoute>>> {
        let routes = self.inner.routes(users).await;
        self.reads.send_modify(|n| *n += 1);
        routes
    }
}

/// A running push service and everything around it.
struct Harness {
    fake: FakeFcm,
    tokens: Arc<SqliteTokens>,
    presence: Arc<RedisPresence>,
    /// How many times push has read presence.
    presence_reads: tokio::sync::watch::Receiver<usize>,
    reads: tokio::sync::watch::Sender<usize>,
    producer: Producer,
    bus: Bus,
    shutdown: Shutdown,
    running: tokio::task::JoinHandle<anyhow::Result<()>>,
    config: push::Config,
    dir: tempfile::TempDir,
    /// Stops the harness's stand-in for persistence's group, if it runs one.
    storing: Shutdown,
}

/// Who finishes `dak.offline` as persistence's group.
#[derive(Clone, Copy, PartialEq)]
enum Storing {
    /// The harness, each record as soon as it is there.
    AtOnce,
    /// The test, with [`Harness::persistence`].
    ByTheTest,
}

impl Harness {
    async fn start() -> Self {
        Self::start_storing(Storing::AtOnce, Duration::from_secs(10)).await
    }

    /// A harness whose push waits up to `store_wait` for persistence's group.
    async fn start_storing(storing: Storing, store_wait: Duration) -> Self {
        dak_runtime::telemetry::init_for_tests();
        let dir = tempfile::tempdir().unwrap();
        let bus = Bus::embedded_for_tests(dir.path()).await;
        let producer = bus.producer().unwrap();

        let fake = FakeFcm::start().await;
        let config = push::Config {
            push_store_wait: store_wait,
            ..crate::config(&fake, dir.path())
        };
        let tokens = Arc::new(SqliteTokens::open(push::tokens_path(dir.path())).unwrap());
        let redis_url =
            std::env::var("DAK_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let redis = dak_runtime::redis::connect(&redis_url)
            .await
            .expect("Redis for presence (DAK_TEST_REDIS_URL)");
        let presence = Arc::new(RedisPresence::new(
            redis,
            &format!("push-test-{}", ulid::Ulid::new()),
        ));
        let (reads, presence_reads) = tokio::sync::watch::channel(0);
        let shutdown = Shutdown::new();
        let running = spawn(&config, &bus, &tokens, &presence, &reads, &shutdown);
        let storing_shutdown = Shutdown::new();
        if storing == Storing::AtOnce {
            let persistence = persistence(&bus);
            let stop = storing_shutdown.clone();
            tokio::spawn(async move {
                persistence
                    .run(100, &stop, |batch| async move { Ok(batch) })
                    .await;
            });
        }
        Self {
            storing: storing_shutdown,
            fake,
            tokens,
            presence,
            presence_reads,
            reads,
            producer,
            bus,
            shutdown,
            running,
            config,
            dir,
        }
    }

    async fn publish(&self, key: &UserId, event: &OfflineEvent) {
        self.producer
            .send(
                &self.bus.topics().offline,
                key.as_str(),
                &event::encode(event),
            )
            .await
            .unwrap();
    }

    /// Gives `u`'s device `d` a socket on a live gateway.
    async fn connect(&self, u: &str, d: &str) {
        let gateway = Gateway::new("http://127.0.0.1:1".into());
        self.presence
            .heartbeat(&gateway, Duration::from_secs(120))
            .await
            .unwrap();
        self.presence
            .connect(&Connection {
                user: user(u),
                device: device(d),
                gateway_id: gateway.id.clone(),
                connection_id: "conn-1".into(),
            })
            .await
            .unwrap();
    }

    async fn register(&self, u: &str, d: &str, token: &str, platform: Platform) {
        let registration = PushToken {
            user: user(u),
            device: device(d),
            token: token.into(),
            platform,
        };
        self.publish(&user(u), &OfflineEvent::PushToken(registration))
            .await;
    }

    async fn store(&self, u: &str, d: Option<&str>, message: &Message) {
        let event = OfflineEvent::Store {
            user: user(u),
            device: d.map(device),
            reason: OfflineReason::NotConnected,
            message: message.clone(),
        };
        self.publish(&user(u), &event).await;
    }

    /// Kills the service mid-stream (its task is aborted, nothing is flushed or
    /// committed) and starts a new one on the same topic, store and group.
    async fn crash_and_restart(&mut self) {
        self.running.abort();
        let _ = (&mut self.running).await;
        self.shutdown = Shutdown::new();
        let tokens = Arc::new(SqliteTokens::open(push::tokens_path(self.dir.path())).unwrap());
        self.running = spawn(
            &self.config,
            &self.bus,
            &tokens,
            &self.presence,
            &self.reads,
            &self.shutdown,
        );
        self.tokens = tokens;
    }

    async fn stop(self) {
        self.storing.cancel();
        self.shutdown.cancel();
        self.running.await.unwrap().unwrap();
    }
}

fn spawn(
    config: &push::Config,
    bus: &Bus,
    tokens: &Arc<SqliteTokens>,
    presence: &Arc<RedisPresence>,
    reads: &tokio::sync::watch::Sender<usize>,
    shutdown: &Shutdown,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let deps = Deps {
        tokens: tokens.clone(),
        presence: Arc::new(Counted {
            inner: presence.clone(),
            reads: reads.clone(),
        }),
        sender: Arc::new(FcmSender::new(config).unwrap()),
        status: Reporter::on_bus(bus.producer().unwrap(), &bus.topics().status),
    };
    let service = Push::build(config, bus, deps).unwrap();
    tokio::spawn(service.run(shutdown.clone()))
}

/// A member of persistence's consumer group on `dak.offline`.
fn persistence(bus: &Bus) -> Consumer {
    let topics = bus.topics();
    bus.consumer(&topics.group(push::STORE_GROUP), &[&topics.offline])
        .unwrap()
}

fn pushes_of<'a>(sends: &'a [SendRequest], mid: &Mid) -> Vec<&'a SendRequest> {
    let mid = mid.to_string();
    sends.iter().filter(|s| s.data("mid") == mid).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_devices_are_woken_once_per_message_and_connected_ones_not_at_all() {
    let h = Harness::start().await;

    // bob's laptop has a socket on a live gateway; his phone does not.
    h.connect("bob", "laptop").await;

    h.publish(
        &user("bob"),
        &OfflineEvent::Drop(dak_wire::event::Ack {
            user: user("bob"),
            device: device("phone"),
            mids: vec![],
        }),
    )
    .await;
    h.producer
        .send(&h.bus.topics().offline, "bob", b"{not an event")
        .await
        .unwrap();
    h.register("bob", "phone", "tok-bob-phone", Platform::Android)
        .await;
    h.register("bob", "laptop", "tok-bob-laptop", Platform::Web)
        .await;
    h.register("carol", "phone", "tok-carol-phone", Platform::Android)
        .await;
    h.register("carol", "tablet", "tok-carol-tablet", Platform::Ios)
        .await;

    let to_phone = message("alice", "bob", ChatKind::Direct);
    let to_laptop = message("alice", "bob", ChatKind::Direct);
    let to_watch = message("alice", "bob", ChatKind::Direct);
    let group = message("alice", "team-7", ChatKind::Group);
    let last = message("alice", "bob", ChatKind::Direct);
    h.store("bob", Some("phone"), &to_phone).await;
    h.store("bob", Some("laptop"), &to_laptop).await;
    // A device with no token is skipped.
    h.store("bob", Some("watch"), &to_watch).await;
    // carol's user-level inbox: every device of hers is woken.
    h.store("carol", None, &group).await;
    // A receipt is stored for the phone but never wakes it.
    let receipt = Message::receipt(
        to_phone.mid,
        &user("bob"),
        &user("alice"),
        &device("phone"),
        dak_wire::ReceiptState::Read,
        1,
    );
    h.store("bob", Some("phone"), &receipt).await;
    // The user-level inbox skips a connected device as well.
    h.store("bob", None, &last).await;

    // Events of one user are handled in order, so once `last` was pushed,
    // everything published for bob before it was handled too.
    let sends = h
        .fake
        .wait_for_sends("the pushes for bob and carol", |sends| {
            !pushes_of(sends, &last.mid).is_empty() && pushes_of(sends, &group.mid).len() >= 2
        })
        .await;

    let phone = pushes_of(&sends, &to_phone.mid);
    assert_eq!(phone.len(), 1, "one push per message: {phone:#?}");
    assert_eq!(phone[0].token(), "tok-bob-phone");
    assert_eq!(phone[0].data("from"), "alice");
    assert_eq!(phone[0].data("chat"), "direct");
    assert_eq!(phone[0].data("conversation"), "alice");
    assert_eq!(phone[0].data("ts"), "1732380000123");
    assert_eq!(
        phone[0].message()["android"]["collapse_key"],
        "direct:alice"
    );
    assert!(phone[0].message().get("notification").is_none());
    assert!(
        !phone[0].body.to_string().contains("c2VjcmV0"),
        "the body never goes to Google"
    );

    assert!(
        pushes_of(&sends, &to_laptop.mid).is_empty(),
        "the laptop is connected"
    );
    assert!(
        pushes_of(&sends, &to_watch.mid).is_empty(),
        "the watch has no token"
    );
    assert!(
        pushes_of(&sends, &receipt.mid).is_empty(),
        "receipts are never pushed"
    );

    let mut carol: Vec<&str> = pushes_of(&sends, &group.mid)
        .iter()
        .map(|s| s.token())
        .collect();
    carol.sort_unstable();
    assert_eq!(carol, ["tok-carol-phone", "tok-carol-tablet"]);
    let to_carol = pushes_of(&sends, &group.mid)[0];
    assert_eq!(to_carol.data("chat"), "group");
    assert_eq!(to_carol.data("conversation"), "team-7");
    assert_eq!(
        to_carol.message()["android"]["collapse_key"],
        "group:team-7"
    );

    let last_pushes: Vec<&str> = pushes_of(&sends, &last.mid)
        .iter()
        .map(|s| s.token())
        .collect();
    assert_eq!(last_pushes, ["tok-bob-phone"], "not the connected laptop");
    assert!(
        sends.iter().all(|s| s.token() != "tok-bob-laptop"),
        "nothing ever went to the connected laptop"
    );

    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_token_is_forgotten_and_a_new_one_used() {
    let h = Harness::start().await;
    h.fake.unregister("tok-dave-old");
    h.register("dave", "phone", "tok-dave-old", Platform::Android)
        .await;
    let first = message("alice", "dave", ChatKind::Direct);
    h.store("dave", Some("phone"), &first).await;

    let sends = h
        .fake
        .wait_for_sends("the push to the dead token", |sends| {
            !pushes_of(sends, &first.mid).is_empty()
        })
        .await;
    assert_eq!(pushes_of(&sends, &first.mid)[0].token(), "tok-dave-old");

    let deadline = Instant::now() + Duration::from_secs(30);
    while h
        .tokens
        .for_device(&user("dave"), &device("phone"))
        .await
        .unwrap()
        .is_some()
    {
        assert!(Instant::now() < deadline, "the dead token was not removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // With the token gone, nothing is sent until the app registers a new one.
    let unreachable = message("alice", "dave", ChatKind::Direct);
    h.store("dave", Some("phone"), &unreachable).await;
    h.register("dave", "phone", "tok-dave-new", Platform::Android)
        .await;
    let second = message("alice", "dave", ChatKind::Direct);
    h.store("dave", Some("phone"), &second).await;

    let sends = h
        .fake
        .wait_for_sends("the push to the new token", |sends| {
            !pushes_of(sends, &second.mid).is_empty()
        })
        .await;
    assert!(pushes_of(&sends, &unreachable.mid).is_empty());
    let second_pushes: Vec<&str> = pushes_of(&sends, &second.mid)
        .iter()
        .map(|s| s.token())
        .collect();
    assert_eq!(second_pushes, ["tok-dave-new"]);
    assert_eq!(
        pushes_of(&sends, &first.mid).len(),
        1,
        "an invalid token is not retried"
    );

    h.stop().await;
}

/// A device its user removed loses its token: a message waiting for the user
/// wakes only the devices he kept, until the removed one registers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_is_not_woken() {
    let h = Harness::start().await;
    h.register("erin", "phone", "tok-erin-phone", Platform::Android)
        .await;
    h.register("erin", "laptop", "tok-erin-laptop", Platform::Web)
        .await;
    let removed = RemovedDevice {
        user: user("erin"),
        device: device("laptop"),
    };
    h.publish(&user("erin"), &OfflineEvent::DeviceRemoved(removed))
        .await;
    // Waiting in the user-level inbox: every token of erin's is woken.
    let waiting = message("alice", "erin", ChatKind::Direct);
    h.store("erin", None, &waiting).await;
    // The laptop comes back; push has finished with `waiting` by the time
    // it pushes what comes after it.
    h.register("erin", "laptop", "tok-erin-laptop-2", Platform::Web)
        .await;
    let later = message("alice", "erin", ChatKind::Direct);
    h.store("erin", None, &later).await;

    let sends = h
        .fake
        .wait_for_sends("the pushes of the later message", |sends| {
            pushes_of(sends, &later.mid).len() == 2
        })
        .await;
    let tokens = |mid: &Mid| {
        let mut tokens: Vec<&str> = pushes_of(&sends, mid).iter().map(|s| s.token()).collect();
        tokens.sort_unstable();
        tokens
    };
    assert_eq!(tokens(&waiting.mid), ["tok-erin-phone"]);
    assert_eq!(tokens(&later.mid), ["tok-erin-laptop-2", "tok-erin-phone"]);
    h.stop().await;
}

/// push crashes while a stream of messages is being pushed; the instance that
/// replaces it picks up from the committed offsets, so every message is pushed
/// (a few may be pushed twice: the crash came before their offsets were stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_stream_loses_no_push() {
    let mut h = Harness::start().await;
    h.register("erin", "phone", "tok-erin", Platform::Android)
        .await;
    let messages: Vec<Message> = (0..100)
        .map(|_| message("alice", "erin", ChatKind::Direct))
        .collect();
    for m in &messages[..50] {
        h.store("erin", Some("phone"), m).await;
    }
    h.fake
        .wait_for_sends("the first pushes", |sends| sends.len() >= 10)
        .await;
    h.crash_and_restart().await;
    for m in &messages[50..] {
        h.store("erin", Some("phone"), m).await;
    }
    let sends = h
        .fake
        .wait_for_sends("a push for every message", |sends| {
            messages
                .iter()
                .all(|m| !pushes_of(sends, &m.mid).is_empty())
        })
        .await;
    for m in &messages {
        assert!(pushes_of(&sends, &m.mid)
            .iter()
            .all(|s| s.token() == "tok-erin"));
    }
    h.stop().await;
}

/// Reads the next `n` records as persistence, takes `taking` to store
/// them, and commits them; when it committed.
async fn store(persistence: &Consumer, n: usize, taking: Duration) -> Instant {
    let shutdown = Shutdown::new();
    let mut records = Vec::new();
    while records.len() < n {
        let batch = persistence.next_batch(n - records.len(), &shutdown).await;
        records.extend(batch.unwrap());
    }
    tokio::time::sleep(taking).await;
    let stored_at = Instant::now();
    persistence.done(&records).await;
    persistence.commit().await;
    stored_at
}

/// Waits for `m`'s push, which must not have gone out before `stored_at`.
async fn assert_pushed_after(h: &Harness, m: &Message, stored_at: Instant) {
    let sends = h
        .fake
        .wait_for_sends("the push", |sends| !pushes_of(sends, &m.mid).is_empty())
        .await;
    let push = pushes_of(&sends, &m.mid)[0];
    assert!(
        push.at >= stored_at,
        "pushed {:?} before the message was stored",
        stored_at - push.at
    );
}

/// An app woken by a push syncs at once: the push goes out only after
/// persistence's group finished the message, however long persistence takes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_is_woken_only_once_its_message_is_stored() {
    let h = Harness::start_storing(Storing::ByTheTest, Duration::from_secs(60)).await;
    h.register("frank", "phone", "tok-frank", Platform::Android)
        .await;
    let m = message("alice", "frank", ChatKind::Direct);
    h.store("frank", Some("phone"), &m).await;

    // persistence reads both records, and takes its time storing.
    let persistence = persistence(&h.bus);
    let stored_at = store(&persistence, 2, Duration::from_millis(500)).await;
    assert_pushed_after(&h, &m, stored_at).await;
    drop(persistence);
    h.stop().await;
}

/// A device that connects while push waits for persistence gets the message
/// in its replay, and is not woken for it as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_connects_while_its_message_is_stored_is_not_woken() {
    let h = Harness::start_storing(Storing::ByTheTest, Duration::from_secs(60)).await;
    h.register("heidi", "phone", "tok-heidi", Platform::Android)
        .await;
    h.register("ivan", "phone", "tok-ivan", Platform::Android)
        .await;
    let persistence = persistence(&h.bus);
    store(&persistence, 2, Duration::ZERO).await;

    let mut reads = h.presence_reads.clone();
    let before = *reads.borrow_and_update();
    let m = message("alice", "heidi", ChatKind::Direct);
    h.store("heidi", Some("phone"), &m).await;
    // push found heidi's phone offline, and waits for persistence.
    reads.wait_for(|n| *n > before).await.unwrap();
    h.connect("heidi", "phone").await;
    store(&persistence, 1, Duration::ZERO).await;

    // push handles its batches one after another: once ivan's later
    // message is pushed, heidi's batch is done.
    let later = message("alice", "ivan", ChatKind::Direct);
    h.store("ivan", Some("phone"), &later).await;
    store(&persistence, 1, Duration::ZERO).await;
    let sends = h
        .fake
        .wait_for_sends("ivan's push", |sends| {
            !pushes_of(sends, &later.mid).is_empty()
        })
        .await;
    assert!(
        pushes_of(&sends, &m.mid).is_empty(),
        "heidi's phone was woken though it connected before her message was stored"
    );
    drop(persistence);
    h.stop().await;
}

/// When persistence is stuck, devices are still woken: after the wait, then,
/// while it stays stuck, without one; once it has caught up, push waits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_persistence_costs_one_wait_not_one_per_batch() {
    let wait = Duration::from_secs(3);
    let h = Harness::start_storing(Storing::ByTheTest, wait).await;
    // persistence's group is there from the start (so the log keeps what it
    // has not read), and reads nothing until later.
    let persistence = persistence(&h.bus);
    h.register("grace", "phone", "tok-grace", Platform::Android)
        .await;
    let push_of = |m: Message| {
        let h = &h;
        async move {
            let published = Instant::now();
            h.store("grace", Some("phone"), &m).await;
            let sends = h
                .fake
                .wait_for_sends("grace's push", |sends| !pushes_of(sends, &m.mid).is_empty())
                .await;
            pushes_of(&sends, &m.mid)[0].at - published
        }
    };

    let first = push_of(message("alice", "grace", ChatKind::Direct)).await;
    assert!(
        first >= wait,
        "pushed after {first:?}, before the wait was over"
    );
    let second = push_of(message("alice", "grace", ChatKind::Direct)).await;
    assert!(
        second < wait,
        "waited again ({second:?}) for a stuck persistence"
    );

    // persistence catches up: the next push waits for it again.
    store(&persistence, 3, Duration::ZERO).await;
    let m = message("alice", "grace", ChatKind::Direct);
    h.store("grace", Some("phone"), &m).await;
    let stored_at = store(&persistence, 1, Duration::from_millis(500)).await;
    assert_pushed_after(&h, &m, stored_at).await;
    drop(persistence);
    h.stop().await;
}
