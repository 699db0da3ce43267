//! BIRD 2, run in the foreground with its own control socket, queried with
//! `birdc -s`. BIRD has no JSON output; the parsers below read the text of
//! `show protocols` and `show route all`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use super::{BgpRoute, SessionState, parse_as_path};
use crate::{Lab, Node, Proc, require_binary, wait_until};

pub struct Bird<'lab> {
    lab: &'lab Lab,
    node: Node,
    config: PathBuf,
    control_socket: PathBuf,
    proc: Proc,
}

impl<'lab> Bird<'lab> {
    /// Starts BIRD in `node` with `config` (bird.conf syntax) and waits until
    /// its control socket answers.
    pub fn start(lab: &'lab Lab, node: &Node, config: &str) -> Result<Bird<'lab>> {
        Self::start_with(lab, node, config, &[])
    }

    /// [`Bird::start`] with extra command-line flags (`-R`: recover from a
    /// graceful restart).
    pub fn start_with(
        lab: &'lab Lab,
        node: &Node,
        config: &str,
        flags: &[&str],
    ) -> Result<Bird<'lab>> {
        let bird = require_binary("bird")?;
        require_binary("birdc")?;
        let config_path = lab.write_config(node, "bird.conf", config)?;
        let run_dir = lab.run_dir(node)?;
        let control_socket = run_dir.join("bird.ctl");
        let pid_file = run_dir.join("bird.pid");
        let mut args = vec![
            bird.to_string_lossy().into_owned(),
            "-f".into(),
            "-c".into(),
            config_path.to_string_lossy().into_owned(),
            "-s".into(),
            control_socket.to_string_lossy().into_owned(),
            "-P".into(),
            pid_file.to_string_lossy().into_owned(),
        ];
        args.extend(flags.iter().map(|f| f.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let proc = lab.spawn(node, "bird", &args)?;
        let this = Bird {
            lab,
            node: node.clone(),
            config: config_path,
            control_socket,
            proc,
        };
        wait_until(Duration::from_secs(10), "BIRD's control socket", || {
            if !lab.is_running(&this.proc) {
                bail!("bird exited: {}", lab.log_tail(&this.proc, 20));
            }
            let status = this.birdc("show status")?;
            ensure!(status.contains("Daemon is up and running"), "{status}");
            Ok(())
        })?;
        Ok(this)
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Runs one birdc command and returns its output.
    pub fn birdc(&self, command: &str) -> Result<String> {
        let socket = self.control_socket.to_string_lossy();
        let mut args = vec!["birdc", "-s", socket.as_ref()];
        args.extend(command.split_whitespace());
        self.lab.exec(&self.node, &args)
    }

    /// Replaces the config file and tells BIRD to reload it.
    pub fn reconfigure(&self, config: &str) -> Result<()> {
        std::fs::write(&self.config, config)
            .with_context(|| format!("cannot write {}", self.config.display()))?;
        let out = self.birdc("configure")?;
        ensure!(
            out.contains("Reconfigured") || out.contains("Reconfiguration in progress"),
            "{out}"
        );
        Ok(())
    }

    /// State of BGP protocol `name` (its name in bird.conf).
    pub fn bgp_state(&self, protocol: &str) -> Result<SessionState> {
        let out = self.birdc(&format!("show protocols {protocol}"))?;
        parse_protocol_state(&out, protocol)
    }

    /// Every route in every table, with BGP attributes (`show route all`).
    pub fn routes(&self) -> Result<Vec<BgpRoute>> {
        Ok(parse_routes(&self.birdc("show route all")?))
    }

    /// Routes BIRD exports to protocol `name` (`show route export NAME all`).
    pub fn exported_routes(&self, protocol: &str) -> Result<Vec<BgpRoute>> {
        Ok(parse_routes(
            &self.birdc(&format!("show route export {protocol} all"))?,
        ))
    }
}

/// Reads the state of a BGP protocol from `show protocols NAME`:
/// `frr  BGP  ---  up  03:01:40.539  Established`.
fn parse_protocol_state(out: &str, protocol: &str) -> Result<SessionState> {
    let line = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(protocol))
        .with_context(|| format!("no protocol {protocol} in: {out}"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    ensure!(words.len() >= 5, "short protocol line: {line}");
    // Name Proto Table State Since [Info...]; Since may be "date time".
    match words
        .get(4..)
        .unwrap_or_default()
        .iter()
        .find_map(|w| w.parse().ok())
    {
        Some(state) => Ok(state),
        None if words[3] == "down" => Ok(SessionState::Idle),
        None => bail!("cannot read a BGP state from: {line}"),
    }
}

/// Parses `show route all`. A line starting in column 0 opens a prefix; an
/// indented line with a `[proto ...]` block is another path for the same
/// prefix; tab-indented lines are that path's attributes.
fn parse_routes(out: &str) -> Vec<BgpRoute> {
    let mut routes: Vec<BgpRoute> = Vec::new();
    let mut prefix = String::new();
    for line in out.lines() {
        if line.is_empty() || line.starts_with("Table ") || line.starts_with("BIRD ") {
            continue;
        }
        if let Some(attr) = line.strip_prefix('\t') {
            let Some(route) = routes.last_mut() else {
                continue;
            };
            let Some((key, value)) = attr.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                "BGP.as_path" => route.as_path = parse_as_path(value),
                "BGP.next_hop" => {
                    route.next_hop = value
                        .split_whitespace()
                        .next()
                        .and_then(|ip| ip.parse().ok())
                }
                "BGP.local_pref" => route.local_pref = value.parse().ok(),
                "BGP.med" => route.med = value.parse().ok(),
                "BGP.community" => route.communities = bird_tuples(value),
                "BGP.large_community" => route.large_communities = bird_tuples(value),
                _ => {}
            }
            continue;
        }
        if !line.contains('[') {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            prefix = line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
        let after_proto = line
            .split_once(']')
            .map(|(_, rest)| rest)
            .unwrap_or_default();
        routes.push(BgpRoute {
            prefix: prefix.clone(),
            best: after_proto.split_whitespace().next() == Some("*"),
            ..BgpRoute::default()
        });
    }
    routes
}

/// `(65000,100) (65000,200)` → `["65000:100", "65000:200"]`; also large ones.
fn bird_tuples(value: &str) -> Vec<String> {
    value
        .split('(')
        .filter_map(|part| part.split_once(')'))
        .map(|(inner, _)| {
            inner
                .split(',')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(":")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOW_ROUTE_ALL: &str = "BIRD 2.0.12 ready.
Table master4:
192.0.2.0/24         unicast [frr 03:33:52.144] * (100) [AS65001i]
\tvia 10.0.1.2 on eth0
\tType: BGP univ
\tBGP.origin: IGP
\tBGP.as_path: 65002 65001
\tBGP.next_hop: 10.0.1.2
\tBGP.med: 10
\tBGP.local_pref: 100
\tBGP.community: (65000,100) (65000,200)
\tBGP.large_community: (65000, 1, 2)
                     unicast [frr2 03:33:53.000] (100) [AS65001i]
\tvia 10.0.2.2 on eth1
\tBGP.as_path: 65003 65003 65001
\tBGP.next_hop: 10.0.2.2
198.51.100.0/24      blackhole [s4 03:01:40.539] * (200)
\tType: static univ
Table master6:
2001:db8::/32        unicast [frr 03:33:52.144] * (100) [AS65001i]
\tBGP.as_path: 65002 65001
\tBGP.next_hop: fd00:1::2 fe80::1
";

    #[test]
    fn reads_paths_attributes_and_best_flags() {
        let routes = parse_routes(SHOW_ROUTE_ALL);
        assert_eq!(routes.len(), 4, "{routes:#?}");
        let first = &routes[0];
        assert_eq!(first.prefix, "192.0.2.0/24");
        assert!(first.best);
        assert_eq!(first.as_path, vec![65002, 65001]);
        assert_eq!(first.next_hop, Some("10.0.1.2".parse().expect("ip")));
        assert_eq!(first.med, Some(10));
        assert_eq!(first.local_pref, Some(100));
        assert_eq!(first.communities, vec!["65000:100", "65000:200"]);
        assert_eq!(first.large_communities, vec!["65000:1:2"]);
        let second = &routes[1];
        assert_eq!(second.prefix, "192.0.2.0/24");
        assert!(!second.best);
        assert_eq!(second.as_path, vec![65003, 65003, 65001]);
        assert_eq!(routes[2].prefix, "198.51.100.0/24");
        assert!(routes[2].as_path.is_empty());
        assert_eq!(routes[3].next_hop, Some("fd00:1::2".parse().expect("ip")));
    }

    #[test]
    fn reads_protocol_state() {
        let out = "BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
frr        BGP        ---        up     03:01:40.539  Established   
gobgp      BGP        ---        start  03:01:40.539  Active        Socket: Connection refused
off        BGP        ---        down   03:01:40.539  
";
        assert_eq!(
            parse_protocol_state(out, "frr").ok(),
            Some(SessionState::Established)
        );
        assert_eq!(
            parse_protocol_state(out, "gobgp").ok(),
            Some(SessionState::Active)
        );
        assert_eq!(
            parse_protocol_state(out, "off").ok(),
            Some(SessionState::Idle)
        );
        assert!(parse_protocol_state(out, "nope").is_err());
    }
}
