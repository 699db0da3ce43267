//! BGP-4 messages on the wire (RFC 4271 §4) and their extensions.
//!
//! Decoding never panics on any input. A decode error is a [`Notification`]
//! to send before closing the session; UPDATE errors that RFC 7606 lets us
//! survive are reported inside [`DecodedUpdate`] instead (treat-as-withdraw,
//! attribute-discard), so the FSM never has to guess.

mod attributes;
mod notification;
mod open;
mod prefix;
mod update;

pub use attributes::{
    AS_TRANS, Aggregator, AsPath, AsSegment, Community, LargeCommunity, NextHop, Origin,
    PathAttributes, RawAttribute, SegmentKind, attr_type,
};
pub use notification::{Notification, cease, error_code, header_error, open_error, update_error};
pub use open::{AddPathMode, Capability, GracefulRestart, Open};
pub use prefix::{decode_prefixes, encode_prefix, prefix_wire_len};
pub use update::{DecodedUpdate, MpReach, MpUnreach, Update, UpdateBuilder};

use ipnet::IpNet;

/// Length of the fixed header: 16-byte marker, 2-byte length, 1-byte type.
pub const HEADER_LEN: usize = 19;
/// Largest message without RFC 8654 extended messages.
pub const MAX_MESSAGE_LEN: usize = 4096;
/// Largest message with RFC 8654 extended messages.
pub const MAX_EXTENDED_MESSAGE_LEN: usize = 65535;

pub const MSG_OPEN: u8 = 1;
pub const MSG_UPDATE: u8 = 2;
pub const MSG_NOTIFICATION: u8 = 3;
pub const MSG_KEEPALIVE: u8 = 4;
pub const MSG_ROUTE_REFRESH: u8 = 5;

/// Address family identifiers (RFC 4760) we speak.
pub const AFI_IPV4: u16 = 1;
pub const AFI_IPV6: u16 = 2;
pub const SAFI_UNICAST: u8 = 1;

/// An address family: the AFI/SAFI pair of RFC 4760.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Family {
    pub afi: u16,
    pub safi: u8,
}

impl Family {
    pub const IPV4_UNICAST: Family = Family {
        afi: AFI_IPV4,
        safi: SAFI_UNICAST,
    };
    pub const IPV6_UNICAST: Family = Family {
        afi: AFI_IPV6,
        safi: SAFI_UNICAST,
    };

    /// The family a prefix belongs to (unicast).
    pub fn of(prefix: &IpNet) -> Family {
        match prefix {
            IpNet::V4(_) => Family::IPV4_UNICAST,
            IpNet::V6(_) => Family::IPV6_UNICAST,
        }
    }

    /// Whether we can carry prefixes of this family.
    pub fn is_supported(self) -> bool {
        self == Family::IPV4_UNICAST || self == Family::IPV6_UNICAST
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.afi, self.safi) {
            (AFI_IPV4, SAFI_UNICAST) => f.write_str("ipv4 unicast"),
            (AFI_IPV6, SAFI_UNICAST) => f.write_str("ipv6 unicast"),
            (afi, safi) => write!(f, "afi {afi} safi {safi}"),
        }
    }
}

/// What the session has negotiated that changes how messages are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    /// Both sides sent the 4-octet AS capability (RFC 6793).
    pub four_octet_as: bool,
    /// Both sides sent the extended message capability (RFC 8654).
    pub extended_message: bool,
    /// The neighbour is in another AS: LOCAL_PREF from it is discarded.
    pub ebgp: bool,
}

impl Codec {
    /// Before OPENs are exchanged: 2-octet AS, 4096-byte messages.
    pub const INITIAL: Codec = Codec {
        four_octet_as: false,
        extended_message: false,
        ebgp: true,
    };

    pub fn max_message_len(&self) -> usize {
        if self.extended_message {
            MAX_EXTENDED_MESSAGE_LEN
        } else {
            MAX_MESSAGE_LEN
        }
    }
}

/// ROUTE-REFRESH (RFC 2918) with the RFC 7313 subtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRefresh {
    pub family: Family,
    pub subtype: RefreshSubtype,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshSubtype {
    /// A plain request to resend Adj-RIB-Out.
    Request,
    /// Beginning of Route Refresh (RFC 7313).
    Begin,
    /// End of Route Refresh (RFC 7313).
    End,
    /// A reserved subtype: ignored on receipt (RFC 7313 §5).
    Reserved(u8),
}

impl RefreshSubtype {
    fn code(self) -> u8 {
        match self {
            RefreshSubtype::Request => 0,
            RefreshSubtype::Begin => 1,
            RefreshSubtype::End => 2,
            RefreshSubtype::Reserved(c) => c,
        }
    }
}

/// A BGP message. UPDATEs are decoded separately, see [`Update::decode_body`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Box<Update>),
    Notification(Notification),
    Keepalive,
    RouteRefresh(RouteRefresh),
}

impl Message {
    /// Encodes the whole message, header included.
    pub fn encode(&self, codec: &Codec) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Message::Open(open) => frame(&mut out, MSG_OPEN, |b| open.encode_body(b)),
            Message::Update(update) => {
                frame(&mut out, MSG_UPDATE, |b| update.encode_body(b, codec))
            }
            Message::Notification(n) => frame(&mut out, MSG_NOTIFICATION, |b| n.encode_body(b)),
            Message::Keepalive => frame(&mut out, MSG_KEEPALIVE, |_| {}),
            Message::RouteRefresh(rr) => frame(&mut out, MSG_ROUTE_REFRESH, |b| {
                b.extend_from_slice(&rr.family.afi.to_be_bytes());
                b.push(rr.subtype.code());
                b.push(rr.family.safi);
            }),
        }
        out
    }

    /// The message type's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Open(_) => "OPEN",
            Message::Update(_) => "UPDATE",
            Message::Notification(_) => "NOTIFICATION",
            Message::Keepalive => "KEEPALIVE",
            Message::RouteRefresh(_) => "ROUTE-REFRESH",
        }
    }
}

/// Appends a header and the body written by `body`, then fixes the length.
pub(crate) fn frame(out: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0xff; 16]);
    out.extend_from_slice(&[0, 0, kind]);
    body(out);
    debug_assert!(
        out.len() - start <= MAX_EXTENDED_MESSAGE_LEN,
        "message of {} bytes",
        out.len() - start
    );
    let len = u16::try_from(out.len() - start).unwrap_or(u16::MAX);
    out[start + 16..start + 18].copy_from_slice(&len.to_be_bytes());
}

/// The next whole message at the start of `buf`: `Ok(None)` when more bytes
/// are needed, `Ok(Some((type, len)))` when `buf[..len]` is one message.
/// Header errors (RFC 4271 §6.1) come back as the NOTIFICATION to send.
pub fn next_frame(buf: &[u8], codec: &Codec) -> Result<Option<(u8, usize)>, Notification> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|b| *b != 0xff) {
        return Err(Notification::new(
            error_code::HEADER,
            header_error::NOT_SYNCHRONIZED,
            vec![],
        ));
    }
    let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
    let kind = buf[18];
    let bad_length = || {
        Notification::new(
            error_code::HEADER,
            header_error::BAD_LENGTH,
            buf[16..18].to_vec(),
        )
    };
    let min = match kind {
        MSG_OPEN => 29,
        MSG_UPDATE => 23,
        MSG_NOTIFICATION => 21,
        MSG_KEEPALIVE => HEADER_LEN,
        MSG_ROUTE_REFRESH => 23,
        other => {
            return Err(Notification::new(
                error_code::HEADER,
                header_error::BAD_TYPE,
                vec![other],
            ));
        }
    };
    // OPEN is at most 4096 even with extended messages (RFC 8654 §3);
    // KEEPALIVE is exactly 19 bytes.
    let max = match kind {
        MSG_OPEN => MAX_MESSAGE_LEN,
        MSG_KEEPALIVE => HEADER_LEN,
        _ => codec.max_message_len(),
    };
    if len < min || len > max {
        return Err(bad_length());
    }
    if buf.len() < len {
        return Ok(None);
    }
    Ok(Some((kind, len)))
}

/// Decodes one whole message (as delimited by [`next_frame`]), header
/// included. An UPDATE's RFC 7606 outcome is in the returned
/// [`DecodedUpdate`]; other variants are complete messages.
pub fn decode_message(frame: &[u8], codec: &Codec) -> Result<Decoded, Notification> {
    let Some((kind, len)) = next_frame(frame, codec)? else {
        return Err(Notification::new(
            error_code::HEADER,
            header_error::BAD_LENGTH,
            vec![],
        ));
    };
    let body = &frame[HEADER_LEN..len];
    Ok(match kind {
        MSG_OPEN => Decoded::Message(Message::Open(Open::decode_body(body)?)),
        MSG_UPDATE => Decoded::Update(Box::new(Update::decode_body(body, codec)?)),
        MSG_NOTIFICATION => {
            Decoded::Message(Message::Notification(Notification::decode_body(body)))
        }
        MSG_KEEPALIVE => Decoded::Message(Message::Keepalive),
        MSG_ROUTE_REFRESH => {
            if body.len() != 4 {
                // RFC 7313 §5: ROUTE-REFRESH Message Error / Invalid Message Length.
                return Err(Notification::new(
                    error_code::ROUTE_REFRESH,
                    1,
                    frame[..len].to_vec(),
                ));
            }
            let subtype = match body[2] {
                0 => RefreshSubtype::Request,
                1 => RefreshSubtype::Begin,
                2 => RefreshSubtype::End,
                c => RefreshSubtype::Reserved(c),
            };
            Decoded::Message(Message::RouteRefresh(RouteRefresh {
                family: Family {
                    afi: u16::from_be_bytes([body[0], body[1]]),
                    safi: body[3],
                },
                subtype,
            }))
        }
        other => {
            return Err(Notification::new(
                error_code::HEADER,
                header_error::BAD_TYPE,
                vec![other],
            ));
        }
    })
}

/// A decoded message: UPDATEs carry their RFC 7606 outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    Message(Message),
    Update(Box<DecodedUpdate>),
}

/// A bounds-checked cursor over received bytes.
#[derive(Debug, Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf
    }
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_is_nineteen_bytes_of_header() {
        let bytes = Message::Keepalive.encode(&Codec::INITIAL);
        let mut expected = vec![0xff; 16];
        expected.extend_from_slice(&[0, 19, 4]);
        assert_eq!(bytes, expected);
        assert_eq!(
            next_frame(&bytes, &Codec::INITIAL),
            Ok(Some((MSG_KEEPALIVE, 19)))
        );
        assert_eq!(
            decode_message(&bytes, &Codec::INITIAL),
            Ok(Decoded::Message(Message::Keepalive))
        );
    }

    #[test]
    fn header_errors_name_the_rfc_4271_subcode() {
        let mut bytes = Message::Keepalive.encode(&Codec::INITIAL);
        assert_eq!(
            next_frame(&bytes[..18], &Codec::INITIAL),
            Ok(None),
            "partial header waits"
        );
        bytes[3] = 0;
        let err = next_frame(&bytes, &Codec::INITIAL).expect_err("bad marker");
        assert_eq!((err.code, err.subcode), (1, 1));

        let mut long_keepalive = Message::Keepalive.encode(&Codec::INITIAL);
        long_keepalive[17] = 20;
        long_keepalive.push(0);
        let err = next_frame(&long_keepalive, &Codec::INITIAL).expect_err("keepalive is 19 bytes");
        assert_eq!(
            (err.code, err.subcode, err.data.clone()),
            (1, 2, vec![0, 20])
        );

        let mut unknown = Message::Keepalive.encode(&Codec::INITIAL);
        unknown[18] = 9;
        let err = next_frame(&unknown, &Codec::INITIAL).expect_err("type 9");
        assert_eq!((err.code, err.subcode, err.data.clone()), (1, 3, vec![9]));
    }

    #[test]
    fn updates_longer_than_4096_need_extended_messages() {
        let mut bytes = vec![0xff; 16];
        bytes.extend_from_slice(&5000u16.to_be_bytes());
        bytes.push(MSG_UPDATE);
        bytes.resize(5000, 0);
        assert!(next_frame(&bytes, &Codec::INITIAL).is_err());
        let extended = Codec {
            extended_message: true,
            ..Codec::INITIAL
        };
        assert_eq!(next_frame(&bytes, &extended), Ok(Some((MSG_UPDATE, 5000))));
    }

    #[test]
    fn route_refresh_round_trips_with_its_subtype() {
        for subtype in [
            RefreshSubtype::Request,
            RefreshSubtype::Begin,
            RefreshSubtype::End,
        ] {
            let msg = Message::RouteRefresh(RouteRefresh {
                family: Family::IPV6_UNICAST,
                subtype,
            });
            let bytes = msg.encode(&Codec::INITIAL);
            assert_eq!(bytes.len(), 23);
            assert_eq!(
                decode_message(&bytes, &Codec::INITIAL),
                Ok(Decoded::Message(msg))
            );
        }
    }
}
