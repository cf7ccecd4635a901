//! rest-gateway: the same ingress as the WebSocket, over plain HTTP, for apps
//! woken in the background without a socket.
//!
//! - `POST /v1/messages`: `{"messages":[{"id","to","chat","body"},…]}`, 1 to 100
//!   messages. Each is checked like a WebSocket frame; the answer (202) lists
//!   each one as `accepted` (with its mid, after Kafka acknowledged it) or
//!   `rejected` (with the error code), so one bad message does not sink the batch.
//! - `POST /v1/acks`: `{"mids":[…]}`, 202 once the ack is durable.
//! - `PUT /v1/devices/{device}/push-token`: `{"token":"…","platform":"android"|"ios"|"web"}`
//!   for the token's own device; the device becomes known (it gets its own
//!   inbox from then on) and the token travels through Kafka to push. 202.
//! - `DELETE /v1/devices/{device}`: the user removes one of their devices; 202.
//! - `GET /v1/devices`: the user's devices, `{"devices":[{"device","connected"},…]}`.
//!
//! - `POST /v1/receipts`: `{"receipts":[{"mid","to","state":"read"},…]}`, read
//!   receipts for messages `to` sent; 202 once durable.
//! - Group commands, each 202 once durable and applied by group-router in the
//!   group's order (a refusal reaches the device as a `rejected` frame):
//!   `POST /v1/groups` `{"id","name","members"}` (the client picks the group
//!   id, so it can create a group offline; creating it again is harmless),
//!   `POST /v1/groups/{g}/members` `{"members":[…]}`,
//!   `DELETE /v1/groups/{g}/members/{user}` (yourself: leave),
//!   `PUT /v1/groups/{g}/name` `{"name"}`.
//!
//! All take `Authorization: Bearer <jwt>`; the token names the sender. The
//! token, and then the sender's rate limit ([`rate`]), are checked before
//! the body is read; arrays in a body are limited while it is parsed.

pub mod rate;
pub mod standalone;

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use dak_runtime::auth::{Identity, Verifier};
use dak_runtime::http::ApiError;
use dak_runtime::ingress::Ingress;
use dak_runtime::presence::Presence;
use dak_runtime::store::StoreError;
use dak_wire::bounded::Bounded;
use dak_wire::event::{Platform, PushToken};
use dak_wire::frame::{self, parse_mids, Outgoing, ReceiptRequest, MAX_ACK_MIDS};
use dak_wire::group::GroupOp;
use dak_wire::{ChatKind, DeviceId, ErrorCode, GroupId, Limits, Mid, UserId, WireError};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Most messages one `POST /v1/messages` may carry.
pub const MAX_BATCH: usize = 100;
/// Most members a group command may name while its body is parsed; the
/// configured group size limit is checked after.
const MAX_PARSED_MEMBERS: usize = 100_000;

/// rest-gateway's own settings.
#[derive(Debug, Clone, clap::Args)]
#[group(id = "rest-gateway")]
pub struct Config {
    /// Write requests per second one user may make (burst: twice that);
    /// beyond, 429 `rate_limited` with `Retry-After`. 0 turns the limit off.
    #[arg(long, env = "DAK_REST_RATE_LIMIT", default_value_t = 20)]
    pub rest_rate_limit: u32,
    /// Most users whose rate-limit state is kept at once (about 100 bytes
    /// plus the user id each).
    #[arg(long, env = "DAK_REST_RATE_USERS", default_value_t = 100_000)]
    pub rest_rate_users: usize,
}

impl Config {
    pub fn rate_limit(&self) -> rate::RateLimit {
        rate::RateLimit {
            per_second: self.rest_rate_limit,
            max_users: self.rest_rate_users,
        }
    }
}

#[derive(Clone)]
pub struct RestGateway {
    shared: Arc<Shared>,
}

struct Shared {
    verifier: Verifier,
    ingress: Ingress,
    limits: Limits,
    presence: Arc<dyn Presence>,
    rate: rate::RateLimiter,
}

impl RestGateway {
    pub fn new(
        rate: rate::RateLimit,
        verifier: Verifier,
        ingress: Ingress,
        limits: Limits,
        presence: Arc<dyn Presence>,
    ) -> Self {
        dak_runtime::metrics::register_ingress();
        Self {
            shared: Arc::new(Shared {
                verifier,
                ingress,
                limits,
                presence,
                rate: rate::RateLimiter::new(rate),
            }),
        }
    }

    pub fn router(&self) -> Router {
        let body_limit = MAX_BATCH * self.shared.limits.max_frame_bytes + 4096;
        Router::new()
            .route("/v1/messages", post(send_messages))
            .route("/v1/acks", post(send_acks))
            .route("/v1/devices", get(list_devices))
            .route("/v1/devices/{device}", delete(remove_device))
            .route("/v1/devices/{device}/push-token", put(register_push_token))
            .route("/v1/receipts", post(send_receipts))
            .route("/v1/groups", post(create_group))
            .route("/v1/groups/{group}/members", post(add_members))
            .route("/v1/groups/{group}/members/{user}", delete(remove_member))
            .route("/v1/groups/{group}/name", put(rename_group))
            .layer(axum::extract::DefaultBodyLimit::max(body_limit))
            .with_state(self.shared.clone())
    }
}

/// The sender of a write, from its token, within its rate limit. An extractor
/// of the request head, so it runs before the body is read: a bad token or a
/// sender over its limit is answered at once, whatever body follows.
struct Sender(Identity);

impl FromRequestParts<Arc<Shared>> for Sender {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        shared: &Arc<Shared>,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let identity = shared
            .verifier
            .verify_header(header)
            .await
            .map_err(|e| ApiError::from(e).into_response())?;
        if let Err(wait) = shared
            .rate
            .take(&identity.user, tokio::time::Instant::now())
        {
            return Err(rate_limited(wait));
        }
        Ok(Self(identity))
    }
}

/// 429 with `Retry-After`: whole seconds until the next request is allowed.
fn rate_limited(wait: std::time::Duration) -> Response {
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    let error = ApiError::new(
        ErrorCode::RateLimited,
        format!("too many requests, retry in {seconds} s"),
    );
    (
        [(axum::http::header::RETRY_AFTER, seconds.to_string())],
        error,
    )
        .into_response()
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let message = if e.is_data() {
            format!("invalid request: {e}")
        } else {
            format!("malformed JSON: {e}")
        };
        ApiError::new(ErrorCode::BadRequest, message)
    })
}

#[derive(Deserialize)]
struct SendBody<'a> {
    #[serde(borrow)]
    messages: Bounded<SendItem<'a>, MAX_BATCH>,
}

#[derive(Deserialize)]
struct SendItem<'a> {
    id: Option<String>,
    to: Option<String>,
    chat: Option<ChatKind>,
    #[serde(borrow)]
    body: Option<&'a RawValue>,
    from: Option<String>,
    ephemeral: Option<bool>,
}

#[derive(Serialize, Default)]
struct SendAnswer {
    accepted: Vec<AcceptedItem>,
    rejected: Vec<RejectedItem>,
}

#[derive(Serialize)]
struct AcceptedItem {
    id: String,
    mid: Mid,
    ts: u64,
}

#[derive(Serialize)]
struct RejectedItem {
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    code: ErrorCode,
    message: String,
}

impl RejectedItem {
    fn new(id: Option<String>, error: WireError) -> Self {
        ::metrics::counter!(dak_runtime::metrics::REJECTED, "code" => error.code.as_str())
            .increment(1);
        Self {
            id,
            code: error.code,
            message: error.message,
        }
    }
}

async fn send_messages(
    State(shared): State<Arc<Shared>>,
    Sender(identity): Sender,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<SendAnswer>), ApiError> {
    let request: SendBody = parse_json(&body)?;
    let messages = request.messages.into_inner();
    if messages.is_empty() {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("`messages` must hold 1 to {MAX_BATCH} messages, not 0"),
        ));
    }

    let mut answer = SendAnswer::default();
    // Queue every valid message in request order first, then wait for Kafka, so
    // the batch keeps its order and costs one round of broker acknowledgements.
    let mut pending = Vec::with_capacity(messages.len());
    for item in messages {
        let id = item.id.clone();
        let checked = check_item(item, &identity, &shared.limits);
        match checked {
            Err(error) => answer.rejected.push(RejectedItem::new(id, error)),
            Ok(message) => match shared.ingress.submit(&identity, message).await {
                Ok(p) => pending.push(p),
                Err(e) => answer.rejected.push(RejectedItem::new(id, unavailable(&e))),
            },
        }
    }
    let waits = pending.into_iter().map(|p| {
        let id = p.id().to_string();
        async move { p.accepted().await.map_err(|e| (id, e)) }
    });
    for result in futures_util::future::join_all(waits).await {
        match result {
            Ok(a) => answer.accepted.push(AcceptedItem {
                id: a.id.to_string(),
                mid: a.mid,
                ts: a.ts,
            }),
            Err((id, e)) => answer
                .rejected
                .push(RejectedItem::new(Some(id), unavailable(&e))),
        }
    }
    Ok((StatusCode::ACCEPTED, Json(answer)))
}

fn check_item(
    item: SendItem<'_>,
    identity: &Identity,
    limits: &Limits,
) -> Result<Outgoing, WireError> {
    if item
        .from
        .as_ref()
        .is_some_and(|from| from != identity.user.as_str())
    {
        return Err(WireError::forbidden(
            "`from` is set by the server from your token; you cannot send as another user",
        ));
    }
    let mut message = Outgoing::from_fields(item.id, item.to, item.chat, item.body, limits)?;
    message.ephemeral = item.ephemeral.unwrap_or(false);
    Ok(message)
}

fn unavailable(e: &dak_runtime::ingress::IngressError) -> WireError {
    dak_runtime::ingress::log_refusal(e);
    WireError {
        code: ErrorCode::Unavailable,
        message: "the message bus is unavailable, keep the message and retry".into(),
    }
}

#[derive(Deserialize)]
struct AckBody {
    mids: Bounded<String, MAX_ACK_MIDS>,
}

async fn send_acks(
    State(shared): State<Arc<Shared>>,
    Sender(identity): Sender,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let request: AckBody = parse_json(&body)?;
    let mids = parse_mids(&request.mids.0)?;
    let count = mids.len();
    shared.ingress.ack(&identity, mids).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "acked": count })),
    ))
}

/// Longest push token accepted; FCM registration tokens are far shorter.
const MAX_TOKEN_LEN: usize = 4096;

/// The answer when presence, which holds the device registry, fails.
fn registry_unavailable(doing: &'static str) -> impl FnOnce(StoreError) -> ApiError {
    move |e| {
        tracing::warn!(error = %e, "{doing} failed");
        ApiError::new(
            ErrorCode::Unavailable,
            "the device registry is unavailable, retry later",
        )
    }
}

#[derive(Serialize)]
struct DeviceItem {
    device: DeviceId,
    /// Whether it has a socket on a live gateway now.
    connected: bool,
}

/// `GET /v1/devices`: the devices of the caller's user, ordered by id: those
/// that connected or registered a push token and were not removed since.
/// Counts against the user's rate limit like a write.
async fn list_devices(
    State(shared): State<Arc<Shared>>,
    Sender(identity): Sender,
) -> Result<Json<serde_json::Value>, ApiError> {
    let routes = shared
        .presence
        .routes(std::slice::from_ref(&identity.user))
        .await
        .map_err(registry_unavailable("reading the devices"))?;
    let devices: Vec<DeviceItem> = routes
        .into_iter()
        .flatten()
        .map(|route| DeviceItem {
            connected: route.gateway_url.is_some(),
            device: route.device,
        })
        .collect();
    Ok(Json(serde_json::json!({ "devices": devices })))
}

/// `DELETE /v1/devices/{device}`: the user removes one of their devices,
/// this one or another (a lost phone, from the laptop). Nothing new is
/// copied for it from here on; its stored inbox and push token are deleted
/// behind the request. Connecting again with a valid token makes the device
/// known again: a removal does not revoke tokens.
async fn remove_device(
    State(shared): State<Arc<Shared>>,
    Sender(identity): Sender,
    Path(device): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let device = DeviceId::parse(device)?;
    // Presence first: a retry after a failure on the bus removes nothing
    // twice, while the other order could store copies for a device whose
    // inbox is already gone.
    shared
        .presence
        .unregister_device(&identity.user, &device)
        .await
        .map_err(registry_unavailable("removing a device"))?;
    shared
        .ingress
        .device_removed(&identity.user, &device)
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "device": device })),
    ))
}

#[derive(Deserialize)]
struct PushTokenBody {
    token: Option<String>,
    platform: Option<String>,
}

async fn register_push_token(
    State(shared): State<Arc<Shared>>,
    Sender(identity): Sender,
    Path(device): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let device = DeviceId::parse(device)?;
    if device != identity.device {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            "a device registers its own push token: the path must name the device of your token",
        ));
    }
    let request: PushTokenBody = parse_json(&body)?;
    let token = request
        .token
        .filter(|t| {
            !t.is_empty() && t.len() <= MAX_TOKEN_LEN && t.bytes().all(|b| b.is_ascii_graphic())
        })
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("`token` must be 1 to {MAX_TOKEN_LEN} printable characters without spaces"),
            )
        })?;
    let platform = match request.platform.as_deref() {
        Some("android") => Platform::Android,
        Some("ios") => Platform::Ios,
        Some("web") => Platform::Web,
        _ => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "`platform` must be `android`, `ios` or `web`",
            ))
        }
    };
    shared
        .presence
        .register_device(&identity.user, &device)
        .await
        .map_err(registry_unavailable("registering a device"))?;
    shared
        .ingress
        .push_token(PushToken {
            user: identity.user,
            device: device.clone(),
            token,
            platform,
        })
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "device": device })),
    ))
}

#[derive(Deserialize)]
struct ReceiptsBody {
    receipts: Bounded<ReceiptItem, MAX_BATCH>,
}

#[derive(Deserialize)]
struct ReceiptItem {
    mid: Option<String>,
    to: Option<String>,
    state: Option<String>,
}

/// Read receipts, all checked before any is queued: 400 names the first bad one.
async fn send_receipts(
    State(shared): State<Arc<Shared>>,
    Sender(identity): Sender,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let request: ReceiptsBody = parse_json(&body)?;
    if request.receipts.0.is_empty() {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("`receipts` must hold 1 to {MAX_BATCH} receipts"),
        ));
    }
    let receipts = request
        .receipts
        .into_inner()
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            ReceiptRequest::from_fields(None, r.mid, r.to, r.state)
                .map_err(|e| ApiError::new(e.code, format!("receipt {i}: {}", e.message)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut pending = Vec::with_capacity(receipts.len());
    for receipt in &receipts {
        pending.push(shared.ingress.receipt(&identity, receipt)?);
    }
    for result in futures_util::future::join_all(pending.into_iter().map(|p| p.accepted())).await {
        result?;
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "receipts": receipts.len() })),
    ))
}

#[derive(Deserialize)]
struct CreateGroupBody {
    id: Option<String>,
    name: Option<String>,
    members: Option<Bounded<String, MAX_PARSED_MEMBERS>>,
}

#[derive(Deserialize)]
struct MembersBody {
    members: Option<Bounded<String, MAX_PARSED_MEMBERS>>,
}

#[derive(Deserialize)]
struct NameBody {
    name: Option<String>,
}

async fn create_group(
    State(shared): State<Arc<Shared>>,
    Sender(identity): Sender,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let request: CreateGroupBody = parse_json(&body)?;
    let group = GroupId::parse(
        request
            .id
            .ok_or_else(|| WireError::bad_request("field `id` (the group id) is missing"))?,
    )?;
    let op = GroupOp::Create {
        name: frame::group_name(request.name)?,
        members: frame::members(
            request.members.map(Bounded::into_inner).unwrap_or_default(),
            &shared.limits,
        )?,
    };
    group_command(&shared, &identity, group, op).await
}

async fn add_members(
    State(shared): State<Arc<Shared>>,
    Sender(identity): Sender,
    Path(group): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let group = GroupId::parse(group)?;
    let request: MembersBody = parse_json(&body)?;
    let members = request
        .members
        .map(Bounded::into_inner)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| WireError::bad_request("`members` must name at least one user"))?;
    let op = GroupOp::Add {
        members: frame::members(members, &shared.limits)?,
    };
    group_command(&shared, &identity, group, op).await
}

async fn remove_member(
    State(shared): State<Arc<Shared>>,
    Sender(identity): Sender,
    Path((group, user)): Path<(String, String)>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let op = GroupOp::Remove {
        user: UserId::parse(user)?,
    };
    group_command(&shared, &identity, GroupId::parse(group)?, op).await
}

async fn rename_group(
    State(shared): State<Arc<Shared>>,
    Sender(identity): Sender,
    Path(group): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let group = GroupId::parse(group)?;
    let request: NameBody = parse_json(&body)?;
    let op = GroupOp::Rename {
        name: frame::group_name(request.name)?,
    };
    group_command(&shared, &identity, group, op).await
}

/// Queues a group command and answers once it is durable. The mid is that of
/// the system notice every member will receive when group-router applies it.
async fn group_command(
    shared: &Shared,
    identity: &Identity,
    group: GroupId,
    op: GroupOp,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let pending = shared
        .ingress
        .submit_group_fresh(identity, group.clone(), op)?;
    let accepted = pending.accepted().await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "group": group, "mid": accepted.mid, "ts": accepted.ts })),
    ))
}
