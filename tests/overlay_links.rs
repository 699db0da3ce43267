//! The layer-2 overlay's kernel side (issue 18): a bridge bgp4mesh owns,
//! VXLAN ports on it, and port states applied through nftables, in network
//! namespaces. (The overlay over tunnels, end to end, comes with the
//! `[overlay]` section.)

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bgp4mesh_kernel::links::Links;
use bgp4mesh_kernel::overlay::{PortStates, Stp, VxlanPort, set_port_states};
use bgp4mesh_lab::{Lab, Node, can_run};

/// Runs `f` with a netlink connection inside `node`.
fn with_links<T: Send>(
    lab: &Lab,
    node: &Node,
    f: impl AsyncFnOnce(&Links) -> Result<T> + Send,
) -> Result<T> {
    lab.in_netns(node, || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let links = Links::connect()?;
            f(&links).await
        })
    })?
}

/// Makes the bridge and its port. The bridge's address (our spanning
/// tree's bridge identifier) stays when the port is attached.
fn bridge_with_port(lab: &Lab, node: &Node, port: VxlanPort, address: &str) -> Result<()> {
    let mac = || lab.exec(node, &["cat", "/sys/class/net/br-l2/address"]);
    with_links(lab, node, async |links: &Links| {
        links
            .overlay()
            .ensure_bridge("br-l2", 1500, Stp::Ours, 32768)
            .await
    })?;
    let before = mac()?;
    with_links(lab, node, async move |links: &Links| {
        links.overlay().ensure_vxlan(&port, "br-l2").await?;
        links.overlay().set_port_up(&port.name, true).await?;
        Ok(())
    })?;
    let after = mac()?;
    ensure!(
        before == after,
        "the bridge's address moved: {before} -> {after}"
    );
    lab.exec(node, &["ip", "addr", "add", address, "dev", "br-l2"])?;
    Ok(())
}

#[test]
fn a_bridge_of_ours_with_a_vxlan_port_carries_full_frames_and_obeys_port_states() -> Result<()> {
    if !can_run!(&["ping", "nft"]) {
        return Ok(());
    }
    let lab = Lab::new("overlay-links")?;
    let a = lab.add_node("a")?;
    let b = lab.add_node("b")?;
    let (a_end, b_end) = lab.link(&a, &b)?;
    // An underlay that carries the 50 bytes VXLAN adds to a full frame.
    // (Over a 1420-byte tunnel the kernel's VXLAN refuses a frame with DF
    // set inside that does not fit the route to the remote: it answers
    // "fragmentation needed" for the far end. The tunnels' routes carry
    // that; tested with the tunnels.)
    lab.exec(&a, &["ip", "link", "set", &a_end.name, "mtu", "1550"])?;
    lab.exec(&b, &["ip", "link", "set", &b_end.name, "mtu", "1550"])?;
    let port = |local, remote| VxlanPort {
        name: "b4vx-peer".into(),
        vni: 4242,
        local,
        remote,
        mtu: 1500,
    };
    let (ai, bi) = (a_end.ipv4.into(), b_end.ipv4.into());
    bridge_with_port(&lab, &a, port(ai, bi), "10.99.0.1/24")?;
    bridge_with_port(&lab, &b, port(bi, ai), "10.99.0.2/24")?;
    set_states(&lab, &a, State::Forwarding, HOLD)?;
    // 1500-byte frames with DF set inside.
    let ping = |size: &str| {
        lab.try_exec(
            &a,
            &[
                "ping",
                "-c",
                "2",
                "-W",
                "1",
                "-M",
                "do",
                "-s",
                size,
                "10.99.0.2",
            ],
        )
    };
    let out = ping("1472")?;
    ensure!(out.success(), "full frames do not cross: {}", out.stdout);

    // Discarding: nothing crosses; learning: still nothing; forwarding again.
    set_states(&lab, &a, State::Discarding, HOLD)?;
    ensure!(!ping("56")?.success(), "a discarding port forwarded");
    set_states(&lab, &a, State::Learning, HOLD)?;
    ensure!(!ping("56")?.success(), "a learning port forwarded");
    set_states(&lab, &a, State::Forwarding, HOLD)?;
    ensure!(ping("56")?.success(), "forwarding again: no answer");
    // Fail closed: a forwarding state not set again expires.
    set_states(&lab, &a, State::Forwarding, Duration::from_millis(1500))?;
    ensure!(ping("56")?.success(), "forwarding for 1.5 s: no answer");
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        !ping("56")?.success(),
        "a forwarding state not set again still forwards"
    );
    set_states(&lab, &a, State::Forwarding, HOLD)?;

    // Idempotent: the same again changes nothing; another VNI makes the
    // port again; the bridge's MAC table can be flushed.
    bridge_with_port_again(&lab, &a, port(ai, bi))?;
    let shown = lab.exec(&a, &["ip", "-d", "link", "show", "b4vx-peer"])?;
    ensure!(shown.contains("id 4242"), "{shown}");
    let mut other = port(ai, bi);
    other.vni = 4343;
    with_links(&lab, &a, async move |links: &Links| {
        links.overlay().ensure_vxlan(&other, "br-l2").await?;
        links.overlay().flush_port("b4vx-peer").await?;
        let ports = links.overlay().vxlan_ports("br-l2").await?;
        ensure!(ports == vec!["b4vx-peer".to_string()], "{ports:?}");
        Ok(())
    })?;
    let shown = lab.exec(&a, &["ip", "-d", "link", "show", "b4vx-peer"])?;
    ensure!(
        shown.contains("id 4343") && shown.contains("master br-l2"),
        "{shown}"
    );

    // A bridge that is not ours is never taken.
    lab.exec(&a, &["ip", "link", "add", "br-theirs", "type", "bridge"])?;
    let refused = with_links(&lab, &a, async |links: &Links| {
        links
            .overlay()
            .ensure_bridge("br-theirs", 1500, Stp::Ours, 32768)
            .await
    });
    let message = format!("{:#}", refused.err().context("took a bridge not ours")?);
    ensure!(message.contains("not a bridge bgp4mesh made"), "{message}");
    // ...nor removed.
    with_links(&lab, &a, async |links: &Links| {
        links.overlay().remove_bridge("br-theirs").await
    })?;
    lab.exec(&a, &["ip", "link", "show", "br-theirs"])
        .context("a bridge not ours was removed")?;
    Ok(())
}

fn bridge_with_port_again(lab: &Lab, node: &Node, port: VxlanPort) -> Result<()> {
    let before = lab.exec(node, &["ip", "-o", "link", "show", "b4vx-peer"])?;
    with_links(lab, node, async move |links: &Links| {
        links
            .overlay()
            .ensure_bridge("br-l2", 1500, Stp::Ours, 32768)
            .await?;
        links.overlay().ensure_vxlan(&port, "br-l2").await
    })?;
    let after = lab.exec(node, &["ip", "-o", "link", "show", "b4vx-peer"])?;
    let index = |s: &str| s.split(':').next().unwrap_or_default().to_string();
    ensure!(
        index(&before) == index(&after),
        "the same port was made again: {before} / {after}"
    );
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    Discarding,
    Learning,
    Forwarding,
}

/// Long enough for the test: the states do not expire under it.
const HOLD: Duration = Duration::from_secs(600);

fn set_states(lab: &Lab, node: &Node, state: State, hold: Duration) -> Result<()> {
    let port = vec!["b4vx-peer".to_string()];
    let states = PortStates {
        forwarding: if state == State::Forwarding {
            port.clone()
        } else {
            Vec::new()
        },
        learning: if state == State::Learning {
            port
        } else {
            Vec::new()
        },
        hold,
    };
    lab.in_netns(node, || set_port_states("br-l2", Some(&states)))?
}
