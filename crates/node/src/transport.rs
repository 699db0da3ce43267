//! BGP's TCP sockets: listening, connecting from a chosen source address,
//! TTL for directly connected eBGP, GTSM (RFC 5082) and TCP-MD5 (RFC 2385).

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::os::fd::AsRawFd;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

use crate::config::Transport;

/// Opens a listener; IPv6 listeners are IPv6-only so that 0.0.0.0 and ::
/// can both be bound.
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    TcpListener::from_std(socket.into())
}

/// TTL to send with: 255 under GTSM, 1 for directly connected eBGP, else
/// 1 + multihop (iBGP defaults to 64 like the kernel).
fn send_ttl(t: &Transport) -> u32 {
    if t.ttl_security {
        255
    } else if t.multihop > 0 {
        u32::from(t.multihop) + 1
    } else if t.ebgp {
        1
    } else {
        64
    }
}

/// Applies TTL, GTSM and MD5 options to a socket talking to `peer`.
pub fn apply_options(socket: SockRef<'_>, peer: IpAddr, t: &Transport) -> io::Result<()> {
    let ttl = send_ttl(t);
    if peer.is_ipv4() {
        socket.set_ttl_v4(ttl)?;
    } else {
        socket.set_unicast_hops_v6(ttl)?;
    }
    if t.ttl_security {
        let min = 255 - u32::from(t.multihop.max(1)) + 1;
        set_min_ttl(&*socket, peer, min as i32)?;
    }
    if let Some(password) = &t.password {
        set_md5(&*socket, peer, password.as_bytes())?;
    }
    Ok(())
}

/// The kernel's index of interface `name` (a link-local address's scope).
pub fn interface_index(name: &str) -> io::Result<u32> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .map_err(|e| io::Error::new(e.kind(), format!("interface {name}: {e}")))?;
    text.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("interface {name}: ifindex {text:?}"),
        )
    })
}

/// `address` with its scope: the index of `interface` for an IPv6
/// link-local address, unchanged otherwise.
pub fn scoped(address: SocketAddr, interface: Option<&str>) -> io::Result<SocketAddr> {
    match (address, interface) {
        (SocketAddr::V6(v6), Some(name)) if v6.ip().is_unicast_link_local() => Ok(SocketAddr::V6(
            SocketAddrV6::new(*v6.ip(), v6.port(), 0, interface_index(name)?),
        )),
        _ => Ok(address),
    }
}

/// Connects to a neighbour from its configured source address.
pub async fn connect(peer: SocketAddr, t: &Transport) -> io::Result<TcpStream> {
    let peer = scoped(peer, t.interface.as_deref())?;
    let socket = Socket::new(Domain::for_address(peer), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(local) = t.local_address {
        let local = scoped(SocketAddr::new(local, 0), t.interface.as_deref())?;
        socket.bind(&local.into())?;
    }
    apply_options(SockRef::from(&socket), peer.ip(), t)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    socket.connect(peer).await
}

/// Linux's `struct tcp_md5sig` (linux/tcp.h), which libc does not define.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefix_len: u8,
    key_len: u16,
    ifindex: libc::c_int,
    key: [u8; MD5_MAX_KEY_LEN],
}

/// The longest TCP-MD5 key Linux takes (`TCP_MD5SIG_MAXKEYLEN`).
pub const MD5_MAX_KEY_LEN: usize = 80;

/// Sets the TCP-MD5 key for `peer` on a listening or connecting socket.
pub fn set_md5(socket: &impl AsRawFd, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    if key.len() > MD5_MAX_KEY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "TCP-MD5 key longer than 80 bytes",
        ));
    }
    // SAFETY: TcpMd5Sig is plain old data; all-zero is a valid value.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    let addr = socket2::SockAddr::from(SocketAddr::new(peer, 0));
    let len = (addr.len() as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: copies `len` bytes, no more than both the SockAddr's storage
    // and the destination sockaddr_storage hold.
    unsafe {
        std::ptr::copy_nonoverlapping(
            addr.as_ptr() as *const u8,
            &mut sig.addr as *mut _ as *mut u8,
            len,
        );
    }
    sig.key_len = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: setsockopt with a pointer to a live TcpMd5Sig and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            &sig as *const TcpMd5Sig as *const libc::c_void,
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_min_ttl(socket: &impl AsRawFd, peer: IpAddr, min: i32) -> io::Result<()> {
    let (level, name) = if peer.is_ipv4() {
        (libc::IPPROTO_IP, libc::IP_MINTTL)
    } else {
        (libc::IPPROTO_IPV6, libc::IPV6_MINHOPCOUNT)
    };
    // SAFETY: setsockopt with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            &min as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// BFD's UDP port for single-hop control packets (RFC 5881).
pub const BFD_PORT: u16 = 3784;

/// The socket BFD control packets arrive on: port 3784, accepting only
/// TTL/hop limit 255 (RFC 5881 §5: the packet crossed no router).
pub fn bfd_receiver(ipv6: bool) -> io::Result<tokio::net::UdpSocket> {
    let addr: SocketAddr = if ipv6 {
        (std::net::Ipv6Addr::UNSPECIFIED, BFD_PORT).into()
    } else {
        ([0, 0, 0, 0], BFD_PORT).into()
    };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    if ipv6 {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let peer = if ipv6 {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    } else {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    };
    set_min_ttl(&socket, peer, 255)?;
    tokio::net::UdpSocket::from_std(socket.into())
}

/// The socket BFD control packets leave from: a source port in
/// 49152-65535 and TTL/hop limit 255 (RFC 5881 §4, §5).
pub fn bfd_sender(ipv6: bool) -> io::Result<tokio::net::UdpSocket> {
    let mut last = None;
    for port in 49152..49252u16 {
        let addr: SocketAddr = if ipv6 {
            (std::net::Ipv6Addr::UNSPECIFIED, port).into()
        } else {
            ([0, 0, 0, 0], port).into()
        };
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if ipv6 {
            socket.set_only_v6(true)?;
            socket.set_unicast_hops_v6(255)?;
        } else {
            socket.set_ttl_v4(255)?;
        }
        socket.set_nonblocking(true)?;
        match socket.bind(&addr.into()) {
            Ok(()) => return tokio::net::UdpSocket::from_std(socket.into()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no free source port in 49152-49251")))
}
