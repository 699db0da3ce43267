//! What the BGP task tells the kernel and asks it: best-route changes
//! into the [`RouteSink`] (the `kernel_sync` task), and lookups through
//! the read-only [`Resolver`] (next hops, our interfaces' networks, the
//! routes learnt with `[kernel] learn`), whose answers come back through
//! the inbox.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

use bgp4mesh_bgp::rib::{NeighborId, PathSource};
use bgp4mesh_bgp::speaker::{NextHopState, RouteChange, Speaker, StaticKind};
use bgp4mesh_kernel::{Resolution, Resolver, Target};

use super::{Inbound, Inbox};
use crate::config::Transport;
use crate::kernel_sync::{InKernel, KernelCommand};

/// Where best-route changes go: the kernel, as a prefix and what it
/// should do (None: remove).
pub type RouteSink = Box<dyn FnMut(KernelCommand) + Send>;

/// The route sink and the kernel lookups.
pub(super) struct KernelLink {
    inbox: Inbox,
    sink: Option<RouteSink>,
    /// Whether static routes go into the kernel too.
    install_static: bool,
    /// What the kernel module says it installed.
    in_kernel: Option<InKernel>,
    resolver: Option<Resolver>,
    /// Next hops the speaker watches, with their last resolution.
    next_hops: HashMap<IpAddr, Option<Resolution>>,
    /// The table whose foreign routes we learn, when `[kernel] learn`.
    learn_table: Option<u32>,
}

impl KernelLink {
    pub(super) fn new(inbox: &Inbox) -> KernelLink {
        KernelLink {
            inbox: inbox.clone(),
            sink: None,
            install_static: false,
            in_kernel: None,
            resolver: match Resolver::connect() {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!("next hops cannot be resolved (all taken as reachable): {e:#}");
                    None
                }
            },
            next_hops: HashMap::new(),
            learn_table: None,
        }
    }

    pub(super) fn set_sink(
        &mut self,
        sink: RouteSink,
        install_static: bool,
        in_kernel: Option<InKernel>,
    ) {
        self.sink = Some(sink);
        self.install_static = install_static;
        self.in_kernel = in_kernel;
    }

    pub(super) fn in_kernel(&self) -> Option<&InKernel> {
        self.in_kernel.as_ref()
    }

    pub(super) fn set_learn_table(&mut self, table: u32) {
        self.learn_table = Some(table);
    }

    fn command(&mut self, command: KernelCommand) {
        if let Some(sink) = self.sink.as_mut() {
            sink(command);
        }
    }

    /// A best-route change, as the kernel should have it.
    pub(super) fn route_changed(
        &mut self,
        speaker: &Speaker,
        change: &RouteChange,
        transports: &HashMap<String, Transport>,
    ) {
        let target = kernel_target(
            speaker,
            change,
            self.install_static,
            &self.next_hops,
            transports,
        );
        self.command(KernelCommand::Route(change.prefix, target));
    }

    /// Our graceful restart is over: the kernel drops what the previous
    /// run left and was not installed again.
    pub(super) fn flush_stale(&mut self) {
        self.command(KernelCommand::FlushStale);
    }

    /// The neighbour sent End-of-RIB: once the kernel has everything sent
    /// before it, the speaker hears so (at once without a kernel).
    pub(super) fn end_of_rib(&mut self, speaker: &mut Speaker, neighbor: NeighborId) {
        match self.sink.as_mut() {
            Some(sink) => {
                let (done, applied) = tokio::sync::oneshot::channel();
                sink(KernelCommand::Barrier(done));
                let tx = self.inbox.clone();
                tokio::spawn(async move {
                    if applied.await.is_ok() {
                        let _ = tx.send(Inbound::InKernelUpTo { neighbor });
                    }
                });
            }
            None => speaker.end_of_rib_installed(neighbor),
        }
    }

    /// The speaker wants this next hop resolved, now and on every rescan.
    pub(super) fn watch(&mut self, addr: IpAddr) {
        self.next_hops.insert(addr, None);
        self.resolve(vec![addr]);
    }

    pub(super) fn unwatch(&mut self, addr: IpAddr) {
        self.next_hops.remove(&addr);
    }

    /// Looks next hops up in the background; answers come as Resolved.
    fn resolve(&self, addrs: Vec<IpAddr>) {
        let Some(resolver) = self.resolver.clone() else {
            return;
        };
        if addrs.is_empty() {
            return;
        }
        let tx = self.inbox.clone();
        tokio::spawn(async move {
            for addr in addrs {
                let resolution = resolver.resolve(addr).await;
                if tx.send(Inbound::Resolved { addr, resolution }).is_err() {
                    return;
                }
            }
        });
    }

    /// A lookup's answer: the speaker hears of a change, and routes
    /// through a next hop whose immediate gateway moved are installed
    /// again.
    pub(super) fn resolved(
        &mut self,
        speaker: &mut Speaker,
        now: Instant,
        addr: IpAddr,
        resolution: Resolution,
        transports: &HashMap<String, Transport>,
    ) {
        let Some(last) = self.next_hops.get_mut(&addr) else {
            return;
        };
        if *last == Some(resolution) {
            return;
        }
        let old_gateway = last.and_then(|l| l.gateway);
        *last = Some(resolution);
        speaker.set_next_hop(
            now,
            addr,
            NextHopState {
                reachable: resolution.reachable,
                cost: resolution.metric,
            },
        );
        if old_gateway != resolution.gateway {
            // Routes through this next hop go in the kernel via the new
            // immediate gateway, though BGP's choice did not change.
            for prefix in speaker.prefixes_via(addr) {
                let Some(entry) = speaker.rib().get(&prefix) else {
                    continue;
                };
                let change = RouteChange {
                    prefix,
                    best: entry.best().cloned(),
                    multipath: entry.multipath().to_vec(),
                };
                self.route_changed(speaker, &change, transports);
            }
        }
    }

    /// Looks every watched next hop up again, the networks of our
    /// interfaces in `connected` (those to originate), and the routes we
    /// learn from the kernel.
    pub(super) fn rescan(&self, connected: &[String]) {
        let all: Vec<IpAddr> = self.next_hops.keys().copied().collect();
        self.resolve(all);
        self.scan_interfaces(connected);
        if let (Some(table), Some(resolver)) = (self.learn_table, self.resolver.clone()) {
            let tx = self.inbox.clone();
            tokio::spawn(async move {
                match resolver.learn_routes(table).await {
                    Ok(routes) => {
                        let _ = tx.send(Inbound::KernelRoutes { routes });
                    }
                    Err(e) => tracing::warn!("cannot learn kernel routes: {e:#}"),
                }
            });
        }
    }

    /// Reads our interfaces' networks in the background, when configured
    /// to originate them (`bgp.connected`).
    fn scan_interfaces(&self, connected: &[String]) {
        let (Some(resolver), false) = (self.resolver.clone(), connected.is_empty()) else {
            return;
        };
        let wanted = connected.to_vec();
        let tx = self.inbox.clone();
        tokio::spawn(async move {
            match resolver.connected(&wanted).await {
                Ok(list) => {
                    let prefixes = list.into_iter().map(|(p, _)| p).collect();
                    let _ = tx.send(Inbound::Interfaces { prefixes });
                }
                Err(e) => tracing::warn!("cannot read interface addresses: {e:#}"),
            }
        });
    }
}

/// What the kernel should do for a prefix after a best-path change.
fn kernel_target(
    speaker: &Speaker,
    change: &RouteChange,
    install_static: bool,
    next_hops: &HashMap<IpAddr, Option<Resolution>>,
    transports: &HashMap<String, Transport>,
) -> Option<Target> {
    let interface_of = |id: NeighborId| {
        transports
            .get(speaker.neighbor_name(id))
            .and_then(|t| t.interface.as_deref())
    };
    let best = change.best.as_ref()?;
    match best.source {
        PathSource::Connected | PathSource::Kernel => None,
        PathSource::Static(id) if install_static => Some(match &speaker.static_route(id)?.kind {
            StaticKind::Blackhole => Target::Blackhole,
            StaticKind::Unreachable => Target::Unreachable,
            StaticKind::Via(gateway) => Target::Via(vec![*gateway]),
            StaticKind::Device(name) => Target::Device(name.clone()),
        }),
        PathSource::Static(_) => None,
        PathSource::Neighbor(_) => {
            let mut gateways: Vec<IpAddr> = Vec::new();
            // Link-local gateways, with the interface of the session
            // they came over (the first such interface: ECMP over
            // link-local gateways stays on one interface).
            let mut on_link: Option<(&str, Vec<IpAddr>)> = None;
            for path in &change.multipath {
                let Some(next_hop) = path.attrs.next_hop.as_ref() else {
                    continue;
                };
                let address = bgp4mesh_bgp::rib::next_hop_address(next_hop);
                // A next hop that is not on a connected network is reached
                // through the gateway the kernel resolved it to.
                let hop = match next_hops
                    .get(&address)
                    .copied()
                    .flatten()
                    .and_then(|r| r.gateway)
                {
                    Some(gateway) => gateway,
                    None => match next_hop {
                        bgp4mesh_bgp::wire::NextHop::V4(a) => IpAddr::V4(*a),
                        // Over a link-local session the global field may
                        // be empty or link-local itself.
                        bgp4mesh_bgp::wire::NextHop::V6 {
                            global,
                            link_local: Some(ll),
                        } if global.is_unspecified() || global.is_unicast_link_local() => {
                            IpAddr::V6(*ll)
                        }
                        bgp4mesh_bgp::wire::NextHop::V6 { global, .. } => IpAddr::V6(*global),
                    },
                };
                if crate::config::is_link_local(hop) {
                    let PathSource::Neighbor(id) = path.source else {
                        continue;
                    };
                    let Some(interface) = interface_of(id) else {
                        // Not a link-local session: no way to tell the
                        // interface, and the kernel would refuse it.
                        continue;
                    };
                    match &mut on_link {
                        None => on_link = Some((interface, vec![hop])),
                        Some((name, hops)) if *name == interface && !hops.contains(&hop) => {
                            hops.push(hop)
                        }
                        Some(_) => {}
                    }
                    continue;
                }
                if !gateways.contains(&hop) {
                    gateways.push(hop);
                }
            }
            if !gateways.is_empty() {
                return Some(Target::Via(gateways));
            }
            on_link.map(|(interface, hops)| Target::ViaOn(hops, interface.to_string()))
        }
    }
}

impl super::BgpDriver {
    /// Gives each neighbour with `next_hop_ipv6 = "auto"` (IPv6 routes
    /// over an IPv4 session) the global IPv6 address of the interface
    /// towards it, and says so; an error naming the neighbour when there
    /// is none. Before the speaker takes the config: at start and on
    /// reload.
    pub async fn resolve_next_hop_ipv6(bgp: &mut crate::config::BgpConfig) -> anyhow::Result<()> {
        resolve_next_hop_ipv6(bgp).await
    }
}

pub(super) async fn resolve_next_hop_ipv6(
    bgp: &mut crate::config::BgpConfig,
) -> anyhow::Result<()> {
    use anyhow::Context;
    if bgp.next_hop_ipv6_auto.is_empty() {
        return Ok(());
    }
    let resolver = Resolver::connect()?;
    let auto = &bgp.next_hop_ipv6_auto;
    for n in bgp
        .speaker
        .neighbors
        .iter_mut()
        .filter(|n| auto.contains(&n.name))
    {
        let towards = match n.local_address {
            Some(local) => format!("the interface of local_address {local}"),
            None => format!("the interface towards {}", n.address),
        };
        let (interface, address) = resolver
            .ipv6_address_towards(n.address, n.local_address)
            .await
            .with_context(|| {
                format!(
                    "neighbour {:?}: next_hop_ipv6 = \"auto\" looks at {towards}",
                    n.name
                )
            })?;
        let Some(address) = address else {
            anyhow::bail!(
                "neighbour {:?}: next_hop_ipv6 = \"auto\": {interface} ({towards}) has no global IPv6 address to announce IPv6 routes with; add one there, or set next_hop_ipv6 to an IPv6 address of this router",
                n.name
            );
        };
        tracing::info!(
            "neighbour {}: IPv6 next hop {address}, from {interface} ({towards}; next_hop_ipv6 = \"auto\")",
            n.name
        );
        n.next_hop_ipv6 = Some(address);
    }
    Ok(())
}
