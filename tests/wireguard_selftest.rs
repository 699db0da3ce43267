//! The checks of the kernel's WireGuard selftest
//! (`tools/testing/selftests/wireguard/netns.sh`) that apply to a
//! userspace device and are not already tests elsewhere, run against our
//! device (`bgp4mesh wireguard`) on every side and configured with `wg`.
//! docs/wireguard.md maps every check of the selftest to its test here or
//! in `tests/wireguard.rs` and `tests/wireguard_onion.rs`, or says why it
//! does not apply.
//!
//! The selftest creates kernel devices and moves them into namespaces;
//! here each namespace starts its own device, the endpoints are on a veth
//! link instead of a shared loopback, and interface names are unique
//! (userspace UAPI sockets share one directory).

mod common;

use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::peers::{WgDevice, WgImpl};
use bgp4mesh_lab::{Iface, Lab, Node, can_run, wait_until};
use bgp4mesh_wireguard::Key;

use common::{BIN, ping};

const ONE: &str = "192.168.241.1";
const TWO: &str = "192.168.241.2";
const ONE6: &str = "fd00::1";
const TWO6: &str = "fd00::2";
/// The MTU the selftest raises both devices to: its big loopback
/// datagrams less its link MTU, plus the device's default of 1420.
const BIG_MTU: &str = "34736";

fn ours() -> WgImpl {
    WgImpl::bgp4mesh(BIN)
}

/// Which endpoints the two devices get for each other at the start.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoints {
    /// None: whoever is given one later initiates.
    Unset,
    V4,
    V6,
}

/// The selftest's two peers: namespaces `one` and `two` joined by a veth
/// link; in each our device listening on port 1 and 2, with
/// 192.168.241.x/24 and fd00::x/112, each the other's peer with its two
/// tunnel addresses as allowed IPs and one preshared key.
struct Pair<'l> {
    lab: &'l Lab,
    nodes: [Node; 2],
    devices: [WgDevice<'l>; 2],
    links: [Iface; 2],
    psk: String,
}

impl<'l> Pair<'l> {
    fn start(lab: &'l Lab, endpoints: Endpoints) -> Result<Pair<'l>> {
        let nodes = [lab.add_node("one")?, lab.add_node("two")?];
        let (a, b) = lab.link(&nodes[0], &nodes[1])?;
        let links = [a, b];
        // Neighbour discovery on a new link answers the first IPv6 packet
        // a second late; the selftest's endpoints are on loopback, where
        // there is none. Resolved here, so the checks' one-second pings
        // time the device alone.
        for (from, to) in [(0, 1), (1, 0)] {
            let address = links[to].ipv6.to_string();
            wait_until(
                Duration::from_secs(5),
                "IPv6 neighbours on the link",
                || ping(lab, &nodes[from], &address),
            )?;
        }
        let devices = [
            WgDevice::start_with(lab, &nodes[0], &ours(), &format!("{ONE}/24"), 1)?,
            WgDevice::start_with(lab, &nodes[1], &ours(), &format!("{TWO}/24"), 2)?,
        ];
        lab.add_address(&nodes[0], devices[0].ifname(), &format!("{ONE6}/112"))?;
        lab.add_address(&nodes[1], devices[1].ifname(), &format!("{TWO6}/112"))?;
        let psk = key_file(lab, &nodes[0], "psk", &Key::generate_private().to_base64())?;
        let pair = Pair {
            lab,
            nodes,
            devices,
            links,
            psk,
        };
        for i in 0..2 {
            let other = 1 - i;
            let (address, address6) = [(TWO, TWO6), (ONE, ONE6)][i];
            let allowed = format!("{address}/32,{address6}/128");
            let mut args = vec![
                "peer",
                pair.devices[other].public_key(),
                "preshared-key",
                &pair.psk,
                "allowed-ips",
                &allowed,
            ];
            let endpoint = match endpoints {
                Endpoints::Unset => None,
                Endpoints::V4 => Some(format!("{}:{}", pair.links[other].ipv4, other + 1)),
                Endpoints::V6 => Some(format!("[{}]:{}", pair.links[other].ipv6, other + 1)),
            };
            if let Some(endpoint) = &endpoint {
                args.extend(["endpoint", endpoint]);
            }
            pair.set(i, &args)?;
        }
        Ok(pair)
    }

    /// `wg set IFACE ARGS...` on side `i`.
    fn set(&self, i: usize, args: &[&str]) -> Result<()> {
        let mut cmd = vec!["set", self.devices[i].ifname()];
        cmd.extend_from_slice(args);
        self.devices[i].wg(&cmd)?;
        Ok(())
    }

    /// What side `i` shows as the endpoint of the other side's key.
    fn endpoint_seen_by(&self, i: usize) -> Result<Option<String>> {
        let key = self.devices[1 - i].public_key();
        Ok(self.devices[i]
            .peers()?
            .into_iter()
            .find(|p| p.public_key == key)
            .with_context(|| format!("side {i} has no peer {key}"))?
            .endpoint)
    }

    /// Runs a command in side `i`'s namespace; it must succeed.
    fn exec(&self, i: usize, cmd: &[&str]) -> Result<String> {
        self.lab.exec(&self.nodes[i], cmd)
    }
}

/// Writes `key` to a file of mode 0600 in `node`'s run directory, for
/// `wg set … private-key FILE`, and returns its path.
fn key_file(lab: &Lab, node: &Node, name: &str, key: &str) -> Result<String> {
    let path = lab.write_config(node, &format!("{name}.key"), &format!("{key}\n"))?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(path.to_string_lossy().into_owned())
}

/// One ping answered within a second, as the selftest's `ping -c 1 -W 1`
/// (the first one after a change included: its handshake must be quick).
fn ping_once(lab: &Lab, from: &Node, to: &str) -> Result<()> {
    ping(lab, from, to).with_context(|| format!("from {}", from.name()))
}

/// The selftest's `ping -c 10 -f -W 1`: ten flood pings, answered.
fn flood_ping(lab: &Lab, from: &Node, to: &str, count: &str) -> Result<()> {
    let out = lab.try_exec(from, &["ping", "-c", count, "-f", "-W", "1", to])?;
    ensure!(
        out.success(),
        "flood ping from {} to {to}: {}{}",
        from.name(),
        out.stdout,
        out.stderr
    );
    Ok(())
}

/// `iperf3 -Z -t 3 -c ADDRESS` (with `-b 0 -u` for UDP) from `client`
/// to a one-off server on `server` bound to `address`; it must complete.
fn iperf(lab: &Lab, server: &Node, client: &Node, address: &str, udp: bool) -> Result<()> {
    let proc = lab.spawn(
        server,
        &format!("iperf3-{address}"),
        &["iperf3", "-s", "-1", "-B", address],
    )?;
    wait_until(Duration::from_secs(10), "iperf3 listening", || {
        let out = lab.exec(server, &["ss", "-tlnH", "sport = :5201"])?;
        ensure!(!out.trim().is_empty(), "not yet");
        Ok(())
    })?;
    let mut cmd = vec!["iperf3", "-Z", "-t", "3", "-c", address];
    if udp {
        cmd.extend(["-b", "0", "-u"]);
    }
    let out = lab.exec_full(client, &cmd, None, Duration::from_secs(30))?;
    lab.stop(&proc);
    ensure!(
        out.success() && out.stdout.contains("receiver"),
        "{}: {}{}",
        cmd.join(" "),
        out.stdout,
        out.stderr
    );
    Ok(())
}

/// The selftest's battery: flood pings both ways over IPv4 and IPv6, then
/// TCP and UDP (unlimited rate) over both, each way once.
fn pings_tcp_and_udp(pair: &Pair) -> Result<()> {
    let (lab, [one, two]) = (pair.lab, &pair.nodes);
    flood_ping(lab, two, ONE, "10")?;
    flood_ping(lab, one, TWO, "10")?;
    flood_ping(lab, two, ONE6, "10")?;
    flood_ping(lab, one, TWO6, "10")?;
    iperf(lab, two, one, TWO, false)?;
    iperf(lab, one, two, ONE6, false)?;
    iperf(lab, one, two, ONE, true)?;
    iperf(lab, two, one, TWO6, true)?;
    Ok(())
}

/// The battery at the device's MTU and again with both devices at the
/// selftest's big MTU (datagrams of 34 KB: the link is raised to 65535
/// as the selftest's loopback is).
fn pings_tcp_udp_at_default_and_big_mtu(endpoints: Endpoints) -> Result<()> {
    let lab = Lab::new("wg-self-battery")?;
    let pair = Pair::start(&lab, endpoints)?;
    for i in 0..2 {
        pair.exec(
            i,
            &["ip", "link", "set", &pair.links[i].name, "mtu", "65535"],
        )?;
    }
    wait_until(Duration::from_secs(10), "the first handshake", || {
        ping(&lab, &pair.nodes[1], ONE)
    })?;
    pings_tcp_and_udp(&pair)?;
    for i in 0..2 {
        pair.exec(
            i,
            &[
                "ip",
                "link",
                "set",
                pair.devices[i].ifname(),
                "mtu",
                BIG_MTU,
            ],
        )?;
    }
    // The device reads its MTU again within a second.
    std::thread::sleep(Duration::from_millis(1200));
    pings_tcp_and_udp(&pair)
}

#[test]
fn ping_tcp_udp_over_ipv4_endpoints_at_default_and_big_mtu() -> Result<()> {
    if !can_run!(&["wg", "ping", "iperf3", "ss"]) {
        return Ok(());
    }
    pings_tcp_udp_at_default_and_big_mtu(Endpoints::V4)
}

#[test]
fn ping_tcp_udp_over_ipv6_endpoints_at_default_and_big_mtu() -> Result<()> {
    if !can_run!(&["wg", "ping", "iperf3", "ss"]) {
        return Ok(());
    }
    pings_tcp_udp_at_default_and_big_mtu(Endpoints::V6)
}

/// Roaming: side one moves to a new address and a new listen port and is
/// given the other's endpoint again; after one ping the other side shows
/// it at the new address and port. Then over IPv6, with another port.
#[test]
fn roaming_to_a_new_address_and_listen_port() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-roam")?;
    let pair = Pair::start(&lab, Endpoints::V4)?;
    ping_once(&lab, &pair.nodes[0], TWO)?;
    let link = &pair.links[0];
    let new = Ipv4Addr::from(u32::from(link.ipv4) + 98);
    lab.sysctl(
        &pair.nodes[0],
        &format!("net.ipv4.conf.{}.promote_secondaries", link.name),
        "1",
    )?;
    pair.exec(
        0,
        &["ip", "addr", "add", &format!("{new}/24"), "dev", &link.name],
    )?;
    pair.exec(0, &["ip", "addr", "del", &link.cidr4(), "dev", &link.name])?;
    let two_key = pair.devices[1].public_key();
    pair.set(0, &["listen-port", "9999"])?;
    let endpoint = format!("{}:2", pair.links[1].ipv4);
    pair.set(0, &["peer", two_key, "endpoint", &endpoint])?;
    ping_once(&lab, &pair.nodes[0], TWO6).context("after the move over IPv4")?;
    let seen = pair.endpoint_seen_by(1)?;
    ensure!(
        seen == Some(format!("{new}:9999")),
        "after the move over IPv4, side two sees side one at {seen:?}"
    );

    pair.set(0, &["listen-port", "9998"])?;
    let endpoint = format!("[{}]:2", pair.links[1].ipv6);
    pair.set(0, &["peer", two_key, "endpoint", &endpoint])?;
    ping_once(&lab, &pair.nodes[0], TWO).context("after the move over IPv6")?;
    let seen = pair.endpoint_seen_by(1)?;
    ensure!(
        seen == Some(format!("[{}]:9998", link.ipv6)),
        "after the move over IPv6, side two sees side one at {seen:?}"
    );
    Ok(())
}

/// Binds a UDP socket in `node` and returns it with a 1 s read timeout.
fn udp_listener(lab: &Lab, node: &Node, address: &str) -> Result<UdpSocket> {
    let socket = lab.in_netns(node, || UdpSocket::bind(address))??;
    socket.set_read_timeout(Some(Duration::from_secs(1)))?;
    Ok(socket)
}

/// Sends one datagram "X" from `node` to `to`.
fn udp_send(lab: &Lab, node: &Node, to: &str) -> Result<()> {
    lab.in_netns(node, || -> Result<()> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.send_to(b"X", to)?;
        Ok(())
    })?
}

/// The crypto-RP filter: a packet from the tunnel is taken only if its
/// source is in the sending peer's allowed IPs. Side one gives side two
/// 192.168.241.0/24 and gets its datagram; then another peer gets
/// 192.168.241.2/32, and side two's next datagram (from a new listen
/// port) is dropped, though it still moves side two's endpoint.
#[test]
fn allowed_ips_filter_drops_a_source_of_a_more_specific_peer() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-rpf")?;
    let pair = Pair::start(&lab, Endpoints::V4)?;
    ping_once(&lab, &pair.nodes[0], TWO)?;
    pair.set(
        0,
        &[
            "peer",
            pair.devices[1].public_key(),
            "allowed-ips",
            "192.168.241.0/24",
        ],
    )?;
    let listener = udp_listener(&lab, &pair.nodes[0], &format!("{ONE}:1111"))?;
    let target = format!("{ONE}:1111");
    udp_send(&lab, &pair.nodes[1], &target)?;
    let mut buf = [0u8; 16];
    let (n, _) = listener
        .recv_from(&mut buf)
        .context("the datagram from side two within the /24 did not arrive")?;
    ensure!(&buf[..n] == b"X", "received {:?}", &buf[..n]);

    let more_specific = Key::generate_private().public_key().to_base64();
    pair.set(
        0,
        &["peer", &more_specific, "allowed-ips", "192.168.241.2/32"],
    )?;
    pair.set(1, &["listen-port", "9997"])?;
    udp_send(&lab, &pair.nodes[1], &target)?;
    if let Ok((n, from)) = listener.recv_from(&mut buf) {
        anyhow::bail!(
            "a datagram from {from} whose source belongs to another peer got through: {:?}",
            &buf[..n]
        );
    }
    pair.set(0, &["peer", &more_specific, "remove"])?;
    let seen = pair.endpoint_seen_by(0)?;
    ensure!(
        seen == Some(format!("{}:9997", pair.links[1].ipv4)),
        "the dropped datagram did not move side two's endpoint: {seen:?}"
    );
    Ok(())
}

/// A new private key takes effect at once: side one changes its key, side
/// two replaces the old peer by the new key (same preshared key), and
/// side one's next ping is answered within a second: the sessions of the
/// old key are gone and a handshake with the new one starts at once.
#[test]
fn private_key_change_handshakes_at_once() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-newkey")?;
    let pair = Pair::start(&lab, Endpoints::Unset)?;
    let endpoint = format!("{}:2", pair.links[1].ipv4);
    pair.set(
        0,
        &["peer", pair.devices[1].public_key(), "endpoint", &endpoint],
    )?;
    ping_once(&lab, &pair.nodes[0], TWO)?;
    let key3 = Key::generate_private();
    let file = key_file(&lab, &pair.nodes[0], "key3", &key3.to_base64())?;
    pair.set(0, &["private-key", &file])?;
    let pub3 = key3.public_key().to_base64();
    pair.set(
        1,
        &[
            "peer",
            &pub3,
            "preshared-key",
            &pair.psk,
            "allowed-ips",
            "192.168.241.1/32",
            "peer",
            pair.devices[0].public_key(),
            "remove",
        ],
    )?;
    ping_once(&lab, &pair.nodes[0], TWO)?;
    pair.set(1, &["peer", &pub3, "remove"])?;
    Ok(())
}

/// Onion routing through the same device: side one's second peer (a
/// second device on side two) has its endpoint inside the tunnel to side
/// two, so the device carries its own datagrams for one peer inside its
/// tunnel to another; a ping through both must be answered. Then that
/// peer's endpoint is moved into its own allowed IPs, a loop: the ping
/// fails and the device lives on.
#[test]
fn onion_routing_through_the_same_device_even_when_it_loops() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-onion")?;
    let pair = Pair::start(&lab, Endpoints::V4)?;
    ping_once(&lab, &pair.nodes[0], TWO)?;
    let inner = WgDevice::start_with(&lab, &pair.nodes[1], &ours(), "192.168.242.2/24", 5)?;
    inner.set_peer(
        pair.devices[0].public_key(),
        None,
        &["192.168.242.1/32"],
        None,
    )?;
    pair.set(
        0,
        &[
            "peer",
            inner.public_key(),
            "allowed-ips",
            "192.168.242.2/32",
            "endpoint",
            "192.168.241.2:5",
        ],
    )?;
    lab.add_address(&pair.nodes[0], pair.devices[0].ifname(), "192.168.242.1/24")?;
    ping_once(&lab, &pair.nodes[0], "192.168.242.2")
        .context("through the second peer, inside the tunnel to the first")?;

    pair.exec(1, &["ip", "link", "del", inner.ifname()])?;
    pair.set(
        0,
        &["peer", inner.public_key(), "endpoint", "192.168.242.2:5"],
    )?;
    let out = lab.try_exec(
        &pair.nodes[0],
        &["ping", "-W", "1", "-c", "1", "192.168.242.2"],
    )?;
    ensure!(
        !out.success(),
        "a ping into a loop was answered: {}",
        out.stdout
    );
    ensure!(
        lab.is_running(pair.devices[0].proc()),
        "the device died in the loop: {}",
        lab.log_tail(pair.devices[0].proc(), 20)
    );
    pair.set(0, &["peer", inner.public_key(), "remove"])?;
    ping_once(&lab, &pair.nodes[0], TWO)?;
    Ok(())
}

/// `nft` commands, one per element, in `node`.
fn nft(lab: &Lab, node: &Node, commands: &[&[&str]]) -> Result<()> {
    for args in commands {
        let mut cmd = vec!["nft"];
        cmd.extend_from_slice(args);
        lab.exec(node, &cmd)?;
    }
    Ok(())
}

/// Source NAT in `node` of packets from `from` to `to` (prefixes), to
/// the address `to_address`.
fn snat(lab: &Lab, node: &Node, from: &str, to: &str, to_address: &str) -> Result<()> {
    nft(
        lab,
        node,
        &[
            &["add", "table", "ip", "nat"],
            &[
                "add",
                "chain",
                "ip",
                "nat",
                "post",
                "{ type nat hook postrouting priority 100 ; }",
            ],
            &[
                "add", "rule", "ip", "nat", "post", "ip", "saddr", from, "ip", "daddr", to, "snat",
                "to", to_address,
            ],
        ],
    )
}

/// The /24 of an IPv4 link address.
fn net24(address: Ipv4Addr) -> String {
    let [a, b, c, _] = address.octets();
    format!("{a}.{b}.{c}.0/24")
}

/// NAT: side one (persistent keepalive 1 s) behind a router that
/// forgets UDP mappings after 2 s; side two knows side one only from its
/// packets, sees it at the router's address and port 1, and can still
/// reach it after 3 s of silence: the keepalives kept the mapping.
#[test]
fn persistent_keepalive_keeps_a_nat_mapping() -> Result<()> {
    if !can_run!(&["wg", "ping", "nft"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-nat")?;
    let (one, router, two) = (
        lab.add_node("one")?,
        lab.add_node("router")?,
        lab.add_node("two")?,
    );
    let (one_link, router_in) = lab.link(&one, &router)?;
    let (router_out, two_link) = lab.link(&router, &two)?;
    lab.enable_forwarding(&router)?;
    lab.add_route(&one, &["default", "via", &router_in.ipv4.to_string()])?;
    snat(
        &lab,
        &router,
        &net24(one_link.ipv4),
        &net24(two_link.ipv4),
        &router_out.ipv4.to_string(),
    )?;
    lab.sysctl(&router, "net.netfilter.nf_conntrack_udp_timeout", "2")?;
    lab.sysctl(
        &router,
        "net.netfilter.nf_conntrack_udp_timeout_stream",
        "2",
    )?;
    let d1 = WgDevice::start_with(&lab, &one, &ours(), &format!("{ONE}/24"), 1)?;
    let d2 = WgDevice::start_with(&lab, &two, &ours(), &format!("{TWO}/24"), 2)?;
    d2.set_peer(d1.public_key(), None, &[&format!("{ONE}/32")], None)?;
    d1.set_peer(
        d2.public_key(),
        Some(&format!("{}:2", two_link.ipv4)),
        &[&format!("{TWO}/32")],
        Some(1),
    )?;
    ping_once(&lab, &one, TWO)?;
    ping_once(&lab, &two, ONE)?;
    let seen = d2.peers()?.first().and_then(|p| p.endpoint.clone());
    ensure!(
        seen == Some(format!("{}:1", router_out.ipv4)),
        "side two sees side one at {seen:?}"
    );
    std::thread::sleep(Duration::from_secs(3));
    ping_once(&lab, &two, ONE)?;
    d1.wg(&[
        "set",
        d1.ifname(),
        "peer",
        d2.public_key(),
        "persistent-keepalive",
        "0",
    ])?;
    Ok(())
}

/// A socket bound to the device (`ping -I IFACE`) gets through; so it
/// does when every packet leaving side one is marked, so the device's own
/// datagrams are routed again after the mark is set.
#[test]
fn ping_bound_to_the_interface_and_with_marked_packets() -> Result<()> {
    if !can_run!(&["wg", "ping", "nft"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-bound")?;
    let pair = Pair::start(&lab, Endpoints::V4)?;
    let (one, ifname) = (&pair.nodes[0], pair.devices[0].ifname());
    ping_once(&lab, one, TWO)?;
    let bound = ["ping", "-I", ifname, "-c", "1", "-W", "1", TWO];
    pair.exec(0, &bound)?;
    nft(
        &lab,
        one,
        &[
            &["add", "table", "ip", "mangle"],
            &[
                "add",
                "chain",
                "ip",
                "mangle",
                "out",
                "{ type route hook output priority -150 ; }",
            ],
            &[
                "add", "rule", "ip", "mangle", "out", "meta", "mark", "set", "1",
            ],
        ],
    )?;
    ping_once(&lab, one, TWO)?;
    pair.exec(0, &bound)
        .context("a ping bound to the device with every packet marked")?;
    nft(&lab, one, &[&["delete", "table", "ip", "mangle"]])?;
    Ok(())
}

/// wg-quick's policy routing of a default route, over IPv4 and IPv6:
/// the device's own datagrams carry fwmark 51820 and take the main
/// table's default route (through a router); everything else goes into
/// the tunnel. A hundred flood pings to an address only side two has,
/// each family.
#[test]
fn default_route_through_the_tunnel_with_fwmark_policy_routing() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-policy")?;
    let (one, router, two) = (
        lab.add_node("one")?,
        lab.add_node("router")?,
        lab.add_node("two")?,
    );
    let (one_link, router_in) = lab.link(&one, &router)?;
    let (router_out, two_link) = lab.link(&router, &two)?;
    lab.enable_forwarding(&router)?;
    lab.add_route(&one, &["default", "via", &router_in.ipv4.to_string()])?;
    lab.exec(
        &one,
        &[
            "ip",
            "-6",
            "route",
            "add",
            "default",
            "via",
            &router_in.ipv6.to_string(),
        ],
    )?;
    lab.add_route(&two, &["default", "via", &router_out.ipv4.to_string()])?;
    let d1 = WgDevice::start_with(&lab, &one, &ours(), &format!("{ONE}/24"), 1)?;
    let d2 = WgDevice::start_with(&lab, &two, &ours(), &format!("{TWO}/24"), 2)?;
    lab.add_address(&one, d1.ifname(), &format!("{ONE6}/112"))?;
    lab.add_address(&two, d2.ifname(), &format!("{TWO6}/112"))?;
    lab.add_address(&two, d2.ifname(), "192.168.99.7/32")?;
    lab.add_address(&two, d2.ifname(), "abab::1111/128")?;
    d2.set_peer(
        d1.public_key(),
        None,
        &[&format!("{ONE}/32"), &format!("{ONE6}/128")],
        None,
    )?;
    d1.wg(&[
        "set",
        d1.ifname(),
        "fwmark",
        "51820",
        "peer",
        d2.public_key(),
        "allowed-ips",
        "192.168.99.7,abab::1111",
        "endpoint",
        &format!("{}:2", two_link.ipv4),
    ])?;
    for family in ["-4", "-6"] {
        let ip = |args: &[&str]| -> Result<String> {
            let mut cmd = vec!["ip", family];
            cmd.extend_from_slice(args);
            lab.exec(&one, &cmd)
        };
        ip(&[
            "route",
            "add",
            "default",
            "dev",
            d1.ifname(),
            "table",
            "51820",
        ])?;
        ip(&["rule", "add", "not", "fwmark", "51820", "table", "51820"])?;
        ip(&["rule", "add", "table", "main", "suppress_prefixlength", "0"])?;
    }
    lab.sysctl(
        &one,
        &format!("net.ipv4.conf.{}.rp_filter", one_link.name),
        "0",
    )?;
    flood_ping(&lab, &one, "192.168.99.7", "100")?;
    flood_ping(&lab, &one, "abab::1111", "100")?;
    Ok(())
}

/// A packet NATed into the device by its host for an address no peer
/// has gets its ICMP host unreachable back along the route it came: the
/// sender (behind a strict filter that takes only its own link's
/// sources) sees "Destination Host Unreachable" from the NAT host's
/// address on that link.
#[test]
fn icmp_unreachable_reaches_a_sender_natted_into_the_device() -> Result<()> {
    if !can_run!(&["wg", "ping", "nft"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-icmpnat")?;
    let pair = Pair::start(&lab, Endpoints::V4)?;
    let zero = lab.add_node("zero")?;
    let (zero_link, two_link) = lab.link(&zero, &pair.nodes[1])?;
    let two = &pair.nodes[1];
    snat(&lab, two, &net24(zero_link.ipv4), "192.168.241.0/24", TWO)?;
    nft(
        &lab,
        &zero,
        &[
            &["add", "table", "ip", "filter"],
            &[
                "add",
                "chain",
                "ip",
                "filter",
                "input",
                "{ type filter hook input priority 0 ; }",
            ],
            &[
                "add",
                "rule",
                "ip",
                "filter",
                "input",
                "iifname",
                &zero_link.name,
                "ip",
                "saddr",
                "!=",
                &net24(zero_link.ipv4),
                "drop",
            ],
        ],
    )?;
    lab.sysctl(two, "net.ipv4.ip_forward", "1")?;
    lab.add_route(&zero, &[ONE, "via", &two_link.ipv4.to_string()])?;
    pair.set(1, &["peer", pair.devices[0].public_key(), "remove"])?;
    let out = lab.try_exec(&zero, &["ping", "-W", "1", "-c", "1", ONE])?;
    let expected = format!(
        "From {} icmp_seq=1 Destination Host Unreachable",
        two_link.ipv4
    );
    ensure!(
        !out.success() && out.stdout.contains(&expected),
        "no {expected:?} in: {}{}",
        out.stdout,
        out.stderr
    );
    Ok(())
}

/// Sticky, but not too sticky: side one talks to side two from its link
/// address; that address is replaced by another, and the next ping still
/// goes through (from the new one). Over IPv4, then over IPv6.
#[test]
fn source_address_removed_falls_over_to_the_new_one() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-unstick")?;
    let pair = Pair::start(&lab, Endpoints::Unset)?;
    let (one, link) = (&pair.nodes[0], &pair.links[0]);
    let two_key = pair.devices[1].public_key();
    lab.sysctl(
        one,
        &format!("net.ipv4.conf.{}.promote_secondaries", link.name),
        "1",
    )?;
    pair.set(
        0,
        &[
            "peer",
            two_key,
            "endpoint",
            &format!("{}:2", pair.links[1].ipv4),
        ],
    )?;
    ping_once(&lab, one, TWO).context("over IPv4")?;
    let new4 = Ipv4Addr::from(u32::from(link.ipv4) + 9);
    pair.exec(
        0,
        &[
            "ip",
            "addr",
            "add",
            &format!("{new4}/24"),
            "dev",
            &link.name,
        ],
    )?;
    pair.exec(0, &["ip", "addr", "del", &link.cidr4(), "dev", &link.name])?;
    ping_once(&lab, one, TWO).context("after the IPv4 source was replaced")?;

    let endpoint = format!("[{}]:2", pair.links[1].ipv6);
    pair.set(0, &["peer", two_key, "endpoint", &endpoint])?;
    ping_once(&lab, one, TWO).context("over IPv6")?;
    let new6 = Ipv6Addr::from(u128::from(link.ipv6) + 0xf);
    lab.add_address(one, &link.name, &format!("{new6}/64"))?;
    pair.exec(0, &["ip", "addr", "del", &link.cidr6(), "dev", &link.name])?;
    ping_once(&lab, one, TWO).context("after the IPv6 source was replaced")?;
    Ok(())
}

/// Reply to sender: side one has two addresses of each family on its
/// link; whichever side two sends to, side one answers from it, so side
/// two's endpoint stays the one it was given. Also when the address side
/// two sends to is on another interface of side one (a dummy) than the
/// one the packets come in on.
#[test]
fn replies_come_from_the_address_the_peer_sent_to() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-replyto")?;
    let pair = Pair::start(&lab, Endpoints::Unset)?;
    let (one, two, link) = (&pair.nodes[0], &pair.nodes[1], &pair.links[0]);
    let extra4 = Ipv4Addr::from(u32::from(link.ipv4) + 100);
    let extra6 = Ipv6Addr::from(u128::from(link.ipv6) + 0x100);
    lab.add_address(one, &link.name, &format!("{extra4}/24"))?;
    lab.add_address(one, &link.name, &format!("{extra6}/64"))?;
    let one_key = pair.devices[0].public_key();
    for endpoint in [
        format!("{}:1", link.ipv4),
        format!("[{}]:1", link.ipv6),
        format!("{extra4}:1"),
        format!("[{extra6}]:1"),
    ] {
        pair.set(1, &["peer", one_key, "endpoint", &endpoint])?;
        ping_once(&lab, two, ONE)?;
        let seen = pair.endpoint_seen_by(1)?;
        ensure!(
            seen.as_deref() == Some(endpoint.as_str()),
            "sent to {endpoint}, answered from {seen:?}"
        );
    }

    // The selftest's dummy interface; a veth pair inside side one here
    // (no dummy module on every machine).
    pair.exec(
        0,
        &[
            "ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1",
        ],
    )?;
    lab.add_address(one, "other0", "10.50.0.1/24")?;
    pair.exec(0, &["ip", "link", "set", "other0", "up"])?;
    pair.exec(0, &["ip", "link", "set", "other1", "up"])?;
    lab.add_route(two, &["10.50.0.0/24", "dev", &pair.links[1].name])?;
    pair.set(1, &["peer", one_key, "endpoint", "10.50.0.1:1"])?;
    ping_once(&lab, two, ONE)?;
    let seen = pair.endpoint_seen_by(1)?;
    ensure!(
        seen.as_deref() == Some("10.50.0.1:1"),
        "sent to the other interface's address, answered from {seen:?}"
    );
    Ok(())
}

/// A route through another interface takes precedence: side one reaches
/// side two on one link from 10.60.0.1; a better route to the same
/// network through a second link, source 10.60.0.3, is added, and side
/// one's next packets must come from 10.60.0.3 (the kernel module drops
/// a remembered source whose route leaves by another interface than the
/// one the peer's packets came in on).
#[test]
fn source_follows_a_better_route_through_another_interface() -> Result<()> {
    if !can_run!(&["wg", "ping"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-reroute")?;
    let pair = Pair::start(&lab, Endpoints::Unset)?;
    let (one, two) = (&pair.nodes[0], &pair.nodes[1]);
    let (link1, link2) = (&pair.links[0].name, &pair.links[1].name);
    let (link3, link4) = lab.link(one, two)?;
    for (node, link) in [
        (one, link1),
        (two, link2),
        (one, &link3.name),
        (two, &link4.name),
    ] {
        lab.exec(node, &["ip", "-4", "addr", "flush", "dev", link])?;
    }
    lab.add_address(one, link1, "10.60.0.1/24")?;
    lab.add_address(two, link2, "10.60.0.2/24")?;
    lab.add_address(one, &link3.name, "10.60.0.3/24")?;
    for link in [link1, &link3.name] {
        lab.exec(one, &["ip", "-4", "route", "flush", "dev", link])?;
    }
    lab.exec(
        one,
        &[
            "ip",
            "route",
            "add",
            "10.60.0.0/24",
            "dev",
            link1,
            "src",
            "10.60.0.1",
            "metric",
            "2",
        ],
    )?;
    pair.set(
        0,
        &[
            "peer",
            pair.devices[1].public_key(),
            "endpoint",
            "10.60.0.2:2",
        ],
    )?;
    ping_once(&lab, one, TWO)?;
    let seen = pair.endpoint_seen_by(1)?;
    ensure!(
        seen.as_deref() == Some("10.60.0.1:1"),
        "side two sees side one at {seen:?}"
    );
    lab.exec(
        one,
        &[
            "ip",
            "route",
            "add",
            "10.60.0.0/24",
            "dev",
            &link3.name,
            "src",
            "10.60.0.3",
            "metric",
            "1",
        ],
    )?;
    for (node, link) in [
        (one, link1.as_str()),
        (two, &link4.name),
        (one, "all"),
        (two, "all"),
    ] {
        lab.sysctl(node, &format!("net.ipv4.conf.{link}.rp_filter"), "0")?;
    }
    // The kernel module looks the route up per packet; the device learns
    // of the new route from netlink in its timer thread, within
    // milliseconds, or a moment later on a loaded machine: the pings that
    // follow must come from the new source within a second.
    wait_until(Duration::from_secs(2), "side one's new source", || {
        ping_once(&lab, one, TWO)?;
        let seen = pair.endpoint_seen_by(1)?;
        ensure!(
            seen.as_deref() == Some("10.60.0.3:1"),
            "after the better route, side two sees side one at {seen:?}"
        );
        Ok(())
    })?;
    Ok(())
}

/// Padding stays within the route's MTU: both devices at 1300, a route
/// to the other side's address with MTU 1299, and datagrams of exactly
/// 1360 bytes (what padding a 1297-byte packet up to 1300 makes)
/// dropped on the way in; a ping of 1297 bytes must get through, so it
/// may be padded to 1299 only.
#[test]
fn padding_stays_within_the_route_mtu() -> Result<()> {
    if !can_run!(&["wg", "ping", "nft"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-padding")?;
    let pair = Pair::start(&lab, Endpoints::V4)?;
    ping_once(&lab, &pair.nodes[1], ONE)?;
    for (i, other) in [(0, TWO), (1, ONE)] {
        let ifname = pair.devices[i].ifname();
        pair.exec(i, &["ip", "link", "set", ifname, "mtu", "1300"])?;
        pair.exec(
            i,
            &[
                "ip",
                "route",
                "add",
                &format!("{other}/32"),
                "dev",
                ifname,
                "mtu",
                "1299",
            ],
        )?;
        nft(
            &lab,
            &pair.nodes[i],
            &[
                &["add", "table", "ip", "filter"],
                &[
                    "add",
                    "chain",
                    "ip",
                    "filter",
                    "input",
                    "{ type filter hook input priority 0 ; }",
                ],
                &[
                    "add", "rule", "ip", "filter", "input", "ip", "length", "1360", "drop",
                ],
            ],
        )?;
    }
    // The devices read their MTU again within a second.
    std::thread::sleep(Duration::from_millis(1200));
    // The device learns the route's MTU from netlink in its timer thread
    // (the kernel module has it per packet): at once, or a moment later on
    // a loaded machine.
    wait_until(Duration::from_secs(2), "a 1297-byte ping through", || {
        let out = lab.try_exec(
            &pair.nodes[1],
            &["ping", "-c", "1", "-W", "1", "-s", "1269", ONE],
        )?;
        ensure!(
            out.success(),
            "a 1297-byte packet on a route of MTU 1299 was padded past it: {}",
            out.stdout
        );
        Ok(())
    })?;
    Ok(())
}

/// Writes `lines` as a config and loads it with `wg setconf`.
fn setconf(lab: &Lab, device: &WgDevice, name: &str, lines: &[String]) -> Result<()> {
    let file = lab.write_config(device.node(), name, &(lines.join("\n") + "\n"))?;
    let out = lab.exec_full(
        device.node(),
        &["wg", "setconf", device.ifname(), &file.to_string_lossy()],
        None,
        Duration::from_secs(120),
    )?;
    ensure!(out.success(), "wg setconf {name}: {}", out.stderr);
    Ok(())
}

fn random_key() -> String {
    Key::generate_private().to_base64()
}

/// What the selftest loads to provoke split netlink answers, read back
/// whole through `wg show`: one peer with 65280 IPv4 /16s and as many IPv6
/// /128s; 40 peers of 52 networks each; 30 peers, only the last with
/// allowed IPs (`showconf`); a peer with none before one with 197.
#[test]
fn wg_show_lists_large_configs_whole() -> Result<()> {
    if !can_run!(&["wg"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-large")?;
    let node = lab.add_node("zero")?;
    let mut port = 51000;
    let mut device = || -> Result<WgDevice> {
        port += 1;
        WgDevice::start_with(&lab, &node, &ours(), "10.9.0.1/24", port)
    };

    let d = device()?;
    let mut config = vec![
        "[Interface]".to_string(),
        format!("PrivateKey = {}", random_key()),
        "[Peer]".to_string(),
        format!("PublicKey = {}", random_key()),
    ];
    for a in 1..=255 {
        for b in 0..=255 {
            config.push(format!("AllowedIPs = {a}.{b}.0.0/16,{a}::{b}/128"));
        }
    }
    setconf(&lab, &d, "one-peer.conf", &config)?;
    let out = lab.exec_full(
        &node,
        &["wg", "show", d.ifname(), "allowed-ips"],
        None,
        Duration::from_secs(60),
    )?;
    let words = out.stdout.split_whitespace().count();
    ensure!(
        words == 255 * 256 * 2 + 1,
        "wg show allowed-ips: {words} words"
    );
    lab.exec(&node, &["ip", "link", "del", d.ifname()])?;

    let d = device()?;
    let mut config = vec![
        "[Interface]".to_string(),
        format!("PrivateKey = {}", random_key()),
    ];
    for a in 1..=40 {
        config.push("[Peer]".to_string());
        config.push(format!("PublicKey = {}", random_key()));
        for b in 1..=52 {
            config.push(format!("AllowedIPs = {a}.{b}.0.0/16"));
        }
    }
    setconf(&lab, &d, "forty-peers.conf", &config)?;
    let out = d.wg(&["show", d.ifname(), "allowed-ips"])?;
    let lines: Vec<usize> = out.lines().map(|l| l.split_whitespace().count()).collect();
    ensure!(
        lines.len() == 40 && lines.iter().all(|&n| n == 53),
        "wg show allowed-ips of 40 peers: words per line {lines:?}"
    );
    lab.exec(&node, &["ip", "link", "del", d.ifname()])?;

    let d = device()?;
    let mut config = Vec::new();
    for _ in 0..29 {
        config.push("[Peer]".to_string());
        config.push(format!("PublicKey = {}", random_key()));
    }
    config.push("[Peer]".to_string());
    config.push(format!("PublicKey = {}", random_key()));
    config.push("AllowedIPs = 255.2.3.4/32,abcd::255/128".to_string());
    setconf(&lab, &d, "thirty-peers.conf", &config)?;
    let conf = d.wg(&["showconf", d.ifname()])?;
    ensure!(
        conf.matches("[Peer]").count() == 30
            && conf.contains("AllowedIPs = 255.2.3.4/32, abcd::255/128"),
        "wg showconf:\n{conf}"
    );
    lab.exec(&node, &["ip", "link", "del", d.ifname()])?;

    let d = device()?;
    let (pub1, pub2) = (random_key(), random_key());
    let allowed: Vec<String> = (1..=197).map(|i| format!("abcd::{i}")).collect();
    d.wg(&["set", d.ifname(), "peer", &pub1])?;
    d.wg(&[
        "set",
        d.ifname(),
        "peer",
        &pub2,
        "allowed-ips",
        &allowed.join(","),
    ])?;
    let out = d.wg(&["show", d.ifname(), "allowed-ips"])?;
    let lines: Vec<Vec<&str>> = out
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    ensure!(
        lines.len() == 2
            && lines[0] == [pub1.as_str(), "(none)"]
            && lines[1].first() == Some(&pub2.as_str())
            && lines[1].len() == 198,
        "wg show allowed-ips:\n{out}"
    );
    Ok(())
}

/// Keys as `wg` sets and shows them: a private and a preshared key read
/// back; `/dev/null` clears both; a peer with the device's own public key
/// is removed when the key is set and refused after; allowed IPs that
/// overlap are replaced by a set of one; and `wg show` of a device that
/// does not exist fails.
#[test]
fn keys_read_back_cleared_and_own_public_key_refused() -> Result<()> {
    if !can_run!(&["wg"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-keys")?;
    let node = lab.add_node("zero")?;
    let d = WgDevice::start_with(&lab, &node, &ours(), "10.9.0.1/24", 51820)?;
    let ifname = d.ifname();
    let show =
        |what: &str| -> Result<String> { Ok(d.wg(&["show", ifname, what])?.trim().to_string()) };
    let (key1, key2) = (Key::generate_private(), Key::generate_private());
    let pub2 = key2.public_key().to_base64();
    let psk = Key::generate_private().to_base64();
    let key1_file = key_file(&lab, &node, "key1", &key1.to_base64())?;
    let key2_file = key_file(&lab, &node, "key2", &key2.to_base64())?;
    let psk_file = key_file(&lab, &node, "psk", &psk)?;

    d.wg(&[
        "set",
        ifname,
        "private-key",
        &key1_file,
        "peer",
        &pub2,
        "preshared-key",
        &psk_file,
    ])?;
    ensure!(
        show("private-key")? == key1.to_base64(),
        "private key read back"
    );
    ensure!(
        show("preshared-keys")? == format!("{pub2}\t{psk}"),
        "preshared key read back: {}",
        show("preshared-keys")?
    );
    d.wg(&[
        "set",
        ifname,
        "private-key",
        "/dev/null",
        "peer",
        &pub2,
        "preshared-key",
        "/dev/null",
    ])?;
    ensure!(
        show("private-key")? == "(none)",
        "cleared private key: {}",
        show("private-key")?
    );
    ensure!(
        show("preshared-keys")? == format!("{pub2}\t(none)"),
        "cleared preshared key: {}",
        show("preshared-keys")?
    );

    d.wg(&["set", ifname, "peer", &pub2])?;
    d.wg(&["set", ifname, "private-key", &key2_file])?;
    ensure!(show("public-key")? == pub2, "public key of key2");
    ensure!(
        show("peers")?.is_empty(),
        "the peer with our own public key is still there: {}",
        show("peers")?
    );
    d.wg(&["set", ifname, "peer", &pub2])?;
    ensure!(
        show("peers")?.is_empty(),
        "a peer with our own public key was added: {}",
        show("peers")?
    );
    d.wg(&["set", ifname, "private-key", &key1_file])?;
    d.wg(&["set", ifname, "peer", &pub2])?;
    ensure!(show("peers")? == pub2, "peers: {}", show("peers")?);

    for (overlapping, one) in [
        (
            "0.0.0.0/0,10.0.0.0/8,100.0.0.0/10,172.16.0.0/12,192.168.0.0/16",
            "0.0.0.0/0",
        ),
        ("::/0,1700::/111,5000::/4,e000::/37,9000::/75", "::/0"),
    ] {
        d.wg(&["set", ifname, "peer", &pub2, "allowed-ips", overlapping])?;
        d.wg(&["set", ifname, "peer", &pub2, "allowed-ips", one])?;
        ensure!(
            show("allowed-ips")? == format!("{pub2}\t{one}"),
            "allowed ips: {}",
            show("allowed-ips")?
        );
    }
    d.wg(&["set", ifname, "peer", &pub2, "remove"])?;
    ensure!(show("peers")?.is_empty(), "removed peer still there");

    let out = lab.try_exec(&node, &["wg", "show", "doesnotexist"])?;
    ensure!(
        !out.success(),
        "wg show of a missing device succeeded: {}",
        out.stdout
    );
    Ok(())
}

/// Peers whose public keys are points of small order (the X25519 inputs
/// whose shared secret is all zeros) are taken, but nothing is ever sent
/// to them: with a 1 s persistent keepalive and an endpoint, no datagram
/// reaches that endpoint in 2 s after the link comes up.
#[test]
fn low_order_peer_keys_are_never_sent_to() -> Result<()> {
    if !can_run!(&["wg"]) {
        return Ok(());
    }
    let lab = Lab::new("wg-self-loworder")?;
    let node = lab.add_node("zero")?;
    lab.exec(&node, &["ip", "link", "set", "lo", "up"])?;
    let d = WgDevice::start_with(&lab, &node, &ours(), "10.9.0.1/24", 51820)?;
    let key1 = key_file(&lab, &node, "key1", &Key::generate_private().to_base64())?;
    d.wg(&["set", d.ifname(), "private-key", &key1])?;
    lab.exec(&node, &["ip", "link", "set", d.ifname(), "down"])?;
    for point in [
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "AQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "4Ot6fDtBuK4WVuP68Z/EatoJjeucMrH9hmIFFl9JuAA=",
        "X5yVvKNQjCSx0LFVnIPvWwREXMRYHI6G2CJO3dCfEVc=",
        "7P///////////////////////////////////////38=",
        "7f///////////////////////////////////////38=",
        "7v///////////////////////////////////////38=",
    ] {
        d.wg(&[
            "set",
            d.ifname(),
            "peer",
            point,
            "persistent-keepalive",
            "1",
            "endpoint",
            "127.0.0.1:1111",
        ])?;
    }
    ensure!(
        !d.wg(&["show", d.ifname(), "peers"])?.trim().is_empty(),
        "no peers taken"
    );
    let listener = udp_listener(&lab, &node, "127.0.0.1:1111")?;
    listener.set_read_timeout(Some(Duration::from_secs(2)))?;
    lab.exec(&node, &["ip", "link", "set", d.ifname(), "up"])?;
    let mut buf = [0u8; 256];
    if let Ok((n, from)) = listener.recv_from(&mut buf) {
        anyhow::bail!("{n} bytes from {from} sent to a peer with a low-order key");
    }
    Ok(())
}
