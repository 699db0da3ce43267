//! Which family a tunnel runs over, for a peer that publishes an IPv6
//! endpoint next to its IPv4 one (`join --endpoint6`).
//!
//! The tunnel goes to the IPv6 endpoint when this node has a route to it
//! outside the mesh ([`reaches_outside_mesh`]); the IPv4 endpoint is the
//! device's second address there ([`AnyDevice::set_second_endpoint`]):
//! handshake retries go to both, so an IPv6 path that does not answer
//! (a blackhole, a firewall) falls back to IPv4 within one retry, 5 s. A
//! tunnel that fell back is probed over IPv6 again every [`PROBE_AGAIN`]
//! ([`AnyDevice::probe`]: a handshake there that moves the endpoint only
//! when answered), so it returns once the path is back. The kernel
//! backend has neither: there the IPv6 endpoint is used alone.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bgp4mesh_wireguard::{AnyDevice, Key};

/// A tunnel that fell back to IPv4 tries IPv6 again this often.
pub const PROBE_AGAIN: Duration = Duration::from_secs(30);

/// Whether this host routes `to` (an IPv6 endpoint) other than through
/// the mesh: the route a socket marked `mark` (the device's fwmark, which
/// keeps its packets out of a default route through the mesh) would take
/// exists, and its source is not the node's mesh address `mesh`. Asked
/// with a connected UDP socket: nothing is sent.
pub fn reaches_outside_mesh(to: SocketAddr, mark: u32, mesh: Option<Ipv6Addr>) -> bool {
    let Ok(socket) = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None) else {
        return false;
    };
    if mark != 0 && socket.set_mark(mark).is_err() {
        return false;
    }
    if socket.connect(&to.into()).is_err() {
        return false;
    }
    let source = socket
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.ip());
    match source {
        Some(std::net::IpAddr::V6(source)) => Some(source) != mesh,
        _ => false,
    }
}

/// A peer whose tunnel should run over IPv6.
struct Chosen {
    key: Key,
    to: SocketAddr,
    probed: Option<Instant>,
}

/// The peers (node id) whose tunnel was put on their IPv6 endpoint.
#[derive(Default)]
pub struct Ipv6Paths {
    chosen: Mutex<HashMap<String, Chosen>>,
    /// When the device's endpoints were last looked at.
    checked: Mutex<Option<Instant>>,
}

/// The device's endpoints are looked at this often (a status is a walk
/// over every peer).
const CHECK_EVERY: Duration = Duration::from_secs(5);

impl Ipv6Paths {
    /// The peers put on IPv6 by the state last applied: node id, key and
    /// IPv6 endpoint. Peers still chosen keep when they were last probed.
    pub fn set(&self, now: Vec<(String, Key, SocketAddr)>) {
        let Ok(mut chosen) = self.chosen.lock() else {
            return;
        };
        let mut next = HashMap::new();
        for (id, key, to) in now {
            let probed = chosen
                .remove(&id)
                .filter(|c| c.to == to)
                .and_then(|c| c.probed);
            next.insert(id, Chosen { key, to, probed });
        }
        *chosen = next;
    }

    /// Probes over IPv6 each chosen peer whose tunnel fell back to another
    /// endpoint, at most every [`PROBE_AGAIN`].
    pub fn probe_due(&self, device: &AnyDevice) {
        let Ok(mut chosen) = self.chosen.lock() else {
            return;
        };
        if chosen.is_empty() {
            return;
        }
        let now = Instant::now();
        if let Ok(mut checked) = self.checked.lock() {
            if checked.is_some_and(|t| now - t < CHECK_EVERY) {
                return;
            }
            *checked = Some(now);
        }
        let Ok(status) = device.status() else {
            return;
        };
        for c in chosen.values_mut() {
            let Some(peer) = status.peers.iter().find(|p| p.public_key == c.key) else {
                continue;
            };
            let on_ipv6 = peer
                .endpoint
                .is_some_and(|e| e.ip().to_canonical() == c.to.ip());
            if on_ipv6 {
                c.probed = None;
                continue;
            }
            if c.probed.is_some_and(|t| now - t < PROBE_AGAIN) {
                continue;
            }
            // The fallback happened after one retry: wait a probe interval
            // from the first time it is seen, not at once.
            let Some(_) = c.probed.replace(now) else {
                continue;
            };
            match device.probe(&c.key, c.to) {
                Ok(()) => tracing::debug!(to = %c.to, "tunnel on IPv4: trying IPv6 again"),
                Err(e) => tracing::debug!(to = %c.to, "IPv6 probe: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_route_no_ipv6() {
        // Documentation addresses have no route in the test's namespace
        // unless it has a default route; loopback always has one.
        let loopback: SocketAddr = "[::1]:51820".parse().unwrap();
        if std::net::UdpSocket::bind("[::1]:0").is_ok() {
            assert!(reaches_outside_mesh(loopback, 0, None));
            assert!(!reaches_outside_mesh(
                loopback,
                0,
                Some(Ipv6Addr::LOCALHOST)
            ));
        }
    }
}
