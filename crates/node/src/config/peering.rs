//! `[[peering]]`: one WireGuard tunnel to one peer and a BGP neighbour
//! over it (docs/configuration.md, "`[[peering]]`").
//!
//! Parsing turns each peering into two things: a [`Peering`] (the
//! interface, its addresses and MTU, the WireGuard peer), which the
//! daemon's `peerings` module creates and keeps in step, and a
//! `[[bgp.neighbor]]` built from `[peering.bgp]`, which goes to the BGP
//! driver like any other neighbour (so reload and `show protocols` treat
//! it the same).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bgp4mesh_wireguard::{Backend, Key};
use ipnet::IpNet;
use serde::Deserialize;

use super::{
    BfdSection, BgpSection, MeshSection, NeighborSection, Parsed, PolicySection,
    check_interface_name,
};

/// Keys of `[peering.bgp]` that the peering sets itself.
const SET_BY_THE_PEERING: [&str; 4] = ["name", "address", "local_address", "interface"];

/// One `[[peering]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeeringSection {
    pub name: String,
    pub interface: String,
    pub private_key_file: PathBuf,
    pub listen_port: u16,
    pub peer_public_key: String,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    #[serde(default)]
    pub address: Vec<Parsed<IpNet>>,
    #[serde(default)]
    pub peer_address: Vec<IpAddr>,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// auto (the kernel module if present), kernel, or userspace.
    #[serde(default = "default_backend")]
    pub backend: String,
    /// Any `[[bgp.neighbor]]` key but those in [`SET_BY_THE_PEERING`],
    /// plus `session = "ipv4" | "ipv6"`.
    pub bgp: Option<toml::Table>,
}

fn default_mtu() -> u16 {
    bgp4mesh_wireguard::DEFAULT_MTU
}

fn default_backend() -> String {
    "auto".into()
}

/// The smallest and largest MTU of a peering's interface: IPv6 needs
/// 1280; above 9000 even a jumbo-frame underlay cannot carry the
/// datagrams (WireGuard adds 60 to 80 bytes).
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 1280..=9000;

/// A checked peering: what the daemon makes and keeps in step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peering {
    /// Also the name of its BGP neighbour.
    pub name: String,
    pub interface: String,
    pub private_key_file: PathBuf,
    pub listen_port: u16,
    pub peer_public_key: Key,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    /// Ours on the link.
    pub address: Vec<IpNet>,
    pub peer_address: Vec<IpAddr>,
    pub mtu: u16,
    pub backend: Backend,
    /// The `peer_address` the BGP session goes to.
    pub session_address: IpAddr,
}

impl Peering {
    /// Everything reachable through the tunnel: routes come from BGP, so
    /// the one peer of the interface may send and receive anything (as
    /// DN42's wg-quick configs do with `Table = off`).
    pub fn allowed_ips() -> Vec<IpNet> {
        ["0.0.0.0/0", "::/0"]
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect()
    }
}

/// Reads a private key file: `None` when there is none yet (the daemon
/// makes one at start). A key readable by others than its owner is
/// refused, as is anything but one base64 key.
pub fn read_private_key(path: &Path) -> Result<Option<Key>> {
    let metadata = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
    };
    if !metadata.is_file() {
        bail!("{} is not a file", path.display());
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{} has mode {mode:o}: a private key must be readable by its owner only (chmod 600)",
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // The key's text is never part of a message.
    let key = Key::from_base64(&text).map_err(|e| {
        anyhow::anyhow!("{}: {e} (make one with `bgp4mesh genkey`)", path.display())
    })?;
    Ok(Some(key))
}

/// The key in `path`, or a new one written there (mode 0600, directories
/// made 0700) when there is none.
pub fn load_or_create_private_key(path: &Path) -> Result<Key> {
    if let Some(key) = read_private_key(path)? {
        return Ok(key);
    }
    use std::os::unix::fs::DirBuilderExt;
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("making {}", dir.display()))?;
    }
    let key = Key::generate_private();
    bgp4mesh_agent::write_private(path, format!("{}\n", key.to_base64()).as_bytes())?;
    Ok(key)
}

/// IPv6 link-local (fe80::/10): an address that means something only with
/// its interface.
fn is_link_local(address: IpAddr) -> bool {
    matches!(address, IpAddr::V6(a) if a.is_unicast_link_local())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
}

/// Checks every peering and makes its neighbour. Nothing is created here:
/// a peering either passes whole or the config is refused with the key
/// named.
pub fn build(
    sections: Vec<PeeringSection>,
    bgp: Option<&BgpSection>,
    mesh: Option<&MeshSection>,
    policies: &HashMap<String, PolicySection>,
    bfd: BfdSection,
) -> Result<(Vec<Peering>, Vec<NeighborSection>)> {
    let mut peerings = Vec::new();
    let mut neighbors = Vec::new();
    let mut names = HashSet::new();
    let mut interfaces: HashMap<String, usize> = HashMap::new();
    let mut ports: HashMap<u16, usize> = HashMap::new();
    let neighbor_addresses: HashSet<IpAddr> = bgp
        .map(|b| b.neighbor.iter().map(|n| n.address).collect())
        .unwrap_or_default();
    for (i, p) in sections.into_iter().enumerate() {
        let at = format!("peering[{i}]");
        let Some(bgp) = bgp else {
            bail!("{at}: a peering's session needs a [bgp] section (asn, router_id)",);
        };
        if !valid_name(&p.name) {
            bail!(
                "{at}.name: {:?} must be letters, digits, '-', '_' or '.'",
                p.name
            );
        }
        if !names.insert(p.name.clone()) {
            bail!("{at}.name: {:?} is used by another peering", p.name);
        }
        if bgp.neighbor.iter().any(|n| n.name == p.name) {
            bail!(
                "{at}.name: {:?} is also a [[bgp.neighbor]]; the peering's session has its name",
                p.name
            );
        }
        check_interface_name(&format!("{at}.interface"), &p.interface)?;
        if let Some(j) = interfaces.insert(p.interface.clone(), i) {
            bail!(
                "{at}.interface: {} is also peering[{j}]'s (one peer per interface)",
                p.interface
            );
        }
        if mesh.is_some_and(|m| m.interface == p.interface) {
            bail!("{at}.interface: {} is the mesh's interface", p.interface);
        }
        if p.listen_port == 0 {
            bail!("{at}.listen_port: 0; give the port the peer dials");
        }
        if let Some(j) = ports.insert(p.listen_port, i) {
            bail!("{at}.listen_port: {} is also peering[{j}]'s", p.listen_port);
        }
        let peer_public_key = Key::from_base64(&p.peer_public_key)
            .map_err(|e| anyhow::anyhow!("{at}.peer_public_key: {e}"))?;
        if p.private_key_file.as_os_str().is_empty() {
            bail!("{at}.private_key_file: empty");
        }
        if let Some(ours) = read_private_key(&p.private_key_file)
            .with_context(|| format!("{at}.private_key_file"))?
            && ours.public_key() == peer_public_key
        {
            bail!("{at}.peer_public_key: is our own public key (from private_key_file)");
        }
        if let Some(endpoint) = p.endpoint
            && (endpoint.port() == 0 || endpoint.ip().is_unspecified())
        {
            bail!("{at}.endpoint: {endpoint} is not an address and port to send to");
        }
        if !MTU_RANGE.contains(&p.mtu) {
            bail!(
                "{at}.mtu: {} is outside {} to {}",
                p.mtu,
                MTU_RANGE.start(),
                MTU_RANGE.end()
            );
        }
        let backend: Backend = p
            .backend
            .parse()
            .map_err(|e: String| anyhow::anyhow!("{at}.backend: {e}"))?;
        let address: Vec<IpNet> = p.address.iter().map(|a| a.0).collect();
        check_addresses(&at, &address, &p.peer_address)?;
        let mut table = p.bgp.with_context(|| {
            format!("{at}.bgp: missing; [peering.bgp] needs at least remote_as")
        })?;
        for key in SET_BY_THE_PEERING {
            if table.contains_key(key) {
                bail!(
                    "{at}.bgp.{key}: set by the peering (from name, interface, address and peer_address)"
                );
            }
        }
        let session = match table.remove("session") {
            None => None,
            Some(toml::Value::String(s)) if s == "ipv4" || s == "ipv6" => Some(s == "ipv6"),
            Some(other) => bail!("{at}.bgp.session: {other} is not \"ipv4\" or \"ipv6\""),
        };
        let session_address = match session {
            Some(v6) => p
                .peer_address
                .iter()
                .copied()
                .find(|a| a.is_ipv6() == v6)
                .with_context(|| {
                    format!(
                        "{at}.bgp.session: {} but peer_address has no {} address",
                        if v6 { "ipv6" } else { "ipv4" },
                        if v6 { "IPv6" } else { "IPv4" }
                    )
                })?,
            None => p
                .peer_address
                .iter()
                .copied()
                .find(IpAddr::is_ipv4)
                .or_else(|| p.peer_address.first().copied())
                .with_context(|| format!("{at}.peer_address: empty"))?,
        };
        if neighbor_addresses.contains(&session_address) {
            bail!("{at}.peer_address: {session_address} is also a [[bgp.neighbor]]'s address");
        }
        let local = on_link(&address, session_address)
            .map(IpNet::addr)
            .with_context(|| format!("{at}.address: none on the link of {session_address}"))?;
        table.insert("name".into(), toml::Value::String(p.name.clone()));
        table.insert(
            "address".into(),
            toml::Value::String(session_address.to_string()),
        );
        table.insert(
            "local_address".into(),
            toml::Value::String(local.to_string()),
        );
        if is_link_local(session_address) {
            table.insert("interface".into(), toml::Value::String(p.interface.clone()));
        }
        let neighbor = neighbor_from(&at, table.clone())?;
        // The neighbour's own checks (policies, timers, ...) under the
        // peering's name: the same as a [[bgp.neighbor]] gets.
        check_neighbor(&at, bgp, table, policies, bfd)?;
        peerings.push(Peering {
            name: p.name,
            interface: p.interface,
            private_key_file: p.private_key_file,
            listen_port: p.listen_port,
            peer_public_key,
            endpoint: p.endpoint,
            persistent_keepalive: p.persistent_keepalive.filter(|k| *k > 0),
            address,
            peer_address: p.peer_address,
            mtu: p.mtu,
            backend,
            session_address,
        });
        neighbors.push(neighbor);
    }
    Ok((peerings, neighbors))
}

fn neighbor_from(at: &str, table: toml::Table) -> Result<NeighborSection> {
    toml::Value::Table(table)
        .try_into()
        .map_err(|e| anyhow::anyhow!("{at}.bgp: {}", e.to_string().trim_end()))
}

/// Runs the `[[bgp.neighbor]]` checks on the peering's neighbour alone,
/// naming the peering in what they say.
fn check_neighbor(
    at: &str,
    bgp: &BgpSection,
    neighbor: toml::Table,
    policies: &HashMap<String, PolicySection>,
    bfd: BfdSection,
) -> Result<()> {
    let mut section = toml::Table::new();
    section.insert("asn".into(), toml::Value::Integer(i64::from(bgp.asn)));
    section.insert(
        "router_id".into(),
        toml::Value::String(bgp.router_id.to_string()),
    );
    section.insert(
        "neighbor".into(),
        toml::Value::Array(vec![toml::Value::Table(neighbor)]),
    );
    let section: BgpSection = toml::Value::Table(section)
        .try_into()
        .map_err(|e| anyhow::anyhow!("{at}.bgp: {}", e.to_string().trim_end()))?;
    match super::build_bgp(section, policies, bfd) {
        Ok(_) => Ok(()),
        Err(e) => bail!(
            "{}",
            format!("{e:#}").replace("bgp.neighbor[0]", &format!("{at}.bgp"))
        ),
    }
}

/// Our address on the link of `peer`: of its family, its network holding
/// `peer`.
fn on_link(address: &[IpNet], peer: IpAddr) -> Option<&IpNet> {
    address
        .iter()
        .find(|a| a.contains(&peer) && a.addr() != peer)
}

fn check_addresses(at: &str, address: &[IpNet], peer_address: &[IpAddr]) -> Result<()> {
    if address.is_empty() {
        bail!(
            "{at}.address: empty; give ours on the link (an IPv4 /31 or /30, an IPv6 link-local)"
        );
    }
    let (mut v4, mut link_local, mut v6) = (None, None, None);
    for (k, net) in address.iter().enumerate() {
        let ip = net.addr();
        if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
            bail!("{at}.address[{k}]: {net} is not an address for a link");
        }
        let slot = match net {
            IpNet::V4(n) => {
                if n.prefix_len() == 32 {
                    bail!(
                        "{at}.address[{k}]: {net} leaves no room for the peer on the link; use a /31 or /30"
                    );
                }
                if n.prefix_len() < 31 && (n.addr() == n.network() || n.addr() == n.broadcast()) {
                    bail!(
                        "{at}.address[{k}]: {net} is the network's {} address, not a host's",
                        if n.addr() == n.network() {
                            "own"
                        } else {
                            "broadcast"
                        }
                    );
                }
                &mut v4
            }
            IpNet::V6(n) => {
                if n.prefix_len() == 128 {
                    bail!(
                        "{at}.address[{k}]: {net} leaves no room for the peer on the link; use a /64 (or /127)"
                    );
                }
                if is_link_local(ip) {
                    &mut link_local
                } else {
                    &mut v6
                }
            }
        };
        if let Some(j) = slot.replace(k) {
            bail!(
                "{at}.address[{k}]: {net} is a second address of the kind of address[{j}]; give at most one IPv4, one IPv6 link-local and one other IPv6"
            );
        }
    }
    if peer_address.is_empty() {
        bail!("{at}.peer_address: empty; give the peer's address on the link");
    }
    for (k, peer) in peer_address.iter().enumerate() {
        if peer_address[..k].contains(peer) {
            bail!("{at}.peer_address[{k}]: {peer} is listed twice");
        }
        if address.iter().any(|a| a.addr() == *peer) {
            bail!("{at}.peer_address[{k}]: {peer} is our own address");
        }
        let same_family: Vec<&IpNet> = address
            .iter()
            .filter(|a| a.addr().is_ipv4() == peer.is_ipv4())
            .collect();
        if same_family.is_empty() {
            bail!(
                "{at}.peer_address[{k}]: {peer} is {}, but address has no {} address",
                if peer.is_ipv4() { "IPv4" } else { "IPv6" },
                if peer.is_ipv4() { "IPv4" } else { "IPv6" },
            );
        }
        if on_link(address, *peer).is_none() {
            let ours: Vec<String> = same_family.iter().map(|a| a.to_string()).collect();
            bail!(
                "{at}.peer_address[{k}]: {peer} is not on the link of address ({})",
                ours.join(", ")
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::NodeConfig;
    use std::path::Path;

    const KEY_A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const KEY_B: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";

    fn base(peering: &str, bgp: &str) -> String {
        format!(
            r#"[bgp]
asn = 4242421869
router_id = "172.22.132.169"
[policy.dn42-in]
default = "accept"
[policy.dn42-out]
default = "accept"

[[peering]]
name = "edge"
interface = "wg-edge"
private_key_file = "/nonexistent/bgp4mesh-test/edge.key"
listen_port = 51821
peer_public_key = "{KEY_A}"
endpoint = "198.51.100.7:51821"
persistent_keepalive = 25
address = ["172.20.0.2/31", "fe80::2/64"]
peer_address = ["172.20.0.3", "fe80::3"]
mtu = 1420
{peering}
[peering.bgp]
remote_as = 4242420000
import = "dn42-in"
export = "dn42-out"
bfd = true
{bgp}
"#
        )
    }

    fn parse(text: &str) -> anyhow::Result<NodeConfig> {
        NodeConfig::parse(text, Path::new("test.toml"))
    }

    fn error(text: &str) -> String {
        format!("{:#}", parse(text).expect_err("must be refused"))
    }

    #[test]
    fn a_peering_is_a_tunnel_and_a_neighbour_over_it() {
        let c = parse(&base("", "extended_next_hop = true")).expect("valid");
        assert_eq!(c.peerings.len(), 1);
        let p = &c.peerings[0];
        assert_eq!(p.interface, "wg-edge");
        assert_eq!(p.peer_public_key.to_base64(), KEY_A);
        assert_eq!(p.session_address.to_string(), "172.20.0.3");
        assert_eq!(p.persistent_keepalive, Some(25));
        assert_eq!(p.mtu, 1420);
        let bgp = c.bgp.expect("bgp");
        let n = &bgp.speaker.neighbors[0];
        assert_eq!(n.name, "edge");
        assert_eq!(n.address.to_string(), "172.20.0.3");
        assert_eq!(
            n.local_address.map(|a| a.to_string()).as_deref(),
            Some("172.20.0.2")
        );
        assert!(n.extended_next_hop);
        assert_eq!(n.remote_as, 4_242_420_000);
        assert!(bgp.transport[0].bfd);
    }

    #[test]
    fn the_session_prefers_ipv4_unless_told() {
        // No IPv4 peer address: the first listed.
        let c = parse(&base("", "").replace(
            "peer_address = [\"172.20.0.3\", \"fe80::3\"]",
            "peer_address = [\"fe80::3\"]",
        ));
        // A link-local session needs the neighbour's `interface` key (the
        // link-local neighbours work): either it is there and the session
        // goes to fe80::3 on wg-edge, or it is refused naming it.
        match c {
            Ok(c) => {
                assert_eq!(c.peerings[0].session_address.to_string(), "fe80::3");
                let n = &c.bgp.expect("bgp").speaker.neighbors[0];
                assert_eq!(n.address.to_string(), "fe80::3");
                assert_eq!(
                    n.local_address.map(|a| a.to_string()).as_deref(),
                    Some("fe80::2")
                );
            }
            Err(e) => assert!(format!("{e:#}").contains("interface"), "{e:#}"),
        }
        if let Ok(c) = parse(&base("", "session = \"ipv6\"")) {
            assert_eq!(c.peerings[0].session_address.to_string(), "fe80::3");
        }
        let c = parse(&base("", "session = \"ipv4\"")).expect("valid");
        assert_eq!(c.peerings[0].session_address.to_string(), "172.20.0.3");
        assert!(error(&base("", "session = \"ip\"")).contains("peering[0].bgp.session: \"ip\""));
    }

    #[test]
    fn bad_peerings_are_refused_with_the_key_named() {
        let neighbor =
            "[[bgp.neighbor]]\nname = \"edge\"\naddress = \"10.0.0.1\"\nremote_as = 65001\n";
        let second = format!(
            "[[peering]]\nname = \"two\"\ninterface = \"wg-edge\"\nprivate_key_file = \"/nonexistent/k\"\nlisten_port = 51822\npeer_public_key = \"{KEY_B}\"\naddress = [\"172.20.1.2/31\"]\npeer_address = [\"172.20.1.3\"]\n[peering.bgp]\nremote_as = 65001\n"
        );
        let second_port = second
            .replace("interface = \"wg-edge\"", "interface = \"wg-two\"")
            .replace("51822", "51821");
        crate::config::assert_refused([
            (
                base("", "").replace(KEY_A, "not-a-key"),
                "test.toml: peering[0].peer_public_key: not a base64 key",
            ),
            (
                base("", "").replace(KEY_A, "AAAA"),
                "peering[0].peer_public_key: a key is 32 bytes, this is 3",
            ),
            (
                base("", "").replace("\"172.20.0.2/31\", ", ""),
                "peering[0].peer_address[0]: 172.20.0.3 is IPv4, but address has no IPv4 address",
            ),
            (
                base("", "").replace("172.20.0.3", "172.20.0.9"),
                "peering[0].peer_address[0]: 172.20.0.9 is not on the link of address (172.20.0.2/31)",
            ),
            (
                base("", "").replace("172.20.0.2/31", "172.20.0.2/32"),
                "peering[0].address[0]: 172.20.0.2/32 leaves no room for the peer",
            ),
            (
                base("", "").replace("172.20.0.2/31", "172.20.0.0/30"),
                "peering[0].address[0]: 172.20.0.0/30 is the network's own address",
            ),
            (
                base("", "").replace("\"fe80::2/64\"", "\"fe80::2/64\", \"fe80::4/64\""),
                "peering[0].address[2]: fe80::4/64 is a second address of the kind of address[1]",
            ),
            (
                format!("{}{second}", base("", "")),
                "peering[1].interface: wg-edge is also peering[0]'s",
            ),
            (
                format!("{}{second_port}", base("", "")),
                "peering[1].listen_port: 51821 is also peering[0]'s",
            ),
            (
                base("", "colour = \"blue\""),
                "peering[0].bgp: unknown field `colour`",
            ),
            (
                base("", "address = \"172.20.0.3\""),
                "peering[0].bgp.address: set by the peering",
            ),
            (
                base("", "").replace("import = \"dn42-in\"", "import = \"nope\""),
                "peering[0].bgp.import: no policy named \"nope\"",
            ),
            (
                base("", "hold_time = 2"),
                "peering[0].bgp.hold_time: must be 0 or at least 3",
            ),
            (
                format!("{}{neighbor}", base("", "")),
                "peering[0].name: \"edge\" is also a [[bgp.neighbor]]",
            ),
            (
                base("", "").replace("mtu = 1420", "mtu = 1000"),
                "peering[0].mtu: 1000 is outside 1280 to 9000",
            ),
            (
                base("", "").replace("listen_port = 51821", "listen_port = 0"),
                "peering[0].listen_port: 0",
            ),
            (
                base("", "").replace("interface = \"wg-edge\"", "interface = \"wg/edge\""),
                "peering[0].interface: \"wg/edge\" is not an interface name",
            ),
            (
                base("backend = \"wg\"", ""),
                "peering[0].backend: \"wg\" is not a WireGuard backend",
            ),
            (
                base("", "").replacen(
                    "[bgp]\nasn = 4242421869\nrouter_id = \"172.22.132.169\"\n",
                    "",
                    1,
                ),
                "peering[0]: a peering's session needs a [bgp] section",
            ),
            (base("colour = 1", ""), "unknown field `colour`"),
        ]);
    }

    #[test]
    fn a_private_key_file_is_made_0600_and_must_stay_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("bgp4mesh-peering-{}", std::process::id()));
        let path = dir.join("sub").join("edge.key");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            super::read_private_key(&path).expect("missing is fine"),
            None
        );
        let key = super::load_or_create_private_key(&path).expect("made");
        let mode = std::fs::metadata(&path).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(super::load_or_create_private_key(&path).expect("read"), key);
        // The config refuses the peer's key being our own.
        let text = base("", "")
            .replace(
                "/nonexistent/bgp4mesh-test/edge.key",
                &path.to_string_lossy(),
            )
            .replace(KEY_A, &key.public_key().to_base64());
        assert!(error(&text).contains("peering[0].peer_public_key: is our own public key"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let message = format!(
            "{:#}",
            super::read_private_key(&path).expect_err("too open")
        );
        assert!(message.contains("mode 644"), "{message}");
        std::fs::write(&path, "secret-but-not-a-key").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let message = format!(
            "{:#}",
            super::read_private_key(&path).expect_err("not a key")
        );
        assert!(!message.contains("secret-but-not-a-key"), "{message}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
