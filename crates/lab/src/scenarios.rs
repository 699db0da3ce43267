//! Ready-made topologies, shared by tests and by `bgp4mesh lab demo`.

use std::time::Duration;

use anyhow::{Result, ensure};

use crate::peers::{Bird, Frr, Gobgp, SessionState};
use crate::{Iface, Lab, wait_until};

/// BIRD (AS 65001) — FRR `bgpd -Z` (AS 65002) — GoBGP (AS 65003) in a line,
/// eBGP between neighbours. BIRD originates [`Chain::PREFIX`] and
/// [`Chain::PREFIX6`] from static protocols `origin4` and `origin6`.
pub struct Chain<'lab> {
    pub bird: Bird<'lab>,
    pub frr: Frr<'lab>,
    pub gobgp: Gobgp<'lab>,
    /// BIRD's end and FRR's end of the first link.
    pub bird_link: (Iface, Iface),
    /// FRR's end and GoBGP's end of the second link.
    pub gobgp_link: (Iface, Iface),
}

impl<'lab> Chain<'lab> {
    pub const PREFIX: &'static str = "192.0.2.0/24";
    pub const PREFIX6: &'static str = "2001:db8:1::/48";

    /// Builds the three nodes and links and starts the three daemons.
    pub fn start(lab: &'lab Lab) -> Result<Chain<'lab>> {
        let (bird_node, frr_node, gobgp_node) = (
            lab.add_node("bird")?,
            lab.add_node("frr")?,
            lab.add_node("gobgp")?,
        );
        let (b, f1) = lab.link(&bird_node, &frr_node)?;
        let (f2, g) = lab.link(&frr_node, &gobgp_node)?;
        let bird = Bird::start(
            lab,
            &bird_node,
            &format!(
                r#"
router id {b4};
protocol device {{}}
protocol static origin4 {{ ipv4; route {prefix} blackhole; }}
protocol static origin6 {{ ipv6; route {prefix6} blackhole; }}
protocol bgp frr {{
  local {b4} as 65001;
  neighbor {f4} as 65002;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ import all; export where source = RTS_STATIC; }};
  ipv6 {{ next hop address {b6}; import all; export where source = RTS_STATIC; }};
}}
"#,
                prefix = Self::PREFIX,
                prefix6 = Self::PREFIX6,
                b4 = b.ipv4,
                b6 = b.ipv6,
                f4 = f1.ipv4
            ),
        )?;
        let frr = Frr::start(
            lab,
            &frr_node,
            &format!(
                r#"
frr defaults traditional
hostname frr
router bgp 65002
 bgp router-id {f4}
 no bgp ebgp-requires-policy
 neighbor {b4} remote-as 65001
 neighbor {b4} timers connect 1
 neighbor {g4} remote-as 65003
 neighbor {g4} timers connect 1
 address-family ipv4 unicast
  neighbor {b4} activate
  neighbor {g4} activate
 exit-address-family
 address-family ipv6 unicast
  neighbor {b4} activate
  neighbor {g4} activate
 exit-address-family
"#,
                f4 = f1.ipv4,
                b4 = b.ipv4,
                g4 = g.ipv4
            ),
        )?;
        let gobgp = Gobgp::start(
            lab,
            &gobgp_node,
            &format!(
                r#"
[global.config]
  as = 65003
  router-id = "{g4}"
[[neighbors]]
  [neighbors.config]
    neighbor-address = "{f4}"
    peer-as = 65002
  [neighbors.timers.config]
    connect-retry = 1
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
"#,
                g4 = g.ipv4,
                f4 = f2.ipv4
            ),
        )?;
        Ok(Chain {
            bird,
            frr,
            gobgp,
            bird_link: (b, f1),
            gobgp_link: (f2, g),
        })
    }

    /// The four session ends: BIRD→FRR, FRR→BIRD, FRR→GoBGP, GoBGP→FRR.
    pub fn session_states(&self) -> Result<[SessionState; 4]> {
        Ok([
            self.bird.bgp_state("frr")?,
            self.frr.bgp_state(&self.bird_link.0.ipv4.to_string())?,
            self.frr.bgp_state(&self.gobgp_link.1.ipv4.to_string())?,
            self.gobgp.bgp_state(&self.gobgp_link.0.ipv4.to_string())?,
        ])
    }

    /// Waits until every session is Established.
    pub fn wait_established(&self, timeout: Duration) -> Result<()> {
        wait_until(timeout, "all sessions of the chain Established", || {
            let states = self.session_states()?;
            ensure!(
                states.iter().all(|s| *s == SessionState::Established),
                "BIRD→FRR, FRR→BIRD, FRR→GoBGP, GoBGP→FRR: {states:?}"
            );
            Ok(())
        })
    }
}
