//! ICMP errors for packets no peer takes: a packet routed into the device
//! whose destination is in no peer's allowed IPs is answered, as the kernel
//! module answers it, with ICMP destination unreachable (host unreachable)
//! or ICMPv6 destination unreachable (address unreachable), written back
//! into the TUN device, so `ping` says so at once instead of timing out.
//!
//! Only the tun → udp thread sends them, on the path of a packet that had no
//! peer (never on the common path); a token bucket per device bounds them
//! ([`IcmpLimiter`]), and the reply is built on the stack.
//!
//! The reply comes from the unreachable destination itself: the kernel
//! drops a packet coming in with one of its own addresses as source
//! (martian), and the destination is routed into this device, so the
//! reverse-path check passes. `ping` prints `From <destination> … Destination
//! Host Unreachable`.

use std::time::{Duration, Instant};

/// At most this many errors at once…
const BURST: u32 = 5;
/// …and one more per this much time (5 a second), as the kernel's
/// `icmp_ratelimit` (1 s per destination, bursts of 6) keeps them rare.
const REFILL: Duration = Duration::from_millis(200);

/// The largest reply: IPv4 errors stay within 576 bytes (RFC 1812 4.3.2.3),
/// ICMPv6 errors within the IPv6 minimum MTU (RFC 4443 2.4 (c)).
pub(super) const MAX_REPLY: usize = 1280;
const MAX_REPLY_V4: usize = 576;

/// A token bucket: [`BURST`] errors, refilled one per [`REFILL`].
pub(super) struct IcmpLimiter {
    tokens: u32,
    last: Option<Instant>,
}

impl IcmpLimiter {
    pub(super) fn new() -> IcmpLimiter {
        IcmpLimiter {
            tokens: BURST,
            last: None,
        }
    }

    /// Whether one more error may go out at `now`.
    pub(super) fn allow(&mut self, now: Instant) -> bool {
        let last = *self.last.get_or_insert(now);
        let refills = now.saturating_duration_since(last).as_nanos() / REFILL.as_nanos();
        if refills > 0 {
            self.tokens = (u128::from(self.tokens) + refills).min(u128::from(BURST)) as u32;
            self.last = Some(last + REFILL * refills.min(u128::from(u32::MAX)) as u32);
        }
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}

/// Writes into `out` the ICMP error for `packet` (an IP packet no peer
/// takes) and returns its length; `None` for a packet that gets no error:
/// not IP, an ICMP error itself, a later fragment, to or from an address
/// that is not unicast (RFC 1122 3.2.2, RFC 4443 2.4 (e)).
pub(super) fn unreachable(packet: &[u8], out: &mut [u8; MAX_REPLY]) -> Option<usize> {
    match packet.first()? >> 4 {
        4 => unreachable_v4(packet, out),
        6 => unreachable_v6(packet, out),
        _ => None,
    }
}

fn unreachable_v4(packet: &[u8], out: &mut [u8; MAX_REPLY]) -> Option<usize> {
    let header = usize::from(packet.first()? & 0x0f) * 4;
    if header < 20 || packet.len() < header {
        return None;
    }
    let src: [u8; 4] = packet[12..16].try_into().ok()?;
    let dst: [u8; 4] = packet[16..20].try_into().ok()?;
    let (s, d) = (std::net::Ipv4Addr::from(src), std::net::Ipv4Addr::from(dst));
    let not_unicast = |a: std::net::Ipv4Addr| {
        a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback()
    };
    if not_unicast(s) || not_unicast(d) {
        return None;
    }
    let fragment_offset = u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff;
    if fragment_offset != 0 {
        return None;
    }
    // ICMP errors (and packets too short to tell) get none.
    if packet[9] == 1 {
        let icmp_type = *packet.get(header)?;
        if !matches!(icmp_type, 0 | 8 | 13 | 14 | 15 | 16 | 17 | 18) {
            return None;
        }
    }
    let quoted = packet.len().min(MAX_REPLY_V4 - 28);
    let total = 28 + quoted;
    let ip = &mut out[..20];
    ip.copy_from_slice(&[
        0x45, 0, 0, 0, // version, IHL, TOS, total length (below)
        0, 0, 0, 0, // identification, flags, fragment offset
        64, 1, 0, 0, // TTL, ICMP, checksum (below)
        0, 0, 0, 0, 0, 0, 0, 0, // source, destination (below)
    ]);
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[12..16].copy_from_slice(&dst);
    ip[16..20].copy_from_slice(&src);
    let sum = checksum(0, &out[..20]);
    out[10..12].copy_from_slice(&sum.to_be_bytes());
    // Destination unreachable, host unreachable; unused word.
    out[20..28].copy_from_slice(&[3, 1, 0, 0, 0, 0, 0, 0]);
    out[28..total].copy_from_slice(&packet[..quoted]);
    let sum = checksum(0, &out[20..total]);
    out[22..24].copy_from_slice(&sum.to_be_bytes());
    Some(total)
}

/// The IPv4 error for `packet` as its host sends it to `sender`, the
/// source the packet had before the host NATed it (the kernel's
/// `icmp_ndo_send`): the quoted header carries that source, and the
/// error's own source is left zero for the kernel to fill from the route
/// back. `None` as for [`unreachable`].
pub(super) fn unreachable_from_host(
    packet: &[u8],
    sender: std::net::Ipv4Addr,
    out: &mut [u8; MAX_REPLY],
) -> Option<usize> {
    let header = usize::from(packet.first()? & 0x0f) * 4;
    if packet.first()? >> 4 != 4 || header < 20 || packet.len() < header {
        return None;
    }
    let mut quoted = [0u8; MAX_REPLY_V4 - 28];
    let n = packet.len().min(quoted.len());
    quoted[..n].copy_from_slice(&packet[..n]);
    quoted[12..16].copy_from_slice(&sender.octets());
    quoted[10..12].fill(0);
    let sum = checksum(0, &quoted[..header]);
    quoted[10..12].copy_from_slice(&sum.to_be_bytes());
    let total = unreachable_v4(&quoted[..n], out)?;
    out[12..16].fill(0);
    out[10..12].fill(0);
    let sum = checksum(0, &out[..20]);
    out[10..12].copy_from_slice(&sum.to_be_bytes());
    Some(total)
}

fn unreachable_v6(packet: &[u8], out: &mut [u8; MAX_REPLY]) -> Option<usize> {
    if packet.len() < 40 {
        return None;
    }
    let src: [u8; 16] = packet[8..24].try_into().ok()?;
    let dst: [u8; 16] = packet[24..40].try_into().ok()?;
    let (s, d) = (std::net::Ipv6Addr::from(src), std::net::Ipv6Addr::from(dst));
    if s.is_unspecified() || s.is_multicast() || s.is_loopback() {
        return None;
    }
    if d.is_unspecified() || d.is_multicast() || d.is_loopback() {
        return None;
    }
    // An ICMPv6 error (types below 128) right after the fixed header gets
    // none. (Behind extension headers it is not looked for: the kernel
    // walks them; such errors into a WireGuard device are rare, and the
    // rate limit bounds the rest.)
    if packet[6] == 58 && packet.get(40).is_some_and(|t| *t < 128) {
        return None;
    }
    let quoted = packet.len().min(MAX_REPLY - 48);
    let total = 48 + quoted;
    let length = (8 + quoted) as u16;
    out[..8].copy_from_slice(&[0x60, 0, 0, 0, 0, 0, 58, 64]);
    out[4..6].copy_from_slice(&length.to_be_bytes());
    out[8..24].copy_from_slice(&dst);
    out[24..40].copy_from_slice(&src);
    // Destination unreachable, address unreachable; unused word.
    out[40..48].copy_from_slice(&[1, 3, 0, 0, 0, 0, 0, 0]);
    out[48..total].copy_from_slice(&packet[..quoted]);
    // The pseudo-header: source, destination, length, next header.
    let mut pseudo = sum_words(0, &out[8..40]);
    pseudo += u32::from(length) + 58;
    let sum = checksum(pseudo, &out[40..total]);
    out[42..44].copy_from_slice(&sum.to_be_bytes());
    Some(total)
}

/// Adds `bytes` as big-endian 16-bit words to `sum`.
fn sum_words(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut words = bytes.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// The Internet checksum (RFC 1071) of `bytes`, starting from `sum`.
fn checksum(sum: u32, bytes: &[u8]) -> u16 {
    let mut sum = sum_words(sum, bytes);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping_v4() -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 84, 0x12, 0x34, 0x40, 0, 64, 1, 0, 0, 100, 64, 0, 1, 100, 64, 0, 99,
        ];
        let sum = checksum(0, &p);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
        p.resize(84, 0xab);
        p
    }

    fn ping_v6() -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 64, 58, 64];
        p.extend_from_slice(&"fd64::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&"fd64::99".parse::<std::net::Ipv6Addr>().unwrap().octets());
        p.extend_from_slice(&[128, 0, 0, 0, 0, 1, 0, 1]);
        p.resize(104, 0xcd);
        p
    }

    #[test]
    fn host_unreachable_for_ipv4_from_the_destination_with_valid_checksums() {
        let ping = ping_v4();
        let mut out = [0u8; MAX_REPLY];
        let n = unreachable(&ping, &mut out).expect("an error");
        let reply = &out[..n];
        assert_eq!(n, 20 + 8 + 84);
        assert_eq!(u16::from_be_bytes([reply[2], reply[3]]) as usize, n);
        assert_eq!(reply[9], 1, "ICMP");
        assert_eq!(&reply[12..16], &[100, 64, 0, 99], "from the destination");
        assert_eq!(&reply[16..20], &[100, 64, 0, 1], "to the sender");
        assert_eq!(checksum(0, &reply[..20]), 0, "IP checksum");
        assert_eq!((reply[20], reply[21]), (3, 1), "host unreachable");
        assert_eq!(checksum(0, &reply[20..]), 0, "ICMP checksum");
        assert_eq!(&reply[28..], &ping[..]);
    }

    #[test]
    fn address_unreachable_for_ipv6_with_a_valid_checksum() {
        let ping = ping_v6();
        let mut out = [0u8; MAX_REPLY];
        let n = unreachable(&ping, &mut out).expect("an error");
        let reply = &out[..n];
        assert_eq!(n, 40 + 8 + 104);
        assert_eq!(u16::from_be_bytes([reply[4], reply[5]]) as usize, n - 40);
        assert_eq!(reply[6], 58);
        assert_eq!(&reply[8..24], &ping[24..40], "from the destination");
        assert_eq!(&reply[24..40], &ping[8..24], "to the sender");
        assert_eq!((reply[40], reply[41]), (1, 3), "address unreachable");
        let pseudo = sum_words(0, &reply[8..40]) + (n as u32 - 40) + 58;
        assert_eq!(checksum(pseudo, &reply[40..]), 0, "ICMPv6 checksum");
        assert_eq!(&reply[48..], &ping[..]);
    }

    #[test]
    fn long_packets_are_quoted_within_the_limits() {
        let mut big = ping_v4();
        big.resize(1400, 0);
        big[2..4].copy_from_slice(&1400u16.to_be_bytes());
        let mut out = [0u8; MAX_REPLY];
        assert_eq!(unreachable(&big, &mut out), Some(576));
        let mut big6 = ping_v6();
        big6.resize(1400, 0);
        assert_eq!(unreachable(&big6, &mut out), Some(1280));
    }

    #[test]
    fn no_error_for_errors_fragments_or_non_unicast() {
        let mut out = [0u8; MAX_REPLY];
        let mut error = ping_v4();
        error[20] = 3; // an ICMP error itself
        assert_eq!(unreachable(&error, &mut out), None);
        let mut fragment = ping_v4();
        fragment[7] = 8;
        assert_eq!(unreachable(&fragment, &mut out), None);
        let mut multicast = ping_v4();
        multicast[16] = 224;
        assert_eq!(unreachable(&multicast, &mut out), None);
        let mut broadcast = ping_v4();
        broadcast[16..20].copy_from_slice(&[255; 4]);
        assert_eq!(unreachable(&broadcast, &mut out), None);
        let mut error6 = ping_v6();
        error6[40] = 1;
        assert_eq!(unreachable(&error6, &mut out), None);
        let mut multicast6 = ping_v6();
        multicast6[24] = 0xff;
        assert_eq!(unreachable(&multicast6, &mut out), None);
        assert_eq!(unreachable(&[0x45, 0, 0], &mut out), None);
        assert_eq!(unreachable(&[], &mut out), None);
    }

    #[test]
    fn an_error_from_the_host_quotes_the_source_before_nat() {
        let ping = ping_v4();
        let sender = std::net::Ipv4Addr::new(10, 0, 0, 1);
        let mut out = [0u8; MAX_REPLY];
        let n = unreachable_from_host(&ping, sender, &mut out).unwrap();
        let reply = &out[..n];
        assert_eq!(&reply[12..16], &[0; 4], "source left to the kernel");
        assert_eq!(&reply[16..20], &sender.octets());
        assert_eq!(checksum(0, &reply[..20]), 0, "IP checksum");
        assert_eq!(&reply[20..22], &[3, 1]);
        assert_eq!(checksum(0, &reply[20..]), 0, "ICMP checksum");
        let quoted = &reply[28..];
        assert_eq!(&quoted[12..16], &sender.octets());
        assert_eq!(&quoted[16..20], &ping[16..20]);
        assert_eq!(checksum(0, &quoted[..20]), 0, "quoted header's checksum");
        assert_eq!(&quoted[20..], &ping[20..]);
    }

    #[test]
    fn the_limiter_allows_a_burst_then_five_a_second() {
        let mut limiter = IcmpLimiter::new();
        let start = Instant::now();
        let allowed = (0..20).filter(|_| limiter.allow(start)).count();
        assert_eq!(allowed, BURST as usize);
        assert!(!limiter.allow(start + Duration::from_millis(100)));
        assert!(limiter.allow(start + Duration::from_millis(200)));
        assert!(!limiter.allow(start + Duration::from_millis(250)));
        // A long pause refills the burst, not more.
        let later = start + Duration::from_secs(60);
        assert_eq!(
            (0..20).filter(|_| limiter.allow(later)).count(),
            BURST as usize
        );
    }
}
