//! Nodes: `/api/nodes` (list all, list a network's, get, delete).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;

use super::{Controller, Failure, Principal, Reply, may_manage, now};
use crate::hub::{NodeView, render_node};
use crate::store::NetworkRow;
pub(super) async fn list_all_nodes(
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

pub(super) async fn list_nodes(
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

pub(super) async fn find_node(
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

pub(super) async fn get_node(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path((netid, node)): Path<(String, String)>,
) -> Reply<bgp4mesh_api::Node> {
    may_manage(&who, Some(&netid), true)?;
    let (network, view) = find_node(&ctl, &netid, &node).await?;
    Ok(Json(render_node(&network, &view, now())))
}

pub(super) async fn delete_node(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    Path((netid, node)): Path<(String, String)>,
) -> Result<StatusCode, Failure> {
    may_manage(&who, Some(&netid), false)?;
    let _write = ctl.write.lock().await;
    ctl.catch_up_all().await;
    let (_, view) = find_node(&ctl, &netid, &node).await?;
    let (_, revision) = ctl.store.delete_node(&view.row.id, now()).await?;
    ctl.catch_up(revision).await;
    ctl.hub.node_removed(revision, &netid, &view.row.id);
    tracing::info!(node = %view.row.name, network = %netid, "node deleted");
    Ok(StatusCode::NO_CONTENT)
}
