//! UPDATE (RFC 4271 §4.3) with MP_REACH/MP_UNREACH (RFC 4760), extended
//! next hop (RFC 8950) and revised error handling (RFC 7606).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::attributes::{AttributeDecoder, attr_name, attr_type, flag};
use super::notification::{Notification, update_error};
use super::prefix::{decode_prefixes, encode_prefix, prefix_wire_len};
use super::{
    AFI_IPV4, Codec, Family, HEADER_LEN, MSG_UPDATE, NextHop, PathAttributes, Reader, frame,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpReach {
    pub family: Family,
    pub next_hop: NextHop,
    pub nlri: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MpUnreach {
    pub family: Family,
    pub withdrawn: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    /// IPv4 unicast prefixes withdrawn in the classic field.
    pub withdrawn: Vec<IpNet>,
    /// None when the UPDATE has no path attributes at all.
    pub attributes: Option<PathAttributes>,
    /// IPv4 unicast prefixes announced in the classic field.
    pub nlri: Vec<IpNet>,
    pub mp_reach: Option<MpReach>,
    pub mp_unreach: Option<MpUnreach>,
}

/// A received UPDATE and what RFC 7606 says to do with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedUpdate {
    pub update: Update,
    /// Set when an attribute error means every announced prefix must be
    /// handled as withdrawn (the reason, for the log).
    pub treat_as_withdraw: Option<String>,
    /// Attributes dropped under attribute-discard (reasons, for the log).
    pub discarded: Vec<String>,
}

impl DecodedUpdate {
    /// The family whose End-of-RIB marker this is (RFC 4724 §2).
    pub fn end_of_rib(&self) -> Option<Family> {
        let u = &self.update;
        if u.withdrawn.is_empty() && u.nlri.is_empty() && u.mp_reach.is_none() {
            match (&u.attributes, &u.mp_unreach) {
                (None, None) => return Some(Family::IPV4_UNICAST),
                (Some(attrs), Some(unreach))
                    if unreach.withdrawn.is_empty() && *attrs == PathAttributes::default() =>
                {
                    return Some(unreach.family);
                }
                _ => {}
            }
        }
        None
    }

    /// Every prefix this UPDATE removes: the withdrawn ones, and under
    /// treat-as-withdraw the announced ones too.
    pub fn withdrawn(&self) -> impl Iterator<Item = &IpNet> {
        let u = &self.update;
        let taw = self.treat_as_withdraw.is_some();
        u.withdrawn
            .iter()
            .chain(u.mp_unreach.iter().flat_map(|m| m.withdrawn.iter()))
            .chain(u.nlri.iter().filter(move |_| taw))
            .chain(
                u.mp_reach
                    .iter()
                    .flat_map(|m| m.nlri.iter())
                    .filter(move |_| taw),
            )
    }
}

fn reset(subcode: u8, data: Vec<u8>) -> Notification {
    Notification::update(subcode, data)
}

impl Update {
    /// Decodes an UPDATE body (after the 19-byte header).
    pub fn decode_body(body: &[u8], codec: &Codec) -> Result<DecodedUpdate, Notification> {
        let malformed_list = || reset(update_error::MALFORMED_ATTRIBUTE_LIST, vec![]);
        let mut r = Reader::new(body);
        let withdrawn_len = r.u16().ok_or_else(malformed_list)? as usize;
        let withdrawn_bytes = r.take(withdrawn_len).ok_or_else(malformed_list)?;
        let attrs_len = r.u16().ok_or_else(malformed_list)? as usize;
        let attr_bytes = r.take(attrs_len).ok_or_else(malformed_list)?;
        let nlri_bytes = r.rest();
        let invalid_network = |_| reset(update_error::INVALID_NETWORK_FIELD, vec![]);
        let withdrawn = decode_prefixes(withdrawn_bytes, AFI_IPV4).map_err(invalid_network)?;
        let nlri = decode_prefixes(nlri_bytes, AFI_IPV4).map_err(invalid_network)?;

        let mut dec = AttributeDecoder::new();
        let mut mp_reach = None;
        let mut mp_unreach = None;
        let mut overrun = false;
        let mut a = Reader::new(attr_bytes);
        while !a.is_empty() {
            let start = a.rest();
            let (Some(flags), Some(code)) = (a.u8(), a.u8()) else {
                overrun = true;
                break;
            };
            let len = if flags & flag::EXTENDED_LENGTH != 0 {
                a.u16()
            } else {
                a.u8().map(u16::from)
            };
            let Some(value) = len.and_then(|len| a.take(len as usize)) else {
                overrun = true;
                break;
            };
            let whole = &start[..start.len() - a.remaining()];
            if dec.seen[code as usize] {
                if code == attr_type::MP_REACH_NLRI || code == attr_type::MP_UNREACH_NLRI {
                    return Err(malformed_list());
                }
                dec.discarded
                    .push(format!("duplicate {} ignored", attr_name(code)));
                continue;
            }
            dec.seen[code as usize] = true;
            match code {
                attr_type::MP_REACH_NLRI | attr_type::MP_UNREACH_NLRI => {
                    // RFC 7606 §7.11: a malformed MP attribute resets the session.
                    let mp_error = |why: String| {
                        let _ = why;
                        reset(update_error::OPTIONAL_ATTRIBUTE, whole.to_vec())
                    };
                    if flags & (flag::OPTIONAL | flag::TRANSITIVE) != flag::OPTIONAL {
                        return Err(mp_error("flags".into()));
                    }
                    if code == attr_type::MP_REACH_NLRI {
                        match decode_mp_reach(value).map_err(mp_error)? {
                            Some(reach) => mp_reach = Some(reach),
                            None => dec
                                .discarded
                                .push("MP_REACH_NLRI of an unsupported family ignored".into()),
                        }
                    } else {
                        match decode_mp_unreach(value).map_err(mp_error)? {
                            Some(unreach) => mp_unreach = Some(unreach),
                            None => dec
                                .discarded
                                .push("MP_UNREACH_NLRI of an unsupported family ignored".into()),
                        }
                    }
                }
                _ if dec.add(flags, code, value, codec.four_octet_as, codec.ebgp) => {}
                _ if flags & flag::OPTIONAL == 0 => {
                    return Err(reset(update_error::UNRECOGNIZED_WELL_KNOWN, whole.to_vec()));
                }
                _ if flags & flag::TRANSITIVE != 0 => dec.attrs.unknown.push(super::RawAttribute {
                    flags: flags & !flag::EXTENDED_LENGTH,
                    code,
                    value: value.to_vec(),
                }),
                // Unrecognised optional non-transitive: quietly ignored.
                _ => {}
            }
        }
        if overrun {
            // The last attribute runs past the attribute field. The NLRI
            // fields are still found from the Total Attribute Length, but an
            // MP_REACH hidden behind the broken attribute would not be.
            let classic = !withdrawn.is_empty() || !nlri.is_empty();
            if mp_reach.is_some() || mp_unreach.is_some() || classic {
                dec.withdraw
                    .get_or_insert_with(|| "attribute runs past the attribute field".into());
            } else {
                return Err(reset(update_error::ATTRIBUTE_LENGTH, vec![]));
            }
        }
        if !codec.four_octet_as {
            dec.reconcile_as4();
        }
        let announces = !nlri.is_empty()
            || mp_reach
                .as_ref()
                .is_some_and(|m: &MpReach| !m.nlri.is_empty());
        if announces && dec.withdraw.is_none() {
            let missing = [
                (attr_type::ORIGIN, true),
                (attr_type::AS_PATH, true),
                (attr_type::NEXT_HOP, !nlri.is_empty()),
            ]
            .into_iter()
            .find(|(code, needed)| *needed && !dec.seen[*code as usize]);
            if let Some((code, _)) = missing {
                dec.withdraw = Some(format!("missing well-known attribute {}", attr_name(code)));
            }
        }
        Ok(DecodedUpdate {
            update: Update {
                withdrawn,
                attributes: (attrs_len > 0).then_some(dec.attrs),
                nlri,
                mp_reach,
                mp_unreach,
            },
            treat_as_withdraw: dec.withdraw,
            discarded: dec.discarded,
        })
    }

    pub(crate) fn encode_body(&self, out: &mut Vec<u8>, codec: &Codec) {
        let start = out.len();
        out.extend_from_slice(&[0, 0]);
        self.withdrawn.iter().for_each(|p| encode_prefix(out, p));
        let withdrawn_len = (out.len() - start - 2) as u16;
        out[start..start + 2].copy_from_slice(&withdrawn_len.to_be_bytes());

        let attrs_start = out.len();
        out.extend_from_slice(&[0, 0]);
        // MP attributes first (RFC 7606 §5.1).
        if let Some(unreach) = &self.mp_unreach {
            put_mp_unreach(out, unreach.family, &unreach.withdrawn);
        }
        if let Some(reach) = &self.mp_reach {
            put_mp_reach(out, reach.family, &reach.next_hop, &reach.nlri);
        }
        if let Some(attrs) = &self.attributes {
            attrs.encode(out, codec.four_octet_as, !self.nlri.is_empty());
        }
        let attrs_len = (out.len() - attrs_start - 2) as u16;
        out[attrs_start..attrs_start + 2].copy_from_slice(&attrs_len.to_be_bytes());
        self.nlri.iter().for_each(|p| encode_prefix(out, p));
    }
}

fn decode_family(r: &mut Reader<'_>) -> Result<Family, String> {
    let afi = r.u16().ok_or("AFI missing")?;
    let safi = r.u8().ok_or("SAFI missing")?;
    Ok(Family { afi, safi })
}

/// `Ok(None)` for a family we do not carry.
fn decode_mp_reach(value: &[u8]) -> Result<Option<MpReach>, String> {
    let mut r = Reader::new(value);
    let family = decode_family(&mut r)?;
    let nh_len = r.u8().ok_or("next hop length missing")? as usize;
    let nh = r.take(nh_len).ok_or("next hop cut short")?;
    r.u8().ok_or("reserved octet missing")?;
    if !family.is_supported() {
        return Ok(None);
    }
    let next_hop = match nh_len {
        4 if family.afi == AFI_IPV4 => NextHop::V4(Ipv4Addr::from(
            <[u8; 4]>::try_from(nh).map_err(|_| "next hop")?,
        )),
        16 | 32 => {
            let global = Ipv6Addr::from(<[u8; 16]>::try_from(&nh[..16]).map_err(|_| "next hop")?);
            let link_local = (nh_len == 32)
                .then(|| <[u8; 16]>::try_from(&nh[16..]).map(Ipv6Addr::from))
                .transpose()
                .map_err(|_| "next hop")?
                // Some speakers send :: as the link-local part.
                .filter(|ll| !ll.is_unspecified());
            NextHop::V6 { global, link_local }
        }
        other => return Err(format!("next hop length {other} for {family}")),
    };
    let nlri = decode_prefixes(r.rest(), family.afi)?;
    Ok(Some(MpReach {
        family,
        next_hop,
        nlri,
    }))
}

fn decode_mp_unreach(value: &[u8]) -> Result<Option<MpUnreach>, String> {
    let mut r = Reader::new(value);
    let family = decode_family(&mut r)?;
    if !family.is_supported() {
        return Ok(None);
    }
    let withdrawn = decode_prefixes(r.rest(), family.afi)?;
    Ok(Some(MpUnreach { family, withdrawn }))
}

fn next_hop_bytes(hop: &NextHop) -> Vec<u8> {
    match hop {
        NextHop::V4(a) => a.octets().to_vec(),
        NextHop::V6 { global, link_local } => {
            let mut v = global.octets().to_vec();
            if let Some(ll) = link_local {
                v.extend_from_slice(&ll.octets());
            }
            v
        }
    }
}

/// MP_REACH with the extended-length flag always set, so its header size
/// does not depend on how many prefixes follow.
fn put_mp_reach(out: &mut Vec<u8>, family: Family, next_hop: &NextHop, nlri: &[IpNet]) {
    let nh = next_hop_bytes(next_hop);
    let len = 5 + nh.len() + nlri.iter().map(prefix_wire_len).sum::<usize>();
    out.extend_from_slice(&[
        flag::OPTIONAL | flag::EXTENDED_LENGTH,
        attr_type::MP_REACH_NLRI,
    ]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&family.afi.to_be_bytes());
    out.push(family.safi);
    out.push(nh.len() as u8);
    out.extend_from_slice(&nh);
    out.push(0);
    nlri.iter().for_each(|p| encode_prefix(out, p));
}

fn put_mp_unreach(out: &mut Vec<u8>, family: Family, withdrawn: &[IpNet]) {
    let len = 3 + withdrawn.iter().map(prefix_wire_len).sum::<usize>();
    out.extend_from_slice(&[
        flag::OPTIONAL | flag::EXTENDED_LENGTH,
        attr_type::MP_UNREACH_NLRI,
    ]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&family.afi.to_be_bytes());
    out.push(family.safi);
    withdrawn.iter().for_each(|p| encode_prefix(out, p));
}

/// Packs announcements and withdrawals into as few UPDATEs as the
/// session's maximum message size allows.
#[derive(Debug, Clone, Copy)]
pub struct UpdateBuilder {
    codec: Codec,
}

impl UpdateBuilder {
    pub fn new(codec: Codec) -> Self {
        UpdateBuilder { codec }
    }

    /// Appends UPDATEs announcing `prefixes` (all of one family) with
    /// `attrs`, whose `next_hop` must be set. IPv4 prefixes with an IPv4 next
    /// hop use the classic NLRI field; everything else goes in MP_REACH
    /// (IPv4 with an IPv6 next hop is RFC 8950). Returns how many messages
    /// were written.
    pub fn announce(&self, out: &mut Vec<u8>, attrs: &PathAttributes, prefixes: &[IpNet]) -> usize {
        let Some(first) = prefixes.first() else {
            return 0;
        };
        let family = Family::of(first);
        let Some(next_hop) = attrs.next_hop else {
            return 0;
        };
        let classic = family == Family::IPV4_UNICAST && matches!(next_hop, NextHop::V4(_));
        let mut block = Vec::with_capacity(128);
        attrs.encode(&mut block, self.codec.four_octet_as, classic);
        let nh_len = next_hop_bytes(&next_hop).len();
        let overhead = HEADER_LEN + 4 + block.len() + if classic { 0 } else { 4 + 5 + nh_len };
        // Attributes too large for one message with even one prefix: the
        // route cannot be sent at all (RFC 8654 §5); callers check first
        // with `fits`.
        if overhead + 17 > self.codec.max_message_len() {
            return 0;
        }
        let mut messages = 0;
        for chunk in chunks(
            prefixes,
            self.codec.max_message_len().saturating_sub(overhead),
        ) {
            frame(out, MSG_UPDATE, |b| {
                b.extend_from_slice(&[0, 0]);
                let attrs_start = b.len();
                b.extend_from_slice(&[0, 0]);
                if !classic {
                    put_mp_reach(b, family, &next_hop, chunk);
                }
                b.extend_from_slice(&block);
                let attrs_len = (b.len() - attrs_start - 2) as u16;
                b[attrs_start..attrs_start + 2].copy_from_slice(&attrs_len.to_be_bytes());
                if classic {
                    chunk.iter().for_each(|p| encode_prefix(b, p));
                }
            });
            messages += 1;
        }
        messages
    }

    /// Whether a route with `attrs` (next hop set) fits in one UPDATE of
    /// this session with room for a prefix.
    pub fn fits(&self, attrs: &PathAttributes) -> bool {
        let mut block = Vec::with_capacity(256);
        attrs.encode(&mut block, self.codec.four_octet_as, true);
        // Header, lengths, an MP_REACH with a 32-byte next hop, one /128.
        HEADER_LEN + 4 + block.len() + 4 + 5 + 32 + 17 <= self.codec.max_message_len()
    }

    /// Appends UPDATEs withdrawing `prefixes` (all of one family).
    pub fn withdraw(&self, out: &mut Vec<u8>, prefixes: &[IpNet]) -> usize {
        let Some(first) = prefixes.first() else {
            return 0;
        };
        let family = Family::of(first);
        let classic = family == Family::IPV4_UNICAST;
        let overhead = HEADER_LEN + 4 + if classic { 0 } else { 4 + 3 };
        let mut messages = 0;
        for chunk in chunks(
            prefixes,
            self.codec.max_message_len().saturating_sub(overhead),
        ) {
            let update = if classic {
                Update {
                    withdrawn: chunk.to_vec(),
                    ..Update::default()
                }
            } else {
                Update {
                    mp_unreach: Some(MpUnreach {
                        family,
                        withdrawn: chunk.to_vec(),
                    }),
                    ..Update::default()
                }
            };
            frame(out, MSG_UPDATE, |b| update.encode_body(b, &self.codec));
            messages += 1;
        }
        messages
    }

    /// Appends the End-of-RIB marker of `family` (RFC 4724 §2).
    pub fn end_of_rib(&self, out: &mut Vec<u8>, family: Family) {
        let update = if family == Family::IPV4_UNICAST {
            Update::default()
        } else {
            Update {
                mp_unreach: Some(MpUnreach {
                    family,
                    withdrawn: vec![],
                }),
                ..Update::default()
            }
        };
        frame(out, MSG_UPDATE, |b| update.encode_body(b, &self.codec));
    }
}

/// Splits `prefixes` into runs whose encoding fits in `room` bytes.
fn chunks(prefixes: &[IpNet], room: usize) -> impl Iterator<Item = &[IpNet]> {
    let mut rest = prefixes;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut used = 0;
        let mut n = 0;
        for p in rest {
            let len = prefix_wire_len(p);
            if used + len > room && n > 0 {
                break;
            }
            used += len;
            n += 1;
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{
        AsPath, Community, Decoded, LargeCommunity, Message, Origin, decode_message,
    };

    fn net(s: &str) -> IpNet {
        s.parse().expect("prefix")
    }

    const FOUR: Codec = Codec {
        four_octet_as: true,
        extended_message: false,
        ebgp: true,
    };
    const IBGP: Codec = Codec {
        four_octet_as: true,
        extended_message: false,
        ebgp: false,
    };

    fn attrs() -> PathAttributes {
        PathAttributes {
            origin: Origin::Igp,
            as_path: AsPath::sequence([65001]),
            next_hop: Some(NextHop::V4(Ipv4Addr::new(10, 0, 1, 1))),
            med: Some(10),
            communities: vec![Community::new(65000, 100)],
            large_communities: vec![LargeCommunity {
                global: 65000,
                local1: 1,
                local2: 2,
            }],
            ..PathAttributes::default()
        }
    }

    fn decode(bytes: &[u8], codec: &Codec) -> Result<DecodedUpdate, Notification> {
        match decode_message(bytes, codec)? {
            Decoded::Update(u) => Ok(*u),
            other => panic!("not an UPDATE: {other:?}"),
        }
    }

    /// An UPDATE built by hand from its fields: withdrawn, attributes, NLRI.
    fn raw_update(withdrawn: &[u8], attributes: &[u8], nlri: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame(&mut out, MSG_UPDATE, |b| {
            b.extend_from_slice(&(withdrawn.len() as u16).to_be_bytes());
            b.extend_from_slice(withdrawn);
            b.extend_from_slice(&(attributes.len() as u16).to_be_bytes());
            b.extend_from_slice(attributes);
            b.extend_from_slice(nlri);
        });
        out
    }

    const ORIGIN_IGP: &[u8] = &[0x40, 1, 1, 0];
    const AS_PATH_65001: &[u8] = &[0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9];
    const NEXT_HOP_10_0_1_1: &[u8] = &[0x40, 3, 4, 10, 0, 1, 1];
    const NLRI_192_0_2: &[u8] = &[24, 192, 0, 2];

    #[test]
    fn byte_exact_ipv4_update() {
        let a = PathAttributes {
            origin: Origin::Igp,
            as_path: AsPath::sequence([65001]),
            next_hop: Some(NextHop::V4(Ipv4Addr::new(10, 0, 1, 1))),
            ..PathAttributes::default()
        };
        let update = Update {
            attributes: Some(a),
            nlri: vec![net("192.0.2.0/24")],
            ..Update::default()
        };
        let bytes = Message::Update(Box::new(update.clone())).encode(&FOUR);
        let expected = raw_update(
            &[],
            &[ORIGIN_IGP, AS_PATH_65001, NEXT_HOP_10_0_1_1].concat(),
            NLRI_192_0_2,
        );
        assert_eq!(bytes, expected);
        let back = decode(&bytes, &FOUR).expect("valid");
        assert_eq!(back.update, update);
        assert_eq!(back.treat_as_withdraw, None);
    }

    #[test]
    fn ipv6_announcement_and_withdrawal_round_trip_through_mp_attributes() {
        let mut a = attrs();
        a.next_hop = Some(NextHop::V6 {
            global: "fd00:1::1".parse().expect("ip"),
            link_local: Some("fe80::1".parse().expect("ip")),
        });
        let update = Update {
            attributes: Some(a.clone()),
            mp_reach: Some(MpReach {
                family: Family::IPV6_UNICAST,
                next_hop: a.next_hop.expect("set"),
                nlri: vec![net("2001:db8:1::/48"), net("2001:db8:2::/48")],
            }),
            mp_unreach: Some(MpUnreach {
                family: Family::IPV6_UNICAST,
                withdrawn: vec![net("2001:db8:3::/48")],
            }),
            ..Update::default()
        };
        let back = decode(
            &Message::Update(Box::new(update.clone())).encode(&FOUR),
            &FOUR,
        )
        .expect("valid");
        // The NEXT_HOP attribute is not sent for MP-only updates.
        let mut expected = update;
        if let Some(a) = expected.attributes.as_mut() {
            a.next_hop = None;
        }
        assert_eq!(back.update, expected);
    }

    #[test]
    fn end_of_rib_markers() {
        let builder = UpdateBuilder::new(FOUR);
        for family in [Family::IPV4_UNICAST, Family::IPV6_UNICAST] {
            let mut out = Vec::new();
            builder.end_of_rib(&mut out, family);
            assert_eq!(
                decode(&out, &FOUR).expect("valid").end_of_rib(),
                Some(family)
            );
        }
        let mut out = Vec::new();
        builder.end_of_rib(&mut out, Family::IPV4_UNICAST);
        assert_eq!(out.len(), 23, "the IPv4 marker is an empty UPDATE");
    }

    #[test]
    fn missing_mandatory_attributes_treat_as_withdraw() {
        let bytes = raw_update(&[], &[ORIGIN_IGP, NEXT_HOP_10_0_1_1].concat(), NLRI_192_0_2);
        let d = decode(&bytes, &FOUR).expect("not a session reset");
        assert!(
            d.treat_as_withdraw
                .as_deref()
                .is_some_and(|w| w.contains("AS_PATH")),
            "{d:?}"
        );
        assert_eq!(
            d.withdrawn().collect::<Vec<_>>(),
            vec![&net("192.0.2.0/24")]
        );
    }

    #[test]
    fn rfc_7606_actions_per_attribute() {
        let base = [ORIGIN_IGP, AS_PATH_65001, NEXT_HOP_10_0_1_1].concat();
        let with = |extra: &[u8]| raw_update(&[], &[&base[..], extra].concat(), NLRI_192_0_2);
        // Treat-as-withdraw: bad ORIGIN value, MED of 3 bytes, communities of 5 bytes.
        for (what, attr) in [
            ("MED length", &[0x80, 4, 3, 0, 0, 1][..]),
            ("communities length", &[0xc0, 8, 5, 0, 0, 0, 1, 2][..]),
            ("large communities length", &[0xc0, 32, 4, 0, 0, 0, 1][..]),
            ("well-known flags on MED", &[0x40, 4, 4, 0, 0, 0, 1][..]),
        ] {
            let d = decode(&with(attr), &FOUR).expect(what);
            assert!(d.treat_as_withdraw.is_some(), "{what}: {d:?}");
        }
        let bad_origin = raw_update(
            &[],
            &[&[0x40, 1, 1, 7][..], AS_PATH_65001, NEXT_HOP_10_0_1_1].concat(),
            NLRI_192_0_2,
        );
        assert!(
            decode(&bad_origin, &FOUR)
                .expect("origin 7")
                .treat_as_withdraw
                .is_some()
        );
        // Attribute-discard: ATOMIC_AGGREGATE with a value, short AGGREGATOR.
        for (what, attr) in [
            ("atomic aggregate length", &[0x40, 6, 1, 0][..]),
            ("aggregator length", &[0xc0, 7, 4, 0, 0, 0, 1][..]),
        ] {
            let d = decode(&with(attr), &FOUR).expect(what);
            assert_eq!(d.treat_as_withdraw, None, "{what}");
            assert_eq!(d.discarded.len(), 1, "{what}: {d:?}");
        }
        // LOCAL_PREF from eBGP is ignored, from iBGP kept.
        let lp = with(&[0x40, 5, 4, 0, 0, 0, 200]);
        let ebgp = decode(&lp, &FOUR).expect("ebgp");
        assert_eq!(
            ebgp.update.attributes.as_ref().and_then(|a| a.local_pref),
            None
        );
        let ibgp = decode(&lp, &IBGP).expect("ibgp");
        assert_eq!(
            ibgp.update.attributes.as_ref().and_then(|a| a.local_pref),
            Some(200)
        );
        // Duplicates other than MP are ignored after the first.
        let dup = decode(&with(ORIGIN_IGP), &FOUR).expect("duplicate origin");
        assert_eq!(dup.treat_as_withdraw, None);
        assert_eq!(dup.discarded.len(), 1);
    }

    #[test]
    fn session_reset_cases() {
        let base = [ORIGIN_IGP, AS_PATH_65001, NEXT_HOP_10_0_1_1].concat();
        // Unrecognised well-known attribute.
        let err = decode(
            &raw_update(&[], &[&base[..], &[0x40, 99, 0]].concat(), NLRI_192_0_2),
            &FOUR,
        )
        .expect_err("type 99 well-known");
        assert_eq!((err.code, err.subcode, err.data), (3, 2, vec![0x40, 99, 0]));
        // NLRI prefix longer than 32.
        let err = decode(&raw_update(&[], &base, &[33, 1, 2, 3, 4, 5]), &FOUR).expect_err("/33");
        assert_eq!((err.code, err.subcode), (3, 10));
        // Malformed MP_REACH (next hop length 5).
        let mp = [0x80, 14, 10, 0, 2, 1, 5, 1, 2, 3, 4, 5, 0];
        let err = decode(&raw_update(&[], &mp, &[]), &FOUR).expect_err("mp next hop 5");
        assert_eq!((err.code, err.subcode), (3, 9));
        // Withdrawn length past the end.
        let mut bytes = raw_update(&[], &base, NLRI_192_0_2);
        bytes[19] = 0xff;
        let err = decode(&bytes, &FOUR).expect_err("withdrawn length");
        assert_eq!((err.code, err.subcode), (3, 1));
    }

    #[test]
    fn unknown_optional_transitive_is_kept_and_passed_on_partial() {
        let base = [ORIGIN_IGP, AS_PATH_65001, NEXT_HOP_10_0_1_1].concat();
        let d = decode(
            &raw_update(
                &[],
                &[&base[..], &[0xc0, 200, 2, 7, 7], &[0x80, 201, 1, 9]].concat(),
                NLRI_192_0_2,
            ),
            &FOUR,
        )
        .expect("valid");
        let a = d.update.attributes.clone().expect("attributes");
        assert_eq!(
            a.unknown,
            vec![super::super::RawAttribute {
                flags: 0xc0,
                code: 200,
                value: vec![7, 7]
            }]
        );
        let mut out = Vec::new();
        a.encode(&mut out, true, true);
        assert!(
            out.windows(5).any(|w| w == [0xe0, 200, 2, 7, 7]),
            "partial bit set on re-send: {out:?}"
        );
    }

    #[test]
    fn two_octet_session_rebuilds_four_octet_paths() {
        let mut a = attrs();
        a.as_path = AsPath::sequence([4_200_000_001, 65001]);
        a.aggregator = Some(crate::wire::Aggregator {
            asn: 4_200_000_001,
            address: Ipv4Addr::new(10, 0, 0, 9),
        });
        let two = Codec {
            four_octet_as: false,
            ..FOUR
        };
        let update = Update {
            attributes: Some(a.clone()),
            nlri: vec![net("192.0.2.0/24")],
            ..Update::default()
        };
        let bytes = Message::Update(Box::new(update)).encode(&two);
        let back = decode(&bytes, &two).expect("valid");
        let got = back.update.attributes.expect("attributes");
        assert_eq!(got.as_path, a.as_path);
        assert_eq!(got.aggregator, a.aggregator);
        // Seen by a 4-octet speaker reading it raw, AS_TRANS stands in.
        let as2 = AsPath::decode(&[2, 2, 0x5b, 0xa0, 0xfd, 0xe9], false).expect("valid");
        assert_eq!(as2, AsPath::sequence([23456, 65001]));
    }

    #[test]
    fn builder_packs_many_prefixes_per_message_and_splits_at_the_limit() {
        let prefixes: Vec<IpNet> = (0..3000u32)
            .map(|i| {
                IpNet::V4(
                    ipnet::Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 | (i << 8)), 24).expect("net"),
                )
            })
            .collect();
        let builder = UpdateBuilder::new(FOUR);
        let mut out = Vec::new();
        let n = builder.announce(&mut out, &attrs(), &prefixes);
        assert!(
            (3..=4).contains(&n),
            "3000 × 4 bytes need 3–4 messages of 4096, got {n}"
        );
        let mut seen = Vec::new();
        let mut rest = &out[..];
        while let Some((_, len)) = crate::wire::next_frame(rest, &FOUR).expect("valid frame") {
            assert!(len <= 4096);
            let d = decode(&rest[..len], &FOUR).expect("valid update");
            assert_eq!(d.update.attributes.as_ref(), Some(&attrs()));
            seen.extend(d.update.nlri);
            rest = &rest[len..];
        }
        assert_eq!(seen, prefixes);

        let mut out = Vec::new();
        let v6: Vec<IpNet> = (0..2000u32)
            .map(|i| net(&format!("2001:db8:{:x}::/48", i)))
            .collect();
        let mut a6 = attrs();
        a6.next_hop = Some(NextHop::V6 {
            global: "fd00::1".parse().expect("ip"),
            link_local: None,
        });
        let n6 = builder.announce(&mut out, &a6, &v6);
        let w6 = builder.withdraw(&mut out, &v6);
        assert!(n6 > 1 && w6 > 1);
        let mut announced = Vec::new();
        let mut withdrawn = Vec::new();
        let mut rest = &out[..];
        while let Some((_, len)) = crate::wire::next_frame(rest, &FOUR).expect("valid frame") {
            let d = decode(&rest[..len], &FOUR).expect("valid update");
            if let Some(r) = &d.update.mp_reach {
                announced.extend(r.nlri.iter().copied());
            }
            withdrawn.extend(d.withdrawn().copied());
            rest = &rest[len..];
        }
        assert_eq!(announced, v6);
        assert_eq!(withdrawn, v6);
    }

    #[test]
    fn ipv4_routes_with_an_ipv6_next_hop_use_mp_reach() {
        let mut a = attrs();
        a.next_hop = Some(NextHop::V6 {
            global: "fd00::1".parse().expect("ip"),
            link_local: None,
        });
        let mut out = Vec::new();
        UpdateBuilder::new(FOUR).announce(&mut out, &a, &[net("192.0.2.0/24")]);
        let d = decode(&out, &FOUR).expect("valid");
        let reach = d.update.mp_reach.expect("MP_REACH");
        assert_eq!(reach.family, Family::IPV4_UNICAST);
        assert_eq!(reach.nlri, vec![net("192.0.2.0/24")]);
        assert_eq!(reach.next_hop, a.next_hop.expect("set"));
        assert!(d.update.nlri.is_empty());
    }
}
