//! Nodes behind NAT reach each other (seed 003's roaming pi0, seed 004's
//! "nodes anywhere"): a controller and a public node on the "Internet" (a
//! switch), and nodes each behind a router of its own that translates
//! with nftables `masquerade` (endpoint-independent mapping) or
//! `masquerade fully-random` (endpoint-dependent).

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::nat::{Mapping, Nat};
use bgp4mesh_lab::{Lab, Node, can_run, wait_until};
use serde_json::Value;

use common::mesh::{
    Controller, MeshNode, address_of, endpoint_for, start_node_on, start_node_with,
};
use common::{iperf, ping};

const NEEDS: &[&str] = &["wg", "ping", "nft"];

/// The Internet of a NAT test: a router with the controller and one
/// public node on links of their own, and a token to join more.
struct Internet {
    router: Node,
    controller: Controller,
    /// The first public node; a relay when the Internet has relays.
    public: MeshNode,
    /// More relays, after `public`.
    relays: Vec<MeshNode>,
    /// `public`'s address on the Internet.
    public_address: String,
    token: String,
}

impl Internet {
    fn start(lab: &Lab) -> Result<Internet> {
        Self::with_relays(lab, 0)
    }

    /// With `relays` public nodes relaying (`[mesh] relay = true`); the
    /// first is `public`.
    fn with_relays(lab: &Lab, relays: usize) -> Result<Internet> {
        let router = lab.add_node("internet")?;
        let (node, iface) = lab.add_on_internet(&router, "controller")?;
        let controller = Controller::start_on(lab, node, iface)?;
        let token = controller.mynet(lab)?;
        let mut publics = Vec::new();
        for i in 0..relays.max(1) {
            let name = if i == 0 {
                "public".to_string()
            } else {
                format!("relay{i}")
            };
            let (node, iface) = lab.add_on_internet(&router, &name)?;
            let endpoint = iface.ipv4.to_string();
            let mesh = if i < relays { "relay = true\n" } else { "" };
            publics.push(start_node_with(
                lab,
                node,
                &token,
                &name,
                Some(&endpoint),
                &[],
                mesh,
            )?);
        }
        let public = publics.remove(0);
        let public_address = address_on(lab, &public)?;
        Ok(Internet {
            router,
            controller,
            public,
            public_address,
            relays: publics,
            token,
        })
    }

    /// A node `name` behind a NAT of its own, joined and running.
    fn behind_nat(&self, lab: &Lab, name: &str, mapping: Mapping) -> Result<(Nat, MeshNode)> {
        let nat = lab.add_behind_nat(&self.router, name, mapping)?;
        let node = start_node_on(lab, nat.inside.clone(), &self.token, name, None, &[])?;
        Ok((nat, node))
    }

    fn address(&self, lab: &Lab, name: &str) -> Result<String> {
        address_of(&self.controller.nodes(lab)?, name)
    }

    /// [`Internet::behind_nat`], and its mesh address once it reaches the
    /// public node through the mesh.
    fn first_behind_nat(
        &self,
        lab: &Lab,
        name: &str,
        mapping: Mapping,
    ) -> Result<(Nat, MeshNode, String)> {
        let (nat, node) = self.behind_nat(lab, name, mapping)?;
        let address = self.address(lab, name)?;
        let public = self.address(lab, "public")?;
        wait_until(
            Duration::from_secs(20),
            &format!("{name} reaching the public node"),
            || ping(lab, &node.node, &public),
        )?;
        Ok((nat, node, address))
    }
}

/// The global IPv4 address of `node` (a host on the Internet: one link).
fn address_on(lab: &Lab, node: &MeshNode) -> Result<String> {
    let out = lab.exec(
        &node.node,
        &["ip", "-4", "-o", "addr", "show", "scope", "global"],
    )?;
    out.lines()
        .filter(|l| !l.contains(&node.ifname))
        .find_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .split('/')
                .next()
                .map(str::to_string)
        })
        .with_context(|| format!("no address on {}: {out}", node.name))
}

/// Waits until `from`'s device has `peer`'s endpoint at `public` (any
/// port) and a ping through the tunnel is answered.
fn direct_path(
    lab: &Lab,
    from: &MeshNode,
    peer: &str,
    public: &str,
    within: Duration,
) -> Result<String> {
    wait_until(
        within,
        &format!("{} reaching {peer} directly at {public}", from.name),
        || {
            let endpoint = endpoint_for(lab, from, peer)?.context("no endpoint")?;
            ensure!(
                endpoint.starts_with(&format!("{public}:")),
                "endpoint {endpoint}"
            );
            ping(lab, &from.node, peer)?;
            Ok(endpoint)
        },
    )
}

/// What `proc` (a ping with a count) printed, once it has finished.
fn finished(lab: &Lab, proc: &bgp4mesh_lab::Proc) -> Result<String> {
    wait_until(Duration::from_secs(40), "the pings to finish", || {
        ensure!(!lab.is_running(proc), "still pinging");
        Ok(())
    })?;
    Ok(std::fs::read_to_string(&proc.log)?)
}

fn alive(lab: &Lab, nodes: &[&MeshNode]) -> Result<()> {
    for n in nodes {
        ensure!(
            lab.is_running(&n.proc),
            "{} stopped: {}",
            n.name,
            lab.log_tail(&n.proc, 30)
        );
    }
    Ok(())
}

/// Two nodes behind endpoint-independent NATs get a direct path: each
/// one's device sends to the other's NAT, not through the public node,
/// within 2 s of the second one joining, and pings go both ways.
#[test]
fn nodes_behind_endpoint_independent_nats_connect_directly() -> Result<()> {
    if !can_run!(NEEDS,) {
        return Ok(());
    }
    let lab = Lab::new("nat-eim")?;
    let internet = Internet::start(&lab)?;
    let (nat_a, a, address_a) =
        internet.first_behind_nat(&lab, "a", Mapping::EndpointIndependent)?;
    let started = Instant::now();
    let (nat_b, b) = internet.behind_nat(&lab, "b", Mapping::EndpointIndependent)?;
    let address_b = internet.address(&lab, "b")?;
    let b_sees = direct_path(
        &lab,
        &b,
        &address_a,
        &nat_a.public.ipv4.to_string(),
        Duration::from_secs(30),
    )?;
    let took = started.elapsed();
    let a_sees = direct_path(
        &lab,
        &a,
        &address_b,
        &nat_b.public.ipv4.to_string(),
        Duration::from_secs(5),
    )?;
    alive(&lab, &[&a, &b, &internet.public])?;
    eprintln!("direct path {took:?} after b joined: b sends to a at {b_sees}, a to b at {a_sees}");
    ensure!(
        took <= Duration::from_secs(2),
        "the direct path took {took:?}, more than 2 s"
    );
    ping(&lab, &b.node, &address_a)?;
    ping(&lab, &a.node, &address_b)?;

    // What a node and the operator see: the NAT kinds discovery measured,
    // and `show mesh` with b's path, endpoint and round trip.
    let shown = a.cli(&lab, &["show", "mesh", "--json"])?;
    let shown: Value = serde_json::from_str(&shown)?;
    ensure!(shown["node"]["nat"] == "endpoint_independent", "{shown}");
    let peer_b = shown["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "b"))
        .with_context(|| format!("no b in {shown}"))?;
    ensure!(
        peer_b["path"] == "direct"
            && peer_b["endpoint"] == a_sees.as_str()
            && peer_b["nat"] == "endpoint_independent"
            && peer_b["rtt_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{peer_b}"
    );
    let table = a.cli(&lab, &["show", "mesh"])?;
    eprintln!("{table}");
    ensure!(
        table.contains("NAT: endpoint-independent") && table.contains(&a_sees),
        "{table}"
    );
    let public = internet.public.cli(&lab, &["show", "mesh", "--json"])?;
    let public: Value = serde_json::from_str(&public)?;
    ensure!(public["node"]["nat"] == "none", "{public}");
    Ok(())
}

/// The peer named `name` in `node`'s `show mesh --json`.
fn shown_peer(lab: &Lab, node: &MeshNode, name: &str) -> Result<Value> {
    let shown: Value = serde_json::from_str(&node.cli(lab, &["show", "mesh", "--json"])?)?;
    shown["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == name))
        .cloned()
        .with_context(|| format!("no {name} in {shown}"))
}

/// Waits until `from` pings `to` through a path `show mesh` calls `path`
/// (`relayed`, `direct`) for peer `peer`.
fn path_is(
    lab: &Lab,
    from: &MeshNode,
    peer: &str,
    to: &str,
    path: &str,
    within: Duration,
) -> Result<Value> {
    wait_until(
        within,
        &format!("{} reaching {peer} {path}", from.name),
        || {
            ping(lab, &from.node, to)?;
            let shown = shown_peer(lab, from, peer)?;
            ensure!(shown["path"] == path, "{shown}");
            Ok(shown)
        },
    )
}

/// Two nodes behind endpoint-dependent NATs cannot punch through: a relay
/// carries them within 3 s of the second joining, both ways, and `show
/// mesh` says which relay.
#[test]
fn nodes_behind_endpoint_dependent_nats_go_through_a_relay() -> Result<()> {
    if !can_run!(NEEDS,) {
        return Ok(());
    }
    let lab = Lab::new("nat-edm")?;
    let internet = Internet::with_relays(&lab, 1)?;
    let (_nat_a, a, address_a) =
        internet.first_behind_nat(&lab, "a", Mapping::EndpointDependent)?;
    let started = Instant::now();
    let (_nat_b, b) = internet.behind_nat(&lab, "b", Mapping::EndpointDependent)?;
    let address_b = internet.address(&lab, "b")?;
    let shown = path_is(
        &lab,
        &b,
        "a",
        &address_a,
        "relayed",
        Duration::from_secs(30),
    )?;
    let took = started.elapsed();
    path_is(&lab, &a, "b", &address_b, "relayed", Duration::from_secs(5))?;
    alive(&lab, &[&a, &b, &internet.public])?;
    eprintln!("relayed path {took:?} after b joined: {shown}");
    ensure!(shown["endpoint"] == "via public", "{shown}");
    ensure!(shown["nat"] == "endpoint_dependent", "{shown}");
    ensure!(
        took <= Duration::from_secs(3),
        "the relayed path took {took:?}, more than 3 s"
    );
    let listed = internet
        .controller
        .admin(&lab, &["node", "show", "mynet", "public"])?;
    ensure!(
        listed.contains("relay: on UDP port 51821 (live)"),
        "{listed}"
    );

    // Bad input at the relay, from a host on the Internet: binds with a
    // forged credential (a flood), one for another channel, an oversized
    // datagram and one of no relay message at all. Dropped and counted;
    // the pair keeps its path.
    let relay_at: std::net::SocketAddr = format!("{}:51821", internet.public_address).parse()?;
    let (stranger, _) = lab.add_on_internet(&internet.router, "stranger")?;
    lab.in_netns(&stranger, || -> Result<()> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        let mut forged = [0u8; 64];
        forged[..6].copy_from_slice(b"B4MR\x01\x00");
        for i in 0..2000u32 {
            forged[8..12].copy_from_slice(&i.to_be_bytes());
            forged[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
            socket.send_to(&forged, relay_at)?;
        }
        socket.send_to(&[0u8; 3000], relay_at)?;
        socket.send_to(b"hello", relay_at)?;
        Ok(())
    })??;
    std::thread::sleep(Duration::from_millis(300));
    ping(&lab, &a.node, &address_b)?;
    ping(&lab, &b.node, &address_a)?;
    let stats: Value =
        serde_json::from_str(&internet.public.cli(&lab, &["show", "mesh", "--json"])?)?;
    let dropped = &stats["relay"]["dropped"];
    eprintln!("the relay after bad input: {}", stats["relay"]);
    let count = |k: &str| dropped[k].as_u64().unwrap_or(0);
    ensure!(
        count("unauthenticated") + count("rate_limited") >= 2000
            && count("oversized") >= 1
            && count("malformed") >= 1
            && stats["relay"]["forwarded_datagrams"].as_u64().unwrap_or(0) > 0,
        "{}",
        stats["relay"]
    );
    Ok(())
}

/// Loads (`Some`) or removes a table on the Internet router that drops
/// UDP between two NATs' public addresses.
fn block_udp_between(lab: &Lab, router: &Node, nats: Option<(&Nat, &Nat)>) -> Result<()> {
    let chains = nats.map(|(x, y)| {
        let (x, y) = (x.public.ipv4, y.public.ipv4);
        format!(
            "  chain forward {{\n    type filter hook forward priority 0;\n    \
             ip saddr {x} ip daddr {y} meta l4proto udp drop\n    \
             ip saddr {y} ip daddr {x} meta l4proto udp drop\n  }}"
        )
    });
    lab.nft_table(router, "b4m_block_udp", chains.as_deref())
}

/// Two nodes behind endpoint-independent NATs with UDP between the NATs
/// blocked: a relay carries them; unblocked, they move to a direct path
/// within 10 s, losing at most one ping of a ping every 100 ms.
#[test]
fn a_relayed_pair_moves_to_a_direct_path_when_udp_opens() -> Result<()> {
    if !can_run!(NEEDS,) {
        return Ok(());
    }
    let lab = Lab::new("nat-unblock")?;
    let internet = Internet::with_relays(&lab, 1)?;
    let (nat_a, a, address_a) =
        internet.first_behind_nat(&lab, "a", Mapping::EndpointIndependent)?;
    // b's NAT is known only once it exists: block before b's node starts.
    let nat_b = lab.add_behind_nat(&internet.router, "b", Mapping::EndpointIndependent)?;
    block_udp_between(&lab, &internet.router, Some((&nat_a, &nat_b)))?;
    let started = Instant::now();
    let b = start_node_on(&lab, nat_b.inside.clone(), &internet.token, "b", None, &[])?;
    let address_b = internet.address(&lab, "b")?;
    path_is(
        &lab,
        &b,
        "a",
        &address_a,
        "relayed",
        Duration::from_secs(30),
    )?;
    let took = started.elapsed();
    path_is(&lab, &a, "b", &address_b, "relayed", Duration::from_secs(5))?;
    eprintln!("relayed with UDP blocked {took:?} after b joined");
    ensure!(
        took <= Duration::from_secs(3),
        "the relayed path took {took:?}, more than 3 s"
    );

    let pings = lab.spawn(
        &a.node,
        "ping-b",
        &[
            "ping", "-n", "-i", "0.1", "-c", "150", "-W", "1", &address_b,
        ],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    block_udp_between(&lab, &internet.router, None)?;
    let opened = Instant::now();
    let endpoint = direct_path(
        &lab,
        &a,
        &address_b,
        &nat_b.public.ipv4.to_string(),
        Duration::from_secs(20),
    )?;
    let moved = opened.elapsed();
    direct_path(
        &lab,
        &b,
        &address_a,
        &nat_a.public.ipv4.to_string(),
        Duration::from_secs(10),
    )?;
    let log = finished(&lab, &pings)?;
    let summary = log
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .with_context(|| format!("no ping summary in {log}"))?;
    let numbers: Vec<u64> = summary
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    let (sent, received) = (numbers[0], numbers[1]);
    eprintln!("direct {moved:?} after UDP opened (at {endpoint}); pings: {summary}");
    ensure!(
        moved <= Duration::from_secs(10),
        "moved to the direct path {moved:?} after UDP opened, more than 10 s"
    );
    ensure!(
        sent - received <= 1,
        "{} pings lost on the way from relay to direct: {summary}",
        sent - received
    );

    // The direct path dies (UDP blocked again): the pair comes back
    // through the relay once WireGuard's handshake retry (sent to the
    // relay too) finds it, while traffic flows.
    block_udp_between(&lab, &internet.router, Some((&nat_a, &nat_b)))?;
    let cut = Instant::now();
    let _traffic = lab.spawn(
        &a.node,
        "ping-b-again",
        &[
            "ping", "-n", "-i", "0.2", "-c", "250", "-W", "1", &address_b,
        ],
    )?;
    path_is(
        &lab,
        &a,
        "b",
        &address_b,
        "relayed",
        Duration::from_secs(40),
    )?;
    eprintln!(
        "back through the relay {:?} after the direct path died",
        cut.elapsed()
    );
    Ok(())
}

/// A relay that dies (SIGKILL: its sockets close) loses its pairs to
/// another relay within 2 s: pings every 100 ms stop for at most 2 s.
#[test]
fn a_killed_relays_pairs_move_to_another_within_two_seconds() -> Result<()> {
    relay_fails(libc::SIGKILL, "nat-relay-kill")
}

/// A relay that hangs (SIGSTOP: its connections stay open, nothing
/// answers) loses its pairs within 2 s too: the controller misses its
/// pulses.
#[test]
fn a_hung_relays_pairs_move_to_another_within_two_seconds() -> Result<()> {
    relay_fails(libc::SIGSTOP, "nat-relay-hung")
}

fn relay_fails(signal: i32, name: &str) -> Result<()> {
    if !can_run!(NEEDS,) {
        return Ok(());
    }
    let lab = Lab::new(name)?;
    let internet = Internet::with_relays(&lab, 2)?;
    let (_nat_a, a) = internet.behind_nat(&lab, "a", Mapping::EndpointDependent)?;
    let (_nat_b, b) = internet.behind_nat(&lab, "b", Mapping::EndpointDependent)?;
    let address_b = internet.address(&lab, "b")?;
    let shown = path_is(
        &lab,
        &a,
        "b",
        &address_b,
        "relayed",
        Duration::from_secs(30),
    )?;
    let carrier = shown["relay"]
        .as_str()
        .context("no relay named")?
        .to_string();
    let victim = if carrier == "public" {
        &internet.public
    } else {
        internet
            .relays
            .iter()
            .find(|r| r.name == carrier)
            .with_context(|| format!("no relay {carrier}"))?
    };
    let pings = lab.spawn(
        &a.node,
        "ping-b",
        &[
            "ping", "-n", "-D", "-i", "0.1", "-c", "80", "-W", "1", &address_b,
        ],
    )?;
    std::thread::sleep(Duration::from_secs(2));
    lab.signal(&victim.proc, signal)?;
    let shown = path_is(
        &lab,
        &a,
        "b",
        &address_b,
        "relayed",
        Duration::from_secs(10),
    )?;
    ensure!(
        shown["relay"] != carrier.as_str(),
        "still on {carrier}: {shown}"
    );
    alive(&lab, &[&a, &b])?;
    let log = finished(&lab, &pings)?;
    // The longest gap between answered pings (-D: a timestamp on each).
    let times: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect();
    let gap = times.windows(2).map(|w| w[1] - w[0]).fold(0.0f64, f64::max);
    eprintln!(
        "relay {carrier} {}: pings stopped for {gap:.2} s; now via {}",
        if signal == libc::SIGKILL {
            "killed"
        } else {
            "hung"
        },
        shown["relay"]
    );
    if signal == libc::SIGSTOP {
        lab.signal(&victim.proc, libc::SIGCONT)?;
    }
    ensure!(gap <= 2.0, "pings stopped for {gap:.2} s, more than 2 s");
    Ok(())
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks: f64 = fields
        .get(11..13)
        .context("short /proc stat")?
        .iter()
        .filter_map(|t| t.parse::<f64>().ok())
        .sum();
    Ok(ticks / 100.0)
}

/// The benchmark of BENCHMARKS.md ("NAT traversal"): TCP through a relay
/// next to TCP over a direct (punched) path on the same machine in the
/// same run, and the relay's CPU per GB. `--ignored` to run.
#[test]
#[ignore = "a benchmark: cargo nextest run --test nat_traversal --run-ignored only --no-capture"]
fn bench_relay_against_direct() -> Result<()> {
    if !can_run!(&["wg", "ping", "nft", "iperf3"]) {
        return Ok(());
    }
    let lab = Lab::new("nat-bench")?;
    let internet = Internet::with_relays(&lab, 1)?;
    let (_, a) = internet.behind_nat(&lab, "a", Mapping::EndpointIndependent)?;
    let (nat_b, b) = internet.behind_nat(&lab, "b", Mapping::EndpointIndependent)?;
    let (_, c) = internet.behind_nat(&lab, "c", Mapping::EndpointDependent)?;
    let (_, d) = internet.behind_nat(&lab, "d", Mapping::EndpointDependent)?;
    let (address_b, address_d) = (internet.address(&lab, "b")?, internet.address(&lab, "d")?);
    direct_path(
        &lab,
        &a,
        &address_b,
        &nat_b.public.ipv4.to_string(),
        Duration::from_secs(30),
    )?;
    path_is(
        &lab,
        &c,
        "d",
        &address_d,
        "relayed",
        Duration::from_secs(30),
    )?;
    let direct = iperf(&lab, &a.node, &b.node, &address_b, 5)?;
    let relay_pid = internet.public.proc.pid;
    let cpu_before = cpu_seconds(relay_pid)?;
    let relayed = iperf(&lab, &c.node, &d.node, &address_d, 5)?;
    let relay_cpu = cpu_seconds(relay_pid)? - cpu_before;
    let gigabytes = relayed * 5.0 / 8.0 / 1e9;
    println!(
        "TCP a→b direct {:.0} Mbit/s; c→d through the relay {:.0} Mbit/s; relayed/direct {:.2}; \
         the relay's daemon used {:.2} CPU s per GB relayed",
        direct / 1e6,
        relayed / 1e6,
        relayed / direct,
        relay_cpu / gigabytes.max(1e-9)
    );
    ensure!(relayed > 0.0 && direct > 0.0);
    Ok(())
}
