//! The userspace WireGuard device: a TUN interface, one UDP socket, and the
//! WireGuard protocol of [`gotatun::noise`] (handshake, cookies, timers,
//! transport sessions) for each peer.
//!
//! Three threads move packets, each a blocking loop:
//! - **tun → udp** reads the TUN device with virtio-net offloads (one read
//!   returns a TCP super-packet of up to 64 KiB that tun-rs splits into
//!   segments), finds each packet's peer by destination in the allowed-IPs
//!   table, encrypts, and sends runs of equal-sized datagrams to one endpoint
//!   with one UDP GSO `sendmsg`;
//! - **udp → tun** receives with UDP GRO and `recvmmsg` (quinn-udp),
//!   decrypts, checks the inner source against the peer's allowed IPs, and
//!   writes the batch to the TUN device, where tun-rs coalesces TCP segments
//!   back into super-packets (GRO) so the kernel sees few large packets;
//! - **timers** calls each peer's timers every 100 ms (handshake retries,
//!   rekey, keepalives) and prunes the session-index map.
//!
//! A peer's protocol state sits behind one mutex, taken once per run of
//! packets. gotatun encrypts and decrypts through `&mut Tunn`, so one peer's
//! transport crypto runs on one core at a time; the two directions run on
//! both. ARCHITECTURE.md says why that is enough on a 2-core machine.

use std::collections::{HashMap, HashSet};
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use gotatun::noise::handshake::parse_handshake_anon;
use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{TimerParams, Tunn, TunnResult};
use gotatun::packet::{Packet, WgKind};
use gotatun::tun::MtuWatcher;
use gotatun::x25519;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use tracing::{debug, info};
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use crate::allowed_ips::{AllowedIps, Owner};
use crate::config::{
    AllowedIpChange, DeviceConfig, DeviceStatus, PeerChange, PeerStatus, SetRequest, plan_changes,
};
use crate::key::Key;
use crate::uapi::UapiError;

/// Handshake messages per second from one source address before the device
/// answers with cookies (the protocol's DoS defence).
const HANDSHAKE_RATE_LIMIT: u64 = 100;
/// WireGuard's default MTU: 1500 minus the IPv6, UDP and WireGuard overhead.
pub const DEFAULT_MTU: u16 = 1420;
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Handshake messages waiting for the handshake thread; more are dropped.
const HANDSHAKE_QUEUE: usize = 1024;
/// The largest UDP payload one GSO send may carry.
const GSO_MAX_BYTES: usize = 65_000;
const MAX_PACKET: usize = 65_535;

/// How to create a device.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// Interface name (at most 15 bytes).
    pub name: String,
    pub mtu: u16,
    /// Protocol timers; `None` is the protocol's own values. Tests shorten
    /// rekey times with this.
    pub timer_params: Option<TimerParams>,
}

impl DeviceOptions {
    pub fn new(name: impl Into<String>) -> DeviceOptions {
        DeviceOptions {
            name: name.into(),
            mtu: DEFAULT_MTU,
            timer_params: None,
        }
    }
}

/// A running userspace WireGuard device. Dropping it stops its threads and
/// removes the interface.
pub struct Device {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    name: String,
    tun: SyncDevice,
    mtu: u16,
    timer_params: Option<TimerParams>,
    index_table: IndexTable,
    /// Session index (ours, as the peer addresses its packets) → peer.
    by_index: Mutex<HashMap<u32, Arc<Peer>>>,
    /// The endpoints [`Device::configure`] last asked for, to tell a new
    /// desired endpoint from one the peer roamed away from.
    configured_endpoints: Mutex<HashMap<Key, SocketAddr>>,
    iface: RwLock<Interface>,
    udp: RwLock<Option<Arc<Udp>>>,
    /// Handshake messages from the receive thread to the handshake thread.
    /// Bounded: under a flood the excess is dropped here, so data packets
    /// never wait behind Diffie-Hellman work or cookie replies.
    handshakes: SyncSender<(SocketAddr, Vec<u8>)>,
    /// The network namespace the device was created in. A socket bound
    /// later (a new listen port) must live there too, whichever thread
    /// asks for it.
    netns: Option<std::fs::File>,
    /// Written once, on stop; every wait also polls it.
    stop_fd: OwnedFd,
    stopping: AtomicBool,
}

struct Interface {
    secret: Option<x25519::StaticSecret>,
    public: Option<x25519::PublicKey>,
    rate_limiter: Option<Arc<RateLimiter>>,
    /// As configured; 0 = any.
    listen_port: u16,
    fwmark: u32,
    peers: Vec<Arc<Peer>>,
    by_key: HashMap<Key, Arc<Peer>>,
    allowed: AllowedIps<Arc<Peer>>,
}

struct Peer {
    public_key: Key,
    state: Mutex<PeerState>,
    rx_bytes: AtomicU64,
    tx_bytes: AtomicU64,
}

impl Owner for Arc<Peer> {
    fn owner_key(&self) -> Key {
        self.public_key
    }
}

struct PeerState {
    /// `None` while the device has no private key.
    tunn: Option<Tunn>,
    preshared_key: Option<Key>,
    keepalive: Option<u16>,
    /// Where packets go: the configured endpoint, or the address the peer
    /// last sent an authenticated packet from.
    endpoint: Option<SocketAddr>,
    /// Start a handshake at the next timer tick: a peer just configured
    /// with an endpoint. A restarted peer's old session is useless to the
    /// other side, which would otherwise wait up to 15 s to notice.
    initiate: bool,
}

struct Udp {
    socket: socket2::Socket,
    state: UdpSocketState,
    port: u16,
    /// Bound to `[::]` with IPv4 mapped in, so IPv4 endpoints are sent
    /// to as `::ffff:a.b.c.d`.
    dual_stack: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

impl Device {
    /// Creates the TUN interface (down, no address: addresses and routes are
    /// the kernel module's or the operator's job), binds a UDP socket on a
    /// free port and starts the packet threads.
    pub fn create(options: DeviceOptions) -> io::Result<Device> {
        let tun = tun_rs::DeviceBuilder::new()
            .name(&options.name)
            .mtu(options.mtu)
            .offload(true)
            .build_sync()
            .map_err(|e| io::Error::new(e.kind(), format!("creating TUN {}: {e}", options.name)))?;
        tun.set_nonblocking(true)?;
        // SAFETY: eventfd takes no pointers; the returned descriptor is new
        // and owned by nobody else.
        let stop_fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if stop_fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: stop_fd is a fresh, valid descriptor (checked above).
        let stop_fd = unsafe { OwnedFd::from_raw_fd(stop_fd) };
        let (handshakes, handshake_queue) = std::sync::mpsc::sync_channel(HANDSHAKE_QUEUE);
        let shared = Arc::new(Shared {
            name: options.name.clone(),
            tun,
            mtu: options.mtu,
            timer_params: options.timer_params,
            index_table: IndexTable::from_os_rng(),
            by_index: Mutex::new(HashMap::new()),
            configured_endpoints: Mutex::new(HashMap::new()),
            iface: RwLock::new(Interface {
                secret: None,
                public: None,
                rate_limiter: None,
                listen_port: 0,
                fwmark: 0,
                peers: Vec::new(),
                by_key: HashMap::new(),
                allowed: AllowedIps::new(),
            }),
            udp: RwLock::new(Some(Arc::new(Udp::bind(0, 0)?))),
            netns: std::fs::File::open("/proc/thread-self/ns/net").ok(),
            handshakes,
            stop_fd,
            stopping: AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("wg-hs-{}", options.name))
            .spawn(move || handshake_worker(for_thread, handshake_queue));
        match thread {
            Ok(t) => threads.push(t),
            Err(e) => {
                shared.stop();
                return Err(e);
            }
        }
        for (role, body) in [
            ("tx", tun_to_udp as fn(Arc<Shared>)),
            ("rx", udp_to_tun),
            ("timers", timers),
        ] {
            let for_thread = Arc::clone(&shared);
            let thread = std::thread::Builder::new()
                .name(format!("wg-{role}-{}", options.name))
                .spawn(move || body(for_thread));
            match thread {
                Ok(t) => threads.push(t),
                Err(e) => {
                    shared.stop();
                    return Err(e);
                }
            }
        }
        info!(interface = %options.name, "WireGuard device created");
        Ok(Device { shared, threads })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// False once the interface is gone (deleted with `ip link del`) or
    /// the device was stopped.
    pub fn is_running(&self) -> bool {
        !self.shared.stopping.load(Ordering::Relaxed)
    }

    /// Waits until the device stops (its interface deleted, or
    /// [`Device::stop`] called from elsewhere).
    pub fn wait(&self) {
        while self.is_running() {
            self.shared
                .wait_readable(None, Some(Duration::from_secs(1)));
        }
    }

    /// Asks the threads to stop; `Drop` joins them.
    pub fn stop(&self) {
        self.shared.stop();
    }

    /// A handle that can stop the device from another thread (a signal
    /// handler, the UAPI server).
    pub fn stopper(&self) -> Stopper {
        Stopper(Arc::clone(&self.shared))
    }

    /// Applies one change request (the UAPI `set=1` semantics).
    pub fn apply(&self, request: &SetRequest) -> Result<(), UapiError> {
        self.shared.apply(request)
    }

    /// Brings the device to `desired`, changing only what differs: peers
    /// whose key, preshared key and keepalive are unchanged keep their
    /// sessions; an endpoint is only set when the desired one changed, so a
    /// roamed peer is not pulled back on every reconcile.
    pub fn configure(&self, desired: &DeviceConfig) -> Result<(), UapiError> {
        let current = self.status();
        let configured_port = read(&self.shared.iface).listen_port;
        let endpoints = lock(&self.shared.configured_endpoints).clone();
        let request = plan_changes(&current, configured_port, &endpoints, desired);
        self.shared.remember_endpoints(desired);
        if request == SetRequest::default() {
            return Ok(());
        }
        self.apply(&request)
    }

    /// The device and its peers with their counters.
    pub fn status(&self) -> DeviceStatus {
        self.shared.status()
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.stop();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Stops a device from another thread.
#[derive(Clone)]
pub struct Stopper(Arc<Shared>);

impl Stopper {
    pub fn stop(&self) {
        self.0.stop();
    }
}

// ---------------------------------------------------------------------------
// Configuration

impl Shared {
    fn stop(&self) {
        if !self.stopping.swap(true, Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a local u64 to our own eventfd.
            let _ = unsafe {
                libc::write(
                    self.stop_fd.as_raw_fd(),
                    (&one as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
        }
    }

    /// Waits until `fd` is readable, the device stops, or `timeout` passes.
    fn wait_readable(&self, fd: Option<RawFd>, timeout: Option<Duration>) {
        self.wait_for(fd, libc::POLLIN, timeout);
    }

    fn wait_for(&self, fd: Option<RawFd>, events: libc::c_short, timeout: Option<Duration>) {
        let mut fds = [
            libc::pollfd {
                fd: self.stop_fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: fd.unwrap_or(-1),
                events,
                revents: 0,
            },
        ];
        let timeout = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        // SAFETY: `fds` is a valid array of two pollfd for the duration of
        // the call; a negative fd is ignored by poll.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
    }

    /// Runs `f` in the device's network namespace: here if the calling
    /// thread is already there, else on a short-lived thread that enters it.
    fn in_device_netns<T: Send>(&self, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
        let Some(ns) = &self.netns else {
            return f();
        };
        let same = std::fs::metadata("/proc/thread-self/ns/net")
            .and_then(|here| Ok((here, ns.metadata()?)))
            .map(|(here, there)| {
                use std::os::unix::fs::MetadataExt;
                here.ino() == there.ino() && here.dev() == there.dev()
            })
            .unwrap_or(true);
        if same {
            return f();
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: setns with a valid namespace descriptor; it
                    // only moves this short-lived thread.
                    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    f()
                })
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("socket thread panicked")))
        })
    }

    fn udp(&self) -> Option<Arc<Udp>> {
        read(&self.udp).clone()
    }

    fn apply(&self, request: &SetRequest) -> Result<(), UapiError> {
        let mut iface = self.iface.write().unwrap_or_else(PoisonError::into_inner);
        // The socket first: a port in use refuses the request before
        // anything else changed.
        let port = request.listen_port.unwrap_or(iface.listen_port);
        let fwmark = request.fwmark.unwrap_or(iface.fwmark);
        if request.listen_port.is_some() || request.fwmark.is_some() {
            self.rebind(&iface, port, fwmark)?;
            iface.listen_port = port;
            iface.fwmark = fwmark;
        }
        if let Some(private_key) = request.private_key {
            self.set_private_key(&mut iface, private_key);
        }
        // Removed peers leave the peer list and the index map in one pass
        // at the end, however many there are.
        let mut removed = Vec::new();
        if request.replace_peers {
            let all: Vec<Key> = iface.peers.iter().map(|p| p.public_key).collect();
            removed.extend(
                all.iter()
                    .filter_map(|key| self.remove_peer(&mut iface, key)),
            );
        }
        for change in &request.peers {
            removed.extend(self.apply_peer(&mut iface, change));
        }
        self.forget(&mut iface, &removed);
        // New endpoints get a handshake now rather than at the next timer
        // tick: a peer that restarted holds a session we no longer have.
        if let Some(udp) = self.udp() {
            for peer in &iface.peers {
                let mut state = lock(&peer.state);
                let Some(to) = state.endpoint else { continue };
                if !std::mem::take(&mut state.initiate) {
                    continue;
                }
                let Some(tunn) = state.tunn.as_mut() else {
                    continue;
                };
                if tunn.time_since_last_handshake().is_some() {
                    continue;
                }
                if let Some(init) = tunn.format_handshake_initiation(false) {
                    let init: WgKind = init.into();
                    self.register_index(&init, peer);
                    drop(state);
                    let bytes: Packet = init.into();
                    peer.tx_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    udp.send(self, to, &bytes, None);
                }
            }
        }
        Ok(())
    }

    fn rebind(&self, iface: &Interface, port: u16, fwmark: u32) -> Result<(), UapiError> {
        let current = self.udp();
        if let Some(udp) = &current
            && (port == 0 || port == udp.port)
        {
            if fwmark != iface.fwmark {
                udp.socket
                    .set_mark(fwmark)
                    .map_err(|e| UapiError::invalid(format!("fwmark={fwmark}: {e}")))?;
            }
            return Ok(());
        }
        // Free the old port first: the new one may be the same number on
        // the other address family, and a failed bind must not leave the
        // device without a socket.
        let udp = match self.in_device_netns(|| Udp::bind(port, fwmark)) {
            Ok(udp) => udp,
            Err(e) => {
                let errno = if e.kind() == io::ErrorKind::AddrInUse {
                    libc::EADDRINUSE
                } else {
                    libc::EIO
                };
                return Err(UapiError {
                    errno,
                    message: format!("listen_port={port}: {e}"),
                });
            }
        };
        *self.udp.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(udp));
        Ok(())
    }

    fn set_private_key(&self, iface: &mut Interface, key: Option<Key>) {
        let secret = key.map(|k| x25519::StaticSecret::from(k.0));
        let same = match (&secret, &iface.secret) {
            (Some(a), Some(b)) => a.to_bytes() == b.to_bytes(),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        let Some(secret) = secret else {
            iface.secret = None;
            iface.public = None;
            iface.rate_limiter = None;
            for peer in &iface.peers {
                lock(&peer.state).tunn = None;
            }
            return;
        };
        let public = x25519::PublicKey::from(&secret);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        // A peer with our own public key cannot exist (the kernel and
        // wireguard-go drop it too).
        let own = self.remove_peer(iface, &Key(*public.as_bytes()));
        self.forget(iface, own.as_slice());
        for peer in &iface.peers {
            let mut state = lock(&peer.state);
            match state.tunn.as_mut() {
                Some(tunn) => tunn.set_static_private(secret.clone(), public, rate_limiter.clone()),
                None => {
                    state.tunn = Some(self.new_tunn(
                        &secret,
                        &rate_limiter,
                        peer.public_key,
                        state.preshared_key,
                        state.keepalive,
                    ))
                }
            }
        }
        iface.secret = Some(secret);
        iface.public = Some(public);
        iface.rate_limiter = Some(rate_limiter);
    }

    fn new_tunn(
        &self,
        secret: &x25519::StaticSecret,
        rate_limiter: &Arc<RateLimiter>,
        peer: Key,
        preshared_key: Option<Key>,
        keepalive: Option<u16>,
    ) -> Tunn {
        let mut tunn = Tunn::new(
            secret.clone(),
            x25519::PublicKey::from(peer.0),
            preshared_key.map(|k| k.0),
            keepalive,
            self.index_table.clone(),
            rate_limiter.clone(),
        );
        if let Some(params) = &self.timer_params {
            tunn.dangerously_set_timer_params(params.clone());
        }
        tunn
    }

    /// Takes a peer out of the key map and the allowed IPs and ends its
    /// sessions; [`Shared::forget`] takes it out of the rest.
    fn remove_peer(&self, iface: &mut Interface, key: &Key) -> Option<Arc<Peer>> {
        let peer = iface.by_key.remove(key)?;
        iface.allowed.clear(key);
        lock(&peer.state).tunn = None;
        debug!(interface = %self.name, peer = ?key, "peer removed");
        Some(peer)
    }

    /// Takes removed peers out of the peer list and the index map: one
    /// pass over each.
    fn forget(&self, iface: &mut Interface, removed: &[Arc<Peer>]) {
        if removed.is_empty() {
            return;
        }
        let gone: HashSet<*const Peer> = removed.iter().map(Arc::as_ptr).collect();
        iface.peers.retain(|p| !gone.contains(&Arc::as_ptr(p)));
        lock(&self.by_index).retain(|_, owner| !gone.contains(&Arc::as_ptr(owner)));
    }

    /// Applies one peer's change; returns the peer if it was removed.
    fn apply_peer(&self, iface: &mut Interface, change: &PeerChange) -> Option<Arc<Peer>> {
        if change.remove {
            return self.remove_peer(iface, &change.public_key);
        }
        if iface.public.map(|p| *p.as_bytes()) == Some(change.public_key.0) {
            return None;
        }
        let peer = match iface.by_key.get(&change.public_key) {
            Some(peer) => Arc::clone(peer),
            None if change.update_only => return None,
            None => {
                let tunn = iface.secret.as_ref().zip(iface.rate_limiter.as_ref()).map(
                    |(secret, limiter)| {
                        self.new_tunn(secret, limiter, change.public_key, None, None)
                    },
                );
                let peer = Arc::new(Peer {
                    public_key: change.public_key,
                    state: Mutex::new(PeerState {
                        tunn,
                        preshared_key: None,
                        keepalive: None,
                        endpoint: None,
                        initiate: false,
                    }),
                    rx_bytes: AtomicU64::new(0),
                    tx_bytes: AtomicU64::new(0),
                });
                iface.peers.push(Arc::clone(&peer));
                iface.by_key.insert(change.public_key, Arc::clone(&peer));
                debug!(interface = %self.name, peer = ?change.public_key, "peer added");
                peer
            }
        };
        {
            let mut state = lock(&peer.state);
            if let Some(psk) = change.preshared_key {
                state.preshared_key = psk;
                if let Some(tunn) = state.tunn.as_mut() {
                    tunn.set_preshared_key(psk.map(|k| k.0));
                }
            }
            if let Some(endpoint) = change.endpoint {
                state.endpoint = Some(endpoint);
                state.initiate = true;
            }
            if let Some(keepalive) = change.persistent_keepalive {
                let keepalive = (keepalive > 0).then_some(keepalive);
                state.keepalive = keepalive;
                if let Some(tunn) = state.tunn.as_mut() {
                    tunn.set_persistent_keepalive(keepalive);
                }
            }
        }
        // Each change costs the same however many allowed IPs there are
        // (`AllowedIps`): a request is linear in its lines.
        if change.replace_allowed_ips {
            iface.allowed.clear(&peer.public_key);
        }
        for allowed in &change.allowed_ips {
            match *allowed {
                AllowedIpChange::Add(net) => {
                    iface.allowed.insert(net, &peer);
                }
                AllowedIpChange::Remove(net) => {
                    iface.allowed.remove(net, &peer.public_key);
                }
            }
        }
        None
    }

    fn remember_endpoints(&self, desired: &DeviceConfig) {
        let mut map = lock(&self.configured_endpoints);
        map.clear();
        for peer in &desired.peers {
            if let Some(endpoint) = peer.endpoint {
                map.insert(peer.public_key, endpoint);
            }
        }
    }

    fn status(&self) -> DeviceStatus {
        let iface = read(&self.iface);
        let now = SystemTime::now();
        let peers = iface
            .peers
            .iter()
            .map(|peer| {
                let state = lock(&peer.state);
                PeerStatus {
                    public_key: peer.public_key,
                    preshared_key: state.preshared_key,
                    endpoint: state.endpoint,
                    allowed_ips: iface.allowed.of(&peer.public_key).collect(),
                    persistent_keepalive: state.keepalive,
                    last_handshake: state
                        .tunn
                        .as_ref()
                        .and_then(Tunn::time_since_last_handshake)
                        .and_then(|ago| now.checked_sub(ago)),
                    rx_bytes: peer.rx_bytes.load(Ordering::Relaxed),
                    tx_bytes: peer.tx_bytes.load(Ordering::Relaxed),
                }
            })
            .collect();
        DeviceStatus {
            name: self.name.clone(),
            private_key: iface.secret.as_ref().map(|s| Key(s.to_bytes())),
            public_key: iface.public.map(|p| Key(*p.as_bytes())),
            listen_port: self.udp().map_or(0, |u| u.port),
            fwmark: iface.fwmark,
            peers,
        }
    }

    /// Remembers which peer a handshake message we send belongs to, so the
    /// answer (addressed to its sender index) finds the peer.
    fn register_index(&self, packet: &WgKind, peer: &Arc<Peer>) {
        let index = match packet {
            WgKind::HandshakeInit(p) => p.sender_idx.get(),
            WgKind::HandshakeResp(p) => p.sender_idx.get(),
            _ => return,
        };
        lock(&self.by_index).insert(index, Arc::clone(peer));
    }
}

// ---------------------------------------------------------------------------
// The UDP socket

impl Udp {
    fn bind(port: u16, fwmark: u32) -> io::Result<Udp> {
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
            if set_int_option(&socket, force, size).is_err() {
                let _ = set_int_option(&socket, plain, size);
            }
        }
        let state = UdpSocketState::new(UdpSockRef::from(&socket))?;
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
    /// 50 ms) rather than dropping.
    fn send(&self, shared: &Shared, to: SocketAddr, contents: &[u8], segment: Option<usize>) {
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
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    shared.wait_for(
                        Some(self.socket.as_raw_fd()),
                        libc::POLLOUT,
                        Some(Duration::from_millis(50)),
                    );
                }
                Err(e) => {
                    // Unreachable networks and the like: the datagram is
                    // lost, as on a wire; the protocol's timers recover.
                    debug!(interface = %shared.name, %to, "UDP send: {e}");
                    return;
                }
            }
        }
    }
}

fn set_int_option(
    socket: &socket2::Socket,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a local c_int and its size, as
    // setsockopt(SOL_SOCKET, ...) expects.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
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

/// Encrypted datagrams waiting to go out as one GSO send: same endpoint,
/// same size, except that the last one may be shorter.
struct SendBatch {
    to: Option<SocketAddr>,
    buf: Vec<u8>,
    segment: usize,
    count: usize,
    closed: bool,
}

impl SendBatch {
    fn new() -> SendBatch {
        SendBatch {
            to: None,
            buf: Vec::with_capacity(GSO_MAX_BYTES + MAX_PACKET),
            segment: 0,
            count: 0,
            closed: false,
        }
    }

    fn push(&mut self, shared: &Shared, udp: &Udp, to: SocketAddr, datagram: &[u8]) {
        if self.count > 0
            && (self.to != Some(to)
                || self.closed
                || datagram.len() > self.segment
                || self.count >= udp.state.max_gso_segments()
                || self.buf.len() + datagram.len() > GSO_MAX_BYTES)
        {
            self.flush(shared, udp);
        }
        if self.count == 0 {
            self.to = Some(to);
            self.segment = datagram.len();
        } else if datagram.len() < self.segment {
            self.closed = true;
        }
        self.buf.extend_from_slice(datagram);
        self.count += 1;
    }

    fn flush(&mut self, shared: &Shared, udp: &Udp) {
        if let Some(to) = self.to
            && self.count > 0
        {
            let segment = (self.count > 1).then_some(self.segment);
            udp.send(shared, to, &self.buf, segment);
        }
        self.buf.clear();
        self.count = 0;
        self.closed = false;
        self.to = None;
    }
}

// ---------------------------------------------------------------------------
// tun → udp

/// The source (`destination: false`) or destination address of an IP packet.
fn packet_address(packet: &[u8], destination: bool) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 if packet.len() >= 20 => {
            let at = if destination { 16 } else { 12 };
            let b: [u8; 4] = packet[at..at + 4].try_into().ok()?;
            Some(IpAddr::from(b))
        }
        6 if packet.len() >= 40 => {
            let at = if destination { 24 } else { 8 };
            let b: [u8; 16] = packet[at..at + 16].try_into().ok()?;
            Some(IpAddr::from(b))
        }
        _ => None,
    }
}

fn tun_to_udp(shared: Arc<Shared>) {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + MAX_PACKET];
    let mut bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| vec![0u8; MAX_PACKET])
        .collect();
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let mut mtu = MtuWatcher::new(shared.mtu);
    let mut batch = SendBatch::new();
    let mut routes: Vec<Option<Arc<Peer>>> = Vec::with_capacity(IDEAL_BATCH_SIZE);
    let tun_fd = shared.tun.as_raw_fd();
    while !shared.stopping.load(Ordering::Relaxed) {
        let n = match shared
            .tun
            .recv_multiple(&mut original, &mut bufs, &mut sizes, 0)
        {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                shared.wait_readable(Some(tun_fd), Some(Duration::from_secs(1)));
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                info!(interface = %shared.name, "interface deleted; stopping the device");
                shared.stop();
                return;
            }
            Err(e) => {
                debug!(interface = %shared.name, "TUN read: {e}");
                continue;
            }
        };
        let Some(udp) = shared.udp() else { continue };
        {
            let iface = read(&shared.iface);
            routes.clear();
            routes.extend((0..n).map(|i| {
                packet_address(&bufs[i][..sizes[i]], true)
                    .and_then(|dst| iface.allowed.lookup(dst))
                    .map(Arc::clone)
            }));
        }
        let mut i = 0;
        while i < n {
            let Some(peer) = routes[i].clone() else {
                i += 1;
                continue;
            };
            let mut end = i + 1;
            while end < n && routes[end].as_ref().is_some_and(|p| Arc::ptr_eq(p, &peer)) {
                end += 1;
            }
            encrypt_run(
                &shared,
                &udp,
                &peer,
                &bufs,
                &sizes[i..end],
                i,
                &mut mtu,
                &mut batch,
            );
            i = end;
        }
        batch.flush(&shared, &udp);
    }
}

#[allow(clippy::too_many_arguments)]
fn encrypt_run(
    shared: &Shared,
    udp: &Udp,
    peer: &Arc<Peer>,
    bufs: &[Vec<u8>],
    sizes: &[usize],
    first: usize,
    mtu: &mut MtuWatcher,
    batch: &mut SendBatch,
) {
    let mut state = lock(&peer.state);
    let endpoint = state.endpoint;
    let Some(tunn) = state.tunn.as_mut() else {
        return;
    };
    let mut sent = 0u64;
    for (k, size) in sizes.iter().enumerate() {
        let packet = Packet::from_bytes(BytesMut::from(&bufs[first + k][..*size]));
        match tunn.handle_outgoing_packet(packet, Some(mtu)) {
            Some(WgKind::Data(data)) => {
                if let Some(to) = endpoint {
                    let bytes: Packet = data.into();
                    sent += bytes.len() as u64;
                    batch.push(shared, udp, to, &bytes);
                }
            }
            Some(handshake) => {
                shared.register_index(&handshake, peer);
                if let Some(to) = endpoint {
                    let bytes: Packet = handshake.into();
                    sent += bytes.len() as u64;
                    batch.flush(shared, udp);
                    udp.send(shared, to, &bytes, None);
                }
            }
            None => {}
        }
    }
    peer.tx_bytes.fetch_add(sent, Ordering::Relaxed);
}

// ---------------------------------------------------------------------------
// udp → tun

/// Decrypted packets waiting to be written to the TUN device, each behind
/// room for the virtio-net header.
struct TunBatch {
    bufs: Vec<Vec<u8>>,
    used: usize,
    gro: GROTable,
}

impl TunBatch {
    fn push(&mut self, shared: &Shared, packet: &[u8]) {
        if self.used == IDEAL_BATCH_SIZE {
            self.flush(shared);
        }
        if self.used == self.bufs.len() {
            self.bufs
                .push(Vec::with_capacity(VIRTIO_NET_HDR_LEN + MAX_PACKET));
        }
        let buf = &mut self.bufs[self.used];
        buf.clear();
        buf.resize(VIRTIO_NET_HDR_LEN, 0);
        buf.extend_from_slice(packet);
        self.used += 1;
    }

    fn flush(&mut self, shared: &Shared) {
        if self.used == 0 {
            return;
        }
        if let Err(e) = shared.tun.send_multiple(
            &mut self.gro,
            &mut self.bufs[..self.used],
            VIRTIO_NET_HDR_LEN,
        ) {
            debug!(interface = %shared.name, "TUN write: {e}");
        }
        self.used = 0;
    }
}

fn udp_to_tun(shared: Arc<Shared>) {
    let batch_size = quinn_udp::BATCH_SIZE;
    let mut storage: Vec<Vec<u8>> = (0..batch_size).map(|_| vec![0u8; MAX_PACKET]).collect();
    let mut meta = vec![RecvMeta::default(); batch_size];
    let mut out = TunBatch {
        bufs: Vec::new(),
        used: 0,
        gro: GROTable::default(),
    };
    while !shared.stopping.load(Ordering::Relaxed) {
        let Some(udp) = shared.udp() else {
            shared.wait_readable(None, Some(TIMER_TICK));
            continue;
        };
        let received = {
            let mut iovs: Vec<IoSliceMut> =
                storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            udp.state
                .recv(UdpSockRef::from(&udp.socket), &mut iovs, &mut meta)
        };
        let n = match received {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Also wakes to notice a new socket after a port change.
                shared.wait_readable(Some(udp.socket.as_raw_fd()), Some(TIMER_TICK));
                continue;
            }
            Err(e) => {
                debug!(interface = %shared.name, "UDP receive: {e}");
                continue;
            }
        };
        {
            let iface = read(&shared.iface);
            let mut cache: Option<(u32, Arc<Peer>)> = None;
            for (m, buf) in meta[..n].iter().zip(&storage) {
                let from = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
                let stride = if m.stride == 0 { m.len } else { m.stride };
                for datagram in buf[..m.len].chunks(stride.max(1)) {
                    receive(&shared, &iface, &udp, from, datagram, &mut cache, &mut out);
                }
            }
        }
        out.flush(&shared);
    }
}

#[allow(clippy::too_many_arguments)]
fn receive(
    shared: &Shared,
    iface: &Interface,
    udp: &Udp,
    from: SocketAddr,
    datagram: &[u8],
    cache: &mut Option<(u32, Arc<Peer>)>,
    out: &mut TunBatch,
) {
    if datagram.first() == Some(&4) && datagram.len() >= 32 {
        let index = u32::from_le_bytes([datagram[4], datagram[5], datagram[6], datagram[7]]);
        let peer = match cache {
            Some((i, peer)) if *i == index => Arc::clone(peer),
            _ => {
                let Some(peer) = lock(&shared.by_index).get(&index).cloned() else {
                    return;
                };
                *cache = Some((index, Arc::clone(&peer)));
                peer
            }
        };
        let Ok(WgKind::Data(data)) = Packet::from_bytes(BytesMut::from(datagram)).try_into_wg()
        else {
            return;
        };
        let mut state = lock(&peer.state);
        let Some(tunn) = state.tunn.as_mut() else {
            return;
        };
        match tunn.handle_incoming_packet(WgKind::Data(data)) {
            TunnResult::WriteToTunnel(inner) => {
                peer.rx_bytes
                    .fetch_add(datagram.len() as u64, Ordering::Relaxed);
                // Roaming: the peer is wherever it last proved to be.
                state.endpoint = Some(from);
                drop(state);
                if inner.is_empty() {
                    return; // keepalive
                }
                let allowed = packet_address(&inner, false)
                    .and_then(|src| iface.allowed.lookup(src))
                    .is_some_and(|owner| Arc::ptr_eq(owner, &peer));
                if allowed {
                    out.push(shared, &inner);
                } else {
                    debug!(interface = %shared.name, peer = ?peer.public_key,
                        "dropped a packet from a source outside the peer's allowed IPs");
                }
            }
            TunnResult::WriteToNetwork(packet) => {
                let bytes: Packet = packet.into();
                udp.send(shared, from, &bytes, None);
            }
            TunnResult::Err(e) => {
                debug!(interface = %shared.name, peer = ?peer.public_key, "data packet: {e:?}")
            }
            TunnResult::Done => {}
        }
        return;
    }
    if matches!(datagram.first(), Some(1..=3)) {
        // A full queue drops the message: the sender retries, and a flood
        // costs us only this copy.
        let _ = shared.handshakes.try_send((from, datagram.to_vec()));
    }
}

fn handshake_worker(shared: Arc<Shared>, queue: Receiver<(SocketAddr, Vec<u8>)>) {
    let mut mtu = MtuWatcher::new(shared.mtu);
    while !shared.stopping.load(Ordering::Relaxed) {
        let (from, datagram) = match queue.recv_timeout(TIMER_TICK) {
            Ok(message) => message,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(udp) = shared.udp() else { continue };
        let iface = read(&shared.iface);
        receive_handshake(&shared, &iface, &udp, from, &datagram, &mut mtu);
    }
}

fn receive_handshake(
    shared: &Shared,
    iface: &Interface,
    udp: &Udp,
    from: SocketAddr,
    datagram: &[u8],
    mtu: &mut MtuWatcher,
) {
    let (Some(limiter), Some(secret), Some(public)) =
        (&iface.rate_limiter, &iface.secret, &iface.public)
    else {
        return;
    };
    let packet = match limiter.verify_packet(from, Packet::from_bytes(BytesMut::from(datagram))) {
        Ok(packet) => packet,
        Err(TunnResult::WriteToNetwork(cookie)) => {
            // Under load: answer with a cookie instead of doing the DH.
            let bytes: Packet = cookie.into();
            udp.send(shared, from, &bytes, None);
            return;
        }
        Err(_) => return,
    };
    let peer = match &packet {
        WgKind::HandshakeInit(init) => {
            let Ok(half) = parse_handshake_anon(secret, public, init) else {
                return;
            };
            iface.by_key.get(&Key(half.peer_static_public)).cloned()
        }
        WgKind::HandshakeResp(resp) => lock(&shared.by_index)
            .get(&resp.receiver_idx.get())
            .cloned(),
        WgKind::CookieReply(reply) => lock(&shared.by_index)
            .get(&reply.receiver_idx.get())
            .cloned(),
        WgKind::Data(_) => None,
    };
    let Some(peer) = peer else { return };
    let mut state = lock(&peer.state);
    let Some(tunn) = state.tunn.as_mut() else {
        return;
    };
    let is_response = matches!(packet, WgKind::HandshakeResp(_));
    match tunn.handle_incoming_packet(packet) {
        TunnResult::WriteToNetwork(reply) => {
            shared.register_index(&reply, &peer);
            let mut queued: Vec<Packet> = Vec::new();
            if is_response {
                // The session is up: send what waited for it.
                queued.extend(tunn.get_queued_packets(mtu).map(Packet::from));
            }
            state.endpoint = Some(from);
            drop(state);
            let reply: Packet = reply.into();
            let mut sent = reply.len() as u64;
            udp.send(shared, from, &reply, None);
            for packet in queued {
                sent += packet.len() as u64;
                udp.send(shared, from, &packet, None);
            }
            peer.rx_bytes
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
            peer.tx_bytes.fetch_add(sent, Ordering::Relaxed);
        }
        TunnResult::Done => {
            peer.rx_bytes
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
        }
        TunnResult::Err(e) => {
            debug!(interface = %shared.name, peer = ?peer.public_key, "handshake: {e:?}")
        }
        TunnResult::WriteToTunnel(_) => {}
    }
}

// ---------------------------------------------------------------------------
// timers

fn timers(shared: Arc<Shared>) {
    let mut last_prune = Instant::now();
    while !shared.stopping.load(Ordering::Relaxed) {
        shared.wait_readable(None, Some(TIMER_TICK));
        let udp = shared.udp();
        let peers: Vec<Arc<Peer>> = read(&shared.iface).peers.clone();
        for peer in peers {
            let mut state = lock(&peer.state);
            let endpoint = state.endpoint;
            let initiate = std::mem::take(&mut state.initiate);
            let Some(tunn) = state.tunn.as_mut() else {
                continue;
            };
            let due =
                if initiate && endpoint.is_some() && tunn.time_since_last_handshake().is_none() {
                    Ok(tunn.format_handshake_initiation(false).map(WgKind::from))
                } else {
                    tunn.update_timers()
                };
            match due {
                Ok(Some(packet)) => {
                    shared.register_index(&packet, &peer);
                    drop(state);
                    if let (Some(udp), Some(to)) = (&udp, endpoint) {
                        let bytes: Packet = packet.into();
                        peer.tx_bytes
                            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                        udp.send(&shared, to, &bytes, None);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    debug!(interface = %shared.name, peer = ?peer.public_key, "timers: {e:?}")
                }
            }
        }
        if last_prune.elapsed() >= Duration::from_secs(1) {
            last_prune = Instant::now();
            let table = &shared.index_table;
            lock(&shared.by_index).retain(|index, _| table.in_use(*index));
        }
    }
    info!(interface = %shared.name, "WireGuard device stopped");
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    use bgp4mesh_lab::{Lab, can_run};

    use super::*;
    use crate::uapi_server::UapiServer;

    /// A device in a lab namespace with its UAPI socket in a directory of
    /// its own; `None` (skipped loudly) without root.
    struct Served {
        server: UapiServer,
        device: Arc<Device>,
        dir: std::path::PathBuf,
        _lab: Lab,
    }

    impl Served {
        fn start(test: &str) -> Option<Served> {
            if !can_run(test, &[]) {
                return None;
            }
            let lab = Lab::new("wg-uapi").expect("lab");
            let node = lab.add_node("a").expect("node");
            let ifname = lab.unique_ifname("wg").expect("name");
            let device = lab
                .in_netns(&node, || Device::create(DeviceOptions::new(&ifname)))
                .expect("netns")
                .expect("device");
            let device = Arc::new(device);
            let dir = std::env::temp_dir().join(format!("b4m-{test}-{}", std::process::id()));
            let server = UapiServer::start_at(&dir, Arc::clone(&device)).expect("UAPI server");
            Some(Served {
                server,
                device,
                dir,
                _lab: lab,
            })
        }

        /// One request on a new connection, and its reply.
        fn ask(&self, request: &str) -> String {
            ask(self.server.path(), request)
        }

        fn peer_for(&self, addr: &str) -> Option<Key> {
            let addr: IpAddr = addr.parse().expect("address");
            let iface = read(&self.device.shared.iface);
            iface.allowed.lookup(addr).map(|peer| peer.public_key)
        }
    }

    impl Drop for Served {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn ask(socket: &Path, request: &str) -> String {
        let mut stream = UnixStream::connect(socket).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(300)))
            .expect("timeout");
        stream.write_all(request.as_bytes()).expect("write");
        let mut reply = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while !reply.ends_with(b"\n\n") {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8(reply).expect("UTF-8 reply")
    }

    /// The `allowed_ip=` lines of one peer in a `get=1` reply.
    fn allowed_ips_of(reply: &str, peer: &Key) -> Vec<String> {
        let start = format!("public_key={}", peer.to_hex());
        reply
            .lines()
            .skip_while(|l| *l != start)
            .skip(1)
            .take_while(|l| !l.starts_with("public_key="))
            .filter_map(|l| l.strip_prefix("allowed_ip="))
            .map(str::to_string)
            .collect()
    }

    /// Equal lists, or where they first differ (not 200 000 lines of them).
    fn assert_same(got: &[String], want: &[String]) {
        let first = got.iter().zip(want).position(|(g, w)| g != w);
        assert!(
            got.len() == want.len() && first.is_none(),
            "{} listed, {} wanted; first difference at {first:?}: {:?} vs {:?}",
            got.len(),
            want.len(),
            first.map(|i| &got[i]),
            first.map(|i| &want[i])
        );
    }

    /// `n` distinct /32s and /128s, every tenth one IPv6.
    fn many_networks(n: u32) -> Vec<String> {
        (0..n)
            .map(|i| {
                if i % 10 == 9 {
                    let v6 = Ipv6Addr::from(0xfd00_u128 << 112 | u128::from(i));
                    format!("{v6}/128")
                } else {
                    format!("{}/32", Ipv4Addr::from(0x0a00_0000 + i))
                }
            })
            .collect()
    }

    fn set_request(peer: &Key, networks: &[String]) -> String {
        let mut request = format!(
            "set=1\nprivate_key={}\npublic_key={}\nreplace_allowed_ips=true\n",
            Key([9; 32]).to_hex(),
            peer.to_hex()
        );
        for net in networks {
            request.push_str("allowed_ip=");
            request.push_str(net);
            request.push('\n');
        }
        request.push('\n');
        request
    }

    /// 200 000 allowed IPs on one peer through the UAPI socket (parse,
    /// apply, `get=1`): the old code, with a list searched per allowed IP,
    /// took 17 s in a release build; linear, it takes well under a second
    /// (a few in a debug build).
    #[test]
    fn uapi_set_of_200k_allowed_ips_is_linear_and_routes_to_the_peer() {
        let Some(served) = Served::start("uapi_set_of_200k_allowed_ips") else {
            return;
        };
        let (peer, other) = (Key([1; 32]), Key([2; 32]));
        // Another peer has a covering prefix: the more specific ones win.
        let cover = format!(
            "set=1\npublic_key={}\nallowed_ip=10.0.0.0/8\nallowed_ip=fd00::/16\n\n",
            other.to_hex()
        );
        assert_eq!(served.ask(&cover), "errno=0\n\n");
        let networks = many_networks(200_000);
        let request = set_request(&peer, &networks);
        let start = Instant::now();
        assert_eq!(served.ask(&request), "errno=0\n\n");
        let reply = served.ask("get=1\n\n");
        let took = start.elapsed();
        eprintln!("200 000 allowed IPs: set and get in {took:?}");
        assert!(took < Duration::from_secs(10), "set and get took {took:?}");
        assert_same(&allowed_ips_of(&reply, &peer), &networks);
        assert_eq!(allowed_ips_of(&reply, &other), ["10.0.0.0/8", "fd00::/16"]);
        // Numbers 99 999 and 100 000.
        assert_eq!(served.peer_for("fd00::1:869f"), Some(peer));
        assert_eq!(served.peer_for("10.1.134.160"), Some(peer));
        assert_eq!(served.peer_for("10.200.0.1"), Some(other));
        assert_eq!(served.peer_for("192.0.2.1"), None);

        // Half of them moved to the other peer, then that peer removed:
        // the moved ones are gone, the rest stay.
        let mut request = format!("set=1\npublic_key={}\n", other.to_hex());
        for net in networks.iter().step_by(2) {
            request.push_str(&format!("allowed_ip={net}\n"));
        }
        request.push_str(&format!(
            "\nset=1\npublic_key={}\nremove=true\n\n",
            other.to_hex()
        ));
        let start = Instant::now();
        let mut stream = UnixStream::connect(served.server.path()).expect("connect");
        stream.write_all(request.as_bytes()).expect("write");
        let mut replies = String::new();
        let mut buf = [0u8; 64];
        while replies.matches("errno=0\n\n").count() < 2 {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => replies.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        assert_eq!(replies, "errno=0\n\nerrno=0\n\n");
        let reply = served.ask("get=1\n\n");
        let took = start.elapsed();
        assert!(took < Duration::from_secs(10), "moving half took {took:?}");
        let rest: Vec<String> = networks.iter().skip(1).step_by(2).cloned().collect();
        assert_same(&allowed_ips_of(&reply, &peer), &rest);
        assert_eq!(served.peer_for("fd00::1:869f"), Some(peer), "odd: kept");
        assert_eq!(served.peer_for("10.1.134.160"), None, "even: moved, gone");
        assert!(!reply.contains(&other.to_hex()));
    }

    /// Release-build figures for BENCHMARKS-style reports: `SIZES=80000,1000000
    /// cargo test --release -p bgp4mesh-wireguard --lib uapi_set_timing --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn uapi_set_timing() {
        let Some(served) = Served::start("uapi_set_timing") else {
            return;
        };
        let sizes = std::env::var("SIZES").unwrap_or_else(|_| "80000,1000000".into());
        for (k, n) in sizes.split(',').enumerate() {
            let n: u32 = n.trim().parse().expect("SIZES: numbers");
            let peer = Key([k as u8 + 1; 32]);
            let request = set_request(&peer, &many_networks(n));
            let start = Instant::now();
            assert_eq!(served.ask(&request), "errno=0\n\n");
            let set = start.elapsed();
            let start = Instant::now();
            let reply = served.ask("get=1\n\n");
            let get = start.elapsed();
            assert_eq!(allowed_ips_of(&reply, &peer).len(), n as usize);
            eprintln!("{n} allowed IPs: set {set:?}, get {get:?}");
            let remove = format!("set=1\npublic_key={}\nremove=true\n\n", peer.to_hex());
            assert_eq!(served.ask(&remove), "errno=0\n\n");
        }
    }
}
