//! The OpenAPI 3.0 description served at /api/openapi.json. Written by hand
//! from the router; a test checks that every route is described.

use serde_json::{Value, json};

/// One route: method, path, summary, request schema, response schema.
pub type Route = (
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
);

/// Every route of the router.
pub const ROUTES: &[Route] = &[
    (
        "get",
        "/api/health",
        "Liveness and the current revision",
        None,
        None,
    ),
    ("get", "/api/openapi.json", "This document", None, None),
    ("get", "/metrics", "Prometheus metrics", None, None),
    (
        "post",
        "/api/networks",
        "Create a network",
        Some("NetworkCreate"),
        Some("Network"),
    ),
    (
        "get",
        "/api/networks",
        "List networks",
        None,
        Some("Network[]"),
    ),
    (
        "get",
        "/api/networks/{netid}",
        "One network",
        None,
        Some("Network"),
    ),
    (
        "delete",
        "/api/networks/{netid}",
        "Delete a network with its nodes and tokens",
        None,
        None,
    ),
    (
        "post",
        "/api/tokens",
        "Create an enrollment token",
        Some("TokenCreate"),
        Some("Token"),
    ),
    (
        "get",
        "/api/tokens",
        "List enrollment tokens (?network=)",
        None,
        Some("Token[]"),
    ),
    (
        "delete",
        "/api/tokens/{id}",
        "Delete an enrollment token",
        None,
        None,
    ),
    (
        "post",
        "/api/join",
        "A node joins with an enrollment token's secret",
        Some("JoinRequest"),
        Some("JoinResponse"),
    ),
    ("get", "/api/nodes", "List all nodes", None, Some("Node[]")),
    (
        "get",
        "/api/nodes/{netid}",
        "List a network's nodes",
        None,
        Some("Node[]"),
    ),
    (
        "get",
        "/api/nodes/{netid}/{node}",
        "One node (by id or name)",
        None,
        Some("Node"),
    ),
    (
        "delete",
        "/api/nodes/{netid}/{node}",
        "Delete a node; its address is released",
        None,
        None,
    ),
    (
        "post",
        "/api/nodes/{netid}/{node}/creategateway",
        "Make a node an egress gateway",
        Some("GatewayCreate"),
        Some("Node"),
    ),
    (
        "delete",
        "/api/nodes/{netid}/{node}/deletegateway",
        "Stop a node being an egress gateway",
        None,
        Some("Node"),
    ),
    (
        "get",
        "/api/gateways",
        "List egress gateways (?network=)",
        None,
        None,
    ),
    (
        "post",
        "/api/apitokens",
        "Create a scoped API token",
        Some("ApiTokenCreate"),
        Some("ApiToken"),
    ),
    (
        "get",
        "/api/apitokens",
        "List API tokens",
        None,
        Some("ApiToken[]"),
    ),
    (
        "delete",
        "/api/apitokens/{id}",
        "Delete an API token",
        None,
        None,
    ),
    (
        "get",
        "/api/agent/state",
        "The calling node's mesh state (node credential)",
        None,
        Some("MeshState"),
    ),
    (
        "get",
        "/api/agent/stream",
        "Server-sent events: a snapshot, then changes (?since=REVISION)",
        None,
        Some("StreamEvent"),
    ),
    (
        "post",
        "/api/agent/report",
        "The calling node reports endpoints and handshakes",
        Some("NodeReport"),
        None,
    ),
    (
        "post",
        "/api/agent/pulse",
        "The calling gateway or relay is alive (several a second; silence for 600 ms makes a gateway unhealthy, a relay not live)",
        Some("Pulse"),
        None,
    ),
];

fn schema_ref(name: &str) -> Value {
    match name.strip_suffix("[]") {
        Some(item) => {
            json!({"type": "array", "items": {"$ref": format!("#/components/schemas/{item}")}})
        }
        None => json!({"$ref": format!("#/components/schemas/{name}")}),
    }
}

fn object(required: &[&str], props: Value) -> Value {
    json!({"type": "object", "required": required, "properties": props})
}

pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for (method, path, summary, request, response) in ROUTES {
        let mut op = json!({
            "summary": summary,
            "responses": {
                "200": {"description": "OK"},
                "400": {"description": "A bad field", "content": {"application/json": {"schema": schema_ref("Error")}}},
                "401": {"description": "Missing or unknown credential"},
                "403": {"description": "The credential may not do this"},
                "404": {"description": "Not found"},
                "409": {"description": "Conflicts with what exists"}
            }
        });
        if let Some(r) = response {
            op["responses"]["200"]["content"] =
                json!({"application/json": {"schema": schema_ref(r)}});
        }
        if let Some(r) = request {
            op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": schema_ref(r)}}});
        }
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        if !params.is_empty() {
            op["parameters"] = Value::Array(params);
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    let s = json!({"type": "string"});
    let n = json!({"type": "integer"});
    let b = json!({"type": "boolean"});
    let strings = json!({"type": "array", "items": {"type": "string"}});
    json!({
        "openapi": "3.0.3",
        "info": {"title": "bgp4mesh controller", "version": env!("CARGO_PKG_VERSION")},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": object(&["message"], json!({"message": s})),
                "NetworkCreate": object(&["netid"], json!({"netid": s, "addressrange": s, "addressrange6": s, "mtu": n, "listen_port": n, "persistent_keepalive": n})),
                "Network": object(&["netid"], json!({"netid": s, "addressrange": s, "addressrange6": s, "mtu": n, "listen_port": n, "persistent_keepalive": n, "nodes": n, "discovery_port": n})),
                "TokenCreate": object(&["network"], json!({"network": s, "expires_in": n, "uses": n, "tags": strings})),
                "Token": object(&["id", "network"], json!({"id": s, "network": s, "expires_at": n, "uses_left": n, "tags": strings, "created_at": n, "token": s})),
                "JoinRequest": object(&["secret", "name", "public_key"], json!({"secret": s, "name": s, "public_key": s, "endpoint": s, "endpoint6": s, "listen_port": n, "address": s, "address6": s})),
                "JoinResponse": object(&["node", "credential", "network"], json!({"node": schema_ref("Node"), "credential": s, "network": schema_ref("Network")})),
                "Node": object(&["id", "network", "name", "public_key"], json!({"id": s, "network": s, "name": s, "public_key": s, "address": s, "address6": s, "endpoint": s, "endpoint6": s, "listen_port": n, "tags": strings, "egress": schema_ref("Gateway"), "last_seen": n, "online": b, "candidates": strings, "nat": s, "relay_port": n})),
                "Gateway": object(&["ranges", "nat", "metric"], json!({"ranges": strings, "nat": b, "metric": n, "healthy": b, "bgp": b, "bgp_ranges": strings})),
                "GatewayCreate": object(&[], json!({"ranges": strings, "natEnabled": s, "metric": n, "bgp": b})),
                "ApiTokenCreate": object(&["scope"], json!({"scope": s})),
                "ApiToken": object(&["id", "scope"], json!({"id": s, "scope": s, "created_at": n, "token": s})),
                "NodeReport": object(&[], json!({"endpoint": s, "listen_port": n, "peers": {"type": "array", "items": {"type": "object"}}, "upstream": b, "bgp_ranges": strings, "candidates": strings, "nat": s, "relay_port": n})),
                "Pulse": object(&[], json!({"upstream": b})),
                "MeshState": object(&["revision", "network", "node", "peers"], json!({"revision": n, "network": schema_ref("Network"), "node": schema_ref("Node"), "peers": {"type": "array", "items": {"type": "object"}}, "relay_key": s})),
                "StreamEvent": object(&["type"], json!({"type": {"type": "string", "enum": ["snapshot", "peer_upsert", "peer_remove", "self_update", "removed", "heartbeat"]}, "revision": n}))
            }
        },
        "security": [{"bearer": []}],
        "paths": Value::Object(paths)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described_with_its_schemas() {
        let doc = document();
        for (method, path, _, request, response) in ROUTES {
            assert!(doc["paths"][path][method].is_object(), "{method} {path}");
            for schema in [request, response].into_iter().flatten() {
                let name = schema.trim_end_matches("[]");
                assert!(
                    doc["components"]["schemas"][name].is_object(),
                    "schema {name}"
                );
            }
        }
    }
}
