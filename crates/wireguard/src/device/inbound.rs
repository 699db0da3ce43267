//! udp → tun: receives with UDP GRO and `recvmmsg`, decrypts data packets,
//! checks their source against the peer's allowed IPs and writes them to the
//! TUN device in GRO batches; handshake messages go to the handshake thread.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use gotatun::noise::TunnResult;
use gotatun::noise::errors::WireGuardError;
use gotatun::packet::{Packet, WgKind};
use quinn_udp::{RecvMeta, UdpSockRef};
use std::time::Instant;
use tracing::debug;
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use super::udp::{Source, Target};
use super::{
    EARLY_DATA, EarlyData, Interface, MAX_PACKET, Peer, Received, Shared, TIMER_TICK, Udp, lock,
    packet_address, read,
};

/// Decrypted packets waiting to be written to the TUN device, each behind
/// room for the virtio-net header.
pub(super) struct TunBatch {
    bufs: Vec<Vec<u8>>,
    used: usize,
    gro: GROTable,
}

impl TunBatch {
    pub(super) fn new() -> TunBatch {
        TunBatch {
            bufs: Vec::new(),
            used: 0,
            gro: GROTable::default(),
        }
    }

    pub(super) fn push(&mut self, shared: &Shared, packet: &[u8]) {
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

    pub(super) fn flush(&mut self, shared: &Shared) {
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

pub(super) fn udp_to_tun(shared: Arc<Shared>) {
    let batch_size = quinn_udp::BATCH_SIZE;
    let mut storage: Vec<Vec<u8>> = (0..batch_size).map(|_| vec![0u8; MAX_PACKET]).collect();
    let mut meta = vec![RecvMeta::default(); batch_size];
    let mut out = TunBatch::new();
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
                let source = Source::received(m.dst_ip, m.interface_index);
                let stride = if m.stride == 0 { m.len } else { m.stride };
                for datagram in buf[..m.len].chunks(stride.max(1)) {
                    let to_us = (from, source);
                    receive(&shared, &iface, &udp, to_us, datagram, &mut cache, &mut out);
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
    (from, source): (SocketAddr, Option<Source>),
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
                    // Another cluster member's session, if we are in one.
                    if let Some(cluster) = shared.cluster() {
                        cluster.take_over(shared, iface, udp, index, (from, source));
                    }
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
                // Roaming: the peer is wherever it last proved to be,
                // and we answer from the address it sent to.
                state.learn(from, source);
                // The peer uses a session: whatever we held for it goes.
                let released = if state.held.is_some() {
                    shared.release_held(&peer, &mut state)
                } else {
                    None
                };
                drop(state);
                if let Some((to, packets)) = released {
                    for packet in &packets {
                        udp.send(shared, to, Some(&peer), packet, None);
                    }
                }
                deliver(shared, iface, &peer, &inner, out);
            }
            TunnResult::Err(WireGuardError::NoCurrentSession) => {
                // Addressed to an index of ours (it is in the map) that
                // has no session yet: our initiation's, answered by the
                // peer, whose response is still in the handshake queue.
                drop(state);
                hold_early(&peer, datagram);
            }
            TunnResult::WriteToNetwork(packet) => {
                let bytes: Packet = packet.into();
                let target = Target {
                    to: from,
                    src: source,
                };
                udp.send(shared, target, Some(&peer), &bytes, None);
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
        let _ = shared.handshakes.try_send(Received {
            from,
            source,
            datagram: datagram.to_vec(),
        });
    } else {
        super::punch::foreign(shared, from, datagram);
    }
}

/// A decrypted packet to the TUN device, if its source is one of the
/// peer's allowed IPs (an empty one is a keepalive).
pub(super) fn deliver(
    shared: &Shared,
    iface: &Interface,
    peer: &Arc<Peer>,
    inner: &[u8],
    out: &mut TunBatch,
) {
    if inner.is_empty() {
        return; // keepalive
    }
    let allowed = packet_address(inner, false)
        .and_then(|src| iface.allowed.lookup(src))
        .is_some_and(|owner| Arc::ptr_eq(owner, peer));
    if allowed {
        out.push(shared, inner);
    } else {
        debug!(interface = %shared.name, peer = ?peer.public_key,
            "dropped a packet from a source outside the peer's allowed IPs");
    }
}

/// Keeps a data packet that came before the handshake response it needs
/// ([`Peer::early`]); the handshake thread decrypts it once the response
/// is in.
#[cold]
fn hold_early(peer: &Peer, datagram: &[u8]) {
    let mut early = lock(&peer.early);
    let held = early.get_or_insert_with(|| EarlyData {
        since: Instant::now(),
        datagrams: Vec::new(),
    });
    if held.datagrams.len() < EARLY_DATA {
        held.datagrams.push(datagram.to_vec());
    }
}
