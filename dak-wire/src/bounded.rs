//! JSON arrays with a most number of items, enforced while they are parsed.
//!
//! A `Vec<T>` field takes any number of items, and a count checked after
//! parsing comes after the memory: a 9 MB body of `{},{},…` is 3 million
//! items, hundreds of megabytes once parsed. [`Bounded`] stops the parser at
//! the first item past its limit, so a request costs at most that many items
//! whatever its size.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};

/// A JSON array of at most `MAX` items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounded<T, const MAX: usize>(pub Vec<T>);

impl<T, const MAX: usize> Bounded<T, MAX> {
    pub fn into_inner(self) -> Vec<T> {
        self.0
    }
}

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for Bounded<T, MAX> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Items<T, const MAX: usize>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for Items<T, MAX> {
            type Value = Bounded<T, MAX>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "an array of at most {MAX} items")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX));
                while let Some(item) = seq.next_element()? {
                    if items.len() == MAX {
                        return Err(de::Error::custom(format_args!(
                            "too many items: an array here holds at most {MAX}"
                        )));
                    }
                    items.push(item);
                }
                Ok(Bounded(items))
            }
        }

        deserializer.deserialize_seq(Items(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Body {
        items: Bounded<serde_json::Value, 3>,
    }

    #[test]
    fn up_to_the_limit_parses() {
        let body: Body = serde_json::from_str(r#"{"items":[1,{},"x"]}"#).unwrap();
        assert_eq!(body.items.0.len(), 3);
        let empty: Body = serde_json::from_str(r#"{"items":[]}"#).unwrap();
        assert!(empty.items.0.is_empty());
    }

    #[test]
    fn the_item_past_the_limit_stops_the_parser() {
        let err = serde_json::from_str::<Body>(r#"{"items":[1,2,3,4,5]}"#)
            .err()
            .unwrap();
        assert!(err.to_string().contains("at most 3"), "{err}");
        // What follows the fourth item is never looked at.
        let err = serde_json::from_str::<Body>(r#"{"items":[1,2,3,4 garbage"#)
            .err()
            .unwrap();
        assert!(err.to_string().contains("at most 3"), "{err}");
        assert!(err.is_data());
    }
}
