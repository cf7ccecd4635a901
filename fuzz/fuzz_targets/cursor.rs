//! A sync cursor from a client (`?after=`): refused or parsed, and a parsed one
//! is the cursor of its position.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(seq) = dak_wire::cursor::parse(text) {
        assert_eq!(dak_wire::cursor::format(seq), text);
    }
});
