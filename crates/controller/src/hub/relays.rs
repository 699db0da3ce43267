//! Relays: public nodes that forward the WireGuard datagrams of pairs
//! behind NAT (`bgp4mesh_api::relay`). A node becomes one by reporting its
//! `relay_port`; the controller then makes it a *relay key* (memory only:
//! a restarted controller makes new ones, and every credential with them)
//! that only the relay itself ever gets.
//!
//! A relay is *live* while it publishes an endpoint, its stream is open
//! and its pulses keep coming. A pair of nodes that are both behind NAT
//! (both report candidates and publish no endpoint) gets one of them
//! ([`choose`]):
//!
//! - Nodes behind NAT measure their round trip to each live relay (peers
//!   show their `relay_port` while live) and report it; the controller
//!   keeps it rounded up to a power of two microseconds ([`bucket`]). A
//!   relay's *cost* for the pair is the sum of both nodes' round trips to
//!   it, when both are known.
//! - The *near* relays are those whose cost is at most 1.5 times the best
//!   cost plus 5 ms. Among them each relay scores the pair (rendezvous
//!   hashing) and the highest carries it: pairs spread over the relays of
//!   about the same latency, and a relay that goes moves only its own
//!   pairs, each to the next near relay by its score.
//! - Relays with no cost for the pair are used only when none has one:
//!   then the pair is hashed over all live relays.
//!
//! A round trip moves to another bucket only when it leaves its bucket by
//! more than an eighth of the bucket's edge ([`rebucket`]); jitter within
//! it changes nothing. A report whose buckets change the relay of one of
//! the node's pairs publishes the node once (`NodeView::pairs_moved`): the
//! node gets its peers behind NAT again and they get it, so both ends of
//! each pair move together. Anything else publishes nothing.
//!
//! Each node of the pair gets the relay's address, the pair's channel,
//! its side and its credential (`Peer.relay`), rendered for it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use bgp4mesh_api::relay::{RelayKey, channel_of, credential_mac};
use bgp4mesh_api::{MAX_RELAY_RTTS, RelayPath, RelayRtt};
use rand_core::RngCore;

use super::{Hub, NetView, NodeView};
use bgp4mesh_api::relay::to_hex as hex;

/// Credentials are made for whole hours, valid 24 to 25 hours: a peer
/// rendered twice within an hour is the same, and one refreshed every
/// [`REFRESH_HOURS`] never holds an expired credential.
const VALID_HOURS: u64 = 25;
/// How often (hours) the pairs behind NAT get fresh credentials when
/// nothing else changed.
pub const REFRESH_HOURS: u64 = 12;

/// A relay's key; its `Debug` shows nothing of it, so no log of a
/// `NodeView` carries it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub RelayKey);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    fn new() -> Secret {
        let mut key = [0u8; 32];
        rand_core::OsRng.fill_bytes(&mut key);
        Secret(key)
    }
}

/// The address a relay relays at: its published endpoint's IP, its relay
/// port.
fn relay_address(endpoint: &str, port: u16) -> Option<String> {
    let ip = match endpoint.parse::<SocketAddr>() {
        Ok(a) => a.ip(),
        Err(_) => endpoint.parse::<IpAddr>().ok()?,
    };
    Some(SocketAddr::new(ip.to_canonical(), port).to_string())
}

impl NodeView {
    /// Where it relays, while it is a live relay: it publishes an
    /// endpoint, reported a relay port, its stream is open and its pulses
    /// have not stopped.
    pub fn live_relay(&self) -> Option<String> {
        let port = self.relay_port?;
        if self.streams == 0 || self.silent || self.relay_key.is_none() {
            return None;
        }
        relay_address(self.row.endpoint.as_deref()?, port)
    }

    /// Behind NAT: it publishes no endpoint and reported candidates. A
    /// pair of such nodes gets a relay.
    pub fn behind_nat(&self) -> bool {
        self.row.endpoint.is_none() && !self.candidates.is_empty()
    }

    /// The relay key in hex, for the relay itself only.
    pub(super) fn own_relay_key(&self) -> Option<String> {
        self.relay_port?;
        self.relay_key.as_ref().map(|k| hex(&k.0))
    }
}

/// What the hub last published of a node as far as relay paths go: where
/// it relays (while live), and whether it is behind NAT. A change of
/// either re-renders the pairs behind NAT.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelayRole {
    pub relay: Option<String>,
    pub behind_nat: bool,
}

impl RelayRole {
    pub fn of(n: &NodeView) -> RelayRole {
        RelayRole {
            relay: n.live_relay(),
            behind_nat: n.behind_nat(),
        }
    }
}

struct LiveRelay<'a> {
    node: &'a NodeView,
    address: String,
    key: &'a RelayKey,
}

/// The relays as one node (the viewer) sees its peers: empty unless it is
/// behind NAT.
pub struct Relays<'a> {
    viewer: Option<&'a NodeView>,
    live: Vec<LiveRelay<'a>>,
    expires: u64,
}

impl<'a> Relays<'a> {
    /// No relay paths (admin views, public viewers, tests).
    pub fn none() -> Relays<'static> {
        Relays {
            viewer: None,
            live: Vec::new(),
            expires: 0,
        }
    }

    /// The live relays of `view`, for node `viewer` at `now` (Unix
    /// seconds). Scans the network only for a viewer behind NAT.
    pub(super) fn for_viewer(view: &'a NetView, viewer: &str, now: u64) -> Relays<'a> {
        let Some(me) = view.nodes.get(viewer).filter(|n| n.behind_nat()) else {
            return Relays::none();
        };
        let live = view
            .nodes
            .values()
            .filter_map(|n| {
                Some(LiveRelay {
                    address: n.live_relay()?,
                    key: &n.relay_key.as_ref()?.0,
                    node: n,
                })
            })
            .collect();
        Relays {
            viewer: Some(me),
            live,
            expires: (now / 3600 + VALID_HOURS) * 3600,
        }
    }

    /// The relay path to `peer`, when both are behind NAT and a live
    /// relay (neither of them) is left.
    pub fn path_to(&self, peer: &NodeView) -> Option<RelayPath> {
        let me = self.viewer?;
        if !peer.behind_nat() || peer.row.id == me.row.id {
            return None;
        }
        let relay = choose(&self.live, |r| r.node, me, peer)?;
        let (channel, side) = channel_of(relay.key, &me.row.id, &peer.row.id);
        Some(RelayPath {
            node_id: relay.node.row.id.clone(),
            name: relay.node.row.name.clone(),
            address: relay.address.clone(),
            channel: hex(&channel),
            side,
            expires: self.expires,
            mac: hex(&credential_mac(relay.key, &channel, side, self.expires)),
        })
    }
}

/// The relay of `relays` (live ones; `node` gives each one's view) that
/// carries the pair `a`, `b` (either order, the same one): the highest
/// scoring of the near relays, or of all when none has a cost for the pair.
fn choose<'r, T>(
    relays: &'r [T],
    node: impl Fn(&'r T) -> &'r NodeView,
    a: &NodeView,
    b: &NodeView,
) -> Option<&'r T> {
    let (a_id, b_id) = (a.row.id.as_str(), b.row.id.as_str());
    let usable = || {
        relays.iter().filter(|r| {
            let id = node(r).row.id.as_str();
            id != a_id && id != b_id
        })
    };
    let cost = |r: &'r T| -> Option<u64> {
        let id = &node(r).row.id;
        Some(a.relay_rtts.get(id)?.saturating_add(*b.relay_rtts.get(id)?))
    };
    let best = usable().filter_map(&cost).min();
    let hashed = |r: &&'r T| (score(&node(r).row.id, a_id, b_id), &node(r).row.id);
    match best {
        // cost <= best * 1.5 + 5 ms
        Some(best) => usable()
            .filter(|r| {
                cost(r).is_some_and(|c| {
                    u128::from(c) * 2 <= u128::from(best) * 3 + u128::from(NEAR_SLACK_US) * 2
                })
            })
            .max_by_key(hashed),
        None => usable().max_by_key(hashed),
    }
}

/// The longest round trip a report may give (microseconds): 10 s.
pub const MAX_RELAY_RTT_US: u64 = 10_000_000;

/// What a relay's cost may exceed 1.5 times the best one's by and still be
/// near (microseconds).
const NEAR_SLACK_US: u64 = 5_000;

/// A round trip's bucket: rounded up to a power of two microseconds.
pub fn bucket(rtt_us: u64) -> u64 {
    rtt_us.max(1).checked_next_power_of_two().unwrap_or(1 << 63)
}

/// The bucket of a new round trip to a relay whose last one was in `old`:
/// `old` still while the new one is within an eighth of its edges (above
/// 7/16 of it, at most 9/8 of it), so that jitter about an edge does not
/// move it back and forth; else its own.
pub fn rebucket(old: Option<u64>, rtt_us: u64) -> u64 {
    match old {
        Some(b)
            if u128::from(rtt_us) * 16 > u128::from(b) * 7
                && u128::from(rtt_us) * 8 <= u128::from(b) * 9 =>
        {
            b
        }
        _ => bucket(rtt_us),
    }
}

/// A report's relay round trips, checked: at most [`MAX_RELAY_RTTS`], none
/// over [`MAX_RELAY_RTT_US`]. The error names the field and the bad value.
pub fn check_relay_rtts(rtts: &[RelayRtt]) -> Result<Vec<(String, u64)>, String> {
    if rtts.len() > MAX_RELAY_RTTS {
        return Err(format!(
            "relay_rtts: {} given, at most {MAX_RELAY_RTTS}",
            rtts.len()
        ));
    }
    rtts.iter()
        .map(|r| {
            if r.rtt_us > MAX_RELAY_RTT_US {
                Err(format!(
                    "relay_rtts: rtt_us {} for relay {:?} is over {} s",
                    r.rtt_us,
                    r.node_id,
                    MAX_RELAY_RTT_US / 1_000_000
                ))
            } else {
                Ok((r.node_id.clone(), r.rtt_us))
            }
        })
        .collect()
}

/// Relay `relay`'s score for the pair `a`, `b` (either order): the pair
/// goes to the relay that scores it highest.
fn score(relay: &str, a: &str, b: &str) -> u64 {
    let (low, high) = if a <= b { (a, b) } else { (b, a) };
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [relay, low, high] {
        ctx.update(&(part.len() as u64).to_be_bytes());
        ctx.update(part.as_bytes());
    }
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first)
}

impl NetView {
    /// The relay of each pair of node `id` with a peer behind NAT (by the
    /// peer's id), as they would be rendered now.
    fn pair_relays(&self, id: &str) -> Vec<(String, Option<String>)> {
        let Some(me) = self.nodes.get(id) else {
            return Vec::new();
        };
        let live: Vec<&NodeView> = self
            .nodes
            .values()
            .filter(|n| n.live_relay().is_some())
            .collect();
        self.nodes
            .values()
            .filter(|p| p.row.id != id && p.behind_nat())
            .map(|p| {
                let relay = choose(&live, |r| *r, me, p).map(|r| r.row.id.clone());
                (p.row.id.clone(), relay)
            })
            .collect()
    }
}

impl Hub {
    /// A node reported its relay port (checked by the caller: not 0, the
    /// node publishes an endpoint); `None` leaves what it said (it is
    /// forgotten when its stream closes). The first time, the node gets
    /// its relay key. Returns whether the relays changed (the caller then
    /// publishes the node).
    pub fn relay_reported(&self, netid: &str, id: &str, port: Option<u16>) -> bool {
        let mut inner = self.write();
        let Some(node) = inner.node_mut(netid, id) else {
            return false;
        };
        let Some(port) = port else {
            return false;
        };
        let before = (node.relay_port, node.live_relay());
        node.relay_port = Some(port);
        if node.relay_key.is_none() {
            node.relay_key = Some(Secret::new());
        }
        before != (node.relay_port, node.live_relay())
    }

    /// A node reported its round trips to relays (checked:
    /// [`check_relay_rtts`]); `None` leaves what it said. Ids that are not
    /// relays of its network are left out; the rest replace what it said
    /// before, in buckets ([`rebucket`]). Returns whether that moved the
    /// relay of one of its pairs: the caller then publishes the node, and
    /// its next change re-renders its pairs (`Change::own_pairs`).
    pub fn relay_rtts_reported(
        &self,
        netid: &str,
        id: &str,
        rtts: Option<Vec<(String, u64)>>,
    ) -> bool {
        let Some(rtts) = rtts else {
            return false;
        };
        let mut inner = self.write();
        let Some(view) = inner.networks.get_mut(netid) else {
            return false;
        };
        let Some(me) = view.nodes.get(id) else {
            return false;
        };
        let mut buckets = BTreeMap::new();
        for (relay, rtt) in rtts {
            let is_relay = relay != id
                && view
                    .nodes
                    .get(&relay)
                    .is_some_and(|n| n.relay_key.is_some());
            if !is_relay {
                continue;
            }
            let b = rebucket(me.relay_rtts.get(&relay).copied(), rtt);
            buckets
                .entry(relay)
                .and_modify(|old: &mut u64| *old = (*old).min(b))
                .or_insert(b);
        }
        if buckets == me.relay_rtts {
            return false;
        }
        let before = me.behind_nat().then(|| view.pair_relays(id));
        if let Some(me) = view.nodes.get_mut(id) {
            me.relay_rtts = buckets;
        }
        let moved = before.is_some_and(|before| before != view.pair_relays(id));
        if moved && let Some(me) = view.nodes.get_mut(id) {
            me.pairs_moved = true;
        }
        moved
    }

    /// The networks whose pairs behind NAT have relay credentials that
    /// were last handed out [`REFRESH_HOURS`] ago or more, each with one of
    /// its live relays (the change is recorded as that node's).
    pub fn relay_refresh_due(&self, now: u64) -> Vec<(String, String)> {
        let inner = self.read();
        let hour = now / 3600;
        inner
            .networks
            .iter()
            .filter(|(_, v)| v.relays_hour.saturating_add(REFRESH_HOURS) <= hour)
            .filter(|(_, v)| v.nodes.values().filter(|n| n.behind_nat()).nth(1).is_some())
            .filter_map(|(netid, v)| {
                let relay = v.nodes.values().find(|n| n.live_relay().is_some())?;
                Some((netid.clone(), relay.row.id.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{ChangeKind, render_node};
    use crate::store::NodeRow;
    use bgp4mesh_api::StreamEvent;
    use bgp4mesh_api::relay::{Bind, verify};
    use std::time::{Duration, Instant};

    const NOW: u64 = 1_800_000_000;

    use crate::hub::fixtures::network;

    /// [`crate::hub::fixtures::node`], named `name-ID`.
    fn node(id: &str, endpoint: Option<&str>) -> NodeRow {
        NodeRow {
            name: format!("name-{id}"),
            ..crate::hub::fixtures::node(id, endpoint)
        }
    }

    /// Nodes `nat` behind NAT (candidates reported), public `relays`
    /// (192.0.2.1, ... and [2001:db8::N] from the third on) relaying on
    /// 51821, and a public "pub"; every stream open.
    fn hub(nat: &[&str], relays: &[&str]) -> Hub {
        let mut rows: Vec<NodeRow> = nat.iter().map(|id| node(id, None)).collect();
        for (i, id) in relays.iter().enumerate() {
            let endpoint = if i < 2 {
                format!("192.0.2.{}", i + 1)
            } else {
                format!("[2001:db8::{}]:51820", i + 1)
            };
            rows.push(node(id, Some(&endpoint)));
        }
        rows.push(node("pub", Some("198.51.100.9:51820")));
        let ids: Vec<String> = rows.iter().map(|r| r.id.clone()).collect();
        let hub = Hub::load(1, vec![network()], rows, Vec::new());
        for id in &ids {
            hub.stream_changed("mynet", id, 1);
        }
        for id in nat {
            hub.candidates_reported("mynet", id, Some(vec!["203.0.113.9:40000".into()]), None);
        }
        for id in relays {
            assert!(hub.relay_reported("mynet", id, Some(51821)));
        }
        // What the report handler does: publishes each.
        for id in nat.iter().chain(relays) {
            hub.node_changed(1, "mynet", id, |old| old.expect("the node"));
        }
        hub
    }

    fn key_of(hub: &Hub, id: &str) -> RelayKey {
        hub.node("mynet", id)
            .and_then(|n| n.relay_key)
            .map(|k| k.0)
            .expect("a relay key")
    }

    fn path(hub: &Hub, viewer: &str, peer: &str) -> Option<RelayPath> {
        let state = hub.state("mynet", viewer, NOW).expect("state");
        state
            .peers
            .into_iter()
            .find(|p| p.node_id == peer)
            .expect("the peer")
            .relay
    }

    #[test]
    fn both_ends_get_the_same_channel_opposite_sides_and_credentials_the_relay_takes() {
        let hub = hub(&["a", "b"], &["r1"]);
        let ab = path(&hub, "a", "b").expect("a's path");
        let ba = path(&hub, "b", "a").expect("b's path");
        assert_eq!((ab.node_id.as_str(), ab.name.as_str()), ("r1", "name-r1"));
        assert_eq!(
            ab.address, "192.0.2.1:51821",
            "the endpoint's IP, the relay port"
        );
        assert_eq!(ab.channel, ba.channel);
        assert_eq!(ab.channel.len(), 16);
        assert_eq!((ab.side, ba.side), (0, 1), "a sorts first");
        assert_eq!(ab.expires, (NOW / 3600 + 25) * 3600);
        assert!(ab.expires >= NOW + 86400);
        let key = key_of(&hub, "r1");
        for p in [&ab, &ba] {
            let mut channel = [0u8; 8];
            let mut mac = [0u8; 32];
            for (i, b) in channel.iter_mut().enumerate() {
                *b = u8::from_str_radix(&p.channel[2 * i..2 * i + 2], 16).expect("hex");
            }
            for (i, b) in mac.iter_mut().enumerate() {
                *b = u8::from_str_radix(&p.mac[2 * i..2 * i + 2], 16).expect("hex");
            }
            let bind = Bind {
                channel,
                side: p.side,
                expires: p.expires,
                mac,
            };
            assert!(verify(&key, &bind, NOW), "{p:?}");
            assert!(!verify(&[0; 32], &bind, NOW), "another key");
        }
        // The same render again, within the hour, is the same peer.
        let later = hub.state("mynet", "a", NOW + 60).expect("a");
        let again = later.peers.iter().find(|p| p.node_id == "b");
        assert_eq!(again.and_then(|p| p.relay.clone()), Some(ab));
        // Public nodes, and nodes behind NAT looking at public ones, get
        // no relay path.
        assert_eq!(path(&hub, "pub", "a"), None);
        assert_eq!(path(&hub, "a", "pub"), None);
        assert_eq!(path(&hub, "a", "r1"), None);
        assert_eq!(path(&hub, "r1", "a"), None);
    }

    #[test]
    fn the_key_goes_to_the_relay_alone_and_its_port_shows_while_it_is_live() {
        let hub = hub(&["a", "b"], &["r1"]);
        let own = hub.state("mynet", "r1", NOW).expect("r1");
        assert_eq!(own.relay_key, Some(hex(&key_of(&hub, "r1"))));
        assert_eq!(own.relay_key.as_ref().map(String::len), Some(64));
        assert_eq!(own.node.relay_port, Some(51821));
        for other in ["a", "b", "pub"] {
            let state = hub.state("mynet", other, NOW).expect("state");
            assert_eq!(state.relay_key, None, "{other}");
            let text = serde_json::to_string(&state).expect("json");
            assert!(!text.contains(&hex(&key_of(&hub, "r1"))), "{other}");
        }
        let r1 = hub.node("mynet", "r1").expect("r1");
        assert!(!format!("{r1:?}").contains(&format!("{:?}", key_of(&hub, "r1"))));
        let shown = serde_json::to_string(&render_node(&network(), &r1, NOW)).expect("json");
        assert!(!shown.contains(&hex(&key_of(&hub, "r1"))));
        assert!(shown.contains("\"relay_port\":51821"));
        // Its stream closes: not live, the port is forgotten (said again
        // when it is back), the key is kept.
        let key = key_of(&hub, "r1");
        assert!(hub.stream_changed("mynet", "r1", -1), "the relays changed");
        let r1 = hub.node("mynet", "r1").expect("r1");
        assert_eq!(render_node(&network(), &r1, NOW).relay_port, None);
        assert_eq!(path(&hub, "a", "b"), None, "no relay left");
        hub.stream_changed("mynet", "r1", 1);
        assert!(hub.relay_reported("mynet", "r1", Some(51821)));
        assert_eq!(key_of(&hub, "r1"), key, "the same key");
        assert!(!hub.relay_reported("mynet", "r1", Some(51821)), "no change");
        assert!(!hub.relay_reported("mynet", "r1", None), "None leaves it");
        assert!(path(&hub, "a", "b").is_some());
    }

    #[test]
    fn a_silent_relay_hands_its_pairs_to_another_or_to_none() {
        let hub = hub(&["a", "b"], &["r1", "r2"]);
        let t0 = Instant::now();
        for r in ["r1", "r2"] {
            assert!(!hub.pulsed("mynet", r, t0, None, None), "live already");
        }
        let first = path(&hub, "a", "b").expect("a path").node_id;
        let other = if first == "r1" { "r2" } else { "r1" };
        // Its pulses stop, the other's go on.
        let t1 = t0 + Duration::from_millis(700);
        hub.pulsed("mynet", other, t1, None, None);
        let mut sub = hub.subscribe("mynet", "a", None, NOW).expect("a");
        assert_eq!(
            hub.silence_quiet_gateways(t1, Duration::from_millis(600)),
            vec![("mynet".to_string(), first.clone())]
        );
        // What the watchdog publishes: one change, and a sees b move.
        hub.node_changed(2, "mynet", &first, |old| old.expect("relay"));
        let change = sub.live.try_recv().expect("a change");
        assert!(change.relays);
        let events = hub.event_for("mynet", &change, "a", NOW);
        let moved = events.iter().find_map(|e| match e {
            StreamEvent::PeerUpsert { revision: 2, peer } if peer.node_id == "b" => {
                peer.relay.clone()
            }
            _ => None,
        });
        assert_eq!(moved.map(|r| r.node_id), Some(other.to_string()));
        // Back: the pair returns to it.
        assert!(hub.pulsed("mynet", &first, t1, None, None));
        hub.node_changed(3, "mynet", &first, |old| old.expect("relay"));
        assert_eq!(path(&hub, "a", "b").map(|r| r.node_id), Some(first.clone()));
        // The other goes too (its stream closes), then the first: no
        // relay is left, and the path goes with a published change.
        assert!(hub.stream_changed("mynet", other, -1));
        hub.node_changed(4, "mynet", other, |old| old.expect("relay"));
        assert!(hub.stream_changed("mynet", &first, -1));
        hub.node_changed(5, "mynet", &first, |old| old.expect("relay"));
        let change = loop {
            let change = sub.live.try_recv().expect("a change");
            if change.revision == 5 {
                break change;
            }
        };
        assert!(change.relays);
        let events = hub.event_for("mynet", &change, "a", NOW);
        assert!(events.iter().any(|e| matches!(
            e,
            StreamEvent::PeerUpsert { peer, .. } if peer.node_id == "b" && peer.relay.is_none()
        )));
    }

    #[test]
    fn pairs_spread_over_relays_and_a_relay_that_goes_moves_only_its_own() {
        let ids: Vec<String> = (0..15).map(|i| format!("n{i:02}")).collect();
        let nat: Vec<&str> = ids.iter().map(String::as_str).collect();
        let hub = hub(&nat, &["r1", "r2", "r3"]);
        // Two relays: r3 goes.
        hub.stream_changed("mynet", "r3", -1);
        let mut per_relay = std::collections::BTreeMap::<String, usize>::new();
        let mut before = Vec::new();
        let mut pairs = 0;
        'all: for (i, a) in nat.iter().enumerate() {
            for b in &nat[i + 1..] {
                if pairs == 100 {
                    break 'all;
                }
                pairs += 1;
                let p = path(&hub, a, b).expect("a path");
                assert_eq!(path(&hub, b, a).map(|q| q.node_id), Some(p.node_id.clone()));
                *per_relay.entry(p.node_id.clone()).or_default() += 1;
                before.push((*a, *b, p.node_id));
            }
        }
        let counts: Vec<usize> = per_relay.values().copied().collect();
        assert_eq!(counts.len(), 2, "{per_relay:?}");
        assert!(
            counts.iter().all(|&c| (35..=65).contains(&c)),
            "{per_relay:?}"
        );
        // r1 goes: its pairs go to r2, r2's stay.
        hub.stream_changed("mynet", "r1", -1);
        for (a, b, relay) in before {
            let now = path(&hub, a, b).map(|p| p.node_id);
            assert_eq!(now.as_deref(), Some("r2"), "{a}-{b} was on {relay}");
        }
        // An IPv6 relay's address is bracketed.
        hub.stream_changed("mynet", "r3", 1);
        hub.stream_changed("mynet", "r2", -1);
        hub.relay_reported("mynet", "r3", Some(51821));
        assert_eq!(
            path(&hub, "n00", "n01").map(|p| p.address),
            Some("[2001:db8::3]:51821".to_string())
        );
    }

    #[test]
    fn a_node_going_behind_nat_gets_its_peers_behind_nat_with_their_relay() {
        let hub = hub(&["a", "b"], &["r1"]);
        // c joins with no candidates yet, then reports them.
        hub.node_changed(3, "mynet", "c", |_| {
            let mut c = NodeView::new(node("c", None), None);
            c.streams = 1;
            c
        });
        let mut sub = hub.subscribe("mynet", "c", None, NOW).expect("c");
        assert!(hub.candidates_reported("mynet", "c", Some(vec!["203.0.113.7:1".into()]), None));
        hub.node_changed(4, "mynet", "c", |old| old.expect("c"));
        let change = sub.live.try_recv().expect("change");
        assert!(matches!(&change.kind, ChangeKind::NodeUpsert(id) if id == "c"));
        assert!(change.relays, "c is behind NAT now");
        let events = hub.event_for("mynet", &change, "c", NOW);
        assert!(matches!(
            events.first(),
            Some(StreamEvent::SelfUpdate { .. })
        ));
        let with_relay: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                StreamEvent::PeerUpsert { peer, .. } if peer.relay.is_some() => {
                    Some(peer.node_id.as_str())
                }
                _ => None,
            })
            .collect();
        assert_eq!(with_relay, vec!["a", "b"]);
        // A public node sees only c's change.
        let events = hub.event_for("mynet", &change, "pub", NOW);
        assert!(matches!(
            events.as_slice(),
            [StreamEvent::PeerUpsert { peer, .. }] if peer.node_id == "c" && peer.relay.is_none()
        ));
        // A change that moves no relay path re-renders nothing else.
        hub.node_changed(5, "mynet", "a", |old| old.expect("a"));
        let change = sub.live.try_recv().expect("change");
        assert!(!change.relays);
        assert_eq!(hub.event_for("mynet", &change, "c", NOW).len(), 1);
    }

    #[test]
    fn credentials_are_refreshed_every_twelve_hours() {
        let hub = hub(&["a", "b"], &["r1"]);
        assert_eq!(
            hub.relay_refresh_due(NOW),
            vec![("mynet".to_string(), "r1".to_string())],
            "never handed out"
        );
        hub.refresh_relays(2, "mynet", "r1", NOW);
        assert!(hub.relay_refresh_due(NOW + 11 * 3600).is_empty());
        assert_eq!(hub.relay_refresh_due(NOW + 12 * 3600).len(), 1);
        let lone = self::hub(&["a"], &["r1"]);
        assert!(lone.relay_refresh_due(NOW).is_empty(), "no pair behind NAT");
    }

    /// Node `id` reports its round trips (ms) to relays.
    fn rtts(hub: &Hub, id: &str, ms: &[(&str, u64)]) -> bool {
        let rtts = ms
            .iter()
            .map(|(r, ms)| (r.to_string(), ms * 1000))
            .collect();
        hub.relay_rtts_reported("mynet", id, Some(rtts))
    }

    /// `n` nodes behind NAT, and the first 100 of their pairs.
    fn nat_nodes(n: usize) -> (Vec<String>, Vec<(usize, usize)>) {
        let ids = (0..n).map(|i| format!("n{i:02}")).collect();
        let pairs = (0..n)
            .flat_map(|i| (i + 1..n).map(move |j| (i, j)))
            .take(100)
            .collect();
        (ids, pairs)
    }

    fn relay_of(hub: &Hub, a: &str, b: &str) -> Option<String> {
        let ab = path(hub, a, b).map(|p| p.node_id);
        assert_eq!(path(hub, b, a).map(|p| p.node_id), ab, "{a}-{b}: both ends");
        ab
    }

    #[test]
    fn round_trips_go_in_buckets_and_jitter_keeps_them() {
        assert_eq!(bucket(0), 1);
        assert_eq!(bucket(1), 1);
        assert_eq!(bucket(9_000), 16_384);
        assert_eq!(bucket(16_384), 16_384);
        assert_eq!(bucket(16_385), 32_768);
        assert_eq!(bucket(MAX_RELAY_RTT_US), 1 << 24);
        // Within an eighth of its edges a round trip keeps its bucket.
        assert_eq!(rebucket(Some(16_384), 18_432), 16_384);
        assert_eq!(rebucket(Some(16_384), 7_169), 16_384);
        assert_eq!(rebucket(Some(16_384), 18_433), 32_768);
        assert_eq!(rebucket(Some(16_384), 7_168), 8_192);
        assert_eq!(rebucket(Some(32_768), 17_000), 32_768, "back down: kept");
        assert_eq!(rebucket(None, 17_000), 32_768);
    }

    #[test]
    fn relay_rtts_are_checked_and_ids_not_relays_are_left_out() {
        let one = |us| RelayRtt {
            node_id: "r1".into(),
            rtt_us: us,
        };
        assert_eq!(
            check_relay_rtts(&[one(5), one(MAX_RELAY_RTT_US)]),
            Ok(vec![
                ("r1".to_string(), 5),
                ("r1".to_string(), MAX_RELAY_RTT_US)
            ])
        );
        let too_long = check_relay_rtts(&[one(MAX_RELAY_RTT_US + 1)]).expect_err("too long");
        assert!(too_long.starts_with("relay_rtts: "), "{too_long}");
        assert!(
            too_long.contains("10000001") && too_long.contains("10 s"),
            "{too_long}"
        );
        let many = vec![one(5); MAX_RELAY_RTTS + 1];
        let too_many = check_relay_rtts(&many).expect_err("too many");
        assert!(too_many.starts_with("relay_rtts: 65 given"), "{too_many}");
        assert!(check_relay_rtts(&many[1..]).is_ok());

        let hub = hub(&["a", "b"], &["r1", "r2"]);
        rtts(
            &hub,
            "a",
            &[
                ("r1", 10),
                ("nobody", 1),
                ("pub", 1),
                ("b", 1),
                ("a", 1),
                ("r1", 30),
            ],
        );
        let a = hub.node("mynet", "a").expect("a");
        assert_eq!(
            a.relay_rtts,
            BTreeMap::from([("r1".to_string(), 16_384)]),
            "relays only, the lowest of repeats"
        );
        // None leaves them; a report replaces them.
        assert!(!hub.relay_rtts_reported("mynet", "a", None));
        assert_eq!(hub.node("mynet", "a").expect("a").relay_rtts, a.relay_rtts);
        rtts(&hub, "a", &[("r2", 3)]);
        let a = hub.node("mynet", "a").expect("a");
        assert_eq!(a.relay_rtts, BTreeMap::from([("r2".to_string(), 4_096)]));
    }

    #[test]
    fn a_pair_takes_a_near_relay_over_a_far_one() {
        let (ids, pairs) = nat_nodes(15);
        let nat: Vec<&str> = ids.iter().map(String::as_str).collect();
        let hub = hub(&nat, &["r1", "r2", "r3"]);
        for (i, id) in nat.iter().enumerate() {
            // r2 near for all; r1 near for half of them only; r3 far.
            let r1 = if i % 2 == 0 { 9 } else { 150 };
            rtts(&hub, id, &[("r1", r1), ("r2", 12), ("r3", 80)]);
        }
        for &(i, j) in &pairs {
            let expected = if i % 2 == 0 && j % 2 == 0 {
                // 16+16 ms and 16+16 ms: both near, by hash.
                ["r1", "r2"]
                    .into_iter()
                    .max_by_key(|r| (score(r, nat[i], nat[j]), *r))
            } else {
                // r1: 16+256 ms, r2 32 ms: r2 alone is near.
                Some("r2")
            };
            assert_eq!(
                relay_of(&hub, nat[i], nat[j]).as_deref(),
                expected,
                "{i}-{j}"
            );
        }
        // The threshold: best * 1.5 + 5 ms. a: r1 8, r2 16; b: r1 8, r2 8
        // (costs 16 and 24 ms: 24 <= 29, near); then b's r2 at 16 (32 > 29).
        let hub = self::hub(&["a", "b"], &["r1", "r2"]);
        let hashed = ["r1", "r2"]
            .into_iter()
            .max_by_key(|r| (score(r, "a", "b"), *r))
            .expect("one");
        rtts(&hub, "a", &[("r1", 8), ("r2", 16)]);
        rtts(&hub, "b", &[("r1", 8), ("r2", 8)]);
        assert_eq!(relay_of(&hub, "a", "b").as_deref(), Some(hashed));
        rtts(&hub, "b", &[("r1", 8), ("r2", 16)]);
        assert_eq!(relay_of(&hub, "a", "b").as_deref(), Some("r1"));
    }

    #[test]
    fn near_relays_share_the_pairs_and_one_that_goes_hands_them_to_the_next_near_one() {
        let (ids, pairs) = nat_nodes(15);
        let nat: Vec<&str> = ids.iter().map(String::as_str).collect();
        let hub = hub(&nat, &["r1", "r2", "r3", "far"]);
        for id in &nat {
            rtts(&hub, id, &[("r1", 10), ("r2", 11), ("r3", 14), ("far", 90)]);
        }
        let mut per_relay = BTreeMap::<String, usize>::new();
        let mut before = Vec::new();
        for &(i, j) in &pairs {
            let relay = relay_of(&hub, nat[i], nat[j]).expect("a relay");
            *per_relay.entry(relay.clone()).or_default() += 1;
            before.push((i, j, relay));
        }
        assert_eq!(per_relay.len(), 3, "{per_relay:?}");
        assert!(
            per_relay.values().all(|&c| (20..=47).contains(&c)),
            "{per_relay:?}"
        );
        // r1 goes: its pairs go to r2 or r3 by their score (never to the
        // far one), the others stay.
        hub.stream_changed("mynet", "r1", -1);
        let mut moved = BTreeMap::<String, usize>::new();
        for (i, j, relay) in before {
            let now = relay_of(&hub, nat[i], nat[j]).expect("a relay");
            if relay == "r1" {
                let next = ["r2", "r3"]
                    .into_iter()
                    .max_by_key(|r| (score(r, nat[i], nat[j]), *r))
                    .expect("one");
                assert_eq!(now, next, "{i}-{j}");
                *moved.entry(now).or_default() += 1;
            } else {
                assert_eq!(now, relay, "{i}-{j} stays");
            }
        }
        assert_eq!(moved.len(), 2, "spread over both: {moved:?}");
        // Then r2 and r3 go: the far one is all that is left.
        hub.stream_changed("mynet", "r2", -1);
        hub.stream_changed("mynet", "r3", -1);
        assert_eq!(relay_of(&hub, "n00", "n01").as_deref(), Some("far"));
    }

    #[test]
    fn relays_without_round_trips_are_used_only_when_none_has_one() {
        let (ids, pairs) = nat_nodes(15);
        let nat: Vec<&str> = ids.iter().map(String::as_str).collect();
        let hub = hub(&nat, &["r1", "r2", "r3"]);
        // Nothing measured: hashed over all, as before.
        let hashed = |i: usize, j: usize| {
            ["r1", "r2", "r3"]
                .into_iter()
                .max_by_key(|r| (score(r, nat[i], nat[j]), *r))
                .map(String::from)
        };
        for &(i, j) in &pairs {
            assert_eq!(relay_of(&hub, nat[i], nat[j]), hashed(i, j), "{i}-{j}");
        }
        // n00 measured r3 (slow), nobody else anything: still hashed (a
        // cost needs both ends).
        rtts(&hub, "n00", &[("r3", 300)]);
        for (j, peer) in nat.iter().enumerate().skip(1) {
            assert_eq!(relay_of(&hub, "n00", peer), hashed(0, j));
        }
        // n01 measured it too: the pair n00-n01 takes r3, the only one
        // with a cost, slow as it is.
        rtts(&hub, "n01", &[("r3", 300)]);
        assert_eq!(relay_of(&hub, "n00", "n01").as_deref(), Some("r3"));
        assert_eq!(relay_of(&hub, "n00", "n02"), hashed(0, 2));
        // r3 goes: hashed over the others again.
        hub.stream_changed("mynet", "r3", -1);
        let left = ["r1", "r2"]
            .into_iter()
            .max_by_key(|r| (score(r, "n00", "n01"), *r));
        assert_eq!(relay_of(&hub, "n00", "n01").as_deref(), left);
    }

    #[test]
    fn jitter_publishes_nothing_and_a_moved_relay_one_change_for_both_ends() {
        let hub = hub(&["a", "b", "c"], &["r1", "r2"]);
        for id in ["a", "b", "c"] {
            rtts(&hub, id, &[("r1", 10), ("r2", 10)]);
        }
        let first = relay_of(&hub, "a", "b").expect("a relay");
        let other = if first == "r1" { "r2" } else { "r1" };
        let mut sub = hub.subscribe("mynet", "b", None, NOW).expect("b");
        // Jitter within the buckets, and a far bucket moving (no path
        // moves): nothing to publish.
        for ms in [12, 15, 9, 18, 8] {
            assert!(
                !rtts(&hub, "a", &[(first.as_str(), ms), (other, 10)]),
                "{ms}"
            );
        }
        // 16+32 ms is still near 16+16 ms: a bucket moved, no path.
        assert!(!rtts(&hub, "a", &[(first.as_str(), 10), (other, 20)]));
        let a = hub.node("mynet", "a").expect("a");
        assert_eq!(a.relay_rtts.get(other), Some(&32_768));
        assert!(!a.pairs_moved);
        assert!(sub.live.try_recv().is_err(), "nothing published");
        // The chosen relay gets far for a: a's pairs move, in one change.
        assert!(rtts(&hub, "a", &[(first.as_str(), 120), (other, 10)]));
        assert!(hub.node("mynet", "a").expect("a").pairs_moved);
        hub.node_changed(2, "mynet", "a", |old| old.expect("a"));
        assert!(!hub.node("mynet", "a").expect("a").pairs_moved);
        let change = sub.live.try_recv().expect("a change");
        assert!(change.own_pairs && !change.relays);
        assert!(sub.live.try_recv().is_err(), "one change");
        let peer_path = |events: &[StreamEvent], peer: &str| {
            events.iter().find_map(|e| match e {
                StreamEvent::PeerUpsert {
                    revision: 2,
                    peer: p,
                } if p.node_id == peer => Some(p.relay.clone()),
                _ => None,
            })
        };
        let for_a = hub.event_for("mynet", &change, "a", NOW);
        let for_b = hub.event_for("mynet", &change, "b", NOW);
        let ab = peer_path(&for_a, "b").flatten().expect("a's path to b");
        let ba = peer_path(&for_b, "a").flatten().expect("b's path to a");
        assert_eq!((ab.node_id.as_str(), ba.node_id.as_str()), (other, other));
        assert_eq!(ab.channel, ba.channel);
        assert_eq!((ab.side, ba.side), (0, 1));
        assert!(peer_path(&for_a, "c").is_some(), "a gets all its pairs");
        assert_eq!(for_b.len(), 1, "b gets a alone: {for_b:?}");
        assert_eq!(hub.event_for("mynet", &change, "pub", NOW).len(), 1);
        assert_eq!(hub.event_for("mynet", &change, "r1", NOW).len(), 1);
        // Snapshots agree with what was published.
        assert_eq!(path(&hub, "a", "b"), Some(ab));
        assert_eq!(path(&hub, "b", "a"), Some(ba));
    }

    #[test]
    fn peers_show_a_relays_port_while_it_is_live() {
        let hub = hub(&["a", "b"], &["r1"]);
        let port = |viewer: &str| {
            hub.state("mynet", viewer, NOW)
                .expect("state")
                .peers
                .into_iter()
                .find(|p| p.node_id == "r1")
                .and_then(|p| p.relay_port)
        };
        assert_eq!((port("a"), port("pub")), (Some(51821), Some(51821)));
        let peer_b = hub.state("mynet", "a", NOW).expect("a").peers;
        assert!(
            peer_b
                .iter()
                .all(|p| p.node_id == "r1" || p.relay_port.is_none())
        );
        // It goes: every stream gets it without its port, in one change.
        let mut sub = hub.subscribe("mynet", "a", None, NOW).expect("a");
        assert!(hub.stream_changed("mynet", "r1", -1));
        hub.node_changed(2, "mynet", "r1", |old| old.expect("r1"));
        let change = sub.live.try_recv().expect("change");
        for viewer in ["a", "b", "pub"] {
            let events = hub.event_for("mynet", &change, viewer, NOW);
            assert!(
                events.iter().any(|e| matches!(e,
                    StreamEvent::PeerUpsert { peer, .. } if peer.node_id == "r1" && peer.relay_port.is_none())),
                "{viewer}: {events:?}"
            );
        }
        // Back: with it again.
        hub.stream_changed("mynet", "r1", 1);
        assert!(hub.relay_reported("mynet", "r1", Some(51821)));
        hub.node_changed(3, "mynet", "r1", |old| old.expect("r1"));
        let change = sub.live.try_recv().expect("change");
        let events = hub.event_for("mynet", &change, "a", NOW);
        assert!(events.iter().any(|e| matches!(e,
            StreamEvent::PeerUpsert { peer, .. } if peer.node_id == "r1" && peer.relay_port == Some(51821))));
    }

    /// Cost of a relay change in a network of 1000 nodes, 50 behind NAT:
    /// what every stream gets from it, rendered.
    #[test]
    fn a_relay_change_in_a_thousand_nodes_is_cheap() {
        let nat: Vec<String> = (0..50).map(|i| format!("nat{i:02}")).collect();
        let nat: Vec<&str> = nat.iter().map(String::as_str).collect();
        let hub = hub(&nat, &["r1", "r2"]);
        for i in 0..947 {
            let id = format!("p{i:03}");
            hub.node_changed(2, "mynet", &id, |_| {
                let mut n = NodeView::new(node(&id, Some("198.51.100.1")), None);
                n.streams = 1;
                n
            });
        }
        assert_eq!(hub.node_count("mynet"), 1000);
        let mut sub = hub.subscribe("mynet", "pub", None, NOW).expect("sub");
        let started = Instant::now();
        hub.stream_changed("mynet", "r1", -1);
        hub.node_changed(3, "mynet", "r1", |old| old.expect("r1"));
        let change = sub.live.try_recv().expect("change");
        let ids: Vec<String> = hub.nodes(None).into_iter().map(|(_, n)| n.row.id).collect();
        let mut events = 0;
        for id in &ids {
            events += hub.event_for("mynet", &change, id, NOW).len();
        }
        let took = started.elapsed();
        // Each of 1000 streams gets the relay's change; the 50 behind NAT
        // get their 49 peers behind NAT too, and the relay itself the 50
        // (without paths: it is public).
        assert_eq!(events, 1000 + 50 * 49 + 50);
        eprintln!("a relay change: {events} events rendered in {took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}
