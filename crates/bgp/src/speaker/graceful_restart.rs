//! Graceful restart (RFC 4724), both sides. As the helper, a neighbour's
//! routes stay (stale) while it restarts, and go at its End-of-RIB or
//! when its restart time passes; the session side of that is in
//! `sessions`. As the restarting router, our OPENs carry the R and F
//! bits, and the forwarding state kept from before the restart is
//! declared stale ([`Event::GracefulRestartOver`]) once every
//! graceful-restart neighbour sent End-of-RIB, or the longest restart
//! time passed.

use std::time::{Duration, Instant};

use hashbrown::HashSet;

use super::{Event, Level, Speaker};
use crate::rib::NeighborId;
use crate::session::Negotiated;
use crate::wire::Family;

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
pub(super) struct OwnRestart {
    /// The (neighbour name, family) End-of-RIBs still awaited.
    pub(super) waiting: HashSet<(String, Family)>,
    /// When we stop waiting.
    pub(super) deadline: Instant,
}

impl Speaker {
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

    pub(super) fn end_own_restart(&mut self, why: RestartEnd) {
        if self.own_restart.take().is_some() {
            self.events.push_back(Event::GracefulRestartOver(why));
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

    /// Withdraws what is still stale of a restarted neighbour's `family`
    /// (all families with None).
    pub(super) fn flush_gr_stale(&mut self, id: NeighborId, family: Option<Family>) {
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

    /// A neighbour whose routes we kept is back from its restart:
    /// families whose forwarding state it did not keep (no F bit, or no
    /// capability) go now; the others wait for its End-of-RIB.
    pub(super) fn peer_restarted(&mut self, now: Instant, id: NeighborId, negotiated: &Negotiated) {
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
}
