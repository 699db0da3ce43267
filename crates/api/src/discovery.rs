//! Endpoint discovery on UDP: a node asks the controller which address and
//! port its datagrams come from, sending from its WireGuard socket so that
//! the answer is the NAT mapping its tunnels use (what STUN does, in a
//! format of our own that fits beside WireGuard's on one socket).
//!
//! Both messages are [`MESSAGE_LEN`] bytes and start with [`MAGIC`], which
//! no WireGuard message does (theirs start with a type of 1 to 4 and three
//! zero bytes). A request carries a random transaction id that the answer
//! repeats, so an answer the node did not ask for is dropped. An answer is
//! never larger than its request: the service cannot amplify a flood sent
//! with someone else's source address.
//!
//! ```text
//! request:  "B4MD" | version 1 | kind 1 | 0 0 | transaction id (16) | 24 zero bytes
//! answer:   "B4MD" | version 1 | kind 2 | 0 0 | transaction id (16) |
//!           port (2, big-endian) | family (4 or 6) | 0 | address (16: IPv4 mapped into IPv6) | 4 zero bytes
//! ```

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

/// The first bytes of every discovery message.
pub const MAGIC: [u8; 4] = *b"B4MD";
/// The length of every discovery message, request and answer.
pub const MESSAGE_LEN: usize = 48;
const VERSION: u8 = 1;
const REQUEST: u8 = 1;
const ANSWER: u8 = 2;

/// A transaction id: random per request.
pub type TransactionId = [u8; 16];

/// Whether `datagram` is a discovery message (of any kind or length):
/// what a socket shared with WireGuard sets aside.
pub fn is_discovery(datagram: &[u8]) -> bool {
    datagram.starts_with(&MAGIC)
}

fn header(kind: u8, id: &TransactionId) -> [u8; MESSAGE_LEN] {
    let mut m = [0u8; MESSAGE_LEN];
    m[..4].copy_from_slice(&MAGIC);
    m[4] = VERSION;
    m[5] = kind;
    m[8..24].copy_from_slice(id);
    m
}

fn parse(datagram: &[u8], kind: u8) -> Option<(TransactionId, &[u8])> {
    if datagram.len() != MESSAGE_LEN
        || !is_discovery(datagram)
        || datagram[4] != VERSION
        || datagram[5] != kind
    {
        return None;
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&datagram[8..24]);
    Some((id, &datagram[24..]))
}

/// A request with transaction id `id`.
pub fn request(id: &TransactionId) -> [u8; MESSAGE_LEN] {
    header(REQUEST, id)
}

/// The transaction id of a well-formed request; `None` for anything else.
pub fn parse_request(datagram: &[u8]) -> Option<TransactionId> {
    parse(datagram, REQUEST).map(|(id, _)| id)
}

/// The answer to request `id`: it came from `observed`.
pub fn answer(id: &TransactionId, observed: SocketAddr) -> [u8; MESSAGE_LEN] {
    let mut m = header(ANSWER, id);
    m[24..26].copy_from_slice(&observed.port().to_be_bytes());
    let (family, address) = match observed.ip() {
        IpAddr::V4(v4) => (4, v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            // A dual-stack socket sees IPv4 senders as mapped addresses.
            Some(_) => (4, v6),
            None => (6, v6),
        },
    };
    m[26] = family;
    m[28..44].copy_from_slice(&address.octets());
    m
}

/// The transaction id and observed address of a well-formed answer.
pub fn parse_answer(datagram: &[u8]) -> Option<(TransactionId, SocketAddr)> {
    let (id, body) = parse(datagram, ANSWER)?;
    let port = u16::from_be_bytes([body[0], body[1]]);
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&body[4..20]);
    let v6 = Ipv6Addr::from(octets);
    let ip = match body[2] {
        4 => IpAddr::V4(v6.to_ipv4_mapped()?),
        6 if v6.to_ipv4_mapped().is_none() => IpAddr::V6(v6),
        _ => return None,
    };
    (port != 0).then_some((id, SocketAddr::new(ip, port)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_its_answer_round_trip() {
        let id = [7u8; 16];
        let req = request(&id);
        assert_eq!(parse_request(&req), Some(id));
        assert_eq!(parse_answer(&req), None, "a request is no answer");
        for seen in ["203.0.113.9:40000", "[2001:db8::9]:51820"] {
            let seen: SocketAddr = seen.parse().expect("address");
            let ans = answer(&id, seen);
            assert_eq!(parse_answer(&ans), Some((id, seen)));
            assert_eq!(parse_request(&ans), None, "an answer is no request");
            assert!(ans.len() <= req.len(), "never amplifies");
        }
    }

    #[test]
    fn a_mapped_ipv4_sender_is_answered_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:198.51.100.4]:1234".parse().expect("address");
        let (_, seen) = parse_answer(&answer(&[1; 16], mapped)).expect("answer");
        assert_eq!(seen, "198.51.100.4:1234".parse::<SocketAddr>().expect("v4"));
    }

    #[test]
    fn wireguard_messages_and_malformed_ones_are_not_discovery() {
        for wg in [[1u8, 0, 0, 0], [2, 0, 0, 0], [3, 0, 0, 0], [4, 0, 0, 0]] {
            assert!(!is_discovery(&wg));
        }
        let id = [3u8; 16];
        let mut short = request(&id).to_vec();
        short.pop();
        assert_eq!(parse_request(&short), None);
        let mut bad_version = request(&id);
        bad_version[4] = 9;
        assert_eq!(parse_request(&bad_version), None);
        let mut bad_family = answer(&id, "192.0.2.1:5".parse().expect("address"));
        bad_family[26] = 5;
        assert_eq!(parse_answer(&bad_family), None);
        let zero_port = answer(&id, "192.0.2.1:0".parse().expect("address"));
        assert_eq!(parse_answer(&zero_port), None);
    }
}
