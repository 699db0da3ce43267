//! A new configuration applied without touching what did not change.

use std::time::{Duration, Instant};

use super::{Level, NeighborConfig, Speaker, SpeakerConfig};
use crate::rib::{NeighborId, PathSource};
use crate::wire::{Notification, cease, error_code};

impl Speaker {
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
}
