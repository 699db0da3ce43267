//! The best routes a policy takes, as a set of prefixes, for handing BGP's
//! view to something that is not a BGP neighbour: a border offers what it
//! learns to its WireGuard mesh as egress ranges (`[mesh] export`).
//!
//! Only routes learned from neighbours count (the border's own static,
//! connected or kernel routes are what it announces, not what it can
//! reach). The set is bounded: a policy that takes a full table must not
//! turn into a million WireGuard allowed IPs on every node; prefixes past
//! the limit are left out (a freed place goes to the next prefix taken, so
//! which ones depends on arrival order) and the refusals counted until the
//! set is rebuilt.

use std::collections::BTreeSet;
use std::sync::Arc;

use ipnet::IpNet;

use crate::policy::{Policy, RouteContext, RouteSource};
use crate::rib::{Path, PathSource};
use crate::speaker::{RouteChange, Speaker};

#[derive(Debug, Clone)]
pub struct ExportSet {
    policy: Arc<Policy>,
    limit: usize,
    prefixes: BTreeSet<IpNet>,
    /// Times a prefix the policy took did not fit, since the last rebuild.
    left_out: usize,
    changed: bool,
}

impl ExportSet {
    pub fn new(policy: Arc<Policy>, limit: usize) -> ExportSet {
        ExportSet {
            policy,
            limit,
            prefixes: BTreeSet::new(),
            left_out: 0,
            changed: true,
        }
    }

    /// Whether the best path `best` of `prefix` goes into the set.
    fn takes(&self, speaker: &Speaker, prefix: &IpNet, best: Option<&Path>) -> bool {
        let Some(best) = best else { return false };
        let PathSource::Neighbor(n) = best.source else {
            return false;
        };
        let ctx = RouteContext {
            prefix,
            neighbor: Some(speaker.neighbor_name(n)),
            source: RouteSource::Bgp,
            local_as: speaker.config().asn,
        };
        self.policy.evaluate(&ctx, &best.attrs).is_accept()
    }

    fn set(&mut self, prefix: IpNet, take: bool) {
        if take {
            if self.prefixes.contains(&prefix) {
                return;
            }
            if self.prefixes.len() >= self.limit {
                self.left_out += 1;
                return;
            }
            self.prefixes.insert(prefix);
            self.changed = true;
        } else if self.prefixes.remove(&prefix) {
            self.changed = true;
        }
    }

    /// A best-path change from [`crate::speaker::Event::Route`].
    pub fn route_changed(&mut self, speaker: &Speaker, change: &RouteChange) {
        let take = self.takes(speaker, &change.prefix, change.best.as_ref());
        self.set(change.prefix, take);
    }

    /// Starts over from the whole Loc-RIB (at start, and after the policy
    /// or the neighbours changed), with `policy` and `limit`.
    pub fn rebuild(&mut self, speaker: &Speaker, policy: Arc<Policy>, limit: usize) {
        self.policy = policy;
        self.limit = limit;
        let before = std::mem::take(&mut self.prefixes);
        self.left_out = 0;
        for (prefix, entry) in speaker.rib().iter() {
            let take = self.takes(speaker, prefix, entry.best());
            self.set(*prefix, take);
        }
        self.changed |= self.prefixes != before;
    }

    /// How many times a prefix the policy took did not fit under the limit
    /// (since the last rebuild).
    pub fn left_out(&self) -> usize {
        self.left_out
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub fn len(&self) -> usize {
        self.prefixes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prefixes.is_empty()
    }

    /// The set, sorted, if it changed since the last call.
    pub fn take_changed(&mut self) -> Option<Vec<IpNet>> {
        std::mem::take(&mut self.changed).then(|| self.prefixes.iter().copied().collect())
    }
}
