//! bgp4mesh's BGP speaker against the real daemons, in network namespaces.

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, ensure};
use bgp4mesh_lab::peers::{Bgp4mesh, Bird, SessionState, best_route};
use bgp4mesh_lab::{Lab, can_run, wait_until};

const BIN: &str = env!("CARGO_BIN_EXE_bgp4mesh");
const SETTLE: Duration = Duration::from_secs(30);

fn bgp4mesh_config(asn: u32, router_id: &str, body: &str) -> String {
    format!(
        r#"[bgp]
asn = {asn}
router_id = "{router_id}"

{body}
"#
    )
}

/// eBGP with BIRD over IPv4 carrying IPv4 and IPv6: routes both ways with
/// MED, communities and large communities intact; withdrawals propagate.
#[test]
fn ebgp_with_bird_exchanges_routes_both_ways() -> Result<()> {
    if !can_run!(&["bird", "birdc"],) {
        return Ok(());
    }
    let lab = Lab::new("b4m-bird-ebgp")?;
    let (border, isp) = (lab.add_node("border")?, lab.add_node("isp")?);
    let (b, i) = lab.link(&border, &isp)?;

    let ours = Bgp4mesh::start(
        &lab,
        &border,
        Path::new(BIN),
        &bgp4mesh_config(
            65000,
            "10.255.0.1",
            &format!(
                r#"
[[bgp.neighbor]]
name = "isp"
address = "{isp4}"
remote_as = 65001
import = "all"
export = "announce"
next_hop_ipv6 = "{b6}"
connect_retry = 1
error_wait = [1, 5]

[[bgp.static]]
prefix = "44.30.127.0/24"
blackhole = true

[[bgp.static]]
prefix = "2001:db8:44::/48"
blackhole = true

[policy.announce]
rules = [ {{ match = {{ source = ["static"] }}, action = "accept" }} ]
"#,
                isp4 = i.ipv4,
                b6 = b.ipv6
            ),
        ),
    )?;
    let bird = Bird::start(
        &lab,
        &isp,
        &format!(
            r#"
router id {i4};
protocol device {{}}
protocol static customer4 {{ ipv4; route 198.51.100.0/24 blackhole; }}
protocol static customer6 {{ ipv6; route 2001:db8:100::/48 blackhole; }}
protocol bgp border {{
  local {i4} as 65001;
  neighbor {b4} as 65000;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  # BIRD sends MED to eBGP only when the export filter sets it.
  ipv4 {{ import all; export filter {{
    if source != RTS_STATIC then reject;
    bgp_med = 50; bgp_community.add((65001, 7)); bgp_large_community.add((65001, 1, 2));
    accept;
  }}; }};
  ipv6 {{ next hop address {i6}; import all; export where source = RTS_STATIC; }};
}}
"#,
            i4 = i.ipv4,
            i6 = i.ipv6,
            b4 = b.ipv4
        ),
    )?;

    wait_until(SETTLE, "the session Established on both sides", || {
        let (a, z) = (ours.bgp_state("isp")?, bird.bgp_state("border")?);
        ensure!(
            a == SessionState::Established && z == SessionState::Established,
            "bgp4mesh {a}, BIRD {z}"
        );
        Ok(())
    })?;

    // Ours at BIRD: AS path 65000, next hop our link address.
    for (prefix, hop) in [
        ("44.30.127.0/24", b.ipv4.to_string()),
        ("2001:db8:44::/48", b.ipv6.to_string()),
    ] {
        let route = wait_until(SETTLE, &format!("{prefix} at BIRD"), || {
            let routes = bird.routes()?;
            best_route(&routes, prefix)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("BIRD has {routes:?}"))
        })?;
        assert_eq!(route.as_path, vec![65000], "{prefix}");
        assert_eq!(route.next_hop.map(|h| h.to_string()), Some(hop), "{prefix}");
    }

    // BIRD's at ours, attributes intact.
    let route = wait_until(SETTLE, "198.51.100.0/24 at bgp4mesh", || {
        let routes = ours.routes()?;
        best_route(&routes, "198.51.100.0/24")
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("bgp4mesh has {routes:?}"))
    })?;
    assert_eq!(route.as_path, vec![65001]);
    assert_eq!(route.med, Some(50));
    assert_eq!(route.communities, vec!["65001:7"]);
    assert_eq!(route.large_communities, vec!["65001:1:2"]);
    assert_eq!(
        route.next_hop.map(|h| h.to_string()),
        Some(i.ipv4.to_string())
    );
    wait_until(SETTLE, "2001:db8:100::/48 at bgp4mesh", || {
        let routes = ours.routes()?;
        let r = best_route(&routes, "2001:db8:100::/48")
            .ok_or_else(|| anyhow::anyhow!("bgp4mesh has {routes:?}"))?;
        ensure!(
            r.next_hop == Some(i.ipv6.into()),
            "next hop {:?}",
            r.next_hop
        );
        Ok(())
    })?;
    // Only the statics are exported (the policy), not BIRD's own routes back.
    let exported = ours.exported_routes("isp")?;
    let mut prefixes: Vec<&str> = exported.iter().map(|r| r.prefix.as_str()).collect();
    prefixes.sort();
    assert_eq!(prefixes, vec!["2001:db8:44::/48", "44.30.127.0/24"]);

    // Withdraw on BIRD's side reaches us.
    bird.birdc("disable customer4")?;
    wait_until(SETTLE, "198.51.100.0/24 withdrawn at bgp4mesh", || {
        let routes = ours.routes()?;
        ensure!(
            !routes.iter().any(|r| r.prefix == "198.51.100.0/24"),
            "still {routes:?}"
        );
        Ok(())
    })?;
    // The operator shuts our side down: BIRD sees the shutdown and loses our routes.
    ours.cli(&["bgp", "disable", "isp", "--message", "maintenance"])?;
    wait_until(SETTLE, "BIRD to lose our routes", || {
        let routes = bird.routes()?;
        ensure!(
            !routes.iter().any(|r| r.prefix == "44.30.127.0/24"),
            "still {routes:?}"
        );
        Ok(())
    })?;
    let info = bird.birdc("show protocols all border")?;
    assert!(
        info.contains("maintenance") || info.contains("Administrative shutdown"),
        "{info}"
    );
    Ok(())
}

/// IPv6 routes over an IPv4 session with `next_hop_ipv6 = "auto"`: the
/// daemon takes the global IPv6 address of the interface towards the
/// neighbour at start, says so, and BIRD gets our /48 with it as next hop;
/// a reload finds it again. Where the interface has none (no route to the
/// neighbour at all here), `run` refuses to start, naming the neighbour.
#[test]
fn ipv6_over_ipv4_takes_the_interface_s_address_as_next_hop() -> Result<()> {
    if !can_run!(&["bird", "birdc"],) {
        return Ok(());
    }
    let lab = Lab::new("b4m-bird-nh6")?;
    let (border, isp) = (lab.add_node("border")?, lab.add_node("isp")?);
    let (b, i) = lab.link(&border, &isp)?;
    let config = |address: String| {
        bgp4mesh_config(
            65000,
            "10.255.0.1",
            &format!(
                r#"
[[bgp.neighbor]]
name = "isp"
address = "{address}"
remote_as = 65001
import = "all"
export = "announce"
next_hop_ipv6 = "auto"
connect_retry = 1
error_wait = [1, 5]

[[bgp.static]]
prefix = "2001:db8:44::/48"
blackhole = true

[policy.announce]
rules = [ {{ match = {{ prefix = ["2001:db8:44::/48"] }}, action = "accept" }} ]
"#
            ),
        )
    };
    let refused =
        match Bgp4mesh::start(&lab, &border, Path::new(BIN), &config("203.0.113.9".into())) {
            Ok(_) => anyhow::bail!("started with no interface towards the neighbour"),
            Err(e) => format!("{e:#}"),
        };
    ensure!(
        refused.contains(
            "neighbour \"isp\": next_hop_ipv6 = \"auto\" looks at the interface towards 203.0.113.9"
        ),
        "{refused}"
    );

    let ours = Bgp4mesh::start(&lab, &border, Path::new(BIN), &config(i.ipv4.to_string()))?;
    let bird = Bird::start(
        &lab,
        &isp,
        &format!(
            r#"
router id {i4};
protocol device {{}}
protocol bgp border {{
  local {i4} as 65001;
  neighbor {b4} as 65000;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ import all; export none; }};
  ipv6 {{ import all; export none; }};
}}
"#,
            i4 = i.ipv4,
            b4 = b.ipv4
        ),
    )?;
    let log = lab.log_tail(ours.proc(), 200);
    ensure!(
        log.contains(&format!(
            "neighbour isp: IPv6 next hop {}, from {} (the interface towards {}",
            b.ipv6, b.name, i.ipv4
        )),
        "{log}"
    );
    let at_bird = || {
        wait_until(SETTLE, "2001:db8:44::/48 at BIRD", || {
            let routes = bird.routes()?;
            let route = best_route(&routes, "2001:db8:44::/48")
                .ok_or_else(|| anyhow::anyhow!("BIRD has {routes:?}"))?;
            ensure!(
                route.next_hop == Some(b.ipv6.into()),
                "next hop {:?}",
                route.next_hop
            );
            Ok(())
        })
    };
    at_bird()?;
    ours.cli(&["bgp", "reload"])?;
    ensure!(
        ours.bgp_state("isp")? == SessionState::Established,
        "the session after reload"
    );
    at_bird()?;
    Ok(())
}
