//! Import: UPDATEs and ROUTE-REFRESH from a neighbour into the Loc-RIB,
//! through loop checks, import policy and the prefix limit.

use std::time::Instant;

use hashbrown::HashSet;
use ipnet::IpNet;

use super::export::{bit, set_bit};
use super::{Event, Level, MaxPrefixAction, RestartEnd, Speaker};
use crate::policy::{Outcome, RouteContext, RouteSource};
use crate::rib::{Attrs, NeighborId, PathSource};
use crate::wire::{
    AFI_IPV4, DecodedUpdate, Family, Message, Notification, PathAttributes, RefreshSubtype,
    RouteRefresh, cease, error_code,
};

impl Speaker {
    pub(super) fn on_update(&mut self, now: Instant, id: NeighborId, update: DecodedUpdate) {
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
    pub(super) fn unimport(&mut self, id: NeighborId, prefix: IpNet) {
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

    pub(super) fn on_route_refresh(&mut self, id: NeighborId, rr: RouteRefresh) {
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

    pub(super) fn refresh_in(&mut self, id: NeighborId) {
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
}
