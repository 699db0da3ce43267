//! `[[wireguard]]`: a WireGuard interface with many peers, as a wg-quick
//! file makes one (docs/configuration.md, "`[[wireguard]]`"): seed 001's
//! server, its clients the peers and its address the VIP. Written in the
//! TOML, or `config = "/etc/wireguard/wg0.conf"` (read by [`wg_quick`]).
//!
//! Unlike a `[[peering]]` it has no BGP session of its own; the peers'
//! allowed IPs are theirs (routed into the interface, as wg-quick does),
//! and a `[[bgp.static]] device = "wg0"` announces what it serves.
//!
//! [`wg_quick`]: super::wg_quick

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use bgp4mesh_wireguard::{Backend, Key};
use ipnet::IpNet;
use serde::Deserialize;

use super::wg_quick::{self, WgQuickFile};
use super::{MTU_RANGE, MeshSection, Peering, check_interface_name, read_private_key};

/// One `[[wireguard]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireguardSection {
    /// Default with `config`: the file's name without `.conf`.
    pub interface: Option<String>,
    /// A wg-quick file instead of the keys below.
    pub config: Option<PathBuf>,
    pub private_key_file: Option<PathBuf>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub address: Option<Vec<String>>,
    pub mtu: Option<u16>,
    /// auto (the kernel module if present), kernel, or userspace.
    pub backend: Option<String>,
    pub peer: Option<Vec<WireguardPeerSection>>,
    /// Servers sharing this interface's identity (seed 001).
    pub cluster: Option<ClusterSection>,
}

/// `[wireguard.cluster]`: the other servers with the same key, address
/// and peers, which take over each other's clients.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Our end of the sync channel, `address:port`.
    pub listen: String,
    /// The other servers' `listen`.
    pub members: Vec<String>,
    /// 32 random bytes in base64 (`bgp4mesh genkey`), the same on every
    /// server, mode 0600.
    pub key_file: PathBuf,
}

/// One `[[wireguard.peer]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireguardPeerSection {
    pub public_key: String,
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    pub endpoint: Option<String>,
    pub persistent_keepalive: Option<u16>,
    pub preshared_key_file: Option<PathBuf>,
}

/// Where a key comes from: a file (read at start and on every reload), or
/// written in a wg-quick file. `Debug` never shows a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Given(Key),
}

/// A checked `[[wireguard]]`: what the daemon makes and keeps in step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wireguard {
    pub interface: String,
    /// The wg-quick file it was read from.
    pub config: Option<PathBuf>,
    /// A file is made (0600) when missing, as a peering's.
    pub private_key: KeySource,
    /// 0: a port the system picks.
    pub listen_port: u16,
    pub fwmark: u32,
    pub address: Vec<IpNet>,
    pub mtu: u16,
    pub backend: Backend,
    pub peers: Vec<WireguardPeer>,
    pub cluster: Option<Cluster>,
}

/// A checked `[wireguard.cluster]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub listen: SocketAddr,
    pub members: Vec<SocketAddr>,
    /// Must exist at start (every member has the same).
    pub key_file: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireguardPeer {
    pub public_key: Key,
    /// A file must exist at start (both ends need the same key).
    pub preshared_key: Option<KeySource>,
    pub endpoint: Option<std::net::SocketAddr>,
    /// Networks without host bits, as WireGuard keeps them.
    pub allowed_ips: Vec<IpNet>,
    pub persistent_keepalive: Option<u16>,
}

impl Wireguard {
    /// The routes into the interface: each peer's allowed IPs, but those
    /// inside a network of the interface's own addresses (the kernel's
    /// route for the address covers them), as wg-quick adds them.
    pub fn routes(&self) -> Vec<IpNet> {
        let own: Vec<IpNet> = self.address.iter().map(IpNet::trunc).collect();
        let mut routes: Vec<IpNet> = self
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .filter(|net| !own.iter().any(|o| o.contains(net)))
            .collect();
        routes.sort();
        routes.dedup();
        routes
    }
}

/// Reads a preshared key file: mode 0600, one base64 key (never shown).
pub fn read_preshared_key(path: &Path) -> Result<Key> {
    read_private_key(path)?.with_context(|| {
        format!(
            "{}: no such file (a preshared key is the same on both ends: `wg genpsk` makes one)",
            path.display()
        )
    })
}

/// How a field is named in messages: its TOML path, or the wg-quick
/// file's line and key.
struct Names {
    at: String,
    file: Option<(PathBuf, Vec<usize>)>,
}

impl Names {
    /// An [Interface] field.
    fn field(&self, toml: &str, wg: &str) -> String {
        match &self.file {
            None => format!("{}.{toml}", self.at),
            Some((path, _)) => format!("{}.config: {} {wg}", self.at, path.display()),
        }
    }

    /// A peer's field (`index`: which of a list).
    fn peer(&self, k: usize, toml: &str, wg: &str, index: Option<usize>) -> String {
        match &self.file {
            None => match index {
                Some(j) => format!("{}.peer[{k}].{toml}[{j}]", self.at),
                None => format!("{}.peer[{k}].{toml}", self.at),
            },
            Some((path, lines)) => format!(
                "{}.config: {} line {} ([Peer]) {wg}",
                self.at,
                path.display(),
                lines.get(k).copied().unwrap_or_default()
            ),
        }
    }
}

/// The default interface of a wg-quick file: its name without `.conf`.
fn interface_of(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    Some(name.strip_suffix(".conf").unwrap_or(name).to_string())
}

/// Reads a wg-quick file: for its owner only when it holds a key.
fn read_wg_quick(at: &str, path: &Path) -> Result<WgQuickFile> {
    let shown = path.display();
    let metadata = std::fs::metadata(path).with_context(|| format!("{at}.config: {shown}"))?;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("{at}.config: reading {shown}"))?;
    let file = wg_quick::parse(&text).map_err(|e| anyhow::anyhow!("{at}.config: {shown} {e}"))?;
    let mode = metadata.permissions().mode() & 0o777;
    let secret = file.private_key.is_some() || file.peers.iter().any(|p| p.preshared_key.is_some());
    if secret && mode & 0o077 != 0 {
        bail!(
            "{at}.config: {shown} has mode {mode:o}: it holds a private key and must be readable by its owner only (chmod 600)"
        );
    }
    Ok(file)
}

/// The keys `config` replaces.
fn refuse_beside_config(at: &str, s: &WireguardSection) -> Result<()> {
    for (key, given) in [
        ("private_key_file", s.private_key_file.is_some()),
        ("listen_port", s.listen_port.is_some()),
        ("fwmark", s.fwmark.is_some()),
        ("address", s.address.is_some()),
        ("mtu", s.mtu.is_some()),
        ("peer", s.peer.is_some()),
    ] {
        if given {
            bail!(
                "{at}.{key}: comes from config (the wg-quick file); give either config or the keys, not both"
            );
        }
    }
    Ok(())
}

/// A TOML network list; an address alone is a host's.
fn parse_nets(field: impl Fn(usize) -> String, texts: &[String]) -> Result<Vec<IpNet>> {
    texts
        .iter()
        .enumerate()
        .map(|(j, t)| {
            t.parse::<IpNet>()
                .or_else(|_| t.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| anyhow::anyhow!("{}: {t:?} is not an address or network", field(j)))
        })
        .collect()
}

/// The interface names and ports already taken, and by whom.
pub struct Taken<'a> {
    pub peerings: &'a [Peering],
    pub mesh: Option<&'a MeshSection>,
}

/// Checks every `[[wireguard]]`; nothing is created here.
pub fn build(sections: Vec<WireguardSection>, taken: Taken<'_>) -> Result<Vec<Wireguard>> {
    let mut interfaces: HashMap<String, String> = HashMap::new();
    let mut ports: HashMap<u16, String> = HashMap::new();
    for (j, p) in taken.peerings.iter().enumerate() {
        interfaces.insert(p.interface.clone(), format!("peering[{j}]'s"));
        ports.insert(p.listen_port, format!("peering[{j}]'s"));
    }
    if let Some(mesh) = taken.mesh {
        interfaces.insert(mesh.interface.clone(), "the mesh's".into());
    }
    let mut all = Vec::new();
    for (i, s) in sections.into_iter().enumerate() {
        let at = format!("wireguard[{i}]");
        let w = build_one(&at, s)?;
        if let Some(other) = interfaces.insert(w.interface.clone(), format!("{at}'s")) {
            bail!("{at}.interface: {} is also {other}", w.interface);
        }
        if w.listen_port != 0
            && let Some(other) = ports.insert(w.listen_port, format!("{at}'s"))
        {
            bail!("{at}.listen_port: {} is also {other}", w.listen_port);
        }
        all.push(w);
    }
    Ok(all)
}

fn build_one(at: &str, s: WireguardSection) -> Result<Wireguard> {
    let mut backend: Backend = s
        .backend
        .as_deref()
        .unwrap_or("auto")
        .parse()
        .map_err(|e: String| anyhow::anyhow!("{at}.backend: {e}"))?;
    // Both forms become one shape, each field with its name for messages.
    let (names, interface, private_key, listen_port, fwmark, address, mtu, peers) = match &s.config
    {
        Some(path) => {
            refuse_beside_config(at, &s)?;
            let file = read_wg_quick(at, path)?;
            let interface = match &s.interface {
                Some(name) => name.clone(),
                None => interface_of(path).with_context(|| {
                    format!("{at}.interface: give it (the file's name says none)")
                })?,
            };
            let private = file.private_key.with_context(|| {
                format!(
                    "{at}.config: {} has no PrivateKey in [Interface]",
                    path.display()
                )
            })?;
            let names = Names {
                at: at.to_string(),
                file: Some((path.clone(), file.peers.iter().map(|p| p.line).collect())),
            };
            let peers: Vec<WireguardPeer> = file
                .peers
                .into_iter()
                .map(|p| WireguardPeer {
                    public_key: p.public_key,
                    preshared_key: p.preshared_key.map(KeySource::Given),
                    endpoint: p.endpoint,
                    allowed_ips: p.allowed_ips,
                    persistent_keepalive: p.persistent_keepalive,
                })
                .collect();
            (
                names,
                interface,
                KeySource::Given(private),
                file.listen_port.unwrap_or(0),
                file.fwmark.unwrap_or(0),
                file.address,
                file.mtu.unwrap_or(bgp4mesh_wireguard::DEFAULT_MTU),
                peers,
            )
        }
        None => {
            let names = Names {
                at: at.to_string(),
                file: None,
            };
            let interface = s
                .interface
                .clone()
                .with_context(|| format!("{at}.interface: missing (or give config)"))?;
            let key_file = s.private_key_file.clone().with_context(|| {
                format!("{at}.private_key_file: missing (or give config, a wg-quick file)")
            })?;
            if key_file.as_os_str().is_empty() {
                bail!("{at}.private_key_file: empty");
            }
            read_private_key(&key_file).with_context(|| format!("{at}.private_key_file"))?;
            let address = parse_nets(
                |j| format!("{at}.address[{j}]"),
                s.address.as_deref().unwrap_or_default(),
            )?;
            let mut peers = Vec::new();
            for (k, p) in s.peer.unwrap_or_default().into_iter().enumerate() {
                let public_key = Key::from_base64(&p.public_key)
                    .map_err(|e| anyhow::anyhow!("{at}.peer[{k}].public_key: {e}"))?;
                let allowed_ips = parse_nets(
                    |j| format!("{at}.peer[{k}].allowed_ips[{j}]"),
                    &p.allowed_ips,
                )?;
                let endpoint = p
                    .endpoint
                    .as_deref()
                    .map(wg_quick::parse_endpoint)
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("{at}.peer[{k}].endpoint: {e}"))?;
                let preshared_key = match p.preshared_key_file {
                    None => None,
                    Some(path) => {
                        // Missing is fine for `check`; `run` needs it.
                        read_private_key(&path)
                            .with_context(|| format!("{at}.peer[{k}].preshared_key_file"))?;
                        Some(KeySource::File(path))
                    }
                };
                peers.push(WireguardPeer {
                    public_key,
                    preshared_key,
                    endpoint,
                    allowed_ips,
                    persistent_keepalive: p.persistent_keepalive.filter(|k| *k > 0),
                });
            }
            (
                names,
                interface,
                KeySource::File(key_file),
                s.listen_port.unwrap_or(0),
                s.fwmark.unwrap_or(0),
                address,
                s.mtu.unwrap_or(bgp4mesh_wireguard::DEFAULT_MTU),
                peers,
            )
        }
    };
    check_interface_name(&format!("{at}.interface"), &interface)?;
    if !MTU_RANGE.contains(&mtu) {
        bail!(
            "{}: {mtu} is outside {} to {}",
            names.field("mtu", "MTU"),
            MTU_RANGE.start(),
            MTU_RANGE.end()
        );
    }
    for (j, net) in address.iter().enumerate() {
        let ip = net.addr();
        if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
            bail!(
                "{}: {net} is not an address for an interface",
                names.field(&format!("address[{j}]"), "Address")
            );
        }
    }
    let ours = match &private_key {
        KeySource::Given(key) => Some(key.public_key()),
        KeySource::File(path) => read_private_key(path)
            .ok()
            .flatten()
            .map(|k| k.public_key()),
    };
    let mut owners: HashMap<IpNet, usize> = HashMap::new();
    let mut keys: HashMap<Key, usize> = HashMap::new();
    let mut peers = peers;
    for (k, p) in peers.iter_mut().enumerate() {
        if ours == Some(p.public_key) {
            bail!(
                "{}: is our own public key",
                names.peer(k, "public_key", "PublicKey", None)
            );
        }
        if let Some(other) = keys.insert(p.public_key, k) {
            bail!(
                "{}: also peer[{other}]'s (one peer per key)",
                names.peer(k, "public_key", "PublicKey", None)
            );
        }
        for (j, net) in p.allowed_ips.iter_mut().enumerate() {
            let field = names.peer(k, "allowed_ips", "AllowedIPs", Some(j));
            if net.prefix_len() == 0 {
                bail!(
                    "{field}: {net} would route everything into the interface; a [[wireguard]] serves its peers' own networks (a tunnel for all traffic is a [[peering]], with routes from BGP)"
                );
            }
            *net = net.trunc();
            if let Some(other) = owners.insert(*net, k)
                && other != k
            {
                bail!("{field}: {net} is also peer[{other}]'s");
            }
        }
        p.allowed_ips.sort();
        p.allowed_ips.dedup();
    }
    let cluster = s
        .cluster
        .map(|c| build_cluster(at, c, &mut backend))
        .transpose()?;
    Ok(Wireguard {
        interface,
        cluster,
        config: s.config,
        private_key,
        listen_port,
        fwmark,
        address,
        mtu,
        backend,
        peers,
    })
}

/// Checks a `[wireguard.cluster]`; a cluster needs the userspace device
/// (the kernel module has no session handover), which `auto` becomes.
fn build_cluster(at: &str, c: ClusterSection, backend: &mut Backend) -> Result<Cluster> {
    let at = format!("{at}.cluster");
    match backend {
        Backend::Kernel => bail!(
            "{at}: needs backend = \"userspace\" (the kernel module cannot hand sessions over); remove backend or the cluster"
        ),
        Backend::Auto => *backend = Backend::Userspace,
        Backend::Userspace => {}
    }
    let address = |field: String, text: &str| -> Result<SocketAddr> {
        let address: SocketAddr = text
            .parse()
            .map_err(|_| anyhow::anyhow!("{field}: {text:?} is not address:port"))?;
        if address.port() == 0 || address.ip().is_unspecified() || address.ip().is_multicast() {
            bail!("{field}: {address} must be a unicast address of the server with a port");
        }
        Ok(address)
    };
    let listen = address(format!("{at}.listen"), &c.listen)?;
    if c.members.is_empty() {
        bail!("{at}.members: empty (the other servers' listen addresses)");
    }
    let mut members = Vec::new();
    for (j, text) in c.members.iter().enumerate() {
        let field = format!("{at}.members[{j}]");
        let member = address(field.clone(), text)?;
        if member == listen {
            bail!("{field}: {member} is our own listen address");
        }
        if members.contains(&member) {
            bail!("{field}: {member} is listed twice");
        }
        members.push(member);
    }
    if c.key_file.as_os_str().is_empty() {
        bail!("{at}.key_file: empty");
    }
    // Missing is fine for `check`; `run` needs it.
    read_private_key(&c.key_file).with_context(|| format!("{at}.key_file"))?;
    Ok(Cluster {
        listen,
        members,
        key_file: c.key_file,
    })
}

/// Reads a cluster key file: mode 0600, one base64 key (never shown).
pub fn read_cluster_key(path: &Path) -> Result<Key> {
    read_private_key(path)?.with_context(|| {
        format!(
            "{}: no such file (every server of a cluster has the same key: make one with `bgp4mesh genkey` and copy it to each)",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use crate::config::NodeConfig;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    const PEER_A: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const PEER_B: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
    const PRIVATE: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

    fn server(extra: &str) -> String {
        format!(
            r#"[bgp]
asn = 65000
router_id = "10.0.5.1"
[[bgp.static]]
prefix = "192.168.20.0/24"
device = "wg0"

[[wireguard]]
interface = "wg0"
private_key_file = "/nonexistent/bgp4mesh-test/wg0.key"
listen_port = 51820
address = ["192.168.20.1/24"]
{extra}
[[wireguard.peer]]
public_key = "{PEER_A}"
allowed_ips = ["192.168.20.2/32", "10.9.0.0/24"]

[[wireguard.peer]]
public_key = "{PEER_B}"
allowed_ips = ["192.168.20.3"]
endpoint = "198.51.100.7:51820"
persistent_keepalive = 25
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
    fn a_wireguard_interface_with_its_peers() {
        let c = parse(&server("mtu = 1380")).expect("valid");
        assert_eq!(c.wireguard.len(), 1);
        let w = &c.wireguard[0];
        assert_eq!(w.interface, "wg0");
        assert_eq!(w.listen_port, 51820);
        assert_eq!(w.mtu, 1380);
        assert_eq!(w.peers.len(), 2);
        assert_eq!(w.peers[1].allowed_ips[0].to_string(), "192.168.20.3/32");
        assert_eq!(w.peers[1].persistent_keepalive, Some(25));
        // 192.168.20.2 and .3 are on the VIP's network: only 10.9.0.0/24
        // needs a route of its own.
        let routes: Vec<String> = w.routes().iter().map(|r| r.to_string()).collect();
        assert_eq!(routes, ["10.9.0.0/24"]);
        let text = server("").replace("listen_port = 51820\n", "");
        assert_eq!(parse(&text).expect("valid").wireguard[0].listen_port, 0);
    }

    #[test]
    fn bad_sections_are_refused_with_the_key_named() {
        let peering = format!(
            "[[peering]]\nname = \"p\"\ninterface = \"wg0\"\nprivate_key_file = \"/nonexistent/k\"\nlisten_port = 51821\npeer_public_key = \"{PEER_A}\"\naddress = [\"172.20.1.2/31\"]\npeer_address = [\"172.20.1.3\"]\n[peering.bgp]\nremote_as = 65001\n"
        );
        crate::config::assert_refused([
            (
                server("").replace("\"10.9.0.0/24\"", "\"10.9.0.0/33\""),
                "wireguard[0].peer[0].allowed_ips[1]: \"10.9.0.0/33\" is not an address or network",
            ),
            (
                server("").replace("\"10.9.0.0/24\"", "\"0.0.0.0/0\""),
                "wireguard[0].peer[0].allowed_ips[1]: 0.0.0.0/0 would route everything",
            ),
            (
                server("").replace("\"192.168.20.3\"", "\"10.9.0.7/24\""),
                "wireguard[0].peer[1].allowed_ips[0]: 10.9.0.0/24 is also peer[0]'s",
            ),
            (
                server("").replace(PEER_B, PEER_A),
                "wireguard[0].peer[1].public_key: also peer[0]'s",
            ),
            (
                server("").replace(PEER_B, "no-pe"),
                "wireguard[0].peer[1].public_key: not a base64 key",
            ),
            (
                server("").replace("198.51.100.7:51820", "vpn.example.com:51820"),
                "wireguard[0].peer[1].endpoint: \"vpn.example.com:51820\" names a host",
            ),
            (
                server("mtu = 576"),
                "wireguard[0].mtu: 576 is outside 1280 to 9000",
            ),
            (server("colour = 1"), "unknown field `colour`"),
            (
                server("backend = \"wg\""),
                "wireguard[0].backend: \"wg\" is not a WireGuard backend",
            ),
            (
                server("").replace(
                    "address = [\"192.168.20.1/24\"]",
                    "address = [\"0.0.0.0/0\"]",
                ),
                "wireguard[0].address[0]: 0.0.0.0/0 is not an address for an interface",
            ),
            (
                server("").replace(
                    "private_key_file = \"/nonexistent/bgp4mesh-test/wg0.key\"\n",
                    "",
                ),
                "wireguard[0].private_key_file: missing",
            ),
            (
                server("config = \"/etc/wireguard/wg0.conf\""),
                "wireguard[0].private_key_file: comes from config",
            ),
            (
                format!("{}{peering}", server("")),
                "wireguard[0].interface: wg0 is also peering[0]'s",
            ),
            (
                format!("{}{peering}", server(""))
                    .replace(
                        "interface = \"wg0\"\nprivate_key_file = \"/nonexistent/k\"",
                        "interface = \"wg1\"\nprivate_key_file = \"/nonexistent/k\"",
                    )
                    .replace("51821", "51820"),
                "wireguard[0].listen_port: 51820 is also peering[0]'s",
            ),
            (
                format!(
                    "{}\n[[wireguard]]\ninterface = \"wg0\"\nprivate_key_file = \"/nonexistent/k2\"\n",
                    server("")
                ),
                "wireguard[1].interface: wg0 is also wireguard[0]'s",
            ),
        ]);
    }

    #[test]
    fn a_wg_quick_file_as_it_is() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = std::env::temp_dir().join(format!("bgp4mesh-wgquick-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("wg7.conf");
        let write = |text: &str| {
            let _ = std::fs::remove_file(&path);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .expect("open");
            std::io::Write::write_all(&mut f, text.as_bytes()).expect("write");
        };
        let good = format!(
            "[Interface]\nPrivateKey = {PRIVATE}\nAddress = 192.168.20.1/24\nListenPort = 51820\n\n[Peer]\nPublicKey = {PEER_A}\nAllowedIPs = 192.168.20.2/32\n\n[Peer]\nPublicKey = {PEER_B}\nAllowedIPs = 192.168.20.3/32, 10.9.0.0/24\n"
        );
        write(&good);
        let toml = format!(
            "[bgp]\nasn = 65000\nrouter_id = \"10.0.5.1\"\n[[wireguard]]\nconfig = {:?}\n",
            path.to_string_lossy()
        );
        let c = parse(&toml).expect("valid");
        let w = &c.wireguard[0];
        assert_eq!(w.interface, "wg7", "the file's name");
        assert_eq!(w.listen_port, 51820);
        assert_eq!(w.peers.len(), 2);
        assert_eq!(w.mtu, bgp4mesh_wireguard::DEFAULT_MTU);
        assert!(matches!(w.private_key, super::KeySource::Given(_)));
        let c = parse(&toml.replace(
            "[[wireguard]]\n",
            "[[wireguard]]\ninterface = \"wg-vip\"\nbackend = \"userspace\"\n",
        ))
        .expect("valid");
        assert_eq!(c.wireguard[0].interface, "wg-vip");

        write(&format!(
            "{good}PostUp = iptables -A FORWARD -i %i -j ACCEPT\n"
        ));
        let e = error(&toml);
        assert!(
            e.contains(&format!(
                "wireguard[0].config: {} line 13: PostUp is wg-quick's own; bgp4mesh runs no commands",
                path.display()
            )),
            "{e}"
        );
        write(&good.replace("10.9.0.0/24", "0.0.0.0/0"));
        let e = error(&toml);
        assert!(
            e.contains(&format!("wireguard[0].config: {} line 10 ([Peer]) AllowedIPs: 0.0.0.0/0 would route everything", path.display())),
            "{e}"
        );
        write(&good);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = error(&toml);
        assert!(e.contains("has mode 644") && e.contains("chmod 600"), "{e}");
        assert!(!e.contains(PRIVATE), "{e}");
        let e = error(&toml.replace("wg7.conf", "none.conf"));
        assert!(
            e.contains("wireguard[0].config: ") && e.contains("none.conf"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
