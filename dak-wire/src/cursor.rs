//! Sync cursors (`GET /v1/messages?after=<cursor>`): a position in a device's
//! inbox. Clients treat them as opaque strings and pass back a `next` value
//! unchanged.

use crate::WireError;

/// The cursor of inbox position `seq`.
pub fn format(seq: u64) -> String {
    format!("c{seq}")
}

/// The inbox position of a cursor [`format`] made; anything else is refused.
pub fn parse(cursor: &str) -> Result<u64, WireError> {
    cursor
        .strip_prefix('c')
        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| WireError::bad_request("invalid cursor: pass back a `next` value unchanged"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        for seq in [0, 42, u64::MAX] {
            assert_eq!(parse(&format(seq)).unwrap(), seq);
        }
        for bad in [
            "",
            "42",
            "c",
            "c-1",
            "c+1",
            "cx",
            "c1.5",
            "d42",
            "c18446744073709551616",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
