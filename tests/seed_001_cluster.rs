//! Seed 001 with the servers in a cluster: each server is one `bgp4mesh
//! run` whose config has the `[[wireguard]]` interface (the VIP, the shared
//! key, the client) with `[wireguard.cluster]`, and the static announcement
//! with BFD. The home router is BIRD with the seed's config, the port
//! forward to the VIP and masquerade (nftables); the client is Debian's
//! wireguard-go, or our device, behind the WAN side.
//!
//! What the user feels, checked: the client keeps the port forward as its
//! endpoint; when the server holding its session loses its link or is
//! killed (`kill -9`, daemon and device are one process), the client's
//! pings every 20 ms stop for under a second, because the other server
//! knows whose session index the packets carry and handshakes with the
//! client at once; the server that comes back (link up, or restarted) is
//! told the sessions before it takes traffic again, and the failback
//! costs under a second too; datagrams forged to a server's cluster port
//! from a third address are refused, counted, and change nothing.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::peers::{Bgp4mesh, Bird, WgDevice, WgImpl};
use bgp4mesh_lab::{Iface, Lab, Node, can_run, wait_until};
use common::*;
use serde_json::Value;

const VIP: &str = "192.168.20.1";
const CLUSTER_PORT: u16 = 51821;

struct Seed<'l> {
    lab: &'l Lab,
    router: Node,
    /// The first client's node.
    client: Node,
    servers: [Node; 2],
    /// Per server: its end of the LAN link, and the router's.
    lan: [Iface; 2],
    router_lan: [Iface; 2],
    /// The router's WAN address.
    wan: Iface,
    /// Per server: its config body (for a restart).
    configs: [String; 2],
    daemons: [Option<Bgp4mesh<'l>>; 2],
    /// The first client's device.
    client_wg: WgDevice<'l>,
    /// Every client: its node, device and tunnel address.
    clients: Vec<(Node, WgDevice<'l>, String)>,
    bird: Bird<'l>,
}

fn write_secret(path: &std::path::Path, text: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

impl<'l> Seed<'l> {
    /// The seed with one client of each kind in `client_impls`, all on
    /// the router's WAN side (a switch).
    fn start(lab: &'l Lab, client_impls: &[WgImpl]) -> Result<Seed<'l>> {
        let router = lab.add_node("router")?;
        let (s5, s7) = (lab.add_node("server5")?, lab.add_node("server7")?);
        let (r5, a5) = lab.link(&router, &s5)?;
        let (r7, a7) = lab.link(&router, &s7)?;
        let internet = lab.add_switch("internet")?;
        let wan = lab.attach(&internet, &router)?;
        lab.enable_forwarding(&router)?;
        for (server, router_end) in [(&s5, &r5), (&s7, &r7)] {
            lab.add_route(server, &["default", "via", &router_end.ipv4.to_string()])?;
        }
        seed_001_port_forward(lab, &router, &wan, VIP)?;
        let bird = Bird::start(lab, &router, &seed_001_router_bird(&r5, &a5, &r7, &a7))?;

        // One private key for both servers, one cluster key.
        let private = lab.exec(&s5, &["wg", "genkey"])?.trim().to_string();
        let public = lab
            .exec_full(
                &s5,
                &["wg", "pubkey"],
                Some(private.as_bytes()),
                Duration::from_secs(10),
            )?
            .stdout
            .trim()
            .to_string();
        let cluster_key = lab.exec(&s5, &[BIN, "genkey"])?.trim().to_string();

        let mut clients = Vec::new();
        for (k, client_impl) in client_impls.iter().enumerate() {
            let node = lab.add_node(&format!("client{k}"))?;
            lab.attach(&internet, &node)?;
            let tunnel = format!("192.168.20.{}", k + 2);
            let wg = WgDevice::start_with(lab, &node, client_impl, &format!("{tunnel}/24"), 51820)?;
            wg.set_peer(
                &public,
                Some(&format!("{}:51820", wan.ipv4)),
                &[&format!("{VIP}/32")],
                None,
            )?;
            clients.push((node, wg, tunnel));
        }
        let peers: String = clients
            .iter()
            .map(|(_, wg, tunnel)| {
                format!(
                    "[[wireguard.peer]]\npublic_key = \"{}\"\nallowed_ips = [\"{tunnel}/32\"]\n\n",
                    wg.public_key()
                )
            })
            .collect();

        let mut configs = Vec::new();
        for (node, router_end, me, other) in [(&s5, &r5, &a5, &a7), (&s7, &r7, &a7, &a5)] {
            let dir = lab.run_dir(node)?;
            let key_file = dir.join("wg.key");
            let cluster_file = dir.join("cluster.key");
            write_secret(&key_file, &private)?;
            write_secret(&cluster_file, &cluster_key)?;
            let iface = lab.unique_ifname("wg")?;
            configs.push(format!(
                r#"{neighbor}
[[bgp.static]]
prefix = "192.168.20.0/24"
device = "{iface}"

[policy.vip]
rules = [ {{ match = {{ source = ["static"] }}, action = "accept" }} ]

[[wireguard]]
interface = "{iface}"
private_key_file = {key_file:?}
listen_port = 51820
address = ["{VIP}/24"]

[wireguard.cluster]
listen = "{me}:{CLUSTER_PORT}"
members = ["{other}:{CLUSTER_PORT}"]
key_file = {cluster_file:?}

{peers}"#,
                neighbor = our_neighbor(
                    "bgp_router",
                    router_end.ipv4.into(),
                    65001,
                    "import = \"none\"\nexport = \"vip\"\nbfd = true"
                ),
                me = me.ipv4,
                other = other.ipv4,
            ));
        }
        let configs: [String; 2] = [configs[0].clone(), configs[1].clone()];
        let mut all = clients.into_iter();
        let (client, client_wg, _) = all.next().context("no client")?;
        let clients = all.collect();
        let mut seed = Seed {
            lab,
            router,
            client,
            clients,
            servers: [s5, s7],
            lan: [a5, a7],
            router_lan: [r5, r7],
            wan,
            configs,
            daemons: [None, None],
            client_wg,
            bird,
        };
        for i in 0..2 {
            seed.start_server(i)?;
        }
        seed.wait_for_both()?;
        Ok(seed)
    }

    fn start_server(&mut self, i: usize) -> Result<()> {
        let id = ["10.0.5.1", "10.0.7.1"][i];
        self.daemons[i] = Some(start_ours(
            self.lab,
            &self.servers[i],
            65000,
            id,
            &self.configs[i],
        )?);
        Ok(())
    }

    fn daemon(&self, i: usize) -> Result<&Bgp4mesh<'l>> {
        self.daemons[i]
            .as_ref()
            .context("that server is not running")
    }

    /// BIRD's route to the VIP's network via both servers, BFD up with both.
    fn wait_for_both(&self) -> Result<()> {
        wait_until(SETTLE, "BIRD's ECMP route via both servers", || {
            let v4 = kernel_routes_of(self.lab, &self.router, false, "bird")?;
            let mut both = vec![self.lan[0].ipv4.to_string(), self.lan[1].ipv4.to_string()];
            both.sort();
            ensure!(v4 == vec![("192.168.20.0/24".to_string(), both)], "{v4:?}");
            let sessions = self.bird.birdc("show bfd sessions")?;
            ensure!(sessions.matches(" Up ").count() == 2, "{sessions}");
            Ok(())
        })
    }

    /// `show wireguard --json`'s one interface on server `i`.
    fn wireguard(&self, i: usize) -> Result<Value> {
        let all: Value =
            serde_json::from_str(&self.daemon(i)?.cli(&["show", "wireguard", "--json"])?)?;
        all.as_array()
            .and_then(|a| a.first())
            .cloned()
            .context("no [[wireguard]] in show wireguard")
    }

    /// The server whose session the first client's packets use now: the
    /// one that last received from it.
    fn holder(&self) -> Result<usize> {
        let key = self.client_wg.public_key().to_string();
        let rx_of = |w: &Value| -> u64 {
            w["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["public_key"] == key.as_str())
                .and_then(|p| p["rx_bytes"].as_u64())
                .unwrap_or(0)
        };
        let rx: Vec<u64> = (0..2)
            .map(|i| -> Result<u64> { Ok(rx_of(&self.wireguard(i)?)) })
            .collect::<Result<_>>()?;
        std::thread::sleep(Duration::from_millis(500));
        let mut grew = Vec::new();
        for (i, before) in rx.iter().enumerate() {
            if rx_of(&self.wireguard(i)?) > *before {
                grew.push(i);
            }
        }
        ensure!(
            grew.len() == 1,
            "servers receiving from the client: {grew:?}"
        );
        Ok(grew[0])
    }

    /// Every client: node, device, tunnel address.
    fn all_clients(&self) -> Vec<(&Node, &WgDevice<'l>, String)> {
        std::iter::once((&self.client, &self.client_wg, "192.168.20.2".to_string()))
            .chain(self.clients.iter().map(|(n, w, t)| (n, w, t.clone())))
            .collect()
    }

    /// Per server, how many clients it receives from now.
    fn carried(&self) -> Result<[usize; 2]> {
        let rx = |w: &Value| -> Vec<u64> {
            w["peers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p["rx_bytes"].as_u64().unwrap_or(0))
                .collect()
        };
        let before = [rx(&self.wireguard(0)?), rx(&self.wireguard(1)?)];
        std::thread::sleep(Duration::from_millis(500));
        let mut carried = [0; 2];
        for (i, was) in before.iter().enumerate() {
            let now = rx(&self.wireguard(i)?);
            carried[i] = now.iter().zip(was).filter(|(n, b)| n > b).count();
        }
        Ok(carried)
    }

    fn client_endpoint(&self) -> Result<String> {
        self.client_wg
            .peers()?
            .first()
            .and_then(|p| p.endpoint.clone())
            .context("the client has no endpoint")
    }

    fn port_forward(&self) -> String {
        format!("{}:51820", self.wan.ipv4)
    }
}

/// The longest time without a reply in `[from, to]`, edges included.
fn longest_gap(times: &[f64], from: f64, to: f64) -> f64 {
    let mut last = times
        .iter()
        .copied()
        .filter(|&t| t <= from)
        .fold(f64::NAN, f64::max);
    if last.is_nan() {
        last = from;
    }
    let mut gap: f64 = 0.0;
    for &t in times.iter().filter(|&&t| t > from && t <= to) {
        gap = gap.max(t - last);
        last = t;
    }
    gap.max(to - last)
}

/// How the server holding the session fails.
#[derive(Clone, Copy, Debug)]
enum Death {
    /// Its LAN port goes down (the router sees the carrier go).
    LinkDown,
    /// `kill -9` of its daemon (and so its device): the kernel closes the
    /// BGP connection.
    Killed,
    /// Hung: the box drops everything in and out, its link stays up (a
    /// power loss behind a switch, a wedged kernel). Only BFD tells.
    Hung,
}

/// The nftables table that makes a server drop everything.
const HANG: &str = "table inet hang {\n\
    chain input { type filter hook input priority -500; policy drop; }\n\
    chain output { type filter hook output priority -500; policy drop; }\n\
    }\n";

fn failover(death: Death, client_impl: WgImpl) -> Result<()> {
    let name = format!("seed_001_cluster_{death:?}_{}", client_impl.label());
    if !can_run(
        &name,
        &["bird", "birdc", "wireguard-go", "wg", "ping", "nft"],
    ) {
        return Ok(());
    }
    let lab = Lab::new(&name.replace('_', "-").to_lowercase())?;
    let mut seed = Seed::start(&lab, std::slice::from_ref(&client_impl))?;

    wait_until(SETTLE, "a ping through the tunnel", || {
        ping(&lab, &seed.client, VIP)
    })?;
    lab.exec(&seed.client, &["ping", "-c", "5", "-i", "0.2", "-q", VIP])?;
    let endpoint = seed.client_endpoint()?;
    ensure!(
        endpoint == seed.port_forward(),
        "the client roamed away from the port forward {}: {endpoint}",
        seed.port_forward()
    );
    // Both servers are synced and know of the other's session.
    wait_until(
        SETTLE,
        "both servers synced, each knowing the session",
        || {
            let mut known = 0;
            for i in 0..2 {
                let c = &seed.wireguard(i)?["cluster"];
                ensure!(c["synced"] == true, "server {i}: {c}");
                ensure!(c["members"][0]["connected"] == true, "server {i}: {c}");
                known += c["sessions_held"].as_u64().unwrap_or(0)
                    + c["members"][0]["sessions"].as_u64().unwrap_or(0);
            }
            ensure!(known >= 2, "the session is not known on both sides");
            Ok(())
        },
    )?;

    let flood = lab.spawn(
        &seed.client,
        "ping-every-20ms",
        &["ping", "-D", "-i", "0.02", "-w", "40", VIP],
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let holder = seed.holder()?;
    let survivor = 1 - holder;
    eprintln!("server{} holds the session", [5, 7][holder]);
    // It answers from the VIP the client sent to (sticky source).
    let w = seed.wireguard(holder)?;
    ensure!(
        w["peers"][0]["local_address"] == VIP,
        "the holder answers from {}, not the VIP",
        w["peers"][0]["local_address"]
    );
    let cut = now_unix();
    match death {
        Death::LinkDown => {
            lab.exec(
                &seed.servers[holder],
                &["ip", "link", "set", &seed.lan[holder].name, "down"],
            )?;
        }
        Death::Killed => {
            lab.signal(seed.daemon(holder)?.proc(), libc::SIGKILL)?;
        }
        Death::Hung => {
            let out = lab.exec_full(
                &seed.servers[holder],
                &["nft", "-f", "-"],
                Some(HANG.as_bytes()),
                Duration::from_secs(10),
            )?;
            ensure!(out.success(), "nft: {}", out.stderr);
        }
    }
    wait_until(
        Duration::from_secs(20),
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
    std::thread::sleep(Duration::from_secs(2));
    let times = reply_times(&std::fs::read_to_string(&flood.log)?);
    let outage = longest_gap(&times, cut, now_unix());
    let handovers = seed.wireguard(survivor)?["cluster"]["handovers"]
        .as_u64()
        .unwrap_or(0);
    eprintln!(
        "seed 001 cluster failover ({death:?}, client {}): {outage:.2} s without replies; \
         handovers on the survivor: {handovers}; client endpoint {}",
        client_impl.label(),
        seed.client_endpoint()?
    );
    ensure!(outage < 1.0, "outage {outage:.2} s (must be under 1 s)");
    ensure!(handovers >= 1, "the survivor took nothing over");
    ensure!(
        seed.client_endpoint()? == seed.port_forward(),
        "the client left the port forward after the failover"
    );

    // The server comes back: it is told the sessions before it takes
    // traffic, and the failback costs under a second.
    let back = now_unix();
    match death {
        Death::LinkDown => {
            lab.exec(
                &seed.servers[holder],
                &["ip", "link", "set", &seed.lan[holder].name, "up"],
            )?;
            lab.add_route(
                &seed.servers[holder],
                &["default", "via", &seed.router_lan[holder].ipv4.to_string()],
            )
            .ok();
        }
        Death::Killed => {
            lab.stop(seed.daemon(holder)?.proc());
            seed.daemons[holder] = None;
            seed.start_server(holder)?;
        }
        Death::Hung => {
            lab.exec(
                &seed.servers[holder],
                &["nft", "delete", "table", "inet", "hang"],
            )?;
        }
    }
    seed.wait_for_both()?;
    wait_until(
        Duration::from_secs(5),
        "the returning server told the survivor's session",
        || {
            let c = seed.wireguard(holder)?["cluster"].clone();
            ensure!(c["synced"] == true, "not synced: {c}");
            ensure!(
                c["members"][0]["sessions"].as_u64().unwrap_or(0) >= 1,
                "the survivor's session is unknown: {c}"
            );
            Ok(())
        },
    )?;
    std::thread::sleep(Duration::from_secs(3));
    lab.stop(&flood);
    let times = reply_times(&std::fs::read_to_string(&flood.log)?);
    let failback = longest_gap(&times, back, now_unix() - 0.5);
    eprintln!("seed 001 cluster failback ({death:?}): longest gap {failback:.2} s");
    ensure!(failback < 1.0, "failback gap {failback:.2} s");
    Ok(())
}

#[test]
fn cluster_failover_link_down_wireguard_go() -> Result<()> {
    failover(Death::LinkDown, WgImpl::WireguardGo)
}

#[test]
fn cluster_failover_killed_wireguard_go() -> Result<()> {
    failover(Death::Killed, WgImpl::WireguardGo)
}

#[test]
fn cluster_failover_hung_wireguard_go() -> Result<()> {
    failover(Death::Hung, WgImpl::WireguardGo)
}

#[test]
fn cluster_failover_hung_our_client() -> Result<()> {
    failover(Death::Hung, WgImpl::bgp4mesh(BIN))
}

#[test]
fn cluster_failover_link_down_our_client() -> Result<()> {
    failover(Death::LinkDown, WgImpl::bgp4mesh(BIN))
}

/// Datagrams to a server's cluster port from an address that is not a
/// member (garbage, and a well-formed header without the key) are
/// refused and counted, and the tunnel carries on.
#[test]
fn forged_cluster_messages_are_refused() -> Result<()> {
    if !can_run(
        "seed_001_cluster_forged",
        &[
            "bird",
            "birdc",
            "wireguard-go",
            "wg",
            "ping",
            "nft",
            "python3",
        ],
    ) {
        return Ok(());
    }
    let lab = Lab::new("seed-001-cluster-forged")?;
    let seed = Seed::start(&lab, &[WgImpl::WireguardGo])?;
    wait_until(SETTLE, "a ping through the tunnel", || {
        ping(&lab, &seed.client, VIP)
    })?;
    let before = seed.wireguard(0)?["cluster"].clone();
    // From the router: a third address, on the servers' path.
    // Ten datagrams with our header and sizes of real messages but no key
    // behind them, and one too short to be anything.
    let to = std::net::SocketAddr::new(seed.lan[0].ipv4.into(), CLUSTER_PORT);
    lab.in_netns(&seed.router, || -> std::io::Result<()> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        for n in 0..10u8 {
            let mut forged = b"b4mc\x01".to_vec();
            forged.extend((0..24 + 28 + 16 + 55 * usize::from(n)).map(|k| (k as u8) ^ n));
            socket.send_to(&forged, to)?;
        }
        socket.send_to(&[7, 7, 7], to)?;
        Ok(())
    })??;
    wait_until(
        Duration::from_secs(5),
        "the forged datagrams counted",
        || {
            let c = &seed.wireguard(0)?["cluster"];
            let refused = c["refused"].as_u64().unwrap_or(0);
            ensure!(refused >= 11, "refused {refused}: {c}");
            Ok(())
        },
    )?;
    let after = seed.wireguard(0)?["cluster"].clone();
    ensure!(
        after["members"][0]["sessions"] == before["members"][0]["sessions"]
            && after["handovers"] == before["handovers"],
        "forged datagrams changed the cluster: {before} → {after}"
    );
    ping(&lab, &seed.client, VIP)?;
    let text = seed.daemon(0)?.cli(&["show", "wireguard"])?;
    ensure!(
        text.contains("cluster: listening on")
            && text.contains("refused")
            && text.contains(&format!(
                "member {}:{CLUSTER_PORT}: connected, synced",
                seed.lan[1].ipv4
            )),
        "show wireguard: {text}"
    );
    Ok(())
}

/// 20 clients (10 wireguard-go, 10 ours), spread over both servers by the
/// router's ECMP, each pinging the VIP every 50 ms: both servers carry
/// traffic at once, and when one hangs, every client's tunnel passes
/// traffic again within a second.
#[test]
fn twenty_clients_spread_by_ecmp_all_come_back_within_a_second() -> Result<()> {
    if !can_run(
        "seed_001_cluster_twenty_clients",
        &["bird", "birdc", "wireguard-go", "wg", "ping", "nft"],
    ) {
        return Ok(());
    }
    let lab = Lab::new("seed-001-cluster-20")?;
    let impls: Vec<WgImpl> = (0..20)
        .map(|k| {
            if k % 2 == 0 {
                WgImpl::WireguardGo
            } else {
                WgImpl::bgp4mesh(BIN)
            }
        })
        .collect();
    let seed = Seed::start(&lab, &impls)?;
    let clients = seed.all_clients();
    for (node, _, _) in &clients {
        wait_until(SETTLE, "a client's ping through the tunnel", || {
            ping(&lab, node, VIP)
        })?;
    }
    let mut floods = Vec::new();
    for (k, (node, _, _)) in clients.iter().enumerate() {
        floods.push(lab.spawn(
            node,
            &format!("ping-{k}"),
            &["ping", "-D", "-i", "0.05", "-w", "30", VIP],
        )?);
    }
    std::thread::sleep(Duration::from_secs(1));
    let carried = seed.carried()?;
    eprintln!("clients per server before the failure: {carried:?}");
    ensure!(
        carried[0] > 0 && carried[1] > 0 && carried[0] + carried[1] == 20,
        "ECMP does not spread the clients over both servers: {carried:?}"
    );
    let dead = if carried[0] >= carried[1] { 0 } else { 1 };
    let cut = now_unix();
    let out = lab.exec_full(
        &seed.servers[dead],
        &["nft", "-f", "-"],
        Some(HANG.as_bytes()),
        Duration::from_secs(10),
    )?;
    ensure!(out.success(), "nft: {}", out.stderr);
    std::thread::sleep(Duration::from_secs(4));
    let end = now_unix();
    let mut outages = Vec::new();
    for flood in &floods {
        lab.stop(flood);
        let times = reply_times(&std::fs::read_to_string(&flood.log)?);
        outages.push(longest_gap(&times, cut, end));
    }
    let worst = outages.iter().copied().fold(0.0, f64::max);
    let handovers = seed.wireguard(1 - dead)?["cluster"]["handovers"]
        .as_u64()
        .unwrap_or(0);
    eprintln!(
        "20 clients, server{} hung with {} of them: longest outage {worst:.2} s; \
         handovers {handovers}; per client {:?}",
        [5, 7][dead],
        carried[dead],
        outages
            .iter()
            .map(|o| format!("{o:.2}"))
            .collect::<Vec<_>>()
    );
    ensure!(worst < 1.0, "a client's tunnel was out {worst:.2} s");
    ensure!(
        handovers >= carried[dead] as u64,
        "{handovers} handovers for {} clients",
        carried[dead]
    );
    Ok(())
}

/// The env var naming an upstream wireguard-go binary for the interop
/// measurement below.
const UPSTREAM_WIREGUARD_GO: &str = "BGP4MESH_UPSTREAM_WIREGUARD_GO";

/// The client as upstream wireguard-go built from source (`-f`: in the
/// foreground), its binary named by [`UPSTREAM_WIREGUARD_GO`].
fn upstream_wireguard_go() -> Result<WgImpl> {
    let path = std::env::var_os(UPSTREAM_WIREGUARD_GO).with_context(|| {
        format!(
            "{UPSTREAM_WIREGUARD_GO} is not set: point it at an upstream wireguard-go \
             binary (see the doc comment of cluster_failover_hung_upstream_wireguard_go)"
        )
    })?;
    let path = std::path::PathBuf::from(path);
    ensure!(
        path.is_file(),
        "{UPSTREAM_WIREGUARD_GO}={} is not a file: build upstream wireguard-go there first",
        path.display()
    );
    Ok(WgImpl::Command {
        label: "upstream-wireguard-go".into(),
        argv: vec![path.to_string_lossy().into_owned(), "-f".into()],
    })
}

/// Failover with upstream wireguard-go (0.0.20250522) as the client,
/// a hung server. Ignored: CI has no upstream build.
///
/// Build (no Go proxy): take wireguard-go's tree at tag 0.0.20250522;
/// lay out `vendor/` with golang.org/x/crypto v0.37.0, x/net v0.39.0 and
/// x/sys v0.32.0 at those tags (only the packages `go list -deps .`
/// names; gvisor and wintun are not imported on Linux) and a
/// `vendor/modules.txt` listing every go.mod requirement as `## explicit`;
/// then, with Debian backports' golang-1.23-go,
/// `GOFLAGS=-mod=vendor GOTOOLCHAIN=local CGO_ENABLED=0
/// /usr/lib/go-1.23/bin/go build -o /opt/wireguard-go-upstream/wireguard-go .`
/// (`--version` says `wireguard-go v0.0.20250522`).
///
/// Run:
/// `BGP4MESH_UPSTREAM_WIREGUARD_GO=/opt/wireguard-go-upstream/wireguard-go
/// cargo nextest run --test seed_001_cluster --run-ignored only --no-capture`
/// (prints the outage and the failback gap).
#[test]
#[ignore = "needs upstream wireguard-go in $BGP4MESH_UPSTREAM_WIREGUARD_GO"]
fn cluster_failover_hung_upstream_wireguard_go() -> Result<()> {
    failover(Death::Hung, upstream_wireguard_go()?)
}

/// [`cluster_failover_hung_upstream_wireguard_go`] with the holder's
/// daemon killed (`kill -9`); built and run the same way.
#[test]
#[ignore = "needs upstream wireguard-go in $BGP4MESH_UPSTREAM_WIREGUARD_GO"]
fn cluster_failover_killed_upstream_wireguard_go() -> Result<()> {
    failover(Death::Killed, upstream_wireguard_go()?)
}
