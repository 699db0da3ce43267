//! Session handover between servers that share one WireGuard identity
//! (seed 001: two servers hold the same VIP, key and clients behind a
//! router's port forward and ECMP).
//!
//! A client's session lives on the server that made it. When that server
//! dies, the router sends the client's packets to another one, which has
//! never seen the session's index and used to drop them until the client's
//! own timers gave up on it (15 s). Here each server tells the others, over
//! an authenticated and encrypted channel, which session indices it holds
//! for which peer and where that peer is. A server that receives a data
//! packet for an index another member holds knows whose packet it is and
//! answers with a handshake initiation at once (rate-limited per peer); the
//! client's response makes a new session on this server and the tunnel
//! carries traffic again one round trip after the packet arrived.
//!
//! No session key leaves a server: the channel carries indices, public keys
//! and endpoints, never keys or counters, so no nonce can be used twice
//! with one key and a stolen sync message decrypts nothing of the tunnel.
//!
//! The channel: UDP between the configured member addresses only, each
//! datagram sealed with XChaCha20-Poly1305 under the shared cluster key
//! (random 24-byte nonces), carrying the sender's boot id, a sequence
//! number and its wall clock. A datagram from any other address, one that
//! fails to open, is older than [`FRESH`], repeats a sequence number or
//! comes from an earlier boot of a member is dropped and counted. Members
//! say hello every [`HELLO_EVERY`]; one silent for [`MEMBER_LOST`] is down,
//! and one that comes up (or restarts) is sent every session we hold. A new
//! member is [`ClusterStatus::synced`] once every other member sent it
//! theirs, or stayed silent for [`SYNC_WAIT`]: its owner announces the VIP
//! only then.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use gotatun::packet::{Packet, WgKind};
use rand_core::{OsRng, RngCore};
use tracing::{debug, info, warn};

use super::udp::{Source, Target};
use super::{Interface, Shared, Udp, lock, read};
use crate::key::Key;

/// How often members say hello.
pub const HELLO_EVERY: Duration = Duration::from_secs(1);
/// A member not heard from for this long is down.
pub const MEMBER_LOST: Duration = Duration::from_secs(3);
/// A starting member waits this long for silent members before it counts
/// itself synced.
pub const SYNC_WAIT: Duration = Duration::from_secs(3);
/// A message whose sender's clock differs from ours by more than this is
/// refused (a replay of an old one); the members' clocks must agree
/// (NTP) within it.
pub const FRESH: Duration = Duration::from_secs(30);
/// How long a starting member waits at most before it counts itself
/// synced, whatever the others say.
pub fn cluster_sync_deadline() -> Duration {
    SYNC_WAIT * 3
}

/// A peer is sent at most one handover initiation per this interval.
pub const HANDOVER_INTERVAL: Duration = Duration::from_secs(1);
/// Another member's session is forgotten this long after it was last
/// said (a WireGuard session is dead after 3 × 180 s).
const FOREIGN_KEPT: Duration = Duration::from_secs(600);
/// Sessions of other members kept at most (a bound on what a member,
/// even a compromised one, can make us hold).
const MAX_FOREIGN: usize = 1 << 20;

const MAGIC: &[u8; 4] = b"b4mc";
const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 8 + 8 + 8 + 8 + 1 + 1 + 2;
const ENTRY_LEN: usize = 4 + 32 + 1 + 16 + 2;
/// Entries per datagram: under 1200 bytes on the wire.
pub const ENTRIES_PER_MESSAGE: usize = 20;
/// The largest datagram the channel sends or reads.
pub const MAX_DATAGRAM: usize =
    MAGIC.len() + 1 + NONCE_LEN + HEADER_LEN + ENTRIES_PER_MESSAGE * ENTRY_LEN + TAG_LEN;

const KIND_HELLO: u8 = 1;
const KIND_SESSIONS: u8 = 2;
const FLAG_WANT_DUMP: u8 = 1;
const FLAG_DUMP: u8 = 2;
const FLAG_LAST: u8 = 4;

/// How a device joins a cluster.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// Our end of the sync channel, bound in the device's namespace.
    pub listen: SocketAddr,
    /// The other servers' sync addresses.
    pub members: Vec<SocketAddr>,
    /// The key every member has; it seals every message.
    pub key: Key,
}

impl std::fmt::Debug for ClusterOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterOptions")
            .field("listen", &self.listen)
            .field("members", &self.members)
            .field("key", &"(secret)")
            .finish()
    }
}

/// What `show wireguard` says of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterStatus {
    pub listen: SocketAddr,
    /// Every other member has sent us its sessions (or stayed silent for
    /// [`SYNC_WAIT`] after we started).
    pub synced: bool,
    pub members: Vec<MemberStatus>,
    /// Sessions of ours the others know of.
    pub sessions_held: usize,
    /// Data packets for another member's session answered with a
    /// handshake (a client taken over).
    pub handovers: u64,
    /// Datagrams refused: from an address not a member, not opening with
    /// the key, stale, replayed, or malformed.
    pub refused: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub address: SocketAddr,
    /// Heard from within [`MEMBER_LOST`].
    pub connected: bool,
    /// When it was last heard from.
    pub last_heard: Option<SystemTime>,
    /// Its sessions we know of.
    pub sessions: usize,
    /// It sent us all its sessions since it came up.
    pub synced: bool,
}

// ---------------------------------------------------------------------------
// Messages

/// A session a member holds: the index its peer addresses data to, the
/// peer, and where the peer was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub index: u32,
    pub peer: Key,
    pub endpoint: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// "I am here"; asks for every session the receiver holds.
    Hello { want_dump: bool },
    /// Sessions made since the last message.
    Sessions { entries: Vec<Entry> },
    /// Part of a full dump of the sender's sessions; `last` closes it.
    Dump { entries: Vec<Entry>, last: bool },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Random per start of the sender.
    pub boot: u64,
    /// Increases with each message of one boot.
    pub seq: u64,
    /// The sender's wall clock, ms since the epoch.
    pub sent_at_ms: u64,
    /// How many sessions the sender has announced this boot, this message
    /// included: a receiver that got fewer missed some and asks for all.
    pub made: u64,
    pub body: Body,
}

/// Why a datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotAMember,
    Malformed,
    /// Does not open with the cluster key (forged, or another cluster's).
    Unauthenticated,
    Stale,
    Replayed,
}

pub fn seal(cipher: &XChaCha20Poly1305, message: &Message) -> Vec<u8> {
    let mut plain = Vec::with_capacity(HEADER_LEN + ENTRIES_PER_MESSAGE * ENTRY_LEN);
    plain.extend_from_slice(&message.boot.to_be_bytes());
    plain.extend_from_slice(&message.seq.to_be_bytes());
    plain.extend_from_slice(&message.sent_at_ms.to_be_bytes());
    plain.extend_from_slice(&message.made.to_be_bytes());
    match &message.body {
        Body::Hello { want_dump } => {
            plain.push(KIND_HELLO);
            plain.push(if *want_dump { FLAG_WANT_DUMP } else { 0 });
            plain.extend_from_slice(&0u16.to_be_bytes());
        }
        Body::Sessions { entries } | Body::Dump { entries, .. } => {
            plain.push(KIND_SESSIONS);
            plain.push(match &message.body {
                Body::Dump { last: true, .. } => FLAG_DUMP | FLAG_LAST,
                Body::Dump { last: false, .. } => FLAG_DUMP,
                _ => 0,
            });
            let n = entries.len().min(ENTRIES_PER_MESSAGE);
            plain.extend_from_slice(&(n as u16).to_be_bytes());
            for entry in &entries[..n] {
                plain.extend_from_slice(&entry.index.to_be_bytes());
                plain.extend_from_slice(&entry.peer.0);
                let (family, ip) = match entry.endpoint.ip() {
                    IpAddr::V4(v4) => (4u8, v4.to_ipv6_mapped().octets()),
                    IpAddr::V6(v6) => (6u8, v6.octets()),
                };
                plain.push(family);
                plain.extend_from_slice(&ip);
                plain.extend_from_slice(&entry.endpoint.port().to_be_bytes());
            }
        }
    }
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    let mut aad = [0u8; 5];
    aad[..4].copy_from_slice(MAGIC);
    aad[4] = VERSION;
    let mut out = Vec::with_capacity(aad.len() + NONCE_LEN + plain.len() + TAG_LEN);
    out.extend_from_slice(&aad);
    out.extend_from_slice(&nonce);
    // Sealing in memory cannot fail for inputs this small; an empty datagram
    // (refused by every receiver) stands in for the impossible.
    match cipher.encrypt(
        XNonce::from_slice(&nonce),
        Payload {
            msg: &plain,
            aad: &aad,
        },
    ) {
        Ok(sealed) => out.extend_from_slice(&sealed),
        Err(_) => out.clear(),
    }
    out
}

/// Opens and parses a datagram (authenticated before anything of it is
/// read but its length and fixed header).
pub fn open(cipher: &XChaCha20Poly1305, datagram: &[u8]) -> Result<Message, Refusal> {
    let min = MAGIC.len() + 1 + NONCE_LEN + HEADER_LEN + TAG_LEN;
    if datagram.len() < min || datagram.len() > MAX_DATAGRAM {
        return Err(Refusal::Malformed);
    }
    let (aad, rest) = datagram.split_at(MAGIC.len() + 1);
    if &aad[..4] != MAGIC || aad[4] != VERSION {
        return Err(Refusal::Malformed);
    }
    let (nonce, sealed) = rest.split_at(NONCE_LEN);
    let plain = cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad })
        .map_err(|_| Refusal::Unauthenticated)?;
    parse(&plain).ok_or(Refusal::Malformed)
}

fn parse(plain: &[u8]) -> Option<Message> {
    let u64_at = |at: usize| -> Option<u64> {
        Some(u64::from_be_bytes(plain.get(at..at + 8)?.try_into().ok()?))
    };
    let boot = u64_at(0)?;
    let seq = u64_at(8)?;
    let sent_at_ms = u64_at(16)?;
    let made = u64_at(24)?;
    let kind = *plain.get(32)?;
    let flags = *plain.get(33)?;
    let count = usize::from(u16::from_be_bytes(plain.get(34..36)?.try_into().ok()?));
    let body = match kind {
        KIND_HELLO if count == 0 && plain.len() == HEADER_LEN => Body::Hello {
            want_dump: flags & FLAG_WANT_DUMP != 0,
        },
        KIND_SESSIONS
            if count <= ENTRIES_PER_MESSAGE && plain.len() == HEADER_LEN + count * ENTRY_LEN =>
        {
            let mut entries = Vec::with_capacity(count);
            for raw in plain[HEADER_LEN..].chunks_exact(ENTRY_LEN) {
                let index = u32::from_be_bytes(raw[0..4].try_into().ok()?);
                let peer = Key(raw[4..36].try_into().ok()?);
                let ip: [u8; 16] = raw[37..53].try_into().ok()?;
                let ip = std::net::Ipv6Addr::from(ip);
                let ip = match raw[36] {
                    4 => IpAddr::V4(ip.to_ipv4_mapped()?),
                    6 => IpAddr::V6(ip),
                    _ => return None,
                };
                let port = u16::from_be_bytes(raw[53..55].try_into().ok()?);
                entries.push(Entry {
                    index,
                    peer,
                    endpoint: SocketAddr::new(ip, port),
                });
            }
            if flags & FLAG_DUMP != 0 {
                Body::Dump {
                    entries,
                    last: flags & FLAG_LAST != 0,
                }
            } else {
                Body::Sessions { entries }
            }
        }
        _ => return None,
    };
    Some(Message {
        boot,
        seq,
        sent_at_ms,
        made,
        body,
    })
}

// ---------------------------------------------------------------------------
// Who said what: replay and freshness

/// Boots of a member remembered as past, so their messages stay refused.
const PAST_BOOTS: usize = 16;

/// What we know of one member's messages.
#[derive(Debug, Default, Clone)]
pub struct Sender {
    boot: Option<u64>,
    last_seq: u64,
    past: VecDeque<u64>,
}

impl Sender {
    /// Accepts `message` if it is fresh at `now_ms` and follows what this
    /// member sent before; returns whether it comes from a new boot (the
    /// member restarted: it holds none of its old sessions and wants ours).
    pub fn accept(&mut self, message: &Message, now_ms: u64) -> Result<bool, Refusal> {
        if message.sent_at_ms.abs_diff(now_ms) > FRESH.as_millis() as u64 {
            return Err(Refusal::Stale);
        }
        match self.boot {
            Some(boot) if boot == message.boot => {
                if message.seq <= self.last_seq {
                    return Err(Refusal::Replayed);
                }
                self.last_seq = message.seq;
                Ok(false)
            }
            _ if self.past.contains(&message.boot) => Err(Refusal::Replayed),
            previous => {
                if let Some(old) = previous {
                    if self.past.len() == PAST_BOOTS {
                        self.past.pop_front();
                    }
                    self.past.push_back(old);
                }
                self.boot = Some(message.boot);
                self.last_seq = message.seq;
                Ok(true)
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The running cluster

struct Member {
    address: SocketAddr,
    sender: Sender,
    last_heard: Option<Instant>,
    last_heard_wall: Option<SystemTime>,
    /// It sent us a full dump since it came up.
    dumped: bool,
    /// When we last sent it a full dump.
    last_dump: Option<Instant>,
    /// How many of its announcements we have (its [`Message::made`] as
    /// of its last dump, plus what came since).
    made_got: u64,
}

impl Member {
    fn connected(&self) -> bool {
        self.last_heard.is_some_and(|t| t.elapsed() < MEMBER_LOST)
    }
}

struct Foreign {
    peer: Key,
    endpoint: SocketAddr,
    member: usize,
    said: Instant,
}

pub(super) struct Cluster {
    options: ClusterOptions,
    socket: UdpSocket,
    cipher: XChaCha20Poly1305,
    boot: u64,
    seq: AtomicU64,
    /// Sessions announced this boot ([`Message::made`]); only the
    /// cluster thread sends, so it changes with `ours`.
    made: AtomicU64,
    started: Instant,
    members: Mutex<Vec<Member>>,
    /// Other members' sessions, by the index their peers address.
    foreign: Mutex<HashMap<u32, Foreign>>,
    /// Our sessions, for full dumps.
    ours: Mutex<HashMap<u32, (Key, SocketAddr)>>,
    /// Sessions made since the cluster thread last looked.
    outbox: Mutex<Vec<Entry>>,
    synced: AtomicBool,
    handovers: AtomicU64,
    refused: AtomicU64,
    stopping: AtomicBool,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Cluster {
    /// Binds the channel (in the device's namespace) and starts its thread.
    pub(super) fn start(shared: &Arc<Shared>, options: ClusterOptions) -> io::Result<Arc<Cluster>> {
        let listen = options.listen;
        let socket = shared.in_device_netns(move || {
            let socket = UdpSocket::bind(listen)?;
            socket.set_nonblocking(true)?;
            Ok(socket)
        })?;
        let members = options
            .members
            .iter()
            .map(|&address| Member {
                address: canonical(address),
                sender: Sender::default(),
                last_heard: None,
                last_heard_wall: None,
                dumped: false,
                last_dump: None,
                made_got: 0,
            })
            .collect();
        let cluster = Arc::new(Cluster {
            cipher: XChaCha20Poly1305::new((&options.key.0).into()),
            options,
            socket,
            boot: OsRng.next_u64(),
            seq: AtomicU64::new(0),
            made: AtomicU64::new(0),
            started: Instant::now(),
            members: Mutex::new(members),
            foreign: Mutex::new(HashMap::new()),
            ours: Mutex::new(HashMap::new()),
            outbox: Mutex::new(Vec::new()),
            synced: AtomicBool::new(false),
            handovers: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let (for_thread, shared) = (Arc::clone(&cluster), Arc::clone(shared));
        let thread = std::thread::Builder::new()
            .name(format!("wg-cluster-{}", shared.name))
            .spawn(move || for_thread.run(&shared))?;
        *lock(&cluster.thread) = Some(thread);
        info!(interface = %cluster_name(&cluster), listen = %listen,
            members = ?cluster.options.members, "WireGuard cluster joined");
        Ok(cluster)
    }

    pub(super) fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// Stops the thread and waits for it.
    pub(super) fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        if let Some(thread) = lock(&self.thread).take() {
            let _ = thread.join();
        }
    }

    /// A session of ours is up: the others are told.
    pub(super) fn session_made(&self, index: u32, peer: Key, endpoint: SocketAddr) {
        lock(&self.outbox).push(Entry {
            index,
            peer,
            endpoint: canonical(endpoint),
        });
    }

    /// A data packet came for `index`, which is none of ours: if another
    /// member holds it, its peer gets a handshake initiation from us at
    /// once, to `from` (it is there now) from the address it sent to. The
    /// peer's state learns the address only if the member saw it there
    /// too; the response that makes the session proves it anyway.
    pub(super) fn take_over(
        &self,
        shared: &Shared,
        iface: &Interface,
        udp: &Udp,
        index: u32,
        (from, source): (SocketAddr, Option<Source>),
    ) {
        let Some((key, seen_at)) = lock(&self.foreign)
            .get(&index)
            .map(|f| (f.peer, f.endpoint))
        else {
            return;
        };
        let Some(peer) = iface.by_key.get(&key).cloned() else {
            return;
        };
        let mut state = lock(&peer.state);
        if state
            .handed_over
            .is_some_and(|at| at.elapsed() < HANDOVER_INTERVAL)
        {
            return;
        }
        let Some(tunn) = state.tunn.as_mut() else {
            return;
        };
        let Some(init) = tunn.format_handshake_initiation(true) else {
            return;
        };
        state.handed_over = Some(Instant::now());
        if state.endpoint.is_none() || seen_at == canonical(from) {
            state.learn(from, source);
        }
        let packet = WgKind::from(init);
        shared.register_index(&packet, &peer);
        drop(state);
        let bytes: Packet = packet.into();
        udp.send(
            shared,
            Target {
                to: from,
                src: source,
            },
            Some(&peer),
            &bytes,
            None,
        );
        self.handovers.fetch_add(1, Ordering::Relaxed);
        info!(interface = %shared.name, peer = ?peer.public_key, %from,
            "taking over a session of another cluster member: handshake sent");
    }

    pub(super) fn status(&self) -> ClusterStatus {
        let foreign = lock(&self.foreign);
        let members = lock(&self.members)
            .iter()
            .enumerate()
            .map(|(i, m)| MemberStatus {
                address: m.address,
                connected: m.connected(),
                last_heard: m.last_heard_wall,
                sessions: foreign.values().filter(|f| f.member == i).count(),
                synced: m.dumped,
            })
            .collect();
        ClusterStatus {
            listen: self.options.listen,
            synced: self.synced.load(Ordering::Relaxed),
            members,
            sessions_held: lock(&self.ours).len(),
            handovers: self.handovers.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    fn run(&self, shared: &Shared) {
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        let mut last_hello: Option<Instant> = None;
        while !self.stopping.load(Ordering::Relaxed) && !shared.stopping.load(Ordering::Relaxed) {
            shared.wait_readable(
                Some(self.socket.as_raw_fd()),
                Some(Duration::from_millis(100)),
            );
            loop {
                match self.socket.recv_from(&mut buf) {
                    Ok((n, from)) => self.receive(shared, canonical(from), &buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        debug!(interface = %shared.name, "cluster receive: {e}");
                        break;
                    }
                }
            }
            let made = std::mem::take(&mut *lock(&self.outbox));
            if !made.is_empty() {
                {
                    let mut ours = lock(&self.ours);
                    for entry in &made {
                        ours.insert(entry.index, (entry.peer, entry.endpoint));
                    }
                }
                let addresses: Vec<SocketAddr> =
                    lock(&self.members).iter().map(|m| m.address).collect();
                // Each chunk counts as it goes: every member gets the same
                // numbering.
                for chunk in made.chunks(ENTRIES_PER_MESSAGE) {
                    self.made.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    for &to in &addresses {
                        self.send(
                            to,
                            Body::Sessions {
                                entries: chunk.to_vec(),
                            },
                        );
                    }
                }
            }
            if last_hello.is_none_or(|t| t.elapsed() >= HELLO_EVERY) {
                last_hello = Some(Instant::now());
                self.tick(shared);
            }
        }
    }

    /// Once per [`HELLO_EVERY`]: hellos, lost members, pruning, sync state.
    fn tick(&self, shared: &Shared) {
        let hellos: Vec<(SocketAddr, bool)> = {
            let mut members = lock(&self.members);
            for m in members.iter_mut() {
                if !m.connected() {
                    m.dumped = false;
                }
            }
            members.iter().map(|m| (m.address, !m.dumped)).collect()
        };
        for (to, want_dump) in hellos {
            self.send(to, Body::Hello { want_dump });
        }
        let table = &shared.index_table;
        lock(&self.ours).retain(|index, _| table.in_use(*index));
        lock(&self.foreign).retain(|_, f| f.said.elapsed() < FOREIGN_KEPT);
        if !self.synced.load(Ordering::Relaxed) {
            let waited = self.started.elapsed() >= SYNC_WAIT;
            let members = lock(&self.members);
            let synced = members
                .iter()
                .all(|m| m.dumped || (waited && m.last_heard.is_none()));
            if synced {
                self.synced.store(true, Ordering::Relaxed);
                let heard = members.iter().filter(|m| m.dumped).count();
                info!(interface = %shared.name, "cluster synced ({heard} of {} member(s) heard)",
                    members.len());
            } else if self.started.elapsed() >= cluster_sync_deadline() {
                // Heard but never sent its sessions: do not hold the VIP
                // back for ever.
                self.synced.store(true, Ordering::Relaxed);
                warn!(interface = %shared.name,
                    "cluster: a member answered but sent no sessions; counting as synced");
            }
        }
    }

    fn receive(&self, shared: &Shared, from: SocketAddr, datagram: &[u8]) {
        let member = lock(&self.members).iter().position(|m| m.address == from);
        let result = match member {
            None => Err(Refusal::NotAMember),
            Some(i) => open(&self.cipher, datagram).and_then(|message| {
                let mut members = lock(&self.members);
                let m = &mut members[i];
                let restarted = m.sender.accept(&message, now_ms())?;
                let was_connected = m.connected();
                m.last_heard = Some(Instant::now());
                m.last_heard_wall = Some(SystemTime::now());
                if restarted {
                    m.dumped = false;
                    m.made_got = 0;
                }
                // Announcements we missed (lost, or sent while we could
                // not hear): ask for all of them with the next hello.
                match &message.body {
                    Body::Dump { last: true, .. } => m.made_got = message.made,
                    Body::Dump { .. } => {}
                    Body::Sessions { entries }
                        if m.made_got + entries.len() as u64 == message.made =>
                    {
                        m.made_got = message.made;
                    }
                    _ if message.made != m.made_got => m.dumped = false,
                    _ => {}
                }
                Ok((i, message, restarted || !was_connected))
            }),
        };
        let (i, message, came_up) = match result {
            Ok(accepted) => accepted,
            Err(refusal) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                debug!(interface = %shared.name, %from, "cluster message refused: {refusal:?}");
                return;
            }
        };
        if came_up {
            info!(interface = %shared.name, member = %from, "cluster member up");
            // What it held is gone or stale: it will say again.
            lock(&self.foreign).retain(|_, f| f.member != i);
        }
        let dump_end = matches!(message.body, Body::Dump { last: true, .. });
        match message.body {
            Body::Hello { want_dump } => {
                if want_dump || came_up {
                    self.dump_to(i, from);
                }
            }
            Body::Sessions { entries } | Body::Dump { entries, .. } => {
                {
                    let mut foreign = lock(&self.foreign);
                    let now = Instant::now();
                    for e in entries {
                        if foreign.len() >= MAX_FOREIGN && !foreign.contains_key(&e.index) {
                            break;
                        }
                        foreign.insert(
                            e.index,
                            Foreign {
                                peer: e.peer,
                                endpoint: e.endpoint,
                                member: i,
                                said: now,
                            },
                        );
                    }
                }
                if dump_end {
                    lock(&self.members)[i].dumped = true;
                }
            }
        }
    }

    /// Every session we hold, to member `i`; at most once per hello.
    fn dump_to(&self, i: usize, to: SocketAddr) {
        {
            let mut members = lock(&self.members);
            let m = &mut members[i];
            if m.last_dump.is_some_and(|t| t.elapsed() < HELLO_EVERY / 2) {
                return;
            }
            m.last_dump = Some(Instant::now());
        }
        let entries: Vec<Entry> = lock(&self.ours)
            .iter()
            .map(|(&index, &(peer, endpoint))| Entry {
                index,
                peer,
                endpoint,
            })
            .collect();
        self.send_dump(to, &entries);
    }

    /// A full dump: every session we hold, the last part marked.
    fn send_dump(&self, to: SocketAddr, entries: &[Entry]) {
        let mut chunks = entries.chunks(ENTRIES_PER_MESSAGE).peekable();
        if chunks.peek().is_none() {
            self.send(
                to,
                Body::Dump {
                    entries: Vec::new(),
                    last: true,
                },
            );
            return;
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            self.send(
                to,
                Body::Dump {
                    entries: chunk.to_vec(),
                    last,
                },
            );
        }
    }

    fn send(&self, to: SocketAddr, body: Body) {
        let message = Message {
            boot: self.boot,
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            sent_at_ms: now_ms(),
            made: self.made.load(Ordering::Relaxed),
            body,
        };
        let datagram = seal(&self.cipher, &message);
        // Lost like any datagram: hellos repeat, dumps are asked again.
        let _ = self.socket.send_to(&datagram, to);
    }
}

fn cluster_name(cluster: &Cluster) -> String {
    cluster.options.listen.to_string()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// IPv4-mapped IPv6 addresses as IPv4, so a member matches however the
/// socket reports it.
fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

impl Shared {
    pub(super) fn cluster(&self) -> Option<Arc<Cluster>> {
        read(&self.cluster).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cipher(byte: u8) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&[byte; 32]).into())
    }

    fn entry(i: u32) -> Entry {
        Entry {
            index: i,
            peer: Key([i as u8; 32]),
            endpoint: if i % 2 == 0 {
                SocketAddr::from(([203, 0, 113, i as u8], 51820))
            } else {
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, i as u16))
            },
        }
    }

    fn message(boot: u64, seq: u64, sent_at_ms: u64, body: Body) -> Message {
        Message {
            boot,
            seq,
            sent_at_ms,
            made: seq.wrapping_mul(3),
            body,
        }
    }

    #[test]
    fn a_full_message_fits_one_datagram_and_round_trips() {
        let m = message(
            7,
            1,
            now_ms(),
            Body::Dump {
                entries: (0..ENTRIES_PER_MESSAGE as u32).map(entry).collect(),
                last: true,
            },
        );
        let sealed = seal(&cipher(1), &m);
        assert_eq!(sealed.len(), MAX_DATAGRAM);
        assert!(sealed.len() < 1200);
        assert_eq!(open(&cipher(1), &sealed), Ok(m));
    }

    #[test]
    fn another_key_or_a_flipped_bit_is_refused() {
        let m = message(7, 1, now_ms(), Body::Hello { want_dump: true });
        let sealed = seal(&cipher(1), &m);
        assert_eq!(open(&cipher(2), &sealed), Err(Refusal::Unauthenticated));
        for at in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[at] ^= 0x40;
            assert!(open(&cipher(1), &bad).is_err(), "bit flipped at {at}");
        }
        assert_eq!(open(&cipher(1), &sealed[..20]), Err(Refusal::Malformed));
    }

    #[test]
    fn replays_old_boots_and_stale_messages_are_refused() {
        let now = now_ms();
        let mut sender = Sender::default();
        let hello = |boot, seq, at| message(boot, seq, at, Body::Hello { want_dump: false });
        assert_eq!(sender.accept(&hello(1, 1, now), now), Ok(true));
        assert_eq!(sender.accept(&hello(1, 2, now), now), Ok(false));
        assert_eq!(
            sender.accept(&hello(1, 2, now), now),
            Err(Refusal::Replayed)
        );
        assert_eq!(
            sender.accept(&hello(1, 1, now), now),
            Err(Refusal::Replayed)
        );
        // A restart: a new boot, then the old one's messages are replays.
        assert_eq!(sender.accept(&hello(2, 1, now), now), Ok(true));
        assert_eq!(
            sender.accept(&hello(1, 3, now), now),
            Err(Refusal::Replayed)
        );
        let old = now - FRESH.as_millis() as u64 - 1;
        assert_eq!(sender.accept(&hello(2, 9, old), now), Err(Refusal::Stale));
        assert_eq!(sender.accept(&hello(3, 1, old), now), Err(Refusal::Stale));
    }

    proptest! {
        #[test]
        fn any_bytes_open_to_an_error_or_a_valid_message(bytes in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let _ = open(&cipher(1), &bytes);
        }

        #[test]
        fn any_sessions_message_round_trips(
            boot: u64, seq: u64, at: u64, dump: Option<bool>,
            indices in proptest::collection::vec(any::<u32>(), 0..=ENTRIES_PER_MESSAGE),
        ) {
            let entries = indices.into_iter().map(entry).collect();
            let m = message(boot, seq, at, match dump {
                Some(last) => Body::Dump { entries, last },
                None => Body::Sessions { entries },
            });
            prop_assert_eq!(open(&cipher(9), &seal(&cipher(9), &m)), Ok(m));
        }

        /// Whatever order messages of several boots arrive in, each
        /// (boot, seq) is accepted at most once, and never a boot after a
        /// later one was accepted.
        #[test]
        fn no_message_is_accepted_twice(
            order in proptest::collection::vec((0u64..4, 0u64..8), 0..200),
        ) {
            let now = now_ms();
            let mut sender = Sender::default();
            let mut accepted = std::collections::HashSet::new();
            let mut boots_seen: Vec<u64> = Vec::new();
            for (boot, seq) in order {
                let m = message(boot, seq, now, Body::Hello { want_dump: false });
                if sender.accept(&m, now).is_ok() {
                    prop_assert!(accepted.insert((boot, seq)), "{boot}/{seq} twice");
                    if boots_seen.last() != Some(&boot) {
                        prop_assert!(!boots_seen.contains(&boot), "boot {boot} came back");
                        boots_seen.push(boot);
                    }
                }
            }
        }
    }
}
