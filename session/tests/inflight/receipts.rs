//! The in-flight store as session uses it for an ack: the acked delivery stays
//! in the store until the sender's `delivered` receipt is on the bus (or, for
//! the only session, in flight itself), so a session that dies in between
//! leaves the ack to be handled again, receipt and all.
//!
//! session runs whole here, on the embedded log, with in-process presence and
//! the SQLite in-flight store. The sockets of this process record what is
//! written to them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use dak_runtime::bus::{Bus, Consumer};
use dak_runtime::gateway::{LocalGateway, Sockets};
use dak_runtime::presence::{Connection, Gateway, MemoryPresence, Presence};
use dak_runtime::shutdown::Shutdown;
use dak_runtime::status::Reporter;
use dak_runtime::store::{Durable, StoreError, StoreResult};
use dak_wire::event::{self, Ack, DeliverEvent, Delivery, Message};
use dak_wire::send::{SendItem, SendOutcome};
use dak_wire::{ChatKind, ClientId, DeviceId, Mid, UserId};
use serde_json::value::RawValue;
use serde_json::Value;
use session::inflight::{InFlight, Pending, SqliteInFlight};
use session::{Deps, Session};

/// How long a test waits for what must happen.
const PATIENCE: Duration = Duration::from_secs(20);

const GATEWAY_URL: &str = "http://gateway.local";

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn phone() -> DeviceId {
    DeviceId::parse("phone").unwrap()
}

/// The frames written to the sockets of this process, by user.
#[derive(Default)]
struct Written {
    frames: Mutex<Vec<(UserId, Value)>>,
    more: tokio::sync::Notify,
}

impl Written {
    /// How many frames for `mid` were written to `who` so far.
    fn copies(&self, who: &UserId, mid: &str) -> usize {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter(|(to, f)| to == who && f["mid"] == mid)
            .count()
    }

    /// The first frame written to `who` that `wanted` picks, waiting for it.
    async fn first(&self, who: &UserId, wanted: impl Fn(&Value) -> bool) -> Value {
        tokio::time::timeout(PATIENCE, async {
            loop {
                let more = self.more.notified();
                if let Some(frame) = self
                    .frames
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|(to, frame)| to == who && wanted(frame))
                {
                    return frame.1.clone();
                }
                more.await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no such frame for {who} in {PATIENCE:?}"))
    }
}

impl Sockets for Written {
    fn send(&self, items: &[SendItem]) -> Vec<SendOutcome> {
        let mut frames = self.frames.lock().unwrap();
        for item in items {
            let frame = serde_json::from_str(item.frame.get()).unwrap();
            frames.push((item.user.clone(), frame));
        }
        self.more.notify_waiters();
        vec![SendOutcome::Sent; items.len()]
    }
}

/// The SQLite in-flight store as session sees it, watched by the test: once
/// `dies_after_ack` is armed, the next lookup of acks answers, then never
/// returns, as if the process died right after the store answered; once
/// `loses_next_begin` is armed, the next early begin is answered, but its
/// writes are then reported lost, as by a transaction that failed to commit
/// (the file keeps them here: the next begin of the same deliveries finds
/// them); each begin is counted in `begins`, and each time the retry loop
/// falls asleep on the empty store, `asleep` counts it.
struct Watched {
    inner: Arc<SqliteInFlight>,
    dies_after_ack: AtomicBool,
    died: tokio::sync::Notify,
    loses_next_begin: AtomicBool,
    begins: tokio::sync::watch::Sender<usize>,
    asleep: tokio::sync::watch::Sender<usize>,
}

impl Watched {
    fn new(inner: Arc<SqliteInFlight>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            dies_after_ack: AtomicBool::new(false),
            died: tokio::sync::Notify::new(),
            loses_next_begin: AtomicBool::new(false),
            begins: tokio::sync::watch::channel(0).0,
            asleep: tokio::sync::watch::channel(0).0,
        })
    }
}

#[async_trait]
impl InFlight for Watched {
    async fn begin(&self, deliveries: &[Pending]) -> StoreResult<Vec<bool>> {
        let (fresh, durable) = self.begin_early(deliveries).await?;
        durable.await?;
        Ok(fresh)
    }
    async fn begin_early(&self, deliveries: &[Pending]) -> StoreResult<(Vec<bool>, Durable)> {
        let (fresh, durable) = self.inner.begin_early(deliveries).await?;
        self.begins.send_modify(|n| *n += 1);
        if self.loses_next_begin.swap(false, Ordering::SeqCst) {
            let lost = StoreError::Transaction("the test lost this begin".into());
            return Ok((fresh, Durable::new(async move { Err(lost) })));
        }
        Ok((fresh, durable))
    }
    async fn take_held(&self, user: &UserId, device: &DeviceId) -> StoreResult<Vec<Pending>> {
        self.inner.take_held(user, device).await
    }
    async fn acked(&self, acks: &[Ack]) -> StoreResult<Vec<Vec<Option<Pending>>>> {
        let found = self.inner.acked(acks).await;
        if self.dies_after_ack.swap(false, Ordering::SeqCst) {
            self.died.notify_one();
            std::future::pending::<()>().await;
        }
        found
    }
    async fn claim_due(
        &self,
        now_ms: u64,
        lease_ms: u64,
        limit: usize,
    ) -> StoreResult<Vec<Pending>> {
        self.inner.claim_due(now_ms, lease_ms, limit).await
    }
    async fn resent(&self, delivery: &Pending) -> StoreResult<bool> {
        self.inner.resent(delivery).await
    }
    async fn remove(&self, deliveries: &[Pending]) -> StoreResult<()> {
        self.inner.remove(deliveries).await
    }
    async fn count(&self) -> StoreResult<u64> {
        self.inner.count().await
    }
    fn known_empty(&self) -> bool {
        self.inner.known_empty()
    }
    async fn wait_while_empty(&self) {
        let mut waiting = std::pin::pin!(self.inner.wait_while_empty());
        if futures_util::poll!(waiting.as_mut()).is_pending() {
            self.asleep.send_modify(|n| *n += 1);
        }
        waiting.await
    }
}

/// What outlives one session: the bus, presence, the in-flight file and the
/// sockets.
struct World {
    bus: Bus,
    presence: Arc<MemoryPresence>,
    written: Arc<Written>,
    store: Arc<SqliteInFlight>,
    /// Whether its sessions are the only one ([`Deps::only_instance`]).
    only_instance: bool,
    _dir: tempfile::TempDir,
}

impl World {
    async fn new() -> Self {
        Self::with(false).await
    }

    async fn with(only_instance: bool) -> Self {
        dak_runtime::telemetry::init_for_tests();
        let dir = tempfile::tempdir().unwrap();
        let bus = Bus::embedded_for_tests(dir.path()).await;
        let presence = Arc::new(MemoryPresence::default());
        let gateway = Gateway::new(GATEWAY_URL.into());
        presence
            .heartbeat(&gateway, Duration::from_secs(3600))
            .await
            .unwrap();
        for who in ["alice", "bob"] {
            let connection = Connection {
                user: user(who),
                device: phone(),
                gateway_id: gateway.id.clone(),
                connection_id: format!("{who}-1"),
            };
            presence.connect(&connection).await.unwrap();
            let live = presence
                .set_live(
                    &connection.user,
                    &connection.device,
                    &connection.connection_id,
                )
                .await
                .unwrap();
            assert!(live);
        }
        let store = Arc::new(SqliteInFlight::open(&dir.path().join("inflight.db")).unwrap());
        Self {
            bus,
            presence,
            written: Arc::default(),
            store,
            only_instance,
            _dir: dir,
        }
    }

    /// A session on this world's parts, running until it is aborted; no
    /// retry comes between the steps of a test.
    fn start(&self, inflight: Arc<dyn InFlight>) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        self.start_with(inflight, Duration::from_secs(600))
    }

    fn start_with(
        &self,
        inflight: Arc<dyn InFlight>,
        ack_timeout: Duration,
    ) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let config = session::Config {
            ack_timeout,
            retries: 3,
            scan_interval: Duration::from_millis(100),
            retry_lease: Duration::from_secs(15),
            gateway_timeout: Duration::from_secs(5),
        };
        let deps = Deps {
            inflight,
            presence: self.presence.clone(),
            producer: self.bus.producer().unwrap(),
            status: Reporter::on_bus(self.bus.producer().unwrap(), &self.bus.topics().status),
            internal_token: "internal".into(),
            local_gateway: Some(LocalGateway {
                url: GATEWAY_URL.into(),
                sockets: self.written.clone(),
            }),
            only_instance: self.only_instance,
        };
        let session = Session::build(config, &self.bus, deps).unwrap();
        tokio::spawn(session.run(Shutdown::new()))
    }

    /// Waits until session has committed `records` records of `dak.deliver`
    /// (over all partitions).
    async fn committed(&self, records: i64) {
        let topics = self.bus.topics();
        let progress = self
            .bus
            .progress(&topics.group(session::GROUP), &topics.deliver)
            .unwrap();
        let done = tokio::time::timeout(PATIENCE, async {
            loop {
                let committed = progress.committed(&[0, 1]).await.unwrap();
                if committed.iter().flatten().sum::<i64>() >= records {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(done.is_ok(), "session never committed {records} records");
    }

    /// `dak.deliver` as a group of the test's own, from its first record.
    fn stream(&self) -> Consumer {
        self.bus
            .consumer("test.deliver", &[&self.bus.topics().deliver])
            .unwrap()
    }

    /// Publishes a delivery of `message` to every device of its recipient.
    async fn deliver(&self, message: Message) {
        let recipient = user(&message.to);
        let delivery = Delivery {
            recipient: recipient.clone(),
            device: None,
            message,
        };
        self.publish(&recipient, &DeliverEvent::Message(delivery))
            .await;
    }

    async fn publish(&self, key: &UserId, event: &DeliverEvent) {
        self.bus
            .producer()
            .unwrap()
            .send(
                &self.bus.topics().deliver,
                key.as_str(),
                &event::encode(event),
            )
            .await
            .unwrap();
    }
}

fn message(from: &str, to: &str) -> Message {
    Message {
        mid: Mid::from_ulid(ulid::Ulid::new()),
        id: ClientId::parse("c-1").unwrap(),
        from: user(from),
        from_device: phone(),
        to: to.into(),
        chat: ChatKind::Direct,
        body: Some(RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap()),
        ephemeral: false,
        notice: None,
        ts: 1_732_380_000_123,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_dies_after_the_store_answered_an_ack_still_sends_its_receipt() {
    dies_after_the_store_answered_an_ack(false).await;
}

/// The same for the only session, which delivers the receipt itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_only_session_that_dies_after_the_store_answered_an_ack_still_sends_its_receipt() {
    dies_after_the_store_answered_an_ack(true).await;
}

async fn dies_after_the_store_answered_an_ack(only_instance: bool) {
    let world = World::with(only_instance).await;
    let stream = world.stream();
    let dying = Watched::new(world.store.clone());
    let first = world.start(dying.clone());

    let (alice, bob) = (user("alice"), user("bob"));
    let hi = message("alice", "bob");
    let mid = hi.mid.to_string();
    world.deliver(hi.clone()).await;
    world
        .written
        .first(&bob, |f| f["type"] == "message" && f["mid"] == mid.as_str())
        .await;
    // Done with: handled again, it would be a new delivery to bob.
    world.committed(1).await;

    dying.dies_after_ack.store(true, Ordering::SeqCst);
    let died = dying.died.notified();
    world
        .publish(
            &bob,
            &DeliverEvent::Ack(Ack {
                user: bob.clone(),
                device: phone(),
                mids: vec![hi.mid],
            }),
        )
        .await;
    tokio::time::timeout(PATIENCE, died)
        .await
        .expect("session looked up bob's ack");
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());

    // Another session takes over the same bus and store; the ack's offset was
    // never committed, so it handles the ack again.
    let second = world.start(world.store.clone());
    let receipt = world
        .written
        .first(&alice, |f| {
            f["type"] == "receipt" && f["mid"] == mid.as_str()
        })
        .await;
    assert_eq!(receipt["by"], "bob");
    assert_eq!(receipt["state"], "delivered");

    // And bob's delivery is gone: only the receipt to alice is in flight.
    let gone = tokio::time::timeout(PATIENCE, async {
        while world.store.count().await.unwrap() != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "bob's acked delivery is still in flight");
    // On the bus the receipt is a record of alice's stream, for session to
    // read; the only session sent it without one. Everything before a later
    // record of alice's stream is there to read.
    let marker = message("carol", "alice");
    world.deliver(marker.clone()).await;
    let receipts = receipts_on_the_bus_before(&stream, marker.mid).await;
    assert_eq!(receipts, if only_instance { 0 } else { 1 });
    second.abort();
}

/// session sends a delivery as soon as the store has it, before it is
/// durable there, but its batch settles only once it is: when the store
/// loses it, the batch is handled again (and the delivery, found in flight
/// this time, is not sent twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_deliveries_the_store_loses_is_handled_again() {
    let world = World::new().await;
    let store = Watched::new(world.store.clone());
    store.loses_next_begin.store(true, Ordering::SeqCst);
    let mut begins = store.begins.subscribe();
    let running = world.start(store.clone());

    let bob = user("bob");
    let hi = message("alice", "bob");
    let mid = hi.mid.to_string();
    world.deliver(hi).await;
    world
        .written
        .first(&bob, |f| f["type"] == "message" && f["mid"] == mid.as_str())
        .await;
    tokio::time::timeout(PATIENCE, begins.wait_for(|n| *n >= 2))
        .await
        .expect("the batch was never handled again")
        .unwrap();
    world.committed(1).await;
    let sent = world.written.copies(&bob, &mid);
    assert_eq!(
        sent, 1,
        "found in flight the second time, so not sent again"
    );
    running.abort();
}

/// The `delivered` receipts `stream` reads before the delivery of `marker`.
async fn receipts_on_the_bus_before(stream: &Consumer, marker: Mid) -> usize {
    let shutdown = Shutdown::new();
    let mut receipts = 0;
    let read = tokio::time::timeout(PATIENCE, async {
        loop {
            for record in stream.next_batch(100, &shutdown).await.unwrap() {
                let Ok(DeliverEvent::Message(d)) = event::decode(&record.payload) else {
                    continue;
                };
                if d.message.mid == marker {
                    return;
                }
                if d.message.notice.is_some() {
                    receipts += 1;
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the marker never reached dak.deliver");
    receipts
}

/// The retry loop sleeps while the in-flight file is empty; a delivery made
/// after it went to sleep is still sent again at its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_made_while_the_retry_loop_sleeps_is_retried_at_its_deadline() {
    let world = World::new().await;
    let store = Watched::new(world.store.clone());
    let mut asleep = store.asleep.subscribe();
    let running = world.start_with(store.clone(), Duration::from_millis(300));
    tokio::time::timeout(PATIENCE, asleep.wait_for(|n| *n >= 1))
        .await
        .expect("the retry loop never fell asleep on the empty file")
        .unwrap();

    let bob = user("bob");
    let hi = message("alice", "bob");
    let mid = hi.mid.to_string();
    world.deliver(hi).await;
    // Not acked: sent again after 300 ms.
    let sent = tokio::time::timeout(PATIENCE, async {
        loop {
            let more = world.written.more.notified();
            let copies = world.written.copies(&bob, &mid);
            if copies >= 2 {
                return copies;
            }
            more.await;
        }
    })
    .await;
    assert!(sent.is_ok(), "bob's unacked message was never sent again");
    running.abort();
}
