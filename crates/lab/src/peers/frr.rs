//! FRR's `bgpd` standalone (`-Z`: no zebra, so it installs nothing in the
//! kernel), with its own vty socket directory, queried with
//! `vtysh --vty_socket DIR -c '... json'`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{BgpRoute, SessionState, parse_as_path};
use crate::{Lab, Node, Proc, require_binary, wait_until};

pub struct Frr<'lab> {
    lab: &'lab Lab,
    node: Node,
    vty_dir: PathBuf,
    proc: Proc,
}

impl<'lab> Frr<'lab> {
    /// Starts `bgpd -Z` in `node` with `config` (frr.conf syntax, `router bgp`
    /// section) and waits until vtysh reaches it.
    pub fn start(lab: &'lab Lab, node: &Node, config: &str) -> Result<Frr<'lab>> {
        Self::start_daemon(lab, node, "bgpd", config)
    }

    /// Starts another FRR daemon standalone (`bfdd` for BFD), with its own
    /// config, reachable through the same vtysh.
    pub fn start_daemon(
        lab: &'lab Lab,
        node: &Node,
        daemon: &str,
        config: &str,
    ) -> Result<Frr<'lab>> {
        let binary = require_binary(daemon)?;
        require_binary("vtysh")?;
        let config_path = lab.write_config(node, &format!("{daemon}.conf"), config)?;
        let vty_dir = lab.run_dir(node)?;
        let pid_file = vty_dir.join(format!("{daemon}.pid"));
        let binary = binary.to_string_lossy().into_owned();
        let (config_arg, pid_arg, dir_arg) = (
            config_path.to_string_lossy().into_owned(),
            pid_file.to_string_lossy().into_owned(),
            vty_dir.to_string_lossy().into_owned(),
        );
        let mut args = vec![binary.as_str()];
        if daemon == "bgpd" {
            args.push("-Z");
        }
        let control = vty_dir
            .join(format!("{daemon}.ctl"))
            .to_string_lossy()
            .into_owned();
        if daemon == "bfdd" {
            args.extend(["--bfdctl", control.as_str()]);
        }
        // bgpd skips its user switch with -S; the others run as root.
        if daemon == "bgpd" {
            args.push("-S");
        } else {
            // Its own user, a member of frrvty as FRR insists; it writes its
            // vty socket and pid file into our run directory.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&vty_dir, std::fs::Permissions::from_mode(0o777))?;
            args.extend(["-u", "frr", "-g", "frr"]);
        }
        args.extend([
            "-f",
            &config_arg,
            "-i",
            &pid_arg,
            "--vty_socket",
            &dir_arg,
            "-A",
            "127.0.0.1",
            "-P",
            "0",
            "--log",
            "stdout",
        ]);
        let proc = lab.spawn(node, daemon, &args)?;
        let this = Frr {
            lab,
            node: node.clone(),
            vty_dir,
            proc,
        };
        let probe = if daemon == "bgpd" {
            "show bgp summary json"
        } else {
            "show bfd peers json"
        };
        wait_until(
            Duration::from_secs(10),
            &format!("FRR {daemon}'s vty"),
            || {
                if !lab.is_running(&this.proc) {
                    bail!("{daemon} exited: {}", lab.log_tail(&this.proc, 20));
                }
                this.show_json(probe).map(|_| ())
            },
        )?;
        Ok(this)
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Runs vtysh commands (each one `-c`), returning the output.
    pub fn vtysh(&self, commands: &[&str]) -> Result<String> {
        let dir = self.vty_dir.to_string_lossy();
        let mut args = vec!["vtysh", "--vty_socket", dir.as_ref()];
        for command in commands {
            args.extend(["-c", command]);
        }
        self.lab.exec(&self.node, &args)
    }

    /// Runs one `show ... json` command and parses its output.
    pub fn show_json(&self, command: &str) -> Result<Value> {
        let out = self.vtysh(&[command])?;
        serde_json::from_str(&out).with_context(|| format!("`{command}` gave no JSON: {out}"))
    }

    /// Session state towards neighbour `address`.
    pub fn bgp_state(&self, address: &str) -> Result<SessionState> {
        let json = self.show_json(&format!("show bgp neighbors {address} json"))?;
        let state = json
            .get(address)
            .and_then(|n| n.get("bgpState"))
            .and_then(Value::as_str)
            .with_context(|| format!("no bgpState for {address} in {json}"))?;
        state.parse()
    }

    /// Every path in the IPv4 and IPv6 unicast tables.
    pub fn routes(&self) -> Result<Vec<BgpRoute>> {
        let mut routes = parse_routes(&self.show_json("show bgp ipv4 unicast json")?);
        routes.extend(parse_routes(&self.show_json("show bgp ipv6 unicast json")?));
        Ok(routes)
    }
}

/// Reads `show bgp <afi> unicast json`: `{"routes": {prefix: [path, ...]}}`.
fn parse_routes(json: &Value) -> Vec<BgpRoute> {
    let Some(table) = json.get("routes").and_then(Value::as_object) else {
        return Vec::new();
    };
    let mut routes = Vec::new();
    for (prefix, paths) in table {
        for path in paths.as_array().into_iter().flatten() {
            let number = |key: &str| {
                path.get(key)
                    .and_then(Value::as_u64)
                    .and_then(|n| u32::try_from(n).ok())
            };
            routes.push(BgpRoute {
                prefix: prefix.clone(),
                as_path: parse_as_path(
                    path.get("path").and_then(Value::as_str).unwrap_or_default(),
                ),
                next_hop: path
                    .get("nexthops")
                    .and_then(Value::as_array)
                    .and_then(|hops| hops.first())
                    .and_then(|hop| hop.get("ip"))
                    .and_then(Value::as_str)
                    .and_then(|ip| ip.parse().ok()),
                best: path
                    .get("bestpath")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
                local_pref: number("locPrf"),
                med: number("metric"),
                ..BgpRoute::default()
            });
        }
    }
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_routes_from_show_bgp_json() {
        let json: Value = serde_json::from_str(
            r#"{"vrfId":0,"routes":{"192.0.2.0/24":[
                {"valid":true,"bestpath":true,"metric":5,"path":"65001","origin":"IGP",
                 "nexthops":[{"ip":"10.0.1.1","afi":"ipv4","used":true}]},
                {"valid":true,"locPrf":200,"path":"65003 65001",
                 "nexthops":[{"ip":"10.0.2.1","afi":"ipv4","used":true}]}]}}"#,
        )
        .expect("valid json");
        let routes = parse_routes(&json);
        assert_eq!(routes.len(), 2);
        assert!(routes[0].best);
        assert_eq!(routes[0].as_path, vec![65001]);
        assert_eq!(routes[0].med, Some(5));
        assert_eq!(routes[0].next_hop, Some("10.0.1.1".parse().expect("ip")));
        assert!(!routes[1].best);
        assert_eq!(routes[1].local_pref, Some(200));
        assert_eq!(routes[1].as_path, vec![65003, 65001]);
    }
}
