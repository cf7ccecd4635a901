//! A local stand-in for Google: one real HTTP server on 127.0.0.1:0 that serves
//! both the OAuth token endpoint (the `token_uri` of the service account the test
//! writes) and FCM's `/v1/projects/{p}/messages:send`, and records every request.
//!
//! The token endpoint checks the signed assertion against the test key's public
//! half, so a request only gets an access token when gcp_auth signed it with the
//! service account's key, for the FCM scope. The send endpoint refuses a bearer
//! token it did not issue.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Form, Json, Router};
use serde_json::{json, Value};

/// Test-only key pair; see `tests/fixtures/README.md`.
const PRIVATE_KEY: &str = include_str!("../fixtures/test-only-service-account-key.pem");
const PUBLIC_KEY: &str = include_str!("../fixtures/test-only-service-account-key.pub.pem");

pub const PROJECT: &str = "dak-test-project";
const CLIENT_EMAIL: &str = "push@dak-test-project.iam.gserviceaccount.com";
const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// One `messages:send` request as the fake received it.
#[derive(Debug, Clone)]
pub struct SendRequest {
    pub at: Instant,
    pub project: String,
    pub authorization: Option<String>,
    pub body: Value,
}

impl SendRequest {
    pub fn message(&self) -> &Value {
        &self.body["message"]
    }

    pub fn token(&self) -> &str {
        self.message()["token"].as_str().unwrap_or_default()
    }

    pub fn data(&self, key: &str) -> &str {
        self.message()["data"][key].as_str().unwrap_or_default()
    }
}

/// One token request: the scope of its assertion, once the signature checked out.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub scope: String,
}

/// A scripted answer to the next send request.
#[derive(Debug, Clone)]
pub struct Reply {
    status: StatusCode,
    retry_after: Option<u64>,
    body: Value,
}

impl Reply {
    pub fn status(code: u16) -> Self {
        let status = StatusCode::from_u16(code).unwrap();
        Self {
            status,
            retry_after: None,
            body: json!({"error": {"code": code, "message": "scripted", "status": "UNAVAILABLE"}}),
        }
    }

    pub fn with_body(mut self, body: Value) -> Self {
        self.body = body;
        self
    }

    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// FCM's answer for a token whose app was uninstalled.
    pub fn unregistered() -> Self {
        Self::status(404).with_body(json!({"error": {
            "code": 404,
            "message": "Requested entity was not found.",
            "status": "NOT_FOUND",
            "details": [{
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": "UNREGISTERED"
            }]
        }}))
    }
}

#[derive(Default)]
struct Recorded {
    sends: Vec<SendRequest>,
    token_requests: Vec<TokenRequest>,
    script: VecDeque<Reply>,
    unregistered: HashSet<String>,
    issued: HashSet<String>,
}

#[derive(Clone)]
struct Shared {
    recorded: Arc<Mutex<Recorded>>,
    token_uri: String,
}

pub struct FakeFcm {
    addr: SocketAddr,
    recorded: Arc<Mutex<Recorded>>,
    server: tokio::task::JoinHandle<()>,
}

impl FakeFcm {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let shared = Shared {
            recorded: recorded.clone(),
            token_uri: format!("http://{addr}/token"),
        };
        let router = Router::new()
            .route("/token", post(issue_token))
            .route("/v1/projects/{project}/messages:send", post(send))
            .with_state(shared);
        let server = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        Self {
            addr,
            recorded,
            server,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a service-account JSON whose `token_uri` is this fake.
    pub fn write_credentials(&self, dir: &Path) -> PathBuf {
        let path = dir.join("service-account.json");
        let account = json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "test-only",
            "private_key": PRIVATE_KEY,
            "client_email": CLIENT_EMAIL,
            "client_id": "1",
            "token_uri": format!("http://{}/token", self.addr),
        });
        std::fs::write(&path, account.to_string()).unwrap();
        path
    }

    /// Answers the next send request with `reply` (scripted replies go first, in
    /// order; then every request succeeds unless its token is unregistered).
    pub fn reply_next(&self, reply: Reply) {
        self.lock().script.push_back(reply);
    }

    /// From now on, sends to `token` get `UNREGISTERED`.
    pub fn unregister(&self, token: &str) {
        self.lock().unregistered.insert(token.to_owned());
    }

    pub fn sends(&self) -> Vec<SendRequest> {
        self.lock().sends.clone()
    }

    pub fn token_requests(&self) -> Vec<TokenRequest> {
        self.lock().token_requests.clone()
    }

    /// Polls the recorded sends until `done` holds, failing the test after a
    /// deadline.
    pub async fn wait_for_sends(
        &self,
        what: &str,
        done: impl Fn(&[SendRequest]) -> bool,
    ) -> Vec<SendRequest> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sends = self.sends();
            if done(&sends) {
                return sends;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; sends so far: {:#?}",
                sends.iter().map(|s| &s.body).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded.lock().unwrap()
    }
}

impl Drop for FakeFcm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    scope: String,
}

/// Checks the assertion's RS256 signature with the test key and its issuer,
/// audience and expiry. gcp_auth pads its base64 (Google accepts that), while
/// jsonwebtoken wants it unpadded: the signature is checked over the text as
/// sent, the claims are read from the unpadded form.
fn verify_assertion(assertion: &str, audience: &str) -> Result<Claims, String> {
    use jsonwebtoken::{Algorithm, DecodingKey, Validation};
    let key = DecodingKey::from_rsa_pem(PUBLIC_KEY.as_bytes()).unwrap();
    let (signed, signature) = assertion.rsplit_once('.').ok_or("not a jwt")?;
    let valid = jsonwebtoken::crypto::verify(
        signature.trim_end_matches('='),
        signed.as_bytes(),
        &key,
        Algorithm::RS256,
    )
    .map_err(|e| e.to_string())?;
    if !valid {
        return Err("signature does not match the service account's key".into());
    }
    let unpadded: Vec<&str> = assertion
        .split('.')
        .map(|p| p.trim_end_matches('='))
        .collect();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.insecure_disable_signature_validation();
    validation.set_audience(&[audience]);
    validation.set_issuer(&[CLIENT_EMAIL]);
    jsonwebtoken::decode::<Claims>(&unpadded.join("."), &key, &validation)
        .map(|data| data.claims)
        .map_err(|e| e.to_string())
}

async fn issue_token(
    State(shared): State<Shared>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if form.get("grant_type").map(String::as_str) != Some(GRANT_TYPE) {
        return (StatusCode::BAD_REQUEST, "unsupported grant_type").into_response();
    }
    let Some(assertion) = form.get("assertion") else {
        return (StatusCode::BAD_REQUEST, "no assertion").into_response();
    };
    let claims = match verify_assertion(assertion, &shared.token_uri) {
        Ok(claims) => claims,
        Err(e) => return (StatusCode::UNAUTHORIZED, format!("bad assertion: {e}")).into_response(),
    };
    let mut recorded = shared.recorded.lock().unwrap();
    recorded.token_requests.push(TokenRequest {
        scope: claims.scope,
    });
    let access_token = format!("fake-access-{}", recorded.token_requests.len());
    recorded.issued.insert(access_token.clone());
    Json(json!({"access_token": access_token, "expires_in": 3600, "token_type": "Bearer"}))
        .into_response()
}

async fn send(
    State(shared): State<Shared>,
    UrlPath(project): UrlPath<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let request = SendRequest {
        at: Instant::now(),
        project: project.clone(),
        authorization: authorization.clone(),
        body,
    };
    let mut recorded = shared.recorded.lock().unwrap();
    let token = request.token().to_owned();
    recorded.sends.push(request);

    let authorised = authorization
        .as_deref()
        .and_then(|a| a.strip_prefix("Bearer "))
        .is_some_and(|t| recorded.issued.contains(t));
    if !authorised {
        let body = json!({"error": {"code": 401, "status": "UNAUTHENTICATED"}});
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }
    let reply = match recorded.script.pop_front() {
        Some(reply) => reply,
        None if recorded.unregistered.contains(&token) => Reply::unregistered(),
        None => {
            let name = format!("projects/{project}/messages/{}", recorded.sends.len());
            return Json(json!({ "name": name })).into_response();
        }
    };
    let mut response = (reply.status, Json(reply.body)).into_response();
    if let Some(secs) = reply.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, secs.to_string().parse().unwrap());
    }
    response
}
