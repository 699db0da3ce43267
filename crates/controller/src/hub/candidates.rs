//! A node's candidates (where it may be reached when it publishes no
//! endpoint) and its NAT's mapping, as its reports give them: checked,
//! kept in memory only (observations, like the observed endpoint), and
//! published as a change of the node, so that in one message the node
//! gets its own (a `SelfUpdate`) and every peer gets them (a
//! `PeerUpsert`): both ends send to each other from the same moment,
//! which is what opens their NATs to each other.

use std::net::{IpAddr, SocketAddr};

use bgp4mesh_api::{MAX_CANDIDATES, NatMapping};

use super::Hub;

/// Why `ip` cannot be reached from another machine at all.
fn unreachable_ip(ip: IpAddr) -> Option<&'static str> {
    match ip {
        _ if ip.is_unspecified() => Some("unspecified"),
        _ if ip.is_loopback() => Some("loopback"),
        _ if ip.is_multicast() => Some("multicast"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("broadcast"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            Some("link-local (it needs an interface to mean something)")
        }
        _ => None,
    }
}

/// A report's candidates, checked: at most `MAX_CANDIDATES`, each an
/// `ip:port` with a port and an address another machine can send to.
/// Returned in their canonical form (IPv4-mapped IPv6 as IPv4), in their
/// order, repeats left out. The error names the bad value.
pub fn check_candidates(candidates: &[String]) -> Result<Vec<String>, String> {
    if candidates.len() > MAX_CANDIDATES {
        return Err(format!(
            "candidates: {} given, at most {MAX_CANDIDATES}",
            candidates.len()
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(candidates.len());
    for c in candidates {
        let Ok(addr) = c.parse::<SocketAddr>() else {
            return Err(format!(
                "candidates: {c:?} is not an address and port (198.51.100.7:51820, [2001:db8::7]:51820)"
            ));
        };
        if addr.port() == 0 {
            return Err(format!("candidates: {c:?} has port 0"));
        }
        let ip = addr.ip().to_canonical();
        if let Some(why) = unreachable_ip(ip) {
            return Err(format!("candidates: {c:?} is {why}"));
        }
        let canonical = SocketAddr::new(ip, addr.port()).to_string();
        if !out.contains(&canonical) {
            out.push(canonical);
        }
    }
    Ok(out)
}

impl Hub {
    /// A node reported its candidates (checked) and its NAT's mapping;
    /// `None` leaves what it said before. Returns whether what peers see
    /// of it changed (its candidates count only while it publishes no
    /// endpoint): the caller then publishes the node as changed.
    pub fn candidates_reported(
        &self,
        netid: &str,
        id: &str,
        candidates: Option<Vec<String>>,
        nat: Option<NatMapping>,
    ) -> bool {
        let mut inner = self.write();
        let Some(node) = inner.node_mut(netid, id) else {
            return false;
        };
        let mut changed = false;
        if let Some(candidates) = candidates
            && candidates != node.candidates
        {
            changed |= node.row.endpoint.is_none();
            node.candidates = candidates;
        }
        if nat.is_some() && nat != node.nat {
            node.nat = nat;
            changed = true;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{ChangeKind, Relays, render_node, render_peer};
    use bgp4mesh_api::StreamEvent;

    use crate::hub::fixtures::{network, node};

    fn hub() -> Hub {
        Hub::load(
            1,
            vec![network()],
            vec![
                node("a", None),
                node("b", None),
                node("pub", Some("192.0.2.1")),
            ],
            Vec::new(),
        )
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn candidates_are_checked_and_the_bad_one_is_named() {
        let good = strings(&[
            "[2001:db8::7]:51820",
            "203.0.113.9:40000",
            "192.168.1.7:51820",
            "[::ffff:198.51.100.4]:51820",
            "203.0.113.9:40000",
        ]);
        assert_eq!(
            check_candidates(&good),
            Ok(strings(&[
                "[2001:db8::7]:51820",
                "203.0.113.9:40000",
                "192.168.1.7:51820",
                "198.51.100.4:51820",
            ])),
            "canonical, in order, repeats left out"
        );
        for (bad, why) in [
            ("203.0.113.9", "not an address and port"),
            ("nowhere:51820", "not an address and port"),
            ("203.0.113.9:0", "port 0"),
            ("0.0.0.0:51820", "unspecified"),
            ("[::]:51820", "unspecified"),
            ("127.0.0.1:51820", "loopback"),
            ("[::1]:51820", "loopback"),
            ("224.0.0.5:51820", "multicast"),
            ("[ff02::1]:51820", "multicast"),
            ("255.255.255.255:51820", "broadcast"),
            ("[fe80::1]:51820", "link-local"),
            ("[::ffff:127.0.0.1]:51820", "loopback"),
        ] {
            let list = strings(&["203.0.113.9:40000", bad]);
            let err = check_candidates(&list).expect_err(bad);
            assert!(
                err.starts_with("candidates:") && err.contains(bad) && err.contains(why),
                "{bad}: {err}"
            );
        }
        let many: Vec<String> = (1..=MAX_CANDIDATES + 1)
            .map(|i| format!("203.0.113.{i}:51820"))
            .collect();
        let err = check_candidates(&many).expect_err("too many");
        assert!(err.contains(&format!("at most {MAX_CANDIDATES}")), "{err}");
        assert_eq!(check_candidates(&[]), Ok(Vec::new()));
    }

    #[test]
    fn candidates_are_stored_none_leaves_them_and_a_published_endpoint_hides_them() {
        let hub = hub();
        let c = strings(&["203.0.113.9:40000", "192.168.1.7:51820"]);
        assert!(hub.candidates_reported(
            "mynet",
            "a",
            Some(c.clone()),
            Some(NatMapping::EndpointIndependent)
        ));
        assert!(
            !hub.candidates_reported("mynet", "a", Some(c.clone()), None),
            "the same again is no change"
        );
        assert!(
            !hub.candidates_reported("mynet", "a", None, None),
            "None leaves them"
        );
        let a = hub.node("mynet", "a").expect("a");
        assert_eq!(a.candidates, c);
        assert_eq!(a.nat, Some(NatMapping::EndpointIndependent));
        let rendered = render_node(&network(), &a, 0);
        assert_eq!(rendered.candidates, c);
        assert_eq!(rendered.nat, Some(NatMapping::EndpointIndependent));
        assert_eq!(render_peer(&a, &Relays::none()).candidates, c);
        assert!(hub.candidates_reported("mynet", "a", None, Some(NatMapping::EndpointDependent)));
        // A node that publishes its endpoint is reached there.
        assert!(
            !hub.candidates_reported("mynet", "pub", Some(c.clone()), None),
            "no change peers see"
        );
        let p = hub.node("mynet", "pub").expect("pub");
        assert_eq!(p.candidates, c, "kept");
        assert!(render_peer(&p, &Relays::none()).candidates.is_empty());
        assert!(render_node(&network(), &p, 0).candidates.is_empty());
        // A closed stream keeps them; a deleted node takes them along.
        hub.stream_changed("mynet", "a", 1);
        hub.stream_changed("mynet", "a", -1);
        assert_eq!(hub.node("mynet", "a").expect("a").candidates, c);
        hub.node_removed(2, "mynet", "a");
        assert!(hub.node("mynet", "a").is_none());
        assert!(!hub.candidates_reported("mynet", "a", Some(c), None));
    }

    #[test]
    fn one_publish_gives_the_node_its_own_and_its_peers_theirs() {
        let hub = hub();
        let mut sub_a = hub.subscribe("mynet", "a", None, 0).expect("a");
        let mut sub_b = hub.subscribe("mynet", "b", None, 0).expect("b");
        let c = strings(&["203.0.113.9:40000"]);
        assert!(hub.candidates_reported(
            "mynet",
            "a",
            Some(c.clone()),
            Some(NatMapping::EndpointIndependent)
        ));
        // What the report handler does with it.
        hub.node_changed(2, "mynet", "a", |old| old.expect("a"));
        let change_a = sub_a.live.try_recv().expect("a's stream");
        let change_b = sub_b.live.try_recv().expect("b's stream");
        assert!(
            std::sync::Arc::ptr_eq(&change_a, &change_b),
            "one change, both streams"
        );
        assert!(matches!(&change_a.kind, ChangeKind::NodeUpsert(id) if id == "a"));
        assert!(sub_a.live.try_recv().is_err() && sub_b.live.try_recv().is_err());
        match hub.event_for("mynet", &change_a, "a", 0).as_slice() {
            [StreamEvent::SelfUpdate { revision, node, .. }] => {
                assert_eq!(*revision, 2);
                assert_eq!(node.candidates, c);
                assert_eq!(node.nat, Some(NatMapping::EndpointIndependent));
            }
            other => panic!("a got {other:?}"),
        }
        match hub.event_for("mynet", &change_b, "b", 0).as_slice() {
            [StreamEvent::PeerUpsert { revision, peer }] => {
                assert_eq!(*revision, 2);
                assert_eq!(peer.node_id, "a");
                assert_eq!(peer.candidates, c);
                assert_eq!(peer.nat, Some(NatMapping::EndpointIndependent));
            }
            other => panic!("b got {other:?}"),
        }
        // A stream that resumes from before gets the same from the log.
        let resumed = hub.subscribe("mynet", "b", Some(1), 0).expect("b");
        assert!(matches!(
            resumed.initial.as_slice(),
            [StreamEvent::PeerUpsert { peer, .. }] if peer.candidates == c
        ));
    }
}
