//! `[overlay]`: a layer-2 overlay over the node's tunnels (seed 003): a
//! bridge bgp4mesh owns, one VXLAN port per tunnel peer, a spanning tree.
//!
//! ```toml
//! [overlay]
//! bridge = "br-l2"
//! mtu = 1500
//! over = ["peering:rho", "peering:bob"]
//! stp = "fast"
//! address = ["10.99.0.1/24"]
//! [overlay.vni]
//! "peering:rho" = 1001
//! ```
//!
//! Each end of a tunnel derives the same VNI from the pair of tunnel
//! addresses ([`derived_vni`]), so nothing needs to be agreed by hand;
//! `[overlay.vni]` gives one where the other end is configured by hand
//! (the seed's `ip link add … id N`).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use anyhow::{Result, bail};
use ipnet::IpNet;
use serde::Deserialize;

use super::{Parsed, Peering, Wireguard, check_interface_name};

/// The overlay's MTU when none is given: full Ethernet frames.
pub const DEFAULT_MTU: u16 = 1500;
/// The MTUs an overlay may have: IPv6 needs 1280; above 9000 the VXLAN
/// packets would need more fragments than is reasonable.
pub const MTU_RANGE: std::ops::RangeInclusive<u16> = 1280..=9000;
/// The largest VNI (24 bits).
pub const MAX_VNI: u32 = (1 << 24) - 1;

/// `[overlay]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlaySection {
    pub bridge: String,
    #[serde(default = "default_mtu")]
    pub mtu: u16,
    /// `"peering:NAME"`, `"wireguard:INTERFACE"` (each of its peers) or
    /// `"mesh"` (each peer of the controller's mesh).
    pub over: Vec<String>,
    /// `"fast"` (ours), `"stp"` (the kernel bridge's), `"off"`.
    #[serde(default = "default_stp")]
    pub stp: String,
    /// Addresses on the bridge.
    #[serde(default)]
    pub address: Vec<Parsed<IpNet>>,
    /// The bridge's priority in the spanning tree: the lowest becomes
    /// root. A multiple of 4096, 0 to 61440.
    #[serde(default = "default_priority")]
    pub priority: u16,
    /// VNIs given by hand, per entry of `over` (a `wireguard:` entry's
    /// peers: `"wireguard:wg0:PUBLIC_KEY"`).
    #[serde(default)]
    pub vni: HashMap<String, u32>,
}

fn default_mtu() -> u16 {
    DEFAULT_MTU
}

fn default_stp() -> String {
    "fast".into()
}

fn default_priority() -> u16 {
    32768
}

/// Who runs the overlay's spanning tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StpMode {
    Fast,
    Kernel,
    Off,
}

/// Where the overlay's ports go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Over {
    Peering(String),
    Wireguard(String),
    Mesh,
}

impl std::fmt::Display for Over {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Over::Peering(n) => write!(f, "peering:{n}"),
            Over::Wireguard(n) => write!(f, "wireguard:{n}"),
            Over::Mesh => f.write_str("mesh"),
        }
    }
}

/// A checked `[overlay]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub bridge: String,
    pub mtu: u16,
    pub over: Vec<Over>,
    pub stp: StpMode,
    pub addresses: Vec<IpNet>,
    pub priority: u16,
    pub vni: HashMap<String, u32>,
}

/// What else in the config the overlay refers to.
pub struct Context<'a> {
    pub peerings: &'a [Peering],
    pub wireguard: &'a [Wireguard],
    pub mesh_interface: Option<&'a str>,
}

/// Checks `[overlay]` against the rest of the config; every refusal names
/// its key.
pub fn build(section: OverlaySection, context: Context<'_>) -> Result<Overlay> {
    check_interface_name("overlay.bridge", &section.bridge)?;
    let taken = context
        .peerings
        .iter()
        .map(|p| p.interface.as_str())
        .chain(context.wireguard.iter().map(|w| w.interface.as_str()))
        .chain(context.mesh_interface);
    for name in taken {
        if name == section.bridge {
            bail!(
                "overlay.bridge: {:?} is a tunnel's interface already; the bridge needs a name of its own",
                section.bridge
            );
        }
    }
    if !MTU_RANGE.contains(&section.mtu) {
        bail!(
            "overlay.mtu: {} is outside {} to {}",
            section.mtu,
            MTU_RANGE.start(),
            MTU_RANGE.end()
        );
    }
    let stp = match section.stp.as_str() {
        "fast" => StpMode::Fast,
        "stp" => StpMode::Kernel,
        "off" => StpMode::Off,
        other => bail!("overlay.stp: {other:?} is not one of fast, stp, off"),
    };
    if section.priority % 4096 != 0 || section.priority > 61440 {
        bail!(
            "overlay.priority: {} is not a multiple of 4096 from 0 to 61440",
            section.priority
        );
    }
    if section.over.is_empty() {
        bail!(
            "overlay.over: no tunnels to lay the overlay over (\"peering:NAME\", \"wireguard:INTERFACE\" or \"mesh\")"
        );
    }
    let mut over = Vec::new();
    let mut seen = HashSet::new();
    for entry in &section.over {
        let parsed = if entry == "mesh" {
            if context.mesh_interface.is_none() {
                bail!("overlay.over: \"mesh\" needs a [mesh] section");
            }
            Over::Mesh
        } else if let Some(name) = entry.strip_prefix("peering:") {
            if !context.peerings.iter().any(|p| p.name == name) {
                bail!("overlay.over: no [[peering]] named {name:?}");
            }
            Over::Peering(name.to_string())
        } else if let Some(name) = entry.strip_prefix("wireguard:") {
            if !context.wireguard.iter().any(|w| w.interface == name) {
                bail!("overlay.over: no [[wireguard]] interface named {name:?}");
            }
            Over::Wireguard(name.to_string())
        } else {
            bail!(
                "overlay.over: {entry:?} is not \"peering:NAME\", \"wireguard:INTERFACE\" or \"mesh\""
            );
        };
        if !seen.insert(parsed.clone()) {
            bail!("overlay.over: {entry:?} is listed twice");
        }
        over.push(parsed);
    }
    let mut given = HashMap::new();
    for (key, vni) in &section.vni {
        if *vni == 0 || *vni > MAX_VNI {
            bail!("overlay.vni.{key:?}: {vni} is outside 1 to {MAX_VNI}");
        }
        let belongs = over.iter().any(|o| match o {
            Over::Wireguard(n) => key.starts_with(&format!("wireguard:{n}:")),
            other => *key == other.to_string(),
        });
        if !belongs {
            bail!("overlay.vni.{key:?}: not a tunnel of overlay.over");
        }
        if let Some(other) = given.insert(*vni, key) {
            bail!("overlay.vni.{key:?}: VNI {vni} is {other:?}'s already");
        }
    }
    Ok(Overlay {
        bridge: section.bridge,
        mtu: section.mtu,
        over,
        stp,
        addresses: section.address.into_iter().map(|a| a.0).collect(),
        priority: section.priority,
        vni: section.vni,
    })
}

/// The VNI both ends of a tunnel derive from its two addresses, whichever
/// end asks: FNV-1a over the addresses in order, folded to 24 bits, never
/// 0. Distinct pairs may collide (one in 16 million); the driver refuses
/// two ports with one VNI, and `[overlay.vni]` settles it.
pub fn derived_vni(a: IpAddr, b: IpAddr) -> u32 {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    let mut hash: u32 = 0x811c_9dc5;
    let mut feed = |bytes: &[u8]| {
        for byte in bytes {
            hash ^= u32::from(*byte);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    };
    for address in [low, high] {
        match address {
            IpAddr::V4(v4) => feed(&v4.octets()),
            IpAddr::V6(v6) => feed(&v6.octets()),
        }
    }
    let folded = (hash >> 24) ^ (hash & MAX_VNI);
    if folded == 0 { 1 } else { folded }
}

/// The route MTU a tunnel's remote end needs so that the kernel's VXLAN
/// takes a full overlay frame with DF set inside: the frame, the VXLAN
/// and UDP headers, the outer IP header. (With the route at the tunnel's
/// own MTU, the kernel's VXLAN answers such a frame with "fragmentation
/// needed" for the far end instead; with this route the outer packet goes
/// whole into the tunnel, whose own datagrams are fragmented on the way.)
pub fn remote_route_mtu(overlay_mtu: u16, remote: IpAddr) -> u32 {
    let outer = match remote {
        IpAddr::V4(_) => 20,
        IpAddr::V6(_) => 40,
    };
    // Ethernet header 14, VXLAN 8, UDP 8.
    u32::from(overlay_mtu) + 14 + 8 + 8 + outer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> OverlaySection {
        toml::from_str(text).expect("parses")
    }

    fn rho() -> Peering {
        Peering {
            name: "rho".into(),
            interface: "wg-rho".into(),
            private_key_file: "/etc/bgp4mesh/rho.key".into(),
            listen_port: 51821,
            peer_public_key: bgp4mesh_wireguard::Key([7; 32]),
            endpoint: None,
            persistent_keepalive: None,
            address: vec!["10.88.88.4/24".parse().unwrap()],
            peer_address: vec!["10.88.88.2".parse().unwrap()],
            mtu: 1420,
            backend: bgp4mesh_wireguard::Backend::Userspace,
            session_address: "10.88.88.2".parse().unwrap(),
        }
    }

    fn none() -> Context<'static> {
        static PEERINGS: std::sync::OnceLock<Vec<Peering>> = std::sync::OnceLock::new();
        Context {
            peerings: PEERINGS.get_or_init(|| vec![rho()]),
            wireguard: &[],
            mesh_interface: Some("b4m0"),
        }
    }

    #[test]
    fn an_overlay_over_a_peering_with_defaults() {
        let o = build(
            section("bridge = \"br-l2\"\nover = [\"peering:rho\"]"),
            none(),
        )
        .unwrap();
        assert_eq!(o.mtu, 1500);
        assert_eq!(o.stp, StpMode::Fast);
        assert_eq!(o.over, vec![Over::Peering("rho".into())]);
        assert_eq!(o.priority, 32768);
    }

    #[test]
    fn refusals_name_their_key() {
        let cases = [
            ("bridge = \"b4m0\"\nover = [\"mesh\"]", "overlay.bridge"),
            ("bridge = \"br\"\nover = []", "overlay.over"),
            ("bridge = \"br\"\nover = [\"peering:nope\"]", "overlay.over"),
            (
                "bridge = \"br\"\nover = [\"wireguard:wg9\"]",
                "overlay.over",
            ),
            (
                "bridge = \"br\"\nover = [\"peering:rho\", \"peering:rho\"]",
                "overlay.over",
            ),
            (
                "bridge = \"wg-rho\"\nover = [\"peering:rho\"]",
                "overlay.bridge",
            ),
            ("bridge = \"br\"\nover = [\"somewhere\"]", "overlay.over"),
            (
                "bridge = \"br\"\nover = [\"peering:rho\"]\nmtu = 9001",
                "overlay.mtu",
            ),
            (
                "bridge = \"br\"\nover = [\"peering:rho\"]\nstp = \"rstp\"",
                "overlay.stp",
            ),
            (
                "bridge = \"br\"\nover = [\"peering:rho\"]\npriority = 100",
                "overlay.priority",
            ),
            (
                "bridge = \"br\"\nover = [\"peering:rho\"]\nvni = { \"peering:rho\" = 0 }",
                "overlay.vni",
            ),
            (
                "bridge = \"br\"\nover = [\"peering:rho\"]\nvni = { \"peering:x\" = 5 }",
                "overlay.vni",
            ),
            ("bridge = \"a/b\"\nover = [\"mesh\"]", "overlay.bridge"),
        ];
        for (text, key) in cases {
            let error = build(section(text), none()).expect_err(text).to_string();
            assert!(error.starts_with(key), "{text}: {error}");
        }
        let no_mesh = Context {
            mesh_interface: None,
            ..none()
        };
        let error = build(section("bridge = \"br\"\nover = [\"mesh\"]"), no_mesh).unwrap_err();
        assert!(error.to_string().contains("[mesh]"), "{error}");
    }

    #[test]
    fn both_ends_derive_the_same_vni() {
        let a: IpAddr = "10.88.88.3".parse().unwrap();
        let b: IpAddr = "10.88.88.4".parse().unwrap();
        assert_eq!(derived_vni(a, b), derived_vni(b, a));
        assert_ne!(
            derived_vni(a, b),
            derived_vni(a, "10.88.88.5".parse().unwrap())
        );
        let v6: IpAddr = "fe80::1".parse().unwrap();
        assert!((1..=MAX_VNI).contains(&derived_vni(v6, "fe80::2".parse().unwrap())));
    }

    #[test]
    fn the_remote_route_carries_a_full_frame_with_its_headers() {
        assert_eq!(remote_route_mtu(1500, "10.0.0.1".parse().unwrap()), 1550);
        assert_eq!(remote_route_mtu(1500, "fd00::1".parse().unwrap()), 1570);
    }
}
