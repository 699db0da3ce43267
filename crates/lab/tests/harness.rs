//! End-to-end tests of the lab harness itself: real daemons in namespaces.
//! They prove the harness, not bgp4mesh's code.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Result, ensure};
use bgp4mesh_lab::peers::{WireguardGo, best_route};
use bgp4mesh_lab::scenarios::Chain;
use bgp4mesh_lab::{Lab, can_run, sweep, wait_until};

/// BIRD (AS 65001) — FRR (AS 65002) — GoBGP (AS 65003), eBGP between
/// neighbours. A prefix BIRD originates reaches GoBGP with AS path
/// 65002 65001, and goes away when BIRD withdraws it.
#[test]
fn bird_route_reaches_gobgp_through_frr_and_is_withdrawn() -> Result<()> {
    let daemons = ["bird", "birdc", "bgpd", "vtysh", "gobgpd", "gobgp"];
    if !can_run!(&daemons,) {
        return Ok(());
    }
    let lab = Lab::new("bird-frr-gobgp")?;
    let chain = Chain::start(&lab)?;
    let settle = Duration::from_secs(30);
    chain.wait_established(settle)?;

    for prefix in [Chain::PREFIX, Chain::PREFIX6] {
        let route = wait_until(settle, &format!("{prefix} in GoBGP's RIB"), || {
            let routes = chain.gobgp.routes()?;
            best_route(&routes, prefix)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("GoBGP has {routes:?}"))
        })?;
        assert_eq!(
            route.as_path,
            vec![65002, 65001],
            "AS path of {prefix} at GoBGP"
        );
        if prefix == Chain::PREFIX {
            let frr_end = chain.gobgp_link.0.ipv4;
            assert_eq!(
                route.next_hop,
                Some(frr_end.into()),
                "FRR sets itself as next hop towards GoBGP"
            );
        }
    }
    // FRR in the middle sees BIRD's path too.
    let frr_routes = chain.frr.routes()?;
    let at_frr =
        best_route(&frr_routes, Chain::PREFIX).expect("FRR has the prefix once GoBGP has it");
    assert_eq!(at_frr.as_path, vec![65001]);

    chain.bird.birdc("disable origin4")?;
    wait_until(
        settle,
        &format!("{} withdrawn from GoBGP", Chain::PREFIX),
        || {
            let routes = chain.gobgp.routes()?;
            ensure!(
                !routes.iter().any(|r| r.prefix == Chain::PREFIX),
                "GoBGP still has {routes:?}"
            );
            Ok(())
        },
    )?;
    let routes = chain.gobgp.routes()?;
    assert!(
        best_route(&routes, Chain::PREFIX6).is_some(),
        "the IPv6 prefix stays: {routes:?}"
    );
    Ok(())
}

/// Two wireguard-go devices in two namespaces: handshake, then ping through
/// the tunnel; `wg show` reports the handshake and traffic on both sides.
#[test]
fn two_wireguard_go_peers_handshake_and_ping() -> Result<()> {
    if !can_run!(&["wireguard-go", "wg", "ping"],) {
        return Ok(());
    }
    let lab = Lab::new("wireguard-go-pair")?;
    let (left, right) = (lab.add_node("left")?, lab.add_node("right")?);
    let (l, r) = lab.link(&left, &right)?;
    let wg_left = WireguardGo::start(&lab, &left, "10.99.0.1/24", 51820)?;
    let wg_right = WireguardGo::start(&lab, &right, "10.99.0.2/24", 51821)?;
    wg_left.set_peer(
        wg_right.public_key(),
        Some(&format!("{}:51821", r.ipv4)),
        &["10.99.0.2/32"],
        None,
    )?;
    wg_right.set_peer(
        wg_left.public_key(),
        Some(&format!("{}:51820", l.ipv4)),
        &["10.99.0.1/32"],
        None,
    )?;

    // The first ping may be spent on the handshake.
    wait_until(Duration::from_secs(15), "a ping through the tunnel", || {
        let out = lab.try_exec(&left, &["ping", "-c", "1", "-W", "1", "10.99.0.2"])?;
        ensure!(out.success(), "{}{}", out.stdout, out.stderr);
        Ok(())
    })?;
    let out = lab.exec(
        &right,
        &["ping", "-c", "3", "-i", "0.2", "-W", "1", "10.99.0.1"],
    )?;
    assert!(out.contains("3 received"), "{out}");

    for (device, other) in [(&wg_left, &wg_right), (&wg_right, &wg_left)] {
        let peers = device.peers()?;
        assert_eq!(peers.len(), 1, "{peers:?}");
        assert_eq!(peers[0].public_key, other.public_key());
        assert!(
            peers[0].latest_handshake > 0,
            "no handshake recorded: {peers:?}"
        );
        assert!(
            peers[0].rx_bytes > 0 && peers[0].tx_bytes > 0,
            "no traffic counted: {peers:?}"
        );
    }
    Ok(())
}

/// Environment variable that turns the helper below into a real lab owner.
const HELPER: &str = "BGP4MESH_LAB_KILLED_HELPER";

/// Not a test on its own: run by `a_killed_run_is_swept_by_the_next` as a
/// child process that builds a lab, reports it, and waits to be killed.
#[test]
#[ignore = "helper process for a_killed_run_is_swept_by_the_next"]
fn killed_helper() -> Result<()> {
    if std::env::var_os(HELPER).is_none() {
        return Ok(());
    }
    let lab = Lab::new("killed-helper")?;
    let (a, b) = (lab.add_node("a")?, lab.add_node("b")?);
    lab.link(&a, &b)?;
    lab.spawn(&a, "sleeper", &["sleep", "600"])?;
    println!("LAB {} {} {}", lab.id(), a.netns(), b.netns());
    std::thread::sleep(Duration::from_secs(600));
    Ok(())
}

/// A run killed with SIGKILL mid-test leaves namespaces and processes; the
/// next sweep (which every `Lab::new` does) removes them.
#[test]
fn a_killed_run_is_swept_by_the_next() -> Result<()> {
    if !can_run!(&[]) {
        return Ok(());
    }
    let mut child = Command::new(std::env::current_exe()?)
        .args([
            "killed_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER, "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    // libtest prints "test killed_helper ... " before the helper's line.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let found = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.split_once("LAB ").map(|(_, rest)| rest.to_string()));
        let _ = tx.send(found);
    });
    let line = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(Some(line)) => line,
        other => {
            let _ = child.kill();
            panic!("the helper did not report its lab: {other:?}");
        }
    };
    let words: Vec<&str> = line.split_whitespace().collect();
    let (id, namespaces) = (words[0], &words[1..]);
    for ns in namespaces {
        assert!(
            Path::new("/run/netns").join(ns).exists(),
            "helper's namespace {ns} exists"
        );
    }
    child.kill()?; // SIGKILL: no destructor runs
    child.wait()?;
    for ns in namespaces {
        assert!(
            Path::new("/run/netns").join(ns).exists(),
            "{ns} outlives the killed run"
        );
    }

    // A test running in parallel may sweep it first; either way it is gone.
    let report = sweep()?;
    eprintln!("sweep: {report:?}");
    for ns in namespaces {
        assert!(!Path::new("/run/netns").join(ns).exists(), "{ns} was swept");
    }
    assert!(
        !Path::new("/run/bgp4mesh-lab").join(id).exists(),
        "state of {id} was swept"
    );
    Ok(())
}

/// The plumbing the seeds need: a switch (an IXP-like LAN), a router with
/// forwarding on, static routes, extra addresses on loopback.
#[test]
fn hosts_reach_each_other_across_a_switch_and_a_router() -> Result<()> {
    if !can_run!(&["ping"],) {
        return Ok(());
    }
    let lab = Lab::new("switch-router")?;
    let ixp = lab.add_switch("ixp")?;
    let (isp, border, host) = (
        lab.add_node("isp")?,
        lab.add_node("border")?,
        lab.add_node("host")?,
    );
    let isp_lan = lab.attach(&ixp, &isp)?;
    let border_lan = lab.attach(&ixp, &border)?;
    let (border_inside, host_end) = lab.link(&border, &host)?;
    lab.enable_forwarding(&border)?;
    lab.add_address(&host, "lo", "44.30.127.3/32")?;
    lab.add_route(&host, &["default", "via", &border_inside.ipv4.to_string()])?;
    lab.add_route(&host, &["default", "via", &border_inside.ipv6.to_string()])?;
    lab.add_route(
        &border,
        &["44.30.127.3/32", "via", &host_end.ipv4.to_string()],
    )?;
    lab.add_route(
        &isp,
        &["44.30.127.0/24", "via", &border_lan.ipv4.to_string()],
    )?;
    lab.add_route(
        &isp,
        &[
            &format!("{}/64", host_end.ipv6),
            "via",
            &border_lan.ipv6.to_string(),
        ],
    )?;

    let out = lab.exec(
        &isp,
        &["ping", "-c", "2", "-i", "0.2", "-W", "2", "44.30.127.3"],
    )?;
    assert!(out.contains("2 received"), "{out}");
    let out = lab.exec(
        &isp,
        &[
            "ping",
            "-6",
            "-c",
            "2",
            "-i",
            "0.2",
            "-W",
            "2",
            &host_end.ipv6.to_string(),
        ],
    )?;
    assert!(out.contains("2 received"), "{out}");
    // The router really is in the path: its forwarding off breaks it.
    lab.sysctl(&border, "net.ipv4.ip_forward", "0")?;
    let out = lab.try_exec(&isp, &["ping", "-c", "1", "-W", "1", "44.30.127.3"])?;
    assert!(
        !out.success(),
        "ping must fail without forwarding: {}",
        out.stdout
    );
    assert_eq!(
        isp_lan.ipv4.octets()[..3],
        border_lan.ipv4.octets()[..3],
        "one LAN subnet"
    );
    Ok(())
}
