//! Client identity from JWTs (DESIGN §3), and the internal token.
//!
//! A token's `sub` is the user, its `device` claim the device (`default` when
//! absent), and `exp` is required. Tokens are HS256 with the shared secret, or
//! RS256/EdDSA against a configured public key.

use std::time::Duration;

use dak_wire::{DeviceId, UserId};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Who is on the other end of a connection or request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    pub device: DeviceId,
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    exp: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("no JWT secret or public key configured")]
    Missing,
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("unsupported JWT algorithm `{0}` (RS256 or EdDSA with a public key)")]
    Algorithm(String),
    #[error("bad key: {0}")]
    Key(#[from] jsonwebtoken::errors::Error),
}

/// Verifies client tokens.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn hs256(secret: &str) -> Self {
        Self::new(
            DecodingKey::from_secret(secret.as_bytes()),
            Algorithm::HS256,
        )
    }

    /// From the settings: a public key file when given, else the HS256 secret.
    pub fn from_args(args: &crate::config::AuthArgs) -> Result<Self, KeyError> {
        if let Some(path) = &args.jwt_public_key {
            let pem = std::fs::read(path).map_err(|source| KeyError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let (key, algorithm) = match args.jwt_algorithm.as_str() {
                "RS256" => (DecodingKey::from_rsa_pem(&pem)?, Algorithm::RS256),
                "EdDSA" => (DecodingKey::from_ed_pem(&pem)?, Algorithm::EdDSA),
                other => return Err(KeyError::Algorithm(other.to_owned())),
            };
            return Ok(Self::new(key, algorithm));
        }
        args.jwt_secret
            .as_deref()
            .map(Self::hs256)
            .ok_or(KeyError::Missing)
    }

    fn new(key: DecodingKey, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Self { key, validation }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let user = UserId::parse(data.claims.sub).map_err(|e| AuthError::Invalid(e.message))?;
        let device = match data.claims.device {
            Some(d) => DeviceId::parse(d).map_err(|e| AuthError::Invalid(e.message))?,
            None => DeviceId::default_device(),
        };
        Ok(Identity { user, device })
    }

    /// Verifies the token of an `Authorization: Bearer …` header value.
    pub fn verify_header(&self, header: Option<&str>) -> Result<Identity, AuthError> {
        let token = bearer(header).ok_or(AuthError::Missing)?;
        self.verify(token)
    }
}

/// The token of an `Authorization: Bearer …` header value.
pub fn bearer(header: Option<&str>) -> Option<&str> {
    let value = header?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Mints an HS256 token for `user`/`device`, valid for `ttl`.
pub fn mint(secret: &str, user: &UserId, device: &DeviceId, ttl: Duration) -> String {
    let claims = Claims {
        sub: user.to_string(),
        device: Some(device.to_string()),
        exp: crate::now_ms() / 1000 + ttl.as_secs(),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 encoding cannot fail")
}

/// Checks an internal call's bearer token in constant time.
pub fn internal_token_matches(expected: &str, header: Option<&str>) -> bool {
    let Some(given) = bearer(header) else {
        return false;
    };
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (UserId, DeviceId) {
        (
            UserId::parse("alice").unwrap(),
            DeviceId::parse("phone").unwrap(),
        )
    }

    #[test]
    fn minted_tokens_verify() {
        let (user, device) = ids();
        let token = mint("s3cret", &user, &device, Duration::from_secs(60));
        let id = Verifier::hs256("s3cret").verify(&token).unwrap();
        assert_eq!(id, Identity { user, device });
    }

    #[test]
    fn device_defaults_when_the_claim_is_absent() {
        let claims = Claims {
            sub: "bob".into(),
            device: None,
            exp: crate::now_ms() / 1000 + 60,
        };
        let token =
            jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(b"k"))
                .unwrap();
        assert_eq!(
            Verifier::hs256("k").verify(&token).unwrap().device.as_str(),
            "default"
        );
    }

    #[test]
    fn forged_expired_and_garbage_tokens_are_refused() {
        let (user, device) = ids();
        let forged = mint("other", &user, &device, Duration::from_secs(60));
        assert!(Verifier::hs256("s3cret").verify(&forged).is_err());

        let expired = Claims {
            sub: "alice".into(),
            device: None,
            exp: crate::now_ms() / 1000 - 3600,
        };
        let token = jsonwebtoken::encode(
            &Header::default(),
            &expired,
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        assert!(Verifier::hs256("k").verify(&token).is_err());

        assert!(Verifier::hs256("k").verify("not.a.token").is_err());
        assert!(matches!(
            Verifier::hs256("k").verify_header(None),
            Err(AuthError::Missing)
        ));
    }

    #[test]
    fn tokens_with_invalid_ids_are_refused() {
        let claims = Claims {
            sub: "bad user".into(),
            device: None,
            exp: crate::now_ms() / 1000 + 60,
        };
        let token =
            jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(b"k"))
                .unwrap();
        assert!(Verifier::hs256("k").verify(&token).is_err());
    }

    #[test]
    fn internal_token_comparison() {
        assert!(internal_token_matches("abc", Some("Bearer abc")));
        assert!(!internal_token_matches("abc", Some("Bearer abd")));
        assert!(!internal_token_matches("abc", Some("abc")));
        assert!(!internal_token_matches("abc", None));
    }
}
