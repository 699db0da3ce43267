//! Seed 004 end to end in namespaces: a border router announces your block
//! to a mock ISP over BGP, mesh nodes get public addresses of it from the
//! controller, the Internet reaches them through the border and they reach
//! the Internet through it.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::own_as::{
    BLOCK, BLOCK6, Families, INTERNET_HOST, INTERNET_HOST6, IspKind, OwnAs, OwnAsOptions,
};
use bgp4mesh_lab::peers::best_route;
use bgp4mesh_lab::{Lab, Node, can_run, wait_until};

use common::{BIN, flood_output, loss_window, now_unix, ping, ping_flood_to};

fn own_as(isp: IspKind) -> Result<()> {
    let lab = Lab::new(&format!(
        "own-as-{}",
        if isp == IspKind::Bird { "bird" } else { "ours" }
    ))?;
    let world = OwnAs::start(&lab, &OwnAsOptions::new(BIN, 3, isp, 1))?;
    world.wait_bgp(Duration::from_secs(30))?;
    let routes = match &world.isp {
        bgp4mesh_lab::own_as::Isp::Bgp4mesh(d) => d.routes()?,
        bgp4mesh_lab::own_as::Isp::Bird(b) => b.routes()?,
    };
    for prefix in [BLOCK, BLOCK6] {
        let block = best_route(&routes, prefix).cloned();
        ensure!(
            block.as_ref().is_some_and(|r| r.as_path == vec![65000]),
            "the ISP's route to {prefix}: {block:?}"
        );
    }
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
    // IPv6: the Internet host and every node reach each other, and the
    // nodes each other; TCP both ways between n1 and the Internet host.
    both_ways_over_ipv6(&lab, &world)?;
    tcp_over_ipv6(&lab, &world)?;
    // The controller goes away: ingress and egress go on.
    lab.signal(&world.controller_proc, libc::SIGKILL)?;
    std::thread::sleep(Duration::from_millis(500));
    for n in &world.nodes {
        ping(&lab, &world.isp_node, &n.address.to_string())?;
        ping(&lab, n.daemon.node(), INTERNET_HOST)?;
        let address6 = n.address6.context("an IPv6 address")?.to_string();
        ping(&lab, &world.internet, &address6)?;
        ping(&lab, n.daemon.node(), INTERNET_HOST6)?;
    }
    Ok(())
}

/// TCP over IPv6 between n1 and the Internet host, each way: iperf3 for
/// 2 s to a one-off server on the Internet host, then the same reversed;
/// each must carry something (a mesh that passes pings but not TCP over
/// IPv6, an MTU problem, shows here).
fn tcp_over_ipv6(lab: &Lab, world: &OwnAs<'_>) -> Result<()> {
    let n1 = world.nodes[0].daemon.node();
    for reverse in [false, true] {
        let server = lab.spawn(
            &world.internet,
            if reverse {
                "iperf3-6-reverse"
            } else {
                "iperf3-6"
            },
            &["iperf3", "-s", "-1", "-B", INTERNET_HOST6],
        )?;
        wait_until(Duration::from_secs(10), "iperf3 listening", || {
            let out = lab.exec(&world.internet, &["ss", "-tlnH", "sport = :5201"])?;
            ensure!(!out.trim().is_empty(), "not yet");
            Ok(())
        })?;
        let mut cmd = vec!["iperf3", "-J", "-t", "2", "-c", INTERNET_HOST6];
        if reverse {
            cmd.push("-R");
        }
        let out = lab.exec_full(n1, &cmd, None, Duration::from_secs(30))?;
        lab.stop(&server);
        ensure!(
            out.success(),
            "{}: {}{}",
            cmd.join(" "),
            out.stdout,
            out.stderr
        );
        let report: serde_json::Value = serde_json::from_str(&out.stdout)?;
        let bits = report["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0);
        eprintln!(
            "TCP over IPv6, n1 {} the Internet host: {:.0} Mbit/s",
            if reverse { "from" } else { "to" },
            bits / 1e6
        );
        ensure!(bits > 1e6, "TCP over IPv6 carried {bits} bit/s");
    }
    Ok(())
}

/// Over IPv6: the Internet host reaches every node and every node the
/// Internet host (by its default route in the tunnel), and the nodes
/// reach each other.
fn both_ways_over_ipv6(lab: &Lab, world: &OwnAs<'_>) -> Result<()> {
    for n in &world.nodes {
        let node = n.daemon.node();
        let address6 = n.address6.context("an IPv6 mesh address")?.to_string();
        wait_until(
            Duration::from_secs(30),
            &format!("the Internet host reaching {} ({address6})", n.name),
            || ping(lab, &world.internet, &address6),
        )
        .map_err(|e| e.context(dump_paths(lab, world)))?;
        wait_until(
            Duration::from_secs(30),
            &format!("{} reaching the Internet host over IPv6", n.name),
            || ping(lab, node, INTERNET_HOST6),
        )
        .map_err(|e| e.context(dump_paths(lab, world)))?;
        let route = lab.exec(node, &["ip", "-6", "route", "get", INTERNET_HOST6])?;
        ensure!(route.contains(&n.interface), "{}: {route}", n.name);
        for other in world.nodes.iter().filter(|o| o.name != n.name) {
            let to = other.address6.context("an IPv6 mesh address")?.to_string();
            wait_until(
                Duration::from_secs(10),
                &format!("{} reaching {} ({to})", n.name, other.name),
                || ping(lab, node, &to),
            )?;
        }
    }
    Ok(())
}

#[test]
fn own_as_with_a_bgp4mesh_isp() -> Result<()> {
    if !can_run!(&["wg", "ping", "iperf3", "ss"]) {
        return Ok(());
    }
    own_as(IspKind::Bgp4mesh)
}

#[test]
fn own_as_with_a_bird_isp() -> Result<()> {
    if !can_run!(&["wg", "ping", "bird", "birdc", "iperf3", "ss"]) {
        return Ok(());
    }
    own_as(IspKind::Bird)
}

/// The source address a TCP connection from `from` to the Internet host
/// arrives with, as the Internet host sees it.
fn source_seen_by_internet(lab: &Lab, world: &OwnAs<'_>, from: &Node) -> Result<String> {
    use std::net::TcpListener;
    let listener = lab.in_netns(&world.internet, || TcpListener::bind((INTERNET_HOST, 8080)))??;
    listener.set_nonblocking(true)?;
    let probe = lab.try_exec(
        from,
        &[
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{INTERNET_HOST}/8080 && echo hi >&3"),
        ],
    )?;
    ensure!(
        probe.success(),
        "connecting to the Internet host: {}",
        probe.stderr
    );
    let started = std::time::Instant::now();
    loop {
        match listener.accept() {
            Ok((_, peer)) => return Ok(peer.ip().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                ensure!(
                    started.elapsed() < Duration::from_secs(5),
                    "no connection reached the Internet host"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `natEnabled: yes` on the border's egress: mesh traffic reaches the
/// Internet with the border's own address; off again, with the node's
/// public mesh address (the seed's setup), and the NAT table is gone.
#[test]
fn nat_on_egress_can_be_switched_on_and_off() -> Result<()> {
    if !can_run!(&["wg", "ping", "nft", "bash"],) {
        return Ok(());
    }
    let lab = Lab::new("own-as-nat")?;
    let world = OwnAs::start(&lab, &OwnAsOptions::new(BIN, 1, IspKind::Bgp4mesh, 1))?;
    world.wait_bgp(Duration::from_secs(30))?;
    let node = lab
        .nodes()
        .into_iter()
        .find(|n| n.name() == "n1")
        .ok_or_else(|| anyhow::anyhow!("no node n1"))?;
    let border = lab
        .nodes()
        .into_iter()
        .find(|n| n.name() == "border")
        .ok_or_else(|| anyhow::anyhow!("no border"))?;
    let mesh_address = world.nodes[0].address.to_string();
    wait_until(Duration::from_secs(30), "n1 reaching the Internet", || {
        ping(&lab, &node, INTERNET_HOST)
    })?;
    // A node that has just joined may still lose its exit for a moment
    // (seen once in CI: "Network is unreachable" right after a ping went
    // through); what is checked here is the source the Internet sees.
    let seen = wait_until(Duration::from_secs(10), "n1's TCP to the Internet", || {
        source_seen_by_internet(&lab, &world, &node)
    })?;
    ensure!(seen == mesh_address, "without NAT the Internet sees {seen}");

    let table = bgp4mesh_kernel::nat::table_name(&world.border.interface);
    let has_table = || -> Result<bool> {
        Ok(lab
            .try_exec(&border, &["nft", "list", "table", "inet", &table])?
            .success())
    };
    ensure!(!has_table()?, "a NAT table before NAT was asked for");
    let gateway = |nat: bool| -> Result<()> {
        let mut args = vec![
            "gateway",
            "create",
            "mynet",
            "border",
            "--range",
            "0.0.0.0/0",
            "--metric",
            "100",
        ];
        if nat {
            args.push("--nat");
        }
        world.admin(&args).map(|_| ())
    };
    gateway(true)?;
    wait_until(Duration::from_secs(10), "the border's NAT table", || {
        ensure!(has_table()?, "not yet");
        Ok(())
    })?;
    let seen = source_seen_by_internet(&lab, &world, &node)?;
    let border_addresses = lab.exec(&border, &["ip", "-o", "-4", "addr", "show"])?;
    ensure!(
        seen != mesh_address
            && border_addresses
                .split_whitespace()
                .any(|w| w.split('/').next() == Some(seen.as_str())),
        "with NAT the Internet sees {seen}, not one of the border's addresses: {border_addresses}"
    );

    gateway(false)?;
    wait_until(Duration::from_secs(10), "the NAT table to go", || {
        ensure!(!has_table()?, "still there");
        Ok(())
    })?;
    let seen = source_seen_by_internet(&lab, &world, &node)?;
    ensure!(
        seen == mesh_address,
        "NAT off again, the Internet sees {seen}"
    );
    Ok(())
}

/// Waits until the second border's session with the ISP is up.
fn wait_second_border(world: &OwnAs<'_>) -> Result<()> {
    let border2 = world.border2.as_ref().context("two borders")?;
    wait_until(Duration::from_secs(30), "border2's session", || {
        let state = border2.daemon.bgp_state("isp")?;
        ensure!(
            state == bgp4mesh_lab::peers::SessionState::Established,
            "{state:?}"
        );
        Ok(())
    })
}

/// Pings the Internet host from `node` every 20 ms for `seconds`, with
/// timestamps (`ping -D`), for `loss_window`.
fn ping_flood(lab: &Lab, node: &Node, seconds: u32) -> Result<bgp4mesh_lab::Proc> {
    ping_flood_to(lab, node, INTERNET_HOST, seconds)
}

/// Two borders, the first preferred. A mesh node pings the Internet host
/// every 20 ms while the first border dies (kill -9), comes back, and then
/// loses its BGP upstream: traffic moves to the second border and back.
/// The longest gap without a reply is the failover window (printed; the
/// figures are in BENCHMARKS.md).
#[test]
fn two_borders_fail_over_and_back() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    two_borders(IspKind::Bgp4mesh)
}

#[test]
fn two_borders_fail_over_and_back_with_a_bird_isp() -> Result<()> {
    if !can_run!(&["wg", "ping", "bird", "birdc"],) {
        return Ok(());
    }
    two_borders(IspKind::Bird)
}

fn two_borders(isp: IspKind) -> Result<()> {
    let lab = Lab::new(&format!(
        "own-as-two-borders-{}",
        if isp == IspKind::Bird { "bird" } else { "ours" }
    ))?;
    let world = OwnAs::start(&lab, &OwnAsOptions::new(BIN, 1, isp, 2))?;
    world.wait_bgp(Duration::from_secs(30))?;
    wait_second_border(&world)?;
    let n1 = &world.nodes[0];
    let node = n1.daemon.node();
    wait_until(
        Duration::from_secs(30),
        "n1 reaching the Internet host",
        || ping(&lab, node, INTERNET_HOST),
    )?;
    // n1 uses the first border (metric 100).
    let exit_of = |lab: &Lab| -> Result<String> {
        let dump = lab.exec(node, &["wg", "show", &n1.interface, "allowed-ips"])?;
        Ok(dump
            .lines()
            .find(|l| l.contains("0.0.0.0/0"))
            .map(|l| {
                if l.contains(&world.border.address.to_string()) {
                    "border"
                } else {
                    "border2"
                }
            })
            .unwrap_or("none")
            .to_string())
    };
    assert_eq!(exit_of(&lab)?, "border");

    let flood = |seconds: u32| ping_flood(&lab, node, seconds);
    let finish = |proc: &bgp4mesh_lab::Proc| flood_output(&lab, proc);

    // 1. The preferred border dies.
    let started = now_unix();
    let ping = flood(6)?;
    std::thread::sleep(Duration::from_secs(2));
    lab.signal(world.border.daemon.proc(), libc::SIGKILL)?;
    let out = finish(&ping)?;
    let (gap, lost) = loss_window(&out, started);
    eprintln!("border killed: longest gap {:.3} s, {lost} pings lost", gap);
    ensure!(gap < 1.0, "failover took {gap:.3} s:\n{out}");
    assert_eq!(exit_of(&lab)?, "border2");

    // 2. It comes back: traffic returns to it without loss.
    let config = world.border.daemon.config_path().to_path_buf();
    let started = now_unix();
    let ping = flood(6)?;
    let back = lab.spawn(
        world.border.daemon.node(),
        "bgp4mesh-again",
        &[BIN, "run", "-c", &config.to_string_lossy()],
    )?;
    wait_until(
        Duration::from_secs(15),
        "n1 back on the first border",
        || {
            ensure!(exit_of(&lab)? == "border", "still on {}", exit_of(&lab)?);
            Ok(())
        },
    )?;
    let out = finish(&ping)?;
    let (gap, lost) = loss_window(&out, started);
    eprintln!("border back: longest gap {:.3} s, {lost} pings lost", gap);
    // Goal: no loss. Measured: 0 or 1 ping (the border announces its block
    // only once the controller calls it healthy; what is left is the time
    // between the nodes moving their exit and the ISP moving the return
    // traffic, BENCHMARKS.md).
    ensure!(gap < 1.0, "coming back cost {gap:.3} s:\n{out}");

    // 3. The first border loses its upstream (its BGP session is shut).
    wait_until(
        Duration::from_secs(30),
        "the border's session again",
        || {
            let socket = lab
                .run_dir(world.border.daemon.node())?
                .join("bgp4mesh.sock");
            let out = lab.exec(
                world.border.daemon.node(),
                &[
                    BIN,
                    "-s",
                    &socket.to_string_lossy(),
                    "show",
                    "protocols",
                    "--json",
                ],
            )?;
            ensure!(out.contains("\"Established\""), "{out}");
            Ok(())
        },
    )?;
    let started = now_unix();
    let ping = flood(8)?;
    std::thread::sleep(Duration::from_secs(2));
    let socket = lab
        .run_dir(world.border.daemon.node())?
        .join("bgp4mesh.sock");
    lab.exec(
        world.border.daemon.node(),
        &[
            BIN,
            "-s",
            &socket.to_string_lossy(),
            "bgp",
            "disable",
            "isp",
        ],
    )?;
    let out = finish(&ping)?;
    let (gap, lost) = loss_window(&out, started);
    eprintln!(
        "border's upstream lost: longest gap {:.3} s, {lost} pings lost",
        gap
    );
    ensure!(
        gap < 3.0,
        "failover after the upstream loss took {gap:.3} s:\n{out}"
    );
    assert_eq!(exit_of(&lab)?, "border2");
    lab.stop(&back);
    Ok(())
}

/// Routes and WireGuard peers of every mesh machine and the ISP's routes,
/// for a failure message.
fn dump_paths(lab: &Lab, world: &OwnAs<'_>) -> String {
    let mut dump = String::new();
    let mut machines = vec![&world.border];
    machines.extend(world.border2.as_ref());
    machines.extend(world.nodes.iter());
    for m in machines {
        for cmd in [
            vec!["ip", "route", "show", "table", "all"],
            vec!["wg", "show", m.interface.as_str(), "allowed-ips"],
        ] {
            let out = lab
                .try_exec(m.daemon.node(), &cmd)
                .map(|o| format!("{}{}", o.stdout, o.stderr))
                .unwrap_or_default();
            dump.push_str(&format!("== {}: {}\n{out}\n", m.name, cmd.join(" ")));
        }
    }
    let isp = lab
        .try_exec(&world.isp_node, &["ip", "route"])
        .map(|o| o.stdout)
        .unwrap_or_default();
    dump.push_str(&format!("== isp: ip route\n{isp}\n"));
    dump
}

/// Which border `node`'s WireGuard gives `range` to (by the border's mesh
/// address among the peer's allowed IPs), or "none".
fn exit_for(lab: &Lab, world: &OwnAs<'_>, n: usize, range: &str) -> Result<String> {
    let n = &world.nodes[n];
    let dump = lab.exec(
        n.daemon.node(),
        &["wg", "show", &n.interface, "allowed-ips"],
    )?;
    let line = dump
        .lines()
        .find(|l| l.split_whitespace().any(|w| w == range));
    // A border's mesh address (IPv4, or IPv6 in an IPv6-only AS) among
    // the peer's allowed IPs.
    let host_route = |b: &bgp4mesh_lab::own_as::MeshNode<'_>| match b.address6 {
        Some(a) if b.address.is_unspecified() => format!("{a}/128"),
        _ => format!("{}/32", b.address),
    };
    let is = |l: &str, b: &bgp4mesh_lab::own_as::MeshNode<'_>| {
        l.split_whitespace().any(|w| w == host_route(b))
    };
    Ok(match line {
        None => "none",
        Some(l) if is(l, &world.border) => "border",
        Some(l) if world.border2.as_ref().is_some_and(|b| is(l, b)) => "border2",
        Some(_) => "another peer",
    }
    .to_string())
}

/// The BGP-aware mesh: the borders have no static egress; they offer the
/// mesh what they learn by BGP (`[mesh] export`, gateways made with
/// `--bgp`). The second border also peers with a friend's network. The
/// node gets the ISP's default route and the Internet host's network
/// from the preferred border and the friend's network from the second;
/// the friend's session goes and comes back, and so does that one prefix
/// in the mesh, while the rest stays; the first border's upstream goes
/// and its prefixes move to the second.
#[test]
fn bgp_learned_routes_are_the_mesh_egress() -> Result<()> {
    if !can_run!(&["wg", "ping", "traceroute"],) {
        return Ok(());
    }
    use bgp4mesh_lab::own_as::{FRIEND_HOST, FRIEND_NET};
    let lab = Lab::new("own-as-bgp-egress")?;
    let world = OwnAs::start(
        &lab,
        &OwnAsOptions {
            bgp_egress: true,
            friend: true,
            // The ranges offered are compared whole: IPv4's.
            families: Families::Ipv4Only,
            ..OwnAsOptions::new(BIN, 1, IspKind::Bgp4mesh, 2)
        },
    )?;
    world.wait_bgp(Duration::from_secs(30))?;
    let n1 = &world.nodes[0];
    let node = n1.daemon.node();
    const HOST_NET: &str = "198.51.100.0/24";
    let bgp_ranges = |name: &str| -> Result<Vec<String>> {
        let list: serde_json::Value =
            serde_json::from_str(&world.admin(&["--json", "gateway", "list"])?)?;
        let g = list
            .as_array()
            .and_then(|a| a.iter().find(|g| g["name"] == name))
            .ok_or_else(|| anyhow::anyhow!("no gateway {name}: {list}"))?;
        ensure!(
            g["gateway"]["bgp"] == true,
            "{name} is not a BGP gateway: {g}"
        );
        Ok(g["gateway"]["bgp_ranges"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| r.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    };
    let wait_ranges = |name: &str, want: &[&str]| -> Result<()> {
        wait_until(
            Duration::from_secs(30),
            &format!("{name} offering {want:?}"),
            || {
                let have = bgp_ranges(name)?;
                ensure!(have == want, "{name} offers {have:?}");
                Ok(())
            },
        )
    };
    let wait_exit = |range: &str, want: &str| -> Result<()> {
        wait_until(
            Duration::from_secs(10),
            &format!("n1 sending {range} to {want}"),
            || {
                let exit = exit_for(&lab, &world, 0, range)?;
                ensure!(exit == want, "{range} goes to {exit}");
                Ok(())
            },
        )
        .map_err(|e| e.context(dump_paths(&lab, &world)))
    };
    let reach = |to: &str| -> Result<()> {
        wait_until(
            Duration::from_secs(10),
            &format!("n1 reaching {to}"),
            || ping(&lab, node, to),
        )
        .map_err(|e| e.context(dump_paths(&lab, &world)))
    };
    let first_hop = |to: &str| -> Result<String> {
        let trace = lab.exec(
            node,
            &["traceroute", "-n", "-q", "1", "-w", "1", "-m", "1", to],
        )?;
        Ok(trace
            .lines()
            .nth(1)
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("")
            .to_string())
    };
    let border2 = world.border2.as_ref().expect("two borders");
    let (first, second) = (
        world.border.address.to_string(),
        border2.address.to_string(),
    );

    wait_ranges("border", &["0.0.0.0/0", HOST_NET])?;
    wait_ranges("border2", &["0.0.0.0/0", HOST_NET, FRIEND_NET])?;
    wait_exit("0.0.0.0/0", "border")?;
    wait_exit(HOST_NET, "border")?;
    wait_exit(FRIEND_NET, "border2")?;
    reach(INTERNET_HOST)?;
    reach(FRIEND_HOST)?;
    // Prefixes are routes of their own into the tunnel (the default goes
    // through the egress table).
    for net in [HOST_NET, FRIEND_NET] {
        let route = lab.exec(node, &["ip", "route", "show", net])?;
        ensure!(route.contains(&n1.interface), "n1: {net}: {route}");
    }
    assert_eq!(first_hop(INTERNET_HOST)?, first);
    assert_eq!(first_hop(FRIEND_HOST)?, second);

    // The friend's session goes: its prefix leaves the mesh, the rest stays.
    let friend = world.friend.as_ref().expect("a friend");
    let started = std::time::Instant::now();
    friend.cli(&["bgp", "disable", "border2"])?;
    wait_until(
        Duration::from_secs(10),
        "n1's route to the friend to go",
        || {
            let route = lab.exec(node, &["ip", "route", "show", FRIEND_NET])?;
            ensure!(route.trim().is_empty(), "{route}");
            Ok(())
        },
    )?;
    eprintln!(
        "friend's session down: its prefix out of n1's routes after {:.3} s",
        started.elapsed().as_secs_f64()
    );
    wait_ranges("border2", &["0.0.0.0/0", HOST_NET])?;
    wait_exit(FRIEND_NET, "none")?;
    ping(&lab, node, INTERNET_HOST)?;
    friend.cli(&["bgp", "enable", "border2"])?;
    wait_ranges("border2", &["0.0.0.0/0", HOST_NET, FRIEND_NET])?;
    wait_exit(FRIEND_NET, "border2")?;
    reach(FRIEND_HOST)?;

    // The first border's upstream goes: what it offered moves to the
    // second border, and traffic with it.
    let started = std::time::Instant::now();
    world.border.daemon.cli(&["bgp", "disable", "isp"])?;
    wait_exit(HOST_NET, "border2")?;
    eprintln!(
        "first border's upstream down: {HOST_NET} on the second border after {:.3} s",
        started.elapsed().as_secs_f64()
    );
    wait_ranges("border", &[])?;
    wait_exit("0.0.0.0/0", "border2")?;
    reach(INTERNET_HOST)?;
    assert_eq!(first_hop(INTERNET_HOST)?, second);
    world.border.daemon.cli(&["bgp", "enable", "isp"])?;
    wait_ranges("border", &["0.0.0.0/0", HOST_NET])?;
    wait_exit(HOST_NET, "border")?;
    reach(INTERNET_HOST)?;
    assert_eq!(first_hop(INTERNET_HOST)?, first);
    Ok(())
}

/// A border that dies without closing anything (it drops every packet, as
/// a machine that lost power): the ISP notices by BFD, the controller by
/// the border's missing pulses, and a mesh node pinging the Internet host
/// every 20 ms moves to the second border within a second. When the first
/// border's packets flow again, the node goes back to it.
#[test]
fn a_border_that_goes_silent_is_left_within_a_second() -> Result<()> {
    if !can_run!(&["wg", "ping", "nft"],) {
        return Ok(());
    }
    let lab = Lab::new("own-as-silent-border")?;
    // BFD between the ISP and the borders is the lab's default.
    let world = OwnAs::start(&lab, &OwnAsOptions::new(BIN, 1, IspKind::Bgp4mesh, 2))?;
    world.wait_bgp(Duration::from_secs(30))?;
    wait_second_border(&world)?;
    let node = world.nodes[0].daemon.node();
    wait_until(
        Duration::from_secs(30),
        "n1 reaching the Internet host",
        || ping(&lab, node, INTERNET_HOST),
    )?;
    wait_until(Duration::from_secs(10), "n1 on the first border", || {
        let exit = exit_for(&lab, &world, 0, "0.0.0.0/0")?;
        ensure!(exit == "border", "on {exit}");
        Ok(())
    })?;
    let started = now_unix();
    let flood = ping_flood(&lab, node, 6)?;
    std::thread::sleep(Duration::from_secs(2));
    world.silence(world.border.daemon.node(), true)?;
    let out = flood_output(&lab, &flood)?;
    let (gap, lost) = loss_window(&out, started);
    eprintln!("border silent: longest gap {gap:.3} s, {lost} pings lost");
    // The goal (< 1 s) is a figure measured alone (BENCHMARKS.md: 0.50-0.65
    // s); detection is by timers here (BFD, the 600 ms pulse timeout), so
    // under a busy CI machine running tests side by side the bound is what
    // tells "noticed by the pulses" from "noticed by a TCP timeout" (minutes).
    ensure!(
        gap < 2.0,
        "failover from a silent border took {gap:.3} s:\n{out}"
    );
    assert_eq!(exit_for(&lab, &world, 0, "0.0.0.0/0")?, "border2");

    // Its packets flow again: BGP comes back, and so does the node.
    world.silence(world.border.daemon.node(), false)?;
    wait_until(
        Duration::from_secs(30),
        "n1 back on the first border",
        || {
            let exit = exit_for(&lab, &world, 0, "0.0.0.0/0")?;
            ensure!(exit == "border", "on {exit}");
            Ok(())
        },
    )?;
    wait_until(
        Duration::from_secs(10),
        "n1 reaching the Internet host again",
        || ping(&lab, node, INTERNET_HOST),
    )?;
    Ok(())
}

/// A border whose daemon hangs (SIGSTOP: its BGP sessions, BFD, pulses and
/// WireGuard device all stop, and the kernel closes nothing, so the ISP's
/// TCP session looks alive). The Internet host pings a mesh node every
/// 20 ms (ingress) and the node pings the Internet host (egress). The ISP
/// leaves the border by BFD, the controller by its missing pulses; the
/// longest gap in each direction is printed (BENCHMARKS.md). The daemon
/// goes on (SIGCONT): the node and the ISP come back to it.
#[test]
fn a_hung_border_is_left_by_the_isp_within_a_second() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    hung_border(IspKind::Bgp4mesh, true)
}

#[test]
fn a_hung_border_is_left_by_a_bird_isp_within_a_second() -> Result<()> {
    if !can_run!(&["wg", "ping", "bird", "birdc"]) {
        return Ok(());
    }
    hung_border(IspKind::Bird, true)
}

/// The same without BFD towards the ISP (`lab up --isp-bfd off`): the ISP
/// keeps sending the node's traffic to the hung border until its hold
/// timer (90 s) expires. Ignored: it lasts that long
/// (`cargo nextest run --test own_as --run-ignored only hung`).
#[test]
#[ignore = "lasts the ISP's hold time (90 s); BENCHMARKS.md"]
fn a_hung_border_without_isp_bfd_holds_ingress_until_the_hold_timer() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    hung_border(IspKind::Bgp4mesh, false)
}

/// The border the ISP's route to `address` goes through, from its kernel.
fn isp_next_hop(lab: &Lab, world: &OwnAs<'_>, address: &str) -> Result<&'static str> {
    use bgp4mesh_lab::own_as::{BORDER_PEERING, BORDER2_PEERING};
    let route = lab.exec(&world.isp_node, &["ip", "route", "get", address])?;
    Ok(if route.contains(&format!("via {BORDER_PEERING} ")) {
        "border"
    } else if route.contains(&format!("via {BORDER2_PEERING} ")) {
        "border2"
    } else {
        "none"
    })
}

fn hung_border(isp: IspKind, isp_bfd: bool) -> Result<()> {
    let lab = Lab::new(&format!(
        "own-as-hung-{}{}",
        if isp == IspKind::Bird { "bird" } else { "ours" },
        if isp_bfd { "" } else { "-nobfd" }
    ))?;
    let world = OwnAs::start(
        &lab,
        &OwnAsOptions {
            isp_bfd,
            ..OwnAsOptions::new(BIN, 1, isp, 2)
        },
    )?;
    world.wait_bgp(Duration::from_secs(30))?;
    wait_second_border(&world)?;
    let n1 = world.nodes[0].daemon.node();
    let address = world.nodes[0].address.to_string();
    wait_until(Duration::from_secs(30), "n1 on the first border", || {
        let exit = exit_for(&lab, &world, 0, "0.0.0.0/0")?;
        ensure!(exit == "border", "on {exit}");
        ensure!(
            isp_next_hop(&lab, &world, &address)? == "border",
            "the ISP sends {address} elsewhere"
        );
        ping(&lab, n1, INTERNET_HOST)?;
        ping(&lab, &world.internet, &address)
    })
    .map_err(|e| e.context(dump_paths(&lab, &world)))?;
    let daemon = world.border.daemon.proc();
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", daemon.pid))?;
    ensure!(
        comm.trim() == "bgp4mesh",
        "pid {} is {comm:?}, not the border's daemon",
        daemon.pid
    );

    // Without BFD the ISP waits for its hold timer: up to 90 s.
    let seconds = if isp_bfd { 6 } else { 100 };
    let started = now_unix();
    let ingress = ping_flood_to(&lab, &world.internet, &address, seconds)?;
    let egress = ping_flood(&lab, n1, seconds)?;
    std::thread::sleep(Duration::from_secs(2));
    lab.signal(daemon, libc::SIGSTOP)?;
    let hung = std::time::Instant::now();
    let result = (|| -> Result<()> {
        wait_until(
            Duration::from_secs(u64::from(seconds) + 30),
            "the ping floods to end",
            || {
                ensure!(
                    !lab.is_running(&ingress) && !lab.is_running(&egress),
                    "still pinging"
                );
                Ok(())
            },
        )?;
        let ingress_out = std::fs::read_to_string(&ingress.log)?;
        let egress_out = std::fs::read_to_string(&egress.log)?;
        let (in_gap, in_lost) = loss_window(&ingress_out, started);
        let (out_gap, out_lost) = loss_window(&egress_out, started);
        eprintln!(
            "border hung ({isp:?} ISP, ISP BFD {}): ingress (Internet host → n1) longest gap \
             {in_gap:.3} s, {in_lost} pings lost; egress (n1 → Internet host) longest gap \
             {out_gap:.3} s, {out_lost} pings lost",
            if isp_bfd { "on" } else { "off" }
        );
        // While it hangs, the ISP sends the block to the second border and
        // the node leaves by it.
        ensure!(
            isp_next_hop(&lab, &world, &address)? == "border2",
            "the ISP still sends {address} to the hung border"
        );
        ensure!(
            exit_for(&lab, &world, 0, "0.0.0.0/0")? == "border2",
            "n1 still leaves by the hung border"
        );
        if isp_bfd {
            // What BFD fixes: ingress. (Egress is the controller's pulse
            // timeout: printed, BENCHMARKS.md.) Alone the figure is
            // 0.52-0.62 s; the bound leaves room for a loaded machine (CI
            // runs the suite in parallel on 2 cores), as the silent-border
            // test's does. Without BFD it is the ISP's hold time (87 s).
            ensure!(
                in_gap < 2.0,
                "ingress failover from a hung border took {in_gap:.3} s:\n{ingress_out}"
            );
        } else {
            ensure!(
                in_gap > 5.0,
                "without BFD the ISP left the hung border after {in_gap:.3} s"
            );
        }
        Ok(())
    })();
    let frozen_for = hung.elapsed();
    lab.signal(daemon, libc::SIGCONT)?;
    result.map_err(|e| e.context(dump_paths(&lab, &world)))?;

    // It goes on: the ISP and the node come back to it.
    wait_until(Duration::from_secs(30), "back on the first border", || {
        let exit = exit_for(&lab, &world, 0, "0.0.0.0/0")?;
        ensure!(exit == "border", "n1 on {exit}");
        let isp_to = isp_next_hop(&lab, &world, &address)?;
        ensure!(isp_to == "border", "the ISP sends {address} to {isp_to}");
        Ok(())
    })
    .map_err(|e| {
        e.context(format!(
            "{}== border's log\n{}",
            dump_paths(&lab, &world),
            lab.log_tail(daemon, 60)
        ))
    })?;
    wait_until(Duration::from_secs(10), "both ways again", || {
        ping(&lab, n1, INTERNET_HOST)?;
        ping(&lab, &world.internet, &address)
    })?;
    eprintln!(
        "hung for {:.1} s; back on the first border",
        frozen_for.as_secs_f64()
    );
    Ok(())
}

/// A border whose mesh breaks: its WireGuard underlay is cut (UDP dropped
/// in and out, BFD's ports kept), while its BGP session with the ISP, BFD
/// and its controller link stay up, so neither the ISP nor the controller's
/// pulses see anything wrong. Its probes through the mesh go unanswered:
/// it withdraws the block (ingress moves to the second border) and says so
/// in its pulses, and the node's probes of its exit go unanswered too (it
/// moves its default route on its own). The Internet host pings the node
/// every 20 ms and the node the Internet host; the longest gaps are printed
/// (BENCHMARKS.md). Then the mesh is mended and both come back.
#[test]
fn a_border_whose_mesh_breaks_is_left_within_a_second() -> Result<()> {
    if !can_run!(&["wg", "ping", "nft"]) {
        return Ok(());
    }
    let lab = Lab::new("own-as-mesh-cut")?;
    let world = start_on_first_border(&lab)?;
    let border = world.border.daemon.node();
    left_and_back(
        &lab,
        &world,
        "border's mesh",
        || world.cut_mesh(border, true),
        || world.cut_mesh(border, false),
    )
}

/// The first border fails (`fail`, 2 s into ping floods both ways): the
/// ISP and n1 must both be on the second border by the end, each way having
/// lost under a second (the bound leaves room for a loaded CI machine; the
/// figures alone are in BENCHMARKS.md). Then `mend`, measured the same way
/// ([`mend_measured`]), and both ways back on the first border. The
/// longest gaps are printed as `what` cut / mended.
fn left_and_back(
    lab: &Lab,
    world: &OwnAs<'_>,
    what: &str,
    fail: impl FnOnce() -> Result<()>,
    mend: impl Fn() -> Result<()>,
) -> Result<()> {
    let address = world.nodes[0].address.to_string();
    let result = (|| -> Result<()> {
        let gaps = floods_across(lab, world, fail)?;
        eprintln!("{what} cut: {gaps}");
        let isp_to = isp_next_hop(lab, world, &address)?;
        ensure!(
            isp_to == "border2",
            "the ISP still sends {address} to {isp_to}"
        );
        let exit = exit_for(lab, world, 0, "0.0.0.0/0")?;
        ensure!(exit == "border2", "n1 still leaves by {exit}");
        ensure!(
            gaps.ingress < 2.0,
            "ingress took {:.3} s:\n{}",
            gaps.ingress,
            gaps.ingress_out
        );
        ensure!(
            gaps.egress < 2.0,
            "egress took {:.3} s:\n{}",
            gaps.egress,
            gaps.egress_out
        );
        Ok(())
    })();
    if let Err(e) = result {
        mend()?;
        return Err(e.context(format!(
            "{}== border's log\n{}",
            dump_paths(lab, world),
            lab.log_tail(world.border.daemon.proc(), 60)
        )));
    }
    mend_measured(lab, world, what, &mend).map_err(|e| e.context(dump_paths(lab, world)))?;
    wait_back_on_first_border(lab, world, Duration::from_secs(30))
}

/// Two nodes (a gateway judges its mesh by two peers at least), BGP up on
/// both borders, and n1 on the first border both ways: its exit, the ISP's
/// route to it, and pings each way.
fn start_on_first_border<'lab>(lab: &'lab Lab) -> Result<OwnAs<'lab>> {
    let world = OwnAs::start(lab, &OwnAsOptions::new(BIN, 2, IspKind::Bgp4mesh, 2))?;
    world.wait_bgp(Duration::from_secs(30))?;
    wait_second_border(&world)?;
    wait_back_on_first_border(lab, &world, Duration::from_secs(30))?;
    Ok(world)
}

/// Waits until n1 leaves by the first border, the ISP sends n1's address to
/// it, and pings go through both ways.
fn wait_back_on_first_border(lab: &Lab, world: &OwnAs<'_>, timeout: Duration) -> Result<()> {
    let n1 = world.nodes[0].daemon.node();
    let address = world.nodes[0].address.to_string();
    wait_until(timeout, "n1 on the first border both ways", || {
        let exit = exit_for(lab, world, 0, "0.0.0.0/0")?;
        ensure!(exit == "border", "n1 leaves by {exit}");
        let isp_to = isp_next_hop(lab, world, &address)?;
        ensure!(isp_to == "border", "the ISP sends {address} to {isp_to}");
        ping(lab, n1, INTERNET_HOST)?;
        ping(lab, &world.internet, &address)
    })
    .map_err(|e| {
        e.context(format!(
            "{}== border's log\n{}",
            dump_paths(lab, world),
            lab.log_tail(world.border.daemon.proc(), 60)
        ))
    })
}

/// Ping floods both ways between the Internet host and n1 for 6 s, with
/// `fail` done 2 s in; the longest gaps (ingress, egress) and both outputs,
/// once the floods are over (`fail` still in force).
fn floods_across(lab: &Lab, world: &OwnAs<'_>, fail: impl FnOnce() -> Result<()>) -> Result<Gaps> {
    floods_across_for(lab, world, 6, fail)
}

/// [`floods_across`] for `seconds`.
fn floods_across_for(
    lab: &Lab,
    world: &OwnAs<'_>,
    seconds: u32,
    fail: impl FnOnce() -> Result<()>,
) -> Result<Gaps> {
    let n1 = world.nodes[0].daemon.node();
    let address = world.nodes[0].address.to_string();
    let started = now_unix();
    let ingress = ping_flood_to(lab, &world.internet, &address, seconds)?;
    let egress = ping_flood(lab, n1, seconds)?;
    std::thread::sleep(Duration::from_secs(2));
    fail()?;
    wait_until(Duration::from_secs(40), "the ping floods to end", || {
        ensure!(
            !lab.is_running(&ingress) && !lab.is_running(&egress),
            "still pinging"
        );
        Ok(())
    })?;
    let ingress_out = std::fs::read_to_string(&ingress.log)?;
    let egress_out = std::fs::read_to_string(&egress.log)?;
    let (ingress_gap, ingress_lost) = loss_window(&ingress_out, started);
    let (egress_gap, egress_lost) = loss_window(&egress_out, started);
    Ok(Gaps {
        ingress: ingress_gap,
        ingress_lost,
        ingress_out,
        egress: egress_gap,
        egress_lost,
        egress_out,
    })
}

/// Mends a failure of the first border with ping floods both ways across
/// the mend (15 s, the mend 2 s in), prints the longest gaps as `what`,
/// and checks that by the end both directions are back on the first
/// border (it is the preferred one) having lost under a second (the bound
/// leaves room for a loaded CI machine, as the failovers' do).
fn mend_measured(
    lab: &Lab,
    world: &OwnAs<'_>,
    what: &str,
    mend: impl FnOnce() -> Result<()>,
) -> Result<()> {
    let gaps = floods_across_for(lab, world, 15, mend)?;
    eprintln!("{what} mended: {gaps}");
    let address = world.nodes[0].address.to_string();
    let exit = exit_for(lab, world, 0, "0.0.0.0/0")?;
    let isp_to = isp_next_hop(lab, world, &address)?;
    ensure!(
        exit == "border" && isp_to == "border",
        "13 s after the mend n1 leaves by {exit} and the ISP sends {address} to {isp_to}"
    );
    ensure!(
        gaps.ingress < 2.0,
        "coming back lost ingress for {:.3} s:\n{}",
        gaps.ingress,
        gaps.ingress_out
    );
    ensure!(
        gaps.egress < 2.0,
        "coming back lost egress for {:.3} s:\n{}",
        gaps.egress,
        gaps.egress_out
    );
    Ok(())
}

/// What a pair of ping floods saw: the longest gap without a reply each
/// way (seconds), the pings lost, and `ping`'s output.
struct Gaps {
    ingress: f64,
    ingress_lost: usize,
    ingress_out: String,
    egress: f64,
    egress_lost: usize,
    egress_out: String,
}

impl std::fmt::Display for Gaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ingress (Internet host → n1) longest gap {:.3} s, {} pings lost; egress (n1 → \
             Internet host) longest gap {:.3} s, {} pings lost",
            self.ingress, self.ingress_lost, self.egress, self.egress_lost
        )
    }
}

/// A border whose link to the ISP drops every packet both ways while the
/// link stays up: only BFD tells, on both ends. The ISP leaves the border
/// by its BFD (ingress moves to the second border); the border's own BFD
/// takes its session down, it reports its upstream lost, and the
/// controller moves the nodes' exit to the second border (egress). The
/// longest gaps of 20 ms ping floods each way are printed. Then the link
/// is mended: BGP comes back and so do the ISP and the node.
#[test]
fn a_border_whose_isp_link_is_cut_is_left_within_a_second() -> Result<()> {
    if !can_run!(&["wg", "ping", "nft"]) {
        return Ok(());
    }
    let lab = Lab::new("own-as-isp-link-cut")?;
    let world = start_on_first_border(&lab)?;
    let link = world
        .border
        .isp_link
        .as_ref()
        .context("the border's link to the ISP")?;
    left_and_back(
        &lab,
        &world,
        "border's ISP link",
        || world.cut_link(link, true),
        || world.cut_link(link, false),
    )
}

/// A border cut off from the controller only (every packet between them
/// dropped on the border): its pulses stop and the controller no longer
/// hears it, but its data plane is whole. The node's own probes of its
/// exit are answered, so it keeps the border as its exit (a gateway the
/// controller does not hear stays the exit of the nodes whose probes it
/// answers, docs/controller.md), and the ISP keeps sending the block to
/// it: neither direction notices. The longest gaps of 20 ms ping floods
/// each way are printed. Before, the controller moved the node to the
/// second border, whose ingress did not come, and both ways stopped for
/// the whole cut.
#[test]
fn a_border_whose_controller_link_is_cut_keeps_carrying_traffic() -> Result<()> {
    if !can_run!(&["wg", "ping", "nft"]) {
        return Ok(());
    }
    let lab = Lab::new("own-as-controller-cut")?;
    let world = start_on_first_border(&lab)?;
    let address = world.nodes[0].address.to_string();
    let border = world.border.daemon.node();
    let controller = world.controller_address;
    let result = (|| -> Result<()> {
        let gaps = floods_across(&lab, &world, || world.cut_address(border, controller, true))?;
        eprintln!("border cut from the controller: {gaps}");
        ensure!(
            exit_for(&lab, &world, 0, "0.0.0.0/0")? == "border",
            "n1 left the border whose data plane is whole"
        );
        ensure!(
            isp_next_hop(&lab, &world, &address)? == "border",
            "the ISP left the border, whose BGP session is up"
        );
        ensure!(
            gaps.egress < 2.0,
            "egress took {:.3} s:\n{}",
            gaps.egress,
            gaps.egress_out
        );
        ensure!(
            gaps.ingress < 2.0,
            "ingress through the border stopped for {:.3} s:\n{}",
            gaps.ingress,
            gaps.ingress_out
        );
        Ok(())
    })();
    world.cut_address(border, controller, false)?;
    result.map_err(|e| {
        e.context(format!(
            "{}== border's log\n{}",
            dump_paths(&lab, &world),
            lab.log_tail(world.border.daemon.proc(), 60)
        ))
    })?;

    // Mended: its pulses reach the controller again; all stays as it was.
    wait_back_on_first_border(&lab, &world, Duration::from_secs(30))
}

/// Waits until a border's session `name` with the ISP is Established.
fn wait_session(border: &bgp4mesh_lab::own_as::MeshNode<'_>, name: &str) -> Result<()> {
    wait_until(
        Duration::from_secs(30),
        &format!("{}'s session {name}", border.name),
        || {
            let state = border.daemon.bgp_state(name)?;
            ensure!(
                state == bgp4mesh_lab::peers::SessionState::Established,
                "{state:?}"
            );
            Ok(())
        },
    )
}

/// Two dual-stack borders, the first preferred. n1 pings the Internet
/// host every 20 ms over IPv6 and over IPv4 while the first border's IPv6
/// session with the ISP (`isp6`) is shut: IPv6 moves to the second border
/// (the first reports no IPv6 upstream, n1 picks its IPv6 exit alone)
/// within 3 s, while IPv4 stays on the first border without a gap. Then
/// the IPv4 session goes too and IPv4 moves.
#[test]
fn ipv6_moves_to_the_second_border_when_the_first_loses_its_ipv6_session() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    let lab = Lab::new("own-as-ipv6-session")?;
    let world = OwnAs::start(&lab, &OwnAsOptions::new(BIN, 1, IspKind::Bgp4mesh, 2))?;
    world.wait_bgp(Duration::from_secs(30))?;
    let border2 = world.border2.as_ref().context("two borders")?;
    wait_session(border2, "isp")?;
    wait_session(border2, "isp6")?;
    let n1 = world.nodes[0].daemon.node();
    let wait_exits = |v4: &str, v6: &str| -> Result<()> {
        wait_until(
            Duration::from_secs(30),
            &format!("n1 leaving by {v4} (IPv4) and {v6} (IPv6)"),
            || {
                let (e4, e6) = (
                    exit_for(&lab, &world, 0, "0.0.0.0/0")?,
                    exit_for(&lab, &world, 0, "::/0")?,
                );
                ensure!(e4 == v4 && e6 == v6, "IPv4 by {e4}, IPv6 by {e6}");
                ping(&lab, n1, INTERNET_HOST)?;
                ping(&lab, n1, INTERNET_HOST6)
            },
        )
        .map_err(|e| e.context(dump_paths(&lab, &world)))
    };
    wait_exits("border", "border")?;

    // 1. The first border's IPv6 session goes.
    let started = now_unix();
    let flood6 = lab.spawn(
        n1,
        "ping-flood6",
        &[
            "ping",
            "-D",
            "-i",
            "0.02",
            "-W",
            "1",
            "-c",
            "400",
            INTERNET_HOST6,
        ],
    )?;
    let flood4 = ping_flood(&lab, n1, 8)?;
    std::thread::sleep(Duration::from_secs(2));
    world.border.daemon.cli(&["bgp", "disable", "isp6"])?;
    let out6 = flood_output(&lab, &flood6)?;
    let out4 = flood_output(&lab, &flood4)?;
    let (gap6, lost6) = loss_window(&out6, started);
    let (gap4, lost4) = loss_window(&out4, started);
    eprintln!(
        "first border's IPv6 session down: IPv6 longest gap {gap6:.3} s, {lost6} pings lost; \
         IPv4 longest gap {gap4:.3} s, {lost4} pings lost"
    );
    ensure!(gap6 < 3.0, "IPv6 moved after {gap6:.3} s:\n{out6}");
    ensure!(gap4 < 1.0, "IPv4 stopped for {gap4:.3} s:\n{out4}");
    ensure!(
        exit_for(&lab, &world, 0, "::/0")? == "border2",
        "IPv6 not on the second border: {}",
        dump_paths(&lab, &world)
    );
    ensure!(
        exit_for(&lab, &world, 0, "0.0.0.0/0")? == "border",
        "IPv4 left the first border: {}",
        dump_paths(&lab, &world)
    );
    // The node says so itself: which gateway serves each family.
    let shown = world.nodes[0].daemon.cli(&["show", "mesh"])?;
    ensure!(
        shown.contains("default route: IPv4 via border, IPv6 via border2"),
        "{shown}"
    );
    // The Internet host reaches n1 over IPv6 through the second border.
    let address6 = world.nodes[0].address6.context("IPv6")?.to_string();
    wait_until(
        Duration::from_secs(10),
        "the Internet host reaching n1 over IPv6",
        || ping(&lab, &world.internet, &address6),
    )?;

    // 2. Its IPv4 session goes too: IPv4 moves.
    let started = now_unix();
    let flood4 = ping_flood(&lab, n1, 8)?;
    std::thread::sleep(Duration::from_secs(2));
    world.border.daemon.cli(&["bgp", "disable", "isp"])?;
    let out4 = flood_output(&lab, &flood4)?;
    let (gap4, lost4) = loss_window(&out4, started);
    eprintln!("first border's IPv4 session down: IPv4 longest gap {gap4:.3} s, {lost4} pings lost");
    ensure!(gap4 < 3.0, "IPv4 moved after {gap4:.3} s:\n{out4}");
    wait_exits("border2", "border2")?;

    // 3. Both come back: so does n1.
    world.border.daemon.cli(&["bgp", "enable", "isp6"])?;
    world.border.daemon.cli(&["bgp", "enable", "isp"])?;
    wait_exits("border", "border")
}

/// An IPv6-only AS (`--ipv6-only`): the /48 alone over the IPv6 sessions,
/// no IPv4 in the mesh; the Internet host and the nodes reach each other,
/// and the nodes each other.
#[test]
fn an_ipv6_only_as_works_end_to_end() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    let lab = Lab::new("own-as-ipv6-only")?;
    let world = OwnAs::start(
        &lab,
        &OwnAsOptions {
            families: Families::Ipv6Only,
            ..OwnAsOptions::new(BIN, 2, IspKind::Bgp4mesh, 1)
        },
    )?;
    world.wait_bgp(Duration::from_secs(30))?;
    let routes = match &world.isp {
        bgp4mesh_lab::own_as::Isp::Bgp4mesh(d) => d.routes()?,
        bgp4mesh_lab::own_as::Isp::Bird(b) => b.routes()?,
    };
    ensure!(
        best_route(&routes, BLOCK).is_none(),
        "an IPv4 block at the ISP: {routes:?}"
    );
    let protocols = world.border.daemon.cli(&["show", "protocols"])?;
    ensure!(
        protocols.contains("isp6") && !protocols.lines().any(|l| l.starts_with("isp ")),
        "{protocols}"
    );
    both_ways_over_ipv6(&lab, &world)?;
    for (i, n) in world.nodes.iter().enumerate() {
        ensure!(n.address.is_unspecified(), "{}: {}", n.name, n.address);
        let v4 = lab.exec(
            n.daemon.node(),
            &["ip", "-4", "addr", "show", "dev", &n.interface],
        )?;
        ensure!(v4.trim().is_empty(), "{}: IPv4 in the mesh: {v4}", n.name);
        ensure!(exit_for(&lab, &world, i, "::/0")? == "border");
        ensure!(exit_for(&lab, &world, i, "0.0.0.0/0")? == "none");
    }
    Ok(())
}
