//! The speaker's configuration: neighbours, static routes, limits.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::policy::Policy;
use crate::rib::Selection;
use crate::session::SessionConfig;
use crate::wire::Family;

/// What to do when a neighbour sends more prefixes than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxPrefixAction {
    /// Log a warning, keep the session.
    Warn,
    /// Close with Cease / Maximum Number of Prefixes, reconnect after this.
    Restart(Duration),
    /// Close and stay down until enabled again.
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPrefixes {
    pub limit: usize,
    pub action: MaxPrefixAction,
}

#[derive(Debug, Clone)]
pub struct NeighborConfig {
    /// Shown in `show protocols`; unique.
    pub name: String,
    pub address: IpAddr,
    pub remote_as: u32,
    pub local_address: Option<IpAddr>,
    pub passive: bool,
    pub hold_time: u16,
    pub connect_retry: Duration,
    pub idle_hold: Duration,
    pub idle_hold_max: Duration,
    pub import: Arc<Policy>,
    pub export: Arc<Policy>,
    pub next_hop_self: bool,
    pub route_reflector_client: bool,
    pub families: Vec<Family>,
    pub max_prefixes: Option<MaxPrefixes>,
    pub extended_next_hop: bool,
    pub extended_message: bool,
    /// Next hops to announce when the session's own address is of the
    /// other family (IPv6 routes over an IPv4 session, say).
    pub next_hop_ipv4: Option<Ipv4Addr>,
    pub next_hop_ipv6: Option<Ipv6Addr>,
    /// Keep what the neighbour sent before import policy, so a policy change
    /// is applied without asking it to resend.
    pub soft_reconfiguration_inbound: bool,
    pub enabled: bool,
    /// Graceful restart helper (RFC 4724): keep a neighbour's routes while
    /// it restarts, if it asks for that.
    pub graceful_restart: bool,
    /// Restart time we advertise, seconds.
    pub restart_time: u16,
}

impl NeighborConfig {
    /// A neighbour with operator-friendly defaults and the given policies.
    pub fn new(
        name: &str,
        address: IpAddr,
        remote_as: u32,
        import: Arc<Policy>,
        export: Arc<Policy>,
    ) -> Self {
        NeighborConfig {
            name: name.to_string(),
            address,
            remote_as,
            local_address: None,
            passive: false,
            hold_time: 90,
            connect_retry: Duration::from_secs(10),
            idle_hold: Duration::from_secs(5),
            idle_hold_max: Duration::from_secs(120),
            import,
            export,
            next_hop_self: false,
            route_reflector_client: false,
            families: vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST],
            max_prefixes: None,
            extended_next_hop: false,
            extended_message: true,
            next_hop_ipv4: None,
            next_hop_ipv6: None,
            soft_reconfiguration_inbound: false,
            enabled: true,
            graceful_restart: false,
            restart_time: 120,
        }
    }

    pub(super) fn session_config(&self, asn: u32, router_id: Ipv4Addr) -> SessionConfig {
        SessionConfig {
            local_as: asn,
            remote_as: self.remote_as,
            router_id,
            hold_time: self.hold_time,
            passive: self.passive,
            connect_retry: self.connect_retry,
            idle_hold: self.idle_hold,
            idle_hold_max: self.idle_hold_max,
            families: self.families.clone(),
            extended_message: self.extended_message,
            extended_next_hop: self.extended_next_hop,
            graceful_restart: self.graceful_restart.then_some(self.restart_time),
            restarting: false,
        }
    }
}

/// Where a static route sends traffic (for the kernel; BGP announces it
/// with our own next hop whatever the kind).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StaticKind {
    Blackhole,
    Unreachable,
    Via(IpAddr),
    Device(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StaticRoute {
    pub prefix: IpNet,
    pub kind: StaticKind,
}

#[derive(Debug, Clone)]
pub struct SpeakerConfig {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    /// Route reflector cluster id (RFC 4456); the router id when unset.
    pub cluster_id: Option<Ipv4Addr>,
    pub selection: Selection,
    pub neighbors: Vec<NeighborConfig>,
    pub statics: Vec<StaticRoute>,
}
