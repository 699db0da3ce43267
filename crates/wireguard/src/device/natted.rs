//! Packets the host NATed into the device: who really sent them, and the
//! host's own ICMP socket to answer that sender.
//!
//! A router that source-NATs a LAN into the tunnel hands the device packets
//! whose source is its own address. An ICMP error written back into the
//! TUN device for such a packet comes out of the router from the
//! unreachable address, and a sender that takes only its own link's sources
//! drops it. The kernel module (`icmp_ndo_send`) answers from the host
//! instead: it puts the source the packet had before NAT back into the
//! quoted header and sends the error to it from the address routing picks.
//! We do the same from user space: netfilter's connection tracking
//! (ctnetlink, `IPCTNL_MSG_CT_GET` by the reply tuple) says what the
//! source was, and a send-only `IPPROTO_RAW` socket with a zero source
//! lets the kernel pick the address on the route back. The error leaves
//! through the host's output hooks as the kernel's own does, so its NAT
//! translates it the same way.
//!
//! Only the tun → udp thread asks, on the rate-limited path of a packet no
//! peer takes. The netlink socket has a short receive timeout so a kernel
//! that does not answer cannot hold the data path. IPv4 only, as the
//! kernel's: `icmpv6_ndo_send` un-NATs IPv6 the same way, but NAT66 into a
//! tunnel is rare; IPv6 errors keep coming from the unreachable address.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use netlink_sys::Socket;
use socket2::{Domain, Protocol, Type};
use tracing::debug;

use super::routes::set_option;

// linux/netlink.h
const NETLINK_NETFILTER: isize = 12;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
// linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
// linux/netfilter/nf_conntrack_common.h
const IPS_SRC_NAT: u32 = 1 << 4;

/// How long the data path waits for connection tracking's answer.
const ANSWER_WITHIN: Duration = Duration::from_millis(50);

/// The lookup key: `packet`'s reply tuple as connection tracking holds it
/// after NAT (the packet's destination back to its source, ports swapped,
/// an ICMP query's reply type). `None` for what has no such tuple here:
/// not IPv4, a fragment, a protocol other than TCP, UDP, UDP-Lite, SCTP,
/// DCCP or ICMP queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ReplyTuple {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    ports: Ports,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ports {
    Transport { src: u16, dst: u16 },
    Icmp { id: u16, kind: u8 },
}

fn reply_tuple(packet: &[u8]) -> Option<ReplyTuple> {
    if packet.first()? >> 4 != 4 {
        return None;
    }
    let header = usize::from(packet[0] & 0x0f) * 4;
    if header < 20 || packet.len() < header + 8 {
        return None;
    }
    // A later fragment carries no ports; a first one does.
    if u16::from_be_bytes([packet[6], packet[7]]) & 0x1fff != 0 {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let l4 = &packet[header..];
    let protocol = packet[9];
    let ports = match protocol {
        6 | 17 | 33 | 132 | 136 => Ports::Transport {
            src: u16::from_be_bytes([l4[2], l4[3]]),
            dst: u16::from_be_bytes([l4[0], l4[1]]),
        },
        1 => {
            // Queries only: echo, timestamp, information, address mask.
            let kind = match l4[0] {
                8 => 0,
                13 => 14,
                15 => 16,
                17 => 18,
                _ => return None,
            };
            Ports::Icmp {
                id: u16::from_be_bytes([l4[4], l4[5]]),
                kind,
            }
        }
        _ => return None,
    };
    Some(ReplyTuple {
        src: dst,
        dst: src,
        protocol,
        ports,
    })
}

/// A netlink attribute: header, payload, padding to 4 bytes.
fn put_attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// A nested attribute holding what `inner` writes.
fn put_nested(out: &mut Vec<u8>, kind: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    inner(out);
    let len = (out.len() - start) as u16;
    out[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    out[start + 2..start + 4].copy_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
}

/// The ctnetlink request for the connection whose reply tuple is `tuple`.
fn get_request(tuple: &ReplyTuple, seq: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(96);
    out.extend_from_slice(&[0; 4]); // length, below
    out.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    out.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    // nfgenmsg: family, version 0, resource id 0.
    out.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
    put_nested(&mut out, CTA_TUPLE_REPLY, |out| {
        put_nested(out, CTA_TUPLE_IP, |out| {
            put_attr(out, CTA_IP_V4_SRC, &tuple.src.octets());
            put_attr(out, CTA_IP_V4_DST, &tuple.dst.octets());
        });
        put_nested(out, CTA_TUPLE_PROTO, |out| {
            put_attr(out, CTA_PROTO_NUM, &[tuple.protocol]);
            match tuple.ports {
                Ports::Transport { src, dst } => {
                    put_attr(out, CTA_PROTO_SRC_PORT, &src.to_be_bytes());
                    put_attr(out, CTA_PROTO_DST_PORT, &dst.to_be_bytes());
                }
                Ports::Icmp { id, kind } => {
                    put_attr(out, CTA_PROTO_ICMP_ID, &id.to_be_bytes());
                    put_attr(out, CTA_PROTO_ICMP_TYPE, &[kind]);
                    put_attr(out, CTA_PROTO_ICMP_CODE, &[0]);
                }
            }
        });
    });
    let len = out.len() as u32;
    out[..4].copy_from_slice(&len.to_ne_bytes());
    out
}

/// The attributes in `bytes`, as (type without flags, payload).
fn attrs(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes(bytes.get(..2)?.try_into().ok()?));
        let kind = u16::from_ne_bytes(bytes.get(2..4)?.try_into().ok()?) & 0x3fff;
        let payload = bytes.get(4..len)?;
        bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or(&[]);
        Some((kind, payload))
    })
}

fn find(bytes: &[u8], kind: u16) -> Option<&[u8]> {
    attrs(bytes).find(|(k, _)| *k == kind).map(|(_, p)| p)
}

/// From ctnetlink's answer to request `seq`: the original source of a
/// connection its host source-NATed; `None` for any other answer (an
/// error such as no such connection, or a connection not source-NATed).
fn source_before_nat(answer: &[u8], seq: u32) -> Option<Ipv4Addr> {
    let mut rest = answer;
    while rest.len() >= 16 {
        let len = u32::from_ne_bytes(rest[..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(rest[4..6].try_into().ok()?);
        let msg_seq = u32::from_ne_bytes(rest[8..12].try_into().ok()?);
        let message = rest.get(..len.max(16))?;
        rest = rest.get(len.max(16).next_multiple_of(4)..).unwrap_or(&[]);
        if msg_seq != seq || kind == NLMSG_ERROR {
            if kind == NLMSG_ERROR && msg_seq == seq {
                return None;
            }
            continue;
        }
        if kind != (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW {
            continue;
        }
        let body = message.get(20..)?;
        let status = u32::from_be_bytes(find(body, CTA_STATUS)?.try_into().ok()?);
        if status & IPS_SRC_NAT == 0 {
            return None;
        }
        let ip = find(find(body, CTA_TUPLE_ORIG)?, CTA_TUPLE_IP)?;
        let src: [u8; 4] = find(ip, CTA_IP_V4_SRC)?.try_into().ok()?;
        return Some(Ipv4Addr::from(src));
    }
    None
}

/// The device's connection-tracking lookups and ICMP socket, opened on
/// first use. One per tun → udp thread.
pub(super) struct Natted {
    ctnetlink: Option<Socket>,
    raw: Option<socket2::Socket>,
    seq: u32,
    answer: Vec<u8>,
}

impl Natted {
    pub(super) fn new() -> Natted {
        Natted {
            ctnetlink: None,
            raw: None,
            seq: 0,
            answer: vec![0; 8192],
        }
    }

    /// The source `packet` (IPv4, read from the TUN device) had before its
    /// host source-NATed it; `None` when it was not, or when connection
    /// tracking cannot be asked (no module, no permission, no answer).
    pub(super) fn original_source(&mut self, packet: &[u8]) -> Option<Ipv4Addr> {
        let tuple = reply_tuple(packet)?;
        match self.ask(&tuple) {
            Ok(source) => source,
            Err(e) => {
                debug!("connection tracking not asked: {e}");
                self.ctnetlink = None;
                None
            }
        }
    }

    fn ask(&mut self, tuple: &ReplyTuple) -> io::Result<Option<Ipv4Addr>> {
        if self.ctnetlink.is_none() {
            let mut socket = Socket::new(NETLINK_NETFILTER)?;
            socket.bind_auto()?;
            socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: ANSWER_WITHIN.as_micros() as libc::suseconds_t,
            };
            set_option(&socket, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)?;
            self.ctnetlink = Some(socket);
        }
        let Some(socket) = self.ctnetlink.as_ref() else {
            return Ok(None);
        };
        self.seq = self.seq.wrapping_add(1);
        socket.send(&get_request(tuple, self.seq), 0)?;
        // Answers to earlier requests that timed out may still be queued:
        // read until ours (or the timeout).
        loop {
            let n = socket.recv(&mut &mut self.answer[..], 0)?;
            let answer = &self.answer[..n];
            if answer.len() >= 12 && answer[8..12] == self.seq.to_ne_bytes() {
                return Ok(source_before_nat(answer, self.seq));
            }
        }
    }

    /// Sends `error` (an IPv4 ICMP error with a zero source, for the kernel
    /// to fill) to `to` from the host.
    pub(super) fn send(&mut self, error: &[u8], to: Ipv4Addr) -> io::Result<()> {
        if self.raw.is_none() {
            // IPPROTO_RAW: send only (nothing is ever queued to read), the
            // IP header ours.
            let raw = socket2::Socket::new(
                Domain::IPV4,
                Type::RAW,
                Some(Protocol::from(libc::IPPROTO_RAW)),
            )?;
            raw.set_nonblocking(true)?;
            self.raw = Some(raw);
        }
        let Some(raw) = self.raw.as_ref() else {
            return Ok(());
        };
        raw.send_to(error, &SocketAddrV4::new(to, 0).into())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(protocol: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, protocol, 0, 0, 192, 168, 241, 2, 192, 168, 241, 1,
        ];
        p.extend_from_slice(l4);
        p
    }

    #[test]
    fn the_reply_tuple_swaps_addresses_and_ports() {
        let udp = packet(17, &[0x30, 0x39, 0x00, 0x35, 0, 8, 0, 0]);
        assert_eq!(
            reply_tuple(&udp),
            Some(ReplyTuple {
                src: Ipv4Addr::new(192, 168, 241, 1),
                dst: Ipv4Addr::new(192, 168, 241, 2),
                protocol: 17,
                ports: Ports::Transport {
                    src: 53,
                    dst: 12345
                },
            })
        );
        let ping = packet(1, &[8, 0, 0, 0, 0x12, 0x34, 0, 1]);
        assert_eq!(
            reply_tuple(&ping).map(|t| t.ports),
            Some(Ports::Icmp {
                id: 0x1234,
                kind: 0
            })
        );
    }

    #[test]
    fn what_has_no_reply_tuple_is_not_asked_about() {
        // An ICMP error, GRE, a later fragment, IPv6, a truncated header.
        assert_eq!(reply_tuple(&packet(1, &[3, 1, 0, 0, 0, 0, 0, 0])), None);
        assert_eq!(reply_tuple(&packet(47, &[0; 8])), None);
        let mut fragment = packet(17, &[0; 8]);
        fragment[7] = 1;
        assert_eq!(reply_tuple(&fragment), None);
        assert_eq!(reply_tuple(&[0x60; 48]), None);
        assert_eq!(reply_tuple(&packet(17, &[0; 4])), None);
    }

    /// ctnetlink's answer, as the kernel writes it: the message header,
    /// nfgenmsg, the original tuple, the reply tuple, the status.
    fn answer(seq: u32, status: u32) -> Vec<u8> {
        let mut out = vec![0; 4];
        out.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW).to_ne_bytes());
        out.extend_from_slice(&0u16.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(&[2, 0, 0, 0]);
        for (kind, src, dst) in [
            (CTA_TUPLE_ORIG, [10, 0, 0, 1], [192, 168, 241, 1]),
            (CTA_TUPLE_REPLY, [192, 168, 241, 1], [192, 168, 241, 2]),
        ] {
            put_nested(&mut out, kind, |out| {
                put_nested(out, CTA_TUPLE_IP, |out| {
                    put_attr(out, CTA_IP_V4_SRC, &src);
                    put_attr(out, CTA_IP_V4_DST, &dst);
                });
                put_nested(out, CTA_TUPLE_PROTO, |out| {
                    put_attr(out, CTA_PROTO_NUM, &[1]);
                });
            });
        }
        put_attr(&mut out, CTA_STATUS, &status.to_be_bytes());
        let len = out.len() as u32;
        out[..4].copy_from_slice(&len.to_ne_bytes());
        out
    }

    #[test]
    fn the_original_source_of_a_source_natted_connection() {
        let seen = 0x18a; // seen reply, assured, confirmed, source NAT done
        assert_eq!(
            source_before_nat(&answer(7, seen | IPS_SRC_NAT), 7),
            Some(Ipv4Addr::new(10, 0, 0, 1))
        );
        // Not source-NATed, another request's answer, an error.
        assert_eq!(source_before_nat(&answer(7, seen), 7), None);
        assert_eq!(source_before_nat(&answer(6, seen | IPS_SRC_NAT), 7), None);
        let mut error = vec![36, 0, 0, 0];
        error.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        error.extend_from_slice(&[0, 0]);
        error.extend_from_slice(&7u32.to_ne_bytes());
        error.extend_from_slice(&[0; 24]);
        assert_eq!(source_before_nat(&error, 7), None);
        // Truncated anywhere: no panic, no answer.
        let whole = answer(7, seen | IPS_SRC_NAT);
        for cut in 0..whole.len() {
            let _ = source_before_nat(&whole[..cut], 7);
        }
    }

    #[test]
    fn the_request_nests_the_reply_tuple() {
        let tuple = reply_tuple(&packet(1, &[8, 0, 0, 0, 0x12, 0x34, 0, 1])).unwrap();
        let request = get_request(&tuple, 9);
        assert_eq!(
            request.len() as u32,
            u32::from_ne_bytes(request[..4].try_into().unwrap())
        );
        let reply = find(&request[20..], CTA_TUPLE_REPLY).unwrap();
        let ip = find(reply, CTA_TUPLE_IP).unwrap();
        assert_eq!(find(ip, CTA_IP_V4_SRC), Some(&[192, 168, 241, 1][..]));
        let proto = find(reply, CTA_TUPLE_PROTO).unwrap();
        assert_eq!(find(proto, CTA_PROTO_ICMP_TYPE), Some(&[0][..]));
        assert_eq!(find(proto, CTA_PROTO_ICMP_ID), Some(&[0x12, 0x34][..]));
    }
}
