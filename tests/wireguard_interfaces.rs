//! `[[wireguard]]` end to end: seed 001's server in one config. The
//! server's interface comes from a wg-quick file as it is (two clients
//! running wireguard-go), its VIP network is announced with BFD to a BIRD
//! router by `[[bgp.static]] device`, the clients ping the VIP through
//! the tunnel, `show wireguard` lists them with their handshakes; a reload
//! that adds a third client touches nothing else.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::peers::{Bgp4mesh, Bird, WgDevice};
use bgp4mesh_lab::{Lab, Node, can_run, wait_until};
use common::*;
use serde_json::Value;

/// The VIP, as seed 001 has it.
const VIP: &str = "192.168.20.1";

/// `show wireguard --json`, the one interface.
fn interface(ours: &Bgp4mesh) -> Result<Value> {
    let all: Value = serde_json::from_str(&ours.cli(&["show", "wireguard", "--json"])?)?;
    ensure!(all.as_array().map(Vec::len) == Some(1), "{all}");
    Ok(all[0].clone())
}

/// The peer with `key` in `show wireguard --json`'s interface.
fn peer(interface: &Value, key: &str) -> Result<Value> {
    interface["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["public_key"] == key)
        .cloned()
        .with_context(|| format!("no peer {key} in {interface}"))
}

/// A wg-quick file: the server's key, VIP and port, a [Peer] per client.
fn wg_quick(private: &str, clients: &[(&WgDevice, &str)]) -> String {
    let mut text = format!(
        "# seed 001's server, as wg-quick has it\n[Interface]\nPrivateKey = {private}\nAddress = {VIP}/24\nListenPort = 51820\n"
    );
    for (wg, allowed) in clients {
        text.push_str(&format!(
            "\n[Peer]\nPublicKey = {}\nAllowedIPs = {allowed}\n",
            wg.public_key()
        ));
    }
    text
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

#[test]
fn seed_001_server_from_a_wg_quick_file() -> Result<()> {
    if !can_run!(&["bird", "birdc", "ping", "wg", "wireguard-go"],) {
        return Ok(());
    }
    let lab = Lab::new("wireguard-seed-001")?;
    let (server, router) = (lab.add_node("server")?, lab.add_node("router")?);
    let (s, r) = lab.link(&server, &router)?;
    let clients: Vec<Node> = (1..=3)
        .map(|i| lab.add_node(&format!("client{i}")))
        .collect::<Result<_>>()?;
    let mut links = Vec::new();
    for client in &clients {
        links.push(lab.link(client, &server)?);
    }
    // Each client: wireguard-go with its address in the VIP's network.
    let mut devices = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        devices.push(WgDevice::start(
            &lab,
            client,
            &format!("192.168.20.{}/24", i + 2),
            51820,
        )?);
    }
    let _router_bird = Bird::start(
        &lab,
        &router,
        &format!(
            r#"
router id 10.0.0.1;
protocol device {{}}
protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; merge paths yes; }}
protocol bfd {{ interface "*" {{ interval 100 ms; multiplier 5; }}; }}
protocol bgp bgp_server5 {{
  local {r} as 65001;
  neighbor {s} as 65000;
  bfd on;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ import all; export none; }};
}}
"#,
            r = r.ipv4,
            s = s.ipv4
        ),
    )?;

    // The server's wg-quick file, named after its interface: `config`
    // alone says both.
    let iface = lab.unique_ifname("wg")?;
    let private = lab.exec(&server, &["wg", "genkey"])?.trim().to_string();
    let public = lab
        .exec_full(
            &server,
            &["wg", "pubkey"],
            Some(private.as_bytes()),
            std::time::Duration::from_secs(30),
        )?
        .stdout
        .trim()
        .to_string();
    let conf = lab.run_dir(&server)?.join(format!("{iface}.conf"));
    // The second client also routes a network of its own through the
    // tunnel: a route into the interface, as wg-quick makes.
    let two = [
        (&devices[0], "192.168.20.2/32"),
        (&devices[1], "192.168.20.3/32, 10.77.0.0/24"),
    ];
    write_private(&conf, &wg_quick(&private, &two))?;
    let ours = start_ours(
        &lab,
        &server,
        65000,
        "10.0.5.1",
        &format!(
            "{}[[bgp.static]]\nprefix = \"192.168.20.0/24\"\ndevice = \"{iface}\"\n\n[[wireguard]]\nconfig = {:?}\n",
            our_neighbor(
                "bgp_router",
                r.ipv4.into(),
                65001,
                "import = \"none\"\nexport = \"all\"\nbfd = true"
            ),
            conf.to_string_lossy()
        ),
    )?;
    for (i, wg) in devices.iter().enumerate() {
        let (_, server_end) = &links[i];
        wg.set_peer(
            &public,
            Some(&format!("{}:51820", server_end.ipv4)),
            &["192.168.20.0/24"],
            Some(5),
        )?;
    }

    // Both clients reach the VIP through the tunnel.
    for client in &clients[..2] {
        wait_until(SETTLE, "a client's ping to the VIP", || {
            ping(&lab, client, VIP)
        })?;
    }
    let route = lab.exec(&server, &["ip", "route", "show", "10.77.0.0/24"])?;
    ensure!(route.contains(&format!("dev {iface}")), "{route}");
    let w = interface(&ours)?;
    ensure!(w["interface"] == iface.as_str(), "{w}");
    ensure!(w["public_key"] == public.as_str(), "{w}");
    ensure!(w["listen_port"] == 51820, "{w}");
    ensure!(w["peers"].as_array().map(Vec::len) == Some(2), "{w}");
    let mut before = Vec::new();
    for wg in &devices[..2] {
        let p = peer(&w, wg.public_key())?;
        ensure!(!p["last_handshake"].is_null(), "{p}");
        ensure!(p["rx_bytes"].as_u64().unwrap_or(0) > 0, "{p}");
        before.push(p);
    }
    let text = ours.cli(&["show", "wireguard"])?;
    ensure!(
        text.contains(&iface) && text.contains(devices[0].public_key()),
        "{text}"
    );
    ensure!(!text.contains(&private) && !w.to_string().contains(&private));

    // Seed 001's announcement: the router has the VIP's network via the
    // server, over a session with BFD up.
    wait_until(SETTLE, "the VIP's network in the router's kernel", || {
        let v4 = kernel_routes_of(&lab, &router, false, "bird")?;
        ensure!(
            v4 == vec![("192.168.20.0/24".to_string(), vec![s.ipv4.to_string()])],
            "{v4:?}"
        );
        Ok(())
    })?;
    wait_until(SETTLE, "BFD up with the router", || {
        let bfd = ours.cli(&["show", "bfd", "sessions", "--json"])?;
        ensure!(bfd.contains("\"Up\""), "{bfd}");
        Ok(())
    })?;
    let session = ours.protocol("bgp_router")?;

    // A third client: the reload adds its peer and nothing else changes.
    let three = [two[0], two[1], (&devices[2], "192.168.20.4/32")];
    write_private(&conf, &wg_quick(&private, &three))?;
    let out = ours.cli(&["bgp", "reload"])?;
    ensure!(out.contains("reloaded"), "{out}");
    wait_until(SETTLE, "the third client's ping to the VIP", || {
        ping(&lab, &clients[2], VIP)
    })?;
    let w = interface(&ours)?;
    ensure!(w["peers"].as_array().map(Vec::len) == Some(3), "{w}");
    for (wg, old) in devices[..2].iter().zip(&before) {
        let p = peer(&w, wg.public_key())?;
        ensure!(
            p["last_handshake_unix"] == old["last_handshake_unix"]
                && p["rx_bytes"].as_u64() >= old["rx_bytes"].as_u64(),
            "a peer was touched by the reload: {old} then {p}"
        );
    }
    ensure!(!peer(&w, devices[2].public_key())?["last_handshake"].is_null());
    let now = ours.protocol("bgp_router")?;
    ensure!(
        now["state"] == "Established"
            && now["since_unix"] == session["since_unix"]
            && now["stats"]["established_transitions"]
                == session["stats"]["established_transitions"],
        "the session was touched by the reload: {session} then {now}"
    );
    for client in &clients[..2] {
        ping(&lab, client, VIP)?;
    }

    // A wg-quick key of its own is refused by reload, naming the line;
    // the running interface stays.
    std::fs::write(
        &conf,
        format!("{}PostUp = true\n", wg_quick(&private, &three)),
    )?;
    let refused = ours.cli(&["bgp", "reload"]);
    let message = match refused {
        Ok(out) => out,
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        message.contains("PostUp is wg-quick's own") && !message.contains(&private),
        "{message}"
    );
    ensure!(interface(&ours)?["peers"].as_array().map(Vec::len) == Some(3));
    Ok(())
}
