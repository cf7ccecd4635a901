//! `GET /v1/messages?after=<cursor>&limit=<n>`: the device's stored inbox, oldest
//! first, for apps that sync in the background without a socket.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::Json;
use dak_runtime::http::ApiError;
use dak_runtime::now_ms;
use dak_wire::{ErrorCode, ServerFrame};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::Shared;

/// Largest page a client may ask for.
pub const MAX_LIMIT: usize = 500;
const DEFAULT_LIMIT: usize = 100;

#[derive(Deserialize)]
pub(crate) struct Params {
    after: Option<String>,
    limit: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct Page {
    messages: Vec<Box<RawValue>>,
    next: Option<String>,
}

pub(crate) async fn messages(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Result<Json<Page>, ApiError> {
    let header = headers.get("authorization").and_then(|v| v.to_str().ok());
    let identity = shared.verifier.verify_header(header)?;
    let limit = match params.limit.as_deref() {
        None => DEFAULT_LIMIT,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::BadRequest,
                    format!("`limit` must be 1 to {MAX_LIMIT}"),
                )
            })?,
    };
    let after = params
        .after
        .as_deref()
        .map(dak_wire::cursor::parse)
        .transpose()?;
    let unavailable = |e: crate::inbox::InboxError| {
        tracing::warn!(error = %e, "inbox read failed");
        ApiError::new(
            ErrorCode::Unavailable,
            "the inbox is unavailable, retry later",
        )
    };
    // The first device to sync takes over what waited for the user.
    shared
        .inbox
        .take_over(&identity.user, &identity.device)
        .await
        .map_err(unavailable)?;
    let page = shared
        .inbox
        .page(&identity.user, &identity.device, after, limit, now_ms())
        .await
        .map_err(unavailable)?;
    ::metrics::counter!(crate::SYNCED).increment(page.len() as u64);
    let next = (page.len() == limit)
        .then(|| page.last().map(|(seq, _)| dak_wire::cursor::format(*seq)))
        .flatten();
    // Each shaped as the WebSocket frame the device would have received.
    let messages = page
        .iter()
        .map(|(_, m)| {
            RawValue::from_string(ServerFrame::from(m).to_json()).expect("frames are JSON")
        })
        .collect();
    Ok(Json(Page { messages, next }))
}
