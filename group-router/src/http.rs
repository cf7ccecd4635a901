//! `GET /v1/groups/{g}`: a group's name, members and roles, for its members.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::Json;
use dak_runtime::http::ApiError;
use dak_wire::group::Role;
use dak_wire::{ErrorCode, GroupId, UserId};
use serde::Serialize;

use crate::Shared;

#[derive(Serialize)]
pub(crate) struct GroupView {
    id: GroupId,
    name: String,
    created_by: UserId,
    created_ts: u64,
    members: Vec<MemberView>,
}

#[derive(Serialize)]
struct MemberView {
    user: UserId,
    role: Role,
    joined_ts: u64,
}

pub(crate) async fn group(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(group): Path<String>,
) -> Result<Json<GroupView>, ApiError> {
    let header = headers.get("authorization").and_then(|v| v.to_str().ok());
    let identity = shared.verifier.verify_header(header).await?;
    let id = GroupId::parse(group).map_err(ApiError::from)?;
    let loaded = shared
        .store
        .load(std::slice::from_ref(&id))
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "group read failed");
            ApiError::new(
                ErrorCode::Unavailable,
                "groups are unavailable, retry later",
            )
        })?;
    let Some(g) = loaded
        .into_iter()
        .next()
        .flatten()
        .filter(|g| g.member(&identity.user).is_some())
    else {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("group `{id}` does not exist or you are not a member"),
        ));
    };
    Ok(Json(GroupView {
        id: g.id,
        name: g.name,
        created_by: g.created_by,
        created_ts: g.created_ts,
        members: g
            .members
            .into_iter()
            .map(|m| MemberView {
                user: m.user,
                role: m.role,
                joined_ts: m.joined_ts,
            })
            .collect(),
    }))
}
