use std::time::Duration;

use dak_runtime::dedup::{Dedup, MemoryDedup, RedisDedup, Reservation};
use dak_wire::{ClientId, Mid, UserId};

fn mid() -> Mid {
    Mid::from_ulid(ulid::Ulid::new())
}

/// The suite every dedup store passes.
async fn contract(store: &dyn Dedup) {
    let alice = UserId::parse("alice").unwrap();
    let bob = UserId::parse("bob").unwrap();
    let id = ClientId::parse("c-17").unwrap();
    let (first, second) = (mid(), mid());

    assert_eq!(
        store.reserve(&alice, &id, first, 10).await.unwrap(),
        Reservation::New
    );
    // Before Kafka confirmed the first attempt, a retry sees it unconfirmed.
    assert_eq!(
        store.reserve(&alice, &id, second, 20).await.unwrap(),
        Reservation::Existing {
            mid: first,
            ts: 10,
            confirmed: false
        }
    );
    store.confirm(&alice, &id, first, 10).await.unwrap();
    assert_eq!(
        store.reserve(&alice, &id, second, 20).await.unwrap(),
        Reservation::Existing {
            mid: first,
            ts: 10,
            confirmed: true
        }
    );
    // Client ids are per sender.
    assert_eq!(
        store.reserve(&bob, &id, second, 20).await.unwrap(),
        Reservation::New
    );
}

/// Mappings are forgotten after the TTL, so the store does not grow forever.
async fn expiry_contract(store: &dyn Dedup) {
    let carol = UserId::parse("carol").unwrap();
    let id = ClientId::parse("old").unwrap();
    assert_eq!(
        store.reserve(&carol, &id, mid(), 1).await.unwrap(),
        Reservation::New
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if store.reserve(&carol, &id, mid(), 2).await.unwrap() == Reservation::New {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "dedup entry outlived its TTL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn memory_dedup_keeps_the_contract() {
    contract(&MemoryDedup::new(Duration::from_secs(60))).await;
    expiry_contract(&MemoryDedup::new(Duration::from_millis(300))).await;
}

#[tokio::test]
async fn redis_dedup_keeps_the_contract() {
    let conn = crate::redis().await;
    contract(&RedisDedup::new(
        conn.clone(),
        &crate::unique_prefix(),
        Duration::from_secs(60),
    ))
    .await;
    expiry_contract(&RedisDedup::new(
        conn,
        &crate::unique_prefix(),
        Duration::from_millis(300),
    ))
    .await;
}
