//! bgp4mesh against BIRD, FRR and GoBGP: eBGP over IPv4 and iBGP over IPv6
//! with each, routes both ways with their attributes, withdrawals.

mod common;

use anyhow::Result;
use bgp4mesh_lab::{Lab, can_run};
use common::*;

fn exchange_with(kind: Kind, binaries: &[&str]) -> Result<()> {
    let test = format!("ebgp_ipv4_and_ibgp_ipv6_with_{kind:?}");
    if !can_run(&test, binaries) {
        return Ok(());
    }
    let lab = Lab::new(&format!("peers-{kind:?}").to_lowercase())?;
    let (border, ext, int) = (
        lab.add_node("border")?,
        lab.add_node("ext")?,
        lab.add_node("int")?,
    );
    let (o1, e) = lab.link(&border, &ext)?;
    let (o2, i) = lab.link(&border, &int)?;
    let ours = start_ours(
        &lab,
        &border,
        65000,
        "10.255.0.1",
        &format!(
            "{}{}\n[[bgp.static]]\nprefix = \"{}\"\nblackhole = true\n\n[[bgp.static]]\nprefix = \"{}\"\nblackhole = true\n",
            our_neighbor(
                "ext",
                e.ipv4.into(),
                65001,
                "import = \"all\"\nexport = \"all\""
            ),
            our_neighbor("int", i.ipv6.into(), 65000, ""),
            our_prefix(false),
            our_prefix(true),
        ),
    )?;
    let external = Peer::start(
        kind,
        &lab,
        &ext,
        65001,
        e.ipv4.into(),
        o1.ipv4.into(),
        65000,
    )?;
    let internal = Peer::start(
        kind,
        &lab,
        &int,
        65000,
        i.ipv6.into(),
        o2.ipv6.into(),
        65000,
    )?;
    wait_established(&ours, "ext", &external, o1.ipv4.into())?;
    wait_established(&ours, "int", &internal, o2.ipv6.into())?;

    // What the peers sent us, attributes intact.
    let from_ext = wait_route("bgp4mesh", peer_prefix(false), || ours.routes())?;
    assert_eq!(from_ext.as_path, vec![65001], "{kind:?} eBGP");
    assert_eq!(from_ext.next_hop, Some(e.ipv4.into()));
    assert_eq!(from_ext.med, Some(50), "{kind:?}: MED");
    assert_eq!(from_ext.communities, vec!["65001:7"]);
    assert_eq!(from_ext.large_communities, vec!["65001:1:2"]);
    let from_int = wait_route("bgp4mesh", peer_prefix(true), || ours.routes())?;
    assert!(
        from_int.as_path.is_empty(),
        "{kind:?} iBGP: empty AS path, got {:?}",
        from_int.as_path
    );
    assert_eq!(from_int.next_hop, Some(i.ipv6.into()));
    assert_eq!(
        from_int.local_pref,
        Some(100),
        "{kind:?}: LOCAL_PREF over iBGP"
    );
    assert_eq!(from_int.med, Some(50));
    assert_eq!(from_int.communities, vec!["65001:7"]);
    assert_eq!(from_int.large_communities, vec!["65001:1:2"]);

    // What we sent them.
    let at_ext = wait_route(&format!("{kind:?} (eBGP)"), our_prefix(false), || {
        external.routes()
    })?;
    assert_eq!(at_ext.as_path, vec![65000]);
    assert_eq!(at_ext.next_hop, Some(o1.ipv4.into()));
    let at_int = wait_route(&format!("{kind:?} (iBGP)"), our_prefix(true), || {
        internal.routes()
    })?;
    assert!(at_int.as_path.is_empty(), "{:?}", at_int.as_path);
    assert_eq!(at_int.next_hop, Some(o2.ipv6.into()));
    assert_eq!(at_int.local_pref, Some(100));

    // Withdrawals propagate.
    external.withdraw(65001, false)?;
    internal.withdraw(65000, true)?;
    wait_no_route("bgp4mesh", peer_prefix(false), || ours.routes())?;
    wait_no_route("bgp4mesh", peer_prefix(true), || ours.routes())?;
    Ok(())
}

#[test]
fn ebgp_ipv4_and_ibgp_ipv6_with_bird() -> Result<()> {
    exchange_with(Kind::Bird, &["bird", "birdc"])
}

#[test]
fn ebgp_ipv4_and_ibgp_ipv6_with_frr() -> Result<()> {
    exchange_with(Kind::Frr, &["bgpd", "vtysh"])
}

#[test]
fn ebgp_ipv4_and_ibgp_ipv6_with_gobgp() -> Result<()> {
    exchange_with(Kind::Gobgp, &["gobgpd", "gobgp"])
}
