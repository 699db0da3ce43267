//! Two controllers on one PostgreSQL, end to end (issue 19): agents joined
//! through either, one controller killed (`kill -9`) while agents ping
//! across the mesh. Every agent of the dead controller moves to the other
//! within 2 s (its token named both), the pings do not stop, a node that
//! joins afterwards reaches the moved agents, and the killed controller,
//! started again, lists every node. Then the other hangs (SIGSTOP): its
//! agents leave it within three missed heartbeats, the mesh untouched.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bgp4mesh_agent::client::STREAM_SILENCE;
use bgp4mesh_lab::postgres::{Postgres, find_postgres};
use bgp4mesh_lab::{Lab, can_run, wait_until};
use common::mesh::{Controller, MeshNode, address_of, full_mesh, start_node};
use common::{flood_output, loss_window, now_unix, ping_flood_to};

/// Waits until `node`'s log, after byte `from`, says it moved on and then
/// connected to the controller at `url`.
fn moved_to(node: &MeshNode, from: usize, url: &str, within: Duration) -> Result<()> {
    wait_until(within, &format!("{} on {url}", node.name), || {
        let log = std::fs::read(&node.proc.log)?;
        let new = String::from_utf8_lossy(log.get(from..).unwrap_or_default());
        let moved = new
            .lines()
            .skip_while(|l| !l.contains("moving to the next controller"))
            .any(|l| l.contains("connected to the controller") && l.contains(url));
        ensure!(moved, "not yet");
        Ok(())
    })
}

#[test]
fn agents_move_to_the_other_controller_when_theirs_is_killed() -> Result<()> {
    if !can_run!(&["ping", "wg", "runuser"]) {
        return Ok(());
    }
    if find_postgres().is_none() {
        let message = "agents_move_to_the_other_controller: no PostgreSQL (apt install postgresql)";
        assert!(std::env::var_os("CI").is_none(), "{message}");
        eprintln!("SKIPPED {message}");
        return Ok(());
    }
    let pg = Postgres::start()?;
    pg.create_database("bgp4mesh")?;
    let database = format!("database = \"{}\"\n", pg.socket_url("bgp4mesh"));
    let lab = Lab::new("controller-ha")?;
    let switch = lab.add_switch("internet")?;
    let mut controllers = Vec::new();
    for name in ["ctl1", "ctl2"] {
        let node = lab.add_node(name)?;
        let iface = lab.attach(&switch, &node)?;
        controllers.push(Controller::start_with(&lab, node, iface, &database)?);
    }
    // A token from each: it names its own controller first, the other next.
    let token1 = controllers[0].mynet(&lab)?;
    let token2 = controllers[1]
        .admin(&lab, &["token", "create", "--network", "mynet"])?
        .trim()
        .to_string();
    let mut nodes: Vec<MeshNode> = Vec::new();
    for (i, name) in ["a1", "a2", "b1", "b2"].iter().enumerate() {
        let token = if i < 2 { &token1 } else { &token2 };
        nodes.push(start_node(&lab, &switch, token, name, true, &[])?);
    }
    let addresses = controllers[1].nodes(&lab)?;
    ensure!(addresses.len() == 4, "ctl2 lists {addresses:?}");
    let all: Vec<&MeshNode> = nodes.iter().collect();
    full_mesh(&lab, &all, &addresses)?;

    // ctl1 dies while a1 (its agent) pings b1 (ctl2's) every 20 ms.
    let b1 = address_of(&addresses, "b1")?;
    let flood = ping_flood_to(&lab, &nodes[0].node, &b1, 5)?;
    let started = now_unix();
    std::thread::sleep(Duration::from_secs(1));
    let killed = Instant::now();
    lab.signal(&controllers[0].proc, libc::SIGKILL)?;
    let ctl2 = controllers[1].url();
    for n in &nodes[..2] {
        moved_to(
            n,
            0,
            &ctl2,
            Duration::from_secs(2).saturating_sub(killed.elapsed()),
        )?;
    }
    eprintln!("both agents of ctl1 on ctl2 after {:?}", killed.elapsed());
    let (gap, lost) = loss_window(&flood_output(&lab, &flood)?, started);
    eprintln!("a1 → b1 while ctl1 died: longest gap {gap:.2} s, {lost} lost");
    ensure!(lost == 0, "{lost} pings lost while a controller died");

    // A node that joins now (through ctl2) reaches the moved agents.
    let late = start_node(&lab, &switch, &token2, "late", true, &[])?;
    let addresses = controllers[1].nodes(&lab)?;
    let late_address = address_of(&addresses, "late")?;
    for n in &nodes[..2] {
        wait_until(
            Duration::from_secs(30),
            &format!("{} reaching late", n.name),
            || common::ping(&lab, &n.node, &late_address),
        )
        .with_context(|| lab.log_tail(&n.proc, 20))?;
    }
    let a1 = address_of(&addresses, "a1")?;
    wait_until(Duration::from_secs(30), "late reaching a1", || {
        common::ping(&lab, &late.node, &a1)
    })?;

    // ctl1 again: it lists every node, late included.
    let (proc, _) = Controller::spawn(&lab, &controllers[0].node, &controllers[0].config)?;
    controllers[0].proc = proc;
    wait_until(Duration::from_secs(10), "ctl1 listing 5 nodes", || {
        let n = controllers[0].nodes(&lab)?.len();
        ensure!(n == 5, "{n} nodes");
        Ok(())
    })?;

    // ctl2 hangs (SIGSTOP: its connections stay open, nothing answers).
    // Every agent on it is on ctl1 within three missed heartbeats, and
    // the mesh carries traffic throughout.
    nodes.push(late);
    let seen: Vec<usize> = nodes
        .iter()
        .map(|n| std::fs::metadata(&n.proc.log).map(|m| m.len() as usize))
        .collect::<std::io::Result<_>>()?;
    let flood = ping_flood_to(&lab, &nodes[0].node, &b1, 20)?;
    let started = now_unix();
    std::thread::sleep(Duration::from_secs(1));
    let hung = Instant::now();
    lab.signal(&controllers[1].proc, libc::SIGSTOP)?;
    let ctl1 = controllers[0].url();
    let moved = (|| -> Result<()> {
        for (n, from) in nodes.iter().zip(&seen) {
            moved_to(n, *from, &ctl1, STREAM_SILENCE + Duration::from_secs(3))?;
        }
        Ok(())
    })();
    eprintln!("agents of the hung ctl2 on ctl1 after {:?}", hung.elapsed());
    let out = flood_output(&lab, &flood);
    lab.signal(&controllers[1].proc, libc::SIGCONT)?;
    moved?;
    let (gap, lost) = loss_window(&out?, started);
    eprintln!("a1 → b1 while ctl2 hung: longest gap {gap:.2} s, {lost} lost");
    ensure!(lost == 0, "{lost} pings lost while a controller hung");
    Ok(())
}
