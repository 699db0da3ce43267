//! The BGP speaker: every neighbour's session, import and export through
//! policy, the Loc-RIB, and Adj-RIB-Out per neighbour, as one sans-IO
//! state machine.
//!
//! The driver calls the `tcp_*`, `received` and `handle_timeout` methods
//! with the current time and carries out the [`Event`]s from
//! [`Speaker::poll_event`]. Routes for the kernel come out as
//! [`Event::Route`].

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::{HashMap, HashSet};
use ipnet::IpNet;

use crate::policy::{Outcome, Policy, RouteContext, RouteSource};
use crate::rib::{
    Attrs, BestChange, Interner, LocRib, NeighborId, Path, PathSource, Selection, Slot, SourceInfo,
    next_hop_address,
};
use crate::session::{ConnId, Negotiated, Output, Session, SessionConfig, State};
use crate::wire::{
    AFI_IPV4, Codec, Community, Decoded, DecodedUpdate, Family, Message, NextHop, Notification,
    Origin, PathAttributes, RefreshSubtype, RouteRefresh, UpdateBuilder, cease, error_code,
};

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

    fn session_config(&self, asn: u32, router_id: Ipv4Addr) -> SessionConfig {
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
}

/// A route the kernel should have (or no longer have).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteChange {
    pub prefix: IpNet,
    /// None: withdrawn.
    pub best: Option<Path>,
    /// The ECMP set, best first.
    pub multipath: Vec<Path>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Open a TCP connection to the neighbour's address.
    Connect {
        neighbor: NeighborId,
    },
    Send {
        neighbor: NeighborId,
        conn: ConnId,
        bytes: Vec<u8>,
    },
    Close {
        neighbor: NeighborId,
        conn: ConnId,
    },
    Route(RouteChange),
    /// Start resolving this next hop and report with
    /// [`Speaker::set_next_hop`] (again whenever it changes).
    WatchNextHop(IpAddr),
    /// No path uses this next hop any more.
    UnwatchNextHop(IpAddr),
    /// The neighbour finished its initial (or refreshed) announcements of
    /// this family. Once the route changes before it are installed, the
    /// driver calls [`Speaker::end_of_rib_installed`].
    EndOfRib {
        neighbor: NeighborId,
        family: Family,
    },
    Log {
        neighbor: Option<NeighborId>,
        level: Level,
        message: String,
    },
    /// Our own graceful restart ([`Speaker::begin_graceful_restart`]) is
    /// over: forwarding state kept from before the restart and not learnt
    /// again is stale, and should be removed.
    GracefulRestartOver(RestartEnd),
    /// Whether some eBGP neighbour is Established and what it sent up to
    /// its End-of-RIB is installed ([`Speaker::end_of_rib_installed`]): a
    /// border can then route to the outside. Emitted on every change.
    UpstreamReady(bool),
}

/// Why our graceful restart ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartEnd {
    /// Every graceful-restart neighbour sent End-of-RIB for each of its
    /// families.
    EveryEndOfRib,
    /// The longest restart time of those neighbours passed first.
    RestartTimePassed,
}

impl std::fmt::Display for RestartEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RestartEnd::EveryEndOfRib => "every neighbour sent End-of-RIB",
            RestartEnd::RestartTimePassed => "restart time passed",
        })
    }
}

/// Our own graceful restart (RFC 4724, the restarting side) in progress.
#[derive(Debug)]
struct OwnRestart {
    /// The (neighbour name, family) End-of-RIBs still awaited.
    waiting: HashSet<(String, Family)>,
    /// When we stop waiting.
    deadline: Instant,
}

/// Heap bytes by structure ([`Speaker::memory`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryReport {
    pub prefixes: usize,
    /// Slots: prefix, paths, best and ECMP count.
    pub loc_rib: usize,
    /// The hash index of slots.
    pub loc_rib_index: usize,
    /// Pre-policy copies (soft reconfiguration inbound only).
    pub adj_rib_in: usize,
    /// Announced bits, pending changes and the export caches.
    pub adj_rib_out: usize,
    pub attribute_sets: usize,
    /// The interned attribute sets.
    pub attributes: usize,
}

/// Message counters of one neighbour, like birdc's route change stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub updates_received: u64,
    pub withdraws_received: u64,
    pub filtered_in: u64,
    pub updates_sent: u64,
    pub withdraws_sent: u64,
    pub established_transitions: u64,
}

#[derive(Debug)]
struct Neighbor {
    config: NeighborConfig,
    session: Session,
    conn_local: HashMap<ConnId, IpAddr>,
    local_address: Option<IpAddr>,
    negotiated: Option<Negotiated>,
    /// Pre-policy routes (soft reconfiguration inbound only).
    adj_in: HashMap<IpNet, Attrs>,
    /// `adj_in` holds everything the neighbour sent since it came up
    /// (false when soft reconfiguration was turned on mid-session).
    adj_in_complete: bool,
    /// How many prefixes this neighbour has a path for in the Loc-RIB.
    imported: usize,
    /// Adj-RIB-Out as one bit per Loc-RIB slot: announced or not. What
    /// was announced is the export of the slot's best path, computed again
    /// when needed (BIRD keeps no Adj-RIB-Out either), so a full table
    /// costs 1 bit a prefix per neighbour instead of a pointer and an
    /// attribute set per distinct path.
    announced: Vec<u64>,
    /// How many slots are announced.
    exported: usize,
    /// Slots whose best path changed since the last UPDATE was encoded,
    /// each once (`pending_mark`).
    pending: Vec<Slot>,
    pending_mark: Vec<u64>,
    /// Export results by (source attributes, source, family) while the
    /// export policy does not look at prefixes: one policy run per
    /// attribute set and batch, not per prefix. Holds the source `Attrs`
    /// so the address stays theirs; emptied when it grows past
    /// `EXPORT_CACHE_MAX`.
    export_cache: HashMap<(usize, PathSource, Family), (Attrs, Option<Attrs>)>,
    /// End-of-RIB markers to send after the pending updates.
    eor_pending: Vec<Family>,
    /// End-of-Route-Refresh markers (RFC 7313) to send after the pending
    /// updates: the neighbour drops what it was not sent again before one.
    eorr_pending: Vec<Family>,
    /// UPDATE bytes handed to the driver and not yet reported written
    /// ([`Speaker::written`]); with a send window, flushing stops at it.
    in_flight: usize,
    /// Enhanced route refresh from the neighbour in progress.
    refresh_stale: HashMap<Family, HashSet<IpNet>>,
    /// Routes kept while the neighbour restarts (RFC 4724), by family.
    gr_stale: HashMap<Family, HashSet<IpNet>>,
    /// When the kept routes go if the neighbour is not back.
    gr_deadline: Option<Instant>,
    counters: Counters,
    max_prefix_warned: bool,
    next_hop_warned: bool,
    /// An End-of-RIB came in this session and the driver has not yet said
    /// that what came before it is installed.
    eor_installing: bool,
    /// What the neighbour sent up to an End-of-RIB of this session is
    /// installed ([`Speaker::end_of_rib_installed`]).
    eor_installed: bool,
    /// Whether this slot still holds a configured neighbour.
    removed: bool,
}

/// The neighbours, by [`NeighborId`]. A removed neighbour keeps its place
/// (marked `removed`), so ids stay valid.
#[derive(Debug, Default)]
struct Neighbors(Vec<Neighbor>);

impl Neighbors {
    fn get(&self, id: NeighborId) -> Option<&Neighbor> {
        self.0.get(id.index())
    }

    fn get_mut(&mut self, id: NeighborId) -> Option<&mut Neighbor> {
        self.0.get_mut(id.index())
    }

    /// Every neighbour's id, removed ones' too; borrows nothing, so the
    /// loop may change the neighbours.
    fn ids(&self) -> impl Iterator<Item = NeighborId> + use<> {
        (0..self.0.len()).map(NeighborId::from_index)
    }

    fn iter(&self) -> std::slice::Iter<'_, Neighbor> {
        self.0.iter()
    }

    fn iter_mut(&mut self) -> std::slice::IterMut<'_, Neighbor> {
        self.0.iter_mut()
    }

    /// Adds a neighbour; returns its id.
    fn push(&mut self, neighbor: Neighbor) -> NeighborId {
        self.0.push(neighbor);
        NeighborId::from_index(self.0.len() - 1)
    }
}

impl std::ops::Index<NeighborId> for Neighbors {
    type Output = Neighbor;

    fn index(&self, id: NeighborId) -> &Neighbor {
        &self.0[id.index()]
    }
}

impl std::ops::IndexMut<NeighborId> for Neighbors {
    fn index_mut(&mut self, id: NeighborId) -> &mut Neighbor {
        &mut self.0[id.index()]
    }
}

/// A read-only view of a neighbour for `show protocols`.
#[derive(Debug, Clone)]
pub struct NeighborStatus<'a> {
    pub id: NeighborId,
    pub config: &'a NeighborConfig,
    pub state: State,
    pub since: Instant,
    pub last_error: Option<&'a str>,
    pub negotiated: Option<&'a Negotiated>,
    pub local_address: Option<IpAddr>,
    pub routes_imported: usize,
    pub routes_exported: usize,
    pub counters: Counters,
}

pub struct Speaker {
    config: SpeakerConfig,
    neighbors: Neighbors,
    /// Static routes by their PathSource::Static id; None once removed.
    statics: Vec<Option<StaticRoute>>,
    rib: LocRib,
    interner: Interner,
    started: bool,
    events: VecDeque<Event>,
    next_hops: HashMap<IpAddr, WatchedNextHop>,
    /// Networks of our interfaces we originate.
    connected: HashSet<IpNet>,
    /// Routes learnt from the kernel, with their gateway.
    kernel_routes: HashMap<IpNet, Option<IpAddr>>,
    /// Interned attribute sets above which unused ones are dropped.
    gc_at: usize,
    /// Whether best-route changes come out as [`Event::Route`].
    route_events: bool,
    /// Static routes wait for [`Speaker::release_origination`].
    hold_statics: bool,
    /// UPDATE bytes a neighbour may have unwritten before the rest waits
    /// as pending slots (None: no limit).
    send_window: Option<usize>,
    /// Emptied Loc-RIB slots at which those not held back are released
    /// while some are (see `flush`).
    release_at: usize,
    /// Our own graceful restart, while it lasts.
    own_restart: Option<OwnRestart>,
    /// The last [`Event::UpstreamReady`] value.
    upstream_ready: bool,
}

/// Cached exports per neighbour before the cache is emptied: enough for
/// the attribute sets of one batch of UPDATEs.
const EXPORT_CACHE_MAX: usize = 16 * 1024;

/// Pending changes encoded at a time.
const FLUSH_BATCH: usize = 16 * 1024;

fn bit(bits: &[u64], slot: Slot) -> bool {
    let i = slot.index();
    bits.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
}

fn set_bit(bits: &mut Vec<u64>, slot: Slot, on: bool) {
    let i = slot.index();
    if bits.len() <= i / 64 {
        if !on {
            return;
        }
        bits.resize(i / 64 + 1, 0);
    }
    if on {
        bits[i / 64] |= 1 << (i % 64);
    } else {
        bits[i / 64] &= !(1 << (i % 64));
    }
}

/// Why a route is not exported to a neighbour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Policy, split horizon, iBGP rules, communities, family.
    Filtered,
    /// No address of ours of the family to put as next hop.
    NoNextHop(Family),
    /// The attributes do not fit in one message of the session.
    TooBig,
}

/// How the driver resolved a next hop (in the kernel's routing table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHopState {
    pub reachable: bool,
    /// Metric of the route that reaches it (compared as the IGP cost).
    pub cost: u32,
}

#[derive(Debug, Default)]
struct WatchedNextHop {
    /// How many paths go through it (the prefixes are found by a scan of
    /// the Loc-RIB when its state changes, which is rare).
    paths: u32,
    /// None until the driver reports: assumed reachable meanwhile.
    state: Option<NextHopState>,
}

/// What an unresolved next hop is taken to be.
const ASSUMED: NextHopState = NextHopState {
    reachable: true,
    cost: 0,
};

fn source_info(
    neighbors: &Neighbors,
    next_hops: &HashMap<IpAddr, WatchedNextHop>,
    local_as: u32,
    path: &Path,
) -> SourceInfo {
    match path.source {
        PathSource::Neighbor(n) => match neighbors.get(n) {
            Some(nb) => {
                let state = path
                    .attrs
                    .next_hop
                    .as_ref()
                    .and_then(|h| next_hops.get(&next_hop_address(h)))
                    .and_then(|w| w.state);
                SourceInfo {
                    ebgp: nb.config.remote_as != local_as,
                    router_id: nb
                        .negotiated
                        .as_ref()
                        .map(|n| n.peer_id)
                        .unwrap_or(Ipv4Addr::UNSPECIFIED),
                    address: nb.config.address,
                    igp_cost: state.map(|s| s.cost).unwrap_or(0),
                    reachable: state.is_none_or(|s| s.reachable),
                }
            }
            None => SourceInfo {
                reachable: false,
                ..SourceInfo::LOCAL
            },
        },
        _ => SourceInfo::LOCAL,
    }
}

fn route_source(source: PathSource) -> RouteSource {
    match source {
        PathSource::Static(_) => RouteSource::Static,
        PathSource::Connected => RouteSource::Connected,
        PathSource::Kernel => RouteSource::Kernel,
        PathSource::Neighbor(_) => RouteSource::Bgp,
    }
}

impl Speaker {
    pub fn new(config: SpeakerConfig, now: Instant) -> Self {
        let neighbors = Neighbors(
            config
                .neighbors
                .iter()
                .map(|c| Self::make_neighbor(&config, c.clone(), now))
                .collect(),
        );
        Speaker {
            rib: LocRib::new(config.selection),
            statics: config.statics.iter().cloned().map(Some).collect(),
            config,
            neighbors,
            interner: Interner::default(),
            started: false,
            events: VecDeque::new(),
            next_hops: HashMap::new(),
            connected: HashSet::new(),
            kernel_routes: HashMap::new(),
            gc_at: 4096,
            route_events: true,
            hold_statics: false,
            send_window: None,
            release_at: 0,
            own_restart: None,
            upstream_ready: false,
        }
    }

    fn make_neighbor(config: &SpeakerConfig, nc: NeighborConfig, now: Instant) -> Neighbor {
        Neighbor {
            session: Session::new(nc.session_config(config.asn, config.router_id), now),
            config: nc,
            conn_local: HashMap::new(),
            local_address: None,
            negotiated: None,
            adj_in: HashMap::new(),
            adj_in_complete: false,
            imported: 0,
            announced: Vec::new(),
            exported: 0,
            pending: Vec::new(),
            pending_mark: Vec::new(),
            export_cache: HashMap::new(),
            eor_pending: Vec::new(),
            eorr_pending: Vec::new(),
            in_flight: 0,
            refresh_stale: HashMap::new(),
            gr_stale: HashMap::new(),
            gr_deadline: None,
            counters: Counters::default(),
            max_prefix_warned: false,
            next_hop_warned: false,
            eor_installing: false,
            eor_installed: false,
            removed: false,
        }
    }

    /// Turns [`Event::Route`] off (for a driver with no kernel to feed,
    /// where a million queued changes would only cost memory) or on again.
    pub fn set_route_events(&mut self, on: bool) {
        self.route_events = on;
        self.rib.set_report_multipath(on);
    }

    /// Where the bytes go, for `bench` and profiling.
    pub fn memory(&self) -> MemoryReport {
        let (loc_rib, index) = self.rib.heap_bytes();
        let mut adj_in = 0;
        let mut adj_out = 0;
        for n in self.neighbors.iter().filter(|n| !n.removed) {
            adj_in += n.adj_in.capacity() * (std::mem::size_of::<(IpNet, Attrs)>() + 1);
            adj_out += (n.announced.capacity() + n.pending_mark.capacity()) * 8
                + n.pending.capacity() * 4
                + n.export_cache.capacity()
                    * (std::mem::size_of::<((usize, PathSource, Family), (Attrs, Option<Attrs>))>(
                    ) + 1)
                + n.export_cache
                    .values()
                    .filter_map(|(_, out)| out.as_deref())
                    .map(crate::rib::attrs_heap_bytes)
                    .sum::<usize>();
        }
        MemoryReport {
            prefixes: self.rib.len(),
            loc_rib,
            loc_rib_index: index,
            adj_rib_in: adj_in,
            adj_rib_out: adj_out,
            attribute_sets: self.interner.len(),
            attributes: self.interner.heap_bytes(),
        }
    }

    pub fn config(&self) -> &SpeakerConfig {
        &self.config
    }

    pub fn rib(&self) -> &LocRib {
        &self.rib
    }

    pub fn interner(&self) -> &Interner {
        &self.interner
    }

    /// Originates the static routes and starts every enabled neighbour.
    pub fn start(&mut self, now: Instant) {
        if self.started {
            return;
        }
        self.started = true;
        if !self.hold_statics {
            self.originate_statics();
        }
        for id in self.neighbors.ids() {
            if self.neighbors[id].config.enabled {
                self.neighbors[id].session.start(now);
            }
        }
        self.drain_sessions(now);
    }

    fn originate_statics(&mut self) {
        for i in 0..self.statics.len() {
            if let Some(route) = self.statics[i].clone() {
                self.originate_static(i, &route);
            }
        }
    }

    /// Keeps the static routes out of the Loc-RIB (so nothing announces
    /// them) until [`Speaker::release_origination`]: a border announces its
    /// block only once the mesh behind it is ready to take the traffic.
    /// Call before [`Speaker::start`].
    pub fn hold_origination(&mut self) {
        self.hold_statics = true;
    }

    /// Originates the held static routes (once; later calls do nothing).
    pub fn release_origination(&mut self, now: Instant) {
        if !self.hold_statics {
            return;
        }
        self.hold_statics = false;
        if self.started {
            self.originate_statics();
            self.flush();
            self.drain_sessions(now);
        }
    }

    fn static_attrs(&mut self, route: &StaticRoute) -> Attrs {
        let next_hop = match route.kind {
            StaticKind::Via(IpAddr::V4(a)) => Some(NextHop::V4(a)),
            StaticKind::Via(IpAddr::V6(a)) => Some(NextHop::V6 {
                global: a,
                link_local: None,
            }),
            _ => None,
        };
        self.interner.intern(PathAttributes {
            origin: Origin::Igp,
            next_hop,
            ..PathAttributes::default()
        })
    }

    fn originate_static(&mut self, index: usize, route: &StaticRoute) {
        let attrs = self.static_attrs(route);
        self.rib_update(route.prefix, PathSource::Static(index as u32), Some(attrs));
    }

    // ----- queries -------------------------------------------------------

    pub fn neighbor_ids(&self) -> impl Iterator<Item = NeighborId> + '_ {
        self.neighbors.ids().filter(|&i| !self.neighbors[i].removed)
    }

    pub fn neighbor_by_name(&self, name: &str) -> Option<NeighborId> {
        self.neighbor_ids()
            .find(|&i| self.neighbors[i].config.name == name)
    }

    /// The configured neighbour with this address (for incoming connections).
    pub fn neighbor_by_address(&self, address: IpAddr) -> Option<NeighborId> {
        self.neighbor_ids()
            .find(|&i| self.neighbors[i].config.address == address)
    }

    pub fn neighbor(&self, id: NeighborId) -> Option<NeighborStatus<'_>> {
        let n = self.neighbors.get(id).filter(|n| !n.removed)?;
        Some(NeighborStatus {
            id,
            config: &n.config,
            state: n.session.state(),
            since: n.session.since(),
            last_error: n.session.last_error(),
            negotiated: n.negotiated.as_ref(),
            local_address: n.local_address,
            routes_imported: n.imported,
            routes_exported: n.exported,
            counters: n.counters,
        })
    }

    pub fn neighbor_name(&self, id: NeighborId) -> &str {
        self.neighbors
            .get(id)
            .map(|n| n.config.name.as_str())
            .unwrap_or("?")
    }

    /// The static route behind `PathSource::Static(id)`.
    pub fn static_route(&self, id: u32) -> Option<&StaticRoute> {
        self.statics.get(id as usize).and_then(Option::as_ref)
    }

    /// What we announce to a neighbour (Adj-RIB-Out), computed from the
    /// announced prefixes' best paths.
    pub fn adj_rib_out(&self, id: NeighborId) -> Option<Vec<(IpNet, PathAttributes)>> {
        let n = self.neighbors.get(id).filter(|n| !n.removed)?;
        Some(
            self.rib
                .iter_slots()
                .filter(|(slot, _, _)| bit(&n.announced, *slot))
                .filter_map(|(_, prefix, e)| {
                    let attrs = self.export_plain(id, *prefix, e.best()?).ok()?;
                    Some((*prefix, attrs))
                })
                .collect(),
        )
    }

    // ----- driver input ----------------------------------------------------

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.neighbors
            .iter()
            .filter(|n| !n.removed)
            .flat_map(|n| [n.session.poll_timeout(), n.gr_deadline])
            .chain([self.own_restart.as_ref().map(|r| r.deadline)])
            .flatten()
            .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        for n in self.neighbors.iter_mut() {
            if !n.removed && n.session.poll_timeout().is_some_and(|t| t <= now) {
                n.session.handle_timeout(now);
            }
        }
        for id in self.neighbors.ids() {
            if self.neighbors[id].gr_deadline.is_some_and(|t| t <= now) {
                // The neighbour did not come back within its restart time.
                self.flush_gr_stale(id, None);
            }
        }
        if self.own_restart.as_ref().is_some_and(|r| r.deadline <= now) {
            self.end_own_restart(RestartEnd::RestartTimePassed);
        }
        self.flush();
        self.drain_sessions(now);
    }

    /// A TCP connection to or from `neighbor` is up; `local` is our address
    /// on it.
    pub fn tcp_connected(
        &mut self,
        now: Instant,
        neighbor: NeighborId,
        conn: ConnId,
        outgoing: bool,
        local: IpAddr,
    ) {
        let Some(n) = self.neighbors.get_mut(neighbor).filter(|n| !n.removed) else {
            return;
        };
        n.conn_local.insert(conn, local);
        n.session.tcp_connected(now, conn, outgoing);
        self.drain_sessions(now);
    }

    pub fn tcp_connect_failed(&mut self, now: Instant, neighbor: NeighborId, error: &str) {
        if let Some(n) = self.neighbors.get_mut(neighbor) {
            n.session.tcp_connect_failed(now, error);
        }
        self.drain_sessions(now);
    }

    pub fn tcp_closed(&mut self, now: Instant, neighbor: NeighborId, conn: ConnId) {
        if let Some(n) = self.neighbors.get_mut(neighbor) {
            n.session.tcp_closed(now, conn);
            n.conn_local.remove(&conn);
        }
        self.drain_sessions(now);
    }

    pub fn received(&mut self, now: Instant, neighbor: NeighborId, conn: ConnId, bytes: &[u8]) {
        if let Some(n) = self.neighbors.get_mut(neighbor) {
            n.session.received(now, conn, bytes);
        }
        self.drain_sessions(now);
    }

    /// Limits the UPDATE bytes a neighbour may have handed out and not yet
    /// written ([`Speaker::written`]): past it, changes wait as pending
    /// slots until the connection has taken what it was given. None (the
    /// default): everything is encoded at once.
    pub fn set_send_window(&mut self, bytes: Option<usize>) {
        self.send_window = bytes;
    }

    /// The driver wrote `bytes` on connection `conn` of `neighbor`: with
    /// a send window, what waited goes out now.
    pub fn written(&mut self, now: Instant, neighbor: NeighborId, conn: ConnId, bytes: usize) {
        let Some(n) = self.neighbors.get_mut(neighbor) else {
            return;
        };
        // Only the established connection's writes count: what an old or
        // colliding connection wrote was never in the window.
        if n.session.established_conn() != Some(conn) {
            return;
        }
        n.in_flight = n.in_flight.saturating_sub(bytes);
        if !n.pending.is_empty() || !n.eor_pending.is_empty() || !n.eorr_pending.is_empty() {
            self.flush();
            self.drain_sessions(now);
        }
    }

    /// Messages the driver decoded itself, with [`Speaker::codec`].
    pub fn received_decoded(
        &mut self,
        now: Instant,
        neighbor: NeighborId,
        conn: ConnId,
        messages: Vec<Result<Decoded, Notification>>,
    ) {
        if let Some(n) = self.neighbors.get_mut(neighbor) {
            n.session.received_decoded(now, conn, messages);
        }
        self.drain_sessions(now);
    }

    /// The codec of a connection whose OPENs are exchanged: the driver may
    /// decode what follows on it off the speaker's thread.
    pub fn codec(&self, neighbor: NeighborId, conn: ConnId) -> Option<Codec> {
        self.neighbors.get(neighbor)?.session.codec(conn)
    }

    // ----- administration ----------------------------------------------------

    pub fn enable(&mut self, now: Instant, neighbor: NeighborId) {
        if let Some(n) = self.neighbors.get_mut(neighbor) {
            n.config.enabled = true;
            n.session.start(now);
        }
        self.drain_sessions(now);
    }

    pub fn disable(&mut self, now: Instant, neighbor: NeighborId, message: &str) {
        if let Some(n) = self.neighbors.get_mut(neighbor) {
            n.config.enabled = false;
            n.session.stop(now, message);
        }
        self.drain_sessions(now);
    }

    /// We restarted with our forwarding state (kernel routes) kept: tell
    /// the graceful-restart neighbours (R and F bits in the next OPEN, so
    /// they keep our routes until our End-of-RIB), and keep the old state
    /// until each enabled one has sent End-of-RIB for each of its
    /// families, or the longest of their restart times has passed from
    /// `now`; then comes [`Event::GracefulRestartOver`]. Does nothing when
    /// no enabled neighbour has graceful restart. Call before
    /// [`Speaker::start`].
    pub fn begin_graceful_restart(&mut self, now: Instant) {
        let mut waiting = HashSet::new();
        let mut longest = 0u16;
        for n in self
            .config
            .neighbors
            .iter()
            .filter(|n| n.graceful_restart && n.enabled)
        {
            longest = longest.max(n.restart_time);
            for family in &n.families {
                waiting.insert((n.name.clone(), *family));
            }
        }
        if waiting.is_empty() {
            return;
        }
        self.set_restarting();
        self.own_restart = Some(OwnRestart {
            waiting,
            deadline: now + Duration::from_secs(u64::from(longest)),
        });
    }

    /// Whether our own graceful restart is still in progress.
    pub fn graceful_restart_in_progress(&self) -> bool {
        self.own_restart.is_some()
    }

    fn end_own_restart(&mut self, why: RestartEnd) {
        if self.own_restart.take().is_some() {
            self.events.push_back(Event::GracefulRestartOver(why));
        }
    }

    /// The driver has installed everything it was given up to the
    /// [`Event::EndOfRib`] of `neighbor` (a driver without a forwarding
    /// table says so at once). An eBGP neighbour counts for
    /// [`Event::UpstreamReady`] from then until its session goes down.
    pub fn end_of_rib_installed(&mut self, neighbor: NeighborId) {
        if let Some(n) = self.neighbors.get_mut(neighbor)
            && std::mem::take(&mut n.eor_installing)
        {
            n.eor_installed = true;
        }
        self.update_upstream();
    }

    /// Whether some eBGP neighbour is up with its End-of-RIB installed
    /// (the last [`Event::UpstreamReady`]).
    pub fn upstream_ready(&self) -> bool {
        self.upstream_ready
    }

    /// Forgets End-of-RIBs of sessions that are gone, and reports a change
    /// of [`Speaker::upstream_ready`].
    fn update_upstream(&mut self) {
        let asn = self.config.asn;
        let mut ready = false;
        for n in self.neighbors.iter_mut() {
            if n.removed || n.session.state() != State::Established {
                n.eor_installing = false;
                n.eor_installed = false;
            }
            ready |= n.eor_installed && n.config.remote_as != asn;
        }
        if ready != self.upstream_ready {
            self.upstream_ready = ready;
            self.events.push_back(Event::UpstreamReady(ready));
        }
    }

    /// Sets the R bit in the next OPEN to each graceful-restart neighbour;
    /// cleared per neighbour once its session is up.
    fn set_restarting(&mut self) {
        for n in self.neighbors.iter_mut() {
            if n.config.graceful_restart {
                let mut config = n.session.config().clone();
                config.restarting = true;
                n.session.set_config(config);
            }
        }
    }

    /// BFD declared the path to this neighbour down: the session goes at
    /// once instead of waiting for its hold timer.
    pub fn bfd_down(&mut self, now: Instant, neighbor: NeighborId) {
        if let Some(n) = self.neighbors.get_mut(neighbor) {
            n.session.transport_failed(now, "BFD session down");
        }
        self.drain_sessions(now);
    }

    pub fn restart(&mut self, now: Instant, neighbor: NeighborId, message: &str) {
        if let Some(n) = self.neighbors.get_mut(neighbor) {
            n.session.restart(now, message);
        }
        self.drain_sessions(now);
    }

    /// Re-applies import policy (from the pre-policy copy, or by asking the
    /// neighbour with ROUTE-REFRESH) and export policy (sending only what
    /// changed).
    pub fn refresh(&mut self, now: Instant, neighbor: NeighborId) {
        self.refresh_in(neighbor);
        self.refresh_out(neighbor);
        self.flush();
        self.drain_sessions(now);
    }

    fn refresh_in(&mut self, id: NeighborId) {
        let Some(n) = self.neighbors.get_mut(id) else {
            return;
        };
        let Some(negotiated) = n.negotiated.clone() else {
            return;
        };
        // The pre-policy copy is complete only if it was kept since the
        // session came up; otherwise ask the neighbour.
        if n.config.soft_reconfiguration_inbound && n.adj_in_complete {
            let routes: Vec<(IpNet, Attrs)> =
                n.adj_in.iter().map(|(p, a)| (*p, a.clone())).collect();
            for (prefix, attrs) in routes {
                self.import_one(id, prefix, &attrs);
            }
            return;
        }
        if negotiated.route_refresh {
            // The neighbour resends everything: from now on the copy fills.
            n.adj_in_complete = n.config.soft_reconfiguration_inbound;
            for family in negotiated.families {
                let rr = Message::RouteRefresh(RouteRefresh {
                    family,
                    subtype: RefreshSubtype::Request,
                });
                n.session.send_message(&rr);
            }
            let name = n.config.name.clone();
            self.log(
                Some(id),
                Level::Info,
                format!("{name}: asked for a route refresh"),
            );
        } else {
            let name = n.config.name.clone();
            self.log(Some(id), Level::Warn, format!("{name}: no route refresh capability and no soft reconfiguration: import policy applies to new routes only"));
        }
    }

    /// Recomputes what we announce to `id` from the Loc-RIB.
    fn refresh_out(&mut self, id: NeighborId) {
        if self
            .neighbors
            .get(id)
            .is_none_or(|n| n.negotiated.is_none())
        {
            return;
        }
        self.neighbors[id].export_cache.clear();
        for slot in self.rib.slots() {
            let best = self.rib.at(slot).and_then(|(_, e)| e.best()).cloned();
            self.export_update(id, slot, best.as_ref());
        }
    }

    /// Applies a changed configuration without touching what did not
    /// change: a neighbour whose session parameters changed is restarted
    /// (Cease / Other Configuration Change), one whose policies changed gets
    /// a soft refresh, removed neighbours are closed (Cease / Peer
    /// De-configured), new ones start. Changing the AS number or router id
    /// restarts every session.
    pub fn reconfigure(&mut self, now: Instant, new: SpeakerConfig) {
        self.clear_export_caches();
        let identity_changed = new.asn != self.config.asn || new.router_id != self.config.router_id;
        if new.selection != self.config.selection {
            self.rib.set_selection(new.selection);
            self.reselect_all();
        }
        let old_cluster = self.config.cluster_id;
        self.config.asn = new.asn;
        self.config.router_id = new.router_id;
        self.config.cluster_id = new.cluster_id;
        self.config.selection = new.selection;

        // Neighbours, matched by name.
        for id in self.neighbors.ids() {
            if self.neighbors[id].removed {
                continue;
            }
            let name = self.neighbors[id].config.name.clone();
            match new.neighbors.iter().find(|n| n.name == name) {
                None => {
                    let note =
                        Notification::new(error_code::CEASE, cease::PEER_DECONFIGURED, vec![]);
                    self.neighbors[id].session.shutdown(now, note, None);
                    self.drain_sessions(now);
                    self.neighbors[id].removed = true;
                    self.log(
                        Some(id),
                        Level::Info,
                        format!("{name}: removed from the configuration"),
                    );
                }
                Some(nc) => self.reconfigure_neighbor(
                    now,
                    id,
                    nc.clone(),
                    identity_changed || old_cluster != new.cluster_id,
                ),
            }
        }
        for nc in &new.neighbors {
            if self.neighbor_by_name(&nc.name).is_none() {
                let id = self
                    .neighbors
                    .push(Self::make_neighbor(&self.config, nc.clone(), now));
                if nc.enabled && self.started {
                    self.neighbors[id].session.start(now);
                }
                self.log(
                    Some(id),
                    Level::Info,
                    format!("{}: added to the configuration", nc.name),
                );
            }
        }

        // Static routes: withdraw the ones gone, originate the new ones.
        for i in 0..self.statics.len() {
            if let Some(route) = &self.statics[i]
                && !new.statics.contains(route)
            {
                let prefix = route.prefix;
                self.statics[i] = None;
                self.rib_update(prefix, PathSource::Static(i as u32), None);
            }
        }
        for route in &new.statics {
            if !self.statics.iter().flatten().any(|r| r == route) {
                self.statics.push(Some(route.clone()));
                if self.started && !self.hold_statics {
                    self.originate_static(self.statics.len() - 1, route);
                }
            }
        }
        self.config.statics = new.statics;
        self.config.neighbors = self
            .neighbors
            .iter()
            .filter(|n| !n.removed)
            .map(|n| n.config.clone())
            .collect();
        self.flush();
        self.drain_sessions(now);
    }

    fn reconfigure_neighbor(
        &mut self,
        now: Instant,
        id: NeighborId,
        nc: NeighborConfig,
        restart_all: bool,
    ) {
        let old = self.neighbors[id].config.clone();
        let session_config = nc.session_config(self.config.asn, self.config.router_id);
        let session_changed = restart_all
            || old.address != nc.address
            || old.local_address != nc.local_address
            || *self.neighbors[id].session.config() != session_config;
        let import_changed = format!("{:?}", old.import) != format!("{:?}", nc.import)
            || old.soft_reconfiguration_inbound != nc.soft_reconfiguration_inbound;
        let export_changed = format!("{:?}", old.export) != format!("{:?}", nc.export)
            || old.next_hop_self != nc.next_hop_self
            || old.route_reflector_client != nc.route_reflector_client
            || old.next_hop_ipv4 != nc.next_hop_ipv4
            || old.next_hop_ipv6 != nc.next_hop_ipv6;
        let enabled_changed = old.enabled != nc.enabled;
        self.neighbors[id].config = nc.clone();
        if session_changed {
            self.neighbors[id].session.set_config(session_config);
            if nc.enabled {
                let note = Notification::new(error_code::CEASE, cease::OTHER_CONFIG_CHANGE, vec![]);
                self.neighbors[id]
                    .session
                    .shutdown(now, note, Some(Duration::ZERO));
                self.neighbors[id].session.start(now);
            }
            self.drain_sessions(now);
            self.log(
                Some(id),
                Level::Info,
                format!("{}: session parameters changed: restarted", nc.name),
            );
        } else {
            if import_changed {
                self.refresh_in(id);
            }
            if export_changed {
                self.refresh_out(id);
            }
            if old.route_reflector_client != nc.route_reflector_client {
                // What is reflected to the other iBGP neighbours depends on
                // whether this one is a client.
                let ibgp: Vec<NeighborId> = self
                    .neighbor_ids()
                    .filter(|&o| o != id && self.neighbors[o].config.remote_as == self.config.asn)
                    .collect();
                for other in ibgp {
                    self.refresh_out(other);
                }
            }
            if import_changed || export_changed {
                self.log(
                    Some(id),
                    Level::Info,
                    format!("{}: policy changed: soft refresh", nc.name),
                );
            }
        }
        if enabled_changed {
            if nc.enabled {
                self.neighbors[id].session.start(now);
            } else {
                self.neighbors[id]
                    .session
                    .stop(now, "disabled in the configuration");
            }
            self.drain_sessions(now);
        }
    }

    // ----- session outputs -----------------------------------------------------

    fn drain_sessions(&mut self, now: Instant) {
        loop {
            let mut progressed = false;
            for id in self.neighbors.ids() {
                while let Some(output) = self.neighbors[id].session.poll_output() {
                    progressed = true;
                    self.on_session_output(now, id, output);
                }
            }
            self.flush();
            if !progressed {
                break;
            }
        }
        self.update_upstream();
    }

    fn on_session_output(&mut self, now: Instant, id: NeighborId, output: Output) {
        match output {
            Output::Connect => self.events.push_back(Event::Connect { neighbor: id }),
            Output::Send(conn, bytes) => self.events.push_back(Event::Send {
                neighbor: id,
                conn,
                bytes,
            }),
            Output::Close(conn) => {
                self.neighbors[id].conn_local.remove(&conn);
                self.events.push_back(Event::Close { neighbor: id, conn });
            }
            Output::Established(negotiated) => self.on_established(now, id, *negotiated),
            Output::Down { reason, graceful } => self.on_down(now, id, &reason, graceful),
            Output::Update(update) => self.on_update(now, id, *update),
            Output::RouteRefresh(rr) => self.on_route_refresh(id, rr),
            Output::Log(message) => {
                let name = self.neighbors[id].config.name.clone();
                self.log(Some(id), Level::Info, format!("{name}: {message}"));
            }
        }
    }

    fn log(&mut self, neighbor: Option<NeighborId>, level: Level, message: String) {
        self.events.push_back(Event::Log {
            neighbor,
            level,
            message,
        });
    }

    fn on_established(&mut self, now: Instant, id: NeighborId, negotiated: Negotiated) {
        // Back from a graceful restart: families whose forwarding state the
        // neighbour did not keep (no F bit, or no capability) go now; the
        // others wait for its End-of-RIB.
        if !self.neighbors[id].gr_stale.is_empty() {
            self.neighbors[id].gr_deadline = None;
            let kept: Vec<Family> = negotiated
                .peer_open
                .graceful_restart()
                .map(|gr| {
                    gr.families
                        .iter()
                        .filter(|(_, forwarding)| *forwarding)
                        .map(|(f, _)| *f)
                        .collect()
                })
                .unwrap_or_default();
            let stale: Vec<Family> = self.neighbors[id].gr_stale.keys().copied().collect();
            for family in stale {
                if !kept.contains(&family) || !negotiated.families.contains(&family) {
                    self.flush_gr_stale(id, Some(family));
                }
            }
            // An End-of-RIB that never comes must not keep them for ever.
            if !self.neighbors[id].gr_stale.is_empty() {
                let restart = negotiated
                    .peer_open
                    .graceful_restart()
                    .map(|gr| gr.restart_time)
                    .unwrap_or(0);
                self.neighbors[id].gr_deadline =
                    Some(now + Duration::from_secs(u64::from(restart.max(60))));
            }
        }
        let n = &mut self.neighbors[id];
        if n.session.config().restarting {
            let mut config = n.session.config().clone();
            config.restarting = false;
            n.session.set_config(config);
        }
        n.local_address = n
            .session
            .established_conn()
            .and_then(|c| n.conn_local.get(&c).copied());
        n.counters.established_transitions += 1;
        n.adj_in_complete = n.config.soft_reconfiguration_inbound;
        n.max_prefix_warned = false;
        n.next_hop_warned = false;
        let families = negotiated.families.clone();
        let message = format!(
            "{}: Established (AS {}, id {}, hold {} s, families {})",
            n.config.name,
            negotiated.peer_as,
            negotiated.peer_id,
            negotiated.hold_time,
            families
                .iter()
                .map(|f| f.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        n.negotiated = Some(negotiated);
        n.in_flight = 0;
        self.log(Some(id), Level::Info, message);
        // Its address and router id feed every export.
        self.clear_export_caches();
        // Initial dump of our best routes, then End-of-RIB per family.
        let dump: Vec<(Slot, Path)> = self
            .rib
            .iter_slots()
            .filter_map(|(s, _, e)| e.best().map(|b| (s, b.clone())))
            .collect();
        for (slot, best) in dump {
            self.export_update(id, slot, Some(&best));
        }
        self.neighbors[id].eor_pending = families;
    }

    fn on_down(&mut self, now: Instant, id: NeighborId, reason: &str, graceful: bool) {
        let n = &mut self.neighbors[id];
        let name = n.config.name.clone();
        // RFC 4724 helper: a neighbour that asked for graceful restart and
        // lost its session without a NOTIFICATION keeps its routes (stale)
        // for its restart time.
        let peer_gr = n
            .negotiated
            .as_ref()
            .and_then(|neg| neg.peer_open.graceful_restart().cloned());
        let retain: Vec<Family> = match (&peer_gr, graceful && n.config.graceful_restart) {
            (Some(gr), true) if gr.restart_time > 0 => {
                gr.families.iter().map(|(f, _)| *f).collect()
            }
            _ => Vec::new(),
        };
        n.negotiated = None;
        n.in_flight = 0;
        n.local_address = None;
        n.announced = Vec::new();
        n.exported = 0;
        n.pending = Vec::new();
        n.pending_mark = Vec::new();
        n.eor_pending.clear();
        n.eorr_pending.clear();
        n.adj_in.clear();
        n.adj_in_complete = false;
        n.refresh_stale.clear();
        n.eor_installing = false;
        n.eor_installed = false;
        let mut gone = Vec::new();
        let mut kept = 0;
        let source = PathSource::neighbor(id);
        let n = &mut self.neighbors[id];
        // Slots, not prefixes: 4 bytes each when a full table goes.
        for (slot, prefix, _) in self
            .rib
            .iter_slots()
            .filter(|(_, _, e)| e.paths().iter().any(|p| p.source == source))
        {
            let family = Family::of(prefix);
            if retain.contains(&family) {
                n.gr_stale.entry(family).or_default().insert(*prefix);
                kept += 1;
            } else {
                gone.push(slot);
            }
        }
        if kept > 0 {
            let restart = peer_gr.map(|gr| gr.restart_time).unwrap_or(0);
            n.gr_deadline = Some(now + Duration::from_secs(u64::from(restart)));
            self.log(
                Some(id),
                Level::Warn,
                format!("{name}: session down: {reason}; keeping {kept} routes for its restart ({restart} s, RFC 4724)"),
            );
        } else {
            self.log(
                Some(id),
                Level::Warn,
                format!(
                    "{name}: session down: {reason}; {} routes withdrawn",
                    gone.len()
                ),
            );
        }
        self.clear_export_caches();
        for slot in gone {
            // Nothing is released before the next flush: the slot is still
            // this prefix's.
            if let Some((prefix, _)) = self.rib.at(slot) {
                let prefix = *prefix;
                self.rib_update(prefix, PathSource::neighbor(id), None);
            }
        }
    }

    fn clear_export_caches(&mut self) {
        for n in self.neighbors.iter_mut() {
            n.export_cache.clear();
        }
    }

    /// Withdraws what is still stale of a restarted neighbour's `family`
    /// (all families with None).
    fn flush_gr_stale(&mut self, id: NeighborId, family: Option<Family>) {
        let n = &mut self.neighbors[id];
        let families: Vec<Family> = match family {
            Some(f) => vec![f],
            None => n.gr_stale.keys().copied().collect(),
        };
        let mut gone = Vec::new();
        for f in families {
            if let Some(stale) = n.gr_stale.remove(&f) {
                gone.extend(stale);
            }
        }
        if n.gr_stale.is_empty() {
            n.gr_deadline = None;
        }
        if !gone.is_empty() {
            let name = n.config.name.clone();
            self.log(
                Some(id),
                Level::Info,
                format!(
                    "{name}: {} stale routes withdrawn after its restart",
                    gone.len()
                ),
            );
        }
        for prefix in gone {
            self.unimport(id, prefix);
        }
    }

    fn on_update(&mut self, now: Instant, id: NeighborId, update: DecodedUpdate) {
        if !update.discarded.is_empty() || update.treat_as_withdraw.is_some() {
            let name = self.neighbors[id].config.name.clone();
            for why in &update.discarded {
                self.log(
                    Some(id),
                    Level::Warn,
                    format!("{name}: UPDATE attribute discarded (RFC 7606): {why}"),
                );
            }
            if let Some(why) = &update.treat_as_withdraw {
                self.log(
                    Some(id),
                    Level::Warn,
                    format!("{name}: UPDATE treated as withdraw (RFC 7606): {why}"),
                );
            }
        }
        // End-of-RIB after a graceful restart: what was not refreshed goes.
        if let Some(family) = update.end_of_rib() {
            self.flush_gr_stale(id, Some(family));
            self.neighbors[id].eor_installing = true;
            self.events.push_back(Event::EndOfRib {
                neighbor: id,
                family,
            });
            if let Some(restart) = self.own_restart.as_mut() {
                restart
                    .waiting
                    .remove(&(self.neighbors[id].config.name.clone(), family));
                if restart.waiting.is_empty() {
                    self.end_own_restart(RestartEnd::EveryEndOfRib);
                }
            }
            return;
        }
        self.neighbors[id].counters.withdraws_received += update.withdrawn().count() as u64;
        for prefix in update.withdrawn() {
            self.withdraw_from(id, *prefix);
        }
        if update.treat_as_withdraw.is_some() {
            return;
        }
        let DecodedUpdate { update, .. } = update;
        let Some(attrs) = update.attributes else {
            return;
        };
        // Per UPDATE, so without allocating: which families were agreed.
        let agreed = |speaker: &Self, family: Family| {
            speaker.neighbors[id]
                .negotiated
                .as_ref()
                .is_some_and(|n| n.families.contains(&family))
        };
        let ipv4 = !update.nlri.is_empty() && agreed(self, Family::IPV4_UNICAST);
        let reach = update.mp_reach.filter(|r| agreed(self, r.family));
        match (ipv4, reach) {
            (true, None) => self.import_many(id, &update.nlri, attrs),
            (true, Some(reach)) => {
                self.import_many(id, &update.nlri, attrs.clone());
                let mut attrs = attrs;
                attrs.next_hop = Some(reach.next_hop);
                self.import_many(id, &reach.nlri, attrs);
            }
            (false, Some(reach)) => {
                let mut attrs = attrs;
                attrs.next_hop = Some(reach.next_hop);
                self.import_many(id, &reach.nlri, attrs);
            }
            (false, None) => {}
        }
        self.check_max_prefixes(now, id);
    }

    fn import_many(&mut self, id: NeighborId, prefixes: &[IpNet], attrs: PathAttributes) {
        self.neighbors[id].counters.updates_received += prefixes.len() as u64;
        let Some(first) = prefixes.first() else {
            return;
        };
        let attrs = self.interner.intern(attrs);
        let n = &self.neighbors[id];
        let soft = n.config.soft_reconfiguration_inbound;
        let stale = !n.refresh_stale.is_empty() || !n.gr_stale.is_empty();
        // Loop checks look at the attributes only, and so does the import
        // policy unless it matches prefixes: decide once per UPDATE.
        let once = (!n.config.import.depends_on_prefix())
            .then(|| self.import_decision(id, *first, &attrs));
        for prefix in prefixes {
            let n = &mut self.neighbors[id];
            if soft {
                n.adj_in.insert(*prefix, attrs.clone());
            }
            if stale {
                for stale in n.refresh_stale.values_mut() {
                    stale.remove(prefix);
                }
                if let Some(stale) = n.gr_stale.get_mut(&Family::of(prefix)) {
                    stale.remove(prefix);
                }
            }
            let decision = match &once {
                Some(d) => d.clone(),
                None => self.import_decision(id, *prefix, &attrs),
            };
            self.apply_import(id, *prefix, decision);
        }
    }

    /// Loop checks and import policy for one received path.
    fn import_one(&mut self, id: NeighborId, prefix: IpNet, attrs: &Attrs) {
        let decision = self.import_decision(id, prefix, attrs);
        self.apply_import(id, prefix, decision);
    }

    /// What goes into the Loc-RIB for a received path: None when a loop
    /// check or the import policy rejects it.
    fn import_decision(&mut self, id: NeighborId, prefix: IpNet, attrs: &Attrs) -> Option<Attrs> {
        let n = &self.neighbors[id];
        let ebgp = n.config.remote_as != self.config.asn;
        let cluster_id = self.config.cluster_id.unwrap_or(self.config.router_id);
        let looped = if ebgp {
            attrs.as_path.contains(self.config.asn)
        } else {
            attrs.originator_id == Some(self.config.router_id)
                || attrs.cluster_list.contains(&cluster_id)
        };
        if looped {
            return None;
        }
        let ctx = RouteContext {
            prefix: &prefix,
            neighbor: Some(n.config.name.as_str()),
            source: RouteSource::Bgp,
            local_as: self.config.asn,
        };
        match n.config.import.evaluate(&ctx, attrs) {
            Outcome::Reject => None,
            Outcome::Accept { attrs: changed, .. } => Some(match changed {
                Some(a) => self.interner.intern(a),
                None => attrs.clone(),
            }),
        }
    }

    fn apply_import(&mut self, id: NeighborId, prefix: IpNet, decision: Option<Attrs>) {
        match decision {
            None => {
                self.neighbors[id].counters.filtered_in += 1;
                self.unimport(id, prefix);
            }
            Some(accepted) => self.rib_update(prefix, PathSource::neighbor(id), Some(accepted)),
        }
    }

    /// The neighbour withdrew `prefix`: forget it, pre-policy copy too.
    fn withdraw_from(&mut self, id: NeighborId, prefix: IpNet) {
        let n = &mut self.neighbors[id];
        n.adj_in.remove(&prefix);
        for stale in n.refresh_stale.values_mut() {
            stale.remove(&prefix);
        }
        if let Some(stale) = n.gr_stale.get_mut(&Family::of(&prefix)) {
            stale.remove(&prefix);
        }
        self.unimport(id, prefix);
    }

    /// Takes `prefix` from this neighbour out of the Loc-RIB (policy or a
    /// loop rejected it); the pre-policy copy stays for a later refresh.
    fn unimport(&mut self, id: NeighborId, prefix: IpNet) {
        self.rib_update(prefix, PathSource::neighbor(id), None);
    }

    fn check_max_prefixes(&mut self, now: Instant, id: NeighborId) {
        let n = &mut self.neighbors[id];
        let Some(max) = n.config.max_prefixes else {
            return;
        };
        let count = n.imported;
        if count <= max.limit {
            n.max_prefix_warned = false;
            return;
        }
        let name = n.config.name.clone();
        match max.action {
            MaxPrefixAction::Warn => {
                if !n.max_prefix_warned {
                    n.max_prefix_warned = true;
                    self.log(
                        Some(id),
                        Level::Warn,
                        format!("{name}: {count} prefixes, above the limit of {}", max.limit),
                    );
                }
            }
            MaxPrefixAction::Restart(_) | MaxPrefixAction::Shutdown => {
                // RFC 4486: data is AFI, SAFI and the limit.
                let mut data = AFI_IPV4.to_be_bytes().to_vec();
                data.push(1);
                data.extend_from_slice(&(max.limit.min(u32::MAX as usize) as u32).to_be_bytes());
                let note = Notification::new(error_code::CEASE, cease::MAX_PREFIXES, data);
                let hold = match max.action {
                    MaxPrefixAction::Restart(d) => Some(d),
                    _ => None,
                };
                // Session outputs (the Down) are drained by our caller.
                n.session.shutdown(now, note, hold);
                self.log(
                    Some(id),
                    Level::Warn,
                    format!(
                        "{name}: {count} prefixes, above the limit of {}: closing",
                        max.limit
                    ),
                );
            }
        }
    }

    fn on_route_refresh(&mut self, id: NeighborId, rr: RouteRefresh) {
        let enhanced = self.neighbors[id]
            .negotiated
            .as_ref()
            .is_some_and(|n| n.enhanced_route_refresh);
        match rr.subtype {
            RefreshSubtype::Request => {
                // Re-send everything of the family: every slot of it goes
                // through the next flush again, which announces what we
                // export and withdraws what we announced and no longer do.
                let family = rr.family;
                if enhanced {
                    let begin = Message::RouteRefresh(RouteRefresh {
                        family,
                        subtype: RefreshSubtype::Begin,
                    });
                    self.neighbors[id].session.send_message(&begin);
                }
                let n = &mut self.neighbors[id];
                for slot in self.rib.slots() {
                    let Some((prefix, entry)) = self.rib.at(slot) else {
                        continue;
                    };
                    let queue = Family::of(prefix) == family
                        && (entry.best().is_some() || bit(&n.announced, slot));
                    if queue && !bit(&n.pending_mark, slot) {
                        set_bit(&mut n.pending_mark, slot, true);
                        n.pending.push(slot);
                    }
                }
                if enhanced {
                    // After the last of them, which a full send window
                    // may hold back.
                    self.neighbors[id].eorr_pending.push(family);
                }
                self.flush_neighbor(id);
            }
            RefreshSubtype::Begin => {
                let source = PathSource::neighbor(id);
                let stale: HashSet<IpNet> = self
                    .rib
                    .iter()
                    .filter(|(p, e)| {
                        Family::of(p) == rr.family && e.paths().iter().any(|x| x.source == source)
                    })
                    .map(|(p, _)| *p)
                    .collect();
                self.neighbors[id].refresh_stale.insert(rr.family, stale);
            }
            RefreshSubtype::End => {
                if let Some(stale) = self.neighbors[id].refresh_stale.remove(&rr.family) {
                    for prefix in stale {
                        self.withdraw_from(id, prefix);
                    }
                }
            }
            RefreshSubtype::Reserved(_) => {}
        }
    }

    // ----- Loc-RIB and export ---------------------------------------------------

    fn rib_update(&mut self, prefix: IpNet, source: PathSource, attrs: Option<Attrs>) {
        let new_hop = match source {
            PathSource::Neighbor(_) => attrs
                .as_ref()
                .and_then(|a| a.next_hop.as_ref().map(next_hop_address)),
            _ => None,
        };
        let added = attrs.is_some();
        let (neighbors, next_hops, asn) = (&self.neighbors, &self.next_hops, self.config.asn);
        let refused = self.rib.refused();
        let update = self.rib.update(prefix, source, attrs, &|p| {
            source_info(neighbors, next_hops, asn, p)
        });
        if self.rib.refused() != refused {
            if refused == 0 {
                let message = format!(
                    "the Loc-RIB holds {} prefixes, its most: new prefixes are left out",
                    crate::rib::MAX_PREFIXES
                );
                self.log(source.neighbor_id(), Level::Warn, message);
            }
            return;
        }
        if let Some(id) = source.neighbor_id() {
            let had = update.old.is_some();
            if let Some(n) = self.neighbors.get_mut(id) {
                match (had, added) {
                    (false, true) => n.imported += 1,
                    (true, false) => n.imported -= 1,
                    _ => {}
                }
            }
            let old_hop = update
                .old
                .as_ref()
                .and_then(|a| a.next_hop.as_ref().map(next_hop_address));
            if old_hop != new_hop {
                if let Some(addr) = new_hop {
                    let watched = self.next_hops.entry(addr).or_default();
                    if watched.paths == 0 {
                        self.events.push_back(Event::WatchNextHop(addr));
                    }
                    watched.paths += 1;
                }
                if let Some(addr) = old_hop
                    && let Some(watched) = self.next_hops.get_mut(&addr)
                {
                    watched.paths = watched.paths.saturating_sub(1);
                    if watched.paths == 0 {
                        self.next_hops.remove(&addr);
                        self.events.push_back(Event::UnwatchNextHop(addr));
                    }
                }
            }
        }
        if let Some(change) = update.change {
            self.on_best_change(change);
        }
    }

    fn reselect_all(&mut self) {
        let (neighbors, next_hops, asn) = (&self.neighbors, &self.next_hops, self.config.asn);
        let changes = self
            .rib
            .reselect_all(&|p| source_info(neighbors, next_hops, asn, p));
        for change in changes {
            self.on_best_change(change);
        }
    }

    /// The networks of our interfaces to originate (BIRD's `protocol
    /// direct`): new ones are added, missing ones withdrawn.
    pub fn set_connected(&mut self, now: Instant, prefixes: &[IpNet]) {
        let wanted: HashSet<IpNet> = prefixes.iter().copied().collect();
        let gone: Vec<IpNet> = self.connected.difference(&wanted).copied().collect();
        let new: Vec<IpNet> = wanted.difference(&self.connected).copied().collect();
        if gone.is_empty() && new.is_empty() {
            return;
        }
        for prefix in gone {
            self.connected.remove(&prefix);
            self.rib_update(prefix, PathSource::Connected, None);
        }
        let attrs = self.interner.intern(PathAttributes {
            origin: Origin::Igp,
            ..PathAttributes::default()
        });
        for prefix in new {
            self.connected.insert(prefix);
            self.rib_update(prefix, PathSource::Connected, Some(attrs.clone()));
        }
        self.flush();
        self.drain_sessions(now);
    }

    /// Routes learnt from the kernel's table (`[kernel] learn`): prefix and
    /// gateway. New ones are originated, missing or changed ones updated.
    pub fn set_kernel_routes(&mut self, now: Instant, routes: &[(IpNet, Option<IpAddr>)]) {
        let wanted: HashMap<IpNet, Option<IpAddr>> = routes.iter().copied().collect();
        if wanted == self.kernel_routes {
            return;
        }
        let gone: Vec<IpNet> = self
            .kernel_routes
            .keys()
            .filter(|p| !wanted.contains_key(*p))
            .copied()
            .collect();
        for prefix in gone {
            self.kernel_routes.remove(&prefix);
            self.rib_update(prefix, PathSource::Kernel, None);
        }
        for (prefix, gateway) in wanted {
            if self.kernel_routes.get(&prefix) == Some(&gateway) {
                continue;
            }
            let next_hop = gateway.map(|g| match g {
                IpAddr::V4(a) => NextHop::V4(a),
                IpAddr::V6(a) => NextHop::V6 {
                    global: a,
                    link_local: None,
                },
            });
            let attrs = self.interner.intern(PathAttributes {
                origin: Origin::Incomplete,
                next_hop,
                ..PathAttributes::default()
            });
            self.kernel_routes.insert(prefix, gateway);
            self.rib_update(prefix, PathSource::Kernel, Some(attrs));
        }
        self.flush();
        self.drain_sessions(now);
    }

    /// The driver's resolution of a watched next hop. Paths through an
    /// unreachable next hop are not selected; the cost breaks ties like an
    /// IGP metric.
    pub fn set_next_hop(&mut self, now: Instant, addr: IpAddr, state: NextHopState) {
        let Some(watched) = self.next_hops.get_mut(&addr) else {
            return;
        };
        let was = watched.state.unwrap_or(ASSUMED);
        watched.state = Some(state);
        if was == state {
            return;
        }
        // Only the prefixes with a path through this next hop.
        let prefixes = self.prefixes_via(addr);
        if was.reachable != state.reachable {
            let word = if state.reachable {
                "reachable"
            } else {
                "unreachable"
            };
            self.log(None, Level::Info, format!("next hop {addr} is {word}"));
        }
        for prefix in prefixes {
            let (neighbors, next_hops, asn) = (&self.neighbors, &self.next_hops, self.config.asn);
            if let Some(change) = self
                .rib
                .reselect(prefix, &|p| source_info(neighbors, next_hops, asn, p))
            {
                self.on_best_change(change);
            }
        }
        self.flush();
        self.drain_sessions(now);
    }

    /// Prefixes with a path through this next hop.
    pub fn prefixes_via(&self, addr: IpAddr) -> Vec<IpNet> {
        if !self.next_hops.contains_key(&addr) {
            return Vec::new();
        }
        let via = |p: &Path| {
            matches!(p.source, PathSource::Neighbor(_))
                && p.attrs.next_hop.as_ref().map(next_hop_address) == Some(addr)
        };
        self.rib
            .iter()
            .filter(|(_, e)| e.paths().iter().any(via))
            .map(|(p, _)| *p)
            .collect()
    }

    /// What the driver last said about a next hop (None: not resolved yet).
    pub fn next_hop_state(&self, addr: IpAddr) -> Option<NextHopState> {
        self.next_hops.get(&addr).and_then(|w| w.state)
    }

    fn on_best_change(&mut self, change: BestChange) {
        if change.best_changed {
            for id in self.neighbors.ids() {
                let n = &self.neighbors[id];
                // An export policy that takes nothing has nothing to
                // withdraw either (it was never announced anything).
                if n.negotiated.is_some() && !n.config.export.rejects_all() {
                    self.export_update(id, change.slot, change.best.as_ref());
                }
            }
        }
        if self.route_events {
            self.events.push_back(Event::Route(RouteChange {
                prefix: change.prefix,
                best: change.best,
                multipath: change.multipath,
            }));
        }
    }

    /// The best path of the prefix in `slot` changed: neighbour `id`
    /// gets an UPDATE for it at the next flush (an announcement, or a
    /// withdrawal of what it was announced).
    fn export_update(&mut self, id: NeighborId, slot: Slot, best: Option<&Path>) {
        let n = &mut self.neighbors[id];
        // Nothing to withdraw, or its own route (never sent back to it).
        let nothing = best.is_none_or(|b| b.source == PathSource::neighbor(id));
        if nothing && !bit(&n.announced, slot) {
            return;
        }
        if !bit(&n.pending_mark, slot) {
            set_bit(&mut n.pending_mark, slot, true);
            n.pending.push(slot);
        }
    }

    /// [`Self::export_attrs`] through the neighbour's export cache.
    fn export_cached(&mut self, id: NeighborId, prefix: IpNet, path: &Path) -> Option<Attrs> {
        if self.neighbors[id].config.export.depends_on_prefix() {
            return self.export_attrs(id, prefix, path);
        }
        let key = (
            Arc::as_ptr(&path.attrs) as usize,
            path.source,
            Family::of(&prefix),
        );
        if let Some((_, out)) = self.neighbors[id].export_cache.get(&key) {
            return out.clone();
        }
        let out = self.export_attrs(id, prefix, path);
        self.neighbors[id]
            .export_cache
            .insert(key, (path.attrs.clone(), out.clone()));
        out
    }

    /// What we would announce to neighbour `id` for `path`, or None; the
    /// attributes are not interned (only the export cache shares them).
    fn export_attrs(&mut self, id: NeighborId, prefix: IpNet, path: &Path) -> Option<Attrs> {
        match self.export_plain(id, prefix, path) {
            Ok(attrs) => Some(Arc::new(attrs)),
            Err(Refusal::Filtered) => None,
            Err(Refusal::NoNextHop(family)) => {
                let n = &mut self.neighbors[id];
                if !n.next_hop_warned {
                    n.next_hop_warned = true;
                    let message = format!(
                        "{}: no {} address of ours to announce as next hop; set next_hop_{} for this neighbour",
                        n.config.name,
                        family,
                        if family.afi == AFI_IPV4 {
                            "ipv4"
                        } else {
                            "ipv6"
                        }
                    );
                    self.log(Some(id), Level::Warn, message);
                }
                None
            }
            Err(Refusal::TooBig) => {
                let name = self.neighbors[id].config.name.clone();
                self.log(
                    Some(id),
                    Level::Warn,
                    format!(
                        "{name}: {prefix} not announced: its attributes do not fit in one message"
                    ),
                );
                None
            }
        }
    }

    /// What we would announce to neighbour `id` for `path`, or why not.
    fn export_plain(
        &self,
        id: NeighborId,
        prefix: IpNet,
        path: &Path,
    ) -> Result<PathAttributes, Refusal> {
        let asn = self.config.asn;
        let target = &self.neighbors[id];
        let negotiated = target.negotiated.as_ref().ok_or(Refusal::Filtered)?;
        let negotiated_codec = negotiated.codec;
        let family = Family::of(&prefix);
        if !negotiated.families.contains(&family) || path.source == PathSource::neighbor(id) {
            return Err(Refusal::Filtered);
        }
        let target_ebgp = target.config.remote_as != asn;
        let from = match path.source {
            PathSource::Neighbor(s) => self.neighbors.get(s),
            _ => None,
        };
        let from_ibgp = from.is_some_and(|f| f.config.remote_as == asn);
        let reflecting = from_ibgp && !target_ebgp;
        if reflecting
            && !from.is_some_and(|f| f.config.route_reflector_client)
            && !target.config.route_reflector_client
        {
            // RFC 4271 §9.2 / RFC 4456: iBGP routes go to iBGP peers only
            // through a route reflector.
            return Err(Refusal::Filtered);
        }
        let communities = &path.attrs.communities;
        if communities.contains(&Community::NO_ADVERTISE)
            || (target_ebgp
                && (communities.contains(&Community::NO_EXPORT)
                    || communities.contains(&Community::NO_EXPORT_SUBCONFED)))
        {
            return Err(Refusal::Filtered);
        }
        let ctx = RouteContext {
            prefix: &prefix,
            neighbor: Some(target.config.name.as_str()),
            source: route_source(path.source),
            local_as: asn,
        };
        let (mut attrs, policy_next_hop_self) =
            match target.config.export.evaluate(&ctx, &path.attrs) {
                Outcome::Reject => return Err(Refusal::Filtered),
                Outcome::Accept {
                    attrs: Some(a),
                    next_hop_self,
                } => (a, next_hop_self),
                Outcome::Accept {
                    attrs: None,
                    next_hop_self,
                } => ((*path.attrs).clone(), next_hop_self),
            };
        let policy_set_next_hop = attrs.next_hop != path.attrs.next_hop;
        let policy_set_med = attrs.med != path.attrs.med;
        let wants_self = target_ebgp
            || target.config.next_hop_self
            || policy_next_hop_self
            || path.source.is_local();
        if target_ebgp {
            attrs.as_path = attrs.as_path.without_confed();
            attrs.as_path.prepend(asn, 1);
            attrs.local_pref = None;
            if !path.source.is_local() && !policy_set_med {
                attrs.med = None;
            }
            attrs.originator_id = None;
            attrs.cluster_list.clear();
        } else {
            attrs.local_pref = Some(attrs.local_pref.unwrap_or(100));
            if reflecting {
                let from_id = from.and_then(|f| f.negotiated.as_ref()).map(|n| n.peer_id);
                if attrs.originator_id.is_none() {
                    attrs.originator_id = from_id;
                }
                attrs
                    .cluster_list
                    .insert(0, self.config.cluster_id.unwrap_or(self.config.router_id));
            }
        }
        // A next hop the neighbour cannot use is replaced by ours: an IPv6
        // next hop on an IPv4 route without RFC 8950 negotiated. A link-local
        // next hop only means something on its own link (RFC 2545).
        let unusable = match attrs.next_hop {
            Some(NextHop::V6 { .. }) if family.afi == AFI_IPV4 => {
                !negotiated.extended_next_hop.contains(&family)
            }
            Some(NextHop::V4(_)) if family.afi != AFI_IPV4 => true,
            _ => false,
        };
        if let Some(NextHop::V6 { link_local, .. }) = attrs.next_hop.as_mut() {
            *link_local = None;
        }
        if (wants_self && !policy_set_next_hop) || unusable || attrs.next_hop.is_none() {
            attrs.next_hop = Some(
                self.self_next_hop(id, family)
                    .ok_or(Refusal::NoNextHop(family))?,
            );
        }
        // Big attribute sets (long paths, many communities) may not fit
        // this neighbour's message size: such a route is not announced.
        let rough = attrs.as_path.asns().count() * 4
            + attrs.communities.len() * 4
            + attrs.large_communities.len() * 12
            + attrs.extended_communities.len() * 8
            + attrs.cluster_list.len() * 4
            + attrs
                .unknown
                .iter()
                .map(|u| u.value.len() + 4)
                .sum::<usize>();
        if rough > 2048 && !UpdateBuilder::new(negotiated_codec).fits(&attrs) {
            return Err(Refusal::TooBig);
        }
        Ok(attrs)
    }

    /// Our next hop towards neighbour `id` for routes of `family`.
    fn self_next_hop(&self, id: NeighborId, family: Family) -> Option<NextHop> {
        let n = &self.neighbors[id];
        let v4 = n.config.next_hop_ipv4.or(match n.local_address {
            Some(IpAddr::V4(a)) => Some(a),
            _ => None,
        });
        let v6 = n.config.next_hop_ipv6.or(match n.local_address {
            Some(IpAddr::V6(a)) => Some(a),
            _ => None,
        });
        let v6_hop = v6.map(|global| NextHop::V6 {
            global,
            link_local: None,
        });
        if family.afi == AFI_IPV4 {
            let extended = n
                .negotiated
                .as_ref()
                .is_some_and(|neg| neg.extended_next_hop.contains(&family));
            v4.map(NextHop::V4).or(if extended { v6_hop } else { None })
        } else {
            v6_hop
        }
    }

    /// Encodes every neighbour's pending changes into UPDATEs, frees the
    /// Loc-RIB slots nothing refers to any more, and drops attribute sets
    /// nothing uses once the interner has doubled.
    fn flush(&mut self) {
        for id in self.neighbors.ids() {
            self.flush_neighbor(id);
        }
        // A slot still pending for a neighbour (its send window is full)
        // keeps its prefix: released and reused, the withdrawal of what it
        // held would be lost. The others are freed.
        // Going through the emptied slots costs a look at each, so with
        // some held back that is done once their number has doubled.
        let neighbors = &self.neighbors;
        if neighbors.iter().all(|n| n.pending.is_empty()) {
            self.rib.release();
            self.release_at = 0;
        } else if self.rib.emptied() >= self.release_at {
            self.rib
                .release_except(|slot| neighbors.iter().any(|n| bit(&n.pending_mark, slot)));
            self.release_at = (self.rib.emptied() * 2).max(64 * 1024);
        }
        if self.interner.len() > self.gc_at {
            // Cached exports hold their source attributes.
            self.clear_export_caches();
            self.interner.collect_garbage();
            self.gc_at = (self.interner.len() * 2).max(4096);
        }
    }

    fn flush_neighbor(&mut self, id: NeighborId) {
        let n = &mut self.neighbors[id];
        if n.pending.is_empty() && n.eor_pending.is_empty() && n.eorr_pending.is_empty() {
            return;
        }
        let Some(codec) = n.negotiated.as_ref().map(|neg| neg.codec) else {
            n.pending.clear();
            n.pending_mark.clear();
            n.eor_pending.clear();
            n.eorr_pending.clear();
            return;
        };
        let window = self.send_window;
        if window.is_some_and(|w| n.in_flight >= w) {
            return; // the rest once the driver has written some
        }
        let pending = std::mem::take(&mut n.pending);
        n.pending_mark.clear();
        // In batches, so a million changes (a full table, or an upstream
        // going down) never sit encoded in memory at once; with a send
        // window, only as many as the connection takes: the rest waits
        // here as slot numbers (4 bytes a prefix), not as UPDATEs queued
        // for the socket.
        let mut batches = pending.chunks(FLUSH_BATCH);
        for batch in batches.by_ref() {
            self.flush_batch(id, codec, batch);
            let n = &mut self.neighbors[id];
            if n.export_cache.len() > EXPORT_CACHE_MAX {
                n.export_cache.clear();
            }
            if window.is_some_and(|w| n.in_flight >= w) {
                break;
            }
        }
        let rest: Vec<Slot> = batches.flatten().copied().collect();
        let n = &mut self.neighbors[id];
        if !rest.is_empty() {
            for &slot in &rest {
                set_bit(&mut n.pending_mark, slot, true);
            }
            n.pending = rest;
            return; // End-of-RIB after them
        }
        let mut bytes = Vec::new();
        let builder = UpdateBuilder::new(codec);
        for family in std::mem::take(&mut n.eor_pending) {
            builder.end_of_rib(&mut bytes, family);
        }
        if !bytes.is_empty() {
            n.session.send_bytes(bytes);
        }
        for family in std::mem::take(&mut n.eorr_pending) {
            let end = Message::RouteRefresh(RouteRefresh {
                family,
                subtype: RefreshSubtype::End,
            });
            n.session.send_message(&end);
        }
    }

    /// Encodes the UPDATEs for some pending slots of neighbour `id`.
    fn flush_batch(&mut self, id: NeighborId, codec: crate::wire::Codec, batch: &[Slot]) {
        let mut withdraw: HashMap<Family, Vec<IpNet>> = HashMap::new();
        // Announcements grouped by (family, attributes from the cache).
        let mut groups: Vec<(Family, Attrs, Vec<IpNet>)> = Vec::new();
        let mut group_of: HashMap<(Family, usize), usize> = HashMap::new();
        // The last best path's attributes and source, and the group its
        // export went to (None: not exported). Prefixes that changed
        // together mostly share their path (they came in one UPDATE), so
        // most slots need neither the export cache nor the group map.
        let mut last: Option<(*const PathAttributes, PathSource, Family, Option<usize>)> = None;
        let per_prefix = self.neighbors[id].config.export.depends_on_prefix();
        for &slot in batch {
            let Some((prefix, entry)) = self.rib.at(slot) else {
                continue;
            };
            let prefix = *prefix;
            let family = Family::of(&prefix);
            let best = entry.best();
            let key = best.map(|b| (Arc::as_ptr(&b.attrs), b.source, family));
            let memo = match (last, key) {
                (Some((a, s, f, group)), Some(k)) if (a, s, f) == k && !per_prefix => Some(group),
                _ => None,
            };
            let group = match memo {
                Some(group) => group,
                None => {
                    let best = best.cloned();
                    let new = best.and_then(|b| self.export_cached(id, prefix, &b));
                    let group = new.map(|attrs| {
                        *group_of
                            .entry((family, Arc::as_ptr(&attrs) as usize))
                            .or_insert_with(|| {
                                groups.push((family, attrs, Vec::new()));
                                groups.len() - 1
                            })
                    });
                    last = key.map(|(a, s, f)| (a, s, f, group));
                    group
                }
            };
            let n = &mut self.neighbors[id];
            let was = bit(&n.announced, slot);
            match group {
                Some(g) => {
                    if !was {
                        set_bit(&mut n.announced, slot, true);
                        n.exported += 1;
                    }
                    groups[g].2.push(prefix);
                }
                None if was => {
                    set_bit(&mut n.announced, slot, false);
                    n.exported -= 1;
                    withdraw.entry(family).or_default().push(prefix);
                }
                None => {}
            }
        }
        // Exports that are equal but not shared (an export policy that
        // matches prefixes makes each one afresh; different source sets can
        // export alike) go into one group: one hash of each distinct set.
        let mut by_value: HashMap<(Family, Attrs), Vec<IpNet>> = HashMap::new();
        for (family, attrs, prefixes) in groups {
            match by_value.entry((family, attrs)) {
                hashbrown::hash_map::Entry::Vacant(v) => {
                    v.insert(prefixes);
                }
                hashbrown::hash_map::Entry::Occupied(mut o) => o.get_mut().extend(prefixes),
            }
        }
        let builder = UpdateBuilder::new(codec);
        let n = &mut self.neighbors[id];
        let mut bytes = Vec::new();
        // Prefixes go out in the order they changed (no sort: 7% of the
        // speaker's time on a full table, for nothing a peer needs).
        for prefixes in withdraw.values() {
            n.counters.withdraws_sent += prefixes.len() as u64;
            builder.withdraw(&mut bytes, prefixes);
        }
        for ((_, attrs), prefixes) in &by_value {
            n.counters.updates_sent += prefixes.len() as u64;
            builder.announce(&mut bytes, attrs, prefixes);
        }
        if !bytes.is_empty() {
            n.in_flight += bytes.len();
            n.session.send_bytes(bytes);
        }
    }
}
