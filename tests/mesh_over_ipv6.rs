//! Tunnels over IPv6 (issue 25): nodes that publish an IPv6 endpoint next
//! to their IPv4 one (`join --endpoint6`) run their tunnels over IPv6 when
//! both have it; a path that stops answering falls back to IPv4, and the
//! tunnel returns to IPv6 when the path is back. A node without IPv6
//! reaches the same peers over IPv4.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::{Lab, Node, can_run, wait_until};

use bgp4mesh_agent::ipv6_paths;
use common::mesh::{Controller, MeshNode, address_of, endpoint_for, start_node_on};
use common::ping;

const NEEDS: &[&str] = &["wg", "ping", "nft"];

/// Drops (or lets through again) WireGuard over IPv6 to and from `node`:
/// its IPv6 address stays routed, the path just stops answering.
fn block_ipv6_udp(lab: &Lab, node: &Node, block: bool) -> Result<()> {
    let drop = "meta nfproto ipv6 meta l4proto udp drop";
    let chains = format!(
        "chain input {{ type filter hook input priority 0; {drop}; }}\n\
         chain output {{ type filter hook output priority 0; {drop}; }}"
    );
    lab.nft_table(node, "blackhole6", block.then_some(chains.as_str()))
}

/// Pings `to` from `from` every 100 ms for `during` and returns the
/// longest run of unanswered pings, as time (leading and trailing runs
/// count).
fn longest_gap(lab: &Lab, from: &Node, to: &str, during: Duration) -> Result<Duration> {
    let count = (during.as_millis() / 100) as u32;
    let out = lab.exec_full(
        from,
        &[
            "ping",
            "-n",
            "-i",
            "0.1",
            "-W",
            "1",
            "-c",
            &count.to_string(),
            to,
        ],
        None,
        during + Duration::from_secs(10),
    )?;
    let answered: std::collections::HashSet<u32> = out
        .stdout
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    ensure!(!answered.is_empty(), "no answer at all: {}", out.stdout);
    let (mut run, mut longest) = (0u32, 0u32);
    for seq in 1..=count {
        run = if answered.contains(&seq) { 0 } else { run + 1 };
        longest = longest.max(run);
    }
    Ok(Duration::from_millis(u64::from(longest) * 100))
}

#[test]
fn tunnels_run_over_ipv6_and_fall_back_to_ipv4() -> Result<()> {
    if !can_run!(NEEDS) {
        return Ok(());
    }
    let lab = Lab::new("mesh-v6-path")?;
    let switch = lab.add_switch("inet")?;
    let controller = Controller::start(&lab, &switch)?;
    let token = controller.mynet(&lab)?;
    let dual = |name: &str| -> Result<(MeshNode, String)> {
        let node = lab.add_node(name)?;
        let iface = lab.attach(&switch, &node)?;
        let v6 = format!("[{}]:51820", iface.ipv6);
        let started = start_node_on(
            &lab,
            node,
            &token,
            name,
            Some(&iface.ipv4.to_string()),
            &["--endpoint6", &v6],
        )?;
        Ok((started, v6))
    };
    let (a, _) = dual("a")?;
    let (b, b_v6) = dual("b")?;
    // A node with no IPv6 route at all.
    let c_node = lab.add_node("c")?;
    let c_iface = lab.attach(&switch, &c_node)?;
    lab.exec(
        &c_node,
        &["ip", "-6", "addr", "flush", "dev", &c_iface.name],
    )?;
    let _c = start_node_on(
        &lab,
        c_node,
        &token,
        "c",
        Some(&c_iface.ipv4.to_string()),
        &[],
    )?;
    let nodes = controller.nodes(&lab)?;
    let b_mesh = address_of(&nodes, "b")?;
    let c_mesh = address_of(&nodes, "c")?;
    let shown = controller.admin(&lab, &["node", "list", "mynet"])?;
    ensure!(shown.contains(&b_v6), "node list shows no {b_v6}: {shown}");

    wait_until(Duration::from_secs(20), "a reaching b", || {
        ping(&lab, &a.node, &b_mesh)
    })?;
    let endpoint = endpoint_for(&lab, &a, &b_mesh)?;
    ensure!(
        endpoint.as_deref() == Some(b_v6.as_str()),
        "a sends to b at {endpoint:?}, not at its IPv6 endpoint {b_v6}"
    );
    wait_until(Duration::from_secs(20), "b reaching c over IPv4", || {
        ping(&lab, &b.node, &c_mesh)
    })?;
    let endpoint = endpoint_for(&lab, &b, &c_mesh)?;
    ensure!(
        endpoint.as_deref() == Some(&format!("{}:51820", c_iface.ipv4)),
        "b sends to c (no IPv6) at {endpoint:?}"
    );

    // The IPv6 path stops answering: the tunnel falls back to IPv4.
    block_ipv6_udp(&lab, &b.node, true)?;
    let started = Instant::now();
    let gap = longest_gap(&lab, &a.node, &b_mesh, Duration::from_secs(30))?;
    let endpoint = endpoint_for(&lab, &a, &b_mesh)?;
    ensure!(
        endpoint.as_deref().is_some_and(|e| !e.starts_with('[')),
        "after IPv6 stopped answering, a still sends to b at {endpoint:?}"
    );
    eprintln!(
        "IPv6 path blackholed: longest gap {:.1} s (measured over {:.0} s); a now sends to {endpoint:?}",
        gap.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    ensure!(
        gap < Duration::from_secs(25),
        "the fallback to IPv4 took {gap:?}"
    );

    // The path is back: the tunnel returns to IPv6 (within a probe
    // interval) without losing a ping.
    block_ipv6_udp(&lab, &b.node, false)?;
    let gap = longest_gap(
        &lab,
        &a.node,
        &b_mesh,
        ipv6_paths::PROBE_AGAIN + Duration::from_secs(8),
    )?;
    let endpoint = endpoint_for(&lab, &a, &b_mesh)?;
    ensure!(
        endpoint.as_deref() == Some(b_v6.as_str()),
        "a sends to b at {endpoint:?} after the IPv6 path came back"
    );
    ensure!(
        gap < Duration::from_millis(500),
        "the return to IPv6 lost pings for {gap:?}"
    );

    // A node that joins while the IPv6 path is down reaches the peer over
    // IPv4 within a handshake retry.
    block_ipv6_udp(&lab, &b.node, true)?;
    let (d, _) = dual("d")?;
    let joined = Instant::now();
    wait_until(Duration::from_secs(20), "d reaching b over IPv4", || {
        ping(&lab, &d.node, &b_mesh)
    })
    .context("first contact with IPv6 down")?;
    eprintln!(
        "first contact with IPv6 down: through after {:.1} s",
        joined.elapsed().as_secs_f64()
    );
    Ok(())
}
