//! `POST /internal/v1/send`: write a batch of frames to the sockets they are for.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use dak_runtime::http::ApiError;
use dak_wire::frame::SYNC_DONE;
use dak_wire::send::{SendItem, SendOutcome, SendRequest, SendResponse};
use dak_wire::{DeviceId, ErrorCode, UserId};
use tokio::sync::mpsc::error::TrySendError;

use crate::registry::Registry;
use crate::Shared;

pub(crate) async fn send(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<SendResponse>, ApiError> {
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
    if !dak_runtime::auth::internal_token_matches(&shared.deps.internal_token, authorization) {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "internal token required",
        ));
    }
    let request: SendRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("malformed send request: {e}"),
        )
    })?;
    let results = write(&shared.registry, &request.deliveries);
    Ok(Json(SendResponse { results }))
}

/// Queues each frame on its device's socket. Frames for one device are written
/// in request order: after the first one that cannot be queued, the rest for
/// that device are refused too, so the caller can resend the remainder without
/// reordering.
pub(crate) fn write(registry: &Registry, deliveries: &[SendItem]) -> Vec<SendOutcome> {
    let mut stalled: HashSet<(&UserId, &DeviceId)> = HashSet::new();
    deliveries
        .iter()
        .map(|item| {
            if stalled.contains(&(&item.user, &item.device)) {
                return SendOutcome::Busy;
            }
            let outcome = match registry.get(&item.user, &item.device) {
                None => SendOutcome::NotConnected,
                Some(socket)
                    if item
                        .connection
                        .as_ref()
                        .is_some_and(|c| *c != socket.connection_id) =>
                {
                    SendOutcome::NotConnected
                }
                Some(socket) => match socket.frames.try_send(item.frame.get().into()) {
                    Ok(()) => {
                        if item.frame.get() == SYNC_DONE {
                            socket.synced.store(true, Ordering::Relaxed);
                        }
                        SendOutcome::Sent
                    }
                    Err(TrySendError::Full(_)) => SendOutcome::Busy,
                    Err(TrySendError::Closed(_)) => SendOutcome::NotConnected,
                },
            };
            if outcome == SendOutcome::Busy {
                stalled.insert((&item.user, &item.device));
            }
            outcome
        })
        .collect()
}
