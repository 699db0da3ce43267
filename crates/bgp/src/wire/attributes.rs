//! Path attributes (RFC 4271 §5, 1997, 4360, 4456, 6793, 8092): their
//! values, their encoding, and the RFC 7606 action for each one's errors.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::Reader;

/// The 2-octet stand-in for a 4-octet ASN (RFC 6793).
pub const AS_TRANS: u32 = 23456;

/// Attribute type codes.
pub mod attr_type {
    pub const ORIGIN: u8 = 1;
    pub const AS_PATH: u8 = 2;
    pub const NEXT_HOP: u8 = 3;
    pub const MED: u8 = 4;
    pub const LOCAL_PREF: u8 = 5;
    pub const ATOMIC_AGGREGATE: u8 = 6;
    pub const AGGREGATOR: u8 = 7;
    pub const COMMUNITIES: u8 = 8;
    pub const ORIGINATOR_ID: u8 = 9;
    pub const CLUSTER_LIST: u8 = 10;
    pub const MP_REACH_NLRI: u8 = 14;
    pub const MP_UNREACH_NLRI: u8 = 15;
    pub const EXTENDED_COMMUNITIES: u8 = 16;
    pub const AS4_PATH: u8 = 17;
    pub const AS4_AGGREGATOR: u8 = 18;
    pub const LARGE_COMMUNITIES: u8 = 32;
}

/// Attribute flag bits.
pub(crate) mod flag {
    pub const OPTIONAL: u8 = 0x80;
    pub const TRANSITIVE: u8 = 0x40;
    pub const PARTIAL: u8 = 0x20;
    pub const EXTENDED_LENGTH: u8 = 0x10;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Origin {
    #[default]
    Igp,
    Egp,
    Incomplete,
}

impl Origin {
    pub fn code(self) -> u8 {
        match self {
            Origin::Igp => 0,
            Origin::Egp => 1,
            Origin::Incomplete => 2,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Igp => "IGP",
            Origin::Egp => "EGP",
            Origin::Incomplete => "incomplete",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SegmentKind {
    Set,
    Sequence,
    ConfedSequence,
    ConfedSet,
}

impl SegmentKind {
    fn code(self) -> u8 {
        match self {
            SegmentKind::Set => 1,
            SegmentKind::Sequence => 2,
            SegmentKind::ConfedSequence => 3,
            SegmentKind::ConfedSet => 4,
        }
    }
    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => SegmentKind::Set,
            2 => SegmentKind::Sequence,
            3 => SegmentKind::ConfedSequence,
            4 => SegmentKind::ConfedSet,
            _ => return None,
        })
    }
    fn is_confed(self) -> bool {
        matches!(self, SegmentKind::ConfedSequence | SegmentKind::ConfedSet)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AsSegment {
    pub kind: SegmentKind,
    pub asns: Vec<u32>,
}

/// AS_PATH as 4-octet ASNs, whatever the session's encoding.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct AsPath {
    pub segments: Vec<AsSegment>,
}

impl AsPath {
    /// A path of one AS_SEQUENCE.
    pub fn sequence(asns: impl IntoIterator<Item = u32>) -> Self {
        let asns: Vec<u32> = asns.into_iter().collect();
        if asns.is_empty() {
            return AsPath::default();
        }
        AsPath {
            segments: vec![AsSegment {
                kind: SegmentKind::Sequence,
                asns,
            }],
        }
    }

    /// Path length for best-path selection (RFC 4271 §9.1.2.2): an AS_SET
    /// counts 1, confederation segments count 0.
    pub fn hop_count(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s.kind {
                SegmentKind::Sequence => s.asns.len(),
                SegmentKind::Set => 1,
                _ => 0,
            })
            .sum()
    }

    /// Every ASN in order, sets and confederation segments included.
    pub fn asns(&self) -> impl Iterator<Item = u32> + '_ {
        self.segments.iter().flat_map(|s| s.asns.iter().copied())
    }

    pub fn contains(&self, asn: u32) -> bool {
        self.asns().any(|a| a == asn)
    }

    /// The neighbouring AS: the first of the first AS_SEQUENCE (confed
    /// segments skipped), for MED comparison.
    pub fn first_as(&self) -> Option<u32> {
        self.segments
            .iter()
            .find(|s| !s.kind.is_confed())
            .filter(|s| s.kind == SegmentKind::Sequence)
            .and_then(|s| s.asns.first().copied())
    }

    /// The originating AS: the last ASN of a final AS_SEQUENCE.
    pub fn origin_as(&self) -> Option<u32> {
        self.segments
            .last()
            .filter(|s| s.kind == SegmentKind::Sequence)
            .and_then(|s| s.asns.last().copied())
    }

    /// Prepends `asn` `times` times (RFC 4271 §5.1.2 for eBGP export).
    pub fn prepend(&mut self, asn: u32, times: usize) {
        if times == 0 {
            return;
        }
        match self.segments.first_mut() {
            Some(first) if first.kind == SegmentKind::Sequence => {
                first.asns.splice(0..0, std::iter::repeat_n(asn, times));
            }
            _ => self.segments.insert(
                0,
                AsSegment {
                    kind: SegmentKind::Sequence,
                    asns: vec![asn; times],
                },
            ),
        }
    }

    pub fn has_confed(&self) -> bool {
        self.segments.iter().any(|s| s.kind.is_confed())
    }

    /// Removes confederation segments (when leaving the confederation).
    pub fn without_confed(&self) -> AsPath {
        AsPath {
            segments: self
                .segments
                .iter()
                .filter(|s| !s.kind.is_confed())
                .cloned()
                .collect(),
        }
    }

    /// Whether any ASN needs 4 octets.
    fn needs_four_octets(&self) -> bool {
        self.asns().any(|a| a > 0xffff)
    }

    /// Encodes with 2- or 4-octet ASNs, splitting segments over 255 ASNs.
    /// With 2 octets, ASNs above 65535 become AS_TRANS.
    pub(crate) fn encode(&self, out: &mut Vec<u8>, four_octets: bool) {
        for segment in &self.segments {
            for chunk in segment.asns.chunks(255) {
                out.push(segment.kind.code());
                out.push(chunk.len() as u8);
                for asn in chunk {
                    if four_octets {
                        out.extend_from_slice(&asn.to_be_bytes());
                    } else {
                        out.extend_from_slice(
                            &(u16::try_from(*asn).unwrap_or(AS_TRANS as u16)).to_be_bytes(),
                        );
                    }
                }
            }
        }
    }

    /// Decodes segments of 2- or 4-octet ASNs. A zero-length segment, an
    /// unknown segment type or a length that does not fit is malformed.
    pub(crate) fn decode(bytes: &[u8], four_octets: bool) -> Result<AsPath, String> {
        let width = if four_octets { 4 } else { 2 };
        let mut r = Reader::new(bytes);
        let mut segments = Vec::new();
        while !r.is_empty() {
            let (Some(kind), Some(count)) = (r.u8(), r.u8()) else {
                return Err("AS_PATH segment header cut short".into());
            };
            let kind =
                SegmentKind::from_code(kind).ok_or(format!("AS_PATH segment type {kind}"))?;
            if count == 0 {
                return Err("empty AS_PATH segment".into());
            }
            let data = r
                .take(count as usize * width)
                .ok_or_else(|| format!("AS_PATH segment of {count} ASNs cut short"))?;
            let asns = data
                .chunks_exact(width)
                .map(|c| {
                    if four_octets {
                        u32::from_be_bytes([c[0], c[1], c[2], c[3]])
                    } else {
                        u16::from_be_bytes([c[0], c[1]]) as u32
                    }
                })
                .collect();
            segments.push(AsSegment { kind, asns });
        }
        Ok(AsPath { segments })
    }

    /// RFC 6793 §4.2.3: rebuilds the real path from a 2-octet AS_PATH and
    /// an AS4_PATH. When AS4_PATH is longer, it is ignored.
    pub(crate) fn merge_as4(&self, as4: &AsPath) -> AsPath {
        let (total, extra) = (self.hop_count(), as4.hop_count());
        if total < extra {
            return self.clone();
        }
        let mut keep = total - extra;
        let mut segments = Vec::new();
        for segment in &self.segments {
            match segment.kind {
                SegmentKind::ConfedSequence | SegmentKind::ConfedSet => {
                    segments.push(segment.clone())
                }
                SegmentKind::Set if keep > 0 => {
                    keep -= 1;
                    segments.push(segment.clone());
                }
                SegmentKind::Sequence if keep > 0 => {
                    let n = keep.min(segment.asns.len());
                    keep -= n;
                    segments.push(AsSegment {
                        kind: SegmentKind::Sequence,
                        asns: segment.asns[..n].to_vec(),
                    });
                }
                _ => {}
            }
        }
        segments.extend(as4.segments.iter().cloned());
        AsPath { segments }
    }
}

impl fmt::Display for AsPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for segment in &self.segments {
            if !first {
                f.write_str(" ")?;
            }
            first = false;
            let list = segment.asns.iter().map(u32::to_string).collect::<Vec<_>>();
            match segment.kind {
                SegmentKind::Sequence => f.write_str(&list.join(" "))?,
                SegmentKind::Set => write!(f, "{{{}}}", list.join(","))?,
                SegmentKind::ConfedSequence => write!(f, "({})", list.join(" "))?,
                SegmentKind::ConfedSet => write!(f, "[{}]", list.join(","))?,
            }
        }
        Ok(())
    }
}

/// Next hop of a route: the NEXT_HOP attribute or MP_REACH_NLRI's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NextHop {
    V4(Ipv4Addr),
    /// RFC 2545: a global address, and a link-local one when the peer
    /// shares a link with us.
    V6 {
        global: Ipv6Addr,
        link_local: Option<Ipv6Addr>,
    },
}

impl fmt::Display for NextHop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NextHop::V4(a) => write!(f, "{a}"),
            NextHop::V6 {
                global,
                link_local: None,
            } => write!(f, "{global}"),
            NextHop::V6 {
                global,
                link_local: Some(ll),
            } => write!(f, "{global} {ll}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Aggregator {
    pub asn: u32,
    pub address: Ipv4Addr,
}

/// A standard community (RFC 1997).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Community(pub u32);

impl Community {
    pub const NO_EXPORT: Community = Community(0xffff_ff01);
    pub const NO_ADVERTISE: Community = Community(0xffff_ff02);
    pub const NO_EXPORT_SUBCONFED: Community = Community(0xffff_ff03);

    pub fn new(asn: u16, value: u16) -> Self {
        Community(((asn as u32) << 16) | value as u32)
    }
}

impl fmt::Display for Community {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.0 >> 16, self.0 & 0xffff)
    }
}

/// A large community (RFC 8092).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LargeCommunity {
    pub global: u32,
    pub local1: u32,
    pub local2: u32,
}

impl fmt::Display for LargeCommunity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.global, self.local1, self.local2)
    }
}

/// An attribute we do not interpret, kept to pass on (optional transitive).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RawAttribute {
    pub flags: u8,
    pub code: u8,
    pub value: Vec<u8>,
}

/// The attributes of a path, as 4-octet values whatever the session
/// speaks. MP_REACH/MP_UNREACH are not here: they travel in the UPDATE.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PathAttributes {
    pub origin: Origin,
    pub as_path: AsPath,
    /// The NEXT_HOP attribute, or (in the RIB) the MP_REACH next hop.
    pub next_hop: Option<NextHop>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub atomic_aggregate: bool,
    pub aggregator: Option<Aggregator>,
    pub communities: Vec<Community>,
    pub extended_communities: Vec<u64>,
    pub large_communities: Vec<LargeCommunity>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
    /// Unrecognised optional transitive attributes, passed on with Partial.
    pub unknown: Vec<RawAttribute>,
}

/// What RFC 7606 says to do with a malformed attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// Drop this attribute, keep the route (log it).
    Discard(String),
    /// Keep nothing of the UPDATE's announcements; withdraw its prefixes.
    TreatAsWithdraw(String),
}

/// How an attribute's errors are handled, and which flags it must carry.
fn policy(code: u8) -> Option<(u8, bool)> {
    use attr_type::*;
    const WELL_KNOWN: u8 = flag::TRANSITIVE;
    const OPTIONAL: u8 = flag::OPTIONAL;
    const OPTIONAL_TRANSITIVE: u8 = flag::OPTIONAL | flag::TRANSITIVE;
    // (expected optional+transitive bits, malformed => discard?)
    Some(match code {
        ORIGIN | AS_PATH | NEXT_HOP | LOCAL_PREF => (WELL_KNOWN, false),
        ATOMIC_AGGREGATE => (WELL_KNOWN, true),
        MED | ORIGINATOR_ID | CLUSTER_LIST => (OPTIONAL, false),
        COMMUNITIES | EXTENDED_COMMUNITIES | LARGE_COMMUNITIES => (OPTIONAL_TRANSITIVE, false),
        AGGREGATOR | AS4_PATH | AS4_AGGREGATOR => (OPTIONAL_TRANSITIVE, true),
        _ => return None,
    })
}

/// Accumulates decoded attributes of one UPDATE.
#[derive(Debug)]
pub(crate) struct AttributeDecoder {
    pub attrs: PathAttributes,
    pub seen: [bool; 256],
    pub as4_path: Option<AsPath>,
    pub as4_aggregator: Option<Aggregator>,
    pub withdraw: Option<String>,
    pub discarded: Vec<String>,
}

impl AttributeDecoder {
    pub(crate) fn new() -> Self {
        AttributeDecoder {
            attrs: PathAttributes::default(),
            seen: [false; 256],
            as4_path: None,
            as4_aggregator: None,
            withdraw: None,
            discarded: Vec::new(),
        }
    }

    fn fail(&mut self, m: Malformed) {
        match m {
            Malformed::Discard(why) => self.discarded.push(why),
            Malformed::TreatAsWithdraw(why) => {
                if self.withdraw.is_none() {
                    self.withdraw = Some(why);
                }
            }
        }
    }

    /// Decodes one known, non-MP attribute into the set. Returns `false`
    /// when the code is not one we interpret here.
    pub(crate) fn add(
        &mut self,
        flags: u8,
        code: u8,
        value: &[u8],
        four_octets: bool,
        ebgp: bool,
    ) -> bool {
        let Some((expected, discard_on_error)) = policy(code) else {
            return false;
        };
        let name = attr_name(code);
        let malformed = |why: String| {
            if discard_on_error {
                Malformed::Discard(format!("{name}: {why}; attribute discarded"))
            } else {
                Malformed::TreatAsWithdraw(format!("{name}: {why}"))
            }
        };
        if flags & (flag::OPTIONAL | flag::TRANSITIVE) != expected {
            self.fail(malformed(format!(
                "flags {flags:#04x} conflict with the attribute's type"
            )));
            return true;
        }
        let len = value.len();
        let wrong_length = |want: &str| malformed(format!("length {len}, expected {want}"));
        use attr_type::*;
        let a = &mut self.attrs;
        let result: Result<(), Malformed> = match code {
            ORIGIN => match value {
                [v @ 0..=2] => {
                    a.origin = [Origin::Igp, Origin::Egp, Origin::Incomplete][*v as usize];
                    Ok(())
                }
                [v] => Err(malformed(format!("undefined value {v}"))),
                _ => Err(wrong_length("1")),
            },
            AS_PATH => match AsPath::decode(value, four_octets) {
                Ok(path) if ebgp && path.has_confed() => Err(malformed(
                    "confederation segment from an external neighbour".into(),
                )),
                Ok(path) => {
                    a.as_path = path;
                    Ok(())
                }
                Err(why) => Err(malformed(why)),
            },
            NEXT_HOP => match <[u8; 4]>::try_from(value) {
                Ok(octets) => {
                    let hop = Ipv4Addr::from(octets);
                    if hop.is_unspecified()
                        || hop.is_multicast()
                        || hop.is_broadcast()
                        || octets[0] >= 240
                    {
                        Err(malformed(format!("{hop} cannot be a next hop")))
                    } else {
                        a.next_hop = Some(NextHop::V4(hop));
                        Ok(())
                    }
                }
                Err(_) => Err(wrong_length("4")),
            },
            MED => be_u32(value)
                .map(|v| a.med = Some(v))
                .ok_or_else(|| wrong_length("4")),
            LOCAL_PREF if ebgp => Err(Malformed::Discard(
                "LOCAL_PREF from an external neighbour ignored".into(),
            )),
            LOCAL_PREF => be_u32(value)
                .map(|v| a.local_pref = Some(v))
                .ok_or_else(|| wrong_length("4")),
            ATOMIC_AGGREGATE if len == 0 => {
                a.atomic_aggregate = true;
                Ok(())
            }
            ATOMIC_AGGREGATE => Err(wrong_length("0")),
            AGGREGATOR => {
                let want = if four_octets { 8 } else { 6 };
                if len != want {
                    Err(wrong_length(&want.to_string()))
                } else {
                    let asn = if four_octets {
                        be_u32(&value[..4]).unwrap_or(0)
                    } else {
                        u16::from_be_bytes([value[0], value[1]]) as u32
                    };
                    let address = Ipv4Addr::from(be_u32(&value[len - 4..]).unwrap_or(0));
                    a.aggregator = Some(Aggregator { asn, address });
                    Ok(())
                }
            }
            AS4_AGGREGATOR if four_octets => Err(Malformed::Discard(
                "AS4_AGGREGATOR on a 4-octet session ignored".into(),
            )),
            AS4_AGGREGATOR => match (
                be_u32(value.get(..4).unwrap_or_default()),
                be_u32(value.get(4..).unwrap_or_default()),
            ) {
                (Some(asn), Some(addr)) if len == 8 => {
                    self.as4_aggregator = Some(Aggregator {
                        asn,
                        address: Ipv4Addr::from(addr),
                    });
                    Ok(())
                }
                _ => Err(wrong_length("8")),
            },
            AS4_PATH if four_octets => Err(Malformed::Discard(
                "AS4_PATH on a 4-octet session ignored".into(),
            )),
            AS4_PATH => match AsPath::decode(value, true) {
                Ok(path) if path.has_confed() => Err(malformed("confederation segment".into())),
                Ok(path) => {
                    self.as4_path = Some(path);
                    Ok(())
                }
                Err(why) => Err(malformed(why)),
            },
            COMMUNITIES if len == 0 || len % 4 != 0 => {
                Err(wrong_length("a non-zero multiple of 4"))
            }
            COMMUNITIES => {
                a.communities = value
                    .chunks_exact(4)
                    .filter_map(be_u32)
                    .map(Community)
                    .collect();
                Ok(())
            }
            EXTENDED_COMMUNITIES if len == 0 || len % 8 != 0 => {
                Err(wrong_length("a non-zero multiple of 8"))
            }
            EXTENDED_COMMUNITIES => {
                a.extended_communities = value
                    .chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().unwrap_or_default()))
                    .collect();
                Ok(())
            }
            LARGE_COMMUNITIES if len == 0 || len % 12 != 0 => {
                Err(wrong_length("a non-zero multiple of 12"))
            }
            LARGE_COMMUNITIES => {
                let mut list: Vec<LargeCommunity> = value
                    .chunks_exact(12)
                    .map(|c| LargeCommunity {
                        global: be_u32(&c[0..4]).unwrap_or(0),
                        local1: be_u32(&c[4..8]).unwrap_or(0),
                        local2: be_u32(&c[8..12]).unwrap_or(0),
                    })
                    .collect();
                // RFC 8092 §5: duplicates MAY be removed.
                let mut seen = std::collections::HashSet::new();
                list.retain(|c| seen.insert(*c));
                a.large_communities = list;
                Ok(())
            }
            ORIGINATOR_ID | CLUSTER_LIST if ebgp => Err(Malformed::Discard(format!(
                "{name} from an external neighbour ignored"
            ))),
            ORIGINATOR_ID => be_u32(value)
                .map(|v| a.originator_id = Some(Ipv4Addr::from(v)))
                .ok_or_else(|| wrong_length("4")),
            CLUSTER_LIST if len == 0 || len % 4 != 0 => {
                Err(wrong_length("a non-zero multiple of 4"))
            }
            CLUSTER_LIST => {
                a.cluster_list = value
                    .chunks_exact(4)
                    .filter_map(be_u32)
                    .map(Ipv4Addr::from)
                    .collect();
                Ok(())
            }
            _ => return false,
        };
        if let Err(m) = result {
            self.fail(m);
        }
        true
    }

    /// RFC 6793 §4.2.3 on a 2-octet session: use AS4_PATH and
    /// AS4_AGGREGATOR to rebuild the real values.
    pub(crate) fn reconcile_as4(&mut self) {
        let (as4_path, as4_aggregator) = (self.as4_path.take(), self.as4_aggregator.take());
        if let Some(agg) = self.attrs.aggregator {
            if agg.asn != AS_TRANS {
                // A 2-octet speaker aggregated after the path left 4-octet
                // land: AS4_PATH and AS4_AGGREGATOR are stale.
                return;
            }
            if let Some(real) = as4_aggregator {
                self.attrs.aggregator = Some(real);
            }
        }
        if let Some(as4) = as4_path {
            self.attrs.as_path = self.attrs.as_path.merge_as4(&as4);
        }
    }
}

fn be_u32(bytes: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(bytes).ok().map(u32::from_be_bytes)
}

pub(crate) fn attr_name(code: u8) -> String {
    use attr_type::*;
    match code {
        ORIGIN => "ORIGIN".into(),
        AS_PATH => "AS_PATH".into(),
        NEXT_HOP => "NEXT_HOP".into(),
        MED => "MULTI_EXIT_DISC".into(),
        LOCAL_PREF => "LOCAL_PREF".into(),
        ATOMIC_AGGREGATE => "ATOMIC_AGGREGATE".into(),
        AGGREGATOR => "AGGREGATOR".into(),
        COMMUNITIES => "COMMUNITIES".into(),
        ORIGINATOR_ID => "ORIGINATOR_ID".into(),
        CLUSTER_LIST => "CLUSTER_LIST".into(),
        MP_REACH_NLRI => "MP_REACH_NLRI".into(),
        MP_UNREACH_NLRI => "MP_UNREACH_NLRI".into(),
        EXTENDED_COMMUNITIES => "EXTENDED_COMMUNITIES".into(),
        AS4_PATH => "AS4_PATH".into(),
        AS4_AGGREGATOR => "AS4_AGGREGATOR".into(),
        LARGE_COMMUNITIES => "LARGE_COMMUNITY".into(),
        other => format!("attribute {other}"),
    }
}

/// Appends one attribute with the extended-length flag when needed.
pub(crate) fn put_attribute(out: &mut Vec<u8>, flags: u8, code: u8, value: &[u8]) {
    if value.len() > 255 {
        out.push(flags | flag::EXTENDED_LENGTH);
        out.push(code);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    } else {
        out.push(flags & !flag::EXTENDED_LENGTH);
        out.push(code);
        out.push(value.len() as u8);
    }
    out.extend_from_slice(value);
}

impl PathAttributes {
    /// Encodes every attribute but MP_REACH/MP_UNREACH, in type order. The
    /// NEXT_HOP attribute is written only when `ipv4_next_hop` (the UPDATE
    /// carries IPv4 NLRI outside MP_REACH) and the next hop is IPv4.
    pub(crate) fn encode(&self, out: &mut Vec<u8>, four_octets: bool, ipv4_next_hop: bool) {
        use attr_type::*;
        const WK: u8 = flag::TRANSITIVE;
        const OPT: u8 = flag::OPTIONAL;
        const OPT_T: u8 = flag::OPTIONAL | flag::TRANSITIVE;
        let mut value = Vec::with_capacity(64);
        put_attribute(out, WK, ORIGIN, &[self.origin.code()]);
        self.as_path.encode(&mut value, four_octets);
        put_attribute(out, WK, AS_PATH, &value);
        if ipv4_next_hop && let Some(NextHop::V4(hop)) = self.next_hop {
            put_attribute(out, WK, NEXT_HOP, &hop.octets());
        }
        if let Some(med) = self.med {
            put_attribute(out, OPT, MED, &med.to_be_bytes());
        }
        if let Some(pref) = self.local_pref {
            put_attribute(out, WK, LOCAL_PREF, &pref.to_be_bytes());
        }
        if self.atomic_aggregate {
            put_attribute(out, WK, ATOMIC_AGGREGATE, &[]);
        }
        if let Some(agg) = self.aggregator {
            value.clear();
            if four_octets {
                value.extend_from_slice(&agg.asn.to_be_bytes());
            } else {
                value.extend_from_slice(
                    &(u16::try_from(agg.asn).unwrap_or(AS_TRANS as u16)).to_be_bytes(),
                );
            }
            value.extend_from_slice(&agg.address.octets());
            put_attribute(out, OPT_T, AGGREGATOR, &value);
        }
        if !self.communities.is_empty() {
            value.clear();
            self.communities
                .iter()
                .for_each(|c| value.extend_from_slice(&c.0.to_be_bytes()));
            put_attribute(out, OPT_T, COMMUNITIES, &value);
        }
        if let Some(id) = self.originator_id {
            put_attribute(out, OPT, ORIGINATOR_ID, &id.octets());
        }
        if !self.cluster_list.is_empty() {
            value.clear();
            self.cluster_list
                .iter()
                .for_each(|c| value.extend_from_slice(&c.octets()));
            put_attribute(out, OPT, CLUSTER_LIST, &value);
        }
        if !self.extended_communities.is_empty() {
            value.clear();
            self.extended_communities
                .iter()
                .for_each(|c| value.extend_from_slice(&c.to_be_bytes()));
            put_attribute(out, OPT_T, EXTENDED_COMMUNITIES, &value);
        }
        if !four_octets {
            // RFC 6793 §4.2.2: tell 2-octet speakers the real values.
            if self.as_path.needs_four_octets() {
                value.clear();
                self.as_path.without_confed().encode(&mut value, true);
                put_attribute(out, OPT_T, AS4_PATH, &value);
            }
            if let Some(agg) = self.aggregator.filter(|a| a.asn > 0xffff) {
                value.clear();
                value.extend_from_slice(&agg.asn.to_be_bytes());
                value.extend_from_slice(&agg.address.octets());
                put_attribute(out, OPT_T, AS4_AGGREGATOR, &value);
            }
        }
        if !self.large_communities.is_empty() {
            value.clear();
            for c in &self.large_communities {
                value.extend_from_slice(&c.global.to_be_bytes());
                value.extend_from_slice(&c.local1.to_be_bytes());
                value.extend_from_slice(&c.local2.to_be_bytes());
            }
            put_attribute(out, OPT_T, LARGE_COMMUNITIES, &value);
        }
        for raw in &self.unknown {
            // Passed on by us without being understood: set Partial.
            put_attribute(out, raw.flags | flag::PARTIAL, raw.code, &raw.value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_count_follows_rfc_4271() {
        let path = AsPath {
            segments: vec![
                AsSegment {
                    kind: SegmentKind::ConfedSequence,
                    asns: vec![64512, 64513],
                },
                AsSegment {
                    kind: SegmentKind::Sequence,
                    asns: vec![65002, 65001],
                },
                AsSegment {
                    kind: SegmentKind::Set,
                    asns: vec![65010, 65011, 65012],
                },
            ],
        };
        assert_eq!(path.hop_count(), 3);
        assert_eq!(path.first_as(), Some(65002));
        assert_eq!(
            path.origin_as(),
            None,
            "a final AS_SET has no single origin"
        );
        assert_eq!(
            path.to_string(),
            "(64512 64513) 65002 65001 {65010,65011,65012}"
        );
    }

    #[test]
    fn prepend_extends_the_first_sequence() {
        let mut path = AsPath::sequence([65001]);
        path.prepend(65000, 3);
        assert_eq!(path, AsPath::sequence([65000, 65000, 65000, 65001]));
        let mut empty = AsPath::default();
        empty.prepend(65000, 1);
        assert_eq!(empty, AsPath::sequence([65000]));
    }

    #[test]
    fn long_sequences_are_split_into_255_asn_segments() {
        let path = AsPath::sequence(1..=300);
        let mut out = Vec::new();
        path.encode(&mut out, true);
        assert_eq!(out.len(), 2 + 255 * 4 + 2 + 45 * 4);
        let back = AsPath::decode(&out, true).expect("valid");
        assert_eq!(
            back.asns().collect::<Vec<_>>(),
            (1..=300).collect::<Vec<_>>()
        );
        assert_eq!(back.hop_count(), 300);
    }

    #[test]
    fn as4_path_merge_keeps_leading_two_octet_hops() {
        // A 2-octet speaker (65010) prepended itself to a path that came
        // through 4-octet AS 4200000000.
        let as_path = AsPath::sequence([65010, AS_TRANS, 65001]);
        let as4 = AsPath::sequence([4_200_000_000, 65001]);
        assert_eq!(
            as_path.merge_as4(&as4),
            AsPath {
                segments: vec![
                    AsSegment {
                        kind: SegmentKind::Sequence,
                        asns: vec![65010]
                    },
                    AsSegment {
                        kind: SegmentKind::Sequence,
                        asns: vec![4_200_000_000, 65001]
                    },
                ]
            }
        );
        let too_long = AsPath::sequence([1, 2, 3, 4]);
        assert_eq!(
            as_path.merge_as4(&too_long),
            as_path,
            "a longer AS4_PATH is ignored"
        );
    }

    #[test]
    fn malformed_segments_are_reported() {
        assert!(AsPath::decode(&[2, 0], true).is_err(), "empty segment");
        assert!(
            AsPath::decode(&[7, 1, 0, 0, 0, 1], true).is_err(),
            "segment type 7"
        );
        assert!(
            AsPath::decode(&[2, 2, 0, 0, 0, 1], true).is_err(),
            "cut short"
        );
        assert!(AsPath::decode(&[2], true).is_err(), "header cut short");
        assert_eq!(AsPath::decode(&[], true), Ok(AsPath::default()));
    }
}
