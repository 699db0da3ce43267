//! Routing policies: named lists of ordered rules that accept, reject or
//! change routes on import and export, as operators write them for BIRD or
//! FRR.
//!
//! A [`Policy`] tries its [`Rule`]s in order. A rule whose [`Match`] holds
//! applies its [`Action`]s, then its [`Verdict`]: `Accept` and `Reject` end
//! the evaluation, `Next` goes on with the later rules, which see the
//! changed attributes. When no rule decides, the policy's `default` does.
//!
//! Evaluation is on the hot path of every UPDATE, so it copies the
//! attributes only when an action really changes them: an untouched route
//! comes back as `Outcome::Accept { attrs: None, .. }`.
//!
//! ```
//! use bgp4mesh_bgp::policy::{Action, Match, Outcome, Policy, RouteContext, RouteSource, Rule, Verdict};
//! use bgp4mesh_bgp::wire::PathAttributes;
//!
//! let friend_in = Policy {
//!     name: "friend_in".into(),
//!     rules: vec![Rule {
//!         matches: Match {
//!             prefixes: vec!["192.168.42.0/23{23,32}".parse().unwrap()],
//!             ..Match::default()
//!         },
//!         set: vec![Action::SetLocalPref(200)],
//!         verdict: Verdict::Accept,
//!     }],
//!     default: Verdict::Reject,
//! };
//! let prefix = "192.168.42.0/24".parse().unwrap();
//! let ctx = RouteContext { prefix: &prefix, neighbor: Some("friend"), source: RouteSource::Bgp, local_as: 65000 };
//! match friend_in.evaluate(&ctx, &PathAttributes::default()) {
//!     Outcome::Accept { attrs: Some(attrs), .. } => assert_eq!(attrs.local_pref, Some(200)),
//!     other => panic!("{other:?}"),
//! }
//! ```

use std::borrow::Cow;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;

use crate::wire::{AsPath, Community, LargeCommunity, NextHop, PathAttributes};

/// Why a piece of policy text (a prefix range, a community, a regular
/// expression…) could not be read. The message quotes the offending text
/// and says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(String);

impl ParseError {
    /// The human-readable message, as printed by `Display`.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

/// A named routing policy: ordered rules and a default verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The name the configuration refers to it by.
    pub name: String,
    /// Tried in order; see [`Policy::evaluate`].
    pub rules: Vec<Rule>,
    /// Applied when no rule accepted or rejected the route. `Next` here
    /// fails closed: it rejects.
    pub default: Verdict,
}

impl Policy {
    /// A policy with no rules that rejects everything until rules are added.
    pub fn new(name: impl Into<String>) -> Self {
        Policy {
            name: name.into(),
            rules: Vec::new(),
            default: Verdict::Reject,
        }
    }

    /// The built-in policy `all`: accepts every route unchanged.
    pub fn accept_all() -> Self {
        Policy {
            name: "all".into(),
            rules: Vec::new(),
            default: Verdict::Accept,
        }
    }

    /// The built-in policy `none`: rejects every route.
    pub fn reject_all() -> Self {
        Policy {
            name: "none".into(),
            rules: Vec::new(),
            default: Verdict::Reject,
        }
    }

    /// The built-in policy of that name (`all` or `none`), if there is one.
    pub fn builtin(name: &str) -> Option<Self> {
        match name {
            "all" => Some(Policy::accept_all()),
            "none" => Some(Policy::reject_all()),
            _ => None,
        }
    }

    /// Runs the route through the rules.
    ///
    /// Each rule whose [`Match`] holds (against the attributes as changed
    /// by earlier `Next` rules) applies its actions in order, then its
    /// verdict: `Accept` and `Reject` end the evaluation, `Next` goes on.
    /// If no rule ends it, [`Policy::default`] decides, and an accepted
    /// route keeps the changes made on the way. A rejected route's changes
    /// are dropped.
    ///
    /// The attributes are cloned only when an action changes them; the
    /// outcome carries `attrs: None` when the route is accepted as it came.
    /// Whether every route is rejected whatever it is (`none`, or no rule
    /// and no default that accepts): nothing to evaluate.
    pub fn rejects_all(&self) -> bool {
        self.default != Verdict::Accept && self.rules.iter().all(|r| r.verdict != Verdict::Accept)
    }

    /// Whether a rule looks at the prefix. When none does, the outcome
    /// depends only on the attributes, the neighbour and the source, so
    /// one evaluation serves every prefix that shares them.
    pub fn depends_on_prefix(&self) -> bool {
        self.rules.iter().any(|r| !r.matches.prefixes.is_empty())
    }

    pub fn evaluate(&self, ctx: &RouteContext<'_>, attrs: &PathAttributes) -> Outcome {
        let mut current = Cow::Borrowed(attrs);
        let mut next_hop_self = false;
        for rule in &self.rules {
            if !rule.matches.matches(ctx, &current) {
                continue;
            }
            for action in &rule.set {
                action.apply(ctx, &mut current, &mut next_hop_self);
            }
            match rule.verdict {
                Verdict::Accept => return accepted(current, attrs, next_hop_self),
                Verdict::Reject => return Outcome::Reject,
                Verdict::Next => {}
            }
        }
        match self.default {
            Verdict::Accept => accepted(current, attrs, next_hop_self),
            Verdict::Reject | Verdict::Next => Outcome::Reject,
        }
    }
}

/// The accepted outcome: changed attributes only if they really differ.
fn accepted(current: Cow<'_, PathAttributes>, original: &PathAttributes, nhs: bool) -> Outcome {
    let attrs = match current {
        Cow::Owned(changed) if changed != *original => Some(changed),
        _ => None,
    };
    Outcome::Accept {
        attrs,
        next_hop_self: nhs,
    }
}

/// One rule of a policy: if `matches` holds, apply `set`, then `verdict`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The conditions; an empty `Match` holds for every route.
    pub matches: Match,
    /// Applied in order when the rule matches.
    pub set: Vec<Action>,
    /// What happens after the actions.
    pub verdict: Verdict,
}

/// What a matching rule (or a policy's default) decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Verdict {
    /// Take the route, with the changes made so far.
    Accept,
    /// Drop the route.
    #[default]
    Reject,
    /// Keep the changes and go on with the next rule.
    Next,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Accept => "accept",
            Verdict::Reject => "reject",
            Verdict::Next => "next",
        })
    }
}

impl FromStr for Verdict {
    type Err = ParseError;

    /// `accept`, `reject` or `next`.
    fn from_str(text: &str) -> Result<Self, ParseError> {
        match text.trim() {
            "accept" => Ok(Verdict::Accept),
            "reject" => Ok(Verdict::Reject),
            "next" => Ok(Verdict::Next),
            _ => Err(ParseError(format!(
                "invalid verdict `{text}`: expected accept, reject or next"
            ))),
        }
    }
}

/// The conditions of a rule. Every non-empty condition must hold (AND);
/// within one list, any element will do (OR), except `as_path`, where all
/// must hold. The default, with every list empty, matches every route.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Match {
    /// The route's prefix is in one of these ranges.
    pub prefixes: Vec<PrefixRange>,
    /// Every one of these holds for the route's AS path.
    pub as_path: Vec<AsPathMatch>,
    /// The route carries at least one of these communities.
    pub communities: Vec<Community>,
    /// The route carries at least one of these large communities.
    pub large_communities: Vec<LargeCommunity>,
    /// The route came from (on import) or goes to (on export) one of these
    /// neighbours, by configured name. A route with no neighbour (a static
    /// route on import) does not match a non-empty list.
    pub neighbors: Vec<String>,
    /// The route came from one of these sources.
    pub sources: Vec<RouteSource>,
}

impl Match {
    /// Whether every non-empty condition holds for this route.
    pub fn matches(&self, ctx: &RouteContext<'_>, attrs: &PathAttributes) -> bool {
        (self.sources.is_empty() || self.sources.contains(&ctx.source))
            && (self.neighbors.is_empty()
                || ctx
                    .neighbor
                    .is_some_and(|n| self.neighbors.iter().any(|m| m == n)))
            && (self.prefixes.is_empty() || self.prefixes.iter().any(|r| r.contains(ctx.prefix)))
            && (self.communities.is_empty()
                || self
                    .communities
                    .iter()
                    .any(|c| attrs.communities.contains(c)))
            && (self.large_communities.is_empty()
                || self
                    .large_communities
                    .iter()
                    .any(|c| attrs.large_communities.contains(c)))
            && self.as_path.iter().all(|m| m.matches(&attrs.as_path))
    }
}

/// Where a route came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteSource {
    /// A static route of the configuration.
    Static,
    /// A prefix on one of our own interfaces.
    Connected,
    /// Learnt from a BGP neighbour.
    Bgp,
    /// Learnt from the kernel's routing table (`[kernel] learn`).
    Kernel,
}

impl fmt::Display for RouteSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RouteSource::Static => "static",
            RouteSource::Connected => "connected",
            RouteSource::Bgp => "bgp",
            RouteSource::Kernel => "kernel",
        })
    }
}

impl FromStr for RouteSource {
    type Err = ParseError;

    /// `static`, `connected`, `bgp` or `kernel`.
    fn from_str(text: &str) -> Result<Self, ParseError> {
        match text.trim() {
            "static" => Ok(RouteSource::Static),
            "connected" => Ok(RouteSource::Connected),
            "bgp" => Ok(RouteSource::Bgp),
            "kernel" => Ok(RouteSource::Kernel),
            _ => Err(ParseError(format!(
                "invalid route source `{text}`: expected static, connected, bgp or kernel"
            ))),
        }
    }
}

/// A prefix and a range of lengths: matches a prefix inside `prefix` whose
/// length is between `min_len` and `max_len`, both included.
///
/// Read from text ([`FromStr`]) in BIRD or FRR style:
///
/// | text                       | lengths matched                  |
/// |----------------------------|----------------------------------|
/// | `192.168.42.0/23`          | 23 only                          |
/// | `192.168.42.0/23{24,28}`   | 24 to 28                         |
/// | `192.168.42.0/23+`         | 23 to 32                         |
/// | `10.0.0.0/8 ge 16 le 24`   | 16 to 24                         |
/// | `10.0.0.0/8 le 24`         | 8 to 24 (`ge` defaults to 8)     |
/// | `10.0.0.0/8 ge 16`         | 16 to 32 (`le` to the family max)|
///
/// IPv6 works the same way, up to 128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrefixRange {
    /// The covering prefix, without host bits.
    pub prefix: IpNet,
    /// Shortest length matched; at least `prefix`'s own length.
    pub min_len: u8,
    /// Longest length matched; at most 32 or 128.
    pub max_len: u8,
}

impl PrefixRange {
    /// A range, checked as the parser checks text: no host bits, and
    /// `prefix length <= min_len <= max_len <= family maximum`.
    pub fn new(prefix: IpNet, min_len: u8, max_len: u8) -> Result<Self, ParseError> {
        check_range(prefix, min_len, max_len)
            .map_err(|why| ParseError(format!("invalid prefix range `{prefix}`: {why}")))
    }

    /// Exactly this prefix (host bits cleared).
    pub fn exact(prefix: IpNet) -> Self {
        let len = prefix.prefix_len();
        PrefixRange {
            prefix: prefix.trunc(),
            min_len: len,
            max_len: len,
        }
    }

    /// This prefix and every longer one inside it (host bits cleared).
    pub fn or_longer(prefix: IpNet) -> Self {
        PrefixRange {
            prefix: prefix.trunc(),
            min_len: prefix.prefix_len(),
            max_len: prefix.max_prefix_len(),
        }
    }

    /// Whether `p` is inside the range's prefix (same family) with a length
    /// in `min_len..=max_len`.
    pub fn contains(&self, p: &IpNet) -> bool {
        let len = p.prefix_len();
        self.min_len <= len && len <= self.max_len && self.prefix.contains(p)
    }
}

/// Validates a range; the error does not repeat the input.
fn check_range(prefix: IpNet, min_len: u8, max_len: u8) -> Result<PrefixRange, String> {
    let own = prefix.prefix_len();
    let family_max = prefix.max_prefix_len();
    if prefix.trunc() != prefix {
        return Err(format!(
            "{prefix} has host bits set; the network is {}",
            prefix.trunc()
        ));
    }
    if max_len > family_max {
        return Err(format!(
            "maximum length {max_len} is beyond {family_max}, the longest {} prefix",
            family_name(&prefix)
        ));
    }
    if min_len < own {
        return Err(format!(
            "minimum length {min_len} is shorter than the prefix's own length {own}"
        ));
    }
    if min_len > max_len {
        return Err(format!(
            "minimum length {min_len} is greater than maximum length {max_len}"
        ));
    }
    Ok(PrefixRange {
        prefix,
        min_len,
        max_len,
    })
}

fn family_name(prefix: &IpNet) -> &'static str {
    match prefix {
        IpNet::V4(_) => "IPv4",
        IpNet::V6(_) => "IPv6",
    }
}

impl fmt::Display for PrefixRange {
    /// The shortest text that parses back to the same range.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let own = self.prefix.prefix_len();
        if self.min_len == own && self.max_len == own {
            write!(f, "{}", self.prefix)
        } else if self.min_len == own && self.max_len == self.prefix.max_prefix_len() {
            write!(f, "{}+", self.prefix)
        } else {
            write!(f, "{}{{{},{}}}", self.prefix, self.min_len, self.max_len)
        }
    }
}

impl FromStr for PrefixRange {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        let fail = |why: String| ParseError(format!("invalid prefix range `{text}`: {why}"));
        let s = text.trim();
        let end = s
            .find(|c: char| c.is_whitespace() || c == '{' || c == '+')
            .unwrap_or(s.len());
        let (net_text, rest) = s.split_at(end);
        let prefix = parse_prefix(net_text).map_err(fail)?;
        let own = prefix.prefix_len();
        let family_max = prefix.max_prefix_len();
        let rest = rest.trim_start();
        let (min_len, max_len) = if rest.is_empty() {
            (own, own)
        } else if rest == "+" {
            (own, family_max)
        } else if let Some(inner) = rest.strip_prefix('{') {
            let inner = inner
                .strip_suffix('}')
                .ok_or_else(|| fail(format!("`{rest}` should be {{MIN,MAX}}")))?;
            let (min, max) = inner
                .split_once(',')
                .ok_or_else(|| fail(format!("`{rest}` should be {{MIN,MAX}}")))?;
            (
                parse_len(min.trim(), &prefix).map_err(fail)?,
                parse_len(max.trim(), &prefix).map_err(fail)?,
            )
        } else {
            // FRR: [ge N] [le M]
            let (mut ge, mut le) = (None, None);
            let mut words = rest.split_whitespace();
            while let Some(word) = words.next() {
                let slot = match word {
                    "ge" => &mut ge,
                    "le" => &mut le,
                    other => {
                        return Err(fail(format!(
                            "unexpected `{other}`; expected `{{MIN,MAX}}`, `+`, `ge N` or `le N`"
                        )));
                    }
                };
                if slot.is_some() {
                    return Err(fail(format!("`{word}` is given twice")));
                }
                let value = words
                    .next()
                    .ok_or_else(|| fail(format!("`{word}` needs a prefix length after it")))?;
                *slot = Some(parse_len(value, &prefix).map_err(fail)?);
            }
            (ge.unwrap_or(own), le.unwrap_or(family_max))
        };
        check_range(prefix, min_len, max_len).map_err(fail)
    }
}

/// A prefix in CIDR notation, host bits refused.
fn parse_prefix(text: &str) -> Result<IpNet, String> {
    if text.is_empty() {
        return Err("the prefix is missing".into());
    }
    if !text.contains('/') {
        return Err(format!(
            "`{text}` has no /length (write {text}/32 or {text}/128 for one address)"
        ));
    }
    let net: IpNet = text
        .parse()
        .map_err(|_| format!("`{text}` is not an IPv4 or IPv6 prefix"))?;
    if net.trunc() != net {
        return Err(format!(
            "`{text}` has host bits set; the network is {}",
            net.trunc()
        ));
    }
    Ok(net)
}

/// A prefix length no longer than the family allows.
fn parse_len(text: &str, prefix: &IpNet) -> Result<u8, String> {
    let family_max = prefix.max_prefix_len();
    match digits(text, "prefix length")?.parse::<u8>() {
        Ok(len) if len <= family_max => Ok(len),
        _ => Err(format!(
            "length {text} is beyond {family_max}, the longest {} prefix",
            family_name(prefix)
        )),
    }
}

/// `text` if it is a decimal number made of digits only (no sign, no
/// spaces).
fn digits<'t>(text: &'t str, what: &str) -> Result<&'t str, String> {
    if text.is_empty() {
        return Err(format!("the {what} is missing"));
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{what} `{text}` is not a number"));
    }
    Ok(text)
}

/// A decimal number of digits only, at most `max`.
fn number<T: FromStr>(text: &str, what: &str, max: &str) -> Result<T, String> {
    digits(text, what)?
        .parse()
        .map_err(|_| format!("{what} {text} is larger than {max}"))
}

impl FromStr for Community {
    type Err = ParseError;

    /// `ASN:VALUE` with two 16-bit numbers, or a well-known name:
    /// `no-export`, `no-advertise`, `no-export-subconfed` (case and `_`
    /// for `-` do not matter).
    fn from_str(text: &str) -> Result<Self, ParseError> {
        let fail = |why: String| ParseError(format!("invalid community `{text}`: {why}"));
        let s = text.trim();
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "no-export" => return Ok(Community::NO_EXPORT),
            "no-advertise" => return Ok(Community::NO_ADVERTISE),
            "no-export-subconfed" => return Ok(Community::NO_EXPORT_SUBCONFED),
            _ => {}
        }
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            [asn, value] => Ok(Community::new(
                number(asn, "ASN", "65535").map_err(fail)?,
                number(value, "value", "65535").map_err(fail)?,
            )),
            [_, _, _] => Err(fail(
                "a community is ASN:VALUE; three parts make a large community".into(),
            )),
            _ => Err(fail(
                "expected ASN:VALUE (such as 65000:100) or one of no-export, no-advertise, \
                 no-export-subconfed"
                    .into(),
            )),
        }
    }
}

impl FromStr for LargeCommunity {
    type Err = ParseError;

    /// `GLOBAL:LOCAL1:LOCAL2`, three 32-bit numbers (RFC 8092).
    fn from_str(text: &str) -> Result<Self, ParseError> {
        let fail = |why: String| ParseError(format!("invalid large community `{text}`: {why}"));
        const MAX: &str = "4294967295";
        let parts: Vec<&str> = text.trim().split(':').collect();
        match parts.as_slice() {
            [global, local1, local2] => Ok(LargeCommunity {
                global: number(global, "global administrator", MAX).map_err(fail)?,
                local1: number(local1, "first local part", MAX).map_err(fail)?,
                local2: number(local2, "second local part", MAX).map_err(fail)?,
            }),
            _ => Err(fail(format!(
                "expected GLOBAL:LOCAL1:LOCAL2 (such as 65000:1:2), found {} part{}",
                parts.len(),
                if parts.len() == 1 { "" } else { "s" }
            ))),
        }
    }
}

/// One condition on a route's AS path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AsPathMatch {
    /// The last ASN of a final AS_SEQUENCE is this one. A path ending in an
    /// AS_SET, or an empty path (our own routes), has no origin AS.
    OriginAs(u32),
    /// The neighbouring AS (first of the first AS_SEQUENCE, confederation
    /// segments skipped) is this one.
    FirstAs(u32),
    /// This ASN is anywhere in the path, sets and confederation segments
    /// included.
    Contains(u32),
    /// The path length for best-path selection (an AS_SET counts 1,
    /// confederation segments 0) is at most this.
    LengthAtMost(usize),
    /// The path length for best-path selection is at least this.
    LengthAtLeast(usize),
    /// The path's text matches this regular expression; see [`AsPathRegex`].
    Regex(AsPathRegex),
}

impl AsPathMatch {
    /// A [`AsPathMatch::Regex`] condition, compiled from `pattern`.
    pub fn regex(pattern: &str) -> Result<Self, ParseError> {
        AsPathRegex::new(pattern).map(AsPathMatch::Regex)
    }

    /// Whether the condition holds for `path`.
    pub fn matches(&self, path: &AsPath) -> bool {
        match self {
            AsPathMatch::OriginAs(asn) => path.origin_as() == Some(*asn),
            AsPathMatch::FirstAs(asn) => path.first_as() == Some(*asn),
            AsPathMatch::Contains(asn) => path.contains(*asn),
            AsPathMatch::LengthAtMost(n) => path.hop_count() <= *n,
            AsPathMatch::LengthAtLeast(n) => path.hop_count() >= *n,
            AsPathMatch::Regex(re) => re.is_match(path),
        }
    }
}

/// A regular expression (regex-lite syntax) over an AS path written as
/// text: the path's `Display`, where a plain AS_SEQUENCE is its ASNs
/// separated by single spaces, such as `65002 65001`, and the empty path
/// (a route of our own) is the empty string. An AS_SET shows as
/// `{65010,65011}`, confederation segments as `(64512 64513)` and
/// `[64512,64513]`.
///
/// The expression is not anchored: `^65002 ` matches a path whose first
/// ASN is 65002 and goes on, ` 65001$` one that ends in 65001 after
/// another ASN. To match a whole ASN wherever it is, including alone, use
/// word boundaries: `^65002\b`, `\b65001$`, `\b65003\b` (so 65003 does not
/// match 165003).
#[derive(Debug, Clone)]
pub struct AsPathRegex(regex_lite::Regex);

impl AsPathRegex {
    /// Compiles `pattern`; the error names the pattern and the problem.
    pub fn new(pattern: &str) -> Result<Self, ParseError> {
        regex_lite::Regex::new(pattern)
            .map(AsPathRegex)
            .map_err(|e| ParseError(format!("invalid AS path regex `{pattern}`: {e}")))
    }

    /// The pattern it was compiled from.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// Whether the path's text matches.
    pub fn is_match(&self, path: &AsPath) -> bool {
        self.0.is_match(&path.to_string())
    }
}

/// Two expressions are equal when their patterns are.
impl PartialEq for AsPathRegex {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for AsPathRegex {}

impl fmt::Display for AsPathRegex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change a matching rule makes to the route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Sets LOCAL_PREF.
    SetLocalPref(u32),
    /// Sets MULTI_EXIT_DISC.
    SetMed(u32),
    /// Puts `asn` (`None`: our own AS, [`RouteContext::local_as`]) `times`
    /// times in front of the AS path. This is on top of the one copy of
    /// our AS that eBGP export always adds.
    Prepend {
        /// The ASN to prepend; `None` for our own.
        asn: Option<u32>,
        /// How many copies; 0 changes nothing.
        times: u8,
    },
    /// Adds these communities, skipping those already there; the existing
    /// order is kept and new ones are appended in the order given.
    AddCommunities(Vec<Community>),
    /// Removes every occurrence of these communities; the order of the
    /// others is kept.
    RemoveCommunities(Vec<Community>),
    /// Adds these large communities, like [`Action::AddCommunities`].
    AddLargeCommunities(Vec<LargeCommunity>),
    /// Removes these large communities, like [`Action::RemoveCommunities`].
    RemoveLargeCommunities(Vec<LargeCommunity>),
    /// Sets the next hop (an IPv6 address without a link-local one). It
    /// cancels an earlier [`Action::NextHopSelf`]. The family is not
    /// checked against the prefix's.
    SetNextHop(IpAddr),
    /// Asks the speaker to put its own address as next hop (the
    /// `next_hop_self` flag of [`Outcome::Accept`]); the policy does not know the
    /// address. A later [`Action::SetNextHop`] cancels it.
    NextHopSelf,
}

impl Action {
    /// Applies the action, cloning the attributes only if it changes them.
    fn apply(
        &self,
        ctx: &RouteContext<'_>,
        attrs: &mut Cow<'_, PathAttributes>,
        next_hop_self: &mut bool,
    ) {
        match self {
            Action::SetLocalPref(pref) => {
                if attrs.local_pref != Some(*pref) {
                    attrs.to_mut().local_pref = Some(*pref);
                }
            }
            Action::SetMed(med) => {
                if attrs.med != Some(*med) {
                    attrs.to_mut().med = Some(*med);
                }
            }
            Action::Prepend { asn, times } => {
                if *times > 0 {
                    attrs
                        .to_mut()
                        .as_path
                        .prepend(asn.unwrap_or(ctx.local_as), usize::from(*times));
                }
            }
            Action::AddCommunities(add) => {
                if lacks_any(&attrs.communities, add) {
                    add_missing(&mut attrs.to_mut().communities, add);
                }
            }
            Action::RemoveCommunities(remove) => {
                if has_any(&attrs.communities, remove) {
                    attrs.to_mut().communities.retain(|c| !remove.contains(c));
                }
            }
            Action::AddLargeCommunities(add) => {
                if lacks_any(&attrs.large_communities, add) {
                    add_missing(&mut attrs.to_mut().large_communities, add);
                }
            }
            Action::RemoveLargeCommunities(remove) => {
                if has_any(&attrs.large_communities, remove) {
                    attrs
                        .to_mut()
                        .large_communities
                        .retain(|c| !remove.contains(c));
                }
            }
            Action::SetNextHop(address) => {
                let hop = match address {
                    IpAddr::V4(v4) => NextHop::V4(*v4),
                    IpAddr::V6(v6) => NextHop::V6 {
                        global: *v6,
                        link_local: None,
                    },
                };
                *next_hop_self = false;
                if attrs.next_hop != Some(hop) {
                    attrs.to_mut().next_hop = Some(hop);
                }
            }
            Action::NextHopSelf => *next_hop_self = true,
        }
    }
}

/// Whether some of `wanted` is missing from `list`.
fn lacks_any<T: PartialEq>(list: &[T], wanted: &[T]) -> bool {
    wanted.iter().any(|c| !list.contains(c))
}

/// Appends each of `add` not in `list` yet, in order, once.
fn add_missing<T: PartialEq + Copy>(list: &mut Vec<T>, add: &[T]) {
    for c in add {
        if !list.contains(c) {
            list.push(*c);
        }
    }
}

/// Whether `list` holds some of `unwanted`.
fn has_any<T: PartialEq>(list: &[T], unwanted: &[T]) -> bool {
    list.iter().any(|c| unwanted.contains(c))
}

/// What a policy knows about a route besides its attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteContext<'a> {
    /// The route's prefix.
    pub prefix: &'a IpNet,
    /// The configured name of the neighbour the route came from (import)
    /// or goes to (export); `None` for a local route on import.
    pub neighbor: Option<&'a str>,
    /// Where the route came from.
    pub source: RouteSource,
    /// Our AS, for [`Action::Prepend`] with no ASN.
    pub local_as: u32,
}

/// The result of [`Policy::evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "moved once per evaluation straight to the RIB; a Box would add an allocation \
              to every changed route"
)]
pub enum Outcome {
    /// Drop the route (on import: do not use it; on export: withdraw it).
    Reject,
    /// Take the route.
    Accept {
        /// The changed attributes, or `None` when the route is unchanged
        /// (no copy was made).
        attrs: Option<PathAttributes>,
        /// Whether the speaker must put its own address as next hop.
        next_hop_self: bool,
    },
}

impl Outcome {
    /// Whether the route was accepted.
    pub fn is_accept(&self) -> bool {
        matches!(self, Outcome::Accept { .. })
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn rejects_all_only_when_nothing_can_accept() {
        assert!(Policy::reject_all().rejects_all());
        assert!(!Policy::accept_all().rejects_all());
        let mut p = Policy::reject_all();
        p.rules.push(Rule {
            matches: Match::default(),
            set: vec![],
            verdict: Verdict::Next,
        });
        assert!(p.rejects_all(), "a Next rule still ends in the default");
        p.rules.push(Rule {
            matches: Match::default(),
            set: vec![],
            verdict: Verdict::Accept,
        });
        assert!(!p.rejects_all());
    }
    use super::*;
    use crate::wire::{AsSegment, SegmentKind};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn net(s: &str) -> IpNet {
        s.parse().expect("valid prefix in test")
    }

    fn range(s: &str) -> PrefixRange {
        s.parse()
            .unwrap_or_else(|e| panic!("`{s}` should parse: {e}"))
    }

    fn range_err(s: &str) -> String {
        match s.parse::<PrefixRange>() {
            Ok(r) => panic!("`{s}` should not parse, got {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn community_err(s: &str) -> String {
        match s.parse::<Community>() {
            Ok(c) => panic!("`{s}` should not parse, got {c}"),
            Err(e) => e.to_string(),
        }
    }

    fn large_err(s: &str) -> String {
        match s.parse::<LargeCommunity>() {
            Ok(c) => panic!("`{s}` should not parse, got {c}"),
            Err(e) => e.to_string(),
        }
    }

    /// Asserts `msg` contains every one of `parts`.
    fn says(msg: &str, parts: &[&str]) {
        for part in parts {
            assert!(msg.contains(part), "`{msg}` should mention `{part}`");
        }
    }

    fn pr(prefix: &str, min_len: u8, max_len: u8) -> PrefixRange {
        PrefixRange {
            prefix: net(prefix),
            min_len,
            max_len,
        }
    }

    fn ctx<'a>(prefix: &'a IpNet) -> RouteContext<'a> {
        RouteContext {
            prefix,
            neighbor: Some("friend"),
            source: RouteSource::Bgp,
            local_as: 65000,
        }
    }

    fn route(path: &[u32]) -> PathAttributes {
        PathAttributes {
            as_path: AsPath::sequence(path.iter().copied()),
            next_hop: Some(NextHop::V4(Ipv4Addr::new(192, 0, 2, 1))),
            ..PathAttributes::default()
        }
    }

    fn policy(rules: Vec<Rule>, default: Verdict) -> Policy {
        Policy {
            name: "test".into(),
            rules,
            default,
        }
    }

    fn rule(matches: Match, set: Vec<Action>, verdict: Verdict) -> Rule {
        Rule {
            matches,
            set,
            verdict,
        }
    }

    /// Runs one rule `set` + accept over `attrs` and returns the outcome.
    fn apply(set: Vec<Action>, attrs: &PathAttributes) -> Outcome {
        let prefix = net("192.0.2.0/24");
        policy(
            vec![rule(Match::default(), set, Verdict::Accept)],
            Verdict::Reject,
        )
        .evaluate(&ctx(&prefix), attrs)
    }

    /// The changed attributes of an accepting outcome.
    fn changed(outcome: Outcome) -> PathAttributes {
        match outcome {
            Outcome::Accept {
                attrs: Some(attrs), ..
            } => attrs,
            other => panic!("expected changed attributes, got {other:?}"),
        }
    }

    fn unchanged(outcome: &Outcome) -> bool {
        matches!(outcome, Outcome::Accept { attrs: None, .. })
    }

    // ---- prefix ranges -------------------------------------------------

    #[test]
    fn prefix_range_forms() {
        assert_eq!(range("192.168.42.0/23"), pr("192.168.42.0/23", 23, 23));
        assert_eq!(
            range("192.168.42.0/23{23,32}"),
            pr("192.168.42.0/23", 23, 32)
        );
        assert_eq!(
            range("192.168.42.0/23{ 24 , 28 }"),
            pr("192.168.42.0/23", 24, 28)
        );
        assert_eq!(range("192.168.42.0/23+"), pr("192.168.42.0/23", 23, 32));
        assert_eq!(range("10.0.0.0/8 ge 16 le 24"), pr("10.0.0.0/8", 16, 24));
        assert_eq!(range("10.0.0.0/8 le 24"), pr("10.0.0.0/8", 8, 24));
        assert_eq!(range("10.0.0.0/8 ge 16"), pr("10.0.0.0/8", 16, 32));
        assert_eq!(range("10.0.0.0/8 le 24 ge 16"), pr("10.0.0.0/8", 16, 24));
        assert_eq!(range("  0.0.0.0/0+  "), pr("0.0.0.0/0", 0, 32));
        assert_eq!(range("2001:db8::/32"), pr("2001:db8::/32", 32, 32));
        assert_eq!(range("2001:db8::/32{48,64}"), pr("2001:db8::/32", 48, 64));
        assert_eq!(range("2001:db8::/32+"), pr("2001:db8::/32", 32, 128));
        assert_eq!(range("2001:db8::/32 ge 48"), pr("2001:db8::/32", 48, 128));
        assert_eq!(range("2001:db8::/32 le 48"), pr("2001:db8::/32", 32, 48));
        assert_eq!(range("::/0 ge 128"), pr("::/0", 128, 128));
    }

    #[test]
    fn prefix_range_display_parses_back() {
        for text in [
            "192.168.42.0/23",
            "192.168.42.0/23+",
            "192.168.42.0/23{24,28}",
            "2001:db8::/32{48,64}",
            "2001:db8::/32+",
        ] {
            let r = range(text);
            assert_eq!(r.to_string(), text);
            assert_eq!(range(&r.to_string()), r);
        }
        assert_eq!(
            range("10.0.0.0/8 ge 16 le 24").to_string(),
            "10.0.0.0/8{16,24}"
        );
        assert_eq!(range("10.0.0.0/8 ge 8").to_string(), "10.0.0.0/8+");
    }

    #[test]
    fn prefix_range_refuses_host_bits() {
        let msg = range_err("192.168.42.1/23");
        says(&msg, &["`192.168.42.1/23`", "host bits", "192.168.42.0/23"]);
        says(&range_err("2001:db8::1/32{32,64}"), &["host bits"]);
    }

    #[test]
    fn prefix_range_refuses_bad_lengths() {
        says(
            &range_err("192.168.42.0/23{28,24}"),
            &["192.168.42.0/23{28,24}", "28", "greater than", "24"],
        );
        says(
            &range_err("10.0.0.0/8 ge 24 le 16"),
            &["greater than maximum length 16"],
        );
        says(
            &range_err("192.168.42.0/23{23,33}"),
            &["33", "beyond 32", "IPv4"],
        );
        says(&range_err("10.0.0.0/8 le 33"), &["33", "beyond 32"]);
        says(
            &range_err("2001:db8::/32{48,129}"),
            &["129", "beyond 128", "IPv6"],
        );
        says(
            &range_err("192.168.42.0/23{16,24}"),
            &["minimum length 16", "shorter", "own length 23"],
        );
        says(&range_err("10.0.0.0/8 ge 4"), &["minimum length 4"]);
        says(
            &range_err("10.0.0.0/8{8,99999999999999999999999999999999999999999}"),
            &["99999999999999999999999999999999999999999", "beyond 32"],
        );
        says(&range_err("10.0.0.0/8{8,x}"), &["`x`", "not a number"]);
        says(&range_err("10.0.0.0/8{8,-1}"), &["`-1`", "not a number"]);
        says(&range_err("10.0.0.0/8{8,}"), &["prefix length is missing"]);
    }

    #[test]
    fn prefix_range_refuses_bad_syntax() {
        says(&range_err(""), &["prefix is missing"]);
        says(&range_err("10.0.0.1"), &["`10.0.0.1`", "no /length"]);
        says(
            &range_err("10.0.0.300/24"),
            &["`10.0.0.300/24`", "not an IPv4 or IPv6 prefix"],
        );
        says(&range_err("10.0.0.0/33"), &["`10.0.0.0/33`"]);
        says(&range_err("10.0.0.0/8{16,24"), &["`{16,24`", "{MIN,MAX}"]);
        says(&range_err("10.0.0.0/8{16}"), &["`{16}`", "{MIN,MAX}"]);
        says(&range_err("10.0.0.0/8 gt 16"), &["`gt`", "ge N"]);
        says(&range_err("10.0.0.0/8 ge"), &["`ge` needs a prefix length"]);
        says(
            &range_err("10.0.0.0/8 le 16 le 24"),
            &["`le` is given twice"],
        );
        says(&range_err("10.0.0.0/8++"), &["`++`"]);
    }

    #[test]
    fn prefix_range_new_checks_like_the_parser() {
        assert_eq!(
            PrefixRange::new(net("10.0.0.0/8"), 16, 24),
            Ok(pr("10.0.0.0/8", 16, 24))
        );
        let err = PrefixRange::new(net("10.0.0.1/8"), 8, 8).expect_err("host bits");
        says(err.message(), &["10.0.0.1/8", "host bits"]);
        assert!(PrefixRange::new(net("10.0.0.0/8"), 4, 24).is_err());
        assert!(PrefixRange::new(net("10.0.0.0/8"), 24, 16).is_err());
        assert!(PrefixRange::new(net("10.0.0.0/8"), 8, 40).is_err());
        assert_eq!(
            PrefixRange::exact(net("10.1.2.3/8")),
            pr("10.0.0.0/8", 8, 8)
        );
        assert_eq!(
            PrefixRange::or_longer(net("2001:db8::/32")),
            pr("2001:db8::/32", 32, 128)
        );
    }

    #[test]
    fn prefix_range_contains() {
        let r = range("192.168.42.0/23{24,28}");
        assert!(r.contains(&net("192.168.42.0/24")));
        assert!(r.contains(&net("192.168.43.128/25")));
        assert!(r.contains(&net("192.168.43.240/28")));
        assert!(!r.contains(&net("192.168.42.0/23")), "too short");
        assert!(!r.contains(&net("192.168.42.0/29")), "too long");
        assert!(!r.contains(&net("192.168.44.0/24")), "outside");
        assert!(!r.contains(&net("::/0")), "other family");
        let v6 = range("2001:db8::/32+");
        assert!(v6.contains(&net("2001:db8:1::/48")));
        assert!(!v6.contains(&net("2001:db9::/48")));
        assert!(!v6.contains(&net("10.0.0.0/8")));
    }

    // ---- communities ---------------------------------------------------

    #[test]
    fn community_parses() {
        assert_eq!("65000:100".parse(), Ok(Community::new(65000, 100)));
        assert_eq!("0:0".parse(), Ok(Community(0)));
        assert_eq!(" 65535:65535 ".parse(), Ok(Community(u32::MAX)));
        assert_eq!("no-export".parse(), Ok(Community::NO_EXPORT));
        assert_eq!("NO_EXPORT".parse(), Ok(Community::NO_EXPORT));
        assert_eq!("no-advertise".parse(), Ok(Community::NO_ADVERTISE));
        assert_eq!(
            "no-export-subconfed".parse(),
            Ok(Community::NO_EXPORT_SUBCONFED)
        );
        // Display gives numbers, which parse back.
        let c: Community = Community::NO_EXPORT.to_string().parse().expect("back");
        assert_eq!(c, Community::NO_EXPORT);
    }

    #[test]
    fn community_errors_name_the_problem() {
        says(
            &community_err("70000:1"),
            &["`70000:1`", "ASN 70000", "larger than 65535"],
        );
        says(
            &community_err("1:65536"),
            &["value 65536", "larger than 65535"],
        );
        says(
            &community_err("65000"),
            &["`65000`", "ASN:VALUE", "no-export"],
        );
        says(&community_err("no-exports"), &["`no-exports`", "no-export"]);
        says(&community_err("a:1"), &["ASN `a`", "not a number"]);
        says(&community_err("1:+2"), &["value `+2`", "not a number"]);
        says(&community_err(":1"), &["ASN is missing"]);
        says(&community_err("1:"), &["value is missing"]);
        says(
            &community_err("65000:1:2"),
            &["`65000:1:2`", "large community"],
        );
        says(&community_err(""), &["ASN:VALUE"]);
    }

    #[test]
    fn large_community_parses() {
        assert_eq!(
            "65000:1:2".parse(),
            Ok(LargeCommunity {
                global: 65000,
                local1: 1,
                local2: 2
            })
        );
        assert_eq!(
            "4294967295:4294967295:0".parse(),
            Ok(LargeCommunity {
                global: u32::MAX,
                local1: u32::MAX,
                local2: 0
            })
        );
    }

    #[test]
    fn large_community_errors_name_the_problem() {
        says(
            &large_err("65000:1"),
            &["`65000:1`", "GLOBAL:LOCAL1:LOCAL2", "found 2 parts"],
        );
        says(&large_err("1:2:3:4"), &["found 4 parts"]);
        says(&large_err("x"), &["found 1 part"]);
        says(
            &large_err("4294967296:1:2"),
            &["global administrator 4294967296", "larger than 4294967295"],
        );
        says(
            &large_err("1:b:2"),
            &["first local part `b`", "not a number"],
        );
        says(&large_err("1:2:"), &["second local part is missing"]);
    }

    #[test]
    fn source_and_verdict_parse() {
        for s in [
            RouteSource::Static,
            RouteSource::Connected,
            RouteSource::Bgp,
            RouteSource::Kernel,
        ] {
            assert_eq!(s.to_string().parse(), Ok(s));
        }
        for v in [Verdict::Accept, Verdict::Reject, Verdict::Next] {
            assert_eq!(v.to_string().parse(), Ok(v));
        }
        says(
            &"ospf"
                .parse::<RouteSource>()
                .expect_err("no ospf")
                .to_string(),
            &["`ospf`", "static, connected, bgp or kernel"],
        );
        says(
            &"allow"
                .parse::<Verdict>()
                .expect_err("no allow")
                .to_string(),
            &["`allow`", "accept, reject or next"],
        );
    }

    #[test]
    fn bad_regex_is_named() {
        let err = AsPathMatch::regex("^(65001").expect_err("unbalanced");
        says(err.message(), &["invalid AS path regex", "`^(65001`"]);
    }

    // ---- matches -------------------------------------------------------

    #[test]
    fn empty_match_matches_everything() {
        let prefix = net("2001:db8::/48");
        let c = RouteContext {
            neighbor: None,
            source: RouteSource::Static,
            ..ctx(&prefix)
        };
        assert!(Match::default().matches(&c, &PathAttributes::default()));
    }

    #[test]
    fn match_prefixes_any_of() {
        let m = Match {
            prefixes: vec![range("10.0.0.0/8+"), range("192.168.0.0/16")],
            ..Match::default()
        };
        let attrs = route(&[65001]);
        for (p, want) in [
            ("10.1.0.0/16", true),
            ("192.168.0.0/16", true),
            ("192.168.1.0/24", false),
            ("172.16.0.0/12", false),
        ] {
            let prefix = net(p);
            assert_eq!(m.matches(&ctx(&prefix), &attrs), want, "{p}");
        }
    }

    #[test]
    fn match_as_path_conditions() {
        let path = |asns: &[u32]| route(asns).as_path;
        let check = |m: AsPathMatch, asns: &[u32]| m.matches(&path(asns));
        assert!(check(AsPathMatch::OriginAs(65001), &[65002, 65001]));
        assert!(!check(AsPathMatch::OriginAs(65002), &[65002, 65001]));
        assert!(!check(AsPathMatch::OriginAs(65001), &[]));
        assert!(check(AsPathMatch::FirstAs(65002), &[65002, 65001]));
        assert!(!check(AsPathMatch::FirstAs(65001), &[65002, 65001]));
        assert!(check(AsPathMatch::Contains(65003), &[65002, 65003, 65001]));
        assert!(!check(AsPathMatch::Contains(65004), &[65002, 65003, 65001]));
        assert!(check(AsPathMatch::LengthAtMost(2), &[65002, 65001]));
        assert!(!check(AsPathMatch::LengthAtMost(1), &[65002, 65001]));
        assert!(check(AsPathMatch::LengthAtMost(0), &[]));
        assert!(check(AsPathMatch::LengthAtLeast(2), &[65002, 65001]));
        assert!(!check(AsPathMatch::LengthAtLeast(3), &[65002, 65001]));

        // Sets count 1, confederation segments 0; origin of a final set is none.
        let mixed = AsPath {
            segments: vec![
                AsSegment {
                    kind: SegmentKind::ConfedSequence,
                    asns: vec![64512],
                },
                AsSegment {
                    kind: SegmentKind::Sequence,
                    asns: vec![65002],
                },
                AsSegment {
                    kind: SegmentKind::Set,
                    asns: vec![65010, 65011],
                },
            ],
        };
        assert!(AsPathMatch::LengthAtMost(2).matches(&mixed));
        assert!(AsPathMatch::LengthAtLeast(2).matches(&mixed));
        assert!(AsPathMatch::FirstAs(65002).matches(&mixed));
        assert!(AsPathMatch::Contains(65011).matches(&mixed));
        assert!(!AsPathMatch::OriginAs(65011).matches(&mixed));
    }

    #[test]
    fn match_as_path_regex_anchors() {
        let re = |p: &str| AsPathMatch::regex(p).expect("valid regex");
        let path = |asns: &[u32]| route(asns).as_path;
        assert!(re("^65002 ").matches(&path(&[65002, 65001])));
        assert!(!re("^65002 ").matches(&path(&[65001, 65002])));
        assert!(re(" 65001$").matches(&path(&[65002, 65001])));
        assert!(!re(" 65001$").matches(&path(&[65001, 65002])));
        assert!(re("^65002 65001$").matches(&path(&[65002, 65001])));
        assert!(re("^$").matches(&path(&[])), "our own routes");
        assert!(!re("^$").matches(&path(&[65001])));
        // Word boundaries match whole ASNs, also alone.
        assert!(re(r"^65001\b").matches(&path(&[65001])));
        assert!(re(r"\b65001$").matches(&path(&[65001])));
        assert!(re(r"\b65003\b").matches(&path(&[65002, 65003, 65001])));
        assert!(!re(r"\b65003\b").matches(&path(&[65002, 165003, 65001])));
        assert!(!re(r"\b65003\b").matches(&path(&[65002, 650031])));
        // Prepending shows as repetition.
        assert!(re(r"^(65002 ){2,}").matches(&path(&[65002, 65002, 65002, 65001])));
        // All conditions in a Match must hold.
        let m = Match {
            as_path: vec![re("^65002 "), AsPathMatch::LengthAtMost(2)],
            ..Match::default()
        };
        let prefix = net("10.0.0.0/8");
        assert!(m.matches(&ctx(&prefix), &route(&[65002, 65001])));
        assert!(!m.matches(&ctx(&prefix), &route(&[65002, 65003, 65001])));
        // Equality is by pattern.
        assert_eq!(re("^65002 "), re("^65002 "));
        assert_ne!(re("^65002 "), re("^65003 "));
        assert_eq!(
            AsPathRegex::new(r"\b1$").expect("valid").to_string(),
            r"\b1$"
        );
    }

    #[test]
    fn match_communities_any_of() {
        let m = Match {
            communities: vec![Community::new(65000, 1), Community::NO_EXPORT],
            ..Match::default()
        };
        let prefix = net("10.0.0.0/8");
        let mut attrs = route(&[65001]);
        assert!(!m.matches(&ctx(&prefix), &attrs));
        attrs.communities = vec![Community::new(65000, 2), Community::NO_EXPORT];
        assert!(m.matches(&ctx(&prefix), &attrs));
        attrs.communities = vec![Community::new(65000, 1)];
        assert!(m.matches(&ctx(&prefix), &attrs));
    }

    #[test]
    fn match_large_communities_any_of() {
        let lc = |s: &str| s.parse::<LargeCommunity>().expect("valid");
        let m = Match {
            large_communities: vec![lc("65000:1:1"), lc("65000:1:2")],
            ..Match::default()
        };
        let prefix = net("10.0.0.0/8");
        let mut attrs = route(&[65001]);
        attrs.large_communities = vec![lc("65000:1:3")];
        assert!(!m.matches(&ctx(&prefix), &attrs));
        attrs.large_communities.push(lc("65000:1:2"));
        assert!(m.matches(&ctx(&prefix), &attrs));
    }

    #[test]
    fn match_neighbors() {
        let m = Match {
            neighbors: vec!["isp".into(), "friend".into()],
            ..Match::default()
        };
        let prefix = net("10.0.0.0/8");
        let attrs = route(&[65001]);
        assert!(m.matches(&ctx(&prefix), &attrs));
        let other = RouteContext {
            neighbor: Some("ixp"),
            ..ctx(&prefix)
        };
        assert!(!m.matches(&other, &attrs));
        let local = RouteContext {
            neighbor: None,
            ..ctx(&prefix)
        };
        assert!(!m.matches(&local, &attrs));
    }

    #[test]
    fn match_sources() {
        let m = Match {
            sources: vec![RouteSource::Static, RouteSource::Connected],
            ..Match::default()
        };
        let prefix = net("10.0.0.0/8");
        let attrs = PathAttributes::default();
        for (source, want) in [
            (RouteSource::Static, true),
            (RouteSource::Connected, true),
            (RouteSource::Bgp, false),
        ] {
            let c = RouteContext {
                source,
                ..ctx(&prefix)
            };
            assert_eq!(m.matches(&c, &attrs), want, "{source}");
        }
    }

    #[test]
    fn match_conditions_are_anded() {
        let m = Match {
            prefixes: vec![range("10.0.0.0/8+")],
            communities: vec![Community::new(65000, 1)],
            neighbors: vec!["friend".into()],
            sources: vec![RouteSource::Bgp],
            as_path: vec![AsPathMatch::OriginAs(65001)],
            ..Match::default()
        };
        let inside = net("10.1.0.0/16");
        let outside = net("11.0.0.0/8");
        let mut attrs = route(&[65001]);
        attrs.communities = vec![Community::new(65000, 1)];
        assert!(m.matches(&ctx(&inside), &attrs));
        assert!(!m.matches(&ctx(&outside), &attrs));
        let mut other = attrs.clone();
        other.communities.clear();
        assert!(!m.matches(&ctx(&inside), &other));
        let mut other = attrs.clone();
        other.as_path = AsPath::sequence([65001, 65002]);
        assert!(!m.matches(&ctx(&inside), &other));
        let static_route = RouteContext {
            source: RouteSource::Static,
            ..ctx(&inside)
        };
        assert!(!m.matches(&static_route, &attrs));
    }

    // ---- actions -------------------------------------------------------

    #[test]
    fn set_local_pref_and_med() {
        let attrs = route(&[65001]);
        let out = changed(apply(
            vec![Action::SetLocalPref(200), Action::SetMed(50)],
            &attrs,
        ));
        assert_eq!(out.local_pref, Some(200));
        assert_eq!(out.med, Some(50));
        assert_eq!(out.as_path, attrs.as_path, "nothing else changes");
        assert_eq!(out.next_hop, attrs.next_hop);
    }

    #[test]
    fn prepend_own_or_given_as() {
        let attrs = route(&[65001]);
        let out = changed(apply(
            vec![Action::Prepend {
                asn: None,
                times: 2,
            }],
            &attrs,
        ));
        assert_eq!(out.as_path, AsPath::sequence([65000, 65000, 65001]));
        let out = changed(apply(
            vec![Action::Prepend {
                asn: Some(65099),
                times: 1,
            }],
            &attrs,
        ));
        assert_eq!(out.as_path, AsPath::sequence([65099, 65001]));
        let out = changed(apply(
            vec![Action::Prepend {
                asn: None,
                times: 1,
            }],
            &PathAttributes::default(),
        ));
        assert_eq!(out.as_path, AsPath::sequence([65000]), "empty path");
        assert!(unchanged(&apply(
            vec![Action::Prepend {
                asn: None,
                times: 0
            }],
            &attrs
        )));
    }

    #[test]
    fn add_and_remove_communities_keep_order_without_duplicates() {
        let c = |v: u16| Community::new(65000, v);
        let mut attrs = route(&[65001]);
        attrs.communities = vec![c(3), c(1)];
        let out = changed(apply(
            vec![Action::AddCommunities(vec![c(1), c(2), c(4), c(2)])],
            &attrs,
        ));
        assert_eq!(out.communities, vec![c(3), c(1), c(2), c(4)]);
        let out = changed(apply(
            vec![Action::RemoveCommunities(vec![c(1), c(9)])],
            &out,
        ));
        assert_eq!(out.communities, vec![c(3), c(2), c(4)]);
        // Remove then add moves it to the end, once.
        let out = changed(apply(
            vec![
                Action::RemoveCommunities(vec![c(3)]),
                Action::AddCommunities(vec![c(3)]),
            ],
            &out,
        ));
        assert_eq!(out.communities, vec![c(2), c(4), c(3)]);
        assert!(unchanged(&apply(
            vec![
                Action::AddCommunities(vec![c(2), c(4)]),
                Action::RemoveCommunities(vec![c(7)]),
            ],
            &out
        )));
    }

    #[test]
    fn add_and_remove_large_communities() {
        let lc = |v: u32| LargeCommunity {
            global: 65000,
            local1: 1,
            local2: v,
        };
        let mut attrs = route(&[65001]);
        attrs.large_communities = vec![lc(2)];
        let out = changed(apply(
            vec![Action::AddLargeCommunities(vec![lc(1), lc(2), lc(1)])],
            &attrs,
        ));
        assert_eq!(out.large_communities, vec![lc(2), lc(1)]);
        let out = changed(apply(
            vec![Action::RemoveLargeCommunities(vec![lc(2)])],
            &out,
        ));
        assert_eq!(out.large_communities, vec![lc(1)]);
        assert!(unchanged(&apply(
            vec![
                Action::AddLargeCommunities(vec![lc(1)]),
                Action::RemoveLargeCommunities(vec![lc(5)]),
            ],
            &out
        )));
    }

    #[test]
    fn set_next_hop_v4_and_v6() {
        let attrs = route(&[65001]);
        let out = changed(apply(
            vec![Action::SetNextHop(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 9)))],
            &attrs,
        ));
        assert_eq!(out.next_hop, Some(NextHop::V4(Ipv4Addr::new(192, 0, 2, 9))));

        let global: Ipv6Addr = "2001:db8::1".parse().expect("valid");
        let mut v6 = attrs.clone();
        v6.next_hop = Some(NextHop::V6 {
            global,
            link_local: Some("fe80::1".parse().expect("valid")),
        });
        let out = changed(apply(vec![Action::SetNextHop(IpAddr::V6(global))], &v6));
        assert_eq!(
            out.next_hop,
            Some(NextHop::V6 {
                global,
                link_local: None
            }),
            "the link-local address goes"
        );
        assert!(unchanged(&apply(
            vec![Action::SetNextHop(IpAddr::V6(global))],
            &out
        )));
    }

    #[test]
    fn next_hop_self_is_a_flag() {
        let attrs = route(&[65001]);
        assert_eq!(
            apply(vec![Action::NextHopSelf], &attrs),
            Outcome::Accept {
                attrs: None,
                next_hop_self: true
            }
        );
        // The last next-hop action wins.
        let hop = Ipv4Addr::new(192, 0, 2, 1);
        assert_eq!(
            apply(
                vec![Action::NextHopSelf, Action::SetNextHop(IpAddr::V4(hop))],
                &attrs
            ),
            Outcome::Accept {
                attrs: None,
                next_hop_self: false
            }
        );
        assert_eq!(
            apply(
                vec![Action::SetNextHop(IpAddr::V4(hop)), Action::NextHopSelf],
                &attrs
            ),
            Outcome::Accept {
                attrs: None,
                next_hop_self: true
            }
        );
    }

    // ---- copy-on-write -------------------------------------------------

    #[test]
    fn unchanged_routes_are_not_copied() {
        let mut attrs = route(&[65001]);
        attrs.local_pref = Some(200);
        attrs.med = Some(5);
        attrs.communities = vec![Community::new(65000, 1)];
        let outcome = apply(
            vec![
                Action::SetLocalPref(200),
                Action::SetMed(5),
                Action::AddCommunities(vec![Community::new(65000, 1)]),
                Action::RemoveCommunities(vec![Community::new(65000, 2)]),
                Action::AddLargeCommunities(vec![]),
                Action::RemoveLargeCommunities(vec![LargeCommunity {
                    global: 1,
                    local1: 2,
                    local2: 3,
                }]),
                Action::SetNextHop(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))),
            ],
            &attrs,
        );
        assert_eq!(
            outcome,
            Outcome::Accept {
                attrs: None,
                next_hop_self: false
            }
        );
        // A change undone by a later action is no change either.
        let outcome = apply(
            vec![Action::SetLocalPref(100), Action::SetLocalPref(200)],
            &attrs,
        );
        assert!(unchanged(&outcome), "{outcome:?}");
        assert!(unchanged(
            &Policy::accept_all().evaluate(&ctx(&net("10.0.0.0/8")), &attrs)
        ));
    }

    // ---- verdict flow --------------------------------------------------

    #[test]
    fn next_then_accept_keeps_both_changes() {
        let p = policy(
            vec![
                rule(Match::default(), vec![Action::SetMed(10)], Verdict::Next),
                rule(
                    Match {
                        neighbors: vec!["someone-else".into()],
                        ..Match::default()
                    },
                    vec![Action::SetMed(99)],
                    Verdict::Reject,
                ),
                rule(
                    Match::default(),
                    vec![Action::SetLocalPref(300)],
                    Verdict::Accept,
                ),
                rule(Match::default(), vec![Action::SetMed(20)], Verdict::Accept),
            ],
            Verdict::Reject,
        );
        let prefix = net("10.0.0.0/8");
        let out = changed(p.evaluate(&ctx(&prefix), &route(&[65001])));
        assert_eq!((out.med, out.local_pref), (Some(10), Some(300)));
    }

    #[test]
    fn later_rules_see_earlier_changes() {
        let tag = Community::new(65000, 666);
        let p = policy(
            vec![
                rule(
                    Match {
                        as_path: vec![AsPathMatch::Contains(65666)],
                        ..Match::default()
                    },
                    vec![Action::AddCommunities(vec![tag])],
                    Verdict::Next,
                ),
                rule(
                    Match {
                        communities: vec![tag],
                        ..Match::default()
                    },
                    vec![],
                    Verdict::Reject,
                ),
            ],
            Verdict::Accept,
        );
        let prefix = net("10.0.0.0/8");
        assert_eq!(
            p.evaluate(&ctx(&prefix), &route(&[65002, 65666])),
            Outcome::Reject
        );
        assert!(unchanged(&p.evaluate(&ctx(&prefix), &route(&[65002]))));
    }

    #[test]
    fn default_reject_drops_changes() {
        let p = policy(
            vec![rule(
                Match::default(),
                vec![Action::SetLocalPref(10), Action::NextHopSelf],
                Verdict::Next,
            )],
            Verdict::Reject,
        );
        let prefix = net("10.0.0.0/8");
        assert_eq!(p.evaluate(&ctx(&prefix), &route(&[65001])), Outcome::Reject);
        assert_eq!(
            Policy::new("empty").evaluate(&ctx(&prefix), &route(&[65001])),
            Outcome::Reject,
            "a new policy rejects"
        );
    }

    #[test]
    fn default_accept_keeps_changes() {
        let p = policy(
            vec![
                rule(
                    Match::default(),
                    vec![Action::SetLocalPref(10), Action::NextHopSelf],
                    Verdict::Next,
                ),
                rule(
                    Match {
                        sources: vec![RouteSource::Static],
                        ..Match::default()
                    },
                    vec![],
                    Verdict::Reject,
                ),
            ],
            Verdict::Accept,
        );
        let prefix = net("10.0.0.0/8");
        match p.evaluate(&ctx(&prefix), &route(&[65001])) {
            Outcome::Accept {
                attrs: Some(attrs),
                next_hop_self: true,
            } => assert_eq!(attrs.local_pref, Some(10)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reject_ends_evaluation() {
        let p = policy(
            vec![
                rule(Match::default(), vec![], Verdict::Reject),
                rule(Match::default(), vec![], Verdict::Accept),
            ],
            Verdict::Accept,
        );
        let prefix = net("10.0.0.0/8");
        assert_eq!(p.evaluate(&ctx(&prefix), &route(&[65001])), Outcome::Reject);
    }

    #[test]
    fn default_next_fails_closed() {
        let p = policy(vec![], Verdict::Next);
        let prefix = net("10.0.0.0/8");
        assert_eq!(p.evaluate(&ctx(&prefix), &route(&[65001])), Outcome::Reject);
        assert_eq!(Verdict::default(), Verdict::Reject);
    }

    #[test]
    fn builtins() {
        let prefix = net("2001:db8::/32");
        let attrs = route(&[65001]);
        let all = Policy::builtin("all").expect("built in");
        assert_eq!(all, Policy::accept_all());
        assert_eq!(all.name, "all");
        assert_eq!(
            all.evaluate(&ctx(&prefix), &attrs),
            Outcome::Accept {
                attrs: None,
                next_hop_self: false
            }
        );
        let none = Policy::builtin("none").expect("built in");
        assert_eq!(none, Policy::reject_all());
        assert_eq!(none.name, "none");
        assert_eq!(none.evaluate(&ctx(&prefix), &attrs), Outcome::Reject);
        assert!(!none.evaluate(&ctx(&prefix), &attrs).is_accept());
        assert!(Policy::builtin("friend_in").is_none());
    }

    // ---- the seed scenario ---------------------------------------------

    #[test]
    fn friend_in_and_friend_out() {
        let friend_in = Policy {
            name: "friend_in".into(),
            rules: vec![Rule {
                matches: Match {
                    prefixes: vec![range("192.168.42.0/23{23,32}")],
                    ..Match::default()
                },
                set: vec![Action::SetLocalPref(200)],
                verdict: Verdict::Accept,
            }],
            default: Verdict::Reject,
        };
        let attrs = route(&[65001]);
        let p24 = net("192.168.42.0/24");
        let out = changed(friend_in.evaluate(&ctx(&p24), &attrs));
        assert_eq!(out.local_pref, Some(200));
        assert_eq!(
            out,
            PathAttributes {
                local_pref: Some(200),
                ..attrs.clone()
            }
        );
        let outside = net("192.168.44.0/24");
        assert_eq!(friend_in.evaluate(&ctx(&outside), &attrs), Outcome::Reject);
        let shorter = net("192.168.40.0/22");
        assert_eq!(friend_in.evaluate(&ctx(&shorter), &attrs), Outcome::Reject);
        let p22: IpNet = "192.168.42.0/22".parse().expect("valid");
        assert_eq!(friend_in.evaluate(&ctx(&p22), &attrs), Outcome::Reject);

        let friend_out = Policy {
            name: "friend_out".into(),
            rules: vec![Rule {
                matches: Match::default(),
                set: vec![Action::Prepend {
                    asn: None,
                    times: 3,
                }],
                verdict: Verdict::Accept,
            }],
            default: Verdict::Reject,
        };
        let out = changed(friend_out.evaluate(&ctx(&p24), &attrs));
        assert_eq!(out.as_path, AsPath::sequence([65000, 65000, 65000, 65001]));
        assert_eq!(out.as_path.to_string(), "65000 65000 65000 65001");
    }

    // ---- properties ----------------------------------------------------

    /// The top `len` bits of a `bits`-bit address.
    fn top(addr: u128, len: u8, bits: u8) -> u128 {
        if len == 0 { 0 } else { addr >> (bits - len) }
    }

    /// A network `addr/len` and a candidate, often inside it.
    fn case(bits: u8) -> impl Strategy<Value = (u128, u8, u8, u8, u128, u8)> {
        let mask = if bits == 128 {
            u128::MAX
        } else {
            (1u128 << bits) - 1
        };
        (0..=bits)
            .prop_flat_map(move |len| (Just(len), len..=bits))
            .prop_flat_map(move |(len, min)| (Just(len), Just(min), min..=bits))
            .prop_flat_map(move |(len, min, max)| {
                (
                    any::<u128>().prop_map(move |a| a & mask),
                    Just(len),
                    Just(min),
                    Just(max),
                    any::<u128>().prop_map(move |a| a & mask),
                    0..=bits,
                    any::<bool>(),
                )
            })
            .prop_map(move |(addr, len, min, max, other, cand_len, inside)| {
                // Clear host bits of the network.
                let net = if len == 0 {
                    0
                } else {
                    (addr >> (bits - len)) << (bits - len)
                };
                // Half the time, put the candidate inside the network.
                let cand = if inside && len > 0 {
                    let host = if len == bits {
                        0
                    } else {
                        other & (mask >> len)
                    };
                    net | host
                } else {
                    other
                };
                (net, len, min, max, cand, cand_len)
            })
    }

    proptest! {
        #[test]
        fn parsed_v4_range_matches_exactly_its_prefixes(
            (net_bits, len, min, max, cand, cand_len) in case(32)
        ) {
            let to_v4 = |a: u128| Ipv4Addr::from(u32::try_from(a).unwrap_or(0));
            let text = format!("{}/{len}{{{min},{max}}}", to_v4(net_bits));
            let r: PrefixRange = text.parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert_eq!(r.to_string().parse::<PrefixRange>(), Ok(r));
            let candidate = IpNet::V4(
                ipnet::Ipv4Net::new(to_v4(cand), cand_len)
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?
                    .trunc(),
            );
            let inside = cand_len >= len && top(cand, len, 32) == top(net_bits, len, 32);
            let want = inside && min <= cand_len && cand_len <= max;
            prop_assert_eq!(r.contains(&candidate), want, "{} vs {}", text, candidate);
        }

        #[test]
        fn parsed_v6_range_matches_exactly_its_prefixes(
            (net_bits, len, min, max, cand, cand_len) in case(128)
        ) {
            let text = format!("{}/{len}{{{min},{max}}}", Ipv6Addr::from(net_bits));
            let r: PrefixRange = text.parse().map_err(|e| TestCaseError::fail(format!("{e}")))?;
            prop_assert_eq!(r.to_string().parse::<PrefixRange>(), Ok(r));
            let candidate = IpNet::V6(
                ipnet::Ipv6Net::new(Ipv6Addr::from(cand), cand_len)
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?
                    .trunc(),
            );
            let inside = cand_len >= len && top(cand, len, 128) == top(net_bits, len, 128);
            let want = inside && min <= cand_len && cand_len <= max;
            prop_assert_eq!(r.contains(&candidate), want, "{} vs {}", text, candidate);
        }
    }
}
