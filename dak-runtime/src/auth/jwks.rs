//! The public keys an identity provider serves at a JWKS URL (RFC 7517).
//!
//! The set is fetched when the service starts (a failure stops the start),
//! then again when it is older than [`RefreshPolicy::every`], or at once when
//! a token names a `kid` the set lacks (the provider rotated its keys). Fetches
//! are never closer together than [`RefreshPolicy::min_interval`], so tokens
//! with made-up `kid`s cannot make dak hammer the provider; a failed fetch
//! keeps the keys it had.
//!
//! Only signing keys are taken: RSA (RS256/384/512, PS256/384/512), EC P-256
//! and P-384 (ES256, ES384) and Ed25519 (EdDSA). Symmetric (`oct`) keys are
//! ignored, so a JWKS can never turn into a shared secret.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

/// Largest JWKS document read; providers serve a few kilobytes.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("fetching {url}: {message}")]
    Fetch { url: String, message: String },
    #[error("{url} serves no usable signing key")]
    NoKeys { url: String },
}

/// When the key set is fetched again.
#[derive(Debug, Clone, Copy)]
pub struct RefreshPolicy {
    /// Age after which a good set is fetched again.
    pub every: Duration,
    /// Least time between two fetches, whatever asks for them.
    pub min_interval: Duration,
}

/// Why a fetch is considered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reason {
    /// A token's key was found; the set may be old.
    Age,
    /// A token named a `kid` the set lacks.
    UnknownKid,
}

/// The last fetches, for [`RefreshPolicy::due`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fetches {
    pub last_attempt: Instant,
    pub last_success: Instant,
}

impl RefreshPolicy {
    /// Whether to fetch the set now.
    pub(crate) fn due(&self, fetches: &Fetches, now: Instant, reason: Reason) -> bool {
        if now.saturating_duration_since(fetches.last_attempt) < self.min_interval {
            return false;
        }
        match reason {
            Reason::UnknownKid => true,
            Reason::Age => now.saturating_duration_since(fetches.last_success) >= self.every,
        }
    }
}

/// Where the refresh rules read the time; tests move it by hand.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> Instant + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Self(Arc::new(Instant::now))
    }

    pub fn new(now: impl Fn() -> Instant + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    fn now(&self) -> Instant {
        (self.0)()
    }
}

/// A verification key and the one algorithm it verifies.
pub(crate) type Key = Arc<(DecodingKey, Algorithm)>;

/// The keys of one JWKS URL, refreshed as [`RefreshPolicy`] says.
pub(crate) struct Jwks {
    url: String,
    client: reqwest::Client,
    policy: RefreshPolicy,
    clock: Clock,
    keys: RwLock<Arc<HashMap<String, Key>>>,
    /// Held while fetching: one fetch at a time, and the times of the last.
    fetches: tokio::sync::Mutex<Fetches>,
}

impl Jwks {
    /// Fetches the set once; an unreachable URL or a set without a usable
    /// key is an error.
    pub(crate) async fn fetch(
        url: &str,
        policy: RefreshPolicy,
        clock: Clock,
    ) -> Result<Self, JwksError> {
        let client = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|e| JwksError::Fetch {
                url: url.to_owned(),
                message: e.to_string(),
            })?;
        let keys = download(&client, url).await?;
        tracing::info!(url, keys = keys.len(), "fetched the JWKS");
        let now = clock.now();
        Ok(Self {
            url: url.to_owned(),
            client,
            policy,
            clock,
            keys: RwLock::new(Arc::new(keys)),
            fetches: tokio::sync::Mutex::new(Fetches {
                last_attempt: now,
                last_success: now,
            }),
        })
    }

    /// The key with this `kid`, fetching the set again when it is old or
    /// lacks the key and the policy allows.
    pub(crate) async fn key(&self, kid: &str) -> Option<Key> {
        if self.lookup(kid).is_some() {
            // Someone else fetching: use the keys we have rather than wait.
            if let Ok(mut fetches) = self.fetches.try_lock() {
                if self.policy.due(&fetches, self.clock.now(), Reason::Age) {
                    self.refresh(&mut fetches).await;
                }
            }
            return self.lookup(kid);
        }
        let mut fetches = self.fetches.lock().await;
        // A fetch that finished while this one waited may have brought it.
        if self.lookup(kid).is_none()
            && self
                .policy
                .due(&fetches, self.clock.now(), Reason::UnknownKid)
        {
            self.refresh(&mut fetches).await;
        }
        self.lookup(kid)
    }

    fn lookup(&self, kid: &str) -> Option<Key> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.get(kid).cloned()
    }

    async fn refresh(&self, fetches: &mut Fetches) {
        fetches.last_attempt = self.clock.now();
        match download(&self.client, &self.url).await {
            Ok(keys) => {
                tracing::debug!(url = %self.url, keys = keys.len(), "fetched the JWKS");
                fetches.last_success = self.clock.now();
                *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
            }
            Err(e) => {
                ::metrics::counter!(crate::metrics::JWKS_FETCH_FAILURES).increment(1);
                tracing::warn!(error = %e, "fetching the JWKS failed; keeping the keys we have");
            }
        }
    }
}

async fn download(client: &reqwest::Client, url: &str) -> Result<HashMap<String, Key>, JwksError> {
    let failed = |message: String| JwksError::Fetch {
        url: url.to_owned(),
        message,
    };
    let mut response = client
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| failed(e.to_string()))?;
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| failed(e.to_string()))? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(failed(format!("larger than {MAX_DOCUMENT_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    let keys = parse(&body).map_err(|e| failed(format!("not a JWK set: {e}")))?;
    if keys.is_empty() {
        return Err(JwksError::NoKeys {
            url: url.to_owned(),
        });
    }
    Ok(keys)
}

/// The usable signing keys of a JWKS document, by `kid`. Keys dak cannot use
/// (no `kid`, encryption keys, unknown types) are skipped, not fatal: a
/// provider may publish more than dak needs.
pub(crate) fn parse(document: &[u8]) -> Result<HashMap<String, Key>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Set {
        keys: Vec<serde_json::Value>,
    }
    let set: Set = serde_json::from_slice(document)?;
    let mut keys = HashMap::new();
    for value in set.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        let Some(algorithm) = algorithm(&jwk) else {
            continue;
        };
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => {
                keys.insert(kid, Arc::new((key, algorithm)));
            }
            Err(e) => tracing::debug!(kid, error = %e, "skipping a JWK"),
        }
    }
    Ok(keys)
}

/// The algorithm a key verifies: its `alg` when it names one that fits its
/// type, else the usual one for its type.
fn algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let fits = |a: Algorithm| match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => matches!(
            a,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ),
        AlgorithmParameters::EllipticCurve(p) => matches!(
            (&p.curve, a),
            (EllipticCurve::P256, Algorithm::ES256) | (EllipticCurve::P384, Algorithm::ES384)
        ),
        AlgorithmParameters::OctetKeyPair(p) => {
            p.curve == EllipticCurve::Ed25519 && a == Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKey(_) => false,
    };
    let default = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => Algorithm::ES384,
        AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
        AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
        AlgorithmParameters::OctetKey(_) => return None,
    };
    let algorithm = match &jwk.common.key_algorithm {
        Some(named) => Algorithm::from_str(&named.to_string()).ok()?,
        None => default,
    };
    fits(algorithm).then_some(algorithm)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RefreshPolicy = RefreshPolicy {
        every: Duration::from_secs(3600),
        min_interval: Duration::from_secs(30),
    };

    #[test]
    fn an_unknown_kid_fetches_at_most_once_per_min_interval() {
        let t0 = Instant::now();
        let fetches = Fetches {
            last_attempt: t0,
            last_success: t0,
        };
        let s = Duration::from_secs;
        assert!(!POLICY.due(&fetches, t0, Reason::UnknownKid));
        assert!(!POLICY.due(&fetches, t0 + s(29), Reason::UnknownKid));
        assert!(POLICY.due(&fetches, t0 + s(30), Reason::UnknownKid));
    }

    #[test]
    fn a_set_is_fetched_again_when_old_and_retried_after_a_failure() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let fetches = Fetches {
            last_attempt: t0,
            last_success: t0,
        };
        assert!(!POLICY.due(&fetches, t0 + s(3599), Reason::Age));
        assert!(POLICY.due(&fetches, t0 + s(3600), Reason::Age));
        // A failed fetch at 3600 s: the next try waits the min interval.
        let failed = Fetches {
            last_attempt: t0 + s(3600),
            last_success: t0,
        };
        assert!(!POLICY.due(&failed, t0 + s(3629), Reason::Age));
        assert!(POLICY.due(&failed, t0 + s(3630), Reason::Age));
    }

    #[test]
    fn only_signing_keys_of_known_types_are_taken() {
        let document = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "a", "n": "sXch", "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "sXch", "e": "AQAB"},
            {"kty": "RSA", "n": "sXch", "e": "AQAB"},
            {"kty": "RSA", "kid": "wrong-alg", "alg": "ES256", "n": "sXch", "e": "AQAB"},
            {"kty": "oct", "kid": "secret", "k": "c2VjcmV0"},
            {"kty": "EC", "kid": "b", "crv": "P-256", "x": "MRz1KBAZO1wCVPX289ExB67ry88H1x8NHHkhG6nC2xw", "y": "EcklBY6Yw1Pb26Y9oNvPCOSIvO-kHndoky9ag-qf7GA"},
            {"kty": "future-type", "kid": "c"},
        ]});
        let keys = parse(document.to_string().as_bytes()).unwrap();
        let mut kids: Vec<_> = keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        assert_eq!(kids, ["a", "b"]);
        assert_eq!(keys["a"].1, Algorithm::RS256);
        assert_eq!(keys["b"].1, Algorithm::ES256);
        assert!(parse(b"{\"nope\":1}").is_err());
    }
}
