//! The timer thread: each peer's protocol timers every tick (handshake
//! retries, rekey, keepalives), the pruning of the session-index map and
//! the interface's MTU read again every second, and forgetting the learnt
//! GSO limits now and then (a path may grow); between ticks, what the
//! routing table says (`routes`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gotatun::packet::{Packet, WgKind};
use tracing::{debug, info};

use super::routes::RouteWatch;
use super::{EARLY_DATA_KEPT, HELD_FOR, Peer, Shared, TIMER_TICK, lock, read};

/// How long a peer's GSO limit ([`Peer::gso_limit`]) holds before a full
/// GSO run is tried again: one refused send per peer and period when the
/// path stayed small.
const GSO_LIMIT_KEPT: Duration = Duration::from_secs(60);

pub(super) fn timers(shared: Arc<Shared>) {
    let mut last_prune = Instant::now();
    let mut last_gso_reset = Instant::now();
    let mut routes = RouteWatch::new(&shared)
        .inspect_err(|e| {
            info!(interface = %shared.name, "routes not watched: {e}");
            // Nor the interface's state: it counts as up.
            shared.down.store(false, Ordering::Relaxed);
        })
        .ok();
    while !shared.stopping.load(Ordering::Relaxed) {
        match routes.as_mut() {
            Some(routes) => routes.wait_tick(&shared, TIMER_TICK),
            None => shared.wait_readable(None, Some(TIMER_TICK)),
        }
        let udp = shared.udp();
        // A device that is down runs no timers (the kernel module stops
        // them): no keepalives, handshakes or retries until it is up.
        let peers: Vec<Arc<Peer>> = if shared.down.load(Ordering::Relaxed) {
            Vec::new()
        } else {
            read(&shared.iface).peers.clone()
        };
        for peer in peers {
            let mut state = lock(&peer.state);
            if state
                .held
                .as_ref()
                .is_some_and(|held| held.since.elapsed() >= HELD_FOR)
                && let Some((to, packets)) = shared.release_held(&peer, &mut state)
                && let Some(udp) = &udp
            {
                for packet in &packets {
                    udp.send(&shared, to, Some(&peer), packet, None);
                }
            }
            // No handshake can be made with it: nothing is sent.
            if peer.low_order {
                continue;
            }
            let endpoint = state.target(&peer);
            let initiate = std::mem::take(&mut state.initiate);
            let Some(tunn) = state.tunn.as_mut() else {
                continue;
            };
            let since_handshake = tunn.time_since_last_handshake();
            let first = initiate && endpoint.is_some() && since_handshake.is_none();
            let due = if first {
                Ok(tunn.format_handshake_initiation(false).map(WgKind::from))
            } else {
                tunn.update_timers()
            };
            // A retry (no handshake since the last initiation, or none
            // ever) goes to the peer's second address too: a dead IPv6
            // path falls back to IPv4 within one retry, and a live one is
            // not raced by the other family on first contact and rekeys.
            let unanswered = since_handshake
                .is_none_or(|since| state.initiated.is_some_and(|at| since > at.elapsed()));
            let second = state
                .second
                .filter(|s| !first && unanswered && endpoint.is_some_and(|e| e.to != *s));
            if matches!(due, Ok(Some(WgKind::HandshakeInit(_)))) {
                state.initiated = Some(Instant::now());
            }
            // A handshake the timers make (a retry, a rekey) goes to the
            // peer's relay too while its endpoint is a direct one: a direct
            // path that died (a NAT that rebooted) then falls back to the
            // relay within a retry, and one that lives wins the race.
            let fallback = state
                .fallback
                .filter(|f| endpoint.is_some_and(|e| e.to != *f));
            match due {
                Ok(Some(packet)) => {
                    shared.register_index(&packet, &peer);
                    drop(state);
                    if let (Some(udp), Some(to)) = (&udp, endpoint) {
                        let initiation = matches!(packet, WgKind::HandshakeInit(_));
                        let bytes: Packet = packet.into();
                        udp.send(&shared, to, Some(&peer), &bytes, None);
                        for also in [fallback, second].into_iter().flatten() {
                            if initiation {
                                let to = super::udp::Target {
                                    to: also,
                                    src: None,
                                };
                                udp.send(&shared, to, Some(&peer), &bytes, None);
                            }
                        }
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    debug!(interface = %shared.name, peer = ?peer.public_key, "timers: {e:?}")
                }
            }
        }
        super::punch::tick(&shared, udp.as_ref());
        if last_prune.elapsed() >= Duration::from_secs(1) {
            last_prune = Instant::now();
            let table = &shared.index_table;
            lock(&shared.by_index).retain(|index, _| table.in_use(*index));
            shared.refresh_mtu();
            // Data held for a response that never came.
            for peer in &read(&shared.iface).peers {
                let mut early = lock(&peer.early);
                if early
                    .as_ref()
                    .is_some_and(|held| held.since.elapsed() >= EARLY_DATA_KEPT)
                {
                    *early = None;
                }
            }
        }
        if last_gso_reset.elapsed() >= GSO_LIMIT_KEPT {
            last_gso_reset = Instant::now();
            for peer in &read(&shared.iface).peers {
                peer.gso_limit.store(usize::MAX, Ordering::Relaxed);
            }
        }
    }
    info!(interface = %shared.name, "WireGuard device stopped");
}
