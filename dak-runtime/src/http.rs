//! HTTP plumbing: serving a router until shutdown, and the one mapping from
//! [`ErrorCode`] to REST error responses (DESIGN §5).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use dak_wire::{ErrorCode, WireError};
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let router = router.layer(axum::middleware::map_response(json_body_limit));
    // Without TCP_NODELAY a small write that follows another (a frame after a
    // frame on a socket) waits for the peer's delayed ACK: up to 40 ms.
    let listener = listener.tap_io(|stream| {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "setting TCP_NODELAY");
        }
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
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
        tracing::warn!(error = %e, "ingress unavailable");
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

/// axum answers an oversize body with a plain-text 413; clients get the same
/// JSON error shape as for every other refusal. The rest of such a body is
/// never read, so the connection cannot carry another request: the answer
/// says `Connection: close`, or a client reusing the connection would see its
/// next request fail.
async fn json_body_limit(response: Response) -> Response {
    if response.status() != StatusCode::PAYLOAD_TOO_LARGE {
        return response;
    }
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
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
