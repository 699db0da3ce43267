//! GoBGP: `gobgpd` with a TOML config, its gRPC API on the node's own
//! loopback, queried with `gobgp -j`.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{BgpRoute, SessionState};
use crate::{Lab, Node, Proc, require_binary, wait_until};

pub struct Gobgp<'lab> {
    lab: &'lab Lab,
    node: Node,
    proc: Proc,
}

/// The API address inside the node's namespace (each namespace has its own
/// loopback, so every instance can use the default port).
const API: &str = "127.0.0.1:50051";

impl<'lab> Gobgp<'lab> {
    /// Starts gobgpd in `node` with `config` (gobgpd TOML) and waits until
    /// its API answers.
    pub fn start(lab: &'lab Lab, node: &Node, config: &str) -> Result<Gobgp<'lab>> {
        let gobgpd = require_binary("gobgpd")?;
        require_binary("gobgp")?;
        let config_path = lab.write_config(node, "gobgpd.toml", config)?;
        let proc = lab.spawn(
            node,
            "gobgpd",
            &[
                &gobgpd.to_string_lossy(),
                "-f",
                &config_path.to_string_lossy(),
                "-t",
                "toml",
                "--api-hosts",
                API,
                "--pprof-disable",
            ],
        )?;
        let this = Gobgp {
            lab,
            node: node.clone(),
            proc,
        };
        wait_until(Duration::from_secs(10), "gobgpd's API", || {
            if !lab.is_running(&this.proc) {
                bail!("gobgpd exited: {}", lab.log_tail(&this.proc, 20));
            }
            this.gobgp_json(&["global"]).map(|_| ())
        })?;
        Ok(this)
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Runs the `gobgp` client with `args` and returns its output.
    pub fn gobgp(&self, args: &[&str]) -> Result<String> {
        let mut cmd = vec!["gobgp"];
        cmd.extend_from_slice(args);
        self.lab.exec(&self.node, &cmd)
    }

    /// Runs `gobgp -j ARGS` and parses the output.
    pub fn gobgp_json(&self, args: &[&str]) -> Result<Value> {
        let mut cmd = vec!["-j"];
        cmd.extend_from_slice(args);
        let out = self.gobgp(&cmd)?;
        serde_json::from_str(&out)
            .with_context(|| format!("`gobgp -j {}` gave no JSON: {out}", args.join(" ")))
    }

    /// Session state towards neighbour `address`.
    pub fn bgp_state(&self, address: &str) -> Result<SessionState> {
        let json = self.gobgp_json(&["neighbor", address])?;
        let state = json
            .pointer("/state/session_state")
            .with_context(|| format!("no session_state in {json}"))?;
        session_state(state)
    }

    /// Every path in the global IPv4 and IPv6 RIBs.
    pub fn routes(&self) -> Result<Vec<BgpRoute>> {
        let mut routes = Vec::new();
        for family in ["ipv4", "ipv6"] {
            routes.extend(parse_rib(
                &self.gobgp_json(&["global", "rib", "-a", family])?,
            ));
        }
        Ok(routes)
    }
}

/// GoBGP prints the state as the API's enum number (or, in some versions,
/// its name).
fn session_state(value: &Value) -> Result<SessionState> {
    if let Some(text) = value.as_str() {
        return text
            .trim_start_matches("SESSION_STATE_")
            .replace('_', "")
            .parse();
    }
    Ok(match value.as_u64() {
        Some(1) => SessionState::Idle,
        Some(2) => SessionState::Connect,
        Some(3) => SessionState::Active,
        Some(4) => SessionState::OpenSent,
        Some(5) => SessionState::OpenConfirm,
        Some(6) => SessionState::Established,
        _ => bail!("unknown GoBGP session state {value}"),
    })
}

/// Reads `gobgp -j global rib`: `{prefix: [path, ...]}`, each path with
/// `best` and `attrs` (a list of attributes tagged by their type code).
fn parse_rib(json: &Value) -> Vec<BgpRoute> {
    let Some(table) = json.as_object() else {
        return Vec::new();
    };
    let mut routes = Vec::new();
    for (prefix, paths) in table {
        for path in paths.as_array().into_iter().flatten() {
            let mut route = BgpRoute {
                prefix: prefix.clone(),
                best: path.get("best").and_then(Value::as_bool).unwrap_or(false),
                ..BgpRoute::default()
            };
            for attr in path
                .get("attrs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                read_attribute(attr, &mut route);
            }
            routes.push(route);
        }
    }
    routes
}

fn read_attribute(attr: &Value, route: &mut BgpRoute) {
    let number = |key: &str| {
        attr.get(key)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
    };
    match attr.get("type").and_then(Value::as_u64) {
        // AS_PATH: segments of ASNs.
        Some(2) => {
            route.as_path = attr
                .get("as_paths")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .flat_map(|segment| {
                    segment
                        .get("asns")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|asn| asn.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect();
        }
        // NEXT_HOP, and MP_REACH_NLRI's next hop for IPv6.
        Some(3) | Some(14) => {
            if let Some(hop) = attr
                .get("nexthop")
                .and_then(Value::as_str)
                .and_then(|ip| ip.parse().ok())
            {
                route.next_hop = Some(hop);
            }
        }
        Some(4) => route.med = number("metric"),
        Some(5) => route.local_pref = number("value"),
        Some(8) => {
            route.communities = attr
                .get("communities")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .map(|c| format!("{}:{}", c >> 16, c & 0xffff))
                .collect();
        }
        Some(32) => {
            route.large_communities = attr
                .get("value")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|c| {
                    let field = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or_default();
                    format!(
                        "{}:{}:{}",
                        field("ASN"),
                        field("LocalData1"),
                        field("LocalData2")
                    )
                })
                .collect();
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_paths_from_global_rib_json() {
        let json: Value = serde_json::from_str(
            r#"{"192.0.2.0/24":[{"nlri":{"prefix":"192.0.2.0/24"},"age":1,"best":true,
                "attrs":[{"type":1,"value":0},
                         {"type":2,"as_paths":[{"segment_type":2,"num":2,"asns":[65002,65001]}]},
                         {"type":3,"nexthop":"10.0.2.1"},
                         {"type":4,"metric":7},
                         {"type":8,"communities":[4259840100]},
                         {"type":32,"value":[{"ASN":65000,"LocalData1":1,"LocalData2":2}]}]}]}"#,
        )
        .expect("valid json");
        let routes = parse_rib(&json);
        assert_eq!(routes.len(), 1);
        let route = &routes[0];
        assert!(route.best);
        assert_eq!(route.as_path, vec![65002, 65001]);
        assert_eq!(route.next_hop, Some("10.0.2.1".parse().expect("ip")));
        assert_eq!(route.med, Some(7));
        assert_eq!(route.communities, vec!["65000:100"]);
        assert_eq!(route.large_communities, vec!["65000:1:2"]);
    }

    #[test]
    fn reads_session_state_numbers_and_names() {
        assert_eq!(
            session_state(&Value::from(6)).ok(),
            Some(SessionState::Established)
        );
        assert_eq!(
            session_state(&Value::from(3)).ok(),
            Some(SessionState::Active)
        );
        assert_eq!(
            session_state(&Value::from("SESSION_STATE_OPENSENT")).ok(),
            Some(SessionState::OpenSent)
        );
        assert!(session_state(&Value::from(42)).is_err());
    }
}
