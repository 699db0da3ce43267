//! Seed 004 end to end in namespaces: a border router announces your block
//! to a mock ISP over BGP, mesh nodes get public addresses of it from the
//! controller, the Internet reaches them through the border and they reach
//! the Internet through it.

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use bgp4mesh_lab::own_as::{BLOCK, INTERNET_HOST, IspKind, OwnAs, OwnAsOptions};
use bgp4mesh_lab::peers::best_route;
use bgp4mesh_lab::{Lab, Node, can_run, wait_until};

use common::BIN;

fn ping(lab: &Lab, from: &Node, to: &str) -> Result<()> {
    let out = lab.try_exec(from, &["ping", "-c", "1", "-W", "1", to])?;
    ensure!(out.success(), "ping {to}: {}", out.stdout);
    Ok(())
}

fn own_as(isp: IspKind) -> Result<()> {
    let lab = Lab::new(&format!(
        "own-as-{}",
        if isp == IspKind::Bird { "bird" } else { "ours" }
    ))?;
    let world = OwnAs::start(
        &lab,
        &OwnAsOptions {
            binary: BIN.into(),
            nodes: 3,
            isp,
        },
    )?;
    world.wait_bgp(Duration::from_secs(30))?;
    let routes = match &world.isp {
        bgp4mesh_lab::own_as::Isp::Bgp4mesh(d) => d.routes()?,
        bgp4mesh_lab::own_as::Isp::Bird(b) => b.routes()?,
    };
    let block = best_route(&routes, BLOCK).cloned();
    ensure!(
        block.as_ref().is_some_and(|r| r.as_path == vec![65000]),
        "the ISP's route to the block: {block:?}"
    );
    // Ingress: the ISP reaches every mesh node's public address.
    for n in &world.nodes {
        let to = n.address.to_string();
        wait_until(
            Duration::from_secs(30),
            &format!("the ISP reaching {} ({to})", n.name),
            || ping(&lab, &world.isp_node, &to),
        )
        .map_err(|e| {
            let mut dump = String::new();
            for (what, node, cmd) in [
                (
                    "isp route get",
                    &world.isp_node,
                    vec!["ip", "route", "get", to.as_str()],
                ),
                (
                    "border routes",
                    world.border.daemon.node(),
                    vec!["ip", "route"],
                ),
                (
                    "border wg",
                    world.border.daemon.node(),
                    vec!["wg", "show", world.border.interface.as_str()],
                ),
                (
                    "node routes",
                    n.daemon.node(),
                    vec!["ip", "route", "show", "table", "all"],
                ),
                ("node rules", n.daemon.node(), vec!["ip", "rule"]),
                ("node addr", n.daemon.node(), vec!["ip", "addr"]),
                (
                    "node wg",
                    n.daemon.node(),
                    vec!["wg", "show", n.interface.as_str()],
                ),
            ] {
                let out = lab
                    .try_exec(node, &cmd)
                    .map(|o| format!("{}{}", o.stdout, o.stderr))
                    .unwrap_or_default();
                dump.push_str(&format!("== {what}\n{out}\n"));
            }
            dump.push_str(&format!(
                "== node log\n{}\n",
                lab.log_tail(n.daemon.proc(), 400)
            ));
            e.context(dump)
        })?;
    }
    // The path in: ISP → border → node.
    if bgp4mesh_lab::find_binary("traceroute").is_some() {
        let n = &world.nodes[0];
        let trace = lab.exec(
            &world.isp_node,
            &[
                "traceroute",
                "-n",
                "-q",
                "1",
                "-w",
                "2",
                &n.address.to_string(),
            ],
        )?;
        let hops: Vec<&str> = trace
            .lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(1))
            .collect();
        ensure!(
            hops == vec![
                bgp4mesh_lab::own_as::BORDER_PEERING,
                n.address.to_string().as_str()
            ],
            "traceroute from the ISP: {trace}"
        );
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "traceroute is missing (apt install traceroute)"
        );
    }
    // Egress: every node reaches the Internet host through the border,
    // with its default route in the tunnel.
    for n in &world.nodes {
        let node = n.daemon.node();
        wait_until(
            Duration::from_secs(30),
            &format!("{} reaching the Internet host", n.name),
            || ping(&lab, node, INTERNET_HOST),
        )?;
        let route = lab.exec(node, &["ip", "route", "get", INTERNET_HOST])?;
        ensure!(route.contains(&n.interface), "{}: {route}", n.name);
        // The tunnel's own packets carry the mark and skip the tunnel's
        // table: for them there is no default route at all here (the
        // node's underlay has none), so they cannot loop into the tunnel.
        let marked = lab.try_exec(
            node,
            &[
                "ip",
                "route",
                "get",
                INTERNET_HOST,
                "mark",
                &bgp4mesh_agent::agent::EGRESS_MARK.to_string(),
            ],
        )?;
        ensure!(
            !marked.stdout.contains(&n.interface),
            "{}: marked packets would enter the tunnel: {}",
            n.name,
            marked.stdout
        );
    }
    // The controller goes away: ingress and egress go on.
    lab.signal(&world.controller_proc, libc::SIGKILL)?;
    std::thread::sleep(Duration::from_millis(500));
    for n in &world.nodes {
        ping(&lab, &world.isp_node, &n.address.to_string())?;
        ping(&lab, n.daemon.node(), INTERNET_HOST)?;
    }
    Ok(())
}

#[test]
fn own_as_with_a_bgp4mesh_isp() -> Result<()> {
    if !can_run("own_as_with_a_bgp4mesh_isp", &["wg", "ping"]) {
        return Ok(());
    }
    own_as(IspKind::Bgp4mesh)
}

#[test]
fn own_as_with_a_bird_isp() -> Result<()> {
    if !can_run("own_as_with_a_bird_isp", &["wg", "ping", "bird", "birdc"]) {
        return Ok(());
    }
    own_as(IspKind::Bird)
}
