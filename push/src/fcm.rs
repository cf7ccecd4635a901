//! Sending notifications: [`FcmSender`] speaks FCM HTTP v1, [`LogSender`] only
//! logs (the default of `dak up`, which has no Google credentials).
//!
//! Every notification is a data-only message: message bodies may be ciphertext
//! and never leave dak, so Google sees ids and timestamps only. The app wakes up,
//! syncs its inbox (`GET /v1/messages`) and shows what it found.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use dak_wire::event::Platform;
use gcp_auth::TokenProvider;
use rand::Rng;
use reqwest::header::{HeaderMap, CONTENT_TYPE, RETRY_AFTER};
use reqwest::StatusCode;
use serde::Deserialize;

use crate::Config;

/// The OAuth scope FCM HTTP v1 requires.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// The longest wait between two attempts, whatever the backoff or `Retry-After`
/// say: a notification that has to wait longer is better given up, so the
/// batch it belongs to does not hold its partition.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// FCM keeps messages for four weeks at most.
const MAX_TTL: Duration = Duration::from_secs(28 * 24 * 3600);

/// One wake-up for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The device's FCM registration token.
    pub token: String,
    pub platform: Platform,
    /// What the app reads: `mid`, `from`, `chat`, `conversation`, `ts`.
    pub data: BTreeMap<String, String>,
    /// Newer notifications of a conversation replace older undelivered ones.
    pub collapse_key: String,
    /// How long FCM keeps trying to reach the device.
    pub ttl: Duration,
}

impl Notification {
    /// The first characters of the token, enough to find it in logs without
    /// writing whole tokens into them.
    pub fn short_token(&self) -> &str {
        match self.token.char_indices().nth(12) {
            Some((i, _)) => &self.token[..i],
            None => &self.token,
        }
    }

    fn mid(&self) -> &str {
        self.data.get("mid").map_or("", String::as_str)
    }
}

/// What became of one notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Sent,
    /// The token is dead (the app was uninstalled, or the token is malformed):
    /// the registration is to be removed.
    InvalidToken,
    /// Given up; the reason is a bounded metric label: `rejected`, `unreachable`,
    /// `throttled` or `server_error`.
    Failed(&'static str),
}

#[async_trait]
pub trait Sender: Send + Sync + 'static {
    /// Sends `n`, retrying transient failures itself.
    async fn send(&self, n: &Notification) -> Outcome;
}

/// Logs each notification instead of sending it.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogSender;

#[async_trait]
impl Sender for LogSender {
    async fn send(&self, n: &Notification) -> Outcome {
        tracing::info!(
            token = %n.short_token(),
            platform = ?n.platform,
            mid = %n.mid(),
            collapse_key = %n.collapse_key,
            "push (log only)"
        );
        Outcome::Sent
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FcmError {
    #[error("DAK_FCM_CREDENTIALS is not set")]
    NoCredentials,
    #[error("FCM credentials {path}: {error}")]
    Credentials {
        path: PathBuf,
        error: gcp_auth::Error,
    },
    #[error(
        "no FCM project id: set DAK_FCM_PROJECT_ID, or use credentials that name a project_id"
    )]
    NoProjectId,
    #[error("building the FCM HTTP client")]
    Http(#[from] reqwest::Error),
}

/// FCM HTTP v1: `POST {base}/v1/projects/{project}/messages:send`, authorised
/// with an OAuth token from a service account.
pub struct FcmSender {
    http: reqwest::Client,
    auth: gcp_auth::CustomServiceAccount,
    url: String,
    max_attempts: u32,
    retry_base: Duration,
}

impl FcmSender {
    /// Reads the service account named by `config.fcm_credentials`. The OAuth
    /// token is fetched from the account's `token_uri` on first send and cached
    /// until shortly before it expires.
    pub fn new(config: &Config) -> Result<Self, FcmError> {
        let path = config
            .fcm_credentials
            .clone()
            .ok_or(FcmError::NoCredentials)?;
        let auth = gcp_auth::CustomServiceAccount::from_file(&path)
            .map_err(|error| FcmError::Credentials { path, error })?;
        let project = match &config.fcm_project_id {
            Some(p) => p.clone(),
            None => auth.project_id().ok_or(FcmError::NoProjectId)?.to_owned(),
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .build()?;
        Ok(Self {
            http,
            auth,
            url: format!(
                "{}/v1/projects/{project}/messages:send",
                config.fcm_base_url.trim_end_matches('/')
            ),
            max_attempts: config.push_max_attempts.max(1),
            retry_base: config.push_retry_base,
        })
    }

    async fn attempt(&self, body: &[u8]) -> Verdict {
        let token = match self.auth.token(&[SCOPE]).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "fetching the fcm access token");
                return Verdict::Retry("unreachable", None);
            }
        };
        let response = self
            .http
            .post(&self.url)
            .bearer_auth(token.as_str())
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "fcm request failed");
                return Verdict::Retry("unreachable", None);
            }
        };
        let status = response.status();
        if status.is_success() {
            return Verdict::Done(Outcome::Sent);
        }
        let retry_after = retry_after(response.headers());
        let text = response.text().await.unwrap_or_default();
        classify(status, &text, retry_after)
    }
}

#[async_trait]
impl Sender for FcmSender {
    async fn send(&self, n: &Notification) -> Outcome {
        let body = serde_json::to_vec(&message_body(n, SystemTime::now()))
            .expect("a json value always serializes");
        let mut attempt = 1;
        loop {
            let (reason, retry_after) = match self.attempt(&body).await {
                Verdict::Done(outcome) => {
                    if let Outcome::Failed(reason) = outcome {
                        tracing::warn!(token = %n.short_token(), mid = %n.mid(), reason, "fcm refused the notification");
                    }
                    return outcome;
                }
                Verdict::Retry(reason, retry_after) => (reason, retry_after),
            };
            if attempt >= self.max_attempts {
                tracing::warn!(token = %n.short_token(), mid = %n.mid(), reason, attempts = attempt, "giving up on a notification");
                return Outcome::Failed(reason);
            }
            let jitter = rand::rng().random_range(0.0..1.0);
            let delay = backoff(self.retry_base, attempt, retry_after, jitter);
            tracing::debug!(mid = %n.mid(), reason, attempt, delay_ms = delay.as_millis() as u64, "retrying a notification");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// What one attempt says about the notification.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Done(Outcome),
    /// Worth another try: the reason it failed, and the server's `Retry-After`.
    Retry(&'static str, Option<Duration>),
}

/// The part of FCM's error answer that tells a dead token from other failures.
#[derive(Debug, Default, Deserialize)]
struct ErrorAnswer {
    #[serde(default)]
    error: ErrorStatus,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorStatus {
    #[serde(default)]
    status: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<ErrorDetail>,
}

#[derive(Debug, Default, Deserialize)]
struct ErrorDetail {
    #[serde(rename = "errorCode", default)]
    error_code: Option<String>,
    #[serde(rename = "fieldViolations", default)]
    field_violations: Vec<FieldViolation>,
}

#[derive(Debug, Default, Deserialize)]
struct FieldViolation {
    #[serde(default)]
    field: String,
}

/// Sorts a non-2xx answer. Only answers about the token itself remove it
/// (`UNREGISTERED`, or `INVALID_ARGUMENT` about the registration token);
/// `SENDER_ID_MISMATCH` and other refusals mean dak is misconfigured, which
/// must not wipe every token.
fn classify(status: StatusCode, body: &str, retry_after: Option<Duration>) -> Verdict {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Verdict::Retry("throttled", retry_after);
    }
    if status.is_server_error() {
        return Verdict::Retry("server_error", retry_after);
    }
    let answer: ErrorAnswer = serde_json::from_str(body).unwrap_or_default();
    let error = &answer.error;
    let unregistered = error
        .details
        .iter()
        .any(|d| d.error_code.as_deref() == Some("UNREGISTERED"));
    let bad_token = status == StatusCode::BAD_REQUEST
        && error.status == "INVALID_ARGUMENT"
        && (error
            .message
            .to_ascii_lowercase()
            .contains("registration token")
            || error
                .details
                .iter()
                .flat_map(|d| &d.field_violations)
                .any(|v| v.field == "message.token"));
    if (unregistered && matches!(status, StatusCode::NOT_FOUND | StatusCode::BAD_REQUEST))
        || bad_token
    {
        return Verdict::Done(Outcome::InvalidToken);
    }
    Verdict::Done(Outcome::Failed("rejected"))
}

/// `Retry-After` in seconds; the HTTP-date form is left to the backoff.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The wait before attempt `attempt + 1`: `base` doubled per attempt, plus up to
/// half again as jitter (`jitter` in 0..1), at least what the server asked for,
/// at most [`MAX_BACKOFF`].
fn backoff(base: Duration, attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
    let doublings = attempt.saturating_sub(1).min(20);
    let exponential = base.saturating_mul(1 << doublings).min(MAX_BACKOFF);
    let jittered = exponential + exponential.mul_f64(jitter.clamp(0.0, 1.0) / 2.0);
    jittered
        .max(retry_after.unwrap_or_default())
        .min(MAX_BACKOFF)
}

/// The FCM v1 request body: data only, high priority, collapsed per
/// conversation, on every platform's terms.
fn message_body(n: &Notification, now: SystemTime) -> serde_json::Value {
    let ttl = n.ttl.min(MAX_TTL).as_secs();
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    serde_json::json!({
        "message": {
            "token": n.token,
            "data": n.data,
            "android": {
                "priority": "high",
                "collapse_key": n.collapse_key,
                "ttl": format!("{ttl}s"),
            },
            "apns": {
                "headers": {
                    "apns-priority": "10",
                    "apns-collapse-id": apns_collapse_id(&n.collapse_key),
                    "apns-expiration": (now + ttl).to_string(),
                },
                "payload": { "aps": { "content-available": 1 } },
            },
            "webpush": {
                "headers": { "Urgency": "high", "TTL": ttl.to_string() },
            },
        }
    })
}

/// APNs takes collapse ids of at most 64 bytes; ids of long conversations are
/// shortened to a stable hash of the whole key.
fn apns_collapse_id(key: &str) -> String {
    const APNS_MAX: usize = 64;
    if key.len() <= APNS_MAX {
        return key.to_owned();
    }
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let prefix = key.split(':').next().unwrap_or_default();
    format!("{prefix}:{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification() -> Notification {
        Notification {
            token: "device-token-123456789".into(),
            platform: Platform::Android,
            data: BTreeMap::from([
                ("mid".to_owned(), "01J0000000000000000000000".to_owned()),
                ("from".to_owned(), "alice".to_owned()),
            ]),
            collapse_key: "direct:alice".into(),
            ttl: Duration::from_secs(3600),
        }
    }

    #[test]
    fn the_body_is_data_only_with_ttl_and_collapse_key() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let body = message_body(&notification(), now);
        let m = &body["message"];
        assert!(m.get("notification").is_none());
        assert!(m["apns"]["payload"]["aps"].get("alert").is_none());
        assert_eq!(m["token"], "device-token-123456789");
        assert_eq!(m["data"]["from"], "alice");
        assert_eq!(m["android"]["ttl"], "3600s");
        assert_eq!(m["android"]["collapse_key"], "direct:alice");
        assert_eq!(m["apns"]["headers"]["apns-expiration"], "1003600");
        assert_eq!(m["apns"]["headers"]["apns-collapse-id"], "direct:alice");
        assert_eq!(m["webpush"]["headers"]["TTL"], "3600");
    }

    #[test]
    fn long_collapse_keys_are_hashed_for_apns() {
        let key = format!("group:{}", "g".repeat(128));
        let id = apns_collapse_id(&key);
        assert!(id.len() <= 64, "{id}");
        assert!(id.starts_with("group:"));
        assert_eq!(id, apns_collapse_id(&key), "stable");
        assert_ne!(id, apns_collapse_id(&format!("group:{}", "h".repeat(128))));
    }

    #[test]
    fn backoff_doubles_with_jitter_honours_retry_after_and_is_capped() {
        let base = Duration::from_millis(500);
        assert_eq!(backoff(base, 1, None, 0.0), base);
        assert_eq!(backoff(base, 3, None, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(base, 3, None, 1.0), Duration::from_secs(3));
        assert_eq!(
            backoff(base, 1, Some(Duration::from_secs(4)), 0.5),
            Duration::from_secs(4)
        );
        assert_eq!(backoff(base, 40, None, 1.0), MAX_BACKOFF);
        assert_eq!(
            backoff(base, 1, Some(Duration::from_secs(3600)), 0.0),
            MAX_BACKOFF
        );
    }

    #[test]
    fn answers_are_sorted_into_outcomes() {
        let unregistered = r#"{"error":{"code":404,"status":"NOT_FOUND","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"UNREGISTERED"}]}}"#;
        assert_eq!(
            classify(StatusCode::NOT_FOUND, unregistered, None),
            Verdict::Done(Outcome::InvalidToken)
        );
        let bad_token = r#"{"error":{"code":400,"message":"The registration token is not a valid FCM registration token","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, bad_token, None),
            Verdict::Done(Outcome::InvalidToken)
        );
        let bad_field = r#"{"error":{"code":400,"message":"Request contains an invalid argument.","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.token","description":"Invalid registration token"}]}]}}"#;
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, bad_field, None),
            Verdict::Done(Outcome::InvalidToken)
        );
        let bad_ttl = r#"{"error":{"code":400,"message":"Invalid value at 'message.android.ttl'","status":"INVALID_ARGUMENT"}}"#;
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, bad_ttl, None),
            Verdict::Done(Outcome::Failed("rejected"))
        );
        let mismatch = r#"{"error":{"code":403,"status":"PERMISSION_DENIED","details":[{"errorCode":"SENDER_ID_MISMATCH"}]}}"#;
        assert_eq!(
            classify(StatusCode::FORBIDDEN, mismatch, None),
            Verdict::Done(Outcome::Failed("rejected"))
        );
        assert_eq!(
            classify(StatusCode::NOT_FOUND, "not json", None),
            Verdict::Done(Outcome::Failed("rejected"))
        );
        let later = Some(Duration::from_secs(2));
        assert_eq!(
            classify(StatusCode::TOO_MANY_REQUESTS, "", later),
            Verdict::Retry("throttled", later)
        );
        assert_eq!(
            classify(StatusCode::SERVICE_UNAVAILABLE, "", None),
            Verdict::Retry("server_error", None)
        );
    }
}
