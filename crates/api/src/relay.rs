//! Relays: a public node forwards the WireGuard datagrams of two nodes that
//! cannot reach each other directly (an endpoint-dependent NAT, UDP blocked
//! between them). The relay holds no WireGuard key: what it forwards stays
//! encrypted end to end. It holds a *relay key*, which the controller gave
//! it; the controller hands each node of a pair a credential for the pair's
//! *channel* made with that key, and the relay forwards only between the
//! two sides of a channel that proved it.
//!
//! The relay's UDP port carries three messages, each starting with
//! [`MAGIC`]:
//!
//! ```text
//! bind  (node → relay, 64 bytes): "B4MR" | 1 | side | 0 0 | channel (8) |
//!        expires (8, Unix seconds, big-endian) | mac (32) | 8 zero bytes
//! bound (relay → node, 16 bytes): "B4MR" | 2 | side | 0 0 | channel (8)
//! data  (both ways): "B4MR" | 3 | side | 0 0 | channel (8) | a WireGuard datagram
//! ```
//!
//! and, to measure the round trip to a relay, an echo:
//!
//! ```text
//! echo  (node → relay, 16 bytes): "B4MR" | 4 | 0 0 0 | id (8)
//! reply (relay → node, 16 bytes): "B4MR" | 5 | 0 0 0 | the same id
//! ```
//!
//! A bind names the channel, the side (0 for the node with the lower id)
//! and when the credential expires; its MAC is HMAC-SHA256 under the relay
//! key. The relay answers a valid bind with `bound` (smaller than the
//! bind: no amplification) and remembers where it came from. Data from a
//! side's bound address goes to the other side's, unchanged: the header
//! names the channel and the side it came from.

use ring::hmac;

/// The first bytes of every relay message.
pub const MAGIC: [u8; 4] = *b"B4MR";
/// The length of the header in front of each relayed datagram.
pub const HEADER_LEN: usize = 16;
/// The length of a bind.
pub const BIND_LEN: usize = 64;
/// The length of a bound answer.
pub const BOUND_LEN: usize = 16;
/// The largest datagram a relay forwards (header included): a WireGuard
/// datagram of a 1500-byte MTU device and more, never a GSO super-datagram.
pub const MAX_DATAGRAM: usize = HEADER_LEN + 1500 + 80;

const BIND: u8 = 1;
const BOUND: u8 = 2;
const DATA: u8 = 3;
const ECHO: u8 = 4;
const ECHO_REPLY: u8 = 5;
/// The length of an echo and of its reply.
pub const ECHO_LEN: usize = 16;
const LABEL: &[u8] = b"bgp4mesh relay v1";

/// A pair's channel at a relay.
pub type Channel = [u8; 8];
/// A relay's key: 32 random bytes, the controller's and the relay's only.
pub type RelayKey = [u8; 32];

/// A bind: which channel and side, until when, and the controller's MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bind {
    pub channel: Channel,
    pub side: u8,
    pub expires: u64,
    pub mac: [u8; 32],
}

/// Lower-case hex, as a relay key, channel and MAC travel in the API
/// ([`crate::RelayPath`], `relay_key`).
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `N` bytes from `2 N` hex digits ([`to_hex`]); `None` for anything else.
pub fn from_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Whether `datagram` is a relay message of any kind.
pub fn is_relay(datagram: &[u8]) -> bool {
    datagram.starts_with(&MAGIC)
}

fn header(kind: u8, channel: &Channel, side: u8) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = kind;
    h[5] = side;
    h[8..16].copy_from_slice(channel);
    h
}

fn parse_header(datagram: &[u8], kind: u8) -> Option<(Channel, u8)> {
    if datagram.len() < HEADER_LEN || !is_relay(datagram) || datagram[4] != kind {
        return None;
    }
    let side = datagram[5];
    if side > 1 || datagram[6] != 0 || datagram[7] != 0 {
        return None;
    }
    let mut channel = [0u8; 8];
    channel.copy_from_slice(&datagram[8..16]);
    Some((channel, side))
}

/// The MAC of a credential for `channel`'s `side` until `expires`.
pub fn credential_mac(key: &RelayKey, channel: &Channel, side: u8, expires: u64) -> [u8; 32] {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(LABEL);
    ctx.update(channel);
    ctx.update(&[side]);
    ctx.update(&expires.to_be_bytes());
    let mut mac = [0u8; 32];
    mac.copy_from_slice(ctx.sign().as_ref());
    mac
}

/// The channel of the pair of nodes `a` and `b` (ids, in either order) at
/// the relay with `key`, and the side of `a` in it.
pub fn channel_of(key: &RelayKey, a: &str, b: &str) -> (Channel, u8) {
    let (low, high, side) = if a <= b { (a, b, 0) } else { (b, a, 1) };
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(b"bgp4mesh relay channel v1");
    ctx.update(&(low.len() as u64).to_be_bytes());
    ctx.update(low.as_bytes());
    ctx.update(high.as_bytes());
    let mut channel = [0u8; 8];
    channel.copy_from_slice(&ctx.sign().as_ref()[..8]);
    (channel, side)
}

/// A bind message.
pub fn bind(b: &Bind) -> [u8; BIND_LEN] {
    let mut m = [0u8; BIND_LEN];
    m[..HEADER_LEN].copy_from_slice(&header(BIND, &b.channel, b.side));
    m[16..24].copy_from_slice(&b.expires.to_be_bytes());
    m[24..56].copy_from_slice(&b.mac);
    m
}

/// A well-formed bind (not yet verified: see [`verify`]).
pub fn parse_bind(datagram: &[u8]) -> Option<Bind> {
    if datagram.len() != BIND_LEN {
        return None;
    }
    let (channel, side) = parse_header(datagram, BIND)?;
    let mut expires = [0u8; 8];
    expires.copy_from_slice(&datagram[16..24]);
    let mut mac = [0u8; 32];
    mac.copy_from_slice(&datagram[24..56]);
    Some(Bind {
        channel,
        side,
        expires: u64::from_be_bytes(expires),
        mac,
    })
}

/// Whether `bind` carries a credential made with `key` that has not
/// expired at `now` (Unix seconds). Constant time in the MAC.
pub fn verify(key: &RelayKey, bind: &Bind, now: u64) -> bool {
    if bind.expires < now {
        return false;
    }
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut message = Vec::with_capacity(LABEL.len() + 17);
    message.extend_from_slice(LABEL);
    message.extend_from_slice(&bind.channel);
    message.push(bind.side);
    message.extend_from_slice(&bind.expires.to_be_bytes());
    hmac::verify(&key, &message, &bind.mac).is_ok()
}

/// The relay's answer to a valid bind.
pub fn bound(channel: &Channel, side: u8) -> [u8; BOUND_LEN] {
    header(BOUND, channel, side)
}

/// The channel and side of a bound answer.
pub fn parse_bound(datagram: &[u8]) -> Option<(Channel, u8)> {
    if datagram.len() != BOUND_LEN {
        return None;
    }
    parse_header(datagram, BOUND)
}

/// The header in front of a datagram relayed on `channel`, from `side`.
pub fn data_header(channel: &Channel, side: u8) -> [u8; HEADER_LEN] {
    header(DATA, channel, side)
}

/// The channel, side and payload of a relayed datagram.
pub fn parse_data(datagram: &[u8]) -> Option<(Channel, u8, &[u8])> {
    let (channel, side) = parse_header(datagram, DATA)?;
    Some((channel, side, &datagram[HEADER_LEN..]))
}

fn echo_message(kind: u8, id: &[u8; 8]) -> [u8; ECHO_LEN] {
    let mut m = [0u8; ECHO_LEN];
    m[..4].copy_from_slice(&MAGIC);
    m[4] = kind;
    m[8..16].copy_from_slice(id);
    m
}

fn parse_echo_message(datagram: &[u8], kind: u8) -> Option<[u8; 8]> {
    if datagram.len() != ECHO_LEN || !is_relay(datagram) || datagram[4] != kind {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&datagram[8..16]);
    Some(id)
}

/// An echo request with `id`.
pub fn echo(id: &[u8; 8]) -> [u8; ECHO_LEN] {
    echo_message(ECHO, id)
}

/// The id of a well-formed echo request.
pub fn parse_echo(datagram: &[u8]) -> Option<[u8; 8]> {
    parse_echo_message(datagram, ECHO)
}

/// The reply to echo `id`: as long as the request, never longer.
pub fn echo_reply(id: &[u8; 8]) -> [u8; ECHO_LEN] {
    echo_message(ECHO_REPLY, id)
}

/// The id of a well-formed echo reply.
pub fn parse_echo_reply(datagram: &[u8]) -> Option<[u8; 8]> {
    parse_echo_message(datagram, ECHO_REPLY)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: RelayKey = [9; 32];

    #[test]
    fn a_credential_verifies_until_it_expires_and_only_for_its_channel_and_side() {
        let (channel, side) = channel_of(&KEY, "node-b", "node-a");
        assert_eq!(side, 1, "node-b sorts after node-a");
        assert_eq!(channel_of(&KEY, "node-a", "node-b"), (channel, 0));
        let b = Bind {
            channel,
            side,
            expires: 1000,
            mac: credential_mac(&KEY, &channel, side, 1000),
        };
        let parsed = parse_bind(&bind(&b)).expect("parses");
        assert_eq!(parsed, b);
        assert!(verify(&KEY, &parsed, 999));
        assert!(verify(&KEY, &parsed, 1000));
        assert!(!verify(&KEY, &parsed, 1001), "expired");
        assert!(!verify(&[8; 32], &parsed, 0), "another relay's key");
        let other_side = Bind { side: 0, ..parsed };
        assert!(!verify(&KEY, &other_side, 0), "the other side's credential");
        let (elsewhere, _) = channel_of(&KEY, "node-a", "node-c");
        assert!(!verify(
            &KEY,
            &Bind {
                channel: elsewhere,
                ..parsed
            },
            0
        ));
        let later = Bind {
            expires: 5000,
            ..parsed
        };
        assert!(!verify(&KEY, &later, 0), "an extended expiry");
    }

    #[test]
    fn hex_round_trips_and_bad_text_is_refused() {
        assert_eq!(to_hex(&[0x0a, 0xff]), "0aff");
        assert_eq!(from_hex::<2>("0aff"), Some([0x0a, 0xff]));
        assert_eq!(from_hex::<2>("0AFF"), Some([0x0a, 0xff]));
        assert_eq!(from_hex::<2>("0af"), None);
        assert_eq!(from_hex::<2>("0afz"), None);
        assert_eq!(from_hex::<2>("é0a"), None);
    }

    #[test]
    fn an_echo_and_its_reply_round_trip() {
        let id = [5u8; 8];
        assert_eq!(parse_echo(&echo(&id)), Some(id));
        assert_eq!(parse_echo_reply(&echo_reply(&id)), Some(id));
        assert_eq!(parse_echo_reply(&echo(&id)), None);
        assert_eq!(parse_echo(&echo_reply(&id)), None);
        assert_eq!(parse_data(&echo(&id)), None);
    }

    #[test]
    fn data_and_bound_round_trip_and_nothing_else_parses() {
        let channel = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut datagram = data_header(&channel, 1).to_vec();
        datagram.extend_from_slice(&[4, 0, 0, 0, 42]);
        let (c, s, payload) = parse_data(&datagram).expect("data");
        assert_eq!((c, s, payload), (channel, 1, &[4u8, 0, 0, 0, 42][..]));
        assert_eq!(parse_bound(&bound(&channel, 0)), Some((channel, 0)));
        assert!(bound(&channel, 0).len() < BIND_LEN, "never amplifies");
        assert_eq!(parse_bound(&datagram), None);
        assert_eq!(parse_bind(&datagram), None);
        let mut bad_side = data_header(&channel, 0);
        bad_side[5] = 2;
        assert_eq!(parse_data(&bad_side), None);
        assert_eq!(
            parse_data(&[4, 0, 0, 0]),
            None,
            "WireGuard is no relay data"
        );
        assert!(!is_relay(&[1, 0, 0, 0]));
    }
}
