//! BPDU codec (802.1D-2004 clause 9): what follows the 802.3 length field of
//! a frame to 01:80:C2:00:00:00, that is the LLC header `42 42 03` and then
//! a Configuration, TCN or RST BPDU.
//!
//! Decoding is total: any byte string yields a [`Bpdu`] or a
//! [`DecodeError`], never a panic. Validation follows 9.3.4: a BPDU longer
//! than its type needs is accepted (trailing bytes ignored), a version above
//! 2 with type 2 (an MST BPDU) is read as an RST BPDU.

use std::fmt;

/// The destination address of BPDUs (Bridge Group Address, 802.1D 7.12.3).
pub const BRIDGE_GROUP_ADDRESS: [u8; 6] = [0x01, 0x80, 0xC2, 0x00, 0x00, 0x00];
/// LLC header of a BPDU: DSAP 0x42, SSAP 0x42, UI.
pub const LLC_HEADER: [u8; 3] = [0x42, 0x42, 0x03];

const TYPE_CONFIG: u8 = 0x00;
const TYPE_RST: u8 = 0x02;
const TYPE_TCN: u8 = 0x80;
/// Lengths of the BPDUs themselves, without the LLC header.
pub const CONFIG_LEN: usize = 35;
pub const RST_LEN: usize = 36;
pub const TCN_LEN: usize = 4;

/// Bridge identifier (9.2.5): 4-bit priority, 12-bit system id extension,
/// 6-byte MAC. Compares as the standard's unsigned 64-bit number: lower is
/// better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BridgeId(pub [u8; 8]);

impl BridgeId {
    /// `priority` is the full 16-bit value (a multiple of 4096 when the
    /// system id extension is 0, as in this project).
    pub fn new(priority: u16, mac: [u8; 6]) -> BridgeId {
        let mut b = [0u8; 8];
        b[..2].copy_from_slice(&priority.to_be_bytes());
        b[2..].copy_from_slice(&mac);
        BridgeId(b)
    }
    pub fn priority(&self) -> u16 {
        u16::from_be_bytes([self.0[0], self.0[1]])
    }
    pub fn mac(&self) -> [u8; 6] {
        let mut m = [0u8; 6];
        m.copy_from_slice(&self.0[2..]);
        m
    }
}

impl fmt::Display for BridgeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.mac();
        write!(
            f,
            "{:04x}.{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            self.priority(),
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[5]
        )
    }
}

/// Port identifier (9.2.7): 4-bit priority (the top nibble), 12-bit port
/// number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PortId(pub u16);

impl PortId {
    /// `priority` is 0..=240 in steps of 16 (its low nibble is dropped);
    /// `number` is 1..=4095 (its top nibble is dropped).
    pub fn new(priority: u8, number: u16) -> PortId {
        PortId((u16::from(priority & 0xf0) << 8) | (number & 0x0fff))
    }
    pub fn priority(&self) -> u8 {
        (self.0 >> 8) as u8 & 0xf0
    }
    pub fn number(&self) -> u16 {
        self.0 & 0x0fff
    }
}

impl fmt::Display for PortId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.priority(), self.number())
    }
}

/// The priority vector and timer values a Configuration or RST BPDU carries.
/// Times are in units of 1/256 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BpduBody {
    pub root_id: BridgeId,
    pub root_path_cost: u32,
    pub bridge_id: BridgeId,
    pub port_id: PortId,
    pub message_age: u16,
    pub max_age: u16,
    pub hello_time: u16,
    pub forward_delay: u16,
}

/// The port role an RST BPDU carries (9.3.3, flags bits 3 and 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BpduRole {
    /// 0: unknown (MSTP's Master role).
    Unknown,
    /// 1: Alternate or Backup.
    AlternateOrBackup,
    /// 2: Root.
    Root,
    /// 3: Designated.
    Designated,
}

/// The flags byte of an RST BPDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RstFlags {
    pub topology_change: bool,
    pub proposal: bool,
    pub role: BpduRole,
    pub learning: bool,
    pub forwarding: bool,
    pub agreement: bool,
    pub topology_change_ack: bool,
}

impl RstFlags {
    fn to_byte(self) -> u8 {
        let role = match self.role {
            BpduRole::Unknown => 0,
            BpduRole::AlternateOrBackup => 1,
            BpduRole::Root => 2,
            BpduRole::Designated => 3,
        };
        u8::from(self.topology_change)
            | u8::from(self.proposal) << 1
            | role << 2
            | u8::from(self.learning) << 4
            | u8::from(self.forwarding) << 5
            | u8::from(self.agreement) << 6
            | u8::from(self.topology_change_ack) << 7
    }
    fn from_byte(b: u8) -> RstFlags {
        RstFlags {
            topology_change: b & 0x01 != 0,
            proposal: b & 0x02 != 0,
            role: match (b >> 2) & 3 {
                0 => BpduRole::Unknown,
                1 => BpduRole::AlternateOrBackup,
                2 => BpduRole::Root,
                _ => BpduRole::Designated,
            },
            learning: b & 0x10 != 0,
            forwarding: b & 0x20 != 0,
            agreement: b & 0x40 != 0,
            topology_change_ack: b & 0x80 != 0,
        }
    }
}

/// A decoded BPDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bpdu {
    /// STP Configuration BPDU (protocol version 0, type 0x00). Only the
    /// Topology Change and Topology Change Acknowledgment flags exist.
    Config {
        topology_change: bool,
        topology_change_ack: bool,
        body: BpduBody,
    },
    /// STP Topology Change Notification BPDU (type 0x80).
    Tcn,
    /// RST BPDU (protocol version 2, type 0x02).
    Rst { flags: RstFlags, body: BpduBody },
}

/// Why bytes are not a BPDU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than the LLC header plus the BPDU its type announces.
    Truncated,
    /// Not `42 42 03`.
    BadLlc,
    /// Protocol identifier other than 0x0000.
    BadProtocolId,
    /// Type 0x02 with protocol version below 2.
    BadVersion,
    /// A BPDU type other than 0x00, 0x02, 0x80.
    UnknownType(u8),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("truncated BPDU"),
            DecodeError::BadLlc => f.write_str("not an LLC 42 42 03 frame"),
            DecodeError::BadProtocolId => f.write_str("protocol identifier is not 0"),
            DecodeError::BadVersion => f.write_str("RST BPDU with protocol version below 2"),
            DecodeError::UnknownType(t) => write!(f, "unknown BPDU type {t:#04x}"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl Bpdu {
    /// LLC header + BPDU, ready to follow the 802.3 length field.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(LLC_HEADER.len() + RST_LEN);
        v.extend_from_slice(&LLC_HEADER);
        v.extend_from_slice(&[0, 0]); // protocol identifier
        match self {
            Bpdu::Tcn => v.extend_from_slice(&[0, TYPE_TCN]),
            Bpdu::Config {
                topology_change,
                topology_change_ack,
                body,
            } => {
                v.extend_from_slice(&[0, TYPE_CONFIG]);
                v.push(u8::from(*topology_change) | u8::from(*topology_change_ack) << 7);
                encode_body(&mut v, body);
            }
            Bpdu::Rst { flags, body } => {
                v.extend_from_slice(&[2, TYPE_RST, flags.to_byte()]);
                encode_body(&mut v, body);
                v.push(0); // Version 1 Length
            }
        }
        v
    }

    /// Decodes LLC header + BPDU. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Bpdu, DecodeError> {
        let (llc, b) = bytes
            .split_at_checked(LLC_HEADER.len())
            .ok_or(DecodeError::Truncated)?;
        if llc != LLC_HEADER {
            return Err(DecodeError::BadLlc);
        }
        let [p0, p1, version, kind, ..] = *b else {
            return Err(DecodeError::Truncated);
        };
        if (p0, p1) != (0, 0) {
            return Err(DecodeError::BadProtocolId);
        }
        match kind {
            TYPE_TCN => Ok(Bpdu::Tcn),
            TYPE_CONFIG => {
                let flags = *b.get(4).ok_or(DecodeError::Truncated)?;
                let body = decode_body(b, CONFIG_LEN)?;
                Ok(Bpdu::Config {
                    topology_change: flags & 0x01 != 0,
                    topology_change_ack: flags & 0x80 != 0,
                    body,
                })
            }
            TYPE_RST => {
                if version < 2 {
                    return Err(DecodeError::BadVersion);
                }
                let flags = *b.get(4).ok_or(DecodeError::Truncated)?;
                let body = decode_body(b, RST_LEN)?;
                Ok(Bpdu::Rst {
                    flags: RstFlags::from_byte(flags),
                    body,
                })
            }
            t => Err(DecodeError::UnknownType(t)),
        }
    }
}

fn encode_body(v: &mut Vec<u8>, body: &BpduBody) {
    v.extend_from_slice(&body.root_id.0);
    v.extend_from_slice(&body.root_path_cost.to_be_bytes());
    v.extend_from_slice(&body.bridge_id.0);
    v.extend_from_slice(&body.port_id.0.to_be_bytes());
    for t in [
        body.message_age,
        body.max_age,
        body.hello_time,
        body.forward_delay,
    ] {
        v.extend_from_slice(&t.to_be_bytes());
    }
}

/// `b` starts at the protocol identifier; `need` is the BPDU's length.
fn decode_body(b: &[u8], need: usize) -> Result<BpduBody, DecodeError> {
    let b = b.get(..need).ok_or(DecodeError::Truncated)?;
    let id8 = |at: usize| -> Result<[u8; 8], DecodeError> {
        b.get(at..at + 8)
            .and_then(|s| <[u8; 8]>::try_from(s).ok())
            .ok_or(DecodeError::Truncated)
    };
    let u16_at = |at: usize| -> Result<u16, DecodeError> {
        b.get(at..at + 2)
            .and_then(|s| <[u8; 2]>::try_from(s).ok())
            .map(u16::from_be_bytes)
            .ok_or(DecodeError::Truncated)
    };
    let cost = b
        .get(13..17)
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_be_bytes)
        .ok_or(DecodeError::Truncated)?;
    Ok(BpduBody {
        root_id: BridgeId(id8(5)?),
        root_path_cost: cost,
        bridge_id: BridgeId(id8(17)?),
        port_id: PortId(u16_at(25)?),
        message_age: u16_at(27)?,
        max_age: u16_at(29)?,
        hello_time: u16_at(31)?,
        forward_delay: u16_at(33)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn body() -> impl Strategy<Value = BpduBody> {
        (
            any::<[u8; 8]>(),
            any::<u32>(),
            any::<[u8; 8]>(),
            any::<u16>(),
            any::<[u16; 4]>(),
        )
            .prop_map(|(r, c, b, p, t)| BpduBody {
                root_id: BridgeId(r),
                root_path_cost: c,
                bridge_id: BridgeId(b),
                port_id: PortId(p),
                message_age: t[0],
                max_age: t[1],
                hello_time: t[2],
                forward_delay: t[3],
            })
    }

    fn bpdu() -> impl Strategy<Value = Bpdu> {
        prop_oneof![
            Just(Bpdu::Tcn),
            (any::<bool>(), any::<bool>(), body()).prop_map(|(tc, tca, body)| Bpdu::Config {
                topology_change: tc,
                topology_change_ack: tca,
                body
            }),
            (any::<u8>(), body()).prop_map(|(f, body)| Bpdu::Rst {
                flags: RstFlags::from_byte(f),
                body
            }),
        ]
    }

    proptest! {
        #[test]
        fn decode_of_encode_is_identity(b in bpdu()) {
            let bytes = b.encode();
            prop_assert_eq!(Bpdu::decode(&bytes), Ok(b));
            // Every strict prefix that cuts into the BPDU is refused.
            for n in 0..bytes.len() {
                prop_assert!(Bpdu::decode(&bytes[..n]).is_err());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Bpdu::decode(&bytes);
        }

        #[test]
        fn arbitrary_bpdu_bodies_never_panic(kind in prop_oneof![Just(0u8), Just(2), Just(0x80), any::<u8>()],
                                             version in any::<u8>(),
                                             rest in proptest::collection::vec(any::<u8>(), 0..48)) {
            let mut bytes = vec![0x42, 0x42, 0x03, 0, 0, version, kind];
            bytes.extend_from_slice(&rest);
            let _ = Bpdu::decode(&bytes);
        }
    }

    #[test]
    fn layouts_match_the_standard() {
        let body = BpduBody {
            root_id: BridgeId::new(0x8000, [2, 0, 0, 0, 0, 1]),
            root_path_cost: 20_000,
            bridge_id: BridgeId::new(0x9000, [2, 0, 0, 0, 0, 2]),
            port_id: PortId::new(0x80, 3),
            message_age: 256,
            max_age: 20 * 256,
            hello_time: 2 * 256,
            forward_delay: 15 * 256,
        };
        let tcn = Bpdu::Tcn.encode();
        assert_eq!(tcn, [0x42, 0x42, 0x03, 0, 0, 0, 0x80]);
        let cfg = Bpdu::Config {
            topology_change: true,
            topology_change_ack: true,
            body,
        }
        .encode();
        assert_eq!(cfg.len(), 3 + CONFIG_LEN);
        assert_eq!(&cfg[3..8], &[0, 0, 0, 0, 0x81]);
        assert_eq!(&cfg[8..16], &[0x80, 0, 2, 0, 0, 0, 0, 1]);
        assert_eq!(&cfg[16..20], &20_000u32.to_be_bytes());
        assert_eq!(&cfg[20..28], &[0x90, 0, 2, 0, 0, 0, 0, 2]);
        assert_eq!(&cfg[28..30], &[0x80, 0x03]);
        assert_eq!(&cfg[30..38], &[1, 0, 20, 0, 2, 0, 15, 0]);
        let rst = Bpdu::Rst {
            flags: RstFlags {
                topology_change: false,
                proposal: true,
                role: BpduRole::Designated,
                learning: true,
                forwarding: false,
                agreement: true,
                topology_change_ack: false,
            },
            body,
        }
        .encode();
        assert_eq!(rst.len(), 3 + RST_LEN);
        assert_eq!(&rst[3..8], &[0, 0, 2, 2, 0x02 | 0x0c | 0x10 | 0x40]);
        assert_eq!(rst[38], 0, "version 1 length");
        // Longer frames (Ethernet padding) are accepted.
        let mut padded = rst.clone();
        padded.extend_from_slice(&[0; 10]);
        assert!(matches!(Bpdu::decode(&padded), Ok(Bpdu::Rst { .. })));
        let mut v1 = rst.clone();
        v1[5] = 1;
        assert_eq!(Bpdu::decode(&v1), Err(DecodeError::BadVersion));
        let mut mst = rst.clone();
        mst[5] = 3;
        assert!(matches!(Bpdu::decode(&mst), Ok(Bpdu::Rst { .. })));
        assert_eq!(Bpdu::decode(&[0x42, 0x42]), Err(DecodeError::Truncated));
        assert_eq!(
            Bpdu::decode(&[0xaa, 0xaa, 0x03, 0, 0, 0, 0]),
            Err(DecodeError::BadLlc)
        );
        assert_eq!(
            Bpdu::decode(&[0x42, 0x42, 0x03, 0, 0, 0, 0x7]),
            Err(DecodeError::UnknownType(7))
        );
    }
}
