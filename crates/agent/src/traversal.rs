//! NAT traversal for a node that publishes no endpoint.
//!
//! - **Discovery**: the node asks the controller's discovery service
//!   ([`bgp4mesh_api::discovery`]) which address its WireGuard socket's
//!   datagrams come from, sending from that socket (the device's
//!   [`AnyDevice::send_datagram`]) to two ports: the same answer twice is
//!   an endpoint-independent NAT (or none, when it is the node's own
//!   address), two answers an endpoint-dependent one. With the host's
//!   own addresses it makes the node's *candidates*, reported to the
//!   controller: IPv6 first, then the NAT's public address, then the
//!   local IPv4 addresses (a peer behind the same NAT reaches those).
//!   Again every [`DISCOVER_EVERY`], as a roaming node's NAT changes.
//! - **Punching**: when the controller hands out a peer's candidates, the
//!   peer gets this node's at the same moment (one publish). Both nodes
//!   then punch ([`AnyDevice::punch`]): the first handshake wins. A peer
//!   whose candidates did not change is punched again only after
//!   [`PUNCH_AGAIN`] without a handshake, the time a NAT keeps stray
//!   state from a failed try (Linux: 30 s of silence).
//!
//! While both a node and its peer are behind NAT, the node never sends to
//! the peer's observed endpoint outside a punch: an unsynchronised packet
//! arriving at the peer's NAT first spoils the very mapping the punch
//! needs (see the device's `punch` module).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bgp4mesh_api::discovery::{self, TransactionId};
use bgp4mesh_api::relay;
use bgp4mesh_api::{MAX_CANDIDATES, MeshState, NatMapping, RelayRtt};
use bgp4mesh_wireguard::{AnyDevice, Key};
use rand_core::{OsRng, RngCore};

/// How often discovery runs again.
pub const DISCOVER_EVERY: Duration = Duration::from_secs(60);
/// How long discovery waits for the controller's answers.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// A request is sent again after this without an answer.
const ASK_AGAIN: Duration = Duration::from_millis(250);
/// A peer is punched again after this long without a handshake.
pub const PUNCH_AGAIN: Duration = Duration::from_secs(35);
/// A peer carried by a relay is punched again this often, so the pair
/// moves to a direct path within seconds of one opening (when neither NAT
/// is endpoint-dependent: their mappings cannot be punched).
pub const PUNCH_RELAYED: Duration = Duration::from_secs(5);

/// What discovery found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Found {
    /// Best first, at most [`MAX_CANDIDATES`].
    pub candidates: Vec<SocketAddr>,
    /// `None` when the controller answered on one port only.
    pub nat: Option<NatMapping>,
}

/// A punch made: with which candidates (theirs and ours), and when.
struct Punched {
    theirs: Vec<String>,
    ours: Vec<String>,
    at: Instant,
}

#[derive(Default)]
pub struct Traversal {
    found: Mutex<Option<Found>>,
    punched: Mutex<HashMap<String, Punched>>,
    /// The round trips to the relays, last measured.
    relay_rtts: Mutex<Option<Vec<RelayRtt>>>,
}

/// How often the round trips to the relays are measured.
pub const MEASURE_RELAYS_EVERY: Duration = Duration::from_secs(30);
/// Echoes per relay and measurement; the best counts.
const ECHOES: usize = 3;
/// How long a measurement waits for the replies.
const ECHO_WITHIN: Duration = Duration::from_secs(1);

/// The live relays among `state`'s peers: node id and where to echo.
pub fn relays_of(state: &MeshState) -> Vec<(String, SocketAddr)> {
    state
        .peers
        .iter()
        .filter_map(|p| {
            let port = p.relay_port?;
            let endpoint: SocketAddr = p.endpoint.as_deref()?.parse().ok()?;
            Some((p.node_id.clone(), SocketAddr::new(endpoint.ip(), port)))
        })
        .collect()
}

/// The best of [`ECHOES`] round trips to each of `relays` (node id,
/// address), from a socket of its own; relays that do not answer within
/// [`ECHO_WITHIN`] are left out.
pub fn measure_relays(relays: &[(String, SocketAddr)]) -> Vec<RelayRtt> {
    let Ok(socket) = std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0))
        .or_else(|_| std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)))
    else {
        return Vec::new();
    };
    let mut sent: HashMap<[u8; 8], (usize, Instant)> = HashMap::new();
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let v6_socket = socket.local_addr().is_ok_and(|a| a.is_ipv6());
    for _ in 0..ECHOES {
        for (i, (_, to)) in relays.iter().enumerate().take(bgp4mesh_api::MAX_RELAY_RTTS) {
            let mut id = [0u8; 8];
            OsRng.fill_bytes(&mut id);
            let to = match (v6_socket, to.ip()) {
                (true, IpAddr::V4(v4)) => {
                    SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), to.port())
                }
                _ => *to,
            };
            if socket.send_to(&relay::echo(&id), to).is_ok() {
                sent.insert(id, (i, Instant::now()));
            }
        }
    }
    let mut best: HashMap<usize, Duration> = HashMap::new();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    while started.elapsed() < ECHO_WITHIN && best.len() < relays.len() {
        let left = ECHO_WITHIN.saturating_sub(started.elapsed());
        if socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .is_err()
        {
            break;
        }
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            break;
        };
        let Some(id) = relay::parse_echo_reply(&buf[..n]) else {
            continue;
        };
        if let Some(&(i, at)) = sent.get(&id)
            && relays
                .get(i)
                .is_some_and(|(_, r)| canonical(*r) == canonical(from))
        {
            let rtt = at.elapsed();
            best.entry(i)
                .and_modify(|b| *b = (*b).min(rtt))
                .or_insert(rtt);
        }
    }
    let mut rtts: Vec<RelayRtt> = best
        .into_iter()
        .filter_map(|(i, rtt)| {
            Some(RelayRtt {
                node_id: relays.get(i)?.0.clone(),
                rtt_us: u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX).max(1),
            })
        })
        .collect();
    rtts.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    rtts
}

impl Traversal {
    /// The round trips to the relays, last measured.
    pub fn relay_rtts(&self) -> Option<Vec<RelayRtt>> {
        self.relay_rtts.lock().ok().and_then(|r| r.clone())
    }

    /// Keeps the round trips measured; true when the first came.
    pub fn set_relay_rtts(&self, rtts: Vec<RelayRtt>) -> bool {
        match self.relay_rtts.lock() {
            Ok(mut have) => have.replace(rtts).is_none(),
            Err(_) => false,
        }
    }

    /// What discovery last found.
    pub fn found(&self) -> Option<Found> {
        self.found.lock().ok().and_then(|f| f.clone())
    }

    /// Keeps what discovery found; true when it changed.
    pub fn set_found(&self, found: Found) -> bool {
        match self.found.lock() {
            Ok(mut have) if have.as_ref() != Some(&found) => {
                *have = Some(found);
                true
            }
            _ => false,
        }
    }

    /// Whether this node and `peer` are both behind NAT (both have
    /// candidates at the controller): then the device gets no endpoint
    /// for the peer from the controller, only from punches.
    pub fn both_behind_nat(state: &MeshState, peer: &bgp4mesh_api::Peer) -> bool {
        !state.node.candidates.is_empty() && !peer.candidates.is_empty()
    }

    /// Punches every peer that is behind NAT like this node and whose
    /// candidates (or this node's) changed since its last punch, or that
    /// has had no handshake for [`PUNCH_AGAIN`] since it. `recent`: the
    /// peers (public keys) with a live session.
    pub fn punch(
        &self,
        device: &AnyDevice,
        state: &MeshState,
        recent: &std::collections::BTreeSet<String>,
        through_relay: &std::collections::BTreeSet<String>,
    ) {
        let Ok(mut punched) = self.punched.lock() else {
            return;
        };
        punched.retain(|id, _| state.peers.iter().any(|p| &p.node_id == id));
        let now = Instant::now();
        for peer in state
            .peers
            .iter()
            .filter(|p| Self::both_behind_nat(state, p))
        {
            let changed = punched
                .get(&peer.node_id)
                .is_none_or(|p| p.theirs != peer.candidates || p.ours != state.node.candidates);
            let dependent =
                [peer.nat, state.node.nat].contains(&Some(NatMapping::EndpointDependent));
            let relayed = through_relay.contains(&peer.node_id);
            let again = if relayed && !dependent {
                PUNCH_RELAYED
            } else {
                PUNCH_AGAIN
            };
            let stale = punched
                .get(&peer.node_id)
                .is_some_and(|p| now.duration_since(p.at) >= again)
                && (relayed || !recent.contains(&peer.public_key));
            if !changed && !stale {
                continue;
            }
            let Ok(key) = Key::from_base64(&peer.public_key) else {
                continue;
            };
            let mut candidates: Vec<SocketAddr> = peer
                .candidates
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect();
            if peer.nat == Some(NatMapping::EndpointDependent) {
                candidates = with_predicted_ports(candidates);
            }
            match device.punch(&key, &candidates) {
                Ok(()) => tracing::info!(peer = %peer.name, ?candidates, "punching through NAT"),
                Err(e) => tracing::debug!(peer = %peer.name, "no punch: {e}"),
            }
            punched.insert(
                peer.node_id.clone(),
                Punched {
                    theirs: peer.candidates.clone(),
                    ours: state.node.candidates.clone(),
                    at: now,
                },
            );
        }
    }
}

/// How many ports after an endpoint-dependent NAT's last mapping are
/// tried: NATs that hand out ports in sequence give the mapping towards
/// us one of the next few.
pub const PREDICTED_PORTS: u16 = 8;

/// `candidates` of a peer behind an endpoint-dependent NAT, with the
/// [`PREDICTED_PORTS`] ports after its NAT's mapping (its first IPv4
/// candidate: discovery lists the NAT's address before the local ones).
/// A NAT that picks ports at random (`fully-random`) is not helped: the
/// pair takes the relay.
pub fn with_predicted_ports(mut candidates: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(mapping) = candidates.iter().find(|c| c.is_ipv4()).copied() else {
        return candidates;
    };
    for k in 1..=PREDICTED_PORTS {
        if let Some(port) = mapping.port().checked_add(k) {
            candidates.push(SocketAddr::new(mapping.ip(), port));
        }
    }
    candidates
}

/// Asks the discovery service at `server` (and the next port) where the
/// device's datagrams come from, and makes the node's candidates with the
/// host's `local` addresses and the device's `listen_port`.
pub fn discover(
    device: &AnyDevice,
    server: SocketAddr,
    local: &[IpAddr],
    listen_port: u16,
) -> Result<Found> {
    let (tx, rx) = std::sync::mpsc::sync_channel(16);
    device
        .set_foreign_receiver(Some((discovery::MAGIC, tx)))
        .context("endpoint discovery")?;
    let second = SocketAddr::new(server.ip(), server.port().wrapping_add(1));
    let mut asks: Vec<(SocketAddr, TransactionId, Option<SocketAddr>)> = [server, second]
        .into_iter()
        .map(|to| {
            let mut id = [0u8; 16];
            OsRng.fill_bytes(&mut id);
            (to, id, None)
        })
        .collect();
    let started = Instant::now();
    let mut last_ask: Option<Instant> = None;
    while started.elapsed() < ANSWER_WITHIN && asks.iter().any(|a| a.2.is_none()) {
        if last_ask.is_none_or(|t| t.elapsed() >= ASK_AGAIN) {
            for (to, id, answer) in &asks {
                if answer.is_none()
                    && let Err(e) = device.send_datagram(*to, &discovery::request(id))
                {
                    tracing::debug!(%to, "discovery request: {e}");
                }
            }
            last_ask = Some(Instant::now());
        }
        match rx.recv_timeout(ASK_AGAIN / 5) {
            Ok((from, datagram)) => {
                let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                if let Some((id, seen)) = discovery::parse_answer(&datagram)
                    && let Some(ask) = asks.iter_mut().find(|a| a.1 == id && a.0 == from)
                {
                    ask.2 = Some(seen);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = device.set_foreign_receiver(None);
    let seen: Vec<SocketAddr> = asks.iter().filter_map(|a| a.2).collect();
    if seen.is_empty() {
        bail!("no answer from the discovery service at {server} within {ANSWER_WITHIN:?}");
    }
    Ok(found(&seen, local, listen_port))
}

/// The candidates and NAT kind from the discovery answers `seen` (one per
/// port answered), the host's `local` addresses and the listen port.
fn found(seen: &[SocketAddr], local: &[IpAddr], listen_port: u16) -> Found {
    let public = seen[0];
    let nat = match seen {
        [a, b] if a != b => Some(NatMapping::EndpointDependent),
        [a, _] if local.contains(&a.ip()) && a.port() == listen_port => Some(NatMapping::None),
        [_, _] => Some(NatMapping::EndpointIndependent),
        _ => None,
    };
    let mut candidates: Vec<SocketAddr> = Vec::new();
    let mut add = |a: SocketAddr| {
        if !candidates.contains(&a) && candidates.len() < MAX_CANDIDATES {
            candidates.push(a);
        }
    };
    for ip in local.iter().filter(|ip| ip.is_ipv6()) {
        add(SocketAddr::new(*ip, listen_port));
    }
    add(public);
    for ip in local.iter().filter(|ip| ip.is_ipv4()) {
        add(SocketAddr::new(*ip, listen_port));
    }
    Found { candidates, nat }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("address")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn one_mapping_for_both_ports_is_endpoint_independent() {
        let f = found(
            &[sa("203.0.113.7:40000"), sa("203.0.113.7:40000")],
            &[ip("192.168.1.5"), ip("2001:db8::5")],
            51820,
        );
        assert_eq!(f.nat, Some(NatMapping::EndpointIndependent));
        assert_eq!(
            f.candidates,
            vec![
                sa("[2001:db8::5]:51820"),
                sa("203.0.113.7:40000"),
                sa("192.168.1.5:51820")
            ],
            "IPv6 first, then the NAT's public address, then the LAN"
        );
    }

    #[test]
    fn two_mappings_are_endpoint_dependent_and_own_address_is_no_nat() {
        let f = found(
            &[sa("203.0.113.7:40000"), sa("203.0.113.7:40001")],
            &[ip("192.168.1.5")],
            51820,
        );
        assert_eq!(f.nat, Some(NatMapping::EndpointDependent));
        let f = found(
            &[sa("198.51.100.2:51820"), sa("198.51.100.2:51820")],
            &[ip("198.51.100.2")],
            51820,
        );
        assert_eq!(f.nat, Some(NatMapping::None));
        assert_eq!(f.candidates, vec![sa("198.51.100.2:51820")], "no duplicate");
        let f = found(&[sa("203.0.113.7:40000")], &[], 51820);
        assert_eq!(f.nat, None, "one port answered: unknown");
    }

    #[test]
    fn an_endpoint_dependent_peer_is_tried_at_the_next_ports_of_its_mapping() {
        let c = with_predicted_ports(vec![
            sa("[2001:db8::5]:51820"),
            sa("203.0.113.7:40000"),
            sa("192.168.1.5:51820"),
        ]);
        assert_eq!(c.len(), 3 + PREDICTED_PORTS as usize);
        assert_eq!(c[3], sa("203.0.113.7:40001"));
        assert_eq!(c[10], sa("203.0.113.7:40008"));
        let top = with_predicted_ports(vec![sa("203.0.113.7:65534")]);
        assert_eq!(top, vec![sa("203.0.113.7:65534"), sa("203.0.113.7:65535")]);
    }

    #[test]
    fn candidates_are_capped() {
        let local: Vec<IpAddr> = (1..=20).map(|i| ip(&format!("10.0.0.{i}"))).collect();
        let f = found(&[sa("203.0.113.7:1")], &local, 51820);
        assert_eq!(f.candidates.len(), MAX_CANDIDATES);
        assert_eq!(f.candidates[0], sa("203.0.113.7:1"));
    }
}
