//! Nodes behind NAT reach each other (seed 003's roaming pi0, seed 004's
//! "nodes anywhere"): a controller and a public node on the "Internet" (a
//! switch), and nodes each behind a router of its own that translates
//! with nftables `masquerade` (endpoint-independent mapping) or
//! `masquerade fully-random` (endpoint-dependent).

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::nat::{Mapping, Nat};
use bgp4mesh_lab::{Lab, Node, can_run, wait_until};
use serde_json::Value;

use common::mesh::{Controller, MeshNode, address_of, start_node_on};
use common::ping;

const NEEDS: &[&str] = &["wg", "ping", "nft"];

/// The Internet of a NAT test: a router with the controller and one
/// public node on links of their own, and a token to join more.
struct Internet {
    router: Node,
    controller: Controller,
    public: MeshNode,
    token: String,
}

impl Internet {
    fn start(lab: &Lab) -> Result<Internet> {
        let router = lab.add_node("internet")?;
        let (node, iface) = lab.add_on_internet(&router, "controller")?;
        let controller = Controller::start_on(lab, node, iface)?;
        controller.admin(
            lab,
            &["network", "create", "mynet", "--range", "44.30.127.0/24"],
        )?;
        let token = controller
            .admin(lab, &["token", "create", "--network", "mynet"])?
            .trim()
            .to_string();
        let (node, iface) = lab.add_on_internet(&router, "public")?;
        let endpoint = iface.ipv4.to_string();
        let public = start_node_on(lab, node, &token, "public", Some(&endpoint), &[])?;
        Ok(Internet {
            router,
            controller,
            public,
            token,
        })
    }

    /// A node `name` behind a NAT of its own, joined and running.
    fn behind_nat(&self, lab: &Lab, name: &str, mapping: Mapping) -> Result<(Nat, MeshNode)> {
        let nat = lab.add_behind_nat(&self.router, name, mapping)?;
        let node = start_node_on(lab, nat.inside.clone(), &self.token, name, None, &[])?;
        Ok((nat, node))
    }

    fn address(&self, lab: &Lab, name: &str) -> Result<String> {
        address_of(&self.controller.nodes(lab)?, name)
    }
}

/// The endpoint `node`'s device has for the peer with mesh address `peer`
/// (from `wg show dump`: its allowed IPs hold the address).
fn endpoint_for(lab: &Lab, node: &MeshNode, peer: &str) -> Result<Option<String>> {
    let dump = lab.exec(&node.node, &["wg", "show", &node.ifname, "dump"])?;
    let host = format!("{peer}/32");
    Ok(dump
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[3].split(',').any(|a| a == host))
        .and_then(|f| (f[2] != "(none)").then(|| f[2].to_string())))
}

/// Waits until `from`'s device has `peer`'s endpoint at `public` (any
/// port) and a ping through the tunnel is answered.
fn direct_path(
    lab: &Lab,
    from: &MeshNode,
    peer: &str,
    public: &str,
    within: Duration,
) -> Result<String> {
    wait_until(
        within,
        &format!("{} reaching {peer} directly at {public}", from.name),
        || {
            let endpoint = endpoint_for(lab, from, peer)?.context("no endpoint")?;
            ensure!(
                endpoint.starts_with(&format!("{public}:")),
                "endpoint {endpoint}"
            );
            ping(lab, &from.node, peer)?;
            Ok(endpoint)
        },
    )
}

fn alive(lab: &Lab, nodes: &[&MeshNode]) -> Result<()> {
    for n in nodes {
        ensure!(
            lab.is_running(&n.proc),
            "{} stopped: {}",
            n.name,
            lab.log_tail(&n.proc, 30)
        );
    }
    Ok(())
}

/// Two nodes behind endpoint-independent NATs get a direct path: each
/// one's device sends to the other's NAT, not through the public node,
/// within 2 s of the second one joining, and pings go both ways.
#[test]
fn nodes_behind_endpoint_independent_nats_connect_directly() -> Result<()> {
    if !can_run!(NEEDS,) {
        return Ok(());
    }
    let lab = Lab::new("nat-eim")?;
    let internet = Internet::start(&lab)?;
    let (nat_a, a) = internet.behind_nat(&lab, "a", Mapping::EndpointIndependent)?;
    let address_a = internet.address(&lab, "a")?;
    let public = internet.address(&lab, "public")?;
    wait_until(
        Duration::from_secs(20),
        "a reaching the public node",
        || ping(&lab, &a.node, &public),
    )?;
    let started = Instant::now();
    let (nat_b, b) = internet.behind_nat(&lab, "b", Mapping::EndpointIndependent)?;
    let address_b = internet.address(&lab, "b")?;
    let b_sees = direct_path(
        &lab,
        &b,
        &address_a,
        &nat_a.public.ipv4.to_string(),
        Duration::from_secs(30),
    )?;
    let took = started.elapsed();
    let a_sees = direct_path(
        &lab,
        &a,
        &address_b,
        &nat_b.public.ipv4.to_string(),
        Duration::from_secs(5),
    )?;
    alive(&lab, &[&a, &b, &internet.public])?;
    eprintln!("direct path {took:?} after b joined: b sends to a at {b_sees}, a to b at {a_sees}");
    ensure!(
        took <= Duration::from_secs(2),
        "the direct path took {took:?}, more than 2 s"
    );
    ping(&lab, &b.node, &address_a)?;
    ping(&lab, &a.node, &address_b)?;

    // What a node and the operator see: the NAT kinds discovery measured,
    // and `show mesh` with b's path, endpoint and round trip.
    let shown = a.cli(&lab, &["show", "mesh", "--json"])?;
    let shown: Value = serde_json::from_str(&shown)?;
    ensure!(shown["node"]["nat"] == "endpoint_independent", "{shown}");
    let peer_b = shown["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "b"))
        .with_context(|| format!("no b in {shown}"))?;
    ensure!(
        peer_b["path"] == "direct"
            && peer_b["endpoint"] == a_sees.as_str()
            && peer_b["nat"] == "endpoint_independent"
            && peer_b["rtt_ms"].as_f64().is_some_and(|ms| ms > 0.0),
        "{peer_b}"
    );
    let table = a.cli(&lab, &["show", "mesh"])?;
    eprintln!("{table}");
    ensure!(
        table.contains("NAT: endpoint-independent") && table.contains(&a_sees),
        "{table}"
    );
    let public = internet.public.cli(&lab, &["show", "mesh", "--json"])?;
    let public: Value = serde_json::from_str(&public)?;
    ensure!(public["node"]["nat"] == "none", "{public}");
    Ok(())
}
