//! Adapters for the real daemons bgp4mesh is judged against. Each starts the
//! daemon inside a lab node from a config the test writes (so tests read
//! like the configs operators run) and answers the questions tests ask by
//! parsing the daemon's own output, JSON where it has it.

mod bgp4mesh;
mod bird;
mod frr;
mod gobgp;
mod wireguard_go;

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

pub use bgp4mesh::Bgp4mesh;
pub use bird::Bird;
pub use frr::Frr;
pub use gobgp::Gobgp;
pub use wireguard_go::{WgDevice, WgImpl, WgPeer, WireguardGo};

/// RFC 4271 session states, as every daemon reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl FromStr for SessionState {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "idle" | "down" => SessionState::Idle,
            "connect" => SessionState::Connect,
            "active" | "passive" => SessionState::Active,
            "opensent" => SessionState::OpenSent,
            "openconfirm" => SessionState::OpenConfirm,
            "established" => SessionState::Established,
            other => anyhow::bail!("unknown BGP session state {other:?}"),
        })
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One BGP path as a peer reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BgpRoute {
    /// `"192.0.2.0/24"`, `"2001:db8::/32"`.
    pub prefix: String,
    /// AS_PATH as a flat list (AS_SETs flattened in order).
    pub as_path: Vec<u32>,
    pub next_hop: Option<IpAddr>,
    /// Whether the daemon selected it as best.
    pub best: bool,
    pub local_pref: Option<u32>,
    pub med: Option<u32>,
    /// Standard communities as `"65000:100"`.
    pub communities: Vec<String>,
    /// Large communities as `"65000:1:2"`.
    pub large_communities: Vec<String>,
}

/// Finds the best path for `prefix` among `routes`.
pub fn best_route<'r>(routes: &'r [BgpRoute], prefix: &str) -> Option<&'r BgpRoute> {
    routes.iter().find(|r| r.prefix == prefix && r.best)
}

fn parse_as_path(text: &str) -> Vec<u32> {
    text.split(|c: char| c.is_whitespace() || c == '{' || c == '}' || c == ',')
        .filter_map(|w| w.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_states_parse_from_every_daemon_spelling() {
        assert_eq!(
            "Established".parse::<SessionState>().ok(),
            Some(SessionState::Established)
        );
        assert_eq!(
            "OpenSent".parse::<SessionState>().ok(),
            Some(SessionState::OpenSent)
        );
        assert_eq!(
            "active".parse::<SessionState>().ok(),
            Some(SessionState::Active)
        );
        assert!("Bogus".parse::<SessionState>().is_err());
    }

    #[test]
    fn as_paths_flatten_sets() {
        assert_eq!(parse_as_path("65002 65001"), vec![65002, 65001]);
        assert_eq!(
            parse_as_path("65002 {65010,65011}"),
            vec![65002, 65010, 65011]
        );
        assert_eq!(parse_as_path(""), Vec::<u32>::new());
    }
}
