//! The device's UDP socket: binding (dual-stack, deep buffers, fwmark,
//! fragmentation allowed) and sending, one datagram or a GSO run.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use quinn_udp::{UdpSockRef, UdpSocketState};
use tracing::{debug, info, warn};

use super::{Peer, Shared, Udp};

/// What became of a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SendOutcome {
    /// Handed to the kernel.
    Handed,
    /// A GSO send refused because its segments are larger than the path
    /// allows (EMSGSIZE): the kernel fragments single datagrams, never GSO
    /// segments. Nothing of it was sent.
    SegmentTooBig,
    /// Lost (unreachable network and the like), as on a wire.
    Lost,
}

/// A UDP socket on `port` of every address: dual-stack `[::]` with IPv4
/// mapped in, or IPv4 alone where the namespace or kernel has no IPv6
/// (the second value says which). A port in use is an error, not a
/// fallback to IPv4. Blocking, as made: the caller sets what it needs.
pub fn bind_udp_any(port: u16) -> io::Result<(socket2::Socket, bool)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let dual = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|s| {
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
        Ok(s)
    });
    match dual {
        Ok(s) => Ok((s, true)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(e),
        Err(_) => {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
            Ok((s, false))
        }
    }
}

impl Udp {
    pub(super) fn bind(port: u16, fwmark: u32) -> io::Result<Udp> {
        let (socket, dual_stack) = bind_udp_any(port)?;
        socket.set_nonblocking(true)?;
        socket.set_cloexec(true)?;
        if fwmark != 0 {
            socket.set_mark(fwmark)?;
        }
        // Deep buffers absorb bursts while a thread is busy encrypting.
        // The FORCE variants pass the sysctl caps; without CAP_NET_ADMIN
        // the plain ones apply.
        for (force, plain) in [
            (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
            (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        ] {
            let size: libc::c_int = 7 << 20;
            if set_int_option(&socket, libc::SOL_SOCKET, force, size).is_err() {
                let _ = set_int_option(&socket, libc::SOL_SOCKET, plain, size);
            }
        }
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        // quinn-udp forbids fragmentation (IP_PMTUDISC_PROBE: QUIC finds
        // the path MTU itself), so a datagram larger than the path failed
        // with EMSGSIZE. A WireGuard device must let the kernel fragment
        // instead, as the kernel module does (its outer IPv4 header has no
        // DF bit) and wireguard-go does (the system's default): a 1420
        // device over a smaller path (PPPoE, tunnels in tunnels) still
        // carries full-size packets. After UdpSocketState::new, which set
        // the options this overrides.
        //
        // On IPv6 that takes IPV6_DONTFRAG off as well: quinn-udp turns it
        // on, and with it the kernel refuses (EMSGSIZE) every datagram
        // larger than the route's MTU whatever IPV6_MTU_DISCOVER says
        // (`__ip6_append_data`). An IPv6 endpoint behind a smaller link, or
        // inside another WireGuard tunnel (its 1420 leaves 1340 to the
        // inner device), then got no full-size packet through.
        let mut options = vec![(
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        )];
        if dual_stack {
            options.push((
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_DONT,
            ));
            options.push((libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0));
        }
        for (level, name, value) in options {
            if let Err(e) = set_int_option(&socket, level, name, value) {
                warn!("UDP socket: cannot allow fragmentation (option {name}): {e}");
            }
        }
        let port = socket
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .ok_or_else(|| io::Error::other("UDP socket has no IP address"))?;
        Ok(Udp {
            socket,
            state,
            port,
            dual_stack,
            gso_off: AtomicBool::new(false),
        })
    }

    pub(super) fn destination(&self, addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            other => other,
        }
    }

    /// The largest number of datagrams one GSO send may carry.
    pub(super) fn max_segments(&self) -> usize {
        if self.gso_off.load(Ordering::Relaxed) {
            1
        } else {
            self.state.max_gso_segments()
        }
    }

    /// Sends one datagram, or several of `segment` bytes (the last may be
    /// shorter) in one GSO call, from `target.src` when it has one. A full
    /// socket buffer waits for room (up to 50 ms) rather than dropping. A
    /// single datagram larger than the path is fragmented by the kernel; a
    /// GSO run whose segments are comes back as
    /// [`SendOutcome::SegmentTooBig`], for the caller to send them one by one.
    ///
    /// A source address the kernel refuses (EINVAL, EADDRNOTAVAIL,
    /// ENETUNREACH: it was removed from this host) is left out and the datagrams go again
    /// with the source the kernel picks; `peer`'s source is then forgotten
    /// ([`Peer::source_refused`]), until its next packet teaches a new one.
    ///
    /// What the kernel took counts in `peer`'s `tx_bytes` (every datagram
    /// of a GSO run, whole, headers included), as the kernel module and
    /// wireguard-go count: what went out on the wire for the peer, whatever
    /// it was (handshake, keepalive, data), and nothing the kernel refused.
    /// A cookie reply is sent for no peer and counts nowhere, as theirs.
    pub(super) fn send(
        &self,
        shared: &Shared,
        target: Target,
        peer: Option<&Peer>,
        contents: &[u8],
        segment: Option<usize>,
    ) -> SendOutcome {
        let mut src = target.src;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match self.sendmsg(target.to, src, contents, segment) {
                Ok(()) => {
                    if let Some(peer) = peer {
                        peer.tx_bytes
                            .fetch_add(contents.len() as u64, Ordering::Relaxed);
                    }
                    return SendOutcome::Handed;
                }
                Err(e) => e,
            };
            match error.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if attempts < 3 => {
                    shared.wait_for(
                        Some(self.socket.as_raw_fd()),
                        libc::POLLOUT,
                        Some(Duration::from_millis(50)),
                    );
                }
                // A source that is no longer ours: EINVAL from the IPv6
                // and pktinfo checks, ENETUNREACH from the IPv4 route
                // lookup, EADDRNOTAVAIL from some paths.
                Some(libc::EINVAL | libc::EADDRNOTAVAIL | libc::ENETUNREACH) if src.is_some() => {
                    debug!(interface = %shared.name, to = %target.to, from = ?src,
                        "UDP send: source refused ({error}); the kernel chooses one");
                    if let Some(peer) = peer {
                        peer.source_refused.store(true, Ordering::Relaxed);
                    }
                    src = None;
                }
                Some(libc::EMSGSIZE) if segment.is_some() => return SendOutcome::SegmentTooBig,
                Some(libc::EINVAL | libc::EIO) if segment.is_some() => {
                    // The device under the route cannot segment (some
                    // drivers say so only by refusing): no more GSO on
                    // this socket, and this run goes one datagram at a time.
                    if !self.gso_off.swap(true, Ordering::Relaxed) {
                        info!(interface = %shared.name, "UDP GSO refused ({error}); sending datagrams one by one");
                    }
                    let size = segment.unwrap_or(contents.len()).max(1);
                    for datagram in contents.chunks(size) {
                        self.send(shared, Target { to: target.to, src }, peer, datagram, None);
                    }
                    return SendOutcome::Handed;
                }
                _ => {
                    // Unreachable networks and the like: the datagram is
                    // lost, as on a wire; the protocol's timers recover.
                    debug!(interface = %shared.name, to = %target.to, "UDP send: {error}");
                    return SendOutcome::Lost;
                }
            }
            if attempts >= 4 {
                return SendOutcome::Lost;
            }
        }
    }

    /// One `sendmsg`: the datagram(s) to `to`, a UDP_SEGMENT size for a GSO
    /// run, and IP_PKTINFO / IPV6_PKTINFO for the source. No allocation:
    /// the control messages are built on the stack.
    fn sendmsg(
        &self,
        to: SocketAddr,
        src: Option<Source>,
        contents: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let destination = socket2::SockAddr::from(self.destination(to));
        let pktinfo = src.and_then(|src| src.pktinfo(&destination, self.dual_stack));
        let mut iov = libc::iovec {
            iov_base: contents.as_ptr() as *mut libc::c_void,
            iov_len: contents.len(),
        };
        let mut control = Control([0; CONTROL_LEN]);
        // SAFETY: an all-zero msghdr is a valid empty one (null pointers,
        // zero lengths); the fields are set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = destination.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = destination.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = CONTROL_LEN as _;
        let mut used = 0usize;
        // SAFETY: `control` is CONTROL_LEN bytes, aligned for cmsghdr and
        // large enough for the two messages written (CONTROL_LEN is the sum
        // of their CMSG_SPACE); CMSG_FIRSTHDR / CMSG_NXTHDR stay within
        // msg_controllen and return null past it, which is checked; the
        // data is written unaligned.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            if let Some(size) = segment
                && !cmsg.is_null()
            {
                (*cmsg).cmsg_level = libc::SOL_UDP;
                (*cmsg).cmsg_type = libc::UDP_SEGMENT;
                (*cmsg).cmsg_len = libc::CMSG_LEN(2) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), size as u16);
                used += libc::CMSG_SPACE(2) as usize;
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
            match pktinfo {
                Some(PktInfo::V4(info)) if !cmsg.is_null() => {
                    (*cmsg).cmsg_level = libc::IPPROTO_IP;
                    (*cmsg).cmsg_type = libc::IP_PKTINFO;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in_pktinfo>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
                    used += libc::CMSG_SPACE(size_of::<libc::in_pktinfo>() as u32) as usize;
                }
                Some(PktInfo::V6(info)) if !cmsg.is_null() => {
                    (*cmsg).cmsg_level = libc::IPPROTO_IPV6;
                    (*cmsg).cmsg_type = libc::IPV6_PKTINFO;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::in6_pktinfo>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast(), info);
                    used += libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) as usize;
                }
                _ => {}
            }
        }
        msg.msg_controllen = used as _;
        if used == 0 {
            msg.msg_control = std::ptr::null_mut();
        }
        // SAFETY: `msg` points at the destination address, one iovec over
        // `contents` and `used` bytes of control messages, all alive for
        // the call; sendmsg only reads them.
        let sent = unsafe { libc::sendmsg(self.socket.as_raw_fd(), &msg, 0) };
        if sent < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Room for the control messages of one send: UDP_SEGMENT and the larger
/// of the two pktinfo structures.
const CONTROL_LEN: usize = 64;

#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

// Both messages fit: 16 + 8 for UDP_SEGMENT, 16 + 24 for IPV6_PKTINFO.
const _: () = assert!(
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    unsafe {
        libc::CMSG_SPACE(2) as usize
            + libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as u32) as usize
    } <= CONTROL_LEN
);

/// Where a datagram goes and, when known, the local address to send it
/// from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Target {
    pub(super) to: SocketAddr,
    pub(super) src: Option<Source>,
}

/// The local address a peer's packet came to (IP_PKTINFO /
/// IPV6_PKTINFO), and the interface it came in on: the source of what we
/// send back, as the kernel module and wireguard-go do. A host with
/// several addresses on the way (a VIP on the WireGuard interface behind a
/// router's port forward, a second address on the uplink) must answer from
/// the one the peer sent to, or its NAT sees a different flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Source {
    ip: IpAddr,
    /// Put on the send only for an IPv6 link-local source, which needs its
    /// scope; otherwise the kernel routes as usual from the address. The
    /// timer thread forgets an IPv4 source whose route leaves by another
    /// interface than this one (`routes`).
    ifindex: u32,
}

enum PktInfo {
    V4(libc::in_pktinfo),
    V6(libc::in6_pktinfo),
}

impl Source {
    /// The address, as the peer sent to it (IPv4 as IPv4).
    pub(super) fn ip(&self) -> IpAddr {
        self.ip.to_canonical()
    }

    /// The interface the peer's packet came in on (0: unknown).
    pub(super) fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// From a received datagram's metadata; `None` for an address one
    /// cannot send from (multicast, broadcast, unspecified).
    pub(super) fn received(dst: Option<IpAddr>, ifindex: Option<u32>) -> Option<Source> {
        let ip = dst?;
        let usable = match ip {
            IpAddr::V4(v4) => usable_v4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => usable_v4(v4),
                None => !(v6.is_unspecified() || v6.is_multicast()),
            },
        };
        usable.then_some(Source {
            ip,
            ifindex: ifindex.unwrap_or(0),
        })
    }

    /// The control message for a send to `destination` (as the socket
    /// sees it), or `None` when the families do not match.
    fn pktinfo(self, destination: &socket2::SockAddr, dual_stack: bool) -> Option<PktInfo> {
        let v4 = match self.ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        };
        match destination.as_socket()? {
            SocketAddr::V4(_) => Some(PktInfo::V4(libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4?.octets()),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            })),
            SocketAddr::V6(to) if dual_stack && to.ip().to_ipv4_mapped().is_some() => {
                // An IPv4 destination on the dual-stack socket: the kernel
                // takes IPV6_PKTINFO with a mapped IPv4 source.
                Some(PktInfo::V6(libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v4?.to_ipv6_mapped().octets(),
                    },
                    ipi6_ifindex: 0,
                }))
            }
            SocketAddr::V6(_) => {
                let IpAddr::V6(v6) = self.ip else { return None };
                if v4.is_some() {
                    return None;
                }
                let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
                Some(PktInfo::V6(libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: v6.octets(),
                    },
                    ipi6_ifindex: if link_local { self.ifindex } else { 0 },
                }))
            }
        }
    }
}

fn usable_v4(v4: Ipv4Addr) -> bool {
    !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast())
}

fn set_int_option(
    socket: &socket2::Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a local c_int and its size, as
    // setsockopt expects for these integer options.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
