//! Bridges connected by virtual point-to-point links, on virtual time.

use super::*;
use proptest::prelude::*;

const MS: Duration = Duration::from_millis(1);
const COST: u32 = 20_000;

fn mac(i: usize) -> [u8; 6] {
    [2, 0, 0, 0, 0, i as u8 + 1]
}

/// One virtual link: two (bridge, port) ends and a delivery delay. Cutting
/// it drops what is in flight and disables both ports, as our driver does
/// when a tunnel dies.
struct Link {
    a: (usize, u16),
    b: (usize, u16),
    up: bool,
    delay: Duration,
}

struct InFlight {
    at: Instant,
    seq: u64,
    link: usize,
    to: (usize, u16),
    bytes: Vec<u8>,
}

struct Net {
    bridges: Vec<Bridge>,
    links: Vec<Link>,
    start: Instant,
    now: Instant,
    inflight: Vec<InFlight>,
    seq: u64,
    /// A hung bridge: sends nothing, reads nothing, runs no timers; its
    /// ports keep their last state and its links stay "enabled".
    frozen: Vec<bool>,
    events: Vec<(Instant, usize, Event)>,
    sent: Vec<(Instant, usize, u16, Bpdu)>,
    /// Links whose both ends forward at an instant where the forwarding
    /// links hold a cycle.
    loops: Vec<(Duration, Vec<usize>)>,
    check_loops: bool,
}

impl Net {
    fn new(n: usize) -> Net {
        Net::with_priorities(&vec![32768; n])
    }

    fn with_priorities(prio: &[u16]) -> Net {
        let now = Instant::now();
        let bridges = prio
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                let mut cfg = BridgeConfig::new(mac(i));
                cfg.priority = p;
                Bridge::new(cfg).unwrap()
            })
            .collect::<Vec<_>>();
        Net {
            frozen: vec![false; bridges.len()],
            bridges,
            links: vec![],
            start: now,
            now,
            inflight: vec![],
            seq: 0,
            events: vec![],
            sent: vec![],
            loops: vec![],
            check_loops: true,
        }
    }

    fn link(&mut self, a: usize, b: usize) -> usize {
        self.link_with_delay(a, b, MS)
    }

    fn link_with_delay(&mut self, a: usize, b: usize, delay: Duration) -> usize {
        let pa = self.bridges[a].status().ports.len() as u16 + 1;
        let pb = self.bridges[b].status().ports.len() as u16 + 1;
        self.bridges[a].add_port(pa, COST).unwrap();
        self.bridges[b].add_port(pb, COST).unwrap();
        self.links.push(Link {
            a: (a, pa),
            b: (b, pb),
            up: false,
            delay,
        });
        self.links.len() - 1
    }

    fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// Brings every link up at the current instant.
    fn start(&mut self) {
        for l in 0..self.links.len() {
            self.mend(l);
        }
    }

    fn set_enabled(&mut self, l: usize, up: bool) {
        self.links[l].up = up;
        if !up {
            self.inflight.retain(|m| m.link != l);
        }
        for (b, p) in [self.links[l].a, self.links[l].b] {
            if !self.frozen[b] {
                self.bridges[b].set_port_enabled(p, up, self.now).unwrap();
                self.pump(b);
            }
        }
    }

    fn cut(&mut self, l: usize) {
        self.set_enabled(l, false);
    }

    fn mend(&mut self, l: usize) {
        self.set_enabled(l, true);
    }

    /// Moves a bridge's output onto the links and into the logs, then
    /// checks that the forwarding links form a forest.
    fn pump(&mut self, b: usize) {
        while let Some((port, bytes)) = self.bridges[b].poll_transmit() {
            let bpdu = Bpdu::decode(&bytes).expect("we send what we can read");
            self.sent.push((self.now, b, port, bpdu));
            let Some(l) = self
                .links
                .iter()
                .position(|k| k.a == (b, port) || k.b == (b, port))
            else {
                continue;
            };
            let link = &self.links[l];
            if !link.up || self.frozen[b] {
                continue;
            }
            let to = if link.a == (b, port) { link.b } else { link.a };
            self.seq += 1;
            self.inflight.push(InFlight {
                at: self.now + link.delay,
                seq: self.seq,
                link: l,
                to,
                bytes,
            });
        }
        while let Some(e) = self.bridges[b].poll_event() {
            self.events.push((self.now, b, e));
        }
        if self.check_loops {
            if let Some(cycle) = self.forwarding_cycle() {
                if self.loops.is_empty() && std::env::var("RSTP_TRACE").is_ok() {
                    self.dump();
                }
                self.loops.push((self.elapsed(), cycle));
            }
        }
    }

    fn dump(&self) {
        eprintln!("==== loop at {:?}", self.elapsed());
        for (l, k) in self.links.iter().enumerate() {
            eprintln!(
                "link {l}: {:?}-{:?} up {} | {:?}/{:?} - {:?}/{:?}",
                k.a,
                k.b,
                k.up,
                self.role(k.a),
                self.state(k.a),
                self.role(k.b),
                self.state(k.b)
            );
        }
        for (b, br) in self.bridges.iter().enumerate() {
            let st = br.status();
            eprintln!(
                "bridge {b} {} root {} cost {} rp {:?}",
                st.bridge_id, st.root_id, st.root_path_cost, st.root_port
            );
        }
        let from = self
            .now
            .checked_sub(Duration::from_millis(3000))
            .unwrap_or(self.start);
        for (t, b, p, bpdu) in self.sent.iter().filter(|s| s.0 >= from) {
            if let Bpdu::Rst { flags, body } = bpdu {
                eprintln!(
                    "{:?} {b}/{p} {:?}{}{}{}{}{} root {} cost {} br {} port {}",
                    *t - self.start,
                    flags.role,
                    if flags.proposal { " P" } else { "" },
                    if flags.agreement { " A" } else { "" },
                    if flags.learning { " L" } else { "" },
                    if flags.forwarding { " F" } else { "" },
                    if flags.topology_change { " TC" } else { "" },
                    body.root_id,
                    body.root_path_cost,
                    body.bridge_id,
                    body.port_id
                );
            }
        }
        for (t, b, e) in self.events.iter().filter(|s| s.0 >= from) {
            eprintln!("{:?} {b} {e:?}", *t - self.start);
        }
    }

    fn state(&self, (b, p): (usize, u16)) -> PortState {
        self.bridges[b].port_state(p).unwrap()
    }

    fn role(&self, (b, p): (usize, u16)) -> Role {
        self.bridges[b].port_role(p).unwrap()
    }

    /// Traces every port state change of a bridge (RSTP_TRACE_PORT=b/p).
    fn trace_port(&self, b: usize, why: &str) {
        if let Ok(v) = std::env::var("RSTP_TRACE_PORT") {
            for bp in v.split(',') {
                let Some((tb, tp)) = bp.split_once('/') else {
                    continue;
                };
                if tb.parse() == Ok(b) {
                    let tp: u16 = tp.parse().unwrap_or(0);
                    eprintln!(
                        "{:?} {b}/{tp} after {why}: {}",
                        self.elapsed(),
                        self.bridges[b].debug_port(tp)
                    );
                }
            }
        }
    }

    /// A link forwards when both its ends forward.
    fn forwarding(&self, l: usize) -> bool {
        let k = &self.links[l];
        k.up && self.state(k.a) == PortState::Forwarding && self.state(k.b) == PortState::Forwarding
    }

    /// The links of a cycle in the forwarding graph, if there is one.
    fn forwarding_cycle(&self) -> Option<Vec<usize>> {
        let mut parent: Vec<usize> = (0..self.bridges.len()).collect();
        fn find(parent: &mut [usize], mut x: usize) -> usize {
            while parent[x] != x {
                parent[x] = parent[parent[x]];
                x = parent[x];
            }
            x
        }
        let fwd: Vec<usize> = (0..self.links.len())
            .filter(|&l| {
                let k = &self.links[l];
                self.forwarding(l) && !self.frozen[k.a.0] && !self.frozen[k.b.0]
            })
            .collect();
        for &l in &fwd {
            let (a, b) = (self.links[l].a.0, self.links[l].b.0);
            let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
            if ra == rb {
                return Some(fwd);
            }
            parent[ra] = rb;
        }
        None
    }

    /// Whether the forwarding links connect every pair of bridges (not
    /// frozen) that the up links connect.
    fn spanning(&self) -> bool {
        let n = self.bridges.len();
        let comp = |use_link: &dyn Fn(usize) -> bool| {
            let mut c: Vec<usize> = (0..n).collect();
            loop {
                let mut changed = false;
                for l in 0..self.links.len() {
                    let k = &self.links[l];
                    if self.frozen[k.a.0] || self.frozen[k.b.0] || !use_link(l) {
                        continue;
                    }
                    let m = c[k.a.0].min(c[k.b.0]);
                    if c[k.a.0] != m || c[k.b.0] != m {
                        c[k.a.0] = m;
                        c[k.b.0] = m;
                        changed = true;
                    }
                }
                if !changed {
                    return c;
                }
            }
        };
        comp(&|l| self.links[l].up) == comp(&|l| self.forwarding(l))
    }

    fn next_instant(&self) -> Option<Instant> {
        let msg = self.inflight.iter().map(|m| m.at).min();
        let timer = (0..self.bridges.len())
            .filter(|&b| !self.frozen[b])
            .filter_map(|b| self.bridges[b].poll_timeout())
            .min();
        msg.into_iter().chain(timer).min()
    }

    /// Advances to the next instant something happens, if not after `end`.
    fn step(&mut self, end: Instant) -> bool {
        let Some(t) = self.next_instant().filter(|t| *t <= end) else {
            self.now = self.now.max(end);
            return false;
        };
        assert!(t >= self.now, "time runs forward");
        self.now = t;
        self.inflight.sort_by_key(|m| (m.at, m.seq));
        while self.inflight.first().is_some_and(|m| m.at <= self.now) {
            let m = self.inflight.remove(0);
            let (b, p) = m.to;
            if self.links[m.link].up && !self.frozen[b] {
                self.bridges[b].receive(p, &m.bytes, self.now).unwrap();
                self.trace_port(b, &format!("rx on {p}: {:?}", Bpdu::decode(&m.bytes).ok()));
                self.pump(b);
            }
        }
        for b in 0..self.bridges.len() {
            if !self.frozen[b]
                && self.bridges[b]
                    .poll_timeout()
                    .is_some_and(|t| t <= self.now)
            {
                self.bridges[b].handle_timeout(self.now);
                self.trace_port(b, "timeout");
                self.pump(b);
            }
        }
        true
    }

    fn run_for(&mut self, d: Duration) {
        let end = self.now + d;
        while self.step(end) {}
    }

    /// Runs until `done` holds, at most `max`; returns the time it took.
    fn run_until(&mut self, max: Duration, done: impl Fn(&Net) -> bool) -> Option<Duration> {
        let t0 = self.now;
        let end = t0 + max;
        loop {
            if done(self) {
                return Some(self.now - t0);
            }
            if !self.step(end) {
                return done(self).then(|| self.now - t0);
            }
        }
    }

    fn root_of(&self, b: usize) -> BridgeId {
        self.bridges[b].status().root_id
    }

    fn id(&self, b: usize) -> BridgeId {
        self.bridges[b].bridge_id()
    }

    fn all_agree_on_root(&self, root: usize) -> bool {
        (0..self.bridges.len())
            .filter(|&b| !self.frozen[b])
            .all(|b| self.root_of(b) == self.id(root))
    }

    fn count_roles(&self, role: Role) -> usize {
        self.links
            .iter()
            .flat_map(|k| [k.a, k.b])
            .filter(|&e| self.role(e) == role)
            .count()
    }

    fn assert_no_loops(&self) {
        assert!(self.loops.is_empty(), "forwarding loops: {:?}", self.loops);
    }
}

fn converged(root: usize) -> impl Fn(&Net) -> bool {
    move |n: &Net| n.all_agree_on_root(root) && n.spanning()
}

fn triangle() -> (Net, [usize; 3]) {
    let mut n = Net::new(3);
    let l01 = n.link(0, 1);
    let l12 = n.link(1, 2);
    let l02 = n.link(0, 2);
    (n, [l01, l12, l02])
}

#[test]
fn triangle_elects_lowest_id_and_converges_without_timers() {
    let (mut n, [l01, l12, l02]) = triangle();
    n.start();
    let t = n
        .run_until(Duration::from_secs(1), converged(0))
        .expect("converges");
    eprintln!("triangle converged in {t:?}");
    assert!(t < Duration::from_millis(100), "{t:?}");
    n.run_for(Duration::from_secs(30));
    n.assert_no_loops();
    let st = n.bridges[0].status();
    assert_eq!(st.root_id, n.id(0));
    assert_eq!(st.root_port, None);
    assert_eq!(n.role(n.links[l01].a), Role::Designated);
    assert_eq!(n.role(n.links[l02].a), Role::Designated);
    assert_eq!(n.role(n.links[l01].b), Role::Root);
    assert_eq!(n.role(n.links[l02].b), Role::Root);
    // On 1–2, bridge 1 (lower id, same cost) is designated.
    assert_eq!(n.role(n.links[l12].a), Role::Designated);
    assert_eq!(n.role(n.links[l12].b), Role::Alternate);
    assert_eq!(n.state(n.links[l12].b), PortState::Discarding);
    assert_eq!(n.count_roles(Role::Alternate), 1);
    assert!(n.forwarding(l01) && n.forwarding(l02) && !n.forwarding(l12));
    assert_eq!(n.bridges[2].status().root_path_cost, COST);
    for b in &n.bridges {
        for p in b.status().ports {
            assert_eq!(p.protocol, Protocol::Rstp);
            assert_eq!(p.bpdus_bad, 0);
            assert!(p.bpdus_sent > 0 && p.bpdus_received > 0);
        }
    }
}

#[test]
fn priority_beats_mac() {
    let mut n = Net::with_priorities(&[32768, 32768, 4096]);
    n.link(0, 1);
    n.link(1, 2);
    n.link(0, 2);
    n.start();
    n.run_until(Duration::from_secs(1), converged(2))
        .expect("converges");
    n.assert_no_loops();
    assert_eq!(n.root_of(0), BridgeId::new(4096, mac(2)));
}

#[test]
fn line_forwards_everywhere() {
    let mut n = Net::new(4);
    let ls = [n.link(0, 1), n.link(1, 2), n.link(2, 3)];
    n.start();
    let t = n
        .run_until(Duration::from_secs(1), converged(0))
        .expect("converges");
    eprintln!("line of 4 converged in {t:?}");
    n.run_for(Duration::from_secs(10));
    n.assert_no_loops();
    assert!(ls.iter().all(|&l| n.forwarding(l)));
    assert_eq!(n.count_roles(Role::Alternate), 0);
    for b in 0..4 {
        assert_eq!(n.bridges[b].status().root_path_cost, COST * b as u32);
    }
}

#[test]
fn square_with_diagonal() {
    let mut n = Net::new(4);
    let l01 = n.link(0, 1);
    let l12 = n.link(1, 2);
    let l23 = n.link(2, 3);
    let l30 = n.link(3, 0);
    let l02 = n.link(0, 2);
    n.start();
    let t = n
        .run_until(Duration::from_secs(1), converged(0))
        .expect("converges");
    eprintln!("square with diagonal converged in {t:?}");
    n.run_for(Duration::from_secs(10));
    n.assert_no_loops();
    assert!(n.forwarding(l01) && n.forwarding(l30) && n.forwarding(l02));
    assert!(!n.forwarding(l12) && !n.forwarding(l23));
    assert_eq!(n.role(n.links[l12].b), Role::Alternate);
    assert_eq!(n.role(n.links[l23].a), Role::Designated);
    assert_eq!(n.role(n.links[l23].b), Role::Alternate);
    assert_eq!(n.count_roles(Role::Alternate), 2);
    assert_eq!(n.bridges[2].status().root_port, Some(n.links[l02].b.1));
}

#[test]
fn cut_root_port_alternate_takes_over_at_once() {
    let (mut n, [_l01, l12, l02]) = triangle();
    n.start();
    n.run_for(Duration::from_secs(5));
    let before = n.events.len();
    // Bridge 2's root port dies: its Alternate (towards 1) is the new root
    // port and forwards in the same instant.
    n.cut(l02);
    let t = n
        .run_until(Duration::from_secs(1), |n| {
            n.forwarding(l12) && n.spanning()
        })
        .expect("re-converges");
    eprintln!("cut 0–2: 1–2 forwarding after {t:?}");
    assert!(t <= 2 * MS, "{t:?}");
    assert_eq!(n.role(n.links[l12].b), Role::Root);
    n.run_for(Duration::from_secs(1));
    let flushed: Vec<(usize, u16)> = n.events[before..]
        .iter()
        .filter_map(|(_, b, e)| match e {
            Event::Flush { port } => Some((*b, *port)),
            _ => None,
        })
        .collect();
    eprintln!("flushes after the cut: {flushed:?}");
    // The topology change reaches bridge 1, which flushes its ports other
    // than the one it came in on, and bridge 0, whose only other port is
    // down. The dead port is flushed on both ends.
    assert!(flushed.contains(&n.links[_l01].b), "{flushed:?}");
    assert!(flushed.contains(&n.links[l02].a), "{flushed:?}");
    assert!(flushed.contains(&n.links[l02].b), "{flushed:?}");
    assert!(!flushed.contains(&n.links[l12].a), "{flushed:?}");
    assert!(
        n.bridges[0]
            .status()
            .last_topology_change
            .is_some_and(|t| t >= n.now - Duration::from_secs(1))
    );
    // Mend: back to the first tree.
    n.mend(l02);
    let t = n
        .run_until(Duration::from_secs(1), |n| {
            n.forwarding(l02) && !n.forwarding(l12) && n.spanning()
        })
        .expect("back to the first tree");
    eprintln!("mend 0–2: original tree after {t:?}");
    assert!(t < Duration::from_millis(50), "{t:?}");
    n.run_for(Duration::from_secs(30));
    assert_eq!(n.role(n.links[l12].b), Role::Alternate);
    n.assert_no_loops();
}

#[test]
fn cut_designated_side_reconverges_in_milliseconds() {
    let (mut n, [l01, l12, l02]) = triangle();
    n.start();
    n.run_for(Duration::from_secs(5));
    // Bridge 1 loses its root port and its only other port is Designated:
    // it must learn from bridge 2 that the root is still there.
    n.cut(l01);
    let t = n
        .run_until(Duration::from_secs(1), converged(0))
        .expect("re-converges");
    eprintln!("cut 0–1: re-converged after {t:?}");
    assert!(t < Duration::from_millis(20), "{t:?}");
    assert!(n.forwarding(l12) && n.forwarding(l02));
    assert_eq!(n.role(n.links[l12].a), Role::Root);
    n.mend(l01);
    let t = n
        .run_until(Duration::from_secs(1), |n| {
            n.forwarding(l01) && !n.forwarding(l12) && n.spanning()
        })
        .expect("back");
    eprintln!("mend 0–1: original tree after {t:?}");
    n.run_for(Duration::from_secs(30));
    assert_eq!(n.role(n.links[l12].b), Role::Alternate);
    n.assert_no_loops();
}

#[test]
fn root_dies_new_root_in_milliseconds() {
    let mut n = Net::new(4);
    let l01 = n.link(0, 1);
    let l12 = n.link(1, 2);
    let l23 = n.link(2, 3);
    let l30 = n.link(3, 0);
    let l02 = n.link(0, 2);
    n.start();
    n.run_for(Duration::from_secs(5));
    // The driver sees every tunnel to bridge 0 die: disabled ports, not
    // Max Age, drive the re-convergence.
    for l in [l01, l30, l02] {
        n.cut(l);
    }
    n.frozen[0] = true; // out of the checks: it is alone
    let t = n.run_until(Duration::from_secs(1), converged(1));
    if t.is_none() {
        n.dump();
    }
    let t = t.expect("re-converges");
    eprintln!("root died: bridge 1 is root of a spanning tree after {t:?}");
    assert!(t < Duration::from_millis(100), "{t:?}");
    assert!(n.forwarding(l12) && n.forwarding(l23));
    n.run_for(Duration::from_secs(30));
    assert!(converged(1)(&n));
    n.assert_no_loops();
}

/// A root that hangs (stops sending BPDUs) while its tunnels stay up: the
/// others notice only when the root's information ages out, three Hello
/// Times (6 s) after the last BPDU they got from it (17.21.23), then
/// re-converge in milliseconds. The hung box's ports keep their last state,
/// so the loop check leaves out its links: its data plane must fail closed
/// on its own (nothing RSTP can do about a box that forwards but does not
/// speak).
#[test]
fn hung_root_is_aged_out_after_three_hellos() {
    let (mut n, [l01, l12, l02]) = triangle();
    n.start();
    n.run_for(Duration::from_secs(5));
    let last_hello = n
        .sent
        .iter()
        .filter(|(_, b, _, _)| *b == 0)
        .map(|(t, _, _, _)| *t)
        .max()
        .unwrap();
    n.frozen[0] = true;
    let t = n
        .run_until(Duration::from_secs(20), |n| {
            converged(1)(n) && n.forwarding(l12)
        })
        .expect("re-converges");
    let since_hello = n.now - last_hello;
    eprintln!("hung root: new root after {t:?}, {since_hello:?} after its last BPDU");
    assert!(since_hello >= Duration::from_secs(6), "{since_hello:?}");
    assert!(since_hello < Duration::from_millis(6100), "{since_hello:?}");
    assert!(n.links[l01].up && n.links[l02].up);
    n.run_for(Duration::from_secs(30));
    assert!(converged(1)(&n));
    n.assert_no_loops();
}

/// Plays a classic STP bridge (802.1D-1998, e.g. Linux `stp_state 1`) on
/// the far end of a port by hand.
fn stp_config(root: BridgeId, bridge: BridgeId, cost: u32, tc: bool) -> Vec<u8> {
    Bpdu::Config {
        topology_change: tc,
        topology_change_ack: false,
        body: BpduBody {
            root_id: root,
            root_path_cost: cost,
            bridge_id: bridge,
            port_id: PortId::new(0x80, 1),
            message_age: 0,
            max_age: 20 * 256,
            hello_time: 2 * 256,
            forward_delay: 15 * 256,
        },
    }
    .encode()
}

#[test]
fn stp_neighbour_gets_config_bpdus_and_forward_delay() {
    let t0 = Instant::now();
    let mut br = Bridge::new(BridgeConfig::new(mac(0))).unwrap();
    br.add_port(1, COST).unwrap(); // to the STP bridge
    br.add_port(2, COST).unwrap(); // to nobody yet
    br.set_port_enabled(1, true, t0).unwrap();
    br.set_port_enabled(2, true, t0).unwrap();
    // The STP bridge (worse id) believes it is root until it hears us.
    let stp = BridgeId::new(32768, [2, 0, 0, 0, 0, 0x99]);
    let mut now = t0;
    let mut next_hello = t0 + MS;
    let mut sent: Vec<(Duration, u16, Bpdu)> = vec![];
    let mut states: Vec<(Duration, u16, PortState)> = vec![];
    let mut flushes: Vec<(Duration, u16)> = vec![];
    let mut heard_us = false;
    let mut tcn_at = None;
    let mut tcn_sent = false;
    let end = t0 + Duration::from_secs(60);
    while now < end {
        let next = [br.poll_timeout(), Some(next_hello), tcn_at]
            .into_iter()
            .flatten()
            .min()
            .unwrap();
        now = next.min(end);
        if now >= next_hello {
            // An STP designated port sends Config BPDUs until it hears
            // better ones; then it is silent (root port).
            if !heard_us {
                br.receive(1, &stp_config(stp, stp, 0, false), now).unwrap();
            }
            next_hello = now + Duration::from_secs(2);
        }
        if tcn_at.is_some_and(|t| now >= t) {
            br.receive(1, &Bpdu::Tcn.encode(), now).unwrap();
            tcn_at = None;
        }
        br.handle_timeout(now);
        while let Some((port, bytes)) = br.poll_transmit() {
            let b = Bpdu::decode(&bytes).unwrap();
            if port == 1 && matches!(b, Bpdu::Config { .. }) {
                heard_us = true;
            }
            sent.push((now - t0, port, b));
        }
        while let Some(e) = br.poll_event() {
            match e {
                Event::PortState { port, state } => states.push((now - t0, port, state)),
                Event::Flush { port } => flushes.push((now - t0, port)),
                _ => {}
            }
        }
        // Once port 1 forwards, the STP bridge reports a topology change.
        if br.port_state(1) == Some(PortState::Forwarding) && !tcn_sent {
            tcn_sent = true;
            tcn_at = Some(now + Duration::from_millis(100));
        }
    }
    let st = br.status();
    let p1 = &st.ports[0];
    assert_eq!(p1.protocol, Protocol::Stp, "port 1 fell back to STP");
    assert_eq!(st.ports[1].protocol, Protocol::Rstp, "port 2 did not");
    assert_eq!(p1.role, Role::Designated);
    let first_config = sent
        .iter()
        .find(|(_, p, b)| *p == 1 && matches!(b, Bpdu::Config { .. }))
        .map(|(t, _, _)| *t)
        .expect("Config BPDUs on port 1");
    eprintln!("STP: first Config BPDU after {first_config:?}");
    assert!(first_config <= Duration::from_secs(6), "{first_config:?}");
    assert!(
        !sent
            .iter()
            .any(|(t, p, b)| *p == 1 && *t > first_config && matches!(b, Bpdu::Rst { .. })),
        "no RST BPDUs on port 1 after the fallback"
    );
    // Periodic Config BPDUs every Hello Time.
    let configs = sent
        .iter()
        .filter(|(_, p, b)| *p == 1 && matches!(b, Bpdu::Config { .. }))
        .count();
    assert!(configs >= 20, "{configs}");
    let at = |state| {
        states
            .iter()
            .find(|(_, p, s)| *p == 1 && *s == state)
            .map(|(t, _, _)| *t)
    };
    let learning = at(PortState::Learning).expect("learning");
    let forwarding = at(PortState::Forwarding).expect("forwarding");
    eprintln!("STP: port 1 Learning at {learning:?}, Forwarding at {forwarding:?}");
    // Discarding (Listening) for at least Forward Delay, then Learning for
    // exactly Forward Delay.
    assert!(learning >= Duration::from_secs(15), "{learning:?}");
    assert_eq!(forwarding - learning, Duration::from_secs(15));
    assert!(forwarding >= Duration::from_secs(30));
    // The TCN is answered with a Config BPDU carrying TC ack within a
    // Hello Time, and the other port is flushed.
    let acked = sent
        .iter()
        .find(|(_, p, b)| {
            *p == 1
                && matches!(
                    b,
                    Bpdu::Config {
                        topology_change_ack: true,
                        ..
                    }
                )
        })
        .map(|(t, _, _)| *t)
        .expect("TCN acknowledged");
    eprintln!("STP: TCN acknowledged at {acked:?}; flushes {flushes:?}");
    assert!(acked > forwarding && acked - forwarding <= Duration::from_secs(3));
    assert!(flushes.iter().any(|(t, p)| *p == 2 && *t > forwarding));
}

#[test]
fn stp_root_neighbour_gets_tcns_until_acked() {
    let t0 = Instant::now();
    let mut br = Bridge::new(BridgeConfig::new(mac(5))).unwrap();
    br.add_port(1, COST).unwrap();
    br.add_port(2, COST).unwrap();
    br.set_port_enabled(1, true, t0).unwrap();
    let stp = BridgeId::new(4096, [2, 0, 0, 0, 0, 0x99]);
    let mut now = t0;
    let mut sent = vec![];
    let mut next_hello = t0;
    let mut acked = false;
    let mut enabled2 = false;
    while now < t0 + Duration::from_secs(80) {
        let next = [br.poll_timeout(), Some(next_hello)]
            .into_iter()
            .flatten()
            .min()
            .unwrap();
        now = next;
        if now >= next_hello {
            let tcn_seen = sent.iter().any(|(_, p, b)| *p == 1 && *b == Bpdu::Tcn);
            let bytes = Bpdu::Config {
                topology_change: tcn_seen,
                topology_change_ack: tcn_seen && !acked,
                body: BpduBody {
                    root_id: stp,
                    root_path_cost: 0,
                    bridge_id: stp,
                    port_id: PortId::new(0x80, 1),
                    message_age: 0,
                    max_age: 20 * 256,
                    hello_time: 2 * 256,
                    forward_delay: 15 * 256,
                },
            }
            .encode();
            acked |= tcn_seen;
            br.receive(1, &bytes, now).unwrap();
            next_hello = now + Duration::from_secs(2);
        }
        br.handle_timeout(now);
        if !enabled2 && now >= t0 + Duration::from_secs(10) {
            // A port comes up downstream and, after its timers, forwards:
            // a topology change this bridge must report up its root port.
            br.set_port_enabled(2, true, now).unwrap();
            enabled2 = true;
        }
        while let Some((port, bytes)) = br.poll_transmit() {
            sent.push((now - t0, port, Bpdu::decode(&bytes).unwrap()));
        }
        while br.poll_event().is_some() {}
    }
    let st = br.status();
    assert_eq!(st.root_id, stp);
    assert_eq!(st.root_port, Some(1));
    assert_eq!(st.ports[0].protocol, Protocol::Stp);
    assert_eq!(st.ports[0].state, PortState::Forwarding);
    let after_fallback: Vec<_> = sent
        .iter()
        .filter(|(t, p, _)| *p == 1 && *t > Duration::from_secs(6))
        .collect();
    // A root port towards STP sends only TCNs, and only for a topology
    // change, until acknowledged.
    assert!(
        after_fallback.iter().all(|(_, _, b)| *b == Bpdu::Tcn),
        "{after_fallback:?}"
    );
    let tcns = after_fallback.len();
    eprintln!("STP root neighbour: {tcns} TCNs sent");
    assert!((1..=3).contains(&tcns), "{tcns}");
    assert!(acked);
}

#[test]
fn bad_bpdus_are_counted_and_ignored() {
    let t0 = Instant::now();
    let mut br = Bridge::new(BridgeConfig::new(mac(0))).unwrap();
    br.add_port(1, COST).unwrap();
    br.set_port_enabled(1, true, t0).unwrap();
    assert!(matches!(
        br.receive(1, &[0x42, 0x42, 0x03, 0, 0], t0),
        Err(ReceiveError::Malformed(DecodeError::Truncated))
    ));
    assert!(br.receive(9, &Bpdu::Tcn.encode(), t0).is_err());
    // Our own BPDU, looped back.
    let (_, own) = br.poll_transmit().unwrap();
    assert_eq!(br.receive(1, &own, t0), Err(ReceiveError::Looped));
    let p = &br.status().ports[0];
    assert_eq!((p.bpdus_bad, p.bpdus_received), (2, 0));
    assert!(
        Bridge::new(BridgeConfig {
            priority: 100,
            ..BridgeConfig::new(mac(0))
        })
        .is_err()
    );
    assert_eq!(br.add_port(1, COST), Err(PortError::Exists(1)));
    assert_eq!(br.add_port(0, COST), Err(PortError::BadNumber(0)));
    assert_eq!(br.add_port(2, 0), Err(PortError::BadPathCost(0)));
}

#[test]
fn hold_count_limits_transmissions() {
    let t0 = Instant::now();
    let mut br = Bridge::new(BridgeConfig::new(mac(0))).unwrap();
    br.add_port(1, COST).unwrap();
    br.set_port_enabled(1, true, t0).unwrap();
    // A neighbour flapping its claim makes us answer, at most 6 a second.
    let other = BridgeId::new(32768, [2, 0, 0, 0, 0, 0x99]);
    for i in 0..50u32 {
        let b = stp_config(other, other, i, false);
        let mut b = Bpdu::decode(&b).unwrap();
        if let Bpdu::Config { body, .. } = &mut b {
            body.root_id = BridgeId::new(4096 * (i as u16 % 2), [2, 0, 0, 0, 0, 0x99]);
        }
        br.receive(1, &b.encode(), t0 + MS * i).unwrap();
    }
    let mut n = 0;
    while br.poll_transmit().is_some() {
        n += 1;
    }
    assert!(n <= 6, "{n}");
}

#[test]
fn remove_port_reconverges() {
    let (mut n, [_l01, l12, l02]) = triangle();
    n.start();
    n.run_for(Duration::from_secs(5));
    let (b, p) = n.links[l02].b;
    n.links[l02].up = false;
    n.bridges[b].remove_port(p).unwrap();
    n.pump(b);
    let (a, pa) = n.links[l02].a;
    n.bridges[a].set_port_enabled(pa, false, n.now).unwrap();
    n.pump(a);
    let t = n
        .run_until(Duration::from_secs(1), |n| n.forwarding(l12))
        .expect("re-converges");
    assert!(t <= 2 * MS);
    n.assert_no_loops();
}

/// A random connected graph: a random tree plus random extra links.
fn graph() -> impl Strategy<Value = (Vec<u16>, Vec<(usize, usize)>, Vec<u8>)> {
    (4usize..=6)
        .prop_flat_map(|n| {
            (
                proptest::collection::vec(prop_oneof![Just(32768u16), Just(4096), Just(61440)], n),
                proptest::collection::vec(any::<prop::sample::Index>(), n - 1),
                proptest::collection::vec((0..n, 0..n), 0..n),
                proptest::collection::vec(1u8..=5, 2 * n),
            )
        })
        .prop_map(|(prio, tree, extra, delays)| {
            let mut edges = vec![];
            for (i, ix) in tree.iter().enumerate() {
                edges.push((ix.index(i + 1), i + 1));
            }
            for (a, b) in extra {
                if a != b {
                    edges.push((a, b));
                }
            }
            (prio, edges, delays)
        })
}

proptest! {
    // RSTP_CASES=5000 for a longer hunt.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("RSTP_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    /// Random cuts and mends on a random graph: the forwarding links form a
    /// forest after every delivery and every timeout, and once things
    /// settle, span what the up links connect.
    #[test]
    fn never_a_forwarding_loop(
        (prio, edges, delays) in graph(),
        ops in proptest::collection::vec((any::<prop::sample::Index>(), 0u64..3000), 1..12),
    ) {
        let mut n = Net::with_priorities(&prio);
        for (i, &(a, b)) in edges.iter().enumerate() {
            let d = delays.get(i).copied().unwrap_or(1);
            n.link_with_delay(a, b, MS * u32::from(d));
        }
        n.start();
        n.run_for(Duration::from_secs(3));
        for (ix, wait) in ops {
            let l = ix.index(n.links.len());
            if n.links[l].up {
                n.cut(l);
            } else {
                n.mend(l);
            }
            n.run_for(Duration::from_millis(wait));
            prop_assert!(n.loops.is_empty(), "loop: {:?}", n.loops);
        }
        n.run_for(Duration::from_secs(60));
        prop_assert!(n.loops.is_empty(), "loop: {:?}", n.loops);
        prop_assert!(n.spanning(), "settled tree does not span");
    }
}

#[test]
fn stp_port_returns_to_rstp_when_the_neighbour_does() {
    let t0 = Instant::now();
    let mut br = Bridge::new(BridgeConfig::new(mac(0))).unwrap();
    br.add_port(1, COST).unwrap();
    br.set_port_enabled(1, true, t0).unwrap();
    let other = BridgeId::new(32768, [2, 0, 0, 0, 0, 0x99]);
    let mut now = t0;
    for _ in 0..5 {
        br.receive(1, &stp_config(other, other, 0, false), now)
            .unwrap();
        now += Duration::from_secs(2);
        br.handle_timeout(now);
    }
    assert_eq!(br.status().ports[0].protocol, Protocol::Stp);
    // The neighbour now speaks RSTP (an upgraded bridge): its RST BPDUs
    // bring the port back once the migrate time has passed (17.24).
    let rst = match Bpdu::decode(&stp_config(other, other, 0, false)).unwrap() {
        Bpdu::Config { body, .. } => Bpdu::Rst {
            flags: RstFlags {
                topology_change: false,
                proposal: false,
                role: BpduRole::Designated,
                learning: false,
                forwarding: false,
                agreement: false,
                topology_change_ack: false,
            },
            body,
        },
        _ => unreachable!(),
    };
    for _ in 0..3 {
        br.receive(1, &rst.encode(), now).unwrap();
        now += Duration::from_secs(2);
        br.handle_timeout(now);
    }
    assert_eq!(br.status().ports[0].protocol, Protocol::Rstp);
    // And mcheck forces the check at once.
    for _ in 0..4 {
        br.receive(1, &stp_config(other, other, 0, false), now)
            .unwrap();
        now += Duration::from_secs(2);
        br.handle_timeout(now);
    }
    assert_eq!(br.status().ports[0].protocol, Protocol::Stp);
    br.migration_check(1, now).unwrap();
    assert_eq!(br.status().ports[0].protocol, Protocol::Rstp);
}

#[test]
fn events_leave_forwarding_before_entering_it() {
    let (mut n, [_l01, _l12, l02]) = triangle();
    n.start();
    n.run_for(Duration::from_secs(5));
    let before = n.events.len();
    let cut_at = n.now;
    n.cut(l02);
    // Bridge 2 swaps its root port within one call: the dead port's
    // Discarding comes before the new root port's Forwarding.
    let states: Vec<(u16, PortState)> = n.events[before..]
        .iter()
        .filter(|(t, b, _)| *t == cut_at && *b == 2)
        .filter_map(|(_, _, e)| match e {
            Event::PortState { port, state } => Some((*port, *state)),
            _ => None,
        })
        .collect();
    let first_fwd = states.iter().position(|(_, s)| *s == PortState::Forwarding);
    let last_disc = states
        .iter()
        .rposition(|(_, s)| *s == PortState::Discarding);
    assert!(last_disc.is_some(), "{states:?}");
    if let (Some(f), Some(d)) = (first_fwd, last_disc) {
        assert!(d < f, "{states:?}");
    }
}

#[test]
fn path_cost_change_moves_the_root_port() {
    let (mut n, [_l01, l12, l02]) = triangle();
    n.start();
    n.run_for(Duration::from_secs(5));
    // Make the direct link from 2 to the root dearer than the way via 1.
    let (b, p) = n.links[l02].b;
    n.bridges[b].set_port_path_cost(p, 3 * COST, n.now).unwrap();
    n.pump(b);
    let t = n
        .run_until(Duration::from_secs(1), |n| {
            n.forwarding(l12) && !n.forwarding(l02) && n.spanning()
        })
        .expect("re-converges");
    eprintln!("path cost change: new tree after {t:?}");
    assert_eq!(n.role(n.links[l12].b), Role::Root);
    assert_eq!(n.role(n.links[l02].b), Role::Alternate);
    n.run_for(Duration::from_secs(30));
    n.assert_no_loops();
}
