//! Seed 001: an anycast VIP announced by two servers (BIRD, `merge paths`
//! on the router side), here with bgp4mesh as the router. One ECMP route
//! with two next hops; a dying server leaves it fast: at once when its TCP
//! closes or its link drops, within BFD's detection time when it just goes
//! silent. The loss window is measured with a ping every 5 ms.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use bgp4mesh_lab::peers::{Bgp4mesh, Bird};
use bgp4mesh_lab::{Iface, Lab, Node, can_run, wait_until};
use common::*;

/// The router (bgp4mesh, multipath) and two servers (BIRD, AS 65000,
/// announcing 192.168.20.0/24, with BFD 100 ms × 5 when `bfd`).
struct Anycast<'l> {
    router: Node,
    /// Per server: its node, its end of the link, the router's end.
    servers: [(Node, Iface, Iface); 2],
    ours: Bgp4mesh<'l>,
    birds: Vec<Bird<'l>>,
}

impl<'l> Anycast<'l> {
    fn start(lab: &'l Lab, bfd: bool) -> Result<Anycast<'l>> {
        let router = lab.add_node("router")?;
        let s5 = lab.add_node("server5")?;
        let s7 = lab.add_node("server7")?;
        let (r5, a5) = lab.link(&router, &s5)?;
        let (r7, a7) = lab.link(&router, &s7)?;
        let options = format!("import = \"all\"\nexport = \"none\"\nbfd = {bfd}");
        let ours = start_ours(
            lab,
            &router,
            65001,
            "10.0.0.1",
            &format!(
                "multipath = true\n\n{}{}",
                our_neighbor("bgp_server5", a5.ipv4.into(), 65000, &options),
                our_neighbor("bgp_server7", a7.ipv4.into(), 65000, &options),
            ),
        )?;
        let mut birds = Vec::new();
        for (node, me, router_end, id) in [(&s5, &a5, &r5, "10.0.5.1"), (&s7, &a7, &r7, "10.0.7.1")]
        {
            let (bfd_protocol, bfd_on) = if bfd {
                (
                    "protocol bfd { interface \"*\" { interval 100 ms; multiplier 5; }; }",
                    "bfd on;",
                )
            } else {
                ("", "")
            };
            birds.push(Bird::start(
                lab,
                node,
                &format!(
                    r#"
router id {id};
protocol device {{}}
protocol static vip {{ ipv4; route 192.168.20.0/24 blackhole; }}
{bfd_protocol}
protocol bgp bgp_router {{
  local {me} as 65000;
  neighbor {router} as 65001;
  {bfd_on}
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ import none; export where source = RTS_STATIC; }};
}}
"#,
                    me = me.ipv4,
                    router = router_end.ipv4
                ),
            )?);
        }
        let this = Anycast {
            router,
            servers: [(s5, a5, r5), (s7, a7, r7)],
            ours,
            birds,
        };
        wait_until(SETTLE, "one route with two next hops", || {
            let v4 = kernel_routes(lab, &this.router, false)?;
            ensure!(v4 == vec![this.vip_via(&[0, 1])], "{v4:?}");
            Ok(())
        })?;
        Ok(this)
    }

    /// The VIP route as `kernel_routes` shows it, via these servers.
    fn vip_via(&self, servers: &[usize]) -> (String, Vec<String>) {
        let mut gateways: Vec<String> = servers
            .iter()
            .map(|&i| self.servers[i].1.ipv4.to_string())
            .collect();
        gateways.sort();
        ("192.168.20.0/24".to_string(), gateways)
    }

    /// Waits until only `survivor`'s next hop is left; returns how long.
    fn wait_only(&self, lab: &Lab, survivor: usize, since: Instant) -> Result<Duration> {
        wait_until(
            Duration::from_secs(5),
            "only the surviving server's next hop",
            || {
                let v4 = kernel_routes(lab, &self.router, false)?;
                ensure!(v4 == vec![self.vip_via(&[survivor])], "{v4:?}");
                Ok(())
            },
        )?;
        Ok(since.elapsed())
    }
}

/// `kill -9` of one server's BIRD: its TCP session closes, its next hop
/// leaves at once.
#[test]
fn a_killed_server_leaves_the_ecmp_route_at_once() -> Result<()> {
    if !can_run!(&["bird", "birdc"],) {
        return Ok(());
    }
    let lab = Lab::new("seed-001-ecmp")?;
    let anycast = Anycast::start(&lab, false)?;
    lab.signal(anycast.birds[0].proc(), libc::SIGKILL)?;
    let took = anycast.wait_only(&lab, 1, Instant::now())?;
    eprintln!("failover: server5's next hop left the kernel {took:?} after kill -9");
    assert!(took < Duration::from_secs(1), "failover took {took:?}");
    Ok(())
}

/// A server frozen rather than killed: no TCP close tells us; BFD does,
/// in well under a second although the BGP hold time is 90 s.
#[test]
fn bfd_takes_a_frozen_server_out_in_under_a_second() -> Result<()> {
    if !can_run!(&["bird", "birdc"],) {
        return Ok(());
    }
    let lab = Lab::new("seed-001-bfd")?;
    let anycast = Anycast::start(&lab, true)?;
    wait_until(SETTLE, "both BFD sessions Up", || {
        let bfd = anycast.ours.cli(&["show", "bfd", "sessions", "--json"])?;
        ensure!(bfd.matches("\"Up\"").count() == 2, "{bfd}");
        Ok(())
    })?;
    let table = anycast.ours.cli(&["show", "bfd", "sessions"])?;
    assert!(
        table.contains("bgp_server5") && table.contains("100ms"),
        "{table}"
    );

    lab.signal(anycast.birds[0].proc(), libc::SIGSTOP)?;
    let took = anycast.wait_only(&lab, 1, Instant::now())?;
    eprintln!(
        "failover: frozen server5's next hop left the kernel {took:?} after SIGSTOP (BFD 100 ms x 5)"
    );
    assert!(took < Duration::from_secs(1), "BFD failover took {took:?}");
    let p = anycast.ours.protocol("bgp_server5")?;
    assert!(
        p["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("BFD session down")),
        "{p}"
    );

    lab.signal(anycast.birds[0].proc(), libc::SIGCONT)?;
    wait_until(SETTLE, "server5 back in the ECMP route", || {
        let v4 = kernel_routes(&lab, &anycast.router, false)?;
        ensure!(v4 == vec![anycast.vip_via(&[0, 1])], "{v4:?}");
        Ok(())
    })?;
    Ok(())
}

/// How a server dies in the loss-window tests.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// Its link goes down: the router sees the carrier go.
    LinkDown,
    /// It goes silent (nftables drops everything): only BFD can tell.
    Silent,
}

/// A client pings the anycast VIP through the router every 5 ms; the
/// server its flow hashes to dies; the window is the longest silence
/// between replies (`ping -D` timestamps).
fn loss_window(death: Death) -> Result<()> {
    if !can_run(
        &format!("seed_001_loss_window_{death:?}"),
        &["bird", "birdc", "ping", "nft"],
    ) {
        return Ok(());
    }
    let lab = Lab::new(&format!("loss-{death:?}").to_lowercase())?;
    let anycast = Anycast::start(&lab, true)?;
    let client = lab.add_node("client")?;
    let (c, rc) = lab.link(&client, &anycast.router)?;
    lab.enable_forwarding(&anycast.router)?;
    lab.add_route(&client, &["default", "via", &rc.ipv4.to_string()])?;
    for (server, _, router_end) in &anycast.servers {
        lab.add_address(server, "lo", "192.168.20.1/32")?;
        lab.add_route(
            server,
            &[
                &format!("{}/32", c.ipv4),
                "via",
                &router_end.ipv4.to_string(),
            ],
        )?;
    }

    // Which server does the client's flow reach?
    let rx = |node: &Node, ifname: &str| -> Result<u64> {
        let out = lab.exec(node, &["ip", "-j", "-s", "link", "show", "dev", ifname])?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        Ok(json[0]["stats64"]["rx"]["packets"].as_u64().unwrap_or(0))
    };
    let [(s5, a5, _), (s7, a7, _)] = &anycast.servers;
    let before = (rx(s5, &a5.name)?, rx(s7, &a7.name)?);
    lab.exec(
        &client,
        &["ping", "-c", "20", "-i", "0.01", "-q", "192.168.20.1"],
    )?;
    let after = (rx(s5, &a5.name)?, rx(s7, &a7.name)?);
    let (victim, victim_if) = if after.0 - before.0 >= after.1 - before.1 {
        (s5, &a5.name)
    } else {
        (s7, &a7.name)
    };

    let flood = lab.spawn(
        &client,
        "ping-flood",
        &["ping", "-D", "-i", "0.005", "-c", "800", "192.168.20.1"],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    match death {
        Death::LinkDown => {
            lab.exec(victim, &["ip", "link", "set", victim_if, "down"])?;
        }
        Death::Silent => {
            // One nft transaction, so that input and output stop together.
            let rules = "table inet dead {\n chain input { type filter hook input priority 0; policy drop; }\n chain output { type filter hook output priority 0; policy drop; }\n}\n";
            let out = lab.exec_full(
                victim,
                &["nft", "-f", "-"],
                Some(rules.as_bytes()),
                Duration::from_secs(10),
            )?;
            ensure!(out.success(), "nft: {}", out.stderr);
        }
    }
    wait_until(Duration::from_secs(20), "the ping flood to end", || {
        ensure!(!lab.is_running(&flood), "still pinging");
        Ok(())
    })?;
    let log = std::fs::read_to_string(&flood.log)?;
    let replies: Vec<(f64, u64)> = log
        .lines()
        .filter_map(|l| {
            let time = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
            let seq = l
                .split("icmp_seq=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some((time, seq))
        })
        .collect();
    ensure!(
        replies.len() > 100,
        "too few replies: {}",
        lab.log_tail(&flood, 5)
    );
    let (window, lost) = replies
        .windows(2)
        .map(|w| (w[1].0 - w[0].0, w[1].1 - w[0].1 - 1))
        .fold((0.0f64, 0u64), |a, b| if b.0 > a.0 { b } else { a });
    eprintln!("loss window ({death:?}): {window:.3} s without replies ({lost} pings lost in it)");
    assert!(
        window < 1.0,
        "loss window {window:.3} s: {}",
        lab.log_tail(&flood, 3)
    );
    Ok(())
}

#[test]
fn loss_window_when_a_server_loses_its_link() -> Result<()> {
    loss_window(Death::LinkDown)
}

#[test]
fn loss_window_when_a_server_goes_silent() -> Result<()> {
    loss_window(Death::Silent)
}

/// Seed 001 the other way round: the router is BIRD with the seed's router
/// config (merge paths, BFD, graceful restart) and the servers are
/// bgp4mesh. A frozen server (BFD) and a killed one (TCP close) each leave
/// BIRD's ECMP route within a second.
#[test]
fn bird_router_with_bgp4mesh_servers() -> Result<()> {
    if !can_run!(&["bird", "birdc"]) {
        return Ok(());
    }
    let lab = Lab::new("seed-001-bird-router")?;
    let router = lab.add_node("router")?;
    let (s5, s7) = (lab.add_node("server5")?, lab.add_node("server7")?);
    let (r5, a5) = lab.link(&router, &s5)?;
    let (r7, a7) = lab.link(&router, &s7)?;
    let bird = Bird::start(&lab, &router, &seed_001_router_bird(&r5, &a5, &r7, &a7))?;
    let mut servers = Vec::new();
    for (node, router_end, id) in [(&s5, &r5, "10.0.5.1"), (&s7, &r7, "10.0.7.1")] {
        servers.push(start_ours(
            &lab,
            node,
            65000,
            id,
            &format!(
                "{}\n[[bgp.static]]\nprefix = \"192.168.20.0/24\"\nblackhole = true\n\n[policy.vip]\nrules = [ {{ match = {{ source = [\"static\"] }}, action = \"accept\" }} ]\n",
                our_neighbor("bgp_router", router_end.ipv4.into(), 65001, "import = \"none\"\nexport = \"vip\"\nbfd = true")
            ),
        )?);
    }
    let via = |which: &[&Iface]| {
        let mut gateways: Vec<String> = which.iter().map(|i| i.ipv4.to_string()).collect();
        gateways.sort();
        vec![("192.168.20.0/24".to_string(), gateways)]
    };
    wait_until(SETTLE, "BIRD's kernel route with both servers", || {
        let v4 = kernel_routes_of(&lab, &router, false, "bird")?;
        ensure!(v4 == via(&[&a5, &a7]), "{v4:?}");
        Ok(())
    })?;

    wait_until(SETTLE, "BIRD's BFD sessions Up", || {
        let sessions = bird.birdc("show bfd sessions")?;
        ensure!(sessions.matches(" Up ").count() == 2, "{sessions}");
        Ok(())
    })?;
    // Freeze server5's bgp4mesh: BIRD's BFD notices.
    lab.signal(servers[0].proc(), libc::SIGSTOP)?;
    let frozen = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "server5 out of BIRD's route",
        || {
            let v4 = kernel_routes_of(&lab, &router, false, "bird")?;
            ensure!(v4 == via(&[&a7]), "{v4:?}");
            Ok(())
        },
    )?;
    let took = frozen.elapsed();
    eprintln!("failover: BIRD dropped frozen bgp4mesh server5 {took:?} after SIGSTOP (BFD)");
    assert!(took < Duration::from_secs(1), "{took:?}");
    lab.signal(servers[0].proc(), libc::SIGCONT)?;
    wait_until(SETTLE, "server5 back", || {
        let v4 = kernel_routes_of(&lab, &router, false, "bird")?;
        ensure!(v4 == via(&[&a5, &a7]), "{v4:?}");
        Ok(())
    })?;

    // Kill server7's bgp4mesh: its TCP session closes.
    lab.signal(servers[1].proc(), libc::SIGKILL)?;
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(5),
        "server7 out of BIRD's route",
        || {
            let v4 = kernel_routes_of(&lab, &router, false, "bird")?;
            ensure!(v4 == via(&[&a5]), "{v4:?}");
            Ok(())
        },
    )?;
    let took = killed.elapsed();
    eprintln!("failover: BIRD dropped killed bgp4mesh server7 {took:?} after kill -9");
    assert!(took < Duration::from_secs(1), "{took:?}");
    Ok(())
}
