//! A record read off a topic, as each consumer decodes it: any bytes decode or
//! are refused, never panic, and what decodes encodes and decodes again.
#![no_main]

use dak_wire::event::{self, DeliverEvent, GroupEvent, InboundEvent, OfflineEvent};
use libfuzzer_sys::fuzz_target;

fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(data: &[u8]) {
    if let Ok(decoded) = event::decode::<T>(data) {
        let encoded = event::encode(&decoded);
        event::decode::<T>(&encoded).expect("what was decoded decodes again");
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<InboundEvent>(data);
    round_trip::<DeliverEvent>(data);
    round_trip::<OfflineEvent>(data);
    round_trip::<GroupEvent>(data);
});
