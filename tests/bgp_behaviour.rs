//! Behaviour against BIRD: RFC 8212 default deny, 4-octet AS numbers across
//! a 2-octet session, seed 000's iBGP with a next-hop-self edge router,
//! connected networks. (Hold timer, Bad Peer AS and route refresh run
//! against every peer in bgp_sessions.rs.)

mod common;

use std::time::Duration;

use anyhow::{Result, ensure};
use bgp4mesh_lab::peers::{Bird, Gobgp, SessionState, best_route};
use bgp4mesh_lab::{Lab, can_run, wait_until};
use common::*;

fn bird_peer(router_id: &str, asn: u32, me: &str, ours: &str, ours_as: u32, extra: &str) -> String {
    format!(
        r#"
router id {router_id};
protocol device {{}}
protocol static origin {{ ipv4; route 198.51.100.0/24 blackhole; }}
protocol bgp ours {{
  local {me} as {asn};
  neighbor {ours} as {ours_as};
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  {extra}
  ipv4 {{ import all; export where source = RTS_STATIC; }};
}}
"#
    )
}

/// RFC 8212: an eBGP neighbour with no import or export policy exchanges
/// nothing, though the session is up; `bgp4mesh check` warns.
#[test]
fn ebgp_without_policies_exchanges_nothing() -> Result<()> {
    if !can_run!(&["bird", "birdc"],) {
        return Ok(());
    }
    let lab = Lab::new("rfc8212")?;
    let (border, isp) = (lab.add_node("border")?, lab.add_node("isp")?);
    let (b, i) = lab.link(&border, &isp)?;
    let ours = start_ours(
        &lab,
        &border,
        65000,
        "10.255.0.1",
        &format!(
            "{}\n[[bgp.static]]\nprefix = \"44.30.127.0/24\"\nblackhole = true\n",
            our_neighbor("isp", i.ipv4.into(), 65001, "")
        ),
    )?;
    let bird = Bird::start(
        &lab,
        &isp,
        &bird_peer(
            "10.255.1.1",
            65001,
            &i.ipv4.to_string(),
            &b.ipv4.to_string(),
            65000,
            "",
        ),
    )?;
    wait_until(SETTLE, "Established", || {
        ensure!(
            ours.bgp_state("isp")? == SessionState::Established,
            "not yet"
        );
        Ok(())
    })?;
    // Give routes time to flow, if they were going to.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        ours.routes()?.iter().all(|r| r.prefix != "198.51.100.0/24"),
        "nothing imported"
    );
    assert!(
        bird.routes()?.iter().all(|r| r.prefix != "44.30.127.0/24"),
        "nothing exported"
    );
    let p = ours.protocol("isp")?;
    assert!(p["stats"]["filtered_in"].as_u64().unwrap_or(0) >= 1, "{p}");
    let check = lab.try_exec(
        &border,
        &[BIN, "check", "-c", &ours.config_path().to_string_lossy()],
    )?;
    assert!(check.success(), "{}", check.stderr);
    assert!(check.stderr.contains("RFC 8212"), "{}", check.stderr);
    Ok(())
}

fn gobgp_one_neighbor(asn: u32, router_id: &str, neighbor: &str, neighbor_as: u32) -> String {
    format!(
        r#"
[global.config]
  as = {asn}
  router-id = "{router_id}"
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{neighbor}"
    peer-as = {neighbor_as}
  [neighbors.timers.config]
    connect-retry = 1
"#
    )
}

/// 4-octet ASNs (RFC 6793) across a 2-octet session: GoBGP (AS
/// 4200000001) — BIRD (AS 65010, `enable as4 off` towards us) — bgp4mesh
/// (AS 65000) — GoBGP (AS 4200000002). We rebuild the real path from
/// AS_PATH + AS4_PATH coming in, and write AS_TRANS + AS4_PATH going out.
#[test]
fn four_octet_asns_cross_a_two_octet_session() -> Result<()> {
    if !can_run!(&["bird", "birdc", "gobgpd", "gobgp"],) {
        return Ok(());
    }
    let lab = Lab::new("as4-over-as2")?;
    let (far, old, border, cust) = (
        lab.add_node("far")?,
        lab.add_node("old")?,
        lab.add_node("border")?,
        lab.add_node("cust")?,
    );
    let (f, o1) = lab.link(&far, &old)?;
    let (o2, b1) = lab.link(&old, &border)?;
    let (b2, c) = lab.link(&border, &cust)?;
    let ours = start_ours(
        &lab,
        &border,
        65000,
        "10.255.0.1",
        &format!(
            "{}{}",
            our_neighbor(
                "old",
                o2.ipv4.into(),
                65010,
                "import = \"all\"\nexport = \"all\""
            ),
            our_neighbor(
                "cust",
                c.ipv4.into(),
                4_200_000_002,
                "import = \"all\"\nexport = \"all\""
            )
        ),
    )?;
    let bird = Bird::start(
        &lab,
        &old,
        &format!(
            r#"
router id 10.255.10.1;
protocol device {{}}
protocol bgp far {{
  local {o1} as 65010; neighbor {f} as 4200000001;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ import all; export all; }};
}}
protocol bgp ours {{
  local {o2} as 65010; neighbor {b1} as 65000;
  enable as4 off;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ import all; export all; }};
}}
"#,
            o1 = o1.ipv4,
            f = f.ipv4,
            o2 = o2.ipv4,
            b1 = b1.ipv4
        ),
    )?;
    let far_gobgp = Gobgp::start(
        &lab,
        &far,
        &gobgp_one_neighbor(4_200_000_001, "10.255.20.1", &o1.ipv4.to_string(), 65010),
    )?;
    let cust_gobgp = Gobgp::start(
        &lab,
        &cust,
        &gobgp_one_neighbor(4_200_000_002, "10.255.30.1", &b2.ipv4.to_string(), 65000),
    )?;
    far_gobgp.gobgp(&["global", "rib", "-a", "ipv4", "add", "198.51.100.0/24"])?;
    cust_gobgp.gobgp(&["global", "rib", "-a", "ipv4", "add", "203.0.113.0/24"])?;
    wait_until(SETTLE, "the 2-octet session up", || {
        ensure!(
            ours.bgp_state("old")? == SessionState::Established,
            "not yet"
        );
        Ok(())
    })?;
    let p = ours.protocol("old")?;
    assert_eq!(
        p["four_octet_as"], false,
        "BIRD did not offer 4-octet AS: {p}"
    );

    let at_ours = wait_route("bgp4mesh", "198.51.100.0/24", || ours.routes())?;
    assert_eq!(
        at_ours.as_path,
        vec![65010, 4_200_000_001],
        "rebuilt from AS_PATH + AS4_PATH"
    );
    let at_far = wait_route("GoBGP far away", "203.0.113.0/24", || far_gobgp.routes())?;
    assert_eq!(
        at_far.as_path,
        vec![65010, 65000, 4_200_000_002],
        "our AS4_PATH carried through BIRD"
    );
    let at_old = best_route(&bird.routes()?, "203.0.113.0/24")
        .cloned()
        .expect("BIRD has the customer route");
    assert_eq!(
        at_old.as_path,
        vec![65000, 4_200_000_002],
        "BIRD reads AS_TRANS + AS4_PATH back"
    );
    Ok(())
}

/// Seed 000: a VPS learns DN42's ~460 prefixes over iBGP from an edge
/// router (BIRD) doing next-hop-self; every one arrives with the edge as
/// next hop.
#[test]
fn seed_000_ibgp_learns_hundreds_of_routes_from_a_next_hop_self_edge() -> Result<()> {
    if !can_run!(&["bird", "birdc"],) {
        return Ok(());
    }
    let lab = Lab::new("seed-000")?;
    let prefixes: Vec<String> = (0..463)
        .map(|n| format!("172.20.{}.{}/28", n / 16, (n % 16) * 16))
        .collect();
    // Bound whole: the BIRDs stop when it is dropped.
    let chain = Dn42Chain::start(&lab, &prefixes, false)?;
    let Dn42Chain {
        vps, e1, edge_bird, ..
    } = &chain;
    let ours = start_ours(
        &lab,
        vps,
        4_242_421_869,
        "172.22.132.169",
        &our_neighbor("edge", e1.ipv4.into(), 4_242_421_869, ""),
    )?;
    wait_until(SETTLE, "all 463 DN42 prefixes at the VPS", || {
        let routes = ours.routes()?;
        ensure!(
            routes.len() == 463,
            "{} routes so far; edge: {:?}",
            routes.len(),
            edge_bird.bgp_state("vps")
        );
        Ok(())
    })?;
    let routes = ours.routes()?;
    assert!(
        routes.iter().all(|r| r.next_hop == Some(e1.ipv4.into())),
        "every route via the edge"
    );
    assert!(
        routes.iter().all(|r| r.as_path == vec![4_242_420_000]),
        "AS path of the DN42 peer"
    );
    assert!(routes.iter().all(|r| r.local_pref == Some(100)));
    Ok(())
}

/// `connected = ["*"]` originates our interfaces' networks (BIRD's
/// `protocol direct`); an address that goes away is withdrawn.
#[test]
fn connected_networks_are_originated_and_follow_the_interfaces() -> Result<()> {
    if !can_run!(&["bird", "birdc"],) {
        return Ok(());
    }
    let lab = Lab::new("connected")?;
    let (border, isp) = (lab.add_node("border")?, lab.add_node("isp")?);
    let (b, i) = lab.link(&border, &isp)?;
    lab.add_address(&border, "lo", "44.30.127.1/32")?;
    let _ours = start_ours(
        &lab,
        &border,
        65000,
        "10.255.0.1",
        &format!(
            "connected = [\"*\"]\n\n{}\n[policy.direct]\nrules = [ {{ match = {{ source = [\"connected\"] }}, action = \"accept\" }} ]\n",
            our_neighbor(
                "isp",
                i.ipv4.into(),
                65001,
                "import = \"none\"\nexport = \"direct\""
            )
        ),
    )?;
    let bird = Bird::start(
        &lab,
        &isp,
        &bird_peer(
            "10.255.1.1",
            65001,
            &i.ipv4.to_string(),
            &b.ipv4.to_string(),
            65000,
            "",
        ),
    )?;
    let route = wait_route("BIRD", "44.30.127.1/32", || bird.routes())?;
    assert_eq!(route.as_path, vec![65000]);
    let o = b.ipv4.octets();
    let link_network = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    assert!(
        bird.routes()?.iter().any(|r| r.prefix == link_network),
        "the link network {link_network} too"
    );
    lab.exec(
        &border,
        &["ip", "addr", "del", "44.30.127.1/32", "dev", "lo"],
    )?;
    wait_no_route("BIRD", "44.30.127.1/32", || bird.routes())?;
    Ok(())
}

/// `[kernel] learn = true` takes routes others put in the kernel (`ip route
/// add`) into BGP as `source = ["kernel"]`; a deleted one is withdrawn.
#[test]
fn kernel_routes_are_learnt_and_follow_the_table() -> Result<()> {
    if !can_run!(&["bird", "birdc"],) {
        return Ok(());
    }
    let lab = Lab::new("kernel-learn")?;
    let (border, isp, lan) = (
        lab.add_node("border")?,
        lab.add_node("isp")?,
        lab.add_node("lan")?,
    );
    let (b, i) = lab.link(&border, &isp)?;
    let (_, l) = lab.link(&border, &lan)?;
    let _ours = start_ours(
        &lab,
        &border,
        65000,
        "10.255.0.1",
        &format!(
            "{}\n[kernel]\nlearn = true\n\n[policy.learnt]\nrules = [ {{ match = {{ source = [\"kernel\"] }}, action = \"accept\" }} ]\n",
            our_neighbor(
                "isp",
                i.ipv4.into(),
                65001,
                "import = \"none\"\nexport = \"learnt\""
            )
        ),
    )?;
    let bird = Bird::start(
        &lab,
        &isp,
        &bird_peer(
            "10.255.1.1",
            65001,
            &i.ipv4.to_string(),
            &b.ipv4.to_string(),
            65000,
            "",
        ),
    )?;
    lab.add_route(&border, &["203.0.113.0/24", "via", &l.ipv4.to_string()])?;
    let route = wait_route("BIRD", "203.0.113.0/24", || bird.routes())?;
    assert_eq!(route.as_path, vec![65000]);
    let o = b.ipv4.octets();
    let link = format!("{}.{}.{}.0/24", o[0], o[1], o[2]);
    assert!(
        bird.routes()?.iter().all(|r| r.prefix != link),
        "interface routes are not learnt"
    );
    lab.exec(&border, &["ip", "route", "del", "203.0.113.0/24"])?;
    wait_no_route("BIRD", "203.0.113.0/24", || bird.routes())?;
    Ok(())
}
