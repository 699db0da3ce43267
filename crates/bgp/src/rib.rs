//! Loc-RIB: every usable path per prefix, the best one by RFC 4271 §9.1.2,
//! and the equal-cost set for multipath.
//!
//! Path attributes are interned: one `Arc` per distinct attribute set,
//! shared by every prefix that uses it, so a full table costs one pointer
//! per path for its attributes.

use std::cmp::Ordering;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashTable};
use ipnet::IpNet;

use crate::wire::{NextHop, PathAttributes};

/// Interned path attributes.
pub type Attrs = Arc<PathAttributes>;

/// Hash-consing of attribute sets. Each set's hash is kept beside it, so
/// growing the table never hashes a set again (a million-route load grows
/// it 17 times: rehashing was 5% of the load).
#[derive(Debug, Default)]
pub struct Interner {
    set: HashTable<(u64, Attrs)>,
    hasher: DefaultHashBuilder,
    lookups: u64,
    hits: u64,
}

impl Interner {
    pub fn intern(&mut self, attrs: PathAttributes) -> Attrs {
        self.lookups += 1;
        let hash = self.hasher.hash_one(&attrs);
        if let Some((_, existing)) = self.set.find(hash, |(h, a)| *h == hash && **a == attrs) {
            self.hits += 1;
            return existing.clone();
        }
        // Kept as a copy: the decoder's vectors have room to spare, and
        // a set is kept as long as a route uses it (the copy's vectors are
        // exactly their length: 7 MB less peak on a full table).
        let new = Arc::new(attrs.clone());
        drop(attrs);
        self.set
            .insert_unique(hash, (hash, new.clone()), |(h, _)| *h);
        new
    }

    /// Forgets attribute sets no path uses any more.
    pub fn collect_garbage(&mut self) {
        self.set.retain(|(_, a)| Arc::strong_count(a) > 1);
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Bytes the interned sets take on the heap: each set (with its `Arc`
    /// counts) and the vectors it owns, by capacity, plus the hash set.
    pub fn heap_bytes(&self) -> usize {
        let sets: usize = self.set.iter().map(|(_, a)| attrs_heap_bytes(a)).sum();
        sets + self.set.capacity() * (std::mem::size_of::<(u64, Attrs)>() + 1)
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

/// One attribute set's heap bytes: the set behind its `Arc` (two counts)
/// and the vectors it owns, by capacity.
pub fn attrs_heap_bytes(a: &PathAttributes) -> usize {
    fn cap<T>(v: &Vec<T>) -> usize {
        v.capacity() * std::mem::size_of::<T>()
    }
    16 + std::mem::size_of::<PathAttributes>()
        + cap(&a.as_path.segments)
        + a.as_path
            .segments
            .iter()
            .map(|s| cap(&s.asns))
            .sum::<usize>()
        + cap(&a.communities)
        + cap(&a.extended_communities)
        + cap(&a.large_communities)
        + cap(&a.cluster_list)
        + cap(&a.unknown)
        + a.unknown.iter().map(|u| cap(&u.value)).sum::<usize>()
}

/// A neighbour of the speaker: its place in the speaker's list of
/// neighbours, which a neighbour keeps while the speaker lives (a removed
/// neighbour's place is not reused). 32 bits, so a path takes 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NeighborId(pub u32);

impl NeighborId {
    /// The place in a list of neighbours.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The neighbour at `index` of a list (which never holds 2^32).
    pub fn from_index(index: usize) -> NeighborId {
        NeighborId(index as u32)
    }
}

impl std::fmt::Display for NeighborId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PathSource {
    /// A `[[bgp.static]]` route (its index in the config).
    Static(u32),
    /// A prefix of one of our interfaces.
    Connected,
    /// A route learnt from the kernel's table (`[kernel] learn`).
    Kernel,
    /// A neighbour (in 32 bits, so a path takes 16 bytes: it is stored
    /// for every prefix).
    Neighbor(NeighborId),
}

impl PathSource {
    pub fn neighbor(id: NeighborId) -> PathSource {
        PathSource::Neighbor(id)
    }

    /// The neighbour of a path learnt by BGP.
    pub fn neighbor_id(self) -> Option<NeighborId> {
        match self {
            PathSource::Neighbor(n) => Some(n),
            _ => None,
        }
    }

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
    /// Every usable path; the first is the best when the ECMP count is
    /// above 0.
    paths: Paths,
}

/// A prefix's paths with the size of the ECMP set (0: no best path).
/// Almost always one path, kept inline: 24 bytes, no allocation.
#[derive(Debug, Clone, Default)]
enum Paths {
    #[default]
    None,
    One {
        path: Path,
        best: bool,
    },
    Many {
        paths: Box<[Path]>,
        ecmp: u32,
    },
}

impl Paths {
    fn as_slice(&self) -> &[Path] {
        match self {
            Paths::None => &[],
            Paths::One { path, .. } => std::slice::from_ref(path),
            Paths::Many { paths, .. } => paths,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Path] {
        match self {
            Paths::None => &mut [],
            Paths::One { path, .. } => std::slice::from_mut(path),
            Paths::Many { paths, .. } => paths,
        }
    }

    fn ecmp(&self) -> u32 {
        match self {
            Paths::None => 0,
            Paths::One { best, .. } => u32::from(*best),
            Paths::Many { ecmp, .. } => *ecmp,
        }
    }

    fn set_ecmp(&mut self, n: u32) {
        match self {
            Paths::None => {}
            Paths::One { best, .. } => *best = n > 0,
            Paths::Many { ecmp, .. } => *ecmp = n,
        }
    }

    fn push(&mut self, path: Path) {
        *self = match std::mem::take(self) {
            Paths::None => Paths::One { path, best: false },
            Paths::One { path: first, best } => Paths::Many {
                paths: vec![first, path].into_boxed_slice(),
                ecmp: u32::from(best),
            },
            Paths::Many { paths, ecmp } => {
                let mut v = paths.into_vec();
                v.push(path);
                Paths::Many {
                    paths: v.into_boxed_slice(),
                    ecmp,
                }
            }
        };
    }

    /// Removes path `i` (the ECMP count is for the caller to set again).
    fn remove(&mut self, i: usize) -> Option<Path> {
        match std::mem::take(self) {
            Paths::None => None,
            Paths::One { path, .. } => Some(path),
            Paths::Many { paths, ecmp } => {
                let mut v = paths.into_vec();
                let gone = (i < v.len()).then(|| v.remove(i));
                *self = match v.len() {
                    0 => Paths::None,
                    1 => Paths::One {
                        path: v.remove(0),
                        best: false,
                    },
                    _ => Paths::Many {
                        paths: v.into_boxed_slice(),
                        ecmp,
                    },
                };
                gone
            }
        }
    }
}

impl Entry {
    pub fn paths(&self) -> &[Path] {
        self.paths.as_slice()
    }

    pub fn best(&self) -> Option<&Path> {
        (self.paths.ecmp() > 0).then(|| &self.paths()[0])
    }

    /// The best path and those equal to it for multipath.
    pub fn multipath(&self) -> &[Path] {
        &self.paths()[..self.paths.ecmp() as usize]
    }

    fn is_empty(&self) -> bool {
        matches!(self.paths, Paths::None)
    }
}

/// How a prefix's selection changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BestChange {
    pub prefix: IpNet,
    /// Where the prefix lives in the Loc-RIB (see [`LocRib::slot`]).
    pub slot: Slot,
    pub best: Option<Path>,
    /// Best first; more than one with multipath (empty after
    /// `set_report_multipath(false)`).
    pub multipath: Vec<Path>,
    /// The best path itself changed (not only the ECMP set): neighbours
    /// need an UPDATE.
    pub best_changed: bool,
}

/// What [`LocRib::update`] did.
#[derive(Debug, Clone, Default)]
pub struct RibUpdate {
    /// The attributes the source's path had before (None: it had none).
    pub old: Option<Attrs>,
    pub change: Option<BestChange>,
}

/// A prefix's place in the Loc-RIB: stable while the prefix has paths, and
/// until [`LocRib::release`] after it lost its last one, so per-neighbour
/// tables can be plain vectors indexed by slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot(pub u32);

impl Slot {
    /// The place in a per-slot vector.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

#[derive(Debug, Clone)]
struct SlotEntry {
    prefix: IpNet,
    entry: Entry,
}

/// A vector grown in fixed chunks: a full table never reallocates (and so
/// never holds the old and the new copy at once, which would be the peak
/// memory of the whole load).
#[derive(Debug)]
struct Chunked<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

const CHUNK: usize = 1 << 15;

impl<T> Default for Chunked<T> {
    fn default() -> Self {
        Chunked {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Chunked<T> {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, value: T) {
        if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        if let Some(last) = self.chunks.last_mut() {
            last.push(value);
            self.len += 1;
        }
    }

    fn get(&self, i: usize) -> Option<&T> {
        self.chunks.get(i / CHUNK)?.get(i % CHUNK)
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.chunks.get_mut(i / CHUNK)?.get_mut(i % CHUNK)
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }
}

impl<T> std::ops::Index<usize> for Chunked<T> {
    type Output = T;
    fn index(&self, i: usize) -> &T {
        &self.chunks[i / CHUNK][i % CHUNK]
    }
}

impl<T> std::ops::IndexMut<usize> for Chunked<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        &mut self.chunks[i / CHUNK][i % CHUNK]
    }
}

/// The most prefixes a Loc-RIB holds (2^27, a hundred full tables): an
/// index entry is a slot number in 27 bits and 5 more bits of the
/// prefix's hash.
pub const MAX_PREFIXES: usize = 1 << SLOT_BITS;
const SLOT_BITS: u32 = 27;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;

/// An index entry: a slot and 5 bits of its prefix's hash, compared before
/// the slot is read. hashbrown's 7-bit tag alone let 1 in 128 entries on
/// the way match, and each such match read a cold slot (a cache miss of
/// 5% of a full table's load); with 5 more bits it is 1 in 4096.
type IndexEntry = u32;

fn index_entry(slot: Slot, hash: u64) -> IndexEntry {
    slot.0 | (check_bits(hash) << SLOT_BITS)
}

/// The hash bits in an index entry: below hashbrown's tag (the top 7) and
/// above any bucket number (the low 52).
fn check_bits(hash: u64) -> u32 {
    ((hash >> 52) & 0x1f) as u32
}

fn entry_slot(entry: IndexEntry) -> Slot {
    Slot(entry & SLOT_MASK)
}

/// Every prefix's paths. Prefixes live in a vector of slots; a hash table
/// of slot numbers (4 bytes a prefix, hashed by the slot's prefix) finds
/// them.
#[derive(Debug, Default)]
pub struct LocRib {
    index: HashTable<IndexEntry>,
    hasher: DefaultHashBuilder,
    slots: Chunked<SlotEntry>,
    /// Slots free for new prefixes.
    free: Vec<Slot>,
    /// Slots that lost their last path since the last `release`.
    emptied: Vec<Slot>,
    /// The slots in `emptied`, each listed once.
    emptied_mark: Vec<u64>,
    len: usize,
    selection: Selection,
    /// Whether [`BestChange::multipath`] is filled in (an allocation per
    /// change, wasted when nobody installs routes).
    skip_multipath: bool,
    /// New prefixes turned away with [`MAX_PREFIXES`] in the table.
    refused: u64,
}

impl LocRib {
    pub fn new(selection: Selection) -> Self {
        LocRib {
            selection,
            ..LocRib::default()
        }
    }

    /// Leaves [`BestChange::multipath`] empty (`false`) or fills it in.
    pub fn set_report_multipath(&mut self, on: bool) {
        self.skip_multipath = !on;
    }

    /// Prefixes with at least one path.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Heap bytes of the Loc-RIB: the slots (by capacity), the paths of
    /// prefixes with more than one, and the index. Attribute sets are the
    /// interner's.
    pub fn heap_bytes(&self) -> (usize, usize) {
        let slots = self.slots.chunks.iter().map(Vec::capacity).sum::<usize>()
            * std::mem::size_of::<SlotEntry>()
            + self
                .slots
                .iter()
                .map(|s| match &s.entry.paths {
                    Paths::Many { paths, .. } => std::mem::size_of_val(&**paths),
                    _ => 0,
                })
                .sum::<usize>()
            + self.free.capacity() * 4;
        let index = self.index.capacity() * (std::mem::size_of::<IndexEntry>() + 1);
        (slots, index)
    }

    /// One past the highest slot in use: the size of per-slot tables.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    pub fn set_selection(&mut self, selection: Selection) {
        self.selection = selection;
    }

    fn hash(&self, prefix: &IpNet) -> u64 {
        prefix_hash(&self.hasher, prefix)
    }

    fn find(&self, prefix: &IpNet) -> Option<Slot> {
        let hash = self.hash(prefix);
        let check = check_bits(hash);
        self.index
            .find(hash, |&e| {
                e >> SLOT_BITS == check && self.slots[entry_slot(e).index()].prefix == *prefix
            })
            .map(|&e| entry_slot(e))
    }

    /// New prefixes refused because the table held [`MAX_PREFIXES`].
    pub fn refused(&self) -> u64 {
        self.refused
    }

    pub fn get(&self, prefix: &IpNet) -> Option<&Entry> {
        let slot = self.find(prefix)?;
        let entry = &self.slots[slot.index()].entry;
        (!entry.is_empty()).then_some(entry)
    }

    /// The slot of a prefix that has paths.
    pub fn slot(&self, prefix: &IpNet) -> Option<Slot> {
        self.find(prefix)
            .filter(|&s| !self.slots[s.index()].entry.is_empty())
    }

    /// The prefix in `slot` and its entry (with no paths once emptied and
    /// not yet released).
    pub fn at(&self, slot: Slot) -> Option<(&IpNet, &Entry)> {
        self.slots.get(slot.index()).map(|s| (&s.prefix, &s.entry))
    }

    /// Every prefix with paths.
    pub fn iter(&self) -> impl Iterator<Item = (&IpNet, &Entry)> {
        self.iter_slots().map(|(_, p, e)| (p, e))
    }

    /// Every prefix with paths, with its slot.
    /// Every slot number in use or free, in order.
    pub fn slots(&self) -> impl Iterator<Item = Slot> + use<> {
        (0..self.slots.len() as u32).map(Slot)
    }

    pub fn iter_slots(&self) -> impl Iterator<Item = (Slot, &IpNet, &Entry)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.entry.is_empty())
            .map(|(i, s)| (Slot(i as u32), &s.prefix, &s.entry))
    }

    /// Frees the slots of prefixes that lost their last path: after this,
    /// such a slot may hold another prefix. Callers release once nothing
    /// refers to emptied slots any more (after encoding pending updates).
    pub fn release(&mut self) {
        self.release_except(|_| false);
    }

    /// [`LocRib::release`], but slots for which `keep` says true stay
    /// (something still refers to them: a neighbour's update waiting for
    /// its send window) until a later release.
    pub fn release_except(&mut self, keep: impl Fn(Slot) -> bool) {
        let mut kept = Vec::new();
        for slot in std::mem::take(&mut self.emptied) {
            if keep(slot) && self.slots[slot.index()].entry.is_empty() {
                kept.push(slot);
                continue;
            }
            if let Some(word) = self.emptied_mark.get_mut(slot.index() / 64) {
                *word &= !(1 << (slot.index() % 64));
            }
            let s = &self.slots[slot.index()];
            if !s.entry.is_empty() {
                continue; // the prefix came back before the release
            }
            let hash = self.hash(&s.prefix);
            // A slot emptied, refilled and emptied again before a release
            // is listed twice: it is freed once, when it leaves the index.
            if let Ok(found) = self.index.find_entry(hash, |&e| entry_slot(e) == slot) {
                found.remove();
                self.free.push(slot);
            }
        }
        self.emptied = kept;
    }

    /// Slots emptied and not yet released.
    pub fn emptied(&self) -> usize {
        self.emptied.len()
    }

    /// A new slot for `prefix`, which has none; None with
    /// [`MAX_PREFIXES`] slots taken.
    fn new_slot(&mut self, prefix: IpNet) -> Option<Slot> {
        let entry = SlotEntry {
            prefix,
            entry: Entry::default(),
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s.index()] = entry;
                s
            }
            None if self.slots.len() >= MAX_PREFIXES => {
                self.refused += 1;
                return None;
            }
            None => {
                self.slots.push(entry);
                Slot((self.slots.len() - 1) as u32)
            }
        };
        if self.index.len() == self.index.capacity() {
            self.grow_index();
        }
        let hash = self.hash(&prefix);
        let LocRib {
            index,
            slots,
            hasher,
            ..
        } = self;
        index.insert_unique(hash, index_entry(slot, hash), |&e| {
            prefix_hash(hasher, &slots[entry_slot(e).index()].prefix)
        });
        Some(slot)
    }

    /// Doubles the index, inserting the prefixes in slot order. hashbrown
    /// would rehash in bucket order, reading each slot's prefix at random
    /// (a cache miss per prefix at a million: 16% of the load's L2 misses);
    /// in slot order the slots are read front to back.
    fn grow_index(&mut self) {
        let mut indexed = vec![0u64; self.slots.len().div_ceil(64)];
        for &e in self.index.iter() {
            let s = entry_slot(e);
            indexed[s.index() / 64] |= 1 << (s.index() % 64);
        }
        // One more than fits now: hashbrown rounds that up to twice the
        // buckets, as its own growth would.
        let mut grown = HashTable::with_capacity(self.index.capacity() + 1);
        let LocRib { slots, hasher, .. } = self;
        for (i, s) in slots.iter().enumerate() {
            if indexed[i / 64] & (1 << (i % 64)) != 0 {
                let hash = prefix_hash(hasher, &s.prefix);
                grown.insert_unique(hash, index_entry(Slot(i as u32), hash), |&e| {
                    prefix_hash(hasher, &slots[entry_slot(e).index()].prefix)
                });
            }
        }
        self.index = grown;
    }

    /// Sets (or with `None` removes) the path from `source` for `prefix`,
    /// reselects, and says what changed.
    pub fn update(
        &mut self,
        prefix: IpNet,
        source: PathSource,
        attrs: Option<Attrs>,
        info: &impl Fn(&Path) -> SourceInfo,
    ) -> RibUpdate {
        let slot = match (&attrs, self.find(&prefix)) {
            (_, Some(s)) => s,
            (None, None) => return RibUpdate::default(),
            (Some(_), None) => match self.new_slot(prefix) {
                Some(slot) => slot,
                None => return RibUpdate::default(),
            },
        };
        let selection = self.selection;
        let entry = &mut self.slots[slot.index()].entry;
        let was_empty = entry.is_empty();
        let old_best_source = entry.best().map(|b| b.source);
        let old_best_attrs = entry.best().map(|b| Arc::as_ptr(&b.attrs));
        let old_ecmp: Vec<(PathSource, *const PathAttributes)> = if entry.paths.ecmp() > 1 {
            ecmp_key(entry)
        } else {
            Vec::new()
        };
        let old_ecmp_len = entry.paths.ecmp();
        let existing = entry.paths().iter().position(|p| p.source == source);
        let old = match (existing, attrs) {
            (Some(i), Some(attrs)) => {
                let path = &mut entry.paths.as_mut_slice()[i];
                if Arc::ptr_eq(&path.attrs, &attrs) {
                    return RibUpdate {
                        old: Some(attrs),
                        change: None,
                    };
                }
                Some(std::mem::replace(&mut path.attrs, attrs))
            }
            (Some(i), None) => entry.paths.remove(i).map(|p| p.attrs),
            (None, Some(attrs)) => {
                entry.paths.push(Path { source, attrs });
                None
            }
            (None, None) => return RibUpdate::default(),
        };
        select(entry, selection, info);
        let now_empty = entry.is_empty();
        let best_changed = entry.best().map(|b| b.source) != old_best_source
            || entry.best().map(|b| Arc::as_ptr(&b.attrs)) != old_best_attrs;
        let ecmp_changed = entry.paths.ecmp() != old_ecmp_len
            || (entry.paths.ecmp() > 1 && ecmp_key(entry) != old_ecmp);
        let skip_multipath = self.skip_multipath;
        let change = (best_changed || ecmp_changed).then(|| BestChange {
            prefix,
            slot,
            best: entry.best().cloned(),
            multipath: if skip_multipath {
                Vec::new()
            } else {
                entry.multipath().to_vec()
            },
            best_changed,
        });
        match (was_empty, now_empty) {
            (true, false) => self.len += 1,
            (false, true) => {
                self.len -= 1;
                let (word, bit) = (slot.index() / 64, 1u64 << (slot.index() % 64));
                if self.emptied_mark.len() <= word {
                    self.emptied_mark.resize(word + 1, 0);
                }
                if self.emptied_mark[word] & bit == 0 {
                    self.emptied_mark[word] |= bit;
                    self.emptied.push(slot);
                }
            }
            _ => {}
        }
        RibUpdate { old, change }
    }

    /// Reselects every prefix (after a change of the selection knobs);
    /// returns the changes.
    pub fn reselect_all(&mut self, info: &impl Fn(&Path) -> SourceInfo) -> Vec<BestChange> {
        let slots: Vec<Slot> = self.iter_slots().map(|(s, _, _)| s).collect();
        slots
            .into_iter()
            .filter_map(|s| self.reselect_slot(s, info))
            .collect()
    }

    /// Reselects one prefix (after a change of its next hops' state).
    pub fn reselect(
        &mut self,
        prefix: IpNet,
        info: &impl Fn(&Path) -> SourceInfo,
    ) -> Option<BestChange> {
        let slot = self.slot(&prefix)?;
        self.reselect_slot(slot, info)
    }

    fn reselect_slot(
        &mut self,
        slot: Slot,
        info: &impl Fn(&Path) -> SourceInfo,
    ) -> Option<BestChange> {
        let selection = self.selection;
        let s = self.slots.get_mut(slot.index())?;
        let entry = &mut s.entry;
        let old_best = entry.best().cloned();
        let old_ecmp_len = entry.paths.ecmp();
        let old_first: Vec<PathSource> = entry.multipath().iter().map(|p| p.source).collect();
        select(entry, selection, info);
        let best = entry.best().cloned();
        let same_set = entry.paths.ecmp() == old_ecmp_len
            && entry.multipath().iter().map(|p| p.source).eq(old_first);
        if best == old_best && same_set {
            return None;
        }
        Some(BestChange {
            prefix: s.prefix,
            slot,
            best_changed: best != old_best,
            best,
            multipath: entry.multipath().to_vec(),
        })
    }
}

/// The hash of a prefix in the Loc-RIB index.
///
/// IPv4: the 16 /24s of one /20 land in neighbouring buckets, so a table
/// that arrives roughly in order (as full tables do) finds their buckets
/// and control bytes in one or two cache lines. The low bits (the bucket)
/// are a seeded offset per /20, plus the prefix's /24 number within the
/// /20, plus an odd multiple of its low byte and length (which spreads
/// longer prefixes inside one /24 over the table); the top 12 bits
/// (hashbrown's 7-bit tag on 64-bit machines and the index entry's 5 check
/// bits) mix the whole prefix with the seeded offset.
///
/// Runs of 16 and not longer: with the 256 /24s of a /16 side by side,
/// the runs of different /16s overlapped into long clusters, a new prefix
/// probed about 8 groups, and each false tag match on the way read a cold
/// slot (1–2 per new prefix against 0.2 now; cachegrind: 13% fewer
/// instructions and 30% fewer L1 misses on a 1M load). IPv6 goes through
/// the seeded hasher whole.
fn prefix_hash(hasher: &DefaultHashBuilder, prefix: &IpNet) -> u64 {
    /// log2 of the /24s that share a run of buckets.
    const RUN: u32 = 4;
    match prefix {
        IpNet::V4(n) => {
            let addr = u64::from(u32::from(n.addr()));
            let len = u64::from(n.prefix_len());
            let spread = ((addr & 0xff) | (len << 8)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            // Each run starts at a seeded place: nobody can choose
            // prefixes of different runs that pile onto one bucket.
            let base = hasher.hash_one(addr >> (8 + RUN));
            let in_run = (addr >> 8) & ((1 << RUN) - 1);
            let low = (in_run.wrapping_add(spread).wrapping_add(base)) & ((1 << 52) - 1);
            // The tag and the index entry's check bits (the top 12) from
            // the same seeded hash: a multiply mixes the whole prefix into
            // the top bits, no second hasher call.
            let mixed =
                (((addr << 8) | len) ^ base).wrapping_mul(0x9E37_79B9_7F4A_7C15) & !((1 << 52) - 1);
            mixed | low
        }
        IpNet::V6(n) => hasher.hash_one((u128::from(n.addr()), n.prefix_len())),
    }
}

fn ecmp_key(entry: &Entry) -> Vec<(PathSource, *const PathAttributes)> {
    entry
        .multipath()
        .iter()
        .map(|p| (p.source, Arc::as_ptr(&p.attrs)))
        .collect()
}

/// Orders `entry.paths` best first and counts the ECMP set.
fn select(entry: &mut Entry, selection: Selection, info: &impl Fn(&Path) -> SourceInfo) {
    let paths = entry.paths.as_mut_slice();
    if paths.len() == 1 {
        // The common case of a full table from one upstream.
        let reachable = info(&paths[0]).reachable;
        entry.paths.set_ecmp(u32::from(reachable));
        return;
    }
    // Linear scan for the best: MED comparison is not transitive, so no
    // sort (a sort may panic on an inconsistent order).
    let mut best: Option<usize> = None;
    for i in 0..paths.len() {
        if !info(&paths[i]).reachable {
            continue;
        }
        best = match best {
            None => Some(i),
            Some(b) => {
                let better = compare(&paths[i], &paths[b], selection, info) == Ordering::Less;
                Some(if better { i } else { b })
            }
        };
    }
    let Some(b) = best else {
        entry.paths.set_ecmp(0);
        return;
    };
    paths.swap(0, b);
    let mut n = 1;
    if selection.multipath {
        for i in 1..paths.len() {
            let p = &paths[i];
            if info(p).reachable && multipath_equal(&paths[0], p, selection, info) {
                paths.swap(n, i);
                n += 1;
            }
        }
    }
    entry.paths.set_ecmp(n as u32);
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

    /// Neighbour `id`'s paths.
    fn n(id: u32) -> PathSource {
        PathSource::Neighbor(NeighborId(id))
    }

    /// Neighbours 0..: eBGP, router id 10.0.0.(n+1); neighbour 9 is iBGP.
    fn info(p: &Path) -> SourceInfo {
        match p.source {
            PathSource::Neighbor(NeighborId(n)) => SourceInfo {
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
        let change = rib
            .update(p, n(0), None, &info)
            .change
            .expect("best changes");
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
            .change
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
        let change = rib.update(vip, n(0), None, &info).change.expect("changes");
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
            n(0),
            Some(attrs(&mut i, &[65001], [10, 0, 0, 1], |_| {})),
            &info,
        );
        assert_eq!(rib.len(), 1);
        let change = rib.update(p, n(0), None, &info).change.expect("withdrawn");
        assert_eq!(change.best, None);
        assert!(rib.is_empty());
        assert!(
            rib.update(p, n(0), None, &info).change.is_none(),
            "nothing to withdraw"
        );
        // The slot is reused only after release.
        let a = attrs(&mut i, &[65001], [10, 0, 0, 1], |_| {});
        let q = net("198.51.100.0/24");
        rib.update(q, n(0), Some(a.clone()), &info);
        assert_eq!(rib.slot(&q), Some(Slot(1)), "slot 0 is not released yet");
        rib.release();
        rib.update(p, n(0), Some(a), &info);
        assert_eq!(rib.slot(&p), Some(Slot(0)), "released slot reused");
        assert_eq!(rib.len(), 2);
        assert_eq!(rib.iter().count(), 2);
    }

    #[test]
    fn a_slot_emptied_twice_before_a_release_is_freed_once() {
        let mut i = Interner::default();
        let mut rib = LocRib::new(Selection::default());
        let p = net("192.0.2.0/24");
        let a = attrs(&mut i, &[65001], [10, 0, 0, 1], |_| {});
        let n = n(0);
        rib.update(p, n, Some(a.clone()), &info);
        rib.update(p, n, None, &info);
        rib.update(p, n, Some(a.clone()), &info);
        rib.update(p, n, None, &info);
        rib.release();
        let (x, y) = (net("198.51.100.0/24"), net("203.0.113.0/24"));
        rib.update(x, n, Some(a.clone()), &info);
        rib.update(y, n, Some(a), &info);
        assert_ne!(rib.slot(&x), rib.slot(&y), "two prefixes, two slots");
        assert_eq!(rib.len(), 2);
        assert!(rib.get(&x).is_some() && rib.get(&y).is_some());
    }

    #[test]
    fn a_slot_held_back_is_not_reused_until_a_later_release() {
        let mut i = Interner::default();
        let mut rib = LocRib::new(Selection::default());
        let a = attrs(&mut i, &[65001], [10, 0, 0, 1], |_| {});
        let n = n(0);
        let (p, q, r) = (
            net("192.0.2.0/24"),
            net("198.51.100.0/24"),
            net("203.0.113.0/24"),
        );
        rib.update(p, n, Some(a.clone()), &info);
        rib.update(p, n, None, &info);
        rib.release_except(|slot| slot == Slot(0));
        assert_eq!(rib.emptied(), 1, "held back");
        rib.update(q, n, Some(a.clone()), &info);
        assert_eq!(
            rib.slot(&q),
            Some(Slot(1)),
            "slot 0 still holds the withdrawn prefix"
        );
        rib.release();
        assert_eq!(rib.emptied(), 0);
        rib.update(r, n, Some(a), &info);
        assert_eq!(rib.slot(&r), Some(Slot(0)), "freed by the later release");
    }

    /// A prefix from a small number: IPv4 of every length (many /24s side
    /// by side, as a full table has them) and some IPv6.
    fn numbered(n: u32) -> IpNet {
        match n % 8 {
            0 => IpNet::V6(
                ipnet::Ipv6Net::new(std::net::Ipv6Addr::from(u128::from(n) << 80), 48)
                    .expect("length"),
            ),
            1 => IpNet::V4(
                ipnet::Ipv4Net::new(Ipv4Addr::from(n << 12), 20 + (n % 13) as u8)
                    .expect("length")
                    .trunc(),
            ),
            _ => IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(n << 8), 24).expect("length")),
        }
    }

    proptest::proptest! {
        /// Through index growth (done in slot order), withdrawals,
        /// releases and slot reuse, the Loc-RIB holds exactly the
        /// prefixes a plain set says it should, each in its own slot.
        #[test]
        fn the_index_finds_every_prefix_through_growth_and_reuse(
            ops in proptest::collection::vec((0u32..3000, proptest::bool::ANY, 0u8..8), 1..4000)
        ) {
            let mut i = Interner::default();
            let a = attrs(&mut i, &[65001], [10, 0, 0, 1], |_| {});
            let mut rib = LocRib::new(Selection::default());
            let mut model = std::collections::HashSet::new();
            for (number, add, release) in ops {
                let p = numbered(number);
                if add {
                    rib.update(p, n(0), Some(a.clone()), &info);
                    model.insert(p);
                } else {
                    rib.update(p, n(0), None, &info);
                    model.remove(&p);
                }
                match release {
                    0 => rib.release(),
                    1 => rib.release_except(|slot| slot.0 % 2 == 1),
                    _ => {}
                }
            }
            proptest::prop_assert_eq!(rib.len(), model.len());
            let mut slots = std::collections::HashSet::new();
            for p in &model {
                let slot = rib.slot(p);
                proptest::prop_assert!(slot.is_some(), "{} lost", p);
                proptest::prop_assert!(slots.insert(slot), "{} shares a slot", p);
                proptest::prop_assert_eq!(rib.at(slot.unwrap_or(Slot(0))).map(|(q, _)| *q), Some(*p));
            }
            for n in 0..3000 {
                let p = numbered(n);
                proptest::prop_assert_eq!(rib.get(&p).is_some(), model.contains(&p), "{}", p);
            }
        }
    }
}
