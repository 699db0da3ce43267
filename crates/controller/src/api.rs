//! The REST API (JSON) and the agents' push stream.
//!
//! Every refusal is JSON `{"message": ...}` with a 4xx status: 400 for a
//! bad field (the message names it), 401 for a missing or unknown
//! credential, 403 for one that may not do this, 404, 409 for a conflict
//! with what exists. A 500 only means the database failed.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bgp4mesh_api::{
    ApiError, ApiToken, ApiTokenCreate, EnrollmentToken, GatewayCreate, JoinRequest, JoinResponse,
    NetworkCreate, NodeReport, PeerHandshake, StreamEvent, Token, TokenCreate,
};
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::connections::ConnectionHandle;
use crate::hub::{Hub, NodeView, render_gateway, render_network, render_node};
use crate::metrics::Metrics;
use crate::store::{
    ApiTokenRow, GatewayRow, JoinRefusal, NetworkRow, NodeRow, Store, StoreError, TokenRefusal,
    TokenRow,
};
use crate::{ipam, secrets};

pub struct Controller {
    pub store: Store,
    pub hub: Hub,
    master_key: String,
    /// The URL enrollment tokens point at.
    pub public_url: String,
    /// The certificate fingerprint enrollment tokens carry.
    pub fingerprint: Option<String>,
    /// Writes go one at a time: revisions reach the hub in order.
    write: tokio::sync::Mutex<()>,
    pub metrics: Metrics,
    /// Gateways whose health change could not be recorded (a store error):
    /// the pulse watchdog tries again, so nodes do not keep a stale exit.
    unpublished: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
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
    message: String,
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

/// Who the request's key belongs to. Gateways are found in memory first
/// for the agent API: their pulses must not wait on the store (a stalled
/// store would otherwise silence every gateway at once).
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
        .route("/api/networks", post(create_network).get(list_networks))
        .route(
            "/api/networks/{netid}",
            get(get_network).delete(delete_network),
        )
        .route("/api/tokens", post(create_token).get(list_tokens))
        .route("/api/tokens/{id}", axum::routing::delete(delete_token))
        .route("/api/join", post(join))
        .route("/api/nodes", get(list_all_nodes))
        .route("/api/nodes/{netid}", get(list_nodes))
        .route(
            "/api/nodes/{netid}/{node}",
            get(get_node).delete(delete_node),
        )
        .route(
            "/api/nodes/{netid}/{node}/creategateway",
            post(create_gateway),
        )
        .route(
            "/api/nodes/{netid}/{node}/deletegateway",
            axum::routing::delete(delete_gateway),
        )
        .route("/api/gateways", get(list_gateways))
        .route(
            "/api/apitokens",
            post(create_api_token).get(list_api_tokens),
        )
        .route(
            "/api/apitokens/{id}",
            axum::routing::delete(delete_api_token),
        )
        .route("/api/agent/state", get(agent_state))
        .route("/api/agent/stream", get(agent_stream))
        .route("/api/agent/report", post(agent_report))
        .route("/api/agent/pulse", post(agent_pulse))
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

// ---------------------------------------------------------------------------
// Networks

fn check_netid(netid: &str) -> Result<(), Failure> {
    let ok = !netid.is_empty()
        && netid.len() <= 32
        && !netid.starts_with('-')
        && netid
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Failure::bad(format!(
            "netid {netid:?}: 1 to 32 characters, lowercase letters, digits and '-'"
        )))
    }
}

fn parse_range4(text: &str) -> Result<Ipv4Net, Failure> {
    let net: Ipv4Net = text.parse().map_err(|_| {
        Failure::bad(format!(
            "addressrange {text:?} is not an IPv4 prefix (like 44.30.127.0/24)"
        ))
    })?;
    if net.trunc() != net {
        return Err(Failure::bad(format!(
            "addressrange {net} has host bits set; the network is {}",
            net.trunc()
        )));
    }
    Ok(net)
}

fn parse_range6(text: &str) -> Result<Ipv6Net, Failure> {
    let net: Ipv6Net = text.parse().map_err(|_| {
        Failure::bad(format!(
            "addressrange6 {text:?} is not an IPv6 prefix (like fd44::/64)"
        ))
    })?;
    if net.trunc() != net {
        return Err(Failure::bad(format!(
            "addressrange6 {net} has host bits set; the network is {}",
            net.trunc()
        )));
    }
    Ok(net)
}

async fn create_network(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    json: Result<Json<NetworkCreate>, JsonRejection>,
) -> Reply<bgp4mesh_api::Network> {
    may_manage(&who, None, false)?;
    let req = body(json)?;
    check_netid(&req.netid)?;
    let range4 = req.addressrange.as_deref().map(parse_range4).transpose()?;
    let range6 = req.addressrange6.as_deref().map(parse_range6).transpose()?;
    if range4.is_none() && range6.is_none() {
        return Err(Failure::bad(
            "a network needs addressrange (IPv4) or addressrange6 (IPv6)",
        ));
    }
    if req.mtu.is_some_and(|m| !(1280..=9000).contains(&m)) {
        return Err(Failure::bad("mtu: 1280 to 9000"));
    }
    if req.listen_port == Some(0) {
        return Err(Failure::bad("listen_port: 1 to 65535"));
    }
    let _write = ctl.write.lock().await;
    for other in ctl.store.networks().await? {
        if other.netid == req.netid {
            return Err(Failure::conflict(format!("network {:?} exists", req.netid)));
        }
        let overlaps4 = range4
            .zip(
                other
                    .addressrange
                    .as_deref()
                    .and_then(|r| r.parse::<IpNet>().ok()),
            )
            .is_some_and(|(a, b)| IpNet::V4(a).contains(&b) || b.contains(&IpNet::V4(a)));
        let overlaps6 = range6
            .zip(
                other
                    .addressrange6
                    .as_deref()
                    .and_then(|r| r.parse::<IpNet>().ok()),
            )
            .is_some_and(|(a, b)| IpNet::V6(a).contains(&b) || b.contains(&IpNet::V6(a)));
        if overlaps4 || overlaps6 {
            return Err(Failure::conflict(format!(
                "the address range overlaps network {:?} ({})",
                other.netid,
                [
                    other.addressrange.as_deref(),
                    other.addressrange6.as_deref()
                ]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(", ")
            )));
        }
    }
    let row = NetworkRow {
        netid: req.netid.clone(),
        addressrange: range4.map(|r| r.to_string()),
        addressrange6: range6.map(|r| r.to_string()),
        mtu: req.mtu.unwrap_or(1420),
        listen_port: req.listen_port.unwrap_or(51820),
        persistent_keepalive: req.persistent_keepalive.unwrap_or(20),
        created_at: now(),
    };
    let revision = ctl.store.create_network(&row, now()).await?;
    ctl.hub.network_created(revision, row.clone());
    tracing::info!(netid = %row.netid, "network created");
    Ok(Json(render_network(&row, 0)))
}

async fn list_networks(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
) -> Reply<Vec<bgp4mesh_api::Network>> {
    let principal = who;
    let networks = ctl.store.networks().await?;
    let visible = networks.iter().filter(|n| match &principal {
        Principal::Admin | Principal::Read => true,
        Principal::Network(id) => *id == n.netid,
        Principal::Node(node) => node.network == n.netid,
    });
    Ok(Json(
        visible
            .map(|n| render_network(n, ctl.hub.node_count(&n.netid)))
            .collect(),
    ))
}

async fn get_network(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path(netid): Path<String>,
) -> Reply<bgp4mesh_api::Network> {
    may_manage(&who, Some(&netid), true)?;
    let n = ctl
        .store
        .network(&netid)
        .await?
        .ok_or_else(|| Failure::not_found(format!("no network {netid:?}")))?;
    Ok(Json(render_network(&n, ctl.hub.node_count(&netid))))
}

async fn delete_network(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path(netid): Path<String>,
) -> Result<StatusCode, Failure> {
    may_manage(&who, None, false)?;
    let _write = ctl.write.lock().await;
    let revision = ctl.store.delete_network(&netid, now()).await?;
    ctl.hub.network_deleted(revision, &netid);
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------
// Enrollment tokens

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

async fn create_token(
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
    let token = EnrollmentToken {
        server: ctl.public_url.clone(),
        fingerprint: ctl.fingerprint.clone(),
        network: req.network,
        secret,
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

#[derive(Deserialize)]
struct NetworkFilter {
    network: Option<String>,
}

async fn list_tokens(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Query(filter): Query<NetworkFilter>,
) -> Reply<Vec<Token>> {
    may_manage(&who, filter.network.as_deref(), true)?;
    let rows = ctl.store.tokens(filter.network.as_deref()).await?;
    Ok(Json(rows.iter().map(|t| render_token(t, None)).collect()))
}

async fn delete_token(
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

// ---------------------------------------------------------------------------
// Joining

fn check_name(name: &str) -> Result<(), Failure> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(Failure::bad(format!(
            "name {name:?}: 1 to 63 letters, digits, '-', '_' or '.'"
        )))
    }
}

fn check_public_key(key: &str) -> Result<(), Failure> {
    match STANDARD.decode(key.trim()) {
        Ok(bytes) if bytes.len() == 32 => Ok(()),
        _ => Err(Failure::bad(format!(
            "public_key {key:?} is not a WireGuard public key (44 characters of base64)"
        ))),
    }
}

/// An address peers can send to: not unspecified, multicast or
/// broadcast, and not port 0.
fn check_endpoint(endpoint: &str) -> Result<(), Failure> {
    let (ip, port) = match endpoint.parse::<SocketAddr>() {
        Ok(a) => (a.ip(), Some(a.port())),
        Err(_) => match endpoint.parse::<IpAddr>() {
            Ok(ip) => (ip, None),
            Err(_) => {
                return Err(Failure::bad(format!(
                    "endpoint {endpoint:?} is not IP or IP:port"
                )));
            }
        },
    };
    let broadcast = matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if ip.is_unspecified() || ip.is_multicast() || broadcast || port == Some(0) {
        return Err(Failure::bad(format!(
            "endpoint {endpoint:?}: not an address peers can send to"
        )));
    }
    Ok(())
}

async fn join(
    State(ctl): State<Arc<Controller>>,
    json: Result<Json<JoinRequest>, JsonRejection>,
) -> Reply<JoinResponse> {
    let req = body(json)?;
    check_name(&req.name)?;
    check_public_key(&req.public_key)?;
    if req.listen_port == Some(0) {
        return Err(Failure::bad("listen_port: 1 to 65535"));
    }
    if let Some(e) = &req.endpoint {
        check_endpoint(e)?;
    }
    let credential = secrets::new_secret();
    let node = NodeRow {
        id: secrets::new_id(),
        network: String::new(),
        name: req.name.clone(),
        public_key: req.public_key.trim().to_string(),
        credential_hash: secrets::hash(&credential),
        address: None,
        address6: None,
        endpoint: req.endpoint.clone(),
        listen_port: 0,
        tags: Vec::new(),
        // Milliseconds: nodes are listed in join order, and seconds would
        // tie for nodes that join together.
        created_at: now_millis(),
    };
    let _write = ctl.write.lock().await;
    // Names and keys are unique per network; say so before the database
    // would, in words.
    let duplicate = |net: &NetworkRow, node: &NodeRow| -> Result<(), String> {
        match ctl.hub.taken(&net.netid, &node.name, &node.public_key) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    };
    let pinned4 = req.address;
    let pinned6 = req.address6;
    let listen_port = req.listen_port;
    let outcome = ctl
        .store
        .join(
            &secrets::hash(&req.secret),
            now(),
            node,
            |netid| ctl.hub.used_addresses(netid),
            |net, used4, used6, node| {
                duplicate(net, node).map_err(|m| format!("conflict: {m}"))?;
                node.listen_port = listen_port.unwrap_or(net.listen_port);
                if let Some(range) = net.addressrange.as_deref().and_then(|r| r.parse().ok()) {
                    node.address = Some(match pinned4 {
                        Some(a) => ipam::check_pinned_v4(range, used4, a),
                        None => ipam::allocate_v4(range, used4),
                    }?);
                } else if pinned4.is_some() {
                    return Err("the network has no IPv4 range".into());
                }
                if let Some(range) = net.addressrange6.as_deref().and_then(|r| r.parse().ok()) {
                    node.address6 = Some(match pinned6 {
                        Some(a) => ipam::check_pinned_v6(range, used6, a),
                        None => ipam::allocate_v6(range, used6),
                    }?);
                } else if pinned6.is_some() {
                    return Err("the network has no IPv6 range".into());
                }
                Ok(())
            },
        )
        .await?;
    let (node, revision) = match outcome {
        Ok(done) => done,
        Err(JoinRefusal::Token(TokenRefusal::Unknown)) => {
            return Err(Failure::unauthorized("unknown enrollment token"));
        }
        Err(JoinRefusal::Token(TokenRefusal::Expired)) => {
            return Err(Failure::unauthorized("the enrollment token has expired"));
        }
        Err(JoinRefusal::Token(TokenRefusal::UsedUp)) => {
            return Err(Failure::forbidden("the enrollment token is used up"));
        }
        Err(JoinRefusal::Address(why)) => {
            return Err(match why.strip_prefix("conflict: ") {
                Some(m) => Failure::conflict(m),
                None if why.contains("in use") || why.contains("exhausted") => {
                    Failure::conflict(why)
                }
                None => Failure::bad(why),
            });
        }
    };
    let view = NodeView::new(node.clone(), None);
    ctl.hub
        .node_changed(revision, &node.network, &node.id, |_| view.clone());
    let network = ctl
        .store
        .network(&node.network)
        .await?
        .ok_or_else(|| Failure::not_found("the network went away"))?;
    tracing::info!(node = %node.name, network = %node.network, address = ?node.address, "node joined");
    Ok(Json(JoinResponse {
        node: render_node(&network, &view, now()),
        credential,
        network: render_network(&network, ctl.hub.node_count(&network.netid)),
    }))
}

// ---------------------------------------------------------------------------
// Nodes and gateways

async fn list_all_nodes(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
) -> Reply<Vec<bgp4mesh_api::Node>> {
    may_manage(&who, None, true)?;
    let t = now();
    Ok(Json(
        ctl.hub
            .nodes(None)
            .iter()
            .map(|(net, n)| render_node(net, n, t))
            .collect(),
    ))
}

async fn list_nodes(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path(netid): Path<String>,
) -> Reply<Vec<bgp4mesh_api::Node>> {
    may_manage(&who, Some(&netid), true)?;
    if ctl.store.network(&netid).await?.is_none() {
        return Err(Failure::not_found(format!("no network {netid:?}")));
    }
    let t = now();
    Ok(Json(
        ctl.hub
            .nodes(Some(&netid))
            .iter()
            .map(|(net, n)| render_node(net, n, t))
            .collect(),
    ))
}

async fn find_node(
    ctl: &Controller,
    netid: &str,
    node: &str,
) -> Result<(NetworkRow, NodeView), Failure> {
    let network = ctl
        .store
        .network(netid)
        .await?
        .ok_or_else(|| Failure::not_found(format!("no network {netid:?}")))?;
    let view = ctl
        .hub
        .find(netid, node)
        .ok_or_else(|| Failure::not_found(format!("no node {node:?} in network {netid:?}")))?;
    Ok((network, view))
}

async fn get_node(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path((netid, node)): Path<(String, String)>,
) -> Reply<bgp4mesh_api::Node> {
    may_manage(&who, Some(&netid), true)?;
    let (network, view) = find_node(&ctl, &netid, &node).await?;
    Ok(Json(render_node(&network, &view, now())))
}

async fn delete_node(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path((netid, node)): Path<(String, String)>,
) -> Result<StatusCode, Failure> {
    may_manage(&who, Some(&netid), false)?;
    let _write = ctl.write.lock().await;
    let (_, view) = find_node(&ctl, &netid, &node).await?;
    let (_, revision) = ctl.store.delete_node(&view.row.id, now()).await?;
    ctl.hub.node_removed(revision, &netid, &view.row.id);
    tracing::info!(node = %view.row.name, network = %netid, "node deleted");
    Ok(StatusCode::NO_CONTENT)
}

async fn create_gateway(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path((netid, node)): Path<(String, String)>,
    json: Result<Json<GatewayCreate>, JsonRejection>,
) -> Reply<bgp4mesh_api::Node> {
    may_manage(&who, Some(&netid), false)?;
    let req = body(json)?;
    if req.ranges.is_empty() && !req.bgp {
        return Err(Failure::bad(
            "ranges: at least one prefix (0.0.0.0/0 for everything), or bgp: true for the ranges the node learns by BGP",
        ));
    }
    if req.ranges.len() > MAX_GATEWAY_RANGES {
        return Err(Failure::bad(format!(
            "ranges: {} ranges, at most {MAX_GATEWAY_RANGES} (use bgp: true for more)",
            req.ranges.len()
        )));
    }
    let mut nets = Vec::new();
    for r in &req.ranges {
        let shown: String = r.chars().take(64).collect();
        let net: IpNet = r
            .parse()
            .map_err(|_| Failure::bad(format!("ranges: {shown:?} is not a prefix")))?;
        if net.trunc() != net {
            return Err(Failure::bad(format!(
                "ranges: {net} has host bits set; the network is {}",
                net.trunc()
            )));
        }
        nets.push(net);
    }
    let _write = ctl.write.lock().await;
    let (network, view) = find_node(&ctl, &netid, &node).await?;
    for net in &nets {
        egress_range_allowed(&network, net)
            .map_err(|why| Failure::bad(format!("ranges: {net} {why}")))?;
    }
    nets.sort();
    nets.dedup();
    let ranges: Vec<String> = nets.iter().map(ToString::to_string).collect();
    let gateway = GatewayRow {
        node_id: view.row.id.clone(),
        ranges,
        nat: req.nat_enabled,
        metric: req.metric.unwrap_or(256),
        bgp: req.bgp,
    };
    let revision = ctl.store.set_gateway(&gateway, &netid, now()).await?;
    let mut updated = view.clone();
    updated.gateway = Some(gateway.clone());
    let id = view.row.id.clone();
    ctl.hub.node_changed(revision, &netid, &id, |old| {
        let mut n = old.unwrap_or(view);
        n.gateway = Some(gateway);
        // Pulses count from the next one: an old one must not silence it.
        n.last_pulse = None;
        n.silent = false;
        n
    });
    Ok(Json(render_node(&network, &updated, now())))
}

/// The most static ranges one gateway may carry (BGP-learned ones have
/// their own cap, `bgp4mesh_api::MAX_BGP_RANGES`).
const MAX_GATEWAY_RANGES: usize = 1000;

/// Whether nodes may send `range` to a gateway. Refused, with the reason:
/// ranges inside the network's own address ranges (those addresses are
/// the nodes', each reached directly: a gateway claiming one would pull
/// another node's traffic to itself), and ranges inside loopback,
/// link-local, multicast, `0.0.0.0/8` or `240.0.0.0/4` (never routed).
/// Wider ranges (0.0.0.0/0, an aggregate holding the mesh) are fine:
/// nodes keep their mesh's own addresses out of the tunnel to a gateway.
pub fn egress_range_allowed(network: &NetworkRow, range: &IpNet) -> Result<(), String> {
    let own = [
        network.addressrange.as_deref(),
        network.addressrange6.as_deref(),
    ];
    for mesh in own
        .into_iter()
        .flatten()
        .filter_map(|r| r.parse::<IpNet>().ok())
    {
        if mesh.contains(range) {
            return Err(format!(
                "is inside the network's own range {mesh}: those addresses are its nodes'"
            ));
        }
    }
    const NEVER_ROUTED: [(&str, &str); 9] = [
        ("0.0.0.0/8", "\"this network\""),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved (and broadcast)"),
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link-local"),
        ("ff00::/8", "multicast"),
    ];
    for (block, what) in NEVER_ROUTED {
        if let Ok(block) = block.parse::<IpNet>()
            && block.contains(range)
        {
            return Err(format!("is {what} ({block}), never routed"));
        }
    }
    Ok(())
}

async fn delete_gateway(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path((netid, node)): Path<(String, String)>,
) -> Reply<bgp4mesh_api::Node> {
    may_manage(&who, Some(&netid), false)?;
    let _write = ctl.write.lock().await;
    let (network, view) = find_node(&ctl, &netid, &node).await?;
    let revision = ctl
        .store
        .delete_gateway(&view.row.id, &netid, now())
        .await?;
    let mut updated = view.clone();
    updated.gateway = None;
    let id = view.row.id.clone();
    ctl.hub.node_changed(revision, &netid, &id, |old| {
        let mut n = old.unwrap_or(view);
        n.gateway = None;
        n
    });
    Ok(Json(render_node(&network, &updated, now())))
}

async fn list_gateways(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Query(filter): Query<NetworkFilter>,
) -> Reply<Vec<serde_json::Value>> {
    may_manage(&who, filter.network.as_deref(), true)?;
    Ok(Json(
        ctl.hub
            .nodes(filter.network.as_deref())
            .iter()
            .filter_map(|(_, n)| {
                let g = render_gateway(n)?;
                Some(serde_json::json!({
                    "node": n.row.id, "name": n.row.name, "network": n.row.network,
                    "gateway": g,
                }))
            })
            .collect(),
    ))
}

// ---------------------------------------------------------------------------
// Admin API tokens

async fn create_api_token(
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

async fn list_api_tokens(
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

async fn delete_api_token(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, Failure> {
    may_manage(&who, None, false)?;
    ctl.store.delete_api_token(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------
// The agent API

async fn agent_state(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
) -> Reply<bgp4mesh_api::MeshState> {
    let node = as_node(&who)?;
    ctl.hub
        .state(&node.network, &node.id, now())
        .map(Json)
        .ok_or_else(|| Failure::not_found("the node is no longer in its network"))
}

#[derive(Deserialize)]
struct Since {
    since: Option<u64>,
}

/// Server-sent events: `id: <revision>` and `data: <StreamEvent JSON>`.
async fn agent_stream(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Query(since): Query<Since>,
) -> Result<Response, Failure> {
    let node = as_node(&who)?;
    let sub = ctl
        .hub
        .subscribe(&node.network, &node.id, since.since, now())
        .ok_or_else(|| Failure::not_found("the node is no longer in its network"))?;
    let guard = ctl.metrics.stream_opened();
    ctl.stream_changed(&node, 1).await?;
    let presence = Presence {
        ctl: Arc::clone(&ctl),
        node: node.clone(),
    };
    struct Stream {
        ctl: Arc<Controller>,
        node: NodeRow,
        queue: VecDeque<StreamEvent>,
        live: tokio::sync::broadcast::Receiver<Arc<crate::hub::Change>>,
        last: u64,
        heartbeat: tokio::time::Interval,
        done: bool,
        _guard: crate::metrics::StreamGuard,
        _presence: Presence,
    }
    let mut heartbeat = tokio::time::interval(Duration::from_secs(15));
    heartbeat.reset();
    let state = Stream {
        ctl: Arc::clone(&ctl),
        node,
        queue: sub.initial.into(),
        live: sub.live,
        last: sub.last_revision,
        heartbeat,
        done: false,
        _guard: guard,
        _presence: presence,
    };
    let events = futures::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            if let Some(event) = s.queue.pop_front() {
                if matches!(event, StreamEvent::Removed { .. }) {
                    s.done = true;
                }
                let frame = format!(
                    "id: {}\ndata: {}\n\n",
                    event.revision(),
                    serde_json::to_string(&event).unwrap_or_default()
                );
                return Some((Ok::<_, std::convert::Infallible>(frame), s));
            }
            tokio::select! {
                message = s.live.recv() => match message {
                    Ok(change) => {
                        if change.revision <= s.last {
                            continue;
                        }
                        s.last = change.revision;
                        if let Some(event) = s.ctl.hub.event_for(&s.node.network, &change, &s.node.id, now()) {
                            s.queue.push_back(event);
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        // Too slow for the live changes: start over.
                        match s.ctl.hub.state(&s.node.network, &s.node.id, now()) {
                            Some(state) => {
                                s.last = state.revision;
                                s.queue.push_back(StreamEvent::Snapshot(state));
                            }
                            None => s.queue.push_back(StreamEvent::Removed { revision: s.last }),
                        }
                    }
                    Err(RecvError::Closed) => {
                        s.queue.push_back(StreamEvent::Removed { revision: s.last });
                    }
                },
                _ = s.heartbeat.tick() => {
                    s.queue.push_back(StreamEvent::Heartbeat { revision: s.last });
                }
            }
        }
    });
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(events))
        .unwrap_or_else(|_| Failure::bad("stream").into_response()))
}

/// While an agent's stream is open its node counts as present; when the
/// stream ends (the node died, or lost the controller) a gateway is marked
/// unhealthy so nodes move to the next one.
struct Presence {
    ctl: Arc<Controller>,
    node: NodeRow,
}

impl Drop for Presence {
    fn drop(&mut self) {
        let ctl = Arc::clone(&self.ctl);
        let node = self.node.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // shutting down: nobody is left to tell
        };
        runtime.spawn(async move {
            if let Err(e) = ctl.stream_changed(&node, -1).await {
                tracing::warn!(node = %node.name, "marking the stream closed: {}", e.message);
            }
        });
    }
}

impl Controller {
    async fn stream_changed(&self, node: &NodeRow, delta: i32) -> Result<(), Failure> {
        let _write = self.write.lock().await;
        if self.hub.stream_changed(&node.network, &node.id, delta) {
            self.publish_health(node).await?;
        }
        Ok(())
    }

    /// Marks gateways whose pulses stopped as unhealthy, every 50 ms, for
    /// as long as the controller runs.
    pub async fn watch_pulses(self: Arc<Self>) {
        const EVERY: Duration = Duration::from_millis(50);
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            tick.tick().await;
            // A watchdog that was itself held up (an overloaded runtime)
            // saw nothing: pulses may be waiting to be handled.
            let late = last.elapsed() > EVERY * 3;
            last = Instant::now();
            if late {
                continue;
            }
            let quiet = self
                .hub
                .silence_quiet_gateways(Instant::now(), bgp4mesh_api::PULSE_LOST);
            let retry: Vec<(String, String)> = self
                .unpublished
                .lock()
                .map(|left| left.iter().cloned().collect())
                .unwrap_or_default();
            if quiet.is_empty() && retry.is_empty() {
                continue;
            }
            let _write = self.write.lock().await;
            let marked = quiet.iter().map(|q| (q, true));
            for ((netid, id), silenced) in marked.chain(retry.iter().map(|r| (r, false))) {
                let Some(node) = self.hub.node(netid, id) else {
                    if let Ok(mut left) = self.unpublished.lock() {
                        left.remove(&(netid.clone(), id.clone()));
                    }
                    continue;
                };
                if silenced {
                    tracing::warn!(
                        node = %node.row.name,
                        "no pulse for {:?}: taken as dead",
                        bgp4mesh_api::PULSE_LOST
                    );
                }
                if let Err(e) = self.publish_health(&node.row).await {
                    tracing::warn!(node = %node.row.name, "publishing its health: {}", e.message);
                }
            }
        }
    }

    /// A gateway's health changed: a change every node of the network sees.
    async fn publish_health(&self, node: &NodeRow) -> Result<(), Failure> {
        let key = (node.network.clone(), node.id.clone());
        let revision = match self
            .store
            .note_change(&node.network, &node.id, "gateway_health", now())
            .await
        {
            Ok(r) => r,
            Err(e) => {
                if let Ok(mut left) = self.unpublished.lock() {
                    left.insert(key);
                }
                return Err(e.into());
            }
        };
        if let Ok(mut left) = self.unpublished.lock() {
            left.remove(&key);
        }
        let id = node.id.clone();
        self.hub
            .node_changed(revision, &node.network, &node.id, |old| {
                old.unwrap_or_else(|| unreachable_view(&id))
            });
        tracing::info!(node = %node.name, "gateway health changed");
        Ok(())
    }
}

/// A gateway's sign of life (`bgp4mesh_api::Pulse`): several a second, so
/// a gateway that dies without closing its stream is left within
/// `PULSE_LOST` (see `Controller::watch_pulses`).
async fn agent_pulse(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    json: Result<Json<bgp4mesh_api::Pulse>, JsonRejection>,
) -> Result<StatusCode, Failure> {
    // `authenticate` found a gateway in memory (`principal`).
    let node = as_node(&who)?;
    let pulse = body(json)?;
    let at = Instant::now();
    if ctl.hub.pulsed(&node.network, &node.id, at, pulse.upstream) {
        let _write = ctl.write.lock().await;
        ctl.publish_health(&node).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A border's BGP-learned ranges: networks (no host bits), at most
/// `MAX_BGP_RANGES`; returned sorted and unique.
fn check_bgp_ranges(ranges: &[IpNet]) -> Result<Vec<IpNet>, Failure> {
    if ranges.len() > bgp4mesh_api::MAX_BGP_RANGES {
        return Err(Failure::bad(format!(
            "bgp_ranges: {} ranges, at most {} (narrow the [mesh] export policy)",
            ranges.len(),
            bgp4mesh_api::MAX_BGP_RANGES
        )));
    }
    if let Some(r) = ranges.iter().find(|r| r.trunc() != **r) {
        return Err(Failure::bad(format!(
            "bgp_ranges: {r} has host bits set; the network is {}",
            r.trunc()
        )));
    }
    let mut ranges = ranges.to_vec();
    ranges.sort();
    ranges.dedup();
    Ok(ranges)
}

async fn agent_report(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    json: Result<Json<NodeReport>, JsonRejection>,
) -> Result<StatusCode, Failure> {
    let node = as_node(&who)?;
    let report = body(json)?;
    if let Some(e) = &report.endpoint {
        check_endpoint(e)?;
    }
    if report.listen_port == Some(0) {
        return Err(Failure::bad("listen_port: 1 to 65535"));
    }
    let bgp_ranges = match &report.bgp_ranges {
        Some(ranges) => {
            let mut ranges = check_bgp_ranges(ranges)?;
            // What a border learns by BGP may hold the mesh's own
            // addresses (a friend announcing them): never an exit for them.
            if let Some(network) = ctl.store.network(&node.network).await? {
                let mut first = None;
                let before = ranges.len();
                ranges.retain(|r| {
                    let why = egress_range_allowed(&network, r).err();
                    if first.is_none() {
                        first = why.as_ref().map(|w| format!("{r} {w}"));
                    }
                    why.is_none()
                });
                if let Some(first) = first {
                    tracing::debug!(
                        node = %node.name,
                        "{} BGP-learned ranges left out; the first: {first}",
                        before - ranges.len()
                    );
                }
            }
            Some(ranges)
        }
        None => None,
    };
    let peers = ctl.hub.nodes(Some(&node.network));
    let by_key = |key: &str| {
        peers
            .iter()
            .find(|(_, n)| n.row.public_key == key)
            .map(|(_, n)| n.row.id.clone())
    };
    let mut handshakes = Vec::new();
    let mut observed = Vec::new();
    for p in &report.peers {
        let Some(id) = by_key(&p.public_key) else {
            continue;
        };
        if let Some(e) = &p.endpoint
            && e.parse::<SocketAddr>().is_ok()
        {
            observed.push((id.clone(), e.clone()));
        }
        handshakes.push(PeerHandshake {
            peer: id,
            last_handshake: p.last_handshake,
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
        });
    }
    let _write = ctl.write.lock().await;
    let t = now();
    if ctl
        .hub
        .upstream_reported(&node.network, &node.id, report.upstream)
    {
        ctl.publish_health(&node).await?;
    }
    if let Some(ranges) = bgp_ranges
        && ctl.hub.bgp_ranges_reported(&node.network, &node.id, ranges)
    {
        let revision = ctl
            .store
            .note_change(&node.network, &node.id, "gateway_bgp_ranges", now())
            .await?;
        let id = node.id.clone();
        ctl.hub
            .node_changed(revision, &node.network, &node.id, |old| {
                old.unwrap_or_else(|| unreachable_view(&id))
            });
        tracing::info!(node = %node.name, "BGP-learned egress ranges changed");
    }
    let changed = ctl
        .hub
        .node_reported(&node.network, &node.id, t, handshakes, observed);
    for peer_id in changed {
        let revision = ctl
            .store
            .note_change(&node.network, &peer_id, "endpoint_observed", t)
            .await?;
        ctl.hub
            .node_changed(revision, &node.network, &peer_id, |old| {
                old.unwrap_or_else(|| unreachable_view(&peer_id))
            });
    }
    let published_changed = report.endpoint.is_some() && report.endpoint != node.endpoint
        || report.listen_port.is_some_and(|p| p != node.listen_port);
    if published_changed {
        let endpoint = report.endpoint.clone().or(node.endpoint.clone());
        let port = report.listen_port.unwrap_or(node.listen_port);
        let revision = ctl
            .store
            .update_node_endpoint(&node.id, &node.network, endpoint.as_deref(), port, t)
            .await?;
        ctl.hub
            .node_changed(revision, &node.network, &node.id, |old| {
                let mut n = old.unwrap_or_else(|| unreachable_view(&node.id));
                n.row.endpoint = endpoint;
                n.row.listen_port = port;
                n
            });
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Only used if a node vanished between the read and the write above,
/// which the write lock rules out; a placeholder keeps it panic-free.
fn unreachable_view(id: &str) -> NodeView {
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
            listen_port: 0,
            tags: Vec::new(),
            created_at: 0,
        },
        None,
    )
}
