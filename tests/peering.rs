//! `[[peering]]` end to end: seed 000 (a DN42 VPS reaching DN42 through
//! its home edge over WireGuard, iBGP) with the VPS's tunnel, addresses and
//! session all from one peering block, against wireguard-go and BIRD; and
//! a reload that adds, changes and removes peerings, touching only those.

mod common;

use std::os::unix::fs::PermissionsExt;

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::peers::{Bgp4mesh, Bird, WgDevice};
use bgp4mesh_lab::{Lab, Node, can_run, wait_until};
use common::*;
use serde_json::Value;

/// `show peerings --json`, the entry named `name`.
fn peering(ours: &Bgp4mesh, name: &str) -> Result<Value> {
    let all: Value = serde_json::from_str(&ours.cli(&["show", "peerings", "--json"])?)?;
    all.as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .cloned()
        .with_context(|| format!("no peering {name} in {all}"))
}

/// One `[[peering]]` with fast BGP timers for tests.
#[allow(clippy::too_many_arguments)]
fn peering_block(
    name: &str,
    interface: &str,
    key_file: &str,
    port: u16,
    peer_key: &str,
    endpoint: &str,
    address: &str,
    peer_address: &str,
    bgp: &str,
) -> String {
    format!(
        r#"
[[peering]]
name = "{name}"
interface = "{interface}"
private_key_file = "{key_file}"
listen_port = {port}
peer_public_key = "{peer_key}"
endpoint = "{endpoint}"
persistent_keepalive = 5
address = ["{address}"]
peer_address = ["{peer_address}"]
mtu = 1420

[peering.bgp]
families = ["ipv4"]
connect_retry = 1
error_wait = [1, 4]
{bgp}
"#
    )
}

/// The public key of a private key file, by `bgp4mesh pubkey`.
fn pubkey_of(lab: &Lab, node: &Node, key_file: &str) -> Result<String> {
    let key = std::fs::read(key_file)?;
    let out = lab.exec_full(
        node,
        &[BIN, "pubkey"],
        Some(&key),
        std::time::Duration::from_secs(30),
    )?;
    ensure!(out.success(), "bgp4mesh pubkey: {}", out.stderr);
    Ok(out.stdout.trim().to_string())
}

/// Seed 000 over IPv4: the VPS (bgp4mesh) has one peering to the edge
/// (wireguard-go + BIRD, iBGP, next hop self); the edge has an eBGP
/// session to a DN42 peer (BIRD) announcing 60 prefixes. They all reach
/// the VPS's kernel through the tunnel with the VPS's DN42 address as
/// source, and a ping from it into DN42 is answered. The VPS's key is
/// made by the daemon on first start (0600).
#[test]
fn seed_000_vps_reaches_dn42_over_a_peering() -> Result<()> {
    if !can_run!(&["bird", "birdc", "ping", "wg", "wireguard-go"],) {
        return Ok(());
    }
    seed_000_over_a_peering(false)
}

/// Seed 000 as DN42 peers often run it: the session between the tunnel's
/// IPv6 link-local addresses, IPv4 routes over it with link-local next
/// hops (extended next hop, RFC 8950), installed via the tunnel.
#[test]
fn seed_000_over_a_link_local_session() -> Result<()> {
    if !can_run!(&["bird", "birdc", "ping", "wg", "wireguard-go"],) {
        return Ok(());
    }
    seed_000_over_a_peering(true)
}

fn seed_000_over_a_peering(link_local: bool) -> Result<()> {
    let lab = Lab::new(if link_local {
        "peering-seed-000-ll"
    } else {
        "peering-seed-000"
    })?;
    let (vps, edge, dn42) = (
        lab.add_node("vps")?,
        lab.add_node("edge")?,
        lab.add_node("dn42")?,
    );
    let (v, e1) = lab.link(&vps, &edge)?;
    let (e2, d) = lab.link(&edge, &dn42)?;
    // The edge's tunnel: wireguard-go, 10.132.0.2/30 (the seed's /30).
    let wg = WgDevice::start(&lab, &edge, "10.132.0.2/30", 51823)?;
    if link_local {
        lab.add_address(&edge, wg.ifname(), "fe80::2/64")?;
    }
    let prefixes: Vec<String> = (0..60).map(|n| format!("172.20.{n}.0/24")).collect();
    let _dn42_bird = Bird::start(&lab, &dn42, &dn42_peer_bird(&prefixes, &d, &e2))?;
    let _edge_bird = Bird::start(
        &lab,
        &edge,
        r#"
router id 172.22.132.161;
protocol device {}
protocol kernel { ipv4 { export all; }; }
protocol bgp dn42 {
  local as 4242421869;
  neighbor DN42 as 4242420000;
  connect delay time 1; connect retry time 1;
  ipv4 { import all; export none; };
}
protocol bgp vps {
  SESSION
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 { next hop self; EXTENDED import all; export all; };
}
"#
        .replace("DN42", &d.ipv4.to_string())
        .replace(
            "SESSION",
            &if link_local {
                format!(
                    "local fe80::2 as 4242421869; neighbor fe80::1 % '{}' as 4242421869; direct;",
                    wg.ifname()
                )
            } else {
                "local 10.132.0.2 as 4242421869; neighbor 10.132.0.1 as 4242421869;".into()
            },
        )
        .replace(
            "EXTENDED",
            if link_local {
                "extended next hop on;"
            } else {
                ""
            },
        )
        .as_str(),
    )?;
    lab.enable_forwarding(&edge)?;
    // The VPS's DN42 address, and the way back to it.
    lab.add_address(&vps, "lo", "172.22.132.169/32")?;
    lab.add_route(&edge, &["172.22.132.169/32", "via", "10.132.0.1"])?;
    lab.add_route(&dn42, &["172.22.132.169/32", "via", &e2.ipv4.to_string()])?;
    lab.add_address(&dn42, "lo", "172.20.0.53/32")?;

    let interface = lab.unique_ifname("wg")?;
    let key_dir = lab.run_dir(&vps)?.join("peering");
    let key_file = key_dir.join("edge.key").to_string_lossy().into_owned();
    let ours = start_ours(
        &lab,
        &vps,
        4_242_421_869,
        "172.22.132.169",
        &format!(
            "[kernel]\nprefsrc_ipv4 = \"172.22.132.169\"\n{}",
            peering_block(
                "edge",
                &interface,
                &key_file,
                51821,
                wg.public_key(),
                &format!("{}:51823", e1.ipv4),
                if link_local {
                    "10.132.0.1/30\", \"fe80::1/64"
                } else {
                    "10.132.0.1/30"
                },
                if link_local {
                    "10.132.0.2\", \"fe80::2"
                } else {
                    "10.132.0.2"
                },
                if link_local {
                    "remote_as = 4242421869\nsession = \"ipv6\"\nextended_next_hop = true"
                } else {
                    "remote_as = 4242421869"
                },
            )
        ),
    )?;
    // The key was made on first start, for its owner only.
    let mode = std::fs::metadata(&key_file)?.permissions().mode() & 0o777;
    ensure!(mode == 0o600, "key file mode {mode:o}");
    let public = pubkey_of(&lab, &vps, &key_file)?;
    ensure!(peering(&ours, "edge")?["public_key"] == public.as_str());
    wg.set_peer(
        &public,
        Some(&format!("{}:51821", v.ipv4)),
        &["0.0.0.0/0", "::/0"],
        None,
    )?;

    wait_until(SETTLE, "the DN42 prefixes in the VPS kernel", || {
        let v4 = kernel_routes(&lab, &vps, false)?;
        ensure!(v4.len() == prefixes.len(), "{} routes", v4.len());
        if !link_local {
            ensure!(
                v4.iter()
                    .all(|(_, gw)| gw == &vec!["10.132.0.2".to_string()]),
                "{v4:?}"
            );
        }
        Ok(())
    })?;
    let detail = lab.exec(&vps, &["ip", "route", "show", "172.20.0.0/24"])?;
    ensure!(
        detail.contains("src 172.22.132.169")
            && detail.contains("proto bgp")
            && detail.contains(&format!("dev {interface}"))
            && (!link_local || detail.contains("via inet6 fe80::2")),
        "{detail}"
    );
    wait_until(SETTLE, "a ping into DN42", || {
        ping(&lab, &vps, "172.20.0.53")
    })?;

    let p = peering(&ours, "edge")?;
    ensure!(p["interface"] == interface.as_str(), "{p}");
    ensure!(p["session"]["state"] == "Established", "{p}");
    ensure!(p["session"]["routes"]["imported"] == prefixes.len(), "{p}");
    ensure!(!p["last_handshake"].is_null(), "{p}");
    ensure!(p["rx_bytes"].as_u64().unwrap_or(0) > 0, "{p}");
    let text = ours.cli(&["show", "peerings"])?;
    ensure!(
        text.contains(&interface) && text.contains(&public) && text.contains("Established"),
        "{text}"
    );
    // The protocol is the peering's name, as any neighbour's.
    ensure!(ours.protocol("edge")?["state"] == "Established");
    Ok(())
}

/// The far end of the reload test: a wireguard-go device per tunnel and
/// one BIRD with a session over each.
struct Tunnel<'l> {
    wg: WgDevice<'l>,
    ours: &'static str,
    theirs: &'static str,
    iface: String,
    key_file: String,
}

/// Reload adds a peering, changes one (new endpoint and new key on the far
/// side) and removes one; the untouched session stays up throughout (same
/// established count and uptime), the removed interface is gone.
#[test]
fn reload_adds_changes_and_removes_only_those_peerings() -> Result<()> {
    if !can_run!(&["bird", "birdc", "wg", "wireguard-go"],) {
        return Ok(());
    }
    let lab = Lab::new("peering-reload")?;
    let (vps, far) = (lab.add_node("vps")?, lab.add_node("far")?);
    let (v, f) = lab.link(&vps, &far)?;
    let run_dir = lab.run_dir(&vps)?;
    let mut tunnels = Vec::new();
    for (i, (ours, theirs)) in [
        ("172.31.1.1", "172.31.1.2"),
        ("172.31.2.1", "172.31.2.2"),
        ("172.31.3.1", "172.31.3.2"),
    ]
    .into_iter()
    .enumerate()
    {
        let wg = WgDevice::start(&lab, &far, &format!("{theirs}/30"), 52000 + i as u16)?;
        tunnels.push(Tunnel {
            wg,
            ours,
            theirs,
            iface: lab.unique_ifname("wg")?,
            key_file: run_dir
                .join(format!("t{i}.key"))
                .to_string_lossy()
                .into_owned(),
        });
    }
    let bird_sessions: String = tunnels
        .iter()
        .enumerate()
        .map(|(i, t)| {
            format!(
                r#"
protocol bgp t{i} {{
  local {theirs} as 65002;
  neighbor {ours} as 65001;
  connect delay time 1; connect retry time 1; error wait time 1, 5;
  ipv4 {{ import all; export where net = 198.51.{i}.0/24; }};
}}
"#,
                theirs = t.theirs,
                ours = t.ours
            )
        })
        .collect();
    let _bird = Bird::start(
        &lab,
        &far,
        &format!(
            "router id 10.255.0.2;\nprotocol device {{}}\nprotocol static {{ ipv4; route 198.51.0.0/24 blackhole; route 198.51.1.0/24 blackhole; route 198.51.2.0/24 blackhole; }}\n{bird_sessions}"
        ),
    )?;
    let block = |i: usize, t: &Tunnel, port: u16, peer_key: &str, endpoint_port: u16| {
        peering_block(
            &format!("t{i}"),
            &t.iface,
            &t.key_file,
            port,
            peer_key,
            &format!("{}:{endpoint_port}", f.ipv4),
            &format!("{}/30", t.ours),
            t.theirs,
            "remote_as = 65002\nimport = \"all\"\nexport = \"none\"",
        )
    };
    let config = |blocks: &[String]| blocks.concat();
    let keys: Vec<String> = tunnels
        .iter()
        .map(|t| t.wg.public_key().to_string())
        .collect();
    let ours = start_ours(
        &lab,
        &vps,
        65001,
        "10.255.0.1",
        &config(&[
            block(0, &tunnels[0], 51820, &keys[0], 52000),
            block(1, &tunnels[1], 51821, &keys[1], 52001),
        ]),
    )?;
    let connect = |i: usize, t: &Tunnel| -> Result<()> {
        let public = pubkey_of(&lab, &vps, &t.key_file)?;
        t.wg.set_peer(
            &public,
            Some(&format!("{}:{}", v.ipv4, 51820 + i)),
            &["0.0.0.0/0"],
            None,
        )
    };
    connect(0, &tunnels[0])?;
    connect(1, &tunnels[1])?;
    let established = |name: &str| -> Result<Value> {
        wait_until(SETTLE, &format!("{name} established"), || {
            let p = ours.protocol(name)?;
            ensure!(p["state"] == "Established", "{p}");
            ensure!(p["routes"]["imported"] == 1, "{p}");
            Ok(p)
        })
    };
    if let Err(e) = established("t0") {
        for node in [&vps, &far] {
            eprintln!(
                "{}",
                lab.exec(node, &["wg", "show", "all"]).unwrap_or_default()
            );
            eprintln!("{}", lab.exec(node, &["ip", "addr"]).unwrap_or_default());
            eprintln!("{}", lab.exec(node, &["ip", "route"]).unwrap_or_default());
        }
        eprintln!("{}", lab.log_tail(ours.proc(), 40));
        return Err(e);
    }
    let before = established("t1")?;
    let untouched = |what: &str| -> Result<()> {
        let now = ours.protocol("t1")?;
        ensure!(
            now["state"] == "Established"
                && now["stats"]["established_transitions"]
                    == before["stats"]["established_transitions"]
                && now["since_unix"] == before["since_unix"],
            "t1 was touched by {what}: {before} then {now}"
        );
        Ok(())
    };
    let reload = |blocks: &[String]| -> Result<()> {
        let path = ours.config_path();
        let text = std::fs::read_to_string(path)?;
        let head = text.split("[bgp]").next().unwrap_or_default().to_string();
        std::fs::write(
            path,
            format!(
                "{head}[bgp]\nasn = 65001\nrouter_id = \"10.255.0.1\"\n\n{}",
                config(blocks)
            ),
        )?;
        let out = ours.cli(&["bgp", "reload"])?;
        ensure!(out.contains("reloaded"), "{out}");
        Ok(())
    };

    // Add t2.
    reload(&[
        block(0, &tunnels[0], 51820, &keys[0], 52000),
        block(1, &tunnels[1], 51821, &keys[1], 52001),
        block(2, &tunnels[2], 51822, &keys[2], 52002),
    ])?;
    connect(2, &tunnels[2])?;
    established("t2")?;
    untouched("adding t2")?;

    // Change t0: the far side moves to another port with a new key.
    let t0 = &tunnels[0];
    let new_key = lab.exec(&far, &["wg", "genkey"])?.trim().to_string();
    let new_public = lab
        .exec_full(
            &far,
            &["wg", "pubkey"],
            Some(new_key.as_bytes()),
            std::time::Duration::from_secs(30),
        )?
        .stdout
        .trim()
        .to_string();
    let new_key_file = lab.write_config(&far, "t0-new.key", &format!("{new_key}\n"))?;
    std::fs::set_permissions(&new_key_file, std::fs::Permissions::from_mode(0o600))?;
    t0.wg.wg(&[
        "set",
        t0.wg.ifname(),
        "private-key",
        &new_key_file.to_string_lossy(),
        "listen-port",
        "52010",
    ])?;
    reload(&[
        block(0, t0, 51820, &new_public, 52010),
        block(1, &tunnels[1], 51821, &keys[1], 52001),
        block(2, &tunnels[2], 51822, &keys[2], 52002),
    ])?;
    wait_until(SETTLE, "t0 through the new endpoint", || {
        let p = peering(&ours, "t0")?;
        ensure!(p["peer_public_key"] == new_public.as_str(), "{p}");
        ensure!(p["endpoint"] == format!("{}:52010", f.ipv4).as_str(), "{p}");
        let routes = ours.protocol("t0")?;
        ensure!(
            routes["state"] == "Established" && routes["routes"]["imported"] == 1,
            "{routes}"
        );
        // Traffic goes through the tunnel with the new key.
        let peers = t0.wg.peers()?;
        ensure!(
            peers
                .iter()
                .any(|p| p.latest_handshake > 0 && p.rx_bytes > 0),
            "{peers:?}"
        );
        Ok(())
    })?;
    ping(&lab, &vps, tunnels[0].theirs)?;
    untouched("changing t0")?;

    // Remove t2: its session, routes and interface go.
    reload(&[
        block(0, t0, 51820, &new_public, 52010),
        block(1, &tunnels[1], 51821, &keys[1], 52001),
    ])?;
    wait_until(SETTLE, "t2 gone", || {
        let link = lab.try_exec(&vps, &["ip", "link", "show", &tunnels[2].iface])?;
        ensure!(!link.success(), "{} still there", tunnels[2].iface);
        let all: Value = serde_json::from_str(&ours.cli(&["show", "protocols", "--json"])?)?;
        ensure!(
            !all.as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == "t2"),
            "{all}"
        );
        let v4 = kernel_routes(&lab, &vps, false)?;
        ensure!(!v4.iter().any(|(dst, _)| dst == "198.51.2.0/24"), "{v4:?}");
        Ok(())
    })?;
    let peerings: Value = serde_json::from_str(&ours.cli(&["show", "peerings", "--json"])?)?;
    ensure!(peerings.as_array().map(Vec::len) == Some(2), "{peerings}");
    untouched("removing t2")?;
    Ok(())
}

/// A peering that cannot be made at start (its port is taken) stops `run`
/// with the peering named, and leaves nothing: not the peerings made
/// before it either.
#[test]
fn a_peering_that_cannot_be_made_leaves_nothing_behind() -> Result<()> {
    if !can_run!(&["wg", "wireguard-go"],) {
        return Ok(());
    }
    let lab = Lab::new("peering-half-way")?;
    let vps = lab.add_node("vps")?;
    // Someone else has UDP port 51822.
    let other = WgDevice::start(&lab, &vps, "192.168.99.1/24", 51822)?;
    let run_dir = lab.run_dir(&vps)?;
    let (first, second) = (lab.unique_ifname("wg")?, lab.unique_ifname("wg")?);
    let blocks: String = [(&first, 51821, "172.31.1"), (&second, 51822, "172.31.2")]
        .iter()
        .enumerate()
        .map(|(i, (iface, port, net))| {
            peering_block(
                &format!("p{i}"),
                iface,
                &run_dir.join(format!("p{i}.key")).to_string_lossy(),
                *port,
                other.public_key(),
                "192.0.2.1:51820",
                &format!("{net}.1/30"),
                &format!("{net}.2"),
                "remote_as = 65002",
            )
        })
        .collect();
    let config = lab.write_config(
        &vps,
        "bgp4mesh.toml",
        &format!(
            "[control]\nsocket = {:?}\n[bgp]\nasn = 65001\nrouter_id = \"10.255.0.1\"\n{blocks}",
            run_dir.join("bgp4mesh.sock")
        ),
    )?;
    let proc = lab.spawn(
        &vps,
        "bgp4mesh",
        &[BIN, "run", "-c", &config.to_string_lossy()],
    )?;
    wait_until(SETTLE, "run to stop", || {
        ensure!(!lab.is_running(&proc), "still running");
        Ok(())
    })?;
    let log = lab.log_tail(&proc, 20);
    ensure!(log.contains("peering p1"), "{log}");
    for iface in [&first, &second] {
        let link = lab.try_exec(&vps, &["ip", "link", "show", iface])?;
        ensure!(!link.success(), "{iface} left behind: {log}");
    }
    Ok(())
}
