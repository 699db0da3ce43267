//! Routing loops: our own datagrams read back from the TUN device.
//!
//! When the route to a peer's endpoint points into this same device (the
//! endpoint is one of the tunnel's own addresses, and no fwmark keeps the
//! socket's packets out), every datagram we send comes back in, is
//! encrypted again, 32 bytes larger, and goes round again for as long as
//! the session lasts: a few pings become a hundred megabytes a second.
//! The kernel module refuses such a send (ELOOP, the route's device being
//! its own); a userspace device cannot see the route, so it recognises the
//! datagram when it reads it back: UDP from our listen port, from an
//! address of this host, carrying a WireGuard message. It is dropped
//! there, so a loop ends after one round.
//!
//! Another tunnel's datagrams inside this one (a second device whose
//! endpoint is reached through this one: the kernel selftest's tunnel
//! through a tunnel) come from that device's port, and a forwarded host's
//! from its own address: they are carried as any packet.
//!
//! Our own datagram may also be meant to go through the tunnel: one
//! peer's endpoint reached through another peer of the same device (onion
//! routing through one device). So a datagram of ours is a loop only when
//! it is routed (by allowed IPs) to the very peer whose endpoint it goes
//! to, or when it is itself a datagram we made by carrying one of ours
//! (two peers whose endpoints each lie in the other's allowed IPs: a loop
//! two rounds long). One level of nesting is carried; the second is
//! dropped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use tracing::warn;

/// How long whether an address is this host's is remembered.
const LOCAL_KEPT: Duration = Duration::from_secs(1);
/// At most one warning per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Nested datagrams remembered (in flight at once, at most).
const NESTED_KEPT: usize = 256;

/// Our own WireGuard datagram read back from the TUN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct OwnDatagram {
    /// Where it was sent.
    pub(super) to: SocketAddr,
    /// A data message's receiver index and counter.
    id: Option<(u32, u64)>,
}

/// Recognises our own datagrams read back from the TUN device.
pub(super) struct LoopGuard {
    /// The last source address checked, whether it is this host's, and
    /// when that was found: a loop repeats one address.
    local: Option<(IpAddr, bool, Instant)>,
    warned: Option<Instant>,
    /// Data messages we sent carrying one of our own datagrams (receiver
    /// index, counter), newest last.
    nested: std::collections::VecDeque<(u32, u64)>,
}

impl LoopGuard {
    pub(super) fn new() -> LoopGuard {
        LoopGuard {
            local: None,
            warned: None,
            nested: std::collections::VecDeque::new(),
        }
    }

    /// Our own datagram, if `packet` (read from the TUN device) is a
    /// WireGuard datagram our socket on `port` sent. Costs a few
    /// comparisons for any other packet.
    pub(super) fn own(&mut self, packet: &[u8], port: u16) -> Option<OwnDatagram> {
        let (source, own) = own_port_wireguard(packet, port)?;
        self.is_local(source).then_some(own)
    }

    /// Whether carrying `own` would loop: routed to no peer (it would come
    /// back as an ICMP error to ourselves), to the peer whose endpoint it
    /// goes to (`routed_to` is that peer's endpoint), or already nested
    /// once. Warns (at most every 10 s) when it does.
    pub(super) fn loops(
        &mut self,
        interface: &str,
        own: &OwnDatagram,
        routed_to: Option<Option<SocketAddr>>,
    ) -> bool {
        let loops = match routed_to {
            None => true,
            Some(endpoint) => {
                endpoint.map(canonical) == Some(canonical(own.to))
                    || own.id.is_some_and(|id| self.nested.contains(&id))
            }
        };
        if loops && self.warned.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
            self.warned = Some(Instant::now());
            warn!(%interface, to = %own.to,
                "routing loop: the device's own datagrams came back into it (a peer's endpoint \
                 is routed through this interface to that same peer); dropped");
        }
        loops
    }

    /// We carried one of our own datagrams inside the data message
    /// `datagram` (bytes as sent): if that one comes back, it loops.
    pub(super) fn carried(&mut self, datagram: &[u8]) {
        if let Some(id) = data_id(datagram) {
            if self.nested.len() == NESTED_KEPT {
                self.nested.pop_front();
            }
            self.nested.push_back(id);
        }
    }

    /// The old all-in-one check (tests): an own datagram routed to no peer.
    #[cfg(test)]
    fn caught(&mut self, interface: &str, packet: &[u8], port: u16) -> bool {
        match self.own(packet, port) {
            Some(own) => self.loops(interface, &own, None),
            None => false,
        }
    }

    fn is_local(&mut self, address: IpAddr) -> bool {
        if let Some((known, local, at)) = self.local
            && known == address
            && at.elapsed() < LOCAL_KEPT
        {
            return local;
        }
        // Binding succeeds only to an address of this host (in this
        // namespace); the socket is closed at once.
        let local = std::net::UdpSocket::bind(SocketAddr::new(address, 0)).is_ok();
        self.local = Some((address, local, Instant::now()));
        local
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A data message's receiver index and counter.
fn data_id(message: &[u8]) -> Option<(u32, u64)> {
    if message.first() != Some(&4) || message.len() < 16 {
        return None;
    }
    let receiver = u32::from_le_bytes(message.get(4..8)?.try_into().ok()?);
    let counter = u64::from_le_bytes(message.get(8..16)?.try_into().ok()?);
    Some((receiver, counter))
}

/// The source address of `packet`, and where it goes, if it is UDP from
/// `port` carrying what looks like a WireGuard message (type 1 to 4, three
/// zero bytes), in an unfragmented packet or a first fragment.
fn own_port_wireguard(packet: &[u8], port: u16) -> Option<(IpAddr, OwnDatagram)> {
    const UDP: u8 = 17;
    const IPV6_FRAGMENT: u8 = 44;
    let (source, destination, udp) = match packet.first()? >> 4 {
        4 => {
            let header = usize::from(packet.first()? & 0x0f) * 4;
            let fragment_offset = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x1fff;
            if header < 20 || *packet.get(9)? != UDP || fragment_offset != 0 {
                return None;
            }
            let source: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            let destination: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            (
                IpAddr::V4(Ipv4Addr::from(source)),
                IpAddr::V4(Ipv4Addr::from(destination)),
                packet.get(header..)?,
            )
        }
        6 => {
            let source: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            let destination: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            let udp = match *packet.get(6)? {
                UDP => packet.get(40..)?,
                IPV6_FRAGMENT => {
                    let offset = u16::from_be_bytes([*packet.get(42)?, *packet.get(43)?]) >> 3;
                    if *packet.get(40)? != UDP || offset != 0 {
                        return None;
                    }
                    packet.get(48..)?
                }
                _ => return None,
            };
            (
                IpAddr::V6(Ipv6Addr::from(source)),
                IpAddr::V6(Ipv6Addr::from(destination)),
                udp,
            )
        }
        _ => return None,
    };
    let source_port = u16::from_be_bytes([*udp.first()?, *udp.get(1)?]);
    let destination_port = u16::from_be_bytes([*udp.get(2)?, *udp.get(3)?]);
    let message = udp.get(8..)?;
    let head = message.get(..4)?;
    let wireguard = matches!(head[0], 1..=4) && head[1..] == [0, 0, 0];
    (source_port == port && wireguard).then(|| {
        (
            source,
            OwnDatagram {
                to: SocketAddr::new(destination, destination_port),
                id: data_id(message),
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4(source: [u8; 4], port: u16, payload: &[u8], fragment: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
        p[6..8].copy_from_slice(&fragment.to_be_bytes());
        p.extend_from_slice(&source);
        p.extend_from_slice(&[192, 168, 241, 2]);
        p.extend_from_slice(&port.to_be_bytes());
        p.extend_from_slice(&[0, 7, 0, 0, 0, 0]);
        p.extend_from_slice(payload);
        p
    }

    fn udp6(port: u16, payload: &[u8], fragment_offset: Option<u16>) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 0, 17, 64];
        p.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        p.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        if let Some(offset) = fragment_offset {
            p[6] = 44;
            p.extend_from_slice(&[17, 0]);
            p.extend_from_slice(&(offset << 3 | 1).to_be_bytes());
            p.extend_from_slice(&[0, 0, 0, 1]);
        }
        p.extend_from_slice(&port.to_be_bytes());
        p.extend_from_slice(&[0, 7, 0, 0, 0, 0]);
        p.extend_from_slice(payload);
        p
    }

    const DATA: [u8; 16] = [4, 0, 0, 0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0];

    #[test]
    fn own_datagrams_from_a_local_address_are_caught() {
        let mut guard = LoopGuard::new();
        let looped = udp4([127, 0, 0, 1], 51820, &DATA, 0x2000);
        assert!(guard.caught("wg0", &looped, 51820));
        assert!(guard.caught("wg0", &udp6(51820, &DATA, None), 51820));
        assert!(guard.caught("wg0", &udp6(51820, &DATA, Some(0)), 51820));
    }

    #[test]
    fn other_traffic_passes() {
        let mut guard = LoopGuard::new();
        // Another device's port: a tunnel inside this one.
        assert!(!guard.caught("wg0", &udp4([127, 0, 0, 1], 51821, &DATA, 0), 51820));
        // Another host's WireGuard on the same port, forwarded.
        assert!(!guard.caught("wg0", &udp4([192, 0, 2, 7], 51820, &DATA, 0), 51820));
        // Not WireGuard, a later fragment, too short.
        let dns = [0x12, 0x34, 1, 0, 0, 1, 0, 0];
        assert!(!guard.caught("wg0", &udp4([127, 0, 0, 1], 51820, &dns, 0), 51820));
        assert!(!guard.caught("wg0", &udp4([127, 0, 0, 1], 51820, &DATA, 0x0010), 51820));
        assert!(!guard.caught("wg0", &udp6(51820, &DATA, Some(3)), 51820));
        assert!(!guard.caught("wg0", &udp4([127, 0, 0, 1], 51820, &[], 0), 51820));
    }

    #[test]
    fn an_own_datagram_for_another_peer_is_carried_once() {
        let mut guard = LoopGuard::new();
        let packet = udp4([127, 0, 0, 1], 51820, &DATA, 0);
        let own = guard.own(&packet, 51820).expect("ours");
        assert_eq!(own.to, "192.168.241.2:7".parse().unwrap());
        let elsewhere: SocketAddr = "10.0.0.9:51820".parse().unwrap();
        // Routed to another peer: onion routing, carried.
        assert!(!guard.loops("wg0", &own, Some(Some(elsewhere))));
        // Routed to the peer whose endpoint it goes to: a loop.
        assert!(guard.loops("wg0", &own, Some(Some(own.to))));
        // Routed to no peer: dropped, no ICMP error to ourselves.
        assert!(guard.loops("wg0", &own, None));
        // Carried inside a data message that comes back: the second
        // round of a two-peer loop.
        guard.carried(&DATA);
        assert!(guard.loops("wg0", &own, Some(Some(elsewhere))));
    }
}
