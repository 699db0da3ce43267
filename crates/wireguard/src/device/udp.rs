//! The device's UDP socket: binding (dual-stack, deep buffers, fwmark,
//! fragmentation allowed) and sending, one datagram or a GSO run.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Duration;

use quinn_udp::{Transmit, UdpSockRef, UdpSocketState};
use tracing::{debug, warn};

use super::{Shared, Udp};

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

impl Udp {
    pub(super) fn bind(port: u16, fwmark: u32) -> io::Result<Udp> {
        use socket2::{Domain, Protocol, Socket, Type};
        let dual = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)).and_then(|s| {
            s.set_only_v6(false)?;
            s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
            Ok(s)
        });
        let (socket, dual_stack) = match dual {
            Ok(s) => (s, true),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(e),
            Err(_) => {
                // No IPv6 in this namespace or kernel.
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())?;
                (s, false)
            }
        };
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
        })
    }

    fn destination(&self, addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            other => other,
        }
    }

    /// Sends one datagram, or several of `segment` bytes (the last may be
    /// shorter) in one GSO call. A full socket buffer waits for room (up to
    /// 50 ms) rather than dropping. A single datagram larger than the path
    /// is fragmented by the kernel; a GSO run whose segments are comes back
    /// as [`SendOutcome::SegmentTooBig`], for the caller to send them one by one.
    pub(super) fn send(
        &self,
        shared: &Shared,
        to: SocketAddr,
        contents: &[u8],
        segment: Option<usize>,
    ) -> SendOutcome {
        let transmit = Transmit {
            destination: self.destination(to),
            ecn: None,
            contents,
            segment_size: segment,
            src_ip: None,
        };
        for _ in 0..2 {
            match self
                .state
                .try_send(UdpSockRef::from(&self.socket), &transmit)
            {
                Ok(()) => return SendOutcome::Handed,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    shared.wait_for(
                        Some(self.socket.as_raw_fd()),
                        libc::POLLOUT,
                        Some(Duration::from_millis(50)),
                    );
                }
                Err(e) if segment.is_some() && e.raw_os_error() == Some(libc::EMSGSIZE) => {
                    return SendOutcome::SegmentTooBig;
                }
                Err(e) => {
                    // Unreachable networks and the like: the datagram is
                    // lost, as on a wire; the protocol's timers recover.
                    debug!(interface = %shared.name, %to, "UDP send: {e}");
                    return SendOutcome::Lost;
                }
            }
        }
        SendOutcome::Lost
    }
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
