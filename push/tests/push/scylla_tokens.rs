//! The push-token contract against ScyllaDB, when `DAK_SCYLLA_NODES` names a
//! cluster (comma-separated `host:port`); skipped, saying so, when it does not.
//!
//! The checks below are a copy of those in `tokens.rs`, which are private to
//! that module. Keep the two in step; once they are `pub(crate)` there, call
//! them from here and delete this copy.

use dak_wire::event::{Platform, PushToken};
use dak_wire::{DeviceId, UserId};
use push::scylla::ScyllaTokens;
use push::{DeviceToken, PushTokens};

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

/// The cluster named by `DAK_SCYLLA_NODES`, if any.
fn scylla_nodes() -> Option<Vec<String>> {
    let nodes: Vec<String> = std::env::var("DAK_SCYLLA_NODES")
        .ok()?
        .split(',')
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .map(String::from)
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

#[tokio::test]
async fn scylla_tokens_keep_the_contract() {
    let Some(nodes) = scylla_nodes() else {
        eprintln!(
            "skipped scylla_tokens_keep_the_contract: DAK_SCYLLA_NODES is not set; \
             set it to a ScyllaDB cluster (comma-separated host:port) to run it"
        );
        return;
    };
    // A keyspace of its own: the checks use fixed user names and count all rows.
    let keyspace = format!("dak_test_{}", ulid::Ulid::new().to_string().to_lowercase());
    let store = ScyllaTokens::connect(&nodes, &keyspace, 1)
        .await
        .expect("connect to DAK_SCYLLA_NODES and create the keyspace");
    // In a task of its own, so that the keyspace is dropped even when it fails.
    let outcome = tokio::spawn(async move {
        assert_eq!(store.count().await.unwrap(), 0);
        upsert_replaces_the_devices_token(&store).await;
        for_user_lists_every_device_of_that_user_only(&store).await;
        remove_spares_a_newer_registration(&store).await;
        a_token_moves_with_its_phone(&store).await;
    })
    .await;
    let session = scylla::client::session_builder::SessionBuilder::new()
        .known_nodes(&nodes)
        .build()
        .await
        .expect("connect to DAK_SCYLLA_NODES");
    session
        .query_unpaged(format!("DROP KEYSPACE IF EXISTS {keyspace}"), ())
        .await
        .expect("drop the test keyspace");
    if let Err(failed) = outcome {
        std::panic::resume_unwind(failed.into_panic());
    }
}
