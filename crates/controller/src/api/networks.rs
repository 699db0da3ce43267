//! Networks: `/api/networks` (create, list, get, delete), each with its
//! IPv4 and/or IPv6 address range; ranges of two networks never overlap.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use bgp4mesh_api::NetworkCreate;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};

use super::{Controller, Failure, Principal, Reply, body, may_manage, now};
use crate::hub::render_network;
use crate::store::NetworkRow;
pub(super) fn check_netid(netid: &str) -> Result<(), Failure> {
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

pub(super) async fn create_network(
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
    ctl.catch_up(revision).await;
    ctl.hub.network_created(revision, row.clone());
    tracing::info!(netid = %row.netid, "network created");
    Ok(Json(render_network(&row, 0, ctl.hub.discovery_port())))
}

pub(super) async fn list_networks(
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
            .map(|n| render_network(n, ctl.hub.node_count(&n.netid), ctl.hub.discovery_port()))
            .collect(),
    ))
}

pub(super) async fn get_network(
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
    Ok(Json(render_network(
        &n,
        ctl.hub.node_count(&netid),
        ctl.hub.discovery_port(),
    )))
}

pub(super) async fn delete_network(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path(netid): Path<String>,
) -> Result<StatusCode, Failure> {
    may_manage(&who, None, false)?;
    let _write = ctl.write.lock().await;
    ctl.catch_up_all().await;
    let revision = ctl.store.delete_network(&netid, now()).await?;
    ctl.catch_up(revision).await;
    ctl.hub.network_deleted(revision, &netid);
    Ok(StatusCode::NO_CONTENT)
}
