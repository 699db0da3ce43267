//! Scoped API keys: `/api/apitokens` (create, list, delete), admin only.
//! A scope is `admin`, `read` or `network:NETID`.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use bgp4mesh_api::{ApiToken, ApiTokenCreate};

use super::networks::check_netid;
use super::{Controller, Failure, Principal, Reply, body, may_manage, now};
use crate::secrets;
use crate::store::ApiTokenRow;
pub(super) async fn create_api_token(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    json: Result<Json<ApiTokenCreate>, JsonRejection>,
) -> Reply<ApiToken> {
    may_manage(&who, None, false)?;
    let req = body(json)?;
    let scope_ok = req.scope == "admin"
        || req.scope == "read"
        || req
            .scope
            .strip_prefix("network:")
            .is_some_and(|n| check_netid(n).is_ok());
    if !scope_ok {
        return Err(Failure::bad(format!(
            "scope {:?}: admin, read or network:NETID",
            req.scope
        )));
    }
    let secret = secrets::new_secret();
    let row = ApiTokenRow {
        id: secrets::new_id(),
        secret_hash: secrets::hash(&secret),
        scope: req.scope,
        created_at: now(),
    };
    ctl.store.create_api_token(&row).await?;
    Ok(Json(ApiToken {
        id: row.id,
        scope: row.scope,
        created_at: row.created_at,
        token: Some(secret),
    }))
}

pub(super) async fn list_api_tokens(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
) -> Reply<Vec<ApiToken>> {
    may_manage(&who, None, false)?;
    Ok(Json(
        ctl.store
            .api_tokens()
            .await?
            .into_iter()
            .map(|t| ApiToken {
                id: t.id,
                scope: t.scope,
                created_at: t.created_at,
                token: None,
            })
            .collect(),
    ))
}

pub(super) async fn delete_api_token(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, Failure> {
    may_manage(&who, None, false)?;
    ctl.store.delete_api_token(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
