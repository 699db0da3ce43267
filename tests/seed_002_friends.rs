//! Seed 002, friends joined by eBGP over two ISPs: bgp4mesh (AS 64514) and
//! a friend running BIRD (AS 64513), two sessions. Our import prefers ISP#1
//! (local-pref 200) and takes only 192.168.42.0/23{23,32}; our export
//! prepends 3 times. The preferred path wins, the backup takes over when
//! ISP#1 drops, and the friend sees the prepended path.

mod common;

use anyhow::{Result, ensure};
use bgp4mesh_lab::peers::{Bird, SessionState, best_route};
use bgp4mesh_lab::{Lab, can_run, wait_until};
use common::*;

#[test]
fn seed_002_preferred_isp_backup_and_prepend_with_a_bird_friend() -> Result<()> {
    if !can_run!(&["bird", "birdc"],) {
        return Ok(());
    }
    let lab = Lab::new("seed-002")?;
    let (me, remi) = (lab.add_node("me")?, lab.add_node("remi")?);
    let (m1, r1) = lab.link(&me, &remi)?; // over ISP#1
    let (m2, r2) = lab.link(&me, &remi)?; // over ISP#2
    let ours = start_ours(
        &lab,
        &me,
        64514,
        "192.168.0.1",
        &format!(
            r#"{isp1}{isp2}
[[bgp.static]]
prefix = "192.168.0.0/24"
blackhole = true

[policy.remi_in_isp1]
rules = [
  {{ match = {{ prefix = ["192.168.42.0/23{{23,32}}"] }}, set = {{ local_pref = 200 }}, action = "accept" }},
]

[policy.remi_in]
rules = [ {{ match = {{ prefix = ["192.168.42.0/23{{23,32}}"] }}, action = "accept" }} ]

[policy.out_aspath]
rules = [ {{ match = {{ source = ["static"] }}, set = {{ prepend = 3 }}, action = "accept" }} ]
"#,
            isp1 = our_neighbor(
                "remi-isp1",
                r1.ipv4.into(),
                64513,
                "import = \"remi_in_isp1\"\nexport = \"out_aspath\""
            ),
            isp2 = our_neighbor(
                "remi-isp2",
                r2.ipv4.into(),
                64513,
                "import = \"remi_in\"\nexport = \"out_aspath\""
            ),
        ),
    )?;
    let bird = Bird::start(
        &lab,
        &remi,
        &format!(
            r#"
router id 192.168.42.1;
protocol device {{}}
protocol static lan {{ ipv4; route 192.168.42.0/24 blackhole; route 192.168.44.0/24 blackhole; }}
template bgp friend {{
  local as 64513;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ import all; export where source = RTS_STATIC; }};
}}
protocol bgp isp1 from friend {{ neighbor {m1} as 64514; source address {r1}; }}
protocol bgp isp2 from friend {{ neighbor {m2} as 64514; source address {r2}; }}
"#,
            m1 = m1.ipv4,
            r1 = r1.ipv4,
            m2 = m2.ipv4,
            r2 = r2.ipv4
        ),
    )?;
    wait_until(SETTLE, "both sessions Established", || {
        let (a, b) = (ours.bgp_state("remi-isp1")?, ours.bgp_state("remi-isp2")?);
        ensure!(
            a == SessionState::Established && b == SessionState::Established,
            "isp1 {a}, isp2 {b}"
        );
        Ok(())
    })?;

    // Both paths arrive; ISP#1 wins on local-pref; 192.168.44.0/24 is filtered.
    wait_until(SETTLE, "two paths to 192.168.42.0/24", || {
        let n = ours
            .routes()?
            .iter()
            .filter(|r| r.prefix == "192.168.42.0/24")
            .count();
        ensure!(n == 2, "{n} paths");
        Ok(())
    })?;
    let routes = ours.routes()?;
    let best = best_route(&routes, "192.168.42.0/24").expect("a best path");
    assert_eq!(best.next_hop, Some(r1.ipv4.into()), "via ISP#1");
    assert_eq!(best.local_pref, Some(200));
    assert!(
        routes.iter().all(|r| r.prefix != "192.168.44.0/24"),
        "outside 192.168.42.0/23: filtered"
    );

    // The friend sees our LAN with AS 64514 four times (3 prepends + ours).
    let at_friend = wait_route("BIRD", "192.168.0.0/24", || bird.routes())?;
    assert_eq!(at_friend.as_path, vec![64514; 4]);

    // ISP#1 fails: the backup path takes over.
    lab.exec(&me, &["ip", "link", "set", &m1.name, "down"])?;
    ours.cli(&["bgp", "restart", "remi-isp1"])?;
    wait_until(SETTLE, "the backup path via ISP#2", || {
        let routes = ours.routes()?;
        let best = best_route(&routes, "192.168.42.0/24")
            .ok_or_else(|| anyhow::anyhow!("no route: {routes:?}"))?;
        ensure!(
            best.next_hop == Some(r2.ipv4.into()),
            "best via {:?}",
            best.next_hop
        );
        ensure!(
            best.local_pref.unwrap_or(100) == 100,
            "local-pref {:?}",
            best.local_pref
        );
        Ok(())
    })?;
    // ISP#1 is back: preferred again.
    lab.exec(&me, &["ip", "link", "set", &m1.name, "up"])?;
    wait_until(SETTLE, "the preferred path via ISP#1 again", || {
        let routes = ours.routes()?;
        let best =
            best_route(&routes, "192.168.42.0/24").ok_or_else(|| anyhow::anyhow!("no route"))?;
        ensure!(
            best.next_hop == Some(r1.ipv4.into()),
            "best via {:?}",
            best.next_hop
        );
        Ok(())
    })?;
    Ok(())
}
