//! Identifiers. Users, devices, groups and client message ids share one rule
//! (DESIGN §3): 1 to 128 characters of `A-Z a-z 0-9 . _ : @ + -`. The rule keeps
//! ids safe inside Redis keys, Kafka keys and URLs without escaping.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::WireError;

pub const MAX_ID_LEN: usize = 128;

fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_LEN
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'@' | b'+' | b'-')
        })
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        // Written as the plain string it holds, without the copy that
        // `#[serde(into = "String")]` would make on every encode.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl $name {
            pub fn parse(s: impl Into<String>) -> Result<Self, WireError> {
                let s = s.into();
                if valid_id(&s) {
                    Ok(Self(s))
                } else {
                    Err(WireError::bad_request(format!(
                        concat!("invalid ", $what, " id: 1 to 128 characters of A-Z a-z 0-9 . _ : @ + -")
                    )))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = WireError;
            fn try_from(s: String) -> Result<Self, WireError> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = WireError;
            fn from_str(s: &str) -> Result<Self, WireError> {
                Self::parse(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A user: the `sub` of a token, the `to` of a direct message.
    UserId,
    "user"
);
id_type!(
    /// One device of a user: the `device` claim of a token, `default` when absent.
    DeviceId,
    "device"
);
id_type!(
    /// A group chat.
    GroupId,
    "group"
);
id_type!(
    /// The client's own id for a message it sends. The same (sender, client id)
    /// always maps to the same [`Mid`], which is how outbox retries are deduplicated.
    ClientId,
    "client message"
);

impl DeviceId {
    pub fn default_device() -> Self {
        Self("default".to_owned())
    }
}

/// The server's id for a message: a ULID, so mids sort by the time the server
/// accepted them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mid(ulid::Ulid);

impl Mid {
    pub fn from_ulid(ulid: ulid::Ulid) -> Self {
        Self(ulid)
    }

    pub fn parse(s: &str) -> Result<Self, WireError> {
        ulid::Ulid::from_string(s)
            .map(Self)
            .map_err(|_| WireError::bad_request(format!("invalid mid `{}`", truncate(s))))
    }

    /// The mid right after this one: for a second message that one event
    /// produces, so that handling the event again yields the same two mids.
    pub fn next(&self) -> Mid {
        Mid(self.0.increment().unwrap_or(self.0))
    }

    /// Milliseconds since the Unix epoch at which this mid was minted.
    pub fn timestamp_ms(&self) -> u64 {
        self.0.timestamp_ms()
    }

    /// The random part of this mid: its low 80 bits.
    pub fn random(&self) -> u128 {
        self.0.random()
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl fmt::Display for Mid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl FromStr for Mid {
    type Err = WireError;
    fn from_str(s: &str) -> Result<Self, WireError> {
        Self::parse(s)
    }
}

impl Serialize for Mid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut text = [0; ulid::ULID_LEN];
        s.serialize_str(self.0.array_to_str(&mut text))
    }
}

impl<'de> Deserialize<'de> for Mid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Mid::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Whether a message goes to one user or to a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChatKind {
    Direct,
    Group,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for ok in [
            "bob",
            "a",
            "alice@example.com",
            "x.y_z:1+2-3",
            &"u".repeat(128),
        ] {
            assert!(UserId::parse(ok).is_ok(), "{ok} should be valid");
        }
    }

    #[test]
    fn rejects_empty_long_and_foreign_characters() {
        for bad in [
            "",
            &"u".repeat(129),
            "bob smith",
            "bob/1",
            "bob\n",
            "ü",
            "a*b",
            "{x}",
        ] {
            let err = UserId::parse(bad).unwrap_err();
            assert_eq!(err.code, crate::ErrorCode::BadRequest, "{bad:?}");
        }
    }

    #[test]
    fn ids_deserialize_through_validation() {
        assert!(serde_json::from_str::<DeviceId>("\"phone-1\"").is_ok());
        assert!(serde_json::from_str::<DeviceId>("\"phone 1\"").is_err());
    }

    #[test]
    fn mid_round_trips_as_a_string() {
        let mid = Mid::from_ulid(ulid::Ulid::new());
        let json = serde_json::to_string(&mid).unwrap();
        assert_eq!(serde_json::from_str::<Mid>(&json).unwrap(), mid);
        assert!(Mid::parse("not-a-ulid").is_err());
    }
}
