//! A bearer token, as every public endpoint checks it. Two shapes: any string
//! (forged, truncated, garbage), and validly signed tokens with any claims, to
//! reach the claim checks behind the signature. Neither may panic, and a token
//! signed with another key never passes.
#![no_main]

use dak_runtime::auth::Verifier;
use jsonwebtoken::{encode, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret";

fuzz_target!(|data: &[u8]| {
    let verifier = Verifier::hs256(SECRET);
    let Some((shape, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    match shape % 3 {
        0 => {
            let _ = verifier.verify(text);
            let _ = verifier.verify_header(Some(text));
        }
        shape => {
            let Ok(claims) = serde_json::from_str::<serde_json::Value>(text) else {
                return;
            };
            let key = if shape == 1 { SECRET } else { "another-secret" };
            let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(key.as_bytes()))
                .expect("HS256 signs any JSON");
            let verified = verifier.verify(&token);
            if shape == 2 {
                assert!(verified.is_err(), "a token signed with another key passed");
            }
        }
    }
});
