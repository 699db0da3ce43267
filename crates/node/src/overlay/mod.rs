//! `[overlay]` in the daemon: the bridge, one VXLAN port per tunnel peer
//! (its "virtual wire"), the route to each remote end that lets full
//! frames through (in a table of its own that only VXLAN's packets look
//! in), and the bridge's addresses, made and kept in step with
//! the configuration (config::overlay says what each key means). Only the
//! kernel crate changes the kernel; this module says what should be there,
//! and [`port_driver`] runs the ports: whether each wire's tunnel is alive,
//! and our spanning tree with `stp = "fast"`.

pub mod bpdu_socket;
pub mod port_driver;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use anyhow::{Result, bail};
use bgp4mesh_agent::MeshWires;
use bgp4mesh_kernel::links::Links;
use bgp4mesh_kernel::overlay::{Stp, VxlanPort};
use serde_json::{Value, json};

use crate::config::overlay::{Over, Overlay, StpMode, derived_vni, remote_route_mtu};
use crate::config::{Peering, Wireguard};
use port_driver::{Mode, PortDriver, PortSpec};

/// One virtual wire: a VXLAN port to one tunnel peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wire {
    /// What it goes over, as `overlay.over` and `show overlay` name it
    /// (`peering:rho`, `wireguard:wg0:KEY`).
    pub label: String,
    pub port: VxlanPort,
    /// The tunnel's interface.
    pub via: String,
}

/// The wires `overlay` asks for, given the node's tunnels. VNIs are given
/// ones, else derived from the two tunnel addresses; two wires with one
/// VNI are refused, naming both.
pub fn wires(
    overlay: &Overlay,
    peerings: &[Peering],
    wireguard: &[Wireguard],
    mesh: Option<&MeshWires>,
) -> Result<Vec<Wire>> {
    let mut wires = Vec::new();
    for over in &overlay.over {
        match over {
            Over::Peering(name) => {
                let Some(p) = peerings.iter().find(|p| &p.name == name) else {
                    bail!("overlay.over: no [[peering]] named {name:?}");
                };
                let remote = p.session_address;
                let Some(local) = p
                    .address
                    .iter()
                    .map(|a| a.addr())
                    .find(|a| a.is_ipv4() == remote.is_ipv4())
                else {
                    bail!(
                        "overlay.over: peering {name:?} has no address of the family of {remote} \
                         (its address key) for the wire's near end"
                    );
                };
                wires.push(wire(overlay, over.to_string(), local, remote, &p.interface));
            }
            Over::Wireguard(interface) => {
                let Some(w) = wireguard.iter().find(|w| &w.interface == interface) else {
                    bail!("overlay.over: no [[wireguard]] interface named {interface:?}");
                };
                for peer in &w.peers {
                    // The peer's own address: a host route among its
                    // allowed IPs, inside one of the interface's networks.
                    let found = peer.allowed_ips.iter().find_map(|ip| {
                        if ip.prefix_len() != ip.max_prefix_len() {
                            return None;
                        }
                        let local = w.address.iter().find(|a| a.contains(&ip.addr()))?;
                        Some((local.addr(), ip.addr()))
                    });
                    let Some((local, remote)) = found else {
                        bail!(
                            "overlay.over: wireguard:{interface}: peer {} has no host address \
                             (a /32 or /128 allowed IP inside the interface's address) to \
                             run a wire to",
                            peer.public_key.to_base64()
                        );
                    };
                    let label = format!("{over}:{}", peer.public_key.to_base64());
                    wires.push(wire(overlay, label, local, remote, interface));
                }
            }
            Over::Mesh => {
                // Until the mesh's state is there, no wires: they come
                // with it (and go with each peer).
                let Some(mesh) = mesh.filter(|m| !m.interface.is_empty()) else {
                    continue;
                };
                for peer in &mesh.peers {
                    // IPv4 when both ends have it, else IPv6.
                    let ends = match (mesh.address, peer.address, mesh.address6, peer.address6) {
                        (Some(l), Some(r), _, _) => Some((IpAddr::V4(l), IpAddr::V4(r))),
                        (_, _, Some(l), Some(r)) => Some((IpAddr::V6(l), IpAddr::V6(r))),
                        _ => None,
                    };
                    let Some((local, remote)) = ends else {
                        tracing::warn!(
                            "overlay: no mesh address of one family on both ends with {}",
                            peer.name
                        );
                        continue;
                    };
                    let label = format!("mesh:{}", peer.name);
                    wires.push(wire(overlay, label, local, remote, &mesh.interface));
                }
            }
        }
    }
    let mut vnis: HashMap<u32, &str> = HashMap::new();
    for w in &wires {
        if let Some(other) = vnis.insert(w.port.vni, &w.label) {
            bail!(
                "overlay: {other} and {} would both use VNI {}; give one in [overlay.vni]",
                w.label,
                w.port.vni
            );
        }
    }
    Ok(wires)
}

fn wire(overlay: &Overlay, label: String, local: IpAddr, remote: IpAddr, via: &str) -> Wire {
    let vni = overlay
        .vni
        .get(&label)
        .copied()
        .unwrap_or_else(|| derived_vni(local, remote));
    Wire {
        port: VxlanPort {
            // Unique on the node: VNIs are.
            name: format!("{}{vni:06x}", bgp4mesh_kernel::overlay::PORT_PREFIX),
            vni,
            local,
            remote,
            mtu: u32::from(overlay.mtu),
        },
        label,
        via: via.to_string(),
    }
}

/// The tunnels an overlay may go over.
#[derive(Clone, Copy)]
pub struct Tunnels<'a> {
    pub peerings: &'a [Peering],
    pub wireguard: &'a [Wireguard],
    /// The mesh's, once its agent applied a state.
    pub mesh: Option<&'a MeshWires>,
}

/// The overlay as it was last applied, and the task that runs its ports.
pub struct OverlayDriver {
    overlay: Overlay,
    wires: Vec<Wire>,
    ports: Option<PortDriver>,
}

fn stp(mode: StpMode) -> Stp {
    match mode {
        StpMode::Fast => Stp::Ours,
        StpMode::Kernel => Stp::Kernel,
        StpMode::Off => Stp::Off,
    }
}

impl OverlayDriver {
    /// Makes the overlay: the tunnels' interfaces must be there.
    pub async fn start(
        links: &Links,
        overlay: &Overlay,
        tunnels: Tunnels<'_>,
    ) -> Result<OverlayDriver> {
        let mut driver = OverlayDriver {
            overlay: overlay.clone(),
            wires: Vec::new(),
            ports: None,
        };
        if let Err(e) = driver.apply(links, overlay, tunnels).await {
            // Nothing half-built is left behind.
            driver.remove(links).await;
            return Err(e);
        }
        Ok(driver)
    }

    /// Brings the kernel to `overlay` (idempotent): wires no longer asked
    /// for go, with their routes.
    pub async fn apply(
        &mut self,
        links: &Links,
        overlay: &Overlay,
        tunnels: Tunnels<'_>,
    ) -> Result<()> {
        let wanted = wires(overlay, tunnels.peerings, tunnels.wireguard, tunnels.mesh)?;
        let kernel = links.overlay();
        if self.overlay.bridge != overlay.bridge {
            self.remove(links).await;
        }
        if self.overlay.stp != overlay.stp
            && let Some(ports) = self.ports.take()
        {
            // Another spanning tree: the old one's task stops first.
            ports.stop().await;
        }
        // From here on, what is made is what `remove` takes away.
        let before = std::mem::replace(&mut self.wires, wanted.clone());
        self.overlay = overlay.clone();
        kernel
            .ensure_bridge(
                &overlay.bridge,
                u32::from(overlay.mtu),
                stp(overlay.stp),
                overlay.priority,
            )
            .await?;
        if overlay.stp != StpMode::Fast {
            // Only our own spanning tree needs nftables.
            remove_port_states(&overlay.bridge).await;
        } else if self.ports.is_none() {
            // Before any port is attached: our ports discard until our
            // spanning tree says otherwise.
            let discarding = bgp4mesh_kernel::overlay::PortStates {
                hold: port_driver::STATES_HOLD,
                ..Default::default()
            };
            let bridge = overlay.bridge.clone();
            tokio::task::spawn_blocking(move || {
                bgp4mesh_kernel::overlay::set_port_states(&bridge, Some(&discarding))
            })
            .await
            .map_err(|e| anyhow::anyhow!("overlay: setting the port states: {e}"))??;
        }
        kernel.set_rules(true).await?;
        let names: HashSet<&str> = wanted.iter().map(|w| w.port.name.as_str()).collect();
        for old in kernel.vxlan_ports(&overlay.bridge).await? {
            if !names.contains(old.as_str()) {
                kernel.remove(&old).await?;
            }
        }
        for gone in before.iter().filter(|w| !wanted.contains(w)) {
            kernel.unroute_remote(gone.port.remote, &gone.via).await?;
        }
        for w in &wanted {
            let mtu = remote_route_mtu(overlay.mtu, w.port.remote);
            kernel.route_remote(w.port.remote, &w.via, mtu).await?;
            kernel.ensure_vxlan(&w.port, &overlay.bridge).await?;
            if !before.iter().any(|b| b.port == w.port) {
                // Up when made; the port driver takes it down and up
                // with its tunnel from then on.
                kernel.set_port_up(&w.port.name, true).await?;
            }
        }
        links
            .set_addresses(&overlay.bridge, &overlay.addresses)
            .await?;
        let mode = match overlay.stp {
            StpMode::Fast => {
                let mut config = bgp4mesh_rstp::BridgeConfig::new(bridge_mac(&overlay.bridge)?);
                config.priority = overlay.priority;
                Mode::Rstp(config)
            }
            StpMode::Kernel | StpMode::Off => Mode::Kernel,
        };
        if self.ports.as_ref().is_some_and(|p| *p.mode() != mode)
            && let Some(ports) = self.ports.take()
        {
            ports.stop().await;
        }
        if self.ports.is_none() {
            // A driver before it may have set dead wires down.
            for w in &wanted {
                kernel.set_port_up(&w.port.name, true).await?;
            }
            self.ports = Some(PortDriver::start(&overlay.bridge, mode)?);
        }
        if let Some(ports) = &self.ports {
            ports.set_ports(
                wanted
                    .iter()
                    .map(|w| PortSpec {
                        name: w.port.name.clone(),
                        label: w.label.clone(),
                        via: w.via.clone(),
                        remote: w.port.remote,
                    })
                    .collect(),
            );
        }
        Ok(())
    }

    /// Removes what the overlay made: its ports, their routes, the bridge.
    pub async fn remove(&mut self, links: &Links) {
        if let Some(ports) = self.ports.take() {
            ports.stop().await;
        }
        remove_port_states(&self.overlay.bridge).await;
        let kernel = links.overlay();
        for w in std::mem::take(&mut self.wires) {
            if let Err(e) = kernel.remove(&w.port.name).await {
                tracing::warn!("overlay: {e:#}");
            }
            if let Err(e) = kernel.unroute_remote(w.port.remote, &w.via).await {
                tracing::warn!("overlay: {e:#}");
            }
        }
        if let Err(e) = kernel.remove_bridge(&self.overlay.bridge).await {
            tracing::warn!("overlay: {e:#}");
        }
        if let Err(e) = kernel.set_rules(false).await {
            tracing::warn!("overlay: {e:#}");
        }
    }

    /// How many wires it has.
    pub fn wires(&self) -> usize {
        self.wires.len()
    }

    /// `show overlay`: the bridge, the spanning tree, and each wire.
    pub fn show(&self) -> Value {
        let mut status = self
            .ports
            .as_ref()
            .map(PortDriver::status)
            .unwrap_or(Value::Null);
        if self.overlay.stp == StpMode::Kernel {
            kernel_tree(&self.overlay.bridge, &self.wires, &mut status);
        }
        let mut shown = json!({
            "bridge": self.overlay.bridge,
            "mtu": self.overlay.mtu,
            "stp": match self.overlay.stp {
                StpMode::Fast => "fast",
                StpMode::Kernel => "stp",
                StpMode::Off => "off",
            },
            "wires": self.wires.iter().map(|w| {
                let mut wire = json!({
                    "port": w.port.name,
                    "over": w.label,
                    "vni": w.port.vni,
                    "local": w.port.local.to_string(),
                    "remote": w.port.remote.to_string(),
                    "via": w.via,
                });
                if let Some(Value::Object(port)) = status["ports"].get(&w.port.name) {
                    for (k, v) in port {
                        wire[k] = v.clone();
                    }
                }
                wire
            }).collect::<Vec<_>>(),
        });
        for key in [
            "bridge_id",
            "root",
            "root_port",
            "root_path_cost",
            "topology_changes",
            "last_topology_change_at",
        ] {
            if let Some(v) = status.get(key) {
                shown[key] = v.clone();
            }
        }
        shown
    }
}

/// Removes `bridge`'s port-state table, off the async threads; there may
/// be none.
async fn remove_port_states(bridge: &str) {
    let bridge = bridge.to_string();
    let result = tokio::task::spawn_blocking(move || {
        bgp4mesh_kernel::overlay::set_port_states(&bridge, None)
    })
    .await;
    if let Ok(Err(e)) = result {
        tracing::debug!("overlay: no port-state table to remove: {e:#}");
    }
}

/// The kernel STP's view, from sysfs, into `status` as our own tree
/// reports it: the bridge's and the root's identifiers, the root port and
/// each wire's state.
fn kernel_tree(bridge: &str, wires: &[Wire], status: &mut Value) {
    let read = |path: String| {
        std::fs::read_to_string(path)
            .ok()
            .map(|t| t.trim().to_string())
    };
    let sys = format!("/sys/class/net/{bridge}/bridge");
    if !status.is_object() {
        *status = json!({});
    }
    status["bridge_id"] = json!(read(format!("{sys}/bridge_id")));
    status["root"] = json!(read(format!("{sys}/root_id")));
    status["root_path_cost"] =
        json!(read(format!("{sys}/root_path_cost")).and_then(|c| c.parse::<u64>().ok()));
    let root_port = read(format!("{sys}/root_port")).and_then(|p| p.parse::<u32>().ok());
    let mut root_name = None;
    for w in wires {
        let port = format!("/sys/class/net/{}/brport", w.port.name);
        let number = read(format!("{port}/port_no"))
            .and_then(|n| u32::from_str_radix(n.trim_start_matches("0x"), 16).ok());
        if number.is_some() && number == root_port {
            root_name = Some(w.port.name.clone());
        }
        // include/uapi/linux/if_bridge.h: BR_STATE_*.
        let state = match read(format!("{port}/state")).as_deref() {
            Some("0") => "down",
            Some("1") => "listening",
            Some("2") => "learning",
            Some("3") => "forwarding",
            Some("4") => "blocking",
            _ => continue,
        };
        status["ports"][&w.port.name]["state"] = json!(state);
    }
    status["root_port"] = json!(root_name);
}

/// The bridge's MAC address: our spanning tree's bridge identifier.
fn bridge_mac(bridge: &str) -> Result<[u8; 6]> {
    let path = format!("/sys/class/net/{bridge}/address");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("overlay: reading {path}: {e}"))?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .filter_map(|b| u8::from_str_radix(b, 16).ok())
        .collect();
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("overlay: {path} says {:?}, not a MAC address", text.trim()))
}
