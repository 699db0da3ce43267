//! BFD against FRR's bfdd (BIRD's BFD is exercised in seed_001_anycast.rs):
//! the session comes Up both ways with this neighbour's own timers (200 ms
//! × 3); frozen, FRR's side is detected down in time; thawed, it is Up
//! again.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use bgp4mesh_lab::peers::Frr;
use bgp4mesh_lab::{Lab, can_run, wait_until};
use common::*;

#[test]
fn bfd_with_frr_bfdd_over_ipv4() -> Result<()> {
    bfd_with_frr(false)
}

#[test]
fn bfd_with_frr_bfdd_over_ipv6() -> Result<()> {
    bfd_with_frr(true)
}

fn bfd_with_frr(v6: bool) -> Result<()> {
    if !can_run(&format!("bfd_with_frr_bfdd_v6_{v6}"), &["bfdd", "vtysh"]) {
        return Ok(());
    }
    let lab = Lab::new(if v6 { "bfd-frr6" } else { "bfd-frr4" })?;
    let (router, peer) = (lab.add_node("router")?, lab.add_node("peer")?);
    let (r, p) = lab.link(&router, &peer)?;
    let ours = start_ours(
        &lab,
        &router,
        65000,
        "10.255.0.1",
        &our_neighbor(
            "frr",
            if v6 { p.ipv6.into() } else { p.ipv4.into() },
            65001,
            "import = \"none\"\nexport = \"none\"\nbfd = true\nbfd_interval = 200\nbfd_multiplier = 3",
        ),
    )?;
    let frr = Frr::start_daemon(
        &lab,
        &peer,
        "bfdd",
        &format!(
            "bfd\n peer {r} local-address {p}\n  receive-interval 200\n  transmit-interval 200\n  detect-multiplier 3\n !\n!\n",
            r = if v6 {
                r.ipv6.to_string()
            } else {
                r.ipv4.to_string()
            },
            p = if v6 {
                p.ipv6.to_string()
            } else {
                p.ipv4.to_string()
            },
        ),
    )?;
    let our_state = || -> Result<String> {
        let json: serde_json::Value =
            serde_json::from_str(&ours.cli(&["show", "bfd", "sessions", "--json"])?)?;
        Ok(json[0]["state"].as_str().unwrap_or_default().to_string())
    };
    let frr_state = || -> Result<String> {
        let json = frr.show_json("show bfd peers json")?;
        Ok(json[0]["status"].as_str().unwrap_or_default().to_string())
    };
    wait_until(SETTLE, "the BFD session Up on both sides", || {
        let (a, z) = (our_state()?, frr_state()?);
        ensure!(a == "Up" && z == "up", "bgp4mesh {a}, FRR {z}");
        Ok(())
    })?;

    // This neighbour's own timers: 200 ms x 3.
    let json: serde_json::Value =
        serde_json::from_str(&ours.cli(&["show", "bfd", "sessions", "--json"])?)?;
    assert_eq!(
        (
            json[0]["tx_interval_ms"].as_u64(),
            json[0]["detection_time_ms"].as_u64()
        ),
        (Some(200), Some(600)),
        "{json}"
    );
    lab.signal(frr.proc(), libc::SIGSTOP)?;
    let frozen = Instant::now();
    wait_until(Duration::from_secs(5), "our side to see FRR gone", || {
        ensure!(our_state()? == "Down", "still {}", our_state()?);
        Ok(())
    })?;
    let took = frozen.elapsed();
    eprintln!("BFD with FRR (IPv6: {v6}): down {took:?} after SIGSTOP");
    assert!(took < Duration::from_secs(1), "{took:?}");
    lab.signal(frr.proc(), libc::SIGCONT)?;
    wait_until(SETTLE, "Up again", || {
        let (a, z) = (our_state()?, frr_state()?);
        ensure!(a == "Up" && z == "up", "bgp4mesh {a}, FRR {z}");
        Ok(())
    })?;
    Ok(())
}
