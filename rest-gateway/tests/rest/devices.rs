//! `GET /v1/devices` and `DELETE /v1/devices/{device}`: a user's devices.

use std::time::Duration;

use dak_runtime::presence::{Connection, Gateway, Presence};
use dak_wire::event::{self, InboundEvent, RemovedDevice};
use dak_wire::{DeviceId, UserId};
use serde_json::json;

use crate::support::{request, token, Rest};

fn bob() -> UserId {
    UserId::parse("bob").unwrap()
}

fn device(d: &str) -> DeviceId {
    DeviceId::parse(d).unwrap()
}

async fn devices_of_bob(rest: &Rest) -> Vec<DeviceId> {
    let routes = rest.presence.routes(&[bob()]).await.unwrap();
    routes[0].iter().map(|r| r.device.clone()).collect()
}

/// From his phone, bob removes his laptop: presence forgets it at once, and
/// the removal is on `dak.inbound` for persistence and push, keyed by bob.
#[tokio::test]
async fn a_user_removes_another_of_his_devices() {
    let rest = Rest::start().await;
    for d in ["phone", "laptop"] {
        rest.presence
            .register_device(&bob(), &device(d))
            .await
            .unwrap();
    }
    let answer = request(
        rest.addr,
        "DELETE",
        "/v1/devices/laptop",
        &token("bob"),
        b"",
    )
    .await;
    assert_eq!(answer.status, 202, "{:?}", answer.body);
    assert_eq!(answer.body["device"], "laptop");
    assert_eq!(devices_of_bob(&rest).await, vec![device("phone")]);

    let mut consumer = rest
        .log
        .consumer("test", &[&rest.bus.topics().inbound])
        .unwrap();
    let records = consumer.next_batch(10).await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].key, b"bob");
    match event::decode::<InboundEvent>(&records[0].payload).unwrap() {
        InboundEvent::DeviceRemoved(removed) => assert_eq!(
            removed,
            RemovedDevice {
                user: bob(),
                device: device("laptop"),
            }
        ),
        other => panic!("unexpected {other:?}"),
    }

    // Again (a client retrying), and a device never known: no error.
    for path in ["/v1/devices/laptop", "/v1/devices/never-seen"] {
        let answer = request(rest.addr, "DELETE", path, &token("bob"), b"").await;
        assert_eq!(answer.status, 202, "{path}: {:?}", answer.body);
    }
    assert_eq!(rest.inbound(), 3);
}

/// The list is the user's devices alone, ordered by id, each saying whether
/// it has a socket on a live gateway.
#[tokio::test]
async fn a_user_lists_his_devices() {
    let rest = Rest::start().await;
    let gateway = Gateway::new("http://gw".into());
    rest.presence
        .heartbeat(&gateway, Duration::from_secs(30))
        .await
        .unwrap();
    rest.presence
        .connect(&Connection {
            user: bob(),
            device: device("phone"),
            gateway_id: gateway.id.clone(),
            connection_id: "c1".into(),
        })
        .await
        .unwrap();
    rest.presence
        .register_device(&bob(), &device("laptop"))
        .await
        .unwrap();
    rest.presence
        .register_device(&UserId::parse("carol").unwrap(), &device("web"))
        .await
        .unwrap();

    let answer = request(rest.addr, "GET", "/v1/devices", &token("bob"), b"").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        answer.body,
        json!({"devices": [
            {"device": "laptop", "connected": false},
            {"device": "phone", "connected": true},
        ]})
    );
    let answer = request(rest.addr, "GET", "/v1/devices", &token("nobody"), b"").await;
    assert_eq!(answer.body, json!({"devices": []}));
    let answer = request(rest.addr, "GET", "/v1/devices", "not.a.token", b"").await;
    assert_eq!(answer.status, 401);
}

/// Bad input is refused with a clear error and nothing reaches the bus or
/// presence.
#[tokio::test]
async fn a_bad_removal_changes_nothing() {
    let rest = Rest::start().await;
    rest.presence
        .register_device(&bob(), &device("laptop"))
        .await
        .unwrap();
    let too_long = format!("/v1/devices/{}", "d".repeat(129));
    for (path, who, status, code) in [
        ("/v1/devices/lap%20top", token("bob"), 400, "bad_request"),
        (too_long.as_str(), token("bob"), 400, "bad_request"),
        (
            "/v1/devices/laptop",
            "not.a.token".to_owned(),
            401,
            "unauthorized",
        ),
    ] {
        let answer = request(rest.addr, "DELETE", path, &who, b"").await;
        assert_eq!(answer.status, status, "{path}: {:?}", answer.body);
        assert_eq!(answer.error_code(), code, "{path}");
    }
    assert_eq!(rest.inbound(), 0);
    assert_eq!(devices_of_bob(&rest).await, vec![device("laptop")]);
}
