//! Relays: public nodes that forward the WireGuard datagrams of pairs
//! behind NAT (`bgp4mesh_api::relay`). A node becomes one by reporting its
//! `relay_port`; the controller then makes it a *relay key* (memory only:
//! a restarted controller makes new ones, and every credential with them)
//! that only the relay itself ever gets.
//!
//! A relay is *live* while it publishes an endpoint, its stream is open
//! and its pulses keep coming. For a pair of nodes that are both behind
//! NAT (both report candidates and publish no endpoint), each live relay
//! scores the pair (rendezvous hashing) and the highest carries it: pairs
//! spread over relays, and a relay that goes moves only its own pairs.
//! Each node of the pair gets the relay's address, the pair's channel,
//! its side and its credential (`Peer.relay`), rendered for it.

use std::net::{IpAddr, SocketAddr};

use bgp4mesh_api::RelayPath;
use bgp4mesh_api::relay::{RelayKey, channel_of, credential_mac};
use rand_core::RngCore;

use super::{Hub, NetView, NodeView};
use crate::secrets::hex;

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
        let relay = self
            .live
            .iter()
            .filter(|r| r.node.row.id != me.row.id && r.node.row.id != peer.row.id)
            .max_by_key(|r| {
                (
                    score(&r.node.row.id, &me.row.id, &peer.row.id),
                    &r.node.row.id,
                )
            })?;
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
    use crate::store::{NetworkRow, NodeRow};
    use bgp4mesh_api::StreamEvent;
    use bgp4mesh_api::relay::{Bind, verify};
    use std::time::{Duration, Instant};

    const NOW: u64 = 1_800_000_000;

    fn network() -> NetworkRow {
        NetworkRow {
            netid: "mynet".into(),
            addressrange: Some("44.30.127.0/24".into()),
            addressrange6: None,
            mtu: 1420,
            listen_port: 51820,
            persistent_keepalive: 20,
            created_at: 0,
        }
    }

    fn node(id: &str, endpoint: Option<&str>) -> NodeRow {
        NodeRow {
            id: id.into(),
            network: "mynet".into(),
            name: format!("name-{id}"),
            public_key: format!("key-{id}"),
            credential_hash: format!("hash-{id}"),
            address: None,
            address6: None,
            endpoint: endpoint.map(String::from),
            listen_port: 51820,
            tags: Vec::new(),
            created_at: 0,
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
