//! One client socket: authentication at the upgrade, then a single task that
//! reads frames, writes deliveries, answers `accepted` in order, and pings.
//!
//! Every write has a deadline, the idle timeout: while a write waits for a
//! client that stopped reading, this task can neither ping nor check for
//! silence, so a write stuck that long ends the socket.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use dak_runtime::auth::{self, Identity};
use dak_runtime::http::ApiError;
use dak_runtime::metrics;
use dak_runtime::presence::Connection;
use dak_wire::frame::{ClientFrame, Refusal, DEVICE_REMOVED, DEVICE_REMOVED_CLOSE};
use dak_wire::{ErrorCode, ServerFrame, WireError};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::outbox::{self, OutboxReceiver};
use crate::registry::Handle;
use crate::Shared;

/// Bytes a socket reads at once (see [`upgrade`]).
const READ_BUFFER: usize = 4096;
/// The longest a close frame may take to write: the socket is dropped anyway.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most frames written to a socket before one flush: what queued up for it
/// meanwhile goes out in one write to the kernel, not one write a frame.
const WRITE_BATCH: usize = 64;

#[derive(Deserialize)]
pub(crate) struct TokenQuery {
    access_token: Option<String>,
}

pub(crate) async fn upgrade(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let header = headers.get("authorization").and_then(|v| v.to_str().ok());
    let token = auth::bearer(header).or(query.access_token.as_deref());
    let identity = match token {
        None => return ApiError::from(auth::AuthError::Missing).into_response(),
        Some(token) => match shared.deps.verifier.verify(token).await {
            Ok(identity) => identity,
            Err(e) => return ApiError::from(e).into_response(),
        },
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => {
            return ApiError::new(
                ErrorCode::BadRequest,
                format!("expected a WebSocket upgrade: {rejection}"),
            )
            .into_response()
        }
    };
    if shared.shutdown.is_cancelled() {
        return ApiError::new(ErrorCode::Unavailable, "server is shutting down").into_response();
    }
    // Frames above the configured limit are read and refused with `too_large` so the
    // connection survives; only frames past this hard cap end it.
    let hard_cap = (shared.config.limits.max_frame_bytes * 2).max(1 << 20);
    // tungstenite zero-fills its read buffer on every read: the default 128 KiB
    // costs a memset per frame and, held by every socket, most of the
    // gateway's memory. Larger frames are read over several reads.
    ws.read_buffer_size(READ_BUFFER)
        .max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        .on_upgrade(move |socket| serve(shared, identity, socket))
}

async fn serve(shared: Arc<Shared>, identity: Identity, socket: WebSocket) {
    let connection = Connection {
        user: identity.user.clone(),
        device: identity.device.clone(),
        gateway_id: shared.deps.gateway.id.clone(),
        connection_id: ulid::Ulid::new().to_string(),
    };
    let key = (identity.user.clone(), identity.device.clone());
    let (frames, queued) = outbox::outbox(shared.config.send_queue, shared.config.send_queue_bytes);
    let replaced = CancellationToken::new();
    shared.registry.insert(
        key.clone(),
        Handle {
            connection_id: connection.connection_id.clone(),
            frames,
            replaced: replaced.clone(),
            synced: Default::default(),
        },
    );
    // Registered in presence first, so that by the time session handles the
    // `connected` event it finds this socket and starts its replay.
    let registered = match shared.deps.presence.connect(&connection).await {
        Ok(()) => shared
            .deps
            .ingress
            .connected(&identity, &connection.connection_id)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    ::metrics::gauge!(metrics::CONNECTED_DEVICES).increment(1.0);
    tracing::debug!(user = %identity.user, device = %identity.device, "connected");

    let mut socket = Socket {
        shared: &shared,
        identity: &identity,
        ws: socket,
        queued,
        replaced,
        pending: FuturesOrdered::new(),
        rate: TokenBucket::new(shared.config.rate_limit),
    };
    match registered {
        Ok(()) => socket.run().await,
        Err(e) => {
            tracing::warn!(error = %e, "registering the socket failed");
            let error = WireError {
                code: ErrorCode::Unavailable,
                message: "cannot register the connection right now, reconnect later".into(),
            };
            let _ = socket.send_refusal(Refusal { error, id: None }).await;
            socket.close(1011, "registration failed").await;
        }
    }

    shared.registry.remove(&key, &connection.connection_id);
    if let Err(e) = shared.deps.presence.disconnect(&connection).await {
        tracing::warn!(error = %e, "removing presence failed; it expires with the gateway heartbeat");
    }
    ::metrics::gauge!(metrics::CONNECTED_DEVICES).decrement(1.0);
    tracing::debug!(user = %identity.user, device = %identity.device, "disconnected");
}

/// What a finished Kafka write tells the client: nothing, or one frame.
type Reply = BoxFuture<'static, Option<String>>;

/// Runs the wait for a client frame's answer (the bus's acknowledgement, then
/// the dedup confirm) as a task of its own, and returns the wait for its result.
///
/// The socket's loop polls its pending answers only between its own steps,
/// and one step awaits the next frame's dedup reserve. A confirm polled from
/// there held its place in the Redis connection's bounded queue unpolled while
/// that reserve waited behind it: with a few hundred sockets doing the same,
/// every Redis command of the gateway stalled until the 5 s timeouts freed
/// the queue (`many_sockets_sending_at_once_all_hear_accepted`). As a task the
/// answer makes progress whatever its socket is doing. When the socket goes,
/// dropping the handle leaves the task to finish on its own: the confirm still
/// lands, and its wait on the bus and on Redis is bounded by their timeouts.
fn spawn_reply(
    answer: impl std::future::Future<Output = Option<String>> + Send + 'static,
) -> Reply {
    let task = tokio::spawn(answer);
    Box::pin(async move {
        task.await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "answering a client frame failed");
            None
        })
    })
}

struct Socket<'a> {
    shared: &'a Shared,
    identity: &'a Identity,
    ws: WebSocket,
    queued: OutboxReceiver,
    replaced: CancellationToken,
    /// Client messages and acks waiting for Kafka, answered in the order sent.
    pending: FuturesOrdered<Reply>,
    rate: TokenBucket,
}

enum Step {
    Continue,
    Close(u16, &'static str),
    /// The client sent a close frame.
    ClosedByClient,
    Gone,
}

impl Socket<'_> {
    async fn run(&mut self) {
        // The stored inbox, then `sync.done`, arrive through /send from
        // persistence; this socket only writes what it is given.
        let config = &self.shared.config;
        let mut ping = tokio::time::interval_at(
            tokio::time::Instant::now() + config.ping_interval,
            config.ping_interval,
        );
        let mut last_heard = Instant::now();
        let step = loop {
            let step = tokio::select! {
                _ = self.shared.shutdown.cancelled() => Step::Close(1001, "server shutting down"),
                _ = self.replaced.cancelled() => Step::Close(4000, "replaced by a newer connection of this device"),
                Some(frame) = self.queued.recv() => self.forward_queued(frame).await,
                Some(reply) = self.pending.next(), if !self.pending.is_empty() => self.forward_replies(reply).await,
                incoming = self.ws.recv(), if self.pending.len() < config.max_pending => match incoming {
                    None | Some(Err(_)) => Step::Gone,
                    Some(Ok(message)) => {
                        last_heard = Instant::now();
                        self.on_message(message).await
                    }
                },
                _ = ping.tick() => {
                    if last_heard.elapsed() >= config.idle_timeout {
                        tracing::info!(user = %self.identity.user, device = %self.identity.device, "closing silent socket");
                        Step::Close(1001, "no pong within the idle timeout")
                    } else {
                        self.forward_message(Message::Ping(Default::default())).await
                    }
                }
            };
            if !matches!(step, Step::Continue) {
                break step;
            }
        };
        match step {
            Step::Close(code, reason) => {
                self.finish_pending().await;
                self.close(code, reason).await;
            }
            // tungstenite queued the echo of the client's close frame; only
            // a flush sends it. Without it a browser reports the close as
            // abnormal (1006).
            Step::ClosedByClient => {
                let deadline = CLOSE_WRITE_TIMEOUT.min(self.shared.config.idle_timeout);
                let _ = tokio::time::timeout(deadline, self.ws.flush()).await;
            }
            Step::Continue | Step::Gone => {}
        }
    }

    async fn on_message(&mut self, message: Message) -> Step {
        match message {
            Message::Text(text) => self.on_text(text.as_str()).await,
            Message::Binary(_) => {
                let error = WireError::bad_request(
                    "binary frames are not supported; send JSON text frames",
                );
                self.refuse(Refusal { error, id: None }).await
            }
            Message::Ping(_) | Message::Pong(_) => Step::Continue,
            Message::Close(_) => Step::ClosedByClient,
        }
    }

    async fn on_text(&mut self, text: &str) -> Step {
        let limits = self.shared.config.limits.limits();
        let frame = match ClientFrame::parse(text, &self.identity.user, &limits) {
            Ok(frame) => frame,
            Err(refusal) => return self.refuse(refusal).await,
        };
        if matches!(frame, ClientFrame::Ping) {
            return self.forward(ServerFrame::Pong.to_json().into()).await;
        }
        let id = match &frame {
            ClientFrame::Message(m) => Some(m.id.to_string()),
            ClientFrame::Group(g) => Some(g.id.to_string()),
            ClientFrame::Receipt(r) => r.id.as_ref().map(|id| id.to_string()),
            _ => None,
        };
        if !self.rate.take() {
            let error = WireError {
                code: ErrorCode::RateLimited,
                message: "too many frames, slow down and retry".into(),
            };
            return self.refuse(Refusal { error, id }).await;
        }
        let ingress = &self.shared.deps.ingress;
        let submitted = match frame {
            ClientFrame::Ping => unreachable!("answered above"),
            ClientFrame::Message(message) => ingress.submit(self.identity, message).await,
            ClientFrame::Group(request) => ingress.submit_group(self.identity, request).await,
            ClientFrame::Receipt(receipt) => {
                let answer = receipt.id.is_some();
                match ingress.receipt(self.identity, &receipt) {
                    Ok(pending) => {
                        // Answered only when the client gave an id to answer to.
                        self.pending.push_back(spawn_reply(async move {
                            match pending.accepted().await {
                                Ok(a) => answer.then(|| accepted(&a)),
                                Err(e) => Some(unavailable(&e, id)),
                            }
                        }));
                        return Step::Continue;
                    }
                    Err(e) => Err(e),
                }
            }
            ClientFrame::Typing { to, chat } => match ingress.typing(self.identity, to, chat) {
                Ok(()) => return Step::Continue,
                Err(e) => Err(e),
            },
            ClientFrame::Ack { mids } => {
                let ingress = ingress.clone();
                let identity = self.identity.clone();
                self.pending.push_back(spawn_reply(async move {
                    ingress
                        .ack(&identity, mids)
                        .await
                        .err()
                        .map(|e| unavailable(&e, None))
                }));
                return Step::Continue;
            }
        };
        match submitted {
            Ok(pending) => {
                self.pending.push_back(spawn_reply(async move {
                    Some(match pending.accepted().await {
                        Ok(a) => accepted(&a),
                        Err(e) => unavailable(&e, id),
                    })
                }));
                Step::Continue
            }
            Err(e) => self.forward(unavailable(&e, id).into()).await,
        }
    }

    async fn refuse(&mut self, refusal: Refusal) -> Step {
        match self.send_refusal(refusal).await {
            Ok(()) => Step::Continue,
            Err(()) => Step::Gone,
        }
    }

    async fn send_refusal(&mut self, refusal: Refusal) -> Result<(), ()> {
        ::metrics::counter!(metrics::REJECTED, "code" => refusal.error.code.as_str()).increment(1);
        tracing::debug!(user = %self.identity.user, code = refusal.error.code.as_str(), message = %refusal.error.message, "frame refused");
        self.send_text(refusal.to_frame().to_json()).await
    }

    async fn forward(&mut self, text: Utf8Bytes) -> Step {
        self.forward_message(Message::Text(text)).await
    }

    async fn forward_message(&mut self, message: Message) -> Step {
        self.forward_all(vec![message]).await
    }

    /// Writes `first` and the frames queued behind it, up to [`WRITE_BATCH`].
    async fn forward_queued(&mut self, first: Utf8Bytes) -> Step {
        // `device.removed` is the last frame: the socket closes once it is written.
        let mut removed = first.as_str() == DEVICE_REMOVED;
        let mut messages = vec![Message::Text(first)];
        while !removed && messages.len() < WRITE_BATCH {
            let Some(frame) = self.queued.try_recv() else {
                break;
            };
            removed = frame.as_str() == DEVICE_REMOVED;
            messages.push(Message::Text(frame));
        }
        match self.forward_all(messages).await {
            Step::Continue if removed => {
                Step::Close(DEVICE_REMOVED_CLOSE, "this device was removed by its user")
            }
            step => step,
        }
    }

    /// Writes `first` and the replies already answered behind it, in order,
    /// up to [`WRITE_BATCH`].
    async fn forward_replies(&mut self, first: Option<String>) -> Step {
        let mut messages: Vec<Message> =
            first.map(|t| Message::Text(t.into())).into_iter().collect();
        while messages.len() < WRITE_BATCH && !self.pending.is_empty() {
            match self.pending.next().now_or_never() {
                Some(Some(Some(text))) => messages.push(Message::Text(text.into())),
                Some(Some(None)) => {}
                Some(None) | None => break,
            }
        }
        if messages.is_empty() {
            return Step::Continue;
        }
        self.forward_all(messages).await
    }

    async fn forward_all(&mut self, messages: Vec<Message>) -> Step {
        match self.write(messages, self.shared.config.idle_timeout).await {
            Ok(()) => Step::Continue,
            Err(()) => Step::Gone,
        }
    }

    async fn send_text(&mut self, text: String) -> Result<(), ()> {
        self.write(
            vec![Message::Text(text.into())],
            self.shared.config.idle_timeout,
        )
        .await
    }

    /// Writes `messages` and flushes once, giving up on a socket that took
    /// them not within `deadline`: its client stopped reading, or the link is
    /// dead and TCP has not noticed. The frames still queued for it are never
    /// acked, so session sends them again or stores them.
    async fn write(&mut self, messages: Vec<Message>, deadline: Duration) -> Result<(), ()> {
        let ws = &mut self.ws;
        let written = async move {
            for message in messages {
                ws.feed(message).await?;
            }
            ws.flush().await
        };
        match tokio::time::timeout(deadline, written).await {
            Ok(result) => result.map_err(|_| ()),
            Err(_) => {
                ::metrics::counter!(metrics::STALLED_SOCKETS).increment(1);
                tracing::info!(user = %self.identity.user, device = %self.identity.device, "closing a socket whose write is stuck");
                Err(())
            }
        }
    }

    /// Answers what is still waiting for Kafka before the socket closes, so a
    /// client hears `accepted` for everything that became durable.
    async fn finish_pending(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while let Ok(Some(reply)) = tokio::time::timeout_at(deadline, self.pending.next()).await {
            if let Some(text) = reply {
                if self.send_text(text).await.is_err() {
                    return;
                }
            }
        }
    }

    async fn close(&mut self, code: u16, reason: &'static str) {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let deadline = CLOSE_WRITE_TIMEOUT.min(self.shared.config.idle_timeout);
        let _ = self
            .write(vec![Message::Close(Some(frame))], deadline)
            .await;
    }
}

fn accepted(a: &dak_runtime::ingress::Accepted) -> String {
    ServerFrame::Accepted {
        id: &a.id,
        mid: a.mid,
        ts: a.ts,
    }
    .to_json()
}

fn unavailable(e: &dak_runtime::ingress::IngressError, id: Option<String>) -> String {
    dak_runtime::ingress::log_refusal(e);
    ::metrics::counter!(metrics::REJECTED, "code" => ErrorCode::Unavailable.as_str()).increment(1);
    let refusal = Refusal {
        error: WireError {
            code: ErrorCode::Unavailable,
            message: "the message bus is unavailable, keep the message and retry".into(),
        },
        id,
    };
    refusal.to_frame().to_json()
}

/// Frames per second a socket may send, with a burst of twice the rate.
struct TokenBucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: u32) -> Self {
        Self {
            rate: f64::from(rate),
            tokens: f64::from(rate) * 2.0,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate * 2.0);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}
