//! Enrollment tokens: `/api/tokens` (create, list, delete). The secret is
//! shown once, inside the token text; the store keeps its hash.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bgp4mesh_api::{EnrollmentToken, Token, TokenCreate};

use super::{Controller, Failure, NetworkFilter, Principal, Reply, body, may_manage, now};
use crate::secrets;
use crate::store::TokenRow;
fn render_token(t: &TokenRow, secret: Option<String>) -> Token {
    Token {
        id: t.id.clone(),
        network: t.network.clone(),
        expires_at: t.expires_at,
        uses_left: t.uses_left,
        tags: t.tags.clone(),
        created_at: t.created_at,
        token: secret,
    }
}

pub(super) async fn create_token(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    json: Result<Json<TokenCreate>, JsonRejection>,
) -> Reply<Token> {
    let req = body(json)?;
    may_manage(&who, Some(&req.network), false)?;
    if ctl.store.network(&req.network).await?.is_none() {
        return Err(Failure::not_found(format!("no network {:?}", req.network)));
    }
    if req.uses == Some(0) {
        return Err(Failure::bad(
            "uses: at least 1 (leave it out for unlimited)",
        ));
    }
    if req
        .expires_in
        .is_some_and(|s| s == 0 || s > MAX_TOKEN_LIFETIME)
    {
        return Err(Failure::bad(format!(
            "expires_in: 1 to {MAX_TOKEN_LIFETIME} seconds (leave it out for no expiry)"
        )));
    }
    check_tags(&req.tags)?;
    let secret = secrets::new_secret();
    let created = now();
    let row = TokenRow {
        id: secrets::new_id(),
        secret_hash: secrets::hash(&secret),
        network: req.network.clone(),
        expires_at: req.expires_in.map(|s| created.saturating_add(s)),
        uses_left: req.uses,
        tags: req.tags,
        created_at: created,
    };
    ctl.store.create_token(&row).await?;
    let servers = ctl
        .store
        .controllers()
        .await?
        .into_iter()
        .filter(|(url, _)| *url != ctl.public_url)
        .map(|(url, fingerprint)| bgp4mesh_api::ControllerAddress { url, fingerprint })
        .collect();
    let token = EnrollmentToken {
        server: ctl.public_url.clone(),
        fingerprint: ctl.fingerprint.clone(),
        network: req.network,
        secret,
        servers,
    };
    let text = serde_json::to_vec(&token)
        .map(|j| URL_SAFE_NO_PAD.encode(j))
        .map_err(|e| Failure::bad(e.to_string()))?;
    Ok(Json(render_token(&row, Some(text))))
}

/// Ten years, in seconds: the longest `expires_in`.
const MAX_TOKEN_LIFETIME: u64 = 10 * 365 * 24 * 3600;
/// Tags an enrollment token gives its nodes: at most this many...
const MAX_TAGS: usize = 32;
/// ...of at most this many characters each.
const MAX_TAG_LEN: usize = 64;

fn check_tags(tags: &[String]) -> Result<(), Failure> {
    if tags.len() > MAX_TAGS {
        return Err(Failure::bad(format!(
            "tags: {} tags, at most {MAX_TAGS}",
            tags.len()
        )));
    }
    for tag in tags {
        let ok = !tag.is_empty()
            && tag.len() <= MAX_TAG_LEN
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:=/".contains(&b));
        if !ok {
            let shown: String = tag.chars().take(MAX_TAG_LEN).collect();
            return Err(Failure::bad(format!(
                "tags: {shown:?}: 1 to {MAX_TAG_LEN} letters, digits or - _ . : = /"
            )));
        }
    }
    Ok(())
}

pub(super) async fn list_tokens(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Query(filter): Query<NetworkFilter>,
) -> Reply<Vec<Token>> {
    may_manage(&who, filter.network.as_deref(), true)?;
    let rows = ctl.store.tokens(filter.network.as_deref()).await?;
    Ok(Json(rows.iter().map(|t| render_token(t, None)).collect()))
}

pub(super) async fn delete_token(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, Failure> {
    if matches!(who, Principal::Read | Principal::Node(_)) {
        may_manage(&who, None, false)?;
    }
    // A network's key learns nothing of other networks' tokens: theirs
    // are "not found" to it, as missing ones are.
    let missing = || Failure::not_found(format!("no enrollment token {id:?}"));
    let token = ctl.store.token(&id).await?.ok_or_else(missing)?;
    may_manage(&who, Some(&token.network), false).map_err(|_| missing())?;
    ctl.store.delete_token(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
