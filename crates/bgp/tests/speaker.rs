//! Speakers wired together in memory on virtual time: route propagation,
//! policy, iBGP rules, and the seeds' scenarios, with no sockets.

// Its helpers are test code too: a bad literal or a network that never
// settles stops the test there.
#![allow(clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bgp4mesh_bgp::policy::{Action, Match, Policy, PrefixRange, Rule, Verdict};
use bgp4mesh_bgp::rib::{NeighborId, PathSource, Selection};
use bgp4mesh_bgp::session::ConnId;
use bgp4mesh_bgp::speaker::{
    Event, NeighborConfig, RestartEnd, RouteChange, Speaker, SpeakerConfig, StaticKind,
    StaticRoute, Upstream,
};
use bgp4mesh_bgp::wire::Family;
use ipnet::IpNet;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn pfx(s: &str) -> IpNet {
    s.parse().expect("prefix")
}

fn all() -> Arc<Policy> {
    Arc::new(Policy::accept_all())
}

fn neighbor(name: &str, address: &str, remote_as: u32) -> NeighborConfig {
    let mut n = NeighborConfig::new(name, ip(address), remote_as, all(), all());
    n.connect_retry = Duration::from_secs(1);
    n.idle_hold = Duration::from_secs(1);
    n.idle_hold_max = Duration::from_secs(4);
    n
}

fn speaker(
    asn: u32,
    id: [u8; 4],
    neighbors: Vec<NeighborConfig>,
    statics: &[&str],
) -> SpeakerConfig {
    SpeakerConfig {
        asn,
        router_id: Ipv4Addr::from(id),
        cluster_id: None,
        selection: Selection::default(),
        neighbors,
        statics: statics
            .iter()
            .map(|p| StaticRoute {
                prefix: pfx(p),
                kind: StaticKind::Blackhole,
            })
            .collect(),
    }
}

/// Speakers joined by links; each link end has an address, and a
/// neighbour is found by the address of the other end.
struct Net {
    speakers: Vec<Speaker>,
    /// (speaker, its address on the link) → (other speaker, other address)
    links: HashMap<(usize, IpAddr), (usize, IpAddr)>,
    /// Connection → the two (speaker, neighbour) ends.
    conns: HashMap<ConnId, [(usize, NeighborId); 2]>,
    next_conn: ConnId,
    now: Instant,
    /// Links that are cut (both addresses): nothing passes.
    down: Vec<(IpAddr, IpAddr)>,
    routes: Vec<HashMap<IpNet, RouteChange>>,
    /// Next hops each speaker asked the driver to resolve.
    watched: Vec<std::collections::HashSet<IpAddr>>,
    /// Bytes each speaker sent to each neighbour and was not yet told
    /// were written (only counted for speakers with a send window).
    unwritten: HashMap<(usize, NeighborId), usize>,
    windowed: Vec<bool>,
    /// Each speaker's End-of-RIB, graceful restart and upstream events, in
    /// order.
    signals: Vec<Vec<Event>>,
    /// Whether a speaker's route changes are installed as soon as they
    /// come (a driver with no kernel): End-of-RIBs are confirmed at once.
    installs_at_once: Vec<bool>,
}

impl Net {
    fn new(configs: Vec<SpeakerConfig>) -> Net {
        let now = Instant::now();
        let n = configs.len();
        Net {
            speakers: configs.into_iter().map(|c| Speaker::new(c, now)).collect(),
            links: HashMap::new(),
            conns: HashMap::new(),
            next_conn: ConnId(1),
            now,
            down: vec![],
            routes: vec![HashMap::new(); n],
            watched: vec![Default::default(); n],
            unwritten: HashMap::new(),
            windowed: vec![false; n],
            signals: vec![Vec::new(); n],
            installs_at_once: vec![true; n],
        }
    }

    fn link(&mut self, a: usize, a_addr: &str, b: usize, b_addr: &str) {
        self.links.insert((a, ip(a_addr)), (b, ip(b_addr)));
        self.links.insert((b, ip(b_addr)), (a, ip(a_addr)));
    }

    fn start(&mut self) {
        for s in &mut self.speakers {
            s.start(self.now);
        }
        self.pump();
    }

    fn local_address(&self, s: usize, n: NeighborId) -> Option<(IpAddr, usize, IpAddr)> {
        let remote = self.speakers[s].neighbor(n)?.config.address;
        self.links
            .iter()
            .find(|(_, (_, r))| *r == remote)
            .and_then(|((owner, local), (other, r))| (*owner == s).then_some((*local, *other, *r)))
    }

    fn is_down(&self, a: IpAddr, b: IpAddr) -> bool {
        self.down
            .iter()
            .any(|(x, y)| (*x == a && *y == b) || (*x == b && *y == a))
    }

    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            for s in 0..self.speakers.len() {
                while let Some(event) = self.speakers[s].poll_event() {
                    moved = true;
                    self.deliver(s, event);
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the network never settles");
    }

    fn deliver(&mut self, s: usize, event: Event) {
        let now = self.now;
        match event {
            Event::Connect { neighbor } => {
                let Some((local, other, remote)) = self.local_address(s, neighbor) else {
                    self.speakers[s].tcp_connect_failed(now, neighbor, "no route to host");
                    return;
                };
                let Some(m) = self.speakers[other].neighbor_by_address(local) else {
                    self.speakers[s].tcp_connect_failed(now, neighbor, "connection refused");
                    return;
                };
                if self.is_down(local, remote) {
                    self.speakers[s].tcp_connect_failed(now, neighbor, "timed out");
                    return;
                }
                let conn = self.next_conn;
                self.next_conn.0 += 1;
                self.conns.insert(conn, [(s, neighbor), (other, m)]);
                self.speakers[s].tcp_connected(now, neighbor, conn, true, local);
                self.speakers[other].tcp_connected(now, m, conn, false, remote);
            }
            Event::Send {
                conn,
                bytes,
                neighbor,
            } => {
                if self.windowed[s] {
                    *self.unwritten.entry((s, neighbor)).or_default() += bytes.len();
                }
                if let Some(ends) = self.conns.get(&conn).copied() {
                    let (o, m) = if ends[0].0 == s { ends[1] } else { ends[0] };
                    self.speakers[o].received(now, m, conn, &bytes);
                }
            }
            Event::Close { conn, .. } => {
                if let Some(ends) = self.conns.remove(&conn) {
                    let (o, m) = if ends[0].0 == s { ends[1] } else { ends[0] };
                    self.speakers[o].tcp_closed(now, m, conn);
                }
            }
            Event::Route(change) => {
                self.routes[s].insert(change.prefix, change);
            }
            Event::WatchNextHop(addr) => {
                self.watched[s].insert(addr);
            }
            Event::UnwatchNextHop(addr) => {
                self.watched[s].remove(&addr);
            }
            Event::EndOfRib { neighbor, .. } => {
                self.signals[s].push(event);
                if self.installs_at_once[s] {
                    self.speakers[s].end_of_rib_installed(neighbor);
                }
            }
            Event::GracefulRestartOver(_) | Event::UpstreamReady(_) => {
                self.signals[s].push(event);
            }
            Event::Log { .. } => {}
        }
    }

    /// Cuts a link: its connections die (as after a hold-timer expiry).
    fn cut(&mut self, a: &str, b: &str) {
        self.down.push((ip(a), ip(b)));
        let doomed: Vec<(ConnId, [(usize, NeighborId); 2])> = self
            .conns
            .iter()
            .filter(|(_, ends)| {
                let addr = |(s, n): (usize, NeighborId)| {
                    self.speakers[s].neighbor(n).map(|x| x.config.address)
                };
                let (x, y) = (addr(ends[0]), addr(ends[1]));
                (x == Some(ip(a)) || x == Some(ip(b))) && (y == Some(ip(a)) || y == Some(ip(b)))
            })
            .map(|(c, e)| (*c, *e))
            .collect();
        for (conn, ends) in doomed {
            self.conns.remove(&conn);
            for (s, n) in ends {
                self.speakers[s].tcp_closed(self.now, n, conn);
            }
        }
        self.pump();
    }

    fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        loop {
            let next = self
                .speakers
                .iter()
                .filter_map(|s| s.poll_timeout())
                .filter(|t| *t <= end)
                .min();
            let Some(t) = next else { break };
            self.now = t.max(self.now);
            for s in &mut self.speakers {
                s.handle_timeout(self.now);
            }
            self.pump();
        }
        self.now = end;
    }

    fn best(&self, s: usize, prefix: &str) -> Option<(PathSource, Vec<u32>, Option<u32>)> {
        let entry = self.speakers[s].rib().get(&pfx(prefix))?;
        let b = entry.best()?;
        Some((
            b.source,
            b.attrs.as_path.asns().collect(),
            b.attrs.local_pref,
        ))
    }
}

/// Seed 004's border (AS 65000, a static for its block) linked to its ISP
/// (AS 65001), not started.
fn border_and_isp() -> Net {
    border_with_statics_and_isp(&["44.30.127.0/24"])
}

/// [`border_and_isp`] with these static routes on the border.
fn border_with_statics_and_isp(statics: &[&str]) -> Net {
    let mut net = Net::new(vec![
        speaker(
            65000,
            [10, 0, 0, 1],
            vec![neighbor("isp", "172.30.0.1", 65001)],
            statics,
        ),
        speaker(
            65001,
            [10, 0, 0, 2],
            vec![neighbor("border", "172.30.0.100", 65000)],
            &[],
        ),
    ]);
    net.link(0, "172.30.0.100", 1, "172.30.0.1");
    net
}

#[test]
fn static_routes_reach_an_ebgp_neighbour_and_go_when_the_session_does() {
    let mut net = border_and_isp();
    net.start();
    let (source, path, _) = net
        .best(1, "44.30.127.0/24")
        .expect("the ISP has the block");
    assert_eq!(source, PathSource::Neighbor(NeighborId(0)));
    assert_eq!(path, vec![65000]);
    let at_isp = net.speakers[1]
        .rib()
        .get(&pfx("44.30.127.0/24"))
        .and_then(|e| e.best())
        .cloned()
        .expect("best");
    assert_eq!(
        at_isp.attrs.next_hop.map(|h| h.to_string()),
        Some("172.30.0.100".to_string())
    );
    assert_eq!(at_isp.attrs.local_pref, None, "no LOCAL_PREF over eBGP");
    assert!(
        net.routes[1].contains_key(&pfx("44.30.127.0/24")),
        "a route change for the kernel"
    );

    net.cut("172.30.0.100", "172.30.0.1");
    assert_eq!(net.best(1, "44.30.127.0/24"), None);
    assert_eq!(
        net.routes[1]
            .get(&pfx("44.30.127.0/24"))
            .and_then(|c| c.best.clone()),
        None,
        "withdrawn from the kernel"
    );
}

#[test]
fn held_static_routes_are_announced_only_once_released() {
    let mut net = border_and_isp();
    let now = net.now;
    net.speakers[0].hold_origination(now);
    net.start();
    assert!(
        net.speakers[1].neighbor(NeighborId(0)).map(|n| n.state)
            == Some(bgp4mesh_bgp::session::State::Established),
        "the session comes up while the routes are held"
    );
    assert!(
        net.best(1, "44.30.127.0/24").is_none(),
        "nothing announced while held"
    );
    assert!(net.speakers[0].rib().is_empty(), "not even in our own RIB");
    let now = net.now;
    net.speakers[0].release_origination(now);
    net.pump();
    let (source, path, _) = net.best(1, "44.30.127.0/24").expect("announced now");
    assert_eq!(
        (source, path),
        (PathSource::Neighbor(NeighborId(0)), vec![65000])
    );
    // A second release changes nothing.
    net.speakers[0].release_origination(now);
    net.pump();
    assert_eq!(net.speakers[0].rib().len(), 1);
}

/// What the ISP (speaker 1) has from the border: the border's statics in
/// its Loc-RIB, in its route changes, and the prefixes announced and
/// withdrawn on the session so far.
struct AtIsp {
    in_rib: Vec<bool>,
    in_routes: Vec<bool>,
    announced: u64,
    withdrawn: u64,
}

fn at_isp(net: &Net, prefixes: &[&str]) -> AtIsp {
    let counters = net.speakers[1]
        .neighbor(NeighborId(0))
        .map(|n| n.counters)
        .expect("the ISP's neighbour");
    AtIsp {
        in_rib: prefixes
            .iter()
            .map(|p| net.best(1, p).is_some_and(|(_, path, _)| path == [65000]))
            .collect(),
        in_routes: prefixes
            .iter()
            .map(|p| net.routes[1].get(&pfx(p)).is_some_and(|c| c.best.is_some()))
            .collect(),
        announced: counters.updates_received,
        withdrawn: counters.withdraws_received,
    }
}

fn isp_session_established(net: &Net) -> bool {
    net.speakers[1].neighbor(NeighborId(0)).map(|n| n.state)
        == Some(bgp4mesh_bgp::session::State::Established)
}

/// A border whose mesh stops carrying traffic holds its block again: the
/// ISP is sent the withdrawals on the session that stays up, and the
/// announcements again at each release, as often as the mesh flaps.
#[test]
fn statics_held_after_release_are_withdrawn_and_announced_again() {
    let block = ["44.30.127.0/24", "44.30.126.0/23"];
    let mut net = border_with_statics_and_isp(&block);
    net.start();
    let isp = at_isp(&net, &block);
    assert_eq!(isp.in_rib, [true, true], "announced at start");
    assert_eq!((isp.announced, isp.withdrawn), (2, 0));
    assert!(!net.speakers[0].origination_held());

    for round in 1..=4u64 {
        let now = net.now;
        net.speakers[0].hold_origination(now);
        net.pump();
        assert!(net.speakers[0].origination_held());
        let isp = at_isp(&net, &block);
        assert_eq!(isp.in_rib, [false, false], "round {round}: withdrawn");
        assert_eq!(
            isp.in_routes,
            [false, false],
            "round {round}: out of the ISP's kernel"
        );
        assert_eq!(
            (isp.announced, isp.withdrawn),
            (2 * round, 2 * round),
            "round {round}: one withdrawal per prefix"
        );
        assert!(
            net.speakers[0].rib().is_empty(),
            "round {round}: out of our own Loc-RIB"
        );
        assert!(isp_session_established(&net), "round {round}: session kept");

        // Holding what is held sends nothing.
        net.speakers[0].hold_origination(now);
        net.pump();
        assert_eq!(at_isp(&net, &block).withdrawn, 2 * round);

        net.advance(Duration::from_secs(1));
        let now = net.now;
        net.speakers[0].release_origination(now);
        net.pump();
        assert!(!net.speakers[0].origination_held());
        let isp = at_isp(&net, &block);
        assert_eq!(isp.in_rib, [true, true], "round {round}: announced again");
        assert_eq!(isp.in_routes, [true, true], "round {round}");
        assert_eq!(
            (isp.announced, isp.withdrawn),
            (2 * (round + 1), 2 * round),
            "round {round}: one announcement per prefix"
        );

        // Releasing what is released sends nothing.
        net.speakers[0].release_origination(now);
        net.pump();
        assert_eq!(at_isp(&net, &block).announced, 2 * (round + 1));
        net.advance(Duration::from_secs(1));
    }
    assert_eq!(
        net.speakers[1]
            .neighbor(NeighborId(0))
            .map(|n| n.counters.established_transitions),
        Some(1),
        "one session all along"
    );
}

/// A session that comes up while the statics are held is sent none of
/// them; the release announces them to it.
#[test]
fn a_session_established_while_held_gets_no_statics_until_release() {
    let block = ["44.30.127.0/24"];
    let mut net = border_with_statics_and_isp(&block);
    net.start();
    assert_eq!(at_isp(&net, &block).in_rib, [true]);
    let now = net.now;
    net.speakers[0].hold_origination(now);
    net.pump();
    assert_eq!(at_isp(&net, &block).in_rib, [false]);

    // The session goes and comes back while held.
    net.cut("172.30.0.100", "172.30.0.1");
    assert!(!isp_session_established(&net));
    net.down.clear();
    net.advance(Duration::from_secs(10));
    assert!(isp_session_established(&net), "the session is back");
    assert_eq!(
        net.speakers[1]
            .neighbor(NeighborId(0))
            .map(|n| n.counters.established_transitions),
        Some(2)
    );
    let isp = at_isp(&net, &block);
    assert_eq!(isp.in_rib, [false], "nothing announced on the new session");
    assert_eq!(isp.announced, 1, "only the announcement before the hold");

    let now = net.now;
    net.speakers[0].release_origination(now);
    net.pump();
    let isp = at_isp(&net, &block);
    assert_eq!(isp.in_rib, [true], "announced at release");
    assert_eq!(isp.in_routes, [true]);
    assert_eq!(isp.announced, 2);
}

/// A reload while held changes the statics but announces none of them;
/// the release announces the reloaded set (an added static included, a
/// removed one not).
#[test]
fn statics_reloaded_while_held_are_announced_only_at_release() {
    let before = ["44.30.127.0/24", "44.30.126.0/24"];
    let all = ["44.30.127.0/24", "44.30.126.0/24", "44.30.125.0/24"];
    let mut net = border_with_statics_and_isp(&before);
    net.start();
    assert_eq!(at_isp(&net, &all).in_rib, [true, true, false]);
    let now = net.now;
    net.speakers[0].hold_origination(now);
    net.pump();
    let isp = at_isp(&net, &all);
    assert_eq!(isp.in_rib, [false, false, false]);
    assert_eq!((isp.announced, isp.withdrawn), (2, 2));

    // Reload: 44.30.126.0/24 removed, 44.30.125.0/24 added.
    net.advance(Duration::from_secs(1));
    let mut config = net.speakers[0].config().clone();
    config.statics = speaker(
        65000,
        [10, 0, 0, 1],
        vec![],
        &["44.30.127.0/24", "44.30.125.0/24"],
    )
    .statics;
    let now = net.now;
    net.speakers[0].reconfigure(now, config);
    net.pump();
    net.advance(Duration::from_secs(5));
    assert!(
        net.speakers[0].origination_held(),
        "a reload keeps the hold"
    );
    let isp = at_isp(&net, &all);
    assert_eq!(isp.in_rib, [false, false, false], "nothing announced");
    assert_eq!((isp.announced, isp.withdrawn), (2, 2), "nothing sent");
    assert!(net.speakers[0].rib().is_empty(), "nothing in our Loc-RIB");

    let now = net.now;
    net.speakers[0].release_origination(now);
    net.pump();
    let isp = at_isp(&net, &all);
    assert_eq!(
        isp.in_rib,
        [true, false, true],
        "the reloaded statics, the added one included"
    );
    assert_eq!(isp.in_routes, [true, false, true]);
    assert_eq!((isp.announced, isp.withdrawn), (4, 2));

    // And they go again at the next hold.
    let now = net.now;
    net.speakers[0].hold_origination(now);
    net.pump();
    let isp = at_isp(&net, &all);
    assert_eq!(isp.in_rib, [false, false, false]);
    assert_eq!((isp.announced, isp.withdrawn), (4, 4));
}

#[test]
fn own_as_in_the_path_is_a_loop_and_is_dropped() {
    // A (65000) — B (65001) — C (65000): C must not accept A's route back.
    let mut net = Net::new(vec![
        speaker(
            65000,
            [10, 0, 0, 1],
            vec![neighbor("b", "10.1.0.2", 65001)],
            &["192.0.2.0/24"],
        ),
        speaker(
            65001,
            [10, 0, 0, 2],
            vec![
                neighbor("a", "10.1.0.1", 65000),
                neighbor("c", "10.2.0.3", 65000),
            ],
            &[],
        ),
        speaker(
            65000,
            [10, 0, 0, 3],
            vec![neighbor("b", "10.2.0.2", 65001)],
            &[],
        ),
    ]);
    net.link(0, "10.1.0.1", 1, "10.1.0.2");
    net.link(1, "10.2.0.2", 2, "10.2.0.3");
    net.start();
    assert!(net.best(1, "192.0.2.0/24").is_some());
    assert_eq!(net.best(2, "192.0.2.0/24"), None, "AS 65000 is in the path");
    let status = net.speakers[2].neighbor(NeighborId(0)).expect("neighbour");
    assert!(status.counters.filtered_in >= 1);
}

#[test]
fn ibgp_routes_are_not_passed_between_ibgp_neighbours_without_a_reflector() {
    // A — B — C all in AS 65000 (no full mesh): C gets A's route only when
    // B reflects to clients.
    for reflect in [false, true] {
        let mut b_to_c = neighbor("c", "10.2.0.3", 65000);
        b_to_c.route_reflector_client = reflect;
        let mut net = Net::new(vec![
            speaker(
                65000,
                [10, 0, 0, 1],
                vec![neighbor("b", "10.1.0.2", 65000)],
                &["192.0.2.0/24"],
            ),
            speaker(
                65000,
                [10, 0, 0, 2],
                vec![neighbor("a", "10.1.0.1", 65000), b_to_c],
                &[],
            ),
            speaker(
                65000,
                [10, 0, 0, 3],
                vec![neighbor("b", "10.2.0.2", 65000)],
                &[],
            ),
        ]);
        net.link(0, "10.1.0.1", 1, "10.1.0.2");
        net.link(1, "10.2.0.2", 2, "10.2.0.3");
        net.start();
        let at_b = net.speakers[1]
            .rib()
            .get(&pfx("192.0.2.0/24"))
            .and_then(|e| e.best())
            .cloned()
            .expect("B has it");
        assert_eq!(at_b.attrs.local_pref, Some(100), "iBGP carries LOCAL_PREF");
        assert_eq!(
            at_b.attrs.next_hop.map(|h| h.to_string()),
            Some("10.1.0.1".into()),
            "A's own route: next hop self"
        );
        let at_c = net.speakers[2]
            .rib()
            .get(&pfx("192.0.2.0/24"))
            .and_then(|e| e.best())
            .cloned();
        if reflect {
            let at_c = at_c.expect("reflected to the client");
            assert_eq!(at_c.attrs.originator_id, Some(Ipv4Addr::new(10, 0, 0, 1)));
            assert_eq!(at_c.attrs.cluster_list, vec![Ipv4Addr::new(10, 0, 0, 2)]);
            assert_eq!(
                at_c.attrs.next_hop.map(|h| h.to_string()),
                Some("10.1.0.1".into()),
                "next hop unchanged"
            );
        } else {
            assert!(at_c.is_none(), "split horizon");
        }
    }
}

/// Seed 002: two sessions to the same friend AS over two ISPs, local-pref
/// 200 on the first, the friend's prefixes filtered to 192.168.42.0/23{23,32},
/// our announcements prepended 3 times.
#[test]
fn seed_002_preferred_path_backup_and_prepend() {
    let friend_in = |local_pref: Option<u32>| {
        let mut set = Vec::new();
        if let Some(lp) = local_pref {
            set.push(Action::SetLocalPref(lp));
        }
        Arc::new(Policy {
            name: "friend_in".into(),
            rules: vec![Rule {
                matches: Match {
                    prefixes: vec![
                        "192.168.42.0/23{23,32}"
                            .parse::<PrefixRange>()
                            .expect("range"),
                    ],
                    ..Match::default()
                },
                set,
                verdict: Verdict::Accept,
            }],
            default: Verdict::Reject,
        })
    };
    let prepend = Arc::new(Policy {
        name: "out_aspath".into(),
        rules: vec![Rule {
            matches: Match::default(),
            set: vec![Action::Prepend {
                asn: None,
                times: 3,
            }],
            verdict: Verdict::Accept,
        }],
        default: Verdict::Reject,
    });
    let mut isp1 = neighbor("remi-isp1", "172.16.11.2", 64513);
    isp1.import = friend_in(Some(200));
    isp1.export = prepend.clone();
    let mut isp2 = neighbor("remi-isp2", "172.16.10.2", 64513);
    isp2.import = friend_in(None);
    isp2.export = prepend;
    let mut net = Net::new(vec![
        speaker(
            64514,
            [192, 168, 0, 1],
            vec![isp1, isp2],
            &["192.168.0.0/24"],
        ),
        speaker(
            64513,
            [192, 168, 42, 1],
            vec![
                neighbor("me-isp1", "172.16.11.1", 64514),
                neighbor("me-isp2", "172.16.10.1", 64514),
            ],
            &["192.168.42.0/24", "192.168.44.0/24", "10.0.0.0/8"],
        ),
    ]);
    net.link(0, "172.16.11.1", 1, "172.16.11.2");
    net.link(0, "172.16.10.1", 1, "172.16.10.2");
    net.start();

    // Filter: only 192.168.42.0/24 of the friend's three prefixes.
    assert!(net.best(0, "192.168.44.0/24").is_none());
    assert!(net.best(0, "10.0.0.0/8").is_none());
    let (source, path, local_pref) = net.best(0, "192.168.42.0/24").expect("accepted");
    assert_eq!(
        source,
        PathSource::Neighbor(NeighborId(0)),
        "ISP#1 preferred"
    );
    assert_eq!((path, local_pref), (vec![64513], Some(200)));
    assert_eq!(
        net.speakers[0]
            .rib()
            .get(&pfx("192.168.42.0/24"))
            .map(|e| e.paths().len()),
        Some(2),
        "both paths kept"
    );

    // The friend sees our prefix prepended: 64514 four times (3 + our own).
    let (_, path, _) = net
        .best(1, "192.168.0.0/24")
        .expect("friend has our prefix");
    assert_eq!(path, vec![64514; 4]);

    // ISP#1 fails: the backup takes over; it comes back: preferred again.
    net.cut("172.16.11.1", "172.16.11.2");
    let (source, _, local_pref) = net.best(0, "192.168.42.0/24").expect("backup");
    assert_eq!(
        (source, local_pref),
        (PathSource::Neighbor(NeighborId(1)), None)
    );
    net.down.clear();
    net.advance(Duration::from_secs(10));
    let (source, _, _) = net.best(0, "192.168.42.0/24").expect("back");
    assert_eq!(
        source,
        PathSource::Neighbor(NeighborId(0)),
        "ISP#1 preferred again after it recovers"
    );
}

#[test]
fn route_refresh_and_soft_reconfiguration_apply_a_new_import_policy() {
    for soft in [false, true] {
        let mut b = neighbor("a", "10.1.0.1", 65000);
        b.soft_reconfiguration_inbound = soft;
        let mut net = Net::new(vec![
            speaker(
                65000,
                [10, 0, 0, 1],
                vec![neighbor("b", "10.1.0.2", 65001)],
                &["192.0.2.0/24", "198.51.100.0/24"],
            ),
            speaker(65001, [10, 0, 0, 2], vec![b], &[]),
        ]);
        net.link(0, "10.1.0.1", 1, "10.1.0.2");
        net.start();
        assert!(net.best(1, "198.51.100.0/24").is_some());
        // A new import policy for B's neighbour: only 192.0.2.0/24.
        let only = Arc::new(Policy {
            name: "only".into(),
            rules: vec![Rule {
                matches: Match {
                    prefixes: vec!["192.0.2.0/24".parse().expect("range")],
                    ..Match::default()
                },
                set: vec![],
                verdict: Verdict::Accept,
            }],
            default: Verdict::Reject,
        });
        let mut config = net.speakers[1].config().clone();
        config.neighbors[0].import = only;
        let now = net.now;
        net.speakers[1].reconfigure(now, config);
        net.pump();
        assert!(
            net.best(1, "198.51.100.0/24").is_none(),
            "soft = {soft}: filtered after the refresh"
        );
        assert!(net.best(1, "192.0.2.0/24").is_some(), "soft = {soft}");
        assert_eq!(
            net.speakers[1]
                .neighbor(NeighborId(0))
                .map(|n| n.counters.established_transitions),
            Some(1),
            "no session reset"
        );
    }
}

#[test]
fn max_prefixes_warns_restarts_or_shuts_down() {
    use bgp4mesh_bgp::speaker::{MaxPrefixAction, MaxPrefixes};
    let statics: Vec<String> = (0..10).map(|i| format!("10.{i}.0.0/16")).collect();
    let statics: Vec<&str> = statics.iter().map(String::as_str).collect();
    for action in [
        MaxPrefixAction::Warn,
        MaxPrefixAction::Restart(Duration::from_secs(30)),
        MaxPrefixAction::Shutdown,
    ] {
        let mut limited = neighbor("a", "10.1.0.1", 65000);
        limited.max_prefixes = Some(MaxPrefixes { limit: 5, action });
        let mut net = Net::new(vec![
            speaker(
                65000,
                [10, 0, 0, 1],
                vec![neighbor("b", "10.1.0.2", 65001)],
                &statics,
            ),
            speaker(65001, [10, 0, 0, 2], vec![limited], &[]),
        ]);
        net.link(0, "10.1.0.1", 1, "10.1.0.2");
        net.start();
        let status = net.speakers[1].neighbor(NeighborId(0)).expect("neighbour");
        match action {
            MaxPrefixAction::Warn => {
                assert_eq!(status.state, bgp4mesh_bgp::session::State::Established);
                assert_eq!(status.routes_imported, 10, "warn keeps everything");
            }
            _ => {
                assert_ne!(
                    status.state,
                    bgp4mesh_bgp::session::State::Established,
                    "{action:?}"
                );
                assert!(
                    status
                        .last_error
                        .is_some_and(|e| e.contains("Maximum Number of Prefixes")),
                    "{:?}",
                    status.last_error
                );
                assert_eq!(net.speakers[1].rib().len(), 0, "routes withdrawn");
                net.advance(Duration::from_secs(40));
                let again = net.speakers[1]
                    .neighbor(NeighborId(0))
                    .expect("neighbour")
                    .counters
                    .established_transitions;
                match action {
                    MaxPrefixAction::Restart(_) => {
                        assert!(again >= 2, "reconnected after the hold-down")
                    }
                    _ => assert_eq!(again, 1, "stays down"),
                }
            }
        }
    }
}

#[test]
fn paths_through_an_unreachable_next_hop_are_not_used() {
    use bgp4mesh_bgp::speaker::NextHopState;
    // B learns 192.0.2.0/24 from A (next hop 10.1.0.1) and from C (next hop
    // 10.2.0.3, a longer path). A's next hop becomes unreachable: C's path
    // takes over, in the RIB and towards D; reachable again: back to A.
    let mut net = Net::new(vec![
        speaker(
            65001,
            [10, 0, 0, 1],
            vec![neighbor("b", "10.1.0.2", 65000)],
            &["192.0.2.0/24"],
        ),
        speaker(
            65000,
            [10, 0, 0, 2],
            vec![
                neighbor("a", "10.1.0.1", 65001),
                neighbor("c", "10.2.0.3", 65003),
                neighbor("d", "10.3.0.4", 65004),
            ],
            &[],
        ),
        speaker(
            65003,
            [10, 0, 0, 3],
            vec![
                neighbor("b", "10.2.0.2", 65000),
                neighbor("e", "10.4.0.5", 65005),
            ],
            &[],
        ),
        speaker(
            65004,
            [10, 0, 0, 4],
            vec![neighbor("b", "10.3.0.2", 65000)],
            &[],
        ),
        speaker(
            65005,
            [10, 0, 0, 5],
            vec![neighbor("c", "10.4.0.3", 65003)],
            &["192.0.2.0/24"],
        ),
    ]);
    net.link(0, "10.1.0.1", 1, "10.1.0.2");
    net.link(1, "10.2.0.2", 2, "10.2.0.3");
    net.link(1, "10.3.0.2", 3, "10.3.0.4");
    net.link(2, "10.4.0.3", 4, "10.4.0.5");
    net.start();
    assert!(
        net.watched[1].contains(&ip("10.1.0.1")) && net.watched[1].contains(&ip("10.2.0.3")),
        "{:?}",
        net.watched[1]
    );
    assert_eq!(net.best(1, "192.0.2.0/24").map(|b| b.1), Some(vec![65001]));
    let now = net.now;
    net.speakers[1].set_next_hop(
        now,
        ip("10.1.0.1"),
        NextHopState {
            reachable: false,
            cost: 0,
        },
    );
    net.pump();
    assert_eq!(
        net.best(1, "192.0.2.0/24").map(|b| b.1),
        Some(vec![65003, 65005]),
        "C's path takes over"
    );
    assert_eq!(
        net.best(3, "192.0.2.0/24").map(|b| b.1),
        Some(vec![65000, 65003, 65005]),
        "and D hears of it"
    );
    net.speakers[1].set_next_hop(
        now,
        ip("10.1.0.1"),
        NextHopState {
            reachable: true,
            cost: 10,
        },
    );
    net.pump();
    assert_eq!(net.best(1, "192.0.2.0/24").map(|b| b.1), Some(vec![65001]));
    // A goes away: its next hop is no longer watched.
    net.cut("10.1.0.1", "10.1.0.2");
    assert!(!net.watched[1].contains(&ip("10.1.0.1")));
}

#[test]
fn graceful_restart_keeps_a_restarting_neighbours_routes_while_it_is_away() {
    // B helps A restart (RFC 4724): A's session dies without a NOTIFICATION,
    // B keeps A's routes; A comes back announcing only one of its two
    // prefixes and End-of-RIB; the other goes then. Without A coming back,
    // the routes go after A's restart time.
    let with_gr = |mut n: NeighborConfig| {
        n.graceful_restart = true;
        n.restart_time = 30;
        n
    };
    let a = |statics: &[&str]| {
        speaker(
            65001,
            [10, 0, 0, 1],
            vec![with_gr(neighbor("b", "10.1.0.2", 65000))],
            statics,
        )
    };
    let mut net = Net::new(vec![
        a(&["192.0.2.0/24", "198.51.100.0/24"]),
        speaker(
            65000,
            [10, 0, 0, 2],
            vec![with_gr(neighbor("a", "10.1.0.1", 65001))],
            &[],
        ),
    ]);
    net.link(0, "10.1.0.1", 1, "10.1.0.2");
    net.start();
    assert!(net.best(1, "192.0.2.0/24").is_some() && net.best(1, "198.51.100.0/24").is_some());
    net.cut("10.1.0.1", "10.1.0.2");
    assert!(
        net.best(1, "192.0.2.0/24").is_some(),
        "kept while A restarts"
    );
    assert!(net.best(1, "198.51.100.0/24").is_some());
    // A restarts with one prefix fewer. Its OPEN does not claim preserved
    // forwarding (we only help), so B drops the stale routes at once.
    net.speakers[0] = Speaker::new(a(&["192.0.2.0/24"]), net.now);
    net.down.clear();
    let now = net.now;
    net.speakers[0].start(now);
    net.pump();
    net.advance(Duration::from_secs(5));
    assert!(net.best(1, "192.0.2.0/24").is_some(), "re-announced");
    assert!(
        net.best(1, "198.51.100.0/24").is_none(),
        "not re-announced: gone"
    );

    // A dies and stays away: after its restart time (30 s) everything goes.
    net.cut("10.1.0.1", "10.1.0.2");
    net.advance(Duration::from_secs(10));
    assert!(
        net.best(1, "192.0.2.0/24").is_some(),
        "still within the restart time"
    );
    net.advance(Duration::from_secs(25));
    assert!(
        net.best(1, "192.0.2.0/24").is_none(),
        "gone after the restart time"
    );
}

/// A border's `[mesh] export`: the BGP-learned prefixes its policy takes,
/// kept up to date from route changes, bounded, never its own statics.
#[test]
fn an_export_set_follows_the_best_routes_its_policy_takes() {
    use bgp4mesh_bgp::export_set::ExportSet;
    let mut net = Net::new(vec![
        speaker(
            65000,
            [10, 0, 0, 1],
            vec![neighbor("isp", "172.30.0.1", 65001)],
            &["44.30.127.0/24"],
        ),
        speaker(
            65001,
            [10, 0, 0, 2],
            vec![neighbor("border", "172.30.0.100", 65000)],
            &[
                "0.0.0.0/0",
                "198.51.100.0/24",
                "198.51.100.128/25",
                "203.0.113.0/24",
            ],
        ),
    ]);
    net.link(0, "172.30.0.100", 1, "172.30.0.1");
    net.start();
    let to_mesh = Arc::new(Policy {
        name: "to-mesh".into(),
        rules: vec![Rule {
            matches: Match {
                prefixes: vec![
                    PrefixRange::or_longer(pfx("198.51.100.0/24")),
                    PrefixRange::exact(pfx("0.0.0.0/0")),
                    // The border's own block: a static, so never taken.
                    PrefixRange::exact(pfx("44.30.127.0/24")),
                ],
                neighbors: vec!["isp".into()],
                ..Match::default()
            },
            set: Vec::new(),
            verdict: Verdict::Accept,
        }],
        default: Verdict::Reject,
    });
    let mut set = ExportSet::new(to_mesh.clone(), 100);
    set.rebuild(&net.speakers[0], to_mesh.clone(), 100);
    assert_eq!(
        set.take_changed(),
        Some(vec![
            pfx("0.0.0.0/0"),
            pfx("198.51.100.0/24"),
            pfx("198.51.100.128/25")
        ])
    );
    assert_eq!(set.take_changed(), None, "reported once");
    // The same set from the route changes as they came.
    let mut fed = ExportSet::new(to_mesh.clone(), 100);
    for change in net.routes[0].values() {
        fed.route_changed(&net.speakers[0], change);
    }
    assert_eq!(fed.take_changed().map(|v| v.len()), Some(3));

    // A limit leaves the rest out, and says how many.
    let mut small = ExportSet::new(to_mesh.clone(), 2);
    small.rebuild(&net.speakers[0], to_mesh.clone(), 2);
    assert_eq!(small.len(), 2);
    assert_eq!(small.left_out(), 1);

    // The ISP goes: every learned route is withdrawn, and the set follows
    // the route changes one by one.
    net.cut("172.30.0.100", "172.30.0.1");
    let changes: Vec<RouteChange> = net.routes[0].values().cloned().collect();
    for change in &changes {
        set.route_changed(&net.speakers[0], change);
    }
    assert_eq!(set.take_changed(), Some(Vec::new()));
    assert!(set.is_empty());
}

/// With a send window, a big table goes out as the connection takes it:
/// never more than the window (and the batch that crossed it) handed out
/// unwritten, and all of it, End-of-RIB last, once everything is written.
#[test]
fn a_send_window_holds_updates_back_until_the_connection_has_taken_them() {
    let prefixes: Vec<String> = (0..60_000u32)
        .map(|n| format!("{}.{}.{}.0/24", 20 + n / 65536, (n / 256) % 256, n % 256))
        .collect();
    let statics: Vec<&str> = prefixes.iter().map(String::as_str).collect();
    let mut net = border_with_statics_and_isp(&statics);
    const WINDOW: usize = 64 * 1024;
    net.speakers[0].set_send_window(Some(WINDOW));
    net.windowed[0] = true;
    net.start();
    let received = |net: &Net| net.speakers[1].rib().len();
    let first = received(&net);
    assert!(
        first > 0 && first < prefixes.len(),
        "{first} prefixes before any write"
    );
    let mut rounds = 0;
    while received(&net) < prefixes.len() {
        let unwritten = net
            .unwritten
            .remove(&(0, NeighborId(0)))
            .unwrap_or_default();
        // One batch of 16k prefixes may cross the window: at most 10
        // bytes a /24 here, some 160 KB, on top of it.
        assert!(unwritten < WINDOW + 200_000, "{unwritten} bytes unwritten");
        assert!(unwritten > 0, "stuck at {} prefixes", received(&net));
        let now = net.now;
        let conn = net
            .conns
            .iter()
            .find(|(_, ends)| ends.contains(&(0, NeighborId(0))))
            .map(|(c, _)| *c)
            .expect("connected");
        net.speakers[0].written(now, NeighborId(0), conn, unwritten);
        net.pump();
        rounds += 1;
    }
    assert!(rounds > 1, "the window never held anything back");
    assert_eq!(
        net.speakers[0]
            .neighbor(NeighborId(0))
            .map(|n| n.routes_exported),
        Some(prefixes.len())
    );
}

/// Whether speaker `s`'s neighbour `n` saw the R bit (restarting) in our OPEN.
fn sees_restart_bit(net: &Net, s: usize, n: NeighborId) -> Option<bool> {
    let status = net.speakers[s].neighbor(n)?;
    let gr = status.negotiated?.peer_open.graceful_restart()?.clone();
    Some(gr.restarting && gr.families.iter().all(|(_, forwarding)| *forwarding))
}

/// A restarting router (AS 65001) with graceful-restart neighbours `b`
/// (restart time 10 s) and `c` (30 s), each linked to it; `c`'s link is
/// not made.
fn restarting_router() -> Net {
    let with_gr = |mut n: NeighborConfig, restart_time: u16| {
        n.graceful_restart = true;
        n.restart_time = restart_time;
        n
    };
    let mut net = Net::new(vec![
        speaker(
            65001,
            [10, 0, 0, 1],
            vec![
                with_gr(neighbor("b", "10.1.0.2", 65000), 10),
                with_gr(neighbor("c", "10.2.0.2", 65002), 30),
            ],
            &["192.0.2.0/24"],
        ),
        speaker(
            65000,
            [10, 0, 0, 2],
            vec![with_gr(neighbor("a", "10.1.0.1", 65001), 10)],
            &["198.51.100.0/24"],
        ),
        speaker(
            65002,
            [10, 0, 0, 3],
            vec![with_gr(neighbor("a", "10.2.0.1", 65001), 30)],
            &["203.0.113.0/24"],
        ),
    ]);
    net.link(0, "10.1.0.1", 1, "10.1.0.2");
    net
}

fn restart_over(net: &Net, s: usize) -> Vec<RestartEnd> {
    net.signals[s]
        .iter()
        .filter_map(|e| match e {
            Event::GracefulRestartOver(why) => Some(*why),
            _ => None,
        })
        .collect()
}

/// RFC 4724, the restarting side: our OPENs carry the R and F bits, and
/// the kept forwarding state is declared stale only once every
/// graceful-restart neighbour sent End-of-RIB for each family, right
/// after the last of them.
#[test]
fn our_graceful_restart_ends_after_every_neighbours_end_of_rib() {
    let mut net = restarting_router();
    let now = net.now;
    net.speakers[0].begin_graceful_restart(now);
    assert!(net.speakers[0].graceful_restart_in_progress());
    net.start();
    assert_eq!(
        sees_restart_bit(&net, 1, NeighborId(0)),
        Some(true),
        "R and F bits"
    );
    assert!(
        net.signals[0].iter().any(|e| matches!(
            e,
            Event::EndOfRib {
                neighbor: NeighborId(0),
                ..
            }
        )),
        "b's End-of-RIB came"
    );
    assert_eq!(restart_over(&net, 0), vec![], "c's End-of-RIB is awaited");
    assert!(net.speakers[0].graceful_restart_in_progress());

    net.link(0, "10.2.0.1", 2, "10.2.0.2");
    net.advance(Duration::from_secs(6));
    assert_eq!(restart_over(&net, 0), vec![RestartEnd::EveryEndOfRib]);
    assert!(!net.speakers[0].graceful_restart_in_progress());
    assert!(
        matches!(
            net.signals[0].last(),
            Some(Event::GracefulRestartOver(RestartEnd::EveryEndOfRib))
        ) && matches!(
            net.signals[0].iter().rev().nth(1),
            Some(Event::EndOfRib {
                neighbor: NeighborId(1),
                ..
            })
        ),
        "right after the last End-of-RIB: {:?}",
        net.signals[0]
    );
    assert_eq!(
        RestartEnd::EveryEndOfRib.to_string(),
        "every neighbour sent End-of-RIB"
    );

    // A session that comes up again after the restart no longer claims it.
    net.cut("10.1.0.1", "10.1.0.2");
    net.down.clear();
    net.advance(Duration::from_secs(10));
    assert_eq!(sees_restart_bit(&net, 1, NeighborId(0)), Some(false));
    assert_eq!(restart_over(&net, 0).len(), 1, "over once");
}

/// A neighbour that never comes back does not hold the stale state for
/// ever: the restart ends after the longest restart time (c's 30 s), on
/// virtual time through `poll_timeout`.
#[test]
fn our_graceful_restart_ends_after_the_longest_restart_time() {
    let mut net = restarting_router();
    let now = net.now;
    net.speakers[0].begin_graceful_restart(now);
    net.start();
    assert!(
        net.speakers[0]
            .poll_timeout()
            .is_some_and(|t| t <= now + Duration::from_secs(30))
    );
    net.advance(Duration::from_secs(29));
    assert_eq!(restart_over(&net, 0), vec![]);
    net.advance(Duration::from_secs(2));
    assert_eq!(restart_over(&net, 0), vec![RestartEnd::RestartTimePassed]);
    assert_eq!(
        RestartEnd::RestartTimePassed.to_string(),
        "restart time passed"
    );
    net.advance(Duration::from_secs(60));
    assert_eq!(restart_over(&net, 0).len(), 1, "over once");
}

/// Without a graceful-restart neighbour there is nothing to wait for: no
/// R bit, no deadline, no event.
#[test]
fn no_graceful_restart_without_graceful_restart_neighbours() {
    let mut net = border_and_isp();
    let now = net.now;
    net.speakers[0].begin_graceful_restart(now);
    assert!(!net.speakers[0].graceful_restart_in_progress());
    net.start();
    assert_eq!(restart_over(&net, 0), vec![]);
    assert_eq!(
        sees_restart_bit(&net, 1, NeighborId(0)),
        None,
        "no capability at all"
    );
}

/// A border's upstream is ready once an eBGP session is up and what it
/// sent up to its End-of-RIB is installed, and not ready as soon as the
/// session goes; an iBGP neighbour does not count.
#[test]
fn upstream_ready_follows_installed_end_of_rib_of_an_ebgp_session() {
    let mut net = Net::new(vec![
        speaker(
            65000,
            [10, 0, 0, 1],
            vec![
                neighbor("ibgp", "10.9.0.2", 65000),
                neighbor("isp", "172.30.0.1", 65001),
            ],
            &["44.30.127.0/24"],
        ),
        speaker(
            65000,
            [10, 0, 0, 3],
            vec![neighbor("border", "10.9.0.1", 65000)],
            &["10.10.0.0/16"],
        ),
        speaker(
            65001,
            [10, 0, 0, 2],
            vec![neighbor("border", "172.30.0.100", 65000)],
            &["0.0.0.0/0"],
        ),
    ]);
    net.link(0, "10.9.0.1", 1, "10.9.0.2");
    net.installs_at_once[0] = false;
    net.start();
    let upstream = |net: &Net| -> Vec<bool> {
        net.signals[0]
            .iter()
            .filter_map(|e| match e {
                Event::UpstreamReady(up) => Some(up.ipv4),
                _ => None,
            })
            .collect()
    };
    // The iBGP neighbour's End-of-RIB, installed: not an upstream.
    net.speakers[0].end_of_rib_installed(NeighborId(0));
    net.pump();
    assert!(!net.speakers[0].upstream_ready().any());
    assert_eq!(upstream(&net), vec![]);

    net.link(0, "172.30.0.100", 2, "172.30.0.1");
    net.advance(Duration::from_secs(6));
    assert!(
        net.signals[0].iter().any(|e| matches!(
            e,
            Event::EndOfRib {
                neighbor: NeighborId(1),
                ..
            }
        )),
        "the ISP's End-of-RIB came"
    );
    assert!(!net.speakers[0].upstream_ready().any(), "not installed yet");
    net.speakers[0].end_of_rib_installed(NeighborId(1));
    net.pump();
    assert!(net.speakers[0].upstream_ready().ipv4);
    assert_eq!(upstream(&net), vec![true]);

    net.cut("172.30.0.100", "172.30.0.1");
    assert!(!net.speakers[0].upstream_ready().any());
    assert_eq!(upstream(&net), vec![true, false]);
    // A confirmation for a session that is gone changes nothing.
    net.speakers[0].end_of_rib_installed(NeighborId(1));
    net.pump();
    assert_eq!(upstream(&net), vec![true, false]);
}

/// `reconfigure` restarts a session only when its own parameters changed:
/// of a router's three neighbours, the one with a new hold time is
/// restarted (Cease / Other Configuration Change), the one with a new
/// import policy gets a soft refresh on the same connection, and the one
/// whose configuration is the same is not touched at all.
#[test]
fn reconfigure_restarts_only_the_sessions_whose_parameters_changed() {
    let mut net = Net::new(vec![
        speaker(
            65000,
            [10, 0, 0, 1],
            vec![
                neighbor("b", "10.1.0.2", 65001),
                neighbor("c", "10.2.0.2", 65002),
                neighbor("d", "10.3.0.2", 65003),
            ],
            &["192.0.2.0/24"],
        ),
        speaker(
            65001,
            [10, 0, 0, 2],
            vec![neighbor("a", "10.1.0.1", 65000)],
            &["198.51.100.0/24"],
        ),
        speaker(
            65002,
            [10, 0, 0, 3],
            vec![neighbor("a", "10.2.0.1", 65000)],
            &["203.0.113.0/24", "203.0.113.128/25"],
        ),
        speaker(
            65003,
            [10, 0, 0, 4],
            vec![neighbor("a", "10.3.0.1", 65000)],
            &["100.64.0.0/24"],
        ),
    ]);
    net.link(0, "10.1.0.1", 1, "10.1.0.2");
    net.link(0, "10.2.0.1", 2, "10.2.0.2");
    net.link(0, "10.3.0.1", 3, "10.3.0.2");
    net.start();
    let (b, c, d) = (NeighborId(0), NeighborId(1), NeighborId(2));
    let conn_of = |net: &Net, n: NeighborId| -> Option<ConnId> {
        net.conns
            .iter()
            .find(|(_, ends)| ends.contains(&(0, n)))
            .map(|(conn, _)| *conn)
    };
    let transitions = |net: &Net, s: usize, n: NeighborId| {
        net.speakers[s]
            .neighbor(n)
            .map(|x| x.counters.established_transitions)
    };
    let before = [b, c, d].map(|n| conn_of(&net, n));
    assert!(before.iter().all(Option::is_some), "all three are up");
    assert!(net.best(0, "203.0.113.128/25").is_some());

    let mut config = net.speakers[0].config().clone();
    config.neighbors[0].hold_time = 30;
    config.neighbors[1].import = Arc::new(Policy {
        name: "no-more-specifics".into(),
        rules: vec![Rule {
            matches: Match {
                prefixes: vec![PrefixRange::exact(pfx("203.0.113.0/24"))],
                ..Match::default()
            },
            set: vec![],
            verdict: Verdict::Accept,
        }],
        default: Verdict::Reject,
    });
    let now = net.now;
    net.speakers[0].reconfigure(now, config);
    net.pump();
    net.advance(Duration::from_secs(5));

    // b: a new connection, and b saw the session go and come back.
    let after_b = conn_of(&net, b);
    assert!(after_b.is_some() && after_b != before[0], "b reconnected");
    assert_eq!(transitions(&net, 0, b), Some(2));
    assert_eq!(transitions(&net, 1, NeighborId(0)), Some(2));
    assert_eq!(
        net.speakers[0]
            .neighbor(b)
            .and_then(|x| x.negotiated.map(|n| n.hold_time)),
        Some(30)
    );
    // c: the same session, the new import policy applied.
    assert_eq!(conn_of(&net, c), before[1], "c kept its connection");
    assert_eq!(transitions(&net, 0, c), Some(1));
    assert_eq!(transitions(&net, 2, NeighborId(0)), Some(1));
    assert!(net.best(0, "203.0.113.128/25").is_none(), "filtered now");
    assert!(net.best(0, "203.0.113.0/24").is_some());
    // d: untouched.
    assert_eq!(conn_of(&net, d), before[2], "d kept its connection");
    assert_eq!(transitions(&net, 0, d), Some(1));
    assert_eq!(transitions(&net, 3, NeighborId(0)), Some(1));
    // Routes through the sessions that stayed never went away elsewhere.
    assert!(net.best(3, "203.0.113.0/24").is_some());
    assert!(net.best(2, "100.64.0.0/24").is_some());
}

/// Upstream readiness is per family: a border with an IPv4 session and an
/// IPv6-only session to its ISP loses its IPv6 upstream alone when the
/// IPv6 session goes, and its IPv4 one when the IPv4 session goes.
#[test]
fn upstream_ready_is_per_family() {
    let mut isp6 = neighbor("isp6", "172.31.0.1", 65001);
    isp6.families = vec![Family::IPV6_UNICAST];
    let mut border6 = neighbor("border6", "172.31.0.100", 65000);
    border6.families = vec![Family::IPV6_UNICAST];
    let mut isp4 = neighbor("isp4", "172.30.0.1", 65001);
    isp4.families = vec![Family::IPV4_UNICAST];
    let mut border4 = neighbor("border4", "172.30.0.100", 65000);
    border4.families = vec![Family::IPV4_UNICAST];
    let mut net = Net::new(vec![
        speaker(65000, [10, 0, 0, 1], vec![isp4, isp6], &["44.30.127.0/24"]),
        speaker(65001, [10, 0, 0, 2], vec![border4, border6], &["0.0.0.0/0"]),
    ]);
    net.start();
    net.link(0, "172.30.0.100", 1, "172.30.0.1");
    net.link(0, "172.31.0.100", 1, "172.31.0.1");
    net.advance(Duration::from_secs(6));
    assert_eq!(
        net.speakers[0].upstream_ready(),
        Upstream {
            ipv4: true,
            ipv6: true
        }
    );
    net.cut("172.31.0.100", "172.31.0.1");
    assert_eq!(
        net.speakers[0].upstream_ready(),
        Upstream {
            ipv4: true,
            ipv6: false
        }
    );
    net.cut("172.30.0.100", "172.30.0.1");
    assert_eq!(net.speakers[0].upstream_ready(), Upstream::default());
}
