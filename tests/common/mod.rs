//! Shared pieces of the end-to-end tests: configs for bgp4mesh and for the
//! peers that judge it, written the way their operators write them.

#![allow(dead_code)]

pub mod mesh;

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Result, ensure};
use bgp4mesh_lab::peers::{Bgp4mesh, BgpRoute, Bird, Frr, Gobgp, SessionState, best_route};
use bgp4mesh_lab::{Iface, Lab, Node, wait_until};

pub const BIN: &str = env!("CARGO_BIN_EXE_bgp4mesh");
pub const SETTLE: Duration = Duration::from_secs(30);

/// The prefix a peer originates, with MED 50, community 65001:7 and large
/// community 65001:1:2.
pub fn peer_prefix(v6: bool) -> &'static str {
    if v6 {
        "2001:db8:100::/48"
    } else {
        "198.51.100.0/24"
    }
}

/// The prefix bgp4mesh originates.
pub fn our_prefix(v6: bool) -> &'static str {
    if v6 {
        "2001:db8:44::/48"
    } else {
        "44.30.127.0/24"
    }
}

pub fn family(address: IpAddr) -> &'static str {
    if address.is_ipv6() { "ipv6" } else { "ipv4" }
}

/// bgp4mesh with one `[bgp]` section; `body` holds neighbours, statics and
/// policies.
pub fn start_ours<'l>(
    lab: &'l Lab,
    node: &Node,
    asn: u32,
    router_id: &str,
    body: &str,
) -> Result<Bgp4mesh<'l>> {
    let config = format!("[bgp]\nasn = {asn}\nrouter_id = \"{router_id}\"\n\n{body}\n");
    Bgp4mesh::start(lab, node, Path::new(BIN), &config)
}

/// A `[[bgp.neighbor]]` block with fast timers for tests.
pub fn our_neighbor(name: &str, address: IpAddr, remote_as: u32, extra: &str) -> String {
    format!(
        "[[bgp.neighbor]]\nname = \"{name}\"\naddress = \"{address}\"\nremote_as = {remote_as}\nfamilies = [\"{}\"]\nconnect_retry = 1\nerror_wait = [1, 4]\n{extra}\n",
        family(address)
    )
}

/// A daemon we test against, behind one face.
pub enum Peer<'l> {
    Bird(Bird<'l>),
    Frr(Frr<'l>),
    Gobgp(Gobgp<'l>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Bird,
    Frr,
    Gobgp,
}

impl<'l> Peer<'l> {
    /// Starts `kind` in `node` as AS `asn` with one neighbour (`ours`,
    /// AS `ours_as`) over the session family of `ours`, originating
    /// [`peer_prefix`] with MED, community and large community set.
    pub fn start(
        kind: Kind,
        lab: &'l Lab,
        node: &Node,
        asn: u32,
        me: IpAddr,
        ours: IpAddr,
        ours_as: u32,
    ) -> Result<Peer<'l>> {
        let v6 = ours.is_ipv6();
        let fam = family(ours);
        let prefix = peer_prefix(v6);
        let router_id = format!("10.255.{}.{}", asn % 250, if v6 { 6 } else { 4 });
        Ok(match kind {
            Kind::Bird => {
                let channel = if v6 { "ipv6" } else { "ipv4" };
                Peer::Bird(Bird::start(
                    lab,
                    node,
                    &format!(
                        r#"
router id {router_id};
protocol device {{}}
protocol static origin {{ {channel}; route {prefix} blackhole; }}
protocol bgp ours {{
  local {me} as {asn};
  neighbor {ours} as {ours_as};
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  {channel} {{
    import all;
    export filter {{
      if source != RTS_STATIC then reject;
      bgp_med = 50; bgp_community.add((65001, 7)); bgp_large_community.add((65001, 1, 2));
      accept;
    }};
  }};
}}
"#
                    ),
                )?)
            }
            Kind::Frr => Peer::Frr(Frr::start(
                lab,
                node,
                &format!(
                    r#"
frr defaults traditional
hostname peer
route-map ATTRS permit 10
 set metric 50
 set community 65001:7
 set large-community 65001:1:2
router bgp {asn}
 bgp router-id {router_id}
 no bgp ebgp-requires-policy
 no bgp network import-check
 no bgp default ipv4-unicast
 neighbor {ours} remote-as {ours_as}
 neighbor {ours} timers connect 1
 address-family {fam} unicast
  network {prefix} route-map ATTRS
  neighbor {ours} activate
 exit-address-family
"#
                ),
            )?),
            Kind::Gobgp => {
                let g = Gobgp::start(
                    lab,
                    node,
                    &format!(
                        r#"
[global.config]
  as = {asn}
  router-id = "{router_id}"
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{ours}"
    peer-as = {ours_as}
  [neighbors.timers.config]
    connect-retry = 1
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "{fam}-unicast"
"#
                    ),
                )?;
                g.gobgp(&[
                    "global",
                    "rib",
                    "-a",
                    fam,
                    "add",
                    prefix,
                    "nexthop",
                    &me.to_string(),
                    "med",
                    "50",
                    "community",
                    "65001:7",
                    "large-community",
                    "65001:1:2",
                ])?;
                Peer::Gobgp(g)
            }
        })
    }

    /// Session state towards bgp4mesh at `ours`.
    pub fn state(&self, ours: IpAddr) -> Result<SessionState> {
        match self {
            Peer::Bird(b) => b.bgp_state("ours"),
            Peer::Frr(f) => f.bgp_state(&ours.to_string()),
            Peer::Gobgp(g) => g.bgp_state(&ours.to_string()),
        }
    }

    pub fn routes(&self) -> Result<Vec<BgpRoute>> {
        match self {
            Peer::Bird(b) => b.routes(),
            Peer::Frr(f) => f.routes(),
            Peer::Gobgp(g) => g.routes(),
        }
    }

    /// Stops originating [`peer_prefix`].
    pub fn withdraw(&self, asn: u32, v6: bool) -> Result<()> {
        let prefix = peer_prefix(v6);
        let fam = if v6 { "ipv6" } else { "ipv4" };
        match self {
            Peer::Bird(b) => b.birdc("disable origin").map(|_| ()),
            Peer::Frr(f) => f
                .vtysh(&[
                    "configure terminal",
                    &format!("router bgp {asn}"),
                    &format!("address-family {fam} unicast"),
                    &format!("no network {prefix} route-map ATTRS"),
                ])
                .map(|_| ()),
            Peer::Gobgp(g) => g
                .gobgp(&["global", "rib", "-a", fam, "del", prefix])
                .map(|_| ()),
        }
    }

    /// Asks bgp4mesh (at `ours`) to send its routes again with a
    /// ROUTE-REFRESH. False when the daemon has no command that sends one:
    /// GoBGP keeps every received route and re-applies its policy locally
    /// on `softresetin`.
    pub fn request_refresh(&self, ours: IpAddr) -> Result<bool> {
        match self {
            Peer::Bird(b) => b.birdc("reload in ours").map(|_| true),
            Peer::Frr(f) => f
                .vtysh(&[&format!("clear bgp {ours} soft in")])
                .map(|_| true),
            Peer::Gobgp(_) => Ok(false),
        }
    }

    pub fn proc(&self) -> &bgp4mesh_lab::Proc {
        match self {
            Peer::Bird(b) => b.proc(),
            Peer::Frr(f) => f.proc(),
            Peer::Gobgp(g) => g.proc(),
        }
    }
}

/// Waits until both ends of a session are Established.
pub fn wait_established(
    ours: &Bgp4mesh<'_>,
    name: &str,
    peer: &Peer<'_>,
    our_address: IpAddr,
) -> Result<()> {
    wait_until(
        SETTLE,
        &format!("session {name} Established on both sides"),
        || {
            let (a, z) = (ours.bgp_state(name)?, peer.state(our_address)?);
            ensure!(
                a == SessionState::Established && z == SessionState::Established,
                "bgp4mesh {a}, peer {z}"
            );
            Ok(())
        },
    )
}

/// Waits until `routes` (re-read each time) has a best path for `prefix`.
pub fn wait_route(
    what: &str,
    prefix: &str,
    mut routes: impl FnMut() -> Result<Vec<BgpRoute>>,
) -> Result<BgpRoute> {
    wait_until(SETTLE, &format!("{prefix} at {what}"), || {
        let all = routes()?;
        best_route(&all, prefix)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("{what} has {all:?}"))
    })
}

/// Waits until `routes` has no path for `prefix`.
pub fn wait_no_route(
    what: &str,
    prefix: &str,
    mut routes: impl FnMut() -> Result<Vec<BgpRoute>>,
) -> Result<()> {
    wait_until(SETTLE, &format!("{prefix} gone from {what}"), || {
        let all = routes()?;
        ensure!(
            !all.iter().any(|r| r.prefix == prefix),
            "{what} still has {all:?}"
        );
        Ok(())
    })
}

/// `proto bgp` routes in `node`'s kernel (main table): destination and
/// gateways, read from `ip -j route`.
pub fn kernel_routes(lab: &Lab, node: &Node, v6: bool) -> Result<Vec<(String, Vec<String>)>> {
    kernel_routes_of(lab, node, v6, "bgp")
}

/// Like [`kernel_routes`], for routes of another protocol (`bird`).
pub fn kernel_routes_of(
    lab: &Lab,
    node: &Node,
    v6: bool,
    proto: &str,
) -> Result<Vec<(String, Vec<String>)>> {
    let family = if v6 { "-6" } else { "-4" };
    let out = lab.exec(node, &["ip", "-j", family, "route", "show", "proto", proto])?;
    let json: serde_json::Value =
        serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })?;
    Ok(json
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            let dst = r["dst"].as_str().unwrap_or_default().to_string();
            let mut gateways: Vec<String> = match r["nexthops"].as_array() {
                Some(hops) => hops
                    .iter()
                    .filter_map(|h| h["gateway"].as_str().map(str::to_string))
                    .collect(),
                None => r["gateway"]
                    .as_str()
                    .map(str::to_string)
                    .into_iter()
                    .collect(),
            };
            gateways.sort();
            (dst, gateways)
        })
        .collect())
}

/// One ping from `from` to `to`, answered within a second.
/// TCP through iperf3 from `from` to `to` (an address of `server`) for
/// `seconds`: bits per second received.
pub fn iperf(lab: &Lab, from: &Node, server: &Node, to: &str, seconds: u32) -> Result<f64> {
    let proc = lab.spawn(server, "iperf3-server", &["iperf3", "-s", "-1", "-B", to])?;
    wait_until(Duration::from_secs(10), "iperf3 listening", || {
        let out = lab.exec(server, &["ss", "-tlnH", "sport = :5201"])?;
        ensure!(!out.trim().is_empty(), "not yet");
        Ok(())
    })?;
    let time = seconds.to_string();
    let out = lab.exec_full(
        from,
        &["iperf3", "-J", "-t", &time, "-c", to],
        None,
        Duration::from_secs(60),
    )?;
    lab.stop(&proc);
    ensure!(out.success(), "iperf3: {}{}", out.stdout, out.stderr);
    let report: serde_json::Value = serde_json::from_str(&out.stdout)?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("no throughput in iperf3's report"))
}

pub fn ping(lab: &Lab, from: &Node, to: &str) -> Result<()> {
    let out = lab.try_exec(from, &["ping", "-c", "1", "-W", "1", to])?;
    ensure!(out.success(), "ping {to}: {}{}", out.stdout, out.stderr);
    Ok(())
}

/// BIRD as seed 000's DN42 peer (AS 4242420000) at `d`, originating
/// `prefixes` towards the edge at `e2` (AS 4242421869).
pub fn dn42_peer_bird(prefixes: &[String], d: &Iface, e2: &Iface) -> String {
    let routes: String = prefixes
        .iter()
        .map(|p| format!("  route {p} blackhole;\n"))
        .collect();
    format!(
        r#"
router id 172.20.0.53;
protocol device {{}}
protocol static dn42 {{ ipv4;
{routes}}}
protocol bgp edge {{
  local {d} as 4242420000;
  neighbor {e2} as 4242421869;
  connect delay time 1; connect retry time 1;
  ipv4 {{ import none; export all; }};
}}
"#,
        d = d.ipv4,
        e2 = e2.ipv4
    )
}

/// Seed 000's chain: `dn42` (BIRD, AS 4242420000, originating `prefixes`)
/// — `edge` (BIRD, AS 4242421869, next hop self towards the VPS; with
/// `edge_kernel` it also installs what it learns) — `vps`, where the test
/// starts bgp4mesh in iBGP with the edge (address `e1.ipv4`).
pub struct Dn42Chain<'l> {
    pub vps: Node,
    pub edge: Node,
    pub dn42: Node,
    /// vps — edge
    pub v: Iface,
    pub e1: Iface,
    /// edge — dn42
    pub e2: Iface,
    pub d: Iface,
    pub dn42_bird: Bird<'l>,
    pub edge_bird: Bird<'l>,
}

impl<'l> Dn42Chain<'l> {
    pub fn start(lab: &'l Lab, prefixes: &[String], edge_kernel: bool) -> Result<Dn42Chain<'l>> {
        let (vps, edge, dn42) = (
            lab.add_node("vps")?,
            lab.add_node("edge")?,
            lab.add_node("dn42")?,
        );
        let (v, e1) = lab.link(&vps, &edge)?;
        let (e2, d) = lab.link(&edge, &dn42)?;
        let dn42_bird = Bird::start(lab, &dn42, &dn42_peer_bird(prefixes, &d, &e2))?;
        let kernel = if edge_kernel {
            "protocol kernel { ipv4 { export all; }; }"
        } else {
            ""
        };
        let edge_bird = Bird::start(
            lab,
            &edge,
            &format!(
                r#"
router id 172.22.132.161;
protocol device {{}}
{kernel}
protocol bgp dn42 {{
  local {e2} as 4242421869;
  neighbor {d} as 4242420000;
  connect delay time 1; connect retry time 1;
  ipv4 {{ import all; export none; }};
}}
protocol bgp vps {{
  local {e1} as 4242421869;
  neighbor {v} as 4242421869;
  connect delay time 1; connect retry time 1;
  ipv4 {{ next hop self; import all; export all; }};
}}
"#,
                e1 = e1.ipv4,
                e2 = e2.ipv4,
                d = d.ipv4,
                v = v.ipv4
            ),
        )?;
        Ok(Dn42Chain {
            vps,
            edge,
            dn42,
            v,
            e1,
            e2,
            d,
            dn42_bird,
            edge_bird,
        })
    }
}

/// Seed 001's home router: the port forward of UDP 51820 on its WAN
/// address to `vip`, masquerade towards the Internet (nftables).
pub fn seed_001_port_forward(lab: &Lab, router: &Node, wan: &Iface, vip: &str) -> Result<()> {
    let rules = format!(
        "table ip home {{\n\
         chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n\
           iifname \"{wan_if}\" ip daddr {wan_ip} udp dport 51820 dnat to {vip}\n\
         }}\n\
         chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
           oifname \"{wan_if}\" masquerade\n\
         }}\n\
         }}\n",
        wan_if = wan.name,
        wan_ip = wan.ipv4,
    );
    let out = lab.exec_full(
        router,
        &["nft", "-f", "-"],
        Some(rules.as_bytes()),
        Duration::from_secs(10),
    )?;
    ensure!(out.success(), "nft: {}", out.stderr);
    Ok(())
}

/// Seed 001's router as the seed writes it (BIRD: ECMP with `merge paths`,
/// BFD 100 ms x 5 with both servers), with test-speed connect timers: AS
/// 65001 at `r5` and `r7`, the servers (AS 65000) at `a5` and `a7`.
pub fn seed_001_router_bird(r5: &Iface, a5: &Iface, r7: &Iface, a7: &Iface) -> String {
    format!(
        r#"
router id 10.0.0.1;
protocol device {{ scan time 10; }}
protocol direct {{ disabled; }}
protocol kernel {{
    ipv4 {{ import none; export where source = RTS_BGP; }};
    merge paths yes;
}}
protocol bgp bgp_server5 {{
    local {r5} as 65001;
    neighbor {a5} as 65000;
    ipv4 {{ import all; export where source = RTS_BGP; }};
    bfd graceful;
    graceful restart on;
    connect delay time 1; connect retry time 1; error wait time 1, 5;
}}
protocol bgp bgp_server7 {{
    local {r7} as 65001;
    neighbor {a7} as 65000;
    ipv4 {{ import all; export where source = RTS_BGP; }};
    bfd on;
    graceful restart on;
    connect delay time 1; connect retry time 1; error wait time 1, 5;
}}
protocol bfd {{
    interface "*" {{ interval 100 ms; multiplier 5; }};
    neighbor {a5};
    neighbor {a7};
}}
"#,
        r5 = r5.ipv4,
        a5 = a5.ipv4,
        r7 = r7.ipv4,
        a7 = a7.ipv4
    )
}

/// Seconds since the epoch, as `ping -D` prints them.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `ping -D` reply timestamps in a log.
pub fn reply_times(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect()
}

/// The longest time without a reply in `ping -D -i 0.02` output (each reply
/// line starts with `[unix time]`), and how many were lost. Pings still
/// unanswered at the end count too: from the last reply, one interval
/// (as measured between the replies) per ping sent after it, so a flood
/// that never gets an answer again is not read as a short gap.
pub fn loss_window(output: &str, started: f64) -> (f64, usize) {
    let replies: Vec<(f64, usize)> = output
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            let time = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l
                .split("icmp_seq=")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()?;
            Some((time, seq))
        })
        .collect();
    let mut worst = 0.0f64;
    let mut last = started;
    for (t, _) in &replies {
        worst = worst.max(t - last);
        last = *t;
    }
    let sent: usize = output
        .lines()
        .find_map(|l| l.split(" packets transmitted").next()?.trim().parse().ok())
        .unwrap_or(0);
    let interval = match (replies.first(), replies.last()) {
        (Some(&(t0, s0)), Some(&(t1, s1))) if s1 > s0 => (t1 - t0) / (s1 - s0) as f64,
        _ => 0.02,
    };
    let last_seq = replies.iter().map(|&(_, seq)| seq).max().unwrap_or(0);
    let unanswered_at_end = sent.saturating_sub(last_seq);
    worst = worst.max(unanswered_at_end as f64 * interval);
    (worst, sent.saturating_sub(replies.len()))
}

/// Pings `to` from `node` every 20 ms for `seconds` (`ping -D`).
pub fn ping_flood_to(lab: &Lab, node: &Node, to: &str, seconds: u32) -> Result<bgp4mesh_lab::Proc> {
    let count = (seconds * 50).to_string();
    lab.spawn(
        node,
        "ping-flood",
        &["ping", "-D", "-i", "0.02", "-W", "1", "-c", &count, to],
    )
}

/// Waits for a ping flood to end; its output.
pub fn flood_output(lab: &Lab, proc: &bgp4mesh_lab::Proc) -> Result<String> {
    wait_until(Duration::from_secs(30), "the ping flood to end", || {
        ensure!(!lab.is_running(proc), "still pinging");
        Ok(())
    })?;
    Ok(std::fs::read_to_string(&proc.log)?)
}
