//! tun → udp: reads the TUN device, finds each packet's peer, encrypts, and
//! sends runs of equal-sized datagrams with one UDP GSO `sendmsg`.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::BytesMut;
use gotatun::packet::{Packet, WgKind};
use tracing::{debug, info};
use tun_rs::{IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::icmp::{IcmpLimiter, MAX_REPLY, unreachable, unreachable_from_host};
use super::inbound::TunBatch;
use super::natted::Natted;
use super::route_loop::LoopGuard;
use super::routes::Padding;
use super::udp::{SendOutcome, Target};
use super::{HELD_FOR, HELD_PACKETS, MAX_PACKET, Peer, Shared, Udp, lock, packet_address, read};

/// The largest UDP payload one GSO send may carry.
const GSO_MAX_BYTES: usize = 65_000;

/// Encrypted datagrams waiting to go out as one GSO send: same endpoint,
/// same size, except that the last one may be shorter.
///
/// The kernel fragments a single datagram larger than the path, but
/// refuses a GSO send whose segments are (EMSGSIZE). Then the run goes out
/// one datagram at a time, and the peer remembers the size
/// ([`Peer::gso_limit`]): larger datagrams to it are sent alone from then
/// on, without a refused send first, until the timer thread forgets the
/// limit (the path may have grown).
struct SendBatch {
    to: Option<Target>,
    /// The peer the datagrams are for. Kept after a flush, so a run to the
    /// same peer does not clone it again.
    peer: Option<Arc<Peer>>,
    buf: Vec<u8>,
    segment: usize,
    count: usize,
    closed: bool,
}

impl SendBatch {
    fn new() -> SendBatch {
        SendBatch {
            to: None,
            peer: None,
            buf: Vec::with_capacity(GSO_MAX_BYTES + MAX_PACKET),
            segment: 0,
            count: 0,
            closed: false,
        }
    }

    /// `gso_limit`: the peer's [`Peer::gso_limit`], read once per run.
    fn push(
        &mut self,
        shared: &Shared,
        udp: &Udp,
        peer: &Arc<Peer>,
        gso_limit: usize,
        to: Target,
        datagram: &[u8],
    ) {
        if self.count > 0
            && (self.to != Some(to)
                || self.closed
                || datagram.len() > self.segment
                || self.count >= udp.max_segments()
                || self.buf.len() + datagram.len() > GSO_MAX_BYTES)
        {
            self.flush(shared, udp);
        }
        if self.count == 0 {
            self.to = Some(to);
            self.segment = datagram.len();
            if !self.peer.as_ref().is_some_and(|p| Arc::ptr_eq(p, peer)) {
                self.peer = Some(Arc::clone(peer));
            }
            if datagram.len() > gso_limit {
                // Too big for the path: alone, for the kernel to fragment.
                self.closed = true;
                shared.fragmented.fetch_add(1, Ordering::Relaxed);
            }
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
            let peer = self.peer.as_deref();
            if udp.send(shared, to, peer, &self.buf, segment) == SendOutcome::SegmentTooBig {
                self.too_big(shared, udp, to);
            }
        }
        self.buf.clear();
        self.count = 0;
        self.closed = false;
        self.to = None;
    }

    /// The path to `to` is smaller than the batch's segments: remember it
    /// for the peer and send the datagrams one by one.
    #[cold]
    fn too_big(&mut self, shared: &Shared, udp: &Udp, to: Target) {
        if let Some(peer) = &self.peer {
            let before = peer.gso_limit.swap(self.segment - 1, Ordering::Relaxed);
            if before == usize::MAX {
                info!(
                    interface = %shared.name, peer = ?peer.public_key, to = %to.to,
                    "datagrams of {} bytes are larger than the path: the kernel fragments them",
                    self.segment
                );
            }
        }
        for datagram in self.buf.chunks(self.segment.max(1)) {
            if datagram.len() == self.segment {
                shared.fragmented.fetch_add(1, Ordering::Relaxed);
            }
            udp.send(shared, to, self.peer.as_deref(), datagram, None);
        }
    }
}

pub(super) fn tun_to_udp(shared: Arc<Shared>) {
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + MAX_PACKET];
    let mut bufs: Vec<Vec<u8>> = (0..IDEAL_BATCH_SIZE)
        .map(|_| vec![0u8; MAX_PACKET])
        .collect();
    let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
    let mut batch = SendBatch::new();
    let mut routes: Vec<Option<Arc<Peer>>> = Vec::with_capacity(IDEAL_BATCH_SIZE);
    let tun_fd = shared.tun.as_raw_fd();
    let mut unrouted = Unrouted::new();
    let mut route_loop = LoopGuard::new();
    // Per packet of a read: one of our own datagrams, carried through the
    // tunnel (`route_loop`).
    let mut nested: Vec<bool> = Vec::with_capacity(IDEAL_BATCH_SIZE);
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
                shared.gone.store(true, Ordering::Relaxed);
                shared.stop();
                return;
            }
            Err(e) => {
                debug!(interface = %shared.name, "TUN read: {e}");
                continue;
            }
        };
        let Some(udp) = shared.udp() else { continue };
        let mut mtu = Padding::new(&shared);
        {
            let iface = read(&shared.iface);
            routes.clear();
            nested.clear();
            for (buf, size) in bufs.iter().zip(sizes.iter_mut()).take(n) {
                let route = packet_address(&buf[..*size], true)
                    .and_then(|dst| iface.allowed.lookup(dst))
                    .map(Arc::clone);
                nested.push(false);
                if let Some(own) = route_loop.own(&buf[..*size], udp.port) {
                    let routed_to = route.as_ref().map(|peer| lock(&peer.state).endpoint);
                    if route_loop.loops(&shared.name, &own, routed_to) {
                        // Dropped: no peer, and no ICMP error to ourselves.
                        *size = 0;
                        routes.push(None);
                        continue;
                    }
                    // Onion routing through this device: carried once.
                    if let Some(flag) = nested.last_mut() {
                        *flag = true;
                    }
                }
                routes.push(route);
            }
        }
        let mut i = 0;
        while i < n {
            let Some(peer) = routes[i].clone() else {
                if sizes[i] > 0 {
                    unrouted.answer(&shared, &bufs[i][..sizes[i]]);
                }
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
                (&sizes[i..end], &nested[i..end]),
                i,
                &mut mtu,
                (&mut batch, &mut route_loop),
            );
            i = end;
        }
        batch.flush(&shared, &udp);
        unrouted.flush(&shared);
    }
}

/// Packets no peer takes: answered with an ICMP error, as the kernel
/// module does (`icmp`), at most a few a second. Only this path touches
/// it; the reply is built on the stack. The error goes back into the TUN
/// device, except for a packet its host source-NATed into the device:
/// that one's error goes from the host to the original sender (`natted`).
struct Unrouted {
    limiter: IcmpLimiter,
    replies: TunBatch,
    pending: bool,
    natted: Natted,
}

impl Unrouted {
    fn new() -> Unrouted {
        Unrouted {
            limiter: IcmpLimiter::new(),
            replies: TunBatch::new(),
            pending: false,
            natted: Natted::new(),
        }
    }

    #[cold]
    fn answer(&mut self, shared: &Shared, packet: &[u8]) {
        // Packets that get no error (multicast, ICMP errors) take no token.
        let mut reply = [0u8; MAX_REPLY];
        let Some(n) = unreachable(packet, &mut reply) else {
            return;
        };
        if !self.limiter.allow(std::time::Instant::now()) {
            return;
        }
        if let Some(sender) = self.natted.original_source(packet)
            && let Some(m) = unreachable_from_host(packet, sender, &mut reply)
        {
            match self.natted.send(&reply[..m], sender) {
                Ok(()) => return,
                Err(e) => {
                    debug!(interface = %shared.name, "ICMP error to {sender} not sent from the host: {e}")
                }
            }
            let Some(again) = unreachable(packet, &mut reply) else {
                return;
            };
            self.replies.push(shared, &reply[..again]);
        } else {
            self.replies.push(shared, &reply[..n]);
        }
        self.pending = true;
    }

    fn flush(&mut self, shared: &Shared) {
        if self.pending {
            self.pending = false;
            self.replies.flush(shared);
        }
    }
}

/// Encrypts a run of packets for one peer. `nested` marks our own
/// datagrams carried through the tunnel: what they become is remembered
/// by `route_loop`, so that they are not carried a second time.
#[allow(clippy::too_many_arguments)]
fn encrypt_run(
    shared: &Shared,
    udp: &Udp,
    peer: &Arc<Peer>,
    bufs: &[Vec<u8>],
    (sizes, nested): (&[usize], &[bool]),
    first: usize,
    mtu: &mut Padding,
    (batch, route_loop): (&mut SendBatch, &mut LoopGuard),
) {
    let mut state = lock(&peer.state);
    if let Some(held) = state.held.as_mut() {
        if held.since.elapsed() < HELD_FOR {
            // Our answered session is not confirmed yet: wait for it.
            for (k, size) in sizes.iter().enumerate() {
                if held.packets.len() < HELD_PACKETS {
                    held.packets.push(bufs[first + k][..*size].to_vec());
                }
            }
            return;
        }
        // Held too long: what waited goes first, on whatever there is.
        if let Some((to, packets)) = shared.release_held(peer, &mut state) {
            batch.flush(shared, udp);
            for packet in &packets {
                udp.send(shared, to, Some(peer), packet, None);
            }
        }
    }
    let endpoint = state.target(peer);
    let Some(tunn) = state.tunn.as_mut() else {
        return;
    };
    let gso_limit = peer.gso_limit.load(Ordering::Relaxed);
    for (k, size) in sizes.iter().enumerate() {
        let bytes = &bufs[first + k][..*size];
        let pad_to = mtu.for_packet(bytes);
        let packet = Packet::from_bytes(BytesMut::from(bytes));
        match tunn.handle_outgoing_packet(packet, Some(pad_to)) {
            Some(WgKind::Data(data)) => {
                if let Some(to) = endpoint {
                    let bytes: Packet = data.into();
                    if nested.get(k) == Some(&true) {
                        route_loop.carried(&bytes);
                    }
                    batch.push(shared, udp, peer, gso_limit, to, &bytes);
                }
            }
            Some(handshake) => {
                shared.register_index(&handshake, peer);
                if let Some(to) = endpoint {
                    let bytes: Packet = handshake.into();
                    batch.flush(shared, udp);
                    udp.send(shared, to, Some(peer), &bytes, None);
                }
            }
            None => {}
        }
    }
}
