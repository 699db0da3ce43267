//! The Rust API the node daemon uses: `Device::configure` with a desired
//! state, applied again and again, against wireguard-go in a namespace.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::peers::WgDevice;
use bgp4mesh_lab::{Lab, can_run, wait_until};
use bgp4mesh_wireguard::{Device, DeviceConfig, DeviceOptions, Key, PeerConfig};

/// The device reports handshake times as "now minus age", so two readings
/// of the same handshake differ by microseconds.
fn close(t: Option<SystemTime>, reference: SystemTime) -> bool {
    t.is_some_and(|t| {
        let d = t
            .duration_since(reference)
            .or_else(|_| reference.duration_since(t))
            .unwrap_or_default();
        d < Duration::from_millis(500)
    })
}

#[test]
fn configure_is_idempotent_and_keeps_sessions() -> Result<()> {
    if !can_run(
        "configure_is_idempotent_and_keeps_sessions",
        &["wireguard-go", "wg", "ping"],
    ) {
        return Ok(());
    }
    let lab = Lab::new("wg-api")?;
    let (a, b) = (lab.add_node("ours")?, lab.add_node("theirs")?);
    let (link_a, link_b) = lab.link(&a, &b)?;
    let theirs = WgDevice::start(&lab, &b, "100.64.0.2/24", 51821)?;

    let ifname = lab.unique_ifname("wg")?;
    let device = lab.in_netns(&a, || Device::create(DeviceOptions::new(&ifname)))??;
    lab.add_address(&a, &ifname, "100.64.0.1/24")?;
    lab.exec(&a, &["ip", "link", "set", &ifname, "up"])?;

    let private = Key::generate_private();
    let their_key = Key::from_base64(theirs.public_key())?;
    let mut peer = PeerConfig::new(their_key);
    peer.endpoint = Some(format!("{}:51821", link_b.ipv4).parse()?);
    peer.allowed_ips = vec!["100.64.0.2/32".parse()?];
    let mut desired = DeviceConfig {
        private_key: Some(private),
        listen_port: 51820,
        fwmark: 0,
        peers: vec![peer.clone()],
    };
    device.configure(&desired)?;
    theirs.set_peer(
        &private.public_key().to_base64(),
        Some(&format!("{}:51820", link_a.ipv4)),
        &["100.64.0.1/32"],
        None,
    )?;
    let ping = |to: &str| -> Result<()> {
        let out = lab.try_exec(&a, &["ping", "-c", "1", "-W", "1", to])?;
        ensure!(out.success(), "ping {to}: {}", out.stdout);
        Ok(())
    };
    wait_until(Duration::from_secs(10), "a ping through the tunnel", || {
        ping("100.64.0.2")
    })?;

    let status = device.status();
    assert_eq!(status.public_key, Some(private.public_key()));
    assert_eq!(status.listen_port, 51820);
    let first = status.peer(&their_key).context("peer listed")?.clone();
    let handshake = first.last_handshake.context("a handshake happened")?;
    assert!(first.rx_bytes > 0 && first.tx_bytes > 0, "{first:?}");

    // The same desired state again, a second later: nothing changes, the
    // session stays (no new handshake), the counters go on.
    std::thread::sleep(Duration::from_millis(1100));
    device.configure(&desired)?;
    ping("100.64.0.2")?;
    let again = device.status();
    let same = again.peer(&their_key).context("peer still listed")?;
    assert!(
        close(same.last_handshake, handshake),
        "no new handshake: {same:?}"
    );
    assert!(same.rx_bytes > first.rx_bytes, "counters were not reset");

    // A changed allowed-IPs list is applied in place.
    desired.peers[0].allowed_ips.push("100.64.1.0/24".parse()?);
    device.configure(&desired)?;
    let changed = device.status();
    let changed = changed.peer(&their_key).context("peer listed")?;
    assert_eq!(changed.allowed_ips.len(), 2);
    assert!(close(changed.last_handshake, handshake), "{changed:?}");
    let dump = lab.exec(&b, &["wg", "show", theirs.ifname(), "dump"])?;
    ensure!(dump.contains("100.64.0.1/32"), "{dump}");

    // Without the peer: removed, and the tunnel is closed.
    desired.peers.clear();
    device.configure(&desired)?;
    assert!(device.status().peers.is_empty());
    ensure!(ping("100.64.0.2").is_err(), "traffic without the peer");

    // And back: a new handshake.
    desired.peers.push(peer);
    device.configure(&desired)?;
    wait_until(Duration::from_secs(10), "a ping after re-adding", || {
        ping("100.64.0.2")
    })?;
    drop(device);
    // The interface goes with the device.
    wait_until(Duration::from_secs(5), "the interface to go away", || {
        let out = lab.try_exec(&a, &["ip", "link", "show", &ifname])?;
        ensure!(!out.success(), "{ifname} still exists");
        Ok(())
    })?;
    Ok(())
}
