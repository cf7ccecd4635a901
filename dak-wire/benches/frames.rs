//! The per-message work on the hot path: a client's frame parsed at the
//! gateway, events encoded and decoded at every Kafka hop, and the frame a
//! device receives. Run with `cargo bench -p dak-wire`.

use dak_wire::event::{self, DeliverEvent, Delivery, InboundEvent};
use dak_wire::{
    ChatKind, ClientFrame, ClientId, DeviceId, Limits, Message, Mid, ServerFrame, UserId,
};
use divan::black_box;
use serde_json::value::RawValue;

fn main() {
    divan::main();
}

const SEND: &str = r#"{"type":"message","id":"c-000042","to":"bob","chat":"direct","body":{"text":"see you at eight, the usual place?","attachments":[]}}"#;

const ACK: &str = r#"{"type":"ack","mids":["01JD0000000000000000000000","01JD0000000000000000000001","01JD0000000000000000000002","01JD0000000000000000000003"]}"#;

fn message() -> Message {
    Message {
        mid: Mid::from_ulid(ulid::Ulid::from_parts(1_764_000_000_000, 42)),
        id: ClientId::parse("c-000042").unwrap(),
        from: UserId::parse("alice").unwrap(),
        from_device: DeviceId::parse("phone").unwrap(),
        to: "bob".into(),
        chat: ChatKind::Direct,
        body: Some(
            RawValue::from_string(
                r#"{"text":"see you at eight, the usual place?","attachments":[]}"#.into(),
            )
            .unwrap(),
        ),
        ephemeral: false,
        notice: None,
        ts: 1_764_000_000_000,
    }
}

fn delivery() -> DeliverEvent {
    DeliverEvent::Message(Delivery {
        recipient: UserId::parse("bob").unwrap(),
        device: None,
        message: message(),
    })
}

#[divan::bench]
fn parse_send_frame(bencher: divan::Bencher) {
    let sender = UserId::parse("alice").unwrap();
    let limits = Limits::default();
    bencher.bench(|| ClientFrame::parse(black_box(SEND), &sender, &limits).unwrap());
}

#[divan::bench]
fn parse_ack_frame(bencher: divan::Bencher) {
    let sender = UserId::parse("bob").unwrap();
    let limits = Limits::default();
    bencher.bench(|| ClientFrame::parse(black_box(ACK), &sender, &limits).unwrap());
}

#[divan::bench]
fn encode_inbound_event(bencher: divan::Bencher) {
    let event = InboundEvent::Message(message());
    bencher.bench(|| event::encode(black_box(&event)));
}

#[divan::bench]
fn decode_deliver_event(bencher: divan::Bencher) {
    let payload = event::encode(&delivery());
    bencher.bench(|| event::decode::<DeliverEvent>(black_box(&payload)).unwrap());
}

#[divan::bench]
fn encode_server_frame(bencher: divan::Bencher) {
    let message = message();
    bencher.bench(|| ServerFrame::from(black_box(&message)).to_json());
}
