//! The Rust API the node daemon uses: `Device::configure` with a desired
//! state, applied again and again, against wireguard-go in a namespace.

use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::peers::WgDevice;
use bgp4mesh_lab::{Lab, can_run, wait_until};
use bgp4mesh_wireguard::{
    AnyDevice, Backend, Device, DeviceConfig, DeviceOptions, Key, PeerChange, PeerConfig,
    SetRequest,
};

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

/// Who handshakes when (issue 16): `apply` (UAPI) sets an endpoint and
/// sends nothing; `handshake_now` does at once; `configure` handshakes
/// with a peer it gives a new endpoint. Over a 1400-byte underlay with a
/// 1420 device, a TCP transfer goes through, and the device counts the
/// datagrams the kernel had to fragment.
#[test]
fn handshakes_when_asked_and_counts_fragmented_datagrams() -> Result<()> {
    if !can_run(
        "handshakes_when_asked_and_counts_fragmented_datagrams",
        &["wireguard-go", "wg", "ping"],
    ) {
        return Ok(());
    }
    let lab = Lab::new("wg-api-hs")?;
    let (a, b) = (lab.add_node("ours")?, lab.add_node("theirs")?);
    let (link_a, link_b) = lab.link(&a, &b)?;
    for link in [&link_a, &link_b] {
        lab.exec(
            &link.node,
            &["ip", "link", "set", &link.name, "mtu", "1400"],
        )?;
    }
    let theirs = WgDevice::start(&lab, &b, "100.64.0.2/24", 51821)?;
    let ifname = lab.unique_ifname("wg")?;
    let device = lab.in_netns(&a, || Device::create(DeviceOptions::new(&ifname)))??;
    // Created down, without addresses.
    let link = lab.exec(&a, &["ip", "-o", "link", "show", &ifname])?;
    ensure!(link.contains("state DOWN"), "{link}");
    let addresses = lab.exec(&a, &["ip", "-o", "address", "show", "dev", &ifname])?;
    ensure!(addresses.trim().is_empty(), "{addresses}");
    lab.add_address(&a, &ifname, "100.64.0.1/24")?;
    lab.exec(&a, &["ip", "link", "set", &ifname, "up"])?;

    let private = Key::generate_private();
    let their_key = Key::from_base64(theirs.public_key())?;
    theirs.set_peer(
        &private.public_key().to_base64(),
        Some(&format!("{}:51820", link_a.ipv4)),
        &["100.64.0.1/32"],
        None,
    )?;
    let mut change = PeerChange::new(their_key);
    change.endpoint = Some(format!("{}:51821", link_b.ipv4).parse()?);
    device.apply(&SetRequest {
        private_key: Some(Some(private)),
        listen_port: Some(51820),
        peers: vec![change],
        ..SetRequest::default()
    })?;
    let handshake = |device: &Device| {
        device
            .status()
            .peer(&their_key)
            .and_then(|p| p.last_handshake)
    };
    std::thread::sleep(Duration::from_millis(500));
    ensure!(handshake(&device).is_none(), "apply handshook");
    ensure!(device.handshake_now(&their_key), "no handshake sent");
    wait_until(Duration::from_secs(2), "the handshake asked for", || {
        ensure!(handshake(&device).is_some(), "none yet");
        Ok(())
    })?;
    ensure!(!device.handshake_now(&their_key), "a session stands");
    drop(device);

    // configure: at once, with no traffic.
    let device = lab.in_netns(&a, || Device::create(DeviceOptions::new(&ifname)))??;
    lab.add_address(&a, &ifname, "100.64.0.1/24")?;
    lab.exec(&a, &["ip", "link", "set", &ifname, "up"])?;
    let mut peer = PeerConfig::new(their_key);
    peer.endpoint = Some(format!("{}:51821", link_b.ipv4).parse()?);
    peer.allowed_ips = vec!["100.64.0.2/32".parse()?];
    device.configure(&DeviceConfig {
        private_key: Some(private),
        listen_port: 51820,
        fwmark: 0,
        peers: vec![peer],
    })?;
    wait_until(Duration::from_secs(2), "configure's handshake", || {
        ensure!(handshake(&device).is_some(), "none yet");
        Ok(())
    })?;

    // Full-size packets over the small underlay: TCP goes through, in GSO
    // runs the kernel refuses, so the device learns and counts.
    ensure!(device.status().fragmented_datagrams == 0);
    let listener = lab.in_netns(&b, || std::net::TcpListener::bind("100.64.0.2:5201"))??;
    let receiver = std::thread::spawn(move || -> Result<usize> {
        let (mut stream, _) = listener.accept()?;
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut stream, &mut got)?;
        Ok(got.len())
    });
    lab.in_netns(&a, || -> Result<()> {
        let to = "100.64.0.2:5201".parse()?;
        let mut stream = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        stream.set_write_timeout(Some(Duration::from_secs(20)))?;
        std::io::Write::write_all(&mut stream, &vec![7u8; 8 << 20])?;
        Ok(())
    })??;
    let got = receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))??;
    ensure!(got == 8 << 20, "received {got} bytes");
    let fragmented = device.status().fragmented_datagrams;
    ensure!(
        fragmented > 1000,
        "{fragmented} fragmented datagrams counted"
    );
    Ok(())
}

/// A device ends with its interface, as the node daemon sees it through
/// `AnyDevice`: after `ip link del` the device stops within a second or
/// two, says why (`interface_gone`), refuses `status` and `configure`
/// with "not found" (ENODEV), and its UAPI socket is gone.
#[test]
fn any_device_stops_when_its_interface_is_deleted() -> Result<()> {
    if !can_run("any_device_stops_when_its_interface_is_deleted", &["ip"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-api-gone")?;
    let a = lab.add_node("ours")?;
    let ifname = lab.unique_ifname("wg")?;
    let device = lab.in_netns(&a, || {
        AnyDevice::create(DeviceOptions::new(&ifname), Backend::Userspace)
    })??;
    let socket = std::path::Path::new(bgp4mesh_wireguard::uapi_server::SOCKET_DIR)
        .join(format!("{ifname}.sock"));
    ensure!(socket.exists(), "no UAPI socket {}", socket.display());
    lab.exec(&a, &["ip", "link", "set", &ifname, "up"])?;
    let desired = DeviceConfig {
        private_key: Some(Key::generate_private()),
        listen_port: 0,
        fwmark: 0,
        peers: Vec::new(),
    };
    device.configure(&desired)?;
    ensure!(device.status().is_ok() && !device.interface_gone());

    lab.exec(&a, &["ip", "link", "del", &ifname])?;
    let deleted = std::time::Instant::now();
    wait_until(Duration::from_secs(2), "the device to stop", || {
        ensure!(device.interface_gone(), "still running");
        ensure!(!socket.exists(), "{} is still there", socket.display());
        Ok(())
    })?;
    eprintln!("stopped {:?} after the link was deleted", deleted.elapsed());
    let err = device.status().err().context("status of a gone device")?;
    ensure!(err.kind() == std::io::ErrorKind::NotFound, "{err}");
    let err = device
        .configure(&desired)
        .err()
        .context("configure of a gone device")?;
    ensure!(err.raw_os_error() == Some(libc::ENODEV), "{err}");
    Ok(())
}
