//! Client identity from JWTs (DESIGN §3), and the internal token.
//!
//! A token's `sub` is the user, its `device` claim the device (`default` when
//! absent), and `exp` is required; `nbf`, when present, is honoured with the
//! same leeway as `exp`. `aud` and `iss` are checked against the configured
//! audience and issuer, and required then; unconfigured, any value passes.
//!
//! Keys: HS256 with the shared secret; or asymmetric keys, which replace the
//! secret: one public key file (RS256, ES256 or EdDSA) and/or the keys an
//! identity provider publishes at a JWKS URL (see [`jwks`]), chosen by the
//! token's `kid`.

pub mod jwks;

use std::sync::Arc;
use std::time::Duration;

use dak_wire::{DeviceId, UserId};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use self::jwks::Jwks;

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
    #[error("no JWT secret, public key or JWKS URL configured")]
    Missing,
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("unsupported JWT algorithm `{0}` (RS256, ES256 or EdDSA with a public key)")]
    Algorithm(String),
    #[error("bad key: {0}")]
    Key(jsonwebtoken::errors::Error),
    #[error("JWKS: {0}")]
    Jwks(jwks::JwksError),
}

crate::from_cause!(
    jsonwebtoken::errors::Error => KeyError::Key,
    jwks::JwksError => KeyError::Jwks,
);

/// Seconds a token's `exp` and `nbf` may be off, for clocks that differ.
const LEEWAY_SECS: u64 = 5;

/// What a token's `aud` and `iss` must say. Empty: not checked.
#[derive(Debug, Clone, Default)]
pub struct ClaimRules {
    /// Accepted audiences; a token must name one of them.
    pub audience: Vec<String>,
    /// Accepted issuers; a token must name one of them.
    pub issuer: Vec<String>,
}

/// Verifies client tokens. Cheap to clone: the keys are shared.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Keys>,
}

struct Keys {
    /// HS256 with `DAK_JWT_SECRET`, when no asymmetric key is configured.
    secret: Option<DecodingKey>,
    /// `DAK_JWT_PUBLIC_KEY`: the key of tokens without a `kid` (or of every
    /// token, without a JWKS URL).
    public: Option<(DecodingKey, Algorithm)>,
    /// `DAK_JWT_JWKS_URL`: the keys of tokens with a `kid`.
    jwks: Option<Jwks>,
    /// The claim checks; `algorithms` is set per token from its key.
    validation: Validation,
}

impl Verifier {
    pub fn hs256(secret: &str) -> Self {
        Self::hs256_with(secret, &ClaimRules::default())
    }

    pub fn hs256_with(secret: &str, rules: &ClaimRules) -> Self {
        Self::from_keys(Keys {
            secret: Some(DecodingKey::from_secret(secret.as_bytes())),
            public: None,
            jwks: None,
            validation: validation(rules),
        })
    }

    /// Tokens signed by the keys a JWKS endpoint serves, fetched now.
    pub async fn jwks(
        url: &str,
        refresh: jwks::RefreshPolicy,
        clock: jwks::Clock,
        rules: &ClaimRules,
    ) -> Result<Self, KeyError> {
        Ok(Self::from_keys(Keys {
            secret: None,
            public: None,
            jwks: Some(Jwks::fetch(url, refresh, clock).await?),
            validation: validation(rules),
        }))
    }

    /// From the settings: a public key file and/or a JWKS URL when given
    /// (the JWKS is fetched now), else the HS256 secret.
    pub async fn from_args(args: &crate::config::AuthArgs) -> Result<Self, KeyError> {
        let rules = ClaimRules {
            audience: args.jwt_audience.clone(),
            issuer: args.jwt_issuer.clone(),
        };
        let public = match &args.jwt_public_key {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path).map_err(|error| KeyError::Read {
                    path: path.display().to_string(),
                    error,
                })?;
                Some(match args.jwt_algorithm.as_str() {
                    "RS256" => (DecodingKey::from_rsa_pem(&pem)?, Algorithm::RS256),
                    "ES256" => (DecodingKey::from_ec_pem(&pem)?, Algorithm::ES256),
                    "EdDSA" => (DecodingKey::from_ed_pem(&pem)?, Algorithm::EdDSA),
                    other => return Err(KeyError::Algorithm(other.to_owned())),
                })
            }
        };
        let jwks = match &args.jwt_jwks_url {
            None => None,
            Some(url) => {
                let policy = jwks::RefreshPolicy {
                    every: args.jwt_jwks_refresh,
                    min_interval: args.jwt_jwks_min_interval,
                };
                Some(Jwks::fetch(url, policy, jwks::Clock::system()).await?)
            }
        };
        let secret = match (&public, &jwks) {
            (None, None) => Some(DecodingKey::from_secret(
                args.jwt_secret
                    .as_deref()
                    .ok_or(KeyError::Missing)?
                    .as_bytes(),
            )),
            _ => None,
        };
        Ok(Self::from_keys(Keys {
            secret,
            public,
            jwks,
            validation: validation(&rules),
        }))
    }

    fn from_keys(keys: Keys) -> Self {
        Self {
            inner: Arc::new(keys),
        }
    }

    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let keys = &*self.inner;
        let fetched;
        let (key, algorithm) = match (&header.kid, header.alg) {
            (_, Algorithm::HS256) if keys.secret.is_some() => {
                (keys.secret.as_ref().expect("checked"), Algorithm::HS256)
            }
            (Some(kid), _) if keys.jwks.is_some() => {
                let jwks = keys.jwks.as_ref().expect("checked");
                // The kid is the client's text: not echoed back.
                fetched = jwks.key(kid).await.ok_or_else(|| {
                    AuthError::Invalid("the JWKS URL serves no key with the token's kid".into())
                })?;
                (&fetched.0, fetched.1)
            }
            _ => match &keys.public {
                Some((key, algorithm)) => (key, *algorithm),
                None => {
                    return Err(AuthError::Invalid(format!(
                        "no key for a {:?} token{}",
                        header.alg,
                        if header.kid.is_none() {
                            " without `kid`"
                        } else {
                            ""
                        }
                    )))
                }
            },
        };
        let mut validation = keys.validation.clone();
        validation.algorithms = vec![algorithm];
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(invalid)?;
        let user = UserId::parse(data.claims.sub).map_err(|e| AuthError::Invalid(e.message))?;
        let device = match data.claims.device {
            Some(d) => DeviceId::parse(d).map_err(|e| AuthError::Invalid(e.message))?,
            None => DeviceId::default_device(),
        };
        Ok(Identity { user, device })
    }

    /// Verifies the token of an `Authorization: Bearer …` header value.
    pub async fn verify_header(&self, header: Option<&str>) -> Result<Identity, AuthError> {
        let token = bearer(header).ok_or(AuthError::Missing)?;
        self.verify(token).await
    }
}

fn invalid(e: jsonwebtoken::errors::Error) -> AuthError {
    AuthError::Invalid(e.to_string())
}

/// The claim checks every token passes, whatever its key.
fn validation(rules: &ClaimRules) -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = LEEWAY_SECS;
    validation.validate_nbf = true;
    let mut required = vec!["exp", "sub"];
    // jsonwebtoken refuses any `aud` when no audience is set; without one
    // configured, dak takes tokens made for any audience.
    if rules.audience.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rules.audience);
        required.push("aud");
    }
    if !rules.issuer.is_empty() {
        validation.set_issuer(&rules.issuer);
        required.push("iss");
    }
    validation.set_required_spec_claims(&required);
    validation
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

    #[tokio::test]
    async fn minted_tokens_verify() {
        let (user, device) = ids();
        let token = mint("s3cret", &user, &device, Duration::from_secs(60));
        let id = Verifier::hs256("s3cret").verify(&token).await.unwrap();
        assert_eq!(id, Identity { user, device });
    }

    #[tokio::test]
    async fn device_defaults_when_the_claim_is_absent() {
        let claims = Claims {
            sub: "bob".into(),
            device: None,
            exp: crate::now_ms() / 1000 + 60,
        };
        let token =
            jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(b"k"))
                .unwrap();
        assert_eq!(
            Verifier::hs256("k")
                .verify(&token)
                .await
                .unwrap()
                .device
                .as_str(),
            "default"
        );
    }

    #[tokio::test]
    async fn forged_expired_and_garbage_tokens_are_refused() {
        let (user, device) = ids();
        let forged = mint("other", &user, &device, Duration::from_secs(60));
        assert!(Verifier::hs256("s3cret").verify(&forged).await.is_err());

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
        assert!(Verifier::hs256("k").verify(&token).await.is_err());

        assert!(Verifier::hs256("k").verify("not.a.token").await.is_err());
        assert!(matches!(
            Verifier::hs256("k").verify_header(None).await,
            Err(AuthError::Missing)
        ));
    }

    #[tokio::test]
    async fn tokens_with_invalid_ids_are_refused() {
        let claims = Claims {
            sub: "bad user".into(),
            device: None,
            exp: crate::now_ms() / 1000 + 60,
        };
        let token =
            jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(b"k"))
                .unwrap();
        assert!(Verifier::hs256("k").verify(&token).await.is_err());
    }

    /// A token as an identity provider issues it: any claims, HS256 with `k`.
    fn hs256_token(claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::default(), &claims, &EncodingKey::from_secret(b"k")).unwrap()
    }

    fn in_secs(secs: i64) -> i64 {
        (crate::now_ms() / 1000) as i64 + secs
    }

    #[tokio::test]
    async fn audience_and_issuer_are_accepted_when_not_configured() {
        let token = hs256_token(serde_json::json!({
            "sub": "alice", "exp": in_secs(60), "aud": "chat-app", "iss": "https://idp.example",
        }));
        assert_eq!(
            Verifier::hs256("k")
                .verify(&token)
                .await
                .unwrap()
                .user
                .as_str(),
            "alice"
        );
        let many = hs256_token(serde_json::json!({
            "sub": "alice", "exp": in_secs(60), "aud": ["chat-app", "other"],
        }));
        assert!(Verifier::hs256("k").verify(&many).await.is_ok());
    }

    #[tokio::test]
    async fn a_token_not_yet_valid_is_refused_within_the_leeway_it_is_not() {
        let early = hs256_token(serde_json::json!({
            "sub": "alice", "exp": in_secs(3600), "nbf": in_secs(600),
        }));
        let err = Verifier::hs256("k").verify(&early).await.unwrap_err();
        assert!(err.to_string().contains("ImmatureSignature"), "{err}");
        let almost = hs256_token(serde_json::json!({
            "sub": "alice", "exp": in_secs(3600), "nbf": in_secs(2),
        }));
        assert!(Verifier::hs256("k").verify(&almost).await.is_ok());
    }

    #[tokio::test]
    async fn configured_audience_and_issuer_are_required() {
        let rules = ClaimRules {
            audience: vec!["chat-app".into(), "chat-web".into()],
            issuer: vec!["https://idp.example".into()],
        };
        let verifier = Verifier::hs256_with("k", &rules);
        let token = |aud: Option<&str>, iss: Option<&str>| {
            let mut claims = serde_json::json!({"sub": "alice", "exp": in_secs(60)});
            if let Some(aud) = aud {
                claims["aud"] = aud.into();
            }
            if let Some(iss) = iss {
                claims["iss"] = iss.into();
            }
            hs256_token(claims)
        };
        let good = token(Some("chat-web"), Some("https://idp.example"));
        assert!(verifier.verify(&good).await.is_ok());
        for (bad, why) in [
            (
                token(Some("other"), Some("https://idp.example")),
                "InvalidAudience",
            ),
            (token(None, Some("https://idp.example")), "aud"),
            (
                token(Some("chat-app"), Some("https://evil.example")),
                "InvalidIssuer",
            ),
            (token(Some("chat-app"), None), "iss"),
        ] {
            let err = verifier.verify(&bad).await.unwrap_err();
            assert!(err.to_string().contains(why), "{err} should name {why}");
        }
    }

    /// A JWKS endpoint serving what the test puts in `document`, counting fetches.
    struct IdentityProvider {
        url: String,
        document: Arc<std::sync::Mutex<serde_json::Value>>,
        fetches: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl IdentityProvider {
        async fn start(kids: &[&str]) -> Self {
            let document = Arc::new(std::sync::Mutex::new(serde_json::Value::Null));
            let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let (served, counted) = (document.clone(), fetches.clone());
            let app = axum::Router::new().route(
                "/jwks.json",
                axum::routing::get(move || {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = served.lock().unwrap().clone();
                    async move { axum::Json(body) }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
            tokio::spawn(async move { axum::serve(listener, app).await });
            let idp = Self {
                url,
                document,
                fetches,
            };
            idp.publish(kids);
            idp
        }

        /// Serves the fixture keys with these kids from now on.
        fn publish(&self, kids: &[&str]) {
            let all: serde_json::Value =
                serde_json::from_str(include_str!("../tests/fixtures/jwks.json")).unwrap();
            let keys: Vec<_> = all["keys"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|k| kids.contains(&k["kid"].as_str().unwrap()))
                .cloned()
                .collect();
            *self.document.lock().unwrap() = serde_json::json!({ "keys": keys });
        }

        fn fetches(&self) -> usize {
            self.fetches.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    /// A token signed with a fixture key, naming `kid`.
    fn signed(algorithm: Algorithm, kid: &str, claims: serde_json::Value) -> String {
        let key = match algorithm {
            Algorithm::RS256 => {
                EncodingKey::from_rsa_pem(include_bytes!("../tests/fixtures/jwt-rs256.pem"))
            }
            Algorithm::ES256 => {
                EncodingKey::from_ec_pem(include_bytes!("../tests/fixtures/jwt-es256.pem"))
            }
            other => panic!("no fixture key for {other:?}"),
        };
        let mut header = Header::new(algorithm);
        header.kid = Some(kid.to_owned());
        jsonwebtoken::encode(&header, &claims, &key.unwrap()).unwrap()
    }

    const POLICY: jwks::RefreshPolicy = jwks::RefreshPolicy {
        every: Duration::from_secs(3600),
        min_interval: Duration::from_secs(30),
    };

    #[tokio::test]
    async fn rs256_and_es256_tokens_verify_with_keys_from_a_jwks_url() {
        let idp = IdentityProvider::start(&["rsa-1", "ec-1"]).await;
        let rules = ClaimRules {
            audience: vec!["chat-app".into()],
            ..ClaimRules::default()
        };
        let verifier = Verifier::jwks(&idp.url, POLICY, jwks::Clock::system(), &rules)
            .await
            .unwrap();
        let claims = serde_json::json!({"sub": "alice", "device": "phone", "exp": in_secs(60), "aud": "chat-app"});

        let rs = signed(Algorithm::RS256, "rsa-1", claims.clone());
        let id = verifier.verify(&rs).await.unwrap();
        assert_eq!((id.user.as_str(), id.device.as_str()), ("alice", "phone"));
        let es = signed(Algorithm::ES256, "ec-1", claims.clone());
        assert_eq!(verifier.verify(&es).await.unwrap().user.as_str(), "alice");

        // The key of another kid, another algorithm, or an HS256 token with
        // no secret configured: all refused.
        let swapped = signed(Algorithm::RS256, "ec-1", claims.clone());
        assert!(verifier.verify(&swapped).await.is_err());
        let hs = hs256_token(claims.clone());
        assert!(verifier.verify(&hs).await.is_err());
        let wrong_aud = signed(
            Algorithm::RS256,
            "rsa-1",
            serde_json::json!({"sub": "alice", "exp": in_secs(60), "aud": "other"}),
        );
        assert!(verifier.verify(&wrong_aud).await.is_err());
        assert_eq!(idp.fetches(), 1, "known kids need no fetch");
    }

    #[tokio::test]
    async fn the_jwks_is_fetched_again_on_an_unknown_kid_and_when_old_but_not_at_every_token() {
        let idp = IdentityProvider::start(&["rsa-1"]).await;
        let t0 = std::time::Instant::now();
        let elapsed = Arc::new(std::sync::Mutex::new(Duration::ZERO));
        let read = elapsed.clone();
        let clock = jwks::Clock::new(move || t0 + *read.lock().unwrap());
        let advance = |by: u64| *elapsed.lock().unwrap() += Duration::from_secs(by);
        let verifier = Verifier::jwks(&idp.url, POLICY, clock, &ClaimRules::default())
            .await
            .unwrap();
        assert_eq!(idp.fetches(), 1);

        // The provider rotates in a new key: its first token brings it.
        advance(31);
        idp.publish(&["rsa-1", "ec-1"]);
        let claims = serde_json::json!({"sub": "bob", "exp": in_secs(60)});
        let es = signed(Algorithm::ES256, "ec-1", claims.clone());
        assert_eq!(verifier.verify(&es).await.unwrap().user.as_str(), "bob");
        assert_eq!(idp.fetches(), 2);

        // Tokens with made-up kids: one fetch per min interval, not one each.
        let forged = |i: usize| signed(Algorithm::RS256, &format!("made-up-{i}"), claims.clone());
        for i in 0..20 {
            let err = verifier.verify(&forged(i)).await.unwrap_err();
            assert!(err.to_string().contains("kid"), "{err}");
        }
        assert_eq!(idp.fetches(), 2);
        advance(30);
        assert!(verifier.verify(&forged(20)).await.is_err());
        assert!(verifier.verify(&forged(21)).await.is_err());
        assert_eq!(idp.fetches(), 3);

        // An old set is fetched again; a key dropped from it is gone.
        idp.publish(&["rsa-1"]);
        advance(3599);
        assert!(verifier.verify(&es).await.is_ok());
        assert_eq!(idp.fetches(), 3);
        advance(1);
        let err = verifier.verify(&es).await.unwrap_err();
        assert!(err.to_string().contains("kid"), "{err}");
        assert_eq!(idp.fetches(), 4);
    }

    #[tokio::test]
    async fn an_unusable_jwks_url_stops_the_start() {
        let idp = IdentityProvider::start(&[]).await;
        let empty = Verifier::jwks(
            &idp.url,
            POLICY,
            jwks::Clock::system(),
            &ClaimRules::default(),
        )
        .await;
        assert!(matches!(
            empty,
            Err(KeyError::Jwks(jwks::JwksError::NoKeys { .. }))
        ));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        drop(listener);
        let unreachable = Verifier::jwks(
            &closed,
            POLICY,
            jwks::Clock::system(),
            &ClaimRules::default(),
        )
        .await;
        assert!(matches!(
            unreachable,
            Err(KeyError::Jwks(jwks::JwksError::Fetch { .. }))
        ));
    }

    #[tokio::test]
    async fn internal_token_comparison() {
        assert!(internal_token_matches("abc", Some("Bearer abc")));
        assert!(!internal_token_matches("abc", Some("Bearer abd")));
        assert!(!internal_token_matches("abc", Some("abc")));
        assert!(!internal_token_matches("abc", None));
    }
}
