//! Tunnels through tunnels, as the kernel's WireGuard selftest
//! (`tools/testing/selftests/wireguard/netns.sh`) checks them: a second
//! device whose peer's endpoint is the other side's address on the first
//! device, so its UDP datagrams go into the first tunnel and arrive out of
//! it; and the routing loop the selftest checks next, our own datagrams
//! routed back into the same device. Our device on every side.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::peers::{WgDevice, WgImpl};
use bgp4mesh_lab::{Lab, Node, can_run, wait_until};

use common::{BIN, ping};

const OUTER: [&str; 2] = ["192.168.241.1", "192.168.241.2"];
const OUTER6: [&str; 2] = ["fd00::1", "fd00::2"];
const INNER: [&str; 2] = ["192.168.242.1", "192.168.242.2"];
const INNER6: [&str; 2] = ["fd00:aa::1", "fd00:aa::2"];

/// Pings until one answers (the first waits for two handshakes, the inner
/// one carried by the outer tunnel).
fn wait_ping(lab: &Lab, from: &Node, to: &str) -> Result<()> {
    wait_until(
        Duration::from_secs(20),
        &format!("a ping from {} to {to}", from.name()),
        || ping(lab, from, to),
    )
}

/// Two namespaces joined by a veth link; in each, `wg0` (the outer tunnel,
/// endpoints on the link) and `wg1` (the inner one), whose peer's endpoint
/// is the other side's `wg0` address: IPv4 (`192.168.241.x`) or IPv6
/// (`[fd00::x]`). Pings through `wg1` both ways, to its IPv4 and IPv6
/// addresses, must all be answered: small ones; full-size ones at 1420,
/// whose datagrams the kernel must fragment to fit `wg0`; and full-size
/// ones once `wg1` is lowered to 1340 as in the selftest, whose datagrams
/// fit `wg0` exactly and must not be fragmented. Each side's inner peer is
/// then seen at the other side's outer tunnel address.
fn tunnel_through_tunnel(v6_endpoints: bool) -> Result<()> {
    let family = if v6_endpoints { "v6" } else { "v4" };
    let lab = Lab::new(&format!("wg-onion-{family}"))?;
    let ours = WgImpl::bgp4mesh(BIN);
    let nodes = [lab.add_node("one")?, lab.add_node("two")?];
    let (link_one, link_two) = lab.link(&nodes[0], &nodes[1])?;
    let links = [link_one, link_two];

    let mut outer = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let device = WgDevice::start_with(&lab, node, &ours, &format!("{}/24", OUTER[i]), 51820)?;
        lab.add_address(node, device.ifname(), &format!("{}/112", OUTER6[i]))?;
        outer.push(device);
    }
    for i in 0..2 {
        let other = 1 - i;
        outer[i].set_peer(
            outer[other].public_key(),
            Some(&format!("{}:51820", links[other].ipv4)),
            &[
                &format!("{}/32", OUTER[other]),
                &format!("{}/128", OUTER6[other]),
            ],
            None,
        )?;
    }

    let mut inner = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let device = WgDevice::start_with(&lab, node, &ours, &format!("{}/24", INNER[i]), 51821)?;
        lab.add_address(node, device.ifname(), &format!("{}/96", INNER6[i]))?;
        inner.push(device);
    }
    let endpoint = |i: usize| {
        if v6_endpoints {
            format!("[{}]:51821", OUTER6[i])
        } else {
            format!("{}:51821", OUTER[i])
        }
    };
    for i in 0..2 {
        let other = 1 - i;
        inner[i].set_peer(
            inner[other].public_key(),
            Some(&endpoint(other)),
            &[
                &format!("{}/32", INNER[other]),
                &format!("{}/128", INNER6[other]),
            ],
            None,
        )?;
    }

    // The outer tunnel alone first, so a failure below is the inner one's.
    wait_ping(&lab, &nodes[0], OUTER[1])?;
    wait_ping(&lab, &nodes[0], OUTER6[1])?;
    wait_ping(&lab, &nodes[0], INNER[1])?;
    all_pings(&lab, &nodes, None)?;

    // Full-size packets at the inner device's own MTU (1420, as created):
    // its datagrams are larger than the outer tunnel and the kernel
    // fragments them, over IPv6 endpoints as over IPv4 ones.
    all_pings(&lab, &nodes, Some(1420))?;

    // Lowered to fit (1420 less the outer tunnel's 80 bytes, as the
    // selftest sets it): full-size packets go through whole, padded to
    // the MTU the device has now, not the one it was created with.
    for (node, device) in nodes.iter().zip(&inner) {
        lab.exec(node, &["ip", "link", "set", device.ifname(), "mtu", "1340"])?;
    }
    wait_until(
        Duration::from_secs(5),
        "full-size packets sent without fragments",
        || {
            let before = fragments_created(&lab, &nodes[0])?;
            let out = lab.try_exec(
                &nodes[0],
                &[
                    "ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1312", INNER[1],
                ],
            )?;
            ensure!(out.success(), "ping: {}{}", out.stdout, out.stderr);
            let after = fragments_created(&lab, &nodes[0])?;
            ensure!(after == before, "{} fragments", after - before);
            Ok(())
        },
    )?;
    let before: Vec<u64> = nodes
        .iter()
        .map(|n| fragments_created(&lab, n))
        .collect::<Result<_>>()?;
    all_pings(&lab, &nodes, Some(1340))?;
    for (node, before) in nodes.iter().zip(before) {
        let after = fragments_created(&lab, node)?;
        ensure!(
            after == before,
            "{}: {} fragments for datagrams that fit the outer tunnel",
            node.name(),
            after - before
        );
    }

    // The inner tunnel's datagrams came out of the outer one.
    for (i, device) in inner.iter().enumerate() {
        let other = 1 - i;
        let peers = device.peers()?;
        ensure!(
            peers.len() == 1 && peers[0].endpoint.as_deref() == Some(endpoint(other).as_str()),
            "the inner peer of side {i} is not at the outer tunnel's address: {peers:?}"
        );
    }
    Ok(())
}

/// Five pings each way through the inner tunnel, to its IPv4 and its IPv6
/// address; with `full_size_at` an MTU, each packet fills it and may not be
/// fragmented (`-M do`). All must be answered.
fn all_pings(lab: &Lab, nodes: &[Node; 2], full_size_at: Option<usize>) -> Result<()> {
    for (from, to) in [(0, INNER[1]), (1, INNER[0]), (0, INNER6[1]), (1, INNER6[0])] {
        let headers = if to.contains(':') { 48 } else { 28 };
        let size = full_size_at.map(|mtu| (mtu - headers).to_string());
        let mut cmd = vec!["ping", "-c", "5", "-i", "0.2", "-W", "2"];
        if let Some(size) = &size {
            cmd.extend(["-M", "do", "-s", size]);
        }
        cmd.push(to);
        let out = lab.try_exec(&nodes[from], &cmd)?;
        ensure!(
            out.success() && out.stdout.contains(" 0% packet loss"),
            "{}: {}\n{}{}",
            nodes[from].name(),
            cmd.join(" "),
            out.stdout,
            out.stderr
        );
    }
    Ok(())
}

/// IPv4 and IPv6 fragments the node's kernel made of packets it sent
/// (`FragCreates` in /proc/net/snmp, `Ip6FragCreates` in /proc/net/snmp6).
fn fragments_created(lab: &Lab, node: &Node) -> Result<u64> {
    let snmp = lab.exec(node, &["cat", "/proc/net/snmp"])?;
    let mut ip_lines = snmp.lines().filter(|l| l.starts_with("Ip:"));
    let (names, values) = (
        ip_lines.next().context("no Ip: header in /proc/net/snmp")?,
        ip_lines.next().context("no Ip: values in /proc/net/snmp")?,
    );
    let v4: u64 = names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(name, _)| *name == "FragCreates")
        .context("no FragCreates in /proc/net/snmp")?
        .1
        .parse()?;
    let snmp6 = lab.exec(node, &["cat", "/proc/net/snmp6"])?;
    let v6: u64 = snmp6
        .lines()
        .find_map(|l| l.strip_prefix("Ip6FragCreates"))
        .context("no Ip6FragCreates in /proc/net/snmp6")?
        .trim()
        .parse()?;
    Ok(v4 + v6)
}

#[test]
fn inner_tunnel_over_ipv4_endpoints_in_the_outer_tunnel() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    tunnel_through_tunnel(false)
}

#[test]
fn inner_tunnel_over_ipv6_endpoints_in_the_outer_tunnel() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    tunnel_through_tunnel(true)
}

/// The selftest's routing loop, after its tunnel through a tunnel: a peer
/// with a session whose endpoint is then moved into the tunnel's own
/// addresses, so the device's datagrams come back into it. Ten flood
/// pings must cost a few datagrams, not a loop that runs as long as the
/// session (the selftest allows 70000 bytes).
fn routing_loop_is_dropped(v6_endpoint: bool) -> Result<()> {
    let lab = Lab::new("wg-route-loop")?;
    let ours = WgImpl::bgp4mesh(BIN);
    let nodes = [lab.add_node("one")?, lab.add_node("two")?];
    let (link_one, link_two) = lab.link(&nodes[0], &nodes[1])?;
    let near = WgDevice::start_with(&lab, &nodes[0], &ours, &format!("{}/24", OUTER[0]), 51820)?;
    let far = WgDevice::start_with(&lab, &nodes[1], &ours, &format!("{}/24", OUTER[1]), 51820)?;
    lab.add_address(&nodes[0], near.ifname(), &format!("{}/112", OUTER6[0]))?;
    near.set_peer(
        far.public_key(),
        Some(&format!("{}:51820", link_two.ipv4)),
        &[&format!("{}/32", OUTER[1]), &format!("{}/128", OUTER6[1])],
        None,
    )?;
    far.set_peer(
        near.public_key(),
        Some(&format!("{}:51820", link_one.ipv4)),
        &[&format!("{}/32", OUTER[0])],
        None,
    )?;
    wait_ping(&lab, &nodes[0], OUTER[1])?;

    let into_itself = if v6_endpoint {
        format!("[{}]:7", OUTER6[1])
    } else {
        format!("{}:7", OUTER[1])
    };
    near.wg(&[
        "set",
        near.ifname(),
        "peer",
        far.public_key(),
        "endpoint",
        &into_itself,
    ])?;
    lab.stop(far.proc());
    let sent = || -> Result<u64> {
        let peers = near.peers()?;
        Ok(peers.first().context("the peer is gone")?.tx_bytes)
    };
    let before = sent()?;
    let out = lab.try_exec(&nodes[0], &["ping", "-W", "1", "-c", "10", "-f", OUTER[1]])?;
    ensure!(
        !out.success(),
        "a ping into a loop was answered:\n{}",
        out.stdout
    );
    std::thread::sleep(Duration::from_secs(1));
    let looped = sent()? - before;
    ensure!(
        looped < 70_000,
        "{looped} bytes sent for ten pings into a routing loop"
    );
    ensure!(lab.is_running(near.proc()), "the device died");
    Ok(())
}

#[test]
fn routing_loop_over_an_ipv4_endpoint_is_dropped() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    routing_loop_is_dropped(false)
}

#[test]
fn routing_loop_over_an_ipv6_endpoint_is_dropped() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    routing_loop_is_dropped(true)
}
