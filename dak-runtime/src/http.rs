//! HTTP plumbing: serving a router until shutdown, and the one mapping from
//! [`ErrorCode`] to REST error responses (DESIGN §5).

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use dak_wire::{ErrorCode, WireError};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::shutdown::Shutdown;

/// What one server grants its clients' connections, so that clients that
/// open connections and send nothing, or dribble their headers (slowloris),
/// cannot hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// How long a client may take to send a request's headers, counted from
    /// when the server starts waiting for them: also how long an idle
    /// keep-alive connection stays open. `None`: no limit.
    pub header_timeout: Option<Duration>,
    /// Most HTTP connections served at once; beyond, new connections wait
    /// in the listen backlog for a free slot. A WebSocket stops counting
    /// once upgraded. `None`: no limit.
    pub max_connections: Option<usize>,
}

impl ConnectionLimits {
    /// For servers only trusted peers reach (the internal API): none, so
    /// session's pooled connections are never cut while idle.
    pub const NONE: Self = Self {
        header_timeout: None,
        max_connections: None,
    };
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: Some(Duration::from_secs(20)),
            max_connections: Some(10_000),
        }
    }
}

/// Serves `router` over HTTP/1.1 (and WebSocket upgrades) until `shutdown`,
/// then lets the open connections finish what they are doing.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let router = router.layer(axum::middleware::from_fn(json_errors));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let http = Arc::new(http);
    let slots = limits.max_connections.map(|n| Arc::new(Semaphore::new(n)));
    let connections = TaskTracker::new();
    loop {
        let slot = match &slots {
            None => None,
            Some(slots) => tokio::select! {
                slot = slots.clone().acquire_owned() => Some(slot?),
                _ = shutdown.cancelled() => break,
            },
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Without TCP_NODELAY a small write that follows another (a frame after a
        // frame on a socket) waits for the peer's delayed ACK: up to 40 ms.
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY");
        }
        let service = TowerToHyperService::new(router.clone());
        let (http, shutdown) = (http.clone(), shutdown.clone());
        connections.spawn(async move {
            let _slot = slot;
            let connection = http
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "http connection ended");
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Per-connection failures (the peer reset before we took it) are nothing;
/// others (out of file descriptors) get a pause rather than a busy loop.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    ) {
        return;
    }
    tracing::warn!(error = %e, "accepting a connection failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// A REST error: `{"error":{"code":"…","message":"…"}}` with the code's status.
#[derive(Debug)]
pub struct ApiError(pub WireError);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self(WireError {
            code,
            message: message.into(),
        })
    }
}

impl From<WireError> for ApiError {
    fn from(e: WireError) -> Self {
        Self(e)
    }
}

impl From<crate::auth::AuthError> for ApiError {
    fn from(e: crate::auth::AuthError) -> Self {
        Self::new(ErrorCode::Unauthorized, e.to_string())
    }
}

impl From<crate::ingress::IngressError> for ApiError {
    fn from(e: crate::ingress::IngressError) -> Self {
        crate::ingress::log_refusal(&e);
        Self::new(
            ErrorCode::Unavailable,
            "the message bus is unavailable, retry later",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        ::metrics::counter!(crate::metrics::REJECTED, "code" => self.0.code.as_str()).increment(1);
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::json!({"error": {"code": self.0.code, "message": self.0.message}});
        (status, Json(body)).into_response()
    }
}

/// axum answers a path no route serves (404) with no body, a method its
/// route does not take (405) with none either, and an oversize body (413) in
/// plain text; clients get the API's JSON error shape for each instead, as
/// for every other refusal (the 405 keeps its `Allow` header).
///
/// The rest of an oversize body is never read, so the connection cannot
/// carry another request: the 413 says `Connection: close`, or a client
/// reusing the connection would see its next request fail.
async fn json_errors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let method = request.method().clone();
    let response = next.run(request).await;
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE => {
            let mut response = if is_json {
                response
            } else {
                ApiError::new(ErrorCode::TooLarge, "request body too large").into_response()
            };
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            response
        }
        StatusCode::NOT_FOUND if !is_json => error(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such endpoint".into(),
        ),
        StatusCode::METHOD_NOT_ALLOWED if !is_json => {
            let message = format!("{method} is not served at this path");
            let mut answer = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                message,
            );
            if let Some(allow) = response.headers().get(axum::http::header::ALLOW) {
                answer
                    .headers_mut()
                    .insert(axum::http::header::ALLOW, allow.clone());
            }
            answer
        }
        _ => response,
    }
}

/// `{"error":{"code","message"}}` for a code outside [`ErrorCode`]: the
/// HTTP-level refusals that are not about what a request carried.
fn error(status: StatusCode, code: &str, message: String) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message } });
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::time::Instant;

    use super::*;

    async fn start(limits: ConnectionLimits) -> (SocketAddr, Shutdown) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new().route("/", get(|| async { "ok" }));
        let shutdown = Shutdown::new();
        tokio::spawn(serve(listener, router, limits, shutdown.clone()));
        (addr, shutdown)
    }

    /// Opens a connection and starts a request it never finishes.
    async fn slow_client(addr: SocketAddr) -> TcpStream {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        socket
            .write_all(b"GET / HTTP/1.1\r\nHost: dak\r\n")
            .await
            .unwrap();
        socket
    }

    /// Reads until the server closes the connection, writing one more header
    /// line every second meanwhile; `None` if it is still open after a minute.
    async fn dribble_until_closed(socket: &mut TcpStream) -> Option<Duration> {
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let closed = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                tokio::select! {
                    read = socket.read(&mut buf) => match read {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                    _ = tick.tick() => {
                        let _ = socket.write_all(b"X-Slow: 1\r\n").await;
                    }
                }
            }
        })
        .await;
        closed.ok().map(|()| started.elapsed())
    }

    async fn get_root(addr: SocketAddr) -> String {
        request(addr, "GET", "/").await
    }

    /// The whole answer to a request without a body, head and body.
    async fn request(addr: SocketAddr, method: &str, path: &str) -> String {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        let head = format!("{method} {path} HTTP/1.1\r\nHost: dak\r\nConnection: close\r\n\r\n");
        socket.write_all(head.as_bytes()).await.unwrap();
        let mut answer = String::new();
        socket.read_to_string(&mut answer).await.unwrap();
        answer
    }

    /// A path no route serves, or a method its route does not take, is
    /// answered in the API's error shape, not with an empty body.
    #[tokio::test]
    async fn unknown_paths_and_methods_get_a_json_error() {
        let (addr, _shutdown) = start(ConnectionLimits::default()).await;
        let answer = request(addr, "GET", "/v1/nope").await;
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{answer}"
        );
        assert!(
            answer.ends_with(r#"{"error":{"code":"not_found","message":"no such endpoint"}}"#),
            "{answer}"
        );
        let answer = request(addr, "DELETE", "/").await;
        assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("allow: get,head"),
            "{answer}"
        );
        assert!(
            answer.ends_with(
                r#"{"error":{"code":"method_not_allowed","message":"DELETE is not served at this path"}}"#
            ),
            "{answer}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_dribbling_its_headers_is_cut_off_at_the_header_timeout() {
        let (addr, _shutdown) = start(ConnectionLimits {
            header_timeout: Some(Duration::from_secs(10)),
            max_connections: None,
        })
        .await;
        let mut slow = slow_client(addr).await;
        let open_for = dribble_until_closed(&mut slow)
            .await
            .expect("a connection whose headers never end must be closed");
        assert!(open_for <= Duration::from_secs(11), "{open_for:?}");
        assert!(get_root(addr).await.starts_with("HTTP/1.1 200"));
    }

    #[tokio::test(start_paused = true)]
    async fn connections_past_the_cap_wait_until_a_slot_frees() {
        let header_timeout = Duration::from_secs(10);
        let (addr, _shutdown) = start(ConnectionLimits {
            header_timeout: Some(header_timeout),
            max_connections: Some(2),
        })
        .await;
        let started = Instant::now();
        assert!(get_root(addr).await.starts_with("HTTP/1.1 200"));
        assert!(started.elapsed() < Duration::from_secs(1));

        // Two clients that never finish their headers take both slots: the
        // next one is served only when the header timeout frees them.
        let _slow = [slow_client(addr).await, slow_client(addr).await];
        let started = Instant::now();
        assert!(get_root(addr).await.starts_with("HTTP/1.1 200"));
        let waited = started.elapsed();
        assert!(waited >= header_timeout, "served after {waited:?}");
        assert!(
            waited <= header_timeout + Duration::from_secs(1),
            "served after {waited:?}"
        );
    }
}
