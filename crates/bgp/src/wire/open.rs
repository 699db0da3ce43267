//! OPEN (RFC 4271 §4.2), optional parameters (and RFC 9072's extended
//! length), capabilities (RFC 5492).

use std::net::Ipv4Addr;

use super::attributes::AS_TRANS;
use super::notification::{Notification, error_code, open_error};
use super::{Family, Reader};

/// Capability codes.
mod code {
    pub const MULTIPROTOCOL: u8 = 1;
    pub const ROUTE_REFRESH: u8 = 2;
    pub const EXTENDED_NEXT_HOP: u8 = 5;
    pub const EXTENDED_MESSAGE: u8 = 6;
    pub const GRACEFUL_RESTART: u8 = 64;
    pub const FOUR_OCTET_AS: u8 = 65;
    pub const ADD_PATH: u8 = 69;
    pub const ENHANCED_ROUTE_REFRESH: u8 = 70;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// RFC 4760.
    Multiprotocol(Family),
    /// RFC 2918.
    RouteRefresh,
    /// RFC 8950: NLRI of `family` may carry a next hop of AFI `next_hop_afi`.
    ExtendedNextHop(Vec<(Family, u16)>),
    /// RFC 8654.
    ExtendedMessage,
    /// RFC 4724.
    GracefulRestart(GracefulRestart),
    /// RFC 6793.
    FourOctetAs(u32),
    /// RFC 7911, parsed only.
    AddPath(Vec<(Family, AddPathMode)>),
    /// RFC 7313.
    EnhancedRouteRefresh,
    /// Anything else, kept as received.
    Unknown { code: u8, data: Vec<u8> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GracefulRestart {
    /// R bit: the sender has restarted.
    pub restarting: bool,
    /// N bit (RFC 8538): NOTIFICATIONs are covered by graceful restart.
    pub notification: bool,
    /// Seconds the sender asks us to keep its routes after a restart.
    pub restart_time: u16,
    /// Families whose forwarding state is kept, with the F bit.
    pub families: Vec<(Family, bool)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddPathMode {
    Receive,
    Send,
    Both,
    Invalid(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub version: u8,
    /// The 2-octet "My Autonomous System" field (AS_TRANS for a 4-byte ASN).
    pub my_as: u16,
    pub hold_time: u16,
    pub bgp_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// An OPEN for `asn`, with the 4-octet AS capability added.
    pub fn new(
        asn: u32,
        hold_time: u16,
        bgp_id: Ipv4Addr,
        mut capabilities: Vec<Capability>,
    ) -> Self {
        if !capabilities
            .iter()
            .any(|c| matches!(c, Capability::FourOctetAs(_)))
        {
            capabilities.push(Capability::FourOctetAs(asn));
        }
        let my_as = u16::try_from(asn).unwrap_or(AS_TRANS as u16);
        Open {
            version: 4,
            my_as,
            hold_time,
            bgp_id,
            capabilities,
        }
    }

    /// The sender's ASN: from the 4-octet AS capability when present.
    pub fn asn(&self) -> u32 {
        self.four_octet_as().unwrap_or(self.my_as as u32)
    }

    pub fn four_octet_as(&self) -> Option<u32> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::FourOctetAs(asn) => Some(*asn),
            _ => None,
        })
    }

    pub fn has(&self, wanted: impl Fn(&Capability) -> bool) -> bool {
        self.capabilities.iter().any(wanted)
    }

    /// Families announced with the multiprotocol capability. An OPEN with
    /// none implies IPv4 unicast (RFC 4760 §8).
    pub fn families(&self) -> Vec<Family> {
        let families: Vec<Family> = self
            .capabilities
            .iter()
            .filter_map(|c| match c {
                Capability::Multiprotocol(f) => Some(*f),
                _ => None,
            })
            .collect();
        if families.is_empty() {
            vec![Family::IPV4_UNICAST]
        } else {
            families
        }
    }

    pub fn graceful_restart(&self) -> Option<&GracefulRestart> {
        self.capabilities.iter().find_map(|c| match c {
            Capability::GracefulRestart(gr) => Some(gr),
            _ => None,
        })
    }

    pub(crate) fn encode_body(&self, out: &mut Vec<u8>) {
        out.push(self.version);
        out.extend_from_slice(&self.my_as.to_be_bytes());
        out.extend_from_slice(&self.hold_time.to_be_bytes());
        out.extend_from_slice(&self.bgp_id.octets());
        let mut caps = Vec::new();
        for cap in &self.capabilities {
            encode_capability(&mut caps, cap);
        }
        if caps.is_empty() {
            out.push(0);
        } else if caps.len() + 2 <= 255 {
            out.push((caps.len() + 2) as u8);
            out.push(2);
            out.push(caps.len() as u8);
            out.extend_from_slice(&caps);
        } else {
            // RFC 9072: non-ext length 255, type 255, then 2-byte lengths.
            out.extend_from_slice(&[255, 255]);
            out.extend_from_slice(&((caps.len() + 3) as u16).to_be_bytes());
            out.push(2);
            out.extend_from_slice(&(caps.len() as u16).to_be_bytes());
            out.extend_from_slice(&caps);
        }
    }

    pub(crate) fn decode_body(body: &[u8]) -> Result<Open, Notification> {
        let malformed = || Notification::new(error_code::OPEN, 0, vec![]);
        let mut r = Reader::new(body);
        let version = r.u8().ok_or_else(malformed)?;
        if version != 4 {
            return Err(Notification::new(
                error_code::OPEN,
                open_error::UNSUPPORTED_VERSION,
                vec![0, 4],
            ));
        }
        let my_as = r.u16().ok_or_else(malformed)?;
        let hold_time = r.u16().ok_or_else(malformed)?;
        let bgp_id = Ipv4Addr::from(r.u32().ok_or_else(malformed)?);
        let params_len = r.u8().ok_or_else(malformed)?;
        let extended = params_len == 255 && r.rest().first() == Some(&255);
        let params = if extended {
            r.u8();
            let len = r.u16().ok_or_else(malformed)? as usize;
            r.take(len).ok_or_else(malformed)?
        } else {
            r.take(params_len as usize).ok_or_else(malformed)?
        };
        if !r.is_empty() {
            return Err(malformed());
        }
        let mut capabilities = Vec::new();
        let mut p = Reader::new(params);
        while !p.is_empty() {
            let kind = p.u8().ok_or_else(malformed)?;
            let len = if extended {
                p.u16()
            } else {
                p.u8().map(u16::from)
            }
            .ok_or_else(malformed)?;
            let value = p.take(len as usize).ok_or_else(malformed)?;
            if kind != 2 {
                return Err(Notification::new(
                    error_code::OPEN,
                    open_error::UNSUPPORTED_OPTIONAL_PARAMETER,
                    vec![],
                ));
            }
            let mut c = Reader::new(value);
            while !c.is_empty() {
                let code = c.u8().ok_or_else(malformed)?;
                let len = c.u8().ok_or_else(malformed)?;
                let data = c.take(len as usize).ok_or_else(malformed)?;
                capabilities.push(decode_capability(code, data));
            }
        }
        Ok(Open {
            version,
            my_as,
            hold_time,
            bgp_id,
            capabilities,
        })
    }
}

fn family(afi: u16, safi: u8) -> Family {
    Family { afi, safi }
}

/// Decodes one capability; a value of the wrong shape is kept as Unknown
/// (and so simply not used) rather than failing the session.
fn decode_capability(code: u8, data: &[u8]) -> Capability {
    let unknown = || Capability::Unknown {
        code,
        data: data.to_vec(),
    };
    let mut r = Reader::new(data);
    match code {
        code::MULTIPROTOCOL if data.len() == 4 => {
            Capability::Multiprotocol(family(u16::from_be_bytes([data[0], data[1]]), data[3]))
        }
        code::ROUTE_REFRESH if data.is_empty() => Capability::RouteRefresh,
        code::ENHANCED_ROUTE_REFRESH if data.is_empty() => Capability::EnhancedRouteRefresh,
        code::EXTENDED_MESSAGE if data.is_empty() => Capability::ExtendedMessage,
        code::FOUR_OCTET_AS if data.len() == 4 => {
            Capability::FourOctetAs(u32::from_be_bytes([data[0], data[1], data[2], data[3]]))
        }
        code::EXTENDED_NEXT_HOP if data.len() % 6 == 0 => {
            let mut entries = Vec::new();
            while let (Some(afi), Some(safi), Some(nh_afi)) = (r.u16(), r.u16(), r.u16()) {
                entries.push((family(afi, safi as u8), nh_afi));
            }
            Capability::ExtendedNextHop(entries)
        }
        code::ADD_PATH if data.len() % 4 == 0 => {
            let mut entries = Vec::new();
            while let (Some(afi), Some(safi), Some(mode)) = (r.u16(), r.u8(), r.u8()) {
                let mode = match mode {
                    1 => AddPathMode::Receive,
                    2 => AddPathMode::Send,
                    3 => AddPathMode::Both,
                    other => AddPathMode::Invalid(other),
                };
                entries.push((family(afi, safi), mode));
            }
            Capability::AddPath(entries)
        }
        code::GRACEFUL_RESTART if data.len() >= 2 && (data.len() - 2) % 4 == 0 => {
            let head = r.u16().unwrap_or(0);
            let mut families = Vec::new();
            while let (Some(afi), Some(safi), Some(flags)) = (r.u16(), r.u8(), r.u8()) {
                families.push((family(afi, safi), flags & 0x80 != 0));
            }
            Capability::GracefulRestart(GracefulRestart {
                restarting: head & 0x8000 != 0,
                notification: head & 0x4000 != 0,
                restart_time: head & 0x0fff,
                families,
            })
        }
        _ => unknown(),
    }
}

fn encode_capability(out: &mut Vec<u8>, cap: &Capability) {
    let start = out.len();
    let value = |code: u8, out: &mut Vec<u8>| {
        out.push(code);
        out.push(0);
    };
    match cap {
        Capability::Multiprotocol(f) => {
            value(code::MULTIPROTOCOL, out);
            out.extend_from_slice(&f.afi.to_be_bytes());
            out.push(0);
            out.push(f.safi);
        }
        Capability::RouteRefresh => value(code::ROUTE_REFRESH, out),
        Capability::EnhancedRouteRefresh => value(code::ENHANCED_ROUTE_REFRESH, out),
        Capability::ExtendedMessage => value(code::EXTENDED_MESSAGE, out),
        Capability::FourOctetAs(asn) => {
            value(code::FOUR_OCTET_AS, out);
            out.extend_from_slice(&asn.to_be_bytes());
        }
        Capability::ExtendedNextHop(entries) => {
            value(code::EXTENDED_NEXT_HOP, out);
            for (f, nh_afi) in entries {
                out.extend_from_slice(&f.afi.to_be_bytes());
                out.extend_from_slice(&(f.safi as u16).to_be_bytes());
                out.extend_from_slice(&nh_afi.to_be_bytes());
            }
        }
        Capability::AddPath(entries) => {
            value(code::ADD_PATH, out);
            for (f, mode) in entries {
                out.extend_from_slice(&f.afi.to_be_bytes());
                out.push(f.safi);
                out.push(match mode {
                    AddPathMode::Receive => 1,
                    AddPathMode::Send => 2,
                    AddPathMode::Both => 3,
                    AddPathMode::Invalid(m) => *m,
                });
            }
        }
        Capability::GracefulRestart(gr) => {
            value(code::GRACEFUL_RESTART, out);
            let mut head = gr.restart_time & 0x0fff;
            if gr.restarting {
                head |= 0x8000;
            }
            if gr.notification {
                head |= 0x4000;
            }
            out.extend_from_slice(&head.to_be_bytes());
            for (f, forwarding) in &gr.families {
                out.extend_from_slice(&f.afi.to_be_bytes());
                out.push(f.safi);
                out.push(if *forwarding { 0x80 } else { 0 });
            }
        }
        Capability::Unknown { code, data } => {
            value(*code, out);
            out.extend_from_slice(data);
        }
    }
    let len = out.len() - start - 2;
    out[start + 1] = len.min(255) as u8;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Codec, Decoded, Message, decode_message};

    fn round_trip(open: &Open) -> Open {
        let bytes = Message::Open(open.clone()).encode(&Codec::INITIAL);
        match decode_message(&bytes, &Codec::INITIAL) {
            Ok(Decoded::Message(Message::Open(o))) => o,
            other => panic!("not an OPEN: {other:?}"),
        }
    }

    #[test]
    fn byte_exact_open_with_four_octet_as() {
        let open = Open::new(
            4_242_421_869,
            90,
            Ipv4Addr::new(172, 22, 132, 169),
            vec![
                Capability::Multiprotocol(Family::IPV4_UNICAST),
                Capability::RouteRefresh,
            ],
        );
        let bytes = Message::Open(open.clone()).encode(&Codec::INITIAL);
        let expected: Vec<u8> = [
            &[0xff; 16][..],
            &[0, 45, 1],                      // length 45, OPEN
            &[4, 0x5b, 0xa0, 0, 90],          // version 4, AS_TRANS, hold 90
            &[172, 22, 132, 169],             // BGP identifier
            &[16, 2, 14],                     // one capabilities parameter
            &[1, 4, 0, 1, 0, 1],              // multiprotocol ipv4 unicast
            &[2, 0],                          // route refresh
            &[65, 4, 0xfc, 0xde, 0x38, 0x6d], // 4-octet AS 4242421869
        ]
        .concat();
        assert_eq!(bytes, expected);
        let back = round_trip(&open);
        assert_eq!(back, open);
        assert_eq!(back.asn(), 4_242_421_869);
        assert_eq!(back.my_as, 23456);
    }

    #[test]
    fn every_capability_round_trips() {
        let caps = vec![
            Capability::Multiprotocol(Family::IPV6_UNICAST),
            Capability::RouteRefresh,
            Capability::EnhancedRouteRefresh,
            Capability::ExtendedMessage,
            Capability::ExtendedNextHop(vec![(Family::IPV4_UNICAST, 2)]),
            Capability::AddPath(vec![(Family::IPV4_UNICAST, AddPathMode::Both)]),
            Capability::GracefulRestart(GracefulRestart {
                restarting: true,
                notification: true,
                restart_time: 120,
                families: vec![(Family::IPV4_UNICAST, true), (Family::IPV6_UNICAST, false)],
            }),
            Capability::Unknown {
                code: 73,
                data: b"\x04host\x00".to_vec(),
            },
        ];
        let open = Open::new(65001, 180, Ipv4Addr::new(10, 0, 0, 1), caps);
        assert_eq!(round_trip(&open), open);
        assert_eq!(open.my_as, 65001);
    }

    #[test]
    fn open_without_multiprotocol_means_ipv4_unicast() {
        let open = Open {
            version: 4,
            my_as: 65001,
            hold_time: 90,
            bgp_id: Ipv4Addr::new(1, 1, 1, 1),
            capabilities: vec![],
        };
        assert_eq!(open.families(), vec![Family::IPV4_UNICAST]);
        assert_eq!(open.asn(), 65001);
        assert_eq!(round_trip(&open), open);
    }

    #[test]
    fn many_capabilities_use_rfc_9072_extended_parameters() {
        let caps: Vec<Capability> = (0..60)
            .map(|i| Capability::Unknown {
                code: 200,
                data: vec![i; 3],
            })
            .collect();
        let open = Open::new(65001, 90, Ipv4Addr::new(10, 0, 0, 1), caps);
        assert_eq!(round_trip(&open), open);
    }

    #[test]
    fn bad_version_and_unknown_parameters_are_open_errors() {
        let open = Open::new(65001, 90, Ipv4Addr::new(10, 0, 0, 1), vec![]);
        let mut bytes = Message::Open(open).encode(&Codec::INITIAL);
        bytes[19] = 3;
        let err = decode_message(&bytes, &Codec::INITIAL).expect_err("version 3");
        assert_eq!((err.code, err.subcode, err.data), (2, 1, vec![0, 4]));

        let mut bytes = Message::Open(Open::new(65001, 90, Ipv4Addr::new(10, 0, 0, 1), vec![]))
            .encode(&Codec::INITIAL);
        bytes[29] = 1; // parameter type 1 (deprecated authentication)
        let err = decode_message(&bytes, &Codec::INITIAL).expect_err("param type 1");
        assert_eq!((err.code, err.subcode), (2, 4));
    }

    #[test]
    fn truncated_capabilities_are_malformed_not_a_panic() {
        let open = Open::new(
            65001,
            90,
            Ipv4Addr::new(10, 0, 0, 1),
            vec![Capability::RouteRefresh],
        );
        let bytes = Message::Open(open).encode(&Codec::INITIAL);
        for cut in 29..bytes.len() {
            let mut short = bytes[..cut].to_vec();
            short[16..18].copy_from_slice(&(cut as u16).to_be_bytes());
            let result = decode_message(&short, &Codec::INITIAL);
            assert!(result.is_err(), "cut at {cut}: {result:?}");
        }
    }
}
