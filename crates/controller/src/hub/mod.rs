//! The mesh as the controller serves it: an in-memory view of every
//! network's nodes (loaded from the store at start, changed with it), the
//! recent changes per network, and one broadcast channel per network that
//! the agents' streams listen to.
//!
//! A change to one node is one message to each stream of its network; no
//! peer list is recomputed. An agent that reconnects with its last
//! revision gets the changes it missed from the log, or a snapshot when it
//! is further behind than the log reaches.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, PoisonError, RwLock};

use bgp4mesh_api::{
    Gateway, MeshState, NatMapping, Network, Node, Peer, PeerHandshake, StreamEvent, host_net,
};
use ipnet::IpNet;
use tokio::sync::broadcast;

use crate::store::{GatewayRow, NetworkRow, NodeRow};

mod candidates;
pub mod follower;
pub mod relays;
pub mod watchdog;

pub use candidates::check_candidates;
pub use relays::{RelayRole, Relays, Secret};

/// Changes kept per network for agents that reconnect.
const LOG_LEN: usize = 4096;
/// Live changes queued per stream before a slow one is resynced with a
/// snapshot.
const CHANNEL_LEN: usize = 1024;
/// A node counts as online if it reported within this many seconds.
pub const ONLINE_WINDOW: u64 = 90;
/// A handshake this recent (seconds) counts as a live session; WireGuard
/// rekeys every 2 minutes while traffic flows.
pub const LIVE_HANDSHAKE: u64 = 180;
/// A node's observed endpoint changes at most once per this (seconds).
pub const OBSERVED_EVERY: u64 = 10;

#[derive(Debug, Clone)]
pub struct NodeView {
    pub row: NodeRow,
    pub gateway: Option<GatewayRow>,
    /// Where peers saw this node come from (its NAT mapping), when it
    /// publishes no endpoint itself.
    pub observed_endpoint: Option<String>,
    /// When `observed_endpoint` last changed (seconds).
    pub observed_at: Option<u64>,
    /// Where the node says it may be reached, best first (`ip:port`), as
    /// it last reported them; rendered only while it publishes no
    /// endpoint. Kept when its stream closes (its last word), gone with
    /// the node.
    pub candidates: Vec<String>,
    /// How its NAT maps its WireGuard socket, as it last reported it.
    pub nat: Option<NatMapping>,
    pub last_seen: Option<u64>,
    /// Shared, not copied, with every change of the log that holds this
    /// view (a node's handshakes are one per peer: O(nodes)).
    pub handshakes: Arc<[PeerHandshake]>,
    /// Open push streams of this node's agent.
    pub streams: u32,
    /// What the node last said of its BGP upstream for IPv4 (borders).
    pub upstream: Option<bool>,
    /// ... and for IPv6.
    pub upstream6: Option<bool>,
    /// The BGP-learned ranges it last said it exports (sorted, unique);
    /// carried by its gateway when that has `bgp` set. Shared with the
    /// log's changes, as `handshakes`.
    pub bgp_ranges: Arc<[IpNet]>,
    /// Whether the node reported since its stream (re)connected.
    pub reported: bool,
    /// When its agent last pulsed (gateways pulse; None: not since its
    /// stream opened).
    pub last_pulse: Option<std::time::Instant>,
    /// Its pulses stopped while its stream looks open: taken as dead.
    pub silent: bool,
    /// It was silent, and has not reported since it was heard again: what
    /// it said before may be out of date.
    pub stale: bool,
    /// What its pulses last said of its mesh: `Some(false)` when none of
    /// its peers answers its probes through the tunnel (the underlay is
    /// cut, its device is stuck): it carries no traffic.
    pub mesh: Option<bool>,
    /// The UDP port it relays on (at its published endpoint's address), as
    /// it reported it since its stream opened (`relays`).
    pub relay_port: Option<u16>,
    /// Its relay key, made when it first became a relay: memory only,
    /// for the relay itself alone.
    pub relay_key: Option<Secret>,
    /// What was last published of it as a relay, and whether it was
    /// behind NAT: a change of either re-renders the pairs behind NAT.
    pub published: RelayRole,
    /// Its round trips (microseconds) to relays, by relay node id, as its
    /// reports gave them, rounded to buckets (`relays`): the relay paths of
    /// its pairs use them. Memory only; kept when its stream closes.
    pub relay_rtts: BTreeMap<String, u64>,
    /// Its round trips moved a relay path of one of its pairs since it was
    /// last published: its next change re-renders its pairs.
    pub pairs_moved: bool,
}

impl NodeView {
    pub fn new(row: NodeRow, gateway: Option<GatewayRow>) -> NodeView {
        NodeView {
            row,
            gateway,
            observed_endpoint: None,
            observed_at: None,
            candidates: Vec::new(),
            nat: None,
            last_seen: None,
            handshakes: Arc::default(),
            streams: 0,
            upstream: None,
            upstream6: None,
            bgp_ranges: Arc::default(),
            reported: false,
            last_pulse: None,
            silent: false,
            stale: false,
            mesh: None,
            relay_port: None,
            relay_key: None,
            published: RelayRole::default(),
            relay_rtts: BTreeMap::new(),
            pairs_moved: false,
        }
    }

    /// A gateway is healthy for a family while its agent is connected,
    /// has reported since it connected, its upstream of that family (if
    /// it has one) is up, its mesh carries traffic, and its pulses (if it
    /// pulses) keep coming: a border that restarts is used again only once
    /// its BGP is back.
    pub fn health(&self) -> Health {
        let says_ok = self.streams > 0 && self.reported && self.mesh != Some(false);
        Health {
            ipv4: says_ok && self.upstream != Some(false),
            ipv6: says_ok && self.upstream6 != Some(false),
            heard: self.streams > 0 && !self.silent && !self.stale,
        }
    }

    /// Healthy for some family.
    pub fn healthy(&self) -> bool {
        let h = self.health();
        h.heard && (h.ipv4 || h.ipv6)
    }
}

/// A gateway's health as nodes see it: per family what it says of itself
/// (its agent connected and reporting, its upstream, its mesh), and
/// whether the controller hears its pulses. A node whose own probes of its
/// exit are answered keeps using a gateway the controller stopped hearing
/// (its link to the controller is cut, not its data plane).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub ipv4: bool,
    pub ipv6: bool,
    pub heard: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    NodeUpsert(String),
    NodeRemove(String),
    NetworkRemoved,
}

/// One committed change, as streams replay it.
#[derive(Debug)]
pub struct Change {
    pub revision: u64,
    pub kind: ChangeKind,
    /// The node as it was right after the change (for upserts).
    pub node: Option<NodeView>,
    /// The relay paths of pairs behind NAT may have changed with it (a
    /// relay came or went, a node went behind NAT or came out): every
    /// node behind NAT, and the node itself, also get their peers behind
    /// NAT again.
    pub relays: bool,
    /// The relay paths of the changed node's own pairs may have moved (its
    /// round trips to relays): it gets its peers behind NAT again (they
    /// get it, as with any change).
    pub own_pairs: bool,
}

struct NetView {
    network: NetworkRow,
    nodes: BTreeMap<String, NodeView>,
    log: VecDeque<Arc<Change>>,
    /// Every change after this revision is in `log`.
    floor: u64,
    sender: broadcast::Sender<Arc<Change>>,
    /// The hour (Unix seconds / 3600) relay credentials were last handed
    /// to every pair behind NAT.
    relays_hour: u64,
    /// The nodes that pulsed since their stream opened (a superset: ids
    /// whose node is gone or stopped pulsing are dropped when the
    /// watchdog meets them), so the watchdog looks at the gateways and
    /// relays alone, not at every node.
    pulsing: std::collections::BTreeSet<String>,
}

#[derive(Default)]
struct Inner {
    revision: u64,
    networks: HashMap<String, NetView>,
    /// The first UDP port of the endpoint discovery, when it is on.
    discovery_port: Option<u16>,
}

impl Inner {
    fn node_mut(&mut self, netid: &str, id: &str) -> Option<&mut NodeView> {
        self.networks.get_mut(netid)?.nodes.get_mut(id)
    }
}

#[derive(Default)]
pub struct Hub {
    inner: RwLock<Inner>,
}

/// What a new stream starts with.
pub struct Subscription {
    pub initial: Vec<StreamEvent>,
    pub last_revision: u64,
    pub live: broadcast::Receiver<Arc<Change>>,
}

impl Hub {
    /// The view of a store's contents at `revision`.
    pub fn load(
        revision: u64,
        networks: Vec<NetworkRow>,
        nodes: Vec<NodeRow>,
        gateways: Vec<GatewayRow>,
    ) -> Hub {
        let mut inner = Inner {
            revision,
            networks: HashMap::new(),
            discovery_port: None,
        };
        for network in networks {
            inner
                .networks
                .insert(network.netid.clone(), NetView::new(network, revision));
        }
        let mut gateways: HashMap<String, GatewayRow> = gateways
            .into_iter()
            .map(|g| (g.node_id.clone(), g))
            .collect();
        for node in nodes {
            if let Some(view) = inner.networks.get_mut(&node.network) {
                let gateway = gateways.remove(&node.id);
                view.nodes
                    .insert(node.id.clone(), NodeView::new(node, gateway));
            }
        }
        Hub {
            inner: RwLock::new(inner),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn revision(&self) -> u64 {
        self.read().revision
    }

    /// The endpoint discovery's first port (None: it is off), told to
    /// nodes in their network's settings. Set once at start, before the
    /// API serves.
    pub fn set_discovery_port(&self, port: Option<u16>) {
        self.write().discovery_port = port;
    }

    pub fn discovery_port(&self) -> Option<u16> {
        self.read().discovery_port
    }

    // -- changes (called in revision order, under the controller's write
    //    lock, after the store committed) ---------------------------------

    pub fn network_created(&self, revision: u64, network: NetworkRow) {
        let mut inner = self.write();
        inner.revision = revision;
        inner
            .networks
            .insert(network.netid.clone(), NetView::new(network, revision));
    }

    /// A change with nothing for the hub in it: its revision only.
    pub fn advance(&self, revision: u64) {
        let mut inner = self.write();
        inner.revision = inner.revision.max(revision);
    }

    pub fn has_network(&self, netid: &str) -> bool {
        self.read().networks.contains_key(netid)
    }

    pub fn network_deleted(&self, revision: u64, netid: &str) {
        let mut inner = self.write();
        inner.revision = revision;
        if let Some(view) = inner.networks.remove(netid) {
            // Every stream of the network learns it is gone.
            let _ = view.sender.send(Arc::new(Change {
                revision,
                kind: ChangeKind::NetworkRemoved,
                node: None,
                relays: false,
                own_pairs: false,
            }));
        }
    }

    /// A node was added or changed: `update` edits its view (or makes it).
    /// When that moves relay paths (the node became or stopped being a
    /// live relay, went behind NAT or came out), the change says so.
    pub fn node_changed(
        &self,
        revision: u64,
        netid: &str,
        id: &str,
        update: impl FnOnce(Option<NodeView>) -> NodeView,
    ) {
        self.upsert(revision, netid, id, update, crate::api::now(), false);
    }

    /// Hands every pair behind NAT fresh relay credentials, as a change of
    /// node `id` (a live relay of the network).
    pub fn refresh_relays(&self, revision: u64, netid: &str, id: &str, now: u64) {
        self.upsert(
            revision,
            netid,
            id,
            |old| old.unwrap_or_else(|| crate::api::unreachable_view(id)),
            now,
            true,
        );
    }

    fn upsert(
        &self,
        revision: u64,
        netid: &str,
        id: &str,
        update: impl FnOnce(Option<NodeView>) -> NodeView,
        now: u64,
        refresh: bool,
    ) {
        let mut inner = self.write();
        inner.revision = revision;
        let Some(view) = inner.networks.get_mut(netid) else {
            return;
        };
        let old = view.nodes.remove(id);
        let before = old
            .as_ref()
            .map(|n| n.published.clone())
            .unwrap_or_default();
        let mut node = update(old);
        node.published = RelayRole::of(&node);
        let own_pairs = std::mem::take(&mut node.pairs_moved);
        let after = &node.published;
        let relay_live = || view.nodes.values().any(|n| n.live_relay().is_some());
        let relays = refresh
            || before.relay != after.relay
            || before.behind_nat != after.behind_nat && relay_live();
        view.nodes.insert(id.to_string(), node.clone());
        if relays {
            view.relays_hour = now / 3600;
        }
        view.publish(Change {
            revision,
            kind: ChangeKind::NodeUpsert(id.to_string()),
            node: Some(node),
            relays,
            own_pairs,
        });
    }

    pub fn node_removed(&self, revision: u64, netid: &str, id: &str) {
        let mut inner = self.write();
        inner.revision = revision;
        let Some(view) = inner.networks.get_mut(netid) else {
            return;
        };
        let relays = view
            .nodes
            .remove(id)
            .is_some_and(|n| n.published.relay.is_some());
        view.publish(Change {
            revision,
            kind: ChangeKind::NodeRemove(id.to_string()),
            node: None,
            relays,
            own_pairs: false,
        });
    }

    /// A report: last seen and handshakes, kept in memory only (they are
    /// observations, not configuration). Returns the peers whose observed
    /// endpoint changed, for the caller to publish as a change.
    pub fn node_reported(
        &self,
        netid: &str,
        id: &str,
        now: u64,
        handshakes: Vec<PeerHandshake>,
        observed: Vec<(String, String)>,
    ) -> Vec<String> {
        let mut inner = self.write();
        let Some(view) = inner.networks.get_mut(netid) else {
            return Vec::new();
        };
        let live = |h: &PeerHandshake| {
            h.last_handshake
                .is_some_and(|t| t.saturating_add(LIVE_HANDSHAKE) >= now)
        };
        let talking_to: HashSet<String> = handshakes
            .iter()
            .filter(|h| live(h))
            .map(|h| h.peer.clone())
            .collect();
        if let Some(node) = view.nodes.get_mut(id) {
            node.last_seen = Some(now);
            node.handshakes = handshakes.into();
        }
        let mut changed = Vec::new();
        for (peer_id, endpoint) in observed {
            // A report is evidence of where the reporter sees the peer
            // from, not authority over the peer: it counts only while both
            // say they have a live session with each other, and moves the
            // peer at most once per OBSERVED_EVERY.
            if peer_id == id || !talking_to.contains(&peer_id) {
                continue;
            }
            if let Some(peer) = view.nodes.get_mut(&peer_id)
                && peer.row.endpoint.is_none()
                && peer.observed_endpoint.as_deref() != Some(endpoint.as_str())
                && peer.handshakes.iter().any(|h| h.peer == id && live(h))
                && peer
                    .observed_at
                    .is_none_or(|at| now >= at.saturating_add(OBSERVED_EVERY))
            {
                peer.observed_endpoint = Some(endpoint);
                peer.observed_at = Some(now);
                changed.push(peer_id);
            }
        }
        changed
    }

    /// An agent's stream opened (`+1`) or closed (`-1`). Returns whether
    /// the node is a gateway whose health changed with it, or a relay that
    /// came or went.
    pub fn stream_changed(&self, netid: &str, id: &str, delta: i32) -> bool {
        let mut inner = self.write();
        let Some(node) = inner.node_mut(netid, id) else {
            return false;
        };
        let before = node.health();
        let relay_before = node.live_relay();
        let mut ranges_dropped = false;
        node.streams = node.streams.saturating_add_signed(delta);
        if node.streams == 0 {
            node.reported = false;
            node.upstream = None;
            node.upstream6 = None;
            node.last_pulse = None;
            node.silent = false;
            node.stale = false;
            node.mesh = None;
            // What it learns by BGP, and that it relays, is said again
            // when it is back (its key stays).
            ranges_dropped = !std::mem::take(&mut node.bgp_ranges).is_empty();
            node.relay_port = None;
        }
        node.live_relay() != relay_before
            || node
                .gateway
                .as_ref()
                .is_some_and(|g| node.health() != before || g.bgp && ranges_dropped)
    }

    /// A node reported its upstream per family (IPv4, IPv6). Returns
    /// whether its health as a gateway changed.
    pub fn upstream_reported(
        &self,
        netid: &str,
        id: &str,
        upstream: Option<bool>,
        upstream6: Option<bool>,
    ) -> bool {
        let mut inner = self.write();
        let Some(node) = inner.node_mut(netid, id) else {
            return false;
        };
        let before = node.health();
        node.reported = true;
        node.stale = false;
        if upstream.is_some() {
            node.upstream = upstream;
        }
        if upstream6.is_some() {
            node.upstream6 = upstream6;
        }
        node.gateway.is_some() && node.health() != before
    }

    /// A gateway's or relay's agent pulsed (a short report). Returns
    /// whether its health changed, or it is a relay that is live again.
    pub fn pulsed(
        &self,
        netid: &str,
        id: &str,
        at: std::time::Instant,
        upstream: Option<bool>,
        mesh: Option<bool>,
    ) -> bool {
        let mut inner = self.write();
        let Some(view) = inner.networks.get_mut(netid) else {
            return false;
        };
        let Some(node) = view.nodes.get_mut(id) else {
            return false;
        };
        if node.last_pulse.is_none() {
            view.pulsing.insert(id.to_string());
        }
        let before = node.health();
        let relay_before = node.live_relay();
        node.last_pulse = Some(at);
        node.silent = false;
        // Not `reported`: that waits for a whole report after each connect
        // (it brings the BGP-learned ranges).
        if upstream.is_some() {
            node.upstream = upstream;
        }
        if mesh.is_some() {
            node.mesh = mesh;
        }
        node.gateway.is_some() && node.health() != before || node.live_relay() != relay_before
    }

    /// The gateway or relay node whose credential hashes to `hash`, if any
    /// (those pulse).
    pub fn gateway_by_credential(&self, hash: &str) -> Option<NodeRow> {
        let inner = self.read();
        inner
            .networks
            .values()
            .flat_map(|v| v.nodes.values())
            .find(|n| {
                (n.gateway.is_some() || n.relay_port.is_some()) && n.row.credential_hash == hash
            })
            .map(|n| n.row.clone())
    }

    /// Marks silent the gateways and relays whose last pulse is older than
    /// `lost`; returns those whose health changed with it (a relay: that
    /// was live), as (network, node id).
    ///
    /// When two or more pulsing gateways of a network all went quiet at
    /// once, nobody is marked: that is the controller not hearing (a
    /// stalled store, its own network), not the gateways dying, and there
    /// would be no exit left to move to anyway. A lone gateway is marked
    /// (its nodes then fall back to their own default route).
    pub fn silence_quiet_gateways(
        &self,
        now: std::time::Instant,
        lost: std::time::Duration,
    ) -> Vec<(String, String)> {
        let pulsing = |n: &NodeView| {
            (n.gateway.is_some() || n.relay_port.is_some()) && n.last_pulse.is_some() && !n.silent
        };
        let quiet = |n: &NodeView| {
            n.last_pulse
                .is_some_and(|t| now.saturating_duration_since(t) > lost)
        };
        // Under the read lock first: most ticks nothing went quiet, and
        // the API goes on meanwhile.
        let any = self.read().networks.values().any(|view| {
            view.pulsing
                .iter()
                .filter_map(|id| view.nodes.get(id))
                .any(|n| pulsing(n) && quiet(n))
        });
        if !any {
            return Vec::new();
        }
        let mut inner = self.write();
        let mut changed = Vec::new();
        for (netid, view) in inner.networks.iter_mut() {
            let NetView {
                nodes,
                pulsing: ids,
                ..
            } = view;
            ids.retain(|id| nodes.get(id).is_some_and(|n| n.last_pulse.is_some()));
            let live = ids
                .iter()
                .filter(|id| nodes.get(*id).is_some_and(pulsing))
                .count();
            let going = ids
                .iter()
                .filter(|id| nodes.get(*id).is_some_and(|n| pulsing(n) && quiet(n)))
                .count();
            if going == 0 || (live >= 2 && going == live) {
                continue;
            }
            for id in ids.iter() {
                let Some(node) = nodes.get_mut(id) else {
                    continue;
                };
                if !pulsing(node) || !quiet(node) {
                    continue;
                }
                let before =
                    node.gateway.is_some() && node.healthy() || node.live_relay().is_some();
                node.silent = true;
                // What it said of its upstream may be stale by the time it
                // is heard again: it is used again after a new report.
                // Until then its word stands for the nodes whose own probes
                // of it are answered (`Health::heard`).
                node.stale = true;
                if before {
                    changed.push((netid.clone(), id.clone()));
                }
            }
        }
        changed
    }

    /// A node reported the ranges it exports from BGP (sorted, unique).
    /// Returns whether its gateway carries them and they changed.
    pub fn bgp_ranges_reported(&self, netid: &str, id: &str, ranges: Vec<IpNet>) -> bool {
        let mut inner = self.write();
        let Some(node) = inner.node_mut(netid, id) else {
            return false;
        };
        if node.bgp_ranges[..] == ranges[..] {
            return false;
        }
        node.bgp_ranges = ranges.into();
        node.gateway.as_ref().is_some_and(|g| g.bgp)
    }

    // -- reads -------------------------------------------------------------

    pub fn node(&self, netid: &str, id: &str) -> Option<NodeView> {
        self.read().networks.get(netid)?.nodes.get(id).cloned()
    }

    pub fn nodes(&self, netid: Option<&str>) -> Vec<(NetworkRow, NodeView)> {
        let inner = self.read();
        let mut out = Vec::new();
        let mut nets: Vec<&NetView> = inner
            .networks
            .values()
            .filter(|v| netid.is_none_or(|n| v.network.netid == n))
            .collect();
        nets.sort_by(|a, b| a.network.netid.cmp(&b.network.netid));
        for view in nets {
            let mut nodes: Vec<&NodeView> = view.nodes.values().collect();
            nodes.sort_by(|a, b| (a.row.created_at, &a.row.id).cmp(&(b.row.created_at, &b.row.id)));
            out.extend(nodes.into_iter().map(|n| (view.network.clone(), n.clone())));
        }
        out
    }

    /// Finds a node of `netid` by id, or by name.
    pub fn find(&self, netid: &str, id_or_name: &str) -> Option<NodeView> {
        let inner = self.read();
        let view = inner.networks.get(netid)?;
        view.nodes
            .get(id_or_name)
            .or_else(|| view.nodes.values().find(|n| n.row.name == id_or_name))
            .cloned()
    }

    /// The mesh addresses in use in a network.
    pub fn used_addresses(
        &self,
        netid: &str,
    ) -> (
        std::collections::HashSet<std::net::Ipv4Addr>,
        std::collections::HashSet<std::net::Ipv6Addr>,
    ) {
        let inner = self.read();
        let Some(view) = inner.networks.get(netid) else {
            return Default::default();
        };
        (
            view.nodes.values().filter_map(|n| n.row.address).collect(),
            view.nodes.values().filter_map(|n| n.row.address6).collect(),
        )
    }

    /// Why `name` or `public_key` cannot join `netid` (both are unique in
    /// a network), if so.
    pub fn taken(&self, netid: &str, name: &str, public_key: &str) -> Option<String> {
        let inner = self.read();
        let view = inner.networks.get(netid)?;
        view.nodes.values().find_map(|other| {
            if other.row.name == name {
                Some(format!(
                    "a node named {name:?} is in network {netid:?} already"
                ))
            } else if other.row.public_key == public_key {
                Some(format!(
                    "node {:?} in network {netid:?} has this public key already",
                    other.row.name
                ))
            } else {
                None
            }
        })
    }

    pub fn node_count(&self, netid: &str) -> u64 {
        self.read()
            .networks
            .get(netid)
            .map_or(0, |v| v.nodes.len() as u64)
    }

    pub fn online(&self, now: u64) -> (u64, u64) {
        let inner = self.read();
        let mut total = 0;
        let mut online = 0;
        for view in inner.networks.values() {
            for node in view.nodes.values() {
                total += 1;
                if is_online(node, now) {
                    online += 1;
                }
            }
        }
        (online, total)
    }

    /// The state of node `id`, as a snapshot.
    pub fn state(&self, netid: &str, id: &str, now: u64) -> Option<MeshState> {
        let inner = self.read();
        let view = inner.networks.get(netid)?;
        view.snapshot(inner.revision, id, now, inner.discovery_port)
    }

    /// Starts a stream for node `id` that has seen up to `since`.
    pub fn subscribe(
        &self,
        netid: &str,
        id: &str,
        since: Option<u64>,
        now: u64,
    ) -> Option<Subscription> {
        let inner = self.read();
        let view = inner.networks.get(netid)?;
        // Subscribe before reading, under the same lock as the writers:
        // nothing falls between the initial events and the live ones.
        let live = view.sender.subscribe();
        let current = inner.revision;
        let replayable = since.is_some_and(|r| r >= view.floor && r <= current);
        let initial = match since {
            Some(r) if replayable => view
                .log
                .iter()
                .filter(|c| c.revision > r)
                .flat_map(|c| event_for(c, id, view, now, inner.discovery_port))
                .collect(),
            _ => vec![StreamEvent::Snapshot(view.snapshot(
                current,
                id,
                now,
                inner.discovery_port,
            )?)],
        };
        Some(Subscription {
            initial,
            last_revision: current,
            live,
        })
    }

    /// What a change means to node `id`: its events, all at the change's
    /// revision (none: nothing for it).
    pub fn event_for(&self, netid: &str, change: &Change, id: &str, now: u64) -> Vec<StreamEvent> {
        if let ChangeKind::NetworkRemoved = change.kind {
            return vec![StreamEvent::Removed {
                revision: change.revision,
            }];
        }
        let inner = self.read();
        let Some(view) = inner.networks.get(netid) else {
            return Vec::new();
        };
        event_for(change, id, view, now, inner.discovery_port)
    }
}

fn is_online(node: &NodeView, now: u64) -> bool {
    node.last_seen
        .is_some_and(|t| now.saturating_sub(t) <= ONLINE_WINDOW)
}

/// The events of `change` for node `id`: the changed node itself (as its
/// own update, a peer, or a removal), and when relay paths moved, the
/// peers behind NAT of a node behind NAT (or of the node that changed;
/// only of it when only its own pairs moved).
fn event_for(
    change: &Change,
    id: &str,
    view: &NetView,
    now: u64,
    discovery_port: Option<u16>,
) -> Vec<StreamEvent> {
    let revision = change.revision;
    let relays = Relays::for_viewer(view, id, now);
    let mut events = Vec::new();
    let mut itself = false;
    match &change.kind {
        ChangeKind::NodeUpsert(node_id) => {
            let Some(node) = change.node.as_ref() else {
                return events;
            };
            itself = node_id == id;
            events.push(if itself {
                StreamEvent::SelfUpdate {
                    revision,
                    node: render_node(&view.network, node, now),
                    network: render_network(&view.network, view.nodes.len() as u64, discovery_port),
                    relay_key: node.own_relay_key(),
                }
            } else {
                StreamEvent::PeerUpsert {
                    revision,
                    peer: render_peer(node, &relays),
                }
            });
        }
        ChangeKind::NodeRemove(node_id) if node_id == id => {
            return vec![StreamEvent::Removed { revision }];
        }
        ChangeKind::NodeRemove(node_id) => events.push(StreamEvent::PeerRemove {
            revision,
            node_id: node_id.clone(),
        }),
        ChangeKind::NetworkRemoved => return vec![StreamEvent::Removed { revision }],
    }
    let behind_nat = view.nodes.get(id).is_some_and(NodeView::behind_nat);
    if (change.relays && (behind_nat || itself)) || (change.own_pairs && itself) {
        let changed = match &change.kind {
            ChangeKind::NodeUpsert(n) | ChangeKind::NodeRemove(n) => Some(n.as_str()),
            ChangeKind::NetworkRemoved => None,
        };
        events.extend(
            view.nodes
                .values()
                .filter(|p| p.behind_nat() && p.row.id != id && Some(p.row.id.as_str()) != changed)
                .map(|p| StreamEvent::PeerUpsert {
                    revision,
                    peer: render_peer(p, &relays),
                }),
        );
    }
    events
}

impl NetView {
    fn new(network: NetworkRow, revision: u64) -> NetView {
        NetView {
            network,
            nodes: BTreeMap::new(),
            log: VecDeque::new(),
            floor: revision,
            sender: broadcast::channel(CHANNEL_LEN).0,
            relays_hour: 0,
            pulsing: std::collections::BTreeSet::new(),
        }
    }

    fn publish(&mut self, change: Change) {
        let change = Arc::new(change);
        if self.log.len() == LOG_LEN
            && let Some(old) = self.log.pop_front()
        {
            self.floor = old.revision;
        }
        self.log.push_back(Arc::clone(&change));
        // No receivers is fine: nobody is streaming this network.
        let _ = self.sender.send(change);
    }

    fn snapshot(
        &self,
        revision: u64,
        id: &str,
        now: u64,
        discovery_port: Option<u16>,
    ) -> Option<MeshState> {
        let me = self.nodes.get(id)?;
        let relays = Relays::for_viewer(self, id, now);
        Some(MeshState {
            relay_key: me.own_relay_key(),
            revision,
            network: render_network(&self.network, self.nodes.len() as u64, discovery_port),
            node: render_node(&self.network, me, now),
            peers: self
                .nodes
                .values()
                .filter(|n| n.row.id != id)
                .map(|n| render_peer(n, &relays))
                .collect(),
        })
    }
}

/// A network's settings; `discovery_port` is `Hub::discovery_port`.
pub fn render_network(n: &NetworkRow, nodes: u64, discovery_port: Option<u16>) -> Network {
    Network {
        netid: n.netid.clone(),
        addressrange: n.addressrange.clone(),
        addressrange6: n.addressrange6.clone(),
        mtu: n.mtu,
        listen_port: n.listen_port,
        persistent_keepalive: n.persistent_keepalive,
        nodes,
        discovery_port,
    }
}

/// A node's gateway as nodes and operators see it.
pub fn render_gateway(n: &NodeView) -> Option<Gateway> {
    let g = n.gateway.as_ref()?;
    Some(Gateway {
        ranges: g.ranges.iter().filter_map(|r| r.parse().ok()).collect(),
        nat: g.nat,
        metric: g.metric,
        healthy: n.health().ipv4,
        healthy6: n.health().ipv6,
        heard: n.health().heard,
        bgp: g.bgp,
        bgp_ranges: if g.bgp {
            n.bgp_ranges.to_vec()
        } else {
            Vec::new()
        },
    })
}

pub fn render_node(_network: &NetworkRow, n: &NodeView, now: u64) -> Node {
    Node {
        id: n.row.id.clone(),
        network: n.row.network.clone(),
        name: n.row.name.clone(),
        public_key: n.row.public_key.clone(),
        address: n.row.address,
        address6: n.row.address6,
        endpoint: endpoint_of(n),
        endpoint6: endpoint6_of(n),
        listen_port: n.row.listen_port,
        tags: n.row.tags.clone(),
        egress: render_gateway(n),
        last_seen: n.last_seen,
        online: is_online(n, now),
        handshakes: n.handshakes.to_vec(),
        candidates: candidates_of(n),
        nat: n.nat,
        relay_port: live_relay_port(n),
    }
}

/// Its relay port, while it is a live relay (`NodeView::live_relay`):
/// shown on the node, and to its peers, which measure their round trip to
/// it when they are behind NAT.
fn live_relay_port(n: &NodeView) -> Option<u16> {
    n.relay_port.filter(|_| n.live_relay().is_some())
}

/// The published endpoint (with the listen port when it names none), else
/// the observed one.
fn endpoint_of(n: &NodeView) -> Option<String> {
    match &n.row.endpoint {
        Some(e) => Some(with_port(e, n.row.listen_port)),
        None => n.observed_endpoint.clone(),
    }
}

/// The published IPv6 endpoint next to the IPv4 one, with the listen port
/// when it names none.
fn endpoint6_of(n: &NodeView) -> Option<String> {
    n.row
        .endpoint6
        .as_deref()
        .map(|e| with_port(e, n.row.listen_port))
}

/// `endpoint` (IP or IP:port, as published) with `port` when it names none.
fn with_port(endpoint: &str, port: u16) -> String {
    if endpoint.parse::<std::net::SocketAddr>().is_ok() {
        return endpoint.to_string();
    }
    match endpoint.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
        Ok(ip) => format!("{ip}:{port}"),
        Err(_) => format!("{endpoint}:{port}"),
    }
}

/// The candidates of a node that publishes no endpoint: one that does is
/// reached there.
fn candidates_of(n: &NodeView) -> Vec<String> {
    if n.row.endpoint.is_some() {
        Vec::new()
    } else {
        n.candidates.clone()
    }
}

/// Node `n` as a peer of the viewer `relays` was made for.
pub fn render_peer(n: &NodeView, relays: &Relays) -> Peer {
    let mut allowed_ips: Vec<IpNet> = Vec::new();
    if let Some(a) = n.row.address {
        allowed_ips.push(host_net(a.into()));
    }
    if let Some(a) = n.row.address6 {
        allowed_ips.push(host_net(a.into()));
    }
    let egress = render_gateway(n);
    if let Some(g) = &egress {
        allowed_ips.extend(g.all_ranges().copied());
    }
    Peer {
        node_id: n.row.id.clone(),
        name: n.row.name.clone(),
        public_key: n.row.public_key.clone(),
        endpoint: endpoint_of(n),
        endpoint6: endpoint6_of(n),
        allowed_ips,
        egress,
        candidates: candidates_of(n),
        nat: n.nat,
        relay: relays.path_to(n),
        relay_port: live_relay_port(n),
    }
}

/// What the hub's unit tests (here, `candidates`, `relays`) build their
/// hubs from.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::store::{NetworkRow, NodeRow};

    /// Network "mynet": 44.30.127.0/24, port 51820, keepalive 20 s.
    pub(crate) fn network() -> NetworkRow {
        NetworkRow {
            netid: "mynet".into(),
            addressrange: Some("44.30.127.0/24".into()),
            addressrange6: None,
            mtu: 1420,
            listen_port: 51820,
            persistent_keepalive: 20,
            created_at: 0,
        }
    }

    /// Node `id` (its name too) of "mynet", publishing `endpoint`.
    pub(crate) fn node(id: &str, endpoint: Option<&str>) -> NodeRow {
        NodeRow {
            id: id.into(),
            network: "mynet".into(),
            name: id.into(),
            public_key: format!("key-{id}"),
            credential_hash: format!("hash-{id}"),
            address: None,
            address6: None,
            endpoint: endpoint.map(String::from),
            endpoint6: None,
            listen_port: 51820,
            tags: Vec::new(),
            created_at: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn hub(gateways: &[&str], plain: &[&str]) -> Hub {
        let network = fixtures::network();
        let nodes = gateways
            .iter()
            .chain(plain)
            .map(|id| fixtures::node(id, None))
            .collect();
        let rows = gateways
            .iter()
            .map(|id| GatewayRow {
                node_id: (*id).into(),
                ranges: vec!["0.0.0.0/0".into()],
                nat: false,
                metric: 100,
                bgp: false,
            })
            .collect();
        let hub = Hub::load(1, vec![network], nodes, rows);
        for id in gateways.iter().chain(plain) {
            hub.stream_changed("mynet", id, 1);
            hub.upstream_reported("mynet", id, None, None);
        }
        hub
    }

    #[test]
    fn a_logged_change_shares_the_nodes_handshakes_instead_of_copying_them() {
        const NOW: u64 = 1_800_000_000;
        let hub = hub(&[], &["a", "b"]);
        let handshakes: Vec<PeerHandshake> = (0..1000)
            .map(|i| PeerHandshake {
                peer: format!("p{i}"),
                last_handshake: Some(NOW),
                rx_bytes: 1,
                tx_bytes: 1,
            })
            .collect();
        hub.node_reported("mynet", "a", NOW, handshakes, Vec::new());
        for revision in 2..12 {
            hub.node_changed(revision, "mynet", "a", |old| old.expect("a"));
        }
        let inner = hub.read();
        let view = &inner.networks["mynet"];
        let node = &view.nodes["a"].handshakes;
        assert_eq!(node.len(), 1000);
        assert_eq!(view.log.len(), 10);
        for change in &view.log {
            let logged = &change.node.as_ref().expect("the node").handshakes;
            assert!(Arc::ptr_eq(node, logged), "a change copied the handshakes");
        }
    }

    fn healthy(hub: &Hub, id: &str) -> bool {
        hub.node("mynet", id).is_some_and(|n| n.healthy())
    }

    #[test]
    fn a_gateway_is_healthy_per_family_and_its_silence_is_said_apart() {
        let hub = hub(&["b1"], &["n1"]);
        let t0 = Instant::now();
        hub.pulsed("mynet", "b1", t0, None, None);
        hub.upstream_reported("mynet", "b1", Some(true), Some(true));
        let health = |hub: &Hub| hub.node("mynet", "b1").map(|n| n.health());
        assert_eq!(
            health(&hub),
            Some(Health {
                ipv4: true,
                ipv6: true,
                heard: true
            })
        );
        // Its IPv6 session goes: IPv6 alone is unhealthy.
        assert!(hub.upstream_reported("mynet", "b1", Some(true), Some(false)));
        assert_eq!(
            health(&hub),
            Some(Health {
                ipv4: true,
                ipv6: false,
                heard: true
            })
        );
        let g = hub
            .node("mynet", "b1")
            .and_then(|n| render_gateway(&n))
            .map(|g| (g.healthy, g.healthy6, g.heard));
        assert_eq!(g, Some((true, false, true)));
        // Its mesh carries nothing: unhealthy for both.
        assert!(hub.pulsed("mynet", "b1", t0, None, Some(false)));
        assert_eq!(health(&hub).map(|h| (h.ipv4, h.ipv6)), Some((false, false)));
    }

    #[test]
    fn a_gateway_whose_pulses_stop_is_unhealthy_until_they_come_back() {
        let hub = hub(&["b1", "b2"], &["n1"]);
        let t0 = Instant::now();
        let lost = Duration::from_millis(600);
        for id in ["b1", "b2"] {
            assert!(
                !hub.pulsed("mynet", id, t0, Some(true), None),
                "healthy already"
            );
        }
        // b2 goes on pulsing, b1 does not.
        let t1 = t0 + Duration::from_millis(700);
        hub.pulsed("mynet", "b2", t1, Some(true), None);
        assert_eq!(
            hub.silence_quiet_gateways(t1, lost),
            vec![("mynet".to_string(), "b1".to_string())]
        );
        assert!(!healthy(&hub, "b1") && healthy(&hub, "b2"));
        assert!(healthy(&hub, "n1"), "not a gateway, never silenced");
        // A pulse again is not enough: its report may be stale; a new
        // report makes it healthy again.
        assert!(!hub.pulsed("mynet", "b1", t1, None, None));
        assert!(!healthy(&hub, "b1"));
        assert!(hub.upstream_reported("mynet", "b1", Some(true), None));
        assert!(healthy(&hub, "b1"));
        // A report of the upstream down (both families) makes it
        // unhealthy, too.
        assert!(hub.upstream_reported("mynet", "b1", Some(false), Some(false)));
        assert!(!healthy(&hub, "b1"));
    }

    #[test]
    fn gateways_going_quiet_together_are_the_controller_not_hearing() {
        let hub = hub(&["b1", "b2"], &[]);
        let t0 = Instant::now();
        for id in ["b1", "b2"] {
            hub.pulsed("mynet", id, t0, Some(true), None);
        }
        let later = t0 + Duration::from_secs(2);
        assert!(
            hub.silence_quiet_gateways(later, Duration::from_millis(600))
                .is_empty()
        );
        assert!(healthy(&hub, "b1") && healthy(&hub, "b2"));
        // A lone gateway is marked: its nodes fall back to their own route.
        let lone = self::hub(&["b1"], &[]);
        lone.pulsed("mynet", "b1", t0, Some(true), None);
        assert_eq!(
            lone.silence_quiet_gateways(later, Duration::from_millis(600)),
            vec![("mynet".to_string(), "b1".to_string())]
        );
        assert!(!healthy(&lone, "b1"));
    }

    #[test]
    fn a_closed_stream_forgets_pulses_ranges_and_the_report() {
        let hub = hub(&["b1"], &[]);
        let t0 = Instant::now();
        hub.pulsed("mynet", "b1", t0, Some(true), None);
        hub.bgp_ranges_reported("mynet", "b1", vec!["198.51.100.0/24".parse().expect("net")]);
        assert!(hub.stream_changed("mynet", "b1", -1), "health went with it");
        let n = hub.node("mynet", "b1").expect("b1");
        assert!(n.last_pulse.is_none() && n.bgp_ranges.is_empty() && !n.reported);
        // Back: a pulse alone does not make it healthy; a report does.
        hub.stream_changed("mynet", "b1", 1);
        hub.pulsed("mynet", "b1", t0, Some(true), None);
        assert!(!healthy(&hub, "b1"));
        assert!(hub.upstream_reported("mynet", "b1", None, None));
        assert!(healthy(&hub, "b1"));
    }
}
