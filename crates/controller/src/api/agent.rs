//! The agent API, for node credentials only: `/api/agent/state`, the push
//! stream (`/api/agent/stream`, server-sent events), `/api/agent/report`
//! and a gateway's `/api/agent/pulse`. The watchdog that acts when pulses
//! stop is `crate::hub::watchdog`.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Extension, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use bgp4mesh_api::{NodeReport, PeerHandshake, StreamEvent};
use ipnet::IpNet;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use super::gateways::egress_range_allowed;
use super::join::check_endpoint;
use super::{Controller, Failure, Principal, Reply, as_node, body, now, unreachable_view};
use crate::store::NodeRow;
pub(super) async fn agent_state(
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
pub(super) struct Since {
    since: Option<u64>,
}

/// Server-sent events: `id: <revision>` and `data: <StreamEvent JSON>`.
pub(super) async fn agent_stream(
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
    let mut heartbeat = tokio::time::interval(bgp4mesh_api::HEARTBEAT_EVERY);
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
                        s.queue.extend(s.ctl.hub.event_for(&s.node.network, &change, &s.node.id, now()));
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
}

/// A gateway's or relay's sign of life (`bgp4mesh_api::Pulse`): several a
/// second, so a gateway or relay that dies without closing its stream is
/// left within `PULSE_LOST` (see `Controller::watch_pulses`).
pub(super) async fn agent_pulse(
    State(ctl): State<Arc<Controller>>,
    Extension(who): Extension<Principal>,
    json: Result<Json<bgp4mesh_api::Pulse>, JsonRejection>,
) -> Result<StatusCode, Failure> {
    // `authenticate` found a gateway or relay in memory (`principal`).
    let node = as_node(&who)?;
    let pulse = body(json)?;
    let at = Instant::now();
    if ctl
        .hub
        .pulsed(&node.network, &node.id, at, pulse.upstream, pulse.mesh)
    {
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

pub(super) async fn agent_report(
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
    if report.relay_port == Some(0) {
        return Err(Failure::bad("relay_port: 1 to 65535"));
    }
    if report.relay_port.is_some() && report.endpoint.is_none() && node.endpoint.is_none() {
        return Err(Failure::bad(
            "relay_port: the node publishes no endpoint, and a node behind NAT cannot relay \
             (join it with --endpoint, or leave [mesh] relay off)",
        ));
    }
    let candidates = match &report.candidates {
        Some(c) => Some(crate::hub::check_candidates(c).map_err(Failure::bad)?),
        None => None,
    };
    let relay_rtts = match &report.relay_rtts {
        Some(r) => Some(crate::hub::relays::check_relay_rtts(r).map_err(Failure::bad)?),
        None => None,
    };
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
        .upstream_reported(&node.network, &node.id, report.upstream, report.upstream6)
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
        ctl.catch_up(revision).await;
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
        ctl.catch_up(revision).await;
        ctl.hub
            .node_changed(revision, &node.network, &peer_id, |old| {
                old.unwrap_or_else(|| unreachable_view(&peer_id))
            });
    }
    let published_changed = report.endpoint.is_some() && report.endpoint != node.endpoint
        || report.listen_port.is_some_and(|p| p != node.listen_port);
    // Candidates reach the node (SelfUpdate) and its peers (PeerUpsert) in
    // one change, so both start sending to each other at once; with a new
    // published endpoint they ride on its change.
    let candidates_changed =
        ctl.hub
            .candidates_reported(&node.network, &node.id, candidates, report.nat);
    // A relay's port (and the key it gets the first time) goes out the same
    // way; the pairs behind NAT that it carries get it in the same change.
    let relay_changed = ctl
        .hub
        .relay_reported(&node.network, &node.id, report.relay_port);
    if relay_changed && let Some(port) = report.relay_port {
        tracing::info!(node = %node.name, port, "relays");
    }
    // Its round trips to relays, when they move a relay path of one of its
    // pairs, re-render its pairs with its next change (this one).
    let pairs_moved = ctl
        .hub
        .relay_rtts_reported(&node.network, &node.id, relay_rtts);
    if pairs_moved {
        tracing::debug!(node = %node.name, "relay round trips moved a relay path");
    }
    if (candidates_changed || relay_changed || pairs_moved) && !published_changed {
        let why = if relay_changed || pairs_moved {
            "relay"
        } else {
            "candidates"
        };
        let revision = ctl
            .store
            .note_change(&node.network, &node.id, why, t)
            .await?;
        ctl.catch_up(revision).await;
        ctl.hub
            .node_changed(revision, &node.network, &node.id, |old| {
                old.unwrap_or_else(|| unreachable_view(&node.id))
            });
        tracing::debug!(node = %node.name, "candidates, NAT mapping or relay changed");
    }
    if published_changed {
        let endpoint = report.endpoint.clone().or(node.endpoint.clone());
        let port = report.listen_port.unwrap_or(node.listen_port);
        let revision = ctl
            .store
            .update_node_endpoint(&node.id, &node.network, endpoint.as_deref(), port, t)
            .await?;
        ctl.catch_up(revision).await;
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
