//! A controller and the nodes that join it, as the mesh tests start them:
//! `bgp4mesh server` in one namespace, nodes that `bgp4mesh join` with a
//! token and `bgp4mesh run` on our userspace WireGuard.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bgp4mesh_lab::{Iface, Lab, Node, Proc, Switch, wait_until};
use serde_json::Value;

use super::{BIN, ping};

pub const MASTER: &str = "mesh-test-master-key-0123";

pub struct Controller {
    pub node: Node,
    pub iface: Iface,
    pub config: PathBuf,
    pub proc: Proc,
    pub fingerprint: String,
}

impl Controller {
    pub fn start(lab: &Lab, switch: &Switch) -> Result<Controller> {
        let node = lab.add_node("controller")?;
        let iface = lab.attach(switch, &node)?;
        Self::start_on(lab, node, iface)
    }

    /// Starts the controller on `node`, listening on `iface`'s address.
    pub fn start_on(lab: &Lab, node: Node, iface: Iface) -> Result<Controller> {
        Self::start_with(lab, node, iface, "")
    }

    /// [`Controller::start_on`] with `extra` lines in its config
    /// (`database = "postgres://…"`).
    pub fn start_with(lab: &Lab, node: Node, iface: Iface, extra: &str) -> Result<Controller> {
        let dir = lab.run_dir(&node)?;
        let config = lab.write_config(
            &node,
            "server.toml",
            &format!(
                "listen = \"{}:8443\"\nmaster_key = \"{MASTER}\"\nstate_dir = \"{}\"\n{extra}",
                iface.ipv4,
                dir.join("state").display()
            ),
        )?;
        let (proc, fingerprint) = Self::spawn(lab, &node, &config)?;
        Ok(Controller {
            node,
            iface,
            config,
            proc,
            fingerprint,
        })
    }

    pub fn spawn(lab: &Lab, node: &Node, config: &std::path::Path) -> Result<(Proc, String)> {
        let proc = lab.spawn(
            node,
            "controller",
            &[
                BIN,
                "server",
                "-c",
                &config.to_string_lossy(),
                "--log-level",
                "debug",
            ],
        )?;
        let fingerprint = wait_until(Duration::from_secs(20), "the controller to listen", || {
            ensure!(lab.is_running(&proc), "exited: {}", lab.log_tail(&proc, 20));
            let log = std::fs::read_to_string(&proc.log)?;
            ensure!(log.contains("listening on"), "not yet");
            log.lines()
                .find_map(|l| l.strip_prefix("fingerprint "))
                .map(str::to_string)
                .context("no fingerprint line")
        })?;
        Ok((proc, fingerprint))
    }

    pub fn url(&self) -> String {
        format!("https://{}:8443", self.iface.ipv4)
    }

    /// Runs an admin command (`bgp4mesh --server … ARGS`) next to the
    /// controller.
    pub fn admin(&self, lab: &Lab, args: &[&str]) -> Result<String> {
        let url = self.url();
        let mut cmd = vec![
            BIN,
            "--server",
            &url,
            "--key",
            MASTER,
            "--fingerprint",
            &self.fingerprint,
        ];
        cmd.extend_from_slice(args);
        lab.exec(&self.node, &cmd)
    }

    /// Creates network "mynet" (44.30.127.0/24) and returns a token to
    /// join it.
    pub fn mynet(&self, lab: &Lab) -> Result<String> {
        self.admin(
            lab,
            &["network", "create", "mynet", "--range", "44.30.127.0/24"],
        )?;
        Ok(self
            .admin(lab, &["token", "create", "--network", "mynet"])?
            .trim()
            .to_string())
    }

    pub fn nodes(&self, lab: &Lab) -> Result<Vec<Value>> {
        let text = self.admin(lab, &["--json", "node", "list", "mynet"])?;
        Ok(serde_json::from_str::<Value>(&text)?
            .as_array()
            .cloned()
            .unwrap_or_default())
    }
}

pub struct MeshNode {
    pub node: Node,
    pub ifname: String,
    pub proc: Proc,
    pub name: String,
    pub config: PathBuf,
    /// What `bgp4mesh join` printed.
    pub joined: String,
}

impl MeshNode {
    /// Runs `bgp4mesh -s SOCKET ARGS` against this node's daemon.
    pub fn cli(&self, lab: &Lab, args: &[&str]) -> Result<String> {
        let socket = lab.run_dir(&self.node)?.join("bgp4mesh.sock");
        let socket = socket.to_string_lossy();
        let mut cmd = vec![BIN, "-s", socket.as_ref()];
        cmd.extend_from_slice(args);
        lab.exec(&self.node, &cmd)
    }
}

/// Adds node `name` on `switch` and starts it with [`start_node_on`];
/// `public` publishes its address there as its endpoint.
pub fn start_node(
    lab: &Lab,
    switch: &Switch,
    token: &str,
    name: &str,
    public: bool,
    extra: &[&str],
) -> Result<MeshNode> {
    let node = lab.add_node(name)?;
    let iface = lab.attach(switch, &node)?;
    let endpoint = iface.ipv4.to_string();
    start_node_on(
        lab,
        node,
        token,
        name,
        public.then_some(endpoint.as_str()),
        extra,
    )
}

/// Joins `node` (already wired) to the network of `token` with `bgp4mesh
/// join` (publishing `endpoint`, if given, and `extra` arguments) and runs
/// its daemon.
pub fn start_node_on(
    lab: &Lab,
    node: Node,
    token: &str,
    name: &str,
    endpoint: Option<&str>,
    extra: &[&str],
) -> Result<MeshNode> {
    start_node_with(lab, node, token, name, endpoint, extra, "")
}

/// [`start_node_on`] with `mesh` appended to the node's `[mesh]` section
/// (`"relay = true\n"`).
pub fn start_node_with(
    lab: &Lab,
    node: Node,
    token: &str,
    name: &str,
    endpoint: Option<&str>,
    extra: &[&str],
    mesh: &str,
) -> Result<MeshNode> {
    let dir = lab.run_dir(&node)?;
    let state = dir.join("agent");
    let state_text = state.to_string_lossy().to_string();
    let mut join = vec![
        BIN,
        "join",
        token,
        "--name",
        name,
        "--state-dir",
        &state_text,
    ];
    if let Some(endpoint) = endpoint {
        join.extend(["--endpoint", endpoint]);
    }
    join.extend_from_slice(extra);
    let out = lab.exec(&node, &join)?;
    ensure!(out.contains("joined network mynet"), "{out}");
    let ifname = lab.unique_ifname("mesh")?;
    let config = lab.write_config(
        &node,
        "node.toml",
        &format!(
            "[control]\nsocket = \"{}\"\n\n[mesh]\nstate_dir = \"{state_text}\"\ninterface = \"{ifname}\"\nbackend = \"userspace\"\n{mesh}",
            dir.join("bgp4mesh.sock").display()
        ),
    )?;
    let proc = lab.spawn(
        &node,
        &format!("bgp4mesh-{name}"),
        &[
            BIN,
            "run",
            "-c",
            &config.to_string_lossy(),
            "--log-level",
            "debug",
        ],
    )?;
    Ok(MeshNode {
        node,
        ifname,
        proc,
        name: name.to_string(),
        config,
        joined: out,
    })
}

pub fn address_of(nodes: &[Value], name: &str) -> Result<String> {
    nodes
        .iter()
        .find(|n| n["name"] == name)
        .and_then(|n| n["address"].as_str())
        .map(str::to_string)
        .with_context(|| format!("no address for {name} in {nodes:?}"))
}

pub fn full_mesh(lab: &Lab, nodes: &[&MeshNode], addresses: &[Value]) -> Result<()> {
    for a in nodes {
        ensure!(
            lab.is_running(&a.proc),
            "{} stopped: {}",
            a.name,
            lab.log_tail(&a.proc, 30)
        );
        for b in nodes {
            if a.name == b.name {
                continue;
            }
            let to = address_of(addresses, &b.name)?;
            wait_until(
                Duration::from_secs(30),
                &format!("{} reaching {} ({to})", a.name, b.name),
                || ping(lab, &a.node, &to),
            )
            .with_context(|| {
                format!(
                    "{}'s log:\n{}\n{}'s log:\n{}",
                    a.name,
                    lab.log_tail(&a.proc, 15),
                    b.name,
                    lab.log_tail(&b.proc, 15)
                )
            })?;
        }
    }
    Ok(())
}

pub fn peer_count(lab: &Lab, node: &MeshNode) -> Result<usize> {
    let dump = lab.exec(&node.node, &["wg", "show", &node.ifname, "dump"])?;
    Ok(dump
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .count())
}

/// The endpoint `node`'s device has for the peer with mesh address `peer`
/// (from `wg show dump`: its allowed IPs hold the address).
pub fn endpoint_for(lab: &Lab, node: &MeshNode, peer: &str) -> Result<Option<String>> {
    let dump = lab.exec(&node.node, &["wg", "show", &node.ifname, "dump"])?;
    let host = format!("{peer}/32");
    Ok(dump
        .lines()
        .skip(1)
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[3].split(',').any(|a| a == host))
        .and_then(|f| (f[2] != "(none)").then(|| f[2].to_string())))
}
