//! The inbox as persistence uses it for a device's ack of a stored message:
//! the sender's `delivered` receipt is on the bus before the message leaves
//! the inbox, so a persistence that dies right after the drop has sent it.
//!
//! persistence runs whole here, on the embedded log, with the SQLite inbox
//! and status store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dak_runtime::auth::Verifier;
use dak_runtime::bus::{Bus, Consumer};
use dak_runtime::shutdown::Shutdown;
use dak_runtime::status::Reporter;
use dak_wire::event::{
    self, Ack, DeliverEvent, Message, Notice, OfflineEvent, OfflineReason, ReceiptState,
};
use dak_wire::{ChatKind, ClientId, DeviceId, Mid, UserId};
use persistence::inbox::{Inbox, InboxResult, SqliteInbox, Stored};
use persistence::status::SqliteStatus;
use persistence::{Deps, Persistence};
use serde_json::value::RawValue;

/// How long a test waits for what must happen.
const PATIENCE: Duration = Duration::from_secs(20);

/// The SQLite inbox, through which the test stops persistence at one point:
/// once armed, the next drop removes what it names, then never returns, as
/// if the process died right after the inbox let go of the messages.
struct DiesAfterDrop {
    inner: Arc<SqliteInbox>,
    armed: AtomicBool,
    died: tokio::sync::Notify,
}

#[async_trait]
impl Inbox for DiesAfterDrop {
    async fn store(&self, items: &[Stored]) -> InboxResult<u64> {
        self.inner.store(items).await
    }
    async fn find(
        &self,
        user: &UserId,
        device: &DeviceId,
        mids: &[Mid],
    ) -> InboxResult<Vec<Message>> {
        self.inner.find(user, device, mids).await
    }
    async fn drop_acked(
        &self,
        user: &UserId,
        device: &DeviceId,
        mids: &[Mid],
        tombstone_until_ms: u64,
    ) -> InboxResult<Vec<Message>> {
        let dropped = self
            .inner
            .drop_acked(user, device, mids, tombstone_until_ms)
            .await;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.died.notify_one();
            std::future::pending::<()>().await;
        }
        dropped
    }
    async fn take_over(&self, user: &UserId, device: &DeviceId) -> InboxResult<u64> {
        self.inner.take_over(user, device).await
    }
    async fn remove_device(&self, user: &UserId, device: &DeviceId) -> InboxResult<Vec<Message>> {
        self.inner.remove_device(user, device).await
    }
    async fn page(
        &self,
        user: &UserId,
        device: &DeviceId,
        after: Option<u64>,
        limit: usize,
        now_ms: u64,
    ) -> InboxResult<Vec<(u64, Message)>> {
        self.inner.page(user, device, after, limit, now_ms).await
    }
    async fn expire(&self, now_ms: u64) -> InboxResult<u64> {
        self.inner.expire(now_ms).await
    }
    async fn depth(&self) -> InboxResult<u64> {
        self.inner.depth().await
    }
}

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn phone() -> DeviceId {
    DeviceId::parse("phone").unwrap()
}

/// What outlives one persistence: the bus and the files.
struct World {
    bus: Bus,
    inbox: Arc<SqliteInbox>,
    dir: tempfile::TempDir,
}

impl World {
    async fn new() -> Self {
        dak_runtime::telemetry::init_for_tests();
        let dir = tempfile::tempdir().unwrap();
        let bus = Bus::embedded_for_tests(dir.path()).await;
        let inbox = Arc::new(SqliteInbox::open(&dir.path().join("inbox.db")).unwrap());
        Self { bus, inbox, dir }
    }

    /// A persistence on this world's parts, running until it is aborted.
    fn start(&self, inbox: Arc<dyn Inbox>) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        let config = persistence::Config {
            inbox_ttl: Duration::from_secs(30 * 86_400),
            tombstone_ttl: Duration::from_secs(86_400),
            expiry_interval: Duration::from_secs(60),
            status_retention: Duration::from_secs(30 * 86_400),
        };
        let status =
            SqliteStatus::open(&self.dir.path().join("status.db"), config.status_retention)
                .unwrap();
        let deps = Deps {
            inbox,
            status: Arc::new(status),
            reporter: Reporter::on_bus(self.bus.producer().unwrap(), &self.bus.topics().status),
            producer: self.bus.producer().unwrap(),
            verifier: Verifier::hs256("secret"),
            internal_token: "internal".into(),
            local_gateway: None,
        };
        let persistence = Persistence::build(config, &self.bus, deps).unwrap();
        tokio::spawn(persistence.run(Shutdown::new()))
    }

    /// Publishes a `store` of `message` for `user`'s phone, which is not
    /// connected.
    async fn store_for_the_phone_of(&self, user: &UserId, message: Message) {
        let store = OfflineEvent::Store {
            user: user.clone(),
            device: Some(phone()),
            reason: OfflineReason::NotConnected,
            message,
        };
        self.publish(user, &store).await;
    }

    async fn publish(&self, key: &UserId, event: &OfflineEvent) {
        self.bus
            .producer()
            .unwrap()
            .send(
                &self.bus.topics().offline,
                key.as_str(),
                &event::encode(event),
            )
            .await
            .unwrap();
    }

    /// Waits until the inbox holds a message.
    async fn stored(&self, or_else: &str) {
        let stored = tokio::time::timeout(PATIENCE, async {
            while self.inbox.depth().await.unwrap() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(stored.is_ok(), "{or_else}");
    }

    /// Reads `dak.deliver` as a group of the test's own.
    fn deliveries(&self) -> Consumer {
        self.bus
            .consumer("test.deliveries", &[&self.bus.topics().deliver])
            .unwrap()
    }
}

/// The next `delivered` receipt on `dak.deliver`: (to, about mid, by).
async fn next_receipt(deliveries: &Consumer) -> (UserId, Mid, UserId) {
    receipts(deliveries, 1).await.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistence_that_dies_right_after_a_drop_has_sent_its_receipt() {
    let world = World::new().await;
    let dying = Arc::new(DiesAfterDrop {
        inner: world.inbox.clone(),
        armed: AtomicBool::new(false),
        died: tokio::sync::Notify::new(),
    });
    let deliveries = world.deliveries();
    let first = world.start(dying.clone());

    let (alice, bob) = (user("alice"), user("bob"));
    let hi = Message {
        mid: Mid::from_ulid(ulid::Ulid::new()),
        id: ClientId::parse("c-1").unwrap(),
        from: alice.clone(),
        from_device: phone(),
        to: "bob".into(),
        chat: ChatKind::Direct,
        body: Some(RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap()),
        ephemeral: false,
        notice: None,
        ts: 1_732_380_000_123,
    };
    world.store_for_the_phone_of(&bob, hi.clone()).await;
    world.stored("bob's message was never stored").await;

    dying.armed.store(true, Ordering::SeqCst);
    let died = dying.died.notified();
    world
        .publish(
            &bob,
            &OfflineEvent::Drop(Ack {
                user: bob.clone(),
                device: phone(),
                mids: vec![hi.mid],
            }),
        )
        .await;
    tokio::time::timeout(PATIENCE, died)
        .await
        .expect("persistence dropped bob's message");
    first.abort();
    assert!(first.await.unwrap_err().is_cancelled());
    assert_eq!(world.inbox.depth().await.unwrap(), 0, "the message is gone");

    assert_eq!(
        next_receipt(&deliveries).await,
        (alice, hi.mid, bob.clone())
    );

    // Another persistence handles the drop again (its offset was never
    // committed), finds nothing left to drop, and carries on.
    let second = world.start(world.inbox.clone());
    let later = Message {
        mid: Mid::from_ulid(ulid::Ulid::new()),
        id: ClientId::parse("c-2").unwrap(),
        ..hi
    };
    world.store_for_the_phone_of(&bob, later.clone()).await;
    world.stored("the second persistence stored nothing").await;
    let page = world.inbox.page(&bob, &phone(), None, 10, 0).await.unwrap();
    assert_eq!(
        page.iter().map(|(_, m)| m.mid).collect::<Vec<_>>(),
        vec![later.mid]
    );
    second.abort();
}

/// Acks of several devices in one batch, behind the stores they ack: every
/// sender gets its receipt and every acked message leaves its inbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_of_many_devices_in_one_batch_each_send_their_receipts() {
    let world = World::new().await;
    let deliveries = world.deliveries();
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    let message = |id: &str, to: &UserId| Message {
        mid: Mid::from_ulid(ulid::Ulid::new()),
        id: ClientId::parse(id).unwrap(),
        from: alice.clone(),
        from_device: phone(),
        to: to.to_string(),
        chat: ChatKind::Direct,
        body: Some(RawValue::from_string(r#"{"text":"hi"}"#.into()).unwrap()),
        ephemeral: false,
        notice: None,
        ts: 1_732_380_000_123,
    };
    let (m1, m2, m3) = (
        message("c-1", &bob),
        message("c-2", &bob),
        message("c-3", &carol),
    );
    let drop = |user: &UserId, mid: Mid| {
        OfflineEvent::Drop(Ack {
            user: user.clone(),
            device: phone(),
            mids: vec![mid],
        })
    };
    // All on the bus before persistence starts: its first batch holds them.
    world.store_for_the_phone_of(&bob, m1.clone()).await;
    world.store_for_the_phone_of(&bob, m2.clone()).await;
    world.store_for_the_phone_of(&carol, m3.clone()).await;
    world.publish(&bob, &drop(&bob, m1.mid)).await;
    world.publish(&carol, &drop(&carol, m3.mid)).await;
    world.publish(&bob, &drop(&bob, m2.mid)).await;
    let running = world.start(world.inbox.clone());

    let mut receipts = receipts(&deliveries, 3).await;
    receipts.sort_by_key(|(_, mid, _)| *mid);
    let mut wanted = vec![
        (alice.clone(), m1.mid, bob.clone()),
        (alice.clone(), m2.mid, bob.clone()),
        (alice.clone(), m3.mid, carol.clone()),
    ];
    wanted.sort_by_key(|(_, mid, _)| *mid);
    assert_eq!(receipts, wanted);
    let emptied = tokio::time::timeout(PATIENCE, async {
        while world.inbox.depth().await.unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(emptied.is_ok(), "acked messages left in the inbox");
    running.abort();
}

/// The next `n` `delivered` receipts on `dak.deliver` (or more, when the
/// last batch read holds more): (to, about mid, by) each.
async fn receipts(deliveries: &Consumer, n: usize) -> Vec<(UserId, Mid, UserId)> {
    let shutdown = Shutdown::new();
    let mut found = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        while found.len() < n {
            for record in deliveries.next_batch(100, &shutdown).await.unwrap() {
                let Ok(DeliverEvent::Message(d)) = event::decode(&record.payload) else {
                    continue;
                };
                if let Some(Notice::Receipt {
                    mid,
                    state: ReceiptState::Delivered,
                }) = d.message.notice
                {
                    found.push((d.recipient, mid, d.message.from));
                }
            }
        }
    })
    .await;
    assert!(read.is_ok(), "{} of {n} receipts: {found:?}", found.len());
    found
}
