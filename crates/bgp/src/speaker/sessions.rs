//! What the sessions' outputs do to the speaker: connections and bytes
//! for the driver, a session coming up (the initial dump of our routes)
//! or going down (its routes withdrawn, or kept for a graceful restart).

use std::time::{Duration, Instant};

use super::{Event, Level, Speaker};
use crate::rib::{NeighborId, Path, PathSource, Slot};
use crate::session::{Negotiated, Output};
use crate::wire::Family;

impl Speaker {
    pub(super) fn drain_sessions(&mut self, now: Instant) {
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

    pub(super) fn log(&mut self, neighbor: Option<NeighborId>, level: Level, message: String) {
        self.events.push_back(Event::Log {
            neighbor,
            level,
            message,
        });
    }

    fn on_established(&mut self, now: Instant, id: NeighborId, negotiated: Negotiated) {
        if !self.neighbors[id].gr_stale.is_empty() {
            self.peer_restarted(now, id, &negotiated);
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

    pub(super) fn clear_export_caches(&mut self) {
        for n in self.neighbors.iter_mut() {
            n.export_cache.clear();
        }
    }
}
