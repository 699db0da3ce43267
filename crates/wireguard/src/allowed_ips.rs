//! The allowed IPs of a device's peers: a longest-prefix table from network
//! to peer (where the data path sends a packet, and whether a decrypted
//! packet's source belongs to its sender), and each peer's networks in the
//! order they were given (what `get=1` lists).
//!
//! Every operation costs the same whatever the number of networks a peer
//! or the device has (a trie walk bounded by the address length), so a
//! `set=1` with a million `allowed_ip=` lines is linear in its lines. The
//! table entry of a network records where the network sits in its peer's
//! list: taking it away from that peer needs no search. Freed places stay
//! empty until they outnumber the used ones; then the list is compacted.
//!
//! An allowed IP belongs to one peer: the last one given it.

use std::collections::HashMap;
use std::net::IpAddr;

use ip_network::{IpNetwork, Ipv4Network, Ipv6Network};
use ip_network_table::IpNetworkTable;
use ipnet::IpNet;

use crate::key::Key;

/// What the table maps networks to: a peer, known by its public key.
pub trait Owner: Clone {
    fn owner_key(&self) -> Key;
}

impl Owner for Key {
    fn owner_key(&self) -> Key {
        *self
    }
}

/// Lists shorter than this are never compacted.
const COMPACT_FROM: usize = 64;

pub struct AllowedIps<P> {
    table: IpNetworkTable<Entry<P>>,
    lists: HashMap<Key, List>,
}

struct Entry<P> {
    peer: P,
    /// The network's place in its peer's list.
    slot: usize,
}

/// One peer's networks in the order given; `None` where one was removed.
#[derive(Default)]
struct List {
    slots: Vec<Option<IpNet>>,
    live: usize,
}

impl<P: Owner> Default for AllowedIps<P> {
    fn default() -> Self {
        Self::new()
    }
}

impl<P: Owner> AllowedIps<P> {
    pub fn new() -> Self {
        AllowedIps {
            table: IpNetworkTable::new(),
            lists: HashMap::new(),
        }
    }

    /// Gives `net` (truncated to its network address) to `peer`. Returns
    /// the peer it was taken from, if another one had it.
    pub fn insert(&mut self, net: IpNet, peer: &P) -> Option<P> {
        let net = net.trunc();
        let network = to_network(net);
        let key = peer.owner_key();
        let (previous, old_slot) = match self.table.exact_match_mut(network) {
            Some(entry) if entry.peer.owner_key() == key => return None,
            Some(entry) => {
                let slot = push(self.lists.entry(key).or_default(), net);
                let previous = std::mem::replace(&mut entry.peer, peer.clone());
                let old_slot = std::mem::replace(&mut entry.slot, slot);
                (previous, old_slot)
            }
            None => {
                let slot = push(self.lists.entry(key).or_default(), net);
                self.table.insert(
                    network,
                    Entry {
                        peer: peer.clone(),
                        slot,
                    },
                );
                return None;
            }
        };
        self.vacate(previous.owner_key(), old_slot);
        Some(previous)
    }

    /// Takes `net` (truncated) from `peer`; a network another peer has is
    /// left alone. Returns whether `peer` had it.
    pub fn remove(&mut self, net: IpNet, peer: &Key) -> bool {
        let network = to_network(net.trunc());
        let slot = match self.table.exact_match(network) {
            Some(entry) if entry.peer.owner_key() == *peer => entry.slot,
            _ => return false,
        };
        self.table.remove(network);
        self.vacate(*peer, slot);
        true
    }

    /// Takes every network from `peer`.
    pub fn clear(&mut self, peer: &Key) {
        let Some(list) = self.lists.remove(peer) else {
            return;
        };
        for net in list.slots.into_iter().flatten() {
            let network = to_network(net);
            if self
                .table
                .exact_match(network)
                .is_some_and(|entry| entry.peer.owner_key() == *peer)
            {
                self.table.remove(network);
            }
        }
    }

    /// The peer of the most specific network containing `addr`.
    pub fn lookup(&self, addr: IpAddr) -> Option<&P> {
        self.table.longest_match(addr).map(|(_, entry)| &entry.peer)
    }

    /// `peer`'s networks in the order they were given.
    pub fn of(&self, peer: &Key) -> impl Iterator<Item = IpNet> + '_ {
        self.lists
            .get(peer)
            .into_iter()
            .flat_map(|list| list.slots.iter().flatten().copied())
    }

    /// Networks in the table, all peers together.
    pub fn len(&self) -> usize {
        let (v4, v6) = self.table.len();
        v4 + v6
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that the table and the lists agree (for tests and fuzzing;
    /// linear in the number of networks).
    pub fn check(&self) -> Result<(), String> {
        let mut listed = 0;
        for (key, list) in &self.lists {
            let live = list.slots.iter().flatten().count();
            if live != list.live || live == 0 {
                return Err(format!("{key:?}: {live} listed, {} counted", list.live));
            }
            for (slot, net) in list.slots.iter().enumerate() {
                let Some(net) = net else { continue };
                match self.table.exact_match(to_network(*net)) {
                    Some(entry) if entry.peer.owner_key() == *key && entry.slot == slot => {}
                    _ => return Err(format!("{key:?}: {net} at {slot} is not in the table")),
                }
            }
            listed += live;
        }
        if listed != self.len() {
            return Err(format!("{listed} listed, {} in the table", self.len()));
        }
        Ok(())
    }

    /// Frees `slot` in `peer`'s list; compacts the list once most of it is
    /// free, and forgets it once empty.
    fn vacate(&mut self, peer: Key, slot: usize) {
        let Some(list) = self.lists.get_mut(&peer) else {
            return;
        };
        if list.slots.get_mut(slot).and_then(Option::take).is_some() {
            list.live -= 1;
        }
        if list.live == 0 {
            self.lists.remove(&peer);
            return;
        }
        if list.slots.len() < COMPACT_FROM || list.live * 2 > list.slots.len() {
            return;
        }
        list.slots.retain(Option::is_some);
        for (slot, net) in list.slots.iter().enumerate() {
            if let Some(entry) = net.and_then(|n| self.table.exact_match_mut(to_network(n))) {
                entry.slot = slot;
            }
        }
    }
}

fn push(list: &mut List, net: IpNet) -> usize {
    list.slots.push(Some(net));
    list.live += 1;
    list.slots.len() - 1
}

fn to_network(net: IpNet) -> IpNetwork {
    // An ipnet prefix length is always valid for its family, so the
    // fallback (the whole family) is never taken; it spares a panic path.
    match net {
        IpNet::V4(n) => IpNetwork::V4(
            Ipv4Network::new_truncate(n.addr(), n.prefix_len())
                .unwrap_or(Ipv4Network::DEFAULT_ROUTE),
        ),
        IpNet::V6(n) => IpNetwork::V6(
            Ipv6Network::new_truncate(n.addr(), n.prefix_len())
                .unwrap_or(Ipv6Network::DEFAULT_ROUTE),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::{Duration, Instant};

    use ipnet::Ipv4Net;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().expect("net")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn nth(i: u32) -> IpNet {
        IpNet::V4(Ipv4Net::from(Ipv4Addr::from(0x0a00_0000 + i)))
    }

    #[test]
    fn the_last_peer_given_a_network_has_it_and_the_others_lose_it() {
        let (a, b) = (Key([1; 32]), Key([2; 32]));
        let mut t = AllowedIps::new();
        assert_eq!(t.insert(net("10.0.0.0/8"), &a), None);
        assert_eq!(t.insert(net("10.1.2.3/16"), &a), None);
        assert_eq!(t.insert(net("fd00::/64"), &a), None);
        assert_eq!(t.insert(net("10.0.0.0/8"), &a), None, "again: no change");
        assert_eq!(t.lookup(ip("10.1.9.9")), Some(&a));
        assert_eq!(t.insert(net("10.1.0.0/16"), &b), Some(a));
        assert_eq!(t.lookup(ip("10.1.9.9")), Some(&b));
        assert_eq!(t.lookup(ip("10.2.0.1")), Some(&a));
        assert_eq!(
            t.of(&a).collect::<Vec<_>>(),
            vec![net("10.0.0.0/8"), net("fd00::/64")]
        );
        assert_eq!(t.of(&b).collect::<Vec<_>>(), vec![net("10.1.0.0/16")]);
        assert!(!t.remove(net("10.1.0.0/16"), &a), "b's, not a's");
        assert!(t.remove(net("10.0.0.0/8"), &a));
        assert_eq!(t.lookup(ip("10.2.0.1")), None);
        t.clear(&b);
        assert_eq!(t.lookup(ip("10.1.9.9")), None);
        assert_eq!(t.len(), 1);
        t.check().expect("consistent");
    }

    #[test]
    fn removed_and_regiven_networks_keep_lists_in_order_through_compaction() {
        let (a, b) = (Key([1; 32]), Key([2; 32]));
        let mut t = AllowedIps::new();
        for i in 0..1000 {
            t.insert(nth(i), &a);
        }
        // b takes every third network, a gives back every other one.
        for i in (0..1000).step_by(3) {
            t.insert(nth(i), &b);
        }
        for i in (0..1000).step_by(2) {
            t.remove(nth(i), &a.owner_key());
        }
        t.check().expect("consistent");
        let want_a: Vec<IpNet> = (0..1000)
            .filter(|i| i % 3 != 0 && i % 2 != 0)
            .map(nth)
            .collect();
        assert_eq!(t.of(&a).collect::<Vec<_>>(), want_a);
        assert_eq!(t.of(&b).count(), 334);
        assert_eq!(t.len(), want_a.len() + 334);
        // Given back to a: at the end of its list.
        t.insert(nth(0), &a);
        assert_eq!(t.of(&a).last(), Some(nth(0)));
        assert_eq!(t.lookup(IpAddr::from(Ipv4Addr::new(10, 0, 0, 0))), Some(&a));
        t.check().expect("consistent");
    }

    /// 200 000 networks on one peer, then all moved to another one by one,
    /// then all removed one by one: each step linear. A list searched per
    /// network (the old code) took 17 s for 200 000 in a release build.
    #[test]
    fn two_hundred_thousand_networks_are_linear() {
        const N: u32 = 200_000;
        let (a, b) = (Key([1; 32]), Key([2; 32]));
        let mut t = AllowedIps::new();
        let start = Instant::now();
        for i in 0..N {
            t.insert(nth(i), &a);
        }
        for i in 0..N {
            assert_eq!(t.insert(nth(i), &b), Some(a));
        }
        for i in (0..N).rev() {
            assert!(t.remove(nth(i), &b));
        }
        let took = start.elapsed();
        assert!(t.is_empty() && t.of(&a).next().is_none() && t.of(&b).next().is_none());
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }
}
