//! The userspace WireGuard device: a TUN interface, one UDP socket, and the
//! WireGuard protocol of [`gotatun::noise`] (handshake, cookies, timers,
//! transport sessions) for each peer.
//!
//! Four threads run the device, each a blocking loop:
//! - **tun → udp** reads the TUN device with virtio-net offloads (one read
//!   returns a TCP super-packet of up to 64 KiB that tun-rs splits into
//!   segments), finds each packet's peer by destination in the allowed-IPs
//!   table, encrypts, and sends runs of equal-sized datagrams to one endpoint
//!   with one UDP GSO `sendmsg`;
//! - **udp → tun** receives with UDP GRO and `recvmmsg` (quinn-udp),
//!   decrypts, checks the inner source against the peer's allowed IPs, and
//!   writes the batch to the TUN device, where tun-rs coalesces TCP segments
//!   back into super-packets (GRO) so the kernel sees few large packets;
//! - **handshake** takes handshake and cookie messages from the receive
//!   thread's bounded queue and answers them, rate-limited (cookies under
//!   load), so a flood of handshakes does not stall transport data;
//! - **timers** calls each peer's timers every 100 ms (handshake retries,
//!   rekey, keepalives) and prunes the session-index map.
//!
//! A peer's protocol state sits behind one mutex, taken once per run of
//! packets. gotatun encrypts and decrypts through `&mut Tunn`, so one peer's
//! transport crypto runs on one core at a time; the two directions run on
//! both. ARCHITECTURE.md says why that is enough on a 2-core machine.
//!
//! The code is laid out by what it does:
//! - this module: [`Device`] and the state the threads share;
//! - `outbound`: the tun → udp thread (encryption, GSO batches);
//! - `icmp`: the ICMP errors it answers packets no peer takes with;
//! - `natted`: for a packet its host NATed into it, the original sender
//!   (connection tracking) and the host's socket to answer that sender;
//! - `route_loop`: its own datagrams routed back into it, dropped;
//! - `routes`: what the kernel's routes say (sticky sources whose route
//!   left their interface, routes through the device with an MTU), asked
//!   by the timer thread;
//! - `inbound`: the udp → tun thread (decryption, GRO batches);
//! - `handshake`: the handshake thread, fed by the receive thread;
//! - `timers`: the timer thread;
//! - `punch`: hole punching through NATs, and other protocols' datagrams
//!   on the device's socket (endpoint discovery);
//! - `cluster`: session handover between servers sharing an identity
//!   (a fifth thread, when the device is in a cluster);
//! - `configure`: [`Device::apply`] and [`Device::configure`], peers and keys;
//! - `udp`: the UDP socket (binding, GSO sends).

mod cluster;
mod configure;
mod handshake;
mod icmp;
mod inbound;
mod natted;
mod outbound;
mod punch;
mod route_loop;
mod routes;
mod timers;
mod udp;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use gotatun::noise::index_table::IndexTable;
use gotatun::noise::rate_limiter::RateLimiter;
use gotatun::noise::{TimerParams, Tunn};
use gotatun::packet::WgKind;
use gotatun::tun::MtuWatcher;
use gotatun::x25519;
use quinn_udp::UdpSocketState;
use tracing::info;
use tun_rs::SyncDevice;

use crate::allowed_ips::{AllowedIps, Owner};
use crate::config::{DeviceStatus, PeerStatus};
use crate::key::Key;
use cluster::Cluster;
pub use cluster::{ClusterOptions, ClusterStatus, MemberStatus, cluster_sync_deadline};
use handshake::handshake_worker;
use inbound::udp_to_tun;
use outbound::tun_to_udp;
pub use punch::ForeignSender;
use timers::timers;
pub use udp::bind_udp_any;
use udp::{Source, Target};

/// WireGuard's default MTU: 1500 minus the IPv6, UDP and WireGuard overhead.
pub const DEFAULT_MTU: u16 = 1420;
const TIMER_TICK: Duration = Duration::from_millis(100);
/// Handshake messages waiting for the handshake thread; more are dropped.
const HANDSHAKE_QUEUE: usize = 1024;
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
    /// The interface's MTU as the kernel has it now: the one it was
    /// created with until `ip link set mtu` (wg-quick, an operator) changes
    /// it, read again by the timer thread ([`Shared::refresh_mtu`]).
    /// Transport data is padded up to it and never beyond, as the kernel
    /// module pads to its device's current MTU: a device lowered to fit
    /// inside another tunnel (1340 in 1420) must send datagrams that fit,
    /// or every full-size packet is fragmented on the way.
    mtu: AtomicU16,
    /// Routes through the interface with an MTU of their own, which
    /// padding stays within too (`routes`); normally none.
    route_mtus: routes::RouteMtuCell,
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
    handshakes: SyncSender<Received>,
    /// The network namespace the device was created in. A socket bound
    /// later (a new listen port) must live there too, whichever thread
    /// asks for it.
    netns: Option<std::fs::File>,
    /// Written once, on stop; every wait also polls it.
    stop_fd: OwnedFd,
    stopping: AtomicBool,
    /// Set when the device stopped because its interface disappeared
    /// (deleted, or its namespace deleted): the TUN read failed with
    /// EBADFD, which costs nothing until it happens.
    gone: AtomicBool,
    /// The interface is down (`ip link set down`, or not brought up yet:
    /// it is created down), as the timer thread last saw it
    /// (`routes::RouteWatch`). As the kernel module, a device that is down
    /// sends nothing of its own: no handshake when a persistent keepalive
    /// is turned on, no timers; bringing it up sends each persistent
    /// keepalive ([`Shared::came_up`]). False when the state cannot be
    /// seen: the interface moved into another namespace than the
    /// device's (`ip link set netns`), or no rtnetlink.
    down: AtomicBool,
    /// Datagrams sent larger than the path to their endpoint allows, for
    /// the kernel to fragment ([`DeviceStatus::fragmented_datagrams`]).
    fragmented: AtomicU64,
    /// The servers this device shares its identity with, if any
    /// ([`Device::set_cluster`]).
    cluster: RwLock<Option<Arc<Cluster>>>,
    /// Hole punches under way ([`Device::punch`]).
    punches: punch::Punches,
    /// Where datagrams of another protocol go ([`Device::set_foreign_receiver`]).
    foreign: RwLock<Option<punch::Foreign>>,
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
    /// The largest datagram that may go out in a GSO run to this peer:
    /// `usize::MAX` until a run was refused as larger than the path, then
    /// one less than its segment size, until the timer thread forgets it.
    gso_limit: AtomicUsize,
    /// Set by a send whose source address the kernel refused (it was
    /// removed): whoever next takes the peer's state forgets the source
    /// ([`PeerState::target`]). An atomic, so a send needs no lock.
    source_refused: AtomicBool,
    /// Its public key is a point of small order: every Diffie-Hellman
    /// with it is all zeros, so no handshake with it can succeed. Neither
    /// a persistent keepalive, nor the device coming up, nor its timers
    /// send it an initiation (the kernel module's precomputed
    /// static-static is zero, and its initiation fails).
    low_order: bool,
    /// Data that arrived for our handshake under way before its response
    /// was through the handshake thread (crossing handshakes: the peer
    /// answered our initiation and sends at once, while the answer waits
    /// in the queue). Decrypted once the response is in; bounded
    /// ([`EARLY_DATA`]), dropped after [`EARLY_DATA_KEPT`]. Only touched
    /// when a data packet finds no session.
    early: Mutex<Option<EarlyData>>,
}

/// Data packets held for a handshake response: when the first came, and
/// their bytes.
struct EarlyData {
    since: std::time::Instant,
    datagrams: Vec<Vec<u8>>,
}

/// How long a direct path that was heard from keeps a peer's endpoint
/// against packets from its relay.
const DIRECT_KEPT: Duration = Duration::from_secs(15);

/// At most this many data packets are held per peer for a response.
const EARLY_DATA: usize = 128;
/// Held data older than this is dropped (the response never came).
const EARLY_DATA_KEPT: Duration = Duration::from_secs(1);

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
    /// The local address the peer's last authenticated packet came to, to
    /// send from ("sticky source", as the kernel module and wireguard-go
    /// keep it): `None` until one arrived, for a configured endpoint,
    /// after the kernel refused it (the address was removed), and once
    /// the route to the endpoint leaves by another interface than the
    /// peer's packets came in on (`routes`).
    source: Option<Source>,
    /// Start a handshake as soon as the peer has an endpoint: a peer given
    /// one by [`Device::configure`] (a restarted peer's old session is
    /// useless to the other side, which would otherwise wait up to 15 s to
    /// notice), or a persistent keepalive just turned on.
    initiate: bool,
    /// When we last sent it a handshake to take over another cluster
    /// member's session ([`cluster`]): at most one per second.
    handed_over: Option<std::time::Instant>,
    /// The peer's relay, as the device sees it (a local address that
    /// forwards to the relay): a fallback that never replaces a direct
    /// endpoint still in use ([`PeerState::learn`]).
    fallback: Option<SocketAddr>,
    /// When an authenticated packet last came from elsewhere than the
    /// fallback (only kept while there is one).
    direct_heard: Option<std::time::Instant>,
    /// The peer's address in the other family ([`Device::set_second_endpoint`]):
    /// a handshake that went unanswered is retried there too.
    second: Option<SocketAddr>,
    /// When the timer thread last sent the peer a handshake initiation.
    initiated: Option<std::time::Instant>,
    /// Data held since we answered the peer's initiation, until the peer
    /// confirms the session (its first packet on it) or our own
    /// initiation completes: see [`Held`].
    held: Option<Held>,
}

/// Outgoing data held while our newest session is one we answered and the
/// peer has not used yet. gotatun sends on such a session at once when it
/// is the only one; the kernel module and wireguard-go wait, as the
/// protocol says, because the initiator may not have finished the
/// handshake yet (its response waits in a queue while our data takes the
/// fast path, and is dropped). So crossing handshakes, and a first
/// contact where we answer, lose nothing. Bounded ([`HELD_PACKETS`]), and
/// let go after [`HELD_FOR`] whatever happens.
struct Held {
    since: std::time::Instant,
    packets: Vec<Vec<u8>>,
}

/// At most this many packets are held per peer (gotatun's own queue holds 256).
const HELD_PACKETS: usize = 256;
/// Held packets go out on whatever session there is after this long.
const HELD_FOR: Duration = Duration::from_secs(1);

impl PeerState {
    /// Where the peer's packets go and from which address; forgets a
    /// source the kernel refused since (one relaxed load in the common case).
    fn target(&mut self, peer: &Peer) -> Option<Target> {
        if peer.source_refused.load(Ordering::Relaxed) {
            peer.source_refused.store(false, Ordering::Relaxed);
            self.source = None;
        }
        self.endpoint.map(|to| Target {
            to,
            src: self.source,
        })
    }

    /// The peer proved to be at `from`, having sent to our `source`. A
    /// packet from the peer's relay ([`Device::set_fallback_endpoint`])
    /// does not move an endpoint that the peer's packets came from directly
    /// in the last [`DIRECT_KEPT`]: relayed packets still in flight when a
    /// direct path opens must not take the pair back to the relay.
    fn learn(&mut self, from: SocketAddr, source: Option<Source>) {
        if let Some(relayed) = self.fallback {
            let now = std::time::Instant::now();
            if from == relayed {
                let direct = self.endpoint.is_some_and(|e| e != relayed);
                if direct && self.direct_heard.is_some_and(|t| now - t < DIRECT_KEPT) {
                    return;
                }
            } else {
                self.direct_heard = Some(now);
            }
        }
        self.endpoint = Some(from);
        self.source = source;
    }
}

/// A handshake message for the handshake thread: where it came from, the
/// local address it came to, and its bytes.
struct Received {
    from: SocketAddr,
    source: Option<Source>,
    datagram: Vec<u8>,
}

struct Udp {
    socket: socket2::Socket,
    state: UdpSocketState,
    port: u16,
    /// Bound to `[::]` with IPv4 mapped in, so IPv4 endpoints are sent
    /// to as `::ffff:a.b.c.d`.
    dual_stack: bool,
    /// Set once the kernel refused a GSO send as unsupported (EIO/EINVAL
    /// without a source): datagrams go one by one from then on.
    gso_off: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(PoisonError::into_inner)
}

impl Device {
    /// Creates the TUN interface (down, no address, as wireguard-go leaves
    /// it: bringing it up, addresses and routes are the caller's job, the
    /// `kernel` crate's or the operator's), binds a UDP socket on a free
    /// port and starts the packet threads.
    pub fn create(options: DeviceOptions) -> io::Result<Device> {
        let tun = tun_rs::DeviceBuilder::new()
            .name(&options.name)
            .mtu(options.mtu)
            // tun-rs brings a new device up by default, and the kernel then
            // gives it an IPv6 link-local address.
            .enable(false)
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
            mtu: AtomicU16::new(options.mtu),
            route_mtus: routes::RouteMtuCell::default(),
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
            gone: AtomicBool::new(false),
            down: AtomicBool::new(true),
            fragmented: AtomicU64::new(0),
            cluster: RwLock::new(None),
            punches: Default::default(),
            foreign: RwLock::new(None),
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

    /// True once the device stopped because its interface disappeared:
    /// deleted (`ip link del`, `wg-quick down`), or the network namespace
    /// holding it deleted. The device does not come back; its owner makes
    /// a new one if it wants the interface again. Noticed on the TUN read
    /// (the kernel answers EBADFD once the interface is gone), within a
    /// second.
    pub fn interface_gone(&self) -> bool {
        self.shared.gone.load(Ordering::Relaxed)
    }

    /// Waits until the device stops (its interface deleted, or
    /// [`Device::stop`] called from elsewhere).
    pub fn wait(&self) {
        while self.is_running() {
            self.shared
                .wait_readable(None, Some(Duration::from_secs(1)));
        }
    }

    /// Waits until `fd` is readable, the device stops, or `timeout` passes
    /// (the UAPI server's accept loop).
    pub(crate) fn wait_readable(&self, fd: RawFd, timeout: Duration) {
        self.shared.wait_readable(Some(fd), Some(timeout));
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

    /// The device and its peers with their counters.
    pub fn status(&self) -> DeviceStatus {
        self.shared.status()
    }

    /// Joins the device to a cluster of servers that share its identity
    /// (key, address, peers), or leaves it (`None`); a changed cluster is
    /// left and joined anew. See the `cluster` module for what it does.
    pub fn set_cluster(&self, options: Option<ClusterOptions>) -> io::Result<()> {
        let current = self.shared.cluster();
        if current.as_ref().map(|c| c.options()) == options.as_ref() {
            return Ok(());
        }
        if let Some(old) = self
            .shared
            .cluster
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            old.stop();
        }
        if let Some(options) = options {
            let cluster = Cluster::start(&self.shared, options)?;
            *self
                .shared
                .cluster
                .write()
                .unwrap_or_else(PoisonError::into_inner) = Some(cluster);
        }
        Ok(())
    }

    /// The cluster's state, if the device is in one.
    pub fn cluster_status(&self) -> Option<ClusterStatus> {
        self.shared.cluster().map(|c| c.status())
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.shared.stop();
        if let Some(cluster) = self
            .shared
            .cluster
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            cluster.stop();
        }
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
// Shared state

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

    /// What gotatun pads transport data up to: the interface's MTU as
    /// last read (the handshake thread's queued packets; the transmit
    /// path also minds routes with an MTU, [`routes::Padding`]).
    fn mtu_watcher(&self) -> MtuWatcher {
        MtuWatcher::new(self.mtu.load(Ordering::Relaxed))
    }

    /// Reads the interface's MTU again; kept as it was if the interface
    /// cannot say (it is being deleted).
    fn refresh_mtu(&self) {
        if let Ok(mtu) = self.tun.mtu()
            && mtu > 0
        {
            self.mtu.store(mtu, Ordering::Relaxed);
        }
    }

    fn udp(&self) -> Option<Arc<Udp>> {
        read(&self.udp).clone()
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
                    local_address: state.source.map(|s| s.ip()),
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
            fragmented_datagrams: self.fragmented.load(Ordering::Relaxed),
            peers,
        }
    }

    /// Lets go of the data held for `peer` ([`Held`]): encrypted on its
    /// current session (or queued by gotatun for a handshake), with where
    /// it goes. The caller sends it once the peer's state is unlocked.
    #[cold]
    fn release_held(
        &self,
        peer: &Arc<Peer>,
        state: &mut PeerState,
    ) -> Option<(Target, Vec<gotatun::packet::Packet>)> {
        let held = state.held.take()?;
        let target = state.target(peer)?;
        let tunn = state.tunn.as_mut()?;
        let mut mtu = routes::Padding::new(self);
        let mut out = Vec::with_capacity(held.packets.len());
        for packet in held.packets {
            let pad_to = mtu.for_packet(&packet);
            let packet = gotatun::packet::Packet::from_bytes(bytes::BytesMut::from(&packet[..]));
            if let Some(message) = tunn.handle_outgoing_packet(packet, Some(pad_to)) {
                self.register_index(&message, peer);
                out.push(message.into());
            }
        }
        Some((target, out))
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
