//! Joining: `/api/join`, the one open write. The enrollment secret in the
//! body is the credential; the node gets its addresses (IPAM) and its own
//! credential.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bgp4mesh_api::{JoinRequest, JoinResponse};

use super::{Controller, Failure, Reply, body, now, now_millis};
use crate::hub::{NodeView, render_network, render_node};
use crate::store::{JoinRefusal, NetworkRow, NodeRow, TokenRefusal};
use crate::{ipam, secrets};
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
pub(super) fn check_endpoint(endpoint: &str) -> Result<(), Failure> {
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

/// An IPv6 endpoint published next to an IPv4 one: an address peers can
/// send to, IPv6 (not IPv4-mapped), and only beside an IPv4 `endpoint`.
pub(super) fn check_endpoint6(endpoint6: &str, endpoint: Option<&str>) -> Result<(), Failure> {
    check_endpoint(endpoint6).map_err(|f| Failure::bad(format!("endpoint6: {}", f.message)))?;
    let ip = match endpoint6.parse::<SocketAddr>() {
        Ok(a) => a.ip(),
        Err(_) => endpoint6
            .parse::<IpAddr>()
            .map_err(|_| Failure::bad("endpoint6: not IP or [IP]:port"))?,
    };
    let IpAddr::V6(v6) = ip else {
        return Err(Failure::bad(format!(
            "endpoint6 {endpoint6:?} is not an IPv6 address"
        )));
    };
    if v6.to_ipv4_mapped().is_some() {
        return Err(Failure::bad(format!(
            "endpoint6 {endpoint6:?} is an IPv4-mapped address; give it as endpoint"
        )));
    }
    let endpoint4 = endpoint.and_then(|e| {
        e.parse::<SocketAddr>()
            .map(|a| a.ip())
            .or_else(|_| e.parse::<IpAddr>())
            .ok()
    });
    if !endpoint4.is_some_and(|ip| ip.is_ipv4()) {
        return Err(Failure::bad(
            "endpoint6 goes next to an IPv4 endpoint; a node whose only public address is \
             IPv6 publishes it as endpoint",
        ));
    }
    Ok(())
}

pub(super) async fn join(
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
    if let Some(e) = &req.endpoint6 {
        check_endpoint6(e, req.endpoint.as_deref())?;
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
        endpoint6: req.endpoint6.clone(),
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
                } else if let Some(a) = pinned4 {
                    return Err(format!("address {a}: the network has no IPv4 range"));
                }
                if let Some(range) = net.addressrange6.as_deref().and_then(|r| r.parse().ok()) {
                    node.address6 = Some(match pinned6 {
                        Some(a) => ipam::check_pinned_v6(range, used6, a),
                        None => ipam::allocate_v6(range, used6),
                    }?);
                } else if let Some(a) = pinned6 {
                    return Err(format!("address6 {a}: the network has no IPv6 range"));
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
    ctl.catch_up(revision).await;
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
        network: render_network(
            &network,
            ctl.hub.node_count(&network.netid),
            ctl.hub.discovery_port(),
        ),
    }))
}
