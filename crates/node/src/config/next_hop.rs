//! IPv6 routes over an IPv4 session need an IPv6 next hop of ours, which
//! the session's own address cannot give: `next_hop_ipv6`. A neighbour
//! that may be sent such routes without one would only ever log that it
//! could not be (docs/configuration.md, "IPv6 over an IPv4 session"), so
//! the config is refused instead. Where the config itself holds the
//! answer (a `[[peering]]` with a global IPv6 address on its link), that
//! address is taken.
//!
//! Which routes may be sent is read from the config alone, erring on the
//! side of "may": a policy rule that accepts with no prefix condition or
//! with an IPv6 one, a policy that accepts by default, and any source of
//! IPv6 routes (an IPv6 static route, `bgp.connected`, `kernel.learn`,
//! another neighbour whose import may take IPv6 routes).

use std::net::{IpAddr, Ipv6Addr};

use anyhow::{Result, bail};
use bgp4mesh_bgp::policy::{Action, Policy, RouteSource, Verdict};
use bgp4mesh_bgp::speaker::NeighborConfig;
use bgp4mesh_bgp::wire::Family;

use super::BgpConfig;
use super::Peering;

/// What the export of an IPv6 route to a neighbour does with its next hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HopSet {
    /// Left as it came (the speaker puts ours where it must).
    Unchanged,
    /// Ours asked for (`next_hop = "self"`).
    OurSelf,
    /// An IPv6 address given by the policy: nothing of ours needed.
    Given,
}

/// The ways an export policy may accept an IPv6 route from `source`, by
/// what it does to the next hop (empty: it takes none).
fn accepts_ipv6(policy: &Policy, source: RouteSource) -> Vec<HopSet> {
    let mut ways = Vec::new();
    for rule in &policy.rules {
        let m = &rule.matches;
        let v6 = m.prefixes.is_empty() || m.prefixes.iter().any(|r| r.prefix.addr().is_ipv6());
        let from = m.sources.is_empty() || m.sources.contains(&source);
        if rule.verdict != Verdict::Accept || !v6 || !from {
            continue;
        }
        let hop = rule.set.iter().fold(HopSet::Unchanged, |hop, a| match a {
            Action::NextHopSelf => HopSet::OurSelf,
            Action::SetNextHop(IpAddr::V6(_)) => HopSet::Given,
            Action::SetNextHop(IpAddr::V4(_)) => HopSet::OurSelf,
            _ => hop,
        });
        ways.push(hop);
    }
    if policy.default == Verdict::Accept {
        ways.push(HopSet::Unchanged);
    }
    ways
}

/// A route that would go to the neighbour with a next hop of ours: where
/// it comes from, for the message.
fn ipv6_route_needing_ours(
    bgp: &BgpConfig,
    kernel_learn: bool,
    target: usize,
) -> Option<(String, &'static str)> {
    let neighbors = &bgp.speaker.neighbors;
    let n = &neighbors[target];
    let asn = bgp.speaker.asn;
    let ebgp = n.remote_as != asn;
    // Local routes always go with our next hop.
    let local_needs_ours = |source| {
        accepts_ipv6(&n.export, source)
            .iter()
            .any(|h| *h != HopSet::Given)
    };
    if let Some((i, s)) = bgp
        .speaker
        .statics
        .iter()
        .enumerate()
        .find(|(_, s)| s.prefix.addr().is_ipv6())
        && local_needs_ours(RouteSource::Static)
    {
        return Some((format!("bgp.static[{i}] ({})", s.prefix), "static"));
    }
    if !bgp.connected.is_empty() && local_needs_ours(RouteSource::Connected) {
        return Some(("bgp.connected".into(), "connected"));
    }
    if kernel_learn && local_needs_ours(RouteSource::Kernel) {
        return Some(("kernel.learn".into(), "kernel"));
    }
    // BGP-learned routes: eBGP puts ours always, iBGP only when asked.
    let ways = accepts_ipv6(&n.export, RouteSource::Bgp);
    let needs_ours = ways
        .iter()
        .any(|h| *h == HopSet::OurSelf || (*h == HopSet::Unchanged && (ebgp || n.next_hop_self)));
    if !needs_ours {
        return None;
    }
    neighbors
        .iter()
        .enumerate()
        .find(|(i, from)| {
            let ibgp_to_ibgp = from.remote_as == asn && !ebgp;
            *i != target
                && from.families.contains(&Family::IPV6_UNICAST)
                && !accepts_ipv6(&from.import, RouteSource::Bgp).is_empty()
                && !(ibgp_to_ibgp && !from.route_reflector_client && !n.route_reflector_client)
        })
        .map(|(_, from)| (format!("neighbour {:?}", from.name), "bgp"))
}

/// Gives each neighbour that needs one its IPv6 next hop from the config,
/// or refuses the config naming the neighbour and the key.
pub(super) fn settle_ipv6_next_hops(
    bgp: &mut BgpConfig,
    kernel_learn: bool,
    peerings: &[Peering],
) -> Result<()> {
    for i in 0..bgp.speaker.neighbors.len() {
        let n: &NeighborConfig = &bgp.speaker.neighbors[i];
        if !n.address.is_ipv4()
            || !n.families.contains(&Family::IPV6_UNICAST)
            || n.next_hop_ipv6.is_some()
        {
            continue;
        }
        let auto = bgp.next_hop_ipv6_auto.contains(&n.name);
        let peering = peerings.iter().enumerate().find(|(_, p)| p.name == n.name);
        let at = match peering {
            // A peering's neighbour has the peering's name.
            Some((k, _)) => format!("peering[{k}].bgp"),
            None => format!("bgp.neighbor[{i}]"),
        };
        // A peering's own global IPv6 address is on the link to the
        // neighbour: that is the next hop. Its interface is made after
        // BGP starts, so "auto" could find nothing else there.
        if let Some((_, p)) = peering {
            if let Some(ours) = global_ipv6(p) {
                let name = n.name.clone();
                bgp.speaker.neighbors[i].next_hop_ipv6 = Some(ours);
                bgp.next_hop_ipv6_auto.retain(|a| *a != name);
                continue;
            }
            if auto {
                bail!(
                    "{at}.next_hop_ipv6: \"auto\" finds nothing: the peering has no IPv6 address but link-local ones; add one to its address, or give next_hop_ipv6 an IPv6 address of this router"
                );
            }
        }
        // The daemon finds it at start.
        if auto {
            continue;
        }
        let Some((route, source)) = ipv6_route_needing_ours(bgp, kernel_learn, i) else {
            continue;
        };
        bail!(
            "{at}.next_hop_ipv6: neighbour {:?} has IPv6 unicast over an IPv4 session ({}) \
             and may be sent IPv6 routes ({route}, which its export policy {:?} accepts from \
             source \"{source}\"), but has no IPv6 next hop of ours to send with them: set \
             next_hop_ipv6 to an IPv6 address of this router that the neighbour reaches \
             (ours on the link to it), or to \"auto\" (a global IPv6 address of the \
             interface it is reached through, found at start), or families = [\"ipv4\"] \
             to send it no IPv6 routes",
            n.name,
            n.address,
            n.export.name,
        );
    }
    Ok(())
}

/// The peering's IPv6 address that is not link-local, if it has one.
fn global_ipv6(p: &Peering) -> Option<Ipv6Addr> {
    p.address.iter().find_map(|net| match net.addr() {
        IpAddr::V6(a) if !a.is_unicast_link_local() => Some(a),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use crate::config::{NodeConfig, assert_refused};
    use std::path::Path;

    const BASE: &str = "[bgp]\nasn = 65000\nrouter_id = \"10.0.0.1\"\n";

    /// The border of the issue: an ISP over IPv4, our IPv4 block and our
    /// IPv6 /48 as static routes, `extra` added to the neighbour.
    fn border(extra: &str, policy: &str) -> String {
        format!(
            "{BASE}[[bgp.neighbor]]\nname = \"isp\"\naddress = \"172.30.0.1\"\nremote_as = 65001\nimport = \"all\"\nexport = \"announce\"\n{extra}\n\
             [[bgp.static]]\nprefix = \"44.30.127.0/24\"\nblackhole = true\n\
             [[bgp.static]]\nprefix = \"2001:db8:44::/48\"\nblackhole = true\n\
             [policy.announce]\nrules = [ {policy} ]\n"
        )
    }

    const STATICS: &str = "{ match = { source = [\"static\"] }, action = \"accept\" }";

    fn next_hop_ipv6(text: &str, neighbor: &str) -> Option<std::net::Ipv6Addr> {
        let c = NodeConfig::parse(text, Path::new("test.toml")).expect("accepted");
        let bgp = c.bgp.expect("bgp");
        let n = bgp.speaker.neighbors.iter().find(|n| n.name == neighbor);
        n.expect("the neighbour").next_hop_ipv6
    }

    #[test]
    fn ipv6_routes_over_an_ipv4_session_without_a_next_hop_are_refused() {
        let other_v6 = "[[bgp.neighbor]]\nname = \"friend\"\naddress = \"2001:db8:f::1\"\nremote_as = 65002\nimport = \"all\"\nexport = \"none\"\n";
        assert_refused([
            // The case: the /48 would never reach the ISP.
            (
                border("", STATICS),
                "bgp.neighbor[0].next_hop_ipv6: neighbour \"isp\" has IPv6 unicast over an IPv4 session (172.30.0.1) and may be sent IPv6 routes (bgp.static[1] (2001:db8:44::/48), which its export policy \"announce\" accepts from source \"static\"), but has no IPv6 next hop of ours to send with them: set next_hop_ipv6 to an IPv6 address of this router that the neighbour reaches (ours on the link to it), or to \"auto\" (a global IPv6 address of the interface it is reached through, found at start), or families = [\"ipv4\"] to send it no IPv6 routes",
            ),
            // A prefix condition naming the /48.
            (
                border(
                    "families = [\"ipv4\", \"ipv6\"]",
                    "{ match = { prefix = [\"44.30.127.0/24\", \"2001:db8:44::/48\"] }, action = \"accept\" }",
                ),
                "bgp.neighbor[0].next_hop_ipv6: neighbour \"isp\"",
            ),
            // IPv6 only, over IPv4: the interfaces' networks.
            (
                format!(
                    "{BASE}connected = [\"*\"]\n[[bgp.neighbor]]\nname = \"isp\"\naddress = \"172.30.0.1\"\nremote_as = 65001\nfamilies = [\"ipv6\"]\nimport = \"none\"\nexport = \"all\"\n"
                ),
                "(bgp.connected, which its export policy \"all\" accepts from source \"connected\")",
            ),
            // Routes learned from the kernel.
            (
                format!(
                    "{BASE}[[bgp.neighbor]]\nname = \"isp\"\naddress = \"172.30.0.1\"\nremote_as = 65001\nimport = \"none\"\nexport = \"all\"\n[kernel]\nlearn = true\n"
                ),
                "(kernel.learn, which",
            ),
            // Another neighbour's IPv6 routes, to an eBGP neighbour.
            (
                format!(
                    "{BASE}[[bgp.neighbor]]\nname = \"isp\"\naddress = \"172.30.0.1\"\nremote_as = 65001\nimport = \"none\"\nexport = \"all\"\n{other_v6}"
                ),
                "(neighbour \"friend\", which its export policy \"all\" accepts from source \"bgp\")",
            ),
            // ... or to an iBGP one with next_hop_self.
            (
                format!(
                    "{BASE}[[bgp.neighbor]]\nname = \"rr\"\naddress = \"10.0.0.2\"\nremote_as = 65000\nnext_hop_self = true\n{other_v6}"
                ),
                "bgp.neighbor[0].next_hop_ipv6: neighbour \"rr\"",
            ),
            // A policy's `next_hop = "self"` is ours too.
            (
                border(
                    "",
                    "{ match = { source = [\"static\"] }, set = { next_hop = \"self\" }, action = \"accept\" }",
                ),
                "bgp.neighbor[0].next_hop_ipv6",
            ),
            // A policy that accepts by default.
            (
                border("", "").replace(
                    "[policy.announce]\nrules = [  ]",
                    "[policy.announce]\ndefault = \"accept\"",
                ),
                "bgp.neighbor[0].next_hop_ipv6",
            ),
        ]);
    }

    #[test]
    fn a_peering_over_ipv4_takes_its_global_ipv6_address_or_is_refused() {
        let peering = |address: &str| {
            format!(
                "{BASE}[[bgp.static]]\nprefix = \"2001:db8:44::/48\"\nblackhole = true\n\
                 [[peering]]\nname = \"edge\"\ninterface = \"wg-edge\"\nprivate_key_file = \"/nonexistent/bgp4mesh-test/edge.key\"\nlisten_port = 51821\npeer_public_key = \"yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\"\naddress = [{address}]\npeer_address = [\"172.20.0.3\"]\n\
                 [peering.bgp]\nremote_as = 65001\nimport = \"none\"\nexport = \"all\"\n"
            )
        };
        assert_eq!(
            next_hop_ipv6(
                &peering("\"172.20.0.2/31\", \"fe80::2/64\", \"2001:db8:20::2/64\""),
                "edge"
            ),
            Some("2001:db8:20::2".parse().expect("address"))
        );
        assert_refused([
            (
                peering("\"172.20.0.2/31\", \"fe80::2/64\""),
                "peering[0].bgp.next_hop_ipv6: neighbour \"edge\" has IPv6 unicast over an IPv4 session (172.20.0.3)",
            ),
            // Its interface is made after BGP starts: nothing to find there.
            (
                peering("\"172.20.0.2/31\", \"fe80::2/64\"").replace(
                    "remote_as = 65001\n",
                    "remote_as = 65001\nnext_hop_ipv6 = \"auto\"\n",
                ),
                "peering[0].bgp.next_hop_ipv6: \"auto\" finds nothing: the peering has no IPv6 address but link-local ones",
            ),
        ]);
        let auto = peering("\"172.20.0.2/31\", \"2001:db8:20::2/64\"").replace(
            "remote_as = 65001\n",
            "remote_as = 65001\nnext_hop_ipv6 = \"auto\"\n",
        );
        assert_eq!(
            next_hop_ipv6(&auto, "edge"),
            Some("2001:db8:20::2".parse().expect("address"))
        );
    }

    #[test]
    fn auto_is_left_to_the_daemon_and_other_words_are_refused() {
        let c = NodeConfig::parse(
            &border("next_hop_ipv6 = \"auto\"", STATICS),
            Path::new("test.toml"),
        )
        .expect("accepted");
        let bgp = c.bgp.expect("bgp");
        assert_eq!(bgp.next_hop_ipv6_auto, vec!["isp".to_string()]);
        assert_eq!(bgp.speaker.neighbors[0].next_hop_ipv6, None);
        // Over IPv6 the session's own address is the next hop.
        let c = NodeConfig::parse(
            &border("next_hop_ipv6 = \"auto\"", STATICS).replace("172.30.0.1", "2001:db8:1::1"),
            Path::new("test.toml"),
        )
        .expect("accepted");
        assert!(c.bgp.expect("bgp").next_hop_ipv6_auto.is_empty());
        assert_refused([(
            border("next_hop_ipv6 = \"self\"", STATICS),
            "\"self\": neither an IPv6 address nor \"auto\"",
        )]);
    }

    #[test]
    fn sessions_that_need_no_ipv6_next_hop_of_ours_are_accepted() {
        let ok = |text: &str| {
            NodeConfig::parse(text, Path::new("test.toml"))
                .map_err(|e| format!("{e:#}"))
                .expect("accepted");
        };
        // Given.
        assert_eq!(
            next_hop_ipv6(
                &border("next_hop_ipv6 = \"2001:db8:1::100\"", STATICS),
                "isp"
            ),
            Some("2001:db8:1::100".parse().expect("address"))
        );
        // No IPv6 on the session.
        ok(&border("families = [\"ipv4\"]", STATICS));
        // The export takes IPv4 prefixes only (deploy/examples/border.toml's).
        ok(&border(
            "",
            "{ match = { prefix = [\"44.30.127.0/24\"] }, action = \"accept\" }",
        ));
        // Nothing exported.
        ok(&border("", STATICS).replace("export = \"announce\"", "export = \"none\""));
        // The policy gives the IPv6 next hop itself.
        ok(&border(
            "",
            "{ match = { source = [\"static\"] }, set = { next_hop = \"2001:db8:1::100\" }, action = \"accept\" }",
        ));
        // IPv6 sessions: ours is the session's address.
        ok(&border("", STATICS).replace("172.30.0.1", "2001:db8:1::1"));
        // A link-local session with IPv4 routes over it (RFC 8950).
        ok(&border(
            "families = [\"ipv4\", \"ipv6\"]\nextended_next_hop = true\ninterface = \"eth0\"",
            STATICS,
        )
        .replace("172.30.0.1", "fe80::1"));
        // No IPv6 route to send: IPv4 statics only, and the other
        // neighbour's import takes IPv4 prefixes only (an ISP's config).
        ok(&format!(
            "{BASE}[[bgp.neighbor]]\nname = \"customer\"\naddress = \"172.30.0.100\"\nremote_as = 65010\nimport = \"customer_in\"\nexport = \"all\"\n\
             [[bgp.neighbor]]\nname = \"customer2\"\naddress = \"172.31.0.100\"\nremote_as = 65011\nimport = \"customer_in\"\nexport = \"all\"\n\
             [[bgp.static]]\nprefix = \"0.0.0.0/0\"\nblackhole = true\n\
             [policy.customer_in]\nrules = [ {{ match = {{ prefix = [\"44.30.127.0/24\"] }}, action = \"accept\" }} ]\n"
        ));
        // iBGP passes another neighbour's IPv6 next hop on unchanged ...
        let ibgp = format!(
            "{BASE}[[bgp.neighbor]]\nname = \"rr\"\naddress = \"10.0.0.2\"\nremote_as = 65000\nroute_reflector_client = true\n\
             [[bgp.neighbor]]\nname = \"friend\"\naddress = \"2001:db8:f::1\"\nremote_as = 65002\nimport = \"all\"\nexport = \"none\"\n"
        );
        ok(&ibgp);
        // ... and iBGP routes go to iBGP neighbours only through a reflector.
        ok(&ibgp
            .replace("route_reflector_client = true\n", "")
            .replace("remote_as = 65002", "remote_as = 65000"));
    }
}
