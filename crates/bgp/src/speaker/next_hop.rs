//! Next hops: which ones the driver resolves, and how their state (from
//! the kernel) weighs in best-path selection.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use hashbrown::HashMap;
use ipnet::IpNet;

use super::{Event, Level, Neighbors, Speaker};
use crate::rib::{Path, PathSource, SourceInfo, next_hop_address};

/// How the driver resolved a next hop (in the kernel's routing table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHopState {
    pub reachable: bool,
    /// Metric of the route that reaches it (compared as the IGP cost).
    pub cost: u32,
}

#[derive(Debug, Default)]
pub(super) struct WatchedNextHop {
    /// How many paths go through it (the prefixes are found by a scan of
    /// the Loc-RIB when its state changes, which is rare).
    pub(super) paths: u32,
    /// None until the driver reports: assumed reachable meanwhile.
    pub(super) state: Option<NextHopState>,
}

/// What an unresolved next hop is taken to be.
pub(super) const ASSUMED: NextHopState = NextHopState {
    reachable: true,
    cost: 0,
};

pub(super) fn source_info(
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

impl Speaker {
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

    /// A path moved from next hop `old` to `new` (either None: the path
    /// came or went): the driver watches a next hop while paths use it.
    pub(super) fn next_hop_moved(&mut self, old: Option<IpAddr>, new: Option<IpAddr>) {
        if let Some(addr) = new {
            let watched = self.next_hops.entry(addr).or_default();
            if watched.paths == 0 {
                self.events.push_back(Event::WatchNextHop(addr));
            }
            watched.paths += 1;
        }
        if let Some(addr) = old
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
