//! Egress gateways: `/api/nodes/{netid}/{node}/creategateway` and
//! `deletegateway`, `/api/gateways`; `egress_range_allowed`, what a
//! gateway may carry.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, Query, State};
use bgp4mesh_api::GatewayCreate;
use ipnet::IpNet;

use super::nodes::find_node;
use super::{Controller, Failure, NetworkFilter, Principal, Reply, body, may_manage, now};
use crate::hub::{render_gateway, render_node};
use crate::store::{GatewayRow, NetworkRow};
pub(super) async fn create_gateway(
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
    ctl.catch_up_all().await;
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
    ctl.catch_up(revision).await;
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

pub(super) async fn delete_gateway(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path((netid, node)): Path<(String, String)>,
) -> Reply<bgp4mesh_api::Node> {
    may_manage(&who, Some(&netid), false)?;
    let _write = ctl.write.lock().await;
    ctl.catch_up_all().await;
    let (network, view) = find_node(&ctl, &netid, &node).await?;
    let revision = ctl
        .store
        .delete_gateway(&view.row.id, &netid, now())
        .await?;
    let mut updated = view.clone();
    updated.gateway = None;
    let id = view.row.id.clone();
    ctl.catch_up(revision).await;
    ctl.hub.node_changed(revision, &netid, &id, |old| {
        let mut n = old.unwrap_or(view);
        n.gateway = None;
        n
    });
    Ok(Json(render_node(&network, &updated, now())))
}

pub(super) async fn list_gateways(
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
