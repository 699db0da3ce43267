//! The REST API (JSON) and the agents' push stream.
//!
//! Every refusal is JSON `{"message": ...}` with a 4xx status: 400 for a
//! bad field (the message names it), 401 for a missing or unknown
//! credential, 403 for one that may not do this, 404, 409 for a conflict
//! with what exists. A 500 only means the database failed.
//!
//! This module holds what every resource shares: the `Controller`, the
//! router, authentication (`Principal`), refusals (`Failure`, axum's own
//! rewritten to JSON) and the monitoring reads; each resource's handlers
//! are in their own file: `networks`, `tokens` (enrollment tokens),
//! `join`, `nodes`, `gateways`, `apitokens` and `agent` (state, the push
//! stream, reports and pulses). The pulse watchdog is beside the hub
//! (`crate::hub::watchdog`).

mod agent;
mod apitokens;
mod gateways;
mod join;
mod networks;
mod nodes;
mod tokens;

pub use gateways::egress_range_allowed;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bgp4mesh_api::ApiError;
use serde::Deserialize;

use crate::connections::ConnectionHandle;
use crate::hub::{Hub, NodeView};
use crate::metrics::Metrics;
use crate::secrets;
use crate::store::{NodeRow, Store, StoreError};

pub struct Controller {
    pub store: Store,
    pub hub: Hub,
    master_key: String,
    /// The URL enrollment tokens point at.
    pub public_url: String,
    /// The certificate fingerprint enrollment tokens carry.
    pub fingerprint: Option<String>,
    /// Writes go one at a time: revisions reach the hub in order.
    pub(crate) write: tokio::sync::Mutex<()>,
    pub metrics: Metrics,
    /// Gateways whose health change could not be recorded (a store error):
    /// the pulse watchdog tries again, so nodes do not keep a stale exit.
    pub(crate) unpublished: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
}

impl Controller {
    /// Loads the store's contents into memory.
    pub async fn new(
        store: Store,
        master_key: String,
        public_url: String,
        fingerprint: Option<String>,
    ) -> Result<Controller, StoreError> {
        let hub = Hub::load(
            store.revision().await?,
            store.networks().await?,
            store.nodes(None).await?,
            store.gateways().await?,
        );
        Ok(Controller {
            store,
            hub,
            master_key,
            public_url,
            fingerprint,
            write: tokio::sync::Mutex::new(()),
            metrics: Metrics::default(),
            unpublished: Default::default(),
        })
    }
}

pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis().min(u128::from(u64::MAX)) as u64)
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------
// Errors

#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    pub(crate) message: String,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::BAD_REQUEST, message)
    }
    fn not_found(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::NOT_FOUND, message)
    }
    fn conflict(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::CONFLICT, message)
    }
    fn forbidden(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::FORBIDDEN, message)
    }
    fn unauthorized(message: impl Into<String>) -> Failure {
        Failure::new(StatusCode::UNAUTHORIZED, message)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "{}", self.message);
        }
        (
            self.status,
            Json(ApiError {
                message: self.message,
            }),
        )
            .into_response()
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        match e {
            StoreError::Conflict(m) => Failure::conflict(m),
            StoreError::NotFound(m) => Failure::not_found(m),
            StoreError::Database(e) => {
                // The details (redacted) go to the log, not to the caller.
                tracing::error!("database: {}", crate::config::redact_url(&e.to_string()));
                Failure::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the database failed; the controller's log says why",
                )
            }
        }
    }
}

/// A JSON body, or a 4xx that says what is wrong with it.
fn body<T>(json: Result<Json<T>, JsonRejection>) -> Result<T, Failure> {
    json.map(|Json(v)| v).map_err(|r| {
        let status = match r.status() {
            s @ (StatusCode::UNSUPPORTED_MEDIA_TYPE | StatusCode::PAYLOAD_TOO_LARGE) => s,
            _ => StatusCode::BAD_REQUEST,
        };
        Failure::new(status, r.body_text())
    })
}

type Reply<T> = Result<Json<T>, Failure>;

// ---------------------------------------------------------------------------
// Who is asking

#[derive(Clone)]
pub enum Principal {
    Admin,
    /// GET anything (except agent endpoints).
    Read,
    /// Everything about one network.
    Network(String),
    Node(NodeRow),
}

/// The key of `Authorization: Bearer <key>`.
fn bearer(headers: &HeaderMap) -> Result<&str, Failure> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Err(Failure::unauthorized(
            "missing Authorization header (Authorization: Bearer <key>)",
        ));
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
        .ok_or_else(|| Failure::unauthorized("the Authorization header is not \"Bearer <key>\""))
}

/// Longer than any key the controller makes (43 characters) or accepts
/// as a master key worth having; longer ones are not even hashed.
const MAX_KEY_LEN: usize = 512;

/// Who the request's key belongs to. Gateways and relays are found in
/// memory first for the agent API: their pulses must not wait on the store
/// (a stalled store would otherwise silence every gateway at once).
async fn principal(
    ctl: &Controller,
    headers: &HeaderMap,
    agent: bool,
) -> Result<Principal, Failure> {
    let token = bearer(headers)?;
    if secrets::same(token, &ctl.master_key) {
        return Ok(Principal::Admin);
    }
    let hash = secrets::hash(token);
    if agent && let Some(node) = ctl.hub.gateway_by_credential(&hash) {
        return Ok(Principal::Node(node));
    }
    if let Some(t) = ctl.store.api_token_by_hash(&hash).await? {
        return Ok(match t.scope.strip_prefix("network:") {
            Some(net) => Principal::Network(net.to_string()),
            None if t.scope == "admin" => Principal::Admin,
            None => Principal::Read,
        });
    }
    if let Some(node) = ctl.store.node_by_credential(&hash).await? {
        return Ok(Principal::Node(node));
    }
    Err(Failure::unauthorized("unknown key"))
}

/// Paths that take no bearer key: the health check, and joining (its
/// enrollment secret is in the body).
fn open_path(path: &str) -> bool {
    path == "/api/health" || path == "/api/join"
}

/// Authenticates every request but the open ones before anything else
/// runs: no path lookup, body parsing or store read happens for a caller
/// without a valid key, who gets 401. A key that checks out proves the
/// connection (`connections`).
async fn authenticate(
    State(ctl): State<Arc<Controller>>,
    mut request: Request,
    next: Next,
) -> Response {
    let path = request.uri().path();
    if open_path(path) {
        return next.run(request).await;
    }
    let agent = path.starts_with("/api/agent/");
    let who = match principal(&ctl, request.headers(), agent).await {
        Ok(who) => who,
        Err(refusal) => {
            // A small body is read (not parsed) so the client, still
            // writing it, gets the 401 rather than a reset connection; a
            // large or slow one is not waited for, and the connection is
            // then closed, saying so, so the client does not reuse it.
            let body = request.into_body();
            let drained = tokio::time::timeout(
                Duration::from_secs(1),
                axum::body::to_bytes(body, 64 * 1024),
            )
            .await;
            let mut response = refusal.into_response();
            if !matches!(drained, Ok(Ok(_))) {
                closing(&mut response);
            }
            return response;
        }
    };
    if let Some(connection) = request.extensions().get::<ConnectionHandle>() {
        connection.prove();
    }
    request.extensions_mut().insert(who);
    next.run(request).await
}

/// Admin, or scoped to `netid` (or reading, when `read` is enough).
fn may_manage(who: &Principal, netid: Option<&str>, read: bool) -> Result<(), Failure> {
    match who {
        Principal::Admin => Ok(()),
        Principal::Read if read => Ok(()),
        Principal::Network(n) if netid == Some(n.as_str()) => Ok(()),
        Principal::Node(_) => Err(Failure::forbidden(
            "a node credential is only for the agent API (/api/agent/...)",
        )),
        _ => Err(Failure::forbidden("this key may not do that")),
    }
}

fn as_node(who: &Principal) -> Result<NodeRow, Failure> {
    match who {
        Principal::Node(n) => Ok(n.clone()),
        _ => Err(Failure::forbidden("the agent API takes a node credential")),
    }
}

// ---------------------------------------------------------------------------
// The router

pub fn router(ctl: Arc<Controller>) -> Router {
    Router::new()
        .route("/api/health", get(health))
        .route("/api/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route(
            "/api/networks",
            post(networks::create_network).get(networks::list_networks),
        )
        .route(
            "/api/networks/{netid}",
            get(networks::get_network).delete(networks::delete_network),
        )
        .route(
            "/api/tokens",
            post(tokens::create_token).get(tokens::list_tokens),
        )
        .route(
            "/api/tokens/{id}",
            axum::routing::delete(tokens::delete_token),
        )
        .route("/api/join", post(join::join))
        .route("/api/nodes", get(nodes::list_all_nodes))
        .route("/api/nodes/{netid}", get(nodes::list_nodes))
        .route(
            "/api/nodes/{netid}/{node}",
            get(nodes::get_node).delete(nodes::delete_node),
        )
        .route(
            "/api/nodes/{netid}/{node}/creategateway",
            post(gateways::create_gateway),
        )
        .route(
            "/api/nodes/{netid}/{node}/deletegateway",
            axum::routing::delete(gateways::delete_gateway),
        )
        .route("/api/gateways", get(gateways::list_gateways))
        .route(
            "/api/apitokens",
            post(apitokens::create_api_token).get(apitokens::list_api_tokens),
        )
        .route(
            "/api/apitokens/{id}",
            axum::routing::delete(apitokens::delete_api_token),
        )
        .route("/api/agent/state", get(agent::agent_state))
        .route("/api/agent/stream", get(agent::agent_stream))
        .route("/api/agent/report", post(agent::agent_report))
        .route("/api/agent/pulse", post(agent::agent_pulse))
        .fallback(|| async { Failure::not_found("no such API path") })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&ctl),
            authenticate,
        ))
        .layer(axum::middleware::from_fn(json_refusals))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&ctl),
            measure,
        ))
        .with_state(ctl)
}

/// Refusals made by axum itself (a path segment that is not UTF-8, a bad
/// query, a method the path does not take) come as plain text or empty:
/// they are made the documented `{"message": ...}` too.
async fn json_refusals(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let status = response.status();
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        // The rest of the body is never read: the connection cannot carry
        // another request, and a client told so will not try.
        closing(&mut response);
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let mut message = String::from_utf8_lossy(&text).trim().to_string();
    if message.is_empty() {
        message = status
            .canonical_reason()
            .unwrap_or("refused")
            .to_lowercase();
    }
    let mut fixed = Failure::new(status, message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            fixed.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fixed
}

/// Marks a response as the last on its connection (`Connection: close`);
/// hyper then closes it once the response is written.
fn closing(response: &mut Response) {
    response.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
}

async fn measure(State(ctl): State<Arc<Controller>>, request: Request, next: Next) -> Response {
    let start = Instant::now();
    let streaming = request.uri().path() == "/api/agent/stream";
    let response = next.run(request).await;
    if !streaming {
        ctl.metrics
            .observe(start.elapsed(), response.status().as_u16());
    }
    response
}

async fn health(State(ctl): State<Arc<Controller>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok", "revision": ctl.hub.revision()}))
}

/// Monitoring reads: the admin or a read key (a network-scoped key sees
/// only its network through the API, not the whole controller).
fn may_monitor(who: &Principal) -> Result<(), Failure> {
    match who {
        Principal::Admin | Principal::Read => Ok(()),
        _ => Err(Failure::forbidden(
            "metrics and the API document take an admin or read key",
        )),
    }
}

async fn openapi(Extension(who): Extension<Principal>) -> Result<Response, Failure> {
    may_monitor(&who)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document().to_string(),
    )
        .into_response())
}

async fn metrics(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
) -> Result<Response, Failure> {
    may_monitor(&who)?;
    let (online, total) = ctl.hub.online(now());
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ctl.metrics.render(online, total, ctl.hub.revision()),
    )
        .into_response())
}

#[derive(Deserialize)]
struct NetworkFilter {
    network: Option<String>,
}

/// Only used if a node vanished between a read and the write after it
/// (the agent's report, a gateway's health), which the write lock rules
/// out; a placeholder keeps it panic-free.
pub(crate) fn unreachable_view(id: &str) -> NodeView {
    NodeView::new(
        NodeRow {
            id: id.to_string(),
            network: String::new(),
            name: id.to_string(),
            public_key: String::new(),
            credential_hash: String::new(),
            address: None,
            address6: None,
            endpoint: None,
            endpoint6: None,
            listen_port: 0,
            tags: Vec::new(),
            created_at: 0,
        },
        None,
    )
}
