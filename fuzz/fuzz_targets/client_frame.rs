//! A WebSocket text frame from a client, as the gateway parses it: any input
//! gets a frame or a refusal, never a panic.
#![no_main]

use dak_wire::{ClientFrame, Limits, UserId};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let sender = UserId::parse("alice").unwrap();
    let limits = Limits {
        max_body_bytes: 256,
        max_frame_bytes: 1024,
        max_group_members: 8,
    };
    for limits in [limits, Limits::default()] {
        let _ = ClientFrame::parse(text, &sender, &limits);
    }
});
