//! Hole punching and datagrams of other protocols on the device's socket.
//!
//! **Punching** ([`Device::punch`]): a peer behind a NAT is reached through
//! the NAT's mapping of its socket, which lets in only packets from where
//! the peer sent to. Both peers therefore send to each other's candidate
//! addresses at once (the controller tells both at the same moment), and
//! the first handshake that completes wins: its response comes from the
//! address that worked, and the device learns it as the endpoint.
//!
//! One handshake initiation is made per punch and the same bytes go to
//! every candidate, round after round (a responder takes the first copy to
//! arrive and refuses the others as replays), so whichever path is open
//! first completes it.
//!
//! A NAT that receives a packet before its own side has sent anywhere
//! creates connection-tracking state for it (Linux conntrack does), and
//! the mapping its side then makes moves to another port: the peers miss
//! each other for as long as the stray state lives (30 s, refreshed by
//! every retry). So each punch starts with an *opener*: the initiation
//! with a small TTL ([`OPENER_TTL`]), which crosses this side's NAT,
//! making the mapping, and expires before the other side's. Full packets
//! follow [`OPENER_LEAD`] later, by which time the other side's opener
//! has made its mapping too, as long as the two learnt of the punch
//! within that time of each other.
//!
//! **Other protocols** ([`Device::send_datagram`],
//! [`Device::set_foreign_receiver`]): endpoint discovery must be sent from
//! the WireGuard socket, so that the NAT mapping it measures is the one
//! the tunnels use. Datagrams that start with a registered 4-byte magic
//! (which no WireGuard message does: theirs start with a type of 1 to 4
//! and three zero bytes) go to the registered channel instead.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gotatun::packet::{Packet, WgKind};
use tracing::debug;

use super::udp::Target;
use super::{Device, Peer, Shared, Udp, lock, read};
use crate::key::Key;

/// The hop limit of a punch's first packets: enough to cross this side's
/// NAT (the node, then its router), not to reach the other side's.
pub const OPENER_TTL: u8 = 2;
/// How long after the openers the full packets start.
pub const OPENER_LEAD: Duration = Duration::from_millis(400);
/// How often the initiation goes to every candidate again.
const ROUND_EVERY: Duration = Duration::from_millis(100);
/// How long a punch lasts without a handshake before it gives up (the
/// agent tries again later).
pub const PUNCH_FOR: Duration = Duration::from_secs(3);
/// At most this many candidates per punch.
const MAX_CANDIDATES: usize = 16;
/// At most this many punches under way at once.
const MAX_PUNCHES: usize = 256;

/// One punch under way.
pub(super) struct Punch {
    peer: Arc<Peer>,
    candidates: Vec<SocketAddr>,
    initiation: Vec<u8>,
    started: Instant,
    next_round: Instant,
    /// Whether rounds go to the peer's endpoint too (a punch, not a probe).
    to_endpoint: bool,
}

/// Where datagrams of another protocol go: `(from, datagram)`, dropped
/// when the channel is full.
pub type ForeignSender = SyncSender<(SocketAddr, Vec<u8>)>;

/// Datagrams of another protocol on the device's socket: the magic they
/// start with, and where they go (`(from, datagram)`; dropped when full).
pub(super) struct Foreign {
    pub(super) magic: [u8; 4],
    pub(super) to: ForeignSender,
}

impl Device {
    /// Punches through the NATs between this device and the peer `key`:
    /// sends one handshake initiation to each of `candidates`, first with
    /// a small TTL, then in full every 100 ms until a handshake completes
    /// or [`PUNCH_FOR`] passes. The peer learns its endpoint from the
    /// first response. A punch for a peer replaces the one under way.
    pub fn punch(&self, key: &Key, candidates: &[SocketAddr]) -> io::Result<()> {
        self.start_punch(key, candidates, true)
    }

    /// Tries the peer `key` at `to` while its session stays where it is: a
    /// punch without openers whose rounds go to `to` only, so the endpoint
    /// moves there only if `to` answers (a path that was down and may be
    /// back: the peer's IPv6 address after a fallback to IPv4).
    pub fn probe(&self, key: &Key, to: SocketAddr) -> io::Result<()> {
        self.start_punch(key, &[to], false)
    }

    /// Marks `second` as the peer `key`'s address in the other family (or
    /// none): handshake retries, not first initiations or rekeys, go there
    /// as well as to the endpoint, so a dead path falls back within one
    /// retry while a live one keeps the tunnel.
    pub fn set_second_endpoint(&self, key: &Key, second: Option<SocketAddr>) -> io::Result<()> {
        let peer = read(&self.shared.iface)
            .by_key
            .get(key)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such peer"))?;
        lock(&peer.state).second = second.map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()));
        Ok(())
    }

    /// A punch (`opened`: openers first, rounds to the endpoint too) or a
    /// probe.
    fn start_punch(&self, key: &Key, candidates: &[SocketAddr], opened: bool) -> io::Result<()> {
        let shared = &self.shared;
        let udp = shared
            .udp()
            .ok_or_else(|| io::Error::other("the device has no socket"))?;
        let peer = read(&shared.iface)
            .by_key
            .get(key)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such peer"))?;
        let candidates: Vec<SocketAddr> = candidates
            .iter()
            .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
            .filter(|a| a.port() != 0 && !a.ip().is_unspecified())
            .take(MAX_CANDIDATES)
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        let initiation = {
            let mut state = lock(&peer.state);
            let tunn = state
                .tunn
                .as_mut()
                .ok_or_else(|| io::Error::other("the device has no private key"))?;
            let Some(init) = tunn.format_handshake_initiation(true) else {
                return Ok(());
            };
            let init = WgKind::from(init);
            shared.register_index(&init, &peer);
            let bytes: Packet = init.into();
            bytes.to_vec()
        };
        for to in candidates.iter().filter(|_| opened) {
            if let Err(e) = udp.send_with_ttl(*to, &initiation, OPENER_TTL) {
                debug!(interface = %shared.name, %to, "punch opener: {e}");
            } else {
                peer.tx_bytes.fetch_add(
                    initiation.len() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
        }
        let now = Instant::now();
        let mut punches = lock(&shared.punches);
        punches.retain(|p| !Arc::ptr_eq(&p.peer, &peer));
        if punches.len() >= MAX_PUNCHES {
            punches.remove(0);
        }
        punches.push(Punch {
            peer,
            candidates,
            initiation,
            started: now,
            next_round: if opened { now + OPENER_LEAD } else { now },
            to_endpoint: opened,
        });
        Ok(())
    }

    /// Marks `relayed` as the peer `key`'s relay endpoint (or none): its
    /// packets move the peer's endpoint only while no direct one is in
    /// use. Setting one also makes it the endpoint when the peer has none.
    pub fn set_fallback_endpoint(&self, key: &Key, relayed: Option<SocketAddr>) -> io::Result<()> {
        let peer = read(&self.shared.iface)
            .by_key
            .get(key)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such peer"))?;
        let mut state = lock(&peer.state);
        if state.fallback != relayed {
            if let (Some(old), None) = (state.fallback, relayed)
                && state.endpoint == Some(old)
            {
                state.endpoint = None;
            }
            state.fallback = relayed;
            if state.endpoint.is_none() {
                state.endpoint = relayed;
                state.initiate = relayed.is_some();
            }
        }
        Ok(())
    }

    /// Sends `datagram` to `to` from the device's socket (for another
    /// protocol beside WireGuard: endpoint discovery).
    pub fn send_datagram(&self, to: SocketAddr, datagram: &[u8]) -> io::Result<()> {
        let udp = self
            .shared
            .udp()
            .ok_or_else(|| io::Error::other("the device has no socket"))?;
        let target = Target { to, src: None };
        match udp.send(&self.shared, target, None, datagram, None) {
            super::udp::SendOutcome::Handed => Ok(()),
            other => Err(io::Error::other(format!("not sent: {other:?}"))),
        }
    }

    /// Datagrams arriving on the device's socket that start with `magic`
    /// go to `to` (dropped when it is full) instead of WireGuard; `None`
    /// stops that.
    pub fn set_foreign_receiver(&self, receiver: Option<([u8; 4], ForeignSender)>) {
        *super::write(&self.shared.foreign) = receiver.map(|(magic, to)| Foreign { magic, to });
    }
}

/// The timer thread's part: the next round of every punch due, and the end
/// of those that made a handshake or ran out of time.
pub(super) fn tick(shared: &Shared, udp: Option<&Arc<Udp>>) {
    let now = Instant::now();
    let mut due: Vec<(Arc<Peer>, Vec<SocketAddr>, Vec<u8>)> = Vec::new();
    // Each round goes to the peer's endpoint too (its relay, while it has
    // one): the initiation this punch made replaced any other, and the
    // pair must not wait for a retry to come up through the relay. Not
    // sooner than the candidates: the copies race, the responder takes the
    // first to arrive and refuses the rest as replays, so an open direct
    // path (shorter than the detour through a relay) wins the handshake.
    {
        let mut punches = lock(&shared.punches);
        if punches.is_empty() {
            return;
        }
        punches.retain_mut(|p| {
            let age = now.saturating_duration_since(p.started);
            let (made, endpoint) = {
                let state = lock(&p.peer.state);
                let made = state
                    .tunn
                    .as_ref()
                    .and_then(|t| t.time_since_last_handshake())
                    .is_some_and(|since| since < age);
                (made, state.endpoint)
            };
            if made || age >= PUNCH_FOR {
                debug!(interface = %shared.name, peer = ?p.peer.public_key, made, "punch over");
                return false;
            }
            if now >= p.next_round {
                p.next_round = now + ROUND_EVERY;
                let mut to = p.candidates.clone();
                to.extend(endpoint.filter(|e| p.to_endpoint && !p.candidates.contains(e)));
                due.push((Arc::clone(&p.peer), to, p.initiation.clone()));
            }
            true
        });
    }
    let Some(udp) = udp else { return };
    for (peer, candidates, initiation) in due {
        for to in candidates {
            udp.send(
                shared,
                Target { to, src: None },
                Some(&peer),
                &initiation,
                None,
            );
        }
    }
}

/// Whether `datagram` belongs to the registered other protocol; if so it
/// is handed over (or dropped, when its reader is behind).
pub(super) fn foreign(shared: &Shared, from: SocketAddr, datagram: &[u8]) -> bool {
    let foreign = super::read(&shared.foreign);
    match foreign.as_ref() {
        Some(f) if datagram.starts_with(&f.magic) => {
            let _ = f.to.try_send((from, datagram.to_vec()));
            true
        }
        _ => false,
    }
}

impl Udp {
    /// Sends one datagram with IP TTL (IPv6 hop limit) `ttl`, the source
    /// the kernel picks.
    pub(super) fn send_with_ttl(&self, to: SocketAddr, datagram: &[u8], ttl: u8) -> io::Result<()> {
        let to = self.destination(to);
        let address = socket2::SockAddr::from(to);
        let v4 = match to {
            SocketAddr::V4(_) => true,
            SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
        };
        let (level, kind) = if v4 {
            (libc::IPPROTO_IP, libc::IP_TTL)
        } else {
            (libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT)
        };
        let value = libc::c_int::from(ttl);
        // Room for one cmsg carrying a c_int, aligned as cmsghdr wants.
        let mut control = [0u64; 4];
        let mut iov = libc::iovec {
            iov_base: datagram.as_ptr() as *mut libc::c_void,
            iov_len: datagram.len(),
        };
        // SAFETY: a zeroed msghdr is valid; every pointer set below points
        // into locals that outlive the sendmsg call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = address.as_ptr() as *mut libc::c_void;
        msg.msg_namelen = address.len();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<libc::c_int>() as u32) } as usize;
        // SAFETY: msg_control points to `control`, large enough for one
        // cmsg of a c_int (32 bytes ≥ CMSG_SPACE(4) = 24), so CMSG_FIRSTHDR
        // is non-null and CMSG_DATA stays within it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                return Err(io::Error::other("no room for the TTL"));
            }
            (*cmsg).cmsg_level = level;
            (*cmsg).cmsg_type = kind;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<libc::c_int>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::c_int, value);
        }
        // SAFETY: a valid socket and a msghdr whose pointers are valid for
        // the call.
        let sent = unsafe { libc::sendmsg(self.socket.as_raw_fd(), &msg, 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The punches under way, for the device's state.
pub(super) type Punches = Mutex<Vec<Punch>>;
