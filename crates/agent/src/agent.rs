//! The node agent: `join` enrolls once; `run` holds the stream to the
//! controller and keeps the WireGuard device, the interface's addresses
//! and the routes to its peers' ranges equal to what the controller says.
//!
//! The last state applied is cached on disk: with the controller away the
//! agent keeps what it has (and comes back up from the cache after a
//! restart), and reconnects with backoff, resuming from its revision.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;
use bgp4mesh_api::{
    EnrollmentToken, JoinRequest, JoinResponse, MeshState, NodeReport, ReportedPeer, StreamEvent,
};
use bgp4mesh_kernel::links::Links;
use bgp4mesh_wireguard::{AnyDevice, Backend, DeviceConfig, DeviceOptions, Key, PeerConfig};
use futures::StreamExt;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot, watch};

use crate::client::Client;
use crate::probing::{Probing, Targets, Trust};
use crate::relay_client::RelayLink;
use crate::traversal::{self, Traversal};

/// Default place of the agent's files.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/bgp4mesh/agent";
/// Default WireGuard interface of the mesh.
pub const DEFAULT_INTERFACE: &str = "bgp4mesh0";
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// How long the first apply waits for tunnels to come up before it says
/// the mesh is ready (and a border starts BGP).
const HANDSHAKES_BEFORE_READY: Duration = Duration::from_secs(2);
/// How long after the mesh is ready a border waits at most for the
/// controller to call it healthy before it announces its block anyway.
const ANNOUNCE_ANYWAY: Duration = Duration::from_secs(10);
/// Routing table and firewall mark of the default route through the mesh
/// (wg-quick uses 51820 for both; ours differ so both can coexist).
pub const EGRESS_TABLE: u32 = 4400;
pub const EGRESS_MARK: u32 = 4400;

/// Which peer carries each egress range for this node.
///
/// Per range, among the peers whose gateway carries it (the operator's
/// ranges and the BGP-learned ones alike): the healthy ones first, then the
/// lowest metric, then the lowest node id, so every node picks the same
/// one and two borders offering one prefix fail over per prefix. A range
/// only unhealthy gateways carry stays with the best of them when no
/// healthy gateway covers it with a wider range, except a default route:
/// without a healthy exit the node keeps its own. Ranges this node carries
/// itself, ranges within its own mesh networks, and ranges that hold a
/// peer's endpoint are not sent into the tunnel.
#[derive(Debug, Default, PartialEq, Eq)]
struct Exits {
    /// Range → node id of the peer that carries it.
    chosen: std::collections::BTreeMap<IpNet, String>,
}

impl Exits {
    /// A gateway carries a range while it says it is healthy for the
    /// range's family, and the controller hears it or this node's probes
    /// of it are answered; never when the node's probes found it dead
    /// ([`Trust`], [`crate::probing`]).
    fn of(state: &MeshState, own_networks: &[IpNet], trust: &Trust) -> Exits {
        let usable = |peer: &bgp4mesh_api::Peer, g: &bgp4mesh_api::Gateway, range: &IpNet| {
            g.healthy_for(range)
                && !trust.distrusted.contains(&peer.node_id)
                && (g.heard || trust.answering.contains(&peer.node_id))
        };
        let own: Vec<IpNet> = state
            .node
            .egress
            .as_ref()
            .map(|g| g.all_ranges().copied().collect())
            .unwrap_or_default();
        type Rank = (bool, u32, String);
        let mut best: std::collections::BTreeMap<IpNet, Rank> = Default::default();
        for peer in &state.peers {
            let Some(g) = &peer.egress else { continue };
            for range in g.all_ranges() {
                if own.contains(range) || own_networks.iter().any(|a| a.contains(range)) {
                    continue;
                }
                let healthy = usable(peer, g, range);
                if range.prefix_len() == 0 && !healthy {
                    continue;
                }
                let rank = (!healthy, g.metric, peer.node_id.clone());
                match best.get(range) {
                    Some(have) if *have <= rank => {}
                    _ => {
                        best.insert(*range, rank);
                    }
                }
            }
        }
        // An unhealthy gateway keeps a range only when no healthy one covers
        // it (a default route included): else its traffic goes the way of
        // the covering range instead of into a dead gateway.
        let healthy_cover: Vec<IpNet> = state
            .peers
            .iter()
            .filter_map(|p| Some((p, p.egress.as_ref()?)))
            .flat_map(|(p, g)| g.all_ranges().filter(move |r| usable(p, g, r)).copied())
            .collect();
        // A range holding a peer's endpoint would route the tunnel's own
        // packets into the tunnel (wg-quick guards only the default route).
        let endpoints: Vec<std::net::IpAddr> = state
            .peers
            .iter()
            .flat_map(|p| [p.endpoint.as_deref(), p.endpoint6.as_deref()])
            .flatten()
            .filter_map(|e| e.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip())
            .collect();
        Exits {
            chosen: best
                .into_iter()
                .filter(|(range, (unhealthy, _, _))| {
                    !*unhealthy || !healthy_cover.iter().any(|c| c.contains(range))
                })
                .filter(|(range, _)| {
                    range.prefix_len() == 0 || !endpoints.iter().any(|e| range.contains(e))
                })
                .map(|(r, (_, _, id))| (r, id))
                .collect(),
        }
    }

    /// Whether `peer` is the exit for `range`.
    fn is_exit(&self, range: &IpNet, peer: &str) -> bool {
        self.chosen.get(range).is_some_and(|id| id == peer)
    }

    /// The default route's exit of one address family.
    fn default_exit(&self, v6: bool) -> Option<&str> {
        let default: IpNet = if v6 {
            IpNet::V6(ipnet::Ipv6Net::default())
        } else {
            IpNet::V4(ipnet::Ipv4Net::default())
        };
        self.chosen.get(&default).map(String::as_str)
    }

    /// The routes into the tunnel other than the default routes.
    fn routes(&self) -> Vec<IpNet> {
        self.chosen
            .keys()
            .filter(|r| r.prefix_len() > 0)
            .copied()
            .collect()
    }
}

/// A peer's mesh address of one family: its host route inside the
/// network's address range.
fn mesh_address(
    state: &MeshState,
    peer: &bgp4mesh_api::Peer,
    v6: bool,
) -> Option<std::net::IpAddr> {
    let range = if v6 {
        state.network.addressrange6.as_deref()
    } else {
        state.network.addressrange.as_deref()
    }?;
    let range: IpNet = range.parse().ok()?;
    peer.allowed_ips
        .iter()
        .find(|r| r.prefix_len() == r.max_prefix_len() && range.contains(&r.addr()))
        .map(IpNet::addr)
}

/// What the probe thread probes in `state`: on a gateway its peers, on a
/// node the gateways of its default routes.
fn probe_targets(state: &MeshState, exit4: Option<&str>, exit6: Option<&str>) -> Targets {
    let mut targets = Targets::default();
    if state.node.egress.is_some() {
        // Nodes, not the other gateways: another border failing is not
        // this one's mesh failing.
        targets.mesh = state
            .peers
            .iter()
            .filter(|p| p.egress.is_none())
            .filter_map(|p| {
                let address =
                    mesh_address(state, p, false).or_else(|| mesh_address(state, p, true))?;
                Some((p.public_key.clone(), address))
            })
            .collect();
    }
    for (exit, v6) in [(exit4, false), (exit6, true)] {
        let Some(id) = exit else { continue };
        if targets.exits.iter().any(|(e, _)| e == id) {
            continue;
        }
        if let Some(peer) = state.peers.iter().find(|p| p.node_id == id)
            && let Some(address) =
                mesh_address(state, peer, v6).or_else(|| mesh_address(state, peer, !v6))
        {
            targets.exits.push((id.to_string(), address));
        }
    }
    targets
}

/// The node's mesh addresses with their network's prefix length.
fn own_addresses(state: &MeshState) -> Result<Vec<IpNet>> {
    let mut addresses = Vec::new();
    if let (Some(a), Some(range)) = (state.node.address, &state.network.addressrange)
        && let Ok(range) = range.parse::<IpNet>()
    {
        addresses.push(IpNet::new(a.into(), range.prefix_len())?);
    }
    if let (Some(a), Some(range)) = (state.node.address6, &state.network.addressrange6)
        && let Ok(range) = range.parse::<IpNet>()
    {
        addresses.push(IpNet::new(a.into(), range.prefix_len())?);
    }
    Ok(addresses)
}

/// The networks of the node's mesh addresses (reached directly, never
/// through an exit).
fn own_networks(state: &MeshState) -> Vec<IpNet> {
    own_addresses(state)
        .unwrap_or_default()
        .iter()
        .map(IpNet::trunc)
        .collect()
}

/// What `join` leaves in the state directory (`node.json`, mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Enrollment {
    pub server: String,
    pub fingerprint: Option<String>,
    /// The other controllers on the same database (from the token): the
    /// agent moves to the next when its stream breaks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<bgp4mesh_api::ControllerAddress>,
    pub network: String,
    pub node_id: String,
    pub name: String,
    pub credential: String,
}

#[derive(Debug, Clone, Default)]
pub struct JoinOptions {
    pub name: Option<String>,
    pub endpoint: Option<String>,
    /// A public IPv6 endpoint next to an IPv4 `endpoint`.
    pub endpoint6: Option<String>,
    pub listen_port: Option<u16>,
    pub address: Option<std::net::Ipv4Addr>,
    /// A pinned IPv6 mesh address; must be a host address of the
    /// network's IPv6 range.
    pub address6: Option<std::net::Ipv6Addr>,
    /// Join again although the state directory holds an enrollment.
    pub force: bool,
}

/// Writes `contents` to `path` for its owner only (0600), through a
/// temporary file renamed into place, so a reader never sees half a secret.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub fn decode_token(text: &str) -> Result<EnrollmentToken> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim())
        .context("this is not an enrollment token (not base64url)")?;
    serde_json::from_slice(&bytes).context("this is not an enrollment token (not its JSON)")
}

/// Enrolls this machine: makes the key pair here, registers the public key
/// with the controller named in the token, stores the credential.
pub async fn join(token: &str, state_dir: &Path, options: JoinOptions) -> Result<JoinResponse> {
    let token = decode_token(token)?;
    // Before anything is touched or sent: an http:// server in a token
    // that pins a certificate would get the secret in cleartext.
    crate::client::check_server(&token.server, token.fingerprint.as_deref())
        .context("the enrollment token")?;
    let node_file = state_dir.join("node.json");
    if node_file.exists() && !options.force {
        let old: Enrollment = serde_json::from_slice(&std::fs::read(&node_file)?)
            .with_context(|| format!("reading {}", node_file.display()))?;
        bail!(
            "already joined network {:?} as {:?} ({}); use --force to join again",
            old.network,
            old.name,
            node_file.display()
        );
    }
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let name = match options.name {
        Some(n) => n,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "node".into()),
    };
    let private = Key::generate_private();
    let client = Client::new(&token.server, token.fingerprint.as_deref(), None)?;
    let response: JoinResponse = client
        .post(
            "/api/join",
            &JoinRequest {
                secret: token.secret.clone(),
                name: name.clone(),
                public_key: private.public_key().to_base64(),
                endpoint: options.endpoint,
                endpoint6: options.endpoint6,
                listen_port: options.listen_port,
                address: options.address,
                address6: options.address6,
            },
        )
        .await?;
    write_private(
        &state_dir.join("private.key"),
        private.to_base64().as_bytes(),
    )?;
    let enrollment = Enrollment {
        server: token.server,
        fingerprint: token.fingerprint,
        servers: token.servers,
        network: response.node.network.clone(),
        node_id: response.node.id.clone(),
        name,
        credential: response.credential.clone(),
    };
    write_private(&node_file, &serde_json::to_vec_pretty(&enrollment)?)?;
    let _ = std::fs::remove_file(state_dir.join("mesh.json"));
    Ok(response)
}

/// How `run` runs the mesh.
#[derive(Debug)]
pub struct AgentOptions {
    pub state_dir: PathBuf,
    pub interface: String,
    pub backend: Backend,
    /// On a border: whether a BGP session with an upstream is up. Reported
    /// to the controller at once on every change, so nodes leave a border
    /// that lost its upstream.
    pub upstream: Option<tokio::sync::watch::Receiver<bgp4mesh_api::UpstreamFamilies>>,
    /// On a border with `[mesh] export`: the BGP-learned prefixes its
    /// export policy takes. Reported at once on every change (and with
    /// every report), for the controller to hand out as egress ranges.
    pub bgp_ranges: Option<tokio::sync::watch::Receiver<Vec<IpNet>>>,
    /// Fired once the mesh is applied the first time (from the controller
    /// or the cache): a border starts BGP then.
    pub ready: Option<tokio::sync::oneshot::Sender<()>>,
    /// Set to true, once, when a border may announce its block: when the
    /// controller says this gateway is healthy (the nodes move their exit
    /// in the same revision), when the node is no gateway, or
    /// `ANNOUNCE_ANYWAY` after the mesh was ready (a controller that does
    /// not answer must not keep the block off the Internet).
    pub announce: Option<tokio::sync::watch::Sender<bool>>,
    /// Filled once the mesh runs, for `show mesh`.
    pub view: Option<Arc<crate::view::MeshView>>,
    /// Relay for pairs behind NAT on this UDP port (`[mesh] relay`).
    pub relay_port: Option<u16>,
    /// Told the mesh's addresses after each state applied, for a layer-2
    /// overlay over the mesh (`[overlay] over = ["mesh"]`).
    pub wires: Option<tokio::sync::watch::Sender<MeshWires>>,
}

/// What a layer-2 overlay over the mesh needs: the mesh's interface, this
/// node's mesh addresses, and each peer's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshWires {
    pub interface: String,
    pub address: Option<std::net::Ipv4Addr>,
    pub address6: Option<std::net::Ipv6Addr>,
    pub peers: Vec<MeshWirePeer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshWirePeer {
    pub name: String,
    pub address: Option<std::net::Ipv4Addr>,
    pub address6: Option<std::net::Ipv6Addr>,
}

impl MeshWires {
    fn of(state: &MeshState, interface: &str) -> MeshWires {
        let host = |net: &IpNet| net.prefix_len() == net.max_prefix_len();
        let mut peers: Vec<MeshWirePeer> = state
            .peers
            .iter()
            .map(|p| MeshWirePeer {
                name: p.name.clone(),
                address: p.allowed_ips.iter().find_map(|n| match n {
                    IpNet::V4(v4) if host(n) => Some(v4.addr()),
                    _ => None,
                }),
                address6: p.allowed_ips.iter().find_map(|n| match n {
                    IpNet::V6(v6) if host(n) => Some(v6.addr()),
                    _ => None,
                }),
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name));
        MeshWires {
            interface: interface.to_string(),
            address: state.node.address,
            address6: state.node.address6,
            peers,
        }
    }
}

impl Clone for AgentOptions {
    fn clone(&self) -> AgentOptions {
        AgentOptions {
            state_dir: self.state_dir.clone(),
            interface: self.interface.clone(),
            backend: self.backend,
            upstream: self.upstream.clone(),
            bgp_ranges: self.bgp_ranges.clone(),
            ready: None,
            announce: None,
            view: self.view.clone(),
            relay_port: self.relay_port,
            wires: self.wires.clone(),
        }
    }
}

impl Default for AgentOptions {
    fn default() -> AgentOptions {
        AgentOptions {
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            interface: DEFAULT_INTERFACE.to_string(),
            backend: Backend::Auto,
            upstream: None,
            bgp_ranges: None,
            ready: None,
            announce: None,
            view: None,
            relay_port: None,
            wires: None,
        }
    }
}

struct Mesh {
    options: AgentOptions,
    /// The probes through the mesh: a gateway's own mesh, a node's exits.
    probing: Probing,
    private: Key,
    device: AnyDevice,
    links: Links,
    /// Whether our NAT table is in place (None: not set since start).
    nat: std::sync::Mutex<Option<bool>>,
    /// The default routes' exits last applied (IPv4, IPv6), to log changes.
    exits: std::sync::Mutex<(Option<String>, Option<String>)>,
    /// Endpoint discovery and hole punching ([`crate::traversal`]).
    traversal: Traversal,
    /// The controller's discovery port, as the last state applied says.
    discovery_port: watch::Sender<Option<u16>>,
    /// Per peer (node id) carried by a relay: its link there.
    relay_links: std::sync::Mutex<std::collections::HashMap<String, RelayLink>>,
    /// The state last applied, for the punches that are due without a
    /// change ([`Mesh::punch_due`]).
    last_state: std::sync::Mutex<Option<Arc<MeshState>>>,
    /// This node's relay, with `[mesh] relay = true`.
    relay_server: Option<crate::relay_server::RelayServer>,
    /// The peers whose tunnel runs over their IPv6 endpoint.
    ipv6_paths: crate::ipv6_paths::Ipv6Paths,
}

impl Mesh {
    /// Brings the device, addresses and routes to `state`.
    async fn apply(&self, state: &MeshState) -> Result<()> {
        let behind_nat = state.node.endpoint.is_none();
        let keepalive = (behind_nat && state.network.persistent_keepalive > 0)
            .then_some(state.network.persistent_keepalive);
        let own_networks = own_networks(state);
        let exits = Exits::of(state, &own_networks, &self.probing.trust());
        let exit4 = exits.default_exit(false);
        let exit6 = exits.default_exit(true);
        self.probing.set_targets(probe_targets(state, exit4, exit6));
        {
            let now = (exit4.map(str::to_string), exit6.map(str::to_string));
            let mut last = self
                .exits
                .lock()
                .map_err(|_| anyhow::anyhow!("exit state lock poisoned"))?;
            if *last != now {
                tracing::info!(ipv4 = ?now.0, ipv6 = ?now.1, "default routes through the mesh: exits");
                *last = now;
            }
        }
        let relayed = self.relay_links(state);
        let fwmark = if exit4.is_some() || exit6.is_some() {
            EGRESS_MARK
        } else {
            0
        };
        // A peer with an IPv6 endpoint is sent to there when this node
        // routes it outside the mesh; its IPv4 endpoint is the fallback.
        let mut on_ipv6: Vec<(String, Key, std::net::SocketAddr, std::net::SocketAddr)> =
            Vec::new();
        let peers = state
            .peers
            .iter()
            .filter_map(|p| {
                let key = Key::from_base64(&p.public_key).ok()?;
                let mut peer = PeerConfig::new(key);
                // Both behind NAT: the endpoint comes from punches and the
                // pair's relay only.
                if !Traversal::both_behind_nat(state, p) {
                    peer.endpoint = p.endpoint.as_deref().and_then(|e| e.parse().ok());
                    let ipv6 = p
                        .endpoint6
                        .as_deref()
                        .and_then(|e| e.parse::<std::net::SocketAddr>().ok())
                        .filter(|e| {
                            crate::ipv6_paths::reaches_outside_mesh(*e, fwmark, state.node.address6)
                        });
                    if let (Some(v6), Some(v4)) = (ipv6, peer.endpoint) {
                        on_ipv6.push((p.node_id.clone(), key, v6, v4));
                        peer.endpoint = Some(v6);
                    }
                } else if self.device.backend() == Backend::Kernel {
                    peer.endpoint = relayed.get(&p.node_id).copied();
                }
                // An egress range belongs to one peer: its chosen exit. The
                // rest (the peer's own addresses) stays.
                let carries = |r: &IpNet| {
                    p.egress
                        .as_ref()
                        .is_some_and(|g| g.all_ranges().any(|x| x == r))
                };
                peer.allowed_ips = p
                    .allowed_ips
                    .iter()
                    .filter(|r| !carries(r) || exits.is_exit(r, &p.node_id))
                    .copied()
                    .collect();
                peer.persistent_keepalive = keepalive;
                Some(peer)
            })
            .collect();
        let desired = DeviceConfig {
            private_key: Some(self.private),
            listen_port: state.node.listen_port,
            fwmark,
            peers,
        };
        self.device
            .configure(&desired)
            .context("configuring the WireGuard device")?;
        if let Some(view) = &self.options.view {
            view.applied(state, &relayed, (exit4, exit6));
        }
        if let Some(server) = &self.relay_server {
            let key = state
                .relay_key
                .as_deref()
                .and_then(bgp4mesh_api::relay::from_hex::<32>);
            server.set_key(key);
        }
        if let Ok(mut last) = self.last_state.lock() {
            *last = Some(Arc::new(state.clone()));
        }
        self.discovery_port
            .send_if_modified(|p| std::mem::replace(p, state.network.discovery_port) != *p);
        for p in &state.peers {
            let Ok(key) = Key::from_base64(&p.public_key) else {
                continue;
            };
            let fallback = relayed.get(&p.node_id).copied();
            if let Err(e) = self.device.set_fallback_endpoint(&key, fallback)
                && e.kind() != std::io::ErrorKind::Unsupported
            {
                tracing::debug!(peer = %p.name, "relay endpoint: {e}");
            }
            let second = on_ipv6
                .iter()
                .find(|(id, ..)| *id == p.node_id)
                .map(|(.., v4)| *v4);
            if let Err(e) = self.device.set_second_endpoint(&key, second)
                && e.kind() != std::io::ErrorKind::Unsupported
            {
                tracing::debug!(peer = %p.name, "IPv4 endpoint as the second: {e}");
            }
        }
        self.ipv6_paths.set(
            on_ipv6
                .into_iter()
                .map(|(id, key, v6, _)| (id, key, v6))
                .collect(),
        );
        let live = self.recent_peers(Duration::from_secs(180));
        let through_relay = self.through_relay(&relayed);
        self.traversal
            .punch(&self.device, state, &live, &through_relay);
        let addresses = own_addresses(state)?;
        let name = &self.options.interface;
        self.links
            .up(name, Some(u32::from(state.network.mtu)))
            .await?;
        self.links.set_addresses(name, &addresses).await?;
        if let Some(wires) = &self.options.wires {
            let now = MeshWires::of(state, name);
            wires.send_if_modified(|w| {
                let changed = *w != now;
                *w = now;
                changed
            });
        }
        // Egress ranges other than the default route go into the tunnel
        // (the default route needs policy routing, below).
        let routes = exits.routes();
        self.links.set_device_routes(name, &routes).await?;
        self.links
            .set_default_through(
                name,
                EGRESS_TABLE,
                EGRESS_MARK,
                exit4.is_some(),
                exit6.is_some(),
            )
            .await?;
        // A gateway forwards between the mesh and the world.
        if let Some(g) = &state.node.egress {
            bgp4mesh_kernel::links::sysctl("net.ipv4.ip_forward", "1")?;
            if g.all_ranges().any(|r| r.addr().is_ipv6()) || state.node.address6.is_some() {
                bgp4mesh_kernel::links::sysctl("net.ipv6.conf.all.forwarding", "1")?;
            }
        }
        // NAT on egress (`natEnabled: yes`): mesh traffic leaves with the
        // gateway's own address. The seed's setup has it off: mesh
        // addresses are public and the border only routes.
        let nat = state.node.egress.as_ref().is_some_and(|g| g.nat);
        let mut applied = self
            .nat
            .lock()
            .map_err(|_| anyhow::anyhow!("NAT state lock poisoned"))?;
        if *applied != Some(nat) {
            bgp4mesh_kernel::nat::set_masquerade(name, nat)?;
            if nat || applied.is_some() {
                tracing::info!(
                    "NAT on egress {} for {name}",
                    if nat { "on" } else { "off" }
                );
            }
            *applied = Some(nat);
        }
        Ok(())
    }

    /// Brings the relay links to the state: one per peer the controller
    /// gave a relay path (both behind NAT), moved when the path moves.
    /// Returns each relayed peer's endpoint for the device (its link's
    /// loopback address).
    fn relay_links(
        &self,
        state: &MeshState,
    ) -> std::collections::HashMap<String, std::net::SocketAddr> {
        let mut endpoints = std::collections::HashMap::new();
        let Ok(mut links) = self.relay_links.lock() else {
            return endpoints;
        };
        let device_port = self.device.status().map(|s| s.listen_port).unwrap_or(0);
        let wanted: Vec<(&bgp4mesh_api::Peer, &bgp4mesh_api::RelayPath)> = state
            .peers
            .iter()
            .filter(|p| Traversal::both_behind_nat(state, p))
            .filter_map(|p| Some((p, p.relay.as_ref()?)))
            .collect();
        links.retain(|id, _| wanted.iter().any(|(p, _)| &p.node_id == id));
        for (peer, path) in wanted {
            let result = match links.get(&peer.node_id) {
                Some(link) => link.set_path(path),
                None if device_port != 0 => RelayLink::start(path, device_port).map(|link| {
                    tracing::info!(peer = %peer.name, relay = %path.name, "relay link to {}", path.address);
                    links.insert(peer.node_id.clone(), link);
                }),
                None => Ok(()),
            };
            if let Err(e) = result {
                tracing::warn!(peer = %peer.name, relay = %path.name, "relay link: {e}");
            }
            if let Some(endpoint) = links.get(&peer.node_id).and_then(|l| l.endpoint().ok()) {
                endpoints.insert(peer.node_id.clone(), endpoint);
            }
        }
        endpoints
    }

    /// Punches again the peers whose time came ([`Traversal::punch`]),
    /// every second: a relayed pair tries for a direct path every few
    /// seconds, one that failed every half minute.
    async fn punch_due(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let state = self.last_state.lock().ok().and_then(|s| s.clone());
            let Some(state) = state else { continue };
            let relayed: std::collections::HashMap<String, std::net::SocketAddr> = self
                .relay_links
                .lock()
                .map(|links| {
                    links
                        .iter()
                        .filter_map(|(id, l)| Some((id.clone(), l.endpoint().ok()?)))
                        .collect()
                })
                .unwrap_or_default();
            let live = self.recent_peers(Duration::from_secs(180));
            let through_relay = self.through_relay(&relayed);
            self.traversal
                .punch(&self.device, &state, &live, &through_relay);
            self.ipv6_paths.probe_due(&self.device);
        }
    }

    /// Measures the round trips to the live relays every
    /// [`traversal::MEASURE_RELAYS_EVERY`] while this node is behind NAT
    /// (the controller prefers near relays for its pairs); `measured` is
    /// notified after the first, for a report at once.
    async fn measure_relays(self: Arc<Self>, measured: Arc<Notify>) {
        loop {
            let state = self.last_state.lock().ok().and_then(|s| s.clone());
            let relays = state
                .as_ref()
                .filter(|s| !s.node.candidates.is_empty())
                .map(|s| traversal::relays_of(s))
                .unwrap_or_default();
            let wait = if relays.is_empty() {
                Duration::from_secs(1)
            } else {
                let rtts = tokio::task::spawn_blocking(move || traversal::measure_relays(&relays))
                    .await
                    .unwrap_or_default();
                tracing::debug!(?rtts, "round trips to the relays");
                if self.traversal.set_relay_rtts(rtts) {
                    measured.notify_one();
                }
                traversal::MEASURE_RELAYS_EVERY
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// The peers (node ids) whose device endpoint is their relay link now.
    fn through_relay(
        &self,
        relayed: &std::collections::HashMap<String, std::net::SocketAddr>,
    ) -> std::collections::BTreeSet<String> {
        let endpoints: std::collections::HashSet<std::net::SocketAddr> = self
            .device
            .status()
            .map(|s| s.peers.iter().filter_map(|p| p.endpoint).collect())
            .unwrap_or_default();
        relayed
            .iter()
            .filter(|(_, e)| endpoints.contains(e))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Waits (at most `within`) until every peer with an endpoint has
    /// completed a handshake with us. A border announces the block only
    /// after this: the moment the ISP sends return traffic our way, the
    /// tunnels it goes into must be up, or the first packets are lost
    /// while a handshake is made (seen as 1-3 lost pings when a border
    /// came back).
    async fn wait_for_handshakes(&self, within: Duration) {
        let started = std::time::Instant::now();
        loop {
            let pending = match self.device.status() {
                Ok(status) => status
                    .peers
                    .iter()
                    .filter(|p| p.endpoint.is_some() && p.last_handshake.is_none())
                    .count(),
                Err(_) => 0,
            };
            if pending == 0 {
                return;
            }
            if started.elapsed() >= within {
                tracing::info!("{pending} peer(s) without a handshake after {within:?}; going on");
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The peers (public keys, base64) whose last handshake is younger
    /// than `within`.
    fn recent_peers(&self, within: Duration) -> std::collections::BTreeSet<String> {
        let now = std::time::SystemTime::now();
        match self.device.status() {
            Ok(status) => status
                .peers
                .iter()
                .filter(|p| {
                    p.last_handshake
                        .and_then(|t| now.duration_since(t).ok())
                        .is_some_and(|age| age < within)
                })
                .map(|p| p.public_key.to_base64())
                .collect(),
            Err(_) => Default::default(),
        }
    }

    fn report(&self) -> NodeReport {
        let mut report = NodeReport::default();
        if let Ok(status) = self.device.status() {
            // The listen port is the controller's to set; the report only
            // says what the node sees.
            report.peers = status
                .peers
                .iter()
                .map(|p| ReportedPeer {
                    public_key: p.public_key.to_base64(),
                    endpoint: p.endpoint.map(|e| e.to_string()),
                    last_handshake: p
                        .last_handshake
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                })
                .collect();
        }
        report.relay_port = self.relay_server.as_ref().map(|r| r.port());
        report.relay_rtts = self.traversal.relay_rtts();
        if let Some(found) = self.traversal.found() {
            report.candidates = Some(found.candidates.iter().map(|c| c.to_string()).collect());
            report.nat = found.nat;
        }
        report
    }

    /// Runs endpoint discovery whenever the controller has a discovery
    /// service: at once, again every [`traversal::DISCOVER_EVERY`] and
    /// when the service's port changes; `found` is notified when the
    /// candidates changed, for a report at once.
    async fn discover(self: Arc<Self>, server: String, found: Arc<Notify>) {
        let mut port = self.discovery_port.subscribe();
        loop {
            let current = *port.borrow_and_update();
            if let Some(p) = current {
                match self.discover_once(&server, p).await {
                    Ok(true) => found.notify_one(),
                    Ok(false) => {}
                    Err(e) => tracing::info!("endpoint discovery: {e:#}"),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(traversal::DISCOVER_EVERY) => {}
                changed = port.changed() => if changed.is_err() { return },
            }
        }
    }

    /// One discovery against the controller's host at `port`; true when
    /// the candidates changed.
    async fn discover_once(self: &Arc<Self>, server: &str, port: u16) -> Result<bool> {
        let url = reqwest::Url::parse(server).context("the controller's URL")?;
        let host = url
            .host_str()
            .context("the controller's URL has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let to = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => std::net::SocketAddr::new(ip, port),
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .with_context(|| format!("resolving {host}"))?
                .next()
                .with_context(|| format!("{host} has no address"))?,
        };
        let local = self.links.host_addresses(&self.options.interface).await?;
        let listen_port = self.device.status()?.listen_port;
        let mesh = Arc::clone(self);
        let found = tokio::task::spawn_blocking(move || {
            traversal::discover(&mesh.device, to, &local, listen_port)
        })
        .await??;
        let changed = self.traversal.set_found(found.clone());
        if changed {
            tracing::info!(nat = ?found.nat, candidates = ?found.candidates, "endpoint discovery");
        }
        Ok(changed)
    }
}

impl crate::view::DeviceStatusSource for Mesh {
    fn peers(&self) -> Vec<bgp4mesh_wireguard::PeerStatus> {
        self.device.status().map(|s| s.peers).unwrap_or_default()
    }

    fn relay(&self) -> Option<crate::relay_server::RelayStats> {
        self.relay_server.as_ref().map(|r| r.stats())
    }
}

/// Waits for the next change of a watched value; never, without one.
async fn changed_or_never<T>(
    watch: &mut Option<tokio::sync::watch::Receiver<T>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// Opens the announcement gate `ANNOUNCE_ANYWAY` from now whatever the
/// controller says.
fn announce_anyway(gate: &Option<Arc<AnnounceGate>>) {
    if let Some(gate) = gate.clone() {
        tokio::spawn(async move {
            tokio::time::sleep(ANNOUNCE_ANYWAY).await;
            gate.permit(&format!(
                "{ANNOUNCE_ANYWAY:?} passed without the controller saying this exit is healthy"
            ));
        });
    }
}

/// A border's announcement gate (the BGP driver holds the block back while
/// it is closed): open while the border may announce (the controller made
/// it an exit, or `ANNOUNCE_ANYWAY` passed) and its mesh carries traffic
/// (the probes, [`crate::probing`]). Opens and closes any number of times.
struct AnnounceGate {
    tx: watch::Sender<bool>,
    permitted: AtomicBool,
    mesh_ok: AtomicBool,
}

impl AnnounceGate {
    fn new(tx: watch::Sender<bool>) -> AnnounceGate {
        AnnounceGate {
            tx,
            permitted: AtomicBool::new(false),
            mesh_ok: AtomicBool::new(true),
        }
    }

    fn permit(&self, why: &str) {
        if !self.permitted.swap(true, Ordering::Relaxed) {
            tracing::info!("may announce: {why}");
        }
        self.refresh();
    }

    fn set_mesh(&self, carries: bool) {
        self.mesh_ok.store(carries, Ordering::Relaxed);
        self.refresh();
    }

    fn refresh(&self) {
        let open = self.permitted.load(Ordering::Relaxed) && self.mesh_ok.load(Ordering::Relaxed);
        self.tx
            .send_if_modified(|was| std::mem::replace(was, open) != open);
    }
}

/// What one stream event did to the mesh state.
#[derive(Debug, PartialEq, Eq)]
enum Applied {
    /// The state changed: bring the mesh to it and cache it.
    Changed,
    /// Only the revision moved (a heartbeat): nothing to do.
    Unchanged,
    /// The controller removed this node: the agent stops.
    NodeRemoved,
    /// A change came before any snapshot, so it cannot be applied: the
    /// stream starts over.
    BeforeSnapshot,
}

/// Takes one event into `state`. Every variant is named, so a new kind of
/// event does not compile until it is handled here.
fn apply_event(state: &mut Option<MeshState>, event: StreamEvent) -> Applied {
    match event {
        StreamEvent::Snapshot(s) => {
            *state = Some(s);
            Applied::Changed
        }
        StreamEvent::Heartbeat { revision } => {
            if let Some(s) = state {
                s.revision = revision;
            }
            Applied::Unchanged
        }
        StreamEvent::Removed { .. } => Applied::NodeRemoved,
        StreamEvent::PeerUpsert { revision, peer } => change(state, revision, |s| {
            s.peers.retain(|p| p.node_id != peer.node_id);
            s.peers.push(peer);
        }),
        StreamEvent::PeerRemove { revision, node_id } => change(state, revision, |s| {
            s.peers.retain(|p| p.node_id != node_id);
        }),
        StreamEvent::SelfUpdate {
            revision,
            node,
            network,
            relay_key,
        } => change(state, revision, |s| {
            s.node = node;
            s.network = network;
            s.relay_key = relay_key;
        }),
    }
}

/// A change to the state a snapshot brought, at `revision`.
fn change(
    state: &mut Option<MeshState>,
    revision: u64,
    change: impl FnOnce(&mut MeshState),
) -> Applied {
    let Some(s) = state else {
        return Applied::BeforeSnapshot;
    };
    s.revision = revision;
    change(s);
    Applied::Changed
}

/// Whether the controller's state lets this node's block be announced:
/// the node is no gateway, or the controller has it healthy.
fn may_announce(s: &MeshState) -> bool {
    s.node.egress.as_ref().is_none_or(|g| g.usable())
}

/// Reports what the node sees (its peers; on a border, its upstream and
/// BGP-learned ranges) to the controller: every `REPORT_EVERY`, at once
/// when a stream opens or the border's upstream changes, and when its
/// BGP-learned ranges change, at most one in `RANGES_EVERY` for those (a
/// table being loaded changes them many times in a row).
struct Reporter {
    mesh: Arc<Mesh>,
    client: Client,
    upstream: Option<watch::Receiver<bgp4mesh_api::UpstreamFamilies>>,
    bgp_ranges: Option<watch::Receiver<Vec<IpNet>>>,
    /// Notified when a stream to the controller opens, or a gateway's
    /// pulses are heard again after silence.
    connected: Arc<Notify>,
    /// Notified when endpoint discovery found other candidates.
    found: Arc<Notify>,
}

/// The shortest time between two reports for changed BGP-learned ranges.
const RANGES_EVERY: Duration = Duration::from_millis(200);

impl Reporter {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(REPORT_EVERY);
        let mut ranges_sent: Option<std::time::Instant> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.connected.notified() => {}
                _ = self.found.notified() => {}
                changed = changed_or_never(&mut self.upstream) => {
                    if changed.is_err() {
                        self.upstream = None;
                        continue;
                    }
                    if let Some(w) = &self.upstream {
                        let up = *w.borrow();
                        tracing::info!(ipv4 = up.ipv4, ipv6 = up.ipv6, "BGP upstream changed");
                    }
                }
                changed = changed_or_never(&mut self.bgp_ranges) => {
                    if changed.is_err() {
                        self.bgp_ranges = None;
                        continue;
                    }
                    // The first change goes at once; more within 200 ms
                    // of a report wait for the rest of the 200 ms.
                    let since = ranges_sent.map(|t: std::time::Instant| t.elapsed());
                    if let Some(since) = since.filter(|d| *d < RANGES_EVERY) {
                        tokio::time::sleep(RANGES_EVERY - since).await;
                    }
                    if let Some(w) = &mut self.bgp_ranges {
                        w.mark_unchanged();
                        tracing::info!(ranges = w.borrow().len(), "BGP-learned egress ranges changed");
                    }
                    ranges_sent = Some(std::time::Instant::now());
                }
            }
            let mut report = self.mesh.report();
            let upstream = self.upstream.as_ref().map(|w| *w.borrow());
            report.upstream = upstream.map(|u| u.ipv4);
            report.upstream6 = upstream.map(|u| u.ipv6);
            report.bgp_ranges = self.bgp_ranges.as_ref().map(|w| w.borrow().clone());
            if let Err(e) = self.client.post_empty("/api/agent/report", &report).await {
                tracing::debug!("report: {e:#}");
            }
        }
    }
}

/// A gateway's pulses, several a second, so the controller notices within
/// `PULSE_LOST` when it dies without closing its stream. A node that is no
/// gateway sends none.
struct Pulser {
    client: Client,
    /// Whether the probes find this gateway's mesh carrying traffic.
    mesh_ok: watch::Receiver<bool>,
    is_gateway: Arc<AtomicBool>,
    /// A relay pulses too, so that its pairs leave it within a second when
    /// it dies.
    is_relay: bool,
    /// Notified when pulses are heard again after silence: the controller
    /// waits for a whole report before it uses this exit again.
    connected: Arc<Notify>,
}

impl Pulser {
    async fn run(self) {
        let mut tick = tokio::time::interval(bgp4mesh_api::PULSE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut failing = false;
        loop {
            tick.tick().await;
            let gateway = self.is_gateway.load(Ordering::Relaxed);
            if !gateway && !self.is_relay {
                continue;
            }
            // The upstream goes in reports only (one at a time, in order).
            // A relay's pulses say only that it is alive.
            let pulse = bgp4mesh_api::Pulse {
                mesh: gateway.then(|| *self.mesh_ok.borrow()),
                ..Default::default()
            };
            let sent = tokio::time::timeout(
                bgp4mesh_api::PULSE_LOST,
                self.client.post_empty("/api/agent/pulse", &pulse),
            )
            .await;
            match sent {
                Ok(Ok(())) => {
                    // Heard again after silence: the controller waits for
                    // a whole report before it uses this exit again.
                    if std::mem::take(&mut failing) {
                        self.connected.notify_one();
                    }
                }
                Ok(Err(e)) => {
                    failing = true;
                    tracing::debug!("pulse: {e:#}");
                }
                Err(_) => {
                    failing = true;
                    tracing::debug!("pulse: no answer within {:?}", bgp4mesh_api::PULSE_LOST);
                }
            }
        }
    }
}

/// Follows the controller's stream: connects (resuming from the state's
/// revision, with backoff while the controller is away), takes in each
/// event, brings the mesh to the new state and caches it; fires `ready`
/// the first time and opens a border's announcement gate.
struct StreamFollower {
    mesh: Arc<Mesh>,
    client: Client,
    /// `mesh.json`: the last state applied.
    cache: PathBuf,
    state: Option<MeshState>,
    ready: Option<oneshot::Sender<()>>,
    announce: Option<Arc<AnnounceGate>>,
    /// Whether the node is a gateway, for the pulser.
    is_gateway: Arc<AtomicBool>,
    /// Notified when a stream opens: the reporter reports at once, since
    /// the controller forgets a node's report when its stream closes.
    connected: Arc<Notify>,
    /// Notified when the probes distrust or trust again an exit: the mesh
    /// is applied again, with or without the controller.
    exits_changed: Arc<Notify>,
}

impl StreamFollower {
    /// Brings the mesh to the cached state, if there is one, before the
    /// controller is reached.
    async fn apply_cache(&mut self) {
        let Some(s) = &self.state else { return };
        tracing::info!(
            revision = s.revision,
            peers = s.peers.len(),
            "mesh from the cache"
        );
        match self.mesh.apply(s).await {
            Ok(()) => {
                if let Some(r) = self.ready.take() {
                    self.mesh.wait_for_handshakes(HANDSHAKES_BEFORE_READY).await;
                    let _ = r.send(());
                    // The cache's health is stale (it may be from before this
                    // border went down): only the controller, or the
                    // fallback, opens the gate.
                    announce_anyway(&self.announce);
                }
            }
            Err(e) => tracing::warn!("applying the cached mesh: {e:#}"),
        }
    }

    /// Follows streams one after the other; returns only with an error:
    /// the node was removed, or the controller no longer knows it.
    async fn run(&mut self) -> Result<()> {
        let mut backoff = Duration::from_secs(1);
        // Controllers that could not be reached one after the other.
        let mut failed_in_a_row = 0;
        loop {
            let since = self.state.as_ref().map(|s| s.revision);
            let client = self.client.clone();
            let connect = client.stream(since);
            tokio::pin!(connect);
            let connected = loop {
                let exits_changed = Arc::clone(&self.exits_changed);
                tokio::select! {
                    r = &mut connect => break r,
                    _ = exits_changed.notified() => self.apply_state().await,
                }
            };
            match connected {
                Ok(events) => {
                    tracing::info!(
                        server = self.client.server(),
                        since,
                        "connected to the controller"
                    );
                    backoff = Duration::from_secs(1);
                    self.connected.notify_one();
                    let began = tokio::time::Instant::now();
                    self.follow(events).await?;
                    // A stream that ends at once counts as a failure: no
                    // busy loop between controllers that close streams.
                    if began.elapsed() >= Duration::from_secs(5) {
                        failed_in_a_row = 0;
                    } else {
                        failed_in_a_row += 1;
                    }
                }
                Err(e) => {
                    let refused = e
                        .downcast_ref::<crate::client::Refused>()
                        .is_some_and(|r| r.status == reqwest::StatusCode::UNAUTHORIZED);
                    if refused {
                        let _ = std::fs::remove_file(&self.cache);
                        return Err(e.context("the controller no longer knows this node"));
                    }
                    failed_in_a_row += 1;
                    tracing::warn!("controller unreachable ({e:#}); keeping the mesh as it is");
                }
            }
            // Another controller on the same database takes over at once
            // (it resumes from our revision); once every one has failed in
            // a row, wait before the next round.
            if self.client.servers() > 1 {
                let next = self.client.fail_over();
                tracing::info!(server = %next, "moving to the next controller");
                if failed_in_a_row < self.client.servers() {
                    continue;
                }
                failed_in_a_row = 0;
            }
            // The controller is away: the probes may still move the exit.
            let wake = tokio::time::Instant::now() + backoff;
            loop {
                let exits_changed = Arc::clone(&self.exits_changed);
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => break,
                    _ = exits_changed.notified() => self.apply_state().await,
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Takes in one stream's events until it ends or breaks (then `Ok`: a
    /// new stream follows); an error ends the agent.
    async fn follow(
        &mut self,
        events: impl futures::Stream<Item = Result<StreamEvent>>,
    ) -> Result<()> {
        let mut events = Box::pin(events);
        loop {
            let exits_changed = Arc::clone(&self.exits_changed);
            let event = tokio::select! {
                event = events.next() => event,
                _ = exits_changed.notified() => {
                    tracing::debug!("the probes changed the exits: applying the mesh again");
                    self.apply_state().await;
                    continue;
                }
            };
            let Some(event) = event else { break };
            let event = match event {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!("stream: {e:#}");
                    break;
                }
            };
            match apply_event(&mut self.state, event) {
                Applied::Unchanged => {}
                Applied::Changed => self.apply_state().await,
                Applied::NodeRemoved => {
                    let _ = std::fs::remove_file(&self.cache);
                    bail!("this node was removed from the controller; join again to come back");
                }
                Applied::BeforeSnapshot => {
                    tracing::warn!("a change came before the first snapshot; starting over");
                    self.state = None;
                    break;
                }
            }
        }
        Ok(())
    }

    /// Brings the mesh to the state the stream brought, and caches it.
    async fn apply_state(&mut self) {
        let Some(s) = &self.state else { return };
        self.is_gateway
            .store(s.node.egress.is_some(), Ordering::Relaxed);
        match self.mesh.apply(s).await {
            Ok(()) => {
                if let Some(r) = self.ready.take() {
                    self.mesh.wait_for_handshakes(HANDSHAKES_BEFORE_READY).await;
                    let _ = r.send(());
                    announce_anyway(&self.announce);
                }
                if may_announce(s) {
                    self.open_gate("the controller has this exit healthy");
                }
            }
            Err(e) => tracing::warn!("applying the mesh: {e:#}"),
        }
        if let Ok(bytes) = serde_json::to_vec(s)
            && let Err(e) = write_private(&self.cache, &bytes)
        {
            tracing::warn!("caching the mesh: {e:#}");
        }
    }

    /// Lets the border announce (once the controller has it healthy; the
    /// mesh probes may still hold the announcement back).
    fn open_gate(&self, why: &str) {
        if let Some(gate) = &self.announce {
            gate.permit(why);
        }
    }
}

/// Runs the mesh until `stop` resolves, or until the controller says the
/// node was removed (an error).
pub async fn run(
    mut options: AgentOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let ready = options.ready.take();
    let announce = options
        .announce
        .take()
        .map(|tx| Arc::new(AnnounceGate::new(tx)));
    let dir = &options.state_dir;
    let enrollment: Enrollment =
        serde_json::from_slice(&std::fs::read(dir.join("node.json")).with_context(|| {
            format!(
                "{}: run `bgp4mesh join TOKEN` first",
                dir.join("node.json").display()
            )
        })?)
        .context("reading node.json")?;
    let private = Key::from_base64(
        &std::fs::read_to_string(dir.join("private.key")).context("reading private.key")?,
    )
    .context("private.key")?;
    let device = AnyDevice::create(DeviceOptions::new(&options.interface), options.backend)
        .with_context(|| format!("creating the WireGuard interface {}", options.interface))?;
    let relay_server = match options.relay_port {
        Some(port) => Some(
            crate::relay_server::RelayServer::start(port)
                .with_context(|| format!("relaying on UDP port {port}"))?,
        ),
        None => None,
    };
    let probing = Probing::new();
    let mesh = Arc::new(Mesh {
        probing: probing.clone(),
        options: options.clone(),
        private,
        device,
        links: Links::connect()?,
        nat: std::sync::Mutex::new(None),
        exits: std::sync::Mutex::new((None, None)),
        traversal: Traversal::default(),
        discovery_port: watch::channel(None).0,
        relay_links: Default::default(),
        last_state: Default::default(),
        relay_server,
        ipv6_paths: Default::default(),
    });
    if let Some(view) = &options.view {
        let source: Arc<dyn crate::view::DeviceStatusSource> = mesh.clone();
        view.attach(&options.interface, Arc::downgrade(&source));
    }
    let client = Client::with_others(
        &enrollment.server,
        enrollment.fingerprint.as_deref(),
        &enrollment.servers,
        Some(enrollment.credential.clone()),
    )?;
    let cache = dir.join("mesh.json");
    let state: Option<MeshState> = std::fs::read(&cache)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let is_gateway = state.as_ref().is_some_and(|s| s.node.egress.is_some());
    let mut follower = StreamFollower {
        mesh: Arc::clone(&mesh),
        client: client.clone(),
        cache,
        state,
        ready,
        announce,
        is_gateway: Arc::new(AtomicBool::new(is_gateway)),
        connected: Arc::new(Notify::new()),
        exits_changed: Arc::clone(&probing.exits_changed),
    };
    follower.apply_cache().await;
    let for_probes = Arc::clone(&mesh);
    probing.start(&options.interface, move |within| {
        for_probes.recent_peers(within)
    });
    // A border withdraws its block while its mesh carries no traffic.
    let mesh_watch = follower.announce.clone().map(|gate| {
        let mut ok = probing.mesh_ok();
        tokio::spawn(async move {
            while ok.changed().await.is_ok() {
                let carries = *ok.borrow_and_update();
                gate.set_mesh(carries);
            }
        })
    });
    let punches = tokio::spawn(Arc::clone(&mesh).punch_due());
    let found = Arc::new(Notify::new());
    let discovery =
        tokio::spawn(Arc::clone(&mesh).discover(enrollment.server.clone(), Arc::clone(&found)));
    let measuring = tokio::spawn(Arc::clone(&mesh).measure_relays(Arc::clone(&found)));
    let reporter = tokio::spawn(
        Reporter {
            mesh,
            client: client.clone(),
            upstream: options.upstream.clone(),
            bgp_ranges: options.bgp_ranges.clone(),
            connected: Arc::clone(&follower.connected),
            found,
        }
        .run(),
    );
    let pulser = tokio::spawn(
        Pulser {
            client,
            mesh_ok: probing.mesh_ok(),
            is_gateway: Arc::clone(&follower.is_gateway),
            is_relay: options.relay_port.is_some(),
            connected: Arc::clone(&follower.connected),
        }
        .run(),
    );
    let result = tokio::select! {
        r = follower.run() => r,
        _ = stop => Ok(()),
    };
    reporter.abort();
    pulser.abort();
    discovery.abort();
    punches.abort();
    measuring.abort();
    if let Some(task) = mesh_watch {
        task.abort();
    }
    probing.stop();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use bgp4mesh_api::{Gateway, Network, Node, Peer};

    fn net(s: &str) -> IpNet {
        s.parse().expect("prefix")
    }

    fn gateway(ranges: &[&str], bgp_ranges: &[&str], metric: u32, healthy: bool) -> Gateway {
        Gateway {
            ranges: ranges.iter().map(|r| net(r)).collect(),
            nat: false,
            metric,
            healthy,
            healthy6: healthy,
            heard: healthy,
            bgp: !bgp_ranges.is_empty(),
            bgp_ranges: bgp_ranges.iter().map(|r| net(r)).collect(),
        }
    }

    fn peer(id: &str, egress: Option<Gateway>) -> Peer {
        Peer {
            node_id: id.into(),
            name: id.into(),
            public_key: String::new(),
            endpoint: None,
            endpoint6: None,
            allowed_ips: Vec::new(),
            egress,
            candidates: Vec::new(),
            nat: None,
            relay: None,
            relay_port: None,
        }
    }

    fn state(own: Option<Gateway>, peers: Vec<Peer>) -> MeshState {
        MeshState {
            revision: 1,
            network: Network {
                netid: "mynet".into(),
                addressrange: Some("44.30.127.0/24".into()),
                addressrange6: None,
                mtu: 1420,
                listen_port: 51820,
                persistent_keepalive: 0,
                nodes: 3,
                discovery_port: None,
            },
            node: Node {
                id: "me".into(),
                network: "mynet".into(),
                name: "me".into(),
                public_key: String::new(),
                address: Some("44.30.127.2".parse().expect("address")),
                address6: None,
                endpoint: None,
                endpoint6: None,
                listen_port: 51820,
                tags: Vec::new(),
                egress: own,
                last_seen: None,
                online: true,
                handshakes: Vec::new(),
                candidates: Vec::new(),
                nat: None,
                relay_port: None,
            },
            peers,
            relay_key: None,
        }
    }

    fn exits(s: &MeshState) -> Vec<(String, String)> {
        Exits::of(s, &own_networks(s), &Trust::default())
            .chosen
            .into_iter()
            .map(|(r, id)| (r.to_string(), id))
            .collect()
    }

    #[test]
    fn a_gateway_the_node_distrusts_is_no_exit_whatever_the_controller_says() {
        let s = state(
            None,
            vec![
                peer("b1", Some(gateway(&["0.0.0.0/0"], &[], 100, true))),
                peer("b2", Some(gateway(&["0.0.0.0/0"], &[], 200, true))),
            ],
        );
        let with = |distrusted: &[&str]| -> Vec<(String, String)> {
            let trust = Trust {
                distrusted: distrusted.iter().map(|d| d.to_string()).collect(),
                ..Trust::default()
            };
            Exits::of(&s, &own_networks(&s), &trust)
                .chosen
                .into_iter()
                .map(|(r, id)| (r.to_string(), id))
                .collect()
        };
        assert_eq!(with(&[]), pairs(&[("0.0.0.0/0", "b1")]));
        // Its probes of b1 went unanswered: the default goes to b2.
        assert_eq!(with(&["b1"]), pairs(&[("0.0.0.0/0", "b2")]));
        // Neither answers: the node keeps its own default route.
        assert_eq!(with(&["b1", "b2"]), Vec::new());
    }

    #[test]
    fn exits_are_chosen_per_family() {
        let mut b1 = gateway(&["0.0.0.0/0", "::/0"], &[], 100, true);
        b1.healthy6 = false; // its IPv6 upstream is down
        let s = state(
            None,
            vec![
                peer("b1", Some(b1)),
                peer("b2", Some(gateway(&["0.0.0.0/0", "::/0"], &[], 200, true))),
            ],
        );
        assert_eq!(exits(&s), pairs(&[("0.0.0.0/0", "b1"), ("::/0", "b2")]));
    }

    #[test]
    fn a_gateway_the_controller_does_not_hear_stays_the_exit_while_it_answers() {
        let mut b1 = gateway(&["0.0.0.0/0"], &[], 100, true);
        b1.heard = false; // its pulses stopped: dead, or cut off from the controller
        let s = state(
            None,
            vec![
                peer("b1", Some(b1)),
                peer("b2", Some(gateway(&["0.0.0.0/0"], &[], 200, true))),
            ],
        );
        let with = |trust: Trust| -> Vec<(String, String)> {
            Exits::of(&s, &own_networks(&s), &trust)
                .chosen
                .into_iter()
                .map(|(r, id)| (r.to_string(), id))
                .collect()
        };
        assert_eq!(with(Trust::default()), pairs(&[("0.0.0.0/0", "b2")]));
        let answering = Trust {
            answering: ["b1".to_string()].into(),
            ..Trust::default()
        };
        assert_eq!(with(answering), pairs(&[("0.0.0.0/0", "b1")]));
    }

    #[test]
    fn probes_go_to_nodes_from_a_gateway_and_to_the_exit_from_a_node() {
        let mut n1 = peer("n1", None);
        n1.allowed_ips = vec![net("44.30.127.2/32")];
        let mut b1 = peer("b1", Some(gateway(&["0.0.0.0/0"], &[], 100, true)));
        b1.allowed_ips = vec![net("44.30.127.1/32"), net("0.0.0.0/0")];
        let mut s = state(None, vec![n1.clone(), b1.clone()]);
        s.network.addressrange = Some("44.30.127.0/24".into());
        // A node: its exit's mesh address.
        let t = probe_targets(&s, Some("b1"), None);
        assert!(t.mesh.is_empty());
        assert_eq!(
            t.exits,
            vec![("b1".to_string(), "44.30.127.1".parse().unwrap())]
        );
        // A gateway: the nodes, not the other gateways.
        s.node.egress = Some(gateway(&["0.0.0.0/0"], &[], 50, true));
        let t = probe_targets(&s, None, None);
        assert_eq!(
            t.mesh,
            vec![(n1.public_key.clone(), "44.30.127.2".parse().unwrap())]
        );
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(r, id)| (r.to_string(), id.to_string()))
            .collect()
    }

    #[test]
    fn each_range_goes_to_its_best_healthy_gateway() {
        let s = state(
            None,
            vec![
                peer(
                    "b1",
                    Some(gateway(&[], &["0.0.0.0/0", "198.51.100.0/24"], 100, true)),
                ),
                peer(
                    "b2",
                    Some(gateway(
                        &[],
                        &["0.0.0.0/0", "198.51.100.0/24", "203.0.113.0/24"],
                        200,
                        true,
                    )),
                ),
                peer("n2", None),
            ],
        );
        assert_eq!(
            exits(&s),
            pairs(&[
                ("0.0.0.0/0", "b1"),
                ("198.51.100.0/24", "b1"),
                ("203.0.113.0/24", "b2")
            ])
        );
        let e = Exits::of(&s, &own_networks(&s), &Trust::default());
        assert_eq!(e.default_exit(false), Some("b1"));
        assert_eq!(e.default_exit(true), None);
        assert_eq!(
            e.routes(),
            vec![net("198.51.100.0/24"), net("203.0.113.0/24")]
        );
    }

    #[test]
    fn an_unhealthy_gateway_keeps_only_what_no_healthy_one_carries() {
        let s = state(
            None,
            vec![
                peer(
                    "b1",
                    Some(gateway(&["0.0.0.0/0", "10.1.0.0/16"], &[], 100, false)),
                ),
                peer("b2", Some(gateway(&["10.2.0.0/16"], &[], 200, true))),
            ],
        );
        assert_eq!(
            exits(&s),
            pairs(&[("10.1.0.0/16", "b1"), ("10.2.0.0/16", "b2")])
        );
        // With no healthy exit at all, the node keeps its own default.
        let s = state(
            None,
            vec![peer("b1", Some(gateway(&["0.0.0.0/0"], &[], 100, false)))],
        );
        assert_eq!(exits(&s), Vec::new());
    }

    #[test]
    fn a_dead_gateway_loses_what_a_healthy_ones_wider_range_covers() {
        let s = state(
            None,
            vec![
                peer(
                    "b1",
                    Some(gateway(&[], &["0.0.0.0/0", "198.51.100.0/24"], 100, false)),
                ),
                peer("b2", Some(gateway(&["0.0.0.0/0"], &[], 200, true))),
            ],
        );
        assert_eq!(exits(&s), pairs(&[("0.0.0.0/0", "b2")]));
    }

    #[test]
    fn a_range_holding_a_peers_endpoint_stays_out_of_the_tunnel() {
        let mut b1 = peer(
            "b1",
            Some(gateway(&["0.0.0.0/0", "192.0.2.0/24"], &[], 100, true)),
        );
        b1.endpoint = Some("192.0.2.7:51820".into());
        let s = state(None, vec![b1]);
        assert_eq!(exits(&s), pairs(&[("0.0.0.0/0", "b1")]));
    }

    #[test]
    fn what_the_node_carries_itself_or_its_own_network_stays_out_of_the_tunnel() {
        let s = state(
            Some(gateway(&[], &["0.0.0.0/0", "198.51.100.0/24"], 100, true)),
            vec![peer(
                "b2",
                Some(gateway(
                    &["44.30.127.0/24", "44.30.127.128/25"],
                    &["0.0.0.0/0", "198.51.100.0/24", "203.0.113.0/24"],
                    200,
                    true,
                )),
            )],
        );
        assert_eq!(exits(&s), pairs(&[("203.0.113.0/24", "b2")]));
    }

    #[test]
    fn equal_gateways_are_told_apart_by_node_id_the_same_everywhere() {
        let g = || Some(gateway(&["0.0.0.0/0"], &[], 100, true));
        let a = state(None, vec![peer("zz", g()), peer("aa", g())]);
        let b = state(None, vec![peer("aa", g()), peer("zz", g())]);
        assert_eq!(exits(&a), pairs(&[("0.0.0.0/0", "aa")]));
        assert_eq!(exits(&a), exits(&b));
    }

    #[test]
    fn stream_events_say_what_they_did() {
        let mut s = None;
        let upsert = |revision, id: &str| StreamEvent::PeerUpsert {
            revision,
            peer: peer(id, None),
        };
        assert_eq!(
            apply_event(&mut s, upsert(2, "b1")),
            Applied::BeforeSnapshot
        );
        assert_eq!(
            apply_event(&mut s, StreamEvent::Heartbeat { revision: 2 }),
            Applied::Unchanged
        );
        assert_eq!(s, None);
        let snapshot = state(None, vec![peer("b1", None)]);
        assert_eq!(
            apply_event(&mut s, StreamEvent::Snapshot(snapshot)),
            Applied::Changed
        );
        assert_eq!(apply_event(&mut s, upsert(2, "b2")), Applied::Changed);
        assert_eq!(apply_event(&mut s, upsert(3, "b1")), Applied::Changed);
        let remove = StreamEvent::PeerRemove {
            revision: 4,
            node_id: "b2".into(),
        };
        assert_eq!(apply_event(&mut s, remove), Applied::Changed);
        assert_eq!(
            apply_event(&mut s, StreamEvent::Heartbeat { revision: 5 }),
            Applied::Unchanged
        );
        let s = s.expect("a state");
        assert_eq!(s.revision, 5);
        let ids: Vec<&str> = s.peers.iter().map(|p| p.node_id.as_str()).collect();
        assert_eq!(ids, ["b1"]);
        let mut s = Some(s);
        assert_eq!(
            apply_event(&mut s, StreamEvent::Removed { revision: 6 }),
            Applied::NodeRemoved
        );
    }

    /// A token pinning a certificate but naming an http:// server is
    /// refused before a connection is made or a file is written.
    #[tokio::test]
    async fn join_refuses_plain_http_with_a_pinned_fingerprint() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("address").port();
        let token = EnrollmentToken {
            server: format!("http://127.0.0.1:{port}"),
            fingerprint: Some("00".repeat(32)),
            network: "mynet".into(),
            secret: "s3cret".into(),
            servers: Vec::new(),
        };
        let text = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&token).expect("json"));
        let state_dir = std::env::temp_dir().join(format!("b4m-join-http-{}", std::process::id()));
        let error = join(&text, &state_dir, JoinOptions::default())
            .await
            .expect_err("refused");
        let error = format!("{error:#}");
        assert!(
            error.starts_with("the enrollment token: controller URL http://127.0.0.1:")
                && error.contains("plain http, but a TLS certificate fingerprint is pinned"),
            "{error}"
        );
        assert!(!state_dir.exists(), "nothing written");
        assert!(
            listener
                .accept()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
            "no connection was made"
        );
    }
}
