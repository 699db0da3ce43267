//! The BGP speaker: every neighbour's session, import and export through
//! policy, the Loc-RIB, and Adj-RIB-Out per neighbour, as one sans-IO
//! state machine. [`Speaker`] states the contract with its driver.
//!
//! By concern: `config` (what the speaker is told to be), `sessions`
//! (what a session coming up or going down does), `import` (UPDATEs and
//! ROUTE-REFRESH into the Loc-RIB), `export` (the Adj-RIB-Out, export
//! policy and the send window), `origination` (static, connected and
//! kernel routes), `next_hop` (resolution of next hops by the driver),
//! `graceful_restart` (RFC 4724, both sides), `upstream` (whether an
//! eBGP upstream is ready), `reconfigure` (a new configuration applied).

mod config;
mod export;
mod graceful_restart;
mod import;
mod next_hop;
mod origination;
mod reconfigure;
mod sessions;
mod upstream;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Instant;

use hashbrown::{HashMap, HashSet};
use ipnet::IpNet;

use crate::rib::{Attrs, Interner, LocRib, NeighborId, Path, PathSource, Slot, next_hop_address};
use crate::session::{ConnId, Negotiated, Session, State};
use crate::wire::{Codec, Decoded, Family, Notification};

pub use config::{
    MaxPrefixAction, MaxPrefixes, NeighborConfig, SpeakerConfig, StaticKind, StaticRoute,
};
pub use graceful_restart::RestartEnd;
pub use next_hop::NextHopState;
pub use upstream::Upstream;

use graceful_restart::OwnRestart;
use next_hop::{WatchedNextHop, source_info};

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
    /// border can then route to the outside, per family. Emitted on every
    /// change.
    UpstreamReady(Upstream),
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

/// The BGP speaker, sans IO: it never opens a socket, spawns a task or
/// reads a clock, and no call blocks. A driver owns the sockets and the
/// time, and talks to it as follows.
///
/// **Setting up.** [`Speaker::new`] with the configuration and the time;
/// before [`Speaker::start`], optionally [`set_send_window`],
/// [`set_route_events`], [`hold_origination`] and
/// [`begin_graceful_restart`].
///
/// **Inputs**, each with the current time `now`:
/// - connections: [`tcp_connected`] (an id the driver chose, unique among
///   its open connections, and our address on it), [`tcp_connect_failed`],
///   [`tcp_closed`];
/// - bytes: [`received`], or messages decoded off the speaker's thread
///   with [`codec`] and [`received_decoded`]; with a send window,
///   [`written`] as the socket takes what it was given;
/// - time: [`handle_timeout`] once [`poll_timeout`] is reached;
/// - the kernel, as the driver reads it: [`set_next_hop`] for each next
///   hop it was asked to watch, [`set_connected`], [`set_kernel_routes`],
///   [`end_of_rib_installed`] once the route changes before an
///   [`Event::EndOfRib`] are installed (at once without a kernel);
/// - BFD: [`bfd_down`];
/// - the operator: [`enable`], [`disable`], [`restart`], [`refresh`],
///   [`reconfigure`];
/// - the mesh behind a border: [`release_origination`] and
///   [`hold_origination`] again, as often as it goes healthy and not.
///
/// **Outputs.** [`poll_event`] hands out [`Event`]s in the order they
/// arose: open or close a connection, send bytes on one, a best-route
/// change, a next hop to watch or not, a neighbour's End-of-RIB, our
/// graceful restart over, the upstream ready or not, a log line.
/// [`poll_timeout`] says when [`handle_timeout`] is next due.
///
/// **Order.** After every input, take events with [`poll_event`] until it
/// returns None, carrying each out (which may feed inputs back: keep
/// polling); then ask [`poll_timeout`] again, since any input may move it,
/// and call [`handle_timeout`] when that time comes (calling it early does
/// no harm). `now` must be monotonic: never earlier than in a previous
/// call. A driver that feeds a virtual clock gets the same behaviour as
/// one on the wall clock, which is how the tests run speakers.
///
/// [`set_send_window`]: Speaker::set_send_window
/// [`set_route_events`]: Speaker::set_route_events
/// [`hold_origination`]: Speaker::hold_origination
/// [`begin_graceful_restart`]: Speaker::begin_graceful_restart
/// [`tcp_connected`]: Speaker::tcp_connected
/// [`tcp_connect_failed`]: Speaker::tcp_connect_failed
/// [`tcp_closed`]: Speaker::tcp_closed
/// [`received`]: Speaker::received
/// [`codec`]: Speaker::codec
/// [`received_decoded`]: Speaker::received_decoded
/// [`written`]: Speaker::written
/// [`handle_timeout`]: Speaker::handle_timeout
/// [`poll_timeout`]: Speaker::poll_timeout
/// [`set_next_hop`]: Speaker::set_next_hop
/// [`set_connected`]: Speaker::set_connected
/// [`set_kernel_routes`]: Speaker::set_kernel_routes
/// [`end_of_rib_installed`]: Speaker::end_of_rib_installed
/// [`bfd_down`]: Speaker::bfd_down
/// [`enable`]: Speaker::enable
/// [`disable`]: Speaker::disable
/// [`restart`]: Speaker::restart
/// [`refresh`]: Speaker::refresh
/// [`reconfigure`]: Speaker::reconfigure
/// [`release_origination`]: Speaker::release_origination
/// [`poll_event`]: Speaker::poll_event
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
    /// Static routes are out of the Loc-RIB until
    /// [`Speaker::release_origination`].
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
    upstream_ready: Upstream,
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
            upstream_ready: Upstream::default(),
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

    // ----- driver input ----------------------------------------------------

    /// The next thing for the driver to do or know; None when there is
    /// nothing more until the next input.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`Speaker::handle_timeout`] is next due (session timers,
    /// kept routes of a restarting neighbour, our own restart); None:
    /// nothing is timed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.neighbors
            .iter()
            .filter(|n| !n.removed)
            .flat_map(|n| [n.session.poll_timeout(), n.gr_deadline])
            .chain([self.own_restart.as_ref().map(|r| r.deadline)])
            .flatten()
            .min()
    }

    /// Runs what is due by `now`.
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

    // ----- Loc-RIB ---------------------------------------------------------------

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
                self.next_hop_moved(old_hop, new_hop);
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
}
