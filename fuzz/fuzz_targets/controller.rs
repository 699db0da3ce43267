//! Any bytes as the JSON body of every request the controller takes,
//! through its router and a store in memory, as the admin and as a node:
//! must never panic nor answer 5xx (a 5xx would mean the database failed,
//! and an in-memory SQLite does not).
#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use bgp4mesh_controller::api::{Controller, router};
use bgp4mesh_controller::store::Store;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const MASTER: &str = "fuzz-master-key-0123456789";

struct Setup {
    runtime: tokio::runtime::Runtime,
    controller: Arc<Controller>,
    node_key: String,
    node_id: String,
}

/// (method, path, whose key: true for the node's)
const ROUTES: &[(&str, &str, bool)] = &[
    ("POST", "/api/networks", false),
    ("POST", "/api/tokens", false),
    ("POST", "/api/join", false),
    ("POST", "/api/apitokens", false),
    ("POST", "/api/nodes/fz/{node}/creategateway", false),
    ("POST", "/api/agent/report", true),
    ("POST", "/api/agent/pulse", true),
    ("GET", "/api/tokens?network=", false),
    ("DELETE", "/api/tokens/", false),
    ("GET", "/api/nodes/", false),
];

async fn call(
    controller: &Arc<Controller>,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Vec<u8>) {
    let mut request = Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("method"))
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(k) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let request = request.body(Body::from(body)).expect("request");
    let response = router(Arc::clone(controller))
        .oneshot(request)
        .await
        .expect("infallible");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
        .await
        .expect("body");
    (status, bytes.to_vec())
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (controller, node_key, node_id) = runtime.block_on(async {
            let store = Store::open("sqlite::memory:").await.expect("store");
            let controller = Arc::new(
                Controller::new(store, MASTER.into(), "https://fuzz".into(), None)
                    .await
                    .expect("controller"),
            );
            let network = br#"{"netid":"fz","addressrange":"10.99.0.0/16","addressrange6":"fd99::/64"}"#;
            let (status, _) =
                call(&controller, "POST", "/api/networks", Some(MASTER), network.to_vec()).await;
            assert_eq!(status, StatusCode::OK);
            let (_, token) = call(
                &controller,
                "POST",
                "/api/tokens",
                Some(MASTER),
                br#"{"network":"fz"}"#.to_vec(),
            )
            .await;
            let token: serde_json::Value = serde_json::from_slice(&token).expect("token");
            let text = token["token"].as_str().expect("token text");
            let secret = enrollment_secret(text);
            let join = serde_json::json!({
                "secret": secret, "name": "n1",
                "public_key": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
            });
            let (status, joined) = call(
                &controller,
                "POST",
                "/api/join",
                None,
                join.to_string().into_bytes(),
            )
            .await;
            assert_eq!(status, StatusCode::OK);
            let joined: serde_json::Value = serde_json::from_slice(&joined).expect("joined");
            (
                controller,
                joined["credential"].as_str().expect("credential").to_string(),
                joined["node"]["id"].as_str().expect("id").to_string(),
            )
        });
        Setup {
            runtime,
            controller,
            node_key,
            node_id,
        }
    })
}

/// The secret inside an enrollment token (base64url JSON).
fn enrollment_secret(token: &str) -> String {
    use base64::Engine;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .expect("token base64");
    let value: serde_json::Value = serde_json::from_slice(&json).expect("token json");
    value["secret"].as_str().expect("secret").to_string()
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let setup = setup();
    let (method, path, as_node) = ROUTES[usize::from(pick) % ROUTES.len()];
    let mut path = path.replace("{node}", &setup.node_id);
    if path.ends_with('/') || path.ends_with('=') {
        // The body's first bytes as a path segment or query value.
        let segment: String = body
            .iter()
            .take(40)
            .map(|b| format!("%{b:02X}"))
            .collect();
        path.push_str(&segment);
    }
    let key = if as_node { &setup.node_key } else { MASTER };
    let (status, reply) = setup.runtime.block_on(call(
        &setup.controller,
        method,
        &path,
        Some(key),
        body.to_vec(),
    ));
    assert!(
        !status.is_server_error(),
        "{method} {path}: {status} {}",
        String::from_utf8_lossy(&reply)
    );
    if status != StatusCode::OK && status != StatusCode::NO_CONTENT {
        let message: serde_json::Value = serde_json::from_slice(&reply).expect("a JSON refusal");
        assert!(message["message"].is_string(), "{status}: {message}");
    }
});
