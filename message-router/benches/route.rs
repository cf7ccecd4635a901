//! message-router's work per `dak.inbound` record: decode, decide where it
//! goes, encode the event for the next topic. Run with
//! `cargo bench -p message-router`.

use dak_wire::event::{self, Ack, InboundEvent, Message};
use dak_wire::{ChatKind, ClientId, DeviceId, Mid, UserId};
use divan::black_box;
use message_router::{route, Route};
use serde_json::value::RawValue;

fn main() {
    divan::main();
}

fn message(chat: ChatKind, to: &str) -> Vec<u8> {
    event::encode(&InboundEvent::Message(Message {
        mid: Mid::from_ulid(ulid::Ulid::from_parts(1_764_000_000_000, 42)),
        id: ClientId::parse("c-000042").unwrap(),
        from: UserId::parse("alice").unwrap(),
        from_device: DeviceId::parse("phone").unwrap(),
        to: to.into(),
        chat,
        body: Some(RawValue::from_string(r#"{"text":"see you at eight"}"#.into()).unwrap()),
        ephemeral: false,
        notice: None,
        ts: 1_764_000_000_000,
    }))
}

/// Routing plus encoding the outgoing event, as `route_batch` does.
fn route_and_encode(payload: &[u8]) -> Vec<u8> {
    match route(payload) {
        Route::Deliver { event, .. } => event::encode(&event),
        Route::Group { event, .. } => event::encode(&event),
        Route::Offline { event, .. } => event::encode(&event),
        Route::Status(event) => event::encode(&event),
        Route::DeviceRemoved(removed) => event::encode(&removed),
        Route::Drop(reason) => panic!("dropped: {reason}"),
    }
}

#[divan::bench]
fn direct_message(bencher: divan::Bencher) {
    let payload = message(ChatKind::Direct, "bob");
    bencher.bench(|| route_and_encode(black_box(&payload)));
}

#[divan::bench]
fn group_message(bencher: divan::Bencher) {
    let payload = message(ChatKind::Group, "g-climbing");
    bencher.bench(|| route_and_encode(black_box(&payload)));
}

#[divan::bench]
fn ack_of_50(bencher: divan::Bencher) {
    let mids = (0..50)
        .map(|i| Mid::from_ulid(ulid::Ulid::from_parts(1_764_000_000_000, i)))
        .collect();
    let payload = event::encode(&InboundEvent::Ack(Ack {
        user: UserId::parse("bob").unwrap(),
        device: DeviceId::parse("phone").unwrap(),
        mids,
    }));
    bencher.bench(|| route_and_encode(black_box(&payload)));
}
