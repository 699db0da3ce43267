//! Seed 001 end to end, the tunnel side: two servers hold the same VIP
//! (192.168.20.1/24) on their WireGuard interface (our device), share one
//! private key and the same client, announce 192.168.20.0/24 with BFD to
//! the home router (BIRD, the seed's config: `merge paths`, BFD), whose
//! port forward sends UDP 51820 on its WAN address to the VIP. A remote
//! client (wireguard-go) behind the WAN side pings the VIP through the
//! tunnel.
//!
//! What it checks: our device answers from the VIP the client's packets
//! came to (sticky source), so the router's conntrack matches the reply to
//! the port forward and the client's endpoint stays the router's
//! `WAN:51820`; and when the server holding the session dies, the client
//! reaches the other one (after its own re-handshake timers: the servers
//! share no session state).

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::peers::{Bgp4mesh, Bird, WgDevice, WgImpl};
use bgp4mesh_lab::{Iface, Lab, Node, can_run, wait_until};
use common::*;

const VIP: &str = "192.168.20.1";
const CLIENT_TUNNEL: &str = "192.168.20.2";

/// The router (BIRD + nftables port forward), two servers (our WireGuard
/// device + `bgp4mesh run`) and the client (wireguard-go) on the WAN side.
struct Seed<'l> {
    client: Node,
    servers: [Node; 2],
    /// Per server: its end of the LAN link.
    lan: [Iface; 2],
    /// The router's WAN address.
    wan: Iface,
    daemons: Vec<Bgp4mesh<'l>>,
    devices: Vec<WgDevice<'l>>,
    client_wg: WgDevice<'l>,
    _bird: Bird<'l>,
}

impl<'l> Seed<'l> {
    fn start(lab: &'l Lab) -> Result<Seed<'l>> {
        let router = lab.add_node("router")?;
        let (s5, s7) = (lab.add_node("server5")?, lab.add_node("server7")?);
        let client = lab.add_node("client")?;
        let (r5, a5) = lab.link(&router, &s5)?;
        let (r7, a7) = lab.link(&router, &s7)?;
        let (wan, _client_end) = lab.link(&router, &client)?;
        lab.enable_forwarding(&router)?;
        for (server, router_end) in [(&s5, &r5), (&s7, &r7)] {
            lab.add_route(server, &["default", "via", &router_end.ipv4.to_string()])?;
        }

        seed_001_port_forward(lab, &router, &wan, VIP)?;

        // The seed's router config, with test-speed BFD and connect timers.
        let bird = Bird::start(lab, &router, &seed_001_router_bird(&r5, &a5, &r7, &a7))?;

        // The servers' devices: the VIP on each, one private key for both.
        let ours = WgImpl::bgp4mesh(BIN);
        let d5 = WgDevice::start_with(lab, &s5, &ours, &format!("{VIP}/24"), 51820)?;
        let d7 = WgDevice::start_with(lab, &s7, &ours, &format!("{VIP}/24"), 51820)?;
        let key_file = lab.run_dir(&s5)?.join(format!("{}.key", d5.ifname()));
        d7.wg(&[
            "set",
            d7.ifname(),
            "private-key",
            &key_file.to_string_lossy(),
        ])?;
        let client_wg = WgDevice::start(lab, &client, &format!("{CLIENT_TUNNEL}/24"), 51820)?;
        for device in [&d5, &d7] {
            device.set_peer(
                client_wg.public_key(),
                None,
                &[&format!("{CLIENT_TUNNEL}/32")],
                None,
            )?;
        }
        client_wg.set_peer(
            d5.public_key(),
            Some(&format!("{}:51820", wan.ipv4)),
            &[&format!("{VIP}/32")],
            None,
        )?;

        // Each server announces the VIP's prefix, a static on its device.
        let mut daemons = Vec::new();
        for (node, router_end, id, device) in
            [(&s5, &r5, "10.0.5.1", &d5), (&s7, &r7, "10.0.7.1", &d7)]
        {
            daemons.push(start_ours(
                lab,
                node,
                65000,
                id,
                &format!(
                    "{}\n[[bgp.static]]\nprefix = \"192.168.20.0/24\"\ndevice = \"{}\"\n\n[policy.vip]\nrules = [ {{ match = {{ source = [\"static\"] }}, action = \"accept\" }} ]\n",
                    our_neighbor(
                        "bgp_router",
                        router_end.ipv4.into(),
                        65001,
                        "import = \"none\"\nexport = \"vip\"\nbfd = true"
                    ),
                    device.ifname()
                ),
            )?);
        }
        wait_until(SETTLE, "BIRD's ECMP route via both servers", || {
            let v4 = kernel_routes_of(lab, &router, false, "bird")?;
            let mut both = vec![a5.ipv4.to_string(), a7.ipv4.to_string()];
            both.sort();
            ensure!(v4 == vec![("192.168.20.0/24".to_string(), both)], "{v4:?}");
            Ok(())
        })?;
        wait_until(SETTLE, "BIRD's BFD sessions Up", || {
            let sessions = bird.birdc("show bfd sessions")?;
            ensure!(sessions.matches(" Up ").count() == 2, "{sessions}");
            Ok(())
        })?;
        Ok(Seed {
            client,
            servers: [s5, s7],
            lan: [a5, a7],
            wan,
            daemons,
            devices: vec![d5, d7],
            client_wg,
            _bird: bird,
        })
    }

    /// The client's endpoint for the servers, as `wg show` has it.
    fn client_endpoint(&self) -> Result<String> {
        let peers = self.client_wg.peers()?;
        peers
            .first()
            .and_then(|p| p.endpoint.clone())
            .context("the client has no endpoint")
    }

    fn port_forward(&self) -> String {
        format!("{}:51820", self.wan.ipv4)
    }

    /// The server that has a session with the client.
    fn holder(&self) -> Result<usize> {
        let mut holders = Vec::new();
        for (i, device) in self.devices.iter().enumerate() {
            let peers = device.peers()?;
            if peers.iter().any(|p| p.latest_handshake != 0) {
                holders.push(i);
            }
        }
        ensure!(holders.len() == 1, "servers with a session: {holders:?}");
        Ok(holders[0])
    }
}

/// How the server holding the session dies.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// Its LAN link goes down.
    LinkDown,
    /// `kill -9` of its WireGuard device and its BGP daemon.
    Killed,
}

fn failover(death: Death) -> Result<()> {
    if !can_run(
        &format!("seed_001_tunnel_{death:?}"),
        &["bird", "birdc", "wireguard-go", "wg", "ping", "nft"],
    ) {
        return Ok(());
    }
    let lab = Lab::new(&format!("seed-001-tunnel-{death:?}").to_lowercase())?;
    let seed = Seed::start(&lab)?;

    // The handshake, then a few pings: every answer must come back
    // through the port forward.
    wait_until(SETTLE, "a ping through the tunnel", || {
        ping(&lab, &seed.client, VIP)
    })?;
    lab.exec(&seed.client, &["ping", "-c", "5", "-i", "0.2", "-q", VIP])?;
    let endpoint = seed.client_endpoint()?;
    eprintln!("client endpoint after the handshake and pings: {endpoint}");
    ensure!(
        endpoint == seed.port_forward(),
        "the client roamed away from the port forward {}: {endpoint} \
         (the server answered from an address other than the VIP)",
        seed.port_forward()
    );
    let holder = seed.holder()?;
    let survivor = 1 - holder;
    eprintln!("server{} holds the session", [5, 7][holder]);

    let flood = lab.spawn(
        &seed.client,
        "ping-every-20ms",
        &["ping", "-D", "-i", "0.02", "-w", "45", VIP],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let cut = now_unix();
    match death {
        Death::LinkDown => {
            lab.exec(
                &seed.servers[holder],
                &["ip", "link", "set", &seed.lan[holder].name, "down"],
            )?;
        }
        Death::Killed => {
            lab.signal(seed.daemons[holder].proc(), libc::SIGKILL)?;
            lab.signal(seed.devices[holder].proc(), libc::SIGKILL)?;
        }
    }
    wait_until(
        Duration::from_secs(30),
        "the tunnel back through the other server",
        || {
            let log = std::fs::read_to_string(&flood.log)?;
            ensure!(
                reply_times(&log).iter().any(|&t| t > cut + 0.1),
                "no reply since the cut"
            );
            Ok(())
        },
    )?;
    lab.stop(&flood);
    let times = reply_times(&std::fs::read_to_string(&flood.log)?);
    let before = times
        .iter()
        .copied()
        .filter(|&t| t <= cut)
        .fold(0.0, f64::max);
    let after = times
        .iter()
        .copied()
        .filter(|&t| t > cut)
        .fold(f64::INFINITY, f64::min);
    let outage = after - before;
    eprintln!(
        "seed 001 tunnel failover ({death:?}): {outage:.2} s without replies; \
         client endpoint now {}",
        seed.client_endpoint()?
    );
    ensure!(outage < 30.0, "outage {outage:.2} s");
    ensure!(
        seed.client_endpoint()? == seed.port_forward(),
        "the client left the port forward after the failover"
    );
    let peers = seed.devices[survivor].peers()?;
    ensure!(
        peers.iter().any(|p| p.latest_handshake != 0),
        "server{} has no session: {peers:?}",
        [5, 7][survivor]
    );
    Ok(())
}

/// The client keeps the port forward as its endpoint, and when the server
/// holding its session loses its LAN link, the tunnel comes back through
/// the other one.
#[test]
fn tunnel_survives_the_session_holder_losing_its_link() -> Result<()> {
    failover(Death::LinkDown)
}

/// The same with the server killed (`kill -9` of its device and its
/// BGP daemon).
#[test]
fn tunnel_survives_the_session_holder_being_killed() -> Result<()> {
    failover(Death::Killed)
}
