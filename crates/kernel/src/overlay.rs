//! The layer-2 overlay's kernel side: a bridge bgp4mesh owns, one VXLAN
//! port per tunnel peer (seed 003's "virtual wires"), and the port states
//! the spanning tree computes.
//!
//! - The bridge carries the alias [`OWNER_ALIAS`]: a bridge of that name
//!   without it is someone else's, and is never touched.
//! - Each VXLAN port is unicast (local and remote are the two ends of a
//!   tunnel), UDP 4789, learning on, and leaves its outer packets
//!   fragmentable (`df unset`, the default), so 1500-byte frames with DF
//!   set inside cross 1420-byte tunnels: the kernel fragments the outer
//!   UDP packet before it enters the tunnel.
//! - With our spanning tree the kernel bridge's own STP is off, and the
//!   states our protocol core computes are applied by an nftables `bridge`
//!   table ([`port_states_script`]): a *discarding* port takes and sends
//!   nothing (so it learns nothing), a *learning* port learns but forwards
//!   nothing. Ports named [`PORT_PREFIX`]… are discarding unless set
//!   otherwise (from the moment they are attached), and the other
//!   states expire unless set again, so the data plane fails closed when
//!   the protocol stops. The kernel cannot hand its STP to user space in a network
//!   namespace (`/sbin/bridge-stp` is asked in the initial one only), and
//!   with STP off it forces every port to forwarding, so the states live
//!   in netfilter. The table also keeps BPDUs from being flooded (with STP
//!   off the bridge forwards them like any frame): our protocol reads them
//!   from each port with a packet socket and sends its own there.

use std::io::Write;
use std::net::IpAddr;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo};
use rtnetlink::packet_route::route::{
    RouteAttribute, RouteMessage, RouteMetric, RouteProtocol, RouteScope,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use rtnetlink::packet_route::{AddressFamily, IpProtocol};
use rtnetlink::{Handle, LinkBridge, LinkBridgePort, LinkUnspec, LinkVxlan, RouteMessageBuilder};

/// The alias of a bridge bgp4mesh created and owns.
pub const OWNER_ALIAS: &str = "bgp4mesh overlay";

/// The UDP port of the overlay's VXLAN ports (IANA's).
pub const VXLAN_PORT: u16 = 4789;

/// The routing table of the routes to the wires' remote ends, looked up
/// only for VXLAN's own packets (UDP to port 4789, by a rule at
/// [`RULE_PRIORITY`]): other traffic to those addresses (a BGP session, a
/// ping) keeps the tunnel's own MTU.
pub const OVERLAY_TABLE: u32 = 4789;
/// The priority of that rule (before the main table's 32766, after the
/// local table's 0).
pub const RULE_PRIORITY: u32 = 30990;
/// The routing protocol number of those routes (`ip route show proto
/// 180`): not `static`, which the mesh's routes out of its interface are
/// (the agent removes `static` routes it did not ask for).
pub const OVERLAY_PROTOCOL: RouteProtocol = RouteProtocol::Other(180);

/// Who runs the bridge's spanning tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stp {
    /// Ours, in user space (the kernel's off, states in nftables).
    Ours,
    /// The kernel bridge's classic STP (802.1D-1998), as seed 003 runs it.
    Kernel,
    /// None: the overlay must be loop-free by itself.
    Off,
}

/// One VXLAN port: a virtual wire to one tunnel peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanPort {
    pub name: String,
    pub vni: u32,
    /// This end of the tunnel.
    pub local: IpAddr,
    /// The peer's end of the tunnel.
    pub remote: IpAddr,
    pub mtu: u32,
}

/// What the kernel has of a link, as far as the overlay cares.
struct Existing {
    index: u32,
    kind: Option<InfoKind>,
    alias: Option<String>,
    controller: Option<u32>,
    mtu: Option<u32>,
    address: Option<Vec<u8>>,
    vxlan: Vec<InfoVxlan>,
}

async fn existing(handle: &Handle, name: &str) -> Result<Option<Existing>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    let link = match links.try_next().await {
        Ok(Some(link)) => link,
        Ok(None) => return Ok(None),
        // No such device: the kernel answers the dump by name with ENODEV.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_enodev() => {
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("looking up {name}")),
    };
    let mut found = Existing {
        index: link.header.index,
        kind: None,
        alias: None,
        controller: None,
        mtu: None,
        address: None,
        vxlan: Vec::new(),
    };
    for attribute in link.attributes {
        match attribute {
            LinkAttribute::IfAlias(a) => found.alias = Some(a),
            LinkAttribute::Controller(c) => found.controller = Some(c),
            LinkAttribute::Mtu(m) => found.mtu = Some(m),
            LinkAttribute::Address(a) => found.address = Some(a),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => found.kind = Some(k),
                        LinkInfo::Data(InfoData::Vxlan(v)) => found.vxlan = v,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(Some(found))
}

/// ENODEV, without a libc dependency for one number.
const fn libc_enodev() -> i32 {
    19
}

/// The overlay's links, over the rtnetlink connection of [`crate::links::Links`].
pub struct OverlayLinks<'a> {
    pub(crate) handle: &'a Handle,
}

impl OverlayLinks<'_> {
    /// Makes the bridge `name` exist, be ours, be up with `mtu`, and run
    /// `stp` (the kernel's with bridge `priority`). A link of that name
    /// that is not a bridge we made is refused.
    pub async fn ensure_bridge(&self, name: &str, mtu: u32, stp: Stp, priority: u16) -> Result<()> {
        let stp_on = stp == Stp::Kernel;
        match existing(self.handle, name).await? {
            Some(link) => {
                if link.kind != Some(InfoKind::Bridge) || link.alias.as_deref() != Some(OWNER_ALIAS)
                {
                    bail!(
                        "{name} exists and is not a bridge bgp4mesh made (no alias {OWNER_ALIAS:?}); \
                         name another bridge in [overlay] bridge, or delete {name}"
                    );
                }
                let mut message = LinkBridge::new(name)
                    .stp_state(stp_state(stp_on))
                    .priority(priority)
                    .build();
                message.header.index = link.index;
                self.handle
                    .link()
                    .set(message)
                    .execute()
                    .await
                    .with_context(|| format!("setting {name}'s STP"))?;
            }
            None => {
                let message = LinkBridge::new(name)
                    .stp_state(stp_state(stp_on))
                    .priority(priority)
                    .build();
                self.handle
                    .link()
                    .add(message)
                    .execute()
                    .await
                    .with_context(|| format!("creating the bridge {name}"))?;
            }
        }
        let Some(link) = existing(self.handle, name).await? else {
            bail!("the bridge {name} went away while it was made");
        };
        // The alias is taken on a change, not when a link is made.
        let mut message = LinkUnspec::new_with_index(link.index)
            .alias(OWNER_ALIAS)
            .mtu(mtu)
            .up();
        if link.alias.as_deref() != Some(OWNER_ALIAS)
            && let Some(mut mac) = link.address.filter(|a| a.len() == 6)
        {
            // Just made: its random address set explicitly (changed, so
            // the kernel takes it as set), so that it stays when ports come
            // and go (the kernel gives a bridge the lowest port address
            // otherwise) and the spanning tree's bridge identifier with it.
            mac[5] ^= 1;
            message = message.address(mac);
        }
        self.handle
            .link()
            .set(message.build())
            .execute()
            .await
            .with_context(|| format!("setting {name} up with MTU {mtu}"))
    }

    /// Makes the VXLAN port `port` exist as asked, attached to `bridge` and
    /// up; one that differs (VNI, ends, UDP port) is made again.
    pub async fn ensure_vxlan(&self, port: &VxlanPort, bridge: &str) -> Result<()> {
        let bridge_index = crate::link_index(self.handle, bridge).await?;
        let name = &port.name;
        if let Some(link) = existing(self.handle, name).await? {
            if link.kind != Some(InfoKind::Vxlan) {
                bail!("{name} exists and is not a VXLAN port; the overlay names its ports itself");
            }
            if vxlan_matches(&link.vxlan, port) {
                if link.controller != Some(bridge_index) || link.mtu != Some(port.mtu) {
                    self.handle
                        .link()
                        .set(
                            LinkUnspec::new_with_index(link.index)
                                .controller(bridge_index)
                                .mtu(port.mtu)
                                .build(),
                        )
                        .execute()
                        .await
                        .with_context(|| format!("attaching {name} to {bridge}"))?;
                }
                return Ok(());
            }
            self.remove(name).await?;
        }
        let mut builder = LinkVxlan::new(name, port.vni)
            .port(VXLAN_PORT)
            .learning(true);
        builder = match (port.local, port.remote) {
            (IpAddr::V4(l), IpAddr::V4(r)) => builder.local(l).remote(r),
            (IpAddr::V6(l), IpAddr::V6(r)) => builder.local6(l).remote6(r),
            _ => bail!(
                "{name}: the tunnel's ends {} and {} are of different families",
                port.local,
                port.remote
            ),
        };
        self.handle
            .link()
            .add(builder.mtu(port.mtu).controller(bridge_index).build())
            .execute()
            .await
            .with_context(|| format!("creating the VXLAN port {name} (VNI {})", port.vni))?;
        Ok(())
    }

    /// Sets a port up (its tunnel is alive) or down (its tunnel is gone:
    /// the bridge stops using it at once).
    pub async fn set_port_up(&self, name: &str, up: bool) -> Result<()> {
        let index = crate::link_index(self.handle, name).await?;
        let message = LinkUnspec::new_with_index(index);
        let message = if up { message.up() } else { message.down() };
        self.handle
            .link()
            .set(message.build())
            .execute()
            .await
            .with_context(|| format!("setting {name} {}", if up { "up" } else { "down" }))
    }

    /// Forgets the MAC addresses the bridge learned on port `name` (a
    /// topology change: they may be elsewhere now).
    pub async fn flush_port(&self, name: &str) -> Result<()> {
        let index = crate::link_index(self.handle, name).await?;
        self.handle
            .link()
            .set_port(LinkBridgePort::new(index).fdb_flush().build())
            .execute()
            .await
            .with_context(|| format!("flushing what {name} learned"))
    }

    /// Removes the bridge `name` if it is ours (its alias says so); one
    /// that is gone, or someone else's, is left as it is.
    pub async fn remove_bridge(&self, name: &str) -> Result<()> {
        let Some(link) = existing(self.handle, name).await? else {
            return Ok(());
        };
        if link.alias.as_deref() != Some(OWNER_ALIAS) {
            return Ok(());
        }
        crate::delete_link(self.handle, link.index, name).await
    }

    /// Removes the link `name`; one that is gone already is fine.
    pub async fn remove(&self, name: &str) -> Result<()> {
        let Some(link) = existing(self.handle, name).await? else {
            return Ok(());
        };
        crate::delete_link(self.handle, link.index, name).await
    }

    /// Routes the tunnel's remote end `remote` out of `via` with route MTU
    /// `mtu` in [`OVERLAY_TABLE`] (replacing a route there was; see
    /// [`OverlayLinks::set_rules`]), so the kernel's VXLAN takes a
    /// full overlay frame with DF set inside: it checks frames against the
    /// route to the remote, and a route at the tunnel's own MTU makes it
    /// answer "fragmentation needed" instead. The outer packet then goes
    /// whole into the tunnel, and the tunnel's datagrams are fragmented on
    /// the underlay.
    pub async fn route_remote(&self, remote: IpAddr, via: &str, mtu: u32) -> Result<()> {
        let mut message = remote_route(self.handle, remote, via).await?;
        message
            .attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
        self.handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .with_context(|| format!("routing {remote} out of {via} with MTU {mtu}"))
    }

    /// Removes [`OverlayLinks::route_remote`]'s route; one that is gone is fine.
    pub async fn unroute_remote(&self, remote: IpAddr, via: &str) -> Result<()> {
        let Ok(message) = remote_route(self.handle, remote, via).await else {
            return Ok(());
        };
        match self.handle.route().del(message).execute().await {
            Ok(()) => Ok(()),
            // ESRCH: no such route.
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -3 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing the route to {remote}")),
        }
    }

    /// Makes the rule that sends VXLAN's packets to [`OVERLAY_TABLE`]
    /// exist (`present`) or not, for both families.
    pub async fn set_rules(&self, present: bool) -> Result<()> {
        for version in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
            let rules: Vec<RuleMessage> = self
                .handle
                .rule()
                .get(version.clone())
                .execute()
                .try_collect()
                .await
                .context("listing rules")?;
            let ours = rules.into_iter().find(|r| {
                r.attributes
                    .contains(&RuleAttribute::Priority(RULE_PRIORITY))
            });
            match (ours, present) {
                (Some(rule), false) => {
                    self.handle
                        .rule()
                        .del(rule)
                        .execute()
                        .await
                        .context("removing the overlay's rule")?;
                }
                (None, true) => {
                    let mut request = self
                        .handle
                        .rule()
                        .add()
                        .priority(RULE_PRIORITY)
                        .action(RuleAction::ToTable)
                        .table_id(OVERLAY_TABLE);
                    let message = request.message_mut();
                    message.header.family = match version {
                        rtnetlink::IpVersion::V4 => AddressFamily::Inet,
                        rtnetlink::IpVersion::V6 => AddressFamily::Inet6,
                    };
                    message
                        .attributes
                        .push(RuleAttribute::IpProtocol(IpProtocol::Udp));
                    message
                        .attributes
                        .push(RuleAttribute::DestinationPortRange(RulePortRange {
                            start: VXLAN_PORT,
                            end: VXLAN_PORT,
                        }));
                    request
                        .execute()
                        .await
                        .context("adding the overlay's rule (UDP 4789 to table 4789)")?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The VXLAN ports attached to `bridge`, by name.
    pub async fn vxlan_ports(&self, bridge: &str) -> Result<Vec<String>> {
        let bridge_index = crate::link_index(self.handle, bridge).await?;
        let mut links = self.handle.link().get().execute();
        let mut names = Vec::new();
        while let Some(link) = links.try_next().await.context("listing links")? {
            let mut name = None;
            let (mut attached, mut vxlan) = (false, false);
            for attribute in &link.attributes {
                match attribute {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::Controller(c) => attached = *c == bridge_index,
                    LinkAttribute::LinkInfo(infos) => {
                        vxlan = infos
                            .iter()
                            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)));
                    }
                    _ => {}
                }
            }
            if let (Some(name), true, true) = (name, attached, vxlan) {
                names.push(name);
            }
        }
        Ok(names)
    }
}

/// The host route to `remote` out of `via`, protocol [`OVERLAY_PROTOCOL`],
/// table [`OVERLAY_TABLE`].
async fn remote_route(handle: &Handle, remote: IpAddr, via: &str) -> Result<RouteMessage> {
    let index = crate::link_index(handle, via).await?;
    let mut message = match remote {
        IpAddr::V4(v4) => RouteMessageBuilder::<std::net::Ipv4Addr>::new()
            .destination_prefix(v4, 32)
            .output_interface(index)
            .protocol(OVERLAY_PROTOCOL)
            .scope(RouteScope::Link)
            .build(),
        IpAddr::V6(v6) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
            .destination_prefix(v6, 128)
            .output_interface(index)
            .protocol(OVERLAY_PROTOCOL)
            .scope(RouteScope::Link)
            .build(),
    };
    // Above 255: RT_TABLE_UNSPEC in the header, the table in the attribute.
    message.header.table = 0;
    message
        .attributes
        .push(RouteAttribute::Table(OVERLAY_TABLE));
    Ok(message)
}

fn stp_state(on: bool) -> rtnetlink::packet_route::link::BridgeStpState {
    if on {
        rtnetlink::packet_route::link::BridgeStpState::KernelStp
    } else {
        rtnetlink::packet_route::link::BridgeStpState::Disabled
    }
}

/// Whether the kernel's VXLAN attributes are those of `port`.
fn vxlan_matches(attributes: &[InfoVxlan], port: &VxlanPort) -> bool {
    let mut vni = None;
    let mut udp = None;
    let mut local = None;
    let mut remote = None;
    for a in attributes {
        match a {
            InfoVxlan::Id(v) => vni = Some(*v),
            InfoVxlan::Port(p) => udp = Some(*p),
            InfoVxlan::Local(l) => local = Some(IpAddr::V4(*l)),
            InfoVxlan::Local6(l) => local = Some(IpAddr::V6(*l)),
            InfoVxlan::Group(r) => remote = Some(IpAddr::V4(*r)),
            InfoVxlan::Group6(r) => remote = Some(IpAddr::V6(*r)),
            _ => {}
        }
    }
    vni == Some(port.vni)
        && udp == Some(VXLAN_PORT)
        && local == Some(port.local)
        && remote == Some(port.remote)
}

/// The nftables table that holds `bridge`'s port states.
pub fn states_table(bridge: &str) -> Result<String> {
    if bridge.is_empty()
        || bridge.len() > 15
        || !bridge
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!("{bridge:?} is not a bridge name");
    }
    let safe: String = bridge
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    Ok(format!("bgp4mesh_stp_{safe}"))
}

/// The prefix of the overlay's VXLAN ports' names: a bridge port so named
/// discards unless [`PortStates`] says otherwise, from the moment it is
/// attached (one overlay per machine; no other port is named so).
pub const PORT_PREFIX: &str = "b4vx-";

/// The port states our spanning tree computed, as [`port_states_script`]
/// applies them. Every port of the bridge named [`PORT_PREFIX`]… that is
/// named in neither list discards (takes and sends nothing, so it learns
/// nothing); other ports of the bridge are left alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PortStates {
    /// Ports that learn from what they take and send.
    pub forwarding: Vec<String>,
    /// Ports that learn from what they take and forward nothing.
    pub learning: Vec<String>,
    /// How long the forwarding and learning states hold without being set
    /// again: a driver that stops (hung, killed) leaves every port
    /// discarding after this, so a stale tree never forwards into a loop
    /// (its neighbours forward towards it only after their forward delay).
    pub hold: std::time::Duration,
}

/// The `nft -f` script that makes `bridge`'s port states `states` (see
/// [`PortStates`]), in one transaction. BPDUs are never forwarded nor
/// learned from (our protocol reads them before the bridge does). `None`
/// removes the table (the kernel's STP, or none).
pub fn port_states_script(bridge: &str, states: Option<&PortStates>) -> Result<String> {
    let table = states_table(bridge)?;
    let mut script = format!("table bridge {table}\ndelete table bridge {table}\n");
    let Some(states) = states else {
        return Ok(script);
    };
    let hold = states.hold.as_millis().max(1);
    let set = |name: &str, ports: &[String]| -> Result<String> {
        for p in ports {
            states_table(p).with_context(|| format!("port {p:?}"))?;
        }
        let elements = ports
            .iter()
            .map(|p| format!("\"{p}\" timeout {hold}ms"))
            .collect::<Vec<_>>()
            .join(", ");
        Ok(if ports.is_empty() {
            format!("\tset {name} {{ type ifname; flags timeout; }}\n")
        } else {
            format!("\tset {name} {{ type ifname; flags timeout; elements = {{ {elements} }}; }}\n")
        })
    };
    // By name, not by bridge (`meta ibrname` needs a module kernels may
    // lack): the prefix is the overlay's own.
    let ours_in = format!("iifname \"{PORT_PREFIX}*\"");
    let ours_out = format!("oifname \"{PORT_PREFIX}*\"");
    script.push_str(&format!("table bridge {table} {{\n"));
    script.push_str(&set("forwarding", &states.forwarding)?);
    script.push_str(&set("learning", &states.learning)?);
    script.push_str(&format!(
        "\tchain prerouting {{ type filter hook prerouting priority -300; policy accept; \
         {ours_in} ether daddr 01:80:c2:00:00:00 drop; \
         {ours_in} iifname != @forwarding iifname != @learning drop; }}\n\
         \tchain forward {{ type filter hook forward priority -300; policy accept; \
         ether daddr 01:80:c2:00:00:00 {ours_out} drop; \
         {ours_in} iifname != @forwarding drop; }}\n\
         \tchain input {{ type filter hook input priority -300; policy accept; \
         {ours_in} iifname != @forwarding drop; }}\n\
         \tchain postrouting {{ type filter hook postrouting priority -300; policy accept; \
         {ours_out} oifname != @forwarding drop; }}\n\
         }}\n",
    ));
    Ok(script)
}

/// Applies [`port_states_script`] in one `nft -f` transaction.
pub fn set_port_states(bridge: &str, states: Option<&PortStates>) -> Result<()> {
    let script = port_states_script(bridge, states)?;
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed?)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .context("writing to nft")?;
    }
    let out = child.wait_with_output().context("waiting for nft")?;
    if !out.status.success() {
        bail!(
            "nft refused {bridge}'s port states: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_states_script_names_each_port_once() {
        let states = PortStates {
            forwarding: vec!["b4vx-rho".to_string()],
            learning: Vec::new(),
            hold: std::time::Duration::from_secs(5),
        };
        let script = port_states_script("br-l2", Some(&states)).unwrap();
        assert!(script.starts_with(
            "table bridge bgp4mesh_stp_br_l2\ndelete table bridge bgp4mesh_stp_br_l2\n"
        ));
        assert!(script.contains(
            "set forwarding { type ifname; flags timeout; elements = { \"b4vx-rho\" timeout 5000ms }; }"
        ));
        assert!(script.contains("set learning { type ifname; flags timeout; }"));
        assert!(script.contains("iifname \"b4vx-*\" ether daddr 01:80:c2:00:00:00 drop"));
        assert!(script.contains("oifname \"b4vx-*\" oifname != @forwarding drop"));
        let removed = port_states_script("br-l2", None).unwrap();
        assert_eq!(
            removed,
            "table bridge bgp4mesh_stp_br_l2\ndelete table bridge bgp4mesh_stp_br_l2\n"
        );
    }

    #[test]
    fn names_that_could_break_the_script_are_refused() {
        assert!(port_states_script("br\"0", None).is_err());
        assert!(port_states_script("", None).is_err());
        let evil = PortStates {
            forwarding: vec!["a\" }; flush ruleset; #".to_string()],
            ..PortStates::default()
        };
        assert!(port_states_script("br0", Some(&evil)).is_err());
    }
}
