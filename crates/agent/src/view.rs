//! `bgp4mesh show mesh`: the node's view of its mesh, per peer: the path
//! its packets take (direct, or none yet), the endpoint, the last
//! handshake, the round trip through the tunnel measured when asked, and
//! what the controller says of the peer's NAT.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use bgp4mesh_api::{MeshState, NatMapping};
use serde::Serialize;

use crate::probe::Prober;

/// How long `show mesh` waits for the probes' answers.
const RTT_WITHIN: Duration = Duration::from_secs(1);
/// A handshake this recent makes a path: WireGuard rekeys every 2
/// minutes while traffic flows, and gives a session up after 3.
const LIVE: Duration = Duration::from_secs(180);

/// What the daemon holds to answer `show mesh`: filled by the agent once
/// it runs.
#[derive(Default)]
pub struct MeshView {
    inner: Mutex<Option<Inner>>,
}

struct Inner {
    interface: String,
    device: Weak<dyn DeviceStatusSource>,
    /// The node and its peers, as last applied.
    node: NodeLine,
    peers: Vec<PeerLine>,
}

/// Where the view reads the device's peers from.
pub(crate) trait DeviceStatusSource: Send + Sync {
    fn peers(&self) -> Vec<bgp4mesh_wireguard::PeerStatus>;
    /// On a relay, what its forwarder did.
    fn relay(&self) -> Option<crate::relay_server::RelayStats>;
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct NodeLine {
    pub name: String,
    pub addresses: Vec<IpAddr>,
    pub nat: Option<NatMapping>,
    pub candidates: Vec<String>,
    /// The gateway (its name) the node's default route goes through, per
    /// family; `None`: its own (no healthy gateway, or it is one).
    pub exit4: Option<String>,
    pub exit6: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PeerLine {
    pub name: String,
    pub node_id: String,
    pub public_key: String,
    pub addresses: Vec<IpAddr>,
    pub nat: Option<NatMapping>,
    pub candidates: Vec<String>,
    /// The relay the controller gave the pair (its name), if any.
    pub relay: Option<String>,
    /// The device's endpoint for the peer while it goes through the relay.
    #[serde(skip)]
    relay_endpoint: Option<std::net::SocketAddr>,
}

/// One peer as `show mesh` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerPath {
    #[serde(flatten)]
    pub peer: PeerLine,
    /// `direct` or `relayed` (a handshake in the last 3 minutes, its
    /// endpoint the peer's own address or the relay's), or `none`.
    pub path: &'static str,
    pub endpoint: Option<String>,
    /// Unix seconds.
    pub last_handshake: Option<u64>,
    /// Milliseconds, through the tunnel, measured for this answer; `None`
    /// when no answer came within a second.
    pub rtt_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Shown {
    pub node: NodeLine,
    pub peers: Vec<PeerPath>,
    /// On a relay: its channels, what it forwarded and what it dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub relay: Option<crate::relay_server::RelayStats>,
}

impl std::fmt::Debug for MeshView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshView")
    }
}

impl MeshView {
    pub fn new() -> Arc<MeshView> {
        Arc::new(MeshView::default())
    }

    pub(crate) fn attach(&self, interface: &str, device: Weak<dyn DeviceStatusSource>) {
        if let Ok(mut inner) = self.inner.lock() {
            *inner = Some(Inner {
                interface: interface.to_string(),
                device,
                node: NodeLine::default(),
                peers: Vec::new(),
            });
        }
    }

    /// Takes in the state the agent applied.
    pub(crate) fn applied(
        &self,
        state: &MeshState,
        relayed: &HashMap<String, std::net::SocketAddr>,
        (exit4, exit6): (Option<&str>, Option<&str>),
    ) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let Some(inner) = inner.as_mut() else { return };
        let ips = |a: Option<std::net::Ipv4Addr>, b: Option<std::net::Ipv6Addr>| {
            a.map(IpAddr::V4)
                .into_iter()
                .chain(b.map(IpAddr::V6))
                .collect::<Vec<_>>()
        };
        inner.node = NodeLine {
            name: state.node.name.clone(),
            addresses: ips(state.node.address, state.node.address6),
            nat: state.node.nat,
            candidates: state.node.candidates.clone(),
            exit4: exit4.map(|id| name_of(state, id)),
            exit6: exit6.map(|id| name_of(state, id)),
        };
        inner.peers = state
            .peers
            .iter()
            .map(|p| PeerLine {
                name: p.name.clone(),
                node_id: p.node_id.clone(),
                public_key: p.public_key.clone(),
                addresses: p
                    .allowed_ips
                    .iter()
                    .filter(|n| n.prefix_len() == n.max_prefix_len())
                    .map(|n| n.addr())
                    .take(2)
                    .collect(),
                nat: p.nat,
                candidates: p.candidates.clone(),
                relay: p.relay.as_ref().map(|r| r.name.clone()),
                relay_endpoint: relayed.get(&p.node_id).copied(),
            })
            .collect();
    }

    /// The view now, with a round trip measured to every peer (blocking
    /// for up to a second: call it off the async threads).
    pub fn show(&self) -> anyhow::Result<Shown> {
        let (interface, device, node, peers) = {
            let inner = self
                .inner
                .lock()
                .map_err(|_| anyhow::anyhow!("the mesh view is poisoned"))?;
            let inner = inner
                .as_ref()
                .ok_or_else(|| anyhow::anyhow!("the mesh is not running"))?;
            (
                inner.interface.clone(),
                inner.device.clone(),
                inner.node.clone(),
                inner.peers.clone(),
            )
        };
        let device = device
            .upgrade()
            .ok_or_else(|| anyhow::anyhow!("the mesh is not running"))?;
        let status: HashMap<String, bgp4mesh_wireguard::PeerStatus> = device
            .peers()
            .into_iter()
            .map(|p| (p.public_key.to_base64(), p))
            .collect();
        let rtts = round_trips(&interface, &peers);
        let now = SystemTime::now();
        let peers = peers
            .into_iter()
            .map(|peer| {
                let s = status.get(&peer.public_key);
                let last = s.and_then(|s| s.last_handshake);
                let live = last
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age < LIVE);
                let rtt_ms = peer
                    .addresses
                    .iter()
                    .find_map(|a| rtts.get(a))
                    .map(|d| d.as_secs_f64() * 1000.0);
                let endpoint = s.and_then(|s| s.endpoint);
                let path = match (live, endpoint) {
                    (false, _) => "none",
                    (true, Some(e)) if Some(e) == peer.relay_endpoint => "relayed",
                    (true, _) => "direct",
                };
                PeerPath {
                    path,
                    endpoint: match (path, &peer.relay) {
                        ("relayed", Some(relay)) => Some(format!("via {relay}")),
                        _ => endpoint.map(|e| e.to_string()),
                    },
                    last_handshake: last
                        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    rtt_ms,
                    peer,
                }
            })
            .collect();
        Ok(Shown {
            node,
            peers,
            relay: device.relay(),
        })
    }
}

/// The name of peer `id` (its id when it has none).
fn name_of(state: &MeshState, id: &str) -> String {
    state
        .peers
        .iter()
        .find(|p| p.node_id == id)
        .map_or_else(|| id.to_string(), |p| p.name.clone())
}

/// One echo through the tunnel to each peer's first address; the round
/// trips of those answered within [`RTT_WITHIN`].
fn round_trips(interface: &str, peers: &[PeerLine]) -> HashMap<IpAddr, Duration> {
    let mut rtts = HashMap::new();
    let Ok(mut prober) = Prober::new(interface) else {
        return rtts;
    };
    let mut sent: HashMap<IpAddr, Instant> = HashMap::new();
    for address in peers.iter().filter_map(|p| p.addresses.first()) {
        prober.send(*address);
        sent.insert(*address, Instant::now());
    }
    let started = Instant::now();
    while started.elapsed() < RTT_WITHIN && rtts.len() < sent.len() {
        for answer in prober.answers() {
            if let Some(at) = sent.get(&answer.from) {
                rtts.entry(answer.from).or_insert_with(|| at.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    rtts
}
