//! The controller's API as Rust types: what the REST API takes and returns
//! (JSON), and what the push stream carries. Shared by the controller, the
//! node agent and the admin CLI so they cannot disagree.
//!
//! Field names follow Netmaker's where an operator's existing calls use
//! them (`netid`, `addressrange`, `natEnabled`), so seed 004's curl calls
//! work unchanged.

#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

/// The error body of every 4xx and 5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub message: String,
}

// ---------------------------------------------------------------------------
// Networks

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub netid: String,
    /// The IPv4 block mesh addresses come from (the operator's public
    /// block, e.g. 44.30.127.0/24).
    pub addressrange: Option<String>,
    pub addressrange6: Option<String>,
    pub mtu: u16,
    /// The WireGuard port nodes listen on unless they say otherwise.
    pub listen_port: u16,
    /// Seconds; nodes behind NAT keep their mapping open with it.
    pub persistent_keepalive: u16,
    pub nodes: u64,
    /// The UDP port of the controller's endpoint discovery, on the
    /// address the node reaches the controller at ([`discovery`]); none
    /// when it is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkCreate {
    pub netid: String,
    #[serde(default)]
    pub addressrange: Option<String>,
    #[serde(default)]
    pub addressrange6: Option<String>,
    #[serde(default, alias = "defaultmtu")]
    pub mtu: Option<u16>,
    #[serde(default, alias = "defaultlistenport")]
    pub listen_port: Option<u16>,
    #[serde(default, alias = "defaultkeepalive")]
    pub persistent_keepalive: Option<u16>,
}

// ---------------------------------------------------------------------------
// Enrollment tokens

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub network: String,
    /// Seconds from now; none: never expires.
    #[serde(default)]
    pub expires_in: Option<u64>,
    /// How many nodes may join with it; none: unlimited.
    #[serde(default)]
    pub uses: Option<u32>,
    /// Tags the joining nodes get (e.g. "gateway").
    #[serde(default)]
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub id: String,
    pub network: String,
    /// Unix seconds.
    pub expires_at: Option<u64>,
    pub uses_left: Option<u32>,
    pub tags: Vec<String>,
    pub created_at: u64,
    /// The enrollment token itself; only in the answer to its creation
    /// (the controller keeps a hash).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// How often a controller sends a heartbeat on a quiet agent stream.
pub const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// What an enrollment token carries, base64url-encoded JSON, so that `join`
/// needs nothing else: where the controller is, how to recognise it
/// without a public CA, and the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    pub server: String,
    /// SHA-256 of the controller's certificate (DER), lowercase hex.
    pub fingerprint: Option<String>,
    pub network: String,
    pub secret: String,
    /// The other controllers on the same database, for the agent to move
    /// to when `server` is gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<ControllerAddress>,
}

/// Where a controller serves, and how to recognise its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerAddress {
    pub url: String,
    /// SHA-256 of its certificate (DER), lowercase hex, when self-signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
}

// ---------------------------------------------------------------------------
// Nodes

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    /// The secret of the enrollment token.
    pub secret: String,
    pub name: String,
    /// WireGuard public key, base64. The private key never leaves the node.
    pub public_key: String,
    /// Where peers can reach this node (a public static address), if any.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Its public IPv6 address (IP or `[IP]:port`) next to an IPv4
    /// `endpoint`: peers with IPv6 reach it there, the others at
    /// `endpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint6: Option<String>,
    #[serde(default)]
    pub listen_port: Option<u16>,
    /// A pinned mesh address (gateways and borders); must be in the range.
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
    #[serde(default)]
    pub address6: Option<Ipv6Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinResponse {
    pub node: Node,
    /// The node's credential for the agent API (bearer token); shown once.
    pub credential: String,
    pub network: Network,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub network: String,
    pub name: String,
    pub public_key: String,
    pub address: Option<Ipv4Addr>,
    pub address6: Option<Ipv6Addr>,
    /// The endpoint peers use: published by the node, else observed.
    pub endpoint: Option<String>,
    /// The IPv6 endpoint it publishes next to an IPv4 one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint6: Option<String>,
    pub listen_port: u16,
    pub tags: Vec<String>,
    pub egress: Option<Gateway>,
    /// Unix seconds of the node's last report.
    pub last_seen: Option<u64>,
    /// Whether the node's last report came within the last 90 s.
    pub online: bool,
    /// Per peer (by node id): Unix seconds of the last handshake, as the
    /// node last reported it.
    #[serde(default)]
    pub handshakes: Vec<PeerHandshake>,
    /// Where a node that publishes no endpoint may be reached, best first
    /// (IPv6, then its NAT's public address, then its local addresses), as
    /// it last reported them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<String>,
    /// How the node's NAT maps its WireGuard socket, as it measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatMapping>,
    /// The UDP port it relays on, while it is a live relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_port: Option<u16>,
}

/// How a NAT maps a node's WireGuard socket (RFC 4787), as the node
/// measures it with two discovery requests to different ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NatMapping {
    /// Both requests came from the node's own address and port.
    None,
    /// One public address and port whatever the destination: peers can
    /// reach the node directly once both sides send (hole punching).
    EndpointIndependent,
    /// A new public port per destination: no direct path from another
    /// NAT; a relay carries the node's traffic.
    EndpointDependent,
}

/// The most candidates a node may report.
pub const MAX_CANDIDATES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHandshake {
    pub peer: String,
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// An agent's report: what it sees of itself and its peers.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeReport {
    /// Endpoints the node knows it has (public addresses, port forwards).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub listen_port: Option<u16>,
    /// Per peer public key: last handshake and counters.
    #[serde(default)]
    pub peers: Vec<ReportedPeer>,
    /// For a border: whether it has a BGP session up with an upstream
    /// carrying IPv4 (its End-of-RIB installed).
    #[serde(default)]
    pub upstream: Option<bool>,
    /// The same for IPv6: a border is healthy for each family apart, and
    /// nodes choose their exit per family.
    #[serde(default)]
    pub upstream6: Option<bool>,
    /// For a border with `[mesh] export`: the BGP-learned prefixes its
    /// export policy takes, offered to the mesh as egress ranges (used
    /// only if the controller's gateway for it has `bgp` set). At most
    /// [`MAX_BGP_RANGES`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp_ranges: Option<Vec<IpNet>>,
    /// For a node that publishes no endpoint: where it may be reached
    /// (`ip:port`, best first, at most [`MAX_CANDIDATES`]; see
    /// [`Node::candidates`]). `None` leaves what the controller has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidates: Option<Vec<String>>,
    /// How its NAT maps its WireGuard socket, when it could measure it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatMapping>,
    /// The node relays for pairs that cannot reach each other directly, on
    /// this UDP port of its endpoint's address (`[mesh] relay = true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_port: Option<u16>,
    /// For a node behind NAT: the round trip it measured to each live relay
    /// (at most [`MAX_RELAY_RTTS`]); the controller prefers near relays for
    /// its pairs. `None` leaves what the controller has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_rtts: Option<Vec<RelayRtt>>,
}

/// A round trip to a relay, as a node measured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayRtt {
    /// The relay's node id.
    pub node_id: String,
    /// Microseconds; the best of a few echoes.
    pub rtt_us: u64,
}

/// The most relay round trips a report may carry.
pub const MAX_RELAY_RTTS: usize = 64;

/// Which address families a border can route to the outside: its BGP
/// upstream per family, as the agent reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpstreamFamilies {
    pub ipv4: bool,
    pub ipv6: bool,
}

/// `POST /api/agent/pulse`: a gateway's sign of life, several a second
/// (`PULSE_EVERY`). A gateway whose pulses stop for `PULSE_LOST` is taken
/// as dead although its stream's TCP connection looks open (a machine that
/// lost power closes nothing), and nodes leave it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pulse {
    /// For a border: whether its BGP upstream is up (as in [`NodeReport`]).
    #[serde(default)]
    pub upstream: Option<bool>,
    /// Whether the gateway's mesh carries traffic: some of its peers
    /// answer probes through the tunnel (docs/controller.md). `Some(false)`
    /// makes it unhealthy.
    #[serde(default)]
    pub mesh: Option<bool>,
}

/// How often a gateway's agent pulses.
pub const PULSE_EVERY: std::time::Duration = std::time::Duration::from_millis(150);
/// Pulses missing this long make a gateway unhealthy.
pub const PULSE_LOST: std::time::Duration = std::time::Duration::from_millis(600);

/// The most BGP-learned ranges one gateway may offer the mesh: each is a
/// WireGuard allowed IP and a kernel route on every node.
pub const MAX_BGP_RANGES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedPeer {
    pub public_key: String,
    /// The address the peer was last heard from (the controller learns NAT
    /// mappings from these).
    pub endpoint: Option<String>,
    pub last_handshake: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

// ---------------------------------------------------------------------------
// Egress gateways

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gateway {
    /// The ranges the operator gave it.
    pub ranges: Vec<IpNet>,
    pub nat: bool,
    pub metric: u32,
    /// Whether the gateway also carries what it learns by BGP and exports
    /// to the mesh (its `[mesh] export` policy): `bgp_ranges`.
    #[serde(default)]
    pub bgp: bool,
    /// The BGP-learned ranges it exports now (empty unless `bgp`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bgp_ranges: Vec<IpNet>,
    /// What the gateway says of itself for IPv4: false while its agent's
    /// stream is gone (the node died or lost the controller), before it
    /// reported since connecting, when its pulses say its mesh carries
    /// nothing, or when it reported its BGP upstream for IPv4 down. Nodes
    /// then use the next gateway for IPv4.
    #[serde(default = "healthy_default")]
    pub healthy: bool,
    /// The same for IPv6 ranges (its IPv6 upstream).
    #[serde(default = "healthy_default")]
    pub healthy6: bool,
    /// Whether the controller hears its pulses. A gateway it stopped
    /// hearing is dead (hung, powered off) or cut off from the controller
    /// only: a node leaves it unless its own probes of it are answered
    /// (docs/controller.md).
    #[serde(default = "healthy_default")]
    pub heard: bool,
}

fn healthy_default() -> bool {
    true
}

impl Gateway {
    /// Whether it says it carries traffic of `range`'s family (see
    /// [`Gateway::heard`] for the rest).
    pub fn healthy_for(&self, range: &IpNet) -> bool {
        match range {
            IpNet::V4(_) => self.healthy,
            IpNet::V6(_) => self.healthy6,
        }
    }

    /// Heard, and healthy for some family.
    pub fn usable(&self) -> bool {
        self.heard && (self.healthy || self.healthy6)
    }

    /// Every range it carries: the operator's and the BGP-learned ones.
    pub fn all_ranges(&self) -> impl Iterator<Item = &IpNet> {
        self.ranges.iter().chain(&self.bgp_ranges)
    }
}

/// `POST /api/nodes/{network}/{node}/creategateway`, as Netmaker takes it:
/// `{"ranges":["0.0.0.0/0"],"natEnabled":"no"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayCreate {
    pub ranges: Vec<String>,
    #[serde(
        default,
        rename = "natEnabled",
        alias = "nat",
        deserialize_with = "yes_no"
    )]
    pub nat_enabled: bool,
    #[serde(default)]
    pub metric: Option<u32>,
    /// Also carry the ranges the node learns by BGP and exports to the
    /// mesh (its `[mesh] export` policy); `ranges` may then be empty.
    /// Left out when false, so older controllers take the request.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bgp: bool,
}

/// "yes"/"no" (Netmaker's strings) or a JSON boolean.
fn yes_no<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Flag {
        Bool(bool),
        Text(String),
    }
    match Flag::deserialize(d)? {
        Flag::Bool(b) => Ok(b),
        Flag::Text(t) => match t.as_str() {
            "yes" | "true" => Ok(true),
            "no" | "false" => Ok(false),
            other => Err(serde::de::Error::custom(format!(
                "natEnabled is \"yes\" or \"no\", not {other:?}"
            ))),
        },
    }
}

// ---------------------------------------------------------------------------
// Admin API tokens

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiTokenCreate {
    /// `admin` (everything), `read` (GET only), or `network:NETID` (one
    /// network: its nodes, tokens and gateways).
    pub scope: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub id: String,
    pub scope: String,
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

// ---------------------------------------------------------------------------
// The push stream

/// One peer as a node configures it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    pub node_id: String,
    pub name: String,
    pub public_key: String,
    pub endpoint: Option<String>,
    /// Its IPv6 endpoint next to an IPv4 `endpoint` (`[ip]:port`): a node
    /// with a route to it sends there, and to `endpoint` when the IPv6
    /// path does not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint6: Option<String>,
    /// Its mesh addresses as host routes, plus its egress ranges.
    pub allowed_ips: Vec<IpNet>,
    pub egress: Option<Gateway>,
    /// For a peer that publishes no endpoint: where it may be reached
    /// ([`Node::candidates`]). A node that publishes none either sends to
    /// these only when the controller hands them out, as the peer gets
    /// its own at the same moment, so that both punch their NATs at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<String>,
    /// The peer's NAT, as it measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatMapping>,
    /// For a peer behind NAT when this node is too: the relay that carries
    /// the pair's datagrams while no direct path works, and this node's
    /// credential there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayPath>,
    /// The peer is a live relay on this UDP port (at its endpoint's
    /// address): nodes behind NAT measure their round trip to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_port: Option<u16>,
}

/// A pair's relay as one node of the pair sees it ([`relay`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayPath {
    /// The relay's node id and name.
    pub node_id: String,
    pub name: String,
    /// Where it relays: `ip:port`.
    pub address: String,
    /// The pair's channel there (16 hex digits) and this node's side.
    pub channel: String,
    pub side: u8,
    /// Unix seconds; the controller hands out a new one well before.
    pub expires: u64,
    /// The credential's MAC (64 hex digits).
    pub mac: String,
}

/// Everything a node needs: its own settings and its peers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshState {
    pub revision: u64,
    pub network: Network,
    pub node: Node,
    pub peers: Vec<Peer>,
    /// For a relay: its relay key (64 hex digits), which checks the pairs'
    /// credentials. Only ever sent to the relay itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_key: Option<String>,
}

/// One message of `GET /api/agent/stream`: the whole state first (or when
/// the agent is too far behind), then only changes. Each carries the
/// revision it brings the agent to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    Snapshot(MeshState),
    PeerUpsert {
        revision: u64,
        peer: Peer,
    },
    PeerRemove {
        revision: u64,
        node_id: String,
    },
    /// The node itself changed (address, egress, network settings).
    SelfUpdate {
        revision: u64,
        node: Node,
        network: Network,
        /// As [`MeshState::relay_key`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        relay_key: Option<String>,
    },
    /// The node was deleted: tear the mesh down.
    Removed {
        revision: u64,
    },
    /// Nothing changed; sent every [`HEARTBEAT_EVERY`] so both ends notice
    /// a dead stream.
    Heartbeat {
        revision: u64,
    },
}

impl StreamEvent {
    pub fn revision(&self) -> u64 {
        match self {
            StreamEvent::Snapshot(s) => s.revision,
            StreamEvent::PeerUpsert { revision, .. }
            | StreamEvent::PeerRemove { revision, .. }
            | StreamEvent::SelfUpdate { revision, .. }
            | StreamEvent::Removed { revision }
            | StreamEvent::Heartbeat { revision } => *revision,
        }
    }
}

pub mod discovery;
pub mod rate;
pub mod relay;

/// The host route of an address (/32 or /128).
pub fn host_net(ip: IpAddr) -> IpNet {
    IpNet::from(ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_gateway_body_parses() {
        let g: GatewayCreate =
            serde_json::from_str(r#"{"ranges":["0.0.0.0/0"],"natEnabled":"no"}"#).expect("seed");
        assert_eq!(g.ranges, vec!["0.0.0.0/0"]);
        assert!(!g.nat_enabled);
        let g: GatewayCreate =
            serde_json::from_str(r#"{"ranges":[],"natEnabled":true}"#).expect("bool");
        assert!(g.nat_enabled);
        let err = serde_json::from_str::<GatewayCreate>(r#"{"ranges":[],"natEnabled":"maybe"}"#)
            .expect_err("refused");
        assert!(err.to_string().contains("natEnabled"), "{err}");
    }

    #[test]
    fn the_seeds_network_body_parses_and_unknown_fields_are_refused() {
        let n: NetworkCreate =
            serde_json::from_str(r#"{"netid": "mynet", "addressrange": "44.30.127.0/24"}"#)
                .expect("seed");
        assert_eq!(n.netid, "mynet");
        assert_eq!(n.addressrange.as_deref(), Some("44.30.127.0/24"));
        let err = serde_json::from_str::<NetworkCreate>(r#"{"netid":"x","adressrange":"1"}"#)
            .expect_err("typo refused");
        assert!(err.to_string().contains("adressrange"), "{err}");
    }

    #[test]
    fn stream_events_are_tagged() {
        let e = StreamEvent::PeerRemove {
            revision: 7,
            node_id: "n1".into(),
        };
        let text = serde_json::to_string(&e).expect("json");
        assert_eq!(
            text,
            r#"{"type":"peer_remove","revision":7,"node_id":"n1"}"#
        );
        assert_eq!(serde_json::from_str::<StreamEvent>(&text).expect("back"), e);
    }
}
