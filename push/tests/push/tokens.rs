//! The push-token store contract. Each check takes a `&dyn PushTokens`, so every
//! implementation (SQLite now, ScyllaDB later) runs the same suite.

use dak_wire::event::{Platform, PushToken};
use dak_wire::{DeviceId, UserId};
use push::{DeviceToken, PushTokens, SqliteTokens};

fn user(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn device(s: &str) -> DeviceId {
    DeviceId::parse(s).unwrap()
}

fn registration(u: &str, d: &str, token: &str, platform: Platform) -> PushToken {
    PushToken {
        user: user(u),
        device: device(d),
        token: token.into(),
        platform,
    }
}

fn device_token(d: &str, token: &str, platform: Platform) -> DeviceToken {
    DeviceToken {
        device: device(d),
        token: token.into(),
        platform,
    }
}

async fn upsert_replaces_the_devices_token(store: &dyn PushTokens) {
    store
        .upsert(&registration("bob", "phone", "old", Platform::Android))
        .await
        .unwrap();
    store
        .upsert(&registration("bob", "phone", "new", Platform::Ios))
        .await
        .unwrap();
    assert_eq!(
        store
            .for_device(&user("bob"), &device("phone"))
            .await
            .unwrap(),
        Some(device_token("phone", "new", Platform::Ios))
    );
    assert_eq!(store.count().await.unwrap(), 1, "one token per device");
}

async fn for_user_lists_every_device_of_that_user_only(store: &dyn PushTokens) {
    for (u, d, t, p) in [
        ("carol", "tablet", "t-tablet", Platform::Ios),
        ("carol", "browser", "t-browser", Platform::Web),
        ("carol", "phone", "t-phone", Platform::Android),
        ("dave", "phone", "t-dave", Platform::Android),
    ] {
        store.upsert(&registration(u, d, t, p)).await.unwrap();
    }
    assert_eq!(
        store.for_user(&user("carol")).await.unwrap(),
        vec![
            device_token("browser", "t-browser", Platform::Web),
            device_token("phone", "t-phone", Platform::Android),
            device_token("tablet", "t-tablet", Platform::Ios),
        ]
    );
    assert!(store.for_user(&user("nobody")).await.unwrap().is_empty());
    assert_eq!(
        store
            .for_device(&user("carol"), &device("watch"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .for_device(&user("dave"), &device("tablet"))
            .await
            .unwrap(),
        None,
        "another user's device is not found"
    );
}

/// After [`for_user_lists_every_device_of_that_user_only`]: the same answers
/// for many users in one call, an empty list for a user without tokens.
async fn for_users_answers_for_each_user_at_once(store: &dyn PushTokens) {
    let asked = [user("dave"), user("nobody"), user("carol")];
    let answer = store.for_users(&asked).await.unwrap();
    assert_eq!(answer.len(), 3, "{answer:?}");
    assert_eq!(
        answer[&user("carol")],
        vec![
            device_token("browser", "t-browser", Platform::Web),
            device_token("phone", "t-phone", Platform::Android),
            device_token("tablet", "t-tablet", Platform::Ios),
        ]
    );
    assert_eq!(
        answer[&user("dave")],
        vec![device_token("phone", "t-dave", Platform::Android)]
    );
    assert!(answer[&user("nobody")].is_empty());
    assert!(store.for_users(&[]).await.unwrap().is_empty());
}

async fn remove_spares_a_newer_registration(store: &dyn PushTokens) {
    store
        .upsert(&registration("erin", "phone", "dead", Platform::Android))
        .await
        .unwrap();
    // The device re-registered while a send to its dead token was in flight.
    store
        .upsert(&registration("erin", "phone", "fresh", Platform::Android))
        .await
        .unwrap();
    assert!(!store
        .remove(&user("erin"), &device("phone"), "dead")
        .await
        .unwrap());
    assert_eq!(
        store
            .for_device(&user("erin"), &device("phone"))
            .await
            .unwrap(),
        Some(device_token("phone", "fresh", Platform::Android))
    );
    assert!(store
        .remove(&user("erin"), &device("phone"), "fresh")
        .await
        .unwrap());
    assert_eq!(
        store
            .for_device(&user("erin"), &device("phone"))
            .await
            .unwrap(),
        None
    );
    assert!(
        !store
            .remove(&user("erin"), &device("phone"), "fresh")
            .await
            .unwrap(),
        "removing twice is harmless"
    );
}

async fn a_token_moves_with_its_phone(store: &dyn PushTokens) {
    // frank signs out, gina signs in on the same phone: the FCM token stays.
    store
        .upsert(&registration(
            "frank",
            "phone",
            "shared-phone",
            Platform::Ios,
        ))
        .await
        .unwrap();
    store
        .upsert(&registration(
            "gina",
            "phone",
            "shared-phone",
            Platform::Ios,
        ))
        .await
        .unwrap();
    assert_eq!(
        store
            .for_device(&user("frank"), &device("phone"))
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .for_device(&user("gina"), &device("phone"))
            .await
            .unwrap(),
        Some(device_token("phone", "shared-phone", Platform::Ios))
    );
}

/// The suite every push-token store passes, starting empty.
pub(crate) async fn contract(store: &dyn PushTokens) {
    assert_eq!(store.count().await.unwrap(), 0);
    upsert_replaces_the_devices_token(store).await;
    for_user_lists_every_device_of_that_user_only(store).await;
    for_users_answers_for_each_user_at_once(store).await;
    remove_spares_a_newer_registration(store).await;
    a_token_moves_with_its_phone(store).await;
}

#[tokio::test]
async fn sqlite_tokens_keep_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteTokens::open(dir.path().join("push-tokens.db")).unwrap();
    contract(&store).await;
}

#[tokio::test]
async fn sqlite_tokens_survive_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("push-tokens.db");
    {
        let store = SqliteTokens::open(&path).unwrap();
        store
            .upsert(&registration("bob", "phone", "t-1", Platform::Android))
            .await
            .unwrap();
        store
            .upsert(&registration("bob", "tablet", "t-2", Platform::Ios))
            .await
            .unwrap();
    }
    let store = SqliteTokens::open(&path).unwrap();
    assert_eq!(store.count().await.unwrap(), 2);
    assert_eq!(
        store.for_user(&user("bob")).await.unwrap(),
        vec![
            device_token("phone", "t-1", Platform::Android),
            device_token("tablet", "t-2", Platform::Ios),
        ]
    );
}
