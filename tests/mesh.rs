//! The mesh end to end: `bgp4mesh server` in one namespace, nodes that
//! `bgp4mesh join` with a token and `bgp4mesh run`, each in a namespace of
//! its own on one LAN, on our userspace WireGuard. The admin commands
//! (`bgp4mesh network|token|node`) drive the controller.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::{Lab, can_run, wait_until};
use serde_json::Value;

use common::BIN;
use common::mesh::{Controller, MeshNode, address_of, full_mesh, peer_count, start_node};

const NEEDS: &[&str] = &["wg", "ping"];
/// new node reaches everyone.
#[test]
fn controller_and_four_nodes_full_mesh_survive_the_controller() -> Result<()> {
    if !can_run!(NEEDS,) {
        return Ok(());
    }
    let lab = Lab::new("mesh")?;
    let lan = lab.add_switch("lan")?;
    let mut ctl = Controller::start(&lab, &lan)?;
    let out = ctl.admin(
        &lab,
        &["network", "create", "mynet", "--range", "44.30.127.0/24"],
    )?;
    ensure!(out.contains("44.30.127.0/24"), "{out}");
    let token = ctl
        .admin(&lab, &["token", "create", "--network", "mynet"])?
        .trim()
        .to_string();
    let mut nodes = Vec::new();
    for (i, public) in [true, true, true, false].into_iter().enumerate() {
        nodes.push(start_node(
            &lab,
            &lan,
            &token,
            &format!("n{i}"),
            public,
            &[],
        )?);
    }
    let addresses = ctl.nodes(&lab)?;
    assert_eq!(addresses.len(), 4);
    assert_eq!(address_of(&addresses, "n0")?, "44.30.127.1");
    let all: Vec<&MeshNode> = nodes.iter().collect();
    full_mesh(&lab, &all, &addresses)?;
    for n in &nodes {
        assert_eq!(peer_count(&lab, n)?, 3, "{} has 3 peers", n.name);
    }
    // n3 published no endpoint: the controller learns where its peers see
    // it from (their reports) and hands that on.
    let n3_lan = lab.exec(
        &nodes[3].node,
        &["ip", "-4", "-o", "addr", "show", "scope", "global"],
    )?;
    wait_until(
        Duration::from_secs(30),
        "the controller to learn n3's endpoint",
        || {
            let listed = ctl.nodes(&lab)?;
            let n3 = listed
                .iter()
                .find(|n| n["name"] == "n3")
                .context("n3 listed")?;
            let endpoint = n3["endpoint"].as_str().context("no endpoint yet")?;
            let ip = endpoint
                .rsplit_once(':')
                .map(|(ip, _)| ip)
                .unwrap_or(endpoint);
            ensure!(
                n3_lan.contains(&format!(" {ip}/")),
                "endpoint {endpoint} is not n3's ({n3_lan})"
            );
            Ok(())
        },
    )?;

    // Delete n2: every other node drops it.
    let started = Instant::now();
    ctl.admin(&lab, &["node", "delete", "mynet", "n2"])?;
    let survivors: Vec<&MeshNode> = nodes.iter().filter(|n| n.name != "n2").collect();
    for n in &survivors {
        wait_until(
            Duration::from_secs(10),
            &format!("{} dropping n2", n.name),
            || {
                let count = peer_count(&lab, n)?;
                ensure!(count == 2, "{count} peers");
                Ok(())
            },
        )?;
    }
    let took = started.elapsed();
    eprintln!("a deleted node left every peer's wg show in {took:?}");
    wait_until(Duration::from_secs(10), "n2's agent to stop", || {
        ensure!(!lab.is_running(&nodes[2].proc), "still running");
        Ok(())
    })?;

    // kill -9 the controller: the mesh keeps forwarding.
    lab.signal(&ctl.proc, libc::SIGKILL)?;
    std::thread::sleep(Duration::from_secs(1));
    full_mesh(&lab, &survivors, &addresses)?;
    // An agent restarted while the controller is down comes back up from
    // its cache.
    let n1 = &mut nodes[1];
    lab.signal(&n1.proc, libc::SIGKILL)?;
    wait_until(Duration::from_secs(5), "n1's agent to die", || {
        ensure!(!lab.is_running(&n1.proc), "still running");
        Ok(())
    })?;
    n1.proc = lab.spawn(
        &n1.node,
        "bgp4mesh-n1-again",
        &[
            BIN,
            "run",
            "-c",
            &n1.config.to_string_lossy(),
            "--log-level",
            "debug",
        ],
    )?;
    let survivors: Vec<&MeshNode> = nodes.iter().filter(|n| n.name != "n2").collect();
    full_mesh(&lab, &survivors, &addresses)?;

    // Back: the nodes reconnect, and a new node reaches everyone.
    let (proc, fingerprint) = Controller::spawn(&lab, &ctl.node, &ctl.config)?;
    assert_eq!(
        fingerprint, ctl.fingerprint,
        "the controller keeps its certificate"
    );
    ctl.proc = proc;
    let token = ctl
        .admin(
            &lab,
            &["token", "create", "--network", "mynet", "--uses", "1"],
        )?
        .trim()
        .to_string();
    let late = start_node(&lab, &lan, &token, "n4", true, &[])?;
    let addresses = ctl.nodes(&lab)?;
    assert_eq!(
        address_of(&addresses, "n4")?,
        "44.30.127.3",
        "n2's released address goes to the next node"
    );
    let mut everyone = survivors.clone();
    everyone.push(&late);
    full_mesh(&lab, &everyone, &addresses)?;
    // The nodes report in: the controller sees them online.
    wait_until(Duration::from_secs(30), "every node online", || {
        let nodes = ctl.nodes(&lab)?;
        let offline: Vec<&Value> = nodes.iter().filter(|n| n["online"] != true).collect();
        ensure!(offline.is_empty(), "offline: {offline:?}");
        Ok(())
    })?;
    Ok(())
}

/// The line of `table` that names `name`, or an error showing the table.
fn line_of<'a>(table: &'a str, name: &str) -> Result<&'a str> {
    table
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(name))
        .with_context(|| format!("no line for {name} in:\n{table}"))
}

/// IPv6 in the operator's commands: a network with `--range6` alone, a
/// border that pins its IPv6 mesh address with `join --address6` (and is
/// told to when it gives one to `--address`), its addresses in what
/// `join`, `node list`, `node show` and `gateway create` print, and on its
/// mesh interface with the range's prefix length.
#[test]
fn join_pins_an_ipv6_address_and_the_cli_shows_both() -> Result<()> {
    if !can_run!(NEEDS,) {
        return Ok(());
    }
    let lab = Lab::new("mesh-v6")?;
    let lan = lab.add_switch("lan")?;
    let ctl = Controller::start(&lab, &lan)?;
    let refused = ctl.admin(&lab, &["network", "create", "none"]);
    let refused = format!("{:#}", refused.err().context("a network with no range")?);
    ensure!(
        refused.contains("--range") && refused.contains("--range6"),
        "{refused}"
    );
    let out = ctl.admin(
        &lab,
        &["network", "create", "six", "--range6", "2001:db8:66::/64"],
    )?;
    ensure!(out.contains("2001:db8:66::/64"), "{out}");
    let out = ctl.admin(
        &lab,
        &[
            "network",
            "create",
            "mynet",
            "--range",
            "44.30.127.0/24",
            "--range6",
            "2001:db8:44::/64",
        ],
    )?;
    ensure!(out.contains("2001:db8:44::/64"), "{out}");
    let token = ctl
        .admin(&lab, &["token", "create", "--network", "mynet"])?
        .trim()
        .to_string();

    // An IPv6 address given to --address is pointed to --address6.
    let probe = lab.add_node("probe")?;
    lab.attach(&lan, &probe)?;
    let wrong = lab.try_exec(
        &probe,
        &[BIN, "join", &token, "--address", "2001:db8:44::1"],
    )?;
    ensure!(
        !wrong.success() && wrong.stderr.contains("use --address6 for an IPv6 address"),
        "{}{}",
        wrong.stdout,
        wrong.stderr
    );

    let border = start_node(
        &lab,
        &lan,
        &token,
        "border",
        true,
        &["--address6", "2001:db8:44::1"],
    )?;
    eprintln!("{}", border.joined.trim());
    ensure!(
        border
            .joined
            .contains("mesh addresses 44.30.127.1 and 2001:db8:44::1"),
        "{}",
        border.joined
    );
    let listed = ctl.admin(&lab, &["node", "list", "mynet"])?;
    eprintln!("{listed}");
    ensure!(
        listed
            .lines()
            .next()
            .is_some_and(|h| h.contains(" address6 ")),
        "{listed}"
    );
    let line = line_of(&listed, "border")?;
    ensure!(
        line.contains(" 44.30.127.1 ") && line.contains(" 2001:db8:44::1 "),
        "{listed}"
    );
    let shown = ctl.admin(&lab, &["node", "show", "mynet", "border"])?;
    ensure!(
        line_of(&shown, "border")?.contains(" 2001:db8:44::1 "),
        "{shown}"
    );

    // On its mesh interface: each address with its range's prefix length.
    wait_until(
        Duration::from_secs(20),
        "the border's mesh addresses on its interface",
        || {
            ensure!(
                lab.is_running(&border.proc),
                "stopped: {}",
                lab.log_tail(&border.proc, 20)
            );
            let addresses = lab.exec(
                &border.node,
                &["ip", "-o", "addr", "show", "dev", &border.ifname],
            )?;
            ensure!(
                addresses.contains(" 44.30.127.1/24 ") && addresses.contains(" 2001:db8:44::1/64 "),
                "{addresses}"
            );
            Ok(())
        },
    )?;

    let out = ctl.admin(
        &lab,
        &[
            "gateway",
            "create",
            "mynet",
            "border",
            "--range",
            "198.18.0.0/15",
        ],
    )?;
    eprintln!("{out}");
    let line = line_of(&out, "border")?;
    ensure!(
        line.contains(" 44.30.127.1 ")
            && line.contains(" 2001:db8:44::1 ")
            && line.contains("198.18.0.0/15"),
        "{out}"
    );

    // An IPv6-only network: the IPv6 address alone, everywhere.
    let token6 = ctl
        .admin(&lab, &["token", "create", "--network", "six"])?
        .trim()
        .to_string();
    let state = lab.run_dir(&probe)?.join("agent");
    let joined = lab.exec(
        &probe,
        &[
            BIN,
            "join",
            &token6,
            "--name",
            "v6",
            "--address6",
            "2001:db8:66::44",
            "--state-dir",
            &state.to_string_lossy(),
        ],
    )?;
    eprintln!("{}", joined.trim());
    ensure!(
        joined.contains("joined network six as v6")
            && joined.contains("mesh address 2001:db8:66::44\n"),
        "{joined}"
    );
    let listed = ctl.admin(&lab, &["node", "list", "six"])?;
    eprintln!("{listed}");
    let header = listed.lines().next().unwrap_or_default();
    ensure!(
        header.contains(" address6 ") && !header.contains(" address "),
        "{listed}"
    );
    ensure!(
        line_of(&listed, "v6")?.contains(" 2001:db8:66::44 "),
        "{listed}"
    );
    Ok(())
}
