//! The node's TOML configuration (docs/configuration.md describes every
//! key). Parsing refuses unknown keys and bad values with the file, the
//! line and the field; cross-field checks name the field path.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bgp4mesh_bgp::policy::{
    Action, AsPathMatch, Match, Policy, PrefixRange, RouteSource, Rule, Verdict,
};
use bgp4mesh_bgp::rib::Selection;
use bgp4mesh_bgp::speaker::{
    MaxPrefixAction, MaxPrefixes, NeighborConfig, SpeakerConfig, StaticKind, StaticRoute,
};
use bgp4mesh_bgp::wire::{Community, Family, LargeCommunity};
use ipnet::IpNet;
use serde::Deserialize;

mod next_hop;
pub mod overlay;
mod peering;
mod wg_quick;
mod wireguard;
pub use peering::{MTU_RANGE, Peering, load_or_create_private_key, read_private_key};
pub use wireguard::{
    Cluster, KeySource, Wireguard, WireguardPeer, read_cluster_key, read_preshared_key,
};

/// Default control socket of `bgp4mesh run`, used by `bgp4mesh show`.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/bgp4mesh/bgp4mesh.sock";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub control: ControlSection,
    pub bgp: Option<BgpSection>,
    #[serde(default)]
    pub kernel: KernelSection,
    #[serde(default)]
    pub bfd: BfdSection,
    #[serde(default)]
    pub policy: HashMap<String, PolicySection>,
    /// The WireGuard mesh run by a controller (after `bgp4mesh join`).
    pub mesh: Option<MeshSection>,
    /// WireGuard tunnels to single peers, each with a BGP neighbour.
    #[serde(default)]
    pub peering: Vec<peering::PeeringSection>,
    /// WireGuard interfaces with many peers (a wg-quick file's).
    #[serde(default)]
    pub wireguard: Vec<wireguard::WireguardSection>,
    /// A layer-2 overlay over the tunnels.
    pub overlay: Option<overlay::OverlaySection>,
}

/// `[mesh]`: where `bgp4mesh join` left its files, which interface, which
/// WireGuard backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshSection {
    #[serde(default = "default_mesh_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_mesh_interface")]
    pub interface: String,
    /// auto (the kernel module if present), kernel, or userspace.
    #[serde(default = "default_mesh_backend")]
    pub backend: String,
    /// On a border: a policy (`[policy.NAME]`, or `all`) choosing which
    /// BGP-learned best routes are offered to the mesh as egress ranges
    /// (the controller's gateway for this node needs `bgp` set).
    pub export: Option<String>,
    /// The most prefixes `export` offers; more are left out with a warning.
    #[serde(default = "default_export_limit")]
    pub export_limit: usize,
    /// Relay for pairs of nodes behind NAT that cannot reach each other
    /// directly (a node with a published endpoint only): forwards their
    /// WireGuard datagrams on UDP `relay_port`, holding none of their keys.
    #[serde(default)]
    pub relay: bool,
    #[serde(default = "default_relay_port")]
    pub relay_port: u16,
}

impl Default for MeshSection {
    fn default() -> Self {
        MeshSection {
            state_dir: default_mesh_state_dir(),
            interface: default_mesh_interface(),
            backend: default_mesh_backend(),
            export: None,
            export_limit: default_export_limit(),
            relay: false,
            relay_port: default_relay_port(),
        }
    }
}

fn default_relay_port() -> u16 {
    51821
}

fn default_export_limit() -> usize {
    1000
}

fn default_mesh_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/bgp4mesh/agent")
}

fn default_mesh_interface() -> String {
    "bgp4mesh0".into()
}

fn default_mesh_backend() -> String {
    "auto".into()
}

/// BFD timers for neighbours with `bfd = true`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BfdSection {
    /// Milliseconds between packets we send and expect once Up.
    #[serde(default = "default_bfd_interval")]
    pub interval: u64,
    /// Packets missed before the session is declared down.
    #[serde(default = "default_bfd_multiplier")]
    pub multiplier: u8,
}

impl Default for BfdSection {
    fn default() -> Self {
        BfdSection {
            interval: default_bfd_interval(),
            multiplier: default_bfd_multiplier(),
        }
    }
}

fn default_bfd_interval() -> u64 {
    100
}
fn default_bfd_multiplier() -> u8 {
    5
}

/// Where best routes go in the kernel.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSection {
    /// Install best routes in the kernel at all.
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_table")]
    pub table: u32,
    #[serde(default = "default_metric")]
    pub metric: u32,
    pub prefsrc_ipv4: Option<Ipv4Addr>,
    pub prefsrc_ipv6: Option<Ipv6Addr>,
    /// Also install our static routes (blackhole, unreachable, via, device).
    #[serde(default)]
    pub install_static: bool,
    /// Leave our routes in the kernel when the daemon stops.
    #[serde(default)]
    pub keep_routes_on_exit: bool,
    /// Learn routes that others put in the table (like BIRD's `learn`),
    /// for export with `source = ["kernel"]`.
    #[serde(default)]
    pub learn: bool,
}

impl Default for KernelSection {
    fn default() -> Self {
        KernelSection {
            enabled: true,
            table: default_table(),
            metric: default_metric(),
            prefsrc_ipv4: None,
            prefsrc_ipv6: None,
            install_static: false,
            keep_routes_on_exit: false,
            learn: false,
        }
    }
}

fn default_table() -> u32 {
    254
}
fn default_metric() -> u32 {
    32
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlSection {
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
}

impl Default for ControlSection {
    fn default() -> Self {
        ControlSection {
            socket: default_socket(),
        }
    }
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpSection {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    /// Addresses to accept BGP connections on.
    #[serde(default = "default_listen")]
    pub listen: Vec<SocketAddr>,
    #[serde(default)]
    pub multipath: bool,
    #[serde(default)]
    pub always_compare_med: bool,
    pub cluster_id: Option<Ipv4Addr>,
    /// Originate the networks of these interfaces ("*": all), like BIRD's
    /// `protocol direct`; export them with `source = ["connected"]`.
    #[serde(default)]
    pub connected: Vec<String>,
    #[serde(default)]
    pub neighbor: Vec<NeighborSection>,
    #[serde(default, rename = "static")]
    pub statics: Vec<StaticSection>,
}

fn default_listen() -> Vec<SocketAddr> {
    vec![
        SocketAddr::from(([0, 0, 0, 0], 179)),
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 179)),
    ]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NeighborSection {
    pub name: String,
    pub address: IpAddr,
    pub remote_as: u32,
    pub local_address: Option<IpAddr>,
    /// The interface an IPv6 link-local `address` is on (its scope).
    pub interface: Option<String>,
    /// TCP port of the neighbour.
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default)]
    pub passive: bool,
    /// 0 = directly connected (TTL 1 for eBGP); N = up to N hops.
    #[serde(default)]
    pub multihop: u8,
    /// GTSM (RFC 5082): send with TTL 255, accept only TTL 255 - hops.
    #[serde(default)]
    pub ttl_security: bool,
    /// TCP MD5 signature (RFC 2385) key.
    pub password: Option<String>,
    /// Watch the path with BFD (RFC 5880/5881); a BFD Down takes the
    /// session down at once.
    #[serde(default)]
    pub bfd: bool,
    /// This neighbour's BFD interval in milliseconds (default: `[bfd]`).
    pub bfd_interval: Option<u64>,
    /// This neighbour's BFD multiplier (default: `[bfd]`).
    pub bfd_multiplier: Option<u8>,
    /// Graceful restart helper (RFC 4724): keep the neighbour's routes while
    /// it restarts.
    #[serde(default)]
    pub graceful_restart: bool,
    /// Restart time we advertise with graceful restart, seconds.
    #[serde(default = "default_restart_time")]
    pub restart_time: u16,
    #[serde(default = "default_hold")]
    pub hold_time: u16,
    #[serde(default = "default_connect_retry")]
    pub connect_retry: u64,
    #[serde(default = "default_idle_hold")]
    pub error_wait: [u64; 2],
    pub import: Option<String>,
    pub export: Option<String>,
    #[serde(default)]
    pub next_hop_self: bool,
    #[serde(default)]
    pub route_reflector_client: bool,
    #[serde(default = "default_families")]
    pub families: Vec<FamilyName>,
    pub max_prefixes: Option<MaxPrefixesSection>,
    #[serde(default)]
    pub extended_next_hop: bool,
    pub next_hop_ipv4: Option<Ipv4Addr>,
    pub next_hop_ipv6: Option<Parsed<NextHopIpv6>>,
    #[serde(default)]
    pub soft_reconfiguration_inbound: bool,
    #[serde(default = "yes")]
    pub enabled: bool,
    pub description: Option<String>,
}

/// `next_hop_ipv6`: an IPv6 address of ours, or `"auto"`: a global IPv6
/// address of the interface the neighbour is reached through, found when
/// the daemon starts (or reloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHopIpv6 {
    Address(Ipv6Addr),
    Auto,
}

impl FromStr for NextHopIpv6 {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        if text == "auto" {
            return Ok(NextHopIpv6::Auto);
        }
        text.parse()
            .map(NextHopIpv6::Address)
            .map_err(|_| "neither an IPv6 address nor \"auto\"".to_string())
    }
}

fn default_restart_time() -> u16 {
    120
}
fn default_port() -> u16 {
    179
}
fn default_hold() -> u16 {
    90
}
fn default_connect_retry() -> u64 {
    10
}
fn default_idle_hold() -> [u64; 2] {
    [5, 120]
}
fn default_families() -> Vec<FamilyName> {
    vec![FamilyName::Ipv4, FamilyName::Ipv6]
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FamilyName {
    Ipv4,
    Ipv6,
}

impl From<FamilyName> for Family {
    fn from(f: FamilyName) -> Family {
        match f {
            FamilyName::Ipv4 => Family::IPV4_UNICAST,
            FamilyName::Ipv6 => Family::IPV6_UNICAST,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaxPrefixesSection {
    pub limit: usize,
    #[serde(default)]
    pub action: MaxAction,
    /// Seconds before reconnecting, with action = "restart".
    #[serde(default = "default_restart_after")]
    pub restart_after: u64,
}

fn default_restart_after() -> u64 {
    60
}

#[derive(Debug, Default, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum MaxAction {
    #[default]
    Warn,
    Restart,
    Shutdown,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticSection {
    pub prefix: Parsed<IpNet>,
    #[serde(default)]
    pub blackhole: bool,
    #[serde(default)]
    pub unreachable: bool,
    pub via: Option<IpAddr>,
    pub device: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// What happens when no rule decides: "reject" (default) or "accept".
    #[serde(default)]
    pub default: VerdictName,
    #[serde(default, alias = "rule")]
    pub rules: Vec<RuleSection>,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VerdictName {
    Accept,
    #[default]
    Reject,
    Next,
}

impl From<VerdictName> for Verdict {
    fn from(v: VerdictName) -> Verdict {
        match v {
            VerdictName::Accept => Verdict::Accept,
            VerdictName::Reject => Verdict::Reject,
            VerdictName::Next => Verdict::Next,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    #[serde(default, rename = "match")]
    pub matches: MatchSection,
    #[serde(default)]
    pub set: SetSection,
    pub action: VerdictName,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchSection {
    #[serde(default)]
    pub prefix: Vec<Parsed<PrefixRange>>,
    pub as_path_origin: Option<u32>,
    pub as_path_first: Option<u32>,
    #[serde(default)]
    pub as_path_contains: Vec<u32>,
    pub as_path_max_length: Option<usize>,
    pub as_path_min_length: Option<usize>,
    pub as_path_regex: Option<String>,
    #[serde(default)]
    pub community: Vec<Parsed<Community>>,
    #[serde(default)]
    pub large_community: Vec<Parsed<LargeCommunity>>,
    #[serde(default)]
    pub neighbor: Vec<String>,
    #[serde(default)]
    pub source: Vec<SourceName>,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum SourceName {
    Static,
    Connected,
    Bgp,
    Kernel,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetSection {
    pub local_pref: Option<u32>,
    pub med: Option<u32>,
    /// Prepend our own AS this many extra times.
    pub prepend: Option<u8>,
    #[serde(default)]
    pub add_community: Vec<Parsed<Community>>,
    #[serde(default)]
    pub remove_community: Vec<Parsed<Community>>,
    #[serde(default)]
    pub add_large_community: Vec<Parsed<LargeCommunity>>,
    #[serde(default)]
    pub remove_large_community: Vec<Parsed<LargeCommunity>>,
    /// An address, or "self".
    pub next_hop: Option<String>,
}

/// A value parsed from a string with its own FromStr, so that TOML errors
/// point at the offending line.
#[derive(Debug, Clone)]
pub struct Parsed<T>(pub T);

impl<'de, T> Deserialize<'de> for Parsed<T>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse()
            .map(Parsed)
            .map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
    }
}

/// A loaded, checked configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub path: PathBuf,
    pub control_socket: PathBuf,
    pub bgp: Option<BgpConfig>,
    pub kernel: KernelSection,
    pub mesh: Option<MeshSection>,
    /// `[[peering]]`: their neighbours are in `bgp` already.
    pub peerings: Vec<Peering>,
    /// `[[wireguard]]`.
    pub wireguard: Vec<Wireguard>,
    /// `[overlay]`.
    pub overlay: Option<overlay::Overlay>,
}

/// What the BGP driver needs beyond the sans-IO speaker's config.
#[derive(Debug, Clone)]
pub struct BgpConfig {
    pub speaker: SpeakerConfig,
    pub listen: Vec<SocketAddr>,
    /// Per neighbour, same order as `speaker.neighbors`.
    pub transport: Vec<Transport>,
    /// Things that are allowed but probably not meant (RFC 8212 defaults).
    pub warnings: Vec<String>,
    /// Interfaces whose networks we originate.
    pub connected: Vec<String>,
    /// Neighbours (by name) with `next_hop_ipv6 = "auto"` over IPv4: the
    /// daemon gives them one from the kernel before it uses the config.
    pub next_hop_ipv6_auto: Vec<String>,
    pub bfd: BfdSection,
    /// `[mesh] export`: the policy and limit of what is offered to the
    /// mesh as egress ranges.
    pub mesh_export: Option<(Arc<Policy>, usize)>,
}

/// Socket options of one neighbour's TCP connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transport {
    pub port: u16,
    pub local_address: Option<IpAddr>,
    /// The interface of a link-local neighbour: the scope of its address
    /// and of link-local next hops it sends.
    pub interface: Option<String>,
    pub multihop: u8,
    pub ttl_security: bool,
    pub password: Option<String>,
    pub ebgp: bool,
    pub bfd: bool,
    /// BFD interval (ms) and multiplier of this neighbour.
    pub bfd_timers: (u64, u8),
}

impl NodeConfig {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<NodeConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text, path)
    }

    /// Parses and checks a config's text; `path` is used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<NodeConfig> {
        let mut file: FileConfig = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?;
        // Each peering's session is one more neighbour.
        let (peerings, peering_neighbors) = peering::build(
            std::mem::take(&mut file.peering),
            file.bgp.as_ref(),
            file.mesh.as_ref(),
            &file.policy,
            file.bfd,
        )
        .with_context(|| format!("{}", path.display()))?;
        if let Some(bgp) = file.bgp.as_mut() {
            bgp.neighbor.extend(peering_neighbors);
        }
        let wireguard = wireguard::build(
            std::mem::take(&mut file.wireguard),
            wireguard::Taken {
                peerings: &peerings,
                mesh: file.mesh.as_ref(),
            },
        )
        .with_context(|| format!("{}", path.display()))?;
        let overlay = match file.overlay.take() {
            Some(section) => Some(
                overlay::build(
                    section,
                    overlay::Context {
                        peerings: &peerings,
                        wireguard: &wireguard,
                        mesh_interface: file.mesh.as_ref().map(|m| m.interface.as_str()),
                    },
                )
                .with_context(|| format!("{}", path.display()))?,
            ),
            None => None,
        };
        let mut bgp = match file.bgp {
            Some(bgp) => Some(
                build_bgp(bgp, &file.policy, file.bfd)
                    .with_context(|| format!("{}", path.display()))?,
            ),
            None => None,
        };
        if let Some(mesh) = &file.mesh
            && let Some(name) = &mesh.export
        {
            let Some(bgp) = bgp.as_mut() else {
                bail!(
                    "{}: mesh.export: exports BGP-learned routes, but there is no [bgp] section",
                    path.display()
                );
            };
            let policy = match Policy::builtin(name) {
                Some(p) => Arc::new(p),
                None => build_policies(&file.policy)?
                    .remove(name)
                    .with_context(|| {
                        format!(
                            "{}: mesh.export: no policy named {name:?} (define [policy.{name}])",
                            path.display()
                        )
                    })?,
            };
            let max = bgp4mesh_api::MAX_BGP_RANGES;
            if mesh.export_limit == 0 || mesh.export_limit > max {
                bail!(
                    "{}: mesh.export_limit: {} is outside 1 to {max}",
                    path.display(),
                    mesh.export_limit
                );
            }
            bgp.mesh_export = Some((policy, mesh.export_limit));
        }
        if let Some(bgp) = bgp.as_mut() {
            next_hop::settle_ipv6_next_hops(bgp, file.kernel.learn, &peerings)
                .with_context(|| format!("{}", path.display()))?;
        }
        if file.kernel.table == 0 || file.kernel.table == 255 {
            bail!(
                "{}: kernel.table: {} is reserved; use 254 (main) or a table of your own",
                path.display(),
                file.kernel.table
            );
        }
        check_socket_path(&file.control.socket).with_context(|| format!("{}", path.display()))?;
        if let Some(mesh) = &file.mesh {
            check_interface_name("mesh.interface", &mesh.interface)
                .with_context(|| format!("{}", path.display()))?;
            if mesh.relay && mesh.relay_port == 0 {
                bail!("{}: mesh.relay_port: 0 is no port", path.display());
            }
            if !["auto", "kernel", "userspace"].contains(&mesh.backend.as_str()) {
                bail!(
                    "{}: mesh.backend: {:?} is not one of auto, kernel, userspace",
                    path.display(),
                    mesh.backend
                );
            }
        }
        Ok(NodeConfig {
            path: path.to_path_buf(),
            control_socket: file.control.socket,
            bgp,
            kernel: file.kernel,
            mesh: file.mesh,
            peerings,
            wireguard,
            overlay,
        })
    }

    /// A node that only runs the mesh, from `join`'s state directory (what
    /// `bgp4mesh run` does without a config file).
    pub fn mesh_only(state_dir: &Path) -> NodeConfig {
        NodeConfig {
            path: PathBuf::from("(no config file)"),
            control_socket: PathBuf::from(DEFAULT_CONTROL_SOCKET),
            bgp: None,
            kernel: KernelSection::default(),
            mesh: Some(MeshSection {
                state_dir: state_dir.to_path_buf(),
                ..MeshSection::default()
            }),
            peerings: Vec::new(),
            wireguard: Vec::new(),
            overlay: None,
        }
    }
}

/// What the TCP sockets of a neighbour will be given, checked before any
/// is opened: what the kernel would refuse at run time is refused here, so
/// that `bgp4mesh check` says so.
fn check_transport(at: &str, n: &NeighborSection) -> Result<()> {
    if n.address.is_unspecified() || n.address.is_multicast() || n.address == Ipv4Addr::BROADCAST {
        bail!(
            "{at}.address: {} is not a unicast address to talk BGP with",
            n.address
        );
    }
    if let Some(local) = n.local_address
        && (local.is_multicast() || local == Ipv4Addr::BROADCAST)
    {
        bail!("{at}.local_address: {local} is not a unicast address to connect from");
    }
    if n.port == 0 {
        bail!("{at}.port: 0 is not a port to connect to (BGP's is 179)");
    }
    // The TTL we send is hops + 1 and a TTL is at most 255.
    if n.multihop == u8::MAX {
        bail!("{at}.multihop: at most 254 hops, not 255 (the TTL sent is hops + 1)");
    }
    if let Some(password) = &n.password {
        let max = crate::transport::MD5_MAX_KEY_LEN;
        if password.is_empty() {
            bail!("{at}.password: empty; leave password out for no TCP-MD5");
        }
        if password.len() > max {
            bail!(
                "{at}.password: the TCP-MD5 key is {} bytes; Linux takes at most {max} (TCP_MD5SIG)",
                password.len()
            );
        }
    }
    Ok(())
}

/// The listeners can all be bound together: a port, once per address, and
/// not both a wildcard and a specific address of one family on one port
/// (IPv6 listeners are IPv6-only, so `0.0.0.0` and `::` go together).
fn check_listen(listen: &[SocketAddr]) -> Result<()> {
    for (i, addr) in listen.iter().enumerate() {
        if addr.port() == 0 {
            bail!("bgp.listen[{i}]: {addr} has no port (BGP's is 179)");
        }
        if addr.ip().is_multicast() || addr.ip() == Ipv4Addr::BROADCAST {
            bail!("bgp.listen[{i}]: {addr} is not a unicast address");
        }
        if let Some((j, other)) = listen[..i].iter().enumerate().find(|(_, other)| {
            other.is_ipv4() == addr.is_ipv4()
                && other.port() == addr.port()
                && (other.ip() == addr.ip()
                    || other.ip().is_unspecified()
                    || addr.ip().is_unspecified())
        }) {
            bail!(
                "bgp.listen[{i}]: {addr} overlaps bgp.listen[{j}] ({other}): both cannot be bound"
            );
        }
    }
    Ok(())
}

/// Linux's rule for interface names: 1 to 15 bytes, not `.` or `..`, no
/// `/`, `:` or white space.
fn check_interface_name(field: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace())
    {
        bail!("{field}: {name:?} is not an interface name (1 to 15 bytes, no '/', ':' or spaces)");
    }
    Ok(())
}

/// A unix socket's path fits in `sun_path` (108 bytes with its NUL).
fn check_socket_path(socket: &Path) -> Result<()> {
    const MAX: usize = 107;
    let len = socket.as_os_str().len();
    if len == 0 {
        bail!("control.socket: empty");
    }
    if len > MAX {
        bail!(
            "control.socket: {} is {len} bytes; a unix socket's path holds at most {MAX}",
            socket.display()
        );
    }
    Ok(())
}

fn build_policies(
    sections: &HashMap<String, PolicySection>,
) -> Result<HashMap<String, Arc<Policy>>> {
    let mut policies = HashMap::new();
    for (name, section) in sections {
        if name == "all" || name == "none" {
            bail!("policy.{name}: \"all\" and \"none\" are built in and cannot be redefined");
        }
        let mut rules = Vec::new();
        for (i, rule) in section.rules.iter().enumerate() {
            let at = format!("policy.{name}.rules[{i}]");
            rules.push(build_rule(rule).with_context(|| at)?);
        }
        let policy = Policy {
            name: name.clone(),
            rules,
            default: section.default.into(),
        };
        policies.insert(name.clone(), Arc::new(policy));
    }
    Ok(policies)
}

fn build_rule(rule: &RuleSection) -> Result<Rule> {
    let m = &rule.matches;
    let mut as_path = Vec::new();
    if let Some(asn) = m.as_path_origin {
        as_path.push(AsPathMatch::OriginAs(asn));
    }
    if let Some(asn) = m.as_path_first {
        as_path.push(AsPathMatch::FirstAs(asn));
    }
    as_path.extend(m.as_path_contains.iter().map(|a| AsPathMatch::Contains(*a)));
    if let Some(n) = m.as_path_max_length {
        as_path.push(AsPathMatch::LengthAtMost(n));
    }
    if let Some(n) = m.as_path_min_length {
        as_path.push(AsPathMatch::LengthAtLeast(n));
    }
    if let Some(re) = &m.as_path_regex {
        as_path
            .push(AsPathMatch::regex(re).map_err(|e| anyhow::anyhow!("match.as_path_regex: {e}"))?);
    }
    let matches = Match {
        prefixes: m.prefix.iter().map(|p| p.0).collect(),
        as_path,
        communities: m.community.iter().map(|c| c.0).collect(),
        large_communities: m.large_community.iter().map(|c| c.0).collect(),
        neighbors: m.neighbor.clone(),
        sources: m
            .source
            .iter()
            .map(|s| match s {
                SourceName::Static => RouteSource::Static,
                SourceName::Connected => RouteSource::Connected,
                SourceName::Bgp => RouteSource::Bgp,
                SourceName::Kernel => RouteSource::Kernel,
            })
            .collect(),
    };
    let s = &rule.set;
    let mut set = Vec::new();
    if let Some(v) = s.local_pref {
        set.push(Action::SetLocalPref(v));
    }
    if let Some(v) = s.med {
        set.push(Action::SetMed(v));
    }
    if let Some(times) = s.prepend {
        set.push(Action::Prepend { asn: None, times });
    }
    if !s.add_community.is_empty() {
        set.push(Action::AddCommunities(
            s.add_community.iter().map(|c| c.0).collect(),
        ));
    }
    if !s.remove_community.is_empty() {
        set.push(Action::RemoveCommunities(
            s.remove_community.iter().map(|c| c.0).collect(),
        ));
    }
    if !s.add_large_community.is_empty() {
        set.push(Action::AddLargeCommunities(
            s.add_large_community.iter().map(|c| c.0).collect(),
        ));
    }
    if !s.remove_large_community.is_empty() {
        set.push(Action::RemoveLargeCommunities(
            s.remove_large_community.iter().map(|c| c.0).collect(),
        ));
    }
    match s.next_hop.as_deref() {
        None => {}
        Some("self") => set.push(Action::NextHopSelf),
        Some(addr) => {
            let ip: IpAddr = addr.parse().map_err(|_| {
                anyhow::anyhow!("set.next_hop: {addr:?} is neither an IP address nor \"self\"")
            })?;
            set.push(Action::SetNextHop(ip));
        }
    }
    Ok(Rule {
        matches,
        set,
        verdict: rule.action.into(),
    })
}

/// Whether `address` is IPv6 link-local (fe80::/10): it means something
/// only with the interface it is on.
pub fn is_link_local(address: IpAddr) -> bool {
    matches!(address, IpAddr::V6(a) if a.is_unicast_link_local())
}

/// A link-local neighbour names its interface; `interface` is for
/// link-local neighbours only.
fn check_link_local(at: &str, n: &NeighborSection) -> Result<()> {
    match (&n.interface, is_link_local(n.address)) {
        (None, true) => bail!(
            "{at}.interface: {} is link-local: say which interface it is on",
            n.address
        ),
        (Some(_), false) => bail!(
            "{at}.interface: only for a link-local (fe80::/10) address, not {}",
            n.address
        ),
        (Some(name), true) => {
            if name.is_empty()
                || name.len() > 15
                || name.contains(['/', ' ', '%'])
                || name == "."
                || name == ".."
            {
                bail!("{at}.interface: {name:?} is not an interface name");
            }
        }
        (None, false) => {}
    }
    if let Some(local) = n.local_address
        && is_link_local(local) != is_link_local(n.address)
    {
        bail!(
            "{at}.local_address: {local} and address {} must both be link-local or both not",
            n.address
        );
    }
    if n.interface.is_some() && n.password.is_some() {
        bail!("{at}.password: TCP-MD5 is not supported on a link-local session");
    }
    Ok(())
}

fn build_bgp(
    bgp: BgpSection,
    policy_sections: &HashMap<String, PolicySection>,
    bfd: BfdSection,
) -> Result<BgpConfig> {
    if bfd.interval < 10 || bfd.interval > 60_000 {
        bail!("bfd.interval: {} ms is outside 10 to 60000", bfd.interval);
    }
    if bfd.multiplier == 0 {
        bail!("bfd.multiplier: at least 1");
    }
    if bgp.asn == 0 || bgp.asn == 23456 {
        bail!("bgp.asn: {} cannot be used as a local AS number", bgp.asn);
    }
    if bgp.router_id.is_unspecified() {
        bail!("bgp.router_id: 0.0.0.0 is not a valid BGP identifier");
    }
    check_listen(&bgp.listen)?;
    for (i, name) in bgp.connected.iter().enumerate() {
        if name != "*" {
            check_interface_name(&format!("bgp.connected[{i}]"), name)?;
        }
    }
    let policies = build_policies(policy_sections)?;
    let lookup = |field: &str, name: &Option<String>, ebgp: bool| -> Result<Arc<Policy>> {
        match name.as_deref() {
            Some("all") => Ok(Arc::new(Policy::accept_all())),
            Some("none") => Ok(Arc::new(Policy::reject_all())),
            Some(n) => policies
                .get(n)
                .cloned()
                .with_context(|| format!("{field}: no policy named {n:?} (define [policy.{n}])")),
            // RFC 8212: eBGP without explicit policy exchanges nothing.
            None if ebgp => Ok(Arc::new(Policy::reject_all())),
            None => Ok(Arc::new(Policy::accept_all())),
        }
    };
    let mut neighbors = Vec::new();
    let mut next_hop_ipv6_auto = Vec::new();
    let mut warnings = Vec::new();
    let mut transport = Vec::new();
    let mut names = std::collections::HashSet::new();
    let mut addresses = std::collections::HashSet::new();
    for (i, n) in bgp.neighbor.into_iter().enumerate() {
        let at = format!("bgp.neighbor[{i}]");
        if n.name.is_empty()
            || !n
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            bail!(
                "{at}.name: {:?} must be letters, digits, '-', '_' or '.'",
                n.name
            );
        }
        if !names.insert(n.name.clone()) {
            bail!("{at}.name: {:?} is used by another neighbor", n.name);
        }
        if !addresses.insert(n.address) {
            bail!("{at}.address: {} is used by another neighbor", n.address);
        }
        if n.hold_time == 1 || n.hold_time == 2 {
            bail!(
                "{at}.hold_time: must be 0 or at least 3 seconds (RFC 4271), not {}",
                n.hold_time
            );
        }
        if n.remote_as == 0 {
            bail!("{at}.remote_as: 0 is not an AS number");
        }
        if n.families.is_empty() {
            bail!("{at}.families: at least one of \"ipv4\", \"ipv6\"");
        }
        if n.bfd_interval.is_some_and(|i| !(10..=60_000).contains(&i)) {
            bail!("{at}.bfd_interval: milliseconds between 10 and 60000");
        }
        if n.bfd_multiplier == Some(0) {
            bail!("{at}.bfd_multiplier: at least 1");
        }
        const DAY: u64 = 86_400;
        if n.connect_retry > DAY {
            bail!(
                "{at}.connect_retry: at most {DAY} seconds, not {}",
                n.connect_retry
            );
        }
        if n.error_wait[1] > DAY {
            bail!(
                "{at}.error_wait: at most {DAY} seconds, not {}",
                n.error_wait[1]
            );
        }
        if let Some(m) = &n.max_prefixes
            && m.restart_after > DAY
        {
            bail!(
                "{at}.max_prefixes.restart_after: at most {DAY} seconds, not {}",
                m.restart_after
            );
        }
        if n.error_wait[0] == 0 || n.error_wait[0] > n.error_wait[1] {
            bail!("{at}.error_wait: [min, max] seconds with 0 < min <= max");
        }
        if let Some(local) = n.local_address
            && local.is_ipv4() != n.address.is_ipv4()
        {
            bail!(
                "{at}.local_address: {local} is not of the same family as address {}",
                n.address
            );
        }
        check_link_local(&at, &n)?;
        check_transport(&at, &n)?;
        let ebgp = n.remote_as != bgp.asn;
        let import = lookup(&format!("{at}.import"), &n.import, ebgp)?;
        let export = lookup(&format!("{at}.export"), &n.export, ebgp)?;
        let mut nc = NeighborConfig::new(&n.name, n.address, n.remote_as, import, export);
        nc.local_address = n.local_address;
        nc.passive = n.passive;
        nc.hold_time = n.hold_time;
        nc.connect_retry = Duration::from_secs(n.connect_retry.max(1));
        nc.idle_hold = Duration::from_secs(n.error_wait[0]);
        nc.idle_hold_max = Duration::from_secs(n.error_wait[1]);
        nc.next_hop_self = n.next_hop_self;
        nc.route_reflector_client = n.route_reflector_client;
        nc.families = n.families.iter().map(|f| Family::from(*f)).collect();
        nc.max_prefixes = n.max_prefixes.as_ref().map(|m| MaxPrefixes {
            limit: m.limit,
            action: match m.action {
                MaxAction::Warn => MaxPrefixAction::Warn,
                MaxAction::Restart => {
                    MaxPrefixAction::Restart(Duration::from_secs(m.restart_after))
                }
                MaxAction::Shutdown => MaxPrefixAction::Shutdown,
            },
        });
        nc.extended_next_hop = n.extended_next_hop;
        nc.next_hop_ipv4 = n.next_hop_ipv4;
        match n.next_hop_ipv6.as_ref().map(|p| p.0) {
            Some(NextHopIpv6::Address(a)) => nc.next_hop_ipv6 = Some(a),
            // Over IPv6 our address on the session is the next hop.
            Some(NextHopIpv6::Auto) if n.address.is_ipv4() => {
                next_hop_ipv6_auto.push(n.name.clone());
            }
            _ => {}
        }
        nc.soft_reconfiguration_inbound = n.soft_reconfiguration_inbound;
        nc.enabled = n.enabled;
        nc.graceful_restart = n.graceful_restart;
        if n.restart_time > 4095 {
            bail!("{at}.restart_time: at most 4095 seconds (12 bits in the capability)");
        }
        nc.restart_time = n.restart_time;
        transport.push(Transport {
            port: n.port,
            local_address: n.local_address,
            interface: n.interface.clone(),
            multihop: n.multihop,
            ttl_security: n.ttl_security,
            password: n.password.clone(),
            ebgp,
            bfd: n.bfd,
            bfd_timers: (
                n.bfd_interval.unwrap_or(bfd.interval),
                n.bfd_multiplier.unwrap_or(bfd.multiplier),
            ),
        });
        if ebgp && (n.import.is_none() || n.export.is_none()) {
            let missing = match (n.import.is_none(), n.export.is_none()) {
                (true, true) => "import and export",
                (true, false) => "import",
                _ => "export",
            };
            warnings.push(format!(
                "neighbor {}: eBGP without an explicit {missing} policy: no routes are exchanged that way (RFC 8212); set import/export = \"all\" or a policy name",
                n.name
            ));
        }
        neighbors.push(nc);
    }
    let mut statics = Vec::new();
    for (i, s) in bgp.statics.into_iter().enumerate() {
        let at = format!("bgp.static[{i}]");
        let prefix = s.prefix.0;
        if prefix != prefix.trunc() {
            bail!(
                "{at}.prefix: {prefix} has host bits set (did you mean {}?)",
                prefix.trunc()
            );
        }
        let kinds = [
            s.blackhole,
            s.unreachable,
            s.via.is_some(),
            s.device.is_some(),
        ];
        let kind = match kinds {
            [true, false, false, false] => StaticKind::Blackhole,
            [false, true, false, false] => StaticKind::Unreachable,
            [false, false, true, false] => {
                StaticKind::Via(s.via.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
            }
            [false, false, false, true] => {
                let device = s.device.clone().unwrap_or_default();
                check_interface_name(&format!("{at}.device"), &device)?;
                StaticKind::Device(device)
            }
            _ => bail!(
                "{at}: give exactly one of blackhole = true, unreachable = true, via = ADDRESS, device = NAME"
            ),
        };
        statics.push(StaticRoute { prefix, kind });
    }
    let speaker = SpeakerConfig {
        asn: bgp.asn,
        router_id: bgp.router_id,
        cluster_id: bgp.cluster_id,
        selection: Selection {
            always_compare_med: bgp.always_compare_med,
            multipath: bgp.multipath,
        },
        neighbors,
        statics,
    };
    Ok(BgpConfig {
        speaker,
        listen: bgp.listen,
        transport,
        warnings,
        connected: bgp.connected,
        next_hop_ipv6_auto,
        bfd,
        mesh_export: None,
    })
}

/// Each config text is refused with a message holding its expected text
/// and naming the file (the config modules' tests).
#[cfg(test)]
pub(crate) fn assert_refused<'a>(cases: impl IntoIterator<Item = (String, &'a str)>) {
    for (text, expected) in cases {
        let message = format!(
            "{:#}",
            NodeConfig::parse(&text, Path::new("test.toml")).expect_err("must be refused")
        );
        assert!(
            message.contains(expected),
            "{expected:?} not in {message:?}"
        );
        assert!(
            message.contains("test.toml"),
            "the file is named: {message}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeConfig> {
        NodeConfig::parse(text, Path::new("test.toml"))
    }

    fn error(text: &str) -> String {
        format!("{:#}", parse(text).expect_err("must be refused"))
    }

    const BASE: &str = "[bgp]\nasn = 65000\nrouter_id = \"10.0.0.1\"\n";

    #[test]
    fn the_deploy_example_border_is_valid() {
        let c = NodeConfig::parse(
            include_str!("../../../deploy/examples/border.toml"),
            Path::new("border.toml"),
        )
        .expect("deploy/examples/border.toml");
        assert!(c.bgp.is_some() && c.mesh.is_some());
    }

    #[test]
    fn a_mesh_export_names_a_policy_and_a_limit() {
        let c = parse(&format!(
            "{BASE}[mesh]\nexport = \"to-mesh\"\nexport_limit = 50\n[policy.to-mesh]\ndefault = \"accept\"\n"
        ))
        .expect("valid");
        let (policy, limit) = c.bgp.and_then(|b| b.mesh_export).expect("an export");
        assert_eq!((policy.name.as_str(), limit), ("to-mesh", 50));
        let c = parse(&format!("{BASE}[mesh]\nexport = \"all\"\n")).expect("valid");
        assert_eq!(c.bgp.and_then(|b| b.mesh_export).map(|e| e.1), Some(1000));
        assert!(
            error("[mesh]\nexport = \"all\"\n")
                .contains("mesh.export: exports BGP-learned routes, but there is no [bgp] section")
        );
        assert!(
            error(&format!("{BASE}[mesh]\nexport = \"nope\"\n"))
                .contains("mesh.export: no policy named \"nope\"")
        );
        assert!(
            error(&format!(
                "{BASE}[mesh]\nexport = \"all\"\nexport_limit = 0\n"
            ))
            .contains("mesh.export_limit: 0 is outside 1 to 10000")
        );
    }

    #[test]
    fn a_full_config_loads() {
        let config = parse(&format!(
            r#"{BASE}
multipath = true
connected = ["*"]
[[bgp.neighbor]]
name = "isp"
address = "172.30.0.1"
remote_as = 65001
import = "all"
export = "announce"
max_prefixes = {{ limit = 1000, action = "restart", restart_after = 30 }}
[[bgp.static]]
prefix = "44.30.127.0/24"
blackhole = true
[policy.announce]
rules = [ {{ match = {{ prefix = ["44.30.127.0/24"] }}, set = {{ prepend = 2 }}, action = "accept" }} ]
[kernel]
table = 100
"#
        ))
        .expect("valid");
        let bgp = config.bgp.expect("bgp");
        assert_eq!(bgp.speaker.neighbors.len(), 1);
        assert!(bgp.speaker.selection.multipath);
        assert_eq!(bgp.connected, vec!["*"]);
        assert!(bgp.warnings.is_empty());
        assert_eq!(config.kernel.table, 100);
    }

    #[test]
    fn mistakes_name_the_field() {
        crate::config::assert_refused([
            (format!("{BASE}routerid = 1\n"), "unknown field `routerid`"),
            (
                format!(
                    "{BASE}[[bgp.neighbor]]\nname = \"x\"\naddress = \"1.2.3\"\nremote_as = 1\n"
                ),
                "address",
            ),
            (
                format!(
                    "{BASE}[[bgp.neighbor]]\nname = \"x\"\naddress = \"10.0.0.2\"\nremote_as = 65001\nimport = \"nope\"\nexport = \"all\"\n"
                ),
                "bgp.neighbor[0].import: no policy named \"nope\"",
            ),
            (
                format!(
                    "{BASE}[[bgp.neighbor]]\nname = \"x\"\naddress = \"10.0.0.2\"\nremote_as = 65001\nhold_time = 2\n"
                ),
                "bgp.neighbor[0].hold_time",
            ),
            (
                format!("{BASE}[[bgp.static]]\nprefix = \"44.30.127.1/24\"\nblackhole = true\n"),
                "did you mean 44.30.127.0/24",
            ),
            (
                format!("{BASE}[[bgp.static]]\nprefix = \"44.30.127.0/24\"\n"),
                "bgp.static[0]: give exactly one of",
            ),
            (
                format!(
                    "{BASE}[policy.p]\nrules = [ {{ match = {{ prefix = [\"10.0.0.0/8{{4,8}}\"] }}, action = \"accept\" }} ]\n"
                ),
                "10.0.0.0/8{4,8}",
            ),
            (
                format!("{BASE}[policy.p]\nrules = [ {{ action = \"maybe\" }} ]\n"),
                "maybe",
            ),
            (
                format!(
                    "{BASE}[[bgp.neighbor]]\nname = \"x\"\naddress = \"10.0.0.2\"\nremote_as = 65001\nconnect_retry = 999999999\n"
                ),
                "connect_retry",
            ),
            (
                "[bgp]\nasn = 23456\nrouter_id = \"10.0.0.1\"\n".to_string(),
                "bgp.asn",
            ),
            ("[kernel]\ntable = 255\n".to_string(), "kernel.table"),
        ]);
    }

    #[test]
    fn ebgp_without_policies_is_warned_about_and_denies() {
        let config = parse(&format!(
            "{BASE}[[bgp.neighbor]]\nname = \"isp\"\naddress = \"10.0.0.2\"\nremote_as = 65001\n"
        ))
        .expect("valid");
        let bgp = config.bgp.expect("bgp");
        assert!(
            bgp.warnings
                .iter()
                .any(|w| w.contains("RFC 8212") && w.contains("import and export")),
            "{:?}",
            bgp.warnings
        );
        let n = &bgp.speaker.neighbors[0];
        assert_eq!(
            format!("{:?}", n.import),
            format!("{:?}", Arc::new(Policy::reject_all()))
        );
        // iBGP defaults to all, without a warning.
        let config = parse(&format!(
            "{BASE}[[bgp.neighbor]]\nname = \"rr\"\naddress = \"10.0.0.3\"\nremote_as = 65000\n"
        ))
        .expect("valid");
        assert!(config.bgp.expect("bgp").warnings.is_empty());
    }
    /// `check` refuses what would only fail once `run` opens its sockets.
    #[test]
    fn what_the_sockets_would_refuse_is_refused_by_check() {
        let neighbor = |extra: &str| {
            format!(
                "{BASE}[[bgp.neighbor]]\nname = \"isp\"\naddress = \"10.0.0.2\"\nremote_as = 65001\n{extra}\n"
            )
        };
        let long_key = "k".repeat(100);
        crate::config::assert_refused([
            (
                neighbor(&format!("password = \"{long_key}\"")),
                "test.toml: bgp.neighbor[0].password: the TCP-MD5 key is 100 bytes; Linux takes at most 80 (TCP_MD5SIG)",
            ),
            (
                neighbor("password = \"\""),
                "bgp.neighbor[0].password: empty",
            ),
            (
                neighbor("multihop = 255"),
                "bgp.neighbor[0].multihop: at most 254 hops",
            ),
            (
                neighbor("port = 0"),
                "bgp.neighbor[0].port: 0 is not a port",
            ),
            (
                neighbor("interface = \"wg0\""),
                "bgp.neighbor[0].interface: only for a link-local (fe80::/10) address, not 10.0.0.2",
            ),
            (
                format!(
                    "{BASE}[[bgp.neighbor]]\nname = \"x\"\naddress = \"fe80::3\"\nremote_as = 65001\n"
                ),
                "bgp.neighbor[0].interface: fe80::3 is link-local: say which interface it is on",
            ),
            (
                format!(
                    "{BASE}[[bgp.neighbor]]\nname = \"x\"\naddress = \"fe80::3\"\ninterface = \"wg0\"\nlocal_address = \"2001:db8::1\"\nremote_as = 65001\n"
                ),
                "bgp.neighbor[0].local_address: 2001:db8::1 and address fe80::3 must both be link-local or both not",
            ),
            (
                format!(
                    "{BASE}[[bgp.neighbor]]\nname = \"x\"\naddress = \"224.0.0.5\"\nremote_as = 65001\n"
                ),
                "bgp.neighbor[0].address: 224.0.0.5 is not a unicast address",
            ),
            (
                format!("{BASE}listen = [\"0.0.0.0:0\"]\n"),
                "bgp.listen[0]: 0.0.0.0:0 has no port",
            ),
            (
                format!("{BASE}listen = [\"0.0.0.0:179\", \"[::]:179\", \"10.0.0.1:179\"]\n"),
                "bgp.listen[2]: 10.0.0.1:179 overlaps bgp.listen[0] (0.0.0.0:179)",
            ),
            (
                format!("{BASE}listen = [\"[::1]:1790\", \"[::1]:1790\"]\n"),
                "bgp.listen[1]: [::1]:1790 overlaps bgp.listen[0]",
            ),
            (
                format!("{BASE}connected = [\"*\", \"a-very-long-interface\"]\n"),
                "bgp.connected[1]: \"a-very-long-interface\" is not an interface name",
            ),
            (
                format!("{BASE}[[bgp.static]]\nprefix = \"10.1.0.0/16\"\ndevice = \"eth0:1\"\n"),
                "bgp.static[0].device: \"eth0:1\" is not an interface name",
            ),
            (
                "[mesh]\ninterface = \"wg/0\"\n".to_string(),
                "mesh.interface: \"wg/0\" is not an interface name",
            ),
            (
                format!(
                    "[control]\nsocket = \"/run/{}/bgp4mesh.sock\"\n",
                    "d".repeat(100)
                ),
                "control.socket: /run/ddd",
            ),
        ]);
        // What is allowed still is: the longest key, GTSM over 254 hops,
        // IPv4 and IPv6 wildcards together, addresses on other ports.
        let key = "k".repeat(80);
        parse(&format!(
            "{BASE}listen = [\"0.0.0.0:179\", \"[::]:179\", \"127.0.0.1:1790\"]\nconnected = [\"*\", \"eth0\"]\n[[bgp.neighbor]]\nname = \"isp\"\naddress = \"10.0.0.2\"\nremote_as = 65001\npassword = \"{key}\"\nmultihop = 254\nttl_security = true\n"
        ))
        .expect("valid");
    }
}
