//! A device whose interface is down sends nothing of its own, as the
//! kernel module: the kernel's selftest (netns.sh, "Make sure persistent
//! keep alives are sent when an adapter comes up", and line 647's
//! low-order keys) checks it, and running that script against our device
//! found it sending (tests/kernel_selftest.rs, docs/wireguard.md).

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use bgp4mesh_lab::{Lab, Node, can_run};
use bgp4mesh_wireguard::{Device, DeviceOptions, Key, PeerChange, SetRequest};

/// A device in a namespace of its own, and a peer with a persistent
/// keepalive of 1 s whose endpoint is the namespace's discard port.
fn keepalive_peer(private_key: Option<Key>) -> Result<(Lab, Node, String, Device, Key)> {
    let lab = Lab::new("wg-link")?;
    let node = lab.add_node("a")?;
    lab.exec(&node, &["ip", "link", "set", "lo", "up"])?;
    let ifname = lab.unique_ifname("wg")?;
    let device = lab.in_netns(&node, || Device::create(DeviceOptions::new(&ifname)))??;
    let peer = Key::generate_private().public_key();
    let mut change = PeerChange::new(peer);
    change.endpoint = Some("127.0.0.1:9".parse()?);
    change.persistent_keepalive = Some(1);
    device.apply(&SetRequest {
        private_key: private_key.map(Some),
        peers: vec![change],
        ..SetRequest::default()
    })?;
    Ok((lab, node, ifname, device, peer))
}

fn sent(device: &Device, peer: &Key) -> u64 {
    device.status().peer(peer).map_or(0, |p| p.tx_bytes)
}

/// Waits up to `within` for the device to have sent to `peer`.
fn sends_within(device: &Device, peer: &Key, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if sent(device, peer) > 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn persistent_keepalive_waits_for_the_interface_to_come_up() -> Result<()> {
    if !can_run!(&[]) {
        return Ok(());
    }
    let (lab, node, ifname, device, peer) = keepalive_peer(Some(Key::generate_private()))?;
    // Down: more than a keepalive interval and a timer tick pass silently.
    std::thread::sleep(Duration::from_millis(1300));
    ensure!(
        sent(&device, &peer) == 0,
        "sent {} bytes while the interface was down",
        sent(&device, &peer)
    );
    lab.exec(&node, &["ip", "link", "set", &ifname, "up"])?;
    // The kernel's selftest reads the counter right after `ip link set up`.
    ensure!(
        sends_within(&device, &peer, Duration::from_millis(100)),
        "no keepalive within 100 ms of the interface coming up"
    );
    Ok(())
}

#[test]
fn a_first_private_key_on_an_interface_that_is_up_sends_the_keepalive() -> Result<()> {
    if !can_run!(&[]) {
        return Ok(());
    }
    let (lab, node, ifname, device, peer) = keepalive_peer(None)?;
    lab.exec(&node, &["ip", "link", "set", &ifname, "up"])?;
    std::thread::sleep(Duration::from_millis(300));
    ensure!(sent(&device, &peer) == 0, "sent without a private key");
    device.apply(&SetRequest {
        private_key: Some(Some(Key::generate_private())),
        ..SetRequest::default()
    })?;
    ensure!(
        sent(&device, &peer) > 0,
        "no keepalive when the first private key was set"
    );
    Ok(())
}

#[test]
fn low_order_peers_are_sent_nothing_even_when_the_interface_comes_up() -> Result<()> {
    if !can_run!(&[]) {
        return Ok(());
    }
    let (lab, node, ifname, device, _) = keepalive_peer(Some(Key::generate_private()))?;
    // A point of order 8 (the kernel selftest's list).
    let low = Key::from_base64("X5yVvKNQjCSx0LFVnIPvWwREXMRYHI6G2CJO3dCfEVc=")?;
    let mut change = PeerChange::new(low);
    change.endpoint = Some("127.0.0.1:9".parse()?);
    change.persistent_keepalive = Some(1);
    device.apply(&SetRequest {
        peers: vec![change],
        ..SetRequest::default()
    })?;
    lab.exec(&node, &["ip", "link", "set", &ifname, "up"])?;
    ensure!(
        !sends_within(&device, &low, Duration::from_millis(1300)),
        "sent {} bytes to a peer with a low-order key",
        sent(&device, &low)
    );
    Ok(())
}
