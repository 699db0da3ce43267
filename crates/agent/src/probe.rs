//! ICMP echo through the mesh: the probes the liveness judges
//! ([`crate::liveness`]) count. A raw ICMP socket per address family,
//! bound to the mesh interface, so a probe goes through the tunnel or not
//! at all; replies are told apart by an identifier of this prober and the
//! sequence number each probe carries.
//!
//! Blocking-free and thread-bound: the prober's owner (a thread of its
//! own, see `agent`) sends when it is time and drains the answers every
//! few milliseconds; tokio's `AsyncFd` would need `unsafe` to register a
//! raw socket, which this crate forbids.

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;
/// What a probe carries after the ICMP header: a marker, so a reply is
/// ours even where identifiers are rewritten.
const PAYLOAD: &[u8; 8] = b"b4m-prob";
/// Probes waiting for an answer at most (older ones are forgotten).
const OUTSTANDING: usize = 4096;

/// Sends echo requests through one interface and hands back the replies.
pub struct Prober {
    v4: Option<Socket>,
    v6: Option<Socket>,
    id: u16,
    seq: u16,
    /// Sequence number → target.
    outstanding: HashMap<u16, IpAddr>,
}

/// An answer to one of our probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    pub from: IpAddr,
}

impl Prober {
    /// Raw ICMP sockets bound to `interface` (root, or CAP_NET_RAW). A
    /// family whose socket cannot be made is left out (no IPv6 here).
    pub fn new(interface: &str) -> io::Result<Prober> {
        let open = |domain: Domain, protocol: Protocol| -> io::Result<Socket> {
            let socket = Socket::new(domain, Type::RAW, Some(protocol))?;
            socket.set_nonblocking(true)?;
            socket.set_cloexec(true)?;
            socket.bind_device(Some(interface.as_bytes()))?;
            Ok(socket)
        };
        let v4 = open(Domain::IPV4, Protocol::ICMPV4);
        let v6 = open(Domain::IPV6, Protocol::ICMPV6).ok();
        let v4 = match (v4, &v6) {
            (Ok(s), _) => Some(s),
            (Err(_), Some(_)) => None,
            (Err(e), None) => return Err(e),
        };
        let mut id = [0u8; 2];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| io::Error::other("no random numbers"))?;
        Ok(Prober {
            v4,
            v6,
            id: u16::from_be_bytes(id),
            seq: 0,
            outstanding: HashMap::new(),
        })
    }

    /// Sends one echo request to `to`. Lost like any packet when the
    /// interface cannot send it (no route, the peer has no endpoint).
    pub fn send(&mut self, to: IpAddr) {
        self.seq = self.seq.wrapping_add(1);
        let (socket, kind) = match to {
            IpAddr::V4(_) => (&self.v4, ECHO_REQUEST_V4),
            IpAddr::V6(_) => (&self.v6, ECHO_REQUEST_V6),
        };
        let Some(socket) = socket else { return };
        let mut packet = [0u8; 8 + PAYLOAD.len()];
        packet[0] = kind;
        packet[4..6].copy_from_slice(&self.id.to_be_bytes());
        packet[6..8].copy_from_slice(&self.seq.to_be_bytes());
        packet[8..].copy_from_slice(PAYLOAD);
        if kind == ECHO_REQUEST_V4 {
            // ICMPv6's checksum is the kernel's (it covers the addresses).
            let sum = checksum(&packet);
            packet[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        if self.outstanding.len() >= OUTSTANDING {
            self.outstanding.clear();
        }
        self.outstanding.insert(self.seq, to);
        let _ = socket.send_to(&packet, &SocketAddr::new(to, 0).into());
    }

    /// The answers that came since the last call (none waits).
    pub fn answers(&mut self) -> Vec<Answer> {
        let mut answers = Vec::new();
        let mut buf = [0u8; 1500];
        for v6 in [false, true] {
            loop {
                let socket = if v6 { &self.v6 } else { &self.v4 };
                let Some(mut socket) = socket.as_ref() else {
                    break;
                };
                match socket.read(&mut buf) {
                    Ok(n) => {
                        if let Some(answer) = self.take(&buf[..n], v6) {
                            answers.push(answer);
                        }
                    }
                    // WouldBlock: drained. Anything else: nothing to read.
                    Err(_) => break,
                }
            }
        }
        answers
    }

    /// Our answer in a received datagram, if it is one.
    fn take(&mut self, datagram: &[u8], v6: bool) -> Option<Answer> {
        let (icmp, from) = if v6 {
            // Raw ICMPv6 sockets get the ICMP message alone; the source is
            // checked against the probe's target below.
            (datagram, None)
        } else {
            let header = usize::from(datagram.first()? & 0x0f) * 4;
            let src: [u8; 4] = datagram.get(12..16)?.try_into().ok()?;
            (
                datagram.get(header..)?,
                Some(IpAddr::V4(Ipv4Addr::from(src))),
            )
        };
        let reply = if v6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
        if *icmp.first()? != reply
            || icmp.get(4..6)? != self.id.to_be_bytes()
            || icmp.get(8..16)? != PAYLOAD
        {
            return None;
        }
        let seq = u16::from_be_bytes(icmp.get(6..8)?.try_into().ok()?);
        let to = self.outstanding.remove(&seq)?;
        if from.is_some_and(|f| f != to) {
            return None;
        }
        Some(Answer { from: to })
    }
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for pair in data.chunks(2) {
        let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_of_an_echo_request() {
        // An echo request, id 1, seq 1, no payload: checksum 0xf7fd.
        let packet = [8u8, 0, 0, 0, 0, 1, 0, 1];
        assert_eq!(checksum(&packet), 0xf7fd);
        // The checksum of a packet that carries its checksum is 0.
        let mut with = packet;
        with[2..4].copy_from_slice(&0xf7fdu16.to_be_bytes());
        assert_eq!(checksum(&with), 0);
        assert_eq!(checksum(&[1, 2, 3]), !0x0402);
    }
}
