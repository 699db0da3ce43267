//! bgp4mesh itself, as a lab peer: `bgp4mesh run -c FILE` in a node, asked
//! through its control socket with `bgp4mesh show … --json`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{BgpRoute, SessionState, parse_as_path};
use crate::{Lab, Node, Proc, wait_until};

pub struct Bgp4mesh<'lab> {
    lab: &'lab Lab,
    node: Node,
    binary: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    proc: Proc,
}

impl<'lab> Bgp4mesh<'lab> {
    /// Starts `binary run` in `node` with `config` (TOML). A `[control]`
    /// section is added with a socket in the node's run directory, so write
    /// the rest of the config without one.
    pub fn start(
        lab: &'lab Lab,
        node: &Node,
        binary: &Path,
        config: &str,
    ) -> Result<Bgp4mesh<'lab>> {
        let socket = lab.run_dir(node)?.join("bgp4mesh.sock");
        let full = format!(
            "[control]\nsocket = {:?}\n\n{config}",
            socket.to_string_lossy()
        );
        let config_path = lab.write_config(node, "bgp4mesh.toml", &full)?;
        let proc = lab.spawn_env(
            node,
            "bgp4mesh",
            &[
                &binary.to_string_lossy(),
                "run",
                "-c",
                &config_path.to_string_lossy(),
                "--log-level",
                "debug",
            ],
            &[("RUST_BACKTRACE", "1")],
        )?;
        let this = Bgp4mesh {
            lab,
            node: node.clone(),
            binary: binary.to_path_buf(),
            config: config_path,
            socket,
            proc,
        };
        wait_until(Duration::from_secs(10), "bgp4mesh's control socket", || {
            if !lab.is_running(&this.proc) {
                bail!("bgp4mesh exited: {}", lab.log_tail(&this.proc, 20));
            }
            this.cli(&["show", "protocols", "--json"]).map(|_| ())
        })?;
        Ok(this)
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Runs `bgp4mesh -s SOCKET ARGS…` and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let binary = self.binary.to_string_lossy();
        let socket = self.socket.to_string_lossy();
        let mut cmd = vec![binary.as_ref(), "-s", socket.as_ref()];
        cmd.extend_from_slice(args);
        self.lab.exec(&self.node, &cmd)
    }

    fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let out = self.cli(args)?;
        serde_json::from_str(&out)
            .with_context(|| format!("bgp4mesh {} gave no JSON: {out}", args.join(" ")))
    }

    /// Session state of neighbour `name`.
    pub fn bgp_state(&self, name: &str) -> Result<SessionState> {
        let json = self.cli_json(&["show", "protocols", name, "--json"])?;
        json.pointer("/0/state")
            .and_then(Value::as_str)
            .with_context(|| format!("no state in {json}"))?
            .parse()
    }

    /// `show protocols NAME --json`, whole.
    pub fn protocol(&self, name: &str) -> Result<Value> {
        let json = self.cli_json(&["show", "protocols", name, "--json"])?;
        json.get(0)
            .cloned()
            .with_context(|| format!("no protocol {name}"))
    }

    /// Every path of the Loc-RIB.
    pub fn routes(&self) -> Result<Vec<BgpRoute>> {
        Ok(parse_routes(&self.cli_json(&["show", "route", "--json"])?))
    }

    /// What is announced to neighbour `name`.
    pub fn exported_routes(&self, name: &str) -> Result<Vec<BgpRoute>> {
        Ok(parse_routes(
            &self.cli_json(&["show", "route", "export", name, "--json"])?,
        ))
    }
}

fn parse_routes(json: &Value) -> Vec<BgpRoute> {
    let mut routes = Vec::new();
    for entry in json.as_array().into_iter().flatten() {
        let prefix = entry["prefix"].as_str().unwrap_or_default().to_string();
        for p in entry["paths"].as_array().into_iter().flatten() {
            let strings = |key: &str| -> Vec<String> {
                p[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            };
            routes.push(BgpRoute {
                prefix: prefix.clone(),
                as_path: parse_as_path(p["as_path_text"].as_str().unwrap_or_default()),
                next_hop: p["next_hop"]
                    .as_str()
                    .and_then(|h| h.split_whitespace().next())
                    .and_then(|h| h.parse().ok()),
                best: p["best"].as_bool().unwrap_or(false),
                local_pref: p["local_pref"].as_u64().and_then(|v| u32::try_from(v).ok()),
                med: p["med"].as_u64().and_then(|v| u32::try_from(v).ok()),
                communities: strings("communities"),
                large_communities: strings("large_communities"),
            });
        }
    }
    routes
}
