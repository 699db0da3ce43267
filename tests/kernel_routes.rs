//! Best routes in the kernel: installed with protocol bgp, removed on
//! withdrawal and on exit, stale ones removed at start; recursive next
//! hops; seed 000 with prefsrc; graceful restart as helper. (ECMP and
//! failover: seed_001_anycast.rs.)

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use bgp4mesh_lab::peers::{Bird, SessionState};
use bgp4mesh_lab::{Lab, can_run, wait_until};
use common::*;

fn isp_bird(
    router_id: &str,
    me: &str,
    me6: &str,
    ours: &str,
    asn: u32,
    prefixes4: &[&str],
    prefixes6: &[&str],
) -> String {
    let routes4: String = prefixes4
        .iter()
        .map(|p| format!("route {p} blackhole; "))
        .collect();
    let routes6: String = prefixes6
        .iter()
        .map(|p| format!("route {p} blackhole; "))
        .collect();
    let static6 = if prefixes6.is_empty() {
        String::new()
    } else {
        format!("protocol static origin6 {{ ipv6; {routes6} }}")
    };
    format!(
        r#"
router id {router_id};
protocol device {{}}
protocol static origin4 {{ ipv4; {routes4} }}
{static6}
protocol bgp ours {{
  local {me} as {asn};
  neighbor {ours} as 65001;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ import all; export where source = RTS_STATIC; }};
  ipv6 {{ next hop address {me6}; import all; export where source = RTS_STATIC; }};
}}
"#
    )
}

#[test]
fn best_routes_go_into_the_kernel_and_leave_with_them() -> Result<()> {
    if !can_run!(&["bird", "birdc"],) {
        return Ok(());
    }
    let lab = Lab::new("kernel-routes")?;
    let (router, isp) = (lab.add_node("router")?, lab.add_node("isp")?);
    let (r, i) = lab.link(&router, &isp)?;
    let body = |keep: bool| {
        format!(
            "{}\n[kernel]\nkeep_routes_on_exit = {keep}\n",
            our_neighbor(
                "isp",
                i.ipv4.into(),
                65000,
                &format!(
                    "import = \"all\"\nexport = \"none\"\nnext_hop_ipv6 = \"{}\"",
                    r.ipv6
                )
            )
            .replace("families = [\"ipv4\"]", "families = [\"ipv4\", \"ipv6\"]")
        )
    };
    let bird = Bird::start(
        &lab,
        &isp,
        &isp_bird(
            "10.255.1.1",
            &i.ipv4.to_string(),
            &i.ipv6.to_string(),
            &r.ipv4.to_string(),
            65000,
            &["198.51.100.0/24", "203.0.113.0/24"],
            &["2001:db8:100::/48"],
        ),
    )?;
    let ours = start_ours(&lab, &router, 65001, "10.255.0.1", &body(false))?;
    wait_until(SETTLE, "BIRD's routes in the router's kernel", || {
        let v4 = kernel_routes(&lab, &router, false)?;
        let v6 = kernel_routes(&lab, &router, true)?;
        ensure!(v4.len() == 2 && v6.len() == 1, "v4 {v4:?}, v6 {v6:?}");
        Ok(())
    })?;
    let v4 = kernel_routes(&lab, &router, false)?;
    assert!(
        v4.contains(&("198.51.100.0/24".into(), vec![i.ipv4.to_string()])),
        "{v4:?}"
    );
    let v6 = kernel_routes(&lab, &router, true)?;
    assert_eq!(
        v6,
        vec![("2001:db8:100::/48".to_string(), vec![i.ipv6.to_string()])]
    );
    let detail = lab.exec(&router, &["ip", "route", "show", "198.51.100.0/24"])?;
    assert!(
        detail.contains("proto bgp") && detail.contains("metric 32"),
        "{detail}"
    );

    // A withdrawal removes it from the kernel.
    bird.birdc("disable origin4")?;
    wait_until(SETTLE, "the IPv4 routes gone from the kernel", || {
        let v4 = kernel_routes(&lab, &router, false)?;
        ensure!(v4.is_empty(), "{v4:?}");
        Ok(())
    })?;
    bird.birdc("enable origin4")?;
    wait_until(SETTLE, "the IPv4 routes back", || {
        ensure!(kernel_routes(&lab, &router, false)?.len() == 2, "not yet");
        Ok(())
    })?;

    // A clean stop removes our routes.
    lab.signal(ours.proc(), libc::SIGTERM)?;
    wait_until(SETTLE, "our routes gone after SIGTERM", || {
        let all = [
            kernel_routes(&lab, &router, false)?,
            kernel_routes(&lab, &router, true)?,
        ]
        .concat();
        ensure!(all.is_empty(), "{all:?}");
        Ok(())
    })?;
    wait_until(SETTLE, "the daemon to exit", || {
        ensure!(!lab.is_running(ours.proc()), "still running");
        Ok(())
    })?;

    // Killed with routes kept: the next start removes them before anything else.
    let keeper = start_ours(&lab, &router, 65001, "10.255.0.1", &body(true))?;
    wait_until(SETTLE, "routes installed again", || {
        ensure!(kernel_routes(&lab, &router, false)?.len() == 2, "not yet");
        Ok(())
    })?;
    lab.signal(keeper.proc(), libc::SIGKILL)?;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        kernel_routes(&lab, &router, false)?.len(),
        2,
        "a killed daemon leaves its routes"
    );
    bird.birdc("disable ours")?;
    let fresh = start_ours(&lab, &router, 65001, "10.255.0.1", &body(false))?;
    wait_until(SETTLE, "stale routes removed at start", || {
        let v4 = kernel_routes(&lab, &router, false)?;
        ensure!(v4.is_empty(), "{v4:?}");
        Ok(())
    })?;
    let log = lab.log_tail(fresh.proc(), 50);
    assert!(log.contains("left by a previous run"), "{log}");
    Ok(())
}

/// A next hop that is not on a connected network is resolved through the
/// kernel: unreachable, the route is kept but not used; once a route to it
/// exists, it is installed via that route's gateway; when that goes, so
/// does the route.
#[test]
fn recursive_next_hops_are_tracked_in_the_kernel() -> Result<()> {
    if !can_run!(&["bird", "birdc"],) {
        return Ok(());
    }
    let lab = Lab::new("next-hop-tracking")?;
    let (router, edge) = (lab.add_node("router")?, lab.add_node("edge")?);
    let (r, e) = lab.link(&router, &edge)?;
    let ours = start_ours(
        &lab,
        &router,
        65000,
        "10.255.0.1",
        &our_neighbor("edge", e.ipv4.into(), 65000, ""),
    )?;
    let _edge = Bird::start(
        &lab,
        &edge,
        &format!(
            r#"
router id 10.255.1.1;
protocol device {{}}
protocol static origin {{ ipv4; route 198.51.100.0/24 blackhole; }}
protocol bgp ours {{
  local {e} as 65000;
  neighbor {r} as 65000;
  connect delay time 1; connect retry time 1;
  ipv4 {{ import none; export filter {{ bgp_next_hop = 10.99.99.1; accept; }}; }};
}}
"#,
            e = e.ipv4,
            r = r.ipv4
        ),
    )?;
    let route = wait_until(SETTLE, "198.51.100.0/24 at bgp4mesh, best or not", || {
        let all = ours.routes()?;
        all.into_iter()
            .find(|r| r.prefix == "198.51.100.0/24")
            .ok_or_else(|| anyhow::anyhow!("not yet"))
    })?;
    assert_eq!(route.next_hop, Some("10.99.99.1".parse()?));
    wait_until(SETTLE, "the next hop found unreachable", || {
        let json = ours.cli(&["show", "route", "198.51.100.0/24", "--json"])?;
        ensure!(json.contains("\"next_hop_reachable\": false"), "{json}");
        Ok(())
    })?;
    assert!(
        kernel_routes(&lab, &router, false)?.is_empty(),
        "not installed while unreachable"
    );
    assert!(
        ours.routes()?.iter().all(|r| !r.best),
        "not selected while unreachable"
    );

    lab.exec(
        &router,
        &[
            "ip",
            "route",
            "add",
            "10.99.99.0/24",
            "via",
            &e.ipv4.to_string(),
        ],
    )?;
    wait_until(
        SETTLE,
        "the route installed via the resolved gateway",
        || {
            let v4 = kernel_routes(&lab, &router, false)?;
            ensure!(
                v4 == vec![("198.51.100.0/24".to_string(), vec![e.ipv4.to_string()])],
                "{v4:?}"
            );
            Ok(())
        },
    )?;
    lab.exec(&router, &["ip", "route", "del", "10.99.99.0/24"])?;
    wait_until(SETTLE, "the route gone with its next hop", || {
        let v4 = kernel_routes(&lab, &router, false)?;
        ensure!(v4.is_empty(), "{v4:?}");
        Ok(())
    })?;
    Ok(())
}

/// Seed 000 end to end: a VPS (bgp4mesh) learns DN42 prefixes over iBGP
/// from an edge router (BIRD, next-hop-self) that has eBGP to a DN42 peer;
/// the VPS kernel holds them via the edge with the configured preferred
/// source, and a ping to an address behind them gets an answer.
#[test]
fn seed_000_vps_reaches_dn42_through_the_edge_with_prefsrc() -> Result<()> {
    if !can_run!(&["bird", "birdc", "ping"],) {
        return Ok(());
    }
    let lab = Lab::new("seed-000-e2e")?;
    let prefixes: Vec<String> = (0..40).map(|n| format!("172.20.{n}.0/24")).collect();
    let chain = Dn42Chain::start(&lab, &prefixes, true)?;
    let Dn42Chain {
        vps,
        edge,
        dn42,
        v,
        e1,
        e2,
        ..
    } = &chain;
    lab.enable_forwarding(edge)?;
    // The VPS's DN42 address, and the way back to it.
    lab.add_address(vps, "lo", "172.22.132.169/32")?;
    lab.add_route(edge, &["172.22.132.169/32", "via", &v.ipv4.to_string()])?;
    lab.add_route(dn42, &["172.22.132.169/32", "via", &e2.ipv4.to_string()])?;
    // Something to ping in DN42.
    lab.add_address(dn42, "lo", "172.20.0.53/32")?;
    let _ours = start_ours(
        &lab,
        vps,
        4_242_421_869,
        "172.22.132.169",
        &format!(
            "{}\n[kernel]\nprefsrc_ipv4 = \"172.22.132.169\"\n",
            our_neighbor("edge", e1.ipv4.into(), 4_242_421_869, "")
        ),
    )?;
    wait_until(SETTLE, "the DN42 prefixes in the VPS kernel", || {
        let v4 = kernel_routes(&lab, vps, false)?;
        ensure!(v4.len() == 40, "{} routes", v4.len());
        ensure!(
            v4.iter().all(|(_, gw)| gw == &vec![e1.ipv4.to_string()]),
            "{v4:?}"
        );
        Ok(())
    })?;
    let detail = lab.exec(vps, &["ip", "route", "show", "172.20.0.0/24"])?;
    assert!(
        detail.contains("src 172.22.132.169") && detail.contains("proto bgp"),
        "{detail}"
    );
    wait_until(SETTLE, "a ping into DN42", || {
        ping(&lab, vps, "172.20.0.53")
    })?;
    Ok(())
}

/// Graceful restart (RFC 4724), bgp4mesh as helper: BIRD (`graceful
/// restart on`) is killed and restarted with `-R`; its routes stay in our
/// RIB and kernel the whole time; the one it no longer announces goes at
/// its End-of-RIB.
#[test]
fn graceful_restart_helper_keeps_routes_while_bird_restarts() -> Result<()> {
    if !can_run!(&["bird", "birdc"],) {
        return Ok(());
    }
    let lab = Lab::new("graceful-restart")?;
    let (router, isp) = (lab.add_node("router")?, lab.add_node("isp")?);
    let (r, i) = lab.link(&router, &isp)?;
    let ours = start_ours(
        &lab,
        &router,
        65001,
        "10.255.0.1",
        &our_neighbor(
            "isp",
            i.ipv4.into(),
            65000,
            "import = \"all\"\nexport = \"none\"\ngraceful_restart = true",
        ),
    )?;
    let config = |routes: &str| {
        format!(
            r#"
router id 10.255.1.1;
protocol device {{}}
protocol static origin {{ ipv4; {routes} }}
protocol bgp ours {{
  local {i} as 65000;
  neighbor {r} as 65001;
  graceful restart on;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ import none; export where source = RTS_STATIC; }};
}}
"#,
            i = i.ipv4,
            r = r.ipv4
        )
    };
    let bird = Bird::start(
        &lab,
        &isp,
        &config("route 198.51.100.0/24 blackhole; route 203.0.113.0/24 blackhole;"),
    )?;
    wait_until(SETTLE, "both routes in the kernel", || {
        ensure!(kernel_routes(&lab, &router, false)?.len() == 2, "not yet");
        Ok(())
    })?;
    let p = ours.protocol("isp")?;
    assert_eq!(p["state"], "Established", "{p}");

    lab.signal(bird.proc(), libc::SIGKILL)?;
    // For two seconds BIRD is gone: nothing leaves the kernel.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        let v4 = kernel_routes(&lab, &router, false)?;
        ensure!(v4.len() == 2, "a route left during the restart: {v4:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        ours.bgp_state("isp")? != SessionState::Established,
        "BIRD is dead, the session must be down"
    );

    // BIRD comes back (graceful restart recovery), without 203.0.113.0/24.
    let _bird = Bird::start_with(
        &lab,
        &isp,
        &config("route 198.51.100.0/24 blackhole;"),
        &["-R"],
    )?;
    wait_until(
        SETTLE,
        "the route BIRD no longer has gone after its End-of-RIB",
        || {
            let v4 = kernel_routes(&lab, &router, false)?;
            ensure!(
                v4 == vec![("198.51.100.0/24".to_string(), vec![i.ipv4.to_string()])],
                "{v4:?}"
            );
            Ok(())
        },
    )?;
    assert_eq!(ours.bgp_state("isp")?, SessionState::Established);
    Ok(())
}

/// One route of a batch that the kernel refuses (its gateway is on no
/// network of ours) is reported by name and kept out of `in kernel`; the
/// others of the same batch are installed.
#[test]
fn a_refused_route_is_reported_and_the_rest_installed() -> Result<()> {
    if !can_run!(&[]) {
        return Ok(());
    }
    let lab = Lab::new("refused-route")?;
    let (router, other) = (lab.add_node("router")?, lab.add_node("other")?);
    let (_, o) = lab.link(&router, &other)?;
    let ours = start_ours(
        &lab,
        &router,
        65001,
        "10.255.0.1",
        &format!(
            "[[bgp.static]]\nprefix = \"44.30.127.0/24\"\nvia = \"10.77.77.77\"\n\n\
             [[bgp.static]]\nprefix = \"44.30.128.0/24\"\nvia = \"{}\"\n\n\
             [[bgp.static]]\nprefix = \"44.30.129.0/24\"\nblackhole = true\n\n\
             [kernel]\ninstall_static = true\n",
            o.ipv4
        ),
    )?;
    wait_until(SETTLE, "the two good routes in the kernel", || {
        let out = lab.exec(&router, &["ip", "-4", "route", "show", "proto", "bgp"])?;
        ensure!(
            out.contains("44.30.128.0/24 via") && out.contains("blackhole 44.30.129.0/24"),
            "{out}"
        );
        Ok(())
    })?;
    let out = lab.exec(&router, &["ip", "-4", "route", "show", "proto", "bgp"])?;
    assert!(!out.contains("44.30.127.0/24"), "{out}");
    wait_until(SETTLE, "the refusal in the log", || {
        let log = lab.log_tail(ours.proc(), 40);
        ensure!(log.contains("cannot install 44.30.127.0/24"), "{log}");
        Ok(())
    })?;
    let shown = ours.cli(&["show", "route", "44.30.127.0/24", "--json"])?;
    assert!(shown.contains("\"in_kernel\": false"), "{shown}");
    Ok(())
}

/// Graceful restart (RFC 4724), bgp4mesh restarting: killed, its kernel
/// routes stay and BIRD (helper) keeps its announcement; started again, it
/// keeps the old routes, tells BIRD it kept its forwarding state (R and F
/// bits), and at BIRD's End-of-RIB drops only the route BIRD no longer
/// sends. Neither side's routes ever go missing.
#[test]
fn graceful_restart_of_bgp4mesh_itself() -> Result<()> {
    if !can_run!(&["bird", "birdc"]) {
        return Ok(());
    }
    let lab = Lab::new("own-graceful-restart")?;
    let (router, isp) = (lab.add_node("router")?, lab.add_node("isp")?);
    let (r, i) = lab.link(&router, &isp)?;
    let body = format!(
        "{}\n[[bgp.static]]\nprefix = \"44.30.127.0/24\"\nblackhole = true\n",
        our_neighbor(
            "isp",
            i.ipv4.into(),
            65000,
            "import = \"all\"\nexport = \"all\"\ngraceful_restart = true"
        )
    );
    let ours = start_ours(&lab, &router, 65001, "10.255.0.1", &body)?;
    let bird = Bird::start(
        &lab,
        &isp,
        &format!(
            r#"
router id 10.255.1.1;
protocol device {{}}
protocol static origin {{ ipv4; route 198.51.100.0/24 blackhole; route 203.0.113.0/24 blackhole; }}
protocol bgp ours {{
  local {i} as 65000;
  neighbor {r} as 65001;
  graceful restart on;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ import all; export where source = RTS_STATIC; }};
}}
"#,
            i = i.ipv4,
            r = r.ipv4
        ),
    )?;
    wait_until(
        SETTLE,
        "both of BIRD's routes in our kernel and ours at BIRD",
        || {
            ensure!(
                kernel_routes(&lab, &router, false)?.len() == 2,
                "kernel: not yet"
            );
            ensure!(
                bird.routes()?.iter().any(|r| r.prefix == "44.30.127.0/24"),
                "BIRD: not yet"
            );
            Ok(())
        },
    )?;

    lab.signal(ours.proc(), libc::SIGKILL)?;
    // While we are gone, BIRD stops announcing 203.0.113.0/24.
    let config = std::fs::read_to_string(lab.log_dir().join("isp").join("bird.conf"))?;
    bird.reconfigure(&config.replace(" route 203.0.113.0/24 blackhole;", ""))?;
    let check = |what: &str| -> Result<()> {
        let v4 = kernel_routes(&lab, &router, false)?;
        ensure!(
            v4.iter().any(|(p, _)| p == "198.51.100.0/24"),
            "{what}: our kernel lost 198.51.100.0/24: {v4:?}"
        );
        ensure!(
            bird.routes()?.iter().any(|r| r.prefix == "44.30.127.0/24"),
            "{what}: BIRD lost our route"
        );
        Ok(())
    };
    for _ in 0..10 {
        check("while we are down")?;
        std::thread::sleep(Duration::from_millis(100));
    }

    let again = start_ours(&lab, &router, 65001, "10.255.0.1", &body)?;
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        check("while we restart")?;
        let v4 = kernel_routes(&lab, &router, false)?;
        if v4 == vec![("198.51.100.0/24".to_string(), vec![i.ipv4.to_string()])] {
            break;
        }
        ensure!(
            Instant::now() < until,
            "the stale 203.0.113.0/24 never went: {v4:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = lab.log_tail(again.proc(), 60);
    assert!(
        log.contains("keeping 2 routes of the previous run"),
        "{log}"
    );
    assert!(
        log.contains("graceful restart over (every neighbour sent End-of-RIB)"),
        "{log}"
    );
    Ok(())
}
