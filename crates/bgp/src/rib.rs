//! Loc-RIB: every usable path per prefix, the best one by RFC 4271 §9.1.2,
//! and the equal-cost set for multipath.
//!
//! Path attributes are interned: one `Arc` per distinct attribute set,
//! shared by every prefix that uses it, so a full table costs one pointer
//! per path for its attributes.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::IpNet;

use crate::wire::{NextHop, PathAttributes};

/// Interned path attributes.
pub type Attrs = Arc<PathAttributes>;

/// Hash-consing of attribute sets.
#[derive(Debug, Default)]
pub struct Interner {
    set: HashSet<Attrs>,
    lookups: u64,
    hits: u64,
}

impl Interner {
    pub fn intern(&mut self, attrs: PathAttributes) -> Attrs {
        self.lookups += 1;
        if let Some(existing) = self.set.get(&attrs) {
            self.hits += 1;
            return existing.clone();
        }
        let new = Arc::new(attrs);
        self.set.insert(new.clone());
        new
    }

    /// Forgets attribute sets no path uses any more.
    pub fn collect_garbage(&mut self) {
        self.set.retain(|a| Arc::strong_count(a) > 1);
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Share of lookups that found an existing set.
    pub fn hit_rate(&self) -> f64 {
        if self.lookups == 0 {
            0.0
        } else {
            self.hits as f64 / self.lookups as f64
        }
    }
}

/// Index of a neighbour in the speaker.
pub type NeighborId = usize;

/// Where a path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathSource {
    /// A `[[bgp.static]]` route (its index in the config).
    Static(u32),
    /// A prefix of one of our interfaces.
    Connected,
    /// A route learnt from the kernel's table (`[kernel] learn`).
    Kernel,
    Neighbor(NeighborId),
}

impl PathSource {
    /// Originated by this router (announced with our own next hop).
    pub fn is_local(self) -> bool {
        !matches!(self, PathSource::Neighbor(_))
    }

    /// Preferred over anything learnt by BGP, like a better administrative
    /// distance: our static routes and interfaces, not routes merely seen
    /// in the kernel (BIRD likewise ranks its kernel protocol below BGP).
    fn preferred(self) -> bool {
        matches!(self, PathSource::Static(_) | PathSource::Connected)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub source: PathSource,
    pub attrs: Attrs,
}

/// What best-path selection needs to know about a path beyond its
/// attributes: its neighbour and whether its next hop resolves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceInfo {
    pub ebgp: bool,
    pub router_id: Ipv4Addr,
    pub address: IpAddr,
    /// Cost to reach the next hop (0 when unknown: all equal).
    pub igp_cost: u32,
    /// Whether the next hop resolves.
    pub reachable: bool,
}

impl SourceInfo {
    /// For locally originated paths.
    pub const LOCAL: SourceInfo = SourceInfo {
        ebgp: false,
        router_id: Ipv4Addr::UNSPECIFIED,
        address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        igp_cost: 0,
        reachable: true,
    };
}

/// Knobs of best-path selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Selection {
    /// Compare MED between paths from different neighbour ASes.
    pub always_compare_med: bool,
    /// Keep the set of equally good paths for ECMP.
    pub multipath: bool,
}

/// One prefix's paths, the best first.
#[derive(Debug, Clone, Default)]
pub struct Entry {
    /// Every usable path; `paths[0]` is the best when `best` is true.
    paths: Vec<Path>,
    /// How many of the first paths form the ECMP set (0 = no best).
    ecmp: usize,
}

impl Entry {
    pub fn paths(&self) -> &[Path] {
        &self.paths
    }

    pub fn best(&self) -> Option<&Path> {
        (self.ecmp > 0).then(|| &self.paths[0])
    }

    /// The best path and those equal to it for multipath.
    pub fn multipath(&self) -> &[Path] {
        &self.paths[..self.ecmp]
    }
}

/// How a prefix's selection changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BestChange {
    pub prefix: IpNet,
    pub best: Option<Path>,
    /// Best first; more than one with multipath.
    pub multipath: Vec<Path>,
    /// The best path itself changed (not only the ECMP set): neighbours
    /// need an UPDATE.
    pub best_changed: bool,
}

#[derive(Debug, Default)]
pub struct LocRib {
    routes: HashMap<IpNet, Entry>,
    selection: Selection,
}

impl LocRib {
    pub fn new(selection: Selection) -> Self {
        LocRib {
            routes: HashMap::new(),
            selection,
        }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    pub fn set_selection(&mut self, selection: Selection) {
        self.selection = selection;
    }

    pub fn get(&self, prefix: &IpNet) -> Option<&Entry> {
        self.routes.get(prefix)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpNet, &Entry)> {
        self.routes.iter()
    }

    /// Sets (or with `None` removes) the path from `source` for `prefix`,
    /// reselects, and says what changed.
    pub fn update(
        &mut self,
        prefix: IpNet,
        source: PathSource,
        attrs: Option<Attrs>,
        info: &impl Fn(&Path) -> SourceInfo,
    ) -> Option<BestChange> {
        let entry = match (self.routes.get_mut(&prefix), &attrs) {
            (Some(e), _) => e,
            (None, None) => return None,
            (None, Some(_)) => self.routes.entry(prefix).or_default(),
        };
        let old_best = entry.best().cloned();
        let old_ecmp: Vec<Path> = entry.multipath().to_vec();
        let existing = entry.paths.iter().position(|p| p.source == source);
        match (existing, attrs) {
            (Some(i), Some(attrs)) => {
                if Arc::ptr_eq(&entry.paths[i].attrs, &attrs) {
                    return None;
                }
                entry.paths[i].attrs = attrs;
            }
            (Some(i), None) => {
                entry.paths.remove(i);
            }
            (None, Some(attrs)) => entry.paths.push(Path { source, attrs }),
            (None, None) => return None,
        }
        select(entry, self.selection, info);
        let new_best = entry.best().cloned();
        let multipath = entry.multipath().to_vec();
        if entry.paths.is_empty() {
            self.routes.remove(&prefix);
        }
        let best_changed = old_best != new_best;
        (best_changed || old_ecmp != multipath).then_some(BestChange {
            prefix,
            best: new_best,
            multipath,
            best_changed,
        })
    }

    /// Reselects every prefix (after a change of the selection knobs);
    /// returns the changes.
    pub fn reselect_all(&mut self, info: &impl Fn(&Path) -> SourceInfo) -> Vec<BestChange> {
        let prefixes: Vec<IpNet> = self.routes.keys().copied().collect();
        prefixes
            .into_iter()
            .filter_map(|p| self.reselect(p, info))
            .collect()
    }

    /// Reselects one prefix (after a change of its next hops' state).
    pub fn reselect(
        &mut self,
        prefix: IpNet,
        info: &impl Fn(&Path) -> SourceInfo,
    ) -> Option<BestChange> {
        let entry = self.routes.get_mut(&prefix)?;
        let old_best = entry.best().cloned();
        let old_ecmp_len = entry.ecmp;
        let old_first: Vec<PathSource> = entry.multipath().iter().map(|p| p.source).collect();
        select(entry, self.selection, info);
        let best = entry.best().cloned();
        let same_set =
            entry.ecmp == old_ecmp_len && entry.multipath().iter().map(|p| p.source).eq(old_first);
        if best == old_best && same_set {
            return None;
        }
        Some(BestChange {
            prefix,
            best_changed: best != old_best,
            best,
            multipath: entry.multipath().to_vec(),
        })
    }
}

/// Orders `entry.paths` best first and counts the ECMP set.
fn select(entry: &mut Entry, selection: Selection, info: &impl Fn(&Path) -> SourceInfo) {
    // Linear scan for the best: MED comparison is not transitive, so no
    // sort (a sort may panic on an inconsistent order).
    let mut best: Option<usize> = None;
    for i in 0..entry.paths.len() {
        if !info(&entry.paths[i]).reachable {
            continue;
        }
        best = match best {
            None => Some(i),
            Some(b) => {
                let better =
                    compare(&entry.paths[i], &entry.paths[b], selection, info) == Ordering::Less;
                Some(if better { i } else { b })
            }
        };
    }
    let Some(b) = best else {
        entry.ecmp = 0;
        return;
    };
    entry.paths.swap(0, b);
    let mut n = 1;
    if selection.multipath {
        for i in 1..entry.paths.len() {
            let p = &entry.paths[i];
            if info(p).reachable && multipath_equal(&entry.paths[0], p, selection, info) {
                entry.paths.swap(n, i);
                n += 1;
            }
        }
    }
    entry.ecmp = n;
}

fn local_pref(p: &Path) -> u32 {
    p.attrs.local_pref.unwrap_or(100)
}

/// Steps of RFC 4271 §9.1.2.2 up to (and including) the IGP cost: paths
/// equal here may share traffic.
fn compare_up_to_igp(
    a: &Path,
    b: &Path,
    selection: Selection,
    info: &impl Fn(&Path) -> SourceInfo,
) -> Ordering {
    let (ia, ib) = (info(a), info(b));
    // Our own routes first (like a higher administrative preference).
    b.source
        .preferred()
        .cmp(&a.source.preferred())
        .then_with(|| local_pref(b).cmp(&local_pref(a)))
        .then_with(|| {
            a.attrs
                .as_path
                .hop_count()
                .cmp(&b.attrs.as_path.hop_count())
        })
        .then_with(|| a.attrs.origin.cmp(&b.attrs.origin))
        .then_with(|| {
            let same_as = a.attrs.as_path.first_as() == b.attrs.as_path.first_as();
            if same_as || selection.always_compare_med {
                a.attrs.med.unwrap_or(0).cmp(&b.attrs.med.unwrap_or(0))
            } else {
                Ordering::Equal
            }
        })
        .then_with(|| ib.ebgp.cmp(&ia.ebgp))
        .then_with(|| ia.igp_cost.cmp(&ib.igp_cost))
}

fn compare(
    a: &Path,
    b: &Path,
    selection: Selection,
    info: &impl Fn(&Path) -> SourceInfo,
) -> Ordering {
    let (ia, ib) = (info(a), info(b));
    // A reflected path is identified by its ORIGINATOR_ID (RFC 4456 §9).
    let id = |p: &Path, i: SourceInfo| u32::from(p.attrs.originator_id.unwrap_or(i.router_id));
    compare_up_to_igp(a, b, selection, info)
        .then_with(|| a.attrs.cluster_list.len().cmp(&b.attrs.cluster_list.len()))
        .then_with(|| id(a, ia).cmp(&id(b, ib)))
        .then_with(|| ia.address.cmp(&ib.address))
        .then_with(|| a.source.cmp(&b.source))
}

/// Whether `p` may share traffic with the best path: equal up to the IGP
/// cost, from BGP, with another next hop.
fn multipath_equal(
    best: &Path,
    p: &Path,
    selection: Selection,
    info: &impl Fn(&Path) -> SourceInfo,
) -> bool {
    !best.source.is_local()
        && !p.source.is_local()
        && compare_up_to_igp(best, p, selection, info) == Ordering::Equal
        && best.attrs.next_hop != p.attrs.next_hop
}

/// The address a path forwards to.
pub fn next_hop_address(hop: &NextHop) -> IpAddr {
    match hop {
        NextHop::V4(a) => IpAddr::V4(*a),
        NextHop::V6 {
            link_local: Some(ll),
            ..
        } => IpAddr::V6(*ll),
        NextHop::V6 { global, .. } => IpAddr::V6(*global),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{AsPath, Origin};

    fn net(s: &str) -> IpNet {
        s.parse().expect("prefix")
    }

    fn attrs(
        i: &mut Interner,
        path: &[u32],
        hop: [u8; 4],
        f: impl FnOnce(&mut PathAttributes),
    ) -> Attrs {
        let mut a = PathAttributes {
            as_path: AsPath::sequence(path.iter().copied()),
            next_hop: Some(NextHop::V4(Ipv4Addr::from(hop))),
            ..PathAttributes::default()
        };
        f(&mut a);
        i.intern(a)
    }

    /// Neighbours 0..: eBGP, router id 10.0.0.(n+1); neighbour 9 is iBGP.
    fn info(p: &Path) -> SourceInfo {
        match p.source {
            PathSource::Neighbor(n) => SourceInfo {
                ebgp: n != 9,
                router_id: Ipv4Addr::new(10, 0, 0, n as u8 + 1),
                address: IpAddr::V4(Ipv4Addr::new(172, 16, 0, n as u8 + 1)),
                igp_cost: 0,
                reachable: true,
            },
            _ => SourceInfo::LOCAL,
        }
    }

    fn best_source(rib: &LocRib, p: &str) -> Option<PathSource> {
        rib.get(&net(p)).and_then(|e| e.best()).map(|b| b.source)
    }

    #[test]
    fn selection_follows_rfc_4271_step_by_step() {
        let mut i = Interner::default();
        let mut rib = LocRib::new(Selection::default());
        let p = net("192.0.2.0/24");
        let n = PathSource::Neighbor;
        // Longer AS path loses.
        rib.update(
            p,
            n(0),
            Some(attrs(&mut i, &[65001, 65010], [10, 0, 0, 1], |_| {})),
            &info,
        );
        rib.update(
            p,
            n(1),
            Some(attrs(&mut i, &[65002], [10, 0, 0, 2], |_| {})),
            &info,
        );
        assert_eq!(best_source(&rib, "192.0.2.0/24"), Some(n(1)));
        // Higher local-pref beats a shorter path.
        rib.update(
            p,
            n(0),
            Some(attrs(&mut i, &[65001, 65010], [10, 0, 0, 1], |a| {
                a.local_pref = Some(200)
            })),
            &info,
        );
        assert_eq!(best_source(&rib, "192.0.2.0/24"), Some(n(0)));
        // Withdrawing the preferred path falls back to the other.
        let change = rib.update(p, n(0), None, &info).expect("best changes");
        assert_eq!(change.best.map(|b| b.source), Some(n(1)));
        // Origin IGP beats incomplete.
        rib.update(
            p,
            n(2),
            Some(attrs(&mut i, &[65003], [10, 0, 0, 3], |a| {
                a.origin = Origin::Incomplete
            })),
            &info,
        );
        assert_eq!(best_source(&rib, "192.0.2.0/24"), Some(n(1)));
        // A static route beats everything learned.
        rib.update(
            p,
            PathSource::Static(0),
            Some(i.intern(PathAttributes::default())),
            &info,
        );
        assert_eq!(
            best_source(&rib, "192.0.2.0/24"),
            Some(PathSource::Static(0))
        );
    }

    #[test]
    fn med_is_compared_within_one_neighbour_as_unless_always_compare() {
        let mut i = Interner::default();
        let p = net("198.51.100.0/24");
        let n = PathSource::Neighbor;
        for (always, expected) in [(false, n(0)), (true, n(1))] {
            let mut rib = LocRib::new(Selection {
                always_compare_med: always,
                multipath: false,
            });
            // Different neighbour ASes: MED ignored, then the lowest router id wins.
            rib.update(
                p,
                n(0),
                Some(attrs(&mut i, &[65001], [10, 0, 0, 1], |a| a.med = Some(50))),
                &info,
            );
            rib.update(
                p,
                n(1),
                Some(attrs(&mut i, &[65002], [10, 0, 0, 2], |a| a.med = Some(10))),
                &info,
            );
            assert_eq!(
                best_source(&rib, "198.51.100.0/24"),
                Some(expected),
                "always_compare_med = {always}"
            );
        }
        let mut rib = LocRib::new(Selection::default());
        rib.update(
            p,
            n(0),
            Some(attrs(&mut i, &[65001], [10, 0, 0, 1], |a| a.med = Some(50))),
            &info,
        );
        rib.update(
            p,
            n(1),
            Some(attrs(&mut i, &[65001], [10, 0, 0, 2], |a| a.med = Some(10))),
            &info,
        );
        assert_eq!(
            best_source(&rib, "198.51.100.0/24"),
            Some(n(1)),
            "same AS: lower MED wins"
        );
    }

    #[test]
    fn ebgp_beats_ibgp_and_unreachable_next_hops_are_skipped() {
        let mut i = Interner::default();
        let mut rib = LocRib::new(Selection::default());
        let p = net("203.0.113.0/24");
        let n = PathSource::Neighbor;
        rib.update(
            p,
            n(9),
            Some(attrs(&mut i, &[65001], [10, 0, 0, 9], |_| {})),
            &info,
        );
        rib.update(
            p,
            n(3),
            Some(attrs(&mut i, &[65001], [10, 0, 0, 4], |_| {})),
            &info,
        );
        assert_eq!(best_source(&rib, "203.0.113.0/24"), Some(n(3)));
        let unreachable = |p: &Path| SourceInfo {
            reachable: p.source != n(3),
            ..info(p)
        };
        let changes = rib.reselect_all(&unreachable);
        assert_eq!(changes.len(), 1);
        assert_eq!(best_source(&rib, "203.0.113.0/24"), Some(n(9)));
    }

    #[test]
    fn multipath_groups_equal_paths_with_different_next_hops() {
        let mut i = Interner::default();
        let mut rib = LocRib::new(Selection {
            multipath: true,
            always_compare_med: false,
        });
        let vip = net("192.168.20.0/24");
        let n = PathSource::Neighbor;
        rib.update(
            vip,
            n(0),
            Some(attrs(&mut i, &[65000], [10, 0, 5, 1], |_| {})),
            &info,
        );
        let change = rib
            .update(
                vip,
                n(1),
                Some(attrs(&mut i, &[65000], [10, 0, 7, 1], |_| {})),
                &info,
            )
            .expect("the ECMP set grows");
        assert_eq!(change.multipath.len(), 2);
        assert!(!change.best_changed, "the best path itself stays");
        // A longer path is not equal.
        rib.update(
            vip,
            n(2),
            Some(attrs(&mut i, &[65003, 65000], [10, 0, 8, 1], |_| {})),
            &info,
        );
        assert_eq!(rib.get(&vip).map(|e| e.multipath().len()), Some(2));
        // One server dies: one next hop remains.
        let change = rib.update(vip, n(0), None, &info).expect("changes");
        assert_eq!(change.multipath.len(), 1);
        assert_eq!(change.best.map(|b| b.source), Some(n(1)));
    }

    #[test]
    fn interning_shares_equal_attribute_sets() {
        let mut i = Interner::default();
        let a = attrs(&mut i, &[65001], [10, 0, 0, 1], |_| {});
        let b = attrs(&mut i, &[65001], [10, 0, 0, 1], |_| {});
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(i.len(), 1);
        assert!((i.hit_rate() - 0.5).abs() < 1e-9);
        drop((a, b));
        i.collect_garbage();
        assert!(i.is_empty());
    }

    #[test]
    fn removing_the_last_path_removes_the_prefix() {
        let mut i = Interner::default();
        let mut rib = LocRib::new(Selection::default());
        let p = net("192.0.2.0/24");
        rib.update(
            p,
            PathSource::Neighbor(0),
            Some(attrs(&mut i, &[65001], [10, 0, 0, 1], |_| {})),
            &info,
        );
        assert_eq!(rib.len(), 1);
        let change = rib
            .update(p, PathSource::Neighbor(0), None, &info)
            .expect("withdrawn");
        assert_eq!(change.best, None);
        assert!(rib.is_empty());
        assert_eq!(
            rib.update(p, PathSource::Neighbor(0), None, &info),
            None,
            "nothing to withdraw"
        );
    }
}
