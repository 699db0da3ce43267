//! The relay's forwarder (`[mesh] relay = true`): a public node forwards
//! the WireGuard datagrams of two nodes behind NAT between the two sides
//! of their channel, without their keys (the wire format and the
//! credentials are in [`bgp4mesh_api::relay`]).
//!
//! One thread owns the UDP socket and the channel table. It receives in
//! batches (recvmmsg, and GRO: one buffer may hold a run of datagrams of
//! one sender) and forwards runs of datagrams that go to one address as
//! one GSO send, so that the relayed path costs a few system calls per
//! run rather than two per datagram.
//!
//! A bind costs an HMAC: binds are rate-limited per source (an IPv6 source
//! per /64) and in total before the MAC is checked. Data is checked only
//! against the address its side bound from (the throughput path); nothing
//! else is looked up for a datagram from anywhere else.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bgp4mesh_api::rate::SourceLimiter;
use bgp4mesh_api::relay::{self, Channel, RelayKey};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use quinn_udp::{EcnCodepoint, RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use serde::Serialize;
use socket2::Socket;
use tracing::{debug, info, trace, warn};

/// A side not heard from (no bind, no data) for this long is forgotten.
const IDLE: Duration = Duration::from_secs(30);
/// The most channels a relay keeps; binds for new ones beyond are refused.
const MAX_CHANNELS: usize = 65536;
/// Binds per second one source (an IPv4 address, an IPv6 /64) may send,
/// and how many it may send at once.
const BIND_RATE: f64 = 50.0;
const BIND_BURST: f64 = 100.0;
/// Binds per second from everywhere together (each costs an HMAC).
const GLOBAL_BIND_RATE: f64 = 20_000.0;
const GLOBAL_BIND_BURST: f64 = 20_000.0;
/// How long the thread waits for a datagram before it looks at `stop`,
/// a new key and idle sides.
const POLL: Duration = Duration::from_millis(100);
/// Each receive buffer: room for a GRO run.
const BUFFER: usize = 64 * 1024;
/// The largest UDP payload one send may carry: an IPv4 packet's (a GRO
/// run received over IPv6 may be longer, and go out over IPv4).
const MAX_SEND: usize = 65_535 - 20 - 8;
/// How long a send waits for room in a full socket buffer, and how often.
const SEND_WAIT: Duration = Duration::from_millis(10);
const SEND_TRIES: usize = 3;
/// Socket buffers: deep, to absorb bursts.
const SOCKET_BUFFER: usize = 7 << 20;
/// Drops are summarised in the log at most this often.
const SUMMARY: Duration = Duration::from_secs(60);

/// What the relay did since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RelayStats {
    /// Channels with at least one side bound.
    pub channels: u64,
    /// Valid binds answered.
    pub binds: u64,
    /// Datagrams and bytes (relay header included) forwarded.
    pub forwarded_datagrams: u64,
    pub forwarded_bytes: u64,
    pub dropped: RelayDrops,
}

/// Datagrams the relay dropped, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RelayDrops {
    /// Binds with a bad MAC, an expired credential, or while the relay
    /// has no key.
    pub unauthenticated: u64,
    /// Data for a channel or side not bound, from another address than
    /// the side's bound one, or whose other side is not bound.
    pub unbound: u64,
    /// Longer than [`relay::MAX_DATAGRAM`].
    pub oversized: u64,
    /// No relay bind or data.
    pub malformed: u64,
    /// Binds over the per-source or the global rate.
    pub rate_limited: u64,
    /// Binds for a new channel while the relay holds the most it keeps.
    pub channels_full: u64,
    /// Datagrams the kernel did not take (socket buffer full for too long,
    /// no route, too large for the path).
    pub send_failed: u64,
}

impl RelayDrops {
    fn total(&self) -> u64 {
        self.unauthenticated
            + self.unbound
            + self.oversized
            + self.malformed
            + self.rate_limited
            + self.channels_full
            + self.send_failed
    }
}

/// The relay's forwarder: a UDP port and the thread that serves it.
pub struct RelayServer {
    shared: Arc<Shared>,
    port: u16,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the thread and the owner share.
#[derive(Default)]
struct Shared {
    stopping: AtomicBool,
    /// The key and how often it changed; the thread compares the count
    /// with its own on every batch.
    key: Mutex<(Option<RelayKey>, u64)>,
    key_generation: AtomicU64,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    channels: AtomicU64,
    binds: AtomicU64,
    forwarded_datagrams: AtomicU64,
    forwarded_bytes: AtomicU64,
    unauthenticated: AtomicU64,
    unbound: AtomicU64,
    oversized: AtomicU64,
    malformed: AtomicU64,
    rate_limited: AtomicU64,
    channels_full: AtomicU64,
    send_failed: AtomicU64,
}

fn count(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    fn stats(&self) -> RelayStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RelayStats {
            channels: get(&self.channels),
            binds: get(&self.binds),
            forwarded_datagrams: get(&self.forwarded_datagrams),
            forwarded_bytes: get(&self.forwarded_bytes),
            dropped: RelayDrops {
                unauthenticated: get(&self.unauthenticated),
                unbound: get(&self.unbound),
                oversized: get(&self.oversized),
                malformed: get(&self.malformed),
                rate_limited: get(&self.rate_limited),
                channels_full: get(&self.channels_full),
                send_failed: get(&self.send_failed),
            },
        }
    }
}

/// Limits, changed by tests only.
#[derive(Debug, Clone, Copy)]
struct Limits {
    idle: Duration,
    max_channels: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            idle: IDLE,
            max_channels: MAX_CHANNELS,
        }
    }
}

impl RelayServer {
    /// Binds UDP `port` (0: one the kernel picks) on all addresses
    /// (dual-stack `[::]` with IPv4 mapped; IPv4 only if there is no IPv6)
    /// and starts the thread that serves it. It refuses every bind until
    /// [`RelayServer::set_key`] gives it a key.
    pub fn start(port: u16) -> io::Result<RelayServer> {
        RelayServer::start_with(port, Limits::default())
    }

    fn start_with(port: u16, limits: Limits) -> io::Result<RelayServer> {
        let udp = Udp::bind(port)?;
        let port = udp.port;
        let shared = Arc::new(Shared::default());
        let forwarder = Forwarder::new(udp, Arc::clone(&shared), limits);
        let thread = std::thread::Builder::new()
            .name("relay".into())
            .spawn(move || forwarder.run())?;
        info!(port, "relay listening");
        Ok(RelayServer {
            shared,
            port,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The relay key (from the controller); `None` refuses every bind. A
    /// different key drops every channel: they were bound under the old
    /// one, and their data is no longer forwarded.
    pub fn set_key(&self, key: Option<RelayKey>) {
        let Ok(mut current) = self.shared.key.lock() else {
            return;
        };
        if current.0 == key {
            return;
        }
        current.0 = key;
        current.1 += 1;
        self.shared
            .key_generation
            .store(current.1, Ordering::Release);
    }

    /// What the relay did since it started.
    pub fn stats(&self) -> RelayStats {
        self.shared.counters.stats()
    }

    /// The UDP port the relay serves.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the thread (within [`POLL`], 100 ms) and closes the port.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread
            && thread.join().is_err()
        {
            warn!(port = self.port, "relay thread panicked");
        }
    }
}

impl Drop for RelayServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The relay's socket.
struct Udp {
    socket: Socket,
    state: UdpSocketState,
    port: u16,
    dual_stack: bool,
}

impl Udp {
    fn bind(port: u16) -> io::Result<Udp> {
        let (socket, dual_stack) = bgp4mesh_wireguard::bind_udp_any(port)?;
        socket.set_nonblocking(true)?;
        socket.set_cloexec(true)?;
        // Deep buffers absorb bursts while the thread is busy. The FORCE
        // variants pass the sysctl caps; without CAP_NET_ADMIN the plain
        // ones apply.
        use nix::sys::socket::{setsockopt, sockopt};
        if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
            let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        }
        if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
            let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        }
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
        // quinn-udp sets IPV6_DONTFRAG, with which the kernel refuses every
        // IPv6 datagram larger than the route's MTU: a relayed datagram is
        // 16 bytes longer than the WireGuard one, which may just fit. Let
        // the kernel fragment it instead. (IPv4 keeps quinn-udp's
        // IP_PMTUDISC_PROBE: no safe API sets it back.)
        if dual_stack && let Err(e) = setsockopt(&socket, sockopt::Ipv6DontFrag, &false) {
            warn!("relay socket: cannot allow IPv6 fragmentation: {e}");
        }
        let port = socket
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .ok_or_else(|| io::Error::other("relay socket has no IP address"))?;
        Ok(Udp {
            socket,
            state,
            port,
            dual_stack,
        })
    }

    /// `addr` as this socket sends to it (IPv4 mapped on a dual-stack one).
    fn destination(&self, addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V4(v4) if self.dual_stack => {
                SocketAddr::new(IpAddr::V6(v4.ip().to_ipv6_mapped()), v4.port())
            }
            other => other,
        }
    }

    /// Waits until the socket is readable (or writable), at most `timeout`.
    fn wait(&self, flags: PollFlags, timeout: Duration) {
        let millis = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.socket.as_fd(), flags)];
        let _ = poll(&mut fds, PollTimeout::from(millis));
    }

    /// Sends `contents` (one datagram, or a run of `segment`-byte ones, the
    /// last possibly shorter) to `to` from `src`. Returns whether the
    /// kernel took it. A run the kernel cannot segment (too large for the
    /// path, a device without GSO) goes again one datagram at a time.
    fn send(&self, out: &Target, contents: &[u8], segment: Option<usize>) -> bool {
        let mut src = out.src;
        let mut tries = 0;
        loop {
            tries += 1;
            let transmit = Transmit {
                destination: self.destination(out.to),
                ecn: out.ecn,
                contents,
                segment_size: segment,
                src_ip: src,
            };
            let error = match self
                .state
                .try_send(UdpSockRef::from(&self.socket), &transmit)
            {
                Ok(()) => return true,
                Err(e) => e,
            };
            match error.raw_os_error() {
                Some(libc_errno::EAGAIN) if tries < SEND_TRIES => {
                    self.wait(PollFlags::POLLOUT, SEND_WAIT);
                }
                Some(libc_errno::EINTR) => {}
                Some(libc_errno::EMSGSIZE | libc_errno::EINVAL | libc_errno::EIO)
                    if segment.is_some() =>
                {
                    // quinn-udp stops GSO itself on EINVAL and EIO.
                    let size = segment.unwrap_or(contents.len()).max(1);
                    let one = Target { src, ..*out };
                    let mut all = true;
                    for datagram in contents.chunks(size) {
                        all &= self.send(&one, datagram, None);
                    }
                    return all;
                }
                Some(libc_errno::EINVAL | libc_errno::EADDRNOTAVAIL | libc_errno::ENETUNREACH)
                    if src.is_some() =>
                {
                    // The address the side sent to is gone from this host:
                    // let the kernel choose.
                    trace!(to = %out.to, "relay send: source refused ({error})");
                    src = None;
                }
                _ => {
                    trace!(to = %out.to, "relay send: {error}");
                    return false;
                }
            }
            if tries > SEND_TRIES + 1 {
                return false;
            }
        }
    }
}

/// The errno values a send reacts to (the crate does not depend on libc).
mod libc_errno {
    use nix::errno::Errno;
    pub const EAGAIN: i32 = Errno::EAGAIN as i32;
    pub const EINTR: i32 = Errno::EINTR as i32;
    pub const EMSGSIZE: i32 = Errno::EMSGSIZE as i32;
    pub const EINVAL: i32 = Errno::EINVAL as i32;
    pub const EIO: i32 = Errno::EIO as i32;
    pub const EADDRNOTAVAIL: i32 = Errno::EADDRNOTAVAIL as i32;
    pub const ENETUNREACH: i32 = Errno::ENETUNREACH as i32;
}

/// Where a run goes: the side's address, the local address it sent to
/// (answers leave from there, or its NAT sees another flow), and the ECN
/// bits the datagrams came with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Target {
    to: SocketAddr,
    src: Option<IpAddr>,
    ecn: Option<EcnCodepoint>,
}

/// One side of a channel: where it bound from and when it was last heard.
#[derive(Debug, Clone, Copy)]
struct Side {
    addr: SocketAddr,
    local: Option<IpAddr>,
    seen: Instant,
}

#[derive(Debug, Default)]
struct Sides([Option<Side>; 2]);

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// A local address one can send from (an IPv6 link-local one would need
/// its interface, which quinn-udp does not pass: the kernel chooses).
fn usable_source(ip: Option<IpAddr>) -> Option<IpAddr> {
    let ip = ip?.to_canonical();
    let usable = match ip {
        IpAddr::V4(v4) => !(v4.is_unspecified() || v4.is_multicast() || v4.is_broadcast()),
        IpAddr::V6(v6) => {
            !(v6.is_unspecified() || v6.is_multicast() || v6.segments()[0] & 0xffc0 == 0xfe80)
        }
    };
    usable.then_some(ip)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The run being gathered for one GSO send: datagrams to one target, all
/// of the first one's size but the last, which may be shorter.
struct Run {
    buf: Vec<u8>,
    target: Option<Target>,
    segment: usize,
    datagrams: usize,
    /// The last datagram was shorter than the segment: nothing may follow.
    closed: bool,
}

impl Run {
    fn new() -> Run {
        Run {
            buf: Vec::with_capacity(MAX_SEND),
            target: None,
            segment: 0,
            datagrams: 0,
            closed: false,
        }
    }

    fn fits(&self, target: &Target, len: usize, max_segments: usize) -> bool {
        self.target.as_ref() == Some(target)
            && !self.closed
            && len <= self.segment
            && self.datagrams < max_segments
            && self.buf.len() + len <= MAX_SEND
    }
}

/// The thread's state: the socket, the channels, the rate limits.
struct Forwarder {
    udp: Udp,
    shared: Arc<Shared>,
    limits: Limits,
    key: Option<RelayKey>,
    key_generation: u64,
    channels: HashMap<Channel, Sides>,
    /// Binds and echoes per source and in total.
    limiter: SourceLimiter,
    run: Run,
    /// The header and target of the last datagram forwarded from the
    /// sender being handled (valid for one receive buffer, until a bind).
    last_data: Option<([u8; relay::HEADER_LEN], Target)>,
    next_sweep: Instant,
    next_summary: Instant,
    summarised: RelayDrops,
}

impl Forwarder {
    fn new(udp: Udp, shared: Arc<Shared>, limits: Limits) -> Forwarder {
        let now = Instant::now();
        Forwarder {
            udp,
            shared,
            limits,
            key: None,
            key_generation: 0,
            channels: HashMap::new(),
            limiter: SourceLimiter::new(BIND_RATE, BIND_BURST, GLOBAL_BIND_RATE, GLOBAL_BIND_BURST),
            run: Run::new(),
            last_data: None,
            next_sweep: now + Self::sweep_every(&limits),
            next_summary: now + SUMMARY,
            summarised: RelayDrops::default(),
        }
    }

    fn sweep_every(limits: &Limits) -> Duration {
        (limits.idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    fn run(mut self) {
        let batch = quinn_udp::BATCH_SIZE.max(1);
        let mut storage = vec![0u8; batch * BUFFER];
        let mut meta = vec![RecvMeta::default(); batch];
        while !self.shared.stopping.load(Ordering::Relaxed) {
            self.take_key();
            let received = {
                let mut iovs: Vec<IoSliceMut> =
                    storage.chunks_mut(BUFFER).map(IoSliceMut::new).collect();
                self.udp
                    .state
                    .recv(UdpSockRef::from(&self.udp.socket), &mut iovs, &mut meta)
            };
            let n = match received {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.housekeeping(Instant::now());
                    self.udp.wait(PollFlags::POLLIN, POLL);
                    continue;
                }
                Err(e) => {
                    debug!(port = self.udp.port, "relay receive: {e}");
                    self.udp.wait(PollFlags::POLLIN, Duration::from_millis(1));
                    continue;
                }
            };
            let now = Instant::now();
            let unix = unix_now();
            for (m, buf) in meta[..n].iter().zip(storage.chunks(BUFFER)) {
                let Some(received) = buf.get(..m.len) else {
                    continue;
                };
                let from = canonical(m.addr);
                let local = usable_source(m.dst_ip);
                let stride = if m.stride == 0 { m.len } else { m.stride };
                // A GRO buffer holds one sender's datagrams, most often of
                // one channel and side: checked once.
                self.last_data = None;
                if received.is_empty() {
                    self.handle(from, local, m.ecn, received, now, unix);
                }
                for datagram in received.chunks(stride.max(1)) {
                    self.handle(from, local, m.ecn, datagram, now, unix);
                }
            }
            self.flush();
            if now >= self.next_sweep {
                self.housekeeping(now);
            }
        }
        self.flush();
        debug!(port = self.udp.port, "relay stopped");
    }

    /// Takes a new key: channels bound under the old one are dropped.
    fn take_key(&mut self) {
        let generation = self.shared.key_generation.load(Ordering::Acquire);
        if generation == self.key_generation {
            return;
        }
        let Ok(key) = self.shared.key.lock() else {
            return;
        };
        (self.key, self.key_generation) = *key;
        drop(key);
        if !self.channels.is_empty() {
            info!(
                channels = self.channels.len(),
                "relay key changed: channels dropped"
            );
        }
        self.channels.clear();
        self.shared.counters.channels.store(0, Ordering::Relaxed);
    }

    fn handle(
        &mut self,
        from: SocketAddr,
        local: Option<IpAddr>,
        ecn: Option<EcnCodepoint>,
        datagram: &[u8],
        now: Instant,
        unix: u64,
    ) {
        let counters = &self.shared.counters;
        if datagram.len() > relay::MAX_DATAGRAM {
            count(&counters.oversized, 1);
            trace!(%from, len = datagram.len(), "relay: oversized datagram dropped");
            return;
        }
        if let Some((header, target)) = self.last_data
            && datagram.get(..relay::HEADER_LEN) == Some(&header[..])
            && target.ecn == ecn
        {
            self.forward(target, datagram);
        } else if let Some((channel, side, _)) = relay::parse_data(datagram) {
            let target = self.channels.get_mut(&channel).and_then(|sides| {
                let me = sides.0.get_mut(usize::from(side))?.as_mut()?;
                if me.addr != from {
                    return None;
                }
                me.seen = now;
                let other = sides.0.get(usize::from(1 - side))?.as_ref()?;
                Some(Target {
                    to: other.addr,
                    src: other.local,
                    ecn,
                })
            });
            match target {
                Some(target) => {
                    let mut header = [0u8; relay::HEADER_LEN];
                    header.copy_from_slice(&datagram[..relay::HEADER_LEN]);
                    self.last_data = Some((header, target));
                    self.forward(target, datagram);
                }
                None => {
                    count(&counters.unbound, 1);
                    trace!(%from, "relay: data from an unbound side dropped");
                }
            }
        } else if let Some(bind) = relay::parse_bind(datagram) {
            self.last_data = None;
            self.bind(from, local, &bind, now, unix);
        } else if let Some(id) = relay::parse_echo(datagram) {
            // A node measuring its round trip to us: answered with as many
            // bytes, within the same rate as binds.
            let shared = Arc::clone(&self.shared);
            if !self.bind_allowed(from.ip(), now) {
                count(&shared.counters.rate_limited, 1);
                return;
            }
            let target = Target {
                to: from,
                src: local,
                ecn: None,
            };
            if !self.udp.send(&target, &relay::echo_reply(&id), None) {
                count(&shared.counters.send_failed, 1);
            }
        } else {
            count(&counters.malformed, 1);
            trace!(%from, "relay: malformed datagram dropped");
        }
    }

    fn bind(
        &mut self,
        from: SocketAddr,
        local: Option<IpAddr>,
        bind: &relay::Bind,
        now: Instant,
        unix: u64,
    ) {
        let shared = Arc::clone(&self.shared);
        let counters = &shared.counters;
        if !self.bind_allowed(from.ip(), now) {
            count(&counters.rate_limited, 1);
            trace!(%from, "relay: bind over the rate dropped");
            return;
        }
        let valid = self
            .key
            .as_ref()
            .is_some_and(|key| relay::verify(key, bind, unix));
        if !valid {
            count(&counters.unauthenticated, 1);
            trace!(%from, "relay: unauthenticated bind dropped");
            return;
        }
        if !self.channels.contains_key(&bind.channel)
            && self.channels.len() >= self.limits.max_channels
        {
            count(&counters.channels_full, 1);
            trace!(%from, "relay: bind for a new channel refused (table full)");
            return;
        }
        let sides = self.channels.entry(bind.channel).or_default();
        let Some(slot) = sides.0.get_mut(usize::from(bind.side)) else {
            return;
        };
        if slot.is_none_or(|s| s.addr != from) {
            debug!(channel = %relay::to_hex(&bind.channel), side = bind.side, %from,
                moved_from = ?slot.map(|s| s.addr), "relay: side bound");
        }
        *slot = Some(Side {
            addr: from,
            local,
            seen: now,
        });
        counters
            .channels
            .store(self.channels.len() as u64, Ordering::Relaxed);
        count(&counters.binds, 1);
        let answer = relay::bound(&bind.channel, bind.side);
        let target = Target {
            to: from,
            src: local,
            ecn: None,
        };
        // The answer goes after what was gathered for others (no order
        // between destinations matters) and on its own.
        if !self.udp.send(&target, &answer, None) {
            count(&counters.send_failed, 1);
        }
    }

    /// Whether a bind (or an echo) from `ip` is within its source's rate
    /// and the global one.
    fn bind_allowed(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.limiter.allow(ip, now)
    }

    /// Adds `datagram` to the run for `target`, sending the run first when
    /// it cannot take it.
    fn forward(&mut self, target: Target, datagram: &[u8]) {
        let max_segments = self.udp.state.max_gso_segments().max(1);
        if !self.run.fits(&target, datagram.len(), max_segments) {
            self.flush();
            self.run.target = Some(target);
            self.run.segment = datagram.len();
        }
        self.run.buf.extend_from_slice(datagram);
        self.run.datagrams += 1;
        self.run.closed = datagram.len() < self.run.segment;
    }

    /// Sends the run gathered, if any.
    fn flush(&mut self) {
        let Some(target) = self.run.target.take() else {
            return;
        };
        let segment = (self.run.datagrams > 1).then_some(self.run.segment);
        let counters = &self.shared.counters;
        let datagrams = self.run.datagrams as u64;
        if self.udp.send(&target, &self.run.buf, segment) {
            count(&counters.forwarded_datagrams, datagrams);
            count(&counters.forwarded_bytes, self.run.buf.len() as u64);
        } else {
            count(&counters.send_failed, datagrams);
        }
        self.run.buf.clear();
        self.run.datagrams = 0;
        self.run.closed = false;
    }

    /// Forgets idle sides, empty channels and rested sources; picks up a
    /// new key; summarises drops.
    fn housekeeping(&mut self, now: Instant) {
        self.take_key();
        if now >= self.next_sweep {
            self.next_sweep = now + Self::sweep_every(&self.limits);
            let idle = self.limits.idle;
            let before = self.channels.len();
            self.channels.retain(|_, sides| {
                for side in &mut sides.0 {
                    if side.is_some_and(|s| now.saturating_duration_since(s.seen) > idle) {
                        *side = None;
                    }
                }
                sides.0.iter().any(Option::is_some)
            });
            if self.channels.len() != before {
                debug!(
                    removed = before - self.channels.len(),
                    "relay: idle channels forgotten"
                );
            }
            self.shared
                .counters
                .channels
                .store(self.channels.len() as u64, Ordering::Relaxed);
            self.limiter.prune(now);
        }
        if now >= self.next_summary {
            self.next_summary = now + SUMMARY;
            let dropped = self.shared.counters.stats().dropped;
            let last = std::mem::replace(&mut self.summarised, dropped);
            if dropped.total() > last.total() {
                info!(
                    unauthenticated = dropped.unauthenticated - last.unauthenticated,
                    unbound = dropped.unbound - last.unbound,
                    oversized = dropped.oversized - last.oversized,
                    malformed = dropped.malformed - last.malformed,
                    rate_limited = dropped.rate_limited - last.rate_limited,
                    channels_full = dropped.channels_full - last.channels_full,
                    send_failed = dropped.send_failed - last.send_failed,
                    "relay: datagrams dropped in the last minute"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    const KEY: RelayKey = [7; 32];
    const CHANNEL: Channel = [1, 2, 3, 4, 5, 6, 7, 8];
    const WAIT: Duration = Duration::from_secs(2);
    const SILENCE: Duration = Duration::from_millis(200);

    fn relay_with(limits: Limits) -> RelayServer {
        let relay = RelayServer::start_with(0, limits).expect("relay starts");
        relay.set_key(Some(KEY));
        relay
    }

    fn relay() -> RelayServer {
        relay_with(Limits::default())
    }

    fn client(ip: &str) -> UdpSocket {
        let socket = UdpSocket::bind((ip, 0)).expect("client socket");
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::RcvBufForce,
            &SOCKET_BUFFER,
        );
        socket
    }

    fn has_ipv6() -> bool {
        UdpSocket::bind("[::1]:0").is_ok()
    }

    /// The relay's address in the client's family.
    fn at(relay: &RelayServer, client: &UdpSocket) -> SocketAddr {
        let ip: IpAddr = match client.local_addr().expect("address") {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        SocketAddr::new(ip, relay.port())
    }

    fn bind_message(key: &RelayKey, channel: Channel, side: u8, expires: u64) -> Vec<u8> {
        relay::bind(&relay::Bind {
            channel,
            side,
            expires,
            mac: relay::credential_mac(key, &channel, side, expires),
        })
        .to_vec()
    }

    fn later() -> u64 {
        unix_now() + 3600
    }

    fn receive(socket: &UdpSocket, within: Duration) -> Option<Vec<u8>> {
        socket.set_read_timeout(Some(within)).expect("timeout");
        let mut buf = vec![0u8; 65536];
        let (n, _) = socket.recv_from(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    /// Whether `message` gets its `bound` within `within`.
    fn send_bind(
        relay: &RelayServer,
        socket: &UdpSocket,
        message: &[u8],
        within: Duration,
    ) -> bool {
        socket.send_to(message, at(relay, socket)).expect("send");
        receive(socket, within).is_some_and(|answer| {
            relay::parse_bound(&answer).is_some_and(|(c, s)| message[8..16] == c && message[5] == s)
        })
    }

    fn bind(relay: &RelayServer, socket: &UdpSocket, channel: Channel, side: u8) {
        let message = bind_message(&KEY, channel, side, later());
        assert!(
            send_bind(relay, socket, &message, WAIT),
            "side {side} bound"
        );
    }

    fn data(channel: Channel, side: u8, payload: &[u8]) -> Vec<u8> {
        let mut d = relay::data_header(&channel, side).to_vec();
        d.extend_from_slice(payload);
        d
    }

    /// Waits until `check` holds for the relay's stats.
    fn stats_until(relay: &RelayServer, check: impl Fn(&RelayStats) -> bool) -> RelayStats {
        let deadline = Instant::now() + WAIT;
        loop {
            let stats = relay.stats();
            if check(&stats) || Instant::now() > deadline {
                return stats;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Two clients, bound as side 0 and side 1 of `CHANNEL`.
    fn pair(relay: &RelayServer, a_ip: &str, b_ip: &str) -> (UdpSocket, UdpSocket) {
        let (a, b) = (client(a_ip), client(b_ip));
        bind(relay, &a, CHANNEL, 0);
        bind(relay, &b, CHANNEL, 1);
        (a, b)
    }

    fn forwards(relay: &RelayServer, from: &UdpSocket, side: u8, to: &UdpSocket) {
        let message = data(CHANNEL, side, b"\x04\0\0\0 a WireGuard transport message");
        from.send_to(&message, at(relay, from)).expect("send");
        assert_eq!(receive(to, WAIT), Some(message), "forwarded unchanged");
    }

    #[test]
    fn data_goes_from_each_side_to_the_other_unchanged() {
        let relay = relay();
        let (a, b) = pair(&relay, "127.0.0.1", "127.0.0.1");
        forwards(&relay, &a, 0, &b);
        forwards(&relay, &b, 1, &a);
        let stats = stats_until(&relay, |s| s.forwarded_datagrams >= 2);
        assert_eq!(stats.channels, 1);
        assert_eq!(stats.binds, 2);
        assert_eq!(stats.forwarded_datagrams, 2);
        assert_eq!(stats.dropped.total(), 0);
    }

    #[test]
    fn an_ipv4_side_and_an_ipv6_side_reach_each_other() {
        if !has_ipv6() {
            eprintln!("no IPv6 loopback: skipped");
            return;
        }
        let relay = relay();
        let (a, b) = pair(&relay, "127.0.0.1", "::1");
        forwards(&relay, &a, 0, &b);
        forwards(&relay, &b, 1, &a);
    }

    #[test]
    fn a_burst_arrives_whole_sent_one_by_one_and_as_gso_runs() {
        let relay = relay();
        let (a, b) = pair(&relay, "127.0.0.1", "127.0.0.1");
        let burst: Vec<Vec<u8>> = (0..64u8).map(|i| data(CHANNEL, 0, &[i; 1200])).collect();
        for d in &burst {
            a.send_to(d, at(&relay, &a)).expect("send");
        }
        for d in &burst {
            assert_eq!(receive(&b, WAIT).as_ref(), Some(d), "in order, whole");
        }
        // The same as GSO runs: the relay receives them as GRO buffers.
        let state = UdpSocketState::new(UdpSockRef::from(&a)).expect("quinn-udp");
        let segments = state.max_gso_segments().clamp(1, 32);
        let contents: Vec<u8> = burst.concat();
        let run = segments * 1216;
        for chunk in contents.chunks(run) {
            let transmit = Transmit {
                destination: at(&relay, &a),
                ecn: None,
                contents: chunk,
                segment_size: (segments > 1).then_some(1216),
                src_ip: None,
            };
            state
                .try_send(UdpSockRef::from(&a), &transmit)
                .expect("GSO send");
        }
        for d in &burst {
            assert_eq!(receive(&b, WAIT).as_ref(), Some(d), "in order, whole");
        }
        // A run with a shorter last datagram.
        let mut short = burst[..3].concat();
        short.extend_from_slice(&data(CHANNEL, 0, b"short"));
        let transmit = Transmit {
            destination: at(&relay, &a),
            ecn: None,
            contents: &short,
            segment_size: Some(1216),
            src_ip: None,
        };
        state
            .try_send(UdpSockRef::from(&a), &transmit)
            .expect("GSO send");
        for d in &burst[..3] {
            assert_eq!(receive(&b, WAIT).as_ref(), Some(d));
        }
        assert_eq!(receive(&b, WAIT), Some(data(CHANNEL, 0, b"short")));
        let stats = stats_until(&relay, |s| s.forwarded_datagrams >= 64 + 64 + 4);
        assert_eq!(stats.forwarded_datagrams, 64 + 64 + 4);
        assert_eq!(stats.dropped.total(), 0, "{stats:?}");
    }

    #[test]
    fn binds_without_a_valid_credential_get_no_answer_and_are_counted() {
        let relay = relay();
        let a = client("127.0.0.1");
        let mut bad_mac = bind_message(&KEY, CHANNEL, 0, later());
        bad_mac[30] ^= 1;
        let expired = bind_message(&KEY, CHANNEL, 0, unix_now() - 10);
        let mut other_side = bind_message(&KEY, CHANNEL, 1, later());
        other_side[5] = 0;
        let other_key = bind_message(&[8; 32], CHANNEL, 0, later());
        for (what, message) in [
            ("bad MAC", bad_mac),
            ("expired", expired),
            ("the other side's credential", other_side),
            ("another relay's key", other_key),
        ] {
            a.send_to(&message, at(&relay, &a)).expect("send");
            assert_eq!(receive(&a, SILENCE), None, "{what}: no answer");
        }
        let stats = relay.stats();
        assert_eq!(stats.dropped.unauthenticated, 4);
        assert_eq!((stats.channels, stats.binds), (0, 0));
    }

    #[test]
    fn data_not_from_the_bound_address_of_its_side_is_dropped() {
        let relay = relay();
        let a = client("127.0.0.1");
        let b = client("127.0.0.1");
        let stranger = client("127.0.0.1");
        bind(&relay, &a, CHANNEL, 0);
        // The other side is not bound yet.
        a.send_to(&data(CHANNEL, 0, b"early"), at(&relay, &a))
            .expect("send");
        bind(&relay, &b, CHANNEL, 1);
        // From an address that bound nothing, as either side.
        for side in [0, 1] {
            stranger
                .send_to(&data(CHANNEL, side, b"spoof"), at(&relay, &stranger))
                .expect("send");
        }
        // From a bound address, but as the other side.
        a.send_to(&data(CHANNEL, 1, b"wrong side"), at(&relay, &a))
            .expect("send");
        // For a channel nobody bound.
        a.send_to(&data([9; 8], 0, b"elsewhere"), at(&relay, &a))
            .expect("send");
        let stats = stats_until(&relay, |s| s.dropped.unbound >= 5);
        assert_eq!(stats.dropped.unbound, 5);
        assert_eq!(receive(&b, SILENCE), None);
        assert_eq!(receive(&a, SILENCE), None);
        assert_eq!(receive(&stranger, SILENCE), None);
        assert_eq!(stats.forwarded_datagrams, 0);
    }

    #[test]
    fn a_rebind_from_a_new_address_moves_the_side() {
        let relay = relay();
        let (a, b) = pair(&relay, "127.0.0.1", "127.0.0.1");
        forwards(&relay, &b, 1, &a);
        let moved = client("127.0.0.1");
        bind(&relay, &moved, CHANNEL, 0);
        forwards(&relay, &b, 1, &moved);
        forwards(&relay, &moved, 0, &b);
        assert_eq!(receive(&a, SILENCE), None, "the old address hears nothing");
        a.send_to(&data(CHANNEL, 0, b"old"), at(&relay, &a))
            .expect("send");
        let stats = stats_until(&relay, |s| s.dropped.unbound >= 1);
        assert_eq!(stats.dropped.unbound, 1);
        assert_eq!(receive(&b, SILENCE), None);
        assert_eq!(stats.channels, 1);
    }

    #[test]
    fn a_new_key_or_none_drops_the_channels() {
        let relay = relay();
        let (a, b) = pair(&relay, "127.0.0.1", "127.0.0.1");
        relay.set_key(Some(KEY));
        forwards(&relay, &a, 0, &b);

        relay.set_key(None);
        a.send_to(&data(CHANNEL, 0, b"after"), at(&relay, &a))
            .expect("send");
        assert_eq!(receive(&b, SILENCE), None);
        let message = bind_message(&KEY, CHANNEL, 0, later());
        assert!(!send_bind(&relay, &a, &message, SILENCE), "no key: no bind");
        let stats = relay.stats();
        assert_eq!(stats.channels, 0);
        assert_eq!(stats.dropped.unbound, 1);
        assert_eq!(stats.dropped.unauthenticated, 1);

        relay.set_key(Some(KEY));
        let (a, b) = pair(&relay, "127.0.0.1", "127.0.0.1");
        let new_key = [5; 32];
        relay.set_key(Some(new_key));
        a.send_to(&data(CHANNEL, 0, b"after"), at(&relay, &a))
            .expect("send");
        assert_eq!(receive(&b, SILENCE), None);
        assert!(
            !send_bind(&relay, &a, &message, SILENCE),
            "the old key's credential"
        );
        let fresh = bind_message(&new_key, CHANNEL, 0, later());
        assert!(send_bind(&relay, &a, &fresh, WAIT), "the new key's");
        assert_eq!(relay.stats().channels, 1);
    }

    #[test]
    fn an_echo_is_answered_with_as_many_bytes_and_needs_no_key() {
        let relay = RelayServer::start_with(0, Limits::default()).expect("relay starts");
        let a = client("127.0.0.1");
        let id = [3u8; 8];
        a.send_to(&relay::echo(&id), at(&relay, &a)).expect("send");
        let reply = receive(&a, WAIT).expect("a reply");
        assert_eq!(relay::parse_echo_reply(&reply), Some(id));
        assert_eq!(reply.len(), relay::echo(&id).len());
    }

    #[test]
    fn oversized_and_malformed_datagrams_are_dropped() {
        let relay = relay();
        let (a, b) = pair(&relay, "127.0.0.1", "127.0.0.1");
        let largest = data(CHANNEL, 0, &[4; relay::MAX_DATAGRAM - relay::HEADER_LEN]);
        a.send_to(&largest, at(&relay, &a)).expect("send");
        assert_eq!(receive(&b, WAIT), Some(largest), "the largest passes");
        let too_long = data(
            CHANNEL,
            0,
            &[4; relay::MAX_DATAGRAM - relay::HEADER_LEN + 1],
        );
        a.send_to(&too_long, at(&relay, &a)).expect("send");
        for junk in [
            &b"\x01\0\0\0 a WireGuard handshake"[..],
            &relay::bound(&CHANNEL, 0),
            &b"B4MR"[..],
            &[],
        ] {
            a.send_to(junk, at(&relay, &a)).expect("send");
        }
        let stats = stats_until(&relay, |s| s.dropped.malformed >= 4);
        assert_eq!(receive(&b, SILENCE), None);
        assert_eq!(receive(&a, SILENCE), None);
        assert_eq!(stats.dropped.oversized, 1);
        assert_eq!(stats.dropped.malformed, 4);
    }

    #[test]
    fn a_bind_flood_from_one_source_leaves_other_sources_alone() {
        let relay = relay();
        let flood = client("127.0.0.1");
        flood.set_nonblocking(true).expect("non-blocking");
        let message = bind_message(&KEY, CHANNEL, 0, later());
        for _ in 0..1000 {
            let _ = flood.send_to(&message, at(&relay, &flood));
        }
        let stats = stats_until(&relay, |s| s.binds + s.dropped.rate_limited >= 1000);
        assert!(stats.dropped.rate_limited >= 800, "{stats:?}");
        assert!(stats.binds <= 200, "{stats:?}");
        let other = client("127.0.0.2");
        bind(&relay, &other, CHANNEL, 1);
    }

    #[test]
    fn idle_sides_are_forgotten() {
        let relay = relay_with(Limits {
            idle: Duration::from_millis(300),
            ..Limits::default()
        });
        let (a, b) = pair(&relay, "127.0.0.1", "127.0.0.1");
        // Data keeps side 0 (its side 1 is gone after 300 ms); nothing
        // keeps side 1.
        for _ in 0..7 {
            std::thread::sleep(Duration::from_millis(100));
            a.send_to(&data(CHANNEL, 0, b"keep"), at(&relay, &a))
                .expect("send");
        }
        let stats = stats_until(&relay, |s| s.dropped.unbound > 0);
        assert_eq!(stats.channels, 1, "side 0 is still there");
        assert!(stats.dropped.unbound > 0, "side 1 is not: {stats:?}");
        while receive(&b, Duration::from_millis(10)).is_some() {}
        bind(&relay, &b, CHANNEL, 1);
        forwards(&relay, &a, 0, &b);
        // Then both fall silent.
        std::thread::sleep(Duration::from_millis(400));
        let stats = stats_until(&relay, |s| s.channels == 0);
        assert_eq!(stats.channels, 0, "and then nothing");
        a.send_to(&data(CHANNEL, 0, b"late"), at(&relay, &a))
            .expect("send");
        assert_eq!(receive(&b, SILENCE), None);
    }

    #[test]
    fn binds_for_new_channels_are_refused_when_the_table_is_full() {
        let relay = relay_with(Limits {
            max_channels: 1,
            ..Limits::default()
        });
        let (a, _b) = pair(&relay, "127.0.0.1", "127.0.0.1");
        let message = bind_message(&KEY, [2; 8], 0, later());
        assert!(!send_bind(&relay, &a, &message, SILENCE));
        bind(&relay, &a, CHANNEL, 0);
        assert_eq!(relay.stats().dropped.channels_full, 1);
    }

    #[test]
    fn stop_ends_the_thread_promptly_and_frees_the_port() {
        let relay = relay();
        let port = relay.port();
        let started = Instant::now();
        relay.stop();
        assert!(started.elapsed() < Duration::from_millis(500));
        drop(relay);
        let again = RelayServer::start(port).expect("the port is free again");
        assert_eq!(again.port(), port);
    }

    /// Not a benchmark: a figure to look at (`--no-capture`).
    #[test]
    fn throughput_on_loopback() {
        const DATAGRAMS: usize = 50_000;
        const PAYLOAD: usize = 1200;
        let relay = relay();
        let (a, b) = pair(&relay, "127.0.0.1", "127.0.0.1");
        let via_relay = blast(&a, at(&relay, &a), &b, DATAGRAMS, PAYLOAD);
        let direct = blast(&a, b.local_addr().expect("address"), &b, DATAGRAMS, PAYLOAD);
        let mbit = |per_second: f64| per_second * (PAYLOAD + 16) as f64 * 8.0 / 1e6;
        eprintln!(
            "relay on loopback: {:.0} datagrams/s ({:.0} Mbit/s), direct {:.0}/s ({:.0} Mbit/s), {:?}",
            via_relay,
            mbit(via_relay),
            direct,
            mbit(direct),
            relay.stats()
        );
    }

    /// Sends `n` datagrams from `from` to `to` in GSO runs, at most a
    /// window ahead of what `at` received (so the figure is what the path
    /// carries, not what an overloaded one drops); the datagrams per
    /// second that arrive.
    fn blast(from: &UdpSocket, to: SocketAddr, at: &UdpSocket, n: usize, payload: usize) -> f64 {
        use std::sync::atomic::AtomicUsize;
        const WINDOW: usize = 2048;
        let got = Arc::new(AtomicUsize::new(0));
        let done = Arc::new(AtomicBool::new(false));
        let receiver = at.try_clone().expect("clone");
        let counting = {
            let (got, done) = (Arc::clone(&got), Arc::clone(&done));
            std::thread::spawn(move || {
                let state = UdpSocketState::new(UdpSockRef::from(&receiver)).expect("quinn-udp");
                let mut storage = vec![0u8; 32 * BUFFER];
                let mut meta = vec![RecvMeta::default(); 32];
                let mut last = Instant::now();
                loop {
                    let mut iovs: Vec<IoSliceMut> =
                        storage.chunks_mut(BUFFER).map(IoSliceMut::new).collect();
                    match state.recv(UdpSockRef::from(&receiver), &mut iovs, &mut meta) {
                        Ok(k) => {
                            last = Instant::now();
                            let datagrams: usize = meta[..k]
                                .iter()
                                .map(|m| {
                                    let stride = if m.stride == 0 { m.len } else { m.stride };
                                    m.len.div_ceil(stride.max(1))
                                })
                                .sum();
                            got.fetch_add(datagrams, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            if done.load(Ordering::Relaxed)
                                && last.elapsed() > Duration::from_millis(100)
                            {
                                return;
                            }
                            std::thread::yield_now();
                        }
                        Err(e) => panic!("receive: {e}"),
                    }
                }
            })
        };
        let state = UdpSocketState::new(UdpSockRef::from(from)).expect("quinn-udp");
        let segments = state.max_gso_segments().clamp(1, 40);
        let run = data(CHANNEL, 0, &vec![4; payload]).repeat(segments);
        let started = Instant::now();
        let (mut sent, mut progress) = (0, Instant::now());
        while sent < n {
            let received = got.load(Ordering::Relaxed);
            if sent >= received + WINDOW {
                if progress.elapsed() > Duration::from_millis(50) {
                    // Lost on the way: move the window on.
                    got.fetch_add(sent - received, Ordering::Relaxed);
                    progress = Instant::now();
                }
                std::thread::yield_now();
                continue;
            }
            let k = segments.min(n - sent);
            let transmit = Transmit {
                destination: to,
                ecn: None,
                contents: &run[..k * (payload + 16)],
                segment_size: (k > 1).then_some(payload + 16),
                src_ip: None,
            };
            match state.try_send(UdpSockRef::from(from), &transmit) {
                Ok(()) => {
                    sent += k;
                    progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("send: {e}"),
            }
        }
        while got.load(Ordering::Relaxed) < n && progress.elapsed() < Duration::from_millis(200) {
            std::thread::yield_now();
        }
        let took = started.elapsed();
        done.store(true, Ordering::Relaxed);
        counting.join().expect("receiver");
        let arrived = got.load(Ordering::Relaxed).min(n);
        eprintln!("{arrived} of {n} datagrams counted in {took:?}");
        arrived as f64 / took.as_secs_f64()
    }
}
