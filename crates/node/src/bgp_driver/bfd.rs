//! BFD beside BGP (RFC 5880, 5881): the UDP sockets, and the sessions
//! made to match the neighbours with `bfd = true`. A session that leaves
//! Up takes its BGP session down at once ([`Speaker::bfd_down`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bgp4mesh_bgp::speaker::Speaker;
use tokio::net::UdpSocket;

use super::{Inbound, Inbox, canonical};
use crate::config::BgpConfig;
use crate::transport;

/// The BFD sessions and their sockets.
pub(super) struct BfdLink {
    inbox: Inbox,
    /// BFD sessions with the neighbours that have `bfd = true`.
    sessions: bgp4mesh_bfd::Bfd,
    /// Senders for BFD control packets: IPv4, IPv6.
    senders: [Option<Arc<UdpSocket>>; 2],
    /// Link-local peers' interfaces, as the scope to send with.
    scopes: HashMap<IpAddr, u32>,
}

impl BfdLink {
    pub(super) fn new(inbox: &Inbox) -> BfdLink {
        BfdLink {
            inbox: inbox.clone(),
            sessions: bgp4mesh_bfd::Bfd::new(),
            senders: [None, None],
            scopes: HashMap::new(),
        }
    }

    pub(super) fn sessions(&self) -> &bgp4mesh_bfd::Bfd {
        &self.sessions
    }

    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.sessions.poll_timeout()
    }

    /// Makes the BFD sessions match the neighbours with `bfd = true`,
    /// opening the sockets when first needed.
    pub(super) fn sync(&mut self, now: Instant, config: &BgpConfig) -> std::io::Result<()> {
        let sessions: Vec<(IpAddr, bgp4mesh_bfd::SessionConfig)> = config
            .speaker
            .neighbors
            .iter()
            .zip(&config.transport)
            .filter(|(_, t)| t.bfd)
            .map(|(n, t)| {
                let interval = Duration::from_millis(t.bfd_timers.0);
                let timers = bgp4mesh_bfd::SessionConfig {
                    desired_min_tx: interval,
                    required_min_rx: interval,
                    detect_mult: t.bfd_timers.1,
                };
                (n.address, timers)
            })
            .collect();
        let wanted: Vec<IpAddr> = sessions.iter().map(|(a, _)| *a).collect();
        self.scopes.clear();
        for (n, t) in config.speaker.neighbors.iter().zip(&config.transport) {
            if t.bfd
                && let Some(interface) = &t.interface
            {
                match transport::interface_index(interface) {
                    Ok(index) => {
                        self.scopes.insert(n.address, index);
                    }
                    Err(e) => tracing::warn!("BFD to {}: {e}", n.name),
                }
            }
        }
        for ipv6 in [false, true] {
            let slot = usize::from(ipv6);
            if self.senders[slot].is_none() && wanted.iter().any(|a| a.is_ipv6() == ipv6) {
                let receiver = transport::bfd_receiver(ipv6)?;
                tokio::spawn(receive_loop(receiver, self.inbox.clone()));
                self.senders[slot] = Some(Arc::new(transport::bfd_sender(ipv6)?));
            }
        }
        for (peer, timers) in sessions {
            self.sessions.add(now, peer, timers);
        }
        let gone: Vec<IpAddr> = self
            .sessions
            .sessions()
            .map(|(p, _)| *p)
            .filter(|p| !wanted.contains(p))
            .collect();
        for peer in gone {
            if let Some(bye) = self.sessions.remove(peer) {
                self.send(peer, &bye);
            }
        }
        Ok(())
    }

    fn send(&self, peer: IpAddr, bytes: &[u8]) {
        if let Some(socket) = &self.senders[usize::from(peer.is_ipv6())] {
            let to = match (peer, self.scopes.get(&peer)) {
                (IpAddr::V6(v6), Some(scope)) => {
                    SocketAddr::V6(SocketAddrV6::new(v6, transport::BFD_PORT, 0, *scope))
                }
                _ => SocketAddr::new(peer, transport::BFD_PORT),
            };
            let _ = socket.try_send_to(bytes, to);
        }
    }

    /// A control packet from `from`.
    pub(super) fn received(&mut self, now: Instant, from: IpAddr, bytes: &[u8]) {
        if let Err(why) = self.sessions.receive(now, from, bytes) {
            tracing::debug!("BFD packet from {from} discarded: {why}");
        }
    }

    /// Sends the BFD packets due and acts on state changes: a session that
    /// leaves Up takes its BGP session down at once.
    pub(super) fn io(&mut self, now: Instant, speaker: &mut Speaker) {
        self.sessions.handle_timeout(now);
        for (peer, bytes) in self.sessions.poll_transmit(now) {
            self.send(peer, &bytes);
        }
        while let Some(event) = self.sessions.poll_event() {
            tracing::info!(
                "BFD {}: {} -> {} ({})",
                event.peer,
                event.from,
                event.to,
                event.diag
            );
            if event.from == bgp4mesh_bfd::State::Up
                && let Some(id) = speaker.neighbor_by_address(event.peer)
            {
                speaker.bfd_down(now, id);
            }
        }
    }
}

/// Passes received control packets to the BGP task until it is gone.
async fn receive_loop(receiver: UdpSocket, tx: Inbox) {
    let mut buf = [0u8; 512];
    while let Ok((n, from)) = receiver.recv_from(&mut buf).await {
        let from = canonical(from.ip());
        if tx
            .send(Inbound::BfdPacket {
                from,
                bytes: buf[..n].to_vec(),
            })
            .is_err()
        {
            return;
        }
    }
}
