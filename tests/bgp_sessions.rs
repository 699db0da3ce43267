//! Session behaviour against each of BIRD, FRR and GoBGP: hold-timer expiry
//! when the peer is frozen (SIGSTOP), OPEN error / Bad Peer AS on a wrong
//! AS, and route refresh in and out without a session reset.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use bgp4mesh_lab::peers::SessionState;
use bgp4mesh_lab::{Lab, can_run, wait_until};
use common::*;

fn binaries(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Bird => &["bird", "birdc"],
        Kind::Frr => &["bgpd", "vtysh"],
        Kind::Gobgp => &["gobgpd", "gobgp"],
    }
}

/// Our hold time is 3 s; the frozen peer sends no KEEPALIVE, so the
/// session goes down with Hold Timer Expired and its routes go; thawed,
/// it comes back.
fn hold_timer(kind: Kind) -> Result<()> {
    if !can_run(&format!("hold_timer_with_{kind:?}"), binaries(kind)) {
        return Ok(());
    }
    let lab = Lab::new(&format!("hold-{kind:?}").to_lowercase())?;
    let (border, isp) = (lab.add_node("border")?, lab.add_node("isp")?);
    let (b, i) = lab.link(&border, &isp)?;
    let ours = start_ours(
        &lab,
        &border,
        65000,
        "10.255.0.1",
        &our_neighbor(
            "isp",
            i.ipv4.into(),
            65001,
            "import = \"all\"\nexport = \"none\"\nhold_time = 3",
        ),
    )?;
    let peer = Peer::start(kind, &lab, &isp, 65001, i.ipv4.into(), b.ipv4.into(), 65000)?;
    wait_established(&ours, "isp", &peer, b.ipv4.into())?;
    wait_route("bgp4mesh", peer_prefix(false), || ours.routes())?;

    lab.signal(peer.proc(), libc::SIGSTOP)?;
    let frozen = Instant::now();
    wait_until(Duration::from_secs(10), "the hold timer to expire", || {
        let p = ours.protocol("isp")?;
        ensure!(p["state"] != "Established", "still {}", p["state"]);
        Ok(())
    })?;
    let took = frozen.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "{kind:?}: down after {took:?}, too early for 3 s"
    );
    let p = ours.protocol("isp")?;
    assert!(
        p["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("Hold Timer Expired")),
        "{p}"
    );
    assert!(
        ours.routes()?.is_empty(),
        "the frozen peer's routes are withdrawn"
    );

    lab.signal(peer.proc(), libc::SIGCONT)?;
    wait_established(&ours, "isp", &peer, b.ipv4.into())?;
    wait_route("bgp4mesh", peer_prefix(false), || ours.routes())?;
    Ok(())
}

/// We expect AS 65099; the peer is AS 65001: we refuse its OPEN with
/// OPEN Message Error / Bad Peer AS, and never reach Established.
fn bad_peer_as(kind: Kind) -> Result<()> {
    if !can_run(&format!("bad_peer_as_with_{kind:?}"), binaries(kind)) {
        return Ok(());
    }
    let lab = Lab::new(&format!("badas-{kind:?}").to_lowercase())?;
    let (border, isp) = (lab.add_node("border")?, lab.add_node("isp")?);
    let (b, i) = lab.link(&border, &isp)?;
    let ours = start_ours(
        &lab,
        &border,
        65000,
        "10.255.0.1",
        &our_neighbor(
            "isp",
            i.ipv4.into(),
            65099,
            "import = \"all\"\nexport = \"all\"",
        ),
    )?;
    let peer = Peer::start(kind, &lab, &isp, 65001, i.ipv4.into(), b.ipv4.into(), 65000)?;
    wait_until(SETTLE, "our Bad Peer AS", || {
        let error = ours.protocol("isp")?["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        ensure!(
            error.contains("sent NOTIFICATION: OPEN Message Error / Bad Peer AS"),
            "{error:?}"
        );
        Ok(())
    })?;
    std::thread::sleep(Duration::from_secs(2));
    assert_ne!(ours.bgp_state("isp")?, SessionState::Established);
    assert_ne!(peer.state(b.ipv4.into())?, SessionState::Established);
    Ok(())
}

/// Out: the peer asks (ROUTE-REFRESH), we resend (not with GoBGP, which
/// never asks). In: a reload opens our import policy; with no pre-policy
/// copy we ask the peer, which resends. The session stays up throughout.
fn route_refresh(kind: Kind) -> Result<()> {
    if !can_run(&format!("route_refresh_with_{kind:?}"), binaries(kind)) {
        return Ok(());
    }
    let lab = Lab::new(&format!("refresh-{kind:?}").to_lowercase())?;
    let (border, isp) = (lab.add_node("border")?, lab.add_node("isp")?);
    let (b, i) = lab.link(&border, &isp)?;
    let ours = start_ours(
        &lab,
        &border,
        65000,
        "10.255.0.1",
        &format!(
            "{}\n[[bgp.static]]\nprefix = \"{}\"\nblackhole = true\n",
            our_neighbor(
                "isp",
                i.ipv4.into(),
                65001,
                "import = \"none\"\nexport = \"all\""
            ),
            our_prefix(false)
        ),
    )?;
    let peer = Peer::start(kind, &lab, &isp, 65001, i.ipv4.into(), b.ipv4.into(), 65000)?;
    wait_established(&ours, "isp", &peer, b.ipv4.into())?;
    wait_route(&format!("{kind:?}"), our_prefix(false), || peer.routes())?;
    assert!(
        ours.routes()?
            .iter()
            .all(|r| r.prefix != peer_prefix(false)),
        "import none"
    );

    let sent_before = ours.protocol("isp")?["stats"]["updates_sent"]
        .as_u64()
        .unwrap_or(0);
    if peer.request_refresh(b.ipv4.into())? {
        wait_until(
            SETTLE,
            "our routes resent after the peer's ROUTE-REFRESH",
            || {
                let sent = ours.protocol("isp")?["stats"]["updates_sent"]
                    .as_u64()
                    .unwrap_or(0);
                ensure!(
                    sent > sent_before,
                    "updates sent {sent}, before {sent_before}"
                );
                Ok(())
            },
        )?;
    }

    let config = std::fs::read_to_string(ours.config_path())?;
    std::fs::write(
        ours.config_path(),
        config.replace("import = \"none\"", "import = \"all\""),
    )?;
    ours.cli(&["bgp", "reload"])?;
    wait_route("bgp4mesh", peer_prefix(false), || ours.routes())?;
    let p = ours.protocol("isp")?;
    assert_eq!(
        p["stats"]["established_transitions"], 1,
        "no session reset: {p}"
    );
    assert_eq!(p["state"], "Established");
    Ok(())
}

macro_rules! for_each_peer {
    ($scenario:ident: $bird:ident, $frr:ident, $gobgp:ident) => {
        #[test]
        fn $bird() -> Result<()> {
            $scenario(Kind::Bird)
        }
        #[test]
        fn $frr() -> Result<()> {
            $scenario(Kind::Frr)
        }
        #[test]
        fn $gobgp() -> Result<()> {
            $scenario(Kind::Gobgp)
        }
    };
}

for_each_peer!(hold_timer: hold_timer_expires_with_a_frozen_bird, hold_timer_expires_with_a_frozen_frr, hold_timer_expires_with_a_frozen_gobgp);
for_each_peer!(bad_peer_as: bad_peer_as_with_bird, bad_peer_as_with_frr, bad_peer_as_with_gobgp);
for_each_peer!(route_refresh: route_refresh_with_bird, route_refresh_with_frr, route_refresh_with_gobgp);
