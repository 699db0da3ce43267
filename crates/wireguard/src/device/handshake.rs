//! The handshake thread: handshake and cookie messages from the receive
//! thread's bounded queue, rate-limited (cookies under load).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};

use bytes::BytesMut;
use gotatun::noise::TunnResult;
use gotatun::noise::handshake::parse_handshake_anon;
use gotatun::packet::{Packet, WgKind};
use gotatun::tun::MtuWatcher;
use tracing::debug;

use super::inbound::{TunBatch, deliver};
use super::udp::Target;
use super::{Held, Interface, Received, Shared, TIMER_TICK, Udp, lock, read};
use crate::key::Key;
use std::time::Instant;

pub(super) fn handshake_worker(shared: Arc<Shared>, queue: Receiver<Received>) {
    let mut out = TunBatch::new();
    while !shared.stopping.load(Ordering::Relaxed) {
        let received = match queue.recv_timeout(TIMER_TICK) {
            Ok(message) => message,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let Some(udp) = shared.udp() else { continue };
        let iface = read(&shared.iface);
        let mut mtu = shared.mtu_watcher();
        receive_handshake(&shared, &iface, &udp, &received, &mut mtu, &mut out);
    }
}

fn receive_handshake(
    shared: &Shared,
    iface: &Interface,
    udp: &Udp,
    received: &Received,
    mtu: &mut MtuWatcher,
    out: &mut TunBatch,
) {
    let (from, source, datagram) = (received.from, received.source, &received.datagram[..]);
    // Answers go back from the address the message came to.
    let back = Target {
        to: from,
        src: source,
    };
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
            udp.send(shared, back, None, &bytes, None);
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
    let response_index = match &packet {
        WgKind::HandshakeResp(resp) => Some(resp.receiver_idx.get()),
        _ => None,
    };
    match tunn.handle_incoming_packet(packet) {
        TunnResult::WriteToNetwork(reply) => {
            shared.register_index(&reply, &peer);
            // A session is made: as responder, on the index our response
            // gives; as initiator, on our initiation's, now answered.
            let made = match (&reply, is_response) {
                (WgKind::HandshakeResp(resp), false) => Some(resp.sender_idx.get()),
                (_, true) => response_index,
                _ => None,
            };
            if let (Some(index), Some(cluster)) = (made, shared.cluster()) {
                cluster.session_made(index, peer.public_key, from);
            }
            let mut queued: Vec<Packet> = Vec::new();
            let mut early = Vec::new();
            if is_response {
                // The session is up: send what waited for it, and take
                // in what the peer sent on it before we knew it.
                queued.extend(tunn.get_queued_packets(mtu).map(Packet::from));
                if let Some(held) = lock(&peer.early).take() {
                    for datagram in held.datagrams {
                        let packet = Packet::from_bytes(BytesMut::from(&datagram[..]));
                        if let Ok(data @ WgKind::Data(_)) = packet.try_into_wg()
                            && let TunnResult::WriteToTunnel(inner) =
                                tunn.handle_incoming_packet(data)
                        {
                            peer.rx_bytes
                                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
                            early.push(inner);
                        }
                    }
                }
            }
            state.learn(from, source);
            let mut released = None;
            if is_response {
                // Our session is up: what we held while we had only the
                // one we answered goes out on ours.
                released = shared.release_held(&peer, &mut state);
            } else if state.held.is_none() {
                // We answered: hold data until the peer confirms.
                state.held = Some(Held {
                    since: Instant::now(),
                    packets: Vec::new(),
                });
            }
            drop(state);
            let reply: Packet = reply.into();
            udp.send(shared, back, Some(&peer), &reply, None);
            for packet in queued {
                udp.send(shared, back, Some(&peer), &packet, None);
            }
            if let Some((to, packets)) = released {
                for packet in &packets {
                    udp.send(shared, to, Some(&peer), packet, None);
                }
            }
            peer.rx_bytes
                .fetch_add(datagram.len() as u64, Ordering::Relaxed);
            if !early.is_empty() {
                for inner in &early {
                    deliver(shared, iface, &peer, inner, out);
                }
                out.flush(shared);
            }
        }
        // A cookie reply taken in. Not counted: the kernel module and
        // wireguard-go count received handshake messages and data, not
        // cookies (it came for no session; under a flood, neither side
        // would agree on how many).
        TunnResult::Done => {}
        TunnResult::Err(e) => {
            debug!(interface = %shared.name, peer = ?peer.public_key, "handshake: {e:?}")
        }
        TunnResult::WriteToTunnel(_) => {}
    }
}
